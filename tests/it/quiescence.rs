//! Quiescent groups: idle partitions stop ticking and heartbeating, wake
//! for work, and still fail over when their leader's node dies. (A
//! quiescent leader cut off by a network partition is in `faults`.)

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::*;

/// Waits until every partition is quiescent on every running node.
async fn wait_all_quiet(cluster: &Cluster, partitions: usize, what: &str) {
    wait_for(Duration::from_secs(30), what, async || {
        let statuses = cluster.statuses().await?;
        let awake: Vec<(u64, u32)> = statuses
            .iter()
            .flat_map(|(id, s)| {
                s.partitions
                    .iter()
                    .filter(|p| !p.quiescent)
                    .map(move |p| (*id, p.partition_id))
            })
            .collect();
        let hosted: usize = statuses.values().map(|s| s.partitions.len()).sum();
        if awake.is_empty() && hosted == partitions * statuses.len() {
            Ok(())
        } else {
            Err(format!("awake (node, partition): {awake:?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_partitions_go_quiet_and_wake_for_writes_and_reads() {
    let cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=16)).await;
    wait_all_quiet(&cluster, 16, "every partition quiescent after Bootstrap").await;

    // A write and linearizable reads through every node wake the partition
    // and are served; then it goes quiet again.
    let mut kv = cluster.node(1).kv().await;
    put(&mut kv, 5, b"k", b"v1").await;
    for id in cluster.ids() {
        let mut kv = cluster.node(id).kv().await;
        assert_eq!(
            get(&mut kv, 5, b"k", false).await.as_deref(),
            Some(&b"v1"[..]),
            "read through node {id}"
        );
    }
    wait_all_quiet(&cluster, 16, "every partition quiescent again").await;

    // The metric counts them.
    let metrics = cluster.node(1).status().await.unwrap();
    assert!(metrics.partitions.iter().all(|p| p.quiescent));
    let out = cli(
        &["status", "--addr", &cluster.node(2).api_addr.to_string()],
        Duration::from_secs(10),
    )
    .await;
    let text = output_text(&out);
    assert!(text.contains("QUIET"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiescent_partitions_fail_over_when_their_leaders_node_dies() {
    let mut cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=12)).await;
    wait_all_quiet(&cluster, 12, "every partition quiescent").await;

    let mut leads: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for p in 1..=12 {
        let (leader, _) = cluster.agreed_leader(p).await.expect("agreed leader");
        leads.entry(leader).or_default().push(p);
    }
    let (&victim, led) = leads.iter().max_by_key(|(_, v)| v.len()).unwrap();
    note(format!("kill -9 of node {victim}, which leads {led:?}"));
    cluster.node_mut(victim).kill9();

    // FAST_CONFIG's election timeout is 0.5 s: a few of them for the ping
    // silence to be noticed and an election to be won, plus slack.
    wait_for(
        Duration::from_secs(15),
        "every partition led by a live node",
        async || {
            let mut stuck = Vec::new();
            for p in 1..=12 {
                match cluster.agreed_leader(p).await {
                    Ok((l, _)) if l != victim => {}
                    other => stuck.push((p, other)),
                }
            }
            if stuck.is_empty() {
                Ok(())
            } else {
                Err(format!("{stuck:?}"))
            }
        },
    )
    .await;
    let alive = cluster.running_ids()[0];
    let mut kv = cluster.node(alive).kv().await;
    for p in led {
        put(&mut kv, *p, b"after", b"failover").await;
    }
}
