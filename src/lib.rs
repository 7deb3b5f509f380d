//! multiraft: a thread-per-core multi-raft node server.
//!
//! A node hosts many raft groups ("partitions"), sharded across pinned
//! cores. Each core runs its own groups, its own write-ahead log on
//! io_uring and its own listeners; calls are routed to the core that owns
//! the partition by message passing, never by locks.
//!
//! # Layout
//!
//! - [`config`]: node and raft settings, each default documented.
//! - [`grpc`]: gRPC over HTTP/2 by hand on `h2`: framing, server, client.
//! - [`node`]: start-up, node metadata, the Node/Admin services and the
//!   per-shard request router ([`node::api`]).
//! - [`shard`]: the per-core loop that owns partitions and drives raft.
//! - [`raft`]: one raft group per partition and its `raft::Storage`.
//! - [`wal`]: the per-shard write-ahead log (segments, recovery, purge).
//! - [`transport`]: peer links between nodes (raft messages, forwarded calls).
//! - [`tls`]: mutual TLS between nodes, optional TLS on the API port.
//! - [`kv`]: the replicated key-value state machine (with its session
//!   table: every write applied at most once), its service, forwarding.
//! - [`proto`]: generated protobuf messages.
//! - [`metrics`]: Prometheus series and the `/metrics` endpoint.
//! - [`cli`]: operator commands, the local-cluster launcher and `bench`.

pub mod cli;
pub mod config;
pub mod grpc;
pub mod kv;
pub mod metrics;
pub mod net;
pub mod node;
pub mod proto;
pub mod raft;
pub mod shard;
pub mod shutdown;
pub mod tls;
pub mod transport;
pub mod wal;
