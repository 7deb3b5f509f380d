//! Shards: one pinned glommio executor per core, each owning its
//! partitions outright.
//!
//! A shard's state ([`Shard`]) is owned by a single task, its loop
//! ([`Shard::run`]). Everything else reaches it by message: the gRPC
//! frontends and peer listeners of every core send [`ShardMsg`]s into the
//! shard's inbox, and callers wait on a oneshot for the answer. There are no
//! locks on this path. What a shard sees of the node is its [`Host`]: the
//! configuration, every shard's inbox ([`Shards`]), peer liveness, and one
//! write (a learned peer address).

mod beats;
pub mod events;
mod request;
mod router;
pub mod snapshot;
mod tick;
mod trim;
mod turn;

use request::partition_status;
pub use request::{Answer, ShardMsg};
pub use router::Shards;

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use protobuf::Message as _;

use raft::eraftpb::ConfChangeType;

use crate::config::NodeConfig;
use crate::grpc::Status;
use crate::meta::NodeMeta;
use crate::proto::peer::PeerResponse;
use crate::raft::{CallError, GroupInit, LogMemory};

/// A replica of a partition: a raft group replicating the key-value store.
pub(crate) type Group = crate::raft::Group<crate::kv::KvStore>;
use crate::shutdown::Shutdown;
use crate::transport::PeerLinks;
use crate::wal::Wal;

/// A callback run on the shard once the turn's WAL sync has completed.
type AfterSync = Box<dyn FnOnce(&mut Shard)>;

/// What a shard needs of the node around it, and all it sees of
/// node-wide state. The node's shared state (`node::NodeShared`) is the one
/// implementation; keeping it behind this trait is what lets `shard` know
/// nothing of `node`.
pub trait Host: Send + Sync {
    fn config(&self) -> &NodeConfig;
    /// Every shard's inbox.
    fn shards(&self) -> &Shards;
    /// The peer nodes whose ping arrived within `within` (node-level
    /// liveness for quiescent groups; see `raft::group::quiet`).
    fn alive_within(&self, within: Duration) -> HashSet<u64>;
    /// Stores a peer node's raft address, learned from an applied conf
    /// change, in the node's metadata. `Ok(true)` if it was new.
    fn store_address(&self, node: u64, addr: &str) -> std::io::Result<bool>;
}

/// One core's share of the node.
pub struct Shard {
    index: usize,
    node: Arc<dyn Host>,
    /// By partition. A hash map: with thousands of groups, a B-tree
    /// lookup (every message, every visit) walked nodes that were rarely
    /// in cache; nothing needs the groups in order.
    groups: foldhash::HashMap<u32, Group>,
    wal: Wal,
    links: Rc<PeerLinks>,
    /// Forwarded calls waiting for a PeerResponse, by request id.
    peer_pending: PeerPending,
    /// Callbacks to run once the current turn's WAL sync has completed
    /// (answers that promise durability).
    after_sync: Vec<AfterSync>,
    /// Set when the WAL has buffered records that must be durable before
    /// this turn goes on (entries, term/vote, conf states, new replicas).
    wal_dirty: bool,
    turns_since_purge: u64,
    /// `WalStats::segments_rolled` at the last purge.
    segments_seen: u64,
    /// Readies of a turn whose sync found the disk full, finished by the
    /// first turn whose retry succeeds. Otherwise empty between turns, and
    /// each turn collects its Readies in it, so that its capacity is
    /// reused: with a thousand groups busy a turn has a few hundred KiB of
    /// Readies, and a Vec grown afresh every turn took fresh zeroed pages
    /// each time (`clear_page_erms` under `Vec::push` in the turn).
    stalled: Vec<(u32, raft::Ready)>,
    retry_at: Option<std::time::Instant>,
    retry_delay: std::time::Duration,
    /// Duration of every WAL sync, in microseconds.
    sync_us: hdrhistogram::Histogram<u64>,
    /// Raft entries written to the WAL.
    wal_entries: u64,
    /// Serves a peer connection handed over by another shard's listener.
    adopt_peer: Option<AdoptPeer>,
    /// This shard's children of the event series (see `crate::metrics`).
    pub(crate) metrics: ShardMetrics,
    /// Recent changes and the watchers of this shard's partitions.
    watch: crate::kv::watch::Hub,
    /// Watchers of cluster events (`Admin/Watch`).
    events: events::Events,
    /// Ticks since start (for the leader-balancing rounds).
    ticks: u64,
    /// Groups the next turn visits: those that were ticked or got a
    /// message or request since the last turn, or still had work after
    /// it. A turn costs what happened, not how many groups are hosted.
    ready: Marks,
    /// Groups that may be awake (not quiescent): the ones a tick visits.
    /// Every path that can wake a group adds it; a tick drops those that
    /// went quiet.
    awake: Marks,
    /// Whether some peer node was silent at the last tick.
    any_silent: bool,
    /// What the groups' logs hold in memory, and this shard's share of
    /// `NodeConfig::log_memory` (see `trim.rs`).
    log_memory: LogMemory,
    log_budget: u64,
    turns_since_trim: u64,
}

/// A set of partition ids that costs one push to add to: ids are kept as
/// they come, repeats and all, and sorted and deduplicated only when taken.
/// Every raft message and call marks its group, so marking must cost less
/// than the ordered-set insert (a cache miss per tree level) it replaces.
#[derive(Default)]
struct Marks(Vec<u32>);

impl Marks {
    fn insert(&mut self, p: u32) {
        if self.0.last() != Some(&p) {
            self.0.push(p);
        }
    }

    /// The marked ids, each once, in order; the set is left empty.
    fn take(&mut self) -> Vec<u32> {
        let mut ids = std::mem::take(&mut self.0);
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// A shard's own label children of the metrics it counts as events.
pub(crate) struct ShardMetrics {
    pub sync_seconds: prometheus::Histogram,
    pub entries_per_sync: prometheus::Histogram,
    pub snapshots_sent: prometheus::IntCounter,
    pub snapshots_received: prometheus::IntCounter,
    pub log_trims: prometheus::IntCounter,
    /// `wal_entries` at the last sync.
    pub entries_at_sync: u64,
}

impl ShardMetrics {
    fn new(index: usize) -> ShardMetrics {
        let m = crate::metrics::get();
        let l = &[index.to_string()];
        let l: &[&str] = &[l[0].as_str()];
        ShardMetrics {
            sync_seconds: m.wal_sync_seconds.with_label_values(l),
            entries_per_sync: m.wal_writes_per_sync.with_label_values(l),
            snapshots_sent: m.snapshots_sent.with_label_values(l),
            snapshots_received: m.snapshots_received.with_label_values(l),
            log_trims: m.log_trims.with_label_values(l),
            entries_at_sync: 0,
        }
    }
}

/// Forwarded calls waiting for their answer, by request id.
pub type PeerPending = Rc<std::cell::RefCell<HashMap<u64, oneshot::Sender<PeerResponse>>>>;

/// See [`Shard::set_adopt_peer`]: `(from_node, socket, bytes already read)`.
pub type AdoptPeer = Rc<dyn Fn(u64, std::os::fd::OwnedFd, Vec<u8>)>;

impl Shard {
    pub fn new(index: usize, node: Arc<dyn Host>, wal: Wal, links: Rc<PeerLinks>) -> Shard {
        let log_budget = node.config().log_memory / node.config().shards.max(1) as u64;
        Shard {
            index,
            node,
            groups: Default::default(),
            wal,
            links,
            peer_pending: Default::default(),
            after_sync: Vec::new(),
            wal_dirty: false,
            turns_since_purge: 0,
            segments_seen: 0,
            stalled: Vec::new(),
            retry_at: None,
            retry_delay: std::time::Duration::from_millis(50),
            sync_us: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2)
                .expect("static histogram bounds are valid"),
            wal_entries: 0,
            adopt_peer: None,
            metrics: ShardMetrics::new(index),
            watch: Default::default(),
            events: Default::default(),
            ticks: 0,
            ready: Default::default(),
            awake: Default::default(),
            any_silent: false,
            log_memory: LogMemory::default(),
            log_budget,
            turns_since_trim: 0,
        }
    }

    /// Takes in a replica built for `p`: its log counts against this
    /// shard's budget, and its first turn comes next.
    fn host(&mut self, p: u32, g: Group) {
        g.storage().attach(&self.log_memory);
        self.groups.insert(p, g);
        self.ready.insert(p);
        self.awake.insert(p);
    }

    fn node_id(&self) -> u64 {
        self.node.config().node_id
    }

    /// Builds this shard's replicas from what its WAL recovered,
    /// reconciled with the node's metadata: replicas no longer hosted are
    /// removed, hosted ones the WAL does not know are created (from the
    /// bootstrap layout, or empty to be joined). The removals and creations
    /// are made durable by the first turn.
    pub fn recover(
        &mut self,
        recovered: crate::wal::Recovered,
        meta: &NodeMeta,
    ) -> Result<(), crate::raft::GroupError> {
        let node = self.node.clone();
        let cfg = node.config();
        let mut removed = Vec::new();
        for (gid, gs) in recovered.groups {
            let p = gid as u32;
            if !meta.hosted.contains(&p) || self.node.shards().shard_of(p) != self.index {
                removed.push(p);
                continue;
            }
            let init = GroupInit {
                hard_state: gs.hard_state,
                conf_state: gs.conf_state,
                snapshot: gs.snapshot,
                entries: gs.entries,
            };
            // Writes up to the snapshot were applied by an earlier run: no
            // watch can replay them.
            let from = init.snapshot.as_ref().map_or(0, |s| s.get_metadata().index);
            self.watch.skipped(p, from);
            let g = Group::new(p, cfg.node_id, &cfg.raft, cfg.max_inflight_proposals, init)?;
            self.host(p, g);
        }
        for p in removed {
            tracing::info!(
                partition = p,
                "replica not hosted any more: removing its state"
            );
            self.remove_group(p, |_| {});
        }
        let me = self.node_id();
        let mine: Vec<u32> = meta
            .hosted
            .iter()
            .copied()
            .filter(|p| {
                self.node.shards().shard_of(*p) == self.index && !self.groups.contains_key(p)
            })
            .collect();
        for p in mine {
            let bootstrapped = meta
                .bootstrap
                .as_ref()
                .and_then(|l| l.get(&p))
                .filter(|m| m.contains_key(&me));
            let init = match bootstrapped {
                Some(m) => GroupInit::bootstrap(m.keys().copied().collect()),
                None => GroupInit::joining(),
            };
            self.create_group(p, init, |_| {});
        }
        tracing::info!(
            shard = self.index,
            partitions = self.groups.len(),
            "shard recovered"
        );
        Ok(())
    }

    /// Calls this shard forwarded to other nodes, waiting for their
    /// PeerResponse (shared with the shard's API frontend).
    pub fn peer_pending(&self) -> PeerPending {
        self.peer_pending.clone()
    }

    /// How this shard serves a peer connection handed over by another
    /// shard's listener.
    pub fn set_adopt_peer(&mut self, adopt: AdoptPeer) {
        self.adopt_peer = Some(adopt);
    }

    /// This shard's state for a metrics scrape.
    fn metrics_state(&self) -> crate::metrics::ShardState {
        crate::metrics::ShardState {
            applied_commands: self.groups.values().map(|g| g.commands_applied).sum(),
            proposals: self.groups.values().map(|g| g.proposals).sum(),
            leader_changes: self.groups.values().map(|g| g.leader_changes).sum(),
            partitions: self.groups.len() as i64,
            leaders: self.groups.values().filter(|g| g.is_leader()).count() as i64,
            quiescent: self.groups.values().filter(|g| g.is_quiescent()).count() as i64,
            disk_full: self.node.shards().is_disk_full(self.index),
            log_bytes: self.log_memory.get() as i64,
        }
    }

    /// (partition, leader, term) of every hosted partition with a known
    /// leader.
    fn leaders(&self) -> Vec<(u32, u64, u64)> {
        let mut leaders: Vec<_> = self
            .groups
            .iter()
            .filter(|(_, g)| g.leader() != raft::INVALID_ID)
            .map(|(p, g)| (*p, g.leader(), g.term()))
            .collect();
        leaders.sort_unstable();
        leaders
    }

    /// Those of `partitions` that this shard owns and that have no replica
    /// here yet or know no leader.
    fn without_leader(&self, partitions: &[u32]) -> Vec<u32> {
        partitions
            .iter()
            .copied()
            .filter(|p| self.node.shards().shard_of(*p) == self.index)
            .filter(|p| {
                self.groups
                    .get(p)
                    .is_none_or(|g| g.leader() == raft::INVALID_ID)
            })
            .collect()
    }

    /// Hosted partitions that know no leader (for `/ready`).
    fn leaderless(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .groups
            .iter()
            .filter(|(_, g)| g.leader() == raft::INVALID_ID)
            .map(|(p, _)| *p)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// This shard's WAL and apply counters.
    fn stats(&self) -> crate::proto::admin::ShardStatus {
        let w = self.wal.stats();
        crate::proto::admin::ShardStatus {
            shard: self.index as u32,
            wal_syncs: w.syncs,
            wal_entries: self.wal_entries,
            wal_bytes: w.bytes_synced,
            sync_p50_us: self.sync_us.value_at_quantile(0.5),
            sync_p99_us: self.sync_us.value_at_quantile(0.99),
            sync_max_us: self.sync_us.max(),
            commands_applied: self.groups.values().map(|g| g.commands_applied).sum(),
            wal_segments: (w.active_segment + 1).saturating_sub(w.first_segment),
            log_memory_bytes: self.log_memory.get(),
        }
    }

    /// Creates (and makes durable, this turn) a new replica. `done` runs
    /// after the WAL sync that persisted its initial state.
    fn create_group(
        &mut self,
        partition: u32,
        init: GroupInit,
        done: impl FnOnce(Result<(), Status>) + 'static,
    ) {
        if self.groups.contains_key(&partition) {
            done(Ok(()));
            return;
        }
        self.wal.set_hard_state(partition as u64, &init.hard_state);
        self.wal.set_conf_state(partition as u64, &init.conf_state);
        if let Some(s) = &init.snapshot {
            self.wal.save_snapshot(partition as u64, s);
        }
        self.wal_dirty = true;
        let cfg = self.node.config();
        match Group::new(
            partition,
            cfg.node_id,
            &cfg.raft,
            cfg.max_inflight_proposals,
            init,
        ) {
            Ok(mut g) => {
                g.campaign_if_first();
                self.host(partition, g);
                tracing::info!(partition, shard = self.index, "replica created");
                self.events.publish(events::event(
                    crate::proto::admin::cluster_event::Type::PartitionAdded,
                    partition,
                ));
                self.after_sync.push(Box::new(move |_| done(Ok(()))));
            }
            Err(e) => done(Err(Status::internal(e.to_string()))),
        }
    }

    /// Removes a replica and its state. `done` runs after the removal is
    /// durable.
    fn remove_group(&mut self, partition: u32, done: impl FnOnce(Result<(), Status>) + 'static) {
        if let Some(mut g) = self.groups.remove(&partition) {
            g.fail_all(CallError::Unavailable(format!(
                "partition {partition} left this node"
            )));
            tracing::info!(partition, shard = self.index, "replica removed");
        }
        self.watch.removed(partition);
        self.events.publish(events::event(
            crate::proto::admin::cluster_event::Type::PartitionRemoved,
            partition,
        ));
        self.wal.remove_group(partition as u64);
        self.wal_dirty = true;
        self.after_sync.push(Box::new(move |_| done(Ok(()))));
    }

    /// Serves one message of the inbox; false on Stop.
    fn handle(&mut self, msg: ShardMsg) -> bool {
        let touched = msg.partition();
        let go_on = self.serve(msg);
        if let Some(p) = touched {
            self.touch(p);
        }
        go_on
    }

    /// Starts fetching group `p`'s state into the cache (see
    /// `Group::prefetch`).
    fn prefetch(&self, p: Option<u32>) {
        if let Some(g) = p.and_then(|p| self.groups.get(&p)) {
            g.prefetch();
        }
    }

    /// Group `p` got something to do: the next turn visits it, and ticks
    /// visit it while it is awake. No lookup: the turn skips ids with no
    /// group, and the next tick drops those that are quiescent.
    fn touch(&mut self, p: u32) {
        self.ready.insert(p);
        self.awake.insert(p);
    }

    /// [`Shard::handle`] without the bookkeeping of which groups have work.
    fn serve(&mut self, msg: ShardMsg) -> bool {
        let not_hosted = |p: u32| Status::not_found(format!("partition {p} is not hosted here"));
        match msg {
            ShardMsg::Raft {
                partition,
                from,
                data,
            } => match self.groups.get_mut(&partition) {
                Some(g) => match raft::eraftpb::Message::parse_from_bytes(&data) {
                    Ok(m) => g.step_from(from, m),
                    Err(e) => tracing::debug!(partition, "undecodable raft message dropped: {e}"),
                },
                None => tracing::debug!(
                    partition,
                    "raft message for a partition not hosted here dropped"
                ),
            },
            ShardMsg::RaftMsg {
                partition,
                from,
                msg,
            } => match self.groups.get_mut(&partition) {
                Some(g) => g.step_from(from, *msg),
                None => tracing::debug!(
                    partition,
                    "snapshot for a partition not hosted here dropped"
                ),
            },
            ShardMsg::Beats { from, beats } => {
                let me = self.node_id();
                for (i, b) in beats.iter().enumerate() {
                    self.prefetch(beats.get(i + 1).map(|n| n.partition_id));
                    let p = b.partition_id;
                    let Some(g) = self.groups.get_mut(&p) else {
                        continue;
                    };
                    match beats::to_message(from, me, b) {
                        Some(m) => g.step_from(from, m),
                        None => tracing::debug!(p, kind = b.kind, "unknown beat dropped"),
                    }
                    self.touch(p);
                }
            }
            ShardMsg::PeerResponse(r) => {
                if let Some(tx) = self.peer_pending.borrow_mut().remove(&r.id) {
                    let _ = tx.send(r);
                }
            }
            ShardMsg::SnapshotReport {
                partition,
                to,
                status,
            } => {
                if let Some(g) = self.groups.get_mut(&partition) {
                    g.raw().report_snapshot(to, status);
                }
            }
            ShardMsg::PeerAddress { node, addr } => self.links.set_address(node, &addr),
            ShardMsg::AdoptPeer { from, fd, buffered } => match &self.adopt_peer {
                Some(adopt) => adopt(from, fd, buffered),
                None => tracing::debug!(
                    from,
                    "peer connection handed to a shard not serving yet; dropped"
                ),
            },
            ShardMsg::Propose {
                partition,
                cmd,
                reply,
            } => match self.groups.get_mut(&partition) {
                Some(g) => g.propose(cmd, reply),
                None => drop(reply.send(Err(CallError::NotHosted(partition)))),
            },
            ShardMsg::Read {
                partition,
                key,
                serializable,
                reply,
            } => match self.groups.get_mut(&partition) {
                Some(g) if serializable => drop(reply.send(Ok(g.read_local(&key)))),
                Some(g) => g.read(key, reply),
                None => drop(reply.send(Err(CallError::NotHosted(partition)))),
            },
            ShardMsg::Watch {
                filter,
                start_index,
                tx,
                ending,
                reply,
            } => {
                let applied = self.groups.iter().map(|(p, g)| (*p, g.applied()));
                self.watch.start_recording(applied);
                let _ = reply.send(self.watch.register(filter, start_index, tx, ending));
            }
            ShardMsg::WatchCluster { tx, behind, reply } => {
                let r = self.events.register(tx, behind).map(|()| self.leaders());
                let _ = reply.send(r);
            }
            ShardMsg::CreateGroup {
                partition,
                init,
                reply,
            } => self.create_group(partition, init, move |r| drop(reply.send(r))),
            ShardMsg::RemoveGroup { partition, reply } => {
                self.remove_group(partition, move |r| drop(reply.send(r)))
            }
            ShardMsg::ChangeMembership {
                partition,
                node,
                change,
                context,
                reply,
            } => {
                let Some(g) = self.groups.get_mut(&partition) else {
                    let _ = reply.send(Err(not_hosted(partition)));
                    return true;
                };
                let (tx, rx) = oneshot::channel();
                let adding = change == ConfChangeType::AddNode;
                if g.voters().contains(&node) == adding {
                    let _ = tx.send(Ok(Default::default()));
                } else {
                    let mut cc = raft::eraftpb::ConfChange::default();
                    cc.set_change_type(change);
                    cc.node_id = node;
                    cc.context = context.into();
                    g.propose_conf_change(cc, tx);
                }
                let _ = reply.send(Ok(rx));
            }
            ShardMsg::TransferLeader { partition, to } => {
                if let Some(g) = self.groups.get_mut(&partition) {
                    g.transfer_leader(to);
                }
            }
            ShardMsg::PartitionStatus { partition, reply } => {
                let shard = self.index as u32;
                let st = self
                    .groups
                    .get(&partition)
                    .map(|g| partition_status(g.status(), shard));
                let _ = reply.send(Ok(st));
            }
            ShardMsg::Status { reply } => {
                let shard = self.index as u32;
                let groups = self
                    .groups
                    .values()
                    .map(|g| partition_status(g.status(), shard))
                    .collect();
                let _ = reply.send(Ok((groups, self.stats())));
            }
            ShardMsg::WithoutLeader { partitions, reply } => {
                let _ = reply.send(Ok(self.without_leader(&partitions)));
            }
            ShardMsg::Leaderless { reply } => {
                let _ = reply.send(Ok(self.leaderless()));
            }
            ShardMsg::Metrics { reply } => {
                let _ = reply.send(Ok(self.metrics_state()));
            }
            ShardMsg::Tick => self.tick(),
            ShardMsg::Stop => return false,
        }
        true
    }

    /// The shard loop. Each turn:
    /// 1. waits for the first message, then drains the inbox (bounded), so
    ///    everything that arrived meanwhile is handled together;
    /// 2. runs the ready cycle over every group (see `turn.rs`): one WAL
    ///    append and one fdatasync for all of them.
    pub async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<ShardMsg>, shutdown: Shutdown) {
        let tick = self.node.config().raft.heartbeat_period;
        tick::spawn_ticker(self.node.shards().inbox(self.index), tick, shutdown.clone());
        let node = self.node.clone();
        let waiting = node.shards().waiting(self.index);
        // Taken messages are subtracted once per drain, not one by one:
        // the counter is shared with the sending cores.
        'outer: loop {
            let Some(first) = inbox.next().await else {
                break;
            };
            let mut taken = usize::from(router::counted(&first));
            // One message ahead: its group is fetched into the cache while
            // this one is served. Bounded, so a flood of messages cannot
            // starve the ready cycle.
            let mut current = first;
            for _ in 0..16_384 {
                let next = inbox.try_recv().ok();
                if let Some(m) = &next {
                    taken += usize::from(router::counted(m));
                    self.prefetch(m.partition());
                }
                if !self.handle(current) {
                    break 'outer;
                }
                match next {
                    Some(m) => current = m,
                    None => break,
                }
            }
            waiting.fetch_sub(taken, std::sync::atomic::Ordering::Relaxed);
            self.turn().await;
        }
        for g in self.groups.values_mut() {
            g.fail_all(CallError::Unavailable("node is shutting down".into()));
        }
        tracing::debug!(shard = self.index, "shard loop stopped");
    }
}
