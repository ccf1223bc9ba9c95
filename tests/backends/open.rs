#![cfg(all(feature = "redis", feature = "postgres", feature = "mysql"))]

//! `store::open` against the real servers: every scheme opens a store that claims and
//! completes (tables created when missing), `mariadb://` is MySQL's, a bad table is a clear
//! `Migrate` error, and no error shows a password.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_idempotency::store::{
    Claim, Fingerprint, LeaseToken, OpenError, OpenOptions, Record, StoreKey, open, open_with,
};
use tower_idempotency::{IdempotencyStore, Scope};

fn url(var: &str) -> Option<String> {
    let url = std::env::var(var).ok().filter(|u| !u.is_empty());
    if url.is_none() {
        println!("skipped: {var} is not set");
    }
    url
}

/// Claims, completes and replays a fresh key.
async fn round_trip(store: &dyn IdempotencyStore) {
    let key = StoreKey::new(&Scope::anonymous(), &uuid::Uuid::new_v4().to_string());
    let fp = Fingerprint::from_bytes([3; 32]);
    let token = LeaseToken::new();
    let lease = Duration::from_secs(30);
    assert!(matches!(
        store.claim(&key, &fp, token, lease).await,
        Ok(Claim::Acquired(_))
    ));
    let record = Record::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from("ok"),
        None,
    )
    .with_fingerprint(fp);
    store
        .complete(&key, token, record, Duration::from_secs(60))
        .await
        .expect("complete");
    match store.claim(&key, &fp, LeaseToken::new(), lease).await {
        Ok(Claim::Completed(record)) => assert_eq!(&record.body()[..], b"ok"),
        other => panic!("the record must replay, got {other:?}"),
    }
}

/// `user:password@host` with a password of our own, for a URL that has none.
fn with_password(url: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (userinfo, host) = rest.split_once('@').unwrap_or(("root", rest));
    let user = userinfo.split(':').next().unwrap_or("root");
    format!("{scheme}://{user}:{password}@{host}")
}

#[tokio::test]
async fn every_scheme_opens_a_working_store() {
    if let Some(redis) = url("REDIS_URL") {
        round_trip(&*open(&redis).await.expect("redis://")).await;
        let prefixed = open_with(&redis, &OpenOptions::new().prefix("open-test:"))
            .await
            .expect("redis:// with a prefix");
        round_trip(&*prefixed).await;
    }
    if let Some(pg) = url("DATABASE_URL") {
        let table = format!("open_{}", uuid::Uuid::new_v4().simple());
        let store = open_with(&pg, &OpenOptions::new().table(&table).sweep(false))
            .await
            .expect("postgres://, its table created");
        round_trip(&*store).await;
        drop(store);
        let pool = tower_idempotency::sqlx::PgPool::connect(&pg).await.unwrap();
        tower_idempotency::sqlx::raw_sql(tower_idempotency::sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS \"{table}\""
        )))
        .execute(&pool)
        .await
        .unwrap();
    }
    if let Some(my) = url("MYSQL_URL") {
        let mariadb = my.replacen("mysql://", "mariadb://", 1);
        let store = open_with(&mariadb, &OpenOptions::new().sweep(false))
            .await
            .expect("mariadb:// is MySQL's scheme");
        round_trip(&*store).await;
    }
}

#[tokio::test]
async fn bad_tables_and_refused_passwords_are_clear_errors_without_the_password() {
    if let Some(pg) = url("DATABASE_URL") {
        let err = open_with(&pg, &OpenOptions::new().table("x; DROP TABLE y"))
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, OpenError::Migrate { .. }), "{err}");
    }
    if let Some(my) = url("MYSQL_URL") {
        // MariaDB's root has no password here: a wrong one is refused.
        let wrong = with_password(&my, "not-the-password");
        let options = OpenOptions::new().connect_timeout(Duration::from_millis(500));
        let err = open_with(&wrong, &options).await.err().expect("refused");
        let text = format!("{err}: {:?}", std::error::Error::source(&err));
        assert!(matches!(err, OpenError::Connect { .. }), "{text}");
        assert!(!text.contains("not-the-password"), "{text}");
    }
}
