//! The per-process breakdown of a run (`--tree`) and its event stream (`--events`), built
//! from the records the kernel puts in the `RECORDS` ring buffer for the runs that ask.
//!
//! One reader drains the ring buffer for all runs of a [`crate::Tracker`] (on its own thread,
//! and on demand before a snapshot), and hands each record to its run's [`Breakdown`]. Records
//! are a breakdown: the totals never depend on them. A record the kernel could not write
//! counts in `lost_events`; a process beyond the tree's limit is dropped and counted too, and
//! so is one its memory [`Share`] cannot pay for (a daemon's per-user budget): a tree charges
//! its share with the bytes its tables and strings really take (see [`Breakdown::footprint`]).
//!
//! The event stream goes out in time order: `time_ns` never decreases. Records reach
//! userspace in the order their places in the ring buffer were reserved, each stamped a few
//! microseconds later, and an exit event can only be written once its threads' last records
//! (made at their final context switch, after the exit) are in. So a line waits in a reorder
//! buffer until no earlier line can come: until the reader has drained every record made up
//! to [`REORDER_MARGIN_NS`] before its drain began, and no exit at or before its time is
//! still waiting for its threads (at most [`EXIT_HOLD_NS`]; past that, the exit goes out with
//! what is known, marked `"incomplete": true`). The reader drains every 100 ms or sooner, so
//! a line goes out within about 120 ms of its time, or `EXIT_HOLD_NS` behind a stuck exit.
//! The buffer holds at most [`MAX_HELD_LINES`] lines and [`MAX_HELD_BYTES`] of text (a fork
//! storm): past that, the oldest go out at once, exits still waiting before them first.
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::io::Write;

use cylo_usage_abi::{
    ARGV_BYTES, Creds, ProcExec, ProcExit, ProcStart, RecordHeader, ThreadEnd, ThreadUsage,
    proc_flags, record_kind,
};

use crate::kernel::features::Measured;
use crate::kernel::records::{Consumer, read_record};
use crate::session::budget::{Limit, Share};
use crate::session::viewer::Viewer;
use crate::usage::{ProcessUsage, Units, split_runtime};

/// A process's argv as `/proc/PID/cmdline` showed it at its adoption: at most
/// [`cylo_usage_abi::ARGV_BYTES`] bytes (NUL-separated, as the exec records keep it), and whether more
/// were cut off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AdoptedArgv {
    pub bytes: Vec<u8>,
    pub truncated: bool,
}

/// How many processes a tree keeps by default; past it, processes are dropped from the
/// breakdown (and counted), so a fork bomb cannot exhaust the tracker's memory.
pub const DEFAULT_TREE_LIMIT: usize = 1_000_000;

/// What threads used: the ABI's counter set ([`ThreadUsage`], in ns and bytes), and the
/// TCP/UDP bytes they sent and received, which runs with records keep per thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Used {
    pub usage: ThreadUsage,
    pub net_sent: u64,
    pub net_received: u64,
}

impl Used {
    fn of(t: &ThreadEnd) -> Used {
        Used {
            usage: t.usage,
            net_sent: t.net_sent,
            net_received: t.net_received,
        }
    }

    /// Field by field, stopping at 0 (see [`ThreadUsage::saturating_sub`]).
    fn saturating_sub(self, o: Used) -> Used {
        Used {
            usage: self.usage.saturating_sub(o.usage),
            net_sent: self.net_sent.saturating_sub(o.net_sent),
            net_received: self.net_received.saturating_sub(o.net_received),
        }
    }
}

impl std::ops::AddAssign for Used {
    fn add_assign(&mut self, o: Used) {
        self.usage += o.usage;
        self.net_sent = self.net_sent.wrapping_add(o.net_sent);
        self.net_received = self.net_received.wrapping_add(o.net_received);
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
    /// `task_struct.start_boottime` (ns): with the pid, its identity in /proc.
    start_boottime_ns: u64,
    end_mono_ns: Option<u64>,
    status: Option<u32>,
    comm: Vec<u8>,
    filename: Option<Vec<u8>>,
    argv: Option<Vec<u8>>,
    argv_truncated: bool,
    adopted: bool,
    root: bool,
    /// Refused by its run's processes or threads budget: killed before it ran.
    refused: bool,
    /// Threads it had when it ended (from its exit record).
    threads: Option<u64>,
    threads_ended: u64,
    used: Used,
    before: Used,
    peak_pages: u64,
    exit_reported: bool,
    /// Its credentials from its last record that carried them.
    creds: Option<Creds>,
}

impl Proc {
    fn complete(&self) -> bool {
        self.threads.is_some_and(|n| self.threads_ended >= n)
    }
}

/// A destination for the NDJSON event stream, flushed line by line.
pub type EventSink = Box<dyn Write + Send>;

/// How far behind the start of a drain an event line waits for lines of earlier records
/// that may still be on their way (a record is stamped just after its place in the ring
/// buffer is reserved; one reserved before the drain and not yet submitted holds back the
/// records after it).
pub const REORDER_MARGIN_NS: u64 = 20_000_000;
/// The longest an exit event holds the stream back while its threads' last records come in.
pub const EXIT_HOLD_NS: u64 = 2_000_000_000;
/// The most event lines the reorder buffer holds, and the most bytes their text takes: a
/// fixed bound per session, apart from its memory share (a storm must not make the breakdown
/// drop processes to pay for lines that are about to go out).
pub const MAX_HELD_LINES: usize = 8_192;
pub const MAX_HELD_BYTES: u64 = 1 << 20;

/// The per-process records of one run.
pub struct Breakdown {
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
    /// Processes left out of the breakdown because of `limit` or of the memory share.
    dropped: u64,
    /// Of those, the ones the memory share could not pay for.
    dropped_for_memory: u64,
    /// Execs whose argv and file name were not kept because of the memory share.
    execs_unrecorded: u64,
    /// Free places in `procs` (events only: a process is forgotten once its exit is out).
    free: Vec<usize>,
    /// Where the tree's memory is charged, and how much is charged now.
    share: Share,
    charged: u64,
    /// Heap bytes of the processes' own strings (comm, argv, file name).
    strings: u64,
    events: Option<EventSink>,
    /// Why the event stream stopped, if it failed.
    events_error: Option<String>,
    /// Event lines waiting to go out in time order: (`time_ns`, arrival, line).
    held: BinaryHeap<Reverse<(u64, u64, String)>>,
    /// Heap bytes of the held lines' text.
    held_bytes: u64,
    /// Lines pushed so far (the arrival order, which breaks ties in time).
    arrivals: u64,
    /// Exits whose threads' records are not all in yet: (`time_ns` of the exit, process).
    waiting_exits: BTreeSet<(u64, u64)>,
    /// Set while the exits waiting before an overflowing buffer's oldest line are forced out.
    forcing: bool,
    /// Processes forgotten after their exit (events only): their CPU time, user and system
    /// (each process's own split), so the tree's split stays the sum of its processes'.
    forgotten_cpu: [u64; 3],
    /// A process was forgotten before all its threads' records were in: `forgotten_cpu`
    /// misses what came later.
    forgotten_incomplete: bool,
    /// What the kernel measures: figures it does not are null in events too.
    measured: Measured,
    units: Units,
    /// Who reads this tree, when the figures of some members must be withheld from them.
    viewer: Option<Viewer>,
}

impl Breakdown {
    /// A tree for a run that started at `started_mono_ns` (CLOCK_MONOTONIC), writing events to
    /// `events` if given.
    pub fn new(
        started_mono_ns: u64,
        keep: bool,
        limit: usize,
        events: Option<EventSink>,
        units: Units,
        share: Share,
    ) -> Breakdown {
        let mut tree = Breakdown {
            started_mono_ns,
            keep,
            procs: Vec::new(),
            by_id: HashMap::new(),
            limit,
            dropped: 0,
            dropped_for_memory: 0,
            execs_unrecorded: 0,
            free: Vec::new(),
            share,
            charged: 0,
            strings: 0,
            events,
            events_error: None,
            held: BinaryHeap::new(),
            held_bytes: 0,
            arrivals: 0,
            waiting_exits: BTreeSet::new(),
            forcing: false,
            forgotten_cpu: [0; 3],
            forgotten_incomplete: false,
            measured: Measured::ALL,
            units,
            viewer: None,
        };
        tree.anchor();
        tree
    }

    /// The first line of the stream: the kernel clock and the wall clock at the session's
    /// start, so `time_ns` can be placed in time.
    fn anchor(&mut self) {
        let realtime = realtime_ns();
        let mono = crate::sys::monotonic_ns();
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

    /// Queues an event line; it goes out in time order (see the module's documentation).
    fn emit(&mut self, line: serde_json::Value) {
        if self.events.is_none() {
            return;
        }
        let time = line["time_ns"].as_u64().unwrap_or(0);
        let mut text = line.to_string();
        text.push('\n');
        self.held_bytes += chunk(text.capacity()) as u64;
        self.arrivals += 1;
        self.held.push(Reverse((time, self.arrivals, text)));
        // A storm: the oldest lines go out now. An exit still waiting for its threads before
        // them goes out first, with what is known (its own line comes through here again,
        // without forcing further).
        while self.held.len() > MAX_HELD_LINES || self.held_bytes > MAX_HELD_BYTES {
            let oldest = self.held.peek().map_or(0, |Reverse((t, _, _))| *t);
            match self.waiting_exits.first().copied() {
                Some((t, id)) if t <= oldest && !self.forcing => {
                    self.waiting_exits.remove(&(t, id));
                    self.forcing = true;
                    self.report_exit(id, true);
                    self.forcing = false;
                }
                _ => self.write_oldest(),
            }
        }
    }

    /// Writes the held line of the earliest time.
    fn write_oldest(&mut self) {
        let Some(Reverse((_, _, text))) = self.held.pop() else {
            return;
        };
        self.held_bytes = self
            .held_bytes
            .saturating_sub(chunk(text.capacity()) as u64);
        let Some(out) = self.events.as_mut() else {
            return;
        };
        // Flushed after each batch of records (`flush`), so `tail -f` follows.
        if let Err(e) = out.write_all(text.as_bytes()) {
            // A closed pipe (`| head`) ends the stream, never the measurement.
            self.events_error = Some(e.to_string());
            self.events = None;
            self.held.clear();
            self.held_bytes = 0;
        }
    }

    /// Sends the exit events still waiting for their threads, up to `time_ns`, with what is
    /// known of them.
    fn force_exits_up_to(&mut self, time_ns: u64) {
        while let Some(&(t, id)) = self.waiting_exits.first() {
            if t > time_ns {
                break;
            }
            self.waiting_exits.remove(&(t, id));
            self.report_exit(id, true);
        }
    }

    /// Writes the held lines no earlier line can come before any more: a drain that began
    /// at `drain_start_mono_ns` (CLOCK_MONOTONIC) has delivered every record made before it.
    pub fn release(&mut self, drain_start_mono_ns: u64) {
        if self.events.is_none() {
            return;
        }
        let stale = self.rel(drain_start_mono_ns.saturating_sub(EXIT_HOLD_NS));
        let first_waiting = self.waiting_exits.first().map(|&(t, _)| t);
        if first_waiting.is_some_and(|t| t < stale) {
            self.force_exits_up_to(stale.saturating_sub(1));
        }
        let mut mark = self.rel(drain_start_mono_ns.saturating_sub(REORDER_MARGIN_NS));
        if let Some(&(t, _)) = self.waiting_exits.first() {
            mark = mark.min(t);
        }
        while self
            .held
            .peek()
            .is_some_and(|Reverse((t, _, _))| *t <= mark)
        {
            self.write_oldest();
        }
        self.shrink_held();
        self.settle();
    }

    /// Gives back the reorder buffer's room once a storm is over.
    fn shrink_held(&mut self) {
        if self.held.len() < self.held.capacity() / 4 {
            self.held.shrink_to(self.held.len() * 2);
        }
    }

    /// Writes every held line, exits still waiting included (the run is over).
    pub fn release_all(&mut self) {
        self.force_exits_up_to(u64::MAX);
        while !self.held.is_empty() {
            self.write_oldest();
        }
        self.shrink_held();
        self.flush();
        self.settle();
    }

    /// What the kernel measures on this machine: the event stream's figures it does not
    /// measure are null, as in the breakdown.
    pub fn set_measured(&mut self, measured: Measured) {
        self.measured = measured;
    }

    /// The `attached` event: the attach has registered the tree that was there (the moment
    /// `usage_before_attach` stops and the totals begin).
    pub fn note_attached(&mut self, processes: u64, threads: u64, passes: usize) {
        let now = crate::sys::monotonic_ns();
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

    /// The `budget` event: the run crossed a budget at `crossed_ns` (CLOCK_MONOTONIC), and is
    /// being killed.
    pub(crate) fn announce_budget(&mut self, e: &crate::usage::BudgetExceeded, crossed_ns: u64) {
        let line = serde_json::json!({
            "event": "budget",
            "time_ns": self.rel(crossed_ns),
            "resource": e.resource,
            "limit": e.limit,
            "observed": e.observed,
        });
        self.emit(line);
        self.flush();
    }

    /// Gives the processes present at an attach the argv the scan read from
    /// `/proc/PID/cmdline` (by pid and start time in ticks), where no exec record gave them
    /// one already, and where the memory share pays for it.
    pub(crate) fn note_adopted_argv(&mut self, argv: &HashMap<(u32, u64), AdoptedArgv>) {
        if argv.is_empty() {
            return;
        }
        let tick_ns = 1_000_000_000 / self.units.ticks_per_second.max(1);
        let wanted: Vec<(u64, &AdoptedArgv)> = self
            .procs
            .iter()
            .flatten()
            .filter(|p| p.adopted && p.argv.is_none())
            .filter_map(|p| Some((p.id, argv.get(&(p.pid, p.start_boottime_ns / tick_ns))?)))
            .collect();
        for (id, a) in wanted {
            let cost = chunk(a.bytes.len()) as u64;
            if self.share.try_take(cost).is_err() {
                self.execs_unrecorded += 1;
                continue;
            }
            self.charged += cost;
            self.with_proc(id, |p| {
                p.argv = Some(a.bytes.clone());
                p.argv_truncated = a.truncated;
            });
        }
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

    /// Withholds from now on, in the breakdown and the event stream, the figures of members
    /// `viewer` could not read itself (see [`Viewer::may_read`]).
    pub fn set_viewer(&mut self, viewer: Option<Viewer>) {
        self.viewer = viewer.filter(|v| v.uid != 0);
    }

    /// Whether the viewer may read `p`'s figures.
    fn readable(&self, p: &Proc) -> bool {
        self.viewer.is_none_or(|v| v.may_read(p.creds.as_ref()))
    }

    /// Processes left out of the breakdown because of the limit or the memory share.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// What the memory share cost the report: processes left out, execs whose argv was not
    /// kept, and the limit that refused them (`None`: nothing was refused).
    pub fn memory_refusals(&self) -> Option<(u64, u64, Limit)> {
        let limit = self.share.refused()?;
        Some((self.dropped_for_memory, self.execs_unrecorded, limit))
    }

    /// The bytes the tree takes on the heap: its tables by capacity (`procs`, `by_id`,
    /// `free`) and the processes' strings. What is charged to its memory share.
    pub fn footprint(&self) -> u64 {
        let procs = self.procs.capacity() * std::mem::size_of::<Option<Proc>>();
        let free = self.free.capacity() * std::mem::size_of::<usize>();
        (procs + free + table_bytes::<(u64, usize)>(self.by_id.capacity())) as u64 + self.strings
    }

    /// What adding one more process costs now: its place in `procs` (the whole growth when
    /// the vector is full) and in `by_id` (likewise), and its comm.
    fn admission_cost(&self, comm_len: usize) -> u64 {
        let entry = std::mem::size_of::<Option<Proc>>();
        let procs = if !self.free.is_empty() {
            0
        } else if self.procs.len() == self.procs.capacity() {
            // Vec doubles (at least 4 places).
            self.procs.capacity().max(4) * entry
        } else {
            0
        };
        let cap = self.by_id.capacity();
        let table = if self.by_id.len() == cap {
            table_bytes::<(u64, usize)>(cap.max(3) * 2 + 1) - table_bytes::<(u64, usize)>(cap)
        } else {
            0
        };
        (procs + table + chunk(comm_len)) as u64
    }

    /// Charges (or gives back) the difference between the footprint and what is charged:
    /// what admissions predicted, made exact.
    fn settle(&mut self) {
        let now = self.footprint();
        if now > self.charged {
            self.share.force_take(now - self.charged);
        } else {
            self.share.give_back(self.charged - now);
        }
        self.charged = now;
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
        let comm = trim_nul(&r.comm);
        let cost = self.admission_cost(comm.len());
        if self.share.try_take(cost).is_err() {
            self.dropped += 1;
            self.dropped_for_memory += 1;
            self.by_id.remove(&r.header.process);
            return;
        }
        self.charged += cost;
        let p = Proc {
            id: r.header.process,
            parent: self.by_id.get(&r.parent).copied(),
            pid: r.pid,
            own_pid: r.pid_own_ns,
            ppid: r.ppid,
            // A process present at an attach started before it (its record is made at its
            // adoption); others start at their record.
            start_mono_ns: if r.flags & proc_flags::ADOPTED != 0 && r.start_mono_ns != 0 {
                r.start_mono_ns
            } else {
                r.header.time_ns
            },
            start_boottime_ns: r.start_boottime_ns,
            comm: comm.to_vec(),
            adopted: r.flags & proc_flags::ADOPTED != 0,
            root: r.flags & proc_flags::ROOT != 0,
            refused: r.flags & proc_flags::REFUSED != 0,
            creds: Some(r.creds),
            ..Proc::default()
        };
        let line = self.events.is_some().then(|| {
            serde_json::json!({
                "event": "fork",
                "time_ns": self.rel(r.header.time_ns),
                "pid": r.pid,
                "ns_pid": (r.pid_own_ns != r.pid).then_some(r.pid_own_ns),
                "ppid": r.ppid,
                "comm": escape_bytes(&p.comm),
                "root": p.root,
                "attached": p.adopted,
            })
        });
        self.strings += strings_of(&p);
        match self.free.pop() {
            Some(i) => {
                self.by_id.insert(p.id, i);
                self.procs[i] = Some(p);
            }
            None => {
                self.by_id.insert(p.id, self.procs.len());
                self.procs.push(Some(p));
            }
        }
        self.settle();
        if let Some(line) = line {
            self.emit(line);
        }
    }

    fn get(&mut self, id: u64) -> Option<&mut Proc> {
        let i = *self.by_id.get(&id)?;
        self.procs.get_mut(i)?.as_mut()
    }

    /// Changes process `id` with `f`, keeping the count of string bytes right.
    fn with_proc<R>(&mut self, id: u64, f: impl FnOnce(&mut Proc) -> R) -> Option<R> {
        let p = self.get(id)?;
        let old = strings_of(p);
        let out = f(p);
        let new = strings_of(p);
        self.strings = self.strings.saturating_sub(old) + new;
        Some(out)
    }

    fn on_exec(&mut self, r: &ProcExec) {
        let len = (r.argv_len as usize).min(ARGV_BYTES);
        let argv = r.argv[..len].to_vec();
        let filename = trim_nul(&r.filename).to_vec();
        let comm = trim_nul(&r.comm).to_vec();
        let time_ns = self.rel(r.header.time_ns);
        let Some(old) = self.get(r.header.process).map(|p| strings_of(p)) else {
            return;
        };
        let new =
            (chunk(argv.capacity()) + chunk(filename.capacity()) + chunk(comm.capacity())) as u64;
        // argv and the file name are kept if the share pays for them; the event goes out
        // either way.
        let keep = new <= old || self.share.try_take(new - old).is_ok();
        if keep && new > old {
            self.charged += new - old;
        }
        if !keep {
            self.execs_unrecorded += 1;
        }
        let viewer = self.viewer;
        let line = self.with_proc(r.header.process, |p| {
            p.comm = comm;
            p.pid = r.pid;
            p.peak_pages = p.peak_pages.max(r.old_mm_peak_pages);
            p.argv_truncated = r.argv_truncated != 0;
            p.creds = Some(r.creds);
            let withheld = viewer.is_some_and(|v| !v.may_read(p.creds.as_ref()));
            let mut line = serde_json::json!({
                "event": "exec",
                "time_ns": time_ns,
                "pid": r.pid,
                "comm": escape_bytes(&p.comm),
                "filename": (!withheld).then(|| escape_bytes(&filename)),
                "argv": (!withheld).then(|| split_argv(&argv)),
                "argv_truncated": p.argv_truncated,
            });
            if withheld {
                line["withheld"] = true.into();
            }
            if keep {
                p.argv = Some(argv);
                p.filename = Some(filename);
            } else {
                p.argv = None;
                p.filename = None;
            }
            line
        });
        self.settle();
        if let Some(line) = line {
            self.emit(line);
        }
    }

    fn on_exit(&mut self, r: &ProcExit) {
        let found = self.with_proc(r.header.process, |p| {
            p.end_mono_ns = Some(r.header.time_ns);
            p.status = Some(r.exit_code);
            let comm = trim_nul(&r.comm);
            if !comm.is_empty() && comm != p.comm.as_slice() {
                p.comm = comm.to_vec();
            }
            p.peak_pages = p.peak_pages.max(r.mm_peak_pages);
            p.threads = Some(r.threads);
        });
        if found.is_none() {
            return;
        }
        self.settle();
        if !self.report_exit(r.header.process, false) && self.events.is_some() {
            // Its threads' last records come after it: the stream waits for them.
            self.waiting_exits
                .insert((self.rel(r.header.time_ns), r.header.process));
        }
    }

    fn on_thread(&mut self, r: &ThreadEnd) {
        let v = Used::of(r);
        let Some(p) = self.get(r.header.process) else {
            return;
        };
        if r.header.kind == record_kind::THREAD_ADOPTED {
            p.before += v;
        } else {
            p.used += v;
            p.threads_ended += 1;
        }
        self.report_exit(r.header.process, false);
    }

    /// The exit event, once the process has ended and all its threads' records are in (or,
    /// with `force`, once it has ended, with what is known: marked `"incomplete": true`).
    /// It carries every field of the process's breakdown entry (`parent_index` is null: the
    /// stream names processes by pid). Returns whether the exit is out.
    fn report_exit(&mut self, id: u64, force: bool) -> bool {
        let Some(&i) = self.by_id.get(&id) else {
            return false;
        };
        let Some(p) = self.procs[i].as_ref() else {
            return false;
        };
        if p.exit_reported {
            return true;
        }
        let complete = p.complete();
        if p.end_mono_ns.is_none() || !(complete || force) {
            return false;
        }
        let end = p.end_mono_ns.map(|e| self.rel(e)).unwrap_or(0);
        self.waiting_exits.remove(&(end, id));
        let mut u = self.usage_of(p, &Used::default(), self.measured);
        u.parent_index = None;
        // Without a stream (a run's split alone), no line is made.
        let line = self.events.is_some().then(|| {
            let mut line = serde_json::to_value(&u).unwrap_or_default();
            line["event"] = "exit".into();
            line["time_ns"] = end.into();
            if !complete {
                line["incomplete"] = true.into();
            }
            line
        });
        if self.keep {
            if let Some(p) = self.procs[i].as_mut() {
                p.exit_reported = true;
            }
        } else {
            // Events only: forgotten, and its place reused.
            for (total, v) in
                self.forgotten_cpu
                    .iter_mut()
                    .zip([u.cpu_time_ns, u.cpu_user_ns, u.cpu_system_ns])
            {
                *total += v;
            }
            self.forgotten_incomplete |= !complete;
            if let Some(p) = self.procs[i].take() {
                self.strings = self.strings.saturating_sub(strings_of(&p));
            }
            self.by_id.remove(&id);
            self.free.push(i);
            self.settle();
        }
        if let Some(line) = line {
            self.emit(line);
        }
        true
    }

    /// `p`'s figures, with `live` (what its live threads have used, from /proc) added and
    /// what it had used before an attach taken off.
    fn usage_of(&self, p: &Proc, live: &Used, measured: Measured) -> ProcessUsage {
        let mut used = p.used;
        used += *live;
        let c = used.saturating_sub(p.before);
        let u = c.usage;
        let (user, system) = split_runtime(u.cpu_runtime_ns, u.cpu_utime_ns, u.cpu_stime_ns);
        let (exit_code, signal) = match p.status {
            Some(s) => decode_status(s),
            None => (None, None),
        };
        let argv = p.argv.as_deref().map(split_argv);
        let mut u = ProcessUsage {
            pid: p.pid as libc::pid_t,
            ns_pid: (p.own_pid != p.pid && p.own_pid != 0).then_some(p.own_pid as libc::pid_t),
            ppid: p.ppid as libc::pid_t,
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
            cpu_time_ns: u.cpu_runtime_ns,
            cpu_user_ns: user,
            cpu_system_ns: system,
            disk_bytes_read: Some(u.disk_read_bytes),
            disk_bytes_written: Some(u.disk_write_bytes),
            disk_cancelled_write_bytes: Some(u.disk_cancelled_write_bytes),
            io_read_chars: Some(u.io_rchar),
            io_write_chars: Some(u.io_wchar),
            peak_memory_bytes: measured
                .atomics
                .then_some(p.peak_pages * self.units.page_size),
            network_bytes_sent: measured.network.is_some().then_some(c.net_sent),
            network_bytes_received: measured.network.is_some().then_some(c.net_received),
            withheld: false,
            refused: p.refused,
        };
        if !measured.disk {
            u.disk_bytes_read = None;
            u.disk_bytes_written = None;
            u.disk_cancelled_write_bytes = None;
        }
        if !measured.io_chars {
            u.io_read_chars = None;
            u.io_write_chars = None;
        }
        if !self.readable(p) {
            withhold(&mut u);
        }
        u
    }

    /// The tree's CPU time, user and system, as the sums of its processes' own splits (each
    /// [`crate::usage::split_runtime`] of its thread group's figures), live threads' figures
    /// (`live`, by process identity) added. `None` when some process's figures are missing
    /// (left out of the breakdown, or forgotten before all its records were in).
    pub fn cpu_split(&self, live: &HashMap<u64, (Used, u64)>) -> Option<[u64; 3]> {
        if self.dropped > 0 || self.forgotten_incomplete {
            return None;
        }
        let mut total = self.forgotten_cpu;
        for p in self.procs.iter().flatten() {
            let (l, _) = live.get(&p.id).copied().unwrap_or_default();
            let c = (p.used.usage + l.usage).saturating_sub(p.before.usage);
            let (user, system) = split_runtime(c.cpu_runtime_ns, c.cpu_utime_ns, c.cpu_stime_ns);
            for (t, v) in total.iter_mut().zip([c.cpu_runtime_ns, user, system]) {
                *t += v;
            }
        }
        Some(total)
    }

    /// The breakdown: every process in start order, with the live threads' figures (by
    /// process identity) added, and the counters the kernel does not measure set to `None`.
    pub fn processes(
        &self,
        live: &HashMap<u64, (Used, u64)>,
        measured: Measured,
    ) -> Vec<ProcessUsage> {
        self.procs
            .iter()
            .flatten()
            .map(|p| {
                let (counters, threads) = live.get(&p.id).copied().unwrap_or_default();
                let mut u = self.usage_of(p, &counters, measured);
                if p.end_mono_ns.is_none() {
                    u.thread_count = p.threads_ended + threads;
                }
                u
            })
            .collect()
    }
}

impl Drop for Breakdown {
    /// The end of the session: what the event stream still holds goes out.
    fn drop(&mut self) {
        if self.events.is_some() {
            self.release_all();
        }
    }
}

/// Heap bytes of a process's own strings, as the allocator hands them out (see
/// [`chunk`]).
fn strings_of(p: &Proc) -> u64 {
    (chunk(p.comm.capacity())
        + p.argv.as_ref().map_or(0, |v| chunk(v.capacity()))
        + p.filename.as_ref().map_or(0, |v| chunk(v.capacity()))) as u64
}

/// What an allocation of `n` bytes takes from the heap: glibc's malloc gives a chunk of the
/// request plus an 8-byte header, in steps of 16 bytes, at least 32 (the small strings of a
/// process cost about twice their length).
fn chunk(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    ((n + 8 + 15) & !15).max(32)
}

/// Heap bytes of a `std::collections::HashMap` of entries `T` with room for `capacity`
/// entries (hashbrown: a power-of-two number of buckets at most 7/8 full, each an entry and
/// a control byte, plus one group of control bytes).
fn table_bytes<T>(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity * 8 / 7).next_power_of_two()
    };
    buckets * (std::mem::size_of::<T>() + 1) + 16
}

/// Blanks what the kernel would not show a viewer who may not read the process: its I/O
/// counters (`/proc/PID/io`), its socket traffic, and its argv and file name. CPU time, peak
/// memory, comm, pids and exit status stay: `/proc/PID/stat` and `/proc/PID/status` show them
/// to every user.
fn withhold(u: &mut ProcessUsage) {
    u.withheld = true;
    u.argv = None;
    u.argv_truncated = false;
    u.filename = None;
    u.disk_bytes_read = None;
    u.disk_bytes_written = None;
    u.disk_cancelled_write_bytes = None;
    u.io_read_chars = None;
    u.io_write_chars = None;
    u.network_bytes_sent = None;
    u.network_bytes_received = None;
}

/// The note a report carries when `withheld` members of its breakdown had their figures
/// withheld from the client.
pub fn withheld_note(withheld: usize) -> String {
    format!(
        "{withheld} process{} ran with credentials this client does not have: {} I/O counters, \
         argv and file name are withheld (null), as the kernel withholds /proc/PID/io; the \
         totals include them",
        if withheld == 1 { "" } else { "es" },
        if withheld == 1 { "its" } else { "their" },
    )
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

fn trim_nul(bytes: &[u8]) -> &[u8] {
    match bytes.iter().position(|&b| b == 0) {
        Some(n) => &bytes[..n],
        None => bytes,
    }
}

/// Bytes as a string that says exactly which bytes they were: valid UTF-8 as it is but for
/// the backslash, written `\\`, and each byte that is not UTF-8 as `\xNN` (so an argument
/// `\xff` and the byte 0xff read differently). JSON escaping of control characters is the
/// serialiser's job; the human report escapes them again.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid();
        if valid.contains('\\') {
            out.push_str(&valid.replace('\\', "\\\\"));
        } else {
            out.push_str(valid);
        }
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

impl Consumer for Breakdown {
    fn take(&mut self, bytes: &[u8]) {
        Breakdown::take(self, bytes);
    }

    fn release(&mut self, before_ns: u64) {
        Breakdown::release(self, before_ns);
    }

    fn flush(&mut self) {
        Breakdown::flush(self);
    }
}

#[cfg(test)]
mod tests;
