//! One connection to the daemon, and the bounds on every wait for it: each request, send and
//! whole reply together, has one deadline (connect and `hello` together
//! [`HANDSHAKE_DEADLINE`]; a session's start [`REQUEST_DEADLINE`]; the calls a waiting run
//! repeats [`POLL_DEADLINE`]; a report with its breakdown [`REPORT_DEADLINE`]). A request past
//! its deadline is an error ([`DaemonError::Deadline`]) and the connection is then dead (a
//! reply may be half read). An [`Interrupt`] descriptor (the command line's signalfd) cuts
//! every call to [`INTERRUPT_GRACE`] once it is readable, so a pending signal is acted on at
//! once.
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::DaemonError;
use super::protocol::{self, FrameError, MAX_REPLY, Reply, Request};
use crate::sys::lock;

/// Connecting and `hello`, together.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// A session's start (`spawn`, `spawned`, `attach`) and `features`.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// The requests a waiting run repeats (`status`, `kill`, `timed-out`, `end`, `usage` without
/// its breakdown): short, so that a stalled daemon delays a timeout's kill by little.
pub const POLL_DEADLINE: Duration = Duration::from_secs(5);
/// A report with its breakdown (a large tree's can be tens of MiB).
pub const REPORT_DEADLINE: Duration = Duration::from_secs(30);
/// How long a call may still take once the [`Interrupt`] descriptor is readable.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(1);
/// How long past the caller's next promise ([`super::RemoteRun::set_promise`]) a call may last.
pub const PROMISE_GRACE: Duration = Duration::from_millis(500);
/// The least time a call is given, even past a promise.
pub(crate) const LEAST_LIMIT: Duration = Duration::from_millis(50);
/// How often a waiting run asks when no wake-up comes.
pub(crate) const POLL: Duration = Duration::from_millis(100);
/// How long a connect waits before it tries again when the daemon's backlog is full.
pub(crate) const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// A descriptor that, once readable, cuts every pending and later call to the daemon to
/// [`INTERRUPT_GRACE`] (e.g. a signalfd: a signal that waits to be handled is not held up by
/// a daemon that does not answer). It is only polled, never read.
#[derive(Clone, Debug)]
pub struct Interrupt(Arc<OwnedFd>);

impl Interrupt {
    /// Watches a duplicate of `fd`.
    pub fn new(fd: BorrowedFd<'_>) -> std::io::Result<Interrupt> {
        Ok(Interrupt(Arc::new(fd.try_clone_to_owned()?)))
    }
}

impl PartialEq for Interrupt {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Interrupt {}

/// The name of a request, for errors.
pub(crate) fn op_name(request: &Request) -> &'static str {
    match request {
        Request::Hello { .. } => "hello",
        Request::Features => "features",
        Request::Spawn { .. } => "spawn",
        Request::Spawned { .. } => "spawned",
        Request::Attach { .. } => "attach",
        Request::Status { .. } => "status",
        Request::Usage { .. } => "usage",
        Request::Kill { .. } => "kill",
        Request::TimedOut { .. } => "timed-out",
        Request::End { .. } => "end",
    }
}

/// One request's deadline, shortened by the interrupt descriptor once it is readable.
pub(crate) struct Clock {
    request: &'static str,
    limit: Duration,
    pub(crate) deadline: Instant,
    interrupt: Option<RawFd>,
    interrupted: bool,
}

impl Clock {
    pub(crate) fn new(
        request: &'static str,
        limit: Duration,
        interrupt: Option<&Interrupt>,
    ) -> Clock {
        Clock {
            request,
            limit,
            deadline: Instant::now() + limit,
            interrupt: interrupt.map(|i| i.0.as_raw_fd()),
            interrupted: false,
        }
    }

    pub(crate) fn expired(&self) -> DaemonError {
        match self.interrupted {
            true => DaemonError::Interrupted {
                request: self.request,
            },
            false => DaemonError::Deadline {
                request: self.request,
                after: self.limit,
            },
        }
    }

    /// Waits until `fd` is ready for `events` (`fd` < 0: until `pause` has passed).
    fn wait(&mut self, fd: RawFd, events: i16, pause: Option<Duration>) -> Result<(), DaemonError> {
        let until = pause.map(|p| Instant::now() + p);
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                return Err(self.expired());
            }
            if until.is_some_and(|u| now >= u) {
                return Ok(());
            }
            let end = until.map_or(self.deadline, |u| u.min(self.deadline));
            // Rounded up to the next ms: never a busy loop.
            let ms = (end - now).as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            let watch_interrupt = !self.interrupted && self.interrupt.is_some();
            let mut fds = [
                libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if watch_interrupt {
                        self.interrupt.unwrap_or(-1)
                    } else {
                        -1
                    },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds (a negative fd is ignored by poll).
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DaemonError::Frame(FrameError::Io {
                    syscall: "poll",
                    source: e,
                }));
            }
            if fds[1].revents != 0 {
                self.interrupted = true;
                self.deadline = self.deadline.min(Instant::now() + INTERRUPT_GRACE);
            }
            if fd >= 0 && fds[0].revents != 0 {
                return Ok(());
            }
        }
    }
}

/// Connects to `path` without blocking past the clock's deadline (a daemon whose backlog is
/// full makes a blocking connect wait for ever).
pub(crate) fn connect(path: &Path, clock: &mut Clock) -> Result<UnixStream, DaemonError> {
    use std::os::unix::ffi::OsStrExt;
    let fail = |source| DaemonError::Connect {
        path: path.to_path_buf(),
        source,
    };
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(fail(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2); the fd is ours.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    loop {
        // SAFETY: a valid sockaddr_un of `len` bytes.
        let r = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            // The listener's backlog is full: try again until the deadline.
            Some(libc::EAGAIN) => clock.wait(-1, 0, Some(CONNECT_RETRY))?,
            Some(libc::EINPROGRESS) => {
                clock.wait(sock.as_raw_fd(), libc::POLLOUT, None)?;
                let mut err: libc::c_int = 0;
                let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: SO_ERROR into a c_int.
                unsafe {
                    libc::getsockopt(
                        sock.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        (&mut err as *mut libc::c_int).cast(),
                        &mut size,
                    )
                };
                if err != 0 {
                    return Err(fail(std::io::Error::from_raw_os_error(err)));
                }
                break;
            }
            _ => return Err(fail(e)),
        }
    }
    Ok(UnixStream::from(sock))
}

/// The protocol's frames wait on the clock: its deadline, cut short by an interrupt. Why it
/// gave up is kept for the caller (the frame itself only sees a deadline).
pub(crate) struct ClockWait<'a> {
    clock: &'a mut Clock,
    stopped: Option<DaemonError>,
}

impl protocol::Wait for ClockWait<'_> {
    fn wait(&mut self, sock: RawFd, events: i16) -> Result<(), FrameError> {
        self.clock.wait(sock, events, None).map_err(|e| {
            self.stopped = Some(e);
            FrameError::Deadline
        })
    }
}

impl ClockWait<'_> {
    /// The error of a frame that failed: the clock's reason when it stopped the frame.
    fn error(&mut self, e: FrameError) -> DaemonError {
        match (self.stopped.take(), e) {
            (Some(why), FrameError::Deadline) => why,
            (_, e) => DaemonError::from(e),
        }
    }
}

/// One connection to the daemon; its sessions end when it closes.
pub(crate) struct Conn {
    /// Non-blocking: every wait is a poll bounded by the request's deadline.
    pub(crate) sock: Mutex<UnixStream>,
    /// Why the connection may no longer be used (a reply may have been left half read).
    pub(crate) dead: Mutex<Option<String>>,
    pub(crate) interrupt: Option<Interrupt>,
}

impl Conn {
    /// Sends `request` with `fds` and reads the reply, both within `limit` (an error reply
    /// becomes [`DaemonError::Refused`]; any other failure leaves the connection dead).
    pub(crate) fn call(
        &self,
        request: &Request,
        fds: &[RawFd],
        limit: Duration,
    ) -> Result<(Reply, Vec<OwnedFd>), DaemonError> {
        let sock = lock(&self.sock);
        let mut dead = lock(&self.dead);
        if let Some(why) = &*dead {
            return Err(DaemonError::Dead { why: why.clone() });
        }
        let mut clock = Clock::new(op_name(request), limit, self.interrupt.as_ref());
        let result = self.exchange(sock.as_raw_fd(), request, fds, &mut clock);
        match &result {
            Ok(_) | Err(DaemonError::Refused { .. }) => {}
            Err(e) => *dead = Some(crate::error_chain(e)),
        }
        result
    }

    pub(crate) fn exchange(
        &self,
        sock: RawFd,
        request: &Request,
        fds: &[RawFd],
        clock: &mut Clock,
    ) -> Result<(Reply, Vec<OwnedFd>), DaemonError> {
        let bytes = serde_json::to_vec(request).expect("protocol types serialise");
        let mut wait = ClockWait {
            clock,
            stopped: None,
        };
        protocol::send_frame_waiting(sock, &bytes, fds, &mut wait).map_err(|e| wait.error(e))?;
        let (body, got) =
            protocol::recv_frame_waiting(sock, MAX_REPLY, &mut wait).map_err(|e| wait.error(e))?;
        let clock = wait.clock;
        let reply: Reply = serde_json::from_slice(&body).map_err(|_| DaemonError::Unexpected {
            what: clock.request,
        })?;
        match reply {
            Reply::Error { kind, message } => Err(DaemonError::Refused { kind, message }),
            r => Ok((r, got)),
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        lock(&self.dead).is_some()
    }
}
