//! The layer's configuration, shared by the service, its futures and its bodies.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, Method, StatusCode};

use crate::fingerprint::Fingerprint;
use crate::key::{KeyParsing, Scope};
use crate::lease::{LeaseKeeper, Renewal};
use crate::policy::{Disconnect, InFlight, MissingKey, StoreFailure};
use crate::store::IdempotencyStore;
use crate::tasks::DetachedWork;

pub(crate) type CoverFn = dyn Fn(&Parts) -> bool + Send + Sync;
pub(crate) type ScopeFn = dyn Fn(&Parts) -> Option<Scope> + Send + Sync;
pub(crate) type FingerprintFn = dyn Fn(&Parts, &Bytes) -> Fingerprint + Send + Sync;
pub(crate) type StatusFn = dyn Fn(StatusCode) -> bool + Send + Sync;
pub(crate) type GrpcFn = dyn Fn(u32) -> bool + Send + Sync;
pub(crate) type HeaderFn = dyn Fn(&HeaderName) -> bool + Send + Sync;

#[derive(Clone)]
pub(crate) enum Cover {
    /// HTTP requests with these methods; gRPC calls only when listed in `grpc_methods`.
    Methods(Vec<Method>),
    /// Whatever the user's function says, gRPC calls included.
    When(Arc<CoverFn>),
}

/// How the layer tells callers apart.
#[derive(Clone)]
pub(crate) enum ScopeRule {
    /// Nothing configured: no caller can be identified, so covered requests are refused.
    Unset,
    /// Every caller shares one scope, by the user's explicit choice.
    Shared,
    /// The user's function; `None` is a caller it cannot identify.
    By(Arc<ScopeFn>),
}

pub(crate) struct Config {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    /// The same store when it is the embedded [`MemoryStore`](crate::MemoryStore): its
    /// calls are made directly, without a boxed future each.
    #[cfg(feature = "memory")]
    pub(crate) memory: Option<crate::MemoryStore>,
    pub(crate) header: HeaderName,
    pub(crate) parsing: KeyParsing,
    pub(crate) max_key_len: usize,
    pub(crate) missing: MissingKey,
    pub(crate) cover: Cover,
    /// The gRPC methods covered (full paths, `/package.Service/Method`).
    pub(crate) grpc_methods: Arc<[String]>,
    pub(crate) scope: ScopeRule,
    /// Whether the missing scope rule was logged already.
    pub(crate) scope_warned: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) fingerprint: Option<Arc<FingerprintFn>>,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) storable: Arc<StatusFn>,
    pub(crate) grpc_storable: Arc<GrpcFn>,
    pub(crate) maybe_ran: Arc<StatusFn>,
    pub(crate) grpc_maybe_ran: Arc<GrpcFn>,
    pub(crate) replay_header: Option<Arc<HeaderFn>>,
    pub(crate) lease: Duration,
    pub(crate) ttl: Duration,
    pub(crate) in_flight: InFlight,
    pub(crate) store_failure: StoreFailure,
    pub(crate) disconnect: Disconnect,
    pub(crate) retry_after: Duration,
    pub(crate) type_base: String,
    pub(crate) link: bool,
    pub(crate) recover: Option<Arc<crate::recover::RecoverFn>>,
    /// The 409 and 422 answers, rendered once.
    pub(crate) problems: Arc<crate::problem::ProblemCache>,
    pub(crate) store_timeout: Duration,
    pub(crate) keeper: Arc<LeaseKeeper>,
    pub(crate) work: DetachedWork,
}

impl Clone for Config {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            #[cfg(feature = "memory")]
            memory: self.memory.clone(),
            header: self.header.clone(),
            parsing: self.parsing,
            max_key_len: self.max_key_len,
            missing: self.missing,
            cover: self.cover.clone(),
            grpc_methods: Arc::clone(&self.grpc_methods),
            scope: self.scope.clone(),
            scope_warned: Arc::clone(&self.scope_warned),
            fingerprint: self.fingerprint.clone(),
            max_request_body: self.max_request_body,
            max_response_body: self.max_response_body,
            storable: Arc::clone(&self.storable),
            grpc_storable: Arc::clone(&self.grpc_storable),
            maybe_ran: Arc::clone(&self.maybe_ran),
            grpc_maybe_ran: Arc::clone(&self.grpc_maybe_ran),
            replay_header: self.replay_header.clone(),
            lease: self.lease,
            ttl: self.ttl,
            in_flight: self.in_flight,
            store_failure: self.store_failure,
            disconnect: self.disconnect,
            retry_after: self.retry_after,
            type_base: self.type_base.clone(),
            link: self.link,
            recover: self.recover.clone(),
            // Rendered with this configuration's type base: a fresh cache.
            problems: Arc::default(),
            store_timeout: self.store_timeout,
            // A fresh keeper: a derived configuration may have another lease.
            keeper: Arc::new(LeaseKeeper::new()),
            // One handle on detached work for every layer derived from this one.
            work: self.work.clone(),
        }
    }
}

impl Config {
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

    /// Whether a request is covered, when its method, path and headers tell (`None` when a
    /// [`cover_when`](crate::IdempotencyLayer::cover_when) function must see the whole head),
    /// and whether it is a gRPC call (`None` when that was not needed to decide).
    pub(crate) fn covers_by_method(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
    ) -> (Option<bool>, Option<bool>) {
        // A method no rule covers, with no gRPC method chosen, is decided without reading
        // the content type.
        let by_method = match &self.cover {
            Cover::Methods(methods) => methods.contains(method),
            Cover::When(_) => true,
        };
        if !by_method && self.grpc_methods.is_empty() {
            return (Some(false), None);
        }
        let grpc = crate::problem::is_grpc(headers);
        if grpc && self.grpc_methods.iter().any(|m| m == uri.path()) {
            return (Some(true), Some(true));
        }
        match &self.cover {
            Cover::Methods(_) => (Some(!grpc && by_method), Some(grpc)),
            Cover::When(_) => (None, Some(grpc)),
        }
    }

    pub(crate) fn covers(&self, parts: &Parts) -> bool {
        if crate::problem::is_grpc(&parts.headers) {
            // Every gRPC call is a POST, and a streaming one cannot be buffered and replayed:
            // a gRPC method is covered only when it was chosen.
            if self.grpc_methods.iter().any(|m| m == parts.uri.path()) {
                return true;
            }
            return match &self.cover {
                Cover::When(f) => f(parts),
                Cover::Methods(_) => false,
            };
        }
        match &self.cover {
            Cover::Methods(methods) => methods.contains(&parts.method),
            Cover::When(f) => f(parts),
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

    pub(crate) fn fingerprint_of(&self, parts: &Parts, body: &Bytes) -> Fingerprint {
        match &self.fingerprint {
            Some(f) => f(parts, body),
            None => Fingerprint::of_request(parts, body),
        }
    }
}
