//! What a shard serves: the typed requests of its inbox ([`ShardMsg`]),
//! how they are answered ([`Answer`], and a group's `raft::CallError` as a
//! gRPC status), and the admin view of a replica.

use bytes::Bytes;
use futures::channel::oneshot;
use raft::eraftpb::{ConfChangeType, ConfState};
use std::sync::Arc;

use crate::grpc::Status;
use crate::kv::command::Command;
use crate::kv::watch::{Ending, Event, Filter};
use crate::proto::admin::PartitionStatus;
use crate::proto::peer::PeerResponse;
use crate::raft::{CallError, GroupInit, ReadResult, Reply, WriteResult};

/// A replica's state as the admin API reports it.
pub(super) fn partition_status(g: crate::raft::GroupStatus, shard: u32) -> PartitionStatus {
    use crate::proto::admin::Role;
    let role = match g.role {
        raft::StateRole::Follower => Role::Follower,
        raft::StateRole::Candidate => Role::Candidate,
        raft::StateRole::PreCandidate => Role::PreCandidate,
        raft::StateRole::Leader => Role::Leader,
    };
    PartitionStatus {
        partition_id: g.partition,
        shard,
        role: role as i32,
        leader_id: g.leader,
        term: g.term,
        commit_index: g.commit,
        applied_index: g.applied,
        voters: g.voters,
        snapshot_index: g.snapshot_index,
        quiescent: g.quiescent,
    }
}

/// How a shard answers a request that is not a group's call.
pub type Answer<T> = oneshot::Sender<Result<T, Status>>;

/// A group's call failure as the gRPC status a client gets.
impl From<CallError> for Status {
    fn from(e: CallError) -> Status {
        let message = e.to_string();
        match e {
            CallError::Unavailable(_) => Status::unavailable(message),
            CallError::Busy(_) => Status::resource_exhausted(message),
            CallError::Aborted(_) => Status::aborted(message),
            CallError::Rejected(_) => Status::failed_precondition(message),
            CallError::NotHosted(_) => Status::not_found(message),
        }
    }
}

/// Everything a shard serves: what reaches its inbox. Requests that
/// concern one partition name it, and answer through their `reply` (a
/// partition not hosted here answers NOT_FOUND, except where noted).
pub enum ShardMsg {
    // --- From peers ---
    /// A raft message for one of this shard's partitions (raft-rs
    /// encoding), from the peer connection of node `from`.
    Raft {
        partition: u32,
        from: u64,
        data: Bytes,
    },
    /// A raft message already decoded (a reassembled snapshot).
    RaftMsg {
        partition: u32,
        from: u64,
        msg: Box<raft::eraftpb::Message>,
    },
    /// Coalesced heartbeats, their answers and commit notices from the
    /// peer connection of node `from`: those for this shard's partitions
    /// (see `beats.rs`).
    Beats {
        from: u64,
        beats: Vec<crate::proto::peer::Beat>,
    },
    /// The answer to a call this shard forwarded to another node.
    PeerResponse(PeerResponse),
    /// How sending a snapshot of `partition` to `to` ended (raft-rs
    /// `report_snapshot`).
    SnapshotReport {
        partition: u32,
        to: u64,
        status: raft::SnapshotStatus,
    },
    /// `node`'s raft address, for this shard's peer links.
    PeerAddress { node: u64, addr: String },
    /// A peer connection another shard's listener accepted for this one:
    /// `(from node, socket, bytes already read)`.
    AdoptPeer {
        from: u64,
        fd: std::os::fd::OwnedFd,
        buffered: Vec<u8>,
    },

    // --- Data path ---
    /// Propose a write; answered once it is applied here (or refused).
    Propose {
        partition: u32,
        cmd: Command,
        reply: Reply<WriteResult<crate::kv::Applied>>,
    },
    /// Read a key: linearizable (ReadIndex) or, with `serializable`, from
    /// this replica's state as it is.
    Read {
        partition: u32,
        key: Bytes,
        serializable: bool,
        reply: Reply<ReadResult>,
    },
    /// Register a key watcher (see `kv::watch`).
    Watch {
        filter: Filter,
        start_index: u64,
        tx: futures::channel::mpsc::Sender<Event>,
        ending: Arc<Ending>,
        reply: Answer<()>,
    },
    /// Register a cluster-event watcher; answered with the leaders known
    /// now, from which its events continue.
    WatchCluster {
        tx: futures::channel::mpsc::Sender<crate::proto::admin::ClusterEvent>,
        behind: Arc<std::sync::atomic::AtomicBool>,
        reply: Answer<Vec<(u32, u64, u64)>>,
    },

    // --- Control ---
    /// Create a replica; answered once its initial state is durable (at
    /// once if it exists).
    CreateGroup {
        partition: u32,
        init: GroupInit,
        reply: Answer<()>,
    },
    /// Remove a replica and its state; answered once that is durable.
    RemoveGroup { partition: u32, reply: Answer<()> },
    /// Add (`AddNode`) or remove (`RemoveNode`) a voter, unless the
    /// configuration already says so. Answered at once with a receiver
    /// that is answered when the change applies here.
    ChangeMembership {
        partition: u32,
        node: u64,
        change: ConfChangeType,
        context: Vec<u8>,
        reply: Answer<oneshot::Receiver<Result<ConfState, CallError>>>,
    },
    /// Ask the leader of `partition` here to hand leadership to `to`
    /// (nothing if it is not hosted or does not lead).
    TransferLeader { partition: u32, to: u64 },

    // --- Queries ---
    /// One partition's status, `None` if it is not hosted here.
    PartitionStatus {
        partition: u32,
        reply: Answer<Option<PartitionStatus>>,
    },
    /// Every hosted partition's status and the shard's counters.
    Status {
        reply: Answer<(Vec<PartitionStatus>, crate::proto::admin::ShardStatus)>,
    },
    /// Those of `partitions` that this shard owns and that have no
    /// replica or know no leader (the Bootstrap wait).
    WithoutLeader {
        partitions: Arc<Vec<u32>>,
        reply: Answer<Vec<u32>>,
    },
    /// Hosted partitions that know no leader (`/ready`).
    Leaderless { reply: Answer<Vec<u32>> },
    /// The shard's state for a metrics scrape.
    Metrics {
        reply: Answer<crate::metrics::ShardState>,
    },

    // --- The loop's own ---
    /// Time for a raft tick.
    Tick,
    /// Stop the loop.
    Stop,
}

impl ShardMsg {
    /// The partition whose group this message gives work to, if any.
    pub(super) fn partition(&self) -> Option<u32> {
        match self {
            ShardMsg::Raft { partition, .. }
            | ShardMsg::RaftMsg { partition, .. }
            | ShardMsg::SnapshotReport { partition, .. }
            | ShardMsg::Propose { partition, .. }
            | ShardMsg::Read { partition, .. }
            | ShardMsg::ChangeMembership { partition, .. }
            | ShardMsg::TransferLeader { partition, .. } => Some(*partition),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::Code;

    #[test]
    fn every_call_error_is_one_grpc_status() {
        let table = [
            (CallError::Unavailable("u".into()), Code::Unavailable, "u"),
            (CallError::Busy("b".into()), Code::ResourceExhausted, "b"),
            (CallError::Aborted("a"), Code::Aborted, "a"),
            (
                CallError::Rejected("r".into()),
                Code::FailedPrecondition,
                "r",
            ),
            (
                CallError::NotHosted(7),
                Code::NotFound,
                "partition 7 is not hosted here",
            ),
        ];
        for (e, code, message) in table {
            let s = Status::from(e.clone());
            assert_eq!((s.code, s.message.as_str()), (code, message), "{e:?}");
        }
    }
}
