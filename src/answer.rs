//! Every answer the layer writes itself: its problems (an RFC 9457 body, or a gRPC status
//! for gRPC requests) and its replays of stored records, each marked with its
//! [`IdempotencyOutcome`].

use http::header::CONTENT_LENGTH;
use http::{Extensions, HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::IdempotencyBody;
use crate::outcome::{IdempotencyOutcome, REPLAYED_HEADER, mark_reusing};
use crate::policy::{is_replayable_header, storable_fields};
use crate::problem::{Problem, ProblemKind};
use crate::record::Record;
use crate::runtime::Runtime;

/// An answer of the layer's own: a problem body, or a gRPC status for gRPC requests.
pub(crate) fn problem<B>(
    config: &Runtime,
    grpc: bool,
    problem: Problem,
    outcome: IdempotencyOutcome,
) -> Response<IdempotencyBody<B>> {
    problem_reusing(config, grpc, problem, outcome, Extensions::new())
}

/// [`problem`], with `spare` (a request's extensions, emptied) as the response's.
pub(crate) fn problem_reusing<B>(
    config: &Runtime,
    grpc: bool,
    problem: Problem,
    outcome: IdempotencyOutcome,
    spare: Extensions,
) -> Response<IdempotencyBody<B>> {
    let res = problem
        .into_response_cached(
            grpc,
            crate::problem::Style {
                profile: config.problem_profile,
                type_base: &config.type_base,
                link: config.link,
            },
            Some(&config.problems),
        )
        .map(|b| IdempotencyBody::full(b, None));
    mark_reusing(res, outcome, spare)
}

/// The store could not be reached: `503 store-unavailable` with `Retry-After`; nothing ran.
pub(crate) fn store_unavailable<B>(config: &Runtime, grpc: bool) -> Response<IdempotencyBody<B>> {
    problem(
        config,
        grpc,
        Problem::new(
            ProblemKind::StoreUnavailable,
            "The idempotency store cannot be reached; nothing was done. Retry later.",
        )
        .retry_after(config.retry_after),
        IdempotencyOutcome::StoreUnavailable,
    )
}

/// The key was used with another payload: `422 key-reused`.
pub(crate) fn mismatch<B>(
    config: &Runtime,
    grpc: bool,
    spare: Extensions,
) -> Response<IdempotencyBody<B>> {
    let detail = "This Idempotency-Key was already used with a different request payload; \
                  use a new key for a new request.";
    problem_reusing(
        config,
        grpc,
        Problem::new(ProblemKind::KeyReused, detail),
        IdempotencyOutcome::Mismatch,
        spare,
    )
}

pub(crate) fn replay<B>(record: &Record) -> Response<IdempotencyBody<B>> {
    replay_reusing(record, Extensions::new())
}

/// [`replay`], with `spare` (a request's extensions, emptied) as the response's: no map to
/// allocate for the outcome.
pub(crate) fn replay_reusing<B>(
    record: &Record,
    spare: Extensions,
) -> Response<IdempotencyBody<B>> {
    let mut res = Response::new(IdempotencyBody::full(
        record.body().clone(),
        record.trailers().cloned(),
    ));
    *res.status_mut() = record.status();
    // Made once per record where the memory store kept them with it (replayed by a
    // clone); made for this replay otherwise (a record read from a store, or one the store
    // had no room to keep them with).
    *res.headers_mut() = match record.kept_replay_headers() {
        Some(kept) => kept.clone(),
        None => replay_map(record),
    };
    mark_reusing(res, IdempotencyOutcome::Replayed, spare)
}

/// Every header a replay of `record` carries: [`replay_headers`], and the mark that it is
/// a replay.
pub(crate) fn replay_map(record: &Record) -> HeaderMap {
    // Framed by its body, never by what the record says (see `replay_headers`).
    let mut headers = replay_headers(record);
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    headers
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
    let stored = record.fields();
    let mut headers = if stored.iter().all(|(name, _)| is_replayable_header(name)) {
        // Room for the two fields a replay adds (`Content-Length`, `Idempotent-Replayed`),
        // so that neither grows the map.
        stored.to_map(2)
    } else {
        storable_fields(&stored.to_map(0), |_| true).to_map(2)
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
