//! `keys`: the `idempotency-keys` tool, run from the source.
//!
//! The tool lives in `tools/keys` (install it with `cargo install --path tools/keys`); this
//! example runs the very same program, for those who start from a checkout:
//!
//! ```text
//! cargo run --example keys --features redis,postgres,mysql -- --help
//! IDEMPOTENCY_STORE=postgres://postgres@127.0.0.1/test \
//!     cargo run --example keys --features redis,postgres,mysql -- inspect order-1 --principal user:42
//! ```
//!
//! Build it with `--features encryption` too to read sealed records
//! (`IDEMPOTENCY_ENCRYPTION_KEYS`).

#[path = "../tools/keys/src/cli.rs"]
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
