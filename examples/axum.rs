//! The orders demo: an axum service whose `POST /orders` is protected by the layer.
//!
//! ```text
//! cargo run --example axum
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: order-1' \
//!      -H 'Content-Type: application/json' -d '{"item":"book","amount":12}'
//! ```
//!
//! Environment:
//! - `LISTEN_ADDR` (default `127.0.0.1:3000`): where to listen;
//! - `IDEMPOTENCY_STORE` (default `memory`): `memory`, `redis://…` (feature `redis`) or
//!   `postgres://…` (feature `postgres`);
//! - `IDEMPOTENCY_ON_IN_FLIGHT` (default `reject`): `reject` answers 409 to a duplicate
//!   that arrives while the first request runs, `wait` makes it wait for the result
//!   (`IDEMPOTENCY_WAIT_MS`, default 10000);
//! - `ORDER_LATENCY_MS` (default 0): how long creating an order takes;
//! - `IDEMPOTENCY_LEASE_MS` (default 30000): the lease of a running operation;
//! - `IDEMPOTENCY_LAYER` (default `on`): `off` serves the same routes without the layer,
//!   for load comparisons;
//! - `RUST_LOG` (default `info`): which events are logged (lost leases, store failures and
//!   timeouts, orphan releases and takeovers are `warn`).
//!
//! On Ctrl-C or SIGTERM the demo stops taking requests, lets the ones in progress finish,
//! then waits (up to 10 s) for the work the layer finishes in the background, so that no
//! stored outcome is lost at shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_idempotency::policy::InFlight;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore};

/// An order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Order {
    /// Its id.
    pub id: String,
    /// What was ordered.
    pub item: String,
    /// How much it costs, in cents.
    pub amount: i64,
}

#[derive(Debug, Deserialize)]
struct NewOrder {
    item: String,
    amount: i64,
}

#[derive(Clone)]
struct AppState {
    orders: Arc<Mutex<Vec<Order>>>,
    latency: Duration,
}

/// The demo's settings, read from the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen.
    pub listen: String,
    /// Which store.
    pub store: String,
    /// What a duplicate in flight gets.
    pub in_flight: InFlight,
    /// How long creating an order takes.
    pub latency: Duration,
    /// Whether the layer is on.
    pub layer: bool,
    /// The lease of a running operation.
    pub lease: Duration,
}

impl Settings {
    /// Reads the settings from the environment.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let latency = match var("ORDER_LATENCY_MS") {
            None => 0,
            Some(v) => v.parse().map_err(|_| {
                format!("ORDER_LATENCY_MS must be a number of milliseconds, not {v:?}")
            })?,
        };
        let lease_ms = match var("IDEMPOTENCY_LEASE_MS") {
            None => 30_000,
            Some(v) => v.parse().map_err(|_| {
                format!("IDEMPOTENCY_LEASE_MS must be a number of milliseconds, not {v:?}")
            })?,
        };
        let wait_ms = match var("IDEMPOTENCY_WAIT_MS") {
            None => 10_000,
            Some(v) => v.parse().map_err(|_| {
                format!("IDEMPOTENCY_WAIT_MS must be a number of milliseconds, not {v:?}")
            })?,
        };
        let in_flight = match var("IDEMPOTENCY_ON_IN_FLIGHT").as_deref() {
            None | Some("reject") => InFlight::Reject,
            Some("wait") => InFlight::Wait(Duration::from_millis(wait_ms)),
            Some(other) => {
                return Err(format!(
                    "IDEMPOTENCY_ON_IN_FLIGHT must be `reject` or `wait`, not {other:?}"
                ));
            }
        };
        let layer = match var("IDEMPOTENCY_LAYER").as_deref() {
            None | Some("on") => true,
            Some("off") => false,
            Some(other) => {
                return Err(format!(
                    "IDEMPOTENCY_LAYER must be `on` or `off`, not {other:?}"
                ));
            }
        };
        Ok(Self {
            layer,
            listen: var("LISTEN_ADDR").unwrap_or_else(|| "127.0.0.1:3000".to_owned()),
            store: var("IDEMPOTENCY_STORE").unwrap_or_else(|| "memory".to_owned()),
            in_flight,
            latency: Duration::from_millis(latency),
            lease: Duration::from_millis(lease_ms),
        })
    }
}

/// Opens the store named by `IDEMPOTENCY_STORE`.
pub async fn open_store(url: &str) -> Result<Arc<dyn IdempotencyStore>, String> {
    if url == "memory" {
        return Ok(Arc::new(MemoryStore::new()));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return open_redis(url).await;
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return open_postgres(url).await;
    }
    Err(format!(
        "IDEMPOTENCY_STORE must be `memory`, `redis://…` or `postgres://…`, not {url:?}"
    ))
}

#[cfg(feature = "redis")]
async fn open_redis(url: &str) -> Result<Arc<dyn IdempotencyStore>, String> {
    let store = tower_idempotency::RedisStore::connect(url)
        .await
        .map_err(|e| format!("cannot connect to Redis at {url}: {e}"))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "redis"))]
async fn open_redis(_url: &str) -> Result<Arc<dyn IdempotencyStore>, String> {
    Err("this build has no Redis store: run with `--features redis`".to_owned())
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Arc<dyn IdempotencyStore>, String> {
    let pool = tower_idempotency::sqlx::PgPool::connect(url)
        .await
        .map_err(|e| format!("cannot connect to PostgreSQL at {url}: {e}"))?;
    let store = tower_idempotency::PostgresStore::new(pool);
    store
        .migrate()
        .await
        .map_err(|e| format!("cannot create the idempotency table: {e}"))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str) -> Result<Arc<dyn IdempotencyStore>, String> {
    Err("this build has no PostgreSQL store: run with `--features postgres`".to_owned())
}

/// The demo application: `POST /orders` (key required), `GET /orders`, `GET /orders/{id}`.
pub fn app(layer: IdempotencyLayer, latency: Duration) -> Router {
    app_with(Some(layer), latency)
}

/// The demo application, with or without the layer (for comparisons).
pub fn app_with(layer: Option<IdempotencyLayer>, latency: Duration) -> Router {
    let state = AppState {
        orders: Arc::new(Mutex::new(Vec::new())),
        latency,
    };
    let router = Router::new()
        .route("/orders", post(create_order).get(list_orders))
        .route("/orders/{id}", get(show_order));
    let router = match layer {
        Some(layer) => router.layer(layer),
        None => router,
    };
    router.with_state(state)
}

async fn create_order(
    State(state): State<AppState>,
    Json(new): Json<NewOrder>,
) -> impl IntoResponse {
    if !state.latency.is_zero() {
        tokio::time::sleep(state.latency).await;
    }
    let order = Order {
        id: uuid::Uuid::new_v4().to_string(),
        item: new.item,
        amount: new.amount,
    };
    state
        .orders
        .lock()
        .expect("orders lock poisoned")
        .push(order.clone());
    let location = format!("/orders/{}", order.id);
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(order),
    )
}

async fn list_orders(State(state): State<AppState>) -> Json<Vec<Order>> {
    Json(state.orders.lock().expect("orders lock poisoned").clone())
}

async fn show_order(State(state): State<AppState>, Path(id): Path<String>) -> impl IntoResponse {
    let orders = state.orders.lock().expect("orders lock poisoned");
    match orders.iter().find(|o| o.id == id) {
        Some(order) => Json(order.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "no such order").into_response(),
    }
}

#[allow(dead_code)]
#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Err(err) = serve().await {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

#[allow(dead_code)]
async fn serve() -> Result<(), String> {
    let settings = Settings::from_env()?;
    let store = open_store(&settings.store).await?;
    let layer = IdempotencyLayer::new(store)
        // The caller scope is a choice every service makes. This demo has no users, so
        // every caller shares one scope; a service with authentication keys them per user:
        // `.scope_by_principal::<UserId>()`, with the id its auth layer put in the request.
        .share_keys_across_callers()
        .on_in_flight(settings.in_flight)
        .lease(settings.lease);
    let work = layer.detached_work();
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!(
        "orders demo listening on http://{addr} (store: {})",
        settings.store
    );
    println!(
        "try: curl -i -X POST http://{addr}/orders -H 'Idempotency-Key: order-1' \
         -H 'Content-Type: application/json' -d '{{\"item\":\"book\",\"amount\":12}}'"
    );
    if !settings.layer {
        println!("IDEMPOTENCY_LAYER=off: serving without the idempotency layer");
    }
    let layer = settings.layer.then_some(layer);
    axum::serve(listener, app_with(layer, settings.latency))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
    // The server took its last request; finish what the layer still holds (records of
    // answers already sent, bodies drained for clients that left) before exiting.
    match work.shutdown(Duration::from_secs(10)).await {
        Ok(()) => println!("stopped; all idempotency work finished"),
        Err(unfinished) => eprintln!("stopped: {unfinished}"),
    }
    Ok(())
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
#[allow(dead_code)]
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
