//! Parts of the command line kept apart from `main.rs`: its exit codes, what a failure to
//! start the command means (`exec`), where a session's outputs go (`outputs`), and the
//! man page and shell completions packagers ship (`docs`).
//!
//! Exit status follows GNU conventions: the command's own status, or 128+N when signal N
//! killed it; these when it did not run to its end on its own.
pub(crate) mod docs;
pub(crate) mod exec;
pub(crate) mod outputs;

/// A budget (`--max-*`) stopped the tree: chosen apart from timeout(1)'s 124 to 127, from
/// xargs's 123, and from 128+N (a command killed by signal N).
pub(crate) const EXIT_BUDGET_EXCEEDED: u8 = 120;
/// The timeout ended the command (timeout(1)'s code).
pub(crate) const EXIT_TIMED_OUT: u8 = 124;
/// cylo-usage itself failed (bad usage included).
pub(crate) const EXIT_TRACKER_FAILED: u8 = 125;
/// The command was found but cannot be run.
pub(crate) const EXIT_CANNOT_RUN: u8 = 126;
/// The command was not found.
pub(crate) const EXIT_NOT_FOUND: u8 = 127;
