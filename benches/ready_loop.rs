//! Cost of the raft ready cycle per write, without I/O: one single-voter
//! group proposes a batch of Put commands, takes its Ready, "persists" it
//! into the in-memory storage index, advances and applies — the CPU part of
//! what a shard turn does for each group. Printed per batch size so the
//! effect of batching proposals into one entry is visible.
//!
//! Run: cargo bench --bench ready_loop

use std::time::Instant;

use bytes::Bytes;
use multiraft::config::RaftConfig;
use multiraft::internals::{Command, Op, SessionId, WriteId};
use multiraft::internals::{GroupInit, KvStore, Outbox};

/// A replica of the key-value store, as a shard hosts it.
type Group = multiraft::internals::Group<KvStore>;

fn main() {
    for batch in [1usize, 16, 256] {
        let cfg = RaftConfig::default();
        let mut g = Group::new(1, 1, &cfg, 1 << 20, GroupInit::bootstrap(vec![1])).expect("group");
        g.raw().campaign().expect("campaign");
        drive(&mut g);
        assert!(g.is_leader());
        let value = Bytes::from(vec![7u8; 128]);
        let rounds = (200_000 / batch).max(200);
        let mut id = 0u64;
        let mut rxs = Vec::with_capacity(batch);
        let start = Instant::now();
        for _ in 0..rounds {
            for _ in 0..batch {
                id += 1;
                let (tx, rx) = futures::channel::oneshot::channel();
                g.propose(
                    Command {
                        id: WriteId {
                            session: SessionId::new(1, 1, 0),
                            seq: id,
                        },
                        // Every earlier write was answered in its round.
                        acked: id - 1,
                        key: Bytes::from(format!("key-{}", id % 10_000)),
                        op: Op::Put {
                            value: value.clone(),
                        },
                    },
                    tx,
                );
                rxs.push(rx);
            }
            g.flush();
            drive(&mut g);
            for mut rx in rxs.drain(..) {
                assert!(
                    matches!(rx.try_recv(), Ok(Some(Ok(_)))),
                    "write not applied"
                );
            }
        }
        let el = start.elapsed();
        let ops = rounds * batch;
        println!(
            "ready cycle, batch {batch:>3}: {ops} writes in {:?}: {:.0} ns/write, {:.2} us/cycle",
            el,
            el.as_nanos() as f64 / ops as f64,
            el.as_micros() as f64 / rounds as f64
        );
    }
}

/// One shard turn for one group, storage in memory.
fn drive(g: &mut Group) {
    let mut out = Outbox::default();
    while g.raw().has_ready() {
        let mut rd = g.raw().ready();
        g.apply(rd.take_committed_entries(), &mut out);
        if !rd.entries().is_empty() {
            g.storage().append(rd.entries());
        }
        if let Some(hs) = rd.hs() {
            g.storage().set_hard_state(hs.clone());
        }
        let mut light = g.raw().advance(rd);
        if let Some(c) = light.commit_index() {
            g.storage().set_commit(c);
        }
        g.apply(light.take_committed_entries(), &mut out);
        g.raw().advance_apply();
    }
}
