//! Answers that must not be kept (`DeliverOnce`): the first caller gets the secret, a retry a
//! `410` that says it was delivered, the store holds none of it, and nothing runs twice.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use http::{Request, Response, StatusCode};
use tower::ServiceBuilder;
use tower_idempotency::store::{KeyState, StoreKey};
use tower_idempotency::{DeliverOnce, IdempotencyLayer, IdempotencyStore, MemoryStore, Scope};

use crate::common::{assert_problem, call, post};

fn minting(
    store: MemoryStore,
    runs: &Arc<AtomicUsize>,
    status: StatusCode,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<tower_idempotency::IdempotencyBody<Body>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    let runs = Arc::clone(runs);
    ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store).share_keys_across_callers())
        .service_fn(move |_req: Request<Body>| {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut res = Response::builder()
                    .status(status)
                    .header("x-api-key", format!("sk_live_{n}"))
                    .body(Body::from(format!("{{\"key\":\"sk_live_{n}\"}}")))
                    .unwrap();
                res.extensions_mut().insert(DeliverOnce);
                Ok::<_, Infallible>(res)
            }
        })
}

#[tokio::test]
async fn a_secret_is_delivered_once_and_a_retry_is_told_so_without_it() {
    let store = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = minting(store.clone(), &runs, StatusCode::CREATED);
    let first = call(&svc, post(Some("mint-1"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(first.text().contains("sk_live_0"));
    let retry = call(&svc, post(Some("mint-1"), "{}")).await;
    assert_problem(&retry, 410, "response-not-stored");
    assert!(
        retry.text().contains("delivered to the first request only"),
        "{}",
        retry.text()
    );
    assert!(!retry.text().contains("sk_live"));
    assert!(!retry.headers.contains_key("x-api-key"));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "never runs again");
    let KeyState::Completed { record, .. } = store
        .inspect(&StoreKey::new(&Scope::anonymous(), "mint-1"))
        .await
        .unwrap()
    else {
        panic!("a tombstone is kept");
    };
    assert!(record.is_tombstone());
    assert!(record.body().is_empty());
    assert!(!record.headers().contains_key("x-api-key"));
}

#[tokio::test]
async fn a_failed_answer_marked_deliver_once_still_frees_its_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = minting(MemoryStore::new(), &runs, StatusCode::SERVICE_UNAVAILABLE);
    call(&svc, post(Some("mint-2"), "{}")).await;
    let retry = call(&svc, post(Some("mint-2"), "{}")).await;
    assert_eq!(retry.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "not stored: the retry ran");
}

/// A handler's own response header named `idempotency-sealed` (the at-rest marker) is not
/// kept: the retry gets the replay, not `500 record-unreadable`, with no encryption
/// configured at all. (Found by review: every retry of such an answer was refused as a
/// sealed record the layer could not open.)
#[tokio::test]
async fn a_response_header_named_like_the_sealed_marker_still_replays() {
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = {
        let runs = Arc::clone(&runs);
        ServiceBuilder::new()
            .layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers())
            .service_fn(move |_req: Request<Body>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(StatusCode::CREATED)
                            .header("idempotency-sealed", "upstream-value")
                            .body(Body::from("created"))
                            .unwrap(),
                    )
                }
            })
    };
    let first = call(&svc, post(Some("marker-1"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = call(&svc, post(Some("marker-1"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.text());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
