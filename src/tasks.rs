//! Detached work: what the layer finishes after the response future is gone (a body drained
//! for a client that left, a record stored after its response ended, a claim released),
//! tracked so that a graceful shutdown can wait for it.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Inner {
    pending: AtomicUsize,
    idle: Notify,
}

/// A handle on the work an [`IdempotencyLayer`](crate::IdempotencyLayer) finishes in the
/// background, for a graceful shutdown.
///
/// Some work outlives the response future: the rest of an operation whose client went away
/// ([`Disconnect::Finish`](crate::policy::Disconnect::Finish)), the record of a response
/// whose last bytes already left, a retried completion during a store outage, the release
/// of a claim. If the runtime stops first, that work is lost: the client may have its
/// answer while the record was never written, and a retry on another instance runs the
/// operation again. Stop accepting requests, then wait for this work before the runtime
/// ends:
///
/// ```no_run
/// use std::time::Duration;
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// # async fn run() -> std::io::Result<()> {
/// let layer = IdempotencyLayer::new(MemoryStore::new());
/// let work = layer.detached_work();
/// let app: Router = Router::new()
///     .route("/orders", post(|| async { "created" }))
///     .layer(layer);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// axum::serve(listener, app)
///     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
///     .await?;
/// // The server has stopped; finish what the layer still has in hand.
/// if let Err(unfinished) = work.shutdown(Duration::from_secs(10)).await {
///     eprintln!("{unfinished}");
/// }
/// # Ok(())
/// # }
/// ```
///
/// Every clone of the layer, and every layer derived from it with a setter, shares the
/// same handle.
#[derive(Clone, Default)]
pub struct DetachedWork {
    inner: Arc<Inner>,
}

impl fmt::Debug for DetachedWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetachedWork")
            .field("pending", &self.pending())
            .finish()
    }
}

/// Detached work was still running when [`DetachedWork::shutdown`]'s deadline passed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pending} piece(s) of idempotency work were still running at the shutdown deadline")]
#[non_exhaustive]
pub struct Unfinished {
    /// How many pieces of work were still running.
    pub pending: usize,
}

/// Decrements the count when the tracked future ends, is dropped, or panics.
struct Track(Arc<Inner>);

impl Drop for Track {
    fn drop(&mut self) {
        if self.0.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl DetachedWork {
    /// How many pieces of detached work are running now.
    ///
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::default();
    /// assert_eq!(layer.detached_work().pending(), 0);
    /// ```
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::Acquire)
    }

    /// Resolves once no detached work is running.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.pending() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Waits up to `within` for every piece of detached work to finish; call it after the
    /// server stopped taking requests, before the runtime ends. Fails with how much was
    /// still running at the deadline.
    pub async fn shutdown(&self, within: Duration) -> Result<(), Unfinished> {
        match tokio::time::timeout_at(crate::time::deadline_after(within), self.idle()).await {
            Ok(()) => Ok(()),
            Err(_) => Err(Unfinished {
                pending: self.pending(),
            }),
        }
    }

    /// Runs `fut` on a task of the current runtime, tracked. Without a runtime, nothing
    /// runs, and the reason is logged.
    pub(crate) fn spawn(&self, what: &'static str, fut: impl Future<Output = ()> + Send + 'static) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                work = what,
                "no Tokio runtime to finish idempotency work on; a claim it held ends with its lease"
            );
            return;
        };
        self.inner.pending.fetch_add(1, Ordering::AcqRel);
        let track = Track(Arc::clone(&self.inner));
        handle.spawn(async move {
            let _track = track;
            fut.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_tracked_work() {
        let work = DetachedWork::default();
        work.spawn("test", tokio::time::sleep(Duration::from_secs(5)));
        assert_eq!(work.pending(), 1);
        assert_eq!(
            work.shutdown(Duration::from_secs(1)).await,
            Err(Unfinished { pending: 1 })
        );
        assert_eq!(work.shutdown(Duration::from_secs(10)).await, Ok(()));
        assert_eq!(work.pending(), 0);
    }

    #[tokio::test]
    async fn a_panicking_task_is_no_longer_pending() {
        let work = DetachedWork::default();
        work.spawn("test", async { panic!("boom") });
        work.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}
