//! The store conformance suite (feature `conformance`): checks that an
//! [`IdempotencyStore`] keeps the contract the layer relies on.
//!
//! Every check is a public async function that panics with an explanation when the store
//! breaks the contract; [`store_conformance_tests!`](crate::store_conformance_tests) turns
//! them into one `#[test]` each for a store of yours:
//!
//! ```no_run
//! // tests/my_store.rs, with `tower-idempotency = { features = ["conformance"] }`
//! // in [dev-dependencies].
//! use tower_idempotency::MemoryStore;
//!
//! // Returning `None` skips the tests (for example when a server is not configured).
//! async fn make_store() -> Option<MemoryStore> {
//!     Some(MemoryStore::new())
//! }
//!
//! tower_idempotency::store_conformance_tests!(memory_store, make_store);
//! ```
//!
//! The checks use real time (leases of a few hundred milliseconds), fresh random keys, and
//! up to 64 concurrent tasks on a multi-threaded runtime; they can share one server with
//! other tests.
//!
//! | Check | What it proves |
//! |---|---|
//! | [`claim_then_in_flight`] | a free key is acquired; a second claim sees it in flight with its fingerprint |
//! | [`atomic_claim`] | of 64 concurrent claims of one key exactly one acquires |
//! | [`distinct_keys`] | claims of different keys do not interfere |
//! | [`round_trip`] | a completed record comes back exactly (headers in order, binary values, trailers) |
//! | [`empty_and_large_records`] | empty and 1 MiB bodies, records without trailers, tombstones |
//! | [`fencing`] | stale tokens change nothing and get `LeaseLost`; a completed key never takes another record |
//! | [`release_frees_key`] | a released key is claimed again with a fresh token |
//! | [`lease_expiry`] | a lapsed claim is contested first, then taken over; the old owner's `complete` is refused |
//! | [`extend_ends_a_contest`] | the owner of a contested lease keeps the key by extending it |
//! | [`lapsed_owner_still_completes`] | fencing by token: a lapsed lease nobody took over can still be completed, extended or released |
//! | [`release_by_callers_token`] | the caller's token releases a claim whose reply was lost; a losing claim's token releases nothing |
//! | [`extend_keeps_claim`] | an extended claim outlives its first lease |
//! | [`extreme_durations`] | `Duration::MAX` as lease, TTL or wait means [`MAX_DURATION`](crate::store::MAX_DURATION): no error, no panic |
//! | [`ttl_expiry`] | a record is replayed until its TTL ends, then the key is free |
//! | [`wait_sees_completion`] | a waiter gets the record when the owner completes |
//! | [`wait_acquires_after_release`] | a waiter acquires the key when the owner releases it |
//! | [`wait_times_out`] | a waiter gives up in flight when the time runs out |
//! | [`commit_point`] | a committed claim reads in flight, is not released (`Committed`), then reads as outcome unknown and can still be completed by its owner |
//! | [`committed_never_taken_over`] | a committed claim whose lease lapsed is never contested nor taken over; its owner can still extend it |
//! | [`commit_fencing`] | only the owner's token commits; a free or completed key cannot be committed; committing twice is once |
//! | [`commit_expires`] | a committed key with no outcome is freed when its TTL ends |
//! | [`settle_unknown`] | only an outcome-unknown key is settled; the settled record is replayed, and the late owner's `complete` is refused |
//! | [`settle_keeps_retention`] | settling with a TTL shorter than the commit's never shortens how long the key is kept |
//! | [`revoke_withdraws_a_commit`] | `revoke` frees a key its token holds, committed or not; a late commit with that token changes nothing; `OutcomeUnknown` names the committing token |
//! | [`inspect_states`] | `inspect` tells free, in flight (committed or not), completed, tombstone and outcome unknown apart |
//! | [`purge_any_state`] | `purge` frees a key in any state and says whether it held something |
//! | [`list_by_state`] | `list` finds every key in flight, outcome unknown or completed, under the state it is in, across pages; never a free or expired key |
//! | [`list_by_remaining_life`] | `list` with [`ListFilter::expires_within`] lists a record near its end and leaves a long-lived one out |
//! | [`vacuum_keeps_live_entries`] | `vacuum` removes nothing a claim could see: live records, claims in flight, committed keys and a lapsed claim whose owner may still complete all stay |
//!
//! `list` and `vacuum` are optional for a store of your own: a store that keeps the
//! trait's defaults ([`StoreError::Unsupported`]) passes their checks with a message that
//! says they were skipped.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::fingerprint::Fingerprint;
use crate::key::{Scope, StoreKey};
use crate::record::Record;
use crate::store::{
    Claim, IdempotencyStore, KeyState, LeaseToken, ListFilter, ListedKey, StateFilter, StoreError,
    takeover_grace,
};

#[doc(hidden)]
pub mod __private {
    pub use tokio;
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(600);

/// A fresh key no other test run uses.
pub fn fresh_key() -> StoreKey {
    StoreKey::new(
        &Scope::of(b"conformance"),
        &uuid::Uuid::new_v4().to_string(),
    )
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// A record with everything that is hard to keep: repeated headers in order, a header value
/// that is not UTF-8, a binary body and trailers.
pub fn tricky_record() -> Record {
    let mut headers = HeaderMap::new();
    headers.append("content-type", HeaderValue::from_static("application/json"));
    headers.append("set-cookie", HeaderValue::from_static("a=1; Path=/"));
    headers.append("set-cookie", HeaderValue::from_static("b=2"));
    headers.append(
        "x-binary",
        HeaderValue::from_bytes(b"caf\xe9 \xff").expect("valid"),
    );
    headers.append("set-cookie", HeaderValue::from_static("c=3"));
    let mut trailers = HeaderMap::new();
    trailers.append("grpc-status", HeaderValue::from_static("0"));
    trailers.append("x-checksum", HeaderValue::from_static("abc"));
    trailers.append("x-checksum", HeaderValue::from_static("def"));
    Record::new(
        StatusCode::CREATED,
        headers,
        Bytes::from_static(b"\x00\x01binary\xff\xfe{\"id\":1}"),
        Some(trailers),
    )
    .with_fingerprint(fp(42))
}

async fn acquire<S: IdempotencyStore + ?Sized>(
    store: &S,
    key: &StoreKey,
    fingerprint: &Fingerprint,
    lease: Duration,
) -> LeaseToken {
    let token = LeaseToken::new();
    match store.claim(key, fingerprint, token, lease).await {
        Ok(Claim::Acquired(got)) => {
            assert_eq!(
                got, token,
                "an acquired claim must be owned by the caller's token"
            );
            token
        }
        other => panic!("claim of a free key {key} must be Acquired, got {other:?}"),
    }
}

async fn expect_completed<S: IdempotencyStore + ?Sized>(store: &S, key: &StoreKey) -> Arc<Record> {
    match store.claim(key, &fp(0), LeaseToken::new(), LEASE).await {
        Ok(Claim::Completed(record)) => record,
        other => panic!("claim of a completed key {key} must be Completed, got {other:?}"),
    }
}

async fn expect_in_flight<S: IdempotencyStore + ?Sized>(
    store: &S,
    key: &StoreKey,
    lease: Duration,
    what: &str,
) {
    match store.claim(key, &fp(1), LeaseToken::new(), lease).await {
        Ok(Claim::InFlight { .. }) => {}
        other => panic!("{what}: the claim must be InFlight, got {other:?}"),
    }
}

fn expect_lost(result: Result<(), StoreError>, what: &str) {
    match result {
        Err(StoreError::LeaseLost) => {}
        other => panic!("{what} with a stale token must fail with LeaseLost, got {other:?}"),
    }
}

/// A free key is acquired; a second claim sees it in flight, with the holder's fingerprint
/// and a remaining lease no longer than the lease.
pub async fn claim_then_in_flight<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    acquire(store, &key, &fp(1), LEASE).await;
    match store.claim(&key, &fp(2), LeaseToken::new(), LEASE).await {
        Ok(Claim::InFlight {
            fingerprint,
            lease_remaining,
        }) => {
            assert_eq!(
                fingerprint,
                fp(1),
                "InFlight must carry the holder's fingerprint"
            );
            if let Some(rest) = lease_remaining {
                assert!(rest <= LEASE, "remaining lease {rest:?} exceeds the lease");
            }
        }
        other => panic!("a second claim must be InFlight, got {other:?}"),
    }
}

/// Of 64 concurrent claims of one key, exactly one is acquired.
pub async fn atomic_claim<S: IdempotencyStore + Clone>(store: &S) {
    for _round in 0..3 {
        let key = fresh_key();
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let store = store.clone();
                let key = key.clone();
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.claim(&key, &fp(1), LeaseToken::new(), LEASE).await
                })
            })
            .collect();
        let mut acquired = 0;
        for task in tasks {
            match task.await.expect("claim task panicked") {
                Ok(Claim::Acquired(_)) => acquired += 1,
                Ok(Claim::InFlight { .. }) => {}
                other => panic!("a concurrent claim must be Acquired or InFlight, got {other:?}"),
            }
        }
        assert_eq!(
            acquired, 1,
            "exactly one of 64 concurrent claims must acquire"
        );
    }
}

/// Claims of different keys do not interfere.
pub async fn distinct_keys<S: IdempotencyStore + ?Sized>(store: &S) {
    let a = fresh_key();
    let b = fresh_key();
    let ta = acquire(store, &a, &fp(1), LEASE).await;
    let tb = acquire(store, &b, &fp(1), LEASE).await;
    assert_ne!(ta, tb, "every acquisition must get a fresh token");
    store
        .complete(&a, ta, tricky_record(), TTL)
        .await
        .expect("complete must succeed");
    assert!(matches!(
        store.claim(&b, &fp(1), LeaseToken::new(), LEASE).await,
        Ok(Claim::InFlight { .. })
    ));
    expect_lost(
        store.complete(&b, ta, tricky_record(), TTL).await,
        "complete of another key",
    );
}

/// A completed record comes back exactly.
pub async fn round_trip<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let token = acquire(store, &key, &fp(42), LEASE).await;
    store
        .complete(&key, token, tricky_record(), TTL)
        .await
        .expect("complete must succeed");
    let got = expect_completed(store, &key).await;
    assert_eq!(*got, tricky_record(), "the record must round-trip exactly");
    let cookies: Vec<_> = got.headers().get_all("set-cookie").iter().collect();
    assert_eq!(
        cookies,
        ["a=1; Path=/", "b=2", "c=3"],
        "header order must be kept"
    );
    assert_eq!(
        got.headers()["x-binary"].as_bytes(),
        b"caf\xe9 \xff",
        "non-UTF-8 bytes must be kept"
    );
}

/// Empty and large bodies, records without trailers, and tombstones round-trip.
pub async fn empty_and_large_records<S: IdempotencyStore + ?Sized>(store: &S) {
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let records = [
        Record::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new(), None),
        Record::new(StatusCode::OK, HeaderMap::new(), Bytes::from(big), None),
        Record::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::new(),
            Some(HeaderMap::new()),
        ),
        Record::tombstone(StatusCode::ACCEPTED, tricky_record().headers().clone()),
    ];
    for record in records {
        let record = record.with_fingerprint(fp(5));
        let key = fresh_key();
        let token = acquire(store, &key, &fp(5), LEASE).await;
        store
            .complete(&key, token, record.clone(), TTL)
            .await
            .expect("complete must succeed");
        let got = expect_completed(store, &key).await;
        assert_eq!(*got, record, "the record must round-trip exactly");
    }
}

/// `complete`, `release` and `extend` with a stale token change nothing and fail with
/// `LeaseLost`.
pub async fn fencing<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let owner = acquire(store, &key, &fp(1), LEASE).await;
    let stranger = LeaseToken::new();
    expect_lost(
        store.complete(&key, stranger, tricky_record(), TTL).await,
        "complete",
    );
    expect_lost(store.release(&key, stranger).await, "release");
    expect_lost(store.extend(&key, stranger, LEASE).await, "extend");
    expect_in_flight(
        store,
        &key,
        LEASE,
        "a stale token must not change the claim",
    )
    .await;
    store
        .complete(&key, owner, tricky_record(), TTL)
        .await
        .expect("the owner's complete must succeed");
    // Once completed, the owner's token owns nothing either: a repeat of the same
    // completion may be answered done (it changes nothing), another record is refused.
    match store.complete(&key, owner, tricky_record(), TTL).await {
        Ok(()) | Err(StoreError::LeaseLost) => {}
        other => panic!("a repeated complete must be done or LeaseLost, got {other:?}"),
    }
    let other = Record::new(StatusCode::OK, HeaderMap::new(), Bytes::new(), None);
    expect_lost(
        store.complete(&key, owner, other, TTL).await,
        "a second complete with another record",
    );
    expect_lost(store.release(&key, owner).await, "release after complete");
    expect_lost(
        store.extend(&key, owner, LEASE).await,
        "extend after complete",
    );
    assert_eq!(*expect_completed(store, &key).await, tricky_record());
    // Keys never claimed are owned by nobody.
    expect_lost(
        store.release(&fresh_key(), owner).await,
        "release of an unknown key",
    );
}

/// A released key is claimed again, with a fresh token; the old one owns nothing.
pub async fn release_frees_key<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let first = acquire(store, &key, &fp(1), LEASE).await;
    store
        .release(&key, first)
        .await
        .expect("release must succeed");
    let second = acquire(store, &key, &fp(2), LEASE).await;
    assert_ne!(first, second, "a new claim must get a fresh token");
    expect_lost(
        store.complete(&key, first, tricky_record(), TTL).await,
        "complete",
    );
}

/// A claim whose lease ran out is contested first, then taken over: the first claim after
/// the lapse is answered in flight and gives the owner [`takeover_grace`] more; a claim
/// after that acquires, and the stale owner's `complete` and `extend` are then refused.
pub async fn lease_expiry<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let lease = Duration::from_millis(300);
    acquire(store, &key, &fp(1), lease).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    match store.claim(&key, &fp(2), LeaseToken::new(), LEASE).await {
        Ok(Claim::InFlight {
            fingerprint,
            lease_remaining,
        }) => {
            assert_eq!(
                fingerprint,
                fp(1),
                "a contested claim keeps its fingerprint"
            );
            if let Some(rest) = lease_remaining {
                assert!(
                    rest <= takeover_grace(LEASE),
                    "a contested claim's remaining time is at most the grace: {rest:?}"
                );
            }
        }
        other => {
            panic!("the first claim after a lapse must be InFlight (contested), got {other:?}")
        }
    }
    // The grace is half the contesting claim's lease (15 s above); a short one here.
    let key = fresh_key();
    let stale = acquire(store, &key, &fp(1), lease).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    expect_in_flight(store, &key, lease, "a lapsed lease is contested first").await;
    tokio::time::sleep(takeover_grace(lease) + Duration::from_millis(100)).await;
    let fresh = acquire(store, &key, &fp(1), LEASE).await;
    expect_lost(
        store.complete(&key, stale, tricky_record(), TTL).await,
        "complete after the key was taken over",
    );
    expect_lost(
        store.extend(&key, stale, LEASE).await,
        "extend after the key was taken over",
    );
    store
        .complete(&key, fresh, tricky_record(), TTL)
        .await
        .expect("the new owner's complete must succeed");
    assert_eq!(*expect_completed(store, &key).await, tricky_record());
}

/// An owner that extends its contested lease keeps the key: the contest is over.
pub async fn extend_ends_a_contest<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let lease = Duration::from_millis(300);
    let owner = acquire(store, &key, &fp(1), lease).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    expect_in_flight(store, &key, lease, "a lapsed lease is contested first").await;
    store
        .extend(&key, owner, lease)
        .await
        .expect("the owner of a contested lease can extend it");
    tokio::time::sleep(Duration::from_millis(200)).await;
    expect_in_flight(store, &key, lease, "an extended lease is held again").await;
    store
        .complete(&key, owner, tricky_record(), TTL)
        .await
        .expect("the owner completes");
}

/// Fencing is by token, not by clock: an owner whose lease ran out while nobody claimed the
/// key can still extend it and store its outcome (an owner back from a store outage).
pub async fn lapsed_owner_still_completes<S: IdempotencyStore + ?Sized>(store: &S) {
    let lease = Duration::from_millis(300);
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), lease).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    store
        .complete(&key, token, tricky_record(), TTL)
        .await
        .expect("an owner whose lapsed lease nobody took over must still complete");
    assert_eq!(*expect_completed(store, &key).await, tricky_record());

    // Extending a lapsed, untaken lease takes it back: no other claim gets in.
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), lease).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    store
        .extend(&key, token, LEASE)
        .await
        .expect("an owner whose lapsed lease nobody took over must still extend it");
    expect_in_flight(
        store,
        &key,
        LEASE,
        "an extended lease must hold the key again",
    )
    .await;

    // And releasing it frees the key.
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), lease).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    store
        .release(&key, token)
        .await
        .expect("an owner whose lapsed lease nobody took over must still release it");
    acquire(store, &key, &fp(1), LEASE).await;
}

/// The caller makes the token: a claim whose reply the caller never saw can be released
/// with the token it sent, and a token whose claim did not acquire releases nothing.
pub async fn release_by_callers_token<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let sent = LeaseToken::new();
    // The caller sends the claim and loses the reply.
    let _lost_reply = store.claim(&key, &fp(1), sent, LEASE).await;
    store
        .release(&key, sent)
        .await
        .expect("the token sent with a claim must release it");
    let owner = acquire(store, &key, &fp(1), LEASE).await;
    // A claim that found the key in flight made nothing its token could release.
    let loser = LeaseToken::new();
    assert!(matches!(
        store.claim(&key, &fp(1), loser, LEASE).await,
        Ok(Claim::InFlight { .. })
    ));
    expect_lost(
        store.release(&key, loser).await,
        "release by a claim that did not acquire",
    );
    expect_in_flight(
        store,
        &key,
        LEASE,
        "a losing claim's release must not free the owner's key",
    )
    .await;
    store
        .complete(&key, owner, tricky_record(), TTL)
        .await
        .expect("the owner still completes");
}

/// A claim extended before its lease ends outlives that lease.
pub async fn extend_keeps_claim<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), Duration::from_millis(400)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    store
        .extend(&key, token, Duration::from_secs(5))
        .await
        .expect("extend must succeed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    expect_in_flight(
        store,
        &key,
        LEASE,
        "an extended claim must still be in flight",
    )
    .await;
    store
        .complete(&key, token, tricky_record(), TTL)
        .await
        .expect("complete after extend must succeed");
}

/// `Duration::MAX` as a lease, a TTL or a wait works: it means
/// [`MAX_DURATION`](crate::store::MAX_DURATION), as on every store of the crate, and never
/// an error or a panic.
pub async fn extreme_durations<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), Duration::MAX).await;
    match store
        .claim(&key, &fp(1), LeaseToken::new(), Duration::MAX)
        .await
    {
        Ok(Claim::InFlight {
            lease_remaining, ..
        }) => assert!(
            lease_remaining.is_none_or(|left| left <= crate::store::MAX_DURATION
                && left > crate::store::MAX_DURATION - Duration::from_secs(60)),
            "a lease of Duration::MAX must run for MAX_DURATION, got {lease_remaining:?}"
        ),
        other => {
            panic!("a claim held with a lease of Duration::MAX must be InFlight, got {other:?}")
        }
    }
    store
        .extend(&key, token, Duration::MAX)
        .await
        .expect("extend by Duration::MAX must succeed");
    store
        .complete(&key, token, tricky_record(), Duration::MAX)
        .await
        .expect("complete with a TTL of Duration::MAX must succeed");
    assert_eq!(*expect_completed(store, &key).await, tricky_record());
    let waited = tokio::time::timeout(
        Duration::from_secs(5),
        store.wait(
            &key,
            &fp(1),
            LeaseToken::new(),
            Duration::MAX,
            Duration::MAX,
        ),
    )
    .await
    .expect("a wait of Duration::MAX on a completed key must answer at once");
    assert!(
        matches!(waited, Ok(Claim::Completed(_))),
        "a wait on a completed key must answer Completed, got {waited:?}"
    );
}

/// A record is replayed until its TTL ends; then the key is free.
pub async fn ttl_expiry<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), LEASE).await;
    store
        .complete(&key, token, tricky_record(), Duration::from_millis(400))
        .await
        .expect("complete must succeed");
    expect_completed(store, &key).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    acquire(store, &key, &fp(1), LEASE).await;
}

/// A waiter gets the record as soon as the owner completes.
pub async fn wait_sees_completion<S: IdempotencyStore + Clone>(store: &S) {
    let key = fresh_key();
    let token = acquire(store, &key, &fp(42), LEASE).await;
    let waiter = {
        let store = store.clone();
        let key = key.clone();
        tokio::spawn(async move {
            store
                .wait(
                    &key,
                    &fp(42),
                    LeaseToken::new(),
                    LEASE,
                    Duration::from_secs(10),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    store
        .complete(&key, token, tricky_record(), TTL)
        .await
        .expect("complete must succeed");
    let started = tokio::time::Instant::now();
    match waiter.await.expect("waiter panicked") {
        Ok(Claim::Completed(record)) => assert_eq!(*record, tricky_record()),
        other => panic!("a waiter must see the completed record, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a waiter must return soon after completion"
    );
}

/// A waiter acquires the key when its owner releases it.
pub async fn wait_acquires_after_release<S: IdempotencyStore + Clone>(store: &S) {
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), LEASE).await;
    let waiter = {
        let store = store.clone();
        let key = key.clone();
        tokio::spawn(async move {
            store
                .wait(
                    &key,
                    &fp(1),
                    LeaseToken::new(),
                    LEASE,
                    Duration::from_secs(10),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    store
        .release(&key, token)
        .await
        .expect("release must succeed");
    match waiter.await.expect("waiter panicked") {
        Ok(Claim::Acquired(new)) => assert_ne!(new, token),
        other => panic!("a waiter must acquire a released key, got {other:?}"),
    }
}

/// A waiter gives up, in flight, when its time runs out.
pub async fn wait_times_out<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    acquire(store, &key, &fp(1), LEASE).await;
    let started = tokio::time::Instant::now();
    let claim = store
        .wait(
            &key,
            &fp(1),
            LeaseToken::new(),
            LEASE,
            Duration::from_millis(300),
        )
        .await;
    assert!(
        matches!(claim, Ok(Claim::InFlight { .. })),
        "a timed-out wait must answer InFlight, got {claim:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "wait returned early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "wait overran its timeout: {waited:?}"
    );
}

/// Claims `key` and expects [`Claim::OutcomeUnknown`] with the committing request's
/// fingerprint; answers the token it carries.
async fn expect_unknown<S: IdempotencyStore + ?Sized>(
    store: &S,
    key: &StoreKey,
    what: &str,
) -> LeaseToken {
    match store.claim(key, &fp(1), LeaseToken::new(), LEASE).await {
        Ok(Claim::OutcomeUnknown { fingerprint, token }) => {
            assert_eq!(
                fingerprint,
                fp(1),
                "{what}: OutcomeUnknown must carry the committing request's fingerprint"
            );
            token
        }
        other => panic!("{what}: the claim must be OutcomeUnknown, got {other:?}"),
    }
}

fn record_of(status: u16, body: &'static [u8]) -> Record {
    Record::new(
        StatusCode::from_u16(status).expect("a valid status"),
        HeaderMap::new(),
        Bytes::from_static(body),
        None,
    )
    .with_fingerprint(fp(1))
}

/// A committed claim reads in flight while its lease runs; `release` does not free it (it
/// answers `Committed` and ends the lease), after which it reads as outcome unknown; its
/// owner's `complete` still stores.
pub async fn commit_point<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), LEASE).await;
    store
        .commit(&key, token, TTL)
        .await
        .expect("the owner commits its claim");
    expect_in_flight(store, &key, LEASE, "a committed claim with a live lease").await;
    match store.release(&key, token).await {
        Err(StoreError::Committed) => {}
        other => panic!("releasing a committed claim must answer Committed, got {other:?}"),
    }
    expect_unknown(store, &key, "a committed claim its owner let go").await;
    expect_unknown(store, &key, "a committed claim, asked again").await;
    store
        .complete(&key, token, record_of(500, b"failed after commit"), TTL)
        .await
        .expect("the owner of a committed claim still completes it");
    let record = expect_completed(store, &key).await;
    assert_eq!(record.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(&record.body()[..], b"failed after commit");
}

/// A committed claim whose lease lapsed is never contested nor taken over, however often it
/// is claimed; its owner can still extend it (it reads in flight again).
pub async fn committed_never_taken_over<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let lease = Duration::from_millis(200);
    let token = acquire(store, &key, &fp(1), lease).await;
    store.commit(&key, token, TTL).await.expect("commit");
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    for round in 0..3 {
        expect_unknown(
            store,
            &key,
            &format!("claim {round} after the lease lapsed"),
        )
        .await;
        tokio::time::sleep(takeover_grace(lease) + Duration::from_millis(50)).await;
    }
    store
        .extend(&key, token, LEASE)
        .await
        .expect("the owner of a lapsed committed claim extends it");
    expect_in_flight(store, &key, LEASE, "an extended committed claim").await;
    store
        .complete(&key, token, record_of(201, b"done"), TTL)
        .await
        .expect("then completes it");
    assert_eq!(
        expect_completed(store, &key).await.status(),
        StatusCode::CREATED
    );
}

/// Only the token that owns the claim commits it; a free key, a completed key, or a
/// stranger's token get `LeaseLost` and change nothing; committing twice is once.
pub async fn commit_fencing<S: IdempotencyStore + ?Sized>(store: &S) {
    let free = fresh_key();
    expect_lost(
        store.commit(&free, LeaseToken::new(), TTL).await,
        "commit of a free key",
    );
    assert!(
        matches!(
            store.claim(&free, &fp(1), LeaseToken::new(), LEASE).await,
            Ok(Claim::Acquired(_))
        ),
        "a refused commit must leave the key free"
    );
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), LEASE).await;
    expect_lost(
        store.commit(&key, LeaseToken::new(), TTL).await,
        "commit with a stranger's token",
    );
    store
        .release(&key, token)
        .await
        .expect("a claim a stranger tried to commit is not committed: its owner releases it");
    let token = acquire(store, &key, &fp(1), LEASE).await;
    store.commit(&key, token, TTL).await.expect("first commit");
    store
        .commit(&key, token, TTL)
        .await
        .expect("second commit of the same claim");
    store
        .complete(&key, token, record_of(200, b"ok"), TTL)
        .await
        .expect("complete");
    expect_lost(
        store.commit(&key, token, TTL).await,
        "commit of a completed key",
    );
    assert_eq!(&expect_completed(store, &key).await.body()[..], b"ok");
}

/// A committed key that never got an outcome is kept for the TTL it was committed with,
/// then freed like an expired record.
pub async fn commit_expires<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let lease = Duration::from_millis(100);
    let token = acquire(store, &key, &fp(1), lease).await;
    store
        .commit(&key, token, Duration::from_millis(400))
        .await
        .expect("commit");
    tokio::time::sleep(Duration::from_millis(200)).await;
    expect_unknown(store, &key, "inside the commit's TTL").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    acquire(store, &key, &fp(2), LEASE).await;
}

/// `settle` stores a record only over an outcome-unknown key; the record is then replayed,
/// and the owner's late `complete` is refused.
pub async fn settle_unknown<S: IdempotencyStore + ?Sized>(store: &S) {
    let free = fresh_key();
    assert!(
        !store
            .settle(&free, record_of(200, b"x"), TTL)
            .await
            .expect("settle"),
        "settling a free key must store nothing"
    );
    assert!(
        matches!(store.inspect(&free).await, Ok(KeyState::Free)),
        "a refused settle leaves the key free"
    );
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), LEASE).await;
    assert!(
        !store
            .settle(&key, record_of(200, b"x"), TTL)
            .await
            .expect("settle"),
        "settling a running, uncommitted claim must store nothing"
    );
    store.commit(&key, token, TTL).await.expect("commit");
    assert!(
        !store
            .settle(&key, record_of(200, b"x"), TTL)
            .await
            .expect("settle"),
        "settling a committed claim whose owner's lease still runs must store nothing"
    );
    let _ = store.release(&key, token).await;
    expect_unknown(store, &key, "after the owner let go").await;
    assert!(
        store
            .settle(&key, record_of(201, b"recovered"), TTL)
            .await
            .expect("settle"),
        "an outcome-unknown key is settled"
    );
    let record = expect_completed(store, &key).await;
    assert_eq!(record.status(), StatusCode::CREATED);
    assert_eq!(&record.body()[..], b"recovered");
    assert!(
        !store
            .settle(&key, record_of(200, b"again"), TTL)
            .await
            .expect("settle"),
        "a settled key is not settled again"
    );
    expect_lost(
        store
            .complete(&key, token, record_of(200, b"late owner"), TTL)
            .await,
        "the owner's complete after its key was settled",
    );
    assert_eq!(
        &expect_completed(store, &key).await.body()[..],
        b"recovered"
    );
}

/// Settling never shortens what a commit was kept for: a key committed for a long TTL and
/// settled with a short one is still replayed after the short one.
pub async fn settle_keeps_retention<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), LEASE).await;
    store.commit(&key, token, TTL).await.expect("commit");
    let _ = store.release(&key, token).await;
    expect_unknown(store, &key, "after the owner let go").await;
    assert!(
        store
            .settle(&key, record_of(201, b"settled"), Duration::from_millis(50))
            .await
            .expect("settle"),
        "an outcome-unknown key is settled"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let record = expect_completed(store, &key).await;
    assert_eq!(
        &record.body()[..],
        b"settled",
        "a settle with a TTL shorter than the commit's must keep the record as long as the \
         commit was to be kept"
    );
    match store.inspect(&key).await {
        Ok(KeyState::Completed {
            expires_in: Some(left),
            ..
        }) => assert!(
            left > TTL / 2,
            "the settled record must be kept about the commit's TTL, is kept {left:?}"
        ),
        Ok(KeyState::Completed { .. }) => {}
        other => panic!("expected the settled record, got {other:?}"),
    }
}

/// `revoke` frees a key held with its token, committed or not, lapsed or not; a stranger's
/// token, a completed key and a free key get `LeaseLost` and change nothing; a commit with
/// the revoked token changes nothing; `OutcomeUnknown` carries the committing token.
pub async fn revoke_withdraws_a_commit<S: IdempotencyStore + ?Sized>(store: &S) {
    // Committed, lease live.
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), LEASE).await;
    store.commit(&key, token, TTL).await.expect("commit");
    expect_lost(
        store.revoke(&key, LeaseToken::new()).await,
        "revoke with a stranger's token",
    );
    expect_in_flight(store, &key, LEASE, "a commit a stranger tried to revoke").await;
    store
        .revoke(&key, token)
        .await
        .expect("the owner revokes its committed claim");
    assert!(
        matches!(store.inspect(&key).await, Ok(KeyState::Free)),
        "a revoked commit leaves the key free"
    );
    // A commit that lands after its revocation (its command was late) changes nothing.
    expect_lost(
        store.commit(&key, token, TTL).await,
        "a commit that lands after its revocation",
    );
    let next = acquire(store, &key, &fp(1), LEASE).await;
    expect_lost(
        store.revoke(&key, token).await,
        "a revoke with the old token after another claim took the key",
    );
    expect_lost(
        store.commit(&key, token, TTL).await,
        "a late commit with the old token",
    );
    store
        .release(&key, next)
        .await
        .expect("the new claim is not committed: it is released");
    // Outcome unknown: the committing token is named, and revokes it.
    let token = acquire(store, &key, &fp(1), LEASE).await;
    store.commit(&key, token, TTL).await.expect("commit");
    let _ = store.release(&key, token).await;
    let named = expect_unknown(store, &key, "after the owner let go").await;
    assert_eq!(
        named, token,
        "OutcomeUnknown must carry the token that committed"
    );
    store
        .revoke(&key, named)
        .await
        .expect("an outcome-unknown key is revoked with the token it names");
    acquire(store, &key, &fp(2), LEASE).await;
    // Not committed: revoke is a release.
    let key = fresh_key();
    let token = acquire(store, &key, &fp(1), LEASE).await;
    store.revoke(&key, token).await.expect("revoke");
    // A completed key keeps its record.
    let token = acquire(store, &key, &fp(1), LEASE).await;
    store
        .complete(&key, token, record_of(200, b"kept"), TTL)
        .await
        .expect("complete");
    expect_lost(store.revoke(&key, token).await, "revoke of a completed key");
    assert_eq!(&expect_completed(store, &key).await.body()[..], b"kept");
    expect_lost(
        store.revoke(&fresh_key(), LeaseToken::new()).await,
        "revoke of a free key",
    );
}

/// `inspect` tells every state apart and changes nothing.
pub async fn inspect_states<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    assert!(
        matches!(store.inspect(&key).await, Ok(KeyState::Free)),
        "a key never claimed is free"
    );
    let token = acquire(store, &key, &fp(1), LEASE).await;
    match store.inspect(&key).await {
        Ok(KeyState::InFlight {
            fingerprint,
            lease_remaining,
            committed: false,
        }) => {
            assert_eq!(fingerprint, fp(1));
            assert!(
                lease_remaining > Duration::ZERO && lease_remaining <= LEASE,
                "lease left: {lease_remaining:?}"
            );
        }
        other => panic!("a running claim must inspect as InFlight, uncommitted: {other:?}"),
    }
    store.commit(&key, token, TTL).await.expect("commit");
    assert!(
        matches!(
            store.inspect(&key).await,
            Ok(KeyState::InFlight {
                committed: true,
                ..
            })
        ),
        "a committed running claim must inspect as InFlight, committed"
    );
    let _ = store.release(&key, token).await;
    match store.inspect(&key).await {
        Ok(KeyState::OutcomeUnknown { fingerprint, .. }) => assert_eq!(fingerprint, fp(1)),
        other => panic!("a committed claim let go must inspect as OutcomeUnknown: {other:?}"),
    }
    store
        .complete(&key, token, tricky_record(), TTL)
        .await
        .expect("complete");
    match store.inspect(&key).await {
        Ok(KeyState::Completed { record, expires_in }) => {
            assert_eq!(
                *record,
                tricky_record(),
                "inspect returns the record exactly"
            );
            assert!(expires_in.is_none_or(|left| left <= TTL && left > Duration::ZERO));
        }
        other => panic!("a completed key must inspect as Completed: {other:?}"),
    }
    // Inspecting changed nothing.
    assert_eq!(*expect_completed(store, &key).await, tricky_record());

    let tomb = fresh_key();
    let token = acquire(store, &tomb, &fp(1), LEASE).await;
    let record = Record::tombstone(StatusCode::OK, HeaderMap::new()).with_fingerprint(fp(1));
    store
        .complete(&tomb, token, record, TTL)
        .await
        .expect("complete");
    match store.inspect(&tomb).await {
        Ok(KeyState::Completed { record, .. }) => assert!(record.is_tombstone()),
        other => panic!("a tombstone must inspect as Completed: {other:?}"),
    }
}

/// `purge` frees a key in every state and says whether there was something.
pub async fn purge_any_state<S: IdempotencyStore + ?Sized>(store: &S) {
    let key = fresh_key();
    assert!(!store.purge(&key).await.expect("purge"), "nothing to purge");
    // In flight.
    let token = acquire(store, &key, &fp(1), LEASE).await;
    assert!(store.purge(&key).await.expect("purge"), "a claim is purged");
    expect_lost(
        store.complete(&key, token, record_of(200, b"x"), TTL).await,
        "the owner's complete after its claim was purged",
    );
    // Completed.
    let token = acquire(store, &key, &fp(1), LEASE).await;
    store
        .complete(&key, token, record_of(200, b"x"), TTL)
        .await
        .expect("complete");
    assert!(
        store.purge(&key).await.expect("purge"),
        "a record is purged"
    );
    // Outcome unknown.
    let token = acquire(store, &key, &fp(1), LEASE).await;
    store.commit(&key, token, TTL).await.expect("commit");
    let _ = store.release(&key, token).await;
    assert!(
        store.purge(&key).await.expect("purge"),
        "a committed key is purged"
    );
    assert!(matches!(store.inspect(&key).await, Ok(KeyState::Free)));
    acquire(store, &key, &fp(2), LEASE).await;
}

/// Every key `store` lists under `filter`, or `None` (with a message saying the check is
/// skipped) when the store does not support `list`.
async fn listed<S: IdempotencyStore + ?Sized>(
    store: &S,
    filter: &ListFilter,
) -> Option<Vec<ListedKey>> {
    match crate::store::list_all(store, filter).await {
        Ok(all) => {
            for listed in &all {
                assert!(
                    filter.matches(&listed.state),
                    "list answered {} in state {}, which the filter {filter:?} leaves out",
                    listed.key,
                    listed.state
                );
            }
            Some(all)
        }
        Err(StoreError::Unsupported { .. }) => {
            println!(
                "skipped: this store does not support `list` (StoreError::Unsupported, the trait's default)"
            );
            None
        }
        Err(err) => panic!("list failed: {err:?}"),
    }
}

fn state_of(all: &[ListedKey], key: &StoreKey) -> Option<KeyState> {
    all.iter()
        .filter(|l| &l.key == key)
        .map(|l| l.state.clone())
        .next()
}

/// A committed key whose owner let go: its outcome is unknown.
async fn make_unknown<S: IdempotencyStore + ?Sized>(store: &S, key: &StoreKey) {
    let token = acquire(store, key, &fp(1), LEASE).await;
    store.commit(key, token, TTL).await.expect("commit");
    assert!(matches!(
        store.release(key, token).await,
        Err(StoreError::Committed)
    ));
}

/// `list` finds every key in flight, outcome unknown or completed under the state it is in,
/// with each state filter and across small pages; a key that was released, or a record
/// past its TTL, is never listed.
pub async fn list_by_state<S: IdempotencyStore + ?Sized>(store: &S) {
    let (flying, done, unknown, released, expired) = (
        fresh_key(),
        fresh_key(),
        fresh_key(),
        fresh_key(),
        fresh_key(),
    );
    acquire(store, &flying, &fp(1), LEASE).await;
    let token = acquire(store, &done, &fp(1), LEASE).await;
    store
        .complete(&done, token, record_of(201, b"done"), TTL)
        .await
        .expect("complete");
    make_unknown(store, &unknown).await;
    let token = acquire(store, &released, &fp(1), LEASE).await;
    store.release(&released, token).await.expect("release");
    let token = acquire(store, &expired, &fp(1), LEASE).await;
    store
        .complete(
            &expired,
            token,
            record_of(200, b"old"),
            Duration::from_millis(200),
        )
        .await
        .expect("complete");
    tokio::time::sleep(Duration::from_millis(400)).await;

    let Some(all) = listed(store, &ListFilter::new().page_size(1000)).await else {
        return;
    };
    assert!(
        matches!(
            state_of(&all, &flying),
            Some(KeyState::InFlight {
                committed: false,
                ..
            })
        ),
        "a claim in flight is listed in flight"
    );
    match state_of(&all, &done) {
        Some(KeyState::Completed { record, .. }) => {
            assert_eq!(record.status(), StatusCode::CREATED);
            assert_eq!(&record.body()[..], b"done");
        }
        other => panic!("a completed key is listed with its record, got {other:?}"),
    }
    assert!(
        matches!(
            state_of(&all, &unknown),
            Some(KeyState::OutcomeUnknown { .. })
        ),
        "a committed key without an outcome is listed as outcome unknown"
    );
    assert!(
        state_of(&all, &released).is_none(),
        "a released key is free: never listed"
    );
    assert!(
        state_of(&all, &expired).is_none(),
        "a record past its TTL is invisible to claim: never listed"
    );
    for (filter, key) in [
        (StateFilter::IN_FLIGHT, &flying),
        (StateFilter::COMPLETED, &done),
        (StateFilter::OUTCOME_UNKNOWN, &unknown),
    ] {
        let some = listed(store, &ListFilter::new().states(filter).page_size(1000))
            .await
            .expect("list worked a moment ago");
        for other in [&flying, &done, &unknown] {
            assert_eq!(
                state_of(&some, other).is_some(),
                other == key,
                "with {filter:?}, only the key in that state is listed"
            );
        }
    }
    // Small pages: a walk of many calls still finds every key (keys claimed meanwhile by
    // other tests may or may not be listed).
    let small = listed(store, &ListFilter::new().page_size(7))
        .await
        .expect("list worked a moment ago");
    for key in [&flying, &done, &unknown] {
        assert!(
            state_of(&small, key).is_some(),
            "a walk in pages of 7 keys finds {key}"
        );
    }
}

/// [`ListFilter::expires_within`] lists a record near the end of its TTL and leaves a
/// long-lived one out.
pub async fn list_by_remaining_life<S: IdempotencyStore + ?Sized>(store: &S) {
    let (soon, later) = (fresh_key(), fresh_key());
    let token = acquire(store, &soon, &fp(1), LEASE).await;
    store
        .complete(
            &soon,
            token,
            record_of(200, b"soon"),
            Duration::from_secs(30),
        )
        .await
        .expect("complete");
    let token = acquire(store, &later, &fp(1), LEASE).await;
    store
        .complete(&later, token, record_of(200, b"later"), TTL)
        .await
        .expect("complete");
    let filter = ListFilter::new()
        .states(StateFilter::COMPLETED)
        .expires_within(Duration::from_secs(60))
        .page_size(1000);
    let Some(all) = listed(store, &filter).await else {
        return;
    };
    assert!(
        state_of(&all, &soon).is_some(),
        "a record kept 30 s more expires within 60 s"
    );
    assert!(
        state_of(&all, &later).is_none(),
        "a record kept 10 min more does not expire within 60 s"
    );
}

/// `vacuum` removes only what a claim cannot see: after it, a live record replays, a claim
/// in flight is still in flight, a committed key still reads as outcome unknown, and the
/// owner of a lapsed claim nobody took over still completes it; an expired record stays
/// invisible.
pub async fn vacuum_keeps_live_entries<S: IdempotencyStore + ?Sized>(store: &S) {
    let (live, flying, unknown, lapsed, expired) = (
        fresh_key(),
        fresh_key(),
        fresh_key(),
        fresh_key(),
        fresh_key(),
    );
    let token = acquire(store, &live, &fp(1), LEASE).await;
    store
        .complete(&live, token, record_of(201, b"live"), TTL)
        .await
        .expect("complete");
    acquire(store, &flying, &fp(1), LEASE).await;
    make_unknown(store, &unknown).await;
    let lapsed_token = acquire(store, &lapsed, &fp(1), Duration::from_millis(100)).await;
    let token = acquire(store, &expired, &fp(1), LEASE).await;
    store
        .complete(
            &expired,
            token,
            record_of(200, b"old"),
            Duration::from_millis(100),
        )
        .await
        .expect("complete");
    tokio::time::sleep(Duration::from_millis(300)).await;

    match crate::store::vacuum_all(store, 100).await {
        Ok(_) => {}
        Err(StoreError::Unsupported { .. }) => {
            println!(
                "skipped: this store does not support `vacuum` (StoreError::Unsupported, the trait's default)"
            );
            return;
        }
        Err(err) => panic!("vacuum failed: {err:?}"),
    }
    assert_eq!(
        &expect_completed(store, &live).await.body()[..],
        b"live",
        "vacuum kept a live record"
    );
    expect_in_flight(store, &flying, LEASE, "after a vacuum").await;
    expect_unknown(store, &unknown, "after a vacuum").await;
    assert!(matches!(store.inspect(&expired).await, Ok(KeyState::Free)));
    store
        .complete(&lapsed, lapsed_token, record_of(202, b"late"), TTL)
        .await
        .expect("vacuum keeps a lapsed claim nobody took over: its owner still completes");
    assert_eq!(&expect_completed(store, &lapsed).await.body()[..], b"late");
}

/// Runs `check` on a fresh multi-threaded runtime, or prints that it was skipped when the
/// factory returns `None`. Used by [`store_conformance_tests!`](crate::store_conformance_tests).
#[doc(hidden)]
pub fn run<S, M, MF, C, CF>(name: &str, make: M, check: C)
where
    M: FnOnce() -> MF,
    MF: std::future::Future<Output = Option<S>>,
    C: FnOnce(S) -> CF,
    CF: std::future::Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    rt.block_on(async {
        match make().await {
            Some(store) => check(store).await,
            None => println!("skipped {name}: the store is not configured"),
        }
    });
}

/// Generates one `#[test]` per conformance check for a store (feature `conformance`).
///
/// `store_conformance_tests!(module_name, make_store)` makes a module of tests; `make_store`
/// (a function visible in the calling module) is an `async fn() -> Option<S>` with `S: IdempotencyStore + Clone`, called once per test;
/// `None` skips the test with a message.
///
/// ```no_run
/// use tower_idempotency::MemoryStore;
///
/// async fn make_store() -> Option<MemoryStore> {
///     Some(MemoryStore::new())
/// }
///
/// tower_idempotency::store_conformance_tests!(memory_store, make_store);
/// ```
#[macro_export]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
macro_rules! store_conformance_tests {
    ($module:ident, $make:path) => {
        #[cfg(test)]
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_conformance_tests!(@tests $make;
                claim_then_in_flight, atomic_claim, distinct_keys, round_trip,
                empty_and_large_records, fencing, release_frees_key, lease_expiry,
                extend_ends_a_contest, lapsed_owner_still_completes, release_by_callers_token,
                extend_keeps_claim, extreme_durations, ttl_expiry, wait_sees_completion,
                wait_acquires_after_release, wait_times_out, commit_point,
                committed_never_taken_over, commit_fencing, commit_expires, settle_unknown,
                settle_keeps_retention, revoke_withdraws_a_commit, inspect_states,
                purge_any_state, list_by_state, list_by_remaining_life,
                vacuum_keeps_live_entries);
        }
    };
    (@tests $make:path; $($check:ident),*) => {
        $(
            #[test]
            fn $check() {
                $crate::conformance::run(
                    concat!(module_path!(), "::", stringify!($check)),
                    || $make(),
                    |store| async move { $crate::conformance::$check(&store).await },
                );
            }
        )*
    };
}
