//! The lean programs ([`ProgramSet::Totals`]: no adoption path, no breakdown records), which
//! the command line loads for a run without `--tree`/`--events`, and its maps sized for one
//! tree: what the set has not loaded is refused in a typed error. (That a tree past the maps'
//! capacity is stopped as a budget, `tests/tree.rs` checks; that it counts the trees of
//! `tests/tree.rs`, `tests/disk_memory.rs` and `tests/split.rs` as exactly as the full set,
//! against the same ground truth, those files check: their tests run on both sets.)
mod common;

use std::process::Command;

use common::{lean_tracker, run_to_end, workload};
use cylo_usage::{RunOptions, SessionError};

#[tokio::test]
async fn what_the_lean_set_has_not_loaded_is_refused_by_name() {
    let Some(t) = lean_tracker() else { return };
    // Refused on every kernel alike (without atomics, the one set is loaded, but with a
    // one-page breakdown ring buffer).
    let not_loaded = |r: Result<cylo_usage::Run, SessionError>, what: &str| match r {
        Err(SessionError::NotLoaded { what: w }) => assert_eq!(w, what),
        Err(other) => panic!("expected NotLoaded({what}), got {other:?}"),
        Ok(_) => panic!("expected NotLoaded({what}), the run started"),
    };
    let tree = RunOptions {
        tree: true,
        ..RunOptions::default()
    };
    let mut child = workload(&["burn", "10"]);
    not_loaded(t.spawn_with(&mut child, tree), "a breakdown (tree)");
    let mut sleeper = Command::new("sleep").arg("5").spawn().unwrap();
    not_loaded(t.attach(sleeper.id() as libc::pid_t), "an attach");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    // The refusals left the tracker whole: a run after them is exact.
    let u = run_to_end(&t, &mut workload(&["fork", "10"])).await;
    assert_eq!(u.process_count, 11, "{u:?}");
}
