//! The `cylo-usage` command line: exit statuses, report destinations and formats, signals,
//! privileges and bad input.
mod common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{CLI, WORKLOAD, cli, stderr, tracker};

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

#[test]
fn not_found_is_127_and_not_executable_is_126() {
    if tracker().is_none() {
        return;
    }
    let o = cli(&["run", "--", "/nonexistent/command"]);
    assert_eq!(o.status.code(), Some(127));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("/nonexistent/command"), "{err}");

    let dir = std::env::temp_dir().join(format!("cylo-usage-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("not-executable");
    std::fs::write(&file, "#!/bin/sh\n").unwrap();
    let o = cli(&["run", "--", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
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
        "precision",
        "precision_notes",
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
    assert_eq!(j["precision"], "exact");
    assert_eq!(j["precision_notes"], serde_json::json!([]));
    assert_eq!(j["tracker"], "in-process");
    assert_eq!(j["lost_events"], 0);
    // Sockets: counted wherever the kernel has hooks for them (every kernel of the matrix),
    // and this command moves no socket bytes.
    assert_eq!(j["network_bytes_sent"], 0, "{j:?}");
    assert_eq!(j["network_bytes_received"], 0, "{j:?}");
    assert_eq!(j["network"]["unix_sent"], 0, "{j:?}");
    // Only disk_devices (of flat objects) and precision_notes (of strings) are lists, and
    // network an object of counters; everything else is a scalar or null.
    for (k, v) in &j {
        assert!(!v.is_object() || k == "network", "{k}");
        assert!(
            !v.is_array() || k == "disk_devices" || k == "precision_notes",
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
