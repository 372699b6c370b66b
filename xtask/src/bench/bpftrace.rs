//! bpftrace as the peer the start-up and storm cases are measured beside: it counts the same
//! tree (every process the command forks, followed from its pid in a map in the kernel), the
//! one-liner people write today. Installed from Debian's packages when missing; its
//! tracepoints need tracefs, mounted here when it is not.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The script: the command's tree in a map, its forks and exits counted in the kernel.
const SCRIPT: &str = "BEGIN { @tree[cpid] = 1; }
tracepoint:sched:sched_process_fork /@tree[args->parent_pid]/ {
  @tree[args->child_pid] = 1; @processes = count(); }
tracepoint:sched:sched_process_exit /@tree[tid]/ { delete(@tree[tid]); @exited = count(); }
END { clear(@tree); }";

/// Makes sure bpftrace can run here: installs it and mounts tracefs if needed.
pub(crate) fn ensure() -> Result<()> {
    if Command::new("bpftrace").arg("--version").output().is_err() {
        eprintln!("xtask: installing bpftrace (Debian's package) for the peer measurements");
        crate::cmd::apt_install(&["bpftrace"])?;
    }
    let events = Path::new("/sys/kernel/tracing/events/sched");
    if !events.exists() {
        let status = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status()
            .context("running mount for tracefs")?;
        if !status.success() || !events.exists() {
            bail!("tracefs could not be mounted on /sys/kernel/tracing (bpftrace needs it)");
        }
    }
    Ok(())
}

/// bpftrace counting the tree of `program args` (no spaces in them: bpftrace splits `-c`).
pub(crate) fn counting(program: &Path, args: &[&str]) -> Command {
    running(SCRIPT, program, args)
}

/// bpftrace with no probe on the tree (`BEGIN {}` only), running `program args` as
/// [`counting`] does: its process around the command alone, the floor of its figures.
pub(crate) fn floor(program: &Path, args: &[&str]) -> Command {
    running("BEGIN {}", program, args)
}

/// bpftrace running `script` around `program args` (`-c`).
fn running(script: &str, program: &Path, args: &[&str]) -> Command {
    let mut line = program.to_string_lossy().into_owned();
    for a in args {
        line.push(' ');
        line.push_str(a);
    }
    let mut cmd = Command::new("bpftrace");
    cmd.args(["-e", script, "-c", &line]);
    cmd
}
