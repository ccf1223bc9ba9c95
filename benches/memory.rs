//! What the memory store costs in memory: bytes held per record against the response body
//! size, and whether the default 64 MiB cap holds over a million distinct keys.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --bench memory
//! ```
//!
//! Each scenario runs in a child process of its own (this binary, re-executed), so that the
//! resident set of one scenario never hides in memory the allocator kept from another. The
//! resident set (`VmRSS`) and its peak (`VmHWM`) come from `/proc/self/status`; they include
//! the allocator's (glibc malloc's) own overhead, which is what a server pays.
//!
//! Scenarios:
//! - `per-record BODY N`: N first requests through `IdempotencyLayer` on a store with no
//!   practical cap; the handler answers `201` with a `Content-Type`, a `Location` and a
//!   freshly allocated body of BODY bytes (so every record holds its own body, as with a
//!   real handler). Prints resident bytes per record and `MemoryStore::bytes()` per record.
//! - `cap BODY N`: N distinct keys claimed and completed directly on a store with the
//!   default 64 MiB cap and a replay window of one second, records of BODY bytes; a claim
//!   refused as full waits 20 ms and tries again (as a client obeying `Retry-After` would).
//!   Prints the store, the resident set against the cap every tenth of the way, the
//!   evictions and refusals, and the time per key.
//! - `uncapped BODY N`: the same with a cap that is never reached, to compare the time per
//!   key (what eviction costs) and the resident set without a cap.
//! - `flood BODY N`: the default store (64 MiB, five-minute window): 10,000 keys answered
//!   first, then a flood of N distinct keys, then a retry of each of the 10,000. Prints how
//!   many flood keys were stored and refused, the resident set against the cap, and how
//!   many retries would have run again (must be 0).

use std::convert::Infallible;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LOCATION};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_idempotency::store::{Claim, Record, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, Scope};

/// A cap no scenario reaches.
const NO_CAP: usize = 1 << 40;

/// (scenario, body bytes, count)
const SCENARIOS: &[(&str, usize, usize)] = &[
    ("per-record", 0, 100_000),
    ("per-record", 1024, 100_000),
    ("per-record", 16 * 1024, 20_000),
    ("cap", 0, 1_000_000),
    ("cap", 1024, 1_000_000),
    ("uncapped", 0, 1_000_000),
    ("flood", 0, 1_000_000),
    ("flood", 1024, 300_000),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let scenario = args[i + 1].as_str();
        let body: usize = args[i + 2].parse().expect("a body size");
        let n: usize = args[i + 3].parse().expect("a count");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        match scenario {
            "per-record" => rt.block_on(per_record(body, n)),
            "cap" => rt.block_on(distinct_keys(
                MemoryStore::builder()
                    .min_retention(Duration::from_secs(1))
                    .build(),
                "cap",
                body,
                n,
            )),
            "flood" => rt.block_on(flood(body, n)),
            "uncapped" => rt.block_on(distinct_keys(
                MemoryStore::builder().max_bytes(NO_CAP).build(),
                "uncapped",
                body,
                n,
            )),
            other => panic!("unknown scenario {other}"),
        }
        return;
    }
    // `cargo bench` passes `--bench`, and may pass a filter: run the scenarios whose name
    // contains it.
    let filter = args.iter().find(|a| !a.starts_with("--"));
    let exe = std::env::current_exe().expect("this binary");
    println!("memory bench: one child process per scenario; RSS from /proc/self/status");
    for &(scenario, body, n) in SCENARIOS {
        if filter.is_some_and(|f| !scenario.contains(f.as_str())) {
            continue;
        }
        let status = Command::new(&exe)
            .args(["--child", scenario, &body.to_string(), &n.to_string()])
            .status()
            .expect("run a scenario");
        assert!(status.success(), "scenario {scenario} {body} {n} failed");
    }
}

/// `(VmRSS, VmHWM)` in bytes.
fn rss() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .expect("a VmRSS / VmHWM line")
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn per_record(body: usize, n: usize) {
    let store = MemoryStore::builder().max_bytes(NO_CAP).build();
    let handler = move |req: Request<Full<Bytes>>| async move {
        let _ = req.into_body().collect().await?;
        let mut res = Response::new(Full::new(Bytes::from(vec![b'x'; body])));
        *res.status_mut() = StatusCode::CREATED;
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        res.headers_mut().insert(
            LOCATION,
            HeaderValue::from_static("/orders/4c1f0a52-6a55-4d39-9a3e-1d4f2b7c9e10"),
        );
        Ok::<_, Infallible>(res)
    };
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .layer(tower::service_fn(handler));
    let payload = Bytes::from_static(br#"{"item":"book","amount":12}"#);
    let send = |i: usize| {
        let req = Request::post("/orders")
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", format!("order-{i:012}"))
            .body(Full::new(payload.clone()))
            .expect("a request");
        let svc = svc.clone();
        async move {
            let res = svc.oneshot(req).await.expect("an answer");
            assert_eq!(res.status(), StatusCode::CREATED);
            res.into_body().collect().await.expect("a body");
        }
    };
    // Warm up the runtime, the allocator and the map before the first reading.
    for i in 0..1_000 {
        send(i).await;
    }
    let (before, _) = rss();
    let bytes_before = store.bytes();
    let len_before = store.len();
    let start = Instant::now();
    for i in 1_000..1_000 + n {
        send(i).await;
    }
    let elapsed = start.elapsed();
    // Let the spawned tasks that settled claims finish.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (after, _) = rss();
    let records = store.len() - len_before;
    assert_eq!(records, n);
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    let estimate = (store.bytes() - bytes_before) as f64 / n as f64;
    println!(
        "per-record body={body:>6} B  n={n:>7}  RSS/record={per:>8.0} B  \
         overhead/record={:>6.0} B  MemoryStore::bytes()/record={estimate:>7.0} B  \
         RSS {:.1} -> {:.1} MiB  ({:.2} µs/request)",
        per - body as f64,
        mib(before),
        mib(after),
        elapsed.as_secs_f64() * 1e6 / n as f64,
    );
}

async fn distinct_keys(store: MemoryStore, name: &str, body: usize, n: usize) {
    let fp = Fingerprint::from_bytes([5; 32]);
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_secs(24 * 3600);
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let (start_rss, _) = rss();
    println!(
        "{name} body={body} B, {n} distinct keys, cap {} (RSS at start {:.1} MiB)",
        if name == "cap" {
            "64 MiB (default), replay window 1 s"
        } else {
            "none"
        },
        mib(start_rss)
    );
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let t = Instant::now();
        let key = StoreKey::new(&Scope::anonymous(), &format!("key-{i:012}"));
        let token = loop {
            let token = tower_idempotency::store::LeaseToken::new();
            match store.claim(&key, &fp, token, lease).await {
                Ok(Claim::Acquired(_)) => break token,
                Err(tower_idempotency::StoreError::Full) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("a fresh key: {other:?}"),
            }
        };
        let record = Record::new(
            StatusCode::CREATED,
            headers.clone(),
            Bytes::from(vec![b'x'; body]),
            None,
        )
        .with_fingerprint(fp);
        store
            .complete(&key, token, record, ttl)
            .await
            .expect("complete");
        slowest = slowest.max(t.elapsed());
        if (i + 1) % (n / 10) == 0 {
            let (now, peak) = rss();
            println!(
                "  {:>8} keys: entries {:>8}  MemoryStore::bytes() {:>6.1} MiB  \
                 RSS {:>7.1} MiB  peak RSS {:>7.1} MiB  evictions {:>8}  refusals {:>6}",
                i + 1,
                store.len(),
                mib(store.bytes()),
                mib(now),
                mib(peak),
                store.evictions(),
                store.refusals(),
            );
        }
    }
    let elapsed = start.elapsed();
    println!(
        "  {name} body={body} B: {:.3} µs per key (claim + complete) on average, slowest \
         key {:.1} ms, {:.1} s in all",
        elapsed.as_secs_f64() * 1e6 / n as f64,
        slowest.as_secs_f64() * 1e3,
        elapsed.as_secs_f64()
    );
}

/// Claims and completes `key`; `false` when the store refused the claim as full.
async fn answer(store: &MemoryStore, key: &StoreKey, record: &Record) -> bool {
    let token = tower_idempotency::store::LeaseToken::new();
    match store
        .claim(key, record.fingerprint(), token, Duration::from_secs(30))
        .await
    {
        Ok(Claim::Acquired(_)) => {
            store
                .complete(key, token, record.clone(), Duration::from_secs(24 * 3600))
                .await
                .expect("complete");
            true
        }
        Err(tower_idempotency::StoreError::Full) => false,
        other => panic!("a fresh key: {other:?}"),
    }
}

async fn flood(body: usize, n: usize) {
    const MARKERS: usize = 10_000;
    let cap = 64 << 20;
    let store = MemoryStore::new();
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let record = |i: usize| {
        // A body of its own per record, as a real handler makes.
        let mut b = vec![b'x'; body];
        if let Some(first) = b.first_mut() {
            *first = (i % 251) as u8;
        }
        Record::new(StatusCode::CREATED, headers.clone(), Bytes::from(b), None)
            .with_fingerprint(Fingerprint::from_bytes([5; 32]))
    };
    let (start_rss, _) = rss();
    for i in 0..MARKERS {
        let key = StoreKey::new(&Scope::anonymous(), &format!("marker-{i:08}"));
        assert!(answer(&store, &key, &record(i)).await, "marker {i} refused");
    }
    let start = Instant::now();
    let mut stored = 0usize;
    let mut refused = 0usize;
    for i in 0..n {
        let key = StoreKey::new(&Scope::anonymous(), &format!("flood-{i:012}"));
        if answer(&store, &key, &record(i)).await {
            stored += 1;
        } else {
            refused += 1;
        }
    }
    let flood_time = start.elapsed();
    let mut reruns = 0;
    for i in 0..MARKERS {
        let key = StoreKey::new(&Scope::anonymous(), &format!("marker-{i:08}"));
        match store
            .claim(
                &key,
                &Fingerprint::from_bytes([5; 32]),
                tower_idempotency::store::LeaseToken::new(),
                Duration::from_secs(30),
            )
            .await
        {
            Ok(Claim::Completed(_)) => {}
            _ => reruns += 1,
        }
    }
    let (now, peak) = rss();
    println!(
        "flood body={body} B: {MARKERS} keys answered, then {n} distinct keys in {:.1} s \
         ({:.2} µs each): {stored} stored, {refused} refused (503 store-full); \
         evictions {}; retries of the {MARKERS} that would run again: {reruns}",
        flood_time.as_secs_f64(),
        flood_time.as_secs_f64() * 1e6 / n as f64,
        store.evictions(),
    );
    println!(
        "  MemoryStore::bytes() {:.1} MiB of a {:.0} MiB cap; RSS {:.1} MiB (peak {:.1}), \
         {:.1} MiB at start: RSS above the start is {:.2}x the cap, peak RSS {:.2}x",
        mib(store.bytes()),
        mib(cap),
        mib(now),
        mib(peak),
        mib(start_rss),
        (now - start_rss) as f64 / cap as f64,
        peak as f64 / cap as f64,
    );
    assert_eq!(reruns, 0, "a record inside the replay window was forgotten");
}
