//! A server for `scripts/httpgrid.sh`: the orders demo's `POST /orders` without a commit
//! point, so that wrk can measure the layer on a handler that declares none.
//!
//! It serves only when asked (`cargo bench` alone prints this and exits):
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --features redis --bench serve -- --serve
//! ```
//!
//! Environment, as the demo's: `LISTEN_ADDR` (default `127.0.0.1:3958`), `IDEMPOTENCY_LAYER`
//! (`on` or `off`), `IDEMPOTENCY_STORE` (`memory` or a `redis://` URL, with the `redis`
//! feature), `IDEMPOTENCY_MEMORY_MAX_MB`. The handler reads the order as JSON, makes an id,
//! keeps the order in memory and answers `201` with the order, its `Location` and
//! `Content-Type`: what the demo's handler does, less the commit point. The layer is the
//! demo's: `share_keys_across_callers`, the defaults otherwise.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore};

#[derive(serde::Deserialize)]
struct NewOrder {
    item: String,
    amount: u32,
}

#[derive(serde::Serialize, Clone)]
struct Order {
    id: String,
    item: String,
    amount: u32,
}

type Orders = Arc<Mutex<Vec<Order>>>;

async fn create_order(State(orders): State<Orders>, Json(new): Json<NewOrder>) -> Response {
    let order = Order {
        id: uuid::Uuid::new_v4().to_string(),
        item: new.item,
        amount: new.amount,
    };
    let body = serde_json::to_vec(&order).expect("an order serializes");
    let location = format!("/orders/{}", order.id);
    orders.lock().expect("orders lock").push(order);
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, location),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        body,
    )
        .into_response()
}

async fn open_store(url: &str) -> Result<Arc<dyn IdempotencyStore>, String> {
    if url == "memory" {
        let mut store = MemoryStore::builder();
        if let Ok(mb) = std::env::var("IDEMPOTENCY_MEMORY_MAX_MB") {
            let mb: usize = mb
                .parse()
                .map_err(|_| format!("IDEMPOTENCY_MEMORY_MAX_MB: not a number: {mb:?}"))?;
            store = store.max_bytes(mb.saturating_mul(1 << 20));
        }
        if let Ok(ms) = std::env::var("IDEMPOTENCY_MEMORY_MIN_RETENTION_MS") {
            let ms: u64 = ms.parse().map_err(|_| {
                format!("IDEMPOTENCY_MEMORY_MIN_RETENTION_MS: not a number: {ms:?}")
            })?;
            store = store.min_retention(std::time::Duration::from_millis(ms));
        }
        return Ok(Arc::new(store.build()));
    }
    tower_idempotency::store::open(url)
        .await
        .map_err(|e| format!("IDEMPOTENCY_STORE: {e}"))
}

fn main() {
    if !std::env::args().any(|a| a == "--serve") {
        println!("serve: a server for scripts/httpgrid.sh; pass `-- --serve` to start it");
        return;
    }
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let listen = var("LISTEN_ADDR", "127.0.0.1:3958");
    let layer_on = match var("IDEMPOTENCY_LAYER", "on").as_str() {
        "on" => true,
        "off" => false,
        other => {
            eprintln!("IDEMPOTENCY_LAYER must be `on` or `off`, not {other:?}");
            std::process::exit(2);
        }
    };
    let store_url = var("IDEMPOTENCY_STORE", "memory");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let result: Result<(), String> = rt.block_on(async {
        let orders: Orders = Arc::default();
        let app = Router::new().route("/orders", post(create_order));
        let app = if layer_on {
            let store = open_store(&store_url).await?;
            app.layer(
                IdempotencyLayer::new(store)
                    .share_keys_across_callers()
                    .for_axum(),
            )
        } else {
            app
        };
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        println!("serve: listening on http://{listen} (layer {layer_on}, store {store_url})");
        axum::serve(listener, app.with_state(orders))
            .await
            .map_err(|e| e.to_string())
    });
    if let Err(err) = result {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
