//! cylo-usage: precise, eBPF-backed resource accounting for a process and every descendant it
//! ever has.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cylo_usage::Tracker;
//! let tracker = Tracker::load()?; // needs CAP_BPF + CAP_PERFMON, or root
//! let mut run = tracker.spawn(std::process::Command::new("make").arg("-j2"))?;
//! run.wait_root().await?;
//! run.wait_finished().await?; // daemons it left behind included
//! let usage = run.usage()?;
//! println!("{} ns of CPU in {} processes", usage.cpu_time_ns, usage.process_count);
//! # Ok(()) }
//! ```
//!
//! [`AnyTracker::open`] takes the best tracker there is: the host's daemon (`cylo-usage serve`,
//! [`daemon`]) when its socket answers, which any allowed user may use; else the programs
//! loaded in this process; and without the privileges (or the kernel BTF) they need, the
//! /proc fallback ([`ProcTracker`]): CPU and disk still exact from `wait4()`, the rest
//! sampled, every report marked approximate. [`get_resource_usage`] is a one-call snapshot of
//! a live process tree from /proc.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cylo_usage::Error> {
//! use cylo_usage::{AnyTracker, OpenOptions};
//! let tracker = AnyTracker::open(OpenOptions::default())?; // daemon, in-process, else /proc
//! let mut run = tracker.spawn(std::process::Command::new("make").arg("-j2"))?;
//! run.wait_root().await?;
//! run.wait_finished().await?;
//! let usage = run.usage()?;
//! println!("{:?}: {} ns of CPU ({:?})", usage.tracker, usage.cpu_time_ns, usage.precision);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

// The public surface: the trackers and their runs, what they report, the daemon, the
// counters' feature list, the reports' formats and the errors. Everything else is internal.
pub mod daemon;
mod error;
mod front;
mod kernel;
mod proc;
mod session;
mod sys;
mod usage;

pub use front::report;
pub use front::{commands, tree};
pub use kernel::features;
pub use session::budget;

/// The kernel's raw record of a run ([`Run::counters`]) and its counter set, as the eBPF
/// programs keep them (the ABI crate's types).
pub use cylo_usage_abi::{RunCounters, ThreadUsage};
pub use error::Error;
#[cfg(feature = "pictures")]
pub use front::flamegraph::{FlameWeight, FlamegraphError, flamegraph_svg, folded_stacks};
pub use front::open::{AnyRun, AnyTracker, OpenOptions};
pub use front::snapshot::get_resource_usage;
pub use front::trace::{TimelineSample, TraceAnchor, chrome_trace, write_chrome_trace};
pub use front::tree::TreeView;
pub use kernel::btf::{BtfError, Kind as BtfKind};
pub use kernel::map_read::MapReadError;
pub use kernel::programs::{LoadError, missing_privileges};
pub use kernel::resolve::ResolveError;
pub use kernel::tracker::{Capacities, MIN_TASKS, ONE_TREE_TASKS, ProgramSet, Tracker};
pub use session::breakdown::{DEFAULT_TREE_LIMIT, EventSink};
pub use session::fallback::{DEFAULT_INTERVAL, FallbackError, ProcRun, ProcTracker};
pub use session::run::{Run, RunOptions, SessionError};
pub use session::viewer::Viewer;
pub use sys::procfs::ProcError;
pub use sys::watch;
pub use usage::budgets;
pub use usage::{
    BudgetExceeded, Budgets, CommandUsage, CpuSplit, DiskDevice, EnforcedBy, Enforcement,
    NetworkUsage, Precision, ProcessUsage, Resource, ResourceUsage, SignalSent, TrackerKind,
    UsageBeforeAttach,
};

/// An error and all its sources on one line (`a: b: c`), for one-line messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// The first line of `text`, at most 300 characters: what a one-line message keeps of an
/// error chain (a verifier log may follow its first line).
pub(crate) fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}
