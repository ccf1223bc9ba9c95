//! Keeps the leases of running operations alive.
//!
//! Instead of a timer or a task per request, one keeper task per layer wakes every third of
//! the lease and extends the claims that have been held that long. Registering a claim is
//! one insert into one of several sharded maps, so short operations, the common case, never
//! touch the store or the timer wheel for their lease.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::key::StoreKey;
use crate::store::{IdempotencyStore, LeaseToken, StoreError};

const SHARDS: usize = 16;

struct Held {
    key: StoreKey,
    token: LeaseToken,
    renewed: Instant,
}

pub(crate) struct LeaseKeeper {
    shards: [Mutex<HashMap<u64, Held>>; SHARDS],
    next_id: AtomicU64,
    started: AtomicBool,
}

impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper").finish_non_exhaustive()
    }
}

/// A claim registered with the keeper; dropping it stops the renewals.
pub(crate) struct Registration {
    keeper: Arc<LeaseKeeper>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.keeper.shard(self.id).remove(&self.id);
    }
}

impl LeaseKeeper {
    pub(crate) fn new() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(0),
            started: AtomicBool::new(false),
        }
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `key` claimed with `token` until the registration is dropped.
    pub(crate) fn register(
        self: &Arc<Self>,
        store: &Arc<dyn IdempotencyStore>,
        lease: Duration,
        key: &StoreKey,
        token: LeaseToken,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.shard(id).insert(
            id,
            Held {
                key: key.clone(),
                token,
                renewed: Instant::now(),
            },
        );
        let store = Arc::clone(store);
        let period = lease / 3;
        crate::periodic::start_once(&self.started, self, period, move |keeper| {
            keeper.renew_due(&store, lease, period);
            std::future::ready(())
        });
        Registration {
            keeper: Arc::clone(self),
            id,
        }
    }

    /// Extends every claim last renewed a period ago or more, each on its own task.
    fn renew_due(
        self: &Arc<Self>,
        store: &Arc<dyn IdempotencyStore>,
        lease: Duration,
        period: Duration,
    ) {
        let now = Instant::now();
        for shard in 0..SHARDS {
            let due: Vec<(u64, StoreKey, LeaseToken)> = {
                let mut held = self.shard(shard as u64);
                held.iter_mut()
                    .filter(|(_, h)| now.duration_since(h.renewed) + period / 10 >= period)
                    .map(|(id, h)| {
                        h.renewed = now;
                        (*id, h.key.clone(), h.token)
                    })
                    .collect()
            };
            for (id, key, token) in due {
                let store = Arc::clone(store);
                let keeper = Arc::downgrade(self);
                tokio::spawn(async move {
                    match store.extend(&key, token, lease).await {
                        Ok(()) => {}
                        Err(StoreError::LeaseLost) => {
                            tracing::warn!(
                                %key,
                                "idempotency lease was lost while the operation ran; its outcome will not be stored"
                            );
                            if let Some(keeper) = keeper.upgrade() {
                                keeper.shard(id).remove(&id);
                            }
                        }
                        Err(err) => tracing::warn!(
                            %key,
                            error = %crate::service::ErrorChain(&err),
                            "extending the idempotency lease failed"
                        ),
                    }
                });
            }
        }
    }
}
