//! The whole story, end to end over TCP: a client calls a server through this crate's
//! client side (a key per call, a retry policy), the first attempt's answer is lost (the
//! client times out, or a proxy drops the response after the server answered), the client
//! retries with the same key, and the operation runs once: the client ends with the
//! original answer, marked replayed.
#![cfg(feature = "client")]

use crate::common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::{Seen, counting_server};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::retry::RetryLayer;
use tower::timeout::TimeoutLayer;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_idempotency::client::{IdempotencyKeyLayer, RetryPolicy};
use tower_idempotency::{IdempotencyKey, KeyError, KeyParsing, REPLAYED_HEADER};

/// hyper-util's client with the client side of this crate: a key per call, retries with
/// it, and a timeout per attempt.
fn client(
    timeout: Duration,
) -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<hyper::body::Incoming>,
    Error = BoxError,
    Future: Send,
> + Clone {
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(
            RetryPolicy::new()
                .max_retries(20)
                .backoff(Duration::from_millis(20), Duration::from_millis(100))
                .max_retry_after(Duration::from_millis(150)),
        ))
        .layer(TimeoutLayer::new(timeout))
        .service(http)
}

fn order(addr: std::net::SocketAddr) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("http://{addr}/orders"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"sku\":1}")))
        .unwrap()
}

async fn answer(res: http::Response<hyper::body::Incoming>) -> (StatusCode, bool, Bytes) {
    let status = res.status();
    let replayed = res
        .headers()
        .get(REPLAYED_HEADER)
        .is_some_and(|v| v == "true");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, body)
}

/// Every attempt carried the same key, one the client made, as an sf-string.
fn one_key(seen: &Seen) -> usize {
    let keys = seen.keys.lock().unwrap();
    let first = keys[0].clone().expect("the client sent a key");
    assert!(
        first.len() == 38 && first.starts_with('"') && first.ends_with('"'),
        "a quoted UUID: {first}"
    );
    assert!(
        keys.iter().all(|k| k.as_deref() == Some(first.as_str())),
        "{keys:?}"
    );
    keys.len()
}

#[tokio::test]
async fn a_client_that_times_out_retries_with_its_key_and_gets_the_first_answer() {
    let seen = Seen::default();
    // The operation takes longer than the client waits for an attempt.
    let addr = counting_server(seen.clone(), Duration::from_millis(400)).await;
    let res = client(Duration::from_millis(150))
        .oneshot(order(addr))
        .await
        .expect("the call ends with an answer");
    let (status, replayed, body) = answer(res).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed, "the answer is the first attempt's, replayed");
    assert_eq!(body, "order 0 for {\"sku\":1}");
    assert_eq!(
        seen.runs.load(Ordering::SeqCst),
        1,
        "the operation ran once"
    );
    let attempts = one_key(&seen);
    // The first attempt and the replay (and, unless the machine stalled the client past
    // the handler's end, 409s between them).
    assert!(attempts >= 2, "{attempts} attempts");
}

/// Accepts connections on a port of its own and forwards them to `upstream`, but the first
/// connection's response is read from the server and never passed on: the client's
/// connection is closed after the server answered.
async fn dropping_proxy(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let mut server = TcpStream::connect(upstream).await.unwrap();
            if !std::mem::take(&mut first) {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                continue;
            }
            tokio::spawn(async move {
                let (mut client_read, _client_write) = client.split();
                let (mut server_read, mut server_write) = server.split();
                let forward = async {
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = client_read.read(&mut buf).await.unwrap_or(0);
                        if n == 0 || server_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                // The response leaves the server only once its record is stored: its first
                // bytes are proof enough that the operation ran and was recorded.
                let swallow = async {
                    let mut buf = [0u8; 4096];
                    let _ = server_read.read(&mut buf).await;
                };
                tokio::select! {
                    () = forward => {}
                    () = swallow => {}
                }
                // Both connections close here, the answer unsent.
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_response_lost_after_the_server_answered_is_replayed_to_the_retry() {
    let seen = Seen::default();
    let server = counting_server(seen.clone(), Duration::from_millis(10)).await;
    let proxy = dropping_proxy(server).await;
    let res = client(Duration::from_secs(5))
        .oneshot(order(proxy))
        .await
        .expect("the call ends with an answer");
    let (status, replayed, body) = answer(res).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed, "the retry got the lost answer, replayed");
    assert_eq!(body, "order 0 for {\"sku\":1}");
    assert_eq!(
        seen.runs.load(Ordering::SeqCst),
        1,
        "the operation ran once"
    );
    assert_eq!(one_key(&seen), 2, "the lost attempt and its retry");
}

#[tokio::test]
async fn final_answers_are_not_retried() {
    let seen = Seen::default();
    let addr = counting_server(seen.clone(), Duration::ZERO).await;
    let client = client(Duration::from_secs(5));
    // The caller chose the key: it is kept.
    let mut first = order(addr);
    first
        .headers_mut()
        .insert("idempotency-key", "caller-1".parse().unwrap());
    let (status, replayed, _) = answer(client.clone().oneshot(first).await.unwrap()).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    // The same key with another payload: 422, final.
    let mut other = order(addr);
    other
        .headers_mut()
        .insert("idempotency-key", "caller-1".parse().unwrap());
    *other.body_mut() = Full::new(Bytes::from_static(b"{\"sku\":2}"));
    let (status, _, _) = answer(client.clone().oneshot(other).await.unwrap()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // A plain 404 is final too.
    let missing = http::Request::post(format!("http://{addr}/nowhere"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, _) = answer(client.oneshot(missing).await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let keys = seen.keys.lock().unwrap();
    assert_eq!(keys.len(), 3, "one attempt each: {keys:?}");
    assert_eq!(
        keys[1].as_deref(),
        Some("\"caller-1\""),
        "sent as an sf-string"
    );
    assert_eq!(seen.runs.load(Ordering::SeqCst), 1);
}

/// The client reads only statuses and headers, which every problem profile keeps: under
/// each, a timed-out call is retried through the `409`s to its replay, and a key reused with
/// another payload (Stripe: `400`, the others `422`) is final.
#[tokio::test]
async fn the_client_works_against_every_problem_profile() {
    use tower_idempotency::problem::Profile;
    for profile in Profile::ALL {
        let seen = Seen::default();
        let addr =
            common::counting_server_with_profile(seen.clone(), Duration::from_millis(400), profile)
                .await;
        let client = client(Duration::from_millis(150));
        let mut req = order(addr);
        req.headers_mut()
            .insert("idempotency-key", "profile-1".parse().unwrap());
        let (status, replayed, body) = answer(client.clone().oneshot(req).await.unwrap()).await;
        assert_eq!(status, StatusCode::CREATED, "{profile:?}");
        assert!(
            replayed,
            "{profile:?}: the first attempt's answer, replayed"
        );
        assert_eq!(body, "order 0 for {\"sku\":1}");
        let attempts = seen.keys.lock().unwrap().len();
        assert!(attempts >= 2, "{profile:?}: {attempts} attempts");

        let mut other = order(addr);
        other
            .headers_mut()
            .insert("idempotency-key", "profile-1".parse().unwrap());
        *other.body_mut() = Full::new(Bytes::from_static(b"{\"sku\":2}"));
        let before = seen.keys.lock().unwrap().len();
        let (status, _, _) = answer(client.oneshot(other).await.unwrap()).await;
        let reused = match profile {
            Profile::Stripe => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        assert_eq!(status, reused, "{profile:?}");
        assert_eq!(
            seen.keys.lock().unwrap().len(),
            before + 1,
            "{profile:?}: not retried"
        );
        assert_eq!(seen.runs.load(Ordering::SeqCst), 1, "{profile:?}: ran once");
    }
}

/// A server on a loopback port whose `POST /orders` answers `201` with the key the layer read
/// (parsing it as `parsing` says); a refused key gets the layer's `400`.
async fn key_echo_server(parsing: KeyParsing) -> std::net::SocketAddr {
    use axum::routing::post;
    let app = axum::Router::new()
        .route(
            "/orders",
            post(|req: axum::extract::Request| async move {
                let key = req.extensions().get::<IdempotencyKey>().unwrap();
                (StatusCode::CREATED, key.as_str().to_owned())
            }),
        )
        .layer(
            tower_idempotency::IdempotencyLayer::new(tower_idempotency::MemoryStore::new())
                .share_keys_across_callers()
                .key_parsing(parsing),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn keys_the_client_sends_are_accepted_by_every_parsing_mode_of_the_server() {
    for parsing in [KeyParsing::Strict, KeyParsing::Lenient] {
        let addr = key_echo_server(parsing).await;
        let client = client(Duration::from_secs(5));

        // A key the client made.
        let (status, _, key) = answer(client.clone().oneshot(order(addr)).await.unwrap()).await;
        assert_eq!(status, StatusCode::CREATED, "{parsing:?}: {key:?}");
        assert_eq!(key.len(), 36, "{parsing:?}: a UUID: {key:?}");

        // Keys the caller set: bare, already an sf-string, and holding `"` or `\`. The
        // server reads the caller's text, whatever the mode.
        for (sent, read) in [
            ("caller-1", "caller-1"),
            ("\"quoted-1\"", "quoted-1"),
            ("say \"hi\"", "say \"hi\""),
            ("back\\slash", "back\\slash"),
            ("\"esc\\\"aped\"", "esc\"aped"),
        ] {
            let mut req = order(addr);
            req.headers_mut()
                .insert("idempotency-key", sent.parse().unwrap());
            let (status, replayed, key) = answer(client.clone().oneshot(req).await.unwrap()).await;
            assert_eq!(
                (status, replayed, String::from_utf8_lossy(&key)),
                (StatusCode::CREATED, false, read.into()),
                "{parsing:?}: the caller's key {sent}"
            );
        }
    }

    // A key that no sf-string can carry (not ASCII) is refused by the client, with the
    // reason: it never reaches a server that would refuse it.
    let addr = key_echo_server(KeyParsing::Lenient).await;
    let mut req = order(addr);
    req.headers_mut().insert(
        "idempotency-key",
        http::HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
    );
    let refused = match client(Duration::from_secs(5)).oneshot(req).await {
        Ok(res) => panic!("sent, answered {}", res.status()),
        Err(err) => err,
    };
    assert_eq!(
        refused.downcast_ref::<KeyError>(),
        Some(&KeyError::NotPrintable),
        "{refused}"
    );
}

/// A request body fed from a channel, a frame per message: a stream the caller goes on
/// producing while attempts are made.
struct Fed(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for Fed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|d| d.map(|d| Ok(http_body::Frame::data(d))))
    }
}

/// A streaming body that the first attempt's connection goes on reading during the backoff
/// pause (as hyper's HTTP/1.1 client writes the rest of a body after an early `503`), past
/// what `BufferedRetryLayer` keeps: no whole copy is left, so nothing is sent again. (Before,
/// the retry went out under the same key with only the rest of the body: the server ran the
/// operation on the wrong data.)
#[tokio::test]
async fn a_body_read_past_what_is_kept_during_the_pause_is_not_sent_again_from_its_middle() {
    use http_body_util::combinators::UnsyncBoxBody;
    use std::sync::{Arc, Mutex};
    use tower::Layer;
    use tower_idempotency::client::BufferedRetryLayer;

    type Body = UnsyncBoxBody<Bytes, BoxError>;

    /// What each attempt's body gave the server.
    type Reads = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;
    let reads: Reads = Arc::default();
    let seen = Arc::clone(&reads);
    let inner = tower::service_fn(move |req: http::Request<Body>| {
        let got = Arc::new(Mutex::new(Vec::new()));
        let first = {
            let mut seen = seen.lock().unwrap();
            seen.push(Arc::clone(&got));
            seen.len() == 1
        };
        async move {
            let mut body = req.into_body();
            if first {
                // One frame read, a `503` at once, and the connection reads on.
                let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
                got.lock().unwrap().extend_from_slice(&frame);
                tokio::spawn(async move {
                    while let Some(Ok(frame)) = body.frame().await {
                        got.lock()
                            .unwrap()
                            .extend_from_slice(&frame.into_data().unwrap());
                    }
                });
                return Ok::<_, BoxError>(http::Response::builder().status(503).body(()).unwrap());
            }
            while let Some(Ok(frame)) = body.frame().await {
                got.lock()
                    .unwrap()
                    .extend_from_slice(&frame.into_data().unwrap());
            }
            Ok(http::Response::builder().status(200).body(()).unwrap())
        }
    });
    let (feed, rx) = tokio::sync::mpsc::unbounded_channel();
    feed.send(Bytes::from("ab")).unwrap();
    let req = http::Request::post("/upload")
        .header("idempotency-key", "\"k\"")
        .body(Fed(rx).boxed_unsync())
        .unwrap();
    let policy = RetryPolicy::new().backoff(Duration::from_millis(300), Duration::from_millis(300));
    let call = tokio::spawn(
        BufferedRetryLayer::new(policy)
            .max_body(4)
            .layer(inner)
            .oneshot(req),
    );
    // In the pause: the first attempt's connection reads past the 4 bytes kept.
    tokio::time::sleep(Duration::from_millis(50)).await;
    feed.send(Bytes::from("cdef")).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    feed.send(Bytes::from("gh")).unwrap();
    drop(feed);
    let res = call.await.unwrap().unwrap();
    let reads: Vec<Vec<u8>> = reads
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.lock().unwrap().clone())
        .collect();
    assert_eq!(
        res.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the one attempt's answer"
    );
    assert_eq!(reads.len(), 1, "sent once: {reads:?}");
}

/// How a server saw the end of a request body it read on after answering.
#[derive(Debug, Clone, PartialEq)]
enum BodyEnd {
    /// Not ended yet.
    Open,
    /// Ended whole, with these bytes.
    Whole(Vec<u8>),
    /// Cut off: the connection or stream failed before the body ended.
    Cut,
}

/// An attempt that `BufferedRetryLayer` gave up while its connection was still sending its
/// body (the server answered `503` after one frame and read on) is cut off on the wire, over
/// HTTP/1.1 and HTTP/2: the server sees the body fail, never a cut-off body passed off as
/// whole, and the connection or stream is not held open for good. (Before, the given-up
/// body yielded nothing more and never ended: the HTTP/2 stream, or the HTTP/1.1
/// connection, stayed open with a body that never came, and the server's read of it never
/// returned.)
#[tokio::test]
async fn a_given_up_attempt_is_cut_off_on_the_wire_not_left_open() {
    use http_body_util::combinators::UnsyncBoxBody;
    use std::sync::{Arc, Mutex};
    use tower::Layer;
    use tower_idempotency::client::BufferedRetryLayer;

    for h2 in [false, true] {
        let ends: Arc<Mutex<Vec<Arc<Mutex<BodyEnd>>>>> = Arc::default();
        let seen = Arc::clone(&ends);
        let server = tower::service_fn(move |req: http::Request<axum::body::Body>| {
            let end = Arc::new(Mutex::new(BodyEnd::Open));
            let first = {
                let mut seen = seen.lock().unwrap();
                seen.push(Arc::clone(&end));
                seen.len() == 1
            };
            async move {
                let mut body = req.into_body();
                let mut got = Vec::new();
                if first {
                    // One frame, a `503` at once, and the body read on in the background.
                    let frame = body.frame().await.unwrap().unwrap();
                    got.extend_from_slice(&frame.into_data().unwrap());
                    tokio::spawn(async move {
                        loop {
                            match body.frame().await {
                                Some(Ok(frame)) => {
                                    if let Ok(data) = frame.into_data() {
                                        got.extend_from_slice(&data);
                                    }
                                }
                                Some(Err(_)) => {
                                    *end.lock().unwrap() = BodyEnd::Cut;
                                    return;
                                }
                                None => {
                                    *end.lock().unwrap() = BodyEnd::Whole(got);
                                    return;
                                }
                            }
                        }
                    });
                    return Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .status(503)
                            .body(axum::body::Body::empty())
                            .unwrap(),
                    );
                }
                let whole = body.collect().await.map(|b| b.to_bytes().to_vec());
                *end.lock().unwrap() = match whole {
                    Ok(bytes) => BodyEnd::Whole(bytes),
                    Err(_) => BodyEnd::Cut,
                };
                Ok(http::Response::new(axum::body::Body::empty()))
            }
        });
        let addr = common::serve(server).await;

        let http = Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .build_http::<UnsyncBoxBody<Bytes, BoxError>>();
        let policy =
            RetryPolicy::new().backoff(Duration::from_millis(20), Duration::from_millis(20));
        let (feed, rx) = tokio::sync::mpsc::unbounded_channel();
        feed.send(Bytes::from("ab")).unwrap();
        let req = http::Request::post(format!("http://{addr}/upload"))
            .header("idempotency-key", "\"k\"")
            .body(Fed(rx).boxed_unsync())
            .unwrap();
        let call = tokio::spawn(BufferedRetryLayer::new(policy).layer(http).oneshot(req));
        // The retry has started (it resent the copy and waits for more) before the rest.
        tokio::time::timeout(Duration::from_secs(5), async {
            while ends.lock().unwrap().len() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("a second attempt");
        feed.send(Bytes::from("cd")).unwrap();
        drop(feed);
        let res = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("the call ends")
            .unwrap()
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "h2 {h2}");
        let ends: Vec<_> = ends.lock().unwrap().clone();
        assert_eq!(
            *ends[1].lock().unwrap(),
            BodyEnd::Whole(b"abcd".to_vec()),
            "the retry sent the whole body (h2 {h2})"
        );
        // The given-up attempt's body: cut off soon, never passed off as whole.
        let first = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                let end = ends[0].lock().unwrap().clone();
                if end != BodyEnd::Open {
                    return end;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(
            first,
            Ok(BodyEnd::Cut),
            "the given-up attempt's body is cut off on the wire (h2 {h2})"
        );
    }
}
