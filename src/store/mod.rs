//! The store protocol every backend implements, and the backends.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub mod list;
pub mod machine;
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub mod memory;
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub mod mysql;
pub use list::{
    Cursor, ListFilter, ListPage, ListedKey, StateFilter, VacuumPage, list_all, vacuum_all,
};
mod open;
pub use open::{OpenError, OpenOptions, open, open_with, redact_password};

// What a store of your own works with, in one place.
pub use crate::fingerprint::Fingerprint;
pub use crate::key::StoreKey;
pub use crate::record::Record;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "encryption")]
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub mod sealed;
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod sql;
#[cfg(any(feature = "redis", feature = "postgres", feature = "mysql"))]
mod wakeup;

/// A lease token: proof of ownership of an in-flight claim.
///
/// Every successful claim carries a fresh token; [`IdempotencyStore::complete`],
/// [`IdempotencyStore::release`] and [`IdempotencyStore::extend`] only act when the token
/// still owns the claim, so an owner whose lease ran out cannot overwrite the work of the
/// owner after it (fencing).
///
/// Held as two 64-bit halves (high, low), not one `u128`: a `u128` is aligned to 16 bytes,
/// and every structure that holds a token (each in-flight entry of the memory store's map,
/// the claims and futures of a request) would be padded to a multiple of 16 for it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken([u64; 2]);

impl LeaseToken {
    /// A fresh token, unique within the process and, with overwhelming probability,
    /// across processes: 64 random bits drawn once per process, and 64 bits that are a
    /// bijective mix of a number no other call in the process gets with 64 more random
    /// bits. Cheaper than asking the operating system for randomness on every claim; and
    /// the number comes from a block of numbers the calling thread holds, so worker threads
    /// making tokens side by side write no shared cache line for each.
    pub fn new() -> Self {
        use std::cell::Cell;
        use std::sync::OnceLock;
        use std::sync::atomic::AtomicU64;
        static SEED: OnceLock<u128> = OnceLock::new();
        static BLOCKS: AtomicU64 = AtomicU64::new(0);
        thread_local! {
            static RANGE: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
        }
        let seed = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u128());
        let n = RANGE.with(|range| crate::numbers::next_from(&BLOCKS, range));
        // splitmix64's finaliser: a bijection, so distinct counters give distinct tokens.
        let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Self::from_u128(seed ^ u128::from(z))
    }

    const fn from_u128(n: u128) -> Self {
        Self([(n >> 64) as u64, n as u64])
    }

    const fn as_u128(self) -> u128 {
        ((self.0[0] as u128) << 64) | self.0[1] as u128
    }

    /// A token from its 16 bytes (as a backend stored them).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self::from_u128(u128::from_be_bytes(bytes))
    }

    /// The token's 16 bytes.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.as_u128().to_be_bytes()
    }

    /// The token as 32 hexadecimal digits.
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.as_u128())
    }

    /// Parses the 32 hexadecimal digits written by [`LeaseToken::to_hex`].
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Self::from_u128)
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Both ends: the high bits are the process's seed, the low bits differ per token.
        write!(
            f,
            "LeaseToken({:08x}…{:08x})",
            (self.0[0] >> 32) as u32,
            self.0[1] as u32
        )
    }
}

/// How long a store keeps a claim whose lease ran out and that nobody took over, so that
/// its owner, back from a store outage, can still store the outcome: one hour.
///
/// Past this, a store may reclaim the space of such a claim (as if a new claim had taken
/// it over). The layer gives up storing an outcome well before: it retries a failing
/// `complete` for ten minutes.
pub const ORPHAN_RETENTION: Duration = Duration::from_secs(3600);

pub use crate::time::{MAX_DURATION, clamp_duration};

/// How long a lapsed lease is contested before a claim takes the key over: half the lease
/// (at least 1 ms).
///
/// The first claim that finds a lease lapsed does not take the key: it marks the claim
/// contested, answers [`Claim::InFlight`], and gives the owner this long to show it is alive
/// (an `extend` clears the mark; a `complete` settles the key). Only a claim after that
/// takes the key over. An owner cut off by a store outage longer than its lease thus gets
/// the first word once the store is back, instead of racing the retries of its own
/// clients; a crashed owner blocks its key for about one and a half leases.
pub fn takeover_grace(lease: Duration) -> Duration {
    (clamp_duration(lease) / 2).max(Duration::from_millis(1))
}

/// The answer to a claim.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Claim {
    /// The key was free: the caller owns it until its lease ends, and must complete or
    /// release it with this token.
    Acquired(LeaseToken),
    /// Another request holds the key.
    InFlight {
        /// The fingerprint of the request that holds it.
        fingerprint: Fingerprint,
        /// How long its lease still runs, if the store knows.
        lease_remaining: Option<Duration>,
    },
    /// The operation already ran: here is its outcome.
    Completed(Arc<Record>),
    /// The operation passed its commit point ([`IdempotencyStore::commit`]), its owner is
    /// gone (its lease lapsed or it let go), and no outcome was stored: it must not run
    /// again, and what it answered is not known until the key is settled
    /// ([`IdempotencyStore::settle`]).
    OutcomeUnknown {
        /// The fingerprint of the request that committed.
        fingerprint: Fingerprint,
        /// The token that committed (and still owns the key): a recovery that finds the
        /// operation never made its effects withdraws the commit with it
        /// ([`IdempotencyStore::revoke`]), so that a retry can run.
        token: LeaseToken,
    },
}

/// What a store holds under a key, as [`IdempotencyStore::inspect`] reports it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum KeyState {
    /// Nothing: a claim would acquire the key.
    Free,
    /// An operation holds the key.
    InFlight {
        /// The fingerprint of the request that holds it.
        fingerprint: Fingerprint,
        /// How long its lease still runs (zero once it lapsed: a claim may then take an
        /// uncommitted key over, see [`takeover_grace`]).
        lease_remaining: Duration,
        /// Whether the operation passed its commit point.
        committed: bool,
    },
    /// The operation ran and its outcome is stored (a tombstone when
    /// [`Record::is_tombstone`]).
    Completed {
        /// The stored outcome.
        record: Arc<Record>,
        /// How long it is still kept, if the store knows.
        expires_in: Option<Duration>,
    },
    /// The operation passed its commit point and its owner is gone without an outcome
    /// (see [`Claim::OutcomeUnknown`]); [`IdempotencyStore::settle`] gives it one.
    OutcomeUnknown {
        /// The fingerprint of the request that committed.
        fingerprint: Fingerprint,
        /// How long the key is still kept, if the store knows.
        expires_in: Option<Duration>,
    },
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Free => f.write_str("free"),
            Self::InFlight {
                lease_remaining,
                committed,
                ..
            } => write!(
                f,
                "in flight{}, lease {:.3}s left",
                if *committed { ", committed" } else { "" },
                lease_remaining.as_secs_f64()
            ),
            Self::Completed { record, expires_in } => {
                if record.is_tombstone() {
                    write!(
                        f,
                        "completed (tombstone), status {}",
                        record.status().as_u16()
                    )?;
                } else {
                    write!(
                        f,
                        "completed, status {}, {} body bytes",
                        record.status().as_u16(),
                        record.body().len()
                    )?;
                }
                if let Some(left) = expires_in {
                    write!(f, ", kept {:.0}s more", left.as_secs_f64())?;
                }
                Ok(())
            }
            Self::OutcomeUnknown { expires_in, .. } => {
                f.write_str("outcome unknown (committed, no stored outcome)")?;
                if let Some(left) = expires_in {
                    write!(f, ", kept {:.0}s more", left.as_secs_f64())?;
                }
                Ok(())
            }
        }
    }
}

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The token no longer owns the claim: its lease ran out and the key was released,
    /// completed or claimed again. Nothing was changed.
    #[error("the lease on this idempotency key was lost")]
    LeaseLost,
    /// The backend could not be reached or failed.
    #[error("idempotency store backend failed")]
    Backend(#[source] Box<dyn StdError + Send + Sync + 'static>),
    /// A stored record could not be decoded.
    #[error("stored idempotency record is damaged")]
    Decode(#[source] crate::record::DecodeError),
    /// The store did not answer within the layer's bound
    /// ([`IdempotencyLayer::store_timeout`](crate::IdempotencyLayer::store_timeout)); the
    /// call may still take effect.
    #[error("idempotency store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store has no room for a new claim without forgetting records it promised to
    /// keep (see [`MemoryStoreBuilder::min_retention`](crate::MemoryStoreBuilder::min_retention)),
    /// so it refused the claim and changed nothing. The layer answers `503 store-full` with
    /// `Retry-After`, whatever the store-failure policy: nothing ran, and running
    /// unprotected could run a duplicate.
    #[error("idempotency store is full: no room for a new claim")]
    Full,
    /// The claim passed its commit point ([`IdempotencyStore::commit`]), so it cannot be
    /// released: the key stays taken, and its owner's token can still complete it. Answered
    /// by [`IdempotencyStore::release`]; the release ended the owner's lease.
    #[error("the idempotency key passed its commit point and cannot be released")]
    Committed,
    /// The store does not offer this operation (the default of
    /// [`IdempotencyStore::list`] and [`IdempotencyStore::vacuum`] for stores that do not
    /// implement them). Nothing was changed.
    #[error("this idempotency store does not support `{operation}`")]
    Unsupported {
        /// The operation: `"list"` or `"vacuum"`.
        operation: &'static str,
    },
}

impl StoreError {
    /// Wraps a backend's error.
    pub fn backend(err: impl StdError + Send + Sync + 'static) -> Self {
        Self::Backend(Box::new(err))
    }

    /// Whether the store refused the table name it was given (PostgreSQL's or MySQL's
    /// `InvalidTableName`): a mistake in its configuration, not a failure of the store.
    /// Always `false` for the other stores.
    ///
    /// ```
    /// use tower_idempotency::StoreError;
    ///
    /// assert!(!StoreError::Full.is_invalid_table_name());
    /// ```
    pub fn is_invalid_table_name(&self) -> bool {
        #[cfg(any(feature = "postgres", feature = "mysql"))]
        {
            let mut source: Option<&(dyn StdError + 'static)> = Some(self);
            while let Some(err) = source {
                if err.is::<sql::InvalidTableName>() {
                    return true;
                }
                source = err.source();
            }
        }
        false
    }
}

/// Where idempotency records live.
///
/// The layer calls it once per covered request ([`claim`](Self::claim)), once when the
/// operation ends ([`complete`](Self::complete) or [`release`](Self::release)), and while a
/// long operation runs ([`extend`](Self::extend)). Every implementation must guarantee:
///
/// - **Atomic claim**: of any number of concurrent claims of one key, exactly one is
///   [`Claim::Acquired`] until it completes, releases, or its lease runs out.
/// - **Caller-made tokens**: the caller brings the [`LeaseToken`] with the claim, and an
///   acquired claim is owned by exactly that token. So a caller whose claim reply was lost
///   (a timeout, a dropped connection, a client gone) can still release the claim it may
///   have made.
/// - **Fencing by token, not by clock**: `complete`, `release` and `extend` act when the
///   token still owns the key, and otherwise change nothing and return
///   [`StoreError::LeaseLost`]. A lease that ran out only lets *another claim* take the key
///   over; until one does, the owner can still complete, release or extend it. Judge the
///   lease deadline by one clock (the server's, for a shared store), and keep a lapsed,
///   untaken claim for at least [`ORPHAN_RETENTION`] before reclaiming its space.
/// - **Contested takeover**: the first claim that finds a lease lapsed only marks it
///   contested and answers [`Claim::InFlight`]; a claim made [`takeover_grace`] later takes
///   the key over, unless the owner extended (which clears the mark) or settled it.
/// - **Commit points**: a claim marked committed ([`commit`](Self::commit)) is never taken
///   over and never released: while its lease runs it reads as in flight, after that (or
///   once its owner let go with `release`) as [`Claim::OutcomeUnknown`], until its owner
///   completes it, an operator or a recovery settles it ([`settle`](Self::settle), which
///   never shortens how long the key is kept), or its TTL ends.
/// - **Revocation**: [`revoke`](Self::revoke) with the owner's token frees the key, commit
///   point included, and a later `commit` with that token changes nothing; the layer uses
///   it for a commit it was not told succeeded, and when a recovery hook finds the
///   operation never ran ([`Claim::OutcomeUnknown`] names the committing token for that).
/// - **Expiry**: a completed record lives for its TTL, a claim for its lease; expired
///   entries are invisible to `claim` and are reclaimed without an external job.
/// - **Fidelity**: a record is returned exactly as it was completed.
/// - **Operations**: a key's state can be read ([`inspect`](Self::inspect)) and removed
///   ([`purge`](Self::purge)).
///
/// The layer bounds every call in time
/// ([`store_timeout`](crate::IdempotencyLayer::store_timeout)) and treats a call that
/// overran as failed, so a store need not bound its calls itself.
///
/// The `conformance` feature provides a test suite that checks all of this for any store.
///
/// The trait is object safe: the layer holds an `Arc<dyn IdempotencyStore>`.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for a request with `fingerprint`, for `lease`, if it is free or its
    /// holder's lease ran out. An acquired claim is owned by `token`, which the answer
    /// carries back ([`Claim::Acquired`]).
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError>;

    /// Stores the outcome of the operation that holds `key` with `token`; the record lives
    /// for `ttl`. Once the key holds a record, `token` owns nothing: another `complete` is
    /// [`StoreError::LeaseLost`], except that a store may answer `Ok` to a repeat of the
    /// very same record (a retry whose first reply was lost), changing nothing.
    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Frees `key` held with `token`, so that a retry may run the operation.
    ///
    /// A committed claim is not freed: its lease ends now (it reads as
    /// [`Claim::OutcomeUnknown`] from then on), `token` still owns it (a later `complete`
    /// stores), and the answer is [`StoreError::Committed`].
    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError>;

    /// Marks the claim on `key` held with `token` as past its commit point: its effects
    /// are (or are about to be) made, so it must never run again. From then on the key is
    /// never released nor taken over; it is kept for `ttl` (or until its lease ends, if
    /// later) unless completed or settled, and then freed like an expired record.
    /// Committing twice is the same as once. [`StoreError::LeaseLost`] when `token` does
    /// not own the key.
    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Withdraws the claim on `key` held with `token`, its commit point included: frees the
    /// key whether or not it was committed, so that a retry may run the operation. For a
    /// commit the layer was not told succeeded (its reply was lost, or it timed out while
    /// its command may still land), and for a recovery that found the operation never made
    /// its effects. [`StoreError::LeaseLost`], changing nothing, when `token` does not own
    /// the key (another claim took it, or it holds a record).
    ///
    /// Since it is fenced by the token, a `commit` with the same token that lands after it
    /// finds nothing to commit and changes nothing.
    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError>;

    /// Gives a key whose outcome is unknown ([`Claim::OutcomeUnknown`]) its outcome:
    /// stores `record` for `ttl`, as `complete` would have, but never for less than the
    /// commit was still to be kept: settling never shortens a key's retention. Answers whether it stored it:
    /// `false`, changing nothing, when the key is in any other state (free, in flight with
    /// a live lease, completed, or committed but still owned by a live lease).
    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// What the store holds under `key`.
    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError>;

    /// Removes whatever the store holds under `key` (a record, a claim, a committed key) and
    /// answers whether there was anything. Meant for operators: purging a key whose
    /// operation ran lets a retry run it again.
    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError>;

    /// One page of the keys the store holds that match `filter`, from `cursor` (`None`:
    /// from the start); the page's [`next`](ListPage::next) continues, `None` when the
    /// walk is over. See [the `list` module](mod@crate::store::list) for the walk.
    ///
    /// A call reads at most [`ListFilter::page_size`] keys, so its page may hold fewer
    /// matches, even none, with more to come. Keys claimed or removed during a walk may or
    /// may not be listed; a key present for the whole walk is listed (on Redis, possibly
    /// twice: `SCAN` may return a key again). Expired entries are never listed.
    ///
    /// The default answers [`StoreError::Unsupported`]: a store of your own lists nothing
    /// until it implements this.
    async fn list(
        &self,
        filter: &ListFilter,
        cursor: Option<&Cursor>,
    ) -> Result<ListPage, StoreError> {
        let _ = (filter, cursor);
        Err(StoreError::Unsupported { operation: "list" })
    }

    /// Removes now, in one bounded step of at most about `batch` entries, what has expired
    /// (exactly what the store's own expiry reclaims, and nothing [`claim`](Self::claim)
    /// could see: see [the `list` module](mod@crate::store::list#what-vacuum-removes)), from `cursor` (`None`: from
    /// the start); the answer's [`next`](VacuumPage::next) continues, `None` when done.
    ///
    /// The default answers [`StoreError::Unsupported`].
    async fn vacuum(
        &self,
        cursor: Option<&Cursor>,
        batch: usize,
    ) -> Result<VacuumPage, StoreError> {
        let _ = (cursor, batch);
        Err(StoreError::Unsupported {
            operation: "vacuum",
        })
    }

    /// A short name for the backend, used as a label by the `metrics` feature. Default:
    /// `"custom"`.
    fn backend_name(&self) -> &'static str {
        "custom"
    }

    /// The embedded [`MemoryStore`](crate::MemoryStore) this store is, if it is one (also
    /// behind an `Arc`), so that the layer calls it directly, without a boxed future per
    /// call. Every other store keeps the default, `None`.
    #[cfg(feature = "memory")]
    #[doc(hidden)]
    fn as_memory_store(&self) -> Option<&memory::MemoryStore> {
        None
    }

    /// Extends the lease on `key` held with `token` to `lease` from now.
    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError>;

    /// Waits up to `timeout` for `key` to stop being in flight, then claims it with `token`.
    ///
    /// Returns [`Claim::Completed`] when the operation finished, [`Claim::Acquired`] when it
    /// was released (the caller now owns the key and must run the operation), or
    /// [`Claim::InFlight`] when the time ran out. The default polls [`claim`](Self::claim)
    /// with a growing pause (5 ms doubling up to 250 ms); the stores of this crate replace
    /// it: the memory store and, within a process, every shared store wake their waiters
    /// directly; Redis (pub/sub) and PostgreSQL (`LISTEN`/`NOTIFY`) wake those of other
    /// instances too; MySQL, which has no push channel, looks at every waited-on key of a
    /// process in one statement per millisecond while anyone waits (polling from 1 ms
    /// growing by half up to 100 ms if that fails).
    async fn wait(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
        timeout: Duration,
    ) -> Result<Claim, StoreError> {
        let deadline = crate::time::deadline_after(timeout);
        let mut pause = Duration::from_millis(5);
        loop {
            let claim = self.claim(key, fingerprint, token, lease).await?;
            let now = tokio::time::Instant::now();
            if !matches!(claim, Claim::InFlight { .. }) || now >= deadline {
                return Ok(claim);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }
}

#[async_trait]
impl<S: IdempotencyStore + ?Sized> IdempotencyStore for Arc<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        (**self).claim(key, fingerprint, token, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        (**self).complete(key, token, record, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        (**self).release(key, token).await
    }

    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        (**self).revoke(key, token).await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        (**self).extend(key, token, lease).await
    }

    async fn wait(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
        timeout: Duration,
    ) -> Result<Claim, StoreError> {
        (**self).wait(key, fingerprint, token, lease, timeout).await
    }

    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        (**self).commit(key, token, ttl).await
    }

    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        (**self).settle(key, record, ttl).await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        (**self).inspect(key).await
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        (**self).purge(key).await
    }

    async fn list(
        &self,
        filter: &ListFilter,
        cursor: Option<&Cursor>,
    ) -> Result<ListPage, StoreError> {
        (**self).list(filter, cursor).await
    }

    async fn vacuum(
        &self,
        cursor: Option<&Cursor>,
        batch: usize,
    ) -> Result<VacuumPage, StoreError> {
        (**self).vacuum(cursor, batch).await
    }

    fn backend_name(&self) -> &'static str {
        (**self).backend_name()
    }

    #[cfg(feature = "memory")]
    fn as_memory_store(&self) -> Option<&memory::MemoryStore> {
        (**self).as_memory_store()
    }
}

/// Runs one store call, giving up after `timeout` with [`StoreError::Timeout`].
pub(crate) async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout_at(crate::time::deadline_after(timeout), call).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

/// Displays an error with its sources.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn StdError + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_round_trip() {
        let a = LeaseToken::new();
        assert_ne!(a, LeaseToken::new());
        let many: std::collections::HashSet<_> = (0..10_000).map(|_| LeaseToken::new()).collect();
        assert_eq!(many.len(), 10_000);
        assert_eq!(LeaseToken::from_bytes(a.to_bytes()), a);
        assert_eq!(LeaseToken::from_hex(&a.to_hex()), Some(a));
        assert_eq!(LeaseToken::from_hex("zz"), None);
    }

    /// Tokens stored by an earlier version (as bytes in SQL, as hex in Redis) read back as
    /// the same token: the bytes are big-endian, high half first, whatever the token holds
    /// them as.
    #[test]
    fn a_tokens_stored_forms_are_unchanged() {
        let bytes: [u8; 16] = std::array::from_fn(|i| i as u8 + 1);
        let token = LeaseToken::from_bytes(bytes);
        assert_eq!(token.to_bytes(), bytes);
        assert_eq!(token.to_hex(), "0102030405060708090a0b0c0d0e0f10");
        assert_eq!(
            LeaseToken::from_hex("0102030405060708090a0b0c0d0e0f10"),
            Some(token)
        );
        assert_eq!(format!("{token:?}"), "LeaseToken(01020304…0d0e0f10)");
        // Eight-byte aligned: an entry that holds one is not padded to 16.
        assert_eq!(std::mem::align_of::<LeaseToken>(), 8);
    }

    /// Threads take tokens from blocks of their own: no two threads, and no two calls of a
    /// thread across the end of its block, ever get the same token.
    #[test]
    fn tokens_made_on_many_threads_never_repeat() {
        let per_thread = 3 * crate::numbers::BLOCK as usize + 7;
        let tokens: Vec<LeaseToken> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(move || {
                        (0..per_thread)
                            .map(|_| LeaseToken::new())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().expect("a thread"))
                .collect()
        });
        let distinct: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(distinct.len(), 8 * per_thread);
    }

    #[test]
    fn token_debug_tells_tokens_apart() {
        let (a, b) = (LeaseToken::new(), LeaseToken::new());
        assert_ne!(format!("{a:?}"), format!("{b:?}"));
    }
}
