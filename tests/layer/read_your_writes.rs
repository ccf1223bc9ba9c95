//! Once a client holds the whole answer, a retry replays it: never `409`, whatever the
//! framing (sized, chunked, HTTP/2, gRPC trailers-only) and however slow the store is to
//! write the record. Served over real TCP with hyper, which stops reading a sized body as
//! soon as it has every byte.

use crate::common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use bytes::Bytes;
use common::{FaultStore, send_over_tcp, serve};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[derive(Clone, Copy)]
enum Framing {
    /// `Content-Length`, known from the body's size.
    Sized,
    /// A stream of unknown length: chunked in HTTP/1.1.
    Chunked,
    /// A gRPC answer with no message: a status in the headers, nothing else.
    GrpcTrailersOnly,
    /// A gRPC answer with a message and trailers.
    GrpcUnary,
}

fn handler(
    framing: Framing,
    runs: Arc<AtomicUsize>,
) -> tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, Infallible> {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_req: Request<Body>| {
        let n = runs.fetch_add(1, Ordering::SeqCst);
        async move {
            let text = format!("{{\"order\":{n}}}");
            let res = match framing {
                Framing::Sized => Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Body::from(text))
                    .unwrap(),
                Framing::Chunked => Response::builder()
                    .status(StatusCode::CREATED)
                    .body(frames(vec![
                        http_body::Frame::data(Bytes::from_static(b"{\"chunked\":")),
                        http_body::Frame::data(Bytes::from(text)),
                        http_body::Frame::data(Bytes::from_static(b"}")),
                    ]))
                    .unwrap(),
                Framing::GrpcTrailersOnly => Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "3")
                    .header("grpc-message", format!("bad-{n}"))
                    .body(Body::empty())
                    .unwrap(),
                Framing::GrpcUnary => {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    trailers.insert("x-run", n.to_string().parse().unwrap());
                    Response::builder()
                        .header("content-type", "application/grpc")
                        .body(frames(vec![
                            http_body::Frame::data(Bytes::from(text)),
                            http_body::Frame::trailers(trailers),
                        ]))
                        .unwrap()
                }
            };
            Ok(res)
        }
    }))
}

/// A body of frames with no size hint (so HTTP/1.1 sends it chunked unless a header says
/// otherwise).
struct Frames(std::collections::VecDeque<http_body::Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn frames(frames: Vec<http_body::Frame<Bytes>>) -> Body {
    Body::new(Frames(frames.into()))
}

fn request(framing: Framing, key: &str) -> Request<Full<Bytes>> {
    let grpc = matches!(framing, Framing::GrpcTrailersOnly | Framing::GrpcUnary);
    Request::post("/orders")
        .header("host", "127.0.0.1")
        .header(
            "content-type",
            if grpc {
                "application/grpc"
            } else {
                "application/json"
            },
        )
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{\"item\":\"book\"}")))
        .unwrap()
}

/// The first answer, then a retry sent the moment the client holds all of it, 10 times;
/// the store takes 150 ms to write each record.
async fn retry_right_after_the_answer(framing: Framing, h2: bool) {
    retry_right_after_the_answer_on(MemoryStore::new(), framing, h2).await;
}

async fn retry_right_after_the_answer_on<S>(store: S, framing: Framing, h2: bool)
where
    S: tower_idempotency::IdempotencyStore + Clone,
{
    let store = FaultStore::new(store);
    store.faults.complete_delay_ms.store(150, Ordering::SeqCst);
    let runs = Arc::new(AtomicUsize::new(0));
    // The gRPC framings call `/orders` as a gRPC method: listed, so it is covered.
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .grpc_methods(["/orders"])
        .layer(handler(framing, Arc::clone(&runs)));
    let addr = serve(svc).await;
    for i in 0..10 {
        let key = format!("key-{i}-{}", uuid::Uuid::new_v4());
        let first = send_over_tcp(addr, h2, request(framing, &key)).await;
        assert!(!first.replayed());
        let retry = send_over_tcp(addr, h2, request(framing, &key)).await;
        assert_eq!(
            retry.status, first.status,
            "retry {i} right after the answer: {retry:?}"
        );
        assert!(retry.replayed(), "retry {i} must be a replay: {retry:?}");
        assert_eq!(retry.body, first.body);
        // The replay is framed as the answer was: no `content-length` it did not have (a
        // gRPC client reading by length would stop before the trailers), no chunking it
        // did not use.
        for framing_header in ["content-length", "transfer-encoding"] {
            assert_eq!(
                retry.headers.get(framing_header),
                first.headers.get(framing_header),
                "{framing_header} of the replay {i}: {retry:?} vs {first:?}"
            );
        }
        assert_eq!(
            retry.trailers.as_ref().map(|t| t.get("x-run").cloned()),
            first.trailers.as_ref().map(|t| t.get("x-run").cloned())
        );
        if let Framing::GrpcTrailersOnly = framing {
            if h2 {
                assert!(
                    first.headers_only,
                    "a trailers-only answer stays one HEADERS frame"
                );
                assert!(retry.headers_only, "its replay too");
            }
            assert_eq!(retry.headers["grpc-message"], first.headers["grpc-message"]);
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sized_http1() {
    retry_right_after_the_answer(Framing::Sized, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_http1() {
    retry_right_after_the_answer(Framing::Chunked, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sized_http2() {
    retry_right_after_the_answer(Framing::Sized, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_http2() {
    retry_right_after_the_answer(Framing::Chunked, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_only_http2() {
    retry_right_after_the_answer(Framing::GrpcTrailersOnly, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_http2() {
    retry_right_after_the_answer(Framing::GrpcUnary, true).await;
}

/// An explicit `Content-Length` on a body that streams (its second chunk comes later, so it
/// is not read before the head leaves) and whose end hyper never asks for: the frame that
/// completes the length is held until the record is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_content_length_on_a_stream() {
    let store = FaultStore::new(MemoryStore::new());
    store.faults.complete_delay_ms.store(150, Ordering::SeqCst);
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let handler = tower::service_fn(move |_req: Request<Body>| {
        counter.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _ = tx
                .send(http_body::Frame::data(Bytes::from_static(b"hello ")))
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            let _ = tx
                .send(http_body::Frame::data(Bytes::from_static(b"world")))
                .await;
            // The sender stays open a while: the body's end is not known with its last byte.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        });
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header("content-length", "11")
                    .body(Body::new(common::ChannelBody(rx)))
                    .unwrap(),
            )
        }
    });
    let addr = serve(
        IdempotencyLayer::new(store)
            .share_keys_across_callers()
            .layer(handler),
    )
    .await;
    for i in 0..10 {
        let key = format!("cl-{i}");
        let first = send_over_tcp(addr, false, request(Framing::Sized, &key)).await;
        assert_eq!(&first.body[..], b"hello world");
        let retry = send_over_tcp(addr, false, request(Framing::Sized, &key)).await;
        assert!(retry.replayed(), "retry {i}: {retry:?}");
        assert_eq!(&retry.body[..], b"hello world");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 10);
}

/// The same on the shared stores (skipped without `REDIS_URL` / `DATABASE_URL`).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis() {
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: REDIS_URL is not set");
        return;
    };
    let store = tower_idempotency::RedisStore::connect(&url).await.unwrap();
    retry_right_after_the_answer_on(store.clone(), Framing::Sized, false).await;
    retry_right_after_the_answer_on(store.clone(), Framing::Sized, true).await;
    retry_right_after_the_answer_on(store, Framing::GrpcTrailersOnly, true).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: DATABASE_URL is not set");
        return;
    };
    let pool = tower_idempotency::sqlx::PgPool::connect(&url)
        .await
        .unwrap();
    let store = tower_idempotency::PostgresStore::new(pool);
    store.migrate().await.unwrap();
    retry_right_after_the_answer_on(store.clone(), Framing::Sized, false).await;
    retry_right_after_the_answer_on(store.clone(), Framing::Chunked, true).await;
    retry_right_after_the_answer_on(store, Framing::GrpcUnary, true).await;
}
