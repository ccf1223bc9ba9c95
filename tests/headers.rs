//! Header fields the layer reads itself: the credential a scope is derived from (every
//! field of it, none of it blank).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use common::{Counter, FaultStore, assert_problem, call, post};
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, MemoryStore, Scope};

const SECRET: &str = "a fleet-wide secret of 32 bytes!";

/// A keyed POST carrying `name` once per value, each value a field of its own.
fn with_fields(key: &str, name: &HeaderName, values: &[&str]) -> Request<Body> {
    let mut req = post(Some(key), "{}");
    for value in values {
        req.headers_mut()
            .append(name.clone(), HeaderValue::from_str(value).unwrap());
    }
    req
}

/// Caller B's cookie differs from caller A's in its second field only: B must run its own
/// operation. The same cookie in one field (HTTP/1.1) or in several (HTTP/2) is the same
/// caller. For another header every field counts, in order, and a value cannot be moved
/// across the boundary between two fields.
#[tokio::test]
async fn every_credential_field_goes_into_the_scope() {
    let counter = Counter::default();
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .scope_by_credential(header::COOKIE, SECRET)
        .layer(counter.service(Duration::ZERO));
    let a = call(
        &svc,
        with_fields("k", &header::COOKIE, &["theme=dark", "session=a"]),
    )
    .await;
    let b = call(
        &svc,
        with_fields("k", &header::COOKIE, &["theme=dark", "session=b"]),
    )
    .await;
    assert!(!a.replayed());
    assert!(!b.replayed(), "caller B was replayed caller A's answer");
    assert_ne!(a.body, b.body);
    assert_eq!(counter.runs(), 2);
    // RFC 9113 §8.2.3: cookie crumbs in separate fields are one cookie joined with "; ".
    let a_in_one = call(
        &svc,
        with_fields("k", &header::COOKIE, &["theme=dark; session=a"]),
    )
    .await;
    assert!(
        a_in_one.replayed(),
        "one cookie, split or not, is one caller"
    );
    assert_eq!(a_in_one.body, a.body);
    assert_eq!(counter.runs(), 2);

    let api_key = HeaderName::from_static("x-api-key");
    let store = FaultStore::new(MemoryStore::new());
    let counter = Counter::default();
    let svc = IdempotencyLayer::new(store.clone())
        .scope_by_credential(api_key.clone(), SECRET)
        .layer(counter.service(Duration::ZERO));
    let mut bodies = Vec::new();
    for values in [
        &["k1", "k2"][..],
        &["k1", "k3"],
        &["k1"],
        &["ab", "c"],
        &["a", "bc"],
        &["abc"],
        &["k2", "k1"],
    ] {
        let answer = call(&svc, with_fields("k", &api_key, values)).await;
        assert!(
            !answer.replayed(),
            "{values:?} was replayed another caller's answer"
        );
        bodies.push(answer.body);
    }
    assert_eq!(counter.runs(), 7);
    // A credential sent once keeps the scope it always had.
    let keys = store.faults.claimed_keys.lock().unwrap().clone();
    let one = Scope::keyed(SECRET.as_bytes(), b"k1");
    assert!(
        keys.contains(&format!("{}:k", one.as_str())),
        "{keys:?} lacks the scope of the single value"
    );
}

/// Over real HTTP/2 (hyper server, hyper-util client speaking HTTP/2 only, an axum router):
/// a browser's cookie crumbs travel as separate fields, and callers whose cookies share
/// their first crumb still get answers of their own.
#[tokio::test]
async fn cookie_crumbs_in_separate_http2_fields_keep_callers_apart() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app: Router = Router::new()
        .route(
            "/orders",
            axum::routing::post({
                let runs = Arc::clone(&runs);
                move |headers: HeaderMap| {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    let fields = headers.get_all(header::COOKIE).iter().count();
                    async move {
                        (
                            StatusCode::CREATED,
                            format!("run {n}, {fields} cookie fields"),
                        )
                    }
                }
            }),
        )
        .layer(
            IdempotencyLayer::new(MemoryStore::new()).scope_by_credential(header::COOKIE, SECRET),
        );
    let addr = common::serve(app).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let send = |cookies: &'static [&'static str]| {
        let client = client.clone();
        async move {
            let mut req = Request::post(format!("http://{addr}/orders"))
                .header("idempotency-key", "same-key");
            for cookie in cookies {
                req = req.header(header::COOKIE, *cookie);
            }
            let res = client
                .request(req.body(Full::new(Bytes::from_static(b"{}"))).unwrap())
                .await
                .unwrap();
            assert_eq!(res.version(), http::Version::HTTP_2);
            let replayed = res.headers().contains_key("idempotent-replayed");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (replayed, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    let (a_replayed, a) = send(&["theme=dark", "session=a"]).await;
    assert!(!a_replayed);
    assert_eq!(
        a, "run 0, 2 cookie fields",
        "the crumbs arrived as separate fields"
    );
    let (b_replayed, b) = send(&["theme=dark", "session=b"]).await;
    assert!(!b_replayed, "caller B was replayed caller A's answer: {b}");
    assert_eq!(b, "run 1, 2 cookie fields");
    let (again, a_again) = send(&["theme=dark", "session=a"]).await;
    assert!(again);
    assert_eq!(a_again, a);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// An empty or blank credential identifies nobody: it is refused like a missing one, also
/// when it is sent in several fields that are all blank.
#[tokio::test]
async fn blank_credentials_are_missing() {
    let counter = Counter::default();
    let api_key = HeaderName::from_static("x-api-key");
    let by_key = IdempotencyLayer::new(MemoryStore::new())
        .scope_by_credential(api_key.clone(), SECRET)
        .layer(counter.service(Duration::ZERO));
    let by_cookie = IdempotencyLayer::new(MemoryStore::new())
        .scope_by_credential(header::COOKIE, SECRET)
        .layer(counter.service(Duration::ZERO));
    for values in [
        &[""][..],
        &["   "],
        &["\t \t"],
        &["", " "],
        &[" ", "", "\t"],
    ] {
        let answer = call(&by_key, with_fields("k", &api_key, values)).await;
        assert_problem(&answer, 403, "caller-unknown");
        let answer = call(&by_cookie, with_fields("k", &header::COOKIE, values)).await;
        assert_problem(&answer, 403, "caller-unknown");
    }
    assert_eq!(
        counter.runs(),
        0,
        "a blank credential was taken for a caller"
    );
}
