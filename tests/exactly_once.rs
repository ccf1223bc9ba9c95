//! Exactly once on PostgreSQL: the commit point is written inside the handler's own
//! transaction ([`PostgresStore::commit_in`]), so it commits if and only if the business
//! rows do.
//!
//! The crash test runs the server in a child process (this test binary, re-run with
//! `CRASH_CHILD=1`), kills it with `SIGKILL` right after its business commit and before its
//! answer is stored, and then retries on a fresh server over the same database.
//!
//! Every test needs `DATABASE_URL` and says it was skipped without it.
#![cfg(feature = "postgres")]

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use common::{Answer, assert_problem, call, post as post_req};
use http::StatusCode;
use tower_idempotency::sqlx::{self, PgPool};
use tower_idempotency::{
    IdempotencyClaim, IdempotencyLayer, IdempotencyOutcome, IdempotencyStore, KeyState,
    PostgresStore, Scope, StoreKey,
};

fn database_url() -> Option<String> {
    let url = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
    if url.is_none() {
        println!("skipped: DATABASE_URL not set");
    }
    url
}

#[derive(Clone)]
struct App {
    pool: PgPool,
    store: PostgresStore,
    orders: String,
    runs: Arc<AtomicUsize>,
    /// How long the handler waits after its commit, before answering.
    after_commit: Duration,
    /// Whether the handler rolls back instead of committing (and answers 500).
    roll_back: bool,
}

async fn create_order(
    State(app): State<App>,
    claim: IdempotencyClaim,
    body: String,
) -> (StatusCode, String) {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let mut tx = app.pool.begin().await.expect("begin");
    let (id,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (scope, idem_key, body) VALUES ($1, $2, $3) RETURNING id",
        app.orders
    )))
    .bind(claim.scope())
    .bind(claim.key())
    .bind(&body)
    .fetch_one(&mut *tx)
    .await
    .expect("insert the order");
    app.store
        .commit_in(&mut *tx, &claim)
        .await
        .expect("commit point in the transaction");
    if app.roll_back {
        drop(tx);
        return (StatusCode::INTERNAL_SERVER_ERROR, "rolled back".into());
    }
    tx.commit().await.expect("commit");
    println!("COMMITTED {id}");
    tokio::time::sleep(app.after_commit).await;
    (StatusCode::CREATED, format!("{{\"id\":{id}}}"))
}

fn router(app: App, layer: IdempotencyLayer) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .with_state(app)
        .layer(layer)
}

fn layer(store: &PostgresStore) -> IdempotencyLayer {
    IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(Duration::from_millis(300))
        .store_timeout(Duration::from_millis(500))
}

/// The recovery hook of the orders: the order created under the key, if any.
fn recovering(layer: IdempotencyLayer, pool: PgPool, orders: String) -> IdempotencyLayer {
    layer.recover_with(move |unsettled| {
        let (pool, orders) = (pool.clone(), orders.clone());
        async move {
            let found: Option<(i64,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT id FROM {orders} WHERE scope = $1 AND idem_key = $2"
            )))
            .bind(unsettled.scope())
            .bind(unsettled.key())
            .fetch_optional(&pool)
            .await?;
            Ok(found.map(|(id,)| {
                http::Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Bytes::from(format!("{{\"id\":{id}}}")))
                    .expect("a response")
            }))
        }
    })
}

async fn setup(url: &str, orders: &str, records: &str) -> (PgPool, PostgresStore) {
    let pool = PgPool::connect(url).await.expect("connect to DATABASE_URL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {orders} (id bigserial PRIMARY KEY, scope text NOT NULL, \
         idem_key text NOT NULL, body text NOT NULL)"
    )))
    .execute(&pool)
    .await
    .expect("create the orders table");
    let store = PostgresStore::new(pool.clone()).table(records);
    store.migrate().await.expect("migrate");
    (pool, store)
}

async fn teardown(pool: &PgPool, orders: &str, records: &str) {
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {orders}; DROP TABLE IF EXISTS \"{records}\""
    )))
    .execute(pool)
    .await;
}

async fn rows(pool: &PgPool, orders: &str, key: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {orders} WHERE idem_key = $1"
    )))
    .bind(key)
    .fetch_one(pool)
    .await
    .expect("count");
    n
}

/// The server side of the crash test, run by the parent as a child process.
#[test]
#[ignore = "run by crash_after_the_business_commit_never_runs_twice as a child process"]
fn crash_child() {
    if std::env::var("CRASH_CHILD").as_deref() != Ok("1") {
        return;
    }
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let orders = std::env::var("CRASH_ORDERS").expect("CRASH_ORDERS");
    let records = std::env::var("CRASH_RECORDS").expect("CRASH_RECORDS");
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    rt.block_on(async move {
        let (pool, store) = setup(&url, &orders, &records).await;
        let app = App {
            pool,
            store: store.clone(),
            orders,
            runs: Arc::default(),
            after_commit: Duration::from_secs(60),
            roll_back: false,
        };
        let router = router(app, layer(&store));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", listener.local_addr().unwrap());
        axum::serve(listener, router).await.unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_business_commit_never_runs_twice() {
    let Some(url) = database_url() else { return };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (orders, records) = (format!("crash_orders_{id}"), format!("crash_records_{id}"));
    let (pool, store) = setup(&url, &orders, &records).await;

    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CRASH_CHILD", "1")
            .env("CRASH_ORDERS", &orders)
            .env("CRASH_RECORDS", &records)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the child server"),
    );
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let next = |prefix: &str| -> String {
        loop {
            let line = lines_rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("the child never printed {prefix}"));
            // libtest may print its own "test crash_child ... " ahead on the same line.
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].trim().to_owned();
            }
        }
    };
    let addr = next("LISTENING ");

    // The first request: its client will never get an answer.
    let key = format!("order-{id}");
    let first = tokio::spawn({
        let (addr, key) = (addr.clone(), key.clone());
        async move {
            let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = http::Request::post("/orders")
                .header("idempotency-key", key)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(Bytes::from_static(
                    b"{\"sku\":1}",
                )))
                .unwrap();
            sender.send_request(req).await
        }
    });
    let committed: i64 = next("COMMITTED ").parse().expect("an order id");
    // The business rows and the commit point are durable; the answer is not stored.
    child.0.kill().expect("kill the child");
    child.0.wait().expect("reap the child");
    assert!(first.await.unwrap().is_err(), "the killed server answered");
    assert_eq!(rows(&pool, &orders, &key).await, 1);

    // A new instance, without a recovery hook: outcome unknown, never a second run.
    let app = App {
        pool: pool.clone(),
        store: store.clone(),
        orders: orders.clone(),
        runs: Arc::default(),
        after_commit: Duration::ZERO,
        roll_back: false,
    };
    let plain = router(app.clone(), layer(&store));
    let retry = retry_past_409(&plain, &key).await;
    assert_problem(&retry, 500, "outcome-unknown");

    // With the recovery hook: the order made under the key, stored and replayed.
    let hooked = router(
        app.clone(),
        recovering(layer(&store), pool.clone(), orders.clone()),
    );
    let recovered = call(&hooked, post_req(Some(&key), "{\"sku\":1}")).await;
    assert_eq!(recovered.status, StatusCode::CREATED);
    assert_eq!(recovered.outcome, Some(IdempotencyOutcome::Recovered));
    assert_eq!(recovered.json()["id"], committed);
    let replay = call(&plain, post_req(Some(&key), "{\"sku\":1}")).await;
    assert_eq!(replay.outcome, Some(IdempotencyOutcome::Replayed));
    assert_eq!(replay.json()["id"], committed);

    assert_eq!(
        app.runs.load(Ordering::SeqCst),
        0,
        "the operation ran again"
    );
    assert_eq!(
        rows(&pool, &orders, &key).await,
        1,
        "a second order was made"
    );
    // The record is readable in SQL.
    let (status,): (Option<i16>,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT status FROM \"{records}\" WHERE key = $1"
    )))
    .bind(StoreKey::new(&Scope::anonymous(), &key).as_str())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(status, Some(201));
    teardown(&pool, &orders, &records).await;
}

/// The child server, killed if the test ends early.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn retry_past_409(app: &Router, key: &str) -> Answer {
    for _ in 0..200 {
        let answer = call(app, post_req(Some(key), "{\"sku\":1}")).await;
        if answer.status != StatusCode::CONFLICT {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the key stayed in use");
}

/// A transaction that rolls back takes its commit point with it: the key is released and a
/// retry runs normally.
#[tokio::test]
async fn a_rolled_back_commit_point_lets_a_retry_run() {
    let Some(url) = database_url() else { return };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (orders, records) = (format!("rb_orders_{id}"), format!("rb_records_{id}"));
    let (pool, store) = setup(&url, &orders, &records).await;
    let mut app = App {
        pool: pool.clone(),
        store: store.clone(),
        orders: orders.clone(),
        runs: Arc::default(),
        after_commit: Duration::ZERO,
        roll_back: true,
    };
    let failing = router(app.clone(), layer(&store));
    let first = call(&failing, post_req(Some("k"), "{\"sku\":1}")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(matches!(
        store
            .inspect(&StoreKey::new(&Scope::anonymous(), "k"))
            .await
            .unwrap(),
        KeyState::Free
    ));
    app.roll_back = false;
    let working = router(app.clone(), layer(&store));
    let retry = call(&working, post_req(Some("k"), "{\"sku\":1}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(app.runs.load(Ordering::SeqCst), 2);
    assert_eq!(rows(&pool, &orders, "k").await, 1);
    // The stored answer's status and headers are readable in SQL.
    let (status, content_type): (Option<i16>, Option<String>) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT status, (SELECT h->>1 FROM jsonb_array_elements(headers) AS h \
             WHERE h->>0 = 'content-type') FROM \"{records}\" WHERE key = $1"
        )))
        .bind(StoreKey::new(&Scope::anonymous(), "k").as_str())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, Some(201));
    assert_eq!(content_type.as_deref(), Some("text/plain; charset=utf-8"));
    teardown(&pool, &orders, &records).await;
}
