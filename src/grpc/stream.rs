//! Streaming calls: the handler reads the client's messages as they arrive
//! ([`Incoming`]) and writes its own as it produces them ([`Outgoing`]),
//! with HTTP/2 flow control both ways: a client that sends faster than the
//! handler reads is held back by its window (capacity is released only as
//! messages are taken), and a handler that writes faster than the client
//! reads waits in [`Outgoing::send`].

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use h2::{RecvStream, SendStream};

use super::codec::{self, StreamDecoder};
use super::flow::send_all;
use super::{Code, Status};

/// One streaming call as the frontend hands it to the application.
pub struct StreamCall {
    /// The `:path`, e.g. `/grpc.health.v1.Health/Watch`.
    pub method: String,
    /// See [`super::Request::client_verified`].
    pub client_verified: bool,
    pub incoming: Incoming,
    pub outgoing: Outgoing,
}

/// What reading the next message of a body gave.
pub(crate) enum Read {
    Message(Bytes),
    /// The body ended cleanly (no message cut off).
    End,
    /// A bad message or a broken stream; nothing more is read.
    Failed(Status),
}

/// Reads the messages of one HTTP/2 body (either side of a call), with
/// flow control: the window reopens only as messages are taken, which is
/// where a fast sender is slowed to the reader's pace.
pub(crate) struct MessageReader {
    pub(crate) body: RecvStream,
    decoder: StreamDecoder,
    done: bool,
    /// How a transport error is reported (the two sides word it apart).
    on_error: fn(h2::Error) -> Status,
}

impl MessageReader {
    pub(crate) fn new(
        body: RecvStream,
        max_message_size: usize,
        on_error: fn(h2::Error) -> Status,
    ) -> MessageReader {
        MessageReader {
            body,
            decoder: StreamDecoder::new(max_message_size),
            done: false,
            on_error,
        }
    }

    pub(crate) async fn next(&mut self) -> Read {
        loop {
            if let Some(m) = self.decoder.next_message() {
                return Read::Message(m);
            }
            if self.done {
                return Read::End;
            }
            match self.body.data().await {
                Some(Ok(chunk)) => {
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    if let Err(e) = self.decoder.push(chunk) {
                        self.done = true;
                        return Read::Failed(e.to_status());
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Read::Failed((self.on_error)(e));
                }
                None => {
                    self.done = true;
                    if let Err(e) = self.decoder.finish() {
                        return Read::Failed(e.to_status());
                    }
                }
            }
        }
    }
}

/// The client's messages.
pub struct Incoming(MessageReader);

impl Incoming {
    pub(super) fn new(body: RecvStream, max_message_size: usize) -> Incoming {
        Incoming(MessageReader::new(body, max_message_size, |e| {
            Status::new(Code::Cancelled, format!("request stream: {e}"))
        }))
    }

    /// The next message; `None` once the client has half-closed. An
    /// oversized, compressed or cut-off message, or a reset, is an error.
    pub async fn next(&mut self) -> Option<Result<Bytes, Status>> {
        match self.0.next().await {
            Read::Message(m) => Some(Ok(m)),
            Read::End => None,
            Read::Failed(s) => Some(Err(s)),
        }
    }
}

/// Where the handler's messages go. The response headers are already sent;
/// the frontend sends the trailers with the handler's status.
pub struct Outgoing {
    pub(super) stream: Rc<RefCell<Option<SendStream<Bytes>>>>,
}

impl Outgoing {
    /// Sends one message, waiting for the client's window to admit it.
    /// Fails (CANCELLED) once the client is gone.
    pub async fn send(&mut self, msg: Bytes) -> Result<(), Status> {
        let pieces = codec::encode(msg)
            .ok_or_else(|| Status::resource_exhausted("message exceeds the 4 GiB frame limit"))?;
        // Why take it out: the borrow must not be held across the await
        // (the frontend looks at the stream for resets meanwhile).
        let mut stream = self
            .stream
            .borrow_mut()
            .take()
            .ok_or_else(|| Status::new(Code::Cancelled, "the call has ended"))?;
        let sent = send_all(&mut stream, pieces, false).await;
        *self.stream.borrow_mut() = Some(stream);
        sent.map_err(|e| Status::new(Code::Cancelled, format!("response stream: {e}")))
    }
}
