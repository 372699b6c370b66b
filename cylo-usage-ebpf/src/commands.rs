//! The control programs: never attached; userspace runs them in its own context
//! (`BPF_PROG_TEST_RUN`) to record the tracker itself, register a spawning thread, forget an
//! address space, or adopt a task of a running tree from a `/proc/PID/task/TID` directory it
//! holds open.
use crate::adopt::adopt;
use crate::fork::register_spawner;
use crate::mem::forget_mm;
use crate::*;

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
pub(crate) fn on_control(ctx: RawTracePointContext) -> i32 {
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
                    process: signal,
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
            if read::<u64>(task, offset!(task_signal)) == Some(info.process) {
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
pub(crate) fn on_adopt<const ATOMICS: bool>(ctx: RawTracePointContext) -> i32 {
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
pub(crate) fn task_of_fd(current: u64, fd: u64) -> Result<u64, i32> {
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
