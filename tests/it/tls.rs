//! TLS with real certificates (made by `deploy/tls/make-certs.sh`):
//! - peers prove who they are: a connection that claims to be a member is
//!   refused without a certificate of the cluster CA naming that member,
//!   whether it speaks no TLS, holds another CA's certificate, or holds a
//!   cluster certificate of another node; the same message with the right
//!   certificate does take effect (so the refusals are what stop it);
//! - the API port serves TLS, and its control service needs a client
//!   certificate while KV calls do not;
//! - a node refuses to start with a certificate that does not name it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use multiraft::proto::peer::{envelope, Envelope, Hello, RaftMessage};
use prost::Message as _;
use protobuf::Message as _;
use tokio::io::AsyncWriteExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::pb::atomix::multiraft::v1::node_client::NodeClient;
use crate::pb::atomix::multiraft::v1::BootstrapRequest;
use crate::pb::multiraft::admin::v1::admin_client::AdminClient;
use crate::pb::multiraft::admin::v1::StatusRequest;
use crate::pb::multiraft::kv::v1::kv_client::KvClient;
use crate::support::*;

/// Runs `deploy/tls/make-certs.sh DIR IDS...` and returns `dir`.
pub(crate) fn make_certs(dir: &Path, ids: &[u64]) -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/tls/make-certs.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(dir)
        .args(ids.iter().map(|id| id.to_string()))
        .output()
        .expect("run make-certs.sh");
    assert!(
        out.status.success(),
        "make-certs.sh failed: {}",
        output_text(&out)
    );
    dir.to_owned()
}

fn file(certs: &Path, name: &str) -> String {
    certs.join(name).display().to_string()
}

/// `serve` arguments for mutual TLS as node `id`.
pub(crate) fn peer_tls_args(certs: &Path, id: u64) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        file(certs, "ca.pem"),
        "--tls-cert".into(),
        file(certs, &format!("node-{id}.pem")),
        "--tls-key".into(),
        file(certs, &format!("node-{id}.key")),
    ]
}

/// Starts node 1 (one shard, fast elections) under `dir` with the TLS
/// files of node `cert_of` in `certs` and `more` arguments.
fn start_tls_node(dir: &Path, certs: &Path, cert_of: u64, more: &[&str]) -> Node {
    let config = dir.join("config.json");
    std::fs::write(&config, FAST_CONFIG).unwrap();
    let mut node = Node::new(dir, 1, 1, Some(config));
    node.extra_args = peer_tls_args(certs, cert_of);
    node.extra_args.extend(more.iter().map(|a| a.to_string()));
    node.start();
    node
}

/// A length-prefixed peer frame.
fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn hello(claim: u64) -> Vec<u8> {
    frame(
        Hello {
            node_id: claim,
            reserved: 0,
            shard: Some(0),
        }
        .encode_to_vec(),
    )
}

/// "Campaign now", from `from` to `to`, for partition 1.
fn timeout_now(from: u64, to: u64, term: u64) -> Vec<u8> {
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgTimeoutNow);
    m.from = from;
    m.to = to;
    m.term = term;
    let env = Envelope {
        body: Some(envelope::Body::Raft(RaftMessage {
            partition_id: 1,
            message: m.write_to_bytes().unwrap().into(),
        })),
    };
    frame(env.encode_to_vec())
}

/// Connects to `node`'s raft port, says Hello as `claim` in clear and sends
/// `payload` without TLS.
async fn send_plain(node: &Node, claim: u64, payload: &[u8]) -> tokio::net::TcpStream {
    let mut sock = tokio::net::TcpStream::connect(node.raft_addr)
        .await
        .unwrap();
    sock.write_all(&hello(claim)).await.unwrap();
    sock.write_all(payload).await.unwrap();
    sock
}

/// Connects to `node`'s raft port, says Hello as `claim`, runs a TLS
/// handshake presenting `cert`/`key` (trusting `ca` for the node's own
/// certificate) and sends `payload`. The node may refuse during or after
/// the handshake; either way the connection is returned to be kept open.
async fn send_tls(
    node: &Node,
    claim: u64,
    ca: &Path,
    cert: &Path,
    key: &Path,
    payload: &[u8],
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config =
        multiraft::internals::api_client(ca, Some((cert, key))).expect("client TLS config");
    let mut sock = tokio::net::TcpStream::connect(node.raft_addr)
        .await
        .unwrap();
    sock.write_all(&hello(claim)).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(multiraft::internals::node_name(node.id), sock)
        .await
        .ok()?;
    let _ = tls.write_all(payload).await;
    let _ = tls.flush().await;
    Some(tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_certificate_naming_a_member_speaks_for_it() {
    let dir = test_dir();
    let certs = make_certs(&dir.path().join("cluster"), &[1, 2, 3, 4]);
    let foreign = make_certs(&dir.path().join("foreign"), &[1, 2, 3]);
    let cluster =
        Cluster::start_with(3, 1, Some(FAST_CONFIG), |id| peer_tls_args(&certs, id)).await;
    cluster.bootstrap(&cluster.layout(1..=1)).await;
    // Raft runs over TLS: a write needs a quorum.
    let (leader, term) = cluster.wait_leader(1, Duration::from_secs(10)).await;
    let mut kv = cluster.node(leader).kv().await;
    put(&mut kv, 1, b"over", b"tls").await;
    let follower = cluster.node(cluster.ids().into_iter().find(|&id| id != leader).unwrap());
    let campaign = timeout_now(leader, follower.id, term);
    let ca = certs.join("ca.pem");

    // Each claims to be the leader, which is a member.
    let _plain = send_plain(follower, leader, &campaign).await;
    let _other_ca = send_tls(
        follower,
        leader,
        &ca,
        &foreign.join(format!("node-{leader}.pem")),
        &foreign.join(format!("node-{leader}.key")),
        &campaign,
    )
    .await;
    let _other_node = send_tls(
        follower,
        leader,
        &ca,
        &certs.join("node-4.pem"),
        &certs.join("node-4.key"),
        &campaign,
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "three refused peer connections in the follower's log",
        async || follower.log().matches("peer connection refused").count() >= 3,
    )
    .await;
    let log = follower.log();
    assert!(
        log.contains(&format!("does not name node {leader}")),
        "the node-4 certificate was not refused for its name:\n{log}"
    );
    assert_eq!(
        cluster.agreed_leader(1).await.unwrap(),
        (leader, term),
        "a refused connection moved the leadership"
    );
    let mut kv = cluster.node(leader).kv().await;
    put(&mut kv, 1, b"still", b"leader").await;

    // The same message with the leader's own certificate is stepped: the
    // follower campaigns and wins a later term.
    let _genuine = send_tls(
        follower,
        leader,
        &ca,
        &certs.join(format!("node-{leader}.pem")),
        &certs.join(format!("node-{leader}.key")),
        &campaign,
    )
    .await
    .expect("a handshake with the leader's certificate");
    wait_until(
        Duration::from_secs(20),
        "the follower to lead after a genuine MsgTimeoutNow",
        async || {
            cluster
                .agreed_leader(1)
                .await
                .is_ok_and(|(l, t)| l == follower.id && t > term)
        },
    )
    .await;
}

fn tls_endpoint(node: &Node, certs: &Path, identity: bool) -> Endpoint {
    let ca = std::fs::read(certs.join("ca.pem")).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if identity {
        let cert = std::fs::read(certs.join("client.pem")).unwrap();
        let key = std::fs::read(certs.join("client.key")).unwrap();
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{}", node.api_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(30))
}

async fn tls_channel(node: &Node, certs: &Path, identity: bool) -> Channel {
    let endpoint = tls_endpoint(node, certs, identity);
    wait_for(
        Duration::from_secs(20),
        "Admin/Status over TLS",
        async || {
            let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
            AdminClient::new(channel.clone())
                .status(req(StatusRequest {}, Duration::from_secs(2)))
                .await
                .map_err(|e| format!("{e:?}"))?;
            Ok::<_, String>(channel)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_tls_and_control_calls_need_a_client_certificate() {
    let dir = test_dir();
    let certs = make_certs(&dir.path().join("certs"), &[1]);
    let ca = file(&certs, "ca.pem");
    let node = start_tls_node(dir.path(), &certs, 1, &["--api-client-ca", &ca]);

    let operator = tls_channel(&node, &certs, true).await;
    let anonymous = tls_channel(&node, &certs, false).await;
    let layout = BootstrapRequest {
        partitions: vec![crate::pb::atomix::multiraft::v1::PartitionConfig {
            partition_id: 1,
            members: [(1, node.raft_addr.to_string())].into_iter().collect(),
        }],
    };
    let refused = NodeClient::new(anonymous.clone())
        .bootstrap(req(layout.clone(), Duration::from_secs(20)))
        .await;
    let msg = expect_code(
        refused,
        tonic::Code::Unauthenticated,
        "Bootstrap without a certificate",
    );
    assert!(msg.contains("client certificate"), "{msg}");
    NodeClient::new(operator)
        .bootstrap(req(layout, Duration::from_secs(20)))
        .await
        .expect("Bootstrap with the operator's certificate");

    // KV needs no client certificate.
    let mut kv = KvClient::new(anonymous);
    put(&mut kv, 1, b"k", b"v").await;
    assert_eq!(
        get(&mut kv, 1, b"k", false).await.as_deref(),
        Some(&b"v"[..])
    );

    // Plaintext HTTP/2 gets no answer from a TLS port.
    let plain = Endpoint::from_shared(format!("http://{}", node.api_addr))
        .unwrap()
        .timeout(Duration::from_secs(5));
    let plain_call = async {
        let channel = plain.connect().await.map_err(|e| e.to_string())?;
        AdminClient::new(channel)
            .status(req(StatusRequest {}, Duration::from_secs(5)))
            .await
            .map_err(|e| e.to_string())
    };
    assert!(plain_call.await.is_err(), "h2c was served on the TLS port");

    // The command line speaks TLS too.
    let addr = node.api_addr.to_string();
    let out = cli(
        &[
            "status",
            "--addr",
            &addr,
            "--tls-ca",
            &file(&certs, "ca.pem"),
        ],
        Duration::from_secs(20),
    )
    .await;
    assert!(
        out.status.success(),
        "status over TLS: {}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains("LEADER"),
        "{}",
        output_text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_auth_all_every_call_needs_a_client_certificate() {
    let dir = test_dir();
    let certs = make_certs(&dir.path().join("certs"), &[1]);
    let ca = file(&certs, "ca.pem");
    let node = start_tls_node(
        dir.path(),
        &certs,
        1,
        &["--api-client-ca", &ca, "--api-auth", "all"],
    );
    let operator = tls_channel(&node, &certs, true).await;
    let layout = BootstrapRequest {
        partitions: vec![crate::pb::atomix::multiraft::v1::PartitionConfig {
            partition_id: 1,
            members: [(1, node.raft_addr.to_string())].into_iter().collect(),
        }],
    };
    NodeClient::new(operator.clone())
        .bootstrap(req(layout, Duration::from_secs(20)))
        .await
        .expect("Bootstrap with the operator's certificate");
    put(&mut KvClient::new(operator), 1, b"k", b"v").await;

    // Without a certificate the handshake itself fails: no call gets in.
    let anonymous = tls_endpoint(&node, &certs, false);
    let call = async {
        let channel = anonymous.connect().await.map_err(|e| e.to_string())?;
        KvClient::new(channel)
            .get(req(
                crate::pb::multiraft::kv::v1::GetRequest {
                    key: b"k".to_vec(),
                    partition_id: 1,
                    serializable: true,
                },
                Duration::from_secs(5),
            ))
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        call.await.is_err(),
        "a call without a certificate was served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_a_certificate_that_does_not_name_it() {
    let dir = test_dir();
    let certs = make_certs(&dir.path().join("certs"), &[1, 2]);
    let mut node = start_tls_node(dir.path(), &certs, 2, &[]);
    let status = node.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success());
    let log = node.log();
    assert!(log.contains("does not name node 1"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificates_and_keeps_them_on_bad_files() {
    let dir = test_dir();
    let live = make_certs(&dir.path().join("live"), &[1]);
    let next = make_certs(&dir.path().join("next"), &[1]);
    let old = dir.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::copy(live.join("ca.pem"), old.join("ca.pem")).unwrap();
    let node = start_tls_node(dir.path(), &live, 1, &["--api-tls"]);
    tls_channel(&node, &live, false).await;

    // New files from another CA in place, then SIGHUP.
    for f in ["ca.pem", "node-1.pem", "node-1.key"] {
        std::fs::copy(next.join(f), live.join(f)).unwrap();
    }
    let hup = |n: &Node| {
        // SAFETY: plain kill(2) on a pid the harness spawned.
        assert_eq!(
            unsafe { libc::kill(n.pid() as libc::pid_t, libc::SIGHUP) },
            0
        );
    };
    hup(&node);
    wait_until(
        Duration::from_secs(10),
        "the reload in the log",
        async || node.log().contains("TLS certificates reloaded"),
    )
    .await;
    // New connections get the new certificate: the new CA's clients get
    // in, the old CA's do not.
    tls_channel(&node, &next, false).await;
    let old_ca = tls_endpoint(&node, &old, false);
    let refused = async {
        let channel = old_ca.connect().await.map_err(|e| e.to_string())?;
        crate::pb::multiraft::admin::v1::admin_client::AdminClient::new(channel)
            .status(req(
                crate::pb::multiraft::admin::v1::StatusRequest {},
                Duration::from_secs(5),
            ))
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        refused.await.is_err(),
        "the old certificate is still served"
    );

    // A broken file is refused and the working certificate stays.
    std::fs::write(live.join("node-1.pem"), "not a certificate").unwrap();
    hup(&node);
    wait_until(
        Duration::from_secs(10),
        "the failed reload in the log",
        async || {
            node.log()
                .contains("TLS reload failed, keeping the old files")
        },
    )
    .await;
    tls_channel(&node, &next, false).await;
}
