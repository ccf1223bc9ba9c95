//! The conformance suite against the store of `examples/custom_store.rs`, as a user would
//! test a backend of their own.
#![cfg(feature = "conformance")]

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/custom_store.rs"]
mod custom_store;

use custom_store::LockedMapStore;

async fn make_store() -> Option<LockedMapStore> {
    Some(LockedMapStore::default())
}

tower_idempotency::store_conformance_tests!(locked_map_store, make_store);
