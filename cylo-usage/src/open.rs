//! The best tracker this process can have: [`Tracker::open`] uses the daemon
//! (`cylo-usage serve`) when its socket answers, else loads the eBPF programs if it can
//! (exact), and otherwise gives the /proc fallback (approximate), unless
//! [`OpenOptions::require_exact`] says to fail instead. Runs of any of them have the same
//! surface ([`AnyRun`]).
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::daemon::{DaemonTracker, RemoteRun};
use crate::error::Error;
use crate::fallback::{DEFAULT_INTERVAL, ProcRun, ProcTracker};
use crate::run::{Run, RunOptions};
use crate::tracker::{Options, Tracker};
use crate::usage::{ResourceUsage, TrackerKind};

/// How [`Tracker::open`] chooses.
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
    pub load: Options,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            daemon: true,
            socket: None,
            require_exact: false,
            sample_interval: DEFAULT_INTERVAL,
            load: Options::default(),
        }
    }
}

/// A tracker of either kind. Cheap to clone.
#[derive(Clone)]
pub enum AnyTracker {
    /// The daemon's programs, through its socket: exact.
    Daemon(DaemonTracker),
    /// The eBPF programs, loaded in this process: exact.
    InProcess(Tracker),
    /// The /proc fallback: approximate.
    Proc(ProcTracker),
}

/// The first line of `text`, at most 300 characters (a verifier log may follow it).
fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}

impl Tracker {
    /// The best tracker available: the eBPF programs if they load in this process, else the
    /// /proc fallback (no `CAP_BPF`/`CAP_PERFMON`, no kernel BTF, a verifier that refuses the
    /// programs, no BPF ring buffer), unless `options.require_exact`.
    pub fn open(options: OpenOptions) -> Result<AnyTracker, Error> {
        if options.daemon {
            let path = options
                .socket
                .clone()
                .unwrap_or_else(crate::daemon::socket_path);
            // No daemon, or one this user may not use: the tracker is loaded here instead.
            if let Ok(daemon) = Tracker::connect(&path) {
                return Ok(AnyTracker::Daemon(daemon));
            }
        }
        match Tracker::load_with_options(options.load) {
            Ok(t) => Ok(AnyTracker::InProcess(t)),
            Err(source) if options.require_exact => Err(Error::ExactUnavailable { source }),
            Err(e) => Ok(AnyTracker::Proc(ProcTracker::new(
                first_line(&crate::error_chain(&e)),
                options.sample_interval,
            ))),
        }
    }
}

impl AnyTracker {
    /// Which kind it is (the reports' `tracker` field).
    pub fn kind(&self) -> TrackerKind {
        match self {
            AnyTracker::Daemon(_) => TrackerKind::Daemon,
            AnyTracker::InProcess(_) => TrackerKind::InProcess,
            AnyTracker::Proc(_) => TrackerKind::Proc,
        }
    }

    /// Why the eBPF tracker is not used, for the fallback.
    pub fn fallback_reason(&self) -> Option<&str> {
        match self {
            AnyTracker::Daemon(_) | AnyTracker::InProcess(_) => None,
            AnyTracker::Proc(p) => Some(p.reason()),
        }
    }

    /// Starts `command` as the root of a new run (see [`Tracker::spawn`] and
    /// [`ProcTracker::spawn`]).
    pub fn spawn(&self, command: &mut Command) -> Result<AnyRun, Error> {
        self.spawn_with(command, RunOptions::default())
    }

    /// [`AnyTracker::spawn`] with a breakdown or an event stream (the fallback refuses both).
    pub fn spawn_with(&self, command: &mut Command, options: RunOptions) -> Result<AnyRun, Error> {
        Ok(match self {
            AnyTracker::Daemon(t) => AnyRun::Daemon(t.spawn_with(command, options)?),
            AnyTracker::InProcess(t) => AnyRun::InProcess(t.spawn_with(command, options)?),
            AnyTracker::Proc(t) => AnyRun::Proc(t.spawn_with(command, options)?),
        })
    }

    /// Follows running process `pid` and its descendants from now on.
    pub fn attach(&self, pid: u32) -> Result<AnyRun, Error> {
        self.attach_with(pid, RunOptions::default())
    }

    /// [`AnyTracker::attach`] with a breakdown or an event stream (the fallback refuses both).
    pub fn attach_with(&self, pid: u32, options: RunOptions) -> Result<AnyRun, Error> {
        Ok(match self {
            AnyTracker::Daemon(t) => AnyRun::Daemon(t.attach_with(pid, options)?),
            AnyTracker::InProcess(t) => AnyRun::InProcess(t.attach_with(pid, options)?),
            AnyTracker::Proc(t) => AnyRun::Proc(t.attach_with(pid, options)?),
        })
    }
}

/// A run of either tracker.
pub enum AnyRun {
    Daemon(RemoteRun),
    InProcess(Run),
    Proc(ProcRun),
}

impl AnyRun {
    pub fn kind(&self) -> TrackerKind {
        match self {
            AnyRun::Daemon(_) => TrackerKind::Daemon,
            AnyRun::InProcess(_) => TrackerKind::InProcess,
            AnyRun::Proc(_) => TrackerKind::Proc,
        }
    }

    /// The root's pid.
    pub fn root_pid(&self) -> u32 {
        match self {
            AnyRun::Daemon(r) => r.root_pid(),
            AnyRun::InProcess(r) => r.root_pid(),
            AnyRun::Proc(r) => r.root_pid(),
        }
    }

    /// Whether the run attached to running processes.
    pub fn is_attached(&self) -> bool {
        match self {
            AnyRun::Daemon(r) => r.is_attached(),
            AnyRun::InProcess(r) => r.is_attached(),
            AnyRun::Proc(r) => r.is_attached(),
        }
    }

    /// The root's exit status, once it has ended and when it is known (it is unknown only
    /// for a root the fallback attached to and never saw as a zombie).
    pub fn root_status(&self) -> Option<ExitStatus> {
        match self {
            AnyRun::Daemon(r) => r.root_status(),
            AnyRun::InProcess(r) => r.root_status(),
            AnyRun::Proc(r) => r.root_status(),
        }
    }

    /// Whether the root has ended, without waiting (reaps it when it is the tracker's child).
    pub fn root_ended(&mut self) -> Result<bool, Error> {
        Ok(match self {
            AnyRun::Daemon(r) => r.try_wait_root()?.is_some(),
            AnyRun::InProcess(r) => r.try_wait_root()?.is_some(),
            AnyRun::Proc(r) => r.root_ended(),
        })
    }

    /// Waits for the root to end; its status when known (see [`AnyRun::root_status`]).
    pub async fn wait_root(&mut self) -> Result<Option<ExitStatus>, Error> {
        Ok(match self {
            AnyRun::Daemon(r) => Some(r.wait_root().await?),
            AnyRun::InProcess(r) => Some(r.wait_root().await?),
            AnyRun::Proc(r) => r.wait_root().await,
        })
    }

    /// Waits until every process of the tree has ended, daemons included.
    pub async fn wait_finished(&self) -> Result<(), Error> {
        match self {
            AnyRun::Daemon(r) => r.wait_finished().await?,
            AnyRun::InProcess(r) => r.wait_finished().await?,
            AnyRun::Proc(r) => r.wait_finished().await,
        }
        Ok(())
    }

    /// True once every process of the tree has ended.
    pub fn is_finished(&self) -> Result<bool, Error> {
        Ok(match self {
            AnyRun::Daemon(r) => r.is_finished()?,
            AnyRun::InProcess(r) => r.is_finished()?,
            AnyRun::Proc(r) => r.is_finished(),
        })
    }

    /// What the tree has used so far (with the breakdown, if one was asked for).
    pub fn usage(&self) -> Result<ResourceUsage, Error> {
        Ok(match self {
            AnyRun::Daemon(r) => r.usage()?,
            AnyRun::InProcess(r) => r.usage()?,
            AnyRun::Proc(r) => r.usage()?,
        })
    }

    /// [`AnyRun::usage`] without the breakdown: cheaper, for live views.
    pub fn usage_totals(&self) -> Result<ResourceUsage, Error> {
        Ok(match self {
            AnyRun::Daemon(r) => r.usage_totals()?,
            AnyRun::InProcess(r) => r.usage_totals()?,
            AnyRun::Proc(r) => r.usage()?,
        })
    }

    /// Sends `signal` to every live process of the tree; returns how many were signalled.
    pub fn kill(&self, signal: i32) -> Result<usize, Error> {
        Ok(match self {
            AnyRun::Daemon(r) => r.kill(signal)?,
            AnyRun::InProcess(r) => r.kill(signal)?,
            AnyRun::Proc(r) => r.kill(signal)?,
        })
    }

    /// Sends `signal` to the root, if it has not ended.
    pub fn signal_root(&self, signal: i32) -> Result<(), Error> {
        match self {
            AnyRun::Daemon(r) => r.signal_root(signal)?,
            AnyRun::InProcess(r) => r.signal_root(signal)?,
            AnyRun::Proc(r) => r.signal_root(signal)?,
        }
        Ok(())
    }

    /// Marks the run as ended by a timeout (the report says so).
    pub fn set_timed_out(&mut self) {
        match self {
            AnyRun::Daemon(r) => r.set_timed_out(),
            AnyRun::InProcess(r) => r.set_timed_out(),
            AnyRun::Proc(r) => r.set_timed_out(),
        }
    }

    /// File descriptors that become readable when something may have changed (the last is
    /// the one [`AnyRun::clear_wake`] empties). For event loops.
    pub fn wake_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        match self {
            AnyRun::Daemon(r) => r.wake_fds(),
            AnyRun::InProcess(r) => r.wake_fds(),
            AnyRun::Proc(r) => r.wake_fds(),
        }
    }

    /// Empties the wake-up descriptor after a wake-up.
    pub fn clear_wake(&self) {
        match self {
            AnyRun::Daemon(r) => r.clear_wake(),
            AnyRun::InProcess(r) => r.clear_wake(),
            AnyRun::Proc(r) => r.clear_wake(),
        }
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
        assert_eq!(first_line(&long), "verifier said no");
        assert_eq!(first_line(&"y".repeat(500)).len(), 300);
    }
}
