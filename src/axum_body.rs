//! The layer with responses in axum's own body type (feature `axum`): what
//! [`IdempotencyLayer::for_axum`](crate::IdempotencyLayer::for_axum) makes.
//!
//! axum's `Router::layer` turns every response of a layer into its own `Body`, boxing any
//! other body type, so the layer's [`IdempotencyBody`] costs a box and an error mapping on
//! every response, the uncovered ones too. Answering in `Body` instead, a response the
//! layer does not touch keeps the handler's `Body` as it is.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum_core::body::Body as AxumBody;
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{BoxError, IdempotencyBody, RebuildBody};
use crate::future::ResponseFuture;
use crate::layer::IdempotencyLayer;
use crate::service::Idempotency;

/// An [`IdempotencyBody`] as axum's `Body`: the inner service's body as it is when the
/// layer passed it through (no allocation when that is a `Body` already), else boxed once.
impl<B> From<IdempotencyBody<B>> for AxumBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn from(body: IdempotencyBody<B>) -> Self {
        match body.into_passthrough() {
            Ok(inner) => AxumBody::new(inner),
            Err(body) => AxumBody::new(body),
        }
    }
}

/// An [`IdempotencyLayer`] whose services answer in axum's `Body`; made by
/// [`IdempotencyLayer::for_axum`].
///
/// It behaves as the layer it was made from in every way (the same settings, the same
/// store, the same running parts as that layer's clones) but for the response body type.
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let app: Router = Router::new()
///     .route("/orders", post(|| async { "created" }).get(|| async { "[]" }))
///     .layer(IdempotencyLayer::new(MemoryStore::new()).for_axum());
/// ```
#[derive(Clone, Debug)]
pub struct AxumIdempotencyLayer {
    layer: IdempotencyLayer,
}

impl IdempotencyLayer {
    /// This layer answering in axum's own `Body` (feature `axum`, on by default); call it
    /// last, after the settings.
    ///
    /// axum's `Router::layer` turns every response of a layer into its `Body`, boxing any
    /// other body type. The plain layer answers in [`IdempotencyBody`](crate::IdempotencyBody),
    /// so axum boxes every response of it again, those of requests the layer does not
    /// cover too (a `GET` beside your `POST`s). The layer this makes answers in `Body`
    /// itself: a response it does not touch keeps the handler's body as it is, and the
    /// others are boxed once, as axum would. Everything else is the same: the settings, the
    /// store, and the running parts shared with this layer's clones (so keep a clone for
    /// [`detached_work`](IdempotencyLayer::detached_work)).
    ///
    /// ```
    /// use axum::{Router, routing::post};
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new());
    /// let work = layer.detached_work();
    /// let app: Router = Router::new()
    ///     .route("/orders", post(|| async { "created" }).get(|| async { "[]" }))
    ///     .layer(layer.for_axum());
    /// ```
    #[cfg(feature = "axum")]
    #[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
    pub fn for_axum(self) -> AxumIdempotencyLayer {
        AxumIdempotencyLayer { layer: self }
    }
}

impl AxumIdempotencyLayer {
    /// The layer this one was made from.
    pub fn get_ref(&self) -> &IdempotencyLayer {
        &self.layer
    }

    /// The layer this one was made from, with its own response body type again.
    pub fn into_inner(self) -> IdempotencyLayer {
        self.layer
    }
}

impl<S> Layer<S> for AxumIdempotencyLayer {
    type Service = AxumIdempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AxumIdempotency {
            inner: self.layer.layer(inner),
        }
    }
}

/// The service made by [`AxumIdempotencyLayer`]: [`Idempotency`] answering in axum's
/// `Body`.
#[derive(Clone, Debug)]
pub struct AxumIdempotency<S> {
    inner: Idempotency<S>,
}

impl<S> AxumIdempotency<S> {
    /// The [`Idempotency`] service inside.
    pub fn get_ref(&self) -> &Idempotency<S> {
        &self.inner
    }

    /// The [`Idempotency`] service inside, answering in its own body type again.
    pub fn into_inner(self) -> Idempotency<S> {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AxumIdempotency<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + RebuildBody + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError> + Send,
{
    type Response = Response<AxumBody>;
    type Error = S::Error;
    type Future = AxumResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        AxumResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of [`AxumIdempotency`].
    pub struct AxumResponseFuture<F, B, E> {
        #[pin]
        inner: ResponseFuture<F, B, E>,
    }
}

impl<F, B, E> std::fmt::Debug for AxumResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AxumResponseFuture")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<F, B, E> Future for AxumResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<AxumBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project()
            .inner
            .poll_with(cx, AxumBody::new, AxumBody::new)
    }
}
