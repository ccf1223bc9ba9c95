//! The covered path of a request with a key: fingerprint → claim → decide (run, replay,
//! 409, 422, wait), and the run itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::answer::{
    mismatch, problem, problem_reusing, replay, replay_reusing, store_unavailable,
};
use crate::body::{BufferError, IdempotencyBody, RebuildBody, buffer};
use crate::claim::{Claimed, PendingClaim};
use crate::key::{IdempotencyKey, StoreKey};
use crate::outcome::{IdempotencyOutcome, mark};
use crate::policy::{Disconnect, InFlight, StoreFailure};
use crate::problem::{Problem, ProblemKind};
use crate::record::Record;
use crate::record_body::Recorder;
use crate::recover::{Recovery, Unsettled};
use crate::runtime::Runtime;
use crate::store::{Claim, ErrorChain, KeyState, StoreError};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The future `make` gives, in a box allocated before it is made, so that it can be
/// written there: not made on the stack, then copied whole into memory just taken from
/// the allocator. (For the flow's future; the operation's, boxed in [`run`] the plain
/// way, measured no different.)
#[inline(always)]
pub(crate) fn in_box<T>(make: impl FnOnce() -> T) -> Box<T> {
    let slot = Box::new_uninit();
    Box::write(slot, make())
}

/// The future `make` gives, made and boxed in a frame of its own: a rarer branch's
/// future, made inline, would be part of the frame of every poll of the future that awaits
/// it (the flow's poll had a 1,808-byte slot for such futures), and what that poll calls
/// would sit that much deeper in the stack on every request.
#[cold]
#[inline(never)]
fn boxed_cold<'a, F>(
    make: impl FnOnce() -> F,
) -> Pin<Box<dyn Future<Output = F::Output> + Send + 'a>>
where
    F: Future + Send + 'a,
{
    Box::pin(make())
}

/// What the flow of a request comes to: the layer's answer, or the operation that owns
/// the claim, to run.
///
/// The operation is handed out rather than awaited inside the flow, so that the response
/// future polls it directly: every poll of the operation (running the service, storing the
/// record) then runs without the flow's frame above it in the stack, and the flow's future
/// is freed before the operation runs.
pub(crate) enum Flowed<B, E> {
    /// The layer's answer: a replay, a refusal, an unprotected run's response.
    Answer(Response<IdempotencyBody<B>>),
    /// The operation that owns the claim, not yet polled.
    Run(Operation<B, E>),
}

/// The operation that owns a claim: the service's call, then its response recorded.
pub(crate) type Operation<B, E> = Detachable<Result<Response<IdempotencyBody<B>>, E>>;

impl<B, E> Flowed<B, E> {
    /// The response: the answer, or the operation's once it has run.
    pub(crate) async fn response(self) -> Result<Response<IdempotencyBody<B>>, E> {
        match self {
            Flowed::Answer(res) => Ok(res),
            Flowed::Run(operation) => operation.await,
        }
    }
}

/// The flow ends with the layer's answer.
fn answer<B, E>(res: Response<IdempotencyBody<B>>) -> Result<Flowed<B, E>, E> {
    Ok(Flowed::Answer(res))
}

/// The path of a covered request with a key (`None`: the key is in the body, read once it
/// is buffered, see [`IdempotencyLayer::key_from_json`](crate::IdempotencyLayer)).
/// `traced`: the request's span is enabled (attributes are recorded on it).
///
/// A function that returns an `async` block, not an `async fn`: an `async fn` keeps its
/// arguments in its future beside the copies its body moves them into; the block uses
/// them where they are.
// The arguments are what the flow starts from; bundling them would only rename them. And
// `async fn` is what this function must not be (above).
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
pub(crate) fn flow<S, ReqBody, ResBody>(
    mut inner: S,
    parts: Parts,
    body: ReqBody,
    key: Option<IdempotencyKey>,
    config: Arc<Runtime>,
    grpc: bool,
    traced: bool,
) -> impl Future<Output = Result<Flowed<ResBody, S::Error>, S::Error>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + RebuildBody + Send + 'static,
    ReqBody::Error: Into<crate::body::BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    async move {
        // Keys are kept apart per caller: a caller the layer cannot identify is refused, never
        // put in a scope it might share with another.
        let Some(scope) = config.scope_of(&parts) else {
            return answer(caller_unknown(&config, grpc, key.as_ref()));
        };
        let bytes = match buffer(body, config.max_request_body).await {
            Ok(bytes) => bytes,
            Err(err) => return answer(body_refused(&config, grpc, err)),
        };
        let key = match key {
            Some(key) => key,
            None => match crate::key::from_body(
                config.key_pointer.as_deref().unwrap_or(""),
                config.missing == crate::policy::MissingKey::Optional,
                config.max_key_len,
                &bytes,
            ) {
                Ok(key) => key,
                Err(None) => {
                    // No key in the body, and keys are optional: the request runs unprotected.
                    let req = Request::from_parts(parts, ReqBody::from_bytes(bytes));
                    // Boxed: a rare path, kept out of the request's future.
                    let res = boxed_cold(|| inner.call(req)).await?;
                    return answer(mark(
                        res.map(IdempotencyBody::passthrough),
                        IdempotencyOutcome::PassedThrough,
                    ));
                }
                Err(Some(refused)) => {
                    return answer(problem(
                        &config,
                        grpc,
                        refused,
                        IdempotencyOutcome::Rejected,
                    ));
                }
            },
        };
        let store_key = StoreKey::of(&scope, &key);
        // The span is looked up where it is recorded on, not kept across the claim: the
        // future, allocated for every covered request, holds no more than it must.
        if traced {
            let hash = xxhash_rust::xxh3::xxh3_64(store_key.as_str().as_bytes());
            tracing::Span::current()
                .record("idempotency.key_hash", format!("{hash:016x}").as_str());
        }
        let fingerprint = config.fingerprint_of(&parts, &bytes);
        let ttl = config.ttl_of(&parts);
        let lease = config.lease_of(&parts);
        // The request is put back together only when it goes on to the service (`run`, or
        // unprotected under fail-open), and the key put in its extensions then: a replay or a
        // refusal never needs either, and answers with the request's extensions (emptied) as
        // its own, so that the outcome needs no map of its own.
        let request = |parts, bytes| Request::from_parts(parts, ReqBody::from_bytes(bytes));

        // The token is made here, before the claim is sent: if the answer never comes, the
        // claim that may have landed is released by it (on every path, drops included).
        let mut pending = PendingClaim::new(&config, store_key, lease);
        let claim_started = traced.then(std::time::Instant::now);
        let mut claim = config
            .claim(
                pending.key(),
                pending.hash(),
                &fingerprint,
                pending.token(),
                pending.lease(),
            )
            .await;
        if let Some(started) = claim_started {
            tracing::Span::current().record(
                "idempotency.store.claim_ms",
                started.elapsed().as_secs_f64() * 1000.0,
            );
        }
        let mut waited = false;
        // Whether the recovery hook already sent this request round again (once at most).
        let mut rerun = false;
        loop {
            let found = match claim {
                // A record exists but cannot be read: the operation ran. Whatever the failure
                // policy, it must not run again.
                Err(StoreError::Decode(err)) => {
                    pending.not_ours();
                    return answer(unreadable(&config, grpc, key.as_str(), &err));
                }
                // The store refused a new claim to keep its recent records: nothing was
                // changed, and running unprotected could run a duplicate.
                Err(StoreError::Full) => {
                    pending.not_ours();
                    return answer(store_full(&config, grpc, key.as_str()));
                }
                Err(err) => {
                    pending.failed();
                    let req = request(parts, bytes);
                    return boxed_cold(|| store_failed(inner, req, key, &config, grpc, err))
                        .await
                        .map(Flowed::Answer);
                }
                Ok(found) => found,
            };
            match found {
                Claim::Acquired(token) if token == pending.token() => {
                    let req = request(parts, bytes);
                    let claimed = pending.acquired(fingerprint, ttl, traced);
                    return Ok(Flowed::Run(run(inner, req, key, claimed)));
                }
                Claim::Acquired(_) => {
                    // A store that ignores the caller's token breaks the contract; nothing it
                    // made can be released by the layer, so refuse rather than run unfenced.
                    pending.failed();
                    let err = StoreError::backend(ForeignToken);
                    let req = request(parts, bytes);
                    return boxed_cold(|| store_failed(inner, req, key, &config, grpc, err))
                        .await
                        .map(Flowed::Answer);
                }
                // A sealed record no store opened (an instance without the key ring, in a fleet
                // turning encryption on): never replayed as ciphertext, never run again.
                Claim::Completed(record)
                    if record
                        .fields()
                        .contains(crate::record::SEALED_HEADER.as_str()) =>
                {
                    pending.not_ours();
                    return answer(sealed(&config, grpc, key.as_str()));
                }
                Claim::Completed(record) => {
                    pending.not_ours();
                    if !same_request(&config, &parts, &bytes, fingerprint, record.fingerprint()) {
                        return answer(mismatch(&config, grpc, parts.extensions));
                    }
                    if record.is_tombstone() {
                        return answer(not_stored(&config, grpc, &record, parts.extensions));
                    }
                    return answer(replay_reusing(&record, parts.extensions));
                }
                Claim::OutcomeUnknown {
                    fingerprint: held,
                    token: committed_by,
                } => {
                    let store_key = pending.key().clone();
                    if !same_request(&config, &parts, &bytes, fingerprint, &held) {
                        pending.not_ours();
                        return answer(mismatch(&config, grpc, parts.extensions));
                    }
                    let unsettled = config.recover.as_ref().map(|_| {
                        Unsettled::new(store_key.clone(), &parts.method, &parts.uri, &parts.headers)
                    });
                    // The answer is out of the future's state before the next wait: a
                    // `match` on a local would keep it there, across the withdrawal and the
                    // new claim below.
                    match boxed_cold(|| {
                        outcome_unknown(
                            &config,
                            ttl,
                            grpc,
                            unsettled.filter(|_| !rerun),
                            store_key,
                            fingerprint,
                            held,
                        )
                    })
                    .await
                    {
                        Unknown::Answer(res) => {
                            pending.not_ours();
                            return answer(res);
                        }
                        Unknown::NeverRan => {}
                    }
                    // The hook proved the operation never made its effects: its commit is
                    // withdrawn (fenced by the token that made it; a retry that withdrew it
                    // first makes this one find the key in flight), and the key claimed anew.
                    rerun = true;
                    match config.revoke(pending.key(), committed_by).await {
                        Ok(()) => tracing::info!(
                            key = pending.key().client_key(),
                            "the recovery hook found the committed operation never ran: \
                             its commit is withdrawn and this retry runs it"
                        ),
                        Err(StoreError::LeaseLost) => {}
                        // Never run unprotected here, whatever the failure policy: the
                        // key was committed, and the withdrawal may have landed.
                        Err(err) => {
                            pending.not_ours();
                            tracing::warn!(
                                key = key.as_str(),
                                error = %ErrorChain(&err),
                                "withdrawing a commit the recovery hook found never ran \
                                 failed; refusing the request"
                            );
                            return answer(store_unavailable(&config, grpc));
                        }
                    }
                    claim = config
                        .claim(
                            pending.key(),
                            pending.hash(),
                            &fingerprint,
                            pending.token(),
                            pending.lease(),
                        )
                        .await;
                    continue;
                }
                Claim::InFlight {
                    fingerprint: held,
                    lease_remaining,
                } => {
                    // Its holder's heartbeats go on, whichever runtime they started on.
                    config.keeper.keep_running(|| config.renewal());
                    if !same_request(&config, &parts, &bytes, fingerprint, &held) {
                        pending.not_ours();
                        return answer(mismatch(&config, grpc, parts.extensions));
                    }
                    match config.in_flight {
                        InFlight::Wait(timeout) if !waited => {
                            waited = true;
                            // The embedded memory store claims for a waiter in the same
                            // poll that ends its wait, never on a wire: a waiter whose
                            // client leaves meanwhile left nothing to release. (A shared
                            // store's claim may be on the wire then: it stays armed.)
                            #[cfg(feature = "memory")]
                            let in_process = config.memory.is_some();
                            #[cfg(not(feature = "memory"))]
                            let in_process = false;
                            if in_process {
                                pending.set_on_the_wire(false);
                            }
                            claim = config
                                .wait(
                                    pending.key(),
                                    &fingerprint,
                                    pending.token(),
                                    pending.lease(),
                                    timeout,
                                )
                                .await;
                            pending.set_on_the_wire(true);
                            continue;
                        }
                        _ => {
                            pending.not_ours();
                            return answer(key_in_use(
                                &config,
                                grpc,
                                lease_remaining,
                                parts.extensions,
                            ));
                        }
                    }
                }
            }
        }
    }
}

// The answers below are the flow's rarer branches, out of line and cold: each builds its
// answer (a problem document, a formatted detail, a log event's fields) on the stack, and
// inlined into the flow they would all be part of its frame on every covered request,
// pushing everything the flow calls onto cache lines nothing else touches.

/// The caller cannot be identified: refused, never put in a scope it might share.
#[cold]
#[inline(never)]
fn caller_unknown<B>(
    config: &Runtime,
    grpc: bool,
    key: Option<&IdempotencyKey>,
) -> Response<IdempotencyBody<B>> {
    tracing::debug!(
        key = key.map(|k| k.as_str()),
        "caller unknown; refusing the request"
    );
    problem(
        config,
        grpc,
        Problem::new(
            ProblemKind::CallerUnknown,
            "The caller of this request cannot be identified, so its Idempotency-Key cannot be \
             kept apart from other callers' keys; nothing was done.",
        ),
        IdempotencyOutcome::Rejected,
    )
}

/// The request body was too large or could not be read.
#[cold]
#[inline(never)]
fn body_refused<B>(config: &Runtime, grpc: bool, err: BufferError) -> Response<IdempotencyBody<B>> {
    let problem_of = match err {
        BufferError::TooLarge => Problem::new(
            ProblemKind::RequestTooLarge,
            format!(
                "The request body is larger than {} bytes, the most this endpoint accepts.",
                config.max_request_body
            ),
        ),
        BufferError::Read(err) => Problem::new(
            ProblemKind::BodyUnreadable,
            format!("The request body could not be read: {err}"),
        ),
    };
    problem(config, grpc, problem_of, IdempotencyOutcome::Rejected)
}

/// The store refused a new claim to keep its recent records: nothing was changed.
#[cold]
#[inline(never)]
fn store_full<B>(config: &Runtime, grpc: bool, key: &str) -> Response<IdempotencyBody<B>> {
    // The truth about when a new key may fit: the memory store knows when its oldest record
    // leaves the replay window; others get the configured hint.
    #[cfg(feature = "memory")]
    let after = config
        .memory
        .as_ref()
        .and_then(crate::MemoryStore::room_in)
        .unwrap_or(config.retry_after);
    #[cfg(not(feature = "memory"))]
    let after = config.retry_after;
    tracing::warn!(
        key,
        retry_after_s = after.as_secs(),
        "idempotency store is full; refusing the request"
    );
    problem(
        config,
        grpc,
        Problem::new(
            ProblemKind::StoreFull,
            "The idempotency store has no room for a new key right now; nothing was done. \
             Retry after Retry-After, when room may be free.",
        )
        .retry_after(after),
        IdempotencyOutcome::StoreFull,
    )
}

/// A sealed record no store opened: never replayed as ciphertext, never run again.
#[cold]
#[inline(never)]
fn sealed<B>(config: &Runtime, grpc: bool, key: &str) -> Response<IdempotencyBody<B>> {
    let err = crate::record::DecodeError::Sealed(
        "a sealed record, and this layer's store does not open sealed records".to_owned(),
    );
    unreadable(config, grpc, key, &err)
}

/// The key's record is a tombstone: the operation ran (or may have), and its answer is
/// not kept.
#[cold]
#[inline(never)]
fn not_stored<B>(
    config: &Runtime,
    grpc: bool,
    record: &Record,
    spare: http::Extensions,
) -> Response<IdempotencyBody<B>> {
    let fields = record.fields();
    let grpc_cut = fields.is_grpc()
        && fields
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.trim().parse::<u32>().ok())
            .is_some_and(|c| (config.grpc_maybe_ran)(c));
    let withheld = fields.contains(crate::handle::WITHHELD_HEADER.as_str());
    let detail = if withheld {
        format!(
            "The operation ran and answered {}; that answer was delivered to the first \
             request only and is not kept (it held a secret). It will not run again with \
             this key.",
            record.status()
        )
    } else if grpc_cut {
        "The call was cut off midway (its deadline ran out) and may have run; its outcome is \
         not known. It will not run again with this key."
            .to_owned()
    } else if (config.maybe_ran)(record.status()) {
        format!(
            "The operation was cut off midway (it answered {}) and may have run; its outcome \
             is not known. It will not run again with this key.",
            record.status()
        )
    } else {
        format!(
            "The operation ran and answered {}, but its response could not be kept for \
             replay. It will not run again with this key.",
            record.status()
        )
    };
    problem_reusing(
        config,
        grpc,
        Problem::new(ProblemKind::ResponseNotStored, detail),
        IdempotencyOutcome::NotStored,
        spare,
    )
}

/// The key is held by a request still running: `409` with `Retry-After`.
#[cold]
#[inline(never)]
fn key_in_use<B>(
    config: &Runtime,
    grpc: bool,
    lease_remaining: Option<std::time::Duration>,
    spare: http::Extensions,
) -> Response<IdempotencyBody<B>> {
    let after = lease_remaining.map_or(config.retry_after, |l| l.min(config.retry_after));
    let detail = "A request with this Idempotency-Key is still being processed; retry later \
                  to get its result.";
    problem_reusing(
        config,
        grpc,
        Problem::new(ProblemKind::KeyInUse, detail).retry_after(after),
        IdempotencyOutcome::InFlight,
        spare,
    )
}

#[cold]
#[inline(never)]
fn unreadable<B>(
    config: &Runtime,
    grpc: bool,
    key: &str,
    err: &crate::record::DecodeError,
) -> Response<IdempotencyBody<B>> {
    tracing::error!(
        key,
        error = %ErrorChain(err),
        "the stored idempotency record cannot be read (damaged, or written by a newer \
         version); the operation will not run again with this key"
    );
    let detail = "An operation with this Idempotency-Key ran before, but its stored outcome \
                  cannot be read. It will not run again with this key: do not retry it, \
                  look its result up another way.";
    problem(
        config,
        grpc,
        Problem::new(ProblemKind::RecordUnreadable, detail),
        IdempotencyOutcome::RecordUnreadable,
    )
}

/// The header that tells how long a key is kept ([`IdempotencyLayer::announce_expiry`]).
///
/// [`IdempotencyLayer::announce_expiry`]: crate::IdempotencyLayer::announce_expiry
pub(crate) const EXPIRES_HEADER: http::HeaderName =
    http::HeaderName::from_static("idempotency-expires");

/// Puts `Idempotency-Expires` on an answer that is to be stored (and so replayed with it):
/// now plus the claim's TTL, as an HTTP-date. gRPC answers, whose status comes in trailers,
/// and answers that release their key do not carry it.
fn announce_expiry(config: &Runtime, parts: &mut http::response::Parts, ttl: std::time::Duration) {
    let kept = (config.storable)(parts.status)
        || parts
            .extensions
            .get::<crate::handle::MayHaveRun>()
            .is_some();
    if !kept || crate::problem::is_grpc(&parts.headers) {
        return;
    }
    let until = std::time::SystemTime::now() + ttl;
    if let Ok(value) = http::HeaderValue::from_str(&httpdate::fmt_http_date(until)) {
        parts.headers.insert(EXPIRES_HEADER, value);
    }
}

/// What a retry that found its key committed with no stored outcome answers.
enum Unknown<B> {
    /// The recovery hook's answer (stored and replayed), or `outcome-unknown`.
    Answer(Response<IdempotencyBody<B>>),
    /// The recovery hook found the operation never made its effects: run it.
    NeverRan,
}

/// A retry found its key committed with no stored outcome: the recovery hook's answer,
/// stored and replayed, or `outcome-unknown`; or the hook's word that it never ran.
async fn outcome_unknown<B>(
    config: &Runtime,
    ttl: std::time::Duration,
    grpc: bool,
    unsettled: Option<Unsettled>,
    key: StoreKey,
    fingerprint: crate::fingerprint::Fingerprint,
    held: crate::fingerprint::Fingerprint,
) -> Unknown<B> {
    if let (Some(recover), Some(unsettled)) = (&config.recover, unsettled) {
        match recover(unsettled).await {
            Ok(Recovery::NeverRan) => {
                crate::metrics::recovery("never-ran");
                return Unknown::NeverRan;
            }
            Ok(Recovery::Answer(res)) => {
                crate::metrics::recovery("recovered");
                let (parts, body) = res.into_parts();
                let headers = crate::record_body::replayed_headers(config, &parts.headers);
                let record = Record::of_fields(parts.status, headers, body, None)
                    .with_fingerprint(fingerprint);
                let settled = config.settle(&key, record.clone(), ttl).await;
                match settled {
                    Ok(true) => {
                        tracing::info!(
                            key = key.client_key(),
                            status = record.status().as_u16(),
                            "recovered the answer of a committed operation and stored it"
                        );
                    }
                    // Settled meanwhile (by another retry, or the owner came back and
                    // stored its own answer): replay what is stored.
                    Ok(false) => {
                        if let Ok(KeyState::Completed { record, .. }) =
                            config.inspect(&key).await
                            // The owner's own fingerprint (this request matched it, perhaps
                            // the way an earlier version made it), or this request's.
                            && (*record.fingerprint() == held || *record.fingerprint() == fingerprint)
                        {
                            return Unknown::Answer(replay(&record));
                        }
                    }
                    Err(err) => tracing::warn!(
                        key = key.client_key(),
                        error = %ErrorChain(&err),
                        "recovered the answer of a committed operation but could not store \
                         it; answering it all the same"
                    ),
                }
                return Unknown::Answer(mark(replay(&record), IdempotencyOutcome::Recovered));
            }
            Ok(_) => crate::metrics::recovery("none"),
            Err(err) => {
                crate::metrics::recovery("error");
                tracing::warn!(
                    key = key.client_key(),
                    error = %ErrorChain(&*err),
                    "the recovery hook failed"
                );
            }
        }
    }
    tracing::warn!(
        key = key.client_key(),
        "the operation with this key passed its commit point and left no outcome: \
         answering outcome-unknown"
    );
    let detail = "The operation with this Idempotency-Key declared its effects committed and \
                  then ended without an answer that could be kept. It will not run again with \
                  this key; do not retry it with a new key before looking its result up.";
    Unknown::Answer(problem(
        config,
        grpc,
        Problem::new(ProblemKind::OutcomeUnknown, detail),
        IdempotencyOutcome::OutcomeUnknown,
    ))
}

/// Whether `stored` is this request's fingerprint: equal, or, for a fingerprint an earlier
/// version stored (bare SHA-256, see [`crate::fingerprint`]), equal once this request is
/// fingerprinted the old way.
fn same_request(
    config: &Runtime,
    parts: &Parts,
    body: &Bytes,
    fingerprint: crate::fingerprint::Fingerprint,
    stored: &crate::fingerprint::Fingerprint,
) -> bool {
    if *stored == fingerprint || !stored.is_legacy() || fingerprint.is_legacy() {
        return *stored == fingerprint;
    }
    crate::fingerprint::legacy(|| config.fingerprint_of(parts, body)) == *stored
}

/// A store answered `Acquired` with a token other than the one the layer sent.
#[derive(Debug, thiserror::Error)]
#[error("the store acquired the key with a token other than the caller's (a contract violation)")]
struct ForeignToken;

async fn store_failed<S, ReqBody, ResBody>(
    mut inner: S,
    mut req: Request<ReqBody>,
    key: IdempotencyKey,
    config: &Runtime,
    grpc: bool,
    err: StoreError,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    match config.store_failure {
        StoreFailure::FailClosed => {
            tracing::warn!(
                key = key.as_str(),
                error = %ErrorChain(&err),
                "idempotency store failed; refusing the request"
            );
            Ok(store_unavailable(config, grpc))
        }
        StoreFailure::FailOpen => {
            tracing::warn!(
                key = key.as_str(),
                error = %ErrorChain(&err),
                "idempotency store failed; running the request without protection"
            );
            req.extensions_mut().insert(key);
            let res = inner.call(req).await?;
            Ok(mark(
                res.map(IdempotencyBody::passthrough),
                IdempotencyOutcome::Unprotected,
            ))
        }
    }
}

/// Runs the operation that owns the claim: calls the service now, and answers the future
/// of its response (recorded as it streams).
///
/// Not an `async fn`: everything before the first wait happens here, and the future is the
/// boxed operation alone, so that the flow's own future, allocated for every covered
/// request, does not hold a copy of the request and the claim.
fn run<S, ReqBody, ResBody>(
    mut inner: S,
    mut req: Request<ReqBody>,
    key: IdempotencyKey,
    claimed: Claimed,
) -> Detachable<Result<Response<IdempotencyBody<ResBody>>, S::Error>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    req.extensions_mut().insert(key);
    req.extensions_mut().insert(claimed.handle());
    let head = req.method() == http::Method::HEAD;
    let fut = inner.call(req);
    // The claim's own shared state, not another count on the layer's runtime, which every
    // worker thread's requests write.
    let shared = claimed.handle();
    let detach = claimed.config().disconnect == Disconnect::Finish;
    let work = async move {
        match fut.await {
            Ok(res) => {
                let (mut parts, body) = res.into_parts();
                if claimed.config().announce_expiry {
                    announce_expiry(claimed.config(), &mut parts, claimed.ttl());
                }
                // Boxed before it is primed (the body keeps it boxed): the operation's
                // future then holds a pointer across the wait, not the recorder.
                let mut recorder = Recorder::boxed(body, &parts, claimed, head);
                // A body complete at once leaves with its head, after its record is stored.
                recorder.prime().await;
                let res = Response::from_parts(parts, IdempotencyBody::live(recorder));
                Ok(mark(res, IdempotencyOutcome::Executed))
            }
            Err(err) => {
                // Boxed: the release is a large future on a rare path, and the whole
                // operation's future would be its size.
                boxed_cold(|| claimed.release(None)).await;
                Err(err)
            }
        }
    };
    // If the client goes away and this future is dropped, the operation goes on by itself
    // on a tracked task (unless told to stop with the client), and its response body
    // (dropped unread) is drained and stored.
    Detachable {
        fut: Some(Box::pin(work)),
        polling: false,
        detach: detach
            .then_some(finish_detached::<Result<Response<IdempotencyBody<ResBody>>, S::Error>>),
        claim: shared,
    }
}

/// A future that, dropped before it ends, finishes on a tracked task instead (when
/// `detach`; otherwise it is dropped).
///
/// A box of its own, not a part of the flow's future: that one, allocated for every covered
/// request, is 1,024 bytes, the largest size glibc's per-thread cache serves. With the
/// operation's future inside it (measured: the claim handed to the response future through
/// a thread-local slot, which went on with the whole flow) it grew to 1,728 bytes, and every
/// covered request, replays and `409`s included, took glibc's slower path: about 1,100 more
/// instructions on a replay, for one allocation fewer on a first request.
pub(crate) struct Detachable<T> {
    fut: Option<BoxFuture<T>>,
    polling: bool,
    /// Runs the operation on by itself if this is dropped before it ends (`None`: told to
    /// stop with the client). A function made where the output is known to be `Send` and
    /// `'static`, so that this type, held by the public response future, needs no bounds.
    detach: Option<fn(BoxFuture<T>, &crate::handle::IdempotencyClaim)>,
    /// The claim the operation runs under; its runtime runs the detached operation.
    claim: crate::handle::IdempotencyClaim,
}

/// Runs a dropped operation to its end on a tracked task of its claim's runtime.
fn finish_detached<T: Send + 'static>(fut: BoxFuture<T>, claim: &crate::handle::IdempotencyClaim) {
    claim.work().spawn("detached operation", async move {
        drop(fut.await);
    });
}

impl<T> Future for Detachable<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = &mut *self;
        let Some(fut) = this.fut.as_mut() else {
            panic!("Detachable polled after completion");
        };
        // Still set if the operation panics inside `poll`: then it is dropped, not detached.
        this.polling = true;
        let out = fut.as_mut().poll(cx);
        this.polling = false;
        if out.is_ready() {
            this.fut = None;
        }
        out
    }
}

impl<T> Drop for Detachable<T> {
    fn drop(&mut self) {
        if let (Some(fut), Some(detach)) = (self.fut.take(), self.detach)
            && !self.polling
        {
            detach(fut, &self.claim);
        }
    }
}
