//! The Redis store: the conformance suite, several instances on one Redis, an outage, and
//! the round trips each operation costs.
//!
//! Every test needs `REDIS_URL` (for example `redis://127.0.0.1:6379`) and passes with
//! "skipped: REDIS_URL not set" without it. The outage and round-trip tests start their own
//! `redis-server` (which must be on `PATH`) on a free port and never touch the shared one.
#![cfg(feature = "redis")]

use crate::common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use common::PrivateRedis;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_idempotency::store::{Claim, LeaseToken, Record, StoreKey};
use tower_idempotency::{
    Fingerprint, IdempotencyBody, IdempotencyLayer, IdempotencyStore, REPLAYED_HEADER, RedisStore,
    Scope,
};

fn redis_url() -> Option<String> {
    let url = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    if url.is_none() {
        println!("skipped: REDIS_URL not set");
    }
    url
}

#[cfg(feature = "conformance")]
mod conformance {
    use super::*;

    async fn make_store() -> Option<RedisStore> {
        let url = redis_url()?;
        let store = RedisStore::connect(&url)
            .await
            .expect("connect to REDIS_URL")
            .prefix("tower-idempotency-test:");
        Some(store)
    }

    tower_idempotency::store_conformance_tests!(redis_store, make_store);
}

type Svc = tower_idempotency::Idempotency<
    tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>,
>;

/// The store behind a layer in front of a handler that takes ~50 ms, counts its runs and
/// answers 201 with a body no other run produces.
fn layered(store: RedisStore, runs: Arc<AtomicUsize>) -> Svc {
    let handler = tower::service_fn(move |_req: Request<Body>| {
        let runs = Arc::clone(&runs);
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            runs.fetch_add(1, Ordering::SeqCst);
            let body = uuid::Uuid::new_v4().to_string();
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Body::from(body))
                    .expect("a response"),
            )
        }
    });
    IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .layer(tower::util::BoxCloneSyncService::new(handler))
}

fn order(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Body::from(r#"{"item":"book","qty":1}"#))
        .expect("a request")
}

async fn send(svc: &Svc, key: &str) -> (Response<()>, Bytes) {
    let res: Response<IdempotencyBody<Body>> =
        svc.clone().oneshot(order(key)).await.expect("infallible");
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.expect("a body").to_bytes();
    (Response::from_parts(parts, ()), bytes)
}

fn replayed(res: &Response<()>) -> bool {
    res.headers()
        .get(REPLAYED_HEADER)
        .is_some_and(|v| v == "true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_instances_run_an_operation_once() {
    let Some(url) = redis_url() else { return };
    // Two instances of a service: separate stores, separate connections, one Redis.
    let runs = Arc::new(AtomicUsize::new(0));
    let connect = || async {
        RedisStore::connect(&url)
            .await
            .expect("connect")
            .prefix("tower-idempotency-test:")
    };
    let instances = [
        layered(connect().await, Arc::clone(&runs)),
        layered(connect().await, Arc::clone(&runs)),
    ];
    let key = uuid::Uuid::new_v4().to_string();

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let svc = instances[i % 2].clone();
        let key = key.clone();
        tasks.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (res, body) = send(&svc, &key).await;
                match res.status() {
                    StatusCode::CREATED => return (replayed(&res), body),
                    StatusCode::CONFLICT => {
                        assert!(res.headers().contains_key("retry-after"));
                        assert!(Instant::now() < deadline, "still in flight after 10 s");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
        });
    }
    let results = tasks.join_all().await;

    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the operation must run exactly once"
    );
    assert_eq!(results.len(), 64);
    let first = &results[0].1;
    assert!(
        results.iter().all(|(_, body)| body == first),
        "every 201 must carry the same body"
    );
    let executed = results.iter().filter(|(replay, _)| !replay).count();
    assert_eq!(executed, 1, "one answer comes from the run, 63 are replays");

    // A later retry on either instance replays.
    for svc in &instances {
        let (res, body) = send(svc, &key).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        assert!(replayed(&res), "a later retry must be a replay");
        assert_eq!(&body, first);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fails_closed_and_recovers_without_rebuilding() {
    let Some(_) = redis_url() else { return };
    let mut server = PrivateRedis::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = layered(store, Arc::clone(&runs));

    let (res, _) = send(&svc, "before-outage").await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    server.kill();
    let started = Instant::now();
    let (res, body) = send(&svc, "during-outage").await;
    let took = started.elapsed();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        res.headers().get("content-type").expect("content-type"),
        "application/problem+json"
    );
    assert!(
        res.headers().contains_key("retry-after"),
        "503 needs Retry-After"
    );
    assert!(!body.is_empty(), "a problem body");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "nothing runs while the store is down"
    );
    assert!(
        took < Duration::from_secs(3),
        "a dead Redis must fail fast, took {took:?}"
    );
    // And again, now that the manager knows the connection is gone.
    let (res, _) = send(&svc, "during-outage").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    server.restart();
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..30 {
        let (res, _) = send(&svc, "after-outage").await;
        status = res.status();
        if status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::CREATED, "the same service must recover");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let (res, _) = send(&svc, "after-outage").await;
    assert!(replayed(&res), "and protect again");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Script calls the server has counted since the last `CONFIG RESETSTAT`:
/// (`EVALSHA`, `EVAL`, `SCRIPT LOAD`).
async fn script_calls(admin: &mut redis::aio::MultiplexedConnection) -> (u64, u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .expect("INFO commandstats");
    let calls = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().expect("a count"))
    };
    (calls("evalsha"), calls("eval"), calls("script|load"))
}

async fn reset_stats(admin: &mut redis::aio::MultiplexedConnection) {
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(admin)
        .await
        .expect("CONFIG RESETSTAT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_trip_per_operation() {
    let Some(_) = redis_url() else { return };
    // A private server: no other test's calls are counted.
    let server = PrivateRedis::start();
    let mut admin = redis::Client::open(server.url())
        .expect("a url")
        .get_multiplexed_async_connection()
        .await
        .expect("an admin connection");
    // `connect` loads the four scripts (SCRIPT LOAD), so even the first call of each script
    // is a single EVALSHA.
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let key = |k: &str| StoreKey::new(&Scope::anonymous(), k);
    let fp = Fingerprint::from_bytes([3; 32]);
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_secs(60);
    let record = Record::new(
        StatusCode::CREATED,
        http::HeaderMap::new(),
        Bytes::from_static(b"made"),
        None,
    )
    .with_fingerprint(fp);

    reset_stats(&mut admin).await;
    let Claim::Acquired(token) = store
        .claim(
            &key("a"),
            &fp,
            tower_idempotency::store::LeaseToken::new(),
            lease,
        )
        .await
        .unwrap()
    else {
        panic!("the first claim acquires")
    };
    assert_eq!(script_calls(&mut admin).await, (1, 0, 0), "claim");

    store.extend(&key("a"), token, lease).await.unwrap();
    assert_eq!(script_calls(&mut admin).await, (2, 0, 0), "extend");

    let claim = store
        .claim(
            &key("a"),
            &fp,
            tower_idempotency::store::LeaseToken::new(),
            lease,
        )
        .await
        .unwrap();
    assert!(
        matches!(claim, Claim::InFlight { fingerprint, lease_remaining: Some(_) } if fingerprint == fp)
    );
    assert_eq!(
        script_calls(&mut admin).await,
        (3, 0, 0),
        "claim of a key in flight"
    );

    store
        .complete(&key("a"), token, record.clone(), ttl)
        .await
        .unwrap();
    assert_eq!(script_calls(&mut admin).await, (4, 0, 0), "complete");

    let Claim::Completed(got) = store
        .claim(
            &key("a"),
            &fp,
            tower_idempotency::store::LeaseToken::new(),
            lease,
        )
        .await
        .unwrap()
    else {
        panic!("a completed key replays")
    };
    assert_eq!(*got, record);
    assert_eq!(script_calls(&mut admin).await, (5, 0, 0), "replay");

    let Claim::Acquired(other) = store
        .claim(
            &key("b"),
            &fp,
            tower_idempotency::store::LeaseToken::new(),
            lease,
        )
        .await
        .unwrap()
    else {
        panic!("a fresh key is acquired")
    };
    store.release(&key("b"), other).await.unwrap();
    assert_eq!(script_calls(&mut admin).await, (7, 0, 0), "claim + release");

    // Through the layer: a first request costs a claim and a complete, a replay one claim.
    let svc = layered(store.clone(), Arc::new(AtomicUsize::new(0)));
    reset_stats(&mut admin).await;
    let (res, _) = send(&svc, "via-layer").await;
    assert_eq!(res.status(), StatusCode::CREATED);
    // The completion may land just after the body ends: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while script_calls(&mut admin).await.0 < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(script_calls(&mut admin).await, (2, 0, 0), "first request");
    let (res, _) = send(&svc, "via-layer").await;
    assert!(replayed(&res));
    assert_eq!(
        script_calls(&mut admin).await,
        (3, 0, 0),
        "replayed request"
    );

    // A server that lost the scripts (restart, failover, SCRIPT FLUSH): the call that finds
    // out loads its script and retries, once; the next call is one round trip again.
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    reset_stats(&mut admin).await;
    store
        .claim(
            &key("c"),
            &fp,
            tower_idempotency::store::LeaseToken::new(),
            lease,
        )
        .await
        .unwrap();
    assert_eq!(
        script_calls(&mut admin).await,
        (2, 0, 1),
        "claim after SCRIPT FLUSH"
    );
    store
        .claim(
            &key("c"),
            &fp,
            tower_idempotency::store::LeaseToken::new(),
            lease,
        )
        .await
        .unwrap();
    assert_eq!(script_calls(&mut admin).await, (3, 0, 1), "the next claim");
}

/// With `cache_replays`, a retry on an instance that stored or replayed the record costs no
/// Redis round trip: counted on a private server's `INFO commandstats`. Retries answered
/// from copies go on while the server is down; a new key is refused meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_replays_cost_no_redis_round_trip() {
    let Some(_) = redis_url() else { return };
    let mut server = PrivateRedis::start();
    let mut admin = redis::Client::open(server.url())
        .expect("a url")
        .get_multiplexed_async_connection()
        .await
        .expect("an admin connection");
    let runs = Arc::new(AtomicUsize::new(0));
    let instance = async || {
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        let handler = {
            let runs = Arc::clone(&runs);
            tower::service_fn(move |_req: Request<Body>| {
                let n = runs.fetch_add(1, Ordering::SeqCst);
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(StatusCode::CREATED)
                            .body(Body::from(format!("run {n}")))
                            .expect("a response"),
                    )
                }
            })
        };
        IdempotencyLayer::new(store)
            .share_keys_across_callers()
            .store_timeout(Duration::from_millis(300))
            .cache_replays(1 << 20, Duration::from_secs(60))
            .layer(tower::util::BoxCloneSyncService::new(handler))
    };
    let (a, b) = (instance().await, instance().await);
    reset_stats(&mut admin).await;
    let (first, body) = send(&a, "cached").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(script_calls(&mut admin).await.0, 2, "claim and completion");
    for _ in 0..10 {
        let (res, again) = send(&a, "cached").await;
        assert!(replayed(&res));
        assert_eq!(again, body);
    }
    assert_eq!(
        script_calls(&mut admin).await.0,
        2,
        "a cached retry reached Redis"
    );
    let (res, from_redis) = send(&b, "cached").await;
    assert!(replayed(&res));
    assert_eq!(from_redis, body);
    assert_eq!(
        script_calls(&mut admin).await.0,
        3,
        "the other instance's first retry"
    );
    for _ in 0..10 {
        assert_eq!(send(&b, "cached").await.1, body);
    }
    assert_eq!(script_calls(&mut admin).await.0, 3);

    server.kill();
    for svc in [&a, &b] {
        let (res, during) = send(svc, "cached").await;
        assert!(replayed(&res), "a copy was not answered with Redis down");
        assert_eq!(during, body);
    }
    let (res, _) = send(&a, "new-during-outage").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_carry_the_prefix_and_stale_tokens_are_lost() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url)
        .await
        .expect("connect")
        .prefix("tower-idempotency-prefix-test:");
    let mut admin = admin(&url).await;
    let client_key = uuid::Uuid::new_v4().to_string();
    let key = StoreKey::new(&Scope::anonymous(), &client_key);
    let fp = Fingerprint::from_bytes([9; 32]);
    let Claim::Acquired(token) = store
        .claim(
            &key,
            &fp,
            tower_idempotency::store::LeaseToken::new(),
            Duration::from_secs(5),
        )
        .await
        .unwrap()
    else {
        panic!("acquire")
    };
    let redis_key = format!("tower-idempotency-prefix-test:anon:{client_key}");
    let value: Vec<u8> = redis::cmd("GET")
        .arg(&redis_key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(value[0], b'L');
    assert_eq!(value[1..17], token.to_bytes());
    assert_eq!(value[17..49], fp.as_bytes()[..]);
    // Then the lease deadline, in milliseconds since the epoch, by the server's clock.
    let deadline: u64 = std::str::from_utf8(&value[49..]).unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(deadline.abs_diff(now + 5000) < 2000, "{deadline} vs {now}");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&redis_key)
        .query_async(&mut admin)
        .await
        .unwrap();
    // The key outlives the lease, so that a lapsed owner can still complete.
    let retention = tower_idempotency::store::ORPHAN_RETENTION.as_millis() as i64;
    assert!(
        pttl > retention && pttl <= retention + 5000,
        "the key lives for the lease and the retention: {pttl}"
    );
    assert!(matches!(
        store.release(&key, LeaseToken::new()).await,
        Err(tower_idempotency::StoreError::LeaseLost)
    ));
    store.release(&key, token).await.unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg(&redis_key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(!exists, "release deletes the key");
    assert!(format!("{store:?}").contains("tower-idempotency-prefix-test:"));
}

#[tokio::test]
async fn connect_to_nothing_fails_fast() {
    let Some(_) = redis_url() else { return };
    let port = PrivateRedis::free_port();
    let started = Instant::now();
    let err = RedisStore::connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, tower_idempotency::StoreError::Backend(_)));
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// An in-flight value written by the previous version (no lease deadline in it, the lease
/// as the key's expiry) is still read during a rolling upgrade: in flight while its key
/// lives, free once it expired.
#[tokio::test]
async fn in_flight_values_of_the_previous_version_are_read() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url)
        .await
        .expect("connect")
        .prefix("tower-idempotency-legacy-test:");
    let mut admin = admin(&url).await;
    let client_key = uuid::Uuid::new_v4().to_string();
    let key = StoreKey::new(&Scope::anonymous(), &client_key);
    let fp = Fingerprint::from_bytes([4; 32]);
    let mut old = vec![b'L'];
    old.extend_from_slice(&LeaseToken::new().to_bytes());
    old.extend_from_slice(fp.as_bytes());
    let _: () = redis::cmd("SET")
        .arg(format!("tower-idempotency-legacy-test:anon:{client_key}"))
        .arg(old)
        .arg("PX")
        .arg(300)
        .query_async(&mut admin)
        .await
        .unwrap();
    match store
        .claim(&key, &fp, LeaseToken::new(), Duration::from_secs(5))
        .await
    {
        Ok(Claim::InFlight {
            fingerprint,
            lease_remaining,
        }) => {
            assert_eq!(fingerprint, fp);
            assert!(lease_remaining.is_some_and(|r| r <= Duration::from_millis(300)));
        }
        other => panic!("an old in-flight value must read as in flight, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(
        store
            .claim(&key, &fp, LeaseToken::new(), Duration::from_secs(5))
            .await,
        Ok(Claim::Acquired(_))
    ));
}

/// Values written straight into Redis, as a damaged server, an operator or a newer version
/// of the crate could leave them: whatever the bytes, a claim never panics and never takes
/// a key whose value is not an in-flight claim of this layout (so nothing runs twice over a
/// record it cannot read); a stored record of this version is replayed; and a stranger's
/// token changes nothing. `FUZZ_REDIS_CASES` sets the number of values (default 3,000).
#[test]
fn fuzz_stored_values() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let Some(url) = redis_url() else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let prefix = "tower-idempotency-fuzz-test:";
    let (store, admin) = rt.block_on(async {
        let store = RedisStore::connect(&url)
            .await
            .expect("connect")
            .prefix(prefix);
        let admin = admin(&url).await;
        (store, admin)
    });
    let deadline = prop_oneof![
        Just(String::new()),
        Just("0".to_owned()),
        Just("-5".to_owned()),
        Just("1e999".to_owned()),
        Just("inf".to_owned()),
        Just("nan".to_owned()),
        Just("99999999999999999999999".to_owned()),
        any::<u64>().prop_map(|n| n.to_string()),
        "[ -~]{0,12}",
    ];
    let in_flight = (
        any::<[u8; 16]>(),
        proptest::collection::vec(any::<u8>(), 0..40),
        // No flag, contested, or committed.
        prop_oneof![Just(None), Just(Some(b'C')), Just(Some(b'K'))],
        deadline,
    )
        .prop_map(|(token, fp, flag, deadline)| {
            let mut v = vec![b'L'];
            v.extend_from_slice(&token);
            v.extend_from_slice(&fp);
            v.extend(flag);
            v.extend_from_slice(deadline.as_bytes());
            v
        });
    let record = (
        proptest::collection::vec(any::<u8>(), 0..64),
        0usize..100,
        any::<u8>(),
    )
        .prop_map(|(body, at, flip)| {
            let record = Record::new(
                StatusCode::CREATED,
                http::HeaderMap::new(),
                Bytes::from(body),
                None,
            );
            let mut v = vec![b'R'];
            v.extend(record.encode());
            if let Some(b) = v.get_mut(at) {
                *b ^= flip;
            }
            v
        });
    let value = prop_oneof![
        in_flight,
        record,
        proptest::collection::vec(any::<u8>(), 0..120),
    ];
    let cases = std::env::var("FUZZ_REDIS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&value, |value| {
            let mut admin = admin.clone();
            rt.block_on(async {
                let client_key = uuid::Uuid::new_v4().to_string();
                let key = StoreKey::new(&Scope::anonymous(), &client_key);
                let redis_key = format!("{prefix}anon:{client_key}");
                let _: () = redis::cmd("SET")
                    .arg(&redis_key)
                    .arg(&value)
                    .arg("PX")
                    .arg(60_000)
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                let claim = store
                    .claim(
                        &key,
                        &Fingerprint::from_bytes([1; 32]),
                        LeaseToken::new(),
                        Duration::from_secs(5),
                    )
                    .await;
                let in_flight_layout = value.first() == Some(&b'L');
                match &claim {
                    Ok(Claim::Acquired(_)) => {
                        prop_assert!(in_flight_layout, "a claim took a key holding {value:?}")
                    }
                    Ok(Claim::Completed(record)) => {
                        prop_assert_eq!(value[0], b'R');
                        let decoded = Record::decode(&value[1..]);
                        prop_assert_eq!(decoded.as_ref(), Ok(&**record));
                    }
                    Ok(Claim::InFlight { .. }) => prop_assert!(in_flight_layout),
                    // A committed claim (`K` after the fingerprint) whose deadline passed.
                    Ok(Claim::OutcomeUnknown { .. }) => {
                        prop_assert!(in_flight_layout && value.get(49) == Some(&b'K'))
                    }
                    Ok(other) => panic!("{other:?}"),
                    // Unreadable (the layer answers record-unreadable), or a script that
                    // could not read the value (the layer answers store-unavailable).
                    Err(_) => {}
                }
                let before: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&redis_key)
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                if !in_flight_layout {
                    prop_assert_eq!(
                        before.as_deref(),
                        Some(value.as_slice()),
                        "a claim changed the value"
                    );
                }
                if !matches!(claim, Ok(Claim::Acquired(_))) {
                    let stranger = LeaseToken::new();
                    let record =
                        Record::new(StatusCode::OK, http::HeaderMap::new(), Bytes::new(), None);
                    for result in [
                        store
                            .complete(&key, stranger, record, Duration::from_secs(5))
                            .await,
                        store.extend(&key, stranger, Duration::from_secs(5)).await,
                        store.release(&key, stranger).await,
                    ] {
                        prop_assert!(
                            matches!(result, Err(tower_idempotency::StoreError::LeaseLost)),
                            "{result:?}"
                        );
                    }
                    let after: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(&redis_key)
                        .query_async(&mut admin)
                        .await
                        .unwrap();
                    prop_assert_eq!(after, before, "a stranger's token changed the value");
                }
                let _: () = redis::cmd("DEL")
                    .arg(&redis_key)
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                Ok(())
            })
        })
        .expect("every stored value is handled");
}

/// A writer for a test's own log subscriber.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A plain connection to the server at `url`, to look at or change what the store wrote.
async fn admin(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

async fn config_set(url: &str, name: &str, value: &str) {
    let mut con = admin(url).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async(&mut con)
        .await
        .unwrap();
}

/// A server that can lose records is named at connect: `connect` logs a warning for each
/// risk, `connect_strict` refuses it, and a server set up as the README says passes.
#[tokio::test]
async fn server_settings_that_lose_records_are_named_at_connect() {
    use tower_idempotency::store::redis::{RedisRisk, UnsafeRedis};
    if redis_url().is_none() {
        return;
    }
    let server = PrivateRedis::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .finish();
    let store = {
        let _guard = tracing::subscriber::set_default(subscriber);
        RedisStore::connect(&server.url()).await.expect("connect")
    };
    let expected = vec![
        RedisRisk::NoAppendOnlyFile,
        RedisRisk::Eviction("allkeys-lru".to_owned()),
    ];
    assert_eq!(store.check_server().await.unwrap(), expected);
    let text = logs.text();
    assert!(
        text.contains("WARN") && text.contains("appendonly is off"),
        "{text}"
    );
    assert!(text.contains("maxmemory-policy is allkeys-lru"), "{text}");
    match RedisStore::connect_strict(&server.url()).await {
        Err(tower_idempotency::StoreError::Backend(err)) => {
            let unsafe_ = err
                .downcast_ref::<UnsafeRedis>()
                .expect("an UnsafeRedis error");
            assert_eq!(unsafe_.risks, expected);
        }
        other => panic!("connect_strict must refuse the server, got {other:?}"),
    }

    config_set(&server.url(), "appendonly", "yes").await;
    config_set(&server.url(), "appendfsync", "everysec").await;
    config_set(&server.url(), "maxmemory-policy", "noeviction").await;
    assert_eq!(
        store.check_server().await.unwrap(),
        vec![RedisRisk::FsyncNotAlways("everysec".to_owned())]
    );
    config_set(&server.url(), "appendfsync", "always").await;
    assert_eq!(store.check_server().await.unwrap(), vec![]);
    RedisStore::connect_strict(&server.url())
        .await
        .expect("a server set up as the README says is accepted");
}

async fn complete_one(store: &RedisStore, key: &StoreKey) -> (LeaseToken, Record) {
    let token = LeaseToken::new();
    let fp = Fingerprint::from_bytes([9; 32]);
    assert!(matches!(
        store.claim(key, &fp, token, Duration::from_secs(5)).await,
        Ok(Claim::Acquired(_))
    ));
    let record = Record::new(
        StatusCode::CREATED,
        http::HeaderMap::new(),
        Bytes::from(uuid::Uuid::new_v4().to_string()),
        None,
    );
    (token, record)
}

/// Asserts that a claim of `key` answers `record`.
async fn assert_replays(store: &RedisStore, key: &StoreKey, record: &Record, what: &str) {
    match store
        .claim(
            key,
            &Fingerprint::from_bytes([9; 32]),
            LeaseToken::new(),
            Duration::from_secs(5),
        )
        .await
    {
        Ok(Claim::Completed(got)) => assert_eq!(*got, *record, "{what}"),
        other => panic!("{what}, got {other:?}"),
    }
}

/// With the settings the README requires (`appendonly yes`, `appendfsync always`), a
/// record survives the server being killed and restarted: the retry replays it.
#[tokio::test]
async fn records_survive_a_restart_with_an_append_only_file() {
    if redis_url().is_none() {
        return;
    }
    let mut server = PrivateRedis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let store = RedisStore::connect_strict(&server.url())
        .await
        .expect("a safe server");
    let key = StoreKey::new(&Scope::anonymous(), "survives");
    let (token, record) = complete_one(&store, &key).await;
    store
        .complete(&key, token, record.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    server.kill();
    server.restart();
    let store = RedisStore::connect(&server.url()).await.expect("reconnect");
    assert_replays(&store, &key, &record, "the record must survive the restart").await;
}

/// `Durability::Replicated` makes `complete` wait for a replica: done while the replica
/// keeps up; an error when it does not, with the record kept on the primary (a retry
/// replays it), and done when `complete` is called again once the replica is back.
#[tokio::test]
async fn complete_waits_for_replicas() {
    use tower_idempotency::store::redis::Durability;
    if redis_url().is_none() {
        return;
    }
    let primary = PrivateRedis::start();
    let replica =
        PrivateRedis::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let store = RedisStore::connect(&primary.url())
        .await
        .expect("connect")
        .durability(Durability::Replicated {
            replicas: 1,
            timeout: Duration::from_millis(300),
        });
    // The replica needs a moment for its first sync.
    let key = StoreKey::new(&Scope::anonymous(), "replicated");
    let (token, record) = complete_one(&store, &key).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store
            .complete(&key, token, record.clone(), Duration::from_secs(60))
            .await
        {
            Ok(()) => break,
            Err(err) if Instant::now() < deadline => {
                assert!(err.to_string().contains("backend"), "{err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("the replica never acknowledged: {err}"),
        }
    }

    replica.pause();
    let key = StoreKey::new(&Scope::anonymous(), "not-replicated");
    let (token, record) = complete_one(&store, &key).await;
    let started = Instant::now();
    let err = store
        .complete(&key, token, record.clone(), Duration::from_secs(60))
        .await
        .expect_err("a replica that does not answer fails the wait");
    assert!(started.elapsed() >= Duration::from_millis(250));
    let chain = format!("{:?}", std::error::Error::source(&err));
    assert!(chain.contains("0 of 1 replicas"), "{chain}");
    assert_replays(&store, &key, &record, "the record stays on the primary").await;
    replica.resume();
    store
        .complete(&key, token, record, Duration::from_secs(60))
        .await
        .expect("completing again, once the replica is back, is done");
}

/// A completion waiting for a replica (`WAIT`) holds up no other call of the store: a claim
/// of another key is answered while the wait goes on. (Before, the wait went out on the one
/// connection every call of the process shares, and the server answers nothing behind a
/// `WAIT` until it returns: every call waited up to its timeout.)
#[tokio::test]
async fn a_durability_wait_holds_up_no_other_call() {
    use tower_idempotency::store::redis::Durability;
    if redis_url().is_none() {
        return;
    }
    // No replica: every wait for one lasts its whole timeout.
    let primary = PrivateRedis::start();
    let store = RedisStore::connect(&primary.url())
        .await
        .expect("connect")
        .durability(Durability::Replicated {
            replicas: 1,
            timeout: Duration::from_millis(1500),
        });
    let key = StoreKey::new(&Scope::anonymous(), "waits-for-a-replica");
    let (token, record) = complete_one(&store, &key).await;
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .complete(&key, token, record, Duration::from_secs(60))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = StoreKey::new(&Scope::anonymous(), "another-key");
    let claimed = tokio::time::timeout(
        Duration::from_millis(700),
        store.claim(
            &other,
            &Fingerprint::from_bytes([1; 32]),
            LeaseToken::new(),
            Duration::from_secs(5),
        ),
    )
    .await;
    assert!(
        matches!(claimed, Ok(Ok(Claim::Acquired(_)))),
        "the claim is answered during the wait: {claimed:?}"
    );
    assert!(!waiting.is_finished(), "the wait goes on meanwhile");
    let err = waiting
        .await
        .unwrap()
        .expect_err("no replica acknowledged the record");
    let chain = format!("{:?}", std::error::Error::source(&err));
    assert!(chain.contains("0 of 1 replicas"), "{chain}");
}

/// Completions that wait for durability open at most 16 connections of their own, however
/// many wait at once (the others queue for one), as the README says; all of them end, each
/// with the wait's answer.
#[tokio::test]
async fn durability_waits_open_at_most_sixteen_connections() {
    use tower_idempotency::store::redis::Durability;
    if redis_url().is_none() {
        return;
    }
    let server = PrivateRedis::start();
    let store = RedisStore::connect(&server.url())
        .await
        .expect("connect")
        .durability(Durability::Replicated {
            replicas: 1,
            timeout: Duration::from_millis(500),
        });
    let mut admin = admin(&server.url()).await;
    let clients = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    };
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(&mut admin)
        .await
        .unwrap();
    let before = clients(info);
    let mut waiting = Vec::new();
    for i in 0..30 {
        let key = StoreKey::new(&Scope::anonymous(), &format!("many-{i}"));
        let (token, record) = complete_one(&store, &key).await;
        let store = store.clone();
        waiting.push(tokio::spawn(async move {
            store
                .complete(&key, token, record, Duration::from_secs(60))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(&mut admin)
        .await
        .unwrap();
    let during = clients(info);
    assert!(
        during > before && during <= before + 16,
        "{during} clients while 30 completions wait ({before} before)"
    );
    for waited in waiting {
        let err = waited.await.unwrap().expect_err("no replica");
        let chain = format!("{:?}", std::error::Error::source(&err));
        assert!(chain.contains("0 of 1 replicas"), "{chain}");
    }
}

/// A durability wait cut off by the server's death fails at once, and the completion after
/// the server is back is done: the connection that failed is not handed to it again.
#[tokio::test]
async fn a_durability_wait_cut_by_a_restart_fails_and_the_next_one_reconnects() {
    use tower_idempotency::store::redis::Durability;
    if redis_url().is_none() {
        return;
    }
    let mut server = PrivateRedis::start();
    let store = RedisStore::connect(&server.url())
        .await
        .expect("connect")
        .durability(Durability::Replicated {
            replicas: 1,
            timeout: Duration::from_secs(5),
        });
    let key = StoreKey::new(&Scope::anonymous(), "cut-off");
    let (token, record) = complete_one(&store, &key).await;
    let waiting = {
        let store = store.clone();
        let key = key.clone();
        tokio::spawn(async move {
            store
                .complete(&key, token, record, Duration::from_secs(60))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill();
    let cut = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("the wait ends with its connection")
        .unwrap();
    assert!(cut.is_err(), "{cut:?}");

    server.restart();
    // The same pool, with a wait that any server passes (no replica asked for).
    let store = store.durability(Durability::Replicated {
        replicas: 0,
        timeout: Duration::from_millis(100),
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let (token, record) = loop {
        let token = LeaseToken::new();
        match store
            .claim(
                &key,
                &Fingerprint::from_bytes([9; 32]),
                token,
                Duration::from_secs(5),
            )
            .await
        {
            Ok(Claim::Acquired(_)) => {
                break (
                    token,
                    Record::new(
                        StatusCode::CREATED,
                        http::HeaderMap::new(),
                        Bytes::from_static(b"again"),
                        None,
                    ),
                );
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no claim after the restart: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    store
        .complete(&key, token, record.clone(), Duration::from_secs(60))
        .await
        .expect("a completion on a new connection");
    assert_replays(&store, &key, &record, "the record after the restart").await;
}

/// `Durability::Fsynced` waits with `WAITAOF`: on Redis 7.2 or later the record is on disk
/// when `complete` returns; an older server refuses the command, and `complete` says so.
#[tokio::test]
async fn complete_waits_for_the_append_only_file() {
    use tower_idempotency::store::redis::Durability;
    if redis_url().is_none() {
        return;
    }
    let server = PrivateRedis::start_with(&["--appendonly", "yes"]);
    let store = RedisStore::connect(&server.url())
        .await
        .expect("connect")
        .durability(Durability::Fsynced {
            local: true,
            replicas: 0,
            timeout: Duration::from_millis(500),
        });
    let mut admin = admin(&server.url()).await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut admin)
        .await
        .unwrap();
    let version: Vec<u32> = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap()
        .trim()
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    let key = StoreKey::new(&Scope::anonymous(), "fsynced");
    let (token, record) = complete_one(&store, &key).await;
    let result = store
        .complete(&key, token, record, Duration::from_secs(60))
        .await;
    if version >= vec![7, 2] {
        result.expect("WAITAOF on a server with an append-only file");
    } else {
        let err = result.expect_err("an older server has no WAITAOF");
        let chain = format!("{:?}", std::error::Error::source(&err));
        assert!(chain.to_lowercase().contains("waitaof"), "{chain}");
    }
}

/// A `complete` called again with the same token and record (its first reply was lost, or
/// its durability wait fell short) is done, not a lost lease; another record is refused.
#[tokio::test]
async fn completing_twice_with_the_same_record_is_done() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url)
        .await
        .expect("connect")
        .prefix("tower-idempotency-test:");
    let key = StoreKey::new(&Scope::anonymous(), &uuid::Uuid::new_v4().to_string());
    let (token, record) = complete_one(&store, &key).await;
    let ttl = Duration::from_secs(60);
    store
        .complete(&key, token, record.clone(), ttl)
        .await
        .unwrap();
    store
        .complete(&key, token, record.clone(), ttl)
        .await
        .expect("the same record again is done");
    let other = Record::new(StatusCode::OK, http::HeaderMap::new(), Bytes::new(), None);
    assert!(matches!(
        store.complete(&key, token, other, ttl).await,
        Err(tower_idempotency::StoreError::LeaseLost)
    ));
}

/// A Redis at `maxmemory` under `noeviction` refuses new claims as `StoreError::Full`
/// (the layer answers `503 store-full`, and never runs unprotected), and still replays the
/// records it holds.
#[tokio::test]
async fn a_full_redis_refuses_new_claims_and_still_replays() {
    if redis_url().is_none() {
        return;
    }
    let server = PrivateRedis::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let done = StoreKey::new(&Scope::anonymous(), "done");
    let (token, record) = complete_one(&store, &done).await;
    store
        .complete(&done, token, record.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let mut admin = admin(&server.url()).await;
    for i in 0..50 {
        let _: () = redis::cmd("SET")
            .arg(format!("ballast-{i}"))
            .arg(vec![b'x'; 20_000])
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    config_set(&server.url(), "maxmemory-policy", "noeviction").await;
    config_set(&server.url(), "maxmemory", "1mb").await;
    let fresh = StoreKey::new(&Scope::anonymous(), "fresh");
    let fp = Fingerprint::from_bytes([9; 32]);
    match store
        .claim(&fresh, &fp, LeaseToken::new(), Duration::from_secs(5))
        .await
    {
        Err(tower_idempotency::StoreError::Full) => {}
        other => panic!("a full Redis must refuse a new claim as Full, got {other:?}"),
    }
    assert_replays(&store, &done, &record, "a full Redis still replays").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .on_store_failure(tower_idempotency::policy::StoreFailure::FailOpen)
        .layer(tower::service_fn({
            let runs = Arc::clone(&runs);
            move |_req: Request<Body>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Body::empty())) }
            }
        }));
    let res = svc
        .oneshot(
            Request::post("/orders")
                .header("idempotency-key", "fresh-through-the-layer")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 0, "nothing runs unprotected");
}

/// The round trips since the last reset: every operation of the store is one script call
/// (the commands a script runs inside are not round trips).
async fn commands(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (evalsha, eval, load) = script_calls(admin).await;
    evalsha + eval + load
}

/// Through the layer: a first request is two round trips (claim, complete), a replay and a
/// duplicate in flight one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_makes_two_round_trips_for_a_first_request_and_one_for_a_replay() {
    let Some(_) = redis_url() else { return };
    let server = PrivateRedis::start();
    let mut admin = redis::Client::open(server.url())
        .expect("a url")
        .get_multiplexed_async_connection()
        .await
        .expect("an admin connection");
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let svc = IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .layer(tower::service_fn({
            let gate = Arc::clone(&gate);
            move |req: Request<Body>| {
                let gate = Arc::clone(&gate);
                async move {
                    if req.uri().path() == "/slow" {
                        let _ = gate.acquire().await;
                    }
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(StatusCode::CREATED)
                            .body(Body::from("made"))
                            .unwrap(),
                    )
                }
            }
        }));
    let post = |path: &str, key: &str| {
        Request::post(path)
            .header("idempotency-key", key)
            .body(Body::from("{}"))
            .unwrap()
    };
    let send = |req| {
        let svc = svc.clone();
        async move {
            let res = svc.oneshot(req).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }
    };
    reset_stats(&mut admin).await;
    assert_eq!(send(post("/orders", "rt-1")).await.0, StatusCode::CREATED);
    assert_eq!(
        commands(&mut admin).await,
        2,
        "first request: claim, complete"
    );
    reset_stats(&mut admin).await;
    let (status, body) = send(post("/orders", "rt-1")).await;
    assert_eq!((status, &body[..]), (StatusCode::CREATED, &b"made"[..]));
    assert_eq!(commands(&mut admin).await, 1, "replay: one claim");
    // A duplicate while the first still runs. (The counters are reset first, or the
    // replay's call would pass for the first request's claim and the wait below would end
    // before that claim reached the server.)
    reset_stats(&mut admin).await;
    let first = tokio::spawn(send(post("/slow", "rt-2")));
    let deadline = Instant::now() + Duration::from_secs(5);
    while commands(&mut admin).await < 1 {
        assert!(Instant::now() < deadline, "the first request never claimed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reset_stats(&mut admin).await;
    assert_eq!(send(post("/slow", "rt-2")).await.0, StatusCode::CONFLICT);
    assert_eq!(
        commands(&mut admin).await,
        1,
        "duplicate in flight: one claim"
    );
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
}

/// Through the layer, on Redis: a first request is two round trips, three with a commit
/// point, and a replay one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_layer_round_trips_are_two_three_with_a_commit_point_and_one_per_replay() {
    let Some(_) = redis_url() else { return };
    let server = PrivateRedis::start();
    let mut admin = redis::Client::open(server.url())
        .expect("a url")
        .get_multiplexed_async_connection()
        .await
        .expect("an admin connection");
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    crate::round_trips::layer_round_trips(store, async || {
        let n = commands(&mut admin).await;
        reset_stats(&mut admin).await;
        n as usize
    })
    .await;
}
