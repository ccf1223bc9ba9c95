//! How to write an idempotency store of your own, and how to test it.
//!
//! `LockedMapStore` keeps everything in one `HashMap` behind a mutex: simple, correct, and a
//! template for a backend of your own (a database, a cache, a key-value service). Each method
//! answers one question of the store contract; the comments say what the layer relies on.
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
use tower_idempotency::store::{
    Claim, KeyState, LeaseToken, ORPHAN_RETENTION, Record, StoreKey, clamp_duration, takeover_grace,
};
use tower_idempotency::{Fingerprint, IdempotencyStore, StoreError};

/// What a key holds.
#[derive(Debug)]
enum Entry {
    /// Someone runs the operation and owns the key until `until`.
    Claimed {
        token: LeaseToken,
        fingerprint: Fingerprint,
        until: Instant,
        /// A claim found the lease lapsed and gave the owner a grace period.
        contested: bool,
        /// Past its commit point, kept until then: never taken over nor released.
        committed_until: Option<Instant>,
    },
    /// The operation ran; its record is replayed until `until`.
    Done { record: Arc<Record>, until: Instant },
}

impl Entry {
    /// Until when the entry answers claims (a lease or a TTL).
    fn until(&self) -> Instant {
        match self {
            Entry::Claimed { until, .. } | Entry::Done { until, .. } => *until,
        }
    }

    /// Until when the entry must be kept: a lapsed claim stays a while for its owner, a
    /// committed one until its commit expires.
    fn kept_until(&self) -> Instant {
        match self {
            Entry::Claimed {
                until,
                committed_until: Some(committed),
                ..
            } => (*committed).max(*until),
            Entry::Claimed { until, .. } => *until + ORPHAN_RETENTION,
            Entry::Done { until, .. } => *until,
        }
    }

    /// A committed claim whose lease ended: its outcome is unknown until settled. Its
    /// fingerprint, token and how long it is kept.
    fn unknown(&self, now: Instant) -> Option<(Fingerprint, LeaseToken, Instant)> {
        match self {
            Entry::Claimed {
                fingerprint,
                token,
                until,
                committed_until: Some(committed),
                ..
            } if *until <= now && *committed > now => Some((*fingerprint, *token, *committed)),
            _ => None,
        }
    }
}

/// A store on a mutex-guarded map.
#[derive(Debug, Clone, Default)]
pub struct LockedMapStore {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

impl LockedMapStore {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic elsewhere cannot leave the map half-updated: every change is one insert or
        // remove, so a poisoned lock is safe to use.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the entry `token` owns, or answers `LeaseLost`.
    fn owned(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        f: impl FnOnce(&mut HashMap<String, Entry>),
    ) -> Result<(), StoreError> {
        let mut entries = self.entries();
        match entries.get(key.as_str()) {
            // Fencing by token, not by clock: the owner may act even after its lease ran
            // out, as long as no other claim took the key over (which replaces the token).
            Some(Entry::Claimed { token: owner, .. }) if *owner == token => {
                f(&mut entries);
                Ok(())
            }
            _ => Err(StoreError::LeaseLost),
        }
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
        let now = Instant::now();
        let mut entries = self.entries();
        // Expiry without a cron job: now and then, drop every entry past its keeping.
        if entries.len() % 1024 == 1023 {
            entries.retain(|_, e| e.kept_until() > now);
        }
        // A committed claim is never taken over: once its lease ends (its owner crashed or
        // let go), its outcome is unknown.
        if let Some((fingerprint, token, _)) =
            entries.get(key.as_str()).and_then(|e| e.unknown(now))
        {
            return Ok(Claim::OutcomeUnknown { fingerprint, token });
        }
        // Expired entries are invisible: treat them as absent.
        // A lapsed lease is contested once before it is taken over: the owner may only be
        // cut off from the store, and gets `takeover_grace` to extend it.
        if let Some(Entry::Claimed {
            fingerprint,
            until,
            contested: contested @ false,
            committed_until: None,
            ..
        }) = entries.get_mut(key.as_str())
            && *until <= now
        {
            *contested = true;
            *until = now + takeover_grace(lease);
            return Ok(Claim::InFlight {
                fingerprint: *fingerprint,
                lease_remaining: Some(takeover_grace(lease)),
            });
        }
        match entries.get(key.as_str()).filter(|e| e.until() > now) {
            Some(Entry::Claimed {
                fingerprint, until, ..
            }) => Ok(Claim::InFlight {
                fingerprint: *fingerprint,
                lease_remaining: Some(*until - now),
            }),
            Some(Entry::Done { record, .. }) => Ok(Claim::Completed(Arc::clone(record))),
            None => {
                // Atomic: the check and the insert happen under one lock. The token is the
                // caller's, so a caller whose reply got lost can still release the claim.
                entries.insert(
                    key.as_str().to_owned(),
                    Entry::Claimed {
                        token,
                        fingerprint: *fingerprint,
                        // Durations are clamped to MAX_DURATION, as every store does: a lease of
                        // Duration::MAX must not overflow the clock.
                        until: now + clamp_duration(lease),
                        contested: false,
                        committed_until: None,
                    },
                );
                Ok(Claim::Acquired(token))
            }
        }
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.owned(key, token, |entries| {
            entries.insert(
                key.as_str().to_owned(),
                Entry::Done {
                    record: Arc::new(record),
                    until: Instant::now() + clamp_duration(ttl),
                },
            );
        })
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let mut committed = false;
        self.owned(key, token, |entries| {
            // A committed claim is not freed: its owner lets go (the lease ends now), and
            // the key reads as outcome unknown.
            if let Some(Entry::Claimed {
                until,
                committed_until: Some(_),
                ..
            }) = entries.get_mut(key.as_str())
            {
                *until = (*until).min(Instant::now());
                committed = true;
            } else {
                entries.remove(key.as_str());
            }
        })?;
        if committed {
            Err(StoreError::Committed)
        } else {
            Ok(())
        }
    }

    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        // Committed or not, the token's claim goes: the key is free.
        self.owned(key, token, |entries| {
            entries.remove(key.as_str());
        })
    }

    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let keep = Instant::now() + clamp_duration(ttl);
        self.owned(key, token, |entries| {
            if let Some(Entry::Claimed {
                contested,
                committed_until,
                ..
            }) = entries.get_mut(key.as_str())
            {
                *contested = false;
                *committed_until = Some(committed_until.map_or(keep, |c| c.max(keep)));
            }
        })
    }

    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut entries = self.entries();
        let Some((_, _, kept_until)) = entries.get(key.as_str()).and_then(|e| e.unknown(now))
        else {
            return Ok(false);
        };
        // Settling never shortens what the commit was kept for.
        entries.insert(
            key.as_str().to_owned(),
            Entry::Done {
                record: Arc::new(record),
                until: (now + clamp_duration(ttl)).max(kept_until),
            },
        );
        Ok(true)
    }

    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        let now = Instant::now();
        let entries = self.entries();
        let Some(entry) = entries.get(key.as_str()).filter(|e| e.kept_until() > now) else {
            return Ok(KeyState::Free);
        };
        if let Some((fingerprint, _, _)) = entry.unknown(now) {
            return Ok(KeyState::OutcomeUnknown {
                fingerprint,
                expires_in: Some(entry.kept_until() - now),
            });
        }
        Ok(match entry {
            Entry::Claimed {
                fingerprint,
                until,
                committed_until,
                ..
            } => KeyState::InFlight {
                fingerprint: *fingerprint,
                lease_remaining: until.saturating_duration_since(now),
                committed: committed_until.is_some(),
            },
            Entry::Done { record, until } => KeyState::Completed {
                record: Arc::clone(record),
                expires_in: Some(*until - now),
            },
        })
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let now = Instant::now();
        Ok(self
            .entries()
            .remove(key.as_str())
            .is_some_and(|e| e.kept_until() > now))
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.owned(key, token, |entries| {
            if let Some(Entry::Claimed {
                until, contested, ..
            }) = entries.get_mut(key.as_str())
            {
                // A committed claim keeps its commit's expiry (`kept_until` takes the
                // later of the two).
                *until = Instant::now() + clamp_duration(lease);
                *contested = false;
            }
        })
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
