//! Budgets through `cylo-usage serve`: a client's budgets travel with its spawn, the daemon's
//! ceilings (`serve --max-*`) bind every client but root, the report says which budgets the
//! session had and which it crossed, a tree that crosses one is stopped whole, and a
//! malformed or unenforceable budget is refused in one line while the daemon keeps serving.
//! Real daemons on private sockets, real clients, the real kernel; the tests of this file run
//! one at a time.
mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::daemon::{Daemon, closed, frame, json, privileged, reply, scratch_dir};
use common::{CLI, Scratch, WORKLOAD, as_nobody, can_drop_privileges};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `cylo-usage ARGS` as user nobody, a client of `daemon`, to its end.
fn as_nobody_client(daemon: &Daemon, scratch: &Scratch, args: &[&str]) -> Output {
    let mut c = as_nobody(&scratch.cli, args);
    c.env("CYLO_USAGE_SOCKET", &daemon.socket)
        .stdin(Stdio::null())
        .current_dir(&scratch.dir);
    c.output().unwrap()
}

/// Those of `pids` still alive as the workload (a zombie, dead and waiting for whoever reaps
/// orphans, is not alive; a pid reused by another program is not the workload).
fn survivors(pids: &[u32]) -> Vec<String> {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter(|stat| {
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest);
            let alive = state.is_some_and(|s| !s.starts_with('Z') && !s.starts_with('X'));
            alive && stat.contains("(cylo-usage-work")
        })
        .collect()
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn an_unprivileged_client_s_fork_bomb_stops_at_its_processes_budget() {
    if !privileged() || !can_drop_privileges() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("daemon-budget-bomb");
    let daemon = Daemon::start("budget-bomb", &["--allow-all-users"]);
    let marks = scratch.dir.join("pids");
    let w = scratch.workload.to_str().unwrap();
    let out = as_nobody_client(
        &daemon,
        &scratch,
        &[
            "run",
            "--json",
            "--max-processes",
            "20",
            "--",
            w,
            "bomb-mark",
            marks.to_str().unwrap(),
            "500",
        ],
    );
    assert_eq!(out.status.code(), Some(120), "{out:?}");
    let v = json(&out);
    assert_eq!(v["tracker"], "daemon", "{v}");
    assert_eq!(v["budgets"]["max_processes"], 20, "{v}");
    let e = &v["budget_exceeded"];
    assert_eq!(e["resource"], "processes", "{v}");
    assert_eq!(e["limit"], 20, "{v}");
    assert_eq!(e["observed"], 21, "the crossing is the 21st process: {v}");
    assert_eq!(e["enforced"], "kernel", "{v}");
    assert!(u(&v["process_count"]) <= 20, "{v}");
    assert!(u(&v["processes_refused"]) >= 1, "{v}");
    assert_eq!(v["live_process_count"], 0, "{v}");
    // Ground truth: every process that ran counted itself first; none of them survives.
    let marks = common::marks(&marks);
    assert!(
        marks.ran >= 1 && marks.ran <= 20,
        "{} processes ran under a budget of 20",
        marks.ran
    );
    assert!(marks.ran <= u(&v["process_count"]), "{v}");
    let alive = survivors(&marks.pids);
    assert!(alive.is_empty(), "survivors: {alive:?}");
}

/// The daemon stops a tree that crossed a budget itself: a client that never asks `status`
/// (whose checks would stop it too) does not keep the rest of its tree alive.
#[test]
fn the_daemon_stops_a_crossing_tree_even_if_its_client_never_asks() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("budget-unasked", &[]);
    let tracker = cylo_usage::Tracker::connect(&daemon.socket).unwrap();
    let options = cylo_usage::RunOptions {
        budgets: cylo_usage::Budgets {
            max_processes: Some(5),
            ..cylo_usage::Budgets::default()
        },
        ..cylo_usage::RunOptions::default()
    };
    // The root forks children that sleep until their stdin (a pipe the run's `Child` holds
    // open) closes; its 5th is refused, and the kernel kills the root there. The 4 before it
    // sleep on: only a kill of the tree ends them.
    let mut cmd = std::process::Command::new(WORKLOAD);
    cmd.args(["hold", "10"]).stdin(Stdio::piped());
    let run = tracker.spawn_with(&mut cmd, options).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let u = loop {
        std::thread::sleep(Duration::from_millis(100));
        // `usage` reads the figures; only `status` (never sent here) would check budgets.
        let u = run.usage_totals().unwrap();
        if u.budget_exceeded.is_some() && u.live_process_count == 0 {
            break u;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tree still runs: {u:?}"
        );
    };
    let e = u.budget_exceeded.unwrap();
    assert_eq!(e.resource, cylo_usage::Resource::Processes, "{u:?}");
    assert_eq!((e.limit, e.observed), (5, 6), "{u:?}");
    assert_eq!(u.process_count, 5, "{u:?}");
    drop(run);
}

#[test]
fn serve_ceilings_bind_every_client_but_root() {
    if !privileged() || !can_drop_privileges() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("daemon-budget-ceiling");
    let daemon = Daemon::start(
        "budget-ceiling",
        &[
            "--allow-all-users",
            "--max-processes",
            "10",
            "--max-threads",
            "1K",
        ],
    );
    let w = scratch.workload.to_str().unwrap();
    // An unprivileged client that asks for nothing, for more than the ceiling, and for less.
    for (asked, effective) in [(None, 10), (Some("50"), 10), (Some("5"), 5)] {
        let mut args = vec!["run", "--json"];
        if let Some(n) = asked {
            args.extend(["--max-processes", n]);
        }
        args.extend(["--", w, "bomb", "50"]);
        let out = as_nobody_client(&daemon, &scratch, &args);
        assert_eq!(out.status.code(), Some(120), "asked {asked:?}: {out:?}");
        let v = json(&out);
        assert_eq!(v["tracker"], "daemon", "{v}");
        assert_eq!(v["budgets"]["max_processes"], effective, "{v}");
        // The ceiling it asked nothing of binds it too.
        assert_eq!(v["budgets"]["max_threads"], 1024, "{v}");
        assert_eq!(v["budget_exceeded"]["resource"], "processes", "{v}");
        assert_eq!(v["budget_exceeded"]["limit"], effective, "{v}");
        assert!(u(&v["process_count"]) <= effective, "{v}");
        assert_eq!(v["live_process_count"], 0, "{v}");
    }
    // Within the ceiling, a tree that stays under it runs to its end.
    let out = as_nobody_client(&daemon, &scratch, &["run", "--json", "--", w, "bomb", "8"]);
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["process_count"], 8, "{v}");
    assert_eq!(v["budgets"]["max_processes"], 10, "{v}");
    assert!(v["budget_exceeded"].is_null(), "{v}");
    // Root gets what it asks: 50, and no ceiling where it asks none.
    let out = daemon
        .client(&[
            "run",
            "--json",
            "--max-processes",
            "50",
            "--",
            WORKLOAD,
            "bomb",
            "30",
        ])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["tracker"], "daemon", "{v}");
    assert_eq!(v["budgets"]["max_processes"], 50, "{v}");
    assert!(v["budgets"].get("max_threads").is_none(), "{v}");
    assert!(v["budget_exceeded"].is_null(), "{v}");
    assert_eq!(v["process_count"], 30, "{v}");
    let out = daemon
        .client(&["run", "--json", "--", WORKLOAD, "bomb", "30"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert!(v.get("budgets").is_none(), "{v}");
    assert_eq!(v["process_count"], 30, "{v}");
}

/// A connection that has said hello.
fn greeted(daemon: &Daemon) -> UnixStream {
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    let hello = format!(r#"{{"op":"hello","version":{}}}"#, common::wire::VERSION);
    s.write_all(&frame(hello.as_bytes())).unwrap();
    assert_eq!(reply(&mut s).unwrap()["reply"], "hello");
    s
}

/// Sends a `spawn` with `options`, with this thread's `/proc/thread-self`; the reply.
fn spawn_with(s: &mut UnixStream, options: &str) -> Option<serde_json::Value> {
    let me = std::fs::File::open("/proc/thread-self").unwrap();
    let body = format!(r#"{{"op":"spawn","options":{options}}}"#);
    common::wire::send_frame(s, body.as_bytes(), &[me.as_raw_fd()]).unwrap();
    reply(s)
}

#[test]
fn malformed_budgets_are_refused_in_one_line_and_the_daemon_keeps_serving() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut daemon = Daemon::start("budget-malformed", &[]);
    // Not budgets: not a request of the protocol (a misspelt budget must never pass for
    // none). The connection is closed, as for any malformed request.
    for (budgets, says) in [
        (r#"{"max_procs":5}"#, "unknown field `max_procs`"),
        (r#"{"max_processes":-1}"#, "invalid value"),
        (r#"{"max_processes":"20"}"#, "invalid type"),
        (r#"{"max_cpu_ns":0.5}"#, "invalid type"),
        (r#"{"max_memory_bytes":1e30}"#, "invalid type"),
        (r#"[20]"#, "invalid type"),
        (r#""unlimited""#, "invalid type"),
    ] {
        let mut s = greeted(&daemon);
        let r = spawn_with(&mut s, &format!(r#"{{"budgets":{budgets}}}"#)).unwrap();
        assert_eq!(r["reply"], "error", "{budgets}: {r}");
        assert_eq!(r["kind"], "bad-request", "{budgets}: {r}");
        let message = r["message"].as_str().unwrap();
        assert!(message.contains(says), "{budgets}: {message}");
        assert!(!message.contains('\n'), "{message}");
        assert!(closed(&mut s), "{budgets}");
    }
    // Budgets that can never be met: refused (`budget`), the connection still serves.
    let mut s = greeted(&daemon);
    for (budgets, says) in [
        (r#"{"max_processes":0}"#, "--max-processes 0"),
        (r#"{"max_threads":0,"max_cpu_ns":5}"#, "--max-threads 0"),
    ] {
        let r = spawn_with(&mut s, &format!(r#"{{"budgets":{budgets}}}"#)).unwrap();
        assert_eq!(r["kind"], "budget", "{budgets}: {r}");
        let message = r["message"].as_str().unwrap();
        assert!(message.contains(says), "{budgets}: {message}");
        assert!(!message.contains('\n'), "{message}");
    }
    s.write_all(&frame(br#"{"op":"features"}"#)).unwrap();
    assert_eq!(reply(&mut s).unwrap()["reply"], "features");
    // An attach refused the same way.
    let mut sleeper = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .unwrap();
    // SAFETY: pidfd_open of our own child; the descriptor is ours.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, sleeper.id(), 0) } as i32;
    assert!(pidfd >= 0);
    common::wire::send_frame(
        &s,
        br#"{"op":"attach","options":{"budgets":{"max_processes":0}}}"#,
        &[pidfd],
    )
    .unwrap();
    let r = reply(&mut s).unwrap();
    // SAFETY: closes the descriptor opened above.
    unsafe { libc::close(pidfd) };
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(r["kind"], "budget", "{r}");
    drop(s);
    // The daemon serves on, budgets included, and through the command line a refused budget
    // is one line and exit 125, never a run without it.
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon died"
    );
    let out = daemon
        .client(&["run", "--json", "--max-processes", "0", "--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = common::stderr(&out);
    assert!(err.contains("--max-processes 0"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = daemon
        .client(&["run", "--json", "--max-processes", "5", "--", "/bin/true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["tracker"], "daemon", "{v}");
    assert_eq!(v["budgets"]["max_processes"], 5, "{v}");
}

/// Each budget through the daemon is either had (the report names it) or refused, naming
/// its option and what the daemon's kernel lacks, with exit 125: never silently dropped, and
/// never a run started another way without it.
#[test]
fn every_budget_is_enforced_by_the_daemon_or_refused_naming_its_option() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("budget-each", &[]);
    for (option, value, field) in [
        ("--max-processes", "100", "max_processes"),
        ("--max-threads", "100", "max_threads"),
        ("--max-cpu", "1h", "max_cpu_ns"),
        ("--max-memory", "1G", "max_memory_bytes"),
        ("--max-disk-write", "1G", "max_disk_write_bytes"),
        ("--max-disk-read", "1G", "max_disk_read_bytes"),
        ("--max-network", "1G", "max_network_bytes"),
    ] {
        let out = daemon
            .client(&["run", "--json", option, value, "--", "/bin/true"])
            .output()
            .unwrap();
        let err = common::stderr(&out);
        match out.status.code() {
            Some(0) => {
                let v = json(&out);
                assert_eq!(v["tracker"], "daemon", "{v}");
                assert!(v["budgets"][field].as_u64().is_some(), "{option}: {v}");
            }
            Some(125) => {
                assert!(
                    err.contains(&format!("{option} cannot be enforced in the kernel here")),
                    "{err}"
                );
                assert_eq!(err.lines().count(), 1, "{err}");
                assert!(!err.contains('{'), "no run was made: {err}");
                eprintln!("refused, as this kernel cannot enforce it: {err}");
            }
            _ => panic!("{option} {value}: {out:?}"),
        }
    }
}

/// A ceiling that can never be met is refused when `serve` starts, naming it.
#[test]
fn serve_refuses_a_ceiling_that_can_never_be_met() {
    let dir = scratch_dir("budget-never");
    let out = std::process::Command::new(CLI)
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("sock"))
        .args(["--max-processes", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = common::stderr(&out);
    assert!(err.contains("--max-processes 0"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
