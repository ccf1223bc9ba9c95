//! The conformance suite against the memory store.
#![cfg(feature = "conformance")]

use tower_idempotency::MemoryStore;

async fn make_store() -> Option<MemoryStore> {
    Some(MemoryStore::new())
}

tower_idempotency::store_conformance_tests!(memory_store, make_store);
