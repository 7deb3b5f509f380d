//! The seam between a raft group and what it replicates.
//!
//! A [`Group`](super::Group) orders, persists and commits opaque batches of
//! commands; what a command means is the state machine's business: it
//! encodes and decodes batches, applies each command exactly as every
//! other replica does, answers reads, and snapshots and restores its whole
//! state. The key-value store (`kv::KvStore`) is the one implementation.

use bytes::Bytes;

use super::CallError;

/// State-machine bytes (a snapshot, a batch of commands) that do not
/// decode: what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

impl From<&str> for DecodeError {
    fn from(s: &str) -> DecodeError {
        DecodeError(s.to_string())
    }
}

impl From<String> for DecodeError {
    fn from(s: String) -> DecodeError {
        DecodeError(s)
    }
}

/// What a raft group replicates. Every method must be deterministic: the
/// replicas apply the same commands in the same order and must end in the
/// same state with the same answers.
pub trait StateMachine: Default + Sized + 'static {
    /// One write, proposed and applied as a unit.
    type Command: Clone;
    /// A write's identity. A write retried (by its client, by forwarding,
    /// or proposed again by the group) keeps it, and the state machine
    /// applies each identity at most once.
    type Id: Copy + Eq + std::hash::Hash;
    /// What applying a write answers its proposer.
    type Output;
    /// A change to tell watchers about.
    type Event;

    fn id(cmd: &Self::Command) -> Self::Id;
    /// Whether a caller may wait for the write's answer (writes without
    /// one are applied and forgotten).
    fn has_caller(id: &Self::Id) -> bool;
    /// One raft entry's payload for `cmds`.
    fn encode(cmds: &[Self::Command]) -> Bytes;
    fn decode(data: &Bytes) -> Result<Vec<Self::Command>, DecodeError>;
    /// Applies `cmd`, taken from the entry at `index` of `partition`, and
    /// returns its answer and the index it was first applied at (a copy
    /// of a write already applied answers as the first one did). With
    /// `events`, a change is also described there.
    fn apply(
        &mut self,
        partition: u32,
        index: u64,
        cmd: Self::Command,
        events: Option<&mut Vec<Self::Event>>,
    ) -> Result<(Self::Output, u64), CallError>;
    /// The value of `key` as applied so far.
    fn get(&self, key: &[u8]) -> Option<Bytes>;
    /// The whole state, for a raft snapshot.
    fn snapshot(&self) -> Bytes;
    /// A state from [`StateMachine::snapshot`]'s bytes.
    fn restore(data: &Bytes) -> Result<Self, DecodeError>;
}
