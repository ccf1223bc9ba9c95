//! Background tasks that run while their owner lives: the stores' sweepers and the lease
//! keeper.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Clears the "started" flag when the task ends in any way: its owner was dropped, or its
/// runtime shut down and dropped it (the case that matters: the next call starts it again
/// on the runtime that is current then).
struct Running(Weak<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(started) = self.0.upgrade() {
            started.store(false, Ordering::Release);
        }
    }
}

/// Starts, unless one is running, a task that calls `tick` on `owner` every `interval` and
/// ends as soon as the owner has been dropped (the task holds only a `Weak`).
///
/// A task whose runtime shut down counts as not running, so a layer or store used from a
/// second runtime starts its task again there. Without a Tokio runtime nothing starts, and
/// the next call tries again.
pub(crate) fn ensure_running<T, F, Fut>(
    started: &Arc<AtomicBool>,
    owner: &Arc<T>,
    interval: Duration,
    tick: F,
) where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    if started.load(Ordering::Acquire) || started.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        started.store(false, Ordering::Release);
        return;
    };
    let owner: Weak<T> = Arc::downgrade(owner);
    let running = Running(Arc::downgrade(started));
    handle.spawn(async move {
        let _running = running;
        loop {
            tokio::time::sleep(interval).await;
            match owner.upgrade() {
                Some(owner) => tick(owner).await,
                None => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn a_task_that_died_with_its_runtime_starts_again() {
        let started = Arc::new(AtomicBool::new(false));
        let ticks = Arc::new(AtomicUsize::new(0));
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        for round in 1..=2 {
            runtime().block_on(async {
                ensure_running(&started, &ticks, Duration::from_millis(5), |t| {
                    t.fetch_add(1, Ordering::SeqCst);
                    std::future::ready(())
                });
                let before = ticks.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert!(ticks.load(Ordering::SeqCst) > before, "round {round} ticks");
            });
            // The runtime is gone, and its task with it.
            assert!(!started.load(Ordering::SeqCst));
        }
    }
}
