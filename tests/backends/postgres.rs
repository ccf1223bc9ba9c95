//! The PostgreSQL store against a real server: the scenarios it shares with the MySQL store
//! (`sql_scenarios`), and what is its own (its wire protocol, its migrations, its index
//! names).
//!
//! Every test reads `DATABASE_URL` (for example `postgres://postgres@127.0.0.1:5432/test`);
//! when it is not set the test prints "skipped: DATABASE_URL not set" and passes.
#![cfg(feature = "postgres")]

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower_idempotency::sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use tower_idempotency::sqlx::{self, PgPool};
use tower_idempotency::store::{Claim, LeaseToken, StoreKey};
use tower_idempotency::{IdempotencyStore, PostgresStore, Scope, StoreError};

use crate::sql_scenarios::{self, SqlStore, acquire, fp, pool, private_table, waiter};

impl SqlStore for PostgresStore {
    type Pool = PgPool;
    const URL_VAR: &'static str = "DATABASE_URL";

    async fn connect(url: &str, connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(connections)
            .connect(url)
            .await
            .expect("connect to DATABASE_URL")
    }

    fn on(pool: PgPool) -> Self {
        Self::new(pool)
    }

    fn pool_of(&self) -> &PgPool {
        self.pool()
    }

    fn with_table(self, name: &str) -> Self {
        self.table(name)
    }

    fn with_sweep_batch(self, rows: u32) -> Self {
        self.sweep_batch(rows)
    }

    fn with_sweep_interval(self, interval: Duration) -> Self {
        self.sweep_interval(interval)
    }

    async fn create_table(&self) -> Result<(), StoreError> {
        self.migrate().await
    }

    async fn sweep_now(&self) -> Result<u64, StoreError> {
        self.sweep().await
    }

    fn shown_migration(&self) -> Option<Result<Vec<String>, String>> {
        None
    }

    async fn drop_table(pool: &PgPool, table: &str) {
        let sql = format!("DROP TABLE IF EXISTS \"{table}\"");
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(pool).await;
    }

    async fn count_rows(pool: &PgPool, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM \"{table}\"");
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(pool)
            .await
            .expect("count rows")
    }

    async fn execute(pool: &PgPool, sql: String) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .expect("run SQL");
    }

    fn age_lapsed_claims_sql(table: &str) -> String {
        format!(
            "UPDATE \"{table}\" SET expires_at = now() - interval '2 hours' \
             WHERE key LIKE '%lease-%'"
        )
    }

    fn damage_records_sql(table: &str) -> String {
        format!("UPDATE \"{table}\" SET record = '\\x0001'::bytea")
    }
}

sql_scenarios::sql_store_tests!(PostgresStore);

/// `DATABASE_URL`, or `None` after saying the test was skipped.
fn database_url() -> Option<String> {
    sql_scenarios::url::<PostgresStore>()
}

#[cfg(feature = "conformance")]
async fn make_store() -> Option<PostgresStore> {
    sql_scenarios::conformance_store().await
}

#[cfg(feature = "conformance")]
tower_idempotency::store_conformance_tests!(postgres_store, make_store);

/// Records the PostgreSQL frontend messages that pass through it, grouped in round trips.
///
/// Why a proxy: `pg_stat_statements` is not loaded on a shared server (it needs a restart),
/// and the cumulative statistics views (`pg_stat_database.xact_commit`, …) are flushed
/// lazily and shared with every other session. The wire is exact: every statement the
/// client runs is one `Execute` (`E`, extended protocol) or one `Query` (`Q`, simple
/// protocol) message, a statement that has to be prepared first sends a `Parse` (`P`), and
/// the client waits for the server after each `Sync` (`S`) or `Query`, which therefore end
/// a round trip. sqlx's pool also sends a bare `Sync` when a connection goes back to the
/// pool (a liveness ping, in a background task, whatever the store does): such empty
/// round trips are counted apart.
#[derive(Default)]
struct WireCounter {
    state: std::sync::Mutex<(Vec<u8>, Vec<Vec<u8>>)>,
}

impl WireCounter {
    /// The round trips with content since the last call (message types in order), and how
    /// many empty ones (bare `Sync`s).
    fn take(&self) -> (Vec<String>, usize) {
        let mut state = self.state.lock().unwrap();
        let trips = std::mem::take(&mut state.1);
        let empty = trips.iter().filter(|t| t.as_slice() == b"S").count();
        let full = trips
            .into_iter()
            .filter(|t| t.as_slice() != b"S")
            .map(|t| String::from_utf8(t).unwrap())
            .collect();
        (full, empty)
    }

    fn record(&self, kind: u8) {
        let mut state = self.state.lock().unwrap();
        state.0.push(kind);
        if kind == b'S' || kind == b'Q' {
            let trip = std::mem::take(&mut state.0);
            state.1.push(trip);
        }
    }
}

async fn wire_proxy(upstream: (String, u16)) -> (u16, Arc<WireCounter>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let port = listener.local_addr().expect("proxy address").port();
    let counter = Arc::new(WireCounter::default());
    let counts = Arc::clone(&counter);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect((upstream.0.as_str(), upstream.1))
                .await
                .expect("connect upstream");
            let counts = Arc::clone(&counts);
            tokio::spawn(async move {
                let (mut client_rd, mut client_wr) = client.into_split();
                let (mut server_rd, mut server_wr) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
                });
                let _ = forward_frontend(&mut client_rd, &mut server_wr, &counts).await;
            });
        }
    });
    (port, counter)
}

async fn forward_frontend(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    counts: &WireCounter,
) -> std::io::Result<()> {
    // Untyped start-up messages (length, code, …): SSL or GSS requests, then the startup.
    loop {
        let len = from.read_u32().await?;
        let mut rest = vec![0; len as usize - 4];
        from.read_exact(&mut rest).await?;
        to.write_u32(len).await?;
        to.write_all(&rest).await?;
        let code = u32::from_be_bytes(rest[..4].try_into().expect("code"));
        if code != 80877103 && code != 80877104 {
            break;
        }
    }
    // Then typed messages: a type byte, a length that counts itself, the payload.
    loop {
        let kind = from.read_u8().await?;
        let len = from.read_u32().await?;
        let mut rest = vec![0; len as usize - 4];
        from.read_exact(&mut rest).await?;
        counts.record(kind);
        to.write_u8(kind).await?;
        to.write_u32(len).await?;
        to.write_all(&rest).await?;
    }
}

/// Claim, complete and replay are one statement and one round trip each (once the
/// connection has prepared them, which sqlx caches per connection).
#[tokio::test]
async fn one_statement_per_operation() {
    let Some(url) = database_url() else { return };
    let options = PgConnectOptions::from_str(&url).expect("DATABASE_URL");
    let (port, wire) = wire_proxy((options.get_host().to_owned(), options.get_port())).await;
    // One connection, so every message the store sends goes through it; no liveness ping
    // on acquire, so only the store's own messages are counted.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(
            options
                .host("127.0.0.1")
                .port(port)
                .ssl_mode(PgSslMode::Disable),
        )
        .await
        .expect("connect through the proxy");
    let table = private_table("stmts");
    let store = PostgresStore::new(pool.clone())
        .table(&table)
        .sweep_interval(Duration::ZERO);
    store.migrate().await.expect("migrate");

    sql_scenarios::each_operation_once(&store, |what| {
        let (trips, _pings) = wire.take();
        if what == "warm-up" {
            assert!(
                trips.iter().any(|trip| trip.contains('P')),
                "the proxy must see statements being prepared: {trips:?}"
            );
        } else {
            // One statement in one round trip: Bind, Execute, Close (of the unnamed
            // portal), Sync; no Parse, since the statement is prepared already.
            assert_eq!(
                trips,
                ["BECS"],
                "{what} must be one statement in one round trip"
            );
        }
    })
    .await;

    PostgresStore::drop_table(&pool, &table).await;
}

/// A table made by the previous version (without `contested`) is upgraded by `migrate`,
/// and its in-flight rows keep working: a lapsed one is contested, then taken over.
#[tokio::test]
async fn migrate_upgrades_a_table_of_the_previous_version() {
    let Some(url) = database_url() else { return };
    let pool = pool::<PostgresStore>(&url).await;
    let table = private_table("upgrade");
    let old = format!(
        "CREATE TABLE \"{table}\" (key text PRIMARY KEY, token bytea, fingerprint bytea NOT NULL, \
         record bytea, expires_at timestamptz NOT NULL); \
         INSERT INTO \"{table}\" VALUES ('anon:old', '\\x00', '\\x{fp}', NULL, now() - interval '1 second')",
        fp = "01".repeat(32)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(old))
        .execute(&pool)
        .await
        .expect("an old table");
    let store = PostgresStore::new(pool.clone()).table(&table);
    store.migrate().await.expect("migrate upgrades it");
    let k = StoreKey::new(&Scope::anonymous(), "old");
    let lease = Duration::from_millis(200);
    let first = store.claim(&k, &fp(1), LeaseToken::new(), lease).await;
    assert!(matches!(first, Ok(Claim::InFlight { .. })), "{first:?}");
    tokio::time::sleep(Duration::from_millis(250)).await;
    acquire(&store, &k, lease).await;
    PostgresStore::drop_table(&pool, &table).await;
}

/// Two long table names that share their first 48 bytes each get their own expiry index
/// (PostgreSQL truncates identifiers to 63 bytes, and index names share the schema).
#[tokio::test]
async fn long_table_names_sharing_a_prefix_each_get_an_index() {
    let Some(url) = database_url() else { return };
    let pool = pool::<PostgresStore>(&url).await;
    // 48 bytes of shared prefix, then something different in each name.
    let prefix = format!(
        "tower_idempotency_long_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..25]
    );
    assert_eq!(prefix.len(), 48);
    let tables = [format!("{prefix}_first"), format!("{prefix}_second")];
    for table in &tables {
        PostgresStore::new(pool.clone())
            .table(table)
            .migrate()
            .await
            .expect("migrate");
    }
    for table in &tables {
        let indexed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_indexes WHERE tablename = $1 AND indexdef LIKE '%(expires_at)%'",
        )
        .bind(table)
        .fetch_one(&pool)
        .await
        .expect("read pg_indexes");
        assert_eq!(indexed, 1, "{table} has no expiry index");
    }
    for table in &tables {
        PostgresStore::drop_table(&pool, table).await;
    }
}

/// A store on `port` of 127.0.0.1 (a proxy in front of the server of `url`), on `table`.
async fn store_through(url: &str, port: u16, table: &str) -> PostgresStore {
    let options = PgConnectOptions::from_str(url).expect("DATABASE_URL");
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .test_before_acquire(false)
        .connect_with(
            options
                .host("127.0.0.1")
                .port(port)
                .ssl_mode(PgSslMode::Disable),
        )
        .await
        .expect("connect through the proxy");
    PostgresStore::new(pool)
        .table(table)
        .sweep_interval(Duration::ZERO)
}

/// Two instances on one database: the waiter on the second hears of the first's
/// completion, and of its release, through `LISTEN`/`NOTIFY`. Counted on the wire: its
/// statements are a mark and a claim at first, a claim per 500 ms recheck of the holder's
/// remaining lease, and a mark and a claim once woken, where polling (5 ms doubling to
/// 250 ms) makes 13 claims while the key is held for two seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_instance_is_woken_by_notify_not_by_polling() {
    let Some(url) = database_url() else { return };
    let options = PgConnectOptions::from_str(&url).expect("DATABASE_URL");
    let (port, wire) = wire_proxy((options.get_host().to_owned(), options.get_port())).await;
    let table = private_table("wake");
    let first = PostgresStore::new(pool::<PostgresStore>(&url).await)
        .table(&table)
        .sweep_interval(Duration::ZERO);
    first.migrate().await.expect("migrate");
    let second = store_through(&url, port, &table).await;
    let lease = Duration::from_secs(30);

    for (what, k) in [
        ("completion", "woken-by-completion"),
        ("release", "woken-by-release"),
    ] {
        let k = StoreKey::new(&Scope::anonymous(), k);
        let token = acquire(&first, &k, lease).await;
        wire.take();
        let waiting = waiter(&second, &k, Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(2)).await;
        if what == "completion" {
            first
                .complete(&k, token, sql_scenarios::record(b"done"), lease)
                .await
                .expect("complete");
            assert!(matches!(waiting.await.unwrap(), Claim::Completed(_)));
        } else {
            first.release(&k, token).await.expect("release");
            assert!(matches!(waiting.await.unwrap(), Claim::Acquired(_)));
        }
        let (trips, _) = wire.take();
        let statements = trips.iter().filter(|t| t.contains('E')).count();
        assert!(
            statements <= 9,
            "woken by the {what}, not polling: {statements} statements ({trips:?})"
        );
    }
    PostgresStore::drop_table(first.pool(), &table).await;
}

/// The listener's connection killed on the server while a waiter waits: the listener
/// connects again and listens, every waiter looks again, and the completion still reaches
/// the waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_loses_no_waiter() {
    let Some(url) = database_url() else { return };
    let table = private_table("wakekill");
    let admin = pool::<PostgresStore>(&url).await;
    let first = PostgresStore::new(admin.clone())
        .table(&table)
        .sweep_interval(Duration::ZERO);
    first.migrate().await.expect("migrate");
    let second = PostgresStore::new(pool::<PostgresStore>(&url).await)
        .table(&table)
        .sweep_interval(Duration::ZERO);
    let channel = second.notify_channel().expect("a valid table").to_owned();
    let listeners = |pool: PgPool, channel: String| async move {
        sqlx::query_scalar::<_, i32>(
            // sqlx listens with `LISTEN "…"` at first and `LISTEN "…";` after a reconnection.
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN \"' || $1 || '\"%'",
        )
        .bind(channel)
        .fetch_all(&pool)
        .await
        .expect("pg_stat_activity")
    };
    let lease = Duration::from_secs(30);
    let k = StoreKey::new(&Scope::anonymous(), "killed-listener");
    let token = acquire(&first, &k, lease).await;
    let waiting = waiter(&second, &k, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = listeners(admin.clone(), channel.clone()).await;
    assert_eq!(before.len(), 1, "one listener for the waiting instance");
    let () = sqlx::query_scalar("SELECT pg_terminate_backend($1)::int")
        .bind(before[0])
        .fetch_one(&admin)
        .await
        .map(|_: i32| ())
        .expect("terminate the listener");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = listeners(admin.clone(), channel.clone()).await;
        if now.len() == 1 && now != before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener came back: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first
        .complete(&k, token, sql_scenarios::record(b"after the kill"), lease)
        .await
        .expect("complete");
    let Claim::Completed(stored) = waiting.await.unwrap() else {
        panic!("the waiter still gets the answer");
    };
    assert_eq!(stored.body(), &b"after the kill"[..]);
    PostgresStore::drop_table(first.pool(), &table).await;
}

/// Through the layer, on PostgreSQL: a first request is two round trips, three with a
/// commit point, and a replay one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_layer_round_trips_are_two_three_with_a_commit_point_and_one_per_replay() {
    let Some(url) = database_url() else { return };
    let options = PgConnectOptions::from_str(&url).expect("DATABASE_URL");
    let (port, wire) = wire_proxy((options.get_host().to_owned(), options.get_port())).await;
    let table = private_table("layertrips");
    let store = store_through(&url, port, &table).await;
    store.migrate().await.expect("migrate");
    crate::round_trips::layer_round_trips(store.clone(), async || {
        let (trips, _pings) = wire.take();
        trips.iter().filter(|trip| trip.contains('E')).count()
    })
    .await;
    PostgresStore::drop_table(store.pool(), &table).await;
}

/// A release that waits on the row lock of an application's transaction which declares the
/// commit point (`commit_in`) and then commits: the release answers `Committed`, as it does
/// once the commit is in, and ends the lease, so that retries get the outcome at once. (Before,
/// both parts of the release judged the row by the snapshot the statement started with, took
/// nothing, and the release answered `LeaseLost` while the lease ran on.)
#[tokio::test]
async fn a_release_waiting_on_a_commit_in_transaction_answers_committed() {
    let Some(url) = database_url() else { return };
    let pool = pool::<PostgresStore>(&url).await;
    let table = private_table("relcommit");
    let store = PostgresStore::new(pool.clone()).table(&table);
    store.migrate().await.expect("migrate");
    let k = StoreKey::new(&Scope::anonymous(), "in-tx");
    let token = acquire(&store, &k, Duration::from_secs(30)).await;
    // The application's transaction: the commit point, as `commit_in` writes it.
    let mut tx = pool.begin().await.expect("a transaction");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE \"{table}\" SET committed = true, lease_until = expires_at \
         WHERE key = $1 AND token = $2"
    )))
    .bind(k.as_str())
    .bind(token.to_bytes().to_vec())
    .execute(&mut *tx)
    .await
    .expect("the commit point");
    let releasing = {
        let (store, k) = (store.clone(), k.clone());
        tokio::spawn(async move { store.release(&k, token).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.commit().await.expect("the application commits");
    let released = releasing.await.unwrap();
    assert!(
        matches!(released, Err(StoreError::Committed)),
        "{released:?}"
    );
    // The lease ended: a retry finds the key's outcome unknown at once.
    let retry = store
        .claim(&k, &fp(1), LeaseToken::new(), Duration::from_secs(30))
        .await;
    assert!(
        matches!(retry, Ok(Claim::OutcomeUnknown { .. })),
        "{retry:?}"
    );
    PostgresStore::drop_table(&pool, &table).await;
}
