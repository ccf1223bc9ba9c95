//! The store contract for one key as a pure state machine: what a key holds ([`Slot`]) and
//! how each store operation changes it, at a given moment.
//!
//! This is the reference the rest of the crate is measured against:
//!
//! - [`MemoryStore`](crate::MemoryStore) executes these functions under its shard locks;
//! - a store of your own can execute them too, over whatever keeps its slots (see
//!   `examples/custom_store.rs`): it then needs only to load a key's slot, apply one
//!   function, and write the slot back atomically;
//! - the protocol model (`model/` in the repository, checked with `stateright`) runs the
//!   very same functions against crashed instances, paused owners, late commands and lost
//!   replies, so the model cannot drift from the store;
//! - the Redis, PostgreSQL and MySQL stores implement the same transitions in Lua and SQL,
//!   and the conformance suite ties them to it.
//!
//! Every function takes the slot and "now" by the store's clock, and changes the slot only
//! when the contract says so. The diagram (`docs/protocol.md`):
//!
//! ```text
//!             claim                 commit                 lease ends / release
//!   Free ───────────────▶ Held ───────────────▶ Held+committed ─────────────────▶ outcome unknown
//!     ▲                   │  │                    │        │                          │
//!     │ release, revoke,  │  │ complete           │ revoke │ complete                 │ settle
//!     │ takeover, expiry  │  ▼                    ▼        ▼                          ▼
//!     └───────────────────┘ Completed ◀──────── (Free)  Completed ◀─────────────── Completed
//! ```
//!
//! ```
//! use std::time::Duration;
//! use tower_idempotency::store::machine::{self, Claimed, Slot};
//! use tower_idempotency::store::{Fingerprint, LeaseToken};
//!
//! // Time as milliseconds on any clock: a `u64` is a `Moment`.
//! let lease = Duration::from_millis(100);
//! let fp = Fingerprint::from_bytes([7; 32]);
//! let (a, b) = (LeaseToken::new(), LeaseToken::new());
//! let mut slot: Slot<&str, u64> = Slot::Free;
//!
//! assert_eq!(machine::claim(&mut slot, 0, &fp, a, lease), Claimed::Acquired);
//! assert!(matches!(machine::claim(&mut slot, 10, &fp, b, lease), Claimed::InFlight { .. }));
//! machine::complete(&mut slot, 20, a, "201 Created", Duration::from_secs(60)).unwrap();
//! assert_eq!(machine::claim(&mut slot, 30, &fp, b, lease), Claimed::Completed("201 Created"));
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Claim, KeyState, LeaseToken, ORPHAN_RETENTION, StoreError, takeover_grace};
use crate::fingerprint::Fingerprint;
use crate::record::Record;

/// A point in time on a store's clock: what the state machine needs of it.
///
/// Implemented for tokio's and std's `Instant`, for `SystemTime`, and for `u64` read as
/// milliseconds since any epoch (a store that keeps integer timestamps, or a model checker
/// that counts ticks).
pub trait Moment: Copy + Ord + fmt::Debug {
    /// `self + d`, saturating rather than overflowing.
    fn after(self, d: Duration) -> Self;
    /// How long from `self` until `later` (zero if `later` is not later).
    fn until(self, later: Self) -> Duration;
}

impl Moment for tokio::time::Instant {
    fn after(self, d: Duration) -> Self {
        crate::time::add(self, d)
    }
    fn until(self, later: Self) -> Duration {
        later.saturating_duration_since(self)
    }
}

impl Moment for std::time::Instant {
    fn after(self, d: Duration) -> Self {
        let d = super::clamp_duration(d);
        self.checked_add(d).unwrap_or(self)
    }
    fn until(self, later: Self) -> Duration {
        later.saturating_duration_since(self)
    }
}

impl Moment for SystemTime {
    fn after(self, d: Duration) -> Self {
        let d = super::clamp_duration(d);
        self.checked_add(d).unwrap_or(self)
    }
    fn until(self, later: Self) -> Duration {
        later.duration_since(self).unwrap_or_default()
    }
}

impl Moment for u64 {
    fn after(self, d: Duration) -> Self {
        let ms = u64::try_from(super::clamp_duration(d).as_millis()).unwrap_or(u64::MAX);
        self.saturating_add(ms)
    }
    fn until(self, later: Self) -> Duration {
        Duration::from_millis(later.saturating_sub(self))
    }
}

/// What a store holds under one key. `R` is the stored outcome (an `Arc<Record>` in the
/// crate's stores, anything `Clone` in a model), `T` the store's clock ([`Moment`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Slot<R, T> {
    /// Nothing: a claim acquires the key.
    #[default]
    Free,
    /// A claim holds the key.
    Held(Held<T>),
    /// The operation ran and its outcome is kept until `expires_at`.
    Completed {
        /// The stored outcome.
        record: R,
        /// When it stops being replayed.
        expires_at: T,
    },
}

/// A claim on a key ([`Slot::Held`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Held<T> {
    /// The token that owns the claim.
    pub token: LeaseToken,
    /// The fingerprint of the request that claimed.
    pub fingerprint: Fingerprint,
    /// When the lease ends. A lapsed lease only lets another claim contest, then take over,
    /// the key: until one does, the owner still owns it.
    pub lease_until: T,
    /// A claim found the lease lapsed and gave the owner [`takeover_grace`] to show it is
    /// alive; the next claim after that takes the key over.
    pub contested: bool,
    /// Past its commit point: kept until then, never taken over nor released.
    pub committed_until: Option<T>,
}

/// The answer to a claim ([`claim`]), the store's [`Claim`] without its storage types.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Claimed<R> {
    /// The caller's token owns the key now.
    Acquired,
    /// Another claim holds the key.
    InFlight {
        /// Its request's fingerprint.
        fingerprint: Fingerprint,
        /// How long its lease (or the grace of a contest) still runs.
        lease_remaining: Duration,
    },
    /// The operation ran: its outcome.
    Completed(R),
    /// The operation passed its commit point, its owner is gone, no outcome is stored.
    OutcomeUnknown {
        /// The committing request's fingerprint.
        fingerprint: Fingerprint,
        /// The committing token (a recovery that finds nothing ran revokes with it).
        token: LeaseToken,
    },
}

impl Claimed<Arc<Record>> {
    /// The store's [`Claim`], given the token the caller claimed with.
    pub fn into_claim(self, token: LeaseToken) -> Claim {
        match self {
            Self::Acquired => Claim::Acquired(token),
            Self::InFlight {
                fingerprint,
                lease_remaining,
            } => Claim::InFlight {
                fingerprint,
                lease_remaining: Some(lease_remaining),
            },
            Self::Completed(record) => Claim::Completed(record),
            Self::OutcomeUnknown { fingerprint, token } => {
                Claim::OutcomeUnknown { fingerprint, token }
            }
        }
    }
}

/// Why an operation that needs the key's owner changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refused {
    /// The token does not own the key ([`StoreError::LeaseLost`]).
    LeaseLost,
    /// A release of a committed claim: its lease ended, nothing else changed
    /// ([`StoreError::Committed`]).
    Committed,
}

impl From<Refused> for StoreError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::LeaseLost => StoreError::LeaseLost,
            Refused::Committed => StoreError::Committed,
        }
    }
}

impl<R, T: Moment> Slot<R, T> {
    /// The claim `token` owns here, if it owns one (by token alone: a lapsed lease that no
    /// claim took over is still owned).
    pub fn owned_by(&mut self, token: LeaseToken) -> Option<&mut Held<T>> {
        match self {
            Slot::Held(held) if held.token == token => Some(held),
            _ => None,
        }
    }

    /// When the slot may be forgotten (swept) as if it were free: a record when it expires,
    /// a committed claim when its commit ends (or its lease, if later), another claim
    /// [`ORPHAN_RETENTION`] after its lease, so that its owner can still store its outcome.
    /// `None` for a free slot.
    pub fn gone_at(&self) -> Option<T> {
        match self {
            Slot::Free => None,
            Slot::Held(Held {
                committed_until: Some(until),
                lease_until,
                ..
            }) => Some((*until).max(*lease_until)),
            Slot::Held(held) => Some(held.lease_until.after(ORPHAN_RETENTION)),
            Slot::Completed { expires_at, .. } => Some(*expires_at),
        }
    }
}

/// What a claim at `now` answers without changing the slot, if it changes nothing: a live
/// claim or record, or a committed claim whose outcome is unknown. `None` when the claim
/// would write (acquire, contest or take over). Lets a store answer replays and duplicates
/// under a read lock.
pub fn peek<R: Clone, T: Moment>(slot: &Slot<R, T>, now: T) -> Option<Claimed<R>> {
    match slot {
        Slot::Free => None,
        Slot::Completed { record, expires_at } => {
            (*expires_at > now).then(|| Claimed::Completed(record.clone()))
        }
        Slot::Held(held) if held.lease_until > now => Some(Claimed::InFlight {
            fingerprint: held.fingerprint,
            lease_remaining: now.until(held.lease_until),
        }),
        Slot::Held(Held {
            committed_until: Some(until),
            fingerprint,
            token,
            ..
        }) if *until > now => Some(Claimed::OutcomeUnknown {
            fingerprint: *fingerprint,
            token: *token,
        }),
        Slot::Held(_) => None,
    }
}

/// [`IdempotencyStore::claim`](super::IdempotencyStore::claim): acquires a free or expired
/// key for `token`, contests a lapsed lease (the first claim to find it lapsed gives the
/// owner [`takeover_grace`]), takes over a contested one whose grace ran out, and otherwise
/// answers what the key holds.
pub fn claim<R: Clone, T: Moment>(
    slot: &mut Slot<R, T>,
    now: T,
    fingerprint: &Fingerprint,
    token: LeaseToken,
    lease: Duration,
) -> Claimed<R> {
    if let Some(answer) = peek(slot, now) {
        return answer;
    }
    if let Slot::Held(
        held @ Held {
            contested: false,
            committed_until: None,
            ..
        },
    ) = slot
    {
        let grace = takeover_grace(lease);
        held.contested = true;
        held.lease_until = now.after(grace);
        return Claimed::InFlight {
            fingerprint: held.fingerprint,
            lease_remaining: grace,
        };
    }
    *slot = Slot::Held(Held {
        token,
        fingerprint: *fingerprint,
        lease_until: now.after(lease),
        contested: false,
        committed_until: None,
    });
    Claimed::Acquired
}

/// [`IdempotencyStore::complete`](super::IdempotencyStore::complete): stores `record` for
/// `ttl` when `token` owns the key; otherwise hands the record back, changing nothing
/// (the token lost its lease).
pub fn complete<R, T: Moment>(
    slot: &mut Slot<R, T>,
    now: T,
    token: LeaseToken,
    record: R,
    ttl: Duration,
) -> Result<(), R> {
    if slot.owned_by(token).is_none() {
        return Err(record);
    }
    *slot = Slot::Completed {
        record,
        expires_at: now.after(ttl),
    };
    Ok(())
}

/// [`IdempotencyStore::release`](super::IdempotencyStore::release): frees the key `token`
/// owns; a committed claim is not freed, its lease ends now ([`Refused::Committed`]).
pub fn release<R, T: Moment>(
    slot: &mut Slot<R, T>,
    now: T,
    token: LeaseToken,
) -> Result<(), Refused> {
    let held = slot.owned_by(token).ok_or(Refused::LeaseLost)?;
    if held.committed_until.is_some() {
        held.lease_until = held.lease_until.min(now);
        return Err(Refused::Committed);
    }
    *slot = Slot::Free;
    Ok(())
}

/// [`IdempotencyStore::revoke`](super::IdempotencyStore::revoke): frees the key `token`
/// owns, committed or not.
pub fn revoke<R, T: Moment>(slot: &mut Slot<R, T>, token: LeaseToken) -> Result<(), Refused> {
    slot.owned_by(token).ok_or(Refused::LeaseLost)?;
    *slot = Slot::Free;
    Ok(())
}

/// [`IdempotencyStore::commit`](super::IdempotencyStore::commit): marks the claim `token`
/// owns as past its commit point, kept at least `ttl` from now (a second commit never
/// shortens the first), and clears a contest.
pub fn commit<R, T: Moment>(
    slot: &mut Slot<R, T>,
    now: T,
    token: LeaseToken,
    ttl: Duration,
) -> Result<(), Refused> {
    let held = slot.owned_by(token).ok_or(Refused::LeaseLost)?;
    let until = now.after(ttl);
    held.contested = false;
    held.committed_until = Some(held.committed_until.map_or(until, |u| u.max(until)));
    Ok(())
}

/// [`IdempotencyStore::extend`](super::IdempotencyStore::extend): the lease `token` owns
/// runs `lease` from now, and a contest is cleared (the owner showed it is alive).
pub fn extend<R, T: Moment>(
    slot: &mut Slot<R, T>,
    now: T,
    token: LeaseToken,
    lease: Duration,
) -> Result<(), Refused> {
    let held = slot.owned_by(token).ok_or(Refused::LeaseLost)?;
    held.lease_until = now.after(lease);
    held.contested = false;
    Ok(())
}

/// [`IdempotencyStore::settle`](super::IdempotencyStore::settle): gives a key whose outcome
/// is unknown its outcome, kept for `ttl` but never less than the commit was still kept.
/// Hands the record back, changing nothing, in any other state.
pub fn settle<R, T: Moment>(
    slot: &mut Slot<R, T>,
    now: T,
    record: R,
    ttl: Duration,
) -> Result<(), R> {
    let kept_until = match slot {
        Slot::Held(Held {
            lease_until,
            committed_until: Some(until),
            ..
        }) if *lease_until <= now && *until > now => *until,
        _ => return Err(record),
    };
    *slot = Slot::Completed {
        record,
        expires_at: now.after(ttl).max(kept_until),
    };
    Ok(())
}

/// [`IdempotencyStore::purge`](super::IdempotencyStore::purge): empties the slot; whether it
/// held anything not yet gone.
pub fn purge<R, T: Moment>(slot: &mut Slot<R, T>, now: T) -> bool {
    let was = slot.gone_at().is_some_and(|at| at > now);
    *slot = Slot::Free;
    was
}

/// [`IdempotencyStore::inspect`](super::IdempotencyStore::inspect): what the slot holds at
/// `now`.
pub fn inspect<T: Moment>(slot: &Slot<Arc<Record>, T>, now: T) -> KeyState {
    match slot {
        Slot::Free => KeyState::Free,
        Slot::Completed { record, expires_at } if *expires_at > now => KeyState::Completed {
            record: Arc::clone(record),
            expires_in: Some(now.until(*expires_at)),
        },
        Slot::Completed { .. } => KeyState::Free,
        Slot::Held(held) => {
            if held.lease_until <= now
                && let Some(until) = held.committed_until
            {
                if until > now {
                    KeyState::OutcomeUnknown {
                        fingerprint: held.fingerprint,
                        expires_in: Some(now.until(until)),
                    }
                } else {
                    KeyState::Free
                }
            } else if slot.gone_at().is_some_and(|at| at <= now) {
                KeyState::Free
            } else {
                KeyState::InFlight {
                    fingerprint: held.fingerprint,
                    lease_remaining: now.until(held.lease_until),
                    committed: held.committed_until.is_some(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(100);
    const TTL: Duration = Duration::from_millis(10_000);

    fn fp(n: u8) -> Fingerprint {
        Fingerprint::from_bytes([n; 32])
    }

    #[test]
    fn a_lapsed_lease_is_contested_then_taken_over() {
        let (a, b) = (LeaseToken::new(), LeaseToken::new());
        let mut slot: Slot<u8, u64> = Slot::Free;
        assert_eq!(claim(&mut slot, 0, &fp(1), a, LEASE), Claimed::Acquired);
        // Lapsed: the first claim contests and gives the owner half a lease.
        assert_eq!(
            claim(&mut slot, 100, &fp(2), b, LEASE),
            Claimed::InFlight {
                fingerprint: fp(1),
                lease_remaining: Duration::from_millis(50)
            }
        );
        assert!(matches!(
            claim(&mut slot, 149, &fp(2), b, LEASE),
            Claimed::InFlight { .. }
        ));
        assert_eq!(claim(&mut slot, 150, &fp(2), b, LEASE), Claimed::Acquired);
        assert_eq!(complete(&mut slot, 151, a, 1, TTL), Err(1));
        assert_eq!(complete(&mut slot, 151, b, 2, TTL), Ok(()));
    }

    #[test]
    fn an_extend_ends_a_contest() {
        let (a, b) = (LeaseToken::new(), LeaseToken::new());
        let mut slot: Slot<u8, u64> = Slot::Free;
        claim(&mut slot, 0, &fp(1), a, LEASE);
        claim(&mut slot, 100, &fp(2), b, LEASE);
        extend(&mut slot, 120, a, LEASE).unwrap();
        assert!(matches!(
            claim(&mut slot, 220, &fp(2), b, LEASE),
            Claimed::InFlight { .. }
        ));
    }

    #[test]
    fn a_committed_claim_is_never_taken_over_and_reads_as_unknown() {
        let (a, b) = (LeaseToken::new(), LeaseToken::new());
        let mut slot: Slot<u8, u64> = Slot::Free;
        claim(&mut slot, 0, &fp(1), a, LEASE);
        commit(&mut slot, 10, a, TTL).unwrap();
        assert_eq!(release(&mut slot, 20, a), Err(Refused::Committed));
        for now in [20, 500, 5_000] {
            assert_eq!(
                claim(&mut slot, now, &fp(1), b, LEASE),
                Claimed::OutcomeUnknown {
                    fingerprint: fp(1),
                    token: a
                }
            );
        }
        // Settling keeps it at least as long as the commit was kept.
        assert_eq!(
            settle(&mut slot, 6_000, 9, Duration::from_millis(1)),
            Ok(())
        );
        assert_eq!(slot.gone_at(), Some(10_010));
        assert_eq!(settle(&mut slot, 6_000, 9, TTL), Err(9));
    }

    #[test]
    fn a_revoked_commit_frees_the_key_and_a_late_commit_changes_nothing() {
        let (a, b) = (LeaseToken::new(), LeaseToken::new());
        let mut slot: Slot<u8, u64> = Slot::Free;
        claim(&mut slot, 0, &fp(1), a, LEASE);
        revoke(&mut slot, a).unwrap();
        assert_eq!(commit(&mut slot, 5, a, TTL), Err(Refused::LeaseLost));
        assert_eq!(slot, Slot::Free);
        assert_eq!(claim(&mut slot, 6, &fp(1), b, LEASE), Claimed::Acquired);
    }

    #[test]
    fn moments_saturate() {
        assert_eq!(u64::MAX.after(Duration::MAX), u64::MAX);
        assert_eq!(5u64.until(3), Duration::ZERO);
        let now = std::time::Instant::now();
        assert!(now.after(Duration::MAX) > now);
        let now = SystemTime::now();
        assert!(now.after(Duration::MAX) > now);
        assert_eq!(now.until(now - Duration::from_secs(1)), Duration::ZERO);
    }
}
