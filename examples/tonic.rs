//! The orders demo over gRPC: a tonic server whose `CreateOrder` call is protected by the
//! layer.
//!
//! ```text
//! cargo run --features tonic --example tonic
//! ```
//!
//! Environment: `LISTEN_ADDR` (default `127.0.0.1:50051`).
//!
//! The key travels in the `idempotency-key` request metadata entry: gRPC metadata are HTTP/2
//! headers, and the layer reads the `Idempotency-Key` header. A replayed answer carries
//! `idempotent-replayed: true` in its response metadata; the layer's own refusals are
//! trailers-only gRPC statuses (`INVALID_ARGUMENT` for a missing or malformed key,
//! `FAILED_PRECONDITION` for a key reused with another message, `ABORTED` while the first call
//! still runs, ...).
//!
//! No build script and no `protoc`: the messages are written by hand with `prost` derives, and
//! the service and its client are a compact hand-written version of what `tonic-prost-build`
//! generates, on `tonic::server::Grpc` and `tonic::client::Grpc` with `tonic_prost::ProstCodec`.
//!
//! # Which calls are covered
//!
//! Every gRPC call is an HTTP/2 `POST` with `content-type: application/grpc`, so the layer
//! covers no gRPC method unless it is listed: this demo covers only `CreateOrder`, with
//! [`IdempotencyLayer::grpc_methods`] (see [`layer`]). Reads such as `ListOrders` pass
//! through and need no key.
//!
//! A streaming call covered by listing its path (or by `cover_when`) is handled like a
//! unary one, and this is what happens:
//!
//! - **The request stream is buffered whole** (up to `max_request_body`, 1 MiB by default,
//!   counting the 5-byte gRPC frame headers) to be fingerprinted, before the handler sees its
//!   first message. A client-streaming call therefore starts when the client half-closes; a
//!   longer stream is refused with `RESOURCE_EXHAUSTED`. A bidirectional call whose client
//!   waits for a reply before sending more, or before closing, never starts: it deadlocks
//!   until its deadline.
//! - **The whole response stream is recorded** (up to `max_response_body`, 1 MiB by default),
//!   and the outcome is decided by the `grpc-status` trailer at its end. While the stream
//!   runs, the key is in flight (a retry gets `ABORTED`, or waits). A replay sends every
//!   recorded message at once, as one data frame, then the trailers. A longer stream still
//!   reaches the client whole, but leaves a tombstone, and a retry gets `ALREADY_EXISTS`.
//! - With the default `Disconnect::Finish`, a client that goes away leaves its response stream
//!   to be drained to its end on a spawned task: an endless server stream is drained forever.
//!
//! So list only unary methods that change state, as [`layer`] does, unless these semantics
//! are what you want.

// The test suites include this file as a module and use only parts of it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{IntoRequest, Request, Response, Status};
use tonic_prost::ProstCodec;
use tower::Service;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore};

/// The gRPC service name, `package.Service`.
pub const SERVICE: &str = "orders.v1.Orders";
/// The path of the `CreateOrder` method.
pub const CREATE_ORDER: &str = "/orders.v1.Orders/CreateOrder";
/// The path of the `ListOrders` method.
pub const LIST_ORDERS: &str = "/orders.v1.Orders/ListOrders";

// The messages, as `prost-build` would write them from:
//
// ```proto
// syntax = "proto3";
// package orders.v1;
// service Orders {
//   rpc CreateOrder(CreateOrderRequest) returns (Order);
//   rpc ListOrders(ListOrdersRequest) returns (ListOrdersResponse);
// }
// message CreateOrderRequest { string item = 1; int64 amount = 2; }
// message Order { string id = 1; string item = 2; int64 amount = 3; }
// message ListOrdersRequest {}
// message ListOrdersResponse { repeated Order orders = 1; }
// ```

/// `CreateOrder`'s request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateOrderRequest {
    /// What is ordered.
    #[prost(string, tag = "1")]
    pub item: String,
    /// How much it costs, in cents.
    #[prost(int64, tag = "2")]
    pub amount: i64,
}

/// An order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Order {
    /// Its id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// What was ordered.
    #[prost(string, tag = "2")]
    pub item: String,
    /// How much it costs, in cents.
    #[prost(int64, tag = "3")]
    pub amount: i64,
}

/// `ListOrders`' request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListOrdersRequest {}

/// `ListOrders`' response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListOrdersResponse {
    /// Every order, oldest first.
    #[prost(message, repeated, tag = "1")]
    pub orders: Vec<Order>,
}

/// The service's methods, as the generated server trait declares them.
pub trait Orders: Send + Sync + 'static {
    /// Creates an order.
    fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> impl Future<Output = Result<Response<Order>, Status>> + Send;

    /// Lists the orders.
    fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> impl Future<Output = Result<Response<ListOrdersResponse>, Status>> + Send;
}

/// The demo's implementation: orders in memory.
#[derive(Debug, Default)]
pub struct OrderBook {
    orders: Mutex<Vec<Order>>,
}

impl Orders for OrderBook {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let new = request.into_inner();
        if new.item.is_empty() {
            return Err(Status::invalid_argument("item must not be empty"));
        }
        if new.amount <= 0 {
            return Err(Status::invalid_argument("amount must be positive"));
        }
        let mut orders = self.orders.lock().unwrap_or_else(|e| e.into_inner());
        let order = Order {
            id: format!("ord_{}", orders.len() + 1),
            item: new.item,
            amount: new.amount,
        };
        orders.push(order.clone());
        Ok(Response::new(order))
    }

    async fn list_orders(
        &self,
        _request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let orders = self
            .orders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(Response::new(ListOrdersResponse { orders }))
    }
}

/// The gRPC server of an [`Orders`] implementation: routes a call by its path, decodes the
/// request message and encodes the answer with tonic's `Grpc` and prost's codec.
#[derive(Debug)]
pub struct OrdersServer<T> {
    inner: Arc<T>,
}

impl<T> OrdersServer<T> {
    /// Serves `orders`.
    pub fn new(orders: T) -> Self {
        Self::from_arc(Arc::new(orders))
    }

    /// Serves shared `orders`.
    pub fn from_arc(inner: Arc<T>) -> Self {
        Self { inner }
    }
}

impl<T> Clone for OrdersServer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> NamedService for OrdersServer<T> {
    const NAME: &'static str = SERVICE;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<T: Orders> Service<http::Request<Body>> for OrdersServer<T> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        match req.uri().path() {
            CREATE_ORDER => Box::pin(async move {
                // Any `Service<tonic::Request<M>>` answering `tonic::Response<R>` or a
                // `Status` is a `tonic::server::UnaryService`.
                let method = tower::service_fn(move |r| {
                    let inner = Arc::clone(&inner);
                    async move { inner.create_order(r).await }
                });
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(method, req).await)
            }),
            LIST_ORDERS => Box::pin(async move {
                let method = tower::service_fn(move |r| {
                    let inner = Arc::clone(&inner);
                    async move { inner.list_orders(r).await }
                });
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(method, req).await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// A client of the service, as the generated client is.
#[derive(Debug, Clone)]
pub struct OrdersClient {
    inner: tonic::client::Grpc<Channel>,
}

impl OrdersClient {
    /// Connects to `uri`, such as `http://127.0.0.1:50051`.
    pub async fn connect(uri: String) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::new(uri)?.connect().await?;
        Ok(Self::new(channel))
    }

    /// A client on `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: tonic::client::Grpc::new(channel),
        }
    }

    async fn unary<M1, M2>(
        &mut self,
        request: Request<M1>,
        path: &'static str,
    ) -> Result<Response<M2>, Status>
    where
        M1: prost::Message + Send + Sync + 'static,
        M2: prost::Message + Default + Send + Sync + 'static,
    {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("service was not ready: {e}")))?;
        let path = http::uri::PathAndQuery::from_static(path);
        self.inner.unary(request, path, ProstCodec::default()).await
    }

    /// Calls `CreateOrder`; give it a key with [`with_key`].
    pub async fn create_order(
        &mut self,
        request: impl IntoRequest<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        self.unary(request.into_request(), CREATE_ORDER).await
    }

    /// Calls `ListOrders`.
    pub async fn list_orders(
        &mut self,
        request: impl IntoRequest<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        self.unary(request.into_request(), LIST_ORDERS).await
    }
}

/// A request carrying `key` in its `idempotency-key` metadata entry.
///
/// # Panics
///
/// If `key` is not a valid metadata value.
pub fn with_key<M>(message: M, key: &str) -> Request<M> {
    let mut request = Request::new(message);
    let value = key.parse().expect("an idempotency key is printable ASCII");
    request.metadata_mut().insert("idempotency-key", value);
    request
}

/// The demo's layer on `store`: it covers `CreateOrder` only, so that reads (and any
/// streaming method added later) need no key. Every other setting is the default.
pub fn layer(store: impl IdempotencyStore) -> IdempotencyLayer {
    // No users in this example: every caller shares one scope (see `scope_by_principal`
    // for a service with authentication).
    IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .grpc_methods([CREATE_ORDER])
}

/// Serves `orders` behind `layer` on `listener` until the process ends.
pub async fn serve<T: Orders>(
    listener: tokio::net::TcpListener,
    layer: IdempotencyLayer,
    orders: T,
) -> Result<(), tonic::transport::Error> {
    serve_until(listener, layer, orders, std::future::pending()).await
}

/// Serves until `signal` resolves, lets the calls in progress finish, then waits (up to
/// 10 s) for the work the layer finishes in the background, so that no stored outcome is
/// lost at shutdown.
pub async fn serve_until<T: Orders>(
    listener: tokio::net::TcpListener,
    layer: IdempotencyLayer,
    orders: T,
    signal: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let work = layer.detached_work();
    Server::builder()
        .layer(layer)
        .add_service(OrdersServer::new(orders))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), signal)
        .await?;
    if let Err(unfinished) = work.shutdown(std::time::Duration::from_secs(10)).await {
        eprintln!("stopped: {unfinished}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `RUST_LOG` chooses the events (default `info`; the layer's faults are `warn`).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let addr = std::env::var("LISTEN_ADDR")
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "127.0.0.1:50051".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "orders gRPC service listening on {}",
        listener.local_addr()?
    );
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve_until(
        listener,
        layer(MemoryStore::new()),
        OrderBook::default(),
        ctrl_c,
    )
    .await?;
    Ok(())
}
