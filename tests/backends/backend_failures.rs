//! The failure behaviours where the backend matters, through the layer, on Redis, PostgreSQL
//! and MySQL: waiting duplicates, the wait timing out, the lease heartbeat, a crashed owner,
//! an outage (fail open on Redis, fail closed and recovery on the SQL stores) and a
//! `complete` that fails after the operation ran.
//!
//! The Redis tests need `REDIS_URL`, the PostgreSQL tests `DATABASE_URL` and the MySQL tests
//! `MYSQL_URL`; without it a test prints "skipped: … not set" and passes. The Redis outage
//! test starts its own `redis-server` (on `PATH`) on a free port; the SQL outage tests route
//! their pool through a TCP proxy they stop and restart. None ever stops the shared server.
#![cfg(any(feature = "redis", feature = "postgres", feature = "mysql"))]

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use common::{Answer, Handler, Runs, assert_problem, call, eventually};
use http::{Request, StatusCode};
use tokio::time::Instant;
use tower::Layer;
use tower_idempotency::policy::InFlight;
use tower_idempotency::store::{Claim, StoreKey};
use tower_idempotency::{
    Fingerprint, Idempotency, IdempotencyLayer, IdempotencyOutcome, IdempotencyStore, Scope,
};

type Svc = Idempotency<Handler>;

const ORDER: &str = r#"{"item":"book","qty":1}"#;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn fresh_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A POST to /orders with `key`, the way a client sends it.
fn order(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Body::from(ORDER))
        .expect("a request")
}

/// The fingerprint the layer computes for [`order`].
fn order_fingerprint() -> Fingerprint {
    let (parts, ()) = Request::post("/orders")
        .header("content-type", "application/json")
        .body(())
        .expect("a request")
        .into_parts();
    Fingerprint::of_request(&parts, ORDER.as_bytes())
}

/// Sends [`order`] with `key` and collects the whole answer.
async fn send(svc: &Svc, key: &str) -> Answer {
    call(svc, order(key)).await
}

// ---------------------------------------------------------------------------------------
// The scenarios, the same on every backend.
// ---------------------------------------------------------------------------------------

/// 16 concurrent requests with one key, `InFlight::Wait`: one run, 16 identical 201s, 15
/// of them replays.
async fn wait_mode_runs_once<S: IdempotencyStore + Clone>(store: S) {
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .on_in_flight(InFlight::Wait(Duration::from_secs(10)))
        .layer(runs.handler(ms(300)));
    let key = fresh_key();
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let svc = svc.clone();
        let key = key.clone();
        let barrier = Arc::clone(&barrier);
        tasks.spawn(async move {
            barrier.wait().await;
            send(&svc, &key).await
        });
    }
    let answers = tasks.join_all().await;
    assert_eq!(runs.started(), 1, "the operation must run exactly once");
    assert!(
        answers.iter().all(|a| a.status == StatusCode::CREATED),
        "every waiter gets the first's 201: {answers:?}"
    );
    assert!(
        answers.iter().all(|a| a.body == answers[0].body),
        "every response carries the same body"
    );
    assert_eq!(answers.iter().filter(|a| a.replayed()).count(), 15);
    let executed: Vec<_> = answers.iter().filter(|a| !a.replayed()).collect();
    assert_eq!(executed[0].outcome, Some(IdempotencyOutcome::Executed));
    assert!(
        answers
            .iter()
            .filter(|a| a.replayed())
            .all(|a| a.outcome == Some(IdempotencyOutcome::Replayed))
    );
}

/// `InFlight::Wait` that runs out before the first ends: 409, and still one run.
async fn wait_times_out<S: IdempotencyStore + Clone>(store: S) {
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .on_in_flight(InFlight::Wait(ms(200)))
        .layer(runs.handler(ms(1500)));
    let key = fresh_key();
    let first = tokio::spawn({
        let svc = svc.clone();
        let key = key.clone();
        async move { send(&svc, &key).await }
    });
    eventually("the first request runs", || runs.started() == 1).await;

    let sent = Instant::now();
    let duplicate = send(&svc, &key).await;
    let waited = sent.elapsed();
    assert_problem(&duplicate, 409, "key-in-use");
    assert_eq!(duplicate.outcome, Some(IdempotencyOutcome::InFlight));
    assert!(
        waited >= ms(200) && waited < ms(1200),
        "the duplicate waits for the timeout, then gives up: {waited:?}"
    );

    let first = first.await.expect("the first request");
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.outcome, Some(IdempotencyOutcome::Executed));
    let retry = send(&svc, &key).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.started(), 1);
}

/// A handler that runs more than three times the lease: the heartbeat keeps the key
/// claimed, so duplicates get 409 all along, and a retry afterwards replays.
async fn heartbeat_keeps_the_key<S: IdempotencyStore + Clone>(store: S) {
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .lease(ms(600))
        .layer(runs.handler(Duration::from_secs(2)));
    let key = fresh_key();
    let first = tokio::spawn({
        let svc = svc.clone();
        let key = key.clone();
        async move { send(&svc, &key).await }
    });
    eventually("the first request runs", || runs.started() == 1).await;
    let started = Instant::now();
    for at in [500, 1000, 1500] {
        tokio::time::sleep_until(started + ms(at)).await;
        let duplicate = send(&svc, &key).await;
        assert_problem(&duplicate, 409, "key-in-use");
        assert_eq!(duplicate.outcome, Some(IdempotencyOutcome::InFlight));
        assert_eq!(runs.started(), 1, "no duplicate runs beside it ({at} ms)");
    }
    let first = first.await.expect("the first request");
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    let retry = send(&svc, &key).await;
    assert!(retry.replayed(), "a retry after completion replays");
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.started(), 1);
}

/// Another instance claimed the key and died: requests get 409 until its lease ends, the
/// first one after that contests the lapsed lease (409 for half a lease more, time for a
/// live owner to extend), then the operation runs.
async fn crashed_owner_blocks_only_for_its_lease<S: IdempotencyStore + Clone>(store: S) {
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(ms(500))
        .layer(runs.handler(Duration::ZERO));
    let key = fresh_key();
    let claimed_at = Instant::now();
    let claim = store
        .claim(
            &StoreKey::new(&Scope::anonymous(), &key),
            &order_fingerprint(),
            tower_idempotency::store::LeaseToken::new(),
            ms(500),
        )
        .await
        .expect("claim");
    assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");

    let blocked = send(&svc, &key).await;
    assert_problem(&blocked, 409, "key-in-use");
    assert_eq!(blocked.outcome, Some(IdempotencyOutcome::InFlight));
    assert_eq!(runs.started(), 0);

    tokio::time::sleep_until(claimed_at + ms(700)).await;
    let contested = send(&svc, &key).await;
    assert_problem(&contested, 409, "key-in-use");
    assert!(
        contested.headers["retry-after"] == "1",
        "Retry-After stays within the grace"
    );
    tokio::time::sleep(ms(350)).await;
    let answer = send(&svc, &key).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    assert_eq!(answer.outcome, Some(IdempotencyOutcome::Executed));
    assert!(!answer.replayed());
    assert_eq!(runs.finished(), 1);
}

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

/// With the store unreachable (every connection through `proxy` dropped), covered requests
/// get 503 quickly and nothing runs; once it is back, the same service protects requests
/// again. `store` reaches its server through `proxy`, with a short acquire timeout.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn outage_fails_closed_and_recovers<S: IdempotencyStore + Clone>(
    store: S,
    proxy: &common::FaultProxy,
) {
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store)
        .share_keys_across_callers()
        .store_timeout(Duration::from_secs(2))
        .layer(runs.handler(Duration::ZERO));
    let before = send(&svc, &fresh_key()).await;
    assert_eq!(before.status, StatusCode::CREATED);

    proxy.drop_all();
    let key = fresh_key();
    for _ in 0..2 {
        let sent = Instant::now();
        let refused = send(&svc, &key).await;
        assert_problem(&refused, 503, "store-unavailable");
        assert_eq!(refused.outcome, Some(IdempotencyOutcome::StoreUnavailable));
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "{:?}",
            sent.elapsed()
        );
        assert_eq!(runs.started(), 1, "nothing runs while the store is down");
    }

    proxy.pass();
    let mut answer = send(&svc, &key).await;
    for _ in 0..30 {
        if answer.status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(ms(100)).await;
        answer = send(&svc, &key).await;
    }
    assert_eq!(
        answer.status,
        StatusCode::CREATED,
        "the same service recovers"
    );
    assert_eq!(answer.outcome, Some(IdempotencyOutcome::Executed));
    let retry = send(&svc, &key).await;
    assert!(retry.replayed(), "and protects again");
    assert_eq!(retry.body, answer.body);
    assert_eq!(runs.started(), 2);
}

/// The store goes away while the handler runs, for longer than the lease, so storing its
/// outcome fails: the layer retries `complete` until the store is back, never releases the
/// key, and a retry then replays the one run. `store` reaches its server through `proxy`.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn complete_failing_after_the_run_is_retried<S: IdempotencyStore + Clone>(
    store: S,
    proxy: &common::FaultProxy,
) {
    use std::sync::atomic::Ordering;
    let store = common::FaultStore::new(store);
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(ms(300))
        .layer(runs.handler(ms(200)));
    let key = fresh_key();
    let first = tokio::spawn({
        let svc = svc.clone();
        let key = key.clone();
        async move { send(&svc, &key).await }
    });
    eventually("the handler runs", || runs.started() == 1).await;
    proxy.drop_all();
    eventually("the handler ends", || runs.finished() == 1).await;

    // Meanwhile a retry cannot claim: 503, and nothing runs.
    let refused = send(&svc, &key).await;
    assert_problem(&refused, 503, "store-unavailable");
    // Past the lease: the claim lapsed in the store meanwhile.
    tokio::time::sleep(ms(500)).await;
    assert!(
        store.faults.failed_completes.load(Ordering::SeqCst) >= 1,
        "storing the outcome failed during the outage"
    );
    assert!(
        !first.is_finished(),
        "the body ends only once the outcome is stored"
    );

    proxy.pass();
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("the outcome is stored once the store is back")
        .expect("the first request");
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.outcome, Some(IdempotencyOutcome::Executed));
    let completes = store.faults.completes.load(Ordering::SeqCst);
    let failed = store.faults.failed_completes.load(Ordering::SeqCst);
    assert!(completes >= 2, "complete was retried: {completes}");
    assert_eq!(completes - failed, 1, "and succeeded once");
    // (The refused retry's claim is released by its token, which frees nothing.)
    assert_eq!(
        store.faults.released.load(Ordering::SeqCst),
        0,
        "never released"
    );

    let retry = send(&svc, &key).await;
    assert!(retry.replayed(), "a retry after recovery replays");
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.started(), 1, "the operation ran once");
}

/// A proxy in front of the server at `host:port`.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn proxy_to(host: &str, port: u16) -> common::FaultProxy {
    let upstream = tokio::net::lookup_host((host, port))
        .await
        .expect("resolve the server")
        .next()
        .expect("an address");
    common::FaultProxy::start(upstream).await
}

#[cfg(feature = "redis")]
mod redis_backend {
    use tower_idempotency::RedisStore;

    use crate::common::PrivateRedis;
    use tower_idempotency::policy::StoreFailure;

    use super::*;

    fn redis_url() -> Option<String> {
        let url = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
        if url.is_none() {
            println!("skipped: REDIS_URL not set");
        }
        url
    }

    async fn shared_store() -> Option<RedisStore> {
        let url = redis_url()?;
        let store = RedisStore::connect(&url)
            .await
            .expect("connect to REDIS_URL")
            .prefix("tower-idempotency-backend-failures:");
        Some(store)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_wait_mode_runs_once_and_replays_to_every_waiter() {
        let Some(store) = shared_store().await else {
            return;
        };
        wait_mode_runs_once(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_wait_timeout_answers_409() {
        let Some(store) = shared_store().await else {
            return;
        };
        wait_times_out(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_heartbeat_keeps_a_slow_operation_claimed() {
        let Some(store) = shared_store().await else {
            return;
        };
        heartbeat_keeps_the_key(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_crashed_owner_blocks_only_for_its_lease() {
        let Some(store) = shared_store().await else {
            return;
        };
        crashed_owner_blocks_only_for_its_lease(store).await;
    }

    /// Fail closed is covered by tests/redis.rs; here the layer fails open: with the server
    /// gone, requests run unprotected.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_outage_fails_open_when_asked() {
        let Some(_) = redis_url() else { return };
        let mut server = PrivateRedis::start();
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        let runs = Runs::default();
        let svc = IdempotencyLayer::new(store)
            .share_keys_across_callers()
            .on_store_failure(StoreFailure::FailOpen)
            .layer(runs.handler(Duration::ZERO));

        let before = send(&svc, &fresh_key()).await;
        assert_eq!(before.status, StatusCode::CREATED);
        assert_eq!(before.outcome, Some(IdempotencyOutcome::Executed));

        server.kill();
        let key = fresh_key();
        let sent = Instant::now();
        let first = send(&svc, &key).await;
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "a dead Redis fails fast"
        );
        assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
        assert_eq!(first.outcome, Some(IdempotencyOutcome::Unprotected));
        assert!(!first.replayed());
        assert_eq!(runs.finished(), 2, "the request ran");
        // Unprotected means just that: a retry runs the operation again.
        let retry = send(&svc, &key).await;
        assert_eq!(retry.status, StatusCode::CREATED);
        assert_eq!(retry.outcome, Some(IdempotencyOutcome::Unprotected));
        assert_ne!(retry.body, first.body);
        assert_eq!(runs.finished(), 3);
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

#[cfg(feature = "postgres")]
mod postgres_backend {
    use common::FaultProxy;
    use std::future::Future;
    use std::str::FromStr;
    use tower_idempotency::PostgresStore;
    use tower_idempotency::sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
    use tower_idempotency::sqlx::{self, PgPool};

    use super::*;

    fn database_url() -> Option<String> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                println!("skipped: DATABASE_URL not set");
                None
            }
        }
    }

    /// A table of the test's own, created on a direct pool and dropped by [`run`].
    struct PgTable {
        url: String,
        admin: PgPool,
        name: String,
    }

    impl PgTable {
        async fn create(url: String) -> Self {
            let admin = PgPoolOptions::new()
                .max_connections(8)
                .connect(&url)
                .await
                .expect("connect to DATABASE_URL");
            let name = format!("t_{}", uuid::Uuid::new_v4().simple());
            let table = Self { url, admin, name };
            table
                .store(table.admin.clone())
                .migrate()
                .await
                .expect("migrate");
            table
        }

        /// A store on `pool`, in this table.
        fn store(&self, pool: PgPool) -> PostgresStore {
            PostgresStore::new(pool)
                .table(&self.name)
                .sweep_interval(Duration::ZERO)
        }

        /// Runs `test` on its own task, drops the table, then passes on its panic if any.
        async fn run(self, test: impl Future<Output = ()> + Send + 'static) {
            let outcome = tokio::spawn(test).await;
            let sql = format!("DROP TABLE IF EXISTS \"{}\"", self.name);
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&self.admin)
                .await;
            if let Err(err) = outcome {
                std::panic::resume_unwind(err.into_panic());
            }
        }
    }

    /// Runs a scenario on a store in a fresh table, over a direct pool.
    async fn on_postgres<Fut>(scenario: impl FnOnce(PostgresStore) -> Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(url) = database_url() else { return };
        let table = PgTable::create(url).await;
        let store = table.store(table.admin.clone());
        table.run(scenario(store)).await;
    }

    /// A proxy in front of the server, and a pool through it whose acquire times out after
    /// `acquire_timeout`.
    async fn through_proxy(url: &str, acquire_timeout: Duration) -> (FaultProxy, PgPool) {
        let options = PgConnectOptions::from_str(url).expect("DATABASE_URL");
        let host = if options.get_host().starts_with('/') {
            "127.0.0.1"
        } else {
            options.get_host()
        };
        let proxy = proxy_to(host, options.get_port()).await;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(acquire_timeout)
            .connect_with(
                options
                    .host("127.0.0.1")
                    .port(proxy.port)
                    .ssl_mode(PgSslMode::Disable),
            )
            .await
            .expect("connect through the proxy");
        (proxy, pool)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_wait_mode_runs_once_and_replays_to_every_waiter() {
        on_postgres(wait_mode_runs_once).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_wait_timeout_answers_409() {
        on_postgres(wait_times_out).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_heartbeat_keeps_a_slow_operation_claimed() {
        on_postgres(heartbeat_keeps_the_key).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_crashed_owner_blocks_only_for_its_lease() {
        on_postgres(crashed_owner_blocks_only_for_its_lease).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_outage_fails_closed_and_recovers_without_rebuilding() {
        let Some(url) = database_url() else { return };
        let table = PgTable::create(url).await;
        let (proxy, pool) = through_proxy(&table.url, Duration::from_secs(1)).await;
        let store = table.store(pool);
        table
            .run(async move { outage_fails_closed_and_recovers(store, &proxy).await })
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_complete_failing_after_the_run_is_retried() {
        let Some(url) = database_url() else { return };
        let table = PgTable::create(url).await;
        // A short acquire timeout, so that each `complete` during the outage fails quickly.
        let (proxy, pool) = through_proxy(&table.url, ms(250)).await;
        let store = table.store(pool);
        table
            .run(async move { complete_failing_after_the_run_is_retried(store, &proxy).await })
            .await;
    }
}

// ---------------------------------------------------------------------------------------
// MySQL / MariaDB
// ---------------------------------------------------------------------------------------

#[cfg(feature = "mysql")]
mod mysql_backend {
    use std::future::Future;
    use std::str::FromStr;

    use common::FaultProxy;
    use tower_idempotency::MySqlStore;
    use tower_idempotency::sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlSslMode};
    use tower_idempotency::sqlx::{self, MySqlPool};

    use super::*;

    fn mysql_url() -> Option<String> {
        match std::env::var("MYSQL_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                println!("skipped: MYSQL_URL not set");
                None
            }
        }
    }

    /// A table of the test's own on a direct pool, dropped (with its procedures) at the end.
    async fn on_mysql<Fut>(scenario: impl FnOnce(MySqlStore) -> Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(url) = mysql_url() else { return };
        let admin = MySqlPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect to MYSQL_URL");
        run_on_table(&admin, admin.clone(), scenario).await;
    }

    async fn run_on_table<Fut>(
        admin: &MySqlPool,
        pool: MySqlPool,
        scenario: impl FnOnce(MySqlStore) -> Fut,
    ) where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let table = format!("ti_fail_{}", uuid::Uuid::new_v4().simple());
        let store = MySqlStore::new(pool)
            .table(&table)
            .sweep_interval(Duration::ZERO);
        // Migrated on the direct pool: the store's own may go through a proxy.
        let direct = MySqlStore::new(admin.clone()).table(&table);
        direct.migrate().await.expect("migrate");
        let outcome = tokio::spawn(scenario(store)).await;
        for sql in direct.drop_sql().expect("a valid name") {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(admin).await;
        }
        if let Err(err) = outcome {
            std::panic::resume_unwind(err.into_panic());
        }
    }

    /// A proxy in front of the server, and a pool through it whose acquire times out after
    /// `acquire_timeout`.
    async fn through_proxy(url: &str, acquire_timeout: Duration) -> (FaultProxy, MySqlPool) {
        let options = MySqlConnectOptions::from_str(url).expect("MYSQL_URL");
        let proxy = proxy_to(options.get_host(), options.get_port()).await;
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(acquire_timeout)
            .connect_with(
                options
                    .host("127.0.0.1")
                    .port(proxy.port)
                    .ssl_mode(MySqlSslMode::Disabled),
            )
            .await
            .expect("connect through the proxy");
        (proxy, pool)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_wait_mode_runs_once_and_replays_to_every_waiter() {
        on_mysql(wait_mode_runs_once).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_wait_timeout_answers_409() {
        on_mysql(wait_times_out).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_heartbeat_keeps_a_slow_operation_claimed() {
        on_mysql(heartbeat_keeps_the_key).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_crashed_owner_blocks_only_for_its_lease() {
        on_mysql(crashed_owner_blocks_only_for_its_lease).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_outage_fails_closed_and_recovers_without_rebuilding() {
        let Some(url) = mysql_url() else { return };
        let admin = MySqlPool::connect(&url)
            .await
            .expect("connect to MYSQL_URL");
        let (proxy, pool) = through_proxy(&url, Duration::from_secs(1)).await;
        run_on_table(&admin, pool, |store| async move {
            outage_fails_closed_and_recovers(store, &proxy).await
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_complete_failing_after_the_run_is_retried() {
        let Some(url) = mysql_url() else { return };
        let admin = MySqlPool::connect(&url)
            .await
            .expect("connect to MYSQL_URL");
        let (proxy, pool) = through_proxy(&url, ms(250)).await;
        run_on_table(&admin, pool, |store| async move {
            complete_failing_after_the_run_is_retried(store, &proxy).await
        })
        .await;
    }

    /// A blackholed database (connections open, nothing moves) holds no request past the
    /// store-call bound: `503` within it, and the key runs once the database is back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blackholed_mysql_answers_within_the_bound() {
        let Some(url) = mysql_url() else { return };
        let admin = MySqlPool::connect(&url)
            .await
            .expect("connect to MYSQL_URL");
        let (proxy, pool) = through_proxy(&url, Duration::from_secs(30)).await;
        run_on_table(&admin, pool, |store| async move {
            let runs = Runs::default();
            let svc = IdempotencyLayer::new(store)
                .share_keys_across_callers()
                .store_timeout(ms(500))
                .layer(runs.handler(Duration::ZERO));
            assert_eq!(send(&svc, &fresh_key()).await.status, StatusCode::CREATED);

            proxy.blackhole();
            let key = fresh_key();
            let sent = Instant::now();
            let answer = tokio::time::timeout(Duration::from_secs(8), send(&svc, &key))
                .await
                .expect("a blackholed store must not hold the request");
            assert_problem(&answer, 503, "store-unavailable");
            assert!(
                sent.elapsed() < Duration::from_secs(3),
                "{:?}",
                sent.elapsed()
            );

            proxy.pass();
            let mut last = None;
            for _ in 0..50 {
                let answer = send(&svc, &key).await;
                if answer.status == StatusCode::CREATED {
                    last = Some(answer);
                    break;
                }
                tokio::time::sleep(ms(200)).await;
            }
            assert!(last.is_some(), "the key runs once the database is back");
            assert_eq!(runs.started(), 2);
        })
        .await;
    }

    /// The heartbeat fails for the whole run and the lease lapses, but nobody claims the
    /// key: the owner's outcome is stored and replayed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_owner_completes_after_an_uncontested_lease_lapse() {
        on_mysql(common::uncontested_lapse).await;
    }
}
