//! A Redis store (feature `redis`).

/// Placeholder.
#[derive(Debug)]
pub struct RedisStore;
