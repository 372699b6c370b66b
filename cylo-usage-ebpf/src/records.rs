//! Records the hooks share: a process's start (its pids, parent, comm and credentials),
//! made at its fork or its adoption.
use crate::*;

/// A `PROC_START` record for process `task` (identity `signal`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_start<const FULL: bool>(
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
        // Who a process runs as matters to a breakdown's viewer only: the lean programs
        // (totals alone) leave it unknown.
        (*p).creds = if FULL {
            creds_of(task)
        } else {
            Creds::default()
        };
    }
    entry.submit(record_wake_flags(counters));
}

/// `task`'s objective credentials and its address space's dumpable mode, for records only
/// (see [`Creds`]); what could not be read is left out of `known`.
#[inline(always)]
pub(crate) fn creds_of(task: u64) -> Creds {
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
