//! What a live process tree has used so far, read once from /proc (no privileges needed for
//! one's own processes): `get_resource_usage`.
//!
//! `cargo run --example snapshot -- PID`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pid: libc::pid_t = std::env::args()
        .nth(1)
        .ok_or("usage: snapshot PID")?
        .parse()?;
    let usage = cylo_usage::get_resource_usage(pid)?;
    println!(
        "{} ms of CPU, {} processes and {} threads alive, {:?} bytes resident",
        usage.cpu_time_ms, usage.live_process_count, usage.thread_count, usage.memory_bytes
    );
    Ok(())
}
