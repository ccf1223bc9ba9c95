//! An orders service generated from `proto/orders.proto`, behind the idempotency layer.
//!
//! `CreateOrder` is covered (a retry with the same `idempotency-key` metadata gets the same
//! order); `ListOrders`, a read, is not, and needs no key. Run the server with
//! `cargo run -p orders-grpc` (on `LISTEN_ADDR`, default `127.0.0.1:3003`).

use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// The code generated from `proto/orders.proto`.
pub mod pb {
    tonic::include_proto!("orders.v1");
}

use pb::orders_server::{Orders, OrdersServer};
use pb::{CreateOrderRequest, ListOrdersRequest, ListOrdersResponse, Order};

/// The full path of `CreateOrder`, as the layer sees it: `/orders.v1.Orders/CreateOrder`.
pub fn create_order_path() -> String {
    format!("/{}/CreateOrder", pb::orders_server::SERVICE_NAME)
}

/// The layer for this service: only `CreateOrder` is covered. This example has no users,
/// so every caller shares one scope; a service with authentication scopes by principal.
pub fn layer() -> IdempotencyLayer {
    IdempotencyLayer::new(MemoryStore::new())
        .share_keys_across_callers()
        .grpc_methods([create_order_path()])
}

/// An in-memory order book.
#[derive(Debug, Default, Clone)]
pub struct OrderBook {
    orders: Arc<Mutex<Vec<Order>>>,
}

impl OrderBook {
    /// How many orders were created.
    pub fn len(&self) -> usize {
        self.orders.lock().map_or(0, |o| o.len())
    }

    /// Whether no order was created.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The service, ready for `Server::builder().add_service(..)`.
    pub fn into_service(self) -> OrdersServer<Self> {
        OrdersServer::new(self)
    }
}

#[tonic::async_trait]
impl Orders for OrderBook {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let req = request.into_inner();
        if req.amount <= 0 {
            return Err(Status::invalid_argument("amount must be positive"));
        }
        let mut orders = self
            .orders
            .lock()
            .map_err(|_| Status::internal("order book poisoned"))?;
        let order = Order {
            id: format!("ord_{}", orders.len() + 1),
            item: req.item,
            amount: req.amount,
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
            .map_err(|_| Status::internal("order book poisoned"))?
            .clone();
        Ok(Response::new(ListOrdersResponse { orders }))
    }
}
