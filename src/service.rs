//! The [`Idempotency`] service: cover → key, then hands over to the covered path
//! ([`crate::flow`]).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use crate::answer::problem;
use crate::body::{IdempotencyBody, RebuildBody};
use crate::flow::{Flowed, flow, in_box};
use crate::future::ResponseFuture;
use crate::key::{IdempotencyKey, KeyError, parse_key};
use crate::outcome::{IdempotencyOutcome, mark};
use crate::policy::MissingKey;
use crate::problem::{Problem, ProblemKind, is_grpc};
use crate::runtime::Runtime;

/// The service made by [`IdempotencyLayer`](crate::IdempotencyLayer).
///
/// Store failures and refusals become responses: the only errors it returns are those of
/// the service it wraps. It needs a Tokio runtime, on which it spawns the lease keeper and
/// the work that outlives a response future (see
/// [`DetachedWork`](crate::DetachedWork)).
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    config: Arc<Runtime>,
}

impl<S: fmt::Debug> fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Idempotency<S> {
    pub(crate) fn with_config(inner: S, config: Arc<Runtime>) -> Self {
        Self { inner, config }
    }

    /// Wraps `inner` with the settings of `layer` (the same as `layer.layer(inner)`).
    ///
    /// ```
    /// use tower_idempotency::{Idempotency, IdempotencyLayer};
    ///
    /// let layer = IdempotencyLayer::default().share_keys_across_callers();
    /// let svc = Idempotency::new(
    ///     tower::service_fn(|_req: http::Request<String>| async {
    ///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    ///     }),
    ///     &layer,
    /// );
    /// ```
    pub fn new(inner: S, layer: &crate::IdempotencyLayer) -> Self {
        tower_layer::Layer::layer(layer, inner)
    }

    /// A layer on `store` with every default, as [`IdempotencyLayer::new`](crate::IdempotencyLayer::new).
    ///
    /// ```
    /// use tower_idempotency::{Idempotency, MemoryStore};
    ///
    /// let layer = Idempotency::<()>::layer(MemoryStore::new()).share_keys_across_callers();
    /// ```
    pub fn layer(store: impl crate::IdempotencyStore) -> crate::IdempotencyLayer {
        crate::IdempotencyLayer::new(store)
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + RebuildBody + Send + 'static,
    ReqBody::Error: Into<crate::body::BoxError>,
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
        let config = &self.config;
        // An uncovered request goes straight to the ready service: no clone, no split.
        let (known, grpc) = config.covers_by_method(req.method(), req.uri(), req.headers());
        if known == Some(false) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let (mut parts, body) = req.into_parts();
        if known.is_none() && !config.covers(&parts) {
            return ResponseFuture::passthrough(self.inner.call(Request::from_parts(parts, body)));
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let grpc = grpc.unwrap_or_else(|| is_grpc(&parts.headers));
        let (key, generated) = if config.key_pointer.is_some() {
            // The key is in the body: the flow reads it once the body is buffered.
            (None, false)
        } else {
            let mut values = parts.headers.get_all(&config.header).iter();
            let (key, generated) = match (values.next(), values.next()) {
                (None, _) => match config.missing {
                    MissingKey::Required => {
                        return reject(config, grpc, KeyError::Missing);
                    }
                    MissingKey::Optional => {
                        return ResponseFuture::covered(Box::pin(async move {
                            let res = inner.call(Request::from_parts(parts, body)).await?;
                            crate::metrics::outcome(IdempotencyOutcome::PassedThrough);
                            Ok(Flowed::Answer(mark(
                                res.map(IdempotencyBody::passthrough),
                                IdempotencyOutcome::PassedThrough,
                            )))
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
            (Some(key), generated)
        };
        // Attributes named after OpenTelemetry's HTTP conventions where they fit.
        // No attribute holds the client's key or scope: a hash of the store key stands for
        // them (README, "Observability").
        // No span at all while no subscriber takes spans of this level: a disabled span
        // still costs its making and its drop (and with tracing's `log` feature, which axum's
        // default features turn on, each is offered to `log` as well).
        let span = if !tracing::level_enabled!(tracing::Level::INFO) {
            tracing::Span::none()
        } else {
            tracing::info_span!(
            "idempotency",
            "idempotency.key_hash" = tracing::field::Empty,
            "idempotency.outcome" = tracing::field::Empty,
            "idempotency.replayed" = tracing::field::Empty,
            "idempotency.store" = config.store.backend_name(),
            "idempotency.store.claim_ms" = tracing::field::Empty,
            "idempotency.lease_lost" = tracing::field::Empty,
            "http.request.method" = %parts.method,
            "url.path" = parts.uri.path(),
            "http.response.status_code" = tracing::field::Empty,
            )
        };
        let traced = !span.is_disabled();
        let echo = key
            .as_ref()
            .filter(|_| generated)
            .map(|key| (config.header.clone(), key.to_header_value()));
        let config = Arc::clone(config);
        // One allocation for the whole covered path; the span only when someone listens.
        if !traced {
            let fut = Box::into_pin(in_box(|| {
                flow(inner, parts, body, key, config, grpc, false)
            }));
            ResponseFuture::observed(fut, echo, None)
        } else {
            let observed = Some(span.clone());
            let fut = flow(inner, parts, body, key, config, grpc, true);
            ResponseFuture::observed(Box::pin(fut.instrument(span)), echo, observed)
        }
    }
}

fn reject<F, B, E>(config: &Runtime, grpc: bool, err: KeyError) -> ResponseFuture<F, B, E> {
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
    crate::metrics::outcome(IdempotencyOutcome::Rejected);
    ResponseFuture::ready(problem(
        config,
        grpc,
        Problem::new(kind, detail),
        IdempotencyOutcome::Rejected,
    ))
}
