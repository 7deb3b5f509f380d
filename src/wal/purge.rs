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

/// Outcome of planning a purge.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Segments `first..keep_from` can be deleted.
    pub keep_from: u64,
    /// The group holding back the purge, with the segment it needs, when it
    /// prevents deleting at least one segment.
    pub pinned_by: Option<(u64, u64)>,
}

/// Plans a purge of segments `first..limit`: `limit` is the oldest segment
/// that must stay regardless of entries (the active one, or the one before
/// it while the active one's checkpoint is not durable yet).
pub(crate) fn plan(first: u64, limit: u64, groups: &BTreeMap<u64, GroupMeta>) -> Plan {
    let oldest_needed = groups
        .iter()
        .filter_map(|(&g, m)| m.runs.first_segment().map(|seq| (seq, g)))
        .min();
    match oldest_needed {
        Some((seq, g)) if seq < limit => Plan {
            keep_from: seq.max(first),
            pinned_by: Some((g, seq)),
        },
        _ => Plan {
            keep_from: limit.max(first),
            pinned_by: None,
        },
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
                pinned_by: Some((1, 2))
            }
        );
        groups.get_mut(&1).unwrap().on_compact(10);
        assert_eq!(
            plan(1, 5, &groups),
            Plan {
                keep_from: 3,
                pinned_by: Some((2, 3))
            }
        );
        groups.get_mut(&2).unwrap().on_compact(10);
        assert_eq!(
            plan(1, 5, &groups),
            Plan {
                keep_from: 4,
                pinned_by: Some((1, 4))
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
                pinned_by: None
            }
        );
        assert_eq!(plan(7, 5, &groups).keep_from, 7);
    }
}
