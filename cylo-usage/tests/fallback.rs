//! The /proc fallback (no eBPF: no privileges, or no kernel BTF) and `get_resource_usage`,
//! against the real kernel. The unprivileged tests run as root and drop to nobody (65534)
//! for the command under test; their ground truth (a cpuacct group) is set up as root first.
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    CpuGroup, NOBODY, Scratch, WORKLOAD, as_nobody, can_drop_privileges, cpu_group, rel_diff,
    tracker, workload,
};
use cylo_usage::{
    Precision, ProcTracker, ResourceUsage, RunOptions, TrackerKind, get_resource_usage,
};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no report at {}: {e}", path.display()));
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The notes name `field` (each note is "field, field: why").
fn noted(u: &serde_json::Value, field: &str) -> bool {
    u["precision_notes"].as_array().unwrap().iter().any(|n| {
        let n = n.as_str().unwrap();
        n.split_once(':')
            .is_some_and(|(fields, _)| fields.split(", ").any(|f| f == field))
    })
}

/// A shell script that moves the shell into `group` first, writes the CPU time the shell had
/// used until then (its schedstat runtime, ns) to `note`, then runs `rest`. The group counts
/// from the move on; [`truth`] adds the note: the whole tree's CPU time. (Under emulation,
/// as in `cargo xtask vm-test`, a shell's start alone can cost 1% of a test tree.)
fn in_group(group: &CpuGroup, note: &Path, rest: &str) -> String {
    format!(
        "echo 0 > {} && read -r ns more < /proc/self/schedstat && echo $ns > {} && {rest}",
        group.procs_file().display(),
        note.display()
    )
}

/// The kernel's CPU time of a tree started by [`in_group`].
fn truth(group: &CpuGroup, note: &Path) -> u64 {
    let before: u64 = std::fs::read_to_string(note)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    group.usage_ns() + before
}

/// Checks the fallback's CPU time `ours` against cpuacct's `truth` for a tree of `processes`
/// processes the reaper waited for. `wait4()` reads a process's CPU when its parent reaps it,
/// which can come before the process's last context switch, so the fallback may miss the
/// last instants of each exit (the README's "Without eBPF" says so): never more than the
/// truth (1% for the shell's note, which counts its few µs between the move and the read
/// twice), and less by at most 1% on a real CPU. Under emulation (`cargo xtask vm-test`,
/// qemu TCG) an exit's tail is longer, and the host may preempt the guest's CPU within it
/// (the guest counts that as runtime): the README's 1% to 7%, plus 100 µs per reaped process.
fn assert_cpu_from_wait4(ours: u64, truth: u64, processes: u64) {
    let missing = truth.saturating_sub(ours);
    let (share, tail_ns) = if std::env::var_os("CYLO_USAGE_VM").is_some() {
        (0.07, processes * 100_000)
    } else {
        (0.01, 0)
    };
    eprintln!(
        "fallback CPU {ours} ns vs cpuacct {truth} ns: {:.3}% ({missing} ns missing, {tail_ns} ns allowed for the exits' tails)",
        rel_diff(ours, truth) * 100.0
    );
    assert!(
        ours as f64 <= truth as f64 * 1.01,
        "ours {ours} is more than cpuacct's {truth}"
    );
    assert!(
        (missing as f64) < truth as f64 * share + tail_ns as f64,
        "ours {ours} vs cpuacct {truth}: {missing} ns missing ({:.2}%), more than {}% + {tail_ns} ns",
        rel_diff(ours, truth) * 100.0,
        share * 100.0
    );
}

#[test]
fn unprivileged_run_gets_cpu_from_wait4_and_waits_for_the_daemon() {
    if !can_drop_privileges() {
        return;
    }
    let Some(group) = cpu_group() else { return };
    group.allow(NOBODY);
    let s = Scratch::new("fallback-run");
    let w = s.workload.display().to_string();
    // The shell moves itself into the group first (as nobody), then: 320 children that exit
    // at once, each waited for; 8 threads; a double-forked setsid daemon that burns after
    // the shell has exited.
    let note = s.dir.join("before-group");
    let script = in_group(
        &group,
        &note,
        &format!("{w} storm 320 && {w} threads 8 60 && {w} daemon 200"),
    );
    let out = s.dir.join("report.json");
    let o = as_nobody(
        &s.cli,
        &[
            "run",
            "--json",
            "-o",
            out.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            &script,
        ],
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The report is written once every process has ended: the daemon included.
    assert!(
        group.pids().is_empty(),
        "still in the group: {:?}",
        group.pids()
    );
    let truth = truth(&group, &note);
    let u = report(&out);
    assert_eq!(u["tracker"], "proc", "{u}");
    assert_eq!(u["precision"], "approximate", "{u}");
    // wait4's figures of each reaped process: each process's own split.
    assert_eq!(u["cpu_split"], "per_process", "{u}");
    let why = u["precision_notes"][0].as_str().unwrap();
    assert!(why.contains("CAP_BPF"), "the fallback says why: {why}");
    for field in [
        "cpu_time_ns",
        "process_count",
        "thread_count",
        "peak_process_count",
        "peak_memory_bytes",
        "max_process_rss_bytes",
    ] {
        assert!(noted(&u, field), "no note for {field}: {u}");
    }
    let cpu = u["cpu_time_ns"].as_u64().unwrap();
    // sh, storm and its 320 children, threads, daemon with its child and grandchild.
    let truth_processes = 1 + 321 + 1 + 3;
    assert_cpu_from_wait4(cpu, truth, truth_processes);
    // 8 × 60 ms of threads and the daemon's 200 ms, which it burns after the root exited.
    assert!(cpu >= 680_000_000, "{u}");
    assert!(u["wall_time_ms"].as_u64().unwrap() >= 300, "{u}");
    let processes = u["process_count"].as_u64().unwrap();
    assert!(
        (1..=truth_processes).contains(&processes),
        "{processes} processes: never more than the truth ({truth_processes})"
    );
    assert!(
        u["thread_count"].as_u64().unwrap() <= truth_processes + 8,
        "{u}"
    );
    assert_eq!(u["live_process_count"], 0, "{u}");
    assert_eq!(u["exit_code"], 0, "{u}");
    // The sampled counts say they are lower bounds.
    assert_eq!(
        u["lower_bounds"],
        serde_json::json!(["process_count", "thread_count", "peak_process_count"]),
        "{u}"
    );
    for unknowable in [
        "io_read_chars",
        "disk_devices",
        "disk_cancelled_write_bytes",
    ] {
        assert!(u[unknowable].is_null(), "{unknowable}: null, never 0: {u}");
    }
    assert!(u["disk_bytes_read"].is_u64(), "from rusage: {u}");
}

#[test]
fn unprivileged_counts_say_at_least_in_the_text() {
    if !can_drop_privileges() {
        return;
    }
    let s = Scratch::new("fallback-at-least");
    let o = as_nobody(
        &s.cli,
        &["run", "--", "/bin/sh", "-c", "/bin/true; /bin/true"],
    )
    .env("CYLO_USAGE_SOCKET", "/nonexistent/cylo-usage-tests.sock")
    .stdin(Stdio::null())
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("\tTracker: proc "), "{err}");
    for label in ["Processes", "Threads", "Most processes alive at once"] {
        let line = err
            .lines()
            .find(|l| l.starts_with(&format!("\t{label}: ")))
            .unwrap_or_else(|| panic!("no {label}: {err}"));
        let (_, value) = line.split_once(": ").unwrap();
        let n = value
            .strip_prefix("at least ")
            .unwrap_or_else(|| panic!("{line:?}"));
        assert!(n.parse::<u64>().unwrap() >= 1, "{line:?}");
    }
    // The exact figures do not: the CPU time, the exit status.
    assert!(!err.contains("CPU time (seconds): at least"), "{err}");
}

#[test]
fn unprivileged_require_exact_fails_naming_the_capability() {
    if !can_drop_privileges() {
        return;
    }
    let s = Scratch::new("fallback-exact");
    let marker = s.dir.join("ran");
    let o = as_nobody(
        &s.cli,
        &[
            "run",
            "--require-exact",
            "--",
            "/bin/sh",
            "-c",
            &format!("touch {}", marker.display()),
        ],
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("CAP_BPF") && err.contains("CAP_PERFMON"),
        "{err}"
    );
    assert!(!marker.exists(), "the command must not run");
}

#[test]
fn without_btf_the_fallback_is_used_and_says_why() {
    // Needs the privileges, so that BTF is what is missing.
    if tracker().is_none() {
        return;
    }
    let o = Command::new(common::CLI)
        .args(["run", "--json", "--", WORKLOAD, "burn", "100"])
        .env("CYLO_USAGE_TEST_BTF", "/nonexistent/vmlinux")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let u: serde_json::Value = serde_json::from_str(stderr(&o).trim()).unwrap();
    assert_eq!(u["tracker"], "proc", "{u}");
    assert_eq!(u["precision"], "approximate");
    let why = u["precision_notes"][0].as_str().unwrap();
    assert!(
        why.contains("/nonexistent/vmlinux") && why.contains("BTF"),
        "{why}"
    );
    assert!(u["cpu_time_ns"].as_u64().unwrap() >= 100_000_000, "{u}");
    assert_eq!(u["process_count"], 1, "{u}");
    // With --require-exact: an error naming the missing BTF, and nothing run.
    let o = Command::new(common::CLI)
        .args(["run", "--require-exact", "--", WORKLOAD, "burn", "100"])
        .env("CYLO_USAGE_TEST_BTF", "/nonexistent/vmlinux")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn unprivileged_timeout_kills_the_tree_and_tree_is_refused() {
    if !can_drop_privileges() {
        return;
    }
    let Some(group) = cpu_group() else { return };
    group.allow(NOBODY);
    let s = Scratch::new("fallback-timeout");
    let w = s.workload.display().to_string();
    let out = s.dir.join("report.json");
    // The root ignores SIGTERM; a daemon that left the session ignores it too.
    let note = s.dir.join("before-group");
    let script = in_group(
        &group,
        &note,
        &format!("trap '' TERM && {{ {w} daemon 100000 & sleep 100; }}"),
    );
    let start = Instant::now();
    let o = as_nobody(
        &s.cli,
        &[
            "run",
            "--json",
            "-o",
            out.to_str().unwrap(),
            "--timeout",
            "700ms",
            "--kill-after",
            "300ms",
            "--",
            "/bin/sh",
            "-c",
            &script,
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(start.elapsed() < Duration::from_secs(20));
    let u = report(&out);
    assert_eq!(
        (&u["tracker"], &u["timed_out"]),
        (&"proc".into(), &true.into())
    );
    assert_eq!(u["live_process_count"], 0, "{u}");
    assert_eq!(u["signal"], 9, "the root ignored SIGTERM: {u}");
    // The daemon burned CPU until SIGKILL and was reaped: its CPU is in the total.
    assert!(group.pids().is_empty(), "survivors: {:?}", group.pids());
    let (cpu, truth) = (u["cpu_time_ns"].as_u64().unwrap(), truth(&group, &note));
    // sh, the daemon's shell, the daemon with its child and grandchild, sleep.
    assert_cpu_from_wait4(cpu, truth, 6);
    // What the fallback cannot give, it refuses in one line.
    for flag in [&["--tree"][..], &["--events", "-"][..]] {
        let mut args = vec!["run"];
        args.extend(flag);
        args.extend(["--", "/bin/true"]);
        let o = as_nobody(&s.cli, &args).output().unwrap();
        assert_eq!(o.status.code(), Some(125), "{flag:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(flag[0]) && err.contains("CAP_BPF"), "{err}");
    }
}

/// Waits until `pid`'s tree has `n` processes and `t` threads.
fn until_tree(pid: u32, n: u64, t: u64) -> ResourceUsage {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let u = get_resource_usage(pid as i32).unwrap();
        if (u.process_count, u.thread_count) == (n, t) {
            return u;
        }
        assert!(
            Instant::now() < deadline,
            "never {n} processes and {t} threads: {u:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn unprivileged_attach_samples_the_users_own_tree() {
    if !can_drop_privileges() {
        return;
    }
    let s = Scratch::new("fallback-attach");
    let mut target = as_nobody(&s.workload, &["hold-threads", "3", "2"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = target.id();
    // (setpriv execs the workload: same pid.) The root with 2 more threads, 3 children.
    until_tree(pid, 4, 6);
    let out = s.dir.join("report.json");
    let attach = as_nobody(
        &s.cli,
        &[
            "attach",
            "--json",
            "-o",
            out.to_str().unwrap(),
            &pid.to_string(),
        ],
    )
    .stdin(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Release the tree: every process reads stdin until it closes.
    drop(target.stdin.take());
    let o = attach.wait_with_output().unwrap();
    let _ = target.wait();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let u = report(&out);
    assert_eq!(u["tracker"], "proc", "{u}");
    assert_eq!(u["attached"], true);
    assert_eq!(u["precision"], "approximate");
    assert_eq!(u["process_count"], 4, "{u}");
    assert_eq!(u["usage_before_attach"]["process_count"], 4, "{u}");
    assert_eq!(u["usage_before_attach"]["thread_count"], 4 + 2, "{u}");
    assert_eq!(u["live_process_count"], 0, "{u}");
    assert!(
        noted(&u, "cpu_time_ns") && noted(&u, "process_count"),
        "{u}"
    );
    assert!(u["max_process_rss_bytes"].is_null(), "{u}");
    assert_eq!(
        u["lower_bounds"],
        serde_json::json!(["process_count", "thread_count", "peak_process_count"]),
        "{u}"
    );

    // Another user's process: refused, in one line that says why.
    let o = as_nobody(&s.cli, &["attach", "1"]).output().unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        "cylo-usage: cannot attach to process 1: it belongs to another user (uid 0); one may \
         attach only to one's own processes (root may attach to any)\n"
    );
}

#[tokio::test]
async fn the_library_fallback_reaps_only_its_tree_and_matches_cpuacct() {
    let Some(group) = cpu_group() else { return };
    let tracker = ProcTracker::new("test: no eBPF wanted", Duration::from_millis(10));
    // A child of the host process outside the tree: the reaper must not take it.
    let mut outsider = Command::new("/bin/sh")
        .args(["-c", "sleep 1; exit 7"])
        .spawn()
        .unwrap();
    let note = std::env::temp_dir().join(format!("cylo-usage-lib-fb-{}", std::process::id()));
    let script = in_group(
        &group,
        &note,
        &format!("{WORKLOAD} fork 20; {WORKLOAD} threads 3 60; {WORKLOAD} daemon 150"),
    );
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", &script]);
    let run = tracker.spawn(&mut cmd).unwrap();
    // A live snapshot while it runs.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let live = run.usage().unwrap();
    assert_eq!(live.tracker, TrackerKind::Proc);
    assert!(live.process_count >= 1, "{live:?}");
    tokio::time::timeout(Duration::from_secs(60), async {
        let status = run
            .wait_root()
            .await
            .expect("a spawned root's status is known");
        assert!(status.success());
        run.wait_finished().await;
    })
    .await
    .unwrap();
    let u = run.usage().unwrap();
    assert_eq!(
        outsider.wait().unwrap().code(),
        Some(7),
        "the host's own child"
    );
    let truth = truth(&group, &note);
    let _ = std::fs::remove_file(&note);
    assert_cpu_from_wait4(u.cpu_time_ns, truth, 1 + 21 + 1 + 3);
    assert!(u.process_count <= 1 + 21 + 1 + 3, "{u:?}");
    assert_eq!(
        (u.precision, u.exit_code, u.live_process_count),
        (Precision::Approximate, Some(0), 0)
    );
    assert!(u.precision_notes[0].contains("test: no eBPF wanted"));
    // The breakdown is refused, not made up.
    let options = RunOptions {
        tree: true,
        ..RunOptions::default()
    };
    let e = tracker
        .spawn_with(&mut Command::new("/bin/true"), options)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("--tree"), "{e}");
}

#[tokio::test]
async fn the_library_fallback_kills_what_the_tree_became() {
    // Two groups: the daemon's own, and the rest of the tree.
    let (Some(group), Some(daemon_group)) = (cpu_group(), cpu_group()) else {
        return;
    };
    let tracker = ProcTracker::new("test", Duration::from_millis(10));
    let note = std::env::temp_dir().join(format!("cylo-usage-lib-kill-{}", std::process::id()));
    let daemon = format!(
        "/bin/sh -c 'echo 0 > {} && exec {WORKLOAD} daemon 100000'",
        daemon_group.procs_file().display()
    );
    let script = in_group(
        &group,
        &note,
        &format!("{{ {daemon} & while true; do {WORKLOAD} storm 100; done; }}"),
    );
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", &script]);
    let mut run = tracker.spawn(&mut cmd).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let signalled = run.kill(libc::SIGKILL).unwrap();
    assert!(signalled >= 2, "{signalled}");
    run.set_timed_out();
    tokio::time::timeout(Duration::from_secs(30), run.wait_finished())
        .await
        .expect("everything died");
    let u = run.usage().unwrap();
    assert_eq!(
        (u.signal, u.live_process_count, u.timed_out),
        (Some(9), 0, true)
    );
    // Nothing of the tree is left.
    assert!(group.pids().is_empty(), "survivors: {:?}", group.pids());
    assert!(daemon_group.pids().is_empty(), "{:?}", daemon_group.pids());
    // The daemon's CPU came back through the reaper, and nothing is counted twice. The
    // storms' thousands of processes may each lose the last instants of their exit (reaped
    // before their last context switch): nothing here, a few percent of the total under
    // emulation (vm-test). So: what is missing must be far less than the daemon's part.
    let daemon = daemon_group.usage_ns();
    let total = truth(&group, &note) + daemon;
    let _ = std::fs::remove_file(&note);
    let ours = u.cpu_time_ns;
    assert!(
        ours as f64 <= total as f64 * 1.01 && total.saturating_sub(ours) < daemon / 2,
        "ours {ours}, the whole tree {total}, of which the daemon {daemon}"
    );
}

#[test]
fn get_resource_usage_counts_processes_not_threads() {
    let mut tree = workload(&["hold-threads", "4", "3"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = tree.id();
    let u = until_tree(pid, 5, 8);
    // Stable: the same again.
    std::thread::sleep(Duration::from_millis(50));
    let u2 = get_resource_usage(pid as i32).unwrap();
    drop(tree.stdin.take());
    assert!(tree.wait().unwrap().success());
    assert_eq!(u2.process_count, 5, "{u2:?}");
    // A snapshot splits the tree's sums at once, and says so.
    assert_eq!(u2.cpu_split, cylo_usage::CpuSplit::Tree, "{u2:?}");
    assert_eq!(u2.thread_count, 5 + 3, "{u2:?}");
    assert_eq!(u2.live_process_count, 5, "{u2:?}");
    assert_eq!(
        (u2.tracker, u2.precision),
        (TrackerKind::Proc, Precision::Approximate)
    );
    assert!(u2.memory_bytes.unwrap() > 0 && u2.max_process_rss_bytes.unwrap() > 0);
    assert!(u2.cpu_time_ns > 0 && u.cpu_time_ns <= u2.cpu_time_ns);
    assert!(u2.disk_bytes_read.is_some(), "{u2:?}");
    assert_eq!(u2.peak_memory_bytes, None, "unknowable in a snapshot");
    assert!(!u2.precision_notes.is_empty());
}

#[test]
fn get_resource_usage_while_processes_exit() {
    // A tree that forks and reaps without pause: children vanish while they are read.
    let mut storm = Command::new("/bin/sh")
        .args(["-c", &format!("while true; do {WORKLOAD} storm 1000; done")])
        .spawn()
        .unwrap();
    let pid = storm.id() as i32;
    // At least 300 calls, and until one has caught a child of the storm (the walk found it
    // listed, so its neighbours in time vanished between listing and reading).
    let (mut calls, mut seen_child) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while calls < 300 || seen_child == 0 {
        assert!(
            Instant::now() < deadline,
            "never caught a child of the storm in {calls} calls"
        );
        let u = get_resource_usage(pid).expect("a vanishing descendant is not an error");
        // sh, one storm, and at most one of its children at a time.
        assert!((1..=3).contains(&u.process_count), "{u:?}");
        seen_child += u64::from(u.process_count == 3);
        calls += 1;
    }
    let _ = storm.kill();
    let _ = storm.wait();

    // The pid itself exits (and is reaped) during the calls.
    let mut child = workload(&["burn", "200"]).spawn().unwrap();
    let pid = child.id() as i32;
    let reaper = std::thread::spawn(move || child.wait().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ok = 0;
    loop {
        match get_resource_usage(pid) {
            Ok(u) => {
                assert_eq!(u.process_count, 1, "{u:?}");
                ok += 1;
            }
            Err(e) if e.is_no_such_process() => break,
            Err(e) => panic!("only 'no such process' when it is gone: {e}"),
        }
        assert!(Instant::now() < deadline, "never gone");
    }
    assert!(reaper.join().unwrap().success());
    assert!(ok > 0);
}

#[test]
fn get_resource_usage_of_what_does_not_exist_is_an_error() {
    let pid_max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for pid in [0, -1, pid_max] {
        let e = get_resource_usage(pid).unwrap_err();
        assert!(e.is_no_such_process(), "{pid}: {e}");
    }
}

#[test]
fn get_resource_usage_of_another_users_process_is_a_permission_error() {
    if !can_drop_privileges() {
        return;
    }
    let s = Scratch::new("fallback-snapshot");
    // pid 1 is root's.
    let o = as_nobody(&s.workload, &["snapshot", "1"]).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "permission denied: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("/proc/1/"), "{}", stderr(&o));
    // Its own: fine.
    let mut own = as_nobody(&s.workload, &["hold", "2"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = own.id();
    until_tree(pid, 3, 3);
    let o = as_nobody(&s.workload, &["snapshot", &pid.to_string()])
        .output()
        .unwrap();
    drop(own.stdin.take());
    let _ = own.wait();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let u: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(u["process_count"], 3, "{u}");
    assert_eq!(u["tracker"], "proc");
}

/// The /proc fallback's attach counts the same past as the eBPF tracker's: exited threads
/// and reaped children (in /proc/PID/stat and /proc/PID/io), at clock-tick resolution.
#[test]
fn fallback_usage_before_attach_covers_exited_threads_and_reaped_children() {
    let s = Scratch::new("fallback-past");
    let past = common::PastLives::start(&s.dir, 500, 300, 3 << 20);
    let proc_then = common::PastLives::proc_figures(&past);
    let tracker = ProcTracker::new("test", Duration::from_millis(10));
    let run = tracker.attach(past.pid() as libc::pid_t).expect("attach");
    let proc_now = past.proc_figures();
    assert_eq!(proc_then, proc_now, "the workload idles");
    let u = run.usage().unwrap();
    assert_eq!(u.tracker, TrackerKind::Proc);
    let before = u
        .usage_before_attach
        .clone()
        .expect("usage before the attach");
    assert_eq!((before.process_count, before.thread_count), (1, 1));
    past.check(&before, proc_now, true);
    past.finish();
}
