//! Presenting a [`ResourceUsage`]: human text in the style of GNU `time -v`, or JSON.
//! Nothing here computes a figure.
use std::fmt::Write;

use crate::features::Feature;
use crate::usage::{NetworkUsage, Precision, ResourceUsage};

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
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "\t{label}: {value}");
    };
    line("Command being timed", format!("{command:?}"));
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
    match (usage.exit_code, usage.signal) {
        (_, Some(sig)) => line("Command terminated by signal", sig.to_string()),
        (Some(code), None) => line("Exit status", code.to_string()),
        (None, None) => line("Exit status", "still running".to_string()),
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
    use crate::usage::{DiskDevice, Live, Measured, NetworkPath, RootExit, Units, merge};
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
        assert!(text.contains("\tExit status: 3\n"));
        assert!(json(&u).ends_with("}\n"));
    }
}
