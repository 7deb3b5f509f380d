//! `raft::Storage` for one group: an in-memory index over what the shard's
//! WAL has made durable.
//!
//! The shard loop writes every change twice, in the same turn: into the WAL
//! buffer (made durable by the turn's single fdatasync) and into this index
//! (which raft reads). Raft only learns that entries are persisted from
//! `advance` after the fsync, so reading them here earlier is safe: a leader
//! may send entries to followers before its own sync, never count itself
//! in the quorum before it.
//!
//! Entries live in memory from the last compaction point on. Compaction
//! follows every snapshot (`snapshot_entry_threshold`), which bounds the
//! entries held per group to about threshold + `compaction_retain_entries`.
//! With thousands of groups that bound alone is no bound at all (10,000
//! busy groups keep at least `compaction_retain_entries` each, even when
//! WAL purges make them snapshot early), so every group also counts the
//! bytes its entries hold into its shard's [`LogMemory`], and the shard
//! asks the biggest logs to trim when the total goes over its budget
//! (`Shard::trim_logs`).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

/// Bytes held by the entries of a shard's groups, summed (see
/// [`GroupStorage::log_bytes`]).
#[derive(Clone, Default)]
pub struct LogMemory(Rc<Cell<u64>>);

impl LogMemory {
    pub fn get(&self) -> u64 {
        self.0.get()
    }

    fn add(&self, n: u64) {
        self.0.set(self.0.get() + n);
    }

    fn sub(&self, n: u64) {
        self.0.set(self.0.get().saturating_sub(n));
    }
}

/// The bytes an entry's payload holds (the entry struct itself is counted
/// with its vector's capacity, see `Core::recount`).
fn payload_bytes(e: &Entry) -> u64 {
    (e.data.len() + e.context.len()) as u64
}

#[derive(Default)]
struct Core {
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot, metadata and data; index 0 when there is none.
    snapshot: Snapshot,
    /// Index and term of the entry just before `entries[0]`.
    compact_index: u64,
    compact_term: u64,
    entries: Vec<Entry>,
    /// Raft asked for a snapshot newer than `snapshot` (or one that
    /// includes the receiving peer); the group takes one after this turn.
    snapshot_wanted: bool,
    /// The WAL asked for a new copy of the snapshot even at the same index
    /// (its pack file is mostly dead space; see `Wal::sparse_pack_groups`).
    relocation_wanted: bool,
    /// The shard is over its log memory budget and asks this group to let
    /// go of what it can (see `Group::maybe_snapshot`).
    trim_wanted: bool,
    /// Payload bytes of `entries`.
    payload: u64,
    /// What this group last added to `memory`.
    counted: u64,
    memory: LogMemory,
}

impl Core {
    /// Brings the shard's count up to date after `entries` changed.
    fn recount(&mut self) {
        let now = self.payload + (self.entries.capacity() * std::mem::size_of::<Entry>()) as u64;
        self.memory.sub(self.counted);
        self.memory.add(now);
        self.counted = now;
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.memory.sub(self.counted);
    }
}

/// Shared handle: the group mutates it, raft reads it.
#[derive(Clone, Default)]
pub struct GroupStorage(Rc<RefCell<Core>>);

impl GroupStorage {
    /// Storage for a recovered (or freshly bootstrapped) group.
    pub fn new(
        hs: HardState,
        cs: ConfState,
        snapshot: Option<Snapshot>,
        entries: Vec<Entry>,
    ) -> GroupStorage {
        let snapshot = snapshot.unwrap_or_default();
        let (ci, ct) = (snapshot.get_metadata().index, snapshot.get_metadata().term);
        let payload = entries.iter().map(payload_bytes).sum();
        let mut core = Core {
            hard_state: hs,
            conf_state: cs,
            snapshot,
            compact_index: ci,
            compact_term: ct,
            entries,
            snapshot_wanted: false,
            relocation_wanted: false,
            trim_wanted: false,
            payload,
            counted: 0,
            memory: LogMemory::default(),
        };
        core.recount();
        GroupStorage(Rc::new(RefCell::new(core)))
    }

    /// Counts this group's entries into `memory` (its shard's) from now on,
    /// instead of wherever they were counted before.
    pub fn attach(&self, memory: &LogMemory) {
        let mut c = self.0.borrow_mut();
        c.memory.sub(c.counted);
        memory.add(c.counted);
        c.memory = memory.clone();
    }

    /// Where the shared state lives, for `Group::prefetch`.
    pub(crate) fn core_ptr(&self) -> *const u8 {
        Rc::as_ptr(&self.0).cast()
    }

    /// Bytes the in-memory log holds: entry payloads plus the entry
    /// vector's whole capacity.
    pub fn log_bytes(&self) -> u64 {
        self.0.borrow().counted
    }

    /// Asks the group to let go of all the log it can after this turn (its
    /// shard is over budget).
    pub fn want_trim(&self) {
        self.0.borrow_mut().trim_wanted = true;
    }

    pub fn trim_wanted(&self) -> bool {
        self.0.borrow().trim_wanted
    }

    pub fn take_trim_wanted(&self) -> bool {
        std::mem::take(&mut self.0.borrow_mut().trim_wanted)
    }

    /// Asks the group to snapshot (and so compact) after this turn.
    pub fn want_snapshot(&self) {
        self.0.borrow_mut().snapshot_wanted = true;
    }

    /// Whether a snapshot was asked for and not yet taken.
    pub fn snapshot_wanted(&self) -> bool {
        self.0.borrow().snapshot_wanted
    }

    /// True (once) when raft asked for a snapshot the group does not have.
    pub fn take_snapshot_wanted(&self) -> bool {
        std::mem::take(&mut self.0.borrow_mut().snapshot_wanted)
    }

    /// Asks the group to write its snapshot again, even with nothing
    /// applied since, so that the file holding the old one can go.
    pub fn want_relocation(&self) {
        self.0.borrow_mut().relocation_wanted = true;
    }

    pub fn relocation_wanted(&self) -> bool {
        self.0.borrow().relocation_wanted
    }

    pub fn take_relocation_wanted(&self) -> bool {
        std::mem::take(&mut self.0.borrow_mut().relocation_wanted)
    }

    pub fn hard_state(&self) -> HardState {
        self.0.borrow().hard_state.clone()
    }

    pub fn set_hard_state(&self, hs: HardState) {
        self.0.borrow_mut().hard_state = hs;
    }

    pub fn set_commit(&self, commit: u64) {
        self.0.borrow_mut().hard_state.commit = commit;
    }

    pub fn set_conf_state(&self, cs: ConfState) {
        self.0.borrow_mut().conf_state = cs;
    }

    pub fn first_index(&self) -> u64 {
        self.0.borrow().compact_index + 1
    }

    pub fn last_index(&self) -> u64 {
        let c = self.0.borrow();
        c.entries.last().map_or(c.compact_index, |e| e.index)
    }

    /// Appends entries, replacing any conflicting suffix (raft's rule).
    pub fn append(&self, ents: &[Entry]) {
        if ents.is_empty() {
            return;
        }
        let mut c = self.0.borrow_mut();
        let first = ents[0].index;
        let keep = first.saturating_sub(c.compact_index + 1) as usize;
        let cut: u64 = c
            .entries
            .get(keep..)
            .map_or(0, |t| t.iter().map(payload_bytes).sum());
        c.entries.truncate(keep);
        c.entries.extend_from_slice(ents);
        c.payload = c.payload - cut + ents.iter().map(payload_bytes).sum::<u64>();
        c.recount();
    }

    /// Installs a snapshot received from the leader: the log restarts after it.
    pub fn apply_snapshot(&self, snap: Snapshot) {
        let mut c = self.0.borrow_mut();
        let meta = snap.get_metadata();
        c.compact_index = meta.index;
        c.compact_term = meta.term;
        c.entries = Vec::new();
        c.payload = 0;
        c.recount();
        c.conf_state = meta.get_conf_state().clone();
        c.hard_state.term = c.hard_state.term.max(meta.term);
        c.hard_state.commit = c.hard_state.commit.max(meta.index);
        c.snapshot = snap;
    }

    /// Records a snapshot the group took of its own state machine (the log
    /// is compacted separately by [`GroupStorage::compact`]).
    pub fn set_snapshot(&self, snap: Snapshot) {
        self.0.borrow_mut().snapshot = snap;
    }

    /// Drops entries up to and including `index` (at most up to the last
    /// entry, and only what exists). The vector keeps its capacity: a busy
    /// group refills it before its next snapshot.
    pub fn compact(&self, index: u64) {
        self.compact_and(index, false)
    }

    /// [`GroupStorage::compact`], then gives back the vector's spare
    /// capacity: for a log trimmed to fit the shard's memory budget.
    pub fn trim(&self, index: u64) {
        self.compact_and(index, true)
    }

    fn compact_and(&self, index: u64, shrink: bool) {
        let mut c = self.0.borrow_mut();
        let last = c.entries.last().map_or(c.compact_index, |e| e.index);
        let n = index.min(last).saturating_sub(c.compact_index) as usize;
        if n > 0 {
            c.compact_term = c.entries[n - 1].term;
            c.compact_index += n as u64;
            let gone: u64 = c.entries[..n].iter().map(payload_bytes).sum();
            c.payload -= gone;
            c.entries.drain(..n);
        }
        if shrink {
            c.entries.shrink_to_fit();
        }
        c.recount();
    }
}

impl raft::Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.0.borrow();
        Ok(RaftState::new(c.hard_state.clone(), c.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let c = self.0.borrow();
        if low <= c.compact_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let last = c.entries.last().map_or(c.compact_index, |e| e.index);
        if high > last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - c.compact_index - 1) as usize;
        let hi = (high - c.compact_index - 1) as usize;
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity(hi - lo);
        let mut size = 0u64;
        for e in &c.entries[lo..hi] {
            size += (e.data.len() + e.context.len() + 16) as u64;
            // At least one entry is always returned, as raft expects.
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let c = self.0.borrow();
        if idx == c.compact_index {
            return Ok(c.compact_term);
        }
        if idx < c.compact_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match c.entries.get((idx - c.compact_index - 1) as usize) {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(GroupStorage::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(GroupStorage::last_index(self))
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut c = self.0.borrow_mut();
        let meta = c.snapshot.get_metadata();
        let cs = meta.get_conf_state();
        // raft-rs refuses a snapshot whose conf state does not list the
        // receiver (a replica added by Join after the snapshot was taken),
        // and one older than what it asked for. Either way: ask the group
        // for a fresh one; raft retries on its next probe.
        let includes =
            cs.voters.contains(&to) || cs.learners.contains(&to) || cs.learners_next.contains(&to);
        if meta.index == 0 || meta.index < request_index || !includes {
            c.snapshot_wanted = true;
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(c.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn append_truncates_conflicts_and_compacts() {
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 5;
        snap.mut_metadata().term = 5;
        let s = GroupStorage::new(
            HardState::default(),
            ConfState::default(),
            Some(snap),
            vec![],
        );
        assert_eq!((s.first_index(), s.last_index()), (6, 5));
        assert_eq!(Storage::term(&s, 5).unwrap(), 5);
        s.append(&[entry(6, 5), entry(7, 5), entry(8, 5)]);
        s.append(&[entry(7, 6)]);
        assert_eq!(s.last_index(), 7);
        assert_eq!(Storage::term(&s, 7).unwrap(), 6);
        let got = s
            .entries(6, 8, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.len(), 2);
        s.compact(6);
        assert_eq!(s.first_index(), 7);
        assert_eq!(Storage::term(&s, 6).unwrap(), 5);
        assert!(s
            .entries(6, 8, None, GetEntriesContext::empty(false))
            .is_err());
        assert!(Storage::term(&s, 5).is_err());
        // The snapshot at 5 is older than a request for index 6.
        assert!(s.snapshot(6, 2).is_err());
        assert!(s.take_snapshot_wanted());
        assert!(!s.take_snapshot_wanted());
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 6;
        snap.mut_metadata().term = 5;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2];
        s.set_snapshot(snap);
        assert_eq!(s.snapshot(5, 2).unwrap().get_metadata().index, 6);
        // Node 3 is not in the snapshot's conf state.
        assert!(s.snapshot(5, 3).is_err());
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    const ENTRY: u64 = std::mem::size_of::<Entry>() as u64;

    fn entry(index: u64, payload: usize) -> Entry {
        Entry {
            index,
            term: 1,
            data: vec![7; payload].into(),
            ..Default::default()
        }
    }

    fn storage() -> GroupStorage {
        GroupStorage::new(HardState::default(), ConfState::default(), None, vec![])
    }

    /// The shard's count follows every change to a log: appends, a
    /// conflicting suffix replaced, compaction, a trim giving capacity
    /// back, an installed snapshot, and the group going away.
    #[test]
    fn the_shard_count_follows_each_log() {
        let shard = LogMemory::default();
        let a = storage();
        let b = storage();
        a.attach(&shard);
        b.attach(&shard);
        assert_eq!(shard.get(), 0);

        a.append(&[entry(1, 100), entry(2, 100), entry(3, 100)]);
        let cap = a.0.borrow().entries.capacity() as u64;
        assert_eq!(a.log_bytes(), 300 + cap * ENTRY);
        assert_eq!(shard.get(), a.log_bytes());

        b.append(&[entry(1, 50)]);
        assert_eq!(shard.get(), a.log_bytes() + b.log_bytes());

        // Entries 2 and 3 replaced by a shorter 2.
        a.append(&[entry(2, 10)]);
        assert_eq!(a.0.borrow().payload, 110);

        // Compaction drops payload, keeps the capacity.
        a.compact(1);
        assert_eq!(a.log_bytes(), 10 + cap * ENTRY);
        // A trim gives the spare capacity back.
        a.trim(2);
        assert_eq!(a.first_index(), 3);
        assert_eq!(a.log_bytes(), 0);
        assert_eq!(shard.get(), b.log_bytes());

        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 9;
        snap.mut_metadata().term = 1;
        b.apply_snapshot(snap);
        assert_eq!(shard.get(), 0);

        b.append(&[entry(10, 40)]);
        assert!(shard.get() >= 40);
        drop(b);
        assert_eq!(shard.get(), 0);
    }

    /// A group built from recovered entries counts them, and takes them
    /// along to the shard it is attached to.
    #[test]
    fn recovered_entries_move_with_the_group() {
        let s = GroupStorage::new(
            HardState::default(),
            ConfState::default(),
            None,
            vec![entry(1, 1000), entry(2, 1000)],
        );
        assert!(s.log_bytes() >= 2000);
        let shard = LogMemory::default();
        s.attach(&shard);
        assert_eq!(shard.get(), s.log_bytes());
        let other = LogMemory::default();
        s.attach(&other);
        assert_eq!((shard.get(), other.get()), (0, s.log_bytes()));
    }
}
