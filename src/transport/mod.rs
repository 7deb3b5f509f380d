//! Peer transport: raft messages and forwarded calls between nodes.
//!
//! CONTRACT (other modules rely on exactly these items):
//! - `PeerLinks`: one per shard, outgoing links to every other node.
//! - `serve`: accepts peer connections on the shard's SO_REUSEPORT raft
//!   listener and hands every received `Envelope` to a sink.

use std::rc::Rc;

use crate::proto::peer::Envelope;
use crate::shutdown::Shutdown;

/// One shard's outgoing links to the other nodes.
pub struct PeerLinks {}

impl PeerLinks {
    /// `node_id` is this node (sent in the Hello of every connection).
    pub fn new(_node_id: u64, _shutdown: Shutdown) -> Rc<PeerLinks> {
        todo!()
    }

    /// Learns or replaces the raft address ("host:port") of `node`.
    pub fn set_address(&self, _node: u64, _addr: &str) {
        todo!()
    }

    /// Queues `env` for `to`. Never blocks, never fails: when the link's
    /// queue is full or the node has no address, the envelope is dropped
    /// (raft retries). Envelopes queued in one loop turn leave in one batch.
    pub fn send(&self, _to: u64, _env: Envelope) {
        todo!()
    }
}

/// Serves incoming peer connections until `shutdown`; each envelope is
/// passed to `sink(from_node, envelope)`.
pub async fn serve(
    _listener: glommio::net::TcpListener,
    _sink: Rc<dyn Fn(u64, Envelope)>,
    _shutdown: Shutdown,
) {
    todo!()
}
