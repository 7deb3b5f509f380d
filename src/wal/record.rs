//! Record framing and payload codecs of the log. Pure: no I/O.
//!
//! A segment is a sequence of records followed by zeroes:
//!
//! ```text
//! record  = { u32 len | u32 crc32c | u8 kind | u64 group | payload }
//! ```
//!
//! All integers are little endian. `len` counts the bytes after the crc field
//! (kind + group + payload), so a real record always has `len >= 9`, and
//! `crc32c` covers exactly those `len` bytes. Segments are pre-zeroed before
//! use, so a zero `len` marks the end of the written data.
//!
//! Payloads by kind:
//!
//! ```text
//! SegmentHeader (1, group 0) = { u64 magic | u32 version | u64 seq }
//! Entries       (2) = { u32 count | count x { u32 len | eraftpb.Entry } }
//! HardState     (3) = eraftpb.HardState
//! ConfState     (4) = eraftpb.ConfState
//! SnapshotMeta  (5) = { u64 index | u64 term | u64 data_len | u32 file_crc
//!                     | u16 name_len | name (utf-8, file in `snap/`) }
//! Compact       (6) = { u64 index }
//! RemoveGroup   (7) = {}
//! SnapshotInline (8) = { u64 index | u64 term | u64 data_len | u32 crc
//!                      | content (the bytes a snapshot file would hold) }
//! SnapshotPacked (9) = { u64 index | u64 term | u64 data_len | u32 crc
//!                      | u64 offset | u64 len | u16 name_len | name }
//! ```
//!
//! SnapshotPacked names a snapshot stored at `offset..offset + len` of a
//! pack file in `snap/` that holds every snapshot one sync wrote (see
//! `snapshot.rs`); SnapshotMeta, written by earlier versions, names a file
//! holding one snapshot and nothing else.
//!
//! A small snapshot (every new replica starts from one) lives inside the
//! log as SnapshotInline instead of in a file of its own: thousands of
//! partitions bootstrapped at once then cost one log write and one
//! fdatasync per shard, not a file, an fdatasync and a rename each.
//!
//! Messages (`eraftpb.*`) are rust-protobuf encodings.

use protobuf::Message;
use raft::eraftpb::{ConfState, Entry, HardState};

/// Bytes of `len` + `crc32c`.
pub(crate) const FRAME_PREFIX: usize = 8;
/// Bytes of `kind` + `group`: the smallest legal `len`.
pub(crate) const MIN_BODY: usize = 9;
/// Full header: prefix + kind + group.
pub(crate) const HEADER_LEN: usize = FRAME_PREFIX + MIN_BODY;

/// "MRAFTWAL" as a little-endian u64.
pub(crate) const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"MRAFTWAL");
/// Format version of segments written by this code.
pub(crate) const SEGMENT_VERSION: u32 = 1;

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    SegmentHeader = 1,
    Entries = 2,
    HardState = 3,
    ConfState = 4,
    SnapshotMeta = 5,
    Compact = 6,
    RemoveGroup = 7,
    SnapshotInline = 8,
    SnapshotPacked = 9,
}

impl Kind {
    pub(crate) fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::SegmentHeader,
            2 => Kind::Entries,
            3 => Kind::HardState,
            4 => Kind::ConfState,
            5 => Kind::SnapshotMeta,
            6 => Kind::Compact,
            7 => Kind::RemoveGroup,
            8 => Kind::SnapshotInline,
            9 => Kind::SnapshotPacked,
            _ => return None,
        })
    }
}

/// A decoded, checksum-verified record borrowing its payload from the
/// segment buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    pub kind: Kind,
    pub group: u64,
    pub payload: &'a [u8],
}

/// Outcome of decoding at one offset.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// A valid record and its total framed size.
    Record(Record<'a>, usize),
    /// A zero header: nothing was written here.
    End,
    /// Not a valid record (torn write or corruption; the caller decides).
    Bad(&'static str),
}

/// Appends one framed record to `out`; `payload` writes the payload bytes.
pub(crate) fn encode(
    out: &mut Vec<u8>,
    kind: Kind,
    group: u64,
    payload: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_PREFIX]);
    out.push(kind as u8);
    out.extend_from_slice(&group.to_le_bytes());
    payload(out);
    let body = &out[start + FRAME_PREFIX..];
    // Record sizes are bounded well below 4 GiB: entry batches are split by
    // the writer (see `mod.rs`), and a single raft entry that large cannot
    // be sent by raft anyway.
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let crc = crc32c::crc32c(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes the record starting at `off` in `buf`.
pub(crate) fn decode_at(buf: &[u8], off: usize) -> Decoded<'_> {
    let rest = buf.get(off..).unwrap_or(&[]);
    if rest.len() < FRAME_PREFIX {
        return if rest.iter().all(|&b| b == 0) {
            Decoded::End
        } else {
            Decoded::Bad("truncated record header")
        };
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len == 0 {
        return if crc == 0 {
            Decoded::End
        } else {
            Decoded::Bad("zero length with non-zero checksum")
        };
    }
    if len < MIN_BODY {
        return Decoded::Bad("impossible record length");
    }
    let Some(body) = rest.get(FRAME_PREFIX..FRAME_PREFIX + len) else {
        return Decoded::Bad("record extends past the end of the segment");
    };
    if crc32c::crc32c(body) != crc {
        return Decoded::Bad("checksum mismatch");
    }
    let Some(kind) = Kind::from_u8(body[0]) else {
        return Decoded::Bad("unknown record kind");
    };
    let group = u64::from_le_bytes(body[1..9].try_into().unwrap_or_default());
    Decoded::Record(
        Record {
            kind,
            group,
            payload: &body[MIN_BODY..],
        },
        FRAME_PREFIX + len,
    )
}

/// Offset of the first valid record that starts strictly after `from` and
/// before `limit`, if any. Used to tell a torn tail (nothing valid follows)
/// from corruption in the middle of the data (valid records follow the bad
/// one). `limit` lets the caller skip the zeroed remainder of a segment.
pub(crate) fn find_valid_after(buf: &[u8], from: usize, limit: usize) -> Option<usize> {
    let end = buf
        .len()
        .saturating_sub(HEADER_LEN)
        .min(limit.saturating_sub(1));
    let mut off = from + 1;
    while off <= end {
        // Cheap filters first; the checksum is only computed for plausible
        // candidates.
        let len = u32::from_le_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        if len >= MIN_BODY
            && off + FRAME_PREFIX + len <= buf.len()
            && Kind::from_u8(buf[off + FRAME_PREFIX]).is_some()
        {
            if let Decoded::Record(..) = decode_at(buf, off) {
                return Some(off);
            }
        }
        off += 1;
    }
    None
}

/// One past the last non-zero byte of `buf` (0 if all zero): where data
/// ends in a pre-zeroed segment. Compares eight bytes at a time, from the
/// end: recovery runs it over whole segments, mostly zeroes, and a byte
/// at a time it took longer than reading them.
pub(crate) fn nonzero_end(buf: &[u8]) -> usize {
    let words = buf.len() / 8;
    let tail = &buf[words * 8..];
    if let Some(p) = tail.iter().rposition(|&b| b != 0) {
        return words * 8 + p + 1;
    }
    let word = |i: usize| u64::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    match (0..words).rev().find(|&i| word(i) != 0) {
        Some(i) => {
            let w = &buf[i * 8..i * 8 + 8];
            i * 8 + w.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1)
        }
        None => 0,
    }
}

/// Error of a payload that passed its checksum but does not parse.
/// Why a record's payload does not parse (a message naming the field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PayloadError(pub String);

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for PayloadError {
    fn from(s: &str) -> PayloadError {
        PayloadError(s.to_string())
    }
}

impl From<String> for PayloadError {
    fn from(s: String) -> PayloadError {
        PayloadError(s)
    }
}

/// A little cursor over a payload.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PayloadError> {
        if self.buf.len() < n {
            return Err(
                format!("payload truncated: need {n} bytes, have {}", self.buf.len()).into(),
            );
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, PayloadError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, PayloadError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, PayloadError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn finish(self) -> Result<(), PayloadError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing payload bytes", self.buf.len()).into())
        }
    }
}

/// Encodes a rust-protobuf message into `out`.
pub(crate) fn put_message<M: Message>(out: &mut Vec<u8>, m: &M) {
    // Serializing a proto3 message into a Vec has no failure mode (no
    // required fields, no I/O); the Result only exists for proto2.
    let _ = m.write_to_vec(out);
}

fn parse_message<M: Message>(bytes: &[u8]) -> Result<M, PayloadError> {
    M::parse_from_bytes(bytes).map_err(|e| format!("bad protobuf: {e}").into())
}

// ---- SegmentHeader ----

pub(crate) fn put_segment_header(out: &mut Vec<u8>, seq: u64) {
    encode(out, Kind::SegmentHeader, 0, |p| {
        p.extend_from_slice(&SEGMENT_MAGIC.to_le_bytes());
        p.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
        p.extend_from_slice(&seq.to_le_bytes());
    });
}

/// Returns the sequence number stored in a segment header payload.
pub(crate) fn parse_segment_header(payload: &[u8]) -> Result<u64, PayloadError> {
    let mut r = Reader { buf: payload };
    let magic = r.u64()?;
    if magic != SEGMENT_MAGIC {
        return Err(format!("bad segment magic {magic:#x}").into());
    }
    let version = r.u32()?;
    if version != SEGMENT_VERSION {
        return Err(format!("unsupported segment version {version}").into());
    }
    let seq = r.u64()?;
    r.finish()?;
    Ok(seq)
}

// ---- Entries ----

/// Encoded size of one entry inside an Entries payload.
pub(crate) fn entry_size(e: &Entry) -> usize {
    4 + e.compute_size() as usize
}

pub(crate) fn put_entries(out: &mut Vec<u8>, group: u64, entries: &[Entry]) {
    encode(out, Kind::Entries, group, |p| {
        p.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in entries {
            // `compute_size` caches the size, so `write_to_vec` below
            // produces exactly this many bytes.
            let len = e.compute_size();
            p.extend_from_slice(&len.to_le_bytes());
            put_message(p, e);
        }
    });
}

pub(crate) fn parse_entries(payload: &[u8]) -> Result<Vec<Entry>, PayloadError> {
    let mut r = Reader { buf: payload };
    let count = r.u32()? as usize;
    // Do not trust `count` for the allocation: each entry takes >= 4 bytes.
    let mut entries = Vec::with_capacity(count.min(payload.len() / 4));
    let mut prev: Option<u64> = None;
    for _ in 0..count {
        let len = r.u32()? as usize;
        let e: Entry = parse_message(r.take(len)?)?;
        if let Some(p) = prev {
            if e.index != p + 1 {
                return Err(format!("entries not contiguous: {} after {}", e.index, p).into());
            }
        }
        prev = Some(e.index);
        entries.push(e);
    }
    r.finish()?;
    Ok(entries)
}

// ---- HardState / ConfState ----

pub(crate) fn put_hard_state(out: &mut Vec<u8>, group: u64, hs: &HardState) {
    encode(out, Kind::HardState, group, |p| put_message(p, hs));
}

pub(crate) fn parse_hard_state(payload: &[u8]) -> Result<HardState, PayloadError> {
    parse_message(payload)
}

pub(crate) fn put_conf_state(out: &mut Vec<u8>, group: u64, cs: &ConfState) {
    encode(out, Kind::ConfState, group, |p| put_message(p, cs));
}

pub(crate) fn parse_conf_state(payload: &[u8]) -> Result<ConfState, PayloadError> {
    parse_message(payload)
}

// ---- SnapshotMeta ----

/// Reference from the log to a snapshot: a file in `snap/`, or (for a
/// small one) its content carried by the record itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotRef {
    pub index: u64,
    pub term: u64,
    pub data_len: u64,
    /// crc32c stored in (and covering) the snapshot file; see `snapshot.rs`.
    pub file_crc: u32,
    /// The file's name; empty for an inline snapshot.
    pub name: String,
    /// `(offset, len)` of the snapshot inside a pack file; `None` for a
    /// file that holds this one snapshot only (or an inline one).
    pub at: Option<(u64, u64)>,
    /// An inline snapshot's content (what its file would hold).
    pub inline: Option<Vec<u8>>,
}

pub(crate) fn put_snapshot_meta(out: &mut Vec<u8>, group: u64, s: &SnapshotRef) {
    if let Some(content) = &s.inline {
        encode(out, Kind::SnapshotInline, group, |p| {
            p.extend_from_slice(&s.index.to_le_bytes());
            p.extend_from_slice(&s.term.to_le_bytes());
            p.extend_from_slice(&s.data_len.to_le_bytes());
            p.extend_from_slice(&s.file_crc.to_le_bytes());
            p.extend_from_slice(content);
        });
        return;
    }
    if let Some((offset, len)) = s.at {
        encode(out, Kind::SnapshotPacked, group, |p| {
            p.extend_from_slice(&s.index.to_le_bytes());
            p.extend_from_slice(&s.term.to_le_bytes());
            p.extend_from_slice(&s.data_len.to_le_bytes());
            p.extend_from_slice(&s.file_crc.to_le_bytes());
            p.extend_from_slice(&offset.to_le_bytes());
            p.extend_from_slice(&len.to_le_bytes());
            p.extend_from_slice(&(s.name.len() as u16).to_le_bytes());
            p.extend_from_slice(s.name.as_bytes());
        });
        return;
    }
    encode(out, Kind::SnapshotMeta, group, |p| {
        p.extend_from_slice(&s.index.to_le_bytes());
        p.extend_from_slice(&s.term.to_le_bytes());
        p.extend_from_slice(&s.data_len.to_le_bytes());
        p.extend_from_slice(&s.file_crc.to_le_bytes());
        // Names are generated by `snapshot.rs` and are short.
        p.extend_from_slice(&(s.name.len() as u16).to_le_bytes());
        p.extend_from_slice(s.name.as_bytes());
    });
}

pub(crate) fn parse_snapshot_meta(payload: &[u8]) -> Result<SnapshotRef, PayloadError> {
    parse_snapshot_file(payload, false)
}

pub(crate) fn parse_snapshot_packed(payload: &[u8]) -> Result<SnapshotRef, PayloadError> {
    parse_snapshot_file(payload, true)
}

fn parse_snapshot_file(payload: &[u8], packed: bool) -> Result<SnapshotRef, PayloadError> {
    let mut r = Reader { buf: payload };
    let index = r.u64()?;
    let term = r.u64()?;
    let data_len = r.u64()?;
    let file_crc = r.u32()?;
    let at = if packed {
        let (offset, len) = (r.u64()?, r.u64()?);
        if offset.checked_add(len).is_none() {
            return Err(format!("snapshot at {offset} of length {len} overflows").into());
        }
        Some((offset, len))
    } else {
        None
    };
    let name_len = r.u16()? as usize;
    let name = std::str::from_utf8(r.take(name_len)?)
        .map_err(|_| "snapshot file name is not utf-8".to_string())?
        .to_string();
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(format!("invalid snapshot file name {name:?}").into());
    }
    r.finish()?;
    Ok(SnapshotRef {
        index,
        term,
        data_len,
        file_crc,
        name,
        at,
        inline: None,
    })
}

pub(crate) fn parse_snapshot_inline(payload: &[u8]) -> Result<SnapshotRef, PayloadError> {
    let mut r = Reader { buf: payload };
    let index = r.u64()?;
    let term = r.u64()?;
    let data_len = r.u64()?;
    let file_crc = r.u32()?;
    Ok(SnapshotRef {
        index,
        term,
        data_len,
        file_crc,
        name: String::new(),
        at: None,
        inline: Some(r.buf.to_vec()),
    })
}

// ---- Compact / RemoveGroup ----

pub(crate) fn put_compact(out: &mut Vec<u8>, group: u64, index: u64) {
    encode(out, Kind::Compact, group, |p| {
        p.extend_from_slice(&index.to_le_bytes())
    });
}

pub(crate) fn parse_compact(payload: &[u8]) -> Result<u64, PayloadError> {
    let mut r = Reader { buf: payload };
    let index = r.u64()?;
    r.finish()?;
    Ok(index)
}

pub(crate) fn put_remove_group(out: &mut Vec<u8>, group: u64) {
    encode(out, Kind::RemoveGroup, group, |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn decode_all(buf: &[u8]) -> Vec<Record<'_>> {
        let mut off = 0;
        let mut out = Vec::new();
        while let Decoded::Record(r, n) = decode_at(buf, off) {
            out.push(r);
            off += n;
        }
        out
    }

    #[test]
    fn round_trip_every_kind() {
        let mut buf = Vec::new();
        put_segment_header(&mut buf, 42);
        let entries = vec![
            entry(5, 2, b"a"),
            entry(6, 2, b""),
            entry(7, 3, &[7u8; 300]),
        ];
        put_entries(&mut buf, 9, &entries);
        let hs = HardState {
            term: 3,
            vote: 2,
            commit: 6,
            ..Default::default()
        };
        put_hard_state(&mut buf, 9, &hs);
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        put_conf_state(&mut buf, 9, &cs);
        let s = SnapshotRef {
            index: 4,
            term: 1,
            data_len: 100,
            file_crc: 0xdead_beef,
            name: "x.snap".into(),
            at: None,
            inline: None,
        };
        put_snapshot_meta(&mut buf, 9, &s);
        put_compact(&mut buf, 9, 4);
        put_remove_group(&mut buf, 10);
        buf.extend_from_slice(&[0u8; 64]);

        let recs = decode_all(&buf);
        assert_eq!(recs.len(), 7);
        assert_eq!(recs[0].kind, Kind::SegmentHeader);
        assert_eq!(parse_segment_header(recs[0].payload).unwrap(), 42);
        assert_eq!((recs[1].kind, recs[1].group), (Kind::Entries, 9));
        assert_eq!(parse_entries(recs[1].payload).unwrap(), entries);
        assert_eq!(parse_hard_state(recs[2].payload).unwrap(), hs);
        assert_eq!(parse_conf_state(recs[3].payload).unwrap(), cs);
        assert_eq!(recs[4].kind, Kind::SnapshotMeta);
        assert_eq!(parse_snapshot_meta(recs[4].payload).unwrap(), s);
        assert_eq!(parse_compact(recs[5].payload).unwrap(), 4);
        assert_eq!((recs[6].kind, recs[6].group), (Kind::RemoveGroup, 10));
        assert!(recs[6].payload.is_empty());
        let end: usize = {
            let mut off = 0;
            while let Decoded::Record(_, n) = decode_at(&buf, off) {
                off += n;
            }
            off
        };
        assert_eq!(decode_at(&buf, end), Decoded::End);
        assert_eq!(
            entry_size(&entries[2]),
            4 + entries[2].compute_size() as usize
        );
    }

    #[test]
    fn crc_mismatch_is_detected_for_every_byte() {
        let mut buf = Vec::new();
        put_entries(&mut buf, 1, &[entry(1, 1, b"hello")]);
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            assert!(
                matches!(decode_at(&b, 0), Decoded::Bad(_)),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn packed_snapshot_refs_round_trip_and_refuse_bad_spans() {
        let s = SnapshotRef {
            index: 7,
            term: 2,
            data_len: 10,
            file_crc: 5,
            name: "00000000000000ab.pack".into(),
            at: Some((4096, 100)),
            inline: None,
        };
        let mut buf = Vec::new();
        put_snapshot_meta(&mut buf, 3, &s);
        let recs = decode_all(&buf);
        assert_eq!(recs[0].kind, Kind::SnapshotPacked);
        assert_eq!(parse_snapshot_packed(recs[0].payload).unwrap(), s);

        let overflowing = SnapshotRef {
            at: Some((u64::MAX, 2)),
            ..s.clone()
        };
        let mut buf = Vec::new();
        put_snapshot_meta(&mut buf, 3, &overflowing);
        assert!(parse_snapshot_packed(decode_all(&buf)[0].payload).is_err());
        let unnamed = SnapshotRef {
            name: String::new(),
            ..s
        };
        let mut buf = Vec::new();
        put_snapshot_meta(&mut buf, 3, &unnamed);
        assert!(parse_snapshot_packed(decode_all(&buf)[0].payload).is_err());
    }

    #[test]
    fn truncated_and_impossible_headers() {
        let mut buf = Vec::new();
        put_compact(&mut buf, 1, 7);
        assert_eq!(
            decode_at(&buf[..5], 0),
            Decoded::Bad("truncated record header")
        );
        assert!(matches!(
            decode_at(&buf[..buf.len() - 1], 0),
            Decoded::Bad(_)
        ));
        assert_eq!(decode_at(&[0u8; 5], 0), Decoded::End);
        let mut bad = buf.clone();
        bad[0..4].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(decode_at(&bad, 0), Decoded::Bad("impossible record length"));
        let mut bad = buf.clone();
        bad[0..4].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(decode_at(&bad, 0), Decoded::Bad(_)));
    }

    #[test]
    fn nonzero_end_is_one_past_the_last_nonzero_byte() {
        let naive = |b: &[u8]| b.iter().rposition(|&x| x != 0).map_or(0, |p| p + 1);
        for len in 0..40 {
            let mut buf = vec![0u8; len];
            assert_eq!(nonzero_end(&buf), 0);
            for at in 0..len {
                buf.iter_mut().for_each(|b| *b = 0);
                buf[at] = 1;
                assert_eq!(nonzero_end(&buf), at + 1, "len {len}, at {at}");
                if at > 0 {
                    buf[0] = 0xff;
                    assert_eq!(nonzero_end(&buf), naive(&buf));
                }
            }
        }
    }

    #[test]
    fn find_valid_after_skips_garbage() {
        let mut buf = vec![0xffu8; 33];
        let second = buf.len();
        put_compact(&mut buf, 1, 7);
        assert_eq!(find_valid_after(&buf, 0, buf.len()), Some(second));
        assert_eq!(find_valid_after(&buf, 0, second), None);
        assert_eq!(find_valid_after(&buf, second, buf.len()), None);
    }

    #[test]
    fn payload_errors_are_results() {
        assert!(parse_entries(&[1, 0, 0, 0, 200, 0, 0, 0]).is_err());
        assert!(parse_snapshot_meta(&[0; 10]).is_err());
        assert!(parse_compact(&[0; 9]).is_err());
        assert!(parse_segment_header(&[0; 20]).is_err());
    }
}
