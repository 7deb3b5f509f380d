//! Socket helpers shared by the gRPC frontend and the peer transport.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Fails when `addr` is already bound by another socket, even one that
/// uses SO_REUSEPORT: the probe binds without it, which the kernel refuses
/// while any listener holds the address. (The shards' own listeners share
/// the address through SO_REUSEPORT, and so would a second process of the
/// same user; probing first is what keeps two nodes from silently splitting
/// one address's traffic.)
///
/// A process that was just killed can keep its listeners for a moment:
/// io_uring releases the files of its in-flight requests after the process
/// is gone. So a busy address is probed again for up to `patience` before
/// it counts as taken.
pub fn check_address_free(addr: SocketAddr, patience: std::time::Duration) -> std::io::Result<()> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let give_up = std::time::Instant::now() + patience;
    loop {
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        // Connections of an earlier run in TIME_WAIT must not count as a user.
        socket.set_reuse_address(true)?;
        match socket.bind(&addr.into()) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < give_up =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Binds a fresh SO_REUSEPORT listener on `addr` for the calling shard.
///
/// Every shard calls this with the same address and gets its own socket, so
/// the kernel spreads incoming connections across cores. (glommio's own
/// `TcpListener::bind` also sets SO_REUSEPORT, but with port 0 every
/// executor would get a different port; sharing one fd across executors is
/// not supported, so each shard binds its own.)
pub fn reuseport_listener(addr: SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is a listening TCP socket we own exclusively: `into_raw_fd`
    // released it from `socket`, and ownership passes to the listener.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(fd) })
}
