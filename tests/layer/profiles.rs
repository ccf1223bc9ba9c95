//! Problem profiles (`IdempotencyLayer::problem_profile`): every answer the layer gives on
//! its own, provoked through the layer, has the status, content type, `Retry-After` and body
//! its profile documents (RFC 9457, Stripe's error object, the Agentic Commerce Protocol's
//! flat error), with the exact codes; over HTTP/1.1 and HTTP/2 for the `409` and `422`
//! answers; gRPC requests keep their gRPC status; hostile keys and details stay valid JSON;
//! the default profile answers the bytes it always did.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::post as route_post;
use bytes::Bytes;
use common::{FaultStore, Runs, call, eventually, post, send_over_tcp, serve};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use tower::Layer;
use tower_idempotency::problem::{DEFAULT_TYPE_BASE, Profile};
use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, KeyParsing, MemoryStore};

/// What each profile answers for a kind (by its slug): the status, the body's `type` (none
/// in RFC 9457, whose `type` is a URI) and the code, written out from the specifications
/// and the module docs' tables, not taken from the code under test.
fn expected(profile: Profile, slug: &str) -> (u16, Option<&'static str>, &'static str) {
    match (profile, slug) {
        (Profile::Rfc9457, "missing-key") => (400, None, "missing-key"),
        (Profile::Rfc9457, "invalid-key") => (400, None, "invalid-key"),
        (Profile::Rfc9457, "request-too-large") => (413, None, "request-too-large"),
        (Profile::Rfc9457, "key-in-use") => (409, None, "key-in-use"),
        (Profile::Rfc9457, "key-reused") => (422, None, "key-reused"),
        (Profile::Rfc9457, "response-not-stored") => (410, None, "response-not-stored"),
        (Profile::Rfc9457, "caller-unknown") => (403, None, "caller-unknown"),
        (Profile::Rfc9457, "store-unavailable") => (503, None, "store-unavailable"),
        (Profile::Rfc9457, "record-unreadable") => (500, None, "record-unreadable"),
        (Profile::Rfc9457, "outcome-unknown") => (500, None, "outcome-unknown"),

        (Profile::Stripe, "missing-key") => (
            400,
            Some("invalid_request_error"),
            "idempotency_key_missing",
        ),
        (Profile::Stripe, "invalid-key") => (
            400,
            Some("invalid_request_error"),
            "idempotency_key_invalid",
        ),
        (Profile::Stripe, "request-too-large") => {
            (413, Some("invalid_request_error"), "request_too_large")
        }
        (Profile::Stripe, "key-in-use") => {
            (409, Some("invalid_request_error"), "idempotency_key_in_use")
        }
        (Profile::Stripe, "key-reused") => {
            (400, Some("idempotency_error"), "idempotency_key_reused")
        }
        (Profile::Stripe, "response-not-stored") => (410, Some("api_error"), "response_not_stored"),
        (Profile::Stripe, "caller-unknown") => {
            (403, Some("invalid_request_error"), "caller_unknown")
        }
        (Profile::Stripe, "store-unavailable") => {
            (503, Some("api_error"), "idempotency_store_unavailable")
        }
        (Profile::Stripe, "record-unreadable") => (500, Some("api_error"), "record_unreadable"),
        (Profile::Stripe, "outcome-unknown") => (500, Some("api_error"), "outcome_unknown"),

        (Profile::AgenticCommerce, "missing-key") => {
            (400, Some("invalid_request"), "idempotency_key_required")
        }
        (Profile::AgenticCommerce, "invalid-key") => {
            (400, Some("invalid_request"), "idempotency_key_invalid")
        }
        (Profile::AgenticCommerce, "request-too-large") => {
            (413, Some("invalid_request"), "request_too_large")
        }
        (Profile::AgenticCommerce, "key-in-use") => {
            (409, Some("invalid_request"), "idempotency_in_flight")
        }
        (Profile::AgenticCommerce, "key-reused") => {
            (422, Some("invalid_request"), "idempotency_conflict")
        }
        (Profile::AgenticCommerce, "response-not-stored") => {
            (410, Some("processing_error"), "response_not_stored")
        }
        (Profile::AgenticCommerce, "caller-unknown") => {
            (403, Some("invalid_request"), "caller_unknown")
        }
        (Profile::AgenticCommerce, "store-unavailable") => (
            503,
            Some("service_unavailable"),
            "idempotency_store_unavailable",
        ),
        (Profile::AgenticCommerce, "record-unreadable") => {
            (500, Some("processing_error"), "record_unreadable")
        }
        (Profile::AgenticCommerce, "outcome-unknown") => {
            (500, Some("processing_error"), "outcome_unknown")
        }
        other => panic!("no expectation for {other:?}"),
    }
}

fn fields(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

fn non_empty_string(v: &Value, what: &str) -> String {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{what} is a string: {v}"));
    assert!(!s.is_empty(), "{what} is empty");
    s.to_owned()
}

/// Asserts that an answer is `slug`'s under `profile`: status, content type, `Retry-After`
/// exactly on `409` and `503` (whole seconds, at least one), and the body's fields, their
/// types and the exact codes. Answers the human-readable text (`detail` or `message`).
fn assert_profile_answer(
    profile: Profile,
    slug: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> String {
    let (want_status, want_type, want_code) = expected(profile, slug);
    let text = String::from_utf8_lossy(body);
    assert_eq!(status.as_u16(), want_status, "{profile:?} {slug}: {text}");
    let content_type = match profile {
        Profile::Rfc9457 => "application/problem+json",
        _ => "application/json",
    };
    assert_eq!(headers["content-type"], content_type, "{profile:?} {slug}");
    match headers.get("retry-after") {
        Some(v) => {
            assert!(
                matches!(want_status, 409 | 503),
                "{profile:?} {slug}: Retry-After on {want_status}"
            );
            let secs: u64 = v.to_str().unwrap().parse().expect("Retry-After in seconds");
            assert!(secs >= 1);
        }
        None => assert!(
            !matches!(want_status, 409 | 503),
            "{profile:?} {slug}: no Retry-After on {want_status}"
        ),
    }
    assert!(!headers.contains_key("grpc-status"));
    let json: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{profile:?} {slug}: not JSON ({e}): {text}"));
    match profile {
        Profile::Rfc9457 => {
            assert_eq!(fields(&json), ["detail", "status", "title", "type"]);
            assert_eq!(json["type"], format!("{DEFAULT_TYPE_BASE}{want_code}"));
            assert_eq!(json["status"].as_u64(), Some(u64::from(want_status)));
            non_empty_string(&json["title"], "title");
            non_empty_string(&json["detail"], "detail")
        }
        Profile::Stripe => {
            assert_eq!(fields(&json), ["error"], "{text}");
            let error = &json["error"];
            assert_eq!(fields(error), ["code", "doc_url", "message", "type"]);
            assert_eq!(error["type"].as_str(), want_type, "{text}");
            assert_eq!(error["code"], want_code, "{text}");
            assert_eq!(error["doc_url"], format!("{DEFAULT_TYPE_BASE}{slug}"));
            non_empty_string(&error["message"], "message")
        }
        Profile::AgenticCommerce => {
            assert_eq!(fields(&json), ["code", "message", "type"], "{text}");
            assert_eq!(json["type"].as_str(), want_type, "{text}");
            assert_eq!(json["code"], want_code, "{text}");
            non_empty_string(&json["message"], "message")
        }
        _ => unreachable!("a profile this test does not know"),
    }
}

fn assert_answer(profile: Profile, slug: &str, answer: &common::Answer) -> String {
    assert_profile_answer(profile, slug, answer.status, &answer.headers, &answer.body)
}

fn layer(store: impl tower_idempotency::IdempotencyStore, profile: Profile) -> IdempotencyLayer {
    IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .problem_profile(profile)
}

/// Retries until the answer is not `409` (the first request's claim still let go).
async fn past_409(app: &Router, key: &str) -> common::Answer {
    for _ in 0..200 {
        let answer = call(app, post(Some(key), "{}")).await;
        if answer.status != StatusCode::CONFLICT {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the key stayed in use");
}

/// Each kind the layer answers, provoked through the layer, in every profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_of_the_layer_has_its_profiles_documented_shape() {
    for profile in Profile::ALL {
        // missing-key, invalid-key, key-reused, and a first request that runs.
        let runs = Runs::default();
        let svc = layer(MemoryStore::new(), profile).layer(runs.handler(Duration::ZERO));
        assert_answer(profile, "missing-key", &call(&svc, post(None, "{}")).await);
        let too_long = "k".repeat(300);
        assert_answer(
            profile,
            "invalid-key",
            &call(&svc, post(Some(&too_long), "{}")).await,
        );
        let first = call(&svc, post(Some("k1"), "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let replay = call(&svc, post(Some("k1"), "{}")).await;
        assert!(replay.replayed(), "{profile:?}: a replay says so");
        assert_answer(
            profile,
            "key-reused",
            &call(&svc, post(Some("k1"), "{\"other\":1}")).await,
        );
        assert_eq!(runs.started(), 1);

        // key-in-use: the first request with the key still runs.
        let slow = Runs::default();
        let svc =
            layer(MemoryStore::new(), profile).layer(slow.handler(Duration::from_millis(400)));
        let running = tokio::spawn({
            let svc = svc.clone();
            async move { call(&svc, post(Some("busy"), "{}")).await }
        });
        eventually("the first request runs", || slow.started() == 1).await;
        assert_answer(
            profile,
            "key-in-use",
            &call(&svc, post(Some("busy"), "{}")).await,
        );
        assert_eq!(running.await.unwrap().status, StatusCode::CREATED);

        // request-too-large.
        let svc = layer(MemoryStore::new(), profile)
            .max_request_body(16)
            .layer(Runs::default().handler(Duration::ZERO));
        let big = "x".repeat(100);
        assert_answer(
            profile,
            "request-too-large",
            &call(&svc, post(Some("big"), &big)).await,
        );

        // response-not-stored: the answer ran but was larger than the layer keeps.
        let svc = layer(MemoryStore::new(), profile)
            .max_response_body(2)
            .layer(Runs::default().handler(Duration::ZERO));
        assert_eq!(
            call(&svc, post(Some("long"), "{}")).await.status,
            StatusCode::CREATED
        );
        assert_answer(
            profile,
            "response-not-stored",
            &call(&svc, post(Some("long"), "{}")).await,
        );

        // caller-unknown: no scope configured.
        let svc = IdempotencyLayer::new(MemoryStore::new())
            .problem_profile(profile)
            .layer(Runs::default().handler(Duration::ZERO));
        assert_answer(
            profile,
            "caller-unknown",
            &call(&svc, post(Some("who"), "{}")).await,
        );

        // store-unavailable: the claim fails.
        let store = FaultStore::new(MemoryStore::new());
        store.faults.claim_failures.store(1, Ordering::SeqCst);
        let runs = Runs::default();
        let svc = layer(store.clone(), profile).layer(runs.handler(Duration::ZERO));
        assert_answer(
            profile,
            "store-unavailable",
            &call(&svc, post(Some("down"), "{}")).await,
        );
        assert_eq!(runs.started(), 0);

        // record-unreadable: the stored record cannot be decoded.
        let store = FaultStore::new(MemoryStore::new());
        store.faults.claim_unreadable.store(1, Ordering::SeqCst);
        let runs = Runs::default();
        let svc = layer(store.clone(), profile).layer(runs.handler(Duration::ZERO));
        assert_answer(
            profile,
            "record-unreadable",
            &call(&svc, post(Some("damaged"), "{}")).await,
        );
        assert_eq!(runs.started(), 0);

        // outcome-unknown: the handler crashed after its commit point.
        let runs = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route(
                "/orders",
                route_post({
                    let runs = Arc::clone(&runs);
                    move |claim: IdempotencyClaim| async move {
                        claim.commit().await.expect("commit point");
                        runs.fetch_add(1, Ordering::SeqCst);
                        panic!("crashed after charging the card");
                        #[allow(unreachable_code)]
                        ()
                    }
                }),
            )
            .layer(layer(MemoryStore::new(), profile).lease(Duration::from_secs(30)));
        let crashed = tokio::spawn({
            let app = app.clone();
            async move { call(&app, post(Some("crash"), "{}")).await }
        })
        .await;
        assert!(crashed.unwrap_err().is_panic());
        assert_answer(profile, "outcome-unknown", &past_409(&app, "crash").await);
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "{profile:?}: never run again"
        );
    }
}

fn wire_post(addr: std::net::SocketAddr, key: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/orders"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// The `409` and `422` (Stripe: `400`) answers, and a replay, as a client reads them off
/// the wire over HTTP/1.1 and HTTP/2, in every profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_and_mismatches_have_their_profiles_shape_over_http1_and_http2() {
    for profile in Profile::ALL {
        for h2 in [false, true] {
            let runs = Runs::default();
            let svc =
                layer(MemoryStore::new(), profile).layer(runs.handler(Duration::from_millis(300)));
            let addr = serve(svc).await;
            let key = format!("wire-{h2}");
            let first = tokio::spawn({
                let req = wire_post(addr, &key, "{}");
                async move { send_over_tcp(addr, h2, req).await }
            });
            eventually("the first request runs", || runs.started() == 1).await;
            let busy = send_over_tcp(addr, h2, wire_post(addr, &key, "{}")).await;
            assert_profile_answer(
                profile,
                "key-in-use",
                busy.status,
                &busy.headers,
                &busy.body,
            );
            let first = first.await.unwrap();
            assert_eq!(first.status, StatusCode::CREATED);
            let replay = send_over_tcp(addr, h2, wire_post(addr, &key, "{}")).await;
            assert!(replay.replayed(), "{profile:?} h2={h2}");
            assert_eq!(replay.body, first.body);
            let reused = send_over_tcp(addr, h2, wire_post(addr, &key, "{\"sku\":2}")).await;
            assert_profile_answer(
                profile,
                "key-reused",
                reused.status,
                &reused.headers,
                &reused.body,
            );
            // The body a client read is the whole body: framed by its length.
            assert_eq!(
                reused
                    .headers
                    .get("content-length")
                    .map(|v| v.to_str().unwrap().to_owned()),
                Some(reused.body.len().to_string()),
                "{profile:?} h2={h2}"
            );
            assert_eq!(runs.started(), 1, "{profile:?} h2={h2}: ran once");
        }
    }
}

/// A gRPC request gets a trailers-only gRPC status whatever the profile, never a JSON body.
#[tokio::test]
async fn grpc_requests_keep_their_grpc_status_under_every_profile() {
    for profile in Profile::ALL {
        let svc = layer(MemoryStore::new(), profile)
            .grpc_methods(["/orders.Orders/Create"])
            .layer(Runs::default().handler(Duration::ZERO));
        let req = |key: Option<&str>| {
            let mut b =
                Request::post("/orders.Orders/Create").header("content-type", "application/grpc");
            if let Some(key) = key {
                b = b.header("idempotency-key", key);
            }
            b.body(Body::from(vec![0u8, 0, 0, 0, 0])).unwrap()
        };
        let missing = call(&svc, req(None)).await;
        assert_eq!(missing.status, StatusCode::OK, "{profile:?}");
        assert_eq!(missing.headers["content-type"], "application/grpc");
        assert_eq!(
            missing.headers["grpc-status"], "3",
            "{profile:?}: INVALID_ARGUMENT"
        );
        assert!(missing.body.is_empty(), "{profile:?}: no JSON body");
        let invalid = call(&svc, req(Some(&"k".repeat(300)))).await;
        assert_eq!(invalid.headers["grpc-status"], "3");
        assert!(invalid.body.is_empty());
    }
}

/// Keys with quotes, backslashes and bytes that look like Unicode, in lenient and strict
/// parsing, are refused with a body that is valid JSON in every profile.
#[tokio::test]
async fn hostile_keys_get_valid_json_in_every_profile() {
    let hostile: [&[u8]; 6] = [
        b"k\xe2\x9c\x97\"\\",
        b"\"a\\\"b\\\\c\"extra",
        b"\"\xc3\xa9\"",
        b"\"\\u0000\"",
        b"</script>\"\\",
        b"\"unterminated\\",
    ];
    for profile in Profile::ALL {
        for parsing in [KeyParsing::Lenient, KeyParsing::Strict] {
            let runs = Runs::default();
            let svc = layer(MemoryStore::new(), profile)
                .key_parsing(parsing)
                .layer(runs.handler(Duration::ZERO));
            for key in hostile {
                let mut req = post(None, "{}");
                req.headers_mut()
                    .insert("idempotency-key", HeaderValue::from_bytes(key).unwrap());
                let answer = call(&svc, req).await;
                if answer.status == StatusCode::CREATED {
                    // Lenient parsing takes some of these as printable keys: fine, not a
                    // refusal.
                    assert!(matches!(parsing, KeyParsing::Lenient), "{key:?}");
                    continue;
                }
                assert_answer(profile, "invalid-key", &answer);
            }
        }
    }
}

/// A detail that quotes the request's own JSON (a key read from the body that is not a
/// string) is escaped in every profile.
#[cfg(feature = "json")]
#[tokio::test]
async fn details_quoting_the_request_stay_valid_json_in_every_profile() {
    let value = r#"["\"\\ \u2028 é </x>"]"#;
    for profile in Profile::ALL {
        let svc = layer(MemoryStore::new(), profile)
            .key_from_json("/id")
            .layer(Runs::default().handler(Duration::ZERO));
        let answer = call(&svc, post(None, &format!("{{\"id\":{value}}}"))).await;
        let text = assert_answer(profile, "invalid-key", &answer);
        let quoted: Value = serde_json::from_str(value).unwrap();
        assert!(
            text.contains(&quoted.to_string()),
            "{profile:?}: the detail quotes the value: {text}"
        );
    }
}

/// The default profile (no setting, or `Profile::Rfc9457`) answers `409` and `422` with the
/// bytes earlier versions answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_profile_answers_the_bytes_it_always_did() {
    const BUSY: &str = "{\"type\":\"https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/#key-in-use\",\
        \"title\":\"A request with this Idempotency-Key is still being processed\",\"status\":409,\
        \"detail\":\"A request with this Idempotency-Key is still being processed; retry later to get its result.\"}";
    const REUSED: &str = "{\"type\":\"https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/#key-reused\",\
        \"title\":\"Idempotency-Key is already used\",\"status\":422,\
        \"detail\":\"This Idempotency-Key was already used with a different request payload; use a new key for a new request.\"}";
    let layers = [
        IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers(),
        IdempotencyLayer::new(MemoryStore::new())
            .share_keys_across_callers()
            .problem_profile(Profile::Rfc9457),
    ];
    for layer in layers {
        let runs = Runs::default();
        let svc = layer.layer(runs.handler(Duration::from_millis(300)));
        let first = tokio::spawn({
            let svc = svc.clone();
            async move { call(&svc, post(Some("pin"), "{}")).await }
        });
        eventually("the first request runs", || runs.started() == 1).await;
        let busy = call(&svc, post(Some("pin"), "{}")).await;
        assert_eq!(busy.headers["content-type"], "application/problem+json");
        assert_eq!(busy.text(), BUSY);
        first.await.unwrap();
        let reused = call(&svc, post(Some("pin"), "{\"sku\":2}")).await;
        assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(reused.text(), REUSED);
        assert!(reused.headers.get("link").is_none());
    }
}

/// The README's "Error formats" examples are what the layer answers, byte for byte.
#[tokio::test]
async fn the_readme_error_format_examples_are_what_the_layer_answers() {
    let readme = include_str!("../../README.md");
    for (profile, head) in [
        (
            Profile::AgenticCommerce,
            "HTTP/1.1 422 Unprocessable Entity\ncontent-type: application/json\n\n",
        ),
        (
            Profile::Stripe,
            "HTTP/1.1 400 Bad Request\ncontent-type: application/json\n\n",
        ),
    ] {
        let svc = layer(MemoryStore::new(), profile).layer(Runs::default().handler(Duration::ZERO));
        call(&svc, post(Some("readme"), "{}")).await;
        let reused = call(&svc, post(Some("readme"), "{\"sku\":2}")).await;
        assert_eq!(
            format!("HTTP/1.1 {}", reused.status),
            head.lines().next().unwrap(),
            "{profile:?}"
        );
        assert_eq!(reused.headers["content-type"], "application/json");
        let example = format!("{head}{}\n", reused.text());
        assert!(
            readme.contains(&example),
            "{profile:?}: the README shows\n{example}"
        );
    }
}
