//! The generated client against the generated server behind the layer: a retry of
//! `CreateOrder` with the same key gets the same order and creates no second one; a
//! `ListOrders` needs no key; a `CreateOrder` without one is refused.

use orders_grpc::pb::orders_client::OrdersClient;
use orders_grpc::pb::{CreateOrderRequest, ListOrdersRequest};
use orders_grpc::{OrderBook, layer};
use tonic::Request;
use tonic::transport::server::TcpIncoming;

fn with_key<T>(message: T, key: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert("idempotency-key", key.parse().expect("a valid key"));
    req
}

#[tokio::test]
async fn a_generated_client_retries_once_and_reads_freely() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let book = OrderBook::default();
    let service = book.clone().into_service();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(layer())
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let mut client = OrdersClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let order = CreateOrderRequest {
        item: "book".into(),
        amount: 1200,
    };

    let first = client
        .create_order(with_key(order.clone(), "order-1"))
        .await
        .unwrap();
    let retry = client
        .create_order(with_key(order.clone(), "order-1"))
        .await
        .unwrap();
    assert_eq!(retry.get_ref(), first.get_ref());
    assert_eq!(
        retry
            .metadata()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true")
    );
    assert_eq!(book.len(), 1, "the retry created no second order");

    let missing = client.create_order(Request::new(order)).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);

    let listed = client
        .list_orders(Request::new(ListOrdersRequest {}))
        .await
        .expect("a read needs no key");
    assert_eq!(listed.get_ref().orders.len(), 1);
}
