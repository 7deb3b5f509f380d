//! Wire encodings of gRPC over HTTP/2 that do not touch a socket: the 5-byte
//! length-prefixed message framing, the `grpc-timeout` header value and the
//! percent-encoding of `grpc-message`.
//!
//! Everything here is a pure function (or a small incremental decoder) so the
//! server and the client share one implementation and it can be unit tested
//! without a network.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};

use super::status::{Code, Status};

/// Length of the message prefix: compressed flag (u8) + length (u32 BE).
pub const PREFIX_LEN: usize = 5;

/// Messages at most this long are copied behind their prefix into a single
/// buffer; longer ones are sent as prefix + original buffer to avoid copying
/// large payloads.
const COALESCE_LIMIT: usize = 8 << 10;

/// Upper bound for the up-front buffer reservation while a message is
/// received. Why: the declared length is peer-controlled; reserving all of it
/// at once would let a client pin `max_message_size` bytes per stream by
/// sending only a prefix. Beyond this the buffer grows with the data that
/// actually arrives (which HTTP/2 flow control bounds).
const MAX_PRESIZE: usize = 64 << 10;

/// Why a received byte stream is not exactly one valid gRPC message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Compressed flag set; this implementation negotiates no compression.
    #[error("compressed messages are not supported (no grpc-encoding is accepted)")]
    Compressed,
    /// The compressed flag was neither 0 nor 1.
    #[error("invalid compressed flag {0} in message prefix")]
    BadFlag(u8),
    /// The declared message length exceeds the receiver's limit.
    #[error("message length {len} exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The stream ended without any message.
    #[error("missing message: the stream ended before any message was received")]
    Missing,
    /// The stream ended in the middle of a prefix or message.
    #[error("incomplete message: stream ended after {got} of {want} bytes")]
    Incomplete { got: usize, want: usize },
    /// Bytes followed the single message of a unary call.
    #[error("unexpected data after the message (unary calls carry exactly one message)")]
    Trailing,
}

impl FrameError {
    /// The status a receiver reports for this error.
    ///
    /// Why these codes: they follow the other gRPC implementations. An
    /// unsupported compression is UNIMPLEMENTED (gRPC compression spec), an
    /// over-long message RESOURCE_EXHAUSTED, and every malformed stream
    /// (no message, truncated frame, extra messages, bad flag) is a protocol
    /// violation of the peer, which grpc-go and grpc-java report as INTERNAL
    /// rather than INVALID_ARGUMENT (the latter is reserved for
    /// application-level argument errors).
    pub fn to_status(&self) -> Status {
        let code = match self {
            FrameError::Compressed => Code::Unimplemented,
            FrameError::TooLarge { .. } => Code::ResourceExhausted,
            FrameError::BadFlag(_)
            | FrameError::Missing
            | FrameError::Incomplete { .. }
            | FrameError::Trailing => Code::Internal,
        };
        Status::new(code, self.to_string())
    }
}

/// The 5-byte prefix of an uncompressed message of `len` bytes, or `None`
/// when `len` does not fit the 32-bit length field.
pub fn prefix(len: usize) -> Option<[u8; PREFIX_LEN]> {
    let len = u32::try_from(len).ok()?;
    let l = len.to_be_bytes();
    Some([0, l[0], l[1], l[2], l[3]])
}

/// Frames `msg` as one uncompressed gRPC message.
///
/// Returns the pieces to send in order: one buffer for small messages, the
/// prefix and `msg` itself (not copied) for large ones. `None` if `msg` is
/// longer than the 32-bit length field allows.
pub fn encode(msg: Bytes) -> Option<Vec<Bytes>> {
    let p = prefix(msg.len())?;
    if msg.len() <= COALESCE_LIMIT {
        let mut buf = BytesMut::with_capacity(PREFIX_LEN + msg.len());
        buf.extend_from_slice(&p);
        buf.extend_from_slice(&msg);
        Some(vec![buf.freeze()])
    } else {
        Some(vec![Bytes::copy_from_slice(&p), msg])
    }
}

/// Incremental decoder of the body of a unary call: exactly one message.
///
/// Feed it the DATA chunks as they arrive with [`push`](Self::push) (which
/// fails early: an oversized or compressed message is rejected as soon as its
/// prefix is complete, before the payload is buffered), then call
/// [`finish`](Self::finish) at end of stream.
#[derive(Debug)]
pub struct UnaryDecoder {
    max: usize,
    prefix: [u8; PREFIX_LEN],
    prefix_len: usize,
    /// Declared length, once the prefix is complete.
    want: Option<usize>,
    /// Payload bytes received so far (only used when the message spans
    /// several chunks).
    buf: BytesMut,
    message: Option<Bytes>,
}

impl UnaryDecoder {
    /// A decoder accepting messages of at most `max_message_size` bytes.
    pub fn new(max_message_size: usize) -> UnaryDecoder {
        UnaryDecoder {
            max: max_message_size,
            prefix: [0; PREFIX_LEN],
            prefix_len: 0,
            want: None,
            buf: BytesMut::new(),
            message: None,
        }
    }

    /// Consumes the next chunk of the stream.
    pub fn push(&mut self, mut chunk: Bytes) -> Result<(), FrameError> {
        self.feed(&mut chunk)?;
        if chunk.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Trailing)
        }
    }

    /// Consumes bytes from the front of `chunk` until one message is
    /// complete (what follows it stays in `chunk`) or `chunk` is empty.
    fn feed(&mut self, chunk: &mut Bytes) -> Result<(), FrameError> {
        while !chunk.is_empty() && self.message.is_none() {
            match self.want {
                None => {
                    let take = (PREFIX_LEN - self.prefix_len).min(chunk.len());
                    self.prefix[self.prefix_len..self.prefix_len + take]
                        .copy_from_slice(&chunk[..take]);
                    self.prefix_len += take;
                    chunk.advance(take);
                    if self.prefix_len == PREFIX_LEN {
                        let len = self.parse_prefix()?;
                        self.want = Some(len);
                        if chunk.len() >= len {
                            // Common case: the whole message is in this
                            // chunk; hand out a slice instead of copying.
                            self.message = Some(chunk.split_to(len));
                        } else {
                            self.buf.reserve(len.min(MAX_PRESIZE));
                        }
                    }
                }
                Some(want) => {
                    let take = (want - self.buf.len()).min(chunk.len());
                    self.buf.extend_from_slice(&chunk[..take]);
                    chunk.advance(take);
                    if self.buf.len() == want {
                        self.message = Some(self.buf.split().freeze());
                    }
                }
            }
        }
        Ok(())
    }

    /// Ends the stream, returning the single message.
    pub fn finish(self) -> Result<Bytes, FrameError> {
        if let Some(m) = self.message {
            return Ok(m);
        }
        match self.want {
            Some(want) => Err(FrameError::Incomplete {
                got: PREFIX_LEN + self.buf.len(),
                want: PREFIX_LEN + want,
            }),
            None if self.prefix_len == 0 => Err(FrameError::Missing),
            None => Err(FrameError::Incomplete {
                got: self.prefix_len,
                want: PREFIX_LEN,
            }),
        }
    }

    fn parse_prefix(&self) -> Result<usize, FrameError> {
        match self.prefix[0] {
            0 => {}
            1 => return Err(FrameError::Compressed),
            f => return Err(FrameError::BadFlag(f)),
        }
        let len = u32::from_be_bytes([
            self.prefix[1],
            self.prefix[2],
            self.prefix[3],
            self.prefix[4],
        ]);
        // u32 always fits usize on the 64-bit targets glommio supports; a
        // failed conversion is treated as "too large" rather than trusted.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok(len)
    }
}

/// Incremental decoder of a stream of messages (a streaming call's body).
#[derive(Debug)]
pub struct StreamDecoder {
    max: usize,
    current: UnaryDecoder,
    ready: std::collections::VecDeque<Bytes>,
}

impl StreamDecoder {
    /// A decoder accepting messages of at most `max_message_size` bytes.
    pub fn new(max_message_size: usize) -> StreamDecoder {
        StreamDecoder {
            max: max_message_size,
            current: UnaryDecoder::new(max_message_size),
            ready: Default::default(),
        }
    }

    /// Consumes the next chunk; complete messages become [`Self::next_message`]'s.
    pub fn push(&mut self, mut chunk: Bytes) -> Result<(), FrameError> {
        while !chunk.is_empty() {
            self.current.feed(&mut chunk)?;
            if let Some(m) = self.current.message.take() {
                self.ready.push_back(m);
                self.current = UnaryDecoder::new(self.max);
            }
        }
        Ok(())
    }

    /// The next complete message, if any.
    pub fn next_message(&mut self) -> Option<Bytes> {
        self.ready.pop_front()
    }

    /// At the end of the stream: fails if a message was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.current.want {
            Some(want) => Err(FrameError::Incomplete {
                got: PREFIX_LEN + self.current.buf.len(),
                want: PREFIX_LEN + want,
            }),
            None if self.current.prefix_len > 0 => Err(FrameError::Incomplete {
                got: self.current.prefix_len,
                want: PREFIX_LEN,
            }),
            None => Ok(()),
        }
    }
}

/// Why a `grpc-timeout` value was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed grpc-timeout {0:?}: expected 1-8 digits followed by one of H M S m u n")]
pub struct TimeoutError(pub String);

/// Largest value the 8-digit `grpc-timeout` field can carry.
const TIMEOUT_MAX_VALUE: u64 = 99_999_999;

/// Parses a `grpc-timeout` value: `TimeoutValue TimeoutUnit`, where the
/// value is 1 to 8 ASCII digits and the unit one of `H M S m u n`.
pub fn parse_timeout(s: &str) -> Result<Duration, TimeoutError> {
    let err = || TimeoutError(s.to_owned());
    let bytes = s.as_bytes();
    let (unit, digits) = bytes.split_last().ok_or_else(err)?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(err());
    }
    // At most 8 ASCII digits: the fold cannot overflow.
    let v = digits
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    let d = match unit {
        b'H' => Duration::from_secs(v * 3600),
        b'M' => Duration::from_secs(v * 60),
        b'S' => Duration::from_secs(v),
        b'm' => Duration::from_millis(v),
        b'u' => Duration::from_micros(v),
        b'n' => Duration::from_nanos(v),
        _ => return Err(err()),
    };
    Ok(d)
}

/// Formats `d` as a `grpc-timeout` value, in the finest unit whose value
/// fits 8 digits.
///
/// Why rounding up: a coarser unit must not shorten the caller's deadline
/// (grpc-go does the same). Durations beyond the field's range saturate at
/// `99999999H`.
pub fn format_timeout(d: Duration) -> String {
    const UNITS: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let nanos = d.as_nanos();
    for (per, unit) in UNITS {
        let v = nanos.div_ceil(per);
        if v <= u128::from(TIMEOUT_MAX_VALUE) {
            return format!("{v}{unit}");
        }
    }
    format!("{TIMEOUT_MAX_VALUE}H")
}

/// Percent-encodes a `grpc-message` value: every byte outside the printable
/// ASCII range 0x20..=0x7E, and `%` itself, becomes `%XX` (upper-case hex)
/// of its UTF-8 encoding.
pub fn percent_encode(msg: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(msg.len());
    for &b in msg.as_bytes() {
        if (0x20..=0x7E).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
    out
}

/// Decodes a percent-encoded `grpc-message`.
///
/// Lenient by design (as the gRPC spec asks of receivers): a `%` not
/// followed by two hex digits is kept literally, and invalid UTF-8 in the
/// result is replaced rather than rejected, so a bad message never hides the
/// status code.
pub fn percent_decode(s: &[u8]) -> String {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        if b == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    fn framed(msgs: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            out.extend_from_slice(&prefix(m.len()).unwrap());
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn messages_come_out_whole_however_the_bytes_are_cut() {
        let wire = framed(&[b"one", b"", b"three", &[9u8; 300]]);
        for step in [1, 2, 3, 7, 64, wire.len()] {
            let mut d = StreamDecoder::new(1024);
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                d.push(Bytes::copy_from_slice(piece)).unwrap();
                while let Some(m) = d.next_message() {
                    got.push(m);
                }
            }
            d.finish().unwrap();
            assert_eq!(got.len(), 4, "step {step}");
            assert_eq!(&got[0][..], b"one");
            assert!(got[1].is_empty());
            assert_eq!(&got[2][..], b"three");
            assert_eq!(got[3].len(), 300);
        }
    }

    #[test]
    fn a_cut_off_or_oversized_message_is_an_error() {
        let wire = framed(&[b"abcdef"]);
        let mut d = StreamDecoder::new(1024);
        d.push(Bytes::copy_from_slice(&wire[..4])).unwrap();
        assert!(matches!(d.finish(), Err(FrameError::Incomplete { .. })));
        let mut d = StreamDecoder::new(1024);
        d.push(Bytes::copy_from_slice(&wire[..8])).unwrap();
        assert!(matches!(d.finish(), Err(FrameError::Incomplete { .. })));
        let mut d = StreamDecoder::new(3);
        assert!(matches!(
            d.push(Bytes::from(wire)),
            Err(FrameError::TooLarge { .. })
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(msg: &[u8]) -> Bytes {
        let pieces = encode(Bytes::copy_from_slice(msg)).expect("small message");
        let mut all = BytesMut::new();
        for p in pieces {
            all.extend_from_slice(&p);
        }
        all.freeze()
    }

    fn decode_chunks(chunks: &[&[u8]], max: usize) -> Result<Bytes, FrameError> {
        let mut d = UnaryDecoder::new(max);
        for c in chunks {
            d.push(Bytes::copy_from_slice(c))?;
        }
        d.finish()
    }

    #[test]
    fn prefix_layout() {
        assert_eq!(prefix(0x0102_0304), Some([0, 1, 2, 3, 4]));
        assert_eq!(prefix(0), Some([0; 5]));
    }

    #[test]
    fn round_trip_small_and_large() {
        for len in [
            0usize,
            1,
            127,
            4096,
            COALESCE_LIMIT,
            COALESCE_LIMIT + 1,
            300_000,
        ] {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let pieces = encode(Bytes::from(msg.clone())).expect("fits");
            let expected_pieces = if len <= COALESCE_LIMIT { 1 } else { 2 };
            assert_eq!(pieces.len(), expected_pieces, "len {len}");
            let mut d = UnaryDecoder::new(1 << 20);
            for p in pieces {
                d.push(p).expect("valid");
            }
            assert_eq!(d.finish().expect("complete"), msg, "len {len}");
        }
    }

    #[test]
    fn split_across_chunks_at_every_offset() {
        let msg: Vec<u8> = (0..50u8).collect();
        let wire = framed(&msg);
        for cut in 0..=wire.len() {
            let got = decode_chunks(&[&wire[..cut], &wire[cut..]], 1024).expect("valid");
            assert_eq!(got, msg, "cut at {cut}");
        }
        // One byte per chunk.
        let chunks: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(decode_chunks(&chunks, 1024).expect("valid"), msg);
    }

    #[test]
    fn oversize_is_rejected_at_the_prefix() {
        let mut d = UnaryDecoder::new(10);
        // Only the prefix arrives; the error must not wait for the payload.
        let err = d
            .push(Bytes::from_static(&[0, 0, 0, 0, 11]))
            .expect_err("too large");
        assert_eq!(err, FrameError::TooLarge { len: 11, max: 10 });
        assert_eq!(err.to_status().code, Code::ResourceExhausted);
        // Exactly the limit is fine.
        assert_eq!(
            decode_chunks(&[&framed(&[7; 10])], 10).expect("ok").len(),
            10
        );
    }

    #[test]
    fn huge_declared_length_does_not_allocate_it() {
        let mut d = UnaryDecoder::new(usize::MAX);
        d.push(Bytes::from_static(&[0, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2]))
            .expect("accepted");
        assert!(d.buf.capacity() <= MAX_PRESIZE + 64);
        assert!(matches!(d.finish(), Err(FrameError::Incomplete { .. })));
    }

    #[test]
    fn compressed_and_bad_flags() {
        let err = decode_chunks(&[&[1, 0, 0, 0, 1, 9]], 100).expect_err("compressed");
        assert_eq!(err, FrameError::Compressed);
        assert_eq!(err.to_status().code, Code::Unimplemented);
        let err = decode_chunks(&[&[2, 0, 0, 0, 0]], 100).expect_err("bad flag");
        assert_eq!(err, FrameError::BadFlag(2));
        assert_eq!(err.to_status().code, Code::Internal);
    }

    #[test]
    fn missing_truncated_and_trailing() {
        assert_eq!(decode_chunks(&[], 100), Err(FrameError::Missing));
        assert_eq!(decode_chunks(&[&[]], 100), Err(FrameError::Missing));
        assert_eq!(
            decode_chunks(&[&[0, 0]], 100),
            Err(FrameError::Incomplete { got: 2, want: 5 })
        );
        let err = decode_chunks(&[&[0, 0, 0, 0, 4, 1, 2]], 100).expect_err("truncated");
        assert_eq!(err, FrameError::Incomplete { got: 7, want: 9 });
        assert_eq!(err.to_status().code, Code::Internal);
        assert!(err.to_status().message.contains("incomplete message"));
        // Two messages, or garbage after one.
        let two = [framed(b"a"), framed(b"b")].concat();
        assert_eq!(decode_chunks(&[&two], 100), Err(FrameError::Trailing));
        assert_eq!(
            decode_chunks(&[&framed(b"a"), &[0xde]], 100),
            Err(FrameError::Trailing)
        );
        // Empty message is a valid message.
        assert_eq!(decode_chunks(&[&framed(b"")], 100).expect("ok").len(), 0);
    }

    #[test]
    fn timeout_parse_table() {
        let ok = [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("100m", Duration::from_millis(100)),
            ("5u", Duration::from_micros(5)),
            ("7n", Duration::from_nanos(7)),
            ("0m", Duration::ZERO),
            ("00000001S", Duration::from_secs(1)),
            ("99999999H", Duration::from_secs(99_999_999 * 3600)),
        ];
        for (s, d) in ok {
            assert_eq!(parse_timeout(s), Ok(d), "{s}");
        }
        let bad = [
            "",
            "S",
            "m",
            "10",
            "123456789S",
            "1s",
            "1h",
            "-1S",
            "+1S",
            " 1S",
            "1S ",
            "1.5S",
            "1mm",
            "1 m",
            "١S",
            "1µ",
        ];
        for s in bad {
            assert_eq!(parse_timeout(s), Err(TimeoutError(s.to_owned())), "{s:?}");
        }
    }

    #[test]
    fn timeout_format_round_trips_and_never_shortens() {
        let cases = [
            (Duration::ZERO, "0n"),
            (Duration::from_nanos(1), "1n"),
            (Duration::from_millis(100), "100000u"),
            (Duration::from_millis(250), "250000u"),
            (Duration::from_secs(30), "30000000u"),
            (Duration::from_secs(1000), "1000000m"),
            (Duration::from_nanos(100_000_001), "100001u"),
            (Duration::from_secs(u64::MAX), "99999999H"),
        ];
        for (d, s) in cases {
            assert_eq!(format_timeout(d), s, "{d:?}");
            let back = parse_timeout(s).expect("formatted value parses");
            assert!(back >= d || s == "99999999H", "{d:?} -> {s} -> {back:?}");
        }
    }

    #[test]
    fn percent_round_trip() {
        let cases = [
            ("", ""),
            ("plain ascii ok", "plain ascii ok"),
            ("100%", "100%25"),
            ("line\nbreak\ttab", "line%0Abreak%09tab"),
            ("héllo", "h%C3%A9llo"),
            ("\u{7f}~", "%7F~"),
            ("日本", "%E6%97%A5%E6%9C%AC"),
        ];
        for (raw, enc) in cases {
            assert_eq!(percent_encode(raw), enc);
            assert_eq!(percent_decode(enc.as_bytes()), raw);
        }
    }

    #[test]
    fn percent_decode_is_lenient() {
        assert_eq!(percent_decode(b"50%"), "50%");
        assert_eq!(percent_decode(b"%zz%4"), "%zz%4");
        assert_eq!(percent_decode(b"%4a%4A"), "JJ");
        // Invalid UTF-8 after decoding is replaced, not an error.
        assert_eq!(percent_decode(b"%FF"), "\u{FFFD}");
    }
}
