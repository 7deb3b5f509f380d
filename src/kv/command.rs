//! The binary form of KV commands inside raft entries.
//!
//! Proposals of one partition gathered in one loop turn travel in a single
//! raft entry, a batch:
//!
//! ```text
//! batch = { u32 count | count * command }
//! command = { u64 id | u8 op | u32 klen | key | body }
//!   op 1 Put:    body = { u32 vlen | value }
//!   op 2 Delete: body = {}
//!   op 3 Cas:    body = { u8 has_expected | [u32 elen | expected] | u32 vlen | value }
//! ```
//!
//! `id` is chosen by the node that accepted the call; when the entry is
//! applied, the node holding a waiter under that id answers it. Responses
//! are matched by id, never by log position, so a leader change that drops
//! or reorders proposals cannot answer the wrong caller.

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub id: u64,
    pub key: Bytes,
    pub op: Op,
}

impl Command {
    fn encoded_len(&self) -> usize {
        let body = match &self.op {
            Op::Put { value } => 4 + value.len(),
            Op::Delete => 0,
            Op::Cas { expected, value } => {
                1 + expected.as_ref().map_or(0, |e| 4 + e.len()) + 4 + value.len()
            }
        };
        8 + 1 + 4 + self.key.len() + body
    }

    fn encode(&self, out: &mut BytesMut) {
        out.put_u64(self.id);
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
    out.put_u32(cmds.len() as u32);
    for c in cmds {
        c.encode(&mut out);
    }
    out.freeze()
}

/// Decodes an entry payload. The log was written by this code and is
/// CRC-checked, so an error here means a bug or a foreign log; the caller
/// treats it as fatal for the partition rather than guessing.
pub fn decode_batch(data: &Bytes) -> Result<Vec<Command>, String> {
    let mut buf = data.clone();
    let count = get_u32(&mut buf).ok_or("batch header truncated")? as usize;
    let mut cmds = Vec::with_capacity(count.min(4096));
    for i in 0..count {
        let err = || format!("command {i} of {count} truncated");
        if buf.remaining() < 9 {
            return Err(err());
        }
        let id = buf.get_u64();
        let op = buf.get_u8();
        let key = get_bytes(&mut buf).ok_or_else(err)?;
        let op = match op {
            1 => Op::Put {
                value: get_bytes(&mut buf).ok_or_else(err)?,
            },
            2 => Op::Delete,
            3 => {
                if !buf.has_remaining() {
                    return Err(err());
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
            other => return Err(format!("command {i}: unknown op {other}")),
        };
        cmds.push(Command { id, key, op });
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
        let cmds = vec![
            Command {
                id: 7,
                key: b("k1"),
                op: Op::Put { value: b("v1") },
            },
            Command {
                id: 8,
                key: b("k2"),
                op: Op::Delete,
            },
            Command {
                id: 9,
                key: b(""),
                op: Op::Cas {
                    expected: None,
                    value: b(""),
                },
            },
            Command {
                id: u64::MAX,
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
}
