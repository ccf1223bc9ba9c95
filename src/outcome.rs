//! What the layer did with a request, and the answers it gives of its own.

use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::body::IdempotencyBody;
use crate::config::Config;
use crate::policy::{is_replayable_header, storable_headers};
use crate::problem::Problem;
use crate::record::Record;

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

/// An answer of the layer's own: a problem body, or a gRPC status for gRPC requests.
pub(crate) fn problem<B>(
    config: &Config,
    grpc: bool,
    problem: Problem,
    outcome: IdempotencyOutcome,
) -> Response<IdempotencyBody<B>> {
    let res = problem
        .into_response_cached(grpc, &config.type_base, config.link, Some(&config.problems))
        .map(|b| IdempotencyBody::full(b, None));
    mark(res, outcome)
}

/// Puts the outcome in the response's extensions.
pub(crate) fn mark<B>(mut res: Response<B>, outcome: IdempotencyOutcome) -> Response<B> {
    res.extensions_mut().insert(outcome);
    res
}

/// The headers a replay of `record` carries: the stored ones, less any field a record
/// must not hold (the layer never stores one, but a record made by hand, settled by an
/// operator, written by an older version or damaged may), with framing from the body
/// itself, never from the record:
///
/// - `Content-Length` is the body's length when the body is not empty, has no trailers
///   and the status allows content (not 1xx, `204`, `304`);
/// - otherwise there is none: an empty body (an answer to `HEAD`, a `204`, a `304`, a
///   trailers-only gRPC answer) and a body with trailers are framed by the server from the
///   body's size (hyper sends `content-length: 0` for an empty body where one belongs, and
///   chunks or DATA frames for trailers);
/// - `Transfer-Encoding` is never replayed.
pub(crate) fn replay_headers(record: &Record) -> HeaderMap {
    let stored = record.headers();
    let mut headers = if stored.keys().all(is_replayable_header) {
        stored.clone()
    } else {
        storable_headers(stored, |_| true)
    };
    let status = record.status();
    let has_content = !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED);
    if has_content && record.trailers().is_none() && !record.body().is_empty() {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(record.body().len()));
    }
    headers
}
