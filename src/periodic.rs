//! Background tasks that run while their owner lives: the stores' sweepers and the lease
//! keeper.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Starts, once per `started` flag, a task that calls `tick` on `owner` every `interval`
/// and ends as soon as the owner has been dropped (the task holds only a `Weak`).
///
/// Without a Tokio runtime nothing starts, and the next call tries again.
pub(crate) fn start_once<T, F, Fut>(
    started: &AtomicBool,
    owner: &Arc<T>,
    interval: Duration,
    tick: F,
) where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    if started.load(Ordering::Relaxed) || started.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        started.store(false, Ordering::Release);
        return;
    };
    let owner: Weak<T> = Arc::downgrade(owner);
    handle.spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            match owner.upgrade() {
                Some(owner) => tick(owner).await,
                None => return,
            }
        }
    });
}
