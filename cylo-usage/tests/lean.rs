//! The lean programs ([`ProgramSet::Totals`]: no adoption path, no breakdown records), which
//! the command line loads for a run without `--tree`/`--events`, and its maps sized for one
//! tree: the same trees as `tests/tree.rs`, counted as exactly, against the same ground
//! truth; what the set has not loaded refused in a typed error; and a tree past the maps'
//! capacity stopped as a budget, never followed in part.
mod common;

use std::process::Command;
use std::time::Duration;

use common::{cpu_group, expected_peak, lean_tracker, rel_diff, run_to_end, workload};
use cylo_usage::{Capacities, ProgramSet, Resource, RunOptions, SessionError, Tracker};

#[tokio::test]
async fn a_thousand_children_and_their_threads_are_counted_exactly() {
    let Some(t) = lean_tracker() else { return };
    let u = run_to_end(&t, &mut workload(&["fork", "1000"])).await;
    assert_eq!((u.process_count, u.thread_count), (1001, 1001), "{u:?}");
    assert_eq!(u.peak_process_count, expected_peak(1001), "{u:?}");
    let u = run_to_end(&t, &mut workload(&["threads", "7", "20"])).await;
    assert_eq!((u.process_count, u.thread_count), (1, 8), "{u:?}");
    assert!(u.cpu_time_ns >= 7 * 20_000_000, "{u:?}");
}

#[tokio::test]
async fn cpu_time_of_a_mixed_tree_with_a_daemon_matches_cpuacct() {
    let Some(t) = lean_tracker() else { return };
    let Some(group) = cpu_group() else { return };
    let mut cmd = Command::new("/bin/sh");
    let w = common::WORKLOAD;
    cmd.arg("-c").arg(format!(
        "{w} threads 3 150 & {w} daemon 200 & {w} fork 50; {w} storm 100; wait"
    ));
    group.join(&mut cmd);
    let mut run = t.spawn(&mut cmd).unwrap();
    tokio::time::timeout(Duration::from_secs(120), async {
        run.wait_root().await.unwrap();
        run.wait_finished().await.unwrap();
    })
    .await
    .expect("finished within 120 s");
    let u = run.usage().unwrap();
    let truth = group.usage_ns();
    assert!(truth >= 600_000_000, "the workload burned what it says");
    assert!(
        rel_diff(u.cpu_time_ns, truth) < 0.02,
        "ours {} vs cpuacct {truth}",
        u.cpu_time_ns
    );
    assert_eq!(u.cpu_user_ns + u.cpu_system_ns, u.cpu_time_ns, "{u:?}");
    // 1 sh + 4 workloads + the daemon's 2 + 50 fork children + 100 storm children
    assert_eq!(u.process_count, 157, "{u:?}");
    assert_eq!((u.lost_events, u.live_process_count), (0, 0), "{u:?}");
}

#[tokio::test]
async fn exec_from_a_thread_and_a_new_pid_namespace_are_followed() {
    let Some(t) = lean_tracker() else { return };
    let script = "/bin/true; /bin/true; exit 0";
    let u = run_to_end(
        &t,
        &mut workload(&["exec-from-thread", "/bin/sh", "-c", script]),
    )
    .await;
    assert_eq!(u.process_count, 3, "{u:?}");
    let u = run_to_end(&t, &mut workload(&["pidns", "5"])).await;
    assert_eq!(u.process_count, 6, "{u:?}");
}

#[tokio::test]
async fn peak_memory_is_measured_as_by_the_full_set() {
    let Some(t) = lean_tracker() else { return };
    if !t.measured().atomics {
        return;
    }
    let u = run_to_end(&t, &mut workload(&["mem", "64", "32", "300"])).await;
    let peak = u.peak_memory_bytes.expect("memory is measured");
    assert!(peak >= 96 << 20, "{u:?}");
    assert!(u.max_process_rss_bytes.unwrap() >= 64 << 20, "{u:?}");
    assert_eq!(u.memory_bytes, Some(0), "{u:?}");
}

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
