//! Bodies: the response body the layer returns, and request bodies it can rebuild.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::record_body::Recorder;

/// A request body type the layer can rebuild from the bytes it buffered.
///
/// To fingerprint a covered request the layer reads its whole body (up to the limit), then
/// hands the service behind it a body of the same type holding the same bytes. Request
/// trailers, rare outside gRPC streaming, are not carried over.
///
/// Implemented for axum's body (feature `axum`, on by default), tonic's body (feature
/// `tonic`), the `Limited` body of tower-http's `RequestBodyLimitLayer` (feature
/// `tower-http`, on by default), `String`, and `http-body-util`'s `Full<Bytes>`, `Limited`,
/// `BoxBody` and `UnsyncBoxBody`.
/// hyper's `Incoming` cannot be built by anyone but hyper: put the layer behind a
/// `map_request_body` that turns it into one of these (see the hyper example).
///
/// Implement it for your own body type:
///
/// ```
/// use bytes::Bytes;
/// use tower_idempotency::RebuildBody;
///
/// struct MyBody(http_body_util::Full<Bytes>);
///
/// impl RebuildBody for MyBody {
///     fn from_bytes(bytes: Bytes) -> Self {
///         MyBody(http_body_util::Full::new(bytes))
///     }
/// }
/// ```
pub trait RebuildBody: Sized {
    /// A body yielding exactly `bytes`.
    fn from_bytes(bytes: Bytes) -> Self;
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl RebuildBody for axum_core::body::Body {
    /// An empty body is axum's own empty one, which takes no allocation (a body of bytes
    /// is boxed): the same frames, size hint and end.
    fn from_bytes(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            return axum_core::body::Body::empty();
        }
        axum_core::body::Body::from(bytes)
    }
}

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl RebuildBody for tonic::body::Body {
    fn from_bytes(bytes: Bytes) -> Self {
        tonic::body::Body::new(http_body_util::Full::new(bytes))
    }
}

impl RebuildBody for String {
    /// Bodies that are not UTF-8 are rebuilt lossily; prefer a byte body for such content.
    fn from_bytes(bytes: Bytes) -> Self {
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl RebuildBody for http_body_util::Full<Bytes> {
    fn from_bytes(bytes: Bytes) -> Self {
        http_body_util::Full::new(bytes)
    }
}

impl<E: 'static> RebuildBody for http_body_util::combinators::BoxBody<Bytes, E> {
    fn from_bytes(bytes: Bytes) -> Self {
        use http_body_util::BodyExt;
        http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed()
    }
}

/// `http-body-util`'s length-limited body. The rebuilt body holds bytes the limit already let
/// through, so it is not limited again.
impl<B: RebuildBody> RebuildBody for http_body_util::Limited<B> {
    fn from_bytes(bytes: Bytes) -> Self {
        http_body_util::Limited::new(B::from_bytes(bytes), usize::MAX)
    }
}

/// What tower-http's `RequestBodyLimitLayer` wraps bodies in (feature `tower-http`, on by
/// default). tower-http builds this type only inside its `RequestBodyLimit` service, so the
/// body is rebuilt by handing it through one, without a limit: its bytes are the ones the
/// limit already let through.
#[cfg(feature = "tower-http")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower-http")))]
impl<B: RebuildBody> RebuildBody for tower_http::body::Limited<B> {
    fn from_bytes(bytes: Bytes) -> Self {
        use tower_service::Service;

        /// Keeps the body it is called with.
        struct Keep<B>(Option<tower_http::body::Limited<B>>);

        impl<B> Service<http::Request<tower_http::body::Limited<B>>> for Keep<B> {
            type Response = http::Response<http_body_util::Empty<Bytes>>;
            type Error = std::convert::Infallible;
            type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: http::Request<tower_http::body::Limited<B>>) -> Self::Future {
                self.0 = Some(req.into_body());
                std::future::ready(Ok(http::Response::new(http_body_util::Empty::new())))
            }
        }

        let mut limit = tower_http::limit::RequestBodyLimit::new(Keep(None), usize::MAX);
        // Always ready; the request has no `content-length`, so the body is handed on at once.
        let _ = limit.poll_ready(&mut Context::from_waker(std::task::Waker::noop()));
        drop(limit.call(http::Request::new(B::from_bytes(bytes))));
        limit
            .into_inner()
            .0
            .unwrap_or_else(|| unreachable!("RequestBodyLimit hands the body on in `call`"))
    }
}

impl<E: 'static> RebuildBody for http_body_util::combinators::UnsyncBoxBody<Bytes, E> {
    fn from_bytes(bytes: Bytes) -> Self {
        use http_body_util::BodyExt;
        http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync()
    }
}

pin_project! {
    /// The response body of [`Idempotency`](crate::Idempotency).
    ///
    /// It is one of: the inner service's body passed through untouched (uncovered
    /// requests); the inner body streamed to the client while a copy is recorded (the first
    /// run of an operation); a stored body replayed with its trailers; or a problem body.
    pub struct IdempotencyBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Passthrough { #[pin] inner: B },
        // Boxed, like the trailers: every response of the layer (uncovered ones too) moves
        // through several futures, and a body the size of the recorder would be copied
        // at each move.
        Live { inner: Box<Recorder<B>> },
        Full { data: Option<Bytes>, trailers: Option<Box<HeaderMap>> },
    }
}

impl<B> IdempotencyBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(crate) fn live(inner: Box<Recorder<B>>) -> Self {
        Self {
            kind: Kind::Live { inner },
        }
    }

    /// The inner service's body when the layer passed it through untouched, else this
    /// body as it was.
    #[cfg(feature = "axum")]
    pub(crate) fn into_passthrough(self) -> Result<B, Self> {
        match self.kind {
            Kind::Passthrough { inner } => Ok(inner),
            kind => Err(Self { kind }),
        }
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers: trailers.map(Box::new),
            },
        }
    }
}

/// An empty body: what tower-http's `TimeoutLayer` (and other layers that answer on their
/// own) put in the responses they make, so that they compose outside this layer.
impl<B> Default for IdempotencyBody<B> {
    fn default() -> Self {
        Self {
            kind: Kind::Full {
                data: None,
                trailers: None,
            },
        }
    }
}

impl<B> fmt::Debug for IdempotencyBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Live { .. } => "Live",
            Kind::Full { .. } => "Full",
        };
        f.debug_struct("IdempotencyBody")
            .field("kind", &kind)
            .finish()
    }
}

impl<B> Body for IdempotencyBody<B>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { inner } => inner.poll_frame(cx),
            KindProj::Live { inner } => Pin::new(&mut **inner).poll_frame(cx),
            KindProj::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if let Some(trailers) = trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { inner } => inner.is_end_stream(),
            Kind::Live { inner } => inner.is_end_stream(),
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { inner } => inner.size_hint(),
            Kind::Live { inner } => inner.size_hint(),
            Kind::Full { data, trailers } => {
                let len = data.as_ref().map_or(0, |d| d.len() as u64);
                if trailers.is_some() {
                    // Framed as a body with trailers is: no `content-length` (see the
                    // recorder), so a replay is framed as the first answer was.
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
        }
    }
}

/// The error type request bodies are read with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Reads a request body up to `limit` bytes. A length limit met on the way, this one or
/// one of a layer outside (tower-http's `RequestBodyLimitLayer` reports the same
/// `LengthLimitError`), is [`BufferError::TooLarge`]; any other failure is
/// [`BufferError::Read`].
pub(crate) async fn buffer<B>(body: B, limit: usize) -> Result<Bytes, BufferError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(BufferError::TooLarge);
    }
    let hint = body.size_hint();
    let mut body = std::pin::pin!(http_body_util::Limited::new(body, limit));
    // A body in one chunk (the common case) is kept as it is: no copy, no allocation.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(err) if is_length_limit(&*err) => return Err(BufferError::TooLarge),
            Err(err) => return Err(BufferError::Read(err.to_string())),
        };
        // Trailers of a request are not part of what is fingerprinted or replayed.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if let Some(joined) = &mut joined {
            joined.extend_from_slice(&data);
        } else if let Some(head) = first.take() {
            let capacity = joined_capacity(&hint, limit, head.len() + data.len());
            let mut buf = bytes::BytesMut::with_capacity(capacity);
            buf.extend_from_slice(&head);
            buf.extend_from_slice(&data);
            joined = Some(buf);
        } else {
            first = Some(data);
        }
    }
    Ok(match joined {
        Some(joined) => joined.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// The buffer for a body in several chunks, once `have` bytes arrived: sized from what the
/// client declared, within the limit, but never more than 64 KiB ahead of what it sent, so
/// that a client announcing a large body and sending two bytes does not make the server
/// reserve the whole limit.
fn joined_capacity(declared: &http_body::SizeHint, limit: usize, have: usize) -> usize {
    const AHEAD: usize = 64 * 1024;
    let declared = declared.upper().unwrap_or(declared.lower());
    let declared = usize::try_from(declared).unwrap_or(usize::MAX).min(limit);
    declared.min(have.saturating_add(AHEAD)).max(have)
}

/// Whether `err`, or an error it wraps, is a body length limit.
fn is_length_limit(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        next = err.source();
    }
    false
}

pub(crate) enum BufferError {
    TooLarge,
    Read(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_length_reserves_at_most_64_kib_ahead() {
        let declared = http_body::SizeHint::with_exact(1024 * 1024);
        // Two bytes arrived of a declared mebibyte: not a mebibyte reserved.
        assert_eq!(joined_capacity(&declared, 1024 * 1024, 2), 2 + 64 * 1024);
        // A small declared body is reserved whole.
        let small = http_body::SizeHint::with_exact(3000);
        assert_eq!(joined_capacity(&small, 1024 * 1024, 2), 3000);
        // Never less than what arrived, never more than the limit ahead of it.
        assert_eq!(
            joined_capacity(&http_body::SizeHint::new(), 1 << 20, 70_000),
            70_000
        );
        assert_eq!(joined_capacity(&declared, 100, 2), 100);
    }

    /// What a handler sees of a rebuilt axum body, empty or not: its bytes, an exact size
    /// hint, and its end (an empty one is axum's own empty body, not a box of bytes).
    #[cfg(feature = "axum")]
    #[tokio::test]
    async fn a_rebuilt_axum_body_yields_its_bytes_and_its_exact_size() {
        use http_body_util::BodyExt;
        for bytes in [Bytes::new(), Bytes::from_static(b"{\"amount\":12}")] {
            let body = axum_core::body::Body::from_bytes(bytes.clone());
            assert_eq!(body.size_hint().exact(), Some(bytes.len() as u64));
            assert_eq!(body.is_end_stream(), bytes.is_empty());
            let collected = body.collect().await.expect("a rebuilt body never fails");
            assert_eq!(collected.to_bytes(), bytes);
        }
    }
}
