//! The gateway example in front of an upstream that knows nothing of idempotency and counts
//! its executions: each key runs upstream once, whatever the retries.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/gateway.rs"]
mod gateway;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The upstream: `POST /api/payments` makes a payment (slowly for `?slow`), `GET /api/echo`
/// answers what it received.
#[derive(Clone, Default)]
struct Upstream {
    runs: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<String>>>,
}

async fn upstream(state: Upstream) -> SocketAddr {
    let pay = {
        let state = state.clone();
        move |req: Request| {
            let state = state.clone();
            async move {
                if let Some(key) = req.headers().get("idempotency-key") {
                    state
                        .keys
                        .lock()
                        .unwrap()
                        .push(key.to_str().unwrap().to_owned());
                }
                if req.uri().query() == Some("slow") {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let n = state.runs.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::CREATED,
                    [("x-payment", n.to_string())],
                    format!("payment {n} of {}", String::from_utf8_lossy(&body)),
                )
            }
        }
    };
    let app = Router::new().route("/api/payments", post(pay)).route(
        "/api/echo",
        get(|req: Request| async move {
            format!(
                "{} {} host={:?} x-forwarded-host={:?} x-custom={:?}",
                req.method(),
                req.uri(),
                req.headers().get("host"),
                req.headers().get("x-forwarded-host"),
                req.headers().get("x-custom"),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn gateway(upstream: SocketAddr, assign_key: bool) -> SocketAddr {
    gateway_on(upstream, assign_key, "memory").await
}

async fn gateway_on(upstream: SocketAddr, assign_key: bool, store: &str) -> SocketAddr {
    let settings = gateway::Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: format!("http://{upstream}/api").parse().unwrap(),
        store: store.to_owned(),
        assign_key,
        scope: None,
        lease: Duration::from_secs(5),
    };
    let (app, _work) = gateway::app(&settings).await.unwrap();
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

async fn send(method: &str, url: String, key: Option<&str>, body: &'static str) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("x-custom", "kept");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let res = client
        .request(
            req.body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

#[tokio::test]
async fn each_key_runs_upstream_once() {
    let state = Upstream::default();
    let gw = gateway(upstream(state.clone()).await, false).await;
    let pay = |key, body| send("POST", format!("http://{gw}/payments"), key, body);

    let first = pay(Some("pay-1"), "{\"amount\":12}").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!(first.body, "payment 0 of {\"amount\":12}");
    let retry = pay(Some("pay-1"), "{\"amount\":12}").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(
        retry.headers["x-payment"], "0",
        "the upstream's own headers, replayed"
    );
    assert_eq!(retry.body, first.body);
    let other = pay(Some("pay-1"), "{\"amount\":13}").await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.headers["content-type"], "application/problem+json");
    let missing = pay(None, "{\"amount\":12}").await;
    assert_eq!(
        missing.status,
        StatusCode::BAD_REQUEST,
        "a key is required by default"
    );
    assert_eq!(state.runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        *state.keys.lock().unwrap(),
        ["pay-1"],
        "the key reached upstream"
    );

    // A duplicate while the first runs upstream: 409, and still one run.
    let slow = tokio::spawn(send(
        "POST",
        format!("http://{gw}/payments?slow"),
        Some("pay-2"),
        "{}",
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let busy = send(
        "POST",
        format!("http://{gw}/payments?slow"),
        Some("pay-2"),
        "{}",
    )
    .await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert!(busy.headers.contains_key("retry-after"));
    assert_eq!(slow.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(state.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn requests_are_forwarded_as_they_came() {
    let state = Upstream::default();
    let gw = gateway(upstream(state.clone()).await, false).await;
    let echo = send("GET", format!("http://{gw}/echo?a=1&b=two"), None, "").await;
    assert_eq!(echo.status, StatusCode::OK);
    assert!(
        echo.body.starts_with("GET /api/echo?a=1&b=two "),
        "{}",
        echo.body
    );
    assert!(
        echo.body.contains("x-custom=Some(\"kept\")"),
        "{}",
        echo.body
    );
    assert!(
        echo.body
            .contains(&format!("x-forwarded-host=Some(\"{gw}\")")),
        "{}",
        echo.body
    );
}

#[tokio::test]
async fn a_key_is_assigned_when_asked() {
    let state = Upstream::default();
    let gw = gateway(upstream(state.clone()).await, true).await;
    let answer = send("POST", format!("http://{gw}/payments"), None, "{}").await;
    assert_eq!(answer.status, StatusCode::CREATED);
    let assigned = answer.headers["idempotency-key"]
        .to_str()
        .unwrap()
        .to_owned();
    let keys = state.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 1);
    // An RFC 9651 sf-string, as the draft writes keys: the same upstream and back.
    assert!(
        assigned.starts_with('"') && assigned.len() == 38,
        "{assigned}"
    );
    assert_eq!(keys[0], assigned, "upstream saw the key echoed back");
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_and_not_kept() {
    // A port nobody listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let gw = gateway(closed, false).await;
    for _ in 0..2 {
        let answer = send("POST", format!("http://{gw}/payments"), Some("k"), "{}").await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        assert!(
            !answer.headers.contains_key("idempotent-replayed"),
            "a 502 is not replayed"
        );
    }
}

/// Two gateways on one MySQL store (`IDEMPOTENCY_STORE=mysql://…`) in front of one
/// upstream: a key sent to both runs upstream once, and the second gateway replays the
/// first one's answer. Needs `MYSQL_URL`.
#[cfg(feature = "mysql")]
#[tokio::test]
async fn two_gateways_on_mysql_share_their_keys() {
    let Some(url) = std::env::var("MYSQL_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: MYSQL_URL not set");
        return;
    };
    let state = Upstream::default();
    let up = upstream(state.clone()).await;
    let (a, b) = (
        gateway_on(up, false, &url).await,
        gateway_on(up, false, &url).await,
    );
    let key = format!("pay-{}", uuid::Uuid::new_v4());
    let first = send("POST", format!("http://{a}/payments"), Some(&key), "{}").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let retry = send("POST", format!("http://{b}/payments"), Some(&key), "{}").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(retry.body, first.body);
    assert_eq!(state.runs.load(Ordering::SeqCst), 1);
}
