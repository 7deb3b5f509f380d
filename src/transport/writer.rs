//! The writer task of one outgoing peer link: connects, sends the Hello, then
//! writes every batch of queued frames with one `write_all`, reconnecting
//! with jittered exponential backoff after failures.

use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::{select, Either};
use futures::io::AsyncWriteExt;
use glommio::net::TcpStream;
use rand::Rng;

use super::frame;
use super::{secure, Link, Shared};
use crate::proto::peer::Hello;

/// Capacity a fresh batch buffer starts with.
const INITIAL_BUF: usize = 64 << 10;

/// Batch buffers that grew beyond this (e.g. after a snapshot) are replaced
/// by fresh small ones instead of being kept around.
const MAX_KEPT_BUF: usize = 4 << 20;

/// Runs the writer of `link` until shutdown or until the link is closed.
pub(super) async fn run(link: Rc<Link>, shared: Rc<Shared>) {
    {
        let work = pin!(drive(&link, &shared));
        let stop = pin!(shared.shutdown.wait());
        if let Either::Right(_) = select(work, stop).await {
            tracing::debug!(node = link.node, "peer writer stopped by shutdown");
        }
    }
    link.writer_running.set(false);
    link.waker.take();
}

/// Resolves when the link has queued frames (`true`) or was closed (`false`).
async fn wait_for_work(link: &Link) -> bool {
    poll_fn(|cx| {
        if link.closed.get() {
            Poll::Ready(false)
        } else if link.pending_msgs.get() > 0 {
            Poll::Ready(true)
        } else {
            let waker = link.waker.take();
            link.waker.set(match waker {
                Some(w) if w.will_wake(cx.waker()) => Some(w),
                _ => Some(cx.waker().clone()),
            });
            Poll::Pending
        }
    })
    .await
}

/// Drops everything queued on `link` (counted as failed).
fn drop_pending(link: &Link, shared: &Shared) {
    let msgs = link.pending_msgs.replace(0);
    link.pending.borrow_mut().clear();
    shared.stats.dropped_failed.add(msgs as u64);
}

/// Returns a written batch buffer for reuse, unless it grew too large.
fn recycle(mut buf: BytesMut) -> BytesMut {
    if buf.capacity() > MAX_KEPT_BUF {
        BytesMut::with_capacity(INITIAL_BUF)
    } else {
        buf.clear();
        buf
    }
}

/// `backoff` scaled by a random factor in [0.5, 1).
fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.0))
}

fn resolve(addr: &str) -> io::Result<SocketAddr> {
    if let Ok(sa) = addr.parse() {
        return Ok(sa);
    }
    // Host names go through the system resolver (blocking); cluster
    // configurations normally use IP literals, which never get here.
    addr.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        )
    })
}

/// Connects to node `node` at `addr` and sends the Hello; with TLS, then
/// runs the handshake, which must prove that the peer is node `node`.
async fn connect(node: u64, addr: &str, shared: &Shared) -> io::Result<secure::ClientStream> {
    let config = &shared.config;
    let sa = resolve(addr)?;
    let mut stream = TcpStream::connect_timeout(sa, config.connect_timeout).await?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(config.write_timeout))?;
    let mut hello = BytesMut::new();
    frame::encode_frame(
        &Hello {
            node_id: shared.node_id,
            reserved: 0,
            shard: shared.shard.get(),
        },
        &mut hello,
        config.max_frame,
    )
    .map_err(io::Error::other)?;
    stream.write_all(&hello).await?;
    match &config.tls {
        None => Ok(Box::new(stream)),
        Some(tls) => secure::connect(tls, stream, node, config.connect_timeout).await,
    }
}

async fn drive(link: &Link, shared: &Shared) {
    let config = &shared.config;
    let stats = &shared.stats;
    let node = link.node;
    let mut backoff = config.backoff_min;
    let mut spare = BytesMut::with_capacity(INITIAL_BUF);
    // Whether the last connection attempt or write succeeded: only the first
    // failure of an outage is logged loudly.
    let mut healthy = true;
    loop {
        if !wait_for_work(link).await {
            return;
        }
        let gen = link.addr_gen.get();
        let addr = link.addr.borrow().clone();
        let mut stream = match connect(node, &addr, shared).await {
            Ok(stream) => stream,
            Err(err) => {
                stats.connect_failures.inc();
                drop_pending(link, shared);
                if healthy {
                    tracing::warn!(node, addr, %err, "cannot connect to peer; retrying");
                } else {
                    tracing::debug!(node, addr, %err, "cannot connect to peer; retrying");
                }
                healthy = false;
                glommio::timer::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(config.backoff_max);
                continue;
            }
        };
        stats.connects.inc();
        tracing::debug!(node, addr, "connected to peer");
        healthy = true;

        // Write batches until the connection fails or the address changes.
        let failed = loop {
            if !wait_for_work(link).await {
                return;
            }
            if link.addr_gen.get() != gen {
                tracing::debug!(node, "peer address changed; reconnecting");
                break false;
            }
            let msgs = link.pending_msgs.replace(0);
            let batch = std::mem::replace(&mut *link.pending.borrow_mut(), spare);
            // The flush matters for TLS, whose stream may keep the tail of
            // a batch in its record buffer; a plain socket has none.
            let res = match stream.write_all(&batch).await {
                Ok(()) => stream.flush().await,
                Err(e) => Err(e),
            };
            let bytes = batch.len() as u64;
            spare = recycle(batch);
            match res {
                Ok(()) => {
                    stats.sent_msgs.add(msgs as u64);
                    stats.sent_bytes.add(bytes);
                    stats.batches.inc();
                    backoff = config.backoff_min;
                }
                Err(err) => {
                    stats.write_failures.inc();
                    stats.dropped_failed.add(msgs as u64);
                    tracing::warn!(node, addr, %err, "write to peer failed; reconnecting");
                    break true;
                }
            }
        };
        drop(stream);
        if failed {
            healthy = false;
            glommio::timer::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(config.backoff_max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        let d = Duration::from_millis(400);
        for _ in 0..1000 {
            let j = jittered(d);
            assert!(j >= d / 2 && j < d, "{j:?}");
        }
    }

    #[test]
    fn oversized_buffers_are_not_kept() {
        let small = recycle(BytesMut::from(&b"abc"[..]));
        assert!(small.is_empty());
        let big = recycle(BytesMut::with_capacity(MAX_KEPT_BUF + 1));
        assert_eq!(big.capacity(), INITIAL_BUF);
    }

    #[test]
    fn resolves_literals_and_rejects_garbage() {
        assert_eq!(
            resolve("127.0.0.1:9").unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert!(resolve("not an address").is_err());
    }
}
