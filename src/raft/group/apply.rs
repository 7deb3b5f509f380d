//! Applying what raft committed: entries and snapshots into the state
//! machine (answering the writes that wait on them), membership changes,
//! and the snapshots a group takes of itself to compact its log.

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Snapshot};

use super::{CallError, Group, GroupError, Outbox, StateMachine, WriteResult};

impl<S: StateMachine> Group<S> {
    /// Installs a snapshot from the leader into the state machine.
    pub fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), GroupError> {
        let sm = S::restore(&snap.data).map_err(|source| GroupError::Snapshot {
            partition: self.id,
            source,
        })?;
        let meta = snap.get_metadata();
        self.storage.apply_snapshot(snap.clone());
        self.sm = sm;
        self.applied = meta.index;
        self.applied_term = meta.term;
        self.applied_conf = meta.get_conf_state().clone();
        self.snapshot_index = meta.index;
        self.tiny_and_unchanged = snap.get_data().len() <= super::TINY_SNAPSHOT;
        self.serve_reads();
        Ok(())
    }

    /// Applies committed entries. Conf changes update raft's configuration
    /// and are returned so the shard can persist the new conf state.
    pub fn apply(&mut self, entries: Vec<Entry>, out: &mut Outbox<S::Event>) -> Option<ConfState> {
        let mut new_conf = None;
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal if !e.data.is_empty() => {
                    self.tiny_and_unchanged = false;
                    self.apply_normal(&e, out)
                }
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => {
                    if let Some(cs) = self.apply_conf_change(&e, out) {
                        new_conf = Some(cs);
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    tracing::warn!(
                        partition = self.id,
                        index = e.index,
                        "ignoring ConfChangeV2 entry"
                    );
                }
            }
            self.applied = e.index;
            self.applied_term = e.term;
        }
        self.serve_reads();
        new_conf
    }

    fn apply_normal(&mut self, e: &Entry, out: &mut Outbox<S::Event>) {
        let cmds = match S::decode(&e.data) {
            Ok(c) => c,
            Err(err) => {
                // CRC-checked data that does not decode is a bug, not input:
                // skipping it on every replica keeps them identical.
                tracing::error!(
                    partition = self.id,
                    index = e.index,
                    "undecodable entry skipped: {err}"
                );
                return;
            }
        };
        self.commands_applied += cmds.len() as u64;
        for cmd in cmds {
            let id = S::id(&cmd);
            let events = if out.watching {
                Some(&mut out.events)
            } else {
                None
            };
            let result = self
                .sm
                .apply(self.id, e.index, cmd, events)
                .map(|(applied, index)| WriteResult { applied, index });
            if !S::has_caller(&id) {
                continue;
            }
            if let Some(p) = self.waiting.remove(&id) {
                let _ = p.reply.send(result);
            }
        }
    }

    fn apply_conf_change(&mut self, e: &Entry, out: &mut Outbox<S::Event>) -> Option<ConfState> {
        let waiter = <[u8; 8]>::try_from(&e.context[..])
            .ok()
            .and_then(|c| self.conf_waiters.remove(&u64::from_le_bytes(c)));
        let cc = match ConfChange::parse_from_bytes(&e.data) {
            Ok(cc) => cc,
            Err(err) => {
                tracing::error!(
                    partition = self.id,
                    index = e.index,
                    "undecodable conf change: {err}"
                );
                return None;
            }
        };
        if cc.get_change_type() == ConfChangeType::AddNode && !cc.context.is_empty() {
            if let Ok(addr) = std::str::from_utf8(&cc.context) {
                out.learned.push((cc.node_id, addr.to_string()));
            }
        }
        match self.raw.apply_conf_change(&cc) {
            Ok(cs) => {
                tracing::info!(
                    partition = self.id,
                    index = e.index,
                    "membership change {:?} node {} applied; voters now {:?}",
                    cc.get_change_type(),
                    cc.node_id,
                    cs.voters
                );
                self.storage.set_conf_state(cs.clone());
                self.applied_conf = cs.clone();
                out.conf_changes.push((self.id, e.index, cs.voters.clone()));
                if let Some(w) = waiter {
                    let _ = w.send(Ok(cs.clone()));
                }
                Some(cs)
            }
            Err(err) => {
                tracing::warn!(
                    partition = self.id,
                    index = e.index,
                    "conf change rejected: {err}"
                );
                if let Some(w) = waiter {
                    let _ = w.send(Err(CallError::Rejected(format!(
                        "conf change rejected: {err}"
                    ))));
                }
                None
            }
        }
    }

    /// Whether `maybe_snapshot` would do something now.
    pub fn snapshot_due(&self) -> bool {
        (self.storage.snapshot_wanted() && self.applied > self.snapshot_index)
            || (self.storage.relocation_wanted() && self.snapshot_index > 0)
            || self.storage.trim_wanted()
            || self.idle_snapshot_due()
            || self.applied >= self.snapshot_index + self.snapshot_threshold
    }

    /// Entries were applied since the last snapshot, none of them a
    /// command (a new leader's empty entry, a membership change), and that
    /// snapshot was tiny: the state is unchanged, so a new snapshot is as
    /// tiny (it goes inside the log record) and lets the log go. Without
    /// it, every idle partition keeps its few entries in the oldest WAL
    /// segment, and the first purge under load has to ask each of them
    /// to snapshot then: after a Bootstrap of 10,000 partitions, about
    /// 25,000 snapshots across three nodes in the first loaded seconds.
    fn idle_snapshot_due(&self) -> bool {
        self.tiny_and_unchanged && self.applied > self.snapshot_index
    }

    /// A snapshot of the state machine when `snapshot_entry_threshold`
    /// entries were applied since the last one, or when raft needs a newer
    /// one to send to a follower; the log is then compacted to `applied -
    /// compaction_retain_entries`. Asked to relocate, it takes one even at
    /// the index of the last: the same state, written anew. Asked to trim
    /// (the shard's logs are over their memory budget), it takes one if
    /// anything was applied since the last, and compacts as far as
    /// [`Group::trim_index`] allows (a trim may need no new snapshot).
    ///
    /// Returns the snapshot to persist, if one was taken, and the index the
    /// log was compacted to; the caller buffers both in the WAL, snapshot
    /// first. Nothing compacted is ever needed again by this replica: every
    /// entry up to `compact_to` is applied and inside a snapshot (the new
    /// one, or the last one, already buffered before).
    pub fn maybe_snapshot(&mut self) -> Option<(Option<Snapshot>, u64)> {
        let trim = self.storage.take_trim_wanted();
        let wanted = self.storage.take_snapshot_wanted() && self.applied > self.snapshot_index;
        let relocate = self.storage.take_relocation_wanted() && self.snapshot_index > 0;
        let snapshot = (wanted
            || relocate
            || (trim && self.applied > self.snapshot_index)
            || self.idle_snapshot_due()
            || self.applied >= self.snapshot_index + self.snapshot_threshold)
            .then(|| self.snapshot());
        let compacted = self.storage.first_index() - 1;
        if trim {
            let to = self.trim_index().min(self.snapshot_index);
            self.storage.trim(to);
            return (snapshot.is_some() || to > compacted).then_some((snapshot, to));
        }
        let snap = snapshot?;
        let compact_to = self.applied.saturating_sub(self.retain_entries);
        self.storage.compact(compact_to);
        Some((Some(snap), compact_to))
    }

    fn snapshot(&mut self) -> Snapshot {
        let mut snap = Snapshot {
            data: self.sm.snapshot(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = self.applied;
        meta.term = self.applied_term;
        meta.set_conf_state(self.applied_conf.clone());
        self.snapshot_index = self.applied;
        self.tiny_and_unchanged = snap.get_data().len() <= super::TINY_SNAPSHOT;
        self.storage.set_snapshot(snap.clone());
        snap
    }

    /// How far a trim compacts: everything applied, except that a leader
    /// keeps what its recently active followers have not acknowledged yet
    /// (at most `compaction_retain_entries` of it), so that a follower a
    /// few entries behind is not sent a whole snapshot. A follower that
    /// lags further, or is down, gets one when it returns.
    pub(crate) fn trim_index(&self) -> u64 {
        let r = &self.raw.raft;
        let mut to = self.applied;
        if r.state == raft::StateRole::Leader {
            for (id, pr) in r.prs().iter() {
                if *id != r.id && pr.recent_active {
                    to = to.min(pr.matched);
                }
            }
        }
        to.max(self.applied.saturating_sub(self.retain_entries))
    }
}
