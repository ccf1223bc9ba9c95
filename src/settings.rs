//! What the layer is set up with: a plain value, cloned with the layer, that says how each
//! request is treated. The running parts it needs (the store, the lease keeper, detached
//! work, caches) are in [`Runtime`](crate::runtime::Runtime).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, Method, StatusCode};

use crate::fingerprint::Fingerprint;
use crate::key::{KeyParsing, Scope};
use crate::policy::{self, Disconnect, InFlight, MissingKey, StoreFailure};
use crate::problem::DEFAULT_TYPE_BASE;

pub(crate) type CoverFn = dyn Fn(&Parts) -> bool + Send + Sync;
pub(crate) type ScopeFn = dyn Fn(&Parts) -> Option<Scope> + Send + Sync;
pub(crate) type FingerprintFn = dyn Fn(&Parts, &Bytes) -> Fingerprint + Send + Sync;
pub(crate) type StatusFn = dyn Fn(StatusCode) -> bool + Send + Sync;
pub(crate) type GrpcFn = dyn Fn(u32) -> bool + Send + Sync;
pub(crate) type HeaderFn = dyn Fn(&HeaderName) -> bool + Send + Sync;
pub(crate) type TtlFn = dyn Fn(&Parts) -> Option<Duration> + Send + Sync;
pub(crate) type LeaseFn = dyn Fn(&Parts) -> Option<Duration> + Send + Sync;

#[derive(Clone)]
pub(crate) enum Cover {
    /// HTTP requests with these methods; gRPC calls only when listed in `grpc_methods`.
    Methods(MethodSet),
    /// Whatever the user's function says, gRPC calls included.
    When(Arc<CoverFn>),
}

/// A set of HTTP methods: the standard ones as bits (told apart with one table lookup,
/// on every request the layer sees), the extension ones in a list.
#[derive(Clone, Debug, Default)]
pub(crate) struct MethodSet {
    standard: u16,
    extensions: Vec<Method>,
}

impl MethodSet {
    /// The bit of a standard method, 0 for an extension method.
    fn bit(method: &Method) -> u16 {
        match *method {
            Method::OPTIONS => 1,
            Method::GET => 1 << 1,
            Method::POST => 1 << 2,
            Method::PUT => 1 << 3,
            Method::DELETE => 1 << 4,
            Method::HEAD => 1 << 5,
            Method::TRACE => 1 << 6,
            Method::CONNECT => 1 << 7,
            Method::PATCH => 1 << 8,
            _ => 0,
        }
    }

    pub(crate) fn contains(&self, method: &Method) -> bool {
        match Self::bit(method) {
            0 => self.extensions.contains(method),
            bit => self.standard & bit != 0,
        }
    }
}

impl FromIterator<Method> for MethodSet {
    fn from_iter<I: IntoIterator<Item = Method>>(methods: I) -> Self {
        let mut set = Self::default();
        for method in methods {
            match Self::bit(&method) {
                0 if !set.extensions.contains(&method) => set.extensions.push(method),
                0 => {}
                bit => set.standard |= bit,
            }
        }
        set
    }
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

/// Every setting of [`IdempotencyLayer`](crate::IdempotencyLayer), each documented on its
/// setter there.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) header: HeaderName,
    pub(crate) parsing: KeyParsing,
    pub(crate) max_key_len: usize,
    /// A request's own record TTL, if it asks for one (bounded by `ttl`).
    pub(crate) ttl_by: Option<Arc<TtlFn>>,
    /// A request's own lease, if it asks for one (at least `lease`).
    pub(crate) lease_by: Option<Arc<LeaseFn>>,
    /// Whether storable answers carry `Idempotency-Expires`.
    pub(crate) announce_expiry: bool,
    /// `cache_replays`: the cache's bytes and the age of its copies.
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(crate) replay_cache: Option<(usize, Duration)>,
    /// Where in a JSON body the key is, instead of a header.
    pub(crate) key_pointer: Option<Arc<str>>,
    pub(crate) missing: MissingKey,
    pub(crate) cover: Cover,
    /// The gRPC methods covered (full paths, `/package.Service/Method`).
    pub(crate) grpc_methods: Arc<[String]>,
    pub(crate) scope: ScopeRule,
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
    pub(crate) problem_profile: crate::problem::Profile,
    pub(crate) recover: Option<Arc<crate::recover::RecoverFn>>,
    pub(crate) store_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            header: HeaderName::from_static("idempotency-key"),
            parsing: KeyParsing::Lenient,
            max_key_len: 255,
            key_pointer: None,
            ttl_by: None,
            lease_by: None,
            announce_expiry: false,
            replay_cache: None,
            missing: MissingKey::Required,
            cover: Cover::Methods([Method::POST, Method::PATCH].into_iter().collect()),
            grpc_methods: Arc::from([]),
            scope: ScopeRule::Unset,
            fingerprint: None,
            max_request_body: 1024 * 1024,
            max_response_body: 1024 * 1024,
            storable: Arc::new(policy::default_storable),
            grpc_storable: Arc::new(policy::default_grpc_storable),
            maybe_ran: Arc::new(policy::default_maybe_ran),
            grpc_maybe_ran: Arc::new(policy::default_grpc_maybe_ran),
            replay_header: None,
            lease: Duration::from_secs(30),
            ttl: Duration::from_secs(24 * 60 * 60),
            in_flight: InFlight::Reject,
            store_failure: StoreFailure::FailClosed,
            disconnect: Disconnect::Finish,
            retry_after: Duration::from_secs(1),
            type_base: DEFAULT_TYPE_BASE.to_owned(),
            link: false,
            problem_profile: crate::problem::Profile::Rfc9457,
            recover: None,
            store_timeout: Duration::from_secs(2),
        }
    }
}

impl Settings {
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
        // A listed method is covered whatever its path looks like.
        let grpc_type = crate::problem::is_grpc(headers);
        if grpc_type && self.grpc_methods.iter().any(|m| m == uri.path()) {
            return (Some(true), Some(true));
        }
        let grpc = grpc_type && crate::problem::grpc_shaped(uri.path());
        match &self.cover {
            Cover::Methods(_) => (Some(!grpc && by_method), Some(grpc)),
            Cover::When(_) => (None, Some(grpc)),
        }
    }

    pub(crate) fn covers(&self, parts: &Parts) -> bool {
        let grpc_type = crate::problem::is_grpc(&parts.headers);
        if grpc_type && self.grpc_methods.iter().any(|m| m == parts.uri.path()) {
            return true;
        }
        if grpc_type && crate::problem::grpc_shaped(parts.uri.path()) {
            // Every gRPC call is a POST, and a streaming one cannot be buffered and replayed:
            // a gRPC method is covered only when it was chosen.
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

    /// How long this request's record is kept: what it asks for (a [`RecordTtl`] an outer
    /// layer put in its extensions, or `ttl_by`), between one second and the layer's TTL;
    /// otherwise the layer's TTL.
    pub(crate) fn ttl_of(&self, parts: &Parts) -> Duration {
        let asked = parts
            .extensions
            .get::<crate::policy::RecordTtl>()
            .map(|t| t.0)
            .or_else(|| self.ttl_by.as_ref().and_then(|f| f(parts)));
        match asked {
            Some(ttl) => ttl.clamp(crate::policy::MIN_RECORD_TTL.min(self.ttl), self.ttl),
            None => self.ttl,
        }
    }

    /// How long this request's claim is leased: what it asks for (a [`ClaimLease`] an outer
    /// layer put in its extensions, or `lease_by`), at least the layer's lease (whose third
    /// is the period of the lease keeper) and at most `MAX_DURATION`; otherwise the layer's
    /// lease.
    ///
    /// [`ClaimLease`]: crate::policy::ClaimLease
    pub(crate) fn lease_of(&self, parts: &Parts) -> Duration {
        let asked = parts
            .extensions
            .get::<crate::policy::ClaimLease>()
            .map(|l| l.0)
            .or_else(|| self.lease_by.as_ref().and_then(|f| f(parts)));
        match asked {
            Some(lease) => crate::time::clamp_duration(lease).max(self.lease),
            None => self.lease,
        }
    }

    pub(crate) fn fingerprint_of(&self, parts: &Parts, body: &Bytes) -> Fingerprint {
        match &self.fingerprint {
            Some(f) => f(parts, body),
            None => Fingerprint::of_request(parts, body),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::MethodSet;

    const STANDARD: [Method; 9] = [
        Method::OPTIONS,
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::TRACE,
        Method::CONNECT,
        Method::PATCH,
    ];

    /// Each standard method is told apart from every other, alone and in any pair.
    #[test]
    fn a_method_set_holds_exactly_the_methods_it_was_given() {
        for a in &STANDARD {
            for b in &STANDARD {
                let set: MethodSet = [a.clone(), b.clone()].into_iter().collect();
                for m in &STANDARD {
                    assert_eq!(set.contains(m), m == a || m == b, "{m} in {{{a}, {b}}}");
                }
            }
        }
        let none: MethodSet = std::iter::empty().collect();
        assert!(STANDARD.iter().all(|m| !none.contains(m)));
    }

    /// Extension methods (any token, case-sensitive) are held beside the standard ones;
    /// one that looks like a standard method in another case is not that method.
    #[test]
    fn extension_methods_are_matched_by_their_exact_name() {
        let purge = Method::from_bytes(b"PURGE").unwrap();
        let long = Method::from_bytes(b"A-VERY-LONG-EXTENSION-METHOD-NAME").unwrap();
        let lower_post = Method::from_bytes(b"post").unwrap();
        let set: MethodSet = [purge.clone(), long.clone(), purge.clone(), Method::PUT]
            .into_iter()
            .collect();
        assert!(set.contains(&purge));
        assert!(set.contains(&long));
        assert!(set.contains(&Method::PUT));
        assert!(!set.contains(&Method::POST));
        assert!(!set.contains(&lower_post));
        assert!(!set.contains(&Method::from_bytes(b"PURGEX").unwrap()));
        let only_lower: MethodSet = [lower_post.clone()].into_iter().collect();
        assert!(only_lower.contains(&lower_post));
        assert!(!only_lower.contains(&Method::POST));
    }
}
