//! Raft snapshots between nodes, in chunks.
//!
//! A snapshot message carries a partition's whole state machine, which can
//! be far larger than a sensible peer frame. When a leader's `MsgSnapshot`
//! is bigger than one chunk, it leaves the shard loop at once: a separate
//! task sends the message without its data as a header, then the data in
//! [`CHUNK`]-sized envelopes, pacing itself on the link's queue so that
//! heartbeats and appends of other groups keep flowing. The chunks of one
//! transfer travel on one link, hence in order; the receiving node
//! reassembles them and steps the complete message. The outcome goes back
//! to raft (`report_snapshot`): on failure the leader retries with a new
//! transfer, and if a chunk was lost the follower's rejection of the next
//! append makes the leader send a snapshot again.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use raft::SnapshotStatus;

use crate::proto::peer::{envelope, Envelope, SnapshotChunk};
use crate::transport::PeerLinks;

use super::{Host, ShardMsg};

/// Data bytes per chunk.
pub const CHUNK: usize = 1 << 20;
/// The sender waits while more than this is queued for the peer.
const MAX_QUEUED: usize = 8 << 20;
/// A transfer that cannot make progress for this long is abandoned.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// Largest snapshot a receiver assembles, and the most bytes all of a
/// shard's unfinished transfers may hold together: a chunk past it drops
/// its transfer (the sender's raft sends the snapshot again later).
const MAX_SNAPSHOT: usize = 4 << 30;

/// True for a snapshot message that must travel in chunks.
pub fn needs_chunks(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot && m.get_snapshot().get_data().len() > CHUNK
}

/// Sends `msg` (a large MsgSnapshot of `partition`) in chunks from its own
/// task, then reports the outcome to raft on shard `shard`.
pub fn send_chunked(
    links: Rc<PeerLinks>,
    node: Arc<dyn Host>,
    shard: usize,
    partition: u32,
    mut msg: Message,
) {
    let to = msg.to;
    let data: Bytes = msg.mut_snapshot().take_data();
    let header = match msg.write_to_bytes() {
        Ok(h) => Bytes::from(h),
        Err(e) => {
            tracing::error!(partition, "cannot encode snapshot header: {e}");
            return;
        }
    };
    let transfer_id: u64 = rand::random();
    tracing::info!(
        partition,
        to,
        bytes = data.len(),
        "sending snapshot in chunks"
    );
    glommio::spawn_local(async move {
        let chunks = data.len().div_ceil(CHUNK);
        let mut status = SnapshotStatus::Finish;
        for seq in 0..chunks {
            let started = Instant::now();
            while links.queued_bytes(to) > MAX_QUEUED {
                if started.elapsed() > STALL_LIMIT {
                    tracing::warn!(partition, to, "snapshot transfer stalled; giving up");
                    status = SnapshotStatus::Failure;
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            if matches!(status, SnapshotStatus::Failure) {
                break;
            }
            let lo = seq * CHUNK;
            let hi = (lo + CHUNK).min(data.len());
            links.send(
                to,
                Envelope {
                    body: Some(envelope::Body::SnapshotChunk(SnapshotChunk {
                        partition_id: partition,
                        transfer_id,
                        seq: seq as u32,
                        last: seq + 1 == chunks,
                        header: if seq == 0 {
                            header.clone()
                        } else {
                            Bytes::new()
                        },
                        data: data.slice(lo..hi),
                    })),
                },
            );
            glommio::yield_if_needed().await;
        }
        let _ = node.shards().send(
            shard,
            ShardMsg::SnapshotReport {
                partition,
                to,
                status,
            },
        );
    })
    .detach();
}

struct Partial {
    transfer_id: u64,
    next_seq: u32,
    header: Bytes,
    data: BytesMut,
    last_chunk: std::time::Instant,
}

/// A transfer with no chunk for this long is abandoned (its sender died or
/// gave up); its buffer is freed.
const REASSEMBLY_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Transfers reassembled at once on one shard; a new one beyond this
/// replaces the one idle longest.
const MAX_TRANSFERS: usize = 64;

/// Reassembles chunked snapshots arriving on one shard's peer listener.
#[derive(Default)]
pub struct Reassembly {
    partial: RefCell<HashMap<(u64, u32), Partial>>,
}

impl Reassembly {
    /// Takes one chunk from node `from`; returns the complete raft message
    /// once the last chunk of a transfer is in.
    pub fn on_chunk(&self, from: u64, c: SnapshotChunk) -> Option<(u32, Message)> {
        self.on_chunk_within(from, c, MAX_SNAPSHOT)
    }

    /// [`Reassembly::on_chunk`] with the limit on bytes held as a parameter.
    fn on_chunk_within(
        &self,
        from: u64,
        c: SnapshotChunk,
        max_buffered: usize,
    ) -> Option<(u32, Message)> {
        let key = (from, c.partition_id);
        let now = std::time::Instant::now();
        let mut partial = self.partial.borrow_mut();
        partial.retain(|&(node, p), t| {
            let live = now.duration_since(t.last_chunk) < REASSEMBLY_IDLE;
            if !live {
                tracing::info!(
                    from = node,
                    partition = p,
                    "abandoned snapshot transfer dropped"
                );
            }
            live
        });
        if c.seq == 0 {
            if partial.len() >= MAX_TRANSFERS && !partial.contains_key(&key) {
                let oldest = partial
                    .iter()
                    .min_by_key(|(_, t)| t.last_chunk)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    partial.remove(&k);
                }
            }
            partial.insert(
                key,
                Partial {
                    transfer_id: c.transfer_id,
                    next_seq: 0,
                    header: c.header.clone(),
                    data: BytesMut::new(),
                    last_chunk: now,
                },
            );
        }
        let buffered: usize = partial.values().map(|t| t.data.len()).sum();
        let p = partial.get_mut(&key)?;
        if buffered + c.data.len() > max_buffered {
            tracing::warn!(
                from,
                partition = c.partition_id,
                buffered,
                "snapshot transfers would hold more than {max_buffered} bytes; transfer dropped"
            );
            partial.remove(&key);
            return None;
        }
        if p.transfer_id != c.transfer_id || p.next_seq != c.seq {
            tracing::debug!(
                from,
                partition = c.partition_id,
                "snapshot chunk out of sequence; transfer dropped"
            );
            partial.remove(&key);
            return None;
        }
        p.data.extend_from_slice(&c.data);
        p.next_seq += 1;
        p.last_chunk = now;
        if !c.last {
            return None;
        }
        let p = partial.remove(&key)?;
        match Message::parse_from_bytes(&p.header) {
            Ok(mut m) => {
                m.mut_snapshot().set_data(p.data.freeze());
                Some((c.partition_id, m))
            }
            Err(e) => {
                tracing::warn!(from, partition = c.partition_id, "bad snapshot header: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(data: &[u8], transfer_id: u64) -> Vec<SnapshotChunk> {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgSnapshot);
        m.to = 2;
        m.mut_snapshot().mut_metadata().index = 42;
        let header = Bytes::from(m.write_to_bytes().unwrap());
        let n = data.len().div_ceil(CHUNK);
        (0..n)
            .map(|i| SnapshotChunk {
                partition_id: 7,
                transfer_id,
                seq: i as u32,
                last: i + 1 == n,
                header: if i == 0 { header.clone() } else { Bytes::new() },
                data: Bytes::copy_from_slice(&data[i * CHUNK..((i + 1) * CHUNK).min(data.len())]),
            })
            .collect()
    }

    #[test]
    fn reassembles_in_order_and_drops_gaps() {
        let data: Vec<u8> = (0..(CHUNK * 2 + 123)).map(|i| i as u8).collect();
        let r = Reassembly::default();
        let cs = chunks(&data, 1);
        assert_eq!(cs.len(), 3);
        let mut out = None;
        for c in cs {
            out = r.on_chunk(1, c);
        }
        let (p, m) = out.expect("complete");
        assert_eq!(p, 7);
        assert_eq!(m.get_snapshot().get_metadata().index, 42);
        assert_eq!(m.get_snapshot().get_data(), &data[..]);

        // A missing middle chunk loses the transfer.
        let mut cs = chunks(&data, 2);
        cs.remove(1);
        assert!(cs.into_iter().all(|c| r.on_chunk(1, c).is_none()));
        // A new transfer replaces an unfinished one.
        let cs = chunks(&data, 3);
        r.on_chunk(1, cs[0].clone());
        let cs = chunks(&data, 4);
        let got = cs.into_iter().filter_map(|c| r.on_chunk(1, c)).count();
        assert_eq!(got, 1);

        // Unfinished transfers from many partitions: at most MAX_TRANSFERS
        // stay buffered.
        for p in 0..(MAX_TRANSFERS as u32 * 3) {
            let mut c = chunks(&data, 5)[0].clone();
            c.partition_id = 100 + p;
            r.on_chunk(2, c);
        }
        assert_eq!(r.partial.borrow().len(), MAX_TRANSFERS);
    }

    #[test]
    fn unfinished_transfers_hold_a_bounded_number_of_bytes() {
        let data: Vec<u8> = (0..(CHUNK * 3)).map(|i| i as u8).collect();
        let r = Reassembly::default();
        let limit = CHUNK * 4;
        // Two transfers of two chunks each fill the budget exactly.
        for p in [1u32, 2] {
            for mut c in chunks(&data, 10 + p as u64).into_iter().take(2) {
                c.partition_id = p;
                assert!(r.on_chunk_within(1, c, limit).is_none());
            }
        }
        assert_eq!(r.partial.borrow().len(), 2);
        // One more chunk of either would pass it: that transfer goes.
        let mut c = chunks(&data, 11)[2].clone();
        c.partition_id = 1;
        assert!(r.on_chunk_within(1, c, limit).is_none());
        let held: usize = r.partial.borrow().values().map(|t| t.data.len()).sum();
        assert_eq!(held, 2 * CHUNK);
        assert!(!r.partial.borrow().contains_key(&(1, 1)));
    }
}
