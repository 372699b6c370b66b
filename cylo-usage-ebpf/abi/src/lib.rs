//! The kernel/user ABI of cylo-usage.
//!
//! Every type that crosses between the eBPF programs and userspace is defined here, once,
//! `#[repr(C)]` with explicit padding and a size assertion. The eBPF crate and the userspace
//! crate both depend on this crate; neither defines a shared type of its own.
#![no_std]

use core::mem::size_of;

/// How many runs can be tracked at once (slots of the `RUNS` array map).
pub const MAX_RUNS: u32 = 256;
/// Default capacity of the `TASKS` membership map: live tracked threads on the whole host.
pub const DEFAULT_MAX_TASKS: u32 = 65_536;
/// Default capacity of the `PROCS` map: live tracked processes (thread groups) on the host.
pub const DEFAULT_MAX_PROCS: u32 = 65_536;
/// Capacity of the `SPAWNERS` map: userspace threads about to fork the root of a run.
pub const MAX_SPAWNERS: u32 = 64;
/// Size of the ring buffer that carries notifications to userspace.
pub const EVENTS_BYTES: u32 = 64 * 4096;

/// `CLONE_THREAD` from `<linux/sched.h>`: part of the stable syscall ABI.
pub const CLONE_THREAD: u64 = 0x0001_0000;

/// Names of the maps and programs in the object; userspace looks them up by these.
pub mod names {
    pub const TASKS: &str = "TASKS";
    pub const PROCS: &str = "PROCS";
    pub const RUNS: &str = "RUNS";
    pub const SPAWNERS: &str = "SPAWNERS";
    pub const SPAWN_GATE: &str = "SPAWN_GATE";
    pub const EVENTS: &str = "EVENTS";
    pub const OFFSETS: &str = "OFFSETS";

    pub const PROG_TASK_NEWTASK: &str = "task_newtask";
    /// The same as `task_newtask` without the most-processes-alive peak, for kernels whose
    /// verifier lacks BPF atomic fetch and compare-and-exchange (before 5.12).
    pub const PROG_TASK_NEWTASK_NO_PEAK: &str = "task_newtask_no_peak";
    pub const PROG_SCHED_SWITCH: &str = "sched_switch";
    pub const PROG_SCHED_PROCESS_EXIT: &str = "sched_process_exit";
    /// The raw tracepoints the programs above attach to.
    pub const TP_TASK_NEWTASK: &str = "task_newtask";
    pub const TP_SCHED_SWITCH: &str = "sched_switch";
    pub const TP_SCHED_PROCESS_EXIT: &str = "sched_process_exit";
}

/// Kernel layout knowledge, resolved by userspace at start-up (from BTF) and handed to the
/// programs as a read-only global. Offsets are byte offsets into `struct task_struct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// `task_struct.pid` (the thread id, `pid_t`).
    pub task_pid: u32,
    /// `task_struct.tgid` (the process id, `pid_t`).
    pub task_tgid: u32,
    /// `task_struct.signal` (pointer shared by all threads of a process).
    pub task_signal: u32,
    /// `task_struct.start_boottime` (u64 ns), what `/proc/PID/stat` field 22 is made from.
    pub task_start_boottime: u32,
    /// `task_struct.se.sum_exec_runtime` (u64 ns), the scheduler's runtime.
    pub task_sum_exec_runtime: u32,
    /// `task_struct.utime` (u64 ns, tick-sampled user time).
    pub task_utime: u32,
    /// `task_struct.stime` (u64 ns, tick-sampled system time).
    pub task_stime: u32,
    /// `task_struct.__state` (or `state` before 5.14); read only when the `sched_switch` raw
    /// tracepoint does not pass `prev_state` as an argument.
    pub task_state: u32,
    /// Width in bytes of the state field (4 for `unsigned int __state`, 8 for `long state`).
    pub task_state_size: u32,
    /// 1 when the `sched_switch` raw tracepoint has `prev_state` as its fourth argument.
    pub switch_has_prev_state: u32,
    /// The `TASK_DEAD` bit of the task state.
    pub task_dead: u32,
    /// `signal_struct.live` (atomic_t): threads of the process that have not yet exited.
    pub signal_live: u32,
}

/// One live tracked thread; value of `TASKS`, keyed by the kernel address of its `task_struct`
/// (stable for the task's whole life, unlike its tid, which `exec` from a non-leader thread
/// changes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskMember {
    /// Slot of the run in `RUNS`.
    pub run: u32,
    /// Thread id at join (global pid namespace).
    pub tid: u32,
    /// Process id at join (global pid namespace).
    pub tgid: u32,
    pub _pad0: u32,
    /// Kernel address of the process's `signal_struct`: the key of its `PROCS` entry.
    pub signal: u64,
    /// `task_struct.start_boottime` in ns: guards /proc reads against pid reuse.
    pub start_boottime_ns: u64,
}

/// One live tracked process; value of `PROCS`, keyed by the address of its `signal_struct`.
/// Its removal, which succeeds exactly once, marks the process's end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcMember {
    pub run: u32,
    pub _pad0: u32,
}

/// The per-run accounting record, value of `RUNS`. Every field is a counter updated with
/// atomic adds in the kernel; userspace only reads it (and zeroes a slot before a run).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunCounters {
    /// Sum of `se.sum_exec_runtime` of exited threads, read after their last context switch.
    pub cpu_runtime_ns: u64,
    /// Sum of tick-sampled `utime` of exited threads (for the user/system split only).
    pub cpu_utime_ns: u64,
    /// Sum of tick-sampled `stime` of exited threads (for the user/system split only).
    pub cpu_stime_ns: u64,
    /// Processes that ever joined, the root included.
    pub processes_started: u64,
    /// Threads that ever joined, main threads included.
    pub threads_started: u64,
    /// Processes alive now.
    pub processes_alive: u64,
    /// The most processes alive at once (only where the kernel has BPF atomic fetch).
    pub processes_peak: u64,
    /// Threads that have exited; the run is over when it equals `threads_started`. Also the
    /// generation userspace uses for consistent snapshots.
    pub threads_exited: u64,
    /// Records the kernel side could not make (map full, ring buffer full).
    pub lost_events: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the last thread left; 0 before.
    pub ended_ns: u64,
}

impl RunCounters {
    /// True once every thread that joined has exited.
    pub fn finished(&self) -> bool {
        self.threads_started == self.threads_exited
    }
}

/// Kinds of [`Event`].
pub mod event_kind {
    /// The last thread of a run has exited (may come twice when the last two exit together).
    pub const RUN_EMPTY: u32 = 1;
}

/// A record in the `EVENTS` ring buffer: only what userspace must see promptly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    pub run: u32,
}

const _: () = assert!(size_of::<Offsets>() == 48);
const _: () = assert!(size_of::<TaskMember>() == 32);
const _: () = assert!(size_of::<ProcMember>() == 8);
const _: () = assert!(size_of::<RunCounters>() == 80);
const _: () = assert!(size_of::<Event>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers, with explicit padding.
    unsafe impl aya::Pod for super::Offsets {}
    unsafe impl aya::Pod for super::TaskMember {}
    unsafe impl aya::Pod for super::ProcMember {}
    unsafe impl aya::Pod for super::RunCounters {}
    unsafe impl aya::Pod for super::Event {}
}
