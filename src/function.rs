//! Idempotent operations outside HTTP: a function call, a job, a queue message, an agent's
//! tool call.
//!
//! [`Idempotent`] runs an async operation once per (scope, key) over the layer's own
//! machinery, not a second implementation of it: the same store, lease and heartbeat,
//! token fencing, commit points ([`IdempotencyClaim::commit`], `commit_in`),
//! outcome-unknown and recovery hook, in-flight policy and store-failure policy, configured
//! on an [`IdempotencyLayer`](crate::IdempotencyLayer) as for HTTP. No HTTP type appears in its API.
//!
//! - The **first call** with a key runs the operation; an `Ok` result is stored (encoded by
//!   a [`Codec`]) and returned.
//! - A **duplicate** gets the stored result ([`Output::replayed`]), or waits for it
//!   ([`InFlight::Wait`](crate::InFlight::Wait)), or is told [`CallError::InFlight`].
//! - The same key with **another input** is [`CallError::Mismatch`]: the input is
//!   fingerprinted as a request body is.
//! - An **`Err` result** frees the key, so that a retry runs the operation again, unless the
//!   operation passed its commit point: then the error is stored and replayed
//!   ([`CallError::Operation`]), and a crash after the commit point leaves
//!   [`CallError::OutcomeUnknown`] (or the recovery hook's answer, see [`recovered`]).
//! - A **panicking** or **cancelled** operation is treated as a handler's would be: the key
//!   is freed unless committed (or, with [`Disconnect::Finish`](crate::Disconnect::Finish),
//!   a cancelled call's operation runs on to the end and its result is stored).
//!
//! ```
//! use bytes::Bytes;
//! use tower_idempotency::function::{CallError, Idempotent};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // One caller, the service itself: its keys may share one scope.
//! let calls =
//!     Idempotent::new(&IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers());
//! let charge = |claim: tower_idempotency::IdempotencyClaim| async move {
//!     claim.commit().await.map_err(|e| Bytes::from(e.to_string()))?;
//!     Ok::<_, Bytes>(Bytes::from("charged 12 EUR"))
//! };
//! let first = calls.key("charge-7").input("12 EUR").run(charge).await.unwrap();
//! assert!(!first.replayed);
//! // The same key again: the stored result, and the operation does not run.
//! let again = calls
//!     .key("charge-7")
//!     .input("12 EUR")
//!     .run(|_| async { unreachable!("never runs twice") })
//!     .await
//!     .unwrap();
//! assert!(again.replayed);
//! assert_eq!(again.value, first.value);
//! // The same key with another input is refused.
//! let other = calls.key("charge-7").input("13 EUR").run(charge).await;
//! assert!(matches!(other, Err(CallError::Mismatch)));
//! # }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower_service::Service;

use crate::handle::IdempotencyClaim;
use crate::key::{CallScope, IdempotencyKey, Scope};
use crate::outcome::IdempotencyOutcome;
use crate::recover::Recovery;
use crate::runtime::Runtime;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
/// What an operation answered, encoded for the store.
enum Encoded {
    /// A result: stored and replayed.
    Ok(Bytes),
    /// An error: the key is freed, unless the operation passed its commit point (then it
    /// is stored and replayed).
    Err(Bytes),
    /// A result the codec could not encode: the operation ran, so its key is kept with an
    /// empty record that replays as [`CallError::NotStored`], never a second run.
    Unencodable,
}
type Operation = Box<dyn FnOnce(IdempotencyClaim) -> BoxFuture<Encoded> + Send>;
/// The operation's own result, as made, beside its encoding.
type Made<T, E> = Arc<Mutex<Option<Result<T, E>>>>;

/// The internal header that marks a stored result the codec could not encode.
const UNENCODABLE: http::HeaderName = http::HeaderName::from_static("x-idempotent-unencodable");

/// How results and errors are stored: encoded to bytes when the operation ends, decoded
/// when they are replayed.
pub trait Codec<T>: Send + Sync + 'static {
    /// The bytes to store for `value`.
    fn encode(&self, value: &T) -> Result<Bytes, CodecError>;
    /// The value stored as `bytes`.
    fn decode(&self, bytes: &Bytes) -> Result<T, CodecError>;
}

/// A value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// Bytes stored as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Bytes> for Raw {
    fn encode(&self, value: &Bytes) -> Result<Bytes, CodecError> {
        Ok(value.clone())
    }
    fn decode(&self, bytes: &Bytes) -> Result<Bytes, CodecError> {
        Ok(bytes.clone())
    }
}

/// Values stored as JSON with `serde` (feature `json`).
#[cfg(feature = "json")]
#[cfg_attr(docsrs, doc(cfg(feature = "json")))]
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

#[cfg(feature = "json")]
impl<T: serde::Serialize + serde::de::DeserializeOwned> Codec<T> for Json {
    fn encode(&self, value: &T) -> Result<Bytes, CodecError> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| CodecError(e.to_string()))
    }
    fn decode(&self, bytes: &Bytes) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError(e.to_string()))
    }
}

/// A result, and whether it was replayed from the store rather than made by this call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Output<T> {
    /// The operation's result.
    pub value: T,
    /// `true` when the operation ran before (or its outcome was recovered) and this is its
    /// stored result; `false` when this call ran it.
    pub replayed: bool,
}

impl<T> Output<T> {
    /// The result.
    pub fn into_inner(self) -> T {
        self.value
    }
}

/// Why a call did not give the operation's result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError<E> {
    /// The operation answered `Err`. When `replayed` is false it ran in this call, and the
    /// key was freed unless it passed its commit point (`committed`: then its error is
    /// stored, and it never runs again with this key); when true it is a committed
    /// operation's stored error.
    #[error("the operation failed")]
    Operation {
        /// Its error.
        error: E,
        /// Whether it is a stored error, replayed.
        replayed: bool,
        /// Whether the operation passed its commit point: its error is kept under the key
        /// (always true when `replayed`).
        committed: bool,
    },
    /// Another call with this key is running: try again after `retry_after`.
    #[error("a call with this idempotency key is still running")]
    InFlight {
        /// When to try again.
        retry_after: Duration,
    },
    /// This key was used with another input.
    #[error("the idempotency key was already used with another input")]
    Mismatch,
    /// The operation passed its commit point and no outcome is stored (its instance
    /// crashed, or it was cut off): it must not run again. The layer's recovery hook may
    /// rebuild the outcome ([`recovered`]); otherwise an operator settles the key.
    #[error("the operation passed its commit point and its outcome is unknown")]
    OutcomeUnknown,
    /// The key, or the input, was refused before anything ran.
    #[error("the call was refused: {0}")]
    Rejected(String),
    /// The input is larger than the layer's
    /// [`max_request_body`](crate::IdempotencyLayer::max_request_body) (it is read whole
    /// to fingerprint it): nothing ran. Raise the bound on the layer the calls are made
    /// over.
    #[error("the input is too large: {0}")]
    TooLarge(String),
    /// The operation ran before, but its result was too large to keep.
    #[error("the operation ran before, but its result was not kept")]
    NotStored,
    /// The store failed (or is full) and the layer fails closed: nothing ran.
    #[error("the idempotency store is unavailable; nothing ran")]
    StoreUnavailable {
        /// When to try again.
        retry_after: Duration,
    },
    /// A stored record cannot be read: the operation ran, and does not run again.
    #[error("the stored result cannot be read")]
    RecordUnreadable,
    /// The stored (or the new) result could not be encoded or decoded.
    #[error("the result could not be encoded or decoded")]
    Codec(#[source] CodecError),
}

/// The recovery hook's answer for an operation run by [`Idempotent`] whose outcome was
/// unknown: the result it should have given, encoded as the call's codec encodes it.
///
/// ```
/// use bytes::Bytes;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Recovery, function};
///
/// let layer = IdempotencyLayer::new(MemoryStore::new()).recover_with(|unsettled| async move {
///     // Look the key up in the system of record.
///     let found: Option<String> = None;
///     Ok::<_, tower_idempotency::RecoveryError>(match found {
///         Some(receipt) => function::recovered(Bytes::from(receipt)),
///         None => Recovery::Unknown,
///     })
/// });
/// ```
pub fn recovered(encoded: Bytes) -> Recovery {
    Recovery::Answer(Response::new(encoded))
}

/// Runs operations once per key. Cheap to clone; built from an [`IdempotencyLayer`](crate::IdempotencyLayer)
/// (its store, lease, TTL, store timeout, in-flight and store-failure policies, recovery
/// hook, input size limit), so HTTP routes and functions can share one.
///
/// A call names its own scope ([`Call::scope`]); one that names none is in the one shared
/// scope if the layer shares keys across callers
/// ([`share_keys_across_callers`](crate::IdempotencyLayer::share_keys_across_callers)),
/// and is refused otherwise ([`CallError::Rejected`], nothing runs), so that two callers'
/// equal keys never meet by default. The layer's fail-open policy does not apply either: an
/// operation is always given its claim, so when the store fails, a call is refused with
/// [`CallError::StoreUnavailable`] and nothing runs, whatever the layer's
/// [`on_store_failure`](crate::IdempotencyLayer::on_store_failure).
#[derive(Clone)]
pub struct Idempotent {
    runtime: Arc<Runtime>,
}

impl fmt::Debug for Idempotent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent").finish_non_exhaustive()
    }
}

impl Idempotent {
    /// Calls over `layer`'s store and settings.
    pub fn new(layer: &crate::IdempotencyLayer) -> Self {
        Self {
            runtime: layer.runtime(),
        }
    }

    /// A call with this key (at most the layer's
    /// [`max_key_len`](crate::IdempotencyLayer::max_key_len) characters, no control
    /// characters; any other text, such as a message id, is fine).
    pub fn key(&self, key: impl Into<String>) -> Call<'_> {
        Call {
            runtime: &self.runtime,
            key: key.into(),
            scope: None,
            input: Bytes::new(),
            ttl: None,
            lease: None,
        }
    }
}

/// One call: its key, scope and input, then [`run`](Self::run).
#[must_use = "a call does nothing until it is run"]
pub struct Call<'a> {
    runtime: &'a Arc<Runtime>,
    key: String,
    scope: Option<Scope>,
    input: Bytes,
    ttl: Option<Duration>,
    lease: Option<Duration>,
}

impl fmt::Debug for Call<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("key", &self.key)
            .field("scope", &self.scope)
            .field("input_bytes", &self.input.len())
            .finish_non_exhaustive()
    }
}

impl Call<'_> {
    /// Whose key it is: keys of different scopes never meet (a tenant, a user, a queue).
    /// Without one, the call is in the shared scope if its layer shares keys across callers,
    /// and refused otherwise.
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// How long this call's result (or commit point) is kept, between one second and the
    /// layer's [`ttl`](crate::IdempotencyLayer::ttl). Default: the layer's TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long this call's claim is leased, at least the layer's
    /// [`lease`](crate::IdempotencyLayer::lease) (see [`ClaimLease`](crate::ClaimLease)).
    /// Default: the layer's lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The operation's input, fingerprinted: the same key with another input is
    /// [`CallError::Mismatch`]. Default: empty.
    pub fn input(mut self, input: impl Into<Bytes>) -> Self {
        self.input = input.into();
        self
    }

    /// The operation's input as JSON (feature `json`), with object keys sorted so that the
    /// fingerprint does not depend on the order of a map.
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub fn json_input<I: serde::Serialize + ?Sized>(
        mut self,
        input: &I,
    ) -> Result<Self, CodecError> {
        let value = serde_json::to_value(input).map_err(|e| CodecError(e.to_string()))?;
        self.input = Bytes::from(crate::fingerprint::canonical_json(value));
        Ok(self)
    }

    /// Runs `op` once for this key, with raw bytes as its result and error.
    pub async fn run<F, Fut>(self, op: F) -> Result<Output<Bytes>, CallError<Bytes>>
    where
        F: FnOnce(IdempotencyClaim) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, Bytes>> + Send + 'static,
    {
        self.run_with(Raw, op).await
    }

    /// Runs `op` once for this key, its result and error stored as JSON (feature `json`).
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub async fn run_json<T, E, F, Fut>(self, op: F) -> Result<Output<T>, CallError<E>>
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
        E: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
        F: FnOnce(IdempotencyClaim) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.run_with(Json, op).await
    }

    /// Runs `op` once for this key, its result and error stored with `codec`.
    pub async fn run_with<C, T, E, F, Fut>(self, codec: C, op: F) -> Result<Output<T>, CallError<E>>
    where
        C: Codec<T> + Codec<E>,
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(IdempotencyClaim) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let codec = Arc::new(codec);
        // The operation's own value travels beside the stored bytes, so that the first
        // call returns it as made, not as decoded (and an error that cannot be encoded is
        // still returned).
        let made: Made<T, E> = Arc::new(Mutex::new(None));
        let committed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let operation: Operation = {
            let (codec, made) = (Arc::clone(&codec), Arc::clone(&made));
            let committed = Arc::clone(&committed);
            Box::new(move |claim| {
                Box::pin(async move {
                    let watched = claim.clone();
                    let result = op(claim).await;
                    committed.store(watched.is_committed(), std::sync::atomic::Ordering::Release);
                    let encoded = match &result {
                        Ok(value) => Codec::<T>::encode(&*codec, value),
                        Err(error) => Codec::<E>::encode(&*codec, error),
                    };
                    let ok = result.is_ok();
                    *made.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
                    match (ok, encoded) {
                        (true, Ok(bytes)) => Encoded::Ok(bytes),
                        (true, Err(err)) => {
                            tracing::warn!(
                                error = %err,
                                "the operation's result cannot be encoded: it is returned \
                                 to this call, and its key is kept without it"
                            );
                            Encoded::Unencodable
                        }
                        (false, Ok(bytes)) => Encoded::Err(bytes),
                        // An error that cannot be encoded frees the key all the same
                        // (past a commit point, an empty error is kept).
                        (false, Err(_)) => Encoded::Err(Bytes::new()),
                    }
                })
            })
        };
        let (status, body, outcome) = self.call(operation).await?;
        let taken = made.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Ran in this call: its own result, as made. Otherwise the stored one.
        match (outcome, taken) {
            (_, Some(Ok(value))) => Ok(Output {
                value,
                replayed: false,
            }),
            (_, Some(Err(error))) => Err(CallError::Operation {
                error,
                replayed: false,
                committed: committed.load(std::sync::atomic::Ordering::Acquire),
            }),
            (IdempotencyOutcome::Executed, None) => Err(CallError::Rejected(
                "the operation did not finish".to_owned(),
            )),
            (_, None) => {
                if status == StatusCode::OK {
                    Codec::<T>::decode(&*codec, &body)
                        .map(|value| Output {
                            value,
                            replayed: true,
                        })
                        .map_err(CallError::Codec)
                } else {
                    match Codec::<E>::decode(&*codec, &body) {
                        Ok(error) => Err(CallError::Operation {
                            error,
                            replayed: true,
                            committed: true,
                        }),
                        Err(err) => Err(CallError::Codec(err)),
                    }
                }
            }
        }
    }

    /// Runs the call through the layer's flow; answers the stored (or made) status and
    /// bytes, and the layer's outcome, or the layer's refusal as an error.
    async fn call<E>(
        self,
        operation: Operation,
    ) -> Result<(StatusCode, Bytes, IdempotencyOutcome), CallError<E>> {
        let runtime = Arc::clone(self.runtime);
        let key = IdempotencyKey::from_call(&self.key, runtime.max_key_len)
            .map_err(|e| CallError::Rejected(e.to_string()))?;
        // No silent shared scope: without one of its own, a call is in the one shared scope
        // only where the layer was told keys are shared across callers.
        let scope = match self.scope {
            Some(scope) => scope,
            None if matches!(runtime.scope, crate::settings::ScopeRule::Shared) => {
                Scope::anonymous()
            }
            None => {
                return Err(CallError::Rejected(
                    "the call names no scope, and its layer does not share keys across \
                     callers: name one with Call::scope (a tenant, a user, a queue), or call \
                     share_keys_across_callers() on the layer"
                        .to_owned(),
                ));
            }
        };
        let mut req = Request::new(Full::new(self.input));
        *req.method_mut() = Method::POST;
        req.extensions_mut().insert(CallScope(scope));
        if let Some(ttl) = self.ttl {
            req.extensions_mut().insert(crate::policy::RecordTtl(ttl));
        }
        if let Some(lease) = self.lease {
            req.extensions_mut()
                .insert(crate::policy::ClaimLease(lease));
        }
        let (parts, body) = req.into_parts();
        let inner = Runner {
            operation: Arc::new(Mutex::new(Some(operation))),
        };
        let traced = !tracing::Span::current().is_disabled();
        let Ok(flowed) =
            crate::flow::flow(inner, parts, body, Some(key), runtime, false, traced).await;
        let Ok(res) = flowed.response().await;
        let outcome = res
            .extensions()
            .get::<IdempotencyOutcome>()
            .copied()
            .unwrap_or(IdempotencyOutcome::Executed);
        let status = res.status();
        let retry_after = retry_after(res.headers());
        let unencodable = res.headers().contains_key(UNENCODABLE);
        // Reading the body to its end is what stores the record of a first run.
        let body = match res.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        match outcome {
            IdempotencyOutcome::Replayed if unencodable => Err(CallError::NotStored),
            IdempotencyOutcome::Executed
            | IdempotencyOutcome::Replayed
            | IdempotencyOutcome::Recovered => Ok((status, body, outcome)),
            // The store failed and the layer fails open: the flow ran the service without a
            // claim, and the runner ran nothing (an operation is always given its claim).
            IdempotencyOutcome::Unprotected | IdempotencyOutcome::PassedThrough => {
                Err(CallError::StoreUnavailable { retry_after })
            }
            IdempotencyOutcome::InFlight => Err(CallError::InFlight { retry_after }),
            IdempotencyOutcome::Mismatch => Err(CallError::Mismatch),
            IdempotencyOutcome::OutcomeUnknown => Err(CallError::OutcomeUnknown),
            IdempotencyOutcome::NotStored => Err(CallError::NotStored),
            IdempotencyOutcome::RecordUnreadable => Err(CallError::RecordUnreadable),
            IdempotencyOutcome::StoreUnavailable | IdempotencyOutcome::StoreFull => {
                Err(CallError::StoreUnavailable { retry_after })
            }
            IdempotencyOutcome::Rejected if status == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(CallError::TooLarge(problem_detail(&body)))
            }
            IdempotencyOutcome::Rejected => Err(CallError::Rejected(problem_detail(&body))),
        }
    }
}

fn retry_after(headers: &HeaderMap) -> Duration {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs)
}

/// The `detail` of a problem answer (the layer writes it as a JSON string; its escapes are
/// undone), or the whole text.
fn problem_detail(body: &Bytes) -> String {
    let text = String::from_utf8_lossy(body);
    let Some((_, rest)) = text.split_once("\"detail\":\"") else {
        return text.into_owned();
    };
    let mut detail = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return detail,
            '\\' => match chars.next() {
                Some('n') => detail.push('\n'),
                Some('t') => detail.push('\t'),
                Some(other) => detail.push(other),
                None => break,
            },
            c => detail.push(c),
        }
    }
    text.into_owned()
}

/// The service the layer's flow runs: it takes the call's operation and answers its
/// encoded result, `200` for `Ok` (stored) and `500` for `Err` (the key freed unless
/// committed).
#[derive(Clone)]
struct Runner {
    operation: Arc<Mutex<Option<Operation>>>,
}

impl Service<Request<Full<Bytes>>> for Runner {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let operation = self
            .operation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let claim = req.extensions().get::<IdempotencyClaim>().cloned();
        Box::pin(async move {
            let (status, bytes, unencodable) = match (operation, claim) {
                (Some(operation), Some(claim)) => match operation(claim).await {
                    Encoded::Ok(bytes) => (StatusCode::OK, bytes, false),
                    Encoded::Err(bytes) => (StatusCode::INTERNAL_SERVER_ERROR, bytes, false),
                    Encoded::Unencodable => (StatusCode::OK, Bytes::new(), true),
                },
                // The flow runs the service once, with the claim: never reached.
                _ => (StatusCode::INTERNAL_SERVER_ERROR, Bytes::new(), false),
            };
            let mut res = Response::new(Full::new(bytes));
            *res.status_mut() = status;
            // The result is kept or the key released by the function's rule, not by the
            // layer's policies for HTTP answers.
            res.extensions_mut()
                .insert(crate::record_body::FunctionAnswer {
                    keep: status == StatusCode::OK,
                });
            if unencodable {
                res.headers_mut()
                    .insert(UNENCODABLE, http::HeaderValue::from_static("1"));
            }
            Ok(res)
        })
    }
}

/// A [`Codec`] for one type only, from two functions (for the
/// [`IdempotentService`] adapter and codecs of your own).
pub struct FnCodec<T, Enc, Dec> {
    encode: Enc,
    decode: Dec,
    _value: PhantomData<fn() -> T>,
}

impl<T, Enc, Dec> fmt::Debug for FnCodec<T, Enc, Dec> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnCodec").finish_non_exhaustive()
    }
}

impl<T, Enc, Dec> FnCodec<T, Enc, Dec>
where
    Enc: Fn(&T) -> Result<Bytes, CodecError> + Send + Sync + 'static,
    Dec: Fn(&Bytes) -> Result<T, CodecError> + Send + Sync + 'static,
{
    /// A codec from its two halves.
    pub fn new(encode: Enc, decode: Dec) -> Self {
        Self {
            encode,
            decode,
            _value: PhantomData,
        }
    }
}

impl<T: 'static, Enc, Dec> Codec<T> for FnCodec<T, Enc, Dec>
where
    Enc: Fn(&T) -> Result<Bytes, CodecError> + Send + Sync + 'static,
    Dec: Fn(&Bytes) -> Result<T, CodecError> + Send + Sync + 'static,
{
    fn encode(&self, value: &T) -> Result<Bytes, CodecError> {
        (self.encode)(value)
    }
    fn decode(&self, bytes: &Bytes) -> Result<T, CodecError> {
        (self.decode)(bytes)
    }
}

/// Who a request is, for [`IdempotentService`]: its key, scope and fingerprinted input.
#[derive(Debug, Clone)]
pub struct Identity {
    key: String,
    scope: Option<Scope>,
    input: Bytes,
}

impl Identity {
    /// A request with this key (see [`Idempotent::key`]).
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            scope: None,
            input: Bytes::new(),
        }
    }

    /// Its scope (see [`Call::scope`]).
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// Its fingerprinted input (see [`Call::input`]).
    pub fn input(mut self, input: impl Into<Bytes>) -> Self {
        self.input = input.into();
        self
    }
}

/// Why an [`IdempotentService`] did not answer with its inner service's response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError<E> {
    /// The inner service failed in this call: the key was freed, and a retry runs it again
    /// (an inner service is given no claim, so it has no commit point).
    #[error("the inner service failed")]
    Inner(#[source] E),
    /// The request had no identity: the reason, and nothing ran.
    #[error("the request cannot be identified: {0}")]
    Unidentified(String),
    /// The layer answered instead of the service: in flight, mismatch, store unavailable…
    #[error(transparent)]
    Idempotency(CallError<Bytes>),
}

/// A [`Layer`](tower_layer::Layer) that makes any `Service<Req>` idempotent, HTTP or not (a
/// queue consumer's handler, a job runner): `identify` reads each request's key, scope and
/// input, and `codec` stores the response. Built on [`Idempotent`], with its guarantees,
/// but for commit points: the inner service is given no
/// [`IdempotencyClaim`], so any error it answers frees the key and
/// a retry runs it again, as does a crash midway once the lease runs out. An operation with
/// effects that must not be made twice once begun uses [`Idempotent`] itself, whose
/// operation gets the claim and can declare its commit point.
///
/// ```
/// use bytes::Bytes;
/// use tower::{Service, ServiceExt, service_fn};
/// use tower_idempotency::function::{FnCodec, Identity, IdempotentServiceLayer, CodecError};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// struct Job { id: String, payload: String }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = IdempotentServiceLayer::new(
///     &IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers(),
///     |job: &Job| Ok(Identity::new(job.id.clone()).input(job.payload.clone())),
///     FnCodec::new(
///         |done: &String| Ok(Bytes::from(done.clone())),
///         |bytes: &Bytes| String::from_utf8(bytes.to_vec()).map_err(|e| CodecError(e.to_string())),
///     ),
/// );
/// let mut svc = tower::ServiceBuilder::new()
///     .layer(layer)
///     .service(service_fn(|job: Job| async move {
///         Ok::<_, std::convert::Infallible>(format!("sent {}", job.payload))
///     }));
/// let job = || Job { id: "job-1".into(), payload: "mail".into() };
/// let first = svc.ready().await.unwrap().call(job()).await.unwrap();
/// let again = svc.ready().await.unwrap().call(job()).await.unwrap();
/// assert_eq!((first.value.as_str(), first.replayed), ("sent mail", false));
/// assert_eq!((again.value.as_str(), again.replayed), ("sent mail", true));
/// # }
/// ```
pub struct IdempotentServiceLayer<K, C> {
    calls: Idempotent,
    identify: Arc<K>,
    codec: Arc<C>,
}

impl<K, C> Clone for IdempotentServiceLayer<K, C> {
    fn clone(&self) -> Self {
        Self {
            calls: self.calls.clone(),
            identify: Arc::clone(&self.identify),
            codec: Arc::clone(&self.codec),
        }
    }
}

impl<K, C> fmt::Debug for IdempotentServiceLayer<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentServiceLayer")
            .finish_non_exhaustive()
    }
}

impl<K, C> IdempotentServiceLayer<K, C> {
    /// Over `layer`'s store and settings; `identify` tells each request's identity (an
    /// `Err` refuses it with [`ServiceError::Unidentified`]), `codec` stores responses.
    pub fn new(layer: &crate::IdempotencyLayer, identify: K, codec: C) -> Self {
        Self {
            calls: Idempotent::new(layer),
            identify: Arc::new(identify),
            codec: Arc::new(codec),
        }
    }
}

impl<S, K, C> tower_layer::Layer<S> for IdempotentServiceLayer<K, C> {
    type Service = IdempotentService<S, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotentService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`IdempotentServiceLayer`]: answers `Output<S::Response>`, replayed or
/// made.
pub struct IdempotentService<S, K, C> {
    inner: S,
    layer: IdempotentServiceLayer<K, C>,
}

impl<S: Clone, K, C> Clone for IdempotentService<S, K, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, K, C> fmt::Debug for IdempotentService<S, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentService").finish_non_exhaustive()
    }
}

impl<S, Req, K, C> Service<Req> for IdempotentService<S, K, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    Req: Send + 'static,
    K: Fn(&Req) -> Result<Identity, String> + Send + Sync + 'static,
    C: Codec<S::Response>,
{
    type Response = Output<S::Response>;
    type Error = ServiceError<S::Error>;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(ServiceError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The ready service handles this request; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let identity = (layer.identify)(&req).map_err(ServiceError::Unidentified)?;
            let made: Made<S::Response, S::Error> = Arc::new(Mutex::new(None));
            let operation: Operation = {
                let (made, codec) = (Arc::clone(&made), Arc::clone(&layer.codec));
                Box::new(move |_claim| {
                    Box::pin(async move {
                        let result = inner.call(req).await;
                        // An inner error is not encodable: the key is freed (or, past a
                        // commit point, an empty error is kept).
                        let encoded = match &result {
                            Ok(res) => match codec.encode(res) {
                                Ok(bytes) => Encoded::Ok(bytes),
                                Err(err) => {
                                    tracing::warn!(
                                        error = %err,
                                        "the service's response cannot be encoded: it is \
                                         returned to this call, and its key is kept without it"
                                    );
                                    Encoded::Unencodable
                                }
                            },
                            Err(_) => Encoded::Err(Bytes::new()),
                        };
                        *made.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
                        encoded
                    })
                })
            };
            let mut call = layer.calls.key(identity.key).input(identity.input);
            if let Some(scope) = identity.scope {
                call = call.scope(scope);
            }
            let (status, body, outcome) = call
                .call::<Bytes>(operation)
                .await
                .map_err(ServiceError::Idempotency)?;
            let taken = made.lock().unwrap_or_else(|p| p.into_inner()).take();
            match (outcome, taken) {
                (_, Some(Ok(value))) => Ok(Output {
                    value,
                    replayed: false,
                }),
                (_, Some(Err(err))) => Err(ServiceError::Inner(err)),
                (IdempotencyOutcome::Executed, None) => Err(ServiceError::Idempotency(
                    CallError::Rejected("the operation did not finish".to_owned()),
                )),
                _ if status == StatusCode::OK => layer
                    .codec
                    .decode(&body)
                    .map(|value| Output {
                        value,
                        replayed: true,
                    })
                    .map_err(|e| ServiceError::Idempotency(CallError::Codec(e))),
                _ => Err(ServiceError::Idempotency(CallError::Operation {
                    error: body,
                    replayed: true,
                    committed: true,
                })),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problems_detail_is_read_with_its_escapes() {
        let body = Bytes::from_static(
            br#"{"type":"x","detail":"a \"quoted\" word\nand a \\ slash","status":400}"#,
        );
        assert_eq!(problem_detail(&body), "a \"quoted\" word\nand a \\ slash");
        assert_eq!(problem_detail(&Bytes::from_static(b"plain")), "plain");
        assert_eq!(
            problem_detail(&Bytes::from_static(br#"{"detail":"cut"#)),
            r#"{"detail":"cut"#
        );
    }
}
