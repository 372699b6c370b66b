//! The operating system beneath everything else: the system calls the crate makes beyond
//! std's, each a thin wrapper that returns what the kernel said (`std::io::Error`; callers add
//! which pid, file or operation it was about), and the readers of /proc (`procfs`).
pub(crate) mod procfs;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use tokio::io::unix::AsyncFd;

/// Locks `m`, also when a thread panicked while holding it: every mutex of the crate guards
/// plain data that a panic elsewhere leaves consistent, so its users go on with it (a
/// daemon must not stop serving because one session's thread panicked).
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `pid` as the kernel's pids are kept inside the crate (`u32`); `None` for 0 and negative
/// values, which name no process (the public API takes `libc::pid_t`, as libc and the kernel
/// do).
pub(crate) fn pid_u32(pid: libc::pid_t) -> Option<u32> {
    u32::try_from(pid).ok().filter(|&p| p > 0)
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// pidfd_open(2) of process `pid` (ESRCH: there is none).
pub(crate) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// pidfd_send_signal(2) of `signal` to the process of `fd`.
pub(crate) fn pidfd_send_signal(fd: &OwnedFd, signal: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal on a pidfd we own; no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `fd` is readable now (a pidfd is once its process has exited).
pub(crate) fn fd_readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; no waiting.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 && pfd.revents & libc::POLLIN != 0 }
}

/// A close-on-exec duplicate of `fd`.
pub(crate) fn dup(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Registers an owned fd with the tokio reactor (the current runtime's).
pub fn watch(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the fd, so it stays open for as long as it is registered.
    Ok(unsafe { AsyncFd::register(fd) }?)
}
