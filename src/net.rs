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

/// Fails with `AddrInUse` when a process other than this one listens on
/// `addr`'s port at `addr` (or either side is a wildcard address); with
/// another error when `/proc` cannot tell.
///
/// `check_address_free` runs before the shards bind and cannot see a second
/// node that starts in the same instant: both probes pass, then both bind
/// with SO_REUSEPORT and the kernel splits connections between them. This
/// check runs after this node's listeners are bound. Of two such nodes, the
/// one that checks second sees the other's listeners (they were bound
/// before the first check ran), so at most one of them goes on serving.
pub fn check_sole_listener(addr: SocketAddr) -> std::io::Result<()> {
    let ours = own_socket_inodes()?;
    let foreign = foreign_listeners(addr, &ours)?;
    if foreign.is_empty() {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!(
            "another process listens on it too (socket inode {}); \
             its SO_REUSEPORT listener would take part of this node's connections",
            foreign[0]
        ),
    ))
}

/// The inodes of this process's sockets, from `/proc/self/fd`.
fn own_socket_inodes() -> std::io::Result<std::collections::HashSet<u64>> {
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        // An fd closed since the listing is simply not one of ours.
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse().ok())
        {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

/// Inodes of listening TCP sockets on `addr`'s port, at `addr` or with a
/// wildcard on either side, that are not in `ours`.
fn foreign_listeners(
    addr: SocketAddr,
    ours: &std::collections::HashSet<u64>,
) -> std::io::Result<Vec<u64>> {
    let mut foreign = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            // No IPv6 in this kernel or namespace: nothing listens there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let Some((local, inode)) = parse_listener(line) else {
                continue;
            };
            let overlaps = local.ip() == addr.ip()
                || local.ip().is_unspecified()
                || addr.ip().is_unspecified();
            if local.port() == addr.port() && overlaps && !ours.contains(&inode) {
                foreign.push(inode);
            }
        }
    }
    Ok(foreign)
}

/// The local address and inode of a `/proc/net/tcp{,6}` line in state
/// LISTEN, or `None` for any other line.
///
/// Addresses are hex: the port big-endian, the address as 32-bit words in
/// the kernel's byte order (network-order bytes read as native integers).
fn parse_listener(line: &str) -> Option<(SocketAddr, u64)> {
    const LISTEN: &str = "0A";
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 || fields[3] != LISTEN {
        return None;
    }
    let (ip_hex, port_hex) = fields[1].split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in 0..ip_hex.len() / 8 {
        let w = u32::from_str_radix(ip_hex.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    let ip: std::net::IpAddr = match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes.as_slice()).ok()?.into(),
        16 => <[u8; 16]>::try_from(bytes.as_slice()).ok()?.into(),
        _ => return None,
    };
    let inode = fields[9].parse().ok()?;
    Some((SocketAddr::new(ip, port), inode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn inode_of(fd: &impl AsRawFd) -> u64 {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let target = std::fs::read_link(path).expect("fd link");
        let target = target.to_string_lossy().into_owned();
        target
            .trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .expect("socket inode")
    }

    #[test]
    fn proc_lines_parse_only_listeners() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_listener(v4),
            Some(("127.0.0.1:8080".parse().expect("addr"), 4242))
        );
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(parse_listener(&established), None);
        let v6 = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_listener(v6),
            Some(("[::1]:8080".parse().expect("addr"), 77))
        );
        assert_eq!(parse_listener("  sl  local_address rem_address   st"), None);
    }

    #[test]
    fn a_second_reuseport_listener_is_seen_unless_it_is_ours() {
        // Two listeners share one port through SO_REUSEPORT, as two node
        // processes would; one of them counts as "another process".
        let a = socket_with_reuseport(None);
        let addr = a.local_addr().expect("addr").as_socket().expect("inet");
        let b = socket_with_reuseport(Some(addr));
        let (ia, ib) = (inode_of(&a), inode_of(&b));
        let only_a = [ia].into_iter().collect();
        assert_eq!(foreign_listeners(addr, &only_a).expect("proc"), vec![ib]);
        let both = [ia, ib].into_iter().collect();
        assert!(foreign_listeners(addr, &both).expect("proc").is_empty());
        // Every socket here is this process's own.
        check_sole_listener(addr).expect("only our own listeners");
    }

    fn socket_with_reuseport(addr: Option<SocketAddr>) -> Socket {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        s.set_reuse_port(true).expect("reuseport");
        let addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr"));
        s.bind(&addr.into()).expect("bind");
        s.listen(8).expect("listen");
        s
    }
}
