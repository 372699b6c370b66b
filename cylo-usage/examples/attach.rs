//! Follows a running process and its descendants for a while (the eBPF programs, loaded in
//! this process: needs CAP_BPF and CAP_PERFMON), with a per-process breakdown, and prints what
//! the tree used meanwhile and what it had used before.
//!
//! `cargo run --example attach -- PID [SECONDS]`
use std::time::Duration;

use cylo_usage::{RunOptions, Tracker};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let pid: libc::pid_t = args.next().ok_or("usage: attach PID [SECONDS]")?.parse()?;
    let seconds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let tracker = Tracker::load()?;
    let options = RunOptions {
        tree: true,
        ..RunOptions::default()
    };
    let run = tracker.attach_with(pid, options)?;
    // The tree's end, or the time we give it, whichever comes first.
    let _ = tokio::time::timeout(Duration::from_secs(seconds), run.wait_finished()).await;
    let usage = run.usage()?;
    println!(
        "since the attach: {} ms of CPU, {} processes",
        usage.cpu_time_ms, usage.process_count
    );
    if let Some(before) = &usage.usage_before_attach {
        println!("before it: {} ms of CPU", before.cpu_time_ns / 1_000_000);
    }
    for p in usage.processes.unwrap_or_default() {
        println!(
            "  {:>7} {:<16} {:>8} µs",
            p.pid,
            p.comm,
            p.cpu_time_ns / 1_000
        );
    }
    Ok(())
}
