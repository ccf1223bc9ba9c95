//! The layer inside the frameworks and next to the middleware it is used with (axum, hyper,
//! tonic, tower-http), the examples driven over real connections (the gateway among them),
//! and the client side (tower, tonic, reqwest). One test binary; each file is a module.

#[path = "../common"]
mod common {
    //! The helpers this binary uses, from `tests/common/`.
    #[cfg(feature = "client")]
    mod counting_server;
    // The framework tests call and collect; the counting handlers are for the layer's tests.
    #[allow(dead_code)]
    mod requests;
    #[allow(dead_code)]
    mod tcp;

    #[cfg(feature = "client")]
    pub use counting_server::*;
    pub use requests::*;
    pub use tcp::*;
}

// The examples more than one module drives, or whose name a module already has: loaded once.
#[allow(dead_code, unreachable_pub)]
#[path = "../../tools/gateway/src/gateway.rs"]
mod gateway_example;
#[cfg(feature = "tonic")]
#[allow(unreachable_pub, missing_docs)]
#[path = "../../examples/tonic.rs"]
mod tonic_example;

mod axum;
mod client;
mod client_reqwest;
mod client_tonic;
mod gateway;
mod hyper;
mod openapi;
mod tonic;
mod tower_http;
