//! Every shard's inbox, shared by all cores: how calls, peer messages and
//! shards themselves reach the shard that owns a partition.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::channel::{mpsc, oneshot};

use crate::grpc::Status;

use super::{Answer, ShardMsg};

/// Most messages waiting in one shard's inbox before calls and peers'
/// raft messages for it are refused (a shard drains up to 16,384 per turn,
/// so this is several turns behind).
pub const MAX_INBOX: usize = 65_536;

/// Whether `msg` counts toward [`MAX_INBOX`]: ticks and the stop signal
/// come from the shard's own timer and are never refused.
pub(super) fn counted(msg: &ShardMsg) -> bool {
    !matches!(msg, ShardMsg::Tick | ShardMsg::Stop)
}

/// The inboxes of a node's shards, by shard index.
pub struct Shards {
    inboxes: Vec<mpsc::UnboundedSender<ShardMsg>>,
    /// Messages waiting in each inbox (ticks excepted), for [`MAX_INBOX`].
    waiting: Vec<AtomicUsize>,
    /// Per shard: its WAL hit ENOSPC and waits for space. Writes to the
    /// shard's partitions are refused at once while it is set.
    disk_full: Vec<AtomicBool>,
}

impl Shards {
    /// `n` shards: their inboxes, and the receiving ends each shard's loop
    /// takes (see `Shard::run`).
    pub fn new(n: usize) -> (Shards, Vec<mpsc::UnboundedReceiver<ShardMsg>>) {
        let (inboxes, receivers) = (0..n).map(|_| mpsc::unbounded()).unzip();
        let shards = Shards {
            inboxes,
            waiting: (0..n).map(|_| Default::default()).collect(),
            disk_full: (0..n).map(|_| Default::default()).collect(),
        };
        (shards, receivers)
    }

    /// How many shards there are.
    pub fn count(&self) -> usize {
        self.inboxes.len()
    }

    /// The shard that owns `partition` on this node. The placement is a
    /// pure function of the id, so every core agrees without coordination.
    pub fn shard_of(&self, partition: u32) -> usize {
        partition as usize % self.inboxes.len()
    }

    /// Whether shard `shard`'s WAL waits for disk space.
    pub fn is_disk_full(&self, shard: usize) -> bool {
        self.disk_full[shard].load(Ordering::Relaxed)
    }

    /// Whether some shard's WAL waits for disk space.
    pub fn any_disk_full(&self) -> bool {
        (0..self.count()).any(|k| self.is_disk_full(k))
    }

    /// Marks shard `shard`'s disk full or not; the previous mark.
    pub(super) fn set_disk_full(&self, shard: usize, full: bool) -> bool {
        self.disk_full[shard].swap(full, Ordering::Relaxed)
    }

    pub(super) fn inbox(&self, shard: usize) -> mpsc::UnboundedSender<ShardMsg> {
        self.inboxes[shard].clone()
    }

    pub(super) fn waiting(&self, shard: usize) -> &AtomicUsize {
        &self.waiting[shard]
    }

    /// Sends `msg` to shard `shard`. Fails only when the node is stopping.
    pub fn send(&self, shard: usize, msg: ShardMsg) -> Result<(), Status> {
        if counted(&msg) {
            self.waiting[shard].fetch_add(1, Ordering::Relaxed);
        }
        self.inboxes[shard]
            .unbounded_send(msg)
            .map_err(|_| Status::unavailable("node is shutting down"))
    }

    /// [`Shards::send`] for work that may be refused when the shard is
    /// behind: past [`MAX_INBOX`] waiting messages it fails with
    /// RESOURCE_EXHAUSTED (a raft message refused so is retransmitted by
    /// raft; a client call reports the status).
    pub fn send_bounded(&self, shard: usize, msg: ShardMsg) -> Result<(), Status> {
        let waiting = self.waiting[shard].load(Ordering::Relaxed);
        if waiting >= MAX_INBOX {
            return Err(Status::resource_exhausted(format!(
                "shard {shard} is behind: {waiting} messages wait in its inbox; retry later"
            )));
        }
        self.send(shard, msg)
    }

    /// Sends the request `make` builds around a reply to shard `shard`
    /// and waits for the answer.
    async fn request<T: Send + 'static>(
        &self,
        shard: usize,
        make: impl FnOnce(Answer<T>) -> ShardMsg,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.send_bounded(shard, make(tx))?;
        rx.await.unwrap_or_else(|_| {
            Err(Status::unavailable(
                "request dropped: node is shutting down",
            ))
        })
    }

    /// [`Shards::request`] to the shard that owns `partition`.
    pub async fn request_owner<T: Send + 'static>(
        &self,
        partition: u32,
        make: impl FnOnce(Answer<T>) -> ShardMsg,
    ) -> Result<T, Status> {
        self.request(self.shard_of(partition), make).await
    }

    /// [`Shards::request`] to every shard; the answers in shard order.
    pub async fn request_all<T: Send + 'static>(
        &self,
        make: impl Fn(Answer<T>) -> ShardMsg,
    ) -> Result<Vec<T>, Status> {
        let all = (0..self.count()).map(|k| self.request(k, &make));
        futures::future::try_join_all(all).await
    }

    /// Tells every shard's peer links about a node's raft address.
    pub fn broadcast_address(&self, node: u64, addr: String) {
        for k in 0..self.count() {
            let addr = addr.clone();
            let _ = self.send(k, ShardMsg::PeerAddress { node, addr });
        }
    }
}
