//! `idempotency-gateway`: a reverse proxy that puts the idempotency layer in front of any
//! HTTP service. Every setting is a flag and an environment variable (the variables the
//! `gateway` example has always read); `idempotency-gateway --help` lists them all.

use std::process::ExitCode;

use clap::Parser;

// `Settings::from_env` is the example's way in; the binary reads its flags.
#[allow(dead_code)]
mod gateway;

const AFTER_HELP: &str = "\
Flags take 1 or 0 (true/false, yes/no, on/off); a bare flag (--shared-scope) is 1.
RUST_LOG filters the log on stderr (default: info).

Exit status:
  0  stopped on Ctrl-C or SIGTERM, the requests in progress finished and their records stored
  1  the store could not be opened, the address could not be bound, or records were still
     unstored 10 s after the stop
  2  a setting is wrong or incomplete (the message names it), or an unknown flag";

/// Puts the idempotency layer in front of any HTTP service: a POST or PATCH with an
/// Idempotency-Key runs upstream once; a retry gets the first answer replayed.
///
/// Listens for HTTP/1.1 and HTTP/2 with prior knowledge (h2c) and forwards to UPSTREAM_URL
/// over HTTP/1.1. Every option is a flag or the environment variable shown with it; a flag
/// wins.
#[derive(Debug, Parser)]
#[command(name = "idempotency-gateway", version, after_help = AFTER_HELP)]
struct Cli {
    /// Where to listen.
    #[arg(
        long,
        env = "LISTEN_ADDR",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:3002"
    )]
    listen: String,
    /// The service behind, http://host:port[/prefix] (required; a path prefix is kept).
    #[arg(long, env = "UPSTREAM_URL", value_name = "URL")]
    upstream: Option<String>,
    /// The store: memory, redis://…, redis-cluster://host:port[,…], postgres://… or
    /// mysql://… (several gateways share a Redis, PostgreSQL or MySQL store).
    #[arg(
        long,
        env = "IDEMPOTENCY_STORE",
        value_name = "URL",
        default_value = "memory"
    )]
    store: String,
    /// Scope keys by this credential header (e.g. authorization): each value is a caller of
    /// its own. Goes with --scope-secret.
    #[arg(long, env = "IDEMPOTENCY_SCOPE_HEADER", value_name = "HEADER")]
    scope_header: Option<String>,
    /// The HMAC secret that identifies callers by credential, the same on every gateway
    /// sharing a store (prefer the environment variable: flags show in process lists).
    #[arg(
        long,
        env = "IDEMPOTENCY_SCOPE_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    scope_secret: Option<String>,
    /// One scope for every caller: only when one caller, or callers that trust each other,
    /// stand behind the gateway. A caller scope (this or --scope-header) is required.
    #[arg(
        long,
        env = "IDEMPOTENCY_SHARED_SCOPE",
        value_name = "1|0",
        num_args = 0..=1,
        default_missing_value = "1"
    )]
    shared_scope: Option<String>,
    /// Give a request without a key a key of its own (echoed in the response), instead of
    /// refusing it with 400.
    #[arg(
        long,
        env = "IDEMPOTENCY_ASSIGN_KEY",
        value_name = "1|0",
        num_args = 0..=1,
        default_missing_value = "1"
    )]
    assign_key: Option<String>,
    /// How long a running request holds its key before another may take it over, renewed
    /// while it runs [default: 30000].
    #[arg(long, env = "IDEMPOTENCY_LEASE_MS", value_name = "MS")]
    lease_ms: Option<String>,
    /// How long the upstream has to begin its answer, and the longest pause within its body
    /// [default: 30000].
    #[arg(long, env = "UPSTREAM_TIMEOUT_MS", value_name = "MS")]
    upstream_timeout_ms: Option<String>,
    /// How long resolving the upstream's name and connecting to it may take, together;
    /// shorter than --upstream-timeout-ms
    /// [default: 5000, or half the upstream timeout if less].
    #[arg(long, env = "UPSTREAM_CONNECT_TIMEOUT_MS", value_name = "MS")]
    upstream_connect_timeout_ms: Option<String>,
    /// The gateway's clients are proxies it trusts: keep their Forwarded and X-Forwarded-*
    /// headers and append the gateway's hop (otherwise they are replaced).
    #[arg(
        long,
        env = "TRUST_FORWARDED",
        value_name = "1|0",
        num_args = 0..=1,
        default_missing_value = "1"
    )]
    trust_forwarded: Option<String>,
    /// The shape of the gateway's own refusals (400, 409, 422, 503…): RFC 9457 problem
    /// details, Stripe's error object, or the Agentic Commerce Protocol's error.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROBLEM_PROFILE",
        value_name = "rfc9457|stripe|agentic-commerce"
    )]
    problem_profile: Option<String>,
}

impl Cli {
    /// The value of a setting, by its environment variable's name.
    fn var(&self, name: &str) -> Option<String> {
        match name {
            "LISTEN_ADDR" => Some(self.listen.clone()),
            "UPSTREAM_URL" => self.upstream.clone(),
            "IDEMPOTENCY_STORE" => Some(self.store.clone()),
            "IDEMPOTENCY_SCOPE_HEADER" => self.scope_header.clone(),
            "IDEMPOTENCY_SCOPE_SECRET" => self.scope_secret.clone(),
            "IDEMPOTENCY_SHARED_SCOPE" => self.shared_scope.clone(),
            "IDEMPOTENCY_ASSIGN_KEY" => self.assign_key.clone(),
            "IDEMPOTENCY_LEASE_MS" => self.lease_ms.clone(),
            "UPSTREAM_TIMEOUT_MS" => self.upstream_timeout_ms.clone(),
            "UPSTREAM_CONNECT_TIMEOUT_MS" => self.upstream_connect_timeout_ms.clone(),
            "TRUST_FORWARDED" => self.trust_forwarded.clone(),
            "IDEMPOTENCY_PROBLEM_PROFILE" => self.problem_profile.clone(),
            // A setting the gateway reads that has no flag yet: still from the environment.
            other => std::env::var(other).ok(),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { 2 } else { 0 });
        }
    };
    let settings = match gateway::Settings::from_vars(|name| cli.var(name)) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("idempotency-gateway: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("idempotency-gateway: cannot start: {err}");
            return ExitCode::from(1);
        }
    };
    ExitCode::from(runtime.block_on(async {
        gateway::init_tracing();
        gateway::run(settings).await
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
