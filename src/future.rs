//! The response future of [`Idempotency`](crate::Idempotency).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderName, HeaderValue, Response};
use pin_project_lite::pin_project;

use crate::body::IdempotencyBody;
use crate::flow::{Flowed, Operation};
use crate::outcome::IdempotencyOutcome;

type Covered<B, E> = Pin<Box<dyn Future<Output = Result<Flowed<B, E>, E>> + Send + 'static>>;

/// What the answer of a flow gets once it is given (see [`observe`]).
type Observe = Option<(Echo, Option<tracing::Span>)>;

pin_project! {
    /// The response future of [`Idempotency`](crate::Idempotency).
    ///
    /// Uncovered requests poll the inner future in place, with no allocation; answers the
    /// layer gives at once are ready; covered requests, which await the store, run as one
    /// boxed future (every store call is an `async_trait` future already), and a first
    /// request's operation, which that future hands out, as another.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        state: State<F, B, E>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B, E> {
        Passthrough { #[pin] fut: F },
        Ready { res: Option<Response<IdempotencyBody<B>>> },
        Covered {
            fut: Covered<B, E>,
            // `Some` for the flow of a request with a key: its answer is observed
            // (`observe`) with this echo and tracing.
            observe: Observe,
        },
        // The operation the flow handed out, polled here (in the request's span, if
        // traced) rather than inside the flow's future.
        Running {
            operation: Operation<B, E>,
            observe: Observe,
        },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(fut: F) -> Self {
        Self {
            state: State::Passthrough { fut },
        }
    }

    pub(crate) fn ready(res: Response<IdempotencyBody<B>>) -> Self {
        Self {
            state: State::Ready { res: Some(res) },
        }
    }

    pub(crate) fn covered(fut: Covered<B, E>) -> Self {
        Self {
            state: State::Covered { fut, observe: None },
        }
    }

    /// The flow of a request with a key, whose answer gets `echo` and is traced (on
    /// `span`, the request's, when a subscriber wants it).
    pub(crate) fn observed(fut: Covered<B, E>, echo: Echo, span: Option<tracing::Span>) -> Self {
        Self {
            state: State::Covered {
                fut,
                observe: Some((echo, span)),
            },
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Passthrough { .. } => "Passthrough",
            State::Ready { .. } => "Ready",
            State::Covered { .. } => "Covered",
            State::Running { .. } => "Running",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, B, E> ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    /// Polls for the answer with its body made by `passthrough` when the inner service's
    /// body is passed through untouched, else by `wrap`: one move of the response either
    /// way, whatever the body type it ends in.
    #[inline(always)]
    pub(crate) fn poll_with<O>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        passthrough: impl FnOnce(B) -> O,
        wrap: impl FnOnce(IdempotencyBody<B>) -> O,
    ) -> Poll<Result<Response<O>, E>> {
        let mut state = self.project().state;
        let (operation, observe) = match state.as_mut().project() {
            StateProj::Passthrough { fut } => {
                let res = ready!(fut.poll(cx))?;
                return Poll::Ready(Ok(res.map(passthrough)));
            }
            StateProj::Ready { res } => {
                return Poll::Ready(Ok(res
                    .take()
                    .expect("ResponseFuture polled after completion")
                    .map(wrap)));
            }
            StateProj::Covered { fut, observe } => match ready!(fut.as_mut().poll(cx))? {
                Flowed::Answer(res) => return Poll::Ready(Ok(answered(res, observe).map(wrap))),
                // The flow is done with (its box freed); the operation runs from here on,
                // polled at once.
                Flowed::Run(operation) => (operation, observe.take()),
            },
            StateProj::Running { operation, observe } => {
                return poll_operation(operation, observe, cx).map_ok(|res| res.map(wrap));
            }
        };
        state.set(State::Running { operation, observe });
        match state.project() {
            StateProj::Running { operation, observe } => {
                poll_operation(operation, observe, cx).map_ok(|res| res.map(wrap))
            }
            _ => unreachable!("the state was set to running above"),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<IdempotencyBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_with(cx, IdempotencyBody::passthrough, |body| body)
    }
}

/// Polls the operation a flow handed out, in the request's span when it is traced, and
/// observes its answer.
fn poll_operation<B, E>(
    operation: &mut Operation<B, E>,
    observe: &mut Observe,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<IdempotencyBody<B>>, E>> {
    let span = observe.as_ref().and_then(|(_, span)| span.as_ref());
    let res = {
        let _entered = span.map(tracing::Span::enter);
        ready!(Pin::new(operation).poll(cx))?
    };
    Poll::Ready(Ok(answered(res, observe)))
}

/// A flow's answer, observed (once) if it is to be.
fn answered<B>(
    mut res: Response<IdempotencyBody<B>>,
    observe: &mut Observe,
) -> Response<IdempotencyBody<B>> {
    if let Some((echo, span)) = observe.take() {
        self::observe(&mut res, echo, span);
    }
    res
}

/// The key the layer generated, echoed on the answer (header name and value).
pub(crate) type Echo = Option<(HeaderName, HeaderValue)>;

/// What the answer of a covered request gets once the flow gives it: the generated key
/// echoed, and the outcome counted and traced (recorded on the request's span, `Some` when
/// a subscriber wants it). Done by the response future, outside the flow's boxed future,
/// which then holds the flow alone.
pub(crate) fn observe<B>(res: &mut Response<B>, echo: Echo, span: Option<tracing::Span>) {
    if let Some((name, value)) = echo {
        res.headers_mut().insert(name, value);
    }
    let Some(&outcome) = res.extensions().get::<IdempotencyOutcome>() else {
        return;
    };
    // The events below belong to the request's span, as they did inside the flow.
    let _entered = span.as_ref().map(tracing::Span::enter);
    if let Some(span) = &span {
        span.record("idempotency.outcome", outcome.as_str());
        span.record(
            "idempotency.replayed",
            matches!(
                outcome,
                IdempotencyOutcome::Replayed | IdempotencyOutcome::Recovered
            ),
        );
        span.record("http.response.status_code", res.status().as_u16());
    }
    crate::metrics::outcome(outcome);
    match outcome {
        IdempotencyOutcome::Replayed | IdempotencyOutcome::Recovered => {
            tracing::info!(status = res.status().as_u16(), "replayed the stored answer");
        }
        IdempotencyOutcome::InFlight => {
            tracing::info!("the first request with this key still runs: 409");
        }
        IdempotencyOutcome::Mismatch => {
            tracing::warn!("the key was used before with another payload: 422");
        }
        _ => {}
    }
}
