//! Waiters on other instances woken by a watcher: MySQL has no push channel (nothing like
//! `LISTEN`/`NOTIFY` or pub/sub, and a named lock needs a connection held for every claim in
//! flight), so while duplicates of this process wait on keys held elsewhere, one task per
//! store looks at all of those keys in one statement every [`TICK`] and wakes the waiters of
//! each key whose holder is gone (completed, released, revoked, settled, purged or taken
//! over) or whose committed claim's lease was ended by its release. It runs only while someone waits: a store nobody waits on sends nothing, and the
//! round trips of a request stay what they were. Each waiter still looks again at the end
//! of its holder's lease and every [`PUSHED_RECHECK`](super::wakeup::PUSHED_RECHECK); when
//! the watcher's statement fails, its subscriptions end, every waiter looks again at once,
//! and waiters poll on the store's schedule until a watcher starts again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, MySqlPool, Row};
use tokio::time::Instant;

use crate::store::wakeup::{Push, Subscription, Wakeups};

/// The pause between two looks of the watcher.
pub(super) const TICK: Duration = Duration::from_millis(1);

/// The longest a look may take: past it the watcher counts as lost.
const LOOK_TIMEOUT: Duration = Duration::from_secs(1);

/// After a lost watcher, how long waiters poll before a watcher is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The most keys one statement looks at (more take several statements per look).
const BATCH: usize = 256;

/// The watcher of one store (shared by its clones).
pub(super) struct MySqlWatch {
    shared: Arc<Shared>,
}

struct Shared {
    pool: MySqlPool,
    /// The quoted table.
    table: String,
    wakeups: Arc<Wakeups>,
    state: Mutex<State>,
    /// Looks made so far (for tests: none while nobody waits).
    looks: AtomicU64,
}

#[derive(Default)]
struct State {
    /// The keys waited on (as the store spells them, which is also the row's key), with how
    /// many subscriptions hold each and the holder's token at the last look.
    keys: HashMap<Box<str>, Watched>,
    /// Whether a watcher task runs.
    running: bool,
    /// Cleared when the running watcher is lost: the subscriptions it served end.
    alive: Arc<AtomicBool>,
    /// When the last watcher was lost.
    lost_at: Option<Instant>,
    /// The number of the watcher task last started.
    generation: u64,
}

struct Watched {
    subscriptions: usize,
    /// `None` before the first look; then the holder (`None`: nobody holds it).
    last: Option<Option<Holder>>,
}

/// Who holds a key, as the watcher sees it: the token, and a committed claim's lease end
/// (which its release moves to now, the token kept).
type Holder = (Vec<u8>, Option<String>);

impl MySqlWatch {
    pub(super) fn new(pool: MySqlPool, table: String, wakeups: Arc<Wakeups>) -> Self {
        Self {
            shared: Arc::new(Shared {
                pool,
                table,
                wakeups,
                state: Mutex::new(State::default()),
                looks: AtomicU64::new(0),
            }),
        }
    }

    /// Looks made so far.
    #[cfg(test)]
    pub(super) fn looks(&self) -> u64 {
        self.shared.looks.load(Ordering::SeqCst)
    }

    /// Whether a watcher task runs.
    #[cfg(test)]
    pub(super) fn running(&self) -> bool {
        self.shared.lock().running
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unwatch(&self, name: &str) {
        let mut state = self.lock();
        if let Some(watched) = state.keys.get_mut(name) {
            watched.subscriptions -= 1;
            if watched.subscriptions == 0 {
                state.keys.remove(name);
            }
        }
    }

    /// The holders of the keys of `names` that are held (a row with a token).
    async fn holders(&self, names: &[Box<str>]) -> Result<HashMap<Vec<u8>, Holder>, sqlx::Error> {
        let mut held = HashMap::new();
        for batch in names.chunks(BATCH) {
            // Padded to a power of two with the last key, so that a handful of statements
            // (each prepared once per connection) serve every count.
            let slots = batch.len().next_power_of_two();
            let marks = vec!["?"; slots].join(",");
            let sql = format!(
                "SELECT `key`, token, CAST(lease_until AS CHAR) FROM {} \
                 WHERE token IS NOT NULL AND `key` IN ({marks})",
                self.table
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for i in 0..slots {
                let name = &batch[i.min(batch.len() - 1)];
                query = query.bind(name.as_bytes());
            }
            for row in query.fetch_all(&self.pool).await? {
                let key: Vec<u8> = row.try_get(0)?;
                let token: Option<Vec<u8>> = row.try_get(1)?;
                let lease_until: Option<String> = row.try_get(2)?;
                if let Some(token) = token {
                    held.insert(key, (token, lease_until));
                }
            }
        }
        Ok(held)
    }
}

/// The watcher task `generation`'s hold on the shared state: if the task is dropped before
/// it ends (its runtime shut down, polled or not), the watcher is marked stopped, its
/// subscriptions end, and the next subscription starts a watcher anew.
struct Task {
    shared: Arc<Shared>,
    generation: u64,
}

impl Drop for Task {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if state.running && state.generation == self.generation {
            state.running = false;
            state.alive.store(false, Ordering::SeqCst);
        }
    }
}

/// Looks at every key waited on, every [`TICK`], while there is one; wakes the waiters of
/// each whose holder changed since the last look (or that nobody holds at the first).
async fn watch(task: Task) {
    let shared = &task.shared;
    loop {
        let names: Vec<Box<str>> = {
            let mut state = shared.lock();
            if state.keys.is_empty() {
                state.running = false;
                return;
            }
            state.keys.keys().cloned().collect()
        };
        shared.looks.fetch_add(1, Ordering::SeqCst);
        let held = match tokio::time::timeout(LOOK_TIMEOUT, shared.holders(&names)).await {
            Ok(Ok(held)) => held,
            Ok(Err(err)) => return lost(shared, &err.to_string()),
            Err(_) => return lost(shared, "it took more than a second"),
        };
        let mut changed = Vec::new();
        {
            let mut state = shared.lock();
            for name in names {
                let Some(watched) = state.keys.get_mut(&name) else {
                    continue;
                };
                let now = held.get(name.as_bytes()).cloned();
                let wake = match &watched.last {
                    None => now.is_none(),
                    Some(before) => *before != now,
                };
                watched.last = Some(now);
                if wake {
                    changed.push(name);
                }
            }
        }
        for name in changed {
            shared.wakeups.wake(&name);
        }
        tokio::time::sleep(TICK).await;
    }
}

/// The watcher is lost: its subscriptions end and every waiter looks again now, then polls
/// until a watcher is tried again.
fn lost(shared: &Shared, why: &str) {
    tracing::warn!(
        error = why,
        "the idempotency store's watcher of waited-on keys failed; waiters poll meanwhile"
    );
    {
        let mut state = shared.lock();
        state.alive.store(false, Ordering::SeqCst);
        state.running = false;
        state.lost_at = Some(Instant::now());
        for watched in state.keys.values_mut() {
            watched.last = None;
        }
    }
    shared.wakeups.wake_all();
}

#[async_trait]
impl Push for MySqlWatch {
    async fn subscribe(&self, name: &str) -> Option<Subscription> {
        let mut state = self.shared.lock();
        if state.lost_at.is_some_and(|at| at.elapsed() < RETRY_AFTER) {
            return None;
        }
        if !state.running {
            state.running = true;
            state.lost_at = None;
            state.alive = Arc::new(AtomicBool::new(true));
            state.generation += 1;
            tokio::spawn(watch(Task {
                shared: Arc::clone(&self.shared),
                generation: state.generation,
            }));
        }
        state
            .keys
            .entry(name.into())
            .or_insert(Watched {
                subscriptions: 0,
                last: None,
            })
            .subscriptions += 1;
        let alive = Arc::clone(&state.alive);
        drop(state);
        let shared = Arc::clone(&self.shared);
        let name: Box<str> = name.into();
        Some(Subscription::new(
            alive,
            Some(Box::new(move || shared.unwatch(&name))),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::MySqlStore;
    use super::*;
    use crate::fingerprint::Fingerprint;
    use crate::key::{Scope, StoreKey};
    use crate::store::{Claim, IdempotencyStore, LeaseToken, Record};

    /// Two instances (each on a pool of its own) on a table of this test's own, dropped at
    /// the end; `None` without `MYSQL_URL`.
    async fn instances(table: &str) -> Option<(MySqlStore, MySqlStore)> {
        let Ok(url) = std::env::var("MYSQL_URL") else {
            eprintln!("skipped: MYSQL_URL not set");
            return None;
        };
        let pool = || async {
            MySqlPool::connect(&url)
                .await
                .expect("connect to MYSQL_URL")
        };
        let a = MySqlStore::new(pool().await).table(table);
        let b = MySqlStore::new(pool().await).table(table);
        for statement in a.drop_sql().unwrap() {
            sqlx::query(AssertSqlSafe(statement))
                .execute(&a.inner.config.pool)
                .await
                .expect("drop what an earlier run left");
        }
        a.migrate().await.expect("migrate");
        Some((a, b))
    }

    async fn drop_table(store: &MySqlStore) {
        for statement in store.drop_sql().unwrap() {
            let _ = sqlx::query(AssertSqlSafe(statement))
                .execute(&store.inner.config.pool)
                .await;
        }
    }

    fn watch_of(store: &MySqlStore) -> &MySqlWatch {
        store.inner.watch.as_ref().expect("a valid table")
    }

    const LEASE: Duration = Duration::from_secs(30);

    /// Claims the free `key` on `store`, which must be acquired.
    async fn acquire(store: &MySqlStore, key: &StoreKey, fingerprint: &Fingerprint) -> LeaseToken {
        match store
            .claim(key, fingerprint, LeaseToken::new(), LEASE)
            .await
        {
            Ok(Claim::Acquired(token)) => token,
            other => panic!("expected to acquire {key:?}, got {other:?}"),
        }
    }

    /// A duplicate waiting on `key` through `store`'s `wait`, on a task of its own.
    fn waiter(
        store: &MySqlStore,
        key: &StoreKey,
        fingerprint: Fingerprint,
        timeout: Duration,
    ) -> tokio::task::JoinHandle<Result<Claim, crate::store::StoreError>> {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move {
            store
                .wait(&key, &fingerprint, LeaseToken::new(), LEASE, timeout)
                .await
        })
    }

    /// Waits up to ten seconds for `store`'s watcher to be running (or not).
    async fn until_running(store: &MySqlStore, running: bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while watch_of(store).running() != running {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What the watcher is for: a waiter on one instance hears of the end of a key held on
    /// another, with nothing else to wake it (no completion in its own process, no poll:
    /// this looks at its wake-ups alone).
    #[tokio::test]
    async fn a_completion_on_another_instance_wakes_the_waiters_here() {
        let Some((a, b)) = instances("watch_wakes_waiters").await else {
            return;
        };
        let key = StoreKey::new(&Scope::anonymous(), "held-elsewhere");
        let fingerprint = Fingerprint::from_bytes([3; 32]);
        let token = acquire(&a, &key, &fingerprint).await;
        let mut interest = b.inner.wakeups.register(key.as_str());
        interest.seen();
        let subscription = watch_of(&b)
            .subscribe(key.as_str())
            .await
            .expect("a watcher starts");
        // While the key stays held, the watcher looks and wakes nobody.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), interest.woken())
                .await
                .is_err(),
            "a key still held wakes no one"
        );
        assert!(watch_of(&b).looks() > 10, "it looks every tick meanwhile");
        let record = Record::new(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            bytes::Bytes::from_static(b"done"),
            None,
        );
        a.complete(&key, token, record, LEASE).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), interest.woken())
            .await
            .expect("the completion on the other instance wakes the waiter here");
        // Nobody waits any more: the watcher stops, and looks no more.
        drop(subscription);
        drop(interest);
        until_running(&b, false, "the watcher stops").await;
        let looks = watch_of(&b).looks();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(watch_of(&b).looks(), looks, "no look while nobody waits");
        drop_table(&a).await;
    }

    /// The release of a committed claim on another instance keeps its token but ends its
    /// lease now: that wakes the waiters here too, which look again and find the lease
    /// over. (Before, the watcher compared tokens alone and woke nobody: the waiters heard
    /// of it only at their next recheck, up to half a second later.)
    #[tokio::test]
    async fn a_committed_claim_released_on_another_instance_wakes_the_waiters_here() {
        let Some((a, b)) = instances("watch_committed_release").await else {
            return;
        };
        let key = StoreKey::new(&Scope::anonymous(), "committed-elsewhere");
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let token = acquire(&a, &key, &fingerprint).await;
        a.commit(&key, token, LEASE).await.unwrap();
        let mut interest = b.inner.wakeups.register(key.as_str());
        interest.seen();
        let _subscription = watch_of(&b)
            .subscribe(key.as_str())
            .await
            .expect("a watcher starts");
        // The first look, which finds the key held, wakes nobody.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), interest.woken())
                .await
                .is_err(),
            "a key still held wakes no one"
        );
        assert!(matches!(
            a.release(&key, token).await,
            Err(crate::store::StoreError::Committed)
        ));
        tokio::time::timeout(Duration::from_secs(2), interest.woken())
            .await
            .expect("the end of the committed claim's lease wakes the waiter here");
        drop_table(&a).await;
    }

    /// More keys waited on than one statement looks at (256): every waiter gets the answer
    /// of its own key, none another's, and the watcher stops once they all have.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_on_more_keys_than_a_statement_holds_each_get_their_own_answer() {
        let Some((a, b)) = instances("watch_many").await else {
            return;
        };
        let fingerprint = Fingerprint::from_bytes([5; 32]);
        let mut held = Vec::new();
        for i in 0..300 {
            let key = StoreKey::new(&Scope::anonymous(), &format!("many-{i}"));
            let token = acquire(&a, &key, &fingerprint).await;
            held.push((key, token));
        }
        let waiters: Vec<_> = held
            .iter()
            .map(|(key, _)| waiter(&b, key, fingerprint, Duration::from_secs(60)))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (key, token) in &held {
            let body = bytes::Bytes::from(format!("answer of {}", key.as_str()));
            let record = Record::new(http::StatusCode::OK, http::HeaderMap::new(), body, None);
            a.complete(key, *token, record, LEASE).await.unwrap();
        }
        for ((key, _), waiter) in held.iter().zip(waiters) {
            let claim = tokio::time::timeout(Duration::from_secs(30), waiter)
                .await
                .expect("every waiter ends")
                .unwrap()
                .unwrap();
            let Claim::Completed(record) = claim else {
                panic!("{key:?}: {claim:?}");
            };
            assert_eq!(
                record.body().as_ref(),
                format!("answer of {}", key.as_str()).as_bytes()
            );
        }
        until_running(&b, false, "the watcher stops").await;
        drop_table(&a).await;
    }

    /// A waiter dropped mid-wait (its request cancelled) takes its key off the watch: the
    /// watcher stops and sends nothing more.
    #[tokio::test]
    async fn a_cancelled_wait_leaves_nothing_watched() {
        let Some((a, b)) = instances("watch_cancel").await else {
            return;
        };
        let key = StoreKey::new(&Scope::anonymous(), "cancelled");
        let fingerprint = Fingerprint::from_bytes([6; 32]);
        acquire(&a, &key, &fingerprint).await;
        let waiter = waiter(&b, &key, fingerprint, Duration::from_secs(60));
        until_running(&b, true, "the wait starts a watcher").await;
        waiter.abort();
        let _ = waiter.await;
        until_running(&b, false, "the watcher stops with its last waiter").await;
        assert!(watch_of(&b).shared.lock().keys.is_empty());
        drop_table(&a).await;
    }

    /// A watcher whose runtime shuts down (a store kept across runtimes, as tests and
    /// short-lived tools do) is not counted as running: its subscriptions end, and the next
    /// wait, on another runtime, starts a watcher of its own.
    #[test]
    fn a_watcher_dropped_with_its_runtime_is_started_again() {
        let Ok(url) = std::env::var("MYSQL_URL") else {
            eprintln!("skipped: MYSQL_URL not set");
            return;
        };
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pool = {
            let _context = first.enter();
            sqlx::mysql::MySqlPoolOptions::new()
                .connect_lazy(&url)
                .expect("MYSQL_URL")
        };
        let watch = MySqlWatch::new(pool, "`watch_dropped`".into(), Arc::new(Wakeups::default()));
        // Started, never polled: the runtime goes before the task's first look.
        let subscription = first
            .block_on(watch.subscribe("k"))
            .expect("a watcher starts");
        assert!(watch.running());
        drop(first);
        assert!(
            !watch.running(),
            "a task dropped with its runtime does not run"
        );
        assert!(!subscription.alive(), "its subscriptions end");
        drop(subscription);
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        second.block_on(async {
            let again = watch.subscribe("k").await.expect("a watcher starts again");
            assert!(watch.running() && again.alive());
        });
    }

    /// A waiter through the store's `wait`, on another instance than the holder, with a
    /// release there: it wakes and takes the key (a takeover or a release is a change of
    /// holder too).
    #[tokio::test]
    async fn a_release_on_another_instance_hands_the_key_to_a_waiter_here() {
        let Some((a, b)) = instances("watch_release").await else {
            return;
        };
        let key = StoreKey::new(&Scope::anonymous(), "released-elsewhere");
        let fingerprint = Fingerprint::from_bytes([4; 32]);
        let token = acquire(&a, &key, &fingerprint).await;
        let waiter = waiter(&b, &key, fingerprint, Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.release(&key, token).await.unwrap();
        let claim = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiter ends")
            .unwrap()
            .unwrap();
        assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
        drop_table(&a).await;
    }
}
