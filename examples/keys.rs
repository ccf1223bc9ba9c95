//! `keys`: inspect, purge and settle idempotency keys on Redis, PostgreSQL or MySQL.
//!
//! ```text
//! cargo run --example keys --features redis,postgres,mysql -- STORE COMMAND KEY [OPTIONS]
//!
//! STORE     redis://host:port[/db], postgres://user@host/db or mysql://user@host/db
//! COMMAND   inspect             what the store holds under the key
//!           purge               remove it (a retry then runs the operation again!)
//!           settle              give a key whose outcome is unknown its answer:
//!                               --status N [--header 'name: value']... [--body TEXT]
//! KEY       the client's key, in the shared scope (`anon`), or with
//!           --principal ID      in the scope of an authenticated principal (`user:42`), or
//!           --stored SCOPE:KEY  as the store keeps it (a Redis key without its prefix,
//!                               the `key` column of the SQL table)
//! OPTIONS   --prefix P          the Redis key prefix (default `idempotency:`)
//!           --table T           the SQL table (default `idempotency_records`)
//!           --ttl SECONDS       how long a settled answer is kept, at least 1 (default
//!                               86400); never shorter than the commit was to be kept
//! ```
//!
//! For example, after the demo crashed between its commit point and its answer:
//!
//! ```text
//! cargo run --example keys --features postgres -- postgres://postgres@127.0.0.1/test inspect crash-1
//! cargo run --example keys --features postgres -- postgres://postgres@127.0.0.1/test \
//!     settle crash-1 --status 201 --header 'content-type: application/json' --body '{"id":"…"}'
//! ```
//!
//! On PostgreSQL and MySQL the table's `status` and `headers` columns can be read in SQL
//! too. Where the service seals its records, set `IDEMPOTENCY_ENCRYPTION_KEYS` as it does
//! (and build with `--features encryption`): `inspect` then opens records and `settle`
//! seals its answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tower_idempotency::store::OpenOptions;
use tower_idempotency::store::{KeyState, Record, StoreKey};
use tower_idempotency::{IdempotencyStore, Scope};

const USAGE: &str = "usage: keys STORE (inspect|purge|settle) KEY [--principal ID | --stored SCOPE:KEY] \
[--prefix P] [--table T] [--ttl SECONDS] [--status N] [--header 'name: value']... [--body TEXT]";

#[derive(Debug, Default)]
struct Args {
    store: String,
    command: String,
    key: String,
    principal: Option<String>,
    stored: bool,
    prefix: Option<String>,
    table: Option<String>,
    ttl: Duration,
    status: Option<StatusCode>,
    headers: HeaderMap,
    body: Bytes,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        ttl: Duration::from_secs(86_400),
        ..Args::default()
    };
    let mut positional = Vec::new();
    while let Some(arg) = argv.next() {
        let mut value = |name: &str| argv.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--principal" => args.principal = Some(value("--principal")?),
            "--stored" => {
                args.stored = true;
                positional.push(value("--stored")?);
            }
            "--prefix" => args.prefix = Some(value("--prefix")?),
            "--table" => args.table = Some(value("--table")?),
            "--ttl" => {
                let v = value("--ttl")?;
                let secs: u64 = v
                    .parse()
                    .map_err(|_| format!("--ttl {v:?}: not a whole number of seconds"))?;
                if secs == 0 {
                    // A settled answer kept for no time frees a committed key at once, and
                    // a retry would run the operation again.
                    return Err("--ttl 0: a settled answer must be kept at least 1 second \
                                (settling never shortens how long a committed key is kept)"
                        .into());
                }
                args.ttl = Duration::from_secs(secs);
            }
            "--status" => {
                let v = value("--status")?;
                let status = v
                    .parse::<u16>()
                    .ok()
                    .and_then(|n| StatusCode::from_u16(n).ok())
                    .ok_or(format!("--status {v:?}: not an HTTP status"))?;
                args.status = Some(status);
            }
            "--header" => {
                let v = value("--header")?;
                let (name, val) = v
                    .split_once(':')
                    .ok_or(format!("--header {v:?}: expected 'name: value'"))?;
                let name = HeaderName::try_from(name.trim())
                    .map_err(|e| format!("--header {v:?}: {e}"))?;
                let val = HeaderValue::try_from(val.trim())
                    .map_err(|e| format!("--header {v:?}: {e}"))?;
                args.headers.append(name, val);
            }
            "--body" => args.body = Bytes::from(value("--body")?),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other if other.starts_with("--") => return Err(format!("unknown option {other}")),
            _ => positional.push(arg),
        }
    }
    let expected = 3;
    if positional.len() != expected {
        return Err(USAGE.to_owned());
    }
    let mut positional = positional.into_iter();
    args.store = positional.next().unwrap_or_default();
    args.command = positional.next().unwrap_or_default();
    args.key = positional.next().unwrap_or_default();
    if args.stored && args.principal.is_some() {
        return Err("--stored and --principal exclude each other".to_owned());
    }
    Ok(args)
}

/// The key as the store keeps it.
fn store_key(args: &Args) -> Result<StoreKey, String> {
    if args.stored {
        return StoreKey::from_stored(&args.key).ok_or(format!(
            "{:?} is not a stored key (scope:key, scope `anon` or 64 hex digits)",
            args.key
        ));
    }
    let scope = match &args.principal {
        Some(principal) => Scope::of_principal(principal),
        None => Scope::anonymous(),
    };
    Ok(StoreKey::new(&scope, &args.key))
}

async fn open(args: &Args) -> Result<Arc<dyn IdempotencyStore>, String> {
    let url = args.store.trim();
    if url == "memory" {
        return Err(
            "STORE must be a shared store (redis://…, postgres://… or mysql://…): \
                    a memory store lives in its own process"
                .to_owned(),
        );
    }
    // An operator's tool: it changes no schema and sweeps nothing.
    let mut options = OpenOptions::new().migrate(false).sweep(false);
    if let Some(prefix) = &args.prefix {
        options = options.prefix(prefix.clone());
    }
    if let Some(table) = &args.table {
        options = options.table(table.clone());
    }
    tower_idempotency::store::open_with(url, &options)
        .await
        .map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        })
        .and_then(sealed)
}

/// With `IDEMPOTENCY_ENCRYPTION_KEYS` set (feature `encryption`), the store as the sealing
/// layers see it: `inspect` opens records, `settle` seals its answer.
fn sealed(store: Arc<dyn IdempotencyStore>) -> Result<Arc<dyn IdempotencyStore>, String> {
    let keys = std::env::var("IDEMPOTENCY_ENCRYPTION_KEYS")
        .ok()
        .filter(|k| !k.is_empty());
    match keys {
        None => Ok(store),
        #[cfg(feature = "encryption")]
        Some(keys) => {
            let ring = tower_idempotency::store::sealed::Keyring::parse(&keys)
                .map_err(|e| format!("IDEMPOTENCY_ENCRYPTION_KEYS: {e}"))?;
            Ok(Arc::new(tower_idempotency::store::sealed::Sealed::new(
                store, ring,
            )))
        }
        #[cfg(not(feature = "encryption"))]
        Some(_) => Err(
            "IDEMPOTENCY_ENCRYPTION_KEYS needs the tool built with `--features encryption`"
                .to_owned(),
        ),
    }
}

fn describe(state: &KeyState) -> String {
    let mut out = format!("state: {state}\n");
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

async fn run(args: Args) -> Result<String, String> {
    let key = store_key(&args)?;
    let store = open(&args).await?;
    let failed = |e: tower_idempotency::StoreError| format!("the store failed: {e}");
    match args.command.as_str() {
        "inspect" => Ok(format!(
            "key: {key}\n{}",
            describe(&store.inspect(&key).await.map_err(failed)?)
        )),
        "purge" => Ok(if store.purge(&key).await.map_err(failed)? {
            format!("purged {key}: a retry with this key runs the operation again\n")
        } else {
            format!("nothing under {key}\n")
        }),
        "settle" => {
            let status = args.status.ok_or("settle needs --status")?;
            let KeyState::OutcomeUnknown { fingerprint, .. } =
                store.inspect(&key).await.map_err(failed)?
            else {
                return Err(format!(
                    "{key} is not in the outcome-unknown state; nothing was changed (inspect it)"
                ));
            };
            let record =
                Record::new(status, args.headers, args.body, None).with_fingerprint(fingerprint);
            if store.settle(&key, record, args.ttl).await.map_err(failed)? {
                Ok(format!(
                    "settled {key}: retries replay {}\n",
                    status.as_u16()
                ))
            } else {
                Err(format!(
                    "{key} changed meanwhile; nothing was stored (inspect it)"
                ))
            }
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}

/// Runs the tool on `argv` (without the program name): what it prints, or the error.
pub async fn keys(argv: impl IntoIterator<Item = String>) -> Result<String, String> {
    run(parse(argv.into_iter())?).await
}

#[allow(dead_code)]
#[tokio::main]
async fn main() {
    let result = match parse(std::env::args().skip(1)) {
        Ok(args) => run(args).await,
        Err(err) => Err(err),
    };
    match result {
        Ok(out) => print!("{out}"),
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(2);
        }
    }
}
