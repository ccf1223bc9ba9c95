//! The client side for [reqwest](https://docs.rs/reqwest), through
//! [reqwest-middleware](https://docs.rs/reqwest-middleware) (feature `reqwest`).

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
            // The answer that is retried is not needed during the pause: its connection (or
            // HTTP/2 stream) goes back now, not up to `Retry-After` later.
            drop(result);
            tokio::time::sleep(pause).await;
        }
    }
}
