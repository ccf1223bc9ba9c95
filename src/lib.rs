//! Tower middleware that makes non-idempotent HTTP and gRPC operations safe to retry.
//!
//! A client that timed out cannot know whether its payment went through. It resends the
//! request with the same `Idempotency-Key` header, and [`IdempotencyLayer`] makes sure the
//! operation runs once and every retry gets the same answer, as the IETF draft
//! *The Idempotency-Key HTTP Header Field* describes.
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! /// Who the caller is: put in the request extensions by the service's auth middleware.
//! #[derive(Clone)]
//! struct UserId(String);
//!
//! impl std::fmt::Display for UserId {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         f.write_str(&self.0)
//!     }
//! }
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(|body: String| async move { format!("charged {body}") }))
//!     .layer(
//!         IdempotencyLayer::new(MemoryStore::new())
//!             .scope_by_principal::<UserId>()
//!             // On axum: answer in axum's own body type (no extra box per response).
//!             .for_axum(),
//!     );
//! ```
//!
//! # What a request goes through
//!
//! 1. **Cover.** By default `POST` and `PATCH` requests are covered
//!    ([`IdempotencyLayer::methods`], [`IdempotencyLayer::cover_when`]), and gRPC calls only
//!    when their method is listed ([`IdempotencyLayer::grpc_methods`]); others pass through
//!    untouched.
//! 2. **Key.** The `Idempotency-Key` header is parsed as an RFC 9651 sf-string or, by
//!    default, a bare value ([`KeyParsing`]). A missing key is refused with `400`, passed
//!    through, or replaced by a fresh UUID ([`MissingKey`]). The key is
//!    put in the request's extensions as an [`IdempotencyKey`].
//! 3. **Scope.** The key is stored within the caller's [`Scope`], as the layer was told to
//!    find it: the authenticated principal ([`IdempotencyLayer::scope_by_principal`], the
//!    recommended way), a function of yours ([`IdempotencyLayer::scope_by`]), a keyed hash
//!    of a credential ([`IdempotencyLayer::scope_by_credential`]), or one scope for all
//!    ([`IdempotencyLayer::share_keys_across_callers`]). There is no default: a caller the
//!    layer cannot identify is refused with `403 caller-unknown`.
//! 4. **Fingerprint.** The body is buffered (up to 1 MiB by default; over that, `413`) and
//!    hashed with the method, path and content type into a [`Fingerprint`]. The service
//!    behind receives the same bytes in the same body type ([`RebuildBody`]).
//! 5. **Claim.** One store call answers: the key is free (run), in flight (`409` with
//!    `Retry-After`, or wait: [`InFlight`]), or completed (replay). A
//!    different fingerprint under the same key is `422`.
//! 6. **Run.** The operation runs in the response future; if the client disconnects and the
//!    future is dropped, the operation moves to a tracked task of its own, finishes and is
//!    stored ([`Disconnect`], [`DetachedWork`]). A heartbeat extends the
//!    lease while it runs (a failed one is retried at once); an error or a panic releases
//!    the key.
//! 7. **Record.** The response streams to the client while a copy is kept; at the end of
//!    the body, a storable outcome is completed (by default all but 5xx, 408, 409, 425, 429),
//!    others release the key. The end itself (the last frame, or a frameless response as a
//!    whole) leaves only once that is done, so a client that has the whole answer and retries
//!    at once gets the replay. A body over the response limit leaves a tombstone.
//! 8. **Replay.** Status, headers, body and trailers come back byte for byte, with
//!    `Idempotent-Replayed: true`. The connection's own headers (hop-by-hop, and any that
//!    `Connection` names), the framing (`Content-Length`, `Transfer-Encoding`: a replay is
//!    framed by its body) and `Date` are not stored, nor, unless
//!    [`IdempotencyLayer::replay_headers`] opts in, `Set-Cookie` and the other per-caller
//!    headers.
//!
//! Every store call is bounded ([`IdempotencyLayer::store_timeout`], 2 s by default). Store
//! failures fail closed with `503` by default ([`StoreFailure`]), and a
//! claim whose answer never came is released by the token the layer sent with it.
//! Every answer of the layer's own is an RFC 9457 problem, or a gRPC status for gRPC
//! requests: see [`problem`]. Every covered response carries an [`IdempotencyOutcome`] in
//! its extensions, and every covered request is traced in an `idempotency` span.
//!
//! # Layer order
//!
//! Next to tower-http's layers, outermost first: trace, CORS, compression, timeout,
//! authentication, body limit, then this layer, then the handler.
//!
//! ```
//! use std::time::Duration;
//!
//! use axum::{Router, extract::Request, middleware::Next, response::Response};
//! use axum::routing::post;
//! use http::StatusCode;
//! use tower::ServiceBuilder;
//! use tower_http::{
//!     compression::CompressionLayer, cors::CorsLayer, limit::RequestBodyLimitLayer,
//!     timeout::TimeoutLayer, trace::TraceLayer,
//! };
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! #[derive(Clone)]
//! struct UserId(String);
//!
//! impl std::fmt::Display for UserId {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         f.write_str(&self.0)
//!     }
//! }
//!
//! /// The service's authentication: puts the caller's id in the extensions.
//! async fn authenticate(mut req: Request, next: Next) -> Response {
//!     req.extensions_mut().insert(UserId("alice".into()));
//!     next.run(req).await
//! }
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(|body: String| async move { format!("charged {body}") }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(TraceLayer::new_for_http())
//!             .layer(CorsLayer::permissive())
//!             // Outside: records hold plain bodies, compressed as each retry asks.
//!             .layer(CompressionLayer::new())
//!             // Outside: a cut-off client gets 408, the operation finishes and is stored.
//!             .layer(TimeoutLayer::with_status_code(
//!                 StatusCode::REQUEST_TIMEOUT,
//!                 Duration::from_secs(10),
//!             ))
//!             .layer(axum::middleware::from_fn(authenticate))
//!             // A body over the limit is 413, declared or streamed.
//!             .layer(RequestBodyLimitLayer::new(64 * 1024))
//!             .layer(IdempotencyLayer::new(MemoryStore::new()).scope_by_principal::<UserId>()),
//!     );
//! ```
//!
//! A timeout *inside* this layer drops the handler midway, after its side effect may have
//! happened: its `408` is taken to mean "it may have run"
//! ([`IdempotencyLayer::maybe_ran_when`]), so the key is kept and retries get
//! `410 response-not-stored` rather than a second run.
//!
//! # Stores
//!
//! [`IdempotencyStore`] is one small async trait (claim, complete, release, extend, wait),
//! object safe, with four backends:
//!
//! - [`MemoryStore`] (feature `memory`, on by default): one instance, bounded by bytes,
//!   with a guaranteed replay window;
//! - `RedisStore` (feature `redis`): one key per record, one Lua script call per operation;
//! - `PostgresStore` (feature `postgres`): one table, a single-statement claim;
//! - `MySqlStore` (feature `mysql`): one table on MySQL or MariaDB, a claim in one call of a
//!   stored procedure.
//!
//! A store of your own is checked by the public conformance suite (feature `conformance`,
//! the `conformance` module and `store_conformance_tests!`).
//!
//! # Runtime
//!
//! The layer needs a Tokio runtime: it spawns one lease-keeper task per layer (started again
//! on the current runtime if the one it ran on ended), and tracked tasks for the work that
//! outlives a response future: the rest of an operation whose client left, completions
//! retried during a store outage, releases. Wait for that work at shutdown with
//! [`DetachedWork::shutdown`].
//!
//! # Features
//!
//! | Feature | Default | What it adds |
//! |---|---|---|
//! | `memory` | yes | [`MemoryStore`] |
//! | `axum` | yes | [`RebuildBody`] for axum's body, and [`IdempotencyLayer::for_axum`] |
//! | `tonic` | no | [`RebuildBody`] for tonic's body |
//! | `redis` | no | `RedisStore`, and `redis` re-exported |
//! | `postgres` | no | `PostgresStore`, and `sqlx` re-exported |
//! | `mysql` | no | `MySqlStore` (MySQL 8.0.29+, MariaDB 10.6+), and `sqlx` re-exported |
//! | `tower-http` | yes | [`RebuildBody`] for the body of tower-http's `RequestBodyLimitLayer` |
//! | `nats` | no | [`consumer::nats`]: idempotent NATS JetStream consumers, and `async_nats` re-exported |
//! | `amqp` | no | [`consumer::amqp`]: idempotent RabbitMQ consumers, and `lapin` re-exported |
//! | `openapi` | no | [`openapi`]: the layer's contract in a `utoipa` OpenAPI document |
//! | `json` | no | [`Fingerprint::of_canonical_json`]; JSON results and inputs for [`function`] (`serde`) |
//! | `conformance` | no | the store conformance suite |
//! | `client` | no | [`client`]: a key per call and retries that keep it, for any Tower HTTP client |
//! | `reqwest` | no | `client::reqwest`: the same as a reqwest-middleware middleware |
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![deny(missing_docs, unreachable_pub, missing_debug_implementations)]
#![warn(rust_2018_idioms)]

mod answer;
#[cfg(feature = "axum")]
mod axum_body;
pub mod body;
mod claim;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
#[cfg(any(feature = "nats", feature = "amqp"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "nats", feature = "amqp"))))]
pub mod consumer;
pub mod fingerprint;
mod flow;
pub mod function;
pub mod future;
mod handle;
pub mod key;
mod layer;
mod lease;
pub mod metrics;
mod numbers;
#[cfg(feature = "openapi")]
#[cfg_attr(docsrs, doc(cfg(feature = "openapi")))]
pub mod openapi;
mod outcome;
mod periodic;
pub mod policy;
pub mod problem;
pub mod record;
mod record_body;
mod recover;
#[cfg(feature = "memory")]
mod replay_cache;
mod runtime;
mod service;
mod settings;
pub mod store;
mod tasks;
mod time;

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use async_nats;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use axum_body::{AxumIdempotency, AxumIdempotencyLayer, AxumResponseFuture};
pub use body::{IdempotencyBody, RebuildBody};
pub use fingerprint::Fingerprint;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use handle::MissingClaim;
pub use handle::{DeliverOnce, IdempotencyClaim, MayHaveRun};
pub use key::{IdempotencyKey, KeyError, KeyParsing, Scope};
#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub use lapin;
pub use layer::IdempotencyLayer;
pub use outcome::{IdempotencyOutcome, REPLAYED_HEADER};
pub use policy::{ClaimLease, Disconnect, InFlight, MissingKey, RecordTtl, StoreFailure};
pub use recover::{Recovery, RecoveryError, Unsettled};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis;
pub use service::Idempotency;
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "mysql"))))]
pub use sqlx;
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use store::memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use store::mysql::MySqlStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::postgres::PostgresStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::redis::RedisStore;
pub use store::{IdempotencyStore, StoreError};
pub use tasks::{DetachedWork, Unfinished};

/// The attribute that makes [`IdempotencyStore`]'s async methods object safe, re-exported
/// so that a store of your own needs no dependency of its own on `async-trait`:
/// `#[tower_idempotency::async_trait]`.
pub use async_trait::async_trait;
