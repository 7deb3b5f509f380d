//! Wire format of the peer (raft) port, and a buffered frame reader.
//!
//! # Byte layout
//!
//! A peer connection is one-way: the connecting node (the client) writes, the
//! accepting node reads. The stream is a sequence of *frames*:
//!
//! ```text
//! +----------------------+-------------------------------+
//! | length: u32, big end | body: `length` bytes, protobuf|
//! +----------------------+-------------------------------+
//! ```
//!
//! - The first frame's body is a prost-encoded `multiraft.peer.v1.Hello`
//!   carrying the client's node id.
//! - Every later frame's body is a prost-encoded `multiraft.peer.v1.Envelope`.
//! - `length` counts only the body (not the 4 header bytes) and may be 0 (an
//!   empty message). A frame whose `length` exceeds the receiver's maximum
//!   frame size ([`DEFAULT_MAX_FRAME`] unless configured) is rejected before
//!   any of its body is buffered.
//! - There is no per-frame acknowledgement and no trailer; a sender batches
//!   many frames into one write, and a receiver may see frames split across
//!   reads at any byte. A connection that sends an oversize or undecodable
//!   frame, or ends in the middle of a frame, is closed by the receiver.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::io::{AsyncRead, AsyncReadExt};
use prost::Message;

/// Size of the length prefix in front of every frame body.
pub const HEADER_LEN: usize = 4;

/// Default maximum frame body size. Snapshots travel in 1 MiB chunks (see
/// `shard::snapshot`); a raft append can carry up to `max_size_per_msg` of
/// entries, and one entry may hold a value near the 4 MiB message limit.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// Largest frame accepted before the Hello: a Hello is a few bytes, and a
/// peer that has not said who it is must not make the node allocate more.
pub const MAX_HELLO_FRAME: usize = 1024;

/// A big frame's buffer grows by at most this much per read, and by no
/// more than it already holds (so at least doubling the bytes that arrived
/// before growing again, from [`READ_CHUNK`]): memory follows the bytes
/// that actually arrive, not the length a peer claims.
const MAX_GROWTH: usize = 1 << 20;

/// Reads smaller than this go through the reader's scratch buffer.
const READ_CHUNK: usize = 64 << 10;

/// Why a frame could not be produced or consumed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The (announced or actual) body length exceeds the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversize { len: usize, max: usize },
    /// The body is not a valid protobuf message of the expected type.
    #[error("undecodable frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    /// The underlying read failed.
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Appends one frame holding `msg` to `buf`; returns the number of bytes
/// appended (header included). Nothing is appended on error.
pub fn encode_frame<M: Message>(
    msg: &M,
    buf: &mut BytesMut,
    max_frame: usize,
) -> Result<usize, FrameError> {
    let len = msg.encoded_len();
    encode_frame_with_len(msg, len, buf, max_frame)
}

/// Like [`encode_frame`] with `len == msg.encoded_len()` already computed.
pub(crate) fn encode_frame_with_len<M: Message>(
    msg: &M,
    len: usize,
    buf: &mut BytesMut,
    max_frame: usize,
) -> Result<usize, FrameError> {
    let max = max_frame.min(u32::MAX as usize);
    if len > max {
        return Err(FrameError::Oversize { len, max });
    }
    buf.reserve(HEADER_LEN + len);
    buf.put_u32(len as u32);
    msg.encode(buf)
        .expect("BytesMut grows on demand, so encoding cannot run out of space");
    Ok(HEADER_LEN + len)
}

/// Splits the next complete frame body off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not hold a whole frame yet (nothing is
/// consumed), and an error as soon as the header announces an oversize body.
pub fn split_frame(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Bytes>, FrameError> {
    let Some(len) = peek_len(buf) else {
        return Ok(None);
    };
    if len > max_frame {
        return Err(FrameError::Oversize {
            len,
            max: max_frame,
        });
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    Ok(Some(buf.split_to(len).freeze()))
}

/// The body length announced by the header at the front of `buf`, if the
/// header is complete.
fn peek_len(buf: &[u8]) -> Option<usize> {
    let header: [u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
    Some(u32::from_be_bytes(header) as usize)
}

/// Decodes a frame body. Decoding from `Bytes` makes the message's `bytes`
/// fields slices of the frame rather than copies.
pub fn decode<M: Message + Default>(body: Bytes) -> Result<M, FrameError> {
    Ok(M::decode(body)?)
}

/// Pulls frames out of a byte stream, reading large chunks into one buffer
/// so that many frames cost one read.
pub struct FrameReader {
    buf: BytesMut,
    scratch: Box<[u8]>,
    max_frame: usize,
}

impl FrameReader {
    pub fn new(max_frame: usize) -> FrameReader {
        FrameReader {
            buf: BytesMut::with_capacity(READ_CHUNK),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            max_frame,
        }
    }

    /// A reader that starts with bytes already read from the stream (a
    /// connection moved to another shard after its Hello).
    pub fn with_buffered(max_frame: usize, buffered: &[u8]) -> FrameReader {
        let mut r = FrameReader::new(max_frame);
        r.buf.extend_from_slice(buffered);
        r
    }

    /// Changes the largest frame accepted from now on (raised after the
    /// Hello).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Bytes read from the stream but not yet returned as frames.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// The next frame body, or `Ok(None)` on a clean end of stream (EOF on a
    /// frame boundary).
    pub async fn next_frame<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(frame) = split_frame(&mut self.buf, self.max_frame)? {
                return Ok(Some(frame));
            }
            // Bytes still missing for the frame at the front (at least the
            // rest of its header).
            let missing = match peek_len(&self.buf) {
                Some(len) => HEADER_LEN + len - self.buf.len(),
                None => HEADER_LEN - self.buf.len(),
            };
            let n = if missing > self.scratch.len() {
                // A big frame: read straight into its place instead of
                // copying it through the scratch buffer, a bounded step at
                // a time (the length is the peer's claim, not yet data).
                let start = self.buf.len();
                let step = missing.min(MAX_GROWTH).min(start.max(READ_CHUNK));
                self.buf.resize(start + step, 0);
                let res = reader.read(&mut self.buf[start..]).await;
                let n = *res.as_ref().unwrap_or(&0);
                self.buf.truncate(start + n);
                res?
            } else {
                let n = reader.read(&mut self.scratch).await?;
                self.buf.extend_from_slice(&self.scratch[..n]);
                n
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated {
                        buffered: self.buf.len(),
                    })
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;
    use crate::proto::peer::envelope::Body;
    use crate::proto::peer::{Envelope, Hello, PeerRequest, RaftMessage};

    fn raft(partition_id: u32, payload: &[u8]) -> Envelope {
        Envelope {
            body: Some(Body::Raft(RaftMessage {
                partition_id,
                message: Bytes::copy_from_slice(payload),
            })),
        }
    }

    /// A reader that hands out its data in fixed-size pieces.
    struct Chunked {
        data: Bytes,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            out: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.chunk.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data.advance(n);
            Poll::Ready(Ok(n))
        }
    }

    fn stream_of(envs: &[Envelope]) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_frame(
            &Hello {
                node_id: 7,
                reserved: 0,
                shard: None,
            },
            &mut buf,
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        for env in envs {
            encode_frame(env, &mut buf, DEFAULT_MAX_FRAME).unwrap();
        }
        buf
    }

    #[test]
    fn header_is_big_endian_body_length() {
        let env = raft(1, b"abc");
        let mut buf = BytesMut::new();
        let n = encode_frame(&env, &mut buf, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(n, buf.len());
        let body_len = env.encoded_len();
        assert_eq!(&buf[..4], &(body_len as u32).to_be_bytes());
        assert_eq!(&buf[4..], &env.encode_to_vec()[..]);
    }

    #[test]
    fn split_round_trip_and_partial_input() {
        let envs = [raft(1, b"one"), Envelope::default(), raft(3, &[0xff; 300])];
        let all = stream_of(&envs).freeze();
        // Feed the bytes one at a time: frames appear exactly when complete.
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in all.iter() {
            buf.put_u8(*b);
            while let Some(f) = split_frame(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
                frames.push(f);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(frames.len(), 4);
        let hello: Hello = decode(frames[0].clone()).unwrap();
        assert_eq!(hello.node_id, 7);
        for (f, env) in frames[1..].iter().zip(&envs) {
            assert_eq!(&decode::<Envelope>(f.clone()).unwrap(), env);
        }
    }

    #[test]
    fn oversize_is_rejected_on_both_sides() {
        let env = raft(1, &[0; 100]);
        let mut buf = BytesMut::new();
        assert!(matches!(
            encode_frame(&env, &mut buf, 50),
            Err(FrameError::Oversize { .. })
        ));
        assert!(buf.is_empty(), "nothing appended on error");

        // The receiver rejects on the header alone.
        let mut buf = BytesMut::from(&(1_000_000u32).to_be_bytes()[..]);
        assert!(matches!(
            split_frame(&mut buf, 1000),
            Err(FrameError::Oversize {
                len: 1_000_000,
                max: 1000
            })
        ));
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(matches!(
            split_frame(&mut buf, DEFAULT_MAX_FRAME),
            Err(FrameError::Oversize { .. })
        ));
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        // Field 1, wire type 7 (invalid).
        let err = decode::<Envelope>(Bytes::from_static(&[0x0f, 0x01, 0x02])).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)));
    }

    #[test]
    fn decoded_bytes_fields_share_the_frame() {
        let env = Envelope {
            body: Some(Body::Request(PeerRequest {
                id: 9,
                method: "/x".into(),
                body: Bytes::from(vec![5; 1000]),
                ..Default::default()
            })),
        };
        let mut buf = BytesMut::new();
        encode_frame(&env, &mut buf, DEFAULT_MAX_FRAME).unwrap();
        let frame = split_frame(&mut buf, DEFAULT_MAX_FRAME).unwrap().unwrap();
        let range = frame.as_ptr_range();
        let Some(Body::Request(req)) = decode::<Envelope>(frame).unwrap().body else {
            panic!("wrong body");
        };
        assert!(range.contains(&req.body.as_ptr()), "body was copied");
    }

    fn read_all(data: Bytes, chunk: usize, max: usize) -> Result<Vec<Bytes>, FrameError> {
        let mut src = Chunked { data, chunk };
        let mut reader = FrameReader::new(max);
        futures::executor::block_on(async {
            let mut out = Vec::new();
            while let Some(f) = reader.next_frame(&mut src).await? {
                out.push(f);
            }
            Ok(out)
        })
    }

    #[test]
    fn reader_handles_any_split() {
        let big = vec![0xab; 3 * READ_CHUNK + 17];
        let envs: Vec<Envelope> = (0..50)
            .map(|i| raft(i, &vec![i as u8; i as usize * 7]))
            .chain([raft(99, &big), raft(100, b"after")])
            .collect();
        let all = stream_of(&envs).freeze();
        for chunk in [1, 3, 4, 5, 1000, READ_CHUNK, usize::MAX] {
            let frames = read_all(all.clone(), chunk, DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(frames.len(), envs.len() + 1, "chunk {chunk}");
            for (f, env) in frames[1..].iter().zip(&envs) {
                assert_eq!(&decode::<Envelope>(f.clone()).unwrap(), env);
            }
        }
    }

    #[test]
    fn reader_reports_truncation_and_oversize() {
        let all = stream_of(&[raft(1, b"hello")]).freeze();
        let cut = all.slice(..all.len() - 1);
        assert!(matches!(
            read_all(cut, 3, DEFAULT_MAX_FRAME),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            read_all(all, 3, 4),
            Err(FrameError::Oversize { .. })
        ));
        assert!(read_all(Bytes::new(), 3, 4).unwrap().is_empty());
    }

    #[test]
    fn memory_follows_arriving_bytes_not_the_claimed_length() {
        // A header claiming 60 MiB, then 100 bytes, then the end.
        let mut data = BytesMut::new();
        data.put_u32(60 << 20);
        data.put_slice(&[7u8; 100]);
        let mut src = Chunked {
            data: data.freeze(),
            chunk: usize::MAX,
        };
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        let res = futures::executor::block_on(reader.next_frame(&mut src));
        assert!(matches!(res, Err(FrameError::Truncated { buffered: 104 })));
        assert!(
            reader.buf.capacity() <= 2 * READ_CHUNK,
            "buffer grew to {} bytes for 104 received",
            reader.buf.capacity()
        );
        // Before the Hello, even that claim is refused outright.
        let mut big_hello = BytesMut::new();
        big_hello.put_u32(MAX_HELLO_FRAME as u32 + 1);
        assert!(matches!(
            read_all(big_hello.freeze(), 4, MAX_HELLO_FRAME),
            Err(FrameError::Oversize { .. })
        ));
    }
}
