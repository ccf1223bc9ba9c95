//! An in-memory store for a single instance.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Claim, IdempotencyStore, LeaseToken, ORPHAN_RETENTION, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::Record;
use crate::time;

/// Bytes counted for an entry besides its key and record: the map slot, the allocations
/// of the record and its header map, and allocator slack, as measured (see BENCHMARKS.md).
const ENTRY_OVERHEAD: usize = 400;

/// An in-memory [`IdempotencyStore`] on a sharded concurrent map (feature `memory`, on by
/// default).
///
/// It suits a single instance: a retry that reaches another instance is not protected; use
/// a shared store for fleets. Claims take one shard lock, so throughput scales with cores.
///
/// Its memory is bounded: when the records it holds pass nine tenths of
/// [`max_bytes`](MemoryStoreBuilder::max_bytes), a background task drops expired entries
/// first, then the oldest completed records, down to three quarters of the cap; a request
/// that would pass the cap itself does the same at once, so the cap always holds. It never
/// drops an in-flight claim. The byte count is an estimate of what the records take,
/// allocations included. A record larger than the whole cap is kept as a tombstone (status and headers).
/// Expired entries are also swept periodically by a task that ends when the last handle to
/// the store is dropped.
///
/// Cloning a `MemoryStore` gives another handle to the same records.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let store = MemoryStore::builder()
///     .max_bytes(16 * 1024 * 1024)
///     .sweep_interval(Duration::from_secs(5))
///     .build();
/// let layer = IdempotencyLayer::new(store);
/// ```
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

/// Builds a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_bytes: usize,
    sweep_interval: Duration,
}

#[derive(Debug)]
struct Inner {
    map: DashMap<String, Entry>,
    bytes: AtomicUsize,
    max_bytes: usize,
    seq: AtomicU64,
    sweep_interval: Duration,
    sweeper_started: Arc<AtomicBool>,
    evicting: Mutex<()>,
    evicting_soon: AtomicBool,
}

#[derive(Debug)]
struct Entry {
    state: State,
    expires_at: Instant,
    size: usize,
    seq: u64,
}

#[derive(Debug)]
enum State {
    InFlight {
        token: LeaseToken,
        fingerprint: Fingerprint,
        waiters: Option<Arc<Notify>>,
        /// A claim found the lease lapsed and gave the owner a grace period to show it is
        /// alive (see [`IdempotencyStore`]'s contract); the next lapse is a takeover.
        contested: bool,
    },
    Completed(Arc<Record>),
}

impl Entry {
    fn wake(&self) {
        if let State::InFlight {
            waiters: Some(n), ..
        } = &self.state
        {
            n.notify_waiters();
        }
    }
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            sweep_interval: Duration::from_secs(10),
        }
    }
}

impl MemoryStoreBuilder {
    /// The most bytes the store's records may take (estimated). Default: 64 MiB.
    ///
    /// ```
    /// let store = tower_idempotency::MemoryStore::builder().max_bytes(1 << 20).build();
    /// ```
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// How often expired entries are swept. Default: 10 seconds.
    ///
    /// ```
    /// use std::time::Duration;
    /// let store = tower_idempotency::MemoryStore::builder()
    ///     .sweep_interval(Duration::from_secs(1))
    ///     .build();
    /// ```
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = super::clamp_duration(interval).max(Duration::from_millis(1));
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                map: DashMap::new(),
                bytes: AtomicUsize::new(0),
                max_bytes: self.max_bytes,
                seq: AtomicU64::new(0),
                sweep_interval: self.sweep_interval,
                sweeper_started: Arc::new(AtomicBool::new(false)),
                evicting: Mutex::new(()),
                evicting_soon: AtomicBool::new(false),
            }),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with the default limits (64 MiB, swept every 10 seconds).
    pub fn new() -> Self {
        MemoryStoreBuilder::default().build()
    }

    /// A builder to set the limits.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// How many entries (claims and records, expired ones not yet swept included) it holds.
    pub fn len(&self) -> usize {
        self.inner.map.len()
    }

    /// Whether it holds no entries.
    pub fn is_empty(&self) -> bool {
        self.inner.map.is_empty()
    }

    /// The estimated bytes its entries take.
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// Removes every expired entry now.
    pub fn sweep(&self) {
        self.inner.sweep(Instant::now());
    }

    fn ensure_sweeper(&self) {
        let interval = self.inner.sweep_interval;
        crate::periodic::ensure_running(
            &self.inner.sweeper_started,
            &self.inner,
            interval,
            |inner| {
                inner.sweep(Instant::now());
                std::future::ready(())
            },
        );
    }

    fn claim_now(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Claim {
        let now = Instant::now();
        let inner = &self.inner;
        let fresh = |inner: &Inner| {
            let size = key.as_str().len() + ENTRY_OVERHEAD;
            inner.bytes.fetch_add(size, Ordering::Relaxed);
            let entry = Entry {
                state: State::InFlight {
                    token,
                    fingerprint: *fingerprint,
                    waiters: None,
                    contested: false,
                },
                expires_at: time::add(now, lease),
                size,
                seq: inner.seq.fetch_add(1, Ordering::Relaxed),
            };
            (token, entry)
        };
        // Replays and duplicates only read: no key copy, no write lock.
        if let Some(entry) = inner.map.get(key.as_str())
            && entry.expires_at > now
        {
            return match &entry.state {
                State::InFlight { fingerprint, .. } => Claim::InFlight {
                    fingerprint: *fingerprint,
                    lease_remaining: Some(entry.expires_at - now),
                },
                State::Completed(record) => Claim::Completed(Arc::clone(record)),
            };
        }
        match inner.map.entry(key.as_str().to_owned()) {
            MapEntry::Occupied(mut occupied) => {
                let entry = occupied.get_mut();
                if entry.expires_at <= now
                    && let State::InFlight {
                        contested: contested @ false,
                        fingerprint,
                        ..
                    } = &mut entry.state
                {
                    // A lapsed lease: the owner gets a grace period to show it is alive
                    // (a store outage, not a crash) before a claim takes the key over.
                    *contested = true;
                    let grace = super::takeover_grace(lease);
                    entry.expires_at = time::add(now, grace);
                    return Claim::InFlight {
                        fingerprint: *fingerprint,
                        lease_remaining: Some(grace),
                    };
                }
                if entry.expires_at <= now {
                    entry.wake();
                    inner.bytes.fetch_sub(entry.size, Ordering::Relaxed);
                    let (token, new) = fresh(inner);
                    *entry = new;
                    return Claim::Acquired(token);
                }
                match &entry.state {
                    State::InFlight { fingerprint, .. } => Claim::InFlight {
                        fingerprint: *fingerprint,
                        lease_remaining: Some(entry.expires_at - now),
                    },
                    State::Completed(record) => Claim::Completed(Arc::clone(record)),
                }
            }
            MapEntry::Vacant(vacant) => {
                let (token, new) = fresh(inner);
                vacant.insert(new);
                Claim::Acquired(token)
            }
        }
    }

    /// Runs `f` on the entry that `token` owns; `LeaseLost` if it owns none. Ownership is
    /// by token alone: a lapsed lease that no claim took over is still owned.
    fn with_owned<T>(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        f: impl FnOnce(&mut Entry) -> T,
    ) -> Result<T, StoreError> {
        let mut entry = self
            .inner
            .map
            .get_mut(key.as_str())
            .ok_or(StoreError::LeaseLost)?;
        match entry.state {
            State::InFlight { token: owner, .. } if owner == token => Ok(f(&mut entry)),
            _ => Err(StoreError::LeaseLost),
        }
    }
}

impl Inner {
    fn sweep(&self, now: Instant) {
        self.map.retain(|_, entry| {
            // A lapsed claim nobody took over stays for its owner a while longer.
            let gone_at = match entry.state {
                State::InFlight { .. } => time::add(entry.expires_at, ORPHAN_RETENTION),
                State::Completed(_) => entry.expires_at,
            };
            if gone_at > now {
                return true;
            }
            entry.wake();
            self.bytes.fetch_sub(entry.size, Ordering::Relaxed);
            false
        });
    }

    /// After a record was added: keeps the store under its cap. Past nine tenths of the
    /// cap, a background task frees memory down to three quarters; past the cap itself, the
    /// caller does it at once, so the cap always holds.
    fn after_insert(self: &Arc<Self>) {
        let bytes = self.bytes.load(Ordering::Relaxed);
        if bytes > self.max_bytes {
            self.evict();
            return;
        }
        if bytes <= self.max_bytes / 10 * 9 || self.evicting_soon.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let inner = Arc::clone(self);
                handle.spawn_blocking(move || {
                    inner.evict();
                    inner.evicting_soon.store(false, Ordering::Release);
                });
            }
            Err(_) => {
                self.evict();
                self.evicting_soon.store(false, Ordering::Release);
            }
        }
    }

    /// Frees memory down to three quarters of the cap: expired entries first, then the
    /// oldest completed records; never an in-flight claim. Two passes over the map, no
    /// copies of keys.
    fn evict(&self) {
        let _one_at_a_time = self.evicting.lock().unwrap_or_else(|p| p.into_inner());
        let target = self.max_bytes / 4 * 3;
        if self.bytes.load(Ordering::Relaxed) <= target {
            return;
        }
        let now = Instant::now();
        self.sweep(now);
        let bytes = self.bytes.load(Ordering::Relaxed);
        if bytes <= target {
            return;
        }
        let mut completed: Vec<(u64, usize)> = self
            .map
            .iter()
            .filter(|e| matches!(e.state, State::Completed(_)))
            .map(|e| (e.seq, e.size))
            .collect();
        completed.sort_unstable_by_key(|&(seq, _)| seq);
        let mut to_free = bytes - target;
        let mut cutoff = None;
        for (seq, size) in completed {
            cutoff = Some(seq);
            if size >= to_free {
                break;
            }
            to_free -= size;
        }
        let Some(cutoff) = cutoff else {
            return;
        };
        self.map.retain(|_, e| {
            let old = matches!(e.state, State::Completed(_)) && e.seq <= cutoff;
            if old {
                self.bytes.fetch_sub(e.size, Ordering::Relaxed);
            }
            !old
        });
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.ensure_sweeper();
        Ok(self.claim_now(key, fingerprint, token, lease))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let overhead = key.as_str().len() + ENTRY_OVERHEAD;
        let record = if record.size() + overhead > self.inner.max_bytes {
            Record::tombstone(record.status(), record.headers().clone())
                .with_fingerprint(*record.fingerprint())
        } else {
            record
        };
        let size = record.size() + overhead;
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let record = Arc::new(record);
        self.with_owned(key, token, |entry| {
            entry.wake();
            self.inner.bytes.fetch_add(size, Ordering::Relaxed);
            self.inner.bytes.fetch_sub(entry.size, Ordering::Relaxed);
            *entry = Entry {
                state: State::Completed(record),
                expires_at: time::deadline_after(ttl),
                size,
                seq,
            };
        })?;
        self.inner.after_insert();
        Ok(())
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let removed = self.inner.map.remove_if(
            key.as_str(),
            |_, e| matches!(e.state, State::InFlight { token: owner, .. } if owner == token),
        );
        match removed {
            Some((_, entry)) => {
                entry.wake();
                self.inner.bytes.fetch_sub(entry.size, Ordering::Relaxed);
                Ok(())
            }
            None => Err(StoreError::LeaseLost),
        }
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.with_owned(key, token, |entry| {
            entry.expires_at = time::deadline_after(lease);
            if let State::InFlight { contested, .. } = &mut entry.state {
                *contested = false;
            }
        })
    }

    /// Waits without polling: completion and release wake the waiters at once.
    async fn wait(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
        timeout: Duration,
    ) -> Result<Claim, StoreError> {
        self.ensure_sweeper();
        let deadline = time::deadline_after(timeout);
        loop {
            // Register interest before looking, so that no wake-up is missed.
            let registered = self.inner.map.get_mut(key.as_str()).and_then(|mut e| {
                let expires_at = e.expires_at;
                match &mut e.state {
                    State::InFlight { waiters, .. } => Some((
                        Arc::clone(waiters.get_or_insert_with(|| Arc::new(Notify::new()))),
                        expires_at,
                    )),
                    State::Completed(_) => None,
                }
            });
            let Some((notify, lease_end)) = registered else {
                let claim = self.claim_now(key, fingerprint, token, lease);
                if matches!(claim, Claim::InFlight { .. }) && Instant::now() < deadline {
                    continue;
                }
                return Ok(claim);
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let claim = self.claim_now(key, fingerprint, token, lease);
            if !matches!(claim, Claim::InFlight { .. }) {
                return Ok(claim);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(claim);
            }
            // Wake at the latest when the owner's lease would end (it may have crashed).
            let wake_at = deadline.min(lease_end.max(now + Duration::from_millis(1)));
            let _ = tokio::time::timeout_at(wake_at, notified).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Scope;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn key(k: &str) -> StoreKey {
        StoreKey::new(&Scope::anonymous(), k)
    }

    fn fp() -> Fingerprint {
        Fingerprint::from_bytes([1; 32])
    }

    fn record(body: usize) -> Record {
        Record::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(vec![b'x'; body]),
            None,
        )
    }

    const LEASE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(3600);

    async fn complete_new(store: &MemoryStore, k: &str, body: usize) {
        let Claim::Acquired(t) = store
            .claim(&key(k), &fp(), LeaseToken::new(), LEASE)
            .await
            .unwrap()
        else {
            panic!("expected to acquire {k}");
        };
        store.complete(&key(k), t, record(body), TTL).await.unwrap();
    }

    #[tokio::test]
    async fn cap_evicts_oldest_completed_but_never_in_flight() {
        let store = MemoryStore::builder().max_bytes(40_000).build();
        // An in-flight claim made first must survive everything.
        let Claim::Acquired(held) = store
            .claim(&key("held"), &fp(), LeaseToken::new(), LEASE)
            .await
            .unwrap()
        else {
            panic!()
        };
        for i in 0..10 {
            complete_new(&store, &format!("k{i}"), 5_000).await;
            assert!(store.bytes() <= 40_000, "cap broken: {}", store.bytes());
        }
        // The oldest completed records went first, the newest stay.
        assert!(matches!(
            store
                .claim(&key("k0"), &fp(), LeaseToken::new(), LEASE)
                .await
                .unwrap(),
            Claim::Acquired(_)
        ));
        assert!(matches!(
            store
                .claim(&key("k9"), &fp(), LeaseToken::new(), LEASE)
                .await
                .unwrap(),
            Claim::Completed(_)
        ));
        assert!(matches!(
            store
                .claim(&key("held"), &fp(), LeaseToken::new(), LEASE)
                .await
                .unwrap(),
            Claim::InFlight { .. }
        ));
        store
            .complete(&key("held"), held, record(1), TTL)
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn cap_evicts_expired_before_live_records() {
        // Room for two records of 5 kB, not three (each counts about 5.6 kB).
        let store = MemoryStore::builder().max_bytes(16_000).build();
        let Claim::Acquired(t) = store
            .claim(&key("old"), &fp(), LeaseToken::new(), LEASE)
            .await
            .unwrap()
        else {
            panic!()
        };
        store
            .complete(&key("old"), t, record(5_000), Duration::from_secs(10))
            .await
            .unwrap();
        complete_new(&store, "live0", 5_000).await;
        tokio::time::advance(Duration::from_secs(11)).await;
        // "old" is expired but not yet swept: it is the one to go, and it is enough.
        complete_new(&store, "live1", 5_000).await;
        assert!(store.bytes() <= 16_000);
        assert_eq!(store.len(), 2);
        for live in ["live0", "live1"] {
            assert!(matches!(
                store
                    .claim(&key(live), &fp(), LeaseToken::new(), LEASE)
                    .await
                    .unwrap(),
                Claim::Completed(_)
            ));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_eviction_starts_before_the_cap() {
        let store = MemoryStore::builder().max_bytes(100_000).build();
        // Fill to just over nine tenths: no request passes the cap, yet memory is freed.
        let mut i = 0;
        while store.bytes() <= 91_000 {
            complete_new(&store, &format!("k{i}"), 1_000).await;
            i += 1;
        }
        for _ in 0..200 {
            if store.bytes() <= 75_000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(store.bytes() <= 75_000, "{} bytes", store.bytes());
        // The newest record survived, the oldest went.
        let newest = format!("k{}", i - 1);
        assert!(matches!(
            store
                .claim(&key(&newest), &fp(), LeaseToken::new(), LEASE)
                .await
                .unwrap(),
            Claim::Completed(_)
        ));
        assert!(matches!(
            store
                .claim(&key("k0"), &fp(), LeaseToken::new(), LEASE)
                .await
                .unwrap(),
            Claim::Acquired(_)
        ));
    }

    #[tokio::test]
    async fn oversized_records_become_tombstones() {
        let store = MemoryStore::builder().max_bytes(1_000).build();
        complete_new(&store, "big", 10_000).await;
        let Claim::Completed(r) = store
            .claim(&key("big"), &fp(), LeaseToken::new(), LEASE)
            .await
            .unwrap()
        else {
            panic!()
        };
        assert!(r.is_tombstone());
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_removes_expired_entries_and_stops_with_the_store() {
        let store = MemoryStore::builder()
            .sweep_interval(Duration::from_secs(1))
            .build();
        let Claim::Acquired(t) = store
            .claim(&key("a"), &fp(), LeaseToken::new(), LEASE)
            .await
            .unwrap()
        else {
            panic!()
        };
        store
            .complete(&key("a"), t, record(10), Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(store.len(), 1);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(store.len(), 0);
        assert_eq!(store.bytes(), 0);
        let weak = Arc::downgrade(&store.inner);
        drop(store);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(weak.upgrade().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_is_woken_by_completion_without_polling() {
        let store = MemoryStore::new();
        let Claim::Acquired(t) = store
            .claim(&key("w"), &fp(), LeaseToken::new(), LEASE)
            .await
            .unwrap()
        else {
            panic!()
        };
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .wait(
                        &key("w"),
                        &fp(),
                        LeaseToken::new(),
                        LEASE,
                        Duration::from_secs(60),
                    )
                    .await
            })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        let started = Instant::now();
        store.complete(&key("w"), t, record(3), TTL).await.unwrap();
        let claim = waiter.await.unwrap().unwrap();
        assert!(matches!(claim, Claim::Completed(_)));
        assert!(Instant::now() - started < Duration::from_millis(5));
    }
}
