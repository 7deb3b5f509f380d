//! gRPC over HTTP/2, by hand on the `h2` crate.
//!
//! What the rest of the crate uses:
//! - `Request`, `Handler`, `ServerConfig`, `serve` (server side, glommio);
//!   unary calls and, through `stream`, streaming ones.
//! - `Client` (client side, tokio) used by the CLI and the bench.
//! - `codec`: the 5-byte length-prefixed message framing, `grpc-timeout`
//!   parsing/formatting, `grpc-message` percent-encoding.

pub mod client;
pub mod codec;
mod flow;
pub(crate) mod limits;
mod server;
pub mod status;
pub mod stream;
#[cfg(test)]
mod tests;

pub use client::Client;
pub use limits::Limits;
pub use status::{Code, Status};
pub use stream::StreamCall;

use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use futures::future::LocalBoxFuture;

/// One unary call as the frontend hands it to the application.
#[derive(Debug)]
pub struct Request {
    /// The `:path`, e.g. `/atomix.multiraft.v1.Node/Bootstrap`.
    pub method: String,
    /// The request message (protobuf bytes without the 5-byte gRPC prefix).
    pub body: Bytes,
    /// From `grpc-timeout`, if the client sent one.
    pub deadline: Option<Instant>,
    /// Whether the connection presented a client certificate that the
    /// API's client CA verified (only with TLS and a client CA).
    pub client_verified: bool,
}

/// The application behind the frontend (one per shard; not `Send`).
///
/// Returns the response message bytes or a status. Unknown methods must be
/// answered with `Code::Unimplemented` by the handler.
pub trait Handler: 'static {
    fn call(&self, req: Request) -> LocalBoxFuture<'static, Result<Bytes, Status>>;

    /// The shape of `method`, or `None` if it does not exist. An unknown
    /// method is answered UNIMPLEMENTED from the request headers alone,
    /// without waiting for a body that a streaming client may never end.
    fn kind(&self, _method: &str) -> Option<Kind> {
        Some(Kind::Unary)
    }

    /// Runs a streaming call (a method whose [`Handler::kind`] is
    /// [`Kind::Streaming`]) to its end; the result becomes the status in
    /// the trailers.
    fn stream(&self, call: StreamCall) -> LocalBoxFuture<'static, Result<(), Status>> {
        let method = call.method;
        Box::pin(async move { Err(Status::unimplemented(format!("unknown method {method}"))) })
    }
}

/// How a method exchanges messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// One request message, one response message ([`Handler::call`]).
    Unary,
    /// Any number of messages either way ([`Handler::stream`]): server
    /// streaming, client streaming and bidirectional calls alike.
    Streaming,
}

/// Frontend limits.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest accepted request message (default 4 MiB); larger ones get
    /// RESOURCE_EXHAUSTED.
    pub max_message_size: usize,
    /// TLS (default: none, h2c with prior knowledge).
    pub tls: Option<crate::tls::ApiTls>,
    /// Connections and bytes held per shard (see [`Limits`]); defaults:
    /// 1,024 connections, 32 MiB per connection, 256 MiB per shard.
    pub limits: Limits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_message_size: 4 << 20,
            tls: None,
            limits: Limits {
                max_connections: 1024,
                max_conn_bytes: 32 << 20,
                max_shard_bytes: 256 << 20,
            },
        }
    }
}

/// Accepts connections on `listener` until `shutdown` fires, serving each
/// with `handler` on the current glommio executor.
///
/// Returns once shutdown was requested and the open connections finished
/// their in-flight calls (or a drain timeout of a few seconds passed).
pub async fn serve(
    listener: glommio::net::TcpListener,
    handler: Rc<dyn Handler>,
    config: ServerConfig,
    shutdown: crate::shutdown::Shutdown,
) {
    server::run(listener, handler, config, shutdown).await
}
