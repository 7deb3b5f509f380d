//! Snapshot files: one file per saved snapshot in `snap/`, referenced from
//! the log by a SnapshotMeta record (see `record.rs`).
//!
//! ```text
//! name = "{group:020}-{index:020}-{serial:016x}.snap"
//! file = { u64 magic | u32 version | u32 crc32c | u32 meta_len | u64 data_len
//!        | meta (eraftpb.SnapshotMetadata) | data }
//! ```
//!
//! Little endian; `crc32c` covers `meta ++ data`. The serial makes every
//! saved snapshot a new file, so a SnapshotMeta record that was synced always
//! names a file that was never overwritten afterwards.
//!
//! Durability order: the record is buffered in the log at once (so it sits
//! in order with the group's other records), and the next sync writes the
//! file first: `name.tmp`, fdatasync, rename to `name`, fsync `snap/`; only
//! then the log records. A crash before the records are synced leaves an
//! unreferenced file, which recovery deletes.

use std::path::Path;

use glommio::io::DmaFile;
use protobuf::Message;
use raft::eraftpb::{Snapshot, SnapshotMetadata};

use super::io::{glommio_err, read_all, write_aligned};
use super::record::SnapshotRef;
use super::WalError;

/// "MRSNAP01" as a little-endian u64.
const MAGIC: u64 = u64::from_le_bytes(*b"MRSNAP01");
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 4 + 8;
const SUFFIX: &str = ".snap";
pub(crate) const TMP_SUFFIX: &str = ".snap.tmp";

pub(crate) fn snapshot_name(group: u64, index: u64, serial: u64) -> String {
    format!("{group:020}-{index:020}-{serial:016x}{SUFFIX}")
}

/// `(group, index, serial)` of a snapshot file name.
pub(crate) fn parse_name(name: &str) -> Option<(u64, u64, u64)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let mut parts = stem.split('-');
    let group = parts.next()?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    let serial = u64::from_str_radix(parts.next()?, 16).ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((group, index, serial))
}

/// Encodes `snap` as a file's content and returns the log's reference to
/// it; [`write`] puts it on disk.
pub(crate) fn encode(group: u64, serial: u64, snap: &Snapshot) -> (SnapshotRef, Vec<u8>) {
    let meta = snap.get_metadata();
    let name = snapshot_name(group, meta.index, serial);

    let mut meta_bytes = Vec::new();
    super::record::put_message(&mut meta_bytes, meta);
    let data = snap.get_data();
    let mut crc = crc32c::crc32c(&meta_bytes);
    crc = crc32c::crc32c_append(crc, data);

    let mut content = Vec::with_capacity(HEADER_LEN + meta_bytes.len() + data.len());
    content.extend_from_slice(&MAGIC.to_le_bytes());
    content.extend_from_slice(&VERSION.to_le_bytes());
    content.extend_from_slice(&crc.to_le_bytes());
    content.extend_from_slice(&(meta_bytes.len() as u32).to_le_bytes());
    content.extend_from_slice(&(data.len() as u64).to_le_bytes());
    content.extend_from_slice(&meta_bytes);
    content.extend_from_slice(data);
    let r = SnapshotRef {
        index: meta.index,
        term: meta.term,
        data_len: data.len() as u64,
        file_crc: crc,
        name,
        inline: None,
    };
    (r, content)
}

/// Durably writes an encoded snapshot as `dir/{name}`: a temporary file,
/// fdatasync, rename. The caller fsyncs `dir` once after all its files.
pub(crate) async fn write(dir: &Path, name: &str, content: &[u8]) -> Result<(), WalError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let file = DmaFile::create(&tmp)
        .await
        .map_err(|e| glommio_err("create", &tmp, e))?;
    let res = write_file(&file, &tmp, content).await;
    let _ = file.close().await;
    if let Err(e) = res {
        let _ = glommio::io::remove(&tmp).await;
        return Err(e);
    }
    glommio::io::rename(&tmp, &path)
        .await
        .map_err(|e| glommio_err("rename", &tmp, e))
}

async fn write_file(file: &DmaFile, path: &Path, content: &[u8]) -> Result<(), WalError> {
    write_aligned(file, path, 0, &[content]).await?;
    // DMA writes whole blocks; cut the zero padding off again.
    file.truncate(content.len() as u64)
        .await
        .map_err(|e| glommio_err("truncate", path, e))?;
    // fdatasync also flushes the size change made by truncate.
    file.fdatasync()
        .await
        .map_err(|e| glommio_err("fdatasync", path, e))
}

/// Loads and verifies the snapshot `r` refers to.
pub(crate) async fn read(dir: &Path, r: &SnapshotRef) -> Result<Snapshot, WalError> {
    let path = dir.join(&r.name);
    if !path.exists() {
        return Err(WalError::Corruption {
            path,
            offset: 0,
            reason: "snapshot file referenced by the log is missing".into(),
        });
    }
    let file = DmaFile::open(&path)
        .await
        .map_err(|e| glommio_err("open", &path, e))?;
    let content = read_all(&file, &path).await;
    let _ = file.close().await;
    decode(&content?, r).map_err(|(offset, reason)| WalError::Corruption {
        path,
        offset,
        reason,
    })
}

/// Verifies and decodes an inline snapshot (its content is in the log).
pub(crate) fn read_inline(r: &SnapshotRef) -> Result<Snapshot, WalError> {
    let content = r.inline.as_deref().unwrap_or_default();
    decode(content, r).map_err(|(offset, reason)| WalError::Corruption {
        path: std::path::PathBuf::from(format!("(inline snapshot at index {})", r.index)),
        offset,
        reason,
    })
}

fn decode(content: &[u8], r: &SnapshotRef) -> Result<Snapshot, (u64, String)> {
    if content.len() < HEADER_LEN {
        return Err((0, format!("file too short: {} bytes", content.len())));
    }
    let u32_at = |o: usize| u32::from_le_bytes(content[o..o + 4].try_into().unwrap_or_default());
    let magic = u64::from_le_bytes(content[0..8].try_into().unwrap_or_default());
    if magic != MAGIC {
        return Err((0, format!("bad magic {magic:#x}")));
    }
    if u32_at(8) != VERSION {
        return Err((8, format!("unsupported version {}", u32_at(8))));
    }
    let crc = u32_at(12);
    let meta_len = u32_at(16) as usize;
    let data_len = u64::from_le_bytes(content[20..28].try_into().unwrap_or_default());
    let body = &content[HEADER_LEN..];
    if Some(body.len()) != (data_len as usize).checked_add(meta_len) {
        return Err((16, "lengths do not match the file size".into()));
    }
    if crc32c::crc32c(body) != crc {
        return Err((HEADER_LEN as u64, "checksum mismatch".into()));
    }
    if crc != r.file_crc || data_len != r.data_len {
        return Err((12, "file does not match its log record".into()));
    }
    let meta = SnapshotMetadata::parse_from_bytes(&body[..meta_len])
        .map_err(|e| (HEADER_LEN as u64, format!("bad metadata: {e}")))?;
    if meta.index != r.index || meta.term != r.term {
        return Err((
            HEADER_LEN as u64,
            format!(
                "metadata {}/{} does not match log record {}/{}",
                meta.index, meta.term, r.index, r.term
            ),
        ));
    }
    let mut snap = Snapshot::default();
    snap.set_metadata(meta);
    snap.set_data(body[meta_len..].to_vec().into());
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::super::io::sync_dir;
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = snapshot_name(3, 100, 0xabc);
        assert_eq!(parse_name(&n), Some((3, 100, 0xabc)));
        assert_eq!(parse_name("x.snap"), None);
        assert_eq!(parse_name(&format!("{n}.tmp")), None);
    }

    #[test]
    fn write_read_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let mut snap = Snapshot::default();
                snap.mut_metadata().index = 10;
                snap.mut_metadata().term = 2;
                snap.mut_metadata().mut_conf_state().voters = vec![1, 2];
                snap.set_data(vec![5u8; 10_000].into());
                let (r, content) = encode(1, 7, &snap);
                write(&path, &r.name, &content).await.unwrap();
                sync_dir(&path).await.unwrap();
                assert_eq!(r.index, 10);
                let back = read(&path, &r).await.unwrap();
                assert_eq!(back, snap);

                let file = path.join(&r.name);
                let mut bytes = std::fs::read(&file).unwrap();
                assert_eq!(
                    bytes.len(),
                    HEADER_LEN + 10_000 + snap.get_metadata().compute_size() as usize
                );
                bytes[5000] ^= 1;
                std::fs::write(&file, &bytes).unwrap();
                assert!(matches!(
                    read(&path, &r).await,
                    Err(WalError::Corruption { .. })
                ));
                std::fs::remove_file(&file).unwrap();
                assert!(matches!(
                    read(&path, &r).await,
                    Err(WalError::Corruption { .. })
                ));
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
