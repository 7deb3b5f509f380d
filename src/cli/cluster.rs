//! A local cluster of real `multiraft serve` processes on loopback ports:
//! the `cluster` command, and the default target of `bench`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use super::launch::{self, free_port, NotReady, Serve};

/// How long a node may take to answer Status after its start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One node process of a local cluster.
pub struct LocalNode {
    pub id: u64,
    pub api_addr: String,
    pub raft_addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// A set of node processes; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct LocalCluster {
    pub nodes: Vec<LocalNode>,
    pub dir: PathBuf,
    remove_dir: bool,
}

/// Settings of a local cluster.
pub struct ClusterSpec {
    pub nodes: u64,
    pub shards: Option<usize>,
    pub dir: Option<PathBuf>,
    /// 0: pick free ports.
    pub base_port: u16,
    pub config_json: Option<String>,
    /// Where the node processes' logs go: files under the cluster dir.
    pub rust_log: String,
    /// The `multiraft` binary to run; default: this process's executable.
    /// Programs other than `multiraft` itself (benches, tests) must set it.
    pub exe: Option<PathBuf>,
}

impl LocalCluster {
    /// Starts the node processes and waits until each answers Status.
    pub async fn start(spec: &ClusterSpec) -> Result<LocalCluster, String> {
        let (dir, remove_dir) = match &spec.dir {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!("multiraft-cluster-{}", std::process::id())),
                true,
            ),
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let exe = match &spec.exe {
            Some(e) => e.clone(),
            None => {
                std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?
            }
        };
        let config_file = match &spec.config_json {
            Some(j) => {
                let p = dir.join("raft-config.json");
                std::fs::write(&p, j).map_err(|e| format!("write {}: {e}", p.display()))?;
                Some(p)
            }
            None => None,
        };
        let mut cluster = LocalCluster {
            nodes: Vec::new(),
            dir: dir.clone(),
            remove_dir,
        };
        for id in 1..=spec.nodes {
            let (api, raft) = if spec.base_port == 0 {
                (
                    free_port().map_err(|e| e.to_string())?,
                    free_port().map_err(|e| e.to_string())?,
                )
            } else {
                ports(spec.base_port, id)?
            };
            let serve = Serve {
                exe: exe.clone(),
                node_id: id,
                api_addr: format!("127.0.0.1:{api}"),
                raft_addr: format!("127.0.0.1:{raft}"),
                data_dir: dir.join(format!("node-{id}")),
                shards: spec.shards,
                config: config_file.clone(),
                extra_args: Vec::new(),
                exec_prefix: Vec::new(),
                log: dir.join(format!("node-{id}.log")),
                rust_log: spec.rust_log.clone(),
            };
            let child = serve.spawn(1)?;
            cluster.nodes.push(LocalNode {
                id,
                api_addr: serve.api_addr,
                raft_addr: serve.raft_addr,
                data_dir: serve.data_dir,
                log: serve.log,
                child: Some(child),
            });
        }
        for n in &mut cluster.nodes {
            n.wait_ready(READY_TIMEOUT).await?;
        }
        Ok(cluster)
    }

    /// Member map for Bootstrap: every node in every partition.
    pub fn members(&self) -> HashMap<u64, String> {
        self.nodes
            .iter()
            .map(|n| (n.id, n.raft_addr.clone()))
            .collect()
    }

    pub fn api_addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.api_addr.clone()).collect()
    }

    /// Stops every node (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            n.stop();
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The API and raft ports of node `id` from `base`: BASE+id and
/// BASE+100+id, refused when they would pass 65535 (they used to wrap).
fn ports(base: u16, id: u64) -> Result<(u16, u16), String> {
    let api = u64::from(base) + id;
    let raft = api + 100;
    match (u16::try_from(api), u16::try_from(raft)) {
        (Ok(a), Ok(r)) => Ok((a, r)),
        _ => Err(format!(
            "--base-port {base} leaves no room for node {id}: its raft port would be {raft} (ports end at 65535)"
        )),
    }
}

/// The last lines of `path`, for an error message that must stand on its
/// own (the file may be removed with the cluster's temporary directory).
fn log_tail(path: &std::path::Path) -> String {
    match launch::log_tail(path, 10) {
        Ok(tail) if !tail.is_empty() => format!("its log ends:\n{tail}"),
        _ => "(its log is empty)".into(),
    }
}

impl LocalNode {
    async fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let Some(child) = &mut self.child else {
            return Err(format!("node {} is not running", self.id));
        };
        let addr = &self.api_addr;
        let answers_status = async || {
            super::status(addr, Duration::from_secs(1))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        match launch::wait_ready(child, limit, answers_status).await {
            Ok(()) => Ok(()),
            Err(NotReady::Exited(st)) => {
                self.child = None;
                Err(format!(
                    "node {} exited during start-up ({st}); {}",
                    self.id,
                    log_tail(&self.log)
                ))
            }
            Err(NotReady::TimedOut(_)) => Err(format!(
                "node {} did not start within {limit:?}; {}",
                self.id,
                log_tail(&self.log)
            )),
        }
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            launch::stop(child, STOP_GRACE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_never_wrap() {
        assert_eq!(ports(7000, 1).unwrap(), (7001, 7101));
        assert_eq!(ports(65334, 1).unwrap(), (65335, 65435));
        let err = ports(65500, 1).unwrap_err();
        assert!(err.contains("65601"), "{err}");
        assert!(ports(65434, 1).is_ok() && ports(65434, 2).is_err());
    }

    /// The lines themselves are `launch::log_tail`'s (tested there); this
    /// is how a failed start quotes them.
    #[test]
    fn a_failed_start_quotes_the_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.log");
        std::fs::write(&path, "first\nlast\n").unwrap();
        assert_eq!(log_tail(&path), "its log ends:\nfirst\nlast");
        assert_eq!(log_tail(&dir.path().join("absent")), "(its log is empty)");
    }
}
