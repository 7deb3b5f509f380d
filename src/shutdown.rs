//! A shutdown signal every task of a shard can wait on.

use futures::channel::oneshot;
use futures::future::{FutureExt, Shared};

/// Cloneable handle that resolves once shutdown has been requested.
#[derive(Clone)]
pub struct Shutdown {
    rx: Shared<oneshot::Receiver<()>>,
}

/// The trigger side: dropping it (or calling `trigger`) fires the signal.
pub struct ShutdownTrigger {
    tx: Option<oneshot::Sender<()>>,
}

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = oneshot::channel();
        (
            ShutdownTrigger { tx: Some(tx) },
            Shutdown { rx: rx.shared() },
        )
    }

    /// True once shutdown was requested.
    pub fn is_set(&self) -> bool {
        self.rx.peek().is_some()
    }

    /// Resolves when shutdown is requested.
    pub async fn wait(&self) {
        let _ = self.rx.clone().await;
    }
}

impl ShutdownTrigger {
    pub fn trigger(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(());
        }
    }
}
