//! How to write an idempotency store of your own, and how to test it.
//!
//! `LockedMapStore` keeps every key's [`Slot`] in one `HashMap` behind a mutex. It does not
//! write the store contract itself: each method loads a key's slot, applies one transition of
//! [`tower_idempotency::store::machine`] (the same functions `MemoryStore` executes and the
//! protocol model checks), and writes the slot back, all under one lock. A backend of your own
//! (a database, a cache, a key-value service) does the same with whatever makes its
//! read-modify-write atomic: a row lock, a transaction, a compare-and-swap on a version. It
//! then only has to store a slot: a token, a fingerprint, two moments and a flag while held;
//! a record (`Record::encode`) and its expiry once completed.
//!
//! To check it, run the conformance suite on it; this repository does so in
//! `tests/backends/conformance_custom.rs`:
//!
//! ```text
//! async fn make_store() -> Option<LockedMapStore> { Some(LockedMapStore::default()) }
//! tower_idempotency::store_conformance_tests!(locked_map_store, make_store);
//! ```
//!
//! Run the example itself with `cargo run --example custom_store`: it serves one protected
//! route on `LISTEN_ADDR` (default `127.0.0.1:3002`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower_idempotency::async_trait;
use tower_idempotency::store::machine::{self, Slot};
use tower_idempotency::store::{Claim, KeyState, LeaseToken, Record, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyStore, StoreError};

/// What a key holds, on the store's clock.
type KeySlot = Slot<Arc<Record>, Instant>;

/// A store on a mutex-guarded map.
#[derive(Debug, Clone, Default)]
pub struct LockedMapStore {
    slots: Arc<Mutex<HashMap<String, KeySlot>>>,
}

impl LockedMapStore {
    /// Runs one transition on the slot of `key` atomically, at one "now", and keeps what it
    /// leaves (a free slot is not kept).
    fn with_slot<T>(&self, key: &StoreKey, f: impl FnOnce(&mut KeySlot, Instant) -> T) -> T {
        // A panic elsewhere cannot leave a slot half-updated (each is replaced whole), so a
        // poisoned lock is safe to use.
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Expiry without a cron job: now and then, forget every slot past its keeping.
        if slots.len() % 1024 == 1023 {
            slots.retain(|_, slot| slot.gone_at().is_some_and(|at| at > now));
        }
        let mut slot = slots.remove(key.as_str()).unwrap_or_default();
        let out = f(&mut slot, now);
        if !matches!(slot, Slot::Free) {
            slots.insert(key.as_str().to_owned(), slot);
        }
        out
    }
}

#[async_trait]
impl IdempotencyStore for LockedMapStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let claimed = self.with_slot(key, |slot, now| {
            machine::claim(slot, now, fingerprint, token, lease)
        });
        Ok(claimed.into_claim(token))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let record = Arc::new(record);
        self.with_slot(key, |slot, now| {
            machine::complete(slot, now, token, record, ttl)
        })
        .map_err(|_| StoreError::LeaseLost)
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        Ok(self.with_slot(key, |slot, now| machine::release(slot, now, token))?)
    }

    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        Ok(self.with_slot(key, |slot, _| machine::revoke(slot, token))?)
    }

    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        Ok(self.with_slot(key, |slot, now| machine::commit(slot, now, token, ttl))?)
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        Ok(self.with_slot(key, |slot, now| machine::extend(slot, now, token, lease))?)
    }

    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let record = Arc::new(record);
        Ok(self
            .with_slot(key, |slot, now| machine::settle(slot, now, record, ttl))
            .is_ok())
    }

    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        Ok(self.with_slot(key, |slot, now| machine::inspect(slot, now)))
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        Ok(self.with_slot(key, machine::purge))
    }

    // `wait` keeps the trait's default, which polls `claim` with a growing pause.
}

#[allow(dead_code)]
#[tokio::main]
async fn main() {
    use axum::{Router, routing::post};
    // `RUST_LOG` chooses the events (default `info`; the layer's faults are `warn`).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    use tower_idempotency::IdempotencyLayer;

    let app: Router = Router::new()
        .route(
            "/orders",
            post(|body: String| async move { format!("created: {body}\n") }),
        )
        // No users in this example: every caller shares one scope.
        .layer(IdempotencyLayer::new(LockedMapStore::default()).share_keys_across_callers());
    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:3002".to_owned());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("error: cannot listen on {addr}: {err}");
            std::process::exit(1);
        }
    };
    println!("custom store demo listening on http://{addr}");
    if let Err(err) = axum::serve(listener, app).await {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
