//! The replicated key-value data plane (`multiraft.kv.v1.KV`, DESIGN §2).
//!
//! Covers: Put/Get/Delete/CompareAndSwap round trips on every partition
//! through every node; linearizable reads on followers; `partition_id = 0`
//! hash routing (the documented crc32c rule, identical on every node);
//! forwarding by a node that does not host the partition; key and value size
//! limits; unknown partitions; acknowledged writes surviving a leader kill
//! under concurrent load; and `multiraft bench` end to end.

use std::collections::BTreeSet;
use std::time::Duration;

use tonic::Code;

use crate::pb::multiraft::kv::v1::{CompareAndSwapRequest, DeleteRequest, GetRequest, PutRequest};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_on_every_partition_through_every_node() {
    let cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    let partitions: Vec<u32> = (1..=4).collect();
    cluster.bootstrap(&cluster.layout(partitions.clone())).await;

    let mut clients = Vec::new();
    for node in &cluster.nodes {
        clients.push(node.kv().await);
    }

    for via in 0..clients.len() {
        for &p in &partitions {
            let key = format!("rt-{p}-via-{}", via + 1).into_bytes();
            let what = format!("partition {p} via node {}", via + 1);
            let kv = &mut clients[via];

            // Put on an absent key.
            let r = kv
                .put(req(
                    PutRequest {
                        key: key.clone(),
                        value: b"v1".to_vec(),
                        partition_id: p,
                    },
                    KV_TIMEOUT,
                ))
                .await
                .unwrap_or_else(|s| panic!("{what}: Put: {s:?}"))
                .into_inner();
            assert_eq!(r.partition_id, p, "{what}");
            assert_eq!(r.previous, None, "{what}: fresh key had a previous value");
            assert!(r.index > 0, "{what}: Put index 0");
            let first_index = r.index;

            // Overwrite returns the previous value at a later index.
            let r = kv
                .put(req(
                    PutRequest {
                        key: key.clone(),
                        value: b"v2".to_vec(),
                        partition_id: p,
                    },
                    KV_TIMEOUT,
                ))
                .await
                .unwrap_or_else(|s| panic!("{what}: Put: {s:?}"))
                .into_inner();
            assert_eq!(r.previous.as_deref(), Some(&b"v1"[..]), "{what}");
            assert!(
                r.index > first_index,
                "{what}: index {} after {first_index}",
                r.index
            );

            // Every node reads it (linearizable by default).
            for (i, reader) in clients.iter_mut().enumerate() {
                let g = reader
                    .get(req(
                        GetRequest {
                            key: key.clone(),
                            partition_id: p,
                            serializable: false,
                        },
                        KV_TIMEOUT,
                    ))
                    .await
                    .unwrap_or_else(|s| panic!("{what}: Get via node {}: {s:?}", i + 1))
                    .into_inner();
                assert!(g.found, "{what}: not found via node {}", i + 1);
                assert_eq!(g.value, b"v2", "{what}: via node {}", i + 1);
                assert_eq!(g.partition_id, p);
                assert!(
                    g.index >= r.index,
                    "{what}: read at {} before write {}",
                    g.index,
                    r.index
                );
            }

            let kv = &mut clients[via];
            let cas = |expected: Option<&[u8]>, value: &[u8]| CompareAndSwapRequest {
                key: key.clone(),
                expected: expected.map(|e| e.to_vec()),
                value: value.to_vec(),
                partition_id: p,
            };
            // Wrong expectation: no change, current value returned.
            let c = kv
                .compare_and_swap(req(cas(Some(b"nope"), b"v3"), KV_TIMEOUT))
                .await
                .unwrap()
                .into_inner();
            assert!(
                !c.succeeded,
                "{what}: CAS with a wrong expected value succeeded"
            );
            assert_eq!(c.current.as_deref(), Some(&b"v2"[..]), "{what}");
            assert_eq!(c.partition_id, p);
            // "Must be absent" on an existing key fails too.
            let c = kv
                .compare_and_swap(req(cas(None, b"v3"), KV_TIMEOUT))
                .await
                .unwrap()
                .into_inner();
            assert!(
                !c.succeeded,
                "{what}: CAS expecting absence succeeded on an existing key"
            );
            assert_eq!(c.current.as_deref(), Some(&b"v2"[..]), "{what}");
            // Right expectation swaps.
            let c = kv
                .compare_and_swap(req(cas(Some(b"v2"), b"v3"), KV_TIMEOUT))
                .await
                .unwrap()
                .into_inner();
            assert!(
                c.succeeded,
                "{what}: CAS with the right expected value failed"
            );
            assert_eq!(c.current.as_deref(), Some(&b"v2"[..]), "{what}");
            assert_eq!(
                get(kv, p, &key, false).await.as_deref(),
                Some(&b"v3"[..]),
                "{what}"
            );

            // Delete returns the previous value; then the key is gone.
            let d = kv
                .delete(req(
                    DeleteRequest {
                        key: key.clone(),
                        partition_id: p,
                    },
                    KV_TIMEOUT,
                ))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(d.previous.as_deref(), Some(&b"v3"[..]), "{what}");
            assert_eq!(d.partition_id, p);
            for (i, reader) in clients.iter_mut().enumerate() {
                assert_eq!(
                    get(reader, p, &key, false).await,
                    None,
                    "{what}: deleted key via node {}",
                    i + 1
                );
            }
            let kv = &mut clients[via];
            let d = kv
                .delete(req(
                    DeleteRequest {
                        key: key.clone(),
                        partition_id: p,
                    },
                    KV_TIMEOUT,
                ))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(d.previous, None, "{what}: second Delete");

            // CAS expecting absence on an absent key creates it.
            let c = kv
                .compare_and_swap(req(cas(None, b"v4"), KV_TIMEOUT))
                .await
                .unwrap()
                .into_inner();
            assert!(
                c.succeeded,
                "{what}: CAS expecting absence failed on an absent key"
            );
            assert_eq!(c.current, None, "{what}");
            assert_eq!(
                get(kv, p, &key, false).await.as_deref(),
                Some(&b"v4"[..]),
                "{what}"
            );
        }
    }

    // Partitions are separate maps: the same key in two partitions.
    let kv = &mut clients[0];
    put(kv, 1, b"shared", b"one").await;
    put(kv, 2, b"shared", b"two").await;
    assert_eq!(
        get(kv, 1, b"shared", false).await.as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(
        get(kv, 2, b"shared", false).await.as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(get(kv, 3, b"shared", false).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_reads_see_acknowledged_writes() {
    let cluster = Cluster::start(3, 1, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=2)).await;
    let (leader, _) = cluster.wait_leader(1, Duration::from_secs(10)).await;
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();

    let mut kv_leader = cluster.node(leader).kv().await;
    let mut kv_f = Vec::new();
    for &f in &followers {
        kv_f.push(cluster.node(f).kv().await);
    }
    for i in 0..40u32 {
        let key = format!("lin-{i}").into_bytes();
        let value = format!("value-{i}").into_bytes();
        // Alternate the writer between the leader and a follower (whose
        // proposal goes through the leader), and read on the followers right
        // after the acknowledgement, without waiting.
        if i % 2 == 0 {
            put(&mut kv_leader, 1, &key, &value).await;
        } else {
            put(&mut kv_f[0], 1, &key, &value).await;
        }
        for (j, kv) in kv_f.iter_mut().enumerate() {
            assert_eq!(
                get(kv, 1, &key, false).await.as_deref(),
                Some(value.as_slice()),
                "linearizable Get of lin-{i} on follower {}",
                followers[j]
            );
        }
        // Overwrites are seen too, not just first writes.
        put(&mut kv_leader, 1, &key, b"overwritten").await;
        let last = kv_f.len() - 1;
        assert_eq!(
            get(&mut kv_f[last], 1, &key, false).await.as_deref(),
            Some(&b"overwritten"[..])
        );
    }
}

/// The crc32c placement rule from `kv.proto`.
fn expected_partition(key: &[u8], sorted_ids: &[u32]) -> u32 {
    sorted_ids[(crc32c::crc32c(key) as usize) % sorted_ids.len()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_routing_is_identical_on_every_node() {
    let cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    // Non-contiguous ids, listed out of order: routing sorts them.
    let ids = [7u32, 2, 5, 11];
    cluster.bootstrap(&cluster.layout(ids)).await;
    let mut sorted = ids.to_vec();
    sorted.sort();

    let mut clients = Vec::new();
    for node in &cluster.nodes {
        clients.push(node.kv().await);
    }
    let mut used = BTreeSet::new();
    for i in 0..48 {
        let key = format!("hash-{i}").into_bytes();
        let want = expected_partition(&key, &sorted);
        let writer = i % clients.len();
        let r = clients[writer]
            .put(req(
                PutRequest {
                    key: key.clone(),
                    value: b"h".to_vec(),
                    partition_id: 0,
                },
                KV_TIMEOUT,
            ))
            .await
            .unwrap_or_else(|s| panic!("Put hash-{i} with partition 0: {s:?}"))
            .into_inner();
        assert_eq!(
            r.partition_id,
            want,
            "Put hash-{i} via node {} routed",
            writer + 1
        );
        used.insert(r.partition_id);
        for (n, kv) in clients.iter_mut().enumerate() {
            let g = kv
                .get(req(
                    GetRequest {
                        key: key.clone(),
                        partition_id: 0,
                        serializable: false,
                    },
                    KV_TIMEOUT,
                ))
                .await
                .unwrap_or_else(|s| panic!("Get hash-{i} via node {}: {s:?}", n + 1))
                .into_inner();
            assert_eq!(
                g.partition_id,
                want,
                "Get hash-{i} via node {} routed",
                n + 1
            );
            assert!(g.found, "hash-{i} not found via node {}", n + 1);
            // Addressing the partition explicitly finds the same entry.
            assert_eq!(get(kv, want, &key, false).await.as_deref(), Some(&b"h"[..]));
        }
    }
    assert!(used.len() > 1, "48 keys all landed in {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_the_partition_forwards() {
    let cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    let mut layout = cluster.layout(1..=2);
    layout.push(cluster.partition(9, &[1, 2]));
    cluster.bootstrap(&layout).await;

    let s3 = cluster.node(3).status().await.unwrap();
    assert!(
        find_partition(&s3, 9).is_none(),
        "node 3 hosts partition 9: {:?}",
        s3.partitions
    );
    cluster.wait_leader(9, Duration::from_secs(10)).await;

    let mut kv3 = cluster.node(3).kv().await;
    let mut kv1 = cluster.node(1).kv().await;
    for i in 0..20 {
        let key = format!("fwd-{i}").into_bytes();
        let r = kv3
            .put(req(
                PutRequest {
                    key: key.clone(),
                    value: b"f".to_vec(),
                    partition_id: 9,
                },
                KV_TIMEOUT,
            ))
            .await
            .unwrap_or_else(|s| panic!("forwarded Put: {s:?}"))
            .into_inner();
        assert_eq!(r.partition_id, 9);
        assert_eq!(
            get(&mut kv3, 9, &key, false).await.as_deref(),
            Some(&b"f"[..]),
            "forwarded Get"
        );
        assert_eq!(
            get(&mut kv1, 9, &key, false).await.as_deref(),
            Some(&b"f"[..]),
            "Get on a replica"
        );
    }
    let c = kv3
        .compare_and_swap(req(
            CompareAndSwapRequest {
                key: b"fwd-0".to_vec(),
                expected: Some(b"f".to_vec()),
                value: b"g".to_vec(),
                partition_id: 9,
            },
            KV_TIMEOUT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(c.succeeded, "forwarded CAS");
    let d = kv3
        .delete(req(
            DeleteRequest {
                key: b"fwd-0".to_vec(),
                partition_id: 9,
            },
            KV_TIMEOUT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.previous.as_deref(), Some(&b"g"[..]), "forwarded Delete");
    assert_eq!(get(&mut kv1, 9, b"fwd-0", false).await, None);

    // Errors travel back through the forwarding hop unchanged.
    let big_key = vec![b'k'; 64 * 1024 + 1];
    expect_code(
        kv3.put(req(
            PutRequest {
                key: big_key,
                value: vec![],
                partition_id: 9,
            },
            KV_TIMEOUT,
        ))
        .await,
        Code::InvalidArgument,
        "forwarded Put with an oversized key",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limits_and_unknown_partitions() {
    let cluster = Cluster::start(3, 1, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=2)).await;
    let mut kv = cluster.node(2).kv().await;

    let max_key = vec![b'k'; 64 * 1024];
    let max_value = vec![b'v'; 1 << 20];
    let too_long_key = vec![b'k'; 64 * 1024 + 1];
    let too_long_value = vec![b'v'; (1 << 20) + 1];

    // At the limits: accepted.
    put(&mut kv, 1, &max_key, b"at key limit").await;
    put(&mut kv, 1, b"at-value-limit", &max_value).await;
    assert_eq!(
        get(&mut kv, 1, b"at-value-limit", false)
            .await
            .map(|v| v.len()),
        Some(1 << 20)
    );

    // An empty key is not a key.
    let msg = expect_code(
        kv.put(req(
            PutRequest {
                key: Vec::new(),
                value: b"x".to_vec(),
                partition_id: 1,
            },
            KV_TIMEOUT,
        ))
        .await,
        Code::InvalidArgument,
        "Put with an empty key",
    );
    assert!(msg.contains("key must not be empty"), "{msg}");

    // Past them: INVALID_ARGUMENT for every method.
    expect_code(
        kv.put(req(
            PutRequest {
                key: too_long_key.clone(),
                value: b"x".to_vec(),
                partition_id: 1,
            },
            KV_TIMEOUT,
        ))
        .await,
        Code::InvalidArgument,
        "Put with a key over 64 KiB",
    );
    expect_code(
        kv.put(req(
            PutRequest {
                key: b"k".to_vec(),
                value: too_long_value.clone(),
                partition_id: 1,
            },
            KV_TIMEOUT,
        ))
        .await,
        Code::InvalidArgument,
        "Put with a value over 1 MiB",
    );
    expect_code(
        kv.get(req(
            GetRequest {
                key: too_long_key.clone(),
                partition_id: 1,
                serializable: false,
            },
            KV_TIMEOUT,
        ))
        .await,
        Code::InvalidArgument,
        "Get with a key over 64 KiB",
    );
    expect_code(
        kv.delete(req(
            DeleteRequest {
                key: too_long_key.clone(),
                partition_id: 1,
            },
            KV_TIMEOUT,
        ))
        .await,
        Code::InvalidArgument,
        "Delete with a key over 64 KiB",
    );
    expect_code(
        kv.compare_and_swap(req(
            CompareAndSwapRequest {
                key: b"k".to_vec(),
                expected: None,
                value: too_long_value,
                partition_id: 1,
            },
            KV_TIMEOUT,
        ))
        .await,
        Code::InvalidArgument,
        "CompareAndSwap with a value over 1 MiB",
    );
    // Rejected writes left nothing behind.
    assert_eq!(get(&mut kv, 1, b"k", false).await, None);

    // Unknown partition.
    expect_code(
        kv.put(req(
            PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                partition_id: 999,
            },
            KV_TIMEOUT,
        ))
        .await,
        Code::NotFound,
        "Put to partition 999",
    );
    expect_code(
        kv.get(req(
            GetRequest {
                key: b"k".to_vec(),
                partition_id: 999,
                serializable: true,
            },
            KV_TIMEOUT,
        ))
        .await,
        Code::NotFound,
        "Get from partition 999",
    );
    expect_code(
        kv.delete(req(
            DeleteRequest {
                key: b"k".to_vec(),
                partition_id: 999,
            },
            KV_TIMEOUT,
        ))
        .await,
        Code::NotFound,
        "Delete in partition 999",
    );
    expect_code(
        kv.compare_and_swap(req(
            CompareAndSwapRequest {
                key: b"k".to_vec(),
                expected: None,
                value: b"v".to_vec(),
                partition_id: 999,
            },
            KV_TIMEOUT,
        ))
        .await,
        Code::NotFound,
        "CompareAndSwap in partition 999",
    );
    // The node is fine afterwards.
    put(&mut kv, 2, b"still-fine", b"yes").await;
}

/// Several writers with unique keys; the leader of partition 1 is killed
/// mid-way; every acknowledged Put must be readable on the survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_leader_kill() {
    let mut cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=2)).await;
    let (victim, _) = cluster.wait_leader(1, Duration::from_secs(10)).await;

    let mut clients = Vec::new();
    for node in &cluster.nodes {
        clients.push(node.kv().await);
    }
    let load = WriteLoad::start(&clients, &[1, 2], 4, "leader-kill");
    wait_until(
        Duration::from_secs(20),
        "100 acknowledged writes before the kill",
        async || load.acked_count() >= 100,
    )
    .await;
    note(format!(
        "{} writes acknowledged; killing node {victim}, leader of partition 1",
        load.acked_count()
    ));
    cluster.node_mut(victim).kill9();

    // Keep writing until the survivors have acknowledged plenty more on both
    // partitions (partition 1 needs a new leader for that).
    load.wait_progress(&[1, 2], 50, Duration::from_secs(25))
        .await;
    let (acked, errors) = load.stop().await;
    note(format!(
        "{} writes acknowledged, {errors} failed",
        acked.len()
    ));

    assert!(!acked.is_empty());
    for id in cluster.running_ids() {
        assert_all_readable(cluster.node(id), &acked, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_end_to_end() {
    let dir = test_dir();
    let out = cli_in(
        &[
            "bench",
            "--partitions",
            "2",
            "--connections",
            "2",
            "--in-flight",
            "8",
            "--requests",
            "500",
            "--value-size",
            "64",
            "--json",
        ],
        Duration::from_secs(120),
        Some(dir.path()),
    )
    .await;
    let report = clean_bench_report(&out);
    let ops = report["ops_per_sec"]
        .as_f64()
        .unwrap_or_else(|| panic!("ops_per_sec is not a number: {report}"));
    assert!(ops > 0.0, "{report}");
}
