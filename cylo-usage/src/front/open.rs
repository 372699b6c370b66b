//! The best tracker this process can have: [`AnyTracker::open`] uses the daemon
//! (`cylo-usage serve`) when its socket answers, else loads the eBPF programs if it can
//! (exact), and otherwise gives the /proc fallback (approximate), unless
//! [`OpenOptions::require_exact`] says to fail instead. Runs of any of them have the same
//! surface ([`AnyRun`]).
//!
//! A refusal never costs a command: when the daemon answers but refuses (no free run slot,
//! the user's session cap, a stalled or failed daemon), at `hello` or at a spawn or attach,
//! the run is started the other way (in-process when the programs load here, else the /proc
//! fallback), and its report's `precision_notes` begin with what the daemon said. Only
//! `require_exact` turns that into an error ([`Error::ExactUnavailable`], naming both the
//! daemon's reason and why the programs cannot be loaded here). A daemon that is simply
//! absent (no socket, nobody listening, not this user's to use) is passed over quietly.
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::daemon::{DaemonError, DaemonTracker, ErrorKind, Interrupt, RemoteRun};
use crate::error::Error;
use crate::kernel::tracker::{Capacities, Tracker};
use crate::session::fallback::{DEFAULT_INTERVAL, ProcRun, ProcTracker};
use crate::session::run::{Run, RunOptions};
use crate::usage::{ResourceUsage, TrackerKind};

/// How [`AnyTracker::open`] chooses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// Try the daemon first (default); `false` is `--no-daemon`.
    pub daemon: bool,
    /// The daemon's socket (default: [`crate::daemon::socket_path`]).
    pub socket: Option<PathBuf>,
    /// Fail ([`Error::ExactUnavailable`], naming what is missing) rather than fall back to
    /// the approximate /proc tracker.
    pub require_exact: bool,
    /// How often the /proc fallback samples (default 10 ms).
    pub sample_interval: Duration,
    /// Map capacities for the eBPF tracker.
    pub load: Capacities,
    /// A descriptor that cuts calls to the daemon short once readable (the command line's
    /// signalfd): see [`Interrupt`].
    pub interrupt: Option<Interrupt>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            daemon: true,
            socket: None,
            require_exact: false,
            sample_interval: DEFAULT_INTERVAL,
            load: Capacities::default(),
            interrupt: None,
        }
    }
}

/// `$body` for whichever run `$which` (a `RunWhich`) holds, bound to `$r`: for the calls the
/// three runs answer alike.
macro_rules! each_run {
    ($which:expr, $r:ident => $body:expr) => {
        match $which {
            RunWhich::Daemon($r) => $body,
            RunWhich::InProcess($r) => $body,
            RunWhich::Proc($r) => $body,
        }
    };
}

/// `$body` for whichever tracker `$which` (a `Which`) holds, bound to `$t`.
macro_rules! each_tracker {
    ($which:expr, $t:ident => $body:expr) => {
        match $which {
            Which::Daemon($t) => $body,
            Which::InProcess($t) => $body,
            Which::Proc($t) => $body,
        }
    };
}

/// What [`AnyTracker`] asks of each kind of tracker, in one signature (the crate's errors),
/// so that it is written once for all three.
trait Starts {
    fn start_run(&self, command: &mut Command, options: RunOptions) -> Result<RunWhich, Error>;
    fn attach_run(&self, pid: libc::pid_t, options: RunOptions) -> Result<RunWhich, Error>;
}

impl Starts for DaemonTracker {
    fn start_run(&self, command: &mut Command, options: RunOptions) -> Result<RunWhich, Error> {
        Ok(RunWhich::Daemon(Box::new(
            self.spawn_with(command, options)?,
        )))
    }
    fn attach_run(&self, pid: libc::pid_t, options: RunOptions) -> Result<RunWhich, Error> {
        Ok(RunWhich::Daemon(Box::new(self.attach_with(pid, options)?)))
    }
}

impl Starts for Tracker {
    fn start_run(&self, command: &mut Command, options: RunOptions) -> Result<RunWhich, Error> {
        Ok(RunWhich::InProcess(self.spawn_with(command, options)?))
    }
    fn attach_run(&self, pid: libc::pid_t, options: RunOptions) -> Result<RunWhich, Error> {
        Ok(RunWhich::InProcess(self.attach_with(pid, options)?))
    }
}

impl Starts for ProcTracker {
    fn start_run(&self, command: &mut Command, options: RunOptions) -> Result<RunWhich, Error> {
        Ok(RunWhich::Proc(self.spawn_with(command, options)?))
    }
    fn attach_run(&self, pid: libc::pid_t, options: RunOptions) -> Result<RunWhich, Error> {
        Ok(RunWhich::Proc(self.attach_with(pid, options)?))
    }
}

/// What [`AnyRun`] asks of each kind of run where their own surfaces differ (what is
/// unknown, what cannot fail), in one signature, so that it is written once for all three.
trait Follows {
    /// Whether the root has ended, without waiting.
    fn root_ended_now(&mut self) -> Result<bool, Error>;
    /// Waits for the root; its status when known.
    async fn root_waited(&mut self) -> Result<Option<ExitStatus>, Error>;
    /// Waits until every process of the tree has ended.
    async fn finished_waited(&self) -> Result<(), Error>;
    fn finished_now(&self) -> Result<bool, Error>;
    /// The totals without a breakdown.
    fn totals_now(&self) -> Result<ResourceUsage, Error>;
}

impl Follows for RemoteRun {
    fn root_ended_now(&mut self) -> Result<bool, Error> {
        Ok(self.root_ended()?)
    }
    async fn root_waited(&mut self) -> Result<Option<ExitStatus>, Error> {
        Ok(Some(self.wait_root().await?))
    }
    async fn finished_waited(&self) -> Result<(), Error> {
        Ok(self.wait_finished().await?)
    }
    fn finished_now(&self) -> Result<bool, Error> {
        Ok(self.is_finished()?)
    }
    fn totals_now(&self) -> Result<ResourceUsage, Error> {
        Ok(self.usage_totals()?)
    }
}

impl Follows for Run {
    fn root_ended_now(&mut self) -> Result<bool, Error> {
        Ok(self.try_wait_root()?.is_some())
    }
    async fn root_waited(&mut self) -> Result<Option<ExitStatus>, Error> {
        Ok(Some(self.wait_root().await?))
    }
    async fn finished_waited(&self) -> Result<(), Error> {
        Ok(self.wait_finished().await?)
    }
    fn finished_now(&self) -> Result<bool, Error> {
        Ok(self.is_finished()?)
    }
    fn totals_now(&self) -> Result<ResourceUsage, Error> {
        Ok(self.usage_totals()?)
    }
}

/// The fallback cannot fail at these, and its totals are all it has.
impl Follows for ProcRun {
    fn root_ended_now(&mut self) -> Result<bool, Error> {
        Ok(self.root_ended())
    }
    async fn root_waited(&mut self) -> Result<Option<ExitStatus>, Error> {
        Ok(self.wait_root().await)
    }
    async fn finished_waited(&self) -> Result<(), Error> {
        self.wait_finished().await;
        Ok(())
    }
    fn finished_now(&self) -> Result<bool, Error> {
        Ok(self.is_finished())
    }
    fn totals_now(&self) -> Result<ResourceUsage, Error> {
        Ok(self.usage()?)
    }
}

/// The trackers [`AnyTracker`] may be.
#[derive(Clone)]
enum Which {
    Daemon(DaemonTracker),
    InProcess(Tracker),
    Proc(ProcTracker),
}

/// A tracker of any kind: the daemon's (exact), the eBPF programs loaded in this process
/// (exact), or the /proc fallback (approximate). Cheap to clone.
#[derive(Clone)]
pub struct AnyTracker {
    which: Which,
    /// Why the daemon, which answers, is not used (said in every report).
    refusal: Option<Arc<str>>,
    options: OpenOptions,
    /// The tracker runs start with when the daemon refuses one (loaded once, when first
    /// needed).
    instead: Arc<OnceLock<Which>>,
}

/// Whether the daemon is simply not there for this process (no socket, nobody listening,
/// a socket this user may not open): passed over quietly.
fn daemon_absent(e: &DaemonError) -> bool {
    matches!(e, DaemonError::Connect { .. })
}

/// What the daemon at `path` said or did, for notes and errors.
fn refusal_text(path: &std::path::Path, e: &DaemonError) -> String {
    match e {
        DaemonError::Refused { message, .. } => {
            format!("the daemon at {} refused: {message}", path.display())
        }
        DaemonError::RootNotJoined { source } => match &**source {
            DaemonError::Refused { message, .. } => format!(
                "the daemon at {} refused the started command (it was killed): {message}",
                path.display()
            ),
            other => format!(
                "the daemon at {} failed: {}",
                path.display(),
                crate::error_chain(other)
            ),
        },
        other => format!(
            "the daemon at {} failed: {}",
            path.display(),
            crate::error_chain(other)
        ),
    }
}

/// Loads the programs here, else gives the /proc fallback (unless `require_exact`).
fn load_here(options: &OpenOptions, refusal: Option<&str>) -> Result<Which, Error> {
    match Tracker::load_with_options(options.load) {
        Ok(t) => Ok(Which::InProcess(t)),
        Err(source) if options.require_exact => Err(match refusal {
            Some(daemon) => Error::ExactRefused {
                daemon: daemon.to_string(),
                source: Box::new(source),
            },
            None => Error::ExactUnavailable { source },
        }),
        Err(e) => Ok(Which::Proc(ProcTracker::new(
            crate::first_line(&crate::error_chain(&e)),
            options.sample_interval,
        ))),
    }
}

impl AnyTracker {
    /// The best tracker available: the daemon when its socket answers; else the eBPF
    /// programs if they load in this process, else the /proc fallback (no
    /// `CAP_BPF`/`CAP_PERFMON`, no kernel BTF, a verifier that refuses the programs, no BPF
    /// ring buffer), unless `options.require_exact`. A daemon that answers but refuses (or
    /// fails) is named in the reports of the runs started instead.
    pub fn open(options: OpenOptions) -> Result<AnyTracker, Error> {
        let mut refusal = None;
        if options.daemon {
            let path = options
                .socket
                .clone()
                .unwrap_or_else(crate::daemon::socket_path);
            match Tracker::connect_with(&path, options.interrupt.clone()) {
                Ok(daemon) => {
                    return Ok(AnyTracker {
                        which: Which::Daemon(daemon),
                        refusal: None,
                        options,
                        instead: Arc::default(),
                    });
                }
                Err(e) if daemon_absent(&e) => {
                    log::debug!("no daemon: {}", crate::error_chain(&e));
                }
                Err(e) => {
                    let text = refusal_text(&path, &e);
                    log::warn!("{text}: runs are started without the daemon");
                    refusal = Some(text);
                }
            }
        }
        let which = load_here(&options, refusal.as_deref())?;
        Ok(AnyTracker {
            which,
            refusal: refusal.map(Arc::from),
            options,
            instead: Arc::default(),
        })
    }
}

impl AnyTracker {
    /// Which kind it is (the reports' `tracker` field).
    pub fn kind(&self) -> TrackerKind {
        match &self.which {
            Which::Daemon(_) => TrackerKind::Daemon,
            Which::InProcess(_) => TrackerKind::InProcess,
            Which::Proc(_) => TrackerKind::Proc,
        }
    }

    /// The daemon's client, when the daemon is used.
    pub fn as_daemon(&self) -> Option<&DaemonTracker> {
        match &self.which {
            Which::Daemon(d) => Some(d),
            _ => None,
        }
    }

    /// The in-process tracker, when the programs are loaded here.
    pub fn as_in_process(&self) -> Option<&Tracker> {
        match &self.which {
            Which::InProcess(t) => Some(t),
            _ => None,
        }
    }

    /// The /proc fallback, when it is used.
    pub fn as_proc(&self) -> Option<&ProcTracker> {
        match &self.which {
            Which::Proc(p) => Some(p),
            _ => None,
        }
    }

    /// Why the eBPF tracker is not used, for the fallback.
    pub fn fallback_reason(&self) -> Option<&str> {
        match &self.which {
            Which::Daemon(_) | Which::InProcess(_) => None,
            Which::Proc(p) => Some(p.reason()),
        }
    }

    /// Why the daemon, which answers, is not used (it refused, or failed), if that is so.
    pub fn daemon_refusal(&self) -> Option<&str> {
        self.refusal.as_deref()
    }

    /// The tracker to use when the daemon refuses a run, loaded once.
    fn instead(&self, refusal: &str) -> Result<Which, Error> {
        if let Some(w) = self.instead.get() {
            return Ok(w.clone());
        }
        let w = load_here(&self.options, Some(refusal))?;
        let _ = self.instead.set(w.clone());
        Ok(w)
    }

    /// Starts `command` as the root of a new run (see [`Tracker::spawn`] and
    /// [`ProcTracker::spawn`]).
    pub fn spawn(&self, command: &mut Command) -> Result<AnyRun, Error> {
        self.spawn_with(command, RunOptions::default())
    }

    /// [`AnyTracker::spawn`] with a breakdown or an event stream (the fallback refuses both).
    /// Should the daemon refuse (or fail) before the command is created, it is started the
    /// other way, and the report says why.
    pub fn spawn_with(&self, command: &mut Command, options: RunOptions) -> Result<AnyRun, Error> {
        let refusal = self.refusal.clone();
        match &self.which {
            Which::Daemon(t) => match t.try_spawn(command, options).map_err(|f| *f) {
                Ok(r) => Ok(AnyRun::new(RunWhich::Daemon(Box::new(r)), None)),
                Err((e, Some(options))) => {
                    let text = refusal_text(t.path(), &e);
                    log::warn!("{text}: the command is started without the daemon");
                    let which = self.instead(&text)?;
                    spawn_on(&which, command, options, Some(Arc::from(text)))
                }
                Err((e, None)) => Err(e.into()),
            },
            which => spawn_on(which, command, options, refusal),
        }
    }

    /// Follows running process `pid` and its descendants from now on.
    pub fn attach(&self, pid: libc::pid_t) -> Result<AnyRun, Error> {
        self.attach_with(pid, RunOptions::default())
    }

    /// [`AnyTracker::attach`] with a breakdown or an event stream (the fallback refuses both).
    /// Should the daemon refuse for capacity (or fail), the attach is made the other way.
    pub fn attach_with(&self, pid: libc::pid_t, options: RunOptions) -> Result<AnyRun, Error> {
        let refusal = self.refusal.clone();
        match &self.which {
            Which::Daemon(t) => match t.try_attach(pid, options).map_err(|f| *f) {
                Ok(r) => Ok(AnyRun::new(RunWhich::Daemon(Box::new(r)), None)),
                // The process or the permission: the same answer any other way.
                Err((
                    e @ DaemonError::Refused {
                        kind: ErrorKind::NoSuchProcess | ErrorKind::Permission,
                        ..
                    },
                    _,
                )) => Err(e.into()),
                Err((e, Some(options))) => {
                    let text = refusal_text(t.path(), &e);
                    log::warn!("{text}: the process is attached to without the daemon");
                    let which = self.instead(&text)?;
                    attach_on(&which, pid, options, Some(Arc::from(text)))
                }
                Err((e, None)) => Err(e.into()),
            },
            which => attach_on(which, pid, options, refusal),
        }
    }
}

fn spawn_on(
    which: &Which,
    command: &mut Command,
    options: RunOptions,
    note: Option<Arc<str>>,
) -> Result<AnyRun, Error> {
    let run = each_tracker!(which, t => t.start_run(command, options)?);
    Ok(AnyRun::new(run, note))
}

fn attach_on(
    which: &Which,
    pid: libc::pid_t,
    options: RunOptions,
    note: Option<Arc<str>>,
) -> Result<AnyRun, Error> {
    let run = each_tracker!(which, t => t.attach_run(pid, options)?);
    Ok(AnyRun::new(run, note))
}

/// The runs [`AnyRun`] may be.
enum RunWhich {
    Daemon(Box<RemoteRun>),
    InProcess(Run),
    Proc(ProcRun),
}

/// A run of any tracker.
pub struct AnyRun {
    run: RunWhich,
    /// Why the daemon did not take this run (it refused, or failed): the report's first note.
    refusal: Option<Arc<str>>,
}

impl AnyRun {
    fn new(run: RunWhich, refusal: Option<Arc<str>>) -> AnyRun {
        AnyRun { run, refusal }
    }

    /// Which tracker follows this run: the daemon, this process's eBPF programs, or /proc.
    pub fn kind(&self) -> TrackerKind {
        match &self.run {
            RunWhich::Daemon(_) => TrackerKind::Daemon,
            RunWhich::InProcess(_) => TrackerKind::InProcess,
            RunWhich::Proc(_) => TrackerKind::Proc,
        }
    }

    /// Why the daemon, which answers, did not take this run, if that is so.
    pub fn daemon_refusal(&self) -> Option<&str> {
        self.refusal.as_deref()
    }

    /// The daemon's run, when the daemon took it.
    pub fn as_daemon(&self) -> Option<&RemoteRun> {
        match &self.run {
            RunWhich::Daemon(r) => Some(&**r),
            _ => None,
        }
    }

    /// See [`RemoteRun::set_subreaper`] (the other trackers reap for themselves: no-op).
    pub fn set_subreaper(&mut self, yes: bool) {
        if let RunWhich::Daemon(r) = &mut self.run {
            r.set_subreaper(yes);
        }
    }

    /// See [`RemoteRun::set_promise`] (the other trackers never wait on anyone: no-op).
    pub fn set_promise(&self, at: Option<std::time::Instant>) {
        if let RunWhich::Daemon(r) = &self.run {
            r.set_promise(at);
        }
    }

    /// The root's pid.
    pub fn root_pid(&self) -> libc::pid_t {
        each_run!(&self.run, r => r.root_pid())
    }

    /// Whether the run attached to running processes.
    pub fn is_attached(&self) -> bool {
        each_run!(&self.run, r => r.is_attached())
    }

    /// The root's exit status, once it has ended and when it is known (it is unknown only
    /// for a root the fallback attached to and never saw as a zombie).
    pub fn root_status(&self) -> Option<ExitStatus> {
        each_run!(&self.run, r => r.root_status())
    }

    /// Whether the root has ended, without waiting (reaps it when it is the tracker's child).
    pub fn root_ended(&mut self) -> Result<bool, Error> {
        each_run!(&mut self.run, r => r.root_ended_now())
    }

    /// Waits for the root to end; its status when known (see [`AnyRun::root_status`]).
    pub async fn wait_root(&mut self) -> Result<Option<ExitStatus>, Error> {
        each_run!(&mut self.run, r => r.root_waited().await)
    }

    /// Waits until every process of the tree has ended, daemons included.
    pub async fn wait_finished(&self) -> Result<(), Error> {
        each_run!(&self.run, r => r.finished_waited().await)
    }

    /// True once every process of the tree has ended.
    pub fn is_finished(&self) -> Result<bool, Error> {
        each_run!(&self.run, r => r.finished_now())
    }

    /// The daemon's refusal first among the notes.
    fn noted(&self, mut u: ResourceUsage) -> ResourceUsage {
        if let Some(r) = &self.refusal {
            let instead = match self.kind() {
                TrackerKind::InProcess => "the eBPF programs loaded in this process",
                TrackerKind::Proc => "the /proc fallback",
                TrackerKind::Daemon => "another daemon session",
            };
            u.precision_notes
                .insert(0, format!("tracker: {r}; this run used {instead} instead"));
        }
        u
    }

    /// What the tree has used so far (with the breakdown, if one was asked for).
    pub fn usage(&self) -> Result<ResourceUsage, Error> {
        let u = each_run!(&self.run, r => r.usage()?);
        Ok(self.noted(u))
    }

    /// [`AnyRun::usage`] without the breakdown: cheaper, for live views.
    pub fn usage_totals(&self) -> Result<ResourceUsage, Error> {
        let u = each_run!(&self.run, r => r.totals_now()?);
        Ok(self.noted(u))
    }

    /// Sends `signal` to every live process of the tree; returns how many were signalled.
    pub fn kill(&self, signal: i32) -> Result<usize, Error> {
        Ok(each_run!(&self.run, r => r.kill(signal)?))
    }

    /// Sends `signal` to the root, if it has not ended.
    pub fn signal_root(&self, signal: i32) -> Result<(), Error> {
        each_run!(&self.run, r => r.signal_root(signal)?);
        Ok(())
    }

    /// Marks the run as ended by a timeout (the report says so).
    pub fn set_timed_out(&mut self) {
        each_run!(&mut self.run, r => r.set_timed_out())
    }

    /// File descriptors that become readable when something may have changed (the last is
    /// the one [`AnyRun::clear_wake`] empties). For event loops.
    pub fn wake_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        each_run!(&self.run, r => r.wake_fds())
    }

    /// Empties the wake-up descriptor after a wake-up.
    pub fn clear_wake(&self) {
        each_run!(&self.run, r => r.clear_wake())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trackers_and_runs_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<AnyTracker>();
        send::<AnyRun>();
        send_sync::<Error>();
    }

    #[test]
    fn the_fallback_reason_is_one_short_line() {
        let long = format!("verifier said no\n{}", "x".repeat(1000));
        assert_eq!(crate::first_line(&long), "verifier said no");
        assert_eq!(crate::first_line(&"y".repeat(500)).len(), 300);
    }
}
