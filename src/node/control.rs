//! The Node service: Bootstrap, Join and Leave (DESIGN.md §1), plus the
//! internal calls members answer for them (AddVoter, ConfQuery).
//!
//! All three take the node's control lock while they change the node's
//! metadata and replicas, never while they wait on the cluster, so one stuck
//! call does not hold up the others. Each first makes the node's metadata
//! durable and only then changes replicas, so a crash in between is
//! repaired at start-up (see `node::start`): a hosted partition without a
//! replica gets one, a replica no longer hosted is removed.

use crate::shard::ShardMsg;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use raft::eraftpb::ConfChangeType;

use crate::grpc::Status;
use crate::proto::node::{
    BootstrapRequest, BootstrapResponse, JoinRequest, JoinResponse, LeaveRequest, LeaveResponse,
};
use crate::proto::peer::{
    AddVoterRequest, AddVoterResponse, ConfQueryRequest, ConfQueryResponse, RemoveVoterRequest,
    RemoveVoterResponse,
};
use crate::raft::GroupInit;

use super::api::{
    decode, with_deadline, Api, NodeService, PeerService, PEER_ADD_VOTER, PEER_CONF_QUERY,
    PEER_REMOVE_VOTER,
};
use super::error::ControlError;
use crate::meta::{validate_layout, validate_partition, Members, NodeMeta};

/// Poll period while waiting for a cluster condition.
const POLL: Duration = Duration::from_millis(20);
/// Per-attempt timeout of a call to another member.
const PEER_ATTEMPT: Duration = Duration::from_secs(2);

impl NodeService {
    pub async fn bootstrap(
        &self,
        req: BootstrapRequest,
        deadline: Option<Instant>,
    ) -> Result<BootstrapResponse, ControlError> {
        let layout = validate_layout(&req.partitions)?;
        let addresses = address_book(&layout)?;
        let me = self.node.node_id();
        let hosted: Vec<(u32, Vec<u64>)> = layout
            .iter()
            .filter(|(_, m)| m.contains_key(&me))
            .map(|(p, m)| (*p, m.keys().copied().collect()))
            .collect();
        {
            let _guard = self.node.control.lock().await;
            let current = self.node.meta().bootstrap.clone();
            match current {
                Some(existing) if existing == layout => {}
                Some(existing) => {
                    return Err(ControlError::LayoutConflict(format!(
                        "node {me} is already bootstrapped with a different layout ({} partitions: {}); \
                         the requested one has {} partitions: {}",
                        existing.len(),
                        describe(&existing),
                        layout.len(),
                        describe(&layout)
                    )))
                }
                None => {
                    self.update_meta(|meta| {
                        meta.bootstrap = Some(layout.clone());
                        meta.members = layout.clone();
                        meta.hosted = hosted.iter().map(|(p, _)| *p).collect();
                        meta.addresses.extend(addresses.clone());
                        meta.addresses.remove(&me);
                    })?;
                    for (node, addr) in addresses {
                        self.node.shards.broadcast_address(node, addr);
                    }
                    let creates = hosted.iter().map(|(p, voters)| {
                        let (p, voters) = (*p, voters.clone());
                        self.node
                            .shards
                            .request_owner(p, move |reply| ShardMsg::CreateGroup {
                                partition: p,
                                init: GroupInit::bootstrap(voters),
                                reply,
                            })
                    });
                    futures::future::try_join_all(creates).await?;
                    tracing::info!(partitions = layout.len(), hosted = hosted.len(), "bootstrapped");
                }
            }
        }
        // Done when every hosted partition has elected a leader. Each poll
        // asks every shard about the partitions still without one: the
        // work shrinks as elections finish (the whole layout every poll
        // was quadratic at thousands of partitions).
        let lacking = std::cell::RefCell::new(std::sync::Arc::new(
            hosted.iter().map(|(p, _)| *p).collect::<Vec<u32>>(),
        ));
        self.wait_for(
            deadline,
            "every hosted partition to elect a leader",
            || async {
                let ids = lacking.borrow().clone();
                let still = self
                    .node
                    .shards
                    .request_all(|reply| ShardMsg::WithoutLeader {
                        partitions: ids.clone(),
                        reply,
                    })
                    .await?
                    .concat();
                let done = still.is_empty();
                *lacking.borrow_mut() = std::sync::Arc::new(still);
                Ok::<_, Status>(done)
            },
        )
        .await?;
        Ok(BootstrapResponse {})
    }

    pub async fn join(
        &self,
        req: JoinRequest,
        deadline: Option<Instant>,
    ) -> Result<JoinResponse, ControlError> {
        let p = req
            .partition
            .ok_or_else(|| ControlError::Invalid("partition is required".into()))?;
        let members = validate_partition(&p, "partition")?;
        let me = self.node.node_id();
        let Some(my_addr) = members.get(&me).cloned() else {
            return Err(ControlError::Invalid(format!(
                "partition.members must include this node (id {me}) (partition {})",
                p.partition_id
            )));
        };
        let pid = p.partition_id;
        {
            let _guard = self.node.control.lock().await;
            let meta = self.node.meta().clone();
            if !meta.bootstrapped() {
                return Err(ControlError::NotBootstrapped);
            }
            if !meta.hosted.contains(&pid) {
                self.update_meta(|meta| {
                    meta.hosted.insert(pid);
                    meta.members.insert(pid, members.clone());
                    for (n, a) in &members {
                        if *n != me {
                            meta.addresses.insert(*n, a.clone());
                        }
                    }
                })?;
                for (n, a) in &members {
                    if *n != me {
                        self.node.shards.broadcast_address(*n, a.clone());
                    }
                }
                self.node
                    .shards
                    .request_owner(pid, |reply| ShardMsg::CreateGroup {
                        partition: pid,
                        init: GroupInit::joining(),
                        reply,
                    })
                    .await?;
                tracing::info!(partition = pid, "joining partition");
            }
        }
        // Ask the current members to add this node, then wait to catch up.
        let others: Vec<u64> = members.keys().copied().filter(|n| *n != me).collect();
        let body = Bytes::from(
            AddVoterRequest {
                partition_id: pid,
                node_id: me,
                raft_addr: my_addr,
            }
            .encode_to_vec(),
        );
        let until = super::api::answer_by(deadline);
        let mut asked = false;
        let mut next = 0;
        loop {
            if let Some(st) = self.partition_status(pid).await? {
                if st.voters.contains(&me)
                    && st.leader_id != 0
                    && st.applied_index >= st.commit_index
                {
                    break;
                }
            }
            if !asked && !others.is_empty() {
                let to = others[next % others.len()];
                next += 1;
                // Never past the deadline: the answer must reach the client
                // before its own timer fires.
                let attempt = PEER_ATTEMPT.min(until.saturating_duration_since(Instant::now()));
                match self
                    .peer_call(to, PEER_ADD_VOTER, body.clone(), attempt)
                    .await
                {
                    Ok(_) => asked = true,
                    Err(e) => tracing::debug!(partition = pid, "AddVoter via node {to}: {e}"),
                }
            }
            if Instant::now() >= until {
                return Err(ControlError::TimedOut(
                    "timed out waiting for this replica to become a voter and catch up".into(),
                ));
            }
            glommio::timer::sleep(POLL.min(until.saturating_duration_since(Instant::now()))).await;
        }
        Ok(JoinResponse {})
    }

    pub async fn leave(
        &self,
        req: LeaveRequest,
        deadline: Option<Instant>,
    ) -> Result<LeaveResponse, ControlError> {
        let pid = req.partition_id;
        if pid == 0 {
            return Err(ControlError::Invalid(
                "partition_id must be non-zero".into(),
            ));
        }
        let me = self.node.node_id();
        {
            let meta = self.node.meta();
            if !meta.bootstrapped() {
                return Err(ControlError::NotBootstrapped);
            }
            if !meta.hosted.contains(&pid) {
                return Err(ControlError::NotHosted {
                    partition: pid,
                    node: Some(me),
                });
            }
        }
        // The wait runs without the control lock: a Leave that cannot
        // finish (no quorum) must not block Bootstrap and Join meanwhile.
        let mut last_proposal: Option<Instant> = None;
        self.wait_for(deadline, "the removal of this replica to commit", || {
            let propose = last_proposal.is_none_or(|t| t.elapsed() > Duration::from_secs(1));
            if propose {
                last_proposal = Some(Instant::now());
            }
            async move { self.leave_step(pid, propose).await }
        })
        .await?;

        let _guard = self.node.control.lock().await;
        if !self.node.meta().hosted.contains(&pid) {
            // A concurrent Leave of the same partition finished first.
            return Ok(LeaveResponse {});
        }
        self.update_meta(|meta| {
            meta.hosted.remove(&pid);
            if let Some(m) = meta.members.get_mut(&pid) {
                m.remove(&me);
            }
        })?;
        self.node
            .shards
            .request_owner(pid, |reply| ShardMsg::RemoveGroup {
                partition: pid,
                reply,
            })
            .await?;
        tracing::info!(partition = pid, "left partition");
        Ok(LeaveResponse {})
    }

    /// One step of Leave: true once this node is no longer a voter.
    async fn leave_step(&self, pid: u32, propose: bool) -> Result<bool, ControlError> {
        let me = self.node.node_id();
        let Some(st) = self.partition_status(pid).await? else {
            return Ok(true);
        };
        if !st.voters.contains(&me) && !st.voters.is_empty() {
            return Ok(true);
        }
        if st.voters.is_empty() {
            // A replica that never learned its configuration: a Join that
            // did not complete. The members decide whether it is a voter.
            return self.leave_unconfigured(pid, propose).await;
        }
        let others: Vec<u64> = st.voters.iter().copied().filter(|v| *v != me).collect();
        if others.is_empty() {
            return Err(ControlError::LastVoter {
                node: me,
                partition: pid,
            });
        }
        // Members stop talking to a removed node, so it may never learn that
        // its removal committed: ask them.
        let q = Bytes::from(ConfQueryRequest { partition_id: pid }.encode_to_vec());
        for o in &others {
            if let Ok(b) = self
                .peer_call(*o, PEER_CONF_QUERY, q.clone(), Duration::from_millis(500))
                .await
            {
                let r: ConfQueryResponse = decode(&b)?;
                if !r.voters.is_empty() && !r.voters.contains(&me) {
                    return Ok(true);
                }
                break;
            }
        }
        if !propose {
            return Ok(false);
        }
        if st.leader_id == me {
            // A leader removing itself would stop leading mid-change; hand
            // leadership to another voter first.
            let to = others[0];
            self.node.shards.send_bounded(
                self.node.shards.shard_of(pid),
                ShardMsg::TransferLeader { partition: pid, to },
            )?;
            return Ok(false);
        }
        // The change is answered only if this replica applies it;
        // ConfQuery covers the case where it never hears of it.
        let _ = self
            .node
            .shards
            .request_owner(pid, |reply| ShardMsg::ChangeMembership {
                partition: pid,
                node: me,
                change: ConfChangeType::RemoveNode,
                context: Vec::new(),
                reply,
            })
            .await;
        Ok(false)
    }

    /// Leave for a replica with no configuration of its own (its Join never
    /// completed): done if the members do not count it as a voter;
    /// otherwise one of them is asked to remove it.
    async fn leave_unconfigured(&self, pid: u32, propose: bool) -> Result<bool, ControlError> {
        let me = self.node.node_id();
        let members: Vec<u64> = self
            .meta()
            .members
            .get(&pid)
            .map(|m| m.keys().copied().filter(|n| *n != me).collect())
            .unwrap_or_default();
        let q = Bytes::from(ConfQueryRequest { partition_id: pid }.encode_to_vec());
        for m in members {
            let Ok(b) = self
                .peer_call(m, PEER_CONF_QUERY, q.clone(), Duration::from_millis(500))
                .await
            else {
                continue;
            };
            let r: ConfQueryResponse = decode(&b)?;
            if r.voters.is_empty() {
                continue;
            }
            if !r.voters.contains(&me) {
                return Ok(true);
            }
            if propose {
                let body = Bytes::from(
                    RemoveVoterRequest {
                        partition_id: pid,
                        node_id: me,
                    }
                    .encode_to_vec(),
                );
                if let Err(e) = self
                    .peer_call(m, PEER_REMOVE_VOTER, body, PEER_ATTEMPT)
                    .await
                {
                    tracing::debug!(partition = pid, "RemoveVoter via node {m}: {e}");
                }
            }
            return Ok(false);
        }
        Ok(false)
    }
}

impl PeerService {
    /// Internal: a member is asked to remove a node from a partition (the
    /// node itself, leaving with no configuration of its own).
    pub async fn remove_voter(
        &self,
        req: RemoveVoterRequest,
        deadline: Option<Instant>,
    ) -> Result<RemoveVoterResponse, ControlError> {
        let pid = req.partition_id;
        let node = req.node_id;
        if node == 0 {
            return Err(ControlError::Invalid("RemoveVoter needs a node id".into()));
        }
        self.change_membership(pid, node, ConfChangeType::RemoveNode, Vec::new(), deadline)
            .await?;
        Ok(RemoveVoterResponse {})
    }

    /// Internal: a joining node asks a member to add it as a voter.
    pub async fn add_voter(
        &self,
        req: AddVoterRequest,
        deadline: Option<Instant>,
    ) -> Result<AddVoterResponse, ControlError> {
        let pid = req.partition_id;
        if !self.node.meta().hosted.contains(&pid) {
            return Err(ControlError::NotHosted {
                partition: pid,
                node: None,
            });
        }
        if req.node_id == 0 || !crate::meta::check_address(&req.raft_addr) {
            return Err(ControlError::Invalid(
                "AddVoter needs a node id and a host:port address".into(),
            ));
        }
        // Learn the address at once: if this node leads, it must reach the
        // new voter as soon as the change applies.
        self.node
            .shards
            .broadcast_address(req.node_id, req.raft_addr.clone());
        let addr = req.raft_addr.into_bytes();
        self.change_membership(pid, req.node_id, ConfChangeType::AddNode, addr, deadline)
            .await?;
        Ok(AddVoterResponse {})
    }

    /// Internal: the voters of a partition as this member sees them.
    pub async fn conf_query(
        &self,
        req: ConfQueryRequest,
    ) -> Result<ConfQueryResponse, ControlError> {
        match self.partition_status(req.partition_id).await? {
            Some(st) => Ok(ConfQueryResponse {
                voters: st.voters,
                applied_index: st.applied_index,
                commit_index: st.commit_index,
            }),
            None => Err(ControlError::NotHosted {
                partition: req.partition_id,
                node: None,
            }),
        }
    }
}

/// Steps shared by the Node and peer services.
impl Api {
    /// Proposes adding (`AddNode`, with the raft address as context) or
    /// removing `node` in partition `pid` on the local replica, unless the
    /// configuration already says so, and waits for it to apply here.
    async fn change_membership(
        &self,
        pid: u32,
        node: u64,
        change: ConfChangeType,
        context: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<(), ControlError> {
        let rx = self
            .node
            .shards
            .request_owner(pid, |reply| ShardMsg::ChangeMembership {
                partition: pid,
                node,
                change,
                context,
                reply,
            })
            .await?;
        match with_deadline(super::api::answer_by(deadline), rx).await {
            Some(Ok(Ok(_))) => Ok(()),
            Some(Ok(Err(e))) => Err(Status::from(e).into()),
            Some(Err(_)) => Err(ControlError::Stopped),
            None => Err(ControlError::TimedOut(format!(
                "{change:?} of node {node} in partition {pid} did not commit before the deadline"
            ))),
        }
    }

    /// Polls `cond` every [`POLL`] until it holds or the deadline passes.
    async fn wait_for<F, Fut, E>(
        &self,
        deadline: Option<Instant>,
        what: &str,
        mut cond: F,
    ) -> Result<(), ControlError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool, E>>,
        ControlError: From<E>,
    {
        let until = super::api::answer_by(deadline);
        loop {
            // A step that talks to other nodes is cut short at the deadline.
            if with_deadline(until, cond()).await.transpose()? == Some(true) {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(ControlError::TimedOut(format!(
                    "timed out waiting for {what}"
                )));
            }
            glommio::timer::sleep(POLL.min(until.saturating_duration_since(Instant::now()))).await;
        }
    }

    fn update_meta(&self, f: impl FnOnce(&mut NodeMeta)) -> Result<(), ControlError> {
        self.node.update_meta(f).map_err(ControlError::Storage)
    }
}

/// One address per node across the layout; a node listed with two
/// different addresses is a mistake in the request.
fn address_book(layout: &BTreeMap<u32, Members>) -> Result<BTreeMap<u64, String>, ControlError> {
    let mut book = BTreeMap::new();
    for (p, members) in layout {
        for (n, a) in members {
            if let Some(prev) = book.insert(*n, a.clone()) {
                if &prev != a {
                    return Err(ControlError::Invalid(format!(
                        "partitions: member {n} has two addresses ({prev:?} and {a:?}, partition {p})"
                    )));
                }
            }
        }
    }
    Ok(book)
}

fn describe(layout: &BTreeMap<u32, Members>) -> String {
    let parts: Vec<String> = layout
        .iter()
        .take(4)
        .map(|(p, m)| format!("{p}:{:?}", m.keys().collect::<Vec<_>>()))
        .collect();
    let more = if layout.len() > 4 { ", ..." } else { "" };
    format!("[{}{more}]", parts.join(", "))
}
