//! A store wrapper that injects failures and delays on chosen operations and counts calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tower_idempotency::store::{Claim, KeyState, LeaseToken, Record, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyStore, StoreError};

/// Which store operations fail or stall.
#[derive(Debug, Default)]
pub struct Faults {
    /// Fail this many of the next claims.
    pub claim_failures: AtomicUsize,
    /// Fail this many of the next completes.
    pub complete_failures: AtomicUsize,
    /// Fail this many of the next releases.
    pub release_failures: AtomicUsize,
    /// Fail this many of the next revokes.
    pub revoke_failures: AtomicUsize,
    /// Fail this many of the next extends.
    pub extend_failures: AtomicUsize,
    /// Delay every complete by this many milliseconds.
    pub complete_delay_ms: AtomicUsize,
    /// Delay every extend by this many milliseconds (read when the extend starts).
    pub extend_delay_ms: AtomicUsize,
    /// Delay the reply of every complete by this many milliseconds (the record is stored at
    /// once, as when a reply is slow on the wire).
    pub complete_reply_delay_ms: AtomicUsize,
    /// Delay the reply of every claim by this many milliseconds (the claim itself lands at
    /// once, as when a reply is slow on the wire).
    pub claim_reply_delay_ms: AtomicUsize,
    /// Lose the reply of this many of the next claims: the claim lands, the caller gets an
    /// error.
    pub claim_lost_replies: AtomicUsize,
    /// Answer this many of the next claims with a record that cannot be decoded.
    pub claim_unreadable: AtomicUsize,
    /// When each extend was called.
    pub extend_times: std::sync::Mutex<Vec<tokio::time::Instant>>,
    /// The store key of every claim, in order.
    pub claimed_keys: std::sync::Mutex<Vec<String>>,
    /// Counts of calls.
    pub claims: AtomicUsize,
    pub completes: AtomicUsize,
    /// Completes that failed, injected or not.
    pub failed_completes: AtomicUsize,
    pub releases: AtomicUsize,
    /// Releases that freed a key (the others found nothing their token owned).
    pub released: AtomicUsize,
    pub extends: AtomicUsize,
    /// Commit points declared.
    pub commits: AtomicUsize,
    /// Once set, every call after a successful commit fails: the instance is cut off from
    /// the store between its commit point and its answer.
    pub fail_after_commit: std::sync::atomic::AtomicBool,
    /// Set by a successful commit while `fail_after_commit` is on.
    pub cut_off: std::sync::atomic::AtomicBool,
}

fn take(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[derive(Debug, thiserror::Error)]
#[error("injected fault")]
pub struct Injected;

/// A store wrapper that injects failures and delays on chosen operations and counts calls.
#[derive(Clone)]
pub struct FaultStore<S> {
    pub inner: S,
    pub faults: Arc<Faults>,
}

impl<S> FaultStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            faults: Arc::new(Faults::default()),
        }
    }
}

impl<S> FaultStore<S> {
    fn cut_off(&self) -> Result<(), StoreError> {
        if self.faults.cut_off.load(Ordering::SeqCst) {
            Err(StoreError::backend(Injected))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl<S: IdempotencyStore> IdempotencyStore for FaultStore<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.cut_off()?;
        self.faults.claims.fetch_add(1, Ordering::SeqCst);
        self.faults
            .claimed_keys
            .lock()
            .unwrap()
            .push(key.as_str().to_owned());
        if take(&self.faults.claim_failures) {
            return Err(StoreError::backend(Injected));
        }
        if take(&self.faults.claim_unreadable) {
            let newer = [0u8; 4];
            return Err(StoreError::Decode(
                Record::decode(&newer).expect_err("not a record"),
            ));
        }
        let claim = self.inner.claim(key, fingerprint, token, lease).await;
        let delay = self.faults.claim_reply_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        if take(&self.faults.claim_lost_replies) {
            return Err(StoreError::backend(Injected));
        }
        claim
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.faults.completes.fetch_add(1, Ordering::SeqCst);
        if self.cut_off().is_err() {
            self.faults.failed_completes.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::backend(Injected));
        }
        let delay = self.faults.complete_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        let result = if take(&self.faults.complete_failures) {
            Err(StoreError::backend(Injected))
        } else {
            self.inner.complete(key, token, record, ttl).await
        };
        let reply_delay = self.faults.complete_reply_delay_ms.load(Ordering::SeqCst);
        if reply_delay > 0 {
            tokio::time::sleep(Duration::from_millis(reply_delay as u64)).await;
        }
        if result.is_err() {
            self.faults.failed_completes.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        self.faults.releases.fetch_add(1, Ordering::SeqCst);
        self.cut_off()?;
        if take(&self.faults.release_failures) {
            return Err(StoreError::backend(Injected));
        }
        let result = self.inner.release(key, token).await;
        if result.is_ok() {
            self.faults.released.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        self.cut_off()?;
        if take(&self.faults.revoke_failures) {
            return Err(StoreError::backend(Injected));
        }
        self.inner.revoke(key, token).await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.faults.extends.fetch_add(1, Ordering::SeqCst);
        self.faults
            .extend_times
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        self.cut_off()?;
        if take(&self.faults.extend_failures) {
            return Err(StoreError::backend(Injected));
        }
        let delay = self.faults.extend_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        self.inner.extend(key, token, lease).await
    }

    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.cut_off()?;
        self.inner.commit(key, token, ttl).await?;
        self.faults.commits.fetch_add(1, Ordering::SeqCst);
        if self.faults.fail_after_commit.load(Ordering::SeqCst) {
            self.faults.cut_off.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.cut_off()?;
        self.inner.settle(key, record, ttl).await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        self.inner.inspect(key).await
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.inner.purge(key).await
    }
}
