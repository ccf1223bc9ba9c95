//! What the memory store's size costs per call: the same calls on a store holding a
//! thousand live records and on one holding a million, interleaved in one run.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --bench scale
//! SCALE_ROUNDS=41 SCALE_BATCH=2000 SCALE_LARGE=1000000 SCALE_SMALL=1000 (the defaults)
//! ```
//!
//! Both stores are built alike (`MemoryStore` without a practical cap) and prefilled alike:
//! first requests of 0 B through `IdempotencyLayer` on an axum router (`POST /orders`
//! answering `201` with a 64-byte JSON body), each with a new key, so every record is the
//! size a first request leaves. The large store is prefilled once and keeps the records of
//! the timed first requests (so it grows by `rounds × 2 × batch`, printed); the small one
//! is built and prefilled again before every timed batch that adds records.
//!
//! Per round, on each store in turn (the order alternates every round), one batch of
//! `SCALE_BATCH` calls of each case is timed:
//! - `layer first 0 B`: a new key through the layer;
//! - `layer replay 0 B`: a key answered before, through the layer;
//! - `store claim + complete`: a new key claimed and completed on the store alone;
//! - `store replay claim`: a completed key claimed again on the store alone (what a
//!   replay asks of the store).
//!
//! Prints the medians per case and store, the ratio large ÷ small (target ≤ 1.3), and the
//! resident set and `MemoryStore::bytes()` per record of the large store.

use std::hint::black_box;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header::CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::store::{Claim, LeaseToken, Record, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, Scope};

/// A cap no run reaches.
const NO_CAP: usize = 1 << 40;
const RESPONSE: &[u8] = br#"{"id":"4c1f0a52-6a55-4d39-9a3e-1d4f2b7c9e10","status":"created"}"#;
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(24 * 3600);
const CASES: [&str; 4] = [
    "layer first 0 B",
    "layer replay 0 B",
    "store claim + complete",
    "store replay claim",
];

async fn create(body: Bytes) -> impl IntoResponse {
    black_box(&body);
    (
        StatusCode::CREATED,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        RESPONSE,
    )
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(default)
}

/// `VmRSS` in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .expect("a VmRSS line")
        * 1024
}

fn new_post(key: &str) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri("/orders")
        .header(CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .body(Body::empty())
        .expect("a request")
}

async fn call(app: &Router, request: Request<Body>) -> StatusCode {
    let Ok(response) = app.clone().oneshot(request).await;
    let status = response.status();
    black_box(response.into_body().collect().await.expect("a body"));
    status
}

/// A store under test: the store, the layer over the router, and the keys of its replays.
struct Subject {
    store: MemoryStore,
    app: Router,
    replay_key: String,
    store_replay_key: StoreKey,
    /// Distinguishes the keys of every batch.
    serial: usize,
    name: &'static str,
}

impl Subject {
    async fn new(name: &'static str, records: usize) -> Self {
        let store = MemoryStore::builder().max_bytes(NO_CAP).build();
        let app = Router::new()
            .route("/orders", post(create))
            .layer(IdempotencyLayer::new(store.clone()).share_keys_across_callers());
        for i in 0..records {
            let status = call(&app, new_post(&format!("prefill-{name}-{i:010}"))).await;
            assert_eq!(status, StatusCode::CREATED, "prefill");
        }
        let replay_key = format!("replay-{name}");
        assert_eq!(call(&app, new_post(&replay_key)).await, StatusCode::CREATED);
        let store_replay_key = StoreKey::new(&Scope::anonymous(), &format!("store-replay-{name}"));
        let token = LeaseToken::new();
        let Ok(Claim::Acquired(_)) = store
            .claim(&store_replay_key, &fingerprint(), token, LEASE)
            .await
        else {
            panic!("a fresh key")
        };
        store
            .complete(&store_replay_key, token, record(), TTL)
            .await
            .expect("complete");
        Self {
            store,
            app,
            replay_key,
            store_replay_key,
            serial: 0,
            name,
        }
    }

    /// Times `n` calls of case `case`; ns per call.
    async fn time(&mut self, case: usize, n: usize) -> f64 {
        self.serial += 1;
        let serial = self.serial;
        match case {
            0 => {
                let requests: Vec<_> = (0..n)
                    .map(|i| new_post(&format!("first-{}-{serial}-{i:08}", self.name)))
                    .collect();
                let start = Instant::now();
                for request in requests {
                    assert_eq!(call(&self.app, request).await, StatusCode::CREATED);
                }
                start.elapsed().as_nanos() as f64 / n as f64
            }
            1 => {
                let requests: Vec<_> = (0..n).map(|_| new_post(&self.replay_key)).collect();
                let start = Instant::now();
                for request in requests {
                    assert_eq!(call(&self.app, request).await, StatusCode::CREATED);
                }
                start.elapsed().as_nanos() as f64 / n as f64
            }
            2 => {
                let keys: Vec<_> = (0..n)
                    .map(|i| {
                        StoreKey::new(
                            &Scope::anonymous(),
                            &format!("store-{}-{serial}-{i:08}", self.name),
                        )
                    })
                    .collect();
                let records: Vec<_> = (0..n).map(|_| record()).collect();
                let fp = fingerprint();
                let start = Instant::now();
                for (key, record) in keys.iter().zip(records) {
                    let token = LeaseToken::new();
                    let Ok(Claim::Acquired(_)) = self.store.claim(key, &fp, token, LEASE).await
                    else {
                        panic!("a fresh key")
                    };
                    self.store
                        .complete(key, token, record, TTL)
                        .await
                        .expect("complete");
                }
                start.elapsed().as_nanos() as f64 / n as f64
            }
            _ => {
                let fp = fingerprint();
                let start = Instant::now();
                for _ in 0..n {
                    let claim = self
                        .store
                        .claim(&self.store_replay_key, &fp, LeaseToken::new(), LEASE)
                        .await;
                    let Ok(Claim::Completed(record)) = claim else {
                        panic!("a completed key")
                    };
                    black_box(record);
                }
                start.elapsed().as_nanos() as f64 / n as f64
            }
        }
    }
}

fn fingerprint() -> Fingerprint {
    Fingerprint::from_bytes([5; 32])
}

fn record() -> Record {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Record::new(
        StatusCode::CREATED,
        headers,
        Bytes::from_static(RESPONSE),
        None,
    )
    .with_fingerprint(fingerprint())
}

fn median(samples: &mut [f64]) -> f64 {
    quantile(samples, 0.5)
}

fn quantile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let at = q * (samples.len() - 1) as f64;
    let (low, high) = (at.floor() as usize, at.ceil() as usize);
    samples[low] + (samples[high] - samples[low]) * (at - low as f64)
}

fn main() {
    let rounds = env("SCALE_ROUNDS", 41);
    let batch = env("SCALE_BATCH", 2000);
    let large_n = env("SCALE_LARGE", 1_000_000);
    let small_n = env("SCALE_SMALL", 1000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        println!(
            "scale bench: {rounds} rounds, batches of {batch} calls, {small_n} against {large_n} \
             live records; load {}",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        );
        // The large store first, alone, for its resident set per record.
        let before = rss();
        let started = Instant::now();
        let mut large = Subject::new("large", large_n).await;
        let prefill = started.elapsed();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let after = rss();
        println!(
            "large store: {} records prefilled through the layer in {:.1} s ({:.2} µs each); \
             RSS +{:.0} MiB = {:.0} B per record; MemoryStore::bytes() {:.0} B per record",
            large.store.len(),
            prefill.as_secs_f64(),
            prefill.as_secs_f64() * 1e6 / large_n as f64,
            (after.saturating_sub(before)) as f64 / (1 << 20) as f64,
            after.saturating_sub(before) as f64 / large_n as f64,
            large.store.bytes() as f64 / large.store.len() as f64,
        );
        let mut small = Subject::new("small", small_n).await;
        // Warm both.
        for case in 0..CASES.len() {
            small.time(case, batch / 4).await;
            large.time(case, batch / 4).await;
        }
        let mut samples = vec![[Vec::new(), Vec::new()]; CASES.len()];
        let mut small_max = 0;
        for round in 0..rounds {
            for (case, per_case) in samples.iter_mut().enumerate() {
                for turn in 0..2 {
                    let which = (turn + round) % 2;
                    let ns = if which == 0 {
                        if case == 0 || case == 2 {
                            // Back to its size before a batch that adds records.
                            small = Subject::new("small", small_n).await;
                        }
                        let ns = small.time(case, batch).await;
                        small_max = small_max.max(small.store.len());
                        ns
                    } else {
                        large.time(case, batch).await
                    };
                    per_case[which].push(ns);
                }
            }
        }
        println!(
            "live records while timing: small {small_n} to {small_max}, large {large_n} to {}",
            large.store.len()
        );
        println!();
        println!(
            "| case | {small_n} records (ns, median [IQR]) | {large_n} records (ns, median [IQR]) | large ÷ small |"
        );
        println!("|---|---:|---:|---:|");
        for (case, [s, l]) in samples.iter_mut().enumerate() {
            let show = |v: &mut Vec<f64>| {
                format!(
                    "{:.0} [{:.0}–{:.0}]",
                    median(v),
                    quantile(v, 0.25),
                    quantile(v, 0.75)
                )
            };
            let ratio = median(l) / median(s);
            println!(
                "| {} | {} | {} | {ratio:.2} |",
                CASES[case],
                show(s),
                show(l)
            );
        }
        println!();
        println!(
            "load after: {}",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        );
        // Dropping a million records is teardown, not a cost per call.
        std::mem::forget(large);
    });
}
