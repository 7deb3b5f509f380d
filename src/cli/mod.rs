//! Operator commands: thin gRPC clients for the Node and Admin services,
//! the data commands (`data`), the local cluster used by `cluster` and
//! `bench` (`cluster`), the node launcher it shares with the integration
//! tests (`launch`), and the allocator's settings (`alloc`).

pub mod alloc;
pub mod bench;
pub mod cluster;
pub mod data;
pub mod launch;
pub mod log;
pub mod tls_flags;

use std::collections::HashMap;
use std::time::Duration;

use crate::grpc::{Client, Status};
use crate::node::api::{ADMIN_STATUS, NODE_BOOTSTRAP, NODE_JOIN, NODE_LEAVE};
use crate::proto::admin::{Role, StatusRequest, StatusResponse};
use crate::proto::node::{BootstrapRequest, JoinRequest, LeaveRequest, PartitionConfig};

/// Parses "1=host:port,2=host:port".
pub fn parse_members(s: &str) -> Result<HashMap<u64, String>, String> {
    let mut out = HashMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("member {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("member id {id:?} is not a number"))?;
        out.insert(id, addr.trim().to_string());
    }
    if out.is_empty() {
        return Err("--members is empty".into());
    }
    Ok(out)
}

pub async fn bootstrap(
    addr: &str,
    partitions: u32,
    members: HashMap<u64, String>,
    timeout: Duration,
) -> Result<(), Status> {
    let req = BootstrapRequest {
        partitions: (1..=partitions)
            .map(|p| PartitionConfig {
                partition_id: p,
                members: members.clone(),
            })
            .collect(),
    };
    let c = Client::connect(addr).await?;
    let _: crate::proto::node::BootstrapResponse =
        c.call(NODE_BOOTSTRAP, &req, Some(timeout)).await?;
    Ok(())
}

pub async fn join(
    addr: &str,
    partition: u32,
    members: HashMap<u64, String>,
    timeout: Duration,
) -> Result<(), Status> {
    let req = JoinRequest {
        partition: Some(PartitionConfig {
            partition_id: partition,
            members,
        }),
    };
    let c = Client::connect(addr).await?;
    let _: crate::proto::node::JoinResponse = c.call(NODE_JOIN, &req, Some(timeout)).await?;
    Ok(())
}

pub async fn leave(addr: &str, partition: u32, timeout: Duration) -> Result<(), Status> {
    let c = Client::connect(addr).await?;
    let _: crate::proto::node::LeaveResponse = c
        .call(
            NODE_LEAVE,
            &LeaveRequest {
                partition_id: partition,
            },
            Some(timeout),
        )
        .await?;
    Ok(())
}

pub async fn status(addr: &str, timeout: Duration) -> Result<StatusResponse, Status> {
    let c = Client::connect(addr).await?;
    c.call(ADMIN_STATUS, &StatusRequest {}, Some(timeout)).await
}

pub fn role_name(role: i32) -> &'static str {
    Role::try_from(role)
        .map(|r| r.as_str_name())
        .unwrap_or("ROLE_UNKNOWN")
}

/// StatusResponse as proto3 JSON (camelCase names, enums by name).
pub fn status_json(s: &StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "nodeId": s.node_id,
        "bootstrapped": s.bootstrapped,
        "shards": s.shards,
        "apiAddr": s.api_addr,
        "raftAddr": s.raft_addr,
        "shardStats": s.shard_stats.iter().map(|w| serde_json::json!({
            "shard": w.shard,
            "walSyncs": w.wal_syncs,
            "walEntries": w.wal_entries,
            "walBytes": w.wal_bytes,
            "syncP50Us": w.sync_p50_us,
            "syncP99Us": w.sync_p99_us,
            "syncMaxUs": w.sync_max_us,
            "commandsApplied": w.commands_applied,
            "walSegments": w.wal_segments,
            "logMemoryBytes": w.log_memory_bytes,
        })).collect::<Vec<_>>(),
        "partitions": s.partitions.iter().map(|p| serde_json::json!({
            "partitionId": p.partition_id,
            "shard": p.shard,
            "role": role_name(p.role),
            "leaderId": p.leader_id,
            "term": p.term,
            "commitIndex": p.commit_index,
            "appliedIndex": p.applied_index,
            "voters": p.voters,
            "snapshotIndex": p.snapshot_index,
            "quiescent": p.quiescent,
        })).collect::<Vec<_>>(),
    })
}

/// StatusResponse as a table for people.
pub fn status_table(s: &StatusResponse) -> String {
    let mut out = format!(
        "node {} (api {}, raft {}, {} shards, {})\n",
        s.node_id,
        s.api_addr,
        s.raft_addr,
        s.shards,
        if s.bootstrapped {
            "bootstrapped"
        } else {
            "not bootstrapped"
        }
    );
    for w in &s.shard_stats {
        out.push_str(&format!(
            "shard {}: {} WAL syncs, {} entries, {} commands applied, sync p50 {} us p99 {} us max {} us, {} segments, {} KiB of log in memory\n",
            w.shard,
            w.wal_syncs,
            w.wal_entries,
            w.commands_applied,
            w.sync_p50_us,
            w.sync_p99_us,
            w.sync_max_us,
            w.wal_segments,
            w.log_memory_bytes >> 10
        ));
    }
    out.push_str(
        "PARTITION SHARD ROLE         LEADER TERM   COMMIT     APPLIED    SNAPSHOT   QUIET VOTERS\n",
    );
    for p in &s.partitions {
        out.push_str(&format!(
            "{:<9} {:<5} {:<12} {:<6} {:<6} {:<10} {:<10} {:<10} {:<5} {:?}\n",
            p.partition_id,
            p.shard,
            role_name(p.role).trim_start_matches("ROLE_"),
            p.leader_id,
            p.term,
            p.commit_index,
            p.applied_index,
            p.snapshot_index,
            if p.quiescent { "yes" } else { "no" },
            p.voters
        ));
    }
    out
}
