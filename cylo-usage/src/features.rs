//! Which counters this build measures on the running kernel, and how. Decided when the
//! programs load (the verifier and BTF say what the kernel offers), never from its version.
use serde::Serialize;

use crate::loader::Unavailable;
use crate::usage::Measured;

/// One counter of [`crate::ResourceUsage`] and whether (and how) it is measured here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Feature {
    /// The field name in `ResourceUsage` / the JSON report.
    pub counter: &'static str,
    pub measured: bool,
    /// How it is measured, or why it is not.
    pub how: String,
}

const NOT_YET: &str = "not measured by this build (null)";
const IOAC: &str = "task_struct.ioac of each thread at its last context switch; live threads \
                    from /proc/PID/task/TID/io";
const NO_IOAC: &str = "the kernel has no task I/O accounting (CONFIG_TASK_IO_ACCOUNTING)";
const NO_XACCT: &str = "the kernel has no extended I/O accounting (CONFIG_TASK_XACCT)";
const RSS: &str = "raw tracepoint rss_stat on every change of a tracked address space's \
                   file, anon and shmem counters; shared address spaces count once";

/// The counters and how each is measured given what the kernel accepted;
/// `refused` says what the kernel refused, where it did.
pub(crate) fn features(m: Measured, refused: &Unavailable) -> Vec<Feature> {
    let yes = |counter, how: &str| Feature {
        counter,
        measured: true,
        how: how.to_string(),
    };
    let no = |counter, how: &str| Feature {
        counter,
        measured: false,
        how: how.to_string(),
    };
    let pick = |measured, counter, how: &str, why: &str| Feature {
        counter,
        measured,
        how: if measured { how } else { why }.to_string(),
    };
    let no_devices = format!(
        "not measured (null): {}",
        refused.devices.as_deref().unwrap_or("unknown")
    );
    let no_atomics = format!(
        "not measured (null): the verifier refused the handlers that use atomic fetch, \
         exchange and compare-and-exchange (BPF ISA v3, kernel 5.12): {}",
        refused.atomics.as_deref().unwrap_or("unknown")
    );
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
        if m.atomics {
            yes(
                "peak_process_count",
                "atomic fetch-add and compare-and-exchange on the run's record at each join",
            )
        } else {
            no("peak_process_count", &no_atomics)
        },
        yes(
            "live_process_count",
            "processes joined minus processes whose last thread passed do_exit() \
             (raw tracepoint sched_process_exit, signal_struct.live at 0)",
        ),
        pick(m.disk, "disk_bytes_read", IOAC, NO_IOAC),
        pick(m.disk, "disk_bytes_written", IOAC, NO_IOAC),
        pick(m.disk, "disk_cancelled_write_bytes", IOAC, NO_IOAC),
        pick(
            m.devices,
            "disk_devices",
            "raw tracepoint block_bio_queue in the submitting task's context, per device",
            &no_devices,
        ),
        pick(m.io_chars, "io_read_chars", IOAC, NO_XACCT),
        pick(m.io_chars, "io_write_chars", IOAC, NO_XACCT),
        pick(m.atomics, "memory_bytes", RSS, &no_atomics),
        pick(m.atomics, "peak_memory_bytes", RSS, &no_atomics),
        pick(
            m.atomics,
            "max_process_rss_bytes",
            "the high-water mark of each tracked address space, followed through rss_stat \
             like the kernel's own (VmHWM); VmHWM for live processes",
            &no_atomics,
        ),
        no("network_bytes_sent", NOT_YET),
        no("network_bytes_received", NOT_YET),
        pick(
            m.records,
            "processes",
            if refused.records.is_none() {
                "per-process records (--tree, --events) from the fork, exec, exit and last-switch \
                 hooks, through a ring buffer; argv read in the kernel at exec"
            } else {
                "per-process records (--tree, --events); without argv and file names: the kernel \
                 lacks their layout"
            },
            "not available: this kernel's BTF lacks task_struct.comm or exit_code",
        ),
        pick(
            m.attach,
            "attach",
            "a task is adopted from its /proc/PID/task/TID directory (BPF_PROG_TEST_RUN of the \
             control program), and by the hooks while the attach runs",
            &format!(
                "not available: {}",
                refused.attach.as_deref().unwrap_or("unknown")
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_usage_field_that_is_a_counter_is_listed_once() {
        let list = features(Measured::ALL, &Unavailable::default());
        let mut names: Vec<_> = list.iter().map(|f| f.counter).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), list.len());
        let peak = |m| {
            features(m, &Unavailable::default())
                .into_iter()
                .find(|f| f.counter == "peak_process_count")
                .unwrap()
                .measured
        };
        assert!(peak(Measured::ALL));
        assert!(!peak(Measured {
            atomics: false,
            ..Measured::ALL
        }));
    }
}
