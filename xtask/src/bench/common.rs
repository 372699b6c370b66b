//! What the bench's cases share: the binaries under test, timing a command, a tracker or
//! daemon kept running in the background, the kernel's per-program statistics and their
//! table, and a side's median and minimum.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Upper bound for a background tracker to start or to stop.
pub(crate) const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(15);

/// Median and minimum of a side's samples, in milliseconds.
pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) min: f64,
}

impl Stats {
    pub(crate) fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = if n % 2 == 1 {
            ms[n / 2]
        } else {
            (ms[n / 2 - 1] + ms[n / 2]) / 2.0
        };
        Stats { median, min: ms[0] }
    }

    pub(crate) fn cell(&self) -> String {
        format!("{:.1} ms ({:.1})", self.median, self.min)
    }
}

pub(crate) struct Bins {
    pub(crate) tracker: PathBuf,
    pub(crate) workload: PathBuf,
}

/// Runs `cmd` to completion and returns its wall time. Fails with its stderr when it fails.
pub(crate) fn time(cmd: &mut Command) -> Result<Duration> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {shown}"))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {shown}"))?;
    let wall = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    crate::cmd::check(cmd, out.status, stderr)?;
    Ok(wall)
}

/// `wall_time_ms` from a `cylo-usage run --json` report.
pub(crate) fn reported_wall(report: &Path) -> Result<Duration> {
    let text = std::fs::read_to_string(report)
        .with_context(|| format!("reading the report {}", report.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing the report {}", report.display()))?;
    let ms = value
        .get("wall_time_ms")
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("no wall_time_ms in {}: {text}", report.display()))?;
    Ok(Duration::from_millis(ms))
}

const SIGTERM: i32 = 15;

const SIGKILL: i32 = 9;

fn send(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pids are our own children.
    unsafe { kill(pid as i32, sig) };
}

/// A `cylo-usage run` in the background; stopped (SIGTERM, which it forwards to its command)
/// when dropped, also on error paths.
pub(crate) struct Background {
    child: Option<Child>,
    shown: String,
    /// The tracker's own children (its command), once seen: killed too if the tracker must be
    /// killed, so no `sleep 3600` outlives the benchmark.
    descendants: Vec<u32>,
}

impl Background {
    pub(crate) fn start(mut cmd: Command) -> Result<Self> {
        let shown = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {shown}"))?;
        Ok(Background {
            child: Some(child),
            shown,
            descendants: Vec::new(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until the tracker has started its command (it loads and attaches its programs
    /// first) and at least `min` has passed since it started.
    pub(crate) fn wait_attached(&mut self, min: Duration) -> Result<()> {
        let start = Instant::now();
        let children_file = format!("/proc/{0}/task/{0}/children", self.pid());
        loop {
            self.check_alive()?;
            match std::fs::read_to_string(&children_file) {
                Ok(s) => {
                    self.descendants = s
                        .split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect();
                    if !self.descendants.is_empty() && start.elapsed() >= min {
                        return Ok(());
                    }
                }
                // No CONFIG_PROC_CHILDREN: fall back to the plain wait.
                Err(_) if start.elapsed() >= min => return Ok(()),
                Err(_) => {}
            }
            if start.elapsed() > BACKGROUND_TIMEOUT {
                bail!(
                    "{} did not start its command within {BACKGROUND_TIMEOUT:?}",
                    self.shown
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails (with the tracker's stderr) when the tracker has exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        let child = self.child.as_mut().expect("running");
        if let Some(status) = child.try_wait()? {
            let stderr = read_stderr(child);
            self.child = None;
            bail!("{} exited early ({status}): {}", self.shown, stderr.trim());
        }
        Ok(())
    }

    /// Stops the tracker and checks it ended as expected: its command killed by SIGTERM, so
    /// exit status 128 + 15.
    pub(crate) fn stop(mut self) -> Result<()> {
        let (status, stderr) = self.terminate()?;
        if status.code() != Some(128 + SIGTERM) && !status.success() {
            bail!("{} failed ({status}): {}", self.shown, stderr.trim());
        }
        Ok(())
    }

    fn terminate(&mut self) -> Result<(std::process::ExitStatus, String)> {
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.shown);
        };
        send(child.id(), SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                let stderr = read_stderr(&mut child);
                return Ok((status, stderr));
            }
            if start.elapsed() > BACKGROUND_TIMEOUT {
                let _ = child.kill();
                for &pid in &self.descendants {
                    send(pid, SIGKILL);
                }
                let status = child.wait()?;
                bail!(
                    "{} did not stop within {BACKGROUND_TIMEOUT:?} of SIGTERM (killed: {status})",
                    self.shown
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.terminate()
        {
            eprintln!("xtask: stopping the background tracker: {e:#}");
        }
    }
}

fn read_stderr(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut s);
    }
    s
}

/// The kernel's run-time statistics (BPF_ENABLE_STATS) of every raw-tracepoint program named
/// like one of the tracker's handlers: id -> (name, ns, calls).
pub(crate) fn handler_stats() -> Result<std::collections::BTreeMap<u32, (String, u64, u64)>> {
    use cylo_usage_abi::names::*;
    let network = [PROG_SOCK_SEND_LENGTH, PROG_SOCK_RECV_LENGTH]
        .into_iter()
        .chain(
            FEXIT_SENDMSG
                .iter()
                .chain(&FEXIT_RECVMSG)
                .chain(&FEXIT_SENDPAGE)
                .map(|&(p, _)| p),
        );
    let handlers: Vec<&str> = [
        PROG_TASK_NEWTASK,
        PROG_TASK_NEWTASK_NO_ATOMICS,
        PROG_SCHED_PROCESS_EXIT,
        PROG_SCHED_PROCESS_EXEC,
        PROG_SCHED_SWITCH,
        PROG_RSS_STAT,
        PROG_BLOCK_BIO_QUEUE,
        PROG_BLOCK_BIO_QUEUE_WITH_QUEUE,
    ]
    .into_iter()
    .chain(network)
    .collect();
    let mut out = std::collections::BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded eBPF programs")?;
        // The kernel keeps 15 bytes of a program's name.
        let Some(name) = info.name_as_str() else {
            continue;
        };
        // Names that share their first 15 bytes (sched_process_exit and _exec) share a row.
        let matching: Vec<&str> = handlers
            .iter()
            .copied()
            .filter(|h| h.as_bytes().starts_with(name.as_bytes()))
            .collect();
        if !matching.is_empty() {
            let ns = info.run_time().as_nanos() as u64;
            out.insert(info.id(), (matching.join(" or "), ns, info.run_count()));
        }
    }
    Ok(out)
}

/// Per handler name: (run time in ns, calls).
pub(crate) type CostRows = std::collections::BTreeMap<String, (u64, u64)>;

/// The table of [`CostRows`]: calls, ns per call, total, share of `wall`.
pub(crate) fn cost_table(wall: Duration, rows: &CostRows) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| handler | calls | ns per call | total ms | share of the run |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    let mut total = 0;
    for (name, (ns, calls)) in rows {
        if *calls == 0 {
            continue;
        }
        total += ns;
        let _ = writeln!(
            md,
            "| {name} | {calls} | {:.1} | {:.2} | {:.2}% |",
            *ns as f64 / *calls as f64,
            *ns as f64 / 1e6,
            *ns as f64 / wall.as_nanos() as f64 * 100.0
        );
    }
    let _ = writeln!(
        md,
        "| all | | | {:.2} | {:.2}% |",
        total as f64 / 1e6,
        total as f64 / wall.as_nanos() as f64 * 100.0
    );
    md
}

unsafe extern "C" {
    /// libc's kill(2); std's `Child::kill` only sends SIGKILL.
    fn kill(pid: i32, sig: i32) -> i32;
}
