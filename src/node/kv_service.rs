//! The `multiraft.kv.v1.KV` service: validation, partition routing, write
//! identities, forwarding to a node that hosts the partition, and the wait
//! for raft.
//!
//! A write gets its identity ([`WriteId`]) here, on the node that took the
//! client's call, before it goes anywhere; the local replica proposes it
//! under that identity, or a member does when the call is forwarded (as a
//! `ProposeRequest`, every attempt with the same identity). See
//! [`super::forward`] and [`super::session`] for why that applies it once.

use std::time::Instant;

use bytes::Bytes;
use prost::Message;

use super::api::{
    decode, with_deadline, KvService, KV_CAS, KV_DELETE, KV_GET, KV_PUT, PEER_PROPOSE,
};
use crate::grpc::{Request, Status};
use crate::proto::kv::{
    CompareAndSwapRequest, CompareAndSwapResponse, DeleteRequest, DeleteResponse, GetRequest,
    GetResponse, PutRequest, PutResponse,
};
use crate::proto::peer::ProposeRequest;
use crate::raft::{ReadResult, Reply, WriteResult};
use crate::shard::ShardMsg;

use crate::kv::command::{Command, Op, WriteId};
use crate::kv::forward::{self, Plan};
use crate::kv::Applied;

/// Where a call on a partition goes.
enum Route {
    /// Hosted here: the owning shard's replica serves it.
    Local(u32),
    /// Hosted elsewhere: forward to these members.
    Forward(u32, Vec<u64>),
}

/// One of the three KV writes, decoded.
enum Write {
    Put(PutRequest),
    Delete(DeleteRequest),
    Cas(CompareAndSwapRequest),
}

impl Write {
    fn decode(method: &str, body: &[u8]) -> Result<Write, Status> {
        Ok(match method {
            KV_PUT => Write::Put(decode(body)?),
            KV_DELETE => Write::Delete(decode(body)?),
            KV_CAS => Write::Cas(decode(body)?),
            m => return Err(Status::invalid_argument(format!("{m} is not a KV write"))),
        })
    }

    fn partition_id(&self) -> u32 {
        match self {
            Write::Put(r) => r.partition_id,
            Write::Delete(r) => r.partition_id,
            Write::Cas(r) => r.partition_id,
        }
    }

    fn key(&self) -> &[u8] {
        match self {
            Write::Put(r) => &r.key,
            Write::Delete(r) => &r.key,
            Write::Cas(r) => &r.key,
        }
    }

    fn validate(&self, api: &KvService) -> Result<(), Status> {
        api.check_key(self.key())?;
        match self {
            Write::Put(r) => api.check_value("value", &r.value),
            Write::Delete(_) => Ok(()),
            Write::Cas(r) => {
                api.check_value("value", &r.value)?;
                match &r.expected {
                    Some(e) => api.check_value("expected", e),
                    None => Ok(()),
                }
            }
        }
    }

    fn into_command(self, id: WriteId, acked: u64) -> Command {
        let (key, op) = match self {
            Write::Put(r) => (r.key, Op::Put { value: r.value }),
            Write::Delete(r) => (r.key, Op::Delete),
            Write::Cas(r) => (
                r.key,
                Op::Cas {
                    expected: r.expected,
                    value: r.value,
                },
            ),
        };
        Command { id, acked, key, op }
    }
}

/// The response message of a write, encoded.
fn write_response(method: &str, p: u32, w: WriteResult<Applied>) -> Result<Bytes, Status> {
    let index = w.index;
    let body = match (method, w.applied) {
        (KV_PUT, Applied::Put { previous }) => PutResponse {
            previous,
            index,
            partition_id: p,
        }
        .encode_to_vec(),
        (KV_DELETE, Applied::Delete { previous }) => DeleteResponse {
            previous,
            index,
            partition_id: p,
        }
        .encode_to_vec(),
        (_, Applied::Cas { succeeded, current }) => CompareAndSwapResponse {
            succeeded,
            current,
            index,
            partition_id: p,
        }
        .encode_to_vec(),
        // Only a caller that gave two different writes one identity can
        // get the first one's result in answer to the second.
        (_, other) => {
            return Err(Status::aborted(format!(
                "partition {p}: this write's identity belongs to another write ({other:?}); \
                 it was not applied"
            )))
        }
    };
    Ok(Bytes::from(body))
}

fn deadline_of(req: &Request) -> Instant {
    crate::node::api::answer_by(req.deadline)
}

/// INVALID_ARGUMENT naming `field` if it is longer than `max` bytes.
fn within(field: &str, bytes: &[u8], max: usize) -> Result<(), Status> {
    if bytes.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {max}",
            bytes.len()
        )));
    }
    Ok(())
}

impl KvService {
    fn disk_full(&self, shard: usize) -> bool {
        self.node.shards.is_disk_full(shard)
    }

    fn check_key(&self, key: &[u8]) -> Result<(), Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("key must not be empty"));
        }
        within("key", key, self.node.config.max_key_size)
    }

    fn check_value(&self, field: &str, value: &[u8]) -> Result<(), Status> {
        within(field, value, self.node.config.max_value_size)
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

    /// Sends `method(body)` to the members of `p`, failing over between
    /// them until `deadline` (see [`forward`]).
    async fn forward(
        &self,
        p: u32,
        members: Vec<u64>,
        method: &'static str,
        body: Bytes,
        deadline: Instant,
        is_write: bool,
    ) -> Result<Bytes, Status> {
        struct Via<'a> {
            api: &'a super::api::Api,
            method: &'static str,
            body: Bytes,
        }
        impl forward::Attempt for Via<'_> {
            async fn attempt(
                &self,
                member: u64,
                timeout: std::time::Duration,
            ) -> Result<Bytes, Status> {
                self.api
                    .peer_call(member, self.method, self.body.clone(), timeout)
                    .await
            }
        }
        crate::metrics::get()
            .forwarded_calls
            .with_label_values(&[if is_write { "write" } else { "read" }])
            .inc();
        let prefer = self.forward_hints.borrow().get(&p).copied();
        let plan = Plan {
            partition: p,
            members,
            prefer,
            deadline,
            attempt_timeout: self.node.config.raft.election_timeout,
            is_write,
        };
        let via = Via {
            api: self,
            method,
            body,
        };
        let (result, answered_by) = forward::forward(&via, plan).await;
        if let Some(m) = answered_by {
            self.forward_hints.borrow_mut().insert(p, m);
        }
        result
    }

    /// Sends the request `make` builds to the shard that owns `p`; its
    /// answer comes straight back to this task (one message there, one
    /// back). Waits until `deadline`; `late` describes what passing it
    /// means. A call whose deadline has already passed is not started.
    async fn on_replica<T: Send + 'static>(
        &self,
        p: u32,
        deadline: Instant,
        make: impl FnOnce(Reply<T>) -> ShardMsg,
        late: impl FnOnce() -> Status,
    ) -> Result<T, Status> {
        if Instant::now() >= deadline {
            return Err(late());
        }
        let (tx, rx) = futures::channel::oneshot::channel();
        self.node
            .shards
            .send(self.node.shards.shard_of(p), make(tx))?;
        match with_deadline(deadline, rx).await {
            Some(Ok(r)) => r.map_err(Status::from),
            Some(Err(_)) => Err(Status::unavailable(format!("partition {p} stopped"))),
            None => Err(late()),
        }
    }

    /// Proposes `cmd` on the local replica of `p` and waits for it to be
    /// applied (or for the deadline).
    async fn write(
        &self,
        p: u32,
        cmd: Command,
        deadline: Instant,
    ) -> Result<WriteResult<Applied>, Status> {
        let shard = self.node.shards.shard_of(p);
        if self.disk_full(shard) {
            return Err(Status::unavailable(format!(
                "partition {p}: this node's disk is full (no space left for the write-ahead log); \
                 the write was not applied, retry later"
            )));
        }
        self.on_replica(
            p,
            deadline,
            |reply| ShardMsg::Propose {
                partition: p,
                cmd,
                reply,
            },
            || {
                if self.disk_full(shard) {
                    return Status::unavailable(format!(
                        "partition {p}: this node's disk is full (no space left for the \
                         write-ahead log); the write may still be applied (at most once) \
                         once space returns"
                    ));
                }
                Status::deadline_exceeded(format!(
                    "partition {p}: the write was not committed before the deadline; \
                     it may still be applied (at most once)"
                ))
            },
        )
        .await
    }

    async fn read(
        &self,
        p: u32,
        key: Bytes,
        serializable: bool,
        deadline: Instant,
    ) -> Result<ReadResult, Status> {
        let f = |reply| ShardMsg::Read {
            partition: p,
            key,
            serializable,
            reply,
        };
        self.on_replica(p, deadline, f, || {
            Status::deadline_exceeded(format!(
                "partition {p}: the read was not confirmed by a quorum before the deadline"
            ))
        })
        .await
    }

    /// Put, Delete and CompareAndSwap from a client.
    pub async fn write_call(&self, req: &Request) -> Result<Bytes, Status> {
        let w = Write::decode(&req.method, &req.body)?;
        w.validate(self)?;
        let route = self.route(w.partition_id(), w.key())?;
        let p = match &route {
            Route::Local(p) | Route::Forward(p, _) => *p,
        };
        // The identity this write keeps through forwarding and retries;
        // its seq counts as in flight until `ticket` drops.
        let ticket = self.sessions.begin(p);
        let deadline = deadline_of(req);
        match route {
            Route::Local(p) => {
                let cmd = w.into_command(ticket.id(), ticket.acked());
                let r = self.write(p, cmd, deadline).await?;
                write_response(&req.method, p, r)
            }
            Route::Forward(p, members) => {
                let id = ticket.id();
                let body = ProposeRequest {
                    partition_id: p,
                    session_node: id.session.node,
                    session_epoch: id.session.epoch,
                    seq: id.seq,
                    acked: ticket.acked(),
                    method: req.method.clone(),
                    body: req.body.clone(),
                }
                .encode_to_vec();
                self.forward(p, members, PEER_PROPOSE, body.into(), deadline, true)
                    .await
            }
        }
    }

    /// A write forwarded by a node that does not host its partition,
    /// proposed here under the identity that node gave it.
    pub async fn propose_call(&self, req: &Request) -> Result<Bytes, Status> {
        let pr: ProposeRequest = decode(&req.body)?;
        let w = Write::decode(&pr.method, &pr.body)?;
        w.validate(self)?;
        let p = pr.partition_id;
        if !self.meta().hosted.contains(&p) {
            return Err(Status::not_found(format!(
                "partition {p} is not hosted on node {}",
                self.node.node_id()
            )));
        }
        let id = WriteId {
            session: crate::kv::command::SessionId {
                node: pr.session_node,
                epoch: pr.session_epoch,
            },
            seq: pr.seq,
        };
        if id.session.node == 0 || pr.acked >= pr.seq {
            return Err(Status::invalid_argument("malformed write identity"));
        }
        let r = self
            .write(p, w.into_command(id, pr.acked), deadline_of(req))
            .await?;
        write_response(&pr.method, p, r)
    }

    /// Get. A call forwarded from another node (`from_peer`) is served
    /// here or refused, never forwarded again.
    pub async fn get_call(&self, req: &Request, from_peer: bool) -> Result<Bytes, Status> {
        let r: GetRequest = decode(&req.body)?;
        self.check_key(&r.key)?;
        let deadline = deadline_of(req);
        match self.route(r.partition_id, &r.key)? {
            Route::Forward(p, _) if from_peer => Err(Status::not_found(format!(
                "partition {p} is not hosted on node {}",
                self.node.node_id()
            ))),
            Route::Forward(p, members) => {
                let body = GetRequest {
                    partition_id: p,
                    ..r
                }
                .encode_to_vec();
                self.forward(p, members, KV_GET, body.into(), deadline, false)
                    .await
            }
            Route::Local(p) => {
                let rr = self.read(p, r.key, r.serializable, deadline).await?;
                Ok(Bytes::from(
                    GetResponse {
                        found: rr.value.is_some(),
                        value: rr.value.unwrap_or_default(),
                        index: rr.index,
                        partition_id: p,
                    }
                    .encode_to_vec(),
                ))
            }
        }
    }
}

impl KvService {
    /// `KV/Watch`: registers a watcher on the shard that owns the
    /// partition and streams its events until the client goes away or the
    /// shard ends the watch (see `kv::watch` for the reasons).
    pub async fn watch(&self, mut call: crate::grpc::StreamCall) -> Result<(), Status> {
        use crate::kv::watch::{Ending, Filter, WATCHER_QUEUE};
        use crate::proto::kv::{watch_event, WatchEvent, WatchRequest};
        use futures::StreamExt;

        let req: WatchRequest = match call.incoming.next().await {
            Some(m) => decode(&m?)?,
            None => return Err(Status::invalid_argument("Watch needs a WatchRequest")),
        };
        if !req.prefix {
            self.check_key(&req.key)?;
        }
        if req.prefix && req.partition_id == 0 {
            return Err(Status::invalid_argument(
                "a prefix watch needs its partition_id (keys under a prefix live in every partition)",
            ));
        }
        let p = match self.route(req.partition_id, &req.key)? {
            Route::Local(p) => p,
            Route::Forward(p, members) => {
                return Err(Status::failed_precondition(format!(
                    "partition {p} is not hosted on this node; watch it on one of its members (nodes {members:?})"
                )))
            }
        };
        let (tx, mut rx) = futures::channel::mpsc::channel(WATCHER_QUEUE);
        let ending = std::sync::Arc::new(Ending::default());
        let filter = Filter {
            partition: p,
            key: req.key,
            prefix: req.prefix,
        };
        let start = req.start_index;
        self.node
            .shards
            .request_owner(p, |reply| ShardMsg::Watch {
                filter,
                start_index: start,
                tx,
                ending: ending.clone(),
                reply,
            })
            .await?;
        let mut last = start.saturating_sub(1);
        while let Some(e) = rx.next().await {
            last = e.index;
            ending.taken(&e);
            let (kind, value) = match e.value {
                Some(v) => (watch_event::Type::Put, v),
                None => (watch_event::Type::Delete, Bytes::new()),
            };
            let event = WatchEvent {
                r#type: kind as i32,
                key: e.key,
                value,
                index: e.index,
                partition_id: e.partition,
            };
            call.outgoing
                .send(Bytes::from(event.encode_to_vec()))
                .await?;
        }
        Err(ending.status(last))
    }
}
