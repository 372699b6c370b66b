//! The reader of the per-process records ring buffer (`RECORDS`): mapped when a run first
//! asks for records, drained by one thread of its own (and on demand), each record handed to
//! the consumer of its run (a breakdown).
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::sys::lock;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use cylo_usage_abi::{MAX_RUNS, RecordHeader};

/// What takes one run's records.
pub(crate) trait Consumer: Send {
    /// Takes one raw record of the run (malformed ones are the consumer's to ignore).
    fn take(&mut self, bytes: &[u8]);
    /// Every record the kernel made before `before_ns` (CLOCK_MONOTONIC) has been taken.
    fn release(&mut self, before_ns: u64);
    /// Writes out what has become due.
    fn flush(&mut self);
}

/// A record of type `T` from the start of `bytes`, if it is long enough.
pub(crate) fn read_record<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked; T is a plain-data ABI record; the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

type Slots = Vec<Option<Arc<Mutex<dyn Consumer>>>>;

/// Where the records of each run go, and the reader that drains the ring buffer.
#[derive(Default)]
pub struct RecordReader {
    slots: Mutex<Slots>,
    ring: Mutex<Option<RingBuf<MapData>>>,
    reader_started: AtomicBool,
    stop: Arc<AtomicBool>,
}

impl RecordReader {
    /// Delivers the records of run `slot` to `consumer` from now on.
    pub fn register(&self, slot: u32, consumer: Arc<Mutex<dyn Consumer>>) {
        let mut slots = lock(&self.slots);
        if slots.len() < MAX_RUNS as usize {
            slots.resize(MAX_RUNS as usize, None);
        }
        slots[slot as usize] = Some(consumer);
    }

    /// Stops delivering records of run `slot` (they are dropped from then on).
    pub fn unregister(&self, slot: u32) {
        // Deliver what is already there first.
        self.drain();
        if let Some(s) = lock(&self.slots).get_mut(slot as usize) {
            *s = None;
        }
    }

    /// Maps the ring buffer, hands it to the sinks and starts the reader thread, once.
    pub fn start(self: &Arc<Self>, ring: &Mutex<Option<aya::maps::Map>>) {
        if self.reader_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(ring) = lock(ring)
            .take()
            .and_then(|map| RingBuf::try_from(map).ok())
        else {
            return;
        };
        let fd = ring.as_raw_fd();
        *lock(&self.ring) = Some(ring);
        let me = Arc::downgrade(self);
        let stop = self.stop.clone();
        let spawned = std::thread::Builder::new()
            .name("cylo-usage-records".into())
            .spawn(move || reader(fd, me, stop));
        if spawned.is_err() {
            // Without the thread, snapshots still drain on demand.
            self.reader_started.store(false, Ordering::SeqCst);
        }
    }

    /// Delivers every record waiting in the ring buffer.
    pub fn drain(&self) {
        let mut ring = lock(&self.ring);
        let Some(ring) = ring.as_mut() else {
            return;
        };
        let slots = lock(&self.slots);
        // Every record made before this instant is delivered below (see `Consumer::release`).
        let drain_start = crate::sys::monotonic_ns();
        while let Some(item) = ring.next() {
            let bytes: &[u8] = &item;
            let Some(h) = read_record::<RecordHeader>(bytes) else {
                continue;
            };
            if let Some(Some(consumer)) = slots.get(h.run as usize) {
                lock(consumer).take(bytes);
            }
        }
        // Every consumer, records or not: held event lines become due as time passes.
        for consumer in slots.iter().flatten() {
            let mut c = lock(consumer);
            c.release(drain_start);
            c.flush();
        }
    }

    /// Ends the reader thread at its next wake-up (within its 100 ms tick).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The reader thread: waits for the ring buffer's fd and drains it, until the tracker goes.
/// It asks for a real-time priority (the lowest), so a fork bomb in a traced tree cannot
/// starve it and overflow the ring buffer; it only ever runs to drain, then sleeps.
fn reader(fd: RawFd, sinks: std::sync::Weak<RecordReader>, stop: Arc<AtomicBool>) {
    const TICK: Duration = Duration::from_millis(100);
    // SAFETY: sched_param is plain data (musl's has more fields than glibc's).
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = 1;
    // SAFETY: sets this thread's own policy; failure (no CAP_SYS_NICE) leaves it as it was.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd. The fd stays open while `sinks` holds the ring buffer;
        // a closed fd makes poll report POLLNVAL, which ends the loop below.
        let r = unsafe { libc::poll(&mut pfd, 1, TICK.as_millis() as i32) };
        if r > 0 && pfd.revents & libc::POLLNVAL != 0 {
            return;
        }
        match sinks.upgrade() {
            Some(s) => s.drain(),
            None => return,
        }
    }
}
