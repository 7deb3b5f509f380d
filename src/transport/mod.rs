//! Peer transport: raft messages and forwarded calls between nodes.
//!
//! What the rest of the crate uses:
//! - `PeerLinks`: one per shard, outgoing links to every other node.
//! - `serve_handing_off` / `serve_adopted`: accept peer connections on the
//!   shard's SO_REUSEPORT raft listener (moving each to the shard its Hello
//!   names) and hand every received `Envelope` to a sink.
//!
//! # Design
//!
//! Connections are one-way. Each shard keeps its own outgoing connection to
//! every peer node it talks to (owned by [`PeerLinks`]) and accepts incoming
//! connections on its own SO_REUSEPORT listener ([`serve`]); replies travel
//! over the replying shard's own outgoing link. The byte layout is described
//! in [`frame`].
//!
//! Sending never waits: [`PeerLinks::send`] encodes the envelope straight
//! into the destination's pending buffer and wakes that link's writer task.
//! The writer swaps the whole buffer out and writes it with one `write_all`,
//! so everything queued during one turn of the shard loop leaves in one batch
//! per destination node, and buffers are reused between batches. The pending
//! buffer is bounded ([`TransportConfig::queue_max_msgs`] /
//! [`TransportConfig::queue_max_bytes`]); beyond that, and whenever a
//! connection attempt or write fails, envelopes are dropped and counted in
//! [`SendStats`]; raft retransmits.
//!
//! The writer relies on SIGPIPE being ignored (the Rust runtime does this for
//! every binary), since glommio's sends do not pass `MSG_NOSIGNAL`.

pub mod frame;
mod secure;
mod server;
mod writer;

#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::task::Waker;
use std::time::Duration;

use bytes::BytesMut;
use prost::Message;

use crate::proto::peer::Envelope;
use crate::shutdown::Shutdown;

#[cfg(test)]
pub use server::serve_with;
pub use server::{serve_adopted, serve_handing_off, Handoff, RecvStats};

/// Tunables of the peer transport. `Default` gives production values.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Largest frame body accepted or sent (bytes).
    pub max_frame: usize,
    /// Most envelopes waiting for one peer; newer ones are dropped.
    pub queue_max_msgs: usize,
    /// Most encoded bytes waiting for one peer (a single envelope of up to
    /// `max_frame` is always accepted into an empty queue).
    pub queue_max_bytes: usize,
    /// Give up a connection attempt after this long.
    pub connect_timeout: Duration,
    /// A write that makes no progress for this long fails the connection.
    pub write_timeout: Duration,
    /// First delay before reconnecting after a failure; doubles per failure.
    pub backoff_min: Duration,
    /// Cap of the reconnect delay.
    pub backoff_max: Duration,
    /// An accepted connection must send its Hello (and, with TLS, complete
    /// its handshake) within this time.
    pub hello_timeout: Duration,
    /// Mutual TLS with the cluster CA; `None` runs peers in clear.
    pub tls: Option<crate::tls::PeerTls>,
    /// Incoming connections per shard; at the limit, the one waiting
    /// longest for its Hello is closed to make room, or the new one if
    /// none waits.
    pub max_connections: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_frame: frame::DEFAULT_MAX_FRAME,
            queue_max_msgs: 8192,
            queue_max_bytes: 64 << 20,
            connect_timeout: Duration::from_secs(3),
            write_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            hello_timeout: Duration::from_secs(10),
            tls: None,
            max_connections: 1024,
        }
    }
}

/// A single-threaded event counter.
#[derive(Debug, Default)]
pub struct Counter(Cell<u64>);

impl Counter {
    #[cfg(test)]
    pub fn get(&self) -> u64 {
        self.0.get()
    }

    fn add(&self, n: u64) {
        self.0.set(self.0.get() + n);
    }

    fn inc(&self) {
        self.add(1);
    }
}

/// Outgoing-side counters of one shard's [`PeerLinks`].
#[derive(Debug, Default)]
pub struct SendStats {
    /// Envelopes handed to the kernel.
    pub sent_msgs: Counter,
    /// Bytes handed to the kernel (frame headers included, Hello excluded).
    pub sent_bytes: Counter,
    /// `write_all` calls (one per batch).
    pub batches: Counter,
    /// Dropped because the destination's queue was full.
    pub dropped_full: Counter,
    /// Dropped because no address is known for the destination.
    pub dropped_no_addr: Counter,
    /// Dropped because the envelope exceeds the maximum frame size.
    pub dropped_oversize: Counter,
    /// Dropped because connecting or writing failed.
    pub dropped_failed: Counter,
    /// Connections established (Hello written).
    pub connects: Counter,
    /// Connection attempts that failed.
    pub connect_failures: Counter,
    /// Established connections that failed while writing.
    pub write_failures: Counter,
}

/// State shared by a shard's `PeerLinks` and its writer tasks.
struct Shared {
    node_id: u64,
    /// This shard's index, announced in every Hello.
    shard: Cell<Option<u32>>,
    config: TransportConfig,
    shutdown: Shutdown,
    stats: SendStats,
}

/// The outgoing link to one peer node.
struct Link {
    node: u64,
    /// "host:port"; read at every (re)connect.
    addr: RefCell<String>,
    /// Bumped when `addr` changes, so a connected writer reconnects.
    addr_gen: Cell<u64>,
    /// Encoded frames not yet taken by the writer.
    pending: RefCell<BytesMut>,
    pending_msgs: Cell<usize>,
    /// The writer, when it waits for `pending` to fill.
    waker: Cell<Option<Waker>>,
    writer_running: Cell<bool>,
    /// Set when the link is removed; its writer exits.
    closed: Cell<bool>,
    /// This link's children of the per-peer series.
    sent_msgs: prometheus::IntCounter,
    sent_bytes: prometheus::IntCounter,
}

impl Link {
    fn wake_writer(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// One shard's outgoing links to the other nodes.
pub struct PeerLinks {
    shared: Rc<Shared>,
    links: RefCell<HashMap<u64, Rc<Link>>>,
}

impl PeerLinks {
    /// `node_id` is this node (sent in the Hello of every connection).
    #[cfg(test)]
    pub fn new(node_id: u64, shutdown: Shutdown) -> Rc<PeerLinks> {
        PeerLinks::with_config(node_id, shutdown, TransportConfig::default())
    }

    /// Like [`PeerLinks::new`] with explicit tunables.
    pub fn with_config(node_id: u64, shutdown: Shutdown, config: TransportConfig) -> Rc<PeerLinks> {
        Rc::new(PeerLinks {
            shared: Rc::new(Shared {
                node_id,
                shard: Cell::new(None),
                config,
                shutdown,
                stats: SendStats::default(),
            }),
            links: RefCell::new(HashMap::new()),
        })
    }

    /// Announces this shard's index in the Hello of new connections.
    pub fn set_local_shard(&self, shard: u32) {
        self.shared.shard.set(Some(shard));
    }

    /// Counters of this shard's outgoing traffic.
    #[cfg(test)]
    pub fn stats(&self) -> &SendStats {
        &self.shared.stats
    }

    /// Learns or replaces the raft address ("host:port") of `node`.
    ///
    /// A changed address takes effect at the link's next batch: a connected
    /// link reconnects to the new address, keeping its queued envelopes.
    pub fn set_address(&self, node: u64, addr: &str) {
        let mut links = self.links.borrow_mut();
        match links.get(&node) {
            Some(link) => {
                if *link.addr.borrow() != addr {
                    *link.addr.borrow_mut() = addr.to_owned();
                    link.addr_gen.set(link.addr_gen.get() + 1);
                    tracing::info!(node, addr, "peer address changed");
                }
            }
            None => {
                links.insert(
                    node,
                    Rc::new(Link {
                        node,
                        addr: RefCell::new(addr.to_owned()),
                        addr_gen: Cell::new(0),
                        pending: RefCell::new(BytesMut::new()),
                        pending_msgs: Cell::new(0),
                        waker: Cell::new(None),
                        writer_running: Cell::new(false),
                        closed: Cell::new(false),
                        sent_msgs: crate::metrics::get()
                            .peer_sent_messages
                            .with_label_values(&[&crate::metrics::peer_label(node)]),
                        sent_bytes: crate::metrics::get()
                            .peer_sent_bytes
                            .with_label_values(&[&crate::metrics::peer_label(node)]),
                    }),
                );
            }
        }
    }

    /// The nodes this shard has an address for.
    pub fn nodes(&self) -> Vec<u64> {
        self.links.borrow().keys().copied().collect()
    }

    /// The address currently known for `node`.
    pub fn address(&self, node: u64) -> Option<String> {
        self.links
            .borrow()
            .get(&node)
            .map(|link| link.addr.borrow().clone())
    }

    /// Forgets `node`: its queued envelopes are dropped and its connection
    /// closed. Later sends to it are dropped until `set_address`.
    #[cfg(test)]
    pub fn remove(&self, node: u64) {
        if let Some(link) = self.links.borrow_mut().remove(&node) {
            close_link(&link);
        }
    }

    /// Bytes queued for `to` and not yet taken by its writer (0 when the
    /// node is unknown). Lets a bulk sender (snapshot chunks) pace itself.
    pub fn queued_bytes(&self, to: u64) -> usize {
        self.links
            .borrow()
            .get(&to)
            .map_or(0, |l| l.pending.borrow().len())
    }

    /// Queues `env` for `to`. Never blocks, never fails: when the link's
    /// queue is full or the node has no address, the envelope is dropped
    /// (raft retries). Envelopes queued in one loop turn leave in one batch.
    pub fn send(&self, to: u64, env: Envelope) {
        let shared = &self.shared;
        let stats = &shared.stats;
        let config = &shared.config;
        let links = self.links.borrow();
        let Some(link) = links.get(&to) else {
            stats.dropped_no_addr.inc();
            tracing::debug!(to, "no address for peer; envelope dropped");
            return;
        };
        if shared.shutdown.is_set() {
            return;
        }
        let len = env.encoded_len();
        if len > config.max_frame {
            stats.dropped_oversize.inc();
            tracing::warn!(
                to,
                len,
                max = config.max_frame,
                "envelope exceeds the maximum frame size; dropped"
            );
            return;
        }
        {
            let mut pending = link.pending.borrow_mut();
            let full = link.pending_msgs.get() >= config.queue_max_msgs
                || (!pending.is_empty()
                    && pending.len() + frame::HEADER_LEN + len > config.queue_max_bytes);
            if full {
                stats.dropped_full.inc();
                tracing::debug!(
                    to,
                    queued = link.pending_msgs.get(),
                    queued_bytes = pending.len(),
                    "peer queue full; envelope dropped"
                );
                return;
            }
            if let Err(err) =
                frame::encode_frame_with_len(&env, len, &mut pending, config.max_frame)
            {
                // Unreachable: the size was checked above.
                stats.dropped_oversize.inc();
                tracing::warn!(to, %err, "envelope not encodable; dropped");
                return;
            }
            link.pending_msgs.set(link.pending_msgs.get() + 1);
        }
        link.sent_msgs.inc();
        link.sent_bytes.inc_by((frame::HEADER_LEN + len) as u64);
        if link.writer_running.get() {
            link.wake_writer();
        } else {
            link.writer_running.set(true);
            glommio::spawn_local(writer::run(link.clone(), shared.clone())).detach();
        }
    }
}

impl Drop for PeerLinks {
    fn drop(&mut self) {
        for link in self.links.get_mut().values() {
            close_link(link);
        }
    }
}

/// Drops `link`'s queue and makes its writer exit.
fn close_link(link: &Link) {
    link.closed.set(true);
    link.pending.borrow_mut().clear();
    link.pending_msgs.set(0);
    link.wake_writer();
}
