//! Keys read from the JSON body (`key_from_json`), through `examples/webhook.rs` served over
//! real TCP, HTTP/1.1 and HTTP/2: the same event twice, a changed event, events without an
//! id or with ids that are not strings, bodies that are not JSON, a header key ignored.
#![cfg(feature = "json")]

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore, MissingKey};

use crate::common::{send_over_tcp, serve};

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/webhook.rs"]
mod webhook;

fn post(path: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

async fn receiver() -> (std::net::SocketAddr, webhook::Counts) {
    let counts = webhook::Counts::default();
    let addr = serve(webhook::app(MemoryStore::new(), counts.clone())).await;
    (addr, counts)
}

#[tokio::test]
async fn the_same_event_twice_runs_once_and_the_second_is_replayed_over_h1_and_h2() {
    for h2 in [false, true] {
        let (addr, counts) = receiver().await;
        let event = r#"{"id":"evt_1","type":"payment.succeeded","amount":1200}"#;
        let first = send_over_tcp(addr, h2, post("/webhooks", event)).await;
        let again = send_over_tcp(addr, h2, post("/webhooks", event)).await;
        assert_eq!(first.status, StatusCode::OK, "h2={h2}");
        assert!(!first.replayed());
        assert!(again.replayed(), "h2={h2}");
        assert_eq!(again.body, first.body);
        assert_eq!(counts.events.load(Ordering::SeqCst), 1, "h2={h2}");
    }
}

#[tokio::test]
async fn key_order_and_whitespace_do_not_make_a_different_event_but_a_changed_field_does() {
    let (addr, counts) = receiver().await;
    let sent = r#"{"id":"evt_2","amount":5}"#;
    let first = send_over_tcp(addr, false, post("/webhooks", sent)).await;
    assert_eq!(first.status, StatusCode::OK);
    let reserialised = r#"{ "amount": 5,  "id": "evt_2" }"#;
    let again = send_over_tcp(addr, true, post("/webhooks", reserialised)).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.replayed(), "the same event, serialised otherwise");
    let changed = send_over_tcp(
        addr,
        false,
        post("/webhooks", r#"{"id":"evt_2","amount":6}"#),
    )
    .await;
    assert_eq!(changed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(counts.events.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn events_without_a_usable_id_are_400_problems_and_never_run() {
    let (addr, counts) = receiver().await;
    let cases = [
        (r#"{"type":"payment.succeeded"}"#, "missing-key"),
        (r#"{"id":null}"#, "missing-key"),
        (r#"{"id":42}"#, "invalid-key"),
        (r#"{"id":{"nested":"x"}}"#, "invalid-key"),
        (r#"{"id":""}"#, "invalid-key"),
        (r#"{"id":"line\nbreak"}"#, "invalid-key"),
        ("not json at all", "invalid-key"),
        ("", "invalid-key"),
        (r#"["evt_1"]"#, "missing-key"),
    ];
    for (body, slug) in cases {
        for h2 in [false, true] {
            let answer = send_over_tcp(addr, h2, post("/webhooks", body)).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body:?}");
            let text = String::from_utf8_lossy(&answer.body);
            assert!(text.contains(slug), "{body:?}: {text}");
            assert!(
                text.contains("/id"),
                "the problem names where the key is: {text}"
            );
        }
    }
    let too_long = format!(r#"{{"id":"{}"}}"#, "x".repeat(300));
    let answer = send_over_tcp(addr, false, post("/webhooks", &too_long)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(counts.events.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_tool_call_repeated_by_an_agent_sends_once() {
    let (addr, counts) = receiver().await;
    let call = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"send_invoice","arguments":{"to":"acme"},"_meta":{"idempotencyKey":"inv-42"}}}"#;
    let first = send_over_tcp(addr, true, post("/rpc", call)).await;
    let again = send_over_tcp(addr, true, post("/rpc", call)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(counts.tool_calls.load(Ordering::SeqCst), 1);
    // A tool call without its key is refused, and names where the key belongs.
    let keyless =
        r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"send_invoice"}}"#;
    let refused = send_over_tcp(addr, true, post("/rpc", keyless)).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&refused.body).contains("/params/_meta/idempotencyKey"));
    assert_eq!(counts.tool_calls.load(Ordering::SeqCst), 1);
}

/// An agent repeats a tool call as JSON-RPC wants it repeated: with a new request id, and
/// perhaps serialised anew. The invoice is sent once, the retry gets the first run's result
/// answered under its own id (a client matches answers to requests by id), over HTTP/1.1
/// and HTTP/2; a call with other arguments under the key is still `422`. (Found by review:
/// the whole body was fingerprinted, its `id` included, so every real retry was `422`, and
/// a replay carried the first request's id.)
#[tokio::test]
async fn a_tool_call_repeated_with_a_new_request_id_is_answered_under_that_id() {
    for h2 in [false, true] {
        let (addr, counts) = receiver().await;
        let call = |id: u32, to: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"send_invoice","arguments":{{"to":"{to}"}},"_meta":{{"idempotencyKey":"inv-7"}}}}}}"#
            )
        };
        let first = send_over_tcp(addr, h2, post("/rpc", &call(7, "acme"))).await;
        assert_eq!(first.status, StatusCode::OK);
        // The same call, a new id, its fields in another order.
        let respaced = r#"{"params":{"_meta":{"idempotencyKey":"inv-7"},"arguments":{"to":"acme"},"name":"send_invoice"},"method":"tools/call","id":8,"jsonrpc":"2.0"}"#;
        let again = send_over_tcp(addr, h2, post("/rpc", respaced)).await;
        assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
        assert!(again.replayed());
        let first: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
        let again: serde_json::Value = serde_json::from_slice(&again.body).unwrap();
        assert_eq!(first["id"], 7);
        assert_eq!(again["id"], 8, "answered under the retry's own id");
        assert_eq!(again["result"], first["result"]);
        assert_eq!(counts.tool_calls.load(Ordering::SeqCst), 1, "sent once");
        let other = send_over_tcp(addr, h2, post("/rpc", &call(9, "globex"))).await;
        assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(counts.tool_calls.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn a_header_key_is_ignored_when_the_key_is_in_the_body() {
    let (addr, counts) = receiver().await;
    for n in 0..2 {
        let mut req = post("/webhooks", &format!(r#"{{"id":"evt_9","n":{n}}}"#));
        // A client-chosen header must not split one event into two keys.
        req.headers_mut()
            .insert("idempotency-key", format!("h{n}").parse().unwrap());
        let answer = send_over_tcp(addr, false, req).await;
        let expected = if n == 0 {
            StatusCode::OK
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        assert_eq!(answer.status, expected);
    }
    assert_eq!(counts.events.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn with_optional_keys_a_body_without_one_runs_unprotected() {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = {
        let runs = runs.clone();
        tower::ServiceBuilder::new()
            .layer(
                IdempotencyLayer::new(MemoryStore::new())
                    .share_keys_across_callers()
                    .key_from_json("/id")
                    .missing_key(MissingKey::Optional),
            )
            .service_fn(move |_req: Request<Full<Bytes>>| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                }
            })
    };
    for _ in 0..2 {
        let res = svc
            .clone()
            .oneshot(post("/", r#"{"no":"id"}"#))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // A body over the limit is refused before its key is looked for.
    let limited = tower::ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(MemoryStore::new())
                .share_keys_across_callers()
                .key_from_json("/id")
                .max_request_body(16),
        )
        .service_fn(|_req: Request<Full<Bytes>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
        });
    let res = limited
        .oneshot(post("/", r#"{"id":"evt_1","padding":"xxxxxxxxxxxxxxxx"}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
}
