//! The front ends over the trackers: the best tracker available (`open`: the daemon, the
//! eBPF programs in process, or /proc), the one-call snapshot of a live tree
//! (`snapshot`: `get_resource_usage`), the reports (`report`: text and JSON; `tree`: the
//! human process tree; `commands`: the by-command table), the timeline (`trace`: the Chrome
//! trace event format), and the flame graph (`flamegraph`, with the `pictures` feature).
pub mod commands;
#[cfg(feature = "pictures")]
pub(crate) mod flamegraph;
pub(crate) mod open;
pub mod report;
pub(crate) mod snapshot;
pub mod trace;
pub mod tree;
