//! Which counters this build measures on the running kernel, and how: what the loaded
//! programs can measure ([`Measured`]), why what is not measured is not (`Unavailable`),
//! and the list `cylo-usage features` prints ([`Feature`]). Decided when the programs load
//! (the verifier and BTF say what the kernel offers), never from its version.
use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// One counter of [`crate::ResourceUsage`] and whether (and how) it is measured here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    /// The field name in `ResourceUsage` / the JSON report.
    pub counter: Cow<'static, str>,
    /// Whether it is measured (if not, the counter is `null`).
    pub measured: bool,
    /// How it is measured, or why it is not.
    pub how: String,
}

/// What the loaded programs can measure on this kernel (decided at load time from what the
/// verifier accepted and what BTF has).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measured {
    /// BPF atomics that return the old value (fetch-add, exchange, cmpxchg): the peaks and
    /// the memory counters.
    pub atomics: bool,
    /// `task_struct.ioac` read/write/cancelled bytes (CONFIG_TASK_IO_ACCOUNTING).
    pub disk: bool,
    /// `task_struct.ioac` rchar/wchar (CONFIG_TASK_XACCT).
    pub io_chars: bool,
    /// The block_bio_queue hook and the bio layout.
    pub devices: bool,
    /// Attaching to running processes (the layouts that lead from a /proc directory to a task).
    pub attach: bool,
    /// Per-process records (`task_struct.comm`, exit code, parent).
    pub records: bool,
    /// How socket bytes are counted, if they are.
    pub network: Option<NetworkPath>,
}

/// The kernel hooks that count socket bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkPath {
    /// The raw tracepoints `sock_send_length` / `sock_recv_length` (6.3+), which see every
    /// socket family.
    Tracepoints {
        /// Plus fexit programs on the `*_sendpage` functions (kernels before 6.5 send
        /// sendfile and splice data through them).
        sendpage: bool,
    },
    /// fexit programs on the inet, inet6 and AF_UNIX families' `sendmsg` / `recvmsg`; other
    /// families are not seen.
    Functions {
        /// Plus fexit programs on the `*_sendpage` functions, as for
        /// [`NetworkPath::Tracepoints`].
        sendpage: bool,
    },
}

impl NetworkPath {
    /// Whether sockets other than TCP, UDP and AF_UNIX are seen.
    pub fn sees_other(self) -> bool {
        matches!(self, NetworkPath::Tracepoints { .. })
    }
}

impl Measured {
    /// Everything this build can measure.
    pub const ALL: Measured = Measured {
        atomics: true,
        disk: true,
        io_chars: true,
        devices: true,
        attach: true,
        records: true,
        network: Some(NetworkPath::Tracepoints { sendpage: false }),
    };
}

/// What the kernel refused, for `features` to say.
#[derive(Clone, Debug, Default)]
pub(crate) struct Unavailable {
    /// Why the handlers with atomics that return the old value did not load.
    pub atomics: Option<String>,
    /// Why the per-device block I/O hook is not attached.
    pub devices: Option<String>,
    /// Why `attach` cannot work here.
    pub attach: Option<String>,
    /// Why per-process records lack parts (argv, file names).
    pub records: Option<String>,
    /// Why the socket hooks are not attached.
    pub network: Option<String>,
}

const IOAC: &str = "task_struct.ioac of each thread at its last context switch; live threads \
                    from /proc/PID/task/TID/io";
const NO_IOAC: &str = "the kernel has no task I/O accounting (CONFIG_TASK_IO_ACCOUNTING)";
const NO_XACCT: &str = "the kernel has no extended I/O accounting (CONFIG_TASK_XACCT)";
const RSS: &str = "raw tracepoint rss_stat on every change of a tracked address space's \
                   file, anon and shmem counters; shared address spaces count once";

/// The counters and how each is measured given what the kernel accepted;
/// `refused` says what the kernel refused, where it did.
pub(crate) fn features(m: Measured, refused: &Unavailable) -> Vec<Feature> {
    let yes = |counter: &'static str, how: &str| Feature {
        counter: Cow::Borrowed(counter),
        measured: true,
        how: how.to_string(),
    };
    let no = |counter: &'static str, how: &str| Feature {
        counter: Cow::Borrowed(counter),
        measured: false,
        how: how.to_string(),
    };
    let pick = |measured, counter: &'static str, how: &str, why: &str| Feature {
        counter: Cow::Borrowed(counter),
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
    let split = if m.atomics {
        "the sum of each process's own split, as wait4 reports it (the kernel's \
         cputime_adjust of its thread group: its runtime in its utime:stime tick ratio), made \
         as its last thread leaves: in the kernel for a spawned run without a breakdown, in \
         userspace from the run's records otherwise (the tree's sums split at once if their \
         ring buffer overflowed); live processes' with their /proc figures"
    } else {
        "the sum of each process's own split, as wait4 reports it (the kernel's \
         cputime_adjust of its thread group: its runtime in its utime:stime tick ratio), made \
         in userspace from the run's records as its last thread leaves; live processes' \
         from /proc; the tree's sums split at once if the records ring buffer overflowed"
    };
    vec![
        yes("cpu_time_ns", cpu),
        yes("cpu_user_ns", split),
        yes("cpu_system_ns", split),
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
        yes(
            "tasks_killed_at_birth",
            "a task created past the run's share is followed, marked, and killed with \
             bpf_send_signal(SIGKILL): its creator in raw tracepoint task_newtask, itself at its \
             first context switch (sched_switch), fork or exec",
        ),
        yes(
            "tasks_escaped",
            "new processes task_newtask could not follow (full maps): their creator is killed",
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
    .into_iter()
    .chain(network(m.network, refused.network.as_deref()))
    .collect()
}

/// The network counters, and how the socket hooks that were attached count them.
fn network(path: Option<NetworkPath>, refused: Option<&str>) -> Vec<Feature> {
    let feature = |counter: &'static str, how: Result<String, String>| Feature {
        counter: Cow::Borrowed(counter),
        measured: how.is_ok(),
        how: how.unwrap_or_else(|why| why),
    };
    let Some(path) = path else {
        let why = format!("not measured (null): {}", refused.unwrap_or("unknown"));
        return [
            "network_bytes_sent",
            "network_bytes_received",
            "network",
            "network.other",
        ]
        .into_iter()
        .map(|c| feature(c, Err(why.clone())))
        .collect();
    };
    let (hooks, sendpage) = match path {
        NetworkPath::Tracepoints { sendpage } => (
            "raw tracepoints sock_send_length / sock_recv_length, which every send and receive \
             path passes (sendmmsg, recvmmsg, io_uring, sendfile, splice)",
            sendpage,
        ),
        NetworkPath::Functions { sendpage } => (
            "fexit on inet_sendmsg, inet6_sendmsg, unix_stream_sendmsg, unix_dgram_sendmsg, \
             unix_seqpacket_sendmsg and their recvmsg (this kernel has no sock_*_length \
             tracepoints)",
            sendpage,
        ),
    };
    let sendpage = if sendpage {
        "; fexit on tcp_sendpage, udp_sendpage and unix_stream_sendpage for sendfile and splice \
         into sockets"
    } else {
        ""
    };
    let how = |what: &str| {
        Ok(format!(
            "{what}: what each send accepted and each receive delivered, in the task that made \
             the call (failed calls and MSG_PEEK count 0); {hooks}{sendpage}"
        ))
    };
    let other = if path.sees_other() {
        how("other families (netlink, packet, ...) and inet sockets that are neither TCP nor UDP")
    } else {
        Err("not measured (null): the fallback hooks only the inet and AF_UNIX families".into())
    };
    vec![
        feature("network_bytes_sent", how("TCP and UDP, IPv4 and IPv6")),
        feature("network_bytes_received", how("TCP and UDP, IPv4 and IPv6")),
        feature(
            "network",
            how("tcp_*, udp_* and unix_* (AF_UNIX, not in the totals)"),
        ),
        feature("network.other", other),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_usage_field_that_is_a_counter_is_listed_once() {
        let list = features(Measured::ALL, &Unavailable::default());
        let mut names: Vec<&str> = list.iter().map(|f| &*f.counter).collect();
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

    #[test]
    fn network_says_how_or_why_not() {
        let find = |m: Measured, refused: &Unavailable, counter: &str| {
            features(m, refused)
                .into_iter()
                .find(|f| f.counter == counter)
                .unwrap()
        };
        let none = Unavailable::default();
        let f = find(Measured::ALL, &none, "network_bytes_sent");
        assert!(f.measured && f.how.contains("sock_send_length"), "{f:?}");
        assert!(find(Measured::ALL, &none, "network.other").measured);
        let fallback = Measured {
            network: Some(NetworkPath::Functions { sendpage: true }),
            ..Measured::ALL
        };
        let f = find(fallback, &none, "network_bytes_received");
        assert!(f.measured && f.how.contains("inet_sendmsg"), "{f:?}");
        assert!(f.how.contains("tcp_sendpage"), "{f:?}");
        assert!(!find(fallback, &none, "network.other").measured);
        let refused = Unavailable {
            network: Some("no hooks here".into()),
            ..Unavailable::default()
        };
        let off = Measured {
            network: None,
            ..Measured::ALL
        };
        for counter in ["network_bytes_sent", "network", "network.other"] {
            let f = find(off, &refused, counter);
            assert!(!f.measured && f.how.contains("no hooks here"), "{f:?}");
        }
    }
}
