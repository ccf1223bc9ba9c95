//! A Redis store (feature `redis`), shared by every instance of a service.
//!
//! [`RedisStore`] keeps each operation under **one Redis key**, `{prefix}{store_key}`
//! (for example `idempotency:anon:8e03978e-40d5`), and every script touches that key alone,
//! so the layout suits Redis Cluster as well as a single server. The store talks through a
//! [`ConnectionManager`] (one server, a replica set's primary, or a cluster proxy), or,
//! built with [`RedisStore::connect_cluster`], through the cluster client: there each key
//! carries a hash tag of the store's own, made from a hash of the whole store key
//! (`{prefix}{{16 hex digits}}{store_key}`), so that keys spread over every slot whatever
//! braces a client puts in its keys. Entries expire by themselves (`PX`), so no sweep job is needed: a completed
//! record when its TTL ends, an in-flight claim [`ORPHAN_RETENTION`] after its lease.
//!
//! The lease is fenced by token, not by the key's expiry: the claim's value carries its
//! lease deadline, judged by the server's clock (`TIME`), and only a new claim that finds
//! the deadline passed takes the key over. Until one does, an owner whose lease lapsed
//! during an outage can still extend it or store its outcome.
//!
//! # Value layout
//!
//! The key holds a single string whose first byte tells what it is:
//!
//! | State | Value |
//! |---|---|
//! | in flight | `L`, the 16-byte [`LeaseToken`], the 32-byte [`Fingerprint`], then `C` if the lapsed lease is contested or `K` if the claim is committed, then the lease deadline in milliseconds since the Unix epoch by the server's clock, in decimal digits |
//! | completed | `R`, then the record's versioned binary encoding ([`Record::encode`]) |
//!
//! # Scripts and round trips
//!
//! Each operation is one Lua script, so it is atomic on the server and costs **exactly one
//! round trip** (`EVALSHA`):
//!
//! | Operation | Script |
//! |---|---|
//! | `claim` (and replay) | key absent, or in flight past a contested deadline: `SET value PX lease+retention`, answer *acquired*; in flight past an uncontested deadline: mark it contested with a deadline half a lease away ([`takeover_grace`](super::takeover_grace)), answer *in flight*; in flight: answer the holder's fingerprint and remaining lease; completed: answer the record |
//! | `complete` | if the value starts with `L` + this token: `SET R… PX ttl`; if it already is this very record: done; else *lost* |
//! | `release` | if the value starts with `L` + this token: `DEL` (committed: the deadline becomes now, *committed*), else *lost* |
//! | `extend` | if the value starts with `L` + this token: a new deadline, `PX lease+retention` (committed: `PX` the later of the lease and the commit's expiry), else *lost* |
//! | `revoke` | if the value starts with `L` + this token: `DEL`, committed or not, else *lost* |
//! | `commit` | if the value starts with `L` + this token: mark it `K`, `PX` the TTL (or the rest of the lease, if longer), else *lost* |
//! | `settle` | if the value is committed (`K`) and its deadline passed: `SET R… PX` the TTL or the key's remaining `PTTL`, whichever is longer |
//! | `inspect` | `GET`, `TIME` and `PTTL` in one script |
//! | `purge` | `DEL` (a plain command) |
//!
//! A committed claim whose deadline passed answers a claim with its fingerprint and token:
//! [`Claim::OutcomeUnknown`]. It is never contested nor taken over, and expires with the
//! TTL it was committed for.
//!
//! The fencing scripts read only the first 17 bytes of the value (`GETRANGE`), so checking
//! a token never copies a stored record. A *lost* answer becomes [`StoreError::LeaseLost`].
//!
//! The scripts are loaded with `SCRIPT LOAD` (one pipelined round trip) by
//! [`RedisStore::connect`] and then invoked by their SHA-1. Should the server not know a
//! script (a store built with [`RedisStore::new`], a restarted or failed-over server), the
//! call that finds out loads it and retries once, and every later call is one round trip
//! again.
//!
//! A duplicate in wait mode ([`wait`](IdempotencyStore::wait)) is woken by pub/sub, not by
//! polling: it subscribes to a channel named after the Redis key (one pub/sub connection per
//! store, opened at the first wait; one `SUBSCRIBE` per key waited on, however many wait on
//! it) before it claims, and the scripts that end a key (`complete`, `release`, `revoke`,
//! `settle`, and `purge`) `PUBLISH` an empty message on that channel, inside the script, so
//! at no extra round trip. A `PUBLISH` the server refuses (an ACL user without channel
//! permissions, Redis 7's default for new users) is ignored: the key's change stands and
//! the call answers as it would otherwise, and waiters elsewhere find it by polling. It
//! claims again when the message arrives (a tenth of a
//! millisecond on loopback, see BENCHMARKS.md), when the holder's lease ends, and at least
//! every 500 ms as a safety net. Waiters in the process that ended the key are woken
//! directly. When the pub/sub connection is lost, every waiter looks again and subscribes
//! anew; while it cannot, it polls (5 ms doubling up to 250 ms). On a cluster
//! ([`RedisStore::connect_cluster`], where `PUBLISH` reaches every node) the scripts do
//! not publish, and waiters poll, woken directly only by their own process; so do the
//! waiters of a store built with [`RedisStore::new`] without [`RedisStore::pubsub`] (no
//! client to open a pub/sub connection with), though its scripts publish for others.
//!
//! Connection and I/O errors become [`StoreError::Backend`] (the layer answers `503` by
//! default); a value it cannot read becomes [`StoreError::Decode`]. The
//! [`ConnectionManager`] reconnects by itself, so the store serves again as soon as Redis is
//! back.
//!
//! # What the server must keep
//!
//! Redis answers a write once it is in memory; what it keeps after that is the server's
//! settings. A record that Redis forgets makes the retry of its key run the operation
//! again, and a claim it forgets lets a duplicate run beside the first. So the server must
//! run with:
//!
//! - `appendonly yes`: without an append-only file a restart loses every record written
//!   since the last RDB snapshot (or all of them, with none);
//! - `appendfsync always` to lose nothing when the machine crashes (`everysec`, Redis's
//!   default, can lose about the last second: a crash of Redis alone loses nothing, since
//!   the file is in the kernel's cache);
//! - `maxmemory-policy noeviction`: every key of this store has an expiry, so any other
//!   policy (`volatile-*` included) may delete live claims and unexpired records under memory
//!   pressure. With `noeviction` a full Redis refuses new claims instead
//!   ([`StoreError::Full`]: the layer answers `503 store-full`, whatever its store-failure
//!   policy), and still replays what it holds.
//!
//! [`RedisStore::connect`] reads these settings ([`RedisStore::check_server`]) and logs a
//! `warn` for each [`RedisRisk`]; [`RedisStore::connect_strict`] refuses such a server.
//!
//! **Replication and failover.** Replicas are fed asynchronously: a failover can lose the
//! writes the old primary acknowledged last, so a record (and the retry replays nothing and
//! runs again) or a claim (and a duplicate runs beside its owner) can be lost. To close that
//! window, [`RedisStore::durability`] makes `complete` wait until the record is on replicas
//! (`WAIT`, [`Durability::Replicated`]) or fsynced to append-only files (`WAITAOF`, Redis
//! 7.2+, [`Durability::Fsynced`]), at the cost of that wait on every completion. Claims are
//! not waited for: a claim lost in a failover lets one duplicate run while its owner still
//! runs, which only a store with synchronous replication (PostgreSQL with synchronous
//! standbys) rules out.
//!
//! # Example
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyLayer, RedisStore};
//!
//! # async fn run() -> Result<(), tower_idempotency::StoreError> {
//! let store = RedisStore::connect("redis://127.0.0.1:6379")
//!     .await?
//!     .prefix("payments:idempotency:");
//! let app: Router = Router::new()
//!     .route("/payments", post(|body: String| async move { format!("charged {body}") }))
//!     .layer(IdempotencyLayer::new(store));
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Claim, IdempotencyStore, KeyState, LeaseToken, ORPHAN_RETENTION, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::Record;
mod connection;
mod push;
mod scripts;
mod walk;

use super::wakeup::{Polling, Wait, wait_woken};
use connection::{Connection, WaitPool, Waiter, cluster_slot};
use push::RedisPush;
use scripts::*;

const DEFAULT_PREFIX: &str = "idempotency:";

/// An [`IdempotencyStore`] in Redis, for fleets of instances (feature `redis`).
///
/// One key per operation, one Lua script per store call, one round trip per claim,
/// completion, release, extension and replay: see the [module documentation](self) for the
/// layout and the scripts.
///
/// It talks to Redis through a [`ConnectionManager`], which multiplexes every call on one
/// connection and reconnects by itself after a failure. Cloning a `RedisStore` gives
/// another handle on the same connection.
///
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, RedisStore};
///
/// # async fn run() -> Result<(), tower_idempotency::StoreError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let layer = IdempotencyLayer::new(store);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisStore {
    conn: Connection,
    prefix: Arc<str>,
    durability: Durability,
    push: Arc<RedisPush>,
    /// Connections of their own for the completions that wait for durability, when the
    /// store knows its server's client (one server, not a cluster).
    waits: Option<Arc<WaitPool>>,
}

/// The risks of the server behind `con` (see [`RedisStore::check_server`]).
async fn risks_on(
    con: &mut (impl redis::aio::ConnectionLike + Send),
) -> Result<Vec<RedisRisk>, StoreError> {
    let persistence: String = redis::cmd("INFO")
        .arg("persistence")
        .query_async(con)
        .await
        .map_err(StoreError::backend)?;
    let memory: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(con)
        .await
        .map_err(StoreError::backend)?;
    let fsync: Option<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query_async::<Vec<String>>(con)
        .await
        .ok()
        .and_then(|pair| pair.into_iter().nth(1));
    Ok(risks_of(&persistence, &memory, fsync.as_deref()))
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis server at `url` (such as `redis://127.0.0.1:6379` or
    /// `rediss://user:password@host:6380/2`) and loads the store's scripts.
    ///
    /// The connection is set to fail fast when Redis is down, so that the layer answers
    /// `503` promptly instead of holding requests: each connection attempt times out after
    /// 1 second, each command after 2 seconds, and a lost connection is retried twice
    /// (50 ms, then up to 500 ms apart) before the call fails; the next call tries again. For
    /// other settings, build a [`ConnectionManager`] yourself and use [`RedisStore::new`].
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::open(url).await?;
        store.warn_of_risks().await;
        Ok(store)
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port` each; the
    /// client finds the others), loads the scripts on every primary, and logs a `warn` for
    /// each [`RedisRisk`] of the nodes given.
    ///
    /// Every operation still touches one key, so it runs on the node that holds it, in one
    /// round trip. On a cluster the Redis key carries a hash tag of its own, made from a hash
    /// of the whole store key (`idempotency:{3f2a…}anon:k1`): keys spread over every slot, and
    /// a client cannot pin its keys, or everyone's, to one node by putting braces in them.
    /// (A prefix with a hash tag of its own, such as `{orders}:`, pins the store to one slot
    /// on purpose.) Durability waits ([`durability`](Self::durability)) go to the primary of
    /// the key just written.
    ///
    /// The cluster client fails fast as [`connect`](Self::connect)'s does: 1 s to connect,
    /// 2 s per command, two retries.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect_cluster([
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    /// ])
    /// .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_cluster(
        nodes: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Result<Self, StoreError> {
        let nodes: Arc<[String]> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        let client = redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(2))
            .retries(2)
            .build()
            .map_err(StoreError::backend)?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(StoreError::backend)?;
        let store = Self {
            conn: Connection::Cluster { conn, nodes },
            prefix: Arc::from(DEFAULT_PREFIX),
            durability: Durability::Acknowledged,
            push: Arc::new(RedisPush::new(None)),
            waits: None,
        };
        store.load_scripts().await?;
        store.warn_of_risks().await;
        Ok(store)
    }

    /// Logs a `warn` for each [`RedisRisk`] of the server (or the cluster nodes given).
    async fn warn_of_risks(&self) {
        match self.check_server().await {
            Ok(risks) => {
                for risk in &risks {
                    tracing::warn!(risk = %risk, "the Redis server can lose idempotency records");
                }
            }
            Err(err) => tracing::warn!(
                error = %super::ErrorChain(&err),
                "could not read the Redis server's persistence and eviction settings"
            ),
        }
    }

    /// Like [`connect`](Self::connect), but refuses a server that can lose records: any
    /// [`RedisRisk`] (no append-only file, `appendfsync` other than `always`, an eviction
    /// policy other than `noeviction`), or settings that cannot be read, fail with
    /// [`StoreError::Backend`] holding an [`UnsafeRedis`] that names them.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// // redis-server --appendonly yes --appendfsync always --maxmemory-policy noeviction
    /// let store = tower_idempotency::RedisStore::connect_strict("redis://127.0.0.1:6379").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_strict(url: &str) -> Result<Self, StoreError> {
        let store = Self::open(url).await?;
        let risks = store.check_server().await?;
        if risks.is_empty() {
            Ok(store)
        } else {
            Err(StoreError::backend(UnsafeRedis { risks }))
        }
    }

    /// Reads the server's persistence and eviction settings (`INFO persistence`, `INFO
    /// memory`, `CONFIG GET appendfsync`) and returns every way they can lose records; empty
    /// when there is none. [`connect`](Self::connect) logs each at `warn`; call it yourself
    /// on a store built with [`new`](Self::new), or from a health check.
    ///
    /// A server whose `CONFIG` command is disabled (as on some managed services) cannot say
    /// how it syncs its append-only file: that is reported as
    /// [`RedisRisk::FsyncUnknown`].
    pub async fn check_server(&self) -> Result<Vec<RedisRisk>, StoreError> {
        match &self.conn {
            Connection::Single(manager) => risks_on(&mut manager.clone()).await,
            // Each node keeps its own share of the keys: any of them can lose records.
            Connection::Cluster { nodes, .. } => {
                let mut all = Vec::new();
                for node in nodes.iter() {
                    let client = redis::Client::open(node.as_str()).map_err(StoreError::backend)?;
                    let mut con = client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(StoreError::backend)?;
                    for risk in risks_on(&mut con).await? {
                        if !all.contains(&risk) {
                            all.push(risk);
                        }
                    }
                }
                Ok(all)
            }
        }
    }

    /// How long `complete` waits, after storing a record, for it to be safe from a crash or
    /// a failover. Default: [`Durability::Acknowledged`] (no wait).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_idempotency::store::redis::Durability;
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1:6379")
    ///     .await?
    ///     .durability(Durability::Replicated {
    ///         replicas: 1,
    ///         timeout: Duration::from_millis(200),
    ///     });
    /// # Ok(())
    /// # }
    /// ```
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Connects and loads the scripts.
    async fn open(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::backend)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(StoreError::backend)?;
        let mut store = Self::new(manager);
        store.waits = Some(Arc::new(WaitPool::new(client.clone())));
        store.push = Arc::new(RedisPush::new(Some(client)));
        store.load_scripts().await?;
        Ok(store)
    }

    /// A store on a connection you built, with the default prefix.
    ///
    /// The scripts are not loaded here: the first call of each finds the server without it,
    /// loads it and retries (three commands, once); [`RedisStore::connect`] loads them
    /// ahead.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_idempotency::RedisStore;
    /// use tower_idempotency::redis::{Client, aio::{ConnectionManager, ConnectionManagerConfig}};
    ///
    /// # async fn run() -> Result<(), tower_idempotency::redis::RedisError> {
    /// let client = Client::open("redis://127.0.0.1:6379")?;
    /// let config = ConnectionManagerConfig::new()
    ///     .set_response_timeout(Some(Duration::from_millis(500)));
    /// let manager = ConnectionManager::new_with_config(client, config).await?;
    /// let store = RedisStore::new(manager);
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(manager: ConnectionManager) -> Self {
        Self {
            conn: Connection::Single(manager),
            prefix: Arc::from(DEFAULT_PREFIX),
            durability: Durability::Acknowledged,
            push: Arc::new(RedisPush::new(None)),
            waits: None,
        }
    }

    /// The client the store opens its pub/sub connection with, so that duplicates in wait
    /// mode are woken by the end of the key they wait on instead of polling (see
    /// [the module documentation](crate::store::redis)). [`connect`](Self::connect) sets it;
    /// a store built with [`new`](Self::new) has none until this is called. Use the client
    /// of the same server (or proxy) as the connection. Completions that wait for
    /// [`durability`](Self::durability) open their own connections with it too (see
    /// [`Durability`]). Ignored on a cluster.
    ///
    /// ```no_run
    /// use tower_idempotency::RedisStore;
    /// use tower_idempotency::redis::{Client, aio::ConnectionManager};
    ///
    /// # async fn run() -> Result<(), tower_idempotency::redis::RedisError> {
    /// let client = Client::open("redis://127.0.0.1:6379")?;
    /// let manager = ConnectionManager::new(client.clone()).await?;
    /// let store = RedisStore::new(manager).pubsub(client);
    /// # Ok(())
    /// # }
    /// ```
    pub fn pubsub(mut self, client: redis::Client) -> Self {
        if matches!(self.conn, Connection::Single(_)) {
            self.waits = Some(Arc::new(WaitPool::new(client.clone())));
            self.push = Arc::new(RedisPush::new(Some(client)));
        }
        self
    }

    /// The prefix of every Redis key the store writes, so that several services (or
    /// environments) can share one Redis. Default: `idempotency:`.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1:6379")
    ///     .await?
    ///     .prefix("orders:idem:");
    /// # Ok(())
    /// # }
    /// ```
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    /// Loads the scripts in one pipelined round trip (on a cluster, one `SCRIPT LOAD` per
    /// script, which the cluster client sends to every primary).
    async fn load_scripts(&self) -> Result<(), StoreError> {
        if matches!(self.conn, Connection::Cluster { .. }) {
            let mut con = self.conn.clone();
            for code in ALL_LUA {
                let () = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(code)
                    .exec_async(&mut con)
                    .await
                    .map_err(StoreError::backend)?;
            }
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for code in ALL_LUA {
            pipe.cmd("SCRIPT").arg("LOAD").arg(code);
        }
        let mut con = self.conn.clone();
        let _: Vec<String> = pipe
            .query_async(&mut con)
            .await
            .map_err(StoreError::backend)?;
        Ok(())
    }

    fn redis_key(&self, key: &StoreKey) -> String {
        let mut k = String::with_capacity(self.prefix.len() + 19 + key.as_str().len());
        k.push_str(&self.prefix);
        if matches!(self.conn, Connection::Cluster { .. }) {
            // On a cluster the key's slot is chosen here, from a hash of the whole store key:
            // a client key with braces of its own (`{x}`) comes after this tag, so it cannot
            // pin every key to one slot, or one node.
            let tag = xxhash_rust::xxh3::xxh3_64(key.as_str().as_bytes());
            k.push('{');
            k.push_str(&format!("{tag:016x}"));
            k.push('}');
        }
        k.push_str(key.as_str());
        k
    }

    /// Waits, as [`Durability`] says, until the writes of this connection (the record just
    /// stored among them) are on enough replicas or in enough append-only files.
    async fn wait_durable(&self, key: &StoreKey) -> Result<(), StoreError> {
        if matches!(self.durability, Durability::Acknowledged) {
            return Ok(());
        }
        let slot = match self.conn {
            Connection::Cluster { .. } => cluster_slot(self.redis_key(key).as_bytes()),
            Connection::Single(_) => 0,
        };
        let mut con = Waiter {
            conn: self.conn.clone(),
            slot,
        };
        self.wait_on(&mut con).await
    }

    /// The wait of [`Durability`], sent on `con` (whose writes it counts).
    async fn wait_on(
        &self,
        con: &mut (impl redis::aio::ConnectionLike + Send),
    ) -> Result<(), StoreError> {
        match self.durability {
            Durability::Acknowledged => Ok(()),
            Durability::Replicated { replicas, timeout } => {
                let acked: u64 = redis::cmd("WAIT")
                    .arg(replicas)
                    .arg(wait_millis(timeout))
                    .query_async(con)
                    .await
                    .map_err(StoreError::backend)?;
                if acked >= u64::from(replicas) {
                    Ok(())
                } else {
                    Err(StoreError::backend(NotDurable(format!(
                        "{acked} of {replicas} replicas acknowledged the record within {timeout:?}"
                    ))))
                }
            }
            Durability::Fsynced {
                local,
                replicas,
                timeout,
            } => {
                let (on_disk, on_replicas): (u64, u64) = redis::cmd("WAITAOF")
                    .arg(u8::from(local))
                    .arg(replicas)
                    .arg(wait_millis(timeout))
                    .query_async(con)
                    .await
                    .map_err(StoreError::backend)?;
                if on_disk >= u64::from(local) && on_replicas >= u64::from(replicas) {
                    Ok(())
                } else {
                    Err(StoreError::backend(NotDurable(format!(
                        "the record reached {on_disk} local and {on_replicas} replica \
                         append-only files within {timeout:?}, {} and {replicas} wanted",
                        u8::from(local)
                    ))))
                }
            }
        }
    }

    /// Runs a fencing script (complete, release, extend, commit): 1 is done, 0 is lost,
    /// 2 is committed (release only).
    async fn fenced(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<(), StoreError> {
        let mut con = self.conn.clone();
        fenced_on(&mut con, invocation).await
    }

    /// The pool a completion takes a connection from to store its record and wait on it:
    /// `None` when it does not wait, or the store has no pool (a cluster, or a store from
    /// [`new`](Self::new) without [`pubsub`](Self::pubsub)).
    fn waits(&self) -> Option<&WaitPool> {
        match self.durability {
            Durability::Acknowledged => None,
            _ => self.waits.as_deref(),
        }
    }

    /// How long the wait of [`Durability`] may last.
    fn wait_timeout(&self) -> Duration {
        match self.durability {
            Durability::Acknowledged => Duration::ZERO,
            Durability::Replicated { timeout, .. } | Durability::Fsynced { timeout, .. } => timeout,
        }
    }

    /// Writes with `invocation` on a connection of `pool` and waits there for the write to
    /// be durable; `written` says from the script's answer whether it wrote (or found) the
    /// record, so that the wait follows. The connection goes back to the pool unless a
    /// command on it failed.
    async fn write_and_wait(
        &self,
        pool: &WaitPool,
        name: &str,
        invocation: &redis::ScriptInvocation<'_>,
        written: impl FnOnce(i64) -> Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        let mut taken = pool
            .take(self.wait_timeout())
            .await
            .map_err(StoreError::backend)?;
        let answer: i64 = invocation
            .invoke_async(&mut taken.con)
            .await
            .map_err(StoreError::backend)?;
        // The script answered: the connection is sound, whatever the answer says.
        match written(answer) {
            Ok(true) => {}
            Ok(false) => {
                pool.give_back(taken);
                return Ok(false);
            }
            Err(err) => {
                pool.give_back(taken);
                return Err(err);
            }
        }
        self.push.wakeups.wake(name);
        match self.wait_on(&mut taken.con).await {
            Ok(()) => {
                pool.give_back(taken);
                Ok(true)
            }
            Err(err) => {
                // A wait that fell short answered: the connection is sound.
                if err_is_not_durable(&err) {
                    pool.give_back(taken);
                }
                Err(err)
            }
        }
    }

    /// Whether the scripts publish the end of a key, for the waiters of other instances:
    /// on one server, whether or not this store listens itself (others may); never on a
    /// cluster, where a `PUBLISH` goes to every node.
    fn publishes(&self) -> bool {
        matches!(self.conn, Connection::Single(_))
    }

    /// The scripts' last argument: whether they publish what they did.
    fn announce(&self) -> &'static str {
        if self.publishes() { "1" } else { "0" }
    }

    fn record_value(record: &Record) -> Vec<u8> {
        let encoded = record.encode();
        let mut value = Vec::with_capacity(1 + encoded.len());
        value.push(TAG_RECORD);
        value.extend_from_slice(&encoded);
        value
    }
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let mut value = [0u8; 49];
        value[..17].copy_from_slice(&owner_prefix(token));
        value[17..].copy_from_slice(fingerprint.as_bytes());
        let mut con = self.conn.clone();
        let reply: Value = SCRIPTS
            .claim
            .key(self.redis_key(key))
            .arg(&value[..])
            .arg(millis(lease))
            .arg(millis(ORPHAN_RETENTION))
            .invoke_async(&mut con)
            .await
            .map_err(|err| {
                // `maxmemory` reached under `noeviction`: the script's write was refused and
                // nothing changed (replays, which only read, still work).
                if err.code() == Some("OOM") {
                    StoreError::Full
                } else {
                    StoreError::backend(err)
                }
            })?;
        parse_claim(reply, token)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let value = Self::record_value(&record);
        let name = self.redis_key(key);
        let mut invocation = SCRIPTS.complete.key(&name);
        invocation
            .arg(&owner_prefix(token)[..])
            .arg(value)
            .arg(millis(ttl))
            .arg(self.announce());
        if let Some(pool) = self.waits() {
            self.write_and_wait(pool, &name, &invocation, |done| {
                fence_answer(done).map(|()| true)
            })
            .await?;
            return Ok(());
        }
        self.fenced(&invocation).await?;
        self.push.wakeups.wake(&name);
        self.wait_durable(key).await
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let name = self.redis_key(key);
        let released = self
            .fenced(
                SCRIPTS
                    .release
                    .key(&name)
                    .arg(&owner_prefix(token)[..])
                    .arg(self.announce()),
            )
            .await;
        if matches!(released, Ok(()) | Err(StoreError::Committed)) {
            self.push.wakeups.wake(&name);
        }
        released
    }

    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let name = self.redis_key(key);
        self.fenced(
            SCRIPTS
                .revoke
                .key(&name)
                .arg(&owner_prefix(token)[..])
                .arg(self.announce()),
        )
        .await?;
        self.push.wakeups.wake(&name);
        Ok(())
    }

    async fn wait(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
        timeout: Duration,
    ) -> Result<Claim, StoreError> {
        let name = self.redis_key(key);
        let push = self.push.listens().then_some(&*self.push as _);
        let wait = Wait {
            key,
            fingerprint,
            token,
            lease,
            timeout,
        };
        wait_woken(
            self,
            &self.push.wakeups,
            &name,
            push,
            Polling::DEFAULT,
            wait,
        )
        .await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.fenced(
            SCRIPTS
                .extend
                .key(self.redis_key(key))
                .arg(&owner_prefix(token)[..])
                .arg(millis(lease))
                .arg(millis(ORPHAN_RETENTION)),
        )
        .await
    }

    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.fenced(
            SCRIPTS
                .commit
                .key(self.redis_key(key))
                .arg(&owner_prefix(token)[..])
                .arg(millis(ttl)),
        )
        .await
    }

    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut con = self.conn.clone();
        let name = self.redis_key(key);
        let mut invocation = SCRIPTS.settle.key(&name);
        invocation
            .arg(Self::record_value(&record))
            .arg(millis(ttl))
            .arg(self.announce());
        if let Some(pool) = self.waits() {
            return self
                .write_and_wait(pool, &name, &invocation, |done| Ok(done == 1))
                .await;
        }
        let done: i64 = invocation
            .invoke_async(&mut con)
            .await
            .map_err(StoreError::backend)?;
        if done == 1 {
            self.push.wakeups.wake(&name);
            self.wait_durable(key).await?;
        }
        Ok(done == 1)
    }

    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        let mut con = self.conn.clone();
        let reply: Value = SCRIPTS
            .inspect
            .key(self.redis_key(key))
            .invoke_async(&mut con)
            .await
            .map_err(StoreError::backend)?;
        parse_inspect(reply)
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let mut con = self.conn.clone();
        let name = self.redis_key(key);
        let removed: i64 = redis::cmd("DEL")
            .arg(&name)
            .query_async(&mut con)
            .await
            .map_err(StoreError::backend)?;
        if self.publishes() {
            // After the key is gone, and whatever the answer: a `PUBLISH` the server refuses
            // (an ACL user without channel permissions) must not turn a done purge into an
            // error. An operator's command, rare: a second round trip.
            let _listeners: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(&name)
                .arg("")
                .query_async(&mut con)
                .await;
        }
        self.push.wakeups.wake(&name);
        Ok(removed > 0)
    }

    /// A `SCAN … MATCH {prefix}*` step (on every primary of a cluster, one after the other),
    /// each key read with the inspect script. `SCAN` may return a key twice.
    async fn list(
        &self,
        filter: &super::ListFilter,
        cursor: Option<&super::Cursor>,
    ) -> Result<super::ListPage, StoreError> {
        self.list_page(filter, cursor).await
    }

    /// Redis expires entries by itself (`PX`) exactly when the other stores sweep them:
    /// a vacuum walks the keys (Redis reclaims every expired key the walk passes) and
    /// reports nothing removed.
    async fn vacuum(
        &self,
        cursor: Option<&super::Cursor>,
        batch: usize,
    ) -> Result<super::VacuumPage, StoreError> {
        self.vacuum_step(cursor, batch).await
    }

    fn backend_name(&self) -> &'static str {
        "redis"
    }
}

/// Reads the reply of the inspect script: {value or nil, now in ms, PTTL}.
fn parse_inspect(reply: Value) -> Result<KeyState, StoreError> {
    let Value::Array(items) = reply else {
        return Err(damaged("redis inspect reply"));
    };
    let [value, now, pttl] = items.as_slice() else {
        return Err(damaged("redis inspect reply"));
    };
    let (Value::Int(now), Value::Int(pttl)) = (now, pttl) else {
        return Err(damaged("redis inspect reply"));
    };
    let expires_in = (*pttl > 0).then(|| Duration::from_millis(pttl.unsigned_abs()));
    let Some(value) = bytes_of(value) else {
        return Ok(KeyState::Free);
    };
    match value.split_first() {
        Some((&TAG_RECORD, encoded)) => Ok(KeyState::Completed {
            record: Arc::new(Record::decode(encoded).map_err(StoreError::Decode)?),
            expires_in,
        }),
        Some((&TAG_IN_FLIGHT, rest)) if rest.len() >= 48 => {
            let fingerprint: [u8; 32] = rest[16..48]
                .try_into()
                .map_err(|_| damaged("in-flight fingerprint"))?;
            let fingerprint = Fingerprint::from_bytes(fingerprint);
            let tail = &rest[48..];
            let (flag, digits) = match tail.first() {
                Some(&f @ (b'C' | b'K')) => (Some(f), &tail[1..]),
                _ => (None, tail),
            };
            let deadline = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse::<i64>().ok());
            let remaining = match deadline {
                Some(deadline) => deadline.saturating_sub(*now),
                None => *pttl,
            };
            let committed = flag == Some(b'K');
            if committed && remaining <= 0 {
                return Ok(KeyState::OutcomeUnknown {
                    fingerprint,
                    expires_in,
                });
            }
            Ok(KeyState::InFlight {
                fingerprint,
                lease_remaining: Duration::from_millis(remaining.max(0).unsigned_abs()),
                committed,
            })
        }
        _ => Err(damaged("redis value tag")),
    }
}

/// Runs a fencing script on `con`: 1 is done, 0 is lost, 2 is committed (release only).
async fn fenced_on(
    con: &mut (impl redis::aio::ConnectionLike + Send),
    invocation: &redis::ScriptInvocation<'_>,
) -> Result<(), StoreError> {
    let done: i64 = invocation
        .invoke_async(con)
        .await
        .map_err(StoreError::backend)?;
    fence_answer(done)
}

/// What a fencing script's answer means.
fn fence_answer(done: i64) -> Result<(), StoreError> {
    match done {
        1 => Ok(()),
        2 => Err(StoreError::Committed),
        _ => Err(StoreError::LeaseLost),
    }
}

/// Whether `err` is a durability wait that answered, short of what it asked.
fn err_is_not_durable(err: &StoreError) -> bool {
    std::error::Error::source(err).is_some_and(|source| source.is::<NotDurable>())
}

/// A timeout for `WAIT` / `WAITAOF` in milliseconds: at least 1, since 0 waits forever.
fn wait_millis(timeout: Duration) -> u64 {
    millis(timeout)
}

/// How long [`RedisStore`]'s `complete` waits, after storing a record, before it counts as
/// stored. Set with [`RedisStore::durability`].
///
/// Redis acknowledges a write once it is in the primary's memory. A record acknowledged
/// that way is lost if the primary crashes before its append-only file is synced, or fails
/// over before a replica has it; a retry of that key then runs the operation again. Waiting
/// closes that window, for the time of one more round trip on every completion.
///
/// When the wait falls short (too few replicas or files within `timeout`), `complete` fails
/// with [`StoreError::Backend`]; the record is on the primary all the same, so retries
/// replay it, and the layer calls `complete` again (a key that already holds the same
/// record answers done), which waits again.
///
/// `WAIT` and `WAITAOF` count the writes of the connection they are sent on, and the server
/// answers nothing else on that connection until they return. So on one server, a
/// completion that waits takes a connection of its own from a pool (up to 16 at once; more
/// queue for one), stores its record there and waits there: the store's shared connection,
/// which carries every other call, is never held up, and the wait always covers the record
/// just written. A connection whose command failed is closed, not reused.
///
/// **Known limit:** a store with no client to open those connections with (on a Redis
/// Cluster, or built with [`RedisStore::new`] and no [`pubsub`](RedisStore::pubsub)) waits on
/// its shared connection (on a cluster, the shared connection to the key's primary): every
/// other call sent there waits behind it, up to `timeout` per completion. Keep `timeout`
/// short (tens of milliseconds) next to the store-call bound there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// No wait: the record counts as stored once the primary has it in memory. The default.
    #[default]
    Acknowledged,
    /// `WAIT replicas timeout`: the record is on at least `replicas` replicas.
    Replicated {
        /// How many replicas must have the record.
        replicas: u32,
        /// How long to wait for them.
        timeout: Duration,
    },
    /// `WAITAOF local replicas timeout` (Redis 7.2 or later): the record is fsynced to the
    /// primary's append-only file (when `local`) and to those of at least `replicas`
    /// replicas. An older server answers every wait with an error.
    Fsynced {
        /// Whether the primary's own append-only file must have it on disk.
        local: bool,
        /// How many replicas must have it on disk.
        replicas: u32,
        /// How long to wait.
        timeout: Duration,
    },
}

/// A way the Redis server's settings can lose idempotency records, found by
/// [`RedisStore::check_server`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisRisk {
    /// `appendonly no`: a restart loses every record written since the last RDB snapshot
    /// (all of them, without snapshots), and every retry of those keys runs again.
    NoAppendOnlyFile,
    /// `appendfsync` is not `always` (the value is given): a crash of the machine loses the
    /// records of about the last second (`everysec`) or more (`no`).
    FsyncNotAlways(String),
    /// The server did not say how it syncs its append-only file (`CONFIG` is disabled).
    FsyncUnknown,
    /// `maxmemory-policy` is not `noeviction` (the policy is given): under memory pressure
    /// Redis deletes keys, live claims and unexpired records included (every key of the store
    /// has an expiry, so the `volatile-*` policies take them too).
    Eviction(String),
}

impl fmt::Display for RedisRisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoAppendOnlyFile => f.write_str(
                "appendonly is off: a restart loses the records written since the last snapshot, and their retries run again",
            ),
            Self::FsyncNotAlways(policy) => write!(
                f,
                "appendfsync is {policy}, not always: a machine crash loses the latest records"
            ),
            Self::FsyncUnknown => f.write_str(
                "appendfsync could not be read (CONFIG is disabled): records may not survive a machine crash",
            ),
            Self::Eviction(policy) => write!(
                f,
                "maxmemory-policy is {policy}, not noeviction: under memory pressure Redis deletes live claims and records"
            ),
        }
    }
}

/// The error of [`RedisStore::connect_strict`] for a server that can lose records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafeRedis {
    /// Every way the server can lose records.
    pub risks: Vec<RedisRisk>,
}

impl fmt::Display for UnsafeRedis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the Redis server can lose idempotency records: ")?;
        for (i, risk) in self.risks.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{risk}")?;
        }
        Ok(())
    }
}

impl std::error::Error for UnsafeRedis {}

/// A durability wait fell short.
#[derive(Debug)]
struct NotDurable(String);

impl fmt::Display for NotDurable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the record is not yet durable: {}", self.0)
    }
}

impl std::error::Error for NotDurable {}

/// The value of `field` in the text of an `INFO` reply.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name == field).then(|| value.trim())
    })
}

/// The risks in a server's `INFO persistence`, `INFO memory` and `appendfsync`.
fn risks_of(persistence: &str, memory: &str, fsync: Option<&str>) -> Vec<RedisRisk> {
    let mut risks = Vec::new();
    if info_field(persistence, "aof_enabled") != Some("1") {
        risks.push(RedisRisk::NoAppendOnlyFile);
    } else {
        match fsync {
            Some("always") => {}
            Some(other) => risks.push(RedisRisk::FsyncNotAlways(other.to_owned())),
            None => risks.push(RedisRisk::FsyncUnknown),
        }
    }
    match info_field(memory, "maxmemory_policy") {
        Some("noeviction") => {}
        Some(policy) => risks.push(RedisRisk::Eviction(policy.to_owned())),
        None => risks.push(RedisRisk::Eviction("unknown".to_owned())),
    }
    risks
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_slots_are_the_servers() {
        // The examples of the Redis Cluster specification, and `CLUSTER KEYSLOT foo`.
        assert_eq!(cluster_slot(b"123456789"), 0x31C3);
        assert_eq!(cluster_slot(b"foo"), 12182);
        assert_eq!(
            cluster_slot(b"{user1000}.following"),
            cluster_slot(b"user1000")
        );
        assert_eq!(
            cluster_slot(b"{user1000}.followers"),
            cluster_slot(b"user1000")
        );
        // An empty tag does not count: the whole key is hashed.
        assert_ne!(cluster_slot(b"foo{}{bar}"), cluster_slot(b"bar"));
        assert_eq!(cluster_slot(b"foo{{bar}}zap"), cluster_slot(b"{bar"));
        assert_eq!(cluster_slot(b"foo{bar}{zap}"), cluster_slot(b"bar"));
    }

    use super::*;

    #[test]
    fn reads_the_risks_from_info() {
        let safe = risks_of(
            "# Persistence\r\naof_enabled:1\r\n",
            "maxmemory_policy:noeviction\r\n",
            Some("always"),
        );
        assert_eq!(safe, vec![]);
        let unsafe_ = risks_of(
            "aof_enabled:0\r\n",
            "maxmemory_policy:allkeys-lru\r\n",
            None,
        );
        assert_eq!(
            unsafe_,
            vec![
                RedisRisk::NoAppendOnlyFile,
                RedisRisk::Eviction("allkeys-lru".into())
            ]
        );
        assert_eq!(
            risks_of(
                "aof_enabled:1",
                "maxmemory_policy:noeviction",
                Some("everysec")
            ),
            vec![RedisRisk::FsyncNotAlways("everysec".into())]
        );
        assert_eq!(
            risks_of("aof_enabled:1", "maxmemory_policy:noeviction", None),
            vec![RedisRisk::FsyncUnknown]
        );
    }

    #[test]
    fn parses_every_claim_reply() {
        let token = LeaseToken::new();
        assert!(matches!(
            parse_claim(Value::Int(1), token),
            Ok(Claim::Acquired(t)) if t == token
        ));
        let in_flight = Value::Array(vec![Value::BulkString(vec![7; 32]), Value::Int(1500)]);
        match parse_claim(in_flight, token) {
            Ok(Claim::InFlight {
                fingerprint,
                lease_remaining,
            }) => {
                assert_eq!(fingerprint, Fingerprint::from_bytes([7; 32]));
                assert_eq!(lease_remaining, Some(Duration::from_millis(1500)));
            }
            other => panic!("{other:?}"),
        }
        let record = Record::new(
            http::StatusCode::CREATED,
            http::HeaderMap::new(),
            bytes::Bytes::from_static(b"{}"),
            None,
        );
        let mut value = vec![TAG_RECORD];
        value.extend(record.encode());
        match parse_claim(Value::BulkString(value), token) {
            Ok(Claim::Completed(got)) => assert_eq!(*got, record),
            other => panic!("{other:?}"),
        }
        for bad in [
            Value::BulkString(b"Xjunk".to_vec()),
            Value::BulkString(b"Rjunk".to_vec()),
            Value::Array(vec![Value::BulkString(vec![1; 5]), Value::Int(1)]),
            Value::Nil,
        ] {
            assert!(matches!(
                parse_claim(bad, token),
                Err(StoreError::Decode(_))
            ));
        }
    }

    /// Any reply at all, as a damaged value or a foreign writer could produce: parsing never
    /// panics, and only the exact shapes of the layout are read as a claim.
    #[test]
    fn fuzz_claim_reply() {
        use proptest::prelude::*;

        fn record_value() -> impl Strategy<Value = Vec<u8>> {
            (
                proptest::collection::vec(any::<u8>(), 0..64),
                0usize..80,
                any::<u8>(),
            )
                .prop_map(|(body, cut, flip)| {
                    let record = Record::new(
                        http::StatusCode::OK,
                        http::HeaderMap::new(),
                        bytes::Bytes::from(body),
                        None,
                    );
                    let mut value = vec![TAG_RECORD];
                    value.extend(record.encode());
                    // Sometimes damaged: one byte changed.
                    if let Some(b) = value.get_mut(cut) {
                        *b ^= flip;
                    }
                    value
                })
        }
        let leaf = prop_oneof![
            Just(Value::Nil),
            Just(Value::Okay),
            any::<i64>().prop_map(Value::Int),
            Just(Value::Int(1)),
            proptest::collection::vec(any::<u8>(), 0..80).prop_map(Value::BulkString),
            proptest::collection::vec(any::<u8>(), 32..=32).prop_map(Value::BulkString),
            record_value().prop_map(Value::BulkString),
            "[ -~]{0,40}".prop_map(Value::SimpleString),
            any::<f64>().prop_map(Value::Double),
        ];
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            proptest::collection::vec(inner, 0..4).prop_map(Value::Array)
        });
        let config = proptest::test_runner::Config {
            cases: std::env::var("FUZZ_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(100_000),
            failure_persistence: None,
            ..Default::default()
        };
        proptest::proptest!(config, |(reply in value)| {
            let token = LeaseToken::new();
            let shape = format!("{reply:?}");
            match parse_claim(reply.clone(), token) {
                Ok(Claim::Acquired(t)) => {
                    prop_assert_eq!(t, token);
                    prop_assert!(matches!(reply, Value::Int(1)), "{}", shape);
                }
                Ok(Claim::InFlight { lease_remaining, .. }) => {
                    prop_assert!(
                        matches!(&reply, Value::Array(items) if items.len() == 2),
                        "{}", shape
                    );
                    prop_assert!(lease_remaining.is_none_or(|d| d <= super::super::MAX_DURATION));
                }
                Ok(Claim::OutcomeUnknown { .. }) => {
                    prop_assert!(
                        matches!(&reply, Value::Array(items) if items.len() == 2),
                        "{}", shape
                    );
                }
                Ok(Claim::Completed(record)) => {
                    let Value::BulkString(bytes) = &reply else {
                        panic!("completed from {shape}");
                    };
                    prop_assert_eq!(bytes[0], TAG_RECORD);
                    let decoded = Record::decode(&bytes[1..]);
                    prop_assert_eq!(decoded.as_ref(), Ok(&*record));
                }
                Err(StoreError::Decode(_)) => {}
                Err(other) => panic!("{other:?} from {shape}"),
            }
        });
    }

    #[test]
    fn owner_prefix_is_tag_and_token() {
        let token = LeaseToken::new();
        let prefix = owner_prefix(token);
        assert_eq!(prefix[0], b'L');
        assert_eq!(prefix[1..], token.to_bytes());
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis(Duration::MAX), MAX_MILLIS);
    }
}
