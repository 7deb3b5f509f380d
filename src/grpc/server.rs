//! The gRPC server: HTTP/2 (h2c with prior knowledge, or h2 over TLS) on a
//! glommio executor, unary calls only.
//!
//! Layout: one accept loop per shard ([`run`]), one local task per
//! connection (drives the h2 connection and accepts streams) and one local
//! task per stream (reads the request, calls the [`Handler`], writes the
//! response). Everything is `!Send` and stays on the shard that accepted the
//! connection.

use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::poll_fn;
use h2::server::SendResponse;
use h2::RecvStream;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, StatusCode};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tracing::{debug, warn};

use super::codec::{self, FrameError, UnaryDecoder};
use super::flow::send_all;
use super::limits::{Call, ConnHandle, Registry};
use super::stream::{Incoming, Outgoing, StreamCall};
use super::{Code, Handler, Kind, Request, ServerConfig, Status};
use crate::shutdown::Shutdown;

/// Per-stream receive window. Why 1 MiB: a typical request fits in one
/// window, so the client never waits for a WINDOW_UPDATE round trip.
const STREAM_WINDOW: u32 = 1 << 20;
/// Connection receive window, larger than one stream's so that many
/// concurrent streams are not serialised by the connection window.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Concurrent streams per connection; bounds the tasks one client can start.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Upper bound on request header bytes (HPACK-decoded).
const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;
/// A connection that has not completed the HTTP/2 preface by then is
/// dropped, so idle or bogus sockets do not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A response the client has not read within this time (its window stays
/// shut) is reset, freeing what the call held.
const RESPONSE_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for open connections to finish in-flight calls.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. EMFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_TIMEOUT: &str = "grpc-timeout";
const GRPC_ENCODING: &str = "grpc-encoding";
const APPLICATION_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// Accept loop: serves every connection on `listener` until `shutdown`
/// fires, then asks the open connections to finish (GOAWAY) and waits up to
/// [`DRAIN_TIMEOUT`] for them.
pub(crate) async fn run(
    listener: glommio::net::TcpListener,
    handler: Rc<dyn Handler>,
    config: ServerConfig,
    shutdown: Shutdown,
) {
    let registry = Registry::new("API", config.limits);
    let config = Rc::new(config);
    let mut stop = pin!(shutdown.wait());
    loop {
        // Why one accept future per iteration raced against a long-lived
        // shutdown future: the accept future is only dropped once, on
        // shutdown, so no accepted connection is lost to cancellation.
        let accepted = {
            let mut accept = pin!(listener.accept());
            poll_fn(|cx| {
                if stop.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                accept.as_mut().poll(cx).map(Some)
            })
            .await
        };
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                // At the limit with every connection busy, the new one is
                // closed at once (the registry logs why).
                let Some(place) = registry.admit() else {
                    continue;
                };
                let conn = accept_connection(
                    stream,
                    handler.clone(),
                    config.clone(),
                    shutdown.clone(),
                    place,
                );
                glommio::spawn_local(conn).detach();
            }
            Some(Err(e)) => {
                warn!(error = %e, "grpc: accept failed");
                glommio::timer::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    // Connections saw the same shutdown signal and are draining. A poll is
    // plenty here: this runs once per process lifetime.
    let started = Instant::now();
    while registry.len() > 0 && started.elapsed() < DRAIN_TIMEOUT {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if registry.len() > 0 {
        debug!(
            connections = registry.len(),
            "grpc: drain timeout, abandoning connections"
        );
    }
}

/// Streams a client may reset before the server has taken them, per
/// connection, before the connection is closed with ENHANCE_YOUR_CALM.
/// h2's default (20) is hit by honest clients: a node that was paused for
/// a few seconds wakes to every call its clients gave up on meanwhile, and
/// tonic reports the GOAWAY as RESOURCE_EXHAUSTED on calls the server may
/// already have carried out. A rapid-reset flood is still thousands.
const MAX_PENDING_RESETS: usize = 1024;

fn h2_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS);
    b
}

/// Resolves to `fut`'s output, or to `None` when `timeout` passes, the
/// server shuts down or the connection is asked to make room first.
async fn within<F: Future>(
    timeout: Duration,
    shutdown: &Shutdown,
    place: &ConnHandle,
    fut: F,
) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let mut timer = pin!(glommio::timer::sleep(timeout));
    let mut stop = pin!(shutdown.wait());
    poll_fn(|cx| {
        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if timer.as_mut().poll(cx).is_ready()
            || stop.as_mut().poll(cx).is_ready()
            || place.poll_evicted(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Takes one accepted socket through TLS (when configured) and serves it.
async fn accept_connection(
    stream: glommio::net::TcpStream,
    handler: Rc<dyn Handler>,
    config: Rc<ServerConfig>,
    shutdown: Shutdown,
    place: ConnHandle,
) {
    let peer = stream.peer_addr().ok();
    if let Err(e) = stream.set_nodelay(true) {
        debug!(?peer, error = %e, "grpc: set_nodelay failed");
    }
    let Some(tls) = config.tls.clone() else {
        return serve_connection(stream, peer, false, handler, config, shutdown, place).await;
    };
    let accept = futures_rustls::TlsAcceptor::from(tls.server()).accept(stream);
    let stream = match within(HANDSHAKE_TIMEOUT, &shutdown, &place, accept).await {
        Some(Ok(stream)) => stream,
        Some(Err(e)) => {
            debug!(?peer, error = %e, "grpc: TLS handshake failed");
            return;
        }
        None => {
            debug!(
                ?peer,
                "grpc: TLS handshake timed out or server shutting down"
            );
            return;
        }
    };
    // With a client CA, rustls only lets a certificate through that
    // verified against it; an absent one is allowed at this level unless
    // every call needs one.
    let verified = tls.client_auth != crate::tls::ClientAuth::Off
        && stream
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|chain| !chain.is_empty());
    serve_connection(stream, peer, verified, handler, config, shutdown, place).await
}

/// Drives one HTTP/2 connection: keeps polling `accept` (which is what moves
/// bytes on the socket) and spawns a task per stream.
async fn serve_connection<S>(
    stream: S,
    peer: Option<std::net::SocketAddr>,
    client_verified: bool,
    handler: Rc<dyn Handler>,
    config: Rc<ServerConfig>,
    shutdown: Shutdown,
    place: ConnHandle,
) where
    S: futures::io::AsyncRead + futures::io::AsyncWrite + Unpin + 'static,
{
    let handshake = h2_builder().handshake::<_, Bytes>(stream.compat());
    let handshake = within(HANDSHAKE_TIMEOUT, &shutdown, &place, handshake).await;
    let mut conn = match handshake {
        Some(Ok(conn)) => conn,
        Some(Err(e)) => {
            debug!(?peer, error = %e, "grpc: handshake failed");
            return;
        }
        None => {
            debug!(?peer, "grpc: handshake timed out or server shutting down");
            return;
        }
    };

    let mut stop = pin!(shutdown.wait());
    let mut closing = false;
    loop {
        let next = poll_fn(|cx| {
            if !closing && (stop.as_mut().poll(cx).is_ready() || place.poll_evicted(cx).is_ready())
            {
                return Poll::Ready(None);
            }
            conn.poll_accept(cx).map(Some)
        })
        .await;
        match next {
            None => {
                // Shutdown, or room needed for a new connection: GOAWAY,
                // then keep driving the connection until the in-flight
                // streams are done and `accept` returns None.
                conn.graceful_shutdown();
                closing = true;
            }
            Some(Some(Ok((req, respond)))) => {
                let call = serve_stream(
                    req,
                    respond,
                    handler.clone(),
                    config.clone(),
                    client_verified,
                    place.start_call(),
                );
                glommio::spawn_local(call).detach();
            }
            Some(Some(Err(e))) => {
                debug!(?peer, error = %e, "grpc: connection error");
                return;
            }
            Some(None) => return,
        }
    }
}

/// What one stream ends with.
enum Reply {
    /// A message for a successful call.
    Message(Bytes),
    /// A gRPC error status (Trailers-Only response).
    Status(Status),
    /// An HTTP-level rejection, with a gRPC status for gRPC-aware clients.
    Http(StatusCode, Status),
}

/// Handles one stream end to end. Never panics on input; if the client
/// resets the stream or the connection dies, the work is dropped.
async fn serve_stream(
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    handler: Rc<dyn Handler>,
    config: Rc<ServerConfig>,
    client_verified: bool,
    mut held: Call,
) {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let reply = match check_headers(&parts).map(|t| (t, handler.kind(parts.uri.path()))) {
        Err(reply) => reply,
        Ok((_, None)) => Reply::Status(Status::unimplemented(format!(
            "unknown method {}",
            parts.uri.path()
        ))),
        Ok((timeout, Some(Kind::Streaming))) => {
            let call = Streaming {
                method: parts.uri.path().to_owned(),
                timeout,
                client_verified,
            };
            return serve_streaming(call, body, respond, handler, config, held).await;
        }
        Ok((timeout, Some(Kind::Unary))) => {
            let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
            let method = parts.uri.path().to_owned();
            let encoding = parts.headers.get(GRPC_ENCODING).cloned();
            let what = CallParts {
                method,
                deadline,
                encoding,
                client_verified,
            };
            let work = call(body, what, &*handler, config.max_message_size, &mut held);
            let mut work = pin!(work);
            // Why a glommio timer and not only `Request.deadline`: handlers
            // may ignore the deadline; the client must still get
            // DEADLINE_EXCEEDED on time and the work is dropped.
            let mut timer = pin!(async {
                match deadline {
                    Some(d) => {
                        glommio::timer::sleep(d.saturating_duration_since(Instant::now())).await
                    }
                    None => futures::future::pending::<()>().await,
                }
            });
            let outcome = poll_fn(|cx| {
                if respond.poll_reset(cx).is_ready() {
                    return Poll::Ready(None);
                }
                if let Poll::Ready(r) = work.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if timer.as_mut().poll(cx).is_ready() {
                    let ms = timeout.unwrap_or_default().as_millis();
                    return Poll::Ready(Some(Reply::Status(Status::deadline_exceeded(format!(
                        "deadline exceeded after {ms} ms"
                    )))));
                }
                Poll::Pending
            })
            .await;
            match outcome {
                Some(reply) => reply,
                None => {
                    debug!(path = parts.uri.path(), "grpc: stream reset by client");
                    observe(parts.uri.path(), true, Code::Cancelled as u32, started);
                    return;
                }
            }
        }
    };
    let code = match &reply {
        Reply::Message(_) => Code::Ok,
        Reply::Status(s) | Reply::Http(_, s) => s.code,
    };
    let known = handler.kind(parts.uri.path()).is_some();
    observe(parts.uri.path(), known, code as u32, started);
    // The response waits on the client's flow-control window; a reader
    // that never opens it must not pin the call's bytes forever.
    let send = pin!(send_reply(&mut respond, reply));
    let timer = pin!(glommio::timer::sleep(RESPONSE_SEND_TIMEOUT));
    match futures::future::select(send, timer).await {
        futures::future::Either::Left((Ok(()), _)) => {}
        futures::future::Either::Left((Err(e), _)) => {
            debug!(path = parts.uri.path(), error = %e, "grpc: sending response failed");
        }
        futures::future::Either::Right(_) => debug!(
            path = parts.uri.path(),
            "grpc: the client read no response within {RESPONSE_SEND_TIMEOUT:?}; stream reset"
        ),
    }
    drop(held);
}

thread_local! {
    /// This shard's children of the gRPC series.
    static SERIES: std::cell::RefCell<crate::metrics::GrpcSeries> = Default::default();
}

/// Counts one finished call in the metrics.
fn observe(method: &str, known: bool, code: u32, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    SERIES.with(|s| s.borrow_mut().observe(method, known, code, secs));
}

/// A streaming call's identity and metadata.
struct Streaming {
    method: String,
    timeout: Option<Duration>,
    client_verified: bool,
}

/// Runs one streaming call: headers at once, the handler's messages as it
/// sends them, and its status in the trailers. The handler is dropped when
/// the client resets the stream or the deadline passes.
async fn serve_streaming(
    call: Streaming,
    body: RecvStream,
    mut respond: SendResponse<Bytes>,
    handler: Rc<dyn Handler>,
    config: Rc<ServerConfig>,
    held: Call,
) {
    let started = Instant::now();
    let deadline = call.timeout.and_then(|t| Instant::now().checked_add(t));
    let mut response = http::Response::new(());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, APPLICATION_GRPC);
    let stream = match respond.send_response(response, false) {
        Ok(stream) => stream,
        Err(e) => {
            debug!(path = call.method, error = %e, "grpc: sending headers failed");
            return;
        }
    };
    let shared = Rc::new(std::cell::RefCell::new(Some(stream)));
    let mut work = handler.stream(StreamCall {
        method: call.method.clone(),
        client_verified: call.client_verified,
        incoming: Incoming::new(body, config.max_message_size),
        outgoing: Outgoing {
            stream: shared.clone(),
        },
    });
    let mut timer = pin!(async {
        match deadline {
            Some(d) => glommio::timer::sleep(d.saturating_duration_since(Instant::now())).await,
            None => futures::future::pending::<()>().await,
        }
    });
    let outcome = poll_fn(|cx| {
        // While a send is under way the stream is with the handler, whose
        // send fails on a reset by itself.
        if let Ok(mut stream) = shared.try_borrow_mut() {
            if let Some(stream) = stream.as_mut() {
                if stream.poll_reset(cx).is_ready() {
                    return Poll::Ready(None);
                }
            }
        }
        if let Poll::Ready(r) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if timer.as_mut().poll(cx).is_ready() {
            let ms = call.timeout.unwrap_or_default().as_millis();
            return Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                "deadline exceeded after {ms} ms"
            )))));
        }
        Poll::Pending
    })
    .await;
    // End the handler before the trailers go out.
    drop(work);
    let status = match outcome {
        None => {
            debug!(path = call.method, "grpc: stream reset by client");
            observe(&call.method, true, Code::Cancelled as u32, started);
            return;
        }
        Some(Ok(())) => Status::new(Code::Ok, ""),
        Some(Err(status)) => status,
    };
    observe(&call.method, true, status.code as u32, started);
    let taken = shared.borrow_mut().take();
    if let Some(mut stream) = taken {
        let mut trailers = HeaderMap::with_capacity(2);
        status_headers(&mut trailers, &status);
        if let Err(e) = stream.send_trailers(trailers) {
            debug!(path = call.method, error = %e, "grpc: sending trailers failed");
        }
    }
    drop(held);
}

/// The call's identity and metadata, as `call` needs them.
struct CallParts {
    method: String,
    deadline: Option<Instant>,
    encoding: Option<HeaderValue>,
    client_verified: bool,
}

/// Validates method and headers; returns the `grpc-timeout`, if any.
///
/// Rejections follow grpc-go: a non-POST is HTTP 405 and a non-gRPC
/// content-type HTTP 415 (both with grpc-status INTERNAL for gRPC clients);
/// a malformed `grpc-timeout` is INTERNAL, since it is a transport-level
/// protocol error of the client, not an argument of the call.
fn check_headers(parts: &http::request::Parts) -> Result<Option<Duration>, Reply> {
    if parts.method != Method::POST {
        return Err(Reply::Http(
            StatusCode::METHOD_NOT_ALLOWED,
            Status::internal(format!("invalid gRPC request method {}", parts.method)),
        ));
    }
    let ct = parts.headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes);
    if !ct.is_some_and(|ct| ct.starts_with(b"application/grpc")) {
        let shown = ct.map(String::from_utf8_lossy).unwrap_or_default();
        return Err(Reply::Http(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Status::internal(format!("invalid gRPC request content-type {shown:?}")),
        ));
    }
    match parts.headers.get(GRPC_TIMEOUT) {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().unwrap_or("<non-ascii>");
            codec::parse_timeout(s)
                .map(Some)
                .map_err(|e| Reply::Status(Status::internal(e.to_string())))
        }
    }
}

/// Reads the request message and runs the handler.
async fn call(
    mut body: RecvStream,
    what: CallParts,
    handler: &dyn Handler,
    max_message_size: usize,
    held: &mut Call,
) -> Reply {
    let CallParts {
        method,
        deadline,
        encoding,
        client_verified,
    } = what;
    let mut decoder = UnaryDecoder::new(max_message_size);
    while let Some(chunk) = body.data().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                // Reset or connection loss; the status is unlikely to reach
                // the client, but there is nothing else to do.
                return Reply::Status(Status::new(Code::Cancelled, format!("request body: {e}")));
            }
        };
        // Why release before decoding: the bytes are now ours (copied or
        // referenced by the decoder); the window reopens as fast as we read.
        // Failure means the stream is gone, which `data()` reports next.
        let _ = body.flow_control().release_capacity(chunk.len());
        if let Err(status) = held.hold(chunk.len()) {
            return Reply::Status(status);
        }
        if let Err(e) = decoder.push(chunk) {
            // Early answer: the rest of the body is not read. Dropping the
            // RecvStream makes h2 reset the request side after the response.
            let mut status = e.to_status();
            if let (FrameError::Compressed, Some(enc)) = (&e, &encoding) {
                // We never advertise grpc-accept-encoding, so any codec the
                // client picked (gzip, ...) is one we do not implement.
                status.message = format!(
                    "compressed messages are not supported (grpc-encoding {:?})",
                    String::from_utf8_lossy(enc.as_bytes())
                );
            }
            return Reply::Status(status);
        }
    }
    let body = match decoder.finish() {
        Ok(b) => b,
        Err(e) => return Reply::Status(e.to_status()),
    };
    match handler
        .call(Request {
            method,
            body,
            deadline,
            client_verified,
        })
        .await
    {
        Ok(msg) => match held.hold(msg.len()) {
            Ok(()) => Reply::Message(msg),
            Err(status) => Reply::Status(status),
        },
        Err(status) => Reply::Status(status),
    }
}

/// Writes the response: headers + one DATA message + `grpc-status: 0`
/// trailers on success, a single Trailers-Only HEADERS frame otherwise.
async fn send_reply(respond: &mut SendResponse<Bytes>, reply: Reply) -> Result<(), h2::Error> {
    let (http_status, result) = match reply {
        Reply::Message(m) => (StatusCode::OK, Ok(m)),
        Reply::Status(s) => (StatusCode::OK, Err(s)),
        Reply::Http(code, s) => (code, Err(s)),
    };
    let result = result.and_then(|m| {
        codec::encode(m).ok_or_else(|| {
            Status::resource_exhausted("response message exceeds the 4 GiB frame limit")
        })
    });
    let mut response = http::Response::new(());
    *response.status_mut() = http_status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, APPLICATION_GRPC);
    match result {
        Ok(pieces) => {
            let mut stream = respond.send_response(response, false)?;
            send_all(&mut stream, pieces, false).await?;
            let mut trailers = HeaderMap::with_capacity(1);
            trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
            stream.send_trailers(trailers)
        }
        Err(status) => {
            status_headers(response.headers_mut(), &status);
            respond.send_response(response, true).map(drop)
        }
    }
}

/// Adds `grpc-status` and (if non-empty) percent-encoded `grpc-message`.
fn status_headers(headers: &mut HeaderMap, status: &Status) {
    headers.insert(GRPC_STATUS, HeaderValue::from(status.code as u32));
    if !status.message.is_empty() {
        // Percent-encoding yields printable ASCII only, which is always a
        // valid header value; the fallback is unreachable but panic-free.
        if let Ok(v) = HeaderValue::from_str(&codec::percent_encode(&status.message)) {
            headers.insert(GRPC_MESSAGE, v);
        }
    }
}
