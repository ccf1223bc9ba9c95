//! An in-memory store for a single instance.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::machine::{self, Claimed, Moment as _, Refused, Slot};
use super::{Claim, IdempotencyStore, KeyState, LeaseToken, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::Record;
use crate::time;

/// Bytes counted for an entry besides its key and record: the map slot, its place in the
/// eviction queue, the allocations of the record and its header map, and allocator slack,
/// as measured (see BENCHMARKS.md, the memory bench: a record is counted at a little more
/// than the process spends on it; under a million keys churned through the cap, the
/// allocator's slack leaves the process at up to about 1.4× the cap).
const ENTRY_OVERHEAD: usize = 480;

/// The default [`min_retention`](MemoryStoreBuilder::min_retention): five minutes.
pub const DEFAULT_MIN_RETENTION: Duration = Duration::from_secs(5 * 60);

/// The shortest [`min_retention`](MemoryStoreBuilder::min_retention): one second, so that a
/// record is never evicted by the completion that wrote it.
const MIN_MIN_RETENTION: Duration = Duration::from_secs(1);

/// A moment on a store's own clock: nanoseconds from the moment the store was built
/// (negative before it, so that a clock read in another runtime still orders right).
///
/// Eight bytes where an `Instant` takes sixteen: every entry of the map holds up to three
/// (a lease's end, a commit point's, a record's expiry) and every place in the eviction
/// queue two. With the lease token no longer aligned to 16 bytes, an entry of the map is
/// 128 bytes instead of 160 and a place in the queue 40 instead of 56: 56 bytes less of
/// resident memory per record (BENCHMARKS.md), and a fifth less copied each time the map
/// grows. ±292 years around the store's birth, against durations of at most ten years
/// ([`MAX_DURATION`](crate::store::MAX_DURATION)).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Tick(i64);

impl machine::Moment for Tick {
    fn after(self, d: Duration) -> Self {
        let d = super::clamp_duration(d);
        Tick(
            self.0
                .saturating_add(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
        )
    }

    fn until(self, later: Self) -> Duration {
        let nanos = i128::from(later.0) - i128::from(self.0);
        Duration::from_nanos(u64::try_from(nanos.max(0)).unwrap_or(u64::MAX))
    }
}

/// An in-memory [`IdempotencyStore`] on a sharded concurrent map (feature `memory`, on by
/// default).
///
/// It suits a single instance: a retry that reaches another instance is not protected; use
/// a shared store for fleets. Claims take one shard lock, so throughput scales with cores.
///
/// # What it keeps, and for how long
///
/// - A completed record is kept until its TTL ends, unless memory runs short; then the
///   oldest records go first, but **never one younger than
///   [`min_retention`](MemoryStoreBuilder::min_retention)** (default five minutes): that is
///   the replay window every retry can count on.
/// - Its memory is bounded by [`max_bytes`](MemoryStoreBuilder::max_bytes), in-flight
///   claims included. When a new claim does not fit, the store first evicts records older
///   than the window (oldest first; each counted by [`evictions`](MemoryStore::evictions)
///   and logged at `debug`); if that is not enough it **refuses the claim** with
///   [`StoreError::Full`] (the layer answers `503 store-full` with `Retry-After` set to
///   when the oldest record may go, [`room_in`](MemoryStore::room_in), and nothing runs) rather than forget a record inside the window. Refusals are counted by
///   [`refusals`](MemoryStore::refusals).
/// - A completion is never refused, since its operation already ran: the records of
///   operations that were running when the store filled up may take it past the cap, by at
///   most their own size. A replay never does: the headers a replay carries are kept with
///   its record (and counted) only while they fit, and made for each replay past that.
/// - The byte count is what the store holds: a record's body is copied into a buffer of
///   its exact size, so a body sliced from a larger buffer does not pin it.
/// - A record larger than the whole cap is kept as a tombstone (status and headers).
/// - Everything is lost when the process ends.
///
/// The trade-off: under a flood of distinct keys larger than the cap can hold for one
/// window, new keys get `503` until the window frees room, instead of earlier answers being
/// forgotten. Size the cap for your peak rate of new keys times the window times the size of
/// a record (BENCHMARKS.md measures it).
///
/// Expired entries are swept periodically by a task that ends when the last handle to the
/// store is dropped.
///
/// Cloning a `MemoryStore` gives another handle to the same records.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let store = MemoryStore::builder()
///     .max_bytes(16 * 1024 * 1024)
///     .min_retention(Duration::from_secs(120))
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
    min_retention: Duration,
    sweep_interval: Duration,
}

/// A key of the map: its text, with its hash computed once per store call (a keyed
/// SipHash, as `std`'s maps use: clients choose their keys) rather than once per map
/// operation (a first request looks its key up three times).
#[derive(Clone, Debug)]
struct MapKey {
    hash: u64,
    text: Arc<str>,
}

impl std::hash::Hash for MapKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for MapKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.text == other.text
    }
}

impl Eq for MapKey {}

/// The map's hasher: a [`MapKey`] brings its hash, which this hands on as it is.
#[derive(Clone, Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is called (by `MapKey`); this is here because it must be.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Map = DashMap<MapKey, Entry, std::hash::BuildHasherDefault<Prehashed>>;

#[derive(Debug)]
struct Inner {
    map: Map,
    /// When the store was built: where its clock ([`Tick`]) starts.
    epoch: Instant,
    /// The keyed hash of [`MapKey`], random per store.
    hasher: std::hash::RandomState,
    /// What makes a record's replay headers, given by the layer the store serves (see
    /// [`MemoryStore::make_replay_headers_with`]).
    replay_map: std::sync::OnceLock<fn(&Record) -> http::HeaderMap>,
    bytes: AtomicUsize,
    max_bytes: usize,
    min_retention: Duration,
    sweep_interval: Duration,
    sweeper_started: Arc<AtomicBool>,
    /// Background sweeps so far (every [`WALK_EVERY`]th walks the whole map).
    sweeps: AtomicU64,
    /// Completed records in the order they were stored: the eviction order.
    queue: Mutex<VecDeque<Queued>>,
    /// A record was queued that expires before the one queued ahead of it (records stored
    /// with different TTLs): then records can expire, and be evictable, behind one that is
    /// not, where neither the sweeps between walks nor the eviction, which both look at the
    /// front of the queue, reach them.
    disordered: AtomicBool,
    /// A claim was refused while the queue is disordered: the next sweep walks the map
    /// (rather than at its turn, up to [`WALK_EVERY`] sweeps later), so that records expired
    /// behind a longer-lived one give their room back.
    walk_soon: AtomicBool,
    evictions: AtomicU64,
    refusals: AtomicU64,
}

/// A completed record's place in the eviction queue.
#[derive(Debug)]
struct Queued {
    /// The key's text (its hash is computed again when the record is taken off the queue:
    /// eight bytes less per record held).
    key: Arc<str>,
    /// The record's `seq`: a newer entry under the same key is not this record.
    seq: u64,
    /// When the record leaves the window (or expires, if sooner): it may be evicted then.
    evictable_at: Tick,
    /// When the record expires: the queue forgets it then.
    expires_at: Tick,
}

#[derive(Debug)]
struct Entry {
    /// What the key holds, changed only by the [`machine`]'s transitions.
    slot: Slot<Arc<Record>, Tick>,
    /// Tasks waiting for the claim to end ([`IdempotencyStore::wait`]), woken when the
    /// slot stops being held.
    waiters: Option<Arc<Notify>>,
    size: usize,
    seq: u64,
}

impl Entry {
    /// The bytes counted for this entry: its size, and its record's replay headers if the
    /// store made them (see `MemoryStore::claim_now`).
    fn counted(&self) -> usize {
        match &self.slot {
            Slot::Completed { record, .. } => self.size + record.replay_bytes(),
            _ => self.size,
        }
    }

    fn wake(&mut self) {
        if let Some(n) = self.waiters.take() {
            n.notify_waiters();
        }
    }
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            min_retention: DEFAULT_MIN_RETENTION,
            sweep_interval: Duration::from_secs(10),
        }
    }
}

impl MemoryStoreBuilder {
    /// The most bytes the store's claims and records may take. Default: 64 MiB.
    ///
    /// ```
    /// let store = tower_idempotency::MemoryStore::builder().max_bytes(1 << 20).build();
    /// ```
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The replay window: a completed record younger than this is never evicted to make
    /// room (it still ends with its TTL, if that is shorter). When a new claim finds no room
    /// without breaking it, the claim is refused with [`StoreError::Full`]. Default: five
    /// minutes ([`DEFAULT_MIN_RETENTION`]), longer than the retry loop of any client; at
    /// least one second, at most [`MAX_DURATION`](crate::store::MAX_DURATION).
    ///
    /// ```
    /// use std::time::Duration;
    /// let store = tower_idempotency::MemoryStore::builder()
    ///     .min_retention(Duration::from_secs(60))
    ///     .build();
    /// ```
    pub fn min_retention(mut self, window: Duration) -> Self {
        self.min_retention = super::clamp_duration(window).max(MIN_MIN_RETENTION);
        self
    }

    /// How often expired entries are swept. Default: 10 seconds.
    ///
    /// A sweep takes the expired records off the front of the store's eviction queue (work
    /// in proportion to what expired, not to what the store holds); every 30th walks every
    /// entry, for claims their owner never ended and records stored with a TTL shorter than
    /// one stored before them (until then, such an entry is invisible to claims but still
    /// counts against [`max_bytes`](Self::max_bytes)). When records with different TTLs
    /// are stored and the store refuses a claim as full, the next sweep walks every entry,
    /// so that records expired behind a longer-lived one give their room back within one
    /// interval. [`MemoryStore::sweep`] walks every entry at once.
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
                map: Map::default(),
                epoch: Instant::now(),
                hasher: std::hash::RandomState::new(),
                replay_map: std::sync::OnceLock::new(),
                bytes: AtomicUsize::new(0),
                max_bytes: self.max_bytes,
                min_retention: self.min_retention,
                sweep_interval: self.sweep_interval,
                sweeper_started: Arc::new(AtomicBool::new(false)),
                sweeps: AtomicU64::new(0),
                queue: Mutex::new(VecDeque::new()),
                disordered: AtomicBool::new(false),
                walk_soon: AtomicBool::new(false),
                evictions: AtomicU64::new(0),
                refusals: AtomicU64::new(0),
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
    /// A store with the default limits (64 MiB, a five-minute replay window, swept every
    /// 10 seconds).
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

    /// The bytes its entries take, as counted against
    /// [`max_bytes`](MemoryStoreBuilder::max_bytes).
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// How many unexpired records were evicted to make room (each older than the replay
    /// window), since the store was built.
    pub fn evictions(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }

    /// How many claims were refused with [`StoreError::Full`], since the store was built.
    pub fn refusals(&self) -> u64 {
        self.inner.refusals.load(Ordering::Relaxed)
    }

    /// How long until a record may leave the store to make room: until the oldest stored
    /// record leaves the replay window ([`min_retention`](MemoryStoreBuilder::min_retention))
    /// or expires, whichever is sooner. `None` when no record is stored or the oldest may go
    /// now. The layer answers this (at least one second) as the `Retry-After` of
    /// `503 store-full`, so that clients come back when a new key can fit rather than hammer
    /// a store that must refuse them for the rest of its window.
    ///
    /// ```
    /// use tower_idempotency::MemoryStore;
    /// assert_eq!(MemoryStore::new().room_in(), None);
    /// ```
    pub fn room_in(&self) -> Option<Duration> {
        let now = self.inner.now();
        let queue = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        let front = queue.front()?;
        let left = now.until(front.evictable_at);
        (!left.is_zero()).then_some(left)
    }

    /// Removes every expired entry now.
    pub fn sweep(&self) {
        self.inner.sweep(self.inner.now());
    }

    /// One page of [`IdempotencyStore::list`]: the `page_size` smallest keys after
    /// `cursor`, found in one pass over the map (so a walk over `n` keys costs `n²/page`
    /// steps: use a large page for a large store).
    fn list_page(
        &self,
        filter: &super::ListFilter,
        cursor: Option<&super::Cursor>,
    ) -> super::ListPage {
        use std::collections::BTreeMap;
        let size = filter.page_size_or_default();
        let after = cursor.map(super::Cursor::as_str);
        let now = self.inner.now();
        let mut smallest: BTreeMap<Arc<str>, KeyState> = BTreeMap::new();
        for entry in self.inner.map.iter() {
            let key = &entry.key().text;
            if after.is_some_and(|after| &**key <= after) {
                continue;
            }
            if smallest.len() == size
                && smallest
                    .last_key_value()
                    .is_some_and(|(last, _)| key >= last)
            {
                continue;
            }
            let state = handed_out(machine::inspect(&entry.slot, now));
            if matches!(state, KeyState::Free) {
                continue;
            }
            smallest.insert(Arc::clone(key), state);
            if smallest.len() > size {
                smallest.pop_last();
            }
        }
        let scanned = smallest.len() as u64;
        let next = (smallest.len() == size)
            .then(|| {
                smallest
                    .last_key_value()
                    .map(|(k, _)| super::Cursor::new(&**k))
            })
            .flatten();
        let entries = smallest
            .into_iter()
            .filter(|(_, state)| filter.matches(state))
            .map(|(key, state)| super::ListedKey::new(StoreKey::from_shared(key), state))
            .collect();
        super::ListPage::new(entries, scanned, next)
    }

    fn ensure_sweeper(&self) {
        let interval = self.inner.sweep_interval;
        crate::periodic::ensure_running(
            &self.inner.sweeper_started,
            &self.inner,
            interval,
            |inner| {
                inner.sweep_tick(inner.now());
                std::future::ready(())
            },
        );
    }

    /// Makes a record's replay headers with `make` when the store hands the record out for
    /// a replay (once per record), counting them against the cap for as long as the record
    /// lives. Set by the layer this store serves; the first layer's is kept.
    pub(crate) fn make_replay_headers_with(&self, make: fn(&Record) -> http::HeaderMap) {
        let _ = self.inner.replay_map.set(make);
    }

    /// The hash of `key` in this store's map ([`claim_direct`](Self::claim_direct) and
    /// [`complete_owned`](Self::complete_owned) take it, so that a request hashes its key
    /// once for both).
    pub(crate) fn hash_of(&self, key: &StoreKey) -> u64 {
        use std::hash::BuildHasher;
        self.inner.hasher.hash_one(key.as_str())
    }

    /// [`IdempotencyStore::claim`], called directly by the layer; `hash` is
    /// [`hash_of`](Self::hash_of) the key.
    pub(crate) fn claim_direct(
        &self,
        key: &StoreKey,
        hash: u64,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.ensure_sweeper();
        self.claim_now(key, hash, fingerprint, token, lease)
    }

    /// [`IdempotencyStore::complete`], handing the record back (as it would have been
    /// stored) when the token does not own the key, so that the caller need not keep a copy.
    // The record handed back is the point: no copy is kept for the attempt.
    #[allow(clippy::result_large_err)]
    pub(crate) fn complete_owned(
        &self,
        key: &StoreKey,
        hash: u64,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), (StoreError, Record)> {
        let mut completion = self.inner.completion(key, record, ttl);
        let stored = self
            .inner
            .map
            .get_mut(&self.inner.key_hashed(key, hash))
            .and_then(|mut entry| {
                let record = Arc::clone(&completion.record);
                machine::complete(&mut entry.slot, completion.now, token, record, ttl).ok()?;
                completion.account(&self.inner, &mut entry);
                Some(entry.key().clone())
            });
        match stored {
            Some(key) => {
                self.inner.enqueue(key, &completion);
                Ok(())
            }
            None => Err(lease_lost(completion.record)),
        }
    }

    /// [`IdempotencyStore::commit`], called directly by the layer; `hash` is
    /// [`hash_of`](Self::hash_of) the key.
    pub(crate) fn commit_direct(
        &self,
        key: &StoreKey,
        hash: u64,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut entry = self
            .inner
            .map
            .get_mut(&self.inner.key_hashed(key, hash))
            .ok_or(StoreError::LeaseLost)?;
        machine::commit(&mut entry.slot, self.inner.now(), token, ttl)?;
        Ok(())
    }

    fn claim_now(
        &self,
        key: &StoreKey,
        hash: u64,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let inner = &self.inner;
        let now = inner.now();
        let map_key = inner.key_hashed(key, hash);
        // Replays and duplicates only read: no write lock.
        if let Some(entry) = inner.map.get(&map_key)
            && let Some(answer) = machine::peek(&entry.slot, now)
        {
            // A record about to be replayed gets its replay headers here, once, and the
            // store counts them (they live as long as the record); the entry's removal
            // gives them back (`Entry::counted`). They are kept only while they fit under
            // the cap (no room is made here: that would take other entries' locks, and
            // this one is held), so replays never take the store past it; past it, each
            // replay makes them again.
            if let (Claimed::Completed(record), Some(&make)) = (&answer, inner.replay_map.get())
                && record.kept_replay_headers().is_none()
            {
                let headers = make(record);
                let bytes = Record::replay_headers_size(&headers);
                // Another replay of the record may keep its own first: then these go.
                if inner.count_if_room(bytes) && !record.keep_replay_headers(headers, bytes) {
                    inner.bytes.fetch_sub(bytes, Ordering::Relaxed);
                }
            }
            return Ok(answer.into_claim(token));
        }
        // Room for a new claim is reserved before the entry is locked (making room takes
        // other entries' locks), and given back if the key turns out to be taken.
        let size = key.as_str().len() + ENTRY_OVERHEAD;
        if !inner.reserve(size, now) && !inner.reserve_in_place_of_expired(&map_key, size, now) {
            inner.refusals.fetch_add(1, Ordering::Relaxed);
            if inner.disordered.load(Ordering::Relaxed) {
                inner.walk_soon.store(true, Ordering::Relaxed);
            }
            tracing::debug!(
                key = key.client_key(),
                bytes = inner.bytes.load(Ordering::Relaxed),
                max_bytes = inner.max_bytes,
                "memory store full: refused a claim to keep the records inside the replay window"
            );
            return Err(StoreError::Full);
        }
        let mut entry = inner.map.entry(map_key).or_insert_with(|| Entry {
            slot: Slot::Free,
            waiters: None,
            size: 0,
            seq: 0,
        });
        // Counted before the claim replaces what the key held.
        let counted = entry.counted();
        let claimed = machine::claim(&mut entry.slot, now, fingerprint, token, lease);
        if claimed == Claimed::Acquired {
            // Whatever the key held before (an expired record, a claim taken over) is gone.
            entry.wake();
            if counted != 0 {
                inner.bytes.fetch_sub(counted, Ordering::Relaxed);
            }
            entry.size = size;
            entry.seq = next_seq();
        } else {
            inner.bytes.fetch_sub(size, Ordering::Relaxed);
        }
        Ok(claimed.into_claim(token))
    }

    /// Applies `transition` to the slot of `key` and wakes its waiters; forgets the entry
    /// if that left it free. `None` when the store holds nothing under `key`.
    fn transition<T>(
        &self,
        key: &StoreKey,
        transition: impl FnOnce(&mut Slot<Arc<Record>, Tick>) -> T,
    ) -> Option<T> {
        let mut out = None;
        let removed = self
            .inner
            .map
            .remove_if_mut(&self.inner.key(key), |_, entry| {
                let before = entry.counted();
                out = Some(transition(&mut entry.slot));
                // A record the transition took out takes its replay headers with it.
                let after = entry.counted();
                if after < before {
                    self.inner
                        .bytes
                        .fetch_sub(before - after, Ordering::Relaxed);
                }
                entry.wake();
                matches!(entry.slot, Slot::Free)
            });
        if let Some((_, entry)) = removed {
            self.inner
                .bytes
                .fetch_sub(entry.counted(), Ordering::Relaxed);
        }
        out
    }
}

/// A record on its way into an entry (see [`Inner::completion`]).
struct Completion {
    record: Arc<Record>,
    size: usize,
    seq: u64,
    now: Tick,
    /// Set from the slot once the record is in it.
    expires_at: Tick,
}

impl Completion {
    /// Counts the record in `entry`, which now holds it, and wakes the entry's waiters.
    fn account(&mut self, inner: &Inner, entry: &mut Entry) {
        entry.wake();
        // One update of the shared count, not two: every worker thread writes it.
        match self.size.cmp(&entry.size) {
            std::cmp::Ordering::Greater => {
                inner
                    .bytes
                    .fetch_add(self.size - entry.size, Ordering::Relaxed);
            }
            std::cmp::Ordering::Less => {
                inner
                    .bytes
                    .fetch_sub(entry.size - self.size, Ordering::Relaxed);
            }
            std::cmp::Ordering::Equal => {}
        }
        entry.size = self.size;
        entry.seq = self.seq;
        if let Slot::Completed { expires_at, .. } = entry.slot {
            self.expires_at = expires_at;
        }
    }
}

/// A number no other call answers in this process, to tell an entry's record from a
/// newer one under the same key: taken from a block of numbers the calling thread holds
/// (the shared counter is written once per 1,024 numbers, not by every claim and completion
/// of every worker thread). Never 0, which a new entry starts with.
fn next_seq() -> u64 {
    use std::cell::Cell;
    static NEXT_BLOCK: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static RANGE: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    RANGE.with(|range| crate::numbers::next_from(&NEXT_BLOCK, range))
}

/// How many background sweeps in a row remove expired records from the front of the
/// eviction queue alone, before one walks the whole map.
const WALK_EVERY: u64 = 30;

/// How many queued records one lock of the eviction queue hands over to be swept.
const SWEEP_BATCH: usize = 1024;

impl Inner {
    /// Now, on the store's clock.
    fn now(&self) -> Tick {
        self.tick(Instant::now())
    }

    /// `at` on the store's clock.
    #[inline]
    fn tick(&self, at: Instant) -> Tick {
        /// Whole nanoseconds, in 64-bit arithmetic (no `u128`): up to 292 years, which
        /// no process is from its store's birth.
        #[inline]
        fn nanos(d: Duration) -> i64 {
            const MAX_SECS: u64 = i64::MAX as u64 / 1_000_000_000 - 1;
            d.as_secs().min(MAX_SECS) as i64 * 1_000_000_000 + i64::from(d.subsec_nanos())
        }
        match at.checked_duration_since(self.epoch) {
            Some(since) => Tick(nanos(since)),
            None => Tick(-nanos(self.epoch.duration_since(at))),
        }
    }

    /// The instant `tick` stands for (for a timer), as near as this platform's instants
    /// reach.
    fn instant(&self, tick: Tick) -> Instant {
        let nanos = Duration::from_nanos(tick.0.unsigned_abs());
        if tick.0 >= 0 {
            time::add(self.epoch, nanos)
        } else {
            self.epoch.checked_sub(nanos).unwrap_or(self.epoch)
        }
    }

    /// `key` as the map holds it (its text shared, its hash computed).
    fn key(&self, key: &StoreKey) -> MapKey {
        self.key_of(key.shared())
    }

    /// The map's key for `key`, whose hash was computed already (by
    /// [`MemoryStore::hash_of`]).
    fn key_hashed(&self, key: &StoreKey, hash: u64) -> MapKey {
        debug_assert_eq!(hash, self.key(key).hash, "a hash of another store");
        MapKey {
            hash,
            text: Arc::clone(key.shared()),
        }
    }

    /// The map's key for `text`.
    fn key_of(&self, text: &Arc<str>) -> MapKey {
        use std::hash::BuildHasher;
        MapKey {
            hash: self.hasher.hash_one(&**text),
            text: Arc::clone(text),
        }
    }

    /// One background sweep. Most take the expired records off the front of the eviction
    /// queue, which is in order of completion, so in order of expiry for records stored with
    /// one TTL: work in proportion to what expired, with one shard locked at a time for one
    /// removal, however many records the store holds. Every [`WALK_EVERY`]th walks the whole
    /// map (a shard locked at a time) for what the queue does not order: claims whose owner
    /// never came back, and records stored with a TTL shorter than one stored before them.
    fn sweep_tick(&self, now: Tick) {
        let tick = self.sweeps.fetch_add(1, Ordering::Relaxed);
        if tick % WALK_EVERY == WALK_EVERY - 1 || self.walk_soon.swap(false, Ordering::Relaxed) {
            self.sweep(now);
        } else {
            self.sweep_queue(now);
        }
    }

    /// Removes the expired records at the front of the eviction queue; answers how many.
    fn sweep_queue(&self, now: Tick) -> u64 {
        let mut removed = 0;
        let mut batch = Vec::new();
        loop {
            {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                while batch.len() < SWEEP_BATCH
                    && queue.front().is_some_and(|q| q.expires_at <= now)
                {
                    batch.extend(queue.pop_front());
                }
            }
            if batch.is_empty() {
                break;
            }
            for q in batch.drain(..) {
                // The record queued, if the key still holds it (not replaced since) and it has
                // expired.
                let gone = self.map.remove_if(&self.key_of(&q.key), |_, e| {
                    e.seq == q.seq && e.slot.gone_at().is_some_and(|at| at <= now)
                });
                if let Some((_, mut entry)) = gone {
                    entry.wake();
                    self.bytes.fetch_sub(entry.counted(), Ordering::Relaxed);
                    removed += 1;
                }
            }
        }
        crate::metrics::memory_size(self.bytes.load(Ordering::Relaxed), self.map.len());
        removed
    }

    /// Removes every expired entry; answers how many.
    fn sweep(&self, now: Tick) -> u64 {
        let mut removed = 0;
        let mut completed = 0;
        self.map.retain(|_, entry| {
            // A lapsed claim nobody took over stays for its owner a while longer.
            if entry.slot.gone_at().is_some_and(|at| at > now) {
                completed += usize::from(matches!(entry.slot, Slot::Completed { .. }));
                return true;
            }
            removed += 1;
            entry.wake();
            self.bytes.fetch_sub(entry.counted(), Ordering::Relaxed);
            false
        });
        // The queue forgets expired records (gone from the map now) from its front; and,
        // when records expired behind longer-lived ones have left it holding more places
        // than records (by half), from everywhere: a walk through the queue, once per as
        // many places as it frees.
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while queue.front().is_some_and(|q| q.expires_at <= now) {
            queue.pop_front();
        }
        if queue.len() > completed + completed / 2 + SWEEP_BATCH {
            queue.retain(|q| q.expires_at > now);
        }
        drop(queue);
        crate::metrics::memory_size(self.bytes.load(Ordering::Relaxed), self.map.len());
        removed
    }

    /// [`reserve`](Self::reserve) for a claim of `key` that found no room: if the key's own
    /// entry has expired (a record past its TTL, a claim past its lease and contest), it is
    /// removed first, as a sweep would, and its room is the claim's. (A full store otherwise
    /// refused the claim that would replace the key's own expired record.)
    fn reserve_in_place_of_expired(&self, key: &MapKey, size: usize, now: Tick) -> bool {
        let gone = self.map.remove_if(key, |_, entry| {
            entry.slot.gone_at().is_some_and(|at| at <= now)
        });
        let Some((_, mut entry)) = gone else {
            return false;
        };
        entry.wake();
        self.bytes.fetch_sub(entry.counted(), Ordering::Relaxed);
        self.reserve(size, now)
    }

    /// Counts `size` more bytes if they fit under the cap as it stands (nothing evicted).
    fn count_if_room(&self, size: usize) -> bool {
        let mut current = self.bytes.load(Ordering::Relaxed);
        while current.saturating_add(size) <= self.max_bytes {
            match self.bytes.compare_exchange_weak(
                current,
                current + size,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
        false
    }

    /// Counts `size` more bytes if they fit under the cap, making room first by evicting
    /// records older than the window (oldest first). False when they do not fit.
    fn reserve(&self, size: usize, now: Tick) -> bool {
        while !self.count_if_room(size) {
            if !self.evict_one(now) {
                return false;
            }
        }
        true
    }

    /// Evicts the oldest record if it is past the window (or expired); false when the
    /// oldest is still inside it, or there is none.
    fn evict_one(&self, now: Tick) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(front) = queue.front() {
            if front.evictable_at > now {
                return false;
            }
            let Some(q) = queue.pop_front() else {
                return false;
            };
            let removed = self.map.remove_if(&self.key_of(&q.key), |_, e| {
                e.seq == q.seq && matches!(e.slot, Slot::Completed { .. })
            });
            if let Some((key, entry)) = removed {
                self.bytes.fetch_sub(entry.counted(), Ordering::Relaxed);
                if entry.slot.gone_at().is_some_and(|at| at > now) {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::memory_eviction();
                    tracing::debug!(
                        key = key.text.split_once(':').map_or(&*key.text, |(_, k)| k),
                        "memory store full: evicted a record older than the replay window"
                    );
                }
                return true;
            }
            // Already gone (expired and swept, or replaced): look at the next one.
        }
        false
    }

    /// A record about to be stored under `key`: a tombstone if it could never fit, its body
    /// copied to a buffer of its own, and its place in time.
    fn completion(&self, key: &StoreKey, mut record: Record, ttl: Duration) -> Completion {
        let overhead = key.as_str().len() + ENTRY_OVERHEAD;
        // Sized once (a walk of the headers); again only for a tombstone made instead.
        let mut size = record.size();
        if size + overhead > self.max_bytes {
            record = too_large(&record);
            size = record.size();
        }
        // In place: every copy of the record is a copy in this frame.
        record.own_body();
        let record = Arc::new(record);
        let now = self.now();
        Completion {
            size: size + overhead,
            record,
            seq: next_seq(),
            now,
            expires_at: now.after(ttl),
        }
    }

    /// Puts a stored record in the eviction queue, then evicts what the cap asks for.
    fn enqueue(&self, key: MapKey, completion: &Completion) {
        let window_end = completion.now.after(self.min_retention);
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue
            .back()
            .is_some_and(|back| back.expires_at > completion.expires_at)
            && !self.disordered.load(Ordering::Relaxed)
        {
            self.disordered.store(true, Ordering::Relaxed);
        }
        queue.push_back(Queued {
            key: key.text,
            seq: completion.seq,
            evictable_at: window_end.min(completion.expires_at),
            expires_at: completion.expires_at,
        });
        drop(queue);
        self.after_complete(completion.now);
    }

    /// After a completion: if the store is past its cap, evicts what is past the window
    /// until it is under again (never the record just written, nor any inside the window).
    fn after_complete(&self, now: Tick) {
        while self.bytes.load(Ordering::Relaxed) > self.max_bytes {
            if !self.evict_one(now) {
                return;
            }
        }
    }
}

/// A key's state as `inspect` and `list` hand it out: a stored record is a copy, not the
/// store's own. An operator's tool that asks a record for its headers as a map
/// ([`Record::headers`], made and kept with the record when first asked) then keeps that
/// map in its copy, not in memory the store holds without counting it.
fn handed_out(state: KeyState) -> KeyState {
    match state {
        KeyState::Completed { record, expires_in } => KeyState::Completed {
            record: Arc::new(Record::clone(&record)),
            expires_in,
        },
        other => other,
    }
}

/// The tombstone stored instead of a record that could never fit under the cap.
#[cold]
#[inline(never)]
fn too_large(record: &Record) -> Record {
    Record::tombstone_of(record.status(), record.fields().clone())
        .with_fingerprint(*record.fingerprint())
}

/// A completion whose token no longer owns its key: the record handed back, as it would
/// have been stored. Out of line, as the record's copy it makes.
#[cold]
#[inline(never)]
fn lease_lost(record: Arc<Record>) -> (StoreError, Record) {
    let record = Arc::try_unwrap(record).unwrap_or_else(|r| (*r).clone());
    (StoreError::LeaseLost, record)
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
        self.claim_direct(key, self.hash_of(key), fingerprint, token, lease)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.complete_owned(key, self.hash_of(key), token, record, ttl)
            .map_err(|(err, _)| err)
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let now = self.inner.now();
        self.transition(key, |slot| machine::release(slot, now, token))
            .unwrap_or(Err(Refused::LeaseLost))?;
        Ok(())
    }

    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        self.transition(key, |slot| machine::revoke(slot, token))
            .unwrap_or(Err(Refused::LeaseLost))?;
        Ok(())
    }

    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.commit_direct(key, self.hash_of(key), token, ttl)
    }

    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut completion = self.inner.completion(key, record, ttl);
        let Some(mut entry) = self.inner.map.get_mut(&self.inner.key(key)) else {
            return Ok(false);
        };
        let record = Arc::clone(&completion.record);
        if machine::settle(&mut entry.slot, completion.now, record, ttl).is_err() {
            return Ok(false);
        }
        completion.account(&self.inner, &mut entry);
        let key = entry.key().clone();
        drop(entry);
        self.inner.enqueue(key, &completion);
        Ok(true)
    }

    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        Ok(match self.inner.map.get(&self.inner.key(key)) {
            Some(entry) => handed_out(machine::inspect(&entry.slot, self.inner.now())),
            None => KeyState::Free,
        })
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let now = self.inner.now();
        Ok(self
            .transition(key, |slot| machine::purge(slot, now))
            .unwrap_or(false))
    }

    /// Answers every matching key in pages of [`ListFilter::page_size`](super::ListFilter::page_size), in key order;
    /// each page is one pass over the map.
    async fn list(
        &self,
        filter: &super::ListFilter,
        cursor: Option<&super::Cursor>,
    ) -> Result<super::ListPage, StoreError> {
        Ok(self.list_page(filter, cursor))
    }

    /// Removes every expired entry in one step, whatever `batch` (the map is locked a
    /// shard at a time, as the background sweep does).
    async fn vacuum(
        &self,
        _cursor: Option<&super::Cursor>,
        _batch: usize,
    ) -> Result<super::VacuumPage, StoreError> {
        let scanned = self.inner.map.len() as u64;
        let removed = self.inner.sweep(self.inner.now());
        Ok(super::VacuumPage::new(removed, scanned, None))
    }

    fn backend_name(&self) -> &'static str {
        "memory"
    }

    fn as_memory_store(&self) -> Option<&MemoryStore> {
        Some(self)
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let mut entry = self
            .inner
            .map
            .get_mut(&self.inner.key(key))
            .ok_or(StoreError::LeaseLost)?;
        machine::extend(&mut entry.slot, self.inner.now(), token, lease)?;
        Ok(())
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
        let hash = self.hash_of(key);
        let map_key = self.inner.key_hashed(key, hash);
        loop {
            // Register interest before looking, so that no wake-up is missed.
            let registered = self.inner.map.get_mut(&map_key).and_then(|mut e| {
                let Slot::Held(held) = &e.slot else {
                    return None;
                };
                let lease_end = self.inner.instant(held.lease_until);
                let notify = e.waiters.get_or_insert_with(|| Arc::new(Notify::new()));
                Some((Arc::clone(notify), lease_end))
            });
            let Some((notify, lease_end)) = registered else {
                let claim = self.claim_now(key, hash, fingerprint, token, lease)?;
                if matches!(claim, Claim::InFlight { .. }) && Instant::now() < deadline {
                    continue;
                }
                return Ok(claim);
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let claim = self.claim_now(key, hash, fingerprint, token, lease)?;
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

    #[tokio::test(start_paused = true)]
    async fn cap_evicts_oldest_past_the_window_but_never_in_flight() {
        let store = MemoryStore::builder()
            .max_bytes(40_000)
            .min_retention(Duration::from_secs(1))
            .build();
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
            tokio::time::advance(Duration::from_secs(2)).await;
        }
        assert!(store.evictions() > 0);
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
    async fn a_full_window_refuses_new_claims() {
        let store = MemoryStore::builder()
            .max_bytes(40_000)
            .min_retention(Duration::from_secs(60))
            .build();
        let mut stored = 0;
        while store
            .claim(&key(&format!("k{stored}")), &fp(), LeaseToken::new(), LEASE)
            .await
            .is_ok_and(|c| matches!(c, Claim::Acquired(_)))
        {
            stored += 1;
            if stored > 1000 {
                break;
            }
        }
        assert!(stored < 1000, "claims are not bounded");
        assert!(matches!(
            store
                .claim(&key("one-more"), &fp(), LeaseToken::new(), LEASE)
                .await,
            Err(StoreError::Full)
        ));
        assert_eq!(store.refusals(), 2);
        assert_eq!(store.evictions(), 0);
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

    /// Stores a record under `k` for `ttl`.
    async fn stored(store: &MemoryStore, k: &str, ttl: Duration) {
        let Claim::Acquired(t) = store
            .claim(&key(k), &fp(), LeaseToken::new(), LEASE)
            .await
            .unwrap()
        else {
            panic!("{k} is taken")
        };
        store.complete(&key(k), t, record(10), ttl).await.unwrap();
    }

    /// A background sweep between walks removes what expired from the front of the queue
    /// (and never a live record, nor a record stored again under the same key since).
    #[tokio::test(start_paused = true)]
    async fn sweeps_between_walks_take_expired_records_off_the_queue() {
        let store = MemoryStore::builder()
            .sweep_interval(Duration::from_secs(1))
            .build();
        stored(&store, "a", Duration::from_millis(1500)).await;
        stored(&store, "b", Duration::from_millis(1500)).await;
        // Expires after "a" and "b", so it stays.
        stored(&store, "c", Duration::from_secs(3600)).await;
        // "b" stored again after it expired: its queued entry is no longer the key's.
        tokio::time::sleep(Duration::from_millis(1600)).await;
        stored(&store, "b", Duration::from_secs(3600)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(store.inner.sweeps.load(Ordering::Relaxed), 3);
        assert_eq!(store.len(), 2, "only \"a\" went");
        for k in ["b", "c"] {
            let claim = store
                .claim(&key(k), &fp(), LeaseToken::new(), LEASE)
                .await
                .unwrap();
            assert!(matches!(claim, Claim::Completed(_)), "{k} is kept");
        }
        let expected = store.inner.map.iter().map(|e| e.counted()).sum::<usize>();
        assert_eq!(store.bytes(), expected);
    }

    /// What the queue does not order is swept by the walk every [`WALK_EVERY`]th sweep: a
    /// record stored with a TTL shorter than the one before it, and a claim its owner never
    /// ended (once past its retention).
    #[tokio::test(start_paused = true)]
    async fn the_periodic_walk_sweeps_lapsed_claims_and_records_out_of_ttl_order() {
        let store = MemoryStore::builder()
            .sweep_interval(Duration::from_secs(1))
            .build();
        stored(&store, "long", Duration::from_secs(3 * 3600)).await;
        stored(&store, "short", Duration::from_secs(2)).await;
        let Claim::Acquired(_abandoned) = store
            .claim(
                &key("orphan"),
                &fp(),
                LeaseToken::new(),
                Duration::from_secs(1),
            )
            .await
            .unwrap()
        else {
            panic!()
        };
        // Past the orphan's retention and the short record's TTL, but before the walk.
        let walk = Duration::from_secs(WALK_EVERY);
        tokio::time::sleep(walk - Duration::from_millis(1500)).await;
        assert_eq!(
            store.len(),
            3,
            "behind a longer-lived record, out of the queue's reach"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(store.len(), 2, "the walk removed the short-lived record");
        // The orphan is kept for its owner for an hour past its lease, then walked away.
        tokio::time::sleep(super::super::ORPHAN_RETENTION + walk).await;
        assert_eq!(store.len(), 1, "a walk removed the orphan");
        let claim = store
            .claim(&key("long"), &fp(), LeaseToken::new(), LEASE)
            .await
            .unwrap();
        assert!(matches!(claim, Claim::Completed(_)));
        assert_eq!(
            store.bytes(),
            store.inner.map.iter().map(|e| e.counted()).sum::<usize>()
        );
    }

    /// Two keys whose hashes collide are still two entries: a key is its text, the hash
    /// only where to look (else a collision would answer one caller with another's record).
    #[test]
    fn keys_with_colliding_hashes_stay_apart() {
        let map = Map::default();
        let entry = |seq| Entry {
            slot: Slot::Free,
            waiters: None,
            size: 0,
            seq,
        };
        let a = MapKey {
            hash: 7,
            text: Arc::from("anon:a"),
        };
        let b = MapKey {
            hash: 7,
            text: Arc::from("anon:b"),
        };
        map.insert(a.clone(), entry(1));
        map.insert(b.clone(), entry(2));
        assert_eq!(map.len(), 2);
        assert_eq!(map.get(&a).map(|e| e.seq), Some(1));
        assert_eq!(map.get(&b).map(|e| e.seq), Some(2));
        // The same text with its real hash is the same key, found wherever it is stored.
        let store = MemoryStore::new();
        assert_eq!(store.inner.key(&key("k")), store.inner.key(&key("k")));
        assert_ne!(store.inner.key(&key("k")), store.inner.key(&key("l")));
    }

    /// Numbers told apart by equality must never repeat, whatever thread takes them and
    /// however many blocks they span.
    #[test]
    fn seq_numbers_never_repeat_across_threads() {
        let taken: Vec<Vec<u64>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..3000).map(|_| next_seq()).collect::<Vec<_>>()))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let mut all: Vec<u64> = taken.into_iter().flatten().collect();
        assert!(!all.contains(&0));
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    /// A replay makes its record's replay headers once; the store counts them as long as
    /// the record lives, and gives them back however the record goes (purged, replaced by
    /// a new claim once expired, swept).
    #[tokio::test(start_paused = true)]
    async fn replay_headers_are_counted_once_and_given_back() {
        let store = MemoryStore::new();
        // What the layer sets when it is built on the store.
        store.make_replay_headers_with(crate::answer::replay_map);
        let counted =
            |store: &MemoryStore| store.inner.map.iter().map(|e| e.counted()).sum::<usize>();
        let replay = |store: MemoryStore, k: &'static str| async move {
            let claim = store
                .claim(&key(k), &fp(), LeaseToken::new(), LEASE)
                .await
                .unwrap();
            assert!(matches!(claim, Claim::Completed(_)), "{k} replays");
        };
        stored(&store, "p", TTL).await;
        let before = store.bytes();
        replay(store.clone(), "p").await;
        let after = store.bytes();
        assert!(after > before, "the replay headers are counted");
        replay(store.clone(), "p").await;
        assert_eq!(store.bytes(), after, "and only once");
        assert_eq!(store.bytes(), counted(&store));
        assert!(store.purge(&key("p")).await.unwrap());
        assert_eq!(store.bytes(), 0, "purged with its replay headers");

        // Replaced by a new claim once expired.
        stored(&store, "e", Duration::from_secs(2)).await;
        replay(store.clone(), "e").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let Claim::Acquired(_) = store
            .claim(&key("e"), &fp(), LeaseToken::new(), LEASE)
            .await
            .unwrap()
        else {
            panic!("the expired key is claimed anew")
        };
        assert_eq!(store.bytes(), counted(&store));
        assert_eq!(store.bytes(), key("e").as_str().len() + ENTRY_OVERHEAD);
        assert!(store.purge(&key("e")).await.unwrap());

        // Swept once expired.
        stored(&store, "s", Duration::from_secs(2)).await;
        replay(store.clone(), "s").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        store.sweep();
        assert_eq!(store.len(), 0);
        assert_eq!(store.bytes(), 0, "swept with its replay headers");
    }

    /// What a store holds per key: the map's entry and its place in the eviction queue.
    /// Each time in them is eight bytes (the store's own clock) and the lease token is not
    /// aligned to sixteen: an entry of the map was 160 bytes with `Instant`s and a `u128`
    /// token, 128 now, and a place in the queue 56 bytes, 40 now. A record takes 56 bytes
    /// less of resident memory (BENCHMARKS.md), and every growth of the map copies a fifth
    /// less.
    #[test]
    fn a_keys_entry_and_its_place_in_the_queue_stay_small() {
        assert!(
            std::mem::size_of::<(MapKey, Entry)>() <= 128,
            "a map entry is {} bytes",
            std::mem::size_of::<(MapKey, Entry)>()
        );
        assert!(
            std::mem::size_of::<Queued>() <= 40,
            "a queued record is {} bytes",
            std::mem::size_of::<Queued>()
        );
    }

    /// The store's clock orders instants as they are, before its birth too (a store built
    /// in one runtime and called from another whose clock reads earlier), saturates far
    /// ahead instead of wrapping, and hands a timer back the instant it stands for.
    #[test]
    fn the_stores_clock_keeps_order_and_saturates() {
        let store = MemoryStore::new();
        let inner = &store.inner;
        let epoch = inner.epoch;
        let later = epoch + Duration::from_millis(1500);
        assert_eq!(inner.tick(epoch), Tick(0));
        assert_eq!(inner.tick(later), Tick(1_500_000_000));
        assert_eq!(inner.instant(inner.tick(later)), later);
        if let Some(earlier) = epoch.checked_sub(Duration::from_millis(20)) {
            let t = inner.tick(earlier);
            assert_eq!(t, Tick(-20_000_000));
            assert!(t < inner.tick(epoch));
            assert_eq!(t.until(inner.tick(later)), Duration::from_millis(1520));
            assert_eq!(inner.instant(t), earlier);
        }
        // Not later: zero, never a wrapped duration.
        assert_eq!(inner.tick(later).until(inner.tick(epoch)), Duration::ZERO);
        // Far ahead: a TTL is clamped to the longest the crate keeps anything, and the
        // clock's end saturates.
        let ttl = Tick(0).after(Duration::MAX);
        assert_eq!(Tick(0).until(ttl), crate::store::MAX_DURATION);
        assert_eq!(
            Tick(i64::MAX - 1).after(Duration::from_secs(60)),
            Tick(i64::MAX)
        );
        assert_eq!(
            Tick(i64::MIN).until(Tick(i64::MAX)),
            Duration::from_nanos(u64::MAX)
        );
    }

    /// A record the store holds is never the one `inspect` or `list` hands out: asking
    /// that one for its headers as a map (made and kept with the record) leaves the
    /// store's memory, and its count, as they were.
    #[tokio::test]
    async fn inspected_records_are_copies_and_leave_the_count_exact() {
        let store = MemoryStore::new();
        complete_new(&store, "k", 10).await;
        let before = store.bytes();
        let held = {
            let entry = store.inner.map.get(&store.inner.key(&key("k"))).unwrap();
            let Slot::Completed { record, .. } = &entry.slot else {
                panic!("stored")
            };
            Arc::clone(record)
        };
        let KeyState::Completed { record, .. } = store.inspect(&key("k")).await.unwrap() else {
            panic!("completed")
        };
        assert!(!Arc::ptr_eq(&record, &held), "inspect hands out a copy");
        assert_eq!(*record, *held);
        assert!(record.headers().is_empty());
        let page = store
            .list(&crate::store::ListFilter::default(), None)
            .await
            .unwrap();
        let listed = page.entries.first().expect("listed");
        let KeyState::Completed { record, .. } = &listed.state else {
            panic!("completed")
        };
        assert!(!Arc::ptr_eq(record, &held), "list hands out a copy");
        assert_eq!(store.bytes(), before);
    }

    /// Whether a claim of `k` finds its record.
    async fn replays(store: &MemoryStore, k: &str) -> bool {
        matches!(
            store
                .claim(&key(k), &fp(), LeaseToken::new(), LEASE)
                .await
                .unwrap(),
            Claim::Completed(_)
        )
    }

    /// Stores `answer()` for `ttl` under new keys until the store refuses a claim as full;
    /// answers the keys stored.
    async fn fill(store: &MemoryStore, answer: impl Fn() -> Record, ttl: Duration) -> Vec<String> {
        let mut keys = Vec::new();
        loop {
            let k = format!("fill-{}", keys.len());
            match store.claim(&key(&k), &fp(), LeaseToken::new(), LEASE).await {
                Ok(Claim::Acquired(t)) => {
                    store.complete(&key(&k), t, answer(), ttl).await.unwrap();
                    keys.push(k);
                }
                Err(StoreError::Full) => return keys,
                other => panic!("{k}: {other:?}"),
            }
        }
    }

    /// Records stored with different TTLs (a day for payments, an hour for the rest, as
    /// `ttl_by` allows): the eviction queue keeps no place for a record the store no longer
    /// holds once a walk has removed it, however long the record ahead of it lives. (Before,
    /// places behind a long-lived record stayed until it expired: one per completion of the
    /// day, none of it counted against the cap.)
    #[tokio::test(start_paused = true)]
    async fn the_eviction_queue_keeps_no_place_for_records_swept_behind_a_longer_lived_one() {
        let store = MemoryStore::builder()
            .sweep_interval(Duration::from_secs(1))
            .build();
        stored(&store, "payment", Duration::from_secs(24 * 3600)).await;
        for i in 0..5_000 {
            stored(&store, &format!("short-{i}"), Duration::from_secs(1)).await;
        }
        // Past their TTL and past a walk.
        tokio::time::sleep(Duration::from_secs(WALK_EVERY + 2)).await;
        assert_eq!(store.len(), 1, "the walk removed the expired records");
        let queued = store.inner.queue.lock().unwrap().len();
        assert!(queued <= 1, "{queued} places queued for 1 record held");
        // What the queue still holds is what the store holds: the long-lived record stays
        // evictable once it leaves the window.
        assert!(replays(&store, "payment").await);
    }

    /// A full store refuses a new claim to keep the records inside the replay window, not
    /// records already expired: when shorter-lived records expire behind a longer-lived
    /// one still inside the window, the claims refused meanwhile get room at the next
    /// sweep, not only at the next walk (thirty sweeps later). The longer-lived record
    /// stays.
    #[tokio::test(start_paused = true)]
    async fn records_expired_behind_one_inside_the_window_make_room_at_the_next_sweep() {
        let store = MemoryStore::builder()
            .max_bytes(10_000)
            .min_retention(Duration::from_secs(300))
            .sweep_interval(Duration::from_secs(1))
            .build();
        stored(&store, "long", Duration::from_secs(3600)).await;
        let short = fill(&store, || record(10), Duration::from_secs(1)).await;
        assert!(short.len() > 2, "{} records filled the store", short.len());
        // Every short record expires; the long one stays inside its window. A few sweeps
        // later (well before the thirtieth), the refused claim gets in.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let Ok(Claim::Acquired(_)) = store
            .claim(&key("new"), &fp(), LeaseToken::new(), LEASE)
            .await
        else {
            panic!("still refused: {} bytes of {}", store.bytes(), 10_000)
        };
        assert!(replays(&store, "long").await);
    }

    /// A full store takes a claim that replaces the key's own expired record: its room is
    /// the claim's, whatever the records ahead of it in the queue. (Before, the claim was
    /// refused while a longer-lived record inside the window stood first in the queue.)
    #[tokio::test(start_paused = true)]
    async fn a_full_store_takes_the_claim_that_replaces_the_keys_own_expired_record() {
        let store = MemoryStore::builder()
            .max_bytes(10_000)
            .min_retention(Duration::from_secs(300))
            .sweep_interval(Duration::from_secs(3600))
            .build();
        stored(&store, "long", Duration::from_secs(3600)).await;
        stored(&store, "own", Duration::from_secs(1)).await;
        let rest = fill(&store, || record(10), Duration::from_secs(3600)).await;
        assert!(!rest.is_empty());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let claim = store
            .claim(&key("own"), &fp(), LeaseToken::new(), LEASE)
            .await;
        assert!(matches!(claim, Ok(Claim::Acquired(_))), "{claim:?}");
        let counted = store.inner.map.iter().map(|e| e.counted()).sum::<usize>();
        assert_eq!(store.bytes(), counted);
        assert!(store.bytes() <= 10_000);
        assert!(replays(&store, "long").await);
    }

    /// Replays never take the store past its cap: a record's replay headers are kept (and
    /// counted) only while they fit; past that, each replay makes them again, and they are
    /// the same headers.
    #[tokio::test(start_paused = true)]
    async fn replays_of_a_full_store_stay_under_its_cap() {
        const CAP: usize = 20_000;
        let store = MemoryStore::builder()
            .max_bytes(CAP)
            .min_retention(Duration::from_secs(300))
            .build();
        store.make_replay_headers_with(crate::answer::replay_map);
        let answer = || {
            let mut headers = HeaderMap::new();
            headers.insert("content-type", "application/json".parse().unwrap());
            Record::new(StatusCode::CREATED, headers, Bytes::from("{}"), None)
                .with_fingerprint(fp())
        };
        let stored_keys = fill(&store, answer, TTL).await;
        assert!(stored_keys.len() > 10);
        for k in &stored_keys {
            let Claim::Completed(record) = store
                .claim(&key(k), &fp(), LeaseToken::new(), LEASE)
                .await
                .unwrap()
            else {
                panic!("{k} replays")
            };
            assert!(store.bytes() <= CAP, "{} bytes of {CAP}", store.bytes());
            let replayed = crate::answer::replay::<http_body_util::Empty<Bytes>>(&record);
            assert_eq!(replayed.headers()["idempotent-replayed"], "true");
            assert_eq!(replayed.headers()["content-type"], "application/json");
            assert_eq!(replayed.headers()["content-length"], "2");
        }
        let counted = store.inner.map.iter().map(|e| e.counted()).sum::<usize>();
        assert_eq!(store.bytes(), counted);
    }
}
