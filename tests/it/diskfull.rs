//! A full disk under the write-ahead log.
//!
//! One node keeps its data directory on a small ext4 filesystem on a loop
//! device. The test fills that filesystem while the node is serving writes
//! and checks the documented behaviour: writes to the affected shard are
//! refused with UNAVAILABLE naming the full disk, the node stays up and
//! keeps serving reads, writes succeed again once space is freed, and after
//! a kill -9 and restart every acknowledged write is still there.
//!
//! Creating and mounting the filesystem needs root; without it (or without
//! loop devices) the test reports that it was skipped and passes.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tonic::Code;

use crate::pb::atomix::multiraft::v1::{BootstrapRequest, PartitionConfig};
use crate::pb::multiraft::admin::v1::Role;
use crate::pb::multiraft::kv::v1::PutRequest;
use crate::support::*;

/// Size of the filesystem image the node's data directory lives on.
const IMAGE_MIB: u64 = 48;

/// Bound on one Put while the disk is filling up or coming back.
const PUT_TIMEOUT: Duration = Duration::from_secs(3);

/// A loop-mounted filesystem, unmounted when dropped (also on panic).
struct LoopMount {
    dir: PathBuf,
}

impl LoopMount {
    /// Creates a `mib` MiB ext4 image at `image` and mounts it on `dir`.
    fn create(image: &Path, dir: &Path, mib: u64) -> Result<LoopMount, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".to_string());
        }
        let file = File::create(image).map_err(|e| format!("create {}: {e}", image.display()))?;
        file.set_len(mib << 20)
            .map_err(|e| format!("size {}: {e}", image.display()))?;
        drop(file);
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image))?;
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(dir))?;
        Ok(LoopMount {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("umount").arg(&self.dir)) {
            eprintln!(
                "umount {} failed ({e}); detaching lazily",
                self.dir.display()
            );
            if let Err(e) = run(Command::new("umount").arg("-l").arg(&self.dir)) {
                eprintln!("umount -l {} failed: {e}", self.dir.display());
            }
        }
    }
}

/// Runs `cmd` to completion; an error names the command and its output.
fn run(cmd: &mut Command) -> Result<(), String> {
    let what = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Writes zeros to a new file at `path` until the filesystem has no space
/// left, halving the chunk on every ENOSPC down to a single byte so that
/// nothing usable remains. Returns the bytes written.
fn fill_disk(path: &Path) -> u64 {
    let mut file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let zeros = vec![0u8; 1 << 20];
    let mut chunk = zeros.len();
    let mut written = 0u64;
    while chunk > 0 {
        match file.write(&zeros[..chunk]) {
            Ok(0) => chunk /= 2,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => chunk /= 2,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("write {}: {e}", path.display()),
        }
    }
    // Push it all to disk; ENOSPC here just means the disk is full.
    if let Err(e) = file.sync_all() {
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOSPC),
            "fsync {}: {e}",
            path.display()
        );
    }
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_refuses_writes_then_resumes() {
    let started = Instant::now();
    // Drop order (reverse of declaration): node, then the mount, then the
    // directory holding the image.
    let dir = test_dir();
    let mount = match LoopMount::create(
        &dir.path().join("disk.img"),
        &dir.path().join("mnt"),
        IMAGE_MIB,
    ) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped: cannot mount a loop filesystem (needs root): {e}");
            return;
        }
    };
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, FAST_CONFIG).expect("write config");
    let mut node = Node::new(dir.path(), 1, 1, Some(config_path));
    node.data_dir = mount.dir.join("data");
    node.extra_args = vec!["--wal-segment-mib".to_string(), "1".to_string()];
    node.start();
    node.wait_ready().await;

    let partitions = [1u32, 2];
    let layout: Vec<PartitionConfig> = partitions
        .iter()
        .map(|&p| PartitionConfig {
            partition_id: p,
            members: [(node.id, node.raft_addr.to_string())]
                .into_iter()
                .collect(),
        })
        .collect();
    node.node_client()
        .await
        .bootstrap(req(
            BootstrapRequest { partitions: layout },
            CONTROL_TIMEOUT,
        ))
        .await
        .unwrap_or_else(|s| panic!("Bootstrap: {:?} {}", s.code(), s.message()));

    // Phase 1: writes with space to spare.
    let mut kv = node.kv().await;
    let mut acked: Vec<Acked> = Vec::new();
    for i in 0..200usize {
        let p = partitions[i % partitions.len()];
        let key = format!("before-{i}").into_bytes();
        let value = vec![b'a' + (i % 26) as u8; 1024];
        put(&mut kv, p, &key, &value).await;
        acked.push((p, key, value));
    }
    note(format!(
        "{} writes acknowledged before filling the disk",
        acked.len()
    ));

    // Phase 2: fill the filesystem and keep writing until the node refuses.
    let filler = mount.dir.join("filler");
    let filled = fill_disk(&filler);
    note(format!("filler wrote {} KiB; disk full", filled >> 10));
    let mut seq = 0usize;
    let mut failures = Vec::new();
    let full_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        seq += 1;
        let p = partitions[seq % partitions.len()];
        let key = format!("filling-{seq}").into_bytes();
        let value = vec![b'f'; 4096];
        let request = PutRequest {
            key: key.clone(),
            value: value.clone(),
            partition_id: p,
        };
        match kv.put(req(request, PUT_TIMEOUT)).await {
            Ok(_) => acked.push((p, key, value)),
            Err(s) => {
                if let Some(exit) = node.try_exit() {
                    panic!(
                        "node 1 exited ({exit}) while the disk was full; Put {} got {:?} {}",
                        String::from_utf8_lossy(&key),
                        s.code(),
                        s.message()
                    );
                }
                assert_eq!(
                    s.code(),
                    Code::Unavailable,
                    "Put {} on a full disk: {:?} {}",
                    String::from_utf8_lossy(&key),
                    s.code(),
                    s.message()
                );
                let disk_full = s.message().contains("disk is full");
                failures.push(s.message().to_string());
                if disk_full {
                    break;
                }
            }
        }
        assert!(
            Instant::now() < full_deadline,
            "no Put was refused for a full disk within 20 s ({seq} tried, failures: {failures:?})"
        );
    }
    note(format!(
        "after {seq} Puts on the full disk: {} failed, last: {}",
        failures.len(),
        failures.last().unwrap()
    ));
    // Refusals are immediate while the log waits for space.
    let refused_at = Instant::now();
    seq += 1;
    let err = kv
        .put(req(
            PutRequest {
                key: format!("filling-{seq}").into_bytes(),
                value: b"x".to_vec(),
                partition_id: partitions[0],
            },
            PUT_TIMEOUT,
        ))
        .await;
    let msg = expect_code(err, Code::Unavailable, "a Put while the disk is full");
    assert!(
        msg.contains("disk is full"),
        "a Put while the disk is full: {msg}"
    );
    assert!(
        refused_at.elapsed() < Duration::from_secs(1),
        "refusing a write on a full disk took {:?}",
        refused_at.elapsed()
    );

    // Phase 3: still alive, still serving local reads. (Linearizable reads
    // wait with the writes: a ReadIndex round needs raft's Ready cycle,
    // which pauses until the log is durable again.)
    let status = node.status().await.expect("Status on a full disk");
    assert!(status.bootstrapped);
    let (p0, k0, v0) = acked[0].clone();
    assert_eq!(
        get(&mut kv, p0, &k0, true).await,
        Some(v0),
        "serializable Get of {} on a full disk",
        String::from_utf8_lossy(&k0)
    );

    // Phase 4: free the space; writes resume.
    std::fs::remove_file(&filler).expect("remove filler");
    note("filler removed");
    let resumed = wait_for(
        Duration::from_secs(20),
        "a Put to succeed after space returned",
        async || {
            seq += 1;
            let p = partitions[seq % partitions.len()];
            let key = format!("resumed-{seq}").into_bytes();
            let value = format!("resumed-value-{seq}").into_bytes();
            let request = PutRequest {
                key: key.clone(),
                value: value.clone(),
                partition_id: p,
            };
            match kv.clone().put(req(request, PUT_TIMEOUT)).await {
                Ok(_) => Ok((p, key, value)),
                Err(s) => Err(format!("{:?} {}", s.code(), s.message())),
            }
        },
    )
    .await;
    acked.push(resumed);
    for i in 0..20usize {
        let p = partitions[i % partitions.len()];
        let key = format!("after-{i}").into_bytes();
        let value = format!("after-value-{i}").into_bytes();
        put(&mut kv, p, &key, &value).await;
        acked.push((p, key, value));
    }
    assert_all_readable(&node, &acked, false).await;

    // Phase 5: crash and restart; nothing acknowledged is lost.
    node.kill9();
    node.start();
    node.wait_ready().await;
    for &p in &partitions {
        wait_for(
            Duration::from_secs(15),
            &format!("node 1 to lead partition {p} after the restart"),
            async || {
                let s = node.partition_status(p).await?;
                if s.role == Role::Leader as i32 && s.leader_id == node.id {
                    Ok(())
                } else {
                    Err(format!("role {} leader {}", s.role, s.leader_id))
                }
            },
        )
        .await;
    }
    assert_all_readable(&node, &acked, false).await;
    // And it takes new writes.
    let mut kv = node.kv().await;
    put(&mut kv, partitions[0], b"after-restart", b"ok").await;
    assert_eq!(
        get(&mut kv, partitions[0], b"after-restart", false).await,
        Some(b"ok".to_vec())
    );
    note(format!(
        "{} acknowledged writes intact after the restart; test took {:?}",
        acked.len(),
        started.elapsed()
    ));
    drop(node);
    drop(mount);
}
