//! The file descriptors of a run: the reaper's pipe, and the eventfd that wakes waiters.
use std::io::Read as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::reaper::{RECORD_SIZE, Record};

pub(super) fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: a valid array for pipe2; the fds are ours.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from the kernel.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(super) fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn dup(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Waits until `fd` is readable or `timeout` passes; whether it is readable.
pub(super) fn poll_in(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // ppoll: to the ns. poll()'s milliseconds would round a wait of 0.9 ms down to 0, and
    // the sampler would spin until the next sample is due.
    let ts = libc::timespec {
        // `as _`: `time_t`'s width is the libc's (musl moves to 64 bits).
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
    unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) > 0 }
}

/// The reading end of the reaper's pipe, with what a partial read left.
pub(super) struct Pipe {
    pub(super) file: std::fs::File,
    partial: Vec<u8>,
    pub(super) eof: bool,
}

impl Pipe {
    pub(super) fn new(fd: OwnedFd) -> Pipe {
        Pipe {
            file: std::fs::File::from(fd),
            partial: Vec::new(),
            eof: false,
        }
    }

    pub(super) fn read_blocking(&mut self) -> Option<Record> {
        let mut b = [0u8; RECORD_SIZE];
        self.file.read_exact(&mut b).ok()?;
        Some(Record::from_bytes(&b))
    }

    pub(super) fn set_nonblocking(&self) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on our own fd.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Every whole record available now.
    pub(super) fn drain(&mut self) -> Vec<Record> {
        let mut buf = [0u8; 64 * RECORD_SIZE];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock: nothing more now
            }
        }
        let whole = self.partial.len() / RECORD_SIZE * RECORD_SIZE;
        let records = self.partial[..whole]
            .chunks_exact(RECORD_SIZE)
            .map(|c| Record::from_bytes(c.try_into().expect("exact chunk")))
            .collect();
        self.partial.drain(..whole);
        records
    }
}
