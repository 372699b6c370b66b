//! The kernel's per-program statistics (`BPF_ENABLE_STATS`) of one tracker's handlers, and
//! what the method itself adds to every call.
//!
//! - Which programs: those the tracker process holds. Their file descriptors are copied into
//!   this process (`pidfd_getfd`) while the tracker runs, so the programs, and their run time
//!   and run count, outlive it: the figures of a `cylo-usage run` can be read after it has
//!   exited. Other trackers on the host (other runs, a daemon) are not counted.
//! - What the method adds: with statistics on, the kernel reads `sched_clock()` before and
//!   after each program, and the second read falls inside the measured time. An empty program
//!   (`r0 = 0; exit`) attached to the same tracepoints for the same run measures that floor
//!   (about 40 ns per call on this project's VM, where the clock is read through the
//!   hypervisor's clock source): a handler's own cost is its time beyond the floor. Both are
//!   shown.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Turns the kernel's per-program statistics on for as long as it lives.
pub fn enable() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (per-program run time)")
}

/// The raw tracepoints the tracker's handlers use.
pub fn tracepoints() -> Vec<&'static str> {
    use cylo_usage_abi::names::*;
    vec![
        TP_TASK_NEWTASK,
        TP_SCHED_SWITCH,
        TP_SCHED_PROCESS_EXIT,
        TP_SCHED_PROCESS_EXEC,
        TP_RSS_STAT,
        TP_BLOCK_BIO_QUEUE,
        TP_SOCK_SEND_LENGTH,
        TP_SOCK_RECV_LENGTH,
    ]
}

/// Run time (ns) and calls of one program, or summed over several.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub ns: u64,
    pub calls: u64,
}

impl Counts {
    fn minus(self, earlier: Counts) -> Counts {
        Counts {
            ns: self.ns.saturating_sub(earlier.ns),
            calls: self.calls.saturating_sub(earlier.calls),
        }
    }
}

/// `run_time_ns` and `run_cnt` of the program behind `fd` (a descriptor of this process).
fn counts_of(fd: &OwnedFd) -> Result<Counts> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let info = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(Counts {
        ns: field(&info, "run_time_ns").unwrap_or(0),
        calls: field(&info, "run_cnt").unwrap_or(0),
    })
}

/// A numeric field of an fdinfo text.
fn field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

fn text_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// The handler programs of one tracker process, held in this process.
pub struct Handlers {
    pid: u32,
    pidfd: OwnedFd,
    /// The tracker's descriptors looked at already.
    seen: BTreeSet<i32>,
    /// Program id -> the copy of its descriptor.
    progs: BTreeMap<u32, OwnedFd>,
    /// Program id -> the raw tracepoint it is attached to (from the tracker's links).
    attached_to: BTreeMap<u32, String>,
    /// Programs with a link of any kind (a kprobe's has no tracepoint name).
    linked: BTreeSet<u32>,
}

impl Handlers {
    pub fn of(pid: u32) -> Result<Handlers> {
        // SAFETY: pidfd_open(2) takes no pointers.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            bail!("pidfd_open({pid}): {}", std::io::Error::last_os_error());
        }
        Ok(Handlers {
            pid,
            // SAFETY: a descriptor the kernel just gave this process.
            pidfd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            seen: BTreeSet::new(),
            progs: BTreeMap::new(),
            attached_to: BTreeMap::new(),
            linked: BTreeSet::new(),
        })
    }

    /// Copies the descriptors of programs the tracker has opened since the last call, and
    /// notes what its new links attach them to. A tracker that has exited has nothing new.
    pub fn poll(&mut self) {
        let dir = format!("/proc/{}/fd", self.pid);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let Some(n) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if self.seen.contains(&n) {
                continue;
            }
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if target == "anon_inode:bpf-prog" {
                // SAFETY: pidfd_getfd(2) takes no pointers.
                let fd =
                    unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.pidfd.as_raw_fd(), n, 0) };
                if fd < 0 {
                    continue;
                }
                // SAFETY: a descriptor the kernel just gave this process.
                let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
                    .unwrap_or_default();
                if let Some(id) = field(&info, "prog_id") {
                    self.progs.entry(id as u32).or_insert(fd);
                }
            } else if target == "anon_inode:bpf_link" {
                let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/{n}", self.pid))
                    .unwrap_or_default();
                if let Some(id) = field(&info, "prog_id") {
                    self.linked.insert(id as u32);
                }
                if let (Some(id), Some(tp)) =
                    (field(&info, "prog_id"), text_field(&info, "tp_name"))
                {
                    self.attached_to.insert(id as u32, tp.to_string());
                }
            } else {
                // Not a BPF object: never one later (descriptor numbers are reused only after
                // a close, and the tracker closes none of its programs).
            }
            self.seen.insert(n);
        }
    }

    /// Polls every few milliseconds until the tracker has attached `sched_switch` and no
    /// program has come for `quiet`, or until `done()` (the tracker exited), or 15 s.
    pub fn settle(&mut self, quiet: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        let mut last_change = Instant::now();
        let mut held = 0;
        loop {
            if start.elapsed() > Duration::from_secs(15) {
                return;
            }
            self.poll();
            if self.progs.len() != held {
                held = self.progs.len();
                last_change = Instant::now();
            }
            let switch = self
                .attached_to
                .values()
                .any(|tp| tp == cylo_usage_abi::names::TP_SCHED_SWITCH);
            if (switch && last_change.elapsed() >= quiet) || done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The names (as the kernel keeps them: 15 bytes) of the held programs that the tracker
    /// has attached so far, as of the last [`Handlers::poll`].
    pub fn linked_names(&self) -> Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        for info in aya::programs::loaded_programs() {
            let info = info.context("listing loaded eBPF programs")?;
            if self.linked.contains(&info.id()) && self.progs.contains_key(&info.id()) {
                names.insert(info.name_as_str().unwrap_or("?").to_string());
            }
        }
        Ok(names)
    }

    /// Per handler (the raw tracepoint it is attached to, or its program name): run time and
    /// calls so far. The never-attached `control` programs are left out.
    pub fn snapshot(&self) -> Result<BTreeMap<String, Counts>> {
        if self.progs.is_empty() {
            bail!(
                "tracker {} holds no eBPF programs (did it use a daemon?)",
                self.pid
            );
        }
        let mut names = BTreeMap::new();
        for info in aya::programs::loaded_programs() {
            let info = info.context("listing loaded eBPF programs")?;
            if self.progs.contains_key(&info.id()) {
                names.insert(info.id(), info.name_as_str().unwrap_or("?").to_string());
            }
        }
        let mut out: BTreeMap<String, Counts> = BTreeMap::new();
        for (id, fd) in &self.progs {
            let name = names.get(id).cloned().unwrap_or_default();
            if name.starts_with("control") {
                continue;
            }
            let label = self.attached_to.get(id).cloned().unwrap_or(name);
            let c = counts_of(fd)?;
            let row = out.entry(label).or_default();
            row.ns += c.ns;
            row.calls += c.calls;
        }
        Ok(out)
    }
}

/// `after - before`, per name.
pub fn delta(
    before: &BTreeMap<String, Counts>,
    after: &BTreeMap<String, Counts>,
) -> BTreeMap<String, Counts> {
    after
        .iter()
        .map(|(k, c)| {
            (
                k.clone(),
                c.minus(before.get(k).copied().unwrap_or_default()),
            )
        })
        .collect()
}

/// An empty raw-tracepoint program (`r0 = 0; exit`) on each of the tracker's tracepoints, for
/// the floor of the method. Detached and unloaded when dropped.
pub struct EmptyPrograms {
    /// Tracepoint -> (program, link).
    progs: Vec<(String, OwnedFd, OwnedFd)>,
}

impl EmptyPrograms {
    /// Attaches one to each tracepoint of `tracepoints` the kernel has (others are skipped).
    pub fn attach(tracepoints: &[&str]) -> Result<EmptyPrograms> {
        let mut progs = Vec::new();
        for tp in tracepoints {
            let prog = load_empty()?;
            if let Ok(link) = raw_tracepoint_open(tp, &prog) {
                progs.push((tp.to_string(), prog, link));
            }
        }
        Ok(EmptyPrograms { progs })
    }

    pub fn snapshot(&self) -> Result<BTreeMap<String, Counts>> {
        let mut out = BTreeMap::new();
        for (tp, prog, _link) in &self.progs {
            out.insert(tp.clone(), counts_of(prog)?);
        }
        Ok(out)
    }
}

/// `BPF_PROG_LOAD` of a raw tracepoint program that returns 0.
fn load_empty() -> Result<OwnedFd> {
    // `union bpf_attr` as far as BPF_PROG_LOAD needs it here.
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
    // mov64 r0, 0; exit
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"bench_void");
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_RAW_TRACEPOINT,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..ProgLoad::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; the buffers it points to
    // outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            std::mem::size_of::<ProgLoad>() as u32,
        )
    };
    if fd < 0 {
        bail!(
            "loading an empty raw tracepoint program: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a descriptor the kernel just gave this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_RAW_TRACEPOINT_OPEN`: attaches `prog` to raw tracepoint `tp`.
fn raw_tracepoint_open(tp: &str, prog: &OwnedFd) -> Result<OwnedFd> {
    #[repr(C)]
    struct RawTracepointOpen {
        name: u64,
        prog_fd: u32,
        _pad: u32,
    }
    const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
    let name = std::ffi::CString::new(tp)?;
    let attr = RawTracepointOpen {
        name: name.as_ptr() as u64,
        prog_fd: prog.as_raw_fd() as u32,
        _pad: 0,
    };
    // SAFETY: as above.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_RAW_TRACEPOINT_OPEN,
            &attr as *const RawTracepointOpen,
            std::mem::size_of::<RawTracepointOpen>() as u32,
        )
    };
    if fd < 0 {
        bail!("attaching to {tp}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One measured run: per handler its counts, per tracepoint the empty program's, and the
/// wall time the shares are of.
#[derive(Clone, Default)]
pub struct Measure {
    pub handlers: BTreeMap<String, Counts>,
    pub floor: BTreeMap<String, Counts>,
    pub wall: Duration,
}

impl Measure {
    /// The empty program's ns per call on the tracepoint of handler `name` (0 if none).
    fn floor_per_call(&self, name: &str) -> f64 {
        match self.floor.get(name) {
            Some(c) if c.calls > 0 => c.ns as f64 / c.calls as f64,
            _ => 0.0,
        }
    }

    /// Handler run time beyond the floor, in ns.
    fn net_ns(&self, name: &str) -> f64 {
        let c = self.handlers.get(name).copied().unwrap_or_default();
        (c.ns as f64 - self.floor_per_call(name) * c.calls as f64).max(0.0)
    }

    fn total_ns(&self) -> (f64, f64) {
        let raw = self.handlers.values().map(|c| c.ns as f64).sum();
        let net = self.handlers.keys().map(|k| self.net_ns(k)).sum();
        (raw, net)
    }
}

/// The median of `v`; NaN (printed as such, never as a figure) when `v` is empty.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile of `v` (0 to 1), linearly between the two nearest samples; NaN when
/// `v` is empty.
pub(crate) fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let at = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (at - lo as f64)
}

/// The table of one case: per handler (medians over `runs`) its calls, ns per call, the empty
/// program's ns per call on its tracepoint, ns per call beyond it, and its share of the wall
/// time; then all handlers together. Returns the table and the median share beyond the floor
/// (percent).
pub fn table(runs: &[Measure]) -> (String, f64) {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| handler | calls | ns per call | empty program, ns per call | beyond it, ns per call \
         | share of the wall time | beyond the empty program |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    let names: BTreeSet<&String> = runs.iter().flat_map(|m| m.handlers.keys()).collect();
    for name in names {
        let per = |f: &dyn Fn(&Measure, Counts) -> f64| -> f64 {
            median(
                runs.iter()
                    .map(|m| f(m, m.handlers.get(name).copied().unwrap_or_default()))
                    .collect(),
            )
        };
        let calls = per(&|_, c| c.calls as f64);
        if calls == 0.0 {
            continue;
        }
        let ns_call = per(&|_, c| {
            if c.calls == 0 {
                0.0
            } else {
                c.ns as f64 / c.calls as f64
            }
        });
        let floor = per(&|m, _| m.floor_per_call(name));
        let net_call = per(&|m, c| {
            if c.calls == 0 {
                0.0
            } else {
                m.net_ns(name) / c.calls as f64
            }
        });
        let share = per(&|m, c| c.ns as f64 / m.wall.as_nanos().max(1) as f64 * 100.0);
        let net_share = per(&|m, _| m.net_ns(name) / m.wall.as_nanos().max(1) as f64 * 100.0);
        let _ = writeln!(
            md,
            "| {name} | {calls:.0} | {ns_call:.1} | {floor:.1} | {net_call:.1} | {share:.2}% | \
             {net_share:.2}% |"
        );
    }
    let total = median(runs.iter().map(|m| m.total_ns().0 / 1e6).collect());
    let share = median(
        runs.iter()
            .map(|m| m.total_ns().0 / m.wall.as_nanos().max(1) as f64 * 100.0)
            .collect(),
    );
    let net_share = median(
        runs.iter()
            .map(|m| m.total_ns().1 / m.wall.as_nanos().max(1) as f64 * 100.0)
            .collect(),
    );
    let wall = median(runs.iter().map(|m| m.wall.as_secs_f64() * 1e3).collect());
    let _ = writeln!(
        md,
        "| all ({total:.2} ms of {wall:.1} ms) | | | | | {share:.2}% | {net_share:.2}% |"
    );
    (md, net_share)
}

#[cfg(test)]
mod tests {
    use super::{median, quantile};

    #[test]
    fn quantiles_interpolate_between_the_nearest_samples() {
        let v = vec![4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(v.clone(), 0.0), 1.0);
        assert_eq!(quantile(v.clone(), 1.0), 4.0);
        assert_eq!(quantile(v.clone(), 0.5), median(v.clone()));
        assert_eq!(quantile(v.clone(), 0.25), 1.75);
        assert_eq!(quantile(v, 0.75), 3.25);
        assert_eq!(quantile(vec![7.0], 0.25), 7.0);
        assert!(quantile(Vec::new(), 0.5).is_nan());
    }
}
