//! The [`Idempotency`] service: cover → key → scope → fingerprint → claim → run or replay.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tower_service::Service;
use tracing::Instrument;

use crate::body::{BufferError, IdempotencyBody, RebuildBody, buffer};
use crate::fingerprint::Fingerprint;
use crate::future::ResponseFuture;
use crate::key::{IdempotencyKey, KeyError, StoreKey, parse_key};
use crate::layer::Config;
use crate::lease::Registration;
use crate::policy::{Disconnect, InFlight, MissingKey, StoreFailure};
use crate::problem::{Problem, ProblemKind, is_grpc};
use crate::record::Record;
use crate::store::{Claim, IdempotencyStore, LeaseToken, StoreError};

/// The header that marks a replayed response: `Idempotent-Replayed: true`.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

/// What the layer did with a request; found in the response's extensions for every covered
/// request.
///
/// ```
/// use tower_idempotency::IdempotencyOutcome;
///
/// fn log(res: &http::Response<()>) {
///     if res.extensions().get::<IdempotencyOutcome>() == Some(&IdempotencyOutcome::Replayed) {
///         println!("served from the idempotency store");
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencyOutcome {
    /// The request was covered but had no key and keys are optional: it ran unprotected.
    PassedThrough,
    /// The operation ran for the first time.
    Executed,
    /// The stored outcome was replayed.
    Replayed,
    /// Another request with the key is in flight: `409`.
    InFlight,
    /// The key was used with another payload: `422`.
    Mismatch,
    /// The request was refused before anything ran (bad key, body too large): `400`/`413`.
    Rejected,
    /// The operation ran before but its response was too large to keep: `410`.
    NotStored,
    /// The store failed and the layer fails closed: `503`.
    StoreUnavailable,
    /// The store failed and the layer fails open: the request ran unprotected.
    Unprotected,
}

impl IdempotencyOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::PassedThrough => "passed_through",
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::InFlight => "in_flight",
            Self::Mismatch => "mismatch",
            Self::Rejected => "rejected",
            Self::NotStored => "not_stored",
            Self::StoreUnavailable => "store_unavailable",
            Self::Unprotected => "unprotected",
        }
    }
}

/// The service made by [`IdempotencyLayer`](crate::IdempotencyLayer).
///
/// Store failures and refusals become responses: the only errors it returns are those of
/// the service it wraps. It needs a Tokio runtime, on which it spawns the lease keeper and,
/// with [`Disconnect::Finish`], the rest of an operation whose client went away.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Idempotency<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + RebuildBody + Send + 'static,
    ReqBody::Error: fmt::Display,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    type Response = Response<IdempotencyBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (mut parts, body) = req.into_parts();
        let config = &self.config;
        if !config.covers(&parts) {
            return ResponseFuture::passthrough(inner.call(Request::from_parts(parts, body)));
        }
        let grpc = is_grpc(&parts.headers);
        let mut values = parts.headers.get_all(&config.header).iter();
        let (key, generated) = match (values.next(), values.next()) {
            (None, _) => match config.missing {
                MissingKey::Required => {
                    return reject(config, grpc, KeyError::Missing);
                }
                MissingKey::Optional => {
                    return ResponseFuture::covered(Box::pin(async move {
                        let res = inner.call(Request::from_parts(parts, body)).await?;
                        Ok(mark(
                            res.map(IdempotencyBody::passthrough),
                            IdempotencyOutcome::PassedThrough,
                        ))
                    }));
                }
                MissingKey::Generate => {
                    let key = IdempotencyKey::generate();
                    parts
                        .headers
                        .insert(config.header.clone(), key.to_header_value());
                    (key, true)
                }
            },
            (Some(_), Some(_)) => return reject(config, grpc, KeyError::Repeated),
            (Some(value), None) => match parse_key(value, config.parsing, config.max_key_len) {
                Ok(key) => (key, false),
                Err(err) => return reject(config, grpc, err),
            },
        };
        let span = tracing::info_span!(
            "idempotency",
            key = %key,
            outcome = tracing::field::Empty,
        );
        let fut = covered(inner, parts, body, key, Arc::clone(config), grpc, generated);
        // One allocation for the whole covered path; the span only when someone listens.
        if span.is_disabled() {
            ResponseFuture::covered(Box::pin(fut))
        } else {
            ResponseFuture::covered(Box::pin(fut.instrument(span)))
        }
    }
}

/// The covered path, with the generated key echoed and the outcome traced.
async fn covered<S, ReqBody, ResBody>(
    inner: S,
    parts: Parts,
    body: ReqBody,
    key: IdempotencyKey,
    config: Arc<Config>,
    grpc: bool,
    generated: bool,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + RebuildBody + Send + 'static,
    ReqBody::Error: fmt::Display,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let echo = generated.then(|| (config.header.clone(), key.to_header_value()));
    let mut res = flow(inner, parts, body, key, config, grpc).await?;
    if let Some((name, value)) = echo {
        res.headers_mut().insert(name, value);
    }
    if let Some(outcome) = res.extensions().get::<IdempotencyOutcome>() {
        tracing::Span::current().record("outcome", outcome.as_str());
    }
    Ok(res)
}

fn reject<F, B, E>(config: &Config, grpc: bool, err: KeyError) -> ResponseFuture<F, B, E> {
    let kind = match err {
        KeyError::Missing => ProblemKind::MissingKey,
        _ => ProblemKind::InvalidKey,
    };
    let detail = match err {
        KeyError::Missing => format!(
            "This request must carry an {} header, such as {}: \"8e03978e-40d5-43e8\".",
            config.header, config.header
        ),
        other => other.to_string(),
    };
    tracing::debug!(%detail, "idempotency key refused");
    ResponseFuture::ready(problem(
        config,
        grpc,
        Problem::new(kind, detail),
        IdempotencyOutcome::Rejected,
    ))
}

fn problem<B>(
    config: &Config,
    grpc: bool,
    problem: Problem,
    outcome: IdempotencyOutcome,
) -> Response<IdempotencyBody<B>> {
    let res = problem
        .into_response(grpc, &config.type_base, config.link)
        .map(|b| IdempotencyBody::full(b, None));
    mark(res, outcome)
}

fn mark<B>(mut res: Response<B>, outcome: IdempotencyOutcome) -> Response<B> {
    res.extensions_mut().insert(outcome);
    res
}

/// The path of a covered request with a key.
async fn flow<S, ReqBody, ResBody>(
    inner: S,
    mut parts: Parts,
    body: ReqBody,
    key: IdempotencyKey,
    config: Arc<Config>,
    grpc: bool,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + RebuildBody + Send + 'static,
    ReqBody::Error: fmt::Display,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let bytes = match buffer(body, config.max_request_body).await {
        Ok(bytes) => bytes,
        Err(BufferError::TooLarge) => {
            let detail = format!(
                "The request body is larger than {} bytes, the most this endpoint accepts.",
                config.max_request_body
            );
            return Ok(problem(
                &config,
                grpc,
                Problem::new(ProblemKind::RequestTooLarge, detail),
                IdempotencyOutcome::Rejected,
            ));
        }
        Err(BufferError::Read(err)) => {
            let detail = format!("The request body could not be read: {err}");
            return Ok(problem(
                &config,
                grpc,
                Problem::new(ProblemKind::BodyUnreadable, detail),
                IdempotencyOutcome::Rejected,
            ));
        }
    };
    let store_key = StoreKey::new(&config.scope_of(&parts), key.as_str());
    let fingerprint = config.fingerprint_of(&parts, &bytes);
    parts.extensions.insert(key);
    let req = Request::from_parts(parts, ReqBody::from_bytes(bytes));
    let store = Arc::clone(&config.store);

    let mut claim = store.claim(&store_key, &fingerprint, config.lease).await;
    let mut waited = false;
    loop {
        let found = match claim {
            Err(err) => return store_failed(inner, req, &config, grpc, err).await,
            Ok(found) => found,
        };
        match found {
            Claim::Acquired(token) => {
                let claimed = Claimed::new(Arc::clone(&config), store_key, token, fingerprint);
                return run(inner, req, claimed).await;
            }
            Claim::Completed(record) => {
                if *record.fingerprint() != fingerprint {
                    return Ok(mismatch(&config, grpc));
                }
                if record.is_tombstone() {
                    let detail = format!(
                        "The operation ran and answered {}, but its response was too large to \
                         keep for replay. It will not run again with this key.",
                        record.status()
                    );
                    return Ok(problem(
                        &config,
                        grpc,
                        Problem::new(ProblemKind::ResponseNotStored, detail),
                        IdempotencyOutcome::NotStored,
                    ));
                }
                return Ok(replay(&record));
            }
            Claim::InFlight {
                fingerprint: held,
                lease_remaining,
            } => {
                if held != fingerprint {
                    return Ok(mismatch(&config, grpc));
                }
                match config.in_flight {
                    InFlight::Wait(timeout) if !waited => {
                        waited = true;
                        claim = store
                            .wait(&store_key, &fingerprint, config.lease, timeout)
                            .await;
                        continue;
                    }
                    _ => {
                        let after = lease_remaining
                            .map_or(config.retry_after, |l| l.min(config.retry_after));
                        let detail = "A request with this Idempotency-Key is still being \
                                      processed; retry later to get its result.";
                        return Ok(problem(
                            &config,
                            grpc,
                            Problem::new(ProblemKind::KeyInUse, detail).retry_after(after),
                            IdempotencyOutcome::InFlight,
                        ));
                    }
                }
            }
        }
    }
}

fn mismatch<B>(config: &Config, grpc: bool) -> Response<IdempotencyBody<B>> {
    let detail = "This Idempotency-Key was already used with a different request payload; \
                  use a new key for a new request.";
    problem(
        config,
        grpc,
        Problem::new(ProblemKind::KeyReused, detail),
        IdempotencyOutcome::Mismatch,
    )
}

fn replay<B>(record: &Record) -> Response<IdempotencyBody<B>> {
    let mut res = Response::new(IdempotencyBody::full(
        record.body().clone(),
        record.trailers().cloned(),
    ));
    *res.status_mut() = record.status();
    *res.headers_mut() = record.headers().clone();
    res.headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    mark(res, IdempotencyOutcome::Replayed)
}

async fn store_failed<S, ReqBody, ResBody>(
    mut inner: S,
    req: Request<ReqBody>,
    config: &Config,
    grpc: bool,
    err: StoreError,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    match config.store_failure {
        StoreFailure::FailClosed => {
            tracing::error!(error = %ErrorChain(&err), "idempotency store failed; refusing request");
            Ok(problem(
                config,
                grpc,
                Problem::new(
                    ProblemKind::StoreUnavailable,
                    "The idempotency store cannot be reached; nothing was done. Retry later.",
                )
                .retry_after(config.retry_after),
                IdempotencyOutcome::StoreUnavailable,
            ))
        }
        StoreFailure::FailOpen => {
            tracing::warn!(
                error = %ErrorChain(&err),
                "idempotency store failed; running the request without protection"
            );
            let res = inner.call(req).await?;
            Ok(mark(
                res.map(IdempotencyBody::passthrough),
                IdempotencyOutcome::Unprotected,
            ))
        }
    }
}

/// Runs the operation that owns the claim.
async fn run<S, ReqBody, ResBody>(
    mut inner: S,
    req: Request<ReqBody>,
    claimed: Claimed,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let fut = inner.call(req);
    let finish = claimed.config.disconnect == Disconnect::Finish;
    let work = async move {
        match fut.await {
            Ok(res) => {
                let (parts, body) = res.into_parts();
                let recorder = Recorder::new(body, &parts, claimed);
                let res = Response::from_parts(parts, IdempotencyBody::live(recorder));
                Ok(mark(res, IdempotencyOutcome::Executed))
            }
            Err(err) => {
                claimed.release().await;
                Err(err)
            }
        }
    };
    if !finish {
        return work.await;
    }
    // If the client goes away and this future is dropped, the operation goes on by itself
    // on a spawned task, and its response body (dropped unread) is drained and stored.
    Detachable {
        fut: Some(Box::pin(work)),
        polling: false,
    }
    .await
}

/// A future that, dropped before it ends, finishes on a spawned task instead.
struct Detachable<T: Send + 'static> {
    fut: Option<BoxFuture<T>>,
    polling: bool,
}

impl<T: Send + 'static> Future for Detachable<T> {
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

impl<T: Send + 'static> Drop for Detachable<T> {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take().filter(|_| !self.polling) {
            spawn_or_warn(async move {
                drop(fut.await);
            });
        }
    }
}

/// Ownership of a claim: completes or releases it exactly once, and releases it if dropped
/// unsettled (a panic, a cancelled operation).
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
        let registration = config
            .keeper
            .register(&config.store, config.lease, &key, token);
        Self {
            config,
            key,
            token,
            fingerprint,
            registration: Some(registration),
            settled: false,
        }
    }

    fn settle(&mut self) {
        self.settled = true;
        self.registration = None;
    }

    async fn release(mut self) {
        self.settle();
        release(&self.config.store, &self.key, self.token).await;
    }

    /// Stores the outcome, retrying a failing store while the lease lasts. A key whose
    /// operation ran is never released here.
    async fn complete(mut self, record: Record) {
        let store = &self.config.store;
        let deadline = tokio::time::Instant::now() + self.config.lease;
        let mut pause = Duration::from_millis(20);
        loop {
            match store
                .complete(&self.key, self.token, record.clone(), self.config.ttl)
                .await
            {
                Ok(()) => break,
                Err(StoreError::LeaseLost) => {
                    tracing::warn!(
                        key = %self.key,
                        "idempotency lease was lost before the outcome could be stored; \
                         another request owns the key"
                    );
                    break;
                }
                Err(err) => {
                    if tokio::time::Instant::now() + pause >= deadline {
                        tracing::error!(
                            key = %self.key,
                            error = %ErrorChain(&err),
                            "could not store the idempotency record; the key stays claimed until its lease ends"
                        );
                        break;
                    }
                    tracing::warn!(key = %self.key, error = %ErrorChain(&err), "storing the idempotency record failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
        self.settle();
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.settle();
        let store = Arc::clone(&self.config.store);
        let key = self.key.clone();
        let token = self.token;
        spawn_or_warn(async move { release(&store, &key, token).await });
    }
}

async fn release(store: &Arc<dyn IdempotencyStore>, key: &StoreKey, token: LeaseToken) {
    match store.release(key, token).await {
        Ok(()) | Err(StoreError::LeaseLost) => {}
        Err(err) => tracing::warn!(
            %key,
            error = %ErrorChain(&err),
            "could not release the idempotency key; it stays claimed until its lease ends"
        ),
    }
}

fn spawn_or_warn(fut: impl Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(fut);
        }
        Err(_) => tracing::warn!(
            "no Tokio runtime to settle an idempotency claim; it ends with its lease"
        ),
    }
}

/// The live response body: streams the inner body and records a copy, then completes the
/// claim when the body ends.
pub(crate) struct Recorder<B> {
    inner: Option<Pin<Box<B>>>,
    recording: Option<Recording>,
    completing: Option<BoxFuture<()>>,
    drain: fn(Pin<Box<B>>, Recording),
}

pub(crate) struct Recording {
    claimed: Claimed,
    status: StatusCode,
    headers: HeaderMap,
    chunks: Vec<Bytes>,
    len: usize,
    overflow: bool,
    trailers: Option<HeaderMap>,
}

impl<B> Recorder<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Send,
{
    fn new(body: B, parts: &http::response::Parts, claimed: Claimed) -> Self {
        let filter = claimed.config.replay_header.clone();
        let mut headers = HeaderMap::with_capacity(parts.headers.len());
        for (name, value) in &parts.headers {
            if crate::policy::is_replayable_header(name) && filter.as_ref().is_none_or(|f| f(name))
            {
                headers.append(name.clone(), value.clone());
            }
        }
        let mut recorder = Self {
            inner: Some(Box::pin(body)),
            recording: Some(Recording {
                claimed,
                status: parts.status,
                headers,
                chunks: Vec::new(),
                len: 0,
                overflow: false,
                trailers: None,
            }),
            completing: None,
            drain: drain::<B>,
        };
        if recorder.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
            recorder.finish();
            // A gRPC response that ended at once is trailers-only: it must stay a single
            // HEADERS frame, so it is not held open while the record is stored.
            if let Some(completing) = recorder.completing.take_if(|_| is_grpc(&parts.headers)) {
                spawn_or_warn(completing);
            }
        }
        recorder
    }
}

impl<B> Recorder<B> {
    fn finish(&mut self) {
        self.inner = None;
        if let Some(recording) = self.recording.take() {
            self.completing = Some(Box::pin(recording.finish()));
        }
    }
}

fn drain<B>(inner: Pin<Box<B>>, recording: Recording)
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Send,
{
    spawn_or_warn(async move {
        let mut recorder = Recorder {
            inner: Some(inner),
            recording: Some(recording),
            completing: None,
            drain: drain::<B>,
        };
        while std::future::poll_fn(|cx| Pin::new(&mut recorder).poll_frame(cx))
            .await
            .is_some()
        {}
    });
}

impl Recording {
    fn observe(&mut self, frame: &Frame<Bytes>, limit: usize) {
        if let Some(data) = frame.data_ref() {
            if self.overflow {
                return;
            }
            self.len += data.len();
            if self.len > limit {
                self.overflow = true;
                self.chunks = Vec::new();
            } else if !data.is_empty() {
                self.chunks.push(data.clone());
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            match &mut self.trailers {
                Some(existing) => existing.extend(trailers.clone()),
                None => self.trailers = Some(trailers.clone()),
            }
        }
    }

    fn storable(&self) -> bool {
        let config = &self.claimed.config;
        if is_grpc(&self.headers) && self.status == StatusCode::OK {
            let code = self
                .trailers
                .as_ref()
                .and_then(|t| t.get("grpc-status"))
                .or_else(|| self.headers.get("grpc-status"))
                .and_then(|v| v.to_str().ok()?.trim().parse::<u32>().ok());
            return code.is_some_and(|c| (config.grpc_storable)(c));
        }
        (config.storable)(self.status)
    }

    async fn finish(self) {
        if !self.storable() {
            self.claimed.release().await;
            return;
        }
        let fingerprint = self.claimed.fingerprint;
        let record = if self.overflow {
            Record::tombstone(self.status, self.headers)
        } else {
            let body = match self.chunks.len() {
                0 => Bytes::new(),
                1 => self.chunks.into_iter().next().unwrap_or_default(),
                _ => {
                    let mut buf = BytesMut::with_capacity(self.len);
                    for chunk in &self.chunks {
                        buf.extend_from_slice(chunk);
                    }
                    buf.freeze()
                }
            };
            Record::new(self.status, self.headers, body, self.trailers)
        }
        .with_fingerprint(fingerprint);
        self.claimed.complete(record).await;
    }

    /// The body failed midway: the operation ran, but its response is broken. Keep a
    /// tombstone so that it never runs twice.
    async fn fail(self) {
        let record =
            Record::tombstone(self.status, self.headers).with_fingerprint(self.claimed.fingerprint);
        self.claimed.complete(record).await;
    }
}

impl<B> Body for Recorder<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some(completing) = &mut this.completing {
            std::task::ready!(completing.as_mut().poll(cx));
            this.completing = None;
            return Poll::Ready(None);
        }
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        match std::task::ready!(inner.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => {
                let is_trailers = frame.is_trailers();
                if let Some(recording) = &mut this.recording {
                    let limit = recording.claimed.config.max_response_body;
                    recording.observe(&frame, limit);
                }
                if is_trailers || inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(err)) => {
                this.inner = None;
                if let Some(recording) = this.recording.take() {
                    spawn_or_warn(recording.fail());
                }
                Poll::Ready(Some(Err(err)))
            }
            None => {
                this.finish();
                match &mut this.completing {
                    Some(completing) => {
                        std::task::ready!(completing.as_mut().poll(cx));
                        this.completing = None;
                        Poll::Ready(None)
                    }
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none() && self.completing.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) => inner.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

impl<B> Drop for Recorder<B> {
    fn drop(&mut self) {
        if let Some(completing) = self.completing.take() {
            spawn_or_warn(completing);
            return;
        }
        let Some(recording) = self.recording.take() else {
            return;
        };
        match (recording.claimed.config.disconnect, self.inner.take()) {
            (Disconnect::Finish, Some(inner)) => (self.drain)(inner, recording),
            // Dropping the claim releases it.
            _ => drop(recording),
        }
    }
}

/// Displays an error with its sources.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
