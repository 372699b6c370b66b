//! Runs a command under the best tracker this process can have (the host's daemon, the eBPF
//! programs loaded here, or the /proc fallback) and prints what it and every descendant used.
//!
//! `cargo run --example spawn -- make -j2`
use cylo_usage::{AnyTracker, OpenOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let program = args.next().ok_or("usage: spawn COMMAND [ARGS...]")?;
    let mut command = std::process::Command::new(program);
    command.args(args);
    let tracker = AnyTracker::open(OpenOptions::default())?;
    let mut run = tracker.spawn(&mut command)?;
    let status = run.wait_root().await?;
    run.wait_finished().await?;
    let usage = run.usage()?;
    println!(
        "{status:?}: {} ms of CPU ({} user, {} system), {} processes, {} threads, tracker {:?}, {:?}",
        usage.cpu_time_ms,
        usage.cpu_user_ns / 1_000_000,
        usage.cpu_system_ns / 1_000_000,
        usage.process_count,
        usage.thread_count,
        usage.tracker,
        usage.precision,
    );
    for note in &usage.precision_notes {
        println!("  note: {note}");
    }
    Ok(())
}
