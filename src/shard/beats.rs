//! Coalesced heartbeats: the small raft messages of many groups, one
//! envelope per peer node per turn.
//!
//! Three kinds of raft message carry nothing but a partition, a term and a
//! commit index, and a busy or many-partition node sends a great many of
//! them. A shard gathers them over a turn, per peer node, as [`Beat`]s, and
//! sends each peer one `Heartbeats` envelope ([`Beats::flush`]); the
//! receiving node hands each of its shards its part, which steps every beat
//! into its group as the raft message it stands for ([`to_message`]):
//! - a leader's plain heartbeat (`MsgHeartbeat` without context), and
//! - a follower's answer to one (`MsgHeartbeatResponse` without context),
//!   both exactly as raft-rs made them;
//! - a *commit notice*: when a leader's commit index moves, it tells each
//!   follower that waits for a write or read it forwarded `min(its
//!   acknowledged index, commit)` in a heartbeat whose context is
//!   [`COMMIT_CTX`] (`raft::Group::commit_notices`). With appends and
//!   heartbeats, it replaces raft-rs's broadcast of an empty append to
//!   every follower on every commit (`skip_bcast_commit`), which with many
//!   partitions each carrying a little load doubled the messages per
//!   write. Raft answers it like any heartbeat; the answer, with the same
//!   context, is dropped here: the notice wants none;
//! - a follower's acknowledgement of an append (`MsgAppendResponse` that
//!   rejects nothing), taken only when the beat rebuilds it exactly:
//!   term, index and commit are all it carries. With many partitions each
//!   taking a write now and then, every write is an append of its own and
//!   two acknowledgements (one per follower); as beats, the latter cost a
//!   place in the turn's envelope instead of an envelope, an encoding and
//!   a hop between tasks on each end. A follower sends it after its WAL
//!   sync, like the message it stands for (`turn::finish`).
//!
//! Heartbeats with any other context (ReadIndex rounds, quiesce requests)
//! and every other message travel one by one as before.
//!
//! Why this changes nothing raft relies on: a beat is stepped as the very
//! message it replaces, through the same membership checks
//! (`Group::step_from`), so terms, votes and the read protocol are raft's.
//! A commit notice is a raft heartbeat: sent by a leader in its term, with
//! the commit index raft-rs itself puts in heartbeats (never past what that
//! follower acknowledged having, so every entry it commits there is the
//! leader's). A lost or late beat is a lost or late heartbeat; raft
//! tolerates both, and the next append or heartbeat carries the commit
//! index again.

use std::collections::BTreeMap;

use raft::eraftpb::{Message, MessageType};

use crate::proto::peer::{beat::Kind, envelope, Beat, Envelope, Heartbeats};
use crate::transport::PeerLinks;

/// The context of a commit notice (one byte: never a ReadIndex context,
/// 8 bytes, or a quiesce context, 9).
pub const COMMIT_CTX: &[u8] = b"C";

/// The beats of one turn, by peer node.
#[derive(Default)]
pub struct Beats {
    to: BTreeMap<u64, Vec<Beat>>,
}

impl Beats {
    /// Takes `m` (of `partition`) if it travels as a beat; false if it
    /// must be sent on its own. The answer to a commit notice is taken
    /// and dropped.
    pub fn take(&mut self, partition: u32, m: &Message) -> bool {
        let kind = match (m.get_msg_type(), m.context.as_ref()) {
            (MessageType::MsgHeartbeat, []) => Kind::Heartbeat,
            (MessageType::MsgHeartbeatResponse, []) => Kind::Response,
            (MessageType::MsgHeartbeat, COMMIT_CTX) => Kind::Commit,
            (MessageType::MsgHeartbeatResponse, COMMIT_CTX) => return true,
            (MessageType::MsgAppendResponse, []) => Kind::AppendAck,
            _ => return false,
        };
        let beat = Beat {
            partition_id: partition,
            kind: kind as i32,
            term: m.term,
            commit: m.commit,
            index: if kind == Kind::AppendAck { m.index } else { 0 },
        };
        // An acknowledgement with anything more to say (a rejection and its
        // hints, a snapshot request) travels as itself.
        if kind == Kind::AppendAck && to_message(m.from, m.to, &beat).as_ref() != Some(m) {
            return false;
        }
        self.to.entry(m.to).or_default().push(beat);
        true
    }

    /// Queues a commit notice for `to`.
    pub fn commit(&mut self, to: u64, partition: u32, term: u64, commit: u64) {
        self.to.entry(to).or_default().push(Beat {
            partition_id: partition,
            kind: Kind::Commit as i32,
            term,
            commit,
            index: 0,
        });
    }

    /// Sends each peer its beats, in one envelope.
    pub fn flush(&mut self, links: &PeerLinks) {
        for (to, beats) in std::mem::take(&mut self.to) {
            let body = Some(envelope::Body::Heartbeats(Heartbeats { beats }));
            links.send(to, Envelope { body });
        }
    }
}

/// The raft message `beat` stands for, from node `from` to node `to`;
/// `None` for a kind this build does not know.
pub fn to_message(from: u64, to: u64, beat: &Beat) -> Option<Message> {
    let mut m = Message::default();
    match Kind::try_from(beat.kind).ok()? {
        Kind::Heartbeat => m.set_msg_type(MessageType::MsgHeartbeat),
        Kind::Response => m.set_msg_type(MessageType::MsgHeartbeatResponse),
        Kind::Commit => {
            m.set_msg_type(MessageType::MsgHeartbeat);
            m.context = COMMIT_CTX.to_vec().into();
        }
        Kind::AppendAck => {
            m.set_msg_type(MessageType::MsgAppendResponse);
            m.index = beat.index;
        }
    }
    m.from = from;
    m.to = to;
    m.term = beat.term;
    m.commit = beat.commit;
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(t: MessageType, ctx: &[u8]) -> Message {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.from = 1;
        m.to = 2;
        m.term = 7;
        m.commit = 40;
        m.context = ctx.to_vec().into();
        m
    }

    #[test]
    fn heartbeats_answers_and_notices_round_trip() {
        for (t, ctx) in [
            (MessageType::MsgHeartbeat, &b""[..]),
            (MessageType::MsgHeartbeatResponse, b""),
            (MessageType::MsgHeartbeat, COMMIT_CTX),
        ] {
            let mut beats = Beats::default();
            let m = msg(t, ctx);
            assert!(beats.take(5, &m));
            let b = &beats.to[&2][0];
            assert_eq!(b.partition_id, 5);
            assert_eq!(to_message(1, 2, b), Some(m));
        }
    }

    #[test]
    fn messages_with_other_contexts_travel_alone() {
        let mut beats = Beats::default();
        let read_index = 9u64.to_le_bytes();
        let mut quiesce = vec![b'Q'];
        quiesce.extend(3u64.to_le_bytes());
        for m in [
            msg(MessageType::MsgHeartbeat, &read_index),
            msg(MessageType::MsgHeartbeatResponse, &read_index),
            msg(MessageType::MsgHeartbeat, &quiesce),
            msg(MessageType::MsgHeartbeatResponse, &quiesce),
            msg(MessageType::MsgAppend, b""),
            msg(MessageType::MsgAppendResponse, b"x"),
        ] {
            assert!(!beats.take(5, &m), "{m:?}");
        }
        assert!(beats.to.is_empty());
    }

    #[test]
    fn append_acks_round_trip() {
        let mut beats = Beats::default();
        let mut m = msg(MessageType::MsgAppendResponse, b"");
        m.index = 57;
        assert!(beats.take(5, &m));
        let b = &beats.to[&2][0];
        assert_eq!((b.partition_id, b.index), (5, 57));
        assert_eq!(to_message(1, 2, b), Some(m));
    }

    /// An append response that says more than "I have it up to here"
    /// (a rejection with its hints, a snapshot request, anything raft-rs
    /// may add) is not what a beat rebuilds, and travels as itself.
    #[test]
    fn append_responses_with_more_to_say_travel_alone() {
        let ack = || {
            let mut m = msg(MessageType::MsgAppendResponse, b"");
            m.index = 57;
            m
        };
        let mut reject = ack();
        reject.reject = true;
        let mut hinted = ack();
        hinted.reject_hint = 50;
        hinted.log_term = 6;
        let mut wants_snapshot = ack();
        wants_snapshot.request_snapshot = 57;
        let mut commit_term = ack();
        commit_term.commit_term = 7;
        let mut with_entry = ack();
        with_entry.entries.push(Default::default());
        let mut beats = Beats::default();
        for m in [reject, hinted, wants_snapshot, commit_term, with_entry] {
            assert!(!beats.take(5, &m), "{m:?}");
        }
        assert!(beats.to.is_empty());
    }

    /// The acknowledgement raft-rs itself makes for an append is one a
    /// beat rebuilds. Should an upgrade of raft-rs add a field to it, the
    /// acknowledgements would quietly travel one by one again; this test
    /// says so instead.
    #[test]
    fn raft_rs_own_append_acks_travel_as_beats() {
        use raft::eraftpb::Entry;
        use raft::storage::MemStorage;
        let storage = MemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
        let cfg = raft::Config {
            id: 2,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut follower = raft::RawNode::new(&cfg, storage, &logger).expect("raw node");
        let entry = Entry {
            index: 1,
            term: 1,
            data: b"x".to_vec().into(),
            ..Default::default()
        };
        let mut append = Message {
            from: 1,
            to: 2,
            term: 1,
            entries: vec![entry].into(),
            ..Default::default()
        };
        append.set_msg_type(MessageType::MsgAppend);
        follower.step(append).expect("step");
        let mut rd = follower.ready();
        let store = follower.store().clone();
        store.wl().append(rd.entries()).expect("append");
        if let Some(hs) = rd.hs() {
            store.wl().set_hardstate(hs.clone());
        }
        let mut msgs = rd.take_messages();
        msgs.extend(rd.take_persisted_messages());
        let ack = msgs
            .into_iter()
            .find(|m| m.get_msg_type() == MessageType::MsgAppendResponse)
            .expect("the follower acknowledges the append");
        assert_eq!((ack.index, ack.reject), (1, false));
        let mut beats = Beats::default();
        assert!(beats.take(7, &ack), "{ack:?}");
        assert_eq!(to_message(2, 1, &beats.to[&1][0]), Some(ack));
    }

    #[test]
    fn the_answer_to_a_commit_notice_is_dropped() {
        let mut beats = Beats::default();
        assert!(beats.take(5, &msg(MessageType::MsgHeartbeatResponse, COMMIT_CTX)));
        assert!(beats.to.is_empty());
    }

    #[test]
    fn an_unknown_kind_is_no_message() {
        let b = Beat {
            partition_id: 1,
            kind: 99,
            term: 1,
            commit: 1,
            index: 0,
        };
        assert_eq!(to_message(1, 2, &b), None);
    }
}
