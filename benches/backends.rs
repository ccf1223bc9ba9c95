//! First-request and replay latency through the layer on the Redis, PostgreSQL and MySQL
//! stores, next to the bare service and to one plain round trip to the server (`PING`,
//! `SELECT 1`), so that the number of round trips per request can be read off the times.
//! On the SQL databases, `two_upserts` is the floor a first request is held to: two
//! single-row upserts (`INSERT … ON CONFLICT`, `INSERT … ON DUPLICATE KEY UPDATE`), each
//! its own commit.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!     MYSQL_URL=mysql://root@127.0.0.1:3306/test \
//!     CARGO_TARGET_DIR=/work/target-bench cargo bench --all-features --bench backends
//! ```
//!
//! Each backend is skipped, with a message, when its feature is off or its URL unset. Redis
//! keys are written under a prefix of their own with a ten-minute TTL; SQL records go to a
//! table of their own, dropped at the end.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

#[cfg(any(feature = "redis", feature = "postgres", feature = "mysql"))]
mod common {
    use std::convert::Infallible;
    use std::hint::black_box;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use criterion::{BenchmarkGroup, BenchmarkId, measurement::WallTime};
    use http::header::CONTENT_TYPE;
    use http::{HeaderValue, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use tokio::runtime::Runtime;
    use tower::{Layer, Service, ServiceExt};
    use tower_idempotency::{IdempotencyLayer, IdempotencyStore, REPLAYED_HEADER};

    const RESPONSE: &[u8] = br#"{"id":"4c1f0a52-6a55-4d39-9a3e-1d4f2b7c9e10","status":"created"}"#;
    pub(crate) const SIZE: usize = 1024;

    static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

    fn next_key() -> String {
        format!("bench-{:012}", NEXT_KEY.fetch_add(1, Ordering::Relaxed))
    }

    async fn handler(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
        let body = req.into_body().collect().await?.to_bytes();
        black_box(&body);
        let mut res = Response::new(Full::new(Bytes::from_static(RESPONSE)));
        *res.status_mut() = StatusCode::CREATED;
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(res)
    }

    fn post(key: &str, body: &Bytes) -> Request<Full<Bytes>> {
        Request::post("/orders")
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", key)
            .body(Full::new(body.clone()))
            .expect("a request")
    }

    async fn call<S, B>(svc: &S, req: Request<Full<Bytes>>) -> (StatusCode, bool, Bytes)
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
        S::Error: std::fmt::Debug,
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let res = svc.clone().oneshot(req).await.expect("an answer");
        let replayed = res.headers().contains_key(REPLAYED_HEADER);
        let status = res.status();
        let body = res.into_body().collect().await.expect("a body").to_bytes();
        (status, replayed, body)
    }

    pub(crate) fn current_thread() -> Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// `bare`, `first_request` and `replay` at 1 KiB, on `store`.
    pub(crate) fn layer_benches(
        g: &mut BenchmarkGroup<'_, WallTime>,
        rt: &Runtime,
        store: impl IdempotencyStore,
    ) {
        let bare = tower::service_fn(handler);
        // Records live ten minutes: long enough for the run, short enough not to linger.
        let layer = IdempotencyLayer::new(store)
            .share_keys_across_callers()
            .ttl(Duration::from_secs(600))
            .layer(bare);
        let payload = Bytes::from(vec![b'x'; SIZE]);
        let key = next_key();
        let (status, replayed, _) = rt.block_on(call(&layer, post(&key, &payload)));
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
        let (status, replayed, body) = rt.block_on(call(&layer, post(&key, &payload)));
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        assert_eq!(body, RESPONSE);

        g.bench_function(BenchmarkId::new("bare", SIZE), |b| {
            b.to_async(rt)
                .iter(|| async { black_box(call(&bare, post(&next_key(), &payload)).await) })
        });
        g.bench_function(BenchmarkId::new("first_request", SIZE), |b| {
            b.to_async(rt)
                .iter(|| async { black_box(call(&layer, post(&next_key(), &payload)).await) })
        });
        g.bench_function(BenchmarkId::new("replay", SIZE), |b| {
            b.to_async(rt)
                .iter(|| async { black_box(call(&layer, post(&key, &payload)).await) })
        });
    }
}

#[cfg(feature = "redis")]
fn redis(c: &mut Criterion) {
    use tower_idempotency::RedisStore;
    use tower_idempotency::redis;

    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        println!("redis: skipped: REDIS_URL not set");
        return;
    };
    let rt = common::current_thread();
    let prefix = format!("tower-idempotency-bench:{}:", uuid::Uuid::new_v4().simple());
    let store = rt
        .block_on(RedisStore::connect(&url))
        .expect("connect to REDIS_URL")
        .prefix(prefix);
    let ping = rt
        .block_on(async {
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await
        })
        .expect("a plain connection to REDIS_URL");
    let mut g = c.benchmark_group("redis");
    ping_bench(&mut g, &rt, ping);
    common::layer_benches(&mut g, &rt, store);
    g.finish();
}

/// One plain round trip (`PING`) on `con`, to read the store's round trips against.
#[cfg(feature = "redis")]
fn ping_bench(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    con: tower_idempotency::redis::aio::MultiplexedConnection,
) {
    use tower_idempotency::redis;
    g.bench_function("round_trip_ping", |b| {
        b.to_async(rt).iter(|| {
            let mut con = con.clone();
            async move {
                let pong: String = redis::cmd("PING")
                    .query_async(&mut con)
                    .await
                    .expect("PONG");
                std::hint::black_box(pong)
            }
        })
    });
}

/// The same on a Redis Cluster: `REDIS_CLUSTER_NODES` lists nodes as `host:port,…`
/// (`scripts/redis_cluster.sh start` makes a local one of three primaries).
#[cfg(feature = "redis")]
fn redis_cluster(c: &mut Criterion) {
    use tower_idempotency::RedisStore;
    use tower_idempotency::redis;

    let Some(nodes) = std::env::var("REDIS_CLUSTER_NODES")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        println!("redis_cluster: skipped: REDIS_CLUSTER_NODES not set");
        return;
    };
    let urls: Vec<String> = nodes.split(',').map(|n| format!("redis://{n}")).collect();
    let rt = common::current_thread();
    let prefix = format!("tower-idempotency-bench:{}:", uuid::Uuid::new_v4().simple());
    let store = rt
        .block_on(RedisStore::connect_cluster(&urls))
        .expect("connect to REDIS_CLUSTER_NODES")
        .prefix(prefix);
    // A plain round trip to one node, for comparison.
    let ping = rt
        .block_on(async {
            redis::Client::open(urls[0].as_str())?
                .get_multiplexed_async_connection()
                .await
        })
        .expect("a plain connection to a node");
    let mut g = c.benchmark_group("redis_cluster");
    ping_bench(&mut g, &rt, ping);
    common::layer_benches(&mut g, &rt, store);
    g.finish();
}

#[cfg(not(feature = "redis"))]
fn redis_cluster(_c: &mut Criterion) {
    println!("redis_cluster: skipped: built without the `redis` feature (use --all-features)");
}

#[cfg(not(feature = "redis"))]
fn redis(_c: &mut Criterion) {
    println!("redis: skipped: built without the `redis` feature (use --all-features)");
}

#[cfg(feature = "postgres")]
fn postgres(c: &mut Criterion) {
    use std::hint::black_box;
    use tower_idempotency::PostgresStore;
    use tower_idempotency::sqlx::{self, postgres::PgPoolOptions};

    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        println!("postgres: skipped: DATABASE_URL not set");
        return;
    };
    let rt = common::current_thread();
    let table = format!("tower_idempotency_bench_{}", uuid::Uuid::new_v4().simple());
    let pool = rt
        .block_on(PgPoolOptions::new().max_connections(4).connect(&url))
        .expect("connect to DATABASE_URL");
    let store = PostgresStore::new(pool.clone()).table(table.clone());
    rt.block_on(store.migrate())
        .expect("create the bench table");
    let mut g = c.benchmark_group("postgres");
    g.bench_function("round_trip_select_1", |b| {
        b.to_async(&rt).iter(|| async {
            let row = sqlx::query("SELECT 1")
                .execute(&pool)
                .await
                .expect("SELECT 1");
            black_box(row)
        })
    });
    // The floor for a first request: two single-row `INSERT … ON CONFLICT` statements, each
    // its own commit, on a table shaped like the store's (key, small and 1 KiB columns).
    let floor = format!("{table}_floor");
    let create = format!(
        "CREATE TABLE \"{floor}\" (key text PRIMARY KEY, state smallint NOT NULL, \
         body bytea)"
    );
    rt.block_on(sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&pool))
        .expect("create the floor table");
    let upsert = format!(
        "INSERT INTO \"{floor}\" (key, state, body) VALUES ($1, $2, $3) \
         ON CONFLICT (key) DO UPDATE SET state = EXCLUDED.state, body = EXCLUDED.body"
    );
    let payload = vec![b'x'; 1024];
    g.bench_function("two_upserts", |b| {
        b.to_async(&rt).iter(|| async {
            let key = uuid::Uuid::new_v4().to_string();
            for (state, body) in [(0i16, None), (1i16, Some(payload.as_slice()))] {
                sqlx::query(sqlx::AssertSqlSafe(upsert.as_str()))
                    .bind(&key)
                    .bind(state)
                    .bind(body)
                    .execute(&pool)
                    .await
                    .expect("upsert");
            }
        })
    });
    common::layer_benches(&mut g, &rt, store);
    g.finish();
    let drop_floor = format!("DROP TABLE IF EXISTS \"{floor}\"");
    rt.block_on(sqlx::raw_sql(sqlx::AssertSqlSafe(drop_floor)).execute(&pool))
        .expect("drop the floor table");
    let drop_table = format!("DROP TABLE IF EXISTS \"{table}\"");
    rt.block_on(sqlx::raw_sql(sqlx::AssertSqlSafe(drop_table)).execute(&pool))
        .expect("drop the bench table");
}

#[cfg(not(feature = "postgres"))]
fn postgres(_c: &mut Criterion) {
    println!("postgres: skipped: built without the `postgres` feature (use --all-features)");
}

#[cfg(feature = "mysql")]
fn mysql(c: &mut Criterion) {
    use std::hint::black_box;
    use tower_idempotency::MySqlStore;
    use tower_idempotency::sqlx::{self, mysql::MySqlPoolOptions};

    let Some(url) = std::env::var("MYSQL_URL").ok().filter(|u| !u.is_empty()) else {
        println!("mysql: skipped: MYSQL_URL not set");
        return;
    };
    let rt = common::current_thread();
    let table = format!("ti_bench_{}", uuid::Uuid::new_v4().simple());
    let pool = rt
        .block_on(MySqlPoolOptions::new().max_connections(4).connect(&url))
        .expect("connect to MYSQL_URL");
    let store = MySqlStore::new(pool.clone()).table(table.clone());
    rt.block_on(store.migrate())
        .expect("create the bench table");
    let mut g = c.benchmark_group("mysql");
    g.bench_function("round_trip_select_1", |b| {
        b.to_async(&rt).iter(|| async {
            let row = sqlx::query("SELECT 1")
                .execute(&pool)
                .await
                .expect("SELECT 1");
            black_box(row)
        })
    });
    // The floor for a first request: two single-row upserts, each its own commit, on an
    // InnoDB table shaped like the store's.
    let floor = format!("{table}_floor");
    let create = format!(
        "CREATE TABLE `{floor}` (`key` VARBINARY(255) PRIMARY KEY, state SMALLINT NOT NULL, \
         body LONGBLOB) ENGINE = InnoDB"
    );
    rt.block_on(sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&pool))
        .expect("create the floor table");
    let upsert = format!(
        "INSERT INTO `{floor}` (`key`, state, body) VALUES (?, ?, ?) \
         ON DUPLICATE KEY UPDATE state = VALUES(state), body = VALUES(body)"
    );
    let payload = vec![b'x'; 1024];
    g.bench_function("two_upserts", |b| {
        b.to_async(&rt).iter(|| async {
            let key = uuid::Uuid::new_v4().to_string();
            for (state, body) in [(0i16, None), (1i16, Some(payload.as_slice()))] {
                sqlx::query(sqlx::AssertSqlSafe(upsert.as_str()))
                    .bind(&key)
                    .bind(state)
                    .bind(body)
                    .execute(&pool)
                    .await
                    .expect("upsert");
            }
        })
    });
    let drop_store = store.drop_sql().expect("a valid name");
    common::layer_benches(&mut g, &rt, store);
    g.finish();
    let drop_floor = format!("DROP TABLE IF EXISTS `{floor}`");
    for sql in drop_store.into_iter().chain([drop_floor]) {
        rt.block_on(sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool))
            .expect("drop the bench objects");
    }
}

#[cfg(not(feature = "mysql"))]
fn mysql(_c: &mut Criterion) {
    println!("mysql: skipped: built without the `mysql` feature (use --all-features)");
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
}

criterion_group! {
    name = backends;
    config = config();
    targets = redis, redis_cluster, postgres, mysql
}
criterion_main!(backends);
