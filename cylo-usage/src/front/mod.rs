//! The front ends over the trackers: the best tracker available (`open`: the daemon, the
//! eBPF programs in process, or /proc), the one-call snapshot of a live tree
//! (`snapshot`: `get_resource_usage`), and the reports (`report`: text and JSON).
pub(crate) mod open;
pub mod report;
pub(crate) mod snapshot;
