//! Client sessions inside the state machine: every write is applied at most
//! once, however many copies of it reach the log.
//!
//! Copies happen: a node forwarding a call retries it at another member
//! after a timeout, a replica re-proposes a command whose proposal raft may
//! have dropped, and a proposal can sit in a deposed leader's log and be
//! committed later. Each copy carries the same [`WriteId`] (the proposing
//! session and its sequence number), and this table, replicated with the
//! map, decides deterministically on every replica:
//!
//! - the first copy to be applied runs, and its result is kept under its
//!   seq;
//! - a later copy is not run again: it answers with the kept result (same
//!   outcome, same raft index as the first);
//! - a copy whose seq is at or below the session's `acked` watermark is
//!   refused: the proposer has finished with that write (answered or given
//!   up), so no one waits for it, and running it now would be a second,
//!   unrequested application if an earlier copy ran and its result was
//!   dropped. Results at or below the watermark are dropped, which is what
//!   keeps the table small;
//! - a session of an older incarnation of a node than one already seen is
//!   refused: the process that owned it is gone, and forgetting it is safe
//!   only because it can never come back.
//!
//! Why this is exactly-once and not merely usually-once: the decision for a
//! copy depends only on the table, and the table only on the log prefix
//! before the copy, so every replica decides the same; a seq is run only if
//! no earlier copy ran (a kept result, or a refusal once the watermark
//! passes it), and the watermark only grows. The one place where a result
//! is forgotten before the proposer said so (the caps below) also raises
//! the watermark past it, turning a possible re-run into a refusal.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::command::{SessionId, WriteId};
use super::Applied;

/// Results kept per session before the oldest are forgotten (see the
/// module docs). Twice the default in-flight limit of a partition.
const MAX_RESULTS: usize = 16_384;
/// Bytes of kept values per session before the oldest are forgotten.
const MAX_RESULT_BYTES: usize = 64 << 20;

/// Why a copy of a write was not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its session belongs to an earlier run of the proposing node.
    Expired,
    /// Its proposer had already finished with it.
    Finished,
}

/// What the table says about one copy of a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Run it (then [`Sessions::record`] its result).
    Run,
    /// Already run at `index`: answer with the result it had then.
    Duplicate { applied: Applied, index: u64 },
    /// Do not run it.
    Refused(Refusal),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Session {
    acked: u64,
    /// seq -> (index, result), for seqs above `acked`.
    results: BTreeMap<u64, (u64, Applied)>,
    bytes: usize,
}

impl Session {
    fn forget_through(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        while let Some(e) = self.results.first_entry() {
            if *e.key() > self.acked {
                break;
            }
            self.bytes -= applied_bytes(&e.get().1);
            e.remove();
        }
    }
}

/// The session table of one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sessions {
    /// Newest incarnation seen of every node that proposed.
    floors: BTreeMap<u64, u64>,
    live: BTreeMap<SessionId, Session>,
}

impl Sessions {
    /// Decides whether a copy of `id` runs; `acked` is the watermark the
    /// copy carries.
    pub fn admit(&mut self, id: WriteId, acked: u64) -> Admission {
        let s = id.session;
        let floor = self.floors.entry(s.node).or_insert(0);
        if s.incarnation() < *floor {
            return Admission::Refused(Refusal::Expired);
        }
        if s.incarnation() > *floor {
            *floor = s.incarnation();
            let inc = s.incarnation();
            self.live
                .retain(|k, _| k.node != s.node || k.incarnation() >= inc);
        }
        let session = self.live.entry(s).or_default();
        if acked > session.acked {
            session.forget_through(acked);
        }
        if id.seq <= session.acked {
            return Admission::Refused(Refusal::Finished);
        }
        match session.results.get(&id.seq) {
            Some((index, applied)) => Admission::Duplicate {
                applied: applied.clone(),
                index: *index,
            },
            None => Admission::Run,
        }
    }

    /// Keeps the result of a write that ran at `index`.
    pub fn record(&mut self, id: WriteId, index: u64, applied: &Applied) {
        let Some(session) = self.live.get_mut(&id.session) else {
            return;
        };
        session.bytes += applied_bytes(applied);
        session.results.insert(id.seq, (index, applied.clone()));
        while session.results.len() > MAX_RESULTS || session.bytes > MAX_RESULT_BYTES {
            let Some((&oldest, _)) = session.results.first_key_value() else {
                break;
            };
            session.forget_through(oldest);
        }
    }

    /// Sessions in the table (for tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Appends the table to a snapshot.
    ///
    /// ```text
    /// sessions = { u32 nfloors | nfloors * (u64 node | u64 incarnation)
    ///            | u32 nlive | nlive * session }
    /// session  = { u64 node | u64 epoch | u64 acked | u32 nresults
    ///            | nresults * (u64 seq | u64 index | applied) }
    /// applied  = { u8 kind (1 put, 2 delete, 3 cas) | u8 succeeded
    ///            | u8 has_value | [u32 len | value] }
    /// ```
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.floors.len() as u32);
        for (&node, &inc) in &self.floors {
            out.put_u64(node);
            out.put_u64(inc);
        }
        out.put_u32(self.live.len() as u32);
        for (id, s) in &self.live {
            out.put_u64(id.node);
            out.put_u64(id.epoch);
            out.put_u64(s.acked);
            out.put_u32(s.results.len() as u32);
            for (&seq, (index, applied)) in &s.results {
                out.put_u64(seq);
                out.put_u64(*index);
                put_applied(out, applied);
            }
        }
    }

    pub fn encoded_len(&self) -> usize {
        8 + self.floors.len() * 16
            + self
                .live
                .values()
                .map(|s| 28 + s.results.len() * 23 + s.bytes)
                .sum::<usize>()
    }

    /// Reads a table written by [`Sessions::encode`].
    pub fn decode(buf: &mut Bytes) -> Result<Sessions, super::DecodeError> {
        let mut t = Sessions::default();
        let nfloors = get_u32(buf).ok_or("session floors truncated")?;
        for _ in 0..nfloors {
            let node = get_u64(buf).ok_or("session floor truncated")?;
            let inc = get_u64(buf).ok_or("session floor truncated")?;
            t.floors.insert(node, inc);
        }
        let nlive = get_u32(buf).ok_or("sessions truncated")?;
        for i in 0..nlive {
            let err = || format!("session {i} truncated");
            let node = get_u64(buf).ok_or_else(err)?;
            let epoch = get_u64(buf).ok_or_else(err)?;
            let acked = get_u64(buf).ok_or_else(err)?;
            let n = get_u32(buf).ok_or_else(err)?;
            let mut s = Session {
                acked,
                ..Default::default()
            };
            for _ in 0..n {
                let seq = get_u64(buf).ok_or_else(err)?;
                let index = get_u64(buf).ok_or_else(err)?;
                let applied = get_applied(buf).ok_or_else(err)?;
                s.bytes += applied_bytes(&applied);
                s.results.insert(seq, (index, applied));
            }
            t.live.insert(SessionId { node, epoch }, s);
        }
        Ok(t)
    }
}

/// The proposing side of one session (one shard of one process): hands
/// out sequence numbers per partition and knows which are still in flight,
/// which is what the `acked` watermark of every new write reports.
pub struct Proposer {
    id: SessionId,
    partitions: Rc<RefCell<HashMap<u32, InFlight>>>,
}

#[derive(Default)]
struct InFlight {
    next: u64,
    open: BTreeSet<u64>,
}

/// A write's identity, held while its call is in flight. Dropping it (the
/// call answered, failed, timed out or was cancelled) finishes the seq: it
/// is never sent again, so the state machine may forget its result.
pub struct Ticket {
    id: WriteId,
    acked: u64,
    partition: u32,
    partitions: Rc<RefCell<HashMap<u32, InFlight>>>,
}

impl Proposer {
    pub fn new(id: SessionId) -> Proposer {
        Proposer {
            id,
            partitions: Default::default(),
        }
    }

    /// A new write on partition `p`.
    pub fn begin(&self, p: u32) -> Ticket {
        let mut parts = self.partitions.borrow_mut();
        let f = parts.entry(p).or_default();
        f.next += 1;
        let seq = f.next;
        f.open.insert(seq);
        // Every seq below the oldest open one is finished.
        let acked = f.open.first().map_or(seq, |&o| o) - 1;
        Ticket {
            id: WriteId {
                session: self.id,
                seq,
            },
            acked,
            partition: p,
            partitions: self.partitions.clone(),
        }
    }
}

impl Ticket {
    pub fn id(&self) -> WriteId {
        self.id
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(f) = self.partitions.borrow_mut().get_mut(&self.partition) {
            f.open.remove(&self.id.seq);
        }
    }
}

fn applied_bytes(a: &Applied) -> usize {
    match a {
        Applied::Put { previous } | Applied::Delete { previous } => {
            previous.as_ref().map_or(0, |v| v.len())
        }
        Applied::Cas { current, .. } => current.as_ref().map_or(0, |v| v.len()),
    }
}

fn put_applied(out: &mut BytesMut, a: &Applied) {
    let (kind, succeeded, value) = match a {
        Applied::Put { previous } => (1, false, previous),
        Applied::Delete { previous } => (2, false, previous),
        Applied::Cas { succeeded, current } => (3, *succeeded, current),
    };
    out.put_u8(kind);
    out.put_u8(succeeded as u8);
    match value {
        Some(v) => {
            out.put_u8(1);
            out.put_u32(v.len() as u32);
            out.put_slice(v);
        }
        None => out.put_u8(0),
    }
}

fn get_applied(buf: &mut Bytes) -> Option<Applied> {
    if buf.remaining() < 3 {
        return None;
    }
    let kind = buf.get_u8();
    let succeeded = buf.get_u8() != 0;
    let value = match buf.get_u8() {
        0 => None,
        _ => {
            let n = get_u32(buf)? as usize;
            if buf.remaining() < n {
                return None;
            }
            Some(buf.split_to(n))
        }
    };
    match kind {
        1 => Some(Applied::Put { previous: value }),
        2 => Some(Applied::Delete { previous: value }),
        3 => Some(Applied::Cas {
            succeeded,
            current: value,
        }),
        _ => None,
    }
}

fn get_u32(buf: &mut Bytes) -> Option<u32> {
    (buf.remaining() >= 4).then(|| buf.get_u32())
}

fn get_u64(buf: &mut Bytes) -> Option<u64> {
    (buf.remaining() >= 8).then(|| buf.get_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(node: u64, inc: u64, seq: u64) -> WriteId {
        WriteId {
            session: SessionId::new(node, inc, 0),
            seq,
        }
    }

    fn put(prev: Option<&'static [u8]>) -> Applied {
        Applied::Put {
            previous: prev.map(Bytes::from_static),
        }
    }

    #[test]
    fn a_second_copy_answers_with_the_first_result() {
        let mut t = Sessions::default();
        assert_eq!(t.admit(id(1, 5, 1), 0), Admission::Run);
        t.record(id(1, 5, 1), 10, &put(None));
        assert_eq!(
            t.admit(id(1, 5, 1), 0),
            Admission::Duplicate {
                applied: put(None),
                index: 10
            }
        );
        // Out of order is fine: seq 3 before seq 2.
        assert_eq!(t.admit(id(1, 5, 3), 0), Admission::Run);
        t.record(id(1, 5, 3), 11, &put(Some(b"a")));
        assert_eq!(t.admit(id(1, 5, 2), 0), Admission::Run);
    }

    #[test]
    fn finished_writes_are_refused_not_rerun() {
        let mut t = Sessions::default();
        assert_eq!(t.admit(id(1, 5, 1), 0), Admission::Run);
        t.record(id(1, 5, 1), 10, &put(None));
        // Seq 4 says 1..=3 are finished: 1's result goes, 2 never ran and
        // must not run now.
        assert_eq!(t.admit(id(1, 5, 4), 3), Admission::Run);
        assert_eq!(
            t.admit(id(1, 5, 1), 0),
            Admission::Refused(Refusal::Finished)
        );
        assert_eq!(
            t.admit(id(1, 5, 2), 1),
            Admission::Refused(Refusal::Finished)
        );
        // Other sessions are independent.
        assert_eq!(t.admit(id(2, 5, 2), 0), Admission::Run);
        assert_eq!(WriteId::default().session, SessionId { node: 0, epoch: 0 });
    }

    #[test]
    fn a_newer_incarnation_retires_the_older_for_good() {
        let mut t = Sessions::default();
        assert_eq!(t.admit(id(1, 5, 1), 0), Admission::Run);
        t.record(id(1, 5, 1), 10, &put(None));
        assert_eq!(t.admit(id(1, 6, 1), 0), Admission::Run);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.admit(id(1, 5, 1), 0),
            Admission::Refused(Refusal::Expired)
        );
        assert_eq!(
            t.admit(id(1, 5, 9), 0),
            Admission::Refused(Refusal::Expired)
        );
        // Another node's sessions stay.
        assert_eq!(t.admit(id(2, 1, 1), 0), Admission::Run);
        assert_eq!(t.admit(id(1, 7, 1), 0), Admission::Run);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn caps_forget_the_oldest_and_refuse_their_copies() {
        let mut t = Sessions::default();
        for seq in 1..=(MAX_RESULTS as u64 + 2) {
            assert_eq!(t.admit(id(1, 1, seq), 0), Admission::Run);
            t.record(id(1, 1, seq), seq, &put(None));
        }
        assert_eq!(
            t.admit(id(1, 1, 2), 0),
            Admission::Refused(Refusal::Finished)
        );
        assert!(matches!(
            t.admit(id(1, 1, 3), 0),
            Admission::Duplicate { index: 3, .. }
        ));
        let big = Applied::Cas {
            succeeded: false,
            current: Some(Bytes::from(vec![7u8; MAX_RESULT_BYTES / 2 + 1])),
        };
        let mut t = Sessions::default();
        for seq in 1..=3 {
            t.admit(id(1, 1, seq), 0);
            t.record(id(1, 1, seq), seq, &big);
        }
        assert_eq!(
            t.admit(id(1, 1, 1), 0),
            Admission::Refused(Refusal::Finished)
        );
        assert!(matches!(
            t.admit(id(1, 1, 3), 0),
            Admission::Duplicate { index: 3, .. }
        ));
    }

    #[test]
    fn proposer_watermark_trails_the_oldest_open_write() {
        let p = Proposer::new(SessionId::new(1, 1, 0));
        let a = p.begin(7);
        let b = p.begin(7);
        let other = p.begin(8);
        assert_eq!((a.id().seq, a.acked()), (1, 0));
        assert_eq!((b.id().seq, b.acked()), (2, 0));
        assert_eq!((other.id().seq, other.acked()), (1, 0));
        drop(b);
        assert_eq!(p.begin(7).acked(), 0, "seq 1 is still open");
        drop(a);
        let c = p.begin(7);
        assert_eq!((c.id().seq, c.acked()), (4, 3));
    }

    #[test]
    fn encode_round_trip() {
        let mut t = Sessions::default();
        t.admit(id(1, 5, 1), 0);
        t.record(id(1, 5, 1), 10, &put(Some(b"old")));
        t.admit(id(2, 3, 7), 4);
        t.record(
            id(2, 3, 7),
            11,
            &Applied::Cas {
                succeeded: true,
                current: None,
            },
        );
        t.admit(id(2, 3, 8), 4);
        t.record(id(2, 3, 8), 12, &Applied::Delete { previous: None });
        let mut out = BytesMut::new();
        t.encode(&mut out);
        let mut buf = out.freeze();
        let back = Sessions::decode(&mut buf.clone()).unwrap();
        assert_eq!(back, t);
        buf.truncate(buf.len() - 1);
        assert!(Sessions::decode(&mut buf).is_err());
    }
}
