//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`);
//! without the feature every function here is empty and compiles away.
//!
//! | Name | Kind | Labels | What |
//! |---|---|---|---|
//! | `idempotency_requests_total` | counter | `outcome` | covered requests, by `IdempotencyOutcome` (`executed`, `replayed`, `in_flight`, `mismatch`, `outcome_unknown`, …) |
//! | `idempotency_store_call_duration_seconds` | histogram | `op`, `backend`, `result` | each store call the layer makes (`claim`, `wait`, `complete`, `release`, `extend`, `commit`, `settle`), by [`backend_name`](crate::IdempotencyStore::backend_name); `result` is `ok` or `error` |
//! | `idempotency_lost_leases_total` | counter | | an operation found its key taken over when it came to store its outcome |
//! | `idempotency_replay_cache_hits_total` | counter | | a retry answered from the replay cache ([`IdempotencyLayer::cache_replays`](crate::IdempotencyLayer::cache_replays)), with no store call |
//! | `idempotency_completion_retries_total` | counter | | failed attempts to store an outcome that were retried |
//! | `idempotency_orphan_releases_total` | counter | | claims released after their reply was lost |
//! | `idempotency_unknown_outcomes_total` | counter | | committed operations that ended without a stored outcome |
//! | `idempotency_recoveries_total` | counter | `result` | recovery hook runs: `recovered`, `none`, `error` |
//! | `idempotency_memory_evictions_total` | counter | | records the memory store evicted past their replay window |
//! | `idempotency_memory_bytes` | gauge | | bytes the memory store holds |
//! | `idempotency_memory_entries` | gauge | | entries the memory store holds |
//!
//! The layer records into whatever recorder the application installed (for example
//! `metrics-exporter-prometheus`); with none, recording costs a few loads.

use crate::outcome::IdempotencyOutcome;
use crate::store::{IdempotencyStore, StoreError};

/// Times one store call.
pub(crate) struct Timer {
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
}

impl Timer {
    pub(crate) fn start() -> Self {
        Self {
            #[cfg(feature = "metrics")]
            started: std::time::Instant::now(),
        }
    }

    /// Records the call's latency.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn store_call<T>(
        self,
        store: &dyn IdempotencyStore,
        op: &'static str,
        result: &Result<T, StoreError>,
    ) {
        self.store_call_ended(store, op, result.is_ok());
    }

    /// Records the call's latency, given whether it succeeded.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn store_call_ended(self, store: &dyn IdempotencyStore, op: &'static str, ok: bool) {
        #[cfg(feature = "metrics")]
        metrics::histogram!(
            "idempotency_store_call_duration_seconds",
            "op" => op,
            "backend" => store.backend_name(),
            "result" => if ok { "ok" } else { "error" },
        )
        .record(self.started.elapsed().as_secs_f64());
    }
}

/// A covered request ended with `outcome`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn outcome(outcome: IdempotencyOutcome) {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_requests_total", "outcome" => outcome.as_str()).increment(1);
}

macro_rules! counters {
    ($($(#[$doc:meta])* $fn:ident => $name:literal;)*) => {
        $(
            $(#[$doc])*
            pub(crate) fn $fn() {
                #[cfg(feature = "metrics")]
                metrics::counter!($name).increment(1);
            }
        )*
    };
}

counters! {
    /// An operation's key was taken over before its outcome was stored.
    lost_lease => "idempotency_lost_leases_total";
    /// A failed attempt to store an outcome is retried.
    completion_retry => "idempotency_completion_retries_total";
    /// A claim whose reply was lost was released.
    orphan_release => "idempotency_orphan_releases_total";
    /// A committed operation ended without a stored outcome.
    unknown_outcome => "idempotency_unknown_outcomes_total";
    /// A retry was answered from the replay cache, without a store call.
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    replay_cache_hit => "idempotency_replay_cache_hits_total";
}

/// A recovery hook ran: `recovered`, `none` or `error`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn recovery(result: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_recoveries_total", "result" => result).increment(1);
}

/// The memory store evicted a record, and now holds `bytes` in `entries`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
#[cfg_attr(not(feature = "memory"), allow(dead_code))]
pub(crate) fn memory_eviction() {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_memory_evictions_total").increment(1);
}

/// The memory store's size.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
#[cfg_attr(not(feature = "memory"), allow(dead_code))]
pub(crate) fn memory_size(bytes: usize, entries: usize) {
    #[cfg(feature = "metrics")]
    {
        metrics::gauge!("idempotency_memory_bytes").set(bytes as f64);
        metrics::gauge!("idempotency_memory_entries").set(entries as f64);
    }
}
