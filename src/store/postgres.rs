//! A PostgreSQL store (feature `postgres`).
//!
//! [`PostgresStore`] keeps every idempotency key of a fleet of instances in one table of a
//! PostgreSQL database, through a [`sqlx::PgPool`] that you build and pass in. Expiry is
//! judged by the database clock (`now()`), so instances whose clocks drift still agree on
//! who owns a key.
//!
//! # The table
//!
//! [`PostgresStore::migrate`] creates it, if it does not exist yet, with this SQL (for the
//! default name `idempotency_records`; the table name is quoted, so it is case-sensitive):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "idempotency_records" (
//!     key         text        PRIMARY KEY,   -- scope:key (StoreKey)
//!     token       bytea,                     -- lease token; NULL once completed
//!     fingerprint bytea       NOT NULL,      -- the claiming request's fingerprint
//!     record      bytea,                     -- Record::encode(); NULL while in flight
//!     expires_at  timestamptz NOT NULL,      -- lease end; record TTL end; commit TTL end
//!     contested   boolean     NOT NULL DEFAULT false,  -- a lapsed lease, contested once
//!     committed   boolean     NOT NULL DEFAULT false,  -- past its commit point
//!     lease_until timestamptz,               -- a committed claim's lease end
//!     status      smallint,                  -- the record's status, readable in SQL
//!     headers     jsonb,                     -- its headers: [[name, value], …] in order
//!     waiters     boolean     NOT NULL DEFAULT false   -- a duplicate waits: announce the end
//! );
//! ALTER TABLE "idempotency_records" ADD COLUMN IF NOT EXISTS contested boolean NOT NULL DEFAULT false;
//! ALTER TABLE "idempotency_records" ADD COLUMN IF NOT EXISTS committed boolean NOT NULL DEFAULT false;
//! ALTER TABLE "idempotency_records" ADD COLUMN IF NOT EXISTS lease_until timestamptz;
//! ALTER TABLE "idempotency_records" ADD COLUMN IF NOT EXISTS status smallint;
//! ALTER TABLE "idempotency_records" ADD COLUMN IF NOT EXISTS headers jsonb;
//! ALTER TABLE "idempotency_records" ADD COLUMN IF NOT EXISTS waiters boolean NOT NULL DEFAULT false;
//! CREATE INDEX IF NOT EXISTS "idempotency_records_expires_at_idx"
//!     ON "idempotency_records" (expires_at);
//! ```
//!
//! The `ALTER TABLE` statements bring a table made by an older version up to date; run
//! them (or `migrate`) before the new version serves.
//!
//! The index is named `{table}_expires_at_idx`; when that would pass PostgreSQL's 63-byte
//! limit on names, the table name is cut to 39 bytes and followed by `_` and eight hex
//! digits of its SHA-256, so long names that share a prefix never share an index.
//!
//! The statements run in one transaction that holds an advisory lock, so instances that
//! migrate at the same time at start-up do not trip over each other. You may as well run
//! this SQL with your own migration tool and never call `migrate`.
//!
//! # One statement per operation
//!
//! Each operation is one statement, so one round trip on a connection whose statements are
//! already prepared (sqlx caches them per connection):
//!
//! - **claim** (and so **replay**): a CTE that first reads the live row, if any, and only
//!   when there is none runs an `INSERT … ON CONFLICT (key) DO UPDATE … WHERE expires_at <=
//!   now()`, which takes a free or expired key, or, for a lapsed claim not yet contested,
//!   only marks it contested and gives its owner half a lease more
//!   ([`takeover_grace`](super::takeover_grace)):
//!
//!   ```sql
//!   WITH live AS (
//!       SELECT h.fingerprint, h.record, h.committed, h.token,
//!              -- a committed claim without a record is in flight until lease_until
//!              (extract(epoch FROM (CASE WHEN h.committed AND h.record IS NULL
//!                   THEN h.lease_until ELSE h.expires_at END) - now()) * 1000000)::bigint AS rest
//!       FROM "idempotency_records" AS h WHERE h.key = $1 AND h.expires_at > now()
//!   ), claimed AS (
//!       INSERT INTO "idempotency_records" AS r
//!           (key, token, fingerprint, record, expires_at, contested)
//!       SELECT $1, $2, $3, NULL, now() + $4::bigint * interval '1 microsecond', false
//!       WHERE NOT EXISTS (SELECT 1 FROM live)
//!       ON CONFLICT (key) DO UPDATE SET
//!           -- <spare>: r.token IS NOT NULL AND NOT r.contested AND NOT r.committed
//!           token = CASE WHEN <spare> THEN r.token ELSE excluded.token END,
//!           fingerprint = CASE WHEN <spare> THEN r.fingerprint ELSE excluded.fingerprint END,
//!           record = NULL, contested = (<spare>), committed = false,
//!           lease_until = NULL, status = NULL, headers = NULL,
//!           expires_at = CASE WHEN <spare>
//!               THEN now() + greatest($4::bigint / 2, 1000) * interval '1 microsecond'
//!               ELSE excluded.expires_at END
//!           WHERE r.expires_at <= now()
//!       RETURNING r.token = $2 AS acquired, r.fingerprint,
//!           (extract(epoch FROM r.expires_at - now()) * 1000000)::bigint AS rest
//!   )
//!   SELECT acquired, fingerprint, NULL::bytea, rest, false, NULL::bytea FROM claimed
//!   UNION ALL
//!   SELECT false, fingerprint, record, rest, committed, token FROM live
//!   ```
//!
//!   A committed row without a record whose `rest` ran out answers
//!   [`Claim::OutcomeUnknown`]; it is live until its commit's TTL (`expires_at`) ends, so it
//!   is never contested nor taken over before.
//!
//!   A replay or an in-flight answer only reads: it locks no row and writes nothing, so its
//!   commit does not wait for the write-ahead log to reach the disk.
//!
//!   The `live` read sees the snapshot taken when the statement started, while `ON
//!   CONFLICT` sees the latest committed row. When another transaction inserts or reclaims
//!   the key after that snapshot, the insert finds the conflict and does nothing, and the
//!   snapshot shows no live row: the statement returns nothing. The store then runs it
//!   again, with a fresh snapshot that shows the winner's row. This only happens under a
//!   race on one key.
//! - **complete**: `UPDATE … SET token = NULL, record = $3, status = …, headers = …,
//!   expires_at = now() + ttl WHERE key = $1 AND token = $2`.
//! - **release**: `DELETE … WHERE key = $1 AND token = $2 AND NOT committed`, and in the
//!   same statement, for a committed row, `UPDATE … SET lease_until = least(lease_until,
//!   now())` ([`StoreError::Committed`]).
//! - **revoke**: `DELETE … WHERE key = $1 AND token = $2 AND record IS NULL`, committed or
//!   not.
//! - **extend**: `UPDATE … SET expires_at = now() + lease, contested = false WHERE key = $1
//!   AND token = $2` (a committed row: `lease_until = now() + lease`, `expires_at` not below
//!   its commit's TTL).
//! - **commit**: `UPDATE … SET committed = true, lease_until = expires_at, expires_at =
//!   greatest(expires_at, now() + ttl) WHERE key = $1 AND token = $2`; the same statement
//!   runs in your transaction with [`PostgresStore::commit_in`].
//! - **settle**: `UPDATE … SET token = NULL, record = $2, …, expires_at = greatest(expires_at,
//!   now() + ttl) WHERE key = $1 AND committed AND record IS NULL AND lease_until <= now()
//!   AND expires_at > now()` (settling never shortens what the commit was kept for).
//! - **inspect**: one `SELECT` of the row; **purge**: `DELETE … WHERE key = $1`.
//!
//! A fenced statement that changes no row answers [`StoreError::LeaseLost`]. Fencing is by
//! token, not by clock: a lapsed lease lets a new claim take the row over (which replaces
//! the token), and until one does, the owner can still extend, release or complete it.
//!
//! # Expiry and sweeping
//!
//! Expired rows are invisible to `claim` (it takes them over), so removing them is only
//! garbage collection. [`PostgresStore::sweep`] deletes completed rows past their TTL, and
//! in-flight rows [`ORPHAN_RETENTION`] after their lease (so that an owner back from an
//! outage can still store its outcome), in batches of
//! [`sweep_batch`](PostgresStore::sweep_batch) rows:
//!
//! ```sql
//! DELETE FROM "idempotency_records"
//! WHERE key IN (SELECT key FROM "idempotency_records" WHERE <gone>
//!               ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
//!   AND <gone>
//! -- <gone>: expires_at <= now()
//! --         AND (token IS NULL OR committed OR expires_at <= now() - interval '3600 seconds')
//! ```
//!
//! `SKIP LOCKED` lets several instances sweep at once without waiting on each other, and
//! the repeated `expires_at <= now()` spares a row that a claim took over meanwhile. The
//! first claim on a store starts a background task on the current Tokio runtime that
//! sweeps every [`sweep_interval`](PostgresStore::sweep_interval); the task ends when the
//! last handle to the store is dropped.
//!
//! # What it keeps, and what it can lose
//!
//! A record is kept for its whole TTL and never evicted: there is no size cap, so the table
//! grows with the number of keys answered within one TTL (sweeping reclaims the rest). A
//! lapsed claim nobody took over is kept [`ORPHAN_RETENTION`] for its owner.
//!
//! Every operation is a committed statement, so what PostgreSQL keeps is what the store
//! keeps: with the default `synchronous_commit = on` a record or claim acknowledged to the
//! layer survives a crash of the server. With `synchronous_commit = off` a crash can lose
//! the last few hundred milliseconds of commits (those records' retries run again); a
//! failover to an asynchronous standby can lose the commits it had not received. Use
//! synchronous replication (`synchronous_standby_names`) where a failover must lose nothing.
//!
//! # Waiting
//!
//! A duplicate in wait mode ([`IdempotencyStore::wait`]) is woken by `LISTEN`/`NOTIFY`,
//! not by polling:
//!
//! - before it looks at the key, it marks the in-flight row (`waiters = true`, one
//!   statement), and the store's listener, on a connection of its own (a one-connection
//!   pool with the options of the store's pool, opened at the first wait and kept while the
//!   store lives), listens on the table's channel ([`PostgresStore::notify_channel`]);
//! - the statements that end a key (`complete`, `release`, `revoke`, `settle`, `purge`)
//!   send `pg_notify` on that channel, with the key's SHA-256 as the payload, only for a
//!   marked row: a key nobody waits on notifies nothing, so completions do not take
//!   PostgreSQL's commit-time notification lock;
//! - the waiter claims again as soon as the notification arrives (half a millisecond on
//!   loopback, see BENCHMARKS.md), when the holder's lease ends, and at least every 500 ms
//!   as a safety net. Waiters in the process that ended the key are woken directly.
//!
//! When the listener's connection is lost, every waiter looks again at once and the
//! listener connects again; while it cannot, waiters poll (5 ms doubling up to 250 ms).
//!
//! # Example
//!
//! ```no_run
//! use tower_idempotency::sqlx::PgPool;
//! use tower_idempotency::{IdempotencyLayer, PostgresStore};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = PgPool::connect("postgres://app@db.internal/app").await?;
//! let store = PostgresStore::new(pool).table("idempotency.records");
//! store.migrate().await?;
//!
//! let layer = IdempotencyLayer::new(store);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgPool, Row};

use super::sql::{
    CLAIM_ATTEMPTS, ClaimContention, ClaimRow, StateRow, derived_name, micros, split_table,
};
use super::{Claim, IdempotencyStore, KeyState, LeaseToken, ORPHAN_RETENTION, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::Record;
#[path = "postgres_push.rs"]
mod push;
use super::wakeup::{Polling, Wait, wait_woken};
use push::{PgPush, channel_of, name_of};

/// A [`IdempotencyStore`] in a PostgreSQL table, shared by every instance that uses the same
/// database (feature `postgres`).
///
/// Claim, complete, release, extend and replay are one SQL statement each; expiry follows
/// the database clock; expired rows are deleted in batches by a background sweep. The module
/// documentation ([`crate::store::postgres`]) shows the table and every statement.
///
/// Cloning a `PostgresStore` gives another handle to the same store (and pool).
///
/// ```no_run
/// use std::time::Duration;
/// use tower_idempotency::PostgresStore;
/// use tower_idempotency::sqlx::postgres::PgPoolOptions;
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = PgPoolOptions::new()
///     .max_connections(20)
///     .connect("postgres://app@db.internal/app")
///     .await?;
/// let store = PostgresStore::new(pool)
///     .table("idempotency_records")
///     .sweep_batch(500)
///     .sweep_interval(Duration::from_secs(30));
/// store.migrate().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

pub use super::sql::InvalidTableName;

/// The settings a store was built with.
type Config = super::sql::Settings<PgPool>;

struct Inner {
    config: Config,
    sql: Result<Sql, InvalidTableName>,
    sweeper_started: Arc<AtomicBool>,
    /// How duplicates in wait mode hear of the end of the key they wait on (a valid table
    /// only).
    push: Option<PgPush>,
}

/// The statements, built once for the table.
struct Sql {
    migrate: Arc<str>,
    claim: Arc<str>,
    complete: Arc<str>,
    release: Arc<str>,
    revoke: Arc<str>,
    extend: Arc<str>,
    commit: Arc<str>,
    settle: Arc<str>,
    inspect: Arc<str>,
    purge: Arc<str>,
    sweep: Arc<str>,
    wait: Arc<str>,
    /// The channel on which the ends of keys that duplicates wait on are announced.
    channel: String,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.config.table)
            .field("table_valid", &self.sql.is_ok())
            .field("sweep_batch", &self.config.sweep_batch)
            .field("sweep_interval", &self.config.sweep_interval)
            .field("pool", &self.config.pool)
            .finish()
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

/// PostgreSQL's limit on the length of a name.
const MAX_NAME: usize = 63;

/// Validates `name` and quotes each of its parts; returns the quoted name and the quoted
/// name of its expiry index.
fn quote_table(name: &str) -> Result<(String, String), InvalidTableName> {
    let (schema, table) = split_table(name, MAX_NAME)?;
    let quoted = match schema {
        Some(schema) => format!("\"{schema}\".\"{table}\""),
        None => format!("\"{table}\""),
    };
    Ok((quoted, format!("\"{}\"", index_name(table))))
}

/// The name of `table`'s expiry index: `{table}_expires_at_idx`, unqualified (an index
/// lives in its table's schema). The server truncates names to 63 bytes, so when that does
/// not fit, the table name is cut and followed by eight hex digits of its SHA-256: two long
/// names that share a prefix still get two indexes.
fn index_name(table: &str) -> String {
    derived_name(table, "_expires_at_idx", MAX_NAME)
}

impl Sql {
    fn new(table: &str) -> Result<Self, InvalidTableName> {
        let (t, idx) = quote_table(table)?;
        let channel = channel_of(table);
        let migrate = format!(
            "SELECT pg_advisory_xact_lock(hashtext('tower_idempotency.migrate')::bigint);\n\
             CREATE TABLE IF NOT EXISTS {t} (\n\
             \x20   key         text        PRIMARY KEY,\n\
             \x20   token       bytea,\n\
             \x20   fingerprint bytea       NOT NULL,\n\
             \x20   record      bytea,\n\
             \x20   expires_at  timestamptz NOT NULL,\n\
             \x20   contested   boolean     NOT NULL DEFAULT false,\n\
             \x20   committed   boolean     NOT NULL DEFAULT false,\n\
             \x20   lease_until timestamptz,\n\
             \x20   status      smallint,\n\
             \x20   headers     jsonb,\n\
             \x20   waiters     boolean     NOT NULL DEFAULT false\n\
             );\n\
             ALTER TABLE {t} ADD COLUMN IF NOT EXISTS contested boolean NOT NULL DEFAULT false;\n\
             ALTER TABLE {t} ADD COLUMN IF NOT EXISTS committed boolean NOT NULL DEFAULT false;\n\
             ALTER TABLE {t} ADD COLUMN IF NOT EXISTS lease_until timestamptz;\n\
             ALTER TABLE {t} ADD COLUMN IF NOT EXISTS status smallint;\n\
             ALTER TABLE {t} ADD COLUMN IF NOT EXISTS headers jsonb;\n\
             ALTER TABLE {t} ADD COLUMN IF NOT EXISTS waiters boolean NOT NULL DEFAULT false;\n\
             CREATE INDEX IF NOT EXISTS {idx} ON {t} (expires_at);"
        );
        // Whether a conflicting row is a lapsed, uncontested, uncommitted claim: then it is
        // only marked contested (the owner gets half a lease more); otherwise it is taken
        // over. (A committed row conflicts only once its commit expired.)
        let spare = "r.token IS NOT NULL AND NOT r.contested AND NOT r.committed";
        // A committed row without a record is in flight until `lease_until`; any other row
        // until `expires_at`.
        let claim = format!(
            "WITH live AS (\n\
             \x20   SELECT h.fingerprint, h.record, h.committed, h.token,\n\
             \x20          (extract(epoch FROM (CASE WHEN h.committed AND h.record IS NULL\n\
             \x20               THEN h.lease_until ELSE h.expires_at END) - now()) * 1000000)::bigint AS rest\n\
             \x20   FROM {t} AS h WHERE h.key = $1 AND h.expires_at > now()\n\
             ), claimed AS (\n\
             \x20   INSERT INTO {t} AS r (key, token, fingerprint, record, expires_at, contested)\n\
             \x20   SELECT $1, $2, $3, NULL, now() + $4::bigint * interval '1 microsecond', false\n\
             \x20   WHERE NOT EXISTS (SELECT 1 FROM live)\n\
             \x20   ON CONFLICT (key) DO UPDATE SET\n\
             \x20       token = CASE WHEN {spare} THEN r.token ELSE excluded.token END,\n\
             \x20       fingerprint = CASE WHEN {spare} THEN r.fingerprint ELSE excluded.fingerprint END,\n\
             \x20       record = NULL,\n\
             \x20       contested = ({spare}),\n\
             \x20       committed = false,\n\
             \x20       lease_until = NULL,\n\
             \x20       status = NULL,\n\
             \x20       headers = NULL,\n\
             \x20       expires_at = CASE WHEN {spare}\n\
             \x20           THEN now() + greatest($4::bigint / 2, 1000) * interval '1 microsecond'\n\
             \x20           ELSE excluded.expires_at END\n\
             \x20       WHERE r.expires_at <= now()\n\
             \x20   RETURNING r.token = $2 AS acquired, r.fingerprint,\n\
             \x20       (extract(epoch FROM r.expires_at - now()) * 1000000)::bigint AS rest\n\
             )\n\
             SELECT acquired, fingerprint, NULL::bytea, rest, false, NULL::bytea FROM claimed\n\
             UNION ALL\n\
             SELECT false, fingerprint, record, rest, committed, token FROM live"
        );
        // The readable columns: the status, and the headers as a JSON array of
        // [name, value] pairs in order.
        let readable = |n: u8| {
            format!(
                "status = ${n}, headers = (SELECT coalesce(jsonb_agg(jsonb_build_array(n, v) \
                 ORDER BY i), '[]'::jsonb) FROM unnest(${}::text[], ${}::text[]) \
                 WITH ORDINALITY AS h(n, v, i))",
                n + 1,
                n + 2
            )
        };
        // The statements that end an in-flight key announce it on the table's channel when
        // a duplicate waits on it (`waiters`), with the key's SHA-256 as the payload.
        let announce =
            format!("pg_notify('{channel}', encode(sha256(convert_to($1, 'UTF8')), 'hex'))");
        let notify = |rows: &str| {
            format!(
                "SELECT (SELECT count(*) FROM {rows}), \
                 (SELECT count({announce}) FROM {rows} WHERE waiters)"
            )
        };
        let complete = format!(
            "WITH done AS (UPDATE {t} SET token = NULL, record = $3, {}, \
             expires_at = now() + $4::bigint * interval '1 microsecond' \
             WHERE key = $1 AND token = $2 RETURNING waiters) {}",
            readable(5),
            notify("done")
        );
        let release = format!(
            "WITH gone AS (DELETE FROM {t} WHERE key = $1 AND token = $2 AND NOT committed \
             RETURNING waiters), \
             kept AS (UPDATE {t} SET lease_until = least(lease_until, now()) \
             WHERE key = $1 AND token = $2 AND committed RETURNING waiters), \
             ended AS (SELECT waiters FROM gone UNION ALL SELECT waiters FROM kept) \
             SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM kept), \
             (SELECT count({announce}) FROM ended WHERE waiters)"
        );
        let revoke = format!(
            "WITH done AS (DELETE FROM {t} WHERE key = $1 AND token = $2 AND record IS NULL \
             RETURNING waiters) {}",
            notify("done")
        );
        let extend = format!(
            "UPDATE {t} SET \
             expires_at = CASE WHEN committed \
                 THEN greatest(expires_at, now() + $3::bigint * interval '1 microsecond') \
                 ELSE now() + $3::bigint * interval '1 microsecond' END, \
             lease_until = CASE WHEN committed \
                 THEN now() + $3::bigint * interval '1 microsecond' END, \
             contested = false WHERE key = $1 AND token = $2"
        );
        let commit = format!(
            "UPDATE {t} SET committed = true, contested = false, \
             lease_until = CASE WHEN committed THEN lease_until ELSE expires_at END, \
             expires_at = greatest(expires_at, now() + $3::bigint * interval '1 microsecond') \
             WHERE key = $1 AND token = $2"
        );
        let settle = format!(
            "WITH done AS (UPDATE {t} SET token = NULL, record = $2, {}, \
             expires_at = greatest(expires_at, now() + $3::bigint * interval '1 microsecond') \
             WHERE key = $1 AND committed AND record IS NULL AND lease_until <= now() \
             AND expires_at > now() RETURNING waiters) {}",
            readable(4),
            notify("done")
        );
        let inspect = format!(
            "SELECT record, fingerprint, committed, \
             (extract(epoch FROM expires_at - now()) * 1000000)::bigint, \
             (extract(epoch FROM lease_until - now()) * 1000000)::bigint \
             FROM {t} WHERE key = $1"
        );
        let purge = format!(
            "WITH done AS (DELETE FROM {t} WHERE key = $1 RETURNING waiters) {}",
            notify("done")
        );
        // A duplicate about to wait marks the in-flight row, so that its end is announced.
        let wait = format!(
            "UPDATE {t} SET waiters = true WHERE key = $1 AND record IS NULL AND NOT waiters"
        );
        let retention = ORPHAN_RETENTION.as_secs();
        let gone = format!(
            "expires_at <= now() AND (token IS NULL OR committed \
             OR expires_at <= now() - interval '{retention} seconds')"
        );
        let sweep = format!(
            "DELETE FROM {t} WHERE key IN (\
             SELECT key FROM {t} WHERE {gone} \
             ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
             AND {gone}"
        );
        Ok(Self {
            migrate: migrate.into(),
            claim: claim.into(),
            complete: complete.into(),
            release: release.into(),
            revoke: revoke.into(),
            extend: extend.into(),
            commit: commit.into(),
            settle: settle.into(),
            inspect: inspect.into(),
            purge: purge.into(),
            sweep: sweep.into(),
            wait: wait.into(),
            channel,
        })
    }
}

impl PostgresStore {
    /// A store on `pool`, in the table `idempotency_records`, swept every 60 seconds in
    /// batches of 1000 rows. Call [`migrate`](Self::migrate) once to create the table.
    ///
    /// ```no_run
    /// use tower_idempotency::PostgresStore;
    /// use tower_idempotency::sqlx::PgPool;
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = PostgresStore::new(PgPool::connect("postgres://localhost/app").await?);
    /// store.migrate().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(pool: PgPool) -> Self {
        Self::from_config(Config::new(pool))
    }

    fn from_config(config: Config) -> Self {
        let sql = Sql::new(&config.table);
        let push = sql.as_ref().ok().map(|sql| {
            PgPush::new(
                config.pool.clone(),
                sql.channel.clone(),
                Arc::clone(&sql.wait),
            )
        });
        Self {
            inner: Arc::new(Inner {
                sql,
                config,
                sweeper_started: Arc::new(AtomicBool::new(false)),
                push,
            }),
        }
    }

    fn edit(self, f: impl FnOnce(&mut Config)) -> Self {
        let mut config = self.inner.config.clone();
        f(&mut config);
        Self::from_config(config)
    }

    /// The table that holds the records: `name` or `schema.name`, each part matching
    /// `[A-Za-z_][A-Za-z0-9_]*` (at most 63 bytes). Default: `idempotency_records`.
    ///
    /// The name is quoted in every statement, so it is used exactly as given (case
    /// included). Instances sharing the table should spell it the same way: its
    /// [`notify_channel`](Self::notify_channel) comes from the name. An invalid name does
    /// not panic: [`migrate`](Self::migrate) and every
    /// operation then fail with [`StoreError::Backend`] wrapping an [`InvalidTableName`].
    ///
    /// ```no_run
    /// use tower_idempotency::PostgresStore;
    /// use tower_idempotency::sqlx::PgPool;
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = PgPool::connect("postgres://localhost/app").await?;
    /// let store = PostgresStore::new(pool).table("billing.idempotency_keys");
    /// store.migrate().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn table(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.edit(|c| c.table = name)
    }

    /// How many expired rows one sweep statement deletes at most; a sweep runs statements
    /// until one deletes fewer. Default: 1000. Zero counts as one.
    ///
    /// ```no_run
    /// use tower_idempotency::PostgresStore;
    /// use tower_idempotency::sqlx::PgPool;
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = PgPool::connect("postgres://localhost/app").await?;
    /// let store = PostgresStore::new(pool).sweep_batch(200);
    /// # Ok(())
    /// # }
    /// ```
    pub fn sweep_batch(self, rows: u32) -> Self {
        self.edit(|c| c.set_sweep_batch(rows))
    }

    /// How often the background task sweeps expired rows. Default: 60 seconds.
    /// `Duration::ZERO` turns the background task off (call [`sweep`](Self::sweep) yourself,
    /// or never: expired rows are invisible to claims anyway).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_idempotency::PostgresStore;
    /// use tower_idempotency::sqlx::PgPool;
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = PgPool::connect("postgres://localhost/app").await?;
    /// let store = PostgresStore::new(pool).sweep_interval(Duration::from_secs(300));
    /// # Ok(())
    /// # }
    /// ```
    pub fn sweep_interval(self, interval: Duration) -> Self {
        self.edit(|c| c.set_sweep_interval(interval))
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &PgPool {
        &self.inner.config.pool
    }

    /// The channel on which the end of a key that a duplicate waits on (in wait mode) is
    /// announced with `NOTIFY`, its payload the key's SHA-256 in hex; `None` for an invalid
    /// table name. One per table name as given to [`table`](Self::table), the same on every
    /// instance that spells it the same way: give every instance the same spelling
    /// (`billing.idempotency_keys` on one and `idempotency_keys` with `billing` on the
    /// search path on another is one table with two channels, and their waiters hear of
    /// each other's ends only by polling, every 500 ms).
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = tower_idempotency::sqlx::PgPool::connect("postgres://localhost/app").await?;
    /// let store = tower_idempotency::PostgresStore::new(pool);
    /// println!("LISTEN \"{}\"", store.notify_channel().unwrap());
    /// # Ok(())
    /// # }
    /// ```
    pub fn notify_channel(&self) -> Option<&str> {
        self.inner.sql.as_ref().ok().map(|sql| sql.channel.as_str())
    }

    /// The name of the table, as given to [`table`](Self::table).
    pub fn table_name(&self) -> &str {
        &self.inner.config.table
    }

    /// Creates the table and its expiry index if they do not exist (the SQL is in the
    /// [module documentation](crate::store::postgres)). Safe to call from many instances at
    /// once. Fails with [`StoreError::Backend`] when the table name is invalid
    /// ([`InvalidTableName`]) or the database refuses.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let sql = self.inner.sql()?;
        // Several statements in one simple query run in one implicit transaction, which
        // holds the advisory lock until its end.
        sqlx::raw_sql(AssertSqlSafe(Arc::clone(&sql.migrate)))
            .execute(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(())
    }

    /// Deletes every expired row now, in batches of [`sweep_batch`](Self::sweep_batch),
    /// and returns how many it deleted.
    ///
    /// The background task does this periodically; expired rows are never visible to
    /// claims, so sweeping only reclaims space.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        self.inner.sweep().await
    }

    /// Declares the commit point of `claim` inside your own transaction on this store's
    /// database, so that it holds **if and only if your transaction commits**: the key
    /// becomes committed together with your business rows, or not at all.
    ///
    /// Run it in the transaction that makes the operation's effects (after its writes or
    /// before, as long as it is the same transaction), then commit. Should the instance
    /// crash after the commit and before the answer is stored, a retry never runs the
    /// operation again: it gets what the layer's recovery hook
    /// ([`IdempotencyLayer::recover_with`](crate::IdempotencyLayer::recover_with)) rebuilds
    /// from those rows, or `500 outcome-unknown`. Should the transaction roll back, the
    /// mark rolls back with it and a retry runs normally.
    ///
    /// [`StoreError::LeaseLost`] means the key is no longer this request's (its lease lapsed
    /// and another request took it over): roll back. The statement takes the row's lock
    /// until your transaction ends, so keep the transaction short (the lease keeper's
    /// renewals wait for it).
    ///
    /// At `REPEATABLE READ` or `SERIALIZABLE`, the statement fails with SQLSTATE `40001`
    /// ("could not serialize access due to concurrent update", a
    /// [`StoreError::Backend`]) when your transaction read anything before it and the row
    /// changed since: the lease keeper renewed the key, or a duplicate in wait mode marked
    /// it. Roll back, as for any error. Calling `commit_in` first in the transaction (it
    /// locks the row, so renewals wait), or running the transaction at `READ COMMITTED`
    /// (PostgreSQL's default), avoids it.
    ///
    /// `claim` must come from a layer on this store (the same table).
    ///
    /// ```no_run
    /// use tower_idempotency::{IdempotencyClaim, PostgresStore, StoreError};
    /// use tower_idempotency::sqlx::{self, PgPool};
    ///
    /// async fn pay(pool: &PgPool, store: &PostgresStore, claim: &IdempotencyClaim)
    ///     -> Result<i64, Box<dyn std::error::Error + Send + Sync>> {
    ///     let mut tx = pool.begin().await?;
    ///     let (id,): (i64,) = sqlx::query_as(
    ///         "INSERT INTO payments (scope, idempotency_key, amount) VALUES ($1, $2, 100) \
    ///          RETURNING id",
    ///     )
    ///     .bind(claim.scope())
    ///     .bind(claim.key())
    ///     .fetch_one(&mut *tx)
    ///     .await?;
    ///     store.commit_in(&mut *tx, claim).await?;
    ///     tx.commit().await?;
    ///     Ok(id)
    /// }
    /// ```
    pub async fn commit_in<'c, E>(
        &self,
        executor: E,
        claim: &crate::IdempotencyClaim,
    ) -> Result<(), StoreError>
    where
        E: sqlx::Executor<'c, Database = sqlx::Postgres>,
    {
        let sql = self.inner.sql()?;
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&sql.commit)))
            .bind(claim.store_key().as_str())
            .bind(claim.token().to_bytes().to_vec())
            .bind(micros(claim.ttl()))
            .execute(executor)
            .await
            .map_err(StoreError::backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::LeaseLost);
        }
        claim.committed_in_transaction();
        Ok(())
    }

    fn ensure_sweeper(&self) {
        let interval = self.inner.config.sweep_interval;
        if interval.is_zero() {
            return;
        }
        crate::periodic::ensure_running(
            &self.inner.sweeper_started,
            &self.inner,
            interval,
            |inner| async move {
                super::sql::log_sweep(inner.sweep().await);
            },
        );
    }

    async fn claim_once(
        &self,
        sql: &Sql,
        key: &StoreKey,
        token: LeaseToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Option<Claim>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&sql.claim)))
            .bind(key.as_str())
            .bind(&token.to_bytes()[..])
            .bind(&fingerprint.as_bytes()[..])
            .bind(micros(lease))
            .fetch_optional(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?;
        row.map(|row| read_claim(&row, token)).transpose()
    }

    /// Runs a statement that ends `key` (and announces it to the waiters of other
    /// instances), wakes the waiters of this process, and answers whether it changed a row.
    async fn announced(
        &self,
        key: &StoreKey,
        query: sqlx::query::QueryAs<'_, sqlx::Postgres, (i64, i64), sqlx::postgres::PgArguments>,
    ) -> Result<bool, StoreError> {
        let (done, _announced) = query
            .fetch_one(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?;
        if done > 0 {
            self.wake_here(key);
        }
        Ok(done > 0)
    }

    /// Wakes the waiters of `key` in this process.
    fn wake_here(&self, key: &StoreKey) {
        if let Some(push) = &self.inner.push {
            push.wakeups.wake_by(|| name_of(key));
        }
    }

    async fn fenced(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<(), StoreError> {
        let done = query
            .execute(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?;
        if done.rows_affected() == 0 {
            Err(StoreError::LeaseLost)
        } else {
            Ok(())
        }
    }
}

fn read_claim(row: &PgRow, token: LeaseToken) -> Result<Claim, StoreError> {
    ClaimRow {
        acquired: row.try_get(0).map_err(StoreError::backend)?,
        fingerprint: row.try_get(1).map_err(StoreError::backend)?,
        record: row.try_get(2).map_err(StoreError::backend)?,
        rest: row.try_get(3).map_err(StoreError::backend)?,
        committed: row.try_get(4).map_err(StoreError::backend)?,
        token: row.try_get(5).map_err(StoreError::backend)?,
    }
    .into_claim(token)
}

/// Reads a row of the inspect statement.
fn read_state(row: &PgRow) -> Result<KeyState, StoreError> {
    StateRow {
        record: row.try_get(0).map_err(StoreError::backend)?,
        fingerprint: row.try_get(1).map_err(StoreError::backend)?,
        committed: row.try_get(2).map_err(StoreError::backend)?,
        expires: row.try_get(3).map_err(StoreError::backend)?,
        lease: row.try_get(4).map_err(StoreError::backend)?,
    }
    .into_state()
}

/// The readable columns of a record: its status, and its headers' names and values (as
/// text, non-UTF-8 bytes replaced).
fn readable(record: &Record) -> (i16, Vec<String>, Vec<String>) {
    let fields = record.fields();
    let mut names = Vec::with_capacity(fields.len());
    let mut values = Vec::with_capacity(fields.len());
    for (name, value) in fields.iter() {
        names.push(name.as_str().to_owned());
        values.push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    (record.status().as_u16() as i16, names, values)
}

impl Inner {
    fn sql(&self) -> Result<&Sql, StoreError> {
        self.sql
            .as_ref()
            .map_err(|err| StoreError::backend(err.clone()))
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        let sql = self.sql()?;
        let batch = self.config.sweep_batch;
        let mut total = 0;
        loop {
            let deleted = sqlx::query(AssertSqlSafe(Arc::clone(&sql.sweep)))
                .bind(i64::from(batch))
                .execute(&self.config.pool)
                .await
                .map_err(StoreError::backend)?
                .rows_affected();
            total += deleted;
            if deleted < u64::from(batch) {
                return Ok(total);
            }
        }
    }
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.ensure_sweeper();
        let sql = self.inner.sql()?;
        for _ in 0..CLAIM_ATTEMPTS {
            if let Some(claim) = self.claim_once(sql, key, token, fingerprint, lease).await? {
                return Ok(claim);
            }
            // Lost a race to a transaction that committed after our snapshot: run again.
            tracing::debug!(
                key = key.client_key(),
                "idempotency claim lost a race; running it again"
            );
        }
        Err(StoreError::backend(ClaimContention))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let sql = self.inner.sql()?;
        let (status, names, values) = readable(&record);
        let done = self
            .announced(
                key,
                sqlx::query_as(AssertSqlSafe(Arc::clone(&sql.complete)))
                    .bind(key.as_str())
                    .bind(token.to_bytes().to_vec())
                    .bind(record.encode())
                    .bind(micros(ttl))
                    .bind(status)
                    .bind(names)
                    .bind(values),
            )
            .await?;
        if done {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let sql = self.inner.sql()?;
        let release = || async {
            let (gone, kept, _announced): (i64, i64, i64) =
                sqlx::query_as(AssertSqlSafe(Arc::clone(&sql.release)))
                    .bind(key.as_str())
                    .bind(token.to_bytes().to_vec())
                    .fetch_one(&self.inner.config.pool)
                    .await
                    .map_err(StoreError::backend)?;
            Ok::<_, StoreError>((gone, kept))
        };
        let (mut gone, mut kept) = release().await?;
        if gone + kept == 0 {
            // Both parts of the statement judge the row by the snapshot it started with: one
            // that waited on the row lock of an application's transaction declaring the
            // commit point (`commit_in`), which then committed, took nothing, although the
            // row is ours and committed now. Once more, on a snapshot of now (fenced by the
            // token, so nothing else is touched): rare, since it only follows a lost lease
            // or such a race.
            (gone, kept) = release().await?;
        }
        if gone + kept > 0 {
            self.wake_here(key);
        }
        match (gone, kept) {
            (0, 0) => Err(StoreError::LeaseLost),
            (0, _) => Err(StoreError::Committed),
            _ => Ok(()),
        }
    }

    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let sql = self.inner.sql()?;
        let done = self
            .announced(
                key,
                sqlx::query_as(AssertSqlSafe(Arc::clone(&sql.revoke)))
                    .bind(key.as_str())
                    .bind(token.to_bytes().to_vec()),
            )
            .await?;
        if done {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }

    async fn wait(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
        timeout: Duration,
    ) -> Result<Claim, StoreError> {
        let Some(push) = &self.inner.push else {
            // An invalid table: the claim answers the error.
            return self.claim(key, fingerprint, token, lease).await;
        };
        let wait = Wait {
            key,
            fingerprint,
            token,
            lease,
            timeout,
        };
        let name = name_of(key);
        wait_woken(
            self,
            &push.wakeups,
            &name,
            Some(push),
            Polling::DEFAULT,
            wait,
        )
        .await
    }

    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let sql = self.inner.sql()?;
        self.fenced(
            sqlx::query(AssertSqlSafe(Arc::clone(&sql.commit)))
                .bind(key.as_str())
                .bind(token.to_bytes().to_vec())
                .bind(micros(ttl)),
        )
        .await
    }

    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let sql = self.inner.sql()?;
        let (status, names, values) = readable(&record);
        self.announced(
            key,
            sqlx::query_as(AssertSqlSafe(Arc::clone(&sql.settle)))
                .bind(key.as_str())
                .bind(record.encode())
                .bind(micros(ttl))
                .bind(status)
                .bind(names)
                .bind(values),
        )
        .await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        let sql = self.inner.sql()?;
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&sql.inspect)))
            .bind(key.as_str())
            .fetch_optional(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?;
        match row {
            Some(row) => read_state(&row),
            None => Ok(KeyState::Free),
        }
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let sql = self.inner.sql()?;
        self.announced(
            key,
            sqlx::query_as(AssertSqlSafe(Arc::clone(&sql.purge))).bind(key.as_str()),
        )
        .await
    }

    /// Keyset pagination over the primary key: one `SELECT … WHERE key > $cursor ORDER BY
    /// key LIMIT page` per page, no lock taken.
    async fn list(
        &self,
        filter: &super::ListFilter,
        cursor: Option<&super::Cursor>,
    ) -> Result<super::ListPage, StoreError> {
        self.list_page(filter, cursor).await
    }

    /// One statement of the background sweep, `batch` rows at most (`FOR UPDATE SKIP
    /// LOCKED`: rows a request holds are left for the next step).
    async fn vacuum(
        &self,
        _cursor: Option<&super::Cursor>,
        batch: usize,
    ) -> Result<super::VacuumPage, StoreError> {
        self.vacuum_step(batch).await
    }

    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let sql = self.inner.sql()?;
        self.fenced(
            sqlx::query(AssertSqlSafe(Arc::clone(&sql.extend)))
                .bind(key.as_str())
                .bind(token.to_bytes().to_vec())
                .bind(micros(lease)),
        )
        .await
    }
}

/// `list` and `vacuum`, apart from the request path's statements.
impl PostgresStore {
    async fn list_page(
        &self,
        filter: &super::ListFilter,
        cursor: Option<&super::Cursor>,
    ) -> Result<super::ListPage, StoreError> {
        let (t, _) = quote_table(&self.inner.config.table)
            .map_err(|err| StoreError::backend(err.clone()))?;
        let size = filter.page_size_or_default();
        let statement = format!(
            "SELECT record, fingerprint, committed, \
             (extract(epoch FROM expires_at - now()) * 1000000)::bigint, \
             (extract(epoch FROM lease_until - now()) * 1000000)::bigint, key \
             FROM {t} WHERE key > $1 ORDER BY key LIMIT $2"
        );
        let rows = sqlx::query(AssertSqlSafe(statement))
            .bind(cursor.map_or("", super::Cursor::as_str))
            .bind(i64::try_from(size).unwrap_or(i64::MAX))
            .fetch_all(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?;
        let rows = rows
            .iter()
            .map(|row| {
                let key: String = row.try_get(5).map_err(StoreError::backend)?;
                Ok((key, read_state(row)))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        super::sql::list_page(rows, filter, size)
    }

    async fn vacuum_step(&self, batch: usize) -> Result<super::VacuumPage, StoreError> {
        let sql = self.inner.sql()?;
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        let removed = sqlx::query(AssertSqlSafe(Arc::clone(&sql.sweep)))
            .bind(batch)
            .execute(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?
            .rows_affected();
        let more = removed >= batch.unsigned_abs();
        Ok(super::VacuumPage::new(
            removed,
            removed,
            more.then(|| super::Cursor::new("more")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_quoted_with_their_index() {
        assert_eq!(
            quote_table("idempotency_records").unwrap(),
            (
                "\"idempotency_records\"".to_owned(),
                "\"idempotency_records_expires_at_idx\"".to_owned()
            )
        );
        assert_eq!(
            quote_table("app.Keys_1").unwrap().0,
            "\"app\".\"Keys_1\"".to_owned()
        );
        assert!(quote_table(&"x".repeat(64)).is_err());
        assert!(quote_table("a\"b").is_err());
        let long = "y".repeat(63);
        let (_, idx) = quote_table(&long).unwrap();
        assert_eq!(idx.len(), 63 + 2);
        // Short names keep the plain name that earlier versions created.
        assert_eq!(
            index_name(&"a".repeat(48)),
            format!("{}_expires_at_idx", "a".repeat(48))
        );
    }
}
