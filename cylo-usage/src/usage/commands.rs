//! A run's per-process breakdown grouped by command (the executable each process ran), with
//! sums that add up to the report's totals exactly: what the breakdown does not cover is one
//! more row, [`NOT_IN_BREAKDOWN`].
use serde::{Deserialize, Serialize};

use super::{ProcessUsage, ResourceUsage};

/// The `command` of the row that holds what the breakdown does not cover: processes left out
/// past the breakdown's limit, records lost, what live threads used since their process's
/// figures were read, or what the totals hold that no process's figures do.
pub const NOT_IN_BREAKDOWN: &str = "(not in the breakdown)";

/// What the processes that ran one command used, together (one row of `commands` in the JSON
/// report). Over all the rows of a report, every summed field (`process_count`,
/// `thread_count`, the CPU times, disk and network bytes) adds up to the report's total
/// exactly; a field the report does not measure is `None` in every row.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CommandUsage {
    /// The executable: the file the processes' last exec ran (as it was named to `execve`),
    /// or, for processes that never exec'd while followed (forks of a shell, processes
    /// present at an attach), their comm in brackets, `[configure]`, as `ps` shows a process
    /// without a command line. Escaped as in `processes` (a backslash is `\\`, a byte that is
    /// not UTF-8 `\xNN`). [`NOT_IN_BREAKDOWN`] for the row of what the breakdown misses.
    pub command: String,
    /// Processes, as the report's `process_count` counts them: without the refused ones.
    pub process_count: u64,
    /// Processes of this command refused by a processes or threads budget: killed before
    /// they ran, and (as in the report's `process_count` and `thread_count`) counted in
    /// neither `process_count` nor `thread_count`. Absent when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub processes_refused: u64,
    /// Threads of those processes, main threads included.
    pub thread_count: u64,
    /// CPU time (ns), user and system together.
    pub cpu_time_ns: u64,
    /// The user part of `cpu_time_ns`: the sum of the processes' own splits.
    pub cpu_user_ns: u64,
    /// The system part of `cpu_time_ns`.
    pub cpu_system_ns: u64,
    /// The largest peak RSS of one of its processes (not a sum); `None` where memory is not
    /// followed, and in the [`NOT_IN_BREAKDOWN`] row.
    pub max_rss_bytes: Option<u64>,
    /// Bytes its processes made the storage layer read.
    pub disk_bytes_read: Option<u64>,
    /// Bytes its processes made the storage layer write.
    pub disk_bytes_written: Option<u64>,
    /// Payload bytes its processes sent through TCP and UDP sockets.
    pub network_bytes_sent: Option<u64>,
    /// Payload bytes its processes received through TCP and UDP sockets.
    pub network_bytes_received: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The executable a process ran, as [`CommandUsage::command`] names it: its last exec's file,
/// else `[comm]`.
pub fn executable(p: &ProcessUsage) -> String {
    match &p.filename {
        Some(f) if !f.is_empty() => f.clone(),
        _ => format!("[{}]", p.comm),
    }
}

/// The summed fields, in one order: process_count, thread_count, cpu_time_ns, cpu_user_ns,
/// cpu_system_ns, disk_bytes_read, disk_bytes_written, network_bytes_sent,
/// network_bytes_received.
const SUMMED: usize = 9;

fn summed(c: &CommandUsage) -> [Option<u64>; SUMMED] {
    [
        Some(c.process_count),
        Some(c.thread_count),
        Some(c.cpu_time_ns),
        Some(c.cpu_user_ns),
        Some(c.cpu_system_ns),
        c.disk_bytes_read,
        c.disk_bytes_written,
        c.network_bytes_sent,
        c.network_bytes_received,
    ]
}

fn set_summed(c: &mut CommandUsage, v: [Option<u64>; SUMMED]) {
    c.process_count = v[0].unwrap_or(0);
    c.thread_count = v[1].unwrap_or(0);
    c.cpu_time_ns = v[2].unwrap_or(0);
    c.cpu_user_ns = v[3].unwrap_or(0);
    c.cpu_system_ns = v[4].unwrap_or(0);
    c.disk_bytes_read = v[5];
    c.disk_bytes_written = v[6];
    c.network_bytes_sent = v[7];
    c.network_bytes_received = v[8];
}

fn totals(u: &ResourceUsage) -> [Option<u64>; SUMMED] {
    [
        Some(u.process_count),
        Some(u.thread_count),
        Some(u.cpu_time_ns),
        Some(u.cpu_user_ns),
        Some(u.cpu_system_ns),
        u.disk_bytes_read,
        u.disk_bytes_written,
        u.network_bytes_sent,
        u.network_bytes_received,
    ]
}

fn add(sum: &mut Option<u64>, v: Option<u64>) {
    if let Some(v) = v {
        *sum = Some(sum.unwrap_or(0).saturating_add(v));
    }
}

/// An empty row for `command`.
fn row(command: String) -> CommandUsage {
    CommandUsage {
        command,
        process_count: 0,
        processes_refused: 0,
        thread_count: 0,
        cpu_time_ns: 0,
        cpu_user_ns: 0,
        cpu_system_ns: 0,
        max_rss_bytes: None,
        disk_bytes_read: None,
        disk_bytes_written: None,
        network_bytes_sent: None,
        network_bytes_received: None,
    }
}

/// The report's per-process breakdown grouped by executable ([`executable`]), sorted by CPU
/// time (the largest first; ties by name), or `None` when the report has no breakdown.
///
/// The rows add up to the report's totals exactly, field by field:
/// - where the totals hold more than the breakdown (processes left out past its limit,
///   records lost, live threads' latest CPU, an attach), a last row named
///   [`NOT_IN_BREAKDOWN`] holds the difference of each summed field;
/// - where the breakdown holds more than the totals in a field (possible only where they were
///   made differently: the user/system split of a report whose `cpu_split` is `tree`, a
///   refused thread in its creator's `thread_count`), that field of every row is scaled down
///   to the total (each row's share floored, the units left over given to the largest
///   fractions), so no row is ever negative; a row's user + system may then differ from its
///   CPU time by that rescaling;
/// - a field the report does not measure (`None`) is `None` in every row.
///
/// Refused processes (`refused: true`) are grouped with their command but counted in its
/// `processes_refused` only, not in `process_count` nor `thread_count`, as the report counts
/// them; whatever else their figures hold is summed as any process's.
pub fn by_command(u: &ResourceUsage) -> Option<Vec<CommandUsage>> {
    let processes = u.processes.as_ref()?;
    let mut groups: std::collections::BTreeMap<String, CommandUsage> = Default::default();
    for p in processes {
        let key = executable(p);
        let g = groups.entry(key.clone()).or_insert_with(|| row(key));
        if p.refused {
            g.processes_refused += 1;
        } else {
            g.process_count += 1;
            g.thread_count = g.thread_count.saturating_add(p.thread_count);
        }
        g.cpu_time_ns = g.cpu_time_ns.saturating_add(p.cpu_time_ns);
        g.cpu_user_ns = g.cpu_user_ns.saturating_add(p.cpu_user_ns);
        g.cpu_system_ns = g.cpu_system_ns.saturating_add(p.cpu_system_ns);
        g.max_rss_bytes = g.max_rss_bytes.max(p.peak_memory_bytes);
        add(&mut g.disk_bytes_read, p.disk_bytes_read);
        add(&mut g.disk_bytes_written, p.disk_bytes_written);
        add(&mut g.network_bytes_sent, p.network_bytes_sent);
        add(&mut g.network_bytes_received, p.network_bytes_received);
    }
    let mut rows: Vec<CommandUsage> = groups.into_values().collect();
    let mut values: Vec<[Option<u64>; SUMMED]> = rows.iter().map(summed).collect();
    let mut rest = [None; SUMMED];
    for (f, total) in totals(u).into_iter().enumerate() {
        let mut column: Vec<Option<u64>> = values.iter().map(|v| v[f]).collect();
        rest[f] = fit(&mut column, total);
        for (v, c) in values.iter_mut().zip(column) {
            v[f] = c;
        }
    }
    for (r, v) in rows.iter_mut().zip(values) {
        set_summed(r, v);
    }
    rows.sort_by(|a, b| {
        b.cpu_time_ns
            .cmp(&a.cpu_time_ns)
            .then_with(|| a.command.cmp(&b.command))
    });
    if rest.iter().any(|r| r.is_some_and(|n| n > 0)) {
        let mut r = row(NOT_IN_BREAKDOWN.to_string());
        set_summed(&mut r, rest);
        rows.push(r);
    }
    Some(rows)
}

/// Makes `column` (one field of every row) add up to `total` exactly and returns what the
/// [`NOT_IN_BREAKDOWN`] row must hold: `None` (and every row `None`) when the total is not
/// measured; the difference when the rows hold less; 0 when they hold more, after scaling
/// them down.
fn fit(column: &mut [Option<u64>], total: Option<u64>) -> Option<u64> {
    let Some(total) = total else {
        column.iter_mut().for_each(|c| *c = None);
        return None;
    };
    let sum: u128 = column.iter().map(|c| c.unwrap_or(0) as u128).sum();
    let total_wide = total as u128;
    if sum <= total_wide {
        return Some(total - sum as u64);
    }
    // Each row's share of the total, floored; the units left over go to the largest
    // fractions (the earliest row first among equals).
    let mut fractions: Vec<(u128, usize)> = Vec::new();
    let mut given: u128 = 0;
    for (i, c) in column.iter_mut().enumerate() {
        if let Some(v) = c {
            let exact = *v as u128 * total_wide;
            let share = exact / sum;
            *c = Some(share as u64);
            given += share;
            fractions.push((exact % sum, i));
        }
    }
    fractions.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in fractions.iter().take((total_wide - given) as usize) {
        if let Some(v) = &mut column[i] {
            *v += 1;
        }
    }
    Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::TrackerKind;

    fn process(filename: Option<&str>, comm: &str, cpu: u64) -> ProcessUsage {
        ProcessUsage {
            pid: 1,
            comm: comm.to_string(),
            argv: filename.map(|f| vec![f.to_string()]),
            filename: filename.map(str::to_string),
            end_ns: Some(1),
            exit_code: Some(0),
            thread_count: 1,
            cpu_time_ns: cpu,
            cpu_user_ns: cpu / 4 * 3,
            cpu_system_ns: cpu - cpu / 4 * 3,
            disk_bytes_read: Some(cpu / 10),
            disk_bytes_written: Some(7),
            disk_cancelled_write_bytes: Some(0),
            io_read_chars: Some(0),
            io_write_chars: Some(0),
            peak_memory_bytes: Some(cpu * 2),
            network_bytes_sent: Some(1),
            network_bytes_received: Some(2),
            ..ProcessUsage::default()
        }
    }

    /// A report whose totals are exactly its processes' sums.
    fn report(processes: Vec<ProcessUsage>) -> ResourceUsage {
        let mut u = ResourceUsage::unmeasured(TrackerKind::InProcess);
        for p in processes.iter() {
            if !p.refused {
                u.process_count += 1;
                u.thread_count += p.thread_count;
            }
            u.cpu_time_ns += p.cpu_time_ns;
            u.cpu_user_ns += p.cpu_user_ns;
            u.cpu_system_ns += p.cpu_system_ns;
            add(&mut u.disk_bytes_read, p.disk_bytes_read);
            add(&mut u.disk_bytes_written, p.disk_bytes_written);
            add(&mut u.network_bytes_sent, p.network_bytes_sent);
            add(&mut u.network_bytes_received, p.network_bytes_received);
        }
        u.processes = Some(processes);
        u
    }

    /// Every summed field of the rows adds up to the report's total.
    fn assert_exact(u: &ResourceUsage, rows: &[CommandUsage]) {
        for (f, total) in totals(u).into_iter().enumerate() {
            let sum: Option<u64> = rows.iter().fold(None, |mut s, r| {
                add(&mut s, summed(r)[f]);
                s
            });
            match total {
                Some(total) => assert_eq!(sum.unwrap_or(0), total, "field {f}: {rows:#?}"),
                None => assert_eq!(sum, None, "field {f}: {rows:#?}"),
            }
        }
    }

    fn sample() -> Vec<ProcessUsage> {
        let mut ps = vec![process(Some("/bin/sh"), "sh", 1_000)];
        for i in 0..5 {
            ps.push(process(Some("/usr/bin/cc"), "cc", 3_000 + i));
        }
        ps.push(process(None, "sh", 50));
        ps.push(process(None, "sh", 60));
        ps.push(process(Some("/bin/true"), "true", 1_000));
        ps
    }

    #[test]
    fn groups_by_executable_and_sorts_by_cpu() {
        let u = report(sample());
        let rows = by_command(&u).unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.command.as_str()).collect();
        // Ties (1,000 ns each) by name; forks that never exec'd by their comm, bracketed.
        assert_eq!(names, ["/usr/bin/cc", "/bin/sh", "/bin/true", "[sh]"]);
        let cc = &rows[0];
        assert_eq!((cc.process_count, cc.thread_count), (5, 5));
        assert_eq!(cc.cpu_time_ns, 15_010);
        assert_eq!(cc.max_rss_bytes, Some(2 * 3_004), "the largest, not a sum");
        assert_eq!(cc.disk_bytes_written, Some(35));
        assert_eq!(rows[3].process_count, 2);
        assert_exact(&u, &rows);
        assert!(!rows.iter().any(|r| r.command == NOT_IN_BREAKDOWN));
        assert_eq!(
            by_command(&ResourceUsage::unmeasured(TrackerKind::Proc)),
            None
        );
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert!(json.get("processes_refused").is_none(), "{json}");
    }

    #[test]
    fn what_the_breakdown_misses_is_one_last_row() {
        let mut u = report(sample());
        // Two processes left out past the limit, with their CPU, threads and disk.
        u.process_count += 2;
        u.thread_count += 3;
        u.cpu_time_ns += 500_000;
        u.cpu_user_ns += 400_000;
        u.cpu_system_ns += 100_000;
        u.disk_bytes_read = u.disk_bytes_read.map(|b| b + 4096);
        u.processes_dropped = Some(2);
        let rows = by_command(&u).unwrap();
        let last = rows.last().unwrap();
        assert_eq!(last.command, NOT_IN_BREAKDOWN);
        assert_eq!((last.process_count, last.thread_count), (2, 3));
        assert_eq!(last.cpu_time_ns, 500_000, "last even though the largest");
        assert_eq!((last.cpu_user_ns, last.cpu_system_ns), (400_000, 100_000));
        assert_eq!(last.disk_bytes_read, Some(4096));
        assert_eq!(last.disk_bytes_written, Some(0));
        assert_eq!(last.max_rss_bytes, None);
        assert_exact(&u, &rows);
    }

    #[test]
    fn unmeasured_fields_are_none_everywhere() {
        let mut u = report(sample());
        u.network_bytes_sent = None;
        u.network_bytes_received = None;
        u.disk_bytes_read = None;
        let rows = by_command(&u).unwrap();
        for r in &rows {
            assert_eq!(r.network_bytes_sent, None);
            assert_eq!(r.disk_bytes_read, None);
            assert!(r.disk_bytes_written.is_some());
        }
        assert_exact(&u, &rows);
    }

    #[test]
    fn withheld_figures_go_to_the_last_row() {
        let mut ps = sample();
        ps[1].disk_bytes_read = None;
        ps[1].withheld = true;
        let mut u = report(ps);
        u.disk_bytes_read = u.disk_bytes_read.map(|b| b + 300);
        let rows = by_command(&u).unwrap();
        assert_eq!(rows.last().unwrap().disk_bytes_read, Some(300));
        assert_exact(&u, &rows);
    }

    #[test]
    fn a_breakdown_past_the_totals_is_scaled_down_never_negative() {
        let mut u = report(sample());
        // The totals' split made over the whole tree: less user time than the processes'.
        u.cpu_user_ns -= 1_001;
        u.cpu_system_ns += 1_001;
        u.thread_count -= 1;
        let rows = by_command(&u).unwrap();
        let last = rows.last().unwrap();
        assert_eq!(last.command, NOT_IN_BREAKDOWN);
        assert_eq!(last.cpu_system_ns, 1_001);
        assert_eq!((last.cpu_user_ns, last.thread_count), (0, 0));
        assert_exact(&u, &rows);
        // Scaled rows stay within their own figures.
        let plain = by_command(&report(sample())).unwrap();
        for (a, b) in rows.iter().zip(&plain) {
            assert!(a.cpu_user_ns <= b.cpu_user_ns && a.thread_count <= b.thread_count);
        }
    }

    #[test]
    fn fitting_is_exact_for_awkward_numbers() {
        let mut col = vec![Some(u64::MAX), Some(3), None, Some(u64::MAX / 3)];
        assert_eq!(fit(&mut col, Some(10)), Some(0));
        assert_eq!(col.iter().map(|c| c.unwrap_or(0)).sum::<u64>(), 10);
        assert_eq!(col[2], None);
        let mut col = vec![Some(1), Some(1), Some(1)];
        assert_eq!(fit(&mut col, Some(2)), Some(0));
        assert_eq!(
            col,
            [Some(1), Some(1), Some(0)],
            "the earliest first among equals"
        );
        let mut col = vec![Some(1)];
        assert_eq!(fit(&mut col, None), None);
        assert_eq!(col, [None]);
    }

    #[test]
    fn refused_processes_are_grouped_but_not_counted() {
        let mut ps = sample();
        let mut refused = process(Some("/usr/bin/cc"), "cc", 0);
        refused.refused = true;
        ps.push(refused.clone());
        ps.push(refused);
        let u = report(ps);
        let rows = by_command(&u).unwrap();
        let cc = rows.iter().find(|r| r.command == "/usr/bin/cc").unwrap();
        assert_eq!((cc.process_count, cc.processes_refused), (5, 2));
        assert_eq!(cc.thread_count, 5);
        assert_exact(&u, &rows);
        assert_eq!(serde_json::to_value(cc).unwrap()["processes_refused"], 2);
    }

    #[test]
    fn a_generated_tree_of_2000_processes_sums_exactly() {
        let ps: Vec<ProcessUsage> = (0..2000u64)
            .map(|i| {
                let name = format!("/usr/bin/tool{}", i % 37);
                let mut p = process(Some(&name), "tool", i * 7_919 % 1_000_003);
                p.thread_count = 1 + i % 3;
                p
            })
            .collect();
        let mut u = report(ps);
        u.cpu_time_ns += 12_345;
        u.cpu_user_ns += 12_345;
        let rows = by_command(&u).unwrap();
        assert_eq!(rows.len(), 38);
        assert!(
            rows[..37]
                .windows(2)
                .all(|w| w[0].cpu_time_ns >= w[1].cpu_time_ns)
        );
        assert_exact(&u, &rows);
    }
}
