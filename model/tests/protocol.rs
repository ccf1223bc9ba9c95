//! The protocol model checked at the bounds CI affords (a few seconds each; deeper bounds
//! and their run times are in `docs/protocol.md`), and shown able to find the bugs the
//! layer had.

use protocol_model::{Action, Commit, Hook, ProtocolModel, Rules};
use stateright::{Checker, Model};

fn check(model: ProtocolModel) -> impl Checker<ProtocolModel> {
    let checker = model
        .checker()
        .threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .spawn_bfs()
        .join();
    eprintln!(
        "{} states ({} unique), depth {}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth()
    );
    checker
}

const ONCE: &str = "the effect is made at most once";
const FALSE_FAILURE: &str = "no failure answer for an effect that was made";
const BOUND_BY_FAILED_COMMIT: &str = "nothing is bound by a request told its commit failed";

#[test]
fn the_protocol_holds_with_a_separate_commit_point() {
    check(ProtocolModel::ci(Commit::Separate)).assert_properties();
}

#[test]
fn the_protocol_holds_with_the_commit_point_in_the_transaction() {
    check(ProtocolModel::ci(Commit::InTransaction)).assert_properties();
}

/// The first commit-in-doubt bug: a `commit` that timed out while its command was still on
/// the wire landed after the handler was told it failed; the layer released the key, the
/// store refused (committed), and the handler's error answer was stored for an operation
/// that never ran. Regression test against the code:
/// `layer/commit_points::a_commit_that_timed_out_is_withdrawn_and_never_binds_the_key`.
#[test]
fn before_hardening_a_late_commit_binds_the_key_to_an_operation_that_never_ran() {
    let model = ProtocolModel {
        lost_replies: false,
        rules: Rules::before_hardening(),
        ..ProtocolModel::ci(Commit::Separate)
    };
    let checker = check(model);
    let path = checker
        .discovery(BOUND_BY_FAILED_COMMIT)
        .expect("the model finds the late commit");
    // Only late commands are faults here: the commit is one of them, and it landed.
    assert!(
        path.into_actions()
            .iter()
            .any(|a| matches!(a, Action::Land(_))),
        "the counterexample lands a late command"
    );
    checker.assert_no_discovery(ONCE);
}

/// The second: a transaction holding the commit point committed, its reply was lost, and
/// the handler's error answer was stored: every retry was told the payment failed although
/// it was made. Regression tests against the code:
/// `backends/exactly_once::{pg,my}::a_lost_commit_reply_never_binds_the_key_to_a_false_answer`.
#[test]
fn before_hardening_a_lost_transaction_reply_stores_a_false_answer() {
    let model = ProtocolModel {
        late_commands: false,
        rules: Rules::before_hardening(),
        ..ProtocolModel::ci(Commit::InTransaction)
    };
    let checker = check(model);
    assert!(checker.discovery(FALSE_FAILURE).is_some());
    checker.assert_no_discovery(ONCE);
}

/// Each fix is needed on its own: with one rule restored, its bug comes back.
#[test]
fn each_rule_of_the_hardening_is_needed() {
    let separate = ProtocolModel {
        rules: Rules {
            withdraw_commits_in_doubt: false,
            ..Rules::CURRENT
        },
        ..ProtocolModel::ci(Commit::Separate)
    };
    assert!(check(separate).discovery(BOUND_BY_FAILED_COMMIT).is_some());
    let transaction = ProtocolModel {
        rules: Rules {
            recover_transactions_in_doubt: false,
            ..Rules::CURRENT
        },
        ..ProtocolModel::ci(Commit::InTransaction)
    };
    assert!(check(transaction).discovery(FALSE_FAILURE).is_some());
}

/// Why `Recovery::NeverRan` is documented as safe only when the committing instance is
/// gone (or the effect is fenced by the key): a hook that answers it whenever it finds no
/// effect runs the operation twice when the owner was only paused after its commit point.
#[test]
fn a_hook_that_says_never_ran_while_the_owner_lives_runs_twice() {
    let model = ProtocolModel {
        hook: Hook::NeverRanWhenNotFound,
        ..ProtocolModel::ci(Commit::Separate)
    };
    assert!(check(model).discovery(ONCE).is_some());
}
