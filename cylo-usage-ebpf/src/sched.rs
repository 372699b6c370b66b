//! `sched_switch`: a dead task's last context switch, when its figures are final: what
//! it used goes to its run (and, for runs that want them, to a thread-end record), and it
//! leaves the run. Also what a thread has used, read from its `task_struct`.
use crate::budget::charge_end;
use crate::*;

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next
/// [, unsigned int prev_state])`, still in `prev`'s context.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    on_switch::<true, true>(ctx)
}

/// `sched_switch` of the lean set: no thread-end record.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_lean(ctx: RawTracePointContext) -> i32 {
    on_switch::<true, false>(ctx)
}

/// `sched_switch` for kernels without BPF atomic fetch (no per-process CPU split).
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_no_atomics(ctx: RawTracePointContext) -> i32 {
    on_switch::<false, true>(ctx)
}

#[inline(always)]
pub(crate) fn on_switch<const ATOMICS: bool, const FULL: bool>(ctx: RawTracePointContext) -> i32 {
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
    leave::<ATOMICS, true, FULL>(prev, &member);
    diag_flush();
    0
}

/// `task_struct.__state` (or `state`).
#[inline(always)]
pub(crate) fn task_state(task: u64) -> u64 {
    if offset!(task_state_size) == 8 {
        read::<u64>(task, offset!(task_state)).unwrap_or(0)
    } else {
        read::<u32>(task, offset!(task_state)).unwrap_or(0) as u64
    }
}

/// What a thread has used over its life so far (its I/O accounting 0 where the kernel lacks
/// it). `None` if the CPU figures cannot be read.
#[inline(always)]
pub(crate) fn thread_usage(task: u64) -> Option<ThreadUsage> {
    let cpu_runtime_ns = read::<u64>(task, offset!(task_sum_exec_runtime))?;
    let cpu_utime_ns = read::<u64>(task, offset!(task_utime))?;
    let cpu_stime_ns = read::<u64>(task, offset!(task_stime))?;
    Some(ThreadUsage {
        cpu_runtime_ns,
        cpu_utime_ns,
        cpu_stime_ns,
        disk_read_bytes: ioac(task, offset!(task_ioac_read_bytes)),
        disk_write_bytes: ioac(task, offset!(task_ioac_write_bytes)),
        disk_cancelled_write_bytes: ioac(task, offset!(task_ioac_cancelled_write_bytes)),
        io_rchar: ioac(task, offset!(task_ioac_rchar)),
        io_wchar: ioac(task, offset!(task_ioac_wchar)),
    })
}

/// [`thread_usage`] written into `u` (not returned on the stack); false if the runtime cannot
/// be read.
#[inline(always)]
pub(crate) fn thread_usage_into(task: u64, u: &mut ThreadUsage) -> bool {
    let Some(runtime) = read::<u64>(task, offset!(task_sum_exec_runtime)) else {
        return false;
    };
    u.cpu_runtime_ns = runtime;
    let Some(utime) = read::<u64>(task, offset!(task_utime)) else {
        return false;
    };
    u.cpu_utime_ns = utime;
    let Some(stime) = read::<u64>(task, offset!(task_stime)) else {
        return false;
    };
    u.cpu_stime_ns = stime;
    u.disk_read_bytes = ioac(task, offset!(task_ioac_read_bytes));
    u.disk_write_bytes = ioac(task, offset!(task_ioac_write_bytes));
    u.disk_cancelled_write_bytes = ioac(task, offset!(task_ioac_cancelled_write_bytes));
    u.io_rchar = ioac(task, offset!(task_ioac_rchar));
    u.io_wchar = ioac(task, offset!(task_ioac_wchar));
    true
}

/// What a process's `signal_struct` keeps of its past: its exited threads' runtime, user
/// and system time (as `thread_usage`), its reaped children's user and system time, then the
/// I/O accounting of both (as `thread_usage`, from index 5). A leader that has exited while
/// other threads run (a zombie until the group ends, so not in `signal_struct` yet, and never
/// adopted) is an exited thread too: `task` is the thread being adopted, `leader` its leader.
/// Fills `g`; false (and `g` not to be used) if the CPU figures cannot be read. `u` is room
/// for the leader's figures. Each value is stored as it is read (volatile): held back to the
/// end (the leader's in a `ThreadUsage` on the stack), they took up to seven more stack
/// slots in [`adopt`]'s frame, which 5.10's and 6.1's verifiers count with its callers'
/// against 512 bytes.
#[inline(always)]
pub(crate) fn group_usage(
    signal: u64,
    task: u64,
    leader: u64,
    g: &mut [u64; 10],
    u: &mut ThreadUsage,
) -> bool {
    let cpu = [
        offset!(signal_sum_sched_runtime),
        offset!(signal_utime),
        offset!(signal_stime),
        offset!(signal_cutime),
        offset!(signal_cstime),
    ];
    for (i, offset) in cpu.into_iter().enumerate() {
        match read::<u64>(signal, offset) {
            Some(v) => store(&mut g[i], v),
            None => return false,
        }
    }
    store(&mut g[5], ioac(signal, offset!(signal_ioac_read_bytes)));
    store(&mut g[6], ioac(signal, offset!(signal_ioac_write_bytes)));
    store(
        &mut g[7],
        ioac(signal, offset!(signal_ioac_cancelled_write_bytes)),
    );
    store(&mut g[8], ioac(signal, offset!(signal_ioac_rchar)));
    store(&mut g[9], ioac(signal, offset!(signal_ioac_wchar)));
    // SAFETY (TASKS.get): only checked for presence.
    if leader != task
        && task_state(leader) & offset!(task_dead) as u64 != 0
        && unsafe { TASKS.get(leader) }.is_none()
        && thread_usage_into(leader, u)
    {
        for (i, v) in [
            (0, u.cpu_runtime_ns),
            (1, u.cpu_utime_ns),
            (2, u.cpu_stime_ns),
            (5, u.disk_read_bytes),
            (6, u.disk_write_bytes),
            (7, u.disk_cancelled_write_bytes),
            (8, u.io_rchar),
            (9, u.io_wchar),
        ] {
            let sum = load(&g[i]).wrapping_add(v);
            store(&mut g[i], sum);
        }
    }
    true
}

/// A `THREAD_END` or `THREAD_ADOPTED` record.
#[inline(always)]
pub(crate) fn record_thread(
    kind: u32,
    member: &TaskMember,
    u: &ThreadUsage,
    counters: &mut RunCounters,
) {
    match reserve::<ThreadEnd>(counters) {
        Some(mut entry) => {
            let (net_sent, net_received) = if kind == record_kind::THREAD_END {
                (member.net_sent, member.net_received)
            } else {
                (0, 0)
            };
            let p = entry.as_mut_ptr();
            // SAFETY: `p` points to reserved ring-buffer memory of the record's size. The
            // socket bytes are stored one by one (volatile): an adopted thread's two zeroes
            // were merged into a call of `memset`, a frame more in adoption's call chain.
            unsafe {
                (*p).header = header(kind, member.run, member.process);
                (*p).usage = *u;
                core::ptr::addr_of_mut!((*p).net_sent).write_volatile(net_sent);
                core::ptr::addr_of_mut!((*p).net_received).write_volatile(net_received);
            }
            entry.submit(record_wake_flags(counters));
        }
        None => {
            record_lost(member.run, member.tid, counters);
        }
    }
}

/// A thread of process `process` (of a run whose CPU time the kernel splits) has switched
/// out for the last time, having used `runtime` (and `utime`, `stime`, its tick samples):
/// added to its process's figures. The last of the process's threads to do so (its process
/// has ended: no thread is left to create another) splits the process, as `wait4` will (`cputime_adjust` of its summed figures, no earlier
/// reading), adds the parts to the run, and removes its entry. Before the thread counts as
/// exited (`threads_exited`), so a finished run's split is whole.
#[inline(always)]
pub(crate) fn process_left(
    process: u64,
    runtime: u64,
    utime: u64,
    stime: u64,
    counters: &mut RunCounters,
) {
    let Some(p) = PROCS.get_ptr_mut(process) else {
        return;
    };
    // SAFETY: map value pointer; its fields are updated atomically.
    let p = unsafe { &mut *p };
    add(&mut p.runtime_ns, runtime);
    add(&mut p.utime_ns, utime);
    add(&mut p.stime_ns, stime);
    if add_fetch(&mut p.left, 1) != load(&p.threads) {
        return;
    }
    let (runtime, utime, stime) = (load(&p.runtime_ns), load(&p.utime_ns), load(&p.stime_ns));
    let system = cylo_usage_abi::cputime::split_system(runtime, utime, stime);
    add(&mut counters.split_runtime_ns, runtime);
    add(&mut counters.split_system_ns, system);
    add(&mut counters.split_user_ns, runtime - system);
    let _ = PROCS.remove(process);
}

/// A tracked thread has switched out for the last time: its runtime is final. `CHARGE`:
/// what it used since its last charge goes to its run's budgets (its membership is still
/// in `TASKS`). `RECORDS`: a run that wants records gets a thread-end record (not in the
/// lean set, whose runs want none).
#[inline(always)]
pub(crate) fn leave<const ATOMICS: bool, const CHARGE: bool, const RECORDS: bool>(
    task: u64,
    member: &TaskMember,
) {
    let Some(counters) = run_counters(member.run) else {
        return;
    };
    // What it used, for its process's split where the kernel makes it (a thread whose
    // figures cannot be read is left out of the totals, and so of its process's figures).
    let (runtime, utime, stime) = match thread_usage(task) {
        Some(u) => {
            add_usage(&mut counters.total, &u);
            // What the thread used since its last charge goes to the budgets too.
            if CHARGE && RUN_CONTROL.get(member.run).is_some_and(|c| c.has_budget()) {
                let (r, w) = (u.disk_read_bytes, u.disk_write_bytes);
                charge_end(member.run, task, u.cpu_runtime_ns, r, w);
            }
            if RECORDS && wants_records(counters) {
                record_thread(record_kind::THREAD_END, member, &u, counters);
            }
            (u.cpu_runtime_ns, u.cpu_utime_ns, u.cpu_stime_ns)
        }
        None => {
            lost(diag_kind::READ_CPU, member.run, member.tid, counters);
            (0, 0, 0)
        }
    };
    // (One call: the verifier walks the split once per handler.)
    if ATOMICS && kernel_split(counters) {
        process_left(member.process, runtime, utime, stime, counters);
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
