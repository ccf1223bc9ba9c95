//! `IdempotencyLayer::cache_replays`: retries answered from an instance's own copies of
//! completed records, on a store the layer reaches through the store trait (a counting
//! wrapper around the memory store stands for a store across the network).

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use common::{Counter, FaultStore, assert_problem, call, post};
use http::{Request, Response, StatusCode};
use tower::Layer;
use tower_idempotency::policy::InFlight;
use tower_idempotency::store::StoreKey;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore, Scope};

const AGE: Duration = Duration::from_secs(60);

/// The layer on `store`, keys shared by all callers, with copies kept up to `age`.
fn cached(store: &FaultStore<MemoryStore>, age: Duration) -> IdempotencyLayer {
    IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .cache_replays(1 << 20, age)
}

fn claims(store: &FaultStore<MemoryStore>) -> usize {
    store.faults.claims.load(Ordering::SeqCst)
}

/// After the first run, every retry on the instance is answered from its copy: no claim
/// reaches the store, the answer is the stored one, marked replayed. Without the cache
/// each retry is a claim.
#[tokio::test]
async fn cached_replays_make_no_store_call() {
    let counter = Counter::default();
    let store = FaultStore::new(MemoryStore::new());
    let svc = cached(&store, AGE).layer(counter.service(Duration::ZERO));
    let first = call(&svc, post(Some("k"), "{\"n\":1}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(claims(&store), 1);
    for _ in 0..20 {
        let again = call(&svc, post(Some("k"), "{\"n\":1}")).await;
        assert!(again.replayed());
        assert_eq!(again.status, first.status);
        assert_eq!(again.body, first.body);
        assert_eq!(
            again.headers.get("content-type"),
            first.headers.get("content-type")
        );
    }
    assert_eq!(claims(&store), 1, "a cached replay called the store");
    assert_eq!(counter.runs(), 1);

    // The same without the cache: one claim per retry.
    let plain = FaultStore::new(MemoryStore::new());
    let svc = IdempotencyLayer::new(plain.clone())
        .share_keys_across_callers()
        .layer(counter.service(Duration::ZERO));
    for _ in 0..3 {
        call(&svc, post(Some("k"), "{}")).await;
    }
    assert_eq!(claims(&plain), 3);
}

/// Another instance (its own layer, the same store) learns the record from the store at
/// its first retry, and answers the next ones from its copy.
#[tokio::test]
async fn a_record_replayed_from_the_store_is_cached_by_the_instance_that_replayed_it() {
    let counter = Counter::default();
    let store = FaultStore::new(MemoryStore::new());
    let instance = || cached(&store, AGE).layer(counter.service(Duration::ZERO));
    let (a, b) = (instance(), instance());
    let first = call(&a, post(Some("k"), "{}")).await;
    let from_store = call(&b, post(Some("k"), "{}")).await;
    assert!(from_store.replayed());
    assert_eq!(from_store.body, first.body);
    assert_eq!(claims(&store), 2);
    for _ in 0..5 {
        let cached = call(&b, post(Some("k"), "{}")).await;
        assert_eq!(cached.body, first.body);
    }
    assert_eq!(claims(&store), 2);
    assert_eq!(counter.runs(), 1);
}

/// A copy is checked as the store's answer is: the same key with another payload is `422`,
/// and nothing runs.
#[tokio::test]
async fn another_payload_under_a_cached_key_is_still_refused() {
    let counter = Counter::default();
    let store = FaultStore::new(MemoryStore::new());
    let svc = cached(&store, AGE).layer(counter.service(Duration::ZERO));
    call(&svc, post(Some("k"), "{\"amount\":10}")).await;
    assert!(
        call(&svc, post(Some("k"), "{\"amount\":10}"))
            .await
            .replayed()
    );
    let other = call(&svc, post(Some("k"), "{\"amount\":99}")).await;
    assert_problem(&other, 422, "key-reused");
    assert_eq!(counter.runs(), 1);
    assert_eq!(claims(&store), 1, "the mismatch was told from the copy");
}

#[derive(Clone)]
struct User(&'static str);

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

fn as_user(user: &'static str, key: &str) -> Request<Body> {
    let mut req = post(Some(key), "{}");
    req.extensions_mut().insert(User(user));
    req
}

/// Copies are kept under the whole store key: a caller with the same key as another never
/// gets the other's copy, before or after both are cached.
#[tokio::test]
async fn a_cached_record_is_never_another_callers() {
    let counter = Counter::default();
    let store = FaultStore::new(MemoryStore::new());
    let svc = IdempotencyLayer::new(store.clone())
        .scope_by_principal::<User>()
        .cache_replays(1 << 20, AGE)
        .layer(counter.service(Duration::ZERO));
    let alice = call(&svc, as_user("alice", "same")).await;
    let alice_again = call(&svc, as_user("alice", "same")).await;
    assert!(alice_again.replayed());
    let bob = call(&svc, as_user("bob", "same")).await;
    assert!(!bob.replayed(), "bob was answered alice's copy");
    assert_ne!(bob.body, alice.body);
    for _ in 0..3 {
        assert_eq!(call(&svc, as_user("alice", "same")).await.body, alice.body);
        assert_eq!(call(&svc, as_user("bob", "same")).await.body, bob.body);
    }
    assert_eq!(counter.runs(), 2);
}

/// What the cache changes, and its bound: a record an operator deleted from the store is
/// still replayed by an instance holding a copy, until the copy is `max_age` old; then the
/// key is the store's again, and the request runs.
#[tokio::test]
async fn a_deleted_record_is_replayed_from_a_copy_for_max_age_at_most() {
    let counter = Counter::default();
    let store = FaultStore::new(MemoryStore::new());
    let age = Duration::from_millis(300);
    let svc = cached(&store, age).layer(counter.service(Duration::ZERO));
    let first = call(&svc, post(Some("k"), "{}")).await;
    let key = StoreKey::new(&Scope::anonymous(), "k");
    assert!(store.purge(&key).await.unwrap(), "the record was stored");
    let stale = call(&svc, post(Some("k"), "{}")).await;
    assert!(stale.replayed());
    assert_eq!(stale.body, first.body);
    tokio::time::sleep(age + Duration::from_millis(50)).await;
    let fresh = call(&svc, post(Some("k"), "{}")).await;
    assert!(!fresh.replayed(), "a copy was answered past max_age");
    assert_eq!(counter.runs(), 2);
}

/// A copy never outlives the record's TTL: past it, the key runs again, as it would
/// without the cache.
#[tokio::test]
async fn a_copy_never_outlives_the_records_ttl() {
    let counter = Counter::default();
    let store = FaultStore::new(MemoryStore::new());
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .ttl(Duration::from_secs(1))
        .cache_replays(1 << 20, AGE)
        .layer(counter.service(Duration::ZERO));
    call(&svc, post(Some("k"), "{}")).await;
    assert!(call(&svc, post(Some("k"), "{}")).await.replayed());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!call(&svc, post(Some("k"), "{}")).await.replayed());
    assert_eq!(counter.runs(), 2);
}

/// With the store down, retries of cached records are still answered (replayed), while
/// a new key is refused as before: the cache never lets an operation run unprotected.
#[tokio::test]
async fn cached_replays_are_answered_through_a_store_outage() {
    let counter = Counter::default();
    let store = FaultStore::new(MemoryStore::new());
    let svc = cached(&store, AGE).layer(counter.service(Duration::ZERO));
    let first = call(&svc, post(Some("k"), "{}")).await;
    store.faults.claim_failures.store(1000, Ordering::SeqCst);
    let cached = call(&svc, post(Some("k"), "{}")).await;
    assert!(cached.replayed());
    assert_eq!(cached.body, first.body);
    let new = call(&svc, post(Some("new"), "{}")).await;
    assert_eq!(new.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(counter.runs(), 1);
}

/// Answers that are not stored (a `500` invites the retry to run again) are not cached
/// either: the retry runs.
#[tokio::test]
async fn answers_that_are_not_stored_are_not_cached() {
    let runs = Arc::new(AtomicUsize::new(0));
    let failing = {
        let runs = Arc::clone(&runs);
        tower::service_fn(move |_req: Request<Body>| {
            runs.fetch_add(1, Ordering::SeqCst);
            async {
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(StatusCode::INTERNAL_SERVER_ERROR)
                        .body(Body::from("try again"))
                        .unwrap(),
                )
            }
        })
    };
    let store = FaultStore::new(MemoryStore::new());
    let svc = cached(&store, AGE).layer(failing);
    for _ in 0..3 {
        let answer = call(&svc, post(Some("k"), "{}")).await;
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!answer.replayed());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// One key hammered from many tasks with the cache on runs once; once it is done, a second
/// wave is answered from the copy alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_hammered_with_the_cache_on_runs_once() {
    let counter = Counter::default();
    let store = FaultStore::new(MemoryStore::new());
    let svc = cached(&store, AGE).layer(counter.service(Duration::from_millis(100)));
    let wave = |svc: &_| {
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let svc = Clone::clone(svc);
                tokio::spawn(async move { call(&svc, post(Some("hot"), "{}")).await })
            })
            .collect();
        async move {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    for answer in wave(&svc).await {
        assert!(
            answer.status == StatusCode::CREATED || answer.status == StatusCode::CONFLICT,
            "{}",
            answer.status
        );
    }
    assert_eq!(counter.runs(), 1);
    let before = claims(&store);
    for answer in wave(&svc).await {
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(answer.replayed());
    }
    assert_eq!(claims(&store), before, "the second wave called the store");
    assert_eq!(counter.runs(), 1);
}

/// Over HTTP/1.1 and HTTP/2, a retry answered from a copy is the retry the store would
/// answer: the same status, headers (but `date`) and body as from an instance without
/// the cache.
#[tokio::test]
async fn a_cached_replay_is_the_stored_replay_over_http1_and_http2() {
    let counter = Counter::default();
    let store = MemoryStore::new();
    let cached = common::serve(
        axum::Router::new().fallback_service(
            IdempotencyLayer::new(FaultStore::new(store.clone()))
                .share_keys_across_callers()
                .cache_replays(1 << 20, AGE)
                .layer(counter.service(Duration::ZERO)),
        ),
    )
    .await;
    let uncached = common::serve(
        axum::Router::new().fallback_service(
            IdempotencyLayer::new(FaultStore::new(store.clone()))
                .share_keys_across_callers()
                .layer(counter.service(Duration::ZERO)),
        ),
    )
    .await;
    let req = |addr: std::net::SocketAddr, key: &str| {
        Request::post(format!("http://{addr}/orders"))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap()
    };
    for (h2, key) in [(false, "h1"), (true, "h2")] {
        let first = common::send_over_tcp(cached, h2, req(cached, key)).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let from_copy = common::send_over_tcp(cached, h2, req(cached, key)).await;
        let from_store = common::send_over_tcp(uncached, h2, req(uncached, key)).await;
        assert!(from_copy.replayed() && from_store.replayed());
        assert_eq!(from_copy.status, from_store.status);
        assert_eq!(from_copy.body, from_store.body);
        assert_eq!(from_copy.body, first.body);
        let (mut a, mut b) = (from_copy.headers, from_store.headers);
        a.remove("date");
        b.remove("date");
        assert_eq!(a, b, "h2: {h2}");
    }
    assert_eq!(counter.runs(), 2);
}

/// Settings a user can choose that leave nothing to cache: no room (every retry goes to the
/// store), room for less than any record, and ages of zero or beyond any clock (clamped,
/// no overflow). Every one answers as the store does.
#[tokio::test]
async fn cache_settings_at_their_extremes_answer_as_the_store_does() {
    for (bytes, age, cached) in [
        (0, AGE, false),
        (1, AGE, false),
        (1 << 20, Duration::ZERO, false),
        (1 << 20, Duration::MAX, true),
        (usize::MAX, Duration::from_nanos(1), false),
    ] {
        let counter = Counter::default();
        let store = FaultStore::new(MemoryStore::new());
        let svc = IdempotencyLayer::new(store.clone())
            .share_keys_across_callers()
            .cache_replays(bytes, age)
            .layer(counter.service(Duration::ZERO));
        let first = call(&svc, post(Some("k"), "{}")).await;
        for _ in 0..3 {
            let again = call(&svc, post(Some("k"), "{}")).await;
            assert!(again.replayed(), "({bytes}, {age:?})");
            assert_eq!(again.body, first.body);
        }
        let expected = if cached { 1 } else { 4 };
        assert_eq!(claims(&store), expected, "({bytes}, {age:?})");
        assert_eq!(counter.runs(), 1);
    }
}

/// On the embedded memory store the setting changes nothing: its records are in memory.
#[tokio::test]
async fn the_memory_store_answers_alike_with_the_cache_set() {
    let counter = Counter::default();
    let store = MemoryStore::new();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .cache_replays(1 << 20, Duration::from_millis(300))
        .layer(counter.service(Duration::ZERO));
    call(&svc, post(Some("k"), "{}")).await;
    // A purge is seen at once: no copy outlives it.
    let key = StoreKey::new(&Scope::anonymous(), "k");
    assert!(store.purge(&key).await.unwrap());
    assert!(!call(&svc, post(Some("k"), "{}")).await.replayed());
    assert_eq!(counter.runs(), 2);
}

/// A duplicate that waited (`InFlight::Wait`) for another instance's run keeps the answer it
/// was woken with: its next retries are answered from the copy, with no claim.
#[tokio::test]
async fn an_answer_a_waiter_got_is_cached_too() {
    let counter = Counter::default();
    let store = FaultStore::new(MemoryStore::new());
    let runner = cached(&store, AGE).layer(counter.service(Duration::from_millis(200)));
    let waiter = cached(&store, AGE)
        .on_in_flight(InFlight::Wait(Duration::from_secs(5)))
        .layer(counter.service(Duration::ZERO));
    let first = tokio::spawn({
        let runner = runner.clone();
        async move { call(&runner, post(Some("k"), "{}")).await }
    });
    common::eventually("the first request holds the key", || claims(&store) == 1).await;
    let waited = call(&waiter, post(Some("k"), "{}")).await;
    let first = first.await.unwrap();
    assert!(waited.replayed());
    assert_eq!(waited.body, first.body);
    let claims_after_wait = claims(&store);
    for _ in 0..3 {
        assert_eq!(call(&waiter, post(Some("k"), "{}")).await.body, first.body);
    }
    assert_eq!(
        claims(&store),
        claims_after_wait,
        "the waiter's retries called the store"
    );
    assert_eq!(counter.runs(), 1);
}
