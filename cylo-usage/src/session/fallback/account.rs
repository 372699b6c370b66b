//! The /proc fallback's arithmetic, apart from any I/O: what the reaper's records and the
//! samples of `/proc` add up to, and the notes that say which figures are approximate.
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::proc::walker::{Detail, Node};
use crate::usage::{
    BudgetExceeded, Budgets, CpuSplit, EnforcedBy, Resource, ResourceUsage, TrackerKind,
    UsageBeforeAttach, split_runtime,
};
use cylo_usage_abi::ThreadUsage;

use super::reaper::Record;

/// Facts about the machine and the session that the figures need.
#[derive(Clone, Copy, Debug)]
pub struct Units {
    pub tick_ns: u64,
    pub page_size: u64,
    pub interval: Duration,
}

/// "10 ms", "1.5 s".
pub fn interval_text(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1000.0 {
        format!("{} ms", (ms * 1000.0).round() / 1000.0)
    } else {
        format!("{} s", (ms / 10.0).round() / 100.0)
    }
}

/// The counts that samples of `/proc` can only undercount (a process or thread that lives
/// between two samples is missed): a report's `lower_bounds` wherever they are sampled.
pub(crate) const SAMPLED_COUNTS: [&str; 3] =
    ["process_count", "thread_count", "peak_process_count"];

/// [`SAMPLED_COUNTS`] as a report's `lower_bounds`.
pub(crate) fn sampled_counts() -> Vec<String> {
    SAMPLED_COUNTS.iter().map(|f| f.to_string()).collect()
}

/// What the reaper's records add up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    pub count: u64,
    pub utime_us: u64,
    pub stime_us: u64,
    pub maxrss_kb: u64,
    pub inblock: u64,
    pub oublock: u64,
}

/// A spawned run: records of what the reaper reaped, and samples of the live tree.
#[derive(Debug, Default)]
pub struct Account {
    /// Every process seen in a sample or reaped, by pid and start time.
    seen: HashSet<(u32, u64)>,
    /// Every thread seen in a sample: process identity and thread id.
    threads: HashSet<(u32, u64, u32)>,
    /// Processes the reaper reaped that no sample had seen (one thread each, at least).
    unseen_reaped: u64,
    /// Reaped processes whose start time could not be read, and whose pid no sample saw.
    unkeyed_reaped: u64,
    pub reaped: Reaped,
    /// The most processes alive in one sample, and their largest summed RSS (bytes).
    peak_live: u64,
    peak_rss: u64,
    /// The last sample's.
    pub live: u64,
    pub rss: u64,
    pub samples: u64,
}

/// Whether a sample counts a node as alive (zombies are not).
fn alive(n: &Node) -> bool {
    !n.stat.is_zombie()
}

impl Account {
    /// Takes in a sample of the tree (the reaper itself left out).
    pub fn observe(&mut self, nodes: &[Node], page_size: u64) {
        let mut live = 0;
        let mut rss = 0;
        for n in nodes {
            let key = n.key();
            self.seen.insert(key);
            for &tid in &n.tids {
                self.threads.insert((key.0, key.1, tid));
            }
            if alive(n) {
                live += 1;
                rss += n.stat.rss_pages * page_size;
            }
        }
        self.live = live;
        self.rss = rss;
        self.peak_live = self.peak_live.max(live);
        self.peak_rss = self.peak_rss.max(rss);
        self.samples += 1;
    }

    /// Takes in a process the reaper reaped.
    pub fn reap(&mut self, r: &Record) {
        let pid = r.pid as u32;
        if r.start_ticks == 0 {
            // Without its start time it cannot be told from a process a sample saw with the
            // same pid: it is taken for that one, so the count never exceeds the truth.
            if !self.seen.iter().any(|&(p, _)| p == pid) {
                self.unkeyed_reaped += 1;
                self.unseen_reaped += 1;
            }
        } else if self.seen.insert((pid, r.start_ticks)) {
            self.unseen_reaped += 1;
        }
        let t = &mut self.reaped;
        t.count += 1;
        t.utime_us += r.utime_us;
        t.stime_us += r.stime_us;
        t.maxrss_kb = t.maxrss_kb.max(r.maxrss_kb);
        t.inblock += r.inblock;
        t.oublock += r.oublock;
    }

    pub fn process_count(&self) -> u64 {
        self.seen.len() as u64 + self.unkeyed_reaped
    }

    pub fn thread_count(&self) -> u64 {
        self.threads.len() as u64 + self.unseen_reaped
    }
}

/// What a tree has used, as far as the fallback knows at one moment: the figures its
/// budgets are checked against (`--budgets best-effort`). Each is the report's own figure
/// (or a part of it: a lower bound, never more than the report would say); `None` where it
/// is not known at that moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    pub processes: u64,
    pub threads: u64,
    pub cpu_ns: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub disk_write_bytes: Option<u64>,
    pub disk_read_bytes: Option<u64>,
}

impl Figures {
    /// The figure of `resource` (the fallback has none for the network).
    pub fn of(&self, resource: Resource) -> Option<u64> {
        match resource {
            Resource::Processes => Some(self.processes),
            Resource::Threads => Some(self.threads),
            Resource::CpuTime => self.cpu_ns,
            Resource::Memory => self.memory_bytes,
            Resource::DiskWrite => self.disk_write_bytes,
            Resource::DiskRead => self.disk_read_bytes,
            // No network counters; the share of the eBPF tracker's maps is not the fallback's.
            Resource::Network | Resource::TasksAlive => None,
        }
    }

    /// The first budget (in report order) these figures are past, as a sample saw it.
    pub fn crossed(&self, budgets: &Budgets) -> Option<BudgetExceeded> {
        budgets.resources().find_map(|resource| {
            let limit = budgets.limit(resource)?;
            let observed = self.of(resource)?;
            (observed > limit).then_some(BudgetExceeded {
                resource,
                limit,
                observed,
                enforced: EnforcedBy::Sampled,
            })
        })
    }
}

impl Account {
    /// The figures now: `reaped` (the reaper's totals, by default this account's own) plus,
    /// when given, the live processes read in detail (CPU and disk, as [`Account::usage`]
    /// adds them). Without `live`, CPU and disk are the reaped part alone (a lower bound).
    /// The memory is the last sample's sum of RSS.
    pub fn figures(&self, reaped: Option<&Reaped>, live: Option<Live<'_>>) -> Figures {
        let r = reaped.unwrap_or(&self.reaped);
        let mut cpu = (r.utime_us + r.stime_us) * 1000;
        let mut read = r.inblock * 512;
        let mut written = r.oublock * 512;
        for (_, d) in live.unwrap_or_default() {
            cpu += d.own_cpu_ns + d.waited_cpu_ns;
            if let Some(io) = d.io {
                read += io.read_bytes;
                written += io.write_bytes;
            }
        }
        Figures {
            processes: self.process_count(),
            threads: self.thread_count(),
            cpu_ns: Some(cpu),
            memory_bytes: (self.samples > 0).then_some(self.rss),
            disk_write_bytes: Some(written),
            disk_read_bytes: Some(read),
        }
    }
}

/// The note of a run whose budgets the fallback enforces from its samples.
pub fn budget_note(units: Units) -> String {
    let every = interval_text(units.interval);
    format!(
        "budgets, budget_exceeded: enforced by cylo-usage from its /proc samples every \
         {every} (--budgets best-effort), not by the kernel at the crossing: a crossing is seen \
         up to a sampling interval late, plus the time to read the tree (longer for a large \
         tree on a busy host), the tree running on meanwhile, and observed is the figure of \
         the sample that saw it; processes and threads that start and end between two samples \
         are missed; CPU time, memory and disk bytes are checked against this report's own \
         figures at each sample (memory: the sum of the processes' RSS, an address space \
         shared by several processes counted once per process)"
    )
}

/// The notes of a spawned fallback run; `live`: the tree still runs.
pub fn run_notes(reason: &str, units: Units, live: bool) -> Vec<String> {
    let every = interval_text(units.interval);
    let mut notes = vec![
        format!(
            "tracker: the /proc fallback, because the eBPF programs cannot be loaded ({reason}); \
             the kernel's wait4() accounting of everything the tracker reaps, plus /proc \
             sampled every {every}"
        ),
        "cpu_time_ns, cpu_user_ns, cpu_system_ns: wait4() rusage of every process the tracker \
         reaped (a subreaper: orphans and daemons come back to it), which includes every \
         descendant each of them waited for, to the microsecond; processes reaped \
         automatically (their parent ignored SIGCHLD or set SA_NOCLDWAIT) are missed"
            .to_string(),
        "disk_bytes_read, disk_bytes_written: wait4() rusage (ru_inblock, ru_oublock: the \
         task I/O accounting in 512-byte units), with the same blind spot as the CPU time"
            .to_string(),
        format!(
            "process_count, thread_count: what /proc samples every {every} saw, plus every \
             process the tracker reaped; processes and threads that start and end between two \
             samples, and are waited for inside the tree, are missed"
        ),
        format!("peak_process_count: the most processes alive in one sample (every {every})"),
        format!(
            "peak_memory_bytes: the largest sum of the processes' RSS in one sample (every \
             {every}): shorter peaks are missed, and an address space shared by several \
             processes (vfork, CLONE_VM) counts once per process"
        ),
        "max_process_rss_bytes: wait4()'s ru_maxrss; for the root, it includes the tracker's \
         memory that the root has between its fork and its exec"
            .to_string(),
        "disk_cancelled_write_bytes, disk_devices, io_read_chars, io_write_chars, \
         network_bytes_sent, network_bytes_received: null: wait4() does not report them and \
         /proc loses them when a process exits"
            .to_string(),
    ];
    if live {
        notes.push(
            "cpu_time_ns, disk_bytes_read, disk_bytes_written, memory_bytes: the tree still \
             runs: its live processes are read from /proc now (CPU: schedstat ns of live \
             threads, clock ticks for exited threads and reaped children; disk: /proc/PID/io, \
             in which children reaped by a live parent are missing until that parent is \
             reaped; memory: the sum of their RSS)"
                .to_string(),
        );
    }
    notes
}

/// A snapshot of the live tree, read in detail (for [`Account::usage`] while the tree runs).
pub type Live<'a> = &'a [(Node, Detail)];

/// What is known of the root's end.
#[derive(Clone, Copy, Debug, Default)]
pub struct RootEnd {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

impl RootEnd {
    pub fn from_wait_status(status: i32) -> RootEnd {
        if libc::WIFEXITED(status) {
            RootEnd {
                exit_code: Some(libc::WEXITSTATUS(status)),
                signal: None,
            }
        } else if libc::WIFSIGNALED(status) {
            RootEnd {
                exit_code: None,
                signal: Some(libc::WTERMSIG(status)),
            }
        } else {
            RootEnd::default()
        }
    }
}

impl Account {
    /// The report: the reaper's totals, plus (while the tree runs) the live processes.
    pub fn usage(
        &self,
        reason: &str,
        units: Units,
        live: Option<Live<'_>>,
        root: RootEnd,
        wall_time_ms: u64,
    ) -> ResourceUsage {
        let r = &self.reaped;
        let mut u = ResourceUsage::unmeasured(TrackerKind::Proc);
        let mut cpu = r.utime_us * 1000 + r.stime_us * 1000;
        let (mut user, mut system) = (r.utime_us * 1000, r.stime_us * 1000);
        let mut read = r.inblock * 512;
        let mut written = r.oublock * 512;
        let mut max_rss = r.maxrss_kb * 1024;
        let mut live_count = 0;
        let mut rss = 0;
        if let Some(live) = live {
            let (mut lcpu, mut lu, mut ls) = (0, 0, 0);
            for (n, d) in live {
                // Each process's own split (its /proc ticks are the kernel's adjusted split
                // already), scaled to its precise runtime; the tree's is the sum.
                let cpu = d.own_cpu_ns + d.waited_cpu_ns;
                let (user, system) = split_runtime(cpu, d.user_ticks, d.system_ticks);
                lcpu += cpu;
                lu += user;
                ls += system;
                if let Some(io) = d.io {
                    read += io.read_bytes;
                    written += io.write_bytes;
                }
                max_rss = max_rss.max(d.hwm_bytes.unwrap_or(0));
                if alive(n) {
                    live_count += 1;
                    rss += n.stat.rss_pages * units.page_size;
                }
            }
            cpu += lcpu;
            user += lu;
            system += ls;
        }
        u.cpu_time_ns = cpu;
        u.cpu_time_ms = cpu / 1_000_000;
        u.cpu_user_ns = user;
        u.cpu_system_ns = system;
        // wait4's figures of each reaped process, and each live one's own split.
        u.cpu_split = CpuSplit::PerProcess;
        u.process_count = self.process_count();
        u.thread_count = self.thread_count();
        // A tree too short-lived for any sample to see it alive still had its root alive.
        let least = u64::from(u.process_count > 0);
        u.peak_process_count = Some(self.peak_live.max(live_count).max(least));
        u.live_process_count = live_count;
        u.disk_bytes_read = Some(read);
        u.disk_bytes_written = Some(written);
        u.memory_bytes = Some(rss);
        u.peak_memory_bytes = Some(self.peak_rss.max(rss));
        u.max_process_rss_bytes = Some(max_rss);
        u.precision_notes = run_notes(reason, units, live.is_some());
        u.lower_bounds = sampled_counts();
        u.exit_code = root.exit_code;
        u.signal = root.signal;
        u.wall_time_ms = wall_time_ms;
        u
    }
}

/// What one process had used at its last sample (for an attached run).
#[derive(Clone, Copy, Debug, Default)]
struct Member {
    ppid: u32,
    /// Own CPU and CPU of the children it waited for, ns.
    own: u64,
    waited: u64,
    user_ticks: u64,
    system_ticks: u64,
    /// Its I/O (the I/O part of the ABI's counter set), where the kernel keeps it.
    io: Option<ThreadUsage>,
    present: bool,
    zombie: bool,
}

/// An attached run: nothing is reaped by the tracker, everything is sampled.
///
/// The tree's CPU at a sample is what its present processes have used (own and waited-for
/// children), plus the last sample of each process that has ended and that no present
/// process of the tree could have waited for (its parent is gone or outside the tree: the
/// root, orphans); a process whose parent is present is counted in that parent's
/// waited-for time from its end on. I/O never moves to a parent in /proc, so every ended
/// process's last sample counts. Figures are since the first sample (the attach).
#[derive(Debug, Default)]
pub struct AttachAccount {
    members: HashMap<(u32, u64), Member>,
    threads: HashSet<(u32, u64, u32)>,
    ended_cpu: u64,
    ended_user_ticks: u64,
    ended_system_ticks: u64,
    ended_io: ThreadUsage,
    before: Option<UsageBeforeAttach>,
    before_ticks: (u64, u64),
    peak_live: u64,
    peak_rss: u64,
    rss: u64,
    live: u64,
    io_known: bool,
    root: Option<(u32, u64)>,
    root_status: Option<i32>,
    /// Members that have ended.
    gone: u64,
}

impl AttachAccount {
    /// Takes in a sample of the whole tree (every present member, read in detail).
    pub fn observe(&mut self, sample: Live<'_>, page_size: u64) {
        let first = self.before.is_none();
        for m in self.members.values_mut() {
            m.present = false;
        }
        let mut live = 0;
        let mut rss = 0;
        if first {
            self.io_known = sample.iter().all(|(_, d)| d.io.is_some());
            self.root = sample.first().map(|(n, _)| n.key());
        }
        for (n, d) in sample {
            let key = n.key();
            for &tid in &n.tids {
                self.threads.insert((key.0, key.1, tid));
            }
            if n.stat.is_zombie() {
                if Some(key) == self.root && self.root_status.is_none() {
                    self.root_status = n.stat.exit_code;
                }
            } else {
                live += 1;
                rss += n.stat.rss_pages * page_size;
            }
            self.members.insert(
                key,
                Member {
                    ppid: n.stat.ppid,
                    own: d.own_cpu_ns,
                    waited: d.waited_cpu_ns,
                    user_ticks: d.user_ticks,
                    system_ticks: d.system_ticks,
                    io: d.io.map(|io| io.usage()),
                    present: true,
                    zombie: n.stat.is_zombie(),
                },
            );
        }
        // Processes that ended since the last sample.
        let present_pids: HashSet<u32> = self
            .members
            .iter()
            .filter(|(_, m)| m.present)
            .map(|(k, _)| k.0)
            .collect();
        let ended: Vec<(u32, u64)> = self
            .members
            .iter()
            .filter(|(_, m)| !m.present)
            .map(|(k, _)| *k)
            .collect();
        for key in ended {
            let m = self.members.remove(&key).expect("listed above");
            if !present_pids.contains(&m.ppid) {
                self.ended_cpu += m.own + m.waited;
                self.ended_user_ticks += m.user_ticks;
                self.ended_system_ticks += m.system_ticks;
            }
            if let Some(io) = m.io {
                self.ended_io += io;
            }
            // Ended members stay counted (process_count) through `gone`.
            self.gone += 1;
        }
        self.live = live;
        self.rss = rss;
        self.peak_live = self.peak_live.max(live);
        self.peak_rss = self.peak_rss.max(rss);
        if first {
            let (cpu, u, s, io) = self.totals();
            let (user, system) = split_runtime(cpu, u, s);
            self.before_ticks = (u, s);
            self.before = Some(UsageBeforeAttach {
                process_count: self.members.len() as u64,
                thread_count: self.threads.len() as u64,
                cpu_time_ns: cpu,
                cpu_user_ns: user,
                cpu_system_ns: system,
                disk_bytes_read: self.io_known.then_some(io.disk_read_bytes),
                disk_bytes_written: self.io_known.then_some(io.disk_write_bytes),
                disk_cancelled_write_bytes: self.io_known.then_some(io.disk_cancelled_write_bytes),
                io_read_chars: self.io_known.then_some(io.io_rchar),
                io_write_chars: self.io_known.then_some(io.io_wchar),
            });
        }
    }

    /// Everything the tree has used up to the last sample: (CPU ns, user ticks, system
    /// ticks, I/O).
    fn totals(&self) -> (u64, u64, u64, ThreadUsage) {
        let mut cpu = self.ended_cpu;
        let (mut u, mut s) = (self.ended_user_ticks, self.ended_system_ticks);
        let mut io = self.ended_io;
        for m in self.members.values() {
            cpu += m.own + m.waited;
            u += m.user_ticks;
            s += m.system_ticks;
            if let Some(i) = m.io {
                io += i;
            }
        }
        (cpu, u, s, io)
    }

    /// The figures at the last sample (since the attach, as [`AttachAccount::usage`] gives
    /// them); `None` before the first.
    pub fn figures(&self) -> Option<Figures> {
        let before = self.before.as_ref()?;
        let (cpu, _, _, io) = self.totals();
        let since = |now: u64, then: Option<u64>| {
            self.io_known.then(|| now.saturating_sub(then.unwrap_or(0)))
        };
        Some(Figures {
            processes: self.members.len() as u64 + self.gone,
            threads: self.threads.len() as u64,
            cpu_ns: Some(cpu.saturating_sub(before.cpu_time_ns)),
            memory_bytes: Some(self.rss),
            disk_write_bytes: since(io.disk_write_bytes, before.disk_bytes_written),
            disk_read_bytes: since(io.disk_read_bytes, before.disk_bytes_read),
        })
    }

    /// Whether every process of the tree has ended (zombies have).
    pub fn finished(&self) -> bool {
        self.before.is_some() && self.members.values().all(|m| m.zombie)
    }

    /// Whether the root has ended, and its wait status if a sample saw it as a zombie.
    pub fn root_end(&self) -> (bool, Option<i32>) {
        let ended = self
            .root
            .is_none_or(|k| self.members.get(&k).is_none_or(|m| m.zombie));
        (ended, self.root_status)
    }

    /// Every member known now (for the next sample's seeds).
    pub fn known(&self) -> Vec<(u32, u64)> {
        let mut v: Vec<(u32, u64)> = self.members.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn usage(&self, units: Units, wall_time_ms: u64) -> ResourceUsage {
        let mut u = ResourceUsage::unmeasured(TrackerKind::Proc);
        let before = self.before.clone().unwrap_or(UsageBeforeAttach {
            process_count: 0,
            thread_count: 0,
            cpu_time_ns: 0,
            cpu_user_ns: 0,
            cpu_system_ns: 0,
            disk_bytes_read: None,
            disk_bytes_written: None,
            disk_cancelled_write_bytes: None,
            io_read_chars: None,
            io_write_chars: None,
        });
        let (cpu, ut, st, io) = self.totals();
        let cpu = cpu.saturating_sub(before.cpu_time_ns);
        let (user, system) = split_runtime(
            cpu,
            ut.saturating_sub(self.before_ticks.0),
            st.saturating_sub(self.before_ticks.1),
        );
        let since = |now: u64, then: Option<u64>| {
            self.io_known.then(|| now.saturating_sub(then.unwrap_or(0)))
        };
        u.cpu_time_ns = cpu;
        u.cpu_time_ms = cpu / 1_000_000;
        u.cpu_user_ns = user;
        u.cpu_system_ns = system;
        u.process_count = self.members.len() as u64 + self.gone;
        u.thread_count = self.threads.len() as u64;
        u.peak_process_count = Some(self.peak_live.max(u64::from(u.process_count > 0)));
        u.live_process_count = self.live;
        u.disk_bytes_read = since(io.disk_read_bytes, before.disk_bytes_read);
        u.disk_bytes_written = since(io.disk_write_bytes, before.disk_bytes_written);
        u.disk_cancelled_write_bytes = since(
            io.disk_cancelled_write_bytes,
            before.disk_cancelled_write_bytes,
        );
        u.io_read_chars = since(io.io_rchar, before.io_read_chars);
        u.io_write_chars = since(io.io_wchar, before.io_write_chars);
        u.memory_bytes = Some(self.rss);
        u.peak_memory_bytes = Some(self.peak_rss);
        u.precision_notes = attach_notes(units);
        u.lower_bounds = sampled_counts();
        if let Some(status) = self.root_status {
            let end = RootEnd::from_wait_status(status);
            u.exit_code = end.exit_code;
            u.signal = end.signal;
        }
        u.wall_time_ms = wall_time_ms;
        u.attached = true;
        u.usage_before_attach = Some(before);
        u
    }
}

pub fn attach_notes(units: Units) -> Vec<String> {
    let every = interval_text(units.interval);
    vec![
        format!(
            "tracker: the /proc fallback for attach: nothing is reaped by the tracker (the tree \
             is not its child), so everything is sampled from /proc every {every}"
        ),
        format!(
            "cpu_time_ns, cpu_user_ns, cpu_system_ns: the processes' own time (schedstat ns of \
             live threads, clock ticks for exited ones) and that of the children they waited for \
             (clock ticks), at each sample; what a process did after its last sample is missed, \
             and so is a daemon that left the tree between two samples (orphans go to init, not \
             to the tracker)"
        ),
        format!(
            "disk_bytes_read, disk_bytes_written, disk_cancelled_write_bytes, io_read_chars, \
             io_write_chars: /proc/PID/io at each sample; what a process did after its last \
             sample, and processes that lived between two samples ({every}), are missed"
        ),
        format!(
            "process_count, thread_count, peak_process_count, peak_memory_bytes: what the \
             samples every {every} saw"
        ),
        "exit_code, signal: the root's wait status, known only if a sample saw it as a zombie"
            .to_string(),
        "max_process_rss_bytes, disk_devices, network_bytes_sent, network_bytes_received: null: \
         /proc loses them when a process exits"
            .to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::walker::ProcStat;
    use crate::sys::procfs::ThreadIo;

    #[allow(clippy::too_many_arguments)]
    fn record(
        pid: i32,
        start_ticks: u64,
        status: i32,
        utime_us: u64,
        stime_us: u64,
        maxrss_kb: u64,
        inblock: u64,
        oublock: u64,
    ) -> Record {
        Record {
            kind: super::super::reaper::REAPED,
            pid,
            status,
            start_ticks,
            utime_us,
            stime_us,
            maxrss_kb,
            inblock,
            oublock,
            ..Record::default()
        }
    }

    const UNITS: Units = Units {
        tick_ns: 10_000_000,
        page_size: 4096,
        interval: Duration::from_millis(10),
    };

    fn node(pid: u32, ppid: u32, start: u64, tids: &[u32], rss: u64, zombie: bool) -> Node {
        Node {
            pid,
            stat: ProcStat {
                state: if zombie { 'Z' } else { 'S' },
                ppid,
                start_ticks: start,
                rss_pages: rss,
                num_threads: tids.len() as u64,
                ..ProcStat::default()
            },
            tids: tids.to_vec(),
        }
    }

    #[test]
    fn intervals_read_well() {
        assert_eq!(interval_text(Duration::from_millis(10)), "10 ms");
        assert_eq!(interval_text(Duration::from_micros(2500)), "2.5 ms");
        assert_eq!(interval_text(Duration::from_millis(1500)), "1.5 s");
    }

    #[test]
    fn processes_are_counted_once_threads_apart_and_reuse_is_two() {
        let mut a = Account::default();
        // Root 10 with two threads, child 11.
        a.observe(
            &[
                node(10, 1, 100, &[10, 12], 10, false),
                node(11, 10, 101, &[11], 5, false),
            ],
            4096,
        );
        assert_eq!((a.live, a.rss), (2, 15 * 4096));
        // 11 is gone, its pid reused by 11@200 (another process), and 10 is a zombie.
        a.observe(
            &[
                node(10, 1, 100, &[10], 0, true),
                node(11, 10, 200, &[11], 1, false),
            ],
            4096,
        );
        assert_eq!((a.live, a.rss), (1, 4096));
        // The reaper reaps 10 (seen), and 50, a fleeting orphan no sample saw.
        a.reap(&record(10, 100, 0, 1_000, 500, 2048, 8, 16));
        a.reap(&record(50, 300, 0, 10, 20, 4096, 0, 0));
        assert_eq!(a.process_count(), 4, "10, 11@101, 11@200, 50");
        assert_eq!(
            a.thread_count(),
            4 + 1,
            "10, 12, 11@101, 11@200 and 50's one thread"
        );
        let u = a.usage("no privileges", UNITS, None, RootEnd::default(), 5);
        assert_eq!(u.cpu_time_ns, 1_530_000);
        assert_eq!((u.cpu_user_ns, u.cpu_system_ns), (1_010_000, 520_000));
        assert_eq!(u.max_process_rss_bytes, Some(4096 * 1024));
        assert_eq!(u.disk_bytes_read, Some(8 * 512));
        assert_eq!(u.disk_bytes_written, Some(16 * 512));
        assert_eq!(u.peak_process_count, Some(2));
        assert_eq!(u.peak_memory_bytes, Some(15 * 4096));
        assert_eq!(u.memory_bytes, Some(0));
        assert_eq!(u.live_process_count, 0);
        assert_eq!(u.tracker, TrackerKind::Proc);
        assert_eq!(u.precision, crate::Precision::Approximate);
        assert_eq!(
            u.lower_bounds,
            ["process_count", "thread_count", "peak_process_count"]
        );
        // What it cannot know is null, never 0.
        assert_eq!(u.io_read_chars, None);
        assert_eq!(u.disk_cancelled_write_bytes, None);
        assert_eq!(u.disk_devices, None);
        assert_eq!(u.network_bytes_sent, None);
        // Every approximate field is named in a note.
        let notes = u.precision_notes.join("\n");
        for field in [
            "tracker",
            "cpu_time_ns",
            "process_count",
            "thread_count",
            "peak_process_count",
            "peak_memory_bytes",
            "max_process_rss_bytes",
            "disk_bytes_read",
        ] {
            assert!(
                u.precision_notes
                    .iter()
                    .any(|n| n.starts_with(field) || n.split(':').next().unwrap().contains(field)),
                "{field} in {notes}"
            );
        }
        assert!(notes.contains("no privileges"), "{notes}");
        assert!(notes.contains("every 10 ms"), "{notes}");
    }

    #[test]
    fn a_tree_no_sample_saw_alive_had_one_process_alive_at_least() {
        let mut a = Account::default();
        let u = a.usage("x", UNITS, None, RootEnd::default(), 0);
        assert_eq!((u.process_count, u.peak_process_count), (0, Some(0)));
        a.reap(&record(10, 100, 0, 1, 1, 1, 0, 0));
        let u = a.usage("x", UNITS, None, RootEnd::default(), 0);
        assert_eq!((u.process_count, u.peak_process_count), (1, Some(1)));
    }

    #[test]
    fn a_reaped_process_without_start_time_never_overcounts() {
        let mut a = Account::default();
        a.observe(&[node(10, 1, 100, &[10], 1, false)], 4096);
        a.reap(&record(10, 0, 0, 1, 1, 1, 0, 0));
        assert_eq!(a.process_count(), 1, "taken for 10@100");
        a.reap(&record(11, 0, 0, 1, 1, 1, 0, 0));
        assert_eq!((a.process_count(), a.thread_count()), (2, 2));
        assert_eq!(a.reaped.count, 2);
    }

    #[test]
    fn live_processes_add_to_the_reaped_totals() {
        let mut a = Account::default();
        a.reap(&record(20, 5, 0, 1_000, 1_000, 100, 1, 1));
        let n = node(10, 1, 100, &[10], 3, false);
        a.observe(std::slice::from_ref(&n), 4096);
        let d = Detail {
            own_cpu_ns: 5_000_000,
            waited_cpu_ns: 10_000_000,
            user_ticks: 1,
            system_ticks: 0,
            io: Some(ThreadIo {
                read_bytes: 4096,
                write_bytes: 0,
                ..ThreadIo::default()
            }),
            hwm_bytes: Some(1 << 20),
        };
        let u = a.usage("x", UNITS, Some(&[(n, d)]), RootEnd::default(), 0);
        assert_eq!(u.cpu_time_ns, 2_000_000 + 15_000_000);
        assert_eq!(u.cpu_user_ns + u.cpu_system_ns, u.cpu_time_ns);
        assert_eq!(u.disk_bytes_read, Some(512 + 4096));
        assert_eq!(u.memory_bytes, Some(3 * 4096));
        assert_eq!(u.live_process_count, 1);
        assert_eq!(u.max_process_rss_bytes, Some(1 << 20));
        assert!(u.precision_notes.iter().any(|n| n.contains("still runs")));
    }

    #[test]
    fn root_status_from_the_wait_status() {
        let e = RootEnd::from_wait_status(3 << 8);
        assert_eq!((e.exit_code, e.signal), (Some(3), None));
        let e = RootEnd::from_wait_status(9);
        assert_eq!((e.exit_code, e.signal), (None, Some(9)));
    }

    fn det(own: u64, waited: u64, write: u64) -> Detail {
        Detail {
            own_cpu_ns: own,
            waited_cpu_ns: waited,
            user_ticks: 1,
            system_ticks: 1,
            io: Some(ThreadIo {
                write_bytes: write,
                ..ThreadIo::default()
            }),
            hwm_bytes: None,
        }
    }

    #[test]
    fn attached_cpu_moves_to_a_waiting_parent_and_is_kept_for_orphans() {
        let mut a = AttachAccount::default();
        let root = node(10, 1, 100, &[10], 1, false);
        let child = node(11, 10, 101, &[11], 1, false);
        let orphan = node(12, 10, 102, &[12], 1, false);
        // At the attach: root 5 ms, child 1 ms, orphan 1 ms.
        a.observe(
            &[
                (root.clone(), det(5, 0, 100)),
                (child.clone(), det(1, 0, 10)),
                (orphan.clone(), det(1, 0, 10)),
            ],
            4096,
        );
        let b = a.usage(UNITS, 0).usage_before_attach.unwrap();
        assert_eq!((b.cpu_time_ns, b.process_count, b.thread_count), (7, 3, 3));
        assert_eq!(a.usage(UNITS, 0).cpu_time_ns, 0, "nothing since the attach");
        // The child ran to 4 ms and was waited for by the root (its time moves to the
        // root's waited-for time); the orphan's parent is init now.
        let orphan2 = node(12, 1, 102, &[12], 1, false);
        a.observe(
            &[(root.clone(), det(6, 4, 100)), (orphan2, det(3, 0, 30))],
            4096,
        );
        let u = a.usage(UNITS, 0);
        assert_eq!(u.cpu_time_ns, (6 + 4 + 3) - 7);
        assert_eq!(u.disk_bytes_written, Some(100 + 10 + 30 - 120), "io stays");
        // The orphan ends: its last sample is kept. The root is a zombie with status 1.
        let mut zroot = node(10, 1, 100, &[10], 0, true);
        zroot.stat.exit_code = Some(1 << 8);
        a.observe(&[(zroot, det(6, 4, 100))], 4096);
        let u = a.usage(UNITS, 0);
        assert_eq!(u.cpu_time_ns, (6 + 4 + 3) - 7);
        assert_eq!(u.disk_bytes_written, Some(100 + 10 + 30 - 120));
        assert_eq!((u.exit_code, u.signal), (Some(1), None));
        assert_eq!(u.process_count, 3);
        assert_eq!(u.live_process_count, 0);
        assert!(a.finished());
        assert_eq!(a.root_end(), (true, Some(1 << 8)));
        assert!(u.attached);
        assert_eq!(u.max_process_rss_bytes, None);
        assert_eq!(u.lower_bounds, sampled_counts());
    }

    #[test]
    fn a_budget_is_crossed_past_its_limit_the_first_in_report_order() {
        let f = Figures {
            processes: 20,
            threads: 31,
            cpu_ns: Some(500),
            memory_bytes: None,
            disk_write_bytes: Some(10),
            disk_read_bytes: None,
        };
        let at = Budgets {
            max_processes: Some(20),
            max_cpu_ns: Some(500),
            ..Budgets::default()
        };
        assert_eq!(f.crossed(&at), None, "at the limit is not past it");
        let past = Budgets {
            max_threads: Some(30),
            max_disk_write_bytes: Some(9),
            // Not known now: never crossed on a guess.
            max_memory_bytes: Some(0),
            max_disk_read_bytes: Some(0),
            max_network_bytes: Some(0),
            ..at
        };
        assert_eq!(
            f.crossed(&past),
            Some(BudgetExceeded {
                resource: Resource::Threads,
                limit: 30,
                observed: 31,
                enforced: EnforcedBy::Sampled,
            })
        );
        let only_disk = Budgets {
            max_disk_write_bytes: Some(9),
            ..Budgets::default()
        };
        let e = f.crossed(&only_disk).unwrap();
        assert_eq!((e.resource, e.observed), (Resource::DiskWrite, 10));
    }

    #[test]
    fn figures_are_the_reports_own() {
        let mut a = Account::default();
        a.reap(&record(20, 5, 0, 1_000, 2_000, 100, 3, 4));
        let n = node(10, 1, 100, &[10, 11], 3, false);
        a.observe(std::slice::from_ref(&n), 4096);
        let d = Detail {
            own_cpu_ns: 5_000_000,
            waited_cpu_ns: 1_000_000,
            io: Some(ThreadIo {
                read_bytes: 4096,
                write_bytes: 8192,
                ..ThreadIo::default()
            }),
            ..Detail::default()
        };
        let live = [(n, d)];
        let f = a.figures(None, Some(&live));
        let u = a.usage("x", UNITS, Some(&live), RootEnd::default(), 0);
        assert_eq!(f.processes, u.process_count);
        assert_eq!(f.threads, u.thread_count);
        assert_eq!(f.cpu_ns, Some(u.cpu_time_ns));
        assert_eq!(f.memory_bytes, u.memory_bytes);
        assert_eq!(f.disk_read_bytes, u.disk_bytes_read);
        assert_eq!(f.disk_write_bytes, u.disk_bytes_written);
        // Without the live processes: the reaped part alone; with earlier reaper totals,
        // those.
        let f = a.figures(None, None);
        assert_eq!(f.cpu_ns, Some(3_000_000));
        assert_eq!(f.disk_write_bytes, Some(4 * 512));
        let f = a.figures(Some(&Reaped::default()), Some(&live));
        assert_eq!(f.cpu_ns, Some(6_000_000));
        // Before any sample, the memory is not known.
        assert_eq!(Account::default().figures(None, None).memory_bytes, None);
    }

    #[test]
    fn attached_figures_are_since_the_attach() {
        let mut a = AttachAccount::default();
        assert_eq!(a.figures(), None);
        let root = node(10, 1, 100, &[10], 2, false);
        a.observe(&[(root.clone(), det(5, 0, 100))], 4096);
        a.observe(&[(root, det(9, 0, 130))], 4096);
        let f = a.figures().unwrap();
        let u = a.usage(UNITS, 0);
        assert_eq!(f.cpu_ns, Some(4));
        assert_eq!(f.cpu_ns, Some(u.cpu_time_ns));
        assert_eq!(f.disk_write_bytes, u.disk_bytes_written);
        assert_eq!(f.disk_write_bytes, Some(30));
        assert_eq!((f.processes, f.threads), (u.process_count, u.thread_count));
        assert_eq!(f.memory_bytes, u.memory_bytes);
    }
}
