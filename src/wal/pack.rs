//! Which snapshot files live groups still use, and how much of each.
//!
//! A pack file (see `snapshot.rs`) holds every snapshot one sync wrote. It
//! may be deleted once no live group's snapshot is in it; until then it is
//! kept whole, so a few groups that never snapshot again could keep many
//! mostly dead packs: [`Packs::relocation`] names the groups to ask to
//! write their snapshot anew, into a fresh pack.
//!
//! Also how the log fills a pack: [`Wal::save_snapshot`] buffers a
//! snapshot into the pack of the next sync (or inline, when small), and
//! the sync writes the pack and makes it durable before the records that
//! name it (`Wal::write_snapshot_files`).

use std::collections::{BTreeMap, HashMap};

use raft::eraftpb::Snapshot;
use tracing::warn;

use super::group::GroupMeta;
use super::record::{self, SnapshotRef};
use super::{failpoints, io, snapshot, Wal, WalError};

/// Pack files may hold this many bytes of superseded snapshots beyond the
/// live ones before groups are asked to rewrite theirs elsewhere.
const PACK_SLACK: u64 = 64 << 20;

/// Snapshots up to this size (encoded) are kept inside the log (see
/// `record.rs`): a new replica's starting snapshot is well below it.
const INLINE_SNAPSHOT_MAX: usize = 256;

/// Largest pack buffer kept for the next pack (see `Wal::pack_spare`): a
/// turn's snapshots usually add up to far less (`shard::turn` caps them
/// at 8 MiB), and an idle shard should not hold a big one.
const PACK_SPARE_MAX: usize = 4 << 20;

impl Wal {
    /// Buffers a snapshot of `group`: its metadata record goes into the log
    /// now, in order with the group's other records, and entries up to the
    /// snapshot index are dropped for the group. The next `sync` writes the
    /// pack holding it (with every other snapshot buffered since the last
    /// sync) and makes it durable before any buffered record, so a synced
    /// record never names a missing file.
    ///
    /// Entries after the snapshot index survive recovery only if the log
    /// holds the snapshot's own (index, term); otherwise they belong to a
    /// history the snapshot replaced and recovery drops them too.
    pub fn save_snapshot(&mut self, group: u64, snap: &Snapshot) {
        let r = if snapshot::encoded_len(snap) <= INLINE_SNAPSHOT_MAX {
            // Inside the log record: durable with it, no file (and every
            // segment's checkpoint repeats it, hence the small bound).
            let (mut r, content) = snapshot::encode(snap);
            r.inline = Some(content);
            r
        } else {
            // Into this sync's pack, after the snapshots already in it.
            let (name, pack) = self.pack.get_or_insert_with(|| {
                self.snapshot_serial += 1;
                let buf = std::mem::take(&mut self.pack_spare);
                (snapshot::pack_name(self.snapshot_serial), buf)
            });
            let at = pack.len();
            let mut r = snapshot::encode_into(snap, pack);
            let len = (pack.len() - at) as u64;
            r.name = name.clone();
            r.at = Some((at as u64, len));
            self.packs.add(&r.name, len);
            r
        };
        self.push(|buf| record::put_snapshot_meta(buf, group, &r));
        let meta = self.groups.entry(group).or_default();
        let old = meta.snapshot.take();
        meta.on_snapshot(r);
        if let Some(old) = old {
            self.doom(old);
        }
    }

    /// A replaced snapshot no longer keeps its file: the file goes after the
    /// next sync once no live snapshot is left in it. (That sync makes
    /// durable the records that replaced every snapshot in the file, so a
    /// crash never finds a record naming a deleted file.)
    pub(super) fn doom(&mut self, old: SnapshotRef) {
        if old.inline.is_some() || !self.packs.release(&old) {
            return;
        }
        // The pack still being filled may take more snapshots before the
        // sync: `write_snapshot_files` dooms it if it ends up unused.
        let filling = self
            .pack
            .as_ref()
            .is_some_and(|(name, _)| *name == old.name);
        if !filling && self.packs.forget_if_unused(&old.name) {
            self.doomed_snapshots.push(old.name);
        }
    }

    /// Groups whose snapshots sit in pack files that are mostly superseded
    /// snapshots, to be asked to write theirs anew (into a fresh pack), at
    /// most `max` (see `pack.rs`).
    pub fn sparse_pack_groups(&self, max: usize) -> Vec<u64> {
        self.packs.relocation(&self.groups, max)
    }

    /// Writes the pack of the buffered snapshot records and makes it and
    /// its directory entry durable. On failure (ENOSPC) it stays queued for
    /// the next try.
    pub(super) async fn write_snapshot_files(&mut self) -> Result<(), WalError> {
        let Some((name, content)) = &self.pack else {
            return Ok(());
        };
        snapshot::write(&self.snap_dir, name, content).await?;
        // Only once its directory entry is durable too: a failure before
        // that writes the pack again at the next try.
        io::sync_dir(&self.snap_dir).await?;
        if let Some((name, mut buf)) = self.pack.take() {
            if buf.capacity() <= PACK_SPARE_MAX {
                buf.clear();
                self.pack_spare = buf;
            }
            // Every snapshot in it was replaced before the sync (say its
            // group was removed): it goes once this sync's records are
            // durable, like any pack whose last snapshot was replaced.
            if self.packs.forget_if_unused(&name) {
                self.doomed_snapshots.push(name);
            }
        }
        if failpoints::is_on("wal::sync::crash_after_snapshot_files") {
            return Err(failpoints::crash("wal::sync::crash_after_snapshot_files"));
        }
        Ok(())
    }

    /// Deletes the snapshot files whose replacements the last sync made
    /// durable.
    pub(super) async fn delete_doomed_snapshots(&mut self) {
        for name in std::mem::take(&mut self.doomed_snapshots) {
            let path = self.snap_dir.join(&name);
            // Failing to delete only wastes space: unreferenced snapshot
            // files are removed again at the next open.
            if let Err(e) = glommio::io::remove(&path).await {
                warn!(path = %path.display(), error = %e, "could not delete old snapshot");
            }
        }
    }
}

/// How much of one snapshot file live groups still use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PackUse {
    /// Live snapshots in the file.
    refs: u32,
    /// Their bytes.
    live: u64,
    /// Bytes of the file.
    size: u64,
}

/// Use of every snapshot file in `snap/` by live groups.
#[derive(Debug, Default)]
pub(crate) struct Packs {
    files: HashMap<String, PackUse>,
}

impl Packs {
    /// What each snapshot file holds for `groups` (at open). A file's size
    /// is taken as the end of its last live snapshot: superseded ones after
    /// it are not counted, which only makes relocation later, not wrong.
    pub(crate) fn from_groups(groups: &BTreeMap<u64, GroupMeta>) -> Packs {
        let mut files: HashMap<String, PackUse> = HashMap::new();
        for r in groups.values().filter_map(|m| m.snapshot.as_ref()) {
            if r.inline.is_some() || r.name.is_empty() {
                continue;
            }
            let used = files.entry(r.name.clone()).or_default();
            used.refs += 1;
            used.live += stored_len(r);
            let end = r.at.map_or(r.data_len, |(offset, len)| offset + len);
            used.size = used.size.max(end);
        }
        Packs { files }
    }

    /// A live snapshot of `len` bytes was added to the end of file `name`.
    pub(crate) fn add(&mut self, name: &str, len: u64) {
        let used = self.files.entry(name.to_string()).or_default();
        used.refs += 1;
        used.live += len;
        used.size += len;
    }

    /// Snapshot `r` was replaced; true if its file now holds no live one.
    pub(crate) fn release(&mut self, r: &SnapshotRef) -> bool {
        let Some(used) = self.files.get_mut(&r.name) else {
            return false;
        };
        used.refs = used.refs.saturating_sub(1);
        used.live = used.live.saturating_sub(stored_len(r));
        used.refs == 0
    }

    /// Forgets file `name` if it holds no live snapshot; true if so (the
    /// caller deletes it once that is durable).
    pub(crate) fn forget_if_unused(&mut self, name: &str) -> bool {
        let unused = self.files.get(name).is_some_and(|u| u.refs == 0);
        if unused {
            self.files.remove(name);
        }
        unused
    }

    /// The groups to ask to write their snapshot anew, at most `max` (see
    /// [`plan_relocation`]).
    pub(crate) fn relocation(&self, groups: &BTreeMap<u64, GroupMeta>, max: usize) -> Vec<u64> {
        plan_relocation(&self.files, groups, PACK_SLACK, max)
    }
}

/// The groups whose snapshots to rewrite so that mostly dead pack files
/// can go: none while all packs together hold at most twice their live
/// bytes plus `slack`; otherwise the live groups of packs less than half
/// live, emptiest pack first, at most `max`.
fn plan_relocation(
    packs: &HashMap<String, PackUse>,
    groups: &BTreeMap<u64, GroupMeta>,
    slack: u64,
    max: usize,
) -> Vec<u64> {
    let (size, live) = packs
        .values()
        .fold((0u64, 0u64), |(s, l), u| (s + u.size, l + u.live));
    if size <= live.saturating_mul(2).saturating_add(slack) {
        return Vec::new();
    }
    // (live share of the file in 1/2^32ths, name) of the sparse packs.
    let mut sparse: Vec<(u64, &str)> = packs
        .iter()
        .filter(|(_, u)| u.live.saturating_mul(2) < u.size)
        .map(|(name, u)| {
            let share = ((u.live as u128) << 32) / u128::from(u.size.max(1));
            (share as u64, name.as_str())
        })
        .collect();
    sparse.sort_unstable();
    let rank: HashMap<&str, usize> = sparse
        .iter()
        .enumerate()
        .map(|(i, &(_, name))| (name, i))
        .collect();
    let mut chosen: Vec<(usize, u64)> = groups
        .iter()
        .filter_map(|(&g, m)| {
            let name = m.snapshot.as_ref()?.name.as_str();
            rank.get(name).map(|&i| (i, g))
        })
        .collect();
    chosen.sort_unstable();
    chosen.into_iter().take(max).map(|(_, g)| g).collect()
}

/// Bytes a stored snapshot takes in its file (a file of its own, from
/// earlier versions, is counted by its data).
fn stored_len(r: &SnapshotRef) -> u64 {
    r.at.map_or(r.data_len, |(_, len)| len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relocation_is_planned_only_for_mostly_dead_packs_beyond_the_slack() {
        let r = |name: &str, len: u64| SnapshotRef {
            index: 1,
            term: 1,
            data_len: len,
            file_crc: 0,
            name: name.into(),
            at: Some((0, len)),
            inline: None,
        };
        let mut groups = BTreeMap::new();
        let mut add = |g: u64, name: &str, len: u64| {
            let mut m = GroupMeta::default();
            m.on_snapshot(r(name, len));
            groups.insert(g, m);
        };
        // "a": 100 live of 1000; "b": 600 of 1000; "c": 10 of 1000; "d": all live.
        add(1, "a", 100);
        add(2, "b", 300);
        add(3, "b", 300);
        add(4, "c", 10);
        add(5, "d", 500);
        let mut packs = HashMap::new();
        for (name, refs, live, size) in [
            ("a", 1, 100, 1000),
            ("b", 2, 600, 1000),
            ("c", 1, 10, 1000),
            ("d", 1, 500, 500),
        ] {
            packs.insert(name.to_string(), PackUse { refs, live, size });
        }
        // 3500 bytes hold 1210 live: within twice the live bytes plus 1100 of
        // slack, nothing moves.
        assert!(plan_relocation(&packs, &groups, 1100, 10).is_empty());
        // Beyond it, the emptiest pack's group first; half-live "b" and full
        // "d" stay.
        assert_eq!(plan_relocation(&packs, &groups, 0, 10), vec![4, 1]);
        assert_eq!(plan_relocation(&packs, &groups, 0, 1), vec![4]);
    }
}
