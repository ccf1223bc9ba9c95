//! Real servers that fail: a PostgreSQL behind a blackholing proxy, a paused private
//! `redis-server`, and heartbeats that fail on both while nobody else claims the key.
//! Skipped without `DATABASE_URL` / `REDIS_URL`.

#![cfg(any(feature = "redis", feature = "postgres"))]

use crate::common;

use std::time::Duration;

use common::{Runs, call, post};
use tower::Layer;
use tower_idempotency::IdempotencyLayer;

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use common::{FaultProxy, assert_problem};
    use std::time::Instant;
    use tower_idempotency::PostgresStore;
    use tower_idempotency::sqlx::postgres::PgPoolOptions;

    fn database_url() -> Option<String> {
        let url = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
        if url.is_none() {
            println!("skipped: DATABASE_URL is not set");
        }
        url
    }

    /// A store whose pool reaches PostgreSQL through `proxy`.
    async fn store_via(url: &str, proxy: &FaultProxy, table: &str) -> PostgresStore {
        let mut options: tower_idempotency::sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        options = options.host("127.0.0.1").port(proxy.port);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .unwrap();
        let store = PostgresStore::new(pool).table(table);
        store.migrate().await.unwrap();
        store
    }

    async fn upstream(url: &str) -> std::net::SocketAddr {
        let options: tower_idempotency::sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        let host = if options.get_host().starts_with('/') {
            "127.0.0.1"
        } else {
            options.get_host()
        };
        tokio::net::lookup_host((host, options.get_port()))
            .await
            .unwrap()
            .next()
            .unwrap()
    }

    /// With PostgreSQL blackholed, a request is answered `503` within the store-call bound,
    /// not after the pool's 30 s; once the database is back, the same key runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blackholed_postgres_answers_within_the_bound() {
        let Some(url) = database_url() else { return };
        let proxy = FaultProxy::start(upstream(&url).await).await;
        let store = store_via(&url, &proxy, "faults_blackhole").await;
        let runs = Runs::default();
        let svc = IdempotencyLayer::new(store)
            .share_keys_across_callers()
            .layer(runs.handler(Duration::ZERO));
        let warm = call(&svc, post(Some(&uuid::Uuid::new_v4().to_string()), "{}")).await;
        assert_eq!(warm.status, 201);

        proxy.blackhole();
        let key = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let answer =
            tokio::time::timeout(Duration::from_secs(8), call(&svc, post(Some(&key), "{}")))
                .await
                .expect("a blackholed store must not hold the request");
        let took = started.elapsed();
        assert_problem(&answer, 503, "store-unavailable");
        assert!(took < Duration::from_secs(4), "answered after {took:?}");

        proxy.pass();
        let mut last = None;
        for _ in 0..50 {
            let answer = call(&svc, post(Some(&key), "{}")).await;
            if answer.status == 201 {
                last = Some(answer);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(last.is_some(), "the key runs once the database is back");
        assert_eq!(runs.started(), 2);
    }

    /// The heartbeat fails for the whole run and the lease lapses, but nobody claims the key:
    /// the owner's outcome is stored and replayed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owner_completes_after_an_uncontested_lease_lapse() {
        let Some(url) = database_url() else { return };
        let pool = PgPoolOptions::new().connect(&url).await.unwrap();
        let store = PostgresStore::new(pool);
        store.migrate().await.unwrap();
        common::uncontested_lapse(store).await;
    }
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use common::{PrivateRedis, assert_problem};
    use std::time::Instant;
    use tower_idempotency::RedisStore;

    fn redis_configured() -> bool {
        let set = std::env::var("REDIS_URL").is_ok_and(|u| !u.is_empty());
        if !set {
            println!("skipped: REDIS_URL is not set");
        }
        set
    }

    /// A paused Redis: `503` within the bound; after it resumes, no orphan claim is left
    /// and the key runs at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paused_redis_answers_within_the_bound_and_leaves_no_claim() {
        if !redis_configured() {
            return;
        }
        let server = PrivateRedis::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        let runs = Runs::default();
        let svc = IdempotencyLayer::new(store)
            .share_keys_across_callers()
            .layer(runs.handler(Duration::ZERO));
        server.pause();
        let key = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let answer =
            tokio::time::timeout(Duration::from_secs(8), call(&svc, post(Some(&key), "{}")))
                .await
                .expect("a paused store must not hold the request");
        assert_problem(&answer, 503, "store-unavailable");
        assert!(started.elapsed() < Duration::from_secs(4));
        // The claim was sent and lands when the server resumes; the layer releases it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.resume();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let retry = call(&svc, post(Some(&key), "{}")).await;
        assert_eq!(retry.status, 201, "{}", retry.text());
        assert_eq!(runs.started(), 1);
    }

    /// Redis is paused (SIGSTOP, longer than the store timeout) while 16 requests are at
    /// `claim.commit()`: every commit times out, every handler makes no order and answers
    /// 503, and the commands already on the wire land when Redis resumes, commit first.
    /// None of the keys may end bound to "503 order not created" or `outcome-unknown`:
    /// each retry creates its order, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_in_flight_when_redis_pauses_are_withdrawn_and_retries_run_once() {
        use axum::Router;
        use axum::routing::post as route_post;
        use std::collections::HashMap;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        use tower_idempotency::IdempotencyClaim;
        if !redis_configured() {
            return;
        }
        const KEYS: usize = 16;
        let server = PrivateRedis::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        let orders: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let at_commit = Arc::new(AtomicUsize::new(0));
        let (go, gate) = tokio::sync::watch::channel(false);
        let app = Router::new()
            .route(
                "/orders",
                route_post({
                    let (orders, at_commit) = (Arc::clone(&orders), Arc::clone(&at_commit));
                    move |claim: IdempotencyClaim| {
                        let (orders, at_commit, mut gate) =
                            (Arc::clone(&orders), Arc::clone(&at_commit), gate.clone());
                        async move {
                            at_commit.fetch_add(1, Ordering::SeqCst);
                            let _ = gate.wait_for(|go| *go).await;
                            match claim.commit().await {
                                Ok(()) => {
                                    *orders
                                        .lock()
                                        .unwrap()
                                        .entry(claim.key().to_owned())
                                        .or_default() += 1;
                                    (http::StatusCode::CREATED, "order created")
                                }
                                Err(_) => {
                                    (http::StatusCode::SERVICE_UNAVAILABLE, "order not created")
                                }
                            }
                        }
                    }
                }),
            )
            .layer(
                IdempotencyLayer::new(store)
                    .share_keys_across_callers()
                    .lease(Duration::from_millis(1000))
                    .store_timeout(Duration::from_millis(200)),
            );
        let keys: Vec<String> = (0..KEYS).map(|i| format!("paused-{i}")).collect();
        let firsts: Vec<_> = keys
            .iter()
            .map(|key| {
                let (app, key) = (app.clone(), key.clone());
                tokio::spawn(async move { call(&app, post(Some(&key), "{}")).await })
            })
            .collect();
        common::eventually("every request is at its commit point", || {
            at_commit.load(Ordering::SeqCst) == KEYS
        })
        .await;
        server.pause();
        go.send_replace(true);
        for first in firsts {
            assert_eq!(first.await.unwrap().status, 503);
        }
        // A pause of several store timeouts, then Redis delivers what is on the wire.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.resume();
        for key in &keys {
            let mut answer = call(&app, post(Some(key), "{}")).await;
            for _ in 0..200 {
                if answer.status != 409 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
                answer = call(&app, post(Some(key), "{}")).await;
            }
            assert_eq!(answer.status, 201, "{key}: {}", answer.text());
        }
        let orders = orders.lock().unwrap();
        assert_eq!(orders.len(), KEYS, "every key has its order: {orders:?}");
        assert!(
            orders.values().all(|n| *n == 1),
            "one order per key: {orders:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owner_completes_after_an_uncontested_lease_lapse() {
        if !redis_configured() {
            return;
        }
        let url = std::env::var("REDIS_URL").unwrap();
        common::uncontested_lapse(RedisStore::connect(&url).await.unwrap()).await;
    }
}
