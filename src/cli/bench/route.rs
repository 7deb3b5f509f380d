//! Sending each call to its partition's leader, as a partition-aware client
//! does (`--route leader`, used when the calls name their partitions).
//!
//! A call that reaches a follower is still served: the follower forwards
//! the proposal to the leader through raft and answers once it applied the
//! write itself. That costs the follower's replica a prompt commit notice
//! and an apply of its own for every call, and with many partitions each
//! carrying a little load it costs about as much as the write itself. So
//! the bench learns where the leaders are and sends each call there:
//!
//! - before the load, `Admin/Status` on every node gives the node's id and
//!   the leader of every partition it hosts (the highest term wins);
//! - during the load, `Admin/Watch` on every node reports leader changes
//!   (leaders move when the cluster evens them out, or fail over);
//! - a worker whose partition's leader is known takes one of the
//!   connections to that node (which one depends on the worker, so the
//!   calls spread over them); otherwise it uses its own connection.
//!
//! The table is a hint: a call sent to a node that is no longer the leader
//! is forwarded like any other call, so a stale entry costs speed, never a
//! wrong answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prost::Message;

use super::*;
use crate::node::api::{ADMIN_STATUS, ADMIN_WATCH};
use crate::proto::admin::{
    cluster_event::Type, ClusterEvent, StatusRequest, StatusResponse, WatchClusterRequest,
};

/// How long the Status calls that fill the table may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Which node leads each loaded partition, and the connections to each node.
pub(super) struct Routes {
    /// Index: partition id (1..=K); 0 when no leader is known.
    leaders: Vec<AtomicU64>,
    /// The term each entry of `leaders` was learned in; older news is
    /// ignored. Only written under this lock (the watchers of all nodes
    /// write), read lock-free through `leaders`.
    terms: Mutex<Vec<u64>>,
    /// (node id, indices into the bench's connections to that node).
    conns: Vec<(u64, Vec<usize>)>,
}

impl Routes {
    /// Asks every node in `addrs` for its id and its partitions' leaders.
    /// Connection `j` of the bench goes to `addrs[j % addrs.len()]`.
    /// Returns the table and one client per node for [`Routes::watch`].
    pub(super) async fn learn(
        addrs: &[String],
        connections: usize,
        partitions: u32,
    ) -> Result<(Arc<Routes>, Vec<Client>), String> {
        let n = partitions as usize + 1;
        let mut routes = Routes {
            leaders: (0..n).map(|_| AtomicU64::new(0)).collect(),
            terms: Mutex::new(vec![0; n]),
            conns: Vec::new(),
        };
        let mut admins = Vec::with_capacity(addrs.len());
        for (i, addr) in addrs.iter().enumerate() {
            let client = Client::connect(addr).await.map_err(|e| e.to_string())?;
            let st: StatusResponse = client
                .call(ADMIN_STATUS, &StatusRequest {}, Some(STATUS_TIMEOUT))
                .await
                .map_err(|e| format!("Status of {addr}: {e}"))?;
            let mine: Vec<usize> = (i..connections).step_by(addrs.len()).collect();
            if !mine.is_empty() {
                routes.conns.push((st.node_id, mine));
            }
            for p in &st.partitions {
                routes.note(p.partition_id, p.leader_id, p.term);
            }
            admins.push(client);
        }
        Ok((Arc::new(routes), admins))
    }

    /// Records that `leader` leads `partition` in `term`, unless a later
    /// term is known already.
    fn note(&self, partition: u32, leader: u64, term: u64) {
        let Some(slot) = self.leaders.get(partition as usize) else {
            return;
        };
        let mut terms = self.terms.lock().unwrap_or_else(|e| e.into_inner());
        let known = &mut terms[partition as usize];
        if leader != 0 && term >= *known {
            *known = term;
            slot.store(leader, Ordering::Relaxed);
        }
    }

    /// The connection worker `worker` uses for a call on `partition`: one
    /// to the partition's leader, if that is known and the bench has a
    /// connection to its node.
    pub(super) fn pick(&self, partition: u32, worker: u32) -> Option<usize> {
        let leader = self
            .leaders
            .get(partition as usize)?
            .load(Ordering::Relaxed);
        let (_, conns) = self.conns.iter().find(|(id, _)| *id == leader)?;
        Some(conns[worker as usize % conns.len()])
    }

    /// Follows the leader changes `client`'s node sees until its stream
    /// ends (or the task is aborted at the end of the load). An error only
    /// ends the updates from that node: the table stays as it was.
    pub(super) async fn watch(self: Arc<Routes>, client: Client) {
        let req = Bytes::from(WatchClusterRequest {}.encode_to_vec());
        let Ok(mut events) = client.server_stream(ADMIN_WATCH, req).await else {
            return;
        };
        while let Some(Ok(m)) = events.next().await {
            let Ok(e) = ClusterEvent::decode(m) else {
                return;
            };
            if e.r#type == Type::LeaderChanged as i32 {
                self.note(e.partition_id, e.node_id, e.term);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(partitions: usize, conns: Vec<(u64, Vec<usize>)>) -> Routes {
        Routes {
            leaders: (0..=partitions).map(|_| AtomicU64::new(0)).collect(),
            terms: Mutex::new(vec![0; partitions + 1]),
            conns,
        }
    }

    #[test]
    fn a_call_goes_to_a_connection_of_the_leaders_node() {
        let r = table(4, vec![(1, vec![0, 3]), (2, vec![1]), (3, vec![2])]);
        assert_eq!(r.pick(1, 0), None, "no leader known yet");
        r.note(1, 1, 5);
        r.note(2, 3, 5);
        assert_eq!(r.pick(1, 0), Some(0));
        assert_eq!(
            r.pick(1, 1),
            Some(3),
            "workers spread over the node's connections"
        );
        assert_eq!(r.pick(2, 7), Some(2));
        assert_eq!(r.pick(9, 0), None, "a partition outside the table");
    }

    #[test]
    fn older_news_does_not_move_a_leader_back() {
        let r = table(2, vec![(1, vec![0]), (2, vec![1])]);
        r.note(1, 2, 7);
        r.note(1, 1, 6);
        assert_eq!(r.pick(1, 0), Some(1), "term 6 is older than term 7");
        r.note(1, 0, 8);
        assert_eq!(r.pick(1, 0), Some(1), "no leader in term 8 says nothing");
        r.note(1, 1, 8);
        assert_eq!(r.pick(1, 0), Some(0));
    }

    #[test]
    fn a_leader_without_a_connection_is_not_picked() {
        let r = table(1, vec![(1, vec![0])]);
        r.note(1, 4, 2);
        assert_eq!(r.pick(1, 0), None);
    }
}
