//! The /proc fallback: what cylo-usage measures when its eBPF programs cannot be loaded in
//! this process (no `CAP_BPF`/`CAP_PERFMON`, no kernel BTF, a verifier that refuses them, no
//! BPF ring buffer). It is not a poller:
//!
//! - **`run`**: the command's parent is a helper process, the reaper (see `reaper.rs`), that
//!   is a child subreaper: every orphan of the tree, double-forked daemons included, comes
//!   back to it, and it `wait()`s for each. `wait4()`'s `rusage` of a reaped process holds its
//!   CPU time and that of every descendant it waited for, to the µs, so the sum over what the
//!   reaper reaps is the tree's CPU time, exact but for children reaped automatically (a
//!   parent that ignores `SIGCHLD`). The same goes for block I/O (`ru_inblock`,
//!   `ru_oublock`). The tree is over when the reaper has nothing left to wait for.
//! - **Samples**: a thread of the tracker reads the tree from `/proc` every
//!   [`DEFAULT_INTERVAL`] (or [`crate::OpenOptions::sample_interval`]) for what `rusage`
//!   cannot say: how many processes and threads (fleeting ones are missed), live RSS and its
//!   peak, and, for a snapshot while the tree runs, the live processes' CPU and I/O.
//! - **`attach`**: the tree is not the tracker's child, so nothing is reaped: everything is
//!   sampled, and a daemon that leaves the tree between two samples is lost.
//!
//! Reports say `tracker: "proc"`, `precision: "approximate"`, and name every approximate
//! field in `precision_notes`; what cannot be known is `null`.
pub(crate) mod account;
pub(crate) mod reaper;

use std::collections::HashSet;
use std::io::Read as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::proc::walker::{self, Detail, Node, ProcFs, Read, Seed};
use crate::session::run::{RunOptions, SessionError};
use crate::sys::lock;
use crate::sys::procfs::{self, ProcError};
use crate::sys::{monotonic_ns, pidfd_open, pidfd_send_signal};
use crate::usage::ResourceUsage;

use account::{Account, AttachAccount, RootEnd, Units};
use reaper::{DONE, FAILED, REAPED, RECORD_SIZE, Record, STARTED};

/// How often the fallback samples `/proc` by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);

/// Rounds of signalling the tree before a kill stops looking for newcomers.
const KILL_ROUNDS: usize = 1000;

/// Why a fallback session failed.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    /// The command could not be started under its reaper (`Command::spawn` failed).
    #[error("cannot run {program}")]
    Spawn {
        /// The command's program, as given.
        program: String,
        /// The error `spawn` returned.
        #[source]
        source: std::io::Error,
    },
    /// A system call the session needs, or starting its sampling thread, failed.
    #[error("{what} failed")]
    Io {
        /// What failed, e.g. `pipe2` or `pidfd_send_signal`.
        what: &'static str,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
    /// The reaper process ended before it reported that the root had started.
    #[error("the reaper process ended before it reported the command's start")]
    ReaperLost,
    /// An option needs the eBPF tracker, which is not in use.
    #[error("{what} needs the eBPF tracker; the /proc fallback is in use because {reason}")]
    Unsupported {
        /// The option: a per-process breakdown (`--tree`) or the event stream (`--events`).
        what: &'static str,
        /// Why the eBPF tracker is not in use.
        reason: String,
    },
    /// The process to attach to is another user's: without the eBPF tracker, its I/O
    /// accounting (and its tree's) is out of reach.
    #[error(
        "cannot attach to process {pid}: it belongs to another user (uid {owner}); one may \
         attach only to one's own processes (root may attach to any)"
    )]
    NotOwnProcess {
        /// The process to attach to.
        pid: libc::pid_t,
        /// Its real, effective or saved uid that differs from this process's real uid.
        owner: u32,
    },
    /// The process to attach to cannot be followed (no such process, a kernel thread, a
    /// zombie, cylo-usage itself).
    #[error(transparent)]
    Target(#[from] SessionError),
    /// An attach could not read or parse its target's `/proc/PID/io`, for a reason other
    /// than the process being another user's.
    #[error(transparent)]
    Proc(#[from] ProcError),
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> FallbackError {
    move |source| FallbackError::Io { what, source }
}

/// The /proc fallback tracker. Cheap to clone; it holds no kernel state.
#[derive(Clone, Debug)]
pub struct ProcTracker {
    reason: Arc<str>,
    interval: Duration,
}

impl ProcTracker {
    /// A fallback tracker; `reason` says why the eBPF tracker is not used (it opens every
    /// report's `precision_notes`).
    pub fn new(reason: impl Into<String>, interval: Duration) -> ProcTracker {
        let interval = if interval.is_zero() {
            DEFAULT_INTERVAL
        } else {
            interval
        };
        ProcTracker {
            reason: reason.into().into(),
            interval,
        }
    }

    /// Why the eBPF tracker is not used.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// How often `/proc` is sampled.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn units(&self) -> Units {
        Units {
            tick_ns: 1_000_000_000 / procfs::clock_ticks_per_second().max(1),
            page_size: procfs::page_size(),
            interval: self.interval,
        }
    }

    fn check_options(&self, options: &RunOptions) -> Result<(), FallbackError> {
        let what = if options.tree {
            "a per-process breakdown (--tree)"
        } else if options.events.is_some() {
            "the event stream (--events)"
        } else {
            return Ok(());
        };
        Err(FallbackError::Unsupported {
            what,
            reason: self.reason.to_string(),
        })
    }

    /// Starts `command` under a reaper (see the module documentation). A `pre_exec` hook is
    /// added to `command`; it acts only during this call. The command's `pre_exec` hooks,
    /// process group and session settings apply to the reaper (the root's parent), and the
    /// root inherits them: with `CommandExt::process_group`, the group's id is the reaper's pid.
    pub fn spawn(&self, command: &mut Command) -> Result<ProcRun, FallbackError> {
        self.spawn_with(command, RunOptions::default())
    }

    /// [`ProcTracker::spawn`]; a breakdown or an event stream in `options` is refused.
    pub fn spawn_with(
        &self,
        command: &mut Command,
        options: RunOptions,
    ) -> Result<ProcRun, FallbackError> {
        self.check_options(&options)?;
        let (read_end, write_end) = pipe().map_err(io_err("pipe2"))?;
        // Room for 16,384 records: a tracker slow to read never holds the reaper up.
        // SAFETY: fcntl on our own pipe; failure only leaves the default size.
        unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        let armed = Arc::new(AtomicBool::new(true));
        reaper::install(command, write_end.as_raw_fd(), armed.clone());
        let started_ns = monotonic_ns();
        let spawned = command.spawn();
        armed.store(false, Ordering::Relaxed);
        drop(write_end);
        let mut reaper_child = spawned.map_err(|source| FallbackError::Spawn {
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let mut pipe = Pipe::new(read_end);
        let first = match pipe.read_blocking() {
            Some(r) if r.kind == STARTED => r,
            _ => {
                let _ = reaper_child.kill();
                let _ = reaper_child.wait();
                return Err(FallbackError::ReaperLost);
            }
        };
        pipe.set_nonblocking()
            .map_err(io_err("fcntl(O_NONBLOCK)"))?;
        let root_pid = first.pid as u32;
        let root_pidfd = pidfd_open(root_pid).ok().filter(|_| {
            // The pidfd is the root only if the process behind it has the root's start time.
            walker::start_ticks(&ProcFs::host(), root_pid) == Some(first.start_ticks)
        });
        let reaper_pid = reaper_child.id();
        let reaper_start = walker::start_ticks(&ProcFs::host(), reaper_pid).unwrap_or(0);
        let mode = Mode::Spawned {
            acc: Account::default(),
            pipe,
            reaper: Seed {
                pid: reaper_pid,
                start_ticks: Some(reaper_start),
            },
            root: (root_pid, first.start_ticks),
        };
        let run = ProcRun::start(
            self,
            mode,
            root_pid,
            root_pidfd,
            started_ns,
            Some(reaper_child),
        )?;
        Ok(run)
    }

    /// Follows process `pid` (one of the caller's own: another user's is a permission error)
    /// and its descendants by sampling `/proc`. Figures are from now on;
    /// `usage_before_attach` has what the processes present now had used before.
    pub fn attach(&self, pid: libc::pid_t) -> Result<ProcRun, FallbackError> {
        self.attach_with(pid, RunOptions::default())
    }

    /// [`ProcTracker::attach`]; a breakdown or an event stream in `options` is refused.
    pub fn attach_with(
        &self,
        pid: libc::pid_t,
        options: RunOptions,
    ) -> Result<ProcRun, FallbackError> {
        let Some(pid) = crate::sys::pid_u32(pid) else {
            return Err(SessionError::NoSuchProcess { pid }.into());
        };
        self.check_options(&options)?;
        let target = crate::session::attach::check_target(pid)?;
        let fs = ProcFs::host();
        // Its I/O accounting is readable only for one's own processes: say so now.
        match fs.io(pid) {
            Ok(Read::Gone) => {
                return Err(SessionError::NoSuchProcess {
                    pid: pid as libc::pid_t,
                }
                .into());
            }
            Ok(Read::Got(_)) => {}
            Err(e) => return Err(not_own_process(pid).unwrap_or(e.into())),
        }
        let pidfd = pidfd_open(pid).ok();
        let mode = Mode::Attached {
            acc: AttachAccount::default(),
            root: Some(Seed {
                pid,
                start_ticks: Some(target.start_ticks),
            }),
            own_children: false,
        };
        let started_ns = monotonic_ns();
        let run = ProcRun::start(self, mode, pid, pidfd, started_ns, None)?;
        // The first sample is the attach: it must have found the root.
        let state = run.shared.lock();
        if let Mode::Attached { acc, .. } = &state.mode
            && acc.known().is_empty()
            && state.finished
        {
            drop(state);
            return Err(SessionError::NoSuchProcess {
                pid: pid as libc::pid_t,
            }
            .into());
        }
        drop(state);
        Ok(run)
    }
}

impl ProcTracker {
    /// Follows, from now on, a tree that another tracker followed until now (a daemon that
    /// went away): `root` (if it has not ended and been reaped), what is below it and, with
    /// `own_children`, every child of this process and what is below them (for a child
    /// subreaper whose children are the tree's alone). Sampled like an attach: figures are
    /// from now on, `usage_before_attach` has what the processes present now had used.
    pub(crate) fn follow(
        &self,
        root: Option<u32>,
        own_children: bool,
    ) -> Result<ProcRun, FallbackError> {
        let fs = ProcFs::host();
        let root = root.and_then(|pid| {
            walker::start_ticks(&fs, pid).map(|start| Seed {
                pid,
                start_ticks: Some(start),
            })
        });
        let root_pid = root.map_or(0, |s| s.pid);
        let pidfd = root.and_then(|s| pidfd_open(s.pid).ok());
        let mode = Mode::Attached {
            acc: AttachAccount::default(),
            root,
            own_children,
        };
        ProcRun::start(self, mode, root_pid, pidfd, monotonic_ns(), None)
    }
}

/// [`FallbackError::NotOwnProcess`] if process `pid` has a real, effective or saved uid other
/// than this process's real uid (what keeps its `/proc/PID/io` from us); `None` if it is ours
/// (a non-dumpable process of our own is refused for that, with the error that says so).
fn not_own_process(pid: u32) -> Option<FallbackError> {
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let uids = procfs::read_uids(pid)?;
    let owner = uids[..3].iter().copied().find(|&u| u != me)?;
    Some(FallbackError::NotOwnProcess {
        pid: pid as libc::pid_t,
        owner,
    })
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: a valid array for pipe2; the fds are ours.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from the kernel.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn dup(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Waits until `fd` is readable or `timeout` passes; whether it is readable.
fn poll_in(fd: RawFd, timeout: Duration) -> bool {
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
struct Pipe {
    file: std::fs::File,
    partial: Vec<u8>,
    eof: bool,
}

impl Pipe {
    fn new(fd: OwnedFd) -> Pipe {
        Pipe {
            file: std::fs::File::from(fd),
            partial: Vec::new(),
            eof: false,
        }
    }

    fn read_blocking(&mut self) -> Option<Record> {
        let mut b = [0u8; RECORD_SIZE];
        self.file.read_exact(&mut b).ok()?;
        Some(Record::from_bytes(&b))
    }

    fn set_nonblocking(&self) -> std::io::Result<()> {
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
    fn drain(&mut self) -> Vec<Record> {
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

enum Mode {
    Spawned {
        acc: Account,
        pipe: Pipe,
        reaper: Seed,
        root: (u32, u64),
    },
    Attached {
        acc: AttachAccount,
        /// `None`: the root had already ended.
        root: Option<Seed>,
        /// Every child of this process is part of the tree (see [`ProcTracker::follow`]).
        own_children: bool,
    },
}

/// Where the run is, for waiters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Progress {
    root_ended: bool,
    finished: bool,
}

struct State {
    mode: Mode,
    root_status: Option<i32>,
    root_ended: bool,
    finished: bool,
    ended_ns: Option<u64>,
    /// Something went wrong with the reaper; said in the report's notes.
    failure: Option<String>,
    /// The reaper process has exited and been reaped (always true for an attached run):
    /// a run is not over while its reaper still exists.
    reaper_gone: bool,
}

struct Shared {
    state: Mutex<State>,
    progress: tokio::sync::watch::Sender<Progress>,
    /// Readable when the progress changed (for event loops: [`ProcRun::wake_fds`]).
    wake: OwnedFd,
    stop: AtomicBool,
    units: Units,
    reason: Arc<str>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Tells waiters about a change.
    fn publish(&self, state: &State) {
        let now = Progress {
            root_ended: state.root_ended,
            finished: state.over(),
        };
        if *self.progress.borrow() != now {
            self.progress.send_replace(now);
            let one: u64 = 1;
            // SAFETY: an 8-byte write to our eventfd.
            unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

impl State {
    /// The tree has ended, and so has the reaper.
    fn over(&self) -> bool {
        self.finished && self.reaper_gone
    }

    /// Takes in the reaper's records; true if any came.
    fn take_records(&mut self) -> bool {
        let Mode::Spawned {
            acc, pipe, root, ..
        } = &mut self.mode
        else {
            return false;
        };
        let records = pipe.drain();
        let any = !records.is_empty();
        for r in &records {
            match r.kind {
                REAPED => {
                    acc.reap(r);
                    if r.pid as u32 == root.0 && (r.start_ticks == root.1 || r.start_ticks == 0) {
                        self.root_status = Some(r.status);
                        self.root_ended = true;
                    }
                }
                DONE => {
                    self.finished = true;
                    self.root_ended = true;
                    self.ended_ns.get_or_insert_with(monotonic_ns);
                }
                FAILED => {
                    self.failure = Some(format!(
                        "the reaper's waitid() failed ({}): start times of later reaped \
                         processes are unknown",
                        std::io::Error::from_raw_os_error(r.status)
                    ));
                }
                _ => {}
            }
        }
        if pipe.eof && !self.finished {
            self.reaper_lost();
        }
        any
    }

    fn reaper_lost(&mut self) {
        self.failure = Some(
            "the reaper process ended before the tree did (killed?): what it had not reaped is \
             missing"
                .to_string(),
        );
        self.finished = true;
        self.root_ended = true;
        self.ended_ns.get_or_insert_with(monotonic_ns);
    }
}

/// A tree followed by the /proc fallback.
pub struct ProcRun {
    shared: Arc<Shared>,
    root_pid: u32,
    root_pidfd: Option<OwnedFd>,
    attached: bool,
    timed_out: bool,
    started_ns: u64,
    sampler: Option<JoinHandle<()>>,
    /// The signals sent to the tree so far.
    signals_sent: Mutex<Vec<crate::usage::SignalSent>>,
}

impl ProcRun {
    fn start(
        tracker: &ProcTracker,
        mode: Mode,
        root_pid: u32,
        root_pidfd: Option<OwnedFd>,
        started_ns: u64,
        reaper: Option<Child>,
    ) -> Result<ProcRun, FallbackError> {
        let attached = matches!(mode, Mode::Attached { .. });
        let (progress, _) = tokio::sync::watch::channel(Progress::default());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                mode,
                root_status: None,
                root_ended: false,
                finished: false,
                ended_ns: None,
                failure: None,
                reaper_gone: attached,
            }),
            progress,
            wake: eventfd().map_err(io_err("eventfd"))?,
            stop: AtomicBool::new(false),
            units: tracker.units(),
            reason: tracker.reason.clone(),
        });
        if attached {
            // The attach is the first sample, before this returns.
            sample(&shared, &ProcFs::host());
        }
        let for_thread = shared.clone();
        let sampler = std::thread::Builder::new()
            .name("cylo-usage-proc".into())
            .spawn(move || sampler(for_thread, reaper))
            .map_err(io_err("starting the sampling thread"))?;
        Ok(ProcRun {
            shared,
            root_pid,
            root_pidfd,
            attached,
            timed_out: false,
            started_ns,
            sampler: Some(sampler),
            signals_sent: Mutex::new(Vec::new()),
        })
    }

    /// The root's pid.
    pub fn root_pid(&self) -> libc::pid_t {
        self.root_pid as libc::pid_t
    }

    /// Whether the run attached to running processes.
    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// Why the eBPF tracker is not used.
    pub fn reason(&self) -> &str {
        &self.shared.reason
    }

    /// The root's exit status once it has ended, when known: always for a spawned root; for
    /// an attached one, only if a sample saw it as a zombie.
    pub fn root_status(&self) -> Option<ExitStatus> {
        self.shared.lock().root_status.map(ExitStatus::from_raw)
    }

    /// Whether the root has ended (a spawned root has then been reaped).
    pub fn root_ended(&self) -> bool {
        let mut state = self.shared.lock();
        state.take_records();
        self.shared.publish(&state);
        state.root_ended
    }

    /// True once every process of the tree has ended (and the reaper too).
    pub fn is_finished(&self) -> bool {
        let mut state = self.shared.lock();
        state.take_records();
        self.shared.publish(&state);
        state.over()
    }

    /// Waits until the root has ended; its status, when known (see [`ProcRun::root_status`]).
    pub async fn wait_root(&self) -> Option<ExitStatus> {
        let mut rx = self.shared.progress.subscribe();
        let _ = rx.wait_for(|p| p.root_ended).await;
        self.root_status()
    }

    /// Waits until every process of the tree has ended, daemons included (for an attached
    /// run: those the samples saw).
    pub async fn wait_finished(&self) {
        let mut rx = self.shared.progress.subscribe();
        let _ = rx.wait_for(|p| p.finished).await;
    }

    /// A file descriptor that becomes readable when the root ends or the tree is over.
    pub fn wake_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        Ok(vec![dup(self.shared.wake.as_raw_fd())?])
    }

    /// Empties the wake-up descriptor.
    pub fn clear_wake(&self) {
        let mut v: u64 = 0;
        // SAFETY: an 8-byte read from our nonblocking eventfd.
        unsafe { libc::read(self.shared.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    /// Marks the run as ended by its timeout (the report says so).
    pub fn set_timed_out(&mut self) {
        self.timed_out = true;
    }

    /// Sends `signal` to the root, if it has not ended.
    pub fn signal_root(&self, signal: i32) -> Result<(), FallbackError> {
        let Some(fd) = &self.root_pidfd else {
            return Ok(());
        };
        if self.shared.lock().root_ended {
            return Ok(());
        }
        match pidfd_send_signal(fd, signal) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(source) => Err(FallbackError::Io {
                what: "pidfd_send_signal",
                source,
            }),
        }
    }

    /// The processes of the tree alive now: (pid, start time).
    fn members_now(&self) -> Vec<(u32, u64)> {
        let nodes = tree_now(&self.shared, &ProcFs::host()).unwrap_or_default();
        nodes
            .iter()
            .filter(|n| !n.stat.is_zombie())
            .map(Node::key)
            .collect()
    }

    /// Sends `signal` to every live process of the tree, round after round until no new
    /// one appears, each through a pidfd checked against its start time (a reused pid is
    /// never signalled). Returns how many processes were signalled.
    pub fn kill(&self, signal: i32) -> Result<usize, FallbackError> {
        let fs = ProcFs::host();
        let mut signalled: HashSet<(u32, u64)> = HashSet::new();
        let mut sent = 0u64;
        for _ in 0..KILL_ROUNDS {
            let mut fresh = 0;
            for key in self.members_now() {
                if !signalled.insert(key) {
                    continue;
                }
                let Ok(fd) = pidfd_open(key.0) else {
                    continue; // gone
                };
                if walker::start_ticks(&fs, key.0) != Some(key.1) {
                    continue;
                }
                if pidfd_send_signal(&fd, signal).is_ok() {
                    fresh += 1;
                    sent += 1;
                }
            }
            if fresh == 0 {
                break;
            }
        }
        crate::usage::SignalSent::record(&mut lock(&self.signals_sent), signal, sent, 0);
        Ok(signalled.len())
    }

    /// What the tree has used so far. Once it is over, the reaper's totals; while it runs,
    /// those plus its live processes, read from `/proc` now.
    pub fn usage(&self) -> Result<ResourceUsage, FallbackError> {
        let shared = &self.shared;
        let units = shared.units;
        let mut state = shared.lock();
        state.take_records();
        shared.publish(&state);
        let running_reaper = match &state.mode {
            Mode::Spawned { reaper, .. } if !state.finished => Some(*reaper),
            _ => None,
        };
        let mut live = None;
        if let Some(reaper) = running_reaper {
            // /proc is read without the lock: the sampler keeps taking records meanwhile.
            drop(state);
            live = Some(read_live(&reaper, units.tick_ns));
            state = shared.lock();
            state.take_records();
            shared.publish(&state);
        }
        let wall = state
            .ended_ns
            .unwrap_or_else(monotonic_ns)
            .saturating_sub(self.started_ns)
            / 1_000_000;
        let root = state
            .root_status
            .map(RootEnd::from_wait_status)
            .unwrap_or_default();
        let finished = state.finished;
        let failure = state.failure.clone();
        let mut u = match &mut state.mode {
            Mode::Attached { acc, .. } => acc.usage(units, wall),
            Mode::Spawned { acc, .. } => match live.filter(|_| !finished) {
                Some(live) => {
                    let nodes: Vec<Node> = live.iter().map(|(n, _)| n.clone()).collect();
                    acc.observe(&nodes, units.page_size);
                    acc.usage(&shared.reason, units, Some(&live), root, wall)
                }
                None => acc.usage(&shared.reason, units, None, root, wall),
            },
        };
        if let Some(f) = failure {
            u.precision_notes.push(format!("tracker: {f}"));
        }
        u.timed_out = self.timed_out;
        u.signals_sent = lock(&self.signals_sent).clone();
        Ok(u)
    }
}

impl Drop for ProcRun {
    fn drop(&mut self) {
        // Sampling stops; the sampling thread stays behind only to wait for the reaper, which
        // goes on reaping the tree (unreported) until it ends, so no process is left a zombie.
        self.shared.stop.store(true, Ordering::Relaxed);
        drop(self.sampler.take());
    }
}

fn seeds_of(root: &Option<Seed>, acc: &AttachAccount) -> Vec<Seed> {
    let mut seeds: Vec<Seed> = root.iter().copied().collect();
    seeds.extend(acc.known().into_iter().map(|(pid, start)| Seed {
        pid,
        start_ticks: Some(start),
    }));
    seeds
}

/// The tree now, from /proc: everything below the reaper, or (attached) the root, every
/// member the samples know and what is below them, the tracker itself left out.
fn tree_now(shared: &Shared, fs: &ProcFs) -> Result<Vec<Node>, ProcError> {
    let seeds = match &shared.lock().mode {
        Mode::Spawned { reaper, .. } => Err(reaper.pid),
        Mode::Attached {
            acc,
            root,
            own_children,
        } => Ok((seeds_of(root, acc), *own_children)),
    };
    let me = std::process::id();
    match seeds {
        Err(reaper) => walker::walk_below(fs, reaper),
        Ok((seeds, false)) => walker::walk(fs, &seeds, &HashSet::from([me])),
        Ok((seeds, true)) => {
            // The root (first: the account takes the first node for the root), then every
            // child of this process (orphans came back to it) and what is below them.
            let mut nodes = walker::walk(fs, &seeds, &HashSet::from([me]))?;
            let mut seen: HashSet<u32> = nodes.iter().map(|n| n.pid).collect();
            for n in walker::walk_below(fs, me)? {
                if seen.insert(n.pid) {
                    nodes.push(n);
                }
            }
            Ok(nodes)
        }
    }
}

/// The tree under the reaper now, each process read in detail.
fn read_live(reaper: &Seed, tick_ns: u64) -> Vec<(Node, Detail)> {
    let fs = ProcFs::host();
    let nodes = walker::walk_below(&fs, reaper.pid).unwrap_or_default();
    nodes
        .into_iter()
        .filter_map(|n| match walker::detail(&fs, &n, tick_ns, false) {
            Ok(Read::Got(d)) => Some((n, d)),
            _ => None,
        })
        .collect()
}

/// One sample: the tree read from /proc, taken into the account.
fn sample(shared: &Shared, fs: &ProcFs) {
    let units = shared.units;
    let attached = matches!(shared.lock().mode, Mode::Attached { .. });
    // A permission error (a setuid program in the tree) leaves the sample empty rather than
    // ending the run; the reaper's totals do not depend on samples.
    let nodes = tree_now(shared, fs).unwrap_or_default();
    fs.end_pass();
    let details: Vec<(Node, Detail)> = if attached {
        nodes
            .iter()
            .filter_map(|n| match walker::detail(fs, n, units.tick_ns, false) {
                Ok(Read::Got(d)) => Some((n.clone(), d)),
                _ => None,
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut state = shared.lock();
    // Records that came while /proc was read go in before the sample.
    state.take_records();
    let mut done = None;
    match &mut state.mode {
        Mode::Spawned { acc, .. } => acc.observe(&nodes, units.page_size),
        Mode::Attached { acc, .. } => {
            acc.observe(&details, units.page_size);
            let (root_ended, status) = acc.root_end();
            done = Some((root_ended, status, acc.finished()));
        }
    }
    if let Some((root_ended, status, finished)) = done {
        state.root_ended |= root_ended;
        if state.root_status.is_none() {
            state.root_status = status;
        }
        if finished && !state.finished {
            state.finished = true;
            state.root_ended = true;
            state.ended_ns = Some(monotonic_ns());
        }
    }
    shared.publish(&state);
}

/// The sampling thread: takes in the reaper's records as they come, samples /proc every
/// interval, and reaps the reaper at the end.
fn sampler(shared: Arc<Shared>, mut reaper: Option<Child>) {
    let interval = shared.units.interval;
    let pipe_fd = match &shared.lock().mode {
        Mode::Spawned { pipe, .. } => Some(pipe.file.as_raw_fd()),
        Mode::Attached { .. } => None,
    };
    let fs = ProcFs::host_cached();
    let mut next = Instant::now();
    let mut rounds: u64 = 0;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let wait = next.saturating_duration_since(Instant::now());
        let readable = match pipe_fd {
            Some(fd) => poll_in(fd, wait),
            None => {
                std::thread::sleep(wait);
                false
            }
        };
        rounds += 1;
        {
            let mut state = shared.lock();
            if readable {
                state.take_records();
            }
            // The reaper may have died without a word (SIGKILL by someone): checked now and
            // then (its pipe's end says so too, unless a stray fork still holds it).
            if !state.finished
                && rounds.is_multiple_of(16)
                && let Some(child) = reaper.as_mut()
                && matches!(child.try_wait(), Ok(Some(_)))
            {
                state.take_records();
                if !state.finished {
                    state.reaper_lost();
                }
            }
            shared.publish(&state);
            if state.finished {
                break;
            }
        }
        if Instant::now() >= next {
            sample(&shared, &fs);
            next += interval;
            let now = Instant::now();
            if next < now {
                next = now + interval;
            }
        }
    }
    if let Some(mut child) = reaper {
        // After its last record the reaper only exits. If the run was dropped before the
        // tree ended, this waits until it does (the reaper still reaps it all).
        let _ = child.wait();
        let mut state = shared.lock();
        state.reaper_gone = true;
        shared.publish(&state);
    }
}
