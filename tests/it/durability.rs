//! Durability across crashes and restarts (DESIGN §3 WAL, §4 guarantees).
//!
//! Covers: kill -9 of a node at random moments under a write load and its
//! restart from the same data dir (no acknowledged write lost, the node
//! catches up); a restart of the whole cluster without a new Bootstrap
//! (layout and data recovered); a flipped byte in the middle of a WAL
//! segment (the node refuses to start, naming the file and offset); a
//! node joined after log compaction catching up from a snapshot; and old
//! segments let go although hundreds of idle partitions have entries in
//! them.

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;

use crate::pb::atomix::multiraft::v1::JoinRequest;
use crate::pb::multiraft::kv::v1::DeleteRequest;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_restarts_with_every_acknowledged_write() {
    let mut cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    let partitions = [1, 2, 3];
    cluster.bootstrap(&cluster.layout(partitions)).await;

    let mut clients = Vec::new();
    for node in &cluster.nodes {
        clients.push(node.kv().await);
    }
    let load = WriteLoad::start(&clients, &partitions, 4, "crash");
    let mut rng = rand::thread_rng();
    for round in 1..=3u64 {
        // Let the load run, then kill at a random moment within it.
        load.wait_progress(&partitions, 20, Duration::from_secs(20))
            .await;
        let victim = rng.gen_range(1..=3u64);
        let delay = Duration::from_millis(rng.gen_range(0..400));
        tokio::time::sleep(delay).await;
        note(format!(
            "round {round}: kill -9 node {victim} after {} acknowledged writes",
            load.acked_count()
        ));
        cluster.node_mut(victim).kill9();
        // The survivors keep acknowledging while it is down.
        load.wait_progress(&partitions, 20, Duration::from_secs(20))
            .await;
        cluster.node_mut(victim).restart().await;
        // Back in the game: it follows a leader for each partition.
        for &p in &partitions {
            cluster.wait_leader(p, Duration::from_secs(15)).await;
        }
    }
    load.wait_progress(&partitions, 20, Duration::from_secs(20))
        .await;
    let (acked, errors) = load.stop().await;
    note(format!(
        "{} writes acknowledged, {errors} failed",
        acked.len()
    ));

    for &p in &partitions {
        cluster.wait_caught_up(p, Duration::from_secs(20)).await;
    }
    for node in &cluster.nodes {
        // Local state (serializable) once caught up, and linearizable reads.
        assert_all_readable(node, &acked, true).await;
        assert_all_readable(node, &acked, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_without_bootstrap() {
    let mut cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    let partitions: Vec<u32> = (1..=4).collect();
    let layout = cluster.layout(partitions.clone());
    cluster.bootstrap(&layout).await;

    let mut kv = cluster.node(1).kv().await;
    let mut acked = Vec::new();
    for i in 0..200u32 {
        let p = partitions[i as usize % partitions.len()];
        let key = format!("restart-{i}").into_bytes();
        let value = format!("value-{i}").into_bytes();
        put(&mut kv, p, &key, &value).await;
        acked.push((p, key, value));
    }
    // Some deletes, which must stay deleted.
    let mut deleted = Vec::new();
    for (p, key, _) in acked.iter().step_by(10) {
        kv.delete(req(
            DeleteRequest {
                key: key.clone(),
                partition_id: *p,
            },
            KV_TIMEOUT,
        ))
        .await
        .unwrap_or_else(|s| panic!("Delete: {s:?}"));
        deleted.push((*p, key.clone()));
    }
    let gone: BTreeSet<Vec<u8>> = deleted.iter().map(|(_, k)| k.clone()).collect();
    acked.retain(|(_, k, _)| !gone.contains(k));

    for node in &mut cluster.nodes {
        node.kill9();
    }
    for node in &mut cluster.nodes {
        node.start();
    }
    for node in &mut cluster.nodes {
        node.wait_ready().await;
    }

    // No Bootstrap: the layout comes back from disk.
    for node in &cluster.nodes {
        let s = node.status().await.unwrap();
        assert!(s.bootstrapped, "node {} forgot its Bootstrap", node.id);
        let hosted: Vec<u32> = s.partitions.iter().map(|p| p.partition_id).collect();
        assert_eq!(
            hosted.iter().copied().collect::<BTreeSet<_>>(),
            partitions.iter().copied().collect::<BTreeSet<_>>(),
            "node {} partitions after restart",
            node.id
        );
    }
    for &p in &partitions {
        cluster.wait_leader(p, Duration::from_secs(15)).await;
    }
    for node in &cluster.nodes {
        assert_all_readable(node, &acked, false).await;
        let mut kv = node.kv().await;
        for (p, key) in &deleted {
            assert_eq!(
                get(&mut kv, *p, key, false).await,
                None,
                "deleted {} is back on node {}",
                String::from_utf8_lossy(key),
                node.id
            );
        }
    }

    // Bootstrap with the same layout after the restart is still a no-op,
    // and the cluster takes new writes.
    cluster.bootstrap(&layout).await;
    let mut kv = cluster.node(2).kv().await;
    put(&mut kv, 1, b"after-restart", b"ok").await;
    assert_eq!(
        get(&mut kv, 1, b"after-restart", false).await.as_deref(),
        Some(&b"ok"[..])
    );
}

/// Every WAL segment of a stopped node: `DATA_DIR/shard-*/wal/*.wal`.
fn wal_segments(data_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let shards =
        std::fs::read_dir(data_dir).unwrap_or_else(|e| panic!("read {}: {e}", data_dir.display()));
    for shard in shards {
        let shard = shard.unwrap().path();
        let is_shard = shard
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("shard-"));
        if !is_shard {
            continue;
        }
        let Ok(wal) = std::fs::read_dir(shard.join("wal")) else {
            continue;
        };
        for f in wal {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "wal") {
                out.push(f);
            }
        }
    }
    out.sort();
    out
}

/// Length of the written part of a (possibly preallocated, zero-filled)
/// segment: one past its last nonzero byte.
fn written_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_wal_segment_refuses_to_start() {
    let mut cluster = Cluster::start(3, 1, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout([1])).await;
    let mut kv = cluster.node(1).kv().await;
    let value = vec![b'x'; 200];
    for i in 0..500 {
        put(&mut kv, 1, format!("corrupt-{i}").as_bytes(), &value).await;
    }
    cluster.wait_caught_up(1, Duration::from_secs(15)).await;

    // Node 3, stopped cleanly.
    let victim = 3;
    cluster
        .node_mut(victim)
        .terminate(Duration::from_secs(15))
        .await;
    let data_dir = cluster.node(victim).data_dir.clone();
    let segments = wal_segments(&data_dir);
    assert!(
        !segments.is_empty(),
        "no WAL segment under {}/shard-*/wal/",
        data_dir.display()
    );

    // The segment with the most written bytes; flip a nonzero byte in the
    // middle of its written region, so that intact records follow it (a
    // damaged tail could legitimately be treated as a torn write).
    let (segment, bytes) = segments
        .iter()
        .map(|p| (p.clone(), std::fs::read(p).unwrap()))
        .max_by_key(|(_, b)| written_len(b))
        .unwrap();
    let written = written_len(&bytes);
    assert!(
        written >= 16 * 1024,
        "{}: only {written} bytes written after 500 x 200-byte Puts",
        segment.display()
    );
    let start = (written / 2).max(4096);
    let offset = (start..written * 3 / 4)
        .find(|&i| bytes[i] != 0)
        .unwrap_or_else(|| {
            panic!(
                "no nonzero byte in [{start}, {}) of {}",
                written * 3 / 4,
                segment.display()
            )
        });
    let original = bytes[offset];
    note(format!(
        "flipping byte {offset} (0x{original:02x}) of {} ({written} bytes written)",
        segment.display()
    ));
    let mut f = open_rw(&segment);
    f.seek(SeekFrom::Start(offset as u64)).unwrap();
    f.write_all(&[original ^ 0xff]).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let log_len_before = cluster.node(victim).log().len();
    cluster.node_mut(victim).start();
    let status = cluster
        .node_mut(victim)
        .wait_exit(Duration::from_secs(20))
        .await;
    assert!(
        !status.success(),
        "node started on a corrupted WAL and exited with {status}"
    );
    let log = cluster.node(victim).log();
    let run_log = &log[log_len_before.min(log.len())..];
    let file_name = segment.file_name().unwrap().to_string_lossy().to_string();
    // One error line names both the segment and an offset (so that routine
    // start-up lines mentioning the segment do not satisfy the check).
    assert!(
        run_log
            .lines()
            .any(|l| l.contains(&file_name) && l.to_lowercase().contains("offset")),
        "no line names the segment {file_name} and an offset:\n{run_log}"
    );

    // Undo the damage: the node starts and has everything.
    let mut f = open_rw(&segment);
    f.seek(SeekFrom::Start(offset as u64)).unwrap();
    let mut b = [0u8];
    f.read_exact(&mut b).unwrap();
    assert_eq!(
        b[0],
        original ^ 0xff,
        "the refused start rewrote the damaged byte"
    );
    f.seek(SeekFrom::Start(offset as u64)).unwrap();
    f.write_all(&[original]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    cluster.node_mut(victim).restart().await;
    cluster.wait_caught_up(1, Duration::from_secs(15)).await;
    let mut kv3 = cluster.node(victim).kv().await;
    for i in (0..500).step_by(7) {
        assert_eq!(
            get(&mut kv3, 1, format!("corrupt-{i}").as_bytes(), true)
                .await
                .as_deref(),
            Some(value.as_slice()),
            "corrupt-{i} after repair"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_joined_after_compaction_catches_up_from_snapshot() {
    let config = concat!(
        r#"{"heartbeatPeriod":"0.05s","electionTimeout":"0.5s","#,
        r#""snapshotEntryThreshold":"200","compactionRetainEntries":"50"}"#
    );
    let mut cluster = Cluster::start(3, 1, Some(config)).await;
    let layout = cluster.layout([1]);
    cluster.bootstrap(&layout).await;

    let mut kv = cluster.node(1).kv().await;
    let mut acked = Vec::new();
    for i in 0..1000u32 {
        let key = format!("snap-{i}").into_bytes();
        let value = format!("value-{i}").into_bytes();
        put(&mut kv, 1, &key, &value).await;
        acked.push((1, key, value));
    }
    // Every replica has compacted: the log no longer starts at index 1, so a
    // new replica cannot be caught up from the log alone.
    wait_for(
        Duration::from_secs(15),
        "snapshots on every replica",
        async || {
            for id in 1..=3 {
                let p = cluster.node(id).partition_status(1).await?;
                if p.snapshot_index < 200 {
                    return Err(format!("node {id} snapshot_index {}", p.snapshot_index));
                }
            }
            Ok(())
        },
    )
    .await;
    let (leader, _) = cluster.wait_leader(1, Duration::from_secs(10)).await;
    let commit = cluster
        .node(leader)
        .partition_status(1)
        .await
        .unwrap()
        .commit_index;

    let id4 = cluster.add_node();
    cluster.node_mut(id4).start();
    cluster.node_mut(id4).wait_ready().await;
    cluster.bootstrap_nodes(&[id4], &layout).await;
    let join = JoinRequest {
        partition: Some(cluster.partition(1, &[1, 2, 3, 4])),
    };
    let mut client4 = cluster.node(id4).node_client().await;
    if let Err(s) = client4.join(req(join, CONTROL_TIMEOUT)).await {
        panic!("Join: {:?} {}", s.code(), s.message());
    }

    let p4 = cluster.node(id4).partition_status(1).await.unwrap();
    assert!(
        p4.applied_index >= commit,
        "node 4 applied {} < commit {commit} when Join returned",
        p4.applied_index
    );
    assert!(
        p4.snapshot_index > 0,
        "node 4 caught up without a snapshot (snapshot_index 0) although the log was compacted"
    );
    assert_all_readable(cluster.node(id4), &acked, true).await;

    // The snapshot-installed replica survives its own restart.
    cluster.node_mut(id4).kill9();
    cluster.node_mut(id4).restart().await;
    cluster.wait_caught_up(1, Duration::from_secs(15)).await;
    assert_all_readable(cluster.node(id4), &acked, true).await;
}

/// Many idle partitions each keep an entry in the first segment (their
/// leader's first entry). The log must still let old segments go while one
/// busy partition fills new ones: idle groups are asked to snapshot, and do
/// so although nothing else happens to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_partitions_do_not_keep_old_segments() {
    let config = concat!(
        r#"{"heartbeatPeriod":"0.05s","electionTimeout":"0.5s","#,
        r#""snapshotEntryThreshold":"8","compactionRetainEntries":"2"}"#
    );
    let args = |_| vec!["--wal-segment-mib".to_string(), "1".to_string()];
    let mut cluster = Cluster::start_with(1, 1, Some(config), args).await;
    let layout = cluster.layout(1..=300);
    cluster.bootstrap(&layout).await;

    // About 4 MiB into 1 MiB segments, all on partition 1.
    let mut kv = cluster.node(1).kv().await;
    let value = vec![0x5au8; 64 << 10];
    for i in 0..64u32 {
        put(&mut kv, 1, format!("big-{i}").as_bytes(), &value).await;
    }
    let data_dir = cluster.node(1).data_dir.clone();
    wait_for(
        Duration::from_secs(30),
        "old WAL segments purged",
        async || {
            let segments = wal_segments(&data_dir);
            // The active segment, and the one before it until the active
            // one's checkpoint is durable.
            if segments.len() <= 2 {
                Ok(())
            } else {
                Err(format!("{} segments: {segments:?}", segments.len()))
            }
        },
    )
    .await;
    // Compared by length and content without printing 64 KiB on failure.
    let intact = |got: Option<Vec<u8>>| got.is_some_and(|v| v == value);
    for i in [0u32, 31, 63] {
        let got = get(&mut kv, 1, format!("big-{i}").as_bytes(), false).await;
        assert!(intact(got), "big-{i} before the restart");
    }
    // And the state survives a restart from what is left (linearizable
    // reads: they wait for the replayed log to be applied).
    cluster.node_mut(1).kill9();
    cluster.node_mut(1).restart().await;
    let mut kv = cluster.node(1).kv().await;
    cluster.wait_leader(1, Duration::from_secs(15)).await;
    for i in 0..64u32 {
        let got = get(&mut kv, 1, format!("big-{i}").as_bytes(), false).await;
        assert!(intact(got), "big-{i} after the restart");
    }
}
