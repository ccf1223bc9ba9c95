//! The buffered retry: the request body streamed to each attempt while a copy is kept.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::*;

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

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body type that [`BufferedRetry`] can send: one it can build around a
/// [`RetryBody`], the caller's body with a copy kept for retries.
///
/// Implemented for tonic's body (feature `tonic`), axum's (feature `axum`), and
/// `http-body-util`'s `BoxBody` and `UnsyncBoxBody` whose error is a boxed error (or any
/// error type made from one). A body held whole, such as `Full<Bytes>`, needs no copy: use
/// [`RetryPolicy`] with tower's `RetryLayer`.
///
/// A [`RetryBody`] fails with a boxed error: the caller's body's own, or [`AttemptGivenUp`].
/// A body type with another error type wraps it in its own, as below.
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
///         MyBody(body.map_err(std::io::Error::other).boxed_unsync())
///     }
/// }
/// ```
pub trait WrapBody: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Sized {
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

impl<E> WrapBody for http_body_util::combinators::BoxBody<Bytes, E>
where
    E: From<BoxError> + Into<BoxError> + 'static,
{
    fn wrap(body: RetryBody<Self>) -> Self {
        use http_body_util::BodyExt;
        http_body_util::combinators::BoxBody::new(body.map_err(E::from))
    }
}

impl<E> WrapBody for http_body_util::combinators::UnsyncBoxBody<Bytes, E>
where
    E: From<BoxError> + Into<BoxError> + 'static,
{
    fn wrap(body: RetryBody<Self>) -> Self {
        use http_body_util::BodyExt;
        http_body_util::combinators::UnsyncBoxBody::new(body.map_err(E::from))
    }
}

/// The error of a [`RetryBody`] whose attempt was given up while its body was still being
/// sent (the attempt's answer came first, and a later attempt sends the body now).
///
/// The transport that was sending it stops with this error: an HTTP/2 stream is reset, an
/// HTTP/1.1 connection closed, so the server sees the body fail, never a cut-off body
/// passed off as whole, and the stream or connection is not held open for a body that will
/// not come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this attempt was given up: a later attempt of the same call sends the body")]
pub struct AttemptGivenUp;

/// A request body as [`BufferedRetry`] sends it: what the caller's body yields, as it comes
/// (after the kept copy, on a retry), while a copy is kept for another attempt.
///
/// It fails with a boxed error: the caller's body's own, or [`AttemptGivenUp`] once a later
/// attempt has started (ending it instead would tell the server a cut-off body was whole).
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
pub(super) struct Tee<B> {
    source: std::pin::Pin<Box<B>>,
    /// What the source yielded, in order (while `recording`), or what the current attempt
    /// has yet to send of it (once not).
    kept: std::collections::VecDeque<Kept>,
    /// The size of `kept`.
    pub(super) kept_bytes: usize,
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
    /// The task of the current attempt's body while it waits on the source: woken when
    /// the attempt is given up, which the source will not do (it wakes the reader of the
    /// next attempt now).
    waiting: Option<std::task::Waker>,
}

/// A frame of the caller's body, kept.
#[derive(Clone)]
pub(super) enum Kept {
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
    pub(super) fn new(source: B, max: usize) -> Self {
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
            waiting: None,
        }
    }

    /// Whether another attempt can send the same body: all it yielded so far is kept.
    fn resendable(&self) -> bool {
        self.recording && !self.failed
    }

    /// The body of the next attempt; the previous attempt's is given up.
    pub(super) fn next_attempt(tee: &Arc<std::sync::Mutex<Self>>) -> RetryBody<B> {
        let mut this = lock(tee);
        this.attempt += 1;
        this.sent = 0;
        if let Some(given_up) = this.waiting.take() {
            // Whatever still sends the given-up body learns that it fails.
            given_up.wake();
        }
        RetryBody {
            tee: Arc::clone(tee),
            attempt: this.attempt,
        }
    }

    /// The call has its final answer: nothing more is kept, and the copy goes as the
    /// current attempt sends it.
    pub(super) fn finish(&mut self) {
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

pub(super) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<B> http_body::Body for RetryBody<B>
where
    B: http_body::Body<Data = Bytes, Error: Into<BoxError>>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let mut tee = lock(&self.tee);
        if tee.attempt != self.attempt {
            // Given up: a later attempt reads the body now. Failing stops whatever still
            // sends this one (a stream reset, a connection closed).
            return Poll::Ready(Some(Err(Box::new(AttemptGivenUp))));
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
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(None) => {
                tee.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                tee.waiting = Some(cx.waker().clone());
                Poll::Pending
            }
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
                // The attempt's body may have been read on meanwhile (a connection still
                // writing it after an early answer), past what is kept: then no copy of the
                // whole is left to send again, and this attempt was the one.
                if !lock(&tee).resendable() {
                    lock(&tee).finish();
                    return result;
                }
            }
        })
    }
}
