//! The smallest in-memory store `cratestack-axum`'s layer can run on.
//!
//! The crate defines the `IdempotencyStore` trait and ships no implementation of it
//! outside its SQL backend: this one keeps the rows in a `Mutex`-guarded map, principal
//! first, so that a look-up borrows the request's strings instead of allocating a key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use cratestack_axum::idempotency::{IdempotencyRecord, IdempotencyStore, ReservationOutcome};
use cratestack_core::CratestackError;
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
    rows: Mutex<HashMap<String, HashMap<String, Row>>>,
}

impl MemoryStore {
    fn with_row<T>(&self, principal: &str, key: &str, f: impl FnOnce(&mut Row) -> T) -> Option<T> {
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        rows.get_mut(principal)?.get_mut(key).map(f)
    }
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
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        let by_key = match rows.get_mut(principal) {
            Some(by_key) => by_key,
            None => rows.entry(principal.to_owned()).or_default(),
        };
        if let Some(row) = by_key.get_mut(key)
            && row.expires_at > now
        {
            return Ok(if row.request_hash != request_hash {
                ReservationOutcome::Conflict
            } else {
                match &row.record {
                    Some(record) => ReservationOutcome::Replay(record.clone()),
                    None => ReservationOutcome::InFlight,
                }
            });
        }
        // Free, or expired: a new reservation with a new token.
        let token = Uuid::new_v4();
        let row = Row {
            token,
            request_hash,
            created_at: now,
            expires_at,
            record: None,
        };
        match by_key.get_mut(key) {
            Some(slot) => *slot = row,
            None => {
                by_key.insert(key.to_owned(), row);
            }
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
        self.with_row(principal, key, |row| {
            if row.token == token && row.record.is_none() {
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
        });
        Ok(())
    }

    async fn release(
        &self,
        principal: &str,
        key: &str,
        token: Uuid,
    ) -> Result<(), CratestackError> {
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(by_key) = rows.get_mut(principal)
            && by_key.get(key).is_some_and(|row| row.token == token)
        {
            by_key.remove(key);
        }
        Ok(())
    }
}
