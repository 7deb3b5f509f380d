//! HTTP/2 flow control on the send side, shared by the server and the client.
//!
//! `h2::SendStream::send_data` never blocks: whatever the peer's window does
//! not admit is buffered inside h2 without bound. Sending only what the
//! stream has been granted keeps memory bounded by the peer's windows and
//! makes a slow reader slow down the writer instead.

use bytes::Bytes;
use futures::future::poll_fn;
use h2::{Reason, SendStream};

/// Sends `pieces` in order on `stream`, each in chunks no larger than the
/// capacity h2 grants, marking the last chunk with `end_stream` if asked.
pub(crate) async fn send_all(
    stream: &mut SendStream<Bytes>,
    pieces: Vec<Bytes>,
    end_stream: bool,
) -> Result<(), h2::Error> {
    let mut remaining: usize = pieces.iter().map(Bytes::len).sum();
    let mut eos_sent = false;
    for mut data in pieces {
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(e),
                // The stream can no longer send (reset or closed).
                None => return Err(Reason::CANCEL.into()),
            };
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            remaining -= chunk.len();
            let eos = end_stream && remaining == 0;
            stream.send_data(chunk, eos)?;
            eos_sent |= eos;
        }
    }
    if end_stream && !eos_sent {
        // Nothing carried the end-of-stream flag (empty input).
        stream.send_data(Bytes::new(), true)?;
    }
    Ok(())
}
