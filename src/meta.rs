//! The node's own metadata: identity, the bootstrapped layout, which
//! partitions it hosts, and the raft address book.
//!
//! Stored as JSON in `DATA_DIR/node.json`, replaced atomically (write a
//! temporary file, fsync it, rename it over the old one, fsync the
//! directory), so a crash leaves either the old or the new version.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::proto::node::PartitionConfig;

/// Members of one partition: node id -> raft address.
pub type Members = BTreeMap<u64, String>;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeMeta {
    pub node_id: u64,
    /// Shard count the data directory was laid out with.
    pub shards: usize,
    /// The layout as given to Bootstrap (compared on later Bootstraps).
    pub bootstrap: Option<BTreeMap<u32, Members>>,
    /// Partitions with a local replica.
    pub hosted: BTreeSet<u32>,
    /// Last known members of every partition (for forwarding calls).
    pub members: BTreeMap<u32, Members>,
    /// Raft address of every node we know.
    pub addresses: BTreeMap<u64, String>,
    /// Grows with every start of the process (see `kv::session`): the
    /// sessions that name an older incarnation are retired for good.
    #[serde(default)]
    pub incarnation: u64,
}

impl NodeMeta {
    /// The incarnation of a process starting now: above every earlier one
    /// recorded here, and (through the clock) above the ones of a data
    /// directory that was wiped.
    pub fn next_incarnation(&self) -> u64 {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        (self.incarnation + 1).max(now_ms)
    }
}

/// Why the stored metadata could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl NodeMeta {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("node.json")
    }

    /// Loads the metadata, or `None` for a fresh data directory.
    pub fn load(data_dir: &Path) -> Result<Option<NodeMeta>, LoadError> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| LoadError::Parse { path, source: e }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LoadError::Read { path, source: e }),
        }
    }

    /// Durably replaces the stored metadata.
    pub fn store(&self, data_dir: &Path) -> std::io::Result<()> {
        let path = Self::path(data_dir);
        let tmp = data_dir.join("node.json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    }

    pub fn bootstrapped(&self) -> bool {
        self.bootstrap.is_some()
    }

    /// Partition for `partition_id = 0` calls: the partitions of the
    /// bootstrapped layout sorted by id, indexed by crc32c(key) modulo their
    /// count. Identical on every node because the layout is.
    pub fn partition_for_key(&self, key: &[u8]) -> Option<u32> {
        let layout = self.bootstrap.as_ref()?;
        if layout.is_empty() {
            return None;
        }
        let ids: Vec<u32> = layout.keys().copied().collect();
        Some(ids[crc32c::crc32c(key) as usize % ids.len()])
    }
}

/// Checks a "host:port" raft address without resolving it (a handler must
/// not block on DNS).
pub fn check_address(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

/// Most partitions one layout may name: the node keeps the whole layout in
/// memory and in `node.json`, and a replica costs memory and a WAL share.
pub const MAX_LAYOUT_PARTITIONS: usize = 65_536;
/// Most members one partition may list (raft groups are a handful of
/// voters; each member is a peer every replica talks to).
pub const MAX_MEMBERS: usize = 64;

/// A Bootstrap layout or a partition config that cannot be used: which
/// field and why (the caller's mistake: INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LayoutError(String);

/// Validates one partition config; `field` names it in messages
/// (e.g. `partitions[2]`).
pub fn validate_partition(p: &PartitionConfig, field: &str) -> Result<Members, LayoutError> {
    if p.members.len() > MAX_MEMBERS {
        return Err(LayoutError(format!(
            "{field}.members lists {} nodes; the limit is {MAX_MEMBERS} (partition {})",
            p.members.len(),
            p.partition_id
        )));
    }
    if p.partition_id == 0 {
        return Err(LayoutError(format!(
            "{field}.partition_id must be non-zero"
        )));
    }
    if p.members.is_empty() {
        return Err(LayoutError(format!(
            "{field}.members must not be empty (partition {})",
            p.partition_id
        )));
    }
    let mut out = Members::new();
    for (id, addr) in &p.members {
        if *id == 0 {
            return Err(LayoutError(format!(
                "{field}.members: member id must be non-zero (partition {})",
                p.partition_id
            )));
        }
        if !check_address(addr) {
            return Err(LayoutError(format!(
                "{field}.members[{id}]: address {addr:?} is not host:port (partition {})",
                p.partition_id
            )));
        }
        out.insert(*id, addr.clone());
    }
    Ok(out)
}

/// Validates a Bootstrap layout.
pub fn validate_layout(
    partitions: &[PartitionConfig],
) -> Result<BTreeMap<u32, Members>, LayoutError> {
    if partitions.is_empty() {
        return Err(LayoutError("partitions must not be empty".into()));
    }
    if partitions.len() > MAX_LAYOUT_PARTITIONS {
        return Err(LayoutError(format!(
            "partitions lists {} partitions; the limit is {MAX_LAYOUT_PARTITIONS}",
            partitions.len()
        )));
    }
    let mut layout = BTreeMap::new();
    for (i, p) in partitions.iter().enumerate() {
        let members = validate_partition(p, &format!("partitions[{i}]"))?;
        if layout.insert(p.partition_id, members).is_some() {
            return Err(LayoutError(format!(
                "partitions[{i}].partition_id {} is a duplicate",
                p.partition_id
            )));
        }
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pc(id: u32, members: &[(u64, &str)]) -> PartitionConfig {
        PartitionConfig {
            partition_id: id,
            members: members.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        }
    }

    #[test]
    fn validation_names_the_field() {
        let ok = [(1, "127.0.0.1:7001"), (2, "node-b:7002")];
        assert!(validate_layout(&[pc(1, &ok), pc(2, &ok)]).is_ok());
        let cases: Vec<(Vec<PartitionConfig>, &str)> = vec![
            (vec![], "partitions must not be empty"),
            (vec![pc(0, &ok)], "partitions[0].partition_id"),
            (vec![pc(1, &[])], "partitions[0].members must not be empty"),
            (vec![pc(1, &[(0, "a:1")])], "member id must be non-zero"),
            (vec![pc(1, &[(1, "not-an-address")])], "is not host:port"),
            (vec![pc(1, &[(1, "a:0")])], "is not host:port"),
            (
                vec![PartitionConfig {
                    partition_id: 1,
                    members: (1..=MAX_MEMBERS as u64 + 1)
                        .map(|n| (n, format!("h{n}:1")))
                        .collect(),
                }],
                "the limit is 64",
            ),
            (
                (1..=MAX_LAYOUT_PARTITIONS as u32 + 1)
                    .map(|p| pc(p, &ok))
                    .collect(),
                "the limit is 65536",
            ),
            (
                vec![pc(1, &ok), pc(1, &ok)],
                "partitions[1].partition_id 1 is a duplicate",
            ),
        ];
        for (layout, want) in cases {
            let err = validate_layout(&layout).unwrap_err();
            assert!(err.to_string().contains(want), "{err} !~ {want}");
        }
    }

    #[test]
    fn key_hash_is_stable_and_covers_layout() {
        let mut m = NodeMeta::default();
        assert_eq!(m.partition_for_key(b"k"), None);
        m.bootstrap = Some((1..=8).map(|p| (p, Members::new())).collect());
        let p = m.partition_for_key(b"hello").unwrap();
        assert_eq!(p, m.partition_for_key(b"hello").unwrap());
        assert_eq!(p, (crc32c::crc32c(b"hello") % 8 + 1));
    }

    #[test]
    fn store_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NodeMeta::load(dir.path()).unwrap(), None);
        let mut m = NodeMeta {
            node_id: 3,
            shards: 2,
            ..Default::default()
        };
        m.hosted.insert(4);
        m.addresses.insert(1, "127.0.0.1:1".into());
        m.store(dir.path()).unwrap();
        assert_eq!(NodeMeta::load(dir.path()).unwrap(), Some(m));
    }
}
