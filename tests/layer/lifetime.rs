//! A request's own record TTL (`ttl_by`, `RecordTtl`, `Call::ttl`), its bounds, and the
//! `Idempotency-Expires` header on first answers and replays.

use std::time::{Duration, SystemTime};

use axum::body::Body;
use http::{Request, Response, StatusCode};
use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyLayer, MemoryStore, RecordTtl};

use crate::common::{Counter, call, post};

const HOUR: Duration = Duration::from_secs(3600);

fn to(path: &str, key: &str) -> Request<Body> {
    let mut req = post(Some(key), "{}");
    *req.uri_mut() = path.parse().unwrap();
    req
}

#[tokio::test(start_paused = true)]
async fn a_route_that_asks_for_a_short_ttl_is_kept_that_long_and_the_others_the_layers() {
    let counter = Counter::default();
    let svc = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(MemoryStore::new())
                .share_keys_across_callers()
                .ttl(HOUR)
                .ttl_by(|req| (req.uri.path() == "/quotes").then(|| Duration::from_secs(5))),
        )
        .service(counter.service(Duration::ZERO));
    assert_eq!(
        call(&svc, to("/quotes", "q")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        call(&svc, to("/orders", "o")).await.status,
        StatusCode::CREATED
    );
    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(
        call(&svc, to("/quotes", "q")).await.replayed(),
        "still kept at 4 s"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    let quote = call(&svc, to("/quotes", "q")).await;
    assert!(!quote.replayed(), "gone after its 5 s: the retry ran again");
    assert!(
        call(&svc, to("/orders", "o")).await.replayed(),
        "kept for the hour"
    );
    assert_eq!(counter.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_ttl_asked_for_is_kept_between_one_second_and_the_layers_ttl() {
    let counter = Counter::default();
    let svc = ServiceBuilder::new()
        .map_request(|mut req: Request<Body>| {
            let asked = match req.uri().path() {
                "/zero" => Duration::ZERO,
                _ => Duration::MAX,
            };
            req.extensions_mut().insert(RecordTtl(asked));
            req
        })
        .layer(
            IdempotencyLayer::new(MemoryStore::new())
                .share_keys_across_callers()
                .ttl(Duration::from_secs(60)),
        )
        .service(counter.service(Duration::ZERO));
    call(&svc, to("/zero", "z")).await;
    call(&svc, to("/forever", "f")).await;
    tokio::time::advance(Duration::from_millis(900)).await;
    assert!(
        call(&svc, to("/zero", "z")).await.replayed(),
        "at least one second"
    );
    tokio::time::advance(Duration::from_secs(58)).await;
    assert!(call(&svc, to("/forever", "f")).await.replayed());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(
        !call(&svc, to("/forever", "f")).await.replayed(),
        "no longer than the layer's 60 s"
    );
}

#[tokio::test]
async fn expiry_is_announced_on_the_first_answer_and_replayed_unchanged() {
    let counter = Counter::default();
    let svc = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(MemoryStore::new())
                .share_keys_across_callers()
                .ttl(HOUR)
                .announce_expiry(true),
        )
        .service(counter.service(Duration::ZERO));
    let before = SystemTime::now();
    let first = call(&svc, post(Some("k"), "{}")).await;
    let expires = first.headers["idempotency-expires"].to_str().unwrap();
    let at = httpdate::parse_http_date(expires).expect("an HTTP-date");
    let from_now = at.duration_since(before).unwrap();
    assert!(
        from_now >= HOUR - Duration::from_secs(2) && from_now <= HOUR + Duration::from_secs(2),
        "{expires} is an hour away"
    );
    let again = call(&svc, post(Some("k"), "{}")).await;
    assert!(again.replayed());
    assert_eq!(again.headers["idempotency-expires"], expires);
}

#[tokio::test]
async fn expiry_is_not_announced_by_default_nor_on_answers_that_free_their_key() {
    let counter = Counter::default();
    let quiet = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers())
        .service(counter.service(Duration::ZERO));
    assert!(
        !call(&quiet, post(Some("k"), "{}"))
            .await
            .headers
            .contains_key("idempotency-expires")
    );
    let failing = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(MemoryStore::new())
                .share_keys_across_callers()
                .announce_expiry(true),
        )
        .service_fn(|_req: Request<Body>| async {
            let mut res = Response::new(Body::from("down"));
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, std::convert::Infallible>(res)
        });
    let answer = call(&failing, post(Some("k"), "{}")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!answer.headers.contains_key("idempotency-expires"));
}

#[tokio::test(start_paused = true)]
async fn a_calls_own_ttl_bounds_how_long_its_result_is_kept() {
    use bytes::Bytes;
    use tower_idempotency::function::Idempotent;
    let calls = Idempotent::new(
        &IdempotencyLayer::new(MemoryStore::new())
            .share_keys_across_callers()
            .ttl(HOUR),
    );
    let run = |n: &'static str| {
        let calls = calls.clone();
        async move {
            calls
                .key("job")
                .ttl(Duration::from_secs(10))
                .run(move |_| async move { Ok::<_, Bytes>(Bytes::from(n)) })
                .await
                .unwrap()
        }
    };
    assert_eq!(run("first").await.value, "first");
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(run("second").await.value, "first");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(run("third").await.value, "third");
}

#[tokio::test(start_paused = true)]
async fn a_commit_point_is_kept_as_long_as_the_requests_ttl() {
    use bytes::Bytes;
    use tower_idempotency::function::{CallError, Idempotent};
    let calls = Idempotent::new(
        &IdempotencyLayer::new(MemoryStore::new())
            .share_keys_across_callers()
            .ttl(HOUR)
            .lease(Duration::from_millis(100)),
    );
    let crashed = {
        let calls = calls.clone();
        tokio::spawn(async move {
            calls
                .key("charge")
                .ttl(Duration::from_secs(10))
                .run(|claim| async move {
                    claim.commit().await.unwrap();
                    panic!("crashed after its commit point")
                })
                .await
        })
    };
    assert!(crashed.await.unwrap_err().is_panic());
    tokio::time::advance(Duration::from_secs(1)).await;
    let unknown = calls
        .key("charge")
        .run(|_| async { Ok::<_, Bytes>(Bytes::new()) })
        .await;
    assert!(
        matches!(unknown, Err(CallError::OutcomeUnknown)),
        "{unknown:?}"
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    let freed = calls
        .key("charge")
        .run(|_| async { Ok::<_, Bytes>(Bytes::from("ran")) })
        .await
        .unwrap();
    assert_eq!(
        freed.value, "ran",
        "the commit point ended with the call's 10 s"
    );
}

/// A route that asks for a longer lease keeps its key while its owner cannot renew (a store
/// that refuses heartbeats stands for an owner paused past its lease); on the layer's short
/// lease, the same pause lets a retry take the key over and run again.
#[tokio::test]
async fn a_route_with_a_longer_lease_is_not_taken_over_while_its_owner_cannot_renew() {
    use crate::common::FaultStore;
    for (path, runs_expected) in [("/orders", 2), ("/reports", 1)] {
        let store = FaultStore::new(MemoryStore::new());
        store
            .faults
            .extend_failures
            .store(1_000, std::sync::atomic::Ordering::SeqCst);
        let counter = Counter::default();
        let svc = ServiceBuilder::new()
            .layer(
                IdempotencyLayer::new(store.clone())
                    .share_keys_across_callers()
                    .lease(Duration::from_millis(100))
                    .lease_by(|req| (req.uri.path() == "/reports").then(|| Duration::from_secs(5))),
            )
            .service(counter.service(Duration::from_millis(800)));
        let first = {
            let svc = svc.clone();
            tokio::spawn(async move { call(&svc, to(path, "k")).await })
        };
        // Past the short lease and its contest: a retry contests, then takes over.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let _contest = call(&svc, to(path, "k")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let retry = call(&svc, to(path, "k")).await;
        first.await.unwrap();
        assert_eq!(counter.runs(), runs_expected, "{path}: {:?}", retry.status);
        if runs_expected == 1 {
            assert_eq!(
                retry.status,
                StatusCode::CONFLICT,
                "still held by its owner"
            );
        }
    }
}

#[tokio::test]
async fn a_lease_asked_for_is_never_shorter_than_the_layers() {
    use tower_idempotency::store::{KeyState, StoreKey};
    use tower_idempotency::{IdempotencyStore, Scope};
    let store = MemoryStore::new();
    let svc = ServiceBuilder::new()
        .map_request(|mut req: Request<Body>| {
            req.extensions_mut()
                .insert(tower_idempotency::ClaimLease(Duration::ZERO));
            req
        })
        .layer(
            IdempotencyLayer::new(store.clone())
                .share_keys_across_callers()
                .lease(Duration::from_secs(30)),
        )
        .service(Counter::default().service(Duration::from_millis(300)));
    let running = {
        let svc = svc.clone();
        tokio::spawn(async move { call(&svc, post(Some("k"), "{}")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let state = store
        .inspect(&StoreKey::new(&Scope::anonymous(), "k"))
        .await
        .unwrap();
    let KeyState::InFlight {
        lease_remaining, ..
    } = state
    else {
        panic!("in flight: {state}");
    };
    assert!(
        lease_remaining > Duration::from_secs(29),
        "{lease_remaining:?}"
    );
    running.await.unwrap();
}

/// A `RecordTtl` an outer layer put in the request comes before the layer's `ttl_by`.
#[tokio::test(start_paused = true)]
async fn a_record_ttl_from_an_outer_layer_comes_before_ttl_by() {
    let counter = Counter::default();
    let svc = ServiceBuilder::new()
        .map_request(|mut req: Request<Body>| {
            req.extensions_mut()
                .insert(RecordTtl(Duration::from_secs(5)));
            req
        })
        .layer(
            IdempotencyLayer::new(MemoryStore::new())
                .share_keys_across_callers()
                .ttl(HOUR)
                .ttl_by(|_| Some(HOUR)),
        )
        .service(counter.service(Duration::ZERO));
    call(&svc, post(Some("k"), "{}")).await;
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(
        !call(&svc, post(Some("k"), "{}")).await.replayed(),
        "kept 5 s, not an hour"
    );
    assert_eq!(counter.runs(), 2);
}
