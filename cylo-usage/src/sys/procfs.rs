//! Reads of `/proc` for the threads of a run that are still alive at a snapshot.
//!
//! Everything here is controlled by the traced (untrusted) code in part: a process name may
//! contain spaces, parentheses and newlines, so parsers never trust field positions before the
//! last `)` of `stat`.
use cylo_usage_abi::ThreadUsage;
use std::path::PathBuf;

/// What a live thread has used so far, from `/proc/TGID/task/TID/{schedstat,stat,io}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadSample {
    /// The scheduler's runtime (ns), up to date at the read (`schedstat` field 1).
    pub runtime_ns: u64,
    /// User time in clock ticks (`stat` field 14), for the user/system split only.
    pub utime_ticks: u64,
    /// System time in clock ticks (`stat` field 15), for the user/system split only.
    pub stime_ticks: u64,
    /// Its I/O accounting (`io`), where the kernel has it.
    pub io: Option<ThreadIo>,
}

/// `/proc/.../io` of one thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadIo {
    pub rchar: u64,
    pub wchar: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub cancelled_write_bytes: u64,
}

impl ThreadIo {
    /// The I/O part of the ABI's counter set (its CPU part 0).
    pub fn usage(&self) -> ThreadUsage {
        ThreadUsage {
            disk_read_bytes: self.read_bytes,
            disk_write_bytes: self.write_bytes,
            disk_cancelled_write_bytes: self.cancelled_write_bytes,
            io_rchar: self.rchar,
            io_wchar: self.wchar,
            ..ThreadUsage::default()
        }
    }
}

impl ThreadSample {
    /// The ABI's counter set of what the thread has used, its clock ticks converted to ns
    /// (`tick_ns` a tick) here where they are read; no I/O where the kernel keeps none.
    pub fn usage(&self, tick_ns: u64) -> ThreadUsage {
        ThreadUsage {
            cpu_runtime_ns: self.runtime_ns,
            cpu_utime_ns: self.utime_ticks.wrapping_mul(tick_ns),
            cpu_stime_ns: self.stime_ticks.wrapping_mul(tick_ns),
            ..self.io.map(|io| io.usage()).unwrap_or_default()
        }
    }
}

/// Why a read of `/proc` failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// A file under `/proc` could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The read's error.
        #[source]
        source: std::io::Error,
    },
    /// A file under `/proc` did not have the expected format.
    #[error("malformed {path}: {what}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was expected of it.
        what: &'static str,
    },
    /// A live thread's start time is not that of the thread that joined the run: its thread
    /// id was reused by another thread.
    #[error("thread {tid} of process {tgid} is not the tracked one (its pid was reused)")]
    Reused {
        /// The process id the thread was read under.
        tgid: u32,
        /// The thread id.
        tid: u32,
    },
}

/// Parses `/proc/.../io` ("key: value" lines); `None` if a field is missing.
pub fn parse_io(text: &str) -> Option<ThreadIo> {
    let get = |key: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
    };
    Some(ThreadIo {
        rchar: get("rchar")?,
        wchar: get("wchar")?,
        read_bytes: get("read_bytes")?,
        write_bytes: get("write_bytes")?,
        cancelled_write_bytes: get("cancelled_write_bytes")?,
    })
}

/// The value of field `key` in the text of a `/proc/PID/status` file: what follows `KEY:` and
/// the tab after it, to the end of the line, untrimmed (callers parse it). `None` when the
/// field is missing, or its value is not UTF-8.
///
/// The text may be bytes: a process name is any bytes but NUL, so a status file need not be
/// UTF-8. Only the `Name:` line holds text the process chose, and the kernel escapes it (a
/// newline as the two characters `\n`, a backslash as `\\`; tabs and everything else as
/// they are), so it never spans lines and no other line can be forged: a line that starts
/// with `KEY:` is the kernel's. `Name`'s value is returned escaped.
pub fn status_field<'a, S: AsRef<[u8]> + ?Sized>(status: &'a S, key: &str) -> Option<&'a str> {
    status.as_ref().split(|&b| b == b'\n').find_map(|line| {
        let rest = line.strip_prefix(key.as_bytes())?.strip_prefix(b":")?;
        std::str::from_utf8(rest.strip_prefix(b"\t").unwrap_or(rest)).ok()
    })
}

/// Parses the VmHWM line of `/proc/PID/status` into bytes.
pub fn parse_vm_hwm(status: &(impl AsRef<[u8]> + ?Sized)) -> Option<u64> {
    let kb: u64 = status_field(status, "VmHWM")?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The peak RSS (VmHWM) of a live process, in bytes; `None` for one without an address
/// space, or gone.
pub fn read_vm_hwm(tgid: u32) -> Option<u64> {
    parse_vm_hwm(&std::fs::read(format!("/proc/{tgid}/status")).ok()?)
}

/// Parses the `Uid:` line of `/proc/PID/status`: real, effective, saved and file-system uid.
pub fn parse_uids(status: &(impl AsRef<[u8]> + ?Sized)) -> Option<[u32; 4]> {
    let line = status_field(status, "Uid")?;
    let mut ids = line.split_whitespace().map(|v| v.parse::<u32>().ok());
    Some([ids.next()??, ids.next()??, ids.next()??, ids.next()??])
}

/// The uids of live process `pid` (see [`parse_uids`]); `None` once it is gone.
pub fn read_uids(pid: u32) -> Option<[u32; 4]> {
    parse_uids(&std::fs::read(format!("/proc/{pid}/status")).ok()?)
}

/// The process (thread group) id of live thread `tid` (the `Tgid:` line of its status).
pub fn read_tgid(tid: u32) -> Option<u32> {
    let status = std::fs::read(format!("/proc/{tid}/status")).ok()?;
    status_field(&status, "Tgid")?.trim().parse().ok()
}

/// The supplementary groups of live process `pid` (the `Groups:` line of its status).
pub fn read_groups(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read(format!("/proc/{pid}/status")).ok()?;
    let line = status_field(&status, "Groups")?;
    Some(
        line.split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}

/// The system's page size in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// Parses `/proc/.../schedstat`: "runtime_ns wait_ns timeslices".
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_ascii_whitespace().next()?.parse().ok()
}

/// Parses `/proc/.../stat`: returns (utime, stime, starttime) in clock ticks.
pub fn parse_stat(text: &str) -> Option<(u64, u64, u64)> {
    let s = parse_stat_fields(text)?;
    Some((s.utime, s.stime, s.start_ticks))
}

/// The fields of `/proc/PID/stat` cylo-usage reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFields {
    /// Field 3: R, S, D, Z, T, ...
    pub state: char,
    /// Field 4, in the reader's pid namespace (0 when the parent is not visible).
    pub ppid: u32,
    /// Field 9: `PF_*` flags.
    pub flags: u64,
    pub utime: u64,
    pub stime: u64,
    /// Field 22: start time in clock ticks since boot.
    pub start_ticks: u64,
}

/// `PF_KTHREAD` from `<linux/sched.h>`.
pub const PF_KTHREAD: u64 = 0x0020_0000;

/// Parses `/proc/.../stat`. The command name (field 2) is skipped: it ends at the LAST `)`,
/// and may hold anything, spaces, parentheses and newlines included.
pub fn parse_stat_fields(text: &str) -> Option<StatFields> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let state = fields.first()?.chars().next()?;
    Some(StatFields {
        state,
        ppid: u32::try_from(field(4)?).ok()?,
        flags: field(9)?,
        utime: field(14)?,
        stime: field(15)?,
        start_ticks: field(22)?,
    })
}

/// The start time (clock ticks since boot) of process `pid`, if it exists.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(parse_stat_fields(&text)?.start_ticks)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Reads one live thread, checking that it is the one that joined (by its start time), so a
/// reused pid never makes a stranger's CPU time ours.
pub fn read_thread(tgid: u32, tid: u32, start_boottime_ns: u64) -> Result<ThreadSample, ProcError> {
    let dir = PathBuf::from(format!("/proc/{tgid}/task/{tid}"));
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| ProcError::Read { path, source })
    };
    let stat = read("stat")?;
    let (utime_ticks, stime_ticks, start_ticks) =
        parse_stat(&stat).ok_or_else(|| ProcError::Malformed {
            path: dir.join("stat"),
            what: "expected at least 22 fields after the command name",
        })?;
    let hz = clock_ticks_per_second();
    if start_ticks != start_boottime_ns / (1_000_000_000 / hz) {
        return Err(ProcError::Reused { tgid, tid });
    }
    let runtime_ns = parse_schedstat(&read("schedstat")?).ok_or_else(|| ProcError::Malformed {
        path: dir.join("schedstat"),
        what: "expected a runtime in ns",
    })?;
    // Read last: a thread that was gone here would have failed above.
    let io = read("io").ok().as_deref().and_then(parse_io);
    Ok(ThreadSample {
        runtime_ns,
        utime_ticks,
        stime_ticks,
        io,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line from 6.18, with the name replaced by a hostile one.
    const STAT: &str = "4242 (a) b (c) d) S 1 4242 4242 0 -1 4194560 120 0 0 0 \
        7 3 0 0 20 0 1 0 12345 2420736 230 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 \
        17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn stat_takes_fields_after_the_last_paren() {
        assert_eq!(parse_stat(STAT), Some((7, 3, 12345)));
    }

    #[test]
    fn stat_with_newline_and_spaces_in_name() {
        let s = "1 (x\n) (y ) R 0 0 0 0 0 0 0 0 0 0 11 22 0 0 0 0 0 0 99 0 0\n";
        assert_eq!(parse_stat(s), Some((11, 22, 99)));
    }

    #[test]
    fn stat_fields_for_attach() {
        let s = parse_stat_fields(STAT).unwrap();
        assert_eq!(
            (s.state, s.ppid, s.flags, s.start_ticks),
            ('S', 1, 4194560, 12345)
        );
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 2 0 0";
        let k = parse_stat_fields(kthread).unwrap();
        assert_ne!(k.flags & PF_KTHREAD, 0);
        let zombie = "77 (a) Z 1 77 77 0 -1 4227084 0 0 0 0 5 6 0 0 20 0 1 0 99 0 0";
        assert_eq!(parse_stat_fields(zombie).unwrap().state, 'Z');
    }

    #[test]
    fn stat_truncated_or_garbage_is_none() {
        assert_eq!(parse_stat("12 (sh) S 1 2 3"), None);
        assert_eq!(parse_stat("no parens at all"), None);
        assert_eq!(parse_stat(""), None);
        assert_eq!(
            parse_stat("1 (x) S 1 1 1 0 0 0 0 0 0 0 -5 2 0 0 0 0 0 0 9"),
            None
        );
    }

    #[test]
    fn schedstat() {
        assert_eq!(parse_schedstat("300469 54562 4\n"), Some(300469));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn io_and_vm_hwm() {
        let io = "rchar: 4096\nwchar: 12\nsyscr: 3\nsyscw: 1\nread_bytes: 8192\n\
                  write_bytes: 0\ncancelled_write_bytes: 4096\n";
        let want = ThreadIo {
            rchar: 4096,
            wchar: 12,
            read_bytes: 8192,
            write_bytes: 0,
            cancelled_write_bytes: 4096,
        };
        assert_eq!(parse_io(io), Some(want));
        assert_eq!(parse_io("rchar: 1\n"), None);
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    1536 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(1536 * 1024));
        assert_eq!(parse_vm_hwm("Name:\tkthreadd\n"), None);
    }

    /// `/proc/PID/status` as the kernel prints it for a task named `a\nTgid:\t1` (set with
    /// `prctl(PR_SET_NAME)`): the newline escaped as `\n`, the tab left as it is.
    const HOSTILE_STATUS: &[u8] = b"Name:\ta\\nTgid:\t1\nUmask:\t0022\nState:\tS (sleeping)\n\
        Tgid:\t4242\nNgid:\t0\nPid:\t4243\nPPid:\t1\nUid:\t1000\t1001\t1002\t1003\n\
        Gid:\t1000\t1000\t1000\t1000\nGroups:\t4 27 \nVmPeak:\t    9000 kB\n\
        VmHWM:\t    1536 kB\nThreads:\t2\nCapEff:\t000001ffffffffff\n";

    #[test]
    fn status_fields_despite_hostile_names() {
        assert_eq!(status_field(HOSTILE_STATUS, "Tgid"), Some("4242"));
        assert_eq!(status_field(HOSTILE_STATUS, "Pid"), Some("4243"));
        assert_eq!(status_field(HOSTILE_STATUS, "Name"), Some("a\\nTgid:\t1"));
        assert_eq!(
            status_field(HOSTILE_STATUS, "CapEff"),
            Some("000001ffffffffff")
        );
        assert_eq!(parse_vm_hwm(HOSTILE_STATUS), Some(1536 * 1024));
        assert_eq!(parse_uids(HOSTILE_STATUS), Some([1000, 1001, 1002, 1003]));
        assert_eq!(status_field(HOSTILE_STATUS, "Groups"), Some("4 27 "));
        // Whole keys only.
        assert_eq!(status_field(HOSTILE_STATUS, "Tgi"), None);
        assert_eq!(status_field(HOSTILE_STATUS, "Vm"), None);
        assert_eq!(status_field(HOSTILE_STATUS, "Cpus_allowed"), None);
        assert_eq!(status_field("", "Tgid"), None);

        // A name that is not UTF-8 (any bytes but NUL), with a backslash (escaped `\\`), a
        // carriage return and a tab (both as they are): the other fields read as usual.
        let raw = b"Name:\t\xff\\\\n\r\tPid:\t1\nTgid:\t7\nVmHWM:\t 4 kB\n";
        assert_eq!(status_field(raw, "Tgid"), Some("7"));
        assert_eq!(status_field(raw, "Pid"), None);
        assert_eq!(status_field(raw, "Name"), None);
        assert_eq!(parse_vm_hwm(raw), Some(4096));
        assert_eq!(parse_uids(raw), None);
        // Text read as a String works the same.
        let text = String::from("Name:\tx\nTgid:\t9\n");
        assert_eq!(status_field(&text, "Tgid"), Some("9"));
    }

    #[test]
    fn status_fields_of_a_thread_with_a_hostile_name() {
        // What the kernel really prints: a thread names itself, then reads its own status.
        let pid = std::process::id();
        let (name, tgid, tid, hwm, uids) = std::thread::spawn(|| {
            // 15 bytes and the NUL: a newline, a forged field, a backslash, a non-UTF-8 byte.
            let comm = b"a\nTgid:\t1\\\xffzzzz\0";
            // SAFETY: PR_SET_NAME reads at most 16 bytes from a valid NUL-terminated buffer.
            let r = unsafe { libc::prctl(libc::PR_SET_NAME, comm.as_ptr() as libc::c_ulong) };
            assert_eq!(r, 0, "prctl(PR_SET_NAME)");
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() } as u32;
            let status = std::fs::read("/proc/thread-self/status").unwrap();
            let name_line = status.split(|&b| b == b'\n').next().unwrap().to_vec();
            let field = |k| status_field(&status, k).map(|v| v.trim().parse::<u64>().unwrap());
            (
                name_line,
                field("Tgid"),
                (field("Pid"), tid),
                parse_vm_hwm(&status),
                parse_uids(&status),
            )
        })
        .join()
        .unwrap();
        assert_eq!(name, b"Name:\ta\\nTgid:\t1\\\\\xffzzzz");
        assert_eq!(tgid, Some(u64::from(pid)));
        assert_eq!(tid.0, Some(u64::from(tid.1)));
        assert!(hwm.is_some_and(|b| b > 0), "{hwm:?}");
        // SAFETY: getuid and geteuid have no preconditions.
        let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
        assert_eq!(uids.map(|u| (u[0], u[1])), Some((uid, euid)));
    }

    #[test]
    fn reads_own_thread() {
        let pid = std::process::id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).unwrap();
        let (_, _, start) = parse_stat(&stat).unwrap();
        let hz = clock_ticks_per_second();
        let me = read_thread(pid, pid, start * (1_000_000_000 / hz)).unwrap();
        assert!(me.runtime_ns > 0);
        let other = read_thread(pid, pid, (start + 5) * (1_000_000_000 / hz));
        assert!(matches!(other, Err(ProcError::Reused { .. })));
    }
}
