//! `function::Idempotent`: operations run once per key from plain tokio tasks, with no HTTP
//! types, through the layer's own machinery; hammered, failed, panicked, cancelled, cut off.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::function::{CallError, Idempotent};
use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, InFlight, MemoryStore, Scope};

use crate::common::FaultStore;

/// Calls over `layer`, whose keys are shared across callers (a call names no scope).
fn calls(layer: IdempotencyLayer) -> Idempotent {
    Idempotent::new(&layer.share_keys_across_callers())
}

/// Runs `attempt` until it is not told the key is in flight (a crashed or cancelled call
/// lets its key go on a task of its own), for at most five seconds.
async fn past_in_flight<T, Fut>(
    mut attempt: impl FnMut() -> Fut,
) -> Result<tower_idempotency::function::Output<T>, CallError<Bytes>>
where
    Fut: std::future::Future<
            Output = Result<tower_idempotency::function::Output<T>, CallError<Bytes>>,
        >,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match attempt().await {
            Err(CallError::InFlight { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

/// An operation that counts its runs and answers `answer` after `pause`.
fn counted(
    runs: &Arc<AtomicUsize>,
    pause: Duration,
    answer: &'static str,
) -> impl FnOnce(
    IdempotencyClaim,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, Bytes>> + Send>>
+ Send
+ 'static {
    let runs = Arc::clone(runs);
    move |_claim| {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(pause).await;
            Ok(Bytes::from_static(answer.as_bytes()))
        })
    }
}

#[tokio::test]
async fn a_key_hammered_from_many_tasks_runs_its_operation_once() {
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .on_in_flight(InFlight::Wait(Duration::from_secs(5)));
    let calls = calls(layer);
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (calls, runs) = (calls.clone(), Arc::clone(&runs));
        tasks.push(tokio::spawn(async move {
            calls
                .key("order-1")
                .input("book")
                .run(counted(&runs, Duration::from_millis(50), "order 1"))
                .await
        }));
    }
    let mut fresh = 0;
    for task in tasks {
        let out = task.await.unwrap().expect("every caller gets the result");
        assert_eq!(out.value, "order 1");
        fresh += usize::from(!out.replayed);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(fresh, 1, "one call ran it, the others got it replayed");
}

#[tokio::test]
async fn a_duplicate_while_the_first_runs_is_told_in_flight_without_waiting() {
    let calls = calls(IdempotencyLayer::new(MemoryStore::new()));
    let runs = Arc::new(AtomicUsize::new(0));
    let first = {
        let (calls, runs) = (calls.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            calls
                .key("k")
                .run(counted(&runs, Duration::from_millis(300), "done"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = calls
        .key("k")
        .run(counted(&runs, Duration::ZERO, "again"))
        .await;
    assert!(
        matches!(second, Err(CallError::InFlight { retry_after }) if retry_after >= Duration::from_secs(1))
    );
    assert_eq!(first.await.unwrap().unwrap().value, "done");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn another_input_under_the_same_key_is_a_mismatch_and_never_runs() {
    let calls = calls(IdempotencyLayer::new(MemoryStore::new()));
    let runs = Arc::new(AtomicUsize::new(0));
    calls
        .key("k")
        .input("12 EUR")
        .run(counted(&runs, Duration::ZERO, "charged"))
        .await
        .unwrap();
    let other = calls
        .key("k")
        .input("13 EUR")
        .run(counted(&runs, Duration::ZERO, "charged"))
        .await;
    assert!(matches!(other, Err(CallError::Mismatch)));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_error_frees_the_key_so_a_retry_runs_again() {
    let calls = calls(IdempotencyLayer::new(MemoryStore::new()));
    let failed = calls
        .key("k")
        .run(|_| async { Err::<Bytes, _>(Bytes::from("card service down")) })
        .await;
    let Err(CallError::Operation {
        error,
        replayed,
        committed,
    }) = failed
    else {
        panic!("expected the operation's error, got {failed:?}");
    };
    assert_eq!(error, "card service down");
    assert!(!replayed);
    assert!(!committed, "no commit point: the key is freed");
    let retry = calls
        .key("k")
        .run(|_| async { Ok::<_, Bytes>(Bytes::from("charged")) })
        .await
        .unwrap();
    assert_eq!(retry.value, "charged");
    assert!(!retry.replayed);
}

#[tokio::test]
async fn an_error_after_the_commit_point_is_stored_and_the_operation_never_runs_again() {
    let calls = calls(IdempotencyLayer::new(MemoryStore::new()));
    let failed = calls
        .key("k")
        .run(|claim| async move {
            claim.commit().await.unwrap();
            Err::<Bytes, _>(Bytes::from("declined after charging"))
        })
        .await;
    assert!(
        matches!(
            failed,
            Err(CallError::Operation {
                replayed: false,
                committed: true,
                ..
            })
        ),
        "its own error, said to be past its commit point (kept): {failed:?}"
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let retry = calls
        .key("k")
        .run(counted(&runs, Duration::ZERO, "charged"))
        .await;
    let Err(CallError::Operation {
        error, replayed, ..
    }) = retry
    else {
        panic!("expected the stored error, got {retry:?}");
    };
    assert_eq!(error, "declined after charging");
    assert!(replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_panicking_operation_frees_the_key_and_the_panic_reaches_the_caller() {
    let calls = calls(IdempotencyLayer::new(MemoryStore::new()));
    let panicked = {
        let calls = calls.clone();
        tokio::spawn(async move {
            calls
                .key("k")
                .run(|_| async { panic!("bug in the handler") })
                .await
        })
    };
    assert!(panicked.await.unwrap_err().is_panic());
    let runs = Arc::new(AtomicUsize::new(0));
    // The release runs on a tracked task; give it a moment.
    let mut retry = None;
    for _ in 0..50 {
        match calls
            .key("k")
            .run(counted(&runs, Duration::ZERO, "ran"))
            .await
        {
            Err(CallError::InFlight { .. }) => tokio::time::sleep(Duration::from_millis(10)).await,
            other => {
                retry = Some(other);
                break;
            }
        }
    }
    assert_eq!(retry.unwrap().unwrap().value, "ran");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_panic_after_the_commit_point_never_runs_again() {
    let layer = IdempotencyLayer::new(MemoryStore::new()).lease(Duration::from_millis(200));
    let calls = calls(layer);
    let panicked = {
        let calls = calls.clone();
        tokio::spawn(async move {
            calls
                .key("k")
                .run(|claim| async move {
                    claim.commit().await.unwrap();
                    panic!("crashed after charging")
                })
                .await
        })
    };
    assert!(panicked.await.unwrap_err().is_panic());
    let runs = Arc::new(AtomicUsize::new(0));
    let retry = past_in_flight(|| {
        calls
            .key("k")
            .run(counted(&runs, Duration::ZERO, "charged again"))
    })
    .await;
    assert!(matches!(retry, Err(CallError::OutcomeUnknown)), "{retry:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_cancelled_call_finishes_its_operation_and_stores_the_result() {
    // The default disconnect policy: the operation goes on by itself and its result is kept.
    let calls = calls(IdempotencyLayer::new(MemoryStore::new()));
    let runs = Arc::new(AtomicUsize::new(0));
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        calls
            .key("k")
            .run(counted(&runs, Duration::from_millis(200), "finished")),
    )
    .await;
    assert!(cancelled.is_err(), "the caller gave up");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let retry = calls
        .key("k")
        .run(counted(&runs, Duration::ZERO, "ran twice"))
        .await
        .unwrap();
    assert_eq!(retry.value, "finished");
    assert!(retry.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_cancelled_call_under_release_frees_the_key() {
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .on_disconnect(tower_idempotency::Disconnect::Release);
    let calls = calls(layer);
    let runs = Arc::new(AtomicUsize::new(0));
    let _ = tokio::time::timeout(
        Duration::from_millis(50),
        calls
            .key("k")
            .run(counted(&runs, Duration::from_secs(10), "never")),
    )
    .await;
    let retry = past_in_flight(|| calls.key("k").run(counted(&runs, Duration::ZERO, "ran")))
        .await
        .unwrap();
    assert_eq!(retry.value, "ran");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn bad_keys_are_refused_and_nothing_runs() {
    let calls = calls(IdempotencyLayer::new(MemoryStore::new()).max_key_len(16));
    let runs = Arc::new(AtomicUsize::new(0));
    for key in ["", "a-key-longer-than-sixteen", "line\nbreak", "nul\0"] {
        let refused = calls
            .key(key)
            .run(counted(&runs, Duration::ZERO, "ran"))
            .await;
        assert!(
            matches!(&refused, Err(CallError::Rejected(why)) if !why.is_empty()),
            "{key:?}: {refused:?}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Any other text is a key: a message id with spaces, quotes and non-ASCII letters.
    let out = calls
        .key("msg \"7\" é")
        .run(counted(&runs, Duration::ZERO, "ran"))
        .await
        .unwrap();
    assert_eq!(out.value, "ran");
}

#[tokio::test]
async fn scopes_keep_equal_keys_apart() {
    let calls = calls(IdempotencyLayer::new(MemoryStore::new()));
    let runs = Arc::new(AtomicUsize::new(0));
    for tenant in ["acme", "globex", "acme"] {
        calls
            .key("invoice-1")
            .scope(Scope::of(tenant.as_bytes()))
            .run(counted(&runs, Duration::ZERO, "sent"))
            .await
            .unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "one run per tenant");
}

/// No silent shared scope: a call that names no scope runs only on a layer that was told
/// keys are shared across callers; otherwise it is refused and nothing runs (two callers'
/// equal keys must never meet by default).
#[tokio::test]
async fn a_call_without_a_scope_is_refused_unless_the_layer_shares_keys() {
    let runs = Arc::new(AtomicUsize::new(0));
    for layer in [
        IdempotencyLayer::new(MemoryStore::new()),
        IdempotencyLayer::new(MemoryStore::new()).scope_by(|_| Some(Scope::of(b"a user"))),
    ] {
        let refused = Idempotent::new(&layer)
            .key("k")
            .run(counted(&runs, Duration::ZERO, "ran"))
            .await;
        assert!(
            matches!(&refused, Err(CallError::Rejected(why)) if why.contains("scope")),
            "{refused:?}"
        );
        // Naming one is enough.
        let named = Idempotent::new(&layer)
            .key("k")
            .scope(Scope::of(b"tenant-1"))
            .run(counted(&runs, Duration::ZERO, "ran"))
            .await
            .unwrap();
        assert_eq!(named.value, "ran");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "only the calls with a scope ran"
    );
    let shared =
        Idempotent::new(&IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers())
            .key("k")
            .run(counted(&runs, Duration::ZERO, "ran"))
            .await
            .unwrap();
    assert_eq!(shared.value, "ran");
}

#[tokio::test]
async fn a_failing_store_runs_nothing_and_says_so() {
    let store = FaultStore::new(MemoryStore::new());
    store.faults.claim_failures.store(1, Ordering::SeqCst);
    let calls = calls(IdempotencyLayer::new(store.clone()));
    let runs = Arc::new(AtomicUsize::new(0));
    let refused = calls
        .key("k")
        .run(counted(&runs, Duration::ZERO, "ran"))
        .await;
    assert!(
        matches!(refused, Err(CallError::StoreUnavailable { .. })),
        "{refused:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_input_over_the_limit_is_refused() {
    let calls = calls(IdempotencyLayer::new(MemoryStore::new()).max_request_body(8));
    let refused = calls
        .key("k")
        .input(vec![0u8; 9])
        .run(|_| async { Ok::<_, Bytes>(Bytes::new()) })
        .await;
    // Too large, said so: not a refused key (a consumer dead-letters it as too large).
    assert!(
        matches!(&refused, Err(CallError::TooLarge(why)) if why.contains("8 bytes")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn the_recovery_hook_answers_for_a_committed_operation_that_crashed() {
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .lease(Duration::from_millis(200))
        .recover_with(|unsettled| async move {
            assert_eq!(unsettled.key(), "k");
            Ok::<_, tower_idempotency::RecoveryError>(tower_idempotency::function::recovered(
                Bytes::from("charged, per the ledger"),
            ))
        });
    let calls = calls(layer);
    let crashed = {
        let calls = calls.clone();
        tokio::spawn(async move {
            calls
                .key("k")
                .run(|claim| async move {
                    claim.commit().await.unwrap();
                    panic!("crashed after charging")
                })
                .await
        })
    };
    assert!(crashed.await.unwrap_err().is_panic());
    let runs = Arc::new(AtomicUsize::new(0));
    let out = past_in_flight(|| {
        calls
            .key("k")
            .run(counted(&runs, Duration::ZERO, "charged twice"))
    })
    .await
    .unwrap();
    assert_eq!(out.value, "charged, per the ledger");
    assert!(out.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[cfg(feature = "json")]
mod json {
    use super::*;
    use std::collections::HashMap;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Receipt {
        order: u32,
        total_cents: u64,
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    enum Refusal {
        OutOfStock,
    }

    #[tokio::test]
    async fn typed_results_round_trip_and_map_order_does_not_change_the_fingerprint() {
        let calls = calls(IdempotencyLayer::new(MemoryStore::new()));
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for (k, v) in [("book", 1), ("pen", 2), ("ink", 3), ("pad", 4)] {
            a.insert(k, v);
        }
        for (k, v) in [("pad", 4), ("ink", 3), ("pen", 2), ("book", 1)] {
            b.insert(k, v);
        }
        let first = calls
            .key("order-9")
            .json_input(&a)
            .unwrap()
            .run_json(|_| async {
                Ok::<_, Refusal>(Receipt {
                    order: 9,
                    total_cents: 1200,
                })
            })
            .await
            .unwrap();
        let again = calls
            .key("order-9")
            .json_input(&b)
            .unwrap()
            .run_json::<Receipt, Refusal, _, _>(|_| async { unreachable!("ran twice") })
            .await
            .unwrap();
        assert_eq!(first.value, again.value);
        assert!(again.replayed);
    }

    #[tokio::test]
    async fn a_stored_result_of_another_type_is_a_codec_error_never_a_second_run() {
        let calls = calls(IdempotencyLayer::new(MemoryStore::new()));
        calls
            .key("k")
            .run(|_| async { Ok::<_, Bytes>(Bytes::from_static(b"not json")) })
            .await
            .unwrap();
        let read = calls
            .key("k")
            .run_json::<Receipt, Refusal, _, _>(|_| async { unreachable!("ran twice") })
            .await;
        assert!(matches!(read, Err(CallError::Codec(_))), "{read:?}");
    }
}

#[tokio::test]
async fn a_result_the_codec_cannot_encode_is_returned_once_and_never_runs_again() {
    use tower_idempotency::function::{CodecError, FnCodec};
    let calls = calls(IdempotencyLayer::new(MemoryStore::new()));
    let codec = || {
        FnCodec::new(
            |_: &Bytes| Err(CodecError("cannot encode".into())),
            |b: &Bytes| Ok(b.clone()),
        )
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let first = calls
        .key("k")
        .run_with(codec(), counted(&runs, Duration::ZERO, "made"))
        .await
        .unwrap();
    assert_eq!(first.value, "made");
    let again = calls
        .key("k")
        .run_with(codec(), counted(&runs, Duration::ZERO, "made twice"))
        .await;
    assert!(matches!(again, Err(CallError::NotStored)), "{again:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

mod service {
    use super::*;
    use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
    use tower_idempotency::function::{
        CodecError, FnCodec, IdempotentServiceLayer, Identity, ServiceError,
    };

    #[derive(Clone, Debug)]
    struct Message {
        id: Option<String>,
        body: String,
    }

    #[derive(Debug)]
    struct Broken;

    fn stack(
        runs: &Arc<AtomicUsize>,
        fail_first: usize,
    ) -> impl Service<
        Message,
        Response = tower_idempotency::function::Output<String>,
        Error = ServiceError<Broken>,
        Future = impl std::future::Future<
            Output = Result<tower_idempotency::function::Output<String>, ServiceError<Broken>>,
        > + Send,
    > + Clone
    + Send
    + 'static {
        let layer = IdempotentServiceLayer::new(
            &IdempotencyLayer::new(MemoryStore::new())
                .on_in_flight(InFlight::Wait(Duration::from_secs(5))),
            |m: &Message| {
                let id =
                    m.id.clone()
                        .ok_or_else(|| "the message has no id".to_owned())?;
                Ok(Identity::new(id)
                    .scope(Scope::of(b"orders-queue"))
                    .input(m.body.clone()))
            },
            FnCodec::new(
                |s: &String| Ok(Bytes::from(s.clone())),
                |b: &Bytes| String::from_utf8(b.to_vec()).map_err(|e| CodecError(e.to_string())),
            ),
        );
        let runs = Arc::clone(runs);
        let failures = Arc::new(AtomicUsize::new(fail_first));
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(move |m: Message| {
                let (runs, failures) = (Arc::clone(&runs), Arc::clone(&failures));
                async move {
                    if failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        return Err(Broken);
                    }
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(format!("handled {}", m.body))
                }
            }))
    }

    fn message(id: &str, body: &str) -> Message {
        Message {
            id: Some(id.into()),
            body: body.into(),
        }
    }

    #[tokio::test]
    async fn redelivered_messages_hammering_one_id_are_handled_once() {
        let runs = Arc::new(AtomicUsize::new(0));
        let svc = stack(&runs, 0);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                svc.oneshot(message("m-1", "order 7")).await
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap().value, "handled order 7");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_inner_error_reaches_the_caller_and_the_redelivery_runs() {
        let runs = Arc::new(AtomicUsize::new(0));
        let mut svc = stack(&runs, 1);
        let failed = svc
            .ready()
            .await
            .unwrap()
            .call(message("m-1", "order 7"))
            .await;
        assert!(matches!(failed, Err(ServiceError::Inner(Broken))));
        let redelivered = svc
            .ready()
            .await
            .unwrap()
            .call(message("m-1", "order 7"))
            .await
            .unwrap();
        assert!(!redelivered.replayed);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_message_without_an_id_or_with_a_changed_body_is_refused() {
        let runs = Arc::new(AtomicUsize::new(0));
        let mut svc = stack(&runs, 0);
        let anonymous = svc
            .ready()
            .await
            .unwrap()
            .call(Message {
                id: None,
                body: "x".into(),
            })
            .await;
        assert!(matches!(anonymous, Err(ServiceError::Unidentified(why)) if why.contains("no id")));
        svc.ready()
            .await
            .unwrap()
            .call(message("m-2", "order 8"))
            .await
            .unwrap();
        let changed = svc
            .ready()
            .await
            .unwrap()
            .call(message("m-2", "order 9"))
            .await;
        assert!(matches!(
            changed,
            Err(ServiceError::Idempotency(CallError::Mismatch))
        ));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

/// An operation is given its claim, so it never runs without one: under fail-open, a call
/// whose store fails is refused like under fail-closed (an HTTP handler would run
/// unprotected).
#[tokio::test]
async fn a_failing_store_under_fail_open_still_runs_no_call_unprotected() {
    let store = FaultStore::new(MemoryStore::new());
    store.faults.claim_failures.store(1, Ordering::SeqCst);
    let calls = calls(
        IdempotencyLayer::new(store.clone())
            .on_store_failure(tower_idempotency::StoreFailure::FailOpen),
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let refused = calls
        .key("k")
        .run(counted(&runs, Duration::ZERO, "ran unprotected"))
        .await;
    assert!(
        matches!(refused, Err(CallError::StoreUnavailable { .. })),
        "{refused:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Once the store answers, the call runs, protected.
    let out = calls
        .key("k")
        .run(counted(&runs, Duration::ZERO, "ran"))
        .await
        .unwrap();
    assert!(!out.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A layer shared with HTTP routes may store `5xx` answers (`storable_when`): a function's
/// `Err` still frees its key (no commit point was passed), and a retry runs. (Before, the
/// runner's `500` for `Err` went through the layer's HTTP policy: the error was stored and
/// replayed, and a consumer acknowledged a message whose work was never done.)
#[tokio::test]
async fn an_error_frees_its_key_whatever_the_layers_storable_policy() {
    let calls = calls(IdempotencyLayer::new(MemoryStore::new()).storable_when(|_| true));
    let failed = calls
        .key("k")
        .run(|_| async { Err::<Bytes, _>(Bytes::from("card service down")) })
        .await;
    assert!(
        matches!(
            failed,
            Err(CallError::Operation {
                replayed: false,
                ..
            })
        ),
        "{failed:?}"
    );
    let retry = calls
        .key("k")
        .run(|_| async { Ok::<_, Bytes>(Bytes::from("charged")) })
        .await;
    assert!(
        matches!(&retry, Ok(out) if out.value == "charged" && !out.replayed),
        "the retry runs: {retry:?}"
    );
}

/// The same with `maybe_ran_when` naming `5xx` (a timeout layer answering `504`): a
/// function's `Err` is not taken for an operation cut off midway, so no tombstone is kept.
#[tokio::test]
async fn an_error_frees_its_key_whatever_the_layers_maybe_ran_policy() {
    let calls =
        calls(IdempotencyLayer::new(MemoryStore::new()).maybe_ran_when(|s| s.is_server_error()));
    let _ = calls
        .key("k")
        .run(|_| async { Err::<Bytes, _>(Bytes::from("card service down")) })
        .await;
    let retry = calls
        .key("k")
        .run(|_| async { Ok::<_, Bytes>(Bytes::from("charged")) })
        .await;
    assert!(
        matches!(&retry, Ok(out) if out.value == "charged" && !out.replayed),
        "the retry runs: {retry:?}"
    );
}

/// A result the codec could not encode is replayed as `NotStored` whatever the layer's
/// `replay_headers` keeps. (Before, the mark that says so was filtered out with the other
/// headers, and the retry read an empty value as the stored result.)
#[tokio::test]
async fn an_unencodable_result_is_never_replayed_as_an_empty_value() {
    use tower_idempotency::function::{CodecError, FnCodec};
    let calls = calls(
        IdempotencyLayer::new(MemoryStore::new())
            .replay_headers(|name| name == http::header::CONTENT_TYPE),
    );
    let codec = || {
        FnCodec::new(
            |_: &Bytes| Err(CodecError("cannot encode".into())),
            |b: &Bytes| Ok(b.clone()),
        )
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let _ = calls
        .key("k")
        .run_with(codec(), counted(&runs, Duration::ZERO, "made"))
        .await
        .unwrap();
    let again = calls
        .key("k")
        .run_with(codec(), counted(&runs, Duration::ZERO, "made twice"))
        .await;
    assert!(matches!(again, Err(CallError::NotStored)), "{again:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "ran once");
}
