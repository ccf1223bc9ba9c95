//! The largest durations a user can set (`Duration::MAX` for the lease, the TTL, the wait
//! for a duplicate, `Retry-After` and the store timeout) work the same on every store:
//! nothing panics, the record is stored and replayed, and `Retry-After` is a number a
//! client can use.
//!
//! Redis and PostgreSQL run when `REDIS_URL` / `DATABASE_URL` are set (and the features are
//! on); otherwise those parts say they were skipped.

use crate::common;

use std::time::Duration;

use common::{FaultStore, Runs, assert_problem, call, post};
use tower::Layer;
use tower_idempotency::policy::{InFlight, StoreFailure};
use tower_idempotency::store::MAX_DURATION;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore};

/// Every duration setting at its extreme.
fn extreme(store: impl IdempotencyStore) -> IdempotencyLayer {
    IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .lease(Duration::MAX)
        .ttl(Duration::MAX)
        .retry_after(Duration::MAX)
        .store_timeout(Duration::MAX)
}

fn retry_after_secs(answer: &common::Answer) -> u64 {
    let value = answer.headers["retry-after"].to_str().unwrap();
    let secs: u64 = value.parse().expect("Retry-After is a number of seconds");
    assert!(
        secs >= 1 && secs <= MAX_DURATION.as_secs(),
        "Retry-After {secs} is outside 1..={}",
        MAX_DURATION.as_secs()
    );
    secs
}

async fn extreme_settings_work<S: IdempotencyStore + Clone>(store: S) {
    let runs = Runs::default();
    // A duplicate waits as long as it may, and gets the first answer replayed.
    let svc = extreme(store.clone())
        .on_in_flight(InFlight::Wait(Duration::MAX))
        .layer(runs.handler(Duration::from_millis(300)));
    let key = uuid::Uuid::new_v4().to_string();
    let first = tokio::spawn({
        let svc = svc.clone();
        let key = key.clone();
        async move { call(&svc, post(Some(&key), "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let duplicate =
        tokio::time::timeout(Duration::from_secs(10), call(&svc, post(Some(&key), "{}")))
            .await
            .expect("the waiting duplicate is answered once the first one ends");
    let first = first.await.expect("first request panicked");
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.text(), "run 0");
    assert_eq!(duplicate.status, 201, "{}", duplicate.text());
    assert!(
        duplicate.replayed(),
        "the duplicate replays the first answer"
    );
    assert_eq!(duplicate.text(), "run 0");
    // The record was stored with the longest TTL: a later retry replays it too.
    let retry = call(&svc, post(Some(&key), "{}")).await;
    assert!(retry.replayed(), "a retry replays: {}", retry.text());
    assert_eq!(retry.text(), "run 0");
    assert_eq!(runs.started(), 1, "the operation ran once");

    // A duplicate rejected while the first runs gets a usable Retry-After.
    let svc = extreme(store).layer(runs.handler(Duration::from_millis(300)));
    let key = uuid::Uuid::new_v4().to_string();
    let first = tokio::spawn({
        let svc = svc.clone();
        let key = key.clone();
        async move { call(&svc, post(Some(&key), "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rejected = call(&svc, post(Some(&key), "{}")).await;
    assert_problem(&rejected, 409, "key-in-use");
    retry_after_secs(&rejected);
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(runs.started(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_takes_extreme_durations() {
    extreme_settings_work(MemoryStore::new()).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_takes_extreme_durations() {
    let Ok(url) = std::env::var("REDIS_URL") else {
        println!("skipped: REDIS_URL not set");
        return;
    };
    let store = tower_idempotency::RedisStore::connect(&url)
        .await
        .expect("connect to REDIS_URL")
        .prefix("tower-idempotency-durations:");
    extreme_settings_work(store).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_takes_extreme_durations() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        println!("skipped: DATABASE_URL not set");
        return;
    };
    let pool = sqlx::PgPool::connect(&url)
        .await
        .expect("connect to DATABASE_URL");
    let store = tower_idempotency::PostgresStore::new(pool).table("tower_idempotency_durations");
    store.migrate().await.expect("migrate");
    extreme_settings_work(store).await;
}

/// A store failure answered with the longest `Retry-After` still sends a number of seconds.
#[tokio::test]
async fn store_failure_with_the_longest_retry_after() {
    let store = FaultStore::new(MemoryStore::new());
    store
        .faults
        .claim_failures
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let runs = Runs::default();
    let svc = extreme(store)
        .on_store_failure(StoreFailure::FailClosed)
        .layer(runs.handler(Duration::ZERO));
    let answer = call(&svc, post(Some("k"), "{}")).await;
    assert_problem(&answer, 503, "store-unavailable");
    retry_after_secs(&answer);
    assert_eq!(runs.started(), 0);
}

/// Settings beyond the longest duration every store can keep are clamped to it when set, so
/// the layer means the same thing on every store.
#[test]
fn settings_are_clamped_when_set() {
    let layer = IdempotencyLayer::default()
        .share_keys_across_callers()
        .lease(Duration::MAX)
        .ttl(Duration::MAX)
        .retry_after(Duration::MAX)
        .store_timeout(Duration::MAX)
        .on_in_flight(InFlight::Wait(Duration::MAX));
    let debug = format!("{layer:?}");
    let max = format!("{MAX_DURATION:?}");
    for setting in ["lease", "ttl", "retry_after", "store_timeout"] {
        assert!(
            debug.contains(&format!("{setting}: {max}")),
            "{setting} is not clamped to {max}: {debug}"
        );
    }
    assert!(
        debug.contains(&format!("Wait({max})")),
        "the wait is not clamped: {debug}"
    );
}
