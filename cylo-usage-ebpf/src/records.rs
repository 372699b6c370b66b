//! Records the hooks share: a process's start (its pids, parent, comm and credentials),
//! made at its fork or its adoption.
use crate::*;

/// A `PROC_START` record for process `task` (identity `signal`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_start(
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
        // The helper zeroes the name when it cannot read it (an empty name, not garbage).
        let _ = bpf_probe_read_kernel_buf(comm, &mut (*p).comm);
        write_creds(task, core::ptr::addr_of_mut!((*p).creds));
    }
    entry.submit(record_wake_flags(counters));
}

/// Writes `task`'s objective credentials and its address space's dumpable mode into `c` (a
/// record's), for records only (see [`Creds`]); what could not be read is left out of
/// `known` (and 0). Field by field and volatile: a `Creds` built on the stack had its zeroes
/// merged into a call of `memset`, one frame more in adoption's call chain, whose stack the
/// verifiers of 5.10 and 6.1 count in 32-byte steps per frame.
///
/// # Safety
/// `c` must be valid for writes of a `Creds`.
#[inline(always)]
pub(crate) unsafe fn write_creds(task: u64, c: *mut Creds) {
    // Each field is written where it is known, so that no value is carried past a branch
    // (the verifier then walks the rest of the handler once, not once per outcome).
    // SAFETY (all the writes): the caller's promise; every field is written.
    unsafe {
        core::ptr::addr_of_mut!((*c).known).write_volatile(0);
        core::ptr::addr_of_mut!((*c).dumpable).write_volatile(0);
    }
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
        unsafe {
            core::ptr::addr_of_mut!((*c).uid).write_volatile(uid);
            core::ptr::addr_of_mut!((*c).gid).write_volatile(gid);
            core::ptr::addr_of_mut!((*c).suid).write_volatile(suid);
            core::ptr::addr_of_mut!((*c).sgid).write_volatile(sgid);
            core::ptr::addr_of_mut!((*c).euid).write_volatile(euid);
            core::ptr::addr_of_mut!((*c).egid).write_volatile(egid);
            core::ptr::addr_of_mut!((*c).known).write_volatile(creds_known::IDS);
        }
    } else {
        unsafe {
            core::ptr::addr_of_mut!((*c).uid).write_volatile(0);
            core::ptr::addr_of_mut!((*c).gid).write_volatile(0);
            core::ptr::addr_of_mut!((*c).suid).write_volatile(0);
            core::ptr::addr_of_mut!((*c).sgid).write_volatile(0);
            core::ptr::addr_of_mut!((*c).euid).write_volatile(0);
            core::ptr::addr_of_mut!((*c).egid).write_volatile(0);
        }
    }
    if offset!(mm_flags) != ABSENT
        && let Some(mm) = read::<u64>(task, offset!(task_mm))
        && mm != 0
        && let Some(flags) = read::<u64>(mm, offset!(mm_flags))
    {
        unsafe {
            core::ptr::addr_of_mut!((*c).dumpable).write_volatile((flags & 3) as u32);
            let known = core::ptr::addr_of!((*c).known).read_volatile();
            core::ptr::addr_of_mut!((*c).known).write_volatile(known | creds_known::DUMPABLE);
        }
    }
}
