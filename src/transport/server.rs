//! The accepting side of the peer transport: one task per incoming
//! connection, reading the Hello and then envelopes (see [`super::frame`]).

use std::pin::pin;
use std::rc::Rc;
use std::time::Duration;

use futures::future::{select, Either};
use glommio::net::{TcpListener, TcpStream};

use super::frame::{self, FrameError, FrameReader};
use super::{Counter, TransportConfig};
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
    /// oversize or undecodable frame).
    pub rejected: Counter,
}

/// [`super::serve`] with explicit tunables and counters.
pub async fn serve_with(
    listener: TcpListener,
    sink: Rc<dyn Fn(u64, Envelope)>,
    shutdown: Shutdown,
    config: TransportConfig,
    stats: Rc<RecvStats>,
) {
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
                let sink = sink.clone();
                let shutdown = shutdown.clone();
                let config = config.clone();
                let stats = stats.clone();
                glommio::spawn_local(async move {
                    let conn = pin!(serve_conn(stream, &*sink, &config, &stats));
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
) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let mut reader = FrameReader::new(config.max_frame);

    let first = {
        let read = pin!(reader.next_frame(&mut stream));
        let timeout = pin!(glommio::timer::sleep(config.hello_timeout));
        match select(read, timeout).await {
            Either::Left((res, _)) => res,
            Either::Right(_) => {
                stats.rejected.inc();
                tracing::warn!(peer, "no Hello from peer in time; closing");
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
    let from = match hello {
        Ok(hello) => hello.node_id,
        Err(err) => {
            end_of_connection(&peer, None, err, stats);
            return;
        }
    };
    tracing::debug!(peer, from, "peer connected");

    loop {
        let body = match reader.next_frame(&mut stream).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                tracing::debug!(peer, from, "peer closed the connection");
                return;
            }
            Err(err) => {
                end_of_connection(&peer, Some(from), err, stats);
                return;
            }
        };
        let len = body.len();
        match frame::decode::<Envelope>(body) {
            Ok(env) => {
                stats.recv_msgs.inc();
                stats.recv_bytes.add((frame::HEADER_LEN + len) as u64);
                sink(from, env);
            }
            Err(err) => {
                end_of_connection(&peer, Some(from), err, stats);
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
