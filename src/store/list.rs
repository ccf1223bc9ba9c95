//! Walking a whole store: [`IdempotencyStore::list`] and [`IdempotencyStore::vacuum`], a page
//! at a time.
//!
//! Both are operator calls (the `idempotency-keys` tool's `list` and `vacuum`), never on a
//! request's path. They walk the store in pages: each call does a bounded amount of work
//! (one page of rows, one `SCAN` step) and answers a [`Cursor`] to continue from, so a
//! store with a million keys never loads them into memory at once, and never holds a
//! lock or a table for long.
//!
//! ```no_run
//! use tower_idempotency::store::{Cursor, IdempotencyStore, ListFilter, StateFilter};
//!
//! # async fn run(store: &dyn IdempotencyStore) -> Result<(), tower_idempotency::StoreError> {
//! // Every key whose outcome is unknown, a page at a time.
//! let filter = ListFilter::new().states(StateFilter::OUTCOME_UNKNOWN);
//! let mut cursor: Option<Cursor> = None;
//! loop {
//!     let page = store.list(&filter, cursor.as_ref()).await?;
//!     for listed in &page.entries {
//!         println!("{} {}", listed.key, listed.state);
//!     }
//!     match page.next {
//!         Some(next) => cursor = Some(next),
//!         None => break,
//!     }
//! }
//!
//! // Remove what has expired now, instead of waiting for the store's own sweep.
//! let mut cursor = None;
//! let mut removed = 0;
//! loop {
//!     let page = store.vacuum(cursor.as_ref(), 1000).await?;
//!     removed += page.removed;
//!     match page.next {
//!         Some(next) => cursor = Some(next),
//!         None => break,
//!     }
//! }
//! println!("removed {removed} expired entries");
//! # Ok(())
//! # }
//! ```
//!
//! # What `vacuum` removes
//!
//! Exactly what the store's own expiry would reclaim: a completed record past its TTL, a
//! committed key without an outcome past the TTL it was committed for, and a claim whose
//! lease lapsed more than [`ORPHAN_RETENTION`](super::ORPHAN_RETENTION) ago and that nobody
//! took over (until then its owner may still store its outcome). All of these are
//! invisible to [`claim`](IdempotencyStore::claim) already: vacuuming reclaims space, it
//! never changes what a request sees. A live record, a claim in flight and a committed key
//! still kept are never removed.

use std::fmt;
use std::time::Duration;

use super::{IdempotencyStore, KeyState, StoreKey};

/// Which states [`IdempotencyStore::list`] lists: any union of the three constants.
/// Default: all of them.
///
/// ```
/// use tower_idempotency::store::StateFilter;
///
/// let stuck = StateFilter::IN_FLIGHT | StateFilter::OUTCOME_UNKNOWN;
/// assert!(stuck.contains(StateFilter::IN_FLIGHT));
/// assert!(!stuck.contains(StateFilter::COMPLETED));
/// assert_eq!(StateFilter::default(), StateFilter::ALL);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateFilter(u8);

impl StateFilter {
    /// Claims whose operation runs (their lease is live, or lapsed and not taken over yet),
    /// committed or not.
    pub const IN_FLIGHT: Self = Self(1);
    /// Committed operations whose owner is gone without an outcome
    /// ([`KeyState::OutcomeUnknown`]): they wait for a settle.
    pub const OUTCOME_UNKNOWN: Self = Self(2);
    /// Stored outcomes (tombstones included).
    pub const COMPLETED: Self = Self(4);
    /// Every state.
    pub const ALL: Self = Self(7);
    /// No state: lists nothing.
    pub const NONE: Self = Self(0);

    /// Whether every state of `other` is in this filter.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `state` is one of this filter's states (a free key never is).
    pub fn admits(self, state: &KeyState) -> bool {
        match state {
            KeyState::Free => false,
            KeyState::InFlight { .. } => self.contains(Self::IN_FLIGHT),
            KeyState::OutcomeUnknown { .. } => self.contains(Self::OUTCOME_UNKNOWN),
            KeyState::Completed { .. } => self.contains(Self::COMPLETED),
        }
    }
}

impl Default for StateFilter {
    fn default() -> Self {
        Self::ALL
    }
}

impl std::ops::BitOr for StateFilter {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for StateFilter {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for StateFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (Self::IN_FLIGHT, "in-flight"),
            (Self::OUTCOME_UNKNOWN, "outcome-unknown"),
            (Self::COMPLETED, "completed"),
        ]
        .into_iter()
        .filter(|(s, _)| self.contains(*s))
        .map(|(_, n)| n)
        .collect();
        write!(f, "StateFilter({})", names.join(" | "))
    }
}

/// What [`IdempotencyStore::list`] lists, and how much one call reads.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::store::{ListFilter, StateFilter};
///
/// // Stored outcomes that leave the store within the hour, 500 keys read per call.
/// let filter = ListFilter::new()
///     .states(StateFilter::COMPLETED)
///     .expires_within(Duration::from_secs(3600))
///     .page_size(500);
/// assert_eq!(filter.page_size_or_default(), 500);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListFilter {
    states: StateFilter,
    expires_within: Option<Duration>,
    page_size: usize,
}

impl Default for ListFilter {
    fn default() -> Self {
        Self::new()
    }
}

impl ListFilter {
    /// How many keys one call reads by default: 100.
    pub const DEFAULT_PAGE_SIZE: usize = 100;

    /// Every state, any remaining life, pages of [`DEFAULT_PAGE_SIZE`](Self::DEFAULT_PAGE_SIZE).
    pub const fn new() -> Self {
        Self {
            states: StateFilter::ALL,
            expires_within: None,
            page_size: Self::DEFAULT_PAGE_SIZE,
        }
    }

    /// Only keys in these states. Default: [`StateFilter::ALL`].
    ///
    /// ```
    /// use tower_idempotency::store::{ListFilter, StateFilter};
    /// let filter = ListFilter::new().states(StateFilter::IN_FLIGHT);
    /// ```
    pub const fn states(mut self, states: StateFilter) -> Self {
        self.states = states;
        self
    }

    /// Only keys the store forgets within `d` ([`ListedKey::expires_in`] at most `d`): a
    /// record or a committed key within `d` of the end of its retention, a claim within `d`
    /// of the end of its lease (zero once it lapsed). Keys whose remaining life the store
    /// does not know are left out. Default: no limit.
    ///
    /// Records carry no creation time; with one TTL for every record, "stored at least `a`
    /// ago" is "expires within `ttl − a`" (what the `idempotency-keys` tool's
    /// `--older-than` does).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::store::ListFilter;
    /// let filter = ListFilter::new().expires_within(Duration::from_secs(600));
    /// ```
    pub const fn expires_within(mut self, d: Duration) -> Self {
        self.expires_within = Some(d);
        self
    }

    /// How many keys one call reads at most (at least 1). The page a call answers holds
    /// those of them that match: fewer, possibly none, with more to come. Default:
    /// [`DEFAULT_PAGE_SIZE`](Self::DEFAULT_PAGE_SIZE).
    ///
    /// ```
    /// use tower_idempotency::store::ListFilter;
    /// assert_eq!(ListFilter::new().page_size(0).page_size_or_default(), 1);
    /// ```
    pub const fn page_size(mut self, n: usize) -> Self {
        self.page_size = n;
        self
    }

    /// The page size, at least 1.
    pub const fn page_size_or_default(&self) -> usize {
        if self.page_size == 0 {
            1
        } else {
            self.page_size
        }
    }

    /// The states listed.
    pub const fn state_filter(&self) -> StateFilter {
        self.states
    }

    /// The remaining-life limit, if any.
    pub const fn expires_within_limit(&self) -> Option<Duration> {
        self.expires_within
    }

    /// Whether a key in `state` is listed: the test every store applies to what it read.
    ///
    /// ```
    /// use tower_idempotency::store::{KeyState, ListFilter};
    /// assert!(!ListFilter::new().matches(&KeyState::Free));
    /// ```
    pub fn matches(&self, state: &KeyState) -> bool {
        if !self.states.admits(state) {
            return false;
        }
        match self.expires_within {
            None => true,
            Some(limit) => expires_in(state).is_some_and(|left| left <= limit),
        }
    }
}

/// How long the store keeps `state`: see [`ListedKey::expires_in`].
fn expires_in(state: &KeyState) -> Option<Duration> {
    match state {
        KeyState::Free => None,
        KeyState::InFlight {
            lease_remaining, ..
        } => Some(*lease_remaining),
        KeyState::Completed { expires_in, .. } | KeyState::OutcomeUnknown { expires_in, .. } => {
            *expires_in
        }
    }
}

/// Where the next call of [`IdempotencyStore::list`] or [`IdempotencyStore::vacuum`]
/// continues: opaque text, meaningful only to the store (and the call) that answered it.
///
/// It can be shown and given back (an operator resuming a long walk), but a cursor
/// made up or taken from another store may skip keys or start over.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Cursor(String);

impl Cursor {
    /// A cursor from its text (as [`as_str`](Self::as_str) gave it).
    ///
    /// ```
    /// use tower_idempotency::store::Cursor;
    /// assert_eq!(Cursor::new("anon:k").as_str(), "anon:k");
    /// ```
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The cursor's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cursor({:?})", self.0)
    }
}

/// A key that [`IdempotencyStore::list`] found, and what it holds.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ListedKey {
    /// The key, as the store keeps it.
    pub key: StoreKey,
    /// What it holds (never [`KeyState::Free`]).
    pub state: KeyState,
}

impl ListedKey {
    /// A listed key (for stores of your own).
    pub fn new(key: StoreKey, state: KeyState) -> Self {
        Self { key, state }
    }

    /// How long the store still keeps it, if the store knows: a record's or a committed
    /// key's remaining retention, a claim's remaining lease (zero once it lapsed).
    pub fn expires_in(&self) -> Option<Duration> {
        expires_in(&self.state)
    }
}

/// One page of [`IdempotencyStore::list`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ListPage {
    /// The keys of this page that match the filter, in the store's order.
    pub entries: Vec<ListedKey>,
    /// How many keys the store read for this page (matching or not): progress.
    pub scanned: u64,
    /// Keys of this page whose record could not be read (damaged, written in a newer
    /// format, or sealed under a key this store does not hold): listed apart, whatever the
    /// filter, so that one such record neither hides the others nor fails the walk.
    pub unreadable: Vec<StoreKey>,
    /// Where the next page starts; `None` when the walk is over.
    pub next: Option<Cursor>,
}

impl ListPage {
    /// A page (for stores of your own).
    pub fn new(entries: Vec<ListedKey>, scanned: u64, next: Option<Cursor>) -> Self {
        Self {
            entries,
            scanned,
            unreadable: Vec::new(),
            next,
        }
    }

    /// The same page, with `unreadable` keys (for stores of your own).
    pub fn with_unreadable(mut self, unreadable: Vec<StoreKey>) -> Self {
        self.unreadable = unreadable;
        self
    }
}

/// One step of [`IdempotencyStore::vacuum`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct VacuumPage {
    /// How many expired entries this step removed.
    pub removed: u64,
    /// How many entries this step looked at (removed or not): progress.
    pub scanned: u64,
    /// Where the next step continues; `None` when the store holds no more expired entries
    /// this walk can reach.
    pub next: Option<Cursor>,
}

impl VacuumPage {
    /// A step's report (for stores of your own).
    pub fn new(removed: u64, scanned: u64, next: Option<Cursor>) -> Self {
        Self {
            removed,
            scanned,
            next,
        }
    }
}

/// Lists every page of `store` into one `Vec` (for tests and small stores: a big store is
/// better walked page by page).
///
/// ```no_run
/// use tower_idempotency::store::{list_all, ListFilter};
/// # async fn run(store: tower_idempotency::MemoryStore) -> Result<(), tower_idempotency::StoreError> {
/// let all = list_all(&store, &ListFilter::new()).await?;
/// # Ok(())
/// # }
/// ```
pub async fn list_all<S: IdempotencyStore + ?Sized>(
    store: &S,
    filter: &ListFilter,
) -> Result<Vec<ListedKey>, super::StoreError> {
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.list(filter, cursor.as_ref()).await?;
        all.extend(page.entries);
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(all),
        }
    }
}

/// Vacuums all of `store` and answers how many entries it removed.
///
/// ```no_run
/// use tower_idempotency::store::vacuum_all;
/// # async fn run(store: tower_idempotency::MemoryStore) -> Result<(), tower_idempotency::StoreError> {
/// let removed = vacuum_all(&store, 1000).await?;
/// # Ok(())
/// # }
/// ```
pub async fn vacuum_all<S: IdempotencyStore + ?Sized>(
    store: &S,
    batch: usize,
) -> Result<u64, super::StoreError> {
    let mut removed = 0;
    let mut cursor = None;
    loop {
        let page = store.vacuum(cursor.as_ref(), batch).await?;
        removed += page.removed;
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(removed),
        }
    }
}
