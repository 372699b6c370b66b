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
//!   are final, so they are added to the run and the task leaves it. While a task killed at
//!   birth is alive (`DOOMED_ALIVE`), any switch of it sends it SIGKILL.
//! - `rss_stat`: an RSS counter of a tracked address space changed: the run's RSS follows it.
//! - `block_bio_queue`: a tracked task submits block I/O: counted per device.
//! - `control`: never attached; userspace runs it in its own context (`BPF_PROG_TEST_RUN`) to
//!   record the tracker itself, register a spawning thread, or adopt a task of a running tree
//!   (attach) from a `/proc/PID/task/TID` directory it holds open.
//!
//! Runs that asked for per-process records (`run_flags::RECORDS`) also get one record per
//! process start, exec and exit, and per thread end, in the `RECORDS` ring buffer; the totals
//! never depend on it. While a run is being attached to (`ADOPT_GATE` open), the hooks adopt a
//! task of the tree that is not followed yet at its next fork, exec, exit or last switch.
//! - socket sends and receives: see [`net`].
//!
//! Fail closed at a run's share: a task the run cannot follow within its share
//! (`RunControl::max_tasks`) must not outlive a kill of the run. `task_newtask` runs after the
//! fork's last signal check, too late to refuse it, and `bpf_send_signal` reaches only the
//! current task: so the creator gets SIGKILL there, and the new task still joins the run,
//! marked `DOOMED` (a kill of the run reaches it, its usage counts), and gets SIGKILL itself
//! at its first context switch, fork or exec. Only when the maps are full is a new task not
//! followed: its creator is killed, a new thread dies with it, and a new process is counted
//! as escaped.
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
    bindings::{BPF_EXIST, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_kernel_buf, bpf_probe_read_kernel_str_bytes,
        generated,
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
    programs::RawTracePointContext,
};
use cylo_usage_abi::{
    ABSENT, ADOPT_ANCESTORS, ARGV_BYTES, CLONE_THREAD, Creds, DEFAULT_MAX_MMS, DEFAULT_MAX_PROCS,
    DEFAULT_MAX_TASKS, DevCounters, DevKey, EVENTS_BYTES, Event, FILTER_SLOTS, MAX_DEVS, MAX_RUNS,
    MAX_SPAWNERS, MmMember, Offsets, ProcExec, ProcExit, ProcMember, ProcStart, RECORDS_BYTES,
    ROOT_ENDED, RSS_MEMBERS, RecordHeader, RunControl, RunCounters, SPLIT_RECORDS_BYTES, Spawner,
    TaskMember, ThreadEnd, TrackerInfo, control, creds_known, event_kind, filter_slot,
    member_flags, proc_flags, record_kind, run_flags,
};

/// Kernel layout, resolved by userspace from BTF at start-up (read-only global).
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::UNRESOLVED;

// TASKS, PROCS and MMS are preallocated (flags 0): before 6.1 the kernel warns at load when a
// tracing program uses a map that allocates at run time, and allocating inside tracepoints is
// unsafe there. What it costs at start-up, against BPF_F_NO_PREALLOC, is in the README
// (Benchmarks, start-up).

/// Live tracked threads, keyed by the address of their `task_struct`.
#[map]
static TASKS: HashMap<u64, TaskMember> = HashMap::with_max_entries(DEFAULT_MAX_TASKS, 0);

/// Live tracked processes, keyed by the address of their `signal_struct`.
#[map]
static PROCS: HashMap<u64, ProcMember> = HashMap::with_max_entries(DEFAULT_MAX_PROCS, 0);

/// Address spaces of tracked processes, keyed by the address of their `mm_struct`.
#[map]
static MMS: HashMap<u64, MmMember> = HashMap::with_max_entries(DEFAULT_MAX_MMS, 0);

/// Counting filters over the keys of `TASKS` and `MMS`: slot `filter_slot(key)` counts the
/// entries whose key hashes there. Every handler runs for every task on the host (`rss_stat`
/// for every RSS change); a key whose slot is 0 is not followed, which one array load tells
/// (the verifier inlines array lookups, and the 16 KiB array stays in cache), where a miss in
/// the hash map costs a hash, a lookup in a 1 MiB bucket array and, for a cold bucket, a cache
/// and TLB miss. Exact: a slot counts an entry from before its insertion until after its
/// removal; other keys in the same slot only send the call on to the hash lookup. Userspace
/// removes entries through `control` (`FORGET_TASK`, `FORGET_MM`), which keeps the counts.
#[map]
static TASK_FILTER: Array<u32> = Array::with_max_entries(FILTER_SLOTS, 0);
#[map]
static MM_FILTER: Array<u32> = Array::with_max_entries(FILTER_SLOTS, 0);

/// Block I/O per (run, device).
#[map]
static DEVS: HashMap<DevKey, DevCounters> = HashMap::with_max_entries(MAX_DEVS, 0);

/// One accounting record per run slot.
#[map]
static RUNS: Array<RunCounters> = Array::with_max_entries(MAX_RUNS, 0);

/// Userspace threads (by `task_struct` address) whose next new task is the root of a run
/// (the run's slot, and the thread's start time: see [`Spawner`]).
#[map]
static SPAWNERS: HashMap<u64, Spawner> = HashMap::with_max_entries(MAX_SPAWNERS, 0);

/// Index 0: number of entries userspace has put in `SPAWNERS`. While it is 0 (nearly always),
/// an untracked fork looks nothing else up.
#[map]
static SPAWN_GATE: Array<u64> = Array::with_max_entries(1, 0);

/// Index 0: number of runs being attached to. While it is 0 (nearly always), an untracked
/// task looks nothing else up.
#[map]
static ADOPT_GATE: Array<u64> = Array::with_max_entries(1, 0);

/// Number of live tasks killed at birth (`member_flags::DOOMED`) on the host. While it is 0
/// (nearly always), a context switch of a live task looks nothing else up. A global (`.bss`)
/// rather than an array map: the live switch path, which every context switch on the host
/// takes, reads it with one load from a known address (no key on the stack, no lookup).
#[unsafe(no_mangle)]
static mut DOOMED_ALIVE: u64 = 0;

/// What userspace changes while a run goes on (attaching, killing), per slot.
#[map]
static RUN_CONTROL: Array<RunControl> = Array::with_max_entries(MAX_RUNS, 0);

/// The tracker itself (index 0), recorded by `control` in its context.
#[map]
static TRACKER: Array<TrackerInfo> = Array::with_max_entries(1, 0);

/// Notifications for userspace (never totals: those live in `RUNS`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Per-process records of the runs that asked for them.
#[map]
static RECORDS: RingBuf = RingBuf::with_byte_size(RECORDS_BYTES, 0);

/// The records of the runs that want them for their user/system split alone.
#[map]
static SPLIT_RECORDS: RingBuf = RingBuf::with_byte_size(SPLIT_RECORDS_BYTES, 0);

/// A place for a record of `counters`' run: in `RECORDS` for a breakdown, else in
/// `SPLIT_RECORDS`.
#[inline(always)]
fn reserve<T: 'static>(counters: &RunCounters) -> Option<RingBufEntry<T>> {
    if wants_all_records(counters) {
        RECORDS.reserve::<T>(0)
    } else {
        SPLIT_RECORDS.reserve::<T>(0)
    }
}

/// The submit flags of a record in `ring` of `size` bytes. A plain submit wakes the reader
/// whenever it has caught up, which it always has (it drains at once, at a real-time
/// priority): each record would cost an interrupt and two context switches inside the
/// handler, about 17 µs per record on this project's VMs. So a record wakes the reader only
/// once a quarter of the ring is taken; else the reader's own 100 ms tick drains it.
#[inline(always)]
fn wake_flags(ring: &RingBuf, size: u32) -> u64 {
    if ring.query(BPF_RB_AVAIL_DATA as u64) >= (size / 4) as u64 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// [`wake_flags`] for the ring a record of `counters`' run goes to.
#[inline(always)]
fn record_wake_flags(counters: &RunCounters) -> u64 {
    if wants_all_records(counters) {
        wake_flags(&RECORDS, RECORDS_BYTES)
    } else {
        wake_flags(&SPLIT_RECORDS, SPLIT_RECORDS_BYTES)
    }
}

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

/// Adds `v` (`u32::MAX`: subtracts 1) to the count of `key` in `filter` (a plain atomic add,
/// which every kernel has).
#[inline(always)]
fn filter_add(filter: &Array<u32>, key: u64, v: u32) {
    if let Some(count) = filter.get_ptr_mut(filter_slot(key)) {
        // SAFETY: array value pointer, 4-byte aligned; updated atomically.
        unsafe { atomic_xadd::<u32, u32, { Relaxed }>(count, v) };
    }
}

/// Whether `key` may be in the map `filter` counts: false means it is not.
#[inline(always)]
fn maybe_in(filter: &Array<u32>, key: u64) -> bool {
    match filter.get_ptr(filter_slot(key)) {
        // SAFETY: an aligned 4-byte load of an array value is single-copy atomic.
        Some(count) => (unsafe { core::ptr::read_volatile(count) }) != 0,
        None => false,
    }
}

/// `task`'s membership: the untracked path of every handler (one array load, and a hash
/// lookup only when the filter lets it through).
#[inline(always)]
fn task_member(task: u64) -> Option<TaskMember> {
    if !maybe_in(&TASK_FILTER, task) {
        return None;
    }
    // SAFETY: the value is copied out at once.
    unsafe { TASKS.get(task) }.copied()
}

/// Inserts `task`'s (new) membership, counted in `TASK_FILTER` before it can be found.
#[inline(always)]
fn insert_task(task: u64, member: TaskMember) -> Result<(), i32> {
    filter_add(&TASK_FILTER, task, 1);
    let r = TASKS.insert(task, member, BPF_NOEXIST as u64);
    if r.is_err() {
        filter_add(&TASK_FILTER, task, u32::MAX);
    }
    r
}

/// Removes `task`'s membership, then its count (only if this call removed it). Whether it did.
#[inline(always)]
fn forget_task(task: u64) -> bool {
    if TASKS.remove(task).is_ok() {
        filter_add(&TASK_FILTER, task, u32::MAX);
        return true;
    }
    false
}

#[inline(always)]
fn run_counters(run: u32) -> Option<&'static mut RunCounters> {
    // SAFETY: the array value lives as long as the map; all writes are atomic.
    RUNS.get_ptr_mut(run).map(|p| unsafe { &mut *p })
}

/// A field of a run's record that only userspace writes, or that is written once.
#[inline(always)]
fn load(field: &u64) -> u64 {
    // SAFETY: an aligned 8-byte load of a map value is single-copy atomic.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn store(field: &mut u64, v: u64) {
    // SAFETY: an aligned 8-byte store to a map value is single-copy atomic.
    unsafe { core::ptr::write_volatile(field, v) }
}

/// Whether the run wants the records of its processes' starts and ends and of its threads'
/// ends (`RECORDS` for a breakdown, `CPU_RECORDS` for its user/system split alone).
#[inline(always)]
fn wants_records(counters: &RunCounters) -> bool {
    load(&counters.flags) & (run_flags::RECORDS | run_flags::CPU_RECORDS) != 0
}

/// Whether the run wants every record: exec records with argv, and each thread's socket
/// bytes (a breakdown, `--tree`/`--events`).
#[inline(always)]
fn wants_all_records(counters: &RunCounters) -> bool {
    load(&counters.flags) & run_flags::RECORDS != 0
}

/// A record could not be made (its ring buffer is full). For a breakdown, something it shows is
/// missing: a lost event. For a run that wants its split alone, nothing it reports is lost
/// (userspace then splits the tree's sums at once): counted apart.
#[inline(always)]
fn record_lost(run: u32, tid: u32, counters: &mut RunCounters) {
    if wants_all_records(counters) {
        lost(diag_kind::RECORDS_FULL, run, tid, counters);
    } else {
        add(&mut counters.split_records_lost, 1);
        note(diag_kind::RECORDS_FULL, run, tid);
    }
}

#[inline(always)]
fn notify(run: u32, kind: u32, counters: &mut RunCounters) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event { kind, run });
            entry.submit(0);
        }
        None => lost(diag_kind::EVENTS_FULL, run, 0, counters),
    }
}

/// Diagnostics on the rare paths that lose something (a full map or ring buffer, a failed
/// kernel read): aya-log records at debug level, which userspace reads only while logging is
/// on (`cylo-usage -v`, `RUST_LOG=debug`). Otherwise userspace loads the programs with
/// `AYA_LOG_LEVEL` at 0, a read-only global: the verifier sees that every branch on it is
/// never taken and removes what it guards, so with logging off they cost nothing, not even a
/// test. Never on a hot path.
///
/// A rare path notes what it lost ([`lost`]: three stores) in a per-CPU record; the
/// handler's entry point logs it on its way out ([`diag_flush`]): one small log statement per
/// program, of numbers and the comm, which the verifier walks once rather than once per path
/// that loses something. The reason's text is userspace's (`cylo_usage_abi::diag::text`).
pub(crate) use cylo_usage_abi::diag as diag_kind;

/// What a rare path lost, until its handler logs it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Diag {
    kind: u32,
    run: u32,
    tid: u32,
    _pad: u32,
}

/// Scratch for [`adopt`], which must keep its stack frame small (see there): what an adopted
/// process's `signal_struct` keeps of its past ([`group_usage`]), between reading it and
/// adding it, and what the adopted thread used so far ([`thread_usage`]).
#[repr(C)]
struct AdoptScratch {
    group: [u64; 10],
    thread: [u64; 8],
}

#[map]
static ADOPT_SCRATCH: PerCpuArray<AdoptScratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
static DIAG: PerCpuArray<Diag> = PerCpuArray::with_max_entries(1, 0);

/// Whether the programs were loaded with their log statements in (known to the verifier).
#[inline(always)]
fn logging() -> bool {
    aya_log_ebpf::macro_support::level_enabled(aya_log_ebpf::macro_support::Level::Debug)
}

/// The current thread's global tid.
#[inline(always)]
fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

/// Something of `run` is lost (`lost_events` + 1), for the reason `kind` (`diag_kind`);
/// `tid` is the thread concerned (0: the current one).
#[inline(always)]
fn lost(kind: u32, run: u32, tid: u32, counters: &mut RunCounters) {
    add(&mut counters.lost_events, 1);
    note(kind, run, tid);
}

/// Notes `kind` (`diag_kind`) for the log without counting anything as lost.
#[inline(always)]
fn note(kind: u32, run: u32, tid: u32) {
    if !logging() {
        return;
    }
    if let Some(d) = DIAG.get_ptr_mut(0) {
        // SAFETY: per-CPU map value pointer; written in place.
        let d = unsafe { &mut *d };
        d.kind = kind;
        d.run = run;
        d.tid = tid;
    }
}

/// SIGKILL to the current task's process (`bpf_send_signal`: at once in process context,
/// through irq_work where interrupts are off, as in `sched_switch`).
#[inline(always)]
fn kill_current() {
    // SAFETY: signals the current process; no memory is passed.
    unsafe { generated::bpf_send_signal(SIGKILL) };
}

const SIGKILL: u32 = 9;

/// Whether a task is marked to be killed at birth.
#[inline(always)]
fn doomed(member: &TaskMember) -> bool {
    member.flags & member_flags::DOOMED != 0
}

/// Adds `v` (`u64::MAX`: subtracts 1) to the host-wide count of live doomed tasks.
#[inline(always)]
fn doomed_alive_add(v: u64) {
    // SAFETY: a global's address, 8-byte aligned; updated atomically.
    add(unsafe { &mut *core::ptr::addr_of_mut!(DOOMED_ALIVE) }, v);
}

/// Logs what the handler noted as lost, if anything (see [`diag_kind`]): `lost KIND RUN TID
/// COMM`, which userspace writes out in words.
#[inline(always)]
fn diag_flush() {
    if !logging() {
        return;
    }
    let Some(d) = DIAG.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map value pointer.
    let d = unsafe { &mut *d };
    let kind = d.kind;
    if kind == 0 {
        return;
    }
    d.kind = 0;
    let (run, tid) = (d.run, if d.tid == 0 { current_tid() } else { d.tid });
    // The comm as two numbers (its bytes, little-endian), which userspace turns into text:
    // cheaper to verify than a string, and any byte the thread put there stays harmless.
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let (lo, hi) = (
        u64::from_le_bytes([
            comm[0], comm[1], comm[2], comm[3], comm[4], comm[5], comm[6], comm[7],
        ]),
        u64::from_le_bytes([
            comm[8], comm[9], comm[10], comm[11], comm[12], comm[13], comm[14], comm[15],
        ]),
    );
    aya_log_ebpf::debug!(&(), "lost {} {} {} {} {}", kind, run, tid, lo, hi);
}

#[inline(always)]
fn header(kind: u32, run: u32, process: u64) -> RecordHeader {
    RecordHeader {
        kind,
        run,
        // SAFETY: reads the monotonic clock.
        time_ns: unsafe { bpf_ktime_get_ns() },
        process,
    }
}

/// The tracker's own process and pid-namespace depth (zeroes until userspace said hello).
#[inline(always)]
fn tracker() -> TrackerInfo {
    TRACKER.get(0).copied().unwrap_or_default()
}

/// `task`'s pid as the tracker sees it (0 when it is not visible there), and in the task's
/// own pid namespace: `thread_pid->numbers[level].nr`.
#[inline(always)]
fn pids(task: u64, tracker_level: u32) -> (u32, u32) {
    if offset!(task_thread_pid) == ABSENT {
        // Without the namespace layout: the global pid (a tracker in the initial namespace).
        let pid = read::<u32>(task, offset!(task_pid)).unwrap_or(0);
        return (pid, pid);
    }
    let Some(pid) = read::<u64>(task, offset!(task_thread_pid)) else {
        return (0, 0);
    };
    let level = read::<u32>(pid, offset!(pid_level)).unwrap_or(0);
    let numbers = pid + offset!(pid_numbers) as u64;
    let size = offset!(upid_size) as u64;
    let own = read::<u32>(numbers + level as u64 * size, 0).unwrap_or(0);
    let seen = if level >= tracker_level {
        read::<u32>(numbers + tracker_level as u64 * size, 0).unwrap_or(0)
    } else {
        0
    };
    (seen, own)
}

/// The process id (tgid) of `task` as the tracker sees it: its thread-group leader's pid.
#[inline(always)]
fn process_pid(task: u64, tracker_level: u32) -> u32 {
    match read::<u64>(task, offset!(task_group_leader)) {
        Some(leader) => pids(leader, tracker_level).0,
        None => 0,
    }
}

/// `task_newtask(struct task_struct *task, unsigned long clone_flags)`, in the creator's context.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask(ctx: RawTracePointContext) -> i32 {
    let r = on_newtask::<true>(ctx);
    diag_flush();
    r
}

/// `task_newtask` for kernels without BPF atomic fetch, exchange and compare-and-exchange.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask_no_atomics(ctx: RawTracePointContext) -> i32 {
    let r = on_newtask::<false>(ctx);
    diag_flush();
    r
}

#[inline(always)]
fn on_newtask<const ATOMICS: bool>(ctx: RawTracePointContext) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    // SAFETY: the value is copied out at once.
    let (run, creator) = match task_member(current) {
        Some(member) => (member.run, Some(member)),
        None => match spawner_run(current) {
            Some(run) => (run, None),
            None => match adopt_current::<ATOMICS, true>(current) {
                // SAFETY: the value is copied out at once.
                Some(run) => match (unsafe { TASKS.get(current) }).copied() {
                    Some(member) => (run, Some(member)),
                    None => return 0,
                },
                None => return 0,
            },
        },
    };
    if creator.is_some() {
        // A run being killed: a member that forks gets the signal at once.
        if let Some(control) = RUN_CONTROL.get(run)
            && control.kill_signal != 0
        {
            // SAFETY: signals the current process; no memory is passed.
            unsafe { generated::bpf_send_signal(control.kill_signal) };
        }
    }
    // A task killed at birth that forks dies now (its new task is doomed too, in `join`).
    if creator.as_ref().is_some_and(doomed) {
        kill_current();
    }
    let child: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(1);
    join::<ATOMICS>(run, child, flags & CLONE_THREAD != 0, creator.as_ref());
    0
}

/// The run whose root the current (untracked) thread is about to create, if any.
#[inline(always)]
fn spawner_run(current: u64) -> Option<u32> {
    if *SPAWN_GATE.get(0)? == 0 {
        return None;
    }
    // SAFETY: the value is copied out before the entry is removed.
    let spawner = *unsafe { SPAWNERS.get(current) }?;
    // Only the first task this thread creates is the root; and an entry whose thread is gone
    // (another start time at the same address) is no one's.
    let _ = SPAWNERS.remove(current);
    (read::<u64>(current, offset!(task_start_boottime)) == Some(spawner.start_boottime_ns))
        .then_some(spawner.run)
}

/// Registers thread `task`: its next new task is the root of `run` (see [`Spawner`]).
#[inline(always)]
fn register_spawner(task: u64, run: u32) -> i32 {
    let Some(start) = read::<u64>(task, offset!(task_start_boottime)) else {
        return control::E_INVAL;
    };
    let spawner = Spawner {
        run,
        _pad: 0,
        start_boottime_ns: start,
    };
    match SPAWNERS.insert(task, spawner, 0) {
        Ok(()) => 0,
        Err(_) => control::E_FULL,
    }
}

/// `child` joins `run`, created by `creator` (a member), or as the root (`creator` is `None`).
///
/// A function of its own (a BPF-to-BPF call): the fork hook's frame and [`adopt`]'s, which
/// it may call first, must fit the verifier's 512 bytes of stack together.
#[inline(never)]
fn join<const ATOMICS: bool>(run: u32, child: u64, is_thread: bool, creator: Option<&TaskMember>) {
    let Some(counters) = run_counters(run) else {
        return;
    };
    let level = tracker().pid_level;
    let (tid, own_pid) = pids(child, level);
    let (Some(signal), Some(start)) = (
        read::<u64>(child, offset!(task_signal)),
        read::<u64>(child, offset!(task_start_boottime)),
    ) else {
        unfollowed(
            diag_kind::READ_NEW_TASK,
            run,
            tid,
            is_thread,
            creator,
            counters,
        );
        return;
    };
    // A thread is in its creator's process; a new process is its own.
    let (tgid, process_start) = match creator {
        Some(c) if is_thread => (c.tgid, c.process_start_boottime_ns),
        _ => (tid, start),
    };
    // A run's share of the membership maps (a daemon's session): past it, or created by a
    // task killed at birth, a new task is killed at birth with its creator (fail closed), so
    // it never outlives a kill of the run, and other runs keep their room. The root (created
    // by the tracker, never past a share) is never killed.
    let past_share = match creator {
        Some(c) => {
            doomed(c)
                || RUN_CONTROL.get(run).is_some_and(|control| {
                    control.max_tasks != 0
                        && load(&counters.threads_started)
                            .wrapping_sub(load(&counters.threads_exited))
                            >= control.max_tasks as u64
                })
        }
        None => false,
    };
    let mut member = TaskMember {
        run,
        tid,
        tgid,
        flags: if past_share { member_flags::DOOMED } else { 0 },
        signal,
        start_boottime_ns: start,
        process_start_boottime_ns: process_start,
        net_sent: 0,
        net_received: 0,
    };
    if insert_task(child, member).is_err() {
        unfollowed(
            diag_kind::TASKS_FULL,
            run,
            tid,
            is_thread,
            creator,
            counters,
        );
        return;
    }
    if past_share {
        doom(run, tid, counters);
    }
    add(&mut counters.threads_started, 1);
    if is_thread {
        if let Some(p) = PROCS.get_ptr_mut(signal) {
            // SAFETY: map value pointer; updated atomically.
            add(unsafe { &mut (*p).threads }, 1);
        }
        return;
    }
    let root = creator.is_none();
    // Its own address space after fork; its creator's after vfork / CLONE_VM. The root's,
    // until it execs, is a copy of the tracker's (or the tracker's own): not the command's.
    let mm = if ATOMICS && !root {
        read::<u64>(child, offset!(task_mm)).unwrap_or(0)
    } else {
        0
    };
    let proc = ProcMember {
        run,
        _pad0: 0,
        mm,
        threads: 1,
    };
    if PROCS.insert(signal, proc, BPF_NOEXIST as u64).is_err() {
        lost(diag_kind::PROCS_FULL, run, tid, counters);
        // Followed as a thread only: doomed (if it is not already), so it cannot outlive the
        // run's kill uncounted in `processes_alive`.
        if !root && !past_share {
            member.flags |= member_flags::DOOMED;
            if TASKS.insert(child, member, BPF_EXIST as u64).is_ok() {
                doom(run, tid, counters);
            }
        }
        return;
    }
    if root {
        store(&mut counters.root_signal, signal);
    }
    add(&mut counters.processes_started, 1);
    if ATOMICS {
        let alive = add_fetch(&mut counters.processes_alive, 1);
        raise_to(&mut counters.processes_peak, alive);
        mm_use(run, mm, counters);
    } else {
        add(&mut counters.processes_alive, 1);
    }
    if wants_records(counters) {
        let flags = if root { proc_flags::ROOT } else { 0 };
        record_start(run, child, signal, start, tid, own_pid, flags, counters);
    }
}

/// A new task joined `run` marked `DOOMED`: its creator (the current task) dies now, and it
/// at its first switch, fork or exec.
#[inline(always)]
fn doom(run: u32, tid: u32, counters: &mut RunCounters) {
    doomed_alive_add(1);
    add(&mut counters.tasks_killed_at_birth, 1);
    kill_current();
    note(diag_kind::KILLED_AT_BIRTH, run, tid);
}

/// A new task of `run` cannot be followed at all (`kind`: a full map, a failed read): lost.
/// Fail closed: its creator is killed; a new thread dies with it, a new process may escape.
/// The root is the tracker's own child (it knows it): only lost. (The log says `kind`.)
#[inline(always)]
fn unfollowed(
    kind: u32,
    run: u32,
    tid: u32,
    is_thread: bool,
    creator: Option<&TaskMember>,
    counters: &mut RunCounters,
) {
    lost(kind, run, tid, counters);
    if creator.is_none() {
        return;
    }
    kill_current();
    if is_thread {
        add(&mut counters.tasks_killed_at_birth, 1);
    } else {
        add(&mut counters.tasks_escaped, 1);
    }
}

/// A `PROC_START` record for process `task` (identity `signal`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn record_start(
    run: u32,
    task: u64,
    signal: u64,
    start: u64,
    pid: u32,
    own_pid: u32,
    flags: u32,
    counters: &mut RunCounters,
) {
    let Some(mut entry) = reserve::<ProcStart>(counters) else {
        record_lost(run, pid, counters);
        return;
    };
    let level = tracker().pid_level;
    let parent_task = read::<u64>(task, offset!(task_real_parent)).unwrap_or(0);
    let parent = read::<u64>(parent_task, offset!(task_signal)).unwrap_or(0);
    let ppid = process_pid(parent_task, level);
    let pid_global = read::<u32>(task, offset!(task_tgid)).unwrap_or(0);
    let comm = (task + offset!(task_comm) as u64) as *const u8;
    let start_mono = read::<u64>(task, offset!(task_start_time)).unwrap_or(0);
    let p = entry.as_mut_ptr();
    // SAFETY: `p` points to reserved ring-buffer memory of the record's size.
    unsafe {
        (*p).header = header(record_kind::PROC_START, run, signal);
        (*p).parent = parent;
        (*p).start_boottime_ns = start;
        (*p).start_mono_ns = start_mono;
        (*p).pid_global = pid_global;
        (*p).pid = pid;
        (*p).pid_own_ns = own_pid;
        (*p).ppid = ppid;
        (*p).flags = flags;
        (*p)._pad0 = 0;
        if bpf_probe_read_kernel_buf(comm, &mut (*p).comm).is_err() {
            (*p).comm = [0; 16];
        }
        (*p).creds = creds_of(task);
    }
    entry.submit(record_wake_flags(counters));
}

/// `task`'s objective credentials and its address space's dumpable mode, for records only
/// (see [`Creds`]); what could not be read is left out of `known`.
#[inline(always)]
fn creds_of(task: u64) -> Creds {
    let mut c = Creds::default();
    if offset!(cred_uid) != ABSENT
        && let Some(cred) = read::<u64>(task, offset!(task_real_cred))
        && cred != 0
        && let (Some(uid), Some(gid), Some(suid), Some(sgid), Some(euid), Some(egid)) = (
            read::<u32>(cred, offset!(cred_uid)),
            read::<u32>(cred, offset!(cred_gid)),
            read::<u32>(cred, offset!(cred_suid)),
            read::<u32>(cred, offset!(cred_sgid)),
            read::<u32>(cred, offset!(cred_euid)),
            read::<u32>(cred, offset!(cred_egid)),
        )
    {
        c = Creds {
            uid,
            gid,
            suid,
            sgid,
            euid,
            egid,
            dumpable: 0,
            known: creds_known::IDS,
        };
    }
    if offset!(mm_flags) != ABSENT
        && let Some(mm) = read::<u64>(task, offset!(task_mm))
        && mm != 0
        && let Some(flags) = read::<u64>(mm, offset!(mm_flags))
    {
        c.dumpable = (flags & 3) as u32;
        c.known |= creds_known::DUMPABLE;
    }
    c
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
    // Counted before it can be found, so `rss_stat` never skips a followed address space.
    filter_add(&MM_FILTER, mm, 1);
    if MMS.insert(mm, fresh, BPF_NOEXIST as u64).is_err() {
        filter_add(&MM_FILTER, mm, u32::MAX);
        // Another CPU registered it first (or the map is full).
        match MMS.get_ptr_mut(mm) {
            // SAFETY: map value pointer; updated atomically.
            Some(entry) => add(unsafe { &mut (*entry).users }, 1),
            None => lost(diag_kind::MMS_FULL, run, 0, counters),
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

/// The high-water mark (pages) of a tracked address space, 0 if it is not followed.
#[inline(always)]
fn mm_peak(mm: u64) -> u64 {
    match MMS.get_ptr_mut(mm) {
        // SAFETY: aligned 8-byte load of a map value.
        Some(entry) => load(unsafe { &(*entry).peak }),
        None => 0,
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
    let peak = load(&entry.peak);
    raise_to(&mut counters.max_process_rss_pages, peak);
    forget_mm(mm);
}

/// Removes `mm` from `MMS`, then its count from `MM_FILTER` (only if this call removed it).
#[inline(always)]
fn forget_mm(mm: u64) {
    if MMS.remove(mm).is_ok() {
        filter_add(&MM_FILTER, mm, u32::MAX);
    }
}

/// Records the new value of one RSS counter of a tracked address space. The exchange makes
/// the run's total the sum of the last values seen, whatever order events arrive in.
#[inline(always)]
fn set_rss(entry: &mut MmMember, member: usize, pages: i64, counters: &mut RunCounters) {
    if member >= 4 {
        return;
    }
    let new = rss_pages(pages);
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
pub fn sched_process_exec(ctx: RawTracePointContext) -> i32 {
    let r = on_exec::<true>(ctx);
    diag_flush();
    r
}

/// `sched_process_exec` for kernels without BPF atomic fetch: records and pids only.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec_no_atomics(ctx: RawTracePointContext) -> i32 {
    let r = on_exec::<false>(ctx);
    diag_flush();
    r
}

#[inline(always)]
fn on_exec<const ATOMICS: bool>(ctx: RawTracePointContext) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    let Some(mut member) = member_or_adopted::<ATOMICS>(current) else {
        return 0;
    };
    if doomed(&member) {
        kill_current();
    }
    let Some(counters) = run_counters(member.run) else {
        return 0;
    };
    // A non-leader thread that execs takes over the leader's pid.
    let (tid, _) = pids(current, tracker().pid_level);
    if tid != member.tid {
        member.tid = tid;
        member.tgid = tid;
        let _ = TASKS.insert(current, member, BPF_EXIST as u64);
    }
    let mut old_peak = 0;
    if ATOMICS && let Some(proc) = PROCS.get_ptr_mut(member.signal) {
        let new = read::<u64>(current, offset!(task_mm)).unwrap_or(0);
        // SAFETY: map value pointer; only this process's exec changes it.
        let proc = unsafe { &mut *proc };
        if new != proc.mm {
            let old = proc.mm;
            proc.mm = new;
            old_peak = mm_peak(old);
            mm_use(member.run, new, counters);
            mm_release(old, counters);
        }
    }
    if wants_all_records(counters) {
        let bprm: u64 = ctx.arg(2);
        record_exec(&member, current, bprm, old_peak, counters);
    }
    0
}

/// A `PROC_EXEC` record: the new comm, file name and argv (read from the new stack).
#[inline(always)]
fn record_exec(
    member: &TaskMember,
    task: u64,
    bprm: u64,
    old_peak: u64,
    counters: &mut RunCounters,
) {
    let Some(mut entry) = RECORDS.reserve::<ProcExec>(0) else {
        record_lost(member.run, 0, counters);
        return;
    };
    let p = entry.as_mut_ptr();
    let mm = read::<u64>(task, offset!(task_mm)).unwrap_or(0);
    let arg_start = read::<u64>(mm, offset!(mm_arg_start)).unwrap_or(0);
    let arg_end = read::<u64>(mm, offset!(mm_arg_end)).unwrap_or(0);
    let total = arg_end.saturating_sub(arg_start);
    let filename = read::<u64>(bprm, offset!(bprm_filename)).unwrap_or(0);
    let comm = (task + offset!(task_comm) as u64) as *const u8;
    // SAFETY: `p` points to reserved ring-buffer memory of the record's size; the reads check
    // their source addresses.
    unsafe {
        (*p).header = header(record_kind::PROC_EXEC, member.run, member.signal);
        (*p).old_mm_peak_pages = old_peak;
        (*p).pid = member.tgid;
        (*p)._pad0 = 0;
        if bpf_probe_read_kernel_buf(comm, &mut (*p).comm).is_err() {
            (*p).comm = [0; 16];
        }
        if filename == 0
            || bpf_probe_read_kernel_str_bytes(filename as *const u8, &mut (*p).filename).is_err()
        {
            (*p).filename[0] = 0;
        }
        // 1..=ARGV_BYTES, in a form the verifier can bound: a volatile load the compiler
        // cannot see through, masked and offset right before the call.
        let want: u32 = if total > ARGV_BYTES as u64 {
            ARGV_BYTES as u32
        } else {
            total as u32
        };
        let mut len = 0;
        if want > 0 {
            let staged = want;
            let n = core::ptr::read_volatile(&staged);
            let size = (n.wrapping_sub(1) & (ARGV_BYTES as u32 - 1)) + 1;
            let dst = (*p).argv.as_mut_ptr();
            if generated::bpf_probe_read_user(dst.cast(), size, arg_start as *const _) == 0 {
                len = size;
            }
        }
        (*p).argv_len = len;
        (*p).argv_truncated = u32::from(total > ARGV_BYTES as u64);
        (*p).creds = creds_of(task);
    }
    entry.submit(wake_flags(&RECORDS, RECORDS_BYTES));
}

/// `rss_stat(struct mm_struct *mm, int member[, long count])`, wherever an RSS counter of
/// any address space changes (once per page, or per batch of pages on older kernels).
#[raw_tracepoint(tracepoint = "rss_stat")]
pub fn rss_stat(ctx: RawTracePointContext) -> i32 {
    let mm: u64 = ctx.arg(0);
    // The untracked path: one array load.
    if !maybe_in(&MM_FILTER, mm) {
        return 0;
    }
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
    // Most events find the value they read already recorded (since 6.2 the program reads the
    // central count of a per-CPU counter, which moves once per batch of 32 or more pages):
    // then nothing changes and no atomic is needed. The same as an exchange that returned
    // the value it stored, so the totals stay the sum of the last values seen.
    if load(&entry.pages[member]) == rss_pages(pages) {
        return 0;
    }
    if let Some(counters) = run_counters(entry.run) {
        set_rss(entry, member, pages, counters);
    }
    0
}

/// An RSS counter's value as recorded: a per-CPU counter's central count can dip below 0 for
/// a moment.
#[inline(always)]
fn rss_pages(pages: i64) -> u64 {
    if pages < 0 { 0 } else { pages as u64 }
}
/// `block_bio_queue(struct bio *bio)` (5.11+), in the submitter's context.
#[raw_tracepoint(tracepoint = "block_bio_queue")]
pub fn block_bio_queue(ctx: RawTracePointContext) -> i32 {
    let r = on_bio_queue(ctx.arg(0));
    diag_flush();
    r
}

/// `block_bio_queue(struct request_queue *q, struct bio *bio)` (before 5.11). A separate
/// program, not a branch: a context offset chosen at run time is refused by older verifiers.
#[raw_tracepoint(tracepoint = "block_bio_queue")]
pub fn block_bio_queue_with_queue(ctx: RawTracePointContext) -> i32 {
    let r = on_bio_queue(ctx.arg(1));
    diag_flush();
    r
}

#[inline(always)]
fn on_bio_queue(bio: u64) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    let Some(member) = task_member(current) else {
        return 0;
    };
    let Some(counters) = run_counters(member.run) else {
        return 0;
    };
    let Some(opf) = read::<u32>(bio, offset!(bio_opf)) else {
        lost(diag_kind::READ_BIO, member.run, 0, counters);
        return 0;
    };
    let write = match opf & 0xff {
        0 => false, // REQ_OP_READ
        1 => true,  // REQ_OP_WRITE
        _ => return 0,
    };
    let (Some(size), Some(dev)) = (read::<u32>(bio, offset!(bio_size)), bio_dev(bio)) else {
        lost(diag_kind::READ_BIO, member.run, 0, counters);
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
        lost(diag_kind::DEVS_FULL, member.run, 0, counters);
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
    let r = on_exit::<true>();
    diag_flush();
    r
}

/// `sched_process_exit` for kernels without BPF atomic fetch, exchange and cmpxchg.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit_no_atomics(_ctx: RawTracePointContext) -> i32 {
    let r = on_exit::<false>();
    diag_flush();
    r
}

#[inline(always)]
fn on_exit<const ATOMICS: bool>() -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    let Some(member) = member_or_adopted::<ATOMICS>(current) else {
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
    let code = read::<u32>(current, offset!(task_exit_code)).unwrap_or(0);
    if member.signal == load(&counters.root_signal) {
        store(&mut counters.root_status, ROOT_ENDED | code as u64);
    }
    add(&mut counters.processes_alive, u64::MAX); // -1
    let peak = if ATOMICS { mm_peak(proc.mm) } else { 0 };
    if ATOMICS {
        mm_release(proc.mm, counters);
    }
    if wants_records(counters) {
        record_exit(&member, current, code, peak, proc.threads, counters);
    }
    0
}

/// A `PROC_EXIT` record.
#[inline(always)]
fn record_exit(
    member: &TaskMember,
    task: u64,
    code: u32,
    peak: u64,
    threads: u64,
    counters: &mut RunCounters,
) {
    let Some(mut entry) = reserve::<ProcExit>(counters) else {
        record_lost(member.run, 0, counters);
        return;
    };
    let leader = read::<u64>(task, offset!(task_group_leader)).unwrap_or(task);
    let comm = (leader + offset!(task_comm) as u64) as *const u8;
    let p = entry.as_mut_ptr();
    // SAFETY: `p` points to reserved ring-buffer memory of the record's size.
    unsafe {
        (*p).header = header(record_kind::PROC_EXIT, member.run, member.signal);
        (*p).exit_code = code;
        (*p)._pad0 = 0;
        (*p).mm_peak_pages = peak;
        (*p).threads = threads;
        if bpf_probe_read_kernel_buf(comm, &mut (*p).comm).is_err() {
            (*p).comm = [0; 16];
        }
    }
    entry.submit(record_wake_flags(counters));
}

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next
/// [, unsigned int prev_state])`, still in `prev`'s context.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    on_switch::<true>(ctx)
}

/// `sched_switch` for kernels without BPF atomic fetch (no per-process CPU split).
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_no_atomics(ctx: RawTracePointContext) -> i32 {
    on_switch::<false>(ctx)
}

#[inline(always)]
fn on_switch<const ATOMICS: bool>(ctx: RawTracePointContext) -> i32 {
    let prev: u64 = ctx.arg(1);
    let state: u64 = if offset!(switch_has_prev_state) != 0 {
        ctx.arg(3)
    } else {
        task_state(prev)
    };
    if state & offset!(task_dead) as u64 == 0 {
        // A live task: only a task killed at birth has anything to do here, and while none
        // is alive on the host (nearly always) one array load says so.
        // SAFETY: an aligned 8-byte load of a global is single-copy atomic.
        if unsafe { core::ptr::read_volatile(core::ptr::addr_of!(DOOMED_ALIVE)) } == 0 {
            return 0;
        }
        if let Some(member) = task_member(prev)
            && doomed(&member)
        {
            // Still in `prev`'s context (the switch has not happened): interrupts are off,
            // so the helper queues the signal on irq_work, delivered as they come back on.
            kill_current();
        }
        return 0;
    }
    let Some(member) = task_member(prev) else {
        return 0;
    };
    leave::<ATOMICS>(prev, &member);
    diag_flush();
    0
}

/// `task_struct.__state` (or `state`).
#[inline(always)]
fn task_state(task: u64) -> u64 {
    if offset!(task_state_size) == 8 {
        read::<u64>(task, offset!(task_state)).unwrap_or(0)
    } else {
        read::<u32>(task, offset!(task_state)).unwrap_or(0) as u64
    }
}

/// What a thread has used over its life so far: runtime, utime, stime and its I/O accounting
/// (read bytes, write bytes, cancelled write bytes, rchar, wchar; 0 where the kernel lacks it).
/// `None` if the runtime cannot be read.
#[inline(always)]
fn thread_usage(task: u64) -> Option<[u64; 8]> {
    let runtime = read::<u64>(task, offset!(task_sum_exec_runtime))?;
    let utime = read::<u64>(task, offset!(task_utime))?;
    let stime = read::<u64>(task, offset!(task_stime))?;
    Some([
        runtime,
        utime,
        stime,
        ioac(task, offset!(task_ioac_read_bytes)),
        ioac(task, offset!(task_ioac_write_bytes)),
        ioac(task, offset!(task_ioac_cancelled_write_bytes)),
        ioac(task, offset!(task_ioac_rchar)),
        ioac(task, offset!(task_ioac_wchar)),
    ])
}

/// [`thread_usage`] written into `u` (not returned on the stack); false if the runtime cannot
/// be read.
#[inline(always)]
fn thread_usage_into(task: u64, u: &mut [u64; 8]) -> bool {
    let cpu = [
        offset!(task_sum_exec_runtime),
        offset!(task_utime),
        offset!(task_stime),
    ];
    for (i, offset) in cpu.into_iter().enumerate() {
        match read::<u64>(task, offset) {
            Some(v) => u[i] = v,
            None => return false,
        }
    }
    u[3] = ioac(task, offset!(task_ioac_read_bytes));
    u[4] = ioac(task, offset!(task_ioac_write_bytes));
    u[5] = ioac(task, offset!(task_ioac_cancelled_write_bytes));
    u[6] = ioac(task, offset!(task_ioac_rchar));
    u[7] = ioac(task, offset!(task_ioac_wchar));
    true
}

/// What a process's `signal_struct` keeps of its past: its exited threads' runtime, user
/// and system time (as `thread_usage`), its reaped children's user and system time, then the
/// I/O accounting of both (as `thread_usage`, from index 5). A leader that has exited while
/// other threads run (a zombie until the group ends, so not in `signal_struct` yet, and never
/// adopted) is an exited thread too: `task` is the thread being adopted, `leader` its leader.
/// Fills `g`; false (and `g` not to be used) if the CPU figures cannot be read.
#[inline(always)]
fn group_usage(signal: u64, task: u64, leader: u64, g: &mut [u64; 10]) -> bool {
    let cpu = [
        offset!(signal_sum_sched_runtime),
        offset!(signal_utime),
        offset!(signal_stime),
        offset!(signal_cutime),
        offset!(signal_cstime),
    ];
    for (i, offset) in cpu.into_iter().enumerate() {
        match read::<u64>(signal, offset) {
            Some(v) => g[i] = v,
            None => return false,
        }
    }
    g[5] = ioac(signal, offset!(signal_ioac_read_bytes));
    g[6] = ioac(signal, offset!(signal_ioac_write_bytes));
    g[7] = ioac(signal, offset!(signal_ioac_cancelled_write_bytes));
    g[8] = ioac(signal, offset!(signal_ioac_rchar));
    g[9] = ioac(signal, offset!(signal_ioac_wchar));
    // SAFETY (TASKS.get): only checked for presence.
    if leader != task
        && task_state(leader) & offset!(task_dead) as u64 != 0
        && unsafe { TASKS.get(leader) }.is_none()
        && let Some(u) = thread_usage(leader)
    {
        g[0] = g[0].wrapping_add(u[0]);
        g[1] = g[1].wrapping_add(u[1]);
        g[2] = g[2].wrapping_add(u[2]);
        g[5] = g[5].wrapping_add(u[3]);
        g[6] = g[6].wrapping_add(u[4]);
        g[7] = g[7].wrapping_add(u[5]);
        g[8] = g[8].wrapping_add(u[6]);
        g[9] = g[9].wrapping_add(u[7]);
    }
    true
}

/// One `task_struct.ioac` (or `signal_struct.ioac`) counter, where the kernel has it.
#[inline(always)]
fn ioac(task: u64, offset: u32) -> u64 {
    if offset == ABSENT {
        return 0;
    }
    read::<u64>(task, offset).unwrap_or(0)
}

/// A `THREAD_END` or `THREAD_ADOPTED` record.
#[inline(always)]
fn record_thread(kind: u32, member: &TaskMember, u: &[u64; 8], counters: &mut RunCounters) {
    match reserve::<ThreadEnd>(counters) {
        Some(mut entry) => {
            let (net_sent, net_received) = if kind == record_kind::THREAD_END {
                (member.net_sent, member.net_received)
            } else {
                (0, 0)
            };
            entry.write(ThreadEnd {
                header: header(kind, member.run, member.signal),
                cpu_runtime_ns: u[0],
                cpu_utime_ns: u[1],
                cpu_stime_ns: u[2],
                disk_read_bytes: u[3],
                disk_write_bytes: u[4],
                disk_cancelled_write_bytes: u[5],
                io_rchar: u[6],
                io_wchar: u[7],
                net_sent,
                net_received,
            });
            entry.submit(record_wake_flags(counters));
        }
        None => {
            record_lost(member.run, member.tid, counters);
        }
    }
}

/// A tracked thread has switched out for the last time: its runtime is final.
#[inline(always)]
fn leave<const ATOMICS: bool>(task: u64, member: &TaskMember) {
    let Some(counters) = run_counters(member.run) else {
        return;
    };
    match thread_usage(task) {
        Some(u) => {
            add(&mut counters.cpu_runtime_ns, u[0]);
            add(&mut counters.cpu_utime_ns, u[1]);
            add(&mut counters.cpu_stime_ns, u[2]);
            add(&mut counters.disk_read_bytes, u[3]);
            add(&mut counters.disk_write_bytes, u[4]);
            add(&mut counters.disk_cancelled_write_bytes, u[5]);
            add(&mut counters.io_rchar, u[6]);
            add(&mut counters.io_wchar, u[7]);
            if wants_records(counters) {
                record_thread(record_kind::THREAD_END, member, &u, counters);
            }
        }
        None => lost(diag_kind::READ_CPU, member.run, member.tid, counters),
    }
    if forget_task(task) && doomed(member) {
        doomed_alive_add(u64::MAX);
    }
    // Last: the exit generation (userspace's consistency check for snapshots).
    add(&mut counters.threads_exited, 1);
    // The thread being the last is seen by at least the last of concurrent exits.
    let started = load(&counters.threads_started);
    let exited = load(&counters.threads_exited);
    if started == exited {
        // SAFETY: reads the monotonic clock.
        store(&mut counters.ended_ns, unsafe { bpf_ktime_get_ns() });
        notify(member.run, event_kind::RUN_EMPTY, counters);
    }
}

/// While a run is being attached to: the run `task` belongs to if it is a task of that tree
/// that is not followed yet (its process is, or, with `ANCESTORS`, one of its ancestors is),
/// after adopting it. Only the fork hook walks the ancestors: a new process must join with
/// its creator; at exec and exit the scan or the next fork adopts what this misses, and the
/// programs stay small.
#[inline(always)]
fn adopt_current<const ATOMICS: bool, const ANCESTORS: bool>(task: u64) -> Option<u32> {
    if *ADOPT_GATE.get(0)? == 0 {
        return None;
    }
    let me = tracker();
    let signal = read::<u64>(task, offset!(task_signal))?;
    if signal == me.signal {
        return None;
    }
    // SAFETY: the value is copied out at once.
    let mut run = (unsafe { PROCS.get(signal) }).map(|p| p.run);
    if ANCESTORS && run.is_none() {
        let mut t = task;
        for _ in 0..ADOPT_ANCESTORS {
            let parent = read::<u64>(t, offset!(task_real_parent))?;
            if parent == t || parent == 0 {
                return None;
            }
            let s = read::<u64>(parent, offset!(task_signal))?;
            if s == me.signal {
                return None;
            }
            // SAFETY: the value is copied out at once.
            if let Some(p) = unsafe { PROCS.get(s) } {
                run = Some(p.run);
                break;
            }
            t = parent;
        }
    }
    let run = run?;
    if RUN_CONTROL.get(run)?.attaching == 0 {
        return None;
    }
    match adopt::<ATOMICS>(task, run, false) {
        control::ADOPTED | control::ALREADY => Some(run),
        _ => None,
    }
}

/// `task`'s membership, or, while a run is being attached to, its membership once adopted
/// (its process is followed already).
#[inline(always)]
fn member_or_adopted<const ATOMICS: bool>(task: u64) -> Option<TaskMember> {
    if let Some(member) = task_member(task) {
        return Some(member);
    }
    adopt_current::<ATOMICS, false>(task)?;
    // SAFETY: the value is copied out at once.
    unsafe { TASKS.get(task) }.copied()
}

/// Adopts `task` into `run`: it was not created inside the run, so what it had used so far
/// is recorded as used before the attach. Its process joins too if it is not followed yet.
///
/// A function of its own (a BPF-to-BPF call), not inlined: its many paths end at its return,
/// so the verifier does not carry them on through the rest of each hook that adopts
/// (inlined into the fork, exec and exit hooks, it took a 6.1 verifier past a million
/// instructions).
#[inline(never)]
fn adopt<const ATOMICS: bool>(task: u64, run: u32, root: bool) -> i32 {
    // SAFETY: the value is copied out at once.
    if let Some(m) = unsafe { TASKS.get(task) } {
        return if m.run == run {
            control::ALREADY
        } else {
            control::E_OTHER_RUN
        };
    }
    let Some(counters) = run_counters(run) else {
        return control::E_INVAL;
    };
    let me = tracker();
    if task_state(task) & offset!(task_dead) as u64 != 0 {
        // A zombie (its last switch is behind it, or just ahead): nothing left to follow.
        return control::E_GONE;
    }
    let (Some(signal), Some(start), Some(leader)) = (
        read::<u64>(task, offset!(task_signal)),
        read::<u64>(task, offset!(task_start_boottime)),
        read::<u64>(task, offset!(task_group_leader)),
    ) else {
        return control::E_READ;
    };
    if signal == me.signal {
        return control::E_SELF;
    }
    // A run's share of the membership maps holds for what it adopts too: a tree larger than
    // the share is refused, not followed in part (the attach fails and says so).
    if RUN_CONTROL.get(run).is_some_and(|control| {
        control.max_tasks != 0
            && load(&counters.threads_started).wrapping_sub(load(&counters.threads_exited))
                >= control.max_tasks as u64
    }) {
        return control::E_SHARE;
    }
    // Large figures go through a per-CPU scratch value, not the stack: this function's frame
    // and its caller's must stay within the verifier's 512 bytes together.
    let Some(scratch) = ADOPT_SCRATCH.get_ptr_mut(0) else {
        return control::E_READ;
    };
    // SAFETY: per-CPU map value pointer; this CPU's alone while the program runs (raw
    // tracepoint programs and test runs do not migrate, and nothing that adopts nests here).
    let scratch = unsafe { &mut *scratch };
    let (tid, own_pid) = pids(task, me.pid_level);
    let tgid = pids(leader, me.pid_level).0;
    let process_start = read::<u64>(leader, offset!(task_start_boottime)).unwrap_or(start);
    let member = TaskMember {
        run,
        tid,
        tgid,
        flags: 0,
        signal,
        start_boottime_ns: start,
        process_start_boottime_ns: process_start,
        net_sent: 0,
        net_received: 0,
    };
    if insert_task(task, member).is_err() {
        // SAFETY: the value is copied out at once.
        return match unsafe { TASKS.get(task) } {
            Some(m) if m.run == run => control::ALREADY,
            Some(_) => control::E_OTHER_RUN,
            None => {
                lost(diag_kind::TASKS_FULL, run, tid, counters);
                control::E_FULL
            }
        };
    }
    add(&mut counters.threads_started, 1);
    add(&mut counters.threads_adopted, 1);
    if root {
        store(&mut counters.root_signal, signal);
    }
    let mm = if ATOMICS {
        read::<u64>(task, offset!(task_mm)).unwrap_or(0)
    } else {
        0
    };
    let proc = ProcMember {
        run,
        _pad0: 0,
        mm,
        threads: 1,
    };
    // What the process did before beyond its live threads, read before its entry is made:
    // a thread adopted after the entry exists (by the scan or a hook) can only add to the
    // group figures after this read, so it is never counted twice. A process past its
    // last do_exit() (`live` 0) may have had its entry removed already: its group figures
    // are left out rather than read a second time.
    // (Through the scratch, not the stack.)
    let have_group = read::<u32>(signal, offset!(signal_live)).unwrap_or(0) != 0
        && group_usage(signal, task, leader, &mut scratch.group);
    if PROCS.insert(signal, proc, BPF_NOEXIST as u64).is_ok() {
        add(&mut counters.processes_started, 1);
        add(&mut counters.processes_adopted, 1);
        if have_group {
            let g = &scratch.group;
            add(&mut counters.before_exited_runtime_ns, g[0]);
            add(&mut counters.before_exited_utime_ns, g[1]);
            add(&mut counters.before_exited_stime_ns, g[2]);
            add(&mut counters.before_reaped_user_ns, g[3]);
            add(&mut counters.before_reaped_system_ns, g[4]);
            add(&mut counters.before_group_disk_read_bytes, g[5]);
            add(&mut counters.before_group_disk_write_bytes, g[6]);
            add(&mut counters.before_group_disk_cancelled_write_bytes, g[7]);
            add(&mut counters.before_group_io_rchar, g[8]);
            add(&mut counters.before_group_io_wchar, g[9]);
        }
        if ATOMICS {
            let alive = add_fetch(&mut counters.processes_alive, 1);
            raise_to(&mut counters.processes_peak, alive);
            mm_use(run, mm, counters);
        } else {
            add(&mut counters.processes_alive, 1);
        }
        if wants_records(counters) {
            let flags = proc_flags::ADOPTED | if root { proc_flags::ROOT } else { 0 };
            record_start(
                run,
                leader,
                signal,
                process_start,
                tgid,
                own_pid,
                flags,
                counters,
            );
        }
    } else if let Some(p) = PROCS.get_ptr_mut(signal) {
        // SAFETY: map value pointer; updated atomically.
        let p = unsafe { &mut *p };
        add(&mut p.threads, 1);
        // Its process was adopted through a thread without an address space (an exited
        // leader): this one has it.
        if ATOMICS && mm != 0 && p.mm == 0 {
            p.mm = mm;
            mm_use(run, mm, counters);
        }
    }
    // After its process's record, so the breakdown knows whose it is.
    if thread_usage_into(task, &mut scratch.thread) {
        let u = &scratch.thread;
        add(&mut counters.before_cpu_runtime_ns, u[0]);
        add(&mut counters.before_cpu_utime_ns, u[1]);
        add(&mut counters.before_cpu_stime_ns, u[2]);
        add(&mut counters.before_disk_read_bytes, u[3]);
        add(&mut counters.before_disk_write_bytes, u[4]);
        add(&mut counters.before_disk_cancelled_write_bytes, u[5]);
        add(&mut counters.before_io_rchar, u[6]);
        add(&mut counters.before_io_wchar, u[7]);
        if wants_records(counters) {
            record_thread(record_kind::THREAD_ADOPTED, &member, u, counters);
        }
    }
    if task_state(task) & offset!(task_dead) as u64 != 0 {
        // It died while being adopted: its last switch may have passed before the entry was
        // there. Whoever removes the entry (the switch hook or this) accounts for it, once.
        if forget_task(task) {
            leave::<ATOMICS>(task, &member);
        }
    }
    control::ADOPTED
}

// The two `control` programs are written out rather than with `#[raw_tracepoint]`: its
// expansion returns 0 whatever the handler returns, and userspace needs the result (the
// `retval` of `BPF_PROG_TEST_RUN`).

/// Never attached: userspace runs it in its own context with `BPF_PROG_TEST_RUN`, with the
/// arguments `(op, a, b, c)`, for the small operations (`HELLO`, `SPAWNER`, `UNSPAWN`); see
/// `cylo_usage_abi::control`. Small, so every start-up verifies it quickly.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/control")]
pub fn control(ctx: *mut core::ffi::c_void) -> u32 {
    on_control(RawTracePointContext::new(ctx)) as u32
}

/// `ADOPT`, run like `control`; loaded only when a tracker first attaches (it carries the
/// whole adoption path, which takes the verifier a while).
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/control")]
pub fn control_adopt(ctx: *mut core::ffi::c_void) -> u32 {
    let r = on_adopt::<true>(RawTracePointContext::new(ctx));
    diag_flush();
    r as u32
}

/// `control_adopt` for kernels without BPF atomic fetch, exchange and cmpxchg.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/control")]
pub fn control_adopt_no_atomics(ctx: *mut core::ffi::c_void) -> u32 {
    let r = on_adopt::<false>(RawTracePointContext::new(ctx));
    diag_flush();
    r as u32
}

#[inline(always)]
fn on_control(ctx: RawTracePointContext) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    let op: u64 = ctx.arg(0);
    let a: u64 = ctx.arg(1);
    match op {
        control::HELLO => {
            let Some(signal) = read::<u64>(current, offset!(task_signal)) else {
                return control::E_READ;
            };
            // Without the pid-namespace layout, pids are global (level 0).
            let level = if offset!(task_thread_pid) == ABSENT {
                0
            } else {
                let Some(pid) = read::<u64>(current, offset!(task_thread_pid)) else {
                    return control::E_READ;
                };
                let Some(level) = read::<u32>(pid, offset!(pid_level)) else {
                    return control::E_READ;
                };
                level
            };
            let Some(info) = TRACKER.get_ptr_mut(0) else {
                return control::E_INVAL;
            };
            // SAFETY: map value pointer; only this operation writes it.
            unsafe {
                *info = TrackerInfo {
                    signal,
                    pid_level: level,
                    known: 1,
                };
            }
            0
        }
        control::SPAWNER => {
            if a >= MAX_RUNS as u64 {
                return control::E_INVAL;
            }
            register_spawner(current, a as u32)
        }
        control::UNSPAWN => {
            let _ = SPAWNERS.remove(current);
            0
        }
        control::SPAWNER_FD => {
            let (run, tgid): (u64, u64) = (ctx.arg(2), ctx.arg(3));
            if run >= MAX_RUNS as u64 || tgid == 0 {
                return control::E_INVAL;
            }
            let task = match task_of_fd(current, a) {
                Ok(task) => task,
                Err(e) => return e,
            };
            let info = tracker();
            if process_pid(task, info.pid_level) as u64 != tgid {
                return control::E_NOT_PEER;
            }
            if read::<u64>(task, offset!(task_signal)) == Some(info.signal) {
                return control::E_SELF;
            }
            register_spawner(task, run as u32)
        }
        control::FORGET_MM => {
            forget_mm(a);
            0
        }
        control::FORGET_TASK => {
            // SAFETY: the value is copied out at once.
            let member = unsafe { TASKS.get(a) }.copied();
            if forget_task(a) && member.is_some_and(|m| doomed(&m)) {
                doomed_alive_add(u64::MAX);
            }
            0
        }
        _ => control::E_INVAL,
    }
}

#[inline(always)]
fn on_adopt<const ATOMICS: bool>(ctx: RawTracePointContext) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    let (op, fd, run, flags): (u64, u64, u64, u64) =
        (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3));
    if op != control::ADOPT || run >= MAX_RUNS as u64 {
        return control::E_INVAL;
    }
    match task_of_fd(current, fd) {
        Ok(task) => adopt::<ATOMICS>(task, run as u32, flags & control::ADOPT_ROOT != 0),
        Err(e) => e,
    }
}

/// The task behind `fd`, a `/proc/PID/task/TID` directory the current task holds open:
/// `current->files->fdt->fd[fd]->f_inode`, its `proc_inode`, its `struct pid`, and that pid's
/// task (none once the thread has been released).
#[inline(always)]
fn task_of_fd(current: u64, fd: u64) -> Result<u64, i32> {
    let files = read::<u64>(current, offset!(task_files)).ok_or(control::E_READ)?;
    let fdt = read::<u64>(files, offset!(files_fdt)).ok_or(control::E_READ)?;
    let max = read::<u32>(fdt, offset!(fdt_max_fds)).ok_or(control::E_READ)?;
    if fd >= max as u64 {
        return Err(control::E_INVAL);
    }
    let array = read::<u64>(fdt, offset!(fdt_fd)).ok_or(control::E_READ)?;
    let file = read::<u64>(array + fd * 8, 0).ok_or(control::E_READ)?;
    if file == 0 {
        return Err(control::E_INVAL);
    }
    let inode = read::<u64>(file, offset!(file_inode)).ok_or(control::E_READ)?;
    let proc_inode = inode.wrapping_sub(offset!(proc_inode_vfs_inode) as u64);
    let pid = read::<u64>(proc_inode, offset!(proc_inode_pid)).ok_or(control::E_READ)?;
    let first = read::<u64>(pid, offset!(pid_tasks)).ok_or(control::E_READ)?;
    if first == 0 {
        return Err(control::E_GONE);
    }
    Ok(first.wrapping_sub(offset!(task_pid_links) as u64))
}

// After the macros above, which it uses.
mod net;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
