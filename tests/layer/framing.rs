//! Answers whose head and body disagree, or whose body fails, over real HTTP/1.1 and HTTP/2:
//! the client gets what it would get without the layer (never a failed body passed off as
//! whole, never a hang), and a retry never runs the operation again.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_idempotency::policy::Disconnect;
use tower_idempotency::{IdempotencyLayer, IdempotencyOutcome, MemoryStore};

use crate::common::{ChannelBody, Frames, WireAnswer, send_over_tcp, serve};

fn post(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

fn data(bytes: &'static [u8]) -> Result<Frame<Bytes>, std::io::Error> {
    Ok(Frame::data(Bytes::from_static(bytes)))
}

fn broken() -> Result<Frame<Bytes>, std::io::Error> {
    Err(std::io::Error::other("the body broke"))
}

/// What a client over HTTP/1.1 (HTTP/2 when `h2`) got within three seconds: the answer,
/// `Err` when the connection failed it (an incomplete body), `None` when it was still
/// waiting.
async fn within(
    addr: std::net::SocketAddr,
    h2: bool,
    key: &str,
) -> Option<Result<WireAnswer, String>> {
    let sent = tokio::spawn(send_over_tcp(addr, h2, post(key)));
    match tokio::time::timeout(Duration::from_secs(3), sent).await {
        Err(_) => None,
        Ok(Ok(answer)) => Some(Ok(answer)),
        Ok(Err(failed)) => Some(Err(failed.to_string())),
    }
}

/// A `204`, or an answer with `Content-Length: 0`, whose body ends only later (a stream the
/// handler closes afterwards): the server sends the head alone and drops the body unread.
/// The record is stored before the head leaves, so a retry made the moment the answer
/// arrives is replayed, and the operation runs once, whether the layer finishes or releases
/// when the client leaves, over HTTP/1.1 and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_a_body_by_its_head_is_stored_before_it_leaves() {
    for status in [StatusCode::CREATED, StatusCode::NO_CONTENT] {
        for disconnect in [Disconnect::Finish, Disconnect::Release] {
            for h2 in [false, true] {
                let runs = Arc::new(AtomicUsize::new(0));
                let counted = Arc::clone(&runs);
                let handler = tower::service_fn(move |_req: Request<Body>| {
                    counted.fetch_add(1, SeqCst);
                    let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(1);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        drop(tx);
                    });
                    async move {
                        let mut res = Response::builder().status(status);
                        if status != StatusCode::NO_CONTENT {
                            res = res.header("content-length", "0");
                        }
                        Ok::<_, Infallible>(res.body(Body::new(ChannelBody(rx))).unwrap())
                    }
                });
                let layer = IdempotencyLayer::new(MemoryStore::new())
                    .share_keys_across_callers()
                    .on_disconnect(disconnect);
                let addr = serve(layer.layer(handler)).await;
                let case = format!("{status} {disconnect:?} h2={h2}");
                let first = send_over_tcp(addr, h2, post("k")).await;
                assert_eq!(first.status, status, "{case}");
                assert!(first.body.is_empty(), "{case}");
                let retry = send_over_tcp(addr, h2, post("k")).await;
                assert_eq!(retry.status, status, "{case}: the retry");
                assert!(retry.replayed(), "{case}: the retry is a replay");
                tokio::time::sleep(Duration::from_millis(400)).await;
                let later = send_over_tcp(addr, h2, post("k")).await;
                assert!(later.replayed(), "{case}: a later retry is a replay");
                assert_eq!(runs.load(SeqCst), 1, "{case}: the operation ran once");
            }
        }
    }
}

/// Bodies that fail, or whose length is not the one their head declares, over HTTP/1.1 and
/// HTTP/2: the client sees what it sees without the layer (the answer cut off or failed, never passed
/// off as whole, never left waiting), and a retry is refused without running again (a
/// tombstone: `410`), not answered with bytes the first client never got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_misframed_body_fails_as_it_would_without_the_layer() {
    type Frames = fn() -> Vec<Result<Frame<Bytes>, std::io::Error>>;
    let cases: [(&str, Option<&'static str>, Frames); 5] = [
        ("no length; bytes, then an error", None, || {
            vec![data(b"partial"), broken()]
        }),
        ("no length; an error at once", None, || vec![broken()]),
        ("20 declared; 5 given", Some("20"), || vec![data(b"hello")]),
        ("5 declared; 5 given, then an error", Some("5"), || {
            vec![data(b"hello"), broken()]
        }),
        ("5 declared; 11 given", Some("5"), || {
            vec![data(b"hello world")]
        }),
    ];
    for ((case, length, frames), h2) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
        let case = format!("{case} (h2={h2})");
        let handler = |runs: Arc<AtomicUsize>| {
            tower::service_fn(move |_req: Request<Body>| {
                runs.fetch_add(1, SeqCst);
                async move {
                    let mut res = Response::builder().status(StatusCode::CREATED);
                    if let Some(length) = length {
                        res = res.header("content-length", length);
                    }
                    Ok::<_, Infallible>(res.body(Body::new(Frames(frames().into()))).unwrap())
                }
            })
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let bare = serve(handler(Arc::new(AtomicUsize::new(0)))).await;
        let layered = serve(
            IdempotencyLayer::new(MemoryStore::new())
                .share_keys_across_callers()
                .layer(handler(Arc::clone(&runs))),
        )
        .await;
        let without = within(bare, h2, "k")
            .await
            .expect("the bare server answers");
        let with = within(layered, h2, "k")
            .await
            .unwrap_or_else(|| panic!("{case}: the client was left waiting"));
        match (&without, &with) {
            // The bare server cut it off: so does the layer.
            (Err(_), with) => assert!(with.is_err(), "{case}: passed off as whole: {with:?}"),
            // The bare server delivered it (the declared length, then nothing more was
            // read): the layer delivers at most that.
            (Ok(without), Ok(with)) => {
                assert_eq!(with.status, without.status, "{case}");
                assert_eq!(with.body, without.body, "{case}");
            }
            (Ok(_), Err(_)) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let retry = within(layered, h2, "k")
            .await
            .unwrap_or_else(|| panic!("{case}: the retry was left waiting"))
            .unwrap_or_else(|e| panic!("{case}: the retry failed: {e}"));
        assert_eq!(retry.status, StatusCode::GONE, "{case}: the retry");
        assert_eq!(runs.load(SeqCst), 1, "{case}: the operation ran once");
    }
}

fn grpc_request() -> Request<Body> {
    Request::post("/orders.Orders/Create")
        .header("content-type", "application/grpc")
        .header("idempotency-key", "g")
        .body(Body::from(&b"\0\0\0\0\x02{}"[..]))
        .unwrap()
}

/// A gRPC answer whose body fails, or ends, before its status (`grpc-status`) is known:
/// the service answered, so it may have run, and a retry never runs it again.
#[tokio::test]
async fn a_grpc_answer_without_its_status_never_runs_twice() {
    type Frames = fn() -> Vec<Result<Frame<Bytes>, std::io::Error>>;
    let cases: [(&str, Frames); 2] = [
        ("its message, then an error", || {
            vec![data(b"\0\0\0\0\x02hi"), broken()]
        }),
        ("its message, then its end", || {
            vec![data(b"\0\0\0\0\x02hi")]
        }),
    ];
    for (case, frames) in cases {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&runs);
        let handler = tower::service_fn(move |_req: Request<Body>| {
            counted.fetch_add(1, SeqCst);
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/grpc")
                        .body(Body::new(Frames(frames().into())))
                        .unwrap(),
                )
            }
        });
        let svc = IdempotencyLayer::new(MemoryStore::new())
            .share_keys_across_callers()
            .grpc_methods(["/orders.Orders/Create"])
            .layer(handler);
        let first = svc.clone().oneshot(grpc_request()).await.unwrap();
        let _ = first.into_body().collect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let retry = svc.clone().oneshot(grpc_request()).await.unwrap();
        let outcome = retry.extensions().get::<IdempotencyOutcome>().copied();
        assert!(
            matches!(
                outcome,
                Some(IdempotencyOutcome::Replayed | IdempotencyOutcome::NotStored)
            ),
            "{case}: {outcome:?}"
        );
        assert_eq!(runs.load(SeqCst), 1, "{case}: the operation ran once");
    }
}

/// A covered `HEAD` request, answered as HTTP says (the `Content-Length` a `GET` would
/// have, and no body): the answer is stored as the head it is, and a retry is its replay,
/// not a refusal as a body shorter than its head declares.
#[tokio::test]
async fn a_covered_head_request_is_stored_as_its_head() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let handler = tower::service_fn(move |_req: Request<Body>| {
        counted.fetch_add(1, SeqCst);
        async {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-length", "5")
                    .body(Body::empty())
                    .unwrap(),
            )
        }
    });
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .methods([http::Method::HEAD]);
    let addr = serve(layer.layer(handler)).await;
    let head = || {
        Request::head("/orders")
            .header("host", "127.0.0.1")
            .header("idempotency-key", "h")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let first = send_over_tcp(addr, false, head()).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(first.body.is_empty());
    let retry = send_over_tcp(addr, false, head()).await;
    assert_eq!(retry.status, StatusCode::OK, "the retry of a HEAD");
    assert!(retry.replayed());
    assert_eq!(runs.load(SeqCst), 1);
}
