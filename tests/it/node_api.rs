//! The `atomix.multiraft.v1.Node` control API (DESIGN §1) and gRPC edge cases.
//!
//! Covers: Bootstrap of 3 nodes x 8 partitions (one agreed leader per
//! partition, voters {1,2,3} everywhere), idempotent and conflicting
//! Bootstrap, input validation (INVALID_ARGUMENT naming the field), Join and
//! Leave before Bootstrap (FAILED_PRECONDITION), the Join/Leave flow with a
//! fourth node, leader failover after kill -9, client deadlines shorter than
//! an election (DEADLINE_EXCEEDED), unknown methods (UNIMPLEMENTED),
//! oversized messages (RESOURCE_EXHAUSTED), undecodable bodies, and the
//! `bootstrap` / `status` / `join` / `leave` command line.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use prost::Message;
use tonic::Code;

use crate::pb::atomix::multiraft::v1::{
    BootstrapRequest, JoinRequest, LeaveRequest, PartitionConfig,
};
use crate::pb::multiraft::admin::v1::{Role, StatusRequest};
use crate::pb::multiraft::kv::v1::PutRequest;
use crate::support::*;

/// Every partition of `partitions` has exactly one leader that every replica
/// agrees on (same leader id and term), and all replicas report `voters`.
async fn assert_settled(cluster: &Cluster, partitions: &[u32], voters: &[u64]) {
    let want: BTreeSet<u64> = voters.iter().copied().collect();
    wait_for(
        Duration::from_secs(15),
        "every partition to have one agreed leader and the expected voters",
        async || {
            let statuses = cluster.statuses().await?;
            for &p in partitions {
                let mut leaders = Vec::new();
                let mut seen = BTreeSet::new();
                for &id in voters {
                    let s = statuses
                        .get(&id)
                        .ok_or_else(|| format!("no status from node {id}"))?;
                    let ps = find_partition(s, p)
                        .ok_or_else(|| format!("node {id} does not host partition {p}"))?;
                    let got: BTreeSet<u64> = ps.voters.iter().copied().collect();
                    if got != want {
                        return Err(format!("node {id} partition {p} voters {got:?}"));
                    }
                    if ps.role == Role::Leader as i32 {
                        leaders.push(id);
                    }
                    seen.insert((ps.leader_id, ps.term));
                }
                if leaders.len() != 1 {
                    return Err(format!("partition {p} has leaders {leaders:?}"));
                }
                if seen.len() != 1 || seen.first().map(|(l, _)| *l) != Some(leaders[0]) {
                    return Err(format!(
                        "partition {p}: leader {} but replicas report (leader, term) {seen:?}",
                        leaders[0]
                    ));
                }
            }
            Ok(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_three_nodes_eight_partitions() {
    let cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    let partitions: Vec<u32> = (1..=8).collect();
    let layout = cluster.layout(partitions.clone());

    // Not bootstrapped yet: nothing hosted.
    for node in &cluster.nodes {
        let s = node.status().await.unwrap();
        assert_eq!(s.node_id, node.id);
        assert!(
            !s.bootstrapped,
            "node {} bootstrapped before Bootstrap",
            node.id
        );
        assert!(
            s.partitions.is_empty(),
            "node {} hosts {:?}",
            node.id,
            s.partitions
        );
    }

    cluster.bootstrap(&layout).await;

    // Bootstrap returned, so every hosted partition has a leader already.
    for node in &cluster.nodes {
        let s = node.status().await.unwrap();
        assert!(s.bootstrapped, "node {} not bootstrapped", node.id);
        assert_eq!(s.shards, 2, "node {} shards", node.id);
        let hosted: BTreeSet<u32> = s.partitions.iter().map(|p| p.partition_id).collect();
        assert_eq!(
            hosted,
            partitions.iter().copied().collect(),
            "node {}",
            node.id
        );
        for p in &s.partitions {
            assert!(
                p.shard < 2,
                "node {} partition {} on shard {}",
                node.id,
                p.partition_id,
                p.shard
            );
            assert_ne!(
                p.leader_id, 0,
                "node {} partition {} has no leader after Bootstrap",
                node.id, p.partition_id
            );
        }
    }
    assert_settled(&cluster, &partitions, &[1, 2, 3]).await;

    // Same layout again: a no-op, on every node.
    cluster.bootstrap(&layout).await;

    // Conflicting layouts.
    let mut client = cluster.node(1).node_client().await;
    let mut different_members = layout.clone();
    different_members[0] = cluster.partition(1, &[1, 2]);
    expect_code(
        client
            .bootstrap(req(
                BootstrapRequest {
                    partitions: different_members,
                },
                CONTROL_TIMEOUT,
            ))
            .await,
        Code::FailedPrecondition,
        "Bootstrap with different members for partition 1",
    );
    expect_code(
        client
            .bootstrap(req(
                BootstrapRequest {
                    partitions: layout[..7].to_vec(),
                },
                CONTROL_TIMEOUT,
            ))
            .await,
        Code::FailedPrecondition,
        "Bootstrap with a smaller partition set",
    );
    let mut more = layout.clone();
    more.push(cluster.partition(9, &[1, 2, 3]));
    expect_code(
        client
            .bootstrap(req(BootstrapRequest { partitions: more }, CONTROL_TIMEOUT))
            .await,
        Code::FailedPrecondition,
        "Bootstrap with a larger partition set",
    );

    // Conflicts change nothing.
    assert_settled(&cluster, &partitions, &[1, 2, 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_rejects_invalid_input() {
    let cluster = Cluster::start(1, 1, Some(FAST_CONFIG)).await;
    let raft = cluster.node(1).raft_addr.to_string();
    let good = |id: u32| PartitionConfig {
        partition_id: id,
        members: HashMap::from([(1, raft.clone())]),
    };

    // (case, partitions, accepted words: the message must name the field)
    let cases: Vec<(&str, Vec<PartitionConfig>, &[&str])> = vec![
        ("empty partitions list", vec![], &["partitions"]),
        (
            "partition_id 0",
            vec![PartitionConfig {
                partition_id: 0,
                ..good(1)
            }],
            &["partition_id"],
        ),
        (
            "member id 0",
            vec![PartitionConfig {
                partition_id: 1,
                members: HashMap::from([(0, raft.clone())]),
            }],
            &["member"],
        ),
        (
            "empty members",
            vec![PartitionConfig {
                partition_id: 1,
                members: HashMap::new(),
            }],
            &["members"],
        ),
        (
            "unparsable address",
            vec![PartitionConfig {
                partition_id: 1,
                members: HashMap::from([(1, "not-an-address".to_string())]),
            }],
            &["addr", "members"],
        ),
        (
            "duplicate partition ids",
            vec![good(1), good(2), good(1)],
            &["partition_id", "duplicate"],
        ),
    ];

    let mut client = cluster.node(1).node_client().await;
    for (case, partitions, words) in cases {
        let msg = expect_code(
            client
                .bootstrap(req(BootstrapRequest { partitions }, CONTROL_TIMEOUT))
                .await,
            Code::InvalidArgument,
            case,
        );
        let lower = msg.to_lowercase();
        assert!(
            words.iter().any(|w| lower.contains(w)),
            "{case}: message {msg:?} names none of {words:?}"
        );
    }

    // Join and Leave before Bootstrap.
    expect_code(
        client
            .join(req(
                JoinRequest {
                    partition: Some(good(1)),
                },
                CONTROL_TIMEOUT,
            ))
            .await,
        Code::FailedPrecondition,
        "Join before Bootstrap",
    );
    expect_code(
        client
            .leave(req(LeaveRequest { partition_id: 1 }, CONTROL_TIMEOUT))
            .await,
        Code::FailedPrecondition,
        "Leave before Bootstrap",
    );

    // None of that changed the node, and it still serves.
    let s = cluster.node(1).status().await.unwrap();
    assert!(!s.bootstrapped, "rejected calls bootstrapped the node");
    assert!(
        s.partitions.is_empty(),
        "rejected calls created {:?}",
        s.partitions
    );

    // A valid single-node layout still works afterwards.
    cluster.bootstrap(&[good(1), good(2)]).await;
    let s = cluster.node(1).status().await.unwrap();
    assert!(s.bootstrapped);
    assert_eq!(s.partitions.len(), 2, "{:?}", s.partitions);
}

/// Join a fourth node to a partition, read its data there, Leave, Join again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_partition() {
    const P: u32 = 2;
    let mut cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    let layout = cluster.layout(1..=4);
    cluster.bootstrap(&layout).await;

    // Data written before the join.
    let mut kv1 = cluster.node(1).kv().await;
    let keys: Vec<(Vec<u8>, Vec<u8>)> = (0..50)
        .map(|i| {
            (
                format!("join-{i}").into_bytes(),
                format!("v-{i}").into_bytes(),
            )
        })
        .collect();
    for (k, v) in &keys {
        put(&mut kv1, P, k, v).await;
    }
    let (leader, _) = cluster.wait_leader(P, Duration::from_secs(10)).await;
    let commit_before = cluster
        .node(leader)
        .partition_status(P)
        .await
        .unwrap()
        .commit_index;

    // A fourth node, given the layout (it is a member of no partition, so it
    // hosts nothing yet).
    let id4 = cluster.add_node();
    cluster.node_mut(id4).start();
    cluster.node_mut(id4).wait_ready().await;
    cluster.bootstrap_nodes(&[id4], &layout).await;
    let s4 = cluster.node(id4).status().await.unwrap();
    assert!(s4.bootstrapped);
    assert!(
        s4.partitions.is_empty(),
        "node 4 hosts {:?} before Join",
        s4.partitions
    );

    let mut client4 = cluster.node(id4).node_client().await;

    // Bad Join requests.
    expect_code(
        client4
            .join(req(
                JoinRequest {
                    partition: Some(cluster.partition(P, &[1, 2, 3])),
                },
                CONTROL_TIMEOUT,
            ))
            .await,
        Code::InvalidArgument,
        "Join on a node that is not in partition.members",
    );
    expect_code(
        client4
            .join(req(JoinRequest { partition: None }, CONTROL_TIMEOUT))
            .await,
        Code::InvalidArgument,
        "Join without a partition",
    );
    expect_code(
        client4
            .leave(req(LeaveRequest { partition_id: 999 }, CONTROL_TIMEOUT))
            .await,
        Code::NotFound,
        "Leave of an unknown partition",
    );
    // In the layout but not hosted here: the spec only says "unknown
    // partition -> NOT_FOUND", so either refusal is accepted.
    match client4
        .leave(req(LeaveRequest { partition_id: P }, CONTROL_TIMEOUT))
        .await
    {
        Ok(_) => panic!("Leave of a partition node 4 does not host succeeded"),
        Err(s) => assert!(
            matches!(s.code(), Code::NotFound | Code::FailedPrecondition),
            "Leave of a partition node 4 does not host: {:?} {}",
            s.code(),
            s.message()
        ),
    }

    for round in 1..=2 {
        note(format!("join round {round}"));
        let join = JoinRequest {
            partition: Some(cluster.partition(P, &[1, 2, 3, 4])),
        };
        if let Err(s) = client4.join(req(join, CONTROL_TIMEOUT)).await {
            panic!("Join round {round}: {:?} {}", s.code(), s.message());
        }

        // When Join returns, node 4 is a caught-up voter.
        let p4 = cluster.node(id4).partition_status(P).await.unwrap();
        assert!(p4.voters.contains(&id4), "node 4 voters {:?}", p4.voters);
        assert!(
            p4.applied_index >= commit_before,
            "node 4 applied {} < leader commit {commit_before} before the join",
            p4.applied_index
        );
        let mut kv4 = cluster.node(id4).kv().await;
        for (k, v) in &keys {
            assert_eq!(
                get(&mut kv4, P, k, true).await.as_deref(),
                Some(v.as_slice()),
                "serializable read of {} on node 4",
                String::from_utf8_lossy(k)
            );
        }
        // Every node sees the new configuration.
        wait_for(
            Duration::from_secs(10),
            "node 4 among the voters everywhere",
            async || {
                for id in 1..=4 {
                    let p = cluster.node(id).partition_status(P).await?;
                    let v: BTreeSet<u64> = p.voters.iter().copied().collect();
                    if v != BTreeSet::from([1, 2, 3, 4]) {
                        return Err(format!("node {id} voters {v:?}"));
                    }
                }
                Ok(())
            },
        )
        .await;
        // Other partitions are untouched.
        let s4 = cluster.node(id4).status().await.unwrap();
        let hosted: Vec<u32> = s4.partitions.iter().map(|p| p.partition_id).collect();
        assert_eq!(hosted, vec![P], "node 4 hosts");

        // Writes through node 4 now replicate.
        let key = format!("via-4-round-{round}").into_bytes();
        put(&mut kv4, P, &key, b"x").await;
        assert_eq!(
            get(&mut kv1, P, &key, false).await.as_deref(),
            Some(&b"x"[..])
        );

        if let Err(s) = client4
            .leave(req(LeaveRequest { partition_id: P }, CONTROL_TIMEOUT))
            .await
        {
            panic!("Leave round {round}: {:?} {}", s.code(), s.message());
        }
        let s4 = cluster.node(id4).status().await.unwrap();
        assert!(
            find_partition(&s4, P).is_none(),
            "node 4 still lists partition {P} after Leave: {:?}",
            s4.partitions
        );
        wait_for(
            Duration::from_secs(10),
            "node 4 gone from the voters",
            async || {
                for id in 1..=3 {
                    let p = cluster.node(id).partition_status(P).await?;
                    let v: BTreeSet<u64> = p.voters.iter().copied().collect();
                    if v != BTreeSet::from([1, 2, 3]) {
                        return Err(format!("node {id} voters {v:?}"));
                    }
                }
                Ok(())
            },
        )
        .await;
        // The partition keeps working with its three voters.
        put(&mut kv1, P, format!("after-leave-{round}").as_bytes(), b"y").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_after_kill9() {
    let mut cluster = Cluster::start(3, 1, Some(FAST_CONFIG)).await;
    let layout = cluster.layout(1..=2);
    cluster.bootstrap(&layout).await;

    let (old_leader, old_term) = cluster.wait_leader(1, Duration::from_secs(10)).await;
    note(format!(
        "partition 1: leader {old_leader} term {old_term}; killing it"
    ));
    cluster.node_mut(old_leader).kill9();

    let (new_leader, new_term) = wait_for(
        Duration::from_secs(15),
        "a new leader of partition 1 among the survivors",
        async || {
            let (l, t) = cluster.agreed_leader(1).await?;
            if l == old_leader {
                Err(format!("survivors still follow {l} at term {t}"))
            } else {
                Ok((l, t))
            }
        },
    )
    .await;
    assert!(
        new_term > old_term,
        "new term {new_term} <= old term {old_term}"
    );
    assert!(cluster.node(new_leader).is_running());

    // The partition serves writes again, and the old leader rejoins as a
    // follower of the new configuration after a restart.
    let mut kv = cluster.node(new_leader).kv().await;
    put(&mut kv, 1, b"after-failover", b"1").await;
    cluster.node_mut(old_leader).restart().await;
    wait_for(
        Duration::from_secs(15),
        "the restarted node to follow the leader",
        async || {
            let p = cluster.node(old_leader).partition_status(1).await?;
            let (l, _) = cluster.agreed_leader(1).await?;
            if p.leader_id == l && p.leader_id != 0 {
                Ok(())
            } else {
                Err(format!(
                    "restarted node reports leader {}, cluster {l}",
                    p.leader_id
                ))
            }
        },
    )
    .await;
    let mut kv_old = cluster.node(old_leader).kv().await;
    assert_eq!(
        get(&mut kv_old, 1, b"after-failover", false)
            .await
            .as_deref(),
        Some(&b"1"[..])
    );
}

/// A client deadline shorter than an election: Bootstrap answers
/// DEADLINE_EXCEEDED; the same Bootstrap with a long deadline then succeeds.
/// Only node 1 is given the layout at first, so no partition can elect a
/// leader before the deadline (the others do not host it yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_deadline_shorter_than_election() {
    let slow = r#"{"heartbeatPeriod":"0.5s","electionTimeout":"5s"}"#;
    let cluster = Cluster::start(3, 1, Some(slow)).await;
    let layout = cluster.layout(1..=2);

    let mut calls = Vec::new();
    for node in &cluster.nodes[..1] {
        let mut client = node.node_client().await;
        let request = BootstrapRequest {
            partitions: layout.clone(),
        };
        let id = node.id;
        calls.push(tokio::spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(20),
                client.bootstrap(req(request, Duration::from_millis(200))),
            )
            .await;
            (id, r)
        }));
    }
    for call in calls {
        let (id, r) = call.await.unwrap();
        let Ok(r) = r else {
            panic!("node {id} ignored the 200 ms deadline");
        };
        // tonic arms its own timer from the same deadline: on a busy
        // machine it can fire before the server's DEADLINE_EXCEEDED
        // arrives, and reports CANCELLED "Timeout expired". Either way the
        // call ended at its deadline; any other outcome is a failure.
        match r {
            Err(s) if s.code() == Code::Cancelled && s.message().contains("Timeout expired") => {}
            r => {
                expect_code(
                    r,
                    Code::DeadlineExceeded,
                    &format!("Bootstrap with 200 ms deadline on node {id}"),
                );
            }
        }
    }

    // The node keeps going (or accepts the layout again) and elects leaders.
    cluster.bootstrap(&layout).await;
    for p in 1..=2 {
        cluster.wait_leader(p, Duration::from_secs(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_oversized_and_garbage_messages() {
    let cluster = Cluster::start(1, 2, Some(FAST_CONFIG)).await;
    let node = cluster.node(1);
    let empty = StatusRequest {}.encode_to_vec();

    for path in [
        "/atomix.multiraft.v1.Node/Nope",
        "/multiraft.admin.v1.Admin/Nope",
        "/multiraft.kv.v1.KV/Nope",
        "/multiraft.nope.v1.Nope/Call",
    ] {
        expect_code(
            raw_unary(node.channel().await, path, empty.clone()).await,
            Code::Unimplemented,
            path,
        );
    }

    // An unknown method on a stream whose body never ends (as a streaming
    // client's, e.g. a reflection client asking a server without
    // reflection): answered from the headers, not after a half-close that
    // never comes.
    let tcp = tokio::net::TcpStream::connect(node.api_addr).await.unwrap();
    let (mut h2c, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let request = http::Request::post(format!(
        "http://{}/grpc.nope.v1.Nothing/StreamForever",
        node.api_addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, _open_body) = h2c.send_request(request, false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("an unknown method on an open stream got no answer")
        .unwrap();
    assert_eq!(
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()),
        Some("12"),
        "UNIMPLEMENTED, Trailers-Only: {:?}",
        response.headers()
    );

    // 5 MiB in one message: above the 4 MiB frontend limit.
    let mut kv = node.kv().await.max_encoding_message_size(usize::MAX);
    let big = PutRequest {
        key: b"big".to_vec(),
        value: vec![7; 5 << 20],
        partition_id: 1,
    };
    expect_code(
        kv.put(req(big, Duration::from_secs(20))).await,
        Code::ResourceExhausted,
        "5 MiB Put",
    );

    // Bodies that are not valid protobuf for the request type.
    let garbage: [(&str, Vec<u8>); 3] = [
        ("overlong varint", vec![0xff; 16]),
        ("truncated length-delimited field", vec![0x0a, 0x05, 0x01]),
        ("invalid wire type", vec![0x0f, 0x00]),
    ];
    for path in [
        "/atomix.multiraft.v1.Node/Bootstrap",
        "/atomix.multiraft.v1.Node/Join",
        "/multiraft.kv.v1.KV/Put",
        "/multiraft.admin.v1.Admin/Status",
    ] {
        for (what, body) in &garbage {
            match raw_unary(node.channel().await, path, body.clone()).await {
                Ok(b) => panic!("{path} with {what}: accepted, answered {b:?}"),
                Err(s) => assert!(
                    matches!(s.code(), Code::InvalidArgument | Code::Internal),
                    "{path} with {what}: {:?} {}",
                    s.code(),
                    s.message()
                ),
            }
        }
    }

    // The node survived all of it, on fresh connections too.
    node.status().await.unwrap();
    let fresh = connect(node.api_addr, Duration::from_secs(5)).await;
    let s = crate::pb::multiraft::admin::v1::admin_client::AdminClient::new(fresh)
        .status(req(StatusRequest {}, Duration::from_secs(5)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.node_id, 1);
    assert!(
        !s.bootstrapped,
        "garbage Bootstrap bodies bootstrapped the node"
    );
}

fn members_arg(cluster: &Cluster) -> String {
    cluster
        .nodes
        .iter()
        .map(|n| format!("{}={}", n.id, n.raft_addr))
        .collect::<Vec<_>>()
        .join(",")
}

/// The gRPC status code in CLI output, normalised: "FAILED_PRECONDITION",
/// "FailedPrecondition" and "failed precondition" all match.
fn mentions_code(out: &std::process::Output, code: &str) -> bool {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_lowercase()
    };
    norm(&output_text(out)).contains(&norm(code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_bootstrap_status_join_leave() {
    let cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    let t = Duration::from_secs(60);
    let addr1 = cluster.node(1).api_addr.to_string();

    // Before Bootstrap.
    let out = cli(&["leave", "--addr", &addr1, "--partition", "1"], t).await;
    assert!(
        !out.status.success(),
        "leave before bootstrap succeeded:\n{}",
        output_text(&out)
    );
    assert!(
        mentions_code(&out, "FAILED_PRECONDITION"),
        "{}",
        output_text(&out)
    );

    let out = cli(&["status", "--addr", &addr1, "--json"], t).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{}", output_text(&out)));
    assert_eq!(json_u64(&json["nodeId"]), Some(1), "{json}");
    assert_ne!(
        json["bootstrapped"],
        serde_json::Value::Bool(true),
        "{json}"
    );

    // Bootstrap every node through the CLI, concurrently (each call waits
    // for leaders, which needs a quorum of bootstrapped nodes).
    let members = members_arg(&cluster);
    let mut runs = Vec::new();
    for node in &cluster.nodes {
        let addr = node.api_addr.to_string();
        let members = members.clone();
        runs.push(tokio::spawn(async move {
            cli(
                &[
                    "bootstrap",
                    "--addr",
                    &addr,
                    "--partitions",
                    "4",
                    "--members",
                    &members,
                ],
                t,
            )
            .await
        }));
    }
    for run in runs {
        let out = run.await.unwrap();
        assert!(out.status.success(), "bootstrap:\n{}", output_text(&out));
    }

    for node in &cluster.nodes {
        let addr = node.api_addr.to_string();
        let out = cli(&["status", "--addr", &addr, "--json"], t).await;
        assert!(out.status.success(), "{}", output_text(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{}", output_text(&out)));
        assert_eq!(json_u64(&json["nodeId"]), Some(node.id), "{json}");
        assert_eq!(
            json["bootstrapped"],
            serde_json::Value::Bool(true),
            "{json}"
        );
        let parts = json["partitions"]
            .as_array()
            .unwrap_or_else(|| panic!("no partitions: {json}"));
        let ids: BTreeSet<u64> = parts
            .iter()
            .filter_map(|p| json_u64(&p["partitionId"]))
            .collect();
        assert_eq!(ids, (1..=4).collect(), "{json}");
        for p in parts {
            let voters: BTreeSet<u64> = p["voters"]
                .as_array()
                .unwrap_or_else(|| panic!("no voters: {p}"))
                .iter()
                .filter_map(json_u64)
                .collect();
            assert_eq!(voters, BTreeSet::from([1, 2, 3]), "{p}");
            let role = p["role"]
                .as_str()
                .unwrap_or_else(|| panic!("role is not a string: {p}"));
            assert!(role.starts_with("ROLE_"), "{p}");
            assert!(
                json_u64(&p["leaderId"]).unwrap_or(0) > 0,
                "no leader after bootstrap: {p}"
            );
        }
    }
    // The CLI layout is the same one a tonic client would send.
    cluster.bootstrap(&cluster.layout(1..=4)).await;

    // Errors come back as nonzero exits naming the status.
    // (Durations take the same grammar everywhere: "500ms" too.)
    let out = cli(
        &[
            "leave",
            "--addr",
            &addr1,
            "--partition",
            "999",
            "--timeout",
            "500ms",
        ],
        t,
    )
    .await;
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(mentions_code(&out, "NOT_FOUND"), "{}", output_text(&out));

    let out = cli(
        &[
            "join",
            "--addr",
            &addr1,
            "--partition",
            "1",
            "--members",
            "2=127.0.0.1:1,3=127.0.0.1:2",
        ],
        t,
    )
    .await;
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        mentions_code(&out, "INVALID_ARGUMENT"),
        "{}",
        output_text(&out)
    );

    let out = cli(
        &["status", "--addr", "127.0.0.1:1", "--json"],
        Duration::from_secs(30),
    )
    .await;
    assert!(
        !out.status.success(),
        "status of nothing succeeded:\n{}",
        output_text(&out)
    );
}

/// Leaders per node, from every partition's agreed leader (`None` while
/// some partition has none).
async fn leaders_per_node(cluster: &Cluster, partitions: u32) -> Option<BTreeMap<u64, u32>> {
    let mut per: BTreeMap<u64, u32> = cluster
        .running_ids()
        .into_iter()
        .map(|id| (id, 0))
        .collect();
    for p in 1..=partitions {
        let (leader, _) = cluster.agreed_leader(p).await.ok()?;
        *per.entry(leader).or_insert(0) += 1;
    }
    Some(per)
}

/// Waits until every running node leads within one of every other.
async fn wait_balanced(cluster: &Cluster, partitions: u32, what: &str) -> BTreeMap<u64, u32> {
    wait_for(Duration::from_secs(60), what, async || {
        let per = leaders_per_node(cluster, partitions)
            .await
            .ok_or_else(|| "a partition has no agreed leader".to_string())?;
        let (lo, hi) = (per.values().min().unwrap(), per.values().max().unwrap());
        if hi - lo <= 1 {
            Ok(per)
        } else {
            Err(format!("leaders per node {per:?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_spread_over_the_nodes_and_come_back_to_a_returning_node() {
    let mut cluster = Cluster::start(3, 1, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=12)).await;
    let per = wait_balanced(&cluster, 12, "leaders spread after Bootstrap").await;
    note(format!("after Bootstrap: {per:?}"));

    // Node 3 goes away; its partitions fail over; it comes back and gets
    // its share again.
    cluster.node_mut(3).kill9();
    wait_for(
        Duration::from_secs(30),
        "leaders on nodes 1 and 2",
        async || match leaders_per_node(&cluster, 12).await {
            Some(per) if per.get(&3).copied().unwrap_or(0) == 0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    cluster.node_mut(3).restart().await;
    let per = wait_balanced(&cluster, 12, "leaders spread after node 3 returned").await;
    note(format!("after node 3 returned: {per:?}"));
    assert!(per[&3] >= 3, "{per:?}");
}
