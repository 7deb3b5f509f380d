//! The gRPC client: unary calls over one shared HTTP/2 connection, on tokio.
//!
//! Used by the CLI and the load generator. A [`Client`] is a cheap handle
//! (clone it per task); all clones multiplex their calls as concurrent
//! streams on the same connection, whose I/O is driven by a task spawned on
//! the current tokio runtime.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::future::poll_fn;
use h2::client::SendRequest;
use h2::{Reason, RecvStream};
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, TE};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, StatusCode};
use rustls_pki_types::ServerName;
use tracing::debug;

use super::codec::{self, UnaryDecoder};
use super::flow::send_all;
use super::stream::{MessageReader, Read};
use super::{Code, Status};

/// Per-stream receive window; large so responses rarely wait on updates.
const STREAM_WINDOW: u32 = 1 << 20;
/// Connection receive window: room for many concurrent responses.
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Default largest accepted response message.
pub const DEFAULT_MAX_RESPONSE_SIZE: usize = 64 << 20;

/// A handle to one HTTP/2 connection to a multiraft node.
#[derive(Clone, Debug)]
pub struct Client {
    send: SendRequest<Bytes>,
    authority: Authority,
    scheme: Scheme,
    max_response_size: usize,
}

/// TLS for every [`Client::connect`] of this process (the CLI sets it once
/// from its flags); unset means h2c.
static TLS: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();

/// Makes every later [`Client::connect`] use TLS with `config`. The node's
/// certificate must name the host of the address connected to. Returns
/// false if TLS was already set.
pub fn use_tls(config: Arc<rustls::ClientConfig>) -> bool {
    TLS.set(config).is_ok()
}

/// The HTTP/2 handshake on `io`; the connection is driven by a spawned
/// task.
async fn handshake<T>(io: T, addr: &str) -> Result<SendRequest<Bytes>, Status>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // Why: until the server's SETTINGS arrive h2 would assume no
        // stream limit, and a burst of calls right after connecting
        // gets REFUSED_STREAM. 100 is the RFC 9113 suggested minimum.
        .initial_max_send_streams(100)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| Status::unavailable(format!("HTTP/2 handshake with {addr}: {e}")))?;
    let peer = addr.to_owned();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%peer, error = %e, "grpc client: connection ended");
        }
    });
    Ok(send)
}

impl Client {
    /// Connects to `addr` (`host:port`, resolved with the system resolver),
    /// over TLS if [`use_tls`] was called. The one way the operator
    /// commands, `bench` and the local cluster reach a node's API.
    ///
    /// Must be called from within a tokio runtime (any flavour, also inside
    /// a `LocalSet`): the connection driver is spawned with `tokio::spawn`.
    /// Every failure names `addr`: a malformed address is
    /// `INVALID_ARGUMENT`, anything else `UNAVAILABLE`.
    pub async fn connect(addr: &str) -> Result<Client, Status> {
        let authority: Authority = addr
            .parse()
            .map_err(|e| Status::invalid_argument(format!("bad address {addr:?}: {e}")))?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| Status::unavailable(format!("connect {addr}: {e}")))?;
        // Why: unary calls are small request/response exchanges; Nagle would
        // hold back the last segment of each one.
        tcp.set_nodelay(true)
            .map_err(|e| Status::unavailable(format!("set_nodelay {addr}: {e}")))?;
        let Some(tls) = TLS.get() else {
            let send = handshake(tcp, addr).await?;
            return Ok(Client::new(send, authority, Scheme::HTTP));
        };
        let name = ServerName::try_from(authority.host().trim_matches(['[', ']']).to_owned())
            .map_err(|e| Status::invalid_argument(format!("bad host in {addr:?}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| Status::unavailable(format!("TLS handshake with {addr}: {e}")))?;
        let send = handshake(tls, addr).await?;
        Ok(Client::new(send, authority, Scheme::HTTPS))
    }

    fn new(send: SendRequest<Bytes>, authority: Authority, scheme: Scheme) -> Client {
        Client {
            send,
            authority,
            scheme,
            max_response_size: DEFAULT_MAX_RESPONSE_SIZE,
        }
    }
    /// Calls `method` (a path like `/pkg.Service/Method`) with the encoded
    /// request `body`, returning the encoded response message.
    ///
    /// With a `timeout`, the server is told via `grpc-timeout` and the call
    /// also fails locally with DEADLINE_EXCEEDED when it elapses (the stream
    /// is then reset). Requires the tokio time driver in that case.
    pub async fn unary(
        &self,
        method: &str,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Bytes, Status> {
        let call = self.unary_inner(method, body, timeout);
        match timeout {
            None => call.await,
            Some(t) => match tokio::time::timeout(t, call).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "deadline exceeded after {} ms",
                    t.as_millis()
                ))),
            },
        }
    }

    /// [`unary`](Self::unary) with protobuf encoding and decoding.
    pub async fn call<Req, Resp>(
        &self,
        method: &str,
        req: &Req,
        timeout: Option<Duration>,
    ) -> Result<Resp, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let body = Bytes::from(req.encode_to_vec());
        let resp = self.unary(method, body, timeout).await?;
        Resp::decode(resp).map_err(|e| Status::internal(format!("decoding {method} response: {e}")))
    }

    async fn unary_inner(
        &self,
        method: &str,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Bytes, Status> {
        let request = self.build_request(method, timeout)?;
        let pieces = codec::encode(body)
            .ok_or_else(|| Status::resource_exhausted("request message exceeds 4 GiB"))?;
        // Why `ready()` on a clone: it waits for a free stream slot under the
        // server's MAX_CONCURRENT_STREAMS instead of failing, and the clone
        // keeps `&self` shareable across concurrent calls.
        let mut send = self.send.clone().ready().await.map_err(transport)?;
        let (response, mut stream) = send.send_request(request, false).map_err(transport)?;

        // Send the body while watching for the response: a server may answer
        // early (e.g. RESOURCE_EXHAUSTED for an oversized message) and stop
        // reading, and that answer is what the caller needs to see.
        let mut response = pin!(response);
        let first = {
            let mut sending = pin!(send_all(&mut stream, pieces, true));
            poll_fn(|cx| {
                if let Poll::Ready(r) = response.as_mut().poll(cx) {
                    return Poll::Ready(First::Response(r));
                }
                sending.as_mut().poll(cx).map(First::Sent)
            })
            .await
        };
        let response = match first {
            First::Response(r) => r,
            First::Sent(Ok(())) => response.await,
            // The response decides; the send error only explains a missing
            // response.
            First::Sent(Err(send_error)) => response.await.or(Err(send_error)),
        };
        let response = response.map_err(transport)?;
        self.read_response(response).await
    }

    /// Starts a server-streaming call: sends the one request message and
    /// returns the stream of response messages, which ends with the
    /// call's status.
    pub async fn server_stream(&self, method: &str, body: Bytes) -> Result<Messages, Status> {
        let request = self.build_request(method, None)?;
        let pieces = codec::encode(body)
            .ok_or_else(|| Status::resource_exhausted("request message exceeds 4 GiB"))?;
        let mut send = self.send.clone().ready().await.map_err(transport)?;
        let (response, mut stream) = send.send_request(request, false).map_err(transport)?;
        send_all(&mut stream, pieces, true)
            .await
            .map_err(transport)?;
        let (parts, body) = response.await.map_err(transport)?.into_parts();
        if let Some(status) = status_from(&parts.headers) {
            return Err(status.err().unwrap_or_else(|| {
                Status::internal("server ended the stream before any message")
            }));
        }
        if parts.status != StatusCode::OK {
            return Err(Status::new(
                code_from_http(parts.status),
                format!("HTTP status {}", parts.status),
            ));
        }
        Ok(Messages {
            reader: MessageReader::new(body, self.max_response_size, transport),
            ended: false,
        })
    }

    fn build_request(
        &self,
        method: &str,
        timeout: Option<Duration>,
    ) -> Result<http::Request<()>, Status> {
        let path = PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(method.as_bytes()))
            .map_err(|e| Status::invalid_argument(format!("bad method path {method:?}: {e}")))?;
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        let uri = Uri::from_parts(parts)
            .map_err(|e| Status::invalid_argument(format!("bad method path {method:?}: {e}")))?;
        let mut request = http::Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        if let Some(t) = timeout {
            // A formatted timeout is digits plus a unit letter: always valid.
            if let Ok(v) = HeaderValue::from_str(&codec::format_timeout(t)) {
                headers.insert("grpc-timeout", v);
            }
        }
        Ok(request)
    }

    async fn read_response(&self, response: http::Response<RecvStream>) -> Result<Bytes, Status> {
        let (parts, mut body) = response.into_parts();
        // Trailers-Only: the status is in the headers and there is no body.
        if let Some(status) = status_from(&parts.headers) {
            return match status {
                Ok(()) => Err(Status::internal(
                    "server returned OK without a response message",
                )),
                Err(s) => Err(s),
            };
        }
        if parts.status != StatusCode::OK {
            return Err(Status::new(
                code_from_http(parts.status),
                format!("HTTP status {}", parts.status),
            ));
        }
        let is_grpc = parts
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"));
        if !is_grpc {
            return Err(Status::new(
                Code::Unknown,
                "response content-type is not application/grpc",
            ));
        }
        let mut decoder = UnaryDecoder::new(self.max_response_size);
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(transport)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            decoder.push(chunk).map_err(|e| {
                let mut s = e.to_status();
                s.message = format!("response: {}", s.message);
                s
            })?;
        }
        let trailers = body.trailers().await.map_err(transport)?;
        match trailers.as_ref().and_then(status_from) {
            None => Err(Status::internal("response ended without grpc-status")),
            Some(Err(s)) => Err(s),
            Some(Ok(())) => decoder.finish().map_err(|e| {
                let mut s = e.to_status();
                s.message = format!("response: {}", s.message);
                s
            }),
        }
    }
}

/// The response messages of a streaming call.
pub struct Messages {
    reader: MessageReader,
    ended: bool,
}

impl Messages {
    /// The next message; `None` after a stream that ended OK; the call's
    /// status if it ended otherwise.
    pub async fn next(&mut self) -> Option<Result<Bytes, Status>> {
        if self.ended {
            return None;
        }
        match self.reader.next().await {
            Read::Message(m) => Some(Ok(m)),
            Read::Failed(s) => {
                self.ended = true;
                Some(Err(s))
            }
            Read::End => {
                self.ended = true;
                let trailers = match self.reader.body.trailers().await {
                    Ok(t) => t,
                    Err(e) => return Some(Err(transport(e))),
                };
                match trailers.as_ref().and_then(status_from) {
                    None => Some(Err(Status::internal("stream ended without grpc-status"))),
                    Some(Err(s)) => Some(Err(s)),
                    Some(Ok(())) => None,
                }
            }
        }
    }
}

/// Which of sending the request and receiving the response finished first.
enum First {
    Response(Result<http::Response<RecvStream>, h2::Error>),
    Sent(Result<(), h2::Error>),
}

/// Reads `grpc-status` / `grpc-message`: `None` if absent, `Some(Ok)` for
/// OK, the error status otherwise.
fn status_from(headers: &HeaderMap) -> Option<Result<(), Status>> {
    let raw = headers.get("grpc-status")?;
    let code = std::str::from_utf8(raw.as_bytes())
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .map(Code::from_u32)
        .unwrap_or(Code::Unknown);
    if code == Code::Ok {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .map(|m| codec::percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Some(Err(Status::new(code, message)))
}

/// HTTP status to gRPC code, for responses without `grpc-status`
/// (grpc/doc/http-grpc-status-mapping.md).
fn code_from_http(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Transport failures. A stream reset by the server maps per the gRPC
/// HTTP/2 spec (REFUSED_STREAM is retryable UNAVAILABLE, CANCEL is
/// CANCELLED, ENHANCE_YOUR_CALM is RESOURCE_EXHAUSTED); everything else
/// (connection loss, GOAWAY, I/O) is UNAVAILABLE.
fn transport(e: h2::Error) -> Status {
    let code = match e.reason() {
        Some(Reason::CANCEL) if e.is_remote() => Code::Cancelled,
        Some(Reason::ENHANCE_YOUR_CALM) if e.is_remote() => Code::ResourceExhausted,
        Some(Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(Reason::PROTOCOL_ERROR | Reason::INTERNAL_ERROR | Reason::FLOW_CONTROL_ERROR)
            if e.is_reset() && e.is_remote() =>
        {
            Code::Internal
        }
        _ => Code::Unavailable,
    };
    Status::new(code, format!("transport: {e}"))
}
