//! Test harness: `multiraft serve` processes on loopback ports, clusters of
//! them, gRPC clients, the command line, and condition polling.
//!
//! Every node runs as a real child process with its own data directory and a
//! log file (stdout and stderr) in the test's temporary directory. Nodes are
//! started, and waited for, by the crate's own launcher
//! (`multiraft::cli::launch`, shared with `multiraft cluster` and `bench`);
//! readiness is asked with the tonic client, like everything else here.
//! Children are killed when their `Node` is dropped; when that happens
//! because a test is panicking, the tail of every node's log is printed so
//! the failure comes with the servers' side of the story (libtest shows it
//! with the failure).
//!
//! Tests never sleep to synchronise: they poll a condition with
//! [`wait_until`] / [`wait_for`] until it holds or a deadline passes.

#![allow(dead_code)] // Not every test module uses every helper.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use multiraft::cli::launch::{self, NotReady, Serve};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::pb::atomix::multiraft::v1::node_client::NodeClient;
use crate::pb::atomix::multiraft::v1::{BootstrapRequest, PartitionConfig};
use crate::pb::multiraft::admin::v1::admin_client::AdminClient;
use crate::pb::multiraft::admin::v1::{PartitionStatus, Role, StatusRequest, StatusResponse};
use crate::pb::multiraft::kv::v1::kv_client::KvClient;
use crate::pb::multiraft::kv::v1::{GetRequest, PutRequest};

/// The server binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_multiraft");

/// Raft timing for most tests: elections settle in well under a second.
pub const FAST_CONFIG: &str = r#"{"heartbeatPeriod":"0.05s","electionTimeout":"0.5s"}"#;

/// How long a freshly spawned node may take to answer `Admin/Status`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Default bound on a control call (Bootstrap, Join, Leave).
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Default bound on one data-plane call.
pub const KV_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of each node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

/// A free loopback port no other node of this test run was given.
pub fn free_port() -> u16 {
    launch::free_port().expect("a free loopback port")
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A fresh directory for one test's node data and logs.
///
/// It lives under `MULTIRAFT_TEST_DIR` if set, else under cargo's
/// `target/tmp`, not the system temp dir: the WAL uses O_DIRECT, which a
/// tmpfs `/tmp` may not support, and a real disk is what the durability
/// tests are about. Set `MULTIRAFT_KEEP_TEST_DIRS=1` to keep it afterwards.
pub fn test_dir() -> tempfile::TempDir {
    let base = std::env::var_os("MULTIRAFT_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).expect("create test base dir");
    let mut dir = tempfile::Builder::new()
        .prefix("multiraft-it-")
        .tempdir_in(&base)
        .expect("tempdir");
    if std::env::var_os("MULTIRAFT_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("test directory kept: {}", dir.path().display());
    }
    dir
}

/// Polls `probe` every ~50 ms until it returns `Ok`, and returns that value.
/// Panics naming `what` and the probe's last error once `timeout` has passed.
pub async fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(value) => return value,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last observation: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `cond` every ~50 ms until it is true; panics naming `what` once
/// `timeout` has passed.
pub async fn wait_until(timeout: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    wait_for(timeout, what, async || {
        if cond().await {
            Ok(())
        } else {
            Err("condition still false".to_string())
        }
    })
    .await
}

/// A tonic request with a gRPC deadline (`grpc-timeout`) the server must honour.
pub fn req<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Asserts that `result` failed with `code`, and returns the status message.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    what: &str,
) -> String {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, got OK: {v:?}"),
        Err(s) => {
            assert_eq!(
                s.code(),
                code,
                "{what}: expected {code:?}, got {:?}: {}",
                s.code(),
                s.message()
            );
            s.message().to_string()
        }
    }
}

/// Connects a channel to `addr`, retrying until `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Channel {
    let endpoint = endpoint(addr);
    wait_for(
        timeout,
        &format!("a gRPC connection to {addr}"),
        async || endpoint.connect().await.map_err(|e| format!("{e:?}")),
    )
    .await
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint uri")
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        // Client-side backstop so that no call can hang a test; calls that
        // test deadlines set a much shorter `grpc-timeout` themselves.
        .timeout(Duration::from_secs(60))
}

/// One `multiraft serve` process (or its stopped state between restarts).
pub struct Node {
    pub id: u64,
    pub api_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub shards: u32,
    pub config_path: Option<PathBuf>,
    /// Further `serve` arguments appended on every (re)start.
    pub extra_args: Vec<String>,
    /// A command the server is started through, e.g. `ip netns exec NAME`
    /// to run it inside a network namespace; empty runs the binary directly.
    /// The prefix must exec the server in place (as `ip netns exec` does) so
    /// that `pid()`, signals and `kill9` reach the server itself.
    pub exec_prefix: Vec<String>,
    child: Option<Child>,
    /// Cached connection; reset whenever the process changes.
    channel: Mutex<Option<Channel>>,
    starts: u32,
}

impl Node {
    /// Describes a node whose files live under `root/node-{id}`; does not start it.
    pub fn new(root: &Path, id: u64, shards: u32, config_path: Option<PathBuf>) -> Node {
        let dir = root.join(format!("node-{id}"));
        std::fs::create_dir_all(&dir).expect("create node dir");
        Node {
            id,
            api_addr: free_addr(),
            raft_addr: free_addr(),
            data_dir: dir.join("data"),
            log_path: dir.join("node.log"),
            shards,
            config_path,
            extra_args: Vec::new(),
            exec_prefix: Vec::new(),
            child: None,
            channel: Mutex::new(None),
            starts: 0,
        }
    }

    /// How the launcher runs this node, from the fields above as they are
    /// at each (re)start.
    pub fn serve(&self) -> Serve {
        Serve {
            exe: BIN.into(),
            node_id: self.id,
            api_addr: self.api_addr.to_string(),
            raft_addr: self.raft_addr.to_string(),
            data_dir: self.data_dir.clone(),
            shards: Some(self.shards as usize),
            config: self.config_path.clone(),
            extra_args: self.extra_args.clone(),
            exec_prefix: self.exec_prefix.clone(),
            log: self.log_path.clone(),
            rust_log: std::env::var("MULTIRAFT_TEST_LOG").unwrap_or_else(|_| "info".to_string()),
        }
    }

    /// Spawns the process (without waiting for it to be ready). The kernel
    /// kills it if the test process dies without running destructors
    /// (abort, SIGKILL), so no stray servers outlive a test run.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        self.starts += 1;
        let child = self
            .serve()
            .spawn(self.starts)
            .unwrap_or_else(|e| panic!("{e}"));
        self.child = Some(child);
        *self.channel.lock().unwrap() = None;
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node not running").id()
    }

    /// Returns the exit status if the process has exited (and forgets it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait().expect("try_wait") {
            Some(status) => {
                self.child = None;
                *self.channel.lock().unwrap() = None;
                Some(status)
            }
            None => None,
        }
    }

    /// Waits for the process to exit on its own within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let id = self.id;
        wait_for(timeout, &format!("node {id} to exit"), async || {
            self.try_exit().ok_or_else(|| "still running".to_string())
        })
        .await
    }

    /// Waits until the node answers `Admin/Status`; panics (with its log
    /// tail) if the process exits first.
    pub async fn wait_ready(&mut self) {
        let id = self.id;
        let child = self
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        let endpoint = endpoint(self.api_addr);
        let cache = &self.channel;
        let answers_status = async || {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            AdminClient::new(channel.clone())
                .status(req(StatusRequest {}, Duration::from_secs(2)))
                .await
                .map_err(|s| format!("Status: {:?} {}", s.code(), s.message()))?;
            *cache.lock().unwrap() = Some(channel);
            Ok(())
        };
        match launch::wait_ready(child, READY_TIMEOUT, answers_status).await {
            Ok(()) => {}
            Err(NotReady::Exited(status)) => {
                self.child = None;
                *self.channel.lock().unwrap() = None;
                panic!(
                    "node {id} exited with {status} before becoming ready; log tail:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            Err(NotReady::TimedOut(last)) => panic!(
                "node {id} did not answer Admin/Status within {READY_TIMEOUT:?} \
                 (last: {last}); log tail:\n{}",
                self.log_tail(LOG_TAIL_LINES)
            ),
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("node not running");
        let _ = child.kill();
        child.wait().expect("wait after SIGKILL");
        *self.channel.lock().unwrap() = None;
    }

    /// SIGTERM, then wait for the exit (SIGKILL and panic if it does not
    /// come within `timeout`).
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: plain syscall on a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) node {}", self.id);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "node {} did not exit within {timeout:?} of SIGTERM",
                    self.id
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the node again with the same arguments and data dir, and waits
    /// until it is ready.
    pub async fn restart(&mut self) {
        if self.is_running() {
            self.kill9();
        }
        self.start();
        self.wait_ready().await;
    }

    /// A channel to the API port (connecting with retry if needed).
    pub async fn channel(&self) -> Channel {
        let cached = self.channel.lock().unwrap().clone();
        if let Some(ch) = cached {
            return ch;
        }
        let ch = connect(self.api_addr, Duration::from_secs(10)).await;
        *self.channel.lock().unwrap() = Some(ch.clone());
        ch
    }

    pub async fn node_client(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    pub async fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel().await)
    }

    /// `Admin/Status`, with connection problems folded into the error string
    /// so that it can be used inside polling loops.
    pub async fn status(&self) -> Result<StatusResponse, String> {
        if !self.is_running() {
            return Err(format!("node {} is not running", self.id));
        }
        let cached = self.channel.lock().unwrap().clone();
        let channel = match cached {
            Some(ch) => ch,
            None => endpoint(self.api_addr)
                .connect()
                .await
                .map_err(|e| format!("node {}: connect: {e:?}", self.id))?,
        };
        *self.channel.lock().unwrap() = Some(channel.clone());
        AdminClient::new(channel)
            .status(req(StatusRequest {}, Duration::from_secs(5)))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("node {}: Status: {:?} {}", self.id, s.code(), s.message()))
    }

    /// This node's status of `partition`, if it hosts it.
    pub async fn partition_status(&self, partition: u32) -> Result<PartitionStatus, String> {
        let status = self.status().await?;
        status
            .partitions
            .into_iter()
            .find(|p| p.partition_id == partition)
            .ok_or_else(|| format!("node {} does not list partition {partition}", self.id))
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        launch::log_tail(&self.log_path, lines)
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- node {} (api {}, raft {}) log tail: {} -----\n{}\n----- end of node {} log -----",
                self.id,
                self.api_addr,
                self.raft_addr,
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES),
                self.id
            );
        }
    }
}

/// A set of nodes with ids 1..=n sharing one temporary directory.
pub struct Cluster {
    // Field order matters: nodes (and their log printing) drop before `dir`.
    pub nodes: Vec<Node>,
    pub shards: u32,
    pub config_path: Option<PathBuf>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes with `--shards shards` and, if given, `config_json`
    /// as `--config`, and waits until all answer `Admin/Status`.
    pub async fn start(n: usize, shards: u32, config_json: Option<&str>) -> Cluster {
        Cluster::start_with(n, shards, config_json, |_| Vec::new()).await
    }

    /// [`Cluster::start`], with `args(id)` appended to node `id`'s `serve`
    /// arguments.
    pub async fn start_with(
        n: usize,
        shards: u32,
        config_json: Option<&str>,
        args: impl Fn(u64) -> Vec<String>,
    ) -> Cluster {
        let dir = test_dir();
        let config_path = config_json.map(|json| {
            let path = dir.path().join("config.json");
            std::fs::write(&path, json).expect("write config");
            path
        });
        let mut cluster = Cluster {
            nodes: Vec::new(),
            shards,
            config_path,
            dir,
        };
        for _ in 0..n {
            let id = cluster.add_node();
            cluster.node_mut(id).extra_args = args(id);
        }
        for node in &mut cluster.nodes {
            node.start();
        }
        for node in &mut cluster.nodes {
            node.wait_ready().await;
        }
        cluster
    }

    /// Adds (but does not start) node `len + 1` with the cluster's settings.
    pub fn add_node(&mut self) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let node = Node::new(self.dir.path(), id, self.shards, self.config_path.clone());
        self.nodes.push(node);
        id
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    pub fn node_mut(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn running_ids(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.id)
            .collect()
    }

    /// A partition whose members are the given nodes, with their raft addresses.
    pub fn partition(&self, partition_id: u32, members: &[u64]) -> PartitionConfig {
        PartitionConfig {
            partition_id,
            members: members
                .iter()
                .map(|&id| (id, self.node(id).raft_addr.to_string()))
                .collect(),
        }
    }

    /// Partitions `ids`, each with every node of the cluster as a member.
    pub fn layout(&self, ids: impl IntoIterator<Item = u32>) -> Vec<PartitionConfig> {
        let members = self.ids();
        ids.into_iter()
            .map(|p| self.partition(p, &members))
            .collect()
    }

    /// Calls Bootstrap with `layout` on the given nodes concurrently (each
    /// call returns only once its partitions have leaders, which needs a
    /// quorum of bootstrapped replicas) and panics on any failure.
    pub async fn bootstrap_nodes(&self, nodes: &[u64], layout: &[PartitionConfig]) {
        let mut calls = Vec::new();
        for &id in nodes {
            let mut client = self.node(id).node_client().await;
            let request = BootstrapRequest {
                partitions: layout.to_vec(),
            };
            calls.push(tokio::spawn(async move {
                (id, client.bootstrap(req(request, CONTROL_TIMEOUT)).await)
            }));
        }
        for call in calls {
            let (id, result) = call.await.expect("bootstrap task");
            if let Err(s) = result {
                panic!("Bootstrap on node {id}: {:?} {}", s.code(), s.message());
            }
        }
    }

    /// Bootstraps every node with `layout`.
    pub async fn bootstrap(&self, layout: &[PartitionConfig]) {
        let ids = self.ids();
        self.bootstrap_nodes(&ids, layout).await;
    }

    /// The statuses of all running nodes, by node id.
    pub async fn statuses(&self) -> Result<BTreeMap<u64, StatusResponse>, String> {
        let mut out = BTreeMap::new();
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            out.insert(node.id, node.status().await?);
        }
        Ok(out)
    }

    /// The leader of `partition` if the running nodes agree on one: a
    /// majority of its voters reports the same leader id and term, and that
    /// leader (when running) reports itself as leader at that term.
    pub async fn agreed_leader(&self, partition: u32) -> Result<(u64, u64), String> {
        let statuses = self.statuses().await?;
        agreed_leader(&statuses, partition)
    }

    /// Waits (up to `timeout`) for an agreed leader of `partition`.
    pub async fn wait_leader(&self, partition: u32, timeout: Duration) -> (u64, u64) {
        wait_for(
            timeout,
            &format!("an agreed leader of partition {partition}"),
            async || self.agreed_leader(partition).await,
        )
        .await
    }

    /// Waits until every running node that hosts `partition` has applied at
    /// least the leader's current commit index.
    pub async fn wait_caught_up(&self, partition: u32, timeout: Duration) {
        wait_for(
            timeout,
            &format!("all replicas of partition {partition} to catch up"),
            async || {
                let statuses = self.statuses().await?;
                let (leader, _) = agreed_leader(&statuses, partition)?;
                let commit = statuses
                    .get(&leader)
                    .and_then(|s| find_partition(s, partition))
                    .map(|p| p.commit_index)
                    .ok_or_else(|| format!("leader {leader} status unavailable"))?;
                for (id, s) in &statuses {
                    if let Some(p) = find_partition(s, partition) {
                        if p.applied_index < commit {
                            return Err(format!(
                                "node {id} applied {} < leader commit {commit}",
                                p.applied_index
                            ));
                        }
                    }
                }
                Ok(())
            },
        )
        .await
    }
}

pub fn find_partition(status: &StatusResponse, partition: u32) -> Option<&PartitionStatus> {
    status
        .partitions
        .iter()
        .find(|p| p.partition_id == partition)
}

/// See [`Cluster::agreed_leader`].
pub fn agreed_leader(
    statuses: &BTreeMap<u64, StatusResponse>,
    partition: u32,
) -> Result<(u64, u64), String> {
    let replicas: Vec<(u64, &PartitionStatus)> = statuses
        .iter()
        .filter_map(|(id, s)| find_partition(s, partition).map(|p| (*id, p)))
        .collect();
    if replicas.is_empty() {
        return Err(format!("no running node hosts partition {partition}"));
    }
    let voters: BTreeSet<u64> = replicas
        .iter()
        .flat_map(|(_, p)| p.voters.iter().copied())
        .collect();
    let quorum = voters.len() / 2 + 1;
    let mut votes: HashMap<(u64, u64), usize> = HashMap::new();
    for (_, p) in &replicas {
        if p.leader_id != 0 {
            *votes.entry((p.leader_id, p.term)).or_default() += 1;
        }
    }
    let Some((&(leader, term), _)) = votes.iter().find(|(_, &n)| n >= quorum) else {
        return Err(format!(
            "no (leader, term) reported by {quorum} of voters {voters:?}: {:?}",
            replicas
                .iter()
                .map(|(id, p)| (id, p.leader_id, p.term, p.role))
                .collect::<Vec<_>>()
        ));
    };
    if let Some(s) = statuses.get(&leader) {
        match find_partition(s, partition) {
            Some(p) if p.role == Role::Leader as i32 && p.term == term => {}
            other => {
                return Err(format!(
                    "node {leader} is named leader at term {term} but reports {:?}",
                    other.map(|p| (p.role, p.term))
                ))
            }
        }
    }
    Ok((leader, term))
}

/// Puts `key = value` into `partition` through `kv`, panicking on failure.
pub async fn put(kv: &mut KvClient<Channel>, partition: u32, key: &[u8], value: &[u8]) -> u64 {
    let request = PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        partition_id: partition,
    };
    match kv.put(req(request, KV_TIMEOUT)).await {
        Ok(r) => r.into_inner().index,
        Err(s) => panic!(
            "Put {:?} to partition {partition}: {:?} {}",
            String::from_utf8_lossy(key),
            s.code(),
            s.message()
        ),
    }
}

/// Gets `key` from `partition` through `kv`, panicking on failure.
pub async fn get(
    kv: &mut KvClient<Channel>,
    partition: u32,
    key: &[u8],
    serializable: bool,
) -> Option<Vec<u8>> {
    let request = GetRequest {
        key: key.to_vec(),
        partition_id: partition,
        serializable,
    };
    match kv.get(req(request, KV_TIMEOUT)).await {
        Ok(r) => {
            let r = r.into_inner();
            r.found.then_some(r.value)
        }
        Err(s) => panic!(
            "Get {:?} from partition {partition}: {:?} {}",
            String::from_utf8_lossy(key),
            s.code(),
            s.message()
        ),
    }
}

/// Runs the `multiraft` command line with `args`, killing it after `timeout`.
pub async fn cli(args: &[&str], timeout: Duration) -> std::process::Output {
    cli_in(args, timeout, None).await
}

/// Like [`cli`], in working directory `cwd`.
pub async fn cli_in(args: &[&str], timeout: Duration, cwd: Option<&Path>) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let child = cmd.spawn().expect("spawn multiraft cli");
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.expect("multiraft cli output"),
        Err(_) => panic!(
            "`multiraft {}` did not finish within {timeout:?}",
            args.join(" ")
        ),
    }
}

/// Both output streams of a finished command, for assertions and messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Reads a proto3-JSON uint64, which may be a string or a number.
pub fn json_u64(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A codec that sends and receives raw message bytes, to put arbitrary
/// bodies (garbage, or valid messages to unknown methods) on the wire.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// A unary call to `path` (e.g. `/atomix.multiraft.v1.Node/Nope`) with a
/// raw request body.
pub async fn raw_unary(
    channel: Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(req(body, Duration::from_secs(10)), path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

/// Writes a log line into the test output (shown for failing tests).
pub fn note(msg: impl AsRef<str>) {
    eprintln!("[test] {}", msg.as_ref());
}

/// Opens a file for read and write (used to damage WAL segments).
pub fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// One acknowledged write: (partition, key, value).
pub type Acked = (u32, Vec<u8>, Vec<u8>);

/// Concurrent writers putting unique keys round-robin over `clients` and
/// `partitions`, recording every acknowledged Put. Failed or timed-out Puts
/// are not retried (their keys are never reused), so the record holds
/// exactly the writes the cluster promised to keep.
pub struct WriteLoad {
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
}

impl WriteLoad {
    pub fn start(
        clients: &[KvClient<Channel>],
        partitions: &[u32],
        writers: usize,
        prefix: &str,
    ) -> WriteLoad {
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        // Backstop so that a wedged test cannot write forever.
        let hard_stop = Instant::now() + Duration::from_secs(120);
        let mut tasks = Vec::new();
        for w in 0..writers {
            let clients = clients.to_vec();
            let partitions = partitions.to_vec();
            let (acked, stop) = (acked.clone(), stop.clone());
            let prefix = prefix.to_string();
            tasks.push(tokio::spawn(async move {
                let mut errors = 0u64;
                let mut seq = 0usize;
                while !stop.load(Ordering::Relaxed) && Instant::now() < hard_stop {
                    seq += 1;
                    let partition = partitions[seq % partitions.len()];
                    let key = format!("{prefix}-w{w}-{seq}").into_bytes();
                    let value = format!("{prefix}-value-{w}-{seq}").into_bytes();
                    // Spread over all nodes; a dead one just fails fast.
                    let mut kv = clients[(w + seq) % clients.len()].clone();
                    let call = kv.put(req(
                        PutRequest {
                            key: key.clone(),
                            value: value.clone(),
                            partition_id: partition,
                        },
                        Duration::from_secs(2),
                    ));
                    match tokio::time::timeout(Duration::from_secs(3), call).await {
                        Ok(Ok(_)) => acked.lock().unwrap().push((partition, key, value)),
                        _ => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                errors
            }));
        }
        WriteLoad { acked, stop, tasks }
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Acknowledged writes to `partition` among the ones after the first `from`.
    pub fn acked_since(&self, from: usize, partition: u32) -> usize {
        let acked = self.acked.lock().unwrap();
        acked[from.min(acked.len())..]
            .iter()
            .filter(|(p, _, _)| *p == partition)
            .count()
    }

    /// Waits until `n` more writes are acknowledged on each of `partitions`.
    pub async fn wait_progress(&self, partitions: &[u32], n: usize, timeout: Duration) {
        let from = self.acked_count();
        wait_for(
            timeout,
            &format!("{n} more acknowledged writes on partitions {partitions:?}"),
            async || {
                for &p in partitions {
                    let got = self.acked_since(from, p);
                    if got < n {
                        return Err(format!("partition {p}: {got} of {n}"));
                    }
                }
                Ok(())
            },
        )
        .await
    }

    /// Stops the writers; returns the acknowledged writes and the failure count.
    pub async fn stop(self) -> (Vec<Acked>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = 0;
        for task in self.tasks {
            errors += task.await.expect("writer task");
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        (acked, errors)
    }
}

/// Reads every write in `acked` from node `id` and checks its value, with
/// up to 16 reads in flight.
pub async fn assert_all_readable(node: &Node, acked: &[Acked], serializable: bool) {
    use futures::stream::{self, StreamExt};
    let kv = node.kv().await;
    let id = node.id;
    let missing: Vec<String> = stream::iter(acked.iter().cloned())
        .map(|(p, key, value)| {
            let mut kv = kv.clone();
            async move {
                let request = GetRequest {
                    key: key.clone(),
                    partition_id: p,
                    serializable,
                };
                match kv.get(req(request, KV_TIMEOUT)).await {
                    Ok(r) if r.get_ref().found && r.get_ref().value == value => None,
                    Ok(r) => Some(format!(
                        "{} (partition {p}): found={} value={:?}",
                        String::from_utf8_lossy(&key),
                        r.get_ref().found,
                        String::from_utf8_lossy(&r.get_ref().value)
                    )),
                    Err(s) => Some(format!(
                        "{} (partition {p}): {:?} {}",
                        String::from_utf8_lossy(&key),
                        s.code(),
                        s.message()
                    )),
                }
            }
        })
        .buffer_unordered(16)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    assert!(
        missing.is_empty(),
        "node {id}: {} of {} acknowledged writes unreadable (serializable={serializable}), e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
}

/// GET `path` from a node's metrics endpoint: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use http_body_util::{BodyExt, Empty};
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of the series `name{labels}` (labels as printed), if present.
pub fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A cluster of `n` nodes whose metrics endpoints listen on the returned
/// addresses (node `i` on the `i-1`th).
pub async fn cluster_with_metrics(n: usize, shards: u32) -> (Cluster, Vec<SocketAddr>) {
    let addrs: Vec<SocketAddr> = (0..n)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let flags = addrs.clone();
    let cluster = Cluster::start_with(n, shards, Some(FAST_CONFIG), move |id| {
        vec!["--metrics-addr".into(), flags[id as usize - 1].to_string()]
    })
    .await;
    (cluster, addrs)
}

/// Waits until every metrics endpoint accepts connections (they start
/// after the API answers, and after Bootstrap if that came first).
pub async fn wait_metrics(addrs: &[SocketAddr]) {
    for &addr in addrs {
        wait_until(
            Duration::from_secs(10),
            "the metrics endpoint",
            async || tokio::net::TcpStream::connect(addr).await.is_ok(),
        )
        .await;
    }
}

/// `name{labels}` summed over the metrics of the nodes at `addrs`.
pub async fn metric_sum(addrs: &[SocketAddr], name_and_labels: &str) -> f64 {
    let mut sum = 0.0;
    for &addr in addrs {
        let (_, text) = http_get(addr, "/metrics").await;
        sum += series(&text, name_and_labels).unwrap_or(0.0);
    }
    sum
}

/// The JSON report of a `multiraft bench --json` run that must have
/// succeeded: verified, and without a failed call.
pub fn clean_bench_report(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "bench failed:\n{}", output_text(out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The whole of stdout, or else its last line, is the JSON report.
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .or_else(|_| serde_json::from_str(stdout.trim().lines().last().unwrap_or("")))
        .unwrap_or_else(|e| panic!("bench --json printed no JSON ({e}):\n{}", output_text(out)));
    assert_eq!(
        report["verified"],
        serde_json::Value::Bool(true),
        "{report}"
    );
    assert_eq!(json_u64(&report["errors"]), Some(0), "{report}");
    report
}
