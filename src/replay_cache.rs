//! The records an instance stored or replayed, kept in its memory for a short while, so that
//! a retry of one is answered without a store round trip
//! ([`IdempotencyLayer::cache_replays`](crate::IdempotencyLayer::cache_replays)).
//!
//! A completed record never changes in the store until it expires or an operator deletes
//! it, so a copy of it is the same answer the store would give, for as long as the copy is
//! younger than `max_age`: the bound on how late an instance sees a record's expiry or
//! deletion. Keyed by the whole store key (the caller's scope and the key), and answered
//! through the same fingerprint check as the store's answers, so a cached record is never
//! another caller's or another payload's.
//!
//! Bounded in bytes: every record is counted at its size plus [`ENTRY_OVERHEAD`], and the
//! oldest are dropped first (records are kept in the order they were cached, which is the
//! order they reach `max_age` in; a copy a shorter TTL caps goes stale sooner, and is
//! dropped when it is looked up or reaches the front, counted until then). The queue keeps
//! at most about two places per copy held.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::key::StoreKey;
use crate::record::Record;

/// What an entry costs beside its record's [`Record::size`] and its key: the map's slot,
/// the queue's, the `Arc` and the record's header maps (an estimate on the high side).
const ENTRY_OVERHEAD: usize = 256;

/// See the [module documentation](self).
#[derive(Debug)]
pub(crate) struct ReplayCache {
    map: DashMap<StoreKey, Cached>,
    /// Cached records in the order they were cached: the order they are dropped in.
    queue: Mutex<VecDeque<(StoreKey, u64)>>,
    bytes: AtomicUsize,
    max_bytes: usize,
    max_age: Duration,
    next: AtomicU64,
}

#[derive(Debug)]
struct Cached {
    record: Arc<Record>,
    /// When this copy stops being answered.
    until: Instant,
    size: usize,
    /// Tells this entry from a newer one under the same key, in the queue.
    seq: u64,
}

impl ReplayCache {
    /// A cache of at most `max_bytes`, each record answered for at most `max_age`; `None`
    /// when either is zero.
    pub(crate) fn new(max_bytes: usize, max_age: Duration) -> Option<Self> {
        (max_bytes > 0 && !max_age.is_zero()).then(|| Self {
            map: DashMap::new(),
            queue: Mutex::new(VecDeque::new()),
            bytes: AtomicUsize::new(0),
            max_bytes,
            max_age: crate::time::clamp_duration(max_age),
            next: AtomicU64::new(1),
        })
    }

    /// The record cached under `key`, if a copy younger than `max_age` (and than the TTL it
    /// was stored with) is held.
    pub(crate) fn get(&self, key: &StoreKey) -> Option<Arc<Record>> {
        let now = Instant::now();
        let entry = self.map.get(key)?;
        if entry.until > now {
            return Some(Arc::clone(&entry.record));
        }
        let seq = entry.seq;
        drop(entry);
        self.remove(key, seq);
        None
    }

    /// Keeps `record`, the answer of `key` in the store, for `max_age` at most and never
    /// past `ttl` from now (`None`: the store did not say how long it keeps it). Records
    /// that are not a plain answer (tombstones, sealed records no store opened) and records
    /// larger than the whole cache are not kept.
    pub(crate) fn put(&self, key: &StoreKey, record: Arc<Record>, ttl: Option<Duration>) {
        if record.is_tombstone()
            || record
                .fields()
                .contains(crate::record::SEALED_HEADER.as_str())
        {
            return;
        }
        let size = record.size() + key.as_str().len() + ENTRY_OVERHEAD;
        if size > self.max_bytes {
            return;
        }
        let age = ttl.map_or(self.max_age, |ttl| ttl.min(self.max_age));
        let now = Instant::now();
        let Some(until) = now.checked_add(age) else {
            return;
        };
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        // Counted before it is in the map: a removal of it (by a lookup that finds it
        // stale) can never subtract what was not added yet.
        self.bytes.fetch_add(size, Ordering::Relaxed);
        let old = self.map.insert(
            key.clone(),
            Cached {
                record,
                until,
                size,
                seq,
            },
        );
        if let Some(old) = old {
            self.bytes.fetch_sub(old.size, Ordering::Relaxed);
        }
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.push_back((key.clone(), seq));
        // Oldest first: past the byte bound, or stale (an entry replaced since, whose queue
        // place is all that is left of it, goes too).
        while let Some((front, front_seq)) = queue.front() {
            let over = self.bytes.load(Ordering::Relaxed) > self.max_bytes;
            let current = self.map.get(front).map(|e| (e.seq, e.until));
            let stale = match current {
                Some((seq, until)) => seq != *front_seq || until <= now,
                None => true,
            };
            if !over && !stale {
                break;
            }
            let (front, front_seq) = queue.pop_front().expect("a front");
            self.remove(&front, front_seq);
        }
        // Places of copies replaced since, or dropped as stale by a lookup, are left
        // behind a copy that lives on at the front: when they outnumber the copies, the
        // queue keeps only the places of copies still held (amortised over the puts that
        // left them).
        if queue.len() > 2 * self.map.len() + 16 {
            queue.retain(|(key, seq)| self.map.get(key).is_some_and(|e| e.seq == *seq));
        }
    }

    /// Drops what is cached under `key` (nothing happens if it is not the record cached
    /// with `seq`).
    fn remove(&self, key: &StoreKey, seq: u64) {
        if let Some((_, gone)) = self.map.remove_if(key, |_, e| e.seq == seq) {
            self.bytes.fetch_sub(gone.size, Ordering::Relaxed);
        }
    }

    /// The bytes counted for what is cached.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The records cached.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::Fingerprint;
    use crate::key::Scope;

    fn key(k: &str) -> StoreKey {
        StoreKey::new(&Scope::of(b"tenant"), k)
    }

    fn record(body: usize) -> Arc<Record> {
        Arc::new(
            Record::new(
                StatusCode::CREATED,
                HeaderMap::new(),
                Bytes::from(vec![b'x'; body]),
                None,
            )
            .with_fingerprint(Fingerprint::of_fields([b"f".as_slice()])),
        )
    }

    #[test]
    fn a_cache_with_no_room_or_no_age_is_no_cache() {
        assert!(ReplayCache::new(0, Duration::from_secs(1)).is_none());
        assert!(ReplayCache::new(1 << 20, Duration::ZERO).is_none());
    }

    /// The bytes held never pass the bound, whatever is put; the oldest go first and the
    /// newest stay.
    #[test]
    fn the_cache_stays_within_its_bytes_dropping_the_oldest() {
        let cache = ReplayCache::new(16 * 1024, Duration::from_secs(60)).unwrap();
        for i in 0..500 {
            cache.put(&key(&format!("k{i}")), record(1024), None);
            assert!(
                cache.bytes() <= 16 * 1024,
                "{} bytes after {i}",
                cache.bytes()
            );
        }
        assert!(cache.len() >= 10, "{} records kept", cache.len());
        assert!(cache.get(&key("k499")).is_some(), "the newest was dropped");
        assert!(cache.get(&key("k0")).is_none(), "the oldest was kept");
        // Counted bytes match what is held.
        let held: usize = (0..500)
            .filter(|i| cache.get(&key(&format!("k{i}"))).is_some())
            .count();
        assert_eq!(held, cache.len());
    }

    /// A record is answered until its age bound, never after; the TTL it was stored with
    /// bounds it too.
    #[test]
    fn a_copy_is_answered_for_max_age_and_never_past_its_ttl() {
        let cache = ReplayCache::new(1 << 20, Duration::from_millis(150)).unwrap();
        cache.put(&key("aged"), record(10), None);
        cache.put(&key("short"), record(10), Some(Duration::from_millis(30)));
        assert!(cache.get(&key("aged")).is_some());
        assert!(cache.get(&key("short")).is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get(&key("short")).is_none(), "answered past its TTL");
        assert!(cache.get(&key("aged")).is_some());
        std::thread::sleep(Duration::from_millis(120));
        assert!(cache.get(&key("aged")).is_none(), "answered past max_age");
        assert_eq!(cache.len(), 0, "stale copies are dropped when looked up");
        assert_eq!(cache.bytes(), 0);
    }

    /// Keys of other scopes, and keys that differ only in case or by a separator, are
    /// other entries.
    #[test]
    fn entries_are_kept_by_the_whole_store_key() {
        let cache = ReplayCache::new(1 << 20, Duration::from_secs(60)).unwrap();
        let a = StoreKey::new(&Scope::of(b"a"), "k");
        let b = StoreKey::new(&Scope::of(b"b"), "k");
        cache.put(&a, record(1), None);
        assert!(cache.get(&a).is_some());
        assert!(cache.get(&b).is_none());
        assert!(cache.get(&key("K")).is_none());
    }

    /// Tombstones (an answer withheld, an operation cut short) are never cached: what a
    /// retry gets for them is decided by the store each time.
    #[test]
    fn tombstones_sealed_and_oversized_records_are_not_cached() {
        let cache = ReplayCache::new(4096, Duration::from_secs(60)).unwrap();
        let tomb = Arc::new(Record::tombstone(
            StatusCode::INTERNAL_SERVER_ERROR,
            HeaderMap::new(),
        ));
        cache.put(&key("tomb"), tomb, None);
        cache.put(&key("big"), record(8192), None);
        // A sealed record no store opened is refused by the flow, each time it is met.
        let mut headers = HeaderMap::new();
        headers.insert(crate::record::SEALED_HEADER, "v1".parse().unwrap());
        let sealed = Arc::new(Record::new(StatusCode::OK, headers, Bytes::new(), None));
        cache.put(&key("sealed"), sealed, None);
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.bytes(), 0);
    }

    /// A key cached again replaces its copy and is counted once; the older copy's place in
    /// the queue does not take the newer copy with it.
    #[test]
    fn a_key_put_twice_is_counted_once() {
        let cache = ReplayCache::new(1 << 20, Duration::from_secs(60)).unwrap();
        cache.put(&key("k"), record(100), None);
        let once = cache.bytes();
        cache.put(&key("k"), record(100), None);
        assert_eq!(cache.bytes(), once);
        assert_eq!(cache.len(), 1);
        // Enough other keys to push the first copy's queue place out: the second copy stays
        // until its own place comes up.
        let small = ReplayCache::new(2 * once, Duration::from_secs(60)).unwrap();
        small.put(&key("k"), record(100), None);
        small.put(&key("k"), record(100), None);
        small.put(&key("a"), record(100), None);
        assert!(
            small.get(&key("k")).is_some(),
            "the newer copy went with the older's place"
        );
        assert!(small.get(&key("a")).is_some());
        assert_eq!(small.bytes(), 2 * once);
        // One more: the oldest copy that is still held goes.
        small.put(&key("b"), record(100), None);
        assert!(small.get(&key("k")).is_none());
        assert_eq!(small.bytes(), 2 * once);
    }

    /// Copies replaced under their key, or dropped when a lookup finds them stale, leave
    /// no place behind in the queue for long: behind one long-lived copy at the front, the
    /// queue holds at most about twice the copies kept. (Found by review: 200,001 places,
    /// each a store key, were held for 2 copies and 908 counted bytes.)
    #[test]
    fn the_queue_keeps_no_place_for_copies_replaced_or_found_stale() {
        let cache = ReplayCache::new(16 * 1024, Duration::from_secs(3600)).unwrap();
        cache.put(&key("front"), record(10), None);
        for i in 0..20_000 {
            let short = key(&format!("short-{i}"));
            cache.put(&short, record(10), Some(Duration::from_nanos(1)));
            assert!(cache.get(&short).is_none(), "stale at once");
            cache.put(&key("hot"), record(10), None);
        }
        let places = cache.queue.lock().unwrap().len();
        assert!(
            places <= 2 * cache.len() + 17,
            "{places} queue places for {} copies",
            cache.len()
        );
        assert!(cache.get(&key("front")).is_some() && cache.get(&key("hot")).is_some());
    }
}
