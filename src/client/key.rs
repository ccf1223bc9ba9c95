//! A key per call: the layer that sets it, and its service and future.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Method, Request};
use tower_layer::Layer;
use tower_service::Service;

use crate::key::{IdempotencyKey, KeyError};

use super::*;

/// Gives each request a fresh `Idempotency-Key` unless it carries one (see the
/// [module docs](crate::client)).
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
    pub(super) fn assign(
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
pub(super) fn key_header_value(
    value: &HeaderValue,
) -> Result<(IdempotencyKey, HeaderValue), KeyError> {
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
