//! Timing and infrastructure faults on one instance: an uncontested lease lapse, a failing
//! heartbeat, lost and abandoned claims, background tasks across runtimes, and the events
//! that make each of them visible.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{FaultStore, Runs, assert_problem, call, eventually, post};
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, IdempotencyOutcome, MemoryStore};

/// The heartbeat fails for the whole run, so the lease lapses; nobody else claims the key,
/// so the owner still stores its outcome and the retry replays it: one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_completes_after_an_uncontested_lease_lapse() {
    common::uncontested_lapse(MemoryStore::new()).await;
}

/// A failed heartbeat is retried at once (with a little jitter), not a whole period later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_heartbeat_is_retried_promptly() {
    let store = FaultStore::new(MemoryStore::new());
    store.faults.extend_failures.store(1, Ordering::SeqCst);
    let runs = Runs::default();
    // A period of 1 s: the old behaviour retried a whole period later.
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(Duration::from_secs(3))
        .layer(runs.handler(Duration::from_millis(1500)));
    let first = call(&svc, post(Some("beat"), "{}")).await;
    assert_eq!(first.status, 201);
    let times = store.faults.extend_times.lock().unwrap().clone();
    assert!(
        times.len() >= 2,
        "a failed heartbeat must be retried: {times:?}"
    );
    let gap = times[1] - times[0];
    assert!(
        gap < Duration::from_millis(500),
        "the retry came {gap:?} after the failure, half a period or more"
    );
}

/// The claim lands but its reply is lost: the client gets 503 "nothing was done", and
/// nothing is left behind: a retry runs at once instead of meeting 409 for a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_claim_reply_leaves_no_claim() {
    let store = FaultStore::new(MemoryStore::new());
    store.faults.claim_lost_replies.store(1, Ordering::SeqCst);
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .layer(runs.handler(Duration::ZERO));
    let first = call(&svc, post(Some("lost"), "{}")).await;
    assert_problem(&first, 503, "store-unavailable");
    // The release runs on a tracked task, well within the 503's Retry-After.
    eventually("the layer releases the claim it may have made", || {
        store.faults.released.load(Ordering::SeqCst) >= 1
    })
    .await;
    let retry = call(&svc, post(Some("lost"), "{}")).await;
    assert_eq!(retry.status, 201, "{}", retry.text());
    assert_eq!(runs.started(), 1);
}

/// The client goes away while its claim is on the wire: the claim it may have made is
/// released, so the next attempt runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_claim_is_released() {
    let store = FaultStore::new(MemoryStore::new());
    store
        .faults
        .claim_reply_delay_ms
        .store(300, Ordering::SeqCst);
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .layer(runs.handler(Duration::ZERO));
    let gone = tokio::time::timeout(
        Duration::from_millis(50),
        tower::ServiceExt::oneshot(svc.clone(), post(Some("gone"), "{}")),
    )
    .await;
    assert!(gone.is_err(), "the client gave up first");
    store.faults.claim_reply_delay_ms.store(0, Ordering::SeqCst);
    eventually("the abandoned claim is released", || {
        store.faults.releases.load(Ordering::SeqCst) >= 1
    })
    .await;
    let retry = call(&svc, post(Some("gone"), "{}")).await;
    assert_eq!(retry.status, 201, "{}", retry.text());
    assert_eq!(runs.started(), 1);
}

/// One layer served by one runtime, then another: the lease keeper started on the first
/// runtime died with it, and is started again on the second, so a long operation keeps its
/// key and a duplicate gets 409 instead of a second run.
#[test]
fn background_tasks_survive_their_first_runtime() {
    let store = MemoryStore::new();
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .lease(Duration::from_millis(150))
        .layer(runs.handler(Duration::from_millis(600)));
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    runtime().block_on(async {
        let first = call(&svc, post(Some("rt-1"), "{}")).await;
        assert_eq!(first.status, 201);
    });
    runtime().block_on(async {
        let owner = tokio::spawn({
            let svc = svc.clone();
            async move { call(&svc, post(Some("rt-2"), "{}")).await }
        });
        // Well past the first lease: only a live keeper still holds the key.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let duplicate = call(&svc, post(Some("rt-2"), "{}")).await;
        assert_problem(&duplicate, 409, "key-in-use");
        assert_eq!(owner.await.unwrap().status, 201);
    });
    assert_eq!(runs.started(), 2);
}

/// Detached work is tracked: a client that drops its body midway leaves the rest to drain on
/// a task; `shutdown` waits for it before the runtime ends, so a retry on a second instance
/// (same store, new layer, new runtime) replays instead of running again. A trailers-only
/// gRPC answer is stored before its head leaves.
#[test]
fn graceful_shutdown_keeps_detached_outcomes() {
    use axum::body::Body;
    use http::{Request, Response};
    use std::convert::Infallible;

    let store = MemoryStore::new();
    let runs = Runs::default();
    let handler = {
        let runs = runs.clone();
        tower::service_fn(move |req: Request<Body>| {
            let n = runs.started.fetch_add(1, Ordering::SeqCst);
            let grpc = req.headers().contains_key("te");
            async move {
                if grpc {
                    return Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "5")
                            .body(Body::empty())
                            .unwrap(),
                    );
                }
                // A body that takes a while: the client leaves after the first chunk.
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tokio::spawn(async move {
                    let _ = tx
                        .send(http_body::Frame::data(bytes::Bytes::from(format!(
                            "run {n}, "
                        ))))
                        .await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = tx
                        .send(http_body::Frame::data(bytes::Bytes::from_static(b"done")))
                        .await;
                });
                Ok(Response::new(Body::new(common::ChannelBody(rx))))
            }
        })
    };
    let grpc_request = || {
        Request::post("/orders")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("idempotency-key", "grpc-1")
            .body(Body::empty())
            .unwrap()
    };
    let first_layer = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .grpc_methods(["/orders"]);
    let work = first_layer.detached_work();
    let svc = first_layer.layer(handler.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let res = tower::ServiceExt::oneshot(svc.clone(), post(Some("drained"), "{}"))
            .await
            .unwrap();
        let mut body = res.into_body();
        let first = std::future::poll_fn(|cx| {
            http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)
        })
        .await;
        assert!(first.is_some(), "the client read the first chunk");
        drop(body);
        let grpc = call(&svc, grpc_request()).await;
        assert!(
            grpc.body.is_empty() && grpc.trailers.is_none(),
            "trailers-only"
        );
        assert_eq!(work.pending(), 1, "the drained body is tracked");
        work.shutdown(Duration::from_secs(5))
            .await
            .expect("the detached work finishes before the deadline");
    });
    drop(runtime);

    let second = IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .grpc_methods(["/orders"])
        .layer(handler);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let retry = call(&second, post(Some("drained"), "{}")).await;
        assert_eq!(
            retry.outcome,
            Some(IdempotencyOutcome::Replayed),
            "{}",
            retry.text()
        );
        assert_eq!(retry.text(), "run 0, done");
        let grpc = call(&second, grpc_request()).await;
        assert_eq!(grpc.outcome, Some(IdempotencyOutcome::Replayed));
        assert_eq!(grpc.headers["grpc-status"], "5");
    });
    assert_eq!(runs.started(), 2, "each operation ran once");
}

/// A body that yields one chunk, then fails or panics.
struct Breaking {
    polls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    panic: bool,
}

impl http_body::Body for Breaking {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let n = self.polls.fetch_add(1, Ordering::SeqCst);
        if n == 0 {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(
                bytes::Bytes::from_static(b"partial"),
            ))));
        }
        if self.panic {
            panic!("the response body panicked");
        }
        std::task::Poll::Ready(Some(Err(std::io::Error::other("the body broke"))))
    }
}

fn breaking_handler(
    status: u16,
    panic: bool,
    polls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    runs: Runs,
) -> impl tower::Service<
    http::Request<axum::body::Body>,
    Response = http::Response<axum::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_req: http::Request<axum::body::Body>| {
        runs.started.fetch_add(1, Ordering::SeqCst);
        let body = Breaking {
            polls: std::sync::Arc::clone(&polls),
            panic,
        };
        async move {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(status)
                    .body(axum::body::Body::new(body))
                    .unwrap(),
            )
        }
    })
}

/// A retryable answer (503) whose body breaks midway releases the key: the retry runs
/// again instead of meeting a permanent 410.
#[tokio::test]
async fn a_retryable_answer_whose_body_breaks_releases_the_key() {
    let runs = Runs::default();
    let polls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(breaking_handler(
            503,
            false,
            std::sync::Arc::clone(&polls),
            runs.clone(),
        ));
    let res = tower::ServiceExt::oneshot(svc.clone(), post(Some("broken-503"), "{}"))
        .await
        .unwrap();
    assert!(
        http_body_util::BodyExt::collect(res.into_body())
            .await
            .is_err()
    );
    eventually("the key is free again", || runs.started() == 1).await;
    let mut retried = None;
    for _ in 0..50 {
        let answer = tower::ServiceExt::oneshot(svc.clone(), post(Some("broken-503"), "{}"))
            .await
            .unwrap();
        if answer.status() == 503 {
            retried = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(retried.is_some(), "the retry ran again");
    assert_eq!(runs.started(), 2);
}

/// A body that panics is never polled again; the claim is settled once (a tombstone: the
/// status was storable and the operation ran), so a retry gets 410 at once, not 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_body_is_polled_once_and_settled() {
    let runs = Runs::default();
    let polls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .layer(breaking_handler(
            201,
            true,
            std::sync::Arc::clone(&polls),
            runs.clone(),
        ));
    // The body is read before the head leaves (it is ready at once), so the panic reaches
    // the response future; a server's connection task sees it either way.
    let reader = tokio::spawn({
        let svc = svc.clone();
        async move {
            let res = tower::ServiceExt::oneshot(svc, post(Some("panics"), "{}"))
                .await
                .unwrap();
            http_body_util::BodyExt::collect(res.into_body()).await
        }
    });
    assert!(reader.await.unwrap_err().is_panic());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        polls.load(Ordering::SeqCst),
        2,
        "polled once after its first chunk"
    );
    let retry = call(&svc, post(Some("panics"), "{}")).await;
    assert_problem(&retry, 410, "response-not-stored");
    assert_eq!(runs.started(), 1);
}

/// A stored record that cannot be read (damaged, or written by a newer version) means the
/// operation ran: under either store-failure policy the answer is `500 record-unreadable`,
/// and nothing runs again.
#[tokio::test]
async fn an_unreadable_record_never_runs_again() {
    use tower_idempotency::policy::StoreFailure;
    for policy in [StoreFailure::FailClosed, StoreFailure::FailOpen] {
        let store = FaultStore::new(MemoryStore::new());
        store.faults.claim_unreadable.store(1, Ordering::SeqCst);
        let runs = Runs::default();
        let svc = IdempotencyLayer::new(store.clone())
            .share_keys_across_callers()
            .on_store_failure(policy)
            .layer(runs.handler(Duration::ZERO));
        let answer = call(&svc, post(Some("unreadable"), "{}")).await;
        assert_problem(&answer, 500, "record-unreadable");
        assert_eq!(
            runs.started(),
            0,
            "{policy:?}: the operation must not run again"
        );
    }
}

/// An owner whose key was taken over after its lease lapsed, by a claim that was then
/// released (its request gave up), still stores its outcome once the key is free: the retry
/// replays it, and the operation ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_owner_stores_its_outcome_once_the_key_is_free() {
    use tower_idempotency::store::{Claim, LeaseToken, StoreKey};
    use tower_idempotency::{Fingerprint, IdempotencyStore, Scope};
    let store = FaultStore::new(MemoryStore::new());
    store
        .faults
        .extend_failures
        .store(usize::MAX, Ordering::SeqCst);
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(Duration::from_millis(100))
        .layer(runs.handler(Duration::from_millis(500)));
    let owner = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, post(Some("freed"), "{}")).await }
    });
    let (parts, ()) = http::Request::post("/orders")
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts();
    let fingerprint = Fingerprint::of_request(&parts, b"{}");
    let key = StoreKey::new(&Scope::anonymous(), "freed");
    let lease = Duration::from_millis(100);
    // The lease lapses (no heartbeat gets through); a claim contests it, the next takes it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let contest = store
        .inner
        .claim(&key, &fingerprint, LeaseToken::new(), lease)
        .await;
    assert!(matches!(contest, Ok(Claim::InFlight { .. })), "{contest:?}");
    tokio::time::sleep(Duration::from_millis(80)).await;
    let taker = LeaseToken::new();
    let took = store.inner.claim(&key, &fingerprint, taker, lease).await;
    assert!(
        matches!(took, Ok(Claim::Acquired(t)) if t == taker),
        "{took:?}"
    );
    // The taker's request gave up: its claim is released.
    store.inner.release(&key, taker).await.unwrap();
    let first = owner.await.unwrap();
    assert_eq!(first.status, 201);
    // The owner stored its outcome before its answer ended: the retry replays it.
    let replay = call(&svc, post(Some("freed"), "{}")).await;
    assert_eq!(
        replay.outcome,
        Some(IdempotencyOutcome::Replayed),
        "{}",
        replay.text()
    );
    assert_eq!(replay.body, first.body);
    assert_eq!(runs.started(), 1);
}

/// The store is cut off while a request that answered an error (not storable) releases its
/// key, and stays cut off for several leases. The release keeps trying until it lands, so
/// the key is free as soon as the store is back: it was given up after one lease and the
/// key held by a lapsed lease, so retries were told "still running" (409) for up to half a
/// lease after the outage although nothing ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_outlasts_an_outage_longer_than_the_lease() {
    use tower_idempotency::store::{KeyState, StoreKey};
    use tower_idempotency::{IdempotencyStore, Scope};
    let inner = MemoryStore::new();
    let store = FaultStore::new(inner.clone());
    let lease = Duration::from_millis(200);
    let faults = std::sync::Arc::clone(&store.faults);
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = {
        let runs = std::sync::Arc::clone(&runs);
        tower::service_fn(move |_req: http::Request<axum::body::Body>| {
            let (faults, runs) = (std::sync::Arc::clone(&faults), std::sync::Arc::clone(&runs));
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst);
                let status = if n == 0 {
                    // The store goes away while the first attempt fails.
                    faults.cut_off.store(true, Ordering::SeqCst);
                    http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    http::StatusCode::CREATED
                };
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(status)
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
            }
        })
    };
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(lease)
        .store_timeout(Duration::from_millis(50))
        .layer(handler);
    let first = call(&svc, post(Some("outage"), "{}")).await;
    assert_eq!(first.status, 503);
    // An outage of five leases.
    tokio::time::sleep(lease * 5).await;
    store.faults.cut_off.store(false, Ordering::SeqCst);
    let key = StoreKey::new(&Scope::anonymous(), "outage");
    let mut free = false;
    for _ in 0..60 {
        if matches!(inner.inspect(&key).await, Ok(KeyState::Free)) {
            free = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        free,
        "the key must be released once the store is back, not held by its lapsed lease: {:?}",
        inner.inspect(&key).await
    );
    let retry = call(&svc, post(Some("outage"), "{}")).await;
    assert_eq!(retry.status, 201, "the retry runs at once, no 409");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
