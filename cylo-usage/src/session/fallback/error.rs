//! Why a fallback session fails.
use crate::session::run::SessionError;
use crate::sys::procfs::ProcError;
use crate::usage::{Enforcement, Resource};

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
    /// A budget (`--max-*`) the /proc fallback cannot enforce: any, with
    /// [`Enforcement::Exact`] (only the eBPF tracker enforces a budget at the crossing; the
    /// fallback would only see it in a sample), and a network budget in any case (the
    /// fallback has no network counters). Nothing was started.
    #[error("{options} cannot be enforced: {missing}")]
    Unenforceable {
        /// The budgets refused, in report order.
        resources: Vec<Resource>,
        /// Their options, as the command line names them (`--max-processes, --max-cpu`).
        options: String,
        /// The enforcement asked for.
        enforcement: Enforcement,
        /// What is missing, and what to do instead (one line).
        missing: String,
    },
    /// A budget that can never be met (`--max-processes 0`). Nothing was started.
    #[error("invalid budget: {reason}")]
    InvalidBudget {
        /// Why.
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

/// The [`FallbackError::Io`] of a failed `what`, for `map_err`.
pub(super) fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> FallbackError {
    move |source| FallbackError::Io { what, source }
}
