//! Snapshots in the log: inline ones, pack files, their replacement and
//! deletion, damage, and crashes between a pack and the records naming it.

use super::*;

#[test]
fn snapshot_from_a_diverged_history_drops_later_entries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(move || async move {
        {
            let (mut wal, _) = Wal::open(d.clone(), small()).await.unwrap();
            wal.append_entries(1, &entries(1, 10, 1, 4));
            // The leader's snapshot at 6 has term 3: our 6.. is stale.
            wal.save_snapshot(1, &snapshot(6, 3, b"s"));
            wal.sync().await.unwrap();
        }
        let (mut wal, rec) = Wal::open(d.clone(), small()).await.unwrap();
        assert!(rec.groups[&1].entries.is_empty());
        wal.append_entries(1, &entries(7, 8, 3, 4));
        wal.sync().await.unwrap();
        drop(wal);
        let (_wal, rec) = Wal::open(d.clone(), small()).await.unwrap();
        assert_eq!(indexes(&rec.groups[&1]), vec![7, 8]);
    });
}

#[test]
fn snapshots_replace_old_files_and_remove_group_forgets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(move || async move {
        {
            let (mut wal, _) = Wal::open(d.clone(), small()).await.unwrap();
            wal.append_entries(1, &entries(1, 5, 1, 8));
            wal.save_snapshot(1, &snapshot(2, 1, &file_data(b"two")));
            wal.sync().await.unwrap();
            assert_eq!(snap_files(&d).len(), 1);
            wal.save_snapshot(1, &snapshot(4, 1, &file_data(b"four")));
            // The new file is written by the sync, before its record; the
            // old one goes once that record is durable.
            assert_eq!(snap_files(&d).len(), 1);
            wal.sync().await.unwrap();
            assert_eq!(snap_files(&d).len(), 1);

            wal.append_entries(2, &entries(1, 1, 1, 8));
            wal.save_snapshot(2, &snapshot(1, 1, &file_data(b"g2")));
            wal.sync().await.unwrap();
            assert_eq!(snap_files(&d).len(), 2);
            wal.remove_group(2);
            wal.sync().await.unwrap();
            assert_eq!(snap_files(&d).len(), 1);
        }
        // A stray snapshot file (crash before its record was synced) goes.
        std::fs::write(
            d.join("snap").join(snapshot::snapshot_name(1, 9, 999)),
            b"junk",
        )
        .unwrap();
        let (_wal, rec) = Wal::open(d.clone(), small()).await.unwrap();
        assert!(!rec.groups.contains_key(&2));
        let g1 = &rec.groups[&1];
        assert_eq!(g1.snapshot.as_ref().unwrap().get_data(), file_data(b"four"));
        assert_eq!(indexes(g1), vec![5]);
        assert_eq!(snap_files(&d).len(), 1);
    });
}

#[test]
fn damaged_snapshot_file_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(move || async move {
        {
            let (mut wal, _) = Wal::open(d.clone(), small()).await.unwrap();
            wal.save_snapshot(1, &snapshot(3, 1, &[9u8; 5000]));
            wal.sync().await.unwrap();
        }
        let name = snap_files(&d).pop().unwrap();
        let path = d.join("snap").join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3000] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        match Wal::open(d.clone(), small()).await {
            Err(WalError::Corruption { path: p, .. }) => assert_eq!(p, path),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("corruption went unnoticed"),
        }
    });
}

/// Crash after a snapshot's file is durable but before the log records
/// that name it (and the compaction that relies on it): recovery has the
/// old state, the stray file is removed, the log is whole.
#[cfg(feature = "failpoints")]
#[test]
fn crash_between_snapshot_file_and_its_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(move || async move {
        {
            let (mut wal, _) = Wal::open(d.clone(), small()).await.unwrap();
            wal.save_snapshot(1, &snapshot(5, 1, &file_data(b"state@5")));
            for i in 6..=30 {
                wal.append_entries(1, &entries(i, i, 1, 3000));
                wal.sync().await.unwrap();
            }
            wal.save_snapshot(1, &snapshot(25, 1, &file_data(b"state@25")));
            wal.compact(1, 20);
            assert!(failpoints::set(
                "wal::sync::crash_after_snapshot_files",
                true
            ));
            let res = wal.sync().await;
            failpoints::set("wal::sync::crash_after_snapshot_files", false);
            assert!(matches!(res, Err(WalError::Io { .. })), "{res:?}");
            assert_eq!(snap_files(&d).len(), 2, "new file written before the crash");
            assert!(matches!(wal.purge().await, Err(WalError::Poisoned { .. })));
        }
        let (_wal, rec) = Wal::open(d.clone(), small()).await.unwrap();
        let g = &rec.groups[&1];
        assert_eq!(
            g.snapshot.as_ref().unwrap().get_data(),
            file_data(b"state@5")
        );
        assert_eq!(indexes(g), (6..=30).collect::<Vec<_>>());
        assert_eq!(snap_files(&d).len(), 1, "the unreferenced file is removed");
    });
}

/// A small snapshot (a new replica's first) lives inside the log: no file,
/// and it survives a restart, a segment roll with purge (the checkpoint
/// repeats it), replacement by a file snapshot and group removal.
#[test]
fn small_snapshots_live_inside_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(move || async move {
        {
            let (mut wal, _) = Wal::open(d.clone(), small()).await.unwrap();
            for g in 1..=100 {
                wal.set_conf_state(g, &conf_state(&[1, 2, 3]));
                wal.save_snapshot(g, &snapshot(5, 5, b""));
            }
            wal.sync().await.unwrap();
            assert_eq!(snap_files(&d), Vec::<String>::new(), "no file per snapshot");
            assert_eq!(wal.stats().syncs, 1);
        }
        {
            let (mut wal, rec) = Wal::open(d.clone(), small()).await.unwrap();
            assert_eq!(rec.groups.len(), 100);
            for g in rec.groups.values() {
                assert_eq!(g.snapshot.as_ref().unwrap(), &snapshot(5, 5, b""));
            }
            // Fill several segments with group 1's log, then purge: the
            // segment that held the inline records goes, the checkpoints
            // carry them on.
            for i in 6..=60 {
                wal.append_entries(1, &entries(i, i, 5, 3000));
                wal.sync().await.unwrap();
            }
            wal.save_snapshot(1, &snapshot(60, 5, &file_data(b"state@60")));
            wal.compact(1, 60);
            wal.remove_group(100);
            wal.sync().await.unwrap();
            wal.purge().await.unwrap();
            assert!(wal.stats().segments_purged > 0);
            assert_eq!(snap_files(&d).len(), 1, "only group 1's big snapshot");
        }
        let (_wal, rec) = Wal::open(d.clone(), small()).await.unwrap();
        assert_eq!(rec.groups.len(), 99);
        assert_eq!(
            rec.groups[&1].snapshot.as_ref().unwrap().get_data(),
            file_data(b"state@60")
        );
        assert_eq!(
            rec.groups[&2].snapshot.as_ref().unwrap(),
            &snapshot(5, 5, b"")
        );
        assert_eq!(rec.groups[&99].conf_state, conf_state(&[1, 2, 3]));
    });
}

#[test]
fn snapshots_of_one_sync_share_a_pack_that_goes_with_its_last_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(move || async move {
        {
            let (mut wal, _) = Wal::open(d.clone(), small()).await.unwrap();
            for g in 1..=3 {
                wal.append_entries(g, &entries(1, 5, 1, 8));
                wal.save_snapshot(g, &snapshot(3, 1, &file_data(format!("g{g}@3").as_bytes())));
            }
            wal.sync().await.unwrap();
            let first = snap_files(&d);
            assert_eq!(first.len(), 1, "one pack for the sync: {first:?}");

            // Two of them move on: their old snapshots are dead, but the
            // third keeps the first pack.
            for g in 1..=2 {
                wal.save_snapshot(g, &snapshot(4, 1, &file_data(format!("g{g}@4").as_bytes())));
            }
            wal.sync().await.unwrap();
            assert_eq!(snap_files(&d).len(), 2);
        }
        {
            let (mut wal, rec) = Wal::open(d.clone(), small()).await.unwrap();
            for (g, want) in [(1, "g1@4"), (2, "g2@4"), (3, "g3@3")] {
                let s = rec.groups[&g].snapshot.as_ref().unwrap();
                assert_eq!(s.get_data(), file_data(want.as_bytes()), "group {g}");
            }
            assert_eq!(indexes(&rec.groups[&3]), vec![4, 5]);
            assert_eq!(snap_files(&d).len(), 2);
            // The last snapshot in the first pack is replaced: it goes.
            let first = snap_files(&d)[0].clone();
            wal.save_snapshot(3, &snapshot(5, 1, &file_data(b"g3@5")));
            wal.sync().await.unwrap();
            let now = snap_files(&d);
            assert_eq!(now.len(), 2);
            assert!(!now.contains(&first), "{first} should be gone: {now:?}");
        }
        let (_wal, rec) = Wal::open(d.clone(), small()).await.unwrap();
        let s = rec.groups[&3].snapshot.as_ref().unwrap();
        assert_eq!(s.get_data(), file_data(b"g3@5"));
    });
}

#[test]
fn a_snapshot_written_again_at_its_index_moves_to_a_new_pack() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(move || async move {
        {
            let (mut wal, _) = Wal::open(d.clone(), small()).await.unwrap();
            wal.append_entries(1, &entries(1, 6, 1, 8));
            wal.save_snapshot(1, &snapshot(4, 1, &file_data(b"same")));
            wal.compact(1, 4);
            wal.sync().await.unwrap();
            let old = snap_files(&d);
            // Relocation: the same snapshot again, as a group with nothing
            // applied since writes it.
            wal.save_snapshot(1, &snapshot(4, 1, &file_data(b"same")));
            wal.compact(1, 4);
            wal.sync().await.unwrap();
            let new = snap_files(&d);
            assert_eq!(new.len(), 1);
            assert_ne!(old, new);
        }
        let (_wal, rec) = Wal::open(d.clone(), small()).await.unwrap();
        let g = &rec.groups[&1];
        assert_eq!(g.snapshot.as_ref().unwrap().get_data(), file_data(b"same"));
        // Entries after the snapshot survive: the log holds index 4 at the
        // snapshot's term.
        assert_eq!(indexes(g), vec![5, 6]);
    });
}

#[test]
fn a_pack_emptied_before_its_sync_still_serves_snapshots_added_after() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(move || async move {
        {
            let (mut wal, _) = Wal::open(d.clone(), small()).await.unwrap();
            // Group 1's snapshot is the pack's only one, then is dropped
            // with its group; group 2's goes into the same pack afterwards.
            wal.save_snapshot(1, &snapshot(3, 1, &file_data(b"g1")));
            wal.remove_group(1);
            wal.save_snapshot(2, &snapshot(5, 1, &file_data(b"g2")));
            wal.sync().await.unwrap();
            assert_eq!(snap_files(&d).len(), 1);
            // A pack whose every snapshot went before the sync goes after it.
            wal.save_snapshot(3, &snapshot(2, 1, &file_data(b"g3")));
            wal.remove_group(3);
            wal.sync().await.unwrap();
            assert_eq!(snap_files(&d).len(), 1);
        }
        let (_wal, rec) = Wal::open(d.clone(), small()).await.unwrap();
        assert!(!rec.groups.contains_key(&1) && !rec.groups.contains_key(&3));
        let s = rec.groups[&2].snapshot.as_ref().unwrap();
        assert_eq!(s.get_data(), file_data(b"g2"));
    });
}
