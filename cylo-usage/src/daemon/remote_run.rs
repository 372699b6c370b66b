//! A run through the daemon ([`RemoteRun`]), which keeps its promises alone: when the daemon
//! goes away or any call of the run fails, it goes on with a /proc follower of the tree this
//! process can see (the root, its descendants and, for a child subreaper, every orphan that
//! came back to it; see [`RemoteRun::set_subreaper`]): `kill` still reaches the tree, the
//! root's status is still its own, and the report says `precision: approximate`, when the
//! daemon went away and why, and keeps the last exact figures the daemon gave.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::DaemonError;
use super::conn::*;
use super::protocol::{Reply, Request};
use crate::session::fallback::{DEFAULT_INTERVAL, ProcRun, ProcTracker};
use crate::sys::lock;
use crate::sys::{dup, fd_readable, pidfd_send_signal, watch};
use crate::usage::{Budgets, Precision, ResourceUsage, TrackerKind};

/// What took over from the daemon: the /proc follower, and when and why.
pub(crate) struct Local {
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
    /// The budgets asked for (the daemon's reports say which it enforces: `budgets`).
    budgets: Budgets,
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
        // Two trackers' figures, each made its own way: not one per-process split.
        u.cpu_split = crate::usage::CpuSplit::Tree;
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
    u.lower_bounds = crate::session::fallback::account::sampled_counts();
    u.tracker = TrackerKind::Daemon;
    u.attached = attached;
    u
}

impl RemoteRun {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        conn: Arc<Conn>,
        path: PathBuf,
        session: u64,
        child: Option<Child>,
        root_pid: u32,
        pidfd: Option<OwnedFd>,
        wake: OwnedFd,
        copier: Option<JoinHandle<()>>,
        breakdown: bool,
        budgets: Budgets,
    ) -> RemoteRun {
        RemoteRun {
            conn,
            path,
            session,
            child,
            root_pid,
            pidfd,
            wake,
            root_status: None,
            copier,
            breakdown,
            budgets,
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
    pub fn root_pid(&self) -> libc::pid_t {
        self.root_pid as libc::pid_t
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
    pub(crate) fn go_local(&self, e: &DaemonError) -> &Local {
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
        self.pidfd
            .as_ref()
            .is_some_and(|f| fd_readable(f.as_raw_fd()))
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
                pid: pid as libc::pid_t,
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
            return Err(DaemonError::NoExitStatus {
                pid: pid as libc::pid_t,
            });
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
                return Err(DaemonError::NoExitStatus {
                    pid: self.root_pid as libc::pid_t,
                });
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
                kept.commands = None;
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
        if u.budgets.is_some() || !self.budgets.is_empty() {
            // `budgets` and `budget_exceeded` stay as the daemon's last figures gave them.
            u.precision_notes.push(format!(
                "budgets: enforced in the daemon's kernel until it went away (at {}), not after",
                secs(local.at)
            ));
        }
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
                pid: self.root_pid as libc::pid_t,
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
        u.budgets = Some(Budgets {
            max_processes: Some(4),
            ..Budgets::default()
        });
        u.budget_exceeded = Some(crate::usage::BudgetExceeded {
            resource: crate::usage::Resource::Processes,
            limit: 4,
            observed: 5,
            enforced: crate::usage::EnforcedBy::Kernel,
        });
        u.processes_refused = Some(1);
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
        // The budgets and the crossing the daemon reported stay.
        assert_eq!(u.budgets, daemon_figures().budgets);
        assert_eq!(u.budget_exceeded, daemon_figures().budget_exceeded);
        assert_eq!(u.processes_refused, Some(1));
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
