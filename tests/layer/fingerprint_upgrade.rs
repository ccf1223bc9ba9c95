//! Fingerprints are tagged with their hash: a record stored by an earlier version (a bare
//! SHA-256 fingerprint) still replays after the upgrade to XXH3-128, never a `422`.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::{Runs, assert_problem, call, post};
use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use tower::Layer;
use tower_idempotency::store::{Claim, LeaseToken, Record, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, Scope};

/// The fingerprint 0.1 computed for `POST /orders` with a JSON body.
fn sha256_fingerprint(body: &str) -> Fingerprint {
    let mut sha = Sha256::new();
    for field in [
        &b"POST"[..],
        b"/orders",
        b"application/json",
        body.as_bytes(),
    ] {
        sha.update((field.len() as u64).to_be_bytes());
        sha.update(field);
    }
    Fingerprint::from_bytes(sha.finalize().into())
}

#[tokio::test]
async fn records_stored_with_the_old_hash_still_replay() {
    let store = MemoryStore::new();
    let old = sha256_fingerprint("{\"sku\":1}");
    assert!(old.is_legacy());
    // An earlier version ran `old-1` and stored its answer.
    let key = StoreKey::new(&Scope::anonymous(), "old-1");
    let token = LeaseToken::new();
    let claim = store
        .claim(&key, &old, token, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)));
    let record = Record::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from("run 0"),
        None,
    )
    .with_fingerprint(old);
    store
        .complete(&key, token, record, Duration::from_secs(600))
        .await
        .unwrap();
    // And holds `old-2` in flight.
    let key2 = StoreKey::new(&Scope::anonymous(), "old-2");
    store
        .claim(&key2, &old, LeaseToken::new(), Duration::from_secs(30))
        .await
        .unwrap();

    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .layer(runs.handler(Duration::ZERO));
    let replay = call(&svc, post(Some("old-1"), "{\"sku\":1}")).await;
    assert_eq!(replay.status, StatusCode::CREATED, "{}", replay.text());
    assert!(replay.replayed());
    assert_eq!(replay.text(), "run 0");
    // The same payload in flight is the same request (409), not a reuse (422).
    let busy = call(&svc, post(Some("old-2"), "{\"sku\":1}")).await;
    assert_problem(&busy, 409, "key-in-use");
    // Another payload is still refused.
    let other = call(&svc, post(Some("old-1"), "{\"sku\":2}")).await;
    assert_problem(&other, 422, "key-reused");
    assert_eq!(runs.started(), 0);
}

/// A fingerprint function of the application's own that builds on `Fingerprint::of_fields`
/// (here a preset) is upgraded the same way: its records stored as SHA-256 still replay.
#[tokio::test]
async fn a_fingerprint_function_built_on_of_fields_upgrades_too() {
    let store = MemoryStore::new();
    let old = sha256_fingerprint("{\"sku\":1}");
    let key = StoreKey::new(&Scope::anonymous(), "old-3");
    let token = LeaseToken::new();
    store
        .claim(&key, &old, token, Duration::from_secs(30))
        .await
        .unwrap();
    let record = Record::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from("run 0"),
        None,
    )
    .with_fingerprint(old);
    store
        .complete(&key, token, record, Duration::from_secs(600))
        .await
        .unwrap();
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .fingerprint_with(|parts, body| {
            Fingerprint::of_request_ignoring_media_type_parameters(parts, body)
        })
        .layer(runs.handler(Duration::ZERO));
    let replay = call(&svc, post(Some("old-3"), "{\"sku\":1}")).await;
    assert!(replay.replayed(), "{}", replay.text());
    assert_eq!(replay.text(), "run 0");
    let other = call(&svc, post(Some("old-3"), "{\"sku\":2}")).await;
    assert_problem(&other, 422, "key-reused");
    assert_eq!(runs.started(), 0);
}

/// A committed operation of an earlier version (SHA-256 fingerprint) whose owner stores its
/// answer while a retry's recovery hook runs: the retry replays the stored answer, not the
/// hook's, so the key keeps one answer.
#[tokio::test]
async fn a_recovery_that_loses_the_race_to_an_earlier_versions_owner_replays_its_answer() {
    let store = MemoryStore::new();
    let old = sha256_fingerprint("{\"sku\":1}");
    let key = StoreKey::new(&Scope::anonymous(), "old-4");
    let token = LeaseToken::new();
    store
        .claim(&key, &old, token, Duration::from_millis(30))
        .await
        .unwrap();
    store
        .commit(&key, token, Duration::from_secs(600))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let owner_record = Record::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from("the owner's answer"),
        None,
    )
    .with_fingerprint(old);
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .recover_with({
            let store = store.clone();
            let key = key.clone();
            move |_unsettled| {
                let (store, key, record) = (store.clone(), key.clone(), owner_record.clone());
                async move {
                    // The owner comes back meanwhile and stores its own answer.
                    store
                        .complete(&key, token, record, Duration::from_secs(600))
                        .await
                        .expect("the committed owner still completes");
                    Ok(Some(
                        http::Response::builder()
                            .status(StatusCode::CREATED)
                            .body(Bytes::from("the hook's answer"))
                            .unwrap(),
                    ))
                }
            }
        })
        .layer(runs.handler(Duration::ZERO));
    let retry = call(&svc, post(Some("old-4"), "{\"sku\":1}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.text(), "the owner's answer");
    let again = call(&svc, post(Some("old-4"), "{\"sku\":1}")).await;
    assert_eq!(again.text(), "the owner's answer");
    assert_eq!(runs.started(), 0);
}
