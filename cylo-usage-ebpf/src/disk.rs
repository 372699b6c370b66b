//! `block_bio_queue`: block I/O a tracked task submits, counted per device.
use crate::*;

/// `block_bio_queue(struct bio *bio)` (5.11+), in the submitter's context.
#[raw_tracepoint(tracepoint = "block_bio_queue")]
pub fn block_bio_queue(ctx: RawTracePointContext) -> i32 {
    let r = on_bio_queue(ctx.arg(0));
    diag_flush();
    r
}

/// `block_bio_queue(struct request_queue *q, struct bio *bio)` (before 5.11). A separate
/// program, not a branch: a context offset chosen at run time is refused by older verifiers.
#[raw_tracepoint(tracepoint = "block_bio_queue")]
pub fn block_bio_queue_with_queue(ctx: RawTracePointContext) -> i32 {
    let r = on_bio_queue(ctx.arg(1));
    diag_flush();
    r
}

#[inline(always)]
pub(crate) fn on_bio_queue(bio: u64) -> i32 {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    if !maybe_in(&TASK_FILTER, current) {
        return 0;
    }
    // One lookup for the count and the budget's charge.
    let Some(member) = TASKS.get_ptr_mut(current) else {
        return 0;
    };
    // SAFETY: map value pointer; only the task itself writes its disk charge (in
    // `charge_member_disk`) while it lives.
    let member = unsafe { &mut *member };
    let Some(counters) = run_counters(member.run) else {
        return 0;
    };
    let Some(opf) = read::<u32>(bio, offset!(bio_opf)) else {
        lost(diag_kind::READ_BIO, member.run, 0, counters);
        return 0;
    };
    let write = match opf & 0xff {
        0 => false, // REQ_OP_READ
        1 => true,  // REQ_OP_WRITE
        _ => return 0,
    };
    let (Some(size), Some(dev)) = (read::<u32>(bio, offset!(bio_size)), bio_dev(bio)) else {
        lost(diag_kind::READ_BIO, member.run, 0, counters);
        return 0;
    };
    let key = DevKey {
        run: member.run,
        dev,
    };
    let mut slot = DEVS.get_ptr_mut(key);
    if slot.is_none() {
        let _ = DEVS.insert(key, DevCounters::default(), BPF_NOEXIST as u64);
        slot = DEVS.get_ptr_mut(key);
    }
    let Some(c) = slot else {
        lost(diag_kind::DEVS_FULL, member.run, 0, counters);
        return 0;
    };
    // SAFETY: map value pointer; updated atomically.
    let c = unsafe { &mut *c };
    if write {
        add(&mut c.write_bytes, size as u64);
        add(&mut c.write_ops, 1);
    } else {
        add(&mut c.read_bytes, size as u64);
        add(&mut c.read_ops, 1);
    }
    // The kernel charged this I/O to the task's `ioac` just before submitting it.
    crate::budget::charge_member_disk(current, member);
    0
}

/// The `dev_t` a bio is for: `bio->bi_bdev->bd_dev` (5.12+), or from its gendisk before.
#[inline(always)]
pub(crate) fn bio_dev(bio: u64) -> Option<u32> {
    if offset!(bio_bdev) != ABSENT {
        let bdev = read::<u64>(bio, offset!(bio_bdev))?;
        return read::<u32>(bdev, offset!(bdev_dev));
    }
    let disk = read::<u64>(bio, offset!(bio_disk))?;
    let partno = read::<u8>(bio, offset!(bio_partno))? as u32;
    let major = read::<i32>(disk, offset!(disk_major))? as u32;
    let first_minor = read::<i32>(disk, offset!(disk_first_minor))? as u32;
    Some((major << 20) | (first_minor + partno))
}
