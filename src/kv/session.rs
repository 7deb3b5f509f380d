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
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::rc::Rc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use smallvec::SmallVec;

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
    /// `(seq, index, result)` for seqs above `acked`, ascending by seq.
    /// Seqs mostly arrive in order and leave from the front, and the
    /// buffer is kept when it empties (a B-tree freed its node then, and
    /// allocated a new one for the next write).
    results: VecDeque<(u64, u64, Applied)>,
    bytes: usize,
}

/// Buffers of results over this many slots are shrunk once three
/// quarters of them are free.
const RESULTS_KEPT_SLOTS: usize = 64;

impl Session {
    fn forget_through(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        while self.results.front().is_some_and(|e| e.0 <= self.acked) {
            if let Some((_, _, applied)) = self.results.pop_front() {
                self.bytes -= applied_bytes(&applied);
            }
        }
        let cap = self.results.capacity();
        if cap > RESULTS_KEPT_SLOTS && self.results.len() < cap / 4 {
            self.results
                .shrink_to(RESULTS_KEPT_SLOTS.max(self.results.len() * 2));
        }
    }

    fn result(&self, seq: u64) -> Option<&(u64, u64, Applied)> {
        let i = self.results.binary_search_by_key(&seq, |e| e.0).ok()?;
        self.results.get(i)
    }

    /// Keeps the result of `seq` (replacing one kept before, if any).
    fn keep(&mut self, seq: u64, index: u64, applied: Applied) {
        self.bytes += applied_bytes(&applied);
        match self.results.binary_search_by_key(&seq, |e| e.0) {
            Ok(i) => {
                let old = std::mem::replace(&mut self.results[i], (seq, index, applied));
                self.bytes -= applied_bytes(&old.2);
            }
            Err(i) => self.results.insert(i, (seq, index, applied)),
        }
    }
}

/// The session table of one partition.
///
/// A partition hears from few proposing nodes and sessions (those of the
/// nodes that led it or forwarded to it), so both lists are kept sorted
/// and inline, not in B-trees: with a thousand partitions taking writes
/// in turn, each B-tree node was a cache miss on every apply, on every
/// replica. The order (by node, by session) is the one snapshots are
/// written in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sessions {
    /// `(node, incarnation)`: the newest incarnation seen of every node
    /// that proposed, ascending by node.
    floors: SmallVec<[(u64, u64); 4]>,
    /// Ascending by session.
    live: SmallVec<[(SessionId, Session); 4]>,
}

impl Sessions {
    /// The floor of `node`, 0 if it is new.
    fn floor_mut(&mut self, node: u64) -> &mut u64 {
        let i = match self.floors.binary_search_by_key(&node, |e| e.0) {
            Ok(i) => i,
            Err(i) => {
                self.floors.insert(i, (node, 0));
                i
            }
        };
        &mut self.floors[i].1
    }

    /// Session `id`, empty if it is new.
    fn session_mut(&mut self, id: SessionId) -> &mut Session {
        let i = match self.live.binary_search_by(|e| e.0.cmp(&id)) {
            Ok(i) => i,
            Err(i) => {
                self.live.insert(i, (id, Session::default()));
                i
            }
        };
        &mut self.live[i].1
    }

    fn session(&mut self, id: SessionId) -> Option<&mut Session> {
        let i = self.live.binary_search_by(|e| e.0.cmp(&id)).ok()?;
        Some(&mut self.live[i].1)
    }
}

impl Sessions {
    /// Decides whether a copy of `id` runs; `acked` is the watermark the
    /// copy carries.
    pub fn admit(&mut self, id: WriteId, acked: u64) -> Admission {
        let s = id.session;
        let floor = self.floor_mut(s.node);
        if s.incarnation() < *floor {
            return Admission::Refused(Refusal::Expired);
        }
        if s.incarnation() > *floor {
            *floor = s.incarnation();
            let inc = s.incarnation();
            self.live
                .retain(|(k, _)| k.node != s.node || k.incarnation() >= inc);
        }
        let session = self.session_mut(s);
        if acked > session.acked {
            session.forget_through(acked);
        }
        if id.seq <= session.acked {
            return Admission::Refused(Refusal::Finished);
        }
        match session.result(id.seq) {
            Some((_, index, applied)) => Admission::Duplicate {
                applied: applied.clone(),
                index: *index,
            },
            None => Admission::Run,
        }
    }

    /// Keeps the result of a write that ran at `index`.
    pub fn record(&mut self, id: WriteId, index: u64, applied: &Applied) {
        let Some(session) = self.session(id.session) else {
            return;
        };
        session.keep(id.seq, index, applied.clone());
        while session.results.len() > MAX_RESULTS || session.bytes > MAX_RESULT_BYTES {
            let Some(&(oldest, _, _)) = session.results.front() else {
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
        for &(node, inc) in &self.floors {
            out.put_u64(node);
            out.put_u64(inc);
        }
        out.put_u32(self.live.len() as u32);
        for (id, s) in &self.live {
            out.put_u64(id.node);
            out.put_u64(id.epoch);
            out.put_u64(s.acked);
            out.put_u32(s.results.len() as u32);
            for (seq, index, applied) in &s.results {
                out.put_u64(*seq);
                out.put_u64(*index);
                put_applied(out, applied);
            }
        }
    }

    pub fn encoded_len(&self) -> usize {
        8 + self.floors.len() * 16
            + self
                .live
                .iter()
                .map(|(_, s)| 28 + s.results.len() * 23 + s.bytes)
                .sum::<usize>()
    }

    /// Reads a table written by [`Sessions::encode`].
    pub fn decode(buf: &mut Bytes) -> Result<Sessions, super::DecodeError> {
        let mut t = Sessions::default();
        let nfloors = get_u32(buf).ok_or("session floors truncated")?;
        for _ in 0..nfloors {
            let node = get_u64(buf).ok_or("session floor truncated")?;
            let inc = get_u64(buf).ok_or("session floor truncated")?;
            *t.floor_mut(node) = inc;
        }
        let nlive = get_u32(buf).ok_or("sessions truncated")?;
        for i in 0..nlive {
            let err = || format!("session {i} truncated");
            let node = get_u64(buf).ok_or_else(err)?;
            let epoch = get_u64(buf).ok_or_else(err)?;
            let acked = get_u64(buf).ok_or_else(err)?;
            let n = get_u32(buf).ok_or_else(err)?;
            let s = t.session_mut(SessionId { node, epoch });
            *s = Session {
                acked,
                ..Default::default()
            };
            for _ in 0..n {
                let seq = get_u64(buf).ok_or_else(err)?;
                let index = get_u64(buf).ok_or_else(err)?;
                let applied = get_applied(buf).ok_or_else(err)?;
                s.keep(seq, index, applied);
            }
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

    /// The table is written in the order the format has always used (by
    /// node, by session, by seq), whatever order writes came in: replicas
    /// and older builds read the same snapshot bytes.
    #[test]
    fn snapshot_layout_is_sorted_whatever_the_arrival_order() {
        let mut t = Sessions::default();
        for (node, seq, index) in [(3, 9, 20), (1, 2, 21), (3, 8, 22)] {
            assert_eq!(t.admit(id(node, 5, seq), 0), Admission::Run);
            t.record(id(node, 5, seq), index, &put(None));
        }
        // Seq 8 came after 9 and is still found.
        assert_eq!(
            t.admit(id(3, 5, 8), 0),
            Admission::Duplicate {
                applied: put(None),
                index: 22
            }
        );
        let mut out = BytesMut::new();
        t.encode(&mut out);
        let mut want = BytesMut::new();
        want.put_u32(2);
        for node in [1, 3] {
            want.put_u64(node);
            want.put_u64(5);
        }
        want.put_u32(2);
        let results: [(u64, &[(u64, u64)]); 2] = [(1, &[(2, 21)]), (3, &[(8, 22), (9, 20)])];
        for (node, results) in results {
            let s = SessionId::new(node, 5, 0);
            want.put_u64(s.node);
            want.put_u64(s.epoch);
            want.put_u64(0);
            want.put_u32(results.len() as u32);
            for &(seq, index) in results {
                want.put_u64(seq);
                want.put_u64(index);
                put_applied(&mut want, &put(None));
            }
        }
        assert_eq!(out, want);
        assert!(out.len() <= t.encoded_len());
    }

    /// A burst of results leaves no big buffer behind once it is acked.
    #[test]
    fn a_drained_burst_gives_its_buffer_back() {
        let mut t = Sessions::default();
        for seq in 1..=1000 {
            assert_eq!(t.admit(id(1, 5, seq), 0), Admission::Run);
            t.record(id(1, 5, seq), seq, &put(None));
        }
        assert_eq!(t.admit(id(1, 5, 1001), 1000), Admission::Run);
        let s = &t.live[0].1;
        assert!(s.results.is_empty());
        assert!(
            s.results.capacity() <= 2 * RESULTS_KEPT_SLOTS,
            "{}",
            s.results.capacity()
        );
        assert_eq!(s.bytes, 0);
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
