//! Exactly once on PostgreSQL, MySQL and MariaDB: the commit point is written inside the
//! handler's own transaction ([`PostgresStore::commit_in`], [`MySqlStore::commit_in`]), so
//! it commits if and only if the business rows do.
//!
//! The crash test runs the server in a child process (this test binary, re-run with
//! `CRASH_CHILD=postgres` or `mysql`), kills it with `SIGKILL` right after its business
//! commit and before its answer is stored, and then retries on a second instance over the
//! same database.
//!
//! The PostgreSQL tests need `DATABASE_URL`, the MySQL ones `MYSQL_URL`; each says it was
//! skipped without it.
#![cfg(any(feature = "postgres", feature = "mysql"))]

use crate::common;

use std::future::Future;
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
use tower_idempotency::store::{KeyState, StoreKey};
use tower_idempotency::{
    IdempotencyClaim, IdempotencyLayer, IdempotencyOutcome, IdempotencyStore, Scope,
};

/// A database with an orders table beside the store's table: what the handler, the
/// recovery hook and the assertions do there.
trait OrdersDb: Clone + Send + Sync + 'static {
    type Store: IdempotencyStore + Clone;
    /// What `CRASH_CHILD` says to start this database's child.
    const NAME: &'static str;
    /// The database's URL, or `None` (and a "skipped" line) when its variable is not set.
    fn url() -> Option<String>;
    /// Creates the orders table and the store's table.
    fn setup(url: &str, orders: &str, records: &str) -> impl Future<Output = Self> + Send;
    fn store(&self) -> &Self::Store;
    /// Inserts an order and declares the commit point, in one transaction; commits and
    /// returns the order's id, or rolls back and returns `None`.
    fn create(
        &self,
        claim: &IdempotencyClaim,
        body: &str,
        roll_back: bool,
    ) -> impl Future<Output = Option<i64>> + Send;
    /// The order made under a key, if any.
    fn find(
        &self,
        scope: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<i64>, tower_idempotency::sqlx::Error>> + Send;
    /// How many orders were made under a key.
    fn rows(&self, key: &str) -> impl Future<Output = i64> + Send;
    /// The stored answer's status and `content-type`, read in SQL.
    fn stored(&self, key: &StoreKey) -> impl Future<Output = (Option<i16>, Option<String>)> + Send;
    fn teardown(&self) -> impl Future<Output = ()> + Send;
}

#[derive(Clone)]
struct App<D> {
    db: D,
    runs: Arc<AtomicUsize>,
    /// How long the handler waits after its commit, before answering.
    after_commit: Duration,
    /// Whether the handler rolls back instead of committing (and answers 500).
    roll_back: bool,
    /// Whether the handler acts as if the reply to its `COMMIT` was lost: the transaction
    /// committed, but the handler saw an error and answers `503 order not created`.
    reply_lost: bool,
}

async fn create_order<D: OrdersDb>(
    State(app): State<App<D>>,
    claim: IdempotencyClaim,
    body: String,
) -> (StatusCode, String) {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let Some(id) = app.db.create(&claim, &body, app.roll_back).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "rolled back".into());
    };
    println!("COMMITTED {id}");
    if app.reply_lost {
        return (StatusCode::SERVICE_UNAVAILABLE, "order not created".into());
    }
    tokio::time::sleep(app.after_commit).await;
    (StatusCode::CREATED, format!("{{\"id\":{id}}}"))
}

fn router<D: OrdersDb>(app: App<D>, layer: IdempotencyLayer) -> Router {
    Router::new()
        .route("/orders", post(create_order::<D>))
        .with_state(app)
        .layer(layer)
}

fn layer<D: OrdersDb>(db: &D) -> IdempotencyLayer {
    IdempotencyLayer::new(db.store().clone())
        .share_keys_across_callers()
        .lease(Duration::from_millis(300))
        .store_timeout(Duration::from_millis(500))
}

/// The recovery hook of the orders: the order created under the key, if any.
fn recovering<D: OrdersDb>(layer: IdempotencyLayer, db: D) -> IdempotencyLayer {
    layer.recover_with(move |unsettled| {
        let db = db.clone();
        async move {
            let found = db.find(unsettled.scope(), unsettled.key()).await?;
            Ok(found.map(|id| {
                http::Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Bytes::from(format!("{{\"id\":{id}}}")))
                    .expect("a response")
            }))
        }
    })
}

#[cfg(feature = "postgres")]
mod pg {
    use super::*;
    use tower_idempotency::PostgresStore;
    use tower_idempotency::sqlx::{self, PgPool};

    #[derive(Clone)]
    pub struct Pg {
        pool: PgPool,
        store: PostgresStore,
        orders: String,
        records: String,
    }

    impl OrdersDb for Pg {
        type Store = PostgresStore;
        const NAME: &'static str = "postgres";

        fn url() -> Option<String> {
            let url = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
            if url.is_none() {
                println!("skipped: DATABASE_URL not set");
            }
            url
        }

        async fn setup(url: &str, orders: &str, records: &str) -> Self {
            let pool = PgPool::connect(url).await.expect("connect to DATABASE_URL");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE TABLE IF NOT EXISTS {orders} (id bigserial PRIMARY KEY, \
                 scope text NOT NULL, idem_key text NOT NULL, body text NOT NULL)"
            )))
            .execute(&pool)
            .await
            .expect("create the orders table");
            let store = PostgresStore::new(pool.clone()).table(records);
            store.migrate().await.expect("migrate");
            Self {
                pool,
                store,
                orders: orders.to_owned(),
                records: records.to_owned(),
            }
        }

        fn store(&self) -> &PostgresStore {
            &self.store
        }

        async fn create(
            &self,
            claim: &IdempotencyClaim,
            body: &str,
            roll_back: bool,
        ) -> Option<i64> {
            let mut tx = self.pool.begin().await.expect("begin");
            let (id,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {} (scope, idem_key, body) VALUES ($1, $2, $3) RETURNING id",
                self.orders
            )))
            .bind(claim.scope())
            .bind(claim.key())
            .bind(body)
            .fetch_one(&mut *tx)
            .await
            .expect("insert the order");
            self.store
                .commit_in(&mut *tx, claim)
                .await
                .expect("commit point in the transaction");
            if roll_back {
                return None;
            }
            tx.commit().await.expect("commit");
            Some(id)
        }

        async fn find(&self, scope: &str, key: &str) -> Result<Option<i64>, sqlx::Error> {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT id FROM {} WHERE scope = $1 AND idem_key = $2",
                self.orders
            )))
            .bind(scope)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
        }

        async fn rows(&self, key: &str) -> i64 {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {} WHERE idem_key = $1",
                self.orders
            )))
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .expect("count")
        }

        async fn stored(&self, key: &StoreKey) -> (Option<i16>, Option<String>) {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT status, (SELECT h->>1 FROM jsonb_array_elements(headers) AS h \
                 WHERE h->>0 = 'content-type') FROM \"{}\" WHERE key = $1",
                self.records
            )))
            .bind(key.as_str())
            .fetch_one(&self.pool)
            .await
            .expect("the stored answer")
        }

        async fn teardown(&self) {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS \"{}\"",
                self.orders, self.records
            )))
            .execute(&self.pool)
            .await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_after_the_business_commit_never_runs_twice() {
        super::crash_after_the_business_commit_never_runs_twice::<Pg>().await;
    }

    #[tokio::test]
    async fn a_rolled_back_commit_point_lets_a_retry_run() {
        super::a_rolled_back_commit_point_lets_a_retry_run::<Pg>().await;
    }

    #[tokio::test]
    async fn a_lost_commit_reply_never_binds_the_key_to_a_false_answer() {
        super::a_lost_commit_reply_never_binds_the_key_to_a_false_answer::<Pg>().await;
    }
}

#[cfg(feature = "mysql")]
mod my {
    use super::*;
    use tower_idempotency::MySqlStore;
    use tower_idempotency::sqlx::{self, MySqlPool};

    #[derive(Clone)]
    pub struct My {
        pool: MySqlPool,
        store: MySqlStore,
        orders: String,
        records: String,
    }

    impl OrdersDb for My {
        type Store = MySqlStore;
        const NAME: &'static str = "mysql";

        fn url() -> Option<String> {
            let url = std::env::var("MYSQL_URL").ok().filter(|u| !u.is_empty());
            if url.is_none() {
                println!("skipped: MYSQL_URL not set");
            }
            url
        }

        async fn setup(url: &str, orders: &str, records: &str) -> Self {
            let pool = MySqlPool::connect(url).await.expect("connect to MYSQL_URL");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE TABLE IF NOT EXISTS {orders} (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
                 scope TEXT NOT NULL, idem_key TEXT NOT NULL, body TEXT NOT NULL) ENGINE = InnoDB"
            )))
            .execute(&pool)
            .await
            .expect("create the orders table");
            let store = MySqlStore::new(pool.clone()).table(records);
            store.migrate().await.expect("migrate");
            Self {
                pool,
                store,
                orders: orders.to_owned(),
                records: records.to_owned(),
            }
        }

        fn store(&self) -> &MySqlStore {
            &self.store
        }

        async fn create(
            &self,
            claim: &IdempotencyClaim,
            body: &str,
            roll_back: bool,
        ) -> Option<i64> {
            let mut tx = self.pool.begin().await.expect("begin");
            let id = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {} (scope, idem_key, body) VALUES (?, ?, ?)",
                self.orders
            )))
            .bind(claim.scope())
            .bind(claim.key())
            .bind(body)
            .execute(&mut *tx)
            .await
            .expect("insert the order")
            .last_insert_id();
            self.store
                .commit_in(&mut *tx, claim)
                .await
                .expect("commit point in the transaction");
            if roll_back {
                return None;
            }
            tx.commit().await.expect("commit");
            Some(id as i64)
        }

        async fn find(&self, scope: &str, key: &str) -> Result<Option<i64>, sqlx::Error> {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT id FROM {} WHERE scope = ? AND idem_key = ?",
                self.orders
            )))
            .bind(scope)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
        }

        async fn rows(&self, key: &str) -> i64 {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM {} WHERE idem_key = ?",
                self.orders
            )))
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .expect("count")
        }

        async fn stored(&self, key: &StoreKey) -> (Option<i16>, Option<String>) {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT status, (SELECT h.v FROM JSON_TABLE(headers, '$[*]' COLUMNS (\
                 n TEXT PATH '$[0]', v TEXT PATH '$[1]')) AS h WHERE h.n = 'content-type') \
                 FROM `{}` WHERE `key` = ?",
                self.records
            )))
            .bind(key.as_str())
            .fetch_one(&self.pool)
            .await
            .expect("the stored answer")
        }

        async fn teardown(&self) {
            let drop_store = self.store.drop_sql().expect("a valid name");
            let drop_orders = format!("DROP TABLE IF EXISTS {}", self.orders);
            for sql in drop_store.into_iter().chain([drop_orders]) {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&self.pool)
                    .await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_after_the_business_commit_never_runs_twice() {
        super::crash_after_the_business_commit_never_runs_twice::<My>().await;
    }

    #[tokio::test]
    async fn a_rolled_back_commit_point_lets_a_retry_run() {
        super::a_rolled_back_commit_point_lets_a_retry_run::<My>().await;
    }

    #[tokio::test]
    async fn a_lost_commit_reply_never_binds_the_key_to_a_false_answer() {
        super::a_lost_commit_reply_never_binds_the_key_to_a_false_answer::<My>().await;
    }
}

/// The server side of the crash test, run by the parent as a child process.
#[test]
#[ignore = "run by crash_after_the_business_commit_never_runs_twice as a child process"]
fn crash_child() {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    match std::env::var("CRASH_CHILD").as_deref() {
        #[cfg(feature = "postgres")]
        Ok(pg::Pg::NAME) => rt.block_on(serve_child::<pg::Pg>()),
        #[cfg(feature = "mysql")]
        Ok(my::My::NAME) => rt.block_on(serve_child::<my::My>()),
        _ => {}
    }
}

async fn serve_child<D: OrdersDb>() {
    let url = D::url().expect("the database's URL");
    let orders = std::env::var("CRASH_ORDERS").expect("CRASH_ORDERS");
    let records = std::env::var("CRASH_RECORDS").expect("CRASH_RECORDS");
    let db = D::setup(&url, &orders, &records).await;
    let app = App {
        db: db.clone(),
        runs: Arc::default(),
        after_commit: Duration::from_secs(60),
        roll_back: false,
        reply_lost: false,
    };
    let router = router(app, layer(&db));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("LISTENING {}", listener.local_addr().unwrap());
    axum::serve(listener, router).await.unwrap();
}

async fn crash_after_the_business_commit_never_runs_twice<D: OrdersDb>() {
    let Some(url) = D::url() else { return };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (orders, records) = (format!("crash_orders_{id}"), format!("crash_records_{id}"));
    let db = D::setup(&url, &orders, &records).await;

    // The child test's full name in this binary: this module's path, less the crate's name.
    let child_test = match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::crash_child"),
        None => "crash_child".to_owned(),
    };
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                child_test.as_str(),
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CRASH_CHILD", D::NAME)
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
            // libtest may print its own "test exactly_once::crash_child ... " ahead on the same line.
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
    assert_eq!(db.rows(&key).await, 1);

    // A second instance, without a recovery hook: outcome unknown, never a second run.
    let app = App {
        db: db.clone(),
        runs: Arc::default(),
        after_commit: Duration::ZERO,
        roll_back: false,
        reply_lost: false,
    };
    let plain = router(app.clone(), layer(&db));
    let retry = retry_past_409(&plain, &key).await;
    assert_problem(&retry, 500, "outcome-unknown");

    // With the recovery hook: the order made under the key, stored and replayed.
    let hooked = router(app.clone(), recovering(layer(&db), db.clone()));
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
    assert_eq!(db.rows(&key).await, 1, "a second order was made");
    // The record is readable in SQL.
    let (status, _) = db.stored(&StoreKey::new(&Scope::anonymous(), &key)).await;
    assert_eq!(status, Some(201));
    db.teardown().await;
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
async fn a_rolled_back_commit_point_lets_a_retry_run<D: OrdersDb>() {
    let Some(url) = D::url() else { return };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (orders, records) = (format!("rb_orders_{id}"), format!("rb_records_{id}"));
    let db = D::setup(&url, &orders, &records).await;
    let mut app = App {
        db: db.clone(),
        runs: Arc::default(),
        after_commit: Duration::ZERO,
        roll_back: true,
        reply_lost: false,
    };
    let failing = router(app.clone(), layer(&db));
    let first = call(&failing, post_req(Some("k"), "{\"sku\":1}")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(matches!(
        db.store()
            .inspect(&StoreKey::new(&Scope::anonymous(), "k"))
            .await
            .unwrap(),
        KeyState::Free
    ));
    app.roll_back = false;
    let working = router(app.clone(), layer(&db));
    let retry = call(&working, post_req(Some("k"), "{\"sku\":1}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(app.runs.load(Ordering::SeqCst), 2);
    assert_eq!(db.rows("k").await, 1);
    // The stored answer's status and headers are readable in SQL.
    let (status, content_type) = db.stored(&StoreKey::new(&Scope::anonymous(), "k")).await;
    assert_eq!(status, Some(201));
    assert_eq!(content_type.as_deref(), Some("text/plain; charset=utf-8"));
    db.teardown().await;
}

/// The reply to the transaction's `COMMIT` is lost: the order and the commit point are
/// committed together, but the handler saw an error and answers `503 order not created`.
/// Whether a commit written in a transaction holds is not the layer's to know, so that
/// answer is never stored: the key goes to the recovery hook, which finds the order, and
/// every retry gets `201` with it. Exactly one order exists.
async fn a_lost_commit_reply_never_binds_the_key_to_a_false_answer<D: OrdersDb>() {
    let Some(url) = D::url() else { return };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (orders, records) = (format!("lost_orders_{id}"), format!("lost_records_{id}"));
    let db = D::setup(&url, &orders, &records).await;
    let app = App {
        db: db.clone(),
        runs: Arc::default(),
        after_commit: Duration::ZERO,
        roll_back: false,
        reply_lost: true,
    };
    let instance = router(app.clone(), recovering(layer(&db), db.clone()));
    let first = call(&instance, post_req(Some("k"), "{\"sku\":1}")).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    let key = StoreKey::new(&Scope::anonymous(), "k");
    assert_eq!(
        db.stored(&key).await.0,
        None,
        "the handler's 503 must not be stored under a key whose commit may hold"
    );
    for attempt in 0..2 {
        let retry = call(&instance, post_req(Some("k"), "{\"sku\":1}")).await;
        assert_eq!(
            retry.status,
            StatusCode::CREATED,
            "retry {attempt}: the order exists, so the retry must be told so, got {:?}",
            retry.body
        );
    }
    assert_eq!(app.runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(db.rows("k").await, 1, "exactly one order exists");
    db.teardown().await;
}
