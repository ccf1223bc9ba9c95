//! The layer's behaviour, on the memory store and on fault-injecting wrappers: keys, scopes,
//! fingerprints, replays, failures, faults, events, metrics, durations, trailers, headers,
//! commit points and the memory store's window. One test binary; each file is a module.

#[path = "../common"]
mod common {
    //! The helpers this binary uses, from `tests/common/`.
    mod fault_store;
    mod paused_wire;
    mod requests;
    // Of the shared scenarios, this binary runs only `uncontested_lapse` (on the memory store).
    #[allow(dead_code)]
    mod scenarios;
    mod tcp;

    pub use fault_store::*;
    pub use paused_wire::*;
    pub use requests::*;
    pub use scenarios::*;
    pub use tcp::*;
}

mod body_key;
mod commit_points;
mod durations;
mod events;
mod failure;
mod faults;
mod fingerprint_upgrade;
mod framing;
mod function;
mod headers;
mod layer;
mod lifetime;
mod memory_window;
mod metrics;
mod profiles;
mod read_your_writes;
mod replay_cache;
mod runtimes;
mod secrets;
mod trailers;
