//! Quiescence: an idle group stops ticking, so it sends no heartbeats and
//! starts no elections, and costs its shard nothing until something
//! happens to it.
//!
//! How a group goes quiet (the leader decides):
//! 1. The leader has been idle for an election timeout: nothing queued
//!    or waiting (writes, reads, membership changes), no leadership
//!    transfer, everything committed and applied, and every follower it
//!    can hear from caught up to its last index.
//! 2. It sends each such follower a *quiesce heartbeat*: an ordinary raft
//!    heartbeat (term, commit) whose context is `Q` and the number of this
//!    attempt ([`quiesce_ctx`]).
//! 3. A follower agrees if that leader is its leader in that term, its log
//!    ends exactly at the commit index carried, and it has nothing of its
//!    own in flight; it stops ticking and lets raft answer the heartbeat
//!    with the same context. Otherwise it strips the context before
//!    stepping, so its answer does not count as agreement.
//! 4. Once every follower it can hear from has agreed in this attempt, the
//!    leader stops ticking too. A wake, or the leader ceasing to be idle,
//!    ends an attempt: agreements given before then do not count.
//!
//! Any proposal, read, membership change or leadership transfer wakes a
//! group, and so does any raft message except heartbeats that bring no
//! news (a heartbeat from the known leader, same term, no new commit) and
//! heartbeat answers. A quiescent follower also wakes when the shard
//! stops hearing the node-level pings of its leader's node for an election
//! timeout (`Shard::wake_suspected`): it ticks again and, raft's election
//! timeout later, campaigns. So a partition still fails over when its
//! leader's node dies.
//!
//! Why this is safe: quiescence only stops ticks. Every message is still
//! stepped by raft, terms and votes are untouched, and linearizable reads
//! use ReadIndex (raft-rs `ReadOnlyOption::Safe`), which asks a quorum in
//! the current term: a quiescent leader that has been replaced (it missed
//! the election while not ticking) wakes on the read, cannot get that
//! quorum, and steps down when it hears the new term. It never answers a
//! read or acknowledges a write on its own authority.

use raft::eraftpb::{Message, MessageType};
use raft::StateRole;

use super::Group;

/// First byte of a quiesce heartbeat's context, followed by the leader's
/// attempt number (8 bytes, little endian): 9 bytes in all, so it never
/// matches a ReadIndex context (8 bytes).
pub const QUIESCE_CTX: u8 = b'Q';

/// The context of a quiesce heartbeat of attempt `attempt`.
pub fn quiesce_ctx(attempt: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(9);
    c.push(QUIESCE_CTX);
    c.extend_from_slice(&attempt.to_le_bytes());
    c
}

fn is_quiesce_ctx(ctx: &[u8]) -> bool {
    ctx.len() == 9 && ctx[0] == QUIESCE_CTX
}

/// A group's quiescence state.
#[derive(Default)]
pub(super) struct Quiet {
    pub quiescent: bool,
    /// Consecutive ticks this leader was idle.
    idle_ticks: u64,
    /// Followers that agreed to go quiet in the current attempt. An
    /// attempt ends when the group wakes or stops being idle; answers to an
    /// earlier one (late, or from before a wake) do not count.
    agreed: Vec<u64>,
    attempt: u64,
    /// Quiesce heartbeats to send this turn.
    outgoing: Vec<Message>,
    /// Followers sent an append since the last batch of heartbeats.
    appended: Vec<u64>,
}

impl<S: super::StateMachine> Group<S> {
    /// Whether the group has stopped ticking (see the module notes).
    pub fn is_quiescent(&self) -> bool {
        self.quiet.quiescent
    }

    /// Starts ticking again.
    pub fn wake(&mut self) {
        if self.quiet.quiescent {
            tracing::trace!(partition = self.id, "woken");
        }
        self.quiet.quiescent = false;
        self.quiet.idle_ticks = 0;
        self.quiet.agreed.clear();
        self.quiet.attempt += 1;
    }

    /// Quiesce heartbeats to send (taken by the shard's turn, after the
    /// group's Ready messages).
    pub fn take_quiet_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.quiet.outgoing)
    }

    /// Drops the plain heartbeats of `msgs` to followers that were sent an
    /// append since the last heartbeats (in this batch or before): the
    /// append already reset their election timer, carried the commit index
    /// of its time, and its answer tells the leader they are alive. A busy
    /// group then sends about one message per follower per write instead of
    /// that plus a heartbeat and its answer every tick. Heartbeats with a
    /// context (ReadIndex rounds, quiesce) always go. Once appends stop, the
    /// next tick's heartbeat goes (no append was sent since): it carries
    /// the commits the last appends could not (`notice.rs`), and if an
    /// append was lost its answer resumes a paused follower as before.
    pub fn prune_heartbeats(&mut self, msgs: &mut Vec<Message>) {
        let mut heartbeats = false;
        for m in msgs.iter() {
            match m.get_msg_type() {
                MessageType::MsgAppend if !self.quiet.appended.contains(&m.to) => {
                    self.quiet.appended.push(m.to)
                }
                MessageType::MsgHeartbeat => heartbeats = true,
                _ => {}
            }
        }
        if !heartbeats {
            return;
        }
        let appended = std::mem::take(&mut self.quiet.appended);
        if !appended.is_empty() {
            msgs.retain(|m| {
                m.get_msg_type() != MessageType::MsgHeartbeat
                    || !m.context.is_empty()
                    || !appended.contains(&m.to)
            });
        }
    }

    /// True when this tick's heartbeats would all be dropped by
    /// [`Group::prune_heartbeats`]: this replica leads, every other member
    /// was sent an append since the last heartbeats, and raft-rs would send
    /// nothing else with them (no ReadIndex context to repeat, no
    /// leadership transfer, not the tick that checks the quorum). A group
    /// taking a write or so per tick then builds no heartbeats, no Ready
    /// and no turn visit only to throw them away.
    pub(super) fn heartbeat_unneeded(&self) -> bool {
        let r = &self.raw.raft;
        r.state == StateRole::Leader
            && r.heartbeat_timeout() == 1
            && r.election_elapsed + 1 < r.election_timeout()
            && r.lead_transferee.is_none()
            && r.pending_read_count() == 0
            && r.prs()
                .iter()
                .all(|(id, _)| *id == r.id || self.quiet.appended.contains(id))
    }

    /// A leader's tick when [`Group::heartbeat_unneeded`]: what raft-rs's
    /// `tick_heartbeat` does on such a tick, less the heartbeats. Its
    /// heartbeat counter stays at 0, where a heartbeat would have left it
    /// (heartbeat timeout 1); the election counter, which times the quorum
    /// check, advances as raft-rs would advance it (the tick on which it
    /// reaches the timeout goes through raft-rs). The appends since the
    /// last heartbeats now count as this tick's heartbeats, as pruning
    /// would have counted them: the next tick beats unless more appends go
    /// out before it. So followers hear from the leader as often as before,
    /// and nothing raft decides (terms, votes, commits) changes.
    pub(super) fn tick_without_heartbeat(&mut self) {
        self.raw.raft.election_elapsed += 1;
        self.quiet.appended.clear();
    }

    /// Work queued for the next turn (writes or reads to propose, quiesce
    /// heartbeats to send).
    pub fn wants_turn(&self) -> bool {
        !self.queued.is_empty()
            || !self.reproposals.is_empty()
            || !self.read_queue.is_empty()
            || !self.quiet.outgoing.is_empty()
    }

    /// Nothing of this replica's own in flight.
    fn nothing_waiting(&self) -> bool {
        self.queued.is_empty()
            && self.reproposals.is_empty()
            && self.waiting.is_empty()
            && self.read_queue.is_empty()
            && self.read_batches.is_empty()
            && self.ready_reads.is_empty()
            && self.conf_waiters.is_empty()
    }

    /// Called by every tick: a leader idle for long enough asks the
    /// followers it can hear from (`alive`) to go quiet, and goes quiet
    /// itself once they all agreed.
    pub(super) fn quiet_tick(&mut self, alive: &dyn Fn(u64) -> bool) {
        let r = &self.raw.raft;
        let last = r.raft_log.last_index();
        let me = r.id;
        let idle = r.state == StateRole::Leader
            && r.lead_transferee.is_none()
            && self.nothing_waiting()
            && r.raft_log.committed == last
            && self.applied == last
            && r.prs()
                .iter()
                .all(|(id, p)| *id == me || p.matched == last || !alive(*id));
        if !idle {
            if self.quiet.idle_ticks > 0 || !self.quiet.agreed.is_empty() {
                self.quiet.attempt += 1;
            }
            self.quiet.idle_ticks = 0;
            self.quiet.agreed.clear();
            return;
        }
        self.quiet.idle_ticks += 1;
        if self.quiet.idle_ticks < self.election_ticks {
            return;
        }
        let mut missing = Vec::new();
        for (id, _) in r.prs().iter() {
            if *id != me && alive(*id) && !self.quiet.agreed.contains(id) {
                missing.push(*id);
            }
        }
        // At least a quorum (this leader and the followers that agreed),
        // so that a leader that hears from nobody (a node just started,
        // whose peers' pings have not arrived yet) keeps ticking.
        let voters = r.prs().conf().voters().ids().len();
        let agreed = 1 + self.quiet.agreed.len();
        if missing.is_empty() && 2 * agreed > voters {
            tracing::trace!(partition = self.id, term = r.term, "quiescent");
            self.quiet.quiescent = true;
            return;
        }
        for to in missing {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgHeartbeat);
            m.to = to;
            m.from = me;
            m.term = r.term;
            m.commit = last;
            m.context = quiesce_ctx(self.quiet.attempt).into();
            self.quiet.outgoing.push(m);
        }
    }

    /// Before `msg` is stepped: wakes the group unless the message brings
    /// no news, and handles the quiesce handshake (which may strip the
    /// context off a quiesce heartbeat this replica does not agree to).
    pub(super) fn quiet_on_message(&mut self, msg: &mut Message) {
        let r = &self.raw.raft;
        match msg.get_msg_type() {
            MessageType::MsgHeartbeat => {
                let from_leader =
                    msg.term == r.term && msg.from == r.leader_id && r.state == StateRole::Follower;
                if is_quiesce_ctx(&msg.context) {
                    if from_leader
                        && r.raft_log.last_index() == msg.commit
                        && msg.commit >= r.raft_log.committed
                        && self.nothing_waiting()
                    {
                        self.quiet.quiescent = true;
                    } else {
                        // Answered without the context: not an agreement.
                        msg.context = Default::default();
                        self.wake();
                    }
                } else if !from_leader || msg.commit > r.raft_log.committed {
                    self.wake();
                }
            }
            MessageType::MsgHeartbeatResponse => {
                if msg.context.as_ref() == quiesce_ctx(self.quiet.attempt).as_slice()
                    && msg.term == r.term
                    && r.state == StateRole::Leader
                    && !self.quiet.agreed.contains(&msg.from)
                {
                    self.quiet.agreed.push(msg.from);
                }
            }
            _ => self.wake(),
        }
    }
}
