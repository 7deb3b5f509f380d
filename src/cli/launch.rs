//! Starting `multiraft serve` processes: the command line of a node, where
//! its output goes, and when it is ready. The local cluster (`cluster`,
//! `bench`) and the integration tests' harness both launch nodes through
//! here, so a new `serve` flag or a change in start-up is made once.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Everything needed to run one node process.
#[derive(Clone, Debug)]
pub struct Serve {
    /// The `multiraft` binary.
    pub exe: PathBuf,
    pub node_id: u64,
    pub api_addr: String,
    pub raft_addr: String,
    pub data_dir: PathBuf,
    /// `--shards`; `None` leaves the node's default (one per CPU).
    pub shards: Option<usize>,
    /// `--config`: a MultiRaftConfig JSON file.
    pub config: Option<PathBuf>,
    /// Further `serve` arguments, after the ones above.
    pub extra_args: Vec<String>,
    /// A command the node is started through, e.g. `ip netns exec NAME`
    /// to run it in a network namespace; empty runs the binary directly.
    /// It must exec the node in place (as `ip netns exec` and `env` do),
    /// so that the child's pid and signals reach the node itself.
    pub exec_prefix: Vec<String>,
    /// The node's stdout and stderr are appended to this file.
    pub log: PathBuf,
    /// The node's RUST_LOG.
    pub rust_log: String,
}

impl Serve {
    /// The `serve` arguments (after the binary); the same on every start.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "serve".into(),
            "--node-id".into(),
            self.node_id.to_string().into(),
            "--api-addr".into(),
            self.api_addr.clone().into(),
            "--raft-addr".into(),
            self.raft_addr.clone().into(),
            "--data-dir".into(),
            self.data_dir.clone().into(),
        ];
        if let Some(s) = self.shards {
            args.extend(["--shards".into(), s.to_string().into()]);
        }
        if let Some(c) = &self.config {
            args.extend(["--config".into(), c.clone().into()]);
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }

    /// The program to run and its arguments: the binary and [`Self::args`],
    /// behind the exec prefix if there is one.
    pub fn command_line(&self) -> (OsString, Vec<OsString>) {
        let args = self.args();
        match self.exec_prefix.split_first() {
            None => (self.exe.clone().into(), args),
            Some((first, rest)) => {
                let mut all: Vec<OsString> = rest.iter().map(OsString::from).collect();
                all.push(self.exe.clone().into());
                all.extend(args);
                (first.into(), all)
            }
        }
    }

    /// Spawns the node without waiting for it to be ready. Its log gets a
    /// line `=== start #N: COMMAND LINE` first (`start` counts the starts
    /// of this node, so restarts can be told apart in one file).
    ///
    /// The kernel kills the node when the thread that spawned it exits
    /// (`PR_SET_PDEATHSIG`), so no node outlives a launcher that dies
    /// without stopping it (abort, SIGKILL): spawn from a thread that
    /// lives as long as the node should.
    pub fn spawn(&self, start: u32) -> Result<Child, String> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("open {}: {e}", self.log.display()))?;
        let (program, args) = self.command_line();
        let shown: Vec<_> = std::iter::once(&program)
            .chain(&args)
            .map(|a| a.to_string_lossy())
            .collect();
        writeln!(log, "=== start #{start}: {}", shown.join(" "))
            .map_err(|e| format!("write {}: {e}", self.log.display()))?;
        let stderr = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| {
            format!(
                "start node {} ({}): {e}",
                self.node_id,
                program.to_string_lossy()
            )
        })
    }
}

/// Why a node did not become ready.
#[derive(Debug)]
pub enum NotReady {
    /// The process ended first (it has been reaped).
    Exited(ExitStatus),
    /// The time ran out; the probe's last error.
    TimedOut(String),
}

/// Polls `probe` every 50 ms until it succeeds, the process `child` exits,
/// or `limit` has passed.
///
/// The probe is the caller's: the local cluster asks with the crate's own
/// client, while the integration tests ask with an independent one, so
/// that a bug in the crate's client cannot hide a bug in the server.
pub async fn wait_ready(
    child: &mut Child,
    limit: Duration,
    mut probe: impl AsyncFnMut() -> Result<(), String>,
) -> Result<(), NotReady> {
    let until = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NotReady::Exited(status));
        }
        let last = match probe().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= until {
            return Err(NotReady::TimedOut(last));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops a node: SIGTERM, then SIGKILL if it has not exited after `grace`.
pub fn stop(mut child: Child, grace: Duration) {
    // SAFETY: plain kill(2) on a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A free loopback port for a node to bind, never the same one twice in
/// this process.
///
/// Ports come from below the kernel's ephemeral range, probed by binding
/// them. Binding port 0 would not do: the kernel may hand the same port out
/// again as soon as the probe releases it, and two nodes given one port
/// would both bind it (their listeners use SO_REUSEPORT) if they start in
/// the same instant. Below the ephemeral range no outgoing connection takes
/// the port either, between the probe and the node's bind. Another process
/// can still take it; that shows as a node that exits during start-up.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    const LOW: u32 = 10_000;
    let high = ephemeral_low().clamp(LOW + 1_000, 65_536);
    let span = high - LOW;
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        // Start where another process of this program, run a moment ago,
        // probably did not.
        let seed = std::process::id().wrapping_mul(7_919)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
        let _ = NEXT.compare_exchange(u32::MAX, seed % span, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let port = LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return Ok(port as u16);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        format!("no free loopback port in {LOW}..{high}"),
    ))
}

/// The first port of the kernel's ephemeral range (32768 if unreadable).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// The last `lines` lines of the log at `path` (invalid UTF-8 replaced).
pub fn log_tail(path: &Path, lines: usize) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve() -> Serve {
        Serve {
            exe: "/bin/multiraft".into(),
            node_id: 2,
            api_addr: "127.0.0.1:7002".into(),
            raft_addr: "127.0.0.1:7102".into(),
            data_dir: "/d/node-2".into(),
            shards: Some(4),
            config: Some("/d/raft.json".into()),
            extra_args: vec!["--max-connections".into(), "8".into()],
            exec_prefix: Vec::new(),
            log: "/d/node-2.log".into(),
            rust_log: "info".into(),
        }
    }

    fn strings(v: &[OsString]) -> Vec<&str> {
        v.iter().map(|a| a.to_str().unwrap()).collect()
    }

    #[test]
    fn the_serve_command_line() {
        let (program, args) = serve().command_line();
        assert_eq!(program, "/bin/multiraft");
        assert_eq!(
            strings(&args),
            [
                "serve",
                "--node-id",
                "2",
                "--api-addr",
                "127.0.0.1:7002",
                "--raft-addr",
                "127.0.0.1:7102",
                "--data-dir",
                "/d/node-2",
                "--shards",
                "4",
                "--config",
                "/d/raft.json",
                "--max-connections",
                "8"
            ]
        );
        let bare = Serve {
            shards: None,
            config: None,
            extra_args: Vec::new(),
            ..serve()
        };
        assert_eq!(bare.args().len(), 9);
    }

    #[test]
    fn an_exec_prefix_runs_the_binary() {
        let s = Serve {
            exec_prefix: vec!["ip".into(), "netns".into(), "exec".into(), "n2".into()],
            ..serve()
        };
        let (program, args) = s.command_line();
        assert_eq!(program, "ip");
        assert_eq!(
            strings(&args[..5]),
            ["netns", "exec", "n2", "/bin/multiraft", "serve"]
        );
        assert_eq!(args.len(), 4 + s.args().len());
    }

    #[test]
    fn a_log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.log");
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path, 10).unwrap();
        assert!(tail.starts_with("line 21\n") && tail.ends_with("line 30"));
        assert!(log_tail(&dir.path().join("absent"), 10).is_err());
    }
}
