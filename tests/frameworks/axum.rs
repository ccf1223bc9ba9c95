//! The layer in axum: `Router::layer`, `Router::route_layer`, `MethodRouter::layer`, and the
//! orders demo served over real TCP.

use crate::common;

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/axum.rs"]
mod demo;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use bytes::Bytes;
use common::{call, post as post_req};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tower_idempotency::policy::InFlight;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

fn counting_router(counter: &Arc<AtomicUsize>) -> axum::routing::MethodRouter {
    let counter = Arc::clone(counter);
    post(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move { (StatusCode::CREATED, format!("created {n}")) }
    })
}

#[tokio::test]
async fn router_layer() {
    let counter = Arc::new(AtomicUsize::new(0));
    let app: Router = Router::new()
        .route("/orders", counting_router(&counter))
        .layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers());
    let a = call(&app, post_req(Some("k"), "{}")).await;
    let b = call(&app, post_req(Some("k"), "{}")).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert!(b.replayed());
    assert_eq!(a.body, b.body);
    assert_eq!(call(&app, post_req(None, "{}")).await.status, 400);
    // A route that does not exist is still answered by the router (404 passes through
    // the layer, and 404 is stored like any 4xx).
    let missing = Request::post("/nope")
        .header("idempotency-key", "n")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, missing).await.status, StatusCode::NOT_FOUND);
    assert_eq!(counter.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn router_route_layer() {
    let counter = Arc::new(AtomicUsize::new(0));
    let app: Router = Router::new()
        .route("/orders", counting_router(&counter))
        .route_layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers());
    call(&app, post_req(Some("k"), "{}")).await;
    assert!(call(&app, post_req(Some("k"), "{}")).await.replayed());
    // route_layer does not touch unmatched requests: the fallback answers 404 without a key.
    let missing = Request::post("/nope").body(Body::empty()).unwrap();
    assert_eq!(call(&app, missing).await.status, StatusCode::NOT_FOUND);
    assert_eq!(counter.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn method_router_layer() {
    let counter = Arc::new(AtomicUsize::new(0));
    let app: Router = Router::new()
        .route(
            "/orders",
            counting_router(&counter)
                .layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers()),
        )
        .route("/unprotected", post(|| async { "free" }));
    call(&app, post_req(Some("k"), "{}")).await;
    assert!(call(&app, post_req(Some("k"), "{}")).await.replayed());
    let free = Request::post("/unprotected").body(Body::empty()).unwrap();
    assert_eq!(call(&app, free).await.status, StatusCode::OK);
    assert_eq!(counter.load(Ordering::SeqCst), 1);
}

struct Demo {
    addr: SocketAddr,
}

async fn start_demo(layer: IdempotencyLayer, latency: Duration) -> Demo {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = demo::app(layer, latency);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Demo { addr }
}

/// One request over a fresh HTTP/1.1 connection.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = sender
        .send_request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn demo_over_tcp() {
    let demo = start_demo(
        IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers(),
        Duration::ZERO,
    )
    .await;
    let order = r#"{"item":"book","amount":12}"#;
    let key = ("idempotency-key", "order-1");

    let (status, headers, body) = send(demo.addr, "POST", "/orders", &[JSON, key], order).await;
    assert_eq!(status, StatusCode::CREATED);
    let created: demo::Order = serde_json::from_slice(&body).unwrap();
    assert_eq!((created.item.as_str(), created.amount), ("book", 12));
    assert_eq!(headers["location"], format!("/orders/{}", created.id));

    let (status, headers, again) = send(demo.addr, "POST", "/orders", &[JSON, key], order).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(again, body);

    let other = r#"{"item":"book","amount":13}"#;
    let (status, headers, _) = send(demo.addr, "POST", "/orders", &[JSON, key], other).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(headers["content-type"], "application/problem+json");

    let (status, _, _) = send(demo.addr, "POST", "/orders", &[JSON], order).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, _, list) = send(demo.addr, "GET", "/orders", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    let list: Vec<demo::Order> = serde_json::from_slice(&list).unwrap();
    assert_eq!(list, vec![created.clone()]);

    let path = format!("/orders/{}", created.id);
    let (status, _, one) = send(demo.addr, "GET", &path, &[], "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<demo::Order>(&one).unwrap(),
        created
    );
    let (status, _, _) = send(demo.addr, "GET", "/orders/nope", &[], "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn demo_finishes_an_order_whose_client_hung_up() {
    let demo = start_demo(
        IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers(),
        Duration::from_millis(300),
    )
    .await;
    let order = r#"{"item":"lamp","amount":40}"#;
    // A client sends the order and closes its socket while the payment is slow.
    let mut stream = tokio::net::TcpStream::connect(demo.addr).await.unwrap();
    let raw = format!(
        "POST /orders HTTP/1.1\r\nhost: demo\r\ncontent-type: application/json\r\n\
         idempotency-key: hang-up\r\ncontent-length: {}\r\n\r\n{order}",
        order.len()
    );
    stream.write_all(raw.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Its retry gets the order that was made, and only one was made.
    let key = ("idempotency-key", "hang-up");
    let (status, headers, body) = send(demo.addr, "POST", "/orders", &[JSON, key], order).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    let (_, _, list) = send(demo.addr, "GET", "/orders", &[], "").await;
    let list: Vec<demo::Order> = serde_json::from_slice(&list).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        serde_json::from_slice::<demo::Order>(&body).unwrap(),
        list[0]
    );
}

#[tokio::test]
async fn demo_in_flight_reject_and_wait() {
    for (policy, expect_second) in [
        (InFlight::Reject, StatusCode::CONFLICT),
        (InFlight::Wait(Duration::from_secs(5)), StatusCode::CREATED),
    ] {
        let layer = IdempotencyLayer::new(MemoryStore::new())
            .share_keys_across_callers()
            .on_in_flight(policy);
        let demo = start_demo(layer, Duration::from_millis(300)).await;
        let addr = demo.addr;
        let order = r#"{"item":"pen","amount":2}"#;
        let first = tokio::spawn(async move {
            send(
                addr,
                "POST",
                "/orders",
                &[JSON, ("idempotency-key", "dup")],
                order,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, headers, body) = send(
            addr,
            "POST",
            "/orders",
            &[JSON, ("idempotency-key", "dup")],
            order,
        )
        .await;
        assert_eq!(status, expect_second, "{policy:?}");
        let (first_status, _, first_body) = first.await.unwrap();
        assert_eq!(first_status, StatusCode::CREATED);
        if status == StatusCode::CONFLICT {
            assert!(headers.contains_key("retry-after"));
        } else {
            assert_eq!(headers["idempotent-replayed"], "true");
            assert_eq!(body, first_body);
        }
        let (_, _, list) = send(addr, "GET", "/orders", &[], "").await;
        assert_eq!(
            serde_json::from_slice::<Vec<demo::Order>>(&list)
                .unwrap()
                .len(),
            1
        );
    }
}

#[tokio::test]
async fn demo_settings_come_from_the_environment() {
    // Only checks parsing of values; the variables are not set in the test environment.
    assert!(demo::open_store("memory").await.is_ok());
    let err = demo::open_store("mongodb://x").await.err().unwrap();
    assert!(err.contains("IDEMPOTENCY_STORE"), "{err}");
}

/// The demo on MySQL or MariaDB (`IDEMPOTENCY_STORE=mysql://…`): an order is made once
/// under its key, in the table `demo_orders` beside the store's table, and its retry is
/// replayed; the recovery hook finds it by its key. Needs `MYSQL_URL`.
#[cfg(feature = "mysql")]
#[tokio::test]
async fn the_demo_keeps_its_orders_in_mysql() {
    let Some(url) = std::env::var("MYSQL_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: MYSQL_URL not set");
        return;
    };
    let (store, orders) = demo::open_store(&url).await.expect("the demo opens MySQL");
    let layer = IdempotencyLayer::new(store).share_keys_across_callers();
    let app = demo::app_on(orders.clone(), Some(layer), Duration::ZERO, Duration::ZERO);
    let key = format!("demo-{}", uuid::Uuid::new_v4());
    let body = r#"{"item":"book","amount":12}"#;
    let first = call(&app, post_req(Some(&key), body)).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let retry = call(&app, post_req(Some(&key), body)).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    let id = first.json()["id"].as_str().expect("an id").to_owned();
    let found = orders
        .find(tower_idempotency::Scope::anonymous().as_str(), &key)
        .await
        .expect("read demo_orders")
        .expect("the order is found by its key");
    assert_eq!(found.id, id);
    let listed = call(&app, Request::get("/orders").body(Body::empty()).unwrap()).await;
    let listed = listed.json();
    let ids: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|o| o["id"].as_str())
        .filter(|o| *o == id)
        .collect();
    assert_eq!(ids, [id.as_str()], "one order under the key");
}
