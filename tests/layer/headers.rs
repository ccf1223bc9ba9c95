//! Header fields the layer reads and writes itself: the credential a scope is derived from
//! (every field of it, none of it blank), and the headers a replay carries (never a
//! connection's own, never a record's framing).

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use common::{Counter, FaultStore, assert_problem, call, post};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tower::Layer;
use tower_idempotency::store::{KeyState, LeaseToken, Record, StoreKey};
use tower_idempotency::{
    Fingerprint, IdempotencyLayer, IdempotencyOutcome, IdempotencyStore, MemoryStore, Scope,
};

const SECRET: &str = "a fleet-wide secret of 32 bytes!";

/// A keyed POST carrying `name` once per value, each value a field of its own.
fn with_fields(key: &str, name: &HeaderName, values: &[&str]) -> Request<Body> {
    let mut req = post(Some(key), "{}");
    for value in values {
        req.headers_mut()
            .append(name.clone(), HeaderValue::from_str(value).unwrap());
    }
    req
}

/// Caller B's cookie differs from caller A's in its second field only: B must run its own
/// operation. The same cookie in one field (HTTP/1.1) or in several (HTTP/2) is the same
/// caller. For another header every field counts, in order, and a value cannot be moved
/// across the boundary between two fields.
#[tokio::test]
async fn every_credential_field_goes_into_the_scope() {
    let counter = Counter::default();
    let svc = IdempotencyLayer::new(MemoryStore::new())
        .scope_by_credential(header::COOKIE, SECRET)
        .layer(counter.service(Duration::ZERO));
    let a = call(
        &svc,
        with_fields("k", &header::COOKIE, &["theme=dark", "session=a"]),
    )
    .await;
    let b = call(
        &svc,
        with_fields("k", &header::COOKIE, &["theme=dark", "session=b"]),
    )
    .await;
    assert!(!a.replayed());
    assert!(!b.replayed(), "caller B was replayed caller A's answer");
    assert_ne!(a.body, b.body);
    assert_eq!(counter.runs(), 2);
    // RFC 9113 §8.2.3: cookie crumbs in separate fields are one cookie joined with "; ".
    let a_in_one = call(
        &svc,
        with_fields("k", &header::COOKIE, &["theme=dark; session=a"]),
    )
    .await;
    assert!(
        a_in_one.replayed(),
        "one cookie, split or not, is one caller"
    );
    assert_eq!(a_in_one.body, a.body);
    assert_eq!(counter.runs(), 2);

    let api_key = HeaderName::from_static("x-api-key");
    let store = FaultStore::new(MemoryStore::new());
    let counter = Counter::default();
    let svc = IdempotencyLayer::new(store.clone())
        .scope_by_credential(api_key.clone(), SECRET)
        .layer(counter.service(Duration::ZERO));
    let mut bodies = Vec::new();
    for values in [
        &["k1", "k2"][..],
        &["k1", "k3"],
        &["k1"],
        &["ab", "c"],
        &["a", "bc"],
        &["abc"],
        &["k2", "k1"],
    ] {
        let answer = call(&svc, with_fields("k", &api_key, values)).await;
        assert!(
            !answer.replayed(),
            "{values:?} was replayed another caller's answer"
        );
        bodies.push(answer.body);
    }
    assert_eq!(counter.runs(), 7);
    // A credential sent once keeps the scope it always had.
    let keys = store.faults.claimed_keys.lock().unwrap().clone();
    let one = Scope::keyed(SECRET.as_bytes(), b"k1");
    assert!(
        keys.contains(&format!("{}:k", one.as_str())),
        "{keys:?} lacks the scope of the single value"
    );
}

/// Over real HTTP/2 (hyper server, hyper-util client speaking HTTP/2 only, an axum router):
/// a browser's cookie crumbs travel as separate fields, and callers whose cookies share
/// their first crumb still get answers of their own.
#[tokio::test]
async fn cookie_crumbs_in_separate_http2_fields_keep_callers_apart() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app: Router = Router::new()
        .route(
            "/orders",
            axum::routing::post({
                let runs = Arc::clone(&runs);
                move |headers: HeaderMap| {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    let fields = headers.get_all(header::COOKIE).iter().count();
                    async move {
                        (
                            StatusCode::CREATED,
                            format!("run {n}, {fields} cookie fields"),
                        )
                    }
                }
            }),
        )
        .layer(
            IdempotencyLayer::new(MemoryStore::new()).scope_by_credential(header::COOKIE, SECRET),
        );
    let addr = common::serve(app).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let send = |cookies: &'static [&'static str]| {
        let client = client.clone();
        async move {
            let mut req = Request::post(format!("http://{addr}/orders"))
                .header("idempotency-key", "same-key");
            for cookie in cookies {
                req = req.header(header::COOKIE, *cookie);
            }
            let res = client
                .request(req.body(Full::new(Bytes::from_static(b"{}"))).unwrap())
                .await
                .unwrap();
            assert_eq!(res.version(), http::Version::HTTP_2);
            let replayed = res.headers().contains_key("idempotent-replayed");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (replayed, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    let (a_replayed, a) = send(&["theme=dark", "session=a"]).await;
    assert!(!a_replayed);
    assert_eq!(
        a, "run 0, 2 cookie fields",
        "the crumbs arrived as separate fields"
    );
    let (b_replayed, b) = send(&["theme=dark", "session=b"]).await;
    assert!(!b_replayed, "caller B was replayed caller A's answer: {b}");
    assert_eq!(b, "run 1, 2 cookie fields");
    let (again, a_again) = send(&["theme=dark", "session=a"]).await;
    assert!(again);
    assert_eq!(a_again, a);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// An empty or blank credential identifies nobody: it is refused like a missing one, also
/// when it is sent in several fields that are all blank.
#[tokio::test]
async fn blank_credentials_are_missing() {
    let counter = Counter::default();
    let api_key = HeaderName::from_static("x-api-key");
    let by_key = IdempotencyLayer::new(MemoryStore::new())
        .scope_by_credential(api_key.clone(), SECRET)
        .layer(counter.service(Duration::ZERO));
    let by_cookie = IdempotencyLayer::new(MemoryStore::new())
        .scope_by_credential(header::COOKIE, SECRET)
        .layer(counter.service(Duration::ZERO));
    for values in [
        &[""][..],
        &["   "],
        &["\t \t"],
        &["", " "],
        &[" ", "", "\t"],
    ] {
        let answer = call(&by_key, with_fields("k", &api_key, values)).await;
        assert_problem(&answer, 403, "caller-unknown");
        let answer = call(&by_cookie, with_fields("k", &header::COOKIE, values)).await;
        assert_problem(&answer, 403, "caller-unknown");
    }
    assert_eq!(
        counter.runs(),
        0,
        "a blank credential was taken for a caller"
    );
}

/// A handler's answer naming headers in `Connection`, and the fixed hop-by-hop set.
fn connection_scoped_answer() -> Response<Bytes> {
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::CONNECTION, "X-Internal, keep-alive")
        .header(header::CONNECTION, " x-other ")
        .header("x-internal", "secret")
        .header("x-other", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header(header::UPGRADE, "h2c")
        .header(header::TRAILER, "x-checksum")
        .header(header::TE, "trailers")
        .header("x-public", "yes")
        .header(header::LOCATION, "/orders/1")
        .body(Bytes::from_static(b"made"))
        .unwrap()
}

fn assert_no_connection_fields(headers: &HeaderMap, what: &str) {
    for name in [
        "connection",
        "x-internal",
        "x-other",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
    ] {
        assert!(
            !headers.contains_key(name),
            "{what} carries {name}: {headers:?}"
        );
    }
    assert_eq!(headers["x-public"], "yes", "{what}");
    assert_eq!(headers["location"], "/orders/1", "{what}");
    // `Trailer` is not hop-by-hop (RFC 9110 §6.6.2): kept, so that an HTTP/1.1 server
    // sends the trailers a replay carries.
    assert_eq!(headers["trailer"], "x-checksum", "{what}");
}

/// Headers named in `Connection` (RFC 9110 §7.6.1) belong to the first answer's
/// connection: they are never stored, so no retry is ever given them.
#[tokio::test]
async fn connection_scoped_headers_are_never_stored_or_replayed() {
    let store = MemoryStore::new();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .layer(tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(connection_scoped_answer().map(Body::from))
        }));
    let first = call(&svc, post(Some("k"), "{}")).await;
    assert_eq!(
        first.headers["x-internal"], "secret",
        "the live answer is untouched"
    );
    let again = call(&svc, post(Some("k"), "{}")).await;
    assert!(again.replayed());
    assert_no_connection_fields(&again.headers, "the replay");
    let KeyState::Completed { record, .. } = store
        .inspect(&StoreKey::new(&Scope::anonymous(), "k"))
        .await
        .unwrap()
    else {
        panic!("no record");
    };
    assert_no_connection_fields(record.headers(), "the record");
}

/// A key committed with no outcome, for a request whose body is `body`.
async fn unsettled(store: &MemoryStore, key: &str, body: &[u8]) {
    let key = StoreKey::new(&Scope::anonymous(), key);
    let token = LeaseToken::new();
    let fingerprint = Fingerprint::of_fields([body]);
    store
        .claim(&key, &fingerprint, token, Duration::from_secs(30))
        .await
        .unwrap();
    store
        .commit(&key, token, Duration::from_secs(60))
        .await
        .unwrap();
    let _ = store.release(&key, token).await;
    assert!(matches!(
        store.inspect(&key).await.unwrap(),
        KeyState::OutcomeUnknown { .. }
    ));
}

/// The recovery hook's answer is stored the way a handler's is: without the headers of a
/// connection and without framing.
#[tokio::test]
async fn recovered_answers_are_stored_without_connection_or_framing_headers() {
    let store = MemoryStore::new();
    unsettled(&store, "r", b"{}").await;
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .fingerprint_with(|_, body| Fingerprint::of_fields([body.as_ref()]))
        .recover_with(|_| async {
            let (mut parts, body) = connection_scoped_answer().into_parts();
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
            Ok(Some(Response::from_parts(parts, body)))
        })
        .layer(tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::from("ran again")))
        }));
    let recovered = call(&svc, post(Some("r"), "{}")).await;
    assert_eq!(recovered.outcome, Some(IdempotencyOutcome::Recovered));
    assert_eq!(recovered.body, "made");
    assert_no_connection_fields(&recovered.headers, "the recovered answer");
    assert_eq!(recovered.headers[header::CONTENT_LENGTH], "4");
    assert!(!recovered.headers.contains_key(header::TRANSFER_ENCODING));
    let KeyState::Completed { record, .. } = store
        .inspect(&StoreKey::new(&Scope::anonymous(), "r"))
        .await
        .unwrap()
    else {
        panic!("no record");
    };
    assert_no_connection_fields(record.headers(), "the recovered record");
    assert!(!record.headers().contains_key(header::CONTENT_LENGTH));
    assert!(!record.headers().contains_key(header::TRANSFER_ENCODING));
}

/// Stores `record` as the outcome of a request with body `{}` under `key`.
async fn stored(store: &MemoryStore, key: &str, record: Record) {
    let key = StoreKey::new(&Scope::anonymous(), key);
    let token = LeaseToken::new();
    let fingerprint = Fingerprint::of_fields([&b"{}"[..]]);
    store
        .claim(&key, &fingerprint, token, Duration::from_secs(30))
        .await
        .unwrap();
    store
        .complete(
            &key,
            token,
            record.with_fingerprint(fingerprint),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
}

fn record(status: u16, headers: &[(&str, &str)], body: &'static str) -> Record {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    Record::new(
        StatusCode::from_u16(status).unwrap(),
        map,
        Bytes::from_static(body.as_bytes()),
        None,
    )
}

/// Records whose framing headers lie about their body (a hand-made record, an operator's
/// `settle --header`, an old or damaged one).
async fn lying_records() -> MemoryStore {
    let store = MemoryStore::new();
    let ct = ("content-type", "text/plain");
    stored(
        &store,
        "long",
        record(201, &[ct, ("content-length", "50")], "hello"),
    )
    .await;
    stored(
        &store,
        "short",
        record(201, &[ct, ("content-length", "2")], "hello"),
    )
    .await;
    stored(
        &store,
        "chunked",
        record(201, &[ct, ("transfer-encoding", "gzip, chunked")], "hello"),
    )
    .await;
    stored(
        &store,
        "twice",
        record(
            201,
            &[ct, ("content-length", "5"), ("content-length", "7")],
            "hello",
        ),
    )
    .await;
    stored(
        &store,
        "empty",
        record(200, &[("content-length", "12")], ""),
    )
    .await;
    stored(
        &store,
        "no-content",
        record(204, &[("content-length", "3")], ""),
    )
    .await;
    store
}

fn replaying(
    store: MemoryStore,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<tower_idempotency::IdempotencyBody<Body>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .fingerprint_with(|_, body| Fingerprint::of_fields([body.as_ref()]))
        .layer(tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::from("ran again")))
        }))
}

/// A replay's framing comes from its body: `Content-Length` is the body's length, whatever
/// the record says, and `Transfer-Encoding` is never replayed. An empty body (`204`, `304`,
/// an answer to `HEAD`) is framed by the server.
#[tokio::test]
async fn replays_are_framed_by_their_body_not_by_the_record() {
    let svc = replaying(lying_records().await);
    for key in ["long", "short", "chunked", "twice"] {
        let answer = call(&svc, post(Some(key), "{}")).await;
        assert!(answer.replayed(), "{key}");
        assert_eq!(answer.body, "hello", "{key}");
        let lengths: Vec<_> = answer
            .headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .collect();
        assert_eq!(lengths, ["5"], "{key}");
        assert!(
            !answer.headers.contains_key(header::TRANSFER_ENCODING),
            "{key}"
        );
    }
    for key in ["empty", "no-content"] {
        let answer = call(&svc, post(Some(key), "{}")).await;
        assert!(answer.replayed(), "{key}");
        assert!(answer.body.is_empty());
        assert!(
            !answer.headers.contains_key(header::CONTENT_LENGTH),
            "{key}: {:?}",
            answer.headers
        );
    }
}

/// What a client over real TCP got, or what went wrong.
async fn fetch(
    addr: SocketAddr,
    h2: bool,
    key: &str,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let req = Request::post("/orders")
        .header("host", "127.0.0.1")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let exchange = async move {
        let res = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(req).await.map_err(|e| e.to_string())?
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(req).await.map_err(|e| e.to_string())?
        };
        let (parts, body) = res.into_parts();
        let body = body.collect().await.map_err(|e| format!("body: {e}"))?;
        Ok((parts.status, parts.headers, body.to_bytes()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "timed out: the body never ended".to_owned())?
}

/// Over a real hyper server, HTTP/1.1 and HTTP/2: a replay of a record whose framing
/// headers lie arrives whole and correctly framed, and the server goes on serving.
#[tokio::test]
async fn lying_framing_in_a_record_is_not_put_on_the_wire() {
    let addr = common::serve(replaying(lying_records().await)).await;
    for h2 in [false, true] {
        for key in ["long", "short", "chunked", "twice"] {
            let (status, headers, body) = fetch(addr, h2, key)
                .await
                .unwrap_or_else(|e| panic!("{key} (h2: {h2}): {e}"));
            assert_eq!(status, StatusCode::CREATED, "{key} (h2: {h2})");
            assert_eq!(headers["idempotent-replayed"], "true");
            assert_eq!(body, "hello", "{key} (h2: {h2})");
            assert_eq!(headers[header::CONTENT_LENGTH], "5", "{key} (h2: {h2})");
            assert!(!headers.contains_key(header::TRANSFER_ENCODING));
        }
        let (status, headers, body) = fetch(addr, h2, "no-content").await.unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(body.is_empty());
        assert!(!headers.contains_key(header::CONTENT_LENGTH), "h2: {h2}");
        let (status, headers, body) = fetch(addr, h2, "empty").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.is_empty());
        assert_ne!(
            headers.get(header::CONTENT_LENGTH).map(|v| v.as_bytes()),
            Some(&b"12"[..])
        );
    }
}

/// A handler's answer is stored without its framing: a replay is framed by its body.
#[tokio::test]
async fn recorded_answers_are_stored_without_framing_headers() {
    let store = MemoryStore::new();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .layer(tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header(header::CONTENT_LENGTH, "4")
                    .header(header::CONTENT_TYPE, "text/plain")
                    .body(Body::from("made"))
                    .unwrap(),
            )
        }));
    let first = call(&svc, post(Some("k"), "{}")).await;
    assert_eq!(first.headers[header::CONTENT_LENGTH], "4");
    let KeyState::Completed { record, .. } = store
        .inspect(&StoreKey::new(&Scope::anonymous(), "k"))
        .await
        .unwrap()
    else {
        panic!("no record");
    };
    assert!(
        !record.headers().contains_key(header::CONTENT_LENGTH),
        "{record:?}"
    );
    assert_eq!(record.headers()[header::CONTENT_TYPE], "text/plain");
    let again = call(&svc, post(Some("k"), "{}")).await;
    assert!(again.replayed());
    assert_eq!(again.headers[header::CONTENT_LENGTH], "4");
    assert_eq!(again.body, "made");
}
