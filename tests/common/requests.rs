//! Requests and answers in memory: a POST to `/orders`, calling a service and collecting its
//! answer, the problem-answer assertion, counting handlers, a channel-fed body, `eventually`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};
use tower_idempotency::IdempotencyOutcome;

/// A POST to /orders with an optional key and a body.
pub fn post(key: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post("/orders").header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Body::from(body.to_owned())).unwrap()
}

/// What a test looks at in a response.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    pub outcome: Option<IdempotencyOutcome>,
}

impl Answer {
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Asserts an RFC 9457 answer of the layer's own: `status`, `application/problem+json`, a
/// `type` ending with `slug`, a title and a detail, and `Retry-After` exactly on 409 and 503.
pub fn assert_problem(answer: &Answer, status: u16, slug: &str) {
    assert_eq!(answer.status.as_u16(), status, "{}", answer.text());
    assert_eq!(answer.headers["content-type"], "application/problem+json");
    assert_eq!(
        answer.headers.contains_key("retry-after"),
        matches!(status, 409 | 503),
        "Retry-After on {status}"
    );
    // Framed by its own length where the layer says one (a cached answer shares it).
    if let Some(length) = answer.headers.get("content-length") {
        assert_eq!(length.to_str().unwrap(), answer.body.len().to_string());
    }
    let json = answer.json();
    assert_eq!(json["status"], status);
    assert!(
        json["type"].as_str().unwrap().ends_with(slug),
        "type {} should end with {slug}",
        json["type"]
    );
    assert!(json["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(json["detail"].as_str().is_some_and(|t| !t.is_empty()));
}

/// A boxed handler, so services built on it have a type a test can name.
pub type Handler = tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Counts a handler's runs as they start and as they finish.
#[derive(Clone, Default)]
pub struct Runs {
    pub started: Arc<AtomicUsize>,
    pub finished: Arc<AtomicUsize>,
}

impl Runs {
    /// A handler that takes `delay` and answers `201` with `run N`, N counting from 0.
    pub fn handler(&self, delay: Duration) -> Handler {
        let runs = self.clone();
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |_req: Request<Body>| {
            let runs = runs.clone();
            async move {
                let n = runs.started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                runs.finished.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .body(Body::from(format!("run {n}")))
                        .unwrap(),
                )
            }
        }))
    }

    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

/// Calls a service once and collects its whole response.
pub async fn call<S, B>(svc: &S, req: Request<Body>) -> Answer
where
    S: Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.expect("service error");
    collect(res).await
}

/// Collects a response.
pub async fn collect<B>(res: Response<B>) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let outcome = res.extensions().get::<IdempotencyOutcome>().copied();
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.expect("body error");
    let trailers = collected.trailers().cloned();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
        outcome,
    }
}

/// A handler that counts its runs and answers 201 with a fresh id.
#[derive(Clone, Default)]
pub struct Counter(pub Arc<AtomicUsize>);

impl Counter {
    pub fn runs(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// A service answering `201 {"id": <uuid>, "body": <request body>}` after `delay`.
    pub fn service(
        &self,
        delay: Duration,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static {
        let count = Arc::clone(&self.0);
        tower::service_fn(move |req: Request<Body>| {
            let count = Arc::clone(&count);
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                let body = req.into_body().collect().await.unwrap().to_bytes();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let json = serde_json::json!({
                    "id": uuid::Uuid::new_v4().to_string(),
                    "body": String::from_utf8_lossy(&body),
                });
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .header("content-type", "application/json")
                        .body(Body::from(json.to_string()))
                        .unwrap(),
                )
            }
        })
    }
}

/// Waits until `f` holds, up to five seconds.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A response body fed by a channel, so a test decides when each frame is sent; no size
/// hint, so HTTP/1.1 sends it chunked unless a header says otherwise.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<http_body::Frame<Bytes>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// A body of frames given in advance, each at once: data, trailers, or an error midway.
pub struct Frames(pub std::collections::VecDeque<Result<http_body::Frame<Bytes>, std::io::Error>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front())
    }
}
