//! The gateway example in front of an upstream that knows nothing of idempotency and counts
//! its executions: each key runs upstream once, whatever the retries.

use crate::gateway_example as gateway;

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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The upstream: `POST /api/payments` makes a payment (slowly for `?slow`), `GET /api/echo`
/// answers what it received.
#[derive(Clone, Default)]
struct Upstream {
    runs: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<String>>>,
    /// The paths of requests no route took.
    strays: Arc<Mutex<Vec<String>>>,
}

async fn upstream(state: Upstream) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    upstream_on(listener, state)
}

fn upstream_on(listener: tokio::net::TcpListener, state: Upstream) -> SocketAddr {
    let strays = Arc::clone(&state.strays);
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
    let app = Router::new()
        .route("/api/payments", post(pay))
        .route(
            "/api/echo",
            get(|req: Request| async move {
                let h = |name| req.headers().get(name);
                format!(
                    "{} {} host={:?} x-forwarded-host={:?} x-custom={:?} \
                     x-forwarded-for={:?} x-forwarded-proto={:?} forwarded={:?}",
                    req.method(),
                    req.uri(),
                    h("host"),
                    h("x-forwarded-host"),
                    h("x-custom"),
                    h("x-forwarded-for"),
                    h("x-forwarded-proto"),
                    h("forwarded"),
                )
            }),
        )
        .fallback(move |req: Request| {
            strays.lock().unwrap().push(req.uri().to_string());
            async { StatusCode::NOT_FOUND }
        });
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn gateway(upstream: SocketAddr, assign_key: bool) -> SocketAddr {
    gateway_on(upstream, assign_key, "memory").await
}

async fn gateway_on(upstream: SocketAddr, assign_key: bool, store: &str) -> SocketAddr {
    let mut settings = settings(upstream);
    settings.store = store.to_owned();
    settings.assign_key = assign_key;
    start(settings).await
}

/// The settings of a gateway in front of `http://{upstream}/api`, on the memory store.
fn settings(upstream: SocketAddr) -> gateway::Settings {
    gateway::Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: format!("http://{upstream}/api").parse().unwrap(),
        store: "memory".to_owned(),
        assign_key: false,
        scope: gateway::CallerScope::Shared,
        lease: Duration::from_secs(5),
        upstream_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        trust_forwarded: false,
        profile: tower_idempotency::problem::Profile::Rfc9457,
    }
}

async fn start(settings: gateway::Settings) -> SocketAddr {
    let (app, _work) = gateway::app(&settings).await.unwrap();
    let listener = TcpListener::bind(settings.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gateway::serve(listener, app, std::future::pending()));
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

/// Sends `request` as it is, byte for byte, and reads the answer until the gateway closes.
async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("the gateway answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP/1.1 request (head, and a body of `Content-Length` bytes).
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
        }
    }
}

/// An upstream that reads each request, counts it as run, then drops the connection without
/// answering (`hang`: holds it open without answering).
async fn failing_upstream(runs: Arc<AtomicUsize>, hang: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let runs = Arc::clone(&runs);
            tokio::spawn(async move {
                if read_request(&mut stream).await.is_some() {
                    runs.fetch_add(1, Ordering::SeqCst);
                    if hang {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                }
                drop(stream);
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_that_fails_after_the_request_was_sent_keeps_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let gw = gateway(failing_upstream(Arc::clone(&runs), false).await, false).await;
    let pay = || {
        send(
            "POST",
            format!("http://{gw}/payments"),
            Some("pay-drop"),
            "{}",
        )
    };
    let first = pay().await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY, "{}", first.body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let retry = pay().await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "upstream runs: the retry ran the payment again ({} {})",
        retry.status,
        retry.body
    );
    assert_eq!(retry.status, StatusCode::BAD_GATEWAY, "{}", retry.body);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(retry.headers["content-type"], "application/problem+json");
    assert!(retry.body.contains("may have"), "{}", retry.body);
}

#[tokio::test]
async fn an_upstream_that_was_down_runs_the_retry_once_it_is_up() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let gw = gateway(addr, false).await;
    let pay = || {
        send(
            "POST",
            format!("http://{gw}/payments"),
            Some("pay-down"),
            "{}",
        )
    };
    let down = pay().await;
    assert_eq!(down.status, StatusCode::BAD_GATEWAY, "{}", down.body);
    assert!(!down.headers.contains_key("idempotent-replayed"));
    let state = Upstream::default();
    upstream_on(TcpListener::bind(addr).await.unwrap(), state.clone());
    let up = pay().await;
    assert_eq!(up.status, StatusCode::CREATED, "{}", up.body);
    assert_eq!(state.runs.load(Ordering::SeqCst), 1);
}

/// An upstream whose name takes longer to resolve than `connect_timeout` allows: nothing was
/// sent, so the answer is `502 upstream-unreachable` and the key is released; once the name
/// resolves, a retry with the key runs upstream once. (Before, the connect timeout bounded
/// the TCP connection alone: the resolver's wait ran into the upstream timeout, and the
/// gateway stored a `504` "may have run" under the key, replayed to every retry, though
/// nothing had reached the upstream.)
#[tokio::test]
async fn an_upstream_name_resolved_too_slowly_is_502_and_the_key_is_released() {
    use std::sync::atomic::AtomicBool;
    let state = Upstream::default();
    let addr = upstream(state.clone()).await;
    let slow = Arc::new(AtomicBool::new(true));
    let resolver = {
        let slow = Arc::clone(&slow);
        tower::service_fn(
            move |name: hyper_util::client::legacy::connect::dns::Name| {
                let slow = slow.load(Ordering::SeqCst);
                async move {
                    assert_eq!(name.as_str(), "payments.test");
                    if slow {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Box::new(std::iter::once(
                        addr,
                    ))
                        as gateway::Addresses)
                }
            },
        )
    };
    let mut settings = settings(addr);
    settings.upstream = format!("http://payments.test:{}/api", addr.port())
        .parse()
        .unwrap();
    settings.upstream_timeout = Duration::from_millis(600);
    settings.connect_timeout = Duration::from_millis(200);
    let (app, _work) = gateway::app_resolving(&settings, gateway::Resolver::new(resolver))
        .await
        .unwrap();
    let listener = TcpListener::bind(settings.listen).await.unwrap();
    let gw = listener.local_addr().unwrap();
    tokio::spawn(gateway::serve(listener, app, std::future::pending()));
    let pay = || {
        send(
            "POST",
            format!("http://{gw}/payments"),
            Some("pay-dns"),
            "{}",
        )
    };

    let first = pay().await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY, "{}", first.body);
    assert!(
        first.body.contains("upstream-unreachable"),
        "{}",
        first.body
    );
    assert!(!first.headers.contains_key("idempotent-replayed"));
    assert_eq!(state.runs.load(Ordering::SeqCst), 0, "nothing was sent");

    // The name resolves again: the retry is sent, once.
    slow.store(false, Ordering::SeqCst);
    let retry = pay().await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.body);
    let again = pay().await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(state.runs.load(Ordering::SeqCst), 1, "ran once");
}

#[tokio::test]
async fn a_hung_upstream_times_out_and_keeps_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let mut hung = settings(failing_upstream(Arc::clone(&runs), true).await);
    hung.upstream_timeout = Duration::from_millis(300);
    hung.connect_timeout = Duration::from_millis(100);
    let gw = start(hung).await;
    let pay = || {
        tokio::time::timeout(
            Duration::from_secs(5),
            send(
                "POST",
                format!("http://{gw}/payments"),
                Some("pay-hung"),
                "{}",
            ),
        )
    };
    let first = pay().await.expect("an answer before the client gives up");
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT, "{}", first.body);
    let retry = pay().await.expect("an answer before the client gives up");
    assert_eq!(retry.status, StatusCode::GATEWAY_TIMEOUT, "{}", retry.body);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the retry did not run again"
    );
}

#[tokio::test]
async fn dot_segments_never_leave_the_upstream_prefix() {
    let state = Upstream::default();
    let gw = gateway(upstream(state.clone()).await, false).await;
    for path in [
        "/../admin/users",
        "/%2e%2e/admin/users",
        "/%2E./admin/users",
        "/.%2E/admin/users",
        "/echo/../../admin/users",
        "/..%2fadmin/users",
        "/..%2Fadmin/users",
        "/..\\admin/users",
        "/./echo",
        "/..;/admin/users",
        "/%2e%2e;x/admin/users",
        "*",
    ] {
        let answer = raw(
            gw,
            &format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{path}: {answer}\nupstream saw {:?}",
            state.strays.lock().unwrap()
        );
        assert!(answer.contains("application/problem+json"), "{answer}");
    }
    assert!(state.strays.lock().unwrap().is_empty());
    // Dots inside a segment are a name like any other.
    let answer = raw(
        gw,
        "GET /files/a..b/.hidden HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert_eq!(*state.strays.lock().unwrap(), ["/api/files/a..b/.hidden"]);
}

#[tokio::test]
async fn forwarding_headers_are_the_gateways_own() {
    let state = Upstream::default();
    let gw = gateway(upstream(state.clone()).await, false).await;
    let spoofed = "X-Forwarded-Host: evil.example\r\nX-Forwarded-For: 6.6.6.6\r\n\
                   X-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6;host=evil.example\r\n";
    // HTTP/1.0 without Host: nothing of the client's reaches upstream.
    let answer = raw(gw, &format!("GET /echo HTTP/1.0\r\n{spoofed}\r\n")).await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(
        !answer.contains("evil") && !answer.contains("6.6.6.6"),
        "{answer}"
    );
    assert!(answer.contains("x-forwarded-host=None"), "{answer}");
    assert!(
        answer.contains("x-forwarded-for=Some(\"127.0.0.1\")"),
        "{answer}"
    );
    assert!(
        answer.contains("x-forwarded-proto=Some(\"http\")"),
        "{answer}"
    );
    assert!(
        answer.contains("forwarded=Some(\"for=127.0.0.1;proto=http\")"),
        "{answer}"
    );
    // With a Host: the gateway's own X-Forwarded-Host, from it.
    let answer = raw(
        gw,
        &format!("GET /echo HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n{spoofed}\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.contains("evil") && !answer.contains("6.6.6.6"),
        "{answer}"
    );
    assert!(
        answer.contains("x-forwarded-host=Some(\"shop.example\")"),
        "{answer}"
    );
    assert!(
        answer.contains("forwarded=Some(\"for=127.0.0.1;host=shop.example;proto=http\")"),
        "{answer}"
    );

    // Behind a proxy it trusts (`TRUST_FORWARDED=1`): the proxy's headers are kept, and the
    // gateway's hop added.
    let mut trusting = settings(upstream(state.clone()).await);
    trusting.trust_forwarded = true;
    let gw = start(trusting).await;
    let answer = raw(
        gw,
        &format!("GET /echo HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n{spoofed}\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for expected in [
        "x-forwarded-host=Some(\"evil.example\")",
        "x-forwarded-for=Some(\"6.6.6.6, 127.0.0.1\")",
        "x-forwarded-proto=Some(\"https\")",
        "forwarded=Some(\"for=6.6.6.6;host=evil.example, for=127.0.0.1;host=\\\"[::1]:8080\\\";proto=http\")",
    ] {
        assert!(answer.contains(expected), "{expected} in {answer}");
    }
}

#[test]
fn the_gateway_will_not_start_without_a_scope_decision() {
    let vars = |extra: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            [("UPSTREAM_URL", "http://127.0.0.1:8080")]
                .iter()
                .chain(extra)
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let err = gateway::Settings::from_vars(vars(&[])).expect_err("no scope decision: refused");
    for setting in [
        "IDEMPOTENCY_SCOPE_HEADER",
        "IDEMPOTENCY_SCOPE_SECRET",
        "IDEMPOTENCY_SHARED_SCOPE",
    ] {
        assert!(err.contains(setting), "{err}");
    }
    assert!(gateway::Settings::from_vars(vars(&[("IDEMPOTENCY_SHARED_SCOPE", "1")])).is_ok());
    assert!(
        gateway::Settings::from_vars(vars(&[
            ("IDEMPOTENCY_SCOPE_HEADER", "authorization"),
            ("IDEMPOTENCY_SCOPE_SECRET", "s3cret"),
        ]))
        .is_ok()
    );
    let both = gateway::Settings::from_vars(vars(&[
        ("IDEMPOTENCY_SCOPE_HEADER", "authorization"),
        ("IDEMPOTENCY_SCOPE_SECRET", "s3cret"),
        ("IDEMPOTENCY_SHARED_SCOPE", "1"),
    ]));
    assert!(both.is_err(), "two decisions that contradict each other");
}

async fn send_h2(url: String, key: &str) -> Answer {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = http::Request::post(url)
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = client.request(req).await.expect("an HTTP/2 answer");
    assert_eq!(res.version(), http::Version::HTTP_2);
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
async fn http1_and_http2_clients_are_both_served() {
    let state = Upstream::default();
    let gw = gateway(upstream(state.clone()).await, false).await;
    let first = send_h2(format!("http://{gw}/payments"), "pay-h2").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let retry = send_h2(format!("http://{gw}/payments"), "pay-h2").await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.body);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    let h1 = send(
        "POST",
        format!("http://{gw}/payments"),
        Some("pay-h2"),
        "{}",
    )
    .await;
    assert_eq!(h1.status, StatusCode::CREATED, "{}", h1.body);
    assert_eq!(h1.headers["idempotent-replayed"], "true");
    assert_eq!(h1.body, first.body);
    assert_eq!(state.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn callers_are_kept_apart_by_their_credential() {
    let state = Upstream::default();
    let mut scoped = settings(upstream(state.clone()).await);
    scoped.scope = gateway::CallerScope::Credential {
        header: http::header::AUTHORIZATION,
        secret: b"fleet secret".to_vec(),
    };
    let gw = start(scoped).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let pay = |token: Option<&'static str>| {
        let mut req = http::Request::post(format!("http://{gw}/payments"))
            .header("idempotency-key", "pay-same");
        if let Some(token) = token {
            req = req.header("authorization", token);
        }
        client.request(req.body(Full::new(Bytes::from_static(b"{}"))).unwrap())
    };
    assert_eq!(pay(None).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(
        pay(Some("Bearer a")).await.unwrap().status(),
        StatusCode::CREATED
    );
    assert_eq!(
        pay(Some("Bearer b")).await.unwrap().status(),
        StatusCode::CREATED
    );
    let retry = pay(Some("Bearer a")).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(state.runs.load(Ordering::SeqCst), 2, "one run per caller");
}
