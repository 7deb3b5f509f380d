//! Forwarding, deadlines and membership corner cases, each against real
//! node processes:
//! - a node that hosts no partition forwards every call (its answers must
//!   find their way back although it is in no member list);
//! - forwarding fails over when the first member in id order is paused;
//! - short deadlines on a healthy cluster succeed or end in
//!   DEADLINE_EXCEEDED, never a false UNAVAILABLE;
//! - a Join that cannot complete leaves a replica that Leave removes, and a
//!   Leave that cannot complete does not block Bootstrap meanwhile.

use std::time::Duration;

use tonic::Code;

use crate::pb::atomix::multiraft::v1::{BootstrapRequest, JoinRequest, LeaveRequest};
use crate::pb::multiraft::kv::v1::{CompareAndSwapRequest, DeleteRequest, GetRequest, PutRequest};
use crate::support::*;

/// Sends SIGSTOP or SIGCONT to a node's process.
fn signal(node: &Node, sig: libc::c_int) {
    // SAFETY: plain syscall on a pid we spawned and have not reaped.
    let rc = unsafe { libc::kill(node.pid() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({sig}) node {}", node.id);
}

/// Puts `key = {prefix}-{i}` for i in 0..n through `kv`, one at a time, and
/// checks that each answer names the previous value: a write applied twice
/// or lost breaks the chain.
async fn put_chain(
    kv: &mut crate::pb::multiraft::kv::v1::kv_client::KvClient<tonic::transport::Channel>,
    partition: u32,
    key: &[u8],
    prefix: &str,
    n: usize,
    timeout: Duration,
) {
    let mut previous: Option<Vec<u8>> = get(kv, partition, key, false).await;
    for i in 0..n {
        let value = format!("{prefix}-{i}").into_bytes();
        let r = kv
            .put(req(
                PutRequest {
                    key: key.to_vec(),
                    value: value.clone(),
                    partition_id: partition,
                },
                timeout,
            ))
            .await
            .unwrap_or_else(|s| panic!("Put {prefix}-{i}: {:?} {}", s.code(), s.message()))
            .into_inner();
        assert_eq!(
            r.previous, previous,
            "Put {prefix}-{i} saw a previous value other than the last acknowledged one"
        );
        previous = Some(value);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_hosting_nothing_forwards_and_fails_over() {
    let cluster = Cluster::start(4, 2, Some(FAST_CONFIG)).await;
    let layout: Vec<_> = (1..=2).map(|p| cluster.partition(p, &[1, 2, 3])).collect();
    cluster.bootstrap(&layout).await;
    let s4 = cluster.node(4).status().await.unwrap();
    assert!(s4.partitions.is_empty(), "node 4 hosts {:?}", s4.partitions);

    // Every call through node 4; its answers come back although no member
    // knows node 4's address from a layout.
    let mut kv4 = cluster.node(4).kv().await;
    put_chain(&mut kv4, 1, b"chain", "a", 10, KV_TIMEOUT).await;
    assert_eq!(
        get(&mut kv4, 1, b"chain", false).await.as_deref(),
        Some(&b"a-9"[..])
    );
    let c = kv4
        .compare_and_swap(req(
            CompareAndSwapRequest {
                key: b"chain".to_vec(),
                expected: Some(b"a-9".to_vec()),
                value: b"cas".to_vec(),
                partition_id: 1,
            },
            KV_TIMEOUT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(c.succeeded, "CAS through node 4: {c:?}");
    let d = kv4
        .delete(req(
            DeleteRequest {
                key: b"chain".to_vec(),
                partition_id: 1,
            },
            KV_TIMEOUT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.previous.as_deref(), Some(&b"cas"[..]));

    // Pause node 1, the first member in id order (and maybe the leader):
    // calls through node 4 must reach the quorum of nodes 2 and 3.
    signal(cluster.node(1), libc::SIGSTOP);
    let mut kv2 = cluster.node(2).kv().await;
    for p in 1..=2 {
        put_chain(
            &mut kv4,
            p,
            b"while-paused",
            &format!("p{p}"),
            10,
            Duration::from_secs(5),
        )
        .await;
        let r = kv2
            .get(req(
                GetRequest {
                    key: b"while-paused".to_vec(),
                    partition_id: p,
                    serializable: false,
                },
                Duration::from_secs(5),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.value, format!("p{p}-9").into_bytes());
    }
    signal(cluster.node(1), libc::SIGCONT);

    // Node 1 is back: nothing was applied twice while it was away.
    let mut kv1 = cluster.node(1).kv().await;
    put_chain(&mut kv1, 1, b"while-paused", "after", 3, KV_TIMEOUT).await;
}

/// One unary gRPC call over a bare HTTP/2 connection (no client-side
/// deadline), returning the grpc-status and grpc-message.
async fn bare_call(
    addr: std::net::SocketAddr,
    path: &str,
    body: &[u8],
    timeout: &str,
) -> (i32, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(body);
    send.send_data(framed.into(), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let status_of = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(|code| {
                let msg = h
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                (code, msg)
            })
    };
    if let Some(s) = status_of(resp.headers()) {
        return s; // Trailers-Only
    }
    let mut recv = resp.into_body();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    let trailers = recv.trailers().await.unwrap().unwrap_or_default();
    status_of(&trailers).expect("a grpc-status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_deadlines_are_met_or_exceeded_never_unavailable() {
    let cluster = Cluster::start(3, 2, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=2)).await;
    cluster.wait_leader(1, Duration::from_secs(10)).await;
    let mut kv = cluster.node(1).kv().await;
    put(&mut kv, 1, b"warm", b"up").await;

    let mut ok = 0;
    for (i, ms) in [5u64, 10, 20, 50, 100].iter().cycle().take(40).enumerate() {
        let r = kv
            .put(req(
                PutRequest {
                    key: format!("short-{i}").into_bytes(),
                    value: b"v".to_vec(),
                    partition_id: 1,
                },
                Duration::from_millis(*ms),
            ))
            .await;
        match r {
            Ok(_) => ok += 1,
            // DEADLINE_EXCEEDED from the server, or the client's own timer
            // firing first (tonic reports that as CANCELLED).
            Err(s) if matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled) => {}
            Err(s) => panic!(
                "Put with a {ms} ms deadline on a healthy cluster: {:?} {}",
                s.code(),
                s.message()
            ),
        }
    }
    assert!(ok > 0, "no Put with a short deadline succeeded");
    note(format!("{ok} of 40 Puts with 5-100 ms deadlines succeeded"));

    // A deadline of one microsecond, sent as `grpc-timeout: 1u` by a bare
    // HTTP/2 client with no timer of its own: the server itself must say
    // DEADLINE_EXCEEDED (it used to say UNAVAILABLE).
    let put_body = PutRequest {
        key: b"tiny".to_vec(),
        value: b"v".to_vec(),
        partition_id: 1,
    };
    let get_body = GetRequest {
        key: b"tiny".to_vec(),
        partition_id: 1,
        serializable: false,
    };
    let addr = cluster.node(1).api_addr;
    for (path, body) in [
        (
            "/multiraft.kv.v1.KV/Put",
            prost::Message::encode_to_vec(&put_body),
        ),
        (
            "/multiraft.kv.v1.KV/Get",
            prost::Message::encode_to_vec(&get_body),
        ),
    ] {
        let (code, message) = bare_call(addr, path, &body, "1u").await;
        assert_eq!(
            code,
            Code::DeadlineExceeded as i32,
            "{path} with grpc-timeout 1u: code {code} {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_join_is_removable_and_leave_does_not_block_bootstrap() {
    let mut cluster = Cluster::start(4, 1, Some(FAST_CONFIG)).await;
    let layout: Vec<_> = (1..=2).map(|p| cluster.partition(p, &[1, 2, 3])).collect();
    cluster.bootstrap(&layout).await;

    // Partition 1 loses its quorum: nodes 2 and 3 stop.
    cluster.node_mut(2).kill9();
    cluster.node_mut(3).kill9();

    // Node 4 tries to join it: no leader can add it, the deadline passes.
    let members = cluster.partition(1, &[1, 2, 3, 4]).members;
    let join = JoinRequest {
        partition: Some(crate::pb::atomix::multiraft::v1::PartitionConfig {
            partition_id: 1,
            members,
        }),
    };
    let r = cluster
        .node(4)
        .node_client()
        .await
        .join(req(join, Duration::from_secs(2)))
        .await;
    expect_code(r, Code::DeadlineExceeded, "Join without a leader");
    assert!(
        cluster.node(4).partition_status(1).await.is_ok(),
        "the unfinished Join left no replica to clean up"
    );

    // Node 1's Leave of partition 1 cannot commit without a quorum; while
    // it waits, another control call on node 1 is served.
    let mut node1 = cluster.node(1).node_client().await;
    let leave = tokio::spawn(async move {
        node1
            .leave(req(
                LeaveRequest { partition_id: 1 },
                Duration::from_secs(20),
            ))
            .await
    });
    let mut node1 = cluster.node(1).node_client().await;
    let other_layout: Vec<_> = (1..=3).map(|p| cluster.partition(p, &[1, 2, 3])).collect();
    let r = node1
        .bootstrap(req(
            BootstrapRequest {
                partitions: other_layout,
            },
            Duration::from_secs(3),
        ))
        .await;
    expect_code(
        r,
        Code::FailedPrecondition,
        "conflicting Bootstrap while a Leave waits",
    );
    let r = node1
        .leave(req(
            LeaveRequest { partition_id: 99 },
            Duration::from_secs(3),
        ))
        .await;
    expect_code(
        r,
        Code::NotFound,
        "Leave of an unknown partition while a Leave waits",
    );
    assert!(!leave.is_finished(), "Leave finished without a quorum");

    // The quorum returns: the Leave completes, and node 4's replica, never
    // configured, is removed by its own Leave.
    cluster.node_mut(2).restart().await;
    cluster.node_mut(3).restart().await;
    leave
        .await
        .unwrap()
        .unwrap_or_else(|s| panic!("Leave once the quorum is back: {s:?}"));
    cluster
        .node(4)
        .node_client()
        .await
        .leave(req(
            LeaveRequest { partition_id: 1 },
            Duration::from_secs(20),
        ))
        .await
        .unwrap_or_else(|s| panic!("Leave of the unfinished Join: {s:?}"));
    assert!(cluster.node(4).partition_status(1).await.is_err());
}
