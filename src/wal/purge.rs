//! Purge: which whole segments no live group needs any more.
//!
//! Every segment starts with a checkpoint of all live groups' hard state,
//! conf state, snapshot reference and compact index, so a replay that starts
//! at any segment rebuilds the same state records. Older segments are
//! therefore only needed for entries: a group needs the segment holding its
//! first entry above its compact/snapshot index, and everything after it.

use std::collections::BTreeMap;
use std::path::Path;

use super::group::GroupMeta;
use super::io::{glommio_err, sync_dir};
use super::segment::segment_name;
use super::WalError;

/// Most groups a purge names as holding segments back: each is asked to
/// snapshot, and a snapshot may mean a file and a fsync, so a shard of
/// thousands of idle groups (all of whose first entries share the first
/// segment) lets them go a few hundred per purge.
pub(crate) const MAX_PINNING: usize = 256;

/// Outcome of planning a purge.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Segments `first..keep_from` can be deleted.
    pub keep_from: u64,
    /// The groups holding back the purge, each with the oldest segment it
    /// needs, oldest first (at most [`MAX_PINNING`]): those that prevent
    /// deleting at least one segment.
    pub pinned_by: Vec<(u64, u64)>,
}

/// Plans a purge of segments `first..limit`: `limit` is the oldest segment
/// that must stay regardless of entries (the active one, or the one before
/// it while the active one's checkpoint is not durable yet).
pub(crate) fn plan(first: u64, limit: u64, groups: &BTreeMap<u64, GroupMeta>) -> Plan {
    let mut pinned: Vec<(u64, u64)> = groups
        .iter()
        .filter_map(|(&g, m)| m.runs.first_segment().map(|seq| (seq, g)))
        .filter(|&(seq, _)| seq < limit)
        .collect();
    pinned.sort_unstable();
    pinned.truncate(MAX_PINNING);
    Plan {
        keep_from: pinned.first().map_or(limit, |&(seq, _)| seq).max(first),
        pinned_by: pinned.into_iter().map(|(seq, g)| (g, seq)).collect(),
    }
}

/// Deletes segments `from..to`, oldest first, then makes the deletions
/// durable. Oldest first means an interrupted purge still leaves a
/// contiguous run of segments, which recovery requires.
pub(crate) async fn delete_segments(wal_dir: &Path, from: u64, to: u64) -> Result<u64, WalError> {
    let mut deleted = 0;
    for seq in from..to {
        let path = wal_dir.join(segment_name(seq));
        glommio::io::remove(&path)
            .await
            .map_err(|e| glommio_err("remove", &path, e))?;
        deleted += 1;
    }
    if deleted > 0 {
        sync_dir(wal_dir).await?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(runs: &[(u64, u64, u64)]) -> GroupMeta {
        let mut m = GroupMeta::default();
        for &(first, last, seq) in runs {
            m.on_entries(first, last, seq);
        }
        m
    }

    #[test]
    fn oldest_needed_segment_wins() {
        let mut groups = BTreeMap::new();
        groups.insert(1, group(&[(1, 10, 2), (11, 20, 4)]));
        groups.insert(2, group(&[(1, 10, 3)]));
        assert_eq!(
            plan(1, 5, &groups),
            Plan {
                keep_from: 2,
                pinned_by: vec![(1, 2), (2, 3)]
            }
        );
        groups.get_mut(&1).unwrap().on_compact(10);
        assert_eq!(
            plan(1, 5, &groups),
            Plan {
                keep_from: 3,
                pinned_by: vec![(2, 3), (1, 4)]
            }
        );
        groups.get_mut(&2).unwrap().on_compact(10);
        assert_eq!(
            plan(1, 5, &groups),
            Plan {
                keep_from: 4,
                pinned_by: vec![(1, 4)]
            }
        );
    }

    #[test]
    fn nothing_pinned_purges_up_to_limit() {
        let mut groups = BTreeMap::new();
        groups.insert(1, group(&[]));
        groups.insert(2, group(&[(1, 10, 6)]));
        assert_eq!(
            plan(1, 5, &groups),
            Plan {
                keep_from: 5,
                pinned_by: vec![]
            }
        );
        assert_eq!(plan(7, 5, &groups).keep_from, 7);
    }

    #[test]
    fn every_group_on_an_old_segment_is_named_oldest_first_up_to_a_bound() {
        // Thousands of idle groups whose only entries share segment 1 (as
        // after a Bootstrap): naming one per purge would keep segment 1
        // for thousands of purges.
        let mut groups = BTreeMap::new();
        for g in 0..1000 {
            groups.insert(g, group(&[(2, 2, 1 + g % 2)]));
        }
        let p = plan(1, 3, &groups);
        assert_eq!(p.keep_from, 1);
        assert_eq!(p.pinned_by.len(), MAX_PINNING);
        assert!(p.pinned_by.iter().all(|&(_, seq)| seq == 1));
        assert!(p.pinned_by.windows(2).all(|w| w[0] < w[1]));
    }
}
