//! The reaper: a helper process between the tracker and the root, that makes the kernel do
//! the exact part of the /proc fallback.
//!
//! `PR_SET_CHILD_SUBREAPER` is a property of a whole process, and `wait()` takes any child:
//! set in the tracker's own process, they would catch the orphans and steal the exit
//! statuses of everything else the host process runs. So they live in a process of their
//! own. The command is spawned as an ordinary [`std::process::Command`], with one more
//! `pre_exec` hook, which runs in the forked child after std has applied stdio, directory,
//! ids and the caller's own hooks: it marks that child a subreaper and forks once more. The
//! grandchild returns from the hook and execs the command: it is the root. The child never
//! returns: it is the reaper. Every orphan of the tree reparents to it, so everything it can
//! `wait()` for belongs to the tree, and it waits for all of it. For each reaped process it
//! sends `wait4()`'s `rusage` (the process's CPU plus that of every descendant it waited for,
//! to the µs; its largest RSS; its block I/O in 512-byte units) to the tracker through a pipe,
//! and when nothing is left to wait for (`ECHILD`), the whole tree is over.
//!
//! The reaper is a fork of a possibly multi-threaded process that never execs: it makes
//! raw system calls only (no allocation, no locks, no glibc `fork()` with its handlers).
use std::os::fd::RawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the reaper reports; one record per `write()` (atomic: smaller than `PIPE_BUF`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub kind: u32,
    pub pid: i32,
    /// The wait status (`REAPED`), or errno (`FAILED`).
    pub status: i32,
    pub _pad: u32,
    /// Start time of the process (clock ticks since boot); 0 if it could not be read.
    pub start_ticks: u64,
    pub utime_us: u64,
    pub stime_us: u64,
    pub maxrss_kb: u64,
    pub inblock: u64,
    pub oublock: u64,
}

pub const RECORD_SIZE: usize = std::mem::size_of::<Record>();
const _: () = assert!(RECORD_SIZE == 64 && RECORD_SIZE <= libc::PIPE_BUF);

/// The root was forked: `pid`, `start_ticks`.
pub const STARTED: u32 = 1;
/// A child was reaped, with its rusage.
pub const REAPED: u32 = 2;
/// Nothing is left to wait for: the tree is over.
pub const DONE: u32 = 3;
/// `waitid()` failed with errno `status`; the reaper goes on with plain `wait4()`.
pub const FAILED: u32 = 4;

impl Record {
    pub fn from_bytes(b: &[u8; RECORD_SIZE]) -> Record {
        // SAFETY: Record is plain old data of exactly RECORD_SIZE bytes, every bit pattern valid.
        unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) }
    }

    fn as_bytes(&self) -> &[u8; RECORD_SIZE] {
        // SAFETY: plain old data, no padding left uninitialised (`_pad` is a field).
        unsafe { &*(self as *const Record).cast() }
    }
}

/// Adds the reaper hook to `command`. It acts only while `armed` is true (during the
/// tracker's own `spawn`), so a command spawned again, elsewhere, is not affected.
pub fn install(command: &mut Command, report: RawFd, armed: Arc<AtomicBool>) {
    let hook = move || {
        if !armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        // SAFETY: runs in the forked child before exec; become_reaper only makes raw
        // system calls.
        unsafe { become_reaper(report) }
    };
    // SAFETY: the hook is async-signal-safe (see above).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, hook);
    }
}

/// In std's forked child: become a subreaper, fork the root (which returns, to exec the
/// command) and stay behind as the reaper (which never returns).
///
/// # Safety
/// Only in a freshly forked child, before exec.
unsafe fn become_reaper(report: RawFd) -> std::io::Result<()> {
    // SAFETY: plain system calls on locals.
    unsafe {
        // SIGCHLD must not be ignored in the reaper (ignored, the kernel reaps children
        // itself and their rusage is lost); the root gets back whatever it inherited.
        let mut old: libc::sigaction = std::mem::zeroed();
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        if libc::sigaction(libc::SIGCHLD, &dfl, &mut old) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
            let e = std::io::Error::last_os_error();
            libc::sigaction(libc::SIGCHLD, &old, std::ptr::null_mut());
            return Err(e);
        }
        // A raw clone: glibc's fork() would run fork handlers and take malloc's locks, which
        // a thread of the tracker may have held when std forked us.
        let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0);
            libc::sigaction(libc::SIGCHLD, &old, std::ptr::null_mut());
            return Err(e);
        }
        if pid == 0 {
            // The root: not a subreaper (not inherited); its SIGCHLD disposition as it was.
            libc::sigaction(libc::SIGCHLD, &old, std::ptr::null_mut());
            return Ok(());
        }
        reaper_main(pid as libc::pid_t, report)
    }
}

/// Closes every file descriptor but `keep`: the reaper must hold none of the command's
/// stdio (a pipe would never see its end) nor std's exec-error channel (spawn would wait).
unsafe fn close_all_but(keep: RawFd) {
    // SAFETY: closing descriptors of this process only.
    unsafe {
        let close_range = |first: u32, last: u32| {
            libc::syscall(libc::SYS_close_range, first, last, 0) == 0 || first > last
        };
        let keep = keep as u32;
        let low = keep == 0 || close_range(0, keep - 1);
        let high = close_range(keep + 1, u32::MAX);
        if !(low && high) {
            // Before 5.9: one by one, up to the descriptor limit.
            let mut lim: libc::rlimit = std::mem::zeroed();
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur.min(1 << 20) as u32
            } else {
                1024
            };
            for fd in 0..max {
                if fd != keep {
                    libc::close(fd as i32);
                }
            }
        }
    }
}

/// Writes `n` in decimal at `buf[at..]`; returns the new end.
fn put_decimal(buf: &mut [u8], mut at: usize, n: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut len = 0;
    let mut v = n;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while len > 0 {
        len -= 1;
        buf[at] = digits[len];
        at += 1;
    }
    at
}

/// The start time (field 22) of a `stat` line, without allocating.
pub fn parse_start_ticks(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let mut field = 2; // the field the `)` ends
    let mut value: Option<u64> = None;
    let mut in_token = false;
    for &b in &stat[close + 1..] {
        if b.is_ascii_whitespace() {
            if in_token && field == 22 {
                return value;
            }
            in_token = false;
            continue;
        }
        if !in_token {
            in_token = true;
            field += 1;
            value = Some(0);
        }
        if field == 22 {
            if !b.is_ascii_digit() {
                return None;
            }
            value = value.map(|v| v * 10 + u64::from(b - b'0'));
        }
    }
    (field == 22).then_some(value).flatten()
}

/// `/proc/PID/stat`'s start time, read with raw system calls into stack buffers.
fn start_ticks_of(pid: libc::pid_t) -> u64 {
    let mut path = [0u8; 32];
    path[..6].copy_from_slice(b"/proc/");
    let at = put_decimal(&mut path, 6, pid as u32);
    path[at..at + 5].copy_from_slice(b"/stat");
    // path[at + 5] is already the terminating NUL.
    let mut buf = [0u8; 2048];
    // SAFETY: a NUL-terminated path; reads into a stack buffer; closes what it opened.
    unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return 0;
        }
        let mut len = 0;
        while len < buf.len() {
            let n = libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len);
            if n <= 0 {
                break;
            }
            len += n as usize;
        }
        libc::close(fd);
        parse_start_ticks(&buf[..len]).unwrap_or(0)
    }
}

fn send(report: RawFd, record: &Record) {
    let bytes = record.as_bytes();
    loop {
        // SAFETY: writes a local buffer to our pipe.
        let n = unsafe { libc::write(report, bytes.as_ptr().cast(), bytes.len()) };
        if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // Written whole (atomic), or the tracker is gone (EPIPE): go on reaping either way.
            return;
        }
    }
}

fn tv_us(tv: libc::timeval) -> u64 {
    tv.tv_sec.max(0) as u64 * 1_000_000 + tv.tv_usec.max(0) as u64
}

fn reaped(pid: libc::pid_t, status: i32, start_ticks: u64, ru: &libc::rusage) -> Record {
    Record {
        kind: REAPED,
        pid,
        status,
        start_ticks,
        utime_us: tv_us(ru.ru_utime),
        stime_us: tv_us(ru.ru_stime),
        maxrss_kb: ru.ru_maxrss.max(0) as u64,
        inblock: ru.ru_inblock.max(0) as u64,
        oublock: ru.ru_oublock.max(0) as u64,
        ..Record::default()
    }
}

/// Signals that would end the reaper and lose the tree's accounting: a terminal's Ctrl-C
/// reaches the whole foreground process group, the reaper included.
const IGNORED: [i32; 17] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGPIPE,
    libc::SIGALRM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGXCPU,
    libc::SIGXFSZ,
    libc::SIGIO,
    libc::SIGPWR,
];

fn reaper_main(root: libc::pid_t, report: RawFd) -> ! {
    // SAFETY: raw system calls on locals and our own descriptors; never returns.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"cylo-reaper".as_ptr(), 0, 0, 0);
        close_all_but(report);
        let mut ign: libc::sigaction = std::mem::zeroed();
        ign.sa_sigaction = libc::SIG_IGN;
        for sig in IGNORED {
            libc::sigaction(sig, &ign, std::ptr::null_mut());
        }
        // Unblock SIGCHLD etc. is not needed: waiting does not depend on the signal mask.
        send(
            report,
            &Record {
                kind: STARTED,
                pid: root,
                start_ticks: start_ticks_of(root),
                ..Record::default()
            },
        );
        let mut peek = true;
        loop {
            let mut status = 0;
            let mut ru: libc::rusage = std::mem::zeroed();
            if peek {
                // Look first (WNOWAIT), to read the zombie's start time before reaping it:
                // the tracker tells processes apart by pid and start time.
                let mut info: libc::siginfo_t = std::mem::zeroed();
                let r = libc::waitid(
                    libc::P_ALL,
                    0,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT | libc::__WALL,
                );
                if r != 0 {
                    match std::io::Error::last_os_error().raw_os_error() {
                        Some(libc::EINTR) => continue,
                        Some(libc::ECHILD) => break,
                        errno => {
                            send(
                                report,
                                &Record {
                                    kind: FAILED,
                                    status: errno.unwrap_or(0),
                                    ..Record::default()
                                },
                            );
                            peek = false;
                            continue;
                        }
                    }
                }
                let pid = info.si_pid();
                let start = start_ticks_of(pid);
                let got = loop {
                    let got = libc::wait4(pid, &mut status, libc::__WALL, &mut ru);
                    if got >= 0
                        || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
                    {
                        break got;
                    }
                };
                if got == pid {
                    send(report, &reaped(pid, status, start, &ru));
                }
            } else {
                let got = libc::wait4(-1, &mut status, libc::__WALL, &mut ru);
                if got > 0 {
                    send(report, &reaped(got, status, 0, &ru));
                    continue;
                }
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    _ => break,
                }
            }
        }
        send(
            report,
            &Record {
                kind: DONE,
                ..Record::default()
            },
        );
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_without_allocating() {
        let line = b"4242 (a) b (c) d) S 1 4242 4242 0 -1 4194560 120 0 0 0 \
            7 3 0 0 20 0 1 0 12345 2420736 230 18446744073709551615 1 1 0\n";
        assert_eq!(parse_start_ticks(line), Some(12345));
        let at_end = b"1 (x) S 1 1 1 0 0 0 0 0 0 0 1 2 0 0 0 0 1 0 99";
        assert_eq!(parse_start_ticks(at_end), Some(99));
        assert_eq!(parse_start_ticks(b"1 (x) S 1 1 1"), None);
        assert_eq!(
            parse_start_ticks(b"1 (x) S 1 1 1 0 0 0 0 0 0 0 1 2 0 0 0 0 1 0 9x"),
            None
        );
        assert_eq!(parse_start_ticks(b"no paren"), None);
    }

    #[test]
    fn decimal_paths() {
        let mut b = [0u8; 16];
        let end = put_decimal(&mut b, 2, 4_194_304);
        assert_eq!(&b[2..end], b"4194304");
        let end = put_decimal(&mut b, 0, 0);
        assert_eq!(&b[..end], b"0");
        let me = std::process::id() as libc::pid_t;
        let want = crate::sys::procfs::process_start_ticks(me as u32).unwrap();
        assert_eq!(start_ticks_of(me), want);
        assert_eq!(start_ticks_of(i32::MAX), 0);
    }

    #[test]
    fn records_round_trip() {
        let r = Record {
            kind: REAPED,
            pid: 7,
            status: 0x300,
            start_ticks: 9,
            utime_us: 1,
            stime_us: 2,
            maxrss_kb: 3,
            inblock: 4,
            oublock: 5,
            ..Record::default()
        };
        assert_eq!(Record::from_bytes(r.as_bytes()), r);
    }
}
