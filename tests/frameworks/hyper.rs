//! The hyper example driven over a real TCP connection.

#[path = "../../examples/hyper.rs"]
mod demo;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

async fn start() -> (SocketAddr, demo::Orders) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let orders = demo::Orders::default();
    tokio::spawn(demo::serve(
        listener,
        IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers(),
        orders.clone(),
    ));
    (addr, orders)
}

async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    key: Option<&str>,
    body: &'static str,
) -> (http::response::Parts, Bytes) {
    let mut req = Request::builder()
        .method(method)
        .uri("/orders")
        .header("host", "127.0.0.1");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    sender.ready().await.unwrap();
    let res = sender
        .send_request(
            req.body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn create_replay_and_mismatch_over_tcp() {
    let (addr, orders) = start().await;
    let mut sender = connect(addr).await;

    let (first, body) = send(&mut sender, "POST", Some("order-1"), "book").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(first.headers.get("idempotent-replayed").is_none());
    assert_eq!(first.headers["location"], "/orders/ord_1");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["id"], "ord_1");

    // The retry, on a new connection, replays the stored answer.
    let mut other = connect(addr).await;
    let (again, replayed) = send(&mut other, "POST", Some("order-1"), "book").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.headers["location"], "/orders/ord_1");
    assert_eq!(again.headers["content-type"], "application/json");
    assert_eq!(replayed, body);

    // The key with another payload: 422 problem.
    let (mismatch, problem) = send(&mut sender, "POST", Some("order-1"), "lamp").await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(mismatch.headers["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_slice(&problem).unwrap();
    assert_eq!(problem["status"], 422);

    // No key: 400. A read passes through.
    let (missing, _) = send(&mut sender, "POST", None, "book").await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    let (list, items) = send(&mut sender, "GET", None, "").await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(&items[..], br#"["book"]"#);
    assert_eq!(orders.count(), 1);
}
