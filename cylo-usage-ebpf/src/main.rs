//! cylo-usage's eBPF programs: follow every descendant of a tracked process inside the kernel
//! and aggregate what they use into one per-run record.
//!
//! Handlers (each runs for every matching event on the whole host; an untracked task pays one
//! map lookup and a return):
//! - `task_newtask`: a task of a run creates a task (fork, clone, vfork, thread, io worker):
//!   the new task joins the run here, before it can run; a new process's address space too.
//! - `sched_process_exec`: a tracked process execs: it moves to its new address space.
//! - `sched_process_exit`: a tracked thread passes do_exit(); when it is the last of its
//!   process, the process is over (before its parent can reap it): its RSS high-water mark
//!   is final, and it leaves its address space.
//! - `sched_switch`: the last context switch of a dead task: its runtime and I/O accounting
//!   are final, so they are added to the run and the task leaves it.
//! - `rss_stat`: an RSS counter of a tracked address space changed: the run's RSS follows it.
//! - `block_bio_queue`: a tracked task submits block I/O: counted per device.
//! - socket sends and receives: see [`net`].
//!
//! The peaks and the memory counters need atomics that return the old value (BPF ISA v3,
//! kernel 5.12): `task_newtask_no_atomics` and `sched_process_exit_no_atomics` do without
//! them (and without those counters), and `sched_process_exec` / `rss_stat` are then not
//! attached. Everything else is plain atomic adds.
#![no_std]
#![no_main]
// The BPF target has no `atomic-cas` in its spec, so `AtomicU64` offers no read-modify-write
// methods; the intrinsics compile to BPF_ATOMIC instructions (ISA v3).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{
    AtomicOrdering::{Relaxed, SeqCst},
    atomic_cxchg, atomic_xadd, atomic_xchg,
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
    ABSENT, CLONE_THREAD, DEFAULT_MAX_MMS, DEFAULT_MAX_PROCS, DEFAULT_MAX_TASKS, DevCounters,
    DevKey, EVENTS_BYTES, Event, MAX_DEVS, MAX_RUNS, MAX_SPAWNERS, MmMember, Offsets, ProcMember,
    RSS_MEMBERS, RunCounters, TaskMember, event_kind,
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
    task_ioac_read_bytes: ABSENT,
    task_ioac_write_bytes: ABSENT,
    task_ioac_cancelled_write_bytes: ABSENT,
    task_ioac_rchar: ABSENT,
    task_ioac_wchar: ABSENT,
    task_mm: 0,
    mm_rss: [0; 4],
    rss_stat_has_count: 0,
    bio_queue_bio_arg: 0,
    bio_size: 0,
    bio_opf: 0,
    bio_bdev: ABSENT,
    bdev_dev: ABSENT,
    bio_disk: ABSENT,
    bio_partno: ABSENT,
    disk_major: ABSENT,
    disk_first_minor: ABSENT,
    net_hooks: 0,
    socket_sk: ABSENT,
    sk_family: ABSENT,
    sk_type: ABSENT,
    sk_protocol: ABSENT,
};

/// Live tracked threads, keyed by the address of their `task_struct`.
#[map]
static TASKS: HashMap<u64, TaskMember> = HashMap::with_max_entries(DEFAULT_MAX_TASKS, 0);

/// Live tracked processes, keyed by the address of their `signal_struct`.
#[map]
static PROCS: HashMap<u64, ProcMember> = HashMap::with_max_entries(DEFAULT_MAX_PROCS, 0);

/// Address spaces of tracked processes, keyed by the address of their `mm_struct`.
#[map]
static MMS: HashMap<u64, MmMember> = HashMap::with_max_entries(DEFAULT_MAX_MMS, 0);

/// Block I/O per (run, device).
#[map]
static DEVS: HashMap<DevKey, DevCounters> = HashMap::with_max_entries(MAX_DEVS, 0);

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

/// One field of the kernel layout. A volatile read of just that field: the compiler cannot
/// fold the zero initialiser that userspace replaces at load time, and a handler loads only
/// the fields it uses (a whole-struct copy would cost ~40 loads on every context switch).
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: a plain read of a field of a global.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!(OFFSETS.$field)) }
    };
}

#[inline(always)]
fn read<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault returns an error.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

// SAFETY (all four): `field` points into a map value, 8-byte aligned and live for the call.
/// Atomically adds `v` (BPF_ATOMIC add; no fetch).
#[inline(always)]
fn add(field: &mut u64, v: u64) {
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(field, v) };
}

// Where the old value is used, the ordering is SeqCst: LLVM 22 selects the fetch-less
// `lock add` for a relaxed atomicrmw even when its result is used.
/// Atomically adds `v` (wrapping: `u64::MAX` subtracts 1) and returns the new value.
#[inline(always)]
fn add_fetch(field: &mut u64, v: u64) -> u64 {
    unsafe { atomic_xadd::<u64, u64, { SeqCst }>(field, v) }.wrapping_add(v)
}

/// Atomically stores `v` and returns the value it replaced (BPF_XCHG).
#[inline(always)]
fn exchange(field: &mut u64, v: u64) -> u64 {
    unsafe { atomic_xchg::<u64, { SeqCst }>(field, v) }
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

/// `task_newtask` for kernels without BPF atomic fetch, exchange and compare-and-exchange.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask_no_atomics(ctx: RawTracePointContext) -> i32 {
    on_newtask::<false>(ctx)
}

#[inline(always)]
fn on_newtask<const ATOMICS: bool>(ctx: RawTracePointContext) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    let (run, root) = match unsafe { TASKS.get(current) } {
        Some(member) => (member.run, false),
        None => match spawner_run() {
            Some(run) => (run, true),
            None => return 0,
        },
    };
    let child: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(1);
    join::<ATOMICS>(run, child, flags & CLONE_THREAD != 0, root);
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
fn join<const ATOMICS: bool>(run: u32, child: u64, is_thread: bool, root: bool) {
    let Some(counters) = run_counters(run) else {
        return;
    };
    let (Some(tid), Some(tgid), Some(signal), Some(start)) = (
        read::<u32>(child, offset!(task_pid)),
        read::<u32>(child, offset!(task_tgid)),
        read::<u64>(child, offset!(task_signal)),
        read::<u64>(child, offset!(task_start_boottime)),
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
    // Its own address space after fork; its creator's after vfork / CLONE_VM. The root's,
    // until it execs, is a copy of the tracker's (or the tracker's own): not the command's.
    let mm = if ATOMICS && !root {
        read::<u64>(child, offset!(task_mm)).unwrap_or(0)
    } else {
        0
    };
    let proc = ProcMember { run, _pad0: 0, mm };
    if PROCS.insert(signal, proc, BPF_NOEXIST as u64).is_err() {
        add(&mut counters.lost_events, 1);
        return;
    }
    add(&mut counters.processes_started, 1);
    if ATOMICS {
        let alive = add_fetch(&mut counters.processes_alive, 1);
        raise_to(&mut counters.processes_peak, alive);
        mm_use(run, mm, counters);
    } else {
        add(&mut counters.processes_alive, 1);
    }
}

/// A tracked process starts using address space `mm`.
#[inline(always)]
fn mm_use(run: u32, mm: u64, counters: &mut RunCounters) {
    if mm == 0 {
        return;
    }
    if let Some(entry) = MMS.get_ptr_mut(mm) {
        // SAFETY: map value pointer; updated atomically.
        add(unsafe { &mut (*entry).users }, 1);
        return;
    }
    let fresh = MmMember {
        run,
        _pad0: 0,
        users: 1,
        pages: [0; 4],
        rss: 0,
        peak: 0,
    };
    if MMS.insert(mm, fresh, BPF_NOEXIST as u64).is_err() {
        // Another CPU registered it first (or the map is full).
        match MMS.get_ptr_mut(mm) {
            // SAFETY: map value pointer; updated atomically.
            Some(entry) => add(unsafe { &mut (*entry).users }, 1),
            None => add(&mut counters.lost_events, 1),
        }
        return;
    }
    let Some(entry) = MMS.get_ptr_mut(mm) else {
        return;
    };
    // What it holds already (exec maps the program and its stack before the tracepoint).
    for member in RSS_MEMBERS {
        let pages = read::<i64>(mm, offset!(mm_rss)[member]).unwrap_or(0);
        // SAFETY: map value pointer.
        set_rss(unsafe { &mut *entry }, member, pages, counters);
    }
}

/// A tracked process stops using address space `mm` (exec, exit). When it was the last,
/// the address space leaves the run: its pages leave the run's RSS, and its high-water mark
/// is a candidate for the largest process.
#[inline(always)]
fn mm_release(mm: u64, counters: &mut RunCounters) {
    let Some(entry) = MMS.get_ptr_mut(mm) else {
        return;
    };
    // SAFETY: map value pointer; updated atomically.
    let entry = unsafe { &mut *entry };
    if add_fetch(&mut entry.users, u64::MAX) != 0 {
        return;
    }
    for member in RSS_MEMBERS {
        let old = exchange(&mut entry.pages[member], 0);
        add(&mut counters.rss_pages, old.wrapping_neg());
    }
    // SAFETY: aligned 8-byte load of a map value.
    let peak = unsafe { core::ptr::read_volatile(&entry.peak) };
    raise_to(&mut counters.max_process_rss_pages, peak);
    let _ = MMS.remove(mm);
}

/// Records the new value of one RSS counter of a tracked address space. The exchange makes
/// the run's total the sum of the last values seen, whatever order events arrive in.
#[inline(always)]
fn set_rss(entry: &mut MmMember, member: usize, pages: i64, counters: &mut RunCounters) {
    if member >= 4 {
        return;
    }
    // A per-CPU counter's central count can dip below 0 for a moment.
    let new = if pages < 0 { 0 } else { pages as u64 };
    let old = exchange(&mut entry.pages[member], new);
    let delta = new.wrapping_sub(old);
    let own = add_fetch(&mut entry.rss, delta);
    raise_to(&mut entry.peak, own);
    let total = add_fetch(&mut counters.rss_pages, delta);
    raise_to(&mut counters.rss_peak_pages, total);
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`,
/// after the new program is loaded: the process has a new address space.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    // SAFETY: the value is copied out at once.
    let Some(member) = (unsafe { TASKS.get(current) }).copied() else {
        return 0;
    };
    let (Some(counters), Some(proc)) = (run_counters(member.run), PROCS.get_ptr_mut(member.signal))
    else {
        return 0;
    };
    let new = read::<u64>(current, offset!(task_mm)).unwrap_or(0);
    // SAFETY: map value pointer; only this process's exec changes it.
    let proc = unsafe { &mut *proc };
    if new != proc.mm {
        let old = proc.mm;
        proc.mm = new;
        mm_use(member.run, new, counters);
        mm_release(old, counters);
    }
    0
}

/// `rss_stat(struct mm_struct *mm, int member[, long count])`, wherever an RSS counter of
/// any address space changes (once per page, or per batch of pages on older kernels).
#[raw_tracepoint(tracepoint = "rss_stat")]
pub fn rss_stat(ctx: RawTracePointContext) -> i32 {
    let mm: u64 = ctx.arg(0);
    let Some(entry) = MMS.get_ptr_mut(mm) else {
        return 0;
    };
    // SAFETY: map value pointer; its counters are updated atomically.
    let entry = unsafe { &mut *entry };
    let member = ctx.arg::<u64>(1) as u32 as usize;
    if member == 2 || member >= 4 {
        return 0; // swap entries are not resident
    }
    let pages: i64 = if offset!(rss_stat_has_count) != 0 {
        ctx.arg(2)
    } else {
        match read::<i64>(mm, offset!(mm_rss)[member]) {
            Some(p) => p,
            None => return 0,
        }
    };
    if let Some(counters) = run_counters(entry.run) {
        set_rss(entry, member, pages, counters);
    }
    0
}

/// `block_bio_queue(struct bio *bio)` (5.11+), in the submitter's context.
#[raw_tracepoint(tracepoint = "block_bio_queue")]
pub fn block_bio_queue(ctx: RawTracePointContext) -> i32 {
    on_bio_queue(ctx.arg(0))
}

/// `block_bio_queue(struct request_queue *q, struct bio *bio)` (before 5.11). A separate
/// program, not a branch: a context offset chosen at run time is refused by older verifiers.
#[raw_tracepoint(tracepoint = "block_bio_queue")]
pub fn block_bio_queue_with_queue(ctx: RawTracePointContext) -> i32 {
    on_bio_queue(ctx.arg(1))
}

#[inline(always)]
fn on_bio_queue(bio: u64) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    // SAFETY: the value is copied out at once.
    let Some(member) = (unsafe { TASKS.get(current) }).copied() else {
        return 0;
    };
    let Some(counters) = run_counters(member.run) else {
        return 0;
    };
    let Some(opf) = read::<u32>(bio, offset!(bio_opf)) else {
        add(&mut counters.lost_events, 1);
        return 0;
    };
    let write = match opf & 0xff {
        0 => false, // REQ_OP_READ
        1 => true,  // REQ_OP_WRITE
        _ => return 0,
    };
    let (Some(size), Some(dev)) = (read::<u32>(bio, offset!(bio_size)), bio_dev(bio)) else {
        add(&mut counters.lost_events, 1);
        return 0;
    };
    let key = DevKey {
        run: member.run,
        dev,
    };
    let mut slot = DEVS.get_ptr_mut(key);
    if slot.is_none() {
        let _ = DEVS.insert(key, DevCounters::default(), BPF_NOEXIST as u64);
        slot = DEVS.get_ptr_mut(key);
    }
    let Some(c) = slot else {
        add(&mut counters.lost_events, 1);
        return 0;
    };
    // SAFETY: map value pointer; updated atomically.
    let c = unsafe { &mut *c };
    if write {
        add(&mut c.write_bytes, size as u64);
        add(&mut c.write_ops, 1);
    } else {
        add(&mut c.read_bytes, size as u64);
        add(&mut c.read_ops, 1);
    }
    0
}

/// The `dev_t` a bio is for: `bio->bi_bdev->bd_dev` (5.12+), or from its gendisk before.
#[inline(always)]
fn bio_dev(bio: u64) -> Option<u32> {
    if offset!(bio_bdev) != ABSENT {
        let bdev = read::<u64>(bio, offset!(bio_bdev))?;
        return read::<u32>(bdev, offset!(bdev_dev));
    }
    let disk = read::<u64>(bio, offset!(bio_disk))?;
    let partno = read::<u8>(bio, offset!(bio_partno))? as u32;
    let major = read::<i32>(disk, offset!(disk_major))? as u32;
    let first_minor = read::<i32>(disk, offset!(disk_first_minor))? as u32;
    Some((major << 20) | (first_minor + partno))
}

/// `sched_process_exit(struct task_struct *p[, bool group_dead])`, in the exiting thread.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    on_exit::<true>()
}

/// `sched_process_exit` for kernels without BPF atomic fetch, exchange and cmpxchg.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit_no_atomics(_ctx: RawTracePointContext) -> i32 {
    on_exit::<false>()
}

#[inline(always)]
fn on_exit<const ATOMICS: bool>() -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    // SAFETY: the value is copied out at once.
    let Some(member) = (unsafe { TASKS.get(current) }).copied() else {
        return 0;
    };
    // do_exit() has already decremented `signal->live`; at 0 the process is over. Several of
    // its threads may see 0; removing the process's entry succeeds for exactly one of them.
    if read::<u32>(member.signal, offset!(signal_live)) != Some(0) {
        return 0;
    }
    // SAFETY: the value is copied out before the entry is removed.
    let Some(proc) = (unsafe { PROCS.get(member.signal) }).copied() else {
        return 0;
    };
    if PROCS.remove(member.signal).is_err() {
        return 0;
    }
    let Some(counters) = run_counters(member.run) else {
        return 0;
    };
    add(&mut counters.processes_alive, u64::MAX); // -1
    if ATOMICS {
        mm_release(proc.mm, counters);
    }
    0
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next
/// [, unsigned int prev_state])`, still in `prev`'s context.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    let prev: u64 = ctx.arg(1);
    let state: u64 = if offset!(switch_has_prev_state) != 0 {
        ctx.arg(3)
    } else if offset!(task_state_size) == 8 {
        read::<u64>(prev, offset!(task_state)).unwrap_or(0)
    } else {
        read::<u32>(prev, offset!(task_state)).unwrap_or(0) as u64
    };
    if state & offset!(task_dead) as u64 == 0 {
        return 0;
    }
    // SAFETY: the value is copied out before the entry is removed.
    let Some(member) = (unsafe { TASKS.get(prev) }).copied() else {
        return 0;
    };
    leave(prev, &member);
    0
}

/// A tracked thread has switched out for the last time: its runtime is final.
#[inline(always)]
fn leave(task: u64, member: &TaskMember) {
    let Some(counters) = run_counters(member.run) else {
        return;
    };
    let runtime = read::<u64>(task, offset!(task_sum_exec_runtime));
    let utime = read::<u64>(task, offset!(task_utime));
    let stime = read::<u64>(task, offset!(task_stime));
    match (runtime, utime, stime) {
        (Some(r), Some(u), Some(s)) => {
            add(&mut counters.cpu_runtime_ns, r);
            add(&mut counters.cpu_utime_ns, u);
            add(&mut counters.cpu_stime_ns, s);
        }
        _ => add(&mut counters.lost_events, 1),
    }
    add_ioac(
        task,
        offset!(task_ioac_read_bytes),
        &mut counters.disk_read_bytes,
    );
    add_ioac(
        task,
        offset!(task_ioac_write_bytes),
        &mut counters.disk_write_bytes,
    );
    add_ioac(
        task,
        offset!(task_ioac_cancelled_write_bytes),
        &mut counters.disk_cancelled_write_bytes,
    );
    add_ioac(task, offset!(task_ioac_rchar), &mut counters.io_rchar);
    add_ioac(task, offset!(task_ioac_wchar), &mut counters.io_wchar);
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

/// Adds one `task_struct.ioac` counter of an exited thread, where the kernel has it.
#[inline(always)]
fn add_ioac(task: u64, offset: u32, total: &mut u64) {
    if offset != ABSENT
        && let Some(v) = read::<u64>(task, offset)
    {
        add(total, v);
    }
}

// After the macros above, which it uses.
mod net;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
