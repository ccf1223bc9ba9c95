//! Instant arithmetic that cannot overflow, whatever duration a user configured.

use std::time::Duration;

use tokio::time::Instant;

const FAR: Duration = MAX_DURATION;

/// The longest duration the crate works with: ten years.
///
/// Every duration setting of [`IdempotencyLayer`](crate::IdempotencyLayer) (lease, TTL,
/// `Retry-After`, store timeout, the wait of [`InFlight::Wait`](crate::policy::InFlight))
/// is clamped to it when set, and every store of this crate clamps the leases, TTLs and
/// timeouts it is given to it, so `Duration::MAX` means "ten years" everywhere: long enough
/// to mean "forever" for an idempotency key, short enough that every clock and every store
/// can add it to "now" without overflow. A store of your own should do the same
/// ([`clamp_duration`]).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `d`, or [`MAX_DURATION`] if it is longer.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::store::{MAX_DURATION, clamp_duration};
/// assert_eq!(clamp_duration(Duration::MAX), MAX_DURATION);
/// assert_eq!(clamp_duration(Duration::from_secs(5)), Duration::from_secs(5));
/// ```
pub const fn clamp_duration(d: Duration) -> Duration {
    if d.as_secs() >= MAX_DURATION.as_secs() {
        MAX_DURATION
    } else {
        d
    }
}

/// `now + after`, saturating at [`MAX_DURATION`] from now.
pub(crate) fn deadline_after(after: Duration) -> Instant {
    add(Instant::now(), after)
}

/// `at + after`, saturating at [`MAX_DURATION`] after `at`.
pub(crate) fn add(at: Instant, after: Duration) -> Instant {
    at.checked_add(after.min(FAR))
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

/// The first pause of [`retry`]: 50 ms.
pub(crate) const FIRST_PAUSE: Duration = Duration::from_millis(50);

/// The one retry shape of the crate: runs `attempt` at once, then again after a jittered
/// pause that doubles from [`FIRST_PAUSE`] up to `max_pause`, until it breaks with a value
/// (answered as `Some`) or the next attempt would start past `until` (`None`).
pub(crate) async fn retry<T, F, Fut>(
    until: Instant,
    max_pause: Duration,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::ops::ControlFlow<T>>,
{
    let mut pause = FIRST_PAUSE;
    loop {
        if let std::ops::ControlFlow::Break(done) = attempt().await {
            return Some(done);
        }
        let wait = jittered(pause);
        if deadline_after(wait) >= until {
            return None;
        }
        tokio::time::sleep(wait).await;
        pause = (pause * 2).min(max_pause.max(FIRST_PAUSE));
    }
}

/// A pause of `base` with up to a quarter of it added at random, so that many tasks that
/// failed together do not retry together.
pub(crate) fn jittered(base: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A randomly keyed hasher is a cheap source of a few random bits.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    let base = base.min(FAR);
    let quarter = base / 4;
    let nanos = u64::try_from(quarter.as_nanos()).unwrap_or(u64::MAX);
    base + Duration::from_nanos(if nanos == 0 { 0 } else { h.finish() % nanos })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_overflows() {
        let now = Instant::now();
        assert!(add(now, Duration::MAX) > now);
        assert!(deadline_after(Duration::MAX) > now);
        assert_eq!(
            add(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let j = jittered(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(100) && j <= Duration::from_millis(125));
        }
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}
