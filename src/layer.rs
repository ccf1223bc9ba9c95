//! [`IdempotencyLayer`] and its configuration.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, Method, StatusCode};
use tower_layer::Layer;

use crate::fingerprint::Fingerprint;
use crate::key::{KeyParsing, Scope};
use crate::policy::{Disconnect, InFlight, MissingKey, StoreFailure};
use crate::runtime::Runtime;
use crate::service::Idempotency;
use crate::settings::{Cover, Settings};
use crate::store::{IdempotencyStore, clamp_duration};
use crate::tasks::DetachedWork;

/// Makes non-idempotent requests safe to retry with an `Idempotency-Key`.
///
/// The first request with a key runs and its response is stored; a retry with the same key
/// and payload gets the stored response with `Idempotent-Replayed: true`; a concurrent
/// duplicate gets `409` (or waits); the same key with another payload gets `422`. See the
/// [crate documentation](crate) for the whole flow.
///
/// The layer only holds configuration; every setter takes and returns it by value and
/// documents its default.
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let app: Router = Router::new()
///     .route("/orders", post(|| async { "created" }))
///     .layer(IdempotencyLayer::new(MemoryStore::new()));
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    /// One allocation, so that cloning the layer is one reference count (axum clones a
    /// router's layers on every request of a router that was not given its state).
    parts: Arc<LayerParts>,
}

/// What a layer holds.
#[derive(Clone)]
struct LayerParts {
    settings: Settings,
    store: Arc<dyn IdempotencyStore>,
    /// The same store when it is the embedded [`MemoryStore`](crate::MemoryStore).
    #[cfg(feature = "memory")]
    memory: Option<crate::MemoryStore>,
    work: DetachedWork,
    /// The running parts, made by the first service and shared by the services of this
    /// layer and its clones; a changed setting starts a new one.
    runtime: OnceLock<Arc<Runtime>>,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.parts.settings;
        f.debug_struct("IdempotencyLayer")
            .field("header", &c.header)
            .field("parsing", &c.parsing)
            .field("max_key_len", &c.max_key_len)
            .field("missing", &c.missing)
            .field("max_request_body", &c.max_request_body)
            .field("max_response_body", &c.max_response_body)
            .field("lease", &c.lease)
            .field("ttl", &c.ttl)
            .field("in_flight", &c.in_flight)
            .field("store_failure", &c.store_failure)
            .field("retry_after", &c.retry_after)
            .field("disconnect", &c.disconnect)
            .field("store_timeout", &c.store_timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
impl Default for IdempotencyLayer {
    /// A layer on a fresh [`MemoryStore`](crate::MemoryStore) with every default.
    fn default() -> Self {
        Self::new(crate::MemoryStore::new())
    }
}

impl IdempotencyLayer {
    /// A layer on `store` with every default.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new());
    /// // A shared trait object works too.
    /// let shared: Arc<dyn IdempotencyStore> = Arc::new(MemoryStore::new());
    /// let layer = IdempotencyLayer::new(shared);
    /// ```
    pub fn new(store: impl IdempotencyStore) -> Self {
        // The embedded store is called directly, without a boxed future per call.
        #[cfg(feature = "memory")]
        let memory = store.as_memory_store().cloned();
        Self {
            parts: Arc::new(LayerParts {
                settings: Settings::default(),
                store: Arc::new(store),
                #[cfg(feature = "memory")]
                memory,
                work: DetachedWork::default(),
                runtime: OnceLock::new(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        let parts = Arc::make_mut(&mut self.parts);
        f(&mut parts.settings);
        // The services of the changed layer get running parts of their own: a lease keeper
        // for its lease, answers rendered with its problem type base.
        parts.runtime = OnceLock::new();
        self
    }

    /// Seals every record at rest with `ring` (feature `encryption`): the layer's store is
    /// wrapped in [`Sealed`](crate::store::sealed::Sealed), which refuses plaintext records
    /// (see there for the cipher, rotation and what a fleet mid-rollout does). Call it
    /// after choosing the store; the embedded memory store is then called through the
    /// wrapper.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyLayer;
    /// use tower_idempotency::store::sealed::Keyring;
    ///
    /// let ring = Keyring::new("2026-12", [7u8; 32]).unwrap();
    /// let layer = IdempotencyLayer::default().encrypt_records(ring);
    /// ```
    #[cfg(feature = "encryption")]
    #[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
    pub fn encrypt_records(mut self, ring: crate::store::sealed::Keyring) -> Self {
        let parts = Arc::make_mut(&mut self.parts);
        let inner = Arc::clone(&parts.store);
        parts.store = Arc::new(crate::store::sealed::Sealed::new(inner, ring));
        #[cfg(feature = "memory")]
        {
            parts.memory = None;
        }
        parts.runtime = OnceLock::new();
        self
    }

    /// The request header that carries the key. Default: `Idempotency-Key`.
    ///
    /// ```
    /// use http::HeaderName;
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .header_name(HeaderName::from_static("x-request-key"));
    /// ```
    pub fn header_name(self, name: HeaderName) -> Self {
        self.edit(|c| c.header = name)
    }

    /// How the key header is parsed. Default: [`KeyParsing::Lenient`] (an sf-string or a
    /// bare value).
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, KeyParsing};
    /// let layer = IdempotencyLayer::default().key_parsing(KeyParsing::Strict);
    /// ```
    pub fn key_parsing(self, parsing: KeyParsing) -> Self {
        self.edit(|c| c.parsing = parsing)
    }

    /// The longest key accepted, in characters. Default: 255.
    ///
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::default().max_key_len(64);
    /// ```
    pub fn max_key_len(self, max: usize) -> Self {
        self.edit(|c| c.max_key_len = max)
    }

    /// Reads each covered request's key from its JSON body, at `pointer` (RFC 6901: a
    /// webhook's event id at `/id`, a JSON-RPC call's `/params/_meta/idempotencyKey`),
    /// instead of from a header (feature `json`). The body is buffered once, within
    /// [`max_request_body`](Self::max_request_body), for the key and the fingerprint.
    ///
    /// The value must be a string (any text of at most
    /// [`max_key_len`](Self::max_key_len) characters without control characters): a
    /// number, an object, a body that is not JSON, or an empty string is a `400
    /// invalid-key` problem; no value there (or `null`) is `400 missing-key`, or, with
    /// [`MissingKey::Optional`], the request runs unprotected. Nothing runs in the `400`
    /// cases. [`MissingKey::Generate`] has no meaning here and counts as required. A
    /// pointer given without its leading `/` (`"id"`) is read as if it had one (`"/id"`).
    ///
    /// ```
    /// let webhooks = tower_idempotency::IdempotencyLayer::default()
    ///     .share_keys_across_callers()
    ///     .key_from_json("/id");
    /// ```
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub fn key_from_json(self, pointer: impl Into<String>) -> Self {
        let mut pointer = pointer.into();
        if !pointer.is_empty() && !pointer.starts_with('/') {
            // Not an RFC 6901 pointer, which would find nothing in any body, and leave
            // every request without a key: "id" can only mean "/id".
            pointer.insert(0, '/');
        }
        let pointer: Arc<str> = pointer.into();
        self.edit(|c| c.key_pointer = Some(pointer))
    }

    /// What to do with a covered request without a key. Default: [`MissingKey::Required`].
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, policy::MissingKey};
    /// let layer = IdempotencyLayer::default().missing_key(MissingKey::Generate);
    /// ```
    pub fn missing_key(self, policy: MissingKey) -> Self {
        self.edit(|c| c.missing = policy)
    }

    /// The HTTP methods covered by the layer; requests with other methods pass through
    /// untouched. Default: `POST` and `PATCH`. gRPC calls (all `POST`) are not covered by
    /// this list: choose them with [`grpc_methods`](Self::grpc_methods).
    ///
    /// ```
    /// use http::Method;
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .methods([Method::POST, Method::PATCH, Method::DELETE]);
    /// ```
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.edit(|c| c.cover = Cover::Methods(methods))
    }

    /// Covers the requests for which `f` returns true, instead of a method list, gRPC calls
    /// included (a streaming call must not be covered: its body is buffered). Default:
    /// `POST` and `PATCH` requests are covered.
    ///
    /// ```
    /// use http::Method;
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .cover_when(|req| req.method == Method::POST && req.uri.path().starts_with("/payments"));
    /// ```
    pub fn cover_when(self, f: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        self.edit(|c| c.cover = Cover::When(Arc::new(f)))
    }

    /// The gRPC methods covered, by full path (`/package.Service/Method`, as tonic's
    /// generated `SERVICE_NAME` and method names make it); every other gRPC call passes
    /// through untouched. Default: none, so that reads and streaming calls, which must not
    /// be buffered, are never covered by accident. List unary methods that change state. A
    /// path given without its leading `/` gets one.
    ///
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .grpc_methods(["/orders.Orders/CreateOrder", "/orders.Orders/CancelOrder"]);
    /// ```
    pub fn grpc_methods(self, paths: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let paths: Arc<[String]> = paths
            .into_iter()
            .map(|path| {
                let mut path: String = path.into();
                // `package.Service/Method`, as `SERVICE_NAME` and a method name make it
                // joined by hand: a request's path always starts with `/`.
                if !path.starts_with('/') {
                    path.insert(0, '/');
                }
                path
            })
            .collect();
        self.edit(|c| c.grpc_methods = paths)
    }

    /// Derives the caller's scope from the request with `f`, so that one caller is never
    /// served another's response; `None` means "this caller cannot be identified", and the
    /// request is refused with `403 caller-unknown` (gRPC `PERMISSION_DENIED`), nothing run.
    ///
    /// **There is no default:** until one of `scope_by`,
    /// [`scope_by_principal`](Self::scope_by_principal),
    /// [`scope_by_credential`](Self::scope_by_credential) or
    /// [`share_keys_across_callers`](Self::share_keys_across_callers) is chosen, every covered
    /// request is refused (and an `error` is logged once), because any guess (a shared scope,
    /// a header) would serve one caller's answer to another in some deployment.
    ///
    /// Scope by who the caller *is* (a user or tenant id from your authentication), not by
    /// the credential they present: a client refreshes its token exactly when it retries
    /// after a timeout.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, Scope};
    ///
    /// #[derive(Clone)]
    /// struct TenantId(String);
    ///
    /// let layer = IdempotencyLayer::default().scope_by(|req| {
    ///     req.extensions.get::<TenantId>().map(|t| Scope::of(t.0.as_bytes()))
    /// });
    /// ```
    pub fn scope_by(self, f: impl Fn(&Parts) -> Option<Scope> + Send + Sync + 'static) -> Self {
        self.edit(|c| c.scope = crate::settings::ScopeRule::By(Arc::new(f)))
    }

    /// Scopes keys by the authenticated principal that an authentication layer (placed
    /// outside this one) put in the request extensions: any `T` that displays as a stable
    /// id, such as a user or tenant id. A request without a `T` is refused with
    /// `403 caller-unknown`. The recommended way to scope keys.
    ///
    /// ```
    /// use std::fmt;
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// /// Put in the extensions by the service's auth middleware.
    /// #[derive(Clone)]
    /// struct UserId(u64);
    ///
    /// impl fmt::Display for UserId {
    ///     fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    ///         write!(f, "user:{}", self.0)
    ///     }
    /// }
    ///
    /// let layer = IdempotencyLayer::default().scope_by_principal::<UserId>();
    /// ```
    pub fn scope_by_principal<T>(self) -> Self
    where
        T: std::fmt::Display + Send + Sync + 'static,
    {
        self.scope_by(|req| req.extensions.get::<T>().map(Scope::of_principal))
    }

    /// Scopes keys by a credential header (such as `Authorization` or `X-Api-Key`), as an
    /// HMAC-SHA-256 keyed with `secret`, so that the scope stored in Redis or PostgreSQL (and
    /// its key prefix) cannot be turned back into the credential. `secret` must be the same
    /// on every instance that shares the store (at least 32 random bytes). A request without
    /// the header, or with only empty or blank values of it, is refused with
    /// `403 caller-unknown`: an empty credential identifies nobody.
    ///
    /// Every field of the header counts, in order (see [`Scope::of_credential`]): a
    /// `Cookie` that an HTTP/2 client sends as one field per cookie is joined with `"; "`
    /// (RFC 9113 §8.2.3), so it has the scope of the same cookie in one HTTP/1.1 field; any
    /// other header sent in several fields is hashed field by field, each prefixed by its
    /// length. Two callers whose credentials share their first field are two callers.
    ///
    /// **A new credential is a new caller:** a client that refreshes its token (which it
    /// does exactly when it retries after a timeout) or rotates its API key loses its keys,
    /// and the retry runs the operation again. Prefer
    /// [`scope_by_principal`](Self::scope_by_principal) whenever an authentication layer
    /// can tell who the caller is; use this for long-lived credentials only (API keys).
    ///
    /// ```
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// // The fleet's secret, from your secret store (inline here for the example).
    /// let secret = b"5f0c3e8a1d9b47f2a6c4e0b8d2f1a7c3";
    /// let layer = IdempotencyLayer::default()
    ///     .scope_by_credential(http::HeaderName::from_static("x-api-key"), secret);
    /// ```
    pub fn scope_by_credential(self, header: HeaderName, secret: impl AsRef<[u8]>) -> Self {
        let secret: Arc<[u8]> = Arc::from(secret.as_ref());
        if secret.len() < 16 {
            tracing::warn!(
                bytes = secret.len(),
                "the secret of scope_by_credential is short: use at least 32 random bytes"
            );
        }
        self.scope_by(move |req| Scope::of_credential(&secret, &req.headers, &header))
    }

    /// Shares one scope between every caller: any caller who sends a key gets the answer
    /// stored under it. Right only where keys cannot collide between callers (one trusted
    /// client, or keys that are unguessable and never shown to others); an explicit choice,
    /// since otherwise a caller who learns or reuses another's key is served that caller's
    /// response.
    ///
    /// ```
    /// // A single internal client calls this service.
    /// let layer = tower_idempotency::IdempotencyLayer::default().share_keys_across_callers();
    /// ```
    pub fn share_keys_across_callers(self) -> Self {
        self.edit(|c| c.scope = crate::settings::ScopeRule::Shared)
    }

    /// Computes request fingerprints with `f`. Default: [`Fingerprint::of_request`]
    /// (method, path and query, content type, body).
    ///
    /// ```
    /// use tower_idempotency::{Fingerprint, IdempotencyLayer};
    ///
    /// // Only the body counts.
    /// let layer = IdempotencyLayer::default()
    ///     .fingerprint_with(|_req, body| Fingerprint::of_fields([body.as_ref()]));
    /// ```
    pub fn fingerprint_with(
        self,
        f: impl Fn(&Parts, &Bytes) -> Fingerprint + Send + Sync + 'static,
    ) -> Self {
        self.edit(|c| c.fingerprint = Some(Arc::new(f)))
    }

    /// The largest request body buffered for the fingerprint; a larger one gets `413` and
    /// nothing runs. Default: 1 MiB.
    ///
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::default().max_request_body(64 * 1024);
    /// ```
    pub fn max_request_body(self, bytes: usize) -> Self {
        self.edit(|c| c.max_request_body = bytes)
    }

    /// The largest response body stored for replay. A larger response still reaches the
    /// client whole, but only a tombstone is stored, and a retry gets `410`
    /// (`response-not-stored`) instead of a second run. Default: 1 MiB.
    ///
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::default().max_response_body(8 << 20);
    /// ```
    pub fn max_response_body(self, bytes: usize) -> Self {
        self.edit(|c| c.max_response_body = bytes)
    }

    /// Which HTTP statuses are stored; a response with another status releases the key so a
    /// retry runs again. Default: [`policy::default_storable`](crate::policy::default_storable) (all but 5xx, 408, 409, 425
    /// and 429).
    ///
    /// ```
    /// // Only successes are kept: a retry of a failed request runs again.
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .storable_when(|status| status.is_success());
    /// ```
    pub fn storable_when(self, f: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        self.edit(|c| c.storable = Arc::new(f))
    }

    /// A recovery hook: when a retry finds its key committed with no stored outcome (the
    /// operation declared its commit point with
    /// [`IdempotencyClaim::commit`](crate::IdempotencyClaim::commit),
    /// [`PostgresStore::commit_in`](crate::PostgresStore::commit_in) or
    /// [`MySqlStore::commit_in`](crate::MySqlStore::commit_in), then its instance
    /// crashed or it failed without an answer), the hook is asked to rebuild the answer from
    /// the application's own state, given the key and scope the operation saw
    /// ([`Unsettled`](crate::Unsettled)).
    ///
    /// The hook answers a [`Recovery`](crate::Recovery), or simply an
    /// `Option<Response<Bytes>>`:
    ///
    /// - `Ok(Some(response))` ([`Recovery::Answer`](crate::Recovery::Answer)): the answer is
    ///   stored under the key ([`IdempotencyStore::settle`]) and replayed, to this retry
    ///   and every later one (with `Idempotent-Replayed: true`; the outcome is
    ///   [`IdempotencyOutcome::Recovered`](crate::IdempotencyOutcome::Recovered)).
    /// - `Ok(None)` ([`Recovery::Unknown`](crate::Recovery::Unknown): nothing can be said
    ///   yet) or `Err`: the retry gets `500 outcome-unknown`, and the hook is asked again on
    ///   the next retry.
    /// - `Ok(Recovery::NeverRan)`: the operation provably made none of its effects (it
    ///   committed before them and crashed before making them): the commit is withdrawn,
    ///   fenced by the token that made it, and this retry runs the operation.
    ///
    /// The hook itself never runs the operation: it only reads what it left. Default: none (retries
    /// get `outcome-unknown` until an operator settles the key). One hook per layer: give a
    /// route its own layer for a hook of its own, or match on [`Unsettled::uri`](crate::Unsettled::uri).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// let layer = IdempotencyLayer::default().recover_with(|unsettled| async move {
    ///     // Look the order up by the key it was created under (here: never found).
    ///     let found: Option<String> = None;
    ///     let _ = (unsettled.scope(), unsettled.key());
    ///     Ok(found.map(|order| {
    ///         http::Response::builder()
    ///             .status(201)
    ///             .header("content-type", "application/json")
    ///             .body(Bytes::from(order))
    ///             .expect("a valid response")
    ///     }))
    /// });
    /// ```
    pub fn recover_with<F, Fut, R>(self, f: F) -> Self
    where
        F: Fn(crate::Unsettled) -> Fut + Send + Sync + 'static,
        Fut:
            std::future::Future<Output = Result<R, crate::recover::RecoveryError>> + Send + 'static,
        R: Into<crate::Recovery> + 'static,
    {
        let hook = crate::recover::boxed_recovery(f);
        self.edit(|c| c.recover = Some(hook))
    }

    /// Which HTTP statuses mean "the operation was cut off and may have run": a timeout
    /// layer *inside* this one (tower-http's `TimeoutLayer` answers `408`) drops the handler
    /// midway, after it may have written its side effect. Such an answer is not released
    /// for a retry to run again: the key keeps a tombstone, and retries get
    /// `410 response-not-stored` (the operation will not run twice). Checked before
    /// [`storable_when`](Self::storable_when). Default: [`policy::default_maybe_ran`](crate::policy::default_maybe_ran)
    /// (`408 Request Timeout`).
    ///
    /// ```
    /// use http::StatusCode;
    /// // A timeout layer configured to answer 504 instead.
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .maybe_ran_when(|status| status == StatusCode::GATEWAY_TIMEOUT);
    /// ```
    pub fn maybe_ran_when(self, f: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        self.edit(|c| c.maybe_ran = Arc::new(f))
    }

    /// Which gRPC status codes mean "the call was cut off and may have run", as
    /// [`maybe_ran_when`](Self::maybe_ran_when) does for HTTP: the key keeps a tombstone and
    /// retries get `ALREADY_EXISTS` (`response-not-stored`), never a second run. Checked
    /// before [`grpc_storable_when`](Self::grpc_storable_when). Default:
    /// [`policy::default_grpc_maybe_ran`](crate::policy::default_grpc_maybe_ran) (`DEADLINE_EXCEEDED`).
    ///
    /// ```
    /// // A service whose handlers answer DEADLINE_EXCEEDED only before doing anything.
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .grpc_maybe_ran_when(|_code| false);
    /// ```
    pub fn grpc_maybe_ran_when(self, f: impl Fn(u32) -> bool + Send + Sync + 'static) -> Self {
        self.edit(|c| c.grpc_maybe_ran = Arc::new(f))
    }

    /// Which gRPC status codes are stored (for gRPC responses, whose HTTP status is always
    /// 200). Default: [`policy::default_grpc_storable`](crate::policy::default_grpc_storable).
    ///
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .grpc_storable_when(|code| code == 0);
    /// ```
    pub fn grpc_storable_when(self, f: impl Fn(u32) -> bool + Send + Sync + 'static) -> Self {
        self.edit(|c| c.grpc_storable = Arc::new(f))
    }

    /// Which response headers are stored and replayed, besides the fields of the first
    /// answer's connection (the hop-by-hop headers and every header its `Connection` names,
    /// RFC 9110 §7.6.1), the framing headers (`Content-Length`, `Transfer-Encoding`) and
    /// `Date`, which never are: a replay's `Content-Length` is its stored body's length
    /// (none for an empty body or one with trailers, which the server frames). Default: [`policy::default_replay_header`](crate::policy::default_replay_header), every header but
    /// `Set-Cookie`, `Authentication-Info` and `Proxy-Authentication-Info`, which belong to
    /// the caller that got them first. A function set here replaces the default, so it can
    /// opt in to `Set-Cookie` (only where a replay always reaches the same caller) or keep
    /// out more.
    ///
    /// ```
    /// use tower_idempotency::policy::default_replay_header;
    ///
    /// // Keep out an internal header as well.
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .replay_headers(|name| default_replay_header(name) && name != "x-request-cost");
    /// ```
    pub fn replay_headers(self, f: impl Fn(&HeaderName) -> bool + Send + Sync + 'static) -> Self {
        self.edit(|c| c.replay_header = Some(Arc::new(f)))
    }

    /// How long a claim holds its key while the operation runs; the layer extends it while
    /// the operation goes on, so a crashed owner blocks its key for about this long.
    /// Default: 30 seconds; at least 10 milliseconds, at most
    /// [`MAX_DURATION`](crate::store::MAX_DURATION) (longer values are clamped).
    ///
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::default().lease(Duration::from_secs(10));
    /// ```
    pub fn lease(self, lease: Duration) -> Self {
        self.edit(|c| c.lease = clamp_duration(lease).max(Duration::from_millis(10)))
    }

    /// A request's own record TTL: `f` reads it from the request (its route, a header your
    /// service trusts), `None` keeps the layer's [`ttl`](Self::ttl). The answer is kept
    /// between one second and the layer's TTL, which is thus the longest any request may
    /// ask for. A [`RecordTtl`](crate::RecordTtl) in the request's extensions (put there by
    /// an outer layer) comes first. A commit point is kept as long as the record would be.
    ///
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .ttl(Duration::from_secs(30 * 24 * 3600)) // payments: a month
    ///     .ttl_by(|req| {
    ///         (!req.uri.path().starts_with("/payments")).then(|| Duration::from_secs(3600))
    ///     });
    /// ```
    pub fn ttl_by(
        self,
        f: impl Fn(&http::request::Parts) -> Option<Duration> + Send + Sync + 'static,
    ) -> Self {
        self.edit(|c| c.ttl_by = Some(Arc::new(f)))
    }

    /// A request's own lease: `f` reads it from the request (its route, say), `None` keeps
    /// the layer's [`lease`](Self::lease). It is never shorter than the layer's lease (whose
    /// third is how often the lease keeper renews), so give the layer the shortest lease
    /// any route needs. A [`ClaimLease`](crate::ClaimLease) in the request's extensions
    /// comes first.
    ///
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .lease(Duration::from_secs(10))
    ///     .lease_by(|req| {
    ///         // Reports run long on a busy pool: a pause of a minute is no crash.
    ///         req.uri.path().starts_with("/reports").then(|| Duration::from_secs(120))
    ///     });
    /// ```
    pub fn lease_by(
        self,
        f: impl Fn(&http::request::Parts) -> Option<Duration> + Send + Sync + 'static,
    ) -> Self {
        self.edit(|c| c.lease_by = Some(Arc::new(f)))
    }

    /// Answers retries of records this instance stored or replayed from its own memory,
    /// for up to `max_age` after it got each, without a store round trip; `max_bytes`
    /// bounds what is kept (the oldest go first). Default: off. Needs the `memory` feature
    /// (on by default); ignored on the embedded [`MemoryStore`](crate::MemoryStore), whose
    /// records are in memory already (but for one whose records are sealed with
    /// [`encrypt_records`](Self::encrypt_records): there a copy spares opening the record,
    /// and a purge is seen as late as on any store).
    ///
    /// A completed record does not change in the store, so a copy is the answer the store
    /// would give, checked the same way (the whole store key, so never another caller's;
    /// the fingerprint, so another payload is still `422`). What it changes: **a record
    /// deleted from the store** (by an operator, with the `keys` tool) **or expired there
    /// is still replayed by an instance that holds a copy, for up to `max_age`**; a copy
    /// never outlives the TTL it was stored with, and retries answered from a copy are
    /// answered during a store outage too. Tombstones and records that are not a plain
    /// answer are never cached. Worth it where retries come in bursts (clients retrying
    /// hard after a timeout) on a store across the network: each replay then costs what a
    /// replay costs on the memory store.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// # async fn run(store: std::sync::Arc<dyn tower_idempotency::IdempotencyStore>) {
    /// // `store`: a store across the network (Redis, PostgreSQL, MySQL). Keep up to 32 MiB
    /// // of answers, each for 10 s after it was stored or first replayed.
    /// let layer = tower_idempotency::IdempotencyLayer::new(store)
    ///     .cache_replays(32 << 20, Duration::from_secs(10));
    /// # }
    /// ```
    #[cfg(feature = "memory")]
    #[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
    pub fn cache_replays(self, max_bytes: usize, max_age: Duration) -> Self {
        self.edit(|c| c.replay_cache = Some((max_bytes, max_age)))
    }

    /// Tells clients how long their key is kept: a storable answer (the first one and every
    /// replay) carries `Idempotency-Expires`, an HTTP-date until which the key is kept at
    /// least (the request's TTL from when its answer began). Default: off.
    ///
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::default().announce_expiry(true);
    /// ```
    pub fn announce_expiry(self, on: bool) -> Self {
        self.edit(|c| c.announce_expiry = on)
    }

    /// How long a completed record is kept for replay. Default: 24 hours; at least
    /// 1 millisecond, at most [`MAX_DURATION`](crate::store::MAX_DURATION) (longer values are
    /// clamped).
    ///
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .ttl(Duration::from_secs(7 * 24 * 3600));
    /// ```
    pub fn ttl(self, ttl: Duration) -> Self {
        self.edit(|c| c.ttl = clamp_duration(ttl).max(Duration::from_millis(1)))
    }

    /// What a request gets while another with its key runs. Default: [`InFlight::Reject`]
    /// (`409` with `Retry-After`). The wait of [`InFlight::Wait`] is clamped to
    /// [`MAX_DURATION`](crate::store::MAX_DURATION).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyLayer, policy::InFlight};
    /// let layer = IdempotencyLayer::default().on_in_flight(InFlight::Wait(Duration::from_secs(10)));
    /// ```
    pub fn on_in_flight(self, policy: InFlight) -> Self {
        let policy = match policy {
            InFlight::Wait(wait) => InFlight::Wait(clamp_duration(wait)),
            other => other,
        };
        self.edit(|c| c.in_flight = policy)
    }

    /// What a request gets when the store fails. Default: [`StoreFailure::FailClosed`]
    /// (`503` with `Retry-After`).
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, policy::StoreFailure};
    /// let layer = IdempotencyLayer::default().on_store_failure(StoreFailure::FailOpen);
    /// ```
    pub fn on_store_failure(self, policy: StoreFailure) -> Self {
        self.edit(|c| c.store_failure = policy)
    }

    /// What happens to an operation whose client goes away. Default: [`Disconnect::Finish`].
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, policy::Disconnect};
    /// let layer = IdempotencyLayer::default().on_disconnect(Disconnect::Release);
    /// ```
    pub fn on_disconnect(self, policy: Disconnect) -> Self {
        self.edit(|c| c.disconnect = policy)
    }

    /// The `Retry-After` sent with `409` and `503` answers. Default: 1 second (for `409`,
    /// never more than the lease still runs); at most [`MAX_DURATION`](crate::store::MAX_DURATION)
    /// (longer values are clamped). The header carries whole seconds, rounded up, at least 1.
    ///
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .retry_after(Duration::from_secs(5));
    /// ```
    pub fn retry_after(self, after: Duration) -> Self {
        self.edit(|c| c.retry_after = clamp_duration(after))
    }

    /// The longest the layer waits for any one store call (claim, complete, release,
    /// extend, and each step of waiting for a duplicate). A call that overruns counts as a
    /// store failure: the request gets `503` with `Retry-After` (or, with
    /// [`StoreFailure::FailOpen`], runs unprotected), and a claim that may have landed is
    /// released by its token. Default: 2 seconds; at least 1 millisecond, at most
    /// [`MAX_DURATION`](crate::store::MAX_DURATION).
    ///
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .store_timeout(Duration::from_millis(500));
    /// ```
    pub fn store_timeout(self, timeout: Duration) -> Self {
        self.edit(|c| c.store_timeout = clamp_duration(timeout).max(Duration::from_millis(1)))
    }

    /// The handle on the work this layer finishes after a response future is gone, to wait
    /// for it at shutdown. See [`DetachedWork`].
    ///
    /// ```
    /// use std::time::Duration;
    /// # async fn run() {
    /// let layer = tower_idempotency::IdempotencyLayer::default();
    /// let work = layer.detached_work();
    /// // … serve with `layer` until a shutdown signal, then:
    /// work.shutdown(Duration::from_secs(10)).await.ok();
    /// # }
    /// ```
    pub fn detached_work(&self) -> DetachedWork {
        self.parts.work.clone()
    }

    /// The base of the problem `type` URIs, for example your API's error documentation;
    /// setting it also adds a `Link: <…>; rel="describedby"` header to every problem.
    /// Default: this crate's [`problem`](crate::problem) documentation, without `Link`.
    /// Under the [Stripe profile](Self::problem_profile) the same URI is the `doc_url`; the
    /// Agentic Commerce profile has no field for it and gets only the `Link` header.
    ///
    /// ```
    /// // Problems then have "type": "https://api.example.com/errors/key-reused", ...
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .problem_type_base("https://api.example.com/errors/");
    /// ```
    pub fn problem_type_base(self, base: impl Into<String>) -> Self {
        let base = base.into();
        self.edit(|c| {
            c.type_base = base;
            c.link = true;
        })
    }

    /// The shape of the answers this layer gives on its own over HTTP (its `400`, `409`,
    /// `422`, `503`… bodies, statuses and content type): RFC 9457 problem details,
    /// Stripe's error object, or the Agentic Commerce Protocol's error. gRPC requests get a
    /// gRPC status whatever the profile, and `Retry-After` stays on every `409` and `503`.
    /// The [`problem`](crate::problem#profiles) module lists what each profile answers.
    /// Default: [`Profile::Rfc9457`](crate::problem::Profile::Rfc9457).
    ///
    /// Only HTTP answers have a profile: the [`function`](crate::function) and consumer
    /// entry points return errors, not bodies, and are not affected.
    ///
    /// ```
    /// use tower_idempotency::problem::Profile;
    ///
    /// // A reused key is then `409 {"type": "invalid_request", "code": "idempotency_in_flight", ...}`
    /// // while the first request runs, and `422 ... "idempotency_conflict"` with another payload.
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .problem_profile(Profile::AgenticCommerce);
    /// ```
    pub fn problem_profile(self, profile: crate::problem::Profile) -> Self {
        self.edit(|c| c.problem_profile = profile)
    }
}

impl IdempotencyLayer {
    /// The layer's settings, as its builder left them.
    #[cfg_attr(not(feature = "openapi"), allow(dead_code))]
    pub(crate) fn settings(&self) -> &crate::settings::Settings {
        &self.parts.settings
    }

    /// The running parts of this layer's services, made once.
    pub(crate) fn runtime(&self) -> Arc<Runtime> {
        let parts = &*self.parts;
        let runtime = parts.runtime.get_or_init(|| {
            // The embedded store makes a record's replay headers when it hands the record
            // out for a replay, and counts them (the store knows no HTTP answers).
            #[cfg(feature = "memory")]
            if let Some(memory) = &parts.memory {
                memory.make_replay_headers_with(crate::answer::replay_map);
            }
            Arc::new(Runtime::new(
                parts.settings.clone(),
                Arc::clone(&parts.store),
                #[cfg(feature = "memory")]
                parts.memory.clone(),
                parts.work.clone(),
            ))
        });
        Arc::clone(runtime)
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::with_config(inner, self.runtime())
    }
}
