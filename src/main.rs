//! The `multiraft` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

use multiraft::cli::{self, bench, cluster};
use multiraft::config::{parse_duration, NodeConfig, RaftConfig};

#[derive(Parser)]
#[command(
    name = "multiraft",
    version,
    about = "A thread-per-core multi-raft node server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    tls: cli::tls_flags::TlsArgs,
    /// Log lines as text or as one JSON object per line (RUST_LOG filters).
    #[arg(long, global = true, env = "MULTIRAFT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// Where a data command goes.
#[derive(clap::Args)]
struct DataTarget {
    /// A node's API address (HOST:PORT); any node serves any partition.
    #[arg(long, default_value = "127.0.0.1:7001")]
    addr: String,
    /// The partition; 0 lets the server pick it from the key.
    #[arg(long, default_value_t = 0)]
    partition: u32,
    /// Deadline of the call, e.g. "5s", "500ms".
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print proto3 JSON (bytes in base64).
    #[arg(long)]
    json: bool,
}

impl DataTarget {
    fn resolve(&self) -> cli::data::Target {
        cli::data::Target {
            addr: self.addr.clone(),
            partition: self.partition,
            timeout: self.timeout,
            json: self.json,
        }
    }
}

/// The value of `put`/`cas`: the argument, or the file's bytes.
fn value_of(text: Option<String>, file: Option<String>) -> Result<bytes::Bytes> {
    match (text, file) {
        (Some(t), None) => Ok(bytes::Bytes::from(t.into_bytes())),
        (None, Some(f)) => cli::data::read_value_file(&f).map_err(|e| anyhow!(e)),
        _ => bail!("give the value either as an argument or with --value-file"),
    }
}

/// Runs a data command and exits 1 when its outcome is not a success.
fn data(
    f: impl std::future::Future<Output = Result<cli::data::Outcome, multiraft::Status>>,
) -> Result<()> {
    let outcome = client_runtime()?.block_on(f)?;
    cli::data::print(&outcome)?;
    if !outcome.ok {
        std::process::exit(1);
    }
    Ok(())
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node. Every flag can also come from the environment
    /// variable shown in --help (MULTIRAFT_NODE_ID, ...); a flag wins.
    Serve {
        /// This node's id (non-zero, unique in the cluster).
        #[arg(long, env = "MULTIRAFT_NODE_ID")]
        node_id: u64,
        /// gRPC address (Node, Admin and KV services).
        #[arg(long, env = "MULTIRAFT_API_ADDR")]
        api_addr: SocketAddr,
        /// Peer address for raft traffic between nodes.
        #[arg(long, env = "MULTIRAFT_RAFT_ADDR")]
        raft_addr: SocketAddr,
        /// Where the WAL, snapshots and node metadata live.
        #[arg(long, env = "MULTIRAFT_DATA_DIR")]
        data_dir: PathBuf,
        /// Shards (pinned executors); default: one per available CPU.
        #[arg(long, env = "MULTIRAFT_SHARDS")]
        shards: Option<usize>,
        /// MultiRaftConfig as proto3 JSON, e.g.
        /// {"heartbeatPeriod":"0.1s","electionTimeout":"1s"}.
        #[arg(long, env = "MULTIRAFT_CONFIG")]
        config: Option<PathBuf>,
        /// Size of one preallocated WAL segment, in MiB.
        #[arg(long, env = "MULTIRAFT_WAL_SEGMENT_MIB", default_value_t = 64)]
        wal_segment_mib: u64,
        /// Raft log kept in memory, in MiB, over all partitions; above it
        /// the biggest logs are snapshotted and compacted first.
        #[arg(long, env = "MULTIRAFT_LOG_MEMORY_MIB", default_value_t = 256)]
        log_memory_mib: u64,
        /// Serve the API over TLS with --tls-cert/--tls-key (default: h2c).
        #[arg(long, env = "MULTIRAFT_API_TLS")]
        api_tls: bool,
        /// Ask API clients for certificates from this CA (PEM); Node
        /// (control) calls then require one. Implies --api-tls.
        #[arg(long, env = "MULTIRAFT_API_CLIENT_CA")]
        api_client_ca: Option<PathBuf>,
        /// With --api-client-ca: which calls need a client certificate,
        /// "control" (Bootstrap, Join, Leave) or "all".
        #[arg(long, env = "MULTIRAFT_API_AUTH", default_value = "control", value_parser = ["control", "all"])]
        api_auth: String,
        /// Serve Prometheus metrics (/metrics), /health and /ready over
        /// HTTP on this address (default: off).
        #[arg(long, env = "MULTIRAFT_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// API connections per shard; at the limit a new connection makes
        /// the longest-idle one go away, or is closed if all are busy.
        #[arg(long, env = "MULTIRAFT_MAX_CONNECTIONS", default_value_t = 1024)]
        max_connections: usize,
    },
    /// Give a node the cluster layout: partitions 1..=N, each with all members.
    Bootstrap {
        /// The node's API address (HOST:PORT).
        #[arg(long)]
        addr: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        /// Members as ID=RAFT_HOST:PORT,...
        #[arg(long)]
        members: String,
        /// How long to wait for leaders, e.g. "30s", "500ms", "2m".
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Add the node at --addr to an existing partition.
    Join {
        /// The node's API address (HOST:PORT).
        #[arg(long)]
        addr: String,
        /// The partition to join.
        #[arg(long)]
        partition: u32,
        /// The partition's members including the joining node, ID=RAFT_HOST:PORT,...
        #[arg(long)]
        members: String,
        /// How long to wait for the replica to catch up, e.g. "60s".
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Remove the node at --addr from a partition and delete its replica.
    Leave {
        /// The node's API address (HOST:PORT).
        #[arg(long)]
        addr: String,
        /// The partition to leave.
        #[arg(long)]
        partition: u32,
        /// How long to wait for the removal to commit, e.g. "30s".
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Show the partitions a node hosts.
    Status {
        /// The node's API address (HOST:PORT).
        #[arg(long)]
        addr: String,
        /// Machine-readable output (proto3 JSON field names).
        #[arg(long)]
        json: bool,
    },
    /// Write a key: `put KEY VALUE` or `put KEY --value-file FILE`.
    Put {
        #[command(flatten)]
        target: DataTarget,
        /// The key, as text.
        key: String,
        /// The value as text (or give --value-file).
        #[arg(required_unless_present = "value_file")]
        value: Option<String>,
        /// Read the value from FILE ("-": stdin).
        #[arg(long, conflicts_with = "value")]
        value_file: Option<String>,
    },
    /// Read a key (linearizable unless --serializable); prints the value's
    /// bytes. Exit status 1 if the key is absent.
    Get {
        #[command(flatten)]
        target: DataTarget,
        /// The key, as text.
        key: String,
        /// Read this node's replica as it is, without a ReadIndex round.
        #[arg(long)]
        serializable: bool,
    },
    /// Delete a key.
    Del {
        #[command(flatten)]
        target: DataTarget,
        /// The key, as text.
        key: String,
    },
    /// Set a key only if it holds --expect (or, with --expect-absent, only
    /// if it is absent). Exit status 1 if the comparison fails.
    Cas {
        #[command(flatten)]
        target: DataTarget,
        /// The key, as text.
        key: String,
        /// The new value as text (or give --value-file).
        #[arg(required_unless_present = "value_file")]
        value: Option<String>,
        /// Read the new value from FILE ("-": stdin).
        #[arg(long, conflicts_with = "value")]
        value_file: Option<String>,
        /// The value the key must hold now.
        #[arg(long, required_unless_present = "expect_absent")]
        expect: Option<String>,
        /// The key must be absent now.
        #[arg(long, conflicts_with = "expect")]
        expect_absent: bool,
    },
    /// Print every change of a key (or of the keys under a prefix) as the
    /// node applies it, until Ctrl-C or the server ends the watch.
    Watch {
        #[command(flatten)]
        target: DataTarget,
        /// The key, or with --prefix the prefix ("" for every key).
        #[arg(required_unless_present = "cluster")]
        key: Option<String>,
        /// Print the node's cluster events instead: leader and membership
        /// changes, snapshots, partitions added and removed.
        #[arg(long, conflicts_with_all = ["key", "prefix", "from_index"])]
        cluster: bool,
        /// Watch every key that starts with KEY (needs --partition).
        #[arg(long)]
        prefix: bool,
        /// Start from this raft index, out of the node's recent history
        /// (default: from now).
        #[arg(long, default_value_t = 0)]
        from_index: u64,
    },
    /// Start a local cluster of node processes, bootstrap it, run until Ctrl-C.
    Cluster {
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        /// Data directory (default: a temporary one, removed on exit).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Node i listens on API port BASE+i and raft port BASE+100+i.
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        #[arg(long)]
        shards: Option<usize>,
    },
    /// Measure KV throughput and latency over gRPC, then verify a sample of
    /// the writes. Starts a local cluster unless --addr names one.
    Bench(bench::BenchArgs),
}

/// mimalloc rather than glibc's malloc. With 1,024 busy partitions out of
/// 10,000 the nodes spent 13% of their shard threads' time in glibc's
/// malloc and free (21% with 16 busy), and much of the rest waiting on
/// cache and TLB misses in per-partition state spread over the heap.
/// mimalloc is faster at small allocations and backs its arenas with
/// 2 MiB transparent huge pages where the kernel allows them on request
/// (its usual `madvise` mode; `MIMALLOC_ALLOW_THP=0` turns that off).
/// Measured with `benches/pair.sh` (both builds at once) at 10,000
/// partitions: node CPU per Put lower in 9 of 9 pairs with 1,024 active
/// (medians of three-pair runs 9–15% lower) and in 7 of 9 with 16 active
/// (1–17%); RSS about 15% higher.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // SAFETY: the first thing main does; no other thread exists yet.
    unsafe { multiraft::cli::alloc::keep_freed_memory() };
    let cli = Cli::parse();
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(cli::log::stderr_one_line);
    if cli.log_format == "json" {
        // One JSON object per line, fields flattened, for log shippers.
        logs.json().flatten_event(true).init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn client_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> Result<()> {
    let local_cluster = match &cli.cmd {
        Cmd::Cluster { .. } => true,
        Cmd::Bench(args) => args.addr.is_empty(),
        _ => false,
    };
    let tls_given = cli.tls.tls_ca.is_some() || cli.tls.tls_cert.is_some();
    if local_cluster && tls_given {
        bail!("the local cluster runs without TLS; the TLS flags go with serve and with --addr");
    }
    if !matches!(cli.cmd, Cmd::Serve { .. }) {
        cli::tls_flags::client_tls(&cli.tls)?;
    }
    match cli.cmd {
        Cmd::Serve {
            node_id,
            api_addr,
            raft_addr,
            data_dir,
            shards,
            config,
            wal_segment_mib,
            log_memory_mib,
            api_tls,
            api_client_ca,
            api_auth,
            metrics_addr,
            max_connections,
        } => {
            let mut cfg = NodeConfig::new(node_id, api_addr, raft_addr, data_dir);
            if max_connections == 0 {
                bail!("--max-connections must be at least 1");
            }
            cfg.api_limits.max_connections = max_connections;
            if log_memory_mib == 0 {
                bail!("--log-memory-mib must be at least 1");
            }
            cfg.log_memory = log_memory_mib << 20;
            let reload = cli::tls_flags::node_tls(
                &mut cfg,
                &cli.tls,
                api_tls,
                api_client_ca,
                api_auth == "all",
            )?;
            serve(cfg, shards, config, wal_segment_mib, metrics_addr, reload)
        }
        Cmd::Bootstrap {
            addr,
            partitions,
            members,
            timeout,
        } => {
            let members = cli::parse_members(&members).map_err(|e| anyhow!(e))?;
            client_runtime()?.block_on(cli::bootstrap(&addr, partitions, members, timeout))?;
            println!("bootstrapped {partitions} partitions");
            Ok(())
        }
        Cmd::Join {
            addr,
            partition,
            members,
            timeout,
        } => {
            let members = cli::parse_members(&members).map_err(|e| anyhow!(e))?;
            client_runtime()?.block_on(cli::join(&addr, partition, members, timeout))?;
            println!("joined partition {partition}");
            Ok(())
        }
        Cmd::Leave {
            addr,
            partition,
            timeout,
        } => {
            client_runtime()?.block_on(cli::leave(&addr, partition, timeout))?;
            println!("left partition {partition}");
            Ok(())
        }
        Cmd::Status { addr, json } => {
            let st = client_runtime()?.block_on(cli::status(&addr, Duration::from_secs(10)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cli::status_json(&st))?);
            } else {
                print!("{}", cli::status_table(&st));
            }
            Ok(())
        }
        Cmd::Cluster {
            nodes,
            partitions,
            dir,
            base_port,
            shards,
        } => run_cluster(nodes, partitions, dir, base_port, shards),
        Cmd::Bench(args) => bench::run_cli(&args).map_err(|e| anyhow!(e)),
        Cmd::Put {
            target,
            key,
            value,
            value_file,
        } => {
            let value = value_of(value, value_file)?;
            data(cli::data::put(&target.resolve(), &key, value))
        }
        Cmd::Get {
            target,
            key,
            serializable,
        } => data(cli::data::get(&target.resolve(), &key, serializable)),
        Cmd::Del { target, key } => data(cli::data::del(&target.resolve(), &key)),
        Cmd::Watch {
            target,
            key,
            cluster,
            prefix,
            from_index,
        } => {
            // The call's deadline would end the watch: none is sent.
            let t = target.resolve();
            let rt = client_runtime()?;
            match key {
                Some(key) if !cluster => {
                    rt.block_on(cli::data::watch(&t, &key, prefix, from_index))?
                }
                _ => rt.block_on(cli::data::watch_cluster(&t))?,
            }
            Ok(())
        }
        Cmd::Cas {
            target,
            key,
            value,
            value_file,
            expect,
            expect_absent,
        } => {
            let value = value_of(value, value_file)?;
            let expected = match (expect, expect_absent) {
                (Some(e), false) => Some(bytes::Bytes::from(e.into_bytes())),
                (None, true) => None,
                _ => bail!("give either --expect VALUE or --expect-absent"),
            };
            data(cli::data::cas(&target.resolve(), &key, expected, value))
        }
    }
}

/// Exit code of a node stopped by a panic (the fsync-failure path uses 70).
const EXIT_PANIC: i32 = 101;

fn serve(
    mut cfg: NodeConfig,
    shards: Option<usize>,
    config: Option<PathBuf>,
    wal_segment_mib: u64,
    metrics_addr: Option<SocketAddr>,
    reload: Option<cli::tls_flags::Reload>,
) -> Result<()> {
    let node_id = cfg.node_id;
    if wal_segment_mib == 0 {
        bail!("--wal-segment-mib must be at least 1");
    }
    cfg.wal_segment_size = wal_segment_mib << 20;
    if let Some(s) = shards {
        cfg.shards = s;
    }
    if let Some(path) = config {
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        cfg.raft = RaftConfig::from_json(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }
    // A panic on any thread ends the node, with one log line: a shard that
    // died alone would leave a node that looks alive to its supervisor but
    // answers only part of its calls. Restarting replays the WAL.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        // glommio panics when io_uring cannot lock its rings, blaming the
        // kernel's age; the usual cause is the memlock limit.
        let msg = if msg.contains("register a probe") {
            format!("{msg}{}", multiraft::memlock_hint())
        } else {
            msg
        };
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(thread = name, at, "panic, stopping the node: {msg}");
        eprintln!("multiraft: panic on thread {name} at {at}: {msg}; stopping the node");
        std::process::exit(EXIT_PANIC);
    }));
    raise_memlock_limit();
    // Block the signals before any thread starts, so only the waiting
    // iterator below receives them.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])?;
    let mut node = multiraft::Node::start(cfg.clone()).map_err(|e| anyhow!("{e}"))?;
    tracing::info!(
        node_id,
        api = %cfg.api_addr,
        raft = %cfg.raft_addr,
        shards = cfg.shards,
        data_dir = %cfg.data_dir.display(),
        "node ready"
    );
    let metrics = match metrics_addr {
        Some(addr) => {
            let endpoint = multiraft::serve_metrics(addr, node.metrics_source());
            let endpoint = match endpoint {
                Ok(e) => e,
                Err(e) => {
                    node.stop();
                    bail!(e);
                }
            };
            tracing::info!(addr = %endpoint.addr, "metrics at http://{}/metrics", endpoint.addr);
            Some(endpoint)
        }
        None => None,
    };
    for sig in signals.forever() {
        if sig != signal_hook::consts::SIGHUP {
            tracing::info!(signal = sig, "shutting down");
            break;
        }
        // SIGHUP: new TLS files for new connections; open ones keep theirs.
        match &reload {
            None => tracing::info!("SIGHUP: no TLS files to reload"),
            Some(reload) => match reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded"),
                Err(e) => tracing::error!("SIGHUP: TLS reload failed, keeping the old files: {e}"),
            },
        }
    }
    node.stop();
    drop(metrics);
    tracing::info!("stopped");
    Ok(())
}

/// Raises the soft RLIMIT_MEMLOCK to the hard one: glommio pins its I/O
/// memory and refuses to start below 512 KiB, while many systems (and
/// container runtimes) set a low soft limit under a high hard one. Any
/// process may raise its soft limit that far.
fn raise_memlock_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) == 0 {
                tracing::debug!(
                    from = old,
                    to = lim.rlim_max,
                    "raised the soft RLIMIT_MEMLOCK"
                );
            }
        }
    }
}

fn run_cluster(
    nodes: u64,
    partitions: u32,
    dir: Option<PathBuf>,
    base_port: u16,
    shards: Option<usize>,
) -> Result<()> {
    if nodes == 0 || partitions == 0 {
        bail!("--nodes and --partitions must be at least 1");
    }
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let rt = client_runtime()?;
    let spec = cluster::ClusterSpec {
        nodes,
        shards,
        dir,
        base_port,
        config_json: None,
        rust_log: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        exe: None,
    };
    let c = rt
        .block_on(cluster::LocalCluster::start(&spec))
        .map_err(|e| anyhow!(e))?;
    // Every node must get the layout before any partition can elect a
    // leader, so the calls run concurrently.
    let calls = c.nodes.iter().map(|n| {
        cli::bootstrap(
            &n.api_addr,
            partitions,
            c.members(),
            Duration::from_secs(60),
        )
    });
    rt.block_on(futures::future::try_join_all(calls))?;
    for n in &c.nodes {
        println!(
            "node {}: api {} raft {} data {} log {}",
            n.id,
            n.api_addr,
            n.raft_addr,
            n.data_dir.display(),
            n.log.display()
        );
    }
    println!(
        "ready: {nodes} nodes, {partitions} partitions, every partition has a leader; Ctrl-C stops the cluster"
    );
    signals.forever().next();
    println!("stopping");
    drop(c);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("multiraft").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    /// Every duration flag takes the grammar of `config::parse_duration`.
    #[test]
    fn duration_flags_share_one_grammar() {
        let members = ["--members", "1=127.0.0.1:7101"];
        let cli = parse(
            &[
                &["bootstrap", "--addr", "a:1", "--timeout", "500ms"][..],
                &members,
            ]
            .concat(),
        )
        .unwrap();
        let Cmd::Bootstrap { timeout, .. } = cli.cmd else {
            panic!("not bootstrap");
        };
        assert_eq!(timeout, Duration::from_millis(500));

        let cli = parse(
            &[
                &[
                    "join",
                    "--addr",
                    "a:1",
                    "--partition",
                    "1",
                    "--timeout",
                    "2m",
                ][..],
                &members,
            ]
            .concat(),
        )
        .unwrap();
        let Cmd::Join { timeout, .. } = cli.cmd else {
            panic!("not join");
        };
        assert_eq!(timeout, Duration::from_secs(120));

        let cli = parse(&[
            "leave",
            "--addr",
            "a:1",
            "--partition",
            "1",
            "--timeout",
            "0.05s",
        ])
        .unwrap();
        let Cmd::Leave { timeout, .. } = cli.cmd else {
            panic!("not leave");
        };
        assert_eq!(timeout, Duration::from_millis(50));

        let cli = parse(&["get", "--timeout", "1.5s", "k"]).unwrap();
        let Cmd::Get { target, .. } = cli.cmd else {
            panic!("not get");
        };
        assert_eq!(target.resolve().timeout, Duration::from_millis(1500));

        let cli = parse(&["bench", "--duration", "500ms"]).unwrap();
        let Cmd::Bench(args) = cli.cmd else {
            panic!("not bench");
        };
        assert_eq!(args.duration, Duration::from_millis(500));
    }

    #[test]
    fn defaults_go_through_the_same_parser() {
        let cli = parse(&["bootstrap", "--addr", "a:1", "--members", "1=b:2"]).unwrap();
        let Cmd::Bootstrap { timeout, .. } = cli.cmd else {
            panic!("not bootstrap");
        };
        assert_eq!(timeout, Duration::from_secs(30));
        let cli = parse(&["bench"]).unwrap();
        let Cmd::Bench(args) = cli.cmd else {
            panic!("not bench");
        };
        assert_eq!(args.duration, Duration::from_secs(10));
    }

    #[test]
    fn bad_durations_are_refused_naming_the_flag() {
        for (args, flag) in [
            (
                &[
                    "bootstrap",
                    "--addr",
                    "a:1",
                    "--members",
                    "1=b:2",
                    "--timeout",
                    "500",
                ][..],
                "--timeout",
            ),
            (
                &[
                    "leave",
                    "--addr",
                    "a:1",
                    "--partition",
                    "1",
                    "--timeout",
                    "0s",
                ][..],
                "--timeout",
            ),
            (&["put", "--timeout", "soon", "k", "v"][..], "--timeout"),
            (&["bench", "--duration=-1s"][..], "--duration"),
        ] {
            let err = parse(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} was accepted"));
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{args:?}"
            );
            assert!(err.to_string().contains(flag), "{args:?}: {err}");
        }
    }
}
