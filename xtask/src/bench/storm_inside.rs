//! Case (a) timed inside the storm itself: the workload times its own 5,000 forks and
//! reaps (`storm-timed`), so that no tracer's start-up is counted, plainly, plainly with an
//! empty program on each of the tracker's tracepoints (the hooks' own floor), under
//! `cylo-usage run` (the lean programs, totals only), under `cylo-usage run --tree`, under
//! bpftrace counting the same tree with a map in the kernel, and under bpftrace with no probe
//! on the tree (its own floor: its process around the storm), interleaved in one run. Each
//! round runs every side once, in an order rotated from round to round, so that no side
//! always follows the same one (a tracer's exit, such as bpftrace's, leaves work behind for
//! the run after it). Each side's ratio is given twice: its median over plain's, and the
//! median of its paired ratios (each round's run over that round's plain run, which cancels
//! the machine's drift between rounds) with their interquartile range. Beside each ratio, the
//! tracer's programs' run time by the kernel's per-program statistics, as a share of the
//! storm's own time (medians of [`STATS_RUNS`] runs with statistics on).

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::common::Bins;
use super::stats;

/// Runs per tracer with the kernel's statistics on, after the timed runs.
const STATS_RUNS: usize = 3;

const NO_DAEMON: &str = "/nonexistent/cylo-usage.sock";

/// How a side runs the storm.
#[derive(Clone, Copy, PartialEq)]
enum Tracer {
    None,
    /// Plain, with an empty program (`r0 = 0; exit`) on each of the tracker's tracepoints:
    /// what attaching the hooks costs before any handler does anything (no userspace).
    Empty,
    Lean,
    Tree,
    Bpftrace,
    /// bpftrace with no probe on the tree (`BEGIN {}`): what its process around the storm
    /// changes by itself.
    BpftraceFloor,
}

impl Tracer {
    const ALL: [Tracer; 6] = [
        Tracer::None,
        Tracer::Empty,
        Tracer::Lean,
        Tracer::Tree,
        Tracer::Bpftrace,
        Tracer::BpftraceFloor,
    ];

    fn name(self) -> &'static str {
        match self {
            Tracer::None => "plain",
            Tracer::Empty => "plain, empty programs on the tracker's tracepoints",
            Tracer::Lean => "`cylo-usage run` (totals)",
            Tracer::Tree => "`cylo-usage run --tree`",
            Tracer::Bpftrace => "bpftrace counting the tree",
            Tracer::BpftraceFloor => "bpftrace with no probe on the tree (its floor)",
        }
    }

    fn command(self, bins: &Bins, storm: &str) -> Command {
        let args = ["storm-timed", storm];
        match self {
            Tracer::None | Tracer::Empty => {
                let mut c = Command::new(&bins.workload);
                c.args(args);
                c
            }
            Tracer::Lean | Tracer::Tree => {
                let mut c = Command::new(&bins.tracker);
                c.args(["run", "--no-daemon", "-o", "/dev/null"]);
                if self == Tracer::Tree {
                    c.arg("--tree");
                }
                c.arg("--").arg(&bins.workload).args(args);
                c.env("CYLO_USAGE_SOCKET", NO_DAEMON);
                c
            }
            Tracer::Bpftrace => super::bpftrace::counting(&bins.workload, &args),
            Tracer::BpftraceFloor => super::bpftrace::floor(&bins.workload, &args),
        }
    }
}

/// One run: the storm's own time, and the child (for statistics) while it runs.
fn run_once(mut cmd: Command, mut watch: impl FnMut(&mut std::process::Child)) -> Result<Duration> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    watch(&mut child);
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {shown}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ns = stdout
        .lines()
        .find_map(|l| l.strip_prefix("storm_ns ")?.trim().parse::<u64>().ok());
    match (out.status.success(), ns) {
        (true, Some(ns)) => Ok(Duration::from_nanos(ns)),
        _ => bail!(
            "{shown} failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

pub(crate) fn storm_inside(bins: &Bins, storm: u64, runs: usize) -> Result<String> {
    super::bpftrace::ensure()?;
    let storm_arg = storm.to_string();
    let sides = Tracer::ALL.len();
    // samples[side][round]: each round runs every side once.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); sides];
    eprintln!(
        "xtask: (a) storm timed inside: a warm-up round, then {runs} rounds of every side, \
         the order rotated each round"
    );
    for round in 0..=runs {
        for k in 0..sides {
            let i = (k + round) % sides;
            let t = Tracer::ALL[i];
            let _empty = (t == Tracer::Empty)
                .then(|| stats::EmptyPrograms::attach(&stats::tracepoints()))
                .transpose()?;
            let d = run_once(t.command(bins, &storm_arg), |_| {})
                .with_context(|| format!("(a) inside, {} (round {round})", t.name()))?;
            if round > 0 {
                samples[i].push(d.as_secs_f64() * 1e3);
            }
        }
    }
    let plain = stats::median(samples[0].clone());
    let paired = |side: usize| -> Vec<f64> {
        samples[side]
            .iter()
            .zip(&samples[0])
            .map(|(s, p)| s / p)
            .collect()
    };
    let spread = |v: Vec<f64>| -> (f64, f64, f64) {
        (
            stats::quantile(v.clone(), 0.5),
            stats::quantile(v.clone(), 0.25),
            stats::quantile(v, 0.75),
        )
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n(a) the storm of {storm} timed inside itself (no tracer's start-up; {runs} rounds \
         of every side, the order rotated each round), with each tracer's programs' kernel \
         run time as a share of the storm's time (medians of {STATS_RUNS} runs with \
         statistics on; for cylo-usage beyond the empty program, for the empty programs and \
         bpftrace raw). The paired ratio is each round's run over the same round's plain \
         run: its median [interquartile range].\n\n\
         | side | storm median (min) | ratio of medians | paired ratio | programs' kernel \
         time |\n|---|---|---|---|---|"
    );
    for (i, t) in Tracer::ALL.iter().enumerate() {
        let v = &samples[i];
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let med = stats::median(v.clone());
        let kernel = match t {
            Tracer::None | Tracer::BpftraceFloor => "-".to_string(),
            Tracer::Empty => format!("{:.2}%", empty_share(bins, &storm_arg)?),
            _ => {
                let (_, share) = stats::table(&statistics(bins, *t, &storm_arg)?);
                format!("{share:.2}%")
            }
        };
        let (p50, p25, p75) = spread(paired(i));
        let _ = writeln!(
            md,
            "| {} | {med:.1} ms ({min:.1}) | {:.3}× | {p50:.3}× [{p25:.3}, {p75:.3}] | {kernel} |",
            t.name(),
            med / plain
        );
    }
    // The goals' comparisons, paired within each round.
    let index = |t: Tracer| Tracer::ALL.iter().position(|x| *x == t).unwrap();
    let bpftrace = paired(index(Tracer::Bpftrace));
    let _ = writeln!(md);
    for t in [Tracer::Lean, Tracer::Tree] {
        let diff: Vec<f64> = paired(index(t))
            .iter()
            .zip(&bpftrace)
            .map(|(a, b)| a - b)
            .collect();
        let (p50, p25, p75) = spread(diff);
        let _ = writeln!(
            md,
            "- {} less bpftrace counting the tree, paired ratios, round by round: median \
             {p50:+.3} [{p25:+.3}, {p75:+.3}].",
            t.name()
        );
    }
    let own: Vec<f64> = samples[index(Tracer::Bpftrace)]
        .iter()
        .zip(&samples[index(Tracer::BpftraceFloor)])
        .map(|(a, b)| a / b)
        .collect();
    let (p50, p25, p75) = spread(own);
    let _ = writeln!(
        md,
        "- bpftrace counting the tree over bpftrace with no probe on it, round by round: \
         median {p50:.3}× [{p25:.3}, {p75:.3}]."
    );
    Ok(md)
}

/// The empty programs' raw run time as a share (%) of the plain storm's time, the median of
/// [`STATS_RUNS`] runs with statistics on.
fn empty_share(bins: &Bins, storm: &str) -> Result<f64> {
    let mut shares = Vec::new();
    for _ in 0..STATS_RUNS {
        let _on = stats::enable()?;
        let empty = stats::EmptyPrograms::attach(&stats::tracepoints())?;
        let before = empty.snapshot()?;
        let storm_time = run_once(Tracer::Empty.command(bins, storm), |_| {})?;
        let ns: u64 = stats::delta(&before, &empty.snapshot()?)
            .values()
            .map(|c| c.ns)
            .sum();
        shares.push(ns as f64 / storm_time.as_nanos() as f64 * 100.0);
    }
    Ok(stats::median(shares))
}

/// [`STATS_RUNS`] runs of `tracer` with the kernel's statistics on: its programs' counts
/// (held by descriptor, so they outlive the tracer), the empty program's, and the storm's
/// own time as the wall time.
fn statistics(bins: &Bins, tracer: Tracer, storm: &str) -> Result<Vec<stats::Measure>> {
    let mut out = Vec::new();
    for _ in 0..STATS_RUNS {
        let _on = stats::enable()?;
        let empty = stats::EmptyPrograms::attach(&stats::tracepoints())?;
        let floor_before = empty.snapshot()?;
        let mut handlers = None;
        let storm_time = run_once(tracer.command(bins, storm), |child| {
            let Ok(mut h) = stats::Handlers::of(child.id()) else {
                return;
            };
            let start = Instant::now();
            // Until the tracer exits: every program it loads is picked up as it appears.
            while start.elapsed() < Duration::from_secs(60) {
                h.poll();
                if child.try_wait().map(|s| s.is_some()).unwrap_or(true) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            handlers = Some(h);
        })?;
        let handlers = handlers.context("the tracer's programs could not be watched")?;
        out.push(stats::Measure {
            handlers: handlers.snapshot()?,
            floor: stats::delta(&floor_before, &empty.snapshot()?),
            wall: storm_time,
        });
    }
    Ok(out)
}
