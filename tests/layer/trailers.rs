//! Plain HTTP responses with trailers: data frames, then a trailers frame, recorded and
//! replayed as they were.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_idempotency::policy::InFlight;
use tower_idempotency::{IdempotencyLayer, IdempotencyOutcome, MemoryStore};

/// A streamed body: its frames, one at a time, with a pending poll before each.
struct Frames {
    frames: VecDeque<Frame<Bytes>>,
    pending: bool,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.pending = !self.pending;
        if self.pending {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.frames.pop_front().map(Ok))
    }
}

fn trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("x-checksum", HeaderValue::from_static("sha256=5d41402abc"));
    t.append("x-note", HeaderValue::from_static("first"));
    t.append("x-note", HeaderValue::from_static("second"));
    t.insert("x-raw", HeaderValue::from_bytes(b"caf\xe9").unwrap());
    t
}

const CHUNKS: [&str; 3] = ["id,item\n", "1,book\n", "2,lamp\n"];

fn report(status: StatusCode) -> Response<Frames> {
    let mut frames: VecDeque<_> = CHUNKS
        .iter()
        .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
        .collect();
    frames.push_back(Frame::trailers(trailers()));
    let mut res = Response::new(Frames {
        frames,
        pending: false,
    });
    *res.status_mut() = status;
    res.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/csv"));
    res.headers_mut().insert(
        "trailer",
        HeaderValue::from_static("x-checksum, x-note, x-raw"),
    );
    res
}

/// The layer over a handler that answers `status` with a streamed body and trailers, and
/// counts its runs.
fn service(
    layer: IdempotencyLayer,
    status: StatusCode,
) -> (
    impl Service<
        Request<Full<Bytes>>,
        Response = Response<impl Body<Data = Bytes, Error = Infallible>>,
        Error = Infallible,
    > + Clone,
    Arc<AtomicUsize>,
) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let handler = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, Infallible>(report(status)) }
    });
    (
        tower::ServiceBuilder::new().layer(layer).service(handler),
        runs,
    )
}

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/reports")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"month=2026-11")))
        .unwrap()
}

#[tokio::test]
async fn data_and_trailers_are_replayed() {
    let (svc, runs) = service(
        IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers(),
        StatusCode::OK,
    );

    let first = svc.clone().oneshot(request("report-1")).await.unwrap();
    assert_eq!(
        first.extensions().get::<IdempotencyOutcome>(),
        Some(&IdempotencyOutcome::Executed)
    );
    let first_headers = first.headers().clone();
    let first = first.into_body().collect().await.unwrap();
    let first_trailers = first.trailers().cloned();
    assert_eq!(first_trailers, Some(trailers()));
    let first = first.to_bytes();
    assert_eq!(first, CHUNKS.concat().as_bytes());

    let again = svc.clone().oneshot(request("report-1")).await.unwrap();
    assert_eq!(
        again.extensions().get::<IdempotencyOutcome>(),
        Some(&IdempotencyOutcome::Replayed)
    );
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.headers()["content-type"],
        first_headers["content-type"]
    );
    // `Trailer` is not a hop-by-hop field (RFC 9110 §6.6.2): replayed as the first answer
    // had it, so that an HTTP/1.1 server sends the trailers it names.
    assert_eq!(again.headers().get("trailer"), first_headers.get("trailer"));
    let again = again.into_body().collect().await.unwrap();
    assert_eq!(again.trailers().cloned(), first_trailers);
    assert_eq!(again.to_bytes(), first);

    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_body_dropped_midway_is_finished_and_replayed_whole() {
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .on_in_flight(InFlight::Wait(Duration::from_secs(5)));
    let (svc, runs) = service(layer, StatusCode::OK);

    // The client reads one frame and goes away.
    let first = svc.clone().oneshot(request("report-2")).await.unwrap();
    let mut body = first.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), CHUNKS[0]);
    drop(body);

    let again = svc.clone().oneshot(request("report-2")).await.unwrap();
    assert_eq!(
        again.extensions().get::<IdempotencyOutcome>(),
        Some(&IdempotencyOutcome::Replayed)
    );
    let again = again.into_body().collect().await.unwrap();
    assert_eq!(again.trailers().cloned(), Some(trailers()));
    assert_eq!(again.to_bytes(), CHUNKS.concat().as_bytes());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_retryable_status_with_trailers_is_not_stored() {
    let (svc, runs) = service(
        IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers(),
        StatusCode::SERVICE_UNAVAILABLE,
    );
    for _ in 0..2 {
        let res = svc.clone().oneshot(request("report-3")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.headers().get("idempotent-replayed").is_none());
        let body = res.into_body().collect().await.unwrap();
        assert_eq!(body.trailers().cloned(), Some(trailers()));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A handler answering `200 text/csv` with data and trailers, announced by `Trailer` (an
/// HTTP/1.1 server sends no trailer field its response's `Trailer` does not name).
fn csv_with_a_checksum(
    runs: Arc<AtomicUsize>,
) -> impl Service<
    Request<axum::body::Body>,
    Response = Response<axum::body::Body>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_req: Request<axum::body::Body>| {
        runs.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut t = HeaderMap::new();
            t.insert("x-checksum", HeaderValue::from_static("sha256=5d41"));
            let body = axum::body::Body::new(
                Full::new(Bytes::from_static(b"id,item\n"))
                    .with_trailers(async move { Some(Ok::<_, Infallible>(t)) }),
            );
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/csv")
                    .header("trailer", "x-checksum")
                    .body(body)
                    .unwrap(),
            )
        }
    })
}

/// Over real HTTP/1.1 and HTTP/2, a replay carries the trailers the first answer carried.
/// (Found by review: the layer dropped `Trailer` from replays as if it were hop-by-hop,
/// and hyper's HTTP/1.1 server sends no trailer a response's `Trailer` does not name: the
/// first answer had its checksum, the replay none.)
#[tokio::test]
async fn a_replay_over_the_wire_carries_its_trailers_http1_and_http2() {
    for h2 in [false, true] {
        let runs = Arc::new(AtomicUsize::new(0));
        let svc = tower::ServiceBuilder::new()
            .layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers())
            .service(csv_with_a_checksum(Arc::clone(&runs)));
        let addr = crate::common::serve(svc).await;
        let req = || {
            Request::post(format!("http://{addr}/reports"))
                .header("host", addr.to_string())
                .header("te", "trailers")
                .header("idempotency-key", "r-1")
                .body(Full::new(Bytes::from_static(b"month=11")))
                .unwrap()
        };
        let first = crate::common::send_over_tcp(addr, h2, req()).await;
        let again = crate::common::send_over_tcp(addr, h2, req()).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(again.replayed());
        assert_eq!(
            first.trailers.as_ref().map(|t| t["x-checksum"].clone()),
            Some(HeaderValue::from_static("sha256=5d41")),
            "h2 {h2}: {first:?}"
        );
        assert_eq!(again.trailers, first.trailers, "h2 {h2}: {again:?}");
        assert_eq!(again.body, first.body);
    }
}
