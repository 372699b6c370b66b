//! The daemon's client: [`DaemonTracker`] and its runs ([`RemoteRun`]), with the surface of
//! the in-process tracker. A spawned root is still this process's own child, with its stdio
//! and environment: the daemon only registers the spawning thread in the kernel.
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::DaemonError;
use super::protocol::{self, MAX_REPLY, Reply, Request, SessionOptions};
use crate::run::{RunOptions, pidfd_open, pidfd_send_signal, watch};
use crate::tree::EventSink;
use crate::usage::{ResourceUsage, TrackerKind};

/// How long the daemon may take to answer a request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a waiting run asks when no wake-up comes.
const POLL: Duration = Duration::from_millis(100);

/// One connection to the daemon; its sessions end when it closes.
struct Conn {
    sock: Mutex<UnixStream>,
}

impl Conn {
    /// Sends `request` with `fds` and reads the reply (an error reply becomes
    /// [`DaemonError::Refused`]).
    fn call(&self, request: &Request, fds: &[RawFd]) -> Result<(Reply, Vec<OwnedFd>), DaemonError> {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        protocol::send(&*sock, request, fds)?;
        let (body, fds) = protocol::recv_frame(sock.as_raw_fd(), MAX_REPLY)?;
        let reply: Reply = serde_json::from_slice(&body)
            .map_err(|_| DaemonError::Unexpected { what: "a request" })?;
        match reply {
            Reply::Error { kind, message } => Err(DaemonError::Refused { kind, message }),
            r => Ok((r, fds)),
        }
    }
}

/// A connection to `cylo-usage serve`. Cheap to clone; every clone shares the connection.
#[derive(Clone)]
pub struct DaemonTracker {
    conn: Arc<Conn>,
    path: PathBuf,
}

impl crate::tracker::Tracker {
    /// Connects to the daemon listening at `path` (see [`super::socket_path`]).
    pub fn connect(path: &Path) -> Result<DaemonTracker, DaemonError> {
        let sock = UnixStream::connect(path).map_err(|source| DaemonError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        // A daemon that stops answering is an error after a while, never a hang (a socket
        // activated daemon loads its programs before its first answer: seconds at most).
        let set = |s: &UnixStream| {
            s.set_read_timeout(Some(REPLY_TIMEOUT))?;
            s.set_write_timeout(Some(REPLY_TIMEOUT))
        };
        set(&sock).map_err(|source| DaemonError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let conn = Arc::new(Conn {
            sock: Mutex::new(sock),
        });
        match conn.call(
            &Request::Hello {
                version: protocol::VERSION,
            },
            &[],
        )? {
            (Reply::Hello { .. }, _) => Ok(DaemonTracker {
                conn,
                path: path.to_path_buf(),
            }),
            _ => Err(DaemonError::Unexpected { what: "hello" }),
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

/// A pipe whose write end goes to the daemon and whose read end a thread copies into the
/// caller's event sink.
fn event_pipe(sink: EventSink) -> std::io::Result<(OwnedFd, JoinHandle<()>)> {
    let (reader, writer) = std::io::pipe()?;
    let copier = std::thread::Builder::new()
        .name("daemon-events".to_string())
        .spawn(move || {
            let mut reader = reader;
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
        })?;
    Ok((OwnedFd::from(writer), copier))
}

fn session_options(options: &RunOptions) -> SessionOptions {
    SessionOptions {
        tree: options.tree,
        events: options.events.is_some(),
        tree_limit: options.tree_limit as u64,
    }
}

impl DaemonTracker {
    /// The socket this tracker is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The daemon's kernel release, its counters and how each is measured, and its kernel
    /// layout.
    pub fn features(&self) -> Result<(String, Vec<crate::features::Feature>, String), DaemonError> {
        match self.conn.call(&Request::Features, &[])?.0 {
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
    pub fn spawn_with(
        &self,
        command: &mut Command,
        options: RunOptions,
    ) -> Result<RemoteRun, DaemonError> {
        let me = std::process::id();
        let syscall = |syscall| {
            move |source| DaemonError::Syscall {
                syscall,
                pid: me,
                source,
            }
        };
        // This thread creates the root: the daemon registers it in the kernel.
        let dir = open_dir("/proc/thread-self").map_err(syscall("open(/proc/thread-self)"))?;
        let wire = session_options(&options);
        let breakdown = options.tree;
        let (pipe, copier) = match options.events {
            Some(sink) => {
                let (w, c) = event_pipe(sink).map_err(syscall("pipe"))?;
                (Some(w), Some(c))
            }
            None => (None, None),
        };
        let mut fds = vec![dir.as_raw_fd()];
        fds.extend(pipe.as_ref().map(|p| p.as_raw_fd()));
        let (reply, mut got) = self.conn.call(&Request::Spawn { options: wire }, &fds)?;
        drop(pipe);
        drop(dir);
        let Reply::Prepared { session } = reply else {
            return Err(DaemonError::Unexpected { what: "spawn" });
        };
        let wake = got.pop().ok_or(DaemonError::Unexpected { what: "spawn" })?;
        let spawned = command.spawn();
        let confirmed = self.conn.call(
            &Request::Spawned {
                session,
                created: spawned.is_ok(),
            },
            &[],
        );
        let mut child = spawned.map_err(|source| DaemonError::Spawn {
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        match confirmed {
            Ok(_) => {}
            // The daemon died just now: the child is ours and runs; every later request says
            // the daemon went away, and the caller still gets the child's own exit status.
            Err(DaemonError::Gone) => {}
            Err(e) => {
                // Refused (the root did not join): it must not run unmeasured.
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        let root_pid = child.id();
        let pidfd = pidfd_open(root_pid).ok();
        Ok(RemoteRun {
            conn: self.conn.clone(),
            session,
            child: Some(child),
            root_pid,
            pidfd,
            wake,
            root_status: None,
            copier,
            breakdown,
            exited_polls: 0,
        })
    }

    /// Follows running process `pid` (as this process's pid namespace sees it) and its
    /// descendants, through the daemon.
    pub fn attach(&self, pid: u32) -> Result<RemoteRun, DaemonError> {
        self.attach_with(pid, RunOptions::default())
    }

    /// [`DaemonTracker::attach`] with a breakdown and/or an event stream.
    pub fn attach_with(&self, pid: u32, options: RunOptions) -> Result<RemoteRun, DaemonError> {
        let pidfd = pidfd_open(pid).map_err(|e| match e {
            crate::SessionError::NoSuchProcess { .. } => DaemonError::Refused {
                kind: protocol::ErrorKind::NoSuchProcess,
                message: format!("no process {pid}"),
            },
            _ => DaemonError::Syscall {
                syscall: "pidfd_open",
                pid,
                source: std::io::Error::last_os_error(),
            },
        })?;
        let wire = session_options(&options);
        let breakdown = options.tree;
        let (pipe, copier) = match options.events {
            Some(sink) => {
                let (w, c) = event_pipe(sink).map_err(|source| DaemonError::Syscall {
                    syscall: "pipe",
                    pid,
                    source,
                })?;
                (Some(w), Some(c))
            }
            None => (None, None),
        };
        let mut fds = vec![pidfd.as_raw_fd()];
        fds.extend(pipe.as_ref().map(|p| p.as_raw_fd()));
        let (reply, mut got) = self.conn.call(&Request::Attach { options: wire }, &fds)?;
        drop(pipe);
        let Reply::Started { session } = reply else {
            return Err(DaemonError::Unexpected { what: "attach" });
        };
        let wake = got
            .pop()
            .ok_or(DaemonError::Unexpected { what: "attach" })?;
        Ok(RemoteRun {
            conn: self.conn.clone(),
            session,
            child: None,
            root_pid: pid,
            pidfd: Some(pidfd),
            wake,
            root_status: None,
            copier,
            breakdown,
            exited_polls: 0,
        })
    }
}

/// A session of the daemon. Ends (and the daemon frees its kernel state) when dropped.
pub struct RemoteRun {
    conn: Arc<Conn>,
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

impl RemoteRun {
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

    fn status(&self) -> Result<(bool, Option<i32>), DaemonError> {
        match self.conn.call(
            &Request::Status {
                session: self.session,
            },
            &[],
        )? {
            (
                Reply::Status {
                    finished,
                    root_status,
                },
                _,
            ) => Ok((finished, root_status)),
            _ => Err(DaemonError::Unexpected { what: "status" }),
        }
    }

    /// The root's status if it has ended (reaping it when it is this process's child).
    pub fn try_wait_root(&mut self) -> Result<Option<ExitStatus>, DaemonError> {
        if let Some(s) = self.root_status {
            return Ok(Some(s));
        }
        let pid = self.root_pid;
        if let Some(child) = &mut self.child {
            let status = child.try_wait().map_err(|source| DaemonError::Syscall {
                syscall: "waitid",
                pid,
                source,
            })?;
            self.root_status = status;
            return Ok(status);
        }
        let exited = self.pidfd.as_ref().is_some_and(|f| readable(f.as_raw_fd()));
        if !exited {
            return Ok(None);
        }
        if let (_, Some(raw)) = self.status()? {
            let status = ExitStatus::from_raw(raw);
            self.root_status = Some(status);
            return Ok(Some(status));
        }
        // Exited; the kernel's record may trail by a moment.
        self.exited_polls += 1;
        if self.exited_polls > 200 {
            return Err(DaemonError::NoExitStatus { pid });
        }
        Ok(None)
    }

    /// Waits for the root to end.
    pub async fn wait_root(&mut self) -> Result<ExitStatus, DaemonError> {
        loop {
            if let Some(s) = self.try_wait_root()? {
                return Ok(s);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// True once every process of the tree has ended.
    pub fn is_finished(&self) -> Result<bool, DaemonError> {
        Ok(self.status()?.0)
    }

    /// Waits until every process of the tree has ended.
    pub async fn wait_finished(&self) -> Result<(), DaemonError> {
        let afd = dup(self.wake.as_raw_fd()).and_then(watch).ok();
        loop {
            if self.is_finished()? {
                return Ok(());
            }
            match &afd {
                Some(afd) => {
                    if let Ok(Ok(mut g)) = tokio::time::timeout(POLL, afd.readable()).await {
                        self.clear_wake();
                        g.clear_ready();
                    }
                }
                None => tokio::time::sleep(POLL).await,
            }
        }
    }

    fn fetch_usage(&self, breakdown: bool) -> Result<ResourceUsage, DaemonError> {
        let (reply, _) = self.conn.call(
            &Request::Usage {
                session: self.session,
                breakdown: breakdown && self.breakdown,
            },
            &[],
        )?;
        let Reply::Usage { usage } = reply else {
            return Err(DaemonError::Unexpected { what: "usage" });
        };
        let mut usage = *usage;
        usage.tracker = TrackerKind::Daemon;
        if let Some(s) = self.root_status {
            // This process reaped its own root: its status is the one to report.
            usage.exit_code = s.code();
            usage.signal = s.signal();
        }
        Ok(usage)
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
        match self.conn.call(
            &Request::Kill {
                session: self.session,
                signal,
            },
            &[],
        )? {
            (Reply::Killed { signalled }, _) => Ok(signalled as usize),
            _ => Err(DaemonError::Unexpected { what: "kill" }),
        }
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
        let _ = self.conn.call(
            &Request::TimedOut {
                session: self.session,
            },
            &[],
        );
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
        let _ = self.conn.call(
            &Request::End {
                session: self.session,
            },
            &[],
        );
        if let Some(c) = self.copier.take() {
            let _ = c.join();
        }
        if let Some(child) = &mut self.child
            && self.root_status.is_none()
        {
            let _ = child.try_wait();
        }
    }
}
