//! A gateway: puts the idempotency layer in front of any HTTP service, in any language.
//!
//! It listens on `LISTEN_ADDR` (HTTP/1.0, HTTP/1.1, and HTTP/2 with prior knowledge, h2c),
//! and forwards every request to `UPSTREAM_URL` over HTTP/1.1 (method, path and query,
//! headers, body, the `Idempotency-Key` included). A `POST` or `PATCH` with a key runs
//! upstream once: a retry gets the first answer replayed, a duplicate that arrives while the
//! first runs gets `409`, and the same key with another payload gets `422`.
//!
//! ```text
//! cargo install idempotency-gateway          # or: cargo install --path tools/gateway
//! UPSTREAM_URL=http://127.0.0.1:8080 IDEMPOTENCY_SHARED_SCOPE=1 idempotency-gateway
//! # from a checkout, the same program:
//! UPSTREAM_URL=http://127.0.0.1:8080 IDEMPOTENCY_SHARED_SCOPE=1 cargo run --example gateway
//! curl -i -X POST localhost:3002/payments -H 'Idempotency-Key: pay-1' -d '{"amount":12}'
//! ```
//!
//! This file is the gateway: the `idempotency-gateway` binary (`tools/gateway`) gives each
//! variable below a command-line flag as well (`idempotency-gateway --help`), and the
//! `gateway` example runs it from the environment alone.
//!
//! # Environment
//!
//! - `LISTEN_ADDR` (default `127.0.0.1:3002`): where to listen;
//! - `UPSTREAM_URL` (required): the service behind, `http://host:port` (a path prefix is kept:
//!   `http://host:port/api` forwards `/payments` to `/api/payments`);
//! - the caller scope (required, one of the two): keys of different callers must be kept
//!   apart, or one caller could be served another's stored response, so the gateway does not
//!   start until told how:
//!   - `IDEMPOTENCY_SCOPE_HEADER` and `IDEMPOTENCY_SCOPE_SECRET`: each value of this
//!     credential header (for example `authorization`) is a caller of its own, identified by
//!     an HMAC-SHA-256 keyed with the secret (the same on every gateway sharing a store); a
//!     request without the header gets `403 caller-unknown`, and a refreshed credential is a
//!     new caller (its retry runs again);
//!   - `IDEMPOTENCY_SHARED_SCOPE=1`: one scope for every caller, only right when one caller
//!     (or callers that trust each other) stands behind the gateway;
//! - `IDEMPOTENCY_STORE` (default `memory`): `memory`, `redis://…`,
//!   `redis-cluster://host:port[,host:port…]` (feature `redis`), `postgres://…` (feature
//!   `postgres`) or `mysql://…` (feature `mysql`), as in the orders demo; several gateways
//!   share a Redis, PostgreSQL or MySQL store;
//! - `IDEMPOTENCY_ASSIGN_KEY` (default `0`): `1` gives a request without a key one of its own
//!   (echoed in the response's `Idempotency-Key` header), instead of refusing it with `400`;
//! - `IDEMPOTENCY_LEASE_MS` (default 30000): how long a running request holds its key before
//!   another may take it over (renewed while it runs);
//! - `UPSTREAM_TIMEOUT_MS` (default 30000): how long the upstream has to begin its answer once
//!   the request is forwarded, and the longest pause within the answer's body;
//! - `UPSTREAM_CONNECT_TIMEOUT_MS` (default 5000, or half of `UPSTREAM_TIMEOUT_MS` if that is
//!   less; must be shorter than it): how long connecting to the upstream may take;
//! - `TRUST_FORWARDED` (default `0`): `1` when the gateway's clients are proxies it trusts.
//!   The gateway writes `Forwarded` (RFC 7239) and `X-Forwarded-For`, `-Host` and `-Proto`
//!   itself: the client's address, the host it asked for (`Host`, or HTTP/2's `:authority`)
//!   and `http`. Without `TRUST_FORWARDED=1` whatever the client sent in those four headers
//!   is dropped first; with it, the gateway's hop is appended to the client's `Forwarded`
//!   and `X-Forwarded-For`, and its `X-Forwarded-Host` and `-Proto` are kept.
//!
//! - `IDEMPOTENCY_PROBLEM_PROFILE` (default `rfc9457`): the shape of the gateway's own
//!   refusals (`400`, `409`, `422`, `503`, …): `rfc9457` (problem details), `stripe`
//!   (Stripe's error object) or `agentic-commerce` (the Agentic Commerce Protocol's error);
//!   see the library's `problem::Profile`.
//!
//! Flags take `1` or `0` (`true`/`false`, `yes`/`no`, `on`/`off`); anything else is an error.
//!
//! # When the upstream fails
//!
//! - **Connecting fails** (the name not resolved, refused, unreachable, or not resolved and
//!   connected within `UPSTREAM_CONNECT_TIMEOUT_MS`): nothing reached the upstream. The
//!   answer is `502 upstream-unreachable`, the key is released, and a retry with the same
//!   key is sent upstream again.
//! - **The upstream fails after the request was sent** (it closes the connection, resets it,
//!   or sends no valid answer): it may have run. The gateway answers `502 upstream-failed`
//!   marked [`MayHaveRun`](tower_idempotency::MayHaveRun), so that answer is stored under
//!   the key whatever its status (the completion is retried, holding the key, while the
//!   store fails), and every retry with it gets the same answer replayed (with
//!   `Idempotent-Replayed: true`): the upstream never runs twice. Look the result up at the
//!   upstream before sending the operation again with a new key.
//! - **The upstream does not begin its answer within `UPSTREAM_TIMEOUT_MS`**: the same, with
//!   `504 upstream-timeout`.
//! - **The upstream's answer stops midway** (its body fails, or pauses longer than
//!   `UPSTREAM_TIMEOUT_MS`): the client's response is cut off; the key keeps a tombstone
//!   (retries get `410 response-not-stored`), or, if the upstream's status was a `5xx`, is
//!   released.
//! - **The upstream answers** (any status): that answer, stored and replayed as the layer's
//!   settings say (`5xx`, `408`, `409`, `425` and `429` release the key: a retry runs again).
//!
//! A crash of the gateway while a request is upstream leaves its key held until the lease
//! runs out; after that a retry is sent again.
//!
//! # Requests refused before the layer
//!
//! A path that is not from the root (`*`), or that has a `.` or `..` segment, plain or
//! percent-encoded (`%2e%2e`, `%2E.`), before an encoded slash or a backslash (`..%2f`,
//! `..\`), or with `;parameters` (`..;x`), gets `400 path-not-forwardable` and nothing is
//! forwarded: no path leaves the prefix of `UPSTREAM_URL`.
//!
//! The gateway's own problems (`application/problem+json`, RFC 9457) have the `type`
//! `https://docs.rs/crate/idempotency-gateway/latest/source/src/gateway.rs#<slug>`, where
//! `<slug>` is `upstream-unreachable`, `upstream-failed`, `upstream-timeout` or
//! `path-not-forwardable`; the layer's own (`409`, `422`, `403`, …) are described in the
//! `problem` module.
//!
//! # Exit status
//!
//! - `0`: stopped on Ctrl-C or SIGTERM, after the requests in progress finished and the
//!   records still being stored were stored (waiting up to 10 s for them);
//! - `1`: the store could not be opened, the address could not be bound, or records were still
//!   unstored 10 s after the stop;
//! - `2`: the settings are wrong or incomplete (the message on stderr names the setting), or
//!   (the binary) an unknown flag.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;
use tower_idempotency::policy::MissingKey;
use tower_idempotency::problem::Profile;
use tower_idempotency::{
    DetachedWork, IdempotencyClaim, IdempotencyLayer, IdempotencyStore, MayHaveRun,
};

/// How the gateway tells its callers apart, so that one caller is never served another's
/// stored answer. There is no default: the gateway does not start without one.
#[derive(Debug, Clone)]
pub enum CallerScope {
    /// Each value of this credential header (an API key, a bearer token) is a caller of its
    /// own, identified by an HMAC-SHA-256 of it keyed with the secret; a request without the
    /// header is refused (`403 caller-unknown`). A new or refreshed credential is a new
    /// caller: its retry runs again.
    Credential {
        /// The header, such as `authorization`.
        header: HeaderName,
        /// The HMAC key, the same on every gateway sharing a store.
        secret: Vec<u8>,
    },
    /// One scope for every caller: right only when a single caller, or callers that trust
    /// each other, stand behind the gateway.
    Shared,
}

/// Why the gateway refuses to start without a scope.
const NO_SCOPE: &str = "no caller scope chosen. Keys of different callers must be kept \
    apart, or one caller can be served another's stored response: set \
    IDEMPOTENCY_SCOPE_HEADER (a credential header, such as authorization) and \
    IDEMPOTENCY_SCOPE_SECRET (the HMAC secret, the same on every gateway sharing a store) to \
    scope keys by credential, or IDEMPOTENCY_SHARED_SCOPE=1 to share one scope among all \
    callers (only when one caller, or callers that trust each other, stand behind the \
    gateway)";

/// What the gateway is set up with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The service behind.
    pub upstream: Uri,
    /// `memory`, `redis://…`, `redis-cluster://…`, `postgres://…` or `mysql://…`.
    pub store: String,
    /// Give a request without a key one of its own.
    pub assign_key: bool,
    /// How the keys of different callers are kept apart.
    pub scope: CallerScope,
    /// The lease of a running request.
    pub lease: Duration,
    /// How long the upstream has to begin its answer once the request is forwarded (then
    /// `504`, and the key is kept), and the longest pause within its body.
    pub upstream_timeout: Duration,
    /// How long connecting to the upstream may take (then `502`, and the key is released);
    /// shorter than `upstream_timeout`, so that a request that timed out was connected.
    pub connect_timeout: Duration,
    /// Keep the `Forwarded` and `X-Forwarded-*` headers the client sent (it is a proxy the
    /// gateway trusts), adding the gateway's own hop; otherwise they are replaced.
    pub trust_forwarded: bool,
    /// The shape of the gateway's own refusals.
    pub profile: Profile,
}

impl Settings {
    /// Reads the settings from the environment.
    pub fn from_env() -> Result<Self, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the settings from `get`, which returns the value of a variable (an empty
    /// value counts as unset).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        let flag = |name: &str| match var(name).as_deref() {
            None | Some("0" | "false" | "no" | "off") => Ok(false),
            Some("1" | "true" | "yes" | "on") => Ok(true),
            Some(other) => Err(format!("{name} must be 1 or 0, not {other:?}")),
        };
        let listen = var("LISTEN_ADDR")
            .unwrap_or_else(|| "127.0.0.1:3002".to_owned())
            .parse()
            .map_err(|e| format!("LISTEN_ADDR: {e}"))?;
        let upstream = var("UPSTREAM_URL")
            .ok_or("UPSTREAM_URL is required: the service to forward to, http://host:port")?;
        let upstream: Uri = upstream
            .parse()
            .map_err(|e| format!("UPSTREAM_URL {upstream:?}: {e}"))?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            return Err(format!(
                "UPSTREAM_URL must be http://host:port…, not {upstream}"
            ));
        }
        let scope = match (
            var("IDEMPOTENCY_SCOPE_HEADER"),
            var("IDEMPOTENCY_SCOPE_SECRET"),
            flag("IDEMPOTENCY_SHARED_SCOPE")?,
        ) {
            (Some(header), Some(secret), false) => CallerScope::Credential {
                header: header
                    .parse()
                    .map_err(|e| format!("IDEMPOTENCY_SCOPE_HEADER: {e}"))?,
                secret: secret.into_bytes(),
            },
            (None, None, true) => CallerScope::Shared,
            (None, None, false) => return Err(NO_SCOPE.to_owned()),
            (Some(_), Some(_), true) => {
                return Err(
                    "IDEMPOTENCY_SHARED_SCOPE=1 contradicts IDEMPOTENCY_SCOPE_HEADER \
                            and IDEMPOTENCY_SCOPE_SECRET: choose one way to scope keys"
                        .to_owned(),
                );
            }
            _ => {
                return Err(
                    "IDEMPOTENCY_SCOPE_HEADER and IDEMPOTENCY_SCOPE_SECRET go together".to_owned(),
                );
            }
        };
        let millis = |name: &str| -> Result<Option<Duration>, String> {
            var(name)
                .map(|ms| match ms.parse::<u64>() {
                    Ok(0) => Err(format!("{name} must be more than 0")),
                    Ok(ms) => Ok(Duration::from_millis(ms)),
                    Err(e) => Err(format!("{name} {ms:?}: {e}")),
                })
                .transpose()
        };
        let lease = millis("IDEMPOTENCY_LEASE_MS")?.unwrap_or(Duration::from_secs(30));
        let upstream_timeout = millis("UPSTREAM_TIMEOUT_MS")?.unwrap_or(Duration::from_secs(30));
        let connect_timeout = match millis("UPSTREAM_CONNECT_TIMEOUT_MS")? {
            Some(connect) if connect >= upstream_timeout => {
                return Err(format!(
                    "UPSTREAM_CONNECT_TIMEOUT_MS ({} ms) must be shorter than \
                     UPSTREAM_TIMEOUT_MS ({} ms): a request that times out must have been \
                     connected, to know whether it may have reached the upstream",
                    connect.as_millis(),
                    upstream_timeout.as_millis()
                ));
            }
            Some(connect) => connect,
            None => Duration::from_secs(5).min(upstream_timeout / 2),
        };
        Ok(Self {
            listen,
            upstream,
            store: var("IDEMPOTENCY_STORE").unwrap_or_else(|| "memory".to_owned()),
            assign_key: flag("IDEMPOTENCY_ASSIGN_KEY")?,
            scope,
            lease,
            upstream_timeout,
            connect_timeout,
            trust_forwarded: flag("TRUST_FORWARDED")?,
            profile: match var("IDEMPOTENCY_PROBLEM_PROFILE").as_deref() {
                None | Some("rfc9457") => Profile::Rfc9457,
                Some("stripe") => Profile::Stripe,
                Some("agentic-commerce") => Profile::AgenticCommerce,
                Some(other) => {
                    return Err(format!(
                        "IDEMPOTENCY_PROBLEM_PROFILE must be rfc9457, stripe or \
                         agentic-commerce, not {other:?}"
                    ));
                }
            },
        })
    }
}

/// Opens the store named by `url` ([`tower_idempotency::store::open`]).
pub async fn open_store(url: &str) -> Result<Arc<dyn IdempotencyStore>, String> {
    tower_idempotency::store::open(url)
        .await
        .map_err(|e| format!("IDEMPOTENCY_STORE: {}", chain(&e)))
}

/// Where requests go, and the client that takes them there.
struct Upstream {
    base: Uri,
    client: Client<BoundedConnect, Body>,
    trust_forwarded: bool,
    /// How long the upstream has to begin its answer, and the longest pause in its body.
    timeout: Duration,
}

/// Headers that belong to one connection, not to the request: never forwarded.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Removes the hop-by-hop headers, and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut axum::http::HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| name.trim().parse().ok())
        .collect();
    let hop: Vec<HeaderName> = headers.keys().filter(|n| hop_by_hop(n)).cloned().collect();
    for name in named.iter().chain(&hop) {
        headers.remove(name);
    }
}

/// The headers that say whom a proxy forwards for.
const FORWARDING: [&str; 4] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// Writes the gateway's hop in `Forwarded` (RFC 7239) and `X-Forwarded-For`, `-Host` and
/// `-Proto`: the client's address, the host it asked for (its `Host`, or its HTTP/2
/// `:authority`) and `http` (the gateway listens on plain HTTP). What the client sent in
/// these headers is dropped first, unless `trust` (the client is a proxy the gateway
/// trusts): then the gateway's hop is appended to its `Forwarded` and `X-Forwarded-For`,
/// and its `X-Forwarded-Host` and `-Proto` are kept.
fn forwarding(
    headers: &mut HeaderMap,
    peer: Option<IpAddr>,
    host: Option<HeaderValue>,
    trust: bool,
) {
    fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }
    let (earlier_for, earlier_forwarded) = if trust {
        (
            joined(headers, "x-forwarded-for"),
            joined(headers, "forwarded"),
        )
    } else {
        for name in FORWARDING {
            headers.remove(name);
        }
        (None, None)
    };
    // One element of `Forwarded`: a value that is not a token is quoted (an IPv6
    // address in brackets, a host with a port).
    let quoted = |v: &str| {
        if v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            v.to_owned()
        } else {
            format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
        }
    };
    let mut element = Vec::new();
    if let Some(ip) = peer {
        let node = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        element.push(format!("for={}", quoted(&node)));
        let chain = match earlier_for {
            Some(earlier) => format!("{earlier}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&chain) {
            headers.insert("x-forwarded-for", value);
        }
    }
    if let Some(host) = host.as_ref().and_then(|h| h.to_str().ok()) {
        element.push(format!("host={}", quoted(host)));
    }
    element.push("proto=http".to_owned());
    let element = element.join(";");
    let forwarded = match earlier_forwarded {
        Some(earlier) => format!("{earlier}, {element}"),
        None => element,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert("forwarded", value);
    }
    if !headers.contains_key("x-forwarded-host")
        && let Some(host) = host
    {
        headers.insert("x-forwarded-host", host);
    }
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
}

/// An RFC 9457 problem that the gateway answers itself.
fn problem(status: StatusCode, slug: &str, title: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("{PROBLEM_BASE}{slug}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

/// Where the gateway's own problem types are described: this example's module
/// documentation.
const PROBLEM_BASE: &str =
    "https://docs.rs/crate/idempotency-gateway/latest/source/src/gateway.rs#";

/// Whether `path` could climb out of the upstream's prefix: it is not a path from the root
/// (`*`, or a relative form), or one of its segments is `.` or `..` once percent-decoded
/// (`%2e%2e`, `%2E.`), split at `/` and `\` (as some upstreams split) and with any
/// `;parameters` set aside (as Tomcat does: `..;x` is `..` there), which also catches
/// `..%2f` and `..%5c`.
fn climbs(path: &str) -> bool {
    if !path.starts_with('/') {
        return true;
    }
    let mut decoded = Vec::with_capacity(path.len());
    let mut bytes = path.bytes();
    while let Some(b) = bytes.next() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if b == b'%'
            && let (Some(h), Some(l)) = (bytes.clone().next(), bytes.clone().nth(1))
            && let (Some(h), Some(l)) = (hex(h), hex(l))
        {
            decoded.push((h * 16 + l) as u8);
            bytes.nth(1);
        } else {
            decoded.push(b);
        }
    }
    decoded
        .split(|&b| b == b'/' || b == b'\\')
        .map(|segment| segment.split(|&b| b == b';').next().unwrap_or_default())
        .any(|segment| segment == b"." || segment == b"..")
}

/// Refuses, before the idempotency layer sees it, a request whose path could reach outside
/// the upstream's prefix.
async fn refuse_dot_segments(req: Request, next: Next) -> Response {
    if climbs(req.uri().path()) {
        return problem(
            StatusCode::BAD_REQUEST,
            "path-not-forwardable",
            "Path not forwardable",
            "The request's path has a `.` or `..` segment (perhaps percent-encoded, or \
             followed by an encoded slash or a backslash), which could reach outside the \
             upstream's prefix; nothing was forwarded.",
        );
    }
    next.run(req).await
}

/// Forwards one request upstream and its answer back.
async fn forward(State(upstream): State<Arc<Upstream>>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let prefix = upstream.base.path().trim_end_matches('/');
    let target = format!(
        "{}://{}{prefix}{path}",
        upstream.base.scheme_str().unwrap_or("http"),
        upstream.base.authority().map_or("", |a| a.as_str()),
    );
    let host = parts
        .headers
        .get(header::HOST)
        .cloned()
        .or_else(|| parts.uri.authority()?.as_str().parse().ok());
    parts.uri = match target.parse() {
        Ok(uri) => uri,
        Err(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "path-not-forwardable",
                "Path not forwardable",
                "The request's path cannot be joined to the upstream's address; nothing was \
                 forwarded.",
            );
        }
    };
    // The upstream client speaks HTTP/1.1, whatever the client spoke to the gateway
    // (HTTP/1.0, HTTP/1.1 or HTTP/2).
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    // The upstream sees its own host; the client's is passed on in the forwarding headers.
    parts.headers.remove(header::HOST);
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    forwarding(&mut parts.headers, peer, host, upstream.trust_forwarded);
    // Whether the layer holds a key for the operation (a covered request with a key).
    let keyed = parts.extensions.get::<IdempotencyClaim>().is_some();
    let sent = tokio::time::timeout(
        upstream.timeout,
        upstream.client.request(Request::from_parts(parts, body)),
    )
    .await;
    match sent {
        Ok(Ok(res)) => {
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            // A body that pauses longer than the timeout is cut off: its record is a
            // tombstone (the operation ran), or, for a 5xx, the key is released.
            Response::from_parts(parts, Body::new(TimeoutBody::new(upstream.timeout, body)))
        }
        // Nothing reached the upstream (no address, refused, no route, connect timeout):
        // the 502 is not storable, so the key is released and a retry is sent again.
        Ok(Err(err)) if err.is_connect() => {
            tracing::warn!(error = %chain(&err), "upstream unreachable");
            problem(
                StatusCode::BAD_GATEWAY,
                "upstream-unreachable",
                "Upstream unreachable",
                &format!(
                    "The gateway could not connect to the upstream ({}); nothing was sent to \
                     it. A retry with the same Idempotency-Key is sent again.",
                    chain(&err)
                ),
            )
        }
        Ok(Err(err)) => {
            tracing::warn!(error = %chain(&err), "upstream failed after the request was sent");
            may_have_run(
                keyed,
                StatusCode::BAD_GATEWAY,
                "upstream-failed",
                "Upstream failed",
                format!(
                    "The request was sent to the upstream, which failed before answering ({}).",
                    chain(&err)
                ),
            )
        }
        Err(_) => {
            tracing::warn!(timeout = ?upstream.timeout, "upstream timed out");
            may_have_run(
                keyed,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-timeout",
                "Upstream timed out",
                format!(
                    "The request was sent to the upstream, which did not answer within {} ms.",
                    upstream.timeout.as_millis()
                ),
            )
        }
    }
}

/// The request reached the upstream, which gave no answer: it may have run. The answer is
/// marked [`MayHaveRun`], so the layer stores it whatever its status and never releases
/// the key: every retry gets it replayed instead of being sent upstream again. (Storing it
/// is the completion's one store call, retried while the store fails, holding the key.)
fn may_have_run(
    keyed: bool,
    status: StatusCode,
    slug: &str,
    title: &str,
    what: String,
) -> Response {
    let then = if keyed {
        "It may have run. It will not be sent again with this Idempotency-Key: a retry gets \
         this answer. Look its result up at the upstream before sending it again with a new \
         key."
    } else {
        "It may have run. The request had no Idempotency-Key: look its result up at the \
         upstream before sending it again."
    };
    let mut res = problem(status, slug, title, &format!("{what} {then}"));
    res.extensions_mut().insert(MayHaveRun);
    res
}

/// An error with its sources, `: `-separated.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        out.push_str(": ");
        out.push_str(&err.to_string());
        source = err.source();
    }
    out
}

/// Turns the upstream's host name into its addresses: the system's resolver
/// ([`app`]), or another ([`app_resolving`]).
pub type Resolver = tower::util::BoxCloneSyncService<Name, Addresses, BoxError>;

/// The addresses a [`Resolver`] found.
pub type Addresses = Box<dyn Iterator<Item = SocketAddr> + Send>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to the upstream, the name resolved and the connection made within one bound
/// (`connect_timeout`): a resolver that hangs ends as a connect error (`502`, nothing was
/// sent, the key is released), never as the upstream timeout (`504`, stored as a request
/// that may have run).
#[derive(Clone)]
struct BoundedConnect {
    connector: HttpConnector<Resolver>,
    limit: Duration,
}

impl tower::Service<Uri> for BoundedConnect {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        tower::Service::poll_ready(&mut self.connector, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = tower::Service::call(&mut self.connector, uri);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(format!(
                    "the upstream's name was not resolved and connected within {} ms",
                    limit.as_millis()
                )
                .into()),
            }
        })
    }
}

/// The gateway's router (every path forwarded, behind the layer), and the layer's detached
/// work, to finish at shutdown. The upstream's name is resolved by the system's resolver.
pub async fn app(settings: &Settings) -> Result<(Router, DetachedWork), String> {
    let system = tower::service_fn(|name: Name| async move {
        let addresses = tower::Service::call(&mut GaiResolver::new(), name).await?;
        Ok::<_, BoxError>(Box::new(addresses) as Addresses)
    });
    app_resolving(settings, Resolver::new(system)).await
}

/// [`app`], with the upstream's name resolved by `resolver`, within `connect_timeout` as
/// connecting is.
pub async fn app_resolving(
    settings: &Settings,
    resolver: Resolver,
) -> Result<(Router, DetachedWork), String> {
    let store = open_store(&settings.store).await?;
    let mut layer = IdempotencyLayer::new(store)
        .lease(settings.lease)
        .problem_profile(settings.profile);
    layer = match &settings.scope {
        CallerScope::Credential { header, secret } => {
            layer.scope_by_credential(header.clone(), secret)
        }
        // One caller behind the gateway, or callers that trust each other: chosen
        // explicitly.
        CallerScope::Shared => layer.share_keys_across_callers(),
    };
    if settings.assign_key {
        layer = layer.missing_key(MissingKey::Generate);
    }
    let work = layer.detached_work();
    let mut connector = HttpConnector::new_with_resolver(resolver);
    connector.set_connect_timeout(Some(settings.connect_timeout));
    connector.set_nodelay(true);
    let connector = BoundedConnect {
        connector,
        limit: settings.connect_timeout,
    };
    let upstream = Upstream {
        base: settings.upstream.clone(),
        client: Client::builder(TokioExecutor::new()).build(connector),
        trust_forwarded: settings.trust_forwarded,
        timeout: settings.upstream_timeout,
    };
    let router = Router::new()
        .fallback(forward)
        .with_state(Arc::new(upstream))
        // axum's own body type: the requests the layer passes through (every GET) keep
        // the upstream's body as it is.
        .layer(layer.for_axum())
        .layer(axum::middleware::from_fn(refuse_dot_segments));
    Ok((router, work))
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the requests in progress
/// finish. Each connection speaks HTTP/1.1 (or 1.0) or HTTP/2 with prior knowledge (h2c),
/// whichever its first bytes say; the client's address is in each request's extensions as
/// axum's `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, or a connection reset before it was taken:
                    // pause rather than spin, and go on.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req.map(Body::new))
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// Runs the gateway with `settings` until Ctrl-C or SIGTERM; answers the exit status
/// (see [Exit status](self#exit-status)).
pub async fn run(settings: Settings) -> u8 {
    let (app, work) = match app(&settings).await {
        Ok(app) => app,
        Err(err) => {
            eprintln!("gateway: {err}");
            return 1;
        }
    };
    let listener = match tokio::net::TcpListener::bind(settings.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("gateway: cannot listen on {}: {err}", settings.listen);
            return 1;
        }
    };
    tracing::info!(
        listen = %settings.listen,
        upstream = %settings.upstream,
        store = %tower_idempotency::store::redact_password(&settings.store),
        "gateway ready"
    );
    serve(listener, app, async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    })
    .await;
    // The records of answers already sent (and of requests whose client left) are stored
    // before exiting.
    if let Err(unfinished) = work.shutdown(Duration::from_secs(10)).await {
        eprintln!("gateway stopped: {unfinished}");
        return 1;
    }
    0
}
