//! The client side with a tonic client: a call that times out is retried with its key
//! (its body kept by `BufferedRetryLayer`), and ends with the first answer, replayed; the
//! operation runs once.
#![cfg(all(feature = "client", feature = "tonic"))]

#[path = "../examples/tonic.rs"]
#[allow(unreachable_pub, missing_docs)]
mod demo;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use demo::{CreateOrderRequest, ListOrdersRequest, ListOrdersResponse, Order};
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
