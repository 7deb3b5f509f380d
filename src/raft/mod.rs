//! Raft groups: one `raft::RawNode` per hosted partition, its storage over
//! the shard's WAL, and the glue from raft-rs logs into `tracing`.

pub mod group;
pub mod logger;
pub mod storage;

pub use group::{
    CallError, Group, GroupError, GroupInit, GroupStatus, Outbox, ReadResult, Reply, WriteResult,
};
