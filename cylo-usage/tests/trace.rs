//! `--trace`: the Chrome trace of real trees, checked against the format (what Perfetto and
//! chrome://tracing read), with one slice per process of the breakdown.
mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{WORKLOAD, tracker, workload};
use cylo_usage::{
    Precision, ProcessUsage, ResourceUsage, RunOptions, TimelineSample, TraceAnchor, Tracker,
    chrome_trace,
};
use serde_json::Value;

/// An `--events` sink the test reads back.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `cmd` with a breakdown and an event stream, sampling its totals every 20 ms as the
/// command line does; returns the report, the samples and the stream's anchor.
async fn traced(
    t: &Tracker,
    cmd: &mut Command,
) -> (ResourceUsage, Vec<TimelineSample>, TraceAnchor) {
    let events = Shared::default();
    let options = RunOptions {
        tree: true,
        events: Some(Box::new(events.clone())),
        ..Default::default()
    };
    let started = Instant::now();
    let mut run = t.spawn_with(cmd, options).expect("spawn");
    let mut samples = Vec::new();
    loop {
        let totals = run.usage_totals().expect("totals");
        samples.push(TimelineSample::of(
            &totals,
            started.elapsed().as_nanos() as u64,
        ));
        if run.try_wait_root().expect("root").is_some() && run.is_finished().expect("finished") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "ran past 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.wait_finished().await.expect("the tree");
    let usage = run.usage().expect("usage");
    drop(run);
    assert_eq!(usage.precision, Precision::Exact, "{usage:?}");
    let stream = String::from_utf8(events.0.lock().unwrap().clone()).unwrap();
    let first = stream.lines().next().expect("an event stream");
    let anchor = TraceAnchor::from_event_line(first).expect("the stream opens with its anchor");
    (usage, samples, anchor)
}

fn num(v: &Value) -> f64 {
    let n = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    assert!(n.is_finite() && n >= 0.0, "{v}");
    n
}

/// One process's slice, with its track's name and sort index.
struct Slice {
    event: Value,
    track: String,
    sort_index: u64,
}

/// Checks `trace` against the format: every event has `ph`; slices (`X`) have numeric
/// `ts`/`dur`/`pid`/`tid` and a `name`, one per process, each on its own named and sorted
/// track; counters (`C`) have numeric args. Returns the slices by the index of their process.
fn validate(trace: &Value, procs: &[ProcessUsage]) -> Vec<Slice> {
    assert_eq!(trace["displayTimeUnit"], "ms");
    assert!(trace["otherData"].is_object());
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    let (mut slices, mut names, mut sort) = (Vec::new(), HashMap::new(), HashMap::new());
    for e in events {
        let ph = e["ph"].as_str().unwrap_or_else(|| panic!("no ph: {e}"));
        assert!(e["pid"].is_u64(), "{e}");
        let name = e["name"].as_str().unwrap_or_else(|| panic!("no name: {e}"));
        match ph {
            "X" => {
                assert!(
                    e["tid"].is_u64() && !name.is_empty() && e["args"].is_object(),
                    "{e}"
                );
                num(&e["ts"]);
                num(&e["dur"]);
                slices.push(e.clone());
            }
            "C" => {
                num(&e["ts"]);
                let args = e["args"].as_object().expect("counter args");
                assert!(!args.is_empty(), "{e}");
                args.values().for_each(|v| _ = num(v));
            }
            "M" if name == "thread_name" => {
                let track = e["args"]["name"].as_str().expect("a name").to_string();
                assert!(names.insert(e["tid"].as_u64().unwrap(), track).is_none());
            }
            "M" if name == "thread_sort_index" => {
                let i = e["args"]["sort_index"].as_u64().expect("a sort index");
                assert!(sort.insert(e["tid"].as_u64().unwrap(), i).is_none());
            }
            "M" => assert_eq!(name, "process_name"),
            "i" => _ = num(&e["ts"]),
            _ => panic!("unexpected phase: {e}"),
        }
    }
    assert_eq!(slices.len(), procs.len(), "one slice per process");
    let mut out: Vec<Option<Slice>> = procs.iter().map(|_| None).collect();
    for e in slices {
        let (pid, start) = (e["args"]["pid"].as_i64(), e["args"]["start_ns"].as_i64());
        let i = procs
            .iter()
            .position(|p| Some(i64::from(p.pid)) == pid && Some(p.start_ns) == start)
            .unwrap_or_else(|| panic!("a slice of no process: {e}"));
        let tid = e["tid"].as_u64().unwrap();
        let slice = Slice {
            track: names.remove(&tid).expect("its track is named"),
            sort_index: sort.remove(&tid).expect("its track is sorted"),
            event: e,
        };
        assert!(out[i].replace(slice).is_none(), "one slice per process");
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// The counter `name`'s points (ts, value), in time order.
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
        "{name}: {points:?}"
    );
    points
}

/// Children are listed right after their parent (depth first), each in its parent's time.
fn check_tree(procs: &[ProcessUsage], slices: &[Slice]) {
    let mut order: Vec<usize> = (0..procs.len()).collect();
    order.sort_by_key(|&i| slices[i].sort_index);
    let mut stack: Vec<usize> = Vec::new();
    for i in order {
        if let Some(parent) = procs[i].parent_index {
            while stack.last().is_some_and(|&top| top != parent) {
                stack.pop();
            }
            assert_eq!(
                stack.last(),
                Some(&parent),
                "{} after its parent",
                slices[i].track
            );
            let (child, up) = (&slices[i].event, &slices[parent].event);
            assert!(
                num(&child["ts"]) >= num(&up["ts"]),
                "{child} starts in {up}"
            );
        } else {
            stack.clear();
        }
        let indent = "· ".repeat(stack.len().min(24));
        assert!(slices[i].track.starts_with(&indent), "{}", slices[i].track);
        assert!(slices[i].track.contains(&format!("{} ", procs[i].pid)));
        stack.push(i);
    }
}

#[tokio::test]
async fn a_real_tree_traces_one_slice_per_process() {
    let Some(t) = tracker() else { return };
    let (usage, samples, anchor) = traced(&t, &mut workload(&["mix", "6", "50", "100"])).await;
    let procs = usage.processes.as_deref().expect("the breakdown");
    assert_eq!(procs.len() as u64, usage.process_count, "{usage:?}");
    assert_eq!(procs.len(), 107);
    let trace = chrome_trace(&usage, &samples, Some(&anchor));
    let reparsed: Value = serde_json::from_str(&trace.to_string()).unwrap();
    assert_eq!(reparsed, trace);
    let slices = validate(&trace, procs);
    check_tree(procs, &slices);
    for (p, s) in procs.iter().zip(&slices) {
        let e = &s.event;
        assert_eq!(e["args"]["cpu_time_ns"].as_u64(), Some(p.cpu_time_ns));
        assert_eq!(e["args"]["exit_code"].as_i64(), p.exit_code.map(i64::from));
        let end = p.end_ns.expect("every process ended");
        let dur = (end as i64 - p.start_ns) as f64 / 1e3;
        assert!((num(&e["dur"]) - dur).abs() < 1e-3, "{e}");
        if let Some(parent) = p.parent_index {
            // Reaped by the root: it ended before it.
            let up = &slices[parent].event;
            assert!(num(&e["ts"]) + num(&e["dur"]) <= num(&up["ts"]) + num(&up["dur"]) + 1e-3);
        }
    }
    // The clocks: ts 0 is the session start, the --events stream's anchor.
    let other = &trace["otherData"];
    assert_eq!(other["monotonic_ns"].as_u64(), Some(anchor.monotonic_ns));
    assert_eq!(other["unix_time_ns"].as_u64(), Some(anchor.unix_time_ns));
    assert_eq!(other["ts_zero_session_ns"], 0);
    assert_eq!(
        other["totals"]["process_count"].as_u64(),
        Some(usage.process_count)
    );
    // Live processes, exactly: back to 0 at the end; at most the kernel's peak.
    let live = counter(&trace, "live");
    let peak = live.iter().map(|p| p.1).fold(0.0, f64::max);
    assert_eq!(live.last().unwrap().1, 0.0, "{live:?}");
    assert!(peak >= 2.0, "{live:?}");
    if let Some(kernel_peak) = usage.peak_process_count {
        assert!(peak <= kernel_peak as f64, "{peak} vs {kernel_peak}");
    }
    // The sampled counters, where measured.
    assert!(samples.len() >= 2, "{samples:?}");
    assert_eq!(
        counter(&trace, "tree RSS").is_empty(),
        samples.iter().all(|s| s.memory_bytes.is_none())
    );
    assert_eq!(
        counter(&trace, "disk written").is_empty(),
        samples.iter().all(|s| s.disk_bytes_written.is_none())
    );
    let path = std::env::temp_dir().join(format!("cylo-usage-trace-{}.json", std::process::id()));
    cylo_usage::write_chrome_trace(&path, &usage, &samples, Some(&anchor)).unwrap();
    let read: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(read, trace);
    if let Ok(keep) = std::env::var("CYLO_USAGE_KEEP_TRACE") {
        std::fs::copy(&path, keep).unwrap();
    }
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn a_nested_tree_with_hostile_names_comes_depth_first() {
    let Some(t) = tracker() else { return };
    let script = format!(
        "/bin/sh -c '{WORKLOAD} hostile-name 20 & {WORKLOAD} mix 2 10 1; wait'; \
         {WORKLOAD} burn 10; exit 0"
    );
    let (usage, samples, anchor) = traced(&t, Command::new("/bin/sh").args(["-c", &script])).await;
    let procs = usage.processes.as_deref().expect("the breakdown");
    let trace = chrome_trace(&usage, &samples, Some(&anchor));
    let slices = validate(&trace, procs);
    check_tree(procs, &slices);
    let depth = slices.iter().map(|s| s.track.matches("· ").count()).max();
    assert!(depth >= Some(3), "sh > sh > mix > child: {depth:?}");
    for (p, s) in procs.iter().zip(&slices) {
        // Kept exactly in the args (`c") 0 0 (x\n` among them), escaped where shown.
        assert_eq!(s.event["args"]["comm"].as_str(), Some(p.comm.as_str()));
        assert_eq!(s.event["args"]["argv"], serde_json::json!(p.argv));
        let shown = [s.track.as_str(), s.event["name"].as_str().unwrap()];
        assert!(
            !shown.iter().any(|n| n.chars().any(char::is_control)),
            "{shown:?}"
        );
    }
}

#[tokio::test]
async fn processes_still_running_last_to_the_report() {
    let Some(t) = tracker() else { return };
    let (reader, writer) = std::io::pipe().unwrap();
    let mut cmd = workload(&["hold", "3"]);
    cmd.stdin(Stdio::from(reader));
    let options = RunOptions {
        tree: true,
        ..Default::default()
    };
    let mut run = t.spawn_with(&mut cmd, options).expect("spawn");
    drop(cmd); // the reader end: only the tree holds it now
    let started = Instant::now();
    let usage = loop {
        let usage = run.usage().expect("usage");
        if usage.process_count == 4 && usage.wall_time_ms >= 50 {
            break usage;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{usage:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    drop(writer);
    tokio::time::timeout(Duration::from_secs(60), async {
        run.wait_root().await.expect("root");
        run.wait_finished().await.expect("tree");
    })
    .await
    .expect("the holders let go");
    let procs = usage.processes.as_deref().expect("the breakdown");
    let trace = chrome_trace(&usage, &[], None);
    let slices = validate(&trace, procs);
    check_tree(procs, &slices);
    let end = trace["otherData"]["report_end_session_ns"]
        .as_i64()
        .unwrap();
    assert!(end >= usage.wall_time_ms as i64 * 1_000_000);
    for (p, s) in procs.iter().zip(&slices) {
        assert_eq!(p.end_ns, None, "all 4 still run: {p:?}");
        assert!(s.event["cat"].as_str().unwrap().contains("running"));
        assert_eq!(s.event["args"]["running"], true);
        let want = (end - p.start_ns) as f64 / 1e3;
        assert!((num(&s.event["dur"]) - want).abs() < 1e-3, "{}", s.event);
    }
    assert_eq!(counter(&trace, "live").last().unwrap().1, 4.0);
}
