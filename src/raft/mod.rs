//! Raft groups: one `raft::RawNode` per hosted partition, its storage over
//! the shard's WAL, the seam to the state machine it replicates
//! ([`StateMachine`]), and the glue from raft-rs logs into `tracing`.

pub mod group;
pub mod logger;
mod machine;
pub mod storage;

pub use machine::{DecodeError, StateMachine};
pub use storage::LogMemory;

pub use group::{
    CallError, Group, GroupError, GroupInit, GroupStatus, Outbox, ReadResult, Reply, WriteResult,
};
