//! Scenarios run on more than one store (memory, Redis, PostgreSQL, MySQL): each takes the
//! store(s) and asserts the whole story.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyOutcome, IdempotencyStore};

use super::{FaultStore, Runs, assert_problem, call, post};

/// A handler that declares its commit point, then answers `201`, runs counted in `runs`;
/// its first instance is cut off from `store` right after the commit point (as if it
/// crashed). A second instance on the same store answers the retries: `outcome-unknown`,
/// never a second run.
pub async fn commit_then_cut_off<S: IdempotencyStore + Clone>(store: S) {
    use tower::Layer as _;
    let runs = Arc::new(AtomicUsize::new(0));
    let instance = |store: Box<dyn Fn() -> tower_idempotency::IdempotencyLayer>| {
        let runs = Arc::clone(&runs);
        store().layer(tower::service_fn(move |req: Request<Body>| {
            let runs = Arc::clone(&runs);
            async move {
                let claim = req
                    .extensions()
                    .get::<tower_idempotency::IdempotencyClaim>()
                    .cloned()
                    .expect("a covered request carries its claim");
                claim.commit().await.expect("the commit point");
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .body(Body::from("made"))
                        .unwrap(),
                )
            }
        }))
    };
    let layer = |store: Arc<dyn IdempotencyStore>| {
        tower_idempotency::IdempotencyLayer::new(store)
            .share_keys_across_callers()
            .lease(Duration::from_millis(300))
            .store_timeout(Duration::from_millis(200))
    };
    let cut = FaultStore::new(store.clone());
    cut.faults.fail_after_commit.store(true, Ordering::SeqCst);
    let first = {
        let cut: Arc<dyn IdempotencyStore> = Arc::new(cut.clone());
        instance(Box::new(move || layer(Arc::clone(&cut))))
    };
    let key = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        call(&first, post(Some(&key), "{}")).await.status,
        StatusCode::CREATED
    );
    assert!(cut.faults.cut_off.load(Ordering::SeqCst));
    let second = {
        let store: Arc<dyn IdempotencyStore> = Arc::new(store);
        instance(Box::new(move || layer(Arc::clone(&store))))
    };
    let mut answer = call(&second, post(Some(&key), "{}")).await;
    for _ in 0..200 {
        if answer.status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        answer = call(&second, post(Some(&key), "{}")).await;
    }
    assert_problem(&answer, 500, "outcome-unknown");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a committed operation ran again"
    );
}

/// The heartbeat fails for the whole run, so the lease lapses while nobody else claims the
/// key: the owner still stores its outcome, and the retry replays it (one run).
pub async fn uncontested_lapse<S: IdempotencyStore + Clone>(store: S) {
    use tower::Layer;
    let store = FaultStore::new(store);
    store
        .faults
        .extend_failures
        .store(usize::MAX, Ordering::SeqCst);
    let runs = Runs::default();
    let svc = tower_idempotency::IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(Duration::from_millis(200))
        .layer(runs.handler(Duration::from_millis(700)));
    let key = uuid::Uuid::new_v4().to_string();
    let first = call(&svc, post(Some(&key), "{}")).await;
    assert_eq!(first.status, 201);
    assert!(
        store.faults.extends.load(Ordering::SeqCst) >= 2,
        "heartbeats were tried"
    );
    let retry = call(&svc, post(Some(&key), "{}")).await;
    assert_eq!(
        retry.outcome,
        Some(IdempotencyOutcome::Replayed),
        "{}",
        retry.text()
    );
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.started(), 1);
}

/// Two instances (two stores on one shared backend, two layered services): 64 concurrent
/// requests with one key run the handler once, every answer is the same, and a later retry
/// on either instance is a replay.
pub async fn two_instances_run_once<S: IdempotencyStore + Clone>(store_a: S, store_b: S) {
    use tower::Layer;
    use tower_idempotency::IdempotencyLayer;
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = Arc::clone(&runs);
        tower::service_fn(move |_req: Request<Body>| {
            let runs = Arc::clone(&runs);
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                runs.fetch_add(1, Ordering::SeqCst);
                let body = uuid::Uuid::new_v4().to_string();
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .body(Body::from(body))
                        .expect("response"),
                )
            }
        })
    };
    let instances = [
        IdempotencyLayer::new(store_a.clone())
            .share_keys_across_callers()
            .layer(handler.clone()),
        IdempotencyLayer::new(store_b.clone())
            .share_keys_across_callers()
            .layer(handler),
    ];
    let idem_key = uuid::Uuid::new_v4().to_string();
    let request = |key: &str| {
        Request::post("/orders")
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(Body::from(r#"{"item":"book","qty":1}"#))
            .expect("request")
    };

    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let svc = instances[i % 2].clone();
            let key = idem_key.clone();
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                // Retry until done: 409 means the first request is still running.
                for _ in 0..200 {
                    let res = svc
                        .clone()
                        .oneshot(request(&key))
                        .await
                        .expect("infallible");
                    match res.status() {
                        StatusCode::CREATED => {
                            return res.into_body().collect().await.expect("body").to_bytes();
                        }
                        StatusCode::CONFLICT => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        other => panic!("unexpected status {other}"),
                    }
                }
                panic!("the request never completed");
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for task in tasks {
        bodies.push(task.await.expect("task panicked"));
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler must run exactly once"
    );
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "every 201 must carry the same body"
    );
    for svc in &instances {
        let res = svc
            .clone()
            .oneshot(request(&idem_key))
            .await
            .expect("infallible");
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(
            res.headers()
                .get(tower_idempotency::REPLAYED_HEADER)
                .map(|v| v.as_bytes()),
            Some(&b"true"[..]),
            "a later retry must be a replay"
        );
        let body = res.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, bodies[0]);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
