//! The per-shard write-ahead log.
//!
//! CONTRACT (the raft layer relies on exactly these items).

use std::collections::BTreeMap;
use std::path::PathBuf;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no space left on device writing {path}")]
    NoSpace { path: PathBuf },
    #[error("corruption in {path} at byte offset {offset}: {reason}")]
    Corruption {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

/// Tunables.
#[derive(Clone, Debug)]
pub struct WalConfig {
    /// Size of one preallocated, pre-zeroed segment file.
    pub segment_size: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_size: 64 << 20,
        }
    }
}

/// What recovery rebuilt for one raft group.
#[derive(Debug, Default)]
pub struct GroupState {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Latest snapshot (metadata and data), if any.
    pub snapshot: Option<Snapshot>,
    /// Entries after the snapshot index, contiguous, in index order.
    pub entries: Vec<Entry>,
}

/// Everything replayed at open.
#[derive(Debug, Default)]
pub struct Recovered {
    pub groups: BTreeMap<u64, GroupState>,
}

/// One shard's log. Lives on the shard's executor (not `Send`).
pub struct Wal {}

impl Wal {
    /// Opens (creating if needed) the log in `dir` and replays it.
    pub async fn open(_dir: PathBuf, _config: WalConfig) -> Result<(Wal, Recovered), WalError> {
        todo!()
    }

    /// Buffers entries of `group`. Previously written entries of the group
    /// with index >= `entries[0].index` are superseded (raft conflict).
    pub fn append_entries(&mut self, _group: u64, _entries: &[Entry]) {
        todo!()
    }

    /// Buffers the group's new hard state.
    pub fn set_hard_state(&mut self, _group: u64, _hs: &HardState) {
        todo!()
    }

    /// Buffers the group's new conf state.
    pub fn set_conf_state(&mut self, _group: u64, _cs: &ConfState) {
        todo!()
    }

    /// Writes the snapshot's data durably (its own file) and buffers its
    /// metadata; entries up to the snapshot index are dropped for the group.
    pub async fn save_snapshot(&mut self, _group: u64, _snap: &Snapshot) -> Result<(), WalError> {
        todo!()
    }

    /// Entries of `group` up to `index` are no longer needed.
    pub fn compact(&mut self, _group: u64, _index: u64) {
        todo!()
    }

    /// The group is gone (its replica left): forget it, drop its files.
    pub fn remove_group(&mut self, _group: u64) {
        todo!()
    }

    /// Writes everything buffered in one append and one fdatasync.
    pub async fn sync(&mut self) -> Result<(), WalError> {
        todo!()
    }

    /// Deletes segments no group needs any more.
    pub async fn purge(&mut self) -> Result<(), WalError> {
        todo!()
    }
}
