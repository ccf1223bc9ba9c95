//! What sealing records at rest costs (`encrypt_records`, feature `encryption`): a first
//! request and a replay whose response body is 1 KiB or 64 KiB, through the layer on the
//! memory store with and without sealing, in one run. A first request seals its record; a
//! replay opens it.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --bench sealed --features encryption
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use axum::routing::post;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::store::sealed::Keyring;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

fn router(size: usize, sealed: bool) -> Router {
    let body = Bytes::from(vec![b'x'; size]);
    let store = MemoryStore::builder()
        .max_bytes(4 << 30)
        .min_retention(std::time::Duration::from_secs(1))
        .build();
    let layer = IdempotencyLayer::new(store).share_keys_across_callers();
    let layer = if sealed {
        layer.encrypt_records(Keyring::new("bench", [7; 32]).unwrap())
    } else {
        layer
    };
    Router::new()
        .route(
            "/orders",
            post(move |_req: Bytes| {
                let body = body.clone();
                async move { (StatusCode::CREATED, body) }
            }),
        )
        .layer(layer)
}

async fn send(router: &Router, key: &str) {
    let req = Request::post("/orders")
        .header("idempotency-key", key)
        .body(Body::from("{}"))
        .unwrap();
    let res = router.clone().oneshot(req).await.unwrap();
    black_box(res.into_body().collect().await.unwrap().to_bytes());
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("sealed");
    for size in [1024, 64 * 1024] {
        for sealed in [false, true] {
            let label = format!(
                "{} KiB {}",
                size / 1024,
                if sealed { "sealed" } else { "plain" }
            );
            let r = router(size, sealed);
            let n = AtomicU64::new(0);
            group.bench_function(format!("first, {label}"), |b| {
                b.to_async(&rt).iter(|| {
                    let key = format!("k{}", n.fetch_add(1, Ordering::Relaxed));
                    let r = &r;
                    async move { send(r, &key).await }
                })
            });
            rt.block_on(send(&r, "replayed"));
            group.bench_function(format!("replay, {label}"), |b| {
                b.to_async(&rt).iter(|| send(&r, "replayed"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
