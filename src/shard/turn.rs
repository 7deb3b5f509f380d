//! The ready cycle of one shard: every group's `Ready`, one WAL append and
//! one fdatasync for all of them, then what raft allows after persistence.
//!
//! The steps, in the order raft-rs's async-ready contract needs them:
//! 1. turn each group's queued proposals and reads into raft requests;
//! 2. take the `Ready` of every group that has one;
//! 3. send the messages a leader may send before persisting (appends,
//!    heartbeats) — DESIGN.md: "a leader may send appends before its own
//!    sync";
//! 4. install snapshots, apply entries raft already reports committed,
//!    append new entries and hard state to the storage index and the WAL;
//! 5. one `Wal::sync` for the whole shard: the group commit;
//! 6. per group: send the messages that must wait for persistence (votes,
//!    append responses: "followers answer only after their own sync"),
//!    advance raft, apply what became committed, take snapshots.
//!
//! A Ready with nothing to persist (raft-rs `must_sync` false: a commit
//! learned from answers or a notice, heartbeats, a forwarded proposal)
//! goes through step 6 right after step 4, before the sync: see the
//! comment where that happens for why nothing it answers can be lost.

use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::Message;

use crate::proto::peer::{envelope, Envelope, RaftMessage};
use std::rc::Rc;
use std::sync::Arc;

use crate::kv::watch::Event;
use crate::raft::Outbox;
use crate::transport::PeerLinks;

use super::beats::Beats;
use super::{Host, Shard};

/// Backoff between retries of a sync that found the disk full.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Turns between purges of WAL segments no group needs (a purge also runs
/// whenever the log moved to a new segment).
const PURGE_EVERY_TURNS: u64 = 1024;

/// Turns to the next purge after one that asked groups to snapshot.
const PURGE_AGAIN_TURNS: u64 = 16;

/// Most groups one purge asks to write their snapshot into a new pack file.
const RELOCATIONS_PER_PURGE: usize = 64;

impl Shard {
    pub(super) async fn turn(&mut self) {
        let mut out = Outbox {
            watching: self.watch.recording(),
            ..Outbox::default()
        };
        let mut out_ctx = SendCtx {
            links: self.links.clone(),
            node: self.node.clone(),
            shard: self.index,
            snapshots_sent: self.metrics.snapshots_sent.clone(),
            beats: Beats::default(),
            snapshot_budget: SnapshotBudget::new(),
        };

        // A turn whose sync found the disk full is finished first. Until
        // then no group takes a new Ready (raft-rs needs every Ready made
        // durable and advanced in order), but the loop keeps serving what
        // does not write: status, local reads, membership queries.
        if !self.stalled.is_empty() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) || !self.sync().await {
                return;
            }
            let mut readies = std::mem::take(&mut self.stalled);
            self.after_persist(&mut readies, &mut out_ctx, &mut out);
            self.stalled = readies;
            self.housekeeping(out).await;
            return;
        }

        // Empty here; its capacity is last turn's (see `Shard::stalled`).
        let mut readies = std::mem::take(&mut self.stalled);

        // 1-4, for the groups with something to do (`Shard::ready`).
        let ids = self.ready.take();
        for (i, id) in ids.iter().enumerate() {
            if let Some(next) = ids.get(i + 1).and_then(|n| self.groups.get(n)) {
                next.prefetch();
            }
            let Some(g) = self.groups.get_mut(id) else {
                continue;
            };
            g.flush();
            notices(g, *id, &mut out_ctx.beats);
            if !g.raw().has_ready() {
                // Its quiesce heartbeats, if any (no Ready: no other
                // messages to keep them behind).
                send_all(&mut out_ctx, *id, g.take_quiet_messages(), &mut out);
                if g.wants_turn() {
                    self.ready.insert(*id);
                }
                // A snapshot asked for by a purge, of an idle group.
                self.wal_dirty |= save_snapshot_if_due(
                    &mut self.wal,
                    g,
                    *id,
                    &mut out_ctx.snapshot_budget,
                    &mut self.ready,
                );
                continue;
            }
            let mut rd = g.raw().ready();
            let mut msgs = rd.take_messages();
            g.prune_heartbeats(&mut msgs);
            send_all(&mut out_ctx, *id, msgs, &mut out);
            // After the Ready's own heartbeats, so a follower sees the
            // leader's plain heartbeat before its quiesce heartbeat.
            send_all(&mut out_ctx, *id, g.take_quiet_messages(), &mut out);
            if !rd.snapshot().is_empty() {
                let snap = rd.snapshot().clone();
                self.metrics.snapshots_received.inc();
                self.watch.skipped(*id, snap.get_metadata().index);
                out.snapshots_installed
                    .push((*id, snap.get_metadata().index));
                if let Err(e) = g.install_snapshot(&snap) {
                    tracing::error!(partition = id, "cannot install snapshot: {e}");
                }
                // Buffered before this Ready's entries, which continue it.
                self.wal.save_snapshot(*id as u64, &snap);
                self.wal_dirty = true;
            }
            if let Some(cs) = g.apply(rd.take_committed_entries(), &mut out) {
                self.wal.set_conf_state(*id as u64, &cs);
                self.wal_dirty = true;
            }
            if !rd.entries().is_empty() {
                g.storage().append(rd.entries());
                self.wal.append_entries(*id as u64, rd.entries());
                self.wal_entries += rd.entries().len() as u64;
                self.wal_dirty = true;
            }
            if let Some(hs) = rd.hs() {
                let prev = g.storage().hard_state();
                g.storage().set_hard_state(hs.clone());
                self.wal.set_hard_state(*id as u64, hs);
                // A change of term or vote must be durable before any
                // message that depends on it leaves (raft-rs `must_sync`);
                // a commit index alone can ride along with the next sync:
                // after a crash it is learned again from the leader.
                if hs.term != prev.term || hs.vote != prev.vote {
                    self.wal_dirty = true;
                }
            }
            g.on_read_states(rd.take_read_states());
            if rd.must_sync() {
                readies.push((*id, rd));
            } else {
                // Nothing here waits for the disk: no entries, no snapshot,
                // no new term or vote (a commit index alone need not be
                // durable, see above). raft-rs allows such a Ready to be
                // advanced at once (`Ready::must_sync`), and what its
                // messages vouch for is already durable: every Ready this
                // group had before was synced and advanced before this turn
                // began (a turn whose sync found the disk full takes no new
                // Readies until it is finished), and a group gives one Ready
                // per turn. So step 6 runs now, while the group is in cache,
                // rather than after the sync; its answers (a follower's to a
                // commit notice or heartbeat, the acknowledgement of a write
                // it applied) leave without waiting for other groups' sync.
                self.wal_dirty |= finish(
                    g,
                    *id,
                    rd,
                    &mut self.wal,
                    &mut self.ready,
                    &mut out_ctx,
                    &mut out,
                );
            }
        }

        // The beats of the Readies, sent before the sync like the rest of
        // their messages.
        out_ctx.beats.flush(&out_ctx.links);

        // 5.
        if !self.sync().await {
            self.stalled = readies;
            return;
        }
        self.after_persist(&mut readies, &mut out_ctx, &mut out);
        self.stalled = readies;
        self.housekeeping(out).await;
    }

    /// Step 6 for every Ready of the turn, once it is durable; leaves
    /// `readies` empty.
    fn after_persist(
        &mut self,
        readies: &mut Vec<(u32, raft::Ready)>,
        out_ctx: &mut SendCtx,
        out: &mut Outbox<Event>,
    ) {
        let mut readies = readies.drain(..).peekable();
        while let Some((id, rd)) = readies.next() {
            if let Some(next) = readies.peek().and_then(|n| self.groups.get(&n.0)) {
                next.prefetch();
            }
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            self.wal_dirty |= finish(g, id, rd, &mut self.wal, &mut self.ready, out_ctx, out);
        }
        out_ctx.beats.flush(&out_ctx.links);
    }

    /// Learned addresses and WAL purges, after the turn's work.
    async fn housekeeping(&mut self, out: Outbox<Event>) {
        for e in out.events {
            self.watch.publish(e);
        }
        if self.events.watched() {
            use super::events::event;
            use crate::proto::admin::cluster_event::Type;
            for (p, index, voters) in out.conf_changes {
                let mut e = event(Type::MembershipChanged, p);
                e.index = index;
                e.voters = voters;
                self.events.publish(e);
            }
            for (p, to, index) in out.snapshots_sent {
                let mut e = event(Type::SnapshotSent, p);
                e.node_id = to;
                e.index = index;
                self.events.publish(e);
            }
            for (p, index) in out.snapshots_installed {
                let mut e = event(Type::SnapshotInstalled, p);
                e.index = index;
                self.events.publish(e);
            }
        }
        for (node, addr) in out.learned {
            self.learn_address(node, addr);
        }

        self.trim_logs();
        self.turns_since_purge += 1;
        let rolled = self.wal.stats().segments_rolled;
        if self.turns_since_purge >= PURGE_EVERY_TURNS || rolled != self.segments_seen {
            self.turns_since_purge = 0;
            self.segments_seen = rolled;
            match self.wal.purge().await {
                // An idle group never reaches its snapshot threshold, yet
                // its old entries keep whole segments alive: snapshot them.
                // They are visited next turn even if quiescent (a snapshot
                // does not wake them), and the next purge comes soon if one
                // will snapshot. (A group pinned by entries it has not
                // applied, say a cut-off leader's, cannot: then purges keep
                // their usual pace.)
                Ok(pinning) => {
                    let mut asked = false;
                    for group in pinning {
                        let p = group as u32;
                        if let Some(g) = self.groups.get(&p) {
                            if g.has_applied_since_snapshot() {
                                g.storage().want_snapshot();
                                self.ready.insert(p);
                                asked = true;
                            }
                        }
                    }
                    // Snapshots left alone in mostly superseded pack files
                    // are written again, so that those files can go.
                    for group in self.wal.sparse_pack_groups(RELOCATIONS_PER_PURGE) {
                        let p = group as u32;
                        if let Some(g) = self.groups.get(&p) {
                            g.storage().want_relocation();
                            self.ready.insert(p);
                            asked = true;
                        }
                    }
                    if asked {
                        self.turns_since_purge = PURGE_EVERY_TURNS - PURGE_AGAIN_TURNS;
                    }
                }
                Err(e) if self.wal.is_poisoned() => fatal_storage_error(self.index, &e),
                Err(e) => tracing::warn!(shard = self.index, "WAL purge: {e}"),
            }
        }
    }

    /// Syncs the WAL (snapshot files first, then the log), then runs the
    /// callbacks that waited for durability. Returns false when the disk is
    /// full.
    ///
    /// A failed fdatasync leaves the state of the written pages unknown, so
    /// it is never retried: the process stops rather than acknowledge
    /// anything that may not be on disk. A full disk is different: nothing
    /// was lost, the records stay buffered, and the sync is retried with
    /// backoff on later turns; meanwhile writes to this shard's partitions
    /// are refused with UNAVAILABLE (see `Shards::is_disk_full`).
    async fn sync(&mut self) -> bool {
        if self.wal_dirty {
            let started = Instant::now();
            match self.wal.sync().await {
                Ok(()) => {
                    let took = started.elapsed();
                    let _ = self.sync_us.record(took.as_micros().max(1) as u64);
                    let m = &mut self.metrics;
                    m.sync_seconds.observe(took.as_secs_f64());
                    m.entries_per_sync
                        .observe((self.wal_entries - m.entries_at_sync) as f64);
                    m.entries_at_sync = self.wal_entries;
                    self.wal_dirty = false;
                }
                Err(e) if is_no_space(&e) => return self.no_space(&e),
                Err(e) => fatal_storage_error(self.index, &e),
            }
        }
        if self.node.shards().set_disk_full(self.index, false) {
            tracing::info!(shard = self.index, "disk space is back; writes resume");
        }
        self.retry_at = None;
        self.retry_delay = RETRY_MIN;
        for f in std::mem::take(&mut self.after_sync) {
            f(self);
        }
        true
    }

    fn no_space(&mut self, e: &crate::wal::WalError) -> bool {
        if !self.node.shards().set_disk_full(self.index, true) {
            tracing::warn!(
                shard = self.index,
                "{e}; writes to this shard are refused until space returns"
            );
        }
        self.retry_at = Some(Instant::now() + self.retry_delay);
        self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
        false
    }

    /// Records a node's raft address learned from a conf change, in every
    /// shard's links and in the node's metadata.
    fn learn_address(&mut self, node: u64, addr: String) {
        if node == self.node_id() {
            return;
        }
        let changed = self.node.store_address(node, &addr);
        match changed {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => tracing::warn!("storing node metadata: {e}"),
        }
        self.node.shards().broadcast_address(node, addr);
    }
}

/// What sending needs from the shard, held apart from its groups so the
/// loop can borrow both.
struct SendCtx {
    links: Rc<PeerLinks>,
    node: Arc<dyn Host>,
    shard: usize,
    snapshots_sent: prometheus::IntCounter,
    /// Heartbeats, their answers and commit notices of this turn.
    beats: Beats,
    /// What is left of this turn's snapshots.
    snapshot_budget: SnapshotBudget,
}

/// Snapshots one turn may take, and the bytes they may add up to. Each
/// one serialises a state machine, and the turn's sync writes them all to
/// one pack file (one fsync) before the log. A purge names up to
/// `purge::MAX_PINNING` groups at once; when each snapshot was a file with
/// its own fsync, taking them all in one turn under load stalled every
/// node's shard for most of a second, long enough for followers to
/// campaign and leaders to step down for want of a quorum. Groups over the
/// budget stay due and are visited next turn.
const SNAPSHOTS_PER_TURN: usize = 32;
const SNAPSHOT_BYTES_PER_TURN: usize = 8 << 20;

/// What is left of a turn's snapshot budget.
struct SnapshotBudget {
    count: usize,
    bytes: usize,
}

impl SnapshotBudget {
    fn new() -> Self {
        SnapshotBudget {
            count: SNAPSHOTS_PER_TURN,
            bytes: SNAPSHOT_BYTES_PER_TURN,
        }
    }

    fn spent(&self) -> bool {
        self.count == 0 || self.bytes == 0
    }

    fn spend(&mut self, bytes: usize) {
        self.count = self.count.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

/// Step 6 for one Ready of group `g` (of `partition`) whose persistence
/// is done (or that needed none): the messages that waited for it, raft's
/// advance, what became committed, a snapshot if due. True if it buffered
/// a record that needs a sync.
fn finish(
    g: &mut super::Group,
    partition: u32,
    mut rd: raft::Ready,
    wal: &mut crate::wal::Wal,
    ready: &mut super::Marks,
    out_ctx: &mut SendCtx,
    out: &mut Outbox<Event>,
) -> bool {
    let mut dirty = false;
    send_all(out_ctx, partition, rd.take_persisted_messages(), out);
    let mut light = g.raw().advance(rd);
    if let Some(commit) = light.commit_index() {
        // Persisted with the next sync; a lost commit index is
        // re-learned from the leader, so it need not wait for this one.
        g.storage().set_commit(commit);
        wal.set_hard_state(partition as u64, &g.storage().hard_state());
    }
    let mut msgs = light.take_messages();
    g.prune_heartbeats(&mut msgs);
    send_all(out_ctx, partition, msgs, out);
    // The leader's own sync may have been the last acknowledgement
    // a commit needed.
    notices(g, partition, &mut out_ctx.beats);
    if let Some(cs) = g.apply(light.take_committed_entries(), out) {
        wal.set_conf_state(partition as u64, &cs);
        dirty = true;
    }
    g.raw().advance_apply();
    if g.wants_turn() || g.raw().has_ready() {
        ready.insert(partition);
    }
    dirty |= save_snapshot_if_due(wal, g, partition, &mut out_ctx.snapshot_budget, ready);
    dirty
}

/// Takes a snapshot of group `g` (of `partition`) if it is due or was
/// asked for, and buffers it and the compaction it allows; true if it did.
/// With the turn's budget spent, a due group is left for the next turn.
fn save_snapshot_if_due(
    wal: &mut crate::wal::Wal,
    g: &mut super::Group,
    partition: u32,
    budget: &mut SnapshotBudget,
    ready: &mut super::Marks,
) -> bool {
    if budget.spent() && g.snapshot_due() {
        ready.insert(partition);
        return false;
    }
    let Some((snap, compact_to)) = g.maybe_snapshot() else {
        return false;
    };
    if let Some(snap) = &snap {
        budget.spend(snap.get_data().len());
        tracing::debug!(
            partition,
            index = snap.get_metadata().index,
            "snapshot taken"
        );
        wal.save_snapshot(partition as u64, snap);
    }
    // The compaction is buffered after the snapshot that covers it (this
    // one, or an earlier one already buffered), so it never reaches the
    // disk without it.
    wal.compact(partition as u64, compact_to);
    true
}

/// Queues the commit notices group `g` (of `partition`) owes.
fn notices(g: &mut super::Group, partition: u32, beats: &mut Beats) {
    g.commit_notices(|to, term, commit| beats.commit(to, partition, term, commit));
}

fn send_all(ctx: &mut SendCtx, partition: u32, msgs: Vec<Message>, out: &mut Outbox<Event>) {
    let links = &ctx.links;
    for m in msgs {
        if ctx.beats.take(partition, &m) {
            continue;
        }
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
            ctx.snapshots_sent.inc();
            out.snapshots_sent
                .push((partition, m.to, m.get_snapshot().get_metadata().index));
        }
        if super::snapshot::needs_chunks(&m) {
            super::snapshot::send_chunked(links.clone(), ctx.node.clone(), ctx.shard, partition, m);
            continue;
        }
        let to = m.to;
        match m.write_to_bytes() {
            Ok(b) => links.send(
                to,
                Envelope {
                    body: Some(envelope::Body::Raft(RaftMessage {
                        partition_id: partition,
                        message: b.into(),
                    })),
                },
            ),
            Err(e) => tracing::error!(partition, "cannot encode raft message: {e}"),
        }
    }
}

/// ENOSPC, however the log reported it.
fn is_no_space(e: &crate::wal::WalError) -> bool {
    match e {
        crate::wal::WalError::NoSpace { .. } => true,
        crate::wal::WalError::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
        _ => false,
    }
}

fn fatal_storage_error(shard: usize, e: &crate::wal::WalError) -> ! {
    // Deliberate: after a failed write or fsync the log's durable contents
    // are unknown; carrying on could acknowledge lost writes. Restarting
    // replays the log from what is really on disk.
    tracing::error!(shard, "fatal WAL error, stopping the node: {e}");
    eprintln!("multiraft: fatal WAL error on shard {shard}: {e}");
    std::process::exit(70);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::GroupInit;
    use crate::wal::{Wal, WalConfig};

    /// A purge can ask hundreds of groups to snapshot at once; one turn
    /// takes at most its budget of them, and the rest are left due and
    /// marked for the next turn.
    #[test]
    fn a_turn_takes_at_most_its_budget_of_snapshots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal_dir = dir.path().to_path_buf();
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let (mut wal, _) = Wal::open(wal_dir, WalConfig::default())
                    .await
                    .expect("open");
                // Threshold 0: every group is due at once.
                let cfg = crate::config::RaftConfig {
                    snapshot_entry_threshold: 0,
                    ..Default::default()
                };
                let groups = SNAPSHOTS_PER_TURN as u32 + 4;
                let mut gs: Vec<super::super::Group> = (1..=groups)
                    .map(|p| {
                        super::super::Group::new(p, 1, &cfg, 16, GroupInit::bootstrap(vec![1]))
                            .expect("group")
                    })
                    .collect();
                let mut ready = super::super::Marks::default();
                let mut budget = SnapshotBudget::new();
                let mut taken = 0;
                for (g, p) in gs.iter_mut().zip(1..) {
                    if save_snapshot_if_due(&mut wal, g, p, &mut budget, &mut ready) {
                        taken += 1;
                    }
                }
                assert_eq!(taken, SNAPSHOTS_PER_TURN);
                let left: Vec<u32> = (SNAPSHOTS_PER_TURN as u32 + 1..=groups).collect();
                assert_eq!(ready.take(), left, "the rest wait for the next turn");
                // The next turn's budget takes them.
                let mut budget = SnapshotBudget::new();
                for p in left {
                    let g = &mut gs[p as usize - 1];
                    assert!(save_snapshot_if_due(
                        &mut wal,
                        g,
                        p,
                        &mut budget,
                        &mut ready
                    ));
                }
                assert!(ready.take().is_empty());
                wal.sync().await.expect("sync");
            })
            .expect("executor")
            .join()
            .expect("join");
    }
}
