//! Opening a store from a URL: the one place that knows every backend's URL scheme.

use std::sync::Arc;
use std::time::Duration;

use super::{IdempotencyStore, StoreError};

/// How [`open_with`] opens a store. Build it with [`OpenOptions::new`] and its by-value
/// setters.
///
/// ```
/// use tower_idempotency::store::OpenOptions;
///
/// let options = OpenOptions::new().table("payments_idempotency").migrate(false);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenOptions {
    prefix: Option<String>,
    table: Option<String>,
    migrate: bool,
    sweep: bool,
    connect_timeout: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl OpenOptions {
    /// Every default: the backend's own key prefix or table, tables created if missing,
    /// expired records swept.
    pub fn new() -> Self {
        Self {
            prefix: None,
            table: None,
            migrate: true,
            sweep: true,
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// The key prefix on Redis. Default: the store's own (`idempotency:`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// The table on PostgreSQL and MySQL. Default: the store's own (`idempotency_records`).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// Whether the table (and on MySQL its procedures) is created if missing. Default:
    /// `true`. An operator's tool that must not change a schema says `false`.
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// How long connecting to PostgreSQL or MySQL may take before [`OpenError::Connect`]
    /// (a refused connection is retried meanwhile). Default: ten seconds.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = super::clamp_duration(timeout);
        self
    }

    /// Whether this store sweeps expired records in the background. Default: `true`. A
    /// short-lived tool says `false`.
    pub fn sweep(mut self, sweep: bool) -> Self {
        self.sweep = sweep;
        self
    }
}

/// Why [`open`] could not open a store. Its messages never show a URL's password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL names no store this crate knows.
    #[error(
        "{0:?} names no store: use `memory`, `redis://…` (or `rediss://…`), \
         `redis-cluster://host:port,…`, `postgres://…` or `mysql://…`"
    )]
    UnknownScheme(String),
    /// The store exists, but this build was made without its feature.
    #[error("this build has no {store} store: enable the crate feature `{feature}`")]
    NotBuilt {
        /// The store.
        store: &'static str,
        /// The feature that brings it.
        feature: &'static str,
    },
    /// The server could not be reached, or refused.
    #[error("cannot connect to {url}")]
    Connect {
        /// The URL, its password hidden.
        url: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The table (or its procedures) could not be created.
    #[error("cannot create the idempotency table at {url}")]
    Migrate {
        /// The URL, its password hidden.
        url: String,
        /// Why.
        #[source]
        source: StoreError,
    },
}

/// Opens the store `url` names, with every default ([`open_with`]).
///
/// - `memory`: a fresh [`MemoryStore`](crate::MemoryStore) (feature `memory`);
/// - `redis://…`, `rediss://…`: a [`RedisStore`](crate::RedisStore) (feature `redis`);
/// - `redis-cluster://host:port,host:port…`: a Redis Cluster, from any of its nodes;
/// - `postgres://…`, `postgresql://…`: a [`PostgresStore`](crate::PostgresStore), its table
///   created if missing (feature `postgres`);
/// - `mysql://…`: a [`MySqlStore`](crate::MySqlStore) on MySQL or MariaDB, its table and
///   procedures created if missing (feature `mysql`).
///
/// ```
/// # async fn run() -> Result<(), tower_idempotency::store::OpenError> {
/// use tower_idempotency::IdempotencyLayer;
///
/// let store = tower_idempotency::store::open("memory").await?;
/// let layer = IdempotencyLayer::new(store).share_keys_across_callers();
/// # Ok(())
/// # }
/// ```
pub async fn open(url: &str) -> Result<Arc<dyn IdempotencyStore>, OpenError> {
    open_with(url, &OpenOptions::new()).await
}

/// Opens the store `url` names (see [`open`]) as `options` say.
pub async fn open_with(
    url: &str,
    options: &OpenOptions,
) -> Result<Arc<dyn IdempotencyStore>, OpenError> {
    let url = url.trim();
    let scheme = url.split_once("://").map_or(url, |(scheme, _)| scheme);
    match scheme {
        "memory" if url == "memory" => memory(),
        "redis" | "rediss" | "redis-cluster" => redis(url, options).await,
        "postgres" | "postgresql" => postgres(url, options).await,
        "mysql" | "mariadb" => mysql(url, options).await,
        _ => Err(OpenError::UnknownScheme(redacted(url))),
    }
}

fn connect(url: &str) -> impl FnOnce(StoreError) -> OpenError + '_ {
    move |source| OpenError::Connect {
        url: redacted(url),
        source,
    }
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
fn migrate(url: &str) -> impl FnOnce(StoreError) -> OpenError + '_ {
    move |source| OpenError::Migrate {
        url: redacted(url),
        source,
    }
}

#[cfg(feature = "memory")]
fn memory() -> Result<Arc<dyn IdempotencyStore>, OpenError> {
    Ok(Arc::new(crate::MemoryStore::new()))
}

#[cfg(not(feature = "memory"))]
fn memory() -> Result<Arc<dyn IdempotencyStore>, OpenError> {
    Err(OpenError::NotBuilt {
        store: "memory",
        feature: "memory",
    })
}

#[cfg(feature = "redis")]
async fn redis(url: &str, options: &OpenOptions) -> Result<Arc<dyn IdempotencyStore>, OpenError> {
    let store = match url.strip_prefix("redis-cluster://") {
        Some(nodes) => {
            let nodes: Vec<String> = nodes
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| format!("redis://{n}"))
                .collect();
            if nodes.is_empty() {
                return Err(OpenError::UnknownScheme(redacted(url)));
            }
            crate::RedisStore::connect_cluster(&nodes)
                .await
                .map_err(connect(url))?
        }
        None => crate::RedisStore::connect(url)
            .await
            .map_err(connect(url))?,
    };
    Ok(Arc::new(match &options.prefix {
        Some(prefix) => store.prefix(prefix.clone()),
        None => store,
    }))
}

#[cfg(not(feature = "redis"))]
async fn redis(url: &str, options: &OpenOptions) -> Result<Arc<dyn IdempotencyStore>, OpenError> {
    let _ = (url, options, connect(url));
    Err(OpenError::NotBuilt {
        store: "Redis",
        feature: "redis",
    })
}

#[cfg(feature = "postgres")]
async fn postgres(
    url: &str,
    options: &OpenOptions,
) -> Result<Arc<dyn IdempotencyStore>, OpenError> {
    let pool = crate::sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(options.connect_timeout)
        .connect(url)
        .await
        .map_err(|e| connect(url)(StoreError::backend(e)))?;
    let mut store = crate::PostgresStore::new(pool);
    if let Some(table) = &options.table {
        store = store.table(table.clone());
    }
    if !options.sweep {
        store = store.sweep_interval(Duration::ZERO);
    }
    if options.migrate {
        store.migrate().await.map_err(migrate(url))?;
    }
    Ok(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
async fn postgres(
    url: &str,
    options: &OpenOptions,
) -> Result<Arc<dyn IdempotencyStore>, OpenError> {
    let _ = (url, options);
    Err(OpenError::NotBuilt {
        store: "PostgreSQL",
        feature: "postgres",
    })
}

#[cfg(feature = "mysql")]
async fn mysql(url: &str, options: &OpenOptions) -> Result<Arc<dyn IdempotencyStore>, OpenError> {
    // sqlx speaks to MariaDB with the mysql:// scheme.
    let sqlx_url = match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url.to_owned(),
    };
    let pool = crate::sqlx::mysql::MySqlPoolOptions::new()
        .acquire_timeout(options.connect_timeout)
        .connect(&sqlx_url)
        .await
        .map_err(|e| connect(url)(StoreError::backend(e)))?;
    let mut store = crate::MySqlStore::new(pool);
    if let Some(table) = &options.table {
        store = store.table(table.clone());
    }
    if !options.sweep {
        store = store.sweep_interval(Duration::ZERO);
    }
    if options.migrate {
        store.migrate().await.map_err(migrate(url))?;
    }
    Ok(Arc::new(store))
}

#[cfg(not(feature = "mysql"))]
async fn mysql(url: &str, options: &OpenOptions) -> Result<Arc<dyn IdempotencyStore>, OpenError> {
    let _ = (url, options);
    Err(OpenError::NotBuilt {
        store: "MySQL",
        feature: "mysql",
    })
}

/// `url` with the password of its user information (`user:password@`) replaced by `***`:
/// a store URL as a program may print or log it.
///
/// ```
/// use tower_idempotency::store::redact_password;
///
/// assert_eq!(
///     redact_password("postgres://app:s3cr3t@db:5432/orders"),
///     "postgres://app:***@db:5432/orders"
/// );
/// assert_eq!(redact_password("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
/// ```
pub fn redact_password(url: &str) -> String {
    redacted(url)
}

fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The authority ends at the first `/`, `?` or `#`; its user information at its last `@`.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let (userinfo, host) = authority.split_at(at);
    let user = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => userinfo.to_owned(),
    };
    format!("{scheme}://{user}{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redacted("postgres://app:s3cr3t@db:5432/orders"),
            "postgres://app:***@db:5432/orders"
        );
        assert_eq!(
            redacted("redis://:p@ss@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(redacted("mysql://root@db/test"), "mysql://root@db/test");
        assert_eq!(redacted("memory"), "memory");
        assert_eq!(
            redacted("redis://cache:6379/0?password=x@y"),
            "redis://cache:6379/0?password=x@y"
        );
    }

    #[tokio::test]
    async fn unknown_and_malformed_urls_are_refused_clearly() {
        for url in ["mongodb://x", "", "memory://", "ftp://user:pw@host/"] {
            let err = open(url).await.err().expect("refused");
            let text = err.to_string();
            assert!(matches!(err, OpenError::UnknownScheme(_)), "{url}: {text}");
            assert!(!text.contains("pw@"), "{text}");
        }
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_opens() {
        let store = open(" memory ").await.expect("a memory store");
        assert_eq!(store.backend_name(), "memory");
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn a_refused_connection_hides_the_password() {
        // Nothing listens on port 1.
        let options = OpenOptions::new().connect_timeout(Duration::from_millis(500));
        let err = open_with("postgres://app:hunter2@127.0.0.1:1/db", &options)
            .await
            .err()
            .expect("refused");
        let text = format!("{err}");
        assert!(matches!(err, OpenError::Connect { .. }), "{text}");
        assert!(text.contains("app:***@"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
