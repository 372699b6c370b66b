//! One user/system method: each process's split is the kernel's `cputime_adjust` of its own
//! thread group, and the tree's user and system times are the sums of its processes' (what
//! `wait4()` adds up, and `time(1)` prints). The only test of its binary: it measures its own
//! `getrusage(RUSAGE_CHILDREN)`, which another test's children would disturb.
mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{WORKLOAD, tracker, workload};
use cylo_usage::{CpuSplit, Precision, RunOptions};

/// How the run follows the mix.
#[derive(Clone, Copy, Debug)]
enum How {
    /// Spawned, with a breakdown or without (`tree`).
    Spawn { tree: bool },
    /// Attached to (without a breakdown) while it waits to begin: what it used before the
    /// attach (a shell's start: tens of ms of system time on an emulated guest) is in
    /// wait4's figures and the run's `usage_before_attach`, not in its totals.
    Attach,
}

/// This process's reaped descendants' user and system time (ns), as the kernel sums them.
fn children_rusage() -> (u64, u64) {
    // SAFETY: getrusage fills the struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut r) }, 0);
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    (ns(r.ru_utime), ns(r.ru_stime))
}

/// Runs the mix under the tracker as `how` says, and checks the split.
async fn check(t: &cylo_usage::Tracker, how: How) {
    let (u0, s0) = children_rusage();
    // 107 processes: 6 children from all user to all system time, 100 of 2 ms of syscalls
    // each (mostly no tick sample: user time for the kernel, whatever the tree's proportion),
    // and their parent (half and half), which reaps them; this test reaps the parent.
    let args = ["mix", "6", "300", "100"];
    let (mut run, mut attached) = match how {
        How::Spawn { tree } => {
            let options = RunOptions {
                tree,
                ..RunOptions::default()
            };
            let run = t.spawn_with(&mut workload(&args), options).expect("spawn");
            (run, None)
        }
        How::Attach => {
            let mut child = Command::new("/bin/sh")
                .args([
                    "-c",
                    &format!("read -r go && exec {WORKLOAD} {}", args.join(" ")),
                ])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            let run = t.attach(child.id() as libc::pid_t).expect("attach");
            writeln!(child.stdin.take().unwrap(), "go").unwrap();
            (run, Some(child))
        }
    };
    tokio::time::timeout(Duration::from_secs(120), async {
        run.wait_root().await.expect("root");
        run.wait_finished().await.expect("tree");
    })
    .await
    .expect("finished within 120 s");
    if let Some(child) = attached.as_mut() {
        assert!(child.wait().unwrap().success());
    }
    let u = run.usage().expect("usage");
    let (u1, s1) = children_rusage();
    let (wait_user, wait_system) = (u1 - u0, s1 - s0);
    assert_eq!((u.lost_events, u.precision), (0, Precision::Exact), "{u:?}");
    assert_eq!(u.cpu_user_ns + u.cpu_system_ns, u.cpu_time_ns);
    assert_eq!(u.cpu_split, CpuSplit::PerProcess, "{how:?}");
    // The whole lives, as wait4 sees them: an attach's totals plus what was used before it.
    let before = u.usage_before_attach.as_ref();
    assert_eq!(before.is_some(), matches!(how, How::Attach), "{u:?}");
    let lives = (
        u.cpu_user_ns + before.map_or(0, |b| b.cpu_user_ns),
        u.cpu_system_ns + before.map_or(0, |b| b.cpu_system_ns),
    );
    check_against_wait4(lives, (wait_user, wait_system), how);
    let Some(ps) = u.processes.as_ref() else {
        return;
    };
    assert_eq!(ps.len(), 107);
    // The breakdown's parts add up to the totals (a few ns of rounding per process at most;
    // here exactly, the totals being the sums).
    let user: u64 = ps.iter().map(|p| p.cpu_user_ns).sum();
    let system: u64 = ps.iter().map(|p| p.cpu_system_ns).sum();
    assert!(
        user.abs_diff(u.cpu_user_ns) <= 107 * 4,
        "{user} vs {}",
        u.cpu_user_ns
    );
    assert!(
        system.abs_diff(u.cpu_system_ns) <= 107 * 4,
        "{system} vs {}",
        u.cpu_system_ns
    );
    assert_eq!(u.cpu_user_ns + u.cpu_system_ns, u.cpu_time_ns);
    // The mix is real: among the processes that ran long enough for tick samples to say
    // (the six children of 300 ms and their parent), the shares of user time lie far apart.
    // (About 1.0 to 0.0 natively. The test once asked for a process with four times more
    // user than system time, which arm64 6.1 emulation did not give while the workload's
    // burn read its CPU clock, a system call, ten times as often as now: shares from 0.20 to
    // 0.64, then from 0.21 to 0.49.)
    let shares: Vec<f64> = ps
        .iter()
        .filter(|p| p.cpu_time_ns >= 100_000_000)
        .map(|p| p.cpu_user_ns as f64 / p.cpu_time_ns as f64)
        .collect();
    assert!(shares.len() >= 6, "{ps:?}");
    let (lo, hi) = shares
        .iter()
        .fold((1.0f64, 0.0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
    assert!(
        hi - lo >= 0.3,
        "the processes' user shares lie from {lo:.2} to {hi:.2} only: {ps:?}"
    );
}

/// A run's user and system time against wait4's figures (time -f '%U %S'): within a tick
/// (10 ms) plus 2%. Both are made from the same runtimes and tick samples, so they mostly
/// agree to wait4's microseconds, whether the kernel split each process
/// (`run_flags::KERNEL_SPLIT`) or userspace did from the records; but in about one run in
/// three here some milliseconds move from wait4's system time to the run's user time (up
/// to 7 ms of 2.3 s seen, on both paths; see the README, `cpu_user_ns`).
fn check_against_wait4((user, system): (u64, u64), (wait_user, wait_system): (u64, u64), how: How) {
    let bound = |total: u64| 10_000_000 + total / 50;
    eprintln!(
        "{how:?}: user {user} ns (wait4 {wait_user}), system {system} ns (wait4 {wait_system})"
    );
    assert!(
        user.abs_diff(wait_user) <= bound(wait_user),
        "{how:?}: user {user} vs wait4 {wait_user}"
    );
    assert!(
        system.abs_diff(wait_system) <= bound(wait_system),
        "{how:?}: system {system} vs wait4 {wait_system}"
    );
}

/// `/proc/PID/stat`'s user and system time of process `pid` (ns, whole ticks): the kernel's
/// own split of its thread group, exited threads included.
fn stat_split(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<u64> = after
        .split(' ')
        .skip(11)
        .take(2)
        .map(|v| v.parse().expect("ticks"))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let tick = 1_000_000_000 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    (f[0] * tick, f[1] * tick)
}

/// A snapshot of a live tree, one of whose processes has threads that have left and one
/// of which is live: each live process is split on its own (its left threads' figures, the
/// kernel's where it splits the run, and its live threads'), as its `/proc/PID/stat` says.
async fn check_live(t: &cylo_usage::Tracker) {
    let (stdin_r, stdin_w) = std::io::pipe().expect("pipe");
    let (stdout_r, stdout_w) = std::io::pipe().expect("pipe");
    let mut cmd = workload(&["left-threads", "3", "200"]);
    cmd.stdin(stdin_r).stdout(stdout_w);
    let mut run = t
        .spawn_with(&mut cmd, RunOptions::default())
        .expect("spawn");
    // Only the workload holds the other ends now.
    drop(cmd);
    let mut line = String::new();
    let mut out = std::io::BufReader::new(stdout_r);
    std::io::BufRead::read_line(&mut out, &mut line).expect("ready");
    assert_eq!(line.trim(), "ready");
    let u = run.usage().expect("snapshot");
    let root = run.root_pid() as u32;
    let child: u32 = std::fs::read_to_string(format!("/proc/{root}/task/{root}/children"))
        .expect("children")
        .split_whitespace()
        .next()
        .expect("a child")
        .parse()
        .unwrap();
    let ((ru, rs), (cu, cs)) = (stat_split(root), stat_split(child));
    eprintln!("live: {u:?}\n/proc: root {ru} {rs}, child {cu} {cs}");
    assert_eq!(u.cpu_split, CpuSplit::PerProcess, "{u:?}");
    assert_eq!(u.cpu_user_ns + u.cpu_system_ns, u.cpu_time_ns);
    // Two processes, each within two ticks (its figures are read in ticks on one side).
    let bound = 2 * 2 * 10_000_000 + 1_000_000;
    assert!(
        u.cpu_user_ns.abs_diff(ru + cu) <= bound,
        "user {} vs /proc {}",
        u.cpu_user_ns,
        ru + cu
    );
    assert!(
        u.cpu_system_ns.abs_diff(rs + cs) <= bound,
        "system {} vs /proc {}",
        u.cpu_system_ns,
        rs + cs
    );
    // The threads' 600 ms and the child's 200 ms are in it.
    assert!(u.cpu_time_ns >= 750_000_000, "{u:?}");
    drop(stdin_w);
    tokio::time::timeout(Duration::from_secs(60), async {
        run.wait_root().await.expect("root");
        run.wait_finished().await.expect("tree");
    })
    .await
    .expect("finished within 60 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn user_and_system_add_up_to_the_totals_and_agree_with_wait4() {
    let Some(t) = tracker() else { return };
    // With a breakdown, without (the run takes the records its split needs alone), and an
    // attach without: each the sum of the processes' own splits, on every kernel.
    check(&t, How::Spawn { tree: true }).await;
    check(&t, How::Spawn { tree: false }).await;
    if t.measured().attach {
        check(&t, How::Attach).await;
    }
    // The lean programs (the command line's without a breakdown) make the same records.
    if let Some(lean) = common::lean_tracker() {
        check(&lean, How::Spawn { tree: false }).await;
        check_live(&lean).await;
    }
    check_live(&t).await;
}
