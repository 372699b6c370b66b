//! `--case startup`: what starting the tracker adds to a tiny command, with the lean programs
//! (a run without a breakdown), the full set (`--tree`), and bpftrace counting the same tree,
//! interleaved in one run (each round in an order rotated from the last); then what each
//! program cost the kernel's verifier (the load's time and `verified_insns`, from the
//! tracker's own debug lines), medians over the runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::common::{Bins, Stats, time};

/// The socket no daemon listens on: every tracked side loads its own programs.
const NO_DAEMON: &str = "/nonexistent/cylo-usage.sock";

/// One side of the start-up case.
struct Side {
    name: &'static str,
    cmd: Box<dyn Fn() -> Command>,
}

pub(crate) fn startup(bins: &Bins, runs: usize) -> Result<String> {
    super::bpftrace::ensure()?;
    let tracker = bins.tracker.clone();
    let tracked = move |tree: bool| {
        let tracker = tracker.clone();
        move || {
            let mut cmd = Command::new(&tracker);
            cmd.args(["run", "--no-daemon", "-o", "/dev/null"]);
            if tree {
                cmd.arg("--tree");
            }
            cmd.args(["--", "/bin/true"]);
            cmd
        }
    };
    let sides = [
        Side {
            name: "`/bin/true`",
            cmd: Box::new(|| Command::new("/bin/true")),
        },
        Side {
            name: "`cylo-usage run --no-daemon -- /bin/true` (lean programs)",
            cmd: Box::new(tracked(false)),
        },
        Side {
            name: "`cylo-usage run --no-daemon --tree -- /bin/true` (full set)",
            cmd: Box::new(tracked(true)),
        },
        Side {
            name: "bpftrace counting the same tree (`-c /bin/true`)",
            cmd: Box::new(|| super::bpftrace::counting("/bin/true".as_ref(), &[])),
        },
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); sides.len()];
    eprintln!(
        "xtask: startup: a warm-up round, then {runs} rounds of every side, the order rotated \
         each round"
    );
    // No side always follows the same one: a tracer's exit leaves work behind (bpftrace's
    // freeing of its programs and maps, for one) that the run after it may pay for.
    for round in 0..=runs {
        for k in 0..sides.len() {
            let i = (k + round) % sides.len();
            let side = &sides[i];
            let wall = time((side.cmd)().env("CYLO_USAGE_SOCKET", NO_DAEMON))
                .with_context(|| format!("startup: {} (round {round})", side.name))?;
            if round > 0 {
                samples[i].push(wall);
            }
        }
    }
    let base = Stats::of(&samples[0]);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\nStart-up (`--case startup`, {runs} rounds of every side, the order rotated each \
         round; wall time around the whole command):\n\n| command | median (min) | added to `/bin/true` |\n|---|---|---|"
    );
    for (side, s) in sides.iter().zip(&samples) {
        let st = Stats::of(s);
        let _ = writeln!(
            md,
            "| {} | {} | {:+.1} ms |",
            side.name,
            st.cell(),
            st.median - base.median
        );
    }
    let _ = writeln!(
        md,
        "\nWhat each program cost the verifier at start-up (`BPF_PROG_LOAD`'s wall time and \
         the instructions it processed, `verified_insns`; medians of {runs} loads; the \
         programs are verified side by side, two at a time on this machine's 2 cores):\n\n\
         | program | set | load, ms | instructions processed |\n|---|---|---|---|"
    );
    for (set, tree) in [("lean", false), ("full", true)] {
        let mut per: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        for _ in 0..runs {
            for (name, ms, insns) in verifications(&bins.tracker, tree)? {
                let e = per.entry(name).or_default();
                e.0.push(ms);
                e.1.push(insns);
            }
        }
        for (name, (ms, insns)) in per {
            let _ = writeln!(
                md,
                "| {name} | {set} | {:.2} | {:.0} |",
                super::stats::median(ms),
                super::stats::median(insns)
            );
        }
    }
    Ok(md)
}

/// One `run --no-daemon -- /bin/true` (with `--tree`: the full set) with the loader's debug
/// lines on (not the programs' own log statements, which would change what is verified):
/// per program, the load's ms and the instructions the verifier processed.
fn verifications(tracker: &std::path::Path, tree: bool) -> Result<Vec<(String, f64, f64)>> {
    let mut cmd = Command::new(tracker);
    cmd.args(["run", "--no-daemon", "-o", "/dev/null"]);
    if tree {
        cmd.arg("--tree");
    }
    let out = cmd
        .args(["--", "/bin/true"])
        .env("RUST_LOG", "cylo_usage::kernel::programs=debug")
        .env("CYLO_USAGE_SOCKET", NO_DAEMON)
        .stdin(Stdio::null())
        .output()
        .context("running the tracker with its loader's debug lines")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let found: Vec<_> = stderr.lines().filter_map(parse_verified).collect();
    if !out.status.success() || found.is_empty() {
        bail!(
            "the tracker printed no verification lines ({}): {stderr}",
            out.status
        );
    }
    Ok(found)
}

/// `... verified NAME in MS ms (N instructions processed)`.
fn parse_verified(line: &str) -> Option<(String, f64, f64)> {
    let rest = &line[line.find("verified ")? + "verified ".len()..];
    let (name, rest) = rest.split_once(" in ")?;
    let (ms, rest) = rest.split_once(" ms (")?;
    let insns = rest.split_once(' ')?.0;
    Some((name.to_string(), ms.parse().ok()?, insns.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_loaders_verification_lines() {
        let line = "[DEBUG cylo_usage::kernel::programs] verified task_newtask_lean in 7.40 ms \
                    (8477 instructions processed)";
        assert_eq!(
            parse_verified(line),
            Some(("task_newtask_lean".to_string(), 7.4, 8477.0))
        );
        assert_eq!(
            parse_verified("verified x in ? ms (? instructions processed)"),
            None
        );
        assert_eq!(parse_verified("nothing here"), None);
    }
}
