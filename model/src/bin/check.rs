//! Checks the protocol model at the bounds given on the command line and prints what the
//! checker explored, how long it took, and any counterexample:
//!
//! ```text
//! cargo run -p protocol-model --release --bin check -- [separate|transaction] \
//!     [--requests N] [--faults N] [--crashes N] [--ticks N] [--before-hardening]
//! ```

use std::time::Instant;

use protocol_model::{Commit, ProtocolModel, Rules};
use stateright::{Checker, Model};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut model = ProtocolModel::ci(Commit::Separate);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> u8 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| fail(&format!("{name} takes a number")))
        };
        match arg.as_str() {
            "separate" => model.commit = Commit::Separate,
            "transaction" => model.commit = Commit::InTransaction,
            "--requests" => model.requests = number("--requests").clamp(1, 6),
            "--faults" => model.faults = number("--faults"),
            "--crashes" => model.crashes = number("--crashes"),
            "--ticks" => model.ticks = u64::from(number("--ticks")),
            "--before-hardening" => model.rules = Rules::before_hardening(),
            "-h" | "--help" => {
                println!(
                    "usage: check [separate|transaction] [--requests N] [--faults N] \
                     [--crashes N] [--ticks N] [--before-hardening]"
                );
                return;
            }
            other => fail(&format!("unknown argument {other:?} (try --help)")),
        }
    }
    println!("{model:?}");
    let started = Instant::now();
    let checker = model
        .clone()
        .checker()
        .threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .spawn_bfs()
        .join();
    println!(
        "{} states ({} unique), depth {}, in {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64()
    );
    let mut failed = false;
    for property in model.properties() {
        let found = checker.discovery(property.name);
        let fails = found.is_some() == property.expectation.discovery_is_failure();
        failed |= fails;
        println!(
            "{} {:?} {:?}",
            if fails { "FAIL" } else { "ok  " },
            property.expectation,
            property.name
        );
        if let (true, Some(path)) = (fails, found) {
            for (state, action) in path.into_vec() {
                println!("    {state:?}");
                if let Some(action) = action {
                    println!("  → {action:?}");
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}

fn fail(message: &str) -> ! {
    eprintln!("check: {message}");
    std::process::exit(2);
}
