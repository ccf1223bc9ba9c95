//! What the PostgreSQL and MySQL stores share: the helpers their tests use, and the
//! scenarios both must pass, written once over [`SqlStore`] and instantiated for each store
//! by [`sql_store_tests!`] (`postgres::sweep_deletes_expired_rows_only`,
//! `mysql::sweep_deletes_expired_rows_only`, …). What only one backend has (its wire
//! protocol, its migrations, its collations) stays in its own file.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_idempotency::store::{Claim, KeyState, LeaseToken, Record, StoreKey};
use tower_idempotency::{Fingerprint, IdempotencyStore, Scope, StoreError};

use crate::common;

/// A SQL store and the little its tests need to know of its database.
pub trait SqlStore: IdempotencyStore + Clone + std::fmt::Debug + 'static {
    /// A pool of connections to the server.
    type Pool: Clone;
    /// The environment variable with the server's URL.
    const URL_VAR: &'static str;

    /// A pool of `connections` connections to `url`.
    async fn connect(url: &str, connections: u32) -> Self::Pool;
    /// The store on `pool`, with every default.
    fn on(pool: Self::Pool) -> Self;
    /// Its pool.
    fn pool_of(&self) -> &Self::Pool;
    /// The store on the table `name`.
    fn with_table(self, name: &str) -> Self;
    /// The store sweeping at most `rows` rows a statement.
    fn with_sweep_batch(self, rows: u32) -> Self;
    /// The store sweeping in the background every `interval` (never if zero).
    fn with_sweep_interval(self, interval: Duration) -> Self;
    /// Creates its table (and whatever goes with it) if missing.
    async fn create_table(&self) -> Result<(), StoreError>;
    /// Deletes its expired rows now, saying how many.
    async fn sweep_now(&self) -> Result<u64, StoreError>;
    /// The SQL that would create its table, where the store shows it (an error's text for
    /// an invalid name); `None` where it does not.
    fn shown_migration(&self) -> Option<Result<Vec<String>, String>>;

    /// Drops `table` and whatever the store made with it, if they exist.
    async fn drop_table(pool: &Self::Pool, table: &str);
    /// The rows in `table`.
    async fn count_rows(pool: &Self::Pool, table: &str) -> i64;
    /// Runs `sql`, which must succeed.
    async fn execute(pool: &Self::Pool, sql: String);
    /// SQL that moves the deadline of every row of `table` whose key contains `lease-` two
    /// hours back.
    fn age_lapsed_claims_sql(table: &str) -> String;
    /// SQL that replaces every stored record of `table` with the bytes `00 01`, which are
    /// no record's encoding.
    fn damage_records_sql(table: &str) -> String;
}

/// The store's server, or `None` after saying the test was skipped.
pub fn url<S: SqlStore>() -> Option<String> {
    match std::env::var(S::URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("skipped: {} not set", S::URL_VAR);
            None
        }
    }
}

/// A pool of eight connections to `url`.
pub async fn pool<S: SqlStore>(url: &str) -> S::Pool {
    S::connect(url, 8).await
}

/// A table name no other test (or run) uses, short enough for MySQL's procedure names.
pub fn private_table(what: &str) -> String {
    format!("ti_{what}_{}", uuid::Uuid::new_v4().simple())
}

/// A store on a table of its own, migrated, without a background sweep.
pub async fn private_store<S: SqlStore>(url: &str, what: &str) -> (S::Pool, S, String) {
    let pool = pool::<S>(url).await;
    let table = private_table(what);
    let store = S::on(pool.clone())
        .with_table(&table)
        .with_sweep_interval(Duration::ZERO);
    store.create_table().await.expect("migrate");
    (pool, store, table)
}

/// The table the conformance suite shares across runs (its keys are fresh random ones).
#[cfg(feature = "conformance")]
pub const CONFORMANCE_TABLE: &str = "tower_idempotency_conformance";

/// The store the conformance suite runs on: its shared table, on sixteen connections.
#[cfg(feature = "conformance")]
pub async fn conformance_store<S: SqlStore>() -> Option<S> {
    let url = url::<S>()?;
    let store = S::on(S::connect(&url, 16).await).with_table(CONFORMANCE_TABLE);
    store.create_table().await.expect("migrate");
    Some(store)
}

/// The key `k` in the anonymous scope.
pub fn key(k: &str) -> StoreKey {
    StoreKey::new(&Scope::anonymous(), k)
}

/// A fingerprint of 32 bytes `n`.
pub fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// A `200` with `body` and no headers.
pub fn record(body: &'static [u8]) -> Record {
    Record::new(
        StatusCode::OK,
        HeaderMap::new(),
        Bytes::from_static(body),
        None,
    )
}

/// Claims the free key `k` (with the fingerprint `fp(1)`), which must be acquired.
pub async fn acquire<S: IdempotencyStore>(store: &S, k: &StoreKey, lease: Duration) -> LeaseToken {
    match store.claim(k, &fp(1), LeaseToken::new(), lease).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("expected to acquire {k}, got {other:?}"),
    }
}

/// A duplicate of `k` (fingerprint `fp(1)`) waiting on `store` for up to `timeout`, on a
/// task of its own; the task ends with the claim it got (and fails if the wait did).
pub fn waiter<S: IdempotencyStore + Clone + 'static>(
    store: &S,
    k: &StoreKey,
    timeout: Duration,
) -> tokio::task::JoinHandle<Claim> {
    let (store, k) = (store.clone(), k.clone());
    tokio::spawn(async move {
        store
            .wait(
                &k,
                &fp(1),
                LeaseToken::new(),
                Duration::from_secs(30),
                timeout,
            )
            .await
            .expect("wait")
    })
}

/// Runs each operation of `store` once, calling `after(what)` after each: first
/// `"warm-up"`, once every statement has run (so the connection has prepared them all), then
/// `"claim"`, `"claim of a key in flight"`, `"extend"`, `"complete"`, `"replay"`, `"claim of
/// a second key"` and `"release"`.
pub async fn each_operation_once<S: IdempotencyStore>(store: &S, mut after: impl FnMut(&str)) {
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_secs(60);

    let warm = key("warm-up");
    let token = acquire(store, &warm, lease).await;
    store.extend(&warm, token, lease).await.unwrap();
    store
        .complete(&warm, token, record(b"w"), ttl)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&warm, &fp(1), LeaseToken::new(), lease).await,
        Ok(Claim::Completed(_))
    ));
    let other = key("warm-up-2");
    let token = acquire(store, &other, lease).await;
    store.release(&other, token).await.unwrap();
    after("warm-up");

    let k = key(&uuid::Uuid::new_v4().to_string());
    let token = acquire(store, &k, lease).await;
    after("claim");
    assert!(matches!(
        store.claim(&k, &fp(1), LeaseToken::new(), lease).await,
        Ok(Claim::InFlight { .. })
    ));
    after("claim of a key in flight");
    store.extend(&k, token, lease).await.unwrap();
    after("extend");
    store
        .complete(&k, token, record(b"done"), ttl)
        .await
        .unwrap();
    after("complete");
    match store.claim(&k, &fp(1), LeaseToken::new(), lease).await {
        Ok(Claim::Completed(r)) => assert_eq!(r.body(), &Bytes::from_static(b"done")),
        other => panic!("expected the record, got {other:?}"),
    }
    after("replay");

    let k2 = key(&uuid::Uuid::new_v4().to_string());
    let token = acquire(store, &k2, lease).await;
    after("claim of a second key");
    store.release(&k2, token).await.unwrap();
    after("release");
}

/// The scenarios below, as tests of the store `$store` (an [`SqlStore`]) in the module
/// that says `sql_store_tests!($store)`.
macro_rules! sql_store_tests {
    ($store:ty) => {
        $crate::sql_scenarios::sql_store_tests!(@tests $store,
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            many_instances_run_once,
            concurrent_claims_on_many_keys_each_have_one_winner);
        $crate::sql_scenarios::sql_store_tests!(@tests $store,
            #[tokio::test]
            sweep_deletes_expired_rows_only,
            background_sweeper_runs,
            invalid_table_name_is_an_error,
            damaged_record_is_a_decode_error,
            a_lapsed_claim_is_contested_before_it_is_taken_over);
    };
    (@tests $store:ty, #[$runtime:meta] $($scenario:ident),*) => {
        $(
            #[$runtime]
            async fn $scenario() {
                $crate::sql_scenarios::$scenario::<$store>().await;
            }
        )*
    };
}
pub(crate) use sql_store_tests;

/// Two instances (two pools, two stores, two layered services) on one table: 64 concurrent
/// requests with one key run the handler once, and every answer is the same.
pub async fn many_instances_run_once<S: SqlStore>() {
    let Some(url) = url::<S>() else { return };
    let table = private_table("fleet");
    let store_a = S::on(pool::<S>(&url).await).with_table(&table);
    let store_b = S::on(pool::<S>(&url).await).with_table(&table);
    store_a.create_table().await.expect("migrate");
    store_b
        .create_table()
        .await
        .expect("migrate twice is harmless");
    common::two_instances_run_once(store_a.clone(), store_b).await;
    S::drop_table(store_a.pool_of(), &table).await;
}

/// Many tasks on two pools claim many keys at once, each key from several tasks: exactly
/// one claim per key wins, and the server's way out of a conflict (InnoDB breaking a
/// deadlock, PostgreSQL aborting a duplicate insert) never surfaces as an error.
pub async fn concurrent_claims_on_many_keys_each_have_one_winner<S: SqlStore>() {
    let Some(url) = url::<S>() else { return };
    let (pool_a, store_a, table) = private_store::<S>(&url, "race").await;
    let store_b = S::on(pool::<S>(&url).await)
        .with_table(&table)
        .with_sweep_interval(Duration::ZERO);
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
    S::drop_table(&pool_a, &table).await;
}

/// `sweep` deletes expired records, in batches, and leaves live ones, and lapsed claims
/// too: their owner may still store its outcome for `ORPHAN_RETENTION`.
pub async fn sweep_deletes_expired_rows_only<S: SqlStore>() {
    let Some(url) = url::<S>() else { return };
    let pool = pool::<S>(&url).await;
    let table = private_table("sweep");
    let store = S::on(pool.clone())
        .with_table(&table)
        .with_sweep_batch(2)
        .with_sweep_interval(Duration::ZERO);
    store.create_table().await.expect("migrate");
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

    assert_eq!(S::count_rows(&pool, &table).await, 7);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        store.sweep_now().await.expect("sweep"),
        2,
        "two records expired"
    );
    assert_eq!(S::count_rows(&pool, &table).await, 5);
    // The lapsed claims are kept for their owners: a new claim contests them.
    for i in 0..3 {
        let k = key(&format!("lease-{i}"));
        let claim = store.claim(&k, &fp(1), LeaseToken::new(), short).await;
        assert!(matches!(claim, Ok(Claim::InFlight { .. })), "{claim:?}");
    }
    // Past the retention, a lapsed claim is swept (aged here by moving its deadline back).
    S::execute(&pool, S::age_lapsed_claims_sql(&table)).await;
    assert_eq!(
        store.sweep_now().await.expect("sweep"),
        3,
        "three old claims swept"
    );
    assert_eq!(S::count_rows(&pool, &table).await, 2);
    assert_eq!(
        store.sweep_now().await.expect("sweep"),
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
    S::drop_table(&pool, &table).await;
}

/// The background task sweeps by itself: it deletes the expired record, and only it.
pub async fn background_sweeper_runs<S: SqlStore>() {
    let Some(url) = url::<S>() else { return };
    let pool = pool::<S>(&url).await;
    let table = private_table("sweeper");
    let store = S::on(pool.clone())
        .with_table(&table)
        .with_sweep_interval(Duration::from_millis(100));
    store.create_table().await.expect("migrate");
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
        rows = S::count_rows(&pool, &table).await;
        if rows == 1 {
            break;
        }
    }
    assert_eq!(
        rows, 1,
        "the sweeper must delete the expired record, and only it"
    );
    drop(store);
    S::drop_table(&pool, &table).await;
}

/// A bad table name (whichever quote it tries to break out with) fails every operation,
/// without a panic and without touching the database; a store that shows its migration
/// SQL shows none for it.
pub async fn invalid_table_name_is_an_error<S: SqlStore>() {
    let Some(url) = url::<S>() else { return };
    let pool = pool::<S>(&url).await;
    let invalid = |err: &dyn std::fmt::Display| {
        let text = err.to_string();
        assert!(text.contains("invalid idempotency table name"), "{text}");
    };
    for name in [
        "records; DROP TABLE x",
        "records`; DROP TABLE x",
        "records\"; DROP TABLE x",
    ] {
        let store = S::on(pool.clone()).with_table(name);
        assert!(format!("{store:?}").contains("table_valid: false"));
        if let Some(sql) = store.shown_migration() {
            match sql {
                Err(err) => invalid(&err),
                Ok(sql) => panic!("{name:?}: expected no migration SQL, got {sql:?}"),
            }
        }
        for result in [
            store.create_table().await,
            store.sweep_now().await.map(drop),
            store
                .claim(&key("k"), &fp(1), LeaseToken::new(), Duration::from_secs(1))
                .await
                .map(drop),
        ] {
            match result {
                Err(StoreError::Backend(err)) => invalid(&err),
                other => panic!("{name:?}: expected an invalid table name error, got {other:?}"),
            }
        }
    }
}

/// A record that is not a valid encoding is a decode error, not a crash, to a claim and
/// to `inspect`; `purge` still removes it.
pub async fn damaged_record_is_a_decode_error<S: SqlStore>() {
    let Some(url) = url::<S>() else { return };
    let (pool, store, table) = private_store::<S>(&url, "damaged").await;
    let k = key("k");
    let token = acquire(&store, &k, Duration::from_secs(30)).await;
    store
        .complete(&k, token, record(b"x"), Duration::from_secs(60))
        .await
        .unwrap();
    S::execute(&pool, S::damage_records_sql(&table)).await;
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
    S::drop_table(&pool, &table).await;
}

/// A lapsed claim is contested once before any claim takes it over, however short the
/// lease, and the contest gives the owner at least 1 ms (`takeover_grace`): the store
/// judges every step by one clock reading, so the grace cannot run out between two of its
/// statements. Twenty rounds, with leases of 100 µs.
pub async fn a_lapsed_claim_is_contested_before_it_is_taken_over<S: SqlStore>() {
    let Some(url) = url::<S>() else { return };
    let (pool, store, table) = private_store::<S>(&url, "grace").await;
    let lease = Duration::from_micros(100);
    for round in 0..20 {
        let k = key(&format!("grace-{round}"));
        acquire(&store, &k, lease).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        match store.claim(&k, &fp(2), LeaseToken::new(), lease).await {
            Ok(Claim::InFlight {
                lease_remaining: Some(left),
                ..
            }) => assert!(left > Duration::from_micros(500), "round {round}: {left:?}"),
            other => {
                panic!("round {round}: the first claim after the lapse must contest, got {other:?}")
            }
        }
    }
    S::drop_table(&pool, &table).await;
}
