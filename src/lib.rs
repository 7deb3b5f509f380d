//! multiraft: a thread-per-core multi-raft node server.
pub mod grpc;
pub mod net;
pub mod proto;
pub mod shutdown;
pub mod transport;
pub mod wal;
