//! The MySQL store against a real server (MariaDB on the machines these tests run on).
//!
//! Every test reads `MYSQL_URL` (for example `mysql://root@127.0.0.1:3306/test`); when it
//! is not set the test prints "skipped: MYSQL_URL not set" and passes.
#![cfg(feature = "mysql")]

use crate::common;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower_idempotency::sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlSslMode};
use tower_idempotency::sqlx::{self, MySqlPool};
use tower_idempotency::store::{Claim, KeyState, LeaseToken, Record, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyStore, MySqlStore, Scope, StoreError};

/// The table the conformance suite shares across runs (its keys are fresh random ones).
#[cfg(feature = "conformance")]
const CONFORMANCE_TABLE: &str = "tower_idempotency_conformance";

fn mysql_url() -> Option<String> {
    match std::env::var("MYSQL_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("skipped: MYSQL_URL not set");
            None
        }
    }
}

#[cfg(feature = "conformance")]
async fn make_store() -> Option<MySqlStore> {
    let url = mysql_url()?;
    let pool = MySqlPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .expect("connect to MYSQL_URL");
    let store = MySqlStore::new(pool).table(CONFORMANCE_TABLE);
    store.migrate().await.expect("migrate");
    Some(store)
}

#[cfg(feature = "conformance")]
tower_idempotency::store_conformance_tests!(mysql_store, make_store);

/// The same suite on sessions that evaluate an `UPDATE`'s assignments simultaneously
/// (MariaDB's `SIMULTANEOUS_ASSIGNMENT`, the SQL standard's way) rather than left to right:
/// every statement must mean the same under both.
#[cfg(feature = "conformance")]
async fn make_simultaneous_store() -> Option<MySqlStore> {
    use tower_idempotency::sqlx::Executor;
    let url = mysql_url()?;
    let pool = MySqlPoolOptions::new()
        .max_connections(16)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(
                    "SET SESSION sql_mode = CONCAT(@@sql_mode, ',SIMULTANEOUS_ASSIGNMENT')",
                )
                .await?;
                Ok(())
            })
        })
        .connect(&url)
        .await
        .expect("connect to MYSQL_URL");
    let simultaneous: String = sqlx::query_scalar("SELECT @@SESSION.sql_mode")
        .fetch_one(&pool)
        .await
        .expect("read the SQL mode");
    assert!(
        simultaneous.contains("SIMULTANEOUS_ASSIGNMENT"),
        "{simultaneous}"
    );
    let store = MySqlStore::new(pool).table(CONFORMANCE_TABLE);
    store.migrate().await.expect("migrate");
    Some(store)
}

#[cfg(feature = "conformance")]
tower_idempotency::store_conformance_tests!(mysql_simultaneous_assignment, make_simultaneous_store);

/// A table name no other test (or run) uses, short enough for its procedures' names.
fn private_table(what: &str) -> String {
    format!("ti_{what}_{}", uuid::Uuid::new_v4().simple())
}

async fn pool(url: &str) -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(8)
        .connect(url)
        .await
        .expect("connect to MYSQL_URL")
}

/// Drops a store's table and its procedures (with the statements the store gives).
async fn drop_store(pool: &MySqlPool, table: &str) {
    let store = MySqlStore::new(pool.clone()).table(table);
    for sql in store.drop_sql().expect("a valid name") {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(pool).await;
    }
}

async fn count_rows(pool: &MySqlPool, table: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM `{table}`");
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

async fn acquire(store: &MySqlStore, k: &StoreKey, lease: Duration) -> LeaseToken {
    match store.claim(k, &fp(1), LeaseToken::new(), lease).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("expected to acquire {k}, got {other:?}"),
    }
}

/// A store on a table of its own, without a background sweep.
async fn private_store(url: &str, what: &str) -> (MySqlPool, MySqlStore, String) {
    let pool = pool(url).await;
    let table = private_table(what);
    let store = MySqlStore::new(pool.clone())
        .table(&table)
        .sweep_interval(Duration::ZERO);
    store.migrate().await.expect("migrate");
    (pool, store, table)
}

/// Two instances (two pools, two stores, two layered services) on one table: 64 concurrent
/// requests with one key run the handler once, and every answer is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_instances_run_once() {
    let Some(url) = mysql_url() else { return };
    let table = private_table("fleet");
    let store_a = MySqlStore::new(pool(&url).await).table(&table);
    let store_b = MySqlStore::new(pool(&url).await).table(&table);
    store_a.migrate().await.expect("migrate");
    store_b.migrate().await.expect("migrate twice is harmless");
    common::two_instances_run_once(store_a.clone(), store_b).await;
    drop_store(store_a.pool(), &table).await;
}

/// Many tasks on two pools claim many keys at once, each key from several tasks: exactly
/// one claim per key wins, and InnoDB's deadlock breaking (if it happens) never surfaces
/// as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_on_many_keys_each_have_one_winner() {
    let Some(url) = mysql_url() else { return };
    let (pool_a, store_a, table) = private_store(&url, "race").await;
    let store_b = MySqlStore::new(pool(&url).await)
        .table(&table)
        .sweep_interval(Duration::ZERO);
    let keys: Vec<StoreKey> = (0..40).map(|i| key(&format!("race-{i}"))).collect();
    let mut tasks = Vec::new();
    for round in 0..6 {
        for k in &keys {
            let store = if round % 2 == 0 {
                store_a.clone()
            } else {
                store_b.clone()
            };
            let k = k.clone();
            tasks.push(tokio::spawn(async move {
                let claim = store
                    .claim(&k, &fp(1), LeaseToken::new(), Duration::from_secs(30))
                    .await;
                (k, claim)
            }));
        }
    }
    let mut winners = std::collections::HashMap::<String, usize>::new();
    for task in tasks {
        let (k, claim) = task.await.expect("task");
        match claim {
            Ok(Claim::Acquired(_)) => *winners.entry(k.to_string()).or_default() += 1,
            Ok(Claim::InFlight { .. }) => {}
            other => panic!("{k}: unexpected {other:?}"),
        }
    }
    assert_eq!(winners.len(), keys.len(), "every key has a winner");
    assert!(winners.values().all(|n| *n == 1), "{winners:?}");
    drop_store(&pool_a, &table).await;
}

/// Counts the commands a MySQL client sends through it. After the handshake every command
/// is a packet with sequence number 0 whose first byte says what it is (`0x17` executes a
/// prepared statement, `0x16` prepares one, `0x03` is a text query, `0x0e` a ping); the
/// client waits for the server after each, except `0x19` (closing a statement), which has
/// no answer. So the commands other than `0x19` are the round trips.
///
/// sqlx's pool also pings a connection when it goes back to the pool (in a background task,
/// after the caller has its answer, whatever the store does): pings are counted apart.
#[derive(Default)]
struct CommandCounter {
    commands: std::sync::Mutex<Vec<u8>>,
}

impl CommandCounter {
    /// The commands since the last call, in order, without statement closes and pings.
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.commands.lock().unwrap())
            .into_iter()
            .filter(|c| *c != 0x19 && *c != 0x0e)
            .collect()
    }
}

async fn command_proxy(upstream: (String, u16)) -> (u16, Arc<CommandCounter>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let port = listener.local_addr().expect("proxy address").port();
    let counter = Arc::new(CommandCounter::default());
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
                let _ = forward_client(&mut client_rd, &mut server_wr, &counts).await;
            });
        }
    });
    (port, counter)
}

async fn forward_client(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    counts: &CommandCounter,
) -> std::io::Result<()> {
    loop {
        let mut header = [0u8; 4];
        from.read_exact(&mut header).await?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
        let mut payload = vec![0; len];
        from.read_exact(&mut payload).await?;
        // Sequence 0 starts a command; the handshake's packets have later numbers.
        if header[3] == 0 && !payload.is_empty() {
            counts.commands.lock().unwrap().push(payload[0]);
        }
        to.write_all(&header).await?;
        to.write_all(&payload).await?;
    }
}

/// Claim, replay, extend, complete and release are one command and one round trip each
/// (once the connection has prepared them, which sqlx caches per connection).
#[tokio::test]
async fn one_round_trip_per_operation() {
    let Some(url) = mysql_url() else { return };
    let options = MySqlConnectOptions::from_str(&url).expect("MYSQL_URL");
    let (port, wire) = command_proxy((options.get_host().to_owned(), options.get_port())).await;
    // One connection, so every command the store sends goes through it; no liveness ping
    // on acquire, so only the store's own commands are counted.
    let pool = MySqlPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(
            options
                .host("127.0.0.1")
                .port(port)
                .ssl_mode(MySqlSslMode::Disabled),
        )
        .await
        .expect("connect through the proxy");
    let table = private_table("trips");
    let store = MySqlStore::new(pool.clone())
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
            .claim(&warm, &fp(1), LeaseToken::new(), Duration::from_secs(30))
            .await,
        Ok(Claim::Completed(_))
    ));
    let other = key("warm-up-2");
    let token = acquire(&store, &other, Duration::from_secs(30)).await;
    store.release(&other, token).await.unwrap();
    assert!(
        wire.take().contains(&0x16),
        "the proxy must see statements being prepared"
    );

    let one_command = |what: &str, commands: Vec<u8>| {
        assert_eq!(
            commands,
            [0x17],
            "{what} must be one prepared statement in one round trip"
        );
    };
    let k = key(&uuid::Uuid::new_v4().to_string());
    let token = acquire(&store, &k, Duration::from_secs(30)).await;
    one_command("claim", wire.take());
    assert!(matches!(
        store
            .claim(&k, &fp(1), LeaseToken::new(), Duration::from_secs(30))
            .await,
        Ok(Claim::InFlight { .. })
    ));
    one_command("claim of a key in flight", wire.take());
    store
        .extend(&k, token, Duration::from_secs(30))
        .await
        .unwrap();
    one_command("extend", wire.take());
    store
        .complete(&k, token, record(b"done"), Duration::from_secs(60))
        .await
        .unwrap();
    one_command("complete", wire.take());
    match store
        .claim(&k, &fp(1), LeaseToken::new(), Duration::from_secs(30))
        .await
    {
        Ok(Claim::Completed(r)) => assert_eq!(r.body(), &Bytes::from_static(b"done")),
        other => panic!("expected the record, got {other:?}"),
    }
    one_command("replay", wire.take());
    let k2 = key(&uuid::Uuid::new_v4().to_string());
    let token = acquire(&store, &k2, Duration::from_secs(30)).await;
    wire.take();
    store.release(&k2, token).await.unwrap();
    one_command("release", wire.take());

    drop_store(&pool, &table).await;
}

/// Keys are compared byte for byte: keys that a case- or accent-insensitive collation
/// would call equal are two keys, each with its own answer.
#[tokio::test]
async fn keys_differing_in_case_or_accents_are_distinct() {
    let Some(url) = mysql_url() else { return };
    let (pool, store, table) = private_store(&url, "case").await;
    let lease = Duration::from_secs(30);
    for (i, k) in ["order-ABC", "order-abc", "order-abç", "order-abc "]
        .into_iter()
        .enumerate()
    {
        let k = key(k);
        let token = match store
            .claim(&k, &fp(i as u8), LeaseToken::new(), lease)
            .await
        {
            Ok(Claim::Acquired(token)) => token,
            other => panic!("{k} must be a key of its own, got {other:?}"),
        };
        let body = Bytes::from(format!("answer {i}"));
        let record = Record::new(StatusCode::OK, HeaderMap::new(), body, None);
        store.complete(&k, token, record, lease).await.unwrap();
    }
    assert_eq!(count_rows(&pool, &table).await, 4);
    match store
        .claim(&key("order-abc"), &fp(1), LeaseToken::new(), lease)
        .await
    {
        Ok(Claim::Completed(r)) => assert_eq!(r.body(), &Bytes::from_static(b"answer 1")),
        other => panic!("expected the second answer, got {other:?}"),
    }
    drop_store(&pool, &table).await;
}

/// The stored answer's status and headers are readable in SQL, as JSON.
#[tokio::test]
async fn status_and_headers_are_readable_in_sql() {
    let Some(url) = mysql_url() else { return };
    let (pool, store, table) = private_store(&url, "readable").await;
    let k = key("readable");
    let token = acquire(&store, &k, Duration::from_secs(30)).await;
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.append("x-note", HeaderValue::from_static("a \"quoted\" \\ value"));
    let record = Record::new(
        StatusCode::CREATED,
        headers,
        Bytes::from_static(b"{}"),
        None,
    );
    store
        .complete(&k, token, record, Duration::from_secs(60))
        .await
        .unwrap();
    let (status, content_type, note): (Option<i16>, Option<String>, Option<String>) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT status, JSON_UNQUOTE(JSON_EXTRACT(headers, '$[0][1]')), \
             JSON_UNQUOTE(JSON_EXTRACT(headers, '$[1][1]')) FROM `{table}` WHERE `key` = ?"
        )))
        .bind(k.as_str())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, Some(201));
    assert_eq!(content_type.as_deref(), Some("application/json"));
    assert_eq!(note.as_deref(), Some("a \"quoted\" \\ value"));
    drop_store(&pool, &table).await;
}

/// `sweep` deletes expired records, in batches, and leaves live ones, and lapsed claims
/// too: their owner may still store its outcome for `ORPHAN_RETENTION`.
#[tokio::test]
async fn sweep_deletes_expired_rows_only() {
    let Some(url) = mysql_url() else { return };
    let pool = pool(&url).await;
    let table = private_table("sweep");
    let store = MySqlStore::new(pool.clone())
        .table(&table)
        .sweep_batch(2)
        .sweep_interval(Duration::ZERO);
    store.migrate().await.expect("migrate");
    let short = Duration::from_millis(200);
    let long = Duration::from_secs(600);

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
    for i in 0..3 {
        let k = key(&format!("lease-{i}"));
        let claim = store.claim(&k, &fp(1), LeaseToken::new(), short).await;
        assert!(matches!(claim, Ok(Claim::InFlight { .. })), "{claim:?}");
    }
    // Past the retention, a lapsed claim is swept (aged here by moving its deadline back).
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE `{table}` SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 2 HOUR \
         WHERE `key` LIKE '%lease-%'"
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
            .claim(&key("live-claim"), &fp(1), LeaseToken::new(), long)
            .await,
        Ok(Claim::InFlight { .. })
    ));
    match store.claim(&live, &fp(1), LeaseToken::new(), long).await {
        Ok(Claim::Completed(r)) => assert_eq!(r.body(), &Bytes::from_static(b"kept")),
        other => panic!("the live record must stay, got {other:?}"),
    }
    drop_store(&pool, &table).await;
}

/// The background task sweeps by itself.
#[tokio::test]
async fn background_sweeper_runs() {
    let Some(url) = mysql_url() else { return };
    let pool = pool(&url).await;
    let table = private_table("sweeper");
    let store = MySqlStore::new(pool.clone())
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
    drop_store(&pool, &table).await;
}

/// Several instances migrating at once all succeed, and the store works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_are_safe() {
    let Some(url) = mysql_url() else { return };
    let table = private_table("migrate");
    let pool = pool(&url).await;
    let migrations: Vec<_> = (0..6)
        .map(|_| {
            let store = MySqlStore::new(pool.clone()).table(&table);
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    for migration in migrations {
        migration.await.expect("task").expect("migrate");
    }
    let store = MySqlStore::new(pool.clone())
        .table(&table)
        .sweep_interval(Duration::ZERO);
    acquire(&store, &key("after"), Duration::from_secs(5)).await;
    // The migration's SQL mode stayed on its own connection: the pool's is unchanged.
    let mode: String = sqlx::query_scalar("SELECT @@SESSION.sql_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(mode.contains("PIPES_AS_CONCAT"), "{mode}");
    drop_store(&pool, &table).await;
}

/// A bad table name fails every operation, without a panic and without touching the
/// database.
#[tokio::test]
async fn invalid_table_name_is_an_error() {
    let Some(url) = mysql_url() else { return };
    let store = MySqlStore::new(pool(&url).await).table("records`; DROP TABLE x");
    assert!(format!("{store:?}").contains("table_valid: false"));
    assert!(store.migration_sql().is_err());
    for result in [
        store.migrate().await,
        store.sweep().await.map(drop),
        store
            .claim(&key("k"), &fp(1), LeaseToken::new(), Duration::from_secs(1))
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

/// A key longer than the table holds is refused before it reaches the server, never cut
/// short (two long keys sharing a prefix would share a row).
#[tokio::test]
async fn a_key_too_long_for_the_table_is_refused() {
    let Some(url) = mysql_url() else { return };
    let (pool, store, table) = private_store(&url, "long").await;
    let long = key(&"k".repeat(4000));
    match store
        .claim(&long, &fp(1), LeaseToken::new(), Duration::from_secs(5))
        .await
    {
        Err(StoreError::Backend(err)) => assert!(err.to_string().contains("max_key_len"), "{err}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(count_rows(&pool, &table).await, 0);
    drop_store(&pool, &table).await;
}

/// A record that is not a valid encoding is a decode error, not a crash.
#[tokio::test]
async fn damaged_record_is_a_decode_error() {
    let Some(url) = mysql_url() else { return };
    let (pool, store, table) = private_store(&url, "damaged").await;
    let k = key("k");
    let token = acquire(&store, &k, Duration::from_secs(30)).await;
    store
        .complete(&k, token, record(b"x"), Duration::from_secs(60))
        .await
        .unwrap();
    let sql = format!("UPDATE `{table}` SET record = X'0001'");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&pool)
        .await
        .unwrap();
    assert!(matches!(
        store
            .claim(&k, &fp(1), LeaseToken::new(), Duration::from_secs(30))
            .await,
        Err(StoreError::Decode(_))
    ));
    assert!(matches!(
        store.inspect(&k).await,
        Err(StoreError::Decode(_))
    ));
    assert!(store.purge(&k).await.unwrap());
    assert!(matches!(store.inspect(&k).await, Ok(KeyState::Free)));
    drop_store(&pool, &table).await;
}

/// A lapsed claim is contested once before any claim takes it over, however short the
/// lease: the procedure judges every step by one clock reading, so the grace it gives the
/// owner cannot run out between two of its statements.
#[tokio::test]
async fn a_lapsed_claim_is_contested_before_it_is_taken_over() {
    let Some(url) = mysql_url() else { return };
    let (pool, store, table) = private_store(&url, "grace").await;
    for round in 0..20 {
        let k = key(&format!("grace-{round}"));
        acquire(&store, &k, Duration::from_micros(200)).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        let contest = store
            .claim(&k, &fp(2), LeaseToken::new(), Duration::from_micros(200))
            .await;
        match contest {
            // The grace is at least 1 ms (`takeover_grace`), whatever the lease.
            Ok(Claim::InFlight {
                lease_remaining: Some(left),
                ..
            }) => assert!(left > Duration::from_micros(500), "round {round}: {left:?}"),
            other => {
                panic!("round {round}: the first claim after the lapse must contest, got {other:?}")
            }
        }
    }
    drop_store(&pool, &table).await;
}

/// Two tables whose names differ only in case are two stores (table names are
/// case-sensitive on Linux, routine names never are): each has procedures of its own.
#[tokio::test]
async fn tables_differing_only_in_case_are_two_stores() {
    let Some(url) = mysql_url() else { return };
    let pool = pool(&url).await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let names = [format!("ti_Case_{id}"), format!("ti_case_{id}")];
    let stores: Vec<MySqlStore> = names
        .iter()
        .map(|name| {
            MySqlStore::new(pool.clone())
                .table(name)
                .sweep_interval(Duration::ZERO)
        })
        .collect();
    for store in &stores {
        store.migrate().await.expect("migrate");
    }
    for (i, store) in stores.iter().enumerate() {
        let k = key("same-key");
        let token = acquire(store, &k, Duration::from_secs(30)).await;
        store
            .complete(
                &k,
                token,
                record(if i == 0 { b"upper" } else { b"lower" }),
                Duration::from_secs(60),
            )
            .await
            .unwrap_or_else(|err| panic!("{}: {err:?}", names[i]));
    }
    for (i, store) in stores.iter().enumerate() {
        match store
            .claim(
                &key("same-key"),
                &fp(1),
                LeaseToken::new(),
                Duration::from_secs(30),
            )
            .await
        {
            Ok(Claim::Completed(r)) => {
                assert_eq!(
                    r.body(),
                    &Bytes::from_static(if i == 0 { b"upper" } else { b"lower" })
                )
            }
            other => panic!("{}: {other:?}", names[i]),
        }
    }
    for store in &stores {
        for sql in store.drop_sql().expect("a valid name") {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
        }
    }
}
