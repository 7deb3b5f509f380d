//! The key-value store as a raft state machine (`raft::StateMachine`).
//!
//! Why no acknowledged write is lost or applied twice, on this side of the
//! seam: a write is acknowledged only from here, after its entry
//! committed (so a quorum holds it durably); and every copy of a write,
//! however it got into the log (a client retry, a forward, a group's
//! re-proposal), carries the same identity, which `KvStore::apply` admits
//! once through the replicated session table: later copies answer the
//! first one's result and change nothing. The group only orders, persists
//! and hands over entries; moving that logic here changed none of it.

use bytes::Bytes;

use super::command::{self, Command, Op, WriteId};
use super::session::Refusal;
use super::watch::Event;
use super::{Applied, KvStore, Outcome};
use crate::raft::{CallError, DecodeError, StateMachine};

impl StateMachine for KvStore {
    type Command = Command;
    type Id = WriteId;
    type Output = Applied;
    type Event = Event;

    fn id(cmd: &Command) -> WriteId {
        cmd.id
    }

    /// Writes from a log written before sessions carry no identity, and so
    /// no caller to answer.
    fn has_caller(id: &WriteId) -> bool {
        id.session.node != 0
    }

    fn encode(cmds: &[Command]) -> Bytes {
        command::encode_batch(cmds)
    }

    fn decode(data: &Bytes) -> Result<Vec<Command>, DecodeError> {
        command::decode_batch(data)
    }

    fn apply(
        &mut self,
        partition: u32,
        index: u64,
        cmd: Command,
        events: Option<&mut Vec<Event>>,
    ) -> Result<(Applied, u64), CallError> {
        // Watch events only observe the outcome below: they are built
        // after the session table decided (a duplicate or refused copy
        // makes none) and change nothing that is applied or answered.
        // Copied (key and value in one allocation), so that a watch event
        // holds its own bytes and not the whole entry batch they are
        // slices of; and only while the shard records them.
        let event = events.is_some().then(|| match &cmd.op {
            Op::Put { value } | Op::Cas { value, .. } => {
                let mut both = bytes::BytesMut::with_capacity(cmd.key.len() + value.len());
                both.extend_from_slice(&cmd.key);
                both.extend_from_slice(value);
                let both = both.freeze();
                let k = cmd.key.len();
                (both.slice(..k), Some(both.slice(k..)))
            }
            Op::Delete => (Bytes::copy_from_slice(&cmd.key), None),
        });
        match KvStore::apply(self, cmd, index) {
            Outcome::Applied(applied) => {
                let changed = match &applied {
                    Applied::Put { .. } => true,
                    Applied::Delete { previous } => previous.is_some(),
                    Applied::Cas { succeeded, .. } => *succeeded,
                };
                if let (true, Some((key, value)), Some(events)) = (changed, event, events) {
                    events.push(Event {
                        partition,
                        index,
                        key,
                        value,
                    });
                }
                Ok((applied, index))
            }
            Outcome::Duplicate { applied, index } => Ok((applied, index)),
            Outcome::Refused(Refusal::Finished) => Err(CallError::Aborted(
                "this copy of the write came after its proposer had finished with it; this copy was not applied",
            )),
            Outcome::Refused(Refusal::Expired) => Err(CallError::Aborted(
                "the write's session belongs to an earlier run of its node; this copy was not applied",
            )),
        }
    }

    fn get(&self, key: &[u8]) -> Option<Bytes> {
        KvStore::get(self, key).cloned()
    }

    fn snapshot(&self) -> Bytes {
        KvStore::snapshot(self)
    }

    fn restore(data: &Bytes) -> Result<KvStore, DecodeError> {
        KvStore::restore(data)
    }
}
