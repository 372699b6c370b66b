//! The daemon's own counters (sessions, refusals, requests, what ended sessions failed to
//! follow), kept whether or not they are served, and what the metrics endpoint
//! (`metrics.rs`, the `metrics` feature) reads of the daemon ([`Source`]).
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::limits::Limit;
#[cfg(feature = "metrics")]
use crate::kernel::tracker::RunsTotals;

/// What the endpoint reads of the daemon, which implements it: the endpoint sees the
/// daemon's figures, never its tables or locks.
#[cfg(feature = "metrics")]
pub(crate) trait Source: Send + Sync {
    /// The daemon's counters.
    fn counters(&self) -> &Counters;
    /// Sessions and connections open now.
    fn sessions_and_connections(&self) -> (usize, usize);
    /// What every session so far failed to follow (the live ones and the ended ones), and
    /// the membership maps' fill.
    fn kernel_state(&self) -> (RunsTotals, Vec<(&'static str, usize, u32)>);
    /// Each program's name, kernel run time (ns) and calls, when the kernel's per-program
    /// statistics are on.
    fn program_stats(&self) -> Option<Vec<(String, u64, u64)>>;
    /// Whether the hooks are attached now.
    fn hooks_attached(&self) -> bool;
}

/// Counters for `--metrics`.
#[derive(Default)]
pub(crate) struct Counters {
    pub sessions_total: AtomicU64,
    pub sessions_refused: AtomicU64,
    pub connections_total: AtomicU64,
    pub requests_total: AtomicU64,
    pub bad_requests_total: AtomicU64,
    /// What sessions that have ended failed to follow.
    pub ended: EndedTotals,
    /// Held while a session's figures move from the live runs to `ended`, and while both are
    /// read.
    pub ending: Mutex<()>,
    /// Event-stream bytes dropped because a client did not read them.
    pub events_dropped_bytes: AtomicU64,
    pub hooks_attached: AtomicU64,
    pub hooks_attach_ns_last: AtomicU64,
    pub hooks_detach_total: AtomicU64,
    /// Clients refused or cut off, by the limit that said so (indexed as [`Limit::ALL`]).
    pub refused: [AtomicU64; Limit::ALL.len()],
}

/// [`RunsTotals`] of the sessions that have ended.
#[derive(Default)]
pub(crate) struct EndedTotals {
    pub lost_events: AtomicU64,
    pub tasks_killed_at_birth: AtomicU64,
    pub tasks_escaped: AtomicU64,
}

impl Counters {
    pub(crate) fn refused_for(&self, limit: Limit) {
        let i = Limit::ALL.iter().position(|&l| l == limit).unwrap_or(0);
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }
}
