//! Keeps the leases of running operations alive.
//!
//! Instead of a timer or a task per request, one keeper task per layer wakes every third of
//! the lease and extends the claims that have been held that long. Registering a claim is
//! one insert into one of several sharded maps, so short operations, the common case, never
//! touch the store or the timer wheel for their lease.
//!
//! A failed extension is retried at once on its own task, with a jittered backoff (50 ms,
//! doubling up to the period), until it succeeds, the claim is settled, or the store
//! answers that another request took the key over. Fencing is by token, not by clock: a
//! lease that lapsed during a store outage is extended again as soon as the store is back,
//! unless someone took the key over meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::key::StoreKey;
use crate::store::{ErrorChain, IdempotencyStore, LeaseToken, StoreError};

const SHARDS: usize = 16;
const FIRST_RETRY: Duration = Duration::from_millis(50);

/// Registrations are numbered in sequence by the keeper itself (no caller picks them), so
/// their number is its own hash: no SipHash on every first request.
type Ids = std::hash::BuildHasherDefault<IdHasher>;

#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Spread the sequence over every bit: hashbrown takes the bucket from the low bits and
        // its control byte from the top 7, and the ids of one shard share their low bits.
        let h = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }
}

struct Held {
    key: StoreKey,
    token: LeaseToken,
    /// The claim's lease: each renewal extends it this long (at least the keeper's lease,
    /// whose third is the keeper's period).
    lease: Duration,
    renewed: Instant,
    renewing: bool,
    /// The owner is storing its outcome (or withdrawing its claim): a heartbeat that finds
    /// the key no longer in flight raced that call, and is no takeover.
    settling: bool,
}

pub(crate) struct LeaseKeeper {
    shards: [Mutex<HashMap<u64, Held, Ids>>; SHARDS],
    started: Arc<AtomicBool>,
}

impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper").finish_non_exhaustive()
    }
}

/// The shard a registration is kept in: the low bits of its number.
fn shard_of(id: u64) -> usize {
    (id % SHARDS as u64) as usize
}

/// A registration number no other registration in this process has, whose shard is the
/// calling thread's own: each worker thread registers and unregisters its requests' claims
/// in a shard (and under a lock) the other workers seldom touch, and takes numbers from a
/// block it holds ([`crate::numbers`]), so a first
/// request writes no cache line that another worker's first request writes too. A request
/// that moves to another thread still finds its registration by its number.
fn next_id() -> u64 {
    use std::cell::Cell;
    static NEXT_BLOCK: AtomicU64 = AtomicU64::new(0);
    static NEXT_THREAD: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        // The thread's shard, and its block of numbers (next, end).
        static SHARD: u64 = NEXT_THREAD.fetch_add(1, Ordering::Relaxed) % SHARDS as u64;
        static RANGE: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    let next = RANGE.with(|range| crate::numbers::next_from(&NEXT_BLOCK, range));
    // Unique: `next` is, across threads; the shard goes in the low bits.
    next * SHARDS as u64 + SHARD.with(|shard| *shard)
}

/// A claim registered with the keeper, by number: [`LeaseKeeper::unregister`] stops its
/// renewals. (Not a guard holding the keeper: every request would then write the keeper's
/// shared reference count, which threads serving requests side by side contend for.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Registration(u64);

/// What the keeper needs to renew a lease.
#[derive(Clone)]
pub(crate) struct Renewal {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) lease: Duration,
    pub(crate) timeout: Duration,
}

impl LeaseKeeper {
    pub(crate) fn new() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::default())),
            started: Arc::new(AtomicBool::new(false)),
        }
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Held, Ids>> {
        self.shards[shard_of(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn registered(&self, id: u64) -> bool {
        self.shard(id).contains_key(&id)
    }

    /// Keeps `key` claimed with `token` until [`unregister`](Self::unregister) is called.
    /// Keeps the lease of `token` on `key` alive until it is unregistered; `renewal` says
    /// how (asked once, when the keeper's task starts).
    pub(crate) fn register(
        self: &Arc<Self>,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
        renewal: impl FnOnce() -> Renewal,
    ) -> Registration {
        let id = next_id();
        self.shard(id).insert(
            id,
            Held {
                key: key.clone(),
                token,
                lease,
                renewed: Instant::now(),
                renewing: false,
                settling: false,
            },
        );
        // The keeper's task starts with the first registration; later ones only look.
        self.keep_running(renewal);
        Registration(id)
    }

    /// Starts the keeper's task on the current runtime unless it runs. Called with every
    /// registration, and by every request that finds a key in flight: a keeper whose
    /// runtime shut down (a layer used from several runtimes) is started again on a live
    /// one before a claim left without heartbeats can be taken over, since a takeover
    /// needs a request that finds the key in flight first. One atomic load when it runs.
    pub(crate) fn keep_running(self: &Arc<Self>, renewal: impl FnOnce() -> Renewal) {
        if self.started.load(Ordering::Acquire) {
            return;
        }
        let renewal = renewal();
        let period = renewal.lease / 3;
        crate::periodic::ensure_running(&self.started, self, period, move |keeper| {
            keeper.renew_due(&renewal, period);
            std::future::ready(())
        });
    }

    /// Stops renewing a registered claim.
    /// The owner is about to store its outcome (or withdraw its claim): the lease is still
    /// kept alive meanwhile, but a heartbeat refused from now on only raced that call.
    pub(crate) fn settling(&self, registration: Registration) {
        if let Some(held) = self.shard(registration.0).get_mut(&registration.0) {
            held.settling = true;
        }
    }

    pub(crate) fn unregister(&self, registration: Registration) {
        self.shard(registration.0).remove(&registration.0);
    }

    /// Extends every claim last renewed a period ago or more, each on its own task.
    fn renew_due(self: &Arc<Self>, renewal: &Renewal, period: Duration) {
        let now = Instant::now();
        for shard in 0..SHARDS {
            let due: Vec<(u64, StoreKey, LeaseToken, Duration)> = {
                let mut held = self.shard(shard as u64);
                held.iter_mut()
                    .filter(|(_, h)| {
                        !h.renewing && now.duration_since(h.renewed) + period / 10 >= period
                    })
                    .map(|(id, h)| {
                        h.renewing = true;
                        (*id, h.key.clone(), h.token, h.lease)
                    })
                    .collect()
            };
            for (id, key, token, lease) in due {
                let renewal = Renewal {
                    lease,
                    ..renewal.clone()
                };
                tokio::spawn(renew(Arc::downgrade(self), renewal, period, id, key, token));
            }
        }
    }
}

/// Extends one lease, retrying promptly while the claim is held.
async fn renew(
    keeper: Weak<LeaseKeeper>,
    renewal: Renewal,
    period: Duration,
    id: u64,
    key: StoreKey,
    token: LeaseToken,
) {
    // Dropped before it ends (its runtime shut down mid-call), the renewal lets the next
    // keeper renew the claim: otherwise it would stay marked as being renewed for good.
    struct Renewing(Weak<LeaseKeeper>, u64);
    impl Drop for Renewing {
        fn drop(&mut self) {
            if let Some(keeper) = self.0.upgrade()
                && let Some(held) = keeper.shard(self.1).get_mut(&self.1)
            {
                held.renewing = false;
            }
        }
    }
    let _renewing = Renewing(keeper.clone(), id);
    let mut pause = FIRST_RETRY.min(period);
    let mut failures = 0u32;
    loop {
        let timer = crate::metrics::Timer::start();
        let result = crate::store::bounded(
            renewal.timeout,
            renewal.store.extend(&key, token, renewal.lease),
        )
        .await;
        timer.store_call(&*renewal.store, "extend", &result);
        let Some(keeper) = keeper.upgrade() else {
            return;
        };
        match result {
            Ok(()) => {
                if let Some(held) = keeper.shard(id).get_mut(&id) {
                    held.renewed = Instant::now();
                    held.renewing = false;
                }
                if failures > 0 {
                    tracing::info!(
                        key = key.client_key(),
                        failures,
                        "idempotency lease extended again after failures"
                    );
                }
                return;
            }
            Err(StoreError::LeaseLost) => {
                // Settled meanwhile (completed or released), or being settled (the
                // heartbeat raced the owner's completion): nothing to say.
                let removed = keeper.shard(id).remove(&id);
                if removed.as_ref().is_some_and(|held| held.settling) {
                    tracing::debug!(
                        key = key.client_key(),
                        "a heartbeat raced the owner's completion; nothing was taken over"
                    );
                } else if removed.is_some() {
                    tracing::warn!(
                        key = key.client_key(),
                        "idempotency key was taken over by another request after this \
                         one's lease lapsed; the newer request's outcome will be kept"
                    );
                }
                return;
            }
            Err(err) => {
                if !keeper.registered(id) {
                    return;
                }
                failures += 1;
                tracing::warn!(
                    key = key.client_key(),
                    error = %ErrorChain(&err),
                    failures,
                    "extending the idempotency lease failed; retrying"
                );
            }
        }
        drop(keeper);
        tokio::time::sleep(crate::time::jittered(pause)).await;
        pause = (pause * 2).min(period.max(FIRST_RETRY));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registration numbers never repeat, across threads and blocks; each thread keeps to
    /// one shard, and threads are spread over the shards.
    #[test]
    fn registration_numbers_are_unique_and_keep_to_their_threads_shard() {
        let per_thread: Vec<Vec<u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..3000).map(|_| next_id()).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<u64> = per_thread.iter().flatten().copied().collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a registration number repeated");
        let mut shards = std::collections::HashSet::new();
        for ids in &per_thread {
            let shard = shard_of(ids[0]);
            assert!(
                ids.iter().all(|&id| shard_of(id) == shard),
                "a thread changed shard"
            );
            shards.insert(shard);
        }
        // (Other tests' threads take shards too, so only a spread is certain.)
        assert!(
            shards.len() >= 2,
            "eight threads all in one shard: {shards:?}"
        );
    }

    /// A registration is found by its number from any thread: settled and unregistered
    /// from another thread than the one that registered it.
    #[tokio::test]
    async fn a_registration_moved_to_another_thread_is_still_found() {
        let keeper = Arc::new(LeaseKeeper::new());
        let store: Arc<dyn IdempotencyStore> = Arc::new(crate::MemoryStore::new());
        let renewal = || Renewal {
            store: Arc::clone(&store),
            lease: Duration::from_secs(30),
            timeout: Duration::from_secs(1),
        };
        let key = StoreKey::new(&crate::Scope::anonymous(), "moved");
        let reg = keeper.register(&key, LeaseToken::new(), Duration::from_secs(30), renewal);
        assert!(keeper.registered(reg.0));
        let other = Arc::clone(&keeper);
        std::thread::spawn(move || {
            other.settling(reg);
            other.unregister(reg);
        })
        .join()
        .unwrap();
        assert!(!keeper.registered(reg.0));
    }
}
