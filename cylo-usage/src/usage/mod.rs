//! `ResourceUsage`: what a run used, merged from the kernel's per-run record and /proc reads
//! of the threads still alive. This module computes; [`crate::front::report`] only presents.
use cylo_usage_abi::RunCounters;
use serde::{Deserialize, Serialize};

use crate::kernel::features::{Measured, NetworkPath};

use crate::sys::procfs::ThreadSample;

pub mod budgets;
pub mod commands;
mod cputime;
pub use budgets::{BudgetExceeded, Budgets, EnforcedBy, Enforcement, Resource};
pub use commands::CommandUsage;
pub use cputime::split_runtime;

/// Whether the figures are complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Nothing was lost: every figure is exact.
    Exact,
    /// The kernel side lost records, or a live snapshot could not be made consistent.
    Approximate,
}

/// Which tracker made a report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// The eBPF programs, loaded by this process: exact.
    #[default]
    InProcess,
    /// The /proc fallback (no eBPF): CPU and disk from `wait4()`, the rest sampled; or a
    /// /proc snapshot ([`crate::get_resource_usage`]). Always approximate.
    Proc,
    /// The eBPF programs of `cylo-usage serve`, through its socket: exact.
    Daemon,
}

/// Block I/O that tracked tasks submitted to one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDevice {
    /// "MAJOR:MINOR", as in /proc/partitions.
    pub device: String,
    /// Bytes of the read requests submitted.
    pub read_bytes: u64,
    /// Bytes of the write requests submitted.
    pub write_bytes: u64,
    /// Read requests (bios) submitted.
    pub read_ops: u64,
    /// Write requests (bios) submitted.
    pub write_ops: u64,
}

/// Socket payload bytes by kind: what the socket layer accepted from the tree's sends and
/// delivered to its receives. TCP and UDP cover IPv4 and IPv6 (MPTCP counts as TCP, UDP-Lite
/// as UDP); AF_UNIX is here but not in the inet totals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkUsage {
    /// TCP payload bytes sent (MPTCP included).
    pub tcp_sent: u64,
    /// TCP payload bytes received (MPTCP included).
    pub tcp_received: u64,
    /// UDP payload bytes sent (UDP-Lite included).
    pub udp_sent: u64,
    /// UDP payload bytes received (UDP-Lite included).
    pub udp_received: u64,
    /// AF_UNIX payload bytes sent, any socket type.
    pub unix_sent: u64,
    /// AF_UNIX payload bytes received, any socket type.
    pub unix_received: u64,
    /// Every other socket: other families (netlink, packet, ...) and inet sockets that are
    /// neither TCP nor UDP (raw, ICMP). `None` where the kernel path cannot see them (the
    /// fallback hooks only the inet and AF_UNIX families).
    pub other_sent: Option<u64>,
    /// Bytes received through every other socket; `None` as for `other_sent`.
    pub other_received: Option<u64>,
}

/// Everything a run used. One flat record (`disk_devices` is the one list, `network` the one
/// object); counters this
/// build does not measure on this kernel are `None` (`null` in JSON), never a made-up 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// CPU time of every thread of the tree, in ns of the scheduler's runtime (what cgroup
    /// cpuacct counts), user and system together.
    pub cpu_time_ns: u64,
    /// `cpu_time_ns` in whole milliseconds (the field name older cylo code used, now real CPU).
    pub cpu_time_ms: u64,
    /// The user part of `cpu_time_ns`: the sum of each process's own split, the kernel's
    /// `cputime_adjust` of its thread group (its tick samples scaled to its precise runtime,
    /// as `wait4` reports it to the parent and `time(1)` prints it), made from the run's
    /// records as each process's last thread leaves, or from `wait4` and /proc (the
    /// fallback); live processes' at the snapshot. Where the records do not cover the whole
    /// runtime (their ring buffer overflowed, a breakdown left processes out), and for a
    /// /proc snapshot or a fallback attach, the tree's sums are split at once by the same
    /// function (`split_runtime`). [`ResourceUsage::cpu_split`] says which.
    pub cpu_user_ns: u64,
    /// The system part of `cpu_time_ns`.
    pub cpu_system_ns: u64,
    /// How `cpu_user_ns` and `cpu_system_ns` were made.
    #[serde(default)]
    pub cpu_split: CpuSplit,
    /// Distinct processes that were ever part of the tree, the root included. Exec adds none.
    pub process_count: u64,
    /// Distinct threads ever, main threads included.
    pub thread_count: u64,
    /// The most processes alive at the same time. `None` on kernels whose BPF verifier lacks
    /// atomic fetch and compare-and-exchange (before 5.12): see `cylo-usage features`.
    pub peak_process_count: Option<u64>,
    /// Processes alive at the snapshot. Processes the tracker could not follow
    /// (`tasks_escaped`) are counted as alive: it cannot know that they ended.
    pub live_process_count: u64,
    /// Bytes the tree made the storage layer read: the kernel's task I/O accounting, charged
    /// at submission to the task that caused them (page-cache hits and tmpfs count 0).
    pub disk_bytes_read: Option<u64>,
    /// Bytes the tree made the storage layer write: charged when the pages are dirtied, to
    /// the task that dirtied them, even though writeback submits them later.
    pub disk_bytes_written: Option<u64>,
    /// Dirty bytes the tree truncated before they were written back (the kernel subtracts
    /// nothing: `disk_bytes_written` still includes them).
    pub disk_cancelled_write_bytes: Option<u64>,
    /// Block I/O submitted by tracked tasks themselves, per device (the block layer's view,
    /// in their context: writeback by kernel threads is not here).
    pub disk_devices: Option<Vec<DiskDevice>>,
    /// Bytes the tree asked for with read-like syscalls, page-cache hits included.
    pub io_read_chars: Option<u64>,
    /// Bytes the tree handed to write-like syscalls.
    pub io_write_chars: Option<u64>,
    /// Resident memory (file, anonymous and shmem pages, as VmRSS counts them) of the tree's
    /// live processes at the snapshot; an address space shared by several counts once.
    pub memory_bytes: Option<u64>,
    /// The highest `memory_bytes` the tree reached at any moment, followed change by change.
    pub peak_memory_bytes: Option<u64>,
    /// The largest peak RSS of any single process (what `time -v` calls "maximum resident
    /// set size"): the kernel's high-water mark at exit, VmHWM for live ones.
    pub max_process_rss_bytes: Option<u64>,
    /// Payload bytes the tree sent through TCP and UDP sockets (IPv4 and IPv6, loopback
    /// included), as the socket layer accepted them; failed sends count 0.
    pub network_bytes_sent: Option<u64>,
    /// Payload bytes the tree received through TCP and UDP sockets, as the socket layer
    /// delivered them (`MSG_PEEK` does not count).
    pub network_bytes_received: Option<u64>,
    /// Socket bytes by kind, AF_UNIX and the others included.
    pub network: Option<NetworkUsage>,
    /// Records the kernel side could not make (map or ring buffer full).
    pub lost_events: u64,
    /// Tasks killed at birth because the session could not follow them within its share of
    /// the tracker's maps (a daemon's `--session-max-tasks`): each was created past the share
    /// (or when the maps were full, as a new thread), and was killed with its creator's whole
    /// process (fail closed: nothing the tracker cannot follow outlives a kill). `None` where
    /// not measured (the /proc fallback).
    #[serde(default)]
    pub tasks_killed_at_birth: Option<u64>,
    /// New processes that could not be followed at all (the tracker's maps were full): their
    /// creator was killed, but they may still run, out of reach of `--timeout` and kills.
    /// Counted in `live_process_count`. `None` where not measured.
    #[serde(default)]
    pub tasks_escaped: Option<u64>,
    /// New processes and threads refused by `--max-processes` / `--max-threads`: killed
    /// before they ran an instruction of their own, and not in `process_count` /
    /// `thread_count` (a refused process counts in both). `None` where not measured.
    #[serde(default)]
    pub processes_refused: Option<u64>,
    /// Threads refused (see `processes_refused`).
    #[serde(default)]
    pub threads_refused: Option<u64>,
    /// The budgets the run had (`--max-*`); absent without any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budgets: Option<Budgets>,
    /// The budget the run crossed, if it crossed one: the tree was killed (SIGKILL) at the
    /// crossing.
    #[serde(default)]
    pub budget_exceeded: Option<BudgetExceeded>,
    /// `exact` when nothing was lost; `approximate` otherwise.
    pub precision: Precision,
    /// When `precision` is `approximate`: one note per approximate field (or group of
    /// fields), `"field: why"`. Empty when exact.
    #[serde(default)]
    pub precision_notes: Vec<String>,
    /// The fields of this report whose value is a lower bound: the truth may be larger, never
    /// smaller. The /proc fallback's sampled counts (`process_count`, `thread_count`,
    /// `peak_process_count`: a process that lives between two samples is missed), and the
    /// figures of a run whose daemon went away. Empty where every count is exact (the eBPF
    /// tracker, in-process or through the daemon). The human report says "at least" there.
    #[serde(default)]
    pub lower_bounds: Vec<String>,
    /// Which tracker measured: `in-process` (eBPF) or `proc` (the /proc fallback).
    #[serde(default)]
    pub tracker: TrackerKind,
    /// The root's exit status, when it exited normally; `None` while it runs or if a signal
    /// killed it.
    pub exit_code: Option<i32>,
    /// The signal that killed the root, if one did.
    pub signal: Option<i32>,
    /// Wall-clock time from the start to the end of the run (or to the snapshot while it runs).
    pub wall_time_ms: u64,
    /// The session attached to running processes (`attach`): the counters above are what the
    /// tree used since then; what its processes had used before is `usage_before_attach`, and
    /// what children that had already exited used is unknowable.
    pub attached: bool,
    /// What the processes present at the attach had already used by then (`None` unless
    /// `attached`). Add it to the totals for their whole lives.
    pub usage_before_attach: Option<UsageBeforeAttach>,
    /// The session's `--timeout` fired and the tree was killed.
    pub timed_out: bool,
    /// Each signal the session sent to the tree (its timeout's, or a kill's), with how many
    /// processes got it and how many were spared because the client may not signal them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals_sent: Vec<SignalSent>,
    /// The per-process breakdown (`--tree`), in start order; absent unless asked for. Once the
    /// session is over and nothing was lost, its CPU, disk, I/O and thread figures add up to
    /// the totals exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<ProcessUsage>>,
    /// Processes left out of `processes` because the breakdown's limit was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes_dropped: Option<u64>,
    /// The breakdown grouped by command (the executable each process ran), sorted by CPU
    /// time; its rows add up to the totals exactly, what `processes` misses in a last row
    /// (see [`commands::by_command`]). Present with `processes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands: Option<Vec<CommandUsage>>,
}

/// How a report's user and system times were made (see [`ResourceUsage::cpu_user_ns`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuSplit {
    /// Each process's own split, summed: what `wait4` adds up for the parents and `time(1)`
    /// prints.
    PerProcess,
    /// The tree's sums split at once: the same function over the whole tree, which can
    /// differ from `time(1)` on a tree that mixes user-heavy and system-heavy processes.
    #[default]
    Tree,
}

impl ResourceUsage {
    /// A report of `tracker` with nothing measured: every optional counter `None`, every
    /// count 0, precision approximate. The /proc fallback starts from here and fills in what
    /// it knows, so a counter it does not know stays `null`.
    pub fn unmeasured(tracker: TrackerKind) -> ResourceUsage {
        ResourceUsage {
            cpu_time_ns: 0,
            cpu_time_ms: 0,
            cpu_user_ns: 0,
            cpu_system_ns: 0,
            cpu_split: CpuSplit::Tree,
            process_count: 0,
            thread_count: 0,
            peak_process_count: None,
            live_process_count: 0,
            disk_bytes_read: None,
            disk_bytes_written: None,
            disk_cancelled_write_bytes: None,
            disk_devices: None,
            io_read_chars: None,
            io_write_chars: None,
            memory_bytes: None,
            peak_memory_bytes: None,
            max_process_rss_bytes: None,
            network_bytes_sent: None,
            network_bytes_received: None,
            network: None,
            lost_events: 0,
            tasks_killed_at_birth: None,
            tasks_escaped: None,
            processes_refused: None,
            threads_refused: None,
            budgets: None,
            budget_exceeded: None,
            precision: Precision::Approximate,
            precision_notes: Vec::new(),
            lower_bounds: Vec::new(),
            tracker,
            exit_code: None,
            signal: None,
            wall_time_ms: 0,
            attached: false,
            usage_before_attach: None,
            timed_out: false,
            signals_sent: Vec::new(),
            processes: None,
            processes_dropped: None,
            commands: None,
        }
    }
}

/// One signal sent to a session's tree: by its timeout, or by a kill.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalSent {
    /// The signal number.
    pub signal: i32,
    /// Processes of the tree that were sent it.
    pub signalled: u64,
    /// Live processes of the tree that were not: a daemon's client may signal only what
    /// `kill(2)` would let it (another user's member, a setuid one, is spared).
    pub spared: u64,
}

impl SignalSent {
    /// Adds a kill of `signal` to `sent`: to the last entry if it is the same signal (a kill
    /// in rounds, or repeated), else as a new entry.
    pub(crate) fn record(sent: &mut Vec<SignalSent>, signal: i32, signalled: u64, spared: u64) {
        match sent.last_mut() {
            Some(last) if last.signal == signal => {
                last.signalled += signalled;
                last.spared = last.spared.max(spared);
            }
            _ => sent.push(SignalSent {
                signal,
                signalled,
                spared,
            }),
        }
    }
}

/// What the processes present at an attach had already used by then, over their whole
/// lives, as `getrusage(RUSAGE_SELF)` + `getrusage(RUSAGE_CHILDREN)` would say for each: their
/// live threads, the threads they had that had exited, and the children they had reaped (with
/// everything those had reaped). Read in the kernel as each thread, and each process's
/// `signal_struct` once, was adopted. Unknowable, so not in here: children that exited and
/// were reaped by a process outside the tree, and children not yet reaped at the attach
/// (zombies).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageBeforeAttach {
    /// Processes and threads adopted (present at the attach).
    pub process_count: u64,
    /// Threads adopted (present at the attach).
    pub thread_count: u64,
    /// CPU time (ns): the runtime of the processes' threads, live and exited, plus the
    /// reaped children's user + system time.
    pub cpu_time_ns: u64,
    /// The user part of `cpu_time_ns`: the threads' runtime split as the kernel splits it,
    /// plus the reaped children's user time.
    pub cpu_user_ns: u64,
    /// The system part of `cpu_time_ns`, made the same way.
    pub cpu_system_ns: u64,
    /// Bytes they had made the storage layer read, reaped children included; `None` where
    /// not measured.
    pub disk_bytes_read: Option<u64>,
    /// Bytes they had made the storage layer write, reaped children included; `None` where
    /// not measured.
    pub disk_bytes_written: Option<u64>,
    /// Dirty bytes they had truncated before writeback (still in `disk_bytes_written`);
    /// `None` where not measured.
    pub disk_cancelled_write_bytes: Option<u64>,
    /// Bytes they had asked for with read-like syscalls, reaped children included; `None`
    /// where not measured.
    pub io_read_chars: Option<u64>,
    /// Bytes they had handed to write-like syscalls, reaped children included; `None` where
    /// not measured.
    pub io_write_chars: Option<u64>,
}

/// How the root ended, as far as it is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RootExit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

/// What a snapshot saw, besides the kernel's record.
#[derive(Clone, Debug, Default)]
pub struct LiveSample {
    /// What could be read of the threads alive at the snapshot.
    pub threads: Vec<ThreadSample>,
    /// The largest VmHWM (bytes) of the processes alive at the snapshot.
    pub max_hwm_bytes: u64,
    /// Block I/O per device.
    pub devices: Vec<DiskDevice>,
    /// Whether the snapshot is known to be consistent and whole.
    pub complete: bool,
}

/// Facts about the machine the figures need.
#[derive(Clone, Copy, Debug)]
pub struct Units {
    pub ticks_per_second: u64,
    pub page_size: u64,
}

/// `dev_t` in the kernel's internal encoding (major << 20 | minor) as "MAJOR:MINOR".
pub fn device_name(dev: u32) -> String {
    format!("{}:{}", dev >> 20, dev & 0xfffff)
}

/// The run's socket bytes, where they are counted. The kernel adds them as they move, for
/// live and exited tasks alike: no /proc part.
fn network(c: &RunCounters, path: Option<NetworkPath>) -> Option<NetworkUsage> {
    let other = path?.sees_other();
    Some(NetworkUsage {
        tcp_sent: c.net_tcp_sent,
        tcp_received: c.net_tcp_received,
        udp_sent: c.net_udp_sent,
        udp_received: c.net_udp_received,
        unix_sent: c.net_unix_sent,
        unix_received: c.net_unix_received,
        other_sent: other.then_some(c.net_other_sent),
        other_received: other.then_some(c.net_other_received),
    })
}

/// What the processes adopted at an attach had used by then, over their whole lives: their
/// live threads' figures at adoption, plus what their `signal_struct`s kept (exited threads,
/// and the children they had reaped, with everything those had reaped in turn), as
/// `getrusage(RUSAGE_SELF)` + `getrusage(RUSAGE_CHILDREN)` would say for each. The exited
/// threads' time is split with the live threads' (the same method as theirs); the reaped
/// children's comes split already (the kernel split it when it reaped them).
fn before_attach(c: &RunCounters, measured: Measured) -> UsageBeforeAttach {
    let runtime = c
        .before
        .cpu_runtime_ns
        .wrapping_add(c.before_exited_runtime_ns);
    let (user, system) = split_runtime(
        runtime,
        c.before.cpu_utime_ns.wrapping_add(c.before_exited_utime_ns),
        c.before.cpu_stime_ns.wrapping_add(c.before_exited_stime_ns),
    );
    let (reaped_user, reaped_system) = (c.before_reaped_user_ns, c.before_reaped_system_ns);
    let disk = |live: u64, group: u64| measured.disk.then_some(live.wrapping_add(group));
    let chars = |live: u64, group: u64| measured.io_chars.then_some(live.wrapping_add(group));
    UsageBeforeAttach {
        process_count: c.processes_adopted,
        thread_count: c.threads_adopted,
        cpu_time_ns: runtime
            .wrapping_add(reaped_user)
            .wrapping_add(reaped_system),
        cpu_user_ns: user.wrapping_add(reaped_user),
        cpu_system_ns: system.wrapping_add(reaped_system),
        disk_bytes_read: disk(c.before.disk_read_bytes, c.before_group_disk_read_bytes),
        disk_bytes_written: disk(c.before.disk_write_bytes, c.before_group_disk_write_bytes),
        disk_cancelled_write_bytes: disk(
            c.before.disk_cancelled_write_bytes,
            c.before_group_disk_cancelled_write_bytes,
        ),
        io_read_chars: chars(c.before.io_rchar, c.before_group_io_rchar),
        io_write_chars: chars(c.before.io_wchar, c.before_group_io_wchar),
    }
}

/// Merges the kernel's counters for a run with what a snapshot read of its live threads.
pub fn merge(
    counters: &RunCounters,
    measured: Measured,
    live: &LiveSample,
    units: Units,
    root: RootExit,
    wall_time_ms: u64,
) -> ResourceUsage {
    let tick_ns = 1_000_000_000 / units.ticks_per_second.max(1);
    let c = counters;
    // The kernel's totals cover adopted threads' whole lives; what they had used before the
    // attach comes off (it is reported apart).
    let mut used = c.total - c.before;
    for t in &live.threads {
        used += t.usage(tick_ns);
    }
    let (runtime, utime, stime) = (used.cpu_runtime_ns, used.cpu_utime_ns, used.cpu_stime_ns);
    // The tree's sums split at once. The session replaces this with the sum of each
    // process's own split (as wait4 makes it) where its records cover the whole runtime.
    let (user, system) = split_runtime(runtime, utime, stime);
    let usage_before_attach = (c.threads_adopted > 0).then(|| before_attach(c, measured));
    let exact =
        live.complete && c.lost_events == 0 && c.tasks_killed_at_birth == 0 && c.tasks_escaped == 0;
    let mut precision_notes = Vec::new();
    if c.lost_events > 0 {
        precision_notes.push(format!(
            "lost_events: {} records could not be made (a membership map or ring buffer was \
             full): what those tasks did is missing",
            c.lost_events
        ));
    }
    if c.tasks_escaped > 0 {
        precision_notes.push(format!(
            "tasks_escaped, live_process_count: {} new processes could not be followed (the \
             tracker's maps were full); their creators were killed, but they may still run, \
             and live_process_count counts them as alive",
            c.tasks_escaped
        ));
    }
    if !live.complete {
        precision_notes.push(
            "cpu_time_ns, disk_bytes_read, disk_bytes_written, io_read_chars, io_write_chars: \
             the tree changed during every attempt at a consistent live snapshot"
                .to_string(),
        );
    }
    let pages = |p: u64| p * units.page_size;
    let mut devices = live.devices.clone();
    devices.sort_by(|a, b| a.device.cmp(&b.device));
    let network = network(c, measured.network);
    ResourceUsage {
        cpu_time_ns: runtime,
        cpu_time_ms: runtime / 1_000_000,
        cpu_user_ns: user,
        cpu_system_ns: system,
        cpu_split: CpuSplit::Tree,
        process_count: c.processes_started.saturating_sub(c.processes_refused),
        thread_count: c.threads_started.saturating_sub(c.threads_refused),
        peak_process_count: measured.atomics.then_some(c.processes_peak),
        live_process_count: c.processes_alive.saturating_add(c.tasks_escaped),
        disk_bytes_read: measured.disk.then_some(used.disk_read_bytes),
        disk_bytes_written: measured.disk.then_some(used.disk_write_bytes),
        disk_cancelled_write_bytes: measured.disk.then_some(used.disk_cancelled_write_bytes),
        disk_devices: measured.devices.then_some(devices),
        io_read_chars: measured.io_chars.then_some(used.io_rchar),
        io_write_chars: measured.io_chars.then_some(used.io_wchar),
        memory_bytes: measured.atomics.then_some(pages(c.rss_pages)),
        peak_memory_bytes: measured.atomics.then_some(pages(c.rss_peak_pages)),
        max_process_rss_bytes: measured
            .atomics
            .then_some(pages(c.max_process_rss_pages).max(live.max_hwm_bytes)),
        network_bytes_sent: network.as_ref().map(|n| n.tcp_sent + n.udp_sent),
        network_bytes_received: network.as_ref().map(|n| n.tcp_received + n.udp_received),
        network,
        lost_events: c.lost_events,
        tasks_killed_at_birth: Some(c.tasks_killed_at_birth),
        tasks_escaped: Some(c.tasks_escaped),
        processes_refused: Some(c.processes_refused),
        threads_refused: Some(c.threads_refused),
        budgets: None,
        budget_exceeded: None,
        precision: if exact {
            Precision::Exact
        } else {
            Precision::Approximate
        },
        precision_notes,
        lower_bounds: Vec::new(),
        tracker: TrackerKind::InProcess,
        exit_code: root.exit_code,
        signal: root.signal,
        wall_time_ms,
        attached: c.threads_adopted > 0,
        usage_before_attach,
        timed_out: false,
        signals_sent: Vec::new(),
        processes: None,
        processes_dropped: None,
        commands: None,
    }
}

/// One process of a run, as `--tree` reports it. The counters are what it used while it was
/// followed (since the attach, for processes present then); the field names are the totals'.
/// `Default` is an empty entry (pid 0, nothing measured), for building one field by field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUsage {
    /// Its pid as the tracker sees it.
    pub pid: libc::pid_t,
    /// Its pid inside its own pid namespace, where that differs.
    pub ns_pid: Option<libc::pid_t>,
    /// Its parent's pid when it was created (0 when the parent is not visible).
    pub ppid: libc::pid_t,
    /// The index of its parent in `processes`, when the parent is part of the tree.
    pub parent_index: Option<usize>,
    /// `comm` after its last exec (or inherited), escaped where not UTF-8.
    pub comm: String,
    /// argv as set at its last exec (up to 256 bytes, read in the kernel); `None` if it never
    /// exec'd while followed.
    pub argv: Option<Vec<String>>,
    /// Whether argv was longer than what was kept.
    pub argv_truncated: bool,
    /// The file its last exec ran.
    pub filename: Option<String>,
    /// When it started and ended, in ns since the session started (negative start: before an
    /// attach). `end_ns` is `None` while it runs.
    pub start_ns: i64,
    /// When it ended, in ns since the session started; `None` while it runs.
    pub end_ns: Option<u64>,
    /// Its exit status; `None` if a signal killed it, or while it runs.
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Present when the session attached (rather than created inside it).
    pub attached: bool,
    /// Threads it had while followed, its main thread included.
    pub thread_count: u64,
    /// CPU time of its threads (ns), user and system together.
    pub cpu_time_ns: u64,
    /// The user part of `cpu_time_ns`, by the kernel's split of its thread group.
    pub cpu_user_ns: u64,
    /// The system part of `cpu_time_ns`.
    pub cpu_system_ns: u64,
    /// Bytes it made the storage layer read; `None` where not measured or withheld.
    pub disk_bytes_read: Option<u64>,
    /// Bytes it made the storage layer write; `None` where not measured or withheld.
    pub disk_bytes_written: Option<u64>,
    /// Dirty bytes it truncated before writeback (still in `disk_bytes_written`); `None`
    /// where not measured or withheld.
    pub disk_cancelled_write_bytes: Option<u64>,
    /// Bytes it asked for with read-like syscalls; `None` where not measured or withheld.
    pub io_read_chars: Option<u64>,
    /// Bytes it handed to write-like syscalls; `None` where not measured or withheld.
    pub io_write_chars: Option<u64>,
    /// The peak RSS of its address space(s); `None` where memory is not followed.
    pub peak_memory_bytes: Option<u64>,
    /// Payload bytes it sent through TCP and UDP sockets; `None` where not measured or
    /// withheld.
    pub network_bytes_sent: Option<u64>,
    /// Payload bytes it received through TCP and UDP sockets; `None` where not measured or
    /// withheld.
    pub network_bytes_received: Option<u64>,
    /// It ran with credentials the viewer (a daemon's unprivileged client) does not have: its
    /// I/O counters (disk, read/write chars, network), argv and file name are withheld (`None`),
    /// as the kernel withholds `/proc/PID/io` from that client. Only present when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withheld: bool,
    /// Refused by a processes or threads budget (`--max-processes`, `--max-threads`): killed
    /// before it ran an instruction of its own, and not in the report's `process_count`. Only
    /// present when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::procfs::ThreadIo;
    use cylo_usage_abi::ThreadUsage;

    const UNITS: Units = Units {
        ticks_per_second: 100,
        page_size: 4096,
    };

    fn counters() -> RunCounters {
        RunCounters {
            total: ThreadUsage {
                cpu_runtime_ns: 3_000_000_000,
                cpu_utime_ns: 2_000_000_000,
                cpu_stime_ns: 1_000_000_000,
                disk_read_bytes: 1000,
                disk_write_bytes: 2000,
                disk_cancelled_write_bytes: 300,
                io_rchar: 5000,
                io_wchar: 6000,
            },
            processes_started: 5,
            threads_started: 9,
            processes_alive: 1,
            processes_peak: 4,
            threads_exited: 7,
            rss_pages: 10,
            rss_peak_pages: 100,
            max_process_rss_pages: 50,
            ..Default::default()
        }
    }

    fn whole() -> LiveSample {
        LiveSample {
            complete: true,
            ..Default::default()
        }
    }

    /// The past beyond the live threads (exited threads, reaped children) is added to what
    /// was used before the attach, and never comes off the totals (they never held it).
    #[test]
    fn before_the_attach_adds_exited_threads_and_reaped_children() {
        let c = RunCounters {
            threads_adopted: 2,
            processes_adopted: 1,
            before: ThreadUsage {
                cpu_runtime_ns: 100,
                cpu_utime_ns: 10,
                cpu_stime_ns: 0,
                io_rchar: 7,
                disk_read_bytes: 1,
                ..ThreadUsage::default()
            },
            before_exited_runtime_ns: 500,
            before_exited_utime_ns: 30,
            before_exited_stime_ns: 20,
            before_reaped_user_ns: 250,
            before_reaped_system_ns: 50,
            before_group_io_rchar: 1_000,
            before_group_io_wchar: 2_000,
            before_group_disk_read_bytes: 4_096,
            ..counters()
        };
        let u = merge(&c, Measured::ALL, &whole(), UNITS, RootExit::default(), 0);
        let b = u.usage_before_attach.unwrap();
        assert_eq!(b.cpu_time_ns, 100 + 500 + 250 + 50);
        // 600 ns split 40:20 (live and exited threads together), then the children's.
        assert_eq!((b.cpu_user_ns, b.cpu_system_ns), (400 + 250, 200 + 50));
        assert_eq!(
            (b.io_read_chars, b.io_write_chars),
            (Some(1_007), Some(2_000))
        );
        assert_eq!(b.disk_bytes_read, Some(4_097));
        // The totals lose only the live threads' part.
        assert_eq!(u.cpu_time_ns, 3_000_000_000 - 100);
        assert_eq!(u.io_read_chars, Some(5_000 - 7));
        let unmeasured = Measured {
            disk: false,
            io_chars: false,
            ..Measured::ALL
        };
        let none = merge(&c, unmeasured, &whole(), UNITS, RootExit::default(), 0);
        let b = none.usage_before_attach.unwrap();
        assert_eq!((b.io_read_chars, b.disk_bytes_read), (None, None));
    }

    #[test]
    fn merge_adds_live_threads() {
        let io = ThreadIo {
            rchar: 1,
            wchar: 2,
            read_bytes: 3,
            write_bytes: 4,
            cancelled_write_bytes: 5,
        };
        let live = LiveSample {
            threads: vec![
                ThreadSample {
                    runtime_ns: 500_000_000,
                    utime_ticks: 0,
                    stime_ticks: 50,
                    io: Some(io),
                },
                ThreadSample {
                    runtime_ns: 500_000_000,
                    utime_ticks: 100,
                    stime_ticks: 0,
                    io: None,
                },
            ],
            max_hwm_bytes: 1 << 30,
            devices: vec![],
            complete: true,
        };
        let u = merge(
            &counters(),
            Measured::ALL,
            &live,
            UNITS,
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
        assert_eq!(u.disk_bytes_read, Some(1003));
        assert_eq!(u.disk_bytes_written, Some(2004));
        assert_eq!(u.disk_cancelled_write_bytes, Some(305));
        assert_eq!(u.io_read_chars, Some(5001));
        assert_eq!(u.io_write_chars, Some(6002));
        assert_eq!(u.memory_bytes, Some(10 * 4096));
        assert_eq!(u.peak_memory_bytes, Some(100 * 4096));
        assert_eq!(
            u.max_process_rss_bytes,
            Some(1 << 30),
            "a live process's VmHWM"
        );
        assert_eq!(u.precision, Precision::Exact);
        assert_eq!(u.wall_time_ms, 42);
    }

    #[test]
    fn escaped_processes_count_as_alive_and_killed_tasks_make_it_approximate() {
        let mut c = counters();
        c.processes_alive = 0;
        c.lost_events = 2;
        c.tasks_escaped = 2;
        let u = merge(&c, Measured::ALL, &whole(), UNITS, RootExit::default(), 0);
        assert_eq!(u.live_process_count, 2, "never 0 while one may run");
        assert_eq!(u.tasks_escaped, Some(2));
        assert!(
            u.precision_notes
                .iter()
                .any(|n| n.contains("may still run")),
            "{u:?}"
        );
        let mut c = counters();
        c.tasks_killed_at_birth = 1;
        let u = merge(&c, Measured::ALL, &whole(), UNITS, RootExit::default(), 0);
        assert_eq!(u.tasks_killed_at_birth, Some(1));
        assert_eq!(u.precision, Precision::Approximate);
        let u = ResourceUsage::unmeasured(TrackerKind::Proc);
        assert_eq!((u.tasks_killed_at_birth, u.tasks_escaped), (None, None));
    }

    #[test]
    fn lost_events_or_inconsistent_snapshot_are_approximate() {
        let mut c = counters();
        c.lost_events = 3;
        let u = merge(&c, Measured::ALL, &whole(), UNITS, RootExit::default(), 0);
        assert_eq!((u.lost_events, u.precision), (3, Precision::Approximate));
        assert!(
            u.precision_notes[0].starts_with("lost_events: 3 records"),
            "{u:?}"
        );
        let u = merge(
            &counters(),
            Measured::ALL,
            &LiveSample::default(),
            UNITS,
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
        let m = Measured {
            network: None,
            ..Measured::ALL
        };
        let u = merge(&counters(), m, &whole(), UNITS, root, 7);
        let v: serde_json::Value = serde_json::to_value(&u).unwrap();
        let obj = v.as_object().unwrap();
        for key in [
            "network_bytes_sent",
            "network_bytes_received",
            "network",
            "exit_code",
        ] {
            assert!(obj[key].is_null(), "{key} should be null");
        }
        assert_eq!(obj["signal"], 9);
        assert_eq!(obj["precision"], "exact");
        let u = merge(&counters(), Measured::ALL, &whole(), UNITS, root, 7);
        let v: serde_json::Value = serde_json::to_value(&u).unwrap();
        for (k, v) in v.as_object().unwrap() {
            assert!(!v.is_object() || k == "network", "{k}");
            assert!(
                !v.is_array()
                    || ["disk_devices", "precision_notes", "lower_bounds"].contains(&k.as_str()),
                "{k}"
            );
        }
        assert_eq!(obj["tracker"], "in-process");
        assert_eq!(obj["precision_notes"], serde_json::json!([]));
        assert_eq!(obj["lower_bounds"], serde_json::json!([]), "exact counts");
        assert!(obj["usage_before_attach"].is_null());
        assert!(!obj.contains_key("processes"), "only with --tree");
        let mut keys: Vec<_> = v["network"].as_object().unwrap().keys().cloned().collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "other_received",
                "other_sent",
                "tcp_received",
                "tcp_sent",
                "udp_received",
                "udp_sent",
                "unix_received",
                "unix_sent"
            ]
        );
    }

    #[test]
    fn network_totals_are_tcp_and_udp_and_unix_stands_apart() {
        let c = RunCounters {
            net_tcp_sent: 1,
            net_tcp_received: 20,
            net_udp_sent: 300,
            net_udp_received: 4000,
            net_unix_sent: 50_000,
            net_unix_received: 600_000,
            net_other_sent: 7_000_000,
            net_other_received: 80_000_000,
            ..counters()
        };
        let u = merge(&c, Measured::ALL, &whole(), UNITS, RootExit::default(), 0);
        assert_eq!(u.network_bytes_sent, Some(301));
        assert_eq!(u.network_bytes_received, Some(4020));
        let want = NetworkUsage {
            tcp_sent: 1,
            tcp_received: 20,
            udp_sent: 300,
            udp_received: 4000,
            unix_sent: 50_000,
            unix_received: 600_000,
            other_sent: Some(7_000_000),
            other_received: Some(80_000_000),
        };
        assert_eq!(u.network.as_ref(), Some(&want));
        // The fallback does not see other families: those are null, the rest is counted.
        let fallback = Measured {
            network: Some(NetworkPath::Functions { sendpage: true }),
            ..Measured::ALL
        };
        let u = merge(&c, fallback, &whole(), UNITS, RootExit::default(), 0);
        assert_eq!(u.network_bytes_sent, Some(301));
        let n = u.network.unwrap();
        assert_eq!((n.other_sent, n.other_received), (None, None));
        assert_eq!((n.unix_sent, n.unix_received), (50_000, 600_000));
    }

    #[test]
    fn what_the_kernel_cannot_measure_is_null_not_zero() {
        let none = Measured {
            atomics: false,
            disk: false,
            io_chars: false,
            devices: false,
            attach: false,
            records: false,
            network: None,
        };
        let u = merge(&counters(), none, &whole(), UNITS, RootExit::default(), 0);
        assert_eq!(u.peak_process_count, None);
        assert_eq!((u.memory_bytes, u.peak_memory_bytes), (None, None));
        assert_eq!(u.max_process_rss_bytes, None);
        assert_eq!((u.disk_bytes_read, u.disk_bytes_written), (None, None));
        assert_eq!((u.io_read_chars, u.disk_devices), (None, None));
        assert_eq!(
            (u.network_bytes_sent, u.network_bytes_received),
            (None, None)
        );
        assert_eq!(u.network, None);
        assert_eq!(u.precision, Precision::Exact, "unmeasured is not imprecise");
    }

    #[test]
    fn devices_are_named_major_minor() {
        assert_eq!(device_name((254 << 20) | 3), "254:3");
        assert_eq!(device_name(8 << 20), "8:0");
    }
}
