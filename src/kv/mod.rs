//! The partition state machine: a replicated key-value map.
//!
//! Writes reach it as commands inside raft entries; several commands of one
//! loop turn share an entry (see [`command`]). Each write carries the
//! identity its first node gave it, and the map's [`session`] table applies
//! each identity at most once. Reads are served from the applied map by the
//! raft layer once ReadIndex allows. [`service`] is the gRPC side; calls for
//! partitions hosted elsewhere go through [`forward`].

pub mod command;
pub mod forward;
mod machine;
pub mod session;
pub mod watch;

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use command::{Command, Op};
use session::{Admission, Refusal, Sessions};

pub use crate::raft::DecodeError;

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

/// What became of one command taken from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied now, at the entry being applied.
    Applied(Applied),
    /// A copy of a write applied before, at `index`: its result then.
    Duplicate { applied: Applied, index: u64 },
    /// Not applied (see [`session`]).
    Refused(Refusal),
}

/// "MRKVSNP2": a snapshot with a session table (older ones start with the
/// entry count).
const SNAPSHOT_MAGIC: u64 = u64::from_be_bytes(*b"MRKVSNP2");

/// One partition's map and its session table.
#[derive(Default)]
pub struct KvStore {
    map: HashMap<Bytes, Bytes>,
    sessions: Sessions,
}

impl KvStore {
    pub fn get(&self, key: &[u8]) -> Option<&Bytes> {
        self.map.get(key)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Sessions in the table.
    #[cfg(test)]
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Applies one command taken from the entry at `index`, at most once per
    /// write identity (see `kv::session`). Deterministic: every replica gets
    /// the same outcome.
    pub fn apply(&mut self, cmd: Command, index: u64) -> Outcome {
        if cmd.id.session.node == 0 {
            // From a log written before sessions: no identity to check.
            return Outcome::Applied(self.run(cmd));
        }
        match self.sessions.admit(cmd.id, cmd.acked) {
            Admission::Run => {
                let id = cmd.id;
                let applied = self.run(cmd);
                self.sessions.record(id, index, &applied);
                Outcome::Applied(applied)
            }
            Admission::Duplicate { applied, index } => Outcome::Duplicate { applied, index },
            Admission::Refused(r) => Outcome::Refused(r),
        }
    }

    fn run(&mut self, cmd: Command) -> Applied {
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

    /// Serialises the whole map and the session table for a raft snapshot.
    ///
    /// ```text
    /// snapshot = { u64 "MRKVSNP2" | u64 count | count * (u32 klen | key | u32 vlen | value)
    ///            | sessions (see session.rs) }
    /// ```
    pub fn snapshot(&self) -> Bytes {
        let size: usize = self.map.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let mut out = BytesMut::with_capacity(16 + size + self.sessions.encoded_len());
        out.put_u64(SNAPSHOT_MAGIC);
        out.put_u64(self.map.len() as u64);
        for (k, v) in &self.map {
            out.put_u32(k.len() as u32);
            out.put_slice(k);
            out.put_u32(v.len() as u32);
            out.put_slice(v);
        }
        self.sessions.encode(&mut out);
        out.freeze()
    }

    /// Replaces the map with a snapshot's contents. An empty buffer is the
    /// empty map (the bootstrap snapshot carries no data).
    pub fn restore(data: &Bytes) -> Result<KvStore, DecodeError> {
        let mut store = KvStore::default();
        if data.is_empty() {
            return Ok(store);
        }
        let mut buf = data.clone();
        if buf.remaining() < 8 {
            return Err("snapshot shorter than its header".into());
        }
        let mut count = buf.get_u64();
        let with_sessions = count == SNAPSHOT_MAGIC;
        if with_sessions {
            if buf.remaining() < 8 {
                return Err("snapshot shorter than its header".into());
            }
            count = buf.get_u64();
        }
        for i in 0..count {
            let k = take(&mut buf).ok_or_else(|| format!("snapshot entry {i}: truncated key"))?;
            let v = take(&mut buf).ok_or_else(|| format!("snapshot entry {i}: truncated value"))?;
            store.map.insert(k, v);
        }
        if with_sessions {
            store.sessions = Sessions::decode(&mut buf)?;
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
            id: Default::default(),
            acked: 0,
            key: Bytes::copy_from_slice(key.as_bytes()),
            op,
        }
    }

    fn applied(o: Outcome) -> Applied {
        match o {
            Outcome::Applied(a) => a,
            other => panic!("not applied: {other:?}"),
        }
    }

    #[test]
    fn put_delete_cas() {
        let mut s = KvStore::default();
        let v = |x: &str| Bytes::copy_from_slice(x.as_bytes());
        assert_eq!(
            applied(s.apply(cmd("a", Op::Put { value: v("1") }), 1)),
            Applied::Put { previous: None }
        );
        assert_eq!(
            applied(s.apply(cmd("a", Op::Put { value: v("2") }), 1)),
            Applied::Put {
                previous: Some(v("1"))
            }
        );
        assert_eq!(
            applied(s.apply(
                cmd(
                    "a",
                    Op::Cas {
                        expected: Some(v("1")),
                        value: v("3")
                    }
                ),
                1
            )),
            Applied::Cas {
                succeeded: false,
                current: Some(v("2"))
            }
        );
        assert_eq!(
            applied(s.apply(
                cmd(
                    "a",
                    Op::Cas {
                        expected: Some(v("2")),
                        value: v("3")
                    }
                ),
                1
            )),
            Applied::Cas {
                succeeded: true,
                current: Some(v("2"))
            }
        );
        assert_eq!(
            applied(s.apply(
                cmd(
                    "b",
                    Op::Cas {
                        expected: None,
                        value: v("x")
                    }
                ),
                1
            )),
            Applied::Cas {
                succeeded: true,
                current: None
            }
        );
        assert_eq!(
            applied(s.apply(cmd("a", Op::Delete), 1)),
            Applied::Delete {
                previous: Some(v("3"))
            }
        );
        assert_eq!(
            applied(s.apply(cmd("a", Op::Delete), 1)),
            Applied::Delete { previous: None }
        );
        let snap = s.snapshot();
        let r = KvStore::restore(&snap).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r.get(b"b"), Some(&v("x")));
        assert!(KvStore::restore(&snap.slice(..snap.len() - 1)).is_err());
        assert!(KvStore::restore(&Bytes::new()).unwrap().is_empty());
    }

    #[test]
    fn copies_of_one_write_apply_once_and_survive_snapshots() {
        use super::command::{SessionId, WriteId};
        let v = |x: &'static str| Bytes::from_static(x.as_bytes());
        let id = |seq| WriteId {
            session: SessionId::new(4, 9, 1),
            seq,
        };
        let put = |seq, acked, value: &'static str| Command {
            id: id(seq),
            acked,
            key: v("k"),
            op: Op::Put { value: v(value) },
        };
        let mut s = KvStore::default();
        assert_eq!(
            s.apply(put(1, 0, "x"), 10),
            Outcome::Applied(Applied::Put { previous: None })
        );
        assert_eq!(
            s.apply(put(2, 0, "y"), 11),
            Outcome::Applied(Applied::Put {
                previous: Some(v("x"))
            })
        );
        // The late copy of seq 1 (a retry elsewhere) does not write x again.
        let dup = Outcome::Duplicate {
            applied: Applied::Put { previous: None },
            index: 10,
        };
        assert_eq!(s.apply(put(1, 0, "x"), 12), dup);
        assert_eq!(s.get(b"k"), Some(&v("y")));
        // The table travels with snapshots.
        let mut r = KvStore::restore(&s.snapshot()).unwrap();
        assert_eq!(r.sessions(), 1);
        assert_eq!(r.apply(put(1, 0, "x"), 12), dup);
        assert_eq!(
            r.apply(put(3, 2, "z"), 13),
            Outcome::Applied(Applied::Put {
                previous: Some(v("y"))
            })
        );
        assert_eq!(
            r.apply(put(2, 0, "y"), 14),
            Outcome::Refused(Refusal::Finished)
        );
    }

    #[test]
    fn snapshots_from_before_sessions_restore() {
        let mut old = BytesMut::new();
        old.put_u64(1);
        old.put_u32(1);
        old.put_slice(b"k");
        old.put_u32(1);
        old.put_slice(b"v");
        let s = KvStore::restore(&old.freeze()).unwrap();
        assert_eq!(s.get(b"k"), Some(&Bytes::from_static(b"v")));
        assert_eq!(s.sessions(), 0);
    }
}
