//! The daemon's client: [`DaemonTracker`] and its runs ([`RemoteRun`]), with the surface of
//! the in-process tracker. A spawned root is still this process's own child, with its stdio
//! and environment: the daemon only registers the spawning thread in the kernel.
//!
//! A client never waits on the daemon without a bound: each request, send and whole reply
//! together, has one deadline (connect and `hello` together [`HANDSHAKE_DEADLINE`]; a
//! session's start [`REQUEST_DEADLINE`]; the calls a waiting run repeats
//! [`POLL_DEADLINE`]; a report with its breakdown [`REPORT_DEADLINE`]). A request past its
//! deadline is an error ([`DaemonError::Deadline`]) and the connection is then dead (a reply
//! may be half read). An [`Interrupt`] descriptor (the command line's signalfd) cuts every
//! call to [`INTERRUPT_GRACE`] once it is readable, so a pending signal is acted on at once.
//! And a run's caller may name its next promise ([`RemoteRun::set_promise`]: a timeout's
//! kill): no call then outlasts it by more than [`PROMISE_GRACE`].
//!
//! A run keeps its promises alone: when the daemon goes away or any call of a run fails, the
//! run goes on with a /proc follower of the tree this process can see (the root, its
//! descendants and, for a child subreaper, every orphan that came back to it; see
//! [`RemoteRun::set_subreaper`]): `kill` still reaches the tree, the root's status is still
//! its own, and the report says `precision: approximate`, when the daemon went away and why,
//! and keeps the last exact figures the daemon gave.
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::DaemonError;
use super::protocol::{self, FrameError, MAX_REPLY, Reply, Request, SessionOptions};
use crate::proc::fallback::{DEFAULT_INTERVAL, ProcRun, ProcTracker};
use crate::session::breakdown::EventSink;
use crate::session::run::RunOptions;
use crate::sys::lock;
use crate::sys::{pidfd_open, pidfd_send_signal, watch};
use crate::usage::{Precision, ResourceUsage, TrackerKind};

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
/// How long past the caller's next promise ([`RemoteRun::set_promise`]) a call may last.
pub const PROMISE_GRACE: Duration = Duration::from_millis(500);
/// The least time a call is given, even past a promise.
const LEAST_LIMIT: Duration = Duration::from_millis(50);
/// How often a waiting run asks when no wake-up comes.
const POLL: Duration = Duration::from_millis(100);
/// How long a connect waits before it tries again when the daemon's backlog is full.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

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
fn op_name(request: &Request) -> &'static str {
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
struct Clock {
    request: &'static str,
    limit: Duration,
    deadline: Instant,
    interrupt: Option<RawFd>,
    interrupted: bool,
}

impl Clock {
    fn new(request: &'static str, limit: Duration, interrupt: Option<&Interrupt>) -> Clock {
        Clock {
            request,
            limit,
            deadline: Instant::now() + limit,
            interrupt: interrupt.map(|i| i.0.as_raw_fd()),
            interrupted: false,
        }
    }

    fn expired(&self) -> DaemonError {
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
fn connect(path: &Path, clock: &mut Clock) -> Result<UnixStream, DaemonError> {
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
struct ClockWait<'a> {
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
struct Conn {
    /// Non-blocking: every wait is a poll bounded by the request's deadline.
    sock: Mutex<UnixStream>,
    /// Why the connection may no longer be used (a reply may have been left half read).
    dead: Mutex<Option<String>>,
    interrupt: Option<Interrupt>,
}

impl Conn {
    /// Sends `request` with `fds` and reads the reply, both within `limit` (an error reply
    /// becomes [`DaemonError::Refused`]; any other failure leaves the connection dead).
    fn call(
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

    fn exchange(
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

    fn is_dead(&self) -> bool {
        lock(&self.dead).is_some()
    }
}

/// A connection to `cylo-usage serve`. Cheap to clone; every clone shares the connection.
#[derive(Clone)]
pub struct DaemonTracker {
    conn: Arc<Conn>,
    path: PathBuf,
}

impl crate::kernel::tracker::Tracker {
    /// Connects to the daemon listening at `path` (see [`super::socket_path`]); connect and
    /// `hello` together take at most [`HANDSHAKE_DEADLINE`].
    pub fn connect(path: &Path) -> Result<DaemonTracker, DaemonError> {
        Self::connect_with(path, None)
    }

    /// [`crate::Tracker::connect`]; every call on the connection is cut to
    /// [`INTERRUPT_GRACE`] once `interrupt` is readable.
    pub fn connect_with(
        path: &Path,
        interrupt: Option<Interrupt>,
    ) -> Result<DaemonTracker, DaemonError> {
        let mut clock = Clock::new("hello", HANDSHAKE_DEADLINE, interrupt.as_ref());
        let sock = connect(path, &mut clock)?;
        let conn = Arc::new(Conn {
            sock: Mutex::new(sock),
            dead: Mutex::new(None),
            interrupt,
        });
        let hello = Request::Hello {
            version: protocol::VERSION,
        };
        // What is left of the handshake's deadline after the connect.
        let left = clock.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(clock.expired());
        }
        match conn.call(&hello, &[], left) {
            Ok((Reply::Hello { .. }, _)) => Ok(DaemonTracker {
                conn,
                path: path.to_path_buf(),
            }),
            Ok(_) => Err(DaemonError::Unexpected { what: "hello" }),
            // The deadline is the handshake's, connect included.
            Err(DaemonError::Deadline { .. }) => Err(DaemonError::Deadline {
                request: "hello",
                after: HANDSHAKE_DEADLINE,
            }),
            Err(e) => Err(e),
        }
    }
}

fn open_dir(path: &str) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path).expect("no NUL");
    // SAFETY: open(2) of a NUL-terminated path; the fd is ours.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Copies the session's event stream from the pipe the daemon made (its read end came with
/// the reply) into the caller's sink, on a thread of its own, until the daemon closes it.
fn copy_events(reader: OwnedFd, sink: EventSink) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("daemon-events".to_string())
        .spawn(move || {
            let mut reader = std::fs::File::from(reader);
            let mut sink = sink;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if sink.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let _ = sink.flush();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = sink.flush();
        })
}

/// The wake-up eventfd and, when events were asked for, the events pipe's read end, as a
/// `prepared` or `started` reply carries them (in that order).
fn session_fds(
    got: Vec<OwnedFd>,
    events: bool,
    what: &'static str,
) -> Result<(OwnedFd, Option<OwnedFd>), DaemonError> {
    let mut got = got.into_iter();
    let wake = got.next().ok_or(DaemonError::Unexpected { what })?;
    let reader = match events {
        true => Some(got.next().ok_or(DaemonError::Unexpected { what })?),
        false => None,
    };
    Ok((wake, reader))
}

fn session_options(options: &RunOptions) -> SessionOptions {
    SessionOptions {
        tree: options.tree,
        events: options.events.is_some(),
        tree_limit: options.tree_limit as u64,
    }
}

/// A spawn or attach that failed: why, and the options back when the command was not
/// created (to start it another way).
pub(crate) type NotStarted = Box<(DaemonError, Option<RunOptions>)>;

impl DaemonTracker {
    /// The socket this tracker is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The daemon's kernel release, its counters and how each is measured, and its kernel
    /// layout.
    pub fn features(
        &self,
    ) -> Result<(String, Vec<crate::kernel::features::Feature>, String), DaemonError> {
        match self.conn.call(&Request::Features, &[], REQUEST_DEADLINE)?.0 {
            Reply::Features {
                kernel,
                features,
                layout,
            } => Ok((kernel, features, layout)),
            _ => Err(DaemonError::Unexpected { what: "features" }),
        }
    }

    /// Starts `command` (this process's child) as the root of a new session of the daemon.
    pub fn spawn(&self, command: &mut Command) -> Result<RemoteRun, DaemonError> {
        self.spawn_with(command, RunOptions::default())
    }

    /// [`DaemonTracker::spawn`] with a breakdown and/or an event stream.
    ///
    /// Should the daemon go away (or stop answering) once the command is started, the
    /// command keeps running and the run follows it from /proc (see [`RemoteRun`]). Should
    /// the daemon refuse the started command ([`DaemonError::RootNotJoined`]), it is killed:
    /// it must not run unmeasured.
    pub fn spawn_with(
        &self,
        command: &mut Command,
        options: RunOptions,
    ) -> Result<RemoteRun, DaemonError> {
        self.try_spawn(command, options).map_err(|f| f.0)
    }

    /// [`DaemonTracker::spawn_with`]; a failure before the command was created gives the
    /// options back (to start it another way).
    pub(crate) fn try_spawn(
        &self,
        command: &mut Command,
        options: RunOptions,
    ) -> Result<RemoteRun, NotStarted> {
        let me = std::process::id();
        let syscall = |syscall| {
            move |source| DaemonError::Syscall {
                syscall,
                pid: me,
                source,
            }
        };
        // This thread creates the root: the daemon registers it in the kernel.
        let dir = match open_dir("/proc/thread-self") {
            Ok(d) => d,
            Err(e) => {
                return Err(Box::new((
                    syscall("open(/proc/thread-self)")(e),
                    Some(options),
                )));
            }
        };
        let wire = session_options(&options);
        let breakdown = options.tree;
        let (reply, got) = match self.conn.call(
            &Request::Spawn { options: wire },
            &[dir.as_raw_fd()],
            REQUEST_DEADLINE,
        ) {
            Ok(r) => r,
            Err(e) => return Err(Box::new((e, Some(options)))),
        };
        drop(dir);
        let Reply::Prepared { session } = reply else {
            return Err(Box::new((
                DaemonError::Unexpected { what: "spawn" },
                Some(options),
            )));
        };
        let (wake, reader) = match session_fds(got, wire.events, "spawn") {
            Ok(f) => f,
            Err(e) => return Err(Box::new((e, Some(options)))),
        };
        // The next task this thread creates is the root: nothing else before it (the copier
        // thread starts after it).
        let spawned = command.spawn();
        let confirmed = self.conn.call(
            &Request::Spawned {
                session,
                created: spawned.is_ok(),
            },
            &[],
            REQUEST_DEADLINE,
        );
        let mut child = spawned.map_err(|source| {
            let e = DaemonError::Spawn {
                program: command.get_program().to_string_lossy().into_owned(),
                source,
            };
            Box::new((e, None))
        })?;
        let mut lost = None;
        match confirmed {
            Ok(_) => {}
            Err(e @ DaemonError::Refused { .. }) => {
                // The root did not join: it must not run unmeasured.
                let _ = child.kill();
                let _ = child.wait();
                let e = DaemonError::RootNotJoined {
                    source: Box::new(e),
                };
                return Err(Box::new((e, None)));
            }
            // The daemon died or stalled just now: the child is ours and runs; the run
            // follows it from /proc, and the caller still gets the child's own exit status.
            Err(e) => lost = Some(e),
        }
        let copier = match (reader, options.events) {
            (Some(reader), Some(sink)) => match copy_events(reader, sink) {
                Ok(c) => Some(c),
                Err(source) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let e = DaemonError::Syscall {
                        syscall: "thread",
                        pid: me,
                        source,
                    };
                    return Err(Box::new((e, None)));
                }
            },
            _ => None,
        };
        let root_pid = child.id();
        let pidfd = pidfd_open(root_pid).ok();
        let run = RemoteRun::new(
            self,
            session,
            Some(child),
            root_pid,
            pidfd,
            wake,
            copier,
            breakdown,
        );
        if let Some(e) = lost {
            run.go_local(&e);
        }
        Ok(run)
    }

    /// Follows running process `pid` (as this process's pid namespace sees it) and its
    /// descendants, through the daemon.
    pub fn attach(&self, pid: u32) -> Result<RemoteRun, DaemonError> {
        self.attach_with(pid, RunOptions::default())
    }

    /// [`DaemonTracker::attach`] with a breakdown and/or an event stream.
    pub fn attach_with(&self, pid: u32, options: RunOptions) -> Result<RemoteRun, DaemonError> {
        self.try_attach(pid, options).map_err(|f| f.0)
    }

    /// [`DaemonTracker::attach_with`]; a failure gives the options back.
    pub(crate) fn try_attach(
        &self,
        pid: u32,
        options: RunOptions,
    ) -> Result<RemoteRun, NotStarted> {
        let pidfd = pidfd_open(pid).map_err(|source| {
            if source.raw_os_error() == Some(libc::ESRCH) {
                DaemonError::Refused {
                    kind: protocol::ErrorKind::NoSuchProcess,
                    message: format!("no process {pid}"),
                }
            } else {
                DaemonError::Syscall {
                    syscall: "pidfd_open",
                    pid,
                    source,
                }
            }
        });
        let pidfd = match pidfd {
            Ok(p) => p,
            Err(e) => return Err(Box::new((e, Some(options)))),
        };
        let wire = session_options(&options);
        let breakdown = options.tree;
        let (reply, got) = match self.conn.call(
            &Request::Attach { options: wire },
            &[pidfd.as_raw_fd()],
            REQUEST_DEADLINE,
        ) {
            Ok(r) => r,
            Err(e) => return Err(Box::new((e, Some(options)))),
        };
        let Reply::Started { session } = reply else {
            return Err(Box::new((
                DaemonError::Unexpected { what: "attach" },
                Some(options),
            )));
        };
        let (wake, reader) = match session_fds(got, wire.events, "attach") {
            Ok(f) => f,
            Err(e) => return Err(Box::new((e, Some(options)))),
        };
        let copier = match (reader, options.events) {
            (Some(reader), Some(sink)) => match copy_events(reader, sink) {
                Ok(c) => Some(c),
                Err(source) => {
                    let e = DaemonError::Syscall {
                        syscall: "thread",
                        pid,
                        source,
                    };
                    return Err(Box::new((e, None)));
                }
            },
            _ => None,
        };
        Ok(RemoteRun::new(
            self,
            session,
            None,
            pid,
            Some(pidfd),
            wake,
            copier,
            breakdown,
        ))
    }
}

/// What took over from the daemon: the /proc follower, and when and why.
struct Local {
    /// `None` when the follower could not start (`failed` says why): only the root is then
    /// within reach, through its pidfd.
    follower: Option<ProcRun>,
    failed: Option<String>,
    /// Since the run's start.
    at: Duration,
    why: String,
}

/// A session of the daemon. Ends (and the daemon frees its kernel state) when dropped.
///
/// Should the daemon go away, stop answering within a request's deadline, or fail any call,
/// the run goes on alone: a /proc follower of the tree takes over (the root, what is below
/// it and, with [`RemoteRun::set_subreaper`], every child of this process), `kill` and
/// `signal_root` still act, a spawned root's status is still its own, and reports are
/// `precision: approximate`, saying when the daemon went away and why, on top of the last
/// exact figures the daemon gave.
pub struct RemoteRun {
    conn: Arc<Conn>,
    path: PathBuf,
    session: u64,
    /// The root, when this process spawned it.
    child: Option<Child>,
    root_pid: u32,
    pidfd: Option<OwnedFd>,
    /// Readable when the daemon saw the tree end.
    wake: OwnedFd,
    root_status: Option<ExitStatus>,
    copier: Option<JoinHandle<()>>,
    breakdown: bool,
    exited_polls: u32,
    started: Instant,
    timed_out: bool,
    /// This process is a child subreaper whose children are this run's alone.
    subreaper: bool,
    /// The last figures the daemon gave (without the breakdown), and when.
    last: Mutex<Option<Box<(ResourceUsage, Duration)>>>,
    local: OnceLock<Local>,
    /// The caller's next promise (a timeout's kill): no call outlasts it by more than
    /// [`PROMISE_GRACE`].
    promise: Mutex<Option<Instant>>,
}

fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; no waiting.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

fn dup(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Reaps (without waiting) the children of this process other than `root` that have ended.
fn reap_orphans(root: u32) {
    for _ in 0..4096 {
        // SAFETY: a zeroed siginfo_t is valid for waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with WNOWAIT only looks: nothing is reaped here.
        let r = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT | libc::__WALL,
            )
        };
        // SAFETY: si_pid is set by waitid (0 when no child has ended).
        let pid = unsafe { info.si_pid() };
        if r != 0 || pid <= 0 {
            return;
        }
        if pid as u32 == root {
            // The root is reaped by its `Child`: the others are found through /proc.
            reap_listed_orphans(root);
            return;
        }
        // SAFETY: reaps one child of ours that has ended.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) };
    }
}

fn reap_listed_orphans(root: u32) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for pid in crate::proc::walker::parse_children(&text) {
            if pid != root {
                // SAFETY: reaps a child of ours if it has ended.
                unsafe {
                    libc::waitpid(
                        pid as i32,
                        std::ptr::null_mut(),
                        libc::WNOHANG | libc::__WALL,
                    )
                };
            }
        }
    }
}

/// `a` + `b` when both are known; what is known otherwise (a lower bound either way).
fn add_known(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

fn max_known(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The report of a run whose daemon went away: `last`, the last figures the daemon gave
/// (exact, to their time), and `after`, what the /proc follower saw from the switch on (its
/// `usage_before_attach`: what the processes present at the switch had used before).
/// Every figure is a lower bound; nothing is made up.
fn report_after_daemon(
    last: Option<(ResourceUsage, Duration)>,
    after: Option<ResourceUsage>,
    attached: bool,
    first_notes: Vec<String>,
) -> ResourceUsage {
    let had_last = last.is_some();
    let mut u = match &last {
        Some((l, _)) => l.clone(),
        None => ResourceUsage::unmeasured(TrackerKind::Daemon),
    };
    let daemon_notes = std::mem::take(&mut u.precision_notes);
    let mut notes = first_notes;
    if let Some(a) = &after {
        // At the switch: the larger of the daemon's last figures and what the processes
        // present then had used (for a spawned tree); after it, the follower's.
        let before = a
            .usage_before_attach
            .clone()
            .filter(|_| !attached || !had_last);
        let (cpu, user, system) = match &before {
            Some(b) if !attached && b.cpu_time_ns > u.cpu_time_ns => {
                (b.cpu_time_ns, b.cpu_user_ns, b.cpu_system_ns)
            }
            _ if had_last => (u.cpu_time_ns, u.cpu_user_ns, u.cpu_system_ns),
            _ => (0, 0, 0),
        };
        u.cpu_time_ns = cpu + a.cpu_time_ns;
        u.cpu_user_ns = user + a.cpu_user_ns;
        u.cpu_system_ns = system + a.cpu_system_ns;
        u.cpu_time_ms = u.cpu_time_ns / 1_000_000;
        // The processes present at the switch, counted once whoever counted them first.
        let (b_procs, b_threads) = a
            .usage_before_attach
            .as_ref()
            .map_or((0, 0), |b| (b.process_count, b.thread_count));
        let new_procs = a.process_count.saturating_sub(b_procs);
        let new_threads = a.thread_count.saturating_sub(b_threads);
        u.process_count = u.process_count.max(b_procs) + new_procs;
        u.thread_count = u.thread_count.max(b_threads) + new_threads;
        u.peak_process_count = max_known(u.peak_process_count, a.peak_process_count);
        u.live_process_count = a.live_process_count;
        let at_switch = |daemon: Option<u64>, proc: Option<u64>| match attached {
            true => daemon,
            false => max_known(daemon, proc),
        };
        let b = before.as_ref();
        u.disk_bytes_read = add_known(
            at_switch(u.disk_bytes_read, b.and_then(|b| b.disk_bytes_read)),
            a.disk_bytes_read,
        );
        u.disk_bytes_written = add_known(
            at_switch(u.disk_bytes_written, b.and_then(|b| b.disk_bytes_written)),
            a.disk_bytes_written,
        );
        u.disk_cancelled_write_bytes = add_known(
            at_switch(
                u.disk_cancelled_write_bytes,
                b.and_then(|b| b.disk_cancelled_write_bytes),
            ),
            a.disk_cancelled_write_bytes,
        );
        u.io_read_chars = add_known(
            at_switch(u.io_read_chars, b.and_then(|b| b.io_read_chars)),
            a.io_read_chars,
        );
        u.io_write_chars = add_known(
            at_switch(u.io_write_chars, b.and_then(|b| b.io_write_chars)),
            a.io_write_chars,
        );
        u.memory_bytes = a.memory_bytes;
        u.peak_memory_bytes = max_known(u.peak_memory_bytes, a.peak_memory_bytes);
        // The follower's own notes, but for what the first notes say better: how the tree
        // came to it, and (for a spawned root, reaped here) the root's status.
        notes.extend(
            a.precision_notes
                .iter()
                .filter(|n| !n.starts_with("tracker:"))
                .filter(|n| attached || !n.starts_with("exit_code"))
                .map(|n| format!("after the daemon went away: {n}")),
        );
    } else {
        // Nothing is known of the tree now.
        u.memory_bytes = None;
    }
    if u.processes.take().is_some() {
        notes.push(
            "processes: the per-process breakdown was the daemon's, and went away with it"
                .to_string(),
        );
    }
    u.processes_dropped = None;
    if had_last {
        notes.extend(
            daemon_notes
                .into_iter()
                .map(|n| format!("until the daemon went away: {n}")),
        );
    }
    u.precision_notes = notes;
    u.precision = Precision::Approximate;
    // The daemon's last counts, plus what the samples saw after it: no more than the truth.
    u.lower_bounds = crate::proc::fallback::account::sampled_counts();
    u.tracker = TrackerKind::Daemon;
    u.attached = attached;
    u
}

impl RemoteRun {
    #[allow(clippy::too_many_arguments)]
    fn new(
        tracker: &DaemonTracker,
        session: u64,
        child: Option<Child>,
        root_pid: u32,
        pidfd: Option<OwnedFd>,
        wake: OwnedFd,
        copier: Option<JoinHandle<()>>,
        breakdown: bool,
    ) -> RemoteRun {
        RemoteRun {
            conn: tracker.conn.clone(),
            path: tracker.path.clone(),
            session,
            child,
            root_pid,
            pidfd,
            wake,
            root_status: None,
            copier,
            breakdown,
            exited_polls: 0,
            started: Instant::now(),
            timed_out: false,
            subreaper: false,
            last: Mutex::new(None),
            local: OnceLock::new(),
            promise: Mutex::new(None),
        }
    }

    /// The root's pid, as this process's pid namespace sees it.
    pub fn root_pid(&self) -> u32 {
        self.root_pid
    }

    /// Whether the session attached to running processes.
    pub fn is_attached(&self) -> bool {
        self.child.is_none()
    }

    /// The root's exit status, once known.
    pub fn root_status(&self) -> Option<ExitStatus> {
        self.root_status
    }

    /// Says that this process is a child subreaper (`PR_SET_CHILD_SUBREAPER`, set before the
    /// spawn) whose children are this run's processes alone, as in the command line: orphans
    /// of the tree come back to it. The run then reaps them as they end, and, should the
    /// daemon go away, follows every child of this process as part of the tree.
    pub fn set_subreaper(&mut self, yes: bool) {
        self.subreaper = yes && self.child.is_some();
    }

    /// Says when the caller must act next whatever the daemon does (a timeout's SIGTERM,
    /// then its SIGKILL): a call to the daemon then lasts at most until [`PROMISE_GRACE`]
    /// after it, so that a stalled daemon is given up in time for the promise to be kept by
    /// the /proc follower.
    pub fn set_promise(&self, at: Option<Instant>) {
        *lock(&self.promise) = at;
    }

    /// `limit`, shortened to end by the promise's grace.
    fn limit(&self, limit: Duration) -> Duration {
        match *lock(&self.promise) {
            Some(at) => {
                let left = (at + PROMISE_GRACE).saturating_duration_since(Instant::now());
                limit.min(left.max(LEAST_LIMIT))
            }
            None => limit,
        }
    }

    /// Whether the daemon has been given up, and why (the run is followed from /proc).
    pub fn daemon_lost(&self) -> Option<&str> {
        self.local.get().map(|l| l.why.as_str())
    }

    /// Gives the daemon up (once): the /proc follower takes over.
    fn go_local(&self, e: &DaemonError) -> &Local {
        self.local.get_or_init(|| {
            let at = self.started.elapsed();
            let why = match e {
                DaemonError::Gone => "its connection closed".to_string(),
                e => crate::error_chain(e),
            };
            log::warn!(
                "the daemon at {} failed at {} ({why}): the run goes on with the /proc \
                 fallback's view of the tree",
                self.path.display(),
                secs(at)
            );
            let tracker = ProcTracker::new(
                format!("the daemon at {} went away", self.path.display()),
                DEFAULT_INTERVAL,
            );
            let root = self.root_status.is_none().then_some(self.root_pid);
            let (follower, failed) = match tracker.follow(root, self.subreaper) {
                Ok(f) => (Some(f), None),
                Err(e) => {
                    let e = crate::error_chain(&e);
                    log::warn!("the /proc follower could not start: {e}");
                    (None, Some(e))
                }
            };
            Local {
                follower,
                failed,
                at,
                why,
            }
        })
    }

    /// A call to the daemon, unless it has been given up; a failure gives it up.
    fn daemon<T>(&self, call: impl FnOnce(&Conn) -> Result<T, DaemonError>) -> Option<T> {
        if self.local.get().is_some() {
            return None;
        }
        match call(&self.conn) {
            Ok(v) => Some(v),
            Err(e) => {
                self.go_local(&e);
                None
            }
        }
    }

    fn status(&self) -> Option<(bool, Option<i32>)> {
        let request = Request::Status {
            session: self.session,
        };
        match self.daemon(|c| c.call(&request, &[], self.limit(POLL_DEADLINE)))? {
            (
                Reply::Status {
                    finished,
                    root_status,
                },
                _,
            ) => Some((finished, root_status)),
            _ => {
                self.go_local(&DaemonError::Unexpected { what: "status" });
                None
            }
        }
    }

    fn follower(&self) -> Option<&ProcRun> {
        self.local.get().and_then(|l| l.follower.as_ref())
    }

    fn root_exited(&self) -> bool {
        self.pidfd.as_ref().is_some_and(|f| readable(f.as_raw_fd()))
    }

    /// The root's status if it has ended (reaping it when it is this process's child).
    pub fn try_wait_root(&mut self) -> Result<Option<ExitStatus>, DaemonError> {
        if let Some(s) = self.root_status {
            return Ok(Some(s));
        }
        let pid = self.root_pid;
        if self.subreaper {
            reap_orphans(pid);
        }
        if let Some(child) = &mut self.child {
            let status = child.try_wait().map_err(|source| DaemonError::Syscall {
                syscall: "waitid",
                pid,
                source,
            })?;
            self.root_status = status;
            return Ok(status);
        }
        if !self.root_exited() {
            return Ok(None);
        }
        if let Some((_, Some(raw))) = self.status() {
            let status = ExitStatus::from_raw(raw);
            self.root_status = Some(status);
            return Ok(Some(status));
        }
        if let Some(f) = self.follower()
            && let Some(s) = f.root_status()
        {
            self.root_status = Some(s);
            return Ok(Some(s));
        }
        // Exited; the kernel's record may trail by a moment.
        self.exited_polls += 1;
        if self.exited_polls > 200 {
            return Err(DaemonError::NoExitStatus { pid });
        }
        Ok(None)
    }

    /// Whether the root has ended (its status may be unknown for an attached root once the
    /// daemon has gone away).
    pub fn root_ended(&mut self) -> Result<bool, DaemonError> {
        if self.try_wait_root()?.is_some() {
            return Ok(true);
        }
        Ok(self.is_attached() && self.local.get().is_some() && self.root_exited())
    }

    /// Waits for the root to end.
    pub async fn wait_root(&mut self) -> Result<ExitStatus, DaemonError> {
        loop {
            if let Some(s) = self.try_wait_root()? {
                return Ok(s);
            }
            if self.is_attached() && self.local.get().is_some() && self.root_exited() {
                return Err(DaemonError::NoExitStatus { pid: self.root_pid });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// True once every process of the tree has ended.
    pub fn is_finished(&self) -> Result<bool, DaemonError> {
        if self.subreaper {
            reap_orphans(self.root_pid);
        }
        if let Some((finished, _)) = self.status() {
            return Ok(finished);
        }
        match self.follower() {
            Some(f) => Ok(f.is_finished()),
            // Only the root is within reach.
            None => Ok(self.root_status.is_some() || self.root_exited()),
        }
    }

    /// Waits until every process of the tree has ended.
    pub async fn wait_finished(&self) -> Result<(), DaemonError> {
        let afd = dup(self.wake.as_raw_fd()).and_then(watch).ok();
        loop {
            if self.is_finished()? {
                return Ok(());
            }
            match &afd {
                Some(afd) if self.local.get().is_none() => {
                    if let Ok(Ok(mut g)) = tokio::time::timeout(POLL, afd.readable()).await {
                        self.clear_wake();
                        g.clear_ready();
                    }
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    fn fetch_usage(&self, breakdown: bool) -> Result<ResourceUsage, DaemonError> {
        let breakdown = breakdown && self.breakdown;
        let request = Request::Usage {
            session: self.session,
            breakdown,
        };
        let limit = if breakdown {
            REPORT_DEADLINE
        } else {
            POLL_DEADLINE
        };
        match self.daemon(|c| c.call(&request, &[], self.limit(limit))) {
            Some((Reply::Usage { usage }, _)) => {
                let mut usage = *usage;
                usage.tracker = TrackerKind::Daemon;
                if let Some(s) = self.root_status {
                    // This process reaped its own root: its status is the one to report.
                    usage.exit_code = s.code();
                    usage.signal = s.signal();
                }
                let mut kept = usage.clone();
                kept.processes = None;
                *lock(&self.last) = Some(Box::new((kept, self.started.elapsed())));
                return Ok(usage);
            }
            Some(_) => {
                self.go_local(&DaemonError::Unexpected { what: "usage" });
            }
            None => {}
        }
        Ok(self.local_usage())
    }

    /// The report once the daemon has been given up.
    fn local_usage(&self) -> ResourceUsage {
        let local = self.local.get().expect("the daemon was given up");
        let last = lock(&self.last).as_deref().cloned();
        let mut first = vec![format!(
            "tracker: the daemon at {} went away at {} ({}); what followed is the /proc \
             fallback's view of the tree this process can see{}: every counter is a lower \
             bound",
            self.path.display(),
            secs(local.at),
            local.why,
            match (self.is_attached(), self.subreaper) {
                (true, _) => " (the root and what /proc shows below it)",
                (false, true) => " (its children: the root and every orphan of the tree)",
                (false, false) => " (the root and what /proc shows below it)",
            }
        )];
        first.push(match &last {
            Some((_, t)) => format!(
                "cpu_time_ns, process_count, thread_count, disk and I/O counters: the daemon's \
                 last exact figures (at {}), then what /proc showed of the processes alive \
                 at {} and after; what ran in between and ended unseen is missing",
                secs(*t),
                secs(local.at)
            ),
            None => format!(
                "cpu_time_ns, process_count, thread_count, disk and I/O counters: no figures \
                 came from the daemon before it went away: what /proc showed of the \
                 processes alive at {} (their use since they started) and after; what ended \
                 before is missing",
                secs(local.at)
            ),
        });
        if last.is_some() {
            first.push(
                "network_bytes_sent, network_bytes_received, disk_devices, \
                 max_process_rss_bytes, lost_events: as of the daemon's last figures"
                    .to_string(),
            );
        }
        if self.copier.is_some() {
            first.push(format!(
                "events: the event stream was the daemon's, and ended when it went away (at {})",
                secs(local.at)
            ));
        }
        if let Some(f) = &local.failed {
            first.push(format!(
                "tracker: the /proc follower could not start ({f}): only the root was within \
                 reach"
            ));
        }
        let after = self.follower().and_then(|f| match f.usage() {
            Ok(u) => Some(u),
            Err(e) => {
                log::warn!("the /proc follower failed: {}", crate::error_chain(&e));
                None
            }
        });
        let mut u = report_after_daemon(last, after, self.is_attached(), first);
        u.wall_time_ms = self.started.elapsed().as_millis() as u64;
        u.timed_out = self.timed_out;
        let status = self
            .root_status
            .or_else(|| self.follower().and_then(|f| f.root_status()));
        if let Some(s) = status {
            u.exit_code = s.code();
            u.signal = s.signal();
        }
        u
    }

    /// What the tree has used so far (with the breakdown, if one was asked for).
    pub fn usage(&self) -> Result<ResourceUsage, DaemonError> {
        self.fetch_usage(true)
    }

    /// [`RemoteRun::usage`] without the breakdown.
    pub fn usage_totals(&self) -> Result<ResourceUsage, DaemonError> {
        self.fetch_usage(false)
    }

    /// Sends `signal` to every live process of the tree (those this user may signal).
    pub fn kill(&self, signal: i32) -> Result<usize, DaemonError> {
        let request = Request::Kill {
            session: self.session,
            signal,
        };
        match self.daemon(|c| c.call(&request, &[], self.limit(POLL_DEADLINE))) {
            Some((Reply::Killed { signalled }, _)) => return Ok(signalled as usize),
            Some(_) => {
                self.go_local(&DaemonError::Unexpected { what: "kill" });
            }
            None => {}
        }
        let mut signalled = match self.follower() {
            Some(f) => f.kill(signal).map_err(DaemonError::Follower)?,
            None => 0,
        };
        if signalled == 0 && self.root_status.is_none() && !self.root_exited() {
            self.signal_root(signal)?;
            signalled = 1;
        }
        Ok(signalled)
    }

    /// Sends `signal` to the root, if it has not ended.
    pub fn signal_root(&self, signal: i32) -> Result<(), DaemonError> {
        if self.root_status.is_some() {
            return Ok(());
        }
        let Some(fd) = &self.pidfd else {
            return Ok(());
        };
        match pidfd_send_signal(fd, signal) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(source) => Err(DaemonError::Syscall {
                syscall: "pidfd_send_signal",
                pid: self.root_pid,
                source,
            }),
        }
    }

    /// Marks the session as ended by a timeout.
    pub fn set_timed_out(&mut self) {
        self.timed_out = true;
        let request = Request::TimedOut {
            session: self.session,
        };
        let _ = self.daemon(|c| c.call(&request, &[], self.limit(POLL_DEADLINE)));
    }

    /// Descriptors that become readable when something may have changed: the root's pidfd
    /// and the daemon's wake-up eventfd (the last; [`RemoteRun::clear_wake`] empties it).
    pub fn wake_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        let mut out = Vec::new();
        if let Some(fd) = &self.pidfd {
            out.push(dup(fd.as_raw_fd())?);
        }
        out.push(dup(self.wake.as_raw_fd())?);
        Ok(out)
    }

    /// Empties the wake-up eventfd.
    pub fn clear_wake(&self) {
        let mut v = 0u64;
        // SAFETY: an 8-byte read from a non-blocking eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for RemoteRun {
    fn drop(&mut self) {
        // The daemon frees the session and closes the event pipe: the copier then ends.
        let ended = self.local.get().is_none()
            && !self.conn.is_dead()
            && self
                .conn
                .call(
                    &Request::End {
                        session: self.session,
                    },
                    &[],
                    POLL_DEADLINE,
                )
                .is_ok();
        if let Some(c) = self.copier.take() {
            // A daemon that died closed the pipe with its death; one that stalls may never:
            // the copier is then left behind rather than waited for without end.
            let until = Instant::now()
                + if ended {
                    REQUEST_DEADLINE
                } else {
                    INTERRUPT_GRACE
                };
            while !c.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if c.is_finished() {
                let _ = c.join();
            }
        }
        if let Some(child) = &mut self.child
            && self.root_status.is_none()
        {
            let _ = child.try_wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::UsageBeforeAttach;

    fn daemon_figures() -> ResourceUsage {
        let mut u = ResourceUsage::unmeasured(TrackerKind::Daemon);
        u.precision = Precision::Exact;
        u.cpu_time_ns = 500;
        u.cpu_user_ns = 300;
        u.cpu_system_ns = 200;
        u.process_count = 4;
        u.thread_count = 5;
        u.disk_bytes_read = Some(10);
        u.network_bytes_sent = Some(7);
        u.precision_notes = vec!["daemon note".into()];
        u
    }

    fn follower_figures(before_cpu: u64) -> ResourceUsage {
        let mut a = ResourceUsage::unmeasured(TrackerKind::Proc);
        a.cpu_time_ns = 100;
        a.cpu_user_ns = 60;
        a.cpu_system_ns = 40;
        a.process_count = 3;
        a.thread_count = 3;
        a.live_process_count = 2;
        a.disk_bytes_read = Some(1);
        a.memory_bytes = Some(4096);
        a.precision_notes = vec!["tracker: attach".into(), "sampled".into()];
        a.usage_before_attach = Some(UsageBeforeAttach {
            process_count: 2,
            thread_count: 2,
            cpu_time_ns: before_cpu,
            cpu_user_ns: before_cpu / 2,
            cpu_system_ns: before_cpu / 2,
            disk_bytes_read: Some(3),
            disk_bytes_written: None,
            disk_cancelled_write_bytes: None,
            io_read_chars: None,
            io_write_chars: None,
        });
        a
    }

    #[test]
    fn the_report_after_the_daemon_keeps_its_last_figures_and_adds_the_followers() {
        let u = report_after_daemon(
            Some((daemon_figures(), Duration::from_secs(1))),
            Some(follower_figures(50)),
            false,
            vec!["first".into()],
        );
        assert_eq!(u.precision, Precision::Approximate);
        assert_eq!(u.tracker, TrackerKind::Daemon);
        assert!(daemon_figures().lower_bounds.is_empty());
        assert_eq!(
            u.lower_bounds,
            ["process_count", "thread_count", "peak_process_count"]
        );
        // The daemon's 500 at the switch (more than the 50 /proc saw), then 100 after.
        assert_eq!(u.cpu_time_ns, 600);
        assert_eq!(u.cpu_user_ns + u.cpu_system_ns, 600);
        // 4 known to the daemon, 1 new after the switch.
        assert_eq!(u.process_count, 5);
        assert_eq!(u.live_process_count, 2);
        assert_eq!(u.disk_bytes_read, Some(11));
        assert_eq!(u.network_bytes_sent, Some(7));
        assert_eq!(u.precision_notes[0], "first");
        assert!(u.precision_notes.iter().any(|n| n.ends_with("sampled")));
        assert!(
            !u.precision_notes
                .iter()
                .any(|n| n.contains("tracker: attach"))
        );
        assert!(u.precision_notes.iter().any(|n| n.ends_with("daemon note")));
    }

    #[test]
    fn without_the_daemons_figures_the_report_is_the_followers_and_never_made_up() {
        let u = report_after_daemon(None, Some(follower_figures(900)), false, vec![]);
        assert_eq!(u.cpu_time_ns, 1000);
        assert_eq!(u.process_count, 3);
        assert_eq!(u.disk_bytes_read, Some(4));
        assert_eq!(u.network_bytes_sent, None);
        assert_eq!(u.disk_bytes_written, None);
        // Attached: what the daemon counted, and one new process since the switch.
        let u = report_after_daemon(
            Some((daemon_figures(), Duration::from_secs(1))),
            Some(follower_figures(50)),
            true,
            vec![],
        );
        assert_eq!(u.process_count, 5);
        assert_eq!(u.cpu_time_ns, 600);
        let nothing = report_after_daemon(None, None, false, vec![]);
        assert_eq!(nothing.memory_bytes, None);
        assert_eq!(nothing.precision, Precision::Approximate);
    }
}
