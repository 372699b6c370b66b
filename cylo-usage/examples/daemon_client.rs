//! Runs a command through the host's daemon (`cylo-usage serve`), as an unprivileged user
//! can, and prints its report as JSON.
//!
//! `cargo run --example daemon_client -- sh -c 'sleep 1 & wait'`
use cylo_usage::{Tracker, daemon};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let program = args
        .next()
        .ok_or("usage: daemon_client COMMAND [ARGS...]")?;
    let mut command = std::process::Command::new(program);
    command.args(args);
    let tracker = Tracker::connect(&daemon::socket_path())?;
    let mut run = tracker.spawn(&mut command)?;
    run.wait_root().await?;
    run.wait_finished().await?;
    println!("{}", serde_json::to_string_pretty(&run.usage()?)?);
    Ok(())
}
