//! A run: a tree followed by the tracker, from its root's start (see
//! [`crate::session::spawn`]) or from an attach ([`crate::session::attach`]), with every
//! descendant it ever has: its root's status, its live snapshots and final report (the
//! kernel's counters merged with /proc reads of the live threads), its records, and its kill.
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use cylo_usage_abi::{
    ROOT_ENDED, RunControl, RunCounters, TaskMember, ThreadUsage, control, run_flags,
};

use crate::kernel::tracker::Shared;
use crate::session::breakdown::{Breakdown, EventSink, Used};
use crate::sys::lock;
use crate::sys::procfs::{self, ThreadSample};
use crate::sys::{self, dup, fd_readable, monotonic_ns, pidfd_send_signal, watch};
mod budgets;
mod kill;

use crate::usage::{self, DiskDevice, LiveSample, ResourceUsage, RootExit, Units, split_runtime};

/// How often a waiting run re-reads its counters when no ring-buffer wake-up comes.
const POLL: Duration = Duration::from_millis(100);
/// Attempts at a consistent live snapshot before settling for an approximate one.
const SNAPSHOT_ATTEMPTS: usize = 8;
/// Rounds of signalling a tree's members before a kill gives up on catching newcomers (each
/// forking member is signalled in the kernel as it forks, so this is rarely approached).
const KILL_ROUNDS: usize = 1000;

/// Why a run of the eBPF tracker failed: its start, an attach, a wait, a read or a kill.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A budget cannot be enforced in the kernel here (a hook or a counter is missing).
    #[error(transparent)]
    Unenforceable(#[from] crate::usage::budgets::Unenforceable),
    /// A budget that can never be met (`--max-processes 0`).
    #[error("invalid budget: {reason}")]
    InvalidBudget {
        /// Why.
        reason: String,
    },
    /// The tracker loaded the lean programs ([`crate::ProgramSet::Totals`]), which cannot
    /// do what the run asked for.
    #[error(
        "this tracker loaded the programs for totals alone (ProgramSet::Totals): {what} needs \
         ProgramSet::Full"
    )]
    NotLoaded {
        /// What the run asked for: "an attach", "a breakdown (tree)", "an event stream".
        what: &'static str,
    },
    /// Every run slot in the kernel is in use: the tracker already has `max` runs.
    #[error("all {max} run slots are in use")]
    NoFreeSlot {
        /// The number of run slots.
        max: u32,
    },
    /// An operation on one of the tracker's eBPF maps failed.
    #[error("eBPF map operation failed: {what}")]
    Map {
        /// The operation, e.g. "reading the run record".
        what: &'static str,
        /// The map's error.
        #[source]
        source: MapError,
    },
    /// The root command could not be started (`Command::spawn` failed).
    #[error("cannot run {program}")]
    Spawn {
        /// The command's program, as given.
        program: String,
        /// The error `spawn` returned.
        #[source]
        source: std::io::Error,
    },
    /// The root did not join its run in the kernel (a spawned root is then killed), or, for
    /// a daemon's client, the process that joined is not the client's child.
    #[error("pid {pid} did not join its run in the kernel")]
    NotJoined {
        /// The root's pid; 0 when no process joined.
        pid: libc::pid_t,
    },
    /// A system call made for a process failed.
    #[error("{syscall} failed for pid {pid}")]
    Syscall {
        /// The call, e.g. `pidfd_open` or `bpf(BPF_PROG_TEST_RUN)`.
        syscall: &'static str,
        /// The process it was made for: the root, or the process whose thread registers.
        pid: libc::pid_t,
        /// The error the call returned.
        #[source]
        source: std::io::Error,
    },
    /// The kernel's `control` program refused to register the spawning thread.
    #[error("the kernel's control program refused to {what} (code {code})")]
    Control {
        /// What it was asked to do.
        what: &'static str,
        /// The code it returned (see `cylo_usage_abi::control`).
        code: i32,
    },
    /// There is no process `pid`: it never existed or has exited, or `pid` is a thread that
    /// is not a process's main thread.
    #[error("no process {pid}")]
    NoSuchProcess {
        /// The pid asked for.
        pid: libc::pid_t,
    },
    /// An attach named a kernel thread, which has no user-space tree to follow.
    #[error("process {pid} is a kernel thread: it has no user-space tree to follow")]
    KernelThread {
        /// The kernel thread's pid.
        pid: libc::pid_t,
    },
    /// An attach named a zombie: a process that has exited and waits to be reaped.
    #[error("process {pid} is a zombie: it has exited and only waits to be reaped")]
    Zombie {
        /// The zombie's pid.
        pid: libc::pid_t,
    },
    /// An attach named cylo-usage's own process (or one of its threads).
    #[error("process {pid} is cylo-usage itself")]
    Itself {
        /// The pid asked for.
        pid: libc::pid_t,
    },
    /// An attach named a process that another run of this tracker already follows.
    #[error("process {pid} is already followed by another run of this tracker")]
    AlreadyFollowed {
        /// The process's pid.
        pid: libc::pid_t,
    },
    /// An attach found more threads than the session's share of the kernel's maps holds:
    /// it fails rather than follow part of the tree.
    #[error(
        "cannot attach to process {pid}: its tree has more threads than this session may \
         follow ({followed} followed when the kernel's share for it was full)"
    )]
    TreeTooLarge {
        /// The process attached to.
        pid: libc::pid_t,
        /// Threads the attach had adopted when the share was full.
        followed: u64,
    },
    /// The running kernel does not allow an attach (found when the tracker was loaded).
    #[error("attaching is not possible on this kernel: {reason}")]
    AttachUnsupported {
        /// Why, as the loader found it.
        reason: String,
    },
    /// A root that is not the tracker's child has exited, but the kernel's record still has
    /// no exit status for it after a grace period.
    #[error("process {pid} ended, but the kernel recorded no exit status for it")]
    NoExitStatus {
        /// The root's pid.
        pid: libc::pid_t,
    },
    /// An attach could not read or parse its target's `/proc/PID/stat`.
    #[error(transparent)]
    Proc(#[from] procfs::ProcError),
    /// An attach could not load or run the kernel's `control_adopt` program (loaded at its
    /// first use).
    #[error("cannot load the adoption program")]
    Adopt(#[from] Box<crate::kernel::programs::LoadError>),
    /// A read of the tracker's eBPF maps (the run's record, its members, its devices) failed.
    #[error(transparent)]
    Read(#[from] crate::kernel::map_read::MapReadError),
}

pub(crate) fn map_err(what: &'static str) -> impl FnOnce(MapError) -> SessionError {
    move |source| SessionError::Map { what, source }
}

/// A pidfd of process `pid`; `NoSuchProcess` when there is none.
pub(crate) fn pidfd_of(pid: u32) -> Result<OwnedFd, SessionError> {
    sys::pidfd_open(pid).map_err(|source| {
        if source.raw_os_error() == Some(libc::ESRCH) {
            SessionError::NoSuchProcess {
                pid: pid as libc::pid_t,
            }
        } else {
            SessionError::Syscall {
                syscall: "pidfd_open",
                pid: pid as libc::pid_t,
                source,
            }
        }
    })
}

/// What a session records besides the totals.
#[derive(Default)]
pub struct RunOptions {
    /// Keep a per-process breakdown (`--tree`): [`ResourceUsage::processes`].
    pub tree: bool,
    /// Write every process's fork, exec and exit as NDJSON here (`--events`).
    pub events: Option<EventSink>,
    /// The most processes the breakdown keeps ([`crate::session::breakdown::DEFAULT_TREE_LIMIT`] if 0).
    pub tree_limit: usize,
    /// The most threads of the run the kernel follows at once. 0: the maps' capacity less a
    /// headroom ([`cylo_usage_abi::share_headroom`]), shared with other runs. A task created
    /// past it is killed at birth with its creator's process, and the report says so
    /// ([`ResourceUsage::tasks_killed_at_birth`]): nothing the tracker cannot follow outlives
    /// a kill of the run.
    pub max_tasks: u32,
    /// Where the breakdown's memory is charged (a daemon: the session's account on its
    /// user's share, see [`crate::session::budget`]); unlimited by default. A process it cannot pay
    /// for is left out of the breakdown and counted, and the report names the limit.
    pub memory: crate::session::budget::Share,
    /// Who reads the breakdown and the event stream, when not the tracker's own user (a
    /// daemon's unprivileged client): the figures of members it could not read itself are
    /// withheld from both (see [`crate::session::viewer::Viewer`]). `None`: everything is shown.
    pub viewer: Option<crate::session::viewer::Viewer>,
    /// Budgets: the run is killed (SIGKILL, every member) in the kernel when it crosses one,
    /// and the report says which ([`ResourceUsage::budget_exceeded`]). A budget this kernel
    /// cannot enforce fails the start ([`SessionError::Unenforceable`]).
    pub budgets: crate::usage::Budgets,
    /// What to do with a budget the kernel side cannot enforce: refuse it (`Exact`, the
    /// default), or, on the /proc fallback, enforce it from samples (`BestEffort`).
    pub budget_enforcement: crate::usage::Enforcement,
}

impl RunOptions {
    fn wants_records(&self) -> bool {
        self.tree || self.events.is_some()
    }

    /// The run's flags in the kernel: every record for a breakdown; else, where the kernel
    /// can split each process's CPU time itself (`kernel_split`: a spawned run, handlers
    /// with atomics), no record at all; else the records its user/system split needs (see
    /// [`Run::start_records`]).
    pub(crate) fn run_flags(&self, kernel_split: bool) -> u64 {
        if self.wants_records() {
            run_flags::RECORDS
        } else if kernel_split {
            run_flags::KERNEL_SPLIT
        } else {
            run_flags::CPU_RECORDS
        }
    }
}

/// How the run's root came to be followed.
pub(crate) enum Origin {
    /// The tracker is starting the root (between the claim of the run's slot and the fork):
    /// there is no root yet.
    Starting,
    /// Started by the tracker: its child.
    Spawned(Child),
    /// Attached to: someone else's child.
    Attached,
    /// Started by a daemon's client (see [`PendingSpawn`]): the client's child.
    Remote,
}

/// A tree followed by the tracker: a command it started, or running processes it attached to.
pub struct Run {
    pub(super) inner: Arc<Shared>,
    pub(super) slot: u32,
    pub(super) origin: Origin,
    pub(super) root_pid: u32,
    pub(super) pidfd: Option<OwnedFd>,
    started_ns: u64,
    root_status: Option<ExitStatus>,
    pub(crate) tree: Option<Arc<Mutex<Breakdown>>>,
    /// Whether the run holds the adopt gate open (while attaching).
    attaching: bool,
    timed_out: bool,
    /// Checks that found the attached root exited without the kernel's exit record.
    exited_unrecorded: u32,
    /// Whether the report has a per-process breakdown (records may be kept for events only).
    pub(crate) breakdown: bool,
    /// Whether the run takes every record (a breakdown or an event stream), from the
    /// `RECORDS` ring buffer; else those its split needs, from `SPLIT_RECORDS`.
    all_records: bool,
    /// Whether the kernel splits each process's CPU time itself ([`run_flags::KERNEL_SPLIT`]):
    /// the run takes no record.
    kernel_split: bool,
    /// The signals sent to the tree so far (see [`crate::usage::SignalSent`]).
    signals_sent: Mutex<Vec<crate::usage::SignalSent>>,
    /// The run's live threads as last read from the membership map, with the generation
    /// they are exact for (see [`Run::live_members`]).
    members: Mutex<Option<Members>>,
    /// The run's budgets (see [`budgets`]), boxed: most runs have none.
    budget: Box<budgets::RunBudget>,
}

/// A run's membership as read at one generation: while the run's counts of threads started
/// and exited are both unchanged, no thread has joined or left, so the list is still exact.
struct Members {
    generation: (u64, u64),
    list: Vec<TaskMember>,
}

/// The generation of a run's membership: threads started and exited.
fn generation(c: &RunCounters) -> (u64, u64) {
    (c.threads_started, c.threads_exited)
}

impl Run {
    /// Starts taking the run's records (its slot's `flags` say which): into a breakdown
    /// and/or an event stream when the options ask for one; else, unless the kernel splits
    /// each process itself ([`run_flags::KERNEL_SPLIT`]: no record), into a tree that keeps
    /// each process only until its last thread has left, for the user/system split alone.
    /// Either way the totals' split is the sum of each process's own, as `wait4` makes it
    /// (see [`Run::finish`]).
    pub(crate) fn start_records(&mut self, options: RunOptions, started_ns: u64, flags: u64) {
        if flags & run_flags::KERNEL_SPLIT != 0 {
            self.kernel_split = true;
            return;
        }
        let units = Units {
            ticks_per_second: procfs::clock_ticks_per_second(),
            page_size: procfs::page_size(),
        };
        let limit = match options.tree_limit {
            0 => crate::session::breakdown::DEFAULT_TREE_LIMIT,
            n => n,
        };
        self.breakdown = options.tree;
        self.all_records = options.wants_records();
        let mut tree = Breakdown::new(
            started_ns,
            options.tree,
            limit,
            options.events,
            units,
            options.memory,
        );
        tree.set_viewer(options.viewer);
        tree.set_measured(self.inner.measured);
        let tree = Arc::new(Mutex::new(tree));
        let ring = if self.all_records {
            &self.inner.records
        } else {
            &self.inner.split_records
        };
        self.sinks().register(self.slot, tree.clone());
        self.sinks().start(ring);
        self.tree = Some(tree);
    }

    /// Opens or closes this run's adoption in the kernel (the hooks of every untracked task
    /// look further only while some run is attaching).
    pub(crate) fn set_attaching(&mut self, on: bool) -> Result<(), SessionError> {
        if self.attaching == on {
            return Ok(());
        }
        let mut maps = self.inner.maps();
        let mut ctl = maps
            .run_control
            .get(&self.slot, 0)
            .map_err(map_err("reading the run's controls"))?;
        ctl.attaching = u32::from(on);
        maps.run_control
            .set(self.slot, ctl, 0)
            .map_err(map_err("setting the run's controls"))?;
        let open = maps
            .adopt_gate
            .get(&0, 0)
            .map_err(map_err("reading the adopt gate"))?;
        let open = if on { open + 1 } else { open.saturating_sub(1) };
        maps.adopt_gate
            .set(0, open, 0)
            .map_err(map_err("setting the adopt gate"))?;
        self.attaching = on;
        Ok(())
    }
}

impl Run {
    /// A run in slot `slot`, started (spawned, attached, or registered) at `started_ns`.
    pub(crate) fn new(
        inner: Arc<Shared>,
        slot: u32,
        origin: Origin,
        root_pid: u32,
        pidfd: Option<OwnedFd>,
        started_ns: u64,
    ) -> Run {
        Run {
            inner,
            slot,
            origin,
            root_pid,
            pidfd,
            started_ns,
            root_status: None,
            tree: None,
            attaching: false,
            timed_out: false,
            exited_unrecorded: 0,
            breakdown: false,
            all_records: false,
            kernel_split: false,
            signals_sent: Mutex::new(Vec::new()),
            members: Mutex::new(None),
            budget: Box::default(),
        }
    }

    /// The run's slot in the kernel.
    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }

    /// The reader of the ring buffer the run's records come through.
    pub(crate) fn sinks(&self) -> &Arc<crate::kernel::records::RecordReader> {
        if self.all_records {
            &self.inner.sinks
        } else {
            &self.inner.split_sinks
        }
    }

    /// Delivers the records the kernel has made so far to this run's breakdown and event
    /// stream (before the run ends, so that the stream is complete).
    pub(crate) fn drain_records(&self) {
        if self.tree.is_some() {
            self.sinks().drain();
            if self.counters().is_ok_and(|c| c.finished()) {
                self.release_events();
            }
        }
    }

    /// Sends the whole event stream out once the run has finished: every record of the run
    /// is in the ring buffer by then (a thread's last record is made before it counts as
    /// exited), and the drain before this call delivered them.
    fn release_events(&self) {
        if let Some(tree) = &self.tree {
            lock(tree).release_all();
        }
    }

    /// The root's pid (in cylo-usage's pid namespace).
    pub fn root_pid(&self) -> libc::pid_t {
        self.root_pid as libc::pid_t
    }

    /// The root's exit status, once it has exited (and, when it is the tracker's child, been
    /// reaped).
    pub fn root_status(&self) -> Option<ExitStatus> {
        self.root_status
    }

    /// Whether the run attached to running processes (rather than spawned its root).
    pub fn is_attached(&self) -> bool {
        matches!(self.origin, Origin::Attached)
    }

    /// Sends `signal` to the root, if it has not exited yet.
    pub fn signal_root(&self, signal: i32) -> Result<(), SessionError> {
        if self.root_status.is_some() {
            return Ok(());
        }
        let Some(pidfd) = &self.pidfd else {
            return Ok(());
        };
        match pidfd_send_signal(pidfd, signal) {
            Ok(()) => Ok(()),
            // Exited meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(source) => Err(SessionError::Syscall {
                syscall: "pidfd_send_signal",
                pid: self.root_pid as libc::pid_t,
                source,
            }),
        }
    }

    /// Waits for the root to exit (and reaps it when it is the tracker's child). Its
    /// descendants may still run.
    pub async fn wait_root(&mut self) -> Result<ExitStatus, SessionError> {
        if let Some(status) = self.root_status {
            return Ok(status);
        }
        let pid = self.root_pid;
        let err = |syscall, source| SessionError::Syscall {
            syscall,
            pid: pid as libc::pid_t,
            source,
        };
        let raw = self.pidfd.as_ref().map(AsRawFd::as_raw_fd).unwrap_or(-1);
        let fd = dup(raw).map_err(|e| err("fcntl(F_DUPFD)", e))?;
        let afd = watch(fd).map_err(|e| err("epoll_ctl", e))?;
        let mut exited_polls = 0;
        loop {
            match &mut self.origin {
                Origin::Spawned(child) => {
                    if let Some(status) = child.try_wait().map_err(|e| err("waitid", e))? {
                        self.root_status = Some(status);
                        return Ok(status);
                    }
                }
                Origin::Starting | Origin::Attached | Origin::Remote => {
                    // Not our child: its status comes from the kernel, at its exit.
                    let c = self.counters()?;
                    if c.root_status & ROOT_ENDED != 0 {
                        let status = ExitStatus::from_raw(c.root_status as u32 as i32);
                        self.root_status = Some(status);
                        return Ok(status);
                    }
                    if fd_readable(raw) {
                        // The process has exited; the kernel's record may trail by a moment.
                        exited_polls += 1;
                        if exited_polls > 50 {
                            return Err(SessionError::NoExitStatus {
                                pid: pid as libc::pid_t,
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
            if let Ok(Ok(mut guard)) = tokio::time::timeout(POLL, afd.readable()).await {
                guard.clear_ready();
            }
        }
    }

    /// The root's exit status if it has exited (reaping it when it is the tracker's child),
    /// without waiting.
    pub fn try_wait_root(&mut self) -> Result<Option<ExitStatus>, SessionError> {
        if let Some(status) = self.root_status {
            return Ok(Some(status));
        }
        let pid = self.root_pid;
        match &mut self.origin {
            Origin::Spawned(child) => {
                let status = child.try_wait().map_err(|source| SessionError::Syscall {
                    syscall: "waitid",
                    pid: pid as libc::pid_t,
                    source,
                })?;
                self.root_status = status;
                Ok(status)
            }
            Origin::Starting | Origin::Attached | Origin::Remote => {
                let c = self.counters()?;
                if c.root_status & ROOT_ENDED != 0 {
                    let status = ExitStatus::from_raw(c.root_status as u32 as i32);
                    self.root_status = Some(status);
                    return Ok(Some(status));
                }
                // Exited, but the kernel's record is missing (the root could not be followed
                // to its end): after a grace period, say so rather than wait forever.
                let exited = self
                    .pidfd
                    .as_ref()
                    .is_some_and(|f| fd_readable(f.as_raw_fd()));
                if exited {
                    self.exited_unrecorded += 1;
                    if self.exited_unrecorded > 200 {
                        return Err(SessionError::NoExitStatus {
                            pid: pid as libc::pid_t,
                        });
                    }
                }
                Ok(None)
            }
        }
    }

    /// File descriptors that become readable when something may have changed: the root's
    /// pidfd (it exited) and the notification ring buffer (a run ended). For event loops.
    pub fn wake_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        let mut out = Vec::new();
        if let Some(pidfd) = &self.pidfd {
            out.push(dup(pidfd.as_raw_fd())?);
        }
        let events = lock(&self.inner.events);
        out.push(dup(events.as_raw_fd())?);
        Ok(out)
    }

    /// Empties the notification ring buffer (after a wake-up through [`Run::wake_fds`]).
    pub fn clear_wake(&self) {
        self.drain_events();
    }

    /// The kernel's record of this run, as it is now.
    pub fn counters(&self) -> Result<RunCounters, SessionError> {
        // Through the run's own reader: no lock shared with other runs.
        self.inner
            .readers
            .runs
            .get(&self.slot)?
            .ok_or(SessionError::Map {
                what: "reading the run record",
                source: MapError::KeyNotFound,
            })
    }

    /// True once every thread that ever joined the run has exited. A run that has crossed a
    /// budget is killed here, the first time this sees it (every wait goes through here).
    pub fn is_finished(&self) -> Result<bool, SessionError> {
        let c = self.counters()?;
        self.enforce_budget(&c)?;
        Ok(c.finished())
    }

    /// Waits until every thread of the tree has exited, daemonised ones included.
    pub async fn wait_finished(&self) -> Result<(), SessionError> {
        let events_fd = {
            let events = lock(&self.inner.events);
            dup(events.as_raw_fd())
        };
        let afd = events_fd.and_then(watch).ok();
        loop {
            self.drain_events();
            if self.is_finished()? {
                return Ok(());
            }
            match &afd {
                Some(afd) => {
                    if let Ok(Ok(mut guard)) = tokio::time::timeout(POLL, afd.readable()).await {
                        guard.clear_ready();
                    }
                }
                None => tokio::time::sleep(POLL).await,
            }
        }
    }

    fn drain_events(&self) {
        let mut events = lock(&self.inner.events);
        while events.next().is_some() {}
    }

    /// The live threads of this run, from the membership map: the list read last time if
    /// the run's generation is unchanged since (no thread joined or left; the values that
    /// change without it, a thread's socket bytes, are re-read when `fresh`), else a read
    /// of the whole map, batched and without any lock shared with other runs.
    pub(super) fn live_members(&self, fresh: bool) -> Result<Vec<TaskMember>, SessionError> {
        let now = generation(&self.counters()?);
        if !fresh {
            let cached = lock(&self.members);
            if let Some(m) = cached.as_ref().filter(|m| m.generation == now) {
                return Ok(m.list.clone());
            }
        }
        let mut list = Vec::new();
        self.inner.readers.tasks.for_each(|_, m| {
            if m.run == self.slot {
                list.push(*m);
            }
        })?;
        // Kept only if nothing joined or left during the read.
        if generation(&self.counters()?) == now {
            *lock(&self.members) = Some(Members {
                generation: now,
                list: list.clone(),
            });
        }
        Ok(list)
    }

    /// Forgets the membership read last (a snapshot found it no longer matched /proc).
    fn forget_members(&self) {
        *lock(&self.members) = None;
    }

    /// Block I/O per device submitted by this run's tasks.
    fn devices(&self) -> Result<Vec<DiskDevice>, SessionError> {
        let mut out = Vec::new();
        self.inner.readers.devs.for_each(|k, c| {
            if k.run == self.slot {
                out.push(DiskDevice {
                    device: usage::device_name(k.dev),
                    read_bytes: c.read_bytes,
                    write_bytes: c.write_bytes,
                    read_ops: c.read_ops,
                    write_ops: c.write_ops,
                });
            }
        })?;
        Ok(out)
    }

    fn root_exit(&self) -> RootExit {
        RootExit {
            exit_code: self.root_status.and_then(|s| s.code()),
            signal: self.root_status.and_then(|s| s.signal()),
        }
    }

    /// What the run has used so far: the kernel's totals for exited threads plus /proc reads
    /// of the live ones, made consistent by re-checking the exit generation. With a breakdown
    /// (`RunOptions::tree`), [`ResourceUsage::processes`] too.
    pub fn usage(&self) -> Result<ResourceUsage, SessionError> {
        self.snapshot(true)
    }

    /// [`Run::usage`] without the breakdown: cheaper, for live views.
    pub fn usage_totals(&self) -> Result<ResourceUsage, SessionError> {
        self.snapshot(false)
    }

    fn snapshot(&self, with_tree: bool) -> Result<ResourceUsage, SessionError> {
        let units = Units {
            ticks_per_second: procfs::clock_ticks_per_second(),
            page_size: procfs::page_size(),
        };
        let root = self.root_exit();
        let measured = self.inner.measured;
        let mut last = None;
        for _ in 0..SNAPSHOT_ATTEMPTS {
            let before = self.counters()?;
            let devices = self.devices()?;
            if before.finished() {
                let wall = before.ended_ns.saturating_sub(self.started_ns) / 1_000_000;
                let live = LiveSample {
                    devices,
                    complete: true,
                    ..LiveSample::default()
                };
                let merged = usage::merge(&before, measured, &live, units, root, wall);
                let u = self.finish(merged, &before, &[], with_tree);
                self.drain_records();
                return Ok(u);
            }
            // A breakdown shows each live thread's socket bytes, which change without a
            // generation change: re-read then.
            let members = self.live_members(with_tree && self.breakdown)?;
            let samples: Vec<(TaskMember, ThreadSample)> = members
                .iter()
                .filter_map(|m| {
                    procfs::read_thread(m.tgid, m.tid, m.start_boottime_ns)
                        .ok()
                        .map(|t| (*m, t))
                })
                .collect();
            let mut tgids: Vec<u32> = members.iter().map(|m| m.tgid).collect();
            tgids.sort_unstable();
            tgids.dedup();
            let max_hwm_bytes = tgids
                .iter()
                .filter_map(|&t| procfs::read_vm_hwm(t))
                .max()
                .unwrap_or(0);
            let after = self.counters()?;
            let wall = monotonic_ns().saturating_sub(self.started_ns) / 1_000_000;
            let stable = before.threads_exited == after.threads_exited
                && before.threads_started == after.threads_started;
            let live = LiveSample {
                complete: stable && samples.len() == members.len(),
                threads: samples.iter().map(|(_, t)| *t).collect(),
                max_hwm_bytes,
                devices,
            };
            let merged = usage::merge(&after, measured, &live, units, root, wall);
            if live.complete {
                return Ok(self.finish(merged, &after, &samples, with_tree));
            }
            // A thread of the list could not be read (an exec changing its tid shows in the
            // generation only once the old leader is gone): read the map again next time.
            self.forget_members();
            last = Some(self.finish(merged, &after, &samples, with_tree));
        }
        Ok(last.expect("at least one attempt"))
    }

    /// Adds what the session knows beyond the kernel's totals: how it started, whether it
    /// timed out, and the breakdown.
    fn finish(
        &self,
        mut u: ResourceUsage,
        c: &RunCounters,
        live: &[(TaskMember, ThreadSample)],
        with_tree: bool,
    ) -> ResourceUsage {
        u.attached = self.is_attached();
        u.timed_out = self.timed_out;
        if !self.budget.budgets.is_empty() {
            u.budgets = Some(self.budget.budgets);
        }
        if let Ok(now) = self.counters() {
            u.budget_exceeded = self.crossing(&now);
        }
        u.signals_sent = lock(&self.signals_sent).clone();
        if let Some(killed) = u.tasks_killed_at_birth.filter(|&n| n > 0) {
            let share = self
                .inner
                .maps()
                .run_control
                .get(&self.slot, 0)
                .map(|c| c.max_tasks)
                .unwrap_or(0);
            u.precision_notes.push(format!(
                "tasks_killed_at_birth: {killed} tasks created past the session's share of \
                 {share} threads were killed at birth, each with its creator's whole process \
                 (fail closed: a task the tracker cannot follow must not outlive a kill); \
                 the command did not run as it would have"
            ));
        }
        if self.kernel_split {
            if let Some([user, system]) = self.kernel_cpu_split(c, live, u.cpu_time_ns) {
                u.cpu_user_ns = user;
                u.cpu_system_ns = system;
                u.cpu_split = crate::usage::CpuSplit::PerProcess;
            }
            return u;
        }
        let Some(tree) = self.tree.as_ref() else {
            return u;
        };
        self.sinks().drain();
        // What each process's live threads have used, in ns (their ticks converted here).
        let tick_ns = 1_000_000_000 / procfs::clock_ticks_per_second().max(1);
        let mut by_process: HashMap<u64, (Used, u64)> = HashMap::new();
        for (m, t) in live {
            let (used, threads) = by_process.entry(m.process).or_default();
            *used += Used {
                usage: t.usage(tick_ns),
                net_sent: m.net_sent,
                net_received: m.net_received,
            };
            *threads += 1;
        }
        let tree = lock(tree);
        // The user/system split is each process's own (as the kernel's wait4 reports it), so
        // the totals' are the sums of the processes' when the records cover the whole tree.
        if let Some([cpu, user, system]) = tree.cpu_split(&by_process)
            && cpu == u.cpu_time_ns
        {
            u.cpu_user_ns = user;
            u.cpu_system_ns = system;
            u.cpu_split = crate::usage::CpuSplit::PerProcess;
        }
        if !(with_tree && self.breakdown) {
            return u;
        }
        let processes = tree.processes(&by_process, self.inner.measured);
        let withheld = processes.iter().filter(|p| p.withheld).count();
        if withheld > 0 {
            u.precision_notes
                .push(crate::session::breakdown::withheld_note(withheld));
        }
        u.processes = Some(processes);
        if tree.dropped() > 0 {
            u.processes_dropped = Some(tree.dropped());
        }
        u.commands = crate::usage::commands::by_command(&u);
        if let Some((processes, execs, limit)) = tree.memory_refusals() {
            u.precision_notes.push(format!(
                "breakdown: {processes} processes left out and the argv of {execs} execs not \
                 kept, past {limit}; the totals are whole"
            ));
        }
        u
    }

    /// The tree's user and system time for a run the kernel splits
    /// ([`run_flags::KERNEL_SPLIT`]): the kernel's sums over its ended processes (`c`), plus
    /// each live process split on its own, from its threads that have left (its `PROCS`
    /// entry) and its live threads (`live`). `None` (the tree's sums are split at once) when
    /// that does not add up to the report's `cpu_time` (a thread left between the reads).
    fn kernel_cpu_split(
        &self,
        c: &RunCounters,
        live: &[(TaskMember, ThreadSample)],
        cpu_time_ns: u64,
    ) -> Option<[u64; 2]> {
        let tick_ns = 1_000_000_000 / procfs::clock_ticks_per_second().max(1);
        let mut by_process: HashMap<u64, ThreadUsage> = HashMap::new();
        for (m, t) in live {
            *by_process.entry(m.process).or_default() += t.usage(tick_ns);
        }
        let (mut runtime, mut user, mut system) =
            (c.split_runtime_ns, c.split_user_ns, c.split_system_ns);
        for (process, used) in by_process {
            let left = self
                .inner
                .readers
                .procs
                .get(&process)
                .ok()?
                .filter(|p| p.run == self.slot)
                .unwrap_or_default();
            let r = used.cpu_runtime_ns.wrapping_add(left.runtime_ns);
            let (u, s) = split_runtime(
                r,
                used.cpu_utime_ns.wrapping_add(left.utime_ns),
                used.cpu_stime_ns.wrapping_add(left.stime_ns),
            );
            runtime = runtime.wrapping_add(r);
            user = user.wrapping_add(u);
            system = system.wrapping_add(s);
        }
        (runtime == cpu_time_ns).then_some([user, system])
    }

    /// Marks the run as ended by its timeout (the report says so).
    pub fn set_timed_out(&mut self) {
        self.timed_out = true;
    }
}

/// Removes the entries of `map` whose value matches.
pub(crate) fn remove_where<V: aya::Pod>(
    map: &mut BpfHashMap<MapData, u64, V>,
    matches: impl Fn(&V) -> bool,
) {
    let keys: Vec<u64> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| matches(v))
        .map(|(k, _)| k)
        .collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.set_attaching(false);
        if self.tree.is_some() {
            self.sinks().unregister(self.slot);
        }
        let slot = self.slot;
        // Stop following whatever of the tree is still alive, and free the slot.
        let _ = self
            .inner
            .maps()
            .run_control
            .set(slot, RunControl::default(), 0);
        // What is left of the run in the maps, each read without the lock that other runs
        // need, in the order the kernel side builds them up: tasks, processes, address
        // spaces, devices.
        let r = &self.inner.readers;
        let mut tasks = Vec::new();
        // A finished run has no task left: each thread leaves the membership map before it
        // counts as exited (the one map that holds every thread on the host is not read).
        let finished = self.counters().is_ok_and(|c| c.finished());
        if !finished {
            let _ = r.tasks.for_each(|k, m| {
                if m.run == slot {
                    tasks.push(*k);
                }
            });
        }
        // Tasks and address spaces through the kernel side, which also drops their counts in
        // its filters.
        for task in tasks {
            let _ = self.inner.control([control::FORGET_TASK, task, 0, 0]);
        }
        let mut procs = Vec::new();
        let _ = r.procs.for_each(|k, p| {
            if p.run == slot {
                procs.push(*k);
            }
        });
        if !procs.is_empty() {
            let mut maps = self.inner.maps();
            for k in procs {
                let _ = maps.procs.remove(&k);
            }
        }
        let mut mms = Vec::new();
        let _ = r.mms.for_each(|k, m| {
            if m.run == slot {
                mms.push(*k);
            }
        });
        for mm in mms {
            let _ = self.inner.control([control::FORGET_MM, mm, 0, 0]);
        }
        let mut devs = Vec::new();
        let _ = r.devs.for_each(|k, _| {
            if k.run == slot {
                devs.push(*k);
            }
        });
        let mut maps = self.inner.maps();
        for k in devs {
            let _ = maps.devs.remove(&k);
        }
        maps.slots[self.slot as usize] = false;
        drop(maps);
        if let Origin::Spawned(child) = &mut self.origin
            && self.root_status.is_none()
        {
            // Reap the root if it has already exited; never block here.
            let _ = child.try_wait();
        }
    }
}
