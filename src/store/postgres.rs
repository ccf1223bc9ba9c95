//! A PostgreSQL store (feature `postgres`).

/// Placeholder.
#[derive(Debug)]
pub struct PostgresStore;
