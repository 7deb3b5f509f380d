//! Mutual TLS on peer connections.
//!
//! The Hello travels in clear, before the handshake: the accepting listener
//! needs the sending shard to move the connection to the matching core
//! before any TLS state exists (a TLS session cannot be handed between
//! threads with the socket). The Hello is only a claim; the handshake then
//! proves it: the accepting side requires a certificate from the cluster CA
//! that names the node the Hello claims (see [`crate::tls`]), and closes
//! the connection otherwise, before a single envelope is read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{select, Either};
use futures::io::{AsyncRead, AsyncWrite};
use futures_rustls::{TlsAcceptor, TlsConnector};
use glommio::net::TcpStream;

use crate::tls::{cert_names_node, node_name, PeerTls};

/// A stream that first yields bytes already read from it (by the Hello
/// reader, which may have read into the TLS handshake) and then reads on.
pub(super) struct Prefixed<S> {
    head: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(super) fn new(head: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            head,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pos < this.head.len() {
            let n = buf.len().min(this.head.len() - this.pos);
            buf[..n].copy_from_slice(&this.head[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.head.len() {
                this.head = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// The reading half of an accepted, authenticated peer connection.
pub(super) type ServerStream = futures_rustls::server::TlsStream<Prefixed<TcpStream>>;

/// Runs the server side of the handshake on a connection whose Hello
/// claimed node `from`, within `timeout`. Fails unless the peer presents a
/// certificate of the cluster CA naming node `from`.
pub(super) async fn accept(
    tls: &PeerTls,
    stream: TcpStream,
    buffered: Vec<u8>,
    from: u64,
    timeout: Duration,
) -> Result<ServerStream, Refused> {
    let handshake =
        std::pin::pin!(TlsAcceptor::from(tls.server()).accept(Prefixed::new(buffered, stream)));
    let timer = std::pin::pin!(glommio::timer::sleep(timeout));
    let stream = match select(handshake, timer).await {
        Either::Left((Ok(stream), _)) => stream,
        Either::Left((Err(e), _)) => return Err(Refused::Handshake(e)),
        Either::Right(_) => return Err(Refused::Timeout(timeout)),
    };
    let names_sender = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .is_some_and(|cert| cert_names_node(cert, from));
    if !names_sender {
        return Err(Refused::NotTheNode(from));
    }
    Ok(stream)
}

/// Why an incoming peer connection was refused at its TLS handshake.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refused {
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    #[error("its certificate does not name node {0}, which its Hello claims")]
    NotTheNode(u64),
}

/// The writing half of an outgoing peer connection: plain or TLS.
pub(super) type ClientStream = Box<dyn AsyncWrite + Unpin>;

/// Runs the client side of the handshake with node `to` (after the Hello
/// went out in clear): the peer must prove it is node `to`.
pub(super) async fn connect(
    tls: &PeerTls,
    stream: TcpStream,
    to: u64,
    timeout: Duration,
) -> io::Result<ClientStream> {
    let handshake = std::pin::pin!(TlsConnector::from(tls.client()).connect(node_name(to), stream));
    let timer = std::pin::pin!(glommio::timer::sleep(timeout));
    match select(handshake, timer).await {
        Either::Left((Ok(stream), _)) => Ok(Box::new(stream)),
        Either::Left((Err(e), _)) => Err(io::Error::new(
            e.kind(),
            format!("TLS handshake with node {to}: {e}"),
        )),
        Either::Right(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("TLS handshake with node {to} took over {timeout:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::{AsyncReadExt, Cursor};

    #[test]
    fn prefixed_yields_the_head_then_the_stream() {
        futures::executor::block_on(async {
            let mut s = Prefixed::new(b"hel".to_vec(), Cursor::new(b"lo".to_vec()));
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.unwrap();
            assert_eq!(out, b"hello");

            let mut empty = Prefixed::new(Vec::new(), Cursor::new(b"x".to_vec()));
            let mut one = [0u8; 4];
            assert_eq!(empty.read(&mut one).await.unwrap(), 1);
        });
    }
}
