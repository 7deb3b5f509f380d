//! Cluster events for `Admin/Watch`: what happens to the partitions a
//! shard hosts (leader changes, membership changes, snapshots, replicas
//! added and removed), delivered to the watchers registered on that shard.
//! Nothing is kept when nobody watches; a watcher whose queue of
//! [`QUEUE`] events is full is ended (its caller learns it fell behind).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::channel::mpsc;

use crate::grpc::Status;
use crate::proto::admin::{cluster_event::Type, ClusterEvent};

/// Events a watcher may have waiting.
pub const QUEUE: usize = 1024;
/// Watchers per shard.
pub const MAX_WATCHERS: usize = 1024;

/// An event of `kind` for `partition`, stamped now.
pub fn event(kind: Type, partition: u32) -> ClusterEvent {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ClusterEvent {
        r#type: kind as i32,
        partition_id: partition,
        unix_ms,
        ..Default::default()
    }
}

struct Watcher {
    tx: mpsc::Sender<ClusterEvent>,
    behind: Arc<AtomicBool>,
}

/// One shard's cluster-event watchers.
#[derive(Default)]
pub struct Events {
    watchers: Vec<Watcher>,
}

impl Events {
    /// Whether anyone listens (callers skip building events otherwise).
    pub fn watched(&self) -> bool {
        !self.watchers.is_empty()
    }

    pub fn publish(&mut self, e: ClusterEvent) {
        self.watchers
            .retain_mut(|w| match w.tx.try_send(e.clone()) {
                Ok(()) => true,
                Err(err) => {
                    if err.is_full() {
                        w.behind.store(true, Ordering::Relaxed);
                    }
                    false
                }
            });
    }

    /// Adds a watcher; `behind` is set if it is dropped for falling behind.
    pub fn register(
        &mut self,
        tx: mpsc::Sender<ClusterEvent>,
        behind: Arc<AtomicBool>,
    ) -> Result<(), Status> {
        if self.watchers.len() >= MAX_WATCHERS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_WATCHERS} cluster watches on this shard already; retry later"
            )));
        }
        self.watchers.push(Watcher { tx, behind });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_get_events_until_they_fall_behind() {
        let mut ev = Events::default();
        assert!(!ev.watched());
        let (tx, mut rx) = mpsc::channel(1);
        let behind = Arc::new(AtomicBool::new(false));
        ev.register(tx, behind.clone()).unwrap();
        assert!(ev.watched());
        ev.publish(event(Type::PartitionAdded, 7));
        let got = rx.try_recv().unwrap();
        assert_eq!(got.partition_id, 7);
        assert_eq!(got.r#type, Type::PartitionAdded as i32);
        // A channel of 1 takes 2 (one per sender); the third overflows.
        for p in 0..3 {
            ev.publish(event(Type::LeaderChanged, p));
        }
        assert!(behind.load(Ordering::Relaxed));
        assert!(!ev.watched());
    }
}
