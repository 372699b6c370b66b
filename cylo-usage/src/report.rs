//! Presenting a [`ResourceUsage`]: human text in the style of GNU `time -v`, or JSON.
//! Nothing here computes a figure.
use std::fmt::Write;

use crate::features::Feature;
use crate::tree::ProcessUsage;
use crate::usage::{NetworkUsage, Precision, ResourceUsage, TrackerKind};

/// One flat JSON object with the field names of [`ResourceUsage`], and a newline.
pub fn json(usage: &ResourceUsage) -> String {
    let mut s = serde_json::to_string(usage).expect("ResourceUsage always serialises");
    s.push('\n');
    s
}

fn seconds(ns: u64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

fn maybe(v: Option<u64>) -> String {
    match v {
        Some(b) => b.to_string(),
        None => "not measured".to_string(),
    }
}

/// Human-readable report; `command` is shown as "Command being timed".
pub fn human(usage: &ResourceUsage, command: &str) -> String {
    human_titled(usage, "Command being timed", command)
}

/// [`human`] with another title for what was followed (e.g. "Attached to").
pub fn human_titled(usage: &ResourceUsage, title: &str, what: &str) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "\t{label}: {value}");
    };
    line(title, format!("{what:?}"));
    line("CPU time (seconds)", seconds(usage.cpu_time_ns));
    line("User time (seconds)", seconds(usage.cpu_user_ns));
    line("System time (seconds)", seconds(usage.cpu_system_ns));
    let wall_ms = usage.wall_time_ms;
    line(
        "Elapsed (wall clock) time (seconds)",
        format!("{}.{:03}", wall_ms / 1000, wall_ms % 1000),
    );
    if wall_ms > 0 {
        let pct = usage.cpu_time_ns as u128 * 100 / (wall_ms as u128 * 1_000_000);
        line("Percent of CPU this job got", format!("{pct}%"));
    }
    line("Processes", usage.process_count.to_string());
    line("Threads", usage.thread_count.to_string());
    line(
        "Most processes alive at once",
        maybe(usage.peak_process_count),
    );
    line(
        "Processes still alive",
        usage.live_process_count.to_string(),
    );
    line("Disk bytes read", maybe(usage.disk_bytes_read));
    line("Disk bytes written", maybe(usage.disk_bytes_written));
    line(
        "Disk writes cancelled (bytes)",
        maybe(usage.disk_cancelled_write_bytes),
    );
    match &usage.disk_devices {
        None => line("Block I/O by device", "not measured".to_string()),
        Some(devices) if devices.is_empty() => line("Block I/O by device", "none".to_string()),
        Some(devices) => {
            for d in devices {
                line(
                    &format!("Block I/O on {}", d.device),
                    format!(
                        "{} bytes read in {} requests, {} bytes written in {} requests",
                        d.read_bytes, d.read_ops, d.write_bytes, d.write_ops
                    ),
                );
            }
        }
    }
    line("Bytes read by syscalls", maybe(usage.io_read_chars));
    line("Bytes written by syscalls", maybe(usage.io_write_chars));
    line("Memory (bytes)", maybe(usage.memory_bytes));
    line("Peak memory (bytes)", maybe(usage.peak_memory_bytes));
    line(
        "Maximum resident set size of one process (bytes)",
        maybe(usage.max_process_rss_bytes),
    );
    line("Network bytes sent", maybe(usage.network_bytes_sent));
    line(
        "Network bytes received",
        maybe(usage.network_bytes_received),
    );
    network_lines(usage, &mut line);
    line("Lost events", usage.lost_events.to_string());
    line(
        "Precision",
        match usage.precision {
            Precision::Exact => "exact".to_string(),
            Precision::Approximate => "approximate".to_string(),
        },
    );
    for note in &usage.precision_notes {
        line("Approximate", printable(note));
    }
    line(
        "Tracker",
        match usage.tracker {
            TrackerKind::InProcess => "in-process (eBPF)".to_string(),
            TrackerKind::Daemon => "daemon (eBPF, cylo-usage serve)".to_string(),
            TrackerKind::Proc => "proc (no eBPF: wait4() and /proc samples)".to_string(),
        },
    );
    match (usage.exit_code, usage.signal) {
        (_, Some(sig)) => line("Command terminated by signal", sig.to_string()),
        (Some(code), None) => line("Exit status", code.to_string()),
        (None, None) if usage.tracker == TrackerKind::Proc && usage.attached => line(
            "Exit status",
            "unknown (not the tracker's child, and no sample saw it exit)".to_string(),
        ),
        (None, None) => line("Exit status", "still running".to_string()),
    }
    if usage.timed_out {
        line(
            "Timed out",
            "yes: the whole tree was sent SIGTERM, then SIGKILL".to_string(),
        );
    }
    if usage.attached {
        line(
            "Attached",
            "yes: the figures above are since the attach; children that had exited before it \
             are unknowable"
                .to_string(),
        );
        if let Some(b) = &usage.usage_before_attach {
            line(
                "Used before the attach",
                format!(
                    "{} s CPU, {} disk bytes read, {} written, by {} processes ({} threads)",
                    seconds(b.cpu_time_ns),
                    maybe(b.disk_bytes_read),
                    maybe(b.disk_bytes_written),
                    b.process_count,
                    b.thread_count
                ),
            );
        }
    }
    if let Some(processes) = &usage.processes {
        out.push_str(&tree(processes));
        if let Some(n) = usage.processes_dropped {
            let _ = writeln!(
                out,
                "\t({n} more processes not kept: the breakdown's limit)"
            );
        }
    }
    out
}

/// `s` with control characters (terminal escapes, newlines) shown escaped.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The command a process ran: its argv (as set at its last exec), else its comm.
fn command_of(p: &ProcessUsage) -> String {
    let text = match &p.argv {
        Some(argv) if !argv.is_empty() => {
            let mut s = argv.join(" ");
            if p.argv_truncated {
                s.push_str(" ...");
            }
            s
        }
        _ => format!("[{}]", p.comm),
    };
    printable(&text)
}

fn bytes(v: Option<u64>) -> String {
    match v {
        None => "-".to_string(),
        Some(b) if b >= 10 << 20 => format!("{}M", b >> 20),
        Some(b) if b >= 10 << 10 => format!("{}K", b >> 10),
        Some(b) => b.to_string(),
    }
}

fn ended(p: &ProcessUsage) -> String {
    match (p.exit_code, p.signal, p.end_ns) {
        (_, Some(sig), _) => format!("signal {sig}"),
        (Some(code), None, _) => format!("exit {code}"),
        _ => "running".to_string(),
    }
}

/// The per-process breakdown as an indented tree. Leaf siblings running the same command are
/// folded into one line with their count and sums (`2000 × /bin/true`).
pub fn tree(processes: &[ProcessUsage]) -> String {
    /// Indentation stops growing here (a chain of thousands of processes stays readable).
    const MAX_INDENT: usize = 32;
    enum Work {
        Group(usize, Vec<usize>),
        Line(usize, Vec<usize>),
    }
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); processes.len()];
    let mut roots = Vec::new();
    for (i, p) in processes.iter().enumerate() {
        match p.parent_index.filter(|&j| j < i) {
            Some(j) => children[j].push(i),
            None => roots.push(i),
        }
    }
    let mut out = String::from(
        "\tProcesses (pid command: CPU seconds, threads, disk read/written, peak RSS, end):\n",
    );
    // Depth-first with an explicit stack: deep chains must not overflow the call stack.
    let mut stack = vec![Work::Group(1, roots)];
    while let Some(work) = stack.pop() {
        match work {
            Work::Group(depth, group) => {
                // Fold leaves with the same command, at the place of the first one.
                let mut lines: Vec<(String, Vec<usize>)> = Vec::new();
                for i in group {
                    let cmd = command_of(&processes[i]);
                    if children[i].is_empty()
                        && let Some((_, same)) = lines
                            .iter_mut()
                            .find(|(c, v)| *c == cmd && children[v[0]].is_empty())
                    {
                        same.push(i);
                        continue;
                    }
                    lines.push((cmd, vec![i]));
                }
                for (_, members) in lines.into_iter().rev() {
                    stack.push(Work::Line(depth, members));
                }
            }
            Work::Line(depth, members) => {
                let ps: Vec<&ProcessUsage> = members.iter().map(|&i| &processes[i]).collect();
                let indent = "  ".repeat(depth.min(MAX_INDENT));
                let cmd = command_of(ps[0]);
                let cpu: u64 = ps.iter().map(|p| p.cpu_time_ns).sum();
                let threads: u64 = ps.iter().map(|p| p.thread_count).sum();
                let read: Option<u64> = ps.iter().map(|p| p.disk_bytes_read).sum();
                let written: Option<u64> = ps.iter().map(|p| p.disk_bytes_written).sum();
                let peak = ps.iter().filter_map(|p| p.peak_memory_bytes).max();
                let figures = format!(
                    "{} s, {threads} thr, disk {}/{}, rss {}",
                    seconds(cpu),
                    bytes(read),
                    bytes(written),
                    bytes(peak),
                );
                if let [p] = ps.as_slice() {
                    let _ = writeln!(out, "\t{indent}{} {cmd}: {figures}, {}", p.pid, ended(p));
                    let kids = &children[members[0]];
                    if !kids.is_empty() {
                        stack.push(Work::Group(depth + 1, kids.clone()));
                    }
                } else {
                    let mut ends: Vec<String> = ps.iter().map(|p| ended(p)).collect();
                    ends.sort();
                    ends.dedup();
                    let _ = writeln!(
                        out,
                        "\t{indent}{} × {cmd}: {figures} (sums; rss: the largest), {}",
                        ps.len(),
                        ends.join(" / ")
                    );
                }
            }
        }
    }
    out
}

/// The socket bytes by kind, one line each; AF_UNIX on its own line, apart from the totals.
fn network_lines(usage: &ResourceUsage, line: &mut impl FnMut(&str, String)) {
    let pair = |sent: Option<u64>, received: Option<u64>| match (sent, received) {
        (Some(s), Some(r)) => format!("{s} sent, {r} received"),
        _ => "not measured".to_string(),
    };
    let n = usage.network.as_ref();
    let get = |f: fn(&NetworkUsage) -> Option<u64>| n.and_then(f);
    line(
        "TCP bytes",
        pair(get(|n| Some(n.tcp_sent)), get(|n| Some(n.tcp_received))),
    );
    line(
        "UDP bytes",
        pair(get(|n| Some(n.udp_sent)), get(|n| Some(n.udp_received))),
    );
    line(
        "Unix socket bytes",
        pair(get(|n| Some(n.unix_sent)), get(|n| Some(n.unix_received))),
    );
    line(
        "Other socket bytes",
        pair(get(|n| n.other_sent), get(|n| n.other_received)),
    );
}

/// The kernel and the list of counters with how each is measured, as text or JSON.
/// `layout` is the kernel layout the programs were given (for bug reports).
pub fn features(kernel: &str, list: &[Feature], layout: &str, json: bool) -> String {
    if json {
        let v = serde_json::json!({ "kernel": kernel, "features": list, "layout": layout });
        return format!("{v}\n");
    }
    let mut out = format!("kernel {kernel}\nlayout {layout}\n");
    for f in list {
        let state = if f.measured { "measured" } else { "unmeasured" };
        let _ = writeln!(out, "{:<24} {:<10} {}", f.counter, state, f.how);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(pid: u32, parent: Option<usize>, argv: &[&str], cpu: u64) -> ProcessUsage {
        ProcessUsage {
            pid,
            ns_pid: None,
            ppid: 1,
            parent_index: parent,
            comm: argv.first().copied().unwrap_or("x").to_string(),
            argv: Some(argv.iter().map(|a| a.to_string()).collect()),
            argv_truncated: false,
            filename: None,
            start_ns: 0,
            end_ns: Some(5),
            exit_code: Some(0),
            signal: None,
            attached: false,
            thread_count: 1,
            cpu_time_ns: cpu,
            cpu_user_ns: cpu,
            cpu_system_ns: 0,
            disk_bytes_read: Some(0),
            disk_bytes_written: Some(0),
            disk_cancelled_write_bytes: Some(0),
            io_read_chars: Some(0),
            io_write_chars: Some(0),
            peak_memory_bytes: Some(4096),
            network_bytes_sent: None,
            network_bytes_received: None,
        }
    }

    #[test]
    fn the_tree_nests_folds_leaves_and_escapes() {
        let mut ps = vec![proc(10, None, &["sh", "-c", "x"], 100)];
        for i in 0..2000 {
            ps.push(proc(11 + i, Some(0), &["/bin/true"], 1));
        }
        ps.push(proc(5000, Some(0), &["make", "\x1b[2J\n"], 7));
        ps.push(proc(5001, Some(2001), &["cc"], 3));
        ps[5].signal = Some(9);
        ps[5].exit_code = None;
        let text = tree(&ps);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(
            lines[1].starts_with("\t  10 sh -c x: 0.000000100 s"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("\t    2000 × /bin/true: 0.000002000 s, 2000 thr"),
            "{text}"
        );
        assert!(lines[2].ends_with("exit 0 / signal 9"), "{text}");
        assert!(lines[3].contains("5000 make \\u{1b}[2J\\n: "), "{text}");
        assert!(lines[4].starts_with("\t      5001 cc: "), "{text}");
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn a_deep_chain_does_not_overflow() {
        let ps: Vec<ProcessUsage> = (0..100_000)
            .map(|i| proc(i + 1, i.checked_sub(1).map(|p| p as usize), &["sh"], 1))
            .collect();
        let text = tree(&ps);
        assert_eq!(text.lines().count(), 100_001);
    }
    use crate::features::{Measured, NetworkPath};
    use crate::usage::{DiskDevice, Live, RootExit, Units, merge};
    use cylo_usage_abi::RunCounters;

    #[test]
    fn human_report_names_every_field() {
        let c = RunCounters {
            cpu_runtime_ns: 1_500_000_000,
            cpu_utime_ns: 1,
            cpu_stime_ns: 1,
            processes_started: 3,
            threads_started: 4,
            processes_peak: 2,
            net_tcp_sent: 10,
            net_tcp_received: 20,
            net_udp_sent: 1,
            net_udp_received: 2,
            net_unix_sent: 300,
            net_unix_received: 400,
            ..Default::default()
        };
        let root = RootExit {
            exit_code: Some(3),
            signal: None,
        };
        let live = Live {
            complete: true,
            devices: vec![DiskDevice {
                device: "254:0".into(),
                read_bytes: 4096,
                write_bytes: 8192,
                read_ops: 1,
                write_ops: 2,
            }],
            ..Live::default()
        };
        let units = Units {
            ticks_per_second: 100,
            page_size: 4096,
        };
        let measured = Measured {
            io_chars: false,
            network: Some(NetworkPath::Functions { sendpage: true }),
            ..Measured::ALL
        };
        let u = merge(&c, measured, &live, units, root, 2000);
        let text = human(&u, "sh -c 'x'");
        assert!(text.contains("\tCPU time (seconds): 1.500000000\n"));
        assert!(text.contains("\tUser time (seconds): 0.750000000\n"));
        assert!(text.contains("\tPercent of CPU this job got: 75%\n"));
        assert!(text.contains("\tProcesses: 3\n"));
        assert!(text.contains("\tDisk bytes read: 0\n"));
        assert!(text.contains("\tBytes read by syscalls: not measured\n"));
        assert!(text.contains(
            "\tBlock I/O on 254:0: 4096 bytes read in 1 requests, 8192 bytes written in 2 requests\n"
        ));
        assert!(text.contains("\tPrecision: exact\n"));
        assert!(text.contains("\tNetwork bytes sent: 11\n"));
        assert!(text.contains("\tNetwork bytes received: 22\n"));
        assert!(text.contains("\tTCP bytes: 10 sent, 20 received\n"));
        assert!(text.contains("\tUDP bytes: 1 sent, 2 received\n"));
        assert!(text.contains("\tUnix socket bytes: 300 sent, 400 received\n"));
        assert!(text.contains("\tOther socket bytes: not measured\n"));
        assert!(text.contains("\tTracker: in-process (eBPF)\n"));
        assert!(!text.contains("Approximate:"));
        assert!(text.contains("\tExit status: 3\n"));
        assert!(json(&u).ends_with("}\n"));
    }
}
