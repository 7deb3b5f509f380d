//! Snapshot files in `snap/`, referenced from the log by SnapshotPacked
//! records (see `record.rs`).
//!
//! Every snapshot a sync makes durable goes into one pack file, each at its
//! own offset, in the layout a single snapshot file had:
//!
//! ```text
//! name     = "{serial:016x}.pack"
//! snapshot = { u64 magic | u32 version | u32 crc32c | u32 meta_len | u64 data_len
//!            | meta (eraftpb.SnapshotMetadata) | data }
//! ```
//!
//! Little endian; `crc32c` covers `meta ++ data`. The serial makes every
//! pack a new file, so a record that was synced always names bytes that
//! were never overwritten afterwards. A pack is deleted once no live group's
//! snapshot is in it (see `Wal::doom`). Earlier versions wrote one file per
//! snapshot, `{group:020}-{index:020}-{serial:016x}.snap`, named by
//! SnapshotMeta records; those are still read.
//!
//! Why packs: under load a WAL purge asks hundreds of groups to snapshot.
//! A file each meant a create, an fdatasync and a rename per snapshot, and
//! on ext4 creating many short-lived files is itself costly (inode
//! allocation steps around recently deleted inodes): at 1,024 busy
//! partitions the file creates alone took about 4% of the machine's CPU.
//!
//! Durability order: the record is buffered in the log at once (so it sits
//! in order with the group's other records), and the next sync writes the
//! pack first: `name.tmp`, fdatasync, rename to `name`, fsync `snap/`; only
//! then the log records. A crash before the records are synced leaves an
//! unreferenced pack, which recovery deletes.

use std::path::Path;

use glommio::io::DmaFile;
use protobuf::Message;
use raft::eraftpb::{Snapshot, SnapshotMetadata};

use super::io::{glommio_err, read_all, write_aligned, MAX_IO};
use super::record::SnapshotRef;
use super::WalError;

/// "MRSNAP01" as a little-endian u64.
const MAGIC: u64 = u64::from_le_bytes(*b"MRSNAP01");
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 4 + 8;
const SUFFIX: &str = ".snap";
const PACK_SUFFIX: &str = ".pack";

/// Name of a single-snapshot file as earlier versions wrote them.
#[cfg(test)]
pub(crate) fn snapshot_name(group: u64, index: u64, serial: u64) -> String {
    format!("{group:020}-{index:020}-{serial:016x}{SUFFIX}")
}

pub(crate) fn pack_name(serial: u64) -> String {
    format!("{serial:016x}{PACK_SUFFIX}")
}

/// The serial of a pack or single-snapshot file name.
pub(crate) fn parse_serial(name: &str) -> Option<u64> {
    match name.strip_suffix(PACK_SUFFIX) {
        Some(stem) if stem.len() == 16 => u64::from_str_radix(stem, 16).ok(),
        Some(_) => None,
        None => parse_name(name).map(|(_, _, serial)| serial),
    }
}

/// A file [`write`] was writing when the process stopped.
pub(crate) fn is_tmp(name: &str) -> bool {
    name.ends_with(".snap.tmp") || name.ends_with(".pack.tmp")
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

/// Encodes `snap` in its stored layout; returns the log's reference to it,
/// still without a place (the caller puts it inline or into a pack).
pub(crate) fn encode(snap: &Snapshot) -> (SnapshotRef, Vec<u8>) {
    let mut content = Vec::new();
    let r = encode_into(snap, &mut content);
    (r, content)
}

/// [`encode`], appending the stored layout to `out` (a pack being filled)
/// rather than to a buffer of its own, which the pack would copy again.
pub(crate) fn encode_into(snap: &Snapshot, out: &mut Vec<u8>) -> SnapshotRef {
    let meta = snap.get_metadata();
    let mut meta_bytes = Vec::new();
    super::record::put_message(&mut meta_bytes, meta);
    let data = snap.get_data();
    let mut crc = crc32c::crc32c(&meta_bytes);
    crc = crc32c::crc32c_append(crc, data);

    out.reserve(HEADER_LEN + meta_bytes.len() + data.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&(meta_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&meta_bytes);
    out.extend_from_slice(data);
    SnapshotRef {
        index: meta.index,
        term: meta.term,
        data_len: data.len() as u64,
        file_crc: crc,
        name: String::new(),
        at: None,
        inline: None,
    }
}

/// Bytes [`encode`] makes of `snap`.
pub(crate) fn encoded_len(snap: &Snapshot) -> usize {
    HEADER_LEN + snap.get_metadata().compute_size() as usize + snap.get_data().len()
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
    let content = match r.at {
        Some((offset, len)) => read_range(&file, &path, offset, len).await,
        None => read_all(&file, &path).await,
    };
    let _ = file.close().await;
    let offset = r.at.map_or(0, |(offset, _)| offset);
    decode(&content?, r).map_err(|(at, reason)| WalError::Corruption {
        path,
        offset: offset + at,
        reason,
    })
}

/// Bytes `offset..offset + len` of `file`; fewer if the file is shorter
/// (which `decode` then reports).
async fn read_range(
    file: &DmaFile,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, WalError> {
    let size = file
        .file_size()
        .await
        .map_err(|e| glommio_err("stat", path, e))?;
    let end = offset.saturating_add(len).min(size);
    let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
    let mut pos = offset;
    while pos < end {
        let n = (end - pos).min(MAX_IO as u64) as usize;
        let chunk = file
            .read_at(pos, n)
            .await
            .map_err(|e| glommio_err("read", path, e))?;
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
        pos += chunk.len() as u64;
    }
    Ok(out)
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
        assert_eq!(parse_serial(&n), Some(0xabc));
        let p = pack_name(0xdef);
        assert_eq!(parse_serial(&p), Some(0xdef));
        assert_eq!(parse_serial("x.pack"), None);
        assert_eq!(parse_serial(&format!("{p}.tmp")), None);
        assert!(is_tmp(&format!("{p}.tmp")) && is_tmp(&format!("{n}.tmp")));
        assert!(!is_tmp(&p));
    }

    fn snap(index: u64, fill: u8, len: usize) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = index;
        snap.mut_metadata().term = 2;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2];
        snap.set_data(vec![fill; len].into());
        snap
    }

    /// The log decides inline or packed from `encoded_len` before
    /// encoding, and packs append in place: both must agree with `encode`.
    #[test]
    fn encoding_in_place_matches_encoding_alone() {
        let mut pack = b"earlier snapshots".to_vec();
        for s in [snap(3, 1, 0), snap(4, 2, 200), snap(1 << 40, 3, 70_000)] {
            let (r, alone) = encode(&s);
            assert_eq!(encoded_len(&s), alone.len());
            let at = pack.len();
            assert_eq!(encode_into(&s, &mut pack), r);
            assert_eq!(&pack[at..], &alone[..]);
        }
    }

    #[test]
    fn packed_and_single_files_read_back_and_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                // Two snapshots in one pack; the second starts unaligned.
                let (a, b) = (snap(10, 5, 10_000), snap(11, 6, 3_333));
                let (mut ra, ca) = encode(&a);
                let (mut rb, cb) = encode(&b);
                let name = pack_name(7);
                ra.name = name.clone();
                ra.at = Some((0, ca.len() as u64));
                rb.name = name.clone();
                rb.at = Some((ca.len() as u64, cb.len() as u64));
                let pack = [ca.clone(), cb].concat();
                write(&path, &name, &pack).await.unwrap();
                sync_dir(&path).await.unwrap();
                assert_eq!(read(&path, &ra).await.unwrap(), a);
                assert_eq!(read(&path, &rb).await.unwrap(), b);
                // A reference to the wrong span does not pass for a snapshot.
                let mut shifted = rb.clone();
                shifted.at = Some((1, ca.len() as u64));
                assert!(read(&path, &shifted).await.is_err());
                let mut beyond = rb.clone();
                beyond.at = Some((pack.len() as u64, 100));
                assert!(read(&path, &beyond).await.is_err());

                // A single-snapshot file as earlier versions wrote it.
                let (mut rs, cs) = encode(&a);
                rs.name = snapshot_name(1, 10, 8);
                write(&path, &rs.name, &cs).await.unwrap();
                assert_eq!(read(&path, &rs).await.unwrap(), a);

                // Damage inside the second snapshot: it fails, naming its
                // place; the first still reads.
                let file = path.join(&name);
                let mut bytes = std::fs::read(&file).unwrap();
                assert_eq!(bytes.len(), pack.len());
                bytes[ca.len() + 2000] ^= 1;
                std::fs::write(&file, &bytes).unwrap();
                match read(&path, &rb).await {
                    Err(WalError::Corruption { offset, .. }) => {
                        assert!(offset >= ca.len() as u64, "offset {offset}")
                    }
                    other => panic!("damage went unnoticed: {other:?}"),
                }
                assert_eq!(read(&path, &ra).await.unwrap(), a);
                std::fs::remove_file(&file).unwrap();
                assert!(matches!(
                    read(&path, &ra).await,
                    Err(WalError::Corruption { .. })
                ));
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
