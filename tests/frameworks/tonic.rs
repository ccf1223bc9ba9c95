//! The layer in front of a real tonic server, called by a real tonic client (and a raw
//! HTTP/2 client, to see the bytes) over 127.0.0.1.
#![cfg(feature = "tonic")]

use crate::tonic_example as demo;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use demo::{CreateOrderRequest, ListOrdersRequest, Order, OrdersClient, with_key};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message as _;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};
use tower_idempotency::policy::InFlight;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

// ---------------------------------------------------------------------------------------
// Servers and clients

/// Serves `orders` behind `layer` (the example's own `serve`); returns its address.
async fn start<T: demo::Orders>(layer: IdempotencyLayer, orders: T) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(demo::serve(listener, layer, orders));
    addr
}

/// Counts the trailers blocks sent, so a replayed trailer shows that it was stored rather
/// than produced again.
static LEDGER: AtomicUsize = AtomicUsize::new(0);

/// Serves `orders` behind `layer`, with custom trailer metadata added to every response
/// that has trailers (tonic handlers cannot set trailers themselves).
async fn start_with_trailers<T: demo::Orders>(layer: IdempotencyLayer, orders: T) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stack = tower::ServiceBuilder::new()
        .layer(layer)
        .map_response(add_trailers as fn(http::Response<Body>) -> http::Response<Body>);
    let server = Server::builder()
        .layer(stack)
        .add_service(demo::OrdersServer::new(orders))
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(server);
    addr
}

fn add_trailers(res: http::Response<Body>) -> http::Response<Body> {
    res.map(|inner| Body::new(AddTrailers { inner }))
}

struct AddTrailers {
    inner: Body,
}

impl http_body::Body for AddTrailers {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(frame.map(|frame| {
            frame.map(|mut frame| {
                if let Some(trailers) = frame.trailers_mut() {
                    let n = LEDGER.fetch_add(1, Ordering::SeqCst) + 1;
                    trailers.insert("x-ledger-entry", HeaderValue::from(n));
                    trailers.append("x-audit", HeaderValue::from_static("checked"));
                    trailers.append("x-audit", HeaderValue::from_static("signed"));
                }
                frame
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

async fn client(addr: SocketAddr) -> OrdersClient {
    OrdersClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

type Raw = Client<HttpConnector, Full<Bytes>>;

/// A plain HTTP/2 client, to look at the wire answer.
fn raw_client() -> Raw {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// One gRPC call's answer as sent on the wire.
#[derive(Debug)]
struct RawAnswer {
    status: StatusCode,
    headers: HeaderMap,
    /// Whether the answer ended with its headers (a trailers-only gRPC response).
    headers_only: bool,
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl RawAnswer {
    /// The `grpc-status`, from the trailers or, in a trailers-only response, the headers.
    fn grpc_status(&self) -> &str {
        let from = self.trailers.as_ref().unwrap_or(&self.headers);
        from["grpc-status"].to_str().unwrap()
    }

    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .map(|v| v.as_bytes())
            == Some(b"true")
    }
}

/// Frames one message as gRPC does: no compression, a 4-byte big-endian length.
fn frame(message: &impl prost::Message) -> Bytes {
    let bytes = message.encode_to_vec();
    let mut out = Vec::with_capacity(5 + bytes.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&bytes);
    Bytes::from(out)
}

async fn raw_call(
    raw: &Raw,
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    message: &impl prost::Message,
) -> RawAnswer {
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let req = req.body(Full::new(frame(message))).unwrap();
    let res = raw.request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let headers_only = body.is_end_stream();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    RawAnswer {
        status: parts.status,
        headers: parts.headers,
        headers_only,
        data: collected.to_bytes(),
        trailers,
    }
}

fn without(headers: &HeaderMap, names: &[&str]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if !names.contains(&name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn replayed(metadata: &MetadataMap) -> bool {
    metadata
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

fn new_order(item: &str, amount: i64) -> CreateOrderRequest {
    CreateOrderRequest {
        item: item.to_owned(),
        amount,
    }
}

/// A refusal of the layer's own: a trailers-only gRPC status, never a problem body.
fn assert_trailers_only(answer: &RawAnswer, code: Code) {
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert!(answer.headers_only, "not trailers-only: {answer:?}");
    assert_eq!(answer.headers["content-type"], "application/grpc");
    assert_eq!(
        answer.headers["grpc-status"],
        (code as i32).to_string().as_str()
    );
    assert!(answer.headers.contains_key("grpc-message"));
    assert!(answer.data.is_empty(), "a body: {answer:?}");
    assert!(answer.trailers.is_none());
}

// ---------------------------------------------------------------------------------------
// A handler whose answers the tests choose by item, and which counts its runs

#[derive(Debug, Default)]
struct Scripted {
    runs: AtomicUsize,
    delay: Duration,
}

impl Scripted {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

impl demo::Orders for Arc<Scripted> {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(self.delay).await;
        // A tonic handler finds its claim in the request's extensions.
        let claim = request
            .extensions()
            .get::<tower_idempotency::IdempotencyClaim>()
            .cloned();
        let new = request.into_inner();
        if new.item == "committed-unavailable" {
            let claim = claim.expect("a covered call carries its claim");
            claim
                .commit()
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            return Err(Status::unavailable("charged, then the warehouse went down"));
        }
        match new.item.as_str() {
            "invalid" => {
                let mut metadata = MetadataMap::new();
                metadata.insert("x-error-field", "amount".parse().unwrap());
                Err(Status::with_metadata(
                    Code::InvalidArgument,
                    "amount must be positive",
                    metadata,
                ))
            }
            "unavailable" => Err(Status::unavailable("the warehouse is down")),
            "internal" => Err(Status::internal("the warehouse broke")),
            _ => Ok(Response::new(Order {
                id: format!("ord_{n}"),
                item: new.item,
                amount: new.amount,
            })),
        }
    }

    async fn list_orders(
        &self,
        _request: Request<ListOrdersRequest>,
    ) -> Result<Response<demo::ListOrdersResponse>, Status> {
        Ok(Response::new(demo::ListOrdersResponse::default()))
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn create_replay_mismatch_and_missing_key() {
    let addr =
        start_with_trailers(demo::layer(MemoryStore::new()), demo::OrderBook::default()).await;
    let raw = raw_client();
    let book = new_order("book", 1200);

    // The first call runs, framed as tonic frames it: no `content-length`.
    let first = raw_call(&raw, addr, demo::CREATE_ORDER, Some("order-1"), &book).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(
        !first.headers.contains_key("content-length"),
        "{:?}",
        first.headers
    );
    assert_eq!(first.grpc_status(), "0");
    assert!(!first.replayed());
    let trailers = first.trailers.clone().expect("trailers");
    let entry = trailers["x-ledger-entry"].clone();
    let audit: Vec<_> = trailers.get_all("x-audit").iter().collect();
    assert_eq!(audit, ["checked", "signed"]);
    let order = Order::decode(&first.data[5..]).unwrap();
    assert_eq!(order.id, "ord_1");

    // A retry gets the same bytes: headers, message and trailers, with the replay mark;
    // the trailers are the stored ones, not new ones. (hyper sets `date`.) No
    // `content-length` the first answer did not have: a client reading by length would
    // stop before the trailers.
    let again = raw_call(&raw, addr, demo::CREATE_ORDER, Some("order-1"), &book).await;
    assert!(again.replayed());
    assert_eq!(again.status, first.status);
    assert_eq!(
        again.headers.get("content-length"),
        first.headers.get("content-length")
    );
    assert_eq!(
        without(&again.headers, &["date", "idempotent-replayed"]),
        without(&first.headers, &["date"])
    );
    assert_eq!(again.data, first.data);
    assert_eq!(again.trailers, first.trailers);
    assert_eq!(again.trailers.as_ref().unwrap()["x-ledger-entry"], entry);

    // The tonic client sends the same bytes, so it gets the same order, marked as a replay
    // in its response metadata, with the custom trailers merged in.
    let mut client = client(addr).await;
    let res = client
        .create_order(with_key(book.clone(), "order-1"))
        .await
        .unwrap();
    assert!(replayed(res.metadata()));
    assert_eq!(
        res.metadata().get("x-ledger-entry").unwrap().as_bytes(),
        entry.as_bytes()
    );
    assert_eq!(res.into_inner(), order);

    // The key with another message: FAILED_PRECONDITION.
    let err = client
        .create_order(with_key(new_order("book", 9900), "order-1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("already used"), "{err:?}");

    // No key: INVALID_ARGUMENT.
    let err = client
        .create_order(Request::new(book.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("missing"), "{err:?}");

    // Both refusals are trailers-only gRPC statuses, not problem bodies.
    let other = new_order("book", 9900);
    let mismatch = raw_call(&raw, addr, demo::CREATE_ORDER, Some("order-1"), &other).await;
    assert_trailers_only(&mismatch, Code::FailedPrecondition);
    let missing = raw_call(&raw, addr, demo::CREATE_ORDER, None, &book).await;
    assert_trailers_only(&missing, Code::InvalidArgument);
    let malformed = raw_call(&raw, addr, demo::CREATE_ORDER, Some(""), &book).await;
    assert_trailers_only(&malformed, Code::InvalidArgument);

    // ListOrders is not covered: no key needed; one order was created in all.
    let list = client
        .list_orders(Request::new(ListOrdersRequest {}))
        .await
        .unwrap();
    assert!(!replayed(list.metadata()));
    assert_eq!(list.into_inner().orders, [order]);
}

#[tokio::test]
async fn concurrent_calls_with_one_key_run_once() {
    let handler = Arc::new(Scripted {
        delay: Duration::from_millis(300),
        ..Scripted::default()
    });
    let layer =
        demo::layer(MemoryStore::new()).on_in_flight(InFlight::Wait(Duration::from_secs(20)));
    let addr = start(layer, Arc::clone(&handler)).await;
    let client = client(addr).await;

    let calls = (0..32).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .create_order(with_key(new_order("lamp", 4500), "same-key"))
                .await
        })
    });
    let mut replays = 0;
    for call in calls.collect::<Vec<_>>() {
        let res = call.await.unwrap().expect("every call gets the order");
        replays += usize::from(replayed(res.metadata()));
        assert_eq!(res.into_inner().id, "ord_1");
    }
    assert_eq!(handler.runs(), 1);
    assert_eq!(replays, 31);
}

#[tokio::test]
async fn concurrent_calls_are_aborted_by_default() {
    let handler = Arc::new(Scripted {
        delay: Duration::from_millis(300),
        ..Scripted::default()
    });
    let addr = start(demo::layer(MemoryStore::new()), Arc::clone(&handler)).await;
    let client = client(addr).await;

    let calls = (0..32).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .create_order(with_key(new_order("lamp", 4500), "same-key"))
                .await
        })
    });
    let (mut ok, mut aborted) = (0, 0);
    for call in calls.collect::<Vec<_>>() {
        match call.await.unwrap() {
            Ok(res) => {
                ok += 1;
                assert_eq!(res.into_inner().id, "ord_1");
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Aborted, "{status:?}");
                // The pause gRPC clients obey (gRFC A6), beside Retry-After.
                let pushback = status
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                assert_eq!(pushback, Some(1000), "{:?}", status.metadata());
                aborted += 1;
            }
        }
    }
    assert_eq!(handler.runs(), 1);
    assert_eq!((ok, aborted), (1, 31));
}

#[tokio::test]
async fn a_final_error_status_is_stored_with_its_metadata() {
    let handler = Arc::new(Scripted::default());
    let addr = start(demo::layer(MemoryStore::new()), Arc::clone(&handler)).await;
    let raw = raw_client();
    let mut client = client(addr).await;
    let invalid = new_order("invalid", -1);

    let first = client
        .create_order(with_key(invalid.clone(), "bad-1"))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::InvalidArgument);
    assert_eq!(first.metadata().get("x-error-field").unwrap(), "amount");
    assert!(!replayed(first.metadata()));

    let again = client
        .create_order(with_key(invalid.clone(), "bad-1"))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::InvalidArgument);
    assert_eq!(again.message(), first.message());
    assert_eq!(again.metadata().get("x-error-field").unwrap(), "amount");
    assert!(replayed(again.metadata()));
    assert_eq!(handler.runs(), 1);

    // On the wire, the replay is the stored trailers-only answer.
    let wire = raw_call(&raw, addr, demo::CREATE_ORDER, Some("bad-1"), &invalid).await;
    assert!(wire.replayed());
    assert!(wire.headers_only, "{wire:?}");
    assert_eq!(wire.headers["grpc-status"], "3");
    assert_eq!(wire.headers["x-error-field"], "amount");
    assert!(wire.data.is_empty());
    assert_eq!(handler.runs(), 1);
}

#[tokio::test]
async fn retryable_error_statuses_are_not_stored() {
    let handler = Arc::new(Scripted::default());
    let addr = start(demo::layer(MemoryStore::new()), Arc::clone(&handler)).await;
    let mut client = client(addr).await;

    for (item, code) in [
        ("unavailable", Code::Unavailable),
        ("internal", Code::Internal),
    ] {
        let before = handler.runs();
        let key = format!("retry-{item}");
        for _ in 0..2 {
            let err = client
                .create_order(with_key(new_order(item, 100), &key))
                .await
                .unwrap_err();
            assert_eq!(err.code(), code, "{err:?}");
            assert!(!replayed(err.metadata()));
        }
        assert_eq!(handler.runs(), before + 2, "{item} ran again on retry");
    }
}

/// A tonic handler that declared its commit point (through the claim in its request's
/// extensions) has even a retryable error status stored: the retry replays it, the handler
/// runs once.
#[tokio::test]
async fn a_committed_call_is_never_run_again() {
    let handler = Arc::new(Scripted::default());
    let addr = start(demo::layer(MemoryStore::new()), Arc::clone(&handler)).await;
    let mut client = client(addr).await;
    let first = client
        .create_order(with_key(new_order("committed-unavailable", 100), "c-1"))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::Unavailable);
    let retry = client
        .create_order(with_key(new_order("committed-unavailable", 100), "c-1"))
        .await
        .unwrap_err();
    assert_eq!(retry.code(), Code::Unavailable);
    assert!(replayed(retry.metadata()));
    assert_eq!(handler.runs(), 1, "a committed call ran again");
}

/// A handler's error status is a trailers-only answer (HEADERS with END_STREAM). Without
/// the layer it stays one on the wire.
#[tokio::test]
async fn without_the_layer_a_handler_error_is_trailers_only() {
    let handler = Arc::new(Scripted::default());
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .cover_when(|_| false);
    let addr = start(layer, Arc::clone(&handler)).await;
    let raw = raw_client();
    let answer = raw_call(
        &raw,
        addr,
        demo::CREATE_ORDER,
        Some("bad-2"),
        &new_order("invalid", -1),
    )
    .await;
    assert_eq!(answer.headers["grpc-status"], "3");
    assert!(answer.headers_only, "{answer:?}");
}

/// The layer should keep a handler's trailers-only answer trailers-only on the first run
/// too, as gRPC clients other than tonic's need (they read `grpc-status` from a HEADERS
/// frame only when it ends the stream).
#[tokio::test]
async fn a_handler_error_stays_trailers_only_on_the_first_run() {
    let handler = Arc::new(Scripted::default());
    let addr = start(demo::layer(MemoryStore::new()), Arc::clone(&handler)).await;
    let raw = raw_client();
    let first = raw_call(
        &raw,
        addr,
        demo::CREATE_ORDER,
        Some("bad-2"),
        &new_order("invalid", -1),
    )
    .await;
    assert_eq!(first.headers["grpc-status"], "3");
    assert!(first.data.is_empty());
    assert!(first.trailers.is_none());
    assert!(first.headers_only, "{first:?}");
}

/// gRPC calls are covered only when their method is listed: by default none is (every call
/// is a POST, and reads and streams must not need a key or be buffered), and with
/// `grpc_methods` exactly the listed ones are.
#[tokio::test]
async fn only_listed_grpc_methods_are_covered() {
    let book = new_order("book", 1200);
    let raw = raw_client();

    let unlisted = IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers();
    let addr = start(unlisted, demo::OrderBook::default()).await;
    let list = raw_call(&raw, addr, demo::LIST_ORDERS, None, &ListOrdersRequest {}).await;
    assert_eq!(list.grpc_status(), "0", "a read needs no key");
    let a = raw_call(&raw, addr, demo::CREATE_ORDER, Some("k"), &book).await;
    let b = raw_call(&raw, addr, demo::CREATE_ORDER, Some("k"), &book).await;
    assert!(
        !a.replayed() && !b.replayed(),
        "no gRPC method is covered by default"
    );

    let listed = IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .grpc_methods([demo::CREATE_ORDER]);
    let addr = start(listed, demo::OrderBook::default()).await;
    let list = raw_call(&raw, addr, demo::LIST_ORDERS, None, &ListOrdersRequest {}).await;
    assert_eq!(list.grpc_status(), "0", "an unlisted read needs no key");
    let missing = raw_call(&raw, addr, demo::CREATE_ORDER, None, &book).await;
    assert_eq!(missing.grpc_status(), "3", "a listed method needs its key");
    let a = raw_call(&raw, addr, demo::CREATE_ORDER, Some("k"), &book).await;
    let b = raw_call(&raw, addr, demo::CREATE_ORDER, Some("k"), &book).await;
    assert!(!a.replayed() && b.replayed());
    assert_eq!(a.data, b.data);
}
