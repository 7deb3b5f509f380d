//! The per-shard write-ahead log.
//!
//! One log per shard, in the shard's data directory:
//!
//! ```text
//! {dir}/wal/{seq:020}.wal    segments, see segment.rs and record.rs
//! {dir}/snap/*.pack          snapshot packs, see snapshot.rs
//! ```
//!
//! Writing is group commit: `append_entries`, `set_hard_state`,
//! `set_conf_state`, `compact` and `remove_group` only encode a record into
//! memory; `sync` writes everything buffered with one DMA write (plus the
//! rewritten partial tail block) and one `fdatasync`. Records are placed into
//! segments at encode time: when a record does not fit in the current
//! segment, the log rolls, and the new segment starts with a header and a
//! checkpoint of every live group's state records (hard state, conf state,
//! snapshot reference, compact index). The checkpoint is what lets purge drop
//! old segments as soon as no group needs their entries.
//!
//! All of this runs on the shard's glommio executor: `Wal` is `!Send` and
//! takes no locks.
//!
//! Durability rules the shard relies on: records reach the disk in the
//! order they were buffered; a snapshot's file is durable before any record
//! that names it; `purge` deletes only segments that the durable state no
//! longer needs (it syncs first); replay refuses a log whose entries do not
//! continue its snapshot/compaction floor.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;

use futures::{StreamExt, TryStreamExt};
use glommio::io::DmaFile;
use glommio::Task;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use tracing::info;

pub mod failpoints;
mod group;
mod io;
mod pack;
mod purge;
mod record;
mod recovery;
mod segment;
mod snapshot;

/// Snapshot files written or read at once.
const SNAPSHOT_IO_IN_FLIGHT: usize = 32;

/// Old segments kept behind the active one from which a purge that cannot
/// delete them says so (below, it is routine and silent).
const PILING_UP_SEGMENTS: u64 = 4;

#[cfg(test)]
mod tests;

use group::GroupMeta;
use segment::ActiveSegment;

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corruption in {path} at byte offset {offset}: {reason}")]
    Corruption {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The disk is full (ENOSPC). Nothing buffered was lost and nothing on
    /// disk was damaged; a later `sync` may succeed once space returns.
    #[error("{op} {path}: no space left on device")]
    NoSpace { op: &'static str, path: PathBuf },
    /// An earlier write or `fdatasync` failed. After a failed fsync it is
    /// unknown what reached the disk, so the log refuses all further syncs;
    /// the shard has to be restarted (which replays what is durable).
    #[error("the log failed earlier and accepts no more writes: {reason}")]
    Poisoned { reason: String },
}

/// Tunables.
#[derive(Clone, Debug)]
pub struct WalConfig {
    /// Size of one preallocated, pre-zeroed segment file. Rounded up to a
    /// multiple of 4 KiB, at least 64 KiB.
    pub segment_size: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_size: 64 << 20,
        }
    }
}

impl WalConfig {
    fn effective_segment_size(&self) -> u64 {
        self.segment_size.max(64 << 10).div_ceil(4096) * 4096
    }
}

/// What recovery rebuilt for one raft group.
#[derive(Debug, Default)]
pub struct GroupState {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Latest snapshot (metadata and data), if any.
    pub snapshot: Option<Snapshot>,
    /// Entries after the snapshot index, contiguous, in index order.
    pub entries: Vec<Entry>,
}

/// Everything replayed at open.
#[derive(Debug, Default)]
pub struct Recovered {
    pub groups: BTreeMap<u64, GroupState>,
}

/// Counters of one log, for metrics and tests.
#[derive(Clone, Debug, Default)]
pub struct WalStats {
    /// `sync` calls that wrote something.
    pub syncs: u64,
    /// Record bytes made durable (excluding rewritten tail blocks).
    pub bytes_synced: u64,
    /// Segments rolled into.
    pub segments_rolled: u64,
    /// Segments deleted by `purge`.
    pub segments_purged: u64,
    /// Oldest and newest segment currently on disk.
    pub first_segment: u64,
    pub active_segment: u64,
}

/// Entry batches are split into records of about this fraction of a
/// segment, so one big append does not force a half-empty segment or an
/// oversized one.
const MAX_RECORD_FRACTION: u64 = 8;

/// One shard's log. Lives on the shard's executor (not `Send`).
pub struct Wal {
    wal_dir: PathBuf,
    snap_dir: PathBuf,
    segment_size: u64,
    /// The segment being appended to on disk.
    active: ActiveSegment,
    /// Encoded records for `active`, after its durable end.
    pending: Vec<u8>,
    /// Segments rolled into since the last sync, each with all its content
    /// (header, checkpoint, records), in order.
    rolled: VecDeque<(u64, Vec<u8>)>,
    /// Length of the header + checkpoint at the start of the newest segment
    /// (0 when it was reopened): a segment holding no more than this must
    /// not roll again, or an oversized record would roll forever.
    head_base: u64,
    /// Oldest segment on disk.
    first_seq: u64,
    /// Live state of every group, as of the end of the buffer.
    groups: BTreeMap<u64, GroupMeta>,
    /// The next segment, being prepared in the background. Dropping the
    /// task cancels it, so a dropped log leaves no writer behind.
    next: Option<(u64, Task<Result<DmaFile, WalError>>)>,
    snapshot_serial: u64,
    /// The pack holding the snapshots whose records are buffered: `(name,
    /// content)`, written and made durable by the next sync before the
    /// records.
    pack: Option<(String, Vec<u8>)>,
    /// The buffer of the last pack written, emptied, for the next one: a
    /// log trimmed under load fills a pack most turns, and a buffer grown
    /// afresh each time pays for its regrowth and fresh pages.
    pack_spare: Vec<u8>,
    /// What each snapshot file in `snap/` holds for live groups.
    packs: pack::Packs,
    /// Snapshot files to delete once the buffered records that superseded
    /// them are durable.
    doomed_snapshots: Vec<String>,
    poisoned: Option<String>,
    stats: WalStats,
}

impl Wal {
    /// Opens (creating if needed) the log in `dir` and replays it.
    pub async fn open(dir: PathBuf, config: WalConfig) -> Result<(Wal, Recovered), WalError> {
        let wal_dir = dir.join("wal");
        let snap_dir = dir.join("snap");
        let segment_size = config.effective_segment_size();
        let fresh = !wal_dir.exists();
        for d in [&wal_dir, &snap_dir] {
            std::fs::create_dir_all(d).map_err(|e| io::io_err("create dir", d, e))?;
        }
        if fresh {
            // Make the new directories themselves durable.
            io::sync_dir(&dir).await?;
        }
        io::probe_device(&wal_dir).await;
        io::probe_device(&snap_dir).await;

        let replayed = recovery::replay(&wal_dir).await?;
        // Snapshot files are read several at a time: a shard with thousands
        // of partitions has as many files, and one at a time leaves the
        // disk idle between them.
        let snaps: Vec<Option<Snapshot>> = futures::stream::iter(replayed.groups.values())
            .map(|g| {
                let snap_dir = &snap_dir;
                async move {
                    match &g.meta.snapshot {
                        Some(r) if r.inline.is_some() => snapshot::read_inline(r).map(Some),
                        Some(r) => snapshot::read(snap_dir, r).await.map(Some),
                        None => Ok(None),
                    }
                }
            })
            .buffered(SNAPSHOT_IO_IN_FLIGHT)
            .try_collect()
            .await?;
        let mut groups = BTreeMap::new();
        let mut recovered = Recovered::default();
        for ((id, g), snap) in replayed.groups.into_iter().zip(snaps) {
            // Replay refused logs that do not continue their floor.
            let entries: Vec<Entry> = g.entries.into();
            recovered.groups.insert(
                id,
                GroupState {
                    hard_state: g.meta.hard_state.clone(),
                    conf_state: g.meta.conf_state.clone(),
                    snapshot: snap,
                    entries,
                },
            );
            groups.insert(id, g.meta);
        }
        let snapshot_serial = clean_snapshots(&snap_dir, &groups).await?;
        let packs = pack::Packs::from_groups(&groups);

        let mut wal = match replayed.last {
            Some(last) => {
                let valid_end = if last.has_header { last.valid_end } else { 0 };
                let active =
                    ActiveSegment::reopen(last.seq, last.path, &last.content, valid_end).await?;
                Wal::new(wal_dir, snap_dir, segment_size, active, groups)
            }
            None => {
                let file = segment::prepare(wal_dir.clone(), 1, segment_size).await?;
                let path = segment::install(&wal_dir, 1).await?;
                let active = ActiveSegment::new(1, path, file);
                Wal::new(wal_dir, snap_dir, segment_size, active, groups)
            }
        };
        if wal.active.synced_len == 0 {
            // Empty (new, or its header never became durable): start it like
            // a freshly rolled segment.
            let mut buf = Vec::new();
            wal.write_segment_start(&mut buf, wal.active.seq);
            wal.head_base = buf.len() as u64;
            wal.pending = buf;
        }
        wal.first_seq = replayed.segments.first().copied().unwrap_or(wal.active.seq);
        wal.snapshot_serial = snapshot_serial;
        wal.packs = packs;
        wal.prepare_next(wal.active.seq + 1);
        wal.refresh_stats();
        Ok((wal, recovered))
    }

    fn new(
        wal_dir: PathBuf,
        snap_dir: PathBuf,
        segment_size: u64,
        active: ActiveSegment,
        groups: BTreeMap<u64, GroupMeta>,
    ) -> Wal {
        Wal {
            wal_dir,
            snap_dir,
            segment_size,
            active,
            pending: Vec::new(),
            rolled: VecDeque::new(),
            head_base: 0,
            first_seq: 0,
            groups,
            next: None,
            snapshot_serial: 0,
            pack: None,
            pack_spare: Vec::new(),
            packs: pack::Packs::default(),
            doomed_snapshots: Vec::new(),
            poisoned: None,
            stats: WalStats::default(),
        }
    }

    /// Buffers entries of `group`. Previously written entries of the group
    /// with index >= `entries[0].index` are superseded (raft conflict).
    pub fn append_entries(&mut self, group: u64, entries: &[Entry]) {
        let limit = (self.segment_size / MAX_RECORD_FRACTION) as usize;
        let mut start = 0;
        while start < entries.len() {
            // Split big batches: each piece supersedes from its own first
            // index, which is a no-op for every piece but the first.
            let mut end = start + 1;
            let mut size = record::entry_size(&entries[start]);
            while end < entries.len() && size + record::entry_size(&entries[end]) <= limit {
                size += record::entry_size(&entries[end]);
                end += 1;
            }
            let batch = &entries[start..end];
            let seq = self.push(|buf| record::put_entries(buf, group, batch));
            let (first, last) = (batch[0].index, batch[batch.len() - 1].index);
            self.groups
                .entry(group)
                .or_default()
                .on_entries(first, last, seq);
            start = end;
        }
    }

    /// Buffers the group's new hard state.
    pub fn set_hard_state(&mut self, group: u64, hs: &HardState) {
        self.push(|buf| record::put_hard_state(buf, group, hs));
        self.groups.entry(group).or_default().hard_state = hs.clone();
    }

    /// Buffers the group's new conf state.
    pub fn set_conf_state(&mut self, group: u64, cs: &ConfState) {
        self.push(|buf| record::put_conf_state(buf, group, cs));
        self.groups.entry(group).or_default().conf_state = cs.clone();
    }

    /// Entries of `group` up to `index` are no longer needed. The caller
    /// makes sure what replaces them (a snapshot at or above `index`) was
    /// saved first: records reach the disk in the order they were buffered,
    /// so the compaction is never durable without it.
    pub fn compact(&mut self, group: u64, index: u64) {
        self.push(|buf| record::put_compact(buf, group, index));
        self.groups.entry(group).or_default().on_compact(index);
    }

    /// The group is gone (its replica left): forget it, drop its files.
    pub fn remove_group(&mut self, group: u64) {
        self.push(|buf| record::put_remove_group(buf, group));
        if let Some(meta) = self.groups.remove(&group) {
            if let Some(s) = meta.snapshot {
                self.doom(s);
            }
        }
    }

    /// Writes everything buffered in one append and one fdatasync.
    ///
    /// On `NoSpace` everything stays buffered and a later call retries. Any
    /// other failure poisons the log: this and every later call fail.
    pub async fn sync(&mut self) -> Result<(), WalError> {
        if let Some(reason) = &self.poisoned {
            return Err(WalError::Poisoned {
                reason: reason.clone(),
            });
        }
        let res = self.sync_inner().await;
        match &res {
            Ok(()) => self.delete_doomed_snapshots().await,
            Err(WalError::NoSpace { .. }) => {}
            // Never retry after a failed write or fsync: the kernel may have
            // dropped the dirty state, so a later "successful" fsync would
            // acknowledge data that is not on disk.
            Err(e) => self.poisoned = Some(e.to_string()),
        }
        self.refresh_stats();
        res
    }

    async fn sync_inner(&mut self) -> Result<(), WalError> {
        self.write_snapshot_files().await?;
        if self.pending.is_empty() && self.rolled.is_empty() {
            return Ok(());
        }
        self.stats.syncs += 1;
        self.commit_pending().await?;
        // The previous segment is fully durable before anything is written
        // to the next one: recovery treats a torn tail in any segment but
        // the last as corruption.
        while let Some(&(seq, _)) = self.rolled.front() {
            let file = self.take_prepared(seq).await?;
            let path = segment::install(&self.wal_dir, seq).await?;
            let old = std::mem::replace(&mut self.active, ActiveSegment::new(seq, path, file));
            old.close().await;
            self.prepare_next(seq + 1);
            if let Some((_, data)) = self.rolled.pop_front() {
                // From here on the data belongs to the (installed) active
                // segment, so a failed commit is retried like any other.
                self.pending = data;
            }
            self.commit_pending().await?;
        }
        Ok(())
    }

    /// Makes `pending` durable in the active segment, in rounds of at most
    /// [`io::SYNC_EXTENT`] bytes, each written and fdatasynced before the
    /// next: no write ever reaches further than that past the durable end,
    /// which is what lets recovery stop reading a segment a bounded
    /// distance after its last record (`recovery::read_written`). What a
    /// round made durable leaves `pending`, so a retry after ENOSPC goes
    /// on from there.
    async fn commit_pending(&mut self) -> Result<(), WalError> {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(io::SYNC_EXTENT);
            self.active.commit(&self.pending[..n]).await?;
            self.stats.bytes_synced += n as u64;
            self.pending.drain(..n);
        }
        Ok(())
    }

    /// Deletes segments no group needs any more. Returns the groups that
    /// keep segments alive (oldest first, at most `purge::MAX_PINNING`), so
    /// the caller can have them snapshot and compact.
    ///
    /// Plans only from durable state: everything buffered is synced first,
    /// so a compaction or snapshot that justifies deleting a segment is on
    /// disk before the segment goes. (Planning from buffered records would
    /// let a crash leave a log whose entries no longer reach its floor.)
    pub async fn purge(&mut self) -> Result<Vec<u64>, WalError> {
        self.sync().await?;
        // The active segment always stays; so does the one before it until
        // the active one's checkpoint is durable.
        let limit = if self.active.synced_len > 0 {
            self.active.seq
        } else {
            self.active.seq.saturating_sub(1)
        };
        let plan = purge::plan(self.first_seq, limit, &self.groups);
        if let Some(&(group, seq)) = plan.pinned_by.first() {
            // Routine while the shard has the pinning groups snapshot (each
            // purge under load; each snapshot is logged at debug); worth an
            // operator's eye only once old segments pile up, say behind a
            // leader cut off from its quorum.
            let kept = limit.saturating_sub(seq);
            if kept >= PILING_UP_SEGMENTS {
                info!(
                    group,
                    segment = seq,
                    groups = plan.pinned_by.len(),
                    segments_kept = kept,
                    "raft groups pin old log segments until they snapshot and compact"
                );
            }
        }
        if plan.keep_from > self.first_seq {
            let deleted =
                purge::delete_segments(&self.wal_dir, self.first_seq, plan.keep_from).await;
            // Even a partial purge deleted the oldest segments first.
            let deleted = match deleted {
                Ok(n) => n,
                Err(e) => {
                    self.first_seq = first_on_disk(&self.wal_dir, self.first_seq, plan.keep_from);
                    return Err(e);
                }
            };
            self.stats.segments_purged += deleted;
            self.first_seq = plan.keep_from;
            if failpoints::is_on("wal::purge::crash_after_delete") {
                let e = failpoints::crash("wal::purge::crash_after_delete");
                self.poisoned = Some(e.to_string());
                return Err(e);
            }
        }
        self.refresh_stats();
        Ok(plan.pinned_by.into_iter().map(|(group, _)| group).collect())
    }

    /// True once a failed write or fsync made the log refuse further syncs.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Counters of this log.
    pub fn stats(&self) -> &WalStats {
        &self.stats
    }

    fn refresh_stats(&mut self) {
        self.stats.first_segment = self.first_seq;
        self.stats.active_segment = self.active.seq;
    }

    /// Sequence number and buffered length of the newest segment.
    fn head(&self) -> (u64, u64) {
        match self.rolled.back() {
            Some((seq, data)) => (*seq, data.len() as u64),
            None => (
                self.active.seq,
                self.active.synced_len + self.pending.len() as u64,
            ),
        }
    }

    /// Encodes one record into the buffer of the newest segment, rolling to
    /// a new segment first if it does not fit. Returns the segment it went
    /// to. State changes of the record must be applied after this call, so
    /// that a checkpoint written by the roll reflects the state before it.
    fn push(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let (seq, before) = self.head();
        let buf = match self.rolled.back_mut() {
            Some((_, data)) => data,
            None => &mut self.pending,
        };
        let start = buf.len();
        encode(buf);
        let len = (buf.len() - start) as u64;
        if before + len <= self.segment_size || before <= self.head_base {
            return seq;
        }
        let rec = buf.split_off(start);
        let next = seq + 1;
        let mut data = Vec::with_capacity(rec.len() + 4096);
        self.write_segment_start(&mut data, next);
        self.head_base = data.len() as u64;
        data.extend_from_slice(&rec);
        self.rolled.push_back((next, data));
        self.stats.segments_rolled += 1;
        next
    }

    /// Header and checkpoint that open segment `seq`.
    fn write_segment_start(&self, buf: &mut Vec<u8>, seq: u64) {
        record::put_segment_header(buf, seq);
        for (&g, m) in &self.groups {
            record::put_hard_state(buf, g, &m.hard_state);
            record::put_conf_state(buf, g, &m.conf_state);
            if let Some(s) = &m.snapshot {
                record::put_snapshot_meta(buf, g, s);
            }
            if m.compact_index > 0 {
                record::put_compact(buf, g, m.compact_index);
            }
        }
    }

    /// Starts preparing segment `seq` in the background.
    fn prepare_next(&mut self, seq: u64) {
        let task = glommio::spawn_local(segment::prepare(
            self.wal_dir.clone(),
            seq,
            self.segment_size,
        ));
        self.next = Some((seq, task));
    }

    /// The prepared file for segment `seq`, waiting for the background task
    /// or preparing it now.
    async fn take_prepared(&mut self, seq: u64) -> Result<DmaFile, WalError> {
        if let Some((s, task)) = self.next.take() {
            if s == seq {
                return task.await;
            }
            // Stale (cannot happen with the roll order, but be safe): make
            // sure it stopped before preparing the same file name again.
            let _ = task.cancel().await;
        }
        segment::prepare(self.wal_dir.clone(), seq, self.segment_size).await
    }
}

/// Oldest segment still on disk in `from..to` (or `to`), after a purge that
/// stopped half way.
fn first_on_disk(wal_dir: &std::path::Path, from: u64, to: u64) -> u64 {
    (from..to)
        .find(|&s| wal_dir.join(segment::segment_name(s)).exists())
        .unwrap_or(to)
}

/// Deletes snapshot files no live group references (superseded ones whose
/// deletion a crash interrupted, packs whose records never became durable,
/// temporaries) and returns the highest serial in use, so new snapshot
/// files never reuse a name.
async fn clean_snapshots(
    snap_dir: &std::path::Path,
    groups: &BTreeMap<u64, GroupMeta>,
) -> Result<u64, WalError> {
    let live: std::collections::HashSet<&str> = groups
        .values()
        .filter_map(|m| m.snapshot.as_ref().map(|s| s.name.as_str()))
        .filter(|name| !name.is_empty())
        .collect();
    let mut serial = 0;
    for (name, path) in io::list_dir(snap_dir)? {
        let own = snapshot::parse_serial(&name);
        if let Some(s) = own {
            serial = serial.max(s);
        }
        let unreferenced = own.is_some() && !live.contains(name.as_str());
        if unreferenced || snapshot::is_tmp(&name) {
            glommio::io::remove(&path)
                .await
                .map_err(|e| io::glommio_err("remove", &path, e))?;
        }
    }
    Ok(serial)
}
