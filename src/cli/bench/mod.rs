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
//! to 1 s while failures continue), so a dead connection does not spin.
//! By default requests use `partition_id = 0`, so the nodes route by key
//! hash and the client knows nothing about partitions. With
//! `--active-partitions K` each call names its partition, and by default
//! (`--route leader`) goes over a connection to that partition's leader
//! (see `route.rs`), as a partition-aware client sends it.
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
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
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
    /// Load only partitions 1..=K (key k goes to partition k % K + 1);
    /// 0: every partition, as the server routes keys.
    #[arg(long, default_value_t = 0)]
    pub active_partitions: u32,
    /// Where calls that name their partition (--active-partitions) go:
    /// `leader` sends each to its partition's leader, learned from the
    /// nodes' Status and followed through their Watch streams, as a
    /// partition-aware client does; `any` sends each over the worker's own
    /// connection, so two calls in three reach a follower that forwards
    /// them.
    #[arg(long, value_enum, default_value_t = Route::Leader)]
    pub route: Route,
    /// Acknowledged writes to read back at the end; 0 skips verification.
    #[arg(long, default_value_t = 2000)]
    pub verify_keys: usize,
    /// Print one JSON object on stdout and nothing else.
    #[arg(long)]
    pub json: bool,
}

/// Where a call that names its partition is sent (`--route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Route {
    /// To the partition's leader, when known.
    Leader,
    /// Over the worker's own connection, whatever node that reaches.
    Any,
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
    pub active_partitions: u32,
    pub route: Route,
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
            active_partitions: 0,
            route: Route::Leader,
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
        if self.addrs.is_empty() && self.active_partitions > self.partitions {
            return Err(format!(
                "--active-partitions ({}) is more than the cluster's --partitions ({})",
                self.active_partitions, self.partitions
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
            duration: a.duration,
            requests: a.requests,
            value_size: a.value_size,
            keys: a.keys,
            read_ratio: a.read_ratio,
            serializable: a.serializable,
            active_partitions: a.active_partitions,
            route: a.route,
            verify_keys: a.verify_keys,
            progress: !a.json,
        })
    }
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
    /// The first few failures, as `CODE: message`.
    pub first_errors: Vec<String>,
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
    /// 0: every partition; K: only partitions 1..=K got load.
    pub active_partitions: u32,
    /// Where the calls went: "leader" (each to its partition's leader) or
    /// "any" (a worker's own connection; always so without
    /// --active-partitions, when the nodes pick the partition).
    pub route: &'static str,
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
        first_errors: run.first_errors,
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
        active_partitions: opts.active_partitions,
        route: match opts.route {
            Route::Leader if opts.active_partitions > 0 && run.routed => "leader",
            _ => "any",
        },
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
         load        {} connections x {} in flight, {} B values, {} keys, {:.0}% reads{}{}\n",
        r.connections,
        r.in_flight,
        r.value_size,
        r.keys,
        r.read_ratio * 100.0,
        if r.read_ratio > 0.0 && r.serializable {
            " (serializable)"
        } else {
            ""
        },
        match r.active_partitions {
            0 => String::new(),
            k => format!(", partitions 1..={k} only, calls to {} node", r.route),
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
        for e in &r.first_errors {
            out.push_str(&format!("            {e}\n"));
        }
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

mod load;
mod route;
mod verify;

use load::*;
use route::Routes;

#[cfg(test)]
mod tests {
    use super::verify::*;
    use super::*;

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
            active_partitions: 0,
        }
    }

    #[test]
    fn active_partitions_confine_the_load() {
        let mut wl = workload();
        assert_eq!(wl.partition_of(12345), 0);
        wl.active_partitions = 3;
        let used: std::collections::BTreeSet<u32> = (0..100).map(|k| wl.partition_of(k)).collect();
        assert_eq!(used, [1, 2, 3].into_iter().collect());
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
