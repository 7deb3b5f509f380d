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
