//! The running parts a layer's services share: the store (and the embedded memory store,
//! called directly), the lease keeper, the detached work, the rendered problems; with the
//! [`Settings`] they were made for.

use std::ops::Deref;
use std::sync::Arc;

use http::request::Parts;

use crate::key::Scope;
use crate::lease::{LeaseKeeper, Renewal};
use crate::settings::{ScopeRule, Settings};
use crate::store::IdempotencyStore;
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
        Self {
            settings,
            store,
            #[cfg(feature = "memory")]
            memory,
            scope_warned: Default::default(),
            problems: Default::default(),
            keeper: Arc::new(LeaseKeeper::new()),
            work,
        }
    }

    /// Claims through the embedded memory store directly (no boxed future), when it is
    /// this layer's store; `None` otherwise.
    #[inline]
    pub(crate) fn claim_direct(
        &self,
        key: &crate::key::StoreKey,
        fingerprint: &crate::fingerprint::Fingerprint,
        token: crate::store::LeaseToken,
    ) -> Option<Result<crate::store::Claim, crate::store::StoreError>> {
        #[cfg(feature = "memory")]
        if let Some(memory) = &self.memory {
            return Some(memory.claim_direct(key, fingerprint, token, self.lease));
        }
        let _ = (key, fingerprint, token);
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
        key: &crate::key::StoreKey,
        token: crate::store::LeaseToken,
        record: crate::record::Record,
    ) -> Result<Result<(), (crate::store::StoreError, crate::record::Record)>, crate::record::Record>
    {
        #[cfg(feature = "memory")]
        if let Some(memory) = &self.memory {
            return Ok(memory.complete_owned(key, token, record, self.ttl));
        }
        let _ = (key, token);
        Err(record)
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
