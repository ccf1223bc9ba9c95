//! The orders demo on plain hyper 1.x: a `tower::ServiceBuilder` stack served by hyper's
//! HTTP/1 and HTTP/2 connection builder.
//!
//! ```text
//! cargo run --example hyper
//! curl -i -X POST localhost:3001/orders -H 'Idempotency-Key: order-1' -d 'book'
//! ```
//!
//! Environment: `LISTEN_ADDR` (default `127.0.0.1:3001`).
//!
//! hyper hands the service a `hyper::body::Incoming`, which only hyper can build, while the
//! layer must hand the service behind it a body holding the bytes it read for the
//! fingerprint. So the stack first maps the request body (tower's `map_request`; tower-http's
//! `MapRequestBodyLayer` does the same) into one the layer can rebuild
//! (here a `BoxBody`; see `RebuildBody`), then applies the layer, then calls the handler;
//! `TowerToHyperService` adapts the tower service to hyper's `Service` trait.

// The test suites include this file as a module and use only parts of it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// The request body the handler sees: hyper's body, boxed so the layer can rebuild it.
pub type ReqBody = BoxBody<Bytes, hyper::Error>;

/// The orders, in memory.
#[derive(Debug, Clone, Default)]
pub struct Orders {
    items: Arc<Mutex<Vec<String>>>,
}

impl Orders {
    /// How many orders were created.
    pub fn count(&self) -> usize {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// `POST /orders` creates an order of the item named by the body (`201`, key required);
/// `GET /orders` lists them.
pub async fn handle(
    orders: Orders,
    req: Request<ReqBody>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let res = match (parts.method, parts.uri.path()) {
        (Method::POST, "/orders") => {
            let bytes = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "unreadable body\n")),
            };
            let item = String::from_utf8_lossy(&bytes).trim().to_owned();
            if item.is_empty() {
                return Ok(text(StatusCode::BAD_REQUEST, "name an item in the body\n"));
            }
            let mut items = orders.items.lock().unwrap_or_else(|e| e.into_inner());
            items.push(item.clone());
            let id = items.len();
            let json = serde_json::json!({ "id": format!("ord_{id}"), "item": item });
            Response::builder()
                .status(StatusCode::CREATED)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::LOCATION, format!("/orders/ord_{id}"))
                .body(Full::new(Bytes::from(json.to_string())))
                .expect("a valid response")
        }
        (Method::GET, "/orders") => {
            let items = orders
                .items
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let json = serde_json::Value::from(items);
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(json.to_string())))
                .expect("a valid response")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(res)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res
}

/// Accepts connections on `listener` and serves `orders` behind `layer` on each, until the
/// process ends.
pub async fn serve(
    listener: TcpListener,
    layer: IdempotencyLayer,
    orders: Orders,
) -> std::io::Result<()> {
    loop {
        let (stream, _peer) = listener.accept().await?;
        let orders = orders.clone();
        // The tower stack: hyper's body → a rebuildable body → the layer → the handler.
        let svc = ServiceBuilder::new()
            .map_request(|req: Request<Incoming>| req.map(BodyExt::boxed))
            .layer(layer.clone())
            .service_fn(move |req| handle(orders.clone(), req));
        let svc = TowerToHyperService::new(svc);
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            if let Err(err) = builder.serve_connection(TokioIo::new(stream), svc).await {
                eprintln!("connection error: {err}");
            }
        });
    }
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
        .unwrap_or_else(|| "127.0.0.1:3001".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    println!(
        "orders service listening on http://{}",
        listener.local_addr()?
    );
    // No users in this example: every caller shares one scope (see `scope_by_principal`
    // for a service with authentication).
    let layer = IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers();
    let work = layer.detached_work();
    tokio::select! {
        served = serve(listener, layer, Orders::default()) => served?,
        _ = tokio::signal::ctrl_c() => {}
    }
    // Stop accepting, then let the layer finish what it holds (up to 10 s) before the
    // runtime ends. (Connections still open are cut; a server that drains them first
    // would wait for them here too, as axum's and tonic's graceful shutdowns do.)
    if let Err(unfinished) = work.shutdown(std::time::Duration::from_secs(10)).await {
        eprintln!("stopped: {unfinished}");
    }
    Ok(())
}
