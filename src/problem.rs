//! The answers the layer gives on its own: RFC 9457 problem details over HTTP (or, as a
//! [`Profile`] chooses, Stripe's or the Agentic Commerce Protocol's error bodies), statuses
//! over gRPC.
//!
//! By default every rejection is an `application/problem+json` body with `type`, `title`,
//! `status` and `detail`, or, for gRPC requests (`content-type: application/grpc…`), a
//! trailers-only response carrying `grpc-status` and `grpc-message`. The statuses below are
//! those of the default profile; see [Profiles](#profiles) for the others.
//!
//! | Kind | HTTP | gRPC | When |
//! |---|---|---|---|
//! | `missing-key` | 400 | `INVALID_ARGUMENT` | a covered request has no key and keys are required |
//! | `invalid-key` | 400 | `INVALID_ARGUMENT` | the key is empty, too long, not printable or not an sf-string |
//! | `request-too-large` | 413 | `RESOURCE_EXHAUSTED` | the body is over the fingerprint limit; nothing ran |
//! | `body-unreadable` | 400 | `INVALID_ARGUMENT` | the request body failed while being read; nothing ran |
//! | `key-in-use` | 409 + `Retry-After` | `ABORTED` | the first request with this key still runs |
//! | `key-reused` | 422 | `FAILED_PRECONDITION` | the key was used with another payload |
//! | `response-not-stored` | 410 | `ALREADY_EXISTS` | the operation ran but its response was too large to keep |
//! | `caller-unknown` | 403 | `PERMISSION_DENIED` | the layer cannot tell who the caller is (no scope configured, or the scope function found no caller); nothing ran |
//! | `store-unavailable` | 503 + `Retry-After` | `UNAVAILABLE` | the store failed; nothing ran |
//! | `store-full` | 503 + `Retry-After` | `UNAVAILABLE` | the store has no room for a new key without forgetting recent records; nothing ran |
//! | `record-unreadable` | 500 | `INTERNAL` | the operation ran before, but its stored outcome cannot be read (damaged, or written by a newer version); it never runs again with this key |
//! | `outcome-unknown` | 500 | `UNKNOWN` | the operation passed its commit point and its answer was never stored (its instance crashed, or it failed after committing); it never runs again with this key |
//!
//! The `type` of each is a URI made of a base and the kind, by default
//! `https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/#` followed by the
//! kind; [`IdempotencyLayer::problem_type_base`](crate::IdempotencyLayer::problem_type_base)
//! points it at a service's own documentation, and then a `Link: <…>; rel="describedby"`
//! header carries the same URI. Each kind has its own section below, which the default URI
//! points at.
//!
//! # Profiles
//!
//! Clients built for another API's errors read this layer's answers when the layer speaks
//! their shape: [`IdempotencyLayer::problem_profile`](crate::IdempotencyLayer::problem_profile)
//! chooses one of the [`Profile`]s. In every profile:
//!
//! - `Retry-After` (in seconds) is on every `409` and `503`, so clients, this crate's
//!   [`client`](crate::client) included, wait and retry with the same key;
//! - a replay carries `Idempotent-Replayed: true` (RFC 9457 leaves it to the service; Stripe
//!   and ACP name this header);
//! - gRPC requests get the gRPC status of the first table, whatever the profile;
//! - a body is rendered once per layer for the two answers given most (`409` and `422`), as
//!   in the default profile, and every detail a request put in (a key, a JSON value) is
//!   escaped: the body is always valid JSON;
//! - [`problem_type_base`](crate::IdempotencyLayer::problem_type_base) adds the `Link: <…>;
//!   rel="describedby"` header to every answer. In RFC 9457 the same URI is the `type`; in
//!   Stripe it is the `doc_url` (by default this page's section for the kind); ACP's error
//!   has no field for it, so only the header carries it.
//!
//! Codes marked *(own)* are this crate's: the profile's specification names no code for the
//! situation, so the answer takes the closest `type` it documents and a code of its own;
//! the other codes are the specification's. The [`function`](crate::function) and consumer
//! entry points return errors, not HTTP bodies: profiles do not apply to them.
//!
//! ## RFC 9457
//!
//! The default: `application/problem+json`, `{"type", "title", "status", "detail"}`, with
//! the statuses of the first table and `type` the base URI followed by the kind's slug. Its
//! bytes are those earlier versions answered.
//!
//! ## Stripe
//!
//! `application/json`, `{"error": {"type", "code", "message", "doc_url"}}`; `message` is the
//! detail.
//!
//! What it follows, from Stripe's API reference:
//! - errors are an `error` object whose `type` is one of `api_error`, `card_error`,
//!   `idempotency_error` or `invalid_request_error`, with a nullable `code`, `message`,
//!   `param` and `doc_url` (<https://docs.stripe.com/api/errors>);
//! - `409 Conflict` means the request conflicts with another, such as one using the same
//!   idempotency key, and `idempotency_key_in_use` is the code of a request made while
//!   another with its key is in progress, to be retried after a pause
//!   (<https://docs.stripe.com/error-low-level#status-codes>,
//!   <https://docs.stripe.com/error-codes>);
//! - `idempotency_error` is the type for a key reused with another endpoint or other
//!   parameters (<https://docs.stripe.com/api/errors>), and Stripe's Python library raises
//!   its `IdempotencyError` only for that type on a `400` or `404`, while a `409` becomes
//!   its generic API error, retried with the same key
//!   (<https://github.com/stripe/stripe-python>, the status-to-error mapping of its API
//!   requestor): so `key-reused` is `400` here, not `422`, and `key-in-use` stays `409`;
//! - a replay carries `Idempotent-Replayed: true`
//!   (<https://docs.stripe.com/error-low-level#idempotency>).
//!
//! The reference gives no `type` for `idempotency_key_in_use`; this profile answers it with
//! `invalid_request_error`, the type of Stripe's other request errors (Stripe's clients
//! choose their error by the `409` status, not by the type). Stripe's own API does not
//! require a key; `missing-key` and `invalid-key` are request errors of this layer's own.
//!
//! | Kind | HTTP | `type` | `code` |
//! |---|---|---|---|
//! | `missing-key` | 400 | `invalid_request_error` | `idempotency_key_missing` *(own)* |
//! | `invalid-key` | 400 | `invalid_request_error` | `idempotency_key_invalid` *(own)* |
//! | `request-too-large` | 413 | `invalid_request_error` | `request_too_large` *(own)* |
//! | `body-unreadable` | 400 | `invalid_request_error` | `request_body_unreadable` *(own)* |
//! | `key-in-use` | 409 + `Retry-After` | `invalid_request_error` | `idempotency_key_in_use` |
//! | `key-reused` | **400** | `idempotency_error` | `idempotency_key_reused` *(own; Stripe documents none)* |
//! | `response-not-stored` | 410 | `api_error` | `response_not_stored` *(own)* |
//! | `caller-unknown` | 403 | `invalid_request_error` | `caller_unknown` *(own)* |
//! | `store-unavailable` | 503 + `Retry-After` | `api_error` | `idempotency_store_unavailable` *(own)* |
//! | `store-full` | 503 + `Retry-After` | `api_error` | `idempotency_store_full` *(own)* |
//! | `record-unreadable` | 500 | `api_error` | `record_unreadable` *(own)* |
//! | `outcome-unknown` | 500 | `api_error` | `outcome_unknown` *(own)* |
//!
//! ## Agentic Commerce Protocol
//!
//! `application/json`, the flat `{"type", "code", "message"}` (ACP's optional `param`, a
//! JSONPath into the request body, is left out: these answers are about a header or the
//! request as a whole); `message` is the detail.
//!
//! What it follows, from the Agentic Checkout specification's idempotency section (§6, in
//! <https://github.com/agentic-commerce-protocol/agentic-commerce-protocol/blob/main/rfcs/rfc.agentic_checkout.md>):
//! - errors are flat objects with `type` (one of `invalid_request`, `processing_error`,
//!   `service_unavailable`), `code`, `message` and an optional `param` (§3.1);
//! - every idempotency error has `type: invalid_request`: a missing key is `400
//!   idempotency_key_required`, the same key with another body `422 idempotency_conflict`
//!   (permanent), the same key while the first still runs `409 idempotency_in_flight` with
//!   `Retry-After` in seconds (§6.1, §6.4);
//! - a replay returns the first status and should carry `Idempotent-Replayed: true`
//!   (§6.3); `5xx` answers are not stored against the key (§6.5), which is this layer's
//!   default storable rule. `record-unreadable` and `outcome-unknown` are `500` answers of
//!   the layer's own about an operation that already ran: a retry gets them again rather
//!   than a second run, as §6.3 forbids re-executing side effects.
//!
//! | Kind | HTTP | `type` | `code` |
//! |---|---|---|---|
//! | `missing-key` | 400 | `invalid_request` | `idempotency_key_required` |
//! | `invalid-key` | 400 | `invalid_request` | `idempotency_key_invalid` *(own)* |
//! | `request-too-large` | 413 | `invalid_request` | `request_too_large` *(own)* |
//! | `body-unreadable` | 400 | `invalid_request` | `request_body_unreadable` *(own)* |
//! | `key-in-use` | 409 + `Retry-After` | `invalid_request` | `idempotency_in_flight` |
//! | `key-reused` | 422 | `invalid_request` | `idempotency_conflict` |
//! | `response-not-stored` | 410 | `processing_error` | `response_not_stored` *(own)* |
//! | `caller-unknown` | 403 | `invalid_request` | `caller_unknown` *(own)* |
//! | `store-unavailable` | 503 + `Retry-After` | `service_unavailable` | `idempotency_store_unavailable` *(own)* |
//! | `store-full` | 503 + `Retry-After` | `service_unavailable` | `idempotency_store_full` *(own)* |
//! | `record-unreadable` | 500 | `processing_error` | `record_unreadable` *(own)* |
//! | `outcome-unknown` | 500 | `processing_error` | `outcome_unknown` *(own)* |
//!
//! # Problem types
//!
//! ## missing-key
//!
//! A covered request (by default `POST` or `PATCH`) came without an `Idempotency-Key`, and
//! keys are required. Nothing ran. Send the request again with a fresh key.
//!
//! ## invalid-key
//!
//! The key is empty, longer than the limit (255 by default), not printable ASCII, sent
//! twice, or (in strict mode) not a Structured Field String. Nothing ran. Fix the key.
//!
//! ## request-too-large
//!
//! The body is over the limit the layer fingerprints (1 MiB by default), or over a length
//! limit a layer outside put on it. Nothing ran. Send less.
//!
//! ## body-unreadable
//!
//! The request body broke off while the layer read it (the connection failed). Nothing ran.
//! Retry with the whole body.
//!
//! ## key-in-use
//!
//! The first request with this key is still running. Retry after `Retry-After`: you will
//! get its answer.
//!
//! ## key-reused
//!
//! The key was used before with another request (method, path, content type or body).
//! Nothing ran. A new operation needs a new key.
//!
//! ## response-not-stored
//!
//! The operation ran (or was cut off midway and may have run) with this key, but its answer
//! could not be kept for replay: it was larger than the limit, its body failed, or a timeout
//! inside the layer cut it off. It will not run again with this key; look the result up.
//!
//! ## caller-unknown
//!
//! The layer cannot tell who the caller is: it was not told how (see
//! [`IdempotencyLayer::scope_by`](crate::IdempotencyLayer::scope_by)), or this request
//! carries no identity (no principal, no credential). Nothing ran. Authenticate.
//!
//! ## store-unavailable
//!
//! The idempotency store failed or did not answer in time. Nothing ran. Retry after
//! `Retry-After`.
//!
//! ## store-full
//!
//! The store has no room for a new key without forgetting answers it promised to keep.
//! Nothing ran. Retry after `Retry-After`.
//!
//! ## record-unreadable
//!
//! The operation ran before with this key, but its stored answer cannot be read (damaged,
//! or written by a newer version during an upgrade). It will not run again with this key;
//! look the result up.
//!
//! ## outcome-unknown
//!
//! The operation with this key declared its commit point (its effects were made, or were
//! about to be), and then ended without an answer that could be stored: its instance
//! crashed, or it failed after committing. Whether it succeeded is not known here, and it
//! will not run again with this key. Do not retry it with a new key blindly: look the
//! result up (the service may also settle the key later, after which a retry with the same
//! key gets the settled answer).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// The default base of problem `type` URIs.
pub const DEFAULT_TYPE_BASE: &str =
    "https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/#";

/// What the layer refused, or could not do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// A covered request has no key and keys are required.
    MissingKey,
    /// The key is malformed.
    InvalidKey,
    /// The request body is over the fingerprint limit.
    RequestTooLarge,
    /// The request body could not be read.
    BodyUnreadable,
    /// The first request with this key still runs.
    KeyInUse,
    /// The key was used with another payload.
    KeyReused,
    /// The operation ran, but its response was too large to keep.
    ResponseNotStored,
    /// The caller cannot be identified, so its keys cannot be kept apart from others'.
    CallerUnknown,
    /// The store failed.
    StoreUnavailable,
    /// The store has no room for a new key without forgetting recent records.
    StoreFull,
    /// The operation ran before, but its stored outcome cannot be read: it will not run
    /// again with this key.
    RecordUnreadable,
    /// The operation passed its commit point and no outcome was stored: it will not run
    /// again with this key, and what it did is not known here.
    OutcomeUnknown,
}

impl ProblemKind {
    /// The kind's slug, the last part of its `type` URI.
    pub fn slug(self) -> &'static str {
        match self {
            Self::MissingKey => "missing-key",
            Self::InvalidKey => "invalid-key",
            Self::RequestTooLarge => "request-too-large",
            Self::BodyUnreadable => "body-unreadable",
            Self::KeyInUse => "key-in-use",
            Self::KeyReused => "key-reused",
            Self::ResponseNotStored => "response-not-stored",
            Self::CallerUnknown => "caller-unknown",
            Self::StoreUnavailable => "store-unavailable",
            Self::StoreFull => "store-full",
            Self::RecordUnreadable => "record-unreadable",
            Self::OutcomeUnknown => "outcome-unknown",
        }
    }

    /// The HTTP status of the answer.
    pub fn status(self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::KeyInUse => StatusCode::CONFLICT,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::ResponseNotStored => StatusCode::GONE,
            Self::CallerUnknown => StatusCode::FORBIDDEN,
            Self::StoreUnavailable | Self::StoreFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::RecordUnreadable | Self::OutcomeUnknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status code of the answer.
    pub fn grpc_code(self) -> u8 {
        match self {
            Self::MissingKey | Self::InvalidKey | Self::BodyUnreadable => 3, // INVALID_ARGUMENT
            Self::RequestTooLarge => 8,                                      // RESOURCE_EXHAUSTED
            Self::KeyInUse => 10,                                            // ABORTED
            Self::KeyReused => 9,                                            // FAILED_PRECONDITION
            Self::ResponseNotStored => 6,                                    // ALREADY_EXISTS
            Self::CallerUnknown => 7,                                        // PERMISSION_DENIED
            Self::StoreUnavailable | Self::StoreFull => 14,                  // UNAVAILABLE
            Self::RecordUnreadable => 13,                                    // INTERNAL
            Self::OutcomeUnknown => 2,                                       // UNKNOWN
        }
    }

    /// The problem's title.
    pub fn title(self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency-Key is missing",
            Self::InvalidKey => "Idempotency-Key is malformed",
            Self::RequestTooLarge => "Request body is too large to fingerprint",
            Self::BodyUnreadable => "Request body could not be read",
            Self::KeyInUse => "A request with this Idempotency-Key is still being processed",
            Self::KeyReused => "Idempotency-Key is already used",
            Self::ResponseNotStored => "The operation ran but its response was not stored",
            Self::CallerUnknown => "The caller cannot be identified",
            Self::StoreUnavailable => "Idempotency store is unavailable",
            Self::StoreFull => "Idempotency store is full",
            Self::RecordUnreadable => "The stored outcome of this Idempotency-Key cannot be read",
            Self::OutcomeUnknown => {
                "The outcome of the operation with this Idempotency-Key is unknown"
            }
        }
    }
}

/// The shape of the answers the layer gives on its own over HTTP: their status, content
/// type and body. Chosen per layer with
/// [`IdempotencyLayer::problem_profile`](crate::IdempotencyLayer::problem_profile); the
/// default is [`Rfc9457`](Profile::Rfc9457). gRPC requests get a gRPC status whatever the
/// profile. See the [module docs](self#profiles) for each profile's table and sources.
///
/// ```
/// use tower_idempotency::problem::{Profile, ProblemKind};
///
/// let profile = Profile::AgenticCommerce;
/// assert_eq!(profile.status(ProblemKind::KeyReused).as_u16(), 422);
/// assert_eq!(profile.code(ProblemKind::KeyInUse), "idempotency_in_flight");
/// assert_eq!(profile.content_type(), "application/json");
/// assert_eq!(Profile::Stripe.status(ProblemKind::KeyReused).as_u16(), 400);
/// assert_eq!(Profile::default(), Profile::Rfc9457);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Profile {
    /// RFC 9457 problem details: `application/problem+json` with `type`, `title`,
    /// `status` and `detail`. The default, byte for byte what earlier versions answered.
    #[default]
    Rfc9457,
    /// Stripe's error object: `application/json` with
    /// `{"error": {"type", "code", "message", "doc_url"}}`, and `400 idempotency_error`
    /// for a key reused with another payload, as Stripe's clients expect.
    Stripe,
    /// The Agentic Commerce Protocol's flat error: `application/json` with `type`, `code`
    /// and `message` (`idempotency_key_required`, `idempotency_in_flight`,
    /// `idempotency_conflict`).
    AgenticCommerce,
}

impl Profile {
    /// Every profile, in the order of the module docs' tables.
    pub const ALL: [Profile; 3] = [Profile::Rfc9457, Profile::Stripe, Profile::AgenticCommerce];

    /// The HTTP status of `kind`'s answer under this profile: the kind's own
    /// [`status`](ProblemKind::status), except where the profile's specification says
    /// otherwise (Stripe answers a reused key with `400`).
    pub fn status(self, kind: ProblemKind) -> StatusCode {
        match (self, kind) {
            (Self::Stripe, ProblemKind::KeyReused) => StatusCode::BAD_REQUEST,
            _ => kind.status(),
        }
    }

    /// The `Content-Type` of the answers: `application/problem+json` for RFC 9457,
    /// `application/json` for the others.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Rfc9457 => "application/problem+json",
            Self::Stripe | Self::AgenticCommerce => "application/json",
        }
    }

    /// [`content_type`](Self::content_type) as a header value, made at compile time (a
    /// value made from a `&'static str` at run time is checked byte by byte every time).
    fn content_type_value(self) -> HeaderValue {
        const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");
        const JSON: HeaderValue = HeaderValue::from_static("application/json");
        match self {
            Self::Rfc9457 => PROBLEM_JSON,
            Self::Stripe | Self::AgenticCommerce => JSON,
        }
    }

    /// The machine-readable code of `kind`'s answer: for RFC 9457 the kind's
    /// [`slug`](ProblemKind::slug) (the last part of its `type` URI); for the others the
    /// body's `code`, the profile's own where its specification names one for the
    /// situation, this crate's otherwise (the module docs' tables say which).
    pub fn code(self, kind: ProblemKind) -> &'static str {
        use ProblemKind as K;
        match self {
            Self::Rfc9457 => kind.slug(),
            Self::Stripe => match kind {
                K::KeyInUse => "idempotency_key_in_use",
                K::KeyReused => "idempotency_key_reused",
                _ => own_code(kind),
            },
            Self::AgenticCommerce => match kind {
                K::MissingKey => "idempotency_key_required",
                K::KeyInUse => "idempotency_in_flight",
                K::KeyReused => "idempotency_conflict",
                _ => own_code(kind),
            },
        }
    }

    /// The body's `type` of `kind`'s answer: `None` for RFC 9457 (whose `type` is a URI,
    /// see [`IdempotencyLayer::problem_type_base`](crate::IdempotencyLayer::problem_type_base));
    /// for the others one of the error types the profile's specification lists.
    pub fn error_type(self, kind: ProblemKind) -> Option<&'static str> {
        use ProblemKind as K;
        match self {
            Self::Rfc9457 => None,
            Self::Stripe => Some(match kind {
                K::KeyReused => "idempotency_error",
                K::MissingKey
                | K::InvalidKey
                | K::RequestTooLarge
                | K::BodyUnreadable
                | K::KeyInUse
                | K::CallerUnknown => "invalid_request_error",
                K::ResponseNotStored
                | K::StoreUnavailable
                | K::StoreFull
                | K::RecordUnreadable
                | K::OutcomeUnknown => "api_error",
            }),
            Self::AgenticCommerce => Some(match kind {
                K::MissingKey
                | K::InvalidKey
                | K::RequestTooLarge
                | K::BodyUnreadable
                | K::KeyInUse
                | K::KeyReused
                | K::CallerUnknown => "invalid_request",
                K::StoreUnavailable | K::StoreFull => "service_unavailable",
                K::ResponseNotStored | K::RecordUnreadable | K::OutcomeUnknown => {
                    "processing_error"
                }
            }),
        }
    }
}

/// This crate's own code for a kind a profile names no code for: the slug in snake case,
/// prefixed where the slug alone would not say it is about idempotency.
fn own_code(kind: ProblemKind) -> &'static str {
    match kind {
        ProblemKind::MissingKey => "idempotency_key_missing",
        ProblemKind::InvalidKey => "idempotency_key_invalid",
        ProblemKind::RequestTooLarge => "request_too_large",
        ProblemKind::BodyUnreadable => "request_body_unreadable",
        ProblemKind::KeyInUse => "idempotency_key_in_use",
        ProblemKind::KeyReused => "idempotency_key_reused",
        ProblemKind::ResponseNotStored => "response_not_stored",
        ProblemKind::CallerUnknown => "caller_unknown",
        ProblemKind::StoreUnavailable => "idempotency_store_unavailable",
        ProblemKind::StoreFull => "idempotency_store_full",
        ProblemKind::RecordUnreadable => "record_unreadable",
        ProblemKind::OutcomeUnknown => "outcome_unknown",
    }
}

/// How a layer renders its problems: the profile, the base of `type` URIs (or Stripe's
/// `doc_url`), and whether a `Link` header carries the same URI.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Style<'a> {
    pub(crate) profile: Profile,
    pub(crate) type_base: &'a str,
    pub(crate) link: bool,
}

impl<'a> Style<'a> {
    /// The default profile with `type_base`, as earlier versions rendered.
    #[cfg(test)]
    pub(crate) fn rfc9457(type_base: &'a str, link: bool) -> Self {
        Self {
            profile: Profile::Rfc9457,
            type_base,
            link,
        }
    }
}

/// One answer of the layer's own.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub(crate) kind: ProblemKind,
    pub(crate) detail: std::borrow::Cow<'static, str>,
    pub(crate) retry_after: Option<Duration>,
}

impl Problem {
    pub(crate) fn new(
        kind: ProblemKind,
        detail: impl Into<std::borrow::Cow<'static, str>>,
    ) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub(crate) fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The answer as a response with an empty (gRPC) or JSON body.
    #[cfg(test)]
    pub(crate) fn into_response(self, grpc: bool, type_base: &str, link: bool) -> Response<Bytes> {
        self.into_response_cached(grpc, Style::rfc9457(type_base, link), None)
    }

    /// The answer as `profile` renders it (tests of other profiles).
    #[cfg(test)]
    pub(crate) fn into_profile_response(self, grpc: bool, style: Style<'_>) -> Response<Bytes> {
        self.into_response_cached(grpc, style, None)
    }

    /// The JSON body, or (gRPC) the `grpc-message` value.
    fn render(&self, grpc: bool, style: Style<'_>) -> Rendered {
        if grpc {
            let message = percent_encode(&format!("{}: {}", self.kind.title(), self.detail));
            return Rendered {
                body: Bytes::new(),
                grpc_message: HeaderValue::try_from(message).ok(),
                length: None,
            };
        }
        let mut body = String::with_capacity(200 + self.detail.len());
        match style.profile {
            Profile::Rfc9457 => {
                body.push_str("{\"type\":");
                json_uri(&mut body, style.type_base, self.kind.slug());
                body.push_str(",\"title\":");
                json_string(&mut body, self.kind.title());
                body.push_str(",\"status\":");
                body.push_str(itoa(self.kind.status().as_u16()).as_str());
                body.push_str(",\"detail\":");
                json_string(&mut body, &self.detail);
                body.push('}');
            }
            Profile::Stripe => {
                body.push_str("{\"error\":{\"type\":");
                json_string(&mut body, style.profile.error_type(self.kind).unwrap_or(""));
                body.push_str(",\"code\":");
                json_string(&mut body, style.profile.code(self.kind));
                body.push_str(",\"message\":");
                json_string(&mut body, &self.detail);
                body.push_str(",\"doc_url\":");
                json_uri(&mut body, style.type_base, self.kind.slug());
                body.push_str("}}");
            }
            Profile::AgenticCommerce => {
                body.push_str("{\"type\":");
                json_string(&mut body, style.profile.error_type(self.kind).unwrap_or(""));
                body.push_str(",\"code\":");
                json_string(&mut body, style.profile.code(self.kind));
                body.push_str(",\"message\":");
                json_string(&mut body, &self.detail);
                body.push('}');
            }
        }
        Rendered {
            length: Some(HeaderValue::from(body.len())),
            body: Bytes::from(body),
            grpc_message: None,
        }
    }

    /// [`into_response`](Self::into_response), taking the body (or gRPC message) from
    /// `cache` when the detail is static, and rendering it there the first time.
    ///
    /// A cache belongs to one layer's runtime, which renders with one style: a cached body
    /// is the one `style` renders.
    pub(crate) fn into_response_cached(
        self,
        grpc: bool,
        style: Style<'_>,
        cache: Option<&ProblemCache>,
    ) -> Response<Bytes> {
        let rendered = match (cache.and_then(|c| c.slot(self.kind, grpc)), &self.detail) {
            (Some(slot), std::borrow::Cow::Borrowed(detail)) => {
                let (cached_detail, rendered) =
                    slot.get_or_init(|| (detail, self.render(grpc, style)));
                // One slot per kind: a kind with another static detail is rendered afresh.
                if std::ptr::eq(*cached_detail, *detail) || cached_detail == detail {
                    rendered.clone()
                } else {
                    self.render(grpc, style)
                }
            }
            _ => self.render(grpc, style),
        };
        let (type_base, link) = (style.type_base, style.link);
        let mut res = Response::new(rendered.body);
        // Room for the fields below without growing the map.
        *res.headers_mut() = http::HeaderMap::with_capacity(4);
        if let Some(length) = rendered.length {
            res.headers_mut().insert(header::CONTENT_LENGTH, length);
        }
        let h = res.headers_mut();
        if grpc {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert(
                "grpc-status",
                HeaderValue::from(u16::from(self.kind.grpc_code())),
            );
            if let Some(v) = rendered.grpc_message {
                h.insert("grpc-message", v);
            }
        } else {
            *res.status_mut() = style.profile.status(self.kind);
            let h = res.headers_mut();
            h.insert(header::CONTENT_TYPE, style.profile.content_type_value());
            if link
                && let Ok(v) = HeaderValue::try_from(format!(
                    "<{type_base}{}>; rel=\"describedby\"",
                    self.kind.slug()
                ))
            {
                h.insert(header::LINK, v);
            }
        }
        if let Some(after) = self.retry_after {
            let secs = after
                .as_secs()
                .saturating_add(u64::from(after.subsec_nanos() > 0));
            res.headers_mut()
                .insert(header::RETRY_AFTER, seconds(secs.max(1)));
            if grpc {
                // gRPC's own form (gRFC A6), which gRPC clients' retry policies obey: the
                // same pause, in milliseconds.
                let ms =
                    u64::try_from(Duration::from_secs(secs.max(1)).as_millis()).unwrap_or(u64::MAX);
                res.headers_mut()
                    .insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
            }
        }
        res
    }
}

/// `n` as a header value (`Retry-After`): up to a minute, the same value shared from
/// the first time it was made.
fn seconds(n: u64) -> HeaderValue {
    static SMALL: [std::sync::OnceLock<HeaderValue>; 61] =
        [const { std::sync::OnceLock::new() }; 61];
    match usize::try_from(n).ok().and_then(|i| SMALL.get(i)) {
        Some(slot) => slot.get_or_init(|| HeaderValue::from(n)).clone(),
        None => HeaderValue::from(n),
    }
}

/// A problem's body, or its gRPC message, as rendered.
#[derive(Clone)]
struct Rendered {
    body: Bytes,
    grpc_message: Option<HeaderValue>,
    /// The body's `Content-Length` (not for gRPC), made with it: a cached answer shares it
    /// rather than have the server make it again.
    length: Option<HeaderValue>,
}

/// The answers with a static detail that a layer gives most (409 and 422), rendered once,
/// each with the detail it was rendered from.
#[derive(Default)]
pub(crate) struct ProblemCache {
    slots: [std::sync::OnceLock<(&'static str, Rendered)>; 4],
}

impl ProblemCache {
    fn slot(
        &self,
        kind: ProblemKind,
        grpc: bool,
    ) -> Option<&std::sync::OnceLock<(&'static str, Rendered)>> {
        let i = match kind {
            ProblemKind::KeyInUse => 0,
            ProblemKind::KeyReused => 1,
            _ => return None,
        };
        Some(&self.slots[i * 2 + usize::from(grpc)])
    }
}

fn itoa(n: u16) -> String {
    n.to_string()
}

/// Appends `base` followed by `slug` as one JSON string literal (a slug needs no escape).
fn json_uri(out: &mut String, base: &str, slug: &str) {
    json_string(out, base);
    // Re-open the string to add the slug.
    out.pop();
    out.push_str(slug);
    out.push('"');
}

/// Appends `s` as a JSON string literal, copying the runs that need no escape whole.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            b if b < 0x20 => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            out.push_str(&format!("\\u{b:04x}"));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Percent-encodes a gRPC message as the gRPC HTTP/2 protocol asks: everything outside
/// printable ASCII, and `%` itself.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a request (or an answer) is a gRPC one, by its content type: the media type
/// `application/grpc`, with a subtype (`+proto`) or parameters, or gRPC-Web's
/// (`application/grpc-web`, `application/grpc-web-text`), in any case; not another type
/// that merely starts the same (`application/grpcfoo`).
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| is_grpc_type(v.as_bytes()))
}

fn is_grpc_type(value: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    const WEB: &[u8] = b"-web";
    // Most content types differ at the `g` of `grpc` (`application/json`): one byte looked
    // at before the whole prefix.
    if value.len() < GRPC.len()
        || !value[12].eq_ignore_ascii_case(&b'g')
        || !value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
    {
        return false;
    }
    let mut rest = &value[GRPC.len()..];
    if rest.len() >= WEB.len() && rest[..WEB.len()].eq_ignore_ascii_case(WEB) {
        rest = &rest[WEB.len()..];
        if rest.len() >= 5 && rest[..5].eq_ignore_ascii_case(b"-text") {
            rest = &rest[5..];
        }
    }
    matches!(rest.first(), None | Some(b'+' | b';' | b' ' | b'\t'))
}

/// Whether `path` can be a gRPC method's: `/Service/Method`, or longer (a server behind a
/// path prefix). A request with a gRPC content type ([`is_grpc`]) counts as a gRPC call for
/// coverage only on such a path: a client's content type alone does not take a route of
/// one segment (`/orders`) out of the layer's coverage.
pub(crate) fn grpc_shaped(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let mut segments = rest.rsplit('/');
    matches!(
        (segments.next(), segments.next()),
        (Some(method), Some(service)) if !service.is_empty() && !method.is_empty()
    )
}

/// Every kind, for the documentation checks.
#[cfg(test)]
pub(crate) const ALL_KINDS: [ProblemKind; 12] = [
    ProblemKind::MissingKey,
    ProblemKind::InvalidKey,
    ProblemKind::RequestTooLarge,
    ProblemKind::BodyUnreadable,
    ProblemKind::KeyInUse,
    ProblemKind::KeyReused,
    ProblemKind::ResponseNotStored,
    ProblemKind::CallerUnknown,
    ProblemKind::StoreUnavailable,
    ProblemKind::StoreFull,
    ProblemKind::RecordUnreadable,
    ProblemKind::OutcomeUnknown,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_pushback_says_what_retry_after_says() {
        let res = Problem::new(ProblemKind::KeyInUse, "busy")
            .retry_after(Duration::from_millis(1500))
            .into_response(true, DEFAULT_TYPE_BASE, false);
        assert_eq!(res.headers()["grpc-status"], "10");
        assert_eq!(res.headers()["retry-after"], "2");
        assert_eq!(res.headers()["grpc-retry-pushback-ms"], "2000");
        let http = Problem::new(ProblemKind::KeyInUse, "busy")
            .retry_after(Duration::from_secs(1))
            .into_response(false, DEFAULT_TYPE_BASE, false);
        assert!(!http.headers().contains_key("grpc-retry-pushback-ms"));
        let none = Problem::new(ProblemKind::KeyReused, "other payload").into_response(
            true,
            DEFAULT_TYPE_BASE,
            false,
        );
        assert!(!none.headers().contains_key("grpc-retry-pushback-ms"));
    }

    #[test]
    fn http_problems_are_rfc9457_json() {
        let res = Problem::new(ProblemKind::KeyInUse, "try \"later\"\n")
            .retry_after(Duration::from_millis(1500))
            .into_response(false, DEFAULT_TYPE_BASE, false);
        assert_eq!(res.status(), StatusCode::CONFLICT);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert_eq!(res.headers()["retry-after"], "2");
        assert!(res.headers().get("link").is_none());
        let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(body["status"], 409);
        assert_eq!(body["detail"], "try \"later\"\n");
        assert_eq!(body["type"], format!("{DEFAULT_TYPE_BASE}key-in-use"));
        assert_eq!(body["title"], ProblemKind::KeyInUse.title());
    }

    #[test]
    fn custom_type_base_adds_a_link() {
        let res = Problem::new(ProblemKind::KeyReused, "x").into_response(
            false,
            "https://api.example.com/errors/",
            true,
        );
        assert_eq!(
            res.headers()["link"],
            "<https://api.example.com/errors/key-reused>; rel=\"describedby\""
        );
    }

    #[test]
    fn grpc_problems_are_trailers_only() {
        let res = Problem::new(ProblemKind::StoreUnavailable, "100% down ✗").into_response(
            true,
            DEFAULT_TYPE_BASE,
            false,
        );
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.body().is_empty());
        assert_eq!(res.headers()["grpc-status"], "14");
        let msg = res.headers()["grpc-message"].to_str().unwrap();
        assert!(msg.ends_with("100%25 down %E2%9C%97"), "{msg}");
    }

    #[test]
    fn details_with_control_and_multibyte_characters_are_valid_json() {
        let detail = "a\u{1}b\tc\\d\u{1f}é✗\"";
        let res = Problem::new(ProblemKind::KeyReused, detail.to_owned()).into_response(
            false,
            DEFAULT_TYPE_BASE,
            false,
        );
        let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(body["detail"], detail);
        let text = std::str::from_utf8(res.body()).unwrap();
        assert!(text.contains("a\\u0001b\\tc"), "{text}");
    }

    #[test]
    fn cached_answers_match_fresh_ones_and_keep_their_retry_after() {
        let cache = ProblemCache::default();
        for grpc in [false, true] {
            for round in 0..2 {
                let after = Duration::from_secs(1 + round);
                let cached = Problem::new(ProblemKind::KeyInUse, "busy")
                    .retry_after(after)
                    .into_response_cached(
                        grpc,
                        Style::rfc9457(DEFAULT_TYPE_BASE, true),
                        Some(&cache),
                    );
                let fresh = Problem::new(ProblemKind::KeyInUse, "busy")
                    .retry_after(after)
                    .into_response(grpc, DEFAULT_TYPE_BASE, true);
                assert_eq!(cached.status(), fresh.status());
                assert_eq!(cached.headers(), fresh.headers());
                assert_eq!(cached.body(), fresh.body());
            }
        }
        // Another static detail of the same kind gets its own body.
        let other = Problem::new(ProblemKind::KeyInUse, "another static detail")
            .into_response_cached(
                false,
                Style::rfc9457(DEFAULT_TYPE_BASE, false),
                Some(&cache),
            );
        let body: serde_json::Value = serde_json::from_slice(other.body()).unwrap();
        assert_eq!(body["detail"], "another static detail");
        // A detail built per request is never taken from the cache.
        let own = Problem::new(ProblemKind::KeyInUse, format!("busy {}", 7)).into_response_cached(
            false,
            Style::rfc9457(DEFAULT_TYPE_BASE, false),
            Some(&cache),
        );
        let body: serde_json::Value = serde_json::from_slice(own.body()).unwrap();
        assert_eq!(body["detail"], "busy 7");
    }

    /// The default profile's bytes are those of earlier versions, pinned.
    #[test]
    fn the_default_profile_renders_the_bytes_it_always_did() {
        let res = Problem::new(ProblemKind::KeyReused, "a \"b\"\n").into_response(
            false,
            DEFAULT_TYPE_BASE,
            false,
        );
        assert_eq!(
            std::str::from_utf8(res.body()).unwrap(),
            "{\"type\":\"https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/#key-reused\",\
             \"title\":\"Idempotency-Key is already used\",\"status\":422,\"detail\":\"a \\\"b\\\"\\n\"}"
        );
    }

    /// Every kind, in every profile, renders the profile's documented shape: status,
    /// content type, field names and types, and the table's codes.
    #[test]
    fn every_kind_renders_its_profiles_shape() {
        let hostile = "key \"k\\\" \u{0}\u{1f} é ✗ </script>";
        for profile in Profile::ALL {
            for kind in ALL_KINDS {
                let style = Style {
                    profile,
                    type_base: "https://api.example.com/errors/\"x\"/",
                    link: true,
                };
                let res =
                    Problem::new(kind, hostile.to_owned()).into_profile_response(false, style);
                assert_eq!(res.status(), profile.status(kind), "{profile:?} {kind:?}");
                assert_eq!(res.headers()["content-type"], profile.content_type());
                let body: serde_json::Value = serde_json::from_slice(res.body())
                    .unwrap_or_else(|e| panic!("{profile:?} {kind:?}: {e}"));
                let fields = |v: &serde_json::Value| {
                    let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
                    keys.sort();
                    keys
                };
                match profile {
                    Profile::Rfc9457 => {
                        assert_eq!(fields(&body), ["detail", "status", "title", "type"]);
                        assert_eq!(body["status"], kind.status().as_u16());
                        assert_eq!(body["detail"], hostile);
                        assert_eq!(
                            body["type"],
                            format!("https://api.example.com/errors/\"x\"/{}", kind.slug())
                        );
                    }
                    Profile::Stripe => {
                        assert_eq!(fields(&body), ["error"]);
                        let error = &body["error"];
                        assert_eq!(fields(error), ["code", "doc_url", "message", "type"]);
                        assert_eq!(error["type"], profile.error_type(kind).unwrap());
                        assert!(
                            [
                                "api_error",
                                "card_error",
                                "idempotency_error",
                                "invalid_request_error"
                            ]
                            .contains(&error["type"].as_str().unwrap())
                        );
                        assert_eq!(error["code"], profile.code(kind));
                        assert_eq!(error["message"], hostile);
                        assert_eq!(
                            error["doc_url"],
                            format!("https://api.example.com/errors/\"x\"/{}", kind.slug())
                        );
                    }
                    Profile::AgenticCommerce => {
                        assert_eq!(fields(&body), ["code", "message", "type"]);
                        assert!(
                            ["invalid_request", "processing_error", "service_unavailable"]
                                .contains(&body["type"].as_str().unwrap())
                        );
                        assert_eq!(body["type"], profile.error_type(kind).unwrap());
                        assert_eq!(body["code"], profile.code(kind));
                        assert_eq!(body["message"], hostile);
                    }
                }
            }
        }
        // The codes the specifications name.
        assert_eq!(
            Profile::Stripe.code(ProblemKind::KeyInUse),
            "idempotency_key_in_use"
        );
        assert_eq!(
            Profile::Stripe.error_type(ProblemKind::KeyReused),
            Some("idempotency_error")
        );
        assert_eq!(
            Profile::Stripe.status(ProblemKind::KeyReused),
            StatusCode::BAD_REQUEST
        );
        let acp = Profile::AgenticCommerce;
        assert_eq!(
            acp.code(ProblemKind::MissingKey),
            "idempotency_key_required"
        );
        assert_eq!(acp.code(ProblemKind::KeyInUse), "idempotency_in_flight");
        assert_eq!(acp.code(ProblemKind::KeyReused), "idempotency_conflict");
        assert_eq!(
            acp.status(ProblemKind::KeyReused),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }

    /// Every code in the module docs' tables is the one the profile answers.
    #[test]
    fn the_profile_tables_say_what_the_profiles_answer() {
        let source = include_str!("problem.rs");
        for profile in [Profile::Stripe, Profile::AgenticCommerce] {
            for kind in ALL_KINDS {
                let status = profile.status(kind).as_u16();
                let row = format!(
                    "//! | `{}` | {}",
                    kind.slug(),
                    if matches!(status, 409 | 503) {
                        format!("{status} + `Retry-After`")
                    } else if status != kind.status().as_u16() {
                        format!("**{status}**")
                    } else {
                        status.to_string()
                    }
                );
                let tail = format!(
                    " | `{}` | `{}`",
                    profile.error_type(kind).unwrap(),
                    profile.code(kind)
                );
                assert!(
                    source
                        .lines()
                        .any(|l| l.starts_with(&row) && l.contains(&tail)),
                    "{profile:?}: no row `{row}{tail}`"
                );
            }
        }
    }

    #[test]
    fn a_cached_profile_answer_matches_a_fresh_one() {
        for profile in Profile::ALL {
            let cache = ProblemCache::default();
            let style = Style {
                profile,
                type_base: DEFAULT_TYPE_BASE,
                link: false,
            };
            for _ in 0..2 {
                let cached = Problem::new(ProblemKind::KeyReused, "other payload")
                    .into_response_cached(false, style, Some(&cache));
                let fresh = Problem::new(ProblemKind::KeyReused, "other payload")
                    .into_profile_response(false, style);
                assert_eq!(cached.status(), fresh.status());
                assert_eq!(cached.headers(), fresh.headers());
                assert_eq!(cached.body(), fresh.body());
            }
            // gRPC answers are the same in every profile.
            let grpc = Problem::new(ProblemKind::KeyReused, "other payload")
                .into_profile_response(true, style);
            assert_eq!(grpc.status(), StatusCode::OK);
            assert_eq!(grpc.headers()["grpc-status"], "9");
            assert!(grpc.body().is_empty());
        }
    }

    /// Every kind's `type` URI points at a section of this module's documentation: a
    /// heading whose text is the slug (rustdoc makes it the anchor). `.ci/run` checks the
    /// anchors in the built HTML too.
    #[test]
    fn every_problem_type_has_a_documented_anchor() {
        let source = include_str!("problem.rs");
        for kind in ALL_KINDS {
            let heading = format!("//! ## {}\n", kind.slug());
            assert!(source.contains(&heading), "no section for {}", kind.slug());
            assert!(
                kind.slug()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{} would not be its own anchor",
                kind.slug()
            );
        }
    }
}
