//! Waiters woken by PostgreSQL `LISTEN`/`NOTIFY`: a duplicate about to wait marks the
//! in-flight row (`waiters`), the statements that end a marked row (`complete`, `release`,
//! `revoke`, `settle`, `purge`) send `pg_notify` on the table's channel with the key's
//! SHA-256, and one listener per store, on a connection of its own, wakes the waiters of
//! that key. Rows nobody waits on send nothing, so completions take no notification lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::{oneshot, watch};

use crate::key::StoreKey;
use crate::store::StoreError;
use crate::store::wakeup::{Push, Subscription, Wakeups};

/// How long a waiter waits for the listener to be listening before it polls instead.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(1);

/// The channel of a table: its name's hash, so any table name makes a valid, short
/// channel, the same on every instance.
pub(super) fn channel_of(table: &str) -> String {
    format!(
        "tower_idempotency_{:016x}",
        xxhash_rust::xxh3::xxh3_64(table.as_bytes())
    )
}

/// How a key is named on the channel (and in [`Wakeups`]): its SHA-256 in hex, as the
/// statements compute it.
pub(super) fn name_of(key: &StoreKey) -> String {
    let digest = Sha256::digest(key.as_str().as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// The listener of one store (shared by its clones).
pub(super) struct PgPush {
    pool: PgPool,
    channel: String,
    /// The statement that marks an in-flight row as waited on.
    mark: Arc<str>,
    pub(super) wakeups: Arc<Wakeups>,
    listener: Mutex<Option<Listener>>,
}

struct Listener {
    alive: Arc<AtomicBool>,
    /// `None` while connecting, then whether it listens; `Some(false)` once it stopped.
    state: watch::Receiver<Option<bool>>,
    /// Dropped with the store: stops the listener.
    _stop: oneshot::Sender<()>,
}

impl PgPush {
    pub(super) fn new(pool: PgPool, channel: String, mark: Arc<str>) -> Self {
        Self {
            pool,
            channel,
            mark,
            wakeups: Arc::default(),
            listener: Mutex::new(None),
        }
    }

    fn listener(&self) -> (Arc<AtomicBool>, watch::Receiver<Option<bool>>) {
        let mut listener = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = &*listener
            && *running.state.borrow() != Some(false)
        {
            return (Arc::clone(&running.alive), running.state.clone());
        }
        let alive = Arc::new(AtomicBool::new(false));
        let (state_tx, state) = watch::channel(None);
        let (stop, stopped) = oneshot::channel();
        // A pool of its own, with the user's connection options: the listener holds its
        // connection for good, and must not take one of the store's.
        let own = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(LISTEN_TIMEOUT)
            .connect_lazy_with((*self.pool.connect_options()).clone());
        tokio::spawn(listen(
            own,
            self.channel.clone(),
            Arc::clone(&self.wakeups),
            Arc::clone(&alive),
            state_tx,
            stopped,
        ));
        *listener = Some(Listener {
            alive: Arc::clone(&alive),
            state: state.clone(),
            _stop: stop,
        });
        (alive, state)
    }
}

#[async_trait]
impl Push for PgPush {
    async fn subscribe(&self, _name: &str) -> Option<Subscription> {
        let (alive, mut state) = self.listener();
        let listening = tokio::time::timeout(LISTEN_TIMEOUT, state.wait_for(Option::is_some))
            .await
            .ok()?
            .ok()
            .is_some_and(|state| *state == Some(true));
        listening.then(|| Subscription::new(alive, None))
    }

    async fn announce(&self, key: &StoreKey) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(Arc::clone(&self.mark)))
            .bind(key.as_str())
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(())
    }
}

async fn listen(
    pool: PgPool,
    channel: String,
    wakeups: Arc<Wakeups>,
    alive: Arc<AtomicBool>,
    state: watch::Sender<Option<bool>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let started = async {
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(&channel).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    let mut listener = match tokio::time::timeout(LISTEN_TIMEOUT, started).await {
        Ok(Ok(listener)) => listener,
        _ => {
            tracing::debug!("the PostgreSQL listener could not start; waiters poll");
            state.send_replace(Some(false));
            return;
        }
    };
    alive.store(true, Ordering::SeqCst);
    state.send_replace(Some(true));
    loop {
        let received = {
            let next = std::pin::pin!(listener.try_recv());
            match futures_util::future::select(next, &mut stopped).await {
                futures_util::future::Either::Left((received, _)) => received,
                // The store is gone.
                futures_util::future::Either::Right(_) => break,
            }
        };
        match received {
            Ok(Some(notification)) => wakeups.wake(notification.payload()),
            // The connection was lost (and made again, listening): what came meanwhile is
            // lost, so every waiter looks.
            Ok(None) => wakeups.wake_all(),
            Err(err) => {
                tracing::debug!(error = %err, "the PostgreSQL listener failed; waiters poll");
                break;
            }
        }
    }
    alive.store(false, Ordering::SeqCst);
    state.send_replace(Some(false));
    wakeups.wake_all();
}
