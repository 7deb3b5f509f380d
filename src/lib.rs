//! multiraft: a thread-per-core multi-raft node server.
//!
//! A node hosts many raft groups ("partitions"), sharded across pinned
//! cores. Each core runs its own groups, its own write-ahead log on
//! io_uring and its own listeners; calls are routed to the core that owns
//! the partition by message passing, never by locks.
//!
//! # Layout
//!
//! Public (the binary, the tests and the benches use them):
//! - [`cli`]: operator commands, the data CLI, the local-cluster launcher
//!   (`cli::launch`, shared with the tests) and `bench`.
//! - [`config`]: node and raft settings, each default documented.
//! - [`proto`]: generated protobuf messages.
//! - [`internals`]: the few internal parts the benches measure on their
//!   own and the tests use to speak TLS to a raft port.
//!
//! Internal, each depending only on those after it among `node`, `shard`,
//! `kv` and `raft` (no cycles: `raft` knows none of the others):
//! - `node`: start-up and its errors, node-wide shared state
//!   (`node::NodeShared`: configuration, metadata, peer liveness), the
//!   Node/Admin/KV services, health, reflection and the per-shard request
//!   router (`node::api`).
//! - `shard`: the per-core loop that owns partitions and drives raft; its
//!   typed requests (`ShardMsg`), every shard's inbox (`shard::Shards`),
//!   what it needs of the node (`shard::Host`), the ready cycle
//!   (`shard::turn`), heartbeats coalesced per peer node (`shard::beats`),
//!   cluster events and snapshot transfer.
//! - `kv`: the replicated key-value state machine (`kv::KvStore`, the
//!   `raft::StateMachine`, with its session table: every write applied at
//!   most once), forwarding and watches.
//! - `raft`: one raft group per partition, generic over the state machine
//!   it replicates (`raft::StateMachine`), its quiescence
//!   (`raft::group::quiet`), its commit notices (`raft::group::notice`)
//!   and its `raft::Storage`. It knows nothing of
//!   KV, gRPC or the admin API.
//! - `meta`: the node's metadata on disk (identity, layout, hosted
//!   partitions, address book).
//! - `wal`: the per-shard write-ahead log (segments, recovery, purge,
//!   snapshot files).
//! - `transport`: peer links between nodes (raft messages, pings, forwarded
//!   calls).
//! - `tls`: mutual TLS between nodes, optional TLS on the API port.
//! - `grpc`: gRPC over HTTP/2 by hand on `h2`: framing, server, client,
//!   streaming, limits.
//! - `metrics`: Prometheus series and the `/metrics` endpoint.
//! - `net`: socket helpers shared by the gRPC frontend and the transport.
//! - `shutdown`: the stop signal every task of a shard can wait on.

pub mod cli;
pub mod config;
mod grpc;
mod kv;
mod meta;
mod metrics;
mod net;
mod node;
pub mod proto;
mod raft;
mod shard;
mod shutdown;
mod tls;
mod transport;
mod wal;

// What the binary, the benches and the tests use; everything else is
// internal.
pub use grpc::Status;
pub use metrics::serve as serve_metrics;
pub use node::{memlock_hint, Node};

/// Parts that `benches/` measure on their own and that the tests use to
/// speak TLS to a node's raft port.
pub mod internals {
    pub use crate::grpc::codec::{encode, UnaryDecoder};
    pub use crate::kv::command::{Command, Op, SessionId, WriteId};
    pub use crate::kv::KvStore;
    pub use crate::raft::{Group, GroupInit, Outbox};
    pub use crate::tls::{api_client, node_name};
}
