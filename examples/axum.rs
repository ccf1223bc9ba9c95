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
//! - `IDEMPOTENCY_STORE` (default `memory`): `memory`, `redis://…` (feature `redis`),
//!   `redis-cluster://host:port[,host:port…]` (any nodes of a Redis Cluster; feature `redis`),
//!   `postgres://…` (feature `postgres`) or `mysql://…` / `mariadb://…` (MySQL or MariaDB;
//!   feature `mysql`);
//! - `IDEMPOTENCY_ON_IN_FLIGHT` (default `reject`): `reject` answers 409 to a duplicate
//!   that arrives while the first request runs, `wait` makes it wait for the result
//!   (`IDEMPOTENCY_WAIT_MS`, default 10000);
//! - `ORDER_LATENCY_MS` (default 0): how long creating an order takes;
//! - `ORDER_AFTER_COMMIT_MS` (default 0): how long the create handler waits after its
//!   commit point, before answering (a window to kill the demo in, by hand);
//! - `IDEMPOTENCY_LEASE_MS` (default 30000): the lease of a running operation;
//! - `IDEMPOTENCY_ENCRYPTION_KEYS` (feature `encryption`): `ID:KEY,…`, each KEY 32 bytes
//!   in standard base64, the first the active one: records are sealed at rest on every
//!   store (restart with a new first key and the old one listed: old orders still replay;
//!   without the old one: a retry of an old order is refused, never run again);
//! - `IDEMPOTENCY_MEMORY_MAX_MB` (default 64): the memory store's cap (a load test of new
//!   keys fills the default one in about a second, and then gets `503 store-full`);
//! - `IDEMPOTENCY_REPLAY_CACHE_MB` (default off): answer retries from this instance's own
//!   copies of records, up to this many MiB, each for `IDEMPOTENCY_REPLAY_CACHE_MS`
//!   (default 10000) at most (`cache_replays`; a purged record is still replayed that long);
//! - `IDEMPOTENCY_LAYER` (default `on`): `off` serves the same routes without the layer,
//!   for load comparisons;
//! - `RUST_LOG` (default `info`): which events are logged (lost leases, store failures and
//!   timeouts, orphan releases and takeovers are `warn`).
//!
//! On Ctrl-C or SIGTERM the demo stops taking requests, lets the ones in progress finish,
//! then waits (up to 10 s) for the work the layer finishes in the background, so that no
//! stored outcome is lost at shutdown.
//!
//! **Exactly once.** `POST /orders` declares its commit point: on PostgreSQL, MySQL and
//! MariaDB inside the transaction that inserts the order (the orders live in the table
//! `demo_orders`, so two demos on one database list the same orders), elsewhere just before
//! the order is kept. A
//! recovery hook rebuilds the answer of a committed order whose answer was never stored,
//! from the order made under the key. If the commit point cannot be confirmed (the store
//! times out), the demo makes no order and answers `503`; the layer withdraws the commit
//! should it land later, so the retry creates the order. If the reply to the transaction's
//! `COMMIT` is lost, the demo answers `503` too, but the layer does not store that answer:
//! the retry gets the order from the recovery hook if the transaction committed, or creates
//! it if it did not.
//!
//! On the memory store and on Redis the demo keeps its orders **in its own process
//! memory**: an instance killed after its commit point takes its orders with it, so the
//! other instance's recovery hook cannot find them, and that key answers
//! `500 outcome-unknown` for its TTL (true to the contract: the operation never runs twice)
//! until an operator settles it with the keys tool. Keep the orders in PostgreSQL or MySQL
//! to see the hook rebuild them across instances. To see it by hand:
//!
//! ```text
//! IDEMPOTENCY_STORE=postgres://postgres@127.0.0.1:5432/test ORDER_AFTER_COMMIT_MS=20000 \
//!   IDEMPOTENCY_LEASE_MS=2000 cargo run --example axum --features postgres
//! curl -X POST localhost:3000/orders -H 'Idempotency-Key: crash-1' \
//!      -H 'Content-Type: application/json' -d '{"item":"book","amount":12}'   # hangs
//! # kill -9 the demo during the wait, start it again (without ORDER_AFTER_COMMIT_MS),
//! # wait 2 s, send the same curl: the same order, replayed; GET /orders lists one.
//! ```
//!
//! With `--features metrics`, `GET /metrics` answers the layer's metrics in Prometheus text
//! format.

use std::sync::{Arc, Mutex};

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_idempotency::policy::InFlight;
use tower_idempotency::{IdempotencyClaim, IdempotencyLayer, IdempotencyStore, MemoryStore};

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

/// Where the orders live.
#[derive(Clone)]
pub enum OrderBook {
    /// In this process, each with the scope and key it was created under.
    Memory(Arc<Mutex<Vec<(String, String, Order)>>>),
    /// In the table `demo_orders` of the store's database (feature `postgres`).
    #[cfg(feature = "postgres")]
    Postgres(tower_idempotency::PostgresStore),
    /// In the table `demo_orders` of the store's database (feature `mysql`).
    #[cfg(feature = "mysql")]
    MySql(tower_idempotency::MySqlStore),
}

impl OrderBook {
    /// An empty book in memory.
    pub fn memory() -> Self {
        Self::Memory(Arc::default())
    }

    /// The newest order created under `scope` and `key`, if any: a key is used again once
    /// its record expired or was purged, and its older orders are not this operation's.
    pub async fn find(&self, scope: &str, key: &str) -> Result<Option<Order>, String> {
        match self {
            Self::Memory(orders) => Ok(orders
                .lock()
                .expect("orders lock poisoned")
                .iter()
                .rev()
                .find(|(s, k, _)| s == scope && k == key)
                .map(|(_, _, o)| o.clone())),
            #[cfg(feature = "postgres")]
            Self::Postgres(store) => tower_idempotency::sqlx::query_as::<_, (String, String, i64)>(
                "SELECT id, item, amount FROM demo_orders WHERE scope = $1 AND idem_key = $2 \
                 ORDER BY created_at DESC, id DESC LIMIT 1",
            )
            .bind(scope)
            .bind(key)
            .fetch_optional(store.pool())
            .await
            .map(|row| row.map(|(id, item, amount)| Order { id, item, amount }))
            .map_err(|e| e.to_string()),
            #[cfg(feature = "mysql")]
            Self::MySql(store) => tower_idempotency::sqlx::query_as::<_, (String, String, i64)>(
                "SELECT id, item, amount FROM demo_orders WHERE scope = ? AND idem_key = ? \
                 ORDER BY created_at DESC, id DESC LIMIT 1",
            )
            .bind(scope)
            .bind(key)
            .fetch_optional(store.pool())
            .await
            .map(|row| row.map(|(id, item, amount)| Order { id, item, amount }))
            .map_err(|e| e.to_string()),
        }
    }

    async fn all(&self) -> Result<Vec<Order>, String> {
        match self {
            Self::Memory(orders) => Ok(orders
                .lock()
                .expect("orders lock poisoned")
                .iter()
                .map(|(_, _, o)| o.clone())
                .collect()),
            #[cfg(feature = "postgres")]
            Self::Postgres(store) => tower_idempotency::sqlx::query_as::<_, (String, String, i64)>(
                "SELECT id, item, amount FROM demo_orders ORDER BY created_at, id",
            )
            .fetch_all(store.pool())
            .await
            .map(|rows| {
                rows.into_iter()
                    .map(|(id, item, amount)| Order { id, item, amount })
                    .collect()
            })
            .map_err(|e| e.to_string()),
            #[cfg(feature = "mysql")]
            Self::MySql(store) => tower_idempotency::sqlx::query_as::<_, (String, String, i64)>(
                "SELECT id, item, amount FROM demo_orders ORDER BY created_at, id",
            )
            .fetch_all(store.pool())
            .await
            .map(|rows| {
                rows.into_iter()
                    .map(|(id, item, amount)| Order { id, item, amount })
                    .collect()
            })
            .map_err(|e| e.to_string()),
        }
    }

    /// Keeps `order`, made under `claim` (if the layer is on), declaring the commit point
    /// with it: in the same transaction on PostgreSQL and MySQL, just before elsewhere.
    async fn create(&self, claim: Option<&IdempotencyClaim>, order: &Order) -> Result<(), String> {
        let (scope, key) = claim.map_or(("", ""), |c| (c.scope(), c.key()));
        match self {
            Self::Memory(orders) => {
                if let Some(claim) = claim {
                    claim.commit().await.map_err(|e| e.to_string())?;
                }
                orders.lock().expect("orders lock poisoned").push((
                    scope.to_owned(),
                    key.to_owned(),
                    order.clone(),
                ));
                Ok(())
            }
            #[cfg(feature = "postgres")]
            Self::Postgres(store) => {
                let fail = |e: tower_idempotency::sqlx::Error| e.to_string();
                let mut tx = store.pool().begin().await.map_err(fail)?;
                tower_idempotency::sqlx::query(
                    "INSERT INTO demo_orders (id, item, amount, scope, idem_key) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&order.id)
                .bind(&order.item)
                .bind(order.amount)
                .bind(scope)
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
                if let Some(claim) = claim {
                    store
                        .commit_in(&mut *tx, claim)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                tx.commit().await.map_err(fail)
            }
            #[cfg(feature = "mysql")]
            Self::MySql(store) => {
                let fail = |e: tower_idempotency::sqlx::Error| e.to_string();
                let mut tx = store.pool().begin().await.map_err(fail)?;
                tower_idempotency::sqlx::query(
                    "INSERT INTO demo_orders (id, item, amount, scope, idem_key) \
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(&order.id)
                .bind(&order.item)
                .bind(order.amount)
                .bind(scope)
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
                if let Some(claim) = claim {
                    store
                        .commit_in(&mut *tx, claim)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                tx.commit().await.map_err(fail)
            }
        }
    }
}

#[derive(Clone)]
struct AppState {
    orders: OrderBook,
    latency: Duration,
    after_commit: Duration,
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
    /// How long the create handler waits after its commit point.
    pub after_commit: Duration,
    /// `IDEMPOTENCY_ENCRYPTION_KEYS`: `ID:KEY,…` to seal the records at rest.
    pub encryption_keys: Option<String>,
    /// `IDEMPOTENCY_REPLAY_CACHE_MB` and `_MS`: the replay cache's bytes and age, if on.
    pub replay_cache: Option<(usize, Duration)>,
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
        let after_commit_ms = match var("ORDER_AFTER_COMMIT_MS") {
            None => 0,
            Some(v) => v.parse().map_err(|_| {
                format!("ORDER_AFTER_COMMIT_MS must be a number of milliseconds, not {v:?}")
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
        let replay_cache = match var("IDEMPOTENCY_REPLAY_CACHE_MB") {
            None => None,
            Some(v) => {
                let mb: usize = v.parse().map_err(|_| {
                    format!("IDEMPOTENCY_REPLAY_CACHE_MB must be a number of MiB, not {v:?}")
                })?;
                let ms: u64 = match var("IDEMPOTENCY_REPLAY_CACHE_MS") {
                    None => 10_000,
                    Some(v) => v.parse().map_err(|_| {
                        format!(
                            "IDEMPOTENCY_REPLAY_CACHE_MS must be a number of milliseconds, \
                             not {v:?}"
                        )
                    })?,
                };
                Some((mb.saturating_mul(1 << 20), Duration::from_millis(ms)))
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
            after_commit: Duration::from_millis(after_commit_ms),
            encryption_keys: var("IDEMPOTENCY_ENCRYPTION_KEYS"),
            replay_cache,
        })
    }
}

/// A store, and where the orders live beside it.
pub type Backend = (Arc<dyn IdempotencyStore>, OrderBook);

/// The line the demo starts with: where it listens, and its store, the URL's password
/// never shown.
pub fn banner(addr: std::net::SocketAddr, store: &str) -> String {
    format!(
        "orders demo listening on http://{addr} (store: {})",
        tower_idempotency::store::redact_password(store)
    )
}

/// Opens the store named by `IDEMPOTENCY_STORE`, and the order book that goes with it.
///
/// Redis comes from [`tower_idempotency::store::open`], with the orders in this process; so
/// does a store this build lacks, whose error names the feature to enable. The others are
/// opened here: the memory store for its cap (`IDEMPOTENCY_MEMORY_MAX_MB`, which `open` has
/// no option for), and PostgreSQL and MySQL because their order book declares the commit
/// point inside its own transaction, with the concrete store's `commit_in` and its pool,
/// which the `Arc<dyn IdempotencyStore>` that `open` returns does not offer.
pub async fn open_store(url: &str) -> Result<Backend, String> {
    let url = url.trim();
    let scheme = url.split_once("://").map_or(url, |(scheme, _)| scheme);
    match scheme {
        "memory" if url == "memory" => open_memory(),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => open_postgres(url).await,
        #[cfg(feature = "mysql")]
        "mysql" | "mariadb" => open_mysql(url).await,
        _ => {
            let store = tower_idempotency::store::open(url)
                .await
                .map_err(|e| format!("IDEMPOTENCY_STORE: {}", chain(&e)))?;
            Ok((store, OrderBook::memory()))
        }
    }
}

/// An error and its sources, `: `-separated.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// The memory store, capped at `IDEMPOTENCY_MEMORY_MAX_MB` if set.
fn open_memory() -> Result<Backend, String> {
    let mut store = MemoryStore::builder();
    if let Some(mb) = std::env::var("IDEMPOTENCY_MEMORY_MAX_MB")
        .ok()
        .filter(|v| !v.is_empty())
    {
        let mb: usize = mb.parse().map_err(|_| {
            format!("IDEMPOTENCY_MEMORY_MAX_MB must be a number of MiB, not {mb:?}")
        })?;
        store = store.max_bytes(mb.saturating_mul(1 << 20));
    }
    Ok((Arc::new(store.build()), OrderBook::memory()))
}

/// How long the demo waits for its database to take a connection before it says it cannot.
#[cfg(any(feature = "postgres", feature = "mysql"))]
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Backend, String> {
    // A database that does not answer is said within seconds, not sqlx's 30.
    let pool = tower_idempotency::sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect(url)
        .await
        .map_err(|e| format!("IDEMPOTENCY_STORE: cannot connect to PostgreSQL: {e}"))?;
    let store = tower_idempotency::PostgresStore::new(pool.clone());
    store
        .migrate()
        .await
        .map_err(|e| format!("cannot create the idempotency table: {e}"))?;
    tower_idempotency::sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS demo_orders (id text PRIMARY KEY, item text NOT NULL, \
         amount bigint NOT NULL, scope text NOT NULL, idem_key text NOT NULL, \
         created_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await
    .map_err(|e| format!("cannot create the demo_orders table: {e}"))?;
    Ok((Arc::new(store.clone()), OrderBook::Postgres(store)))
}

#[cfg(feature = "mysql")]
async fn open_mysql(url: &str) -> Result<Backend, String> {
    // sqlx speaks to MariaDB with the mysql:// scheme.
    let sqlx_url = match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url.to_owned(),
    };
    let pool = tower_idempotency::sqlx::mysql::MySqlPoolOptions::new()
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect(&sqlx_url)
        .await
        .map_err(|e| format!("IDEMPOTENCY_STORE: cannot connect to MySQL: {e}"))?;
    let store = tower_idempotency::MySqlStore::new(pool.clone());
    store
        .migrate()
        .await
        .map_err(|e| format!("cannot create the idempotency table: {e}"))?;
    tower_idempotency::sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS demo_orders (id VARCHAR(64) PRIMARY KEY, \
         item TEXT NOT NULL, amount BIGINT NOT NULL, scope VARCHAR(64) NOT NULL, \
         idem_key VARBINARY(1024) NOT NULL, \
         created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
         KEY by_key (scope, idem_key)) ENGINE = InnoDB",
    )
    .execute(&pool)
    .await
    .map_err(|e| format!("cannot create the demo_orders table: {e}"))?;
    Ok((Arc::new(store.clone()), OrderBook::MySql(store)))
}

/// The demo application: `POST /orders` (key required), `GET /orders`, `GET /orders/{id}`.
pub fn app(layer: IdempotencyLayer, latency: Duration) -> Router {
    app_with(Some(layer), latency)
}

/// The demo application, with or without the layer (for comparisons).
pub fn app_with(layer: Option<IdempotencyLayer>, latency: Duration) -> Router {
    app_on(OrderBook::memory(), layer, latency, Duration::ZERO)
}

/// The demo application on an order book; the layer, if any, gets the recovery hook that
/// rebuilds a committed order's answer from the book.
pub fn app_on(
    orders: OrderBook,
    layer: Option<IdempotencyLayer>,
    latency: Duration,
    after_commit: Duration,
) -> Router {
    let state = AppState {
        orders: orders.clone(),
        latency,
        after_commit,
    };
    let router = Router::new()
        .route("/orders", post(create_order).get(list_orders))
        .route("/orders/{id}", get(show_order));
    let router = match layer {
        Some(layer) => router.layer(
            layer
                .recover_with(move |unsettled| {
                    let orders = orders.clone();
                    async move {
                        let order = orders.find(unsettled.scope(), unsettled.key()).await?;
                        Ok(order.map(|order| {
                    tracing::info!(order = %order.id, "recovered the answer of a committed order");
                    created(&order)
                }))
                    }
                })
                // Answers in axum's own body type: the `GET`s pass through without a box.
                .for_axum(),
        ),
        None => router,
    };
    router.with_state(state)
}

/// The answer to a created order: `201`, its `Location`, and the order in JSON.
fn created(order: &Order) -> axum::http::Response<bytes::Bytes> {
    axum::http::Response::builder()
        .status(StatusCode::CREATED)
        .header(header::LOCATION, format!("/orders/{}", order.id))
        .header(header::CONTENT_TYPE, "application/json")
        .body(bytes::Bytes::from(
            serde_json::to_vec(order).expect("an order serializes"),
        ))
        .expect("a valid response")
}

async fn create_order(
    State(state): State<AppState>,
    claim: Option<IdempotencyClaim>,
    Json(new): Json<NewOrder>,
) -> axum::response::Response {
    if !state.latency.is_zero() {
        tokio::time::sleep(state.latency).await;
    }
    let order = Order {
        id: uuid::Uuid::new_v4().to_string(),
        item: new.item,
        amount: new.amount,
    };
    if let Err(err) = state.orders.create(claim.as_ref(), &order).await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("order not created: {err}"),
        )
            .into_response();
    }
    if !state.after_commit.is_zero() {
        tracing::info!(
            order = %order.id,
            wait = ?state.after_commit,
            "order committed; waiting before answering (ORDER_AFTER_COMMIT_MS)"
        );
        tokio::time::sleep(state.after_commit).await;
    }
    created(&order).map(axum::body::Body::from)
}

async fn list_orders(State(state): State<AppState>) -> axum::response::Response {
    match state.orders.all().await {
        Ok(orders) => Json(orders).into_response(),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err).into_response(),
    }
}

async fn show_order(State(state): State<AppState>, Path(id): Path<String>) -> impl IntoResponse {
    match state.orders.all().await {
        Ok(orders) => match orders.into_iter().find(|o| o.id == id) {
            Some(order) => Json(order).into_response(),
            None => (StatusCode::NOT_FOUND, "no such order").into_response(),
        },
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err).into_response(),
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
    let (store, orders) = open_store(&settings.store).await?;
    let layer = IdempotencyLayer::new(store)
        // The caller scope is a choice every service makes. This demo has no users, so
        // every caller shares one scope; a service with authentication keys them per user:
        // `.scope_by_principal::<UserId>()`, with the id its auth layer put in the request.
        .share_keys_across_callers()
        .on_in_flight(settings.in_flight)
        .lease(settings.lease);
    let layer = match settings.replay_cache {
        Some((bytes, age)) => layer.cache_replays(bytes, age),
        None => layer,
    };
    let layer = match &settings.encryption_keys {
        None => layer,
        #[cfg(feature = "encryption")]
        Some(keys) => {
            let ring = tower_idempotency::store::sealed::Keyring::parse(keys)
                .map_err(|e| format!("IDEMPOTENCY_ENCRYPTION_KEYS: {e}"))?;
            println!("records sealed at rest with key {:?}", ring.active_id());
            layer.encrypt_records(ring)
        }
        #[cfg(not(feature = "encryption"))]
        Some(_) => {
            return Err("IDEMPOTENCY_ENCRYPTION_KEYS needs the demo built with \
                        `--features encryption`"
                .to_owned());
        }
    };
    let work = layer.detached_work();
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("{}", banner(addr, &settings.store));
    println!(
        "try: curl -i -X POST http://{addr}/orders -H 'Idempotency-Key: order-1' \
         -H 'Content-Type: application/json' -d '{{\"item\":\"book\",\"amount\":12}}'"
    );
    if !settings.layer {
        println!("IDEMPOTENCY_LAYER=off: serving without the idempotency layer");
    }
    let layer = settings.layer.then_some(layer);
    let app = app_on(orders, layer, settings.latency, settings.after_commit);
    #[cfg(feature = "metrics")]
    let app = {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
        println!("metrics: curl http://{addr}/metrics");
        app.route("/metrics", get(move || std::future::ready(handle.render())))
    };
    axum::serve(listener, app)
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
