//! The layer against the bare service, in the same run, and the memory store's throughput.
//!
//! Every latency group holds a `bare` and a `layer` benchmark side by side: the same trivial
//! handler (it reads its request body and answers `201` with a small JSON body), called
//! alone or behind `IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers()`.
//! One iteration is
//! `svc.clone().oneshot(req).await` and the collection of the response body; building the
//! request (and its key) is part of the iteration for both.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --bench layer
//! ```
//!
//! Groups:
//! - `uncovered_get`: a `GET` the layer does not cover;
//! - `first_request`: a fresh key per iteration, request bodies of 0 B, 1 KiB and 64 KiB;
//! - `replay`: the same key and body every iteration (stored before the measurement);
//! - `in_flight_409`: the key is held in the store by a claim that never completes;
//! - `first_request_mt`: `first_request` at 1 KiB with each call spawned on a 2-worker
//!   multi-thread runtime (the other groups run on a current-thread runtime);
//! - `store_distinct_keys` and `store_one_key`: `MemoryStore` claim + complete from 1, 2, 4
//!   and 8 tasks on a multi-thread runtime.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::store::{Claim, Record, StoreKey};
use tower_idempotency::{
    Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, REPLAYED_HEADER, Scope,
};

/// The response of the trivial handler.
const RESPONSE: &[u8] = br#"{"id":"4c1f0a52-6a55-4d39-9a3e-1d4f2b7c9e10","status":"created"}"#;

/// Request body sizes of the first-request and replay groups.
const SIZES: [usize; 3] = [0, 1024, 64 * 1024];

/// Makes every key of the run distinct (across groups too, since they share no store, but
/// it keeps the keys' lengths comparable).
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

fn next_key() -> String {
    format!("bench-{:012}", NEXT_KEY.fetch_add(1, Ordering::Relaxed))
}

/// The trivial handler: reads its body and answers `201` with a small JSON body.
async fn handler(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = req.into_body().collect().await?.to_bytes();
    black_box(&body);
    let mut res = Response::new(Full::new(Bytes::from_static(RESPONSE)));
    *res.status_mut() = StatusCode::CREATED;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(res)
}

fn request(method: Method, key: Option<&str>, body: &Bytes) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri("/orders")
        .header(CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder
        .body(Full::new(body.clone()))
        .expect("a valid request")
}

fn post(key: &str, body: &Bytes) -> Request<Full<Bytes>> {
    request(Method::POST, Some(key), body)
}

/// One iteration: a clone of the service, one call, the whole response body.
async fn call<S, B>(svc: &S, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.expect("the service answers");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("the body").to_bytes();
    (parts.status, parts.headers, body)
}

fn body_of(size: usize) -> Bytes {
    Bytes::from(
        (0..size)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn multi_thread(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn uncovered_get(c: &mut Criterion) {
    let rt = current_thread();
    let bare = tower::service_fn(handler);
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(bare);
    let empty = Bytes::new();
    let mut g = c.benchmark_group("uncovered_get");
    g.bench_function("bare", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call(&bare, request(Method::GET, None, &empty)).await) })
    });
    g.bench_function("layer", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call(&layer, request(Method::GET, None, &empty)).await) })
    });
    g.finish();
}

fn first_request(c: &mut Criterion) {
    let rt = current_thread();
    let bare = tower::service_fn(handler);
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(bare);
    let uncapped = IdempotencyLayer::new(MemoryStore::builder().max_bytes(1 << 34).build())
        .share_keys_across_callers()
        .layer(bare);
    // Sanity: the layered service runs the handler and answers 201.
    let (status, _, body) = rt.block_on(call(&layer, post(&next_key(), &body_of(10))));
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body, RESPONSE);
    let mut g = c.benchmark_group("first_request");
    for size in SIZES {
        let payload = body_of(size);
        g.bench_with_input(BenchmarkId::new("bare", size), &payload, |b, payload| {
            b.to_async(&rt)
                .iter(|| async { black_box(call(&bare, post(&next_key(), payload)).await) })
        });
        g.bench_with_input(BenchmarkId::new("layer", size), &payload, |b, payload| {
            b.to_async(&rt)
                .iter(|| async { black_box(call(&layer, post(&next_key(), payload)).await) })
        });
    }
    // The default store fills its 64 MiB cap during the run above and evicts; the same
    // request on a store whose cap is never reached shows what eviction costs.
    let payload = body_of(1024);
    g.bench_with_input(
        BenchmarkId::new("layer_uncapped", 1024),
        &payload,
        |b, payload| {
            b.to_async(&rt)
                .iter(|| async { black_box(call(&uncapped, post(&next_key(), payload)).await) })
        },
    );
    g.finish();
}

fn replay(c: &mut Criterion) {
    let rt = current_thread();
    let bare = tower::service_fn(handler);
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(bare);
    let mut g = c.benchmark_group("replay");
    for size in SIZES {
        let payload = body_of(size);
        let key = next_key();
        // Store the outcome once; every measured call is a replay of it.
        let (status, _, _) = rt.block_on(call(&layer, post(&key, &payload)));
        assert_eq!(status, StatusCode::CREATED);
        let (status, headers, body) = rt.block_on(call(&layer, post(&key, &payload)));
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(headers[REPLAYED_HEADER], "true");
        assert_eq!(body, RESPONSE);
        g.bench_with_input(BenchmarkId::new("bare", size), &payload, |b, payload| {
            b.to_async(&rt)
                .iter(|| async { black_box(call(&bare, post(&key, payload)).await) })
        });
        g.bench_with_input(BenchmarkId::new("layer", size), &payload, |b, payload| {
            b.to_async(&rt)
                .iter(|| async { black_box(call(&layer, post(&key, payload)).await) })
        });
    }
    g.finish();
}

fn in_flight_409(c: &mut Criterion) {
    let rt = current_thread();
    let bare = tower::service_fn(handler);
    let store = MemoryStore::new();
    let layer = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .layer(bare);
    let payload = body_of(1024);
    let key = next_key();
    // Hold the key with the fingerprint the layer computes for this request, for longer than
    // the run: every call finds it in flight.
    let (parts, _) = post(&key, &payload).into_parts();
    let fingerprint = Fingerprint::of_request(&parts, &payload);
    let store_key = StoreKey::new(&Scope::anonymous(), &key);
    let claim = rt
        .block_on(store.claim(
            &store_key,
            &fingerprint,
            tower_idempotency::store::LeaseToken::new(),
            Duration::from_secs(24 * 3600),
        ))
        .expect("claim");
    assert!(matches!(claim, Claim::Acquired(_)));
    let (status, _, _) = rt.block_on(call(&layer, post(&key, &payload)));
    assert_eq!(status, StatusCode::CONFLICT);
    let mut g = c.benchmark_group("in_flight_409");
    g.bench_function("bare", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call(&bare, post(&key, &payload)).await) })
    });
    g.bench_function("layer", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call(&layer, post(&key, &payload)).await) })
    });
    g.finish();
}

/// `first_request` at 1 KiB, each call spawned on a worker of a 2-worker runtime, as a
/// server's connection task would run it.
fn first_request_mt(c: &mut Criterion) {
    let rt = multi_thread(2);
    let bare = tower::service_fn(handler);
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(bare);
    let payload = body_of(1024);
    let mut g = c.benchmark_group("first_request_mt");
    g.bench_function(BenchmarkId::new("bare", 1024), |b| {
        b.to_async(&rt).iter(|| {
            let (svc, payload) = (bare, payload.clone());
            async move {
                let task =
                    tokio::spawn(async move { call(&svc, post(&next_key(), &payload)).await });
                black_box(task.await.expect("the task"))
            }
        })
    });
    g.bench_function(BenchmarkId::new("layer", 1024), |b| {
        b.to_async(&rt).iter(|| {
            let (svc, payload) = (layer.clone(), payload.clone());
            async move {
                let task =
                    tokio::spawn(async move { call(&svc, post(&next_key(), &payload)).await });
                black_box(task.await.expect("the task"))
            }
        })
    });
    g.finish();
}

/// Claim + complete on `MemoryStore` from several tasks; every task does `iters / tasks`
/// operations; the time is the wall-clock time of the whole batch, so criterion's
/// throughput is the aggregate rate.
fn store_throughput(c: &mut Criterion) {
    let rt = multi_thread(2);
    let fp = Fingerprint::from_bytes([7; 32]);
    let record = Record::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from_static(RESPONSE),
        None,
    )
    .with_fingerprint(fp);
    let lease = Duration::from_secs(30);

    let mut g = c.benchmark_group("store_distinct_keys");
    g.throughput(Throughput::Elements(1));
    for tasks in [1u64, 2, 4, 8] {
        let record = record.clone();
        g.bench_function(BenchmarkId::new("tasks", tasks), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let record = record.clone();
                async move {
                    // A fresh store per sample, with a cap high enough that no eviction
                    // happens: this measures the map and its shard locks (eviction is
                    // measured by the memory bench).
                    let store = MemoryStore::builder().max_bytes(1 << 34).build();
                    let per = iters.div_ceil(tasks);
                    let start = Instant::now();
                    let handles: Vec<_> = (0..tasks)
                        .map(|t| {
                            let (store, record) = (store.clone(), record.clone());
                            tokio::spawn(async move {
                                for i in 0..per {
                                    let key = StoreKey::new(
                                        &Scope::anonymous(),
                                        &format!("t{t}-{i:012}"),
                                    );
                                    match store
                                        .claim(
                                            &key,
                                            &fp,
                                            tower_idempotency::store::LeaseToken::new(),
                                            lease,
                                        )
                                        .await
                                        .expect("claim")
                                    {
                                        Claim::Acquired(token) => store
                                            .complete(
                                                &key,
                                                token,
                                                record.clone(),
                                                Duration::from_secs(3600),
                                            )
                                            .await
                                            .expect("complete"),
                                        other => panic!("a fresh key was {other:?}"),
                                    }
                                }
                            })
                        })
                        .collect();
                    for h in handles {
                        h.await.expect("a task");
                    }
                    let elapsed = start.elapsed();
                    drop(store);
                    elapsed.mul_f64(iters as f64 / (per * tasks) as f64)
                }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("store_one_key");
    g.throughput(Throughput::Elements(1));
    for tasks in [1u64, 2, 4, 8] {
        let record = record.clone();
        // How many of the operations acquired the key (claim + complete) rather than found
        // it in flight (claim only).
        let ops = Arc::new(AtomicU64::new(0));
        let acquired = Arc::new(AtomicU64::new(0));
        let (ops2, acquired2) = (Arc::clone(&ops), Arc::clone(&acquired));
        g.bench_function(BenchmarkId::new("tasks", tasks), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let record = record.clone();
                let (ops, acquired) = (Arc::clone(&ops2), Arc::clone(&acquired2));
                async move {
                    let store = MemoryStore::new();
                    let key = Arc::new(StoreKey::new(&Scope::anonymous(), "the-one-key"));
                    let per = iters.div_ceil(tasks);
                    let start = Instant::now();
                    let handles: Vec<_> = (0..tasks)
                        .map(|_| {
                            let (store, record, key) = (store.clone(), record.clone(), key.clone());
                            let acquired = Arc::clone(&acquired);
                            tokio::spawn(async move {
                                // One op: a claim, and when it acquires, a completion with
                                // ttl 0 so that the next claim acquires again.
                                let mut won = 0;
                                for _ in 0..per {
                                    match store
                                        .claim(
                                            &key,
                                            &fp,
                                            tower_idempotency::store::LeaseToken::new(),
                                            lease,
                                        )
                                        .await
                                        .expect("claim")
                                    {
                                        Claim::Acquired(token) => {
                                            won += 1;
                                            store
                                                .complete(
                                                    &key,
                                                    token,
                                                    record.clone(),
                                                    Duration::ZERO,
                                                )
                                                .await
                                                .expect("complete")
                                        }
                                        other => {
                                            black_box(other);
                                        }
                                    }
                                }
                                acquired.fetch_add(won, Ordering::Relaxed);
                            })
                        })
                        .collect();
                    for h in handles {
                        h.await.expect("a task");
                    }
                    let elapsed = start.elapsed();
                    ops.fetch_add(per * tasks, Ordering::Relaxed);
                    elapsed.mul_f64(iters as f64 / (per * tasks) as f64)
                }
            })
        });
        let (ops, acquired) = (
            ops.load(Ordering::Relaxed),
            acquired.load(Ordering::Relaxed),
        );
        if ops > 0 {
            println!(
                "store_one_key/tasks/{tasks}: {:.1}% of {ops} operations acquired the key",
                100.0 * acquired as f64 / ops as f64
            );
        }
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(40)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
}

criterion_group! {
    name = latency;
    config = config();
    targets = uncovered_get, first_request, replay, in_flight_409, first_request_mt
}
criterion_group! {
    name = throughput;
    config = config();
    targets = store_throughput
}
criterion_main!(latency, throughput);
