//! Segment files: naming, preparation (preallocate + pre-zero), and the
//! writer of the active segment.
//!
//! ```text
//! wal/{seq:020}.wal       a segment: records (see record.rs), then zeroes
//! wal/{seq:020}.wal.tmp   a prepared segment not yet part of the log
//! ```
//!
//! Every segment is created at `segment_size` bytes, fully allocated and
//! filled with zeroes before it becomes part of the log. Two reasons:
//! the zeroes are the end-of-data marker recovery relies on, and writing
//! into already-written extents makes `fdatasync` a pure data flush (~80 µs
//! here) instead of a data flush plus a journal commit for block allocation
//! or unwritten-extent conversion (up to several ms). `fallocate` alone
//! would leave unwritten extents, hence the explicit zero fill.
//!
//! Preparation happens under a `.tmp` name and the file is renamed into the
//! log only when the writer rolls into it, so an unused prepared file can
//! never be mistaken for the last segment of the log by recovery.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{DmaFile, OpenOptions};

use super::io::{fdatasync, glommio_err, open_rw, sync_dir, write_aligned};
use super::WalError;

const SUFFIX: &str = ".wal";
const TMP_SUFFIX: &str = ".wal.tmp";
/// Size of each zero-fill write while preparing a segment.
const ZERO_CHUNK: usize = 1 << 20;

pub(crate) fn segment_name(seq: u64) -> String {
    format!("{seq:020}{SUFFIX}")
}

fn tmp_name(seq: u64) -> String {
    format!("{seq:020}{TMP_SUFFIX}")
}

/// Sequence number of a segment file name, if it is one.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn is_tmp_name(name: &str) -> bool {
    name.ends_with(TMP_SUFFIX)
}

/// Creates `wal/{seq}.wal.tmp` at `size` bytes, allocated and zero-filled,
/// and flushed. Meant to run in a background task ahead of need.
pub(crate) async fn prepare(dir: PathBuf, seq: u64, size: u64) -> Result<DmaFile, WalError> {
    let path = dir.join(tmp_name(seq));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .dma_open(&path)
        .await
        .map_err(|e| glommio_err("create", &path, e))?;
    if let Err(e) = fill(&file, &path, size).await {
        // Do not leave a half-prepared file eating the space that just ran out.
        let _ = file.close().await;
        let _ = glommio::io::remove(&path).await;
        return Err(e);
    }
    Ok(file)
}

async fn fill(file: &DmaFile, path: &Path, size: u64) -> Result<(), WalError> {
    // Reserve all blocks first so the zero fill below is one contiguous
    // extent and never fails half way on space.
    file.pre_allocate(size, false)
        .await
        .map_err(|e| glommio_err("fallocate", path, e))?;
    let zero_buf = |len: usize| {
        let mut b = file.alloc_dma_buffer(len);
        b.as_bytes_mut().fill(0);
        Rc::new(b)
    };
    let chunk = zero_buf(ZERO_CHUNK);
    let mut off = 0u64;
    while off < size {
        // `size` is a multiple of the alignment (see `WalConfig`), so the
        // last, shorter chunk is aligned too.
        let left = size - off;
        let buf = if left >= ZERO_CHUNK as u64 {
            chunk.clone()
        } else {
            zero_buf(file.align_up(left) as usize)
        };
        let n = file
            .write_rc_at(buf, off)
            .await
            .map_err(|e| glommio_err("zero-fill", path, e))?;
        if n == 0 {
            return Err(WalError::Io {
                op: "zero-fill",
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::WriteZero, "wrote nothing"),
            });
        }
        off += n as u64;
    }
    // Plain fdatasync, not the failpoint wrapper: preparing a segment is not
    // a log sync, and tests of sync failures should not break preparation.
    file.fdatasync()
        .await
        .map_err(|e| glommio_err("fdatasync", path, e))
}

/// Moves a prepared segment into the log and makes the new name durable.
pub(crate) async fn install(dir: &Path, seq: u64) -> Result<PathBuf, WalError> {
    let from = dir.join(tmp_name(seq));
    let to = dir.join(segment_name(seq));
    glommio::io::rename(&from, &to)
        .await
        .map_err(|e| glommio_err("rename", &from, e))?;
    // Without the directory fsync a crash could lose the rename while the
    // records written into the file afterwards were acknowledged.
    sync_dir(dir).await?;
    Ok(to)
}

/// The segment new records are appended to.
///
/// O_DIRECT writes must cover whole aligned blocks, but records are packed
/// back to back without padding. So every sync rewrites the partially filled
/// last block from its aligned start: `tail` keeps the durable bytes of that
/// block and is written again, unchanged, in front of the new records. The
/// rewritten prefix is byte-identical, so a torn rewrite cannot damage
/// records that were already acknowledged.
pub(crate) struct ActiveSegment {
    pub seq: u64,
    pub path: PathBuf,
    file: DmaFile,
    /// End of the durable records.
    pub synced_len: u64,
    /// Bytes `[align_down(synced_len), synced_len)`.
    tail: Vec<u8>,
}

impl ActiveSegment {
    /// A freshly installed, empty segment.
    pub(crate) fn new(seq: u64, path: PathBuf, file: DmaFile) -> ActiveSegment {
        ActiveSegment {
            seq,
            path,
            file,
            synced_len: 0,
            tail: Vec::new(),
        }
    }

    /// Reopens an existing segment whose valid records end at `valid_end`.
    /// `content` is what recovery read from it; any non-zero bytes after
    /// `valid_end` (a torn write) are zeroed durably first, so that later
    /// records appended here are never followed by stale garbage that a
    /// future recovery could misread.
    pub(crate) async fn reopen(
        seq: u64,
        path: PathBuf,
        content: &[u8],
        valid_end: usize,
    ) -> Result<ActiveSegment, WalError> {
        let file = open_rw(&path).await?;
        let align = file.alignment() as usize;
        let start = valid_end / align * align;
        let tail = content[start..valid_end].to_vec();
        let dirty_end = super::record::nonzero_end(content).max(valid_end);
        if dirty_end > valid_end {
            let mut fill = tail.clone();
            fill.resize(dirty_end - start, 0);
            write_aligned(&file, &path, start as u64, &[&fill]).await?;
            fdatasync(&file, &path).await?;
        }
        Ok(ActiveSegment {
            seq,
            path,
            file,
            synced_len: valid_end as u64,
            tail,
        })
    }

    /// Writes `data` right after the durable records and flushes it. On
    /// error nothing is considered written: the next attempt rewrites the
    /// same range.
    pub(crate) async fn commit(&mut self, data: &[u8]) -> Result<(), WalError> {
        if data.is_empty() {
            return Ok(());
        }
        let align = self.file.alignment();
        let start = self.synced_len / align * align;
        write_aligned(&self.file, &self.path, start, &[&self.tail, data]).await?;
        fdatasync(&self.file, &self.path).await?;
        let end = self.synced_len + data.len() as u64;
        // New partial last block: bytes [align_down(end), end) of tail ++ data.
        let keep = (end % align) as usize;
        if keep <= data.len() {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - keep..]);
        } else {
            // Still inside the old partial block.
            self.tail.extend_from_slice(data);
        }
        self.synced_len = end;
        Ok(())
    }

    pub(crate) async fn close(self) {
        let _ = self.file.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_name(7), "00000000000000000007.wal");
        assert_eq!(parse_segment_name(&segment_name(7)), Some(7));
        assert_eq!(parse_segment_name(&tmp_name(7)), None);
        assert!(is_tmp_name(&tmp_name(7)));
        assert_eq!(parse_segment_name("7.wal"), None);
        assert_eq!(parse_segment_name("0000000000000000000x.wal"), None);
    }

    #[test]
    fn prepared_segment_has_full_size_and_is_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let size = (1 << 20) + 4096 * 3;
                let file = prepare(path.clone(), 1, size).await.unwrap();
                file.close().await.unwrap();
                let p = install(&path, 1).await.unwrap();
                let meta = std::fs::metadata(&p).unwrap();
                assert_eq!(meta.len(), size);
                // Fully allocated, not sparse.
                use std::os::unix::fs::MetadataExt;
                assert!(meta.blocks() * 512 >= size);
                assert!(std::fs::read(&p).unwrap().iter().all(|&b| b == 0));
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
