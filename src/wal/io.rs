//! Small DMA I/O helpers shared by segments and snapshots: error mapping,
//! aligned chunked writes, whole-file reads, directory fsync.

use std::path::{Path, PathBuf};

use glommio::io::{Directory, DmaFile};
use glommio::GlommioError;

use super::{failpoints, WalError};

/// Largest single DMA write or read issued; bigger transfers are split so
/// one call never needs a huge DMA buffer.
pub(crate) const MAX_IO: usize = 4 << 20;

/// Most bytes one write + fdatasync round of the log puts after the
/// durable end of a segment (see `Wal::commit_pending`).
pub(crate) const SYNC_EXTENT: usize = 4 << 20;

/// Maps a glommio error to `WalError`, keeping "disk full" distinct because
/// it is the one failure the caller may retry.
pub(crate) fn glommio_err(op: &'static str, path: &Path, e: GlommioError<()>) -> WalError {
    // Unwrap the original io::Error: glommio's own conversion rebuilds it
    // from the error kind and drops the errno, which would hide ENOSPC.
    let source = match e {
        GlommioError::IoError(source) | GlommioError::EnhancedIoError { source, .. } => source,
        other => other.into(),
    };
    io_err(op, path, source)
}

pub(crate) fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> WalError {
    if source.raw_os_error() == Some(libc::ENOSPC) {
        WalError::NoSpace {
            op,
            path: path.to_path_buf(),
        }
    } else {
        WalError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Writes the concatenation of `parts` at `pos` (which must be aligned),
/// zero-padding the last block up to the file's alignment. Does not sync.
/// Taking parts lets callers put a rewritten tail block in front of new
/// records without first copying both into one buffer.
pub(crate) async fn write_aligned(
    file: &DmaFile,
    path: &Path,
    pos: u64,
    parts: &[&[u8]],
) -> Result<(), WalError> {
    if failpoints::is_on("wal::write::enospc") {
        return Err(io_err(
            "write",
            path,
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        ));
    }
    let align = file.alignment() as usize;
    debug_assert_eq!(pos % align as u64, 0);
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut parts = parts.iter().copied().filter(|p| !p.is_empty());
    let mut cur: &[u8] = parts.next().unwrap_or(&[]);
    let mut done = 0usize;
    while done < total {
        let n = (total - done).min(MAX_IO);
        let padded = n.div_ceil(align) * align;
        let mut buf = file.alloc_dma_buffer(padded);
        let bytes = buf.as_bytes_mut();
        let mut filled = 0;
        while filled < n {
            if cur.is_empty() {
                cur = parts.next().unwrap_or(&[]);
                continue;
            }
            let k = cur.len().min(n - filled);
            bytes[filled..filled + k].copy_from_slice(&cur[..k]);
            cur = &cur[k..];
            filled += k;
        }
        bytes[n..].fill(0);
        let at = pos + done as u64;
        let written = file
            .write_at(buf, at)
            .await
            .map_err(|e| glommio_err("write", path, e))?;
        if written != padded {
            // O_DIRECT writes into a preallocated file are not expected to be
            // short; if one is, the block that was cut is in an unknown
            // state, so report it rather than patch around it.
            return Err(WalError::Io {
                op: "write",
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("short write at {at}: {written} of {padded} bytes"),
                ),
            });
        }
        done += n;
    }
    Ok(())
}

/// `fdatasync` with the `wal::sync::err` failpoint.
pub(crate) async fn fdatasync(file: &DmaFile, path: &Path) -> Result<(), WalError> {
    if failpoints::is_on("wal::sync::err") {
        return Err(io_err(
            "fdatasync",
            path,
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
    }
    file.fdatasync()
        .await
        .map_err(|e| glommio_err("fdatasync", path, e))
}

/// Reads a whole file through DMA.
pub(crate) async fn read_all(file: &DmaFile, path: &Path) -> Result<Vec<u8>, WalError> {
    let size = file
        .file_size()
        .await
        .map_err(|e| glommio_err("stat", path, e))? as usize;
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let n = (size - out.len()).min(MAX_IO);
        if read_more(file, path, &mut out, n).await? == 0 {
            break; // file shrank under us; return what exists
        }
    }
    Ok(out)
}

/// Reads up to `n` bytes (at most [`MAX_IO`]) of `file` at `out.len()`,
/// which must be aligned, and appends them to `out`; returns how many (0 at
/// the end of the file).
pub(crate) async fn read_more(
    file: &DmaFile,
    path: &Path,
    out: &mut Vec<u8>,
    n: usize,
) -> Result<usize, WalError> {
    let chunk = file
        .read_at_aligned(out.len() as u64, file.align_up(n as u64) as usize)
        .await
        .map_err(|e| glommio_err("read", path, e))?;
    let got = chunk.len().min(n);
    out.extend_from_slice(&chunk[..got]);
    Ok(got)
}

/// Opens a file read-write for DMA without truncating it.
pub(crate) async fn open_rw(path: &Path) -> Result<DmaFile, WalError> {
    glommio::io::OpenOptions::new()
        .read(true)
        .write(true)
        .dma_open(path)
        .await
        .map_err(|e| glommio_err("open", path, e))
}

/// fsyncs a directory so that creates, renames and unlinks in it are durable.
pub(crate) async fn sync_dir(path: &Path) -> Result<(), WalError> {
    let dir = Directory::open(path)
        .await
        .map_err(|e| glommio_err("open dir", path, e))?;
    let res = dir
        .sync()
        .await
        .map_err(|e| glommio_err("fsync dir", path, e));
    let _ = dir.close().await;
    res
}

/// Lists the file names in `dir`.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, WalError> {
    let rd = std::fs::read_dir(dir).map_err(|e| io_err("read dir", dir, e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| io_err("read dir", dir, e))?;
        if let Some(name) = ent.file_name().to_str() {
            if name == PROBE_NAME {
                continue;
            }
            out.push((name.to_string(), ent.path()));
        }
    }
    Ok(out)
}

/// Name of the scratch file `probe_device` uses; listings skip it.
pub(crate) const PROBE_NAME: &str = ".dma-probe";

/// Makes glommio probe the device under `dir` on a file with real data.
///
/// glommio decides once per device and thread whether to use the polled
/// io_uring (IOPOLL) ring, by reading one block from the first file opened
/// for DMA there. If that file is empty, the read succeeds trivially, the
/// device is wrongly marked pollable, and every later DMA read on it fails
/// with EOPNOTSUPP (seen on virtio disks). The log creates empty files
/// (new segments, snapshots), so it probes explicitly before any of that.
///
/// Best effort: on a full disk the scratch file cannot be written, and
/// opening the log must still work (replay opens the existing, non-empty
/// segments first, which probes correctly too).
pub(crate) async fn probe_device(dir: &Path) {
    let path = dir.join(PROBE_NAME);
    if let Err(e) = std::fs::write(&path, [0xa5u8; 4096]) {
        tracing::warn!(path = %path.display(), error = %e, "could not write DMA probe file");
    } else if let Ok(file) = DmaFile::open(&path).await {
        let _ = file.close().await;
    }
    let _ = std::fs::remove_file(&path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_survives_glommio_error_wrapping() {
        let e = GlommioError::<()>::EnhancedIoError {
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            op: "Writing",
            path: None,
            fd: None,
        };
        assert!(matches!(
            glommio_err("write", Path::new("x"), e),
            WalError::NoSpace { .. }
        ));
        let e = GlommioError::<()>::IoError(std::io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(
            glommio_err("write", Path::new("x"), e),
            WalError::Io { .. }
        ));
    }
}
