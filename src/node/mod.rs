//! A running node: its metadata, its shards, and start-up/shutdown.
//!
//! Start-up, per shard, in order:
//! 1. replay the shard's WAL (refusing to start on corruption);
//! 2. reconcile the recovered replicas with the node metadata (a crash
//!    between a metadata change and the replica change is finished here);
//! 3. bind the shard's own SO_REUSEPORT sockets on the API and raft ports;
//! 4. serve gRPC and peer traffic, and run the shard loop.

pub mod api;
pub mod control;
mod error;
pub mod health;
mod kv_service;
pub mod reflection;
mod shared;

pub use shared::NodeShared;

use std::rc::Rc;
use std::sync::{mpsc as std_mpsc, Arc};

use crate::config::NodeConfig;
use crate::proto::peer::envelope;
use crate::shard::{Shard, ShardMsg, Shards};
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::transport::PeerLinks;
use crate::wal::{Wal, WalConfig};

use crate::meta::NodeMeta;
use api::Api;
pub use error::StartError;

/// A started node; dropping it does not stop it, call [`Node::stop`].
pub struct Node {
    triggers: Vec<ShutdownTrigger>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
    /// Held (flock'd) for as long as the node runs; see [`lock_data_dir`].
    _lock: std::fs::File,
    shared: Arc<NodeShared>,
}

impl Node {
    /// Starts every shard and returns once all of them serve, or with the
    /// first start-up error (e.g. a corrupt WAL, a port in use).
    pub fn start(mut config: NodeConfig) -> Result<Node, StartError> {
        // Why absolute: glommio fails to open a relative directory on the
        // shard threads (EBADF), so `--data-dir data` would not start.
        config.data_dir = std::path::absolute(&config.data_dir).map_err(StartError::io(
            format!("data directory {}", config.data_dir.display()),
        ))?;
        if config.node_id == 0 {
            return Err(StartError::Invalid("--node-id must be non-zero"));
        }
        if config.shards == 0 {
            return Err(StartError::Invalid("--shards must be at least 1"));
        }
        // A shard's write session carries its index in 8 bits (see
        // `kv::command::SessionId`): two shards must never share one.
        if config.shards > 256 {
            return Err(StartError::Invalid("--shards must be at most 256"));
        }
        std::fs::create_dir_all(&config.data_dir).map_err(StartError::io(format!(
            "create {}",
            config.data_dir.display()
        )))?;
        // One process per data directory and per address: a second node
        // with the same identity would otherwise start and share the WAL,
        // or split calls and raft traffic with the first (SO_REUSEPORT).
        let lock = lock_data_dir(&config.data_dir)?;
        for (what, addr) in [("API", config.api_addr), ("raft", config.raft_addr)] {
            crate::net::check_address_free(addr, ADDRESS_PATIENCE)
                .map_err(|source| StartError::AddressInUse { what, addr, source })?;
        }
        let mut meta = match NodeMeta::load(&config.data_dir)? {
            Some(m) => {
                if m.node_id != config.node_id {
                    return Err(StartError::Mismatch(format!(
                        "{} belongs to node {}, not node {}",
                        config.data_dir.display(),
                        m.node_id,
                        config.node_id
                    )));
                }
                if m.shards != config.shards {
                    return Err(StartError::Mismatch(format!(
                        "{} was laid out for {} shards; start with --shards {}",
                        config.data_dir.display(),
                        m.shards,
                        m.shards
                    )));
                }
                m
            }
            None => NodeMeta {
                node_id: config.node_id,
                shards: config.shards,
                ..Default::default()
            },
        };

        // A new incarnation before serving anything: the write sessions of
        // this run must be new to every partition (see `kv::session`).
        meta.incarnation = meta.next_incarnation();
        meta.store(&config.data_dir)
            .map_err(StartError::io(format!(
                "write {}",
                NodeMeta::path(&config.data_dir).display()
            )))?;
        tracing::info!(incarnation = meta.incarnation, "starting");

        let n = config.shards;
        let (shards, receivers) = Shards::new(n);
        let node = Arc::new(NodeShared::new(config.clone(), shards, meta));
        let cpus = std::thread::available_parallelism()
            .map(|c| c.get())
            .unwrap_or(1);
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<(), StartError>>();
        let mut triggers = Vec::new();
        let mut threads = Vec::new();
        for (k, inbox) in receivers.into_iter().enumerate() {
            let (trigger, shutdown) = Shutdown::new();
            triggers.push(trigger);
            let node = node.clone();
            let ready = ready_tx.clone();
            let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(k % cpus))
                .name(&format!("shard-{k}"))
                .io_memory(config.io_memory)
                .spawn(move || async move {
                    crate::metrics::set_thread_shard(k);
                    match shard_start(k, node, shutdown.clone()).await {
                        Ok(shard) => {
                            let _ = ready.send(Ok(()));
                            shard.run(inbox, shutdown).await;
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                })
                .map_err(|e| StartError::ShardThread {
                    reason: format!("shard {k}: {e}"),
                })?;
            threads.push(handle);
        }
        drop(ready_tx);
        let mut node_handle = Node {
            triggers,
            threads,
            _lock: lock,
            shared: node.clone(),
        };
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    node_handle.stop();
                    return Err(e);
                }
                Err(_) => {
                    // A shard thread ended without a word: its executor
                    // could not be built. Its join result says why.
                    node_handle.stop_quietly();
                    let why = std::mem::take(&mut node_handle.threads)
                        .into_iter()
                        .filter_map(|h| h.join().err())
                        .map(|e| e.to_string())
                        .next()
                        .unwrap_or_else(|| "no error reported".into());
                    return Err(StartError::ShardThread { reason: why });
                }
            }
        }
        // Every shard has bound its listeners: now a node that started in
        // the same instant on the same address is visible (see
        // `net::check_sole_listener`), and at most one of the two goes on.
        for (what, addr) in [("API", config.api_addr), ("raft", config.raft_addr)] {
            match crate::net::check_sole_listener(addr) {
                Ok(()) => {}
                Err(source) if source.kind() == std::io::ErrorKind::AddrInUse => {
                    node_handle.stop();
                    return Err(StartError::AddressInUse { what, addr, source });
                }
                // No /proc to read (an unusual sandbox): the probe before
                // binding still ran; this node does not refuse to start.
                Err(e) => tracing::warn!(
                    %addr,
                    "cannot check that no other process listens on the {what} address: {e}"
                ),
            }
        }
        Ok(node_handle)
    }

    /// Asks every shard to stop, without waiting for their threads.
    fn stop_quietly(&mut self) {
        for t in &mut self.triggers {
            t.trigger();
        }
    }

    /// What `/metrics`, `/health` and `/ready` read.
    pub fn metrics_source(&self) -> Arc<dyn crate::metrics::Source> {
        Arc::new(MetricsSource(self.shared.clone()))
    }

    /// Stops every shard and waits for their threads.
    pub fn stop(&mut self) {
        self.shared
            .stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for t in &mut self.triggers {
            t.trigger();
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

async fn shard_start(
    k: usize,
    node: Arc<NodeShared>,
    shutdown: Shutdown,
) -> Result<Shard, StartError> {
    let cfg = &node.config;
    let dir = cfg.data_dir.join(format!("shard-{k}"));
    let wal_config = WalConfig {
        segment_size: cfg.wal_segment_size,
    };
    let (wal, recovered) = Wal::open(dir, wal_config)
        .await
        .map_err(|source| StartError::Wal { shard: k, source })?;
    let transport_config = crate::transport::TransportConfig {
        tls: cfg.peer_tls.clone(),
        ..Default::default()
    };
    let links = PeerLinks::with_config(cfg.node_id, shutdown.clone(), transport_config.clone());
    links.set_local_shard(k as u32);
    let meta = node.meta().clone();
    for (n, a) in &meta.addresses {
        if *n != cfg.node_id {
            links.set_address(*n, a);
        }
    }
    let mut shard = Shard::new(k, node.clone(), wal, links.clone());

    shard
        .recover(recovered, &meta)
        .map_err(|source| StartError::Group { shard: k, source })?;

    let bind = |what, addr| {
        crate::net::reuseport_listener(addr).map_err(|source| StartError::Bind {
            shard: k,
            what,
            addr,
            source,
        })
    };
    let api_listener = bind("API", cfg.api_addr)?;
    let raft_listener = bind("raft", cfg.raft_addr)?;
    let api = Api::new(
        node.clone(),
        k,
        links.clone(),
        shard.peer_pending(),
        shutdown.clone(),
    );
    let grpc_config = crate::grpc::ServerConfig {
        max_message_size: cfg.max_message_size,
        tls: cfg.api_tls.clone(),
        limits: cfg.api_limits,
    };
    glommio::spawn_local(crate::grpc::serve(
        api_listener,
        Rc::new(api.clone()),
        grpc_config,
        shutdown.clone(),
    ))
    .detach();

    let sink_api = api.clone();
    let sink_node = node.clone();
    let reassembly = crate::shard::snapshot::Reassembly::default();
    let sink = Rc::new(
        move |from: u64, env: crate::proto::peer::Envelope| match env.body {
            Some(envelope::Body::Raft(m)) => {
                let _ = sink_node.shards.send_bounded(
                    sink_node.shards.shard_of(m.partition_id),
                    ShardMsg::Raft {
                        partition: m.partition_id,
                        from,
                        data: m.message,
                    },
                );
            }
            Some(envelope::Body::Request(r)) => sink_api.serve_peer_request(from, r),
            Some(envelope::Body::SnapshotChunk(c)) => {
                if let Some((partition, msg)) = reassembly.on_chunk(from, c) {
                    let _ = sink_node.shards.send_bounded(
                        sink_node.shards.shard_of(partition),
                        ShardMsg::RaftMsg {
                            partition,
                            from,
                            msg: Box::new(msg),
                        },
                    );
                }
            }
            Some(envelope::Body::Response(r)) => {
                let s = r.origin_shard as usize;
                if s < sink_node.shards.count() {
                    let _ = sink_node.shards.send(s, ShardMsg::PeerResponse(r));
                }
            }
            Some(envelope::Body::Ping(_)) => sink_node.heard_from(from),
            Some(envelope::Body::Heartbeats(h)) => {
                let shards = &sink_node.shards;
                let mut by_shard: Vec<Vec<_>> = vec![Vec::new(); shards.count()];
                for b in h.beats {
                    by_shard[shards.shard_of(b.partition_id)].push(b);
                }
                for (k, beats) in by_shard.into_iter().enumerate() {
                    if !beats.is_empty() {
                        let _ = shards.send_bounded(k, ShardMsg::Beats { from, beats });
                    }
                }
            }
            None => tracing::debug!(from, "empty peer envelope dropped"),
        },
    );
    // Peer connections announce their sending shard; with the same
    // placement on both nodes, that shard index owns the partitions the
    // connection carries, so the connection moves there and its raft
    // messages reach their groups without a hop between cores.
    let config = Rc::new(transport_config);
    let stats = Rc::new(crate::transport::RecvStats::default());
    {
        let (sink, shutdown, config, stats) = (
            sink.clone(),
            shutdown.clone(),
            config.clone(),
            stats.clone(),
        );
        shard.set_adopt_peer(Rc::new(move |from, fd, buffered| {
            glommio::spawn_local(crate::transport::serve_adopted(
                fd,
                from,
                buffered,
                sink.clone(),
                shutdown.clone(),
                config.clone(),
                stats.clone(),
            ))
            .detach();
        }));
    }
    let handoff_node = node.clone();
    let handoff: crate::transport::Handoff = Rc::new(move |from, to_shard, fd, buffered| {
        let to = to_shard as usize;
        if to == k || to >= handoff_node.shards.count() {
            return false;
        }
        handoff_node
            .shards
            .send(to, ShardMsg::AdoptPeer { from, fd, buffered })
            .is_ok()
    });
    #[cfg(debug_assertions)]
    debug_panic_hook(k);
    glommio::spawn_local(crate::transport::serve_handing_off(
        raft_listener,
        sink,
        shutdown,
        (*config).clone(),
        stats,
        Some(handoff),
    ))
    .detach();
    Ok(shard)
}

/// Test hook, in debug builds only: with `MULTIRAFT_DEBUG_PANIC_SHARD=K`,
/// shard K panics two seconds after it starts serving, so the tests can
/// check the panic policy (the whole node exits with code 101) now that no
/// known peer input reaches a panic. Release builds ignore the variable.
#[cfg(debug_assertions)]
fn debug_panic_hook(k: usize) {
    let wanted = std::env::var("MULTIRAFT_DEBUG_PANIC_SHARD").ok();
    if wanted.and_then(|v| v.parse::<usize>().ok()) == Some(k) {
        glommio::spawn_local(async move {
            glommio::timer::sleep(std::time::Duration::from_secs(2)).await;
            panic!("MULTIRAFT_DEBUG_PANIC_SHARD={k}");
        })
        .detach();
    }
}

use crate::metrics::NotServing;

/// The node as the metrics endpoint sees it (from its own thread).
struct MetricsSource(Arc<NodeShared>);

impl crate::metrics::Source for MetricsSource {
    fn shards(&self) -> Result<Vec<crate::metrics::ShardState>, NotServing> {
        futures::executor::block_on(
            self.0
                .shards
                .request_all(|reply| ShardMsg::Metrics { reply }),
        )
        .map_err(|s| NotServing(s.message))
    }

    fn health(&self) -> Result<(), NotServing> {
        if self.0.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(NotServing("the node is shutting down".into()));
        }
        Ok(())
    }

    fn ready(&self) -> Result<(), NotServing> {
        self.health()?;
        let full: Vec<usize> = (0..self.0.shards.count())
            .filter(|&k| self.0.shards.is_disk_full(k))
            .collect();
        if !full.is_empty() {
            return Err(NotServing(format!("the disk of shard(s) {full:?} is full")));
        }
        let leaderless: Vec<u32> = futures::executor::block_on(
            self.0
                .shards
                .request_all(|reply| ShardMsg::Leaderless { reply }),
        )
        .map_err(|s| NotServing(s.message))?
        .concat();
        if !leaderless.is_empty() {
            return Err(NotServing(format!(
                "partitions without a leader: {leaderless:?}"
            )));
        }
        Ok(())
    }
}

/// A hint for a failed executor start: glommio locks (mlock) its I/O
/// memory, so a low RLIMIT_MEMLOCK is the usual cause for non-root users.
pub fn memlock_hint() -> String {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return String::new();
    }
    format!(
        " (each shard locks a few MiB of memory for io_uring; RLIMIT_MEMLOCK is {} KiB: \
         raise it with `ulimit -l 65536`, LimitMEMLOCK= in a systemd unit, or \
         --ulimit memlock in docker)",
        lim.rlim_cur / 1024
    )
}

/// How long start-up waits for a busy address to become free (see
/// `net::check_address_free`) before refusing to start.
const ADDRESS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes an exclusive `flock` on `DATA_DIR/LOCK` (and writes this process's
/// pid into it, for the message another process gets). The lock goes with
/// the process, however it ends.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(StartError::io(format!("open {}", path.display())))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => StartError::Locked {
                dir: dir.to_path_buf(),
                pid: holder.trim().to_string(),
            },
            _ => StartError::Io {
                what: format!("lock {}", path.display()),
                source: err,
            },
        });
    }
    let pid = std::process::id().to_string();
    let written = file
        .set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(pid.as_bytes()));
    written.map_err(StartError::io(format!("write {}", path.display())))?;
    Ok(file)
}
