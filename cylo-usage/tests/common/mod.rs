//! Shared by the integration tests: the tracker (or a clear skip), the workload binary, and
//! the kernel's own ground truth (a cpuacct cgroup).
#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cylo_usage::{Precision, ResourceUsage, Tracker};

pub const WORKLOAD: &str = env!("CARGO_BIN_EXE_cylo-usage-workload");
pub const CLI: &str = env!("CARGO_BIN_EXE_cylo-usage");

/// Whether eBPF tests must run (CI) rather than skip.
pub fn ebpf_required() -> bool {
    std::env::var("CYLO_USAGE_REQUIRE_EBPF").as_deref() == Ok("1")
}

/// The tracker shared by the tests of one binary, or None (after saying why) when the
/// programs cannot be loaded here and CYLO_USAGE_REQUIRE_EBPF is not 1.
pub fn tracker() -> Option<Tracker> {
    static TRACKER: OnceLock<Result<Tracker, String>> = OnceLock::new();
    match TRACKER.get_or_init(|| Tracker::load().map_err(|e| cylo_usage::error_chain(&e))) {
        Ok(t) => Some(t.clone()),
        Err(e) if ebpf_required() => {
            panic!("CYLO_USAGE_REQUIRE_EBPF=1 but the eBPF programs could not be loaded: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: the eBPF programs could not be loaded ({e})");
            None
        }
    }
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
    let mut c = Command::new(WORKLOAD);
    c.args(args);
    c
}

/// A cgroup of the kernel's CPU accounting (v1 cpuacct, or v2 cpu.stat) that a command joins
/// before it execs: the kernel's own figure for everything the tree ran.
pub struct CpuGroup {
    dir: PathBuf,
    v2: bool,
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
                return Some(CpuGroup { dir, v2 });
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
        // SAFETY: only async-signal-safe calls (open, write, close) in the child.
        unsafe {
            cmd.pre_exec(move || {
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

    /// The kernel's user share of the group's CPU time (0..=1), from `cpuacct.stat` (v1) or
    /// `cpu.stat` (v2): the same tick samples, scaled the same way (`cputime_adjust`).
    pub fn user_fraction(&self) -> Option<f64> {
        let (file, user_key, system_key) = if self.v2 {
            ("cpu.stat", "user_usec", "system_usec")
        } else {
            ("cpuacct.stat", "user", "system")
        };
        let text = std::fs::read_to_string(self.dir.join(file)).ok()?;
        let get = |key: &str| -> Option<f64> {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok())?
            })
        };
        let (user, system) = (get(user_key)?, get(system_key)?);
        (user + system > 0.0).then(|| user / (user + system))
    }

    /// CPU time of everything that ran in the group, in ns.
    pub fn usage_ns(&self) -> u64 {
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

/// What `peak_process_count` must be for a true peak of `n` on this kernel: BPF atomic
/// fetch and compare-and-exchange came with 5.12; before, the peak is unmeasured (null).
pub fn expected_peak(n: u64) -> Option<u64> {
    (kernel_version() >= (5, 12)).then_some(n)
}

/// Runs the `cylo-usage` command line with `args` (no stdin) to completion.
pub fn cli(args: &[&str]) -> Output {
    Command::new(CLI)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A command's standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
