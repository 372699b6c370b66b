//! `task_newtask`: a task of a run creates a task, which joins the run before it can run;
//! a spawning thread's first task is a new run's root.
use crate::adopt::adopt_current;
use crate::budget::refuse;
use crate::mem::mm_use;
use crate::records::record_start;
use crate::*;

/// `task_newtask(struct task_struct *task, unsigned long clone_flags)`, in the creator's context.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask(ctx: RawTracePointContext) -> i32 {
    let r = on_newtask::<true, true>(ctx);
    diag_flush();
    r
}

/// `task_newtask` for kernels without BPF atomic fetch, exchange and compare-and-exchange.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask_no_atomics(ctx: RawTracePointContext) -> i32 {
    let r = on_newtask::<false, true>(ctx);
    diag_flush();
    r
}

/// `task_newtask` of the lean set (a tracker whose runs neither attach nor want a
/// breakdown): no adoption, and start records without what only a breakdown shows.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask_lean(ctx: RawTracePointContext) -> i32 {
    let r = on_newtask::<true, false>(ctx);
    diag_flush();
    r
}

#[inline(always)]
pub(crate) fn on_newtask<const ATOMICS: bool, const FULL: bool>(ctx: RawTracePointContext) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    // SAFETY: the value is copied out at once.
    let (run, creator) = match task_member(current) {
        Some(member) => (member.run, Some(member)),
        None => match spawner_run(current) {
            Some(run) => (run, None),
            None if !FULL => return 0,
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
    let mut next = core::mem::MaybeUninit::<JoinProcess>::uninit();
    // SAFETY: `next` is this frame's, of the right size.
    if unsafe { join::<ATOMICS, FULL>(run, child, flags, creator.as_ref(), next.as_mut_ptr()) } {
        // SAFETY: `join` has written `next` when it returns true.
        unsafe { next.assume_init_ref() }.call::<ATOMICS, FULL>(child);
    }
    0
}

/// The run whose root the current (untracked) thread is about to create, if any.
#[inline(always)]
pub(crate) fn spawner_run(current: u64) -> Option<u32> {
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
pub(crate) fn register_spawner(task: u64, run: u32) -> i32 {
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

/// `child` joins `run`, created by `creator` (a member), or as the root (`creator` is `None`),
/// with `clone_flags`. A new thread is done with here; for a new process, returns true and
/// has written the arguments of [`join_process`] to `next`, and the caller calls it.
///
/// A function of its own (a BPF-to-BPF call): the fork hook's frame and [`adopt`]'s, which
/// it may call first, must fit the verifier's 512 bytes of stack together. It does not call
/// [`join_process`] itself, so that the chains of frames under the hook (which 5.10 and 6.1
/// count in 32-byte steps against those 512 bytes) stay short.
///
/// # Safety
/// `next` must be valid for writes of a `JoinProcess`.
#[inline(never)]
pub(crate) unsafe fn join<const ATOMICS: bool, const FULL: bool>(
    run: u32,
    child: u64,
    clone_flags: u64,
    creator: Option<&TaskMember>,
    next: *mut JoinProcess,
) -> bool {
    let is_thread = clone_flags & CLONE_THREAD != 0;
    let Some(counters) = run_counters(run) else {
        return false;
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
        return false;
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
    let flags = if past_share { member_flags::DOOMED } else { 0 };
    if insert_new_task(child, run, tid, tgid, flags, signal, start, process_start).is_err() {
        unfollowed(
            diag_kind::TASKS_FULL,
            run,
            tid,
            is_thread,
            creator,
            counters,
        );
        return false;
    }
    if past_share {
        doom(run, tid, counters);
        // Past the share (not a doomed creator's child): a budget of threads alive at once,
        // crossed. The run stops.
        if !creator.is_some_and(doomed) {
            let alive = load(&counters.threads_started)
                .wrapping_sub(load(&counters.threads_exited))
                .wrapping_add(1);
            crate::budget::cross(run, cylo_usage_abi::budget::TASKS_ALIVE, alive);
        }
    }
    add(&mut counters.threads_started, 1);
    let root = creator.is_none();
    // Past the run's threads budget: refused (the root never is).
    let refused_thread = !root && refuse(run, child, true);
    if is_thread {
        if let Some(p) = PROCS.get_ptr_mut(signal) {
            // SAFETY: map value pointer; updated atomically.
            add(unsafe { &mut (*p).threads }, 1);
        }
        return false;
    }
    let bits = ProcessBits {
        root,
        refused_thread,
        past_share,
        shares_mm: clone_flags & CLONE_VM != 0,
    };
    // SAFETY: the caller's promise.
    unsafe {
        next.write(JoinProcess {
            run_bits: run as u64 | bits.pack(),
            signal,
            start,
            pids: tid as u64 | (own_pid as u64) << 32,
        })
    };
    true
}

/// The arguments of [`join_process`] besides the new task, from [`join`].
pub(crate) struct JoinProcess {
    run_bits: u64,
    signal: u64,
    start: u64,
    pids: u64,
}

impl JoinProcess {
    /// Calls the variant of [`join_process`] for `child` (a global function).
    #[inline(always)]
    fn call<const ATOMICS: bool, const FULL: bool>(&self, child: u64) {
        let (run_bits, signal, start, pids) = (self.run_bits, self.signal, self.start, self.pids);
        let _ = match (ATOMICS, FULL) {
            (true, true) => cylo_usage_join_process(run_bits, child, signal, start, pids),
            (true, false) => cylo_usage_join_process_lean(run_bits, child, signal, pids),
            (false, _) => cylo_usage_join_process_no_atomics(run_bits, child, signal, start, pids),
        };
    }
}

/// What [`join`] hands [`join_process`] about a new process besides its identity, in the
/// high half of the run's argument.
struct ProcessBits {
    /// The run's root (created by the tracker).
    root: bool,
    /// Refused already, past the run's threads budget.
    refused_thread: bool,
    /// Joined past the run's share of the maps (or created by a doomed task): doomed.
    past_share: bool,
    /// Created with `CLONE_VM` (vfork): its creator's address space.
    shares_mm: bool,
}

impl ProcessBits {
    const ROOT: u64 = 1 << 32;
    const REFUSED_THREAD: u64 = 1 << 33;
    const PAST_SHARE: u64 = 1 << 34;
    const SHARES_MM: u64 = 1 << 35;

    #[inline(always)]
    fn pack(&self) -> u64 {
        (if self.root { Self::ROOT } else { 0 })
            | (if self.refused_thread {
                Self::REFUSED_THREAD
            } else {
                0
            })
            | (if self.past_share { Self::PAST_SHARE } else { 0 })
            | (if self.shares_mm { Self::SHARES_MM } else { 0 })
    }

    #[inline(always)]
    fn unpack(v: u64) -> ProcessBits {
        ProcessBits {
            root: v & Self::ROOT != 0,
            refused_thread: v & Self::REFUSED_THREAD != 0,
            past_share: v & Self::PAST_SHARE != 0,
            shares_mm: v & Self::SHARES_MM != 0,
        }
    }
}

global_fn!(
    /// [`join_process`] of `task_newtask`, global ([`global_fn`]): checked once rather than
    /// once for each path of [`join`] (each differs in what the budget and share checks
    /// before it decided).
    cylo_usage_join_process(run_bits: u64, child: u64, signal: u64, start: u64, pids: u64) {
        join_process::<true, true>(run_bits, child, signal, start, pids);
        0
    }
);

global_fn!(
    /// [`join_process`] of `task_newtask_lean`, without the start time only a start record
    /// uses (an argument the callee never reads, LLVM leaves unset in its register, and the
    /// verifier refuses a global function's argument that is not a scalar).
    cylo_usage_join_process_lean(run_bits: u64, child: u64, signal: u64, pids: u64) {
        join_process::<true, false>(run_bits, child, signal, 0, pids);
        0
    }
);

global_fn!(
    /// [`join_process`] of `task_newtask_no_atomics`.
    cylo_usage_join_process_no_atomics(run_bits: u64, child: u64, signal: u64, start: u64, pids: u64) {
        join_process::<false, true>(run_bits, child, signal, start, pids);
        0
    }
);

/// The rest of [`join`] for a new process (not a thread) of the run in the low half of
/// `run_bits` ([`ProcessBits`] in the high half), which has joined `TASKS`: its `PROCS` entry,
/// counts, address space and start record. `pids`: its pid as the tracker sees it (low half)
/// and in its own namespace (high half).
#[inline(always)]
fn join_process<const ATOMICS: bool, const FULL: bool>(
    run_bits: u64,
    child: u64,
    signal: u64,
    start: u64,
    pids: u64,
) {
    let run = run_bits as u32;
    let ProcessBits {
        root,
        refused_thread,
        past_share,
        shares_mm,
    } = ProcessBits::unpack(run_bits);
    let (tid, own_pid) = (pids as u32, (pids >> 32) as u32);
    let Some(counters) = run_counters(run) else {
        return;
    };
    // Its own address space after fork; its creator's after vfork / CLONE_VM. The root's,
    // until it execs, is a copy of the tracker's (or the tracker's own): not the command's.
    let mm = if ATOMICS && !root {
        read::<u64>(child, offset!(task_mm)).unwrap_or(0)
    } else {
        0
    };
    let inserted = match new_proc(run, mm) {
        Some(proc) => PROCS.insert(signal, proc, BPF_NOEXIST as u64).is_ok(),
        None => false,
    };
    if !inserted {
        lost(diag_kind::PROCS_FULL, run, tid, counters);
        // Followed as a thread only: doomed (if it is not already), so it cannot outlive the
        // run's kill uncounted in `processes_alive`.
        if !root
            && !past_share
            && let Some(member) = TASKS.get_ptr_mut(child)
        {
            // SAFETY: map value pointer; the new task cannot run before this hook returns,
            // and its flags are written nowhere else now.
            unsafe { (*member).flags |= member_flags::DOOMED };
            doom(run, tid, counters);
        }
        return;
    }
    if root {
        store(&mut counters.root_process, signal);
    }
    add(&mut counters.processes_started, 1);
    // A refused thread that is a new process is a refused process too; else the processes
    // budget decides.
    let refused = if refused_thread {
        add(&mut counters.processes_refused, 1);
        true
    } else {
        !root && refuse(run, child, false)
    };
    if ATOMICS {
        let alive = add_fetch(&mut counters.processes_alive, 1);
        raise_to(&mut counters.processes_peak, alive);
        // A fork's address space is a new one (unknown yet); a vfork's or a CLONE_VM
        // process's is its creator's, followed already.
        mm_use(run, mm, !shares_mm);
    } else {
        add(&mut counters.processes_alive, 1);
    }
    // (The lean set's runs want no record: see `names::PROG_TASK_NEWTASK_LEAN`.)
    if FULL && wants_records(counters) {
        let flags =
            if root { proc_flags::ROOT } else { 0 } | if refused { proc_flags::REFUSED } else { 0 };
        record_start(run, child, signal, start, tid, own_pid, flags, counters);
    }
}

/// A new task joined `run` marked `DOOMED`: its creator (the current task) dies now, and it
/// at its first switch, fork or exec.
#[inline(always)]
pub(crate) fn doom(run: u32, tid: u32, counters: &mut RunCounters) {
    doomed_alive_add(1);
    add(&mut counters.tasks_killed_at_birth, 1);
    kill_current();
    note(diag_kind::KILLED_AT_BIRTH, run, tid);
}

/// A new task of `run` cannot be followed at all (`kind`: a full map, a failed read): lost.
/// Fail closed: its creator is killed; a new thread dies with it, a new process may escape.
/// The root is the tracker's own child (it knows it): only lost. (The log says `kind`.)
#[inline(always)]
pub(crate) fn unfollowed(
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
