//! Adoption: while a run is being attached to, a task of its tree that is not followed
//! yet joins it with what it had used so far (its live threads, and from its
//! `signal_struct` its exited threads and reaped children).
use crate::mem::mm_use;
use crate::records::record_start;
use crate::sched::group_usage;
use crate::sched::leave;
use crate::sched::record_thread;
use crate::sched::task_state;
use crate::sched::thread_usage_into;
use crate::*;

/// While a run is being attached to: the run `task` belongs to if it is a task of that tree
/// that is not followed yet (its process is, or, with `ANCESTORS`, one of its ancestors is),
/// after adopting it. Only the fork hook walks the ancestors: a new process must join with
/// its creator; at exec and exit the scan or the next fork adopts what this misses, and the
/// programs stay small.
#[inline(always)]
pub(crate) fn adopt_current<const ATOMICS: bool, const ANCESTORS: bool>(task: u64) -> Option<u32> {
    if *ADOPT_GATE.get(0)? == 0 {
        return None;
    }
    let me = tracker();
    let signal = read::<u64>(task, offset!(task_signal))?;
    if signal == me.process {
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
            if s == me.process {
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
pub(crate) fn member_or_adopted<const ATOMICS: bool, const ADOPT: bool>(
    task: u64,
) -> Option<TaskMember> {
    member_ptr_or_adopted::<ATOMICS, ADOPT>(task).map(|m| *m)
}

/// [`member_or_adopted`] in place: the map value itself, not a copy on the stack (which,
/// beside [`adopt`]'s frame, would not fit the verifier's 512 bytes).
#[inline(always)]
pub(crate) fn member_ptr_or_adopted<const ATOMICS: bool, const ADOPT: bool>(
    task: u64,
) -> Option<&'static mut TaskMember> {
    if maybe_in(&TASK_FILTER, task)
        && let Some(m) = TASKS.get_ptr_mut(task)
    {
        // SAFETY: a map value, live while the task is (only its own exit removes it).
        return Some(unsafe { &mut *m });
    }
    // The lean programs (a tracker that never attaches) have no adoption path at all.
    if !ADOPT {
        return None;
    }
    adopt_current::<ATOMICS, false>(task)?;
    // SAFETY: as above.
    TASKS.get_ptr_mut(task).map(|m| unsafe { &mut *m })
}

#[allow(dead_code)]
fn member_or_adopted_copy<const ATOMICS: bool>(task: u64) -> Option<TaskMember> {
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
pub(crate) fn adopt<const ATOMICS: bool>(task: u64, run: u32, root: bool) -> i32 {
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
    if signal == me.process {
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
    // Budgets count from the attach: what the thread had used is charged already.
    let charged = [
        read::<u64>(task, offset!(task_sum_exec_runtime)).unwrap_or(0),
        ioac(task, offset!(task_ioac_read_bytes)),
        ioac(task, offset!(task_ioac_write_bytes)),
    ];
    // In the scratch, not this frame (see `AdoptScratch`).
    let slot = core::ptr::addr_of_mut!(scratch.member);
    // SAFETY: `slot` is the scratch's whole `TaskMember`, written before it is read.
    let member = unsafe {
        write_member(
            slot,
            [run, tid, tgid, 0],
            signal,
            [start, process_start],
            charged,
        );
        &*slot
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
        store(&mut counters.root_process, signal);
    }
    let mm = if ATOMICS {
        read::<u64>(task, offset!(task_mm)).unwrap_or(0)
    } else {
        0
    };
    // What the process did before beyond its live threads, read before its entry is made:
    // a thread adopted after the entry exists (by the scan or a hook) can only add to the
    // group figures after this read, so it is never counted twice. A process past its
    // last do_exit() (`live` 0) may have had its entry removed already: its group figures
    // are left out rather than read a second time.
    // (Through the scratch, not the stack.)
    let have_group = read::<u32>(signal, offset!(signal_live)).unwrap_or(0) != 0
        && group_usage(
            signal,
            task,
            leader,
            &mut scratch.group,
            &mut scratch.thread,
        );
    if PROCS
        .insert(
            signal,
            fill_proc(&mut scratch.proc, run, mm),
            BPF_NOEXIST as u64,
        )
        .is_ok()
    {
        let run_bits = run as u64
            | if root { AdoptedProcess::ROOT } else { 0 }
            | if have_group {
                AdoptedProcess::HAVE_GROUP
            } else {
                0
            };
        let pids = tgid as u64 | (own_pid as u64) << 32;
        let _ = if ATOMICS {
            cylo_usage_adopt_process(run_bits, signal, leader, process_start, pids)
        } else {
            cylo_usage_adopt_process_no_atomics(run_bits, signal, leader, process_start, pids)
        };
        // After the call, not in it: chains of frames under a hook stay three deep (5.10 and
        // 6.1 count them in 32-byte steps against 512 bytes).
        if ATOMICS {
            mm_use(run, mm, false);
        }
    } else if let Some(p) = PROCS.get_ptr_mut(signal) {
        // SAFETY: map value pointer; updated atomically.
        let p = unsafe { &mut *p };
        add(&mut p.threads, 1);
        // Its process was adopted through a thread without an address space (an exited
        // leader): this one has it.
        if ATOMICS && mm != 0 && p.mm == 0 {
            p.mm = mm;
            mm_use(run, mm, false);
        }
    }
    // After its process's record, so the breakdown knows whose it is.
    if thread_usage_into(task, &mut scratch.thread) {
        let u = &scratch.thread;
        add_usage(&mut counters.before, u);
        if wants_records(counters) {
            record_thread(record_kind::THREAD_ADOPTED, &member, u, counters);
        }
    }
    if task_state(task) & offset!(task_dead) as u64 != 0 {
        // It died while being adopted: its last switch may have passed before the entry was
        // there. Whoever removes the entry (the switch hook or this) accounts for it, once.
        if forget_task(task) {
            // Its membership is gone already: nothing left to charge to budgets.
            leave::<ATOMICS, false, true>(task, &member);
        }
    }
    control::ADOPTED
}

/// What [`adopt`] hands [`adopt_process`] in the high half of the run's argument.
struct AdoptedProcess;

impl AdoptedProcess {
    /// The run's root.
    const ROOT: u64 = 1 << 32;
    /// The adoption scratch's `group` holds what the process did before beyond its live
    /// threads ([`group_usage`]).
    const HAVE_GROUP: u64 = 1 << 33;
}

global_fn!(
    /// [`adopt_process`] with atomics, global ([`global_fn`]): checked once rather than once
    /// for each path of [`adopt`] that reaches it.
    cylo_usage_adopt_process(run_bits: u64, signal: u64, leader: u64, process_start: u64, pids: u64) {
        adopt_process::<true>(run_bits, signal, leader, process_start, pids);
        0
    }
);

global_fn!(
    /// [`adopt_process`] without atomics.
    cylo_usage_adopt_process_no_atomics(run_bits: u64, signal: u64, leader: u64, process_start: u64, pids: u64) {
        adopt_process::<false>(run_bits, signal, leader, process_start, pids);
        0
    }
);

/// The counts and start record of a process [`adopt`] has just put in `PROCS`: of the run in
/// the low half of `run_bits` ([`AdoptedProcess`] in the high half), led by `leader`, started
/// at `process_start`; `pids`: its pid as the tracker sees it (low half) and in its own
/// namespace (high half). Its address space is [`adopt`]'s to add, after this.
#[inline(always)]
fn adopt_process<const ATOMICS: bool>(
    run_bits: u64,
    signal: u64,
    leader: u64,
    process_start: u64,
    pids: u64,
) {
    let run = run_bits as u32;
    let root = run_bits & AdoptedProcess::ROOT != 0;
    let have_group = run_bits & AdoptedProcess::HAVE_GROUP != 0;
    let (tgid, own_pid) = (pids as u32, (pids >> 32) as u32);
    let Some(counters) = run_counters(run) else {
        return;
    };
    add(&mut counters.processes_started, 1);
    add(&mut counters.processes_adopted, 1);
    if have_group && let Some(scratch) = ADOPT_SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU map value pointer; this CPU's alone while the program runs, and
        // `adopt` filled its `group` before the call.
        let g = unsafe { &(*scratch).group };
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
}
