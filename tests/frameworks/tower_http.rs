//! The layer in a real axum app, next to tower-http's Trace, Compression, Timeout,
//! RequestBodyLimit and CORS layers and an auth middleware, in the documented order:
//!
//! trace → CORS → compression → timeout → auth → body limit → idempotency → handler
//!
//! and what goes wrong in other orders, kept from going wrong. (Auth goes before the body
//! limit: axum's `from_fn` middleware takes `Request<Body>`, and the layer takes the
//! `Limited` body the limit hands it as it is.)

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{Answer, collect};
use http::StatusCode;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::compression::CompressionLayer;
use tower_http::cors::CorsLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// The principal the auth middleware finds.
#[derive(Clone)]
struct UserId(String);

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "user:{}", self.0)
    }
}

/// Stands in for a real authentication: `x-user` names the caller; none is `401`.
async fn authenticate(mut req: Request, next: Next) -> Response {
    let Some(user) = req.headers().get("x-user").and_then(|v| v.to_str().ok()) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let user = UserId(user.to_owned());
    req.extensions_mut().insert(user);
    next.run(req).await
}

#[derive(Clone, Default)]
struct Payments {
    /// Rows written: one per payment that ran.
    rows: Arc<AtomicUsize>,
}

/// Writes the payment row first, then takes `x-delay-ms` to answer a JSON body large
/// enough to be compressed.
async fn pay(State(payments): State<Payments>, req: Request) -> Response {
    let delay = req
        .headers()
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let row = payments.rows.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let body = format!("{{\"payment\":{row},\"note\":\"{}\"}}", "paid ".repeat(40));
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        body,
    )
        .into_response()
}

fn idempotency() -> IdempotencyLayer {
    IdempotencyLayer::new(MemoryStore::new()).scope_by_principal::<UserId>()
}

/// The recommended stack, in one `ServiceBuilder`, with `$idempotency` innermost (a macro:
/// the plain layer and `for_axum`'s are of different types).
macro_rules! recommended_with {
    ($payments:expr, $timeout:expr, $idempotency:expr) => {
        Router::new()
            .route("/payments", post(pay))
            .with_state($payments)
            .layer(
                ServiceBuilder::new()
                    .layer(TraceLayer::new_for_http())
                    .layer(CorsLayer::permissive())
                    .layer(CompressionLayer::new())
                    .layer(TimeoutLayer::with_status_code(
                        StatusCode::REQUEST_TIMEOUT,
                        $timeout,
                    ))
                    .layer(axum::middleware::from_fn(authenticate))
                    .layer(RequestBodyLimitLayer::new(1024))
                    .layer($idempotency),
            )
    };
}

/// The recommended stack.
fn recommended(payments: Payments, timeout: Duration) -> Router {
    recommended_with!(payments, timeout, idempotency())
}

fn payment(user: Option<&str>, key: &str) -> http::Request<Body> {
    let mut req = http::Request::post("/payments")
        .header("content-type", "application/json")
        .header("idempotency-key", key);
    if let Some(user) = user {
        req = req.header("x-user", user);
    }
    req.body(Body::from("{\"amount\":12}")).unwrap()
}

async fn send(app: &Router, req: http::Request<Body>) -> Answer {
    collect(app.clone().oneshot(req).await.unwrap()).await
}

/// Alice pays under `k1` and her retry is replayed; Bob's `k1` is his own payment; a caller
/// the auth layer does not know gets 401 before the layer.
async fn one_payment_per_caller(app: &Router) {
    let first = send(app, payment(Some("alice"), "k1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(app, payment(Some("alice"), "k1")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    let bob = send(app, payment(Some("bob"), "k1")).await;
    assert_eq!(bob.status, StatusCode::CREATED);
    assert!(!bob.replayed(), "bob must not get alice's payment");
    assert_ne!(bob.body, first.body);
    assert_eq!(send(app, payment(None, "k1")).await.status, 401);
}

/// One execution per key, no cross-user replay, 401 before the layer for an unknown
/// caller, 413 over the body limit whether the length is declared or not.
#[tokio::test]
async fn the_recommended_stack_runs_each_key_once_per_caller() {
    let payments = Payments::default();
    let app = recommended(payments.clone(), Duration::from_secs(5));
    one_payment_per_caller(&app).await;
    assert_eq!(payments.rows.load(Ordering::SeqCst), 2);

    // Over the limit with a declared length: tower-http answers 413 itself.
    let big = "x".repeat(2048);
    let declared = http::Request::post("/payments")
        .header("x-user", "alice")
        .header("idempotency-key", "big-1")
        .header("content-length", big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    assert_eq!(send(&app, declared).await.status, 413);
    // Over the limit as a stream of unknown length: the layer meets the limit while it
    // reads the body, and answers 413 as well (not 400, which would invite a retry).
    let chunks = futures_stream(vec![big.clone().into_bytes(); 2]);
    let streamed = http::Request::post("/payments")
        .header("x-user", "alice")
        .header("idempotency-key", "big-2")
        .body(chunks)
        .unwrap();
    let answer = send(&app, streamed).await;
    assert_eq!(answer.status, 413, "{}", answer.text());
    assert_eq!(payments.rows.load(Ordering::SeqCst), 2);
}

/// A body of unknown length, from chunks.
fn futures_stream(chunks: Vec<Vec<u8>>) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel(chunks.len().max(1));
    for chunk in chunks {
        tx.try_send(http_body::Frame::data(bytes::Bytes::from(chunk)))
            .unwrap();
    }
    drop(tx);
    Body::new(common::ChannelBody(rx))
}

/// Compression outside the layer: the record is the handler's plain body, compressed per
/// request, so a retry gets the encoding it asked for (gzip, or none).
#[tokio::test]
async fn replays_are_encoded_as_each_retry_accepts() {
    let app = recommended(Payments::default(), Duration::from_secs(5));
    let mut gzip = payment(Some("alice"), "enc");
    gzip.headers_mut()
        .insert("accept-encoding", "gzip".parse().unwrap());
    let first = send(&app, gzip).await;
    assert_eq!(first.headers["content-encoding"], "gzip");
    let plain = send(&app, payment(Some("alice"), "enc")).await;
    assert!(plain.replayed());
    assert!(
        !plain.headers.contains_key("content-encoding"),
        "{:?}",
        plain.headers
    );
    assert!(
        plain.text().starts_with("{\"payment\":0"),
        "{}",
        plain.text()
    );
    let mut gzip = payment(Some("alice"), "enc");
    gzip.headers_mut()
        .insert("accept-encoding", "gzip".parse().unwrap());
    let again = send(&app, gzip).await;
    assert!(again.replayed());
    assert_eq!(again.headers["content-encoding"], "gzip");
    assert_eq!(again.body, first.body);
}

/// The timeout outside the layer (the recommended order): the client gets 408, the payment
/// finishes on its own and is stored; a retry meanwhile gets 409, then the replay. One row.
#[tokio::test]
async fn a_timeout_outside_lets_the_payment_finish_once() {
    let payments = Payments::default();
    let app = recommended(payments.clone(), Duration::from_millis(150));
    let mut slow = payment(Some("alice"), "slow");
    slow.headers_mut()
        .insert("x-delay-ms", "500".parse().unwrap());
    assert_eq!(send(&app, slow).await.status, 408);
    assert_eq!(send(&app, payment(Some("alice"), "slow")).await.status, 409);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let replay = send(&app, payment(Some("alice"), "slow")).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.replayed());
    assert_eq!(payments.rows.load(Ordering::SeqCst), 1);
}

/// The timeout inside the layer (the wrong order) cuts the handler off after it wrote its
/// row. The 408 says "it may have run": the key is kept, and the retries get
/// `410 response-not-stored`, never a second payment.
#[tokio::test]
async fn a_timeout_inside_never_runs_the_payment_twice() {
    let payments = Payments::default();
    let app = Router::new()
        .route("/payments", post(pay))
        .with_state(payments.clone())
        .layer(
            ServiceBuilder::new()
                .layer(axum::middleware::from_fn(authenticate))
                .layer(idempotency())
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    Duration::from_millis(100),
                )),
        );
    let slow = || {
        let mut req = payment(Some("alice"), "cut-off");
        req.headers_mut()
            .insert("x-delay-ms", "400".parse().unwrap());
        req
    };
    assert_eq!(send(&app, slow()).await.status, 408);
    for _ in 0..3 {
        let retry = send(&app, slow()).await;
        common::assert_problem(&retry, 410, "response-not-stored");
        assert!(retry.text().contains("may have run"), "{}", retry.text());
    }
    assert_eq!(
        payments.rows.load(Ordering::SeqCst),
        1,
        "one key, one payment row"
    );
}

/// tower-http's `TimeoutLayer` right outside the layer, in one `ServiceBuilder`: it needs
/// the layer's response body to have a `Default` (an empty body for its own `408`).
#[tokio::test]
async fn a_timeout_right_outside_the_layer_composes() {
    let payments = Payments::default();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(100),
        ))
        .layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers())
        .service(
            Router::new()
                .route("/payments", post(pay))
                .with_state(payments.clone()),
        );
    let slow = || {
        let mut req = payment(None, "direct");
        req.headers_mut()
            .insert("x-delay-ms", "300".parse().unwrap());
        req
    };
    let first = collect(svc.clone().oneshot(slow()).await.unwrap()).await;
    assert_eq!(first.status, 408);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let replay = collect(svc.clone().oneshot(slow()).await.unwrap()).await;
    assert!(replay.replayed());
    assert_eq!(payments.rows.load(Ordering::SeqCst), 1);
}

/// The recommended stack with the layer answering in axum's own body (`for_axum`): the
/// same answers, with tower-http's layers on either side (the body limit's `Limited` body
/// rebuilt, the timeout's empty `408`, compression of a replay), and the payment run once
/// per caller and key.
#[tokio::test]
async fn the_recommended_stack_composes_with_for_axum() {
    let payments = Payments::default();
    let app = recommended_with!(
        payments.clone(),
        Duration::from_millis(150),
        idempotency().for_axum()
    );
    one_payment_per_caller(&app).await;

    let chunks = futures_stream(vec!["x".repeat(2048).into_bytes(); 2]);
    let streamed = http::Request::post("/payments")
        .header("x-user", "alice")
        .header("idempotency-key", "big")
        .body(chunks)
        .unwrap();
    assert_eq!(send(&app, streamed).await.status, 413);

    let mut gzip = payment(Some("alice"), "k1");
    gzip.headers_mut()
        .insert("accept-encoding", "gzip".parse().unwrap());
    let compressed = send(&app, gzip).await;
    assert!(compressed.replayed());
    assert_eq!(compressed.headers["content-encoding"], "gzip");

    let mut slow = payment(Some("alice"), "slow");
    slow.headers_mut()
        .insert("x-delay-ms", "400".parse().unwrap());
    assert_eq!(send(&app, slow).await.status, 408);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(send(&app, payment(Some("alice"), "slow")).await.replayed());
    assert_eq!(payments.rows.load(Ordering::SeqCst), 3);
}
