//! One node per identity, and a shard that survives a malformed peer:
//! - a second `serve` on a data directory in use, or on an address another
//!   node listens on (even with SO_REUSEPORT), refuses to start and says
//!   which; of two started on one address at the same instant, at most
//!   one goes on serving;
//! - a heartbeat that commits past the end of a follower's log (which
//!   raft-rs would panic on) is dropped, and the node keeps serving;
//! - a node that is not a member can neither add voters nor, by a spoofed
//!   MsgTimeoutNow, move the leadership, nor ask for a control call (Leave)
//!   over the peer port;
//! - an append that would rewrite committed entries (raft-rs panics on it)
//!   is refused, and the follower keeps serving;
//! - a panic on a shard thread (set off by the debug build's test hook)
//!   ends the whole process with exit code 101 and one log line, never a
//!   half-dead node.

use std::io::Write;
use std::time::{Duration, Instant};

use multiraft::proto::node::LeaveRequest;
use multiraft::proto::peer::{
    envelope, AddVoterRequest, Envelope, Hello, PeerRequest, RaftMessage,
};
use prost::Message as _;
use protobuf::Message as _;

use crate::pb::multiraft::admin::v1::Role;
use crate::support::*;

/// Runs `multiraft serve` with `args` and returns its exit status and
/// output; panics if it is still running after 20 s.
fn serve_expecting_exit(args: &[String]) -> (std::process::ExitStatus, String) {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn multiraft serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let out = child.wait_with_output().expect("output");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status, text);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("a second `serve` ({args:?}) kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve_args(id: u64, api: &str, raft: &str, dir: &std::path::Path) -> Vec<String> {
    [
        "serve",
        "--node-id",
        &id.to_string(),
        "--api-addr",
        api,
        "--raft-addr",
        raft,
        "--data-dir",
        &dir.display().to_string(),
        "--shards",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_cannot_take_a_nodes_identity() {
    let cluster = Cluster::start(1, 2, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=1)).await;
    let node = cluster.node(1);
    let other = |port: u16| format!("127.0.0.1:{port}");
    let spare = cluster.dir.path().join("spare");

    let cases = [
        (
            "same data directory",
            serve_args(1, &other(free_port()), &other(free_port()), &node.data_dir),
            "is in use by another multiraft process",
        ),
        (
            "same API address",
            serve_args(
                2,
                &node.api_addr.to_string(),
                &other(free_port()),
                &spare.join("a"),
            ),
            "API address",
        ),
        (
            "same raft address",
            serve_args(
                3,
                &other(free_port()),
                &node.raft_addr.to_string(),
                &spare.join("b"),
            ),
            "raft address",
        ),
    ];
    for (what, args, says) in cases {
        let (status, out) = tokio::task::block_in_place(|| serve_expecting_exit(&args));
        assert!(!status.success(), "{what}: a second node started:\n{out}");
        assert!(
            out.contains(says),
            "{what}: the error does not say so:\n{out}"
        );
        if what == "same data directory" {
            let pid = node.pid().to_string();
            assert!(
                out.contains(&pid),
                "{what}: the holder's pid is not named:\n{out}"
            );
        }
    }
    // The first node is untouched.
    let mut kv = node.kv().await;
    put(&mut kv, 1, b"still", b"here").await;
}

/// Two nodes started in the same instant on one address both pass the
/// probe before either binds; the check after binding must still leave at
/// most one of them serving (else the kernel splits the address's
/// connections between them through SO_REUSEPORT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_started_at_once_on_one_address_do_not_both_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..3 {
        let api = format!("127.0.0.1:{}", free_port());
        let raft = format!("127.0.0.1:{}", free_port());
        let mut children: Vec<std::process::Child> = (1..=2u64)
            .map(|id| {
                let data = dir.path().join(format!("r{round}-n{id}"));
                std::process::Command::new(BIN)
                    .args(serve_args(id, &api, &raft, &data))
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn multiraft serve")
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        let exited = loop {
            let done: Vec<usize> = (0..2)
                .filter(|&i| matches!(children[i].try_wait(), Ok(Some(_))))
                .collect();
            if !done.is_empty() || Instant::now() >= deadline {
                break done;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut outputs = Vec::new();
        for mut child in children.drain(..) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            outputs.push(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        assert!(
            !exited.is_empty(),
            "round {round}: both nodes serve {api} / {raft}:\n{outputs:#?}"
        );
        for i in exited {
            assert!(
                outputs[i].contains("address") && outputs[i].contains("not available"),
                "round {round}: node {} exited without naming the address:\n{}",
                i + 1,
                outputs[i]
            );
        }
    }
}

/// Connects to `node`'s raft port as node `from` and sends `msg` for
/// partition 1.
fn send_as_peer(node: &Node, from: u64, msg: &raft::eraftpb::Message) -> std::net::TcpStream {
    let env = Envelope {
        body: Some(envelope::Body::Raft(RaftMessage {
            partition_id: 1,
            message: msg.write_to_bytes().unwrap().into(),
        })),
    };
    send_envelope(node, from, &env)
}

/// Connects to `node`'s raft port, says Hello as node `from`, sends `env`.
fn send_envelope(node: &Node, from: u64, env: &Envelope) -> std::net::TcpStream {
    let mut wire = Vec::new();
    for body in [
        Hello {
            node_id: from,
            reserved: 0,
            shard: Some(0),
        }
        .encode_to_vec(),
        env.encode_to_vec(),
    ] {
        wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
        wire.extend_from_slice(&body);
    }
    let mut sock = std::net::TcpStream::connect(node.raft_addr).unwrap();
    sock.write_all(&wire).unwrap();
    sock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_past_the_log_does_not_take_a_shard_down() {
    let cluster = Cluster::start(3, 1, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=1)).await;
    let (leader, term) = cluster.wait_leader(1, Duration::from_secs(10)).await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    let f = cluster.node(follower);
    let st = f.partition_status(1).await.unwrap();
    assert_eq!(st.role, Role::Follower as i32);

    // Pose as the leader on the follower's raft port.
    let mut hb = raft::eraftpb::Message::default();
    hb.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
    hb.from = leader;
    hb.to = follower;
    hb.term = term;
    hb.commit = st.commit_index + 1_000_000;
    let sock = send_as_peer(f, leader, &hb);

    wait_until(
        Duration::from_secs(10),
        "the follower to log the dropped heartbeat",
        async || f.log().contains("past the end of the log"),
    )
    .await;
    drop(sock);
    // Still whole: the process runs, its shard serves reads and writes.
    let mut cluster = cluster;
    assert!(
        cluster.node_mut(follower).try_exit().is_none(),
        "the follower exited"
    );
    let mut kv = cluster.node(follower).kv().await;
    put(&mut kv, 1, b"after-attack", b"ok").await;
    assert_eq!(
        get(&mut kv, 1, b"after-attack", false).await.as_deref(),
        Some(&b"ok"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_that_rewrites_committed_entries_is_refused() {
    let cluster = Cluster::start(3, 1, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=1)).await;
    let (leader, term) = cluster.wait_leader(1, Duration::from_secs(10)).await;
    let mut kv = cluster.node(leader).kv().await;
    put(&mut kv, 1, b"k", b"v").await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    let commit = wait_for(
        Duration::from_secs(10),
        "the follower to commit past the bootstrap snapshot",
        async || match cluster.node(follower).partition_status(1).await {
            Ok(s) if s.commit_index > 6 => Ok(s.commit_index),
            Ok(s) => Err(format!("commit index {}", s.commit_index)),
            Err(e) => Err(e),
        },
    )
    .await;

    // An append after the committed entry (so raft-rs would take it) that
    // carries a different committed entry 6 (which raft-rs panics on).
    let mut app = raft::eraftpb::Message::default();
    app.set_msg_type(raft::eraftpb::MessageType::MsgAppend);
    app.from = leader;
    app.to = follower;
    app.term = term;
    app.index = commit;
    app.log_term = term;
    let e = raft::eraftpb::Entry {
        index: 6,
        term,
        ..Default::default()
    };
    app.set_entries(vec![e].into());
    let _sock = send_as_peer(cluster.node(follower), leader, &app);

    wait_until(
        Duration::from_secs(10),
        "the refusal in the follower's log",
        async || {
            cluster
                .node(follower)
                .log()
                .contains("dropped a raft message: an append after index")
        },
    )
    .await;
    // The follower is whole: it takes and serves new writes.
    put(&mut kv, 1, b"after", b"append").await;
    let mut kv_f = cluster.node(follower).kv().await;
    assert_eq!(
        get(&mut kv_f, 1, b"after", false).await.as_deref(),
        Some(&b"append"[..])
    );
    assert!(cluster.node(follower).is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_a_shard_stops_the_whole_node() {
    let dir = test_dir();
    let config = dir.path().join("config.json");
    std::fs::write(&config, FAST_CONFIG).unwrap();
    let mut node = Node::new(dir.path(), 1, 2, Some(config));
    // The debug build's hook panics shard 1 two seconds into serving.
    node.exec_prefix = vec!["env".into(), "MULTIRAFT_DEBUG_PANIC_SHARD=1".into()];
    node.start();
    wait_until(Duration::from_secs(20), "the node to serve", async || {
        node.log().contains("node ready")
    })
    .await;
    let status = node.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(101), "exit status {status}");
    let log = node.log();
    assert!(
        log.contains("panic, stopping the node") && log.contains("MULTIRAFT_DEBUG_PANIC_SHARD=1"),
        "no log line names the panic:\n{}",
        node.log_tail(20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_changes_neither_membership_nor_leadership() {
    let cluster = Cluster::start(3, 1, Some(FAST_CONFIG)).await;
    cluster.bootstrap(&cluster.layout(1..=1)).await;
    let (leader, term) = cluster.wait_leader(1, Duration::from_secs(10)).await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    let outsider = 999;

    // "Add node 4242", asked by node 999 of the leader.
    let add = Envelope {
        body: Some(envelope::Body::Request(PeerRequest {
            id: 1,
            origin_shard: 0,
            method: "/multiraft.peer.v1.Internal/AddVoter".into(),
            body: AddVoterRequest {
                partition_id: 1,
                node_id: 4242,
                raft_addr: "127.0.0.1:9".into(),
            }
            .encode_to_vec()
            .into(),
            timeout_ms: 2000,
            reply_addr: String::new(),
        })),
    };
    let _a = send_envelope(cluster.node(leader), outsider, &add);
    // "Leave partition 1", asked by node 999 of a follower over the peer
    // port (control calls come only through the API port).
    let leave = Envelope {
        body: Some(envelope::Body::Request(PeerRequest {
            id: 2,
            origin_shard: 0,
            method: "/atomix.multiraft.v1.Node/Leave".into(),
            body: LeaveRequest { partition_id: 1 }.encode_to_vec().into(),
            timeout_ms: 2000,
            reply_addr: String::new(),
        })),
    };
    // "Campaign now", told by node 999 to a follower.
    let mut tn = raft::eraftpb::Message::default();
    tn.set_msg_type(raft::eraftpb::MessageType::MsgTimeoutNow);
    tn.from = outsider;
    tn.to = follower;
    tn.term = term;
    let _b = send_as_peer(cluster.node(follower), outsider, &tn);
    let _c = send_envelope(cluster.node(follower), outsider, &leave);

    wait_until(
        Duration::from_secs(10),
        "both refusals in the logs",
        async || {
            cluster
                .node(leader)
                .log()
                .contains("refused a membership change")
                && cluster
                    .node(follower)
                    .log()
                    .contains("its sender is not a member of the partition here")
                && cluster
                    .node(follower)
                    .log()
                    .contains("Leave is not served over the peer port")
        },
    )
    .await;
    for id in cluster.ids() {
        let st = cluster.node(id).partition_status(1).await.unwrap();
        assert_eq!(st.voters, vec![1, 2, 3], "node {id}");
    }
    assert_eq!(
        cluster.agreed_leader(1).await.unwrap(),
        (leader, term),
        "the leadership moved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_data_directory_works() {
    let dir = test_dir();
    let api = format!("127.0.0.1:{}", free_port());
    let raft = format!("127.0.0.1:{}", free_port());
    let args = serve_args(1, &api, &raft, std::path::Path::new("data"));
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(&args)
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn multiraft serve");
    let ready = wait_for(Duration::from_secs(20), "Admin/Status", async || {
        if let Some(status) = child.try_wait().unwrap() {
            return Ok(Err(status));
        }
        let channel = connect(api.parse().unwrap(), Duration::from_secs(1)).await;
        crate::pb::multiraft::admin::v1::admin_client::AdminClient::new(channel)
            .status(req(
                crate::pb::multiraft::admin::v1::StatusRequest {},
                Duration::from_secs(2),
            ))
            .await
            .map(|_| Ok(()))
            .map_err(|e| format!("{e:?}"))
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("node.log")).unwrap();
    assert!(
        ready.is_ok(),
        "serve --data-dir data exited: {ready:?}\n{log}"
    );
    assert!(dir.path().join("data/node.json").exists(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_memlock_limit_is_named() {
    // Root ignores RLIMIT_MEMLOCK: run the node as nobody, with setpriv.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0
        || std::process::Command::new("setpriv")
            .arg("--help")
            .output()
            .is_err()
    {
        note("skipped: needs root and setpriv to run a node as another user");
        return;
    }
    // A directory nobody can reach, outside the (root-only) build tree.
    let dir = tempfile::Builder::new()
        .prefix("multiraft-memlock-")
        .tempdir_in("/tmp")
        .unwrap();
    let bin = dir.path().join("multiraft");
    std::fs::copy(BIN, &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = format!(
        "ulimit -l 64 && exec {} serve --node-id 1 --api-addr 127.0.0.1:{} --raft-addr 127.0.0.1:{} --data-dir {}/data --shards 2",
        bin.display(),
        free_port(),
        free_port(),
        dir.path().display()
    );
    let out = tokio::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "bash",
            "-c",
            &script,
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("a node that cannot lock its memory exits")
        .unwrap();
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "the node started with a 64 KiB memlock limit:\n{text}"
    );
    assert!(text.contains("RLIMIT_MEMLOCK is 64 KiB"), "{text}");

    // A low soft limit under a high hard one is raised by the node itself.
    let log = dir.path().join("soft.log");
    let script = format!(
        "ulimit -S -l 64 && exec {} serve --node-id 1 --api-addr 127.0.0.1:{} --raft-addr 127.0.0.1:{} --data-dir {}/soft --shards 2 >{} 2>&1",
        bin.display(),
        free_port(),
        free_port(),
        dir.path().display(),
        log.display()
    );
    let hard = std::process::Command::new("bash")
        .args(["-c", "ulimit -H -l"])
        .output()
        .unwrap();
    let mut child = tokio::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "bash",
            "-c",
            &script,
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "the node to start", async || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("node ready"))
    })
    .await;
    let _ = child.kill().await;
    note(format!(
        "started with a soft limit of 64 KiB under a hard one of {}",
        String::from_utf8_lossy(&hard.stdout).trim()
    ));
}
