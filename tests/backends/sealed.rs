//! Records sealed at rest (`store::sealed`): the conformance suite with encryption on for
//! every store; no plaintext byte of a body or a header in the raw values Redis,
//! PostgreSQL and MySQL hold; a record moved to another key, a flipped bit, an unknown key,
//! a plaintext record; rotation across two instances with different rings; a fleet
//! mid-rollout.
#![cfg(feature = "encryption")]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tower::{Layer, ServiceExt};
use tower_idempotency::store::sealed::{Keyring, Sealed};
use tower_idempotency::store::{Claim, KeyState, LeaseToken, Record, StoreKey};
use tower_idempotency::{
    Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, Scope, StoreError,
};

fn ring_a() -> Keyring {
    Keyring::new("k1", [1; 32]).unwrap()
}

/// The next ring: k2 seals, k1 still opens.
fn ring_b() -> Keyring {
    Keyring::new("k2", [2; 32])
        .unwrap()
        .with_old_key("k1", [1; 32])
        .unwrap()
}

const SECRET: &str = "card-4242-4242-4242-4242";

/// A layer over `store` in front of a handler that answers a secret in its body and a
/// header, counting its runs.
async fn ask<S: IdempotencyStore + Clone>(
    store: S,
    runs: &Arc<AtomicUsize>,
    key: &str,
) -> (StatusCode, Bytes) {
    let runs = Arc::clone(runs);
    let svc = IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .layer(tower::service_fn(move |_req: Request<Body>| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .header("x-card", SECRET)
                        .body(Body::from(format!("{{\"card\":\"{SECRET}\"}}")))
                        .unwrap(),
                )
            }
        }));
    let req = Request::post("/cards")
        .header("idempotency-key", key)
        .body(Body::from("{}"))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, body)
}

fn key(k: &str) -> StoreKey {
    StoreKey::new(&Scope::anonymous(), k)
}

fn fp() -> Fingerprint {
    Fingerprint::from_bytes([5; 32])
}

/// Completes `key` on `store` directly with `record`.
async fn put(store: &impl IdempotencyStore, k: &StoreKey, record: Record) {
    let token = LeaseToken::new();
    let claim = store
        .claim(k, record.fingerprint(), token, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
    store
        .complete(k, token, record, Duration::from_secs(60))
        .await
        .unwrap();
}

/// The record `store` holds under `k`, as it holds it.
async fn raw(store: &impl IdempotencyStore, k: &StoreKey) -> Record {
    match store.inspect(k).await.unwrap() {
        KeyState::Completed { record, .. } => (*record).clone(),
        other => panic!("not completed: {other}"),
    }
}

fn record(body: &str) -> Record {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-card", SECRET.parse().unwrap());
    Record::new(StatusCode::OK, headers, Bytes::from(body.to_owned()), None).with_fingerprint(fp())
}

#[tokio::test]
async fn a_sealed_record_keeps_no_plaintext_and_replays_as_it_was() {
    let memory = MemoryStore::new();
    let sealed = Sealed::new(memory.clone(), ring_a());
    let runs = Arc::new(AtomicUsize::new(0));
    let first = ask(sealed.clone(), &runs, "c1").await;
    let again = ask(sealed.clone(), &runs, "c1").await;
    assert_eq!(first, again);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stored = raw(&memory, &key("c1")).await;
    assert!(!String::from_utf8_lossy(&stored.encode()).contains(SECRET));
    assert_eq!(
        stored.headers().len(),
        1,
        "only the seal's key id: {:?}",
        stored.headers()
    );
    assert_eq!(stored.headers()["idempotency-sealed"], "k1");
}

#[tokio::test]
async fn a_record_moved_to_another_key_does_not_open() {
    let memory = MemoryStore::new();
    let sealed = Sealed::new(memory.clone(), ring_a());
    put(&sealed, &key("a"), record("order 1")).await;
    let moved = raw(&memory, &key("a")).await;
    put(&memory, &key("b"), moved).await;
    let read = sealed
        .claim(&key("b"), &fp(), LeaseToken::new(), Duration::from_secs(1))
        .await;
    assert!(matches!(read, Err(StoreError::Decode(_))), "{read:?}");
}

#[tokio::test]
async fn a_flipped_bit_anywhere_in_the_sealed_body_is_refused() {
    let memory = MemoryStore::new();
    let sealed = Sealed::new(memory.clone(), ring_a());
    put(&sealed, &key("src"), record("order 1")).await;
    let stored = raw(&memory, &key("src")).await;
    for at in [0, 12, 24, stored.body().len() / 2, stored.body().len() - 1] {
        let mut body = stored.body().to_vec();
        body[at] ^= 0x01;
        let tampered = Record::new(
            stored.status(),
            stored.headers().clone(),
            Bytes::from(body),
            None,
        )
        .with_fingerprint(*stored.fingerprint());
        let k = key(&format!("t{at}"));
        // Sealed for this very key: only the flipped bit differs.
        put(&sealed, &k, record("order 1")).await;
        memory.purge(&k).await.unwrap();
        put(&memory, &k, tampered).await;
        let read = sealed
            .claim(&k, &fp(), LeaseToken::new(), Duration::from_secs(1))
            .await;
        assert!(
            matches!(read, Err(StoreError::Decode(_))),
            "bit at {at}: {read:?}"
        );
    }
    // And a changed status in the clear.
    let relabelled = Record::new(
        StatusCode::CREATED,
        stored.headers().clone(),
        stored.body().clone(),
        None,
    )
    .with_fingerprint(*stored.fingerprint());
    memory.purge(&key("src")).await.unwrap();
    put(&memory, &key("src"), relabelled).await;
    let read = sealed
        .claim(
            &key("src"),
            &fp(),
            LeaseToken::new(),
            Duration::from_secs(1),
        )
        .await;
    assert!(matches!(read, Err(StoreError::Decode(_))), "{read:?}");
}

#[tokio::test]
async fn an_unknown_key_or_a_plaintext_record_is_unreadable_and_never_runs_again() {
    let memory = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    // Sealed under k2, read by a ring without it.
    ask(Sealed::new(memory.clone(), ring_b()), &runs, "r1").await;
    let (status, body) = ask(Sealed::new(memory.clone(), ring_a()), &runs, "r1").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(String::from_utf8_lossy(&body).contains("record-unreadable"));
    // Written in the clear, read where records are sealed.
    ask(memory.clone(), &runs, "p1").await;
    let (status, _) = ask(Sealed::new(memory.clone(), ring_a()), &runs, "p1").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "neither ran again");
    // While a fleet turns encryption on, plaintext records may still be replayed.
    let (status, body) = ask(
        Sealed::new(memory.clone(), ring_a()).accept_plaintext(true),
        &runs,
        "p1",
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(String::from_utf8_lossy(&body).contains(SECRET));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Two instances on one store, the second already rotated to k2 (k1 still in its ring):
/// the second replays what the first sealed; the first cannot open what the second sealed,
/// answers record-unreadable, and never runs it again.
#[tokio::test]
async fn rotation_across_two_instances_with_different_rings_never_runs_twice() {
    let memory = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let old = Sealed::new(memory.clone(), ring_a());
    let new = Sealed::new(memory.clone(), ring_b());
    let first = ask(old.clone(), &runs, "o1").await;
    assert_eq!(ask(new.clone(), &runs, "o1").await, first, "k1 still opens");
    let sealed_by_new = ask(new.clone(), &runs, "o2").await;
    assert_eq!(sealed_by_new.0, StatusCode::CREATED);
    let (status, _) = ask(old.clone(), &runs, "o2").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        raw(&memory, &key("o2")).await.headers()["idempotency-sealed"],
        "k2"
    );
}

/// An instance that does not seal (no ring at all) meets a sealed record: it never replays
/// the ciphertext as the answer, and never runs the operation again.
#[tokio::test]
async fn an_instance_that_does_not_seal_refuses_a_sealed_record() {
    let memory = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    ask(Sealed::new(memory.clone(), ring_a()), &runs, "m1").await;
    let (status, body) = ask(memory.clone(), &runs, "m1").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(String::from_utf8_lossy(&body).contains("record-unreadable"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[cfg(feature = "conformance")]
mod conformance {
    use super::*;

    async fn sealed_memory() -> Option<Sealed<MemoryStore>> {
        Some(Sealed::new(MemoryStore::new(), ring_b()))
    }
    tower_idempotency::store_conformance_tests!(sealed_memory_store, sealed_memory);

    #[cfg(feature = "redis")]
    async fn sealed_redis() -> Option<Sealed<tower_idempotency::RedisStore>> {
        let url = std::env::var("REDIS_URL").ok()?;
        let store = tower_idempotency::RedisStore::connect(&url)
            .await
            .ok()?
            .prefix("tower-idempotency-sealed-test:");
        Some(Sealed::new(store, ring_b()))
    }
    #[cfg(feature = "redis")]
    tower_idempotency::store_conformance_tests!(sealed_redis_store, sealed_redis);

    #[cfg(feature = "postgres")]
    async fn sealed_postgres() -> Option<Sealed<tower_idempotency::PostgresStore>> {
        Some(Sealed::new(
            crate::sql_scenarios::conformance_store().await?,
            ring_b(),
        ))
    }
    #[cfg(feature = "postgres")]
    tower_idempotency::store_conformance_tests!(sealed_postgres_store, sealed_postgres);

    #[cfg(feature = "mysql")]
    async fn sealed_mysql() -> Option<Sealed<tower_idempotency::MySqlStore>> {
        Some(Sealed::new(
            crate::sql_scenarios::conformance_store().await?,
            ring_b(),
        ))
    }
    #[cfg(feature = "mysql")]
    tower_idempotency::store_conformance_tests!(sealed_mysql_store, sealed_mysql);
}

/// The raw values each shared store holds carry no byte of the secret body or header.
#[cfg(any(feature = "redis", feature = "postgres", feature = "mysql"))]
mod raw_values {
    use super::*;

    fn assert_no_secret(what: &str, bytes: &[u8]) {
        assert!(!bytes.is_empty(), "{what}: nothing stored");
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains(SECRET),
            "{what} holds the secret in the clear"
        );
        assert!(
            !text.contains("x-card"),
            "{what} holds a header name in the clear"
        );
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn redis_holds_no_plaintext() {
        let Ok(url) = std::env::var("REDIS_URL") else {
            println!("skipped: REDIS_URL not set");
            return;
        };
        let prefix = format!("ti-sealed-{}:", uuid::Uuid::new_v4().simple());
        let store = tower_idempotency::RedisStore::connect(&url)
            .await
            .unwrap()
            .prefix(prefix.clone());
        let runs = Arc::new(AtomicUsize::new(0));
        ask(Sealed::new(store, ring_a()), &runs, "r").await;
        let client = tower_idempotency::redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = tower_idempotency::redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!keys.is_empty());
        for k in keys {
            let value: Vec<u8> = tower_idempotency::redis::cmd("GET")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_no_secret(&format!("Redis {k}"), &value);
        }
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_holds_no_plaintext() {
        use tower_idempotency::PostgresStore;
        let Some(url) = crate::sql_scenarios::url::<PostgresStore>() else {
            return;
        };
        let (pool, store, table) =
            crate::sql_scenarios::private_store::<PostgresStore>(&url, "sealed").await;
        let runs = Arc::new(AtomicUsize::new(0));
        ask(Sealed::new(store, ring_a()), &runs, "p").await;
        let rows: Vec<(Vec<u8>, Option<String>)> =
            tower_idempotency::sqlx::query_as(tower_idempotency::sqlx::AssertSqlSafe(format!(
                "SELECT record, headers::text FROM \"{table}\""
            )))
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        for (record, headers) in rows {
            assert_no_secret("PostgreSQL record", &record);
            assert!(!headers.unwrap_or_default().contains(SECRET));
        }
        <PostgresStore as crate::sql_scenarios::SqlStore>::drop_table(&pool, &table).await;
    }

    #[cfg(feature = "mysql")]
    #[tokio::test]
    async fn mysql_holds_no_plaintext() {
        use tower_idempotency::MySqlStore;
        let Some(url) = crate::sql_scenarios::url::<MySqlStore>() else {
            return;
        };
        let (pool, store, table) =
            crate::sql_scenarios::private_store::<MySqlStore>(&url, "sealed").await;
        let runs = Arc::new(AtomicUsize::new(0));
        ask(Sealed::new(store, ring_a()), &runs, "m").await;
        let rows: Vec<(Vec<u8>, Option<String>)> =
            tower_idempotency::sqlx::query_as(tower_idempotency::sqlx::AssertSqlSafe(format!(
                "SELECT record, CAST(headers AS CHAR) FROM `{table}`"
            )))
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        for (record, headers) in rows {
            assert_no_secret("MySQL record", &record);
            assert!(!headers.unwrap_or_default().contains(SECRET));
        }
        <MySqlStore as crate::sql_scenarios::SqlStore>::drop_table(&pool, &table).await;
    }
}

/// `IdempotencyLayer::encrypt_records`: one setting seals what the layer's store keeps, the
/// embedded memory store included, and replays it.
#[tokio::test]
async fn one_setting_seals_the_layers_records() {
    let memory = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = {
        let runs = Arc::clone(&runs);
        IdempotencyLayer::new(memory.clone())
            .share_keys_across_callers()
            .encrypt_records(ring_b())
            .layer(tower::service_fn(move |_req: Request<Body>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async {
                    Ok::<_, Infallible>(Response::new(Body::from(format!(
                        "{{\"card\":\"{SECRET}\"}}"
                    ))))
                }
            }))
    };
    for _ in 0..2 {
        let req = Request::post("/cards")
            .header("idempotency-key", "e1")
            .body(Body::from("{}"))
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert!(String::from_utf8_lossy(&body).contains(SECRET));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stored = raw(&memory, &key("e1")).await;
    assert_eq!(stored.headers()["idempotency-sealed"], "k2");
    assert!(!String::from_utf8_lossy(&stored.encode()).contains(SECRET));
}
