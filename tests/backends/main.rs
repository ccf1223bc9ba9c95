//! The stores: Redis (and Redis Cluster), PostgreSQL, MySQL/MariaDB (the scenarios the two
//! SQL stores share are written once, in `sql_scenarios`) and their failures, exactly once
//! inside the handler's transaction, the keys tool, and the conformance suite on the memory
//! store and the custom-store example. The backend tests need their service's URL
//! (`REDIS_URL`, `DATABASE_URL`, `MYSQL_URL`) and say they were skipped without it. One test
//! binary; each file is a module.

#[cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "nats",
    feature = "amqp"
))]
#[path = "../common"]
mod common {
    //! The helpers this binary uses, from `tests/common/`.
    // Built for fewer than all three backends, some helpers have no test to serve.
    #![cfg_attr(
        not(all(feature = "redis", feature = "postgres", feature = "mysql")),
        allow(dead_code, unused_imports)
    )]
    mod fault_store;
    mod gate;
    // The store tests look at statuses and bodies; the counting handler and the channel-fed
    // body are for the layer's tests.
    #[allow(dead_code)]
    mod requests;
    mod scenarios;
    mod servers;

    pub use fault_store::*;
    pub use gate::*;
    pub use requests::*;
    pub use scenarios::*;
    pub use servers::*;
}

mod amqp_consumer;
mod backend_failures;
mod conformance_custom;
mod conformance_memory;
mod exactly_once;
mod mysql;
mod nats_consumer;
mod open;
mod postgres;
mod redis;
mod redis_cluster;
mod round_trips;
mod sealed;
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod sql_scenarios;
mod store_faults;
mod wakeups;
