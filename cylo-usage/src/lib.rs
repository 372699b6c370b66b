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
mod attach;
pub mod btf;
pub mod features;
pub mod loader;
pub mod procfs;
pub mod report;
pub mod resolve;
pub mod session;
pub mod tree;
pub mod usage;

pub use loader::{LoadError, Options, Tracker};
pub use session::{Run, RunOptions, SessionError};
pub use tree::ProcessUsage;
pub use usage::{Precision, ResourceUsage};

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
