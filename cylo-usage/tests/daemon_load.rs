//! The daemon under load from another user: sessions of many threads whose usage is asked
//! for back to back never make another session's requests fail or hang, and a breakdown
//! past its user's memory share drops processes and says so. Real daemons on private
//! sockets, real clients, the real kernel.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, privileged};
use common::{Scratch, as_nobody, can_drop_privileges, ebpf_required};

/// Sessions polled at once, and threads in each one's tree.
const POLLERS: usize = 8;

/// Threads in each polled tree: 1,000, or 200 in the kernel-matrix guests (2 GiB, emulated
/// CPUs).
fn threads() -> usize {
    if std::env::var_os("CYLO_USAGE_VM").is_some() {
        200
    } else {
        1_000
    }
}

/// Processes of the storm whose breakdown outgrows a 1 MiB share (about 1,600 fit): 10,000,
/// or 3,000 in the guests.
fn storm() -> u64 {
    if std::env::var_os("CYLO_USAGE_VM").is_some() {
        3_000
    } else {
        10_000
    }
}
/// What "does not hang" means here: a generous bound on a small, shared machine.
const VICTIM_BOUND: Duration = Duration::from_secs(10);

/// A `poll-usage` client: its session's usage asked for back to back until stdin closes.
struct Poller {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Poller {
    fn start(mut cmd: Command) -> Poller {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Poller { child, out }
    }

    fn wait_ready(&mut self) {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "a poller failed before it was ready");
    }

    /// Ends it; how many answers it got.
    fn stop(mut self) -> u64 {
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert!(self.child.wait().unwrap().success(), "a poller failed");
        line.trim().parse().unwrap()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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

/// Runs `cmd` to its end, failing the test if it takes longer than `bound`. Its stderr
/// goes through a file (a report can be larger than a pipe holds).
fn within(mut cmd: Command, bound: Duration) -> std::process::Output {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("cylo-usage-load-stderr-{}-{n}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let start = Instant::now();
    let mut child = cmd.stdout(Stdio::null()).stderr(file).spawn().unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&path);
            panic!("{cmd:?} did not finish within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr,
    }
}

#[test]
fn sessions_polled_in_a_loop_never_stall_another_users_run() {
    if !privileged() {
        return;
    }
    let scratch = Scratch::new("load-pollers");
    let unprivileged = can_drop_privileges();
    let daemon = Daemon::start("poll", &["--allow-all-users"]);
    let socket = daemon.socket.to_str().unwrap().to_string();
    let threads = threads().to_string();
    let args = ["poll-usage", socket.as_str(), threads.as_str()];
    let mut pollers: Vec<Poller> = (0..POLLERS)
        .map(|_| {
            Poller::start(if unprivileged {
                as_nobody(&scratch.workload, &args)
            } else {
                let mut c = Command::new(&scratch.workload);
                c.args(args);
                c
            })
        })
        .collect();
    for p in &mut pollers {
        p.wait_ready();
    }
    // Root's commands while the pollers keep the daemon busy: each ends in time and exact.
    for _ in 0..5 {
        let out = within(
            daemon.client(&["run", "--json", "--", "/bin/true"]),
            VICTIM_BOUND,
        );
        assert!(out.status.success(), "{out:?}");
        let v = report(&out);
        assert_eq!(v["tracker"], "daemon", "{v}");
        assert_eq!(v["precision"], "exact", "{v}");
        assert_eq!(v["process_count"], 1, "{v}");
    }
    // A session of the library: usage asked for while its tree runs, answered in time.
    let tracker = cylo_usage::Tracker::connect(&daemon.socket).unwrap();
    let mut cmd = Command::new(&scratch.workload);
    cmd.args(["hold-threads", "2", "3"]).stdin(Stdio::piped());
    let (r, w) = std::io::pipe().unwrap();
    cmd.stdin(r);
    let run = tracker.spawn(&mut cmd).unwrap();
    let start = Instant::now();
    let mut u = run.usage_totals().unwrap();
    while u.thread_count < 6 {
        assert!(start.elapsed() < VICTIM_BOUND, "{u:?}");
        std::thread::sleep(Duration::from_millis(20));
        u = run.usage_totals().unwrap();
    }
    let asked = Instant::now();
    let u = run.usage().unwrap();
    assert!(asked.elapsed() < VICTIM_BOUND);
    assert_eq!((u.process_count, u.thread_count), (3, 6), "{u:?}");
    assert_eq!(u.live_process_count, 3, "{u:?}");
    drop(w);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(VICTIM_BOUND, run.wait_finished())
            .await
            .expect("the tree ends in time")
            .unwrap()
    });
    drop(run);
    // The pollers were answered all along.
    for p in pollers {
        assert!(p.stop() > 0, "a poller got no answer");
    }
}

#[test]
fn a_breakdown_past_its_users_share_drops_processes_and_says_so() {
    if !privileged() {
        return;
    }
    let scratch = Scratch::new("load-budget");
    if !can_drop_privileges() {
        assert!(
            !ebpf_required(),
            "CYLO_USAGE_REQUIRE_EBPF=1 but setpriv cannot drop privileges"
        );
        eprintln!("SKIPPED: cannot run as another user");
        return;
    }
    // 1 MiB per user: a few thousand processes of breakdown.
    let daemon = Daemon::start(
        "budget",
        &[
            "--allow-all-users",
            "--memory-max",
            "16",
            "--memory-per-user",
            "1",
        ],
    );
    let workload = scratch.workload.to_str().unwrap();
    // The report (large: a breakdown) goes to a file.
    let file = scratch.dir.join("nobody.json");
    let path = file.to_str().unwrap();
    let n = storm();
    let size = n.to_string();
    let args = [
        "run", "--json", "-o", path, "--tree", "--", workload, "storm", &size,
    ];
    let mut cmd = as_nobody(&scratch.cli, &args);
    cmd.env("CYLO_USAGE_SOCKET", &daemon.socket);
    let out = within(cmd, Duration::from_secs(300));
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(v["tracker"], "daemon", "{v}");
    // The totals stay exact: only the breakdown is cut.
    assert_eq!(v["precision"], "exact");
    assert_eq!(v["process_count"], n + 1);
    let kept = v["processes"].as_array().expect("a breakdown").len() as u64;
    let dropped = v["processes_dropped"].as_u64().expect("processes dropped");
    assert_eq!(kept + dropped, n + 1);
    assert!(
        kept > 100 && dropped > n / 5,
        "kept {kept}, dropped {dropped}"
    );
    let notes = v["precision_notes"].to_string();
    assert!(
        notes.contains("user 65534's memory share of 1.0 MiB"),
        "{notes}"
    );
    // Root is not held to a user's share: its breakdown of the same size is whole.
    let file = scratch.dir.join("root.json");
    let path = file.to_str().unwrap();
    let args = [
        "run", "--json", "-o", path, "--tree", "--", workload, "storm", &size,
    ];
    let out = within(daemon.client(&args), Duration::from_secs(300));
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(v["processes"].as_array().unwrap().len() as u64, n + 1);
    assert!(v["processes_dropped"].is_null());
}
