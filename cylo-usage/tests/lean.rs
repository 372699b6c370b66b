//! The lean programs ([`ProgramSet::Totals`]: no adoption path, no breakdown records), which
//! the command line loads for a run without `--tree`/`--events`, and its maps sized for one
//! tree: what the set has not loaded is refused in a typed error, and a tree past the maps'
//! capacity is stopped as a budget, never followed in part. (That it counts the trees of
//! `tests/tree.rs`, `tests/disk_memory.rs` and `tests/split.rs` as exactly as the full set,
//! against the same ground truth, those files check: their tests run on both sets.)
mod common;

use std::process::Command;
use std::time::Duration;

use common::{lean_tracker, run_to_end, workload};
use cylo_usage::{Capacities, ProgramSet, Resource, RunOptions, SessionError, Tracker};

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

#[tokio::test]
async fn a_tree_past_the_capacity_for_one_tree_stops_as_a_budget() {
    if lean_tracker().is_none() {
        return;
    }
    let t = Tracker::load_with_options(Capacities::for_one_tree(64, ProgramSet::Totals))
        .expect("load with maps for 64 tasks");
    let mut run = t.spawn(&mut workload(&["fork", "100"])).unwrap();
    run.wait_root().await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), run.wait_finished())
        .await
        .unwrap()
        .unwrap();
    let u = run.usage().unwrap();
    let e = u.budget_exceeded.as_ref().expect("the share is a budget");
    assert_eq!(e.resource, Resource::TasksAlive, "{u:?}");
    assert!(e.limit < 64, "the share leaves a headroom: {u:?}");
    assert_eq!(e.observed, e.limit + 1, "{u:?}");
    // Nothing was followed in part: no lost event, nothing escaped, nothing alive.
    assert_eq!((u.lost_events, u.tasks_escaped), (0, Some(0)), "{u:?}");
    assert_eq!(u.live_process_count, 0, "{u:?}");
    // The task past the share joined (so that it can be killed and counted) and died at birth.
    assert!(u.process_count <= e.observed, "{u:?}");
    assert_eq!(u.tasks_killed_at_birth, Some(1), "{u:?}");
}
