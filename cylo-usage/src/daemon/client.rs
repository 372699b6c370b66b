//! The daemon's client: [`DaemonTracker`], with the surface of the in-process tracker; its
//! runs are [`RemoteRun`]s (`remote_run.rs`), its connection a [`Conn`] (`conn.rs`), which
//! bounds every wait. A spawned root is still this process's own child, with its stdio and
//! environment: the daemon only registers the spawning thread in the kernel.
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::DaemonError;
use super::conn::{Clock, Conn, HANDSHAKE_DEADLINE, Interrupt, REQUEST_DEADLINE, connect};
use super::protocol::{self, Reply, Request, SessionOptions};
use super::remote_run::RemoteRun;
use crate::session::breakdown::EventSink;
use crate::session::run::RunOptions;
use crate::sys::pidfd_open;

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
    /// [`super::INTERRUPT_GRACE`] once `interrupt` is readable.
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
        budgets: options.budgets,
    }
}

/// A spawn or attach that failed: why, and the options back when the run may be started
/// another way: not when the command was created, nor when the daemon refused a budget
/// (see [`another_way`]).
pub(crate) type NotStarted = Box<(DaemonError, Option<RunOptions>)>;

/// `options` back, when a spawn or attach the daemon refused with `e` may be started another
/// way. Not for a budget it refused (one never met, or one its kernel cannot enforce): the
/// kernel here is the same, and the /proc fallback cannot enforce budgets exactly, so the
/// run would go unbounded; unless the budgets may be enforced at best (`best-effort`).
fn another_way(e: &DaemonError, options: RunOptions) -> Option<RunOptions> {
    match e {
        DaemonError::Refused {
            kind: protocol::ErrorKind::Budget,
            ..
        } if options.budget_enforcement == crate::usage::Enforcement::Exact => None,
        _ => Some(options),
    }
}

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
                pid: me as libc::pid_t,
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
            Err(e) => {
                let back = another_way(&e, options);
                return Err(Box::new((e, back)));
            }
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
                        pid: me as libc::pid_t,
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
            self.conn.clone(),
            self.path.clone(),
            session,
            Some(child),
            root_pid,
            pidfd,
            wake,
            copier,
            breakdown,
            wire.budgets,
        );
        if let Some(e) = lost {
            run.go_local(&e);
        }
        Ok(run)
    }

    /// Follows running process `pid` (as this process's pid namespace sees it) and its
    /// descendants, through the daemon.
    pub fn attach(&self, pid: libc::pid_t) -> Result<RemoteRun, DaemonError> {
        self.attach_with(pid, RunOptions::default())
    }

    /// [`DaemonTracker::attach`] with a breakdown and/or an event stream.
    pub fn attach_with(
        &self,
        pid: libc::pid_t,
        options: RunOptions,
    ) -> Result<RemoteRun, DaemonError> {
        self.try_attach(pid, options).map_err(|f| f.0)
    }

    /// [`DaemonTracker::attach_with`]; a failure gives the options back.
    pub(crate) fn try_attach(
        &self,
        pid: libc::pid_t,
        options: RunOptions,
    ) -> Result<RemoteRun, NotStarted> {
        let Some(pid) = crate::sys::pid_u32(pid) else {
            let e = DaemonError::Refused {
                kind: protocol::ErrorKind::NoSuchProcess,
                message: format!("no process {pid}"),
            };
            return Err(Box::new((e, Some(options))));
        };
        let pidfd = pidfd_open(pid).map_err(|source| {
            if source.raw_os_error() == Some(libc::ESRCH) {
                DaemonError::Refused {
                    kind: protocol::ErrorKind::NoSuchProcess,
                    message: format!("no process {pid}"),
                }
            } else {
                DaemonError::Syscall {
                    syscall: "pidfd_open",
                    pid: pid as libc::pid_t,
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
            Err(e) => {
                let back = another_way(&e, options);
                return Err(Box::new((e, back)));
            }
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
                        pid: pid as libc::pid_t,
                        source,
                    };
                    return Err(Box::new((e, None)));
                }
            },
            _ => None,
        };
        Ok(RemoteRun::new(
            self.conn.clone(),
            self.path.clone(),
            session,
            None,
            pid,
            Some(pidfd),
            wake,
            copier,
            breakdown,
            wire.budgets,
        ))
    }
}
