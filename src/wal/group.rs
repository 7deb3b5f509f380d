//! Per-group bookkeeping that both replay and the live log maintain: the
//! group's durable state records and which segment holds which of its
//! entries. Keeping one implementation for both means the state written in a
//! segment checkpoint is exactly what replay would have rebuilt.

use raft::eraftpb::{ConfState, HardState};

use super::record::SnapshotRef;

/// Which segments hold a group's live entries, as runs of consecutive
/// indexes. Only sequence numbers are kept, not the entries themselves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct EntryRuns {
    /// `(first index, segment seq)`, ascending in both. Run `i` covers
    /// `[runs[i].0, runs[i + 1].0)`; the last run ends at `last`.
    runs: Vec<(u64, u64)>,
    /// Last live index; meaningless when `runs` is empty.
    last: u64,
}

impl EntryRuns {
    /// Entries `first..=last` were written to segment `seq`, superseding any
    /// previous entries with index >= `first`.
    pub(crate) fn append(&mut self, first: u64, last: u64, seq: u64) {
        self.truncate_from(first);
        let extends =
            matches!(self.runs.last(), Some(&(_, s)) if s == seq && self.last + 1 == first);
        if !extends {
            self.runs.push((first, seq));
        }
        self.last = last;
    }

    /// Forgets entries with index >= `index`.
    pub(crate) fn truncate_from(&mut self, index: u64) {
        if self.runs.is_empty() || index > self.last {
            return;
        }
        while matches!(self.runs.last(), Some(&(start, _)) if start >= index) {
            self.runs.pop();
        }
        self.last = if self.runs.is_empty() { 0 } else { index - 1 };
    }

    /// Forgets entries with index <= `index`.
    pub(crate) fn drop_through(&mut self, index: u64) {
        if self.runs.is_empty() {
            return;
        }
        if index >= self.last {
            self.runs.clear();
            self.last = 0;
            return;
        }
        // Runs starting at or before index + 1; the last of them holds index + 1.
        let n = self.runs.partition_point(|&(start, _)| start <= index + 1);
        if n > 1 {
            self.runs.drain(..n - 1);
        }
        if let Some(first) = self.runs.first_mut() {
            first.0 = first.0.max(index + 1);
        }
    }

    /// Oldest segment holding a live entry.
    pub(crate) fn first_segment(&self) -> Option<u64> {
        self.runs.first().map(|&(_, seq)| seq)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

/// Durable state of one group as of some point in the log.
#[derive(Clone, Debug, Default)]
pub(crate) struct GroupMeta {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    pub snapshot: Option<SnapshotRef>,
    /// Highest index passed to `compact` (0 if never).
    pub compact_index: u64,
    pub runs: EntryRuns,
}

impl GroupMeta {
    /// Entries at or below this index are not needed any more.
    pub(crate) fn floor(&self) -> u64 {
        let snap = self.snapshot.as_ref().map_or(0, |s| s.index);
        self.compact_index.max(snap)
    }

    pub(crate) fn on_entries(&mut self, first: u64, last: u64, seq: u64) {
        self.runs.append(first, last, seq);
        // Entries at or below the floor are dead on arrival.
        self.runs.drop_through(self.floor());
    }

    pub(crate) fn on_compact(&mut self, index: u64) {
        self.compact_index = self.compact_index.max(index);
        self.runs.drop_through(self.floor());
    }

    /// Records a new snapshot. Entries up to its index are dropped; later
    /// ones are kept here, which is conservative for purging (replay applies
    /// the exact rule, see `recovery.rs`).
    pub(crate) fn on_snapshot(&mut self, snap: SnapshotRef) {
        self.snapshot = Some(snap);
        self.runs.drop_through(self.floor());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_track_segments_through_conflicts_and_compaction() {
        let mut r = EntryRuns::default();
        r.append(1, 10, 1);
        r.append(11, 20, 1);
        assert_eq!(r.runs, vec![(1, 1)]);
        r.append(21, 30, 2);
        assert_eq!(r.runs, vec![(1, 1), (21, 2)]);
        // Conflict: entries >= 15 replaced from segment 3.
        r.append(15, 16, 3);
        assert_eq!(r.runs, vec![(1, 1), (15, 3)]);
        assert_eq!(r.last, 16);
        r.drop_through(14);
        assert_eq!(r.runs, vec![(15, 3)]);
        assert_eq!(r.first_segment(), Some(3));
        r.drop_through(16);
        assert!(r.is_empty());
        assert_eq!(r.first_segment(), None);
    }

    #[test]
    fn drop_through_keeps_the_run_holding_the_next_index() {
        let mut r = EntryRuns::default();
        r.append(1, 10, 1);
        r.append(11, 20, 2);
        r.append(21, 30, 3);
        r.drop_through(10);
        assert_eq!(r.runs, vec![(11, 2), (21, 3)]);
        r.drop_through(12);
        assert_eq!(r.runs, vec![(13, 2), (21, 3)]);
        r.drop_through(0);
        assert_eq!(r.runs, vec![(13, 2), (21, 3)]);
    }

    #[test]
    fn truncate_before_everything_empties() {
        let mut r = EntryRuns::default();
        r.append(5, 9, 1);
        r.truncate_from(3);
        assert!(r.is_empty());
        r.append(3, 4, 2);
        assert_eq!(r.runs, vec![(3, 2)]);
    }
}
