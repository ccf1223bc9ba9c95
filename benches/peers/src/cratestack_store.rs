//! The fastest in-memory store we can write for `cratestack-axum`'s layer.
//!
//! The crate defines the `IdempotencyStore` trait and ships no implementation of it outside
//! its SQL backend. As DESIGN.md asks of a peer without a memory store, this one is the
//! fastest we can write: a `DashMap` of principals, each a `DashMap` of rows (a look-up
//! borrows the request's strings instead of allocating a key), read-locked first (a replay
//! or a duplicate takes no write lock), and tokens from a counter mixed with random bits
//! drawn once, not from the operating system's randomness on every reservation.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use cratestack_axum::idempotency::{IdempotencyRecord, IdempotencyStore, ReservationOutcome};
use cratestack_core::CratestackError;
use dashmap::DashMap;
use uuid::Uuid;

struct Row {
    token: Uuid,
    request_hash: [u8; 32],
    created_at: SystemTime,
    expires_at: SystemTime,
    /// `None` while the first request runs.
    record: Option<IdempotencyRecord>,
}

/// Rows by principal, then by key.
#[derive(Default)]
pub struct MemoryStore {
    rows: DashMap<String, DashMap<String, Row>>,
}

/// A token no other reservation of the process gets: a counter in the low bits, 64 random
/// bits drawn once in the high ones.
fn new_token() -> Uuid {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| Uuid::new_v4().as_u64_pair().0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Uuid::from_u64_pair(seed, n)
}

/// What a row answers a reservation: `None` when it is free (expired).
fn answer(row: &Row, request_hash: &[u8; 32], now: SystemTime) -> Option<ReservationOutcome> {
    if row.expires_at <= now {
        return None;
    }
    Some(if row.request_hash != *request_hash {
        ReservationOutcome::Conflict
    } else {
        match &row.record {
            Some(record) => ReservationOutcome::Replay(record.clone()),
            None => ReservationOutcome::InFlight,
        }
    })
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn reserve_or_fetch(
        &self,
        principal: &str,
        key: &str,
        request_hash: [u8; 32],
        expires_at: SystemTime,
    ) -> Result<ReservationOutcome, CratestackError> {
        let now = SystemTime::now();
        let by_key = match self.rows.get(principal) {
            Some(by_key) => by_key,
            None => self
                .rows
                .entry(principal.to_owned())
                .or_default()
                .downgrade(),
        };
        // A replay or a duplicate: read-locked.
        if let Some(row) = by_key.get(key)
            && let Some(outcome) = answer(&row, &request_hash, now)
        {
            return Ok(outcome);
        }
        // Free, or expired: a new reservation with a new token, unless another request
        // reserved the key between the look-up and the write lock.
        let token = new_token();
        let row = Row {
            token,
            request_hash,
            created_at: now,
            expires_at,
            record: None,
        };
        match by_key.get_mut(key) {
            Some(mut slot) => {
                if let Some(outcome) = answer(&slot, &request_hash, now) {
                    return Ok(outcome);
                }
                *slot = row;
            }
            None => match by_key.entry(key.to_owned()) {
                dashmap::Entry::Occupied(slot) => {
                    if let Some(outcome) = answer(slot.get(), &request_hash, now) {
                        return Ok(outcome);
                    }
                    *slot.into_ref() = row;
                }
                dashmap::Entry::Vacant(slot) => {
                    slot.insert(row);
                }
            },
        }
        Ok(ReservationOutcome::Reserved { token })
    }

    async fn complete(
        &self,
        principal: &str,
        key: &str,
        token: Uuid,
        status: u16,
        headers: &[u8],
        body: &[u8],
    ) -> Result<(), CratestackError> {
        if let Some(by_key) = self.rows.get(principal)
            && let Some(mut row) = by_key.get_mut(key)
            && row.token == token
            && row.record.is_none()
        {
            row.record = Some(IdempotencyRecord {
                key: key.to_owned(),
                principal_fingerprint: principal.to_owned(),
                request_hash: row.request_hash,
                response_status: status,
                response_headers: headers.to_vec(),
                response_body: body.to_vec(),
                created_at: row.created_at,
                expires_at: row.expires_at,
            });
        }
        Ok(())
    }

    async fn release(
        &self,
        principal: &str,
        key: &str,
        token: Uuid,
    ) -> Result<(), CratestackError> {
        if let Some(by_key) = self.rows.get(principal) {
            by_key.remove_if(key, |_, row| row.token == token);
        }
        Ok(())
    }
}
