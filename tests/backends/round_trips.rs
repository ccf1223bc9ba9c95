//! The store round trips a request costs through the layer, the same on every shared store:
//! a first request two (claim, complete), three with a commit point (claim, commit,
//! complete), a replay one (claim). Each store's file counts them its own way (Redis's
//! command statistics, PostgreSQL's and MySQL's wire through a proxy) and runs
//! [`layer_round_trips`].
#![cfg(any(feature = "redis", feature = "postgres", feature = "mysql"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, IdempotencyStore};

/// Sends first requests and replays through the layer on `store`, a plain route and one
/// with a commit point, and checks the round trips `trips` counts after each (it answers
/// those since its last call).
pub async fn layer_round_trips<S: IdempotencyStore + Clone>(
    store: S,
    mut trips: impl AsyncFnMut() -> usize,
) {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/plain",
            post({
                let runs = Arc::clone(&runs);
                move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, "made")
                }
            }),
        )
        .route(
            "/committed",
            post({
                let runs = Arc::clone(&runs);
                move |claim: IdempotencyClaim| async move {
                    claim.commit().await.expect("commit point");
                    runs.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, "paid")
                }
            }),
        )
        .layer(IdempotencyLayer::new(store).share_keys_across_callers());
    let key = uuid::Uuid::new_v4().to_string();
    let send = |path: &'static str, key: String| {
        let app = app.clone();
        async move {
            let res = app
                .oneshot(
                    Request::post(path)
                        .header("idempotency-key", key)
                        .body(Body::from("{}"))
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = res.status();
            res.into_body().collect().await.unwrap();
            status
        }
    };
    // Warm-up: a connection prepares each statement once.
    for path in ["/plain", "/committed"] {
        send(path, format!("{key}-warm{path}")).await;
        send(path, format!("{key}-warm{path}")).await;
    }
    trips().await;
    for (path, first, what) in [
        ("/plain", 2, "claim, complete"),
        ("/committed", 3, "claim, commit, complete"),
    ] {
        let key = format!("{key}{path}");
        assert_eq!(send(path, key.clone()).await, StatusCode::CREATED);
        assert_eq!(trips().await, first, "a first request on {path}: {what}");
        assert_eq!(send(path, key).await, StatusCode::CREATED);
        assert_eq!(trips().await, 1, "a replay on {path}: one claim");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 4, "each operation ran once");
}
