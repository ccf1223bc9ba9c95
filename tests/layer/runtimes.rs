//! A layer used from several Tokio runtimes (which it supports: its background tasks start
//! again on the runtime current when a runtime they ran on ends): no claim is left without
//! its heartbeats, and no heartbeat outlives its claim.

use std::time::Duration;

use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

use crate::common::{Counter, call, post};

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The lease keeper's task lives on the runtime of the first registration. When that
/// runtime ends while an operation registered from another runtime still runs, the first
/// request that finds the key in flight starts the keeper again on its own runtime, before
/// a takeover: the operation runs once. (Found by review: nothing renewed its lease, a
/// retry took the key over, and the operation ran a second time: 3 runs for 2 keys.)
#[test]
fn an_operation_keeps_its_lease_when_the_keepers_runtime_ends() {
    let counter = Counter::default();
    let svc = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(MemoryStore::new())
                .share_keys_across_callers()
                .lease(Duration::from_millis(100)),
        )
        .service(tower::service_fn({
            let count = std::sync::Arc::clone(&counter.0);
            move |req: http::Request<axum::body::Body>| {
                let count = std::sync::Arc::clone(&count);
                async move {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let slow = req.headers()["idempotency-key"] == "k";
                    if slow {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                    }
                    Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::from(
                        "ok",
                    )))
                }
            }
        }));
    let serving = multi_thread();
    let short_lived = multi_thread();
    // A first request on a short-lived runtime (a warm-up, a job): the keeper starts there.
    short_lived.block_on(async { call(&svc, post(Some("warm"), "{}")).await });
    // The long operation, on the serving runtime, registered while the keeper runs on the
    // short-lived one.
    let first = {
        let svc = svc.clone();
        serving.spawn(async move { call(&svc, post(Some("k"), "{}")).await })
    };
    std::thread::sleep(Duration::from_millis(50));
    // The short-lived runtime ends (its warm request long finished).
    drop(short_lived);
    serving.block_on(async {
        // Past the lease and its contest, while the first still runs.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _contest = call(&svc, post(Some("k"), "{}")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _retry = call(&svc, post(Some("k"), "{}")).await;
        first.await.unwrap();
    });
    // "warm" ran once, "k" must have run once.
    assert_eq!(
        counter.runs(),
        2,
        "the running operation was run a second time"
    );
}

/// A withdrawal of an unconfirmed commit, on a tracked task when its runtime ends: its
/// registration with the lease keeper goes with it, so once the layer is used on another
/// runtime the dead claim's lease runs out and a retry runs. (Found by review: the keeper,
/// started again, renewed that claim forever: 57 heartbeats in 2 s, and every retry
/// answered `409`.)
#[test]
fn a_withdrawal_dropped_with_its_runtime_leaves_no_heartbeat_behind() {
    use std::sync::atomic::Ordering;
    use tower_idempotency::store::{KeyState, StoreKey};
    use tower_idempotency::{IdempotencyClaim, IdempotencyStore, Scope};

    use crate::common::FaultStore;

    let store = FaultStore::new(MemoryStore::new());
    let faults = std::sync::Arc::clone(&store.faults);
    let handler = {
        let faults = std::sync::Arc::clone(&faults);
        tower::service_fn(move |req: http::Request<axum::body::Body>| {
            let faults = std::sync::Arc::clone(&faults);
            async move {
                let claim = req.extensions().get::<IdempotencyClaim>().cloned().unwrap();
                if claim.key() == "k" {
                    // The store is cut off: the commit cannot be confirmed (in doubt).
                    faults.cut_off.store(true, Ordering::SeqCst);
                    let committed = claim.commit().await;
                    assert!(committed.is_err());
                    // Back, except that withdrawals keep failing for a while.
                    faults.revoke_failures.store(1_000_000, Ordering::SeqCst);
                    faults.cut_off.store(false, Ordering::SeqCst);
                }
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(503)
                        .body(axum::body::Body::from("not done"))
                        .unwrap(),
                )
            }
        })
    };
    let svc = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(store.clone())
                .share_keys_across_callers()
                .lease(Duration::from_millis(100))
                .store_timeout(Duration::from_millis(50)),
        )
        .service(handler);
    let first_runtime = current_thread();
    first_runtime.block_on(async {
        let _ = call(&svc, post(Some("k"), "{}")).await;
        // The withdrawal goes on in the background while revocations fail.
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    // The runtime ends (a shutdown whose deadline passed during the outage).
    drop(first_runtime);
    faults.revoke_failures.store(0, Ordering::SeqCst);

    let second_runtime = current_thread();
    second_runtime.block_on(async {
        // Any request on the layer starts the keeper again, here.
        let _ = call(&svc, post(Some("other"), "{}")).await;
        let extends_before = faults.extends.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let key = StoreKey::new(&Scope::anonymous(), "k");
        let state = store.inner.inspect(&key).await.unwrap();
        let extends = faults.extends.load(Ordering::SeqCst) - extends_before;
        let retry = call(&svc, post(Some("k"), "{}")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let retry2 = call(&svc, post(Some("k"), "{}")).await;
        let _ = retry;
        assert!(
            !matches!(state, KeyState::InFlight { lease_remaining, .. } if !lease_remaining.is_zero())
                && retry2.status != http::StatusCode::CONFLICT,
            "2 s (20 leases) after its owner's runtime ended, key k is still in flight: \
             {state:?}; {extends} heartbeats since"
        );
    });
}

/// A renewal dropped in the middle of its store call, with the runtime it ran on, leaves
/// its claim renewable: the keeper started again on another runtime renews it, and the
/// operation, still running, runs once. (Found by review: the claim stayed marked as being
/// renewed, so no keeper renewed it again, and a retry took it over.)
#[test]
fn a_renewal_dropped_mid_call_with_its_runtime_leaves_the_claim_renewable() {
    use std::sync::atomic::Ordering;

    use crate::common::FaultStore;

    let store = FaultStore::new(MemoryStore::new());
    let faults = std::sync::Arc::clone(&store.faults);
    let counter = Counter::default();
    let svc = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(store)
                .share_keys_across_callers()
                .lease(Duration::from_millis(300))
                .store_timeout(Duration::from_secs(5)),
        )
        .service(tower::service_fn({
            let count = std::sync::Arc::clone(&counter.0);
            move |req: http::Request<axum::body::Body>| {
                let count = std::sync::Arc::clone(&count);
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    if req.headers()["idempotency-key"] == "k" {
                        tokio::time::sleep(Duration::from_millis(2000)).await;
                    }
                    Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::from(
                        "ok",
                    )))
                }
            }
        }));
    let serving = multi_thread();
    let short_lived = multi_thread();
    // The keeper starts on the short-lived runtime; its renewals run there.
    short_lived.block_on(async { call(&svc, post(Some("warm"), "{}")).await });
    // Every extend hangs: the renewal of `k` is mid-call when that runtime ends.
    faults.extend_delay_ms.store(60_000, Ordering::SeqCst);
    let first = {
        let svc = svc.clone();
        serving.spawn(async move { call(&svc, post(Some("k"), "{}")).await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while faults.extends.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "no renewal started");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(short_lived);
    faults.extend_delay_ms.store(0, Ordering::SeqCst);
    serving.block_on(async {
        // Past the lease, while the first still runs: a contest, then a retry.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let _contest = call(&svc, post(Some("k"), "{}")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _retry = call(&svc, post(Some("k"), "{}")).await;
        first.await.unwrap();
    });
    assert_eq!(
        counter.runs(),
        2,
        "the running operation was run a second time"
    );
}
