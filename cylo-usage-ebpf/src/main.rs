//! cylo-usage's eBPF programs: follow every descendant of a tracked process inside the kernel
//! and aggregate what they use into one per-run record.
//!
//! Handlers (each runs for every matching event on the whole host; an untracked task pays one
//! map lookup and a return):
//! - `task_newtask`: a task of a run creates a task (fork, clone, vfork, thread, io worker):
//!   the new task joins the run here, before it can run. `task_newtask_no_peak` is the same
//!   without the peak of processes alive, for kernels without BPF atomic fetch (before 5.12).
//! - `sched_process_exit`: a tracked thread passes do_exit(); when it is the last of its
//!   process, the process is over (before its parent can reap it).
//! - `sched_switch`: the last context switch of a dead task: its runtime is final, so it is
//!   added to the run and the task leaves it.
//!
//! Only the peak needs an atomic's old value; every other counter is a plain atomic add.
#![no_std]
#![no_main]
// The BPF target has no `atomic-cas` in its spec, so `AtomicU64` offers no read-modify-write
// methods; the intrinsics compile to BPF_ATOMIC instructions (ISA v3).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{
    AtomicOrdering::{Relaxed, SeqCst},
    atomic_cxchg, atomic_xadd,
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, RingBuf},
    programs::RawTracePointContext,
};
use cylo_usage_abi::{
    CLONE_THREAD, DEFAULT_MAX_PROCS, DEFAULT_MAX_TASKS, EVENTS_BYTES, Event, MAX_RUNS,
    MAX_SPAWNERS, Offsets, ProcMember, RunCounters, TaskMember, event_kind,
};

/// Kernel layout, resolved by userspace from BTF at start-up (read-only global).
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets {
    task_pid: 0,
    task_tgid: 0,
    task_signal: 0,
    task_start_boottime: 0,
    task_sum_exec_runtime: 0,
    task_utime: 0,
    task_stime: 0,
    task_state: 0,
    task_state_size: 0,
    switch_has_prev_state: 0,
    task_dead: 0,
    signal_live: 0,
};

/// Live tracked threads, keyed by the address of their `task_struct`.
#[map]
static TASKS: HashMap<u64, TaskMember> = HashMap::with_max_entries(DEFAULT_MAX_TASKS, 0);

/// Live tracked processes, keyed by the address of their `signal_struct`.
#[map]
static PROCS: HashMap<u64, ProcMember> = HashMap::with_max_entries(DEFAULT_MAX_PROCS, 0);

/// One accounting record per run slot.
#[map]
static RUNS: Array<RunCounters> = Array::with_max_entries(MAX_RUNS, 0);

/// Userspace threads (by global tid) whose next fork creates the root of a run (value: slot).
#[map]
static SPAWNERS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_SPAWNERS, 0);

/// Index 0: number of entries userspace has put in `SPAWNERS`. While it is 0 (nearly always),
/// an untracked fork looks nothing else up.
#[map]
static SPAWN_GATE: Array<u64> = Array::with_max_entries(1, 0);

/// Notifications for userspace (never totals: those live in `RUNS`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[inline(always)]
fn offsets() -> Offsets {
    // SAFETY: a plain read of a global; volatile so the compiler cannot fold the zero
    // initialiser that userspace replaces at load time.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
fn read<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault returns an error.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

// SAFETY (all three): `field` points into a map value, 8-byte aligned and live for the call.
/// Atomically adds `v` (BPF_ATOMIC add; no fetch).
#[inline(always)]
fn add(field: &mut u64, v: u64) {
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(field, v) };
}

// Where the old value is used, the ordering is SeqCst: LLVM 22 selects the fetch-less
// `lock add` for a relaxed atomicrmw even when its result is used.
/// Atomically adds 1 and returns the new value.
#[inline(always)]
fn increment(field: &mut u64) -> u64 {
    unsafe { atomic_xadd::<u64, u64, { SeqCst }>(field, 1) + 1 }
}

/// Raises `field` to at least `v` (compare-and-exchange, bounded so the verifier accepts it).
#[inline(always)]
fn raise_to(field: &mut u64, v: u64) {
    // An aligned 8-byte load is single-copy atomic; v3 has no atomic-load instruction.
    let mut seen = unsafe { core::ptr::read_volatile(field) };
    for _ in 0..8 {
        if seen >= v {
            return;
        }
        let (now, ok) = unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(field, seen, v) };
        if ok {
            return;
        }
        seen = now;
    }
}

#[inline(always)]
fn run_counters(run: u32) -> Option<&'static mut RunCounters> {
    // SAFETY: the array value lives as long as the map; all writes are atomic.
    RUNS.get_ptr_mut(run).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn notify(run: u32, kind: u32, counters: &mut RunCounters) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event { kind, run });
            entry.submit(0);
        }
        None => add(&mut counters.lost_events, 1),
    }
}

/// `task_newtask(struct task_struct *task, unsigned long clone_flags)`, in the creator's context.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask(ctx: RawTracePointContext) -> i32 {
    on_newtask::<true>(ctx)
}

/// `task_newtask` for kernels without BPF atomic fetch and compare-and-exchange.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask_no_peak(ctx: RawTracePointContext) -> i32 {
    on_newtask::<false>(ctx)
}

#[inline(always)]
fn on_newtask<const PEAK: bool>(ctx: RawTracePointContext) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    let run = match unsafe { TASKS.get(current) } {
        Some(member) => member.run,
        None => match spawner_run() {
            Some(run) => run,
            None => return 0,
        },
    };
    let child: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(1);
    join::<PEAK>(run, child, flags & CLONE_THREAD != 0);
    0
}

/// The run whose root the current (untracked) thread is about to create, if any.
#[inline(always)]
fn spawner_run() -> Option<u32> {
    if *SPAWN_GATE.get(0)? == 0 {
        return None;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out before the entry is removed.
    let run = *unsafe { SPAWNERS.get(tid) }?;
    // Only the first task this thread creates is the root.
    let _ = SPAWNERS.remove(tid);
    Some(run)
}

#[inline(always)]
fn join<const PEAK: bool>(run: u32, child: u64, is_thread: bool) {
    let Some(counters) = run_counters(run) else {
        return;
    };
    let o = offsets();
    let (Some(tid), Some(tgid), Some(signal), Some(start)) = (
        read::<u32>(child, o.task_pid),
        read::<u32>(child, o.task_tgid),
        read::<u64>(child, o.task_signal),
        read::<u64>(child, o.task_start_boottime),
    ) else {
        add(&mut counters.lost_events, 1);
        return;
    };
    let member = TaskMember {
        run,
        tid,
        tgid,
        _pad0: 0,
        signal,
        start_boottime_ns: start,
    };
    if TASKS.insert(child, member, BPF_NOEXIST as u64).is_err() {
        add(&mut counters.lost_events, 1);
        return;
    }
    add(&mut counters.threads_started, 1);
    if is_thread {
        return;
    }
    let proc = ProcMember { run, _pad0: 0 };
    if PROCS.insert(signal, proc, BPF_NOEXIST as u64).is_err() {
        add(&mut counters.lost_events, 1);
        return;
    }
    add(&mut counters.processes_started, 1);
    if PEAK {
        let alive = increment(&mut counters.processes_alive);
        raise_to(&mut counters.processes_peak, alive);
    } else {
        add(&mut counters.processes_alive, 1);
    }
}

/// `sched_process_exit(struct task_struct *p[, bool group_dead])`, in the exiting thread.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    // SAFETY: the value is copied out at once.
    let Some(member) = (unsafe { TASKS.get(current) }).copied() else {
        return 0;
    };
    // do_exit() has already decremented `signal->live`; at 0 the process is over. Several of
    // its threads may see 0; removing the process's entry succeeds for exactly one of them.
    let o = offsets();
    if read::<u32>(member.signal, o.signal_live) == Some(0)
        && PROCS.remove(member.signal).is_ok()
        && let Some(counters) = run_counters(member.run)
    {
        add(&mut counters.processes_alive, u64::MAX); // -1
    }
    0
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next
/// [, unsigned int prev_state])`, still in `prev`'s context.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    let o = offsets();
    let prev: u64 = ctx.arg(1);
    let state: u64 = if o.switch_has_prev_state != 0 {
        ctx.arg(3)
    } else if o.task_state_size == 8 {
        read::<u64>(prev, o.task_state).unwrap_or(0)
    } else {
        read::<u32>(prev, o.task_state).unwrap_or(0) as u64
    };
    if state & o.task_dead as u64 == 0 {
        return 0;
    }
    // SAFETY: the value is copied out before the entry is removed.
    let Some(member) = (unsafe { TASKS.get(prev) }).copied() else {
        return 0;
    };
    leave(prev, &member, &o);
    0
}

/// A tracked thread has switched out for the last time: its runtime is final.
#[inline(always)]
fn leave(task: u64, member: &TaskMember, o: &Offsets) {
    let Some(counters) = run_counters(member.run) else {
        return;
    };
    let runtime = read::<u64>(task, o.task_sum_exec_runtime);
    let utime = read::<u64>(task, o.task_utime);
    let stime = read::<u64>(task, o.task_stime);
    match (runtime, utime, stime) {
        (Some(r), Some(u), Some(s)) => {
            add(&mut counters.cpu_runtime_ns, r);
            add(&mut counters.cpu_utime_ns, u);
            add(&mut counters.cpu_stime_ns, s);
        }
        _ => add(&mut counters.lost_events, 1),
    }
    let _ = TASKS.remove(task);
    // Last: the exit generation (userspace's consistency check for snapshots).
    add(&mut counters.threads_exited, 1);
    // SAFETY (both reads): aligned 8-byte loads of map values are single-copy atomic. The
    // thread being the last is seen by at least the last of concurrent exits.
    let started = unsafe { core::ptr::read_volatile(&counters.threads_started) };
    let exited = unsafe { core::ptr::read_volatile(&counters.threads_exited) };
    if started == exited {
        // SAFETY: reads the monotonic clock.
        counters.ended_ns = unsafe { bpf_ktime_get_ns() };
        notify(member.run, event_kind::RUN_EMPTY, counters);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
