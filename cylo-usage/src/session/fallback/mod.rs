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
//! - **Budgets** (`--max-*`): only the kernel enforces them at the crossing, so with
//!   [`Enforcement::Exact`] they are refused before anything starts. With
//!   [`Enforcement::BestEffort`] they are checked at each sample and each reap against the
//!   report's own figures, and the first crossing seen kills the tree (SIGKILL, every
//!   member), `enforced: "sampled"` in the report. A network budget is refused either way:
//!   the fallback has no network counters.
//!
//! Reports say `tracker: "proc"`, `precision: "approximate"`, and name every approximate
//! field in `precision_notes`; what cannot be known is `null`.
//!
//! [`Enforcement::Exact`]: crate::usage::Enforcement::Exact
//! [`Enforcement::BestEffort`]: crate::usage::Enforcement::BestEffort
pub(crate) mod account;
mod budget;
mod error;
mod fds;
pub(crate) mod reaper;
mod sampling;
mod state;
mod walk;

use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::proc::walker::{self, Node, ProcFs, Read, Seed};
use crate::session::run::{RunOptions, SessionError};
use crate::sys::lock;
use crate::sys::procfs;
use crate::sys::{monotonic_ns, pidfd_open, pidfd_send_signal};
use crate::usage::{BudgetExceeded, ResourceUsage};

pub use error::FallbackError;

use account::{Account, AttachAccount, RootEnd, Units};
use budget::BudgetWatch;
use error::io_err;
use fds::{Pipe, dup, eventfd, pipe};
use reaper::STARTED;
use sampling::{sample, sampler};
use state::{Mode, Progress, Shared, State};
use walk::{kill_tree, read_live};

/// How often the fallback samples `/proc` by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);

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

    /// [`ProcTracker::spawn`]; a breakdown or an event stream in `options` is refused. Budgets
    /// (`options.budgets`) are enforced from the samples with
    /// [`Enforcement::BestEffort`] (the first crossing a sample or a reap shows kills the
    /// tree, SIGKILL to every member, and the report says which budget, `enforced:
    /// "sampled"`); with [`Enforcement::Exact`], and for a network budget in any case, they
    /// are refused ([`FallbackError::Unenforceable`]) before anything starts.
    ///
    /// [`Enforcement::Exact`]: crate::usage::Enforcement::Exact
    /// [`Enforcement::BestEffort`]: crate::usage::Enforcement::BestEffort
    pub fn spawn_with(
        &self,
        command: &mut Command,
        options: RunOptions,
    ) -> Result<ProcRun, FallbackError> {
        self.check_options(&options)?;
        let budget = budget::check_budgets(&self.reason, &options)?;
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
            budget,
        )?;
        Ok(run)
    }

    /// Follows process `pid` (one of the caller's own: another user's is a permission error)
    /// and its descendants by sampling `/proc`. Figures are from now on;
    /// `usage_before_attach` has what the processes present now had used before.
    pub fn attach(&self, pid: libc::pid_t) -> Result<ProcRun, FallbackError> {
        self.attach_with(pid, RunOptions::default())
    }

    /// [`ProcTracker::attach`]; a breakdown or an event stream in `options` is refused, and
    /// budgets are taken as [`ProcTracker::spawn_with`] takes them (checked against the
    /// figures since the attach, as the report gives them).
    pub fn attach_with(
        &self,
        pid: libc::pid_t,
        options: RunOptions,
    ) -> Result<ProcRun, FallbackError> {
        let Some(pid) = crate::sys::pid_u32(pid) else {
            return Err(SessionError::NoSuchProcess { pid }.into());
        };
        self.check_options(&options)?;
        let budget = budget::check_budgets(&self.reason, &options)?;
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
        let run = ProcRun::start(self, mode, pid, pidfd, started_ns, None, budget)?;
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
        ProcRun::start(self, mode, root_pid, pidfd, monotonic_ns(), None, None)
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

/// A tree followed by the /proc fallback.
pub struct ProcRun {
    shared: Arc<Shared>,
    root_pid: u32,
    root_pidfd: Option<OwnedFd>,
    attached: bool,
    timed_out: bool,
    started_ns: u64,
    sampler: Option<JoinHandle<()>>,
}

impl ProcRun {
    fn start(
        tracker: &ProcTracker,
        mode: Mode,
        root_pid: u32,
        root_pidfd: Option<OwnedFd>,
        started_ns: u64,
        reaper: Option<Child>,
        budget: Option<BudgetWatch>,
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
                budget,
            }),
            progress,
            wake: eventfd().map_err(io_err("eventfd"))?,
            stop: AtomicBool::new(false),
            units: tracker.units(),
            reason: tracker.reason.clone(),
            signals_sent: Mutex::new(Vec::new()),
        });
        if attached {
            // The attach is the first sample, before this returns.
            let _ = sample(&shared, &ProcFs::host());
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

    /// Sends `signal` to every live process of the tree, round after round until no new
    /// one appears, each through a pidfd checked against its start time (a reused pid is
    /// never signalled). Returns how many processes were signalled.
    pub fn kill(&self, signal: i32) -> Result<usize, FallbackError> {
        let mut signalled: HashSet<(u32, u64)> = HashSet::new();
        let sent = kill_tree(signal, &mut signalled, &[], || self.shared.start());
        crate::usage::SignalSent::record(&mut lock(&self.shared.signals_sent), signal, sent, 0);
        Ok(signalled.len())
    }

    /// The budget the run has crossed, if any (seen in a sample or at a reap; the tree is
    /// killed then).
    pub fn budget_exceeded(&self) -> Option<BudgetExceeded> {
        let mut state = self.shared.lock();
        state.take_records();
        self.shared.publish(&state);
        state.budget.as_ref().and_then(|w| w.exceeded)
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
        if let Some(w) = &state.budget {
            u.budgets = Some(w.budgets);
            u.budget_exceeded = w.exceeded;
            u.precision_notes.push(account::budget_note(units));
        }
        drop(state);
        u.timed_out = self.timed_out;
        u.signals_sent = lock(&shared.signals_sent).clone();
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
