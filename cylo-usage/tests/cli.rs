//! The `cylo-usage` command line: exit statuses, report destinations and formats, signals,
//! privileges and bad input.
mod common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{CLI, Scratch, WORKLOAD, as_nobody, can_drop_privileges, cli, stderr, tracker};

/// The socket of no daemon: the command line loads the programs itself.
const NO_DAEMON: &str = "/nonexistent/cylo-usage-tests.sock";

fn json(o: &Output) -> serde_json::Map<String, serde_json::Value> {
    let text = stderr(o);
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {text}"));
    v.as_object().unwrap().clone()
}

#[test]
fn exit_status_is_the_commands() {
    if tracker().is_none() {
        return;
    }
    let o = cli(&["run", "--", "/bin/sh", "-c", "exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("\tExit status: 3\n"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("\tPrecision: exact\n"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_killed_command_gives_128_plus_the_signal() {
    if tracker().is_none() {
        return;
    }
    let o = cli(&["run", "--json", "--", "/bin/sh", "-c", "kill -9 $$"]);
    assert_eq!(o.status.code(), Some(137));
    let j = json(&o);
    assert_eq!(j["signal"], 9);
    assert!(j["exit_code"].is_null());
}

/// What a command that cannot be started gives, whichever way cylo-usage runs it: `runner`
/// makes the `cylo-usage run -- PROGRAM` command. Each failure is one line on stderr, with the
/// exit status a shell gives (127 not found, 126 found but not runnable).
fn check_start_failures(s: &Scratch, runner: &dyn Fn(&str) -> Command, how: &str) {
    use std::os::unix::fs::PermissionsExt;
    let plain = s.dir.join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let script = s.dir.join("bad-interpreter");
    std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (plain, script, dir) = (
        plain.to_str().unwrap(),
        script.to_str().unwrap(),
        s.dir.to_str().unwrap(),
    );
    let cases = [
        (
            "cylo-usage-no-such-command",
            127,
            "cylo-usage-no-such-command: command not found".to_string(),
        ),
        (
            "/nonexistent/command",
            127,
            "/nonexistent/command: No such file or directory".to_string(),
        ),
        (plain, 126, format!("{plain}: Permission denied")),
        (dir, 126, format!("{dir}: Is a directory")),
        (
            script,
            127,
            format!(
                "{script}: cannot run it: its interpreter /nonexistent/interpreter was not found"
            ),
        ),
    ];
    for (program, code, message) in cases {
        let o = runner(program).stdin(Stdio::null()).output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(code),
            "{how}: {program}: {}",
            stderr(&o)
        );
        assert_eq!(stderr(&o), format!("cylo-usage: {message}\n"), "{how}");
        assert!(o.stdout.is_empty(), "{how}");
    }
}

#[test]
fn not_found_is_127_and_not_executable_is_126() {
    if !common::host_only("not_found_is_127_and_not_executable_is_126") {
        return;
    }
    if tracker().is_none() {
        return;
    }
    let s = Scratch::new("cli-start-failures");
    let in_process = |program: &str| {
        let mut c = Command::new(CLI);
        c.args(["run", "--", program])
            .env("CYLO_USAGE_SOCKET", NO_DAEMON);
        c
    };
    check_start_failures(&s, &in_process, "in-process");
    // Through the daemon: the client starts the command, and says the same.
    if common::daemon::privileged() {
        let daemon = common::daemon::Daemon::start("cli-start-failures", &[]);
        let o = daemon
            .client(&["run", "--json", "--", "/bin/true"])
            .output()
            .unwrap();
        assert_eq!(common::daemon::json(&o)["tracker"], "daemon", "{o:?}");
        let through_daemon = |program: &str| daemon.client(&["run", "--", program]);
        check_start_failures(&s, &through_daemon, "daemon");
    }
    // The /proc fallback (no privileges): its reaper starts the command, and the same is said.
    // (This user may not search some folders of PATH, /root's: still "command not found".)
    if can_drop_privileges() {
        let unprivileged = |program: &str| {
            let mut c = as_nobody(&s.cli, &["run", "--", program]);
            c.env("CYLO_USAGE_SOCKET", NO_DAEMON);
            c
        };
        check_start_failures(&s, &unprivileged, "fallback");
    }
}

/// A folder of this test process for `name`, emptied.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cylo-usage-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn outputs_that_cannot_be_written_are_refused_before_anything_runs() {
    // No programs are needed: the outputs are checked before the tracker is even opened.
    let dir = scratch("outputs");
    let marker = dir.join("ran");
    let touch = format!("touch {}; exit 3", marker.display());
    let same = dir.join("both").display().to_string();
    let folder = dir.display().to_string();
    let cases: [(&[&str], &str); 7] = [
        (&["-o", "/proc/nonexistent/x"], "/proc/nonexistent/x"),
        (
            &["--json", "-o", "/proc/nonexistent/x"],
            "/proc/nonexistent/x",
        ),
        (&["--events", "/proc/nonexistent/y"], "/proc/nonexistent/y"),
        (&["-o", &folder], "Is a directory"),
        (&["-o", "-", "--events", "-"], "standard output"),
        (&["-o", &same, "--events", &same], "the same file"),
        (&["--kill-after", "1s"], "--kill-after needs --timeout"),
    ];
    for (options, said) in cases {
        let mut args = vec!["run"];
        args.extend(options);
        args.extend(["--", "/bin/sh", "-c", &touch]);
        let o = cli(&args);
        assert_eq!(o.status.code(), Some(125), "{options:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.starts_with("cylo-usage: ") && err.contains(said),
            "{err}"
        );
        assert!(!marker.exists(), "{options:?}: the command ran");
    }
    // attach: refused before the attach is made.
    let mut target = Command::new("/bin/sleep").arg("30").spawn().unwrap();
    let o = cli(&[
        "attach",
        "-o",
        "/proc/nonexistent/x",
        &target.id().to_string(),
    ]);
    let _ = target.kill();
    let _ = target.wait();
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(stderr(&o).contains("/proc/nonexistent/x"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dash_o_dash_writes_the_report_to_stdout() {
    if !common::host_only("dash_o_dash_writes_the_report_to_stdout") {
        return;
    }
    if tracker().is_none() {
        return;
    }
    let o = cli(&[
        "run",
        "--json",
        "-o",
        "-",
        "--",
        "/bin/sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stderr(&o), "err\n", "the report went to stdout");
    let out = String::from_utf8_lossy(&o.stdout);
    let (first, report) = out.split_once('\n').unwrap();
    assert_eq!(first, "out", "the command's own output comes first: {out}");
    let j: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(j["exit_code"], 3, "{j}");
    // Human text too.
    let o = cli(&["run", "-o", "-", "--", "/bin/true"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\tExit status: 0\n"),
        "{o:?}"
    );
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
}

#[test]
fn a_report_that_cannot_be_written_warns_and_keeps_the_commands_status() {
    if !common::host_only("a_report_that_cannot_be_written_warns_and_keeps_the_commands_status") {
        return;
    }
    if tracker().is_none() {
        return;
    }
    // /dev/full opens, and every write to it fails (ENOSPC).
    let o = cli(&[
        "run",
        "--json",
        "-o",
        "/dev/full",
        "--",
        "/bin/sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    let (warning, report) = err.split_once('\n').unwrap();
    assert_eq!(
        warning,
        "cylo-usage: warning: cannot write the report to /dev/full: No space left on device; \
         the report follows on standard error"
    );
    let j: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(j["exit_code"], 3, "{j}");
    // Standard output a pipe nobody reads any more (EPIPE): the same.
    let mut child = Command::new(CLI)
        .args(["run", "-o", "-", "--", "/bin/sh", "-c", "exit 4"])
        .env("CYLO_USAGE_SOCKET", NO_DAEMON)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.starts_with(
            "cylo-usage: warning: cannot write the report to standard output: Broken pipe; \
             the report follows on standard error\n"
        ),
        "{err}"
    );
    assert!(err.contains("\tExit status: 4\n"), "{err}");
}

/// Waits until process `pid` blocks SIGINT (cylo-usage reads its signals through a signalfd
/// from then on; before, SIGINT would end it without a report).
fn until_signals_are_handled(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0);
        if blocked & (1 << (libc::SIGINT - 1)) != 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{pid} never blocked SIGINT");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `cylo-usage attach --json PID` with its standard output read by this process, as
/// `| jq` would; `stop` is called once the attach has taken the tree in (its `attached`
/// event, in a file of `dir`). (exit status, stdout, stderr)
fn attach_piped(
    pid: u32,
    dir: &std::path::Path,
    stop: impl FnOnce(u32),
) -> (Option<i32>, String, String) {
    let events = dir.join(format!("events-{pid}.ndjson"));
    let mut attach = Command::new(CLI)
        .args(["attach", "--json", "--events"])
        .arg(&events)
        .arg(pid.to_string())
        .env("CYLO_USAGE_SOCKET", NO_DAEMON)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = attach.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        text
    });
    // Loading the programs takes seconds in the emulated kernels of the matrix.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&events).is_ok_and(|t| t.contains("\"attached\"")) {
        if Instant::now() > deadline || attach.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    until_signals_are_handled(attach.id());
    stop(attach.id());
    let o = attach.wait_with_output().unwrap();
    (o.status.code(), reader.join().unwrap(), stderr(&o))
}

#[test]
fn an_attach_report_can_be_piped() {
    if !common::host_only("an_attach_report_can_be_piped") {
        return;
    }
    if tracker().is_none() {
        return;
    }
    let dir = scratch("attach-piped");
    // The target exits by itself: when the test closes its stdin, once the attach has it.
    let mut target = Command::new("/bin/cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = target.stdin.take();
    let (code, out, err) = attach_piped(target.id(), &dir, |_| drop(input.take()));
    assert!(target.wait().unwrap().success());
    assert_eq!(code, Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
    let j: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(
        (&j["attached"], &j["live_process_count"]),
        (&true.into(), &0.into()),
        "{j}"
    );
    // Ended by SIGINT sent to cylo-usage alone (a terminal's Ctrl-C would end the reader too).
    let mut target = Command::new("/bin/sleep").arg("300").spawn().unwrap();
    let (code, out, err) = attach_piped(target.id(), &dir, |pid| {
        // SAFETY: signals our own child.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
    });
    let _ = target.kill();
    let _ = target.wait();
    assert_eq!(code, Some(128 + libc::SIGINT), "{err}");
    let j: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(
        (&j["attached"], &j["live_process_count"]),
        (&true.into(), &1.into()),
        "{j}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_timeout_names_sigkill_only_when_it_was_sent() {
    if !common::host_only("the_timeout_names_sigkill_only_when_it_was_sent") {
        return;
    }
    if tracker().is_none() {
        return;
    }
    // Everything ends at SIGTERM: no SIGKILL, in the text nor in the JSON.
    let o = cli(&[
        "run",
        "--timeout",
        "300ms",
        "--kill-after",
        "300ms",
        "--",
        "/bin/sh",
        "-c",
        "sleep 100",
    ]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    let err = stderr(&o);
    let line = err
        .lines()
        .find(|l| l.starts_with("\tTimed out: "))
        .expect(&err);
    assert!(line.starts_with("\tTimed out: yes: SIGTERM to "), "{line}");
    assert!(!line.contains("SIGKILL"), "{line}");
    let o = cli(&[
        "run",
        "--json",
        "--timeout",
        "300ms",
        "--kill-after",
        "300ms",
        "--",
        "/bin/sh",
        "-c",
        "sleep 100",
    ]);
    let j = json(&o);
    for s in j["signals_sent"].as_array().unwrap() {
        assert!(s["signal"] == 15 || s["signalled"] == 0, "{j:?}");
    }
    // The tree ignores SIGTERM: then SIGKILL is sent, and said.
    let o = cli(&[
        "run",
        "--timeout",
        "300ms",
        "--kill-after",
        "300ms",
        "--",
        "/bin/sh",
        "-c",
        "trap '' TERM; sleep 100",
    ]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    let err = stderr(&o);
    let line = err
        .lines()
        .find(|l| l.starts_with("\tTimed out: "))
        .expect(&err);
    // (The shell and its sleep, or the shell alone if the timeout came before its fork.)
    assert!(line.contains(", then SIGKILL to "), "{line}");
}

#[test]
fn the_tree_shows_hostile_argv_unambiguously() {
    if !common::host_only("the_tree_shows_hostile_argv_unambiguously") {
        return;
    }
    if tracker().is_none() {
        return;
    }
    // `;\` and a newline; a backslash, a backslash and `n`; the text `\xff`; the byte 0xff;
    // a terminal escape.
    let o = Command::new(CLI)
        .args(["run", "--tree", "--", "/bin/true"])
        .args([";\\\n", ";\\\\n"])
        .arg(OsStr::from_bytes(b"\\xff"))
        .arg(OsStr::from_bytes(b"\xff"))
        .arg("\x1b[2J")
        .env("CYLO_USAGE_SOCKET", NO_DAEMON)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    // A backslash itself is `\\`, any other byte that is not printable text `\xNN`: no
    // output can be read two ways.
    assert!(
        err.contains(concat!(
            r"  /bin/true ;\\\x0a ;\\\\n \\xff \xff \x1b[2J",
            "\n"
        )),
        "{err}"
    );
    assert!(!err.contains('\x1b'), "{err}");
}

#[test]
fn features_read_as_text_and_as_structured_json() {
    if tracker().is_none() {
        return;
    }
    let o = cli(&["features", "--no-daemon"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("kernel "), "{text}");
    assert!(
        lines[1].starts_with("cpu_time_ns "),
        "the counters come next: {text}"
    );
    assert!(!text.contains("Offsets {"), "no debug dump: {text}");
    let layout: Vec<&&str> = lines.iter().filter(|l| l.starts_with("  ")).collect();
    assert!(!layout.is_empty(), "{text}");
    for l in &layout {
        assert!(l.len() <= 100 && !l.contains(": "), "{l:?}");
    }
    assert!(
        text.contains("\nlayout (") && text.contains("  task_pid "),
        "{text}"
    );
    let o = cli(&["features", "--no-daemon", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["layout"]["task_pid"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["layout"]["mm_rss"].as_array().unwrap().len(), 4, "{j}");
}

#[test]
fn missing_or_empty_command_is_a_usage_error() {
    for args in [
        &["run"][..],
        &["run", "--"][..],
        &["run", "--", ""][..],
        &["frobnicate"][..],
    ] {
        let o = cli(args);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    let o = cli(&["run", "--", ""]);
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn json_report_is_one_flat_object_with_the_documented_names() {
    if tracker().is_none() {
        return;
    }
    let o = cli(&["run", "--json", "--", WORKLOAD, "fork", "10"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let j = json(&o);
    let mut keys: Vec<&str> = j.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = vec![
        "cpu_time_ns",
        "cpu_time_ms",
        "cpu_user_ns",
        "cpu_system_ns",
        "cpu_split",
        "process_count",
        "thread_count",
        "peak_process_count",
        "live_process_count",
        "disk_bytes_read",
        "disk_bytes_written",
        "disk_cancelled_write_bytes",
        "disk_devices",
        "io_read_chars",
        "io_write_chars",
        "memory_bytes",
        "peak_memory_bytes",
        "max_process_rss_bytes",
        "network_bytes_sent",
        "network_bytes_received",
        "network",
        "lost_events",
        "tasks_killed_at_birth",
        "tasks_escaped",
        "processes_refused",
        "threads_refused",
        "budget_exceeded",
        "precision",
        "precision_notes",
        "lower_bounds",
        "tracker",
        "exit_code",
        "signal",
        "wall_time_ms",
        "attached",
        "usage_before_attach",
        "timed_out",
    ];
    want.sort_unstable();
    assert_eq!(keys, want);
    assert_eq!(j["process_count"], 11);
    assert_eq!(j["cpu_split"], "per_process");
    assert_eq!(j["precision"], "exact");
    assert_eq!(j["precision_notes"], serde_json::json!([]));
    assert_eq!(
        j["lower_bounds"],
        serde_json::json!([]),
        "every count exact"
    );
    assert_eq!(j["tracker"], "in-process");
    assert_eq!(j["lost_events"], 0);
    // Sockets: counted wherever the kernel has hooks for them (every kernel of the x86-64
    // matrix; arm64 from 6.3), and this command moves no socket bytes.
    if common::network_hooks() {
        assert_eq!(j["network_bytes_sent"], 0, "{j:?}");
        assert_eq!(j["network_bytes_received"], 0, "{j:?}");
        assert_eq!(j["network"]["unix_sent"], 0, "{j:?}");
    } else {
        assert!(
            j["network"].is_null() && j["network_bytes_sent"].is_null(),
            "{j:?}"
        );
    }
    // Only disk_devices (of flat objects), precision_notes and lower_bounds (of strings) are
    // lists, and
    // network an object of counters; everything else is a scalar or null.
    for (k, v) in &j {
        assert!(!v.is_object() || k == "network", "{k}");
        assert!(
            !v.is_array()
                || ["disk_devices", "precision_notes", "lower_bounds"].contains(&k.as_str()),
            "{k}"
        );
    }
}

#[test]
fn the_command_keeps_its_stdio_and_the_report_can_go_to_a_file() {
    if tracker().is_none() {
        return;
    }
    let report =
        std::env::temp_dir().join(format!("cylo-usage-report-{}.json", std::process::id()));
    let mut child = Command::new(CLI)
        .args([
            "run",
            "--json",
            "-o",
            report.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
        ])
        .arg("cat; echo to-stderr >&2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "from stdin\n");
    assert_eq!(
        stderr(&o),
        "to-stderr\n",
        "the report went to the file, not stderr"
    );
    let text = std::fs::read_to_string(&report).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(j["process_count"], 2, "sh and cat: {text}");
    std::fs::remove_file(&report).unwrap();
}

#[test]
fn by_default_it_waits_for_daemons_and_until_root_exits_does_not() {
    if tracker().is_none() {
        return;
    }
    // The daemon inherits stdio: the report goes to a file, so nothing waits on a pipe.
    let report = std::env::temp_dir().join(format!("cylo-usage-early-{}.json", std::process::id()));
    let status = Command::new(CLI)
        .args([
            "run",
            "--json",
            "--until-root-exits",
            "-o",
            report.to_str().unwrap(),
            "--",
        ])
        .args([WORKLOAD, "daemon", "1500"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    std::fs::remove_file(&report).unwrap();
    assert_eq!(j["live_process_count"], 1, "the daemon still runs: {j:?}");
    // The report is made when the root exits, well before the daemon's 1500 ms are up. (The
    // process's own lifetime adds the tracker's start-up and teardown, which on kernels that
    // need the network fallback's trampolines take a second or more under emulation.)
    assert!(j["wall_time_ms"].as_u64().unwrap() < 1500, "{j:?}");

    let o = cli(&["run", "--json", "--", WORKLOAD, "daemon", "300"]);
    let j = json(&o);
    assert_eq!(j["live_process_count"], 0);
    assert_eq!(j["process_count"], 3);
    assert!(j["cpu_time_ns"].as_u64().unwrap() >= 300_000_000, "{j:?}");
    assert!(j["wall_time_ms"].as_u64().unwrap() >= 400, "{j:?}");
}

fn signalled(sig: i32) -> Output {
    let child = Command::new(CLI)
        .args(["run", "--json", "--", "/bin/sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    child.wait_with_output().unwrap()
}

#[test]
fn sigterm_and_sigint_are_forwarded_and_the_report_still_printed() {
    if tracker().is_none() {
        return;
    }
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let o = signalled(sig);
        assert_eq!(o.status.code(), Some(code), "{}", stderr(&o));
        let j = json(&o);
        assert_eq!(j["signal"], sig);
        assert_eq!(j["process_count"], 1);
    }
}

#[test]
fn without_privileges_require_exact_says_what_is_missing() {
    let mut cmd = Command::new(CLI);
    cmd.args(["run", "--require-exact", "--", "/bin/true"]);
    // SAFETY: async-signal-safe calls only.
    unsafe {
        cmd.pre_exec(|| {
            if libc::geteuid() == 0
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("CAP_BPF"), "{err}");
}
