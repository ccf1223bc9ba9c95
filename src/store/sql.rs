//! What the SQL stores share: table names, durations in microseconds, the sweep loop, and
//! turning the values of a row into a [`Claim`] or a [`KeyState`].

use std::sync::Arc;
use std::time::Duration;

use super::{Claim, KeyState, LeaseToken, ORPHAN_RETENTION, StoreError};
use crate::fingerprint::Fingerprint;
use crate::record::{DecodeError, Record};

/// A table name that is not `name` or `schema.name`, each part matching
/// `[A-Za-z_][A-Za-z0-9_]*` and no longer than the database allows (63 bytes on
/// PostgreSQL, 64 on MySQL and MariaDB).
///
/// The stores' `table` setters do not panic on a bad name: the store keeps it, and
/// `migrate` and every operation then fail with [`StoreError::Backend`] wrapping this
/// error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid idempotency table name {name:?}: expected `name` or `schema.name` of [A-Za-z_][A-Za-z0-9_]* (at most {max} bytes each)"
)]
pub struct InvalidTableName {
    name: String,
    max: usize,
}

impl InvalidTableName {
    /// The name that was refused.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Splits a valid table name into its schema (if any) and table parts, each at most `max`
/// bytes of `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn split_table(
    name: &str,
    max: usize,
) -> Result<(Option<&str>, &str), InvalidTableName> {
    let valid_part = |part: &str| {
        let mut bytes = part.bytes();
        matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && part.len() <= max
    };
    let (schema, table) = match name.split_once('.') {
        Some((schema, table)) => (Some(schema), table),
        None => (None, name),
    };
    if !valid_part(table) || !schema.is_none_or(valid_part) {
        return Err(InvalidTableName {
            name: name.to_owned(),
            max,
        });
    }
    Ok((schema, table))
}

/// `{stem}{suffix}`, or, when that passes `max` bytes, `stem` cut short and followed by `_`
/// and eight hex digits of its SHA-256: two long stems that share a prefix still give two
/// names. `stem` is ASCII (a checked table name).
pub(crate) fn derived_name(stem: &str, suffix: &str, max: usize) -> String {
    use sha2::Digest as _;
    if stem.len() + suffix.len() <= max {
        return format!("{stem}{suffix}");
    }
    let digest = sha2::Sha256::digest(stem.as_bytes());
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    let cut = &stem[..max - suffix.len() - 1 - hash.len()];
    format!("{cut}_{hash}{suffix}")
}

/// Durations are capped at [`MAX_DURATION`](super::MAX_DURATION), as on every store, far
/// inside both databases' time ranges.
const MAX_MICROS: u128 = super::MAX_DURATION.as_secs() as u128 * 1_000_000;

/// `d` in microseconds, capped at [`MAX_DURATION`](super::MAX_DURATION).
/// What both SQL stores are built with, and their defaults: the table
/// `idempotency_records`, swept every 60 seconds in batches of 1000 rows.
#[derive(Clone)]
pub(crate) struct Settings<P> {
    pub(crate) pool: P,
    pub(crate) table: String,
    pub(crate) sweep_batch: u32,
    pub(crate) sweep_interval: Duration,
}

impl<P> Settings<P> {
    pub(crate) fn new(pool: P) -> Self {
        Self {
            pool,
            table: "idempotency_records".to_owned(),
            sweep_batch: 1000,
            sweep_interval: Duration::from_secs(60),
        }
    }

    /// At least one row per sweep statement.
    pub(crate) fn set_sweep_batch(&mut self, rows: u32) {
        self.sweep_batch = rows.max(1);
    }

    /// Clamped to [`MAX_DURATION`](super::MAX_DURATION); zero turns the sweeper off.
    pub(crate) fn set_sweep_interval(&mut self, interval: Duration) {
        self.sweep_interval = super::clamp_duration(interval);
    }
}

pub(crate) fn micros(d: Duration) -> i64 {
    // Capped well below i64::MAX, so the cast is lossless.
    d.as_micros().min(MAX_MICROS) as i64
}

/// How often a claim that lost a race to a concurrent one is run again before giving up.
pub(crate) const CLAIM_ATTEMPTS: usize = 16;

/// A claim ran again and again and always lost a race to concurrent claims.
#[derive(Debug, thiserror::Error)]
#[error("the claim of an idempotency key kept losing races to concurrent claims")]
pub(crate) struct ClaimContention;

/// What a claim statement read: whether it took the key, and the row it found.
pub(crate) struct ClaimRow {
    pub(crate) acquired: bool,
    pub(crate) fingerprint: Vec<u8>,
    pub(crate) record: Option<Vec<u8>>,
    /// Microseconds until the lease ends (a committed claim: its `lease_until`).
    pub(crate) rest: Option<i64>,
    pub(crate) committed: bool,
    /// The token that holds the key (none once completed, or for a claim just taken).
    pub(crate) token: Option<Vec<u8>>,
}

impl ClaimRow {
    pub(crate) fn into_claim(self, token: LeaseToken) -> Result<Claim, StoreError> {
        if self.acquired {
            return Ok(Claim::Acquired(token));
        }
        if let Some(bytes) = self.record {
            let record = Record::decode(&bytes).map_err(StoreError::Decode)?;
            return Ok(Claim::Completed(Arc::new(record)));
        }
        let fingerprint = fingerprint_of(self.fingerprint)?;
        if self.committed && self.rest.is_none_or(|us| us <= 0) {
            let owner: [u8; 16] = self
                .token
                .and_then(|t| t.try_into().ok())
                .ok_or(StoreError::Decode(DecodeError::Invalid("committed token")))?;
            return Ok(Claim::OutcomeUnknown {
                fingerprint,
                token: LeaseToken::from_bytes(owner),
            });
        }
        Ok(Claim::InFlight {
            fingerprint,
            lease_remaining: self.rest.map(|us| Duration::from_micros(us.max(0) as u64)),
        })
    }
}

/// What an inspect statement read of a row.
pub(crate) struct StateRow {
    pub(crate) record: Option<Vec<u8>>,
    pub(crate) fingerprint: Vec<u8>,
    pub(crate) committed: bool,
    /// Microseconds until `expires_at` (negative once past).
    pub(crate) expires: Option<i64>,
    /// Microseconds until `lease_until`.
    pub(crate) lease: Option<i64>,
}

impl StateRow {
    pub(crate) fn into_state(self) -> Result<KeyState, StoreError> {
        let expires_in = micros_left(self.expires);
        if let Some(bytes) = self.record {
            return Ok(match expires_in {
                Some(_) => KeyState::Completed {
                    record: Arc::new(Record::decode(&bytes).map_err(StoreError::Decode)?),
                    expires_in,
                },
                None => KeyState::Free,
            });
        }
        let fingerprint = fingerprint_of(self.fingerprint)?;
        if self.committed {
            return Ok(match (expires_in, micros_left(self.lease)) {
                (None, _) => KeyState::Free,
                (Some(_), None) => KeyState::OutcomeUnknown {
                    fingerprint,
                    expires_in,
                },
                (Some(_), Some(lease_remaining)) => KeyState::InFlight {
                    fingerprint,
                    lease_remaining,
                    committed: true,
                },
            });
        }
        // A lapsed claim nobody took over is kept for its owner (ORPHAN_RETENTION).
        if self
            .expires
            .is_some_and(|us| us <= -(ORPHAN_RETENTION.as_micros() as i64))
        {
            return Ok(KeyState::Free);
        }
        Ok(KeyState::InFlight {
            fingerprint,
            lease_remaining: expires_in.unwrap_or(Duration::ZERO),
            committed: false,
        })
    }
}

fn fingerprint_of(bytes: Vec<u8>) -> Result<Fingerprint, StoreError> {
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Decode(DecodeError::Invalid("fingerprint")))?;
    Ok(Fingerprint::from_bytes(bytes))
}

fn micros_left(us: Option<i64>) -> Option<Duration> {
    us.filter(|us| *us > 0)
        .map(|us| Duration::from_micros(us.unsigned_abs()))
}

/// Logs the result of a background sweep.
/// One page of `list` from the rows of a keyset query that asked for `size` rows: each
/// row's stored key and its state as read. A key that is not a store key is skipped (but
/// still moves the cursor); a record that cannot be read is counted as unreadable.
pub(crate) fn list_page(
    rows: Vec<(String, Result<KeyState, StoreError>)>,
    filter: &super::ListFilter,
    size: usize,
) -> Result<super::ListPage, StoreError> {
    let scanned = rows.len() as u64;
    let full = rows.len() == size;
    let mut last = None;
    let mut entries = Vec::new();
    let mut unreadable = Vec::new();
    for (key, state) in rows {
        if let Some(store_key) = crate::key::StoreKey::from_stored(&key) {
            match state {
                Ok(state) if filter.matches(&state) => {
                    entries.push(super::ListedKey::new(store_key, state));
                }
                Ok(_) => {}
                Err(StoreError::Decode(_)) => unreadable.push(store_key),
                Err(err) => return Err(err),
            }
        }
        last = Some(key);
    }
    let next = full.then(|| last.map(super::Cursor::new)).flatten();
    Ok(super::ListPage::new(entries, scanned, next).with_unreadable(unreadable))
}

pub(crate) fn log_sweep(result: Result<u64, StoreError>) {
    match result {
        Ok(0) => {}
        Ok(n) => tracing::debug!(rows = n, "swept expired idempotency records"),
        Err(err) => tracing::warn!(
            error = &err as &dyn std::error::Error,
            "idempotency sweep failed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated() {
        assert_eq!(split_table("records", 63), Ok((None, "records")));
        assert_eq!(split_table("app.Keys_1", 63), Ok((Some("app"), "Keys_1")));
        assert_eq!(split_table("_x", 63), Ok((None, "_x")));
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "1abc",
            "a-b",
            "a.b.c",
            "a\"b",
            "a`b",
            "a;drop table x",
            "tâble",
            &"x".repeat(64),
        ] {
            assert_eq!(
                split_table(bad, 63),
                Err(InvalidTableName {
                    name: bad.to_owned(),
                    max: 63
                }),
                "{bad:?}"
            );
        }
        assert!(split_table(&"x".repeat(64), 64).is_ok());
        let err = split_table("a-b", 64).unwrap_err();
        assert!(err.to_string().contains("at most 64 bytes"), "{err}");
    }

    #[test]
    fn long_derived_names_sharing_a_prefix_stay_distinct() {
        assert_eq!(derived_name("t", "_claim", 64), "t_claim");
        let prefix = "orders_idempotency_records_for_the_billing_servi"; // 48 bytes
        let a = derived_name(&format!("{prefix}ce_a"), "_expires_at_idx", 63);
        let b = derived_name(&format!("{prefix}ce_b"), "_expires_at_idx", 63);
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert_eq!(name.len(), 63, "{name}");
            assert!(name.starts_with(&prefix[..30]) && name.ends_with("_expires_at_idx"));
        }
    }

    #[test]
    fn durations_are_capped() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(micros(Duration::MAX), MAX_MICROS as i64);
    }
}
