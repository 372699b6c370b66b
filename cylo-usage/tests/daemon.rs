//! `cylo-usage serve`: real daemons on private sockets, real clients (the command line and the
//! library), the real kernel. The tests of this file run one at a time (each owns the host's
//! program count while it runs).
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, closed, frame, json, json_stdout, privileged, reply, scratch_dir};
use common::{CLI, Scratch, WORKLOAD, as_nobody, can_drop_privileges};
use cylo_usage::{Precision, Tracker, TrackerKind};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Whether a program is the fork hook (`task_newtask`, or `task_newtask_no_atomics`, which
/// the kernel names by its first 15 bytes).
fn is_newtask(name: Option<&str>) -> bool {
    name.is_some_and(|n| n.starts_with("task_newtask"))
}

/// How many programs named `task_newtask` the kernel holds (one per loaded program set).
fn program_sets() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| is_newtask(p.name_as_str()))
        .count()
}

/// The ids of the eBPF programs process `pid` holds open (from its fdinfo).
fn programs_of(pid: u32) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("prog_id:"))
                        .and_then(|v| v.trim().parse().ok())
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// How many of `ids` are `task_newtask` programs: the program sets among them.
fn sets_among(ids: &[u32]) -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()) && is_newtask(p.name_as_str()))
        .count()
}

/// Waits (up to 10 s: the kernel frees programs after their last reference goes) until none
/// of `ids` is loaded any more.
fn wait_unloaded(ids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .filter(|id| ids.contains(id))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "programs {left:?} are still loaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_exact(v: &serde_json::Value) {
    assert_eq!(v["tracker"], "daemon", "{v}");
    assert_eq!(v["precision"], "exact", "{v}");
    assert_eq!(v["lost_events"], 0, "{v}");
    assert_eq!(v["live_process_count"], 0, "{v}");
}

#[test]
fn sixteen_concurrent_runs_share_one_program_set_and_each_is_exact() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("sixteen", &[]);
    let held = programs_of(daemon.child.id());
    assert_eq!(sets_among(&held), 1, "the daemon loads one program set");
    let loaded = program_sets();
    let children: Vec<_> = (0..16)
        .map(|i| {
            let n = (20 + i * 5).to_string();
            daemon
                .client(&["run", "--json", "--", WORKLOAD, "storm", &n])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // While they run, nothing more is loaded: the clients use the daemon's programs.
    assert!(program_sets() <= loaded);
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let v = json(&out);
        assert_exact(&v);
        let n = 20 + i as u64 * 5;
        assert_eq!(v["process_count"], n + 1, "{v}");
        assert_eq!(v["thread_count"], n + 1, "{v}");
        assert_eq!(v["exit_code"], 0, "{v}");
    }
    assert!(program_sets() <= loaded);
}

#[test]
fn the_library_spawns_attaches_and_breaks_down_through_the_daemon() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("library", &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tracker = Tracker::connect(&daemon.socket).unwrap();
    // Spawn with a breakdown: the root is our own child, with our stdio.
    let mut cmd = Command::new(WORKLOAD);
    cmd.args(["threads", "3", "20"]);
    let mut run = tracker
        .spawn_with(
            &mut cmd,
            cylo_usage::RunOptions {
                tree: true,
                ..Default::default()
            },
        )
        .unwrap();
    rt.block_on(async {
        let status = run.wait_root().await.unwrap();
        assert!(status.success());
        run.wait_finished().await.unwrap();
    });
    let u = run.usage().unwrap();
    assert_eq!(u.tracker, TrackerKind::Daemon);
    assert_eq!(u.precision, Precision::Exact, "{u:?}");
    assert_eq!((u.process_count, u.thread_count), (1, 4), "{u:?}");
    let p = u.processes.as_ref().expect("a breakdown");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].cpu_time_ns, u.cpu_time_ns);
    assert!(u.cpu_time_ns >= 60_000_000, "{u:?}");
    drop(run);
    // Attach to a process of ours that we did not start under the tracker.
    let mut target = Command::new(WORKLOAD)
        .args(["hold", "2"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let run = tracker.attach(target.id() as libc::pid_t).unwrap();
    assert!(run.is_attached());
    drop(target.stdin.take());
    rt.block_on(async { run.wait_finished().await.unwrap() });
    let u = run.usage().unwrap();
    assert!(u.attached);
    assert_eq!(u.tracker, TrackerKind::Daemon);
    assert_eq!(u.usage_before_attach.as_ref().unwrap().process_count, 3);
    assert!(target.wait().unwrap().success());
    // Events through the daemon: exactly one fork and one exit per process.
    let (mut r, w) = std::io::pipe().unwrap();
    let mut cmd = Command::new(WORKLOAD);
    cmd.args(["storm", "10"]);
    let run = tracker
        .spawn_with(
            &mut cmd,
            cylo_usage::RunOptions {
                events: Some(Box::new(w)),
                ..Default::default()
            },
        )
        .unwrap();
    rt.block_on(async { run.wait_finished().await.unwrap() });
    drop(run);
    let mut text = String::new();
    r.read_to_string(&mut text).unwrap();
    let count = |kind: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("\"event\":\"{kind}\"")))
            .count()
    };
    assert_eq!((count("fork"), count("exit")), (11, 11), "{text}");
}

#[test]
fn an_unprivileged_user_gets_exact_figures_and_only_its_own_processes() {
    if !privileged() || !can_drop_privileges() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("daemon-nobody");
    let daemon = Daemon::start("nobody", &["--allow-all-users"]);
    let run = |args: &[&str]| {
        let mut c = as_nobody(&scratch.cli, args);
        c.env("CYLO_USAGE_SOCKET", &daemon.socket)
            .stdin(Stdio::null())
            .current_dir(&scratch.dir);
        c.output().unwrap()
    };
    let w = scratch.workload.to_str().unwrap();
    let out = run(&["run", "--json", "--", w, "storm", "30"]);
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_exact(&v);
    assert_eq!(v["process_count"], 31, "{v}");
    // Its own process: allowed.
    let mut own = as_nobody(Path::new("sleep"), &["3"]).spawn().unwrap();
    let out = run(&["attach", "--json", &own.id().to_string()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json_stdout(&out)["attached"], true);
    let _ = own.wait();
    // Root's process: refused, in one line, and nothing is registered.
    let mut root = Command::new("sleep").arg("30").spawn().unwrap();
    let out = run(&["attach", "--json", &root.id().to_string()]);
    let _ = root.kill();
    let _ = root.wait();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = common::stderr(&out);
    assert!(err.contains("does not belong to user 65534"), "{err}");
    assert!(
        err.contains("one may attach only to one's own processes"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // A kill of its own session reaches only what it may signal: its own tree here.
    let out = run(&["run", "--json", "--timeout", "300ms", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert_eq!(json(&out)["timed_out"], true);
    // A root-only daemon: nobody falls back, honestly marked.
    drop(daemon);
    let daemon = Daemon::start("root-only", &[]);
    let mut c = as_nobody(&scratch.cli, &["run", "--json", "--", "/bin/true"]);
    let out = c
        .env("CYLO_USAGE_SOCKET", &daemon.socket)
        .stdin(Stdio::null())
        .current_dir(&scratch.dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)["tracker"], "proc");
    let mode = std::fs::metadata(&daemon.socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
}

/// A member that runs a setuid-root binary has credentials its unprivileged client does not
/// have: the kernel hides its `/proc/PID/io` from that client, and so does the daemon (its I/O
/// counters, argv and file name are null in the breakdown and the event stream, the process
/// is marked, the report says so). Root sees everything. The totals are the tree's.
#[test]
fn a_setuid_member_s_io_is_withheld_from_an_unprivileged_client() {
    use std::os::unix::fs::PermissionsExt;
    if !privileged() || !can_drop_privileges() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("daemon-setuid");
    // A setuid-root copy of the workload, in a folder everyone can reach.
    let setuid = scratch.dir.join("workload-setuid-root");
    std::fs::copy(WORKLOAD, &setuid).unwrap();
    std::os::unix::fs::chown(&setuid, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&setuid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let daemon = Daemon::start("setuid", &["--allow-all-users"]);
    let w = scratch.workload.to_str().unwrap();
    let s = setuid.to_str().unwrap();
    // sh, a plain child that moves 100,000 chars each way, and the setuid one 200,000 (named
    // in the environment, so that no argv the client may see holds its path). The `exit`
    // keeps sh from exec'ing its last command in place.
    let script = r#""$0" chars 100000 && "$SETUID_COPY" chars 200000; exit $?"#;
    let events = scratch.dir.join("events.ndjson");
    let args = [
        "run",
        "--json",
        "--tree",
        "--events",
        events.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
        w,
    ];
    let out = as_nobody(&scratch.cli, &args)
        .env("CYLO_USAGE_SOCKET", &daemon.socket)
        .env("SETUID_COPY", s)
        .stdin(Stdio::null())
        .current_dir(&scratch.dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = common::stderr(&out);
    assert!(
        err.contains("chars: euid 0"),
        "the copy did not run setuid: {err}"
    );
    let v = json(&out);
    assert_eq!(v["tracker"], "daemon", "{v}");
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 3, "{v}");
    let is_setuid = |p: &&serde_json::Value| p["comm"] == "workload-setuid";
    let hidden: Vec<_> = procs.iter().filter(is_setuid).collect();
    assert_eq!(hidden.len(), 1, "{v}");
    let hidden = hidden[0];
    assert_eq!(hidden["withheld"], true, "{hidden}");
    for key in [
        "io_read_chars",
        "io_write_chars",
        "disk_bytes_read",
        "disk_bytes_written",
        "disk_cancelled_write_bytes",
        "network_bytes_sent",
        "network_bytes_received",
        "argv",
        "filename",
    ] {
        assert!(hidden[key].is_null(), "{key} shown: {hidden}");
    }
    assert_eq!(hidden["exit_code"], 0, "{hidden}");
    for p in procs.iter().filter(|p| !is_setuid(p)) {
        assert!(p.get("withheld").is_none(), "{p}");
        assert!(p["io_read_chars"].as_u64().is_some(), "{p}");
        assert!(p["argv"].is_array(), "{p}");
    }
    let plain = procs
        .iter()
        .find(|p| p["comm"] == "cylo-usage-work")
        .unwrap();
    assert!(
        plain["io_read_chars"].as_u64().unwrap() >= 100_000,
        "{plain}"
    );
    assert_eq!(plain["filename"], w, "{plain}");
    let notes: Vec<&str> = v["precision_notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .filter(|n| n.contains("credentials this client does not have"))
        .collect();
    assert_eq!(notes.len(), 1, "{v}");
    assert!(notes[0].starts_with("1 process ran"), "{}", notes[0]);
    // The totals are the tree's: what the client's own /proc/PID/io shows once it has
    // waited for its children.
    assert!(v["io_read_chars"].as_u64().unwrap() >= 300_000, "{v}");
    // The event stream holds back the same.
    let text = std::fs::read_to_string(&events).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!text.contains("workload-setuid-root"), "{text}");
    let pid = &hidden["pid"];
    let of = |event: &str| {
        lines
            .iter()
            .find(|l| l["event"] == event && &l["pid"] == pid)
            .unwrap_or_else(|| panic!("no {event} of {pid}: {text}"))
    };
    let exec = of("exec");
    assert!(
        exec["argv"].is_null() && exec["filename"].is_null(),
        "{exec}"
    );
    assert_eq!(exec["withheld"], true, "{exec}");
    let exit = of("exit");
    assert!(exit["io_read_chars"].is_null(), "{exit}");
    assert_eq!(exit["withheld"], true, "{exit}");

    // Root, through the same daemon: everything.
    let out = Command::new(&scratch.cli)
        .args(["run", "--json", "--tree", "--", "sh", "-c", script, w])
        .env("CYLO_USAGE_SOCKET", &daemon.socket)
        .env("SETUID_COPY", s)
        .stdin(Stdio::null())
        .current_dir(&scratch.dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["tracker"], "daemon", "{v}");
    let procs = v["processes"].as_array().unwrap();
    let shown = procs.iter().find(is_setuid).unwrap();
    assert!(shown.get("withheld").is_none(), "{shown}");
    assert!(
        shown["io_read_chars"].as_u64().unwrap() >= 200_000,
        "{shown}"
    );
    assert_eq!(shown["filename"], s, "{shown}");
    let notes = v["precision_notes"].to_string();
    assert!(!notes.contains("credentials"), "{notes}");
}

/// The same for members that ran a setuid binary before an unprivileged client attached: the
/// credentials are read when they are adopted.
#[test]
fn setuid_members_found_at_an_attach_are_withheld_too() {
    use std::os::unix::fs::PermissionsExt;
    if !privileged() || !can_drop_privileges() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("daemon-setuid-attach");
    let setuid = scratch.dir.join("workload-setuid-root");
    std::fs::copy(WORKLOAD, &setuid).unwrap();
    std::os::unix::fs::chown(&setuid, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&setuid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let daemon = Daemon::start("setuid-attach", &["--allow-all-users"]);
    // nobody's sh, and under it the setuid copy and its child, blocked on stdin.
    let mut tree = as_nobody(
        Path::new("sh"),
        &["-c", r#""$SETUID_COPY" hold 1; exit $?"#],
    )
    .env("SETUID_COPY", &setuid)
    .stdin(Stdio::piped())
    .spawn()
    .unwrap();
    // Once the attach has taken the tree in, let it end.
    let client = attach_as_nobody(&daemon, &scratch, tree.id(), "attach-events.ndjson");
    drop(tree.stdin.take());
    let _ = tree.wait();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json_stdout(&out);
    assert_eq!(v["tracker"], "daemon", "{v}");
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 3, "{v}");
    for p in procs {
        let foreign = p["comm"] == "workload-setuid";
        assert_eq!(p["attached"], true, "{p}");
        if foreign {
            assert_eq!(p["withheld"], true, "{p}");
            assert!(
                p["io_read_chars"].is_null() && p["disk_bytes_read"].is_null(),
                "{p}"
            );
        } else {
            assert!(p.get("withheld").is_none(), "{p}");
            assert!(p["io_read_chars"].as_u64().is_some(), "{p}");
        }
    }
    let notes = v["precision_notes"].to_string();
    assert!(
        notes.contains("2 processes ran with credentials"),
        "{notes}"
    );
}

#[test]
fn a_fork_bomb_fills_only_its_own_quota() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("quota", &["--session-max-tasks", "100"]);
    let bomb = daemon
        .client(&["run", "--json", "--", WORKLOAD, "fork", "400"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let calm = daemon
        .client(&["run", "--json", "--", WORKLOAD, "fork", "90"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let calm = json(&calm.wait_with_output().unwrap());
    let bomb = json(&bomb.wait_with_output().unwrap());
    assert_exact(&calm);
    assert_eq!(calm["process_count"], 91, "{calm}");
    // Fail closed at the share: the fork past it is killed at birth with its creator.
    assert_eq!(bomb["precision"], "approximate", "{bomb}");
    assert!(
        bomb["tasks_killed_at_birth"].as_u64().unwrap() >= 1,
        "{bomb}"
    );
    assert_eq!(bomb["signal"], 9, "{bomb}");
    assert_eq!(bomb["tasks_escaped"], 0, "{bomb}");
    assert!(bomb["process_count"].as_u64().unwrap() <= 101, "{bomb}");
}

#[test]
fn hostile_clients_get_errors_and_the_daemon_serves_the_others() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("hostile", &["--max-sessions-per-user", "300"]);
    let connect = || UnixStream::connect(&daemon.socket).unwrap();
    let kind = |v: &serde_json::Value| v["kind"].as_str().unwrap_or_default().to_string();
    // Garbage: an HTTP request is a 0x20544547-byte frame.
    let mut s = connect();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(kind(&reply(&mut s).unwrap()), "bad-request");
    assert!(closed(&mut s));
    // Oversized.
    let mut s = connect();
    s.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
    assert_eq!(kind(&reply(&mut s).unwrap()), "bad-request");
    // Valid length, not JSON; JSON, not a request; a request before hello.
    for body in [
        &b"\xff\xfe\x00garbage"[..],
        b"{\"op\":\"rm -rf\"}",
        b"{\"op\":\"features\"}",
    ] {
        let mut s = connect();
        s.write_all(&frame(body)).unwrap();
        assert_eq!(kind(&reply(&mut s).unwrap()), "bad-request", "{body:?}");
        assert!(closed(&mut s));
    }
    // An unknown protocol version.
    let mut s = connect();
    s.write_all(&frame(br#"{"op":"hello","version":999}"#))
        .unwrap();
    let r = reply(&mut s).unwrap();
    assert_eq!(kind(&r), "version", "{r}");
    assert!(closed(&mut s));
    // Truncated: a header promising more than comes, then the client leaves.
    let mut s = connect();
    s.write_all(&[100, 0, 0, 0, b'{']).unwrap();
    drop(s);
    // Spawn with a descriptor that is not a /proc thread directory, and with none.
    let mut s = connect();
    s.write_all(&frame(br#"{"op":"hello","version":2}"#))
        .unwrap();
    assert_eq!(reply(&mut s).unwrap()["reply"], "hello");
    s.write_all(&frame(br#"{"op":"spawn","options":{}}"#))
        .unwrap();
    assert_eq!(kind(&reply(&mut s).unwrap()), "bad-request");
    // Someone else's session.
    s.write_all(&frame(br#"{"op":"usage","session":1,"breakdown":true}"#))
        .unwrap();
    assert_eq!(kind(&reply(&mut s).unwrap()), "no-such-session");
    s.write_all(&frame(br#"{"op":"kill","session":1,"signal":9}"#))
        .unwrap();
    assert_eq!(kind(&reply(&mut s).unwrap()), "no-such-session");
    drop(s);
    // A client that never reads its replies: it is cut off, the others are served meanwhile.
    let mut greedy = connect();
    greedy
        .write_all(&frame(br#"{"op":"hello","version":2}"#))
        .unwrap();
    let flood = std::thread::spawn(move || {
        let req = frame(br#"{"op":"features"}"#);
        greedy
            .set_write_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut sent = 0;
        while greedy.write_all(&req).is_ok() && sent < 200_000 {
            sent += 1;
        }
        sent
    });
    let out = daemon
        .client(&["run", "--json", "--", "/bin/true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_exact(&json(&out));
    flood.join().unwrap();
    // 1,000 connect/disconnect cycles, some greeting, some mid-frame.
    for i in 0..1000 {
        let mut s = connect();
        match i % 3 {
            0 => {}
            1 => {
                s.write_all(&frame(br#"{"op":"hello","version":2}"#))
                    .unwrap();
            }
            _ => {
                let _ = s.write_all(&[50, 0, 0]);
            }
        }
    }
    // 256 sessions at once (every run slot), from the library; the 257th is told "busy".
    let tracker = Tracker::connect(&daemon.socket).unwrap();
    let mut runs = Vec::new();
    let mut sleepers = Vec::new();
    for _ in 0..256 {
        let mut c = Command::new("sleep");
        c.arg("5");
        let run = tracker.spawn(&mut c).unwrap();
        sleepers.push(run.root_pid());
        runs.push(run);
    }
    let err = tracker.spawn(&mut Command::new("/bin/true")).err().unwrap();
    let text = cylo_usage::error_chain(&err);
    assert!(text.contains("256 run slots are in use"), "{text}");
    for run in &runs {
        let u = run.usage_totals().unwrap();
        assert_eq!(u.process_count, 1, "{u:?}");
    }
    for pid in sleepers {
        // SAFETY: signals a child of ours.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    drop(runs);
    // Still serving, exactly.
    let out = daemon
        .client(&["run", "--json", "--", WORKLOAD, "storm", "5"])
        .output()
        .unwrap();
    let v = json(&out);
    assert_exact(&v);
    assert_eq!(v["process_count"], 6);
}

fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).unwrap()
}

fn sample(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
}

#[test]
fn metrics_are_prometheus_text_and_the_hooks_detach_while_idle() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = Daemon::start("metrics", &["--metrics", &addr, "--bpf-stats"]);
    let idle = scrape(&addr);
    assert_eq!(sample(&idle, "cylo_usage_hooks_attached", None), 0.0);
    assert_eq!(sample(&idle, "cylo_usage_sessions_active", None), 0.0);
    assert_eq!(
        sample(&idle, "cylo_usage_map_capacity", Some(("map", "TASKS"))),
        65536.0
    );
    let tracker = Tracker::connect(&daemon.socket).unwrap();
    let run = tracker.spawn(Command::new("sleep").arg("3")).unwrap();
    let busy = scrape(&addr);
    assert_eq!(sample(&busy, "cylo_usage_hooks_attached", None), 1.0);
    assert_eq!(sample(&busy, "cylo_usage_sessions_active", None), 1.0);
    assert!(sample(&busy, "cylo_usage_map_entries", Some(("map", "TASKS"))) >= 1.0);
    assert!(sample(&busy, "cylo_usage_hooks_attach_last_seconds", None) > 0.0);
    let _ = run.kill(libc::SIGKILL);
    drop(run);
    // A second after the last session (and one turn of the daemon's loop), the hooks go.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let now = scrape(&addr);
        if sample(&now, "cylo_usage_hooks_attached", None) == 0.0 {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the hooks stayed attached while idle"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(sample(&after, "cylo_usage_sessions_total", None), 1.0);
    // The fork hook ran (under either of its names) for the session's root.
    let forks: f64 = after
        .samples
        .iter()
        .filter(|s| {
            s.metric == "cylo_usage_handler_calls_total"
                && s.labels
                    .get("program")
                    .is_some_and(|p| p.starts_with("task_newtask"))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!(forks >= 1.0, "{:?}", after.samples);
}

#[test]
fn sigterm_and_sigkill_leave_nothing_loaded() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut daemon = Daemon::start("term", &[]);
    let held = programs_of(daemon.child.id());
    assert_eq!(sets_among(&held), 1);
    let tracker = Tracker::connect(&daemon.socket).unwrap();
    let run = tracker.spawn(Command::new("sleep").arg("0.2")).unwrap();
    // SAFETY: signals our child.
    unsafe { libc::kill(daemon.pid(), libc::SIGTERM) };
    let status = daemon.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!daemon.socket.exists(), "the socket is removed");
    wait_unloaded(&held);
    // Its client goes on alone, and its report says so.
    let u = run.usage().unwrap();
    assert_eq!(u.precision, Precision::Approximate, "{u:?}");
    assert!(
        u.precision_notes[0].contains("went away"),
        "{:?}",
        u.precision_notes
    );
    drop(run);
    let daemon = Daemon::start("kill", &[]);
    let held = programs_of(daemon.child.id());
    assert_eq!(sets_among(&held), 1);
    // SAFETY: signals our child.
    unsafe { libc::kill(daemon.pid(), libc::SIGKILL) };
    drop(daemon);
    wait_unloaded(&held);
}

#[test]
fn a_client_whose_daemon_dies_keeps_its_commands_exit_status() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("dies", &[]);
    let started = daemon.dir.join("started");
    let script = format!("touch {}; sleep 1; exit 7", started.display());
    let client = daemon
        .client(&["run", "--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command runs (under the daemon's session): now the daemon dies.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the command did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: signals our child.
    unsafe { libc::kill(daemon.pid(), libc::SIGKILL) };
    let out = client.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    // The run went on without the daemon, and the report says so.
    let err = common::stderr(&out);
    assert!(err.contains("Precision: approximate"), "{err}");
    assert!(
        err.contains(&format!(
            "the daemon at {} went away",
            daemon.socket.display()
        )),
        "{err}"
    );
}

#[test]
fn socket_activation_serves_on_the_socket_it_is_given() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("activation");
    let socket = dir.join("sock");
    let systemd = Path::new("/usr/bin/systemd-socket-activate").exists();
    let mut child = if systemd {
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&socket)
            .arg(CLI)
            .arg("serve")
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    } else {
        // The same protocol by hand: the listening socket as fd 3, LISTEN_PID, LISTEN_FDS.
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$0\" serve",
            CLI,
        ])
        .stdin(Stdio::null());
        // SAFETY: dup2 and fcntl are async-signal-safe.
        unsafe {
            c.pre_exec(move || {
                // dup2 onto itself would keep close-on-exec: clear it then.
                let r = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c.spawn().unwrap();
        drop(listener);
        // Started at once (not on demand): let it load its programs before the run, as a
        // client's 10 s handshake deadline allows no more (emulated kernels take longer).
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let hello = format!(r#"{{"op":"hello","version":{}}}"#, common::wire::VERSION);
            let answered = std::io::Write::write_all(&mut &s, &frame(hello.as_bytes())).is_ok()
                && std::io::Read::read(&mut &s, &mut [0u8; 4]).is_ok_and(|n| n > 0);
            if answered {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the activated daemon never answered"
            );
        }
        child
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon (systemd-socket-activate runs it on demand).
    let out = Command::new(CLI)
        .args(["run", "--json", "--", WORKLOAD, "storm", "3"])
        .env("CYLO_USAGE_SOCKET", &socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    // SAFETY: signals our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_exact(&v);
    assert_eq!(v["process_count"], 4);
}

#[test]
fn a_client_in_another_pid_namespace_is_served_with_its_own_processes() {
    if !privileged() {
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
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("pidns", &[]);
    // Spawn from inside a container-like pid namespace.
    let out = Command::new("unshare")
        .args([
            "-fp",
            "--mount-proc",
            CLI,
            "run",
            "--json",
            "--",
            WORKLOAD,
            "storm",
            "7",
        ])
        .env("CYLO_USAGE_SOCKET", &daemon.socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_exact(&v);
    assert_eq!(v["process_count"], 8, "{v}");
    // Attach from inside: pid 2 of that namespace is its own process, not the host's pid 2.
    let script = format!("sleep 3 & exec {CLI} attach --json $!");
    let out = Command::new("unshare")
        .args(["-fp", "--mount-proc", "/bin/sh", "-c", &script])
        .env("CYLO_USAGE_SOCKET", &daemon.socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json_stdout(&out);
    assert_eq!(v["tracker"], "daemon", "{v}");
    assert_eq!(v["attached"], true, "{v}");
    assert_eq!(v["usage_before_attach"]["process_count"], 1, "{v}");
}

#[test]
fn a_thread_of_another_process_is_never_registered() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("foreign", &[]);
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.write_all(&frame(br#"{"op":"hello","version":2}"#))
        .unwrap();
    assert_eq!(reply(&mut s).unwrap()["reply"], "hello");
    // A thread of another process: the kernel refuses to register it.
    let mut victim = Command::new("sleep").arg("5").spawn().unwrap();
    let dir = std::fs::File::open(format!("/proc/{0}/task/{0}", victim.id())).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&dir);
    common::wire::send_frame(&s, br#"{"op":"spawn","options":{}}"#, &[fd]).unwrap();
    let r = reply(&mut s).unwrap();
    let _ = victim.kill();
    let _ = victim.wait();
    assert_eq!(r["kind"], "permission", "{r}");
    // A descriptor that is not a /proc directory at all.
    let file = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
    common::wire::send_frame(
        &s,
        br#"{"op":"spawn","options":{}}"#,
        &[std::os::fd::AsRawFd::as_raw_fd(&file)],
    )
    .unwrap();
    assert_eq!(reply(&mut s).unwrap()["kind"], "bad-request");
    // And the connection still serves a real spawn afterwards.
    drop(s);
    let out = daemon
        .client(&["run", "--json", "--", "/bin/true"])
        .output()
        .unwrap();
    assert_exact(&json(&out));
}

/// A registered thread that exits without forking leaves its registration until the client
/// confirms or 10 s pass. A new task that the kernel puts at the same `task_struct` address
/// (which it soon does: the slab hands freed objects out again, first on the same CPU) is not
/// that thread: its forks never join the session.
#[test]
fn a_registration_outliving_its_thread_is_no_one_elses() {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start("outlived", &[]);
    let s = UnixStream::connect(&daemon.socket).unwrap();
    let mut s2 = s.try_clone().unwrap();
    s2.write_all(&frame(br#"{"op":"hello","version":2}"#))
        .unwrap();
    assert_eq!(reply(&mut s2).unwrap()["reply"], "hello");
    // Registered from a thread that then exits without creating anything.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let registered = std::thread::spawn(move || {
        let me = std::fs::File::open("/proc/thread-self").unwrap();
        common::wire::send_frame(
            &s,
            br#"{"op":"spawn","options":{}}"#,
            &[std::os::fd::AsRawFd::as_raw_fd(&me)],
        )
        .unwrap();
        // Alive until the daemon has registered it.
        let _ = done_rx.recv();
    });
    let r = reply(&mut s2).unwrap();
    let _ = done_tx.send(());
    registered.join().unwrap();
    assert_eq!(r["reply"], "prepared", "{r}");
    let session = r["session"].as_u64().unwrap();
    // Its task_struct is freed after an RCU grace period; then new threads, each forking a
    // child, take the freed objects again.
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..300 {
        std::thread::spawn(|| {
            // SAFETY: the child only calls _exit; the parent reaps it.
            unsafe {
                let pid = libc::fork();
                if pid == 0 {
                    libc::_exit(0);
                }
                if pid > 0 {
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
        })
        .join()
        .unwrap();
    }
    // Nothing joined: confirming the spawn is refused, with no root.
    let confirm = format!(r#"{{"op":"spawned","session":{session},"created":true}}"#);
    s2.write_all(&frame(confirm.as_bytes())).unwrap();
    let r = reply(&mut s2).unwrap();
    assert_ne!(
        r["reply"], "started",
        "a stranger's fork was taken for the root: {r}"
    );
}

#[test]
fn the_shipped_systemd_units_are_valid() {
    let Ok(found) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED: no systemd-analyze here");
        return;
    };
    assert!(found.status.success());
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    if !units.is_dir() {
        eprintln!("SKIPPED: the source tree (contrib/systemd) is not here");
        return;
    }
    let dir = scratch_dir("units");
    for unit in ["cylo-usage.service", "cylo-usage.socket"] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        // Verified against the binary this build made.
        let text = text.replace("/usr/local/bin/cylo-usage", CLI);
        std::fs::write(dir.join(unit), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("cylo-usage.socket"))
        .arg(dir.join("cylo-usage.service"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Through the daemon, an unprivileged user's attach gets the same past as an in-process
/// tracker's: exited threads and reaped children in `usage_before_attach`, and the adopted
/// process's real start and argv in the breakdown.
/// nobody's `attach --json --tree --events SCRATCH/EVENTS PID` through `daemon`, once it has
/// taken the tree in (its event stream says `attached`).
fn attach_as_nobody(daemon: &Daemon, scratch: &Scratch, pid: u32, events: &str) -> Child {
    let events = scratch.dir.join(events);
    let client = as_nobody(
        &scratch.cli,
        &[
            "attach",
            "--json",
            "--tree",
            "--events",
            events.to_str().unwrap(),
            &pid.to_string(),
        ],
    )
    .env("CYLO_USAGE_SOCKET", &daemon.socket)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .current_dir(&scratch.dir)
    .spawn()
    .unwrap();
    let deadline = Instant::now() + common::bound(Duration::from_secs(15));
    while !std::fs::read_to_string(&events).is_ok_and(|t| t.contains("\"attached\"")) {
        assert!(
            Instant::now() < deadline,
            "the attach did not take the tree in"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    client
}

#[test]
fn an_attach_through_the_daemon_counts_whole_lives() {
    if !privileged() || !can_drop_privileges() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("daemon-past-lives");
    let daemon = Daemon::start("past-lives", &["--allow-all-users"]);
    let past = common::PastLives::start_as(&scratch.dir, 500, 300, 3 << 20, &[], |args| {
        as_nobody(&scratch.workload, args)
    });
    let proc_then = past.proc_figures();
    let client = attach_as_nobody(&daemon, &scratch, past.pid(), "past-events.ndjson");
    let proc_now = past.proc_figures();
    assert_eq!(proc_then, proc_now, "the workload idles");
    let truth = past.truth;
    let pid = past.pid();
    past.finish();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json_stdout(&out);
    assert_eq!(v["tracker"], "daemon", "{v}");
    let before: cylo_usage::UsageBeforeAttach =
        serde_json::from_value(v["usage_before_attach"].clone()).unwrap();
    assert_eq!((before.process_count, before.thread_count), (1, 1), "{v}");
    truth.check(&before, proc_now, false);
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{v}");
    let p = &procs[0];
    assert_eq!(p["pid"], pid, "{p}");
    assert!(p["start_ns"].as_i64().unwrap() < 0, "{p}");
    let argv: Vec<&str> = p["argv"]
        .as_array()
        .expect("argv")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(argv[1..3], ["past-lives", "500"], "{p}");
}
