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
//! Without the privileges (or the kernel BTF) the eBPF programs need, [`Tracker::open`] gives
//! the /proc fallback instead ([`fallback`]): CPU and disk still exact from `wait4()`, the
//! rest sampled, every report marked approximate. [`get_resource_usage`] is a one-call
//! snapshot of a live process tree from /proc.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cylo_usage::Error> {
//! use cylo_usage::{OpenOptions, Tracker};
//! let tracker = Tracker::open(OpenOptions::default())?; // eBPF if possible, else /proc
//! let mut run = tracker.spawn(std::process::Command::new("make").arg("-j2"))?;
//! run.wait_root().await?;
//! run.wait_finished().await?;
//! let usage = run.usage()?;
//! println!("{:?}: {} ns of CPU ({:?})", usage.tracker, usage.cpu_time_ns, usage.precision);
//! # Ok(()) }
//! ```
mod attach;
mod aya_loader;
pub mod btf;
pub mod daemon;
mod error;
pub mod fallback;
pub mod features;
pub mod loader;
mod offsets_cache;
mod open;
pub mod procfs;
pub mod proctree;
pub mod report;
pub mod resolve;
pub mod session;
mod snapshot;
pub mod tree;
pub mod usage;

pub use error::Error;
pub use fallback::{FallbackError, ProcRun, ProcTracker};
pub use loader::{LoadError, Options, Tracker};
pub use open::{AnyRun, AnyTracker, OpenOptions};
pub use session::{Run, RunOptions, SessionError};
pub use snapshot::get_resource_usage;
pub use tree::ProcessUsage;
pub use usage::{Precision, ResourceUsage, TrackerKind};

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
