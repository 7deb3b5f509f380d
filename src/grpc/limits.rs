//! What clients can make one shard's frontend hold, bounded: connections
//! (the peer port uses the same registry), and the bytes of calls in progress (request messages being read or
//! served, responses waiting for a slow reader's flow-control window).
//!
//! - **Connections.** At most `max_connections` per shard. When a new one
//!   arrives at the limit, the connection idle the longest (no call in
//!   progress) is asked to go away (GOAWAY) to make room, so idle sockets
//!   cannot lock out new clients; if every connection is busy, the new one
//!   is closed at once.
//! - **Bytes held.** Every call holds the bytes of its request and of its
//!   response until its stream ends. A call that would take its connection
//!   past `max_conn_bytes`, or the shard past `max_shard_bytes`, fails with
//!   RESOURCE_EXHAUSTED and frees what it held. A reader that never opens
//!   its window therefore pins at most its connection's share, and only
//!   until the response send timeout resets the stream.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use super::Status;

/// The limits of one shard's frontend.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_conn_bytes: usize,
    pub max_shard_bytes: usize,
}

/// One shard's open connections and the bytes their calls hold.
pub(crate) struct Registry {
    /// Which port, for the logs ("API", "peer").
    port: &'static str,
    limits: Limits,
    conns: RefCell<HashMap<u64, Rc<Conn>>>,
    next_id: Cell<u64>,
    held: Cell<usize>,
    /// When a refusal was last logged (at most one line a second).
    logged: Cell<Option<Instant>>,
}

/// The state of one connection shared with the registry.
struct Conn {
    /// Calls in progress.
    streams: Cell<usize>,
    /// When `streams` last fell to zero (or the connection was accepted).
    idle_since: Cell<Instant>,
    held: Cell<usize>,
    evicted: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Registry {
    pub(crate) fn new(port: &'static str, limits: Limits) -> Rc<Registry> {
        Rc::new(Registry {
            port,
            limits,
            conns: RefCell::new(HashMap::new()),
            next_id: Cell::new(0),
            held: Cell::new(0),
            logged: Cell::new(None),
        })
    }

    /// Connections open (including ones asked to go away but not gone).
    pub(crate) fn len(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Bytes held by calls in progress on this shard.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.get()
    }

    /// Admits a new connection, asking the longest-idle one to go away if
    /// the shard is at its limit; `None` when every connection is busy.
    pub(crate) fn admit(self: &Rc<Self>) -> Option<ConnHandle> {
        let mut conns = self.conns.borrow_mut();
        let staying = conns.values().filter(|c| !c.evicted.get()).count();
        if staying >= self.limits.max_connections {
            let idlest = conns
                .values()
                .filter(|c| !c.evicted.get() && c.streams.get() == 0)
                .min_by_key(|c| c.idle_since.get());
            match idlest {
                Some(c) => {
                    c.evicted.set(true);
                    if let Some(w) = c.waker.take() {
                        w.wake();
                    }
                }
                None => {
                    drop(conns);
                    self.log_refusal(format_args!(
                        "all {} connections of this shard are busy; closing a new one",
                        self.limits.max_connections
                    ));
                    return None;
                }
            }
        }
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let conn = Rc::new(Conn {
            streams: Cell::new(0),
            idle_since: Cell::new(Instant::now()),
            held: Cell::new(0),
            evicted: Cell::new(false),
            waker: Cell::new(None),
        });
        conns.insert(id, conn.clone());
        Some(ConnHandle {
            registry: self.clone(),
            id,
            conn,
        })
    }

    fn log_refusal(&self, what: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .logged
            .get()
            .is_none_or(|t| now.duration_since(t).as_secs() >= 1)
        {
            self.logged.set(Some(now));
            tracing::warn!(port = self.port, "{what}");
        }
    }
}

/// A connection's place in the registry; dropping it frees the place.
pub(crate) struct ConnHandle {
    registry: Rc<Registry>,
    id: u64,
    conn: Rc<Conn>,
}

impl ConnHandle {
    /// Ready once the registry asked this connection to go away.
    pub(crate) fn poll_evicted(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.conn.evicted.get() {
            return Poll::Ready(());
        }
        let waker = self.conn.waker.take();
        self.conn.waker.set(match waker {
            Some(w) if w.will_wake(cx.waker()) => Some(w),
            _ => Some(cx.waker().clone()),
        });
        Poll::Pending
    }

    /// Counts a call in progress until the returned guard drops.
    pub(crate) fn start_call(&self) -> Call {
        self.conn.streams.set(self.conn.streams.get() + 1);
        Call {
            registry: self.registry.clone(),
            conn: self.conn.clone(),
            held: 0,
        }
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.registry.conns.borrow_mut().remove(&self.id);
    }
}

/// One call in progress and the bytes it holds; dropping it releases them.
pub(crate) struct Call {
    registry: Rc<Registry>,
    conn: Rc<Conn>,
    held: usize,
}

impl Call {
    /// Accounts `n` more bytes to this call, or fails RESOURCE_EXHAUSTED
    /// (taking nothing) when its connection or shard would go past its
    /// limit.
    pub(crate) fn hold(&mut self, n: usize) -> Result<(), Status> {
        let limits = &self.registry.limits;
        let conn = self.conn.held.get() + n;
        let shard = self.registry.held.get() + n;
        if conn > limits.max_conn_bytes {
            return Err(Status::resource_exhausted(format!(
                "this connection's calls in progress hold {} bytes; {n} more would pass its limit of {} (read responses faster or open fewer calls at once)",
                self.conn.held.get(),
                limits.max_conn_bytes
            )));
        }
        if shard > limits.max_shard_bytes {
            self.registry.log_refusal(format_args!(
                "calls in progress hold {} bytes, at the limit of {}; refusing more",
                self.registry.held.get(),
                limits.max_shard_bytes
            ));
            return Err(Status::resource_exhausted(format!(
                "the server holds {} bytes for calls in progress, its limit is {}; retry later",
                self.registry.held.get(),
                limits.max_shard_bytes
            )));
        }
        self.conn.held.set(conn);
        self.registry.held.set(shard);
        self.held += n;
        Ok(())
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.conn.held.set(self.conn.held.get() - self.held);
        self.registry.held.set(self.registry.held.get() - self.held);
        let streams = self.conn.streams.get() - 1;
        self.conn.streams.set(streams);
        if streams == 0 {
            self.conn.idle_since.set(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::Code;

    fn registry(max_connections: usize) -> Rc<Registry> {
        Registry::new(
            "test",
            Limits {
                max_connections,
                max_conn_bytes: 100,
                max_shard_bytes: 150,
            },
        )
    }

    fn evicted(h: &ConnHandle) -> bool {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        h.poll_evicted(&mut cx).is_ready()
    }

    #[test]
    fn a_full_shard_evicts_the_longest_idle_connection() {
        let reg = registry(2);
        let a = reg.admit().unwrap();
        let b = reg.admit().unwrap();
        let _busy = b.start_call();
        // Full: `a` is the only idle one and goes.
        let c = reg.admit().unwrap();
        assert!(evicted(&a) && !evicted(&b) && !evicted(&c));
        drop(a);
        assert_eq!(reg.len(), 2);
        // Full again, and `b` busy; `c` is idle and goes.
        let d = reg.admit().unwrap();
        assert!(evicted(&c) && !evicted(&d));
        drop(c);
        // Every connection busy: the new one is refused.
        let _busy_d = d.start_call();
        assert!(reg.admit().is_none());
        assert_eq!(reg.len(), 2);
    }

    #[test]
    fn the_idlest_goes_first() {
        let reg = registry(2);
        let a = reg.admit().unwrap();
        let b = reg.admit().unwrap();
        // `a` finished a call after `b` was accepted: `b` is idler.
        drop(a.start_call());
        let _c = reg.admit().unwrap();
        assert!(evicted(&b) && !evicted(&a));
    }

    #[test]
    fn bytes_held_are_bounded_per_connection_and_shard() {
        let reg = registry(10);
        let a = reg.admit().unwrap();
        let b = reg.admit().unwrap();
        let mut a1 = a.start_call();
        a1.hold(60).unwrap();
        let mut a2 = a.start_call();
        let err = a2.hold(50).unwrap_err();
        assert_eq!(err.code, Code::ResourceExhausted);
        assert!(err.message.contains("connection"), "{}", err.message);
        a2.hold(40).unwrap();
        let mut b1 = b.start_call();
        let err = b1.hold(60).unwrap_err();
        assert!(err.message.contains("server holds"), "{}", err.message);
        b1.hold(50).unwrap();
        assert_eq!(reg.held(), 150);
        drop(a1);
        assert_eq!(reg.held(), 90);
        b1.hold(50).unwrap();
        assert_eq!(reg.held(), 140);
        drop((a2, b1));
        assert_eq!(reg.held(), 0);
    }
}
