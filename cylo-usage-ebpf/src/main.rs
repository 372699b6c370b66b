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
//!
//! One file per hook: [`fork`], [`exec`], [`exit`], [`sched`] (with what a thread has used),
//! [`mem`] (address spaces and `rss_stat`), [`disk`], [`net`]; [`adopt`] (attach) and
//! [`commands`] (the control programs); [`records`], the start record both fork and adoption
//! make. This file holds the maps, the kernel layout, and the helpers every hook uses.
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
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
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
    ABSENT, ADOPT_ANCESTORS, ARGV_BYTES, CLONE_THREAD, CLONE_VM, Creds, DEFAULT_MAX_MMS,
    DEFAULT_MAX_PROCS, DEFAULT_MAX_TASKS, DevCounters, DevKey, EVENTS_BYTES, Event, FILTER_SLOTS,
    MAX_DEVS, MAX_RUNS, MAX_SPAWNERS, MmMember, Offsets, ProcExec, ProcExit, ProcMember, ProcStart,
    RECORDS_BYTES, ROOT_ENDED, RSS_MEMBERS, RecordHeader, RunControl, RunCounters,
    SPLIT_RECORDS_BYTES, Spawner, TaskMember, ThreadEnd, ThreadUsage, TrackerInfo, control,
    creds_known, event_kind, filter_slot, member_flags, proc_flags, record_kind, run_flags,
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

/// Defines `$name`, a global function of scalar arguments whose `$body` returns a `u32`:
/// `#[no_mangle]`, so that bpf-linker keeps it global and the BTF says so. The verifier
/// checks a global function once, on its own, where it checks a static one (a plain
/// BPF-to-BPF call) again for each path of its caller that reaches the call; in return, a
/// global function takes scalars alone (5.10 allows nothing else, at most five) and returns
/// a scalar.
macro_rules! global_fn {
    ($(#[$attr:meta])* $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $name($($arg: $ty),*) -> u32 $body
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
/// Adds what a thread used to a run's sums, field by field (atomic adds).
#[inline(always)]
fn add_usage(sums: &mut ThreadUsage, u: &ThreadUsage) {
    add(&mut sums.cpu_runtime_ns, u.cpu_runtime_ns);
    add(&mut sums.cpu_utime_ns, u.cpu_utime_ns);
    add(&mut sums.cpu_stime_ns, u.cpu_stime_ns);
    add(&mut sums.disk_read_bytes, u.disk_read_bytes);
    add(&mut sums.disk_write_bytes, u.disk_write_bytes);
    add(
        &mut sums.disk_cancelled_write_bytes,
        u.disk_cancelled_write_bytes,
    );
    add(&mut sums.io_rchar, u.io_rchar);
    add(&mut sums.io_wchar, u.io_wchar);
}

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
fn insert_task(task: u64, member: &TaskMember) -> Result<(), i32> {
    filter_add(&TASK_FILTER, task, 1);
    let r = TASKS.insert(task, member, BPF_NOEXIST as u64);
    if r.is_err() {
        filter_add(&TASK_FILTER, task, u32::MAX);
    }
    r
}

/// [`insert_task`] for a new task: `run`, its pids and process, `flags`, and nothing used or
/// charged yet (see [`write_member`]). The entry is written into this CPU's scratch, not the
/// stack: the fork hook's frame stays small, and the verifier has fewer stack slots to
/// compare on each of its paths.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn insert_new_task(
    task: u64,
    run: u32,
    tid: u32,
    tgid: u32,
    flags: u32,
    process: u64,
    start_boottime_ns: u64,
    process_start_boottime_ns: u64,
) -> Result<(), i32> {
    let Some(scratch) = ADOPT_SCRATCH.get_ptr_mut(0) else {
        return Err(0);
    };
    let ids = [run, tid, tgid, flags];
    let times = [start_boottime_ns, process_start_boottime_ns];
    // SAFETY: per-CPU map value pointer, this CPU's alone while the program runs (adoption,
    // which uses the same field, has returned before a new task joins); the whole
    // `TaskMember` is written before it is read.
    unsafe {
        let member = core::ptr::addr_of_mut!((*scratch).member);
        write_member(member, ids, process, times, [0; 3]);
        insert_task(task, &*member)
    }
}

/// Writes a membership into `m`: `[run, tid, tgid, flags]`, its process, `[start_boottime_ns,
/// process_start_boottime_ns]`, no socket bytes, and what is `charged` already (`[cpu,
/// disk read, disk write]`). Field by field and volatile, where the helper then reads it: a
/// struct literal's run of zeroes becomes a call of `memset` (a byte loop of 40 iterations
/// on the fork path, and a frame more in adoption's call chain, which 5.10's and 6.1's
/// verifiers count against its 512 bytes of stack in 32-byte steps).
///
/// # Safety
/// `m` must be valid for writes of a `TaskMember`.
#[inline(always)]
unsafe fn write_member(
    m: *mut TaskMember,
    ids: [u32; 4],
    process: u64,
    times: [u64; 2],
    charged: [u64; 3],
) {
    // SAFETY: the caller's promise; every field of the `#[repr(C)]` struct (which has no
    // padding) is written.
    unsafe {
        core::ptr::addr_of_mut!((*m).run).write_volatile(ids[0]);
        core::ptr::addr_of_mut!((*m).tid).write_volatile(ids[1]);
        core::ptr::addr_of_mut!((*m).tgid).write_volatile(ids[2]);
        core::ptr::addr_of_mut!((*m).flags).write_volatile(ids[3]);
        core::ptr::addr_of_mut!((*m).process).write_volatile(process);
        core::ptr::addr_of_mut!((*m).start_boottime_ns).write_volatile(times[0]);
        core::ptr::addr_of_mut!((*m).process_start_boottime_ns).write_volatile(times[1]);
        core::ptr::addr_of_mut!((*m).net_sent).write_volatile(0);
        core::ptr::addr_of_mut!((*m).net_received).write_volatile(0);
        core::ptr::addr_of_mut!((*m).charged_cpu_ns).write_volatile(charged[0]);
        core::ptr::addr_of_mut!((*m).charged_disk_read_bytes).write_volatile(charged[1]);
        core::ptr::addr_of_mut!((*m).charged_disk_write_bytes).write_volatile(charged[2]);
    }
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

/// Whether the kernel splits the run's CPU time into user and system itself, per process
/// ([`run_flags::KERNEL_SPLIT`]; only handlers with atomics honour it).
#[inline(always)]
fn kernel_split(counters: &RunCounters) -> bool {
    load(&counters.flags) & run_flags::KERNEL_SPLIT != 0
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
/// adding it, and what the adopted thread used so far ([`thread_usage`]; before that, an
/// exited leader's figures, which [`group_usage`] adds to the group's). Also a new
/// process's entry before it is inserted ([`new_proc`]), for adoption and the fork hook's
/// `join` alike (one after the other, never nested), a new address space's
/// (`mem::insert_new_mm`, for adoption, the fork hook and exec), and an adopted thread's
/// membership. What is here is not on adoption's stack: on 5.10 and 6.1, which count each
/// frame of a chain of calls in 32-byte steps against 512 bytes, the frames of a hook, of
/// [`adopt`] and of what it calls must fit together.
#[repr(C)]
struct AdoptScratch {
    group: [u64; 10],
    thread: ThreadUsage,
    proc: ProcMember,
    mm: MmMember,
    member: TaskMember,
}

/// A new `PROCS` entry: a process of `run` using address space `mm`, with one thread, written
/// into this CPU's scratch rather than the stack. The fork and adoption paths sit under
/// frames that leave no room for its 64 bytes within the verifier's 512 (6.1 counted 544 with
/// it on `join`'s stack). Field by field and volatile, so that the zeroes are not merged
/// into a call of `memset`.
#[inline(always)]
fn new_proc(run: u32, mm: u64) -> Option<&'static ProcMember> {
    let scratch = ADOPT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU map value pointer; this CPU's alone while the program runs.
    Some(fill_proc(unsafe { &mut (*scratch).proc }, run, mm))
}

/// [`new_proc`] into `proc` (adoption holds the scratch already).
#[inline(always)]
fn fill_proc(proc: &mut ProcMember, run: u32, mm: u64) -> &ProcMember {
    // SAFETY: plain stores into the scratch value.
    unsafe {
        core::ptr::write_volatile(&mut proc.run, run);
        core::ptr::write_volatile(&mut proc._pad0, 0);
    }
    for (field, v) in [
        (&mut proc.mm, mm),
        (&mut proc.threads, 1),
        (&mut proc.ended, 0),
        (&mut proc.left, 0),
        (&mut proc.runtime_ns, 0),
        (&mut proc.utime_ns, 0),
        (&mut proc.stime_ns, 0),
    ] {
        store(field, v);
    }
    proc
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

/// One `task_struct.ioac` (or `signal_struct.ioac`) counter, where the kernel has it.
#[inline(always)]
pub(crate) fn ioac(task: u64, offset: u32) -> u64 {
    if offset == ABSENT {
        return 0;
    }
    read::<u64>(task, offset).unwrap_or(0)
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
    // Nearly always the same namespace as the tracker's: the same number.
    let seen = if level == tracker_level {
        own
    } else if level > tracker_level {
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

// The two `control` programs are written out rather than with `#[raw_tracepoint]`: its
// expansion returns 0 whatever the handler returns, and userspace needs the result (the
// `retval` of `BPF_PROG_TEST_RUN`).

// After the macros above, which they use.
mod adopt;
mod budget;
mod commands;
mod disk;
mod exec;
mod exit;
mod fork;
mod mem;
mod net;
mod records;
mod sched;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
