//! Node-wide state every core can see.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::NodeConfig;
use crate::meta::NodeMeta;
use crate::shard::{Host, Shards};

/// Node-wide state: the configuration, the shards' inboxes, the control
/// plane's metadata and peer liveness. Read-only except for the control
/// plane (Bootstrap/Join/Leave), pings, and addresses shards learn.
pub struct NodeShared {
    pub config: NodeConfig,
    pub shards: Shards,
    /// Control-plane metadata. Locked briefly by Bootstrap/Join/Leave and
    /// by calls that need the layout, and when a shard learns a peer's
    /// address from an applied conf change (rare); never per message.
    meta: Mutex<NodeMeta>,
    /// Serialises Bootstrap, Join and Leave across cores.
    pub control: futures::lock::Mutex<()>,
    /// Bumped on every change of `meta`, so that cores can keep a private
    /// copy for the data path and check it with one atomic load instead of
    /// taking the lock on every call.
    pub meta_version: AtomicU64,
    /// Set when the node starts to stop (health and `/health` report it).
    pub stopping: AtomicBool,
    /// When each peer node's last ping arrived (node-level liveness for
    /// quiescent groups; see `raft::group::quiet`).
    heard: Mutex<HashMap<u64, Instant>>,
}

impl NodeShared {
    pub fn new(config: NodeConfig, shards: Shards, meta: NodeMeta) -> NodeShared {
        NodeShared {
            config,
            shards,
            meta: Mutex::new(meta),
            control: futures::lock::Mutex::new(()),
            meta_version: Default::default(),
            stopping: Default::default(),
            heard: Default::default(),
        }
    }

    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    /// A ping from `node` arrived.
    pub fn heard_from(&self, node: u64) {
        let now = Instant::now();
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node, now);
    }

    /// Changes the metadata atomically: applies `f` to a copy, stores the
    /// copy durably, then publishes it; all under the lock, so concurrent
    /// updates from the control plane and from shards never lose each
    /// other's changes. On a storage error nothing changes.
    pub fn update_meta<T>(&self, f: impl FnOnce(&mut NodeMeta) -> T) -> std::io::Result<T> {
        let mut guard = self.meta();
        let mut next = guard.clone();
        let out = f(&mut next);
        if next != *guard {
            next.store(&self.config.data_dir)?;
            *guard = next;
            self.meta_version.fetch_add(1, Ordering::Release);
        }
        Ok(out)
    }

    pub fn meta(&self) -> std::sync::MutexGuard<'_, NodeMeta> {
        // A poisoned lock means a panic in a control-plane section that
        // only replaces whole values; the data is still consistent.
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Host for NodeShared {
    fn config(&self) -> &NodeConfig {
        &self.config
    }

    fn shards(&self) -> &Shards {
        &self.shards
    }

    fn alive_within(&self, within: Duration) -> HashSet<u64> {
        let now = Instant::now();
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, t)| now.duration_since(**t) < within)
            .map(|(n, _)| *n)
            .collect()
    }

    fn store_address(&self, node: u64, addr: &str) -> std::io::Result<bool> {
        self.update_meta(|m| m.addresses.insert(node, addr.to_string()).as_deref() != Some(addr))
    }
}
