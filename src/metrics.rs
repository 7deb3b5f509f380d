//! Prometheus metrics, served on `--metrics-addr` (HTTP/1.1 `/metrics`,
//! plus `/health` and `/ready` as etcd has them).
//!
//! Two kinds of series:
//! - **events**, counted where they happen: gRPC calls (by method and
//!   code, with a latency histogram), WAL syncs (latency, writes per sync),
//!   raft messages and bytes per peer, snapshots, forwarded calls. Each
//!   shard caches its label children, so a count is one atomic add on a
//!   cell no other core writes;
//! - **state**, read from every shard at scrape time (the scrape asks each
//!   shard through its inbox, as Admin/Status does): commands applied,
//!   proposals, partitions, leaders and quiescent partitions, leader changes,
//!   disk-full.
//!
//! The HTTP server runs on its own thread, never on a shard's core.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every series of the node.
pub struct Metrics {
    registry: Registry,
    pub grpc_requests: IntCounterVec,
    pub grpc_seconds: HistogramVec,
    pub wal_sync_seconds: HistogramVec,
    pub wal_writes_per_sync: HistogramVec,
    pub peer_sent_messages: IntCounterVec,
    pub peer_sent_bytes: IntCounterVec,
    pub peer_received_messages: IntCounterVec,
    pub peer_received_bytes: IntCounterVec,
    pub snapshots_sent: IntCounterVec,
    pub snapshots_received: IntCounterVec,
    pub forwarded_calls: IntCounterVec,
    pub log_trims: IntCounterVec,
    applied_commands: IntCounterVec,
    proposals: IntCounterVec,
    leader_changes: IntCounterVec,
    partitions: IntGaugeVec,
    leaders: IntGaugeVec,
    quiescent: IntGaugeVec,
    disk_full: IntGaugeVec,
    log_bytes: IntGaugeVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

/// Latency buckets from 50 µs to 10 s.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(50e-6, 2.5, 14).expect("valid buckets")
}

/// The node's metrics (one set per process).
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let r = Registry::new();
        let shard = &["shard"];
        Metrics {
            grpc_requests: counter(
                &r,
                "multiraft_grpc_requests_total",
                "gRPC calls answered, by method, status code and the shard that took them",
                &["method", "code", "shard"],
            ),
            grpc_seconds: histogram(
                &r,
                "multiraft_grpc_request_duration_seconds",
                "gRPC call latency, from the request headers to the answer",
                &["method", "shard"],
                latency_buckets(),
            ),
            wal_sync_seconds: histogram(
                &r,
                "multiraft_wal_sync_duration_seconds",
                "WAL append + fdatasync latency",
                shard,
                latency_buckets(),
            ),
            wal_writes_per_sync: histogram(
                &r,
                "multiraft_wal_entries_per_sync",
                "raft entries made durable by one WAL sync",
                shard,
                prometheus::exponential_buckets(1.0, 2.0, 14).expect("valid buckets"),
            ),
            peer_sent_messages: counter(
                &r,
                "multiraft_peer_sent_messages_total",
                "envelopes queued for a peer node",
                &["peer"],
            ),
            peer_sent_bytes: counter(
                &r,
                "multiraft_peer_sent_bytes_total",
                "encoded bytes queued for a peer node",
                &["peer"],
            ),
            peer_received_messages: counter(
                &r,
                "multiraft_peer_received_messages_total",
                "envelopes received from a peer node",
                &["peer"],
            ),
            peer_received_bytes: counter(
                &r,
                "multiraft_peer_received_bytes_total",
                "frame bytes received from a peer node",
                &["peer"],
            ),
            snapshots_sent: counter(
                &r,
                "multiraft_snapshots_sent_total",
                "raft snapshots sent to followers",
                shard,
            ),
            snapshots_received: counter(
                &r,
                "multiraft_snapshots_received_total",
                "raft snapshots installed from a leader",
                shard,
            ),
            forwarded_calls: counter(
                &r,
                "multiraft_forwarded_calls_total",
                "KV calls forwarded to another node, by kind (write, read)",
                &["kind"],
            ),
            log_trims: counter(
                &r,
                "multiraft_log_trims_total",
                "raft logs asked to trim (snapshot and compact) to bring the shard within --log-memory-mib",
                shard,
            ),
            applied_commands: counter(
                &r,
                "multiraft_applied_commands_total",
                "KV commands applied to the state machines",
                shard,
            ),
            proposals: counter(
                &r,
                "multiraft_proposals_total",
                "KV writes proposed to raft by this node",
                shard,
            ),
            leader_changes: counter(
                &r,
                "multiraft_leader_changes_total",
                "times a hosted partition saw a new leader",
                shard,
            ),
            partitions: gauge(&r, "multiraft_partitions", "partitions hosted", shard),
            leaders: gauge(
                &r,
                "multiraft_leaders",
                "hosted partitions this node leads",
                shard,
            ),
            quiescent: gauge(
                &r,
                "multiraft_quiescent_partitions",
                "hosted partitions that are idle and have stopped ticking",
                shard,
            ),
            disk_full: gauge(
                &r,
                "multiraft_disk_full",
                "1 while the shard's disk is full (its writes are refused)",
                shard,
            ),
            log_bytes: gauge(
                &r,
                "multiraft_log_memory_bytes",
                "bytes the shard's raft logs hold in memory (entries and their vectors)",
                shard,
            ),
            registry: r,
        }
    })
}

/// Distinct peer labels at most; further peers count as "other". The
/// peer id of an incoming connection is its Hello's claim, which in clear
/// anyone can make up: without a cap, made-up ids would grow the registry
/// without bound.
const MAX_PEER_LABELS: usize = 256;

/// The label for peer node `id`.
pub fn peer_label(id: u64) -> String {
    static SEEN: OnceLock<std::sync::Mutex<std::collections::HashSet<u64>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if seen.contains(&id) || seen.len() < MAX_PEER_LABELS {
        seen.insert(id);
        id.to_string()
    } else {
        "other".into()
    }
}

/// One shard's state, read at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardState {
    pub applied_commands: u64,
    pub proposals: u64,
    pub leader_changes: u64,
    pub partitions: i64,
    pub leaders: i64,
    pub quiescent: i64,
    pub disk_full: bool,
    pub log_bytes: i64,
}

/// Brings a counter up to `total` (state read at scrape time is a total).
fn catch_up(c: &IntCounter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

impl Metrics {
    /// Records the shards' state, then encodes every series.
    pub fn render(&self, shards: &[ShardState]) -> Vec<u8> {
        for (k, s) in shards.iter().enumerate() {
            let k = k.to_string();
            let l = &[k.as_str()];
            catch_up(
                &self.applied_commands.with_label_values(l),
                s.applied_commands,
            );
            catch_up(&self.proposals.with_label_values(l), s.proposals);
            catch_up(&self.leader_changes.with_label_values(l), s.leader_changes);
            self.partitions.with_label_values(l).set(s.partitions);
            self.leaders.with_label_values(l).set(s.leaders);
            self.quiescent.with_label_values(l).set(s.quiescent);
            self.disk_full
                .with_label_values(l)
                .set(i64::from(s.disk_full));
            self.log_bytes.with_label_values(l).set(s.log_bytes);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory");
        out
    }
}

thread_local! {
    /// The shard this thread runs, for the per-shard labels of the series
    /// counted where calls happen (so no two cores write one counter).
    static SHARD: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Marks the calling thread as shard `k`'s.
pub fn set_thread_shard(k: usize) {
    SHARD.with(|s| s.set(Some(k)));
}

fn thread_shard() -> String {
    SHARD
        .with(|s| s.get())
        .map_or_else(|| "none".into(), |k| k.to_string())
}

/// A shard's cached children of the gRPC series, by method.
#[derive(Default)]
pub struct GrpcSeries {
    by_method: HashMap<String, (Histogram, HashMap<u32, IntCounter>)>,
}

impl GrpcSeries {
    /// Counts one call of `method` ending with `code` after `seconds`.
    /// Unknown methods share the label "unknown" (bounded cardinality).
    pub fn observe(&mut self, method: &str, known: bool, code: u32, seconds: f64) {
        let label = if known { method } else { "unknown" };
        if !self.by_method.contains_key(label) {
            let m = get();
            let h = m.grpc_seconds.with_label_values(&[label, &thread_shard()]);
            self.by_method.insert(label.to_owned(), (h, HashMap::new()));
        }
        let (h, codes) = self.by_method.get_mut(label).expect("just inserted");
        h.observe(seconds);
        codes
            .entry(code)
            .or_insert_with(|| {
                get().grpc_requests.with_label_values(&[
                    label,
                    crate::grpc::Code::from_u32(code).name(),
                    &thread_shard(),
                ])
            })
            .inc();
    }
}

/// Why the node does not serve (`/health`) or should not get traffic
/// (`/ready`), or cannot report its state: the 503 answer's body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotServing(pub String);

/// What the HTTP endpoint needs from the node.
pub trait Source: Send + Sync + 'static {
    /// Every shard's state (blocking; called on the HTTP thread).
    fn shards(&self) -> Result<Vec<ShardState>, NotServing>;
    /// `/health`: `Err(reason)` while the node is not serving.
    fn health(&self) -> Result<(), NotServing>;
    /// `/ready`: `Err(reason)` while it should not get traffic.
    fn ready(&self) -> Result<(), NotServing>;
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("bind metrics address {addr}: {reason}")]
    Bind {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("metrics address {0} is not an IP address")]
    NotIp(std::net::SocketAddr),
    #[error("start the metrics thread: {0}")]
    Thread(std::io::Error),
}

/// The running HTTP endpoint; dropping it stops the server thread.
pub struct Endpoint {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: std::net::SocketAddr,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `/metrics`, `/health` and `/ready` on `addr` until dropped.
pub fn serve(
    addr: std::net::SocketAddr,
    source: Arc<dyn Source>,
) -> Result<Endpoint, EndpointError> {
    let server = tiny_http::Server::http(addr).map_err(|e| EndpointError::Bind {
        addr,
        reason: e.to_string(),
    })?;
    let server = Arc::new(server);
    let local = server
        .server_addr()
        .to_ip()
        .ok_or(EndpointError::NotIp(addr))?;
    let s = server.clone();
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in s.incoming_requests() {
                let _ = answer(req, &*source);
            }
        })
        .map_err(EndpointError::Thread)?;
    Ok(Endpoint {
        server,
        thread: Some(thread),
        addr: local,
    })
}

fn answer(req: tiny_http::Request, source: &dyn Source) -> std::io::Result<()> {
    use tiny_http::{Header, Response};
    let text = |code: u16, body: String| {
        Response::from_string(body)
            .with_status_code(code)
            .with_header(Header::from_bytes("Content-Type", "text/plain; charset=utf-8").unwrap())
    };
    let check = |r: Result<(), NotServing>| match r {
        Ok(()) => text(200, "ok\n".into()),
        Err(why) => text(503, format!("{why}\n")),
    };
    if *req.method() != tiny_http::Method::Get {
        return req.respond(text(405, "only GET\n".into()));
    }
    match req.url() {
        "/metrics" => match source.shards() {
            Ok(shards) => {
                let body = get().render(&shards);
                let ct = Header::from_bytes("Content-Type", TextEncoder::new().format_type())
                    .expect("a valid header");
                req.respond(Response::from_data(body).with_header(ct))
            }
            Err(e) => req.respond(text(503, format!("{e}\n"))),
        },
        "/health" => {
            let r = check(source.health());
            req.respond(r)
        }
        "/ready" => {
            let r = check(source.ready());
            req.respond(r)
        }
        _ => req.respond(text(
            404,
            "not found: try /metrics, /health or /ready\n".into(),
        )),
    }
}
