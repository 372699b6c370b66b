//! `--trace FILE.json`: the run as a timeline in the Chrome trace event format (the JSON
//! Object Format), which Perfetto (ui.perfetto.dev) and chrome://tracing open, as they open
//! Bazel's JSON profile and ninjatracing's output.
//!
//! The layout:
//! - one trace "process" named after the root command (its `pid` is the root's pid), holding
//!   one thread track per process of the breakdown (`tid` = its pid), named "PID name" and
//!   ordered depth first, children right after their parent, each level indented by "· ";
//! - one complete event (`"ph":"X"`) per process on its track, from its start to its end (to
//!   the end of the report while it still runs), named after what it ran (the exec'd file's
//!   name, else `[comm]`), with its figures in `args` under the names the JSON report uses;
//! - counter tracks (`"ph":"C"`): `live processes`, exactly from the processes' starts and
//!   ends (from the samples when the breakdown is absent or incomplete), and `tree RSS`,
//!   `disk read` and `disk written` bytes from the samples (a counter whose samples are all
//!   unmeasured is left out);
//! - a global instant `session start` and `otherData` with the `--events` anchor and the
//!   report's totals.
//!
//! Timestamps are µs (fractions keep the ns). `ts` 0 is the session start, or the earliest
//! start before it when the session attached to running processes (a trace has no negative
//! times): an `--events` line's `time_ns` T is at `ts` = (T - `otherData.ts_zero_session_ns`)
//! / 1000, and `otherData` gives the monotonic and wall clocks of `ts` 0 too.
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::usage::{ProcessUsage, ResourceUsage};

/// What the command line samples of a run while it goes on (its totals every ~100 ms): the
/// counters of the timeline that the breakdown cannot give.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TimelineSample {
    /// When, in ns since the session started.
    pub time_ns: u64,
    /// Processes alive then ([`ResourceUsage::live_process_count`]).
    pub live_processes: u64,
    /// Resident memory of the tree then ([`ResourceUsage::memory_bytes`]); `None` where not
    /// measured.
    pub memory_bytes: Option<u64>,
    /// Bytes read from storage so far ([`ResourceUsage::disk_bytes_read`]).
    pub disk_bytes_read: Option<u64>,
    /// Bytes written to storage so far ([`ResourceUsage::disk_bytes_written`]).
    pub disk_bytes_written: Option<u64>,
}

impl TimelineSample {
    /// A sample of `usage` (a totals snapshot, `Run::usage_totals`) taken `time_ns` after the
    /// session start.
    pub fn of(usage: &ResourceUsage, time_ns: u64) -> TimelineSample {
        TimelineSample {
            time_ns,
            live_processes: usage.live_process_count,
            memory_bytes: usage.memory_bytes,
            disk_bytes_read: usage.disk_bytes_read,
            disk_bytes_written: usage.disk_bytes_written,
        }
    }
}

/// The session start on the machine's clocks: what the first line of the `--events` stream
/// says (`{"event":"start","time_ns":0,"clock":"CLOCK_MONOTONIC",...}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceAnchor {
    /// `CLOCK_MONOTONIC` at the session start, in ns.
    pub monotonic_ns: u64,
    /// The wall clock at the session start, in ns since the Unix epoch.
    pub unix_time_ns: u64,
}

impl TraceAnchor {
    /// The anchor in an `--events` line (the stream's first, `"event":"start"`); `None` for
    /// any other line.
    pub fn from_event_line(line: &str) -> Option<TraceAnchor> {
        let v: Value = serde_json::from_str(line).ok()?;
        if v["event"] != "start" {
            return None;
        }
        Some(TraceAnchor {
            monotonic_ns: v["monotonic_ns"].as_u64()?,
            unix_time_ns: v["unix_time_ns"].as_u64()?,
        })
    }
}

/// The indentation of one level of the tree in a track's name (visible: chrome://tracing
/// collapses leading spaces).
const INDENT: &str = "· ";
/// The deepest indentation shown; deeper levels say their depth instead.
const MAX_INDENT: usize = 24;
/// Above every pid the kernel gives (`PID_MAX_LIMIT`): a pid the tree reused gets a track of
/// its own at `pid + k * PID_SPACE`.
const PID_SPACE: u64 = 1 << 22;

/// `usage` (with its breakdown, `--tree`) and `samples` as a Chrome trace (JSON Object
/// Format): see the module's documentation for the layout. `anchor`, the session start on the
/// machine's clocks, goes into `otherData` and the `session start` event when given.
pub fn chrome_trace(
    usage: &ResourceUsage,
    samples: &[TimelineSample],
    anchor: Option<&TraceAnchor>,
) -> Value {
    let procs: &[ProcessUsage] = usage.processes.as_deref().unwrap_or_default();
    let mut samples = samples.to_vec();
    samples.sort_by_key(|s| s.time_ns);
    // ts 0: the session start, or the earliest start before an attach.
    let zero = procs
        .iter()
        .map(|p| i128::from(p.start_ns))
        .min()
        .unwrap_or(0)
        .min(0);
    let end = report_end(usage, procs, &samples);
    let ts = |t: i128| (t - zero) as f64 / 1000.0;
    let trace_pid = procs.first().map_or(1, |p| id_of(p.pid));
    let command = procs
        .first()
        .map_or_else(|| "cylo-usage".to_string(), root_command);

    let mut events = vec![json!({
        "ph": "M", "name": "process_name", "pid": trace_pid, "tid": trace_pid,
        "args": {"name": command},
    })];
    let mut start_args = Map::new();
    start_args.insert("time_ns".into(), json!(0));
    if let Some(a) = anchor {
        start_args.insert("clock".into(), json!("CLOCK_MONOTONIC"));
        start_args.insert("monotonic_ns".into(), json!(a.monotonic_ns));
        start_args.insert("unix_time_ns".into(), json!(a.unix_time_ns));
    }
    events.push(json!({
        "ph": "i", "s": "g", "name": "session start", "cat": "session",
        "ts": ts(0), "pid": trace_pid, "tid": trace_pid, "args": start_args,
    }));

    let tids = track_ids(procs);
    for (sort_index, (i, depth)) in tree_order(procs).into_iter().enumerate() {
        let p = &procs[i];
        let tid = tids[i];
        let label = label_of(p);
        events.push(json!({
            "ph": "M", "name": "thread_name", "pid": trace_pid, "tid": tid,
            "args": {"name": format!("{}{} {label}", indent(depth), p.pid)},
        }));
        events.push(json!({
            "ph": "M", "name": "thread_sort_index", "pid": trace_pid, "tid": tid,
            "args": {"sort_index": sort_index},
        }));
        let start = i128::from(p.start_ns);
        let stop = p.end_ns.map_or(end, i128::from).max(start);
        events.push(json!({
            "ph": "X", "name": label, "cat": category(p), "pid": trace_pid, "tid": tid,
            "ts": ts(start), "dur": (stop - start) as f64 / 1000.0,
            "args": process_args(p, procs),
        }));
    }

    let complete = usage.processes.is_some() && usage.processes_dropped.unwrap_or(0) == 0;
    let mut counter = |name: &str, key: &str, points: Vec<(i128, u64)>| {
        for (t, v) in points {
            events.push(json!({
                "ph": "C", "name": name, "pid": trace_pid, "tid": trace_pid,
                "ts": ts(t), "args": {key: v},
            }));
        }
    };
    if complete {
        counter("live", "processes", live_counter(procs, zero, end));
    } else {
        let live_now = Some(usage.live_process_count);
        let points = sampled(&samples, end, |s| Some(s.live_processes), live_now);
        counter("live (sampled)", "processes", points);
    }
    counter(
        "tree RSS",
        "bytes",
        sampled(&samples, end, |s| s.memory_bytes, usage.memory_bytes),
    );
    counter(
        "disk read",
        "bytes",
        sampled(&samples, end, |s| s.disk_bytes_read, usage.disk_bytes_read),
    );
    counter(
        "disk written",
        "bytes",
        sampled(
            &samples,
            end,
            |s| s.disk_bytes_written,
            usage.disk_bytes_written,
        ),
    );

    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": other_data(usage, anchor, &command, zero, end),
    })
}

/// [`chrome_trace`] written to `path` (created or truncated).
pub fn write_chrome_trace(
    path: impl AsRef<Path>,
    usage: &ResourceUsage,
    samples: &[TimelineSample],
    anchor: Option<&TraceAnchor>,
) -> std::io::Result<()> {
    let trace = chrome_trace(usage, samples, anchor);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    serde_json::to_writer(&mut out, &trace).map_err(std::io::Error::other)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// The end of the report, in ns since the session start: its wall time, or later where an
/// end or a sample is later.
fn report_end(usage: &ResourceUsage, procs: &[ProcessUsage], samples: &[TimelineSample]) -> i128 {
    let wall = i128::from(usage.wall_time_ms) * 1_000_000;
    let ends = procs
        .iter()
        .map(|p| p.end_ns.map_or(i128::from(p.start_ns), i128::from));
    let times = samples.iter().map(|s| i128::from(s.time_ns));
    ends.chain(times).fold(wall.max(0), i128::max)
}

/// A pid as a trace id (Perfetto reads ids as unsigned 32-bit numbers).
fn id_of(pid: libc::pid_t) -> u64 {
    u64::try_from(pid).unwrap_or(0)
}

/// Each process's track: its pid, unless an earlier process of the tree had it (a reused
/// pid), or it is not a pid (0), then `pid + k * PID_SPACE`, past every real pid.
fn track_ids(procs: &[ProcessUsage]) -> Vec<u64> {
    let mut used = HashSet::with_capacity(procs.len());
    procs
        .iter()
        .map(|p| {
            let mut tid = match id_of(p.pid) {
                0 => PID_SPACE,
                pid => pid,
            };
            while !used.insert(tid) {
                tid += PID_SPACE;
            }
            tid
        })
        .collect()
}

/// The processes depth first (index, depth): each root in start order, then its children in
/// start order, each followed by its own. A parent link that is out of range or makes a
/// circle starts a root.
fn tree_order(procs: &[ProcessUsage]) -> Vec<(usize, usize)> {
    let n = procs.len();
    let mut children = vec![Vec::new(); n];
    let mut roots = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        match p.parent_index {
            Some(parent) if parent < n && parent != i => children[parent].push(i),
            _ => roots.push(i),
        }
    }
    let mut seen = vec![false; n];
    let mut order = Vec::with_capacity(n);
    let mut stack = Vec::new();
    // Roots first; then whatever a circle kept out of reach, from its first process.
    for start in roots.into_iter().chain(0..n) {
        if seen[start] {
            continue;
        }
        stack.push((start, 0));
        while let Some((i, depth)) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            order.push((i, depth));
            stack.extend(children[i].iter().rev().map(|&c| (c, depth + 1)));
        }
    }
    order
}

/// The indentation of a track at `depth`.
fn indent(depth: usize) -> String {
    if depth <= MAX_INDENT {
        INDENT.repeat(depth)
    } else {
        format!("{}+{} ", INDENT.repeat(MAX_INDENT), depth - MAX_INDENT)
    }
}

/// `s` for display: control characters (and bidirectional ones) escaped, at most `max` characters ("..." after).
fn clean(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max + 8));
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push_str("...");
            break;
        }
        if c.is_control() || is_bidi_control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The characters that reorder the text after them (a name could make a track's name read
/// backwards).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// What a process ran, short: the name of the file it exec'd (else of its argv[0]), else
/// `[comm]` (it never exec'd while followed, or its argv is withheld), as the tree marks it.
fn label_of(p: &ProcessUsage) -> String {
    let exec = p
        .filename
        .as_deref()
        .or_else(|| p.argv.as_ref()?.first().map(String::as_str))
        .map(|f| f.rsplit('/').next().unwrap_or(f))
        .filter(|name| !name.is_empty());
    match exec {
        Some(name) => clean(name, 64),
        None => format!("[{}]", clean(&p.comm, 64)),
    }
}

/// The root's command line, its program by name (`make -j2`, at most 120 characters), else
/// its label.
fn root_command(p: &ProcessUsage) -> String {
    match p.argv.as_deref() {
        Some([program, args @ ..]) => {
            let name = program.rsplit('/').next().unwrap_or(program);
            let line = std::iter::once(name).chain(args.iter().map(String::as_str));
            clean(&line.collect::<Vec<_>>().join(" "), 120)
        }
        _ => label_of(p),
    }
}

/// The event's categories (comma-separated, as the format has them): `process`, and how it
/// was followed or ended.
fn category(p: &ProcessUsage) -> String {
    let mut cat = String::from("process");
    for (flag, name) in [
        (p.attached, ",attached"),
        (p.refused, ",refused"),
        (p.withheld, ",withheld"),
        (p.end_ns.is_none(), ",running"),
        (p.signal.is_some(), ",signaled"),
        (p.exit_code.is_some_and(|c| c != 0), ",failed"),
    ] {
        if flag {
            cat.push_str(name);
        }
    }
    cat
}

/// A process's figures, under the names the JSON report gives them; unmeasured ones left
/// out.
fn process_args(p: &ProcessUsage, procs: &[ProcessUsage]) -> Value {
    let mut a = Map::new();
    let mut put = |key: &str, value: Value| {
        a.insert(key.to_string(), value);
    };
    put("pid", json!(p.pid));
    if let Some(ns_pid) = p.ns_pid {
        put("ns_pid", json!(ns_pid));
    }
    put("ppid", json!(p.ppid));
    if let Some(parent) = p.parent_index.and_then(|i| procs.get(i)) {
        put(
            "parent",
            json!(format!("{} {}", parent.pid, label_of(parent))),
        );
    }
    put("comm", json!(p.comm));
    if let Some(argv) = &p.argv {
        put("argv", json!(argv));
        put("command", json!(argv.join(" ")));
    }
    if p.argv_truncated {
        put("argv_truncated", json!(true));
    }
    if let Some(f) = &p.filename {
        put("filename", json!(f));
    }
    put("start_ns", json!(p.start_ns));
    match p.end_ns {
        Some(end) => put("end_ns", json!(end)),
        None => put("running", json!(true)),
    }
    if let Some(code) = p.exit_code {
        put("exit_code", json!(code));
    }
    if let Some(signal) = p.signal {
        put("signal", json!(signal));
    }
    put("thread_count", json!(p.thread_count));
    put("cpu_time_ns", json!(p.cpu_time_ns));
    put("cpu_user_ns", json!(p.cpu_user_ns));
    put("cpu_system_ns", json!(p.cpu_system_ns));
    for (key, value) in [
        ("disk_bytes_read", p.disk_bytes_read),
        ("disk_bytes_written", p.disk_bytes_written),
        ("disk_cancelled_write_bytes", p.disk_cancelled_write_bytes),
        ("io_read_chars", p.io_read_chars),
        ("io_write_chars", p.io_write_chars),
        ("peak_memory_bytes", p.peak_memory_bytes),
        ("network_bytes_sent", p.network_bytes_sent),
        ("network_bytes_received", p.network_bytes_received),
    ] {
        if let Some(v) = value {
            put(key, json!(v));
        }
    }
    for (key, flag) in [
        ("attached", p.attached),
        ("refused", p.refused),
        ("withheld", p.withheld),
    ] {
        if flag {
            put(key, json!(true));
        }
    }
    Value::Object(a)
}

/// The processes alive over time, exactly: +1 at each start, -1 at each end, one point per
/// distinct time (the count after every change at that time), from `ts` 0 to `end`. Refused
/// processes never ran and are not counted (as in the report's counts).
fn live_counter(procs: &[ProcessUsage], zero: i128, end: i128) -> Vec<(i128, u64)> {
    let mut changes: Vec<(i128, i64)> = Vec::with_capacity(2 * procs.len());
    for p in procs.iter().filter(|p| !p.refused) {
        let start = i128::from(p.start_ns);
        changes.push((start, 1));
        if let Some(stop) = p.end_ns {
            changes.push((i128::from(stop).max(start), -1));
        }
    }
    changes.sort_unstable();
    let mut points = vec![(zero, 0)];
    let mut live: i64 = 0;
    for (t, delta) in changes {
        live += delta;
        let value = u64::try_from(live).unwrap_or(0);
        match points.last_mut() {
            Some(last) if last.0 == t => last.1 = value,
            _ => points.push((t, value)),
        }
    }
    if let Some(&(t, v)) = points.last()
        && t < end
    {
        points.push((end, v));
    }
    points
}

/// A counter from the samples (those that measured it), closed at `end` by the report's own
/// figure (`last`) or the last sample; empty when no sample measured it.
fn sampled(
    samples: &[TimelineSample],
    end: i128,
    value: impl Fn(&TimelineSample) -> Option<u64>,
    last: Option<u64>,
) -> Vec<(i128, u64)> {
    let mut points: Vec<(i128, u64)> = samples
        .iter()
        .filter_map(|s| Some((i128::from(s.time_ns), value(s)?)))
        .collect();
    points.dedup_by_key(|p| p.0);
    if let Some(&(t, v)) = points.last()
        && t < end
    {
        points.push((end, last.unwrap_or(v)));
    }
    points
}

/// `otherData`: the clocks of `ts` 0 (so `--events` lines and other traces line up), the
/// report's end, and its totals (the report without its breakdown).
fn other_data(
    usage: &ResourceUsage,
    anchor: Option<&TraceAnchor>,
    command: &str,
    zero: i128,
    end: i128,
) -> Value {
    let mut totals = serde_json::to_value(usage).unwrap_or(Value::Null);
    if let Some(t) = totals.as_object_mut() {
        t.remove("processes");
    }
    let mut other = Map::new();
    other.insert(
        "generator".into(),
        json!(concat!("cylo-usage ", env!("CARGO_PKG_VERSION"))),
    );
    other.insert("command".into(), json!(command));
    other.insert("ts_unit".into(), json!("us"));
    other.insert("ts_zero_session_ns".into(), json!(zero as i64));
    other.insert("session_start_ts_us".into(), json!(-zero as f64 / 1000.0));
    other.insert("report_end_session_ns".into(), json!(end as i64));
    if let Some(a) = anchor {
        other.insert("clock".into(), json!("CLOCK_MONOTONIC"));
        other.insert("monotonic_ns".into(), json!(a.monotonic_ns));
        other.insert("unix_time_ns".into(), json!(a.unix_time_ns));
        let at_zero = |base: u64| i64::try_from(i128::from(base) + zero).unwrap_or(0).max(0);
        other.insert(
            "ts_zero_monotonic_ns".into(),
            json!(at_zero(a.monotonic_ns)),
        );
        other.insert(
            "ts_zero_unix_time_ns".into(),
            json!(at_zero(a.unix_time_ns)),
        );
    }
    other.insert("totals".into(), totals);
    Value::Object(other)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::usage::TrackerKind;

    const HOSTILE: [&str; 5] = [
        "a\"b\\c\n",
        "\u{1b}[31mred",
        "\u{0}nul",
        "é😀\u{202e}",
        "</script>",
    ];

    /// A process of a generated tree, built through serde so that fields added later default.
    fn process(
        i: usize,
        parent: Option<usize>,
        pid: i32,
        start_ns: i64,
        end: Option<u64>,
    ) -> ProcessUsage {
        let exec = i % 5 != 1;
        let hostile = HOSTILE[i % HOSTILE.len()];
        serde_json::from_value(json!({
            "pid": pid, "ppid": parent.map_or(1, |p| 1000 + p), "parent_index": parent,
            "comm": format!("c{i}{hostile}"),
            "argv": exec.then(|| vec!["/usr/bin/cc".to_string(), "-o".into(), hostile.into()]),
            "argv_truncated": i.is_multiple_of(11),
            "filename": exec.then(|| format!("/usr/bin/cc{}", i % 3)),
            "start_ns": start_ns, "end_ns": end,
            "exit_code": end.map(|_| (i % 4) as i32), "signal": None::<i32>,
            "attached": start_ns < 0, "thread_count": 1 + i % 3,
            "cpu_time_ns": 1000 * i, "cpu_user_ns": 600 * i, "cpu_system_ns": 400 * i,
            "disk_bytes_read": i.is_multiple_of(2).then_some(4096 * i),
            "disk_bytes_written": i.is_multiple_of(2).then_some(512 * i),
            "peak_memory_bytes": (!i.is_multiple_of(3)).then_some(1 << 20),
            "network_bytes_sent": i.is_multiple_of(7).then_some(10 * i),
            "refused": i % 333 == 332, "withheld": i % 97 == 96,
        }))
        .unwrap()
    }

    /// `n` processes: three present at an attach (negative starts), then a mix of wide and
    /// deep branches, every seventh still running, some pids reused.
    fn tree(n: usize) -> ResourceUsage {
        let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut procs = Vec::with_capacity(n);
        for i in 0..n {
            let (parent, start) = match i {
                0 => (None, -5_000_000_000),
                1 | 2 => (Some(0), -(i as i64) * 1_000_000_000),
                _ if next().is_multiple_of(2) => (Some(i - 1), i as i64 * 1_000_000),
                _ => (Some(next() as usize % i), i as i64 * 1_000_000),
            };
            let end = (i % 7 != 3).then(|| start.max(0) as u64 + next() % 500_000_000 + 1);
            let pid = if i % 500 == 499 {
                1000 + i as i32 - 400
            } else {
                1000 + i as i32
            };
            procs.push(process(i, parent, pid, start, end));
        }
        let mut usage = ResourceUsage::unmeasured(TrackerKind::InProcess);
        usage.wall_time_ms = 4_000;
        usage.memory_bytes = Some(1 << 30);
        usage.disk_bytes_read = Some(1 << 20);
        usage.disk_bytes_written = Some(1 << 21);
        usage.processes = Some(procs);
        usage
    }

    fn samples(n: u64) -> Vec<TimelineSample> {
        (0..n)
            .rev() // out of order: the writer sorts them
            .map(|k| TimelineSample {
                time_ns: k * 100_000_000,
                live_processes: k,
                memory_bytes: Some(k << 20),
                disk_bytes_read: None,
                disk_bytes_written: k.is_multiple_of(2).then_some(k * 4096),
            })
            .collect()
    }

    fn num(v: &Value) -> f64 {
        let n = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
        assert!(n.is_finite() && n >= 0.0, "{v}");
        n
    }

    /// Checks `trace` against the format; returns its X events by tid, each with its
    /// thread's name and sort index.
    fn validate(trace: &Value, procs: &[ProcessUsage]) -> HashMap<u64, (Value, String, u64)> {
        let reparsed: Value = serde_json::from_str(&trace.to_string()).unwrap();
        assert_eq!(&reparsed, trace, "serializes and parses back");
        assert_eq!(trace["displayTimeUnit"], "ms");
        assert!(trace["otherData"].is_object());
        let events = trace["traceEvents"].as_array().expect("traceEvents");
        let (mut slices, mut names, mut sort) = (HashMap::new(), HashMap::new(), HashMap::new());
        let mut process_names = 0;
        for e in events {
            let ph = e["ph"].as_str().unwrap_or_else(|| panic!("no ph: {e}"));
            let pid = e["pid"].as_u64().unwrap_or_else(|| panic!("no pid: {e}"));
            assert!(pid <= u64::from(u32::MAX));
            let name = e["name"].as_str().unwrap_or_else(|| panic!("no name: {e}"));
            match ph {
                "X" => {
                    let tid = e["tid"].as_u64().expect("tid");
                    assert!(tid <= u64::from(u32::MAX));
                    assert!(!name.is_empty() && e["cat"].is_string() && e["args"].is_object());
                    num(&e["ts"]);
                    num(&e["dur"]);
                    assert!(
                        slices.insert(tid, e.clone()).is_none(),
                        "one slice a track: {e}"
                    );
                }
                "C" => {
                    num(&e["ts"]);
                    let args = e["args"].as_object().expect("counter args");
                    assert!(!args.is_empty());
                    args.values().for_each(|v| _ = num(v));
                }
                "M" => {
                    let tid = e["tid"].as_u64().expect("tid");
                    match name {
                        "process_name" => process_names += 1,
                        "thread_name" => {
                            let n = e["args"]["name"].as_str().expect("a name").to_string();
                            assert!(names.insert(tid, n).is_none(), "{e}");
                        }
                        "thread_sort_index" => {
                            let i = e["args"]["sort_index"].as_u64().expect("index");
                            assert!(sort.insert(tid, i).is_none(), "{e}");
                        }
                        _ => panic!("unknown metadata {e}"),
                    }
                }
                "i" => _ = num(&e["ts"]),
                _ => panic!("unexpected phase {e}"),
            }
        }
        assert_eq!(process_names, 1);
        assert_eq!(slices.len(), procs.len(), "one slice per process");
        assert_eq!(names.len(), procs.len(), "every track named");
        let mut pids: Vec<_> = slices
            .values()
            .map(|e| e["args"]["pid"].as_i64().unwrap())
            .collect();
        let mut want: Vec<_> = procs.iter().map(|p| i64::from(p.pid)).collect();
        pids.sort_unstable();
        want.sort_unstable();
        assert_eq!(pids, want);
        slices
            .into_iter()
            .map(|(tid, e)| (tid, (e, names[&tid].clone(), sort[&tid])))
            .collect()
    }

    /// The counter `name`'s points, (ts, value).
    fn counter(trace: &Value, name: &str) -> Vec<(f64, f64)> {
        let events = trace["traceEvents"].as_array().unwrap();
        let points: Vec<_> = events
            .iter()
            .filter(|e| e["ph"] == "C" && e["name"] == name)
            .map(|e| {
                (
                    num(&e["ts"]),
                    e["args"].as_object().unwrap().values().map(num).sum(),
                )
            })
            .collect();
        assert!(
            points.windows(2).all(|w| w[0].0 < w[1].0),
            "{name}: in time order"
        );
        points
    }

    #[test]
    fn a_two_thousand_process_tree_makes_a_valid_trace() {
        let usage = tree(2_000);
        let procs = usage.processes.as_deref().unwrap();
        let anchor = TraceAnchor {
            monotonic_ns: 9_000_000_000,
            unix_time_ns: 1_700_000_000_000_000_000,
        };
        let trace = chrome_trace(&usage, &samples(30), Some(&anchor));
        let slices = validate(&trace, procs);
        // The attach: ts 0 is the earliest start, 5 s before the session's.
        let other = &trace["otherData"];
        assert_eq!(other["ts_zero_session_ns"], -5_000_000_000i64);
        assert_eq!(other["ts_zero_monotonic_ns"], 4_000_000_000u64);
        assert_eq!(other["unix_time_ns"], anchor.unix_time_ns);
        assert_eq!(other["totals"]["wall_time_ms"], 4_000);
        assert!(other["totals"].get("processes").is_none());
        let start = trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "session start")
            .unwrap();
        assert_eq!(
            (num(&start["ts"]), start["args"]["monotonic_ns"].as_u64()),
            (5e6, Some(9_000_000_000))
        );
        let end_ns = procs
            .iter()
            .filter_map(|p| p.end_ns)
            .max()
            .unwrap()
            .max(4_000_000_000); // the wall time: after the ends and samples
        let by_pid: HashMap<i64, Vec<&ProcessUsage>> =
            procs.iter().fold(HashMap::new(), |mut m, p| {
                m.entry(i64::from(p.pid)).or_default().push(p);
                m
            });
        for (tid, (e, name, _)) in &slices {
            let pid = e["args"]["pid"].as_i64().unwrap();
            let start_ns = e["args"]["start_ns"].as_i64().unwrap();
            let p = by_pid[&pid]
                .iter()
                .find(|p| p.start_ns == start_ns)
                .unwrap();
            assert!(
                name.ends_with(&format!("{pid} {}", e["name"].as_str().unwrap())),
                "{name}"
            );
            assert_eq!(
                *tid % PID_SPACE,
                pid as u64,
                "a reused pid keeps its number modulo"
            );
            assert!((num(&e["ts"]) - (p.start_ns + 5_000_000_000) as f64 / 1e3).abs() < 1e-3);
            let stop = p.end_ns.unwrap_or(end_ns);
            assert!(
                (num(&e["dur"]) - (stop as i64 - p.start_ns) as f64 / 1e3).abs() < 1e-3,
                "{e}"
            );
            assert_eq!(
                e["args"]["running"].as_bool().unwrap_or(false),
                p.end_ns.is_none()
            );
            assert_eq!(
                e["cat"].as_str().unwrap().contains("running"),
                p.end_ns.is_none()
            );
            assert_eq!(e["args"]["argv"], json!(p.argv), "argv kept exactly");
            assert_eq!(e["args"]["comm"], json!(p.comm));
            let shown = |s: &str| !s.chars().any(|c| c.is_control() || is_bidi_control(c));
            assert!(shown(name) && shown(e["name"].as_str().unwrap()), "{name}");
        }
        // Live processes: exact, closed at the report's end with the processes still running.
        let live = counter(&trace, "live");
        let mut brute = 0.0f64;
        for &(ts, _) in &live {
            let t = (ts * 1e3).round() as i64 - 5_000_000_000;
            let n = procs
                .iter()
                .filter(|p| !p.refused && p.start_ns <= t && p.end_ns.is_none_or(|e| e as i64 > t))
                .count();
            brute = brute.max(n as f64);
        }
        let peak = live.iter().map(|p| p.1).fold(0.0, f64::max);
        assert_eq!(peak, brute);
        let running = procs
            .iter()
            .filter(|p| p.end_ns.is_none() && !p.refused)
            .count();
        assert_eq!(live.last().unwrap().1, running as f64);
        assert_eq!(live.last().unwrap().0, (end_ns as f64 + 5e9) / 1e3);
        // From the samples: RSS, written bytes (some unmeasured); never-measured reads absent.
        assert_eq!(counter(&trace, "tree RSS").len(), 31);
        assert_eq!(
            counter(&trace, "tree RSS").last().unwrap().1,
            (1u64 << 30) as f64
        );
        assert_eq!(counter(&trace, "disk written").len(), 16);
        assert!(counter(&trace, "disk read").is_empty());
        assert!(counter(&trace, "live (sampled)").is_empty());
        assert!(slices.keys().any(|&tid| tid > PID_SPACE), "reused pids");
    }

    #[test]
    fn tracks_come_depth_first_with_children_under_their_parent() {
        let usage = tree(2_000);
        let procs = usage.processes.as_deref().unwrap();
        let slices = validate(&chrome_trace(&usage, &[], None), procs);
        let mut order: Vec<_> = slices.values().collect();
        order.sort_by_key(|(_, _, i)| *i);
        let index = |e: &Value| {
            let (pid, start) = (
                e["args"]["pid"].as_i64().unwrap(),
                e["args"]["start_ns"].as_i64().unwrap(),
            );
            procs
                .iter()
                .position(|p| i64::from(p.pid) == pid && p.start_ns == start)
                .unwrap()
        };
        // A preorder: each track's parent is on the stack of the tracks above it.
        let (mut stack, mut deepest) = (Vec::new(), 0);
        for (k, (e, name, sort_index)) in order.into_iter().enumerate() {
            assert_eq!(*sort_index, k as u64);
            let i = index(e);
            match procs[i].parent_index {
                None => stack.clear(),
                Some(parent) => {
                    while stack.last().is_some_and(|&top| top != parent) {
                        stack.pop();
                    }
                    assert_eq!(stack.last(), Some(&parent), "{name} under its parent");
                }
            }
            let depth = stack.len();
            deepest = deepest.max(depth);
            assert!(
                name.starts_with(&indent(depth))
                    && !name[indent(depth).len()..].starts_with(INDENT),
                "{depth}: {name}"
            );
            stack.push(i);
        }
        assert!(
            deepest > MAX_INDENT,
            "the generated tree is deep: {deepest}"
        );
    }

    #[test]
    fn without_a_breakdown_the_samples_make_the_counters() {
        let mut usage = tree(1);
        usage.processes = None;
        let mut s = samples(5);
        s.iter_mut().for_each(|s| s.memory_bytes = None);
        let trace = chrome_trace(&usage, &s, None);
        validate(&trace, &[]);
        assert_eq!(
            counter(&trace, "live (sampled)")
                .iter()
                .map(|p| p.1)
                .collect::<Vec<_>>(),
            [0.0, 1.0, 2.0, 3.0, 4.0, 0.0] // closed by the report's own count
        );
        assert!(counter(&trace, "live").is_empty() && counter(&trace, "tree RSS").is_empty());
        assert!(trace["otherData"].get("monotonic_ns").is_none());
        assert_eq!(trace["otherData"]["ts_zero_session_ns"], 0);
    }

    #[test]
    fn circles_stray_parents_and_empty_breakdowns_still_trace() {
        let mut usage = tree(4);
        let procs = usage.processes.as_mut().unwrap();
        (procs[0].parent_index, procs[1].parent_index) = (Some(1), Some(0)); // a circle
        procs[2].parent_index = Some(99); // out of range
        procs[3].parent_index = Some(3); // itself
        let order: Vec<_> = tree_order(procs).into_iter().map(|(i, _)| i).collect();
        assert_eq!(order, [2, 3, 0, 1]);
        validate(
            &chrome_trace(&usage, &[], None),
            usage.processes.as_deref().unwrap(),
        );
        usage.processes = Some(Vec::new());
        let trace = chrome_trace(&usage, &[], None);
        validate(&trace, &[]);
        assert_eq!(
            counter(&trace, "live").iter().map(|p| p.1).sum::<f64>(),
            0.0
        );
    }

    #[test]
    fn the_anchor_comes_from_the_events_stream() {
        let line = r#"{"event":"start","time_ns":0,"clock":"CLOCK_MONOTONIC","monotonic_ns":5,"unix_time_ns":7}"#;
        assert_eq!(
            TraceAnchor::from_event_line(line),
            Some(TraceAnchor {
                monotonic_ns: 5,
                unix_time_ns: 7
            })
        );
        assert_eq!(
            TraceAnchor::from_event_line(r#"{"event":"exit","time_ns":3}"#),
            None
        );
        assert_eq!(TraceAnchor::from_event_line("not json"), None);
    }

    #[test]
    fn the_file_holds_the_trace() {
        let usage = tree(50);
        let path =
            std::env::temp_dir().join(format!("cylo-usage-trace-{}.json", std::process::id()));
        write_chrome_trace(&path, &usage, &samples(3), None).unwrap();
        let read: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read, chrome_trace(&usage, &samples(3), None));
    }
}
