//! Budgets: the limits at which a run is stopped (`--max-processes`, `--max-cpu`, ...), how
//! they are written (`64M`, `500ms`), and what a report says when one was crossed.
//!
//! The kernel enforces them at the crossing (see the eBPF crate's `budget` module): the run
//! is killed, and the first budget crossed is recorded with the value observed there. This
//! module is pure: parsing, the kernel's encoding, and the report's types.
use std::fmt;
use std::time::Duration;

use cylo_usage_abi::{RunControl, RunCounters, budget};

use crate::kernel::budget_hooks::Need;
use crate::kernel::features::Measured;
use serde::{Deserialize, Serialize};

/// A resource a run can be stopped at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// Processes that ran (the root included).
    Processes,
    /// Threads that ran (each process's main thread included).
    Threads,
    /// CPU time, user and system, in ns.
    CpuTime,
    /// The tree's resident memory at any moment, in bytes.
    Memory,
    /// Bytes the tree made the storage layer write (`disk_bytes_written`).
    DiskWrite,
    /// Bytes the tree made the storage layer read (`disk_bytes_read`).
    DiskRead,
    /// TCP and UDP payload bytes, sent and received together.
    Network,
    /// Threads alive at once: the session's share of the tracker's membership maps (a
    /// daemon's `serve --session-max-tasks`, or `RunOptions::max_tasks`), a budget every run
    /// has. Past it, a new task cannot be followed: it is refused, and the run stops.
    TasksAlive,
}

impl Resource {
    /// Every resource, in the order reports list them.
    pub const ALL: [Resource; 7] = [
        Resource::Processes,
        Resource::Threads,
        Resource::CpuTime,
        Resource::Memory,
        Resource::DiskWrite,
        Resource::DiskRead,
        Resource::Network,
    ];

    /// The name reports use (`cpu_time`, `disk_write`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Resource::Processes => "processes",
            Resource::Threads => "threads",
            Resource::CpuTime => "cpu_time",
            Resource::Memory => "memory",
            Resource::DiskWrite => "disk_write",
            Resource::DiskRead => "disk_read",
            Resource::Network => "network",
            Resource::TasksAlive => "tasks_alive",
        }
    }

    /// The command-line option that sets it.
    pub fn option(self) -> &'static str {
        match self {
            Resource::Processes => "--max-processes",
            Resource::Threads => "--max-threads",
            Resource::CpuTime => "--max-cpu",
            Resource::Memory => "--max-memory",
            Resource::DiskWrite => "--max-disk-write",
            Resource::DiskRead => "--max-disk-read",
            Resource::Network => "--max-network",
            Resource::TasksAlive => "the session's share (serve --session-max-tasks)",
        }
    }

    /// The kernel's code for it (`cylo_usage_abi::budget`).
    fn code(self) -> u64 {
        match self {
            Resource::Processes => budget::PROCESSES,
            Resource::Threads => budget::THREADS,
            Resource::CpuTime => budget::CPU_TIME,
            Resource::Memory => budget::MEMORY,
            Resource::DiskWrite => budget::DISK_WRITE,
            Resource::DiskRead => budget::DISK_READ,
            Resource::Network => budget::NETWORK,
            Resource::TasksAlive => budget::TASKS_ALIVE,
        }
    }

    fn from_code(code: u64) -> Option<Resource> {
        Resource::ALL
            .into_iter()
            .chain([Resource::TasksAlive])
            .find(|r| r.code() == code)
    }

    /// `value` in this resource's unit, for people: `1.5 s`, `64.0 MiB`, `100`.
    pub fn show(self, value: u64) -> String {
        match self {
            Resource::Processes | Resource::Threads | Resource::TasksAlive => value.to_string(),
            Resource::CpuTime => format!("{:.3} s", value as f64 / 1e9),
            _ => show_bytes(value),
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes for people, in powers of 1024.
fn show_bytes(v: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = v as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v} B")
    } else {
        format!("{x:.1} {} ({v} bytes)", UNITS[unit])
    }
}

/// The budgets of a run: `None` for no limit. Counts and bytes are the report's own figures
/// (`process_count`, `thread_count`, `cpu_time_ns`, `memory_bytes`, `disk_bytes_written`,
/// `disk_bytes_read`, `network_bytes_sent + network_bytes_received`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budgets {
    /// The most processes that may run, the root included (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_processes: Option<u64>,
    /// The most threads that may run, main threads included (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_threads: Option<u64>,
    /// The most CPU time, in ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpu_ns: Option<u64>,
    /// The most resident memory of the tree at once, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<u64>,
    /// The most bytes the tree may make the storage layer write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disk_write_bytes: Option<u64>,
    /// The most bytes the tree may make the storage layer read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disk_read_bytes: Option<u64>,
    /// The most TCP and UDP payload bytes, sent and received together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_network_bytes: Option<u64>,
}

impl Budgets {
    /// The limit set for `resource`.
    pub fn limit(&self, resource: Resource) -> Option<u64> {
        match resource {
            Resource::Processes => self.max_processes,
            Resource::Threads => self.max_threads,
            Resource::CpuTime => self.max_cpu_ns,
            Resource::Memory => self.max_memory_bytes,
            Resource::DiskWrite => self.max_disk_write_bytes,
            Resource::DiskRead => self.max_disk_read_bytes,
            Resource::Network => self.max_network_bytes,
            Resource::TasksAlive => None,
        }
    }

    /// Sets the limit of `resource` (`TasksAlive`, the session's share, is not set here:
    /// see `RunOptions::max_tasks`).
    pub fn set(&mut self, resource: Resource, limit: Option<u64>) {
        let field = match resource {
            Resource::Processes => &mut self.max_processes,
            Resource::Threads => &mut self.max_threads,
            Resource::CpuTime => &mut self.max_cpu_ns,
            Resource::Memory => &mut self.max_memory_bytes,
            Resource::DiskWrite => &mut self.max_disk_write_bytes,
            Resource::DiskRead => &mut self.max_disk_read_bytes,
            Resource::Network => &mut self.max_network_bytes,
            Resource::TasksAlive => return,
        };
        *field = limit;
    }

    /// Whether no budget is set.
    pub fn is_empty(&self) -> bool {
        Resource::ALL.iter().all(|&r| self.limit(r).is_none())
    }

    /// The resources with a budget.
    pub fn resources(&self) -> impl Iterator<Item = Resource> + '_ {
        Resource::ALL
            .into_iter()
            .filter(|&r| self.limit(r).is_some())
    }

    /// These budgets within `ceiling` (an operator's maximum): each the smaller of the two,
    /// and the ceiling's where none is asked.
    pub fn within(&self, ceiling: &Budgets) -> Budgets {
        let mut out = *self;
        for r in Resource::ALL {
            let v = match (self.limit(r), ceiling.limit(r)) {
                (Some(a), Some(c)) => Some(a.min(c)),
                (a, c) => a.or(c),
            };
            out.set(r, v);
        }
        out
    }

    /// A budget that could never be met: a count of 0 (the root itself is one process and
    /// one thread).
    pub fn check(&self) -> Result<(), String> {
        for r in [Resource::Processes, Resource::Threads] {
            if self.limit(r) == Some(0) {
                return Err(format!(
                    "{} 0 would refuse the command itself: the root is one process and one thread",
                    r.option()
                ));
            }
        }
        Ok(())
    }

    /// Writes the budgets into a run's controls in the kernel (`page_size`: memory is counted
    /// in pages there).
    pub(crate) fn write_into(&self, ctl: &mut RunControl, page_size: u64) {
        // 0 means none in the kernel: a 0 byte or 0 ns budget becomes the smallest that can
        // be crossed (any use crosses it).
        let nonzero = |v: Option<u64>| v.map_or(0, |v| v.max(1));
        ctl.max_processes = self.max_processes.unwrap_or(0);
        ctl.max_threads = self.max_threads.unwrap_or(0);
        ctl.max_cpu_ns = nonzero(self.max_cpu_ns);
        // Crossed when pages × page size > bytes, that is pages > bytes / page size; a
        // budget under one page is crossed by the first page.
        ctl.max_rss_pages = self
            .max_memory_bytes
            .map_or(0, |b| (b / page_size.max(1)).max(1));
        ctl.max_disk_write_bytes = nonzero(self.max_disk_write_bytes);
        ctl.max_disk_read_bytes = nonzero(self.max_disk_read_bytes);
        ctl.max_network_bytes = nonzero(self.max_network_bytes);
    }
}

/// How budgets are enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    /// In the kernel, at the crossing; a budget the kernel side cannot enforce is refused.
    #[default]
    Exact,
    /// Where the kernel side cannot enforce a budget (the /proc fallback), by userspace from
    /// its samples: a crossing is seen up to a sampling interval late, and a short-lived
    /// process may be missed (`--budgets best-effort`).
    BestEffort,
}

/// The budget a run crossed, and what was observed there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetExceeded {
    /// The resource.
    pub resource: Resource,
    /// Its budget, in its unit (count, ns, bytes).
    pub limit: u64,
    /// What the run had used when the crossing was seen (the first value past the limit):
    /// the process or thread refused is counted here, the bytes or ns of the crossing
    /// included. The report's own figures say what the tree used in the end.
    pub observed: u64,
    /// How it was enforced: `exact` (in the kernel, at the crossing) or `sampled`.
    pub enforced: EnforcedBy,
}

/// How a crossing was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnforcedBy {
    /// By the kernel, at the crossing.
    Kernel,
    /// By userspace, from a sample (`--budgets best-effort` on the /proc fallback).
    Sampled,
}

impl BudgetExceeded {
    /// The crossing the kernel recorded in a run's record, if any (`page_size`: memory is in
    /// pages there).
    pub(crate) fn from_counters(
        c: &RunCounters,
        budgets: &Budgets,
        share: u32,
        page_size: u64,
    ) -> Option<BudgetExceeded> {
        let (code, observed) = budget::unpack(c.budget_crossed);
        let resource = Resource::from_code(code)?;
        let observed = match resource {
            Resource::Memory => observed.saturating_mul(page_size),
            _ => observed,
        };
        Some(BudgetExceeded {
            resource,
            limit: match resource {
                Resource::TasksAlive => u64::from(share),
                r => budgets.limit(r).unwrap_or(0),
            },
            observed,
            enforced: EnforcedBy::Kernel,
        })
    }
}

impl fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} budget exceeded: {} observed, limit {}",
            self.resource,
            self.resource.show(self.observed),
            self.resource.show(self.limit)
        )
    }
}

/// Why a budget cannot be enforced here.
#[derive(Debug, thiserror::Error)]
#[error("{option} cannot be enforced in the kernel here: {reason}")]
pub struct Unenforceable {
    /// The option (`--max-cpu`, ...).
    pub option: &'static str,
    /// What is missing.
    pub reason: String,
}

/// The hooks `budgets` need, or why a budget cannot be enforced with what this kernel
/// measures (`measured`).
pub(crate) fn needs(budgets: &Budgets, measured: &Measured) -> Result<Vec<Need>, Unenforceable> {
    let mut needs = Vec::new();
    for r in budgets.resources() {
        let missing = |reason: &str| Unenforceable {
            option: r.option(),
            reason: reason.to_string(),
        };
        match r {
            Resource::Processes | Resource::Threads => needs.push(Need::Birth),
            Resource::CpuTime => needs.push(Need::Cpu),
            Resource::Memory if !measured.atomics => {
                return Err(missing(
                    "the tree's memory is not measured on this kernel (it needs BPF atomic \
                     fetch, Linux 5.12)",
                ));
            }
            Resource::DiskWrite | Resource::DiskRead if !measured.disk || !measured.devices => {
                return Err(missing(
                    "the kernel's task I/O accounting or the block_bio_queue tracepoint is \
                     missing",
                ));
            }
            Resource::DiskWrite => needs.push(Need::Dirty),
            Resource::Network if measured.network.is_none() => {
                return Err(missing("network bytes are not measured on this kernel"));
            }
            Resource::Memory | Resource::DiskRead | Resource::Network | Resource::TasksAlive => {}
        }
    }
    needs.sort_by_key(|n| *n as usize);
    needs.dedup();
    Ok(needs)
}

/// The option of `budgets` that needs hook `need` (for messages).
pub(crate) fn option_for(budgets: &Budgets, need: Need) -> &'static str {
    let r = match need {
        Need::Birth if budgets.max_processes.is_some() => Resource::Processes,
        Need::Birth => Resource::Threads,
        Need::Cpu => Resource::CpuTime,
        Need::Dirty => Resource::DiskWrite,
    };
    r.option()
}

/// Parses a count: `100`, `4K` (powers of 1024, as for bytes).
pub fn parse_count(text: &str) -> Result<u64, String> {
    parse_bytes(text).map_err(|_| format!("invalid count {text:?}: expected e.g. 100 or 4K"))
}

/// Parses a size in bytes: `4096`, `64K`, `64M`, `1.5G`, `1T` (powers of 1024; `KiB`, `MB`
/// and a trailing `B` are read the same way).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || format!("invalid size {text:?}: expected e.g. 4096, 64K, 64M, 1G");
    let value: f64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 || (shift == 0 && number.contains('.')) {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration: `500ms`, `10s`, `1.5s`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 500ms, 10s, 2m"))?;
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {text:?}: use ms, s, m or h"
            ));
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("duration {text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_powers_of_1024() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("8m"), Ok(8 << 20));
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert_eq!(parse_bytes("2T"), Ok(2 << 40));
        for bad in ["", "M", "1.5", "-1M", "1X", "1e3", "99999999999T"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_count("100"), Ok(100));
        assert_eq!(parse_count("4K"), Ok(4096));
        assert!(parse_count("ten").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in [
            "", "ms", "s", "1d", "10x", "-1s", "1e99h", "1e999s", "ms10", "1..2s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kernel_encoding() {
        let b = Budgets {
            max_processes: Some(100),
            max_memory_bytes: Some(64 << 20),
            max_cpu_ns: Some(0),
            ..Budgets::default()
        };
        let mut ctl = RunControl::default();
        b.write_into(&mut ctl, 4096);
        assert_eq!(ctl.max_processes, 100);
        assert_eq!(ctl.max_rss_pages, 16384);
        assert_eq!(ctl.max_cpu_ns, 1, "a 0 budget is crossed by any use");
        assert_eq!(ctl.max_threads, 0, "no budget");
        let c = RunCounters {
            budget_crossed: budget::pack(budget::MEMORY, 16385),
            ..RunCounters::default()
        };
        let e = BudgetExceeded::from_counters(&c, &b, 0, 4096).unwrap();
        assert_eq!(e.resource, Resource::Memory);
        assert_eq!(e.limit, 64 << 20);
        assert_eq!(e.observed, 16385 * 4096);
        assert!(BudgetExceeded::from_counters(&RunCounters::default(), &b, 0, 4096).is_none());
    }

    #[test]
    fn ceilings() {
        let asked = Budgets {
            max_processes: Some(500),
            max_cpu_ns: Some(1_000),
            ..Budgets::default()
        };
        let ceiling = Budgets {
            max_processes: Some(100),
            max_memory_bytes: Some(1 << 30),
            ..Budgets::default()
        };
        let b = asked.within(&ceiling);
        assert_eq!(b.max_processes, Some(100));
        assert_eq!(b.max_cpu_ns, Some(1_000));
        assert_eq!(b.max_memory_bytes, Some(1 << 30));
        assert_eq!(b.max_threads, None);
        assert!(
            Budgets {
                max_threads: Some(0),
                ..Budgets::default()
            }
            .check()
            .is_err()
        );
    }

    #[test]
    fn json_names() {
        let e = BudgetExceeded {
            resource: Resource::CpuTime,
            limit: 500_000_000,
            observed: 503_000_000,
            enforced: EnforcedBy::Kernel,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"resource":"cpu_time","limit":500000000,"observed":503000000,"enforced":"kernel"}"#
        );
    }
}

#[cfg(test)]
mod hook_tests {
    use super::*;
    use crate::kernel::features::NetworkPath;

    fn measured(atomics: bool, network: bool) -> Measured {
        Measured {
            atomics,
            disk: true,
            io_chars: true,
            devices: true,
            attach: true,
            records: true,
            network: network.then_some(NetworkPath::Tracepoints { sendpage: false }),
        }
    }

    #[test]
    fn each_budget_names_its_hooks_or_what_is_missing() {
        let b = Budgets {
            max_processes: Some(10),
            max_threads: Some(10),
            max_cpu_ns: Some(1),
            max_disk_write_bytes: Some(1),
            ..Budgets::default()
        };
        assert_eq!(
            needs(&b, &measured(true, true)).unwrap(),
            vec![Need::Birth, Need::Cpu, Need::Dirty]
        );
        let mem = Budgets {
            max_memory_bytes: Some(1 << 20),
            ..Budgets::default()
        };
        assert!(needs(&mem, &measured(true, true)).unwrap().is_empty());
        let e = needs(&mem, &measured(false, true)).unwrap_err();
        assert_eq!(e.option, "--max-memory");
        assert!(e.reason.contains("5.12"), "{}", e.reason);
        let net = Budgets {
            max_network_bytes: Some(1),
            ..Budgets::default()
        };
        assert_eq!(
            needs(&net, &measured(true, false)).unwrap_err().option,
            "--max-network"
        );
    }
}
