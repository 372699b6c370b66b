//! `sched_process_exec`: a tracked process execs: it moves to its new address space, and
//! runs with a breakdown get an exec record (comm, file name, argv).
use crate::adopt::member_ptr_or_adopted;
use crate::mem::mm_peak;
use crate::mem::mm_release;
use crate::mem::mm_use;
use crate::records::write_creds;
use crate::*;

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`,
/// after the new program is loaded: the process has a new address space.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(ctx: RawTracePointContext) -> i32 {
    let r = on_exec::<true, true>(ctx);
    diag_flush();
    r
}

/// `sched_process_exec` of the lean set: no adoption, no exec records (a breakdown's).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec_lean(ctx: RawTracePointContext) -> i32 {
    let r = on_exec::<true, false>(ctx);
    diag_flush();
    r
}

/// `sched_process_exec` for kernels without BPF atomic fetch: records and pids only.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec_no_atomics(ctx: RawTracePointContext) -> i32 {
    let r = on_exec::<false, true>(ctx);
    diag_flush();
    r
}

#[inline(always)]
pub(crate) fn on_exec<const ATOMICS: bool, const FULL: bool>(ctx: RawTracePointContext) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    let Some(member) = member_ptr_or_adopted::<ATOMICS, FULL>(current) else {
        return 0;
    };
    if doomed(member) {
        kill_current();
    }
    let Some(counters) = run_counters(member.run) else {
        return 0;
    };
    // A non-leader thread that execs takes over the leader's pid.
    let (tid, _) = pids(current, tracker().pid_level);
    if tid != member.tid {
        // Only the thread itself (here) writes its pids while it lives.
        member.tid = tid;
        member.tgid = tid;
    }
    let mut old_peak = 0;
    if ATOMICS && let Some(proc) = PROCS.get_ptr_mut(member.process) {
        let new = read::<u64>(current, offset!(task_mm)).unwrap_or(0);
        // SAFETY: map value pointer; only this process's exec changes it.
        let proc = unsafe { &mut *proc };
        if new != proc.mm {
            let old = proc.mm;
            proc.mm = new;
            old_peak = mm_peak(old);
            mm_use(member.run, new, true);
            mm_release(old, counters);
        }
    }
    if FULL && wants_all_records(counters) {
        let bprm: u64 = ctx.arg(2);
        record_exec(member, current, bprm, old_peak, counters);
    }
    0
}

/// A `PROC_EXEC` record: the new comm, file name and argv (read from the new stack).
#[inline(always)]
pub(crate) fn record_exec(
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
        (*p).header = header(record_kind::PROC_EXEC, member.run, member.process);
        (*p).old_mm_peak_pages = old_peak;
        (*p).pid = member.tgid;
        (*p)._pad0 = 0;
        // The helper zeroes the name when it cannot read it (an empty name, not garbage).
        let _ = bpf_probe_read_kernel_buf(comm, &mut (*p).comm);
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
        write_creds(task, core::ptr::addr_of_mut!((*p).creds));
    }
    entry.submit(wake_flags(&RECORDS, RECORDS_BYTES));
}
