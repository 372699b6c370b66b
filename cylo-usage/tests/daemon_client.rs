//! The daemon's client against daemons that misbehave: fake daemons (a Unix listener of the
//! test, speaking docs/protocol.md's frames) that trickle, never answer or refuse, and the
//! real daemon (`cylo-usage serve`) SIGKILLed in the middle of a run. The client must never
//! hang, must act on signals, must keep its `--timeout` promise alone, and a refusal must
//! never cost the command.
mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, privileged};
use common::{CLI, Scratch, as_nobody, bound, can_drop_privileges};

/// The real daemon's tests run one at a time (each loads a program set).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn scratch_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("cylo-usage-client-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// Reads one frame; `None` when the client closed.
fn read_frame(s: &mut UnixStream) -> Option<serde_json::Value> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(head) as usize];
    s.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

fn frame(value: &serde_json::Value) -> Vec<u8> {
    let body = serde_json::to_vec(value).unwrap();
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

fn hello_reply() -> serde_json::Value {
    serde_json::json!({"reply": "hello", "version": 2, "daemon": "fake", "uid": 0})
}

/// How a fake daemon treats each connection.
#[derive(Clone, Copy)]
enum Fake {
    /// Answers `hello` one byte every `3 s`.
    Trickle,
    /// Reads `hello` and never answers.
    Silent,
    /// Refuses `hello` with this kind and message.
    RefuseHello(&'static str, &'static str),
    /// Answers `hello`, refuses `spawn` with this kind and message.
    RefuseSpawn(&'static str, &'static str),
}

/// A fake daemon on a socket everyone may use; it serves until the test ends.
struct FakeDaemon {
    dir: PathBuf,
    socket: PathBuf,
}

impl FakeDaemon {
    fn start(name: &str, how: Fake) -> FakeDaemon {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch_dir(name);
        let socket = dir.join("sock");
        let listener = UnixListener::bind(&socket).unwrap();
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || serve_fake(&mut conn, how));
            }
        });
        FakeDaemon { dir, socket }
    }

    fn client(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args)
            .env("CYLO_USAGE_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn serve_fake(conn: &mut UnixStream, how: Fake) {
    let Some(_hello) = read_frame(conn) else {
        return;
    };
    match how {
        Fake::Trickle => {
            for b in frame(&hello_reply()) {
                std::thread::sleep(Duration::from_secs(3));
                if conn.write_all(&[b]).is_err() {
                    return;
                }
            }
        }
        Fake::Silent => {
            let mut sink = [0u8; 64];
            while conn.read(&mut sink).is_ok_and(|n| n > 0) {}
        }
        Fake::RefuseHello(kind, message) => {
            let _ = conn.write_all(&frame(
                &serde_json::json!({"reply": "error", "kind": kind, "message": message}),
            ));
        }
        Fake::RefuseSpawn(kind, message) => {
            let _ = conn.write_all(&frame(&hello_reply()));
            while let Some(request) = read_frame(conn) {
                let reply = match request["op"].as_str() {
                    Some("spawn") | Some("attach") => {
                        serde_json::json!({"reply": "error", "kind": kind, "message": message})
                    }
                    _ => serde_json::json!({"reply": "error", "kind": "bad-request",
                        "message": "not expected"}),
                };
                if conn.write_all(&frame(&reply)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits for `child` at most `limit`; kills it (and fails) past that.
fn wait_within(child: &mut Child, limit: Duration, what: &str) -> (ExitStatus, Duration) {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return (s, start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(mut child: Child) -> String {
    let mut text = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut text);
    }
    text
}

fn report(stderr: &str) -> serde_json::Value {
    let line = stderr
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report in: {stderr}"));
    serde_json::from_str(line).unwrap()
}

fn notes(v: &serde_json::Value) -> String {
    v["precision_notes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n.as_str().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

#[test]
fn a_trickling_daemon_holds_a_client_no_longer_than_the_handshake_deadline() {
    if !common::host_only("a_trickling_daemon_holds_a_client_no_longer_than_the_handshake_deadline")
    {
        return;
    }
    let fake = FakeDaemon::start("trickle", Fake::Trickle);
    let start = Instant::now();
    let mut c = fake
        .client(Path::new(CLI), &["run", "--json", "--", "true"])
        .spawn()
        .unwrap();
    let (status, took) = wait_within(&mut c, bound(Duration::from_secs(15)), "run -- true");
    let err = stderr_of(c);
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(took < bound(Duration::from_secs(15)), "took {took:?}");
    let v = report(&err);
    assert_ne!(v["tracker"], "daemon", "{v}");
    let n = notes(&v);
    assert!(
        n.contains(&format!("the daemon at {} failed", fake.socket.display()))
            && n.contains("did not answer hello within 10s"),
        "{n}"
    );
    eprintln!(
        "run -- true against a trickling daemon: {:?}",
        start.elapsed()
    );
}

#[test]
fn a_silent_daemon_holds_a_client_no_longer_than_the_handshake_deadline() {
    if !common::host_only("a_silent_daemon_holds_a_client_no_longer_than_the_handshake_deadline") {
        return;
    }
    let fake = FakeDaemon::start("silent", Fake::Silent);
    let mut c = fake
        .client(
            Path::new(CLI),
            &["run", "--json", "--", "sh", "-c", "exit 3"],
        )
        .spawn()
        .unwrap();
    let (status, _) = wait_within(&mut c, bound(Duration::from_secs(15)), "run");
    let err = stderr_of(c);
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(
        notes(&report(&err)).contains("did not answer hello"),
        "{err}"
    );
}

#[test]
fn sigterm_ends_a_client_stuck_on_a_trickling_daemon_at_once() {
    if !common::host_only("sigterm_ends_a_client_stuck_on_a_trickling_daemon_at_once") {
        return;
    }
    let fake = FakeDaemon::start("sigterm", Fake::Trickle);
    let mut c = fake
        .client(Path::new(CLI), &["run", "--json", "--", "sleep", "30"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // What timeout(1) does at its deadline.
    // SAFETY: signals our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let (status, took) = wait_within(
        &mut c,
        bound(Duration::from_secs(15)),
        "the client after SIGTERM",
    );
    let err = stderr_of(c);
    // The daemon's call is cut short (1 s), the command is started without it and gets the
    // signal that waited: 128 + SIGTERM, with a report.
    assert!(
        took < bound(Duration::from_secs(5)),
        "SIGTERM took {took:?} to act: {err}"
    );
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{err}");
    let v = report(&err);
    assert_eq!(v["signal"], libc::SIGTERM, "{v}");
    assert!(notes(&v).contains("hello was cut short"), "{v}");
}

#[test]
fn a_refused_spawn_still_runs_the_command_and_says_why() {
    if !common::host_only("a_refused_spawn_still_runs_the_command_and_says_why") {
        return;
    }
    if !privileged() {
        return;
    }
    let fake = FakeDaemon::start(
        "refuse-spawn",
        Fake::RefuseSpawn("busy", "every run slot (256) is taken"),
    );
    let mut c = fake
        .client(
            Path::new(CLI),
            &["-v", "run", "--json", "--", "sh", "-c", "exit 5"],
        )
        .spawn()
        .unwrap();
    let (status, _) = wait_within(&mut c, bound(Duration::from_secs(30)), "run");
    let err = stderr_of(c);
    assert_eq!(status.code(), Some(5), "{err}");
    // `-v` says it as it happens.
    assert!(
        err.lines()
            .any(|l| l.contains("WARN") && l.contains("refused: every run slot (256) is taken")),
        "{err}"
    );
    let v = report(&err);
    // Root loads the programs itself: still exact.
    assert_eq!(v["tracker"], "in-process", "{v}");
    assert_eq!(v["precision"], "exact", "{v}");
    let n = notes(&v);
    assert!(
        n.contains(&format!(
            "the daemon at {} refused: every run slot (256) is taken",
            fake.socket.display()
        )),
        "{n}"
    );
}

#[test]
fn a_refused_hello_still_runs_the_command_unprivileged_and_require_exact_says_why() {
    if !common::host_only(
        "a_refused_hello_still_runs_the_command_unprivileged_and_require_exact_says_why",
    ) {
        return;
    }
    if !can_drop_privileges() {
        return;
    }
    let fake = FakeDaemon::start(
        "refuse-hello",
        Fake::RefuseHello("limit", "user 65534 already has 64 sessions open"),
    );
    let scratch = Scratch::new("client-refused-bin");
    let mut c = as_nobody(&scratch.cli, &["run", "--json", "--", "sh", "-c", "exit 4"]);
    c.env("CYLO_USAGE_SOCKET", &fake.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut c = c.spawn().unwrap();
    let (status, _) = wait_within(&mut c, bound(Duration::from_secs(30)), "run");
    let err = stderr_of(c);
    assert_eq!(status.code(), Some(4), "{err}");
    let v = report(&err);
    assert_eq!(v["tracker"], "proc", "{v}");
    assert!(
        notes(&v).contains("refused: user 65534 already has 64 sessions open"),
        "{v}"
    );
    // With --require-exact: 125, with the daemon's reason and why loading here failed.
    let mut c = as_nobody(
        &scratch.cli,
        &["run", "--require-exact", "--", "sh", "-c", "exit 4"],
    );
    c.env("CYLO_USAGE_SOCKET", &fake.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("refused: user 65534 already has 64 sessions open")
            && err.contains("loading the eBPF programs in this process failed")
            && err.contains("CAP_BPF"),
        "{err}"
    );
}

/// The real daemon on a private socket.
fn real_daemon(name: &str) -> Daemon {
    Daemon::start(&format!("client-{name}"), &[])
}

/// `cylo-usage ARGS` as a client of `daemon`, its report (stderr) piped.
fn client_of(daemon: &Daemon, args: &[&str]) -> Command {
    let mut c = daemon.client(args);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Waits (up to a bound) until the client `pid` has started its command: a child of one of
/// its threads.
fn wait_started(pid: u32) {
    let deadline = Instant::now() + bound(Duration::from_secs(20));
    loop {
        let started = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.filter_map(Result::ok).any(|t| {
                    std::fs::read_to_string(t.path().join("children"))
                        .is_ok_and(|c| !c.trim().is_empty())
                })
            })
            .unwrap_or(false);
        if started {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "client {pid} never started its command"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` is alive (a zombie is not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(str::to_string))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

fn pids_in(file: &Path) -> Vec<u32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn the_daemon_sigkilled_mid_run_the_client_still_times_out_on_time_and_leaves_nothing() {
    if !common::host_only(
        "the_daemon_sigkilled_mid_run_the_client_still_times_out_on_time_and_leaves_nothing",
    ) {
        return;
    }
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut daemon = real_daemon("sigkilled");
    let pids = daemon.dir.join("pids");
    // Every member ignores SIGTERM: only the SIGKILL after --kill-after ends them. One
    // sleeper is the root's child, one is double-forked (an orphan), the root sleeps too.
    let script = format!(
        "trap '' TERM; sleep 9 & echo $! >> {p}; (sleep 9 & echo $! >> {p}) ; \
         echo $$ >> {p}; exec sleep 9",
        p = pids.display()
    );
    let start = Instant::now();
    let mut c = client_of(
        &daemon,
        &[
            "run",
            "--json",
            "--timeout",
            "2s",
            "--kill-after",
            "1s",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .spawn()
    .unwrap();
    // Mid-run: once the command runs (a slow guest may take longer than a second).
    wait_started(c.id());
    std::thread::sleep(Duration::from_millis(500));
    daemon.sigkill();
    let (status, _) = wait_within(&mut c, bound(Duration::from_secs(30)), "the client");
    let took = start.elapsed();
    let err = stderr_of(c);
    assert_eq!(status.code(), Some(124), "{err}");
    assert!(
        took < bound(Duration::from_secs(6)),
        "the timeout came at {took:?}: {err}"
    );
    let members = pids_in(&pids);
    assert_eq!(members.len(), 3, "{members:?}: {err}");
    for pid in &members {
        assert!(!alive(*pid), "member {pid} outlived the timeout: {err}");
    }
    let v = report(&err);
    assert_eq!(v["timed_out"], true, "{v}");
    assert_eq!(v["precision"], "approximate", "{v}");
    assert_eq!(v["live_process_count"], 0, "{v}");
    let n = notes(&v);
    assert!(
        n.contains(&format!(
            "the daemon at {} went away at",
            daemon.socket.display()
        )),
        "{n}"
    );
    eprintln!("timed out at {took:?} after the daemon's death");
}

#[test]
fn after_the_daemon_died_signals_still_reach_the_command() {
    if !common::host_only("after_the_daemon_died_signals_still_reach_the_command") {
        return;
    }
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut daemon = real_daemon("signals");
    let mut c = client_of(
        &daemon,
        &[
            "run",
            "--json",
            "--",
            "sh",
            "-c",
            "trap 'kill $!; exit 7' TERM; sleep 20 & wait",
        ],
    )
    .spawn()
    .unwrap();
    // Mid-run: once the command runs (a slow guest may take longer than a second).
    wait_started(c.id());
    std::thread::sleep(Duration::from_millis(500));
    daemon.sigkill();
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    // SAFETY: signals our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let (status, _) = wait_within(&mut c, bound(Duration::from_secs(30)), "the client");
    let took = sent.elapsed();
    let err = stderr_of(c);
    // The command's own status: it got SIGTERM and chose 7.
    assert_eq!(status.code(), Some(7), "{err}");
    assert!(took < bound(Duration::from_secs(5)), "took {took:?}: {err}");
    let v = report(&err);
    assert_eq!(v["exit_code"], 7, "{v}");
    assert!(notes(&v).contains("went away at"), "{v}");
}

#[test]
fn a_user_at_the_real_daemons_session_cap_still_runs_its_command() {
    if !common::host_only("a_user_at_the_real_daemons_session_cap_still_runs_its_command") {
        return;
    }
    if !privileged() || !can_drop_privileges() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("cap");
    let socket = dir.join("sock");
    let mut daemon = Command::new(CLI)
        .args(["serve", "--allow-all-users", "--max-sessions-per-user", "1"])
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let scratch = Scratch::new("client-cap-bin");
    let client = |args: &[&str]| {
        let mut c = as_nobody(&scratch.cli, args);
        c.env("CYLO_USAGE_SOCKET", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    // Nobody's one session.
    let mut holder = client(&["run", "--", "sleep", "5"]).spawn().unwrap();
    // Mid-run: once the command runs (a slow guest may take longer than a second).
    wait_started(holder.id());
    std::thread::sleep(Duration::from_millis(500));
    let out = client(&["run", "--json", "--", "sh", "-c", "exit 6"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    let v = report(&err);
    assert_eq!(v["tracker"], "proc", "{v}");
    assert!(
        notes(&v).contains(&format!("the daemon at {} refused: ", socket.display())),
        "{v}"
    );
    let _ = holder.kill();
    let _ = holder.wait();
    // SAFETY: signals our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGKILL) };
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stopped_daemon_does_not_hold_back_a_timeout() {
    if !common::host_only("a_stopped_daemon_does_not_hold_back_a_timeout") {
        return;
    }
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = real_daemon("stopped");
    let pids = daemon.dir.join("pids");
    let script = format!(
        "trap '' TERM; sleep 9 & echo $! >> {p}; echo $$ >> {p}; exec sleep 9",
        p = pids.display()
    );
    let start = Instant::now();
    let mut c = client_of(
        &daemon,
        &[
            "run",
            "--json",
            "--timeout",
            "2s",
            "--kill-after",
            "1s",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .spawn()
    .unwrap();
    // Mid-run: once the command runs (a slow guest may take longer than a second).
    wait_started(c.id());
    std::thread::sleep(Duration::from_millis(500));
    // Alive, holding the connection, answering nothing.
    // SAFETY: signals our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGSTOP) };
    let (status, _) = wait_within(&mut c, bound(Duration::from_secs(30)), "the client");
    let took = start.elapsed();
    // SAFETY: signals our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGCONT) };
    let err = stderr_of(c);
    assert_eq!(status.code(), Some(124), "{err}");
    // 2 s, then at most 0.5 s for a call in flight, then 1 s to SIGKILL.
    assert!(
        took < bound(Duration::from_secs(6)),
        "the timeout came at {took:?}: {err}"
    );
    let members = pids_in(&pids);
    assert_eq!(members.len(), 2, "{members:?}: {err}");
    for pid in &members {
        assert!(!alive(*pid), "member {pid} outlived the timeout: {err}");
    }
    let v = report(&err);
    assert_eq!(v["precision"], "approximate", "{v}");
    assert!(notes(&v).contains("did not answer"), "{v}");
    eprintln!("timed out at {took:?} with the daemon stopped");
}
