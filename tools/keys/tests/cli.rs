//! The installed `idempotency-keys` binary, run as an operator runs it, against the real
//! stores (`REDIS_URL`, `DATABASE_URL`, `MYSQL_URL`; each test says it was skipped without
//! its store) and against misuse.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tower_idempotency::store::{Claim, LeaseToken, Record, StoreKey};
use tower_idempotency::{
    Fingerprint, IdempotencyStore, MySqlStore, PostgresStore, RedisStore, Scope,
};

const BIN: &str = env!("CARGO_BIN_EXE_idempotency-keys");
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(600);

/// Runs the tool with `args`, stdin not a terminal (`/dev/null`), none of the operator's
/// own settings in the environment.
fn keys(args: &[&str]) -> Output {
    keys_env(args, &[])
}

fn keys_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("IDEMPOTENCY_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("an exit status, not a signal")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every line of stdout, parsed as JSON (JSON Lines).
fn json_lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

fn fp() -> Fingerprint {
    Fingerprint::from_bytes([7; 32])
}

fn record(status: u16, body: &'static str) -> Record {
    Record::new(
        http::StatusCode::from_u16(status).unwrap(),
        http::HeaderMap::new(),
        bytes::Bytes::from_static(body.as_bytes()),
        None,
    )
    .with_fingerprint(fp())
}

async fn acquire(store: &dyn IdempotencyStore, key: &StoreKey, lease: Duration) -> LeaseToken {
    let token = LeaseToken::new();
    let claim = store.claim(key, &fp(), token, lease).await.unwrap();
    assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
    token
}

async fn completed(
    store: &dyn IdempotencyStore,
    key: &StoreKey,
    ttl: Duration,
    body: &'static str,
) {
    let token = acquire(store, key, LEASE).await;
    store
        .complete(key, token, record(201, body), ttl)
        .await
        .unwrap();
}

/// A committed key whose owner let go without an answer.
async fn unknown(store: &dyn IdempotencyStore, key: &StoreKey) {
    let token = acquire(store, key, LEASE).await;
    store.commit(key, token, TTL).await.unwrap();
    let _ = store.release(key, token).await;
}

fn fresh(tag: &str) -> String {
    format!("{tag}-{}", uuid::Uuid::new_v4().simple())
}

/// Every command on one store: `args` name it (`--store URL` and its prefix or table).
async fn every_command(store: &dyn IdempotencyStore, args: &[&str], page_size: &str) {
    let with =
        |more: &[&str]| -> Vec<String> { args.iter().chain(more).map(|s| s.to_string()).collect() };
    let run = |more: &[&str]| {
        let argv = with(more);
        keys(&argv.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let scope = Scope::of_principal(&"user:9");
    let (k_unknown, k_done, k_flying, k_free) = (
        fresh("unknown"),
        fresh("done"),
        fresh("flying"),
        fresh("free"),
    );
    let key = |k: &str| StoreKey::new(&scope, k);
    unknown(store, &key(&k_unknown)).await;
    completed(store, &key(&k_done), TTL, "done").await;
    acquire(store, &key(&k_flying), LEASE).await;
    let p = ["--principal", "user:9"];

    // inspect: text and JSON; a free key exits 1.
    let out = run(&[&["inspect", &k_unknown][..], &p].concat());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("outcome unknown"), "{}", stdout(&out));
    assert!(stdout(&out).contains(&"07".repeat(32)));
    let out = run(&[&["inspect", &k_done, "--output", "json"][..], &p].concat());
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["state"], "completed");
    assert_eq!(lines[0]["status"], 201);
    assert_eq!(lines[0]["body"], "done");
    assert_eq!(lines[0]["client_key"], k_done.as_str());
    let out = run(&[&["inspect", &k_free][..], &p].concat());
    assert_eq!(code(&out), 1, "a free key: nothing found");
    assert!(stdout(&out).contains("state: free"));
    // --stored names the key as the store keeps it (as list shows it).
    let stored = key(&k_done).to_string();
    let out = run(&["inspect", "--stored", &stored]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // settle: refused without --yes on a non-terminal stdin, nothing changed.
    let settle =
        |k: &str, more: &[&str]| run(&[&["settle", k, "--status", "201"][..], &p, more].concat());
    let out = settle(&k_unknown, &[]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    // Bad values: usage errors, nothing changed.
    for bad in [
        &["--status", "99"][..],
        &["--status", "abc"],
        &["--ttl", "0"],
        &["--ttl", "-1"],
        &["--ttl", "1.5"],
        &["--header", "no colon"],
        &["--header", "bad name: v"],
    ] {
        let out = settle(&k_unknown, &[bad, &["--yes"]].concat());
        assert_eq!(code(&out), 2, "{bad:?}: {}", stderr(&out));
    }
    // A key in another state is not settled: exit 1, nothing changed.
    let out = settle(&k_done, &["--yes"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("not in the outcome-unknown state"));
    let out = settle(&k_flying, &["--yes"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let out = run(&[&["inspect", &k_unknown][..], &p].concat());
    assert!(
        stdout(&out).contains("outcome unknown"),
        "refused settles change nothing"
    );
    let out = run(&[&["inspect", &k_done, "--output", "json"][..], &p].concat());
    assert_eq!(json_lines(&out)[0]["body"], "done");
    // Settled, and replayed.
    let out = settle(
        &k_unknown,
        &[
            "--yes",
            "--ttl",
            "1h",
            "--header",
            "content-type: application/json",
            "--body",
            "{\"id\":1}",
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json_lines(&out)[0]["settled"], true);
    match store
        .claim(&key(&k_unknown), &fp(), LeaseToken::new(), LEASE)
        .await
        .unwrap()
    {
        Claim::Completed(r) => {
            assert_eq!(r.status(), 201);
            assert_eq!(&r.body()[..], b"{\"id\":1}");
            assert_eq!(r.headers()["content-type"], "application/json");
        }
        other => panic!("a settled key replays, got {other:?}"),
    }

    // list: by state, JSON Lines parsed; the walk finds our keys.
    let list = |more: &[&str]| {
        let out = run(&[
            &["list", "--output", "json", "--page-size", page_size][..],
            more,
        ]
        .concat());
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        json_lines(&out)
    };
    let has = |lines: &[Value], k: &str| lines.iter().any(|l| l["client_key"] == k);
    let all = list(&[]);
    assert!(has(&all, &k_unknown) && has(&all, &k_done) && has(&all, &k_flying));
    assert!(!has(&all, &k_free));
    let flying = list(&["--state", "in-flight"]);
    assert!(has(&flying, &k_flying) && !has(&flying, &k_done) && !has(&flying, &k_unknown));
    assert!(flying.iter().all(|l| l["state"] == "in-flight"));
    let done = list(&["--state", "completed"]);
    assert!(has(&done, &k_done) && has(&done, &k_unknown) && !has(&done, &k_flying));
    let out = run(&["list", "--limit", "1"]);
    assert_eq!(code(&out), 0);
    assert_eq!(stdout(&out).lines().count(), 1, "--limit 1: one key");

    // purge: refused without --yes; then done; then nothing left (exit 1).
    let out = run(&[&["purge", &k_done][..], &p].concat());
    assert_eq!(code(&out), 4);
    let out = run(&[&["inspect", &k_done][..], &p].concat());
    assert_eq!(code(&out), 0, "a refused purge changes nothing");
    let out = run(&[&["purge", &k_done, "--yes"][..], &p].concat());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("purged"));
    let out = run(&[&["purge", &k_done, "--yes"][..], &p].concat());
    assert_eq!(code(&out), 1, "nothing left to purge");
    let out = run(&[&["inspect", &k_done][..], &p].concat());
    assert_eq!(code(&out), 1);

    // --older-than: a record stored with a 50 minute TTL is 10 minutes old for a service
    // whose records live an hour; one stored now is not.
    let (old, new) = (fresh("old"), fresh("new"));
    completed(store, &key(&old), Duration::from_secs(3000), "old").await;
    completed(store, &key(&new), Duration::from_secs(3600), "new").await;
    let aged = list(&["--older-than", "9m", "--record-ttl", "1h"]);
    assert!(has(&aged, &old), "a record 10 min old is older than 9 min");
    assert!(!has(&aged, &new), "a record just stored is not");
    assert!(!has(&aged, &k_flying), "claims in flight have no age");
    let out = run(&["list", "--older-than", "2h", "--record-ttl", "1h"]);
    assert_eq!(code(&out), 2, "older than any record: a usage error");
    let out = run(&["list", "--older-than", "1m", "--state", "in-flight"]);
    assert_eq!(code(&out), 2);
}

#[tokio::test]
async fn every_command_on_redis() {
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: REDIS_URL not set");
        return;
    };
    let prefix = "tower-idempotency-keys-tool:";
    let store = RedisStore::connect(&url).await.unwrap().prefix(prefix);
    // SCAN walks the whole keyspace: pages of 1000 keys.
    every_command(&store, &["--store", &url, "--prefix", prefix], "1000").await;
}

#[tokio::test]
async fn every_command_on_postgres() {
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: DATABASE_URL not set");
        return;
    };
    let pool = tower_idempotency::sqlx::PgPool::connect(&url)
        .await
        .unwrap();
    let store = PostgresStore::new(pool).table("tower_idempotency_keys_tool");
    store.migrate().await.unwrap();
    every_command(
        &store,
        &["--store", &url, "--table", "tower_idempotency_keys_tool"],
        "3",
    )
    .await;
}

#[tokio::test]
async fn every_command_on_mysql() {
    let Some(url) = std::env::var("MYSQL_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: MYSQL_URL not set");
        return;
    };
    let pool = tower_idempotency::sqlx::MySqlPool::connect(&url)
        .await
        .unwrap();
    let store = MySqlStore::new(pool).table("tower_idempotency_keys_tool");
    store.migrate().await.unwrap();
    every_command(
        &store,
        &["--store", &url, "--table", "tower_idempotency_keys_tool"],
        "3",
    )
    .await;
}

/// Expired entries, live ones, a committed key and a lapsed claim, then a vacuum: answers
/// the keys (expired, live, committed, in flight, lapsed) and the lapsed claim's token.
async fn before_vacuum(store: &dyn IdempotencyStore) -> ([StoreKey; 5], LeaseToken) {
    let key = || StoreKey::new(&Scope::anonymous(), &fresh("vacuum"));
    let keys = [key(), key(), key(), key(), key()];
    completed(store, &keys[0], Duration::from_millis(300), "expired").await;
    completed(store, &keys[1], TTL, "live").await;
    unknown(store, &keys[2]).await;
    acquire(store, &keys[3], LEASE).await;
    let lapsed = acquire(store, &keys[4], Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    (keys, lapsed)
}

/// After a vacuum: the live record, the committed key, the claim in flight are still
/// there; the owner of the lapsed claim still completes it.
async fn after_vacuum(store: &dyn IdempotencyStore, keys: &[StoreKey; 5], lapsed: LeaseToken) {
    use tower_idempotency::store::KeyState;
    assert!(matches!(
        store.inspect(&keys[0]).await.unwrap(),
        KeyState::Free
    ));
    match store.inspect(&keys[1]).await.unwrap() {
        KeyState::Completed { record, .. } => assert_eq!(&record.body()[..], b"live"),
        other => panic!("a live record is kept, got {other}"),
    }
    assert!(matches!(
        store.inspect(&keys[2]).await.unwrap(),
        KeyState::OutcomeUnknown { .. }
    ));
    assert!(matches!(
        store.inspect(&keys[3]).await.unwrap(),
        KeyState::InFlight { .. }
    ));
    store
        .complete(&keys[4], lapsed, record(202, "late"), TTL)
        .await
        .expect("a lapsed claim nobody took over is kept: its owner still completes");
}

fn vacuum(args: &[&str]) -> Value {
    let out = keys(&[&["vacuum"][..], args, &["--output", "json"]].concat());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "one JSON object: {lines:?}");
    lines[0].clone()
}

#[tokio::test]
async fn vacuum_removes_only_expired_records_on_postgres() {
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: DATABASE_URL not set");
        return;
    };
    let table = "tower_idempotency_keys_vacuum";
    let pool = tower_idempotency::sqlx::PgPool::connect(&url)
        .await
        .unwrap();
    // No background sweep: what goes is what the vacuum removed.
    let store = PostgresStore::new(pool.clone())
        .table(table)
        .sweep_interval(Duration::ZERO);
    store.migrate().await.unwrap();
    let (keys, lapsed) = before_vacuum(&store).await;
    let rows = |key: &StoreKey| {
        let pool = pool.clone();
        let key = key.to_string();
        async move {
            let n: i64 =
                tower_idempotency::sqlx::query_scalar(tower_idempotency::sqlx::AssertSqlSafe(
                    format!("SELECT count(*) FROM {table} WHERE key = $1"),
                ))
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap();
            n
        }
    };
    assert_eq!(rows(&keys[0]).await, 1, "the expired row is still there");
    let out = keys_env(&["vacuum", "--yes"], &[]);
    assert_eq!(code(&out), 2, "no store given: a usage error");
    let report = vacuum(&["--store", &url, "--table", table, "--yes", "--batch", "1"]);
    assert!(report["removed"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(rows(&keys[0]).await, 0, "the expired row is gone");
    for live in &keys[1..] {
        assert_eq!(rows(live).await, 1, "{live}: kept");
    }
    after_vacuum(&store, &keys, lapsed).await;
}

#[tokio::test]
async fn vacuum_removes_only_expired_records_on_mysql() {
    let Some(url) = std::env::var("MYSQL_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: MYSQL_URL not set");
        return;
    };
    let table = "tower_idempotency_keys_vacuum";
    let pool = tower_idempotency::sqlx::MySqlPool::connect(&url)
        .await
        .unwrap();
    let store = MySqlStore::new(pool.clone())
        .table(table)
        .sweep_interval(Duration::ZERO);
    store.migrate().await.unwrap();
    let (keys, lapsed) = before_vacuum(&store).await;
    let rows = |key: &StoreKey| {
        let pool = pool.clone();
        let key = key.to_string();
        async move {
            let n: i64 =
                tower_idempotency::sqlx::query_scalar(tower_idempotency::sqlx::AssertSqlSafe(
                    format!("SELECT count(*) FROM `{table}` WHERE `key` = ?"),
                ))
                .bind(key.into_bytes())
                .fetch_one(&pool)
                .await
                .unwrap();
            n
        }
    };
    assert_eq!(rows(&keys[0]).await, 1, "the expired row is still there");
    let report = vacuum(&["--store", &url, "--table", table, "--yes", "--batch", "2"]);
    assert!(report["removed"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(rows(&keys[0]).await, 0, "the expired row is gone");
    for live in &keys[1..] {
        assert_eq!(rows(live).await, 1, "{live}: kept");
    }
    after_vacuum(&store, &keys, lapsed).await;
}

#[tokio::test]
async fn vacuum_keeps_live_records_on_redis() {
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: REDIS_URL not set");
        return;
    };
    let prefix = "tower-idempotency-keys-vacuum:";
    let store = RedisStore::connect(&url).await.unwrap().prefix(prefix);
    let (keys, lapsed) = before_vacuum(&store).await;
    let report = vacuum(&["--store", &url, "--prefix", prefix, "--yes"]);
    // Redis expires entries itself: the walk removes nothing of its own.
    assert_eq!(report["removed"], 0, "{report}");
    after_vacuum(&store, &keys, lapsed).await;
}

#[tokio::test]
async fn vacuum_is_refused_without_yes_on_a_pipe() {
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: DATABASE_URL not set");
        return;
    };
    let table = "tower_idempotency_keys_refused";
    let pool = tower_idempotency::sqlx::PgPool::connect(&url)
        .await
        .unwrap();
    let store = PostgresStore::new(pool)
        .table(table)
        .sweep_interval(Duration::ZERO);
    store.migrate().await.unwrap();
    let key = StoreKey::new(&Scope::anonymous(), &fresh("refused"));
    completed(&store, &key, Duration::from_millis(100), "x").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = keys(&["vacuum", "--store", &url, "--table", table]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    // Nothing was removed: the expired row is still there for the vacuum that is confirmed.
    let report = vacuum(&["--store", &url, "--table", table, "--yes"]);
    assert!(report["removed"].as_u64().unwrap() >= 1, "{report}");
}

#[tokio::test]
async fn progress_goes_to_stderr_never_into_json() {
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: DATABASE_URL not set");
        return;
    };
    let table = "tower_idempotency_keys_progress";
    let pool = tower_idempotency::sqlx::PgPool::connect(&url)
        .await
        .unwrap();
    let store = PostgresStore::new(pool).table(table);
    store.migrate().await.unwrap();
    for _ in 0..5 {
        let key = StoreKey::new(&Scope::anonymous(), &fresh("progress"));
        completed(&store, &key, TTL, "p").await;
    }
    let out = keys(&[
        "list",
        "--store",
        &url,
        "--table",
        table,
        "--output",
        "json",
        "--progress",
        "--page-size",
        "2",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines = json_lines(&out);
    assert!(lines.len() >= 5);
    assert!(lines.iter().all(|l| l["state"] == "completed"));
    assert!(stderr(&out).contains("keys read"), "{}", stderr(&out));
    // Without --progress, on a stderr that is not a terminal: quiet.
    let out = keys(&[
        "list", "--store", &url, "--table", table, "--output", "json",
    ]);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[tokio::test]
async fn sealed_records_open_with_the_services_keys() {
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: REDIS_URL not set");
        return;
    };
    use tower_idempotency::store::sealed::{Keyring, Sealed};
    let keys_text = "k1:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let prefix = "tower-idempotency-keys-sealed:";
    let raw = RedisStore::connect(&url).await.unwrap().prefix(prefix);
    let sealed = Sealed::new(raw, Keyring::parse(keys_text).unwrap());
    let (done, unknown_key) = (fresh("sealed"), fresh("sealed-unknown"));
    completed(
        &sealed,
        &StoreKey::new(&Scope::anonymous(), &done),
        TTL,
        "secret body",
    )
    .await;
    unknown(&sealed, &StoreKey::new(&Scope::anonymous(), &unknown_key)).await;
    let base = ["--store", url.as_str(), "--prefix", prefix];
    let out = keys(&[&base[..], &["inspect", &done, "--output", "json"]].concat());
    assert_eq!(code(&out), 0);
    assert!(
        !stdout(&out).contains("secret body"),
        "sealed without the keys"
    );
    let env = [("IDEMPOTENCY_ENCRYPTION_KEYS", keys_text)];
    let out = keys_env(
        &[&base[..], &["inspect", &done, "--output", "json"]].concat(),
        &env,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json_lines(&out)[0]["body"], "secret body");
    // settle seals its answer: the service (with its keys) replays it.
    let out = keys_env(
        &[
            &base[..],
            &[
                "settle",
                &unknown_key,
                "--status",
                "201",
                "--body",
                "sealed answer",
                "--yes",
            ],
        ]
        .concat(),
        &env,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    match sealed
        .claim(
            &StoreKey::new(&Scope::anonymous(), &unknown_key),
            &fp(),
            LeaseToken::new(),
            LEASE,
        )
        .await
        .unwrap()
    {
        Claim::Completed(r) => assert_eq!(&r.body()[..], b"sealed answer"),
        other => panic!("{other:?}"),
    }
    // Wrong keys: the record cannot be read, exit 5.
    let out = keys_env(
        &[&base[..], &["inspect", &done]].concat(),
        &[(
            "IDEMPOTENCY_ENCRYPTION_KEYS",
            "k9:AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
        )],
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    // list: with the service's keys, the record is listed opened; with other keys it is
    // listed as unreadable (exit 5), and the walk goes on.
    let out = keys_env(&[&base[..], &["list", "--output", "json"]].concat(), &env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        json_lines(&out)
            .iter()
            .any(|l| l["client_key"] == done.as_str() && l["state"] == "completed")
    );
    let out = keys_env(
        &[&base[..], &["list", "--output", "json"]].concat(),
        &[(
            "IDEMPOTENCY_ENCRYPTION_KEYS",
            "k9:AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
        )],
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        json_lines(&out)
            .iter()
            .any(|l| l["client_key"] == done.as_str() && l["state"] == "unreadable")
    );
    // Bad keys: a usage error.
    let out = keys_env(
        &[&base[..], &["inspect", &done]].concat(),
        &[("IDEMPOTENCY_ENCRYPTION_KEYS", "k1:not-a-key")],
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    // A record the tool cannot read (other keys) is purged all the same: purging never
    // reads it. (Found by review: the purge stopped with exit 5 and removed nothing.)
    let out = keys_env(
        &[&base[..], &["purge", &done, "--yes"]].concat(),
        &[(
            "IDEMPOTENCY_ENCRYPTION_KEYS",
            "k9:AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
        )],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).is_empty() || stderr(&out).contains("cannot be read"),
        "{}",
        stderr(&out)
    );
    let gone = sealed
        .inspect(&StoreKey::new(&Scope::anonymous(), &done))
        .await
        .unwrap();
    assert!(
        matches!(gone, tower_idempotency::store::KeyState::Free),
        "{gone:?}"
    );
}

#[test]
fn misuse_is_a_usage_error_that_touches_nothing() {
    // No store contacted in any of these: the URL points at a closed port.
    let store = "postgres://postgres@127.0.0.1:1/none";
    for (args, what) in [
        (&["explode"][..], "unknown command"),
        (&[][..], "no command"),
        (&["inspect", "--store", store][..], "missing key"),
        (
            &["inspect", "k", "--stored", "anon:k", "--store", store],
            "key twice",
        ),
        (
            &[
                "inspect",
                "--stored",
                "anon:k",
                "--principal",
                "u",
                "--store",
                store,
            ],
            "--stored and --principal",
        ),
        (
            &["inspect", "--stored", "nope", "--store", store],
            "a stored key without a scope",
        ),
        (
            &["inspect", "k\u{7}", "--store", store],
            "a key with a control character",
        ),
        (&["inspect", "k", "--store", "foo://x"], "bad URL scheme"),
        (&["inspect", "k", "--store", "memory"], "memory store"),
        (&["inspect", "k"], "no store"),
        (
            &["inspect", "k", "--store", store, "--bogus"],
            "unknown option",
        ),
        (
            &["inspect", "k", "--store", store, "--output", "xml"],
            "bad output",
        ),
        (
            &["settle", "k", "--store", store, "--yes"],
            "settle without --status",
        ),
        (
            &["settle", "k", "--store", store, "--status", "1000", "--yes"],
            "bad status",
        ),
        (
            &[
                "settle", "k", "--store", store, "--status", "200", "--ttl", "soon", "--yes",
            ],
            "bad ttl",
        ),
        (
            &[
                "settle", "k", "--store", store, "--status", "200", "--header", "x", "--yes",
            ],
            "bad header",
        ),
        (&["list", "--store", store, "--state", "lost"], "bad state"),
        (&["list", "--store", store, "--limit", "0"], "zero limit"),
        (
            &["list", "--store", store, "--older-than", "ten"],
            "bad age",
        ),
        (
            &["vacuum", "--store", store, "--batch", "0", "--yes"],
            "zero batch",
        ),
        (
            &["inspect", "k", "--store", store, "--timeout", "x"],
            "bad timeout",
        ),
        // Found by review: past a day the tool panicked adding its connect margin.
        (
            &[
                "inspect",
                "k",
                "--store",
                store,
                "--timeout",
                "18446744073709551615s999ms",
            ],
            "a timeout past any sense",
        ),
        (
            &["inspect", "k", "--store", store, "--timeout", "0s"],
            "a zero timeout",
        ),
    ] {
        let started = Instant::now();
        let out = keys(args);
        assert_eq!(code(&out), 2, "{what}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{what}: says why");
        assert!(stdout(&out).is_empty(), "{what}: prints no result");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: refused without waiting for a store"
        );
    }
}

#[test]
fn an_unreachable_store_is_exit_3_and_fast() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for url in [
        format!("redis://127.0.0.1:{port}"),
        format!("postgres://postgres@127.0.0.1:{port}/test"),
        format!("mysql://root@127.0.0.1:{port}/test"),
    ] {
        for args in [
            &["inspect", "k"][..],
            &["list"],
            &["purge", "k", "--yes"],
            &["vacuum", "--yes"],
        ] {
            let started = Instant::now();
            let out = keys(&[&["--store", &url][..], args].concat());
            assert_eq!(code(&out), 3, "{url} {args:?}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("connect"),
                "{url}: a clear error: {}",
                stderr(&out)
            );
            assert!(
                started.elapsed() < Duration::from_secs(6),
                "{url} {args:?}: took {:?}",
                started.elapsed()
            );
        }
    }
    // A destructive command without --yes is refused before any connection.
    let out = keys(&[
        "purge",
        "k",
        "--store",
        &format!("redis://127.0.0.1:{port}"),
    ]);
    assert_eq!(code(&out), 4);
}

#[test]
fn help_explains_every_command_option_and_exit_status() {
    let out = keys(&["--help"]);
    assert_eq!(code(&out), 0);
    let help = stdout(&out);
    for needle in [
        "inspect",
        "purge",
        "settle",
        "list",
        "vacuum",
        "IDEMPOTENCY_STORE",
        "IDEMPOTENCY_REDIS_PREFIX",
        "IDEMPOTENCY_TABLE",
        "IDEMPOTENCY_KEYS_OUTPUT",
        "IDEMPOTENCY_KEYS_YES",
        "IDEMPOTENCY_ENCRYPTION_KEYS",
        "Exit status",
    ] {
        assert!(help.contains(needle), "--help mentions {needle}");
    }
    for code_line in ["  0  ", "  1  ", "  2  ", "  3  ", "  4  ", "  5  "] {
        assert!(
            help.contains(code_line),
            "--help documents exit {code_line:?}"
        );
    }
    for (command, needles) in [
        (
            "settle",
            &[
                "--status",
                "--header",
                "--body",
                "--ttl",
                "--principal",
                "--stored",
            ][..],
        ),
        (
            "list",
            &[
                "--state",
                "--older-than",
                "--record-ttl",
                "--expires-within",
                "--limit",
                "--page-size",
            ],
        ),
        ("vacuum", &["--batch"]),
    ] {
        let out = keys(&[command, "--help"]);
        assert_eq!(code(&out), 0);
        for needle in needles {
            assert!(stdout(&out).contains(needle), "{command} --help: {needle}");
        }
    }
}

#[tokio::test]
async fn options_come_from_the_environment_too() {
    // The store and the output from the environment: the same usage checks apply.
    let out = keys_env(&["inspect", "k"], &[("IDEMPOTENCY_STORE", "memory")]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("shared store"), "{}", stderr(&out));
    let out = keys_env(&["inspect", "k"], &[("IDEMPOTENCY_KEYS_OUTPUT", "xml")]);
    assert_eq!(code(&out), 2);
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped the rest: REDIS_URL not set");
        return;
    };
    // --yes from the environment: a purge of a free key is "nothing there" (1), not refused
    // (4); a false value is no --yes.
    let key = fresh("env");
    for (yes, expected) in [("true", 1), ("1", 1), ("false", 4), ("0", 4)] {
        let out = keys_env(
            &["purge", &key],
            &[("IDEMPOTENCY_STORE", &url), ("IDEMPOTENCY_KEYS_YES", yes)],
        );
        assert_eq!(
            code(&out),
            expected,
            "IDEMPOTENCY_KEYS_YES={yes}: {}",
            stderr(&out)
        );
    }
    let out = keys_env(
        &["inspect"],
        &[
            ("IDEMPOTENCY_STORE", &url),
            ("IDEMPOTENCY_KEYS_STORED", "anon:nothing-here"),
        ],
    );
    assert_eq!(
        code(&out),
        1,
        "the key from the environment: {}",
        stderr(&out)
    );
    let out = keys_env(
        &["list", "--limit", "1"],
        &[
            ("IDEMPOTENCY_STORE", &url),
            ("IDEMPOTENCY_KEYS_OUTPUT", "json"),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    json_lines(&out);
}

/// Private servers a test starts, pauses and kills (the root crate's test helpers).
#[allow(dead_code)]
#[path = "../../../tests/common/servers.rs"]
mod servers;

#[tokio::test]
async fn list_and_vacuum_walk_every_primary_of_a_redis_cluster() {
    if std::env::var("REDIS_URL").map_or(true, |u| u.is_empty()) {
        println!("skipped: REDIS_URL not set (no Redis on this machine)");
        return;
    }
    let cluster = servers::PrivateCluster::start();
    let store = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let mut made = Vec::new();
    for i in 0..30 {
        let key = fresh(&format!("cluster{i}"));
        completed(&store, &StoreKey::new(&Scope::anonymous(), &key), TTL, "c").await;
        made.push(key);
    }
    let flying = fresh("cluster-flying");
    acquire(&store, &StoreKey::new(&Scope::anonymous(), &flying), LEASE).await;
    let per_node = cluster.keys_per_node();
    assert!(
        per_node.iter().filter(|&&n| n > 0).count() >= 2,
        "the keys spread over several primaries: {per_node:?}"
    );
    let url = format!(
        "redis-cluster://{}",
        cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    );
    let out = keys(&[
        "--store",
        &url,
        "list",
        "--state",
        "completed",
        "--output",
        "json",
        "--page-size",
        "4",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines = json_lines(&out);
    for key in &made {
        assert!(
            lines.iter().any(|l| l["client_key"] == key.as_str()),
            "{key} is listed, whichever primary holds it"
        );
    }
    assert!(!lines.iter().any(|l| l["client_key"] == flying.as_str()));
    let out = keys(&["--store", &url, "inspect", &made[0]]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = keys(&["--store", &url, "vacuum", "--yes", "--output", "json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(json_lines(&out)[0]["scanned"].as_u64().unwrap() >= 31);
    let out = keys(&["--store", &url, "purge", &made[1], "--yes"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = keys(&["--store", &url, "inspect", &made[1]]);
    assert_eq!(code(&out), 1);
}

#[tokio::test]
async fn a_paused_or_killed_store_is_exit_3_within_the_timeout() {
    if std::env::var("REDIS_URL").map_or(true, |u| u.is_empty()) {
        println!("skipped: REDIS_URL not set (no Redis on this machine)");
        return;
    }
    let mut server = servers::PrivateRedis::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let key = fresh("paused");
    completed(&store, &StoreKey::new(&Scope::anonymous(), &key), TTL, "p").await;
    let url = server.url();
    let out = keys(&["--store", &url, "list", "--output", "json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    server.pause();
    for args in [
        &["list", "--timeout", "1s"][..],
        &["inspect", &key, "--timeout", "1s"],
        &["vacuum", "--yes", "--timeout", "1s"],
        &["purge", &key, "--yes", "--timeout", "1s"],
    ] {
        let started = Instant::now();
        let out = keys(&[&["--store", &url][..], args].concat());
        assert_eq!(code(&out), 3, "paused, {args:?}: {}", stderr(&out));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{args:?}: gave up after {:?}",
            started.elapsed()
        );
    }
    server.resume();
    let out = keys(&["--store", &url, "inspect", &key]);
    assert_eq!(
        code(&out),
        0,
        "the paused purge changed nothing: {}",
        stderr(&out)
    );
    server.kill();
    let started = Instant::now();
    let out = keys(&["--store", &url, "list", "--timeout", "1s"]);
    assert_eq!(code(&out), 3, "killed: {}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Runs the tool on a terminal (`script` gives it a pseudo-terminal) and types `answer`.
fn on_a_terminal(args: &[&str], answer: &str) -> Option<(i32, String)> {
    use std::io::Write as _;
    let line = std::iter::once(BIN)
        .chain(args.iter().copied())
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = match Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(_) => return None,
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(answer.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Some((code(&out), stdout(&out)))
}

#[tokio::test]
async fn on_a_terminal_a_destructive_command_asks_first() {
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: REDIS_URL not set");
        return;
    };
    let prefix = "tower-idempotency-keys-tty:";
    let store = RedisStore::connect(&url).await.unwrap().prefix(prefix);
    let key = fresh("tty");
    completed(&store, &StoreKey::new(&Scope::anonymous(), &key), TTL, "t").await;
    let args = [
        "--store",
        url.as_str(),
        "--prefix",
        prefix,
        "purge",
        key.as_str(),
    ];
    let Some((code_no, shown)) = on_a_terminal(&args, "n\n") else {
        println!("skipped: no `script` to give the tool a terminal");
        return;
    };
    assert_eq!(code_no, 4, "answered no: {shown}");
    assert!(shown.contains("[y/N]"), "it asked: {shown}");
    assert!(
        shown.contains("completed, status 201"),
        "it showed what goes: {shown}"
    );
    assert!(matches!(
        store
            .inspect(&StoreKey::new(&Scope::anonymous(), &key))
            .await
            .unwrap(),
        tower_idempotency::store::KeyState::Completed { .. }
    ));
    let (code_yes, shown) = on_a_terminal(&args, "y\n").unwrap();
    assert_eq!(code_yes, 0, "answered yes: {shown}");
    assert!(matches!(
        store
            .inspect(&StoreKey::new(&Scope::anonymous(), &key))
            .await
            .unwrap(),
        tower_idempotency::store::KeyState::Free
    ));
    let (code_vacuum, _) = on_a_terminal(
        &["--store", url.as_str(), "--prefix", prefix, "vacuum"],
        "\n",
    )
    .unwrap();
    assert_eq!(code_vacuum, 4, "no answer is no");
}

/// PostgreSQL goes silent in the middle of a long `list` (a fault proxy blackholes the
/// connection after the first page): the walk stops with exit 3 within `--timeout`, and
/// what it printed before is whole JSON lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_goes_silent_mid_walk_is_exit_3_with_whole_lines() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: DATABASE_URL not set");
        return;
    };
    let table = "tower_idempotency_keys_midwalk";
    let pool = tower_idempotency::sqlx::PgPool::connect(&url)
        .await
        .unwrap();
    let store = PostgresStore::new(pool).table(table);
    store.migrate().await.unwrap();
    for _ in 0..40 {
        let key = StoreKey::new(&Scope::anonymous(), &fresh("midwalk"));
        completed(&store, &key, TTL, "m").await;
    }
    let proxy = servers::FaultProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let via_proxy = url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(via_proxy, url, "DATABASE_URL names 127.0.0.1:5432");
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "--store",
            &via_proxy,
            "--table",
            table,
            "list",
            "--output",
            "json",
            "--page-size",
            "1",
            "--timeout",
            "1s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().expect("a first key");
    proxy.blackhole();
    let started = Instant::now();
    let mut printed = vec![first];
    while let Some(line) = lines.next_line().await.unwrap() {
        printed.push(line);
    }
    let status = child.wait().await.unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("store"), "a clear error: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        printed.len() < 40,
        "the walk stopped midway: {} lines",
        printed.len()
    );
    for line in &printed {
        let value: Value = serde_json::from_str(line).expect("whole JSON lines");
        assert_eq!(value["state"], "completed");
    }
    proxy.pass();
}

/// A `--table` the SQL stores refuse (it would need quoting) is the operator's mistake:
/// exit 2 with the store's reason, on PostgreSQL and MySQL alike, and nothing runs.
#[test]
fn a_table_name_the_store_refuses_is_a_usage_error() {
    for var in ["DATABASE_URL", "MYSQL_URL"] {
        let Some(url) = std::env::var(var).ok().filter(|u| !u.is_empty()) else {
            eprintln!("skipped for {var}: not set");
            continue;
        };
        for command in [
            &["inspect", "k"][..],
            &["list"][..],
            &["vacuum", "--yes"][..],
        ] {
            let mut args = command.to_vec();
            args.extend(["--store", &url, "--table", "x;drop table y"]);
            let out = keys(&args);
            assert_eq!(code(&out), 2, "{var} {command:?}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("table name"),
                "{var} {command:?} says why: {}",
                stderr(&out)
            );
        }
    }
}
