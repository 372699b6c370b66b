//! Fail closed at a session's task share: a task the tracker cannot follow within a run's
//! share of its maps (a daemon's `--session-max-tasks`, `RunOptions::max_tasks`) is killed at
//! birth with its creator, so nothing of the tree outlives a `--timeout` or a kill, and the
//! report says what was killed; a task that could not be followed at all (full maps) is
//! counted, and `live_process_count` never claims 0 because of it.
mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{CLI, WORKLOAD, ebpf_required, tracker, workload};

/// Whether the daemon can load its programs here, or a skip (a failure in CI).
fn privileged() -> bool {
    match cylo_usage::missing_privileges() {
        Ok(None) => true,
        _ if ebpf_required() => panic!("CYLO_USAGE_REQUIRE_EBPF=1 but this process lacks CAP_BPF"),
        _ => {
            eprintln!("SKIPPED: the daemon needs CAP_BPF and CAP_PERFMON (run as root)");
            false
        }
    }
}

/// A scratch folder of this test process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cylo-usage-share-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `cylo-usage serve` on a socket of its own, killed on drop.
struct Daemon {
    child: std::process::Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, args: &[&str]) -> Daemon {
        let socket = dir.join("sock");
        let child = Command::new(CLI)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, socket }
    }

    fn client(&self, args: &[&str]) -> Command {
        let mut c = Command::new(CLI);
        c.args(args)
            .env("CYLO_USAGE_SOCKET", &self.socket)
            .stdin(Stdio::null());
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn report(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report in: {text}"));
    serde_json::from_str(line).unwrap()
}

/// Processes (not zombies) whose command line contains `marker`.
fn alive_with(marker: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(marker) {
            continue;
        }
        let state = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.trim_start().chars().next())
            });
        if !matches!(state, Some('Z') | Some('X') | None) {
            out.push((pid, cmdline));
        }
    }
    out
}

/// Waits up to `within` for no process with `marker` in its command line to be left.
fn none_left(marker: &str, within: Duration) -> Vec<(u32, String)> {
    let deadline = Instant::now() + within;
    loop {
        let left = alive_with(marker);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A session with a share of 8 threads: the workload's threads each double-fork a daemon
/// that sleeps (a new session, its parent gone). The thread that reaches the share is killed
/// at birth with its whole process; nothing of the tree survives `--timeout`; the report
/// says what was killed.
#[test]
fn a_double_forked_task_past_the_session_share_does_not_survive_the_timeout() {
    if !privileged() {
        return;
    }
    let dir = scratch("escape");
    let daemon = Daemon::start(&dir, &["--session-max-tasks", "8"]);
    let pids = dir.join("daemon-pids");
    let marker = pids.to_str().unwrap().to_string();
    let started = Instant::now();
    let out = daemon
        .client(&[
            "run",
            "--json",
            "--timeout",
            "2s",
            "--kill-after",
            "1s",
            "--",
        ])
        .args([WORKLOAD, "escape", "16", &marker])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let u = report(&out);
    // The share is a budget of threads alive at once: its crossing stops the whole tree at
    // once (120), daemons included, and names the share.
    assert_eq!(out.status.code(), Some(120), "{u}");
    assert_eq!(u["budget_exceeded"]["resource"], "tasks_alive", "{u}");
    assert_eq!(u["budget_exceeded"]["limit"], 8, "{u}");
    assert_eq!(
        u["timed_out"], false,
        "stopped at the share, not the timeout: {u}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let killed = u["tasks_killed_at_birth"].as_u64().unwrap();
    assert!(killed >= 1, "the thread past the share was killed: {u}");
    assert_eq!(u["tasks_escaped"], 0, "{u}");
    assert_eq!(u["precision"], "approximate", "{u}");
    let notes = u["precision_notes"].to_string();
    assert!(
        notes.contains("killed at birth") && notes.contains("share of 8 threads"),
        "{u}"
    );
    // Nothing of the tree is left: not the workload, not a daemon it double-forked (they
    // keep its command line, with the file name in it).
    let left = none_left(&marker, Duration::from_secs(15));
    assert!(left.is_empty(), "left running after the timeout: {left:?}");
    for pid in std::fs::read_to_string(&pids).unwrap_or_default().lines() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start().to_string());
        assert!(
            state.as_deref().is_none_or(|s| s.starts_with('Z')),
            "daemon {pid} still runs: {stat}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fork bomb in a session with a share of 64 threads: killed at its share, nothing left.
#[test]
fn a_fork_bomb_at_its_session_share_is_contained() {
    if !privileged() {
        return;
    }
    let dir = scratch("bomb");
    let daemon = Daemon::start(&dir, &["--session-max-tasks", "64"]);
    // An unusual size, to find what is left of this bomb alone.
    let size = "4093";
    let out = daemon
        .client(&["run", "--json", "--timeout", "60s", "--"])
        .args([WORKLOAD, "bomb", size])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let u = report(&out);
    assert!(u["tasks_killed_at_birth"].as_u64().unwrap() >= 1, "{u}");
    assert_eq!(u["timed_out"], false, "the bomb died at its share: {u}");
    assert_eq!(out.status.code(), Some(120), "{u}");
    assert_eq!(u["budget_exceeded"]["resource"], "tasks_alive", "{u}");
    assert!(u["process_count"].as_u64().unwrap() < 4093, "{u}");
    // Contained: at the share, each process that forks dies with the task it made.
    assert!(u["peak_process_count"].as_u64().unwrap_or(0) < 1_000, "{u}");
    assert_eq!(u["live_process_count"], 0, "{u}");
    let left = none_left(&format!("bomb {size}"), Duration::from_secs(15));
    assert!(left.is_empty(), "left running: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// In-process, a run's share below the maps' capacity: the creator past it is killed (the
/// root here), every task is followed or killed at birth, nothing is lost.
#[tokio::test]
async fn a_run_at_its_share_kills_the_task_past_it_and_loses_nothing() {
    let Some(t) = tracker() else { return };
    let options = cylo_usage::RunOptions {
        max_tasks: 8,
        ..Default::default()
    };
    let mut run = t
        .spawn_with(&mut workload(&["fork", "100"]), options)
        .unwrap();
    run.wait_root().await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), run.wait_finished())
        .await
        .unwrap()
        .unwrap();
    let u = run.usage().unwrap();
    assert_eq!(u.signal, Some(9), "the root was killed at its share: {u:?}");
    assert!(u.tasks_killed_at_birth.unwrap() >= 1, "{u:?}");
    let e = u.budget_exceeded.expect("the share is a budget");
    assert_eq!(
        (e.resource, e.limit),
        (cylo_usage::Resource::TasksAlive, 8),
        "{u:?}"
    );
    assert!(e.observed > 8, "{e:?}");
    assert_eq!((u.lost_events, u.tasks_escaped), (0, Some(0)), "{u:?}");
    assert!(u.process_count <= 9, "{u:?}");
    assert_eq!(u.live_process_count, 0, "{u:?}");
    assert_eq!(u.precision, cylo_usage::Precision::Approximate, "{u:?}");
}

/// The maps themselves full (a share larger than they are): a new process that cannot be
/// followed at all is counted as escaped, its creator is killed, and the report never says
/// that nothing is alive while one may be.
#[tokio::test]
async fn a_process_the_full_maps_cannot_follow_is_counted_as_alive() {
    if tracker().is_none() {
        return;
    }
    let small = cylo_usage::Capacities {
        max_tasks: 16,
        ..Default::default()
    };
    let t = cylo_usage::Tracker::load_with_options(small).expect("load with a small map");
    let options = cylo_usage::RunOptions {
        max_tasks: 1_000,
        ..Default::default()
    };
    // `hold` children block until stdin closes: the escaped one is alive at the report.
    let mut cmd = workload(&["hold", "40"]);
    cmd.stdin(Stdio::piped());
    let mut run = t.spawn_with(&mut cmd, options).unwrap();
    run.wait_root().await.unwrap();
    let u = run.usage().unwrap();
    let escaped = u.tasks_escaped.unwrap();
    assert!(escaped >= 1, "{u:?}");
    assert!(u.lost_events >= escaped, "{u:?}");
    assert!(u.live_process_count >= escaped, "{u:?}");
    assert_eq!(u.signal, Some(9), "the creator was killed: {u:?}");
    let notes = u.precision_notes.join(" ");
    assert!(notes.contains("may still run"), "{u:?}");
    // The followed children end when their stdin closes (the root died); the escaped one
    // too: it shares their stdin.
    run.kill(libc::SIGKILL).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(60), run.wait_finished()).await;
}

/// A task killed at birth that only blocks (no fork, no exec, no kill of the run) dies at its
/// first context switch: the run's live processes come down to the ones it follows.
#[tokio::test]
async fn a_task_killed_at_birth_dies_at_its_first_switch() {
    let Some(t) = tracker() else { return };
    let options = cylo_usage::RunOptions {
        max_tasks: 4,
        ..Default::default()
    };
    // `hold` children block reading stdin, which stays open until the end.
    let mut cmd = workload(&["hold", "10"]);
    cmd.stdin(Stdio::piped());
    let mut run = t.spawn_with(&mut cmd, options).unwrap();
    run.wait_root().await.unwrap();
    // The root and 3 children fill the share; the 4th child is killed at birth, and the root
    // that made it. The 3 followed children still block.
    let deadline = Instant::now() + common::bound(Duration::from_secs(15));
    let u = loop {
        let u = run.usage_totals().unwrap();
        if u.live_process_count <= 3 || Instant::now() >= deadline {
            break u;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(u.live_process_count, 3, "{u:?}");
    assert_eq!(u.tasks_killed_at_birth, Some(1), "{u:?}");
    assert_eq!(u.process_count, 5, "{u:?}");
    assert_eq!(u.lost_events, 0, "{u:?}");
    run.kill(libc::SIGKILL).unwrap();
    tokio::time::timeout(Duration::from_secs(60), run.wait_finished())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.usage().unwrap().live_process_count, 0);
}

/// An attach to a tree with more threads than the run's share is refused whole, in one line,
/// rather than followed in part (a kill of the run could miss the rest); the tree is left
/// alone, and an attach with room follows it.
#[tokio::test]
async fn an_attach_past_the_share_is_refused_and_leaves_the_tree_alone() {
    let Some(t) = tracker() else { return };
    // One process of 1 + 10 threads, blocked until its stdin closes.
    let mut target = workload(&["hold-threads", "0", "10"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = target.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) < 11 {
        assert!(
            Instant::now() < deadline,
            "the target did not start its threads"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let small = cylo_usage::RunOptions {
        max_tasks: 4,
        ..Default::default()
    };
    let err = t
        .attach_with(pid as libc::pid_t, small)
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(err, cylo_usage::SessionError::TreeTooLarge { pid: p, followed: 4 } if p == pid as libc::pid_t),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("more threads than this session may follow"),
        "{err}"
    );
    assert!(
        target.try_wait().unwrap().is_none(),
        "the tree was left alone"
    );
    // Nothing of the refused attach is left in the kernel: an attach with room follows it all.
    let room = cylo_usage::RunOptions {
        max_tasks: 64,
        ..Default::default()
    };
    let run = t.attach_with(pid as libc::pid_t, room).unwrap();
    let u = run.usage_totals().unwrap();
    assert_eq!(u.thread_count, 11, "{u:?}");
    drop(target.stdin.take());
    target.wait().unwrap();
    drop(run);
}
