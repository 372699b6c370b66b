//! The front ends over the trackers: the best tracker available (`open`: the daemon, the
//! eBPF programs in process, or /proc), and the reports (`report`: text and JSON).
pub(crate) mod open;
pub mod report;
