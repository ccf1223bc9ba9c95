//! The memory store's guaranteed replay window: a record younger than `min_retention` is
//! never evicted, whatever floods the store; when there is no room for a new claim without
//! breaking that, the claim is refused (`503 store-full`) instead; in-flight claims count
//! and are bounded; and the byte count covers what a record really pins.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Runs, assert_problem, call, post};
use http::{HeaderMap, StatusCode};
use tower::Layer;
use tower_idempotency::policy::StoreFailure;
use tower_idempotency::store::{Claim, LeaseToken, Record, StoreKey};
use tower_idempotency::{
    Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, Scope, StoreError,
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(24 * 3600);

fn key(k: &str) -> StoreKey {
    StoreKey::new(&Scope::anonymous(), k)
}

fn fp() -> Fingerprint {
    Fingerprint::from_bytes([1; 32])
}

fn record(body: usize) -> Record {
    Record::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from(vec![b'x'; body]),
        None,
    )
    .with_fingerprint(fp())
}

async fn claim(store: &MemoryStore, k: &str) -> Result<Claim, StoreError> {
    store.claim(&key(k), &fp(), LeaseToken::new(), LEASE).await
}

async fn complete_new(store: &MemoryStore, k: &str, body: usize) -> Result<(), StoreError> {
    let token = LeaseToken::new();
    match store.claim(&key(k), &fp(), token, LEASE).await? {
        Claim::Acquired(_) => store.complete(&key(k), token, record(body), TTL).await,
        other => panic!("{k} must be free, got {other:?}"),
    }
}

fn is_completed(claim: &Result<Claim, StoreError>) -> bool {
    matches!(claim, Ok(Claim::Completed(_)))
}

/// In-flight claims past three quarters of the cap used to make the next completion evict
/// every record, its own included, so its retry ran again.
#[tokio::test]
async fn many_claims_never_evict_the_record_just_written() {
    let store = MemoryStore::builder().max_bytes(200_000).build();
    complete_new(&store, "earlier", 1_000).await.unwrap();
    let mine = LeaseToken::new();
    assert!(matches!(
        store.claim(&key("mine"), &fp(), mine, LEASE).await,
        Ok(Claim::Acquired(_))
    ));
    // In-flight claims up to nine tenths of the cap.
    let mut held = 0;
    while store.bytes() < 180_000 {
        match claim(&store, &format!("held-{held}")).await {
            Ok(Claim::Acquired(_)) => held += 1,
            other => panic!("claim {held} at {} bytes: {other:?}", store.bytes()),
        }
    }
    store
        .complete(&key("mine"), mine, record(1_000), TTL)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        is_completed(&claim(&store, "mine").await),
        "the record just written was evicted: its retry would run again"
    );
    assert!(
        is_completed(&claim(&store, "earlier").await),
        "a record inside the window was evicted"
    );
}

/// The scenario of the issue, end to end on the store: records answered a moment ago
/// survive a flood of distinct keys; the flood is refused once the store is full; after the
/// window, the oldest records make room and each eviction is counted.
#[tokio::test(start_paused = true)]
async fn a_flood_never_evicts_records_inside_the_window() {
    let store = MemoryStore::builder()
        .max_bytes(1 << 20)
        .min_retention(Duration::from_secs(300))
        .build();
    for i in 0..200 {
        complete_new(&store, &format!("marker-{i}"), 500)
            .await
            .unwrap();
    }
    tokio::time::advance(Duration::from_secs(3)).await;
    let mut stored = 0;
    let mut refused = 0;
    for i in 0..20_000 {
        match complete_new(&store, &format!("flood-{i}"), 500).await {
            Ok(()) => stored += 1,
            Err(StoreError::Full) => refused += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(
        stored > 0 && refused > 0,
        "stored {stored}, refused {refused}"
    );
    // Past the cap by at most the record of the one operation that was running.
    assert!(
        store.bytes() <= (1 << 20) + 2_000,
        "{} bytes, far over the cap",
        store.bytes()
    );
    assert_eq!(store.refusals(), refused);
    assert_eq!(store.evictions(), 0, "nothing inside the window may go");
    for i in 0..200 {
        assert!(
            is_completed(&claim(&store, &format!("marker-{i}")).await),
            "marker-{i}, answered 3 s earlier, was forgotten"
        );
    }

    // Past the window, the oldest records (the markers) make room, one counted eviction
    // each.
    tokio::time::advance(Duration::from_secs(300)).await;
    for i in 0..100 {
        complete_new(&store, &format!("late-{i}"), 500)
            .await
            .expect("room is made from records past the window");
    }
    assert!(store.evictions() > 0);
    assert!(matches!(
        claim(&store, "marker-0").await,
        Ok(Claim::Acquired(_))
    ));
    assert!(is_completed(&claim(&store, "late-99").await));
    assert!(is_completed(
        &claim(&store, &format!("flood-{}", stored - 1)).await
    ));
}

/// In-flight claims count against the cap and are refused past it, and a completion of a
/// claim made before the store filled up is always kept, even past the cap.
#[tokio::test]
async fn claims_are_bounded_and_their_records_always_kept() {
    let store = MemoryStore::builder().max_bytes(100_000).build();
    let first = LeaseToken::new();
    assert!(matches!(
        store.claim(&key("first"), &fp(), first, LEASE).await,
        Ok(Claim::Acquired(_))
    ));
    let mut held = 0;
    loop {
        match claim(&store, &format!("held-{held}")).await {
            Ok(Claim::Acquired(_)) => held += 1,
            Err(StoreError::Full) => break,
            other => panic!("{other:?}"),
        }
        assert!(held < 100_000, "in-flight claims are never bounded");
    }
    assert!(store.bytes() <= 100_000);
    // The store is full of claims, yet the first one's record is kept and replayed.
    store
        .complete(&key("first"), first, record(20_000), TTL)
        .await
        .expect("a completion is never refused");
    assert!(is_completed(&claim(&store, "first").await));
}

/// A body that is a small slice of a large buffer (what tonic's encoder yields) must not
/// pin the buffer: the store keeps its own, exactly sized copy.
#[tokio::test]
async fn a_sliced_body_does_not_pin_its_buffer() {
    struct Tracked(Vec<u8>, Arc<AtomicBool>);
    impl AsRef<[u8]> for Tracked {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.1.store(true, Ordering::SeqCst);
        }
    }
    let freed = Arc::new(AtomicBool::new(false));
    let buffer = Bytes::from_owner(Tracked(vec![7; 4 << 20], Arc::clone(&freed)));
    let body = buffer.slice(100..300);
    drop(buffer);
    let store = MemoryStore::new();
    let token = LeaseToken::new();
    store
        .claim(&key("sliced"), &fp(), token, LEASE)
        .await
        .unwrap();
    let rec = Record::new(StatusCode::OK, HeaderMap::new(), body, None).with_fingerprint(fp());
    store
        .complete(&key("sliced"), token, rec, TTL)
        .await
        .unwrap();
    assert!(
        freed.load(Ordering::SeqCst),
        "the store pins a 4 MiB buffer for a 200-byte body"
    );
    match claim(&store, "sliced").await {
        Ok(Claim::Completed(r)) => assert_eq!(r.body().as_ref(), &[7; 200][..]),
        other => panic!("{other:?}"),
    }
}

/// Through the layer: a full store answers `503 store-full` with `Retry-After`, even when
/// the layer fails open, and nothing runs.
#[tokio::test]
async fn a_full_store_answers_503_store_full() {
    let store = MemoryStore::builder().max_bytes(20_000).build();
    let mut held = 0;
    while let Ok(Claim::Acquired(_)) = claim(&store, &format!("held-{held}")).await {
        held += 1;
    }
    for policy in [StoreFailure::FailClosed, StoreFailure::FailOpen] {
        let runs = Runs::default();
        let svc = IdempotencyLayer::new(store.clone())
            .share_keys_across_callers()
            .on_store_failure(policy)
            .layer(runs.handler(Duration::ZERO));
        let answer = call(&svc, post(Some("new"), "{}")).await;
        assert_problem(&answer, 503, "store-full");
        assert_eq!(runs.started(), 0, "{policy:?}");
    }
}

/// A store full of records inside their replay window refuses new keys until the oldest
/// leaves it: `Retry-After` says when that is (it said `1` while the store refused new keys
/// for the rest of its five-minute window), and counts down as the window passes.
#[tokio::test]
async fn store_full_retry_after_tells_when_the_oldest_record_may_go() {
    let window = Duration::from_secs(120);
    let store = MemoryStore::builder()
        .max_bytes(20_000)
        .min_retention(window)
        .build();
    let mut n = 0;
    while complete_new(&store, &format!("kept-{n}"), 500)
        .await
        .is_ok()
    {
        n += 1;
    }
    assert!(n > 3, "some records fit: {n}");
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .layer(runs.handler(Duration::ZERO));
    let answer = call(&svc, post(Some("new"), "{}")).await;
    assert_problem(&answer, 503, "store-full");
    let after: u64 = answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (window.as_secs() - 5..=window.as_secs()).contains(&after),
        "Retry-After must be the time until the oldest record leaves the {window:?} window, \
         got {after}"
    );
    assert_eq!(runs.started(), 0);
}

/// Concurrent large records: operations claimed while the store had room all complete
/// (their operations ran, so their records are never refused) and may take the store past
/// its cap, by at most their own records; from then on every new claim is refused until
/// records leave the window, so the store never grows further.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_large_records_overshoot_the_cap_by_at_most_their_own_size() {
    const CAP: usize = 200_000;
    const BODY: usize = 50_000;
    const CLAIMS: usize = 24;
    let store = MemoryStore::builder().max_bytes(CAP).build();
    let mut tokens = Vec::new();
    for i in 0..CLAIMS {
        let token = LeaseToken::new();
        match store
            .claim(&key(&format!("big-{i}")), &fp(), token, LEASE)
            .await
        {
            Ok(Claim::Acquired(_)) => tokens.push((i, token)),
            other => panic!("claim {i} while the store has room: {other:?}"),
        }
    }
    let before = store.bytes();
    let completions: Vec<_> = tokens
        .into_iter()
        .map(|(i, token)| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .complete(&key(&format!("big-{i}")), token, record(BODY), TTL)
                    .await
            })
        })
        .collect();
    for completion in completions {
        completion
            .await
            .unwrap()
            .expect("a completion is never refused");
    }
    let bound = before + CLAIMS * (BODY + 1_000);
    assert!(
        store.bytes() <= bound,
        "{} bytes: past the cap by more than the records in flight ({bound})",
        store.bytes()
    );
    for i in 0..CLAIMS {
        assert!(
            is_completed(&claim(&store, &format!("big-{i}")).await),
            "record {i} is kept"
        );
    }
    let full = store.bytes();
    assert!(
        full > CAP,
        "the records in flight took the store past its cap"
    );
    for i in 0..10 {
        assert!(
            matches!(
                claim(&store, &format!("new-{i}")).await,
                Err(StoreError::Full)
            ),
            "a store past its cap refuses new claims"
        );
    }
    assert_eq!(store.bytes(), full, "refused claims add nothing");
}
