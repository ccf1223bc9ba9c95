//! What the layer did with a request ([`IdempotencyOutcome`]), as every covered response
//! carries it in its extensions.

use http::{HeaderName, Response};

/// The header that marks a replayed response: `Idempotent-Replayed: true`.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

/// What the layer did with a request; found in the response's extensions for every covered
/// request.
///
/// ```
/// use tower_idempotency::IdempotencyOutcome;
///
/// fn log(res: &http::Response<()>) {
///     if res.extensions().get::<IdempotencyOutcome>() == Some(&IdempotencyOutcome::Replayed) {
///         println!("served from the idempotency store");
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencyOutcome {
    /// The request was covered but had no key and keys are optional: it ran unprotected.
    PassedThrough,
    /// The operation ran for the first time.
    Executed,
    /// The stored outcome was replayed.
    Replayed,
    /// Another request with the key is in flight: `409`.
    InFlight,
    /// The key was used with another payload: `422`.
    Mismatch,
    /// The request was refused before anything ran (bad key, body too large): `400`/`413`.
    Rejected,
    /// The operation ran before but its response was too large to keep: `410`.
    NotStored,
    /// The store failed and the layer fails closed: `503`.
    StoreUnavailable,
    /// The store had no room for a new key without forgetting recent records: `503`.
    StoreFull,
    /// The store failed and the layer fails open: the request ran unprotected.
    Unprotected,
    /// The operation ran before, but its stored outcome cannot be read: `500`, and it does
    /// not run again.
    RecordUnreadable,
    /// The operation passed its commit point and no outcome was stored: `500
    /// outcome-unknown`, and it does not run again.
    OutcomeUnknown,
    /// The operation's outcome was unknown; the layer's recovery hook
    /// ([`IdempotencyLayer::recover_with`](crate::IdempotencyLayer::recover_with)) rebuilt
    /// it, and it was stored and replayed (with `Idempotent-Replayed: true`).
    Recovered,
}

impl IdempotencyOutcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::PassedThrough => "passed_through",
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::InFlight => "in_flight",
            Self::Mismatch => "mismatch",
            Self::Rejected => "rejected",
            Self::NotStored => "not_stored",
            Self::StoreUnavailable => "store_unavailable",
            Self::StoreFull => "store_full",
            Self::Unprotected => "unprotected",
            Self::RecordUnreadable => "record_unreadable",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::Recovered => "recovered",
        }
    }
}

/// Puts the outcome in the response's extensions.
pub(crate) fn mark<B>(mut res: Response<B>, outcome: IdempotencyOutcome) -> Response<B> {
    res.extensions_mut().insert(outcome);
    res
}

/// [`mark`], on `spare` emptied and made the response's extensions (those the response
/// had kept): a request's extensions, whose map is already allocated, serve an answer the
/// layer writes in the request's place.
pub(crate) fn mark_reusing<B>(
    mut res: Response<B>,
    outcome: IdempotencyOutcome,
    mut spare: http::Extensions,
) -> Response<B> {
    spare.clear();
    spare.extend(std::mem::take(res.extensions_mut()));
    spare.insert(outcome);
    *res.extensions_mut() = spare;
    res
}
