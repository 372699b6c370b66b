//! Address spaces: which tracked processes use each `mm_struct`, its RSS as `rss_stat`
//! reports it, and its high-water mark.
use crate::*;

/// A tracked process starts using address space `mm`: `new` when it cannot be followed yet
/// (a fork's, an exec's), which spares the lookup that would miss.
#[inline(always)]
pub(crate) fn mm_use(run: u32, mm: u64, new: bool) {
    if mm == 0 {
        return;
    }
    let _ = cylo_usage_mm_use(run, mm, new as u32);
}

global_fn!(
    /// [`mm_use`], past its first check, global ([`global_fn`]): checked once rather than once
    /// for each path that reaches it (adoption reaches it on many). Its frame is small (the
    /// new entry is written into this CPU's scratch), for it sits under adoption's frame, and
    /// 6.1 counts the frames of a chain of calls in 32-byte steps against 512 bytes.
    cylo_usage_mm_use(run: u32, mm: u64, new: u32) {
        let Some(counters) = run_counters(run) else {
            return 0;
        };
        if new == 0
            && let Some(entry) = MMS.get_ptr_mut(mm)
        {
            // SAFETY: map value pointer; updated atomically.
            add(unsafe { &mut (*entry).users }, 1);
            return 0;
        }
        // Counted before it can be found, so `rss_stat` never skips a followed address space.
        filter_add(&MM_FILTER, mm, 1);
        let Ok(rss) = insert_new_mm(mm, run) else {
            filter_add(&MM_FILTER, mm, u32::MAX);
            // Another CPU registered it first (or the map is full).
            match MMS.get_ptr_mut(mm) {
                // SAFETY: map value pointer; updated atomically.
                Some(entry) => add(unsafe { &mut (*entry).users }, 1),
                None => lost(diag_kind::MMS_FULL, run, 0, counters),
            }
            return 0;
        };
        let total = add_fetch(&mut counters.rss_pages, rss);
        raise_to(&mut counters.rss_peak_pages, total);
        // (Its memory budget is checked at the next `rss_stat` of the run.)
        0
    }
);

/// Inserts `mm` into `MMS`: an address space of `run` with one user and what it holds
/// already (a fork copies its creator's mappings; exec maps the program and its stack before
/// the tracepoint), its peak so far. Returns its RSS (pages); an `Err` when it could not be
/// inserted (there already, or the map is full).
///
/// The counters are read before the entry exists: a change in between (nearly always
/// impossible: the new process has not run yet) is taken up at the counter's next
/// `rss_stat`, whose exchange works from the value stored here. The entry is written into
/// this CPU's scratch ([`AdoptScratch`]), not the stack, and without a branch, so that the
/// verifier walks one path on to the insert.
#[inline(always)]
fn insert_new_mm(mm: u64, run: u32) -> Result<u64, i32> {
    let Some(scratch) = ADOPT_SCRATCH.get_ptr_mut(0) else {
        return Err(0);
    };
    // SAFETY: per-CPU map value pointer; this CPU's alone while the program runs.
    let e = unsafe { core::ptr::addr_of_mut!((*scratch).mm) };
    let mut rss = 0u64;
    // SAFETY (all the writes): plain stores into the scratch entry's fields; every field of
    // the `#[repr(C)]` struct is written before the helper reads it.
    unsafe {
        core::ptr::addr_of_mut!((*e).run).write_volatile(run);
        core::ptr::addr_of_mut!((*e)._pad0).write_volatile(0);
        core::ptr::addr_of_mut!((*e).users).write_volatile(1);
        core::ptr::addr_of_mut!((*e).pages[2]).write_volatile(0);
    }
    // The helper zeroes the field when the read fails, and a negative count (a per-CPU
    // counter's central count dips below 0 for a moment) becomes 0.
    for member in RSS_MEMBERS {
        let src = mm + offset!(mm_rss)[member] as u64;
        // SAFETY: the field is 8 bytes of the entry; the helper checks the kernel address.
        let pages = unsafe {
            let field = core::ptr::addr_of_mut!((*e).pages[member]);
            generated::bpf_probe_read_kernel(field.cast(), 8, src as *const core::ffi::c_void);
            let v = field.read_volatile() as i64;
            let pages = (v & !(v >> 63)) as u64;
            field.write_volatile(pages);
            pages
        };
        rss = rss.wrapping_add(pages);
    }
    // SAFETY: as above; then the entry is whole.
    unsafe {
        core::ptr::addr_of_mut!((*e).rss).write_volatile(rss);
        core::ptr::addr_of_mut!((*e).peak).write_volatile(rss);
        MMS.insert(mm, &*e, BPF_NOEXIST as u64).map(|()| rss)
    }
}

/// The high-water mark (pages) of a tracked address space, 0 if it is not followed.
#[inline(always)]
pub(crate) fn mm_peak(mm: u64) -> u64 {
    match MMS.get_ptr_mut(mm) {
        // SAFETY: aligned 8-byte load of a map value.
        Some(entry) => load(unsafe { &(*entry).peak }),
        None => 0,
    }
}

/// A tracked process stops using address space `mm` (exec, exit). When it was the last,
/// the address space leaves the run: its pages leave the run's RSS, and its high-water mark
/// is a candidate for the largest process.
#[inline(always)]
pub(crate) fn mm_release(mm: u64, counters: &mut RunCounters) {
    let Some(entry) = MMS.get_ptr_mut(mm) else {
        return;
    };
    // SAFETY: map value pointer; updated atomically.
    let entry = unsafe { &mut *entry };
    if add_fetch(&mut entry.users, u64::MAX) != 0 {
        return;
    }
    for member in RSS_MEMBERS {
        let old = exchange(&mut entry.pages[member], 0);
        add(&mut counters.rss_pages, old.wrapping_neg());
    }
    let peak = load(&entry.peak);
    raise_to(&mut counters.max_process_rss_pages, peak);
    forget_mm(mm);
}

/// Removes `mm` from `MMS`, then its count from `MM_FILTER` (only if this call removed it).
#[inline(always)]
pub(crate) fn forget_mm(mm: u64) {
    if MMS.remove(mm).is_ok() {
        filter_add(&MM_FILTER, mm, u32::MAX);
    }
}

/// Records the new value of one RSS counter of a tracked address space. The exchange makes
/// the run's total the sum of the last values seen, whatever order events arrive in.
#[inline(always)]
pub(crate) fn set_rss(
    entry: &mut MmMember,
    member: usize,
    pages: i64,
    counters: &mut RunCounters,
) -> u64 {
    if member >= 4 {
        return load(&counters.rss_pages);
    }
    let new = rss_pages(pages);
    let old = exchange(&mut entry.pages[member], new);
    let delta = new.wrapping_sub(old);
    let own = add_fetch(&mut entry.rss, delta);
    raise_to(&mut entry.peak, own);
    let total = add_fetch(&mut counters.rss_pages, delta);
    raise_to(&mut counters.rss_peak_pages, total);
    total
}

/// The run's resident memory grew to `total` pages: past its memory budget, a crossing (and
/// the task that grew it dies, if it is one of the run's, as it nearly always is).
#[inline(never)]
fn check_memory(run: u32, total: u64) {
    let Some(ctl) = RUN_CONTROL.get(run) else {
        return;
    };
    if ctl.max_rss_pages == 0 || total <= ctl.max_rss_pages {
        return;
    }
    crate::budget::cross(run, cylo_usage_abi::budget::MEMORY, total);
    // SAFETY: returns the address of the current task_struct.
    if task_member(unsafe { bpf_get_current_task() }).is_some_and(|m| m.run == run) {
        kill_current();
    }
}

/// `rss_stat(struct mm_struct *mm, int member[, long count])`, wherever an RSS counter of
/// any address space changes (once per page, or per batch of pages on older kernels).
#[raw_tracepoint(tracepoint = "rss_stat")]
pub fn rss_stat(ctx: RawTracePointContext) -> i32 {
    let mm: u64 = ctx.arg(0);
    // The untracked path: one array load.
    if !maybe_in(&MM_FILTER, mm) {
        return 0;
    }
    let Some(entry) = MMS.get_ptr_mut(mm) else {
        return 0;
    };
    // SAFETY: map value pointer; its counters are updated atomically.
    let entry = unsafe { &mut *entry };
    let member = ctx.arg::<u64>(1) as u32 as usize;
    if member == 2 || member >= 4 {
        return 0; // swap entries are not resident
    }
    let pages: i64 = if offset!(rss_stat_has_count) != 0 {
        ctx.arg(2)
    } else {
        match read::<i64>(mm, offset!(mm_rss)[member]) {
            Some(p) => p,
            None => return 0,
        }
    };
    // Most events find the value they read already recorded (since 6.2 the program reads the
    // central count of a per-CPU counter, which moves once per batch of 32 or more pages):
    // then nothing changes and no atomic is needed. The same as an exchange that returned
    // the value it stored, so the totals stay the sum of the last values seen.
    if load(&entry.pages[member]) == rss_pages(pages) {
        return 0;
    }
    if let Some(counters) = run_counters(entry.run) {
        let old = load(&entry.pages[member]);
        let total = set_rss(entry, member, pages, counters);
        if rss_pages(pages) > old {
            check_memory(entry.run, total);
        }
    }
    0
}

/// An RSS counter's value as recorded: a per-CPU counter's central count can dip below 0 for
/// a moment.
#[inline(always)]
pub(crate) fn rss_pages(pages: i64) -> u64 {
    if pages < 0 { 0 } else { pages as u64 }
}
