//! Failure semantics: leases and heartbeats, disconnects, streaming and bounded records,
//! store faults, cancellation at every stage.

use crate::common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use common::{ChannelBody, Counter, FaultStore, Runs, call, eventually, post};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower::{Layer, ServiceExt};
use tower_idempotency::policy::{Disconnect, InFlight};
use tower_idempotency::store::{Claim, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, Scope};

fn store_key(key: &str) -> StoreKey {
    StoreKey::new(&Scope::anonymous(), key)
}

#[tokio::test]
async fn heartbeat_keeps_a_slow_operation_claimed() {
    let tracked = Runs::default();
    let store = FaultStore::new(MemoryStore::new());
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(Duration::from_millis(150))
        .layer(tracked.handler(Duration::from_millis(900)));
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, post(Some("slow"), "{}")).await }
    });
    // Long after the first lease would have ended, the duplicate is still refused.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(call(&svc, post(Some("slow"), "{}")).await.status, 409);
    }
    let first = first.await.unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(
        tracked.started(),
        1,
        "no duplicate ran beside the slow operation"
    );
    assert!(
        store.faults.extends.load(Ordering::SeqCst) >= 4,
        "the lease was extended"
    );
    let replay = call(&svc, post(Some("slow"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    // The heartbeat stops with the operation.
    let extends = store.faults.extends.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.faults.extends.load(Ordering::SeqCst), extends);
}

#[tokio::test]
async fn a_crashed_owner_blocks_its_key_only_for_its_lease() {
    let store = MemoryStore::new();
    let tracked = Runs::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(Duration::from_millis(300))
        .layer(tracked.handler(Duration::ZERO));
    // Another instance claimed the key and died: nobody will complete or extend it.
    let (parts, ()) = Request::post("/orders")
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts();
    let fingerprint = Fingerprint::of_request(&parts, b"{}");
    let claim = store
        .claim(
            &store_key("crash"),
            &fingerprint,
            tower_idempotency::store::LeaseToken::new(),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)));
    assert_eq!(call(&svc, post(Some("crash"), "{}")).await.status, 409);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The first claim after the lapse contests it: half a lease for a live owner to answer.
    assert_eq!(call(&svc, post(Some("crash"), "{}")).await.status, 409);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = call(&svc, post(Some("crash"), "{}")).await;
    assert_eq!(answer.status, 201);
    assert_eq!(tracked.finished(), 1);
}

#[tokio::test]
async fn lost_lease_never_overwrites_the_new_owner() {
    let store = FaultStore::new(MemoryStore::new());
    store.faults.extend_failures.store(1000, Ordering::SeqCst);
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(Duration::from_millis(100))
        .layer(tower::service_fn({
            let calls = Arc::clone(&calls);
            move |_req: Request<Body>| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    // The first run is slow and loses its lease; the second is quick.
                    if n == 0 {
                        tokio::time::sleep(Duration::from_millis(400)).await;
                    }
                    Ok::<_, Infallible>(Response::new(Body::from(format!("run {n}"))))
                }
            }
        }));
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, post(Some("lost"), "{}")).await }
    });
    // The store cannot extend, so the first lease runs out, a retry contests it, and the
    // next retry takes over.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(call(&svc, post(Some("lost"), "{}")).await.status, 409);
    tokio::time::sleep(Duration::from_millis(80)).await;
    let second = call(&svc, post(Some("lost"), "{}")).await;
    assert_eq!(second.body, "run 1");
    assert_eq!(first.await.unwrap().body, "run 0");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let replay = call(&svc, post(Some("lost"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(
        replay.body, second.body,
        "the stale owner's outcome was not stored over it"
    );
}

#[tokio::test]
async fn disconnect_finishes_the_operation_and_stores_it() {
    let tracked = Runs::default();
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(tracked.handler(Duration::from_millis(200)));
    // The client gives up after 50 ms: its response future is dropped.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        svc.clone().oneshot(post(Some("gone"), "{}")),
    )
    .await;
    assert!(gave_up.is_err());
    eventually("the operation finishes", || tracked.finished() == 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let retry = call(&svc, post(Some("gone"), "{}")).await;
    assert!(retry.replayed(), "the retry gets the real outcome");
    assert_eq!(retry.body, "run 0");
    assert_eq!(tracked.started(), 1);
}

#[tokio::test]
async fn disconnect_can_release_instead() {
    let tracked = Runs::default();
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .on_disconnect(Disconnect::Release)
        .layer(tracked.handler(Duration::from_millis(200)));
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        svc.clone().oneshot(post(Some("gone"), "{}")),
    )
    .await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tracked.finished(), 0, "the operation was cancelled");
    let retry = call(&svc, post(Some("gone"), "{}")).await;
    assert!(!retry.replayed(), "the retry runs the operation");
    assert_eq!(retry.status, 201);
}

/// Two layers, one inside the other's operation, each with its own store and its own
/// choice for a client that leaves: each layer's choice holds for its own claim, whatever
/// the other chose (each layer's operation goes on, or is dropped, by its own layer's
/// choice; the outer's operation holds the inner's whole call).
#[tokio::test]
async fn nested_layers_each_keep_their_own_choice_when_the_client_leaves() {
    for (outer_finishes, inner_finishes) in
        [(true, true), (false, true), (true, false), (false, false)]
    {
        let (outer_store, inner_store) = (MemoryStore::new(), MemoryStore::new());
        let choice = |finish: bool| {
            if finish {
                Disconnect::Finish
            } else {
                Disconnect::Release
            }
        };
        let tracked = Runs::default();
        let inner = IdempotencyLayer::new(inner_store.clone())
            .share_keys_across_callers()
            .on_disconnect(choice(inner_finishes))
            .layer(tracked.handler(Duration::from_millis(150)));
        let svc = IdempotencyLayer::new(outer_store.clone())
            .share_keys_across_callers()
            .on_disconnect(choice(outer_finishes))
            .layer(inner);
        let gave_up = tokio::time::timeout(
            Duration::from_millis(40),
            svc.clone().oneshot(post(Some("nested"), "{}")),
        )
        .await;
        assert!(gave_up.is_err());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let case = format!("outer finishes: {outer_finishes}, inner finishes: {inner_finishes}");
        // The operation goes on if either layer finishes it.
        let goes_on = outer_finishes || inner_finishes;
        assert_eq!(tracked.started(), 1, "{case}");
        assert_eq!(tracked.finished(), usize::from(goes_on), "{case}");
        for (store, finishes, which) in [
            (&outer_store, outer_finishes, "outer"),
            (&inner_store, inner_finishes || outer_finishes, "inner"),
        ] {
            let state = store.inspect(&store_key("nested")).await.unwrap();
            assert_eq!(
                matches!(state, tower_idempotency::store::KeyState::Completed { .. }),
                finishes,
                "{case}: the {which} store holds the record ({state:?})"
            );
        }
        // A retry gets the one run's answer when it went on; nothing runs twice. When both
        // layers released their keys, the cut-off run is gone and the retry runs anew.
        let retry = call(&svc, post(Some("nested"), "{}")).await;
        let (body, runs) = if goes_on { ("run 0", 1) } else { ("run 1", 2) };
        assert_eq!(retry.body, body, "{case}");
        assert_eq!(tracked.started(), runs, "{case}");
    }
}

/// An operation that panics after it has waited (and so after the layer was told to finish
/// it if its client left) is dropped with the panic: never polled again on a task, where it
/// would only panic once more.
#[tokio::test]
async fn an_operation_that_panics_after_waiting_is_never_polled_again() {
    static RESUMED: AtomicUsize = AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.to_string().contains("resumed after panicking") {
            RESUMED.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers();
    let work = layer.detached_work();
    let svc = layer.layer(tower::service_fn({
        let calls = Arc::clone(&calls);
        move |_req: Request<Body>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if n == 0 {
                    panic!("handler bug after a wait");
                }
                Ok::<_, Infallible>(Response::new(Body::from("ok")))
            }
        }
    }));
    let task = tokio::spawn({
        let svc = svc.clone();
        async move { svc.oneshot(post(Some("late-panic"), "{}")).await }
    });
    assert!(
        task.await.unwrap_err().is_panic(),
        "the panic reaches the caller"
    );
    eventually("the released key's work ends", || work.pending() == 0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        RESUMED.load(Ordering::SeqCst),
        0,
        "a panicked operation was polled again"
    );
    let answer = call(&svc, post(Some("late-panic"), "{}")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        !answer.replayed(),
        "the panic released the key: the retry runs"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A duplicate dropped while it waits for the first request's answer (wait mode) is gone:
/// it never runs the operation later, on a task, after the first request released the key.
#[tokio::test]
async fn a_waiter_whose_client_leaves_never_runs_later() {
    let tracked = Runs::default();
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .on_in_flight(InFlight::Wait(Duration::from_secs(2)))
        .layer(tower::service_fn({
            let tracked = tracked.clone();
            move |_req: Request<Body>| {
                let tracked = tracked.clone();
                async move {
                    let n = tracked.started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    tracked.finished.fetch_add(1, Ordering::SeqCst);
                    // The first run fails: its key is released, as a waiter would find.
                    let status = if n == 0 { 503 } else { 201 };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Body::from(format!("run {n}")))
                            .unwrap(),
                    )
                }
            }
        }));
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, post(Some("waiter"), "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let waiter = tokio::time::timeout(
        Duration::from_millis(40),
        svc.clone().oneshot(post(Some("waiter"), "{}")),
    )
    .await;
    assert!(waiter.is_err(), "the waiter's client left while it waited");
    assert_eq!(first.await.unwrap().status, 503);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        tracked.started(),
        1,
        "the departed waiter never ran the operation"
    );
}

#[tokio::test]
async fn an_unread_body_is_drained_and_stored() {
    let (tx, rx) = mpsc::channel(4);
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(tower::service_fn(move |_req: Request<Body>| {
            let rx = rx.lock().unwrap().take();
            async move {
                let body = match rx {
                    Some(rx) => Body::new(ChannelBody(rx)),
                    None => Body::from("second run"),
                };
                Ok::<_, Infallible>(Response::new(body))
            }
        }));
    let res = svc
        .clone()
        .oneshot(post(Some("drain"), "{}"))
        .await
        .unwrap();
    drop(res); // the client went away before reading the body
    tx.send(Frame::data(Bytes::from("part 1, "))).await.unwrap();
    tx.send(Frame::data(Bytes::from("part 2"))).await.unwrap();
    drop(tx);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let retry = call(&svc, post(Some("drain"), "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, "part 1, part 2");
}

#[tokio::test]
async fn an_unread_body_releases_with_release_policy() {
    let calls = Arc::new(AtomicUsize::new(0));
    let senders = Arc::new(std::sync::Mutex::new(Vec::new()));
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .on_disconnect(Disconnect::Release)
        .layer(tower::service_fn({
            let calls = Arc::clone(&calls);
            let senders = Arc::clone(&senders);
            move |_req: Request<Body>| {
                let body = if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The first body is still streaming when the client leaves.
                    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(1);
                    senders.lock().unwrap().push(tx);
                    Body::new(ChannelBody(rx))
                } else {
                    Body::from("body")
                };
                async move { Ok::<_, Infallible>(Response::new(body)) }
            }
        }));
    let res = svc.clone().oneshot(post(Some("r"), "{}")).await.unwrap();
    drop(res);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!call(&svc, post(Some("r"), "{}")).await.replayed());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn frames_stream_before_the_body_ends() {
    let (tx, rx) = mpsc::channel(4);
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(tower::service_fn(move |_req: Request<Body>| {
            let rx = rx.lock().unwrap().take().expect("runs once");
            async move { Ok::<_, Infallible>(Response::new(Body::new(ChannelBody(rx)))) }
        }));
    let res = svc
        .clone()
        .oneshot(post(Some("stream"), "{}"))
        .await
        .unwrap();
    let mut body = res.into_body();
    tx.send(Frame::data(Bytes::from("first"))).await.unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(1), body.frame())
        .await
        .expect("the first frame arrives while the body is still open")
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "first");
    // A retry now is in flight: the body has not ended.
    assert_eq!(call(&svc, post(Some("stream"), "{}")).await.status, 409);
    tx.send(Frame::data(Bytes::from(" second"))).await.unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, " second");
    let replay = call(&svc, post(Some("stream"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, "first second");
}

#[tokio::test]
async fn a_response_over_the_limit_leaves_a_tombstone() {
    let tracked = Runs::default();
    let big = "x".repeat(100);
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .max_response_body(10)
        .layer(tower::service_fn({
            let tracked = tracked.clone();
            let big = big.clone();
            move |_req: Request<Body>| {
                tracked.started.fetch_add(1, Ordering::SeqCst);
                let big = big.clone();
                async move { Ok::<_, Infallible>(Response::new(Body::from(big))) }
            }
        }));
    let first = call(&svc, post(Some("big"), "{}")).await;
    assert_eq!(first.body, big, "the client still gets the whole response");
    let retry = call(&svc, post(Some("big"), "{}")).await;
    assert_eq!(retry.status, StatusCode::GONE);
    assert_eq!(retry.headers["content-type"], "application/problem+json");
    assert!(
        retry.json()["type"]
            .as_str()
            .unwrap()
            .ends_with("response-not-stored")
    );
    assert_eq!(tracked.started(), 1, "the operation never runs twice");
}

#[tokio::test]
async fn a_failing_complete_is_retried_and_the_key_never_released() {
    let store = FaultStore::new(MemoryStore::new());
    store.faults.complete_failures.store(3, Ordering::SeqCst);
    let counter = Counter::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .layer(counter.service(Duration::ZERO));
    let first = call(&svc, post(Some("c"), "{}")).await;
    assert_eq!(first.status, 201);
    let replay = call(&svc, post(Some("c"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert_eq!(store.faults.completes.load(Ordering::SeqCst), 4);
    assert_eq!(store.faults.releases.load(Ordering::SeqCst), 0);
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn a_store_down_after_the_run_keeps_the_key_claimed() {
    let store = FaultStore::new(MemoryStore::new());
    store.faults.complete_failures.store(1000, Ordering::SeqCst);
    store.faults.extend_failures.store(1000, Ordering::SeqCst);
    let counter = Counter::default();
    // The response ends once storing failed for the store-call bound, inside the lease.
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(Duration::from_millis(600))
        .store_timeout(Duration::from_millis(100))
        .layer(counter.service(Duration::ZERO));
    let first = call(&svc, post(Some("down"), "{}")).await;
    assert_eq!(first.status, 201);
    // The outcome could not be stored yet: the key stays claimed (storing goes on in the
    // background), so a retry is told to come back instead of running the operation again.
    assert_eq!(call(&svc, post(Some("down"), "{}")).await.status, 409);
    assert_eq!(store.faults.releases.load(Ordering::SeqCst), 0);
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn a_waiter_runs_the_operation_when_the_first_fails() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .on_in_flight(InFlight::Wait(Duration::from_secs(5)))
        .layer(tower::service_fn({
            let calls = Arc::clone(&calls);
            move |_req: Request<Body>| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let status = if n == 0 { 503 } else { 201 };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Body::empty())
                            .unwrap(),
                    )
                }
            }
        }));
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, post(Some("w"), "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = call(&svc, post(Some("w"), "{}")).await;
    assert_eq!(first.await.unwrap().status, 503);
    assert_eq!(second.status, 201);
    assert!(!second.replayed());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A request body that never ends.
struct Endless;

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}

#[tokio::test]
async fn dropping_at_every_stage_leaks_no_claim() {
    let store = FaultStore::new(MemoryStore::new());
    let counter = Counter::default();
    let release_svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .on_disconnect(Disconnect::Release)
        .layer(counter.service(Duration::from_millis(200)));

    // 1. While the request body is read: nothing was claimed.
    let req = Request::post("/orders")
        .header("idempotency-key", "stage")
        .body(Body::new(Endless))
        .unwrap();
    let cut =
        tokio::time::timeout(Duration::from_millis(30), release_svc.clone().oneshot(req)).await;
    assert!(cut.is_err());
    assert_eq!(store.faults.claims.load(Ordering::SeqCst), 0);
    assert!(store.inner.is_empty());

    // 2. While the store answers the claim (slow store): the claim, if made, is released
    //    when the operation is cancelled, or never made.
    // 3. While the handler runs: released.
    let cut = tokio::time::timeout(
        Duration::from_millis(50),
        release_svc.clone().oneshot(post(Some("stage"), "{}")),
    )
    .await;
    assert!(cut.is_err());
    eventually("the claim is released", || store.inner.is_empty()).await;

    // 4. Once the answer is whole (a body complete at once leaves with its head, after its
    //    record is stored), dropping it leaves the record, never a claim.
    let res = release_svc
        .clone()
        .oneshot(post(Some("stage"), "{}"))
        .await
        .unwrap();
    drop(res);
    assert!(
        call(&release_svc, post(Some("stage"), "{}"))
            .await
            .replayed()
    );

    // With the default (finish), every stage ends in a stored record, never a dangling claim.
    let finish_svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .layer(counter.service(Duration::from_millis(100)));
    let cut = tokio::time::timeout(
        Duration::from_millis(20),
        finish_svc.clone().oneshot(post(Some("finish"), "{}")),
    )
    .await;
    assert!(cut.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let claim = store
        .inner
        .claim(
            &store_key("finish"),
            &Fingerprint::from_bytes([0; 32]),
            tower_idempotency::store::LeaseToken::new(),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Completed(_)), "{claim:?}");
    // No background task is left behind: heartbeats stop once settled.
    let extends = store.faults.extends.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.faults.extends.load(Ordering::SeqCst), extends);
}

/// A body that yields one data frame, then fails.
struct FailsMidway(bool);

impl http_body::Body for FailsMidway {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if std::mem::replace(&mut self.0, true) {
            Poll::Ready(Some(Err(std::io::Error::other("connection reset"))))
        } else {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from("partial")))))
        }
    }
}

#[tokio::test]
async fn an_unreadable_request_body_is_400_and_nothing_runs() {
    let store = FaultStore::new(MemoryStore::new());
    let counter = Counter::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .layer(counter.service(Duration::ZERO));
    let req = Request::post("/orders")
        .header("idempotency-key", "broken")
        .body(Body::new(FailsMidway(false)))
        .unwrap();
    let answer = call(&svc, req).await;
    common::assert_problem(&answer, 400, "body-unreadable");
    assert_eq!(counter.runs(), 0);
    assert_eq!(
        store.faults.claims.load(Ordering::SeqCst),
        0,
        "nothing was claimed"
    );
}

#[tokio::test]
async fn a_response_body_failing_midway_leaves_a_tombstone() {
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(tower::service_fn({
            let runs = Arc::clone(&runs);
            move |_req: Request<Body>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Body::new(FailsMidway(false)))) }
            }
        }));
    let res = svc
        .clone()
        .oneshot(post(Some("midway"), "{}"))
        .await
        .unwrap();
    assert!(
        res.into_body().collect().await.is_err(),
        "the client sees the error"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The operation ran: a retry learns so, and it never runs twice.
    let retry = call(&svc, post(Some("midway"), "{}")).await;
    common::assert_problem(&retry, 410, "response-not-stored");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A duplicate waiting in wait mode whose client gives up leaves nothing behind on the
/// embedded memory store: graceful shutdown is not held up by it, however long the lease.
/// (Before, the waiter's drop started a background release that looked again every two
/// seconds for one and a half leases, and `shutdown` answered `Unfinished`.)
#[tokio::test]
async fn a_waiter_whose_client_leaves_leaves_nothing_for_shutdown_to_wait_for() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .on_in_flight(InFlight::Wait(Duration::from_secs(60)))
        .lease_by(|_| Some(Duration::from_secs(3600)));
    let work = layer.detached_work();
    let opened = Arc::clone(&gate);
    let app = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move || {
                let opened = Arc::clone(&opened);
                async move {
                    opened.notified().await;
                    "done"
                }
            }),
        )
        .layer(layer);
    let first = {
        let app = app.clone();
        tokio::spawn(async move { call(&app, post(Some("k"), "{}")).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The waiter's client gives up after 100 ms.
    let waiter = app.clone().oneshot(post(Some("k"), "{}"));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), waiter)
            .await
            .is_err(),
        "the duplicate waits"
    );
    gate.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    let ended = work.shutdown(Duration::from_secs(2)).await;
    assert!(ended.is_ok(), "{ended:?}");
}
