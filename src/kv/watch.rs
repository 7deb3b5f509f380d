//! Watches: one shard's recent history of applied writes and the watchers
//! of its partitions.
//!
//! Every applied write that changed a key (Put, Delete of a present key,
//! successful CompareAndSwap) becomes an [`Event`], published in apply
//! order: it goes into the shard's history and to every watcher whose key
//! or prefix matches. Bounds:
//! - history: [`HISTORY_EVENTS`] events and [`HISTORY_BYTES`] bytes per
//!   shard (values are copied, so an event holds only its own bytes); the
//!   oldest go first, and each partition remembers the last index it lost
//!   so a watch starting at or before it gets OUT_OF_RANGE;
//! - a watcher's queue holds [`WATCHER_QUEUE`] events and
//!   [`WATCHER_BYTES`] bytes, all of a shard's queues [`WATCHERS_BYTES`]:
//!   a watcher that falls further behind is ended (RESOURCE_EXHAUSTED,
//!   with the index to resume from) instead of being buffered without
//!   bound (queued events share their bytes with the history, but may
//!   outlive it);
//! - at most [`MAX_WATCHERS`] watchers per shard.
//!
//! A replica that jumps ahead by a snapshot has not seen the writes in
//! between: its watchers are ended (ABORTED) and the history marks them
//! lost.
//!
//! The history is kept only while it can be of use: a shard starts
//! recording at its first watch (everything applied before then counts as
//! lost, so a watch from an earlier index gets OUT_OF_RANGE) and stops
//! [`IDLE_RECORDING`] after its last watcher left. Until then the shard
//! builds no events at all: copying every applied write into a history
//! nobody reads cost about a tenth of the write throughput.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::channel::mpsc;

use crate::grpc::Status;

pub const HISTORY_EVENTS: usize = 65_536;
pub const HISTORY_BYTES: usize = 16 << 20;
pub const WATCHER_QUEUE: usize = 1024;
/// Bytes of events one watcher may have waiting (room for the largest
/// event, a 1 MiB value under a 64 KiB key, and more).
pub const WATCHER_BYTES: usize = 4 << 20;
/// Bytes of events all of a shard's watchers may have waiting together.
pub const WATCHERS_BYTES: usize = 256 << 20;
pub const MAX_WATCHERS: usize = 4096;
/// How long a shard keeps recording after its last watcher left, so a
/// watcher that reconnects can resume from the index it last saw.
pub const IDLE_RECORDING: std::time::Duration = std::time::Duration::from_secs(600);

/// One applied change of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub partition: u32,
    pub index: u64,
    pub key: Bytes,
    /// The new value; `None` for a delete.
    pub value: Option<Bytes>,
}

impl Event {
    fn size(&self) -> usize {
        64 + self.key.len() + self.value.as_ref().map_or(0, Bytes::len)
    }
}

/// Why a watch ended from the shard's side (read after its stream ends).
#[derive(Default)]
pub struct Ending {
    /// 0: still running or ended by its caller. See the constants below.
    why: AtomicU64,
    /// The index the reason refers to.
    index: AtomicU64,
    /// Bytes of this watcher's events waiting in its queue.
    queued: AtomicUsize,
    /// The shard's total of those (set at registration).
    shard_queued: std::sync::OnceLock<Arc<AtomicUsize>>,
}

impl Drop for Ending {
    /// Once both the hub and the caller are done with a watch, whatever it
    /// still had queued is freed: its bytes go back to the shard's total.
    fn drop(&mut self) {
        let left = self.queued.swap(0, Ordering::Relaxed);
        if let Some(total) = self.shard_queued.get() {
            total.fetch_sub(left, Ordering::Relaxed);
        }
    }
}

const ENDED_BEHIND: u64 = 1;
const ENDED_SNAPSHOT: u64 = 2;
const ENDED_REMOVED: u64 = 3;

impl Ending {
    /// The watcher took `e` from its queue.
    pub fn taken(&self, e: &Event) {
        let n = e.size();
        self.queued.fetch_sub(n, Ordering::Relaxed);
        if let Some(total) = self.shard_queued.get() {
            total.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Accounts `e` as queued, unless that passes a bound.
    fn admit(&self, e: &Event, total: &AtomicUsize) -> bool {
        let n = e.size();
        if self.queued.load(Ordering::Relaxed) + n > WATCHER_BYTES
            || total.load(Ordering::Relaxed) + n > WATCHERS_BYTES
        {
            return false;
        }
        self.queued.fetch_add(n, Ordering::Relaxed);
        total.fetch_add(n, Ordering::Relaxed);
        true
    }

    fn set(&self, why: u64, index: u64) {
        self.index.store(index, Ordering::Relaxed);
        self.why.store(why, Ordering::Release);
    }

    /// The status a watch ends with once its stream has ended, given the
    /// last index it delivered.
    pub fn status(&self, last_delivered: u64) -> Status {
        let index = self.index.load(Ordering::Relaxed);
        match self.why.load(Ordering::Acquire) {
            ENDED_BEHIND => Status::resource_exhausted(format!(
                "the watcher fell more than {WATCHER_QUEUE} events behind; \
                 watch again with start_index {} to resume",
                last_delivered + 1
            )),
            ENDED_SNAPSHOT => Status::aborted(format!(
                "this replica caught up from a snapshot at index {index} and did not see \
                 the writes before it; read the key and watch again with start_index {}",
                index + 1
            )),
            ENDED_REMOVED => Status::unavailable("the partition left this node"),
            _ => Status::unavailable("the watch ended (the node is shutting down)"),
        }
    }
}

/// What a watcher asks for.
#[derive(Clone, Debug)]
pub struct Filter {
    pub partition: u32,
    pub key: Bytes,
    pub prefix: bool,
}

impl Filter {
    fn matches(&self, e: &Event) -> bool {
        e.partition == self.partition
            && if self.prefix {
                e.key.starts_with(&self.key)
            } else {
                e.key == self.key
            }
    }
}

struct Watcher {
    filter: Filter,
    tx: mpsc::Sender<Event>,
    ending: Arc<Ending>,
}

/// One shard's history and watchers.
#[derive(Default)]
pub struct Hub {
    history: VecDeque<Event>,
    bytes: usize,
    /// Per partition: the highest index whose events may be missing from
    /// `history` (evicted, or skipped by a snapshot or a restart).
    lost_up_to: HashMap<u32, u64>,
    watchers: Vec<Watcher>,
    /// Bytes of events waiting in all watchers' queues.
    queued: Arc<AtomicUsize>,
    /// Whether the shard publishes its applied writes (see the module
    /// notes), and since when nobody watches.
    recording: bool,
    unwatched_since: Option<std::time::Instant>,
}

impl Hub {
    /// Whether applied writes should be published.
    pub fn recording(&self) -> bool {
        self.recording
    }

    /// Starts recording (if it was not): `applied` gives each partition's
    /// applied index, up to which the history has nothing.
    pub fn start_recording(&mut self, applied: impl IntoIterator<Item = (u32, u64)>) {
        self.unwatched_since = None;
        if self.recording {
            return;
        }
        for (p, index) in applied {
            let lost = self.lost_up_to.entry(p).or_insert(0);
            *lost = (*lost).max(index);
        }
        self.recording = true;
    }

    /// Stops recording once nobody has watched for [`IDLE_RECORDING`]
    /// (called now and then by the shard); the history is dropped.
    pub fn maybe_stop_recording(&mut self, now: std::time::Instant) {
        if !self.recording {
            return;
        }
        self.watchers.retain(|w| !w.tx.is_closed());
        if !self.watchers.is_empty() {
            self.unwatched_since = None;
            return;
        }
        let since = *self.unwatched_since.get_or_insert(now);
        if now.duration_since(since) >= IDLE_RECORDING {
            // `start_recording` marks everything up to the applied index
            // lost again, which covers every index of what is dropped.
            self.history = VecDeque::new();
            self.bytes = 0;
            self.recording = false;
            self.unwatched_since = None;
        }
    }

    /// Publishes one applied change.
    pub fn publish(&mut self, e: Event) {
        if !self.watchers.is_empty() {
            let total = &self.queued;
            self.watchers.retain_mut(|w| {
                if w.tx.is_closed() {
                    // Its caller went away with events still queued; the
                    // receiver dropped them, so their bytes are free.
                    total.fetch_sub(
                        w.ending.queued.swap(0, Ordering::Relaxed),
                        Ordering::Relaxed,
                    );
                    return false;
                }
                if !w.filter.matches(&e) {
                    return true;
                }
                if !w.ending.admit(&e, total) {
                    w.ending.set(ENDED_BEHIND, e.index);
                    return false;
                }
                match w.tx.try_send(e.clone()) {
                    Ok(()) => true,
                    Err(err) => {
                        w.ending.taken(&e);
                        if err.is_full() {
                            w.ending.set(ENDED_BEHIND, e.index);
                        } else {
                            // The caller went away (see above).
                            total.fetch_sub(
                                w.ending.queued.swap(0, Ordering::Relaxed),
                                Ordering::Relaxed,
                            );
                        }
                        false
                    }
                }
            });
        }
        self.bytes += e.size();
        self.history.push_back(e);
        while self.history.len() > HISTORY_EVENTS || self.bytes > HISTORY_BYTES {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.bytes -= old.size();
            let lost = self.lost_up_to.entry(old.partition).or_insert(0);
            *lost = (*lost).max(old.index);
        }
    }

    /// Registers a watcher. With `start_index > 0`, first replays the
    /// history from that index (an index not applied here yet is simply
    /// in the future), or fails OUT_OF_RANGE if part of it is gone.
    pub fn register(
        &mut self,
        filter: Filter,
        start_index: u64,
        tx: mpsc::Sender<Event>,
        ending: Arc<Ending>,
    ) -> Result<(), Status> {
        if self.watchers.len() >= MAX_WATCHERS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_WATCHERS} watches on this shard already; retry later"
            )));
        }
        let _ = ending.shard_queued.set(self.queued.clone());
        let mut w = Watcher { filter, tx, ending };
        if start_index > 0 {
            let lost = self
                .lost_up_to
                .get(&w.filter.partition)
                .copied()
                .unwrap_or(0);
            if start_index <= lost {
                return Err(Status::out_of_range(format!(
                    "index {start_index} of partition {} is no longer in this node's history \
                     (it keeps events after index {lost}); read the key and watch from now",
                    w.filter.partition
                )));
            }
            let replay = self
                .history
                .iter()
                .filter(|e| e.index >= start_index && w.filter.matches(e));
            for e in replay {
                if !w.ending.admit(e, &self.queued) || w.tx.try_send(e.clone()).is_err() {
                    // Nobody will take what was queued: give its bytes back.
                    self.queued.fetch_sub(
                        w.ending.queued.swap(0, Ordering::Relaxed),
                        Ordering::Relaxed,
                    );
                    return Err(Status::resource_exhausted(format!(
                        "more than {WATCHER_QUEUE} events since index {start_index}; \
                         start from a later index"
                    )));
                }
            }
        }
        self.watchers.push(w);
        Ok(())
    }

    /// A replica of `partition` jumped to `index` (a snapshot, or a
    /// restart replaying from one): the writes up to it are not in the
    /// history, and its watchers (which missed them) are ended.
    pub fn skipped(&mut self, partition: u32, index: u64) {
        let lost = self.lost_up_to.entry(partition).or_insert(0);
        *lost = (*lost).max(index);
        self.end_watchers(partition, ENDED_SNAPSHOT, index);
    }

    /// `partition` left this node: its watchers end.
    pub fn removed(&mut self, partition: u32) {
        self.end_watchers(partition, ENDED_REMOVED, 0);
    }

    fn end_watchers(&mut self, partition: u32, why: u64, index: u64) {
        self.watchers.retain(|w| {
            if w.filter.partition == partition {
                w.ending.set(why, index);
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn put(p: u32, index: u64, key: &str, value: &str) -> Event {
        Event {
            partition: p,
            index,
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
        }
    }

    fn filter(p: u32, key: &str, prefix: bool) -> Filter {
        Filter {
            partition: p,
            key: Bytes::copy_from_slice(key.as_bytes()),
            prefix,
        }
    }

    fn drain(rx: &mut mpsc::Receiver<Event>) -> Vec<u64> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e.index);
        }
        out
    }

    #[test]
    fn watchers_get_matching_events_in_order() {
        let mut hub = Hub::default();
        let (tx, mut exact) = mpsc::channel(WATCHER_QUEUE);
        hub.register(filter(1, "a", false), 0, tx, Arc::default())
            .unwrap();
        let (tx, mut prefix) = mpsc::channel(WATCHER_QUEUE);
        hub.register(filter(1, "a", true), 0, tx, Arc::default())
            .unwrap();
        hub.publish(put(1, 5, "a", "1"));
        hub.publish(put(1, 6, "ab", "2"));
        hub.publish(put(2, 7, "a", "other partition"));
        hub.publish(put(1, 8, "b", "3"));
        hub.publish(put(1, 9, "a", "4"));
        assert_eq!(drain(&mut exact), vec![5, 9]);
        assert_eq!(drain(&mut prefix), vec![5, 6, 9]);
    }

    #[test]
    fn a_watch_replays_recent_history_and_refuses_lost_history() {
        let mut hub = Hub::default();
        for i in 1..=10 {
            hub.publish(put(1, i, "k", "v"));
        }
        let (tx, mut rx) = mpsc::channel(WATCHER_QUEUE);
        hub.register(filter(1, "k", false), 8, tx, Arc::default())
            .unwrap();
        hub.publish(put(1, 11, "k", "v"));
        assert_eq!(drain(&mut rx), vec![8, 9, 10, 11]);

        hub.skipped(1, 20);
        let (tx, _rx) = mpsc::channel(WATCHER_QUEUE);
        let err = hub
            .register(filter(1, "k", false), 15, tx, Arc::default())
            .unwrap_err();
        assert_eq!(err.code, crate::grpc::Code::OutOfRange);
        // Eviction makes history lost too.
        let mut hub = Hub::default();
        for i in 1..=(HISTORY_EVENTS as u64 + 5) {
            hub.publish(put(3, i, "k", ""));
        }
        let (tx, _rx) = mpsc::channel(WATCHER_QUEUE);
        assert!(hub
            .register(filter(3, "k", false), 5, tx, Arc::default())
            .is_err());
        let (tx, _rx) = mpsc::channel(WATCHER_QUEUE);
        assert!(hub
            .register(filter(3, "k", false), 6, tx, Arc::default())
            .is_err());
        assert!(hub.history.len() <= HISTORY_EVENTS);
    }

    #[test]
    fn a_watcher_that_falls_behind_is_ended_with_where_to_resume() {
        let mut hub = Hub::default();
        let (tx, mut rx) = mpsc::channel(2);
        let ending = Arc::new(Ending::default());
        hub.register(filter(1, "k", false), 0, tx, ending.clone())
            .unwrap();
        for i in 1..=(WATCHER_QUEUE as u64 + 10) {
            hub.publish(put(1, i, "k", "v"));
        }
        let got = futures::executor::block_on(async {
            let mut got = Vec::new();
            while let Some(e) = rx.next().await {
                got.push(e.index);
            }
            got
        });
        assert!(!got.is_empty() && got.len() < 10, "{got:?}");
        let status = ending.status(*got.last().unwrap());
        assert_eq!(status.code, crate::grpc::Code::ResourceExhausted);
        assert!(
            status
                .message
                .contains(&format!("start_index {}", got.last().unwrap() + 1)),
            "{}",
            status.message
        );
        // A snapshot ends the partition's watchers with ABORTED.
        let (tx, mut rx) = mpsc::channel(8);
        let ending = Arc::new(Ending::default());
        hub.register(filter(1, "k", false), 0, tx, ending.clone())
            .unwrap();
        hub.skipped(1, 5000);
        assert!(futures::executor::block_on(rx.next()).is_none());
        assert_eq!(ending.status(0).code, crate::grpc::Code::Aborted);
    }

    #[test]
    fn queued_bytes_are_bounded_and_given_back() {
        let mut hub = Hub::default();
        let big = |i: u64| Event {
            partition: 1,
            index: i,
            key: Bytes::from_static(b"k"),
            value: Some(Bytes::from(vec![0u8; 1 << 20])),
        };
        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        let ending = Arc::new(Ending::default());
        hub.register(filter(1, "k", false), 0, tx, ending.clone())
            .unwrap();
        for i in 1..=5 {
            hub.publish(big(i));
        }
        // Three 1 MiB events (plus their overhead) fit in WATCHER_BYTES;
        // the fourth ends the watch.
        assert_eq!(ending.status(3).code, crate::grpc::Code::ResourceExhausted);
        assert!(hub.queued.load(Ordering::Relaxed) <= WATCHER_BYTES);
        // Its caller leaves without taking them: the bytes come back.
        drop((rx, ending));
        assert_eq!(hub.queued.load(Ordering::Relaxed), 0);
        // A watcher whose caller left gives its bytes back at the next event.
        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        hub.register(filter(1, "k", false), 0, tx, Arc::default())
            .unwrap();
        hub.publish(big(6));
        drop(rx);
        hub.publish(big(7));
        assert!(hub.watchers.is_empty());
        assert_eq!(hub.queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn recording_starts_at_the_first_watch_and_stops_when_nobody_watches() {
        let mut hub = Hub::default();
        assert!(!hub.recording());
        // Partition 1 had applied up to 20 before anyone watched: those
        // writes were never recorded.
        hub.start_recording([(1, 20), (2, 3)]);
        assert!(hub.recording());
        let (tx, _rx) = mpsc::channel(WATCHER_QUEUE);
        let err = hub
            .register(filter(1, "k", false), 20, tx, Arc::default())
            .unwrap_err();
        assert_eq!(err.code, crate::grpc::Code::OutOfRange);
        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        hub.register(filter(1, "k", false), 21, tx, Arc::default())
            .unwrap();
        hub.publish(put(1, 21, "k", "v"));

        // While someone watches, recording goes on however long.
        let t0 = std::time::Instant::now();
        hub.maybe_stop_recording(t0);
        hub.maybe_stop_recording(t0 + IDLE_RECORDING * 2);
        assert!(hub.recording());
        // The last watcher leaves: recording stops a while later, and the
        // history with it.
        drop(rx);
        hub.maybe_stop_recording(t0 + IDLE_RECORDING * 2);
        assert!(hub.recording());
        hub.maybe_stop_recording(t0 + IDLE_RECORDING * 3);
        assert!(!hub.recording());
        assert!(hub.history.is_empty());
        // Started again later, what was dropped counts as lost.
        hub.start_recording([(1, 30)]);
        let (tx, _rx) = mpsc::channel(WATCHER_QUEUE);
        let err = hub
            .register(filter(1, "k", false), 21, tx, Arc::default())
            .unwrap_err();
        assert_eq!(err.code, crate::grpc::Code::OutOfRange);
    }
}
