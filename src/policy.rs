//! The layer's decisions: what to do without a key, with a key in flight, when the store
//! fails, when the client goes away, and which outcomes to keep.

use std::time::Duration;

use http::StatusCode;

/// What to do with a covered request that has no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingKey {
    /// Answer `400 Bad Request` (gRPC `INVALID_ARGUMENT`). The default.
    #[default]
    Required,
    /// Pass the request through unprotected.
    Optional,
    /// Assign a fresh UUID key, set it on the request for the services behind, and echo it
    /// on the response.
    Generate,
}

/// What to do with a request whose key another request still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum InFlight {
    /// Answer `409 Conflict` with `Retry-After` (gRPC `ABORTED`). The default.
    #[default]
    Reject,
    /// Wait up to this long for the first request's outcome and replay it; answer `409`
    /// when the time runs out. If the first request fails and releases the key, the waiting
    /// request runs in its place.
    Wait(Duration),
}

/// What to do when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StoreFailure {
    /// Answer `503 Service Unavailable` with `Retry-After` (gRPC `UNAVAILABLE`); nothing
    /// runs. The default.
    #[default]
    FailClosed,
    /// Run the request without protection and log a warning.
    FailOpen,
}

/// What to do when the client goes away while its operation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Disconnect {
    /// Finish the operation and its response body on a spawned task and store the outcome,
    /// so the client's retry gets the real answer. The default.
    ///
    /// A response body that never ends (an endless server stream) is then drained until it
    /// does: exclude such routes with
    /// [`cover_when`](crate::IdempotencyLayer::cover_when), or use [`Disconnect::Release`].
    #[default]
    Finish,
    /// Cancel the operation and release the key, so a retry runs it again.
    ///
    /// An answer already complete when the handler returned (its whole body ready at once)
    /// is stored before the response leaves, so a client that goes away after that gets
    /// the replay on its retry; only operations still running, or bodies still streaming,
    /// are released.
    Release,
}

/// The default storable test: every status but 5xx, 408, 409, 425 and 429, which say that
/// the request may be retried.
///
/// ```
/// use http::StatusCode;
/// use tower_idempotency::policy::default_storable;
///
/// assert!(default_storable(StatusCode::CREATED));
/// assert!(default_storable(StatusCode::UNPROCESSABLE_ENTITY));
/// assert!(!default_storable(StatusCode::TOO_MANY_REQUESTS));
/// assert!(!default_storable(StatusCode::BAD_GATEWAY));
/// ```
pub fn default_storable(status: StatusCode) -> bool {
    !(status.is_server_error() || matches!(status.as_u16(), 408 | 409 | 425 | 429))
}

/// The default storable test for gRPC responses: every status but `UNAVAILABLE` (14),
/// `INTERNAL` (13), `UNKNOWN` (2), `DEADLINE_EXCEEDED` (4), `RESOURCE_EXHAUSTED` (8),
/// `ABORTED` (10) and `CANCELLED` (1), which say that the call may be retried.
///
/// ```
/// use tower_idempotency::policy::default_grpc_storable;
///
/// assert!(default_grpc_storable(0));
/// assert!(default_grpc_storable(3)); // INVALID_ARGUMENT: the same call fails the same way
/// assert!(!default_grpc_storable(14));
/// ```
pub fn default_grpc_storable(code: u32) -> bool {
    !matches!(code, 1 | 2 | 4 | 8 | 10 | 13 | 14)
}

/// The default test of [`maybe_ran_when`](crate::IdempotencyLayer::maybe_ran_when):
/// `408 Request Timeout`, what tower-http's `TimeoutLayer` answers when it cuts a handler
/// off. The layer has read the whole request before the handler runs, so a `408` from
/// behind it means the handler was stopped midway, not that the request was slow to arrive.
///
/// ```
/// use http::StatusCode;
/// use tower_idempotency::policy::default_maybe_ran;
///
/// assert!(default_maybe_ran(StatusCode::REQUEST_TIMEOUT));
/// assert!(!default_maybe_ran(StatusCode::SERVICE_UNAVAILABLE));
/// ```
pub fn default_maybe_ran(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
}

/// The default test of
/// [`grpc_maybe_ran_when`](crate::IdempotencyLayer::grpc_maybe_ran_when):
/// `DEADLINE_EXCEEDED` (4), what a server answers when the call's deadline (its
/// `grpc-timeout`, or a timeout layer) cut the handler off midway.
///
/// ```
/// use tower_idempotency::policy::default_grpc_maybe_ran;
///
/// assert!(default_grpc_maybe_ran(4));
/// assert!(!default_grpc_maybe_ran(14));
/// ```
pub fn default_grpc_maybe_ran(code: u32) -> bool {
    code == 4
}

/// Whether a response header is stored and replayed when
/// [`replay_headers`](crate::IdempotencyLayer::replay_headers) is not set: every header but
/// the ones addressed to one caller, which a retry from another connection or session must
/// not receive: `Set-Cookie`, `Authentication-Info` and `Proxy-Authentication-Info`. (The
/// fields of the first answer's connection, which are the hop-by-hop headers and every
/// header its `Connection` names, the framing headers `Content-Length` and
/// `Transfer-Encoding`, and `Date` are never stored, whatever the setting.)
///
/// ```
/// use http::HeaderName;
/// use tower_idempotency::policy::default_replay_header;
///
/// assert!(default_replay_header(&HeaderName::from_static("location")));
/// assert!(!default_replay_header(&http::header::SET_COOKIE));
/// ```
pub fn default_replay_header(name: &http::HeaderName) -> bool {
    !(name == http::header::SET_COOKIE
        || name.as_str() == "authentication-info"
        || name.as_str() == "proxy-authentication-info")
}

/// Whether a response header can be stored at all: everything but the fields of the
/// first answer's connection (the fixed hop-by-hop set of RFC 9110 §7.6.1; the fields a
/// `Connection` header names are found by [`connection_fields`]), the framing
/// (`Content-Length`, `Transfer-Encoding`: a replay is framed by its own body) and `Date`.
/// `Trailer` is kept: it is not hop-by-hop, and an HTTP/1.1 server sends only the trailer
/// fields it names. Nor is the marker of a sealed record (`idempotency-sealed`) ever kept
/// from an answer: it is the store's, and a handler's or an upstream's own would make the
/// record pass for a sealed one that no ring opens, every retry refused.
pub(crate) fn is_replayable_header(name: &http::HeaderName) -> bool {
    use http::header;
    !(name == header::CONNECTION
        || name == crate::record::SEALED_HEADER
        || name == header::TRANSFER_ENCODING
        || name == header::CONTENT_LENGTH
        || name == header::UPGRADE
        || name == header::TE
        || name == header::PROXY_AUTHENTICATE
        || name == header::DATE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection")
}

/// The fields that the `Connection` header of `headers` names (every value, each a comma
/// separated list of field names, RFC 9110 §7.6.1): they belong to that connection alone,
/// so they are never stored nor replayed. Empty when there is no `Connection` header.
pub(crate) fn connection_fields(headers: &http::HeaderMap) -> Vec<http::HeaderName> {
    let mut names = Vec::new();
    for value in headers.get_all(http::header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            // `HeaderName::from_bytes` folds case; a token that is no field name names none.
            if let Ok(name) = http::HeaderName::from_bytes(token)
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
    }
    names
}

/// `headers` without the fields a record never keeps: [`is_replayable_header`] and the
/// fields named in `Connection` ([`connection_fields`]), and without those `wanted`
/// refuses; every other value in order, as a record keeps them (one allocation of their
/// exact size when every field is kept, the common case).
pub(crate) fn storable_fields(
    headers: &http::HeaderMap,
    wanted: impl Fn(&http::HeaderName) -> bool,
) -> crate::record::Fields {
    // Most answers keep every field: no look-up of `Connection` then (measured: 160
    // instructions a first request). `Connection` itself is never kept, so no field is
    // named by one here.
    if headers
        .keys()
        .all(|name| is_replayable_header(name) && wanted(name))
    {
        return crate::record::Fields::kept_from(headers, |_| true);
    }
    let named = connection_fields(headers);
    crate::record::Fields::kept_from(headers, |name| {
        is_replayable_header(name) && !named.contains(name) && wanted(name)
    })
}

/// The shortest record TTL a request may ask for: one second.
pub(crate) const MIN_RECORD_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// A request's own record TTL, put in its extensions by a layer outside the idempotency
/// layer (or by [`Call::ttl`](crate::function::Call::ttl)): its record, or its commit point,
/// is kept this long instead of the layer's [`ttl`](crate::IdempotencyLayer::ttl), between
/// one second and that TTL (the layer's TTL is the longest a request may ask for). See also
/// [`ttl_by`](crate::IdempotencyLayer::ttl_by).
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::RecordTtl;
///
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(RecordTtl(Duration::from_secs(600)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordTtl(pub std::time::Duration);

/// A request's own lease, put in its extensions by a layer outside the idempotency layer
/// (or by [`Call::lease`](crate::function::Call::lease)): its claim is leased this long
/// instead of the layer's [`lease`](crate::IdempotencyLayer::lease), and never shorter (the
/// layer's lease sets how often the lease keeper runs). A longer lease lets a slow or
/// paused owner keep its key longer before another request takes it over, at the price of
/// a crashed owner holding it longer. See also
/// [`lease_by`](crate::IdempotencyLayer::lease_by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimLease(pub std::time::Duration);
