//! Waking the duplicates that wait on a key ([`IdempotencyStore::wait`]) the moment it stops
//! being in flight, instead of at their next poll.
//!
//! Two sources wake a waiter:
//! - its own process: a store that completes, releases, revokes, settles or purges a key
//!   wakes the waiters of that key in the same process at once ([`Wakeups::wake`]);
//! - other instances, through a push channel of the backend ([`Push`]: Redis pub/sub,
//!   PostgreSQL `LISTEN`/`NOTIFY`; on MySQL, which has none, a watcher that looks at every
//!   waited-on key in one statement a millisecond), which the store's background task turns
//!   into the same wake.
//!
//! A waiter registers its interest before it looks at the key, so no wake between its
//! look and its sleep is missed. It still looks again when the holder's lease ends (the
//! holder may be gone, which nobody announces) and, as a safety net, at least every
//! [`PUSHED_RECHECK`]; when the push channel is down it polls on the store's schedule.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Claim, IdempotencyStore, LeaseToken, StoreError, StoreKey};
use crate::fingerprint::Fingerprint;

/// How often a waiter looks again while a push channel covers its key: only a safety net
/// (a message lost with its connection before the listener noticed, an instance of an
/// older version that does not announce).
pub(crate) const PUSHED_RECHECK: Duration = Duration::from_millis(500);

/// A waiter wakes this long after the holder's lease was due to end, so that the claim it
/// then makes finds the lease over.
const LEASE_SLACK: Duration = Duration::from_millis(2);

/// The waiters of one process, by key (in the backend's own spelling of the key).
#[derive(Debug, Default)]
pub(crate) struct Wakeups {
    /// How many waiters are registered: completions skip the map while it is zero.
    waiting: AtomicUsize,
    keys: Mutex<HashMap<Box<str>, Waiting>>,
}

#[derive(Debug)]
struct Waiting {
    signal: watch::Sender<u64>,
    waiters: usize,
}

/// One waiter's interest in a key: wakes on every [`Wakeups::wake`] of that key after
/// [`Interest::seen`].
pub(crate) struct Interest<'a> {
    wakeups: &'a Wakeups,
    name: Box<str>,
    signal: watch::Receiver<u64>,
}

impl Wakeups {
    /// Registers a waiter on `name`.
    pub(crate) fn register(&self, name: &str) -> Interest<'_> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let waiting = keys.entry(name.into()).or_insert_with(|| Waiting {
            signal: watch::Sender::new(0),
            waiters: 0,
        });
        waiting.waiters += 1;
        let signal = waiting.signal.subscribe();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        Interest {
            wakeups: self,
            name: name.into(),
            signal,
        }
    }

    /// Wakes every waiter of `name` in this process. Costs one atomic load when nobody
    /// waits.
    pub(crate) fn wake(&self, name: &str) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = keys.get(name) {
            waiting.signal.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// [`wake`](Self::wake), with a name made only when someone waits.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn wake_by(&self, name: impl FnOnce() -> String) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        self.wake(&name());
    }

    /// Wakes every waiter, of every key: the push channel was lost, and what it carried
    /// meanwhile with it, so each looks again.
    pub(crate) fn wake_all(&self) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        for waiting in keys.values() {
            waiting.signal.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    #[cfg(test)]
    fn keys_held(&self) -> usize {
        self.keys.lock().unwrap().len()
    }
}

impl Interest<'_> {
    /// Marks every wake so far as seen: [`woken`](Self::woken) waits for the next one.
    pub(crate) fn seen(&mut self) {
        self.signal.borrow_and_update();
    }

    /// Waits for a wake after the last [`seen`](Self::seen).
    pub(crate) async fn woken(&mut self) {
        // The sender lives in the map as long as this interest does.
        let _ = self.signal.changed().await;
    }
}

impl Drop for Interest<'_> {
    fn drop(&mut self) {
        let mut keys = self.wakeups.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = keys.get_mut(&*self.name) {
            waiting.waiters -= 1;
            if waiting.waiters == 0 {
                keys.remove(&*self.name);
            }
        }
        self.wakeups.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A subscription to a backend's push channel for one key, held while a waiter waits.
pub(crate) struct Subscription {
    /// Cleared by the listener when its connection is lost (the waiter then subscribes
    /// again, or polls).
    alive: Arc<AtomicBool>,
    /// What ends the subscription (an `UNSUBSCRIBE` for Redis).
    on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Subscription {
    /// A subscription that lives while `alive` holds, and runs `on_drop` when dropped.
    pub(crate) fn new(
        alive: Arc<AtomicBool>,
        on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
    ) -> Self {
        Self { alive, on_drop }
    }

    pub(super) fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(on_drop) = self.on_drop.take() {
            on_drop();
        }
    }
}

/// A backend's push channel: how waiters hear of other instances' completions.
#[async_trait]
pub(crate) trait Push: Send + Sync {
    /// Subscribes to the completions of the key the store spells `name`, from any instance;
    /// `None` when the channel is down (the waiter then polls).
    async fn subscribe(&self, name: &str) -> Option<Subscription>;

    /// Tells the backend, before each look at `key`, that a waiter here waits on it (so that
    /// the completion announces itself). Default: nothing to tell.
    async fn announce(&self, key: &StoreKey) -> Result<(), StoreError> {
        let _ = key;
        Ok(())
    }
}

/// How a waiter polls when no push channel covers its key: `first`, then growing by
/// `grow` (per cent) up to `cap`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Polling {
    pub(crate) first: Duration,
    pub(crate) grow_percent: u32,
    pub(crate) cap: Duration,
}

impl Polling {
    /// The trait's default: 5 ms doubling up to 250 ms.
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    pub(crate) const DEFAULT: Self = Self {
        first: Duration::from_millis(5),
        grow_percent: 200,
        cap: Duration::from_millis(250),
    };

    fn next(&self, pause: Duration) -> Duration {
        (pause * self.grow_percent / 100).min(self.cap)
    }
}

/// Everything a waiting claim needs.
pub(crate) struct Wait<'a> {
    pub(crate) key: &'a StoreKey,
    pub(crate) fingerprint: &'a Fingerprint,
    pub(crate) token: LeaseToken,
    pub(crate) lease: Duration,
    pub(crate) timeout: Duration,
}

/// [`IdempotencyStore::wait`] for a store with process-wide [`Wakeups`] under `name`, and
/// perhaps a push channel: claims, and while the key is in flight sleeps until a wake, the
/// end of the holder's lease, a safety recheck or (without push) the next poll.
pub(crate) async fn wait_woken<S: IdempotencyStore + ?Sized>(
    store: &S,
    wakeups: &Wakeups,
    name: &str,
    push: Option<&dyn Push>,
    polling: Polling,
    wait: Wait<'_>,
) -> Result<Claim, StoreError> {
    let deadline = crate::time::deadline_after(wait.timeout);
    let mut interest = wakeups.register(name);
    let mut subscription: Option<Subscription> = None;
    let mut pause = polling.first;
    // Whether the waiter must tell the backend (again) that it waits: at first, after a
    // new subscription, and after a wake (the key may have been freed and claimed anew).
    // A recheck that found the key still held needs no new word.
    let mut tell = true;
    loop {
        if let Some(push) = push {
            if !subscription.as_ref().is_some_and(Subscription::alive) {
                subscription = push.subscribe(name).await;
                tell = true;
            }
            if subscription.is_some() && tell {
                push.announce(wait.key).await?;
            }
        }
        interest.seen();
        let claim = store
            .claim(wait.key, wait.fingerprint, wait.token, wait.lease)
            .await?;
        let now = Instant::now();
        let Claim::InFlight {
            lease_remaining, ..
        } = &claim
        else {
            return Ok(claim);
        };
        if now >= deadline {
            return Ok(claim);
        }
        let sleep = if subscription.is_some() {
            lease_remaining.map_or(PUSHED_RECHECK, |rest| {
                (rest + LEASE_SLACK).min(PUSHED_RECHECK)
            })
        } else {
            let this = pause;
            pause = polling.next(pause);
            this
        };
        // Woken, or the time is up: either way, look again.
        tell = tokio::time::timeout(sleep.min(deadline - now), interest.woken())
            .await
            .is_ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{Record, StoreKey};

    #[tokio::test]
    async fn a_wake_after_seen_is_not_missed_and_the_map_empties() {
        let wakeups = Wakeups::default();
        let mut a = wakeups.register("k");
        let mut b = wakeups.register("k");
        a.seen();
        b.seen();
        wakeups.wake("other");
        wakeups.wake("k");
        tokio::time::timeout(Duration::from_secs(1), a.woken())
            .await
            .expect("a wake before the wait is kept");
        tokio::time::timeout(Duration::from_secs(1), b.woken())
            .await
            .expect("every waiter of the key wakes");
        a.seen();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), a.woken())
                .await
                .is_err(),
            "a seen wake does not wake again"
        );
        wakeups.wake_all();
        tokio::time::timeout(Duration::from_secs(1), a.woken())
            .await
            .expect("wake_all wakes every key");
        drop(a);
        assert_eq!(wakeups.keys_held(), 1);
        drop(b);
        assert_eq!(wakeups.keys_held(), 0, "the last waiter takes its key away");
        assert_eq!(wakeups.waiting.load(Ordering::SeqCst), 0);
    }

    /// A waiter whose next poll is ten seconds away gets the answer as soon as a completion
    /// in its process wakes it: what every shared store does for its own waiters (MySQL's
    /// only quick path).
    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn a_wake_in_the_process_ends_the_wait_before_the_next_poll() {
        let store = MemoryStore::new();
        let key = StoreKey::new(&crate::key::Scope::anonymous(), "woken-here");
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        let lease = Duration::from_secs(30);
        let Claim::Acquired(token) = store
            .claim(&key, &fingerprint, LeaseToken::new(), lease)
            .await
            .unwrap()
        else {
            panic!("acquired");
        };
        let slow = Polling {
            first: Duration::from_secs(10),
            grow_percent: 100,
            cap: Duration::from_secs(10),
        };
        // The waiter and the completer share one `Wakeups`, as a store's clones do.
        let shared = std::sync::Arc::new(Wakeups::default());
        let waiter = {
            let (store, key, shared) = (store.clone(), key.clone(), std::sync::Arc::clone(&shared));
            tokio::spawn(async move {
                let wait = Wait {
                    key: &key,
                    fingerprint: &fingerprint,
                    token: LeaseToken::new(),
                    lease,
                    timeout: Duration::from_secs(20),
                };
                wait_woken(&store, &shared, "woken-here", None, slow, wait).await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let record = Record::new(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            bytes::Bytes::from_static(b"done"),
            None,
        );
        store.complete(&key, token, record, lease).await.unwrap();
        shared.wake("woken-here");
        let answer = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken, not left to its ten-second poll")
            .unwrap()
            .unwrap();
        assert!(matches!(answer, Claim::Completed(_)));
    }
}
