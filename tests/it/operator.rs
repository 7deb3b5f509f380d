//! What operators' tools use, through clients generated separately from the
//! standard protos: health checking (Check, and Watch through a shutdown),
//! and server reflection in both versions, down to calling KV with no
//! proto files at all (descriptors fetched by reflection, requests built
//! from JSON as grpcurl builds them).

use std::time::Duration;

use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use tonic::Code;

use crate::pb::grpc::health::v1::health_check_response::ServingStatus;
use crate::pb::grpc::health::v1::health_client::HealthClient;
use crate::pb::grpc::health::v1::HealthCheckRequest;
use crate::pb::grpc::reflection::{v1, v1alpha};
use crate::support::*;

fn check(service: &str) -> tonic::Request<HealthCheckRequest> {
    req(
        HealthCheckRequest {
            service: service.into(),
        },
        Duration::from_secs(10),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_and_watch_through_a_shutdown() {
    let mut cluster = Cluster::start(1, 2, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=1)).await;
    let mut health = HealthClient::new(cluster.node(1).channel().await);
    for service in ["", "multiraft.kv.v1.KV", "atomix.multiraft.v1.Node"] {
        let r = health.check(check(service)).await.expect("Check");
        assert_eq!(
            r.into_inner().status(),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    expect_code(
        health.check(check("no.such.Service")).await,
        Code::NotFound,
        "Check of an unknown service",
    );

    let mut watch = health
        .watch(tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        }))
        .await
        .expect("Watch")
        .into_inner();
    let first = watch
        .message()
        .await
        .expect("first status")
        .expect("a message");
    assert_eq!(first.status(), ServingStatus::Serving);

    // SIGTERM: the watcher hears NOT_SERVING before the node goes.
    let pid = cluster.node(1).pid() as libc::pid_t;
    // SAFETY: plain syscall on a pid the harness spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a status within 10 s of SIGTERM");
    let next = next.expect("the stream ends cleanly").expect("a message");
    assert_eq!(next.status(), ServingStatus::NotServing);
    let status = cluster.node_mut(1).wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");
}

/// Asks a v1 reflection stream for `requests`, one response each.
async fn reflect_v1(
    node: &Node,
    requests: Vec<v1::server_reflection_request::MessageRequest>,
) -> Vec<v1::server_reflection_response::MessageResponse> {
    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(node.channel().await);
    let n = requests.len();
    let outgoing =
        futures::stream::iter(requests.into_iter().map(|r| v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(r),
        }));
    let mut stream = client
        .server_reflection_info(outgoing)
        .await
        .expect("ServerReflectionInfo")
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.message().await.expect("a response") {
        out.push(r.message_response.expect("an answer"));
    }
    assert_eq!(out.len(), n, "one response per request");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_describes_and_calls_without_protos() {
    use v1::server_reflection_request::MessageRequest as Req;
    use v1::server_reflection_response::MessageResponse as Resp;
    let cluster = Cluster::start(1, 2, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=1)).await;
    let node = cluster.node(1);

    let answers = reflect_v1(
        node,
        vec![
            Req::ListServices(String::new()),
            Req::FileContainingSymbol("multiraft.kv.v1.KV".into()),
            Req::FileContainingSymbol("no.such.Symbol".into()),
        ],
    )
    .await;
    let Resp::ListServicesResponse(list) = &answers[0] else {
        panic!("not a service list: {:?}", answers[0]);
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "multiraft.kv.v1.KV",
        "atomix.multiraft.v1.Node",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} not listed: {names:?}");
    }
    let Resp::FileDescriptorResponse(files) = &answers[1] else {
        panic!("no descriptors: {:?}", answers[1]);
    };
    let Resp::ErrorResponse(missing) = &answers[2] else {
        panic!("an unknown symbol was found: {:?}", answers[2]);
    };
    assert_eq!(missing.error_code, Code::NotFound as i32);

    // Build the messages from the descriptors alone, as grpcurl does.
    let set = FileDescriptorSet {
        file: files
            .file_descriptor_proto
            .iter()
            .map(|b| FileDescriptorProto::decode(&b[..]).expect("a FileDescriptorProto"))
            .collect(),
    };
    let pool = DescriptorPool::from_file_descriptor_set(set).expect("a complete descriptor set");
    let kv = pool
        .get_service_by_name("multiraft.kv.v1.KV")
        .expect("the KV service");
    let method = |name: &str| {
        kv.methods()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("no method {name}"))
    };
    let call = async |name: &str, path: &'static str, json: &str| {
        let m = method(name);
        let mut de = serde_json::Deserializer::from_str(json);
        let request = DynamicMessage::deserialize(m.input(), &mut de).expect("JSON request");
        let bytes = raw_unary(node.channel().await, path, request.encode_to_vec())
            .await
            .unwrap_or_else(|s| panic!("{path}: {s:?}"));
        let response = DynamicMessage::decode(m.output(), &bytes[..]).expect("response");
        serde_json::to_value(&response).expect("JSON response")
    };
    let put = call(
        "Put",
        "/multiraft.kv.v1.KV/Put",
        r#"{"partitionId": 1, "key": "a2V5", "value": "dmFsdWU="}"#,
    )
    .await;
    assert!(put.get("index").is_some(), "{put}");
    let got = call(
        "Get",
        "/multiraft.kv.v1.KV/Get",
        r#"{"partitionId": 1, "key": "a2V5"}"#,
    )
    .await;
    assert_eq!(got["value"], "dmFsdWU=", "{got}");

    // v1alpha, which older grpcurl releases use, answers the same way.
    let mut alpha =
        v1alpha::server_reflection_client::ServerReflectionClient::new(node.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = alpha
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("v1alpha ServerReflectionInfo")
        .into_inner();
    let answer = stream.message().await.expect("a response").expect("one");
    assert!(matches!(
        answer.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_commands_write_read_delete_and_compare() {
    let cluster = Cluster::start(1, 2, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=2)).await;
    let addr = cluster.node(1).api_addr.to_string();
    let t = Duration::from_secs(20);
    let run = async |args: &[&str]| {
        let mut all = vec![args[0], "--addr", &addr];
        all.extend_from_slice(&args[1..]);
        cli(&all, t).await
    };
    let stdout = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();

    let out = run(&["put", "greeting", "hello"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(stdout(&out).starts_with("OK index "), "{}", stdout(&out));
    let out = run(&["get", "greeting"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(out.stdout, b"hello");

    // A value from a file, bytes intact; JSON shows them in base64.
    let dir = test_dir();
    let file = dir.path().join("value.bin");
    std::fs::write(&file, [0u8, 159, 146, 150]).unwrap();
    let path = file.display().to_string();
    let out = run(&["put", "bin", "--value-file", &path, "--partition", "2"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let out = run(&["get", "bin", "--partition", "2"]).await;
    assert_eq!(out.stdout, [0u8, 159, 146, 150]);
    let out = run(&["get", "bin", "--partition", "2", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["value"], "AJ+Slg==", "{v}");
    assert_eq!(v["partitionId"], 2, "{v}");

    // Compare-and-swap: the right expectation wins, a wrong one exits 1.
    let out = run(&["cas", "greeting", "bye", "--expect", "hello"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let out = run(&["cas", "greeting", "again", "--expect", "hello"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(stdout(&out).contains("\"bye\""), "{}", stdout(&out));
    let out = run(&["cas", "fresh", "new", "--expect-absent"]).await;
    assert!(out.status.success(), "{}", output_text(&out));

    // Delete, then the key is gone (exit 1, nothing on stdout).
    let out = run(&["del", "greeting"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(stdout(&out).contains("deleted \"bye\""), "{}", stdout(&out));
    let out = run(&["get", "greeting"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(out.stdout.is_empty());

    // Errors name their status.
    let out = run(&["get", "x", "--partition", "99"]).await;
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("NOT_FOUND"),
        "{}",
        output_text(&out)
    );
}

/// GETs `path` from `addr` with hyper's HTTP/1.1 client: status and body.
#[test]
fn the_series_reader_matches_whole_names_only() {
    let text = "a_total{x=\"1\"} 3\na_total_sum 9\n";
    assert_eq!(series(text, "a_total{x=\"1\"}"), Some(3.0));
    assert_eq!(series(text, "a_total"), None);
    assert_eq!(series(text, "a_total_sum"), Some(9.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_work() {
    let (cluster, metrics) = cluster_with_metrics(3, 2).await;
    cluster.bootstrap(&cluster.layout(1..=2)).await;
    let (leader, _) = cluster.wait_leader(1, Duration::from_secs(10)).await;
    let addr = metrics[leader as usize - 1];
    wait_metrics(&[addr]).await;
    // Summed over the shard label (a call is counted by the shard that
    // took its connection).
    let put_ok = |text: &str| -> f64 {
        (0..2)
            .filter_map(|k| {
                series(
                    text,
                    &format!(
                        "multiraft_grpc_requests_total{{code=\"OK\",method=\"/multiraft.kv.v1.KV/Put\",shard=\"{k}\"}}"
                    ),
                )
            })
            .sum()
    };
    let (status, before) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let puts_before = put_ok(&before);

    let mut kv = cluster.node(leader).kv().await;
    for i in 0..20 {
        put(&mut kv, 1, format!("k{i}").as_bytes(), b"v").await;
    }
    let (_, after) = http_get(addr, "/metrics").await;
    assert_eq!(put_ok(&after), puts_before + 20.0, "{after}");
    let applied: f64 = (0..2)
        .filter_map(|k| {
            series(
                &after,
                &format!("multiraft_applied_commands_total{{shard=\"{k}\"}}"),
            )
        })
        .sum();
    assert!(applied >= 20.0, "applied {applied}");
    let leaders: f64 = (0..2)
        .filter_map(|k| series(&after, &format!("multiraft_leaders{{shard=\"{k}\"}}")))
        .sum();
    assert!(leaders >= 1.0, "{after}");
    // The 20 writes are in the leader's log, not yet compacted.
    let log_bytes: f64 = (0..2)
        .filter_map(|k| {
            series(
                &after,
                &format!("multiraft_log_memory_bytes{{shard=\"{k}\"}}"),
            )
        })
        .sum();
    assert!(log_bytes > 0.0, "{after}");
    for name in [
        "multiraft_wal_sync_duration_seconds_count",
        "multiraft_wal_entries_per_sync_count",
        "multiraft_peer_sent_messages_total",
        "multiraft_peer_received_bytes_total",
        "multiraft_grpc_request_duration_seconds_count",
        "multiraft_disk_full",
        "multiraft_log_trims_total",
    ] {
        assert!(after.contains(name), "no {name} in:\n{after}");
    }
    let (status, body) = http_get(addr, "/health").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, _) = http_get(addr, "/ready").await;
    assert_eq!(status, 200);
    let (status, _) = http_get(addr, "/nope").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let cluster = Cluster::start_with(1, 1, Some(FAST_CONFIG), |_| {
        vec!["--log-format".into(), "json".into()]
    })
    .await;
    cluster.bootstrap(&cluster.layout(1..=1)).await;
    // The API answers before the main thread logs "node ready".
    wait_until(Duration::from_secs(10), "the node ready line", async || {
        cluster.node(1).log().contains("\"node ready\"")
    })
    .await;
    let log = cluster.node(1).log();
    let mut lines = 0;
    // The harness marks each start with a "=== start" line of its own.
    for line in log
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("=== "))
    {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
        lines += 1;
    }
    assert!(log.contains("\"node ready\""), "{log}");
    assert!(lines > 3, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_changes_and_replays_recent_history() {
    use crate::pb::multiraft::kv::v1::{
        watch_event::Type, CompareAndSwapRequest, DeleteRequest, WatchEvent, WatchRequest,
    };
    let cluster = Cluster::start(1, 2, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=2)).await;
    let node = cluster.node(1);
    let mut kv = node.kv().await;
    let watch = |key: &str, prefix: bool, start_index: u64| WatchRequest {
        key: key.as_bytes().to_vec(),
        prefix,
        partition_id: 1,
        start_index,
    };
    let mut stream = kv
        .watch(tonic::Request::new(watch("w", false, 0)))
        .await
        .expect("Watch")
        .into_inner();

    let first = put(&mut kv, 1, b"w", b"one").await;
    put(&mut kv, 1, b"w", b"two").await;
    put(&mut kv, 1, b"other", b"not watched").await;
    let cas = |expected: &[u8], value: &[u8]| CompareAndSwapRequest {
        key: b"w".to_vec(),
        expected: Some(expected.to_vec()),
        value: value.to_vec(),
        partition_id: 1,
    };
    let failed = kv
        .compare_and_swap(req(cas(b"nope", b"x"), KV_TIMEOUT))
        .await
        .unwrap();
    assert!(!failed.into_inner().succeeded);
    kv.compare_and_swap(req(cas(b"two", b"three"), KV_TIMEOUT))
        .await
        .unwrap();
    kv.delete(req(
        DeleteRequest {
            key: b"w".to_vec(),
            partition_id: 1,
        },
        KV_TIMEOUT,
    ))
    .await
    .unwrap();

    let mut seen: Vec<WatchEvent> = Vec::new();
    while seen.len() < 4 {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event within 10 s")
            .expect("the stream goes on")
            .expect("an event");
        seen.push(e);
    }
    let kinds: Vec<(Type, &[u8])> = seen
        .iter()
        .map(|e| (e.r#type(), e.value.as_slice()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (Type::Put, &b"one"[..]),
            (Type::Put, b"two"),
            (Type::Put, b"three"),
            (Type::Delete, b""),
        ],
        "a failed CAS and another key make no events"
    );
    assert_eq!(seen[0].index, first);
    assert!(seen.windows(2).all(|w| w[0].index < w[1].index));

    // From a recent index, the same events again; by prefix, other keys too.
    let mut replay = kv
        .watch(tonic::Request::new(watch("", true, first)))
        .await
        .expect("Watch from an index")
        .into_inner();
    let mut keys = Vec::new();
    while keys.len() < 5 {
        let e = tokio::time::timeout(Duration::from_secs(10), replay.message())
            .await
            .expect("a replayed event")
            .unwrap()
            .unwrap();
        keys.push(String::from_utf8(e.key).unwrap());
    }
    assert_eq!(keys, ["w", "w", "other", "w", "w"]);

    // A prefix watch needs its partition.
    let mut any = watch("", true, 0);
    any.partition_id = 0;
    // (A streaming call's error may come after its headers, as here.)
    let err = match kv.watch(tonic::Request::new(any)).await {
        Err(e) => e,
        Ok(r) => r
            .into_inner()
            .message()
            .await
            .expect_err("a prefix watch without partition"),
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // The command line prints changes as they come.
    let addr = node.api_addr.to_string();
    let mut cli_watch = tokio::process::Command::new(BIN)
        .args(["watch", "cli-key", "--addr", &addr, "--partition", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        cli_watch.stdout.take().unwrap(),
    ));
    // Writes until the watcher has registered and printed one.
    let printed = wait_for(
        Duration::from_secs(20),
        "multiraft watch to print a change",
        async || {
            put(&mut kv, 1, b"cli-key", b"hello").await;
            match tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await {
                Ok(Ok(Some(line))) => Ok(line),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(
        printed.starts_with("PUT \"cli-key\" \"hello\" index "),
        "{printed}"
    );
    let _ = cli_watch.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_events_are_watched_through_bootstrap_and_leave() {
    use crate::pb::multiraft::admin::v1::{cluster_event::Type, WatchClusterRequest};
    let cluster = Cluster::start(3, 1, Some(FAST_CONFIG)).await;
    let mut admin = cluster.node(1).admin().await;
    let mut events = admin
        .watch(tonic::Request::new(WatchClusterRequest {}))
        .await
        .expect("Admin/Watch")
        .into_inner();
    cluster.bootstrap(&cluster.layout(1..=2)).await;
    let (mut added, mut leaders) = (Vec::new(), Vec::new());
    while added.len() < 2 || leaders.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .unwrap();
        match e.r#type() {
            Type::PartitionAdded => added.push(e.partition_id),
            Type::LeaderChanged if !leaders.contains(&e.partition_id) => {
                assert!(e.node_id >= 1 && e.node_id <= 3 && e.term > 0, "{e:?}");
                leaders.push(e.partition_id)
            }
            _ => {}
        }
    }
    added.sort();
    assert_eq!(added, vec![1, 2]);

    // The command line prints them: node 3 leaves partition 2.
    let addr3 = cluster.node(3).api_addr.to_string();
    let mut cli_watch = tokio::process::Command::new(BIN)
        .args(["watch", "--cluster", "--addr", &addr3])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        cli_watch.stdout.take().unwrap(),
    ));
    // The watch starts with the current leaders: once one is printed, the
    // watcher is registered.
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the current state within 10 s")
        .unwrap()
        .expect("a line");
    assert!(first.contains(": leader is node "), "{first}");
    let out = cli(
        &[
            "leave",
            "--addr",
            &addr3,
            "--partition",
            "2",
            "--timeout",
            "30s",
        ],
        Duration::from_secs(40),
    )
    .await;
    assert!(out.status.success(), "{}", output_text(&out));
    let removed = wait_for(Duration::from_secs(20), "the removal printed", async || {
        match tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await {
            Ok(Ok(Some(line))) if line.contains("replica removed") => Ok(line),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(removed, "partition 2: replica removed from this node");
    let _ = cli_watch.kill().await;
}

/// `multiraft bench --route leader` sends each call to its partition's
/// leader. Each partition here has one member, so a call that reaches any
/// other node is forwarded at the node level and counted in
/// `multiraft_forwarded_calls_total`; with `--route any` (the control)
/// two calls in three are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_sends_each_call_to_its_partitions_leader() {
    let (cluster, metrics) = cluster_with_metrics(3, 1).await;
    let layout: Vec<_> = (1..=3u32)
        .map(|p| cluster.partition(p, &[u64::from(p)]))
        .collect();
    cluster.bootstrap(&layout).await;
    wait_metrics(&metrics).await;
    let forwarded =
        async || metric_sum(&metrics, "multiraft_forwarded_calls_total{kind=\"write\"}").await;
    let addrs = cluster
        .ids()
        .iter()
        .map(|&id| cluster.node(id).api_addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let bench = async |route: &str| -> serde_json::Value {
        let out = cli_in(
            &[
                "bench",
                "--addr",
                &addrs,
                "--active-partitions",
                "3",
                "--route",
                route,
                // 16 workers: worker w writes keys w + 16 * i, which fall
                // in every partition (with a multiple of 3 workers, each
                // would stay in one, over a connection to its member).
                "--connections",
                "4",
                "--in-flight",
                "4",
                "--requests",
                "300",
                "--verify-keys",
                "50",
                "--json",
            ],
            Duration::from_secs(120),
            None,
        )
        .await;
        clean_bench_report(&out)
    };

    let before = forwarded().await;
    let report = bench("leader").await;
    assert_eq!(report["route"], "leader", "{report}");
    assert_eq!(
        forwarded().await,
        before,
        "calls reached a node that is not the leader"
    );

    let report = bench("any").await;
    assert_eq!(report["route"], "any", "{report}");
    assert!(
        forwarded().await >= before + 100.0,
        "with --route any, about 200 of the 300 writes reach a non-member"
    );
}
