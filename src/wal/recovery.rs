//! Replay: rebuilds every group's state from the segments at open.
//!
//! Segments are replayed in sequence order. Each one must start with a
//! SegmentHeader naming its own sequence number, followed by the checkpoint
//! written when the log rolled into it (see `mod.rs`), then records.
//!
//! Where a segment stops parsing before its zeroed remainder decides what
//! happened:
//! - a bad record with a valid record somewhere after it is corruption, in
//!   any segment. (A disk that persists the sectors of one unacknowledged
//!   write out of order could in theory leave that pattern too; refusing to
//!   start is still the right call, because the alternative is silently
//!   dropping records that may have been acknowledged.)
//! - a bad record with nothing valid after it, in the last segment, is a
//!   write torn by a crash: it was never acknowledged, so it is dropped with
//!   a warning;
//! - the same in an earlier segment is corruption: earlier segments were
//!   fully synced before the log rolled past them.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Instant;

use glommio::io::DmaFile;
use raft::eraftpb::Entry;
use tracing::{info, warn};

use super::group::{EntryRuns, GroupMeta};
use super::io::{glommio_err, list_dir, read_more, MAX_IO, SYNC_EXTENT};
use super::record::{self, Decoded, Kind, Record, SnapshotRef};
use super::segment::{is_tmp_name, parse_segment_name, segment_name};
use super::WalError;

/// One group as replay rebuilt it.
#[derive(Debug, Default)]
pub(crate) struct ReplayGroup {
    pub meta: GroupMeta,
    /// Live entries (index > floor), contiguous.
    pub entries: VecDeque<Entry>,
    /// Where each entries record of the live log came from, as
    /// `(first index, segment, byte offset)`, ascending: names the record
    /// when the log turns out not to continue its floor.
    origins: VecDeque<(u64, u64, u64)>,
}

impl ReplayGroup {
    #[cfg(test)]
    fn append(&mut self, entries: Vec<Entry>, seq: u64, group: u64) {
        self.append_at(entries, seq, 0, group)
    }

    fn append_at(&mut self, entries: Vec<Entry>, seq: u64, offset: u64, group: u64) {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return;
        };
        let (first, last) = (first.index, last.index);
        while self.origins.back().is_some_and(|&(f, _, _)| f >= first) {
            self.origins.pop_back();
        }
        self.origins.push_back((first, seq, offset));
        if let Some(front) = self.entries.front().map(|e| e.index) {
            if first <= front {
                self.entries.clear();
            } else {
                let keep = (first - front) as usize;
                if keep > self.entries.len() {
                    // Raft never appends past a hole; if it happens anyway,
                    // keep the newest contiguous run rather than return a
                    // log with a hole in it.
                    warn!(
                        group,
                        first, "entries appended after a gap; dropping the older entries"
                    );
                    self.entries.clear();
                    self.meta.runs = EntryRuns::default();
                } else {
                    self.entries.truncate(keep);
                }
            }
        }
        if self.entries.is_empty() {
            self.origins.retain(|&(f, _, _)| f == first);
        }
        self.entries.extend(entries);
        self.meta.on_entries(first, last, seq);
        self.drop_dead();
    }

    fn compact(&mut self, index: u64) {
        self.meta.on_compact(index);
        self.drop_dead();
    }

    /// Applies a snapshot record. Entries up to its index go. Entries after
    /// it stay only if the log holds the snapshot's own (index, term): then
    /// they continue the snapshot's history (a locally taken snapshot). If
    /// the log has a different term at that index, the later entries belong
    /// to a diverged history that the snapshot replaced, so they go too.
    fn snapshot(&mut self, snap: SnapshotRef) {
        let front = self.entries.front().map_or(0, |e| e.index);
        let at = snap.index.checked_sub(front).map(|d| d as usize);
        if let Some(e) = at.and_then(|i| self.entries.get(i)) {
            if e.term != snap.term {
                self.entries.clear();
                self.origins.clear();
                self.meta.runs = EntryRuns::default();
            }
        }
        self.meta.on_snapshot(snap);
        self.drop_dead();
    }

    fn drop_dead(&mut self) {
        let floor = self.meta.floor();
        while self.entries.front().is_some_and(|e| e.index <= floor) {
            self.entries.pop_front();
        }
        // Keep the origin of the record holding the first live entry.
        while self.origins.len() > 1 && self.origins[1].0 <= floor + 1 {
            self.origins.pop_front();
        }
    }

    /// The live log must continue right after the floor (the snapshot or
    /// compaction index): raft cannot start from a log with a hole below
    /// its first entry, and a hole means records that were synced are gone
    /// (e.g. a segment deleted too early). Returns the segment and offset of
    /// the record holding the first live entry when it does not.
    fn check_continues_floor(&self) -> Result<(), (u64, u64, String)> {
        let Some(first) = self.entries.front().map(|e| e.index) else {
            return Ok(());
        };
        let floor = self.meta.floor();
        if first == floor + 1 {
            return Ok(());
        }
        let (seq, offset) = self
            .origins
            .iter()
            .rev()
            .find(|&&(f, _, _)| f <= first)
            .map_or((0, 0), |&(_, s, o)| (s, o));
        Err((
            seq,
            offset,
            format!(
                "entries start at index {first} but the snapshot/compaction floor is {floor}: \
                 entries {}..={} are missing",
                floor + 1,
                first - 1
            ),
        ))
    }
}

/// The last segment, kept so the writer can continue in it.
pub(crate) struct LastSegment {
    pub seq: u64,
    pub path: PathBuf,
    pub content: Vec<u8>,
    /// End of the last valid record.
    pub valid_end: usize,
    /// False if not even the segment header made it to disk.
    pub has_header: bool,
}

/// Result of replaying the whole log.
pub(crate) struct Replayed {
    pub groups: BTreeMap<u64, ReplayGroup>,
    /// Sequence numbers of the segments on disk, ascending, contiguous.
    pub segments: Vec<u64>,
    pub last: Option<LastSegment>,
}

/// Replays all segments in `wal_dir`.
pub(crate) async fn replay(wal_dir: &Path) -> Result<Replayed, WalError> {
    let started = Instant::now();
    let mut seqs = Vec::new();
    for (name, path) in list_dir(wal_dir)? {
        if let Some(seq) = parse_segment_name(&name) {
            seqs.push(seq);
        } else if is_tmp_name(&name) {
            // A segment prepared ahead of need and never rolled into.
            std::fs::remove_file(&path).map_err(|e| super::io::io_err("remove", &path, e))?;
        } else {
            warn!(path = %path.display(), "ignoring unknown file in the log directory");
        }
    }
    seqs.sort_unstable();
    for w in seqs.windows(2) {
        if w[1] != w[0] + 1 {
            return Err(WalError::Corruption {
                path: wal_dir.join(segment_name(w[0] + 1)),
                offset: 0,
                reason: format!("segment missing between {} and {}", w[0], w[1]),
            });
        }
    }

    let mut groups = BTreeMap::new();
    let mut last = None;
    let (mut bytes, mut records) = (0u64, 0u64);
    for (i, &seq) in seqs.iter().enumerate() {
        let is_last = i + 1 == seqs.len();
        let path = wal_dir.join(segment_name(seq));
        let file = DmaFile::open(&path)
            .await
            .map_err(|e| glommio_err("open", &path, e))?;
        let content = read_written(&file, &path).await;
        let _ = file.close().await;
        let content = content?;
        let scan = scan_segment(&path, seq, &content, is_last)?;
        bytes += scan.valid_end as u64;
        records += scan.records.len() as u64;
        for (off, rec) in &scan.records[scan.has_header as usize..] {
            apply(&mut groups, seq, *off as u64, rec).map_err(|reason| WalError::Corruption {
                path: path.clone(),
                offset: *off as u64,
                reason: reason.to_string(),
            })?;
        }
        if is_last {
            let (valid_end, has_header) = (scan.valid_end, scan.has_header);
            last = Some(LastSegment {
                seq,
                path,
                content,
                valid_end,
                has_header,
            });
        }
    }

    for (&id, g) in &groups {
        if let Err((seq, offset, reason)) = g.check_continues_floor() {
            return Err(WalError::Corruption {
                path: wal_dir.join(segment_name(seq)),
                offset,
                reason: format!("group {id}: {reason}"),
            });
        }
    }

    let elapsed = started.elapsed();
    let mbps = bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64().max(1e-9);
    info!(
        dir = %wal_dir.display(),
        segments = seqs.len(),
        bytes,
        records,
        groups = groups.len(),
        elapsed_ms = elapsed.as_secs_f64() * 1e3,
        mb_per_s = format_args!("{mbps:.1}"),
        "replayed write-ahead log"
    );
    Ok(Replayed {
        groups,
        segments: seqs,
        last,
    })
}

/// Bytes past the end of a segment's last record that may have been
/// written: one round of the writer (`Wal::commit_pending`), which starts
/// at or before that end, plus a margin for the block it rewrites and pads.
const WRITE_WINDOW: usize = SYNC_EXTENT + (64 << 10);

/// Reads the part of a segment that can hold data, not its pre-zeroed
/// remainder: up to the end of its last complete record plus
/// [`WRITE_WINDOW`], if every byte read past that record is zero. No write
/// of the log ever reached further (`Wal::commit_pending`), so the rest is
/// still the zeroes the segment was prepared with. Anything else past the
/// last record (a record cut short, garbage, a bad length, a non-zero byte
/// in the window) means a torn write or damage: then the whole segment is
/// read, and `scan_segment` judges it as before.
///
/// What this cannot see: damage that zeroes more than the window's length
/// of records in the middle of a segment, and hides every record after it
/// beyond the window, looks like the end of the log.
pub(crate) async fn read_written(file: &DmaFile, path: &Path) -> Result<Vec<u8>, WalError> {
    read_written_within(file, path, WRITE_WINDOW).await
}

async fn read_written_within(
    file: &DmaFile,
    path: &Path,
    window: usize,
) -> Result<Vec<u8>, WalError> {
    let size = file
        .file_size()
        .await
        .map_err(|e| glommio_err("stat", path, e))? as usize;
    let mut out: Vec<u8> = Vec::new();
    // End of the complete records walked so far (by their lengths only;
    // `scan_segment` checks them).
    let mut walked = 0usize;
    // Read up to here; `None` while the records go on.
    let mut until: Option<usize> = None;
    loop {
        let target = until.unwrap_or(size).min(size);
        if out.len() >= target {
            match until {
                // The window past the last record must be zeroes.
                Some(_) if out[walked..].iter().any(|&b| b != 0) && target < size => {
                    until = Some(size);
                    continue;
                }
                _ => break,
            }
        }
        // Whole blocks (the file's size is a multiple of the block).
        let n = (target - out.len()).min(MAX_IO);
        let n = (file.align_up(n as u64) as usize).min(size - out.len());
        if read_more(file, path, &mut out, n).await? == 0 {
            break; // file shrank under us; judge what exists
        }
        while until.is_none() {
            let rest = &out[walked..];
            if rest.len() < record::FRAME_PREFIX {
                break;
            }
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            if len == 0 && crc == 0 {
                until = Some(walked.saturating_add(window));
            } else if len < record::MIN_BODY || walked + record::FRAME_PREFIX + len > size {
                until = Some(size);
            } else if walked + record::FRAME_PREFIX + len <= out.len() {
                walked += record::FRAME_PREFIX + len;
            } else {
                break;
            }
        }
    }
    Ok(out)
}

struct Scan<'a> {
    records: Vec<(usize, Record<'a>)>,
    valid_end: usize,
    has_header: bool,
}

/// Splits one segment into records and classifies where it stops.
fn scan_segment<'a>(
    path: &Path,
    seq: u64,
    content: &'a [u8],
    is_last: bool,
) -> Result<Scan<'a>, WalError> {
    let corrupt = |offset: usize, reason: String| WalError::Corruption {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    let mut records = Vec::new();
    let mut off = 0;
    let stop = loop {
        match record::decode_at(content, off) {
            Decoded::Record(r, n) => {
                records.push((off, r));
                off += n;
            }
            Decoded::End => break None,
            Decoded::Bad(reason) => break Some(reason),
        }
    };
    // Valid data can only start before the last non-zero byte.
    let dirty_end = record::nonzero_end(content);
    if dirty_end > off {
        if let Some(later) = record::find_valid_after(content, off, dirty_end) {
            return Err(corrupt(
                off,
                format!(
                    "{}, but a valid record follows at offset {later}",
                    stop.unwrap_or("zeroed record header")
                ),
            ));
        }
        let reason = stop.unwrap_or("garbage after the end marker");
        if !is_last {
            return Err(corrupt(
                off,
                format!("{reason} in a segment that is not the last"),
            ));
        }
        warn!(
            path = %path.display(),
            offset = off,
            reason,
            "torn write at the tail of the log; truncating"
        );
    }

    let has_header = match records.first() {
        None if is_last => false,
        None => return Err(corrupt(0, "segment has no header".into())),
        Some((_, r)) if r.kind != Kind::SegmentHeader => {
            return Err(corrupt(
                0,
                format!("first record is {:?}, not a segment header", r.kind),
            ))
        }
        Some((_, r)) => {
            let got = record::parse_segment_header(r.payload).map_err(|e| corrupt(0, e.0))?;
            if got != seq {
                return Err(corrupt(
                    0,
                    format!("header names segment {got}, file is {seq}"),
                ));
            }
            true
        }
    };
    Ok(Scan {
        records,
        valid_end: off,
        has_header,
    })
}

/// Applies one record (not the segment header) to the replay state.
fn apply(
    groups: &mut BTreeMap<u64, ReplayGroup>,
    seq: u64,
    offset: u64,
    rec: &Record<'_>,
) -> Result<(), record::PayloadError> {
    let g = rec.group;
    match rec.kind {
        Kind::SegmentHeader => return Err("segment header in the middle of a segment".into()),
        Kind::Entries => {
            let entries = record::parse_entries(rec.payload)?;
            groups
                .entry(g)
                .or_default()
                .append_at(entries, seq, offset, g);
        }
        Kind::HardState => {
            groups.entry(g).or_default().meta.hard_state = record::parse_hard_state(rec.payload)?;
        }
        Kind::ConfState => {
            groups.entry(g).or_default().meta.conf_state = record::parse_conf_state(rec.payload)?;
        }
        Kind::SnapshotMeta => {
            let s = record::parse_snapshot_meta(rec.payload)?;
            groups.entry(g).or_default().snapshot(s);
        }
        Kind::SnapshotInline => {
            let s = record::parse_snapshot_inline(rec.payload)?;
            groups.entry(g).or_default().snapshot(s);
        }
        Kind::SnapshotPacked => {
            let s = record::parse_snapshot_packed(rec.payload)?;
            groups.entry(g).or_default().snapshot(s);
        }
        Kind::Compact => {
            let index = record::parse_compact(rec.payload)?;
            groups.entry(g).or_default().compact(index);
        }
        Kind::RemoveGroup => {
            groups.remove(&g);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(first: u64, last: u64, term: u64) -> Vec<Entry> {
        (first..=last)
            .map(|index| Entry {
                index,
                term,
                ..Default::default()
            })
            .collect()
    }

    fn snap(index: u64, term: u64) -> SnapshotRef {
        SnapshotRef {
            index,
            term,
            data_len: 0,
            file_crc: 0,
            name: "s".into(),
            at: None,
            inline: None,
        }
    }

    fn indexes(g: &ReplayGroup) -> Vec<(u64, u64)> {
        g.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    /// A 16 MiB segment file (sparse: zeroes) starting with `head`, with
    /// byte 0xff at each of `marks`; what `read_written_within` returns.
    fn read_back(head: Vec<u8>, marks: Vec<usize>, window: usize) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        {
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(16 << 20).unwrap();
            use std::os::unix::fs::FileExt;
            f.write_all_at(&head, 0).unwrap();
            for m in marks {
                f.write_all_at(&[0xff], m as u64).unwrap();
            }
        }
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let file = DmaFile::open(&path).await.unwrap();
                let out = read_written_within(&file, &path, window).await.unwrap();
                file.close().await.unwrap();
                out
            })
            .unwrap()
            .join()
            .unwrap()
    }

    fn some_records() -> Vec<u8> {
        let mut buf = Vec::new();
        record::put_segment_header(&mut buf, 1);
        record::put_compact(&mut buf, 3, 7);
        buf
    }

    #[test]
    fn a_segment_is_read_to_its_last_record_and_a_zero_window_after() {
        let head = some_records();
        // Zeroes after the records: one read of MAX_IO covers records and
        // window; the rest of the file is never read, whatever it holds.
        let out = read_back(head.clone(), vec![12 << 20], 64 << 10);
        assert_eq!(out.len(), MAX_IO);
        assert_eq!(&out[..head.len()], &head[..]);
        // A record that continues past the first read is followed.
        let mut big = Vec::new();
        record::put_entries(&mut big, 1, &entries_with_data(6 << 20));
        let out = read_back(big.clone(), vec![], 64 << 10);
        assert!(out.len() >= big.len() + (64 << 10) && out.len() < 16 << 20);
    }

    #[test]
    fn anything_but_zeroes_after_the_last_record_reads_the_whole_segment() {
        let head = some_records();
        // A non-zero byte in what was read past the records (torn write).
        let out = read_back(head.clone(), vec![1 << 20], 64 << 10);
        assert_eq!(out.len(), 16 << 20);
        assert_eq!(out[1 << 20], 0xff);
        // A length no record can have.
        let mut bad = head.clone();
        bad.extend_from_slice(&3u32.to_le_bytes());
        bad.extend_from_slice(&[0; 4]);
        assert_eq!(read_back(bad, vec![], 64 << 10).len(), 16 << 20);
        // A record claiming to run past the end of the file.
        let mut long = head;
        long.extend_from_slice(&(32u32 << 20).to_le_bytes());
        long.extend_from_slice(&[1; 4]);
        assert_eq!(read_back(long, vec![], 64 << 10).len(), 16 << 20);
    }

    fn entries_with_data(bytes: usize) -> Vec<Entry> {
        vec![Entry {
            index: 1,
            term: 1,
            data: vec![7u8; bytes].into(),
            ..Default::default()
        }]
    }

    #[test]
    fn conflicting_append_truncates() {
        let mut g = ReplayGroup::default();
        g.append(entries(1, 5, 1), 1, 1);
        g.append(entries(3, 4, 2), 1, 1);
        assert_eq!(indexes(&g), vec![(1, 1), (2, 1), (3, 2), (4, 2)]);
        g.append(entries(1, 1, 3), 2, 1);
        assert_eq!(indexes(&g), vec![(1, 3)]);
    }

    #[test]
    fn snapshot_keeps_matching_suffix_and_drops_diverged_one() {
        let mut g = ReplayGroup::default();
        g.append(entries(1, 10, 2), 1, 1);
        g.snapshot(snap(5, 2));
        assert_eq!(g.entries.front().map(|e| e.index), Some(6));
        assert_eq!(g.entries.len(), 5);

        let mut g = ReplayGroup::default();
        g.append(entries(1, 10, 2), 1, 1);
        g.snapshot(snap(5, 3));
        assert!(g.entries.is_empty());
        assert!(g.meta.runs.is_empty());
    }

    #[test]
    fn a_log_that_does_not_continue_its_floor_is_refused() {
        let mut g = ReplayGroup::default();
        g.append_at(entries(22, 40, 1), 2, 4096, 1);
        g.append_at(entries(41, 60, 1), 3, 512, 1);
        let (seq, offset, reason) = g.check_continues_floor().unwrap_err();
        assert_eq!((seq, offset), (2, 4096), "{reason}");
        assert!(reason.contains("entries 1..=21 are missing"), "{reason}");
        g.compact(21);
        assert!(g.check_continues_floor().is_ok());
        g.compact(45);
        assert!(g.check_continues_floor().is_ok());
        assert_eq!(g.origins.front().map(|o| o.1), Some(3));
        // A snapshot past a hole is fine; a compaction alone below it is not.
        let mut g = ReplayGroup::default();
        g.compact(5);
        g.append_at(entries(9, 12, 1), 1, 100, 1);
        assert!(g.check_continues_floor().is_err());
        g.snapshot(snap(8, 1));
        assert!(g.check_continues_floor().is_ok());
    }

    #[test]
    fn compact_drops_prefix_and_later_appends_below_floor() {
        let mut g = ReplayGroup::default();
        g.append(entries(1, 10, 1), 1, 1);
        g.compact(7);
        assert_eq!(g.entries.front().map(|e| e.index), Some(8));
        g.append(entries(9, 12, 2), 2, 1);
        assert_eq!(indexes(&g), vec![(8, 1), (9, 2), (10, 2), (11, 2), (12, 2)]);
        assert_eq!(g.meta.runs.first_segment(), Some(1));
        g.compact(8);
        assert_eq!(g.meta.runs.first_segment(), Some(2));
    }
}
