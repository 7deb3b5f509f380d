//! Why a node could not start. Each message names what failed and where;
//! `multiraft serve` prints it and exits with status 1.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting that cannot work (`--node-id 0`, too many shards…).
    #[error("{0}")]
    Invalid(&'static str),
    /// A file operation failed; `what` names the operation and the path.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Another live process holds the data directory.
    #[error("data directory {} is in use by another multiraft process (pid {pid})", dir.display())]
    Locked { dir: PathBuf, pid: String },
    /// Another process listens on one of this node's addresses.
    #[error("{what} address {addr} is not available (another process listens on it?): {source}")]
    AddressInUse {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The data directory was laid out for another node or shard count.
    #[error("{}", .0)]
    Mismatch(String),
    /// The node metadata file could not be read or does not parse.
    #[error("{0}")]
    Meta(#[from] crate::meta::LoadError),
    /// A shard's write-ahead log could not be opened or replayed.
    #[error("shard {shard}: {source}")]
    Wal {
        shard: usize,
        source: crate::wal::WalError,
    },
    /// A replica could not be rebuilt from what the log recovered.
    #[error("shard {shard}: {source}")]
    Group {
        shard: usize,
        source: crate::raft::GroupError,
    },
    /// A shard could not bind its listener.
    #[error("shard {shard}: bind {what} address {addr}: {source}")]
    Bind {
        shard: usize,
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A shard thread could not be started or ended without a word.
    #[error("a shard could not start: {reason}{hint}", hint = super::memlock_hint())]
    ShardThread { reason: String },
}

impl StartError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
        let what = what.into();
        move |source| StartError::Io { what, source }
    }
}

/// Why a Bootstrap, Join or Leave, or a peer's step of one (AddVoter,
/// RemoveVoter, ConfQuery), was refused or did not finish. Each kind is
/// one gRPC status code (`impl From<ControlError> for Status`).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request is malformed (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// The layout or partition config in it is (INVALID_ARGUMENT).
    #[error(transparent)]
    Layout(#[from] crate::meta::LayoutError),
    /// A second Bootstrap with another layout (FAILED_PRECONDITION).
    #[error("{0}")]
    LayoutConflict(String),
    /// Join or Leave before Bootstrap (FAILED_PRECONDITION).
    #[error("node is not bootstrapped; call Bootstrap first")]
    NotBootstrapped,
    /// The partition has no replica on this node (NOT_FOUND).
    #[error("partition {partition} is not hosted {}", match node {
        Some(n) => format!("on node {n}"),
        None => "here".to_string(),
    })]
    NotHosted { partition: u32, node: Option<u64> },
    /// Leaving would leave the partition without voters
    /// (FAILED_PRECONDITION).
    #[error("node {node} is the last voter of partition {partition}; it cannot leave")]
    LastVoter { node: u64, partition: u32 },
    /// The replica went away while the change was waiting (UNAVAILABLE).
    #[error("partition stopped")]
    Stopped,
    /// The deadline passed first (DEADLINE_EXCEEDED).
    #[error("{0}")]
    TimedOut(String),
    /// The node metadata could not be stored (INTERNAL).
    #[error("storing node metadata: {0}")]
    Storage(std::io::Error),
    /// A call to a shard or a peer that a step made failed so.
    #[error("{}", .0.message)]
    Call(crate::grpc::Status),
}

impl From<crate::grpc::Status> for ControlError {
    fn from(s: crate::grpc::Status) -> ControlError {
        ControlError::Call(s)
    }
}

impl From<ControlError> for crate::grpc::Status {
    fn from(e: ControlError) -> crate::grpc::Status {
        use crate::grpc::Status;
        let message = e.to_string();
        match e {
            ControlError::Invalid(_) | ControlError::Layout(_) => Status::invalid_argument(message),
            ControlError::LayoutConflict(_)
            | ControlError::NotBootstrapped
            | ControlError::LastVoter { .. } => Status::failed_precondition(message),
            ControlError::NotHosted { .. } => Status::not_found(message),
            ControlError::Stopped => Status::unavailable(message),
            ControlError::TimedOut(_) => Status::deadline_exceeded(message),
            ControlError::Storage(_) => Status::internal(message),
            ControlError::Call(s) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::{Code, Status};

    #[test]
    fn every_control_error_is_one_grpc_status() {
        let table = [
            (
                ControlError::Invalid("bad".into()),
                Code::InvalidArgument,
                "bad",
            ),
            (
                ControlError::LayoutConflict("other layout".into()),
                Code::FailedPrecondition,
                "other layout",
            ),
            (
                ControlError::NotBootstrapped,
                Code::FailedPrecondition,
                "node is not bootstrapped; call Bootstrap first",
            ),
            (
                ControlError::NotHosted {
                    partition: 3,
                    node: Some(2),
                },
                Code::NotFound,
                "partition 3 is not hosted on node 2",
            ),
            (
                ControlError::NotHosted {
                    partition: 3,
                    node: None,
                },
                Code::NotFound,
                "partition 3 is not hosted here",
            ),
            (
                ControlError::LastVoter {
                    node: 1,
                    partition: 4,
                },
                Code::FailedPrecondition,
                "node 1 is the last voter of partition 4; it cannot leave",
            ),
            (
                ControlError::Stopped,
                Code::Unavailable,
                "partition stopped",
            ),
            (
                ControlError::TimedOut("late".into()),
                Code::DeadlineExceeded,
                "late",
            ),
            (
                ControlError::Storage(std::io::Error::other("disk")),
                Code::Internal,
                "storing node metadata: disk",
            ),
            (
                ControlError::Call(Status::resource_exhausted("busy")),
                Code::ResourceExhausted,
                "busy",
            ),
        ];
        for (e, code, message) in table {
            let shown = format!("{e:?}");
            let s = Status::from(e);
            assert_eq!((s.code, s.message.as_str()), (code, message), "{shown}");
        }
    }
}
