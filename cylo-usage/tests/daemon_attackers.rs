//! `cylo-usage serve` against hostile local users who speak docs/protocol.md themselves:
//! a client that never reads its events, floods of sessions, connections and handshakes from
//! many uids, a trickled frame, and the load of a CI host's root jobs. Each test measures a
//! victim while the attacker runs: another user's (or root's) run must still be served, exact,
//! within a generous bound. The tests of this file run one at a time.
mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, frame, json};
use common::{Scratch, WORKLOAD, as_user, bound, can_drop_privileges};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Uids with no account: `setpriv` and the raw syscalls need none.
const MALLORY: u32 = 61_001;
const VICTIM: u32 = 61_002;

fn privileged() -> bool {
    common::daemon::privileged() && can_drop_privileges()
}

/// `cylo-usage serve --allow-all-users ARGS`, with a descriptor limit when `nofile` is given.
fn start(name: &str, args: &[&str], nofile: Option<u64>) -> Daemon {
    let mut all = vec!["--allow-all-users"];
    all.extend_from_slice(args);
    Daemon::start_with(name, &all, nofile)
}

/// Reads one reply frame and the descriptors that came with it.
fn reply_with_fds(s: &UnixStream) -> Option<(serde_json::Value, Vec<OwnedFd>)> {
    let (body, fds) = common::wire::recv_frame(s, 64 << 20).ok()?;
    Some((serde_json::from_slice(&body).ok()?, fds))
}

fn reply(s: &UnixStream) -> Option<serde_json::Value> {
    reply_with_fds(s).map(|(v, _)| v)
}

fn hello(s: &UnixStream) -> serde_json::Value {
    let body = format!(r#"{{"op":"hello","version":{}}}"#, common::wire::VERSION);
    (&*s).write_all(&frame(body.as_bytes())).unwrap();
    reply(s).expect("a hello reply")
}

/// Runs `f` on a thread whose credentials (only its own: raw syscalls, not glibc's
/// process-wide wrappers) are uid and gid `uid` without groups: what it connects, the daemon
/// sees as that user.
fn on_thread_as<T: Send + 'static>(uid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: raw credential syscalls that change only the calling thread.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        f()
    })
    .join()
    .unwrap()
}

/// `cylo-usage ARGS` as user `uid` (root when `None`), a client of `daemon`, with a deadline:
/// the output, and how long it took.
fn client(
    daemon: &Daemon,
    scratch: &Scratch,
    uid: Option<u32>,
    args: &[&str],
) -> (Output, Duration) {
    let mut c = match uid {
        Some(uid) => as_user(uid, &scratch.cli, args),
        None => {
            let mut c = Command::new(&scratch.cli);
            c.args(args);
            c
        }
    };
    c.env("CYLO_USAGE_SOCKET", &daemon.socket)
        .current_dir(&scratch.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = c.spawn().unwrap();
    let deadline = start + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cylo-usage {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = start.elapsed();
    (child.wait_with_output().unwrap(), took)
}

/// The report of a run through the daemon: served by it, exact, exit 0.
fn assert_served_exactly(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{out:?}");
    let v = json(out);
    assert_eq!(v["tracker"], "daemon", "{v}");
    assert_eq!(v["precision"], "exact", "{v}");
    v
}

/// A process of user `uid` that execs `/bin/true` without end (a stream of events).
/// A child killed (and reaped) when dropped, so that a failing test leaves nothing running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn busy_process(uid: u32) -> Killed {
    let child = as_user(
        uid,
        Path::new("/bin/sh"),
        &["-c", "while :; do /bin/true; done"],
    )
    .stdin(Stdio::null())
    .spawn()
    .unwrap();
    // Until setpriv has changed its uids and exec'd, it is still root's.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mine = format!("Uid:\t{uid}\t{uid}\t{uid}");
    while !std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .is_ok_and(|s| s.contains(&mine))
    {
        assert!(
            Instant::now() < deadline,
            "the busy process never became {uid}'s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Killed(child)
}

fn pidfd_open(pid: u32) -> OwnedFd {
    // SAFETY: pidfd_open returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(fd >= 0, "pidfd_open({pid})");
    // SAFETY: fresh descriptor.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

#[test]
fn a_client_that_never_reads_its_events_stalls_no_one() {
    if !common::host_only("a_client_that_never_reads_its_events_stalls_no_one") {
        return;
    }
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("att-events");
    let daemon = start("events", &[], None);
    let socket = daemon.socket.clone();
    let busy = busy_process(MALLORY);
    let pid = busy.0.id();
    // Mallory attaches to her own busy process with events, takes the read end, makes it
    // blocking (all she can reach now) and never reads. The old attack, her own pipe's
    // write end handed over, is refused.
    let (conn, reader) = on_thread_as(MALLORY, move || {
        let s = UnixStream::connect(&socket).unwrap();
        assert_eq!(hello(&s)["reply"], "hello");
        let pidfd = pidfd_open(pid);
        let (_r, w) = std::io::pipe().unwrap();
        common::wire::send_frame(
            &s,
            br#"{"op":"attach","options":{"events":true}}"#,
            &[pidfd.as_raw_fd(), w.as_raw_fd()],
        )
        .unwrap();
        let refused = reply(&s).unwrap();
        assert_eq!(refused["kind"], "bad-request", "{refused}");
        common::wire::send_frame(
            &s,
            br#"{"op":"attach","options":{"events":true,"tree":true}}"#,
            &[pidfd.as_raw_fd()],
        )
        .unwrap();
        let (started, mut fds) = reply_with_fds(&s).unwrap();
        assert_eq!(started["reply"], "started", "{started}");
        assert_eq!(fds.len(), 2, "the wake-up eventfd and the events' read end");
        let reader = fds.pop().unwrap();
        for _ in 0..3 {
            // SAFETY: fcntl on a descriptor we own.
            unsafe {
                let fl = libc::fcntl(reader.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        (s, reader)
    });
    // Let her stream fill the pipe and the backlog.
    std::thread::sleep(Duration::from_secs(3));
    // Another user's breakdown, and root's event stream, are served at once meanwhile.
    for _ in 0..3 {
        let (out, took) = client(
            &daemon,
            &scratch,
            Some(VICTIM),
            &["run", "--json", "--tree", "--", "/bin/true"],
        );
        assert_served_exactly(&out);
        assert!(
            took < bound(Duration::from_secs(2)),
            "the victim's run took {took:?}"
        );
    }
    let events = scratch.dir.join("events.ndjson");
    let (out, took) = client(
        &daemon,
        &scratch,
        None,
        &[
            "run",
            "--json",
            "--events",
            events.to_str().unwrap(),
            "--",
            "/bin/true",
        ],
    );
    assert_served_exactly(&out);
    assert!(
        took < bound(Duration::from_secs(2)),
        "root's run took {took:?}"
    );
    assert!(
        std::fs::read_to_string(&events)
            .unwrap()
            .contains("\"exit\"")
    );
    // Her own connection is still answered.
    (&conn).write_all(&frame(br#"{"op":"features"}"#)).unwrap();
    assert_eq!(reply(&conn).unwrap()["reply"], "features");
    drop(reader);
    drop(conn);
    drop(busy);
}

/// Opens as many connections as the daemon takes from user `uid`, each with `then` sent (or
/// nothing), and returns them; stops at the first refusal or closed connection.
fn flood_connections(socket: PathBuf, uid: u32, n: usize, greet: bool) -> Vec<UnixStream> {
    on_thread_as(uid, move || {
        let mut held = Vec::new();
        for _ in 0..n {
            let Ok(s) = UnixStream::connect(&socket) else {
                break;
            };
            if greet {
                let body = format!(r#"{{"op":"hello","version":{}}}"#, common::wire::VERSION);
                if (&s).write_all(&frame(body.as_bytes())).is_err() {
                    break;
                }
                match reply(&s) {
                    Some(r) if r["reply"] == "hello" => {}
                    _ => break,
                }
            }
            held.push(s);
        }
        held
    })
}

/// As user `uid`, opens up to `n` spawn sessions (each root a `sleep 30` of that user) on one
/// connection; returns the connection, the roots, and the first refusal's text if any.
fn flood_sessions(socket: PathBuf, uid: u32, n: usize) -> (UnixStream, Vec<Child>, Option<String>) {
    on_thread_as(uid, move || {
        let s = UnixStream::connect(&socket).unwrap();
        assert_eq!(hello(&s)["reply"], "hello");
        let mut roots = Vec::new();
        let mut refusal = None;
        for _ in 0..n {
            let dir = std::fs::File::open("/proc/thread-self").unwrap();
            common::wire::send_frame(&s, br#"{"op":"spawn","options":{}}"#, &[dir.as_raw_fd()])
                .unwrap();
            let r = reply(&s).unwrap();
            if r["reply"] != "prepared" {
                refusal = Some(r.to_string());
                break;
            }
            let child = Command::new("sleep").arg("30").spawn().unwrap();
            let body = format!(
                r#"{{"op":"spawned","session":{},"created":true}}"#,
                r["session"]
            );
            (&s).write_all(&frame(body.as_bytes())).unwrap();
            assert_eq!(reply(&s).unwrap()["reply"], "started");
            roots.push(child);
        }
        (s, roots, refusal)
    })
}

/// Kills and reaps the roots of flooded sessions.
fn end_roots<'a>(roots: impl IntoIterator<Item = &'a mut Child>) {
    for r in roots {
        let _ = r.kill();
        let _ = r.wait();
    }
}

/// Raises this process's descriptor limit to at least `n` (root may raise the hard one).
fn raise_nofile(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill and read a plain struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < n as libc::rlim_t {
            let want = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: lim.rlim_max.max(n as libc::rlim_t),
            };
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &want),
                0,
                "raising RLIMIT_NOFILE"
            );
        }
    }
}

#[test]
fn floods_of_sessions_connections_and_handshakes_leave_root_served() {
    if !common::host_only("floods_of_sessions_connections_and_handshakes_leave_root_served") {
        return;
    }
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // This test holds thousands of connections itself (the kernel-matrix guests start it
    // with a soft limit of 1,024).
    raise_nofile(16_384);
    let scratch = Scratch::new("att-flood");
    // Under systemd's default soft limit: the daemon raises it, or fits its tables in it.
    // Shares of 16 threads, so that the run slots fill before the maps' room does (the
    // room's own test is `users_together_cannot_take_the_maps_root_needs`).
    let daemon = start("flood", &["--session-max-tasks", "16"], Some(1024));
    // 4 users x 64 sessions: more than unprivileged users may hold in all.
    let mut held = Vec::new();
    let mut refusals = Vec::new();
    for uid in 0..4 {
        let (conn, roots, refused) = flood_sessions(daemon.socket.clone(), 62_000 + uid, 64);
        refusals.extend(refused);
        held.push((conn, roots));
    }
    let sessions: usize = held.iter().map(|(_, r)| r.len()).sum();
    assert!(sessions < 256, "{sessions} sessions");
    assert!(
        refusals.iter().any(|r| r.contains("run_slots")),
        "{refusals:?}"
    );
    // 8 users x 128 idle connections that never say hello, and 8 x 128 that did.
    let mut idle = Vec::new();
    for uid in 0..8 {
        idle.extend(flood_connections(
            daemon.socket.clone(),
            63_000 + uid,
            128,
            false,
        ));
        idle.extend(flood_connections(
            daemon.socket.clone(),
            63_100 + uid,
            128,
            true,
        ));
    }
    // Root is still served by the daemon, exactly, and at once.
    for _ in 0..3 {
        let (out, took) = client(
            &daemon,
            &scratch,
            None,
            &["run", "--json", "--", "/bin/true"],
        );
        assert_served_exactly(&out);
        assert!(
            took < bound(Duration::from_secs(5)),
            "root's run took {took:?}"
        );
    }
    // Another unprivileged user is refused for a named limit, and still runs its command.
    let (out, _) = client(
        &daemon,
        &scratch,
        Some(VICTIM),
        &["run", "--json", "--", "/bin/true"],
    );
    assert!(out.status.success(), "{out:?}");
    // The handshakes that never came are cut off after the grace period.
    std::thread::sleep(Duration::from_secs(7));
    let mut cut = 0;
    for s in &idle {
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut b = [0u8; 1];
        if matches!((&*s).read(&mut b), Ok(0)) {
            cut += 1;
        }
    }
    assert!(cut > 0, "no idle connection was closed");
    drop(idle);
    for (_, roots) in &mut held {
        end_roots(roots.iter_mut());
    }
}

#[test]
fn a_hundred_and_twenty_root_jobs_at_once_all_run_exactly() {
    if !common::host_only("a_hundred_and_twenty_root_jobs_at_once_all_run_exactly") {
        return;
    }
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("att-ci");
    let daemon = start("ci", &[], None);
    // One run first, so that the storm meets the hooks attached (the first attach waits on
    // the kernel's RCU grace periods, seconds in the emulated guests).
    let scratch_run = client(
        &daemon,
        &scratch,
        None,
        &["run", "--json", "--", "/bin/true"],
    );
    assert_served_exactly(&scratch_run.0);
    // 120 at once here; 70 in the kernel-matrix guests (2 GiB): more than the 64 sessions a
    // user may hold, all the same.
    let n = if std::env::var_os("CYLO_USAGE_VM").is_some() {
        70
    } else {
        120
    };
    let jobs: Vec<Child> = (0..n)
        .map(|_| {
            Command::new(&scratch.cli)
                .args(["run", "--json", "--", "sleep", "1"])
                .env("CYLO_USAGE_SOCKET", &daemon.socket)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for job in jobs {
        let out = job.wait_with_output().unwrap();
        let v = assert_served_exactly(&out);
        assert_eq!(v["process_count"], 1, "{v}");
    }
}

#[test]
fn a_trickled_frame_cannot_hold_a_pending_spawn_or_a_handshake_open() {
    if !common::host_only("a_trickled_frame_cannot_hold_a_pending_spawn_or_a_handshake_open") {
        return;
    }
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = start("trickle", &[], None);
    let socket = daemon.socket.clone();
    let closed_after = on_thread_as(MALLORY, move || {
        let s = UnixStream::connect(&socket).unwrap();
        assert_eq!(hello(&s)["reply"], "hello");
        let dir = std::fs::File::open("/proc/thread-self").unwrap();
        common::wire::send_frame(&s, br#"{"op":"spawn","options":{}}"#, &[dir.as_raw_fd()])
            .unwrap();
        assert_eq!(reply(&s).unwrap()["reply"], "prepared");
        // The confirmation, one byte a second.
        let start = Instant::now();
        let body = frame(br#"{"op":"spawned","session":1,"created":false}"#);
        for b in body {
            if (&s).write_all(&[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            let mut probe = [0u8; 1];
            s.set_nonblocking(true).unwrap();
            let gone = matches!((&s).read(&mut probe), Ok(0));
            s.set_nonblocking(false).unwrap();
            if gone {
                break;
            }
        }
        start.elapsed()
    });
    assert!(
        closed_after < bound(Duration::from_secs(15)),
        "the trickled spawn stayed open {closed_after:?}"
    );
    // A connection that never says hello is closed after the grace period.
    let s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let start = Instant::now();
    let mut b = [0u8; 1];
    let n = (&s).read(&mut b).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        start.elapsed() < bound(Duration::from_secs(15)),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_user_is_held_to_its_sessions_and_root_is_not() {
    if !common::host_only("a_user_is_held_to_its_sessions_and_root_is_not") {
        return;
    }
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("att-per-user");
    let daemon = start("per-user", &["--max-sessions-per-user", "2"], None);
    let (conn, mut roots, refused) = flood_sessions(daemon.socket.clone(), MALLORY, 3);
    assert_eq!(roots.len(), 2);
    let refused = refused.expect("the third session is refused");
    assert!(refused.contains(r#""kind":"limit""#), "{refused}");
    assert!(
        refused.contains("already has 2 sessions open") && refused.contains("sessions_per_user"),
        "{refused}"
    );
    // Root is not bound by the per-user limit: three of its runs at once, all served.
    let sleepers: Vec<Child> = (0..3)
        .map(|_| {
            Command::new(&scratch.cli)
                .args(["run", "--json", "--", "sleep", "1"])
                .env("CYLO_USAGE_SOCKET", &daemon.socket)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for s in sleepers {
        assert_served_exactly(&s.wait_with_output().unwrap());
    }
    // Her sessions end with her connection; then she may start new ones.
    drop(conn);
    end_roots(&mut roots);
    std::thread::sleep(Duration::from_millis(200));
    let (_conn, mut again, refused) = flood_sessions(daemon.socket.clone(), MALLORY, 2);
    assert_eq!((again.len(), refused), (2, None));
    end_roots(&mut again);
}

#[test]
fn users_together_cannot_take_the_maps_root_needs() {
    if !common::host_only("users_together_cannot_take_the_maps_root_needs") {
        return;
    }
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("att-maps");
    // A share of 8,192 threads a session: of the maps' 61,440 (65,536 less the headroom for
    // tasks killed at birth), 53,760 are for the sessions of users other than root, so six
    // sessions hold them, whoever their users are.
    let daemon = start("maps", &["--session-max-tasks", "8192"], None);
    let (first, mut mine, refused) = flood_sessions(daemon.socket.clone(), MALLORY, 4);
    assert_eq!((mine.len(), refused), (4, None));
    let (second, mut theirs, refused) = flood_sessions(daemon.socket.clone(), MALLORY + 1, 4);
    assert_eq!(theirs.len(), 2, "{refused:?}");
    let refused = refused.expect("the seventh session is refused");
    assert!(refused.contains(r#""kind":"busy""#), "{refused}");
    assert!(
        refused.contains("map_share") && refused.contains("53760 threads in all, 8192 per session"),
        "{refused}"
    );
    // Root's runs are still served, exactly, from the room held back.
    for _ in 0..2 {
        let (out, _) = client(
            &daemon,
            &scratch,
            None,
            &["run", "--json", "--", WORKLOAD, "storm", "50"],
        );
        let v = assert_served_exactly(&out);
        assert_eq!(v["process_count"], 51, "{v}");
    }
    // Another user is refused for the named limit, and still runs its command.
    let (out, _) = client(
        &daemon,
        &scratch,
        Some(VICTIM),
        &["run", "-v", "--json", "--", "/bin/true"],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("map_share"),
        "{out:?}"
    );
    // The shares come back with the sessions.
    drop(first);
    end_roots(mine.iter_mut().chain(theirs.iter_mut()));
    drop(second);
    std::thread::sleep(Duration::from_millis(200));
    let (_conn, mut again, refused) = flood_sessions(daemon.socket.clone(), VICTIM, 6);
    assert_eq!((again.len(), refused), (6, None));
    end_roots(&mut again);
}

#[test]
fn nobody_in_a_user_namespace_of_its_own_is_served_as_nobody() {
    if !common::host_only("nobody_in_a_user_namespace_of_its_own_is_served_as_nobody") {
        return;
    }
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("att-userns");
    let daemon = start("userns", &[], None);
    // Unmapped in its own namespace, nobody is still nobody to a daemon in the initial one.
    let cli = scratch.cli.to_str().unwrap();
    let (out, _) = client(
        &daemon,
        &scratch,
        Some(common::NOBODY),
        &["run", "--json", "--", "/bin/true"],
    );
    assert_served_exactly(&out);
    let mut c = as_user(
        common::NOBODY,
        Path::new("unshare"),
        &["-U", cli, "run", "--json", "--", "/bin/true"],
    );
    let out = c
        .env("CYLO_USAGE_SOCKET", &daemon.socket)
        .current_dir(&scratch.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains('{') {
        // unshare itself failed: a host setting, not something of ours.
        eprintln!("SKIPPED: this host does not let users make user namespaces: {out:?}");
        return;
    }
    assert_served_exactly(&out);
}

#[test]
fn a_thread_pidfd_is_refused_for_what_it_is() {
    if !common::host_only("a_thread_pidfd_is_refused_for_what_it_is") {
        return;
    }
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = start("pidfd-thread", &[], None);
    // A thread of this process, parked until the end of the test.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let parked = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
        let _ = rx.recv();
    });
    let tid = tid_rx.recv().unwrap();
    const PIDFD_THREAD: libc::c_long = libc::O_EXCL as libc::c_long;
    // SAFETY: pidfd_open returns a new descriptor we own, or fails.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, PIDFD_THREAD) };
    if fd < 0 {
        eprintln!("SKIPPED: this kernel has no PIDFD_THREAD (Linux 6.9)");
        let _ = tx.send(());
        return;
    }
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let s = UnixStream::connect(&daemon.socket).unwrap();
    assert_eq!(hello(&s)["reply"], "hello");
    common::wire::send_frame(&s, br#"{"op":"attach","options":{}}"#, &[fd.as_raw_fd()]).unwrap();
    let r = reply(&s).unwrap();
    assert_eq!(r["kind"], "bad-request", "{r}");
    let text = r["message"].as_str().unwrap();
    assert!(
        text.contains("PIDFD_THREAD") && text.contains(&tid.to_string()),
        "{text}"
    );
    let _ = tx.send(());
    parked.join().unwrap();
}
