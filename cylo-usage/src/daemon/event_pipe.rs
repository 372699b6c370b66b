//! A client's event stream: the pipe it handed over, written without ever blocking the
//! daemon, with a bounded backlog; what does not fit is dropped and counted.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The write end of a session's event pipe, never blocking the daemon: what the client does
/// not take in time waits in a bounded backlog, and past it is dropped (and counted).
pub(crate) struct EventPipe {
    fd: OwnedFd,
    backlog: Vec<u8>,
    dropped: Arc<AtomicU64>,
    closed: bool,
    /// The session's memory account, charged with the backlog's bytes.
    memory: crate::session::budget::Share,
}

/// The size the daemon asks for its event pipes (the kernel's default is 64 KiB).
const EVENTS_PIPE_SIZE: i32 = 1 << 20;

impl EventPipe {
    /// A new pipe: its read end (for the client), and its write end as a sink that never
    /// blocks (`O_NONBLOCK` on an open file only the daemon holds), its backlog charged to
    /// `memory`.
    pub(crate) fn create(
        memory: crate::session::budget::Share,
    ) -> std::io::Result<(OwnedFd, EventPipe, Arc<AtomicU64>)> {
        let mut ends = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors from pipe2.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        // The read end is the client's: it may block on it as it likes. A larger pipe (a hint:
        // the kernel may refuse it) lets a reader that is briefly busy lose nothing.
        // SAFETY: fcntl on descriptors we own.
        unsafe {
            let flags = libc::fcntl(reader.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
            libc::fcntl(writer.as_raw_fd(), libc::F_SETPIPE_SZ, EVENTS_PIPE_SIZE);
        }
        let dropped = Arc::new(AtomicU64::new(0));
        Ok((
            reader,
            EventPipe {
                fd: writer,
                backlog: Vec::new(),
                dropped: dropped.clone(),
                closed: false,
                memory,
            },
            dropped,
        ))
    }

    /// Writes what it can of the backlog without blocking.
    fn push(&mut self) {
        while !self.backlog.is_empty() && !self.closed {
            // SAFETY: write from a valid buffer to a non-blocking pipe.
            let n = unsafe {
                libc::write(
                    self.fd.as_raw_fd(),
                    self.backlog.as_ptr().cast(),
                    self.backlog.len(),
                )
            };
            if n > 0 {
                self.backlog.drain(..n as usize);
                self.memory.give_back(n as u64);
                continue;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return,
                // The client closed its end: the stream is over.
                _ => {
                    self.closed = true;
                    self.memory.give_back(self.backlog.len() as u64);
                    self.backlog.clear();
                }
            }
        }
    }
}

impl std::io::Write for EventPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.closed {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        if self.backlog.len() + buf.len() > EVENTS_BACKLOG {
            self.push();
        }
        // Past the session's backlog, or past its user's memory share: dropped, counted.
        if self.backlog.len() + buf.len() > EVENTS_BACKLOG
            || self.memory.try_take(buf.len() as u64).is_err()
        {
            self.dropped.fetch_add(buf.len() as u64, Ordering::Relaxed);
        } else {
            self.backlog.extend_from_slice(buf);
        }
        self.push();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.push();
        Ok(())
    }
}

impl Drop for EventPipe {
    fn drop(&mut self) {
        // The last lines: give a reading client a moment to take them.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.backlog.is_empty() && !self.closed && Instant::now() < deadline {
            self.push();
            if !self.backlog.is_empty() {
                let mut pfd = libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 50) };
            }
        }
        if !self.backlog.is_empty() {
            self.dropped
                .fetch_add(self.backlog.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Bytes of event stream the daemon keeps for a client that does not read, per session.
pub(crate) const EVENTS_BACKLOG: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_pipe_that_nobody_reads_never_blocks_and_counts_what_it_drops() {
        use std::io::Write;
        let (r, mut sink, dropped) =
            EventPipe::create(crate::session::budget::Share::unlimited()).unwrap();
        // All the client holds is the read end, a file of its own: whatever it does to that
        // file's flags cannot make the daemon's writes block.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(r.as_raw_fd(), libc::F_GETFL);
            assert_eq!(
                flags & libc::O_NONBLOCK,
                0,
                "the client's end blocks for the client"
            );
            libc::fcntl(r.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            let wflags = libc::fcntl(sink.fd.as_raw_fd(), libc::F_GETFL);
            assert_ne!(wflags & libc::O_NONBLOCK, 0);
        }
        let line = [b'x'; 1000];
        let start = Instant::now();
        for _ in 0..10_000 {
            sink.write_all(&line).unwrap();
        }
        let bound = if std::env::var_os("CYLO_USAGE_VM").is_some() {
            25
        } else {
            5
        };
        assert!(start.elapsed() < Duration::from_secs(bound));
        // 10 MB written; the pipe holds at most 1 MiB and the backlog 4 MiB: the rest is
        // dropped.
        let lost = dropped.load(Ordering::Relaxed);
        assert!(
            lost >= 10_000_000 - EVENTS_BACKLOG as u64 - (2 << 20),
            "{lost}"
        );
        drop(r);
        assert!(sink.write(&line).is_err() || sink.closed);
    }
}
