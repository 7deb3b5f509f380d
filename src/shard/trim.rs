//! Keeping the shard's in-memory raft logs within its budget.
//!
//! A group compacts its log after `snapshot_entry_threshold` applied
//! entries, or sooner when a WAL purge asks it to, and keeps
//! `compaction_retain_entries` behind the snapshot. That bounds one log,
//! not thousands of them: 10,000 partitions taking writes keep 1,000
//! entries each, about 5 GiB at 500 bytes an entry (measured: with 1,024
//! busy partitions out of 10,000, node RSS settled at 750 MiB). So every
//! group counts its log into the shard's `LogMemory`
//! (`GroupStorage::attach`), and when the total goes over the shard's
//! share of `--log-memory-mib`, the biggest logs are asked to trim:
//! snapshot if anything was applied since the last one, then compact as
//! far as `Group::trim_index` allows. Enough logs are asked to bring the
//! total a quarter of the budget under it, so that trims come in batches
//! rather than one every turn.
//!
//! A trim loses nothing: it only compacts entries that are applied and
//! covered by a snapshot buffered in the WAL before the compaction record
//! (`save_snapshot_if_due`). A follower that still needed them is sent
//! that snapshot instead, as after any compaction.

use super::Shard;

/// Turns between two looks at the budget while it is exceeded: the trims
/// asked for run in the next turn, and a log that cannot trim (entries not
/// applied yet, a snapshot budget spent) should not cost a scan of every
/// group each turn.
const TRIM_EVERY_TURNS: u64 = 8;

impl Shard {
    /// Asks the biggest logs to trim if the shard is over its log budget.
    pub(super) fn trim_logs(&mut self) {
        let total = self.log_memory.get();
        if total <= self.log_budget {
            self.turns_since_trim = TRIM_EVERY_TURNS;
            return;
        }
        self.turns_since_trim += 1;
        if self.turns_since_trim < TRIM_EVERY_TURNS {
            return;
        }
        self.turns_since_trim = 0;
        let target = total - self.log_budget * 3 / 4;
        let mut logs: Vec<(u64, u32)> = self
            .groups
            .iter()
            .map(|(&p, g)| (g.storage().log_bytes(), p))
            .filter(|&(bytes, _)| bytes > 0)
            .collect();
        logs.sort_unstable_by(|a, b| b.cmp(a));
        let mut asked = 0u64;
        let mut n = 0;
        for (bytes, p) in logs {
            if asked >= target {
                break;
            }
            if let Some(g) = self.groups.get(&p) {
                g.storage().want_trim();
                self.ready.insert(p);
                asked += bytes;
                n += 1;
            }
        }
        self.metrics.log_trims.inc_by(n);
        tracing::debug!(
            shard = self.index,
            total,
            budget = self.log_budget,
            logs = n,
            bytes = asked,
            "log memory over budget: trimming the biggest logs"
        );
    }
}
