//! The accepting side of the peer transport: one task per incoming
//! connection, reading the Hello and then envelopes (see [`super::frame`]).

use std::future::{poll_fn, Future};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use futures::future::{select, Either};
use glommio::net::{TcpListener, TcpStream};

use futures::io::AsyncRead;

use super::frame::{self, FrameError, FrameReader};
use super::{secure, Counter, TransportConfig};
use crate::grpc::limits::{ConnHandle, Limits, Registry};
use crate::proto::peer::{Envelope, Hello};
use crate::shutdown::Shutdown;

/// Pause after a failed `accept` (e.g. out of file descriptors), so the
/// loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(20);

/// Incoming-side counters of one shard's [`serve_with`].
#[derive(Debug, Default)]
pub struct RecvStats {
    /// Connections accepted.
    pub accepted: Counter,
    /// Envelopes handed to the sink.
    pub recv_msgs: Counter,
    /// Frame bytes received (headers included, Hello excluded).
    pub recv_bytes: Counter,
    /// Connections closed for a protocol violation (bad or missing Hello,
    /// oversize or undecodable frame) or refused by TLS (no handshake,
    /// a certificate that does not name the node the Hello claims).
    pub rejected: Counter,
}

/// Moves an accepted connection to another shard after its Hello:
/// `(from_node, sender_shard, socket, bytes already read)`; returns true
/// when the connection was taken.
pub type Handoff = Rc<dyn Fn(u64, u32, OwnedFd, Vec<u8>) -> bool>;

/// Serves incoming peer connections until `shutdown` (each envelope is
/// passed to `sink(from_node, envelope)`), keeping them on this shard.
#[cfg(test)]
pub async fn serve_with(
    listener: TcpListener,
    sink: Rc<dyn Fn(u64, Envelope)>,
    shutdown: Shutdown,
    config: TransportConfig,
    stats: Rc<RecvStats>,
) {
    serve_handing_off(listener, sink, shutdown, config, stats, None).await
}

/// [`serve_with`], offering every connection that names its sending shard
/// to `handoff`.
pub async fn serve_handing_off(
    listener: TcpListener,
    sink: Rc<dyn Fn(u64, Envelope)>,
    shutdown: Shutdown,
    config: TransportConfig,
    stats: Rc<RecvStats>,
    handoff: Option<Handoff>,
) {
    let registry = Registry::new(
        "peer",
        Limits {
            max_connections: config.max_connections,
            // Peer connections hold no call bytes in the registry (frames
            // are bounded by `max_frame` and the reader's growth).
            max_conn_bytes: 0,
            max_shard_bytes: 0,
        },
    );
    let config = Rc::new(config);
    loop {
        let accepted = {
            let accept = pin!(listener.accept());
            let stop = pin!(shutdown.wait());
            match select(accept, stop).await {
                Either::Left((res, _)) => res,
                Either::Right(_) => break,
            }
        };
        match accepted {
            Ok(stream) => {
                stats.accepted.inc();
                // At the limit, the connection that has waited longest for
                // its Hello makes room; if none waits, the new one is closed.
                let Some(place) = registry.admit() else {
                    stats.rejected.inc();
                    continue;
                };
                let sink = sink.clone();
                let shutdown = shutdown.clone();
                let config = config.clone();
                let stats = stats.clone();
                let handoff = handoff.clone();
                glommio::spawn_local(async move {
                    let conn = pin!(serve_conn(stream, &*sink, &config, &stats, handoff, place));
                    let stop = pin!(shutdown.wait());
                    select(conn, stop).await;
                })
                .detach();
            }
            Err(err) => {
                tracing::warn!(%err, "accepting a peer connection failed");
                glommio::timer::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
    tracing::debug!("peer listener stopped by shutdown");
}

/// Reads one connection to its end, feeding envelopes to `sink`.
async fn serve_conn(
    mut stream: TcpStream,
    sink: &dyn Fn(u64, Envelope),
    config: &TransportConfig,
    stats: &RecvStats,
    handoff: Option<Handoff>,
    place: ConnHandle,
) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    // Until the peer has said who it is, only a Hello-sized frame is read.
    let mut reader = FrameReader::new(frame::MAX_HELLO_FRAME);

    let first = {
        let mut read = pin!(reader.next_frame(&mut stream));
        let mut timeout = pin!(glommio::timer::sleep(config.hello_timeout));
        let outcome = poll_fn(|cx| {
            if let Poll::Ready(res) = read.as_mut().poll(cx) {
                return Poll::Ready(Some(res));
            }
            if timeout.as_mut().poll(cx).is_ready() || place.poll_evicted(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match outcome {
            Some(res) => res,
            None => {
                stats.rejected.inc();
                tracing::debug!(peer, "no Hello from peer in time, or room needed; closing");
                return;
            }
        }
    };
    let hello = match first {
        Ok(Some(body)) => frame::decode::<Hello>(body),
        Ok(None) => {
            tracing::debug!(peer, "peer closed the connection before its Hello");
            return;
        }
        Err(err) => Err(err),
    };
    let hello = match hello {
        Ok(hello) => hello,
        Err(err) => {
            end_of_connection(&peer, None, err, stats);
            return;
        }
    };
    reader.set_max_frame(config.max_frame);
    let from = hello.node_id;
    tracing::debug!(peer, from, shard = hello.shard, "peer connected");
    if let (Some(handoff), Some(shard)) = (handoff, hello.shard) {
        // SAFETY: dup(2) of a socket this task owns; the new descriptor is
        // owned by the OwnedFd from here on. No read is in flight (the
        // Hello's completed), so no bytes are lost between the two.
        let fd = unsafe { libc::dup(stream.as_raw_fd()) };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by dup and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if handoff(from, shard, fd, reader.buffered().to_vec()) {
                return;
            }
        }
    }
    // Past its Hello, the connection is no longer the one to make room.
    let _busy = place.start_call();
    after_hello(stream, reader, from, &peer, sink, config, stats).await;
}

/// Reads the envelopes of a connection whose Hello claimed node `from`:
/// in clear, or, with TLS configured, only after a handshake proving the
/// claim (see [`secure`]).
async fn after_hello(
    stream: TcpStream,
    reader: FrameReader,
    from: u64,
    peer: &str,
    sink: &dyn Fn(u64, Envelope),
    config: &TransportConfig,
    stats: &RecvStats,
) {
    let Some(tls) = &config.tls else {
        return read_frames(stream, reader, from, peer, sink, stats).await;
    };
    let buffered = reader.buffered().to_vec();
    match secure::accept(tls, stream, buffered, from, config.hello_timeout).await {
        Ok(stream) => {
            let reader = FrameReader::new(config.max_frame);
            read_frames(stream, reader, from, peer, sink, stats).await
        }
        Err(why) => {
            stats.rejected.inc();
            if refusal_may_log() {
                tracing::warn!(peer, from, "peer connection refused: {why}");
            }
        }
    }
}

/// Refused peer connections logged per second and shard at most: a flood
/// of bad handshakes must not become a flood of log lines (the rest are
/// counted in `RecvStats::rejected`).
const REFUSALS_LOGGED_PER_SECOND: u32 = 10;

fn refusal_may_log() -> bool {
    use std::cell::Cell;
    use std::time::Instant;
    thread_local! {
        static WINDOW: Cell<(Option<Instant>, u32)> = const { Cell::new((None, 0)) };
    }
    let now = Instant::now();
    WINDOW.with(|w| {
        let (start, n) = w.get();
        match start {
            Some(s) if now.duration_since(s) < Duration::from_secs(1) => {
                w.set((start, n + 1));
                n < REFUSALS_LOGGED_PER_SECOND
            }
            _ => {
                w.set((Some(now), 1));
                true
            }
        }
    })
}

/// Serves a connection handed over by another shard's listener (see
/// [`Handoff`]), on the current shard.
pub async fn serve_adopted(
    fd: OwnedFd,
    from: u64,
    buffered: Vec<u8>,
    sink: Rc<dyn Fn(u64, Envelope)>,
    shutdown: Shutdown,
    config: Rc<TransportConfig>,
    stats: Rc<RecvStats>,
) {
    // SAFETY: `fd` is a connected TCP socket owned by us; ownership moves
    // to the stream.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let reader = FrameReader::with_buffered(config.max_frame, &buffered);
    let conn = pin!(after_hello(
        stream, reader, from, &peer, &*sink, &config, &stats
    ));
    let stop = pin!(shutdown.wait());
    select(conn, stop).await;
}

/// Reads envelopes until the connection ends, feeding them to `sink`.
async fn read_frames<S: AsyncRead + Unpin>(
    mut stream: S,
    mut reader: FrameReader,
    from: u64,
    peer: &str,
    sink: &dyn Fn(u64, Envelope),
    stats: &RecvStats,
) {
    let label = crate::metrics::peer_label(from);
    let m = crate::metrics::get();
    let received_msgs = m.peer_received_messages.with_label_values(&[&label]);
    let received_bytes = m.peer_received_bytes.with_label_values(&[&label]);
    loop {
        let body = match reader.next_frame(&mut stream).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                tracing::debug!(peer, from, "peer closed the connection");
                return;
            }
            Err(err) => {
                end_of_connection(peer, Some(from), err, stats);
                return;
            }
        };
        let len = body.len();
        match frame::decode::<Envelope>(body) {
            Ok(env) => {
                stats.recv_msgs.inc();
                stats.recv_bytes.add((frame::HEADER_LEN + len) as u64);
                received_msgs.inc();
                received_bytes.inc_by((frame::HEADER_LEN + len) as u64);
                sink(from, env);
            }
            Err(err) => {
                end_of_connection(peer, Some(from), err, stats);
                return;
            }
        }
        // A fast sender can keep the buffer full; let other tasks run.
        glommio::yield_if_needed().await;
    }
}

/// Logs why a connection ends: quietly for I/O trouble, loudly for protocol
/// violations.
fn end_of_connection(peer: &str, from: Option<u64>, err: FrameError, stats: &RecvStats) {
    match err {
        FrameError::Io(_) | FrameError::Truncated { .. } => {
            tracing::debug!(peer, from, %err, "peer connection ended");
        }
        FrameError::Oversize { .. } | FrameError::Decode(_) => {
            stats.rejected.inc();
            tracing::warn!(peer, from, %err, "malformed input from peer; closing");
        }
    }
}
