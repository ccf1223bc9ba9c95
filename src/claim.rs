//! Owning a claim: the guard that completes or releases it exactly once, and the guard that
//! releases a claim whose reply never arrived.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::lease::Registration;
use crate::record::Record;
use crate::store::{Claim, ErrorChain, LeaseToken, StoreError, bounded};

/// How long the layer keeps trying to store an outcome while the store fails: ten minutes.
/// The key stays claimed (and its lease extended whenever the store answers) meanwhile, so
/// no retry runs the operation again; past this, the layer gives up and logs an `error`.
pub(crate) const COMPLETION_RETRY_WINDOW: Duration = Duration::from_secs(600);
/// The first pause before retrying a failed store call; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// A claim sent to the store whose answer is not in yet. If the answer never comes (the
/// call failed or overran, or the request was dropped meanwhile), the claim may still have
/// landed: it is released by its token, on a tracked task, so that no key stays blocked
/// for a lease with nothing running.
pub(crate) struct PendingClaim {
    config: Arc<Config>,
    key: StoreKey,
    token: LeaseToken,
    armed: bool,
}

impl PendingClaim {
    pub(crate) fn new(config: &Arc<Config>, key: StoreKey) -> Self {
        Self {
            config: Arc::clone(config),
            key,
            token: LeaseToken::new(),
            armed: true,
        }
    }

    pub(crate) fn key(&self) -> &StoreKey {
        &self.key
    }

    pub(crate) fn token(&self) -> LeaseToken {
        self.token
    }

    /// The store answered that the key is someone else's (in flight or completed): nothing
    /// of ours was left behind.
    pub(crate) fn not_ours(mut self) {
        self.armed = false;
    }

    /// The store answered that this claim owns the key.
    pub(crate) fn acquired(mut self, fingerprint: Fingerprint) -> Claimed {
        self.armed = false;
        let key = self.key.take();
        Claimed::new(Arc::clone(&self.config), key, self.token, fingerprint)
    }

    /// The claim failed or overran: release whatever it may have left.
    pub(crate) fn failed(mut self) {
        self.armed = false;
        self.release_orphan("its reply was lost");
    }

    fn release_orphan(&self, why: &'static str) {
        let store = Arc::clone(&self.config.store);
        let key = self.key.clone();
        let token = self.token;
        let timeout = self.config.store_timeout;
        // Past a lease and its contest from now, a claim that landed is free for the taking
        // anyway.
        let lease = self.config.lease;
        let until =
            crate::time::deadline_after(lease.saturating_add(crate::store::takeover_grace(lease)));
        self.config.work.spawn("orphan release", async move {
            let mut pause = FIRST_PAUSE;
            loop {
                match bounded(timeout, store.release(&key, token)).await {
                    Ok(()) => {
                        tracing::warn!(
                            key = key.client_key(),
                            "released an idempotency claim whose request was not answered \
                             by the store ({why}); a retry can run now"
                        );
                        return;
                    }
                    // Not (or not yet) landed, or not ours; a claim stuck on the wire may
                    // still land, so look again until a lease has passed.
                    Err(StoreError::LeaseLost) => {}
                    Err(err) => tracing::warn!(
                        key = key.client_key(),
                        error = %ErrorChain(&err),
                        "releasing an unanswered idempotency claim failed; retrying"
                    ),
                }
                let now = tokio::time::Instant::now();
                if now >= until {
                    return;
                }
                tokio::time::sleep(crate::time::jittered(pause).min(until - now)).await;
                pause = (pause * 2).min(MAX_PAUSE.max(timeout));
            }
        });
    }
}

impl Drop for PendingClaim {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            self.release_orphan("the request was abandoned while its claim was on the wire");
        }
    }
}

/// Ownership of a claim: completes or releases it exactly once, and releases it if dropped
/// unsettled (a panic, a cancelled operation). Its lease is kept alive until then.
pub(crate) struct Claimed {
    config: Arc<Config>,
    key: StoreKey,
    token: LeaseToken,
    fingerprint: Fingerprint,
    registration: Option<Registration>,
    settled: bool,
}

impl Claimed {
    fn new(
        config: Arc<Config>,
        key: StoreKey,
        token: LeaseToken,
        fingerprint: Fingerprint,
    ) -> Self {
        let registration = config.keeper.register(&config.renewal(), &key, token);
        Self {
            config,
            key,
            token,
            fingerprint,
            registration: Some(registration),
            settled: false,
        }
    }

    pub(crate) fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub(crate) fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    fn settle(&mut self) {
        self.settled = true;
        self.registration = None;
    }

    /// Frees the key so that a retry runs the operation. Waits for the first attempt (within
    /// the store-call bound); further attempts, if it failed, go on in the background.
    pub(crate) async fn release(mut self) {
        self.settle();
        let config = Arc::clone(&self.config);
        release(config, self.key.clone(), self.token, false).await;
    }

    /// Stores the outcome. Tries for up to the store-call bound in all (a transient failure
    /// is retried at once, with jittered backoff, and the response end waits for it); if
    /// the store still fails, the claim moves to a tracked task that goes on retrying for
    /// [`COMPLETION_RETRY_WINDOW`], keeping the lease alive, so that the response is not
    /// held for a whole outage and the key never runs twice meanwhile.
    pub(crate) async fn complete(mut self, record: Record) {
        let inline_until = crate::time::deadline_after(self.config.store_timeout);
        let mut pause = FIRST_PAUSE;
        let mut failures = 0u32;
        loop {
            let err = match self.complete_once(&record, inline_until).await {
                Ok(()) => {
                    self.settle();
                    if failures > 0 {
                        tracing::info!(
                            key = self.key.client_key(),
                            failures,
                            "idempotency record stored after failed attempts"
                        );
                    }
                    return;
                }
                Err(StoreError::LeaseLost) => {
                    self.settle();
                    self.taken_over(failures > 0, record);
                    return;
                }
                Err(err) => err,
            };
            failures += 1;
            let now = tokio::time::Instant::now();
            let wait = crate::time::jittered(pause);
            if now + wait >= inline_until {
                tracing::warn!(
                    key = self.key.client_key(),
                    error = %ErrorChain(&err),
                    failures,
                    "storing the idempotency record failed; retrying in the background, \
                     the key stays claimed meanwhile"
                );
                let work = self.config.work.clone();
                work.spawn("completion", self.complete_retrying(record, failures));
                return;
            }
            tracing::warn!(
                key = self.key.client_key(),
                error = %ErrorChain(&err),
                failures,
                "storing the idempotency record failed; retrying"
            );
            tokio::time::sleep(wait).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// One attempt, bounded by the store-call bound and by `until`, if sooner.
    async fn complete_once(
        &self,
        record: &Record,
        until: tokio::time::Instant,
    ) -> Result<(), StoreError> {
        let store = &self.config.store;
        let timeout = self.config.store_timeout;
        let call = store.complete(&self.key, self.token, record.clone(), self.config.ttl);
        match tokio::time::timeout_at(until.min(crate::time::deadline_after(timeout)), call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    async fn complete_retrying(mut self, record: Record, mut failures: u32) {
        let give_up = crate::time::deadline_after(COMPLETION_RETRY_WINDOW);
        let mut pause = FIRST_PAUSE;
        loop {
            tokio::time::sleep(crate::time::jittered(pause)).await;
            pause = (pause * 2).min(MAX_PAUSE);
            let until = crate::time::deadline_after(self.config.store_timeout);
            match self.complete_once(&record, until).await {
                Ok(()) => {
                    self.settle();
                    tracing::info!(
                        key = self.key.client_key(),
                        failures,
                        "idempotency record stored after failed attempts"
                    );
                    return;
                }
                Err(StoreError::LeaseLost) => {
                    self.settle();
                    self.taken_over(true, record);
                    return;
                }
                Err(err) if tokio::time::Instant::now() >= give_up => {
                    self.settle();
                    tracing::error!(
                        key = self.key.client_key(),
                        error = %ErrorChain(&err),
                        failures,
                        "gave up storing the idempotency record; once its lease ends, a \
                         retry with this key runs the operation again"
                    );
                    return;
                }
                Err(err) => {
                    failures += 1;
                    if failures.is_power_of_two() {
                        tracing::warn!(
                            key = self.key.client_key(),
                            error = %ErrorChain(&err),
                            failures,
                            "storing the idempotency record failed again; retrying"
                        );
                    }
                }
            }
        }
    }

    /// The token no longer owns the key: another claim took it over after the lease lapsed
    /// (or an earlier attempt whose reply was lost stored the record). The operation ran and
    /// its outcome is in hand, so it is not thrown away: if the key is free again (the other
    /// claim was released: its request gave up, or its outcome was not storable), it is
    /// claimed anew and this outcome stored; if a record exists, it is kept.
    fn taken_over(&self, after_failures: bool, record: Record) {
        tracing::warn!(
            key = self.key.client_key(),
            after_failures,
            "the idempotency key was taken over by another request after this one's lease \
             lapsed; this outcome is stored if the key is freed again, otherwise the other \
             request's outcome is kept"
        );
        let config = Arc::clone(&self.config);
        let (key, fingerprint) = (self.key.clone(), self.fingerprint);
        let work = config.work.clone();
        work.spawn("store after takeover", async move {
            store_when_free(config, key, fingerprint, record).await;
        });
    }
}

/// Claims `key` again whenever it is free and stores `record` under it; stops when a record
/// exists (another's or an earlier attempt's), or after [`COMPLETION_RETRY_WINDOW`].
async fn store_when_free(
    config: Arc<Config>,
    key: StoreKey,
    fingerprint: Fingerprint,
    record: Record,
) {
    let give_up = crate::time::deadline_after(COMPLETION_RETRY_WINDOW);
    let store = &config.store;
    let timeout = config.store_timeout;
    let mut pause = FIRST_PAUSE;
    while tokio::time::Instant::now() < give_up {
        let token = LeaseToken::new();
        match bounded(
            timeout,
            store.claim(&key, &fingerprint, token, config.lease),
        )
        .await
        {
            Ok(Claim::Acquired(_)) => {
                let stored = bounded(
                    timeout,
                    store.complete(&key, token, record.clone(), config.ttl),
                )
                .await;
                match stored {
                    Ok(()) => {
                        tracing::warn!(
                            key = key.client_key(),
                            "the key was free again: this request's outcome is stored"
                        );
                        return;
                    }
                    Err(_) => {
                        let _ = bounded(timeout, store.release(&key, token)).await;
                    }
                }
            }
            Ok(Claim::Completed(_)) => return,
            Ok(Claim::InFlight { .. }) => {}
            Err(_) => {
                let _ = bounded(timeout, store.release(&key, token)).await;
            }
        }
        tokio::time::sleep(crate::time::jittered(pause)).await;
        pause = (pause * 2).min(MAX_PAUSE / 2);
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.settle();
        let config = Arc::clone(&self.config);
        let (key, token) = (self.key.clone(), self.token);
        let work = config.work.clone();
        work.spawn("release", release(config, key, token, true));
    }
}

/// Releases a claim: one bounded attempt, then (if that failed) retries on a tracked task
/// until the lease would have ended anyway.
async fn release(config: Arc<Config>, key: StoreKey, token: LeaseToken, detached: bool) {
    let timeout = config.store_timeout;
    match bounded(timeout, config.store.release(&key, token)).await {
        Ok(()) | Err(StoreError::LeaseLost) => return,
        Err(err) => tracing::warn!(
            key = key.client_key(),
            error = %ErrorChain(&err),
            "releasing the idempotency key failed; retrying"
        ),
    }
    let until = crate::time::deadline_after(config.lease);
    let retry = {
        let config = Arc::clone(&config);
        async move {
            let mut pause = FIRST_PAUSE;
            loop {
                let now = tokio::time::Instant::now();
                if now >= until {
                    tracing::warn!(
                        key = key.client_key(),
                        "could not release the idempotency key; it is free once its lease ends"
                    );
                    return;
                }
                tokio::time::sleep(crate::time::jittered(pause).min(until - now)).await;
                pause = (pause * 2).min(MAX_PAUSE);
                match bounded(timeout, config.store.release(&key, token)).await {
                    Ok(()) | Err(StoreError::LeaseLost) => return,
                    Err(_) => {}
                }
            }
        }
    };
    if detached {
        retry.await;
    } else {
        config.work.clone().spawn("release", retry);
    }
}
