//! The server the client-side tests call: `POST /orders` behind the layer, every attempt's
//! key recorded in front of it.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;

/// What a [`counting_server`] saw: the key of every attempt, and how often the operation ran.
#[derive(Clone, Default)]
pub struct Seen {
    pub keys: Arc<std::sync::Mutex<Vec<Option<String>>>>,
    pub runs: Arc<AtomicUsize>,
}

/// A server on a loopback port whose `POST /orders` takes `work` and answers `201` with
/// `order {n} for {body}`, behind the layer on a memory store; every attempt's key is
/// recorded in front of the layer (replays and 409s included).
pub async fn counting_server(seen: Seen, work: Duration) -> std::net::SocketAddr {
    counting_server_with_profile(seen, work, tower_idempotency::problem::Profile::Rfc9457).await
}

/// A [`counting_server`] whose layer answers in `profile`.
pub async fn counting_server_with_profile(
    seen: Seen,
    work: Duration,
    profile: tower_idempotency::problem::Profile,
) -> std::net::SocketAddr {
    use axum::routing::post;
    let runs = Arc::clone(&seen.runs);
    let app = axum::Router::new()
        .route(
            "/orders",
            post(move |body: String| {
                let runs = Arc::clone(&runs);
                async move {
                    tokio::time::sleep(work).await;
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, format!("order {n} for {body}"))
                }
            }),
        )
        .layer(
            tower_idempotency::IdempotencyLayer::new(tower_idempotency::MemoryStore::new())
                .share_keys_across_callers()
                .problem_profile(profile)
                .lease(Duration::from_secs(5)),
        )
        .layer(axum::middleware::map_request(
            move |req: axum::extract::Request| {
                let key = req
                    .headers()
                    .get("idempotency-key")
                    .map(|v| v.to_str().unwrap().to_owned());
                seen.keys.lock().unwrap().push(key);
                async move { req }
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}
