//! Keys from the body: a webhook receiver whose events carry their id in the JSON body (no
//! header), and a JSON-RPC endpoint for agents' tool calls (MCP `tools/call`) whose key is
//! a field of the call.
//!
//! ```text
//! cargo run --example webhook --features json
//! ```
//!
//! Listens on `LISTEN_ADDR` (default `127.0.0.1:3003`):
//!
//! - `POST /webhooks` takes an event such as `{"id": "evt_1", "type": "payment.succeeded",
//!   "amount": 1200}`: its `/id` is the key. The same event twice runs once (the second
//!   answer carries `idempotent-replayed: true`); a changed event under the same id is
//!   `422`; an event without an id is a `400` problem.
//! - `POST /rpc` takes a JSON-RPC call such as `{"jsonrpc": "2.0", "id": 7, "method":
//!   "tools/call", "params": {"name": "send_invoice", "arguments": {"to": "acme"},
//!   "_meta": {"idempotencyKey": "inv-42"}}}`: the key is `/params/_meta/idempotencyKey`,
//!   so an agent that repeats a tool call after a timeout sends the invoice once. A retry
//!   carries a new JSON-RPC `id` (a client makes one per request): the call is
//!   fingerprinted without it, and a replay is answered under the retry's own `id`.
//!
//! ```text
//! curl -i localhost:3003/webhooks -H 'content-type: application/json' \
//!      -d '{"id":"evt_1","type":"payment.succeeded","amount":1200}'
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tower_idempotency::{Fingerprint, IdempotencyLayer, MemoryStore};

/// How many events and tool calls actually ran.
#[derive(Clone, Default)]
pub struct Counts {
    /// Webhook events handled.
    pub events: Arc<AtomicU64>,
    /// Tool calls run.
    pub tool_calls: Arc<AtomicU64>,
}

/// The two routes, each with its layer, over one memory store.
pub fn app(store: MemoryStore, counts: Counts) -> Router {
    // One sender of webhooks: its event ids are its keys. With several senders, scope by
    // the verified sender (scope_by) so that two senders' `evt_1` never meet.
    let webhooks = Router::new().route("/webhooks", post(webhook)).layer(
        IdempotencyLayer::new(store.clone())
            .share_keys_across_callers()
            .key_from_json("/id")
            // A sender that re-serialises its event (other key order, other spacing)
            // still sends the same event.
            .fingerprint_with(|parts, body| Fingerprint::of_canonical_json(parts, body)),
    );
    let rpc = Router::new()
        .route("/rpc", post(tool_call))
        .layer(
            IdempotencyLayer::new(store)
                .share_keys_across_callers()
                .key_from_json("/params/_meta/idempotencyKey")
                .fingerprint_with(|parts, body| call_fingerprint(parts, body)),
        )
        // Outside the layer: a replay is answered under the retry's own id.
        .layer(axum::middleware::from_fn(answer_under_the_calls_id));
    webhooks.merge(rpc).with_state(counts)
}

/// A JSON-RPC call's fingerprint: its method and parameters, canonical (key order and
/// spacing do not count), without the request `id`, which a client makes new for every
/// request, retries included.
fn call_fingerprint(parts: &http::request::Parts, body: &[u8]) -> Fingerprint {
    let Ok(Value::Object(mut call)) = serde_json::from_slice::<Value>(body) else {
        return Fingerprint::of_canonical_json(parts, body);
    };
    let whole = serde_json::to_vec(&call).unwrap_or_default();
    // A number that parsing changed (more digits than a float holds) would make two calls
    // one once written again: such a call counts by its bytes, its id included.
    if Fingerprint::of_canonical_json(parts, body) != Fingerprint::of_canonical_json(parts, &whole)
    {
        return Fingerprint::of_canonical_json(parts, body);
    }
    call.remove("id");
    let without_id = serde_json::to_vec(&call).unwrap_or_default();
    Fingerprint::of_canonical_json(parts, &without_id)
}

/// The most bytes of a call this route reads (the layer's own bound is the same).
const MAX_CALL: usize = 1024 * 1024;

/// Answers a replayed call under the `id` of the request that asked, as JSON-RPC wants:
/// the stored answer carries the first request's.
async fn answer_under_the_calls_id(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_CALL).await else {
        return (http::StatusCode::PAYLOAD_TOO_LARGE, "call too large").into_response();
    };
    let id = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|call| call.get("id").cloned());
    let res = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let replayed = res
        .headers()
        .get(tower_idempotency::REPLAYED_HEADER)
        .is_some_and(|v| v == "true");
    let Some(id) = id.filter(|_| replayed) else {
        return res;
    };
    let (mut parts, body) = res.into_parts();
    let Ok(stored) = axum::body::to_bytes(body, MAX_CALL).await else {
        return (http::StatusCode::INTERNAL_SERVER_ERROR, "answer unreadable").into_response();
    };
    let answer = match serde_json::from_slice::<Value>(&stored) {
        Ok(Value::Object(mut answer)) if answer.contains_key("id") => {
            answer.insert("id".to_owned(), id);
            serde_json::to_vec(&answer).unwrap_or_else(|_| stored.to_vec())
        }
        _ => stored.to_vec(),
    };
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(answer))
}

async fn webhook(State(counts): State<Counts>, Json(event): Json<Value>) -> Json<Value> {
    let n = counts.events.fetch_add(1, Ordering::SeqCst) + 1;
    Json(json!({
        "received": event["id"],
        "type": event["type"],
        "handled_as": n,
    }))
}

async fn tool_call(State(counts): State<Counts>, Json(call): Json<Value>) -> Json<Value> {
    let n = counts.tool_calls.fetch_add(1, Ordering::SeqCst) + 1;
    Json(json!({
        "jsonrpc": "2.0",
        "id": call["id"],
        "result": {
            "content": [{
                "type": "text",
                "text": format!("{} done (run {n})", call["params"]["name"].as_str().unwrap_or("tool")),
            }],
        },
    }))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() {
    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:3003".to_owned());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("error: cannot listen on {addr}: {err}");
            std::process::exit(1);
        }
    };
    println!("webhook receiver listening on http://{addr} (POST /webhooks, POST /rpc)");
    let app = app(MemoryStore::new(), Counts::default());
    if let Err(err) = axum::serve(listener, app).await {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
