//! The kernel side follows every descendant: real process trees against the real kernel,
//! compared with counts the workload knows and with the kernel's own cgroup CPU accounting.
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{cpu_group, expected_peak, kernel_version, rel_diff, run_to_end, tracker, workload};

#[tokio::test]
async fn a_thousand_children_alive_at_once_are_counted_exactly() {
    for (set, t) in common::trackers() {
        eprintln!("{set}:");
        let u = run_to_end(&t, &mut workload(&["fork", "1000"])).await;
        assert_eq!(u.process_count, 1001, "{u:?}");
        assert_eq!(u.thread_count, 1001, "{u:?}");
        assert_eq!(u.peak_process_count, expected_peak(1001), "{u:?}");
        assert_eq!(u.exit_code, Some(0));
    }
}

#[tokio::test]
async fn threads_are_counted_exactly() {
    for (set, t) in common::trackers() {
        eprintln!("{set}:");
        let u = run_to_end(&t, &mut workload(&["threads", "7", "20"])).await;
        assert_eq!(u.process_count, 1, "{u:?}");
        assert_eq!(u.thread_count, 8, "{u:?}");
        assert_eq!(u.peak_process_count, expected_peak(1), "{u:?}");
        assert!(u.cpu_time_ns >= 7 * 20_000_000, "{u:?}");
    }
}

#[tokio::test]
async fn a_double_forked_daemon_is_followed_and_waited_for() {
    for (set, t) in common::trackers() {
        eprintln!("{set}:");
        let Some(group) = cpu_group() else { return };
        let mut cmd = workload(&["daemon", "300"]);
        group.join(&mut cmd);
        let start = Instant::now();
        let mut run = t.spawn(&mut cmd).unwrap();
        run.wait_root().await.unwrap();
        let root_done = start.elapsed();
        assert!(!run.is_finished().unwrap(), "the daemon outlives the root");
        tokio::time::timeout(Duration::from_secs(60), run.wait_finished())
            .await
            .unwrap()
            .unwrap();
        let u = run.usage().unwrap();
        assert!(start.elapsed() >= root_done + Duration::from_millis(300));
        assert_eq!(u.process_count, 3, "root, setsid child, grandchild: {u:?}");
        assert_eq!(u.live_process_count, 0);
        assert!(
            u.cpu_time_ns >= 300_000_000,
            "the daemon's CPU is included: {u:?}"
        );
        let truth = group.usage_ns();
        assert!(
            rel_diff(u.cpu_time_ns, truth) < 0.02,
            "ours {} vs cpuacct {truth}",
            u.cpu_time_ns
        );
        assert_eq!(u.lost_events, 0);
    }
}

#[tokio::test]
async fn exec_in_place_is_one_process() {
    for (set, t) in common::trackers() {
        eprintln!("{set}:");
        let u = run_to_end(&t, Command::new("/bin/sh").args(["-c", "exec /bin/true"])).await;
        assert_eq!((u.process_count, u.thread_count), (1, 1), "{u:?}");
    }
}

#[tokio::test]
async fn exec_from_a_non_leader_thread_keeps_following() {
    for (set, t) in common::trackers() {
        eprintln!("{set}:");
        // The execing thread takes over the leader's pid; the old leader dies. Then the new
        // program forks: the fork must still be followed.
        let script = "/bin/true; /bin/true; exit 0";
        let u = run_to_end(
            &t,
            &mut workload(&["exec-from-thread", "/bin/sh", "-c", script]),
        )
        .await;
        assert_eq!(
            u.process_count, 3,
            "the workload (then sh) and two /bin/true: {u:?}"
        );
        assert_eq!(u.thread_count, 4, "{u:?}");
    }
}

#[tokio::test]
async fn clone_parent_and_vfork_children_join() {
    for (set, t) in common::trackers() {
        eprintln!("{set}:");
        let u = run_to_end(&t, &mut workload(&["clone-parent"])).await;
        assert_eq!(u.process_count, 2, "{u:?}");
        let u = run_to_end(&t, &mut workload(&["vfork"])).await;
        assert_eq!(u.process_count, 2, "{u:?}");
    }
}

#[tokio::test]
async fn children_that_live_microseconds_are_counted() {
    for (set, t) in common::trackers() {
        eprintln!("{set}:");
        let u = run_to_end(&t, &mut workload(&["storm", "500"])).await;
        assert_eq!(u.process_count, 501, "{u:?}");
        assert_eq!(u.peak_process_count, expected_peak(2), "{u:?}");
    }
}

#[tokio::test]
async fn cpu_time_matches_cpuacct_within_two_percent() {
    for (set, t) in common::trackers() {
        eprintln!("{set}:");
        let Some(group) = cpu_group() else { return };
        let mut cmd = Command::new("/bin/sh");
        let w = common::WORKLOAD;
        cmd.arg("-c").arg(format!(
            "{w} threads 3 150 & {w} burn 200 & {w} fork 50; {w} storm 100; wait"
        ));
        group.join(&mut cmd);
        let u = run_to_end(&t, &mut cmd).await;
        let truth = group.usage_ns();
        assert!(
            truth >= 600_000_000,
            "the workload burned what it says: {truth}"
        );
        let diff = rel_diff(u.cpu_time_ns, truth);
        eprintln!(
            "cpu: ours {} ns, cpuacct {truth} ns, {:.4}% apart",
            u.cpu_time_ns,
            diff * 100.0
        );
        assert!(
            diff < 0.02,
            "ours {} vs cpuacct {truth} ({:.3}%)",
            u.cpu_time_ns,
            diff * 100.0
        );
        // The split is each process's own, as wait4 makes it (tests/split.rs checks it against
        // wait4's figures); the cgroup's cpuacct.stat is the whole group's tick ratio, which
        // differs by design where processes have no tick sample (the storm's children: all
        // user time for wait4). Here: its parts make the whole.
        assert_eq!(u.cpu_user_ns + u.cpu_system_ns, u.cpu_time_ns);
        // 1 sh + 4 workloads + 50 fork children + 100 storm children
        assert_eq!(u.process_count, 155, "{u:?}");
    }
}

#[tokio::test]
async fn unrelated_processes_are_not_counted() {
    let Some(t) = tracker() else { return };
    // An untracked storm and CPU burn run at the same time as a tracked tree.
    let mut noise = workload(&["fork", "300"]).spawn().unwrap();
    let mut burner = workload(&["threads", "2", "300"]).spawn().unwrap();
    let u = run_to_end(&t, &mut workload(&["fork", "20"])).await;
    noise.wait().unwrap();
    burner.wait().unwrap();
    assert_eq!(u.process_count, 21, "{u:?}");
    assert_eq!(u.thread_count, 21, "{u:?}");
    assert!(
        u.cpu_time_ns < 300_000_000,
        "the burner's CPU is not ours: {u:?}"
    );
}

#[tokio::test]
async fn a_live_snapshot_adds_running_threads_from_proc() {
    let Some(t) = tracker() else { return };
    let mut run = t.spawn(&mut workload(&["threads", "2", "400"])).unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mid = run.usage().unwrap();
    assert_eq!(mid.live_process_count, 1, "{mid:?}");
    assert!(
        mid.cpu_time_ns > 100_000_000,
        "live threads' CPU is read: {mid:?}"
    );
    assert_eq!(mid.exit_code, None);
    run.wait_root().await.unwrap();
    run.wait_finished().await.unwrap();
    let end = run.usage().unwrap();
    assert!(end.cpu_time_ns >= mid.cpu_time_ns);
    assert!(end.cpu_time_ns >= 800_000_000, "{end:?}");
    assert_eq!(end.live_process_count, 0);
}

#[test]
fn every_counter_the_kernel_supports_is_measured() {
    let Some(t) = tracker() else { return };
    let m = t.measured();
    // The loader asks the verifier, not the version; the version is the independent check.
    assert_eq!(m.atomics, kernel_version() >= (5, 12), "{m:?}");
    // Every kernel this project runs on has task I/O accounting and the block tracepoint:
    // a hook that fails to load there is a failure, not a skip.
    let why = t.features();
    assert!(m.disk && m.io_chars && m.devices, "{m:?}: {why:?}");
}

#[tokio::test]
async fn a_small_membership_map_keeps_headroom_and_kills_at_the_share_never_silently() {
    if tracker().is_none() {
        return;
    }
    // A small TASKS map alone, and the command line's maps for one tree sized small, with the
    // lean programs.
    let small = cylo_usage::Capacities {
        max_tasks: 16,
        ..Default::default()
    };
    let one_tree = cylo_usage::Capacities::for_one_tree(64, cylo_usage::ProgramSet::Totals);
    for (capacity, options) in [(16, small), (64, one_tree)] {
        let t = cylo_usage::Tracker::load_with_options(options).expect("load with small maps");
        let mut run = t.spawn(&mut workload(&["fork", "100"])).unwrap();
        run.wait_root().await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), run.wait_finished())
            .await
            .unwrap()
            .unwrap();
        let u = run.usage().unwrap();
        // The run's share is the map less its headroom: the fork past it is killed at birth,
        // with the root that made it; the headroom holds the task killed at birth, so nothing
        // is lost, nothing escapes, and the tree stops as at a budget.
        assert_eq!(u.tasks_killed_at_birth, Some(1), "{u:?}");
        assert_eq!((u.lost_events, u.tasks_escaped), (0, Some(0)), "{u:?}");
        assert_eq!((u.signal, u.live_process_count), (Some(9), 0), "{u:?}");
        assert_eq!(u.precision, cylo_usage::Precision::Approximate, "{u:?}");
        let e = u.budget_exceeded.as_ref().expect("the share is a budget");
        assert_eq!(e.resource, cylo_usage::Resource::TasksAlive, "{u:?}");
        assert!(e.limit < capacity, "the share leaves a headroom: {u:?}");
        assert_eq!(e.observed, e.limit + 1, "{u:?}");
        // The task past the share joined (so that it could be killed and counted).
        assert!(u.process_count <= e.observed, "{u:?}");
    }
}

#[tokio::test]
async fn children_in_a_new_pid_namespace_are_followed() {
    for (set, t) in common::trackers() {
        eprintln!("{set}:");
        let u = run_to_end(&t, &mut workload(&["pidns", "5"])).await;
        assert_eq!(u.process_count, 6, "{u:?}");
        assert_eq!(u.peak_process_count, expected_peak(6), "{u:?}");
    }
}

#[tokio::test]
async fn a_hostile_process_name_does_not_break_live_snapshots() {
    let Some(t) = tracker() else { return };
    let mut run = t.spawn(&mut workload(&["hostile-name", "600"])).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mid = run.usage().unwrap();
    assert_eq!(mid.precision, cylo_usage::Precision::Exact, "{mid:?}");
    assert!(
        mid.cpu_time_ns > 50_000_000,
        "the live thread was read: {mid:?}"
    );
    run.wait_root().await.unwrap();
    run.wait_finished().await.unwrap();
    assert!(run.usage().unwrap().cpu_time_ns >= 600_000_000);
}
