//! The partition state machine: a replicated key-value map.
//!
//! Writes reach it as commands inside raft entries; several commands of one
//! loop turn share an entry (see [`command`]). Reads are served from the
//! applied map by the raft layer once ReadIndex allows.

pub mod command;
pub mod service;

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use command::{Command, Op};

/// What applying one command produced, returned to the caller that proposed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Put {
        previous: Option<Bytes>,
    },
    Delete {
        previous: Option<Bytes>,
    },
    Cas {
        succeeded: bool,
        current: Option<Bytes>,
    },
}

/// One partition's map.
#[derive(Default)]
pub struct KvStore {
    map: HashMap<Bytes, Bytes>,
}

impl KvStore {
    pub fn get(&self, key: &[u8]) -> Option<&Bytes> {
        self.map.get(key)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Applies one command. Deterministic: every replica gets the same result.
    pub fn apply(&mut self, cmd: Command) -> Applied {
        match cmd.op {
            Op::Put { value } => Applied::Put {
                previous: self.map.insert(cmd.key, value),
            },
            Op::Delete => Applied::Delete {
                previous: self.map.remove(&cmd.key),
            },
            Op::Cas { expected, value } => {
                let current = self.map.get(&cmd.key).cloned();
                let succeeded = current == expected;
                if succeeded {
                    self.map.insert(cmd.key, value);
                }
                Applied::Cas { succeeded, current }
            }
        }
    }

    /// Serialises the whole map for a raft snapshot.
    ///
    /// snapshot = { u64 count | count * (u32 klen | key | u32 vlen | value) }
    pub fn snapshot(&self) -> Bytes {
        let size: usize = self.map.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let mut out = BytesMut::with_capacity(8 + size);
        out.put_u64(self.map.len() as u64);
        for (k, v) in &self.map {
            out.put_u32(k.len() as u32);
            out.put_slice(k);
            out.put_u32(v.len() as u32);
            out.put_slice(v);
        }
        out.freeze()
    }

    /// Replaces the map with a snapshot's contents. An empty buffer is the
    /// empty map (the bootstrap snapshot carries no data).
    pub fn restore(data: &Bytes) -> Result<KvStore, String> {
        let mut store = KvStore::default();
        if data.is_empty() {
            return Ok(store);
        }
        let mut buf = data.clone();
        if buf.remaining() < 8 {
            return Err("snapshot shorter than its header".into());
        }
        let count = buf.get_u64();
        for i in 0..count {
            let k = take(&mut buf).ok_or_else(|| format!("snapshot entry {i}: truncated key"))?;
            let v = take(&mut buf).ok_or_else(|| format!("snapshot entry {i}: truncated value"))?;
            store.map.insert(k, v);
        }
        if buf.has_remaining() {
            return Err("snapshot has trailing bytes".into());
        }
        Ok(store)
    }
}

fn take(buf: &mut Bytes) -> Option<Bytes> {
    if buf.remaining() < 4 {
        return None;
    }
    let n = buf.get_u32() as usize;
    if buf.remaining() < n {
        return None;
    }
    Some(buf.split_to(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(key: &str, op: Op) -> Command {
        Command {
            id: 1,
            key: Bytes::copy_from_slice(key.as_bytes()),
            op,
        }
    }

    #[test]
    fn put_delete_cas() {
        let mut s = KvStore::default();
        let v = |x: &str| Bytes::copy_from_slice(x.as_bytes());
        assert_eq!(
            s.apply(cmd("a", Op::Put { value: v("1") })),
            Applied::Put { previous: None }
        );
        assert_eq!(
            s.apply(cmd("a", Op::Put { value: v("2") })),
            Applied::Put {
                previous: Some(v("1"))
            }
        );
        assert_eq!(
            s.apply(cmd(
                "a",
                Op::Cas {
                    expected: Some(v("1")),
                    value: v("3")
                }
            )),
            Applied::Cas {
                succeeded: false,
                current: Some(v("2"))
            }
        );
        assert_eq!(
            s.apply(cmd(
                "a",
                Op::Cas {
                    expected: Some(v("2")),
                    value: v("3")
                }
            )),
            Applied::Cas {
                succeeded: true,
                current: Some(v("2"))
            }
        );
        assert_eq!(
            s.apply(cmd(
                "b",
                Op::Cas {
                    expected: None,
                    value: v("x")
                }
            )),
            Applied::Cas {
                succeeded: true,
                current: None
            }
        );
        assert_eq!(
            s.apply(cmd("a", Op::Delete)),
            Applied::Delete {
                previous: Some(v("3"))
            }
        );
        assert_eq!(
            s.apply(cmd("a", Op::Delete)),
            Applied::Delete { previous: None }
        );
        let snap = s.snapshot();
        let r = KvStore::restore(&snap).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r.get(b"b"), Some(&v("x")));
        assert!(KvStore::restore(&snap.slice(..snap.len() - 1)).is_err());
        assert!(KvStore::restore(&Bytes::new()).unwrap().is_empty());
    }
}
