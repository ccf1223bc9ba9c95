//! How soon a duplicate in wait mode gets an answer that was just stored: from the moment
//! the first request's `complete` returns to the moment the waiter's `wait` returns, per
//! store, for a waiter on the same instance (same store object) and on another instance
//! (a second store on its own connections), against the trait's default polling (5 ms
//! doubling to 250 ms, through a wrapper that keeps the default `wait`).
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//! MYSQL_URL=mysql://root@127.0.0.1:3306/test \
//! cargo bench --bench wakeup --features redis,postgres,mysql
//! ```
//!
//! Each trial holds a fresh key for a random 20 to 300 ms (so the completion lands anywhere
//! in a polling schedule) before completing it. `ROUNDS` (default 60) sets the trials per
//! cell. A store whose URL is not set is skipped.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;
use tower_idempotency::store::{Claim, KeyState, LeaseToken, Record, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyStore, Scope, StoreError};

/// A store that keeps the trait's default `wait` (polling), for comparison.
struct Polling<S>(S);

#[async_trait]
impl<S: IdempotencyStore> IdempotencyStore for Polling<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.0.claim(key, fingerprint, token, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.0.complete(key, token, record, ttl).await
    }
    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        self.0.release(key, token).await
    }
    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.0.commit(key, token, ttl).await
    }
    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        self.0.revoke(key, token).await
    }
    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.0.settle(key, record, ttl).await
    }
    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        self.0.inspect(key).await
    }
    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.0.purge(key).await
    }
    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.0.extend(key, token, lease).await
    }
}

const LEASE: Duration = Duration::from_secs(30);

/// Latencies (µs) of `rounds` trials: `owner` holds and completes, `waiter` waits.
async fn trials(
    owner: Arc<dyn IdempotencyStore>,
    waiter: Arc<dyn IdempotencyStore>,
    rounds: usize,
    seed: &mut u64,
) -> Vec<f64> {
    let fp = Fingerprint::from_bytes([1; 32]);
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let key = StoreKey::new(&Scope::anonymous(), &uuid::Uuid::new_v4().to_string());
        let Claim::Acquired(token) = owner
            .claim(&key, &fp, LeaseToken::new(), LEASE)
            .await
            .unwrap()
        else {
            panic!("a fresh key is acquired");
        };
        let waiting = {
            let (waiter, key) = (Arc::clone(&waiter), key.clone());
            tokio::spawn(async move {
                let claim = waiter
                    .wait(&key, &fp, LeaseToken::new(), LEASE, Duration::from_secs(10))
                    .await
                    .unwrap();
                (claim, Instant::now())
            })
        };
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let hold = 20 + (*seed >> 33) % 280;
        tokio::time::sleep(Duration::from_millis(hold)).await;
        let record = Record::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from_static(b"x"),
            None,
        );
        owner.complete(&key, token, record, LEASE).await.unwrap();
        let stored = Instant::now();
        let (claim, answered) = waiting.await.unwrap();
        assert!(matches!(claim, Claim::Completed(_)), "{claim:?}");
        out.push(answered.saturating_duration_since(stored).as_secs_f64() * 1e6);
        let _ = owner.purge(&key).await;
    }
    out
}

fn summary(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "median {:>9.0} µs   p90 {:>9.0} µs   p99 {:>9.0} µs",
        at(0.5),
        at(0.9),
        at(0.99)
    )
}

async fn cells(
    name: &str,
    owner: Arc<dyn IdempotencyStore>,
    other: Arc<dyn IdempotencyStore>,
    rounds: usize,
) {
    let mut seed = 42;
    let polling_other: Arc<dyn IdempotencyStore> = Arc::new(Polling(Arc::clone(&other)));
    let polling_same: Arc<dyn IdempotencyStore> = Arc::new(Polling(Arc::clone(&owner)));
    for (what, waiter) in [
        ("same instance, woken", Arc::clone(&owner)),
        ("other instance, woken", Arc::clone(&other)),
        ("same instance, polling (before)", polling_same),
        ("other instance, polling (before)", polling_other),
    ] {
        let v = trials(Arc::clone(&owner), waiter, rounds, &mut seed).await;
        println!("{name:<10} {what:<34} {}", summary(v));
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(60);
    println!("completion → waiter's answer, {rounds} trials per cell");
    if let Ok(url) = std::env::var("REDIS_URL") {
        let a = tower_idempotency::RedisStore::connect(&url).await.unwrap();
        let b = tower_idempotency::RedisStore::connect(&url).await.unwrap();
        cells("redis", Arc::new(a), Arc::new(b), rounds).await;
    } else {
        println!("redis: skipped (REDIS_URL not set)");
    }
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let pool = || tower_idempotency::sqlx::PgPool::connect(&url);
        let a = tower_idempotency::PostgresStore::new(pool().await.unwrap()).table("wakeup_bench");
        a.migrate().await.unwrap();
        let b = tower_idempotency::PostgresStore::new(pool().await.unwrap()).table("wakeup_bench");
        cells("postgres", Arc::new(a), Arc::new(b), rounds).await;
    } else {
        println!("postgres: skipped (DATABASE_URL not set)");
    }
    if let Ok(url) = std::env::var("MYSQL_URL") {
        let pool = || tower_idempotency::sqlx::MySqlPool::connect(&url);
        let a = tower_idempotency::MySqlStore::new(pool().await.unwrap()).table("wakeup_bench");
        a.migrate().await.unwrap();
        let b = tower_idempotency::MySqlStore::new(pool().await.unwrap()).table("wakeup_bench");
        cells("mysql", Arc::new(a), Arc::new(b), rounds).await;
    } else {
        println!("mysql: skipped (MYSQL_URL not set)");
    }
}
