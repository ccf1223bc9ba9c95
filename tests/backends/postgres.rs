//! The PostgreSQL store against a real server.
//!
//! Every test reads `DATABASE_URL` (for example `postgres://postgres@127.0.0.1:5432/test`);
//! when it is not set the test prints "skipped: DATABASE_URL not set" and passes.
#![cfg(feature = "postgres")]

use crate::common;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower_idempotency::sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use tower_idempotency::sqlx::{self, PgPool};
use tower_idempotency::store::{Claim, LeaseToken, Record, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyStore, PostgresStore, Scope, StoreError};

/// The table the conformance suite shares across runs (its keys are fresh random ones).
#[cfg(feature = "conformance")]
const CONFORMANCE_TABLE: &str = "tower_idempotency_conformance";

fn database_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("skipped: DATABASE_URL not set");
            None
        }
    }
}

#[cfg(feature = "conformance")]
async fn make_store() -> Option<PostgresStore> {
    let url = database_url()?;
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .expect("connect to DATABASE_URL");
    let store = PostgresStore::new(pool).table(CONFORMANCE_TABLE);
    store.migrate().await.expect("migrate");
    Some(store)
}

#[cfg(feature = "conformance")]
tower_idempotency::store_conformance_tests!(postgres_store, make_store);

/// A table name no other test (or run) uses.
fn private_table(what: &str) -> String {
    format!("tower_idempotency_{what}_{}", uuid::Uuid::new_v4().simple())
}

async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .connect(url)
        .await
        .expect("connect to DATABASE_URL")
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

fn key(k: &str) -> StoreKey {
    StoreKey::new(&Scope::anonymous(), k)
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

fn record(body: &'static [u8]) -> Record {
    Record::new(
        StatusCode::OK,
        HeaderMap::new(),
        Bytes::from_static(body),
        None,
    )
}

async fn acquire(store: &PostgresStore, k: &StoreKey, lease: Duration) -> LeaseToken {
    match store
        .claim(
            k,
            &fp(1),
            tower_idempotency::store::LeaseToken::new(),
            lease,
        )
        .await
    {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("expected to acquire {k}, got {other:?}"),
    }
}

/// Two instances (two pools, two stores, two layered services) on one table: 64 concurrent
/// requests with one key run the handler once, and every answer is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_instances_run_once() {
    let Some(url) = database_url() else { return };
    let table = private_table("fleet");
    let store_a = PostgresStore::new(pool(&url).await).table(&table);
    let store_b = PostgresStore::new(pool(&url).await).table(&table);
    store_a.migrate().await.expect("migrate");
    store_b.migrate().await.expect("migrate twice is harmless");
    common::two_instances_run_once(store_a.clone(), store_b).await;
    drop_table(store_a.pool(), &table).await;
}

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

    // Warm up: prepare every statement once on the connection.
    let warm = key("warm-up");
    let token = acquire(&store, &warm, Duration::from_secs(30)).await;
    store
        .extend(&warm, token, Duration::from_secs(30))
        .await
        .unwrap();
    store
        .complete(&warm, token, record(b"w"), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(
        store
            .claim(
                &warm,
                &fp(1),
                tower_idempotency::store::LeaseToken::new(),
                Duration::from_secs(30)
            )
            .await,
        Ok(Claim::Completed(_))
    ));
    let other = key("warm-up-2");
    let token = acquire(&store, &other, Duration::from_secs(30)).await;
    store.release(&other, token).await.unwrap();
    let (warm_up, _) = wire.take();
    assert!(
        warm_up.iter().any(|trip| trip.contains('P')),
        "the proxy must see statements being prepared: {warm_up:?}"
    );

    // One statement in one round trip: Bind, Execute, Close (of the unnamed portal), Sync;
    // no Parse, since the statement is prepared already.
    let one_statement = |what: &str, (trips, _pings): (Vec<String>, usize)| {
        assert_eq!(
            trips,
            ["BECS"],
            "{what} must be one statement in one round trip"
        );
    };

    let k = key(&uuid::Uuid::new_v4().to_string());
    let token = acquire(&store, &k, Duration::from_secs(30)).await;
    one_statement("claim", wire.take());

    assert!(matches!(
        store
            .claim(
                &k,
                &fp(1),
                tower_idempotency::store::LeaseToken::new(),
                Duration::from_secs(30)
            )
            .await,
        Ok(Claim::InFlight { .. })
    ));
    one_statement("claim of a key in flight", wire.take());

    store
        .extend(&k, token, Duration::from_secs(30))
        .await
        .unwrap();
    one_statement("extend", wire.take());

    store
        .complete(&k, token, record(b"done"), Duration::from_secs(60))
        .await
        .unwrap();
    one_statement("complete", wire.take());

    match store
        .claim(
            &k,
            &fp(1),
            tower_idempotency::store::LeaseToken::new(),
            Duration::from_secs(30),
        )
        .await
    {
        Ok(Claim::Completed(r)) => assert_eq!(r.body(), &Bytes::from_static(b"done")),
        other => panic!("expected the record, got {other:?}"),
    }
    one_statement("replay", wire.take());

    let k2 = key(&uuid::Uuid::new_v4().to_string());
    let token = acquire(&store, &k2, Duration::from_secs(30)).await;
    wire.take();
    store.release(&k2, token).await.unwrap();
    one_statement("release", wire.take());

    drop_table(&pool, &table).await;
}

/// `sweep` deletes expired records, in batches, and leaves live ones, and lapsed claims
/// too: their owner may still store its outcome for `ORPHAN_RETENTION`.
#[tokio::test]
async fn sweep_deletes_expired_rows_only() {
    let Some(url) = database_url() else { return };
    let pool = pool(&url).await;
    let table = private_table("sweep");
    let store = PostgresStore::new(pool.clone())
        .table(&table)
        .sweep_batch(2)
        .sweep_interval(Duration::ZERO);
    store.migrate().await.expect("migrate");
    let short = Duration::from_millis(200);
    let long = Duration::from_secs(600);

    // Expiring: three claims with a short lease, two records with a short TTL.
    for i in 0..3 {
        acquire(&store, &key(&format!("lease-{i}")), short).await;
    }
    for i in 0..2 {
        let k = key(&format!("ttl-{i}"));
        let token = acquire(&store, &k, long).await;
        store
            .complete(&k, token, record(b"old"), short)
            .await
            .unwrap();
    }
    // Live: a claim and a record.
    acquire(&store, &key("live-claim"), long).await;
    let live = key("live-record");
    let token = acquire(&store, &live, long).await;
    store
        .complete(&live, token, record(b"kept"), long)
        .await
        .unwrap();

    assert_eq!(count_rows(&pool, &table).await, 7);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        store.sweep().await.expect("sweep"),
        2,
        "two records expired"
    );
    assert_eq!(count_rows(&pool, &table).await, 5);
    // The lapsed claims are kept for their owners: a new claim contests them.
    for i in 0..3 {
        let k = key(&format!("lease-{i}"));
        let claim = store
            .claim(
                &k,
                &fp(1),
                tower_idempotency::store::LeaseToken::new(),
                short,
            )
            .await;
        assert!(matches!(claim, Ok(Claim::InFlight { .. })), "{claim:?}");
    }
    // Past the retention, a lapsed claim is swept (aged here by moving its deadline back).
    tower_idempotency::sqlx::query(tower_idempotency::sqlx::AssertSqlSafe(format!(
        "UPDATE \"{table}\" SET expires_at = now() - interval '2 hours' WHERE key LIKE '%lease-%'"
    )))
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        store.sweep().await.expect("sweep"),
        3,
        "three old claims swept"
    );
    assert_eq!(count_rows(&pool, &table).await, 2);
    assert_eq!(
        store.sweep().await.expect("sweep"),
        0,
        "nothing left to sweep"
    );

    assert!(matches!(
        store
            .claim(
                &key("live-claim"),
                &fp(1),
                tower_idempotency::store::LeaseToken::new(),
                long
            )
            .await,
        Ok(Claim::InFlight { .. })
    ));
    match store
        .claim(
            &live,
            &fp(1),
            tower_idempotency::store::LeaseToken::new(),
            long,
        )
        .await
    {
        Ok(Claim::Completed(r)) => assert_eq!(r.body(), &Bytes::from_static(b"kept")),
        other => panic!("the live record must stay, got {other:?}"),
    }
    drop_table(&pool, &table).await;
}

/// The background task sweeps by itself, and stops when the store is dropped.
#[tokio::test]
async fn background_sweeper_runs() {
    let Some(url) = database_url() else { return };
    let pool = pool(&url).await;
    let table = private_table("sweeper");
    let store = PostgresStore::new(pool.clone())
        .table(&table)
        .sweep_interval(Duration::from_millis(100));
    store.migrate().await.expect("migrate");
    let a = key("a");
    let token = acquire(&store, &a, Duration::from_secs(600)).await;
    store
        .complete(&a, token, record(b"short"), Duration::from_millis(50))
        .await
        .unwrap();
    acquire(&store, &key("b"), Duration::from_secs(600)).await;
    let mut rows = 2;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        rows = count_rows(&pool, &table).await;
        if rows == 1 {
            break;
        }
    }
    assert_eq!(
        rows, 1,
        "the sweeper must delete the expired record, and only it"
    );
    drop(store);
    drop_table(&pool, &table).await;
}

/// A table made by the previous version (without `contested`) is upgraded by `migrate`,
/// and its in-flight rows keep working: a lapsed one is contested, then taken over.
#[tokio::test]
async fn migrate_upgrades_a_table_of_the_previous_version() {
    let Some(url) = database_url() else { return };
    let pool = pool(&url).await;
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
    let first = store
        .claim(
            &k,
            &fp(1),
            tower_idempotency::store::LeaseToken::new(),
            lease,
        )
        .await;
    assert!(matches!(first, Ok(Claim::InFlight { .. })), "{first:?}");
    tokio::time::sleep(Duration::from_millis(250)).await;
    acquire(&store, &k, lease).await;
    drop_table(&pool, &table).await;
}

/// Two long table names that share their first 48 bytes each get their own expiry index
/// (PostgreSQL truncates identifiers to 63 bytes, and index names share the schema).
#[tokio::test]
async fn long_table_names_sharing_a_prefix_each_get_an_index() {
    let Some(url) = database_url() else { return };
    let pool = pool(&url).await;
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
        drop_table(&pool, table).await;
    }
}

/// A bad table name fails every operation, without a panic and without touching the
/// database.
#[tokio::test]
async fn invalid_table_name_is_an_error() {
    let Some(url) = database_url() else { return };
    let store = PostgresStore::new(pool(&url).await).table("records; DROP TABLE x");
    assert!(format!("{store:?}").contains("table_valid: false"));
    for result in [
        store.migrate().await,
        store.sweep().await.map(drop),
        store
            .claim(
                &key("k"),
                &fp(1),
                tower_idempotency::store::LeaseToken::new(),
                Duration::from_secs(1),
            )
            .await
            .map(drop),
    ] {
        match result {
            Err(StoreError::Backend(err)) => {
                assert!(
                    err.to_string().contains("invalid idempotency table name"),
                    "{err}"
                )
            }
            other => panic!("expected an invalid table name error, got {other:?}"),
        }
    }
}

/// A record that is not a valid encoding is a decode error, not a crash.
#[tokio::test]
async fn damaged_record_is_a_decode_error() {
    let Some(url) = database_url() else { return };
    let pool = pool(&url).await;
    let table = private_table("damaged");
    let store = PostgresStore::new(pool.clone())
        .table(&table)
        .sweep_interval(Duration::ZERO);
    store.migrate().await.expect("migrate");
    let k = key("k");
    let token = acquire(&store, &k, Duration::from_secs(30)).await;
    store
        .complete(&k, token, record(b"x"), Duration::from_secs(60))
        .await
        .unwrap();
    let sql = format!("UPDATE \"{table}\" SET record = '\\x0001'::bytea");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&pool)
        .await
        .unwrap();
    assert!(matches!(
        store
            .claim(
                &k,
                &fp(1),
                tower_idempotency::store::LeaseToken::new(),
                Duration::from_secs(30)
            )
            .await,
        Err(StoreError::Decode(_))
    ));
    drop_table(&pool, &table).await;
}

/// A contest gives the owner at least 1 ms (`takeover_grace`), however short its lease.
#[tokio::test]
async fn a_contest_gives_the_owner_at_least_a_millisecond() {
    let Some(url) = database_url() else { return };
    let pool = pool(&url).await;
    let table = private_table("grace");
    let store = PostgresStore::new(pool.clone())
        .table(&table)
        .sweep_interval(Duration::ZERO);
    store.migrate().await.expect("migrate");
    let k = key("grace");
    acquire(&store, &k, Duration::from_micros(100)).await;
    tokio::time::sleep(Duration::from_millis(3)).await;
    match store
        .claim(
            &k,
            &fp(2),
            tower_idempotency::store::LeaseToken::new(),
            Duration::from_micros(100),
        )
        .await
    {
        Ok(Claim::InFlight {
            lease_remaining: Some(left),
            ..
        }) => assert!(left > Duration::from_micros(500), "{left:?}"),
        other => panic!("the first claim after the lapse must contest, got {other:?}"),
    }
    drop_table(&pool, &table).await;
}
