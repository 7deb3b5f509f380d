//! `multiraft bench`: a closed-loop KV load generator over real gRPC/HTTP/2.
//!
//! By default it starts a local cluster of `multiraft serve` processes on
//! free loopback ports, bootstraps it, drives Put (and optionally Get) load
//! through the public KV service, reads back a sample of the acknowledged
//! writes, prints the results and stops the cluster. `--addr` targets an
//! existing, already bootstrapped cluster instead.
//!
//! # Load engine
//!
//! One current-thread tokio runtime holds `connections` HTTP/2 connections
//! (spread round-robin over the nodes) and `connections * in_flight` worker
//! tasks. Each worker runs one call at a time: pick an operation and a key,
//! send it with a 10 s deadline, record the latency of a successful call in
//! its own histogram (microseconds, 3 significant digits), repeat until the
//! duration passed or the request budget is spent. The histograms are merged
//! at the end. Failed calls are counted by gRPC status code and are not in
//! the latency figures; after a failure the worker pauses (1 ms, doubling up
//! to 1 s while failures continue), so a dead connection does not spin. Requests use `partition_id = 0`, so the nodes route
//! by key hash and the client knows nothing about partitions.
//!
//! # Verification
//!
//! The key space is split among the workers (worker `w` writes only keys `i`
//! with `i % workers == w`), so every key has a single writer that knows its
//! history. Every Put value is unique: its first 16 bytes are a per-run
//! nonce, the worker id and the worker's sequence number, padded to
//! `--value-size`. Each worker tracks a bounded sample of its keys: the last
//! acknowledged value and the values of any failed Puts (a failed Put has an
//! unknown outcome and may take effect at any later time). After the load,
//! the sampled keys are read back with linearizable Gets, round-robin over
//! the nodes, and each read must return the last acknowledged value or one
//! of the failed ones. Keys without an acknowledged Put are skipped.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::cluster::{ClusterSpec, LocalCluster};
use crate::grpc::{Client, Status};
use crate::node::api::{KV_GET, KV_PUT};
use crate::proto::kv::{GetRequest, GetResponse, PutRequest, PutResponse};

/// Deadline of every call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long bootstrapping a fresh local cluster may take.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause of a worker after a failed call, doubling while calls keep failing.
const MIN_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Progress bar refresh period.
const TICK: Duration = Duration::from_millis(200);
/// Bytes of the unique value header: nonce (4), worker (4), sequence (8).
const VALUE_HEADER: usize = 16;
/// A sampled key with more failed Puts than this is not verified.
const MAX_FAILED_PER_KEY: usize = 16;
/// Mismatches kept for the report.
const MAX_REPORTED_FAILURES: usize = 10;
/// Attempts per verification read (retried on errors only).
const VERIFY_ATTEMPTS: u32 = 5;
/// Concurrent verification reads.
const VERIFY_CONCURRENCY: usize = 64;

/// The `bench` command line.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// API addresses of an existing, bootstrapped cluster (host:port,...).
    /// Default: start a local cluster and stop it afterwards.
    #[arg(long, value_delimiter = ',')]
    pub addr: Vec<String>,
    /// Nodes of the local cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Partitions of the local cluster (each replicated on every node).
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Shards per local node; default: the node's own default.
    #[arg(long)]
    pub shards: Option<usize>,
    /// HTTP/2 connections, spread round-robin over the nodes.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Concurrent calls (streams) per connection.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// How long to run, e.g. "10s", "500ms", "2m".
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// Total requests to send; overrides --duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Bytes per Put value (at least 16).
    #[arg(long, default_value_t = 128)]
    pub value_size: usize,
    /// Key space: keys are key-0000000000 .. key-{keys-1}, chosen uniformly.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Fraction of operations that are Gets (0.0 ..= 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub read_ratio: f64,
    /// Serve Gets from the local replica instead of linearizably.
    #[arg(long)]
    pub serializable: bool,
    /// Acknowledged writes to read back at the end; 0 skips verification.
    #[arg(long, default_value_t = 2000)]
    pub verify_keys: usize,
    /// Print one JSON object on stdout and nothing else.
    #[arg(long)]
    pub json: bool,
}

/// Settings of one bench run (see [`BenchArgs`] for their meaning).
#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// Empty: start a local cluster.
    pub addrs: Vec<String>,
    pub nodes: u64,
    pub partitions: u32,
    pub shards: Option<usize>,
    /// The `multiraft` binary for the local cluster; default: own executable.
    pub exe: Option<PathBuf>,
    pub connections: usize,
    pub in_flight: usize,
    pub duration: Duration,
    pub requests: Option<u64>,
    pub value_size: usize,
    pub keys: u64,
    pub read_ratio: f64,
    pub serializable: bool,
    pub verify_keys: usize,
    /// Show the progress bar and status lines on stderr.
    pub progress: bool,
}

impl Default for BenchOpts {
    fn default() -> Self {
        BenchOpts {
            addrs: Vec::new(),
            nodes: 3,
            partitions: 8,
            shards: None,
            exe: None,
            connections: 8,
            in_flight: 64,
            duration: Duration::from_secs(10),
            requests: None,
            value_size: 128,
            keys: 100_000,
            read_ratio: 0.0,
            serializable: false,
            verify_keys: 2000,
            progress: true,
        }
    }
}

impl BenchOpts {
    fn workers(&self) -> usize {
        self.connections * self.in_flight
    }

    fn validate(&self) -> Result<(), String> {
        if self.connections == 0 || self.in_flight == 0 {
            return Err("--connections and --in-flight must be at least 1".into());
        }
        if self.addrs.is_empty() && (self.nodes == 0 || self.partitions == 0) {
            return Err("--nodes and --partitions must be at least 1".into());
        }
        if self.value_size < VALUE_HEADER {
            return Err(format!(
                "--value-size must be at least {VALUE_HEADER} (values carry a unique header)"
            ));
        }
        if !(0.0..=1.0).contains(&self.read_ratio) {
            return Err("--read-ratio must be between 0.0 and 1.0".into());
        }
        if self.read_ratio < 1.0 && self.keys < self.workers() as u64 {
            return Err(format!(
                "--keys ({}) must be at least connections * in-flight ({}): \
                 every writer owns a disjoint slice of the key space",
                self.keys,
                self.workers()
            ));
        }
        if self.keys == 0 {
            return Err("--keys must be at least 1".into());
        }
        if self.requests == Some(0) {
            return Err("--requests must be at least 1".into());
        }
        Ok(())
    }
}

impl TryFrom<&BenchArgs> for BenchOpts {
    type Error = String;

    fn try_from(a: &BenchArgs) -> Result<BenchOpts, String> {
        Ok(BenchOpts {
            addrs: a
                .addr
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            nodes: a.nodes,
            partitions: a.partitions,
            shards: a.shards,
            exe: None,
            connections: a.connections,
            in_flight: a.in_flight,
            duration: parse_duration(&a.duration)?,
            requests: a.requests,
            value_size: a.value_size,
            keys: a.keys,
            read_ratio: a.read_ratio,
            serializable: a.serializable,
            verify_keys: a.verify_keys,
            progress: !a.json,
        })
    }
}

/// Parses "10s", "1.5s", "500ms", "2m", "1h".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a duration like \"10s\", \"500ms\" or \"2m\"");
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return Err(bad());
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(v * unit))
}

/// Latency percentiles of the successful calls, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// The outcome of a bench run; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Successful calls per second: completed by the deadline over the
    /// duration, or all of them over `elapsed_s` with a request budget.
    pub ops_per_sec: f64,
    /// Calls completed (successful or not).
    pub requests: u64,
    pub ok: u64,
    pub puts: u64,
    pub gets: u64,
    /// Failed calls in total.
    pub errors: u64,
    /// Failed calls by gRPC status code name.
    pub errors_by_status: BTreeMap<String, u64>,
    /// Load time: from the first call to the end of the last one, including
    /// the calls still in flight when the duration ended.
    pub elapsed_s: f64,
    pub latency_us: Latency,
    /// No read-back mismatch and no failed read-back (true when skipped).
    pub verified: bool,
    /// Keys read back and compared.
    pub verify_checked: u64,
    /// Sampled keys not checked: no acknowledged Put, or too many failed ones.
    pub verify_skipped: u64,
    /// The first mismatches or failed reads, for people.
    pub verify_failures: Vec<String>,
    // The knobs.
    /// Whether the bench started its own local cluster.
    pub local_cluster: bool,
    pub addrs: Vec<String>,
    pub nodes: u64,
    /// Only known for a local cluster.
    pub partitions: Option<u32>,
    pub shards: Option<usize>,
    pub connections: usize,
    pub in_flight: usize,
    /// Configured duration; `None` when a request count was given.
    pub duration_s: Option<f64>,
    /// The `--requests` budget, if any.
    pub request_limit: Option<u64>,
    pub value_size: usize,
    pub keys: u64,
    pub read_ratio: f64,
    pub serializable: bool,
}

/// Runs `multiraft bench`: prints the report, fails if verification did.
pub fn run_cli(args: &BenchArgs) -> Result<(), String> {
    let opts = BenchOpts::try_from(args)?;
    let report = run(opts)?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print!("{}", format_report(&report));
    }
    if report.verified {
        Ok(())
    } else {
        Err(format!(
            "verification failed: {} of {} keys read back wrong or not at all",
            report.verify_failures.len().max(1),
            report.verify_checked
        ))
    }
}

/// [`run_bench`] on a fresh current-thread runtime.
pub fn run(opts: BenchOpts) -> Result<Report, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(run_bench(opts))
}

/// Runs one bench: starts and bootstraps a local cluster unless
/// `opts.addrs` names one, drives the load, verifies, stops the cluster.
///
/// Must run on a current-thread tokio runtime with I/O and time enabled
/// (see [`run`]); the workers are spawned onto it.
pub async fn run_bench(opts: BenchOpts) -> Result<Report, String> {
    opts.validate()?;
    let say = |msg: String| {
        if opts.progress {
            eprintln!("{msg}");
        }
    };
    // Dropped at the end of this function: stops the nodes, removes the dir.
    let mut cluster = None;
    let addrs = if opts.addrs.is_empty() {
        let spec = ClusterSpec {
            nodes: opts.nodes,
            shards: opts.shards,
            dir: None,
            base_port: 0,
            config_json: None,
            rust_log: "warn".into(),
            exe: opts.exe.clone(),
        };
        let started = Instant::now();
        say(format!("starting a local {}-node cluster", opts.nodes));
        let c = LocalCluster::start(&spec).await?;
        // Every node needs the layout before any partition can elect a
        // leader, so the calls run concurrently.
        let calls = c.nodes.iter().map(|n| {
            super::bootstrap(&n.api_addr, opts.partitions, c.members(), BOOTSTRAP_TIMEOUT)
        });
        futures::future::try_join_all(calls)
            .await
            .map_err(|e| format!("bootstrap: {e} (node logs in {})", c.dir.display()))?;
        say(format!(
            "cluster ready in {:.1} s: {} nodes, {} partitions, data in {}",
            started.elapsed().as_secs_f64(),
            opts.nodes,
            opts.partitions,
            c.dir.display()
        ));
        let addrs = c.api_addrs();
        cluster = Some(c);
        addrs
    } else {
        opts.addrs.clone()
    };

    let result = load_and_verify(&opts, &addrs).await;
    if let (Err(_), Some(c)) = (&result, &cluster) {
        for n in &c.nodes {
            say(format!("node {} log: {}", n.id, n.log.display()));
        }
    }
    drop(cluster);
    let run = result?;

    let errors: u64 = run.errors_by_status.values().sum();
    let elapsed = run.elapsed.as_secs_f64();
    let h = &run.histogram;
    let latency = if h.is_empty() {
        Latency::default()
    } else {
        Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    };
    Ok(Report {
        ops_per_sec: match opts.requests {
            // Calls still in flight at the deadline drain afterwards (up to
            // the call timeout); they must not dilute the rate.
            None => run.ok_in_window as f64 / opts.duration.as_secs_f64(),
            Some(_) if elapsed > 0.0 => run.ok as f64 / elapsed,
            Some(_) => 0.0,
        },
        requests: run.ok + errors,
        ok: run.ok,
        puts: run.puts,
        gets: run.gets,
        errors,
        errors_by_status: run.errors_by_status,
        elapsed_s: elapsed,
        latency_us: latency,
        verified: run.verify.failures == 0,
        verify_checked: run.verify.checked,
        verify_skipped: run.verify.skipped,
        verify_failures: run.verify.messages,
        local_cluster: opts.addrs.is_empty(),
        addrs: addrs.clone(),
        nodes: addrs.len() as u64,
        partitions: opts.addrs.is_empty().then_some(opts.partitions),
        shards: opts.shards,
        connections: opts.connections,
        in_flight: opts.in_flight,
        duration_s: opts
            .requests
            .is_none()
            .then_some(opts.duration.as_secs_f64()),
        request_limit: opts.requests,
        value_size: opts.value_size,
        keys: opts.keys,
        read_ratio: opts.read_ratio,
        serializable: opts.serializable,
    })
}

/// The report for people.
pub fn format_report(r: &Report) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    let mut out = String::new();
    let target = if r.local_cluster {
        format!(
            "local cluster of {} nodes, {} partitions",
            r.nodes,
            r.partitions.unwrap_or(0)
        )
    } else {
        format!("{} nodes at {}", r.nodes, r.addrs.join(","))
    };
    out.push_str(&format!(
        "target      {target}\n\
         load        {} connections x {} in flight, {} B values, {} keys, {:.0}% reads{}\n",
        r.connections,
        r.in_flight,
        r.value_size,
        r.keys,
        r.read_ratio * 100.0,
        if r.read_ratio > 0.0 && r.serializable {
            " (serializable)"
        } else {
            ""
        }
    ));
    out.push_str(&format!(
        "requests    {} in {:.2} s ({} puts, {} gets, {} errors)\n",
        r.requests, r.elapsed_s, r.puts, r.gets, r.errors
    ));
    out.push_str(&format!("throughput  {:.0} ops/s\n", r.ops_per_sec));
    let l = &r.latency_us;
    out.push_str(&format!(
        "latency     p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms\n",
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.p999),
        ms(l.max)
    ));
    if r.errors_by_status.is_empty() {
        out.push_str("errors      none\n");
    } else {
        let list: Vec<String> = r
            .errors_by_status
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        out.push_str(&format!("errors      {}\n", list.join(", ")));
    }
    if r.verified {
        out.push_str(&format!("verify      verified {} keys", r.verify_checked));
        if r.verify_skipped > 0 {
            out.push_str(&format!(
                " ({} skipped: no acknowledged write)",
                r.verify_skipped
            ));
        }
        out.push('\n');
    } else {
        out.push_str(&format!(
            "verify      FAILED ({} keys checked)\n",
            r.verify_checked
        ));
        for m in &r.verify_failures {
            out.push_str(&format!("  {m}\n"));
        }
    }
    out
}

/// Raw results of the load and verification phases.
struct RunResult {
    elapsed: Duration,
    ok: u64,
    ok_in_window: u64,
    puts: u64,
    gets: u64,
    errors_by_status: BTreeMap<String, u64>,
    histogram: Histogram<u64>,
    verify: VerifyResult,
}

#[derive(Default)]
struct VerifyResult {
    checked: u64,
    skipped: u64,
    /// Mismatches plus reads that kept failing.
    failures: u64,
    messages: Vec<String>,
}

/// Live counters shared by the workers and the progress display.
#[derive(Default)]
struct Shared {
    /// Calls started; only used with a request budget.
    issued: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
}

/// When the workers stop.
#[derive(Clone, Copy)]
enum Until {
    Deadline(Instant),
    Requests(u64),
}

/// What a writer knows about one sampled key.
#[derive(Default)]
struct KeyState {
    /// Sequence number of the last acknowledged Put.
    acked: Option<u64>,
    /// Sequence numbers of Puts with unknown outcome.
    failed: Vec<u64>,
}

/// One worker's results.
struct WorkerResult {
    id: u32,
    histogram: Histogram<u64>,
    ok: u64,
    /// Successful calls completed by the deadline (duration runs only).
    ok_in_window: u64,
    puts: u64,
    gets: u64,
    errors: HashMap<&'static str, u64>,
    sample: HashMap<u64, KeyState>,
}

/// Static description of the workload, shared by all workers.
struct Workload {
    nonce: u32,
    workers: u64,
    keys: u64,
    value_size: usize,
    read_ratio: f64,
    serializable: bool,
    /// Sampled keys tracked per worker.
    sample_per_worker: usize,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits; the bounds are valid constants.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn key_name(i: u64) -> Bytes {
    Bytes::from(format!("key-{i:010}"))
}

/// The unique value of Put number `seq` of `worker` in run `nonce`.
fn make_value(nonce: u32, worker: u32, seq: u64, size: usize) -> Bytes {
    let mut v = BytesMut::with_capacity(size);
    v.put_u32(nonce);
    v.put_u32(worker);
    v.put_u64(seq);
    // Deterministic padding so a read can be compared byte for byte.
    let pad = (size - VALUE_HEADER) as u64;
    v.extend((0..pad).map(|i| b'a' + ((seq + i) % 26) as u8));
    v.freeze()
}

/// (nonce, worker, seq) of a value written by this tool, if it looks like one.
fn value_header(v: &[u8]) -> Option<(u32, u32, u64)> {
    if v.len() < VALUE_HEADER {
        return None;
    }
    let nonce = u32::from_be_bytes(v[0..4].try_into().ok()?);
    let worker = u32::from_be_bytes(v[4..8].try_into().ok()?);
    let seq = u64::from_be_bytes(v[8..16].try_into().ok()?);
    Some((nonce, worker, seq))
}

async fn connect_all(addrs: &[String], n: usize) -> Result<Vec<Client>, String> {
    let calls = (0..n).map(|i| {
        let addr = addrs[i % addrs.len()].clone();
        async move {
            Client::connect(&addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))
        }
    });
    futures::future::try_join_all(calls).await
}

async fn load_and_verify(opts: &BenchOpts, addrs: &[String]) -> Result<RunResult, String> {
    let clients = connect_all(addrs, opts.connections).await?;
    let workers = opts.workers();
    let workload = Arc::new(Workload {
        nonce: rand::random(),
        workers: workers as u64,
        keys: opts.keys,
        value_size: opts.value_size,
        read_ratio: opts.read_ratio,
        serializable: opts.serializable,
        sample_per_worker: opts.verify_keys.div_ceil(workers),
    });
    let shared = Arc::new(Shared::default());

    let progress = opts.progress.then(|| progress_bar(opts));
    let start = Instant::now();
    let until = match opts.requests {
        Some(n) => Until::Requests(n),
        None => Until::Deadline(start + opts.duration),
    };
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let client = clients[w % clients.len()].clone();
            tokio::spawn(worker(
                w as u32,
                client,
                workload.clone(),
                shared.clone(),
                until,
            ))
        })
        .collect();
    let ticker_stop = Arc::new(AtomicBool::new(false));
    let ticker = progress.clone().map(|pb| {
        tokio::spawn(tick_progress(
            pb,
            shared.clone(),
            ticker_stop.clone(),
            start,
            opts.requests.is_some(),
        ))
    });
    let mut results = Vec::with_capacity(workers);
    for h in futures::future::join_all(handles).await {
        results.push(h.map_err(|e| format!("bench worker failed: {e}"))?);
    }
    let elapsed = start.elapsed();
    ticker_stop.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.await;
    }
    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }

    let mut histogram = new_histogram();
    let (mut ok, mut ok_in_window, mut puts, mut gets) = (0, 0, 0, 0);
    let mut errors_by_status = BTreeMap::new();
    for r in &results {
        histogram
            .add(&r.histogram)
            .map_err(|e| format!("merge histograms: {e}"))?;
        ok += r.ok;
        ok_in_window += r.ok_in_window;
        puts += r.puts;
        gets += r.gets;
        for (name, n) in &r.errors {
            *errors_by_status.entry(name.to_string()).or_insert(0) += n;
        }
    }

    let verify = if opts.verify_keys > 0 {
        if opts.progress {
            eprintln!("verifying a sample of the acknowledged writes");
        }
        verify(opts, addrs, &workload, results).await?
    } else {
        VerifyResult::default()
    };
    Ok(RunResult {
        elapsed,
        ok,
        ok_in_window,
        puts,
        gets,
        errors_by_status,
        histogram,
        verify,
    })
}

async fn worker(
    id: u32,
    client: Client,
    wl: Arc<Workload>,
    shared: Arc<Shared>,
    until: Until,
) -> WorkerResult {
    let mut rng = StdRng::from_entropy();
    let mut r = WorkerResult {
        id,
        histogram: new_histogram(),
        ok: 0,
        ok_in_window: 0,
        puts: 0,
        gets: 0,
        errors: HashMap::new(),
        sample: HashMap::new(),
    };
    // This worker writes keys id, id + workers, id + 2 * workers, ...
    let own_keys = wl.keys.saturating_sub(id as u64).div_ceil(wl.workers);
    let mut seq = 0u64;
    let mut backoff = Duration::ZERO;
    loop {
        match until {
            Until::Deadline(d) => {
                if Instant::now() >= d {
                    break;
                }
            }
            Until::Requests(n) => {
                if shared.issued.fetch_add(1, Ordering::Relaxed) >= n {
                    break;
                }
            }
        }
        let read = wl.read_ratio > 0.0 && (own_keys == 0 || rng.gen::<f64>() < wl.read_ratio);
        let sent = Instant::now();
        let outcome: Result<(), Status> = if read {
            r.gets += 1;
            let req = GetRequest {
                key: key_name(rng.gen_range(0..wl.keys)),
                partition_id: 0,
                serializable: wl.serializable,
            };
            client
                .call::<_, GetResponse>(KV_GET, &req, Some(CALL_TIMEOUT))
                .await
                .map(|_| ())
        } else {
            r.puts += 1;
            let k = id as u64 + wl.workers * rng.gen_range(0..own_keys);
            seq += 1;
            let req = PutRequest {
                key: key_name(k),
                value: make_value(wl.nonce, id, seq, wl.value_size),
                partition_id: 0,
            };
            let res = client
                .call::<_, PutResponse>(KV_PUT, &req, Some(CALL_TIMEOUT))
                .await
                .map(|_| ());
            let tracked = r.sample.len() < wl.sample_per_worker || r.sample.contains_key(&k);
            if tracked {
                let st = r.sample.entry(k).or_default();
                match &res {
                    Ok(()) => st.acked = Some(seq),
                    Err(_) => st.failed.push(seq),
                }
            }
            res
        };
        let us = sent.elapsed().as_micros().max(1) as u64;
        shared.done.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                r.ok += 1;
                if let Until::Deadline(d) = until {
                    if Instant::now() <= d {
                        r.ok_in_window += 1;
                    }
                }
                r.histogram.saturating_record(us);
                backoff = Duration::ZERO;
            }
            Err(s) => {
                *r.errors.entry(s.code.name()).or_insert(0) += 1;
                shared.errors.fetch_add(1, Ordering::Relaxed);
                // Why: a call on a dead connection fails at once; without a
                // pause the worker would spin, flood the error counts and
                // starve the other tasks of this single-threaded runtime.
                backoff = (backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
                let pause = match until {
                    Until::Deadline(d) => backoff.min(d.saturating_duration_since(Instant::now())),
                    Until::Requests(_) => backoff,
                };
                tokio::time::sleep(pause).await;
            }
        }
    }
    r
}

fn progress_bar(opts: &BenchOpts) -> ProgressBar {
    let (len, template) = match opts.requests {
        Some(n) => (n, "{bar:40.cyan/blue} {pos}/{len} requests  {msg}"),
        None => (
            opts.duration.as_millis() as u64,
            "{bar:40.cyan/blue} {elapsed}/{duration_s}  {msg}",
        ),
    };
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "duration_s",
            move |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{}s", s.len().unwrap_or(0) / 1000);
            },
        );
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(10))
        .with_style(style)
}

async fn tick_progress(
    pb: ProgressBar,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    start: Instant,
    by_requests: bool,
) {
    // Rate over the last second (5 ticks), so it reacts but does not jitter.
    let mut window = std::collections::VecDeque::from([(start, 0u64)]);
    let mut tick = tokio::time::interval(TICK);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let now = Instant::now();
        let done = shared.done.load(Ordering::Relaxed);
        window.push_back((now, done));
        if window.len() > 6 {
            window.pop_front();
        }
        let (t0, d0) = window[0];
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = if secs > 0.0 {
            (done - d0) as f64 / secs
        } else {
            0.0
        };
        if by_requests {
            pb.set_position(done);
        } else {
            pb.set_position(now.duration_since(start).as_millis() as u64);
        }
        pb.set_message(format!(
            "{rate:.0} ops/s  {} errors",
            shared.errors.load(Ordering::Relaxed)
        ));
    }
}

/// One key to read back and the values it may hold.
struct Check {
    key: u64,
    worker: u32,
    acked: u64,
    failed: Vec<u64>,
}

async fn verify(
    opts: &BenchOpts,
    addrs: &[String],
    wl: &Workload,
    results: Vec<WorkerResult>,
) -> Result<VerifyResult, String> {
    let mut out = VerifyResult::default();
    let mut checks = Vec::new();
    for r in results {
        for (key, st) in r.sample {
            match st.acked {
                Some(acked) if st.failed.len() <= MAX_FAILED_PER_KEY => checks.push(Check {
                    key,
                    worker: r.id,
                    acked,
                    failed: st.failed,
                }),
                _ => out.skipped += 1,
            }
        }
    }
    checks.shuffle(&mut rand::thread_rng());
    checks.truncate(opts.verify_keys);
    checks.sort_by_key(|c| c.key);
    if checks.is_empty() {
        return Ok(out);
    }
    // One connection per reachable node; reads go round-robin over them. A
    // node that is down must not stop the others from being checked.
    let mut clients = Vec::new();
    for addr in addrs {
        match Client::connect(addr).await {
            Ok(c) => clients.push((addr.clone(), c)),
            Err(e) if opts.progress => eprintln!("verify: skipping node {addr}: {e}"),
            Err(_) => {}
        }
    }
    if clients.is_empty() {
        out.failures = checks.len() as u64;
        out.messages.push(format!(
            "no node reachable to read back {} keys",
            checks.len()
        ));
        return Ok(out);
    }
    let reads = checks.iter().enumerate().map(|(i, c)| {
        let (node, client) = clients[i % clients.len()].clone();
        async move {
            let req = GetRequest {
                key: key_name(c.key),
                partition_id: 0,
                serializable: false,
            };
            let mut last = None;
            for attempt in 0..VERIFY_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                match client
                    .call::<_, GetResponse>(KV_GET, &req, Some(CALL_TIMEOUT))
                    .await
                {
                    Ok(resp) => return check_read(wl, c, &resp),
                    Err(e) => last = Some(e),
                }
            }
            let e = last.map(|e| e.to_string()).unwrap_or_default();
            Err(format!(
                "key-{:010}: read via {node} failed {VERIFY_ATTEMPTS} times: {e}",
                c.key
            ))
        }
    });
    use futures::StreamExt;
    let mut stream = futures::stream::iter(reads).buffered(VERIFY_CONCURRENCY);
    while let Some(r) = stream.next().await {
        out.checked += 1;
        if let Err(msg) = r {
            out.failures += 1;
            if out.messages.len() < MAX_REPORTED_FAILURES {
                out.messages.push(msg);
            }
        }
    }
    Ok(out)
}

/// Whether `resp` holds a value the key may have; a description if not.
fn check_read(wl: &Workload, c: &Check, resp: &GetResponse) -> Result<(), String> {
    let expected = || {
        let mut s = format!("put #{} of writer {}", c.acked, c.worker);
        if !c.failed.is_empty() {
            s.push_str(&format!(
                " (or one of {} unacknowledged puts)",
                c.failed.len()
            ));
        }
        s
    };
    let key = format!("key-{:010}", c.key);
    if !resp.found {
        return Err(format!(
            "{key}: expected {}, read: not found (at index {})",
            expected(),
            resp.index
        ));
    }
    let seq = match value_header(&resp.value) {
        Some((nonce, worker, seq)) if nonce == wl.nonce && worker == c.worker => seq,
        Some((nonce, worker, seq)) => {
            return Err(format!(
                "{key}: expected {}, read: a value of another run or writer \
                 (nonce {nonce:#x}, writer {worker}, put #{seq}, {} bytes, at index {})",
                expected(),
                resp.value.len(),
                resp.index
            ))
        }
        None => {
            return Err(format!(
                "{key}: expected {}, read: {} bytes that this tool did not write (at index {})",
                expected(),
                resp.value.len(),
                resp.index
            ))
        }
    };
    if seq != c.acked && !c.failed.contains(&seq) {
        return Err(format!(
            "{key}: expected {}, read: put #{seq} (at index {})",
            expected(),
            resp.index
        ));
    }
    if resp.value != make_value(wl.nonce, c.worker, seq, wl.value_size) {
        return Err(format!(
            "{key}: put #{seq} read back with different bytes ({} bytes, at index {})",
            resp.value.len(),
            resp.index
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("xs").is_err());
    }

    #[test]
    fn values_are_unique_and_decodable() {
        let v = make_value(7, 3, 42, 128);
        assert_eq!(v.len(), 128);
        assert_eq!(value_header(&v), Some((7, 3, 42)));
        assert_ne!(v, make_value(7, 3, 43, 128));
        assert_ne!(v, make_value(7, 4, 42, 128));
        assert_eq!(make_value(1, 2, 3, 16).len(), 16);
    }

    fn workload() -> Workload {
        Workload {
            nonce: 9,
            workers: 4,
            keys: 100,
            value_size: 32,
            read_ratio: 0.0,
            serializable: false,
            sample_per_worker: 10,
        }
    }

    #[test]
    fn read_back_accepts_last_acked_or_unknown_outcome() {
        let wl = workload();
        let c = Check {
            key: 5,
            worker: 1,
            acked: 10,
            failed: vec![12],
        };
        let resp = |seq: u64| GetResponse {
            found: true,
            value: make_value(9, 1, seq, 32),
            index: 1,
            partition_id: 1,
        };
        assert!(check_read(&wl, &c, &resp(10)).is_ok());
        assert!(check_read(&wl, &c, &resp(12)).is_ok());
        assert!(check_read(&wl, &c, &resp(9)).is_err());
        let missing = GetResponse::default();
        assert!(check_read(&wl, &c, &missing).is_err());
        let mut other = resp(10);
        other.value = make_value(8, 1, 10, 32);
        assert!(check_read(&wl, &c, &other).is_err());
    }

    #[test]
    fn opts_validation() {
        assert!(BenchOpts::default().validate().is_ok());
        let small_keys = BenchOpts {
            keys: 10,
            ..BenchOpts::default()
        };
        assert!(small_keys.validate().is_err());
        let tiny_values = BenchOpts {
            value_size: 8,
            ..BenchOpts::default()
        };
        assert!(tiny_values.validate().is_err());
    }
}
