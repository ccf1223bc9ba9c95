//! `gateway`: the `idempotency-gateway` reverse proxy, run from the source.
//!
//! The gateway lives in `tools/gateway` (install it with `cargo install --path
//! tools/gateway`); this example runs the very same program, configured by the environment
//! alone (`LISTEN_ADDR`, `UPSTREAM_URL`, `IDEMPOTENCY_STORE`, …: see
//! `tools/gateway/src/gateway.rs` or `idempotency-gateway --help`):
//!
//! ```text
//! UPSTREAM_URL=http://127.0.0.1:8080 IDEMPOTENCY_SHARED_SCOPE=1 cargo run --example gateway
//! IDEMPOTENCY_STORE=redis://127.0.0.1:6379 … cargo run --example gateway --features redis
//! ```

use std::process::ExitCode;

#[allow(dead_code, unreachable_pub)]
#[path = "../tools/gateway/src/gateway.rs"]
mod gateway;

#[tokio::main]
async fn main() -> ExitCode {
    gateway::init_tracing();
    match gateway::Settings::from_env() {
        Ok(settings) => ExitCode::from(gateway::run(settings).await),
        Err(err) => {
            eprintln!("gateway: {err}");
            ExitCode::from(2)
        }
    }
}
