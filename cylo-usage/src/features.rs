//! Which counters this build measures on the running kernel, and how. Decided when the
//! programs load (the verifier and BTF say what the kernel offers), never from its version.
use serde::Serialize;

use crate::usage::Measured;

/// One counter of [`crate::ResourceUsage`] and whether (and how) it is measured here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Feature {
    /// The field name in `ResourceUsage` / the JSON report.
    pub counter: &'static str,
    pub measured: bool,
    /// How it is measured, or why it is not.
    pub how: &'static str,
}

const NOT_YET: &str = "not measured by this build (null)";

/// The counters and how each is measured given what the kernel accepted.
pub fn features(m: Measured) -> Vec<Feature> {
    let yes = |counter, how| Feature {
        counter,
        measured: true,
        how,
    };
    let no = |counter, how| Feature {
        counter,
        measured: false,
        how,
    };
    let cpu = "task_struct.se.sum_exec_runtime of each thread at its last context switch \
               (raw tracepoint sched_switch, TASK_DEAD); live threads from /proc schedstat";
    vec![
        yes("cpu_time_ns", cpu),
        yes(
            "cpu_user_ns",
            "the runtime split by the tick-sampled utime:stime ratio, as getrusage does",
        ),
        yes(
            "cpu_system_ns",
            "the runtime split by the tick-sampled utime:stime ratio, as getrusage does",
        ),
        yes(
            "process_count",
            "every task created by a tracked task joins in raw tracepoint task_newtask",
        ),
        yes(
            "thread_count",
            "every task created by a tracked task joins in raw tracepoint task_newtask",
        ),
        if m.peak_processes {
            yes(
                "peak_process_count",
                "atomic fetch-add and compare-and-exchange on the run's record at each join",
            )
        } else {
            no(
                "peak_process_count",
                "the kernel's BPF verifier rejects atomic fetch and compare-and-exchange \
                 (added in 5.12), so the peak cannot be kept exactly (null)",
            )
        },
        yes(
            "live_process_count",
            "processes joined minus processes whose last thread passed do_exit() (raw tracepoint sched_process_exit, signal_struct.live at 0)",
        ),
        no("disk_bytes_read", NOT_YET),
        no("disk_bytes_written", NOT_YET),
        no("memory_bytes", NOT_YET),
        no("peak_memory_bytes", NOT_YET),
        no("network_bytes_sent", NOT_YET),
        no("network_bytes_received", NOT_YET),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_usage_field_that_is_a_counter_is_listed_once() {
        let list = features(Measured::ALL);
        let mut names: Vec<_> = list.iter().map(|f| f.counter).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), list.len());
        let peak = |m| {
            features(m)
                .into_iter()
                .find(|f| f.counter == "peak_process_count")
                .unwrap()
                .measured
        };
        assert!(peak(Measured::ALL));
        assert!(!peak(Measured {
            peak_processes: false
        }));
    }
}
