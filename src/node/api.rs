//! The per-shard gRPC application: decodes requests, routes them to their
//! service (`NodeService`, `KvService`, `AdminService`, `PeerService`),
//! encodes answers. One `Api` per shard serves both the public gRPC
//! frontend and calls forwarded from other nodes over the peer links. The
//! method paths below are the one table the server and the CLI share.

use crate::shard::ShardMsg;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::LocalBoxFuture;
use prost::Message;

use super::NodeShared;
use crate::grpc::{Code, Handler, Kind, Request, Status, StreamCall};
use crate::meta::NodeMeta;
use crate::proto::admin::{PartitionStatus, StatusResponse};
use crate::proto::peer::{
    envelope, AddVoterRequest, Envelope, PeerRequest, PeerResponse, RemoveVoterRequest,
};
use crate::transport::PeerLinks;

pub const NODE_BOOTSTRAP: &str = "/atomix.multiraft.v1.Node/Bootstrap";
pub const NODE_JOIN: &str = "/atomix.multiraft.v1.Node/Join";
pub const NODE_LEAVE: &str = "/atomix.multiraft.v1.Node/Leave";
pub const ADMIN_STATUS: &str = "/multiraft.admin.v1.Admin/Status";
pub const ADMIN_WATCH: &str = "/multiraft.admin.v1.Admin/Watch";
pub const KV_PUT: &str = "/multiraft.kv.v1.KV/Put";
pub const KV_GET: &str = "/multiraft.kv.v1.KV/Get";
pub const KV_DELETE: &str = "/multiraft.kv.v1.KV/Delete";
pub const KV_CAS: &str = "/multiraft.kv.v1.KV/CompareAndSwap";
pub const KV_WATCH: &str = "/multiraft.kv.v1.KV/Watch";
/// Internal methods: only reachable over the peer port.
pub const PEER_ADD_VOTER: &str = "/multiraft.peer.v1.Internal/AddVoter";
pub const PEER_CONF_QUERY: &str = "/multiraft.peer.v1.Internal/ConfQuery";
pub const PEER_REMOVE_VOTER: &str = "/multiraft.peer.v1.Internal/RemoveVoter";
pub const PEER_PROPOSE: &str = "/multiraft.peer.v1.Internal/Propose";

/// How long a call waits when the client sent no deadline.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

pub struct ApiInner {
    pub node: Arc<NodeShared>,
    pub shard: usize,
    pub links: Rc<PeerLinks>,
    pub peer_pending: Rc<RefCell<HashMap<u64, oneshot::Sender<PeerResponse>>>>,
    next_id: Cell<u64>,
    /// This shard's write session: identities of the writes it takes.
    pub sessions: crate::kv::session::Proposer,
    /// Per partition not hosted here: the member that answered last.
    pub forward_hints: RefCell<HashMap<u32, u64>>,
    /// This shard's copy of the node metadata and the version it was
    /// taken at (see `NodeShared::meta_version`).
    meta_cache: RefCell<(u64, Rc<NodeMeta>)>,
    /// Fires when the node starts to shut down (health says NOT_SERVING).
    pub shutdown: crate::shutdown::Shutdown,
}

/// Cheap handle to one shard's application: the state every service of
/// the shard shares, and the routing of calls to them.
#[derive(Clone)]
pub struct Api(pub Rc<ApiInner>);

impl std::ops::Deref for Api {
    type Target = ApiInner;
    fn deref(&self) -> &ApiInner {
        &self.0
    }
}

/// The services a shard serves, each a view of its [`Api`] with the
/// methods of one gRPC service.
macro_rules! service {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name(pub Api);

        impl std::ops::Deref for $name {
            type Target = Api;
            fn deref(&self) -> &Api {
                &self.0
            }
        }
    };
}

service!(
    /// `atomix.multiraft.v1.Node`: Bootstrap, Join, Leave (`control.rs`).
    NodeService
);
service!(
    /// `multiraft.kv.v1.KV`: Put, Get, Delete, CompareAndSwap, Watch, and
    /// proposals forwarded by peers (`kv_service.rs`).
    KvService
);
service!(
    /// `multiraft.admin.v1.Admin`: Status and the cluster-event Watch.
    AdminService
);
service!(
    /// The steps of Join and Leave that nodes ask of each other over the
    /// peer port: AddVoter, RemoveVoter, ConfQuery (`control.rs`).
    PeerService
);

impl Api {
    pub fn new(
        node: Arc<NodeShared>,
        shard: usize,
        links: Rc<PeerLinks>,
        peer_pending: Rc<RefCell<HashMap<u64, oneshot::Sender<PeerResponse>>>>,
        shutdown: crate::shutdown::Shutdown,
    ) -> Api {
        // Ids of forwarded calls, matched only by this shard against the
        // answers it gets back; the random start keeps a restarted node from
        // taking a late answer meant for its previous run.
        let base = rand::random::<u64>() >> 2;
        let incarnation = node.meta().incarnation;
        let session = crate::kv::command::SessionId::new(node.node_id(), incarnation, shard);
        Api(Rc::new(ApiInner {
            node,
            shard,
            links,
            peer_pending,
            next_id: Cell::new(base),
            sessions: crate::kv::session::Proposer::new(session),
            forward_hints: RefCell::new(HashMap::new()),
            meta_cache: RefCell::new((u64::MAX, Rc::new(NodeMeta::default()))),
            shutdown,
        }))
    }

    /// The node metadata as of now, without taking the lock unless it
    /// changed since the last call on this shard.
    pub fn meta(&self) -> Rc<NodeMeta> {
        let v = self
            .node
            .meta_version
            .load(std::sync::atomic::Ordering::Acquire);
        let mut c = self.meta_cache.borrow_mut();
        if c.0 != v {
            *c = (v, Rc::new(self.node.meta().clone()));
        }
        c.1.clone()
    }

    pub fn next_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// Routes one call. `peer` (the node whose peer connection carried the
    /// call) unlocks the internal methods.
    pub async fn dispatch(&self, req: Request, peer: Option<u64>) -> Result<Bytes, Status> {
        let from_peer = peer.is_some();
        let deadline = req.deadline;
        // The peer port carries only what nodes send each other: forwarded
        // proposals and reads, and the steps of Join and Leave. Control and
        // admin calls come through the API port, where they can require a
        // client certificate; a peer asking for one is refused.
        if let Some(from) = peer.filter(|_| !is_peer_method(&req.method)) {
            let why = format!("{} is not served over the peer port", req.method);
            refused_peer_call(from, &why);
            return Err(Status::permission_denied(why));
        }
        let (node, kv) = (NodeService(self.clone()), KvService(self.clone()));
        let peer_service = PeerService(self.clone());
        match req.method.as_str() {
            NODE_BOOTSTRAP => reply(node.bootstrap(decode(&req.body)?, deadline).await),
            NODE_JOIN => reply(node.join(decode(&req.body)?, deadline).await),
            NODE_LEAVE => reply(node.leave(decode(&req.body)?, deadline).await),
            ADMIN_STATUS => {
                let _: crate::proto::admin::StatusRequest = decode(&req.body)?;
                reply(AdminService(self.clone()).status().await)
            }
            KV_PUT | KV_DELETE | KV_CAS => kv.write_call(&req).await,
            KV_GET => kv.get_call(&req, from_peer).await,
            PEER_PROPOSE if from_peer => kv.propose_call(&req).await,
            PEER_ADD_VOTER if from_peer => {
                let r: AddVoterRequest = decode(&req.body)?;
                self.check_membership_caller(peer, r.partition_id, r.node_id)?;
                reply(peer_service.add_voter(r, deadline).await)
            }
            PEER_REMOVE_VOTER if from_peer => {
                let r: RemoveVoterRequest = decode(&req.body)?;
                self.check_membership_caller(peer, r.partition_id, r.node_id)?;
                reply(peer_service.remove_voter(r, deadline).await)
            }
            PEER_CONF_QUERY if from_peer => {
                reply(peer_service.conf_query(decode(&req.body)?).await)
            }
            super::health::CHECK => super::health::check(self, &req.body),
            m => Err(Status::unimplemented(format!("unknown method {m}"))),
        }
    }

    /// A membership change of `partition` asked over the peer port is taken
    /// only from the node it adds or removes, or from a member.
    fn check_membership_caller(
        &self,
        caller: Option<u64>,
        partition: u32,
        node: u64,
    ) -> Result<(), Status> {
        let Some(caller) = caller else {
            return Err(Status::unimplemented("internal method"));
        };
        let member = self
            .meta()
            .members
            .get(&partition)
            .is_some_and(|m| m.contains_key(&caller));
        if caller == node || member {
            return Ok(());
        }
        tracing::warn!(
            caller,
            partition,
            node,
            "refused a membership change asked by a node that is neither the subject nor a member"
        );
        Err(Status::permission_denied(format!(
            "node {caller} may not change the membership of partition {partition}"
        )))
    }
}

impl AdminService {
    /// Every partition hosted on this node.
    pub async fn status(&self) -> Result<StatusResponse, Status> {
        let per_shard = self
            .node
            .shards
            .request_all(|reply| ShardMsg::Status { reply })
            .await?;
        let (groups, shard_stats): (Vec<_>, Vec<_>) = per_shard.into_iter().unzip();
        let mut partitions: Vec<PartitionStatus> = groups.into_iter().flatten().collect();
        partitions.sort_by_key(|p| p.partition_id);
        let meta = self.node.meta();
        Ok(StatusResponse {
            node_id: self.node.node_id(),
            bootstrapped: meta.bootstrapped(),
            shards: self.node.shards.count() as u32,
            partitions,
            api_addr: self.node.config.api_addr.to_string(),
            raft_addr: self.node.config.raft_addr.to_string(),
            shard_stats,
        })
    }

    /// `Admin/Watch`: registers on every shard and streams their cluster
    /// events until the client goes away or falls behind.
    pub async fn cluster_watch(&self, mut call: StreamCall) -> Result<(), Status> {
        use futures::StreamExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        let _: crate::proto::admin::WatchClusterRequest = match call.incoming.next().await {
            Some(m) => decode(&m?)?,
            None => {
                return Err(Status::invalid_argument(
                    "Watch needs a WatchClusterRequest",
                ))
            }
        };
        let (tx, mut rx) = futures::channel::mpsc::channel(crate::shard::events::QUEUE);
        let behind = Arc::new(AtomicBool::new(false));
        // Registered together with each partition's leader as of then, on
        // the shard's own thread: the watcher starts from that state and
        // every later event follows it.
        let registered = self
            .node
            .shards
            .request_all(|reply| ShardMsg::WatchCluster {
                tx: tx.clone(),
                behind: behind.clone(),
                reply,
            })
            .await?;
        drop(tx);
        for leaders in registered {
            for (p, leader, term) in leaders {
                let mut e = crate::shard::events::event(
                    crate::proto::admin::cluster_event::Type::LeaderChanged,
                    p,
                );
                e.node_id = leader;
                e.term = term;
                call.outgoing.send(Bytes::from(e.encode_to_vec())).await?;
            }
        }
        while let Some(e) = rx.next().await {
            if behind.load(Ordering::Relaxed) {
                break;
            }
            call.outgoing.send(Bytes::from(e.encode_to_vec())).await?;
        }
        if behind.load(Ordering::Relaxed) {
            return Err(Status::resource_exhausted(format!(
                "the watcher fell more than {} events behind; watch again (and read Status for the state now)",
                crate::shard::events::QUEUE
            )));
        }
        Err(Status::unavailable("the node is shutting down"))
    }
}

impl Api {
    /// Status of one local partition, if hosted.
    pub async fn partition_status(
        &self,
        partition: u32,
    ) -> Result<Option<PartitionStatus>, Status> {
        self.node
            .shards
            .request_owner(partition, |reply| ShardMsg::PartitionStatus {
                partition,
                reply,
            })
            .await
    }

    /// Sends a call to another node over the peer links and waits for its
    /// answer (at most `timeout`).
    pub async fn peer_call(
        &self,
        to: u64,
        method: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Status> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.peer_pending.borrow_mut().insert(id, tx);
        self.links.send(
            to,
            Envelope {
                body: Some(envelope::Body::Request(PeerRequest {
                    id,
                    origin_shard: self.shard as u32,
                    method: method.to_string(),
                    body,
                    // At least 1 ms: 0 would mean "no deadline".
                    timeout_ms: (timeout.as_millis() as u64).max(1),
                    reply_addr: self.node.config.raft_addr.to_string(),
                })),
            },
        );
        let answer = with_timeout(timeout, rx).await;
        self.peer_pending.borrow_mut().remove(&id);
        match answer {
            Some(Ok(r)) if r.code == 0 => Ok(r.body),
            Some(Ok(r)) => Err(Status::new(Code::from_u32(r.code), r.message)),
            _ => Err(Status::unavailable(format!(
                "node {to} did not answer within {timeout:?}"
            ))),
        }
    }

    /// Serves a call that arrived over the peer links and sends the answer
    /// back to the caller's shard.
    pub fn serve_peer_request(&self, from: u64, r: PeerRequest) {
        // A caller that is in no member list (a node hosting nothing) is
        // reachable only through the address it sent.
        if !r.reply_addr.is_empty() && self.links.address(from).is_none() {
            tracing::info!(node = from, addr = %r.reply_addr, "learned a caller's raft address");
            self.links.set_address(from, &r.reply_addr);
        }
        let api = self.clone();
        glommio::spawn_local(async move {
            let deadline =
                (r.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(r.timeout_ms));
            let req = Request {
                method: r.method,
                body: r.body,
                deadline,
                client_verified: false,
            };
            let result = match deadline {
                Some(d) => with_deadline(d, api.dispatch(req, Some(from)))
                    .await
                    .unwrap_or_else(|| {
                        Err(Status::deadline_exceeded(
                            "the forwarded call's deadline passed on this node",
                        ))
                    }),
                None => api.dispatch(req, Some(from)).await,
            };
            let (code, message, body) = match result {
                Ok(b) => (0, String::new(), b),
                Err(s) => (s.code as u32, s.message, Bytes::new()),
            };
            api.links.send(
                from,
                Envelope {
                    body: Some(envelope::Body::Response(PeerResponse {
                        id: r.id,
                        origin_shard: r.origin_shard,
                        code,
                        message,
                        body,
                    })),
                },
            );
        })
        .detach();
    }
}

/// Logs a refused peer call, at most once per second per shard (no correct
/// peer makes one, so they come in floods or not at all).
fn refused_peer_call(from: u64, why: &str) {
    thread_local! {
        static LOGGED: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    }
    let now = Instant::now();
    if LOGGED
        .get()
        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
    {
        LOGGED.set(Some(now));
        tracing::warn!(from, "refused a peer call: {why}");
    }
}

impl Api {
    /// With a client CA on the API port, the control service (or every
    /// service) requires a client certificate that verified against it.
    fn authorize(&self, method: &str, client_verified: bool) -> Result<(), Status> {
        use crate::tls::ClientAuth;
        let auth = self.node.config.api_tls.as_ref().map(|t| t.client_auth);
        let needs_cert = match auth {
            Some(ClientAuth::All) => true,
            Some(ClientAuth::Control) => method.starts_with(NODE_SERVICE),
            Some(ClientAuth::Off) | None => false,
        };
        if needs_cert && !client_verified {
            return Err(Status::new(
                Code::Unauthenticated,
                format!("{method} requires a client certificate from the API's client CA"),
            ));
        }
        Ok(())
    }
}

/// Methods a peer may call over the peer port.
fn is_peer_method(method: &str) -> bool {
    matches!(
        method,
        PEER_PROPOSE | PEER_ADD_VOTER | PEER_REMOVE_VOTER | PEER_CONF_QUERY | KV_GET
    )
}

/// Prefix of the control service's methods (Bootstrap, Join, Leave).
const NODE_SERVICE: &str = "/atomix.multiraft.v1.Node/";

impl Handler for Api {
    fn call(&self, req: Request) -> LocalBoxFuture<'static, Result<Bytes, Status>> {
        if let Err(status) = self.authorize(&req.method, req.client_verified) {
            return Box::pin(std::future::ready(Err(status)));
        }
        let api = self.clone();
        Box::pin(async move { api.dispatch(req, None).await })
    }

    fn kind(&self, method: &str) -> Option<Kind> {
        use super::{health, reflection};
        match method {
            NODE_BOOTSTRAP
            | NODE_JOIN
            | NODE_LEAVE
            | ADMIN_STATUS
            | KV_PUT
            | KV_GET
            | KV_DELETE
            | KV_CAS
            | health::CHECK => Some(Kind::Unary),
            health::WATCH | reflection::V1 | reflection::V1ALPHA | KV_WATCH | ADMIN_WATCH => {
                Some(Kind::Streaming)
            }
            _ => None,
        }
    }

    fn stream(&self, call: StreamCall) -> LocalBoxFuture<'static, Result<(), Status>> {
        use super::{health, reflection};
        if let Err(status) = self.authorize(&call.method, call.client_verified) {
            return Box::pin(std::future::ready(Err(status)));
        }
        match call.method.as_str() {
            health::WATCH => Box::pin(health::watch(self.clone(), call)),
            KV_WATCH => {
                let kv = KvService(self.clone());
                Box::pin(async move { kv.watch(call).await })
            }
            ADMIN_WATCH => {
                let admin = AdminService(self.clone());
                Box::pin(async move { admin.cluster_watch(call).await })
            }
            reflection::V1 | reflection::V1ALPHA => Box::pin(reflection::serve(call)),
            m => {
                let m = m.to_owned();
                Box::pin(async move { Err(Status::unimplemented(format!("unknown method {m}"))) })
            }
        }
    }
}

/// Decodes a request message; a bad one is the caller's fault.
pub fn decode<M: Message + Default>(body: &[u8]) -> Result<M, Status> {
    M::decode(body).map_err(|e| {
        Status::invalid_argument(format!(
            "cannot decode {}: {e}",
            std::any::type_name::<M>()
                .rsplit("::")
                .next()
                .unwrap_or("request")
        ))
    })
}

fn reply<M: Message, E: Into<Status>>(r: Result<M, E>) -> Result<Bytes, Status> {
    r.map(|m| Bytes::from(m.encode_to_vec()))
        .map_err(Into::into)
}

/// Awaits `fut` for at most `timeout`; `None` when it ran out.
pub async fn with_timeout<F: std::future::Future>(timeout: Duration, fut: F) -> Option<F::Output> {
    let sleep = glommio::timer::sleep(timeout);
    futures::pin_mut!(fut);
    futures::pin_mut!(sleep);
    match futures::future::select(fut, sleep).await {
        futures::future::Either::Left((v, _)) => Some(v),
        futures::future::Either::Right(_) => None,
    }
}

/// Awaits `fut` until `deadline`; `None` when it passed.
pub async fn with_deadline<F: std::future::Future>(deadline: Instant, fut: F) -> Option<F::Output> {
    with_timeout(deadline.saturating_duration_since(Instant::now()), fut).await
}

/// When a call that waits on the cluster stops waiting and answers
/// DEADLINE_EXCEEDED itself: at the client's deadline, less a sliver (a
/// twentieth of the time left, at most [`MAX_ANSWER_MARGIN`]) so that the
/// answer, with its explanation, reaches the client before the client's
/// own timer fires. Without a deadline, after [`DEFAULT_WAIT`].
///
/// Never a fixed margin: a 5 ms call on a healthy cluster must get its 5 ms.
pub fn answer_by(deadline: Option<Instant>) -> Instant {
    answer_by_from(Instant::now(), deadline)
}

/// [`answer_by`] as seen at `now`.
fn answer_by_from(now: Instant, deadline: Option<Instant>) -> Instant {
    match deadline {
        Some(d) => {
            let left = d.saturating_duration_since(now);
            d - (left / 20).min(MAX_ANSWER_MARGIN)
        }
        None => now + DEFAULT_WAIT,
    }
}

/// The most [`answer_by`] answers ahead of a deadline. The answer must
/// beat the client's timer even when the node's thread waits for a core:
/// on a busy machine (more runnable threads than cores, a debug build)
/// that wait passes 10 ms, and a client whose 3 s write waited on a full
/// disk got its own timeout (CANCELLED, no explanation) instead of the
/// node's UNAVAILABLE. Only calls with more than a second left give up
/// all of it.
///
/// The margin changes only when a waiting caller is told, never what
/// happens to its write: whatever reached the log is applied at most once
/// (its identity, `kv::session`), and the answer says the write may still
/// be applied.
pub const MAX_ANSWER_MARGIN: Duration = Duration::from_millis(50);

#[cfg(test)]
mod answer_by_tests {
    use super::*;

    #[test]
    fn long_calls_give_up_at_most_the_margin_and_short_ones_a_twentieth() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let d = now + Duration::from_secs(3);
        assert_eq!(answer_by_from(now, Some(d)), d - MAX_ANSWER_MARGIN);
        let d = now + ms(100);
        assert_eq!(answer_by_from(now, Some(d)), d - ms(5));
        let past = now - ms(1);
        assert_eq!(
            answer_by_from(now, Some(past)),
            past,
            "no time left: nothing to give up"
        );
        assert_eq!(answer_by_from(now, None), now + DEFAULT_WAIT);
    }
}
