//! The running parts a layer's services share: the store (and the embedded memory store,
//! called directly), the lease keeper, the detached work, the rendered problems; with the
//! [`Settings`] they were made for.

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;

use crate::fingerprint::Fingerprint;
use crate::key::{Scope, StoreKey};
use crate::lease::{LeaseKeeper, Renewal};
use crate::record::Record;
use crate::settings::{ScopeRule, Settings};
use crate::store::{Claim, IdempotencyStore, KeyState, LeaseToken, StoreError, bounded};
use crate::tasks::DetachedWork;

/// What a layer's services share while they run; made once per layer (and again after a
/// setting changes), read through [`Settings`] by `Deref`.
pub(crate) struct Runtime {
    pub(crate) settings: Settings,
    pub(crate) store: Arc<dyn IdempotencyStore>,
    /// The same store when it is the embedded [`MemoryStore`](crate::MemoryStore): its
    /// calls are made directly, without a boxed future each.
    #[cfg(feature = "memory")]
    pub(crate) memory: Option<crate::MemoryStore>,
    /// Copies of completed records, answered without a store call
    /// ([`IdempotencyLayer::cache_replays`](crate::IdempotencyLayer::cache_replays)).
    #[cfg(feature = "memory")]
    replay_cache: Option<crate::replay_cache::ReplayCache>,
    /// Whether the missing scope rule was logged already.
    pub(crate) scope_warned: std::sync::atomic::AtomicBool,
    /// The 409 and 422 answers, rendered once.
    pub(crate) problems: crate::problem::ProblemCache,
    pub(crate) keeper: Arc<LeaseKeeper>,
    pub(crate) work: DetachedWork,
}

impl Deref for Runtime {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
}

impl Runtime {
    pub(crate) fn new(
        settings: Settings,
        store: Arc<dyn IdempotencyStore>,
        #[cfg(feature = "memory")] memory: Option<crate::MemoryStore>,
        work: DetachedWork,
    ) -> Self {
        #[cfg(feature = "memory")]
        let replay_cache = match (settings.replay_cache, &memory) {
            (Some((bytes, age)), None) => crate::replay_cache::ReplayCache::new(bytes, age),
            _ => None,
        };
        Self {
            settings,
            store,
            #[cfg(feature = "memory")]
            memory,
            #[cfg(feature = "memory")]
            replay_cache,
            scope_warned: Default::default(),
            problems: Default::default(),
            keeper: Arc::new(LeaseKeeper::new()),
            work,
        }
    }

    /// The hash of `key` in the embedded memory store's map, when it is this layer's store
    /// (0 otherwise): computed once per request, for its claim and its completion.
    #[inline]
    pub(crate) fn key_hash(&self, key: &StoreKey) -> u64 {
        #[cfg(feature = "memory")]
        if let Some(memory) = &self.memory {
            return memory.hash_of(key);
        }
        let _ = key;
        0
    }

    /// Claims through the embedded memory store directly (no boxed future), when it is
    /// this layer's store; `None` otherwise. `hash` is [`key_hash`](Self::key_hash).
    #[inline]
    pub(crate) fn claim_direct(
        &self,
        key: &StoreKey,
        hash: u64,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Option<Result<Claim, StoreError>> {
        #[cfg(feature = "memory")]
        if let Some(memory) = &self.memory {
            return Some(memory.claim_direct(key, hash, fingerprint, token, lease));
        }
        let _ = (key, hash, fingerprint, token, lease);
        None
    }

    /// Completes through the embedded memory store directly, when it is this layer's store:
    /// `Ok` with the store's answer (and the record back if it refused), or `Err` with the
    /// record untouched.
    #[inline]
    #[allow(clippy::type_complexity)]
    // The record handed back is the point: no copy is kept for the attempt.
    #[allow(clippy::result_large_err)]
    pub(crate) fn complete_direct(
        &self,
        key: &StoreKey,
        hash: u64,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<Result<(), (StoreError, Record)>, Record> {
        #[cfg(feature = "memory")]
        if let Some(memory) = &self.memory {
            return Ok(memory.complete_owned(key, hash, token, record, ttl));
        }
        let _ = (key, hash, token, ttl);
        Err(record)
    }

    /// One store call as the layer makes every one: bounded by the store timeout (a call
    /// that overruns is [`StoreError::Timeout`], and may still land), and timed for the
    /// metrics under `op`.
    async fn call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let timer = crate::metrics::Timer::start();
        let result = bounded(self.store_timeout, call).await;
        timer.store_call(&*self.store, op, &result);
        result
    }

    // The store as the layer calls it: with the layer's lease, TTL and store timeout, so that
    // no call site passes them by hand.

    /// Claims `key` for `lease` (the request's, see `Settings::lease_of`; directly on the
    /// embedded memory store, with `hash`, [`key_hash`](Self::key_hash)).
    pub(crate) async fn claim(
        &self,
        key: &StoreKey,
        hash: u64,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let timer = crate::metrics::Timer::start();
        let result = match self.claim_direct(key, hash, fingerprint, token, lease) {
            Some(claim) => claim,
            // Boxed: a store across the network pays one allocation more, and the memory
            // store's claim (no wait) keeps the request's future small.
            None => {
                #[cfg(feature = "memory")]
                if let Some(record) = self.replay_cache.as_ref().and_then(|c| c.get(key)) {
                    crate::metrics::replay_cache_hit();
                    return Ok(Claim::Completed(record));
                }
                let result = Box::pin(bounded(
                    self.store_timeout,
                    self.store.claim(key, fingerprint, token, lease),
                ))
                .await;
                self.cache_answer(key, &result);
                result
            }
        };
        timer.store_call(&*self.store, "claim", &result);
        result
    }

    /// Keeps a completed record the store answered, when replays are cached.
    fn cache_answer(&self, key: &StoreKey, answer: &Result<Claim, StoreError>) {
        #[cfg(feature = "memory")]
        if let (Some(cache), Ok(Claim::Completed(record))) = (&self.replay_cache, answer) {
            cache.put(key, Arc::clone(record), None);
        }
        #[cfg(not(feature = "memory"))]
        let _ = (key, answer);
    }

    /// Keeps `record`, just stored under `key` for `ttl`, when replays are cached.
    pub(crate) fn cache_stored(&self, key: &StoreKey, record: Record, ttl: Duration) {
        #[cfg(feature = "memory")]
        if let Some(cache) = &self.replay_cache {
            cache.put(key, Arc::new(record), Some(ttl));
        }
        #[cfg(not(feature = "memory"))]
        let _ = (key, record, ttl);
    }

    /// Waits up to `timeout` for `key` to finish, then claims it: the whole wait is bounded by
    /// its own timeout plus one store call.
    pub(crate) async fn wait(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
        timeout: Duration,
    ) -> Result<Claim, StoreError> {
        let timer = crate::metrics::Timer::start();
        // Boxed: a rare path, kept out of the request's future.
        let result = Box::pin(bounded(
            timeout.saturating_add(self.store_timeout),
            self.store.wait(key, fingerprint, token, lease, timeout),
        ))
        .await;
        self.cache_answer(key, &result);
        timer.store_call(&*self.store, "wait", &result);
        result
    }

    /// Stores `record` under `key` held with `token`, for `ttl` (the claim's TTL).
    pub(crate) async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.call("complete", self.store.complete(key, token, record, ttl))
            .await
    }

    /// Frees `key` held with `token` (a committed key: [`StoreError::Committed`]).
    pub(crate) async fn release(
        &self,
        key: &StoreKey,
        token: LeaseToken,
    ) -> Result<(), StoreError> {
        self.call("release", self.store.release(key, token)).await
    }

    /// Frees `key` held with `token`, its commit point included.
    pub(crate) async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        // Boxed: a rare path, kept out of the request's future.
        Box::pin(self.call("revoke", self.store.revoke(key, token))).await
    }

    /// Declares the commit point of the claim of `token` on `key` (directly on the
    /// embedded memory store, with `hash`, [`key_hash`](Self::key_hash)).
    pub(crate) async fn commit(
        &self,
        key: &StoreKey,
        hash: u64,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        #[cfg(feature = "memory")]
        if let Some(memory) = &self.memory {
            let timer = crate::metrics::Timer::start();
            let result = memory.commit_direct(key, hash, token, ttl);
            timer.store_call(&*self.store, "commit", &result);
            return result;
        }
        let _ = hash;
        self.call("commit", self.store.commit(key, token, ttl))
            .await
    }

    /// Gives an outcome-unknown `key` the answer `record`, for `ttl`.
    pub(crate) async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.call("settle", self.store.settle(key, record, ttl))
            .await
    }

    /// What the store holds under `key`.
    pub(crate) async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        self.call("inspect", self.store.inspect(key)).await
    }

    /// What the lease keeper needs to renew this configuration's claims.
    pub(crate) fn renewal(&self) -> Renewal {
        Renewal {
            store: Arc::clone(&self.store),
            lease: self.lease,
            timeout: self.store_timeout,
        }
    }

    /// The caller's scope, or `None` when the caller cannot be identified.
    pub(crate) fn scope_of(&self, parts: &Parts) -> Option<Scope> {
        if let Some(call) = parts.extensions.get::<crate::key::CallScope>() {
            return Some(call.0.clone());
        }
        match &self.scope {
            ScopeRule::By(f) => f(parts),
            ScopeRule::Shared => Some(Scope::anonymous()),
            ScopeRule::Unset => {
                if !self
                    .scope_warned
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::error!(
                        "IdempotencyLayer has no caller scope: every covered request is refused \
                         with 403 caller-unknown. Choose one: scope_by_principal::<T>() (the \
                         user an auth layer put in the request extensions), scope_by(..), \
                         scope_by_credential(..), or share_keys_across_callers()"
                    );
                }
                None
            }
        }
    }
}
