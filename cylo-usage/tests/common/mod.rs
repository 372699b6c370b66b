//! Shared by the integration tests: the tracker (or a clear skip), the workload binary, and
//! the kernel's own ground truth (a cpuacct cgroup).
#![allow(dead_code)]

pub mod daemon;

pub mod wire;

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cylo_usage::{Precision, ResourceUsage, Tracker};

/// The test workload: the workspace crate `cylo-usage-workload`, built beside this crate's
/// binaries (`cargo xtask test` builds it first; see `build.rs`).
pub const WORKLOAD: &str = env!("CYLO_USAGE_WORKLOAD");
pub const CLI: &str = env!("CARGO_BIN_EXE_cylo-usage");

/// Whether eBPF tests must run (CI) rather than skip.
pub fn ebpf_required() -> bool {
    std::env::var("CYLO_USAGE_REQUIRE_EBPF").as_deref() == Ok("1")
}

/// The tracker shared by the tests of one binary, or None (after saying why) when the
/// programs cannot be loaded here and CYLO_USAGE_REQUIRE_EBPF is not 1.
pub fn tracker() -> Option<Tracker> {
    static TRACKER: OnceLock<Result<Tracker, String>> = OnceLock::new();
    shared(&TRACKER, "eBPF programs", cylo_usage::Capacities::default())
}

/// A tracker with the lean programs ([`cylo_usage::ProgramSet::Totals`]) and maps for one
/// tree, as the command line loads for a run without a breakdown; shared by the tests of a
/// binary like [`tracker`].
pub fn lean_tracker() -> Option<Tracker> {
    static TRACKER: OnceLock<Result<Tracker, String>> = OnceLock::new();
    let options = cylo_usage::Capacities::for_one_tree(
        cylo_usage::ONE_TREE_TASKS,
        cylo_usage::ProgramSet::Totals,
    );
    shared(&TRACKER, "lean eBPF programs", options)
}

/// The tracker loaded once into `cell` with `options`; None (after saying why) when it cannot
/// be loaded here and CYLO_USAGE_REQUIRE_EBPF is not 1.
fn shared(
    cell: &'static OnceLock<Result<Tracker, String>>,
    what: &str,
    options: cylo_usage::Capacities,
) -> Option<Tracker> {
    let loaded = cell.get_or_init(|| {
        Tracker::load_with_options(options).map_err(|e| cylo_usage::error_chain(&e))
    });
    match loaded {
        Ok(t) => Some(t.clone()),
        Err(e) if ebpf_required() => {
            panic!("CYLO_USAGE_REQUIRE_EBPF=1 but the {what} could not be loaded: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: the {what} could not be loaded ({e})");
            None
        }
    }
}

/// Both program sets, each named: the full one ([`tracker`]) and the lean one
/// ([`lean_tracker`]): a test of what both must count alike runs on each.
pub fn trackers() -> Vec<(&'static str, Tracker)> {
    let mut all = Vec::new();
    if let Some(t) = tracker() {
        all.push(("full set", t));
    }
    if let Some(t) = lean_tracker() {
        all.push(("lean set", t));
    }
    all
}

/// Runs `cmd` under `tracker` until every descendant has exited; returns the usage.
pub async fn run_to_end(tracker: &Tracker, cmd: &mut Command) -> ResourceUsage {
    let mut run = tracker.spawn(cmd).expect("spawn under the tracker");
    tokio::time::timeout(Duration::from_secs(120), async {
        run.wait_root().await.expect("wait for the root");
        run.wait_finished().await.expect("wait for the tree");
    })
    .await
    .expect("the run finished within 120 s");
    let usage = run.usage().expect("usage");
    assert_eq!(usage.lost_events, 0, "{usage:?}");
    assert_eq!(usage.precision, Precision::Exact, "{usage:?}");
    assert_eq!(usage.live_process_count, 0, "{usage:?}");
    usage
}

pub fn workload(args: &[&str]) -> Command {
    assert!(
        std::path::Path::new(WORKLOAD).is_file(),
        "no test workload at {WORKLOAD}: build it first (cargo build -p cylo-usage-workload; \
         cargo xtask test does)"
    );
    let mut c = Command::new(WORKLOAD);
    c.args(args);
    c
}

/// A cgroup of the kernel's CPU accounting (v1 cpuacct, or v2 cpu.stat) that a command joins
/// before it execs: the kernel's own figure for everything the tree ran.
///
/// The group sees a joining process only from the moment it joins, while a tracker counts it
/// from its fork: milliseconds under emulation (9 ms of 375 were seen), beyond a 2% bound on a
/// short workload. So each joining process also sends, just before it joins, its CPU time so
/// far as the kernel keeps it (`CLOCK_THREAD_CPUTIME_ID`), and [`CpuGroup::usage_ns`] adds
/// it: the kernel's figure from fork on.
pub struct CpuGroup {
    dir: PathBuf,
    v2: bool,
    /// Read end: 8-byte CPU times of joining processes, before they joined.
    before_join: std::os::fd::OwnedFd,
    /// Write end, inherited by the children that join.
    before_join_writer: std::os::fd::OwnedFd,
    /// What was read from `before_join` so far.
    before_join_ns: std::cell::Cell<u64>,
}

impl CpuGroup {
    pub fn new() -> Option<CpuGroup> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "cylo-usage-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        for (root, v2) in [
            ("/sys/fs/cgroup/cpuacct", false),
            ("/sys/fs/cgroup/cpu,cpuacct", false),
            ("/sys/fs/cgroup/unified", true),
            ("/sys/fs/cgroup", true),
        ] {
            let probe = if v2 {
                "cgroup.controllers"
            } else {
                "cpuacct.usage"
            };
            if !Path::new(root).join(probe).exists() {
                continue;
            }
            let dir = Path::new(root).join(&name);
            if std::fs::create_dir(&dir).is_ok() {
                let mut fds = [0; 2];
                // SAFETY: pipe2 writes two descriptors into `fds`.
                if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0
                {
                    let _ = std::fs::remove_dir(&dir);
                    return None;
                }
                use std::os::fd::FromRawFd;
                // SAFETY: two descriptors pipe2 just created, owned here alone.
                let (r, w) = unsafe {
                    (
                        std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                        std::os::fd::OwnedFd::from_raw_fd(fds[1]),
                    )
                };
                return Some(CpuGroup {
                    dir,
                    v2,
                    before_join: r,
                    before_join_writer: w,
                    before_join_ns: std::cell::Cell::new(0),
                });
            }
        }
        None
    }

    /// Makes `cmd` join this group between fork and exec.
    pub fn join(&self, cmd: &mut Command) {
        let procs = CString::new(
            self.dir
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        use std::os::fd::AsRawFd;
        let writer = self.before_join_writer.as_raw_fd();
        // SAFETY: only async-signal-safe calls (clock_gettime, open, write, close) in the
        // child; `writer` stays open in the parent while the group lives.
        unsafe {
            cmd.pre_exec(move || {
                let mut ts: libc::timespec = std::mem::zeroed();
                if libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) == 0 {
                    let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
                    libc::write(writer, ns.to_le_bytes().as_ptr().cast(), 8);
                }
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }

    /// CPU time of everything that ran in the group, in ns.
    /// The group's CPU time, with what its processes ran before they joined: the kernel's
    /// figure for them from their fork on.
    pub fn usage_ns(&self) -> u64 {
        use std::os::fd::AsRawFd;
        let mut record = [0u8; 8];
        // SAFETY: reads 8 bytes into `record` from a nonblocking pipe; each record is one
        // write of 8 bytes, so it arrives whole.
        while unsafe { libc::read(self.before_join.as_raw_fd(), record.as_mut_ptr().cast(), 8) }
            == 8
        {
            self.before_join_ns
                .set(self.before_join_ns.get() + u64::from_le_bytes(record));
        }
        self.before_join_ns.get() + self.group_usage_ns()
    }

    /// The group's own CPU time (since each process joined).
    fn group_usage_ns(&self) -> u64 {
        if self.v2 {
            let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap();
            let usec: u64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            usec * 1000
        } else {
            std::fs::read_to_string(self.dir.join("cpuacct.usage"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        }
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A cgroup for CPU ground truth, or a panic in CI / a skip elsewhere.
pub fn cpu_group() -> Option<CpuGroup> {
    match CpuGroup::new() {
        Some(g) => Some(g),
        None if ebpf_required() => panic!("no cpuacct (v1) or cgroup2 hierarchy to compare with"),
        None => {
            eprintln!("SKIPPED: no cgroup CPU accounting to compare with");
            None
        }
    }
}

/// |a - b| / b
pub fn rel_diff(a: u64, b: u64) -> f64 {
    (a as f64 - b as f64).abs() / b as f64
}

/// The running kernel's (major, minor), from uname. Tests may know kernel versions; the
/// tracker itself decides from what the kernel offers.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok()).unwrap();
    let minor = parts.next().and_then(|p| p.parse().ok()).unwrap();
    (major, minor)
}

/// Whether this kernel has hooks for socket bytes: the `sock_*_length` tracepoints (6.3) or
/// BPF trampolines on the socket functions. x86-64 has trampolines on every kernel of the
/// matrix; arm64 only from 6.5 (ftrace direct calls), so an arm64 kernel before 6.3 measures
/// no network (null, its features saying why).
pub fn network_hooks() -> bool {
    !cfg!(target_arch = "aarch64") || kernel_version() >= (6, 3)
}

/// What a `bomb-mark FILE N` left in FILE: how many of its processes ran an instruction of
/// their own (each counted itself first, without a system call), and the pids they wrote
/// next (one killed between the two left none).
pub struct Marks {
    pub ran: u64,
    pub pids: Vec<u32>,
}

pub fn marks(file: &Path) -> Marks {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(
        bytes.len() >= 8,
        "{}: {} bytes",
        file.display(),
        bytes.len()
    );
    let ran = u64::from_ne_bytes(bytes[..8].try_into().unwrap());
    let pids = bytes[8..]
        .chunks_exact(4)
        .take(ran as usize)
        .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
        .filter(|&pid| pid != 0)
        .collect();
    Marks { ran, pids }
}

/// What `peak_process_count` must be for a true peak of `n` on this kernel: BPF atomic
/// fetch and compare-and-exchange came with 5.12; before, the peak is unmeasured (null).
pub fn expected_peak(n: u64) -> Option<u64> {
    (kernel_version() >= (5, 12)).then_some(n)
}

impl CpuGroup {
    /// The group's `cgroup.procs`: a process that writes `0` into it joins the group.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Lets user `uid` move its own processes into the group (cgroup v1: write access to
    /// `cgroup.procs` is enough for a process to move itself).
    pub fn allow(&self, uid: u32) {
        std::os::unix::fs::chown(self.procs_file(), Some(uid), Some(uid)).unwrap();
    }

    /// The pids in the group now.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.procs_file())
            .unwrap()
            .split_ascii_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }
}

/// The unprivileged user of the unprivileged tests (nobody).
pub const NOBODY: u32 = 65534;

/// Whether this process can drop privileges (it is root), or else a skip (a panic in CI).
pub fn can_drop_privileges() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if ebpf_required() {
        panic!(
            "CYLO_USAGE_REQUIRE_EBPF=1, but the unprivileged tests need root to drop privileges"
        );
    }
    eprintln!("SKIPPED: not root: cannot drop privileges to test without them");
    false
}

/// Whether util-linux's `setpriv` (with `--reuid`) is installed; busybox's has no such option.
fn util_linux_setpriv() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        Command::new("setpriv")
            .arg("--help")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--reuid"))
    })
}

/// `program args` run as user and group [`NOBODY`] without supplementary groups and without
/// capabilities: `setpriv --reuid=65534 --regid=65534 --clear-groups` where util-linux has it
/// (CI), else the same calls (setgroups, setresgid, setresuid) made before exec.
pub fn as_nobody(program: &Path, args: &[&str]) -> Command {
    as_user(NOBODY, program, args)
}

/// [`as_nobody`] for any uid `uid` (its gid the same number); no account is needed.
pub fn as_user(uid: u32, program: &Path, args: &[&str]) -> Command {
    if util_linux_setpriv() {
        let mut c = Command::new("setpriv");
        c.args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_string(),
            "--".to_string(),
        ]);
        c.arg(program).args(args);
        return c;
    }
    let mut c = Command::new(program);
    c.args(args);
    // SAFETY: async-signal-safe calls only.
    unsafe {
        c.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// Whether every folder above `path` lets others through and `path` lets them run it.
fn others_can_run(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0)
    };
    mode(path) & 0o005 == 0o005 && path.ancestors().skip(1).all(|a| mode(a) & 0o001 != 0)
}

/// A folder that [`NOBODY`] can write, with the binaries it must run (copied there when the
/// build folder is closed to others, as under /root). Removed when dropped.
pub struct Scratch {
    pub dir: PathBuf,
    pub cli: PathBuf,
    pub workload: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cylo-usage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let place = |bin: &str| {
            let bin = PathBuf::from(bin);
            if others_can_run(&bin) {
                return bin;
            }
            let copy = dir.join(bin.file_name().unwrap());
            std::fs::copy(&bin, &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
            copy
        };
        let cli = place(CLI);
        let workload = place(WORKLOAD);
        assert!(
            others_can_run(&cli),
            "{} is not reachable by others",
            dir.display()
        );
        Scratch { dir, cli, workload }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the `cylo-usage` command line with `args` (no stdin) to completion.
pub fn cli(args: &[&str]) -> Output {
    Command::new(CLI)
        .args(args)
        // In-process, whatever daemon the host may run (the daemon has its own tests).
        .env("CYLO_USAGE_SOCKET", "/nonexistent/cylo-usage-tests.sock")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A command's standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `d` as an upper bound on how long something of ours may take here: `d` on a real machine,
/// five times it in the kernel-matrix guests (emulated CPUs, one host thread for both).
/// Used only for bounds on our own promptness, never for lower bounds.
pub fn bound(d: std::time::Duration) -> std::time::Duration {
    if std::env::var_os("CYLO_USAGE_VM").is_some() {
        d * 5
    } else {
        d
    }
}

/// Whether a test of the command line's own behaviour (messages, outputs, exit statuses),
/// which no kernel version changes, runs here: on the host, always; in the kernel-matrix
/// guests it is skipped, saying so, because each of its in-process loads costs tens of
/// seconds of emulated verification there, and the kernel-specific paths it passes through
/// have tests of their own in the matrix.
#[allow(dead_code)]
pub fn host_only(test: &str) -> bool {
    if std::env::var_os("CYLO_USAGE_VM").is_some() {
        eprintln!("SKIPPED in the kernel matrix: {test} checks the command line, not the kernel");
        return false;
    }
    true
}

/// A `past-lives` workload to attach to: a thread that burnt CPU and moved chars, then
/// exited, and a child that did the same and was reaped; idle from `ready` on (until
/// [`PastLives::finish`]). Its ground truth is what the kernel itself says: the workload's
/// own `getrusage(RUSAGE_SELF)` + `getrusage(RUSAGE_CHILDREN)`, and `/proc/PID/stat` and
/// `/proc/PID/io` (which cover exited threads and reaped children).
pub struct PastLives {
    pub child: std::process::Child,
    pub truth: PastTruth,
}

/// What a [`PastLives`] workload did, as it says itself.
#[derive(Clone, Copy, Debug)]
pub struct PastTruth {
    /// getrusage SELF + CHILDREN, user + system, in ns (from µs), when it wrote them.
    pub rusage_ns: u64,
    /// Of which CHILDREN: its reaped child's (it makes no other).
    pub children_ns: u64,
    /// Bytes each of the thread and the child read and wrote.
    pub bytes: u64,
}

/// The figures of `/proc/PID/stat` and `/proc/PID/io` this test compares with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcFigures {
    /// utime + stime + cutime + cstime, in ns (from clock ticks, each truncated).
    pub stat_cpu_ns: u64,
    /// The process's own CPU clock (`clock_getcpuclockid`): its threads', live and exited,
    /// in ns (not its children's).
    pub cpu_clock_ns: u64,
    pub rchar: u64,
    pub wchar: u64,
}

impl PastLives {
    pub fn start(dir: &Path, thread_ms: u64, child_ms: u64, bytes: u64) -> PastLives {
        PastLives::start_as(dir, thread_ms, child_ms, bytes, &[], workload)
    }

    /// [`PastLives::start`] with the workload's command made by `command` from its arguments
    /// (e.g. [`as_nobody`]).
    pub fn start_as(
        dir: &Path,
        thread_ms: u64,
        child_ms: u64,
        bytes: u64,
        extra: &[&str],
        command: impl FnOnce(&[&str]) -> Command,
    ) -> PastLives {
        use std::io::BufRead;
        let file = dir.join("past-lives.rusage");
        let (thread_ms, child_ms, bytes_s) = (
            thread_ms.to_string(),
            child_ms.to_string(),
            bytes.to_string(),
        );
        let mut args = vec![
            "past-lives",
            &thread_ms,
            &child_ms,
            &bytes_s,
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut child = command(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the workload did not get ready");
        let text = std::fs::read_to_string(&file).unwrap();
        let us: Vec<u64> = text
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(us.len(), 4, "{text}");
        let past = PastLives {
            child,
            truth: PastTruth {
                rusage_ns: us.iter().sum::<u64>() * 1_000,
                children_ns: (us[2] + us[3]) * 1_000,
                bytes,
            },
        };
        past.wait_idle();
        past
    }

    /// Waits until the workload sleeps in its read of stdin and its /proc figures hold still:
    /// between printing `ready` and blocking it still runs a little, and a clock tick that
    /// lands there (likelier in an emulated guest) would move `/proc/PID/stat` under a test.
    fn wait_idle(&self) {
        let deadline = std::time::Instant::now() + bound(Duration::from_secs(5));
        let mut last = self.proc_figures();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.proc_figures();
            let state = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
                .ok()
                .and_then(|s| {
                    let after = &s[s.rfind(')')? + 1..];
                    after.split_whitespace().next().map(str::to_string)
                });
            if now == last && state.as_deref() == Some("S") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the past-lives workload did not settle: {now:?}, state {state:?}"
            );
            last = now;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn proc_figures(&self) -> ProcFigures {
        proc_figures(self.pid())
    }

    /// Closes its stdin and waits for it.
    pub fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }

    pub fn check(&self, before: &cylo_usage::UsageBeforeAttach, proc: ProcFigures, ticks: bool) {
        self.truth.check(before, proc, ticks);
    }
}

impl PastTruth {
    /// Checks `before` against the kernel's figures `proc` (read around the attach, while the
    /// workload idled): CPU within 2% of the kernel's whole count at the attach (plus four
    /// clock ticks with `ticks`: the /proc fallback has only /proc/PID/stat's four tick
    /// counts, each truncated, for what exited) and no less than the workload's own
    /// getrusage; within 2% of /proc/PID/stat plus the truncation of its four tick counts;
    /// the I/O chars exactly.
    pub fn check(&self, before: &cylo_usage::UsageBeforeAttach, proc: ProcFigures, ticks: bool) {
        let cpu = before.cpu_time_ns;
        // The kernel's whole count at the attach: the process's CPU clock (to the ns, and
        // after its getrusage too: writing its figures and going to sleep, about 2% of the
        // run in an emulated arm64 guest) and its reaped child's, which getrusage CHILDREN
        // gave.
        let whole = proc.cpu_clock_ns + self.children_ns;
        eprintln!(
            "before the attach: {cpu} ns (user {}, system {}); its CPU clock and getrusage \
             CHILDREN {whole} ns; getrusage SELF + CHILDREN {} ns; /proc/PID/stat {} ns; \
             rchar {:?}/{}, wchar {:?}/{}",
            before.cpu_user_ns,
            before.cpu_system_ns,
            self.rusage_ns,
            proc.stat_cpu_ns,
            before.io_read_chars,
            proc.rchar,
            before.io_write_chars,
            proc.wchar
        );
        let ticks_ns = if ticks { 4 * tick_ns() } else { 0 };
        assert!(
            cpu.abs_diff(whole) as f64 <= 0.02 * whole as f64 + ticks_ns as f64,
            "before the attach {cpu} ns, its CPU clock and getrusage CHILDREN {whole} ns: \
             {before:?}"
        );
        assert!(
            cpu as f64 >= 0.98 * self.rusage_ns as f64 - ticks_ns as f64,
            "before the attach {cpu} ns, less than getrusage SELF + CHILDREN {} ns when the \
             workload reported: {before:?}",
            self.rusage_ns
        );
        let slack = proc.stat_cpu_ns / 50 + 4 * tick_ns();
        assert!(
            cpu.abs_diff(proc.stat_cpu_ns) <= slack,
            "before the attach {cpu} ns, /proc/PID/stat {} ns: {before:?}",
            proc.stat_cpu_ns
        );
        assert_eq!(
            before.cpu_user_ns + before.cpu_system_ns,
            cpu,
            "user + system = total: {before:?}"
        );
        assert!(proc.rchar >= 2 * self.bytes && proc.wchar >= 2 * self.bytes);
        assert_eq!(before.io_read_chars, Some(proc.rchar), "{before:?}");
        assert_eq!(before.io_write_chars, Some(proc.wchar), "{before:?}");
    }
}

/// `pid`'s [`ProcFigures`] now.
pub fn proc_figures(pid: u32) -> ProcFigures {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3; utime, stime, cutime, cstime are 14 to 17.
    let ticks: u64 = f[11..15].iter().map(|v| v.parse::<u64>().unwrap()).sum();
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let field = |name: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    ProcFigures {
        stat_cpu_ns: ticks * tick_ns(),
        cpu_clock_ns: cpu_clock_ns(pid),
        rchar: field("rchar"),
        wchar: field("wchar"),
    }
}

/// `pid`'s CPU clock (its threads', live and exited), in ns.
pub fn cpu_clock_ns(pid: u32) -> u64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid writes the clock id of a process that exists.
    let found = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
    assert_eq!(found, 0, "clock_getcpuclockid({pid})");
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills a plain struct.
    let read = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(read, 0, "clock_gettime of {pid}'s CPU clock");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One clock tick in ns.
pub fn tick_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    1_000_000_000 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64
}
