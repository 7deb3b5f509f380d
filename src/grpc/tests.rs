//! End-to-end tests: the glommio server on a loopback port, exercised by the
//! tokio [`Client`] and, for malformed requests the client cannot produce,
//! by raw `h2` requests.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::LocalBoxFuture;
use http::{HeaderMap, Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{codec, serve, Client, Code, Handler, Request, ServerConfig, Status};
use crate::shutdown::{Shutdown, ShutdownTrigger};

const SLEEP: Duration = Duration::from_millis(300);

/// Echoes, fails or sleeps depending on the method.
struct Echo {
    sleeps_done: Arc<AtomicUsize>,
}

impl Handler for Echo {
    fn call(&self, req: Request) -> LocalBoxFuture<'static, Result<Bytes, Status>> {
        let sleeps_done = self.sleeps_done.clone();
        Box::pin(async move {
            match req.method.as_str() {
                "/test.Echo/Echo" => Ok(req.body),
                "/test.Echo/Sleep" => {
                    glommio::timer::sleep(SLEEP).await;
                    sleeps_done.fetch_add(1, Ordering::SeqCst);
                    Ok(req.body)
                }
                "/test.Echo/Deadline" => Ok(Bytes::from_static(if req.deadline.is_some() {
                    b"some"
                } else {
                    b"none"
                })),
                "/test.Echo/Fail" => Err(Status::not_found("no such key: 100% ünïcode\r\n")),
                other => Err(Status::unimplemented(format!("unknown method {other}"))),
            }
        })
    }

    fn kind(&self, method: &str) -> Option<super::Kind> {
        Some(if method.starts_with("/test.Stream/") {
            super::Kind::Streaming
        } else {
            super::Kind::Unary
        })
    }

    /// `/test.Stream/Echo` answers every message with itself and, after the
    /// client half-closes, one message counting them; `/test.Stream/Fail`
    /// ends with NOT_FOUND after one message.
    fn stream(&self, mut call: super::StreamCall) -> LocalBoxFuture<'static, Result<(), Status>> {
        Box::pin(async move {
            let mut n = 0u8;
            while let Some(m) = call.incoming.next().await {
                call.outgoing.send(m?).await?;
                n += 1;
                if call.method == "/test.Stream/Fail" {
                    return Err(Status::not_found("gone"));
                }
            }
            call.outgoing.send(Bytes::from(vec![n])).await
        })
    }
}

struct TestServer {
    addr: SocketAddr,
    sleeps_done: Arc<AtomicUsize>,
    trigger: ShutdownTrigger,
    thread: glommio::ExecutorJoinHandle<()>,
}

impl TestServer {
    fn start(config: ServerConfig) -> TestServer {
        let (trigger, shutdown) = Shutdown::new();
        let sleeps_done = Arc::new(AtomicUsize::new(0));
        let counter = sleeps_done.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .name("grpc-test")
            .spawn(move || async move {
                let listener = crate::net::reuseport_listener("127.0.0.1:0".parse().expect("addr"))
                    .expect("bind");
                tx.send(listener.local_addr().expect("local addr"))
                    .expect("test alive");
                let handler = Rc::new(Echo {
                    sleeps_done: counter,
                });
                serve(listener, handler, config, shutdown).await;
            })
            .expect("executor");
        let addr = rx.recv().expect("server started");
        TestServer {
            addr,
            sleeps_done,
            trigger,
            thread,
        }
    }

    fn stop(mut self) {
        self.trigger.trigger();
        self.thread.join().expect("server thread");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn small_config() -> ServerConfig {
    ServerConfig {
        max_message_size: 1 << 20,
        ..ServerConfig::default()
    }
}

/// What a raw request got back.
#[derive(Debug)]
struct RawResponse {
    http: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl RawResponse {
    /// grpc-status and grpc-message, from trailers or (Trailers-Only) headers.
    fn grpc(&self) -> (Option<Code>, String) {
        let h = self.trailers.as_ref().unwrap_or(&self.headers);
        let code = h
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .map(Code::from_u32);
        let msg = h
            .get("grpc-message")
            .map(|m| codec::percent_decode(m.as_bytes()))
            .unwrap_or_default();
        (code, msg)
    }
}

/// Sends one request with full control over method, headers and the DATA
/// frames of the body.
async fn raw(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    chunks: Vec<Bytes>,
) -> RawResponse {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.expect("ready");
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (resp, mut stream) = send
        .send_request(req.body(()).expect("request"), false)
        .expect("send request");
    for c in chunks {
        stream.send_data(c, false).expect("send data");
    }
    stream.send_data(Bytes::new(), true).expect("end stream");
    let resp = resp.await.expect("response");
    let (parts, mut body) = resp.into_parts();
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("trailers");
    RawResponse {
        http: parts.status,
        headers: parts.headers,
        body: data.freeze(),
        trailers,
    }
}

fn grpc_headers() -> Vec<(&'static str, &'static str)> {
    vec![("content-type", "application/grpc"), ("te", "trailers")]
}

#[test]
fn unary_ok_and_handler_errors() {
    let server = TestServer::start(small_config());
    runtime().block_on(async {
        let client = Client::connect(&server.addr.to_string())
            .await
            .expect("connect");
        let echoed = client
            .unary("/test.Echo/Echo", Bytes::from_static(b"hello"), None)
            .await
            .expect("echo");
        assert_eq!(echoed, "hello");
        let empty = client
            .unary("/test.Echo/Echo", Bytes::new(), None)
            .await
            .expect("empty echo");
        assert!(empty.is_empty());

        let err = client
            .unary("/test.Echo/Nope", Bytes::new(), None)
            .await
            .expect_err("unknown method");
        assert_eq!(err.code, Code::Unimplemented);
        assert!(err.message.contains("/test.Echo/Nope"), "{err}");

        // The message survives percent-encoding, including '%' and UTF-8.
        let err = client
            .unary("/test.Echo/Fail", Bytes::new(), None)
            .await
            .expect_err("fail");
        assert_eq!(
            err,
            Status::not_found("no such key: 100% ünïcode\r\n"),
            "{err}"
        );

        let d = client
            .unary("/test.Echo/Deadline", Bytes::new(), None)
            .await
            .expect("no deadline");
        assert_eq!(d, "none");
        let d = client
            .unary(
                "/test.Echo/Deadline",
                Bytes::new(),
                Some(Duration::from_secs(5)),
            )
            .await
            .expect("deadline");
        assert_eq!(d, "some");

        // prost convenience: a string wrapper round-trips through Echo.
        let resp: String = client
            .call("/test.Echo/Echo", &"typed".to_owned(), None)
            .await
            .expect("typed call");
        assert_eq!(resp, "typed");
    });
    server.stop();
}

#[test]
fn large_messages_span_many_data_frames() {
    let server = TestServer::start(small_config());
    runtime().block_on(async {
        let client = Client::connect(&server.addr.to_string())
            .await
            .expect("connect");
        for len in [100 << 10, 300 << 10, 1 << 20] {
            let msg: Bytes = (0..len).map(|i| (i % 251) as u8).collect();
            let echoed = client
                .unary("/test.Echo/Echo", msg.clone(), None)
                .await
                .expect("large echo");
            assert_eq!(echoed, msg, "len {len}");
        }
        // The same through many small DATA frames sent by hand.
        let msg: Bytes = (0..150_000u32).map(|i| (i % 13) as u8).collect();
        let wire = codec::encode(msg.clone()).expect("fits").concat();
        let chunks = wire.chunks(7_000).map(Bytes::copy_from_slice).collect();
        let r = raw(
            server.addr,
            Method::POST,
            "/test.Echo/Echo",
            &grpc_headers(),
            chunks,
        )
        .await;
        assert_eq!(r.grpc().0, Some(Code::Ok));
        assert_eq!(r.body.len(), codec::PREFIX_LEN + msg.len());
        assert_eq!(&r.body[codec::PREFIX_LEN..], &msg[..]);
    });
    server.stop();
}

#[test]
fn oversized_message_is_resource_exhausted() {
    let server = TestServer::start(small_config());
    runtime().block_on(async {
        let client = Client::connect(&server.addr.to_string())
            .await
            .expect("connect");
        let msg = Bytes::from(vec![7u8; (1 << 20) + 1]);
        let err = client
            .unary("/test.Echo/Echo", msg, None)
            .await
            .expect_err("too large");
        assert_eq!(err.code, Code::ResourceExhausted, "{err}");
        // Much larger than every window: the server answers after the
        // prefix and resets the rest; the client must report the status.
        let msg = Bytes::from(vec![7u8; 40 << 20]);
        let err = client
            .unary("/test.Echo/Echo", msg, None)
            .await
            .expect_err("far too large");
        assert_eq!(err.code, Code::ResourceExhausted, "{err}");
        // The connection is still fine.
        let ok = client
            .unary("/test.Echo/Echo", Bytes::from_static(b"x"), None)
            .await
            .expect("still works");
        assert_eq!(ok, "x");
    });
    server.stop();
}

#[test]
fn deadlines_are_enforced() {
    let server = TestServer::start(small_config());
    runtime().block_on(async {
        let client = Client::connect(&server.addr.to_string())
            .await
            .expect("connect");
        let err = client
            .unary(
                "/test.Echo/Sleep",
                Bytes::new(),
                Some(Duration::from_millis(50)),
            )
            .await
            .expect_err("deadline");
        assert_eq!(err.code, Code::DeadlineExceeded, "{err}");

        // Server-side enforcement alone: grpc-timeout without a client timer.
        let mut headers = grpc_headers();
        headers.push(("grpc-timeout", "50m"));
        let started = Instant::now();
        let r = raw(
            server.addr,
            Method::POST,
            "/test.Echo/Sleep",
            &headers,
            codec::encode(Bytes::new()).expect("fits"),
        )
        .await;
        let (code, msg) = r.grpc();
        assert_eq!(code, Some(Code::DeadlineExceeded), "{msg}");
        assert_eq!(msg, "deadline exceeded after 50 ms");
        assert!(r.trailers.is_none(), "Trailers-Only response expected");
        assert!(started.elapsed() < SLEEP, "answered before the handler");

        // The timed-out handlers were dropped, not run to completion.
        tokio::time::sleep(SLEEP * 2).await;
        assert_eq!(server.sleeps_done.load(Ordering::SeqCst), 0);
    });
    server.stop();
}

#[test]
fn client_reset_drops_the_work() {
    let server = TestServer::start(small_config());
    runtime().block_on(async {
        let client = Client::connect(&server.addr.to_string())
            .await
            .expect("connect");
        let call = client.unary("/test.Echo/Sleep", Bytes::new(), None);
        // Dropping the call future resets the stream.
        let r = tokio::time::timeout(Duration::from_millis(50), call).await;
        assert!(r.is_err(), "sleep should still be running");
        tokio::time::sleep(SLEEP * 2).await;
        assert_eq!(server.sleeps_done.load(Ordering::SeqCst), 0);
    });
    server.stop();
}

#[test]
fn malformed_requests_get_protocol_errors() {
    let server = TestServer::start(small_config());
    runtime().block_on(async {
        let addr = server.addr;
        let path = "/test.Echo/Echo";
        let h = grpc_headers();
        let post = |headers: Vec<(&'static str, &'static str)>, chunks: Vec<Bytes>| {
            let headers = headers.clone();
            async move { raw(addr, Method::POST, path, &headers, chunks).await }
        };

        // Truncated frame: the prefix promises 10 bytes, 3 arrive.
        let r = post(
            h.clone(),
            vec![Bytes::from_static(&[0, 0, 0, 0, 10, 1, 2, 3])],
        )
        .await;
        let (code, msg) = r.grpc();
        assert_eq!(code, Some(Code::Internal));
        assert!(msg.contains("incomplete message"), "{msg}");
        // Truncated prefix.
        let r = post(h.clone(), vec![Bytes::from_static(&[0, 0])]).await;
        assert_eq!(r.grpc().0, Some(Code::Internal));
        // No message at all.
        let r = post(h.clone(), vec![]).await;
        let (code, msg) = r.grpc();
        assert_eq!(code, Some(Code::Internal));
        assert!(msg.contains("missing message"), "{msg}");
        // Garbage after the message.
        let r = post(
            h.clone(),
            vec![Bytes::from_static(&[0, 0, 0, 0, 1, 9, 0xde, 0xad])],
        )
        .await;
        assert_eq!(r.grpc().0, Some(Code::Internal));
        // Compressed flag.
        let mut gz = h.clone();
        gz.push(("grpc-encoding", "gzip"));
        let r = post(gz, vec![Bytes::from_static(&[1, 0, 0, 0, 1, 9])]).await;
        let (code, msg) = r.grpc();
        assert_eq!(code, Some(Code::Unimplemented));
        assert!(msg.contains("gzip"), "{msg}");
        let r = post(h.clone(), vec![Bytes::from_static(&[1, 0, 0, 0, 1, 9])]).await;
        assert_eq!(r.grpc().0, Some(Code::Unimplemented));
        // Malformed grpc-timeout.
        let mut bad_timeout = h.clone();
        bad_timeout.push(("grpc-timeout", "soon"));
        let r = post(bad_timeout, codec::encode(Bytes::new()).expect("fits")).await;
        let (code, msg) = r.grpc();
        assert_eq!(code, Some(Code::Internal));
        assert!(msg.contains("grpc-timeout"), "{msg}");
        // Wrong content type and method.
        let r = post(
            vec![("content-type", "application/json")],
            vec![Bytes::from_static(b"{}")],
        )
        .await;
        assert_eq!(r.http, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let r = raw(addr, Method::GET, path, &h, vec![]).await;
        assert_eq!(r.http, StatusCode::METHOD_NOT_ALLOWED);
        // application/grpc+proto is gRPC too.
        let r = post(
            vec![("content-type", "application/grpc+proto")],
            codec::encode(Bytes::from_static(b"ok")).expect("fits"),
        )
        .await;
        assert_eq!(r.grpc().0, Some(Code::Ok));
        assert_eq!(&r.body[..], &[0, 0, 0, 0, 2, b'o', b'k']);
        assert_eq!(
            r.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/grpc"[..])
        );
    });
    server.stop();
}

#[test]
fn bad_connections_do_not_affect_others() {
    let server = TestServer::start(small_config());
    runtime().block_on(async {
        let client = Client::connect(&server.addr.to_string())
            .await
            .expect("connect");
        // Not HTTP/2 at all: the server drops this connection.
        let mut bad = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "server should close a bad connection");
        // A connection that closes mid-preface.
        let mut half = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        half.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
        drop(half);

        let ok = client
            .unary("/test.Echo/Echo", Bytes::from_static(b"still"), None)
            .await
            .expect("unaffected");
        assert_eq!(ok, "still");
    });
    server.stop();
}

#[test]
fn many_concurrent_calls_share_one_connection() {
    let server = TestServer::start(ServerConfig::default());
    runtime().block_on(async {
        let client = Client::connect(&server.addr.to_string())
            .await
            .expect("connect");
        let calls = (0..2000u32).map(|i| {
            let client = client.clone();
            async move {
                let body = Bytes::from(i.to_be_bytes().repeat(1 + (i as usize % 64)));
                let got = client
                    .unary(
                        "/test.Echo/Echo",
                        body.clone(),
                        Some(Duration::from_secs(20)),
                    )
                    .await
                    .expect("echo");
                assert_eq!(got, body);
            }
        });
        futures::future::join_all(calls).await;
    });
    server.stop();
}

#[test]
fn shutdown_finishes_in_flight_calls() {
    let server = TestServer::start(small_config());
    let addr = server.addr;
    // Multi-threaded so the client keeps answering (e.g. the PING that
    // follows GOAWAY) while this thread blocks in `stop`.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt.block_on(async { Client::connect(&addr.to_string()).await.expect("connect") });
    let call = {
        let client = client.clone();
        rt.spawn(async move {
            client
                .unary("/test.Echo/Sleep", Bytes::from_static(b"zz"), None)
                .await
        })
    };
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
    let started = Instant::now();
    server.stop(); // returns once the connection drained
    assert!(started.elapsed() < Duration::from_secs(4));
    let r = rt.block_on(call).expect("task");
    assert_eq!(r.expect("in-flight call completes"), "zz");
    // The listener is gone.
    rt.block_on(async {
        let err = Client::connect(&addr.to_string())
            .await
            .expect_err("no server");
        assert_eq!(err.code, Code::Unavailable);
    });
}

/// Opens a streaming call on `path` and returns both ends.
async fn open_stream(
    addr: SocketAddr,
    path: &str,
) -> (h2::SendStream<Bytes>, h2::client::ResponseFuture) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.expect("ready");
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, stream) = send.send_request(req, false).expect("send request");
    (stream, resp)
}

fn message(body: &[u8]) -> Bytes {
    let mut out = codec::prefix(body.len()).unwrap().to_vec();
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// Reads one whole message from `body` (test messages fit one prefix).
async fn read_message(body: &mut h2::RecvStream, pending: &mut BytesMut) -> Option<Bytes> {
    loop {
        if pending.len() >= 5 {
            let len = u32::from_be_bytes(pending[1..5].try_into().unwrap()) as usize;
            if pending.len() >= 5 + len {
                let m = pending.split_to(5 + len);
                return Some(Bytes::copy_from_slice(&m[5..]));
            }
        }
        let chunk = body.data().await?.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        pending.extend_from_slice(&chunk);
    }
}

#[test]
fn streaming_calls_exchange_messages_as_they_come() {
    let server = TestServer::start(small_config());
    runtime().block_on(async {
        let (mut send, resp) = open_stream(server.addr, "/test.Stream/Echo").await;
        // Headers come before any message is sent.
        let resp = resp.await.expect("headers");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut pending = BytesMut::new();
        // Each message is answered before the next one is sent.
        for m in [&b"one"[..], b"", b"three"] {
            send.send_data(message(m), false).unwrap();
            let got = read_message(&mut body, &mut pending).await.expect("echo");
            assert_eq!(&got[..], m);
        }
        send.send_data(Bytes::new(), true).unwrap();
        let count = read_message(&mut body, &mut pending).await.expect("count");
        assert_eq!(&count[..], &[3]);
        let trailers = body.trailers().await.unwrap().expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");

        // A handler error becomes the trailers' status.
        let (mut send, resp) = open_stream(server.addr, "/test.Stream/Fail").await;
        send.send_data(message(b"x"), false).unwrap();
        let mut body = resp.await.expect("headers").into_body();
        let mut pending = BytesMut::new();
        assert!(read_message(&mut body, &mut pending).await.is_some());
        let trailers = body.trailers().await.unwrap().expect("trailers");
        assert_eq!(trailers["grpc-status"], "5");
    });
    server.stop();
}
