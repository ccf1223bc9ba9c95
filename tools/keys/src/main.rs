//! `idempotency-keys`: inspect, purge, settle, list and vacuum the keys of a shared
//! idempotency store. `idempotency-keys --help` explains every command and option, the
//! environment variables that set them, and the exit status.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
