//! Budgets: a run is stopped when it crosses one (`RunControl::max_*`), in the kernel, at the
//! crossing. Each hook that sees a budgeted quantity grow checks it there:
//! - processes and threads: [`refuse`] in `task_newtask` (the one past the budget is refused:
//!   killed before it runs an instruction of its own, see `schedule_tail_exit`);
//! - CPU time: `sched_stat_runtime` ([`sched_stat_runtime`], attached only while some run has
//!   a CPU budget), which the scheduler calls at every tick of a running task, and each
//!   thread's last switch;
//! - memory: `rss_stat`; network: the socket hooks;
//! - disk: `block_bio_queue`, page dirtying (`writeback_dirty_folio`, attached only while some
//!   run has a disk budget) and each thread's last switch, from the thread's own `ioac`.
//!
//! A crossing ([`cross`]) records the first budget crossed, arms the run's kill in the kernel
//! (`RunControl::kill_signal`: a member that forks dies at once), kills the crossing task
//! when it is a member, and wakes userspace, which kills every member. Until they are dead,
//! a member charged again (a tick of a spinning thread on another CPU) is killed there.
//!
//! Only plain atomic adds and loads: the checks load the sum after their own add, so two
//! tasks crossing at once both see at least their own share and the budget holds (fail
//! closed), on every kernel.
use crate::*;
use aya_ebpf::{
    macros::{fexit, kprobe},
    programs::{FExitContext, ProbeContext},
};
use cylo_usage_abi::budget;

/// Records that `run` crossed `resource` at `observed` (the first crossing stays), arms its
/// kill, and wakes userspace.
#[inline(always)]
pub(crate) fn cross(run: u32, resource: u64, observed: u64) {
    cylo_usage_cross(run, resource, observed);
}

global_fn!(
    /// [`cross`], global ([`global_fn`]): checked once rather than on every path of each hook
    /// that checks a budget. Its result means nothing.
    cylo_usage_cross(run: u32, resource: u64, observed: u64) {
        cross_inline(run, resource, observed);
        0
    }
);

/// [`cross`], inlined: for callers that are BPF-to-BPF calls themselves, so that the chain
/// of frames stays within the verifier's 512 bytes (older verifiers round each frame up to
/// 32 bytes).
#[inline(always)]
fn cross_inline(run: u32, resource: u64, observed: u64) {
    if let Some(ctl) = RUN_CONTROL.get_ptr_mut(run) {
        // SAFETY: an aligned 4-byte store to an array value (userspace writes it only while
        // it kills, with the same effect).
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*ctl).kill_signal), SIGKILL) };
    }
    let Some(counters) = run_counters(run) else {
        return;
    };
    if load(&counters.budget_crossed) != 0 {
        return;
    }
    store(
        &mut counters.budget_crossed,
        budget::pack(resource, observed),
    );
    // SAFETY: reads the monotonic clock.
    store(&mut counters.budget_crossed_ns, unsafe {
        bpf_ktime_get_ns()
    });
    note(diag_kind::BUDGET, run, 0);
    notify(run, event_kind::BUDGET, counters);
}

/// Whether `run` has crossed a budget (its members are to die).
#[inline(always)]
pub(crate) fn crossed(counters: &RunCounters) -> bool {
    load(&counters.budget_crossed) != 0
}

/// Refuses a new task of `run` past its processes or threads budget, if it is (the task has
/// joined the run and been counted). `thread_only`: check the threads budget alone (for a new
/// thread, or a new process before it is counted as one; its caller then counts a refused
/// process); else both, for a new process counted in `processes_started` already. Returns
/// whether it was refused.
#[inline(always)]
pub(crate) fn refuse(run: u32, child: u64, thread_only: bool) -> bool {
    cylo_usage_refuse(run, child, thread_only as u32) != 0
}

global_fn!(
    /// [`refuse`], global ([`global_fn`]), as [`cylo_usage_cross`]: 1 when refused.
    cylo_usage_refuse(run: u32, child: u64, thread_only: u32) {
        refuse_here(run, child, thread_only != 0) as u32
    }
);

#[inline(always)]
fn refuse_here(run: u32, child: u64, thread_only: bool) -> bool {
    let Some(ctl) = RUN_CONTROL.get(run) else {
        return false;
    };
    let Some(counters) = run_counters(run) else {
        return false;
    };
    let (max_threads, max_processes) = (ctl.max_threads, ctl.max_processes);
    if max_threads == 0 && max_processes == 0 {
        return false;
    }
    // Refused ones first, then the started ones: every refusal loaded was started before.
    let threads = {
        let refused = load(&counters.threads_refused);
        load(&counters.threads_started).wrapping_sub(refused)
    };
    // What is recorded as observed is the count this task would have made, the budget plus
    // one: forks that race on several CPUs each see the others' increments, and whichever
    // records the crossing first must not report a count that includes tasks refused with it.
    let (resource, observed) = if max_threads != 0 && threads > max_threads {
        (budget::THREADS, max_threads + 1)
    } else if !thread_only && max_processes != 0 {
        let refused = load(&counters.processes_refused);
        let processes = load(&counters.processes_started).wrapping_sub(refused);
        if processes <= max_processes {
            return false;
        }
        (budget::PROCESSES, max_processes + 1)
    } else {
        return false;
    };
    let Some(member) = TASKS.get_ptr_mut(child) else {
        return false;
    };
    // SAFETY: map value pointer; the new task cannot run before this hook returns, and its
    // flags are written nowhere else now.
    let member = unsafe { &mut *member };
    let was_doomed = doomed(member);
    member.flags |= member_flags::DOOMED | member_flags::REFUSED;
    add(&mut counters.threads_refused, 1);
    if !thread_only {
        add(&mut counters.processes_refused, 1);
    }
    if !was_doomed {
        doomed_alive_add(1);
    }
    // Its creator dies now (a new thread with it); a new process at `schedule_tail`.
    kill_current();
    cross_inline(run, resource, observed);
    true
}

/// After `schedule_tail()`, in a new task's context, before its first return to user space,
/// with interrupts on (so the signal is sent at once, not through irq_work): a task killed at
/// birth (a refused one, or one past its run's share) gets SIGKILL here, so it never runs an
/// instruction of its own. Attached (a trampoline) while some run has a processes or threads
/// budget; the untracked path is one load of a global.
#[fexit(function = "schedule_tail")]
pub fn schedule_tail_exit(_ctx: FExitContext) -> i32 {
    kill_if_doomed();
    0
}

/// SIGKILL to the current task if it was killed at birth.
#[inline(always)]
fn kill_if_doomed() {
    // SAFETY: an aligned 8-byte load of a global is single-copy atomic.
    if unsafe { core::ptr::read_volatile(core::ptr::addr_of!(DOOMED_ALIVE)) } == 0 {
        return;
    }
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    if let Some(member) = task_member(current)
        && doomed(&member)
    {
        kill_current();
    }
}

/// A kprobe on `calculate_sigpending()`, which only `schedule_tail()` calls, last, in a new
/// task's context with interrupts on, just before its first return to user space: where the
/// kernel has no BPF trampolines but has kprobes, a task killed at birth gets SIGKILL here
/// (sent at once; `calculate_sigpending` then keeps it pending), before it runs an
/// instruction of its own. Attached instead of `schedule_tail_exit`; it runs only in new
/// tasks. Unlike a kretprobe (tried on `schedule_tail` and dropped: its instances run out
/// when many new tasks are preempted inside it at once), an entry probe has no instance
/// limit. On arm64 before 6.5 this is the only way: `ret_from_fork` does not pass the system
/// call exit work there, so `sys_exit_doomed` would come at the first system call.
#[kprobe(function = "calculate_sigpending")]
pub fn calculate_sigpending_doomed(_ctx: ProbeContext) -> u32 {
    kill_if_doomed();
    0
}

/// `sys_exit(struct pt_regs *regs, long ret)`: where the kernel has neither BPF trampolines
/// nor kprobes, a new task's first return to user space (on x86-64 `ret_from_fork` goes
/// through the syscall exit work while this tracepoint is on): a task killed at birth gets
/// SIGKILL here, before it runs an instruction of its own. Attached instead of
/// `schedule_tail_exit` and `calculate_sigpending_doomed` (it runs at every system call's
/// exit on the host while attached: one load of a global). On arm64 `ret_from_fork` does not
/// pass this tracepoint, so a refused process dies at its first system call's exit there.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit_doomed(_ctx: RawTracePointContext) -> i32 {
    kill_if_doomed();
    0
}

/// `sched_stat_runtime(struct task_struct *tsk, u64 runtime[, u64 vruntime])`: the scheduler
/// has just added `runtime` to a running task's `sum_exec_runtime` (at each tick, and as it
/// switches or is preempted). Attached only while some run has a CPU budget.
#[raw_tracepoint(tracepoint = "sched_stat_runtime")]
pub fn sched_stat_runtime(ctx: RawTracePointContext) -> i32 {
    let task: u64 = ctx.arg(0);
    if !maybe_in(&TASK_FILTER, task) {
        return 0;
    }
    let Some(member) = TASKS.get_ptr_mut(task) else {
        return 0;
    };
    // SAFETY: map value pointer; its charge is written under the task's runqueue lock, which
    // every caller of this tracepoint and the task's last switch hold.
    let member = unsafe { &mut *member };
    let run = member.run;
    let Some(counters) = run_counters(run) else {
        return 0;
    };
    if let Some(ctl) = RUN_CONTROL.get(run)
        && ctl.max_cpu_ns != 0
        && let Some(now) = read::<u64>(task, offset!(task_sum_exec_runtime))
    {
        charge_cpu(run, member, now, ctl.max_cpu_ns, counters);
    }
    // SAFETY: returns the address of the current task_struct.
    if crossed(counters) && task == unsafe { bpf_get_current_task() } {
        kill_current();
    }
    diag_flush();
    0
}

/// Charges `member`'s CPU time up to `now` (its `sum_exec_runtime`) to its run; a crossing of
/// `max` is recorded.
#[inline(always)]
pub(crate) fn charge_cpu(
    run: u32,
    member: &mut TaskMember,
    now: u64,
    max: u64,
    counters: &mut RunCounters,
) {
    let old = load(&member.charged_cpu_ns);
    if now <= old {
        return;
    }
    store(&mut member.charged_cpu_ns, now);
    add(&mut counters.charged_cpu_ns, now - old);
    let total = load(&counters.charged_cpu_ns);
    if total > max {
        cross(run, budget::CPU_TIME, total);
    }
}

/// What thread `task` of `run` used since its last charge (`runtime`, `read_bytes` and
/// `write_bytes`: its final figures), charged to the run's budgets at its end. A BPF-to-BPF
/// call, as [`cross`]; its membership is still in `TASKS`.
#[inline(never)]
pub(crate) fn charge_end(run: u32, task: u64, runtime: u64, read_bytes: u64, write_bytes: u64) {
    let (Some(ctl), Some(counters)) = (RUN_CONTROL.get(run), run_counters(run)) else {
        return;
    };
    if !ctl.has_budget() {
        return;
    }
    let Some(member) = TASKS.get_ptr_mut(task) else {
        return;
    };
    // SAFETY: map value pointer; the task is dead, nothing else charges it.
    let member = unsafe { &mut *member };
    if ctl.max_cpu_ns != 0 {
        charge_cpu(run, member, runtime, ctl.max_cpu_ns, counters);
    }
    charge_disk(run, member, read_bytes, write_bytes, ctl, counters);
}

/// Charges `member`'s disk bytes up to `read_bytes` / `write_bytes` (its `ioac`) to its run,
/// against the run's disk budgets.
#[inline(always)]
pub(crate) fn charge_disk(
    run: u32,
    member: &mut TaskMember,
    read_bytes: u64,
    write_bytes: u64,
    ctl: &RunControl,
    counters: &mut RunCounters,
) {
    if ctl.max_disk_write_bytes != 0 {
        let old = load(&member.charged_disk_write_bytes);
        if write_bytes > old {
            store(&mut member.charged_disk_write_bytes, write_bytes);
            add(&mut counters.charged_disk_write_bytes, write_bytes - old);
            let total = load(&counters.charged_disk_write_bytes);
            if total > ctl.max_disk_write_bytes {
                cross(run, budget::DISK_WRITE, total);
            }
        }
    }
    if ctl.max_disk_read_bytes != 0 {
        let old = load(&member.charged_disk_read_bytes);
        if read_bytes > old {
            store(&mut member.charged_disk_read_bytes, read_bytes);
            add(&mut counters.charged_disk_read_bytes, read_bytes - old);
            let total = load(&counters.charged_disk_read_bytes);
            if total > ctl.max_disk_read_bytes {
                cross(run, budget::DISK_READ, total);
            }
        }
    }
}

/// The current task, a member of a run with a disk budget, has read or dirtied disk bytes:
/// its `ioac` is charged, and it dies if the run has crossed a budget.
#[inline(always)]
pub(crate) fn charge_current_disk(current: u64) {
    if !maybe_in(&TASK_FILTER, current) {
        return;
    }
    let Some(member) = TASKS.get_ptr_mut(current) else {
        return;
    };
    // SAFETY: map value pointer; only the task itself charges its disk bytes while it lives.
    charge_member_disk(current, unsafe { &mut *member });
}

/// [`charge_current_disk`] for a caller that has looked up the current task's membership
/// (`member`, its TASKS value) already.
#[inline(always)]
pub(crate) fn charge_member_disk(current: u64, member: &mut TaskMember) {
    let run = member.run;
    let (Some(ctl), Some(counters)) = (RUN_CONTROL.get(run), run_counters(run)) else {
        return;
    };
    if ctl.max_disk_read_bytes | ctl.max_disk_write_bytes == 0 {
        return;
    }
    let read_bytes = ioac(current, offset!(task_ioac_read_bytes));
    let write_bytes = ioac(current, offset!(task_ioac_write_bytes));
    charge_disk(run, member, read_bytes, write_bytes, ctl, counters);
    if crossed(counters) {
        kill_current();
    }
}

/// `writeback_dirty_folio(struct folio *, struct address_space *)` (`writeback_dirty_page`
/// before 5.17), in the task that dirties a page of the page cache, just before the kernel
/// charges it to the task's `ioac.write_bytes`: the task's bytes so far are charged (so a
/// buffered writer is charged one folio late). Attached only while some run has a disk
/// budget.
#[raw_tracepoint(tracepoint = "writeback_dirty_folio")]
pub fn writeback_dirty_folio(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    charge_current_disk(unsafe { bpf_get_current_task() });
    diag_flush();
    0
}
