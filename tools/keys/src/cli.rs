//! `idempotency-keys`: inspect, purge, settle, list and vacuum the keys of a shared
//! idempotency store (Redis, Redis Cluster, PostgreSQL, MySQL / MariaDB).
//!
//! The whole tool lives in this file, so that the installed binary (`tools/keys`) and
//! `cargo run --example keys` (which includes this file) are one program.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tower_idempotency::store::{
    Cursor, KeyState, ListFilter, ListedKey, OpenError, OpenOptions, Record, StateFilter, StoreKey,
};
use tower_idempotency::{IdempotencyStore, Scope, StoreError};

/// Exit status: done.
pub const EXIT_OK: u8 = 0;
/// Exit status: nothing to do, nothing changed (the key is free, or not in the state the
/// command needs).
pub const EXIT_NOTHING: u8 = 1;
/// Exit status: the command line is wrong (unknown command or option, a missing key, a
/// bad value or store URL); nothing was done.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the store could not be reached, failed, or did not answer in time.
pub const EXIT_STORE: u8 = 3;
/// Exit status: a command that changes the store was not confirmed (no `--yes` and stdin
/// not a terminal, or the answer was not `y`); nothing was changed.
pub const EXIT_REFUSED: u8 = 4;
/// Exit status: a record could not be read (damaged, a newer format, or sealed under keys
/// the tool was not given).
pub const EXIT_UNREADABLE: u8 = 5;

const EXIT_CODES: &str = "\
Exit status:
  0  done
  1  nothing to do, nothing changed: `inspect` or `purge` found the key free; `settle` found
     the key not in the outcome-unknown state
  2  usage: unknown command or option, a missing key, a bad value or store URL
  3  the store could not be reached, failed, or did not answer within --timeout
  4  refused: purge, settle or vacuum without --yes while stdin is not a terminal, or not
     confirmed with `y`; nothing was changed
  5  a record could not be read (damaged, newer format, or sealed under other keys)";

const EXAMPLES: &str = "\
Examples:
  export IDEMPOTENCY_STORE=postgres://postgres@127.0.0.1/test
  idempotency-keys inspect order-1 --principal user:42
  idempotency-keys settle order-1 --principal user:42 --status 201 \\
      --header 'content-type: application/json' --body '{\"id\":1}' --yes
  idempotency-keys list --state outcome-unknown --output json
  idempotency-keys list --older-than 10m --limit 50
  idempotency-keys vacuum --yes";

/// Inspect, purge, settle, list and vacuum the keys of a shared idempotency store.
///
/// Every option can also be set by the environment variable shown with it; a flag given
/// on the command line wins.
#[derive(Debug, Parser)]
#[command(
    name = "idempotency-keys",
    version,
    about = "Inspect, purge, settle, list and vacuum the keys of a shared idempotency store",
    after_help = EXIT_CODES,
    after_long_help = format!("{EXAMPLES}\n\n{EXIT_CODES}"),
)]
pub struct Cli {
    /// The store: redis://host:port[/db], rediss://…, redis-cluster://host:port[,host:port…],
    /// postgres://user@host/db or mysql://user@host/db (the URL the service uses).
    #[arg(long, env = "IDEMPOTENCY_STORE", value_name = "URL", global = true)]
    store: Option<String>,
    /// The Redis key prefix of the service's store [default: idempotency:].
    #[arg(
        long,
        env = "IDEMPOTENCY_REDIS_PREFIX",
        value_name = "PREFIX",
        global = true
    )]
    prefix: Option<String>,
    /// The SQL table of the service's store [default: idempotency_records].
    #[arg(long, env = "IDEMPOTENCY_TABLE", value_name = "TABLE", global = true)]
    table: Option<String>,
    /// How results are printed: `text` for people, `json` for programs (JSON Lines: one
    /// object per line on stdout, per key for `list`).
    #[arg(
        long,
        env = "IDEMPOTENCY_KEYS_OUTPUT",
        value_enum,
        default_value_t = Output::Text,
        global = true
    )]
    output: Output,
    /// Answer yes to the confirmation of purge, settle and vacuum (required when stdin is
    /// not a terminal). In the environment: 1/0, true/false, yes/no, on/off.
    #[arg(
        long,
        short = 'y',
        env = "IDEMPOTENCY_KEYS_YES",
        value_parser = clap::builder::BoolishValueParser::new(),
        global = true
    )]
    yes: bool,
    /// Show the progress of `list` and `vacuum` on stderr even when stderr is not a
    /// terminal (on a terminal it is shown anyway).
    #[arg(
        long,
        env = "IDEMPOTENCY_KEYS_PROGRESS",
        value_parser = clap::builder::BoolishValueParser::new(),
        global = true
    )]
    progress: bool,
    /// How long connecting, and then each store call, may take (e.g. 3s, 500ms, 1m).
    #[arg(
        long,
        env = "IDEMPOTENCY_KEYS_TIMEOUT",
        value_name = "DURATION",
        default_value = "3s",
        value_parser = parse_timeout,
        global = true
    )]
    timeout: Duration,
    /// The keys the service seals records with (`id:base64key,…`, as the service's
    /// IDEMPOTENCY_ENCRYPTION_KEYS): `inspect` and `list` open records, `settle` seals its
    /// answer. Needs the tool built with the `encryption` feature (the default).
    #[arg(
        long,
        env = "IDEMPOTENCY_ENCRYPTION_KEYS",
        value_name = "KEYS",
        hide_env_values = true,
        global = true
    )]
    encryption_keys: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Lines for people.
    Text,
    /// JSON Lines: one JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show what the store holds under a key (exit 1 when it is free).
    Inspect {
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Remove whatever the store holds under a key: a retry with it then runs the operation
    /// again (exit 1 when there was nothing).
    Purge {
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Give a key whose outcome is unknown (committed, no stored answer) the answer retries
    /// will replay (exit 1, nothing changed, when the key is in any other state).
    Settle {
        #[command(flatten)]
        key: KeyArgs,
        /// The HTTP status retries get (100-999).
        #[arg(long, env = "IDEMPOTENCY_KEYS_STATUS", value_parser = parse_status)]
        status: StatusCode,
        /// A header of the answer, `name: value`; repeat for more (in the environment,
        /// several separated by newlines).
        #[arg(
            long = "header",
            env = "IDEMPOTENCY_KEYS_HEADERS",
            value_name = "NAME: VALUE",
            value_delimiter = '\n',
            value_parser = parse_header
        )]
        headers: Vec<(HeaderName, HeaderValue)>,
        /// The answer's body.
        #[arg(long, env = "IDEMPOTENCY_KEYS_BODY", default_value = "")]
        body: String,
        /// How long the answer is kept, at least 1s; never shorter than the commit was to be
        /// kept (e.g. 24h, 90m, 86400).
        #[arg(
            long,
            env = "IDEMPOTENCY_KEYS_TTL",
            value_name = "DURATION",
            default_value = "24h",
            value_parser = parse_ttl
        )]
        ttl: Duration,
    },
    /// List keys, filtered by state and age, page by page (a store of any size).
    List(ListArgs),
    /// Remove now what has expired (what the store's own expiry would reclaim later);
    /// never a live record, a claim in flight or a committed key still kept.
    Vacuum {
        /// How many entries one step removes at most (each step is one short statement).
        #[arg(
            long,
            env = "IDEMPOTENCY_KEYS_BATCH",
            default_value_t = 1000,
            value_parser = clap::value_parser!(u32).range(1..)
        )]
        batch: u32,
    },
}

/// How a key is named.
#[derive(Debug, Args)]
struct KeyArgs {
    /// The client's key (the Idempotency-Key header's value), in the shared scope unless
    /// --principal names the caller.
    #[arg(
        value_name = "KEY",
        required_unless_present = "stored",
        conflicts_with = "stored"
    )]
    key: Option<String>,
    /// The authenticated principal whose key it is (as the service's auth layer names it,
    /// e.g. user:42).
    #[arg(long, env = "IDEMPOTENCY_KEYS_PRINCIPAL", value_name = "ID")]
    principal: Option<String>,
    /// The key as the store keeps it, SCOPE:KEY (as `list` shows it: a Redis key without
    /// its prefix, the SQL table's `key` column).
    #[arg(
        long,
        env = "IDEMPOTENCY_KEYS_STORED",
        value_name = "SCOPE:KEY",
        conflicts_with = "principal"
    )]
    stored: Option<String>,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only keys in this state; repeat or separate with commas for several [default: all].
    #[arg(
        long = "state",
        env = "IDEMPOTENCY_KEYS_STATE",
        value_enum,
        value_delimiter = ','
    )]
    states: Vec<ListState>,
    /// Only records and committed keys stored at least this long ago (e.g. 10m, 2h).
    /// Stores keep no creation time: the age is --record-ttl minus the time the key is
    /// still kept, exact when the service stores every record with that TTL. Claims in
    /// flight have no age: with --older-than they are not listed.
    #[arg(
        long,
        env = "IDEMPOTENCY_KEYS_OLDER_THAN",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    older_than: Option<Duration>,
    /// The TTL the service stores records with, for --older-than (the layer's default is
    /// 24h).
    #[arg(
        long,
        env = "IDEMPOTENCY_KEYS_RECORD_TTL",
        value_name = "DURATION",
        default_value = "24h",
        value_parser = parse_ttl
    )]
    record_ttl: Duration,
    /// Only keys the store forgets within this long (a claim: within its lease).
    #[arg(
        long,
        env = "IDEMPOTENCY_KEYS_EXPIRES_WITHIN",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    expires_within: Option<Duration>,
    /// Stop after this many keys.
    #[arg(long, env = "IDEMPOTENCY_KEYS_LIMIT", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// How many keys one store call reads.
    #[arg(
        long,
        env = "IDEMPOTENCY_KEYS_PAGE_SIZE",
        default_value_t = 500,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    page_size: u32,
}

/// A state `list` filters by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ListState {
    /// A claim whose operation runs (committed or not).
    InFlight,
    /// Committed, its owner gone, no stored answer: waits for `settle`.
    OutcomeUnknown,
    /// A stored answer (tombstones included).
    Completed,
}

/// Why the tool stops: an exit status and what to tell the operator.
#[derive(Debug)]
pub struct Failure {
    /// The exit status.
    pub code: u8,
    /// The message, on stderr.
    pub message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// A duration: a whole number with a unit (`ms`, `s`, `m`, `h`, `d`), several in a row
/// (`1h30m`), or a bare number of seconds.
/// A `--timeout`: a duration ([`parse_duration`]) from 1 ms to 24 h. Shorter, every call
/// would time out; longer is no bound at all (and a duration near the largest one would
/// overflow the tool's own margins).
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if timeout < Duration::from_millis(1) || timeout > Duration::from_secs(24 * 3600) {
        return Err(format!("{text:?} is not a timeout between 1ms and 24h"));
    }
    Ok(timeout)
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let bad = || format!("{text:?} is not a duration (e.g. 90s, 10m, 1h30m, 500ms, 2d)");
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..unit] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
            "d" => Duration::from_secs(n.checked_mul(86_400).ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        rest = &rest[unit..];
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    Ok(total)
}

/// A TTL: a duration of at least one second (a settled answer kept for no time would free
/// a committed key at once, and a retry would run the operation again).
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl < Duration::from_secs(1) {
        return Err(format!(
            "{text:?}: must be at least 1s (settling never shortens how long a committed key is kept, \
             and an answer kept for no time would let the operation run again)"
        ));
    }
    Ok(ttl)
}

fn parse_status(text: &str) -> Result<StatusCode, String> {
    text.trim()
        .parse::<u16>()
        .ok()
        .and_then(|n| StatusCode::from_u16(n).ok())
        .ok_or_else(|| format!("{text:?} is not an HTTP status (100-999)"))
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: expected 'name: value'"))?;
    let name = HeaderName::try_from(name.trim()).map_err(|e| format!("{text:?}: {e}"))?;
    let value = HeaderValue::try_from(value.trim()).map_err(|e| format!("{text:?}: {e}"))?;
    Ok((name, value))
}

impl KeyArgs {
    /// The key as the store keeps it.
    fn store_key(&self) -> Result<StoreKey, Failure> {
        if let Some(stored) = &self.stored {
            return StoreKey::from_stored(stored).ok_or_else(|| {
                fail(
                    EXIT_USAGE,
                    format!(
                        "--stored {stored:?} is not a stored key: SCOPE:KEY, the scope `anon` or 64 hex digits"
                    ),
                )
            });
        }
        let key = self.key.as_deref().unwrap_or_default();
        if key.is_empty() || key.chars().any(char::is_control) {
            return Err(fail(
                EXIT_USAGE,
                format!(
                    "{key:?} is not an idempotency key: text without control characters, not empty"
                ),
            ));
        }
        let scope = match &self.principal {
            Some(principal) => Scope::of_principal(principal),
            None => Scope::anonymous(),
        };
        Ok(StoreKey::new(&scope, key))
    }
}

/// The error text with its sources.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn store_failed(err: StoreError) -> Failure {
    let code = match err {
        StoreError::Decode(_) => EXIT_UNREADABLE,
        // A --table the store refuses is the operator's mistake, not the store's failure.
        _ if err.is_invalid_table_name() => EXIT_USAGE,
        _ => EXIT_STORE,
    };
    fail(code, format!("the store failed: {}", chain(&err)))
}

/// Runs a store call within `timeout`.
async fn call<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result.map_err(store_failed),
        Err(_) => Err(fail(
            EXIT_STORE,
            format!(
                "the store did not answer within {timeout:?} (--timeout); it may still act on the call"
            ),
        )),
    }
}

impl Cli {
    async fn open(&self) -> Result<Arc<dyn IdempotencyStore>, Failure> {
        let url = self.store.as_deref().map(str::trim).unwrap_or_default();
        if url.is_empty() {
            return Err(fail(
                EXIT_USAGE,
                "no store: pass --store URL or set IDEMPOTENCY_STORE (redis://…, redis-cluster://…, postgres://… or mysql://…)",
            ));
        }
        if url == "memory" || url.starts_with("memory:") {
            return Err(fail(
                EXIT_USAGE,
                "--store must be a shared store (redis://…, redis-cluster://…, postgres://… or mysql://…): \
                 a memory store lives inside its service's process",
            ));
        }
        // An operator's tool: it changes no schema and sweeps nothing in the background.
        let mut options = OpenOptions::new()
            .migrate(false)
            .sweep(false)
            .connect_timeout(self.timeout);
        if let Some(prefix) = &self.prefix {
            options = options.prefix(prefix.clone());
        }
        if let Some(table) = &self.table {
            options = options.table(table.clone());
        }
        let opened = tokio::time::timeout(
            self.timeout + Duration::from_millis(500),
            tower_idempotency::store::open_with(url, &options),
        )
        .await
        .map_err(|_| {
            fail(
                EXIT_STORE,
                format!(
                    "cannot connect to the store within {:?} (--timeout)",
                    self.timeout
                ),
            )
        })?;
        let store = opened.map_err(|err| {
            let code = match err {
                OpenError::UnknownScheme(_) | OpenError::NotBuilt { .. } => EXIT_USAGE,
                _ => EXIT_STORE,
            };
            fail(code, chain(&err))
        })?;
        self.sealed(store)
    }

    /// With --encryption-keys, the store as the sealing service sees it.
    fn sealed(
        &self,
        store: Arc<dyn IdempotencyStore>,
    ) -> Result<Arc<dyn IdempotencyStore>, Failure> {
        match self.encryption_keys.as_deref().filter(|k| !k.is_empty()) {
            None => Ok(store),
            #[cfg(feature = "encryption")]
            Some(keys) => {
                let ring = tower_idempotency::store::sealed::Keyring::parse(keys)
                    .map_err(|e| fail(EXIT_USAGE, format!("IDEMPOTENCY_ENCRYPTION_KEYS: {e}")))?;
                Ok(Arc::new(tower_idempotency::store::sealed::Sealed::new(
                    store, ring,
                )))
            }
            #[cfg(not(feature = "encryption"))]
            Some(_) => Err(fail(
                EXIT_USAGE,
                "IDEMPOTENCY_ENCRYPTION_KEYS needs the tool built with the `encryption` feature",
            )),
        }
    }

    /// Asks the operator to confirm `what` (on stderr, reading stdin), unless --yes.
    fn confirm(&self, what: &str) -> Result<(), Failure> {
        if self.yes {
            return Ok(());
        }
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Err(fail(
                EXIT_REFUSED,
                format!(
                    "refused to {what}: stdin is not a terminal to confirm on; pass --yes \
                     (or set IDEMPOTENCY_KEYS_YES=true). Nothing was changed."
                ),
            ));
        }
        eprint!("{what}? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = stdin.lock().read_line(&mut answer);
        if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            Ok(())
        } else {
            Err(fail(EXIT_REFUSED, "not confirmed: nothing was changed"))
        }
    }

    /// Refuses a destructive command before touching the store when it cannot be
    /// confirmed.
    fn can_confirm(&self, what: &str) -> Result<(), Failure> {
        if self.yes || std::io::stdin().is_terminal() {
            Ok(())
        } else {
            self.confirm(what)
        }
    }

    fn progress(&self) -> Option<Progress> {
        let tty = std::io::stderr().is_terminal();
        (self.progress || tty).then_some(Progress { tty })
    }
}

/// Progress lines on stderr: rewritten in place on a terminal, one per page elsewhere.
struct Progress {
    tty: bool,
}

impl Progress {
    fn show(&self, line: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

fn state_name(state: &KeyState) -> &'static str {
    match state {
        KeyState::Free => "free",
        KeyState::InFlight { .. } => "in-flight",
        KeyState::OutcomeUnknown { .. } => "outcome-unknown",
        KeyState::Completed { .. } => "completed",
        _ => "unknown",
    }
}

/// A key and its state as one JSON object; `body` includes the record's body (as text,
/// invalid UTF-8 replaced).
fn state_json(key: &StoreKey, state: &KeyState, body: bool) -> Value {
    let mut obj = json!({
        "key": key.to_string(),
        "client_key": key.client_key(),
        "state": state_name(state),
    });
    let map = obj.as_object_mut().expect("an object");
    match state {
        KeyState::InFlight {
            fingerprint,
            lease_remaining,
            committed,
        } => {
            map.insert("fingerprint".into(), json!(fingerprint.to_hex()));
            map.insert("committed".into(), json!(committed));
            map.insert(
                "lease_remaining_ms".into(),
                json!(lease_remaining.as_millis() as u64),
            );
        }
        KeyState::OutcomeUnknown {
            fingerprint,
            expires_in,
        } => {
            map.insert("fingerprint".into(), json!(fingerprint.to_hex()));
            map.insert(
                "expires_in_ms".into(),
                json!(expires_in.map(|d| d.as_millis() as u64)),
            );
        }
        KeyState::Completed { record, expires_in } => {
            map.insert("fingerprint".into(), json!(record.fingerprint().to_hex()));
            map.insert("status".into(), json!(record.status().as_u16()));
            map.insert("tombstone".into(), json!(record.is_tombstone()));
            map.insert(
                "headers".into(),
                Value::Array(
                    record
                        .headers()
                        .iter()
                        .map(|(n, v)| json!([n.as_str(), String::from_utf8_lossy(v.as_bytes())]))
                        .collect(),
                ),
            );
            map.insert("body_bytes".into(), json!(record.body().len()));
            if body {
                map.insert("body".into(), json!(String::from_utf8_lossy(record.body())));
            }
            map.insert(
                "expires_in_ms".into(),
                json!(expires_in.map(|d| d.as_millis() as u64)),
            );
        }
        _ => {}
    }
    obj
}

/// `inspect`'s text: the state, then its details, one per line.
fn describe(key: &StoreKey, state: &KeyState) -> String {
    let mut out = format!("key: {key}\nstate: {state}\n");
    match state {
        KeyState::InFlight { fingerprint, .. } | KeyState::OutcomeUnknown { fingerprint, .. } => {
            out += &format!("fingerprint: {}\n", fingerprint.to_hex());
        }
        KeyState::Completed { record, .. } => {
            out += &format!("fingerprint: {}\n", record.fingerprint().to_hex());
            out += &format!("status: {}\n", record.status().as_u16());
            for (name, value) in record.headers() {
                out += &format!(
                    "header: {name}: {}\n",
                    String::from_utf8_lossy(value.as_bytes())
                );
            }
            if !record.is_tombstone() {
                out += &format!("body: {}\n", String::from_utf8_lossy(record.body()));
            }
        }
        _ => {}
    }
    out
}

/// Where results go: stdout, or a buffer (in tests).
pub struct Out<'a>(pub &'a mut dyn Write);

impl Out<'_> {
    fn line(&mut self, text: impl std::fmt::Display) -> Result<(), Failure> {
        writeln!(self.0, "{text}").map_err(|e| fail(EXIT_STORE, format!("cannot write: {e}")))
    }
}

/// Runs the parsed command line, printing results to `out`; the exit status.
pub async fn run(cli: Cli, out: &mut Out<'_>) -> Result<u8, Failure> {
    let json = cli.output == Output::Json;
    match &cli.command {
        Command::Inspect { key } => {
            let key = key.store_key()?;
            let store = cli.open().await?;
            let state = call(cli.timeout, store.inspect(&key)).await?;
            if json {
                out.line(state_json(&key, &state, true))?;
            } else {
                out.line(describe(&key, &state).trim_end())?;
            }
            Ok(if matches!(state, KeyState::Free) {
                EXIT_NOTHING
            } else {
                EXIT_OK
            })
        }
        Command::Purge { key } => {
            let key = key.store_key()?;
            let what = format!("purge {key} (a retry with this key runs the operation again)");
            cli.can_confirm(&what)?;
            let store = cli.open().await?;
            // Purging never reads the record: one that cannot be read (damaged, sealed
            // under keys the tool was not given, plain where records are sealed) is what
            // an operator purges most of all.
            let state = call(cli.timeout, async {
                match store.inspect(&key).await {
                    Ok(state) => Ok(Ok(state)),
                    Err(StoreError::Decode(err)) => Ok(Err(err)),
                    Err(err) => Err(err),
                }
            })
            .await?;
            match &state {
                Ok(KeyState::Free) => {
                    report_purge(out, json, &key, false)?;
                    return Ok(EXIT_NOTHING);
                }
                Ok(state) if !cli.yes => eprintln!("{}", describe(&key, state).trim_end()),
                Ok(_) => {}
                Err(err) => eprintln!("{key}: a record that cannot be read ({err})"),
            }
            cli.confirm(&what)?;
            let purged = call(cli.timeout, store.purge(&key)).await?;
            report_purge(out, json, &key, purged)?;
            Ok(if purged { EXIT_OK } else { EXIT_NOTHING })
        }
        Command::Settle {
            key,
            status,
            headers,
            body,
            ttl,
        } => {
            let key = key.store_key()?;
            let what = format!(
                "settle {key}: retries replay {} from now on",
                status.as_u16()
            );
            cli.can_confirm(&what)?;
            let store = cli.open().await?;
            let state = call(cli.timeout, store.inspect(&key)).await?;
            let KeyState::OutcomeUnknown { fingerprint, .. } = state else {
                return Err(fail(
                    EXIT_NOTHING,
                    format!(
                        "{key} is {}, not in the outcome-unknown state: nothing was changed \
                         (only a committed key without a stored answer is settled)",
                        state_name(&state)
                    ),
                ));
            };
            cli.confirm(&what)?;
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.append(name.clone(), value.clone());
            }
            let record = Record::new(*status, map, Bytes::from(body.clone()), None)
                .with_fingerprint(fingerprint);
            if call(cli.timeout, store.settle(&key, record, *ttl)).await? {
                if json {
                    out.line(json!({
                        "key": key.to_string(),
                        "settled": true,
                        "status": status.as_u16(),
                    }))?;
                } else {
                    out.line(format_args!(
                        "settled {key}: retries replay {}",
                        status.as_u16()
                    ))?;
                }
                Ok(EXIT_OK)
            } else {
                Err(fail(
                    EXIT_NOTHING,
                    format!("{key} changed meanwhile: nothing was stored (inspect it)"),
                ))
            }
        }
        Command::List(args) => list(&cli, args, out).await,
        Command::Vacuum { batch } => {
            cli.can_confirm("vacuum the store (remove every expired entry now)")?;
            let store = cli.open().await?;
            cli.confirm("vacuum the store (remove every expired entry now)")?;
            let progress = cli.progress();
            let (mut removed, mut scanned) = (0u64, 0u64);
            let mut cursor: Option<Cursor> = None;
            loop {
                let page =
                    call(cli.timeout, store.vacuum(cursor.as_ref(), *batch as usize)).await?;
                removed += page.removed;
                scanned += page.scanned;
                if let Some(p) = &progress {
                    p.show(&format!("vacuum: {scanned} looked at, {removed} removed"));
                }
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            if let Some(p) = &progress {
                p.done();
            }
            if json {
                out.line(json!({"vacuumed": true, "removed": removed, "scanned": scanned}))?;
            } else {
                out.line(format_args!(
                    "vacuumed: {removed} expired entries removed ({scanned} looked at)"
                ))?;
            }
            Ok(EXIT_OK)
        }
    }
}

fn report_purge(
    out: &mut Out<'_>,
    json: bool,
    key: &StoreKey,
    purged: bool,
) -> Result<(), Failure> {
    if json {
        out.line(json!({"key": key.to_string(), "purged": purged}))
    } else if purged {
        out.line(format_args!(
            "purged {key}: a retry with this key runs the operation again"
        ))
    } else {
        out.line(format_args!("nothing under {key}"))
    }
}

async fn list(cli: &Cli, args: &ListArgs, out: &mut Out<'_>) -> Result<u8, Failure> {
    let mut states = StateFilter::NONE;
    for state in &args.states {
        states |= match state {
            ListState::InFlight => StateFilter::IN_FLIGHT,
            ListState::OutcomeUnknown => StateFilter::OUTCOME_UNKNOWN,
            ListState::Completed => StateFilter::COMPLETED,
        };
    }
    if args.states.is_empty() {
        states = StateFilter::ALL;
    }
    let mut filter = ListFilter::new().page_size(args.page_size as usize);
    let mut within = args.expires_within;
    if let Some(age) = args.older_than {
        if args.states.contains(&ListState::InFlight) {
            return Err(fail(
                EXIT_USAGE,
                "--older-than with --state in-flight: a claim in flight has no age a store keeps",
            ));
        }
        if states == StateFilter::ALL {
            states = StateFilter::OUTCOME_UNKNOWN | StateFilter::COMPLETED;
        }
        let Some(left) = args.record_ttl.checked_sub(age) else {
            return Err(fail(
                EXIT_USAGE,
                format!(
                    "--older-than {age:?} is longer than --record-ttl {:?}: no record is kept that long",
                    args.record_ttl
                ),
            ));
        };
        within = Some(within.map_or(left, |w| w.min(left)));
    }
    filter = filter.states(states);
    if let Some(within) = within {
        filter = filter.expires_within(within);
    }
    let store = cli.open().await?;
    let json = cli.output == Output::Json;
    let progress = cli.progress();
    let (mut listed, mut scanned, mut unreadable) = (0u64, 0u64, 0u64);
    let mut cursor: Option<Cursor> = None;
    'walk: loop {
        let page = call(cli.timeout, store.list(&filter, cursor.as_ref())).await?;
        scanned += page.scanned;
        for key in &page.unreadable {
            unreadable += 1;
            if json {
                out.line(json!({"key": key.to_string(), "client_key": key.client_key(), "state": "unreadable"}))?;
            } else {
                out.line(format_args!("{key}\tunreadable record"))?;
            }
        }
        for ListedKey { key, state, .. } in &page.entries {
            if json {
                out.line(state_json(key, state, false))?;
            } else {
                out.line(format_args!("{key}\t{state}"))?;
            }
            listed += 1;
            if args.limit.is_some_and(|limit| listed >= limit) {
                break 'walk;
            }
        }
        if let Some(p) = &progress {
            p.show(&format!("list: {scanned} keys read, {listed} listed"));
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    if let Some(p) = &progress {
        p.done();
    }
    Ok(if unreadable > 0 {
        EXIT_UNREADABLE
    } else {
        EXIT_OK
    })
}

/// The program: parses the command line (exit 2 on a usage error, 0 for `--help`), runs
/// it on a Tokio runtime, prints the failure on stderr with its exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_OK
            });
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("idempotency-keys: cannot start: {err}");
            return ExitCode::from(EXIT_STORE);
        }
    };
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    let result = runtime.block_on(run(cli, &mut Out(&mut lock)));
    let _ = lock.flush();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("idempotency-keys: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bad_ones_are_refused() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        for bad in ["", "-1", "1.5", "10 m", "m", "10x", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("999ms").is_err());
        assert!(parse_ttl("1s").is_ok());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
