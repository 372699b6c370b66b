//! Tracing sessions against the real kernel: attaching to running trees, the per-process
//! breakdown and its sums, the event stream, killing a whole tree, hostile names, and the
//! tracker inside its own pid namespace.
mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{CLI, WORKLOAD, cli, cpu_group, rel_diff, stderr, tracker, workload};
use cylo_usage::{Precision, ProcessUsage, ResourceUsage, RunOptions};

fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {text}"))
}

/// The breakdown adds up to the totals exactly: CPU, threads, disk and I/O bytes.
fn assert_parts_sum(u: &ResourceUsage) {
    let ps = u.processes.as_ref().expect("a breakdown");
    let sum = |f: fn(&ProcessUsage) -> u64| ps.iter().map(f).sum::<u64>();
    assert_eq!(ps.len() as u64, u.process_count, "one entry per process");
    assert_eq!(sum(|p| p.cpu_time_ns), u.cpu_time_ns, "CPU");
    assert_eq!(sum(|p| p.thread_count), u.thread_count, "threads");
    let opt = |f: fn(&ProcessUsage) -> Option<u64>| ps.iter().map(f).sum::<Option<u64>>();
    assert_eq!(opt(|p| p.disk_bytes_read), u.disk_bytes_read, "disk read");
    assert_eq!(
        opt(|p| p.disk_bytes_written),
        u.disk_bytes_written,
        "disk written"
    );
    assert_eq!(
        opt(|p| p.disk_cancelled_write_bytes),
        u.disk_cancelled_write_bytes
    );
    assert_eq!(opt(|p| p.io_read_chars), u.io_read_chars, "rchar");
    assert_eq!(opt(|p| p.io_write_chars), u.io_write_chars, "wchar");
    assert_eq!(opt(|p| p.network_bytes_sent), u.network_bytes_sent, "sent");
    assert_eq!(
        opt(|p| p.network_bytes_received),
        u.network_bytes_received,
        "received"
    );
}

/// An in-memory NDJSON sink.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn events(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines().map(json_of).collect()
    }
}

fn count(events: &[serde_json::Value], kind: &str) -> usize {
    events.iter().filter(|e| e["event"] == kind).count()
}

#[tokio::test]
async fn attach_follows_a_tree_that_keeps_forking() {
    let Some(t) = tracker() else { return };
    let Some(group) = cpu_group() else { return };
    // Started outside the tracker: 4 workers and a forker that makes a child every ms; all
    // block on stdin, so nothing has exited before the attach.
    let mut cmd = workload(&["attach-target", "4"]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    group.join(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let lines = Lines::default();
    let options = RunOptions {
        tree: true,
        events: Some(Box::new(lines.clone())),
        ..RunOptions::default()
    };
    let begun = Instant::now();
    let mut run = t
        .attach_with(child.id() as libc::pid_t, options)
        .expect("attach");
    let attach_ms = begun.elapsed().as_millis();
    // It keeps forking after the attach too: wait for ten processes born since (however
    // slow the machine), from the kernel's own count (cheap, unlike a /proc snapshot).
    let adopted = run.counters().unwrap().processes_started;
    let deadline = Instant::now() + Duration::from_secs(30);
    while run.counters().unwrap().processes_started < adopted + 10 {
        assert!(Instant::now() < deadline, "no fork after the attach");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(child.stdin.take());
    tokio::time::timeout(Duration::from_secs(60), async {
        run.wait_root().await.expect("root");
        run.wait_finished().await.expect("tree");
    })
    .await
    .expect("finished in time");
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let truth: u64 = out.trim().parse().unwrap();
    let u = run.usage().unwrap();
    assert_eq!(u.lost_events, 0, "{u:?}");
    assert_eq!(u.precision, Precision::Exact);
    assert!(u.attached);
    assert_eq!(
        u.exit_code,
        status.code(),
        "the kernel's exit status is wait()'s"
    );
    assert_eq!(
        u.process_count, truth,
        "every process, old and new (attach {attach_ms} ms)"
    );
    assert_eq!(u.live_process_count, 0);
    let before = u
        .usage_before_attach
        .clone()
        .expect("usage before the attach");
    assert!(
        before.process_count >= 6,
        "root, 4 workers, forker at least: {before:?}"
    );
    assert!(
        u.process_count >= before.process_count + 10,
        "it kept forking: {u:?}"
    );
    // Whole lives = since + before: the cgroup's own figure (nothing exited before).
    let lives = u.cpu_time_ns + before.cpu_time_ns;
    let cgroup = group.usage_ns();
    assert!(
        rel_diff(lives, cgroup) < 0.02,
        "since {} + before {} = {lives} vs cpuacct {cgroup}",
        u.cpu_time_ns,
        before.cpu_time_ns
    );
    // 4 × 50 ms + 5 ms per forked child, all after the attach.
    assert!(u.cpu_time_ns >= 200_000_000, "{u:?}");
    assert_parts_sum(&u);
    let events = lines.events();
    assert_eq!(count(&events, "fork") as u64, truth, "one fork per process");
    assert_eq!(count(&events, "exit") as u64, truth, "one exit per process");
    let attached = events
        .iter()
        .filter(|e| e["event"] == "fork" && e["attached"] == true)
        .count() as u64;
    assert_eq!(attached, before.process_count);
}

#[tokio::test]
async fn attach_refuses_what_cannot_be_followed() {
    let Some(t) = tracker() else { return };
    use cylo_usage::SessionError as E;
    let me = std::process::id();
    assert!(matches!(t.attach(me as libc::pid_t), Err(E::Itself { .. })));
    assert!(matches!(
        t.attach(libc::pid_t::MAX),
        Err(E::NoSuchProcess { .. })
    ));
    // 0 and negative pids name no process (kill(2) would take them for groups).
    for pid in [0, -1, -(std::process::id() as libc::pid_t)] {
        assert!(
            matches!(t.attach(pid), Err(E::NoSuchProcess { pid: p }) if p == pid),
            "{pid}"
        );
    }
    // A zombie: a child that exited and was not waited for.
    let mut zombie = Command::new("/bin/true").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(matches!(
        t.attach(zombie.id() as libc::pid_t),
        Err(E::Zombie { .. })
    ));
    zombie.wait().unwrap();
    // Through the command line: one line, exit 125, nothing run.
    let o = cli(&["attach", "4000000"]);
    assert_eq!(o.status.code(), Some(125));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("no process 4000000"), "{}", stderr(&o));
    if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
        let o = cli(&["attach", "2"]);
        assert_eq!(o.status.code(), Some(125));
        assert!(stderr(&o).contains("kernel thread"), "{}", stderr(&o));
    }
    let o = cli(&["attach", "not-a-pid"]);
    assert_eq!(o.status.code(), Some(125));
    // The slots were all given back.
    for _ in 0..300 {
        assert!(matches!(
            t.attach(libc::pid_t::MAX),
            Err(E::NoSuchProcess { .. })
        ));
    }
    let u = common::run_to_end(&t, Command::new("/bin/true").arg("x")).await;
    assert_eq!(u.process_count, 1);
}

#[test]
fn attach_to_its_own_ancestor_leaves_itself_out() {
    if tracker().is_none() {
        return;
    }
    let dir = tempdir("ancestor");
    let report = dir.join("report.json");
    let events = dir.join("events.ndjson");
    // The shell starts the tracker on itself, waits (with builtins only: no process) until
    // the tracker says it has attached, runs two more commands and exits without waiting for
    // the tracker, which ends when the last of the shell's tree has.
    let script = format!(
        "({CLI} attach --json -o {r} --events {e} $$ &); \
         while :; do while read -r l; do case $l in *'\"attached\"'*) break 2;; esac; \
         done < {e}; done 2>/dev/null; /bin/true; /bin/true; exit 0",
        r = report.display(),
        e = events.display()
    );
    let o = Command::new("/bin/sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&report)
            && text.ends_with('\n')
        {
            break text;
        }
        assert!(Instant::now() < deadline, "no report from the attach");
        std::thread::sleep(Duration::from_millis(50));
    };
    let j = json_of(&text);
    assert_eq!(j["attached"], true);
    assert_eq!(j["exit_code"], 0, "{j}");
    assert_eq!(j["lost_events"], 0, "{j}");
    // The shell and the two /bin/true: not the tracker (nor its subshell).
    assert_eq!(j["process_count"], 3, "{j}");
}

#[tokio::test]
async fn the_breakdown_sums_to_the_totals_and_cpu_matches_cpuacct() {
    let Some(t) = tracker() else { return };
    let Some(group) = cpu_group() else { return };
    let script = format!(
        "{WORKLOAD} fork 20; {WORKLOAD} threads 3 60; {WORKLOAD} daemon 100; \
         {WORKLOAD} burn 50; /bin/true a b c; exit 0"
    );
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", &script]);
    group.join(&mut cmd);
    let options = RunOptions {
        tree: true,
        ..RunOptions::default()
    };
    let mut run = t.spawn_with(&mut cmd, options).unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        run.wait_root().await.unwrap();
        run.wait_finished().await.unwrap();
    })
    .await
    .unwrap();
    let u = run.usage().unwrap();
    assert_eq!((u.lost_events, u.precision), (0, Precision::Exact));
    assert_parts_sum(&u);
    let truth = group.usage_ns();
    assert!(
        rel_diff(u.cpu_time_ns, truth) < 0.02,
        "ours {} vs cpuacct {truth}",
        u.cpu_time_ns
    );
    let ps = u.processes.unwrap();
    // sh, fork + 20 children, threads, daemon + 2, burn, true.
    assert_eq!(ps.len(), 1 + 21 + 1 + 3 + 1 + 1, "{ps:#?}");
    let root = &ps[0];
    assert_eq!(root.parent_index, None);
    assert_eq!(root.argv.as_ref().unwrap()[0], "/bin/sh");
    let threads = ps
        .iter()
        .find(|p| {
            p.argv
                .as_ref()
                .is_some_and(|a| a.get(1).is_some_and(|x| x == "threads"))
        })
        .unwrap();
    assert_eq!(threads.thread_count, 4);
    assert!(threads.cpu_time_ns >= 180_000_000, "{threads:?}");
    let truep = ps.iter().find(|p| p.comm == "true").unwrap();
    assert_eq!(truep.argv.as_deref().unwrap(), ["/bin/true", "a", "b", "c"]);
    assert_eq!(truep.filename.as_deref(), Some("/bin/true"));
    assert_eq!(ps[truep.parent_index.unwrap()].pid, root.pid);
    assert!(
        ps.iter()
            .all(|p| p.end_ns.is_some() && p.exit_code == Some(0))
    );
    assert!(
        ps.iter()
            .all(|p| p.start_ns >= 0 && p.end_ns.unwrap() >= p.start_ns as u64)
    );
}

#[test]
fn events_stream_one_fork_and_one_exit_per_process() {
    if tracker().is_none() {
        return;
    }
    let dir = tempdir("events");
    let file = dir.join("events.ndjson");
    // `exit 0` last: a shell may exec its last command instead of forking it.
    let script = format!("{WORKLOAD} storm 100; /bin/true; /bin/true; exit 0");
    let o = cli(&[
        "run",
        "--json",
        "--events",
        file.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let u = json_of(&stderr(&o));
    assert!(
        u.get("processes").is_none(),
        "--events alone keeps no breakdown"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let events: Vec<serde_json::Value> = text.lines().map(json_of).collect();
    assert_eq!(events[0]["event"], "start");
    assert!(events[0]["unix_time_ns"].as_u64().unwrap() > 1_600_000_000_000_000_000);
    // sh, the workload and its 100 children, two /bin/true.
    assert_eq!(u["process_count"], 104);
    assert_eq!(count(&events, "fork"), 104);
    assert_eq!(count(&events, "exit"), 104);
    // sh itself, the workload, two /bin/true: the storm's children do not exec.
    assert_eq!(count(&events, "exec"), 4);
    let mut per_pid: HashMap<u64, Vec<&str>> = HashMap::new();
    let mut last = 0;
    for e in &events[1..] {
        let t = e["time_ns"].as_u64().unwrap();
        assert!(t >= last, "time goes forward: {e}");
        last = t;
        per_pid
            .entry(e["pid"].as_u64().unwrap())
            .or_default()
            .push(e["event"].as_str().unwrap());
    }
    for (pid, seq) in per_pid {
        assert_eq!(seq.first(), Some(&"fork"), "{pid}: {seq:?}");
        assert_eq!(seq.last(), Some(&"exit"), "{pid}: {seq:?}");
    }
    let root = events.iter().find(|e| e["root"] == true).unwrap();
    assert_eq!(root["event"], "fork");
}

#[test]
fn events_of_a_thousand_process_tree_are_in_time_order_and_exits_carry_the_breakdown() {
    if tracker().is_none() {
        return;
    }
    let dir = tempdir("events-order");
    let file = dir.join("events.ndjson");
    // Forks and exits on every CPU at once: 500 children alive together, 500 one after the
    // other, and processes with threads.
    let script = format!(
        "{WORKLOAD} fork 500 & {WORKLOAD} storm 500 & {WORKLOAD} threads 3 20 & wait; exit 0"
    );
    let o = cli(&[
        "run",
        "--json",
        "--tree",
        "--events",
        file.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let u = json_of(&stderr(&o));
    assert_eq!(u["lost_events"], 0, "{u}");
    let processes = u["processes"].as_array().expect("a breakdown");
    assert!(processes.len() >= 1_000, "{}", processes.len());
    let text = std::fs::read_to_string(&file).unwrap();
    let events: Vec<serde_json::Value> = text.lines().map(json_of).collect();
    let times: Vec<u64> = events
        .iter()
        .map(|e| e["time_ns"].as_u64().expect("time_ns"))
        .collect();
    let back: Vec<(usize, u64, u64)> = times
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] < w[0])
        .map(|(i, w)| (i, w[0], w[1]))
        .collect();
    assert!(
        back.is_empty(),
        "{} steps back: {:?}",
        back.len(),
        &back[..back.len().min(5)]
    );
    assert_eq!(count(&events, "exit"), processes.len());
    // Every field of a breakdown entry is in every exit event (compared by name, so a field
    // added to the breakdown later is caught), and nothing else but the event's own.
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort_unstable();
        k
    };
    let entry = keys(&processes[0]);
    assert!(entry.contains(&"disk_cancelled_write_bytes".to_string()));
    let mut by_pid: HashMap<u64, &serde_json::Value> = HashMap::new();
    for p in processes {
        by_pid.insert(p["pid"].as_u64().unwrap(), p);
    }
    for e in events.iter().filter(|e| e["event"] == "exit") {
        let mut k = keys(e);
        k.retain(|k| k != "event" && k != "time_ns");
        assert_eq!(k, entry, "{e}");
        assert!(e.get("incomplete").is_none(), "{e}");
        // The same figures as the breakdown's entry (the pid may be reused: last one wins).
        let p = by_pid[&e["pid"].as_u64().unwrap()];
        if p["end_ns"] == e["end_ns"] {
            for f in [
                "cpu_time_ns",
                "cpu_user_ns",
                "cpu_system_ns",
                "thread_count",
            ] {
                assert_eq!(e[f], p[f], "{f}: {e} vs {p}");
            }
        }
    }
}

#[test]
fn a_timeout_kills_the_whole_tree_daemons_included() {
    if tracker().is_none() {
        return;
    }
    // The root ignores SIGTERM; a double-forked setsid daemon burns CPU and ignores it too.
    let script = format!("trap '' TERM; {WORKLOAD} daemon 100000 & sleep 100; exit 0");
    let start = Instant::now();
    let o = cli(&[
        "run",
        "--json",
        "--tree",
        "--timeout",
        "700ms",
        "--kill-after",
        "300ms",
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    let took = start.elapsed();
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(took < Duration::from_secs(20), "{took:?}");
    let u = json_of(&stderr(&o));
    assert_eq!(u["timed_out"], true);
    assert_eq!(u["live_process_count"], 0, "{u}");
    let ps = u["processes"].as_array().unwrap();
    assert!(
        ps.len() >= 5,
        "sh, sleep, workload, its child and the daemon: {u}"
    );
    for p in ps {
        assert!(!p["end_ns"].is_null(), "{p}");
        let pid = p["pid"].as_u64().unwrap();
        // Gone, or at most a zombie waiting for a parent outside the tree.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z "),
            "{pid} survived: {state}"
        );
    }
    let daemon = ps.iter().filter(|p| p["signal"] == 9).count();
    assert!(daemon >= 2, "SIGKILL for what ignored SIGTERM: {u}");
}

#[tokio::test]
async fn kill_reaches_every_member_while_they_fork() {
    let Some(t) = tracker() else { return };
    // A tree that forks as fast as it can, with a daemon that left its session.
    let script = format!(
        "{WORKLOAD} daemon 100000 & while true; do /bin/true; done & \
         while true; do {WORKLOAD} storm 1000; done"
    );
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", &script]);
    let mut run = t.spawn(&mut cmd).unwrap();
    // Once the shell, its background jobs and the storm are going (an emulated guest takes
    // longer than a fixed wait to get there).
    let deadline = std::time::Instant::now() + common::bound(Duration::from_secs(10));
    while run.usage_totals().unwrap().live_process_count < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the tree did not get going"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = run.kill(libc::SIGKILL).unwrap();
    // From the kill on, every member that forks gets SIGKILL in the kernel at its fork, so
    // the forking ones may be gone before userspace lists them; the daemon never forks (it
    // sleeps, then burns): only userspace's signal reaches it.
    assert!(signalled >= 1, "{signalled}");
    tokio::time::timeout(Duration::from_secs(30), async {
        run.wait_root().await.unwrap();
        run.wait_finished().await.unwrap();
    })
    .await
    .expect("everything died");
    let u = run.usage().unwrap();
    assert_eq!(u.live_process_count, 0);
    assert_eq!(u.signal, Some(9));
    assert!(u.process_count > 20, "{u:?}");
}

#[test]
fn hostile_names_and_argv_stay_escaped() {
    if tracker().is_none() {
        return;
    }
    let evil = std::ffi::OsStr::from_bytes(b"\x1b[2J\x1b]0;pwned\x07\n\xff\xfe(x) y");
    // A hostile comm (the workload renames itself) in a tree whose root has a hostile argv.
    let script = format!("{WORKLOAD} hostile-name 20; exit 0");
    let o = Command::new(CLI)
        .args(["run", "--tree", "--", "/bin/sh", "-c", &script])
        .arg(evil)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        !o.stderr.contains(&0x1b),
        "no raw escape reaches the terminal"
    );
    assert!(!o.stderr.contains(&0x07));
    let text = stderr(&o);
    assert!(text.contains("\\u{1b}[2J"), "{text}");
    assert!(text.contains("\\xff\\xfe(x) y"), "{text}");
    let o = Command::new(CLI)
        .args(["run", "--json", "--tree", "--", "/bin/sh", "-c", &script])
        .arg(evil)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let u = json_of(&stderr(&o));
    let ps = u["processes"].as_array().unwrap();
    let argv = ps[0]["argv"].as_array().unwrap();
    assert_eq!(argv[3], "\x1b[2J\x1b]0;pwned\x07\n\\xff\\xfe(x) y");
    let renamed = ps[1]["comm"].as_str().unwrap();
    assert_ne!(
        renamed, "cylo-usage-work",
        "the workload renamed itself: {renamed:?}"
    );
}

#[test]
fn the_tracker_works_inside_its_own_pid_namespace() {
    if tracker().is_none() {
        return;
    }
    if !Command::new("unshare")
        .args(["-fp", "--mount-proc", "/bin/true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIPPED: no unshare(1) with -fp --mount-proc here");
        return;
    }
    let script = format!("{WORKLOAD} storm 10; echo $$; exit 0");
    let o = Command::new("unshare")
        .args(["-fp", "--mount-proc", CLI, "run", "--json", "--tree", "--"])
        .args(["/bin/sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let u = json_of(&stderr(&o));
    assert_eq!(u["process_count"], 12, "{u}");
    assert_eq!(u["lost_events"], 0);
    let shown: u64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    let ps = u["processes"].as_array().unwrap();
    assert_eq!(ps[0]["pid"], shown);
    // The tracker is pid 1 and its threads (loader, verifiers, readers: about ten) come
    // next: a pid of its own namespace, not one of the host's.
    assert!(shown < 32, "{shown}");
    assert!(
        ps.iter().all(|p| p["ns_pid"].is_null()),
        "pids as its namespace sees them"
    );
}

#[test]
fn attach_reports_on_sigterm_with_what_still_runs() {
    if tracker().is_none() {
        return;
    }
    let mut target = Command::new(WORKLOAD)
        .args(["threads", "2", "100000"])
        .spawn()
        .unwrap();
    let mut attach = Command::new(CLI)
        .args(["attach", "--json", &target.id().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    // SAFETY: signals our own child.
    unsafe { libc::kill(attach.id() as i32, libc::SIGTERM) };
    // An attach writes its report to stdout.
    let mut text = String::new();
    attach
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let status = attach.wait().unwrap();
    target.kill().unwrap();
    target.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{text}");
    let u = json_of(&text);
    assert_eq!(u["live_process_count"], 1, "{u}");
    assert_eq!(u["thread_count"], 3, "{u}");
    assert!(u["exit_code"].is_null());
    // Two threads burning since the attach, and before it.
    assert!(u["cpu_time_ns"].as_u64().unwrap() > 0, "{u}");
    assert!(
        u["usage_before_attach"]["cpu_time_ns"].as_u64().unwrap() > 0,
        "{u}"
    );
    assert_eq!(u["usage_before_attach"]["thread_count"], 3, "{u}");
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cylo-usage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn watch_draws_only_on_a_terminal() {
    if tracker().is_none() {
        return;
    }
    // Not a terminal: nothing drawn, the report unchanged.
    let o = cli(&["run", "--watch", "--", "sleep", "0.6"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("\x1b[K"), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("\tCommand being timed"),
        "{}",
        stderr(&o)
    );
    // A terminal (script(1) gives the command a pty): a refreshed status line.
    let command = format!("{CLI} run --watch -- sleep 1.2");
    let Ok(o) = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
    else {
        eprintln!("SKIPPED: no script(1) to give the tracker a terminal");
        return;
    };
    if !o.status.success() {
        eprintln!("SKIPPED: script(1) failed: {}", stderr(&o));
        return;
    }
    let screen = String::from_utf8_lossy(&o.stdout);
    let updates = screen.matches("\r\x1b[K").count();
    assert!(updates >= 2, "a line about twice a second: {screen:?}");
    assert!(screen.contains(" live / "), "{screen:?}");
    assert!(screen.contains("Command being timed"), "{screen:?}");
}

#[tokio::test]
async fn the_breakdown_has_each_process_s_socket_bytes() {
    let Some(t) = tracker() else { return };
    if !t
        .features()
        .iter()
        .any(|f| f.counter == "network_bytes_sent" && f.measured)
    {
        eprintln!("SKIPPED: the network is not measured on this kernel (cylo-usage features)");
        return;
    }
    // TCP: the child writes 300,000 bytes, the parent reads them and writes 50,000 back.
    let options = RunOptions {
        tree: true,
        ..RunOptions::default()
    };
    let mut cmd = workload(&["net", "tcp", "300000", "50000"]);
    let mut run = t.spawn_with(&mut cmd, options).unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        run.wait_root().await.unwrap();
        run.wait_finished().await.unwrap();
    })
    .await
    .unwrap();
    let u = run.usage().unwrap();
    assert_eq!(u.network_bytes_sent, Some(350_000), "{u:?}");
    assert_parts_sum(&u);
    let ps = u.processes.as_ref().unwrap();
    assert_eq!(ps.len(), 2);
    // The parent received 300,000 and sent 50,000; the child the other way round.
    assert_eq!(
        (ps[0].network_bytes_sent, ps[0].network_bytes_received),
        (Some(50_000), Some(300_000))
    );
    assert_eq!(
        (ps[1].network_bytes_sent, ps[1].network_bytes_received),
        (Some(300_000), Some(50_000))
    );
}

#[test]
fn attach_works_inside_a_pid_namespace_with_its_pids() {
    if tracker().is_none() {
        return;
    }
    if !Command::new("unshare")
        .args(["-fp", "--mount-proc", "/bin/true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIPPED: no unshare(1) with -fp --mount-proc here");
        return;
    }
    // In a new pid namespace, the shell is pid 1; its background job (a shell that waits,
    // with builtins only, for a file the test makes once the tracker has attached, then runs
    // /bin/true) is pid 2; the shell then becomes the tracker, attached to it.
    let dir = tempdir("pidns-attach");
    let events = dir.join("events.ndjson");
    let go = dir.join("go");
    let script = format!(
        "sh -c 'while [ ! -e {go} ]; do :; done; /bin/true; exit 0' & \
         exec {CLI} attach --json --tree --events {events} $!",
        go = go.display(),
        events = events.display()
    );
    let child = Command::new("unshare")
        .args(["-fp", "--mount-proc", "/bin/sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&events).is_ok_and(|t| t.contains("\"attached\"")) {
        assert!(Instant::now() < deadline, "the tracker did not attach");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&go, b"").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // An attach writes its report to stdout.
    let u = json_of(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(u["attached"], true);
    assert_eq!(u["lost_events"], 0, "{u}");
    // The job's shell and /bin/true.
    assert_eq!(u["process_count"], 2, "{u}");
    let ps = u["processes"].as_array().unwrap();
    assert_eq!(ps[0]["pid"], 2, "the namespace's own pid: {u}");
    assert!(ps.iter().all(|p| p["pid"].as_u64().unwrap() < 100), "{u}");
}

/// What the processes present at an attach had done is counted over their whole lives: a
/// thread that burnt CPU and moved bytes, then exited, and a child that did the same and was
/// reaped, all before the attach (issue 16).
#[tokio::test]
async fn usage_before_attach_covers_exited_threads_and_reaped_children() {
    let Some(t) = tracker() else { return };
    let dir = std::env::temp_dir().join(format!("cylo-usage-past-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let past = common::PastLives::start(&dir, 500, 300, 3 << 20);
    let proc_then = past.proc_figures();
    let mut run = t.attach(past.pid() as libc::pid_t).expect("attach");
    let proc_now = past.proc_figures();
    assert_eq!(proc_then, proc_now, "the workload idles");
    let u = run.usage().unwrap();
    let before = u
        .usage_before_attach
        .clone()
        .expect("usage before the attach");
    assert_eq!((before.process_count, before.thread_count), (1, 1));
    past.check(&before, proc_now, false);
    past.finish();
    tokio::time::timeout(Duration::from_secs(60), async {
        run.wait_root().await.expect("root");
        run.wait_finished().await.expect("tree");
    })
    .await
    .expect("finished in time");
    let u = run.usage().unwrap();
    // Read once, at the adoption: the end changes nothing of it, and what the tree did since
    // (an idle process's exit) holds nothing of the past.
    assert_eq!(u.usage_before_attach.as_ref(), Some(&before));
    assert!(
        u.cpu_time_ns < before.cpu_time_ns / 4,
        "the past is not counted again after the attach: {u:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Processes present at an attach start before it (negative `start_ns`) and have the argv
/// they were exec'd with, read from /proc/PID/cmdline, bounded and escaped as an exec's.
#[tokio::test]
async fn processes_present_at_an_attach_have_their_real_start_and_argv() {
    let Some(t) = tracker() else { return };
    // A hostile argv: control characters, a backslash, and more than the 256 bytes kept.
    let long = "x".repeat(300);
    let args = ["hold", "2", "a\nb\\n\x1b]0;t\x07", &long];
    // The argv an exec gives the breakdown, for the same command.
    let mut cmd = workload(&args);
    cmd.stdin(Stdio::null());
    let run = t
        .spawn_with(
            &mut cmd,
            RunOptions {
                tree: true,
                ..RunOptions::default()
            },
        )
        .expect("spawn");
    tokio::time::timeout(Duration::from_secs(60), run.wait_finished())
        .await
        .expect("in time")
        .expect("tree");
    let exec = run.usage().unwrap().processes.unwrap();
    let exec_argv = exec[0].argv.clone().expect("an exec's argv");
    assert!(exec[0].argv_truncated);

    let spawned = Instant::now();
    let mut child = workload(&args).stdin(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let children = format!("/proc/{pid}/task/{pid}/children");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&children)
        .unwrap()
        .split_whitespace()
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "no children");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The root has started by now (its children are there).
    let seen = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    let waited = seen.elapsed();
    let options = RunOptions {
        tree: true,
        ..RunOptions::default()
    };
    let mut run = t.attach_with(pid as libc::pid_t, options).expect("attach");
    let lived = spawned.elapsed();
    drop(child.stdin.take());
    tokio::time::timeout(Duration::from_secs(60), async {
        run.wait_root().await.expect("root");
        run.wait_finished().await.expect("tree");
    })
    .await
    .expect("finished in time");
    child.wait().unwrap();
    let u = run.usage().unwrap();
    let ps = u.processes.as_ref().expect("a breakdown");
    assert_eq!(ps.len(), 3, "{ps:?}");
    let root = ps
        .iter()
        .find(|p| p.pid == pid as libc::pid_t)
        .expect("the root");
    // It started after `spawned` (so at most `lived` before the attach began) and before
    // `seen` (so at least `waited` before it).
    let age = root.start_ns.unsigned_abs();
    assert!(root.start_ns < 0, "{root:?}");
    assert!(
        age >= waited.as_nanos() as u64 && age <= lived.as_nanos() as u64,
        "started {age} ns before the attach; seen running {waited:?} before it began, \
         spawned {lived:?} before it ended"
    );
    for p in ps {
        assert!(p.attached, "{p:?}");
        assert!(p.start_ns < 0 && p.start_ns >= root.start_ns, "{p:?}");
        // The children were forked, not exec'd: the same argv as the root's.
        assert_eq!(p.argv.as_ref(), Some(&exec_argv), "{p:?}");
        assert!(p.argv_truncated, "{p:?}");
    }
    // Cut off within the long argument, as the exec's.
    assert_eq!((exec_argv.len(), exec_argv[1].as_str()), (5, "hold"));
    assert!(exec_argv[4].len() < 300, "{exec_argv:?}");
}

/// A process whose main thread exited while its other threads run (its leader a zombie until
/// the group ends, so not yet in what the group keeps of its exited threads): the leader's
/// past is counted too. The attach goes to a shell above it (an attach refuses a process
/// /proc shows as a zombie, as its leader's state).
#[tokio::test]
async fn usage_before_attach_counts_a_leader_that_exited_before_its_threads() {
    let Some(t) = tracker() else { return };
    let dir = std::env::temp_dir().join(format!("cylo-usage-leader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut past =
        common::PastLives::start_as(&dir, 300, 200, 1 << 20, &["leader-exits"], |args| {
            let mut c = Command::new("sh");
            c.args(["-c", "\"$0\" \"$@\"; exit $?", WORKLOAD])
                .args(args);
            c
        });
    let sh = past.pid();
    let children = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).unwrap();
    let w: u32 = children.trim().parse().expect("one child: the workload");
    // Its leader has exited: /proc shows the process as a zombie.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{w}/stat")).unwrap();
        if stat[stat.rfind(')').unwrap() + 2..].starts_with('Z') {
            break;
        }
        assert!(Instant::now() < deadline, "the leader did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    let figures = || {
        let (a, b) = (common::proc_figures(sh), common::proc_figures(w));
        common::ProcFigures {
            stat_cpu_ns: a.stat_cpu_ns + b.stat_cpu_ns,
            cpu_clock_ns: a.cpu_clock_ns + b.cpu_clock_ns,
            rchar: a.rchar + b.rchar,
            wchar: a.wchar + b.wchar,
        }
    };
    let then = figures();
    let mut run = t.attach(sh as libc::pid_t).expect("attach");
    let now = figures();
    assert_eq!(then, now, "the tree idles");
    let u = run.usage().unwrap();
    let before = u
        .usage_before_attach
        .clone()
        .expect("usage before the attach");
    // The shell and the workload; the workload's one live thread (its leader is gone).
    assert_eq!((before.process_count, before.thread_count), (2, 2));
    // The workload's getrusage, and the shell's own (one thread: its schedstat runtime; a
    // shell's start is tens of ms under emulation).
    let schedstat = std::fs::read_to_string(format!("/proc/{sh}/schedstat")).unwrap();
    let sh_ns: u64 = schedstat
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    past.truth.rusage_ns += sh_ns;
    past.check(&before, now, false);
    past.finish();
    tokio::time::timeout(Duration::from_secs(60), async {
        run.wait_root().await.expect("root");
        run.wait_finished().await.expect("tree");
    })
    .await
    .expect("finished in time");
    let _ = std::fs::remove_dir_all(&dir);
}
