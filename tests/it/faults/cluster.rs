//! The fault tests' cluster: four nodes in their own network namespaces,
//! nodes 1–3 members of every partition and node 4 only a forwarder, with
//! the status probes the nemeses and the recovery check need.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tonic::transport::{Channel, Endpoint};

use super::{
    API_PORT, CALL_BACKSTOP, CALL_DEADLINE, MEMBERS, NODES, PARTITIONS, RAFT_PORT,
    RECOVERY_TIMEOUT, SHARDS,
};
use crate::netns::Net;
use crate::pb::multiraft::admin::v1::admin_client::AdminClient;
use crate::pb::multiraft::admin::v1::{Role, StatusRequest};
use crate::pb::multiraft::kv::v1::kv_client::KvClient;
use crate::pb::multiraft::kv::v1::PutRequest;
use crate::support::*;

/// The four namespaced nodes and their network.
pub(super) struct FaultCluster {
    // Field order matters: the nodes are killed before the namespaces go.
    pub(super) cluster: Cluster,
    pub(super) net: Net,
    /// Lazily connecting channels to each node's API, index `id - 1`,
    /// shared by the clients (and reconnecting after a node restarts).
    pub(super) channels: Vec<Channel>,
}

impl FaultCluster {
    /// Starts and bootstraps the cluster, or returns `None` (after saying
    /// so) when this machine cannot create network namespaces.
    pub(super) async fn start(tls: bool) -> Option<FaultCluster> {
        let net = match Net::create(NODES.len() as u64) {
            Ok(net) => net,
            Err(why) => {
                eprintln!("skipped: needs root and network namespaces ({why})");
                return None;
            }
        };
        let dir = test_dir();
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, FAST_CONFIG).expect("write config");
        let certs = tls.then(|| crate::tls::make_certs(&dir.path().join("certs"), &NODES));
        let mut nodes = Vec::new();
        for id in NODES {
            let mut node = Node::new(dir.path(), id, SHARDS, Some(config_path.clone()));
            if let Some(certs) = &certs {
                node.extra_args = crate::tls::peer_tls_args(certs, id);
            }
            node.api_addr = SocketAddr::new(net.ip(id).into(), API_PORT);
            node.raft_addr = SocketAddr::new(net.ip(id).into(), RAFT_PORT);
            node.exec_prefix = net.exec_prefix(id);
            nodes.push(node);
        }
        // Declared after `net`, so dropped (nodes killed) before it on panic.
        let mut cluster = Cluster {
            nodes,
            shards: SHARDS,
            config_path: Some(PathBuf::from(&config_path)),
            dir,
        };
        for node in &mut cluster.nodes {
            node.start();
        }
        for node in &mut cluster.nodes {
            node.wait_ready().await;
        }
        let layout: Vec<_> = PARTITIONS
            .iter()
            .map(|&p| cluster.partition(p, &MEMBERS))
            .collect();
        // Node 4 gets the layout too: it learns the members it forwards to.
        cluster.bootstrap_nodes(&NODES, &layout).await;
        for p in PARTITIONS {
            cluster.wait_leader(p, Duration::from_secs(20)).await;
        }
        let channels = NODES
            .iter()
            .map(|&id| {
                Endpoint::from_shared(format!("http://{}", cluster.node(id).api_addr))
                    .expect("endpoint uri")
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .timeout(CALL_BACKSTOP)
                    .connect_lazy()
            })
            .collect();
        Some(FaultCluster {
            cluster,
            net,
            channels,
        })
    }

    /// Restarts every node whose process exited on its own (the nemeses
    /// stop and kill nodes, but always bring them back) and says which.
    pub(super) async fn restart_exited(&mut self) -> Vec<String> {
        let mut exited = Vec::new();
        for node in &mut self.cluster.nodes {
            if let Some(status) = node.try_exit() {
                exited.push(format!(
                    "node {} exited ({status}); log tail:\n{}",
                    node.id,
                    node.log_tail(40)
                ));
                node.restart().await;
            }
        }
        exited
    }

    fn kv(&self, id: u64) -> KvClient<Channel> {
        KvClient::new(self.channels[(id - 1) as usize].clone())
    }

    /// The node that claims leadership of `partition` at the highest term,
    /// asking every running member (briefly: some may be cut off).
    async fn leader_of(&self, partition: u32) -> Option<u64> {
        let asks = MEMBERS
            .iter()
            .filter(|&&id| self.cluster.node(id).is_running())
            .map(|&id| {
                let mut admin = AdminClient::new(self.channels[(id - 1) as usize].clone());
                async move {
                    let r = tokio::time::timeout(
                        Duration::from_secs(2),
                        admin.status(req(StatusRequest {}, Duration::from_secs(1))),
                    )
                    .await;
                    let s = r.ok()?.ok()?.into_inner();
                    let p = find_partition(&s, partition)?;
                    (p.role == Role::Leader as i32).then_some((p.term, id))
                }
            });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .max()
            .map(|(_, id)| id)
    }

    /// A leader to hurt: the leader of a random partition, or a random
    /// member when that partition has none. Returns it and a description.
    pub(super) async fn pick_leader(&self, rng: &mut StdRng) -> (u64, String) {
        let p = *PARTITIONS.choose(rng).unwrap();
        match self.leader_of(p).await {
            Some(id) => (id, format!("node {id} (leader of partition {p})")),
            None => {
                let id = *MEMBERS.choose(rng).unwrap();
                (
                    id,
                    format!("node {id} (partition {p} has no leader; chosen at random)"),
                )
            }
        }
    }

    /// Waits until every partition has an agreed leader and a write to
    /// every partition through every node succeeds. Returns how long that
    /// took, or what was still wrong at the deadline.
    pub(super) async fn recover(&self, round: u64) -> Result<Duration, String> {
        let started = Instant::now();
        let deadline = started + RECOVERY_TIMEOUT;
        let mut written = std::collections::BTreeSet::new();
        loop {
            let last = match self.recovery_probe(round, &mut written).await {
                Ok(()) => return Ok(started.elapsed()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "after {RECOVERY_TIMEOUT:?}: {last}; writes done (node, partition): {written:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn recovery_probe(
        &self,
        round: u64,
        written: &mut std::collections::BTreeSet<(u64, u32)>,
    ) -> Result<(), String> {
        let statuses = tokio::time::timeout(Duration::from_secs(10), self.cluster.statuses())
            .await
            .map_err(|_| "Admin/Status did not answer within 10s".to_string())??;
        for p in PARTITIONS {
            agreed_leader(&statuses, p).map_err(|e| format!("partition {p}: {e}"))?;
        }
        for id in NODES {
            for p in PARTITIONS {
                if written.contains(&(id, p)) {
                    continue;
                }
                // Keys outside the round's checked key set.
                let request = PutRequest {
                    key: format!("recovery-{round}-n{id}").into_bytes(),
                    value: b"ok".to_vec(),
                    partition_id: p,
                };
                let mut kv = self.kv(id);
                match tokio::time::timeout(CALL_BACKSTOP, kv.put(req(request, CALL_DEADLINE))).await
                {
                    Ok(Ok(_)) => {
                        written.insert((id, p));
                    }
                    Ok(Err(s)) => {
                        return Err(format!(
                            "Put to partition {p} through node {id}: {:?} {}",
                            s.code(),
                            s.message()
                        ))
                    }
                    Err(_) => {
                        return Err(format!(
                            "Put to partition {p} through node {id}: no answer in {CALL_BACKSTOP:?}"
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}
