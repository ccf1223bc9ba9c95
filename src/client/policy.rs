//! When a call is sent again: bodies that can be, what an answer says, and the retry policy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, Method, Request, Response, StatusCode};
use tower::retry::budget::{Budget, TpsBudget};

use crate::outcome::REPLAYED_HEADER;

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
pub(super) fn clone_request<B: CloneBody>(req: &Request<B>) -> Option<Request<B>> {
    Some(with_head_of(req, req.body().clone_body()?))
}

/// A request with `body` and a copy of `req`'s method, URI, version, headers and extensions.
pub(super) fn with_head_of<A, B>(req: &Request<A>, body: B) -> Request<B> {
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
pub(super) enum Verdict {
    /// The answer is final.
    Stop,
    /// Send the call again, after the server's `Retry-After` if it gave one.
    Retry(Option<Duration>),
}

/// The verdict on an answer (see [`RetryPolicy`]).
#[cfg(test)]
pub(super) fn verdict<B>(res: &Response<B>) -> Verdict {
    verdict_of(res.status(), res.headers())
}

/// The verdict on an answer's status and headers.
pub(super) fn verdict_of(status: StatusCode, headers: &http::HeaderMap) -> Verdict {
    if headers.contains_key(REPLAYED_HEADER) {
        return Verdict::Stop;
    }
    let after = retry_after(headers);
    let grpc = headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc && status == StatusCode::OK {
        // gRPC's pushback (gRFC A6) comes first: a pause in milliseconds, or, negative or
        // unreadable, "do not retry".
        let after = match headers.get("grpc-retry-pushback-ms") {
            None => after,
            Some(v) => match v.to_str().ok().and_then(|v| v.trim().parse::<i64>().ok()) {
                Some(ms) if ms >= 0 => Some(Duration::from_millis(ms.unsigned_abs())),
                _ => return Verdict::Stop,
            },
        };
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

/// `Retry-After`: in seconds (the form this crate's server sends), or an HTTP-date (RFC
/// 9110 §10.2.3; one past means now). Anything else is not read.
pub(super) fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// A [`tower::retry::Policy`] that sends a call again with the same key while its outcome is
/// not known (see the [module docs](crate::client) for what it retries and what it does not).
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
    pub(super) fn may_retry(&self, method: &Method, headers: &http::HeaderMap) -> bool {
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
    pub(super) fn after_attempt(
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
    pub(super) fn next_pause(&mut self, retry_after: Option<Duration>) -> Option<Duration> {
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
pub(super) fn random_below(max: Duration) -> Duration {
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
