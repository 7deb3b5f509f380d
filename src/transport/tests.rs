//! End-to-end tests of the peer transport over loopback TCP, each in its own
//! glommio executor.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::{select, Either};
use futures::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};

use super::frame::{self, DEFAULT_MAX_FRAME};
use super::*;
use crate::proto::peer::envelope::Body;
use crate::proto::peer::{Hello, RaftMessage};
use crate::shutdown::ShutdownTrigger;

const DEADLINE: Duration = Duration::from_secs(20);

fn run<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(test)
        .unwrap()
        .join()
        .unwrap();
}

/// Polls `cond` every few milliseconds until it holds; false on timeout.
async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > DEADLINE {
            return false;
        }
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// Lets every other runnable task run once.
async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// An envelope carrying sequence number `seq`.
fn env(seq: u64) -> Envelope {
    Envelope {
        body: Some(Body::Raft(RaftMessage {
            partition_id: (seq % 7) as u32,
            message: Bytes::copy_from_slice(&seq.to_be_bytes()),
        })),
    }
}

fn seq_of(env: &Envelope) -> u64 {
    match &env.body {
        Some(Body::Raft(m)) => u64::from_be_bytes(m.message[..].try_into().unwrap()),
        other => panic!("unexpected body {other:?}"),
    }
}

type Received = Rc<RefCell<Vec<(u64, Envelope)>>>;

struct TestServer {
    addr: SocketAddr,
    received: Received,
    stats: Rc<RecvStats>,
    task: glommio::Task<()>,
    trigger: ShutdownTrigger,
}

impl TestServer {
    fn start(addr: SocketAddr, config: TransportConfig) -> TestServer {
        let listener = crate::net::reuseport_listener(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Received = Rc::default();
        let stats = Rc::new(RecvStats::default());
        let (trigger, shutdown) = Shutdown::new();
        let sink = {
            let received = received.clone();
            Rc::new(move |from, env| received.borrow_mut().push((from, env)))
        };
        let task =
            glommio::spawn_local(serve_with(listener, sink, shutdown, config, stats.clone()));
        TestServer {
            addr,
            received,
            stats,
            task,
            trigger,
        }
    }

    fn len(&self) -> usize {
        self.received.borrow().len()
    }

    fn seqs(&self) -> Vec<u64> {
        self.received
            .borrow()
            .iter()
            .map(|(_, e)| seq_of(e))
            .collect()
    }

    async fn stop(mut self) {
        self.trigger.trigger();
        let stopped = pin!(self.task);
        let timeout = pin!(glommio::timer::sleep(DEADLINE));
        assert!(
            matches!(select(stopped, timeout).await, Either::Left(_)),
            "serve did not stop on shutdown"
        );
    }
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[test]
fn ten_thousand_envelopes_arrive_in_order_in_one_batch() {
    run(|| async {
        let server = TestServer::start(any_port(), TransportConfig::default());
        let (mut trigger, shutdown) = Shutdown::new();
        let config = TransportConfig {
            queue_max_msgs: 20_000,
            ..Default::default()
        };
        let links = PeerLinks::with_config(1, shutdown, config);
        links.set_address(2, &server.addr.to_string());

        for seq in 0..10_000 {
            links.send(2, env(seq));
        }
        assert!(wait_until(|| server.len() >= 10_000).await, "timed out");
        assert_eq!(server.seqs(), (0..10_000).collect::<Vec<_>>());
        assert!(server.received.borrow().iter().all(|(from, _)| *from == 1));
        // Everything was queued in one turn, so it left in one write.
        assert_eq!(links.stats().batches.get(), 1);
        assert_eq!(links.stats().sent_msgs.get(), 10_000);
        assert_eq!(server.stats.recv_msgs.get(), 10_000);
        assert_eq!(
            server.stats.recv_bytes.get(),
            links.stats().sent_bytes.get()
        );

        // Trickled over many turns: still in order, on the same connection.
        for seq in 10_000..20_000 {
            links.send(2, env(seq));
            if seq % 100 == 0 {
                yield_now().await;
            }
        }
        assert!(wait_until(|| server.len() >= 20_000).await, "timed out");
        assert_eq!(server.seqs(), (0..20_000).collect::<Vec<_>>());
        assert_eq!(links.stats().connects.get(), 1);
        assert_eq!(links.stats().dropped_full.get(), 0);

        // Writers exit on shutdown.
        trigger.trigger();
        let link = links.links.borrow().get(&2).unwrap().clone();
        assert!(wait_until(|| !link.writer_running.get()).await);
        server.stop().await;
    });
}

#[test]
fn full_queue_drops_newest_and_unknown_or_oversize_are_dropped() {
    run(|| async {
        let server = TestServer::start(any_port(), TransportConfig::default());
        let (_trigger, shutdown) = Shutdown::new();
        let config = TransportConfig {
            queue_max_msgs: 100,
            max_frame: 1000,
            ..Default::default()
        };
        let links = PeerLinks::with_config(5, shutdown, config);
        links.set_address(2, &server.addr.to_string());

        for seq in 0..150 {
            links.send(2, env(seq));
        }
        links.send(3, env(0));
        links.send(
            2,
            Envelope {
                body: Some(Body::Raft(RaftMessage {
                    partition_id: 1,
                    message: Bytes::from(vec![0; 2000]),
                })),
            },
        );
        assert_eq!(links.stats().dropped_full.get(), 50);
        assert_eq!(links.stats().dropped_no_addr.get(), 1);
        assert_eq!(links.stats().dropped_oversize.get(), 1);
        assert!(wait_until(|| server.len() >= 100).await, "timed out");
        assert_eq!(server.seqs(), (0..100).collect::<Vec<_>>());

        // Removing a node forgets it.
        links.remove(2);
        links.send(2, env(1000));
        assert_eq!(links.stats().dropped_no_addr.get(), 2);
        server.stop().await;
    });
}

#[test]
fn reconnects_once_the_peer_listens() {
    run(|| async {
        // A port nobody listens on (yet).
        let addr = std::net::TcpListener::bind(any_port())
            .unwrap()
            .local_addr()
            .unwrap();
        let (_trigger, shutdown) = Shutdown::new();
        let config = TransportConfig {
            backoff_min: Duration::from_millis(5),
            backoff_max: Duration::from_millis(50),
            ..Default::default()
        };
        let links = PeerLinks::with_config(9, shutdown, config);
        links.set_address(4, &addr.to_string());

        for seq in 0..10 {
            links.send(4, env(seq));
        }
        // The first attempt fails and drops what it was to carry; an idle
        // link does not retry until there is something to send.
        assert!(wait_until(|| links.stats().connect_failures.get() >= 1).await);
        assert_eq!(links.stats().dropped_failed.get(), 10);
        glommio::timer::sleep(Duration::from_millis(100)).await;
        assert_eq!(links.stats().connect_failures.get(), 1);
        // Sends during backoff neither block nor fail.
        for seq in 10..20 {
            links.send(4, env(seq));
        }
        assert!(wait_until(|| links.stats().connect_failures.get() >= 2).await);

        let server = TestServer::start(addr, TransportConfig::default());
        let mut seq = 20;
        assert!(
            wait_until(|| {
                links.send(4, env(seq));
                seq += 1;
                server.len() > 0
            })
            .await,
            "no envelope arrived after the peer started listening"
        );
        let first_later = seq;
        for s in first_later..first_later + 100 {
            links.send(4, env(s));
        }
        let last = first_later + 99;
        assert!(wait_until(|| server.seqs().last() == Some(&last)).await);
        let seqs = server.seqs();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "out of order: {seqs:?}"
        );
        assert!(seqs.ends_with(&(first_later..=last).collect::<Vec<_>>()));
        assert!(server.received.borrow().iter().all(|(from, _)| *from == 9));
        server.stop().await;
    });
}

#[test]
fn address_change_moves_the_link() {
    run(|| async {
        let a = TestServer::start(any_port(), TransportConfig::default());
        let b = TestServer::start(any_port(), TransportConfig::default());
        let (_trigger, shutdown) = Shutdown::new();
        let links = PeerLinks::new(1, shutdown);
        links.set_address(2, &a.addr.to_string());
        links.send(2, env(0));
        assert!(wait_until(|| a.len() == 1).await);

        links.set_address(2, &b.addr.to_string());
        assert_eq!(links.address(2), Some(b.addr.to_string()));
        links.send(2, env(1));
        assert!(wait_until(|| b.len() == 1).await);
        assert_eq!(b.seqs(), vec![1]);
        assert_eq!(a.len(), 1);
        assert_eq!(links.stats().connects.get(), 2);
        a.stop().await;
        b.stop().await;
    });
}

/// Waits until the server closes `stream` (EOF or reset).
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let read = pin!(stream.read(&mut buf));
    let timeout = pin!(glommio::timer::sleep(DEADLINE));
    match select(read, timeout).await {
        Either::Left((Ok(0) | Err(_), _)) => true,
        Either::Left((Ok(_), _)) => panic!("server wrote to a peer connection"),
        Either::Right(_) => false,
    }
}

#[test]
fn garbage_closes_only_that_connection() {
    run(|| async {
        let config = TransportConfig {
            hello_timeout: Duration::from_millis(100),
            ..Default::default()
        };
        let server = TestServer::start(any_port(), config);

        // A well-behaved link, connected before the garbage arrives.
        let (_trigger, shutdown) = Shutdown::new();
        let links = PeerLinks::new(3, shutdown);
        links.set_address(2, &server.addr.to_string());
        links.send(2, env(0));
        assert!(wait_until(|| server.len() == 1).await);

        // Oversize length in place of the Hello.
        let mut junk = TcpStream::connect(server.addr).await.unwrap();
        junk.write_all(&[0xff; 64]).await.unwrap();
        assert!(closed_by_server(&mut junk).await);

        // Valid Hello, then a frame that is not an Envelope.
        let mut bad = TcpStream::connect(server.addr).await.unwrap();
        let mut buf = BytesMut::new();
        frame::encode_frame(
            &Hello {
                node_id: 66,
                reserved: 0,
                shard: None,
            },
            &mut buf,
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        buf.put_u32(3);
        buf.put_slice(&[0x0f, 0x01, 0x02]);
        bad.write_all(&buf).await.unwrap();
        assert!(closed_by_server(&mut bad).await);

        // Silence instead of a Hello.
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        assert!(closed_by_server(&mut silent).await);

        // A connection that ends mid-frame is not a protocol violation.
        let mut cut = TcpStream::connect(server.addr).await.unwrap();
        let mut buf = BytesMut::new();
        frame::encode_frame(
            &Hello {
                node_id: 67,
                reserved: 0,
                shard: None,
            },
            &mut buf,
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        buf.put_u32(100);
        cut.write_all(&buf).await.unwrap();
        drop(cut);

        for seq in 1..100 {
            links.send(2, env(seq));
        }
        assert!(wait_until(|| server.len() == 100).await);
        assert_eq!(server.seqs(), (0..100).collect::<Vec<_>>());
        assert!(server.received.borrow().iter().all(|(from, _)| *from == 3));
        assert_eq!(server.stats.rejected.get(), 3);
        assert_eq!(links.stats().connects.get(), 1);
        server.stop().await;
    });
}

#[test]
fn large_envelopes_cross_intact() {
    run(|| async {
        let server = TestServer::start(any_port(), TransportConfig::default());
        let (_trigger, shutdown) = Shutdown::new();
        let links = PeerLinks::new(1, shutdown);
        links.set_address(2, &server.addr.to_string());
        let big: Bytes = (0..8 << 20)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        for partition_id in 0..3 {
            links.send(
                2,
                Envelope {
                    body: Some(Body::Raft(RaftMessage {
                        partition_id,
                        message: big.clone(),
                    })),
                },
            );
        }
        assert!(wait_until(|| server.len() == 3).await);
        for (i, (_, env)) in server.received.borrow().iter().enumerate() {
            let Some(Body::Raft(m)) = &env.body else {
                panic!("wrong body")
            };
            assert_eq!(m.partition_id, i as u32);
            assert!(m.message == big, "payload corrupted");
        }
        server.stop().await;
    });
}

#[test]
fn silent_connections_make_room_for_peers() {
    run(|| async {
        let config = TransportConfig {
            max_connections: 4,
            ..Default::default()
        };
        let server = TestServer::start(any_port(), config);
        // Ten sockets that never say Hello; all but the limit are closed
        // as later ones arrive.
        let mut silent = Vec::new();
        for _ in 0..10 {
            silent.push(TcpStream::connect(server.addr).await.unwrap());
        }
        // A peer still gets through, making room in turn.
        let (_trigger, shutdown) = Shutdown::new();
        let links = PeerLinks::new(3, shutdown);
        links.set_address(2, &server.addr.to_string());
        links.send(2, env(0));
        assert!(wait_until(|| server.len() == 1).await);
        let mut closed = 0;
        for sock in &mut silent {
            let mut byte = [0u8; 1];
            let read = pin!(sock.read(&mut byte));
            let timer = pin!(glommio::timer::sleep(Duration::from_millis(50)));
            if let Either::Left((Ok(0) | Err(_), _)) = select(read, timer).await {
                closed += 1;
            }
        }
        // 10 silent + 1 peer through a limit of 4: at least 7 went.
        assert!(closed >= 7, "only {closed} silent sockets closed");
        server.stop().await;
    });
}
