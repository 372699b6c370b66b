//! `ResourceUsage`: what a run used, merged from the kernel's per-run record and /proc reads
//! of the threads still alive. This module computes; [`crate::report`] only presents.
use cylo_usage_abi::RunCounters;
use serde::{Deserialize, Serialize};

use crate::procfs::ThreadCpu;

/// Whether the figures are complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Nothing was lost: every figure is exact.
    Exact,
    /// The kernel side lost records, or a live snapshot could not be made consistent.
    Approximate,
}

/// Everything a run used. One flat record; counters this build does not measure are `None`
/// (`null` in JSON), never a made-up 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// CPU time of every thread of the tree, in ns of the scheduler's runtime (what cgroup
    /// cpuacct counts), user and system together.
    pub cpu_time_ns: u64,
    /// `cpu_time_ns` in whole milliseconds (the field name older cylo code used, now real CPU).
    pub cpu_time_ms: u64,
    /// The user part of `cpu_time_ns`, split as the kernel splits it (tick samples scaled to
    /// the precise runtime, like `getrusage`).
    pub cpu_user_ns: u64,
    /// The system part of `cpu_time_ns`.
    pub cpu_system_ns: u64,
    /// Distinct processes that were ever part of the tree, the root included. Exec adds none.
    pub process_count: u64,
    /// Distinct threads ever, main threads included.
    pub thread_count: u64,
    /// The most processes alive at the same time. `None` on kernels whose BPF verifier lacks
    /// atomic fetch and compare-and-exchange (before 5.12): see `cylo-usage features`.
    pub peak_process_count: Option<u64>,
    /// Processes alive at the snapshot.
    pub live_process_count: u64,
    /// Bytes the tree made the storage layer read. Not measured by this build.
    pub disk_bytes_read: Option<u64>,
    /// Bytes the tree made the storage layer write. Not measured by this build.
    pub disk_bytes_written: Option<u64>,
    /// Resident memory of the tree's live processes at the snapshot. Not measured by this build.
    pub memory_bytes: Option<u64>,
    /// The highest resident memory of the whole tree at one moment. Not measured by this build.
    pub peak_memory_bytes: Option<u64>,
    /// Bytes the tree sent over sockets. Not measured by this build.
    pub network_bytes_sent: Option<u64>,
    /// Bytes the tree received over sockets. Not measured by this build.
    pub network_bytes_received: Option<u64>,
    /// Records the kernel side could not make (map or ring buffer full).
    pub lost_events: u64,
    /// `exact` when nothing was lost; `approximate` otherwise.
    pub precision: Precision,
    /// The root's exit status, when it exited normally; `None` while it runs or if a signal
    /// killed it.
    pub exit_code: Option<i32>,
    /// The signal that killed the root, if one did.
    pub signal: Option<i32>,
    /// Wall-clock time from the start to the end of the run (or to the snapshot while it runs).
    pub wall_time_ms: u64,
}

/// What the loaded programs can measure on this kernel (decided at load time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measured {
    /// The peak of processes alive at once (needs BPF atomic fetch and cmpxchg).
    pub peak_processes: bool,
}

impl Measured {
    /// Everything this build can measure.
    pub const ALL: Measured = Measured {
        peak_processes: true,
    };
}

/// How the root ended, as far as it is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RootExit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

/// The kernel's rule for splitting a precise runtime by tick samples (`cputime_adjust`):
/// returns (user, system) with user + system == runtime.
pub fn split_runtime(runtime: u64, utime: u64, stime: u64) -> (u64, u64) {
    if stime == 0 {
        return (runtime, 0);
    }
    if utime == 0 {
        return (0, runtime);
    }
    let system = (stime as u128 * runtime as u128 / (stime as u128 + utime as u128)) as u64;
    (runtime - system, system)
}

/// Merges the kernel's counters for a run with /proc reads of its live threads.
///
/// `live` holds what could be read of the threads alive at the snapshot; `complete` says
/// whether the snapshot is known to be consistent and whole.
pub fn merge(
    counters: &RunCounters,
    measured: Measured,
    live: &[ThreadCpu],
    ticks_per_second: u64,
    complete: bool,
    root: RootExit,
    wall_time_ms: u64,
) -> ResourceUsage {
    let tick_ns = 1_000_000_000 / ticks_per_second.max(1);
    let mut runtime = counters.cpu_runtime_ns;
    let mut utime = counters.cpu_utime_ns;
    let mut stime = counters.cpu_stime_ns;
    for t in live {
        runtime += t.runtime_ns;
        utime += t.utime_ticks * tick_ns;
        stime += t.stime_ticks * tick_ns;
    }
    let (user, system) = split_runtime(runtime, utime, stime);
    let exact = complete && counters.lost_events == 0;
    ResourceUsage {
        cpu_time_ns: runtime,
        cpu_time_ms: runtime / 1_000_000,
        cpu_user_ns: user,
        cpu_system_ns: system,
        process_count: counters.processes_started,
        thread_count: counters.threads_started,
        peak_process_count: measured.peak_processes.then_some(counters.processes_peak),
        live_process_count: counters.processes_alive,
        disk_bytes_read: None,
        disk_bytes_written: None,
        memory_bytes: None,
        peak_memory_bytes: None,
        network_bytes_sent: None,
        network_bytes_received: None,
        lost_events: counters.lost_events,
        precision: if exact {
            Precision::Exact
        } else {
            Precision::Approximate
        },
        exit_code: root.exit_code,
        signal: root.signal,
        wall_time_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> RunCounters {
        RunCounters {
            cpu_runtime_ns: 3_000_000_000,
            cpu_utime_ns: 2_000_000_000,
            cpu_stime_ns: 1_000_000_000,
            processes_started: 5,
            threads_started: 9,
            processes_alive: 1,
            processes_peak: 4,
            threads_exited: 7,
            lost_events: 0,
            ended_ns: 0,
        }
    }

    #[test]
    fn split_follows_cputime_adjust() {
        assert_eq!(split_runtime(1000, 0, 0), (1000, 0));
        assert_eq!(split_runtime(1000, 5, 0), (1000, 0));
        assert_eq!(split_runtime(1000, 0, 5), (0, 1000));
        assert_eq!(split_runtime(1000, 3, 1), (750, 250));
        // No overflow with large values; the parts always add up.
        let (u, s) = split_runtime(u64::MAX / 2, u64::MAX / 3, u64::MAX / 3);
        assert_eq!(u + s, u64::MAX / 2);
    }

    #[test]
    fn merge_adds_live_threads() {
        let live = [
            ThreadCpu {
                runtime_ns: 500_000_000,
                utime_ticks: 0,
                stime_ticks: 50,
                start_ticks: 1,
            },
            ThreadCpu {
                runtime_ns: 500_000_000,
                utime_ticks: 100,
                stime_ticks: 0,
                start_ticks: 1,
            },
        ];
        let u = merge(
            &counters(),
            Measured::ALL,
            &live,
            100,
            true,
            RootExit::default(),
            42,
        );
        assert_eq!(u.cpu_time_ns, 4_000_000_000);
        assert_eq!(u.cpu_time_ms, 4_000);
        // utime 2s + 1s, stime 1s + 0.5s → system = 4s * 1.5 / 4.5
        assert_eq!(u.cpu_system_ns, 1_333_333_333);
        assert_eq!(u.cpu_user_ns + u.cpu_system_ns, u.cpu_time_ns);
        assert_eq!(u.process_count, 5);
        assert_eq!(u.thread_count, 9);
        assert_eq!(u.peak_process_count, Some(4));
        assert_eq!(u.live_process_count, 1);
        assert_eq!(u.precision, Precision::Exact);
        assert_eq!(u.wall_time_ms, 42);
    }

    #[test]
    fn lost_events_or_inconsistent_snapshot_are_approximate() {
        let mut c = counters();
        c.lost_events = 3;
        let u = merge(&c, Measured::ALL, &[], 100, true, RootExit::default(), 0);
        assert_eq!((u.lost_events, u.precision), (3, Precision::Approximate));
        let u = merge(
            &counters(),
            Measured::ALL,
            &[],
            100,
            false,
            RootExit::default(),
            0,
        );
        assert_eq!(u.precision, Precision::Approximate);
    }

    #[test]
    fn json_is_flat_with_nulls_for_unmeasured() {
        let root = RootExit {
            exit_code: None,
            signal: Some(9),
        };
        let u = merge(&counters(), Measured::ALL, &[], 100, true, root, 7);
        let v: serde_json::Value = serde_json::to_value(&u).unwrap();
        let obj = v.as_object().unwrap();
        for key in [
            "disk_bytes_read",
            "disk_bytes_written",
            "memory_bytes",
            "peak_memory_bytes",
            "network_bytes_sent",
            "network_bytes_received",
            "exit_code",
        ] {
            assert!(obj[key].is_null(), "{key} should be null");
        }
        assert_eq!(obj["signal"], 9);
        assert_eq!(obj["precision"], "exact");
        assert!(obj.values().all(|v| !v.is_object() && !v.is_array()));
    }

    #[test]
    fn peak_is_null_where_the_kernel_cannot_measure_it() {
        let none = Measured {
            peak_processes: false,
        };
        let u = merge(&counters(), none, &[], 100, true, RootExit::default(), 0);
        assert_eq!(u.peak_process_count, None);
        assert_eq!(u.precision, Precision::Exact, "unmeasured is not imprecise");
    }
}
