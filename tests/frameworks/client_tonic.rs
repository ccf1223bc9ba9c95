//! The client side with a tonic client: a call that times out is retried with its key
//! (its body kept by `BufferedRetryLayer`), and ends with the first answer, replayed; the
//! operation runs once.
#![cfg(all(feature = "client", feature = "tonic"))]

use crate::tonic_example as demo;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use demo::{CreateOrderRequest, ListOrdersRequest, ListOrdersResponse, Order};
use tonic::codegen::tokio_stream;
use tonic::transport::Endpoint;
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;
use tower_idempotency::MemoryStore;
use tower_idempotency::client::{BufferedRetryLayer, IdempotencyKeyLayer, RetryPolicy};

/// Orders that take `work` to make, and the keys each call came with.
#[derive(Debug, Default)]
struct Slow {
    runs: AtomicUsize,
    work: Duration,
    keys: std::sync::Mutex<Vec<String>>,
}

impl demo::Orders for Arc<Slow> {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        if let Some(key) = request.metadata().get("idempotency-key") {
            self.keys
                .lock()
                .unwrap()
                .push(key.to_str().unwrap().to_owned());
        }
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        let new = request.into_inner();
        if new.item == "refused" {
            return Err(Status::failed_precondition("out of stock"));
        }
        tokio::time::sleep(self.work).await;
        Ok(Response::new(Order {
            id: format!("ord_{n}"),
            item: new.item,
            amount: new.amount,
        }))
    }

    async fn list_orders(
        &self,
        _request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        Ok(Response::new(ListOrdersResponse::default()))
    }
}

async fn call(
    grpc: &mut tonic::client::Grpc<
        impl tonic::client::GrpcService<
            tonic::body::Body,
            Error: Into<Box<dyn std::error::Error + Send + Sync>>,
            ResponseBody: http_body::Body<
                Data = bytes::Bytes,
                Error: Into<Box<dyn std::error::Error + Send + Sync>>,
            > + Send
                              + 'static,
        >,
    >,
    item: &str,
) -> Result<Response<Order>, Status> {
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.into().to_string()))?;
    let request = Request::new(CreateOrderRequest {
        item: item.to_owned(),
        amount: 1200,
    });
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(demo::CREATE_ORDER),
        ProstCodec::default(),
    )
    .await
}

#[tokio::test]
async fn a_tonic_call_that_times_out_is_retried_with_its_key_and_replayed() {
    let orders = Arc::new(Slow {
        work: Duration::from_millis(400),
        ..Slow::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(demo::serve(
        listener,
        demo::layer(MemoryStore::new()),
        Arc::clone(&orders),
    ));
    // Each attempt gives up after 150 ms; the operation takes 400.
    let channel = Endpoint::new(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_millis(150))
        .connect()
        .await
        .unwrap();
    let service = tower::ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(BufferedRetryLayer::new(
            RetryPolicy::new()
                .max_retries(20)
                .backoff(Duration::from_millis(20), Duration::from_millis(100))
                .max_retry_after(Duration::from_millis(150)),
        ))
        .service(channel);
    let mut grpc = tonic::client::Grpc::new(service);

    let order = call(&mut grpc, "book")
        .await
        .expect("the call ends with the order");
    assert_eq!(order.get_ref().id, "ord_0");
    assert_eq!(
        order
            .metadata()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true"),
        "the first attempt's answer, replayed"
    );
    assert_eq!(
        orders.runs.load(Ordering::SeqCst),
        1,
        "the operation ran once"
    );
    let keys = orders.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 1, "only the first attempt reached the handler");

    // A final status is not retried: one more run, one attempt.
    let refused = call(&mut grpc, "refused").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(orders.runs.load(Ordering::SeqCst), 2);
    let keys = orders.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1], "each call has its own key");
}

/// A service with a client-streaming method (`First`: answers with the first message it
/// reads, without waiting for the stream to end) and a bidirectional one (`Echo`: answers
/// every message as it comes).
#[derive(Clone)]
struct Streams;

const FIRST: &str = "/streams.v1.Streams/First";
const ECHO: &str = "/streams.v1.Streams/Echo";

impl tonic::server::NamedService for Streams {
    const NAME: &'static str = "streams.v1.Streams";
}

struct First;

impl tonic::server::ClientStreamingService<CreateOrderRequest> for First {
    type Response = Order;
    type Future = BoxFuture<Result<Response<Order>, Status>>;

    fn call(&mut self, request: Request<tonic::Streaming<CreateOrderRequest>>) -> Self::Future {
        Box::pin(async move {
            let mut stream = request.into_inner();
            let first = stream
                .message()
                .await?
                .ok_or_else(|| Status::invalid_argument("no message"))?;
            Ok(Response::new(Order {
                id: "first".to_owned(),
                item: first.item,
                amount: first.amount,
            }))
        })
    }
}

struct Echo;

type Echoes =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Order, Status>> + Send + 'static>>;

impl tonic::server::StreamingService<CreateOrderRequest> for Echo {
    type Response = Order;
    type ResponseStream = Echoes;
    type Future = BoxFuture<Result<Response<Echoes>, Status>>;

    fn call(&mut self, request: Request<tonic::Streaming<CreateOrderRequest>>) -> Self::Future {
        use tokio_stream::StreamExt;
        let echoes = request.into_inner().map(|message| {
            message.map(|m| Order {
                id: "echo".to_owned(),
                item: m.item,
                amount: m.amount,
            })
        });
        Box::pin(async move { Ok(Response::new(Box::pin(echoes) as Echoes)) })
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl tower::Service<http::Request<tonic::body::Body>> for Streams {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
            Ok(match req.uri().path() {
                FIRST => grpc.client_streaming(First, req).await,
                ECHO => grpc.streaming(Echo, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// `call`'s output, or a panic if it takes more than 5 s.
async fn within<T>(call: impl std::future::Future<Output = T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap_or_else(|_| {
            panic!("{what} did not complete: the request stream was held back until its end")
        })
}

fn message(item: &str) -> CreateOrderRequest {
    CreateOrderRequest {
        item: item.to_owned(),
        amount: 1,
    }
}

#[tokio::test]
async fn streaming_calls_whose_request_stream_stays_open_are_sent_at_once() {
    use tokio_stream::StreamExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(demo::layer(MemoryStore::new()))
            .add_service(Streams)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = Endpoint::new(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let service = tower::ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(BufferedRetryLayer::new(RetryPolicy::new()))
        .service(channel);
    let mut grpc = tonic::client::Grpc::new(service);

    // Client streaming: one message, then the stream stays open; the server answers after
    // the first message.
    grpc.ready().await.unwrap();
    let open = tokio_stream::once(message("first")).chain(tokio_stream::pending());
    let answer = within(
        grpc.client_streaming(
            Request::new(open),
            http::uri::PathAndQuery::from_static(FIRST),
            ProstCodec::<CreateOrderRequest, Order>::default(),
        ),
        "the client-streaming call",
    )
    .await
    .expect("the server's answer");
    assert_eq!(answer.get_ref().item, "first");

    // Bidirectional: each message is sent once the reply to the one before has come back.
    let (send, receive) = tokio::sync::mpsc::channel(1);
    send.send(message("one")).await.unwrap();
    let outgoing = tokio_stream::wrappers::ReceiverStream::new(receive);
    grpc.ready().await.unwrap();
    let replies = within(
        grpc.streaming(
            Request::new(outgoing),
            http::uri::PathAndQuery::from_static(ECHO),
            ProstCodec::<CreateOrderRequest, Order>::default(),
        ),
        "the bidirectional call",
    )
    .await
    .expect("the server's answer");
    let mut replies = replies.into_inner();
    for item in ["one", "two"] {
        let reply = within(replies.message(), "a reply")
            .await
            .unwrap()
            .expect("a reply");
        assert_eq!(reply.item, item);
        if item == "one" {
            send.send(message("two")).await.unwrap();
        }
    }
    drop(send);
    let end = within(replies.message(), "the end of the replies")
        .await
        .unwrap();
    assert!(
        end.is_none(),
        "the call ends when the client closes its stream"
    );
}
