//! Reads: linearizable ones batched into one ReadIndex request per turn
//! and answered once apply reaches the index raft confirmed, and local
//! (serializable) ones served from the replica as it is.

use bytes::Bytes;

use super::{CallError, Group, ReadResult, ReadWaiter, Reply, StateMachine};

impl<S: StateMachine> Group<S> {
    /// Queues a linearizable read for this turn's ReadIndex request.
    pub fn read(&mut self, key: Bytes, reply: Reply<ReadResult>) {
        self.wake();
        if self.cannot_reach_quorum() {
            let _ = reply.send(Err(self.no_quorum_status("retry")));
            return;
        }
        if self.reads_in_flight() >= self.max_inflight {
            let _ = reply.send(Err(CallError::Busy(format!(
                "partition {}: {} linearizable reads in flight; retry later",
                self.id, self.max_inflight
            ))));
            return;
        }
        self.read_queue.push(ReadWaiter { key, reply });
    }

    /// Linearizable reads queued, waiting for their ReadIndex or for apply.
    /// (A handful of batches at a time: one per turn in flight.)
    pub(super) fn reads_in_flight(&self) -> usize {
        self.read_queue.len()
            + self
                .read_batches
                .values()
                .map(|b| b.reads.len())
                .sum::<usize>()
            + self.ready_reads.iter().map(|(_, r)| r.len()).sum::<usize>()
    }

    /// Serves a read from the local replica as it is now.
    pub fn read_local(&self, key: &[u8]) -> ReadResult {
        ReadResult {
            value: self.sm.get(key),
            index: self.applied,
        }
    }

    /// Matches ReadIndex answers to their batches.
    pub fn on_read_states(&mut self, states: Vec<raft::ReadState>) {
        for rs in states {
            let Ok(ctx) = <[u8; 8]>::try_from(&rs.request_ctx[..]) else {
                continue;
            };
            if let Some(b) = self.read_batches.remove(&u64::from_le_bytes(ctx)) {
                self.ready_reads.push((rs.index, b.reads));
            }
        }
        self.serve_reads();
    }

    pub(super) fn serve_reads(&mut self) {
        let applied = self.applied;
        let mut i = 0;
        while i < self.ready_reads.len() {
            if self.ready_reads[i].0 <= applied {
                let (_, reads) = self.ready_reads.swap_remove(i);
                for r in reads {
                    let _ = r.reply.send(Ok(self.read_local(&r.key)));
                }
            } else {
                i += 1;
            }
        }
    }
}
