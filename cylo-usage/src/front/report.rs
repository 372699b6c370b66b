//! Presenting a [`ResourceUsage`]: human text in the style of GNU `time -v`, or JSON.
//! Nothing here computes a figure.
use std::fmt::Write;

use super::tree::TreeView;
use crate::kernel::features::Feature;
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

const NOT_MEASURED: &str = "not measured";

fn maybe(v: Option<u64>) -> String {
    match v {
        Some(b) => b.to_string(),
        None => NOT_MEASURED.to_string(),
    }
}

/// Human-readable report; `command` is shown as "Command being timed".
pub fn human(usage: &ResourceUsage, command: &str) -> String {
    human_titled(usage, "Command being timed", command)
}

/// [`human`] with another title for what was followed (e.g. "Attached to").
pub fn human_titled(usage: &ResourceUsage, title: &str, what: &str) -> String {
    human_view(usage, title, what, &TreeView::default())
}

/// [`human_titled`] with the per-process tree (`--tree`) drawn as `view` says, and the
/// by-command table under it for a large tree ([`super::commands::under_tree`]).
pub fn human_view(usage: &ResourceUsage, title: &str, what: &str, view: &TreeView) -> String {
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
    let bound = |field: &str, value: String| match usage.lower_bounds.iter().any(|f| f == field) {
        true if value != NOT_MEASURED => format!("at least {value}"),
        _ => value,
    };
    line(
        "Processes",
        bound("process_count", usage.process_count.to_string()),
    );
    line(
        "Threads",
        bound("thread_count", usage.thread_count.to_string()),
    );
    line(
        "Most processes alive at once",
        bound("peak_process_count", maybe(usage.peak_process_count)),
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
    if let Some(n) = usage.tasks_killed_at_birth.filter(|&n| n > 0) {
        line("Tasks killed at birth (past the share)", n.to_string());
    }
    if let Some(n) = usage.tasks_escaped.filter(|&n| n > 0) {
        line("Processes not followed (may still run)", n.to_string());
    }
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
        line("Timed out", timeout_text(usage));
    }
    if let Some(b) = &usage.budgets {
        let set: Vec<String> = b
            .resources()
            .map(|r| format!("{} {}", r.option(), r.show(b.limit(r).unwrap_or(0))))
            .collect();
        line("Budgets", set.join(", "));
        let (p, t) = (
            usage.processes_refused.unwrap_or(0),
            usage.threads_refused.unwrap_or(0),
        );
        if p + t > 0 {
            line(
                "Refused (killed before they ran)",
                format!("{p} processes, {t} threads (a refused process counts in both)"),
            );
        }
    }
    if let Some(e) = &usage.budget_exceeded {
        line(
            "Stopped",
            format!(
                "{e}; every process of the tree was killed (SIGKILL){}",
                match e.enforced {
                    crate::usage::EnforcedBy::Kernel => " at the crossing, in the kernel",
                    crate::usage::EnforcedBy::Sampled => ", as a sample saw it (best effort)",
                }
            ),
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
        out.push_str(&super::tree::render(processes, view));
        if let Some(n) = usage.processes_dropped {
            let _ = writeln!(
                out,
                "\t({n} more processes not kept: the breakdown's limit)"
            );
        }
        out.push_str(&super::commands::under_tree(usage));
    }
    out
}

/// `s` with its backslashes and control characters (terminal escapes, newlines) escaped, as
/// Rust writes them (`\\`, `\n`, `\u{1b}`): what is shown is unambiguous.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\\' || c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
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
/// `layout` is the kernel layout the programs were given (for bug reports), as the daemon and
/// the tracker write it (`Offsets { task_pid: 1264, mm_rss: [976, 1016], ... }`): shown as
/// `name value` pairs in the text, as an object of numbers in JSON (`null` for a field the
/// kernel does not have).
pub fn features(kernel: &str, list: &[Feature], layout: &str, json: bool) -> String {
    let fields = layout_fields(layout);
    if json {
        let layout = match &fields {
            Some(fields) => serde_json::Value::Object(
                fields
                    .iter()
                    .map(|(name, value)| (name.clone(), value.json()))
                    .collect(),
            ),
            None => serde_json::Value::String(layout.to_string()),
        };
        let v = serde_json::json!({ "kernel": kernel, "features": list, "layout": layout });
        return format!("{v}\n");
    }
    let mut out = format!("kernel {kernel}\n");
    for f in list {
        let state = if f.measured { "measured" } else { "unmeasured" };
        let _ = writeln!(out, "{:<24} {:<10} {}", f.counter, state, f.how);
    }
    out.push_str(
        "layout (from BTF: the offsets and flags the programs were given; \"absent\": no \
         such field):\n",
    );
    match &fields {
        Some(fields) => {
            let words: Vec<String> = fields
                .iter()
                .map(|(name, value)| format!("{name} {}", value.text()))
                .collect();
            out.push_str(&wrap(&words, "  ", ", ", 96));
        }
        None => {
            let _ = writeln!(out, "  {}", printable(layout));
        }
    }
    out
}

/// A value of the kernel layout: a number, or a list of numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LayoutValue {
    One(u64),
    List(Vec<u64>),
}

/// The value the layout gives a field the kernel does not have (`cylo_usage_abi::ABSENT`).
const LAYOUT_ABSENT: u64 = u32::MAX as u64;

impl LayoutValue {
    fn json(&self) -> serde_json::Value {
        let one = |v: u64| match v {
            LAYOUT_ABSENT => serde_json::Value::Null,
            v => v.into(),
        };
        match self {
            LayoutValue::One(v) => one(*v),
            LayoutValue::List(vs) => vs.iter().map(|&v| one(v)).collect(),
        }
    }

    fn text(&self) -> String {
        let one = |v: u64| match v {
            LAYOUT_ABSENT => "absent".to_string(),
            v => v.to_string(),
        };
        match self {
            LayoutValue::One(v) => one(*v),
            LayoutValue::List(vs) => {
                let vs: Vec<String> = vs.iter().map(|&v| one(v)).collect();
                format!("[{}]", vs.join(" "))
            }
        }
    }
}

/// The fields of a layout written as Rust writes a struct of numbers and arrays of numbers
/// (`Name { a: 1, b: [2, 3] }`), in order; `None` for anything else.
fn layout_fields(layout: &str) -> Option<Vec<(String, LayoutValue)>> {
    let (_, body) = layout.trim().split_once('{')?;
    let body = body.strip_suffix('}')?.trim();
    let mut fields = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (name, after) = rest.split_once(':')?;
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        let after = after.trim_start();
        let (value, next) = if let Some(list) = after.strip_prefix('[') {
            let (items, next) = list.split_once(']')?;
            let items: Option<Vec<u64>> = items
                .split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(|i| i.parse().ok())
                .collect();
            (LayoutValue::List(items?), next)
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (
                LayoutValue::One(after[..end].trim().parse().ok()?),
                &after[end..],
            )
        };
        fields.push((name.to_string(), value));
        let next = next.trim_start();
        rest = match next.strip_prefix(',') {
            Some(n) => n.trim_start(),
            None if next.is_empty() => next,
            None => return None,
        };
    }
    (!fields.is_empty()).then_some(fields)
}

/// `words` joined by `sep` into lines of at most `width` columns (a longer word alone on its
/// line), each line starting with `indent` and ending with a newline.
fn wrap(words: &[String], indent: &str, sep: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for (i, w) in words.iter().enumerate() {
        let piece = if i + 1 < words.len() {
            format!("{w}{}", sep.trim_end())
        } else {
            w.clone()
        };
        if !line.is_empty() && indent.len() + line.len() + 1 + piece.len() > width {
            let _ = writeln!(out, "{indent}{line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&piece);
    }
    if !line.is_empty() {
        let _ = writeln!(out, "{indent}{line}");
    }
    out
}

/// What a timeout did, as the kill recorded it: which signals reached how many processes,
/// what was spared, and what the tracker could not have reached.
fn timeout_text(usage: &ResourceUsage) -> String {
    let name = |sig: i32| match sig {
        libc::SIGTERM => "SIGTERM".to_string(),
        libc::SIGKILL => "SIGKILL".to_string(),
        libc::SIGINT => "SIGINT".to_string(),
        libc::SIGHUP => "SIGHUP".to_string(),
        n => format!("signal {n}"),
    };
    let plural = |n: u64| if n == 1 { "process" } else { "processes" };
    // A signal that reached nobody (everything had ended at the one before) is not named.
    let sent: Vec<String> = usage
        .signals_sent
        .iter()
        .filter(|s| s.signalled > 0)
        .map(|s| {
            format!(
                "{} to {} {}",
                name(s.signal),
                s.signalled,
                plural(s.signalled)
            )
        })
        .collect();
    let spared = usage
        .signals_sent
        .iter()
        .map(|s| s.spared)
        .max()
        .unwrap_or(0);
    let mut text = match (sent.is_empty(), spared) {
        (false, _) => format!("yes: {}", sent.join(", then ")),
        (true, 0) => "yes: the tree had ended before any signal was sent".to_string(),
        (true, _) => "yes: no process was signalled".to_string(),
    };
    if spared > 0 {
        text.push_str(&format!(
            "; {spared} {} of other users spared (the client may not signal them)",
            plural(spared)
        ));
    }
    if usage.lost_events > 0 {
        text.push_str("; tasks the tracker lost (see lost events) could not be signalled");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_line_says_what_was_signalled_and_what_was_spared() {
        use crate::usage::{SignalSent, TrackerKind};
        let mut u = ResourceUsage::unmeasured(TrackerKind::Daemon);
        u.timed_out = true;
        assert_eq!(
            timeout_text(&u),
            "yes: the tree had ended before any signal was sent"
        );
        SignalSent::record(&mut u.signals_sent, libc::SIGTERM, 3, 0);
        SignalSent::record(&mut u.signals_sent, libc::SIGTERM, 0, 0);
        SignalSent::record(&mut u.signals_sent, libc::SIGKILL, 1, 2);
        assert_eq!(u.signals_sent.len(), 2);
        assert_eq!(
            timeout_text(&u),
            "yes: SIGTERM to 3 processes, then SIGKILL to 1 process; 2 processes of other \
             users spared (the client may not signal them)"
        );
        u.lost_events = 4;
        assert!(timeout_text(&u).ends_with("could not be signalled"));
    }

    #[test]
    fn a_sigkill_that_reached_nobody_is_not_named() {
        use crate::usage::{SignalSent, TrackerKind};
        let mut u = ResourceUsage::unmeasured(TrackerKind::InProcess);
        u.timed_out = true;
        SignalSent::record(&mut u.signals_sent, libc::SIGTERM, 2, 0);
        SignalSent::record(&mut u.signals_sent, libc::SIGKILL, 0, 0);
        assert_eq!(timeout_text(&u), "yes: SIGTERM to 2 processes");
        let mut u = ResourceUsage::unmeasured(TrackerKind::Daemon);
        SignalSent::record(&mut u.signals_sent, libc::SIGTERM, 0, 1);
        assert_eq!(
            timeout_text(&u),
            "yes: no process was signalled; 1 process of other users spared (the client may \
             not signal them)"
        );
    }

    #[test]
    fn lower_bounds_say_at_least_where_shown() {
        use crate::usage::TrackerKind;
        let mut u = ResourceUsage::unmeasured(TrackerKind::Proc);
        u.process_count = 9;
        u.thread_count = 12;
        u.peak_process_count = Some(3);
        let text = human(&u, "x");
        assert!(text.contains("\tProcesses: 9\n"), "{text}");
        u.lower_bounds = crate::session::fallback::account::sampled_counts();
        let text = human(&u, "x");
        assert!(text.contains("\tProcesses: at least 9\n"), "{text}");
        assert!(text.contains("\tThreads: at least 12\n"), "{text}");
        assert!(
            text.contains("\tMost processes alive at once: at least 3\n"),
            "{text}"
        );
        // Not measured stays "not measured".
        u.peak_process_count = None;
        let text = human(&u, "x");
        assert!(
            text.contains("\tMost processes alive at once: not measured\n"),
            "{text}"
        );
        let j: serde_json::Value = serde_json::from_str(&json(&u)).unwrap();
        assert_eq!(
            j["lower_bounds"],
            serde_json::json!(["process_count", "thread_count", "peak_process_count"])
        );
    }

    #[test]
    fn the_layout_reads_as_text_and_as_structured_json() {
        let layout = "Offsets { task_pid: 1264, mm_rss: [976, 1016, 1056, 1096], \
                      bio_disk: 4294967295, net_hooks: 3 }";
        let text = features("6.1.0", &[], layout, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "kernel 6.1.0");
        assert!(!text.contains("Offsets {"), "{text}");
        assert!(
            text.contains(
                "  task_pid 1264, mm_rss [976 1016 1056 1096], bio_disk absent, net_hooks 3\n"
            ),
            "{text}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&features("6.1.0", &[], layout, true)).unwrap();
        assert_eq!(j["layout"]["task_pid"], 1264);
        assert_eq!(
            j["layout"]["mm_rss"],
            serde_json::json!([976, 1016, 1056, 1096])
        );
        assert!(j["layout"]["bio_disk"].is_null());
        // The real layout parses whole: every field, in order.
        let real = format!("{:?}", cylo_usage_abi::Offsets::UNRESOLVED);
        let fields = layout_fields(&real).expect("the real layout parses");
        assert_eq!(fields.first().unwrap().0, "task_pid");
        assert_eq!(fields.len(), real.matches(':').count());
        // Anything else is shown as it came.
        assert_eq!(layout_fields("weird"), None);
        assert_eq!(layout_fields("X { a: b }"), None);
        let text = features("6.1.0", &[], "weird", false);
        assert!(text.ends_with("  weird\n"), "{text}");
        let j: serde_json::Value =
            serde_json::from_str(&features("6.1.0", &[], "weird", true)).unwrap();
        assert_eq!(j["layout"], "weird");
    }

    #[test]
    fn long_lines_wrap() {
        let words: Vec<String> = (0..30).map(|i| format!("field_{i} {i}")).collect();
        let text = wrap(&words, "  ", ", ", 40);
        for l in text.lines() {
            assert!(l.len() <= 40 && l.starts_with("  "), "{l:?}");
        }
        assert_eq!(text.matches("field_").count(), 30);
        assert!(text.ends_with("field_29 29\n"));
    }

    use crate::kernel::features::{Measured, NetworkPath};
    use crate::usage::{DiskDevice, LiveSample, RootExit, Units, merge};
    use cylo_usage_abi::{RunCounters, ThreadUsage};

    #[test]
    fn human_report_names_every_field() {
        let c = RunCounters {
            total: ThreadUsage {
                cpu_runtime_ns: 1_500_000_000,
                cpu_utime_ns: 1,
                cpu_stime_ns: 1,
                ..ThreadUsage::default()
            },
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
        let live = LiveSample {
            complete: true,
            devices: vec![DiskDevice {
                device: "254:0".into(),
                read_bytes: 4096,
                write_bytes: 8192,
                read_ops: 1,
                write_ops: 2,
            }],
            ..LiveSample::default()
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
