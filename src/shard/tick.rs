//! The shard's clock: every tick pings the peer nodes, wakes quiescent
//! followers of a silent leader's node and ticks the awake groups; every
//! few seconds leaderships are evened out over the nodes. The ticks
//! themselves come from a timer task ([`spawn_ticker`]).

use std::collections::HashMap;
use std::time::Duration;

use futures::channel::mpsc;

use super::{events, Marks, Shard, ShardMsg};
use crate::shutdown::Shutdown;

/// Ticks between leader-balancing rounds (3 s at the default 100 ms).
const BALANCE_TICKS: u64 = 30;
/// Most leaderships one shard hands over in a round.
const BALANCE_STEP: usize = 64;

impl Shard {
    /// A tick: pings every known peer node, wakes quiescent followers
    /// whose leader's node has been silent for an election timeout, and
    /// ticks every group that is awake. Quiescent groups cost one check.
    pub(super) fn tick(&mut self) {
        self.ticks += 1;
        if self.ticks.is_multiple_of(BALANCE_TICKS) {
            self.balance_leaders();
            self.watch.maybe_stop_recording(std::time::Instant::now());
        }
        let me = self.node_id();
        let peers = self.links.nodes();
        for &n in &peers {
            if n != me {
                let body = Some(crate::proto::peer::envelope::Body::Ping(Default::default()));
                self.links.send(n, crate::proto::peer::Envelope { body });
            }
        }
        let heard = self
            .node
            .alive_within(self.node.config().raft.election_timeout);
        let alive = |n: u64| n == me || heard.contains(&n);
        // Quiescent followers of a silent node wake. Scanned when a node is
        // silent (a dead node's followers are woken the first tick; those
        // that quiesce again under a live leader are not), not every tick.
        let silent = peers.iter().any(|&n| !alive(n));
        if silent && (!self.any_silent || self.ticks.is_multiple_of(10)) {
            for (p, g) in self.groups.iter_mut() {
                let leader = g.leader();
                if g.is_quiescent() && leader != me && !alive(leader) {
                    tracing::debug!(
                        partition = *p,
                        leader,
                        "no ping from the leader's node for an election timeout: waking"
                    );
                    g.wake();
                    self.awake.insert(*p);
                }
            }
        }
        self.any_silent = silent;
        use crate::proto::admin::cluster_event::Type;
        let groups = &mut self.groups;
        let ready = &mut self.ready;
        let events = &mut self.events;
        let mut awake = self.awake.take();
        // The next group is fetched into the cache while this one ticks
        // (`retain` visits the ids in order, once each).
        let order = awake.clone();
        let mut i = 0;
        awake.retain(|p| {
            i += 1;
            if let Some(next) = order.get(i).and_then(|n| groups.get(n)) {
                next.prefetch();
            }
            let Some(g) = groups.get_mut(p) else {
                return false;
            };
            let quiet = g.is_quiescent();
            if !quiet && g.tick(&alive) {
                ready.insert(*p);
            }
            // Before a group that went quiet leaves the awake set: the
            // leader it learned since its last tick is still news.
            if let Some((leader, term)) = g.take_new_leader() {
                if events.watched() {
                    let mut e = events::event(Type::LeaderChanged, *p);
                    e.node_id = leader;
                    e.term = term;
                    events.publish(e);
                }
            }
            !quiet
        });
        self.awake = Marks(awake);
    }

    /// One leader-balancing round. Every node counts, among this shard's
    /// partitions, how many each voter leads (every node sees about the
    /// same counts: each hosts the partitions it counts). A node leading
    /// more than its share hands leaderships to voters below theirs, each
    /// to one that is caught up, in steps: at most [`BALANCE_STEP`] a round
    /// per shard, and each node above its share fills only its part of a
    /// voter's deficit, so that the givers together do not overshoot. A
    /// transfer needs a difference of two, so the counts settle. After
    /// Bootstrap the first elections pile leaders up; after a node returns
    /// it leads nothing; both even out this way.
    fn balance_leaders(&mut self) {
        let me = self.node_id();
        let mut leads: HashMap<u64, usize> = HashMap::new();
        let mut led: usize = 0;
        for g in self.groups.values() {
            for v in g.voters() {
                leads.entry(v).or_insert(0);
            }
            if g.leader() != raft::INVALID_ID {
                *leads.entry(g.leader()).or_insert(0) += 1;
                led += 1;
            }
        }
        if leads.is_empty() {
            return;
        }
        let share = led.div_ceil(leads.len());
        let mut mine = leads.get(&me).copied().unwrap_or(0);
        if mine <= share {
            return;
        }
        let givers = leads.values().filter(|n| **n > share).count().max(1);
        // What this node may give each voter this round.
        let mut room: HashMap<u64, usize> = leads
            .iter()
            .filter(|(_, n)| **n < share)
            .map(|(v, n)| (*v, (share - n).div_ceil(givers)))
            .collect();
        let mut moved = 0;
        for (p, g) in self.groups.iter_mut() {
            if moved == BALANCE_STEP || mine <= share {
                break;
            }
            let target = g
                .transfer_targets()
                .into_iter()
                .filter(|v| room.get(v).is_some_and(|r| *r > 0))
                .min_by_key(|v| (leads.get(v).copied().unwrap_or(0), *v));
            let Some(to) = target else { continue };
            let theirs = leads.get(&to).copied().unwrap_or(0);
            if mine < theirs + 2 {
                continue;
            }
            tracing::debug!(
                partition = *p,
                to,
                leads_here = mine,
                leads_there = theirs,
                "balancing leaders: handing leadership over"
            );
            g.transfer_leader(to);
            self.ready.insert(*p);
            self.awake.insert(*p);
            mine -= 1;
            *leads.entry(to).or_insert(0) += 1;
            if let Some(r) = room.get_mut(&to) {
                *r -= 1;
            }
            moved += 1;
        }
        if moved > 0 {
            tracing::info!(
                shard = self.index,
                moved,
                leads_here = mine,
                share,
                "balancing leaders: handed leaderships over"
            );
        }
    }
}

/// Sends a Tick into the shard's inbox every heartbeat period, then a Stop
/// at shutdown.
pub(super) fn spawn_ticker(
    inbox: mpsc::UnboundedSender<ShardMsg>,
    period: Duration,
    shutdown: Shutdown,
) {
    glommio::spawn_local(async move {
        let mut next = std::time::Instant::now() + period;
        loop {
            let now = std::time::Instant::now();
            let sleep = glommio::timer::sleep(next.saturating_duration_since(now));
            futures::pin_mut!(sleep);
            let stop = shutdown.wait();
            futures::pin_mut!(stop);
            if let futures::future::Either::Right(_) = futures::future::select(sleep, stop).await {
                let _ = inbox.unbounded_send(ShardMsg::Stop);
                return;
            }
            if inbox.unbounded_send(ShardMsg::Tick).is_err() {
                return;
            }
            next += period;
            // After a long stall, don't fire a burst of catch-up ticks (that
            // would expire election timeouts at once).
            if next < std::time::Instant::now() {
                next = std::time::Instant::now() + period;
            }
        }
    })
    .detach();
}
