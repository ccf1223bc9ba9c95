//! What the running operation can reach of its claim ([`IdempotencyClaim`]), and the mark
//! of an answer that may have run ([`MayHaveRun`]).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

#[cfg(feature = "axum")]
use http::request::Parts;

use crate::key::StoreKey;
use crate::runtime::Runtime;
use crate::store::{LeaseToken, StoreError};

const NOT_COMMITTED: u8 = 0;
/// A commit point written inside the application's transaction: it holds if and only if
/// that transaction commits, which the layer cannot see.
const IN_TRANSACTION: u8 = 1;
/// A commit point the store confirmed.
const CONFIRMED: u8 = 2;
/// A commit the operation was told failed (`Err`) but whose command may still land: it
/// timed out, or the connection failed after it was sent. The layer withdraws it
/// ([`IdempotencyStore::revoke`](crate::store::IdempotencyStore::revoke)) before the key is
/// let go, so that `Err` means "not committed".
const IN_DOUBT: u8 = 3;

/// What the claim guard and the handler's handle share.
pub(crate) struct Shared {
    pub(crate) config: Arc<Runtime>,
    pub(crate) key: StoreKey,
    pub(crate) token: LeaseToken,
    /// How long this claim's record (or commit) is kept: the layer's TTL, or the request's
    /// own ([`IdempotencyLayer::ttl_by`](crate::IdempotencyLayer::ttl_by)).
    pub(crate) ttl: std::time::Duration,
    /// The key's hash in the embedded memory store ([`Runtime::key_hash`]).
    pub(crate) hash: u64,
    commit: AtomicU8,
}

impl Shared {
    pub(crate) fn new(
        config: Arc<Runtime>,
        key: StoreKey,
        token: LeaseToken,
        ttl: std::time::Duration,
        hash: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            key,
            token,
            ttl,
            hash,
            commit: AtomicU8::new(NOT_COMMITTED),
        })
    }

    /// Whether the store confirmed a commit point (one written in a transaction may still
    /// have rolled back, so it does not count).
    pub(crate) fn confirmed(&self) -> bool {
        self.commit.load(Ordering::Acquire) == CONFIRMED
    }

    /// Whether the last commit point was written inside the application's transaction
    /// (and none confirmed by the store): whether it holds is not known to the layer.
    pub(crate) fn in_transaction(&self) -> bool {
        self.commit.load(Ordering::Acquire) == IN_TRANSACTION
    }

    /// Whether the operation was told its commit failed while the commit may have landed
    /// (and no later commit was confirmed): it must be withdrawn before the key is let go.
    pub(crate) fn in_doubt(&self) -> bool {
        self.commit.load(Ordering::Acquire) == IN_DOUBT
    }
}

/// The running operation's claim on its idempotency key: found in the request's extensions
/// of every request the layer runs (an axum handler takes it as an extractor), with the
/// key, the caller's scope and the lease token.
///
/// Its [`commit`](Self::commit) declares the operation's **commit point**: from then on the
/// key is never released. Whatever happens next (an error, a panic, a `5xx`, a client gone,
/// a crash), a retry with this key does not run the operation again: it gets the stored
/// answer if there is one (a committed operation's error answer is stored too), and
/// otherwise `500 outcome-unknown` (or what the layer's
/// [`recover_with`](crate::IdempotencyLayer::recover_with) hook rebuilds). On PostgreSQL,
/// [`PostgresStore::commit_in`](crate::PostgresStore::commit_in) writes the commit point
/// inside your own transaction instead, so that it holds if and only if your writes do;
/// on MySQL and MariaDB, [`MySqlStore::commit_in`](crate::MySqlStore::commit_in) does the
/// same.
///
/// A request that never declares a commit point keeps the default behaviour: an error
/// answer (or a panic, or a lost response) releases the key, so a retry runs again.
///
/// A tonic handler finds it with
/// `request.extensions().get::<IdempotencyClaim>()`; any Tower service in
/// `req.extensions()`.
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, MemoryStore};
///
/// async fn charge(claim: IdempotencyClaim, body: String) -> Result<String, String> {
///     // Past this point the charge must never run twice: commit first (at most once),
///     // then make the one call that cannot be undone.
///     claim.commit().await.map_err(|e| format!("not charged: {e}"))?;
///     Ok(format!("charged {body} under {}", claim.key()))
/// }
///
/// let app: Router = Router::new()
///     .route("/charges", post(charge))
///     .layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers());
/// ```
#[derive(Clone)]
pub struct IdempotencyClaim {
    shared: Arc<Shared>,
}

impl fmt::Debug for IdempotencyClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyClaim")
            .field("key", &self.key())
            .field("token", &self.shared.token)
            .field("committed", &self.is_committed())
            .finish()
    }
}

impl IdempotencyClaim {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Where work that outlives the request runs (the layer's detached work).
    pub(crate) fn work(&self) -> &crate::tasks::DetachedWork {
        &self.shared.config.work
    }

    /// The client's key (without the scope).
    pub fn key(&self) -> &str {
        self.shared.key.client_key()
    }

    /// The caller's scope, as text: `anon` when keys are shared across callers, otherwise
    /// 64 hexadecimal digits ([`Scope`](crate::Scope)). Keep it beside the client's key in
    /// your own rows, so that a recovery hook can find them.
    pub fn scope(&self) -> &str {
        let s = self.shared.key.as_str();
        s.split_once(':').map_or(s, |(scope, _)| scope)
    }

    /// The key as the store keeps it (`scope:key`).
    pub fn store_key(&self) -> &StoreKey {
        &self.shared.key
    }

    /// The lease token that owns the key; every store call about it is fenced by it.
    pub fn token(&self) -> LeaseToken {
        self.shared.token
    }

    /// Declares the commit point, in one store call fenced by the token (bounded by the
    /// layer's [`store_timeout`](crate::IdempotencyLayer::store_timeout)).
    ///
    /// On `Ok`, the key is never released again: a retry gets the stored answer or
    /// `outcome-unknown`, never a second run. On `Err`, do not make the effects: the key
    /// is **not committed**. [`StoreError::LeaseLost`] means the key is no longer this
    /// request's (its lease lapsed and another took it over); any other error means the
    /// store could not confirm the commit, and the layer makes sure it does not hold: should
    /// the call land after all (it timed out while the store was paused, or the connection
    /// broke after it was sent), the layer withdraws it once the operation ends
    /// ([`IdempotencyStore::revoke`](crate::store::IdempotencyStore::revoke), fenced by the
    /// token and retried like a completion), holding the key meanwhile, so a retry runs the
    /// operation instead of being told a failure or `outcome-unknown`. The operation's
    /// answer is never stored for such a key, whatever its status (a `200` saying "not
    /// charged" included). A call dropped before the store answers (a timeout of the
    /// handler's own) counts as one that failed: should it land, it is withdrawn too.
    ///
    /// With a store that is not your database, a commit point cannot be atomic with your
    /// effects. Call it **before** the step that cannot be undone to get *at most once* (a
    /// crash between the two leaves `outcome-unknown`, never a second run); call it after
    /// to get *at least once* (a crash between the two lets a retry run again). On
    /// PostgreSQL, [`PostgresStore::commit_in`](crate::PostgresStore::commit_in) gives
    /// *exactly once*, and on MySQL or MariaDB
    /// [`MySqlStore::commit_in`](crate::MySqlStore::commit_in).
    ///
    /// Committing twice is the same as once.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let s = &self.shared;
        if s.commit.load(Ordering::Acquire) == CONFIRMED {
            // Confirmed already: the same as once, with no store call that could fail.
            return Ok(());
        }
        // In doubt while the command is out: if this future is dropped before the store
        // answers (a timeout of the handler's own), the command may land yet, and is
        // withdrawn when the operation ends, as after an error.
        let was_not_committed = s
            .commit
            .compare_exchange(NOT_COMMITTED, IN_DOUBT, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        match s.config.commit(&s.key, s.hash, s.token, s.ttl).await {
            Ok(()) => {}
            // A definite answer: nothing was committed.
            Err(StoreError::LeaseLost) => {
                if was_not_committed {
                    let _ = s.commit.compare_exchange(
                        IN_DOUBT,
                        NOT_COMMITTED,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                return Err(StoreError::LeaseLost);
            }
            Err(err) => {
                // The command may still land: it is withdrawn when the operation ends
                // (the state says so since the command went out).
                tracing::warn!(
                    key = self.key(),
                    error = %crate::store::ErrorChain(&err),
                    "the commit point could not be confirmed; it is withdrawn when the \
                     operation ends, so that a retry can run"
                );
                return Err(err);
            }
        }
        s.commit.store(CONFIRMED, Ordering::Release);
        tracing::debug!(key = self.key(), "commit point declared");
        Ok(())
    }

    /// Whether this request declared its commit point (with [`commit`](Self::commit), or
    /// inside a transaction with
    /// [`PostgresStore::commit_in`](crate::PostgresStore::commit_in) or
    /// [`MySqlStore::commit_in`](crate::MySqlStore::commit_in), which counts here even if
    /// the transaction later rolled back).
    pub fn is_committed(&self) -> bool {
        matches!(
            self.shared.commit.load(Ordering::Acquire),
            IN_TRANSACTION | CONFIRMED
        )
    }

    /// How long a committed key is kept: the claim's record TTL.
    #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
    pub(crate) fn ttl(&self) -> std::time::Duration {
        self.shared.ttl
    }

    /// A commit point was written inside the application's transaction.
    #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
    pub(crate) fn committed_in_transaction(&self) {
        let commit = &self.shared.commit;
        let _ = commit.compare_exchange(
            NOT_COMMITTED,
            IN_TRANSACTION,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        // A doubtful commit followed by one in a transaction: the transaction decides.
        let _ = commit.compare_exchange(
            IN_DOUBT,
            IN_TRANSACTION,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

/// A mark for a response whose operation **may have run** although its status says it
/// failed: put it in the response's extensions, and the layer stores that answer whatever
/// its status, never releasing the key, so that every retry gets it replayed instead of
/// running the operation again.
///
/// It is for errors that happen after the effect may have been made, such as a proxy whose
/// upstream received the request and then dropped the connection. Unlike a
/// [`commit`](IdempotencyClaim::commit) point it costs no store call of its own: the answer
/// is stored by the completion, which is retried (holding the key) while the store fails.
///
/// ```
/// use axum::{Router, http::StatusCode, response::IntoResponse, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MayHaveRun, MemoryStore};
///
/// async fn forward() -> impl IntoResponse {
///     // The request went out and no answer came back: it may have run.
///     let mut res = (StatusCode::BAD_GATEWAY, "the upstream may have run it").into_response();
///     res.extensions_mut().insert(MayHaveRun);
///     res
/// }
///
/// let app: Router = Router::new()
///     .route("/payments", post(forward))
///     .layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MayHaveRun;

/// A mark for an answer that must not be kept, such as one that mints a secret (an API key,
/// a one-time password): put it in the response's extensions, and the layer delivers the
/// answer to this caller only and keeps a tombstone instead (its status, none of its
/// headers or body), so that the operation never runs again and a retry gets `410
/// response-not-stored` saying the answer was delivered and is not kept. For a whole route,
/// insert it in a response-mapping layer on that route.
///
/// ```
/// use axum::{Router, response::IntoResponse, routing::post};
/// use tower_idempotency::{DeliverOnce, IdempotencyLayer, MemoryStore};
///
/// async fn mint_api_key() -> impl IntoResponse {
///     let mut res = "sk_live_…".into_response();
///     res.extensions_mut().insert(DeliverOnce);
///     res
/// }
///
/// let app: Router = Router::new()
///     .route("/api-keys", post(mint_api_key))
///     .layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DeliverOnce;

/// The header of a tombstone kept for a [`DeliverOnce`] answer.
pub(crate) const WITHHELD_HEADER: http::HeaderName =
    http::HeaderName::from_static("idempotency-withheld");

/// The answer when a handler asks for an [`IdempotencyClaim`] that the request does not
/// carry (feature `axum`): the route is not behind an
/// [`IdempotencyLayer`](crate::IdempotencyLayer), the request is not covered, it came
/// without a key where keys are optional
/// ([`MissingKey::Optional`](crate::policy::MissingKey::Optional)), or the store failed
/// and the layer ran it unprotected
/// ([`StoreFailure::FailOpen`](crate::policy::StoreFailure::FailOpen)). It answers `500`;
/// take `Option<IdempotencyClaim>` where a claim may be absent.
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("this request has no idempotency claim (no IdempotencyLayer, not covered, or no key)")]
pub struct MissingClaim;

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for MissingClaim {
    fn into_response(self) -> axum_core::response::Response {
        let mut res =
            axum_core::response::Response::new(axum_core::body::Body::from(self.to_string()));
        *res.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        res
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum_core::extract::FromRequestParts<S> for IdempotencyClaim {
    type Rejection = MissingClaim;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, MissingClaim> {
        parts.extensions.get::<Self>().cloned().ok_or(MissingClaim)
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum_core::extract::OptionalFromRequestParts<S> for IdempotencyClaim {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().cloned())
    }
}
