//! The client side (feature `client`): one key per logical call, and retries that keep it.
//!
//! A client that timed out cannot know whether its operation ran. It must send the same
//! request again **with the same key**, so that the server replays the first answer instead
//! of running the operation twice. Two pieces do that for any Tower HTTP client (hyper-util's
//! client, a tonic `Channel`, any `Service<http::Request<B>>`):
//!
//! - [`IdempotencyKeyLayer`] gives each call a fresh key (a UUID v4) unless the caller set one,
//!   and puts it in the request's extensions as an [`IdempotencyKey`], so the caller can log
//!   it or look the operation up later. The header carries it as the draft's RFC 9651
//!   sf-string (`Idempotency-Key: "8e03978e-…"`), which the server accepts whether it parses
//!   keys strictly or leniently ([`KeyParsing`](crate::KeyParsing)); a key the caller set
//!   bare is sent quoted, `"` and `\` escaped, and one no sf-string can carry (not printable
//!   ASCII, empty, repeated) fails the call with a [`KeyError`] before anything is sent;
//! - [`RetryPolicy`], a [`tower::retry::Policy`], sends the call again when its outcome is not
//!   known (a transport error, a timeout), when the key is still in use (`409` with
//!   `Retry-After`; gRPC `ABORTED`) and when the service is unavailable (`503`; gRPC
//!   `UNAVAILABLE`). It honours `Retry-After` (capped), backs off exponentially with jitter,
//!   spends from a shared budget, and stops on every other answer: `422` (the key was used with
//!   another payload), `410`, other `4xx` and `5xx`, gRPC `FAILED_PRECONDITION` and the other
//!   codes, and any replayed answer.
//!
//! The key layer goes **outside** the retry layer, so that every attempt carries the key the
//! call was given; a timeout goes inside, so that each attempt has its own:
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower::retry::RetryLayer;
//! use tower::timeout::TimeoutLayer;
//! use tower_idempotency::client::{IdempotencyKeyLayer, RetryPolicy};
//!
//! # fn wrap<S>(http_client: S) -> impl Sized
//! # where S: tower::Service<http::Request<http_body_util::Full<bytes::Bytes>>> + Clone {
//! let client = ServiceBuilder::new()
//!     .layer(IdempotencyKeyLayer::new())
//!     .layer(RetryLayer::new(RetryPolicy::new()))
//!     .layer(TimeoutLayer::new(Duration::from_secs(2)))
//!     .service(http_client);
//! # client }
//! ```
//!
//! With tower's `RetryLayer`, only requests whose body can be sent again are retried
//! ([`CloneBody`]: `Full<Bytes>`, `Empty<Bytes>`, `Bytes`, `String`, `Vec<u8>`). Any other is
//! sent once, never retried with a body that is gone. Nor is a `POST` or `PATCH` (any method
//! HTTP does not define as idempotent) that carries no key: a second attempt could run it
//! twice.
//!
//! For a streaming body (a tonic client's; any [`WrapBody`]), [`BufferedRetryLayer`] takes
//! the place of `RetryLayer`: it sends the body as it comes, never waiting for its end, so
//! client-streaming and bidirectional gRPC calls start at once, and keeps a copy of up to
//! `max_body` bytes (1 MiB) for retries. A call whose body grows past that is sent once,
//! without retries (see [`BufferedRetryLayer`]).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use tower::retry::budget::{Budget, TpsBudget};
use tower_layer::Layer;
use tower_service::Service;

use crate::key::{IdempotencyKey, KeyError};
use crate::outcome::REPLAYED_HEADER;

/// Gives each request a fresh `Idempotency-Key` unless it carries one (see the
/// [module docs](self)).
///
/// By default it covers `POST` and `PATCH` (the methods the server layer covers) and gRPC
/// calls, and uses the header `idempotency-key`.
///
/// The key is sent as an RFC 9651 sf-string, quoted, as the draft specifies, so that a server
/// with strict key parsing accepts it as well as a lenient one. A key the caller set is read
/// this way:
///
/// - a value that starts with `"` is an sf-string already (`"abc"` is the key `abc`), and
///   must be a valid one;
/// - any other value is the key's own text, sent quoted with `"` and `\` escaped: `say "hi"`
///   goes as `"say \"hi\""`, and the server reads `say "hi"`.
///
/// A key must be printable ASCII (spaces included), not empty, and set once: otherwise the
/// call fails with a [`KeyError`] (boxed in the service's `BoxError`) and is not sent, since
/// no server would accept it.
///
/// ```
/// use tower_idempotency::client::IdempotencyKeyLayer;
///
/// let layer = IdempotencyKeyLayer::new()
///     .header(http::HeaderName::from_static("x-idempotency-key"))
///     .methods([http::Method::POST, http::Method::PUT]);
/// ```
#[derive(Debug, Clone)]
pub struct IdempotencyKeyLayer {
    header: HeaderName,
    methods: Arc<[Method]>,
}

impl Default for IdempotencyKeyLayer {
    fn default() -> Self {
        Self {
            header: HeaderName::from_static("idempotency-key"),
            methods: Arc::from([Method::POST, Method::PATCH]),
        }
    }
}

impl IdempotencyKeyLayer {
    /// The layer with its defaults: header `idempotency-key`, methods `POST` and `PATCH`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The header that carries the key. Default: `idempotency-key`.
    ///
    /// ```
    /// let layer = tower_idempotency::client::IdempotencyKeyLayer::new()
    ///     .header(http::HeaderName::from_static("x-request-key"));
    /// ```
    pub fn header(mut self, header: HeaderName) -> Self {
        self.header = header;
        self
    }

    /// The methods whose requests get a key. Default: `POST` and `PATCH`. gRPC calls (all
    /// `POST`) get one as long as `POST` is listed.
    ///
    /// ```
    /// let layer = tower_idempotency::client::IdempotencyKeyLayer::new()
    ///     .methods([http::Method::POST, http::Method::PUT, http::Method::DELETE]);
    /// ```
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }
}

impl IdempotencyKeyLayer {
    /// Gives a request of a covered method its key: the caller's, if it set one (a retry of
    /// its own, across restarts), or a new one; either way the header carries it as an
    /// sf-string ([`key_header_value`]). The key also goes into `extensions`. Returns whether
    /// the method is covered, or why the caller's key cannot be sent.
    fn assign(
        &self,
        method: &Method,
        headers: &mut http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<bool, KeyError> {
        if !self.methods.contains(method) {
            return Ok(false);
        }
        let mut values = headers.get_all(&self.header).iter();
        let key = match (values.next(), values.next()) {
            (Some(_), Some(_)) => return Err(KeyError::Repeated),
            (Some(value), None) => {
                let (key, value) = key_header_value(value)?;
                headers.insert(self.header.clone(), value);
                key
            }
            (None, _) => {
                let key = IdempotencyKey::generate();
                headers.insert(self.header.clone(), key.to_header_value());
                key
            }
        };
        extensions.insert(key);
        Ok(true)
    }
}

/// The key a caller set in the header, and the header value to send for it: always an
/// RFC 9651 sf-string (`"…"`), which the server accepts under every
/// [`KeyParsing`](crate::KeyParsing), strict included.
///
/// A value that starts with `"` is taken as an sf-string already, and must be a valid one
/// ([`KeyError::NotSfString`]). Any other is the key's own text, sent quoted, with `"` and
/// `\` escaped: `say "hi"` goes as `"say \"hi\""`. A key must be printable ASCII (spaces
/// included) and not empty; no sf-string can carry another character
/// ([`KeyError::NotPrintable`]).
fn key_header_value(value: &HeaderValue) -> Result<(IdempotencyKey, HeaderValue), KeyError> {
    use crate::key::{KeyParsing, parse_key};
    let bytes = value.as_bytes();
    if bytes.first() == Some(&b'"') {
        let key = parse_key(value, KeyParsing::Strict, usize::MAX)?;
        let value = key.to_header_value();
        return Ok((key, value));
    }
    if bytes.is_empty() {
        return Err(KeyError::Empty);
    }
    if !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(KeyError::NotPrintable);
    }
    let mut quoted = Vec::with_capacity(bytes.len() + 2);
    quoted.push(b'"');
    for &b in bytes {
        if b == b'"' || b == b'\\' {
            quoted.push(b'\\');
        }
        quoted.push(b);
    }
    quoted.push(b'"');
    let quoted = HeaderValue::from_bytes(&quoted).map_err(|_| KeyError::NotPrintable)?;
    let key = parse_key(&quoted, KeyParsing::Strict, usize::MAX)?;
    Ok((key, quoted))
}

impl<S> Layer<S> for IdempotencyKeyLayer {
    type Service = SetIdempotencyKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SetIdempotencyKey {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`IdempotencyKeyLayer`]. Its errors are the inner service's, boxed, or a
/// [`KeyError`] for a key the caller set that cannot be sent.
#[derive(Debug, Clone)]
pub struct SetIdempotencyKey<S> {
    inner: S,
    layer: IdempotencyKeyLayer,
}

impl<S, B> Service<Request<B>> for SetIdempotencyKey<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = SetIdempotencyKeyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // A request lends one half of its head at a time: the extensions step out meanwhile.
        let mut extensions = std::mem::take(req.extensions_mut());
        let method = req.method().clone();
        let assigned = self
            .layer
            .assign(&method, req.headers_mut(), &mut extensions);
        *req.extensions_mut() = extensions;
        match assigned {
            Ok(_) => SetIdempotencyKeyFuture {
                sent: Some(self.inner.call(req)),
                refused: None,
            },
            Err(error) => SetIdempotencyKeyFuture {
                sent: None,
                refused: Some(error),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`SetIdempotencyKey`]: the inner service's, or a [`KeyError`] for a key
    /// the caller set that no server would accept (the request is not sent).
    #[derive(Debug)]
    pub struct SetIdempotencyKeyFuture<F> {
        #[pin]
        sent: Option<F>,
        refused: Option<KeyError>,
    }
}

impl<F, T, E> std::future::Future for SetIdempotencyKeyFuture<F>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.sent.as_pin_mut() {
            Some(future) => future.poll(cx).map_err(Into::into),
            None => Poll::Ready(Err(this.refused.take().map_or_else(
                || "polled after completion".into(),
                |e| Box::new(e) as BoxError,
            ))),
        }
    }
}

/// A request body that can be sent again for a retry.
///
/// Implemented for the bodies a client holds whole. A body that is not (a stream) cannot be
/// retried: implement this trait for it returning `None`, or buffer it first.
pub trait CloneBody: Sized {
    /// A copy of the body for another attempt, or `None` if it cannot be sent again.
    fn clone_body(&self) -> Option<Self>;
}

impl CloneBody for http_body_util::Full<Bytes> {
    fn clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl CloneBody for http_body_util::Empty<Bytes> {
    fn clone_body(&self) -> Option<Self> {
        Some(*self)
    }
}

impl CloneBody for Bytes {
    fn clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl CloneBody for String {
    fn clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl CloneBody for Vec<u8> {
    fn clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

/// A request for another attempt: the same method, URI, version, headers (the key
/// included), extensions and body; `None` if the body cannot be sent again.
fn clone_request<B: CloneBody>(req: &Request<B>) -> Option<Request<B>> {
    Some(with_head_of(req, req.body().clone_body()?))
}

/// A request with `body` and a copy of `req`'s method, URI, version, headers and extensions.
fn with_head_of<A, B>(req: &Request<A>, body: B) -> Request<B> {
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The answer is final.
    Stop,
    /// Send the call again, after the server's `Retry-After` if it gave one.
    Retry(Option<Duration>),
}

/// The verdict on an answer (see [`RetryPolicy`]).
#[cfg(test)]
fn verdict<B>(res: &Response<B>) -> Verdict {
    verdict_of(res.status(), res.headers())
}

/// The verdict on an answer's status and headers.
fn verdict_of(status: StatusCode, headers: &http::HeaderMap) -> Verdict {
    if headers.contains_key(REPLAYED_HEADER) {
        return Verdict::Stop;
    }
    let after = retry_after(headers);
    let grpc = headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc && status == StatusCode::OK {
        // A trailers-only answer carries its status in the headers; one in the trailers
        // came from a call that ran to the end, which is final.
        let code = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.trim().parse::<u32>().ok());
        return match code {
            // ABORTED (the key is in use), UNAVAILABLE.
            Some(10 | 14) => Verdict::Retry(after),
            _ => Verdict::Stop,
        };
    }
    match status {
        // The key is in use: the first attempt still runs. A `409` without `Retry-After` is
        // the application's own conflict, which is final.
        StatusCode::CONFLICT if after.is_some() => Verdict::Retry(after),
        StatusCode::SERVICE_UNAVAILABLE => Verdict::Retry(after),
        _ => Verdict::Stop,
    }
}

/// `Retry-After` in seconds (the form this crate's server sends); an HTTP date is not read.
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let secs = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_secs(secs))
}

/// A [`tower::retry::Policy`] that sends a call again with the same key while its outcome is
/// not known (see the [module docs](self) for what it retries and what it does not).
///
/// Defaults: at most 5 retries; backoff from 100 ms, doubling up to 5 s, each pause between
/// half and all of its step (jittered); `Retry-After` honoured up to 30 s; a budget of 20%
/// retries over 10 s on top of 10 retries a second, shared by the clones of one policy.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::client::RetryPolicy;
///
/// let policy = RetryPolicy::new()
///     .max_retries(8)
///     .backoff(Duration::from_millis(50), Duration::from_secs(2))
///     .max_retry_after(Duration::from_secs(10));
/// ```
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    key_header: HeaderName,
    max_retries: u32,
    first_backoff: Duration,
    max_backoff: Duration,
    max_retry_after: Duration,
    budget: Arc<TpsBudget>,
    /// Retries made so far for this call (each call gets a clone of the policy).
    retries: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            key_header: HeaderName::from_static("idempotency-key"),
            max_retries: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
            retries: 0,
        }
    }
}

impl RetryPolicy {
    /// The policy with its defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The header that carries the key. A request whose method is not idempotent by HTTP's
    /// definition (`POST`, `PATCH`, any other than `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`
    /// and `DELETE`) is retried only when it carries this header: without a key, a second
    /// attempt could run the operation twice. Default: `idempotency-key`.
    ///
    /// ```
    /// let policy = tower_idempotency::client::RetryPolicy::new()
    ///     .key_header(http::HeaderName::from_static("x-idempotency-key"));
    /// ```
    pub fn key_header(mut self, header: HeaderName) -> Self {
        self.key_header = header;
        self
    }

    /// Whether a request may be sent more than once.
    fn may_retry(&self, method: &Method, headers: &http::HeaderMap) -> bool {
        matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        ) || headers.contains_key(&self.key_header)
    }

    /// The most retries of one call. Default: 5.
    ///
    /// ```
    /// let policy = tower_idempotency::client::RetryPolicy::new().max_retries(3);
    /// ```
    pub fn max_retries(mut self, max: u32) -> Self {
        self.max_retries = max;
        self
    }

    /// The first pause and the longest one; each retry doubles the step, and the pause is
    /// taken at random between half and all of it. Default: 100 ms and 5 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// let policy = tower_idempotency::client::RetryPolicy::new()
    ///     .backoff(Duration::from_millis(20), Duration::from_secs(1));
    /// ```
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.first_backoff = crate::store::clamp_duration(first);
        self.max_backoff = crate::store::clamp_duration(max.max(first));
        self
    }

    /// The longest `Retry-After` honoured; a longer one is cut to it. Default: 30 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// let policy = tower_idempotency::client::RetryPolicy::new()
    ///     .max_retry_after(Duration::from_secs(5));
    /// ```
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = crate::store::clamp_duration(max);
        self
    }

    /// The budget retries are withdrawn from, shared by every clone of this policy (every
    /// call through one client). Default: `TpsBudget::new(10 s, 10 per second, 20%)`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::retry::budget::TpsBudget;
    /// let policy = tower_idempotency::client::RetryPolicy::new()
    ///     .budget(TpsBudget::new(Duration::from_secs(10), 2, 0.1));
    /// ```
    pub fn budget(mut self, budget: TpsBudget) -> Self {
        self.budget = Arc::new(budget);
        self
    }

    /// After an attempt that gave `answer` (a response's status and headers; `None` for an
    /// error, whose outcome is not known): the pause before the next attempt, or `None` when
    /// the answer is final or retries ran out.
    fn after_attempt(
        &mut self,
        answer: Option<(StatusCode, &http::HeaderMap)>,
    ) -> Option<Duration> {
        let after = match answer.map(|(status, headers)| verdict_of(status, headers)) {
            Some(Verdict::Stop) => {
                self.budget.deposit();
                return None;
            }
            Some(Verdict::Retry(after)) => after,
            None => None,
        };
        let pause = self.next_pause(after)?;
        tracing::debug!(
            retry = self.retries,
            pause_ms = pause.as_millis() as u64,
            "retrying with the same idempotency key"
        );
        Some(pause)
    }

    /// The pause before the next retry, or `None` when retries ran out (the count or the
    /// budget).
    fn next_pause(&mut self, retry_after: Option<Duration>) -> Option<Duration> {
        if self.retries >= self.max_retries || !self.budget.withdraw() {
            return None;
        }
        let step = self
            .first_backoff
            .saturating_mul(1u32.checked_shl(self.retries).unwrap_or(u32::MAX))
            .min(self.max_backoff);
        // Between half and all of the step: callers that failed together spread out.
        let half = step / 2;
        let backoff = half + random_below(step - half);
        let pause = match retry_after {
            Some(after) => after.min(self.max_retry_after),
            None => backoff,
        };
        self.retries += 1;
        Some(pause)
    }
}

/// A random duration below `max` (a randomly keyed hash is enough for jitter).
fn random_below(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(nanos);
    Duration::from_nanos(h.finish() % nanos)
}

impl<B, ResBody, E> tower::retry::Policy<Request<B>, Response<ResBody>, E> for RetryPolicy
where
    B: CloneBody,
{
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _req: &mut Request<B>,
        result: &mut Result<Response<ResBody>, E>,
    ) -> Option<Self::Future> {
        let answer = result
            .as_ref()
            .ok()
            .map(|res| (res.status(), res.headers()));
        self.after_attempt(answer).map(tokio::time::sleep)
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        if !self.may_retry(req.method(), req.headers()) {
            return None;
        }
        clone_request(req)
    }
}

/// Retries calls whose request body cannot be cloned: a tonic client's, or any streaming
/// body. The body is sent as it comes, never held back until it ends, while a copy of it is
/// kept (up to `max_body` bytes) for another attempt; what is retried, and when, is decided
/// as by [`RetryPolicy`].
///
/// For a tonic client, between the key layer and the channel:
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_idempotency::client::{BufferedRetryLayer, IdempotencyKeyLayer, RetryPolicy};
///
/// let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50051")
///     .timeout(Duration::from_secs(2))
///     .connect()
///     .await?;
/// let service = tower::ServiceBuilder::new()
///     .layer(IdempotencyKeyLayer::new())
///     .layer(BufferedRetryLayer::new(RetryPolicy::new()))
///     .service(channel);
/// let grpc = tonic::client::Grpc::new(service); // or a generated client's `new(service)`
/// # drop(grpc); Ok(()) }
/// ```
///
/// # Streaming calls and large bodies
///
/// Each attempt streams the request body to the inner service frame by frame, as the
/// caller produces it: a client-streaming or bidirectional gRPC call, or an upload whose
/// body has not ended, starts at once, and the server can answer before the stream ends.
/// A retry sends the kept copy again, then goes on with what the caller has not produced
/// yet.
///
/// A call is retried only while the copy holds every byte the body has yielded so far:
///
/// - a body that ended within `max_body` (a unary call, any small request) can be retried
///   after any failed attempt;
/// - so can one that the failed attempt had not read past `max_body`, even one still open
///   (a connection refused before the body was read; a stream whose first messages went
///   out before the transport failed);
/// - a body that grew past `max_body` is sent on as it comes, and the call is **not
///   retried**: its first attempt's answer or error is the call's. The copy is dropped then,
///   so a long upload or an endless stream holds at most `max_body` bytes, and nothing once
///   the answer has come.
///
/// A body that fails to be read, or yields trailers that do not fit, is not retried either.
/// The kept copy is freed once the call has its final answer.
#[derive(Debug, Clone)]
pub struct BufferedRetryLayer {
    policy: RetryPolicy,
    max_body: usize,
}

impl BufferedRetryLayer {
    /// The layer, retrying as `policy` says, keeping copies of up to 1 MiB.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            max_body: 1024 * 1024,
        }
    }

    /// The most bytes of a body kept for retries; a call whose body grows past it is sent
    /// once (see [Streaming calls and large bodies](BufferedRetryLayer#streaming-calls-and-large-bodies)).
    /// Default: 1 MiB.
    ///
    /// ```
    /// use tower_idempotency::client::{BufferedRetryLayer, RetryPolicy};
    /// let layer = BufferedRetryLayer::new(RetryPolicy::new()).max_body(64 * 1024);
    /// ```
    pub fn max_body(mut self, max: usize) -> Self {
        self.max_body = max;
        self
    }
}

impl<S> Layer<S> for BufferedRetryLayer {
    type Service = BufferedRetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferedRetry {
            inner,
            policy: self.policy.clone(),
            max_body: self.max_body,
        }
    }
}

/// The service of [`BufferedRetryLayer`].
#[derive(Debug, Clone)]
pub struct BufferedRetry<S> {
    inner: S,
    policy: RetryPolicy,
    max_body: usize,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body type that [`BufferedRetry`] can send: one it can build around a
/// [`RetryBody`], the caller's body with a copy kept for retries.
///
/// Implemented for tonic's body (feature `tonic`), axum's (feature `axum`), and
/// `http-body-util`'s `BoxBody` and `UnsyncBoxBody`. A body held whole, such as
/// `Full<Bytes>`, needs no copy: use [`RetryPolicy`] with tower's `RetryLayer`.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::BodyExt;
/// use http_body_util::combinators::UnsyncBoxBody;
/// use tower_idempotency::client::{RetryBody, WrapBody};
///
/// struct MyBody(UnsyncBoxBody<Bytes, std::io::Error>);
/// # impl http_body::Body for MyBody {
/// #     type Data = Bytes;
/// #     type Error = std::io::Error;
/// #     fn poll_frame(
/// #         mut self: std::pin::Pin<&mut Self>,
/// #         cx: &mut std::task::Context<'_>,
/// #     ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
/// #         std::pin::Pin::new(&mut self.0).poll_frame(cx)
/// #     }
/// # }
///
/// impl WrapBody for MyBody {
///     fn wrap(body: RetryBody<Self>) -> Self {
///         MyBody(body.boxed_unsync())
///     }
/// }
/// ```
pub trait WrapBody: http_body::Body<Data = Bytes> + Sized {
    /// A body of this type yielding what `body` yields.
    fn wrap(body: RetryBody<Self>) -> Self;
}

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl WrapBody for tonic::body::Body {
    fn wrap(body: RetryBody<Self>) -> Self {
        tonic::body::Body::new(body)
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl WrapBody for axum_core::body::Body {
    fn wrap(body: RetryBody<Self>) -> Self {
        axum_core::body::Body::new(body)
    }
}

impl<E: 'static> WrapBody for http_body_util::combinators::BoxBody<Bytes, E> {
    fn wrap(body: RetryBody<Self>) -> Self {
        http_body_util::combinators::BoxBody::new(body)
    }
}

impl<E: 'static> WrapBody for http_body_util::combinators::UnsyncBoxBody<Bytes, E> {
    fn wrap(body: RetryBody<Self>) -> Self {
        http_body_util::combinators::UnsyncBoxBody::new(body)
    }
}

/// A request body as [`BufferedRetry`] sends it: what the caller's body yields, as it comes
/// (after the kept copy, on a retry), while a copy is kept for another attempt.
///
/// The body of an attempt that was given up (a later attempt has started) yields nothing
/// more and never ends: ending it would tell the server a cut-off body was whole.
pub struct RetryBody<B> {
    tee: Arc<std::sync::Mutex<Tee<B>>>,
    attempt: u64,
}

impl<B> fmt::Debug for RetryBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBody")
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// The caller's body, shared by the attempts of one call, and the copy of what it yielded.
struct Tee<B> {
    source: std::pin::Pin<Box<B>>,
    /// What the source yielded, in order (while `recording`), or what the current attempt
    /// has yet to send of it (once not).
    kept: std::collections::VecDeque<Kept>,
    /// The size of `kept`.
    kept_bytes: usize,
    max: usize,
    /// How many of `kept` the current attempt has sent (0 once not `recording`).
    sent: usize,
    /// The attempt whose body may read; the bodies of earlier ones are given up.
    attempt: u64,
    /// Whether what the source yields is kept: until the copy outgrows `max`, or the call
    /// has its final answer.
    recording: bool,
    ended: bool,
    failed: bool,
}

/// A frame of the caller's body, kept.
#[derive(Clone)]
enum Kept {
    Data(Bytes),
    Trailers(http::HeaderMap),
}

impl Kept {
    fn len(&self) -> usize {
        match self {
            Self::Data(data) => data.len(),
            Self::Trailers(trailers) => trailers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len())
                .sum(),
        }
    }

    fn into_frame(self) -> http_body::Frame<Bytes> {
        match self {
            Self::Data(data) => http_body::Frame::data(data),
            Self::Trailers(trailers) => http_body::Frame::trailers(trailers),
        }
    }
}

impl<B> Tee<B> {
    fn new(source: B, max: usize) -> Self {
        Self {
            source: Box::pin(source),
            kept: std::collections::VecDeque::new(),
            kept_bytes: 0,
            max,
            sent: 0,
            attempt: 0,
            recording: true,
            ended: false,
            failed: false,
        }
    }

    /// Whether another attempt can send the same body: all it yielded so far is kept.
    fn resendable(&self) -> bool {
        self.recording && !self.failed
    }

    /// The body of the next attempt; the previous attempt's is given up.
    fn next_attempt(tee: &Arc<std::sync::Mutex<Self>>) -> RetryBody<B> {
        let mut this = lock(tee);
        this.attempt += 1;
        this.sent = 0;
        RetryBody {
            tee: Arc::clone(tee),
            attempt: this.attempt,
        }
    }

    /// The call has its final answer: nothing more is kept, and the copy goes as the
    /// current attempt sends it.
    fn finish(&mut self) {
        self.recording = false;
        let sent = std::mem::take(&mut self.sent);
        for kept in self.kept.drain(..sent) {
            self.kept_bytes -= kept.len();
        }
    }

    fn keep(&mut self, frame: &http_body::Frame<Bytes>) {
        if !self.recording {
            return;
        }
        let kept = if let Some(data) = frame.data_ref() {
            Kept::Data(data.clone())
        } else if let Some(trailers) = frame.trailers_ref() {
            Kept::Trailers(trailers.clone())
        } else {
            // A kind of frame this crate does not know cannot be sent again.
            self.overflow();
            return;
        };
        if self.kept_bytes.saturating_add(kept.len()) > self.max {
            self.overflow();
            return;
        }
        self.kept_bytes += kept.len();
        self.kept.push_back(kept);
        self.sent += 1;
    }

    /// The copy cannot be whole: it goes, and the call will not be retried.
    fn overflow(&mut self) {
        // The current attempt reads from the source only once it sent all of the copy.
        self.recording = false;
        self.kept.clear();
        self.kept_bytes = 0;
        self.sent = 0;
    }

    /// Whether the source will yield nothing more.
    fn source_done(&self) -> bool
    where
        B: http_body::Body,
    {
        self.ended || self.failed || self.source.is_end_stream()
    }

    /// What the current attempt has yet to send of the copy.
    fn unsent(&self) -> impl Iterator<Item = &Kept> {
        self.kept.iter().skip(self.sent)
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<B> http_body::Body for RetryBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let mut tee = lock(&self.tee);
        if tee.attempt != self.attempt {
            // Given up: a later attempt reads the body now.
            return Poll::Pending;
        }
        if tee.recording {
            if let Some(kept) = tee.kept.get(tee.sent).cloned() {
                tee.sent += 1;
                return Poll::Ready(Some(Ok(kept.into_frame())));
            }
        } else if let Some(kept) = tee.kept.pop_front() {
            tee.kept_bytes -= kept.len();
            return Poll::Ready(Some(Ok(kept.into_frame())));
        }
        if tee.ended || tee.failed {
            return Poll::Ready(None);
        }
        match tee.source.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                tee.keep(&frame);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                tee.failed = true;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                tee.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        let tee = lock(&self.tee);
        tee.attempt == self.attempt && tee.source_done() && tee.unsent().next().is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let tee = lock(&self.tee);
        if tee.attempt != self.attempt {
            return http_body::SizeHint::default();
        }
        let unsent = tee.unsent().map(|kept| kept.len() as u64).sum::<u64>();
        if tee.source_done() {
            return http_body::SizeHint::with_exact(unsent);
        }
        let rest = tee.source.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(unsent));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(unsent));
        }
        hint
    }
}

impl<S, B, ResBody> Service<Request<B>> for BufferedRetry<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send,
    B: WrapBody + Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<ResBody>, BoxError>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each attempt waits for the inner service to be ready (a retry may come much
        // later than this call).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let mut inner = self.inner.clone();
        let mut policy = self.policy.clone();
        let max = self.max_body;
        Box::pin(async move {
            if !policy.may_retry(req.method(), req.headers()) {
                // Not safe to send twice without a key: once, as it is.
                return tower::ServiceExt::ready(&mut inner)
                    .await
                    .map_err(Into::into)?
                    .call(req)
                    .await
                    .map_err(Into::into);
            }
            let (parts, body) = req.into_parts();
            let tee = Arc::new(std::sync::Mutex::new(Tee::new(body, max)));
            let head = Request::from_parts(parts, ());
            loop {
                let attempt = with_head_of(&head, B::wrap(Tee::next_attempt(&tee)));
                let result = match tower::ServiceExt::ready(&mut inner).await {
                    Ok(ready) => ready.call(attempt).await.map_err(Into::into),
                    Err(err) => Err(err.into()),
                };
                let pause = if lock(&tee).resendable() {
                    let answer = result
                        .as_ref()
                        .ok()
                        .map(|res| (res.status(), res.headers()));
                    policy.after_attempt(answer)
                } else {
                    // The body grew past what is kept, or failed: this attempt was the one.
                    None
                };
                let Some(pause) = pause else {
                    lock(&tee).finish();
                    return result;
                };
                tokio::time::sleep(pause).await;
            }
        })
    }
}

/// The client side for [reqwest](https://docs.rs/reqwest), through
/// [reqwest-middleware](https://docs.rs/reqwest-middleware) (feature `reqwest`).
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest {
    use http::{HeaderName, Method};

    use super::{IdempotencyKeyLayer, RetryPolicy};

    /// A reqwest middleware that gives each call one key (or keeps the caller's) and sends it
    /// again with that key while its outcome is not known, as [`RetryPolicy`] decides.
    ///
    /// Keys go as sf-strings, as [`IdempotencyKeyLayer`] sends them; a caller's key that
    /// cannot be sent fails the call with a middleware error holding the
    /// [`KeyError`](crate::KeyError).
    ///
    /// A request whose body cannot be cloned (a stream) is sent once.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower_idempotency::client::RetryPolicy;
    /// use tower_idempotency::client::reqwest::IdempotencyMiddleware;
    ///
    /// let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    /// let client = reqwest_middleware::ClientBuilder::new(http)
    ///     .with(IdempotencyMiddleware::new(RetryPolicy::new()))
    ///     .build();
    /// let answer = client
    ///     .post("http://127.0.0.1:3000/orders")
    ///     .header("content-type", "application/json")
    ///     .body(r#"{"item":"book","amount":12}"#)
    ///     .send()
    ///     .await?;
    /// # drop(answer); Ok(()) }
    /// ```
    #[derive(Debug, Clone)]
    pub struct IdempotencyMiddleware {
        keys: IdempotencyKeyLayer,
        policy: RetryPolicy,
    }

    impl IdempotencyMiddleware {
        /// The middleware, retrying as `policy` says; keys go in `idempotency-key` on `POST`
        /// and `PATCH` requests.
        pub fn new(policy: RetryPolicy) -> Self {
            Self {
                keys: IdempotencyKeyLayer::new(),
                policy,
            }
        }

        /// The header that carries the key. Default: `idempotency-key`.
        ///
        /// ```
        /// use tower_idempotency::client::{RetryPolicy, reqwest::IdempotencyMiddleware};
        /// let m = IdempotencyMiddleware::new(RetryPolicy::new())
        ///     .header(http::HeaderName::from_static("x-idempotency-key"));
        /// ```
        pub fn header(mut self, header: HeaderName) -> Self {
            self.policy = self.policy.key_header(header.clone());
            self.keys = self.keys.header(header);
            self
        }

        /// The methods whose requests get a key and are retried. Default: `POST` and `PATCH`.
        ///
        /// ```
        /// use tower_idempotency::client::{RetryPolicy, reqwest::IdempotencyMiddleware};
        /// let m = IdempotencyMiddleware::new(RetryPolicy::new())
        ///     .methods([http::Method::POST, http::Method::PUT]);
        /// ```
        pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
            self.keys = self.keys.methods(methods);
            self
        }
    }

    #[async_trait::async_trait]
    impl reqwest_middleware::Middleware for IdempotencyMiddleware {
        async fn handle(
            &self,
            mut req: ::reqwest::Request,
            extensions: &mut http::Extensions,
            next: reqwest_middleware::Next<'_>,
        ) -> reqwest_middleware::Result<::reqwest::Response> {
            let method = req.method().clone();
            match self.keys.assign(&method, req.headers_mut(), extensions) {
                Ok(true) => {}
                Ok(false) => return next.run(req, extensions).await,
                // A key the caller set that no server would accept: not sent.
                Err(refused) => return Err(reqwest_middleware::Error::middleware(refused)),
            }
            let mut policy = self.policy.clone();
            loop {
                // A body that cannot be sent again (a stream) is sent once.
                let Some(attempt) = req.try_clone() else {
                    return next.run(req, extensions).await;
                };
                let result = next.clone().run(attempt, extensions).await;
                // A request that could not be built, or a redirect loop, is final.
                if let Err(reqwest_middleware::Error::Reqwest(err)) = &result
                    && (err.is_builder() || err.is_redirect())
                {
                    return result;
                }
                let answer = result
                    .as_ref()
                    .ok()
                    .map(|res| (res.status(), res.headers()));
                let Some(pause) = policy.after_attempt(answer) else {
                    return result;
                };
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    fn answer(status: u16, headers: &[(&str, &str)]) -> Response<()> {
        let mut res = Response::builder().status(status);
        for (name, value) in headers {
            res = res.header(*name, *value);
        }
        res.body(()).unwrap()
    }

    #[test]
    fn verdicts() {
        let retry_in = |s| Verdict::Retry(Some(Duration::from_secs(s)));
        assert_eq!(verdict(&answer(409, &[("retry-after", "2")])), retry_in(2));
        assert_eq!(
            verdict(&answer(409, &[])),
            Verdict::Stop,
            "an app's own conflict"
        );
        assert_eq!(verdict(&answer(503, &[])), Verdict::Retry(None));
        assert_eq!(verdict(&answer(503, &[("retry-after", "7")])), retry_in(7));
        for status in [200, 201, 400, 404, 410, 413, 422, 429, 500, 502] {
            assert_eq!(verdict(&answer(status, &[])), Verdict::Stop, "{status}");
        }
        let replayed = answer(503, &[(REPLAYED_HEADER.as_str(), "true")]);
        assert_eq!(
            verdict(&replayed),
            Verdict::Stop,
            "a replayed answer is final"
        );
        let grpc = |code: &str| {
            answer(
                200,
                &[("content-type", "application/grpc"), ("grpc-status", code)],
            )
        };
        assert_eq!(verdict(&grpc("10")), Verdict::Retry(None), "ABORTED");
        assert_eq!(verdict(&grpc("14")), Verdict::Retry(None), "UNAVAILABLE");
        for code in ["0", "2", "3", "9", "13"] {
            assert_eq!(verdict(&grpc(code)), Verdict::Stop, "{code}");
        }
        let streamed = answer(200, &[("content-type", "application/grpc")]);
        assert_eq!(verdict(&streamed), Verdict::Stop);
        assert_eq!(
            verdict(&answer(409, &[("retry-after", "soon")])),
            Verdict::Stop
        );
    }

    #[test]
    fn pauses_grow_are_capped_and_run_out() {
        let mut policy = RetryPolicy::new()
            .max_retries(4)
            .backoff(Duration::from_millis(100), Duration::from_millis(300))
            .max_retry_after(Duration::from_secs(1));
        let steps = [100, 200, 300];
        for step in steps {
            let pause = policy.next_pause(None).unwrap();
            let step = Duration::from_millis(step);
            assert!(pause >= step / 2 && pause <= step, "{pause:?} for {step:?}");
        }
        assert_eq!(
            policy.next_pause(Some(Duration::from_secs(60))),
            Some(Duration::from_secs(1)),
            "Retry-After is capped"
        );
        assert_eq!(policy.next_pause(None), None, "four retries at most");
    }

    #[test]
    fn requests_without_a_key_are_retried_only_when_idempotent() {
        let mut policy = RetryPolicy::new();
        let req = |method: Method, key: bool| {
            let mut b = Request::builder().method(method).uri("/orders");
            if key {
                b = b.header("idempotency-key", "k");
            }
            b.body(Bytes::new()).unwrap()
        };
        type P =
            dyn tower::retry::Policy<Request<Bytes>, Response<()>, (), Future = tokio::time::Sleep>;
        let policy: &mut P = &mut policy;
        assert!(policy.clone_request(&req(Method::POST, false)).is_none());
        assert!(policy.clone_request(&req(Method::PATCH, false)).is_none());
        assert!(policy.clone_request(&req(Method::POST, true)).is_some());
        for method in [Method::GET, Method::PUT, Method::DELETE, Method::HEAD] {
            assert!(policy.clone_request(&req(method, false)).is_some());
        }
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let mut policy = RetryPolicy::new();
        let mut pauses = Vec::new();
        while let Some(pause) = policy.next_pause(None) {
            pauses.push(pause);
        }
        assert_eq!(pauses.len(), 5, "five retries");
        assert!(pauses[0] >= Duration::from_millis(50) && pauses[0] <= Duration::from_millis(100));
        assert!(pauses[4] <= Duration::from_secs(5));
        let mut policy = RetryPolicy::new();
        assert_eq!(
            policy.next_pause(Some(Duration::from_secs(120))),
            Some(Duration::from_secs(30)),
            "Retry-After is honoured up to 30 s"
        );
    }

    #[test]
    fn an_empty_budget_stops_retries() {
        let mut policy = RetryPolicy::new().budget(TpsBudget::new(Duration::from_secs(1), 0, 0.0));
        assert_eq!(policy.next_pause(None), None);
    }

    #[test]
    fn keys_go_as_sf_strings_every_parsing_mode_reads_back() {
        use crate::key::{KeyParsing, parse_key};
        for (set, key, sent) in [
            ("k1", "k1", r#""k1""#),
            (r#""k1""#, "k1", r#""k1""#),
            (r#"say "hi""#, r#"say "hi""#, r#""say \"hi\"""#),
            (r"a\b", r"a\b", r#""a\\b""#),
            (r#""a\"b""#, r#"a"b"#, r#""a\"b""#),
            ("two words", "two words", r#""two words""#),
        ] {
            let (parsed, value) = key_header_value(&HeaderValue::from_static(set)).unwrap();
            assert_eq!(
                (parsed.as_str(), value.to_str().unwrap()),
                (key, sent),
                "{set}"
            );
            for parsing in [KeyParsing::Strict, KeyParsing::Lenient] {
                assert_eq!(parse_key(&value, parsing, 255).unwrap().as_str(), key);
            }
        }
        for (set, why) in [
            (&b""[..], KeyError::Empty),
            (b"tab\there", KeyError::NotPrintable),
            ("clé".as_bytes(), KeyError::NotPrintable),
            (br#""unclosed"#, KeyError::NotSfString),
            (br#""""#, KeyError::Empty),
        ] {
            let value = HeaderValue::from_bytes(set).unwrap();
            assert_eq!(key_header_value(&value).unwrap_err(), why, "{value:?}");
        }
        let layer = IdempotencyKeyLayer::new();
        let mut headers = http::HeaderMap::new();
        headers.append("idempotency-key", HeaderValue::from_static("a"));
        headers.append("idempotency-key", HeaderValue::from_static("b"));
        let refused = layer.assign(&Method::POST, &mut headers, &mut http::Extensions::new());
        assert_eq!(refused, Err(KeyError::Repeated));
        let mut headers = http::HeaderMap::new();
        let mut extensions = http::Extensions::new();
        assert_eq!(
            layer.assign(&Method::POST, &mut headers, &mut extensions),
            Ok(true)
        );
        let made = extensions.get::<IdempotencyKey>().unwrap();
        assert_eq!(headers["idempotency-key"], format!("\"{made}\""));
    }

    /// A request body fed by a channel: it ends when the sender goes.
    struct Fed(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl http_body::Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|data| Ok(http_body::Frame::data(data))))
        }
    }

    type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;

    /// What one attempt of the scripted service does: read `frames` frames of the body (all
    /// of it if `None`), then answer `status`, or fail if it is `None`.
    #[derive(Clone, Copy)]
    struct Step {
        frames: Option<usize>,
        status: Option<u16>,
    }

    /// What each attempt of a [`scripted`] service read.
    type Reads = Arc<std::sync::Mutex<Vec<Vec<Bytes>>>>;

    /// A service that follows `steps`, one per attempt, and records what each attempt read.
    fn scripted(
        steps: &[Step],
    ) -> (
        impl Service<Request<Body>, Response = Response<()>, Error = BoxError, Future: Send>
        + Clone
        + Send
        + 'static,
        Reads,
    ) {
        use http_body_util::BodyExt;
        let steps = Arc::new(std::sync::Mutex::new(steps.to_vec()));
        let read = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&read);
        let service = tower::service_fn(move |req: Request<Body>| {
            let step = steps.lock().unwrap().remove(0);
            let read = Arc::clone(&read);
            async move {
                let mut body = req.into_body();
                let mut got = Vec::new();
                while step.frames.is_none_or(|n| got.len() < n) {
                    match body.frame().await {
                        Some(frame) => got.push(frame.unwrap().into_data().unwrap()),
                        None => break,
                    }
                }
                read.lock().unwrap().push(got);
                match step.status {
                    Some(status) => Ok(Response::builder().status(status).body(()).unwrap()),
                    None => Err(BoxError::from("connection reset")),
                }
            }
        });
        (service, seen)
    }

    fn quick() -> RetryPolicy {
        RetryPolicy::new().backoff(Duration::from_millis(1), Duration::from_millis(1))
    }

    fn keyed(body: Body) -> Request<Body> {
        Request::post("/up")
            .header("idempotency-key", "\"k\"")
            .body(body)
            .unwrap()
    }

    const FAIL: Step = Step {
        frames: None,
        status: None,
    };
    const OK: Step = Step {
        frames: None,
        status: Some(200),
    };

    #[tokio::test]
    async fn a_body_that_ended_within_the_bound_is_sent_again() {
        use http_body_util::BodyExt;
        let (inner, read) = scripted(&[FAIL, OK]);
        let body = http_body_util::Full::new(Bytes::from_static(b"abc")).boxed_unsync();
        let res = BufferedRetryLayer::new(quick())
            .layer(inner)
            .oneshot(keyed(body))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(*read.lock().unwrap(), vec![vec![Bytes::from("abc")]; 2]);
    }

    #[tokio::test]
    async fn an_attempt_that_failed_before_reading_the_body_is_retried_with_all_of_it() {
        let untouched = Step {
            frames: Some(0),
            status: None,
        };
        let (inner, read) = scripted(&[untouched, OK]);
        let (feed, rx) = tokio::sync::mpsc::unbounded_channel();
        feed.send(Bytes::from("a")).unwrap();
        let call = tokio::spawn(
            BufferedRetryLayer::new(quick())
                .layer(inner)
                .oneshot(keyed(Body::new(Fed(rx)))),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        feed.send(Bytes::from("b")).unwrap();
        drop(feed);
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
        let read = read.lock().unwrap();
        assert_eq!(*read, [vec![], vec![Bytes::from("a"), Bytes::from("b")]]);
    }

    #[tokio::test]
    async fn an_open_stream_is_sent_at_once_and_resent_from_its_copy() {
        // The first attempt reads one frame and fails while the stream is open; the retry
        // sends that frame again, then the rest as it comes.
        let first_frame = Step {
            frames: Some(1),
            status: None,
        };
        let (inner, read) = scripted(&[first_frame, OK]);
        let (feed, rx) = tokio::sync::mpsc::unbounded_channel();
        feed.send(Bytes::from("a")).unwrap();
        let call = tokio::spawn(
            BufferedRetryLayer::new(quick())
                .layer(inner)
                .oneshot(keyed(Body::new(Fed(rx)))),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(read.lock().unwrap().len(), 1, "the first attempt ran");
        feed.send(Bytes::from("b")).unwrap();
        drop(feed);
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
        let read = read.lock().unwrap();
        assert_eq!(
            *read,
            [
                vec![Bytes::from("a")],
                vec![Bytes::from("a"), Bytes::from("b")]
            ]
        );
    }

    #[tokio::test]
    async fn a_body_past_the_bound_is_sent_once() {
        use http_body_util::BodyExt;
        // Retryable answers, but the body outgrew the copy: the first answer is the call's.
        for first in [
            FAIL,
            Step {
                frames: None,
                status: Some(503),
            },
        ] {
            let (inner, read) = scripted(&[first, OK]);
            let (feed, rx) = tokio::sync::mpsc::unbounded_channel();
            for chunk in ["abc", "def"] {
                feed.send(Bytes::from(chunk)).unwrap();
            }
            drop(feed);
            let result = BufferedRetryLayer::new(quick())
                .max_body(4)
                .layer(inner)
                .oneshot(keyed(Fed(rx).boxed_unsync()))
                .await;
            match first.status {
                Some(status) => assert_eq!(result.unwrap().status(), status),
                None => assert!(result.is_err()),
            }
            assert_eq!(read.lock().unwrap().len(), 1, "one attempt");
        }
    }

    #[test]
    fn the_copy_goes_with_the_final_answer() {
        use http_body::Body as _;
        let tee_ = Arc::new(std::sync::Mutex::new(Tee::new(
            http_body_util::Full::new(Bytes::from_static(b"abc")),
            10,
        )));
        let mut body = Tee::next_attempt(&tee_);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert_eq!(body.size_hint().exact(), Some(3));
        let frame = std::pin::Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(frame, Poll::Ready(Some(Ok(_)))));
        assert!(body.is_end_stream(), "Full tells it ended");
        assert_eq!(lock(&tee_).kept_bytes, 3);
        // A retry resends the copy, exactly.
        let mut again = Tee::next_attempt(&tee_);
        assert!(
            std::pin::Pin::new(&mut body)
                .poll_frame(&mut cx)
                .is_pending(),
            "given up"
        );
        assert_eq!(again.size_hint().exact(), Some(3));
        let frame = std::pin::Pin::new(&mut again).poll_frame(&mut cx);
        let Poll::Ready(Some(Ok(frame))) = frame else {
            panic!("the copy")
        };
        assert_eq!(frame.into_data().unwrap(), "abc");
        lock(&tee_).finish();
        assert_eq!(lock(&tee_).kept_bytes, 0, "the copy is freed");
        assert!(again.is_end_stream());
    }

    #[test]
    fn requests_are_copied_whole_or_not_at_all() {
        let req = Request::post("/orders")
            .header("idempotency-key", "k1")
            .body(http_body_util::Full::new(Bytes::from("{}")))
            .unwrap();
        let copy = clone_request(&req).unwrap();
        assert_eq!(copy.method(), Method::POST);
        assert_eq!(copy.uri(), "/orders");
        assert_eq!(copy.headers()["idempotency-key"], "k1");

        struct Stream;
        impl CloneBody for Stream {
            fn clone_body(&self) -> Option<Self> {
                None
            }
        }
        assert!(clone_request(&Request::new(Stream)).is_none());
    }
}
