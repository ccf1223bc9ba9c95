//! Commit points: a handler that declared its effects committed never runs twice, whatever
//! happens after (an error answer, a panic, a store cut off, a crash), and a retry gets the
//! stored answer, `outcome-unknown`, or what the recovery hook rebuilds.
//!
//! The Redis tests need `REDIS_URL` and say they were skipped without it.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use bytes::Bytes;
use common::{Answer, FaultStore, PausedWire, assert_problem, call, post as post_req};
use http::{Request, StatusCode};
use tower_idempotency::store::{KeyState, StoreKey};
use tower_idempotency::{
    IdempotencyClaim, IdempotencyLayer, IdempotencyOutcome, IdempotencyStore, MemoryStore, Scope,
};

/// The app's own state: the orders it created, by the key they were created under.
#[derive(Clone, Default)]
struct Orders {
    runs: Arc<AtomicUsize>,
    by_key: Arc<Mutex<HashMap<String, String>>>,
}

impl Orders {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

fn layer(store: impl IdempotencyStore, lease_ms: u64) -> IdempotencyLayer {
    IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .lease(Duration::from_millis(lease_ms))
        .store_timeout(Duration::from_millis(200))
}

/// A route that commits, records the order, and answers with `status`.
fn committing_app(orders: Orders, status: StatusCode, layer: IdempotencyLayer) -> Router {
    Router::new()
        .route(
            "/orders",
            post(move |claim: IdempotencyClaim, body: String| {
                let orders = orders.clone();
                async move {
                    claim.commit().await.expect("commit point");
                    let n = orders.runs.fetch_add(1, Ordering::SeqCst);
                    let order = format!("order {n} for {body}");
                    orders
                        .by_key
                        .lock()
                        .unwrap()
                        .insert(claim.key().to_owned(), order.clone());
                    (status, order)
                }
            }),
        )
        .layer(layer)
}

/// Retries `req` until the answer is not `409` (the first request's lease still running).
async fn retry_past_409(app: &Router, key: &str, body: &str) -> Answer {
    for _ in 0..200 {
        let answer = call(app, post_req(Some(key), body)).await;
        if answer.status != StatusCode::CONFLICT {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the key stayed in use");
}

#[tokio::test]
async fn a_committed_error_answer_is_stored_and_replayed_not_run_again() {
    let orders = Orders::default();
    let app = committing_app(
        orders.clone(),
        StatusCode::BAD_GATEWAY,
        layer(MemoryStore::new(), 30_000),
    );
    let first = call(&app, post_req(Some("k1"), "{}")).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    let retry = call(&app, post_req(Some("k1"), "{}")).await;
    assert_eq!(retry.status, StatusCode::BAD_GATEWAY);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(orders.runs(), 1, "a committed operation ran again");
}

/// Without a commit point, an error answer releases the key (documented): a retry runs.
#[tokio::test]
async fn without_a_commit_point_an_error_answer_lets_a_retry_run() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/orders",
            post({
                let runs = Arc::clone(&runs);
                move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    StatusCode::BAD_GATEWAY
                }
            }),
        )
        .layer(layer(MemoryStore::new(), 30_000));
    call(&app, post_req(Some("k1"), "{}")).await;
    let retry = call(&app, post_req(Some("k1"), "{}")).await;
    assert!(!retry.replayed());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_panic_after_the_commit_point_leaves_outcome_unknown_never_a_second_run() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/orders",
            post({
                let runs = Arc::clone(&runs);
                move |claim: IdempotencyClaim| async move {
                    claim.commit().await.expect("commit point");
                    runs.fetch_add(1, Ordering::SeqCst);
                    panic!("crashed after charging the card");
                    #[allow(unreachable_code)]
                    ()
                }
            }),
        )
        .layer(layer(MemoryStore::new(), 30_000));
    let first = tokio::spawn({
        let app = app.clone();
        async move { call(&app, post_req(Some("k1"), "{}")).await }
    })
    .await;
    assert!(first.unwrap_err().is_panic());
    // The panic let go of the key at once (no wait for the 30 s lease).
    let retry = retry_past_409(&app, "k1", "{}").await;
    assert_problem(&retry, 500, "outcome-unknown");
    assert_eq!(retry.outcome, Some(IdempotencyOutcome::OutcomeUnknown));
    let again = call(&app, post_req(Some("k1"), "{}")).await;
    assert_problem(&again, 500, "outcome-unknown");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a committed operation ran again"
    );
    // Another payload under the key is still refused as a reuse.
    let other = call(&app, post_req(Some("k1"), "{\"other\":1}")).await;
    assert_problem(&other, 422, "key-reused");
}

#[tokio::test]
async fn grpc_calls_get_status_unknown_for_an_unknown_outcome() {
    let store = MemoryStore::new();
    let key = StoreKey::new(&Scope::anonymous(), "g1");
    let app = Router::new()
        .route(
            "/pkg.Svc/Pay",
            post(|claim: IdempotencyClaim| async move {
                claim.commit().await.expect("commit point");
                panic!("crashed after the commit point");
                #[allow(unreachable_code)]
                ()
            }),
        )
        .layer(layer(store.clone(), 30_000).grpc_methods(["/pkg.Svc/Pay"]));
    let req = || {
        Request::post("/pkg.Svc/Pay")
            .header("content-type", "application/grpc")
            .header("idempotency-key", "g1")
            .body(axum::body::Body::from(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let app2 = app.clone();
    let first = tokio::spawn(async move { call(&app2, req()).await }).await;
    assert!(first.unwrap_err().is_panic());
    common::eventually("the key reads as outcome unknown", || {
        futures_now(store.inspect(&key))
            .is_some_and(|s| matches!(s, Ok(KeyState::OutcomeUnknown { .. })))
    })
    .await;
    let retry = call(&app, req()).await;
    assert_eq!(retry.status, StatusCode::OK);
    let status = retry
        .headers
        .get("grpc-status")
        .or(retry.trailers.as_ref().and_then(|t| t.get("grpc-status")))
        .expect("a grpc-status");
    assert_eq!(status, "2", "gRPC UNKNOWN");
}

/// Polls a future once (the memory store answers at once).
fn futures_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// The store fails every call after the commit point: the instance is cut off between its
/// effects and its answer (as if it crashed), with a short lease. Another instance on the
/// same store then answers retries: `outcome-unknown`, or with a recovery hook the answer
/// rebuilt from the app's own state, stored and replayed. The operation runs once.
async fn cut_off_after_commit<S: IdempotencyStore + Clone>(store: S, key: &str) {
    let orders = Orders::default();
    let cut = FaultStore::new(store.clone());
    cut.faults.fail_after_commit.store(true, Ordering::SeqCst);
    let first_instance =
        committing_app(orders.clone(), StatusCode::CREATED, layer(cut.clone(), 300));
    let first = call(&first_instance, post_req(Some(key), "{\"sku\":1}")).await;
    // The client got its answer (the layer does not hold it for a whole outage) ...
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(cut.faults.cut_off.load(Ordering::SeqCst));
    // ... but it was never stored, and the instance cannot renew its lease.
    let second_instance = committing_app(
        orders.clone(),
        StatusCode::CREATED,
        layer(store.clone(), 300),
    );
    let retry = retry_past_409(&second_instance, key, "{\"sku\":1}").await;
    assert_problem(&retry, 500, "outcome-unknown");

    let hook_calls = Arc::new(AtomicUsize::new(0));
    let recovering = committing_app(
        orders.clone(),
        StatusCode::CREATED,
        layer(store.clone(), 300).recover_with({
            let orders = orders.clone();
            let hook_calls = Arc::clone(&hook_calls);
            move |unsettled| {
                let orders = orders.clone();
                let hook_calls = Arc::clone(&hook_calls);
                async move {
                    hook_calls.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(unsettled.scope(), "anon");
                    let found = orders.by_key.lock().unwrap().get(unsettled.key()).cloned();
                    Ok(found.map(|order| {
                        http::Response::builder()
                            .status(StatusCode::CREATED)
                            .header("x-recovered", "yes")
                            .body(Bytes::from(order))
                            .unwrap()
                    }))
                }
            }
        }),
    );
    let recovered = call(&recovering, post_req(Some(key), "{\"sku\":1}")).await;
    assert_eq!(recovered.status, StatusCode::CREATED);
    assert!(recovered.replayed());
    assert_eq!(recovered.outcome, Some(IdempotencyOutcome::Recovered));
    assert_eq!(
        recovered.body, first.body,
        "the recovered answer is the first one"
    );
    // Stored: every instance replays it now, and the hook is not asked again.
    for app in [&second_instance, &recovering] {
        let replay = call(app, post_req(Some(key), "{\"sku\":1}")).await;
        assert_eq!(replay.status, StatusCode::CREATED);
        assert_eq!(replay.outcome, Some(IdempotencyOutcome::Replayed));
        assert_eq!(replay.body, first.body);
        assert_eq!(replay.headers["x-recovered"], "yes");
    }
    assert_eq!(hook_calls.load(Ordering::SeqCst), 1);
    assert_eq!(orders.runs(), 1, "a committed operation ran again");
}

#[tokio::test]
async fn memory_store_cut_off_after_the_commit_point_never_runs_twice() {
    cut_off_after_commit(MemoryStore::new(), "cut-1").await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_store_cut_off_after_the_commit_point_never_runs_twice() {
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: REDIS_URL not set");
        return;
    };
    let store = tower_idempotency::RedisStore::connect(&url)
        .await
        .expect("connect to REDIS_URL")
        .prefix("tower-idempotency-test:commit:");
    cut_off_after_commit(store, &uuid::Uuid::new_v4().to_string()).await;
}

#[tokio::test]
async fn the_handler_sees_its_key_scope_and_token() {
    let seen = Arc::new(Mutex::new(None));
    let app =
        Router::new()
            .route(
                "/orders",
                post({
                    let seen = Arc::clone(&seen);
                    move |claim: IdempotencyClaim| async move {
                        *seen.lock().unwrap() = Some((
                            claim.key().to_owned(),
                            claim.scope().to_owned(),
                            claim.store_key().clone(),
                            claim.is_committed(),
                        ));
                        "ok"
                    }
                }),
            )
            .route(
                "/health",
                get(|claim: Option<IdempotencyClaim>| async move {
                    format!("claim: {}", claim.is_some())
                }),
            )
            .route("/strict", get(|_claim: IdempotencyClaim| async { "never" }))
            .layer(
                IdempotencyLayer::new(MemoryStore::new())
                    .scope_by(|_| Some(Scope::of_principal(&"user:7"))),
            );
    let answer = call(&app, post_req(Some("abc"), "{}")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let (key, scope, store_key, committed) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(key, "abc");
    assert_eq!(scope, Scope::of_principal(&"user:7").as_str());
    assert_eq!(
        store_key,
        StoreKey::new(&Scope::of_principal(&"user:7"), "abc")
    );
    assert!(!committed);
    // Uncovered requests carry no claim.
    let health = call(
        &app,
        Request::get("/health")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(health.text(), "claim: false");
    let strict = call(
        &app,
        Request::get("/strict")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(strict.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(strict.text().contains("no idempotency claim"));
}

/// A commit point refused by the store (the key was taken over) is reported to the handler,
/// which then must not make its effects.
#[tokio::test]
async fn a_commit_after_losing_the_key_is_refused() {
    let store = MemoryStore::new();
    let key = StoreKey::new(&Scope::anonymous(), "lost");
    let outcome = Arc::new(Mutex::new(None));
    let app = Router::new()
        .route(
            "/orders",
            post({
                let store = store.clone();
                let key = key.clone();
                let outcome = Arc::clone(&outcome);
                move |claim: IdempotencyClaim| async move {
                    // An operator purges the key under the running operation.
                    assert!(store.purge(&key).await.unwrap());
                    let result = claim.commit().await;
                    *outcome.lock().unwrap() = Some(format!("{result:?}"));
                    if result.is_err() {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    StatusCode::CREATED
                }
            }),
        )
        .layer(layer(store.clone(), 30_000));
    let answer = call(&app, post_req(Some("lost"), "{}")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(outcome.lock().unwrap().as_deref(), Some("Err(LeaseLost)"));
}

/// A gRPC handler cut off by its deadline (`DEADLINE_EXCEEDED`, as a timeout inside the
/// layer answers) may have made its effect: its key is kept, never released for a second
/// run (the gRPC twin of HTTP `408`).
#[tokio::test]
async fn grpc_deadline_exceeded_is_never_run_twice() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/pkg.Svc/Pay",
            post({
                let runs = Arc::clone(&runs);
                move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    // A trailers-only answer: the deadline ran out midway.
                    http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "4")
                        .header("grpc-message", "deadline exceeded")
                        .body(axum::body::Body::empty())
                        .unwrap()
                }
            }),
        )
        .layer(layer(MemoryStore::new(), 30_000).grpc_methods(["/pkg.Svc/Pay"]));
    let req = || {
        Request::post("/pkg.Svc/Pay")
            .header("content-type", "application/grpc")
            .header("idempotency-key", "d1")
            .body(axum::body::Body::from(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let first = call(&app, req()).await;
    assert_eq!(first.headers["grpc-status"], "4");
    let retry = call(&app, req()).await;
    let status = retry
        .headers
        .get("grpc-status")
        .or(retry.trailers.as_ref().and_then(|t| t.get("grpc-status")))
        .expect("a grpc-status");
    assert_eq!(status, "6", "ALREADY_EXISTS: it may have run");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a cut-off gRPC call ran again"
    );
}

/// A recovery hook per route: each route has its own layer over one store, and each
/// unknown outcome is rebuilt by its own route's hook.
#[tokio::test]
async fn each_route_recovers_with_its_own_hook() {
    let store = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let panicking = |runs: Arc<AtomicUsize>| {
        move |claim: IdempotencyClaim| async move {
            claim.commit().await.expect("commit point");
            runs.fetch_add(1, Ordering::SeqCst);
            panic!("crashed after the effect");
            #[allow(unreachable_code)]
            ()
        }
    };
    let hook = |name: &'static str| {
        layer(store.clone(), 30_000).recover_with(move |unsettled| async move {
            Ok(Some(
                http::Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Bytes::from(format!("{name} {}", unsettled.key())))
                    .unwrap(),
            ))
        })
    };
    let app = Router::new()
        .route(
            "/payments",
            post(panicking(Arc::clone(&runs))).layer(hook("payment")),
        )
        .route(
            "/refunds",
            post(panicking(Arc::clone(&runs))).layer(hook("refund")),
        );
    let req = |path: &str, key: &str| {
        Request::post(path)
            .header("idempotency-key", key)
            .body(axum::body::Body::from("{}"))
            .unwrap()
    };
    for (path, key, expected) in [
        ("/payments", "p1", "payment p1"),
        ("/refunds", "r1", "refund r1"),
    ] {
        let first = tokio::spawn({
            let app = app.clone();
            let req = req(path, key);
            async move { call(&app, req).await }
        })
        .await;
        assert!(first.unwrap_err().is_panic());
        let recovered = call(&app, req(path, key)).await;
        assert_eq!(
            recovered.status,
            StatusCode::CREATED,
            "{}",
            recovered.text()
        );
        assert_eq!(recovered.outcome, Some(IdempotencyOutcome::Recovered));
        assert_eq!(recovered.body, expected);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each operation ran once");
}

/// The store pauses (a Redis server stopped longer than the store timeout) while the
/// handler is at `claim.commit()`: the commit times out and the handler, as documented,
/// makes no order and answers 503. The commit command, already on the wire, lands when the
/// store resumes. `Err` must mean "not committed": the layer withdraws the late commit
/// instead of binding the key to the 503 (or leaving it `outcome-unknown`), and a retry
/// runs and creates the one order.
#[tokio::test]
async fn a_commit_that_timed_out_is_withdrawn_and_never_binds_the_key() {
    let wire = PausedWire::new(MemoryStore::new());
    let orders = Orders::default();
    let app = {
        let (on_wire, orders) = (wire.clone(), orders.clone());
        Router::new()
            .route(
                "/orders",
                post(move |claim: IdempotencyClaim| {
                    let (wire, orders) = (on_wire.clone(), orders.clone());
                    async move {
                        if orders.runs.fetch_add(1, Ordering::SeqCst) == 0 {
                            // The first attempt finds the store paused at its commit.
                            wire.pause();
                        }
                        match claim.commit().await {
                            Ok(()) => {
                                let mut by_key = orders.by_key.lock().unwrap();
                                by_key.insert(claim.key().to_owned(), "order".into());
                                (StatusCode::CREATED, "order created")
                            }
                            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "order not created"),
                        }
                    }
                }),
            )
            .layer(
                IdempotencyLayer::new(wire.clone())
                    .share_keys_across_callers()
                    .lease(Duration::from_millis(400))
                    .store_timeout(Duration::from_millis(100)),
            )
    };
    let first = call(&app, post_req(Some("k"), "{}")).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    // The pause outlasts the store timeout several times, then the wire delivers it all.
    tokio::time::sleep(Duration::from_millis(700)).await;
    wire.resume();
    let retry = retry_past_409(&app, "k", "{}").await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "the first attempt was told its commit failed, so the retry must run: {:?} {:?}",
        retry.body,
        wire.landed.lock().unwrap()
    );
    let again = call(&app, post_req(Some("k"), "{}")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.outcome, Some(IdempotencyOutcome::Replayed));
    assert_eq!(orders.by_key.lock().unwrap().len(), 1, "exactly one order");
    assert_eq!(orders.runs(), 2, "the failed attempt and the retry ran");
}

/// A handler commits, then crashes before the step the commit protects (the card was never
/// charged). The recovery hook, which can see that no charge exists, answers
/// `Recovery::NeverRan`: the commit is withdrawn (fenced by the token that made it) and the
/// retry runs. Eight retries that all hear "never ran" at once run it once between them:
/// one withdraws the commit and runs, the others find the key in flight (or, later, its
/// answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovery_that_finds_nothing_ran_lets_exactly_one_retry_run() {
    use tower_idempotency::Recovery;
    let charges = Arc::new(AtomicUsize::new(0));
    let attempts = Arc::new(AtomicUsize::new(0));
    let hook_calls = Arc::new(AtomicUsize::new(0));
    let store = MemoryStore::new();
    let app = Router::new()
        .route(
            "/orders",
            post({
                let (charges, attempts) = (Arc::clone(&charges), Arc::clone(&attempts));
                move |claim: IdempotencyClaim| async move {
                    claim.commit().await.expect("commit point");
                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("crashed after the commit point, before charging");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let n = charges.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, format!("charge {n}"))
                }
            }),
        )
        .layer(layer(store.clone(), 30_000).recover_with({
            let (charges, hook_calls) = (Arc::clone(&charges), Arc::clone(&hook_calls));
            move |_unsettled| {
                let (charges, hook_calls) = (Arc::clone(&charges), Arc::clone(&hook_calls));
                async move {
                    hook_calls.fetch_add(1, Ordering::SeqCst);
                    // A slow look-up: it answers once another retry is asking too (or after
                    // a second), so that at least two retries decide before any runs.
                    let until = tokio::time::Instant::now() + Duration::from_secs(1);
                    while hook_calls.load(Ordering::SeqCst) < 2
                        && tokio::time::Instant::now() < until
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok(if charges.load(Ordering::SeqCst) == 0 {
                        Recovery::NeverRan
                    } else {
                        Recovery::Unknown
                    })
                }
            }
        }));
    let first = tokio::spawn({
        let app = app.clone();
        async move { call(&app, post_req(Some("k"), "{}")).await }
    })
    .await;
    assert!(first.unwrap_err().is_panic());
    // The crashed request lets its key go on a task of its own: the retries come once the
    // key reads committed with no outcome (before, they could find it still held: 409).
    let key = StoreKey::new(&tower_idempotency::Scope::anonymous(), "k");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !matches!(
        store.inspect(&key).await.unwrap(),
        KeyState::OutcomeUnknown { .. }
    ) {
        assert!(tokio::time::Instant::now() < deadline, "the key was let go");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let retries: Vec<_> = (0..8)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { call(&app, post_req(Some("k"), "{}")).await })
        })
        .collect();
    let mut created = 0;
    for retry in retries {
        let answer = retry.await.unwrap();
        match answer.status.as_u16() {
            201 => created += 1,
            409 => {}
            other => panic!("a retry got {other}: {:?}", answer.body),
        }
    }
    assert!(created >= 1, "the retry that withdrew the commit ran");
    assert!(
        hook_calls.load(Ordering::SeqCst) >= 2,
        "the retries asked the hook"
    );
    assert_eq!(charges.load(Ordering::SeqCst), 1, "exactly one charge");
    let replay = retry_past_409(&app, "k", "{}").await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.outcome, Some(IdempotencyOutcome::Replayed));
    assert_eq!(&replay.body[..], b"charge 0");
    assert_eq!(charges.load(Ordering::SeqCst), 1);
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2,
        "the crashed attempt and one retry"
    );
}

/// The recovery hook races an owner that is still alive: its heartbeat fails, its lease
/// lapses while it runs past its commit point, a retry finds the key `outcome-unknown` and
/// the hook settles it; then the owner ends and tries to store its own answer. The key
/// keeps one answer, the first stored (the owner's store is refused, fenced by its token),
/// every retry replays that one, and the operation ran once.
#[tokio::test]
async fn a_recovery_racing_a_live_owner_leaves_the_key_one_answer() {
    let store = FaultStore::new(MemoryStore::new());
    store
        .faults
        .extend_failures
        .store(usize::MAX, Ordering::SeqCst);
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/orders",
            post({
                let runs = Arc::clone(&runs);
                move |claim: IdempotencyClaim| async move {
                    claim.commit().await.expect("commit point");
                    runs.fetch_add(1, Ordering::SeqCst);
                    // Alive but slow: longer than its lease, which it cannot renew.
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    (StatusCode::CREATED, "the owner's answer")
                }
            }),
        )
        .layer(layer(store.clone(), 150).recover_with(|_| async {
            Ok(Some(
                http::Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Bytes::from_static(b"the recovered answer"))
                    .unwrap(),
            ))
        }));
    let owner = tokio::spawn({
        let app = app.clone();
        async move { call(&app, post_req(Some("race"), "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recovered = call(&app, post_req(Some("race"), "{}")).await;
    assert_eq!(recovered.outcome, Some(IdempotencyOutcome::Recovered));
    let owner = owner.await.unwrap();
    assert_eq!(owner.status, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let replay = call(&app, post_req(Some("race"), "{}")).await;
        assert_eq!(replay.outcome, Some(IdempotencyOutcome::Replayed));
        assert_eq!(&replay.body[..], b"the recovered answer");
    }
    match store
        .inspect(&StoreKey::new(&Scope::anonymous(), "race"))
        .await
        .unwrap()
    {
        KeyState::Completed { record, .. } => {
            assert_eq!(&record.body()[..], b"the recovered answer")
        }
        other => panic!("one stored answer, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A `502` marked `MayHaveRun` (a proxy whose upstream got the request and dropped the
/// connection) is stored and replayed, not released; while the store fails to take it,
/// the completion is retried holding the key, so no retry runs the operation again.
#[tokio::test]
async fn an_answer_marked_may_have_run_is_stored_whatever_its_status() {
    use axum::response::IntoResponse;
    use tower_idempotency::MayHaveRun;
    let store = FaultStore::new(MemoryStore::new());
    store.faults.complete_failures.store(3, Ordering::SeqCst);
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/orders",
            post({
                let runs = Arc::clone(&runs);
                move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let mut res =
                        (StatusCode::BAD_GATEWAY, "the upstream may have run it").into_response();
                    res.extensions_mut().insert(MayHaveRun);
                    res
                }
            }),
        )
        .layer(layer(store.clone(), 30_000));
    let first = call(&app, post_req(Some("maybe"), "{}")).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    let retry = retry_past_409(&app, "maybe", "{}").await;
    assert_eq!(retry.status, StatusCode::BAD_GATEWAY);
    assert_eq!(retry.outcome, Some(IdempotencyOutcome::Replayed));
    assert_eq!(&retry.body[..], b"the upstream may have run it");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "never run again");
    // Without the mark, the same status releases the key: the retry runs.
    let plain = Router::new()
        .route(
            "/orders",
            post({
                let runs = Arc::clone(&runs);
                move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    StatusCode::BAD_GATEWAY
                }
            }),
        )
        .layer(layer(MemoryStore::new(), 30_000));
    call(&plain, post_req(Some("plain"), "{}")).await;
    call(&plain, post_req(Some("plain"), "{}")).await;
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// The recovery hook says the committed operation never ran, but withdrawing its commit
/// fails: the retry is refused with `503`, even under the fail-open policy, since the key
/// was committed and the withdrawal may have landed. Running it unprotected could run it
/// twice. The next retry withdraws it and runs, once.
#[tokio::test]
async fn a_failed_withdrawal_never_runs_unprotected_even_failing_open() {
    use tower_idempotency::{Recovery, StoreFailure};
    let store = FaultStore::new(MemoryStore::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/orders",
            post({
                let runs = Arc::clone(&runs);
                move |claim: IdempotencyClaim| async move {
                    claim.commit().await.expect("commit point");
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("crashed after the commit point, before the effect");
                    }
                    (StatusCode::CREATED, "done")
                }
            }),
        )
        .layer(
            layer(store.clone(), 30_000)
                .on_store_failure(StoreFailure::FailOpen)
                .recover_with(|_| async { Ok(Recovery::NeverRan) }),
        );
    let first = tokio::spawn({
        let app = app.clone();
        async move { call(&app, post_req(Some("w"), "{}")).await }
    })
    .await;
    assert!(first.unwrap_err().is_panic());
    store.faults.revoke_failures.store(1, Ordering::SeqCst);
    let refused = retry_past_409(&app, "w", "{}").await;
    assert_problem(&refused, 503, "store-unavailable");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "not run unprotected");
    let retry = call(&app, post_req(Some("w"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Retries until the key is no longer in flight (a withdrawal holds it meanwhile).
async fn settled_answer(app: &Router) -> Answer {
    for _ in 0..200 {
        let answer = call(app, post_req(Some("k"), "{}")).await;
        if answer.status != StatusCode::CONFLICT {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the key stayed in flight");
}

/// A handler told its commit point failed makes no effects and answers as it likes; with
/// the crate's own example (`commit().await.map_err(..)?` in a handler answering
/// `Result<String, String>`) that answer is a `200` "not charged". The commit, which landed
/// after its call timed out, is withdrawn and that answer is never stored: a retry runs,
/// and charges once. (Before, the `200` was stored and replayed to every retry, and the
/// charge never ran.)
#[tokio::test]
async fn an_answer_after_a_commit_in_doubt_is_never_stored_whatever_its_status() {
    let wire = PausedWire::new(MemoryStore::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let charges = Arc::new(AtomicUsize::new(0));
    let app = {
        let (on_wire, runs, charges) = (wire.clone(), runs.clone(), charges.clone());
        Router::new()
            .route(
                "/orders",
                post(move |claim: IdempotencyClaim, body: String| {
                    let (wire, runs, charges) = (on_wire.clone(), runs.clone(), charges.clone());
                    async move {
                        if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                            wire.pause();
                        }
                        claim
                            .commit()
                            .await
                            .map_err(|e| format!("not charged: {e}"))?;
                        charges.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, String>(format!("charged {body}"))
                    }
                }),
            )
            .layer(
                IdempotencyLayer::new(wire.clone())
                    .share_keys_across_callers()
                    .lease(Duration::from_millis(400))
                    .store_timeout(Duration::from_millis(100)),
            )
    };
    let first = {
        let app = app.clone();
        tokio::spawn(async move { call(&app, post_req(Some("k"), "{}")).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The commit lands now.
    wire.resume();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    assert!(first.text().starts_with("not charged"), "{}", first.text());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let retry = settled_answer(&app).await;
    assert_eq!(
        retry.text(),
        "charged {}",
        "the retry ran: {:?}",
        retry.outcome
    );
    assert_eq!(charges.load(Ordering::SeqCst), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A handler that stops waiting for its commit point (a timeout of its own, which drops
/// the call) makes no effects; the command, which lands afterwards, is withdrawn as if the
/// call had failed, so its `503` is not bound to the key: a retry runs. (Before, the layer
/// took the dropped call for no commit, the late commit made the key committed, and the
/// `503` was stored and replayed for good.)
#[tokio::test]
async fn a_commit_the_handler_stopped_waiting_for_is_withdrawn() {
    let wire = PausedWire::new(MemoryStore::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicUsize::new(0));
    let app = {
        let (on_wire, runs, created) = (wire.clone(), runs.clone(), created.clone());
        Router::new()
            .route(
                "/orders",
                post(move |claim: IdempotencyClaim| {
                    let (wire, runs, created) = (on_wire.clone(), runs.clone(), created.clone());
                    async move {
                        if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                            wire.pause();
                            let wire = wire.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                wire.resume();
                            });
                        }
                        match tokio::time::timeout(Duration::from_millis(50), claim.commit()).await
                        {
                            Ok(Ok(())) => {
                                created.fetch_add(1, Ordering::SeqCst);
                                (StatusCode::CREATED, "created")
                            }
                            _ => (StatusCode::SERVICE_UNAVAILABLE, "not created, retry"),
                        }
                    }
                }),
            )
            .layer(
                IdempotencyLayer::new(wire.clone())
                    .share_keys_across_callers()
                    .lease(Duration::from_millis(400))
                    .store_timeout(Duration::from_secs(2)),
            )
    };
    let first = call(&app, post_req(Some("k"), "{}")).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let retry = settled_answer(&app).await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "the retry ran: {:?}",
        retry.outcome
    );
    assert_eq!(created.load(Ordering::SeqCst), 1);
}

/// An operation that fails after its commit point could not be confirmed (the command
/// landed after its call timed out), whose client leaves while the commit is being
/// withdrawn and the store refuses the withdrawal for a while (the layer releases with the
/// client, `Disconnect::Release`): the withdrawal goes on by itself, so the key ends free
/// and a retry runs. (Before, the dropped withdrawal left the key's lease renewed for good:
/// every retry got `409` until the process ended.)
#[tokio::test]
async fn a_withdrawal_whose_client_leaves_goes_on_and_frees_the_key() {
    use tower::ServiceExt;
    use tower_idempotency::policy::Disconnect;

    let wire = PausedWire::new(MemoryStore::new());
    let store = FaultStore::new(wire.clone());
    let faults = Arc::clone(&store.faults);
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = {
        let (on_wire, runs, on_faults) = (wire.clone(), runs.clone(), Arc::clone(&faults));
        let handler = tower::service_fn(move |req: Request<axum::body::Body>| {
            let (wire, runs, faults) = (on_wire.clone(), runs.clone(), Arc::clone(&on_faults));
            async move {
                let claim = req.extensions().get::<IdempotencyClaim>().cloned().unwrap();
                if runs.fetch_add(1, Ordering::SeqCst) > 0 {
                    return Ok(http::Response::new(axum::body::Body::from("ran")));
                }
                wire.pause();
                // Not confirmed (the store is paused): no effects; the operation fails.
                assert!(claim.commit().await.is_err());
                // The commit lands now, and the store refuses to withdraw it for a while.
                faults.revoke_failures.store(usize::MAX, Ordering::SeqCst);
                wire.resume();
                Err(std::io::Error::other("not done"))
            }
        });
        tower::Layer::layer(
            &IdempotencyLayer::new(store)
                .share_keys_across_callers()
                .lease(Duration::from_millis(400))
                .store_timeout(Duration::from_millis(300))
                .on_disconnect(Disconnect::Release),
            handler,
        )
    };
    // The client leaves while the withdrawal is tried inline (from about 300 ms to 600).
    let first = tokio::time::timeout(
        Duration::from_millis(450),
        svc.clone().oneshot(post_req(Some("k"), "{}")),
    )
    .await;
    assert!(first.is_err(), "the client left before the answer");
    // The store takes withdrawals again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    faults.revoke_failures.store(0, Ordering::SeqCst);
    let mut answer = None;
    for _ in 0..200 {
        let res = svc.clone().oneshot(post_req(Some("k"), "{}")).await;
        if let Ok(res) = res
            && res.status() != StatusCode::CONFLICT
        {
            answer = Some(res.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(answer, Some(StatusCode::OK), "a retry ran");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Committing twice is the same as once, as `commit`'s docs say: a second call after a
/// confirmed one answers `Ok` without the store, even while the store is cut off, and the
/// answer is stored and replayed. (Found by review: the second call went to the store and
/// answered `Err` for a key that was committed, against "an error means not committed".)
#[tokio::test]
async fn committing_again_after_a_confirmed_commit_is_ok_without_the_store() {
    let store = FaultStore::new(MemoryStore::new());
    let faults = Arc::clone(&store.faults);
    let seen = Arc::new(Mutex::new(None));
    let app = {
        let (faults, seen) = (Arc::clone(&faults), Arc::clone(&seen));
        Router::new().route(
            "/orders",
            post(move |claim: IdempotencyClaim| {
                let (faults, seen) = (Arc::clone(&faults), Arc::clone(&seen));
                async move {
                    claim.commit().await.expect("the commit point");
                    faults.cut_off.store(true, Ordering::SeqCst);
                    let again = claim.commit().await;
                    faults.cut_off.store(false, Ordering::SeqCst);
                    *seen.lock().unwrap() = Some(again.is_ok());
                    (StatusCode::CREATED, "made")
                }
            }),
        )
    }
    .layer(layer(store, 5_000));
    let first = call(&app, post_req(Some("twice"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        *seen.lock().unwrap(),
        Some(true),
        "the second commit answered Ok"
    );
    let retry = call(&app, post_req(Some("twice"), "{}")).await;
    assert!(retry.replayed(), "{:?}", retry.outcome);
}
