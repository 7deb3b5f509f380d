//! The `multiraft.kv.v1.KV` service: validation, partition routing,
//! forwarding to a node that hosts the partition, and the wait for raft.

use bytes::Bytes;

use crate::grpc::{Request, Status};
use crate::node::api::{with_deadline, Api};
use crate::proto::kv::{
    CompareAndSwapRequest, CompareAndSwapResponse, DeleteRequest, DeleteResponse, GetRequest,
    GetResponse, PutRequest, PutResponse,
};
use crate::raft::{Group, ReadResult, Reply, WriteResult};
use crate::shard::ShardMsg;

use super::command::{Command, Op};
use super::Applied;

/// Where a call on a partition goes.
enum Route {
    /// Hosted here: the owning shard's replica serves it.
    Local(u32),
    /// Hosted elsewhere: forward to these members (in order).
    Forward(u32, Vec<u64>),
}

impl Api {
    fn disk_full(&self, shard: usize) -> bool {
        self.node.disk_full[shard].load(std::sync::atomic::Ordering::Relaxed)
    }

    fn check_key(&self, key: &[u8]) -> Result<(), Status> {
        let max = self.node.config.max_key_size;
        if key.len() > max {
            return Err(Status::invalid_argument(format!(
                "key is {} bytes; the limit is {max}",
                key.len()
            )));
        }
        Ok(())
    }

    fn check_value(&self, field: &str, value: &[u8]) -> Result<(), Status> {
        let max = self.node.config.max_value_size;
        if value.len() > max {
            return Err(Status::invalid_argument(format!(
                "{field} is {} bytes; the limit is {max}",
                value.len()
            )));
        }
        Ok(())
    }

    fn route(&self, partition_id: u32, key: &[u8]) -> Result<Route, Status> {
        let meta = self.meta();
        if !meta.bootstrapped() {
            return Err(Status::failed_precondition(
                "node is not bootstrapped; call Bootstrap first",
            ));
        }
        let p = if partition_id == 0 {
            meta.partition_for_key(key)
                .ok_or_else(|| Status::failed_precondition("layout has no partitions"))?
        } else {
            partition_id
        };
        if meta.hosted.contains(&p) {
            return Ok(Route::Local(p));
        }
        match meta.members.get(&p) {
            Some(m) if !m.is_empty() => Ok(Route::Forward(p, m.keys().copied().collect())),
            _ => Err(Status::not_found(format!("partition {p} does not exist"))),
        }
    }

    /// Forwards the call unchanged to the first member that answers.
    async fn forward(&self, p: u32, members: Vec<u64>, req: &Request) -> Result<Bytes, Status> {
        let until = crate::node::api::wait_until(req.deadline);
        let mut last = Status::unavailable(format!("no member of partition {p} answered"));
        for to in members.iter().cycle().take(members.len() * 3) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match self
                .peer_call(*to, &req.method, req.body.clone(), left)
                .await
            {
                Ok(b) => return Ok(b),
                // Only a node that did not answer is worth another try;
                // any real answer (even an error) is the answer.
                Err(s) if s.code == crate::grpc::Code::Unavailable => last = s,
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }

    /// Runs `f` on the replica of `p`, on the shard that owns it; `f`
    /// answers through the reply it is given, straight to this task (one
    /// message there, one back). Waits until shortly before the client's
    /// deadline; `late` describes what a timeout means.
    async fn on_replica<T: Send + 'static>(
        &self,
        p: u32,
        req: &Request,
        f: impl FnOnce(&mut Group, Reply<T>) + Send + 'static,
        late: impl FnOnce() -> Status,
    ) -> Result<T, Status> {
        let (tx, rx) = futures::channel::oneshot::channel();
        let job = move |s: &mut crate::shard::Shard| match s.groups.get_mut(&p) {
            Some(g) => f(g, tx),
            None => {
                let _ = tx.send(Err(Status::not_found(format!(
                    "partition {p} is not hosted here"
                ))));
            }
        };
        self.node
            .send(self.node.shard_of(p), ShardMsg::Exec(Box::new(job)))?;
        match with_deadline(crate::node::api::wait_until(req.deadline), rx).await {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Status::unavailable(format!("partition {p} stopped"))),
            None => Err(late()),
        }
    }

    async fn write(&self, p: u32, cmd: Command, req: &Request) -> Result<WriteResult, Status> {
        let shard = self.node.shard_of(p);
        let disk_full = || {
            Status::unavailable(format!(
                "partition {p}: this node's disk is full (no space left for the write-ahead log); retry later"
            ))
        };
        if self.disk_full(shard) {
            return Err(disk_full());
        }
        self.on_replica(p, req, move |g, reply| g.propose(cmd, reply), || {
            if self.disk_full(shard) {
                return disk_full();
            }
            Status::unavailable(format!(
                "partition {p}: write not committed in time (no leader or no quorum); its outcome is unknown, retry"
            ))
        })
        .await
    }

    async fn read(
        &self,
        p: u32,
        key: Bytes,
        serializable: bool,
        req: &Request,
    ) -> Result<ReadResult, Status> {
        let f = move |g: &mut Group, reply: Reply<ReadResult>| {
            if serializable {
                let _ = reply.send(Ok(g.read_local(&key)));
            } else {
                g.read(key, reply);
            }
        };
        self.on_replica(p, req, f, || {
            Status::unavailable(format!(
                "partition {p}: read index not confirmed in time (no leader or no quorum); retry"
            ))
        })
        .await
    }

    pub async fn kv_put(&self, r: PutRequest, req: &Request) -> Result<PutResponse, Status> {
        self.check_key(&r.key)?;
        self.check_value("value", &r.value)?;
        match self.route(r.partition_id, &r.key)? {
            Route::Forward(p, m) => crate::node::api::decode(&self.forward(p, m, req).await?),
            Route::Local(p) => {
                let cmd = Command {
                    id: self.next_id(),
                    key: r.key,
                    op: Op::Put { value: r.value },
                };
                let w = self.write(p, cmd, req).await?;
                let previous = match w.applied {
                    Applied::Put { previous } => previous,
                    _ => None,
                };
                Ok(PutResponse {
                    previous,
                    index: w.index,
                    partition_id: p,
                })
            }
        }
    }

    pub async fn kv_delete(
        &self,
        r: DeleteRequest,
        req: &Request,
    ) -> Result<DeleteResponse, Status> {
        self.check_key(&r.key)?;
        match self.route(r.partition_id, &r.key)? {
            Route::Forward(p, m) => crate::node::api::decode(&self.forward(p, m, req).await?),
            Route::Local(p) => {
                let cmd = Command {
                    id: self.next_id(),
                    key: r.key,
                    op: Op::Delete,
                };
                let w = self.write(p, cmd, req).await?;
                let previous = match w.applied {
                    Applied::Delete { previous } => previous,
                    _ => None,
                };
                Ok(DeleteResponse {
                    previous,
                    index: w.index,
                    partition_id: p,
                })
            }
        }
    }

    pub async fn kv_cas(
        &self,
        r: CompareAndSwapRequest,
        req: &Request,
    ) -> Result<CompareAndSwapResponse, Status> {
        self.check_key(&r.key)?;
        self.check_value("value", &r.value)?;
        if let Some(e) = &r.expected {
            self.check_value("expected", e)?;
        }
        match self.route(r.partition_id, &r.key)? {
            Route::Forward(p, m) => crate::node::api::decode(&self.forward(p, m, req).await?),
            Route::Local(p) => {
                let cmd = Command {
                    id: self.next_id(),
                    key: r.key,
                    op: Op::Cas {
                        expected: r.expected,
                        value: r.value,
                    },
                };
                let w = self.write(p, cmd, req).await?;
                let (succeeded, current) = match w.applied {
                    Applied::Cas { succeeded, current } => (succeeded, current),
                    _ => (false, None),
                };
                Ok(CompareAndSwapResponse {
                    succeeded,
                    current,
                    index: w.index,
                    partition_id: p,
                })
            }
        }
    }

    pub async fn kv_get(&self, r: GetRequest, req: &Request) -> Result<GetResponse, Status> {
        self.check_key(&r.key)?;
        match self.route(r.partition_id, &r.key)? {
            Route::Forward(p, m) => crate::node::api::decode(&self.forward(p, m, req).await?),
            Route::Local(p) => {
                let rr = self.read(p, r.key, r.serializable, req).await?;
                Ok(GetResponse {
                    found: rr.value.is_some(),
                    value: rr.value.unwrap_or_default(),
                    index: rr.index,
                    partition_id: p,
                })
            }
        }
    }
}
