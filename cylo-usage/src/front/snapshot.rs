//! [`get_resource_usage`]: what a live process and its live descendants have used, read from
//! `/proc` in one call. The old cylo API, done right; for exact figures, spawn through a
//! [`crate::Tracker`] (or attach) instead.
use std::collections::HashSet;
use std::time::Duration;

use crate::error::Error;
use crate::proc::walker::{self, Detail, Node, ProcFs, Read, Seed};
use crate::session::fallback::account::interval_text;
use crate::session::run::SessionError;
use crate::sys::procfs;
use crate::usage::{ResourceUsage, TrackerKind, split_runtime};
use cylo_usage_abi::ThreadUsage;

/// A snapshot of process `pid` and its live descendants, from `/proc`:
///
/// - processes are told from threads (`/proc/PID/task`), and found through each thread's
///   `children` (or a scan of every parent where the kernel has no such files);
/// - CPU: each live thread's `schedstat` runtime in ns, or the process's `stat` utime +
///   stime (clock ticks, exited threads included) where that is larger, plus the children
///   each process has waited for (`stat` cutime + cstime, clock ticks);
/// - disk and I/O: each process's `/proc/PID/io`;
/// - memory: the sum of their RSS, and the largest VmHWM.
///
/// A descendant that vanishes mid-read is skipped. Errors: a `pid` that does not exist (or
/// vanished during the call) is [`SessionError::NoSuchProcess`]; a permission error (another
/// user's process, when unprivileged) is returned as it is ([`crate::sys::procfs::ProcError`]).
/// `precision` is always approximate: the past is unknown to a snapshot (descendants that
/// exited without being waited for inside the tree are missing), and `precision_notes` say
/// what each field misses.
pub fn get_resource_usage(pid: libc::pid_t) -> Result<ResourceUsage, Error> {
    snapshot(
        &ProcFs::host(),
        pid,
        procfs::clock_ticks_per_second(),
        procfs::page_size(),
    )
}

/// Uptime in clock ticks (for the wall time of a snapshot).
fn uptime_ticks(fs: &ProcFs, hz: u64) -> Option<u64> {
    let text = std::fs::read_to_string(fs.path("uptime")).ok()?;
    let secs: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
    Some((secs * hz as f64) as u64)
}

pub(crate) fn snapshot(
    fs: &ProcFs,
    pid: libc::pid_t,
    hz: u64,
    page_size: u64,
) -> Result<ResourceUsage, Error> {
    let no_such = || {
        Error::from(SessionError::NoSuchProcess {
            pid: pid as libc::pid_t,
        })
    };
    let Ok(pid) = u32::try_from(pid) else {
        return Err(no_such());
    };
    if pid == 0 {
        return Err(no_such());
    }
    let tick_ns = 1_000_000_000 / hz.max(1);
    let seed = Seed {
        pid,
        start_ticks: None,
    };
    let nodes = walker::walk(fs, &[seed], &HashSet::new())?;
    // The root first: without it, nothing.
    let Some(root) = nodes.first().filter(|n| n.pid == pid).cloned() else {
        return Err(no_such());
    };
    let mut read: Vec<(Node, Detail)> = Vec::with_capacity(nodes.len());
    for n in nodes {
        match walker::detail(fs, &n, tick_ns, true)? {
            Read::Got(d) => read.push((n, d)),
            // The root vanished mid-read: it no longer exists.
            Read::Gone if n.pid == pid => return Err(no_such()),
            Read::Gone => {}
        }
    }
    let wall_ms = uptime_ticks(fs, hz)
        .map(|now| now.saturating_sub(root.stat.start_ticks) * tick_ns / 1_000_000)
        .unwrap_or(0);
    Ok(merge(&read, page_size, wall_ms))
}

/// The snapshot's figures from what was read (pure).
pub(crate) fn merge(read: &[(Node, Detail)], page_size: u64, wall_time_ms: u64) -> ResourceUsage {
    let mut u = ResourceUsage::unmeasured(TrackerKind::Proc);
    let (mut cpu, mut user, mut system) = (0u64, 0u64, 0u64);
    let mut io = Some(ThreadUsage::default());
    let mut rss = 0;
    let mut hwm = 0;
    let mut live = 0;
    let mut threads = 0;
    for (n, d) in read {
        cpu += d.own_cpu_ns + d.waited_cpu_ns;
        user += d.user_ticks;
        system += d.system_ticks;
        // Known for the tree only where known for every process.
        io = io.zip(d.io).map(|(sum, i)| sum + i.usage());
        hwm = hwm.max(d.hwm_bytes.unwrap_or(0));
        threads += n.tids.len() as u64;
        if !n.stat.is_zombie() {
            live += 1;
            rss += n.stat.rss_pages * page_size;
        }
    }
    let (user, system) = split_runtime(cpu, user, system);
    u.cpu_time_ns = cpu;
    u.cpu_time_ms = cpu / 1_000_000;
    u.cpu_user_ns = user;
    u.cpu_system_ns = system;
    u.process_count = read.len() as u64;
    u.thread_count = threads;
    u.live_process_count = live;
    u.disk_bytes_read = io.map(|i| i.disk_read_bytes);
    u.disk_bytes_written = io.map(|i| i.disk_write_bytes);
    u.disk_cancelled_write_bytes = io.map(|i| i.disk_cancelled_write_bytes);
    u.io_read_chars = io.map(|i| i.io_rchar);
    u.io_write_chars = io.map(|i| i.io_wchar);
    u.memory_bytes = Some(rss);
    u.max_process_rss_bytes = Some(hwm);
    u.wall_time_ms = wall_time_ms;
    u.precision_notes = notes();
    // Those present now: the processes and threads that lived before are missing.
    u.lower_bounds = vec!["process_count".to_string(), "thread_count".to_string()];
    u
}

fn notes() -> Vec<String> {
    let tick = interval_text(Duration::from_nanos(
        1_000_000_000 / procfs::clock_ticks_per_second().max(1),
    ));
    vec![
        "tracker: a snapshot of /proc (get_resource_usage): what descendants that exited used \
         is known only where a process of the tree waited for them; for exact figures, spawn \
         through a Tracker, or attach"
            .to_string(),
        format!(
            "cpu_time_ns, cpu_user_ns, cpu_system_ns: schedstat ns of live threads, or the \
             process's utime + stime in clock ticks ({tick}) when larger (exited threads), plus \
             the children each process waited for (cutime + cstime, clock ticks); descendants \
             nobody in the tree waited for are missing"
        ),
        "process_count, thread_count, live_process_count: the processes and threads present \
         at the snapshot (zombies included in process_count); those that exited before are \
         unknown"
            .to_string(),
        "disk_bytes_read, disk_bytes_written, disk_cancelled_write_bytes, io_read_chars, \
         io_write_chars: /proc/PID/io of the processes present (their exited threads \
         included, their exited children not)"
            .to_string(),
        "memory_bytes: the sum of the present processes' RSS; an address space shared by \
         several processes (vfork, CLONE_VM) counts once per process"
            .to_string(),
        "max_process_rss_bytes: the largest VmHWM of a present process".to_string(),
        "wall_time_ms: since the process started".to_string(),
        "peak_process_count, peak_memory_bytes, disk_devices, network_bytes_sent, \
         network_bytes_received: null: a snapshot cannot know them"
            .to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::walker::fixture::FakeProc;
    use crate::sys::procfs::ProcError;

    fn tree() -> FakeProc {
        let f = FakeProc::new("snapshot");
        // 10 (threads 10, 11) -> 20 -> 30 (a zombie), and 10 -> 21 listed but gone.
        f.process(
            10,
            1,
            100,
            (1, 1, 2, 0),
            10,
            &[(10, &[20, 21], 1_000), (11, &[], 2_000)],
        );
        f.process(20, 10, 120, (0, 0, 0, 0), 5, &[(20, &[30], 3_000_000)]);
        f.write(
            "30/stat",
            &crate::proc::walker::fixture::stat_line(30, "z", 'Z', 20, (1, 0, 0, 0), 1, 130, 0),
        );
        f.write("30/io", "rchar: 1\nwchar: 1\nsyscr: 0\nsyscw: 0\nread_bytes: 0\nwrite_bytes: 512\ncancelled_write_bytes: 0\n");
        f.write("30/status", "Name:\tz\n");
        std::fs::create_dir_all(f.root.join("30/task")).unwrap();
        f.write("uptime", "12.50 3.00\n");
        f
    }

    #[test]
    fn a_tree_from_fixtures() {
        let f = tree();
        let fs = ProcFs::new(&f.root);
        let u = snapshot(&fs, 10, 100, 4096).unwrap();
        assert_eq!(
            u.process_count, 3,
            "10, 20 and the zombie 30; not 21, not threads"
        );
        assert_eq!(u.live_process_count, 2);
        assert_eq!(u.thread_count, 3);
        // 10: max(3 µs, 2 ticks) + 2 ticks waited; 20: 3 ms; 30: 1 tick.
        assert_eq!(
            u.cpu_time_ns,
            20_000_000 + 20_000_000 + 3_000_000 + 10_000_000
        );
        assert_eq!(u.cpu_user_ns + u.cpu_system_ns, u.cpu_time_ns);
        assert_eq!(u.disk_bytes_read, Some(2 * 4096));
        assert_eq!(u.disk_bytes_written, Some(2 * 8192 + 512));
        assert_eq!(u.io_read_chars, Some(21));
        assert_eq!(u.memory_bytes, Some(15 * 4096));
        assert_eq!(u.max_process_rss_bytes, Some(120 * 1024));
        assert_eq!(u.peak_memory_bytes, None, "unknowable in a snapshot");
        assert_eq!(u.peak_process_count, None);
        assert_eq!(u.wall_time_ms, (1250 - 100) * 10);
        assert_eq!(u.tracker, TrackerKind::Proc);
        assert_eq!(u.precision, crate::Precision::Approximate);
        assert!(!u.precision_notes.is_empty());
    }

    #[test]
    fn missing_pids_are_errors_and_permission_errors_propagate() {
        let f = tree();
        let fs = ProcFs::new(&f.root);
        for pid in [0, -1, 4242] {
            let e = snapshot(&fs, pid, 100, 4096).unwrap_err();
            assert!(
                matches!(e, Error::Session(SessionError::NoSuchProcess { .. })),
                "{pid}: {e}"
            );
        }
        // io unreadable: a directory in its place gives EISDIR, standing in for EACCES.
        std::fs::remove_file(f.root.join("20/io")).unwrap();
        std::fs::create_dir(f.root.join("20/io")).unwrap();
        let e = snapshot(&fs, 10, 100, 4096).unwrap_err();
        assert!(matches!(e, Error::Proc(ProcError::Read { .. })), "{e}");
    }

    #[test]
    fn without_io_accounting_disk_is_null() {
        let f = tree();
        for pid in [10, 20, 30] {
            std::fs::remove_file(f.root.join(format!("{pid}/io"))).unwrap();
        }
        let u = snapshot(&ProcFs::new(&f.root), 10, 100, 4096).unwrap();
        assert_eq!((u.disk_bytes_read, u.io_write_chars), (None, None));
        assert_eq!(u.process_count, 3);
    }

    #[test]
    fn a_process_vanishing_mid_read_is_skipped_and_the_root_is_then_gone() {
        let f = tree();
        // 20's stat and threads were read, then it was gone (its status no longer opens).
        std::fs::remove_file(f.root.join("20/status")).unwrap();
        let u = snapshot(&ProcFs::new(&f.root), 10, 100, 4096).unwrap();
        assert_eq!(u.process_count, 2, "10 and 30");
        assert_eq!(u.memory_bytes, Some(10 * 4096));
        // The same for the root: the pid no longer exists.
        std::fs::remove_file(f.root.join("10/status")).unwrap();
        let e = snapshot(&ProcFs::new(&f.root), 10, 100, 4096).unwrap_err();
        assert!(
            matches!(e, Error::Session(SessionError::NoSuchProcess { pid: 10 })),
            "{e}"
        );
    }
}
