//! A MySQL and MariaDB store (feature `mysql`).
//!
//! [`MySqlStore`] keeps every idempotency key of a fleet of instances in one InnoDB table,
//! through a [`sqlx::MySqlPool`] that you build and pass in. Expiry is judged by the
//! database clock in UTC (`UTC_TIMESTAMP(6)`), so instances whose clocks drift, or whose
//! sessions use different time zones, still agree on who owns a key.
//!
//! It is written for MySQL 8.0.29 or later (the first with `CREATE PROCEDURE IF NOT
//! EXISTS`) and MariaDB 10.6 or later. Its test suite runs on MariaDB 10.11; MySQL itself is
//! not part of it.
//!
//! # The table and its two procedures
//!
//! [`MySqlStore::migrate`] creates them, if they do not exist yet. For the default table
//! name `idempotency_records`:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS `idempotency_records` (
//!     `key`       VARBINARY(3072) NOT NULL PRIMARY KEY,  -- scope:key (StoreKey), compared byte for byte
//!     token       BINARY(16),                   -- lease token; NULL once completed
//!     fingerprint BINARY(32)  NOT NULL,         -- the claiming request's fingerprint
//!     record      LONGBLOB,                     -- Record::encode(); NULL while in flight
//!     expires_at  DATETIME(6) NOT NULL,         -- lease end; record TTL end; commit TTL end (UTC)
//!     contested   BOOLEAN     NOT NULL DEFAULT FALSE,  -- a lapsed lease, contested once
//!     committed   BOOLEAN     NOT NULL DEFAULT FALSE,  -- past its commit point
//!     lease_until DATETIME(6),                  -- a committed claim's lease end (UTC)
//!     status      SMALLINT,                     -- the record's status, readable in SQL
//!     headers     JSON,                         -- its headers: [[name, value], …] in order
//!     KEY expires_at_idx (expires_at)
//! ) ENGINE = InnoDB;
//! CREATE PROCEDURE IF NOT EXISTS `idempotency_records_claim_<hash>`(…) …;
//! CREATE PROCEDURE IF NOT EXISTS `idempotency_records_release_<hash>`(…) …;
//! ```
//!
//! The key is binary, so keys that differ only in case or accents are two keys whatever the
//! server's default collation. It holds 3072 bytes, InnoDB's limit for an index: a store
//! key is the scope (at most 64 bytes), a colon and the client's key, so keep
//! [`max_key_len`](crate::IdempotencyLayer::max_key_len) at 3007 or less (the default is
//! 255). A longer key is refused with [`StoreError::Backend`] before it reaches the server.
//!
//! The procedures are named `{table}_claim_` and `{table}_release_` followed by eight hex
//! digits of a hash of their body (the table name cut and hashed too when that passes 64
//! bytes). A version of this crate that changes a procedure thus creates one of a new name,
//! so instances of two versions can share a table during a rolling upgrade (drop the old
//! procedures once no instance uses them); and tables whose names differ only in case,
//! which routine names cannot tell apart, get procedures of their own. They are created
//! with `SQL SECURITY INVOKER` and run with strict SQL mode whatever the caller's session
//! says. The statements run on a connection of their own that holds the named lock
//! `tower_idempotency.migrate` (on a Galera cluster, which has no such locks, they run
//! without it: each is `IF NOT EXISTS`), so instances that migrate at the same time do not
//! trip over each other. Migrating needs the `CREATE` and `CREATE ROUTINE` privileges;
//! serving needs `SELECT`, `INSERT`, `UPDATE`, `DELETE` on the table and `EXECUTE` on the
//! procedures. You may as well create all three with your own migration tool (the exact
//! statements are given by [`MySqlStore::migration_sql`]) and never call `migrate`;
//! [`MySqlStore::drop_sql`] gives the statements that remove them. The key's 3072 bytes need
//! InnoDB's default 16 KiB pages (`innodb_page_size`).
//!
//! # One round trip per operation
//!
//! Each operation is one statement, so one round trip on a connection whose statements are
//! already prepared (sqlx caches them per connection):
//!
//! - **claim** (and so **replay**): `CALL {table}_claim_…(key, token, fingerprint,
//!   lease_µs)`. MySQL has no statement that both writes and returns rows, so the procedure
//!   does on the server what PostgreSQL's one statement does, every step judged by one
//!   reading of the clock (`now`):
//!
//!   ```sql
//!   SELECT MAX(expires_at > now) INTO live FROM t WHERE `key` = k;
//!   IF live IS NULL THEN          -- no row: insert one (a no-op if a concurrent claim won)
//!       INSERT INTO t (`key`, token, fingerprint, expires_at) VALUES (k, tok, fp, now + lease)
//!       ON DUPLICATE KEY UPDATE token = token;
//!   ELSEIF live = 0 THEN          -- an expired row
//!       -- a lapsed claim not yet contested: contested, its owner gets half a lease more
//!       UPDATE t SET contested = TRUE, expires_at = now + GREATEST(lease DIV 2, 1000)
//!       WHERE `key` = k AND expires_at <= now AND token IS NOT NULL AND NOT contested AND NOT committed;
//!       -- anything else that expired: taken over
//!       UPDATE t SET token = tok, fingerprint = fp, record = NULL, …, expires_at = now + lease
//!       WHERE `key` = k AND expires_at <= now AND (token IS NULL OR contested OR committed);
//!   END IF;
//!   SELECT token <=> tok, fingerprint, record, <µs left>, committed, token
//!   FROM t WHERE `key` = k AND expires_at > now;
//!   ```
//!
//!   A replay or an in-flight answer only reads: it locks no row and writes nothing. A
//!   takeover is decided by the `UPDATE`'s own `WHERE`, which InnoDB evaluates on the latest
//!   row under its lock, so two claims never both take a key. A committed row without a
//!   record whose lease ran out answers [`Claim::OutcomeUnknown`] until its commit's TTL
//!   ends.
//!
//!   When the row disappears between the steps (a sweep or a purge), the procedure returns
//!   nothing and the store calls it again; so it does, a few times, when InnoDB picks the
//!   claim as a deadlock victim.
//! - **complete**: `UPDATE … SET token = NULL, record = ?, status = ?, headers = ?,
//!   expires_at = now + ttl WHERE `key` = ? AND token = ?`.
//! - **release**: `CALL {table}_release_…(key, token)`: deletes the row if it is this
//!   token's and not committed; a committed one keeps it and ends its lease
//!   ([`StoreError::Committed`]).
//! - **revoke**: `DELETE … WHERE `key` = ? AND token = ? AND record IS NULL`, committed or
//!   not.
//! - **extend**, **commit**, **settle**: one `UPDATE` each, as on PostgreSQL; the commit's
//!   runs in your transaction with [`MySqlStore::commit_in`].
//! - **inspect**: one `SELECT` of the row; **purge**: `DELETE … WHERE `key` = ?`.
//!
//! A fenced statement that matches no row answers [`StoreError::LeaseLost`] (sqlx counts
//! matched rows, not changed ones); one that InnoDB (or a Galera cluster) rolled back to
//! break a deadlock runs again, a few times. Every `UPDATE` assigns only values computed from the row
//! as it was, so it means the same whether the server evaluates assignments left to right
//! (MySQL, MariaDB's default) or simultaneously (MariaDB's `SIMULTANEOUS_ASSIGNMENT`).
//!
//! # Expiry and sweeping
//!
//! Expired rows are invisible to claims (they take them over), so removing them is only
//! garbage collection. [`MySqlStore::sweep`] deletes completed rows past their TTL, and
//! in-flight rows [`ORPHAN_RETENTION`] after their lease (so that an owner back from an
//! outage can still store its outcome), oldest first, in batches of
//! [`sweep_batch`](MySqlStore::sweep_batch) rows:
//!
//! ```sql
//! DELETE FROM t WHERE expires_at <= UTC_TIMESTAMP(6)
//!     AND (token IS NULL OR committed OR expires_at <= UTC_TIMESTAMP(6) - INTERVAL 3600 SECOND)
//! ORDER BY expires_at LIMIT ?
//! ```
//!
//! Each batch is one short statement on the expiry index. While it runs, InnoDB locks the
//! rows it scans and the index gaps among them, so a completion or a claim that touches one
//! of them waits for the end of that batch (milliseconds; lower
//! [`sweep_batch`](MySqlStore::sweep_batch) to shorten it). The first claim on a store
//! starts a background task on the current Tokio runtime that sweeps every
//! [`sweep_interval`](MySqlStore::sweep_interval); the task ends when the last handle to
//! the store is dropped.
//!
//! # What it keeps, and what it can lose
//!
//! A record is kept for its whole TTL and never evicted: the table grows with the number of
//! keys answered within one TTL. A record must fit in the server's `max_allowed_packet`
//! (16 MiB on MariaDB, 64 MiB on MySQL 8 by default; the layer stores answers of at most
//! [`max_response_body`](crate::IdempotencyLayer::max_response_body), 1 MiB by default).
//!
//! Every operation is a committed statement, so what InnoDB keeps is what the store keeps:
//! with `innodb_flush_log_at_trx_commit = 1` (the default) an acknowledged record or claim
//! survives a crash of the server. With `0` or `2`, a crash can lose about the last second
//! of commits (those records' retries run again). A failover to an asynchronously
//! replicated server can lose what it had not received; use semi-synchronous replication or
//! a Galera / Group Replication cluster where a failover must lose nothing.
//!
//! # Waiting
//!
//! MySQL has no channel to push the end of a key to another connection (nothing like
//! `LISTEN`/`NOTIFY`, and a named lock would need a connection held for every claim in
//! flight). So while duplicates of a process wait in wait mode ([`IdempotencyStore::wait`])
//! on keys held elsewhere, one task per store looks at all of those keys in one statement
//! every millisecond:
//!
//! ```sql
//! SELECT `key`, token FROM `idempotency_records` WHERE token IS NOT NULL AND `key` IN (?, …)
//! ```
//!
//! and wakes the waiters of each key whose holder is gone (completed, released, revoked,
//! settled, purged or taken over). A waiter on another instance gets the answer about
//! 2 ms after it is stored (BENCHMARKS.md). The task runs only while someone waits, with
//! one statement per look however many wait (up to 256 keys a statement); nobody waiting,
//! it sends nothing, and a request's round trips stay those above. Waiters in the process
//! that ended the key are woken at once, without it. If a look fails or takes more than a
//! second, every waiter looks again at once and then polls (1 ms, each pause half as long
//! again as the one before, up to 100 ms) until a look is tried again a second later.
//!
//! # Example
//!
//! ```no_run
//! use tower_idempotency::sqlx::MySqlPool;
//! use tower_idempotency::{IdempotencyLayer, MySqlStore};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = MySqlPool::connect("mysql://app@db.internal/app").await?;
//! let store = MySqlStore::new(pool);
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
use sqlx::mysql::MySqlRow;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection, MySqlPool, Row};

use super::sql::{
    CLAIM_ATTEMPTS, ClaimContention, ClaimRow, StateRow, derived_name, micros, split_table,
};
use super::wakeup::{Polling, Push, Wait, Wakeups, wait_woken};
use super::{Claim, IdempotencyStore, KeyState, LeaseToken, ORPHAN_RETENTION, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::Record;
#[path = "mysql_watch.rs"]
mod watch;
use watch::MySqlWatch;

/// How a duplicate polls a key that another instance holds when the store's watcher
/// ([`watch`]) is lost: from 1 ms, growing by half each time, up to 100 ms, so that it
/// never lags the end of the key by much more than half the time it already waited.
const POLLING: Polling = Polling {
    first: Duration::from_millis(1),
    grow_percent: 150,
    cap: Duration::from_millis(100),
};

pub use super::sql::InvalidTableName;

/// MySQL's and MariaDB's limit on the length of a name.
const MAX_NAME: usize = 64;
/// The longest store key the table holds: InnoDB's limit on an index key.
pub const MAX_KEY_BYTES: usize = 3072;
/// The named lock that serialises migrations.
const MIGRATE_LOCK: &str = "tower_idempotency.migrate";
/// The SQL mode the procedures are created with (and so run with): strict, so that a value
/// that does not fit is an error and never silently cut.
const PROCEDURE_SQL_MODE: &str = "STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION";

/// A [`IdempotencyStore`] in a MySQL or MariaDB table, shared by every instance that uses
/// the same database (feature `mysql`).
///
/// Claim and release are one call of a stored procedure each; complete, extend, commit,
/// settle, inspect and purge are one statement each. Expiry follows the database clock;
/// expired rows are deleted in batches by a background sweep. The module documentation
/// ([`crate::store::mysql`]) shows the table and every statement.
///
/// Cloning a `MySqlStore` gives another handle to the same store (and pool).
///
/// ```no_run
/// use std::time::Duration;
/// use tower_idempotency::MySqlStore;
/// use tower_idempotency::sqlx::mysql::MySqlPoolOptions;
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = MySqlPoolOptions::new()
///     .max_connections(20)
///     .connect("mysql://app@db.internal/app")
///     .await?;
/// let store = MySqlStore::new(pool)
///     .table("idempotency_records")
///     .sweep_batch(500)
///     .sweep_interval(Duration::from_secs(30));
/// store.migrate().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MySqlStore {
    inner: Arc<Inner>,
}

/// The settings a store was built with.
type Config = super::sql::Settings<MySqlPool>;

struct Inner {
    config: Config,
    sql: Result<Sql, InvalidTableName>,
    sweeper_started: Arc<AtomicBool>,
    /// The duplicates of this process waiting on a key, woken by its end here, or by the
    /// watcher when it ends on another instance.
    wakeups: Arc<Wakeups>,
    /// Looks at the keys waited on while anyone waits (`None` for an invalid table name).
    watch: Option<MySqlWatch>,
}

/// The statements, built once for the table.
struct Sql {
    /// The migration, one statement per entry.
    migrate: Vec<String>,
    /// What undoes it.
    drop: Vec<String>,
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
}

impl fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("MySqlStore")
            .field("table", &inner.config.table)
            .field("table_valid", &inner.sql.is_ok())
            .field("sweep_batch", &inner.config.sweep_batch)
            .field("sweep_interval", &inner.config.sweep_interval)
            .field("pool", &inner.config.pool)
            .finish()
    }
}

/// A store key longer than the table holds ([`MAX_KEY_BYTES`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "the idempotency store key is {len} bytes long, more than the {MAX_KEY_BYTES} a MySQL table holds (lower the layer's max_key_len)"
)]
struct KeyTooLong {
    len: usize,
}

/// A table's name, validated, with its parts quoted.
struct Names<'a> {
    schema: Option<&'a str>,
    table: &'a str,
}

impl<'a> Names<'a> {
    fn new(name: &'a str) -> Result<Self, InvalidTableName> {
        let (schema, table) = split_table(name, MAX_NAME)?;
        Ok(Self { schema, table })
    }

    fn quote(&self, object: &str) -> String {
        match self.schema {
            Some(schema) => format!("`{schema}`.`{object}`"),
            None => format!("`{object}`"),
        }
    }

    /// The quoted table.
    fn table(&self) -> String {
        self.quote(self.table)
    }

    /// The quoted name of the procedure `what` with this `body`: `{table}_{what}_` and eight
    /// hex digits of the body's SHA-256 (cut and hashed to fit 64 bytes). A body that
    /// changes gets a new name, so two versions of the store can share a table during a
    /// rolling upgrade; and since the body names the table exactly, tables whose names
    /// differ only in case (which routine names cannot tell apart) get procedures of their
    /// own.
    fn procedure(&self, what: &str, body: &str) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(body.as_bytes());
        let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        self.quote(&derived_name(
            self.table,
            &format!("_{what}_{hash}"),
            MAX_NAME,
        ))
    }
}

impl Sql {
    fn new(table: &str) -> Result<Self, InvalidTableName> {
        let names = Names::new(table)?;
        let t = names.table();
        let now = "UTC_TIMESTAMP(6)";
        let create_table = format!(
            "CREATE TABLE IF NOT EXISTS {t} (\n\
             \x20   `key`       VARBINARY({MAX_KEY_BYTES}) NOT NULL PRIMARY KEY,\n\
             \x20   token       BINARY(16),\n\
             \x20   fingerprint BINARY(32)  NOT NULL,\n\
             \x20   record      LONGBLOB,\n\
             \x20   expires_at  DATETIME(6) NOT NULL,\n\
             \x20   contested   BOOLEAN     NOT NULL DEFAULT FALSE,\n\
             \x20   committed   BOOLEAN     NOT NULL DEFAULT FALSE,\n\
             \x20   lease_until DATETIME(6),\n\
             \x20   status      SMALLINT,\n\
             \x20   headers     JSON,\n\
             \x20   KEY expires_at_idx (expires_at)\n\
             ) ENGINE = InnoDB"
        );
        // Every UPDATE below assigns values computed from the row as it was (constants,
        // parameters, or the column's own old value), so the order in which the server
        // evaluates assignments does not matter. Inside a procedure the clock is read once
        // (`n`): the server reads `UTC_TIMESTAMP` anew for each statement, and a grace
        // given by one statement could otherwise have run out by the next.
        let claim_body = format!(
            "(\n\
             \x20   IN k VARBINARY({MAX_KEY_BYTES}), IN tok BINARY(16), IN fp BINARY(32), IN lease BIGINT)\n\
             MODIFIES SQL DATA SQL SECURITY INVOKER\n\
             BEGIN\n\
             \x20   DECLARE n DATETIME(6) DEFAULT UTC_TIMESTAMP(6);\n\
             \x20   DECLARE live INT;\n\
             \x20   SELECT MAX(expires_at > n) INTO live FROM {t} WHERE `key` = k;\n\
             \x20   IF live IS NULL THEN\n\
             \x20       INSERT INTO {t} (`key`, token, fingerprint, expires_at)\n\
             \x20       VALUES (k, tok, fp, n + INTERVAL lease MICROSECOND)\n\
             \x20       ON DUPLICATE KEY UPDATE token = token;\n\
             \x20   ELSEIF live = 0 THEN\n\
             \x20       UPDATE {t} SET contested = TRUE,\n\
             \x20           expires_at = n + INTERVAL GREATEST(lease DIV 2, 1000) MICROSECOND\n\
             \x20       WHERE `key` = k AND expires_at <= n\n\
             \x20           AND token IS NOT NULL AND NOT contested AND NOT committed;\n\
             \x20       UPDATE {t} SET token = tok, fingerprint = fp, record = NULL,\n\
             \x20           contested = FALSE, committed = FALSE, lease_until = NULL,\n\
             \x20           status = NULL, headers = NULL,\n\
             \x20           expires_at = n + INTERVAL lease MICROSECOND\n\
             \x20       WHERE `key` = k AND expires_at <= n\n\
             \x20           AND (token IS NULL OR contested OR committed);\n\
             \x20   END IF;\n\
             \x20   SELECT token <=> tok, fingerprint, record,\n\
             \x20       TIMESTAMPDIFF(MICROSECOND, n,\n\
             \x20           IF(committed AND record IS NULL, lease_until, expires_at)),\n\
             \x20       committed, token\n\
             \x20   FROM {t} WHERE `key` = k AND expires_at > n;\n\
             END"
        );
        // The UPDATE's count is of the rows it matched (sqlx sets CLIENT_FOUND_ROWS), read
        // at once: a later read could find the row settled meanwhile.
        let release_body = format!(
            "(\n\
             \x20   IN k VARBINARY({MAX_KEY_BYTES}), IN tok BINARY(16))\n\
             MODIFIES SQL DATA SQL SECURITY INVOKER\n\
             BEGIN\n\
             \x20   DELETE FROM {t} WHERE `key` = k AND token = tok AND NOT committed;\n\
             \x20   IF ROW_COUNT() > 0 THEN\n\
             \x20       SELECT 1, 0;\n\
             \x20   ELSE\n\
             \x20       UPDATE {t} SET lease_until = LEAST(lease_until, {now})\n\
             \x20       WHERE `key` = k AND token = tok AND committed;\n\
             \x20       SELECT 0, ROW_COUNT();\n\
             \x20   END IF;\n\
             END"
        );
        let claim_proc = names.procedure("claim", &claim_body);
        let release_proc = names.procedure("release", &release_body);
        let create_claim = format!("CREATE PROCEDURE IF NOT EXISTS {claim_proc}{claim_body}");
        let create_release = format!("CREATE PROCEDURE IF NOT EXISTS {release_proc}{release_body}");
        let complete = format!(
            "UPDATE {t} SET token = NULL, record = ?, status = ?, headers = ?, \
             expires_at = {now} + INTERVAL ? MICROSECOND \
             WHERE `key` = ? AND token = ?"
        );
        let extend = format!(
            "UPDATE {t} SET \
             expires_at = IF(committed, \
                 GREATEST(expires_at, {now} + INTERVAL ? MICROSECOND), \
                 {now} + INTERVAL ? MICROSECOND), \
             lease_until = IF(committed, {now} + INTERVAL ? MICROSECOND, NULL), \
             contested = FALSE \
             WHERE `key` = ? AND token = ?"
        );
        let commit = format!(
            "UPDATE {t} SET \
             lease_until = IF(committed, lease_until, expires_at), \
             expires_at = GREATEST(expires_at, {now} + INTERVAL ? MICROSECOND), \
             committed = TRUE, contested = FALSE \
             WHERE `key` = ? AND token = ?"
        );
        let settle = format!(
            "UPDATE {t} SET token = NULL, record = ?, status = ?, headers = ?, \
             expires_at = GREATEST(expires_at, {now} + INTERVAL ? MICROSECOND) \
             WHERE `key` = ? AND committed AND record IS NULL AND lease_until <= {now} \
             AND expires_at > {now}"
        );
        let inspect = format!(
            "SELECT record, fingerprint, committed, \
             TIMESTAMPDIFF(MICROSECOND, {now}, expires_at), \
             TIMESTAMPDIFF(MICROSECOND, {now}, lease_until) \
             FROM {t} WHERE `key` = ?"
        );
        let purge = format!("DELETE FROM {t} WHERE `key` = ?");
        let revoke = format!("DELETE FROM {t} WHERE `key` = ? AND token = ? AND record IS NULL");
        let retention = ORPHAN_RETENTION.as_secs();
        let sweep = format!(
            "DELETE FROM {t} WHERE expires_at <= {now} \
             AND (token IS NULL OR committed OR expires_at <= {now} - INTERVAL {retention} SECOND) \
             ORDER BY expires_at LIMIT ?"
        );
        Ok(Self {
            drop: vec![
                format!("DROP PROCEDURE IF EXISTS {claim_proc}"),
                format!("DROP PROCEDURE IF EXISTS {release_proc}"),
                format!("DROP TABLE IF EXISTS {t}"),
            ],
            migrate: vec![create_table, create_claim, create_release],
            claim: format!("CALL {claim_proc}(?, ?, ?, ?)").into(),
            complete: complete.into(),
            release: format!("CALL {release_proc}(?, ?)").into(),
            revoke: revoke.into(),
            extend: extend.into(),
            commit: commit.into(),
            settle: settle.into(),
            inspect: inspect.into(),
            purge: purge.into(),
            sweep: sweep.into(),
        })
    }
}

/// The record's headers as JSON: `[[name, value], …]`, in order (values as text, non-UTF-8
/// bytes replaced).
fn headers_json(record: &Record) -> String {
    fn string(out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                    out.push_str(&format!("\\u{:04x}", u32::from(c)));
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
    let mut out = String::from("[");
    for (i, (name, value)) in record.fields().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('[');
        string(&mut out, name.as_str());
        out.push(',');
        string(&mut out, &String::from_utf8_lossy(value.as_bytes()));
        out.push(']');
    }
    out.push(']');
    out
}

/// The store key's bytes, or an error when the table cannot hold them.
fn key_bytes(key: &StoreKey) -> Result<&[u8], StoreError> {
    let bytes = key.as_str().as_bytes();
    if bytes.len() > MAX_KEY_BYTES {
        return Err(StoreError::backend(KeyTooLong { len: bytes.len() }));
    }
    Ok(bytes)
}

/// Whether InnoDB rolled the statement back to break a deadlock, or a Galera cluster to
/// resolve a conflict between nodes (SQLSTATE 40001): the statement can run again.
fn is_deadlock(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40001")
}

/// The server's error number, if `err` is an error the server sent.
fn error_number(err: &sqlx::Error) -> Option<u16> {
    err.as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .map(|e| e.number())
}

/// `ER_NOT_SUPPORTED_YET`: what a Galera node answers to `GET_LOCK`.
const ER_NOT_SUPPORTED_YET: u16 = 1235;
/// How often a fenced statement that InnoDB rolled back to break a deadlock runs again.
const DEADLOCK_ATTEMPTS: usize = 4;

impl MySqlStore {
    /// A store on `pool`, in the table `idempotency_records`, swept every 60 seconds in
    /// batches of 1000 rows. Call [`migrate`](Self::migrate) once to create the table.
    ///
    /// ```no_run
    /// use tower_idempotency::MySqlStore;
    /// use tower_idempotency::sqlx::MySqlPool;
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MySqlStore::new(MySqlPool::connect("mysql://root@localhost/app").await?);
    /// store.migrate().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(pool: MySqlPool) -> Self {
        Self::from_config(Config::new(pool))
    }

    fn from_config(config: Config) -> Self {
        let wakeups = Arc::new(Wakeups::default());
        let watch = Names::new(&config.table)
            .ok()
            .map(|names| MySqlWatch::new(config.pool.clone(), names.table(), Arc::clone(&wakeups)));
        Self {
            inner: Arc::new(Inner {
                sql: Sql::new(&config.table),
                config,
                sweeper_started: Arc::new(AtomicBool::new(false)),
                wakeups,
                watch,
            }),
        }
    }

    fn edit(self, f: impl FnOnce(&mut Config)) -> Self {
        let mut config = self.inner.config.clone();
        f(&mut config);
        Self::from_config(config)
    }

    /// The table that holds the records: `name` or `database.name`, each part matching
    /// `[A-Za-z_][A-Za-z0-9_]*` (at most 64 bytes). Default: `idempotency_records`.
    ///
    /// The name is quoted in every statement. Whether the server tells `Keys` from `keys`
    /// depends on its `lower_case_table_names`. An invalid name does not panic:
    /// [`migrate`](Self::migrate) and every operation then fail with
    /// [`StoreError::Backend`] wrapping an [`InvalidTableName`].
    ///
    /// ```no_run
    /// use tower_idempotency::MySqlStore;
    /// use tower_idempotency::sqlx::MySqlPool;
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = MySqlPool::connect("mysql://root@localhost/app").await?;
    /// let store = MySqlStore::new(pool).table("billing.idempotency_keys");
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
    pub fn sweep_batch(self, rows: u32) -> Self {
        self.edit(|c| c.set_sweep_batch(rows))
    }

    /// How often the background task sweeps expired rows. Default: 60 seconds.
    /// `Duration::ZERO` turns the background task off (call [`sweep`](Self::sweep) yourself,
    /// or never: expired rows are invisible to claims anyway).
    pub fn sweep_interval(self, interval: Duration) -> Self {
        self.edit(|c| c.set_sweep_interval(interval))
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &MySqlPool {
        &self.inner.config.pool
    }

    /// The name of the table, as given to [`table`](Self::table).
    pub fn table_name(&self) -> &str {
        &self.inner.config.table
    }

    /// The statements [`migrate`](Self::migrate) runs, in order, for your own migration
    /// tool: the table, then the claim and release procedures. Run each as one statement
    /// (a client such as `mysql` needs `DELIMITER` around the procedures), under a strict
    /// SQL mode.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use tower_idempotency::MySqlStore;
    /// use tower_idempotency::sqlx::mysql::MySqlPoolOptions;
    ///
    /// let pool = MySqlPoolOptions::new().connect_lazy("mysql://root@localhost/app").unwrap();
    /// let sql = MySqlStore::new(pool).migration_sql().unwrap();
    /// assert!(sql[0].starts_with("CREATE TABLE IF NOT EXISTS `idempotency_records`"));
    /// assert!(sql[1].starts_with("CREATE PROCEDURE IF NOT EXISTS `idempotency_records_claim_"));
    /// # });
    /// ```
    pub fn migration_sql(&self) -> Result<Vec<String>, InvalidTableName> {
        self.inner
            .sql
            .as_ref()
            .map(|sql| sql.migrate.clone())
            .map_err(Clone::clone)
    }

    /// The statements that remove what [`migrate`](Self::migrate) created: the procedures,
    /// then the table, with every record in it. For tests and for taking a store down; run
    /// them only once no instance uses the table.
    pub fn drop_sql(&self) -> Result<Vec<String>, InvalidTableName> {
        self.inner
            .sql
            .as_ref()
            .map(|sql| sql.drop.clone())
            .map_err(Clone::clone)
    }

    /// Creates the table and its procedures if they do not exist (the SQL is in the
    /// [module documentation](crate::store::mysql)). Safe to call from many instances at
    /// once. Fails with [`StoreError::Backend`] when the table name is invalid
    /// ([`InvalidTableName`]) or the database refuses.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let sql = self.inner.sql()?;
        // A connection of its own: the named lock and the SQL mode are per session, and
        // this session is closed afterwards rather than handed back to your pool.
        let mut conn = MySqlConnection::connect_with(&self.inner.config.pool.connect_options())
            .await
            .map_err(StoreError::backend)?;
        let result = async {
            let locked = sqlx::query_scalar::<_, Option<i64>>("SELECT GET_LOCK(?, 60)")
                .bind(MIGRATE_LOCK)
                .fetch_one(&mut conn)
                .await;
            match locked {
                Ok(Some(1)) => {}
                // Galera has no named locks; every statement is `IF NOT EXISTS` anyway.
                Err(err) if error_number(&err) == Some(ER_NOT_SUPPORTED_YET) => {
                    tracing::debug!("no named lock on this server: migrating without it");
                }
                Err(err) => return Err(err),
                Ok(_) => {
                    return Err(sqlx::Error::Protocol(format!(
                        "could not take the lock {MIGRATE_LOCK} within 60 s"
                    )));
                }
            }
            sqlx::query("SET SESSION sql_mode = ?")
                .bind(PROCEDURE_SQL_MODE)
                .execute(&mut conn)
                .await?;
            for statement in &sql.migrate {
                sqlx::raw_sql(AssertSqlSafe(statement.as_str()))
                    .execute(&mut conn)
                    .await?;
            }
            Ok(())
        }
        .await;
        let _ = conn.close().await;
        result.map_err(StoreError::backend)
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
    /// before, as long as it is the same transaction, on InnoDB tables), then commit.
    /// Should the instance crash after the commit and before the answer is stored, a retry
    /// never runs the operation again: it gets what the layer's recovery hook
    /// ([`IdempotencyLayer::recover_with`](crate::IdempotencyLayer::recover_with)) rebuilds
    /// from those rows, or `500 outcome-unknown`. Should the transaction roll back, the
    /// mark rolls back with it and a retry runs normally.
    ///
    /// [`StoreError::LeaseLost`] means the key is no longer this request's (its lease lapsed
    /// and another request took it over): roll back. The statement locks the row until your
    /// transaction ends, so keep the transaction short (the lease keeper's renewals wait for
    /// it).
    ///
    /// On MariaDB 11.6.2 and later, `innodb_snapshot_isolation` (on by default) makes the
    /// statement fail with error 1020 ("Record has changed since last read") when your
    /// transaction read anything before it and the lease keeper renewed the key since: roll
    /// back, as for any error. Calling `commit_in` first in the transaction (it locks the
    /// row, so renewals wait), or running the transaction at `READ COMMITTED`, avoids it.
    ///
    /// `claim` must come from a layer on this store (the same table).
    ///
    /// ```no_run
    /// use tower_idempotency::{IdempotencyClaim, MySqlStore};
    /// use tower_idempotency::sqlx::{self, MySqlPool};
    ///
    /// async fn pay(pool: &MySqlPool, store: &MySqlStore, claim: &IdempotencyClaim)
    ///     -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    ///     let mut tx = pool.begin().await?;
    ///     let id = sqlx::query(
    ///         "INSERT INTO payments (scope, idempotency_key, amount) VALUES (?, ?, 100)",
    ///     )
    ///     .bind(claim.scope())
    ///     .bind(claim.key())
    ///     .execute(&mut *tx)
    ///     .await?
    ///     .last_insert_id();
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
        E: sqlx::Executor<'c, Database = sqlx::MySql>,
    {
        let sql = self.inner.sql()?;
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&sql.commit)))
            .bind(micros(claim.ttl()))
            .bind(key_bytes(claim.store_key())?)
            .bind(&claim.token().to_bytes()[..])
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
            |inner| async move { super::sql::log_sweep(inner.sweep().await) },
        );
    }

    /// One call of the claim procedure: the row it found, if any.
    async fn claim_once(
        &self,
        sql: &Sql,
        key: &[u8],
        token: LeaseToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Option<MySqlRow>, sqlx::Error> {
        sqlx::query(AssertSqlSafe(Arc::clone(&sql.claim)))
            .bind(key)
            .bind(&token.to_bytes()[..])
            .bind(&fingerprint.as_bytes()[..])
            .bind(micros(lease))
            .fetch_optional(&self.inner.config.pool)
            .await
    }

    /// Runs a fenced statement (built afresh by `query` for each attempt): `LeaseLost` when
    /// it matches no row. A statement rolled back to break a deadlock runs again: each sets
    /// the row to the same values whenever it runs.
    async fn fenced<'q>(
        &self,
        query: impl Fn() -> sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>,
    ) -> Result<(), StoreError> {
        let mut attempt = 1;
        let done = loop {
            match query().execute(&self.inner.config.pool).await {
                Ok(done) => break done,
                Err(err) if is_deadlock(&err) && attempt < DEADLOCK_ATTEMPTS => attempt += 1,
                Err(err) => return Err(StoreError::backend(err)),
            }
        };
        if done.rows_affected() == 0 {
            Err(StoreError::LeaseLost)
        } else {
            Ok(())
        }
    }
}

fn read_claim(row: &MySqlRow, token: LeaseToken) -> Result<Claim, StoreError> {
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
fn read_state(row: &MySqlRow) -> Result<KeyState, StoreError> {
    StateRow {
        record: row.try_get(0).map_err(StoreError::backend)?,
        fingerprint: row.try_get(1).map_err(StoreError::backend)?,
        committed: row.try_get(2).map_err(StoreError::backend)?,
        expires: row.try_get(3).map_err(StoreError::backend)?,
        lease: row.try_get(4).map_err(StoreError::backend)?,
    }
    .into_state()
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
                .bind(batch)
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
impl IdempotencyStore for MySqlStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.ensure_sweeper();
        let sql = self.inner.sql()?;
        let key_bytes = key_bytes(key)?;
        for _ in 0..CLAIM_ATTEMPTS {
            match self
                .claim_once(sql, key_bytes, token, fingerprint, lease)
                .await
            {
                Ok(Some(row)) => return read_claim(&row, token),
                // The row went away between the procedure's steps, or InnoDB broke a
                // deadlock by rolling this call back: run it again.
                Ok(None) => {}
                Err(err) if is_deadlock(&err) => {}
                Err(err) => return Err(StoreError::backend(err)),
            }
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
        let name = key.as_str();
        let (key, token) = (key_bytes(key)?, token.to_bytes());
        let (encoded, headers) = (record.encode(), headers_json(&record));
        self.fenced(|| {
            sqlx::query(AssertSqlSafe(Arc::clone(&sql.complete)))
                .bind(&encoded[..])
                .bind(record.status().as_u16() as i16)
                .bind(headers.as_str())
                .bind(micros(ttl))
                .bind(key)
                .bind(&token[..])
        })
        .await?;
        self.inner.wakeups.wake(name);
        Ok(())
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let sql = self.inner.sql()?;
        let (gone, kept): (i64, i64) = sqlx::query_as(AssertSqlSafe(Arc::clone(&sql.release)))
            .bind(key_bytes(key)?)
            .bind(&token.to_bytes()[..])
            .fetch_one(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?;
        if gone + kept > 0 {
            self.inner.wakeups.wake(key.as_str());
        }
        match (gone, kept) {
            (0, 0) => Err(StoreError::LeaseLost),
            (0, _) => Err(StoreError::Committed),
            _ => Ok(()),
        }
    }

    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let sql = self.inner.sql()?;
        let name = key.as_str();
        let (key, token) = (key_bytes(key)?, token.to_bytes());
        self.fenced(|| {
            sqlx::query(AssertSqlSafe(Arc::clone(&sql.revoke)))
                .bind(key)
                .bind(&token[..])
        })
        .await?;
        self.inner.wakeups.wake(name);
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
        key_bytes(key)?;
        let wait = Wait {
            key,
            fingerprint,
            token,
            lease,
            timeout,
        };
        let push = self.inner.watch.as_ref().map(|w| w as &dyn Push);
        wait_woken(self, &self.inner.wakeups, key.as_str(), push, POLLING, wait).await
    }

    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let sql = self.inner.sql()?;
        let (key, token) = (key_bytes(key)?, token.to_bytes());
        self.fenced(|| {
            sqlx::query(AssertSqlSafe(Arc::clone(&sql.commit)))
                .bind(micros(ttl))
                .bind(key)
                .bind(&token[..])
        })
        .await
    }

    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let sql = self.inner.sql()?;
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&sql.settle)))
            .bind(record.encode())
            .bind(record.status().as_u16() as i16)
            .bind(headers_json(&record))
            .bind(micros(ttl))
            .bind(key_bytes(key)?)
            .execute(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?;
        if done.rows_affected() > 0 {
            self.inner.wakeups.wake(key.as_str());
        }
        Ok(done.rows_affected() > 0)
    }

    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        let sql = self.inner.sql()?;
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&sql.inspect)))
            .bind(key_bytes(key)?)
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
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&sql.purge)))
            .bind(key_bytes(key)?)
            .execute(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?;
        self.inner.wakeups.wake(key.as_str());
        Ok(done.rows_affected() > 0)
    }

    /// Keyset pagination over the primary key: one `SELECT … WHERE `key` > ? ORDER BY `key`
    /// LIMIT page` per page, no lock taken.
    async fn list(
        &self,
        filter: &super::ListFilter,
        cursor: Option<&super::Cursor>,
    ) -> Result<super::ListPage, StoreError> {
        self.list_page(filter, cursor).await
    }

    /// One statement of the background sweep, `batch` rows at most, so that a big table
    /// is never locked for long.
    async fn vacuum(
        &self,
        _cursor: Option<&super::Cursor>,
        batch: usize,
    ) -> Result<super::VacuumPage, StoreError> {
        self.vacuum_step(batch).await
    }

    fn backend_name(&self) -> &'static str {
        "mysql"
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let sql = self.inner.sql()?;
        let lease = micros(lease);
        let (key, token) = (key_bytes(key)?, token.to_bytes());
        self.fenced(|| {
            sqlx::query(AssertSqlSafe(Arc::clone(&sql.extend)))
                .bind(lease)
                .bind(lease)
                .bind(lease)
                .bind(key)
                .bind(&token[..])
        })
        .await
    }
}

/// `list` and `vacuum`, apart from the request path's statements.
impl MySqlStore {
    async fn list_page(
        &self,
        filter: &super::ListFilter,
        cursor: Option<&super::Cursor>,
    ) -> Result<super::ListPage, StoreError> {
        let names =
            Names::new(&self.inner.config.table).map_err(|err| StoreError::backend(err.clone()))?;
        let t = names.table();
        let now = "UTC_TIMESTAMP(6)";
        let size = filter.page_size_or_default();
        let statement = format!(
            "SELECT record, fingerprint, committed, \
             TIMESTAMPDIFF(MICROSECOND, {now}, expires_at), \
             TIMESTAMPDIFF(MICROSECOND, {now}, lease_until), `key` \
             FROM {t} WHERE `key` > ? ORDER BY `key` LIMIT ?"
        );
        let rows = sqlx::query(AssertSqlSafe(statement))
            .bind(cursor.map_or(&b""[..], |c| c.as_str().as_bytes()))
            .bind(u64::try_from(size).unwrap_or(u64::MAX))
            .fetch_all(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?;
        let rows = rows
            .iter()
            .map(|row| {
                let key: Vec<u8> = row.try_get(5).map_err(StoreError::backend)?;
                let key = String::from_utf8_lossy(&key).into_owned();
                Ok((key, read_state(row)))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        super::sql::list_page(rows, filter, size)
    }

    async fn vacuum_step(&self, batch: usize) -> Result<super::VacuumPage, StoreError> {
        let sql = self.inner.sql()?;
        let batch = u64::try_from(batch.max(1)).unwrap_or(u64::MAX);
        let removed = sqlx::query(AssertSqlSafe(Arc::clone(&sql.sweep)))
            .bind(batch)
            .execute(&self.inner.config.pool)
            .await
            .map_err(StoreError::backend)?
            .rows_affected();
        Ok(super::VacuumPage::new(
            removed,
            removed,
            (removed >= batch).then(|| super::Cursor::new("more")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue, StatusCode};

    #[test]
    fn names_are_quoted_and_procedures_are_named_for_their_table_and_body() {
        let names = Names::new("idempotency_records").unwrap();
        assert_eq!(names.table(), "`idempotency_records`");
        let claim = names.procedure("claim", "BEGIN SELECT 1; END");
        assert!(claim.starts_with("`idempotency_records_claim_"), "{claim}");
        assert_eq!(claim.len(), "`idempotency_records_claim_`".len() + 8);
        assert_ne!(claim, names.procedure("claim", "BEGIN SELECT 2; END"));
        let names = Names::new("app.keys").unwrap();
        assert_eq!(names.table(), "`app`.`keys`");
        assert!(
            names
                .procedure("claim", "b")
                .starts_with("`app`.`keys_claim_")
        );
        for bad in ["a`b", "a.b.c", "", "1x", &"x".repeat(65)] {
            assert!(Names::new(bad).is_err(), "{bad:?}");
        }
        // A 64-byte table name still gives procedure names within 64 bytes, and distinct.
        let (a, b) = (
            format!("{}a", "x".repeat(63)),
            format!("{}b", "x".repeat(63)),
        );
        let a = Names::new(&a).unwrap().procedure("release", "b");
        let b = Names::new(&b).unwrap().procedure("release", "b");
        assert_ne!(a, b);
        assert_eq!(a.len(), 64 + 2);
        // Tables that differ only in case name themselves in their bodies, so their
        // procedures differ even to a server that ignores case in routine names.
        for name in ["Keys", "keys"] {
            let sql = Sql::new(name).unwrap();
            assert!(sql.migrate[1].contains(&format!("`{name}`")));
        }
        let upper = Sql::new("Keys").unwrap().claim.to_ascii_lowercase();
        let lower = Sql::new("keys").unwrap().claim.to_ascii_lowercase();
        assert_ne!(upper, lower);
    }

    #[test]
    fn headers_are_written_as_a_json_array_of_pairs() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append(
            "x-note",
            HeaderValue::from_static("say \"hi\" \\ now\tplease"),
        );
        headers.append(
            "x-raw",
            HeaderValue::from_bytes(b"caf\xe9").expect("obs-text is a valid value"),
        );
        let record = Record::new(StatusCode::CREATED, headers, Bytes::new(), None);
        assert_eq!(
            headers_json(&record),
            "[[\"content-type\",\"text/plain\"],\
             [\"x-note\",\"say \\\"hi\\\" \\\\ now\\u0009please\"],\
             [\"x-raw\",\"caf\u{fffd}\"]]"
        );
        let empty = Record::new(StatusCode::OK, HeaderMap::new(), Bytes::new(), None);
        assert_eq!(headers_json(&empty), "[]");
    }

    #[test]
    fn keys_longer_than_the_table_holds_are_refused() {
        let scope = crate::Scope::anonymous();
        let fits = StoreKey::new(&scope, &"k".repeat(MAX_KEY_BYTES - 5));
        assert_eq!(fits.as_str().len(), MAX_KEY_BYTES);
        assert!(key_bytes(&fits).is_ok());
        let long = StoreKey::new(&scope, &"k".repeat(MAX_KEY_BYTES - 4));
        match key_bytes(&long) {
            Err(StoreError::Backend(err)) => {
                assert!(err.to_string().contains("3073 bytes"), "{err}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
