//! The per-process breakdown of a run (`--tree`) and its event stream (`--events`), built
//! from the records the kernel puts in the `RECORDS` ring buffer for the runs that ask.
//!
//! One reader drains the ring buffer for all runs of a [`crate::Tracker`] (on its own thread,
//! and on demand before a snapshot), and hands each record to its run's [`Tree`]. Records
//! are a breakdown: the totals never depend on them. A record the kernel could not write
//! counts in `lost_events`; a process beyond the tree's limit is dropped and counted too.
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use cylo_usage_abi::{
    ARGV_BYTES, MAX_RUNS, ProcExec, ProcExit, ProcStart, RecordHeader, ThreadEnd, proc_flags,
    record_kind,
};
use serde::{Deserialize, Serialize};

use crate::usage::{Units, split_runtime};

/// How many processes a tree keeps by default; past it, processes are dropped from the
/// breakdown (and counted), so a fork bomb cannot exhaust the tracker's memory.
pub const DEFAULT_TREE_LIMIT: usize = 1_000_000;

/// One process of a run, as `--tree` reports it. The counters are what it used while it was
/// followed (since the attach, for processes present then); the field names are the totals'.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUsage {
    /// Its pid as the tracker sees it.
    pub pid: u32,
    /// Its pid inside its own pid namespace, where that differs.
    pub ns_pid: Option<u32>,
    /// Its parent's pid when it was created (0 when the parent is not visible).
    pub ppid: u32,
    /// The index of its parent in `processes`, when the parent is part of the tree.
    pub parent_index: Option<usize>,
    /// `comm` after its last exec (or inherited), escaped where not UTF-8.
    pub comm: String,
    /// argv as set at its last exec (up to 256 bytes, read in the kernel); `None` if it never
    /// exec'd while followed.
    pub argv: Option<Vec<String>>,
    /// Whether argv was longer than what was kept.
    pub argv_truncated: bool,
    /// The file its last exec ran.
    pub filename: Option<String>,
    /// When it started and ended, in ns since the session started (negative start: before an
    /// attach). `end_ns` is `None` while it runs.
    pub start_ns: i64,
    pub end_ns: Option<u64>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Present when the session attached (rather than created inside it).
    pub attached: bool,
    pub thread_count: u64,
    pub cpu_time_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    pub disk_bytes_read: Option<u64>,
    pub disk_bytes_written: Option<u64>,
    pub disk_cancelled_write_bytes: Option<u64>,
    pub io_read_chars: Option<u64>,
    pub io_write_chars: Option<u64>,
    /// The peak RSS of its address space(s); `None` where memory is not followed.
    pub peak_memory_bytes: Option<u64>,
    pub network_bytes_sent: Option<u64>,
    pub network_bytes_received: Option<u64>,
}

/// What a thread used: runtime, utime, stime (ns), then disk read, write, cancelled, rchar,
/// wchar, TCP/UDP bytes sent and received.
pub type ThreadCounters = [u64; 10];

fn thread_counters(t: &ThreadEnd) -> ThreadCounters {
    [
        t.cpu_runtime_ns,
        t.cpu_utime_ns,
        t.cpu_stime_ns,
        t.disk_read_bytes,
        t.disk_write_bytes,
        t.disk_cancelled_write_bytes,
        t.io_rchar,
        t.io_wchar,
        t.net_sent,
        t.net_received,
    ]
}

fn add_to(total: &mut ThreadCounters, v: &ThreadCounters) {
    for (t, x) in total.iter_mut().zip(v) {
        *t = t.wrapping_add(*x);
    }
}

/// One process as the records describe it.
#[derive(Clone, Debug, Default)]
struct Proc {
    id: u64,
    parent: Option<usize>,
    pid: u32,
    own_pid: u32,
    ppid: u32,
    start_mono_ns: u64,
    end_mono_ns: Option<u64>,
    status: Option<u32>,
    comm: Vec<u8>,
    filename: Option<Vec<u8>>,
    argv: Option<Vec<u8>>,
    argv_truncated: bool,
    adopted: bool,
    root: bool,
    /// Threads it had when it ended (from its exit record).
    threads: Option<u64>,
    threads_ended: u64,
    used: ThreadCounters,
    before: ThreadCounters,
    peak_pages: u64,
    exit_reported: bool,
}

impl Proc {
    fn complete(&self) -> bool {
        self.threads.is_some_and(|n| self.threads_ended >= n)
    }
}

/// A destination for the NDJSON event stream, flushed line by line.
pub type EventSink = Box<dyn Write + Send>;

/// The per-process records of one run.
pub struct Tree {
    started_mono_ns: u64,
    /// Whether to keep every process for the breakdown; without, a process is forgotten once
    /// its exit event is out (events only).
    keep: bool,
    procs: Vec<Option<Proc>>,
    /// Processes by identity (`signal_struct` address). A later process with the same
    /// address replaces an earlier one (the address is reused only after the earlier one's
    /// records are all in).
    by_id: HashMap<u64, usize>,
    limit: usize,
    /// Processes left out of the breakdown because of `limit`.
    dropped: u64,
    events: Option<EventSink>,
    /// Why the event stream stopped, if it failed.
    events_error: Option<String>,
    units: Units,
}

impl Tree {
    /// A tree for a run that started at `started_mono_ns` (CLOCK_MONOTONIC), writing events to
    /// `events` if given.
    pub fn new(
        started_mono_ns: u64,
        keep: bool,
        limit: usize,
        events: Option<EventSink>,
        units: Units,
    ) -> Tree {
        let mut tree = Tree {
            started_mono_ns,
            keep,
            procs: Vec::new(),
            by_id: HashMap::new(),
            limit,
            dropped: 0,
            events,
            events_error: None,
            units,
        };
        tree.anchor();
        tree
    }

    /// The first line of the stream: the kernel clock and the wall clock at the session's
    /// start, so `time_ns` can be placed in time.
    fn anchor(&mut self) {
        let realtime = realtime_ns();
        let mono = crate::run::monotonic_ns();
        // The wall clock at the session start.
        let start_unix_ns = realtime.saturating_sub(mono.saturating_sub(self.started_mono_ns));
        let line = serde_json::json!({
            "event": "start",
            "time_ns": 0,
            "clock": "CLOCK_MONOTONIC",
            "monotonic_ns": self.started_mono_ns,
            "unix_time_ns": start_unix_ns,
        });
        self.emit(line);
    }

    fn rel(&self, mono: u64) -> u64 {
        mono.saturating_sub(self.started_mono_ns)
    }

    fn emit(&mut self, line: serde_json::Value) {
        let Some(out) = self.events.as_mut() else {
            return;
        };
        let mut text = line.to_string();
        text.push('\n');
        // Flushed after each batch of records (`flush`), so `tail -f` follows.
        if let Err(e) = out.write_all(text.as_bytes()) {
            // A closed pipe (`| head`) ends the stream, never the measurement.
            self.events_error = Some(e.to_string());
            self.events = None;
        }
    }

    /// The `attached` event: the attach has registered the tree that was there (the moment
    /// `usage_before_attach` stops and the totals begin).
    pub fn note_attached(&mut self, processes: u64, threads: u64, passes: usize) {
        let now = crate::run::monotonic_ns();
        let line = serde_json::json!({
            "event": "attached",
            "time_ns": self.rel(now),
            "processes": processes,
            "threads": threads,
            "passes": passes,
        });
        self.emit(line);
        self.flush();
    }

    /// Hands what the event stream holds to its destination.
    pub fn flush(&mut self) {
        if let Some(out) = self.events.as_mut()
            && let Err(e) = out.flush()
        {
            self.events_error = Some(e.to_string());
            self.events = None;
        }
    }

    /// Processes left out of the breakdown because of the limit.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Takes one raw record. Malformed records (short, unknown kind) are ignored.
    pub fn take(&mut self, bytes: &[u8]) {
        let Some(header) = read_record::<RecordHeader>(bytes) else {
            return;
        };
        match header.kind {
            record_kind::PROC_START => {
                if let Some(r) = read_record::<ProcStart>(bytes) {
                    self.on_start(&r);
                }
            }
            record_kind::PROC_EXEC => {
                if let Some(r) = read_record::<ProcExec>(bytes) {
                    self.on_exec(&r);
                }
            }
            record_kind::PROC_EXIT => {
                if let Some(r) = read_record::<ProcExit>(bytes) {
                    self.on_exit(&r);
                }
            }
            record_kind::THREAD_END | record_kind::THREAD_ADOPTED => {
                if let Some(r) = read_record::<ThreadEnd>(bytes) {
                    self.on_thread(&r);
                }
            }
            _ => {}
        }
    }

    fn on_start(&mut self, r: &ProcStart) {
        if self.keep && self.procs.len() >= self.limit {
            self.dropped += 1;
            self.by_id.remove(&r.header.process);
            return;
        }
        let p = Proc {
            id: r.header.process,
            parent: self.by_id.get(&r.parent).copied(),
            pid: r.pid,
            own_pid: r.pid_own_ns,
            ppid: r.ppid,
            start_mono_ns: r.header.time_ns,
            comm: trim_nul(&r.comm).to_vec(),
            adopted: r.flags & proc_flags::ADOPTED != 0,
            root: r.flags & proc_flags::ROOT != 0,
            ..Proc::default()
        };
        let line = serde_json::json!({
            "event": "fork",
            "time_ns": self.rel(r.header.time_ns),
            "pid": r.pid,
            "ns_pid": (r.pid_own_ns != r.pid).then_some(r.pid_own_ns),
            "ppid": r.ppid,
            "comm": escape_bytes(&p.comm),
            "root": p.root,
            "attached": p.adopted,
        });
        self.by_id.insert(p.id, self.procs.len());
        self.procs.push(Some(p));
        self.emit(line);
    }

    fn get(&mut self, id: u64) -> Option<&mut Proc> {
        let i = *self.by_id.get(&id)?;
        self.procs.get_mut(i)?.as_mut()
    }

    fn on_exec(&mut self, r: &ProcExec) {
        let len = (r.argv_len as usize).min(ARGV_BYTES);
        let argv = r.argv[..len].to_vec();
        let filename = trim_nul(&r.filename).to_vec();
        let time_ns = self.rel(r.header.time_ns);
        let Some(p) = self.get(r.header.process) else {
            return;
        };
        p.comm = trim_nul(&r.comm).to_vec();
        p.pid = r.pid;
        p.peak_pages = p.peak_pages.max(r.old_mm_peak_pages);
        p.argv_truncated = r.argv_truncated != 0;
        let line = serde_json::json!({
            "event": "exec",
            "time_ns": time_ns,
            "pid": r.pid,
            "comm": escape_bytes(&p.comm),
            "filename": escape_bytes(&filename),
            "argv": split_argv(&argv),
            "argv_truncated": p.argv_truncated,
        });
        p.argv = Some(argv);
        p.filename = Some(filename);
        self.emit(line);
    }

    fn on_exit(&mut self, r: &ProcExit) {
        let Some(p) = self.get(r.header.process) else {
            return;
        };
        p.end_mono_ns = Some(r.header.time_ns);
        p.status = Some(r.exit_code);
        let comm = trim_nul(&r.comm);
        if !comm.is_empty() {
            p.comm = comm.to_vec();
        }
        p.peak_pages = p.peak_pages.max(r.mm_peak_pages);
        p.threads = Some(r.threads);
        self.report_exit(r.header.process);
    }

    fn on_thread(&mut self, r: &ThreadEnd) {
        let v = thread_counters(r);
        let Some(p) = self.get(r.header.process) else {
            return;
        };
        if r.header.kind == record_kind::THREAD_ADOPTED {
            add_to(&mut p.before, &v);
        } else {
            add_to(&mut p.used, &v);
            p.threads_ended += 1;
        }
        self.report_exit(r.header.process);
    }

    /// The exit event, once the process has ended and all its threads' records are in.
    fn report_exit(&mut self, id: u64) {
        let Some(&i) = self.by_id.get(&id) else {
            return;
        };
        let Some(p) = self.procs[i].as_ref() else {
            return;
        };
        if p.exit_reported || !p.complete() {
            return;
        }
        let u = self.usage_of(p, &[0; 10], true, true);
        let line = serde_json::json!({
            "event": "exit",
            "time_ns": u.end_ns,
            "pid": u.pid,
            "exit_code": u.exit_code,
            "signal": u.signal,
            "thread_count": u.thread_count,
            "cpu_time_ns": u.cpu_time_ns,
            "cpu_user_ns": u.cpu_user_ns,
            "cpu_system_ns": u.cpu_system_ns,
            "disk_bytes_read": u.disk_bytes_read,
            "disk_bytes_written": u.disk_bytes_written,
            "io_read_chars": u.io_read_chars,
            "io_write_chars": u.io_write_chars,
            "network_bytes_sent": u.network_bytes_sent,
            "network_bytes_received": u.network_bytes_received,
            "peak_memory_bytes": u.peak_memory_bytes,
        });
        if self.keep {
            if let Some(p) = self.procs[i].as_mut() {
                p.exit_reported = true;
            }
        } else {
            self.procs[i] = None;
            self.by_id.remove(&id);
        }
        self.emit(line);
    }

    /// `p`'s figures, with `live` (what its live threads have used, from /proc) added and
    /// what it had used before an attach taken off.
    fn usage_of(
        &self,
        p: &Proc,
        live: &ThreadCounters,
        measured_memory: bool,
        measured_network: bool,
    ) -> ProcessUsage {
        let mut used = p.used;
        add_to(&mut used, live);
        let mut c = [0u64; 10];
        for (i, slot) in c.iter_mut().enumerate() {
            *slot = used[i].saturating_sub(p.before[i]);
        }
        let (user, system) = split_runtime(c[0], c[1], c[2]);
        let (exit_code, signal) = match p.status {
            Some(s) => decode_status(s),
            None => (None, None),
        };
        let argv = p.argv.as_deref().map(split_argv);
        ProcessUsage {
            pid: p.pid,
            ns_pid: (p.own_pid != p.pid && p.own_pid != 0).then_some(p.own_pid),
            ppid: p.ppid,
            parent_index: p.parent,
            comm: escape_bytes(&p.comm),
            argv,
            argv_truncated: p.argv_truncated,
            filename: p.filename.as_deref().map(escape_bytes),
            start_ns: p.start_mono_ns as i64 - self.started_mono_ns as i64,
            end_ns: p.end_mono_ns.map(|e| self.rel(e)),
            exit_code,
            signal,
            attached: p.adopted,
            thread_count: p.threads.unwrap_or(p.threads_ended),
            cpu_time_ns: c[0],
            cpu_user_ns: user,
            cpu_system_ns: system,
            disk_bytes_read: Some(c[3]),
            disk_bytes_written: Some(c[4]),
            disk_cancelled_write_bytes: Some(c[5]),
            io_read_chars: Some(c[6]),
            io_write_chars: Some(c[7]),
            peak_memory_bytes: measured_memory.then_some(p.peak_pages * self.units.page_size),
            network_bytes_sent: measured_network.then_some(c[8]),
            network_bytes_received: measured_network.then_some(c[9]),
        }
    }

    /// The breakdown: every process in start order, with the live threads' figures (by
    /// process identity) added, and the counters the kernel does not measure set to `None`.
    pub fn processes(
        &self,
        live: &HashMap<u64, (ThreadCounters, u64)>,
        measured: crate::features::Measured,
    ) -> Vec<ProcessUsage> {
        let tick_ns = 1_000_000_000 / self.units.ticks_per_second.max(1);
        self.procs
            .iter()
            .flatten()
            .map(|p| {
                let (mut counters, threads) = live.get(&p.id).copied().unwrap_or_default();
                // /proc gives utime/stime in ticks.
                counters[1] *= tick_ns;
                counters[2] *= tick_ns;
                let mut u =
                    self.usage_of(p, &counters, measured.atomics, measured.network.is_some());
                if p.end_mono_ns.is_none() {
                    u.thread_count = p.threads_ended + threads;
                }
                if !measured.disk {
                    u.disk_bytes_read = None;
                    u.disk_bytes_written = None;
                    u.disk_cancelled_write_bytes = None;
                }
                if !measured.io_chars {
                    u.io_read_chars = None;
                    u.io_write_chars = None;
                }
                u
            })
            .collect()
    }
}

/// A wait status (`code << 8 | signal`) as (exit code, signal).
pub fn decode_status(status: u32) -> (Option<i32>, Option<i32>) {
    let sig = (status & 0x7f) as i32;
    if sig == 0 {
        (Some(((status >> 8) & 0xff) as i32), None)
    } else {
        (None, Some(sig))
    }
}

fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A record of type `T` from the start of `bytes`, if it is long enough.
fn read_record<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked; T is a plain-data ABI record; the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn trim_nul(bytes: &[u8]) -> &[u8] {
    match bytes.iter().position(|&b| b == 0) {
        Some(n) => &bytes[..n],
        None => bytes,
    }
}

/// Bytes as a string: valid UTF-8 as it is, each invalid byte as `\xNN`. JSON escaping of
/// control characters is the serialiser's job; the human report escapes them again.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// argv as kept (NUL-separated strings, the last possibly cut off) as a list.
pub fn split_argv(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes.split(|&b| b == 0).map(escape_bytes).collect()
}

type Slots = Vec<Option<Arc<Mutex<Tree>>>>;

/// Where the records of each run go, and the reader that drains the ring buffer.
#[derive(Default)]
pub struct Sinks {
    slots: Mutex<Slots>,
    ring: Mutex<Option<RingBuf<MapData>>>,
    reader_started: AtomicBool,
    stop: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sinks {
    /// Delivers the records of run `slot` to `tree` from now on.
    pub fn register(&self, slot: u32, tree: Arc<Mutex<Tree>>) {
        let mut slots = lock(&self.slots);
        if slots.len() < MAX_RUNS as usize {
            slots.resize(MAX_RUNS as usize, None);
        }
        slots[slot as usize] = Some(tree);
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
        let mut touched = [false; MAX_RUNS as usize];
        while let Some(item) = ring.next() {
            let bytes: &[u8] = &item;
            let Some(h) = read_record::<RecordHeader>(bytes) else {
                continue;
            };
            if let Some(Some(tree)) = slots.get(h.run as usize) {
                lock(tree).take(bytes);
                touched[h.run as usize] = true;
            }
        }
        for (slot, tree) in slots.iter().enumerate() {
            if let Some(tree) = tree
                && touched[slot]
            {
                lock(tree).flush();
            }
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The reader thread: waits for the ring buffer's fd and drains it, until the tracker goes.
/// It asks for a real-time priority (the lowest), so a fork bomb in a traced tree cannot
/// starve it and overflow the ring buffer; it only ever runs to drain, then sleeps.
fn reader(fd: RawFd, sinks: std::sync::Weak<Sinks>, stop: Arc<AtomicBool>) {
    const TICK: Duration = Duration::from_millis(100);
    let param = libc::sched_param { sched_priority: 1 };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::Measured;
    use cylo_usage_abi::{COMM_BYTES, FILENAME_BYTES};

    const UNITS: Units = Units {
        ticks_per_second: 100,
        page_size: 4096,
    };

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-data ABI record.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    fn head(kind: u32, time_ns: u64, process: u64) -> RecordHeader {
        RecordHeader {
            kind,
            run: 0,
            time_ns,
            process,
        }
    }

    fn comm(s: &[u8]) -> [u8; COMM_BYTES] {
        let mut c = [0; COMM_BYTES];
        c[..s.len()].copy_from_slice(s);
        c
    }

    fn start(id: u64, parent: u64, pid: u32, name: &[u8]) -> Vec<u8> {
        bytes_of(&ProcStart {
            header: head(record_kind::PROC_START, 1_000 + pid as u64, id),
            parent,
            start_boottime_ns: 5,
            pid_global: pid,
            pid,
            pid_own_ns: pid,
            ppid: 1,
            flags: 0,
            _pad0: 0,
            comm: comm(name),
        })
    }

    fn thread_end(id: u64, runtime: u64, kind: u32) -> Vec<u8> {
        bytes_of(&ThreadEnd {
            header: head(kind, 9_000, id),
            cpu_runtime_ns: runtime,
            cpu_utime_ns: 3,
            cpu_stime_ns: 1,
            disk_read_bytes: 10,
            disk_write_bytes: 20,
            disk_cancelled_write_bytes: 0,
            io_rchar: 30,
            io_wchar: 40,
            net_sent: 7,
            net_received: 9,
        })
    }

    fn exit(id: u64, status: u32, threads: u64) -> Vec<u8> {
        bytes_of(&ProcExit {
            header: head(record_kind::PROC_EXIT, 8_000, id),
            exit_code: status,
            _pad0: 0,
            mm_peak_pages: 7,
            threads,
            comm: comm(b"true"),
        })
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn records_make_processes_whose_parts_sum_up() {
        let out = Shared::default();
        let mut t = Tree::new(1_000, true, 10, Some(Box::new(out.clone())), UNITS);
        t.take(&start(0xa, 0, 100, b"sh"));
        t.take(&start(0xb, 0xa, 101, b"sh"));
        let mut argv = [0u8; ARGV_BYTES];
        argv[..14].copy_from_slice(b"/bin/true\0-x\0\0");
        let mut filename = [0u8; FILENAME_BYTES];
        filename[..9].copy_from_slice(b"/bin/true");
        t.take(&bytes_of(&ProcExec {
            header: head(record_kind::PROC_EXEC, 2_000, 0xb),
            old_mm_peak_pages: 0,
            pid: 101,
            argv_len: 13,
            argv_truncated: 0,
            _pad0: 0,
            comm: comm(b"true"),
            filename,
            argv,
        }));
        t.take(&exit(0xb, 3 << 8, 2));
        t.take(&thread_end(0xb, 500, record_kind::THREAD_END));
        assert!(
            !lock(&out.0).ends_with(b"}\n")
                || !String::from_utf8_lossy(&lock(&out.0)).contains("\"exit\""),
            "no exit event before every thread is in"
        );
        t.take(&thread_end(0xb, 700, record_kind::THREAD_END));
        let live = HashMap::from([(0xa, ([50, 0, 0, 0, 0, 0, 0, 0, 1, 2], 1))]);
        let ps = t.processes(&live, Measured::ALL);
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[1].comm, "true");
        assert_eq!(
            ps[1].argv.as_deref(),
            Some(&["/bin/true".to_string(), "-x".to_string()][..])
        );
        assert_eq!((ps[1].exit_code, ps[1].signal), (Some(3), None));
        assert_eq!(ps[1].cpu_time_ns, 1200);
        assert_eq!(ps[1].thread_count, 2);
        assert_eq!(ps[1].disk_bytes_written, Some(40));
        assert_eq!(ps[1].network_bytes_sent, Some(14));
        assert_eq!(
            ps[0].network_bytes_received,
            Some(2),
            "live threads' own counts"
        );
        assert_eq!(ps[1].peak_memory_bytes, Some(7 * 4096));
        assert_eq!(ps[1].start_ns, 101);
        assert_eq!(ps[1].end_ns, Some(7_000));
        assert_eq!(
            (ps[0].cpu_time_ns, ps[0].thread_count, ps[0].end_ns),
            (50, 1, None)
        );
        let text = String::from_utf8(lock(&out.0).clone()).unwrap();
        let kinds: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(kinds, ["start", "fork", "fork", "exec", "exit"]);
    }

    #[test]
    fn adopted_usage_is_taken_off() {
        let mut t = Tree::new(0, true, 10, None, UNITS);
        t.take(&start(0xa, 0, 100, b"job"));
        t.take(&thread_end(0xa, 400, record_kind::THREAD_ADOPTED));
        t.take(&exit(0xa, 9, 1));
        t.take(&thread_end(0xa, 1000, record_kind::THREAD_END));
        let ps = t.processes(&HashMap::new(), Measured::ALL);
        assert_eq!(ps[0].cpu_time_ns, 600);
        assert_eq!(ps[0].disk_bytes_read, Some(0));
        assert_eq!((ps[0].exit_code, ps[0].signal), (None, Some(9)));
    }

    #[test]
    fn the_limit_drops_and_counts() {
        let mut t = Tree::new(0, true, 2, None, UNITS);
        for i in 0..5 {
            t.take(&start(0x10 + i, 0, 100 + i as u32, b"x"));
        }
        t.take(&thread_end(0x14, 5, record_kind::THREAD_END));
        assert_eq!(t.processes(&HashMap::new(), Measured::ALL).len(), 2);
        assert_eq!(t.dropped(), 3);
    }

    #[test]
    fn garbage_records_are_ignored() {
        let mut t = Tree::new(0, true, 2, None, UNITS);
        t.take(&[]);
        t.take(&[1, 2, 3]);
        let mut short = start(0xa, 0, 1, b"x");
        short.truncate(30);
        t.take(&short);
        let mut unknown = start(0xa, 0, 1, b"x");
        unknown[0] = 99;
        t.take(&unknown);
        assert!(t.processes(&HashMap::new(), Measured::ALL).is_empty());
    }

    #[test]
    fn hostile_bytes_stay_valid_strings() {
        assert_eq!(escape_bytes(b"ok"), "ok");
        assert_eq!(escape_bytes(b"a\xffb"), "a\\xffb");
        assert_eq!(escape_bytes("é\n\x1b[2J".as_bytes()), "é\n\x1b[2J");
        assert_eq!(split_argv(b"a\0b\0"), ["a", "b"]);
        assert_eq!(split_argv(b"a\0b"), ["a", "b"]);
        assert!(split_argv(b"").is_empty());
        let json = serde_json::to_string(&split_argv(b"\x1b]0;x\x07\0\xfe")).unwrap();
        let back: Vec<String> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ["\x1b]0;x\x07", "\\xfe"]);
    }

    #[test]
    fn statuses_decode_like_wait() {
        assert_eq!(decode_status(0), (Some(0), None));
        assert_eq!(decode_status(3 << 8), (Some(3), None));
        assert_eq!(decode_status(9), (None, Some(9)));
        assert_eq!(decode_status(0x80 | 11), (None, Some(11)), "core dumped");
    }
}
