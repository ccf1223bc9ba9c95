//! A gate that holds handlers: a test waits until enough of them have arrived, does what it
//! must while they wait (cut a connection, say), then lets them all through.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Gate {
    arrived: AtomicUsize,
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            arrived: AtomicUsize::new(0),
            open: tokio::sync::watch::channel(false).0,
        })
    }

    /// Arrives, then waits until the gate is open.
    pub async fn pass(&self) {
        let mut open = self.open.subscribe();
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let _ = open.wait_for(|open| *open).await;
    }

    /// How many have arrived.
    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    /// Lets every waiting and later arrival through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}
