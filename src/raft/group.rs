//! One raft group (partition) on its shard: the `RawNode`, the state
//! machine, and everyone waiting on either.
//!
//! A group never blocks and never does I/O itself: the shard loop
//! ([`crate::shard`]) feeds it proposals and messages, takes its `Ready`,
//! makes it durable and hands back what raft says may be applied. Peer
//! addresses learned from applied conf changes go into an [`Outbox`].

use std::collections::HashMap;

use bytes::Bytes;
use futures::channel::oneshot;
use raft::eraftpb::{ConfChange, ConfState, Entry, HardState, Snapshot};
use raft::{RawNode, StateRole};

use super::machine::{DecodeError, StateMachine};
use crate::config::RaftConfig;

use super::storage::GroupStorage;

mod apply;
mod cache;
mod first;
mod inbound;
mod notice;
mod quiet;
mod reads;

#[cfg(test)]
use quiet::quiesce_ctx;

/// Index (and term) of the snapshot every bootstrapped group starts from.
///
/// Starting above zero means the log's first entry is never index 1, so a
/// replica added later by Join cannot be caught up from the log alone: it
/// always receives a snapshot first, and with it the group's conf state.
/// (A log replayed from index 1 would lack the initial voters, which are
/// set by bootstrap, not by log entries.)
pub const INIT_INDEX: u64 = 5;

/// Why a replica could not be built or take a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The state machine's snapshot does not decode.
    #[error("partition {partition}: snapshot: {source}")]
    Snapshot { partition: u32, source: DecodeError },
    /// raft-rs refused the initial state.
    #[error("partition {partition}: {source}")]
    Raft { partition: u32, source: raft::Error },
}

/// Why a call to a group got no result. Each kind is one gRPC status
/// code at the service edge (`impl From<CallError> for Status` in
/// `shard`); the message says what happened to the call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Not now: no quorum reachable, the replica is leaving, the node
    /// stops, a retry took over the call (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// Too many calls of the partition in flight (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    Busy(String),
    /// This copy of a write was not applied (ABORTED).
    #[error("{0}")]
    Aborted(&'static str),
    /// Raft rejected a membership change (FAILED_PRECONDITION).
    #[error("{0}")]
    Rejected(String),
    /// The partition is not hosted on this node (NOT_FOUND).
    #[error("partition {0} is not hosted here")]
    NotHosted(u32),
}

/// One replica's state, for Status (the admin proto is built by the shard).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupStatus {
    pub partition: u32,
    pub role: StateRole,
    /// `raft::INVALID_ID` (0) when no leader is known.
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<u64>,
    pub snapshot_index: u64,
    pub quiescent: bool,
}

/// A caller waiting for a result.
pub type Reply<T> = oneshot::Sender<Result<T, CallError>>;

/// The answer to a write: the state machine's, and the index it was
/// applied at.
#[derive(Debug)]
pub struct WriteResult<O> {
    pub applied: O,
    pub index: u64,
}

/// The answer to a read.
#[derive(Debug)]
pub struct ReadResult {
    pub value: Option<Bytes>,
    pub index: u64,
}

/// Where a write of state machine `S` is answered.
type WriteReply<S> = Reply<WriteResult<<S as StateMachine>::Output>>;

/// A proposed write waiting to be applied. The command is kept so it can be
/// proposed again under the same identity if raft may have dropped it.
struct Pending<S: StateMachine> {
    cmd: S::Command,
    reply: WriteReply<S>,
    /// Tick and term of the last proposal.
    proposed_tick: u64,
    proposed_term: u64,
}

struct ReadWaiter {
    key: Bytes,
    reply: Reply<ReadResult>,
}

/// A batch of linearizable reads waiting for its ReadIndex.
struct ReadBatch {
    reads: Vec<ReadWaiter>,
    /// Tick at which the ReadIndex request was last sent (raft drops it
    /// silently when there is no leader, so it is re-sent).
    sent_tick: u64,
}

/// What a group hands to its shard during a turn (`E`: the state
/// machine's events).
pub struct Outbox<E> {
    /// (node, raft address) pairs learned from applied conf changes.
    pub learned: Vec<(u64, String)>,
    /// Whether to fill `events` (the shard's watch history is recording).
    pub watching: bool,
    /// Changes applied this turn, in order, for watches (`kv::watch`).
    pub events: Vec<E>,
    /// Membership changes applied this turn: (partition, index, voters).
    pub conf_changes: Vec<(u32, u64, Vec<u64>)>,
    /// Snapshots sent this turn: (partition, to, index).
    pub snapshots_sent: Vec<(u32, u64, u64)>,
    /// Snapshots installed this turn: (partition, index).
    pub snapshots_installed: Vec<(u32, u64)>,
}

impl<E> Default for Outbox<E> {
    fn default() -> Self {
        Outbox {
            learned: Vec::new(),
            watching: false,
            events: Vec::new(),
            conf_changes: Vec::new(),
            snapshots_sent: Vec::new(),
            snapshots_installed: Vec::new(),
        }
    }
}

/// State machine data (in bytes) small enough that a group whose entries
/// since its last snapshot carried no command snapshots again right away:
/// an idle partition's state. Its log then pins no WAL segment.
pub const TINY_SNAPSHOT: usize = 128;

pub struct Group<S: StateMachine> {
    pub id: u32,
    raw: RawNode<GroupStorage>,
    storage: GroupStorage,
    sm: S,
    applied: u64,
    applied_term: u64,
    /// Conf state as of `applied`, stored in snapshots taken at `applied`.
    applied_conf: ConfState,
    snapshot_index: u64,
    /// The last snapshot's state machine data was at most
    /// [`TINY_SNAPSHOT`] bytes, and no command was applied since: a
    /// snapshot now would be as small (see `apply::idle_snapshot_due`).
    tiny_and_unchanged: bool,
    /// Proposals of this turn, proposed together as one entry.
    queued: Vec<(S::Command, WriteReply<S>)>,
    /// Commands proposed again this turn (their callers stay in `waiting`).
    reproposals: Vec<S::Command>,
    /// Proposed commands waiting to be applied, by write identity.
    waiting: HashMap<S::Id, Pending<S>>,
    /// Linearizable reads of this turn, sent as one ReadIndex request.
    read_queue: Vec<ReadWaiter>,
    read_batches: HashMap<u64, ReadBatch>,
    /// Reads whose ReadIndex is known, waiting for apply to reach it.
    ready_reads: Vec<(u64, Vec<ReadWaiter>)>,
    /// Conf changes proposed here, waiting to be applied, by id.
    conf_waiters: HashMap<u64, Reply<ConfState>>,
    next_ctx: u64,
    ticks: u64,
    /// Consecutive ticks without a known leader.
    leaderless_ticks: u64,
    /// Raft messages refused by `step_from`, and when one was last logged.
    dropped_msgs: u64,
    drop_logged: Option<std::time::Instant>,
    election_ticks: u64,
    tick_period: std::time::Duration,
    /// KV commands applied since start (for status counters).
    pub commands_applied: u64,
    /// Writes queued for proposal here since start (for metrics).
    pub proposals: u64,
    /// Times this replica saw a new leader since start (for metrics), and
    /// the leader it saw last.
    pub leader_changes: u64,
    last_leader: u64,
    /// A leader seen by the last tick and not yet reported (`take_new_leader`).
    new_leader: Option<(u64, u64)>,
    max_inflight: usize,
    snapshot_threshold: u64,
    retain_entries: u64,
    /// Whether the group ticks (see `quiet.rs`).
    quiet: quiet::Quiet,
    /// Commit notices (see `notice.rs`): the followers owed them, with
    /// the index each waits for, and what each follower was last told.
    notice_wanted: Vec<(u64, u64)>,
    notified: Vec<(u64, u64)>,
}

/// Everything a group is built from (fresh or recovered).
pub struct GroupInit {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
}

impl GroupInit {
    /// The initial state of a bootstrapped replica: a snapshot at
    /// `INIT_INDEX` holding the voters and an empty map.
    pub fn bootstrap(voters: Vec<u64>) -> GroupInit {
        let cs = ConfState {
            voters,
            ..Default::default()
        };
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = INIT_INDEX;
        snap.mut_metadata().term = INIT_INDEX;
        snap.mut_metadata().set_conf_state(cs.clone());
        let hs = HardState {
            term: INIT_INDEX,
            commit: INIT_INDEX,
            ..Default::default()
        };
        GroupInit {
            hard_state: hs,
            conf_state: cs,
            snapshot: Some(snap),
            entries: Vec::new(),
        }
    }

    /// A replica joining an existing group: empty, not a voter yet; the
    /// leader sends it a snapshot.
    pub fn joining() -> GroupInit {
        GroupInit {
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            snapshot: None,
            entries: Vec::new(),
        }
    }
}

impl<S: StateMachine> Group<S> {
    pub fn new(
        id: u32,
        node_id: u64,
        cfg: &RaftConfig,
        max_inflight: usize,
        init: GroupInit,
    ) -> Result<Group<S>, GroupError> {
        let tiny = init
            .snapshot
            .as_ref()
            .is_none_or(|s| s.get_data().len() <= TINY_SNAPSHOT);
        let (sm, snap_index, snap_term, snap_conf) = match &init.snapshot {
            Some(s) => (
                S::restore(&s.data).map_err(|source| GroupError::Snapshot {
                    partition: id,
                    source,
                })?,
                s.get_metadata().index,
                s.get_metadata().term,
                s.get_metadata().get_conf_state().clone(),
            ),
            None => (S::default(), 0, 0, ConfState::default()),
        };
        let storage = GroupStorage::new(
            init.hard_state,
            init.conf_state,
            init.snapshot,
            init.entries,
        );
        let config = raft::Config {
            id: node_id,
            election_tick: cfg.election_ticks(),
            heartbeat_tick: 1,
            // Entries up to the snapshot are already in the state machine;
            // everything after it is re-applied from the log on start.
            applied: snap_index,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            // Followers learn commits from appends, heartbeats and, when
            // they wait for a write of theirs, coalesced notices
            // (`notice.rs`).
            skip_bcast_commit: true,
            ..Default::default()
        };
        let raw = RawNode::new(&config, storage.clone(), &super::logger::group_logger(id))
            .map_err(|source| GroupError::Raft {
                partition: id,
                source,
            })?;
        Ok(Group {
            id,
            raw,
            storage,
            sm,
            applied: snap_index,
            applied_term: snap_term,
            applied_conf: snap_conf,
            snapshot_index: snap_index,
            tiny_and_unchanged: tiny,
            queued: Vec::new(),
            reproposals: Vec::new(),
            waiting: HashMap::new(),
            read_queue: Vec::new(),
            read_batches: HashMap::new(),
            ready_reads: Vec::new(),
            conf_waiters: HashMap::new(),
            next_ctx: rand::random::<u64>() >> 1,
            ticks: 0,
            leaderless_ticks: 0,
            dropped_msgs: 0,
            drop_logged: None,
            election_ticks: cfg.election_ticks() as u64,
            tick_period: cfg.heartbeat_period,
            commands_applied: 0,
            proposals: 0,
            leader_changes: 0,
            last_leader: raft::INVALID_ID,
            new_leader: None,
            max_inflight,
            snapshot_threshold: cfg.snapshot_entry_threshold,
            retain_entries: cfg.compaction_retain_entries,
            quiet: Default::default(),
            notice_wanted: Vec::new(),
            notified: Vec::new(),
        })
    }

    /// The index of the last entry applied to the state machine.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Whether a snapshot now would cover entries the last one did not
    /// (and so could let the log drop them).
    pub fn has_applied_since_snapshot(&self) -> bool {
        self.applied > self.snapshot_index
    }

    pub fn raw(&mut self) -> &mut RawNode<GroupStorage> {
        &mut self.raw
    }

    pub fn storage(&self) -> &GroupStorage {
        &self.storage
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The other voters a leadership could go to now: caught up with this
    /// leader's log and recently heard from. Empty unless this replica
    /// leads, is not already handing over, and the configuration is not
    /// joint (a transfer then would only add to the change in flight).
    pub fn transfer_targets(&self) -> Vec<u64> {
        let r = &self.raw.raft;
        if r.state != StateRole::Leader
            || r.lead_transferee.is_some()
            || !self.applied_conf.voters_outgoing.is_empty()
        {
            return Vec::new();
        }
        let last = r.raft_log.last_index();
        let me = r.id;
        r.prs()
            .iter()
            .filter(|(id, p)| **id != me && p.matched == last && p.recent_active)
            .map(|(id, _)| *id)
            .filter(|id| r.prs().conf().voters().contains(*id))
            .collect()
    }

    pub fn voters(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        v.sort_unstable();
        v
    }

    pub fn status(&self) -> GroupStatus {
        GroupStatus {
            partition: self.id,
            role: self.raw.raft.state,
            leader: self.raw.raft.leader_id,
            term: self.raw.raft.term,
            commit: self.raw.raft.raft_log.committed,
            applied: self.applied,
            voters: self.voters(),
            snapshot_index: self.snapshot_index,
            quiescent: self.quiet.quiescent,
        }
    }

    // ---- inputs ---------------------------------------------------------

    /// One raft tick; also retries ReadIndex requests that got no answer,
    /// proposes again writes raft may have dropped, fails calls once the
    /// group has had no leader for a while, forgets waiters whose callers
    /// have gone away, and lets an idle group go quiet (`alive` says which
    /// nodes this node hears from; see `quiet.rs`). The shard does not
    /// tick quiescent groups.
    ///
    /// Returns whether the group now has something for the shard's turn
    /// (a Ready, or work queued); a follower whose election timer just
    /// advanced has not, and the turn need not visit it.
    pub fn tick(&mut self, alive: &dyn Fn(u64) -> bool) -> bool {
        if self.heartbeat_unneeded() {
            self.tick_without_heartbeat();
        } else {
            self.raw.tick();
        }
        self.ticks += 1;
        self.note_leader();
        let now = self.ticks;
        let mut resend = Vec::new();
        for (ctx, b) in self.read_batches.iter_mut() {
            b.reads.retain(|r| !r.reply.is_canceled());
            if now - b.sent_tick >= 3 && !b.reads.is_empty() {
                b.sent_tick = now;
                resend.push(*ctx);
            }
        }
        self.read_batches.retain(|_, b| !b.reads.is_empty());
        for ctx in resend {
            self.raw.read_index(ctx.to_le_bytes().to_vec());
        }
        if now.is_multiple_of(16) {
            self.waiting.retain(|_, p| !p.reply.is_canceled());
            self.conf_waiters.retain(|_, r| !r.is_canceled());
        }
        if self.raw.raft.leader_id == raft::INVALID_ID {
            self.leaderless_ticks += 1;
            if self.cannot_reach_quorum() {
                self.fail_leaderless();
            }
        } else {
            self.leaderless_ticks = 0;
            self.repropose_stale();
        }
        self.quiet_tick(alive);
        self.wants_turn() || self.raw.has_ready()
    }

    /// Proposes again, under the same identity, every write that has waited
    /// two election timeouts or was proposed in an earlier term: a proposal
    /// forwarded to a leader that lost office, or sitting in a deposed
    /// leader's log, may never commit. Safe because the state machine runs
    /// each identity at most once (`kv::session`); a copy that turns out to
    /// be the second one answers with the first one's result.
    fn repropose_stale(&mut self) {
        let (now, term) = (self.ticks, self.raw.raft.term);
        let patience = 2 * self.election_ticks;
        for p in self.waiting.values_mut() {
            if p.proposed_term != term || now - p.proposed_tick >= patience {
                p.proposed_tick = now;
                p.proposed_term = term;
                self.reproposals.push(p.cmd.clone());
            }
        }
    }

    /// No leader for two election timeouts: this replica cannot reach a
    /// quorum (a leader that cannot steps down after one, with check-quorum;
    /// a follower campaigns after one).
    ///
    /// The count is kept by ticks, so it is stale once a message names a
    /// leader between two ticks, or when the group learned its leader and
    /// then went quiet without ticking again: a known leader wins.
    fn cannot_reach_quorum(&self) -> bool {
        self.raw.raft.leader_id == raft::INVALID_ID
            && self.leaderless_ticks >= 2 * self.election_ticks
    }

    fn no_quorum_status(&self, what: &str) -> CallError {
        let secs = self.leaderless_ticks as f64 * self.tick_secs();
        CallError::Unavailable(format!(
            "partition {}: no leader for {secs:.1}s (this replica cannot reach a quorum); {what}",
            self.id
        ))
    }

    /// The group has had no leader for two election timeouts: this replica
    /// cannot reach a quorum. Callers get UNAVAILABLE now rather than wait
    /// out their deadlines; proposed writes may still be applied later (the
    /// message says so), queued ones were never proposed.
    fn fail_leaderless(&mut self) {
        let never = self.no_quorum_status("the write was not proposed");
        for (_, r) in self.queued.drain(..) {
            let _ = r.send(Err(never.clone()));
        }
        let unknown = self.no_quorum_status("the write's outcome is unknown");
        for (_, p) in self.waiting.drain() {
            let _ = p.reply.send(Err(unknown.clone()));
        }
        self.reproposals.clear();
        let read = self.no_quorum_status("retry");
        let reads = self
            .read_queue
            .drain(..)
            .chain(self.read_batches.drain().flat_map(|(_, b)| b.reads));
        for r in reads {
            let _ = r.reply.send(Err(read.clone()));
        }
    }

    fn tick_secs(&self) -> f64 {
        self.tick_period.as_secs_f64()
    }

    /// Queues a write for this turn's batch. Refused with RESOURCE_EXHAUSTED
    /// when too many writes of the partition are already in flight.
    pub fn propose(&mut self, cmd: S::Command, reply: WriteReply<S>) {
        self.wake();
        if reply.is_canceled() {
            // Its caller's deadline passed on the way here: not proposed.
            return;
        }
        if self.cannot_reach_quorum() {
            let _ = reply.send(Err(self.no_quorum_status("the write was not proposed")));
            return;
        }
        if self.waiting.len() + self.queued.len() >= self.max_inflight {
            let _ = reply.send(Err(CallError::Busy(format!(
                "partition {}: {} writes in flight; retry later",
                self.id, self.max_inflight
            ))));
            return;
        }
        self.proposals += 1;
        self.queued.push((cmd, reply));
    }

    /// Records a change of leader since the last look.
    fn note_leader(&mut self) {
        let leader = self.raw.raft.leader_id;
        if leader != self.last_leader && leader != raft::INVALID_ID {
            self.leader_changes += 1;
            self.new_leader = Some((leader, self.raw.raft.term));
        }
        self.last_leader = leader;
    }

    /// The (leader, term) seen to change since the last call, once. Also
    /// looks now, so a group that went quiet before its next tick still
    /// reports the leader it learned.
    pub fn take_new_leader(&mut self) -> Option<(u64, u64)> {
        self.note_leader();
        self.new_leader.take()
    }

    /// The raft term this replica is in.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The leader this replica knows of (`raft::INVALID_ID`: none).
    pub fn leader(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// Proposes a membership change; `reply` is answered once it is applied
    /// here. Followers forward the proposal to the leader through raft.
    pub fn propose_conf_change(&mut self, cc: ConfChange, reply: Reply<ConfState>) {
        self.wake();
        let id = self.next_ctx;
        self.next_ctx += 1;
        match self.raw.propose_conf_change(id.to_le_bytes().to_vec(), cc) {
            Ok(()) => {
                self.conf_waiters.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(CallError::Unavailable(format!(
                    "partition {}: conf change not accepted ({e}); no leader known yet",
                    self.id
                ))));
            }
        }
    }

    pub fn transfer_leader(&mut self, to: u64) {
        self.wake();
        self.raw.transfer_leader(to);
    }

    /// Turns this turn's queued writes and reads into raft requests.
    pub fn flush(&mut self) {
        // A caller that has gone (deadline passed, client cancelled) no
        // longer wants its write proposed.
        self.queued.retain(|(_, r)| !r.is_canceled());
        let has_writes = !self.queued.is_empty() || !self.reproposals.is_empty();
        if has_writes && self.raw.raft.leader_id != raft::INVALID_ID {
            let batch: Vec<_> = std::mem::take(&mut self.queued);
            let mut cmds: Vec<S::Command> = std::mem::take(&mut self.reproposals);
            cmds.extend(batch.iter().map(|(c, _)| c.clone()));
            let data = S::encode(&cmds);
            match self.raw.propose(Vec::new(), data.to_vec()) {
                Ok(()) => {
                    let (tick, term) = (self.ticks, self.raw.raft.term);
                    for (cmd, reply) in batch {
                        let p = Pending {
                            cmd,
                            reply,
                            proposed_tick: tick,
                            proposed_term: term,
                        };
                        // The same write again (a caller retried through
                        // this node): the newer caller waits, the older
                        // one is told to look elsewhere.
                        if let Some(old) = self.waiting.insert(S::id(&p.cmd), p) {
                            let _ = old.reply.send(Err(CallError::Unavailable(
                                "superseded by a retry of the same write".into(),
                            )));
                        }
                    }
                }
                // Dropped (e.g. a leader transfer in progress): keep them
                // queued and try again next turn; their callers' deadlines
                // bound the wait. Reproposals come back on the next tick.
                Err(_) => self.queued = batch,
            }
        }
        if !self.read_queue.is_empty() {
            let ctx = self.next_ctx;
            self.next_ctx += 1;
            let reads = std::mem::take(&mut self.read_queue);
            self.raw.read_index(ctx.to_le_bytes().to_vec());
            self.read_batches.insert(
                ctx,
                ReadBatch {
                    reads,
                    sent_tick: self.ticks,
                },
            );
        }
    }

    /// Fails every waiter (the group is being removed or the node stops).
    pub fn fail_all(&mut self, status: CallError) {
        for (_, r) in self.queued.drain(..) {
            let _ = r.send(Err(status.clone()));
        }
        for (_, p) in self.waiting.drain() {
            let _ = p.reply.send(Err(status.clone()));
        }
        self.reproposals.clear();
        for (_, r) in self.conf_waiters.drain() {
            let _ = r.send(Err(status.clone()));
        }
        let reads = self
            .read_queue
            .drain(..)
            .chain(self.read_batches.drain().flat_map(|(_, b)| b.reads))
            .chain(self.ready_reads.drain(..).flat_map(|(_, r)| r));
        for r in reads {
            let _ = r.reply.send(Err(status.clone()));
        }
    }
}

#[cfg(test)]
mod tests;
