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

/// `cylo-usage ARGS` without the daemon, with the loader's debug lines (which say what each
/// program cost the verifier, by name) and without the programs' own log statements.
fn cli_loading(args: &[&str]) -> std::process::Output {
    Command::new(common::CLI)
        .args(args)
        .env("RUST_LOG", "cylo_usage::kernel::programs=debug")
        .env("CYLO_USAGE_SOCKET", "/nonexistent/cylo-usage.sock")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_command_line_loads_the_lean_set_unless_a_breakdown_is_asked_for() {
    let Some(t) = lean_tracker() else { return };
    let lean = cli_loading(&["run", "--json", "--", "/bin/true"]);
    let full = cli_loading(&["run", "--json", "--tree", "--", "/bin/true"]);
    for out in [&lean, &full] {
        assert!(out.status.success(), "{out:?}");
    }
    let verified = |out: &std::process::Output, program: &str| {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .any(|l| l.contains(&format!("verified {program} in ")) && !l.ends_with("refused"))
    };
    if t.measured().atomics {
        assert!(verified(&lean, "task_newtask_lean"), "{lean:?}");
        assert!(!verified(&lean, "task_newtask"), "{lean:?}");
        assert!(!verified(&lean, "sched_process_exec"), "{lean:?}");
        assert!(verified(&full, "task_newtask"), "{full:?}");
        assert!(!verified(&full, "task_newtask_lean"), "{full:?}");
    } else {
        // One set only: the variants without atomics, either way.
        assert!(verified(&lean, "task_newtask_no_atomics"), "{lean:?}");
        assert!(verified(&full, "task_newtask_no_atomics"), "{full:?}");
    }
}

#[test]
fn the_command_lines_capacity_stops_a_tree_past_it_and_refuses_less_than_its_minimum() {
    if lean_tracker().is_none() {
        return;
    }
    let w = common::WORKLOAD;
    let out = cli_loading(&["run", "--json", "--capacity", "64", "--", w, "fork", "100"]);
    assert_eq!(out.status.code(), Some(120), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON report");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["budget_exceeded"]["resource"], "tasks_alive", "{v}");
    assert_eq!(
        v["budget_exceeded"]["limit"], 48,
        "64 less its headroom of 16: {v}"
    );
    assert_eq!(
        (v["lost_events"].as_u64(), v["live_process_count"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    let out = cli_loading(&["run", "--capacity", "63", "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--capacity"),
        "{out:?}"
    );
}
