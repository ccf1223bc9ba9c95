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
use tower::ServiceExt;
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

// ---- `IdempotencyLayer::for_axum`: the layer answering in axum's own `Body` ----

fn listing_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-listing-count", "2".parse().unwrap());
    trailers
}

/// `POST /orders` counted; `GET /orders` streamed in two chunks and a trailer; `GET /broken`
/// failing after its first chunk; `POST /held` that never answers once it has told `held`.
fn streaming_routes(counter: &Arc<AtomicUsize>, held: &Arc<tokio::sync::Notify>) -> Router {
    let held = Arc::clone(held);
    Router::new()
        .route(
            "/orders",
            counting_router(counter).get(|| async {
                Body::new(common::Frames(
                    [
                        Ok(http_body::Frame::data(Bytes::from_static(b"[1,"))),
                        Ok(http_body::Frame::data(Bytes::from_static(b"2]"))),
                        Ok(http_body::Frame::trailers(listing_trailers())),
                    ]
                    .into(),
                ))
            }),
        )
        .route(
            "/broken",
            axum::routing::get(|| async {
                Body::new(common::Frames(
                    [
                        Ok(http_body::Frame::data(Bytes::from_static(b"[1,"))),
                        Err(std::io::Error::other("the listing broke")),
                    ]
                    .into(),
                ))
            }),
        )
        .route(
            "/held",
            post(move || {
                let held = Arc::clone(&held);
                async move {
                    held.notify_one();
                    std::future::pending::<StatusCode>().await
                }
            }),
        )
}

fn wire_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &'static str,
) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .header("te", "trailers");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// Every answer the layer gives, and every answer it passes through, is the same whether
/// it answers in its own body type or in axum's: status, headers, body and trailers, over
/// HTTP/1.1 and HTTP/2. Only the type changes, never what a caller gets.
#[tokio::test]
async fn for_axum_answers_as_the_plain_layer_does_over_http1_and_http2() {
    let held = Arc::new(tokio::sync::Notify::new());
    let plain_runs = Arc::new(AtomicUsize::new(0));
    let axum_runs = Arc::new(AtomicUsize::new(0));
    let layer = || {
        IdempotencyLayer::new(MemoryStore::new())
            .share_keys_across_callers()
            .max_key_len(64)
    };
    let plain = common::serve(streaming_routes(&plain_runs, &held).layer(layer())).await;
    let for_axum =
        common::serve(streaming_routes(&axum_runs, &held).layer(layer().for_axum())).await;
    let long_key = "k".repeat(65);
    for h2 in [false, true] {
        let first = if h2 { "h2-first" } else { "h1-first" };
        let missing = if h2 { "h2-missing" } else { "h1-missing" };
        let cases: [(&str, &str, Option<&str>, &'static str, u16); 9] = [
            ("POST", "/orders", Some(first), "{\"n\":1}", 201),
            ("POST", "/orders", Some(first), "{\"n\":1}", 201),
            ("POST", "/orders", Some(first), "{\"n\":2}", 422),
            ("POST", "/orders", None, "{}", 400),
            ("POST", "/orders", Some(&long_key), "{}", 400),
            ("GET", "/orders", None, "", 200),
            ("POST", "/nope", Some(missing), "{}", 404),
            ("POST", "/nope", Some(missing), "{}", 404),
            ("GET", "/nope", None, "", 404),
        ];
        for (method, path, key, body, status) in cases {
            let a = common::send_over_tcp(plain, h2, wire_request(plain, method, path, key, body))
                .await;
            let b = common::send_over_tcp(
                for_axum,
                h2,
                wire_request(for_axum, method, path, key, body),
            )
            .await;
            let what = format!("{method} {path} {key:?} {body} (h2: {h2})");
            assert_eq!(a.status, status, "{what}");
            assert_eq!(b.status, a.status, "{what}");
            assert_eq!(b.body, a.body, "{what}");
            assert_eq!(b.replayed(), a.replayed(), "{what}");
            let mut a_headers = a.headers.clone();
            let mut b_headers = b.headers.clone();
            a_headers.remove("date");
            b_headers.remove("date");
            assert_eq!(b_headers, a_headers, "{what}");
            assert_eq!(b.trailers, a.trailers, "{what}");
            if h2 && method == "GET" && path == "/orders" {
                assert_eq!(b.body, "[1,2]");
                assert_eq!(b.trailers, Some(listing_trailers()), "{what}");
            }
        }
    }
    // One run per protocol on each: the replay, the conflict and the refusals ran nothing.
    assert_eq!(plain_runs.load(Ordering::SeqCst), 2);
    assert_eq!(axum_runs.load(Ordering::SeqCst), 2);

    // A duplicate of a request still running is refused alike.
    for addr in [plain, for_axum] {
        let first = tokio::spawn(common::send_over_tcp(
            addr,
            true,
            wire_request(addr, "POST", "/held", Some("held"), "{}"),
        ));
        held.notified().await;
        let duplicate = common::send_over_tcp(
            addr,
            true,
            wire_request(addr, "POST", "/held", Some("held"), "{}"),
        )
        .await;
        assert_eq!(duplicate.status, StatusCode::CONFLICT);
        assert!(duplicate.headers.contains_key("retry-after"));
        first.abort();
    }
}

/// A response the layer passes through keeps its failure: a body that breaks midway is an
/// error for the caller, not a shorter body that looks complete.
#[tokio::test]
async fn a_passed_through_body_that_breaks_still_fails_through_for_axum() {
    let held = Arc::new(tokio::sync::Notify::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let app = streaming_routes(&runs, &held).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .share_keys_across_callers()
            .for_axum(),
    );
    let res = app
        .clone()
        .oneshot(Request::get("/broken").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let err = res.into_body().collect().await.unwrap_err();
    assert!(err.to_string().contains("the listing broke"), "{err}");
    // Over the wire the connection is cut rather than the body ended.
    let addr = common::serve(app).await;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    // (hyper may not have sent the head yet when the body breaks: then the whole answer
    // is the error.)
    if let Ok(res) = sender
        .send_request(wire_request(addr, "GET", "/broken", None, ""))
        .await
    {
        assert!(res.into_body().collect().await.is_err());
    }
}

/// The layer `for_axum` made from a layer is that layer: a record stored through one is
/// replayed through the other, a claim held through one is seen through the other, and
/// the original's `detached_work` waits for work started through the other.
#[tokio::test]
async fn for_axum_shares_records_claims_and_detached_work_with_its_layer() {
    let held = Arc::new(tokio::sync::Notify::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers();
    let work = layer.detached_work();
    let plain = streaming_routes(&runs, &held).layer(layer.clone());
    let for_axum_layer = layer.clone().for_axum();
    assert!(format!("{:?}", for_axum_layer.get_ref()).contains("IdempotencyLayer"));
    let via_axum = streaming_routes(&runs, &held).layer(for_axum_layer);

    let a = call(&plain, post_req(Some("shared"), "{}")).await;
    let b = call(&via_axum, post_req(Some("shared"), "{}")).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert!(
        b.replayed(),
        "the record stored through the plain layer was not replayed"
    );
    assert_eq!(b.body, a.body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let first = tokio::spawn({
        let via_axum = via_axum.clone();
        async move {
            via_axum
                .oneshot(
                    Request::post("/held")
                        .header("idempotency-key", "held")
                        .body(Body::from("{}"))
                        .unwrap(),
                )
                .await
        }
    });
    held.notified().await;
    let duplicate = call(
        &plain,
        Request::post("/held")
            .header("idempotency-key", "held")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    first.abort();
    // The aborted first request left its release to the detached work, which the
    // original layer's handle waits for.
    work.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `axum::body::Body::from` an `IdempotencyBody` (for a stack that maps response bodies
/// itself) keeps what the body carries: a passed-through body's frames and trailers, and a
/// replayed body.
#[tokio::test]
async fn an_idempotency_body_converts_into_axums_body_with_its_frames() {
    let held = Arc::new(tokio::sync::Notify::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = tower::Layer::layer(
        &IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers(),
        streaming_routes(&runs, &held),
    );
    let listing = svc
        .clone()
        .oneshot(Request::get("/orders").body(Body::empty()).unwrap())
        .await
        .unwrap()
        .map(Body::from);
    let listing = listing.into_body().collect().await.unwrap();
    assert_eq!(listing.trailers(), Some(&listing_trailers()));
    assert_eq!(listing.to_bytes(), "[1,2]");
    for _ in 0..2 {
        let created = svc
            .clone()
            .oneshot(post_req(Some("converted"), "{}"))
            .await
            .unwrap()
            .map(Body::from);
        assert_eq!(created.status(), StatusCode::CREATED);
        let body = created.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "created 0");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `for_axum`'s layer goes wherever the plain one does: `Router::route_layer` and
/// `MethodRouter::layer` too.
#[tokio::test]
async fn for_axum_works_as_a_route_layer_and_a_method_router_layer() {
    let counter = Arc::new(AtomicUsize::new(0));
    let layer = || {
        IdempotencyLayer::new(MemoryStore::new())
            .share_keys_across_callers()
            .for_axum()
    };
    let by_route: Router = Router::new()
        .route("/orders", counting_router(&counter))
        .route_layer(layer());
    let by_method: Router =
        Router::new().route("/orders", counting_router(&counter).layer(layer()));
    for app in [by_route, by_method] {
        let first = call(&app, post_req(Some("k"), "{}")).await;
        let again = call(&app, post_req(Some("k"), "{}")).await;
        assert!(again.replayed());
        assert_eq!(again.body, first.body);
        assert_eq!(call(&app, post_req(None, "{}")).await.status, 400);
    }
    assert_eq!(counter.load(Ordering::SeqCst), 2);
}

/// A key used again once its record went (expired, or purged by an operator) names the
/// newest order made under it: the recovery hook, which finds an order by its key, never
/// answers a new operation with an older one. On the memory book, and on PostgreSQL with
/// `DATABASE_URL`. (Found by review: the book answered the first order ever made under the
/// key, so a crash after the commit point of the new order had every retry replay the old
/// order's item and amount.)
#[tokio::test]
async fn a_key_used_again_names_its_newest_order() {
    let mut stores = vec!["memory".to_owned()];
    #[cfg(feature = "postgres")]
    if let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        stores.push(url);
    }
    for url in stores {
        let (store, orders) = demo::open_store(&url)
            .await
            .expect("the demo opens its store");
        let layer =
            IdempotencyLayer::new(std::sync::Arc::clone(&store)).share_keys_across_callers();
        let app = demo::app_on(orders.clone(), Some(layer), Duration::ZERO, Duration::ZERO);
        let key = format!("reused-{}", uuid::Uuid::new_v4());
        let old = call(&app, post_req(Some(&key), r#"{"item":"book","amount":12}"#)).await;
        assert_eq!(old.status, StatusCode::CREATED, "{url}: {}", old.text());
        let stored =
            tower_idempotency::store::StoreKey::new(&tower_idempotency::Scope::anonymous(), &key);
        assert!(store.purge(&stored).await.unwrap(), "{url}: purged");
        let new = call(
            &app,
            post_req(Some(&key), r#"{"item":"piano","amount":99999}"#),
        )
        .await;
        assert_eq!(new.status, StatusCode::CREATED, "{url}: {}", new.text());
        let found = orders
            .find(tower_idempotency::Scope::anonymous().as_str(), &key)
            .await
            .expect("read the book")
            .expect("an order under the key");
        assert_eq!(
            Some(found.id.as_str()),
            new.json()["id"].as_str(),
            "{url}: the newest order"
        );
        assert_eq!(found.item, "piano", "{url}");
    }
}

/// The demo's first line names its store without the URL's password. (Found by review: it
/// printed `IDEMPOTENCY_STORE` as given, password included.)
#[test]
fn the_demo_never_prints_its_stores_password() {
    let addr: SocketAddr = "127.0.0.1:3000".parse().unwrap();
    let line = demo::banner(addr, "postgres://postgres:s3cr3t@127.0.0.1:5432/test");
    assert!(!line.contains("s3cr3t"), "{line}");
    assert!(
        line.contains("postgres://postgres:***@127.0.0.1:5432/test"),
        "{line}"
    );
    assert!(demo::banner(addr, "memory").contains("(store: memory)"));
}

/// A database that does not answer is said within seconds: the demo gives up on it after
/// its 5 s connect bound, with a message naming the store. (Found by review: it waited
/// sqlx's 30 s before saying anything.)
#[cfg(feature = "postgres")]
#[tokio::test]
async fn the_demo_says_at_once_that_its_database_does_not_answer() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let started = std::time::Instant::now();
    let refused = demo::open_store(&format!("postgres://postgres@{closed}/none")).await;
    let err = refused.err().expect("no database there");
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "said after {:?}",
        started.elapsed()
    );
}
