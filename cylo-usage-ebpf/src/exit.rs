//! `sched_process_exit`: a tracked thread passes do_exit(); when it is the last of its
//! process, the process is over: its exit status, its RSS high-water mark.
use crate::adopt::member_or_adopted;
use crate::mem::mm_peak;
use crate::mem::mm_release;
use crate::*;

/// `sched_process_exit(struct task_struct *p[, bool group_dead])`, in the exiting thread.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    let r = on_exit::<true, true>();
    diag_flush();
    r
}

/// `sched_process_exit` of the lean set: no adoption, no record.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit_lean(_ctx: RawTracePointContext) -> i32 {
    let r = on_exit::<true, false>();
    diag_flush();
    r
}

/// `sched_process_exit` for kernels without BPF atomic fetch, exchange and cmpxchg.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit_no_atomics(_ctx: RawTracePointContext) -> i32 {
    let r = on_exit::<false, true>();
    diag_flush();
    r
}

#[inline(always)]
pub(crate) fn on_exit<const ATOMICS: bool, const FULL: bool>() -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    let Some(member) = member_or_adopted::<ATOMICS, FULL>(current) else {
        return 0;
    };
    // do_exit() has already decremented `signal->live`; at 0 the process is over. Several of
    // its threads may see 0; removing the process's entry succeeds for exactly one of them.
    if read::<u32>(member.process, offset!(signal_live)) != Some(0) {
        return 0;
    }
    let Some(counters) = run_counters(member.run) else {
        return 0;
    };
    let Some((mm, threads)) = process_ends::<ATOMICS>(member.process, counters) else {
        return 0;
    };
    let code = read::<u32>(current, offset!(task_exit_code)).unwrap_or(0);
    if member.process == load(&counters.root_process) {
        store(&mut counters.root_status, ROOT_ENDED | code as u64);
    }
    add(&mut counters.processes_alive, u64::MAX); // -1
    let peak = if ATOMICS { mm_peak(mm) } else { 0 };
    if ATOMICS {
        mm_release(mm, counters);
    }
    // (The lean set's runs want no record: see `names::PROG_TASK_NEWTASK_LEAN`.)
    if FULL && wants_records(counters) {
        record_exit(&member, current, code, peak, threads, counters);
    }
    0
}

/// The process `process` ends: for exactly one of its threads that see `signal->live` at 0,
/// its entry's address space and thread count. Removed from `PROCS`, unless the kernel
/// splits the run's CPU time ([`kernel_split`]): then it stays, marked ended, until its last
/// thread has switched out for the last time ([`crate::sched::process_left`]). (Two fields,
/// not the entry: this frame sits beside adoption's, within the verifier's 512 bytes.)
#[inline(always)]
fn process_ends<const ATOMICS: bool>(process: u64, counters: &RunCounters) -> Option<(u64, u64)> {
    let p = PROCS.get_ptr_mut(process)?;
    // SAFETY: map value pointer; the fields read do not change after the process's end.
    let (mm, threads) = unsafe { (load(&(*p).mm), load(&(*p).threads)) };
    if ATOMICS && kernel_split(counters) {
        // SAFETY: map value pointer; `ended` is exchanged atomically, once from 0.
        if exchange(unsafe { &mut (*p).ended }, 1) != 0 {
            return None;
        }
        return Some((mm, threads));
    }
    PROCS.remove(process).ok()?;
    Some((mm, threads))
}

/// A `PROC_EXIT` record.
#[inline(always)]
pub(crate) fn record_exit(
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
        (*p).header = header(record_kind::PROC_EXIT, member.run, member.process);
        (*p).exit_code = code;
        (*p)._pad0 = 0;
        (*p).mm_peak_pages = peak;
        (*p).threads = threads;
        // The helper zeroes the name when it cannot read it (an empty name, not garbage).
        let _ = bpf_probe_read_kernel_buf(comm, &mut (*p).comm);
    }
    entry.submit(record_wake_flags(counters));
}
