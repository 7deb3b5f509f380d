//! The binary form of KV commands inside raft entries.
//!
//! Proposals of one partition gathered in one loop turn travel in a single
//! raft entry, a batch:
//!
//! ```text
//! batch   = { u32 0x8000_0000 | count | count * command }
//! command = { u64 node | u64 epoch | u64 seq | u64 acked | u8 op | u32 klen | key | body }
//!   op 1 Put:    body = { u32 vlen | value }
//!   op 2 Delete: body = {}
//!   op 3 Cas:    body = { u8 has_expected | [u32 elen | expected] | u32 vlen | value }
//! ```
//!
//! `(node, epoch, seq)` is the write's identity ([`WriteId`]): chosen once
//! by the node that took the client's call and kept through forwarding and
//! every retry, so the state machine applies a write at most once however
//! many copies reach the log (see `kv::session`). `acked` tells the state
//! machine that the session has finished with every seq up to it on this
//! partition. Answers are matched by identity, never by log position, so a
//! leader change that drops or reorders proposals cannot answer the wrong
//! caller.
//!
//! Logs written before sessions existed hold batches without the top bit,
//! `{ u32 count | count * { u64 id | u8 op | ... } }`; they decode with no
//! session and apply as they always did.

use bytes::{Buf, BufMut, Bytes, BytesMut};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        value: Bytes,
    },
    Delete,
    Cas {
        expected: Option<Bytes>,
        value: Bytes,
    },
}

/// The proposer of a write: one node's shard in one process incarnation.
///
/// `epoch` is `incarnation << 8 | shard`; a node's incarnation grows with
/// every start, so the state machine can retire the sessions of earlier
/// runs for good (see `kv::session`). `node == 0` marks a command from a
/// log written before sessions existed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SessionId {
    pub node: u64,
    pub epoch: u64,
}

impl SessionId {
    pub fn new(node: u64, incarnation: u64, shard: usize) -> SessionId {
        SessionId {
            node,
            epoch: (incarnation << 8) | (shard as u64 & 0xff),
        }
    }

    pub fn incarnation(&self) -> u64 {
        self.epoch >> 8
    }
}

/// The identity of one write, stable across forwarding and retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct WriteId {
    pub session: SessionId,
    /// Per session and partition, from 1.
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub id: WriteId,
    /// Every seq of this session on this partition up to `acked` is
    /// finished: its caller got an answer or gave up, and it is never sent
    /// again. Always below `id.seq`.
    pub acked: u64,
    pub key: Bytes,
    pub op: Op,
}

/// Top bit of a batch's count: commands carry a session.
const SESSION_BATCH: u32 = 0x8000_0000;

impl Command {
    fn encoded_len(&self) -> usize {
        let body = match &self.op {
            Op::Put { value } => 4 + value.len(),
            Op::Delete => 0,
            Op::Cas { expected, value } => {
                1 + expected.as_ref().map_or(0, |e| 4 + e.len()) + 4 + value.len()
            }
        };
        32 + 1 + 4 + self.key.len() + body
    }

    fn encode(&self, out: &mut BytesMut) {
        out.put_u64(self.id.session.node);
        out.put_u64(self.id.session.epoch);
        out.put_u64(self.id.seq);
        out.put_u64(self.acked);
        match &self.op {
            Op::Put { value } => {
                out.put_u8(1);
                put_bytes(out, &self.key);
                put_bytes(out, value);
            }
            Op::Delete => {
                out.put_u8(2);
                put_bytes(out, &self.key);
            }
            Op::Cas { expected, value } => {
                out.put_u8(3);
                put_bytes(out, &self.key);
                match expected {
                    Some(e) => {
                        out.put_u8(1);
                        put_bytes(out, e);
                    }
                    None => out.put_u8(0),
                }
                put_bytes(out, value);
            }
        }
    }
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

/// Encodes commands as one entry payload.
pub fn encode_batch(cmds: &[Command]) -> Bytes {
    let len: usize = 4 + cmds.iter().map(Command::encoded_len).sum::<usize>();
    let mut out = BytesMut::with_capacity(len);
    out.put_u32(SESSION_BATCH | cmds.len() as u32);
    for c in cmds {
        c.encode(&mut out);
    }
    out.freeze()
}

/// Decodes an entry payload. The log was written by this code and is
/// CRC-checked, so an error here means a bug or a foreign log; the caller
/// skips the entry on every replica alike (see `raft::Group::apply`).
pub fn decode_batch(data: &Bytes) -> Result<Vec<Command>, super::DecodeError> {
    let mut buf = data.clone();
    let header = get_u32(&mut buf).ok_or("batch header truncated")?;
    let sessions = header & SESSION_BATCH != 0;
    let count = (header & !SESSION_BATCH) as usize;
    let mut cmds = Vec::with_capacity(count.min(4096));
    for i in 0..count {
        let err = || format!("command {i} of {count} truncated");
        let (id, acked) = if sessions {
            if buf.remaining() < 33 {
                return Err(err().into());
            }
            let session = SessionId {
                node: buf.get_u64(),
                epoch: buf.get_u64(),
            };
            let seq = buf.get_u64();
            let acked = buf.get_u64();
            (WriteId { session, seq }, acked)
        } else {
            if buf.remaining() < 9 {
                return Err(err().into());
            }
            // A pre-session command: its id named a waiter, nothing more.
            let _ = buf.get_u64();
            (WriteId::default(), 0)
        };
        let op = buf.get_u8();
        let key = get_bytes(&mut buf).ok_or_else(err)?;
        let op = match op {
            1 => Op::Put {
                value: get_bytes(&mut buf).ok_or_else(err)?,
            },
            2 => Op::Delete,
            3 => {
                if !buf.has_remaining() {
                    return Err(err().into());
                }
                let expected = match buf.get_u8() {
                    0 => None,
                    _ => Some(get_bytes(&mut buf).ok_or_else(err)?),
                };
                Op::Cas {
                    expected,
                    value: get_bytes(&mut buf).ok_or_else(err)?,
                }
            }
            other => return Err(format!("command {i}: unknown op {other}").into()),
        };
        cmds.push(Command { id, acked, key, op });
    }
    Ok(cmds)
}

fn get_u32(buf: &mut Bytes) -> Option<u32> {
    (buf.remaining() >= 4).then(|| buf.get_u32())
}

fn get_bytes(buf: &mut Bytes) -> Option<Bytes> {
    let n = get_u32(buf)? as usize;
    (buf.remaining() >= n).then(|| buf.split_to(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trip() {
        let b = |s: &str| Bytes::copy_from_slice(s.as_bytes());
        let id = |seq| WriteId {
            session: SessionId::new(3, 1_700_000_000_000, 1),
            seq,
        };
        let cmds = vec![
            Command {
                id: id(7),
                acked: 6,
                key: b("k1"),
                op: Op::Put { value: b("v1") },
            },
            Command {
                id: id(8),
                acked: 0,
                key: b("k2"),
                op: Op::Delete,
            },
            Command {
                id: id(9),
                acked: 2,
                key: b(""),
                op: Op::Cas {
                    expected: None,
                    value: b(""),
                },
            },
            Command {
                id: WriteId {
                    session: SessionId {
                        node: u64::MAX,
                        epoch: u64::MAX,
                    },
                    seq: u64::MAX,
                },
                acked: u64::MAX - 1,
                key: b("k"),
                op: Op::Cas {
                    expected: Some(b("e")),
                    value: b("n"),
                },
            },
        ];
        let enc = encode_batch(&cmds);
        assert_eq!(decode_batch(&enc).unwrap(), cmds);
        for cut in 0..enc.len() {
            assert!(decode_batch(&enc.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn batches_from_before_sessions_still_decode() {
        let mut old = BytesMut::new();
        old.put_u32(2);
        old.put_u64(77);
        old.put_u8(1);
        put_bytes(&mut old, b"k");
        put_bytes(&mut old, b"v");
        old.put_u64(78);
        old.put_u8(2);
        put_bytes(&mut old, b"k");
        let cmds = decode_batch(&old.freeze()).unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].id, WriteId::default());
        assert_eq!(
            cmds[0].op,
            Op::Put {
                value: Bytes::from_static(b"v")
            }
        );
        assert_eq!(cmds[1].op, Op::Delete);
    }
}
