//! The `metrics` feature: a recording recorder sees the counts of a scripted sequence.
#![cfg(feature = "metrics")]

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use std::sync::atomic::Ordering;

use common::{FaultStore, call, post as post_req};
use http::StatusCode;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower_idempotency::store::{KeyState, StoreKey};
use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, IdempotencyStore, MemoryStore, Scope};

/// Every metric as `name{label=value,…}` → value (counters and gauges), or the number of
/// samples (histograms).
fn snapshot(snapshotter: &Snapshotter) -> HashMap<String, f64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            let value = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(samples) => samples.len() as f64,
            };
            (name, value)
        })
        .collect()
}

// The recorder is this thread's own, not the process's: the other tests of this binary run
// layers at the same time, and a global recorder would count their requests too. The
// runtime is single-threaded, so every task the layer and the stores spawn (the heartbeat,
// detached completions, sweeps) records on this thread as well.
#[tokio::test]
async fn a_scripted_sequence_is_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _recorder = metrics::set_default_local_recorder(&recorder);

    let store = MemoryStore::new();
    let app = Router::new()
        .route(
            "/orders",
            post(|body: String| async move {
                if body == "slow" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                (StatusCode::CREATED, "made")
            }),
        )
        .route(
            "/crash",
            post(|claim: IdempotencyClaim| async move {
                claim.commit().await.expect("commit point");
                panic!("crashed after the commit point");
                #[allow(unreachable_code)]
                ()
            }),
        )
        .layer(
            IdempotencyLayer::new(store.clone())
                .share_keys_across_callers()
                .lease(Duration::from_secs(30)),
        );

    // executed, replayed, mismatch
    assert_eq!(call(&app, post_req(Some("a"), "x")).await.status, 201);
    assert!(call(&app, post_req(Some("a"), "x")).await.replayed());
    assert_eq!(call(&app, post_req(Some("a"), "y")).await.status, 422);
    // executed + in flight
    let slow = tokio::spawn({
        let app = app.clone();
        async move { call(&app, post_req(Some("b"), "slow")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(call(&app, post_req(Some("b"), "slow")).await.status, 409);
    assert_eq!(slow.await.unwrap().status, 201);
    // rejected: no key
    assert_eq!(call(&app, post_req(None, "x")).await.status, 400);
    // a committed operation that crashed, then its retry: outcome unknown
    let crash = || {
        http::Request::post("/crash")
            .header("idempotency-key", "c")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let app2 = app.clone();
    assert!(
        tokio::spawn(async move { call(&app2, crash()).await })
            .await
            .unwrap_err()
            .is_panic()
    );
    let key = StoreKey::new(&Scope::anonymous(), "c");
    // (A snapshot drains what it reads, so the key is watched in the store instead.)
    for _ in 0..200 {
        if matches!(
            store.inspect(&key).await.unwrap(),
            KeyState::OutcomeUnknown { .. }
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(
        store.inspect(&key).await.unwrap(),
        KeyState::OutcomeUnknown { .. }
    ));
    // The counter follows the store's answer on the same task, a moment later.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(call(&app, crash()).await.status, 500);
    store.sweep();
    // (Counters are drained by each snapshot: this one holds the sequence above.)
    let first = snapshot(&snapshotter);

    // A failed completion, retried; a lost claim reply, its orphan released; a key purged
    // under its running operation (its lease is lost). On a store that counts as "custom".
    let faulty = FaultStore::new(MemoryStore::new());
    let purge_under = faulty.clone();
    let faulty_app = Router::new()
        .route(
            "/orders",
            post(move |claim: IdempotencyClaim, body: String| {
                let store = purge_under.clone();
                async move {
                    if body == "purge" {
                        store.purge(claim.store_key()).await.unwrap();
                    }
                    (StatusCode::CREATED, "made")
                }
            }),
        )
        .layer(IdempotencyLayer::new(faulty.clone()).share_keys_across_callers());
    faulty.faults.complete_failures.store(1, Ordering::SeqCst);
    assert_eq!(
        call(&faulty_app, post_req(Some("f1"), "x")).await.status,
        201
    );
    faulty.faults.claim_lost_replies.store(1, Ordering::SeqCst);
    assert_eq!(
        call(&faulty_app, post_req(Some("f2"), "x")).await.status,
        503
    );
    for _ in 0..200 {
        if faulty.faults.released.load(Ordering::SeqCst) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        call(&faulty_app, post_req(Some("f3"), "purge"))
            .await
            .status,
        201
    );

    // Evictions: a small store whose records left their one-second window.
    let small = MemoryStore::builder()
        .max_bytes(8 * 1024)
        .min_retention(Duration::from_secs(1))
        .build();
    let small_app = Router::new()
        .route("/orders", post(|| async { (StatusCode::CREATED, "made") }))
        .layer(IdempotencyLayer::new(small.clone()).share_keys_across_callers());
    for i in 0..8 {
        call(&small_app, post_req(Some(&format!("s{i}")), "x")).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 8..16 {
        call(&small_app, post_req(Some(&format!("s{i}")), "x")).await;
    }
    assert!(small.evictions() > 0);
    let second = snapshot(&snapshotter);

    let m = &first;
    let get = |name: &str| m.get(name).copied().unwrap_or(0.0);
    assert_eq!(
        get("idempotency_requests_total{outcome=executed}"),
        2.0,
        "{m:#?}"
    );
    assert_eq!(get("idempotency_requests_total{outcome=replayed}"), 1.0);
    assert_eq!(get("idempotency_requests_total{outcome=mismatch}"), 1.0);
    assert_eq!(get("idempotency_requests_total{outcome=in_flight}"), 1.0);
    assert_eq!(get("idempotency_requests_total{outcome=rejected}"), 1.0);
    assert_eq!(
        get("idempotency_requests_total{outcome=outcome_unknown}"),
        1.0
    );
    assert_eq!(get("idempotency_unknown_outcomes_total{}"), 1.0);
    // Store calls, by operation and backend: 7 claims (a ×3, b ×2, c ×2), 2 completions,
    // 1 commit, 1 release (refused: committed).
    assert_eq!(
        get("idempotency_store_call_duration_seconds{backend=memory,op=claim,result=ok}"),
        7.0
    );
    assert_eq!(
        get("idempotency_store_call_duration_seconds{backend=memory,op=complete,result=ok}"),
        2.0
    );
    assert_eq!(
        get("idempotency_store_call_duration_seconds{backend=memory,op=commit,result=ok}"),
        1.0
    );
    assert_eq!(
        get("idempotency_store_call_duration_seconds{backend=memory,op=release,result=error}"),
        1.0
    );
    // The memory store's gauges, as of its last sweep.
    assert_eq!(get("idempotency_memory_entries{}"), store.len() as f64);
    assert_eq!(get("idempotency_memory_bytes{}"), store.bytes() as f64);
    assert_eq!(store.len(), 3);

    let m = &second;
    let get = |name: &str| m.get(name).copied().unwrap_or(0.0);
    assert_eq!(get("idempotency_completion_retries_total{}"), 1.0, "{m:#?}");
    assert_eq!(get("idempotency_orphan_releases_total{}"), 1.0);
    assert_eq!(get("idempotency_lost_leases_total{}"), 1.0);
    assert_eq!(
        get("idempotency_memory_evictions_total{}"),
        small.evictions() as f64
    );
    // The injected failure, and the completion that found its key purged (lease lost).
    assert_eq!(
        get("idempotency_store_call_duration_seconds{backend=custom,op=complete,result=error}"),
        2.0
    );
}

/// No label takes a value a client chose: hostile keys, paths, bodies and methods leave
/// only the documented label values (bounded cardinality).
#[tokio::test]
async fn no_label_takes_a_client_chosen_value() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _recorder = metrics::set_default_local_recorder(&recorder);
    let app = Router::new()
        .route("/{*path}", post(|body: String| async move { body }))
        .layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers());
    for n in 0..50 {
        let mut req = post_req(Some(&format!("key-{n}-<script>{{}}")), &format!("body {n}"));
        *req.uri_mut() = format!("/path-{n}/x?q={n}").parse().unwrap();
        call(&app, req).await;
        let mut bad = post_req(Some(&format!("\"key {n}\" ; drop")), "b");
        *bad.uri_mut() = format!("/evil-{n}").parse().unwrap();
        call(&app, bad).await;
    }
    let allowed_labels: &[(&str, &[&str])] = &[
        (
            "outcome",
            &[
                "passed_through",
                "executed",
                "replayed",
                "in_flight",
                "mismatch",
                "rejected",
                "not_stored",
                "store_unavailable",
                "store_full",
                "unprotected",
                "record_unreadable",
                "outcome_unknown",
                "recovered",
            ],
        ),
        (
            "op",
            &[
                "claim", "wait", "complete", "release", "revoke", "commit", "settle", "inspect",
                "extend",
            ],
        ),
        (
            "backend",
            &["memory", "redis", "postgres", "mysql", "custom"],
        ),
        // Store calls (`ok`, `error`) and recoveries (`recovered`, `never-ran`, `none`, `error`).
        ("result", &["ok", "error", "recovered", "never-ran", "none"]),
    ];
    let snapshot = snapshot(&snapshotter);
    assert!(
        snapshot
            .keys()
            .any(|k| k.starts_with("idempotency_requests_total{outcome=executed")),
        "{snapshot:?}"
    );
    for name in snapshot.keys() {
        let labels = name
            .split_once('{')
            .map(|(_, rest)| rest.trim_end_matches('}'))
            .unwrap_or("");
        for label in labels.split(',').filter(|l| !l.is_empty()) {
            let (key, value) = label.split_once('=').unwrap();
            let allowed = allowed_labels
                .iter()
                .find(|(k, _)| *k == key)
                .unwrap_or_else(|| panic!("an undocumented label {key} in {name}"));
            assert!(allowed.1.contains(&value), "{key}={value} in {name}");
        }
    }
}

/// Retries answered from the replay cache are counted, and make no store call: the claim
/// histogram counts the store's calls only.
#[tokio::test]
async fn replays_answered_from_the_cache_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _recorder = metrics::set_default_local_recorder(&recorder);

    let store = FaultStore::new(MemoryStore::new());
    let app = Router::new()
        .route("/orders", post(|| async { (StatusCode::CREATED, "made") }))
        .layer(
            IdempotencyLayer::new(store.clone())
                .share_keys_across_callers()
                .cache_replays(1 << 20, Duration::from_secs(60)),
        );
    for _ in 0..4 {
        call(&app, post_req(Some("k"), "{}")).await;
    }
    let counts = snapshot(&snapshotter);
    assert_eq!(
        counts.get("idempotency_replay_cache_hits_total{}"),
        Some(&3.0),
        "{counts:?}"
    );
    assert_eq!(
        counts.get("idempotency_requests_total{outcome=replayed}"),
        Some(&3.0)
    );
    let claim_calls: f64 = counts
        .iter()
        .filter(|(k, _)| {
            k.starts_with("idempotency_store_call_duration_seconds") && k.contains("op=claim")
        })
        .map(|(_, n)| n)
        .sum();
    assert_eq!(claim_calls, 1.0, "{counts:?}");
    assert_eq!(store.faults.claims.load(Ordering::SeqCst), 1);
}
