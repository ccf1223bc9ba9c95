//! The `keys` example (inspect, purge, settle) against Redis, PostgreSQL and MySQL: a
//! committed key whose outcome is unknown is inspected, settled by hand, and then replayed.
//!
//! Needs `REDIS_URL` / `DATABASE_URL` / `MYSQL_URL`; says it was skipped without them.
#![cfg(all(feature = "redis", feature = "postgres", feature = "mysql"))]

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/keys.rs"]
mod tool;

use std::time::Duration;

use tower_idempotency::store::{Claim, LeaseToken, StoreKey};
use tower_idempotency::{
    Fingerprint, IdempotencyStore, MySqlStore, PostgresStore, RedisStore, Scope,
};

async fn unknown_outcome(store: &dyn IdempotencyStore, key: &StoreKey) {
    let token = LeaseToken::new();
    let fp = Fingerprint::from_bytes([7; 32]);
    let claim = store
        .claim(key, &fp, token, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)));
    store
        .commit(key, token, Duration::from_secs(600))
        .await
        .unwrap();
    let _ = store.release(key, token).await;
}

async fn round(store: &dyn IdempotencyStore, url: &str, extra: &[&str]) {
    let client_key = format!("tool-{}", uuid::Uuid::new_v4().simple());
    let key = StoreKey::new(&Scope::of_principal(&"user:9"), &client_key);
    unknown_outcome(store, &key).await;
    let argv = |cmd: &str, more: &[&str]| {
        let mut v: Vec<String> = vec![url.into(), cmd.into(), client_key.clone()];
        v.extend(["--principal", "user:9"].map(String::from));
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    let out = tool::keys(argv("inspect", &[])).await.unwrap();
    assert!(out.contains("outcome unknown"), "{out}");
    assert!(out.contains(&"07".repeat(32)), "{out}");
    // A zero TTL would free a committed key at once (and let the operation run again):
    // refused, and the key is left as it was.
    for ttl in ["0", "-1", "1.5"] {
        let err = tool::keys(argv("settle", &["--status", "201", "--ttl", ttl]))
            .await
            .unwrap_err();
        assert!(err.contains("--ttl"), "--ttl {ttl}: {err}");
    }
    let out = tool::keys(argv("inspect", &[])).await.unwrap();
    assert!(
        out.contains("outcome unknown"),
        "a refused settle changes nothing: {out}"
    );
    // A settle with a TTL shorter than the commit's keeps the key as long as the commit was
    // to be kept: settling never shortens retention.
    let out = tool::keys(argv(
        "settle",
        &[
            "--ttl",
            "1",
            "--status",
            "201",
            "--header",
            "content-type: application/json",
            "--body",
            "{\"id\":1}",
        ],
    ))
    .await
    .unwrap();
    assert!(out.contains("settled"), "{out}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    match store
        .claim(
            &key,
            &Fingerprint::from_bytes([7; 32]),
            LeaseToken::new(),
            Duration::from_secs(30),
        )
        .await
        .unwrap()
    {
        Claim::Completed(record) => {
            assert_eq!(record.status(), 201);
            assert_eq!(&record.body()[..], b"{\"id\":1}");
            assert_eq!(record.headers()["content-type"], "application/json");
            assert_eq!(record.fingerprint(), &Fingerprint::from_bytes([7; 32]));
        }
        other => panic!("a settled key replays, got {other:?}"),
    }
    // A settled key is not settled twice, and the error says so.
    let err = tool::keys(argv("settle", &["--status", "500"]))
        .await
        .unwrap_err();
    assert!(err.contains("not in the outcome-unknown state"), "{err}");
    let out = tool::keys(argv("inspect", &[])).await.unwrap();
    assert!(out.contains("completed, status 201"), "{out}");
    let out = tool::keys(argv("purge", &[])).await.unwrap();
    assert!(out.contains("purged"), "{out}");
    let out = tool::keys(argv("inspect", &[])).await.unwrap();
    assert!(out.contains("state: free"), "{out}");
    // Bad input is a clear error, not a panic.
    assert!(
        tool::keys(["mysql://x".into(), "inspect".into(), "k".into()])
            .await
            .is_err()
    );
    assert!(
        tool::keys([url.into(), "explode".into(), "k".into()])
            .await
            .is_err()
    );
    assert!(
        tool::keys([
            url.into(),
            "inspect".into(),
            "--stored".into(),
            "nope".into()
        ])
        .await
        .is_err()
    );
}

#[tokio::test]
async fn keys_tool_on_redis() {
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: REDIS_URL not set");
        return;
    };
    let store = RedisStore::connect(&url)
        .await
        .unwrap()
        .prefix("tower-idempotency-tool:");
    round(&store, &url, &["--prefix", "tower-idempotency-tool:"]).await;
}

#[tokio::test]
async fn keys_tool_on_postgres() {
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: DATABASE_URL not set");
        return;
    };
    let pool = tower_idempotency::sqlx::PgPool::connect(&url)
        .await
        .unwrap();
    let store = PostgresStore::new(pool).table("tower_idempotency_tool");
    store.migrate().await.unwrap();
    round(&store, &url, &["--table", "tower_idempotency_tool"]).await;
}

#[tokio::test]
async fn keys_tool_on_mysql() {
    let Some(url) = std::env::var("MYSQL_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: MYSQL_URL not set");
        return;
    };
    let pool = tower_idempotency::sqlx::MySqlPool::connect(&url)
        .await
        .unwrap();
    let store = MySqlStore::new(pool).table("tower_idempotency_tool");
    store.migrate().await.unwrap();
    round(&store, &url, &["--table", "tower_idempotency_tool"]).await;
}
