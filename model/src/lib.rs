//! The idempotency protocol of `tower-idempotency`, as a model that `stateright` checks
//! exhaustively within bounds.
//!
//! **What is modelled.** One key, one store, and a few *requests* carrying that key, each on
//! an instance of its own (a client's retry is another request). A request does what the
//! layer does, step by step (`src/flow.rs`, `src/claim.rs`, `src/handle.rs`): it claims; if
//! it acquires, its handler declares its commit point (a separate `commit`, or one written
//! inside the application's transaction) and makes its effect, then the layer stores the
//! answer (`complete`, retried), or frees the key (`release`), or withdraws a commit the
//! handler was told failed (`revoke`); a lost completion stores the answer if the key is
//! free again; the lease keeper extends the lease meanwhile; a request that finds the key
//! committed with no outcome asks the recovery hook, which settles the answer, says the
//! operation never ran (the commit is revoked and the request runs), or does not know.
//!
//! **The store is not modelled: it is executed.** Every store operation is
//! [`tower_idempotency::store::machine`], the transitions the memory store runs, on a slot
//! whose clock is a tick counter.
//!
//! **Faults**, each within a budget: a request crashes at any step (its commands already
//! sent may still land); a store call times out while its command was applied (the reply
//! is lost) or is still on the wire, landing at any later step or never; the owner of a
//! claim pauses while the store's clock moves on past its lease.
//!
//! **Properties** ([`ProtocolModel::properties`]): the effect happens at most once; no two
//! different answers are ever given as the key's outcome; no stored answer says "failed"
//! for an operation whose effect was made; nothing is bound to a key by a request whose
//! handler was told its commit failed; a stored answer is never replaced; and once every
//! request ended, a client that comes back gets an answer or an `outcome-unknown` handed to
//! the recovery hook within a few leases, never 409 forever.
//!
//! [`Rules::before_hardening`] restores the two rules the layer had before commits in doubt
//! were handled, and the checker finds both known bugs with them (`tests/protocol.rs`).

use std::fmt;
use std::time::Duration;

use stateright::{Model, Property};
use tower_idempotency::store::machine::{self, Claimed, Refused, Slot};
use tower_idempotency::store::{Fingerprint, LeaseToken};

/// The lease, in ticks of the store's clock (one tick is one millisecond to the machine).
pub const LEASE: Duration = Duration::from_millis(2);
/// The record TTL and the commit's retention: longer than any run of the model.
pub const TTL: Duration = Duration::from_millis(1_000);

/// What an operation answers. The record stored for a key is `(answer, request)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Answer {
    /// The handler failed before its effect (it was told its commit point failed).
    Failed,
    /// The operation made its effect.
    Done,
}

/// A stored record: the answer, and which request stored it.
pub type Stored = (Answer, u8);

/// How the handler declares its commit point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Commit {
    /// `IdempotencyClaim::commit()`, a store call of its own, then the effect.
    Separate,
    /// `commit_in(&mut tx)`: the commit point and the effect in one database transaction,
    /// which commits only if the token still owns the key.
    InTransaction,
}

/// The rules the layer follows where it had a bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rules {
    /// A commit whose call failed (timed out) is withdrawn with `revoke` when the operation
    /// ends, holding the key meanwhile. Before: the key was released as if uncommitted, and
    /// a release refused as committed stored the handler's error answer.
    pub withdraw_commits_in_doubt: bool,
    /// The error answer of an operation whose commit point was written in its transaction
    /// is never stored: the key is let go, so that if the transaction committed, retries go
    /// to the recovery hook. Before: it was stored, as for a confirmed commit.
    pub recover_transactions_in_doubt: bool,
}

impl Rules {
    /// The layer's rules today.
    pub const CURRENT: Rules = Rules {
        withdraw_commits_in_doubt: true,
        recover_transactions_in_doubt: true,
    };

    /// The rules before commits in doubt were handled (the layer before `e41c107`).
    pub const fn before_hardening() -> Rules {
        Rules {
            withdraw_commits_in_doubt: false,
            recover_transactions_in_doubt: false,
        }
    }
}

/// What the application's recovery hook answers for a key committed without an outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// As the documentation of `Recovery::NeverRan` asks: the answer when the effect is
    /// found; `NeverRan` when it is not and the committing instance is gone; otherwise
    /// "unknown".
    AsDocumented,
    /// A misuse: `NeverRan` whenever the effect is not found, though its owner may only be
    /// paused between its commit point and its effect.
    NeverRanWhenNotFound,
}

/// The bounds and the variant of the protocol to check.
#[derive(Clone, Debug)]
pub struct ProtocolModel {
    /// Requests with the key (instances, and clients' retries).
    pub requests: u8,
    /// Store calls that may time out (reply lost, or command late or lost).
    pub faults: u8,
    /// Requests that may crash.
    pub crashes: u8,
    /// Ticks the store's clock may move on.
    pub ticks: u64,
    /// Whether a fault may lose a reply (the command was applied).
    pub lost_replies: bool,
    /// Whether a fault may hold a command on the wire, to land later or never.
    pub late_commands: bool,
    /// What the application's recovery hook does.
    pub hook: Hook,
    /// How handlers declare their commit point.
    pub commit: Commit,
    /// The layer's rules.
    pub rules: Rules,
}

impl ProtocolModel {
    /// The bounds CI checks: three requests, one fault, one crash, six ticks (three leases).
    pub fn ci(commit: Commit) -> Self {
        Self {
            requests: 3,
            faults: 1,
            crashes: 1,
            ticks: 6,
            lost_replies: true,
            late_commands: true,
            hook: Hook::AsDocumented,
            commit,
            rules: Rules::CURRENT,
        }
    }
}

/// Where a request is in the layer's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pc {
    /// Not sent yet (a client may send it at any time).
    Idle,
    /// About to claim the key.
    Claim,
    /// Its claim timed out: releasing whatever the claim may have made, then answering 503.
    OrphanRelease,
    /// Owns the key; its handler is about to declare its commit point.
    Run,
    /// Its separate commit was confirmed: about to make the effect.
    Effect,
    /// Storing its answer (`complete`, retried while it times out).
    Complete(Answer),
    /// `complete` found the key no longer its own: claims it with a fresh token and stores
    /// the answer if it is free, gives up if another answer is stored.
    StoreIfFree(Answer),
    /// Stores its answer with the fresh token after [`Pc::StoreIfFree`] acquired.
    CompleteFresh(Answer),
    /// Letting the key go after a failure; if the store refuses because the key is
    /// committed, `fallback` is stored instead.
    Release {
        /// What the handler answered.
        answer: Answer,
        /// Whether that answer is stored should the key turn out committed.
        fallback: bool,
    },
    /// Withdrawing a commit it was told failed (`revoke`, retried).
    Withdraw,
    /// Found the key committed without an outcome: asking the recovery hook.
    Recover(u8),
    /// The hook said the committed operation never ran: revoking its commit.
    RecoverRevoke(u8),
    /// The hook found the answer: settling it.
    Settle,
    /// Answered its client.
    Done(Reply),
    /// Its instance crashed.
    Crashed,
}

/// What a request answered its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reply {
    /// The operation ran here and answered this.
    Ran(Answer),
    /// The stored answer, replayed.
    Replayed(Answer),
    /// The recovery hook's answer.
    Recovered(Answer),
    /// 409: another request holds the key.
    InFlight,
    /// 503: the store failed.
    Unavailable,
    /// 500 `outcome-unknown`.
    OutcomeUnknown,
}

/// What the handler was told of its commit point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommitState {
    /// Not declared.
    None,
    /// The store confirmed it.
    Confirmed,
    /// The call failed with a definite `LeaseLost`: nothing was committed.
    Refused,
    /// The call failed otherwise (timed out): it may land yet.
    InDoubt,
    /// Written in the transaction, which reported a failure (it may have committed).
    TransactionFailed,
}

/// One request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// Where it is.
    pub pc: Pc,
    /// What its handler was told of its commit point.
    pub commit: CommitState,
    /// It already withdrew a commit the hook said never ran (it does not ask again).
    pub rerun: bool,
}

/// A store command on the wire: it lands at a later step, or never.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// `claim` with the request's token.
    Claim,
    /// `commit` with the request's token.
    Commit,
    /// The application's transaction: `commit_in` and the effect.
    Transaction,
    /// `complete` with the request's token.
    Complete(Answer),
    /// `extend` with the request's token.
    Extend,
    /// `release` with the request's token.
    Release,
    /// `revoke` with the request's token.
    Revoke,
    /// `revoke` of another request's commit (the recovery hook said it never ran).
    RevokeOf(u8),
    /// `settle` with the hook's answer.
    Settle(Answer),
}

/// The whole system.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The store's clock, in ticks.
    pub now: u64,
    /// What the store holds under the key.
    pub slot: Slot<Stored, u64>,
    /// The requests.
    pub requests: Vec<Request>,
    /// Commands sent whose reply was given up on: `(request, command)`.
    pub wire: Vec<(u8, Command)>,
    /// How many times the operation's effect was made.
    pub effects: u8,
    /// The first record ever stored, and whether another ever replaced it.
    pub first_stored: Option<Stored>,
    /// A stored record was replaced by a different one.
    pub replaced: bool,
    /// Fault budget left.
    pub faults: u8,
    /// Crash budget left.
    pub crashes: u8,
}

/// How a store call goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fate {
    /// Applied, and its reply arrives.
    Answered,
    /// Applied, but the reply is lost: the caller sees a timeout.
    ReplyLost,
    /// Not applied yet: the caller sees a timeout, the command lands later or never.
    Late,
}

/// What can happen next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A request takes its next step; a store call goes as the fate says.
    Step(u8, Fate),
    /// The lease keeper of a request that owns the key extends its lease.
    Heartbeat(u8, Fate),
    /// A command on the wire lands.
    Land(usize),
    /// The store's clock moves on one tick.
    Tick,
    /// A request's instance crashes.
    Crash(u8),
}

/// The token of request `i` (`fresh`: the one `store_if_free` claims with).
pub fn token(i: u8, fresh: bool) -> LeaseToken {
    let mut bytes = [0u8; 16];
    bytes[0] = i + 1;
    bytes[1] = u8::from(fresh);
    LeaseToken::from_bytes(bytes)
}

fn owner_of(t: LeaseToken) -> u8 {
    t.to_bytes()[0] - 1
}

/// Every request carries the same key and the same body.
fn fingerprint() -> Fingerprint {
    Fingerprint::from_bytes([7; 32])
}

/// What a store call answered, when its reply arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
enum StoreReply {
    Claimed(Claimed<Stored>),
    Ok,
    Refused(Refused),
    Settled(bool),
}

impl State {
    /// Applies `command` of request `i` to the store (and to the world, for a transaction).
    fn apply(&mut self, i: u8, command: Command) -> StoreReply {
        let now = self.now;
        let t = token(i, false);
        let before = self.slot.clone();
        let reply = match command {
            Command::Claim => StoreReply::Claimed(machine::claim(
                &mut self.slot,
                now,
                &fingerprint(),
                t,
                LEASE,
            )),
            Command::Commit => refused(machine::commit(&mut self.slot, now, t, TTL)),
            Command::Transaction => {
                // The statement is fenced by the token; if it finds nothing, the
                // application's transaction rolls back and makes no effect.
                let r = machine::commit(&mut self.slot, now, t, TTL);
                if r.is_ok() {
                    self.effects += 1;
                }
                refused(r)
            }
            Command::Complete(a) => match machine::complete(&mut self.slot, now, t, (a, i), TTL) {
                Ok(()) => StoreReply::Ok,
                Err(_) => StoreReply::Refused(Refused::LeaseLost),
            },
            Command::Extend => refused(machine::extend(&mut self.slot, now, t, LEASE)),
            Command::Release => refused(machine::release(&mut self.slot, now, t)),
            Command::Revoke => refused(machine::revoke(&mut self.slot, t)),
            Command::RevokeOf(owner) => {
                refused(machine::revoke(&mut self.slot, token(owner, false)))
            }
            Command::Settle(a) => {
                StoreReply::Settled(machine::settle(&mut self.slot, now, (a, i), TTL).is_ok())
            }
        };
        self.observe(&before);
        reply
    }

    /// The fresh-token calls of `store_if_free`.
    fn apply_fresh(&mut self, i: u8, complete: Option<Answer>) -> StoreReply {
        let now = self.now;
        let t = token(i, true);
        let before = self.slot.clone();
        let reply = match complete {
            None => StoreReply::Claimed(machine::claim(
                &mut self.slot,
                now,
                &fingerprint(),
                t,
                LEASE,
            )),
            Some(a) => match machine::complete(&mut self.slot, now, t, (a, i), TTL) {
                Ok(()) => StoreReply::Ok,
                Err(_) => StoreReply::Refused(Refused::LeaseLost),
            },
        };
        self.observe(&before);
        reply
    }

    /// Keeps the history the properties need: the first record stored, and whether a
    /// stored record was ever replaced by another.
    fn observe(&mut self, before: &Slot<Stored, u64>) {
        if let Slot::Completed { record, .. } = &self.slot {
            match self.first_stored {
                None => self.first_stored = Some(*record),
                Some(first) if first.0 != record.0 => self.replaced = true,
                Some(_) => {}
            }
            if let Slot::Completed { record: old, .. } = before
                && old != record
            {
                self.replaced = true;
            }
        }
    }

    fn is_done(&self, i: u8) -> bool {
        matches!(self.requests[i as usize].pc, Pc::Done(_) | Pc::Crashed)
    }

    /// Whether request `i` holds the key (its lease keeper runs).
    fn holds(&self, i: u8) -> bool {
        matches!(
            self.requests[i as usize].pc,
            Pc::Run | Pc::Effect | Pc::Complete(_) | Pc::Withdraw
        ) && matches!(&self.slot, Slot::Held(h) if h.token == token(i, false))
    }
}

fn refused(r: Result<(), Refused>) -> StoreReply {
    match r {
        Ok(()) => StoreReply::Ok,
        Err(e) => StoreReply::Refused(e),
    }
}

impl ProtocolModel {
    /// The store command request `i` sends at its current step, if its step is a store call.
    fn command(&self, state: &State, i: u8) -> Option<Command> {
        let r = state.requests[i as usize];
        Some(match r.pc {
            Pc::Claim => Command::Claim,
            Pc::OrphanRelease | Pc::Release { .. } => Command::Release,
            Pc::Run => match self.commit {
                Commit::Separate => Command::Commit,
                Commit::InTransaction => Command::Transaction,
            },
            Pc::Complete(a) => Command::Complete(a),
            Pc::Withdraw => Command::Revoke,
            Pc::RecoverRevoke(owner) => Command::RevokeOf(owner),
            Pc::Settle => Command::Settle(Answer::Done),
            _ => return None,
        })
    }

    /// Request `i` takes its step with the store call's reply (`None`: the call timed out).
    fn advance(&self, s: &mut State, i: u8, reply: Option<StoreReply>) {
        let rules = self.rules;
        let mut r = s.requests[i as usize];
        r.pc = match (r.pc, reply) {
            (Pc::Idle, _) => Pc::Claim,

            (Pc::Claim, None) => Pc::OrphanRelease,
            (Pc::Claim, Some(StoreReply::Claimed(c))) => match c {
                Claimed::Acquired => Pc::Run,
                Claimed::Completed((a, _)) => Pc::Done(Reply::Replayed(a)),
                Claimed::InFlight { .. } => Pc::Done(Reply::InFlight),
                Claimed::OutcomeUnknown { token, .. } if !r.rerun => Pc::Recover(owner_of(token)),
                Claimed::OutcomeUnknown { .. } => Pc::Done(Reply::OutcomeUnknown),
            },
            (Pc::Claim, Some(_)) => unreachable!("a claim answers a claim"),
            (Pc::OrphanRelease, None) => Pc::OrphanRelease,
            (Pc::OrphanRelease, Some(_)) => Pc::Done(Reply::Unavailable),

            // The handler's commit point.
            (Pc::Run, Some(StoreReply::Ok)) => {
                r.commit = CommitState::Confirmed;
                match self.commit {
                    Commit::Separate => Pc::Effect,
                    // The effect was made in the same transaction.
                    Commit::InTransaction => Pc::Complete(Answer::Done),
                }
            }
            (Pc::Run, reply) => {
                // Told the commit failed: the handler answers an error, with no effect.
                r.commit = match (self.commit, reply) {
                    (Commit::InTransaction, _) => CommitState::TransactionFailed,
                    (Commit::Separate, Some(_)) => CommitState::Refused,
                    (Commit::Separate, None) => CommitState::InDoubt,
                };
                match r.commit {
                    CommitState::InDoubt if rules.withdraw_commits_in_doubt => Pc::Withdraw,
                    // Before: counted as committed, so its error answer was stored.
                    CommitState::TransactionFailed if !rules.recover_transactions_in_doubt => {
                        Pc::Complete(Answer::Failed)
                    }
                    CommitState::TransactionFailed => Pc::Release {
                        answer: Answer::Failed,
                        fallback: false,
                    },
                    _ => Pc::Release {
                        answer: Answer::Failed,
                        fallback: true,
                    },
                }
            }
            (Pc::Effect, _) => {
                s.effects += 1;
                Pc::Complete(Answer::Done)
            }

            (Pc::Complete(a), None) => Pc::Complete(a),
            (Pc::Complete(a), Some(StoreReply::Ok)) => Pc::Done(Reply::Ran(a)),
            (Pc::Complete(a), Some(_)) => Pc::StoreIfFree(a),
            (Pc::StoreIfFree(a), _) => match s.apply_fresh(i, None) {
                StoreReply::Claimed(Claimed::Acquired) => Pc::CompleteFresh(a),
                StoreReply::Claimed(Claimed::InFlight { .. }) => Pc::StoreIfFree(a),
                _ => Pc::Done(Reply::Ran(a)),
            },
            (Pc::CompleteFresh(a), _) => {
                s.apply_fresh(i, Some(a));
                Pc::Done(Reply::Ran(a))
            }

            (Pc::Release { answer, fallback }, None) => Pc::Release { answer, fallback },
            (
                Pc::Release {
                    answer,
                    fallback: true,
                },
                Some(StoreReply::Refused(Refused::Committed)),
            ) => Pc::Complete(answer),
            (Pc::Release { answer, .. }, Some(_)) => Pc::Done(Reply::Ran(answer)),

            (Pc::Withdraw, None) => Pc::Withdraw,
            (Pc::Withdraw, Some(_)) => Pc::Done(Reply::Ran(Answer::Failed)),

            // The recovery hook reads the system of record: whether the effect was made,
            // and whether the committing instance is gone.
            (Pc::Recover(owner), _) => {
                if s.effects > 0 {
                    Pc::Settle
                } else if s.requests[owner as usize].pc == Pc::Crashed
                    || self.hook == Hook::NeverRanWhenNotFound
                {
                    Pc::RecoverRevoke(owner)
                } else {
                    Pc::Done(Reply::OutcomeUnknown)
                }
            }
            // A withdrawal that fails is refused with 503, never run unprotected.
            (Pc::RecoverRevoke(_), None) => Pc::Done(Reply::Unavailable),
            (Pc::RecoverRevoke(_), Some(_)) => {
                r.rerun = true;
                Pc::Claim
            }
            (Pc::Settle, Some(StoreReply::Settled(false))) => match &s.slot {
                Slot::Completed { record, .. } => Pc::Done(Reply::Replayed(record.0)),
                _ => Pc::Done(Reply::Recovered(Answer::Done)),
            },
            (Pc::Settle, _) => Pc::Done(Reply::Recovered(Answer::Done)),

            (pc @ (Pc::Done(_) | Pc::Crashed), _) => pc,
        };
        s.requests[i as usize] = r;
    }
}

impl Model for ProtocolModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            now: 0,
            slot: Slot::Free,
            requests: vec![
                Request {
                    pc: Pc::Idle,
                    commit: CommitState::None,
                    rerun: false,
                };
                self.requests as usize
            ],
            wire: Vec::new(),
            effects: 0,
            first_stored: None,
            replaced: false,
            faults: self.faults,
            crashes: self.crashes,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for i in 0..self.requests {
            if s.is_done(i) {
                continue;
            }
            actions.push(Action::Step(i, Fate::Answered));
            if s.faults > 0 && self.command(s, i).is_some() {
                if self.lost_replies {
                    actions.push(Action::Step(i, Fate::ReplyLost));
                }
                if self.late_commands {
                    actions.push(Action::Step(i, Fate::Late));
                }
            }
            if s.holds(i) {
                actions.push(Action::Heartbeat(i, Fate::Answered));
                if s.faults > 0 && self.late_commands {
                    actions.push(Action::Heartbeat(i, Fate::Late));
                }
            }
            if s.crashes > 0 && s.requests[i as usize].pc != Pc::Idle {
                actions.push(Action::Crash(i));
            }
        }
        for k in 0..s.wire.len() {
            actions.push(Action::Land(k));
        }
        if s.now < self.ticks {
            actions.push(Action::Tick);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Tick => s.now += 1,
            Action::Crash(i) => {
                s.crashes -= 1;
                s.requests[i as usize].pc = Pc::Crashed;
            }
            Action::Land(k) => {
                let (i, command) = s.wire.remove(k);
                s.apply(i, command);
            }
            Action::Heartbeat(i, fate) => {
                if fate == Fate::Late {
                    s.faults -= 1;
                    s.wire.push((i, Command::Extend));
                } else {
                    s.apply(i, Command::Extend);
                }
            }
            Action::Step(i, fate) => {
                let reply = match (self.command(&s, i), fate) {
                    (None, _) => None,
                    (Some(c), Fate::Answered) => Some(s.apply(i, c)),
                    (Some(c), Fate::ReplyLost) => {
                        s.faults -= 1;
                        s.apply(i, c);
                        None
                    }
                    (Some(c), Fate::Late) => {
                        s.faults -= 1;
                        s.wire.push((i, c));
                        None
                    }
                };
                // A step that is not a store call has no reply to wait for.
                let reply = if self.command(last, i).is_none() {
                    Some(StoreReply::Ok)
                } else {
                    reply
                };
                self.advance(&mut s, i, reply);
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("the effect is made at most once", |_, s: &State| {
                s.effects <= 1
            }),
            Property::always("one answer per key", |_, s: &State| one_answer(s)),
            Property::always(
                "no failure answer for an effect that was made",
                |_, s: &State| no_false_failure(s),
            ),
            Property::always(
                "nothing is bound by a request told its commit failed",
                |m: &ProtocolModel, s: &State| nothing_bound_by_a_failed_commit(m, s),
            ),
            Property::always("a stored answer is never replaced", |_, s: &State| {
                !s.replaced
            }),
            Property::eventually(
                "every request answers, and the key is never stuck",
                |m: &ProtocolModel, s: &State| {
                    (0..m.requests).all(|i| s.is_done(i))
                        && s.wire.is_empty()
                        && s.now == m.ticks
                        && never_stuck(s)
                },
            ),
            Property::sometimes("a retry is answered from a recovery", |_, s: &State| {
                s.requests
                    .iter()
                    .any(|r| matches!(r.pc, Pc::Done(Reply::Recovered(_))))
            }),
            Property::sometimes("the operation runs once and is replayed", |_, s: &State| {
                s.effects == 1
                    && s.requests
                        .iter()
                        .any(|r| matches!(r.pc, Pc::Done(Reply::Replayed(Answer::Done))))
            }),
        ]
    }

    fn within_boundary(&self, _: &State) -> bool {
        true
    }

    fn format_action(&self, action: &Action) -> String {
        format!("{action:?}")
    }
}

/// The answers given as the key's outcome agree: what ran and succeeded, what was replayed,
/// what the recovery hook answered.
fn one_answer(s: &State) -> bool {
    let mut seen = None;
    for r in &s.requests {
        let a = match r.pc {
            Pc::Done(Reply::Ran(Answer::Done)) => Answer::Done,
            Pc::Done(Reply::Replayed(a) | Reply::Recovered(a)) => a,
            _ => continue,
        };
        if seen.is_some_and(|b| b != a) {
            return false;
        }
        seen = Some(a);
    }
    true
}

/// A stored or replayed "failed" never stands for an operation whose effect was made.
fn no_false_failure(s: &State) -> bool {
    if s.effects == 0 {
        return true;
    }
    let stored_failure = matches!(
        &s.slot,
        Slot::Completed {
            record: (Answer::Failed, _),
            ..
        }
    );
    let replayed_failure = s
        .requests
        .iter()
        .any(|r| r.pc == Pc::Done(Reply::Replayed(Answer::Failed)));
    !stored_failure && !replayed_failure
}

/// A request whose handler was told its commit point failed (and made no effect) never
/// leaves a record under the key, and, once it answered, never a commit of its own: the key
/// must not answer for an operation that did not happen.
fn nothing_bound_by_a_failed_commit(m: &ProtocolModel, s: &State) -> bool {
    let failed = |i: u8| {
        matches!(
            s.requests[i as usize].commit,
            CommitState::Refused | CommitState::InDoubt
        ) || (m.commit == Commit::InTransaction
            && s.requests[i as usize].commit == CommitState::TransactionFailed
            && s.effects == 0)
    };
    match &s.slot {
        Slot::Completed { record, .. } => !failed(record.1),
        Slot::Held(h) => {
            let i = owner_of(h.token);
            !(h.committed_until.is_some()
                && failed(i)
                && matches!(s.requests[i as usize].pc, Pc::Done(_)))
        }
        Slot::Free => true,
    }
}

/// A client that comes back once every request answered, claiming once per lease, gets an
/// answer (or the key), or the outcome-unknown the recovery hook handles, within three
/// leases: never "in flight" for ever.
fn never_stuck(s: &State) -> bool {
    let mut slot = s.slot.clone();
    let probe = token(200, false);
    let mut now = s.now;
    for _ in 0..4 {
        match machine::claim(&mut slot, now, &fingerprint(), probe, LEASE) {
            Claimed::InFlight { .. } => now += 2,
            _ => return true,
        }
    }
    false
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
