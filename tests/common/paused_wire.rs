//! A store behind a wire that can be paused, as a frozen Redis server is: calls whose caller
//! gave up still land, in order, when the wire resumes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tower_idempotency::store::{Claim, KeyState, LeaseToken, Record, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyStore, StoreError};

/// A store behind a wire that can be paused, as a paused Redis server is: every call is
/// sent in order to one worker that applies them one by one, and while the wire is paused
/// they wait. A call whose caller gave up (the layer's store timeout) still lands when the
/// wire resumes, in the order it was sent, exactly like a command already written to a
/// socket.
#[derive(Clone)]
pub struct PausedWire<S> {
    inner: S,
    jobs: tokio::sync::mpsc::UnboundedSender<WireJob>,
    paused: Arc<tokio::sync::watch::Sender<bool>>,
    /// Calls by name, in the order they landed.
    pub landed: Arc<std::sync::Mutex<Vec<&'static str>>>,
}

type WireJob = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl<S: IdempotencyStore + Clone> PausedWire<S> {
    pub fn new(inner: S) -> Self {
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<WireJob>();
        let (paused, _) = tokio::sync::watch::channel(false);
        let paused = Arc::new(paused);
        let mut resumed = paused.subscribe();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let _ = resumed.wait_for(|p| !*p).await;
                job.await;
            }
        });
        Self {
            inner,
            jobs,
            paused,
            landed: Arc::default(),
        }
    }

    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Sends `call` down the wire and waits for its reply.
    async fn send<T, F>(&self, name: &'static str, call: impl FnOnce(S) -> F) -> T
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let fut = call(self.inner.clone());
        let landed = Arc::clone(&self.landed);
        let job: WireJob = Box::pin(async move {
            let out = fut.await;
            landed.lock().unwrap().push(name);
            let _ = tx.send(out);
        });
        self.jobs.send(job).expect("the wire's worker runs");
        rx.await.expect("the wire's worker answers")
    }
}

#[async_trait]
impl<S: IdempotencyStore + Clone> IdempotencyStore for PausedWire<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let (key, fingerprint) = (key.clone(), *fingerprint);
        self.send("claim", move |s| async move {
            s.claim(&key, &fingerprint, token, lease).await
        })
        .await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = key.clone();
        self.send("complete", move |s| async move {
            s.complete(&key, token, record, ttl).await
        })
        .await
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let key = key.clone();
        self.send(
            "release",
            move |s| async move { s.release(&key, token).await },
        )
        .await
    }

    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let key = key.clone();
        self.send(
            "revoke",
            move |s| async move { s.revoke(&key, token).await },
        )
        .await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let key = key.clone();
        self.send("extend", move |s| async move {
            s.extend(&key, token, lease).await
        })
        .await
    }

    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = key.clone();
        self.send("commit", move |s| async move {
            s.commit(&key, token, ttl).await
        })
        .await
    }

    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = key.clone();
        self.send("settle", move |s| async move {
            s.settle(&key, record, ttl).await
        })
        .await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        let key = key.clone();
        self.send("inspect", move |s| async move { s.inspect(&key).await })
            .await
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let key = key.clone();
        self.send("purge", move |s| async move { s.purge(&key).await })
            .await
    }
}
