//! `cargo xtask bench --case budgets`: what budgets (`--max-*`) cost, by the kernel's
//! per-program statistics, and how far a CPU budget overshoots.
//!
//! Budgets attach programs of their own only while some run has one: fexit on
//! `schedule_tail` (without BPF trampolines, a kprobe on `calculate_sigpending`, which only
//! new tasks reach; without kprobes either, the raw tracepoint `sys_exit`, which then runs
//! at every system call's exit on the host) for processes and threads budgets;
//! `sched_stat_runtime` (every scheduler runtime update on the host) for CPU budgets;
//! `writeback_dirty_folio` for disk-write budgets. Three sections:
//! - a tracked storm with budgets set but never reached, against the same storm without;
//! - what untracked processes pay while a budgeted run exists: an untracked storm, and an
//!   untracked loop of one-byte reads and writes (`dd bs=1`, two system calls a byte);
//! - how far `--max-cpu 500ms` overshoots on two spinning threads (the tree is killed at the
//!   crossing, in the kernel; what it used by then is the report's `cpu_time_ns`).
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::common::{Background, Bins, Stats, time};
use super::stats::{self, median};
use super::{ATTACH_WAIT, COST_RUNS, NO_DAEMON};

/// Budgets set far above anything the workloads reach: processes, threads, CPU, disk writes.
const UNREACHED: [&str; 8] = [
    "--max-processes",
    "1000000000",
    "--max-threads",
    "1000000000",
    "--max-cpu",
    "1h",
    "--max-disk-write",
    "1T",
];

/// The programs [`UNREACHED`] attaches, as alternatives per hook (the kernel keeps 15 bytes
/// of a name; a prefix of these matches).
const BUDGET_PROGRAMS: [&[&str]; 3] = [
    &[
        cylo_usage_abi::names::PROG_SYS_EXIT_DOOMED,
        cylo_usage_abi::names::PROG_CALCULATE_SIGPENDING_DOOMED,
        cylo_usage_abi::names::PROG_SCHEDULE_TAIL_EXIT,
    ],
    &[cylo_usage_abi::names::PROG_SCHED_STAT_RUNTIME],
    &[cylo_usage_abi::names::PROG_WRITEBACK_DIRTY],
];

/// The raw tracepoints of the budget programs (an empty program on each measures the
/// statistics' floor there; those the kernel lacks are skipped).
const BUDGET_TRACEPOINTS: [&str; 4] = [
    "sys_exit",
    "sched_stat_runtime",
    "writeback_dirty_folio",
    "writeback_dirty_page",
];

/// The CPU budget of the overshoot runs, and the work that crosses it: two threads spinning
/// 5 s each.
const CPU_BUDGET: &str = "500ms";
const CPU_BUDGET_NS: i64 = 500_000_000;
const SPIN: [&str; 3] = ["threads", "2", "5000"];
/// Overshoot runs (with `--quick`: [`QUICK_OVERSHOOT_RUNS`]).
const OVERSHOOT_RUNS: usize = 20;
const QUICK_OVERSHOOT_RUNS: usize = 5;
/// The exit status of a run stopped at a budget.
const EXIT_BUDGET: i32 = 120;

/// One-byte `dd` copies of the system-call loop (two system calls a byte).
const DD_BYTES: u64 = 2_000_000;
const QUICK_DD_BYTES: u64 = 500_000;

/// The three sections, as markdown. `runs`: timed runs per side of the wall-clock notes.
pub(super) fn budget_costs(bins: &Bins, storm: u64, runs: usize, quick: bool) -> Result<String> {
    let mut md = String::from("\n## Budgets\n");
    md.push_str(&unreached(bins, storm, runs)?);
    md.push_str(&untracked(bins, storm, quick)?);
    md.push_str(&overshoot(bins, quick)?);
    Ok(md)
}

/// The empty program's tracepoints: the tracker's and the budget programs'.
fn floor_tracepoints() -> Vec<&'static str> {
    let mut tps = stats::tracepoints();
    tps.extend(BUDGET_TRACEPOINTS);
    tps
}

/// Whether `name` (a program name as the kernel keeps it) is one of `full`'s.
fn names_one_of(name: &str, full: &[&str]) -> bool {
    !name.is_empty()
        && full
            .iter()
            .any(|f| f.as_bytes().starts_with(name.as_bytes()))
}

/// Polls `handlers` until every budget program is attached, or `done()`, or 15 s; fails when
/// the tracker still runs and they are not there.
fn wait_for_budget_hooks(
    handlers: &mut stats::Handlers,
    mut done: impl FnMut() -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        handlers.poll();
        let linked = handlers.linked_names()?;
        let missing: Vec<&str> = BUDGET_PROGRAMS
            .iter()
            .filter(|alts| !linked.iter().any(|n| names_one_of(n, alts)))
            .map(|alts| alts[0])
            .collect();
        if missing.is_empty() || done() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!(
                "the tracker did not attach {} within 15 s",
                missing.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `cylo-usage run -o /dev/null [budgets] -- WORKLOAD ARGS`.
fn tracked(bins: &Bins, budgets: &[&str], args: &[&str]) -> Command {
    let mut cmd = Command::new(&bins.tracker);
    cmd.args(["run", "-o", "/dev/null"])
        .args(budgets)
        .arg("--")
        .arg(&bins.workload)
        .args(args)
        .env("CYLO_USAGE_SOCKET", NO_DAEMON);
    cmd
}

/// [`super::tracked_stats`] for a run that may have budgets: it also waits for the budget
/// programs (when `budgets` is set), and measures the floor on their tracepoints too. The
/// shares are of the whole command's wall time, start-up included.
fn tracked_budget_stats(mut cmd: Command, budgets: bool) -> Result<stats::Measure> {
    let _stats = stats::enable()?;
    let empty = stats::EmptyPrograms::attach(&floor_tracepoints())?;
    let floor_before = empty.snapshot()?;
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {shown}"))?;
    let mut handlers = stats::Handlers::of(child.id())?;
    let mut exited = || child.try_wait().map(|s| s.is_some()).unwrap_or(true);
    handlers.settle(Duration::from_millis(50), &mut exited);
    if budgets {
        wait_for_budget_hooks(&mut handlers, &mut exited)?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {shown}"))?;
    let wall = start.elapsed();
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stats::Measure {
        handlers: handlers.snapshot()?,
        floor: stats::delta(&floor_before, &empty.snapshot()?),
        wall,
    })
}

/// The budget programs among a measure's handlers: label -> median calls, over `runs`.
fn budget_rows(runs: &[stats::Measure]) -> BTreeMap<String, f64> {
    let labels: std::collections::BTreeSet<&String> =
        runs.iter().flat_map(|m| m.handlers.keys()).collect();
    labels
        .into_iter()
        .filter(|l| {
            BUDGET_TRACEPOINTS.contains(&l.as_str())
                || BUDGET_PROGRAMS.iter().any(|alts| names_one_of(l, alts))
        })
        .map(|l| {
            let calls = median(
                runs.iter()
                    .map(|m| m.handlers.get(l).map_or(0.0, |c| c.calls as f64))
                    .collect(),
            );
            (l.clone(), calls)
        })
        .collect()
}

/// The budget programs' calls, for the line under a table (a program with no calls has no
/// row in the table).
fn held_note(runs: &[stats::Measure]) -> String {
    let rows: Vec<String> = budget_rows(runs)
        .into_iter()
        .map(|(l, calls)| format!("{l} ({calls:.0} calls)"))
        .collect();
    if rows.is_empty() {
        "budget programs: none held".into()
    } else {
        format!(
            "Budget programs the tracker held, with their calls (0: loaded but never attached, \
             as the fexit program where the kernel has no trampolines, or its hook did not \
             fire): {}",
            rows.join(", ")
        )
    }
}

/// 1. The tracked storm with budgets set but never reached, against the same storm without.
fn unreached(bins: &Bins, storm: u64, runs: usize) -> Result<String> {
    let storm_arg = storm.to_string();
    let args = ["storm", storm_arg.as_str()];
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n### A budget set but not reached\n\nThe tracked storm of {storm} under `run -o \
         /dev/null`, without budgets and with `{}` (set, never reached). Kernel per-program \
         run time, medians of {COST_RUNS} runs each; shares are of the whole command's wall \
         time, the tracker's start-up included.",
        UNREACHED.join(" ")
    );
    let mut tables = Vec::new();
    for budgets in [false, true] {
        let flags: &[&str] = if budgets { &UNREACHED } else { &[] };
        let mut m = Vec::new();
        for i in 1..=COST_RUNS {
            eprintln!("xtask: budgets: tracked storm, budgets {budgets}: statistics run {i}");
            m.push(tracked_budget_stats(tracked(bins, flags, &args), budgets)?);
        }
        if budgets && budget_rows(&m).is_empty() {
            bail!("the budgeted storm's tracker held no budget program");
        }
        tables.push(m);
    }
    for (title, m) in ["Without budgets", "With the budgets"].iter().zip(&tables) {
        let _ = writeln!(md, "\n{title}:\n");
        md.push_str(&stats::table(m).0);
        if title.starts_with("With ") {
            let _ = writeln!(md, "\n{}.", held_note(m));
        }
    }

    // The wall-clock side note: timed runs without statistics, interleaved.
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        eprintln!("xtask: budgets: tracked storm, timed run {i}/{runs}");
        without.push(time(&mut tracked(bins, &[], &args))?);
        with.push(time(&mut tracked(bins, &UNREACHED, &args))?);
    }
    let (a, b) = (Stats::of(&without), Stats::of(&with));
    let _ = writeln!(
        md,
        "\nSide note, wall clock (noisy on this machine; not the figure to judge by): {runs} \
         timed runs each, statistics off, interleaved, the whole command: without budgets \
         {}, with {} (median (min)); ratio of medians {:.3}×.",
        a.cell(),
        b.cell(),
        b.median / a.median
    );
    Ok(md)
}

/// `cylo-usage run -o /dev/null [budgets] -- sleep 3600` in the background, attached.
fn background(bins: &Bins, budgets: &[&str]) -> Result<Background> {
    let mut cmd = Command::new(&bins.tracker);
    cmd.args(["run", "-o", "/dev/null"])
        .args(budgets)
        .args(["--", "sleep", "3600"])
        .env("CYLO_USAGE_SOCKET", NO_DAEMON);
    let mut background = Background::start(cmd)?;
    background.wait_attached(ATTACH_WAIT)?;
    Ok(background)
}

/// [`super::costs_during`] with the background run holding `budgets`, for any untracked
/// command: every program of the background tracker, and the floor on its tracepoints and
/// the budget programs'.
fn costs_beside(bins: &Bins, budgets: &[&str], work: &mut Command) -> Result<stats::Measure> {
    let _stats = stats::enable()?;
    let mut background = background(bins, budgets)?;
    let mut handlers = stats::Handlers::of(background.pid())?;
    handlers.settle(Duration::ZERO, || false);
    if !budgets.is_empty() {
        wait_for_budget_hooks(&mut handlers, || false)?;
    }
    let empty = stats::EmptyPrograms::attach(&floor_tracepoints())?;
    let (before, floor_before) = (handlers.snapshot()?, empty.snapshot()?);
    let wall = time(work)?;
    let (after, floor_after) = (handlers.snapshot()?, empty.snapshot()?);
    background.check_alive()?;
    background.stop()?;
    Ok(stats::Measure {
        handlers: stats::delta(&before, &after),
        floor: stats::delta(&floor_before, &floor_after),
        wall,
    })
}

/// `work` timed with no tracker, or beside a background run with `budgets`.
fn timed_beside(bins: &Bins, budgets: Option<&[&str]>, work: &mut Command) -> Result<Duration> {
    let Some(budgets) = budgets else {
        return time(work);
    };
    let mut background = background(bins, budgets)?;
    let wall = time(work)?;
    background.check_alive()?;
    background.stop()?;
    Ok(wall)
}

fn dd(bytes: u64) -> Command {
    let mut cmd = Command::new("dd");
    cmd.args([
        "if=/dev/zero",
        "of=/dev/null",
        "bs=1",
        &format!("count={bytes}"),
    ]);
    cmd
}

/// One budget program's figures over `runs`: median calls, ns per call, and the empty
/// program's ns per call on its tracepoint.
fn program_line(runs: &[stats::Measure], label: &str) -> String {
    let per = |f: &dyn Fn(&stats::Measure) -> f64| median(runs.iter().map(f).collect());
    let calls = per(&|m| m.handlers.get(label).map_or(0.0, |c| c.calls as f64));
    let ns = per(&|m| {
        m.handlers
            .get(label)
            .filter(|c| c.calls > 0)
            .map_or(0.0, |c| c.ns as f64 / c.calls as f64)
    });
    let floor = per(&|m| {
        m.floor
            .get(label)
            .filter(|c| c.calls > 0)
            .map_or(0.0, |c| c.ns as f64 / c.calls as f64)
    });
    format!(
        "`{label}`: {calls:.0} calls, {ns:.1} ns per call (the empty program on the same \
         tracepoint: {floor:.1}; beyond it: {:.1})",
        (ns - floor).max(0.0)
    )
}

/// 2. What untracked processes pay while a budgeted run exists.
fn untracked(bins: &Bins, storm: u64, quick: bool) -> Result<String> {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n### What untracked processes pay while a budgeted run exists\n\nA background \
         `run -o /dev/null {} -- sleep 3600` (the budgets' hooks attached on the whole host), \
         and beside it an untracked workload. Kernel per-program run time of every program \
         of the background tracker during the workload, medians of {COST_RUNS}; the empty \
         program's floor is measured on every tracepoint, the budget programs' included.",
        UNREACHED.join(" ")
    );

    // The untracked storm.
    let mut m = Vec::new();
    for i in 1..=COST_RUNS {
        eprintln!("xtask: budgets: untracked storm beside a budgeted run: {i}/{COST_RUNS}");
        let mut storm_cmd = Command::new(&bins.workload);
        storm_cmd.args(["storm", &storm.to_string()]);
        m.push(costs_beside(bins, &UNREACHED, &mut storm_cmd)?);
    }
    let _ = writeln!(
        md,
        "\nAn untracked storm of {storm} (compare \"What an untracked process pays\", the \
         same without budgets):\n"
    );
    md.push_str(&stats::table(&m).0);
    let _ = writeln!(md, "\n{}.", held_note(&m));

    // The system-call loop.
    let bytes = if quick { QUICK_DD_BYTES } else { DD_BYTES };
    let (mut plain, mut budgeted) = (Vec::new(), Vec::new());
    for i in 1..=COST_RUNS {
        eprintln!("xtask: budgets: untracked dd beside a run: {i}/{COST_RUNS}");
        plain.push(costs_beside(bins, &[], &mut dd(bytes))?);
        budgeted.push(costs_beside(bins, &UNREACHED, &mut dd(bytes))?);
    }
    let _ = writeln!(
        md,
        "\nAn untracked `dd if=/dev/zero of=/dev/null bs=1 count={bytes}` ({} system calls \
         and more), beside a run without budgets:\n",
        2 * bytes
    );
    md.push_str(&stats::table(&plain).0);
    let _ = writeln!(md, "\nThe same beside the budgeted run:\n");
    md.push_str(&stats::table(&budgeted).0);
    // The processes/threads hook: `sys_exit` here, or the fexit program (its name).
    let hook = budget_rows(&budgeted)
        .into_iter()
        .filter(|(l, _)| l == "sys_exit" || names_one_of(l, BUDGET_PROGRAMS[0]))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(l, _)| l);
    match hook {
        Some(label) => {
            let _ = writeln!(
                md,
                "\nThe processes/threads budget's hook during the loop: {}.",
                program_line(&budgeted, &label)
            );
        }
        None => {
            let _ = writeln!(
                md,
                "\nThe processes/threads budget's hook made no calls during the loop."
            );
        }
    }

    // Its wall clock: no tracker, a tracker without budgets, a budgeted one; interleaved,
    // statistics off.
    let mut walls: [Vec<Duration>; 3] = Default::default();
    for i in 1..=COST_RUNS {
        eprintln!("xtask: budgets: untracked dd, timed: {i}/{COST_RUNS}");
        walls[0].push(timed_beside(bins, None, &mut dd(bytes))?);
        walls[1].push(timed_beside(bins, Some(&[]), &mut dd(bytes))?);
        walls[2].push(timed_beside(bins, Some(&UNREACHED), &mut dd(bytes))?);
    }
    let [none, plain, budgeted] = walls.map(|w| Stats::of(&w));
    let _ = writeln!(
        md,
        "\nSide note, the loop's wall clock (noisy; statistics off; median (min) of \
         {COST_RUNS}, interleaved): no tracker {}; beside a run without budgets {}; beside \
         the budgeted run {} ({:.3}× the unbudgeted side). Only the wall clock sees what \
         enabling the `sys_exit` tracepoint costs every system call outside the program \
         itself (its dispatch).",
        none.cell(),
        plain.cell(),
        budgeted.cell(),
        budgeted.median / plain.median
    );
    Ok(md)
}

/// What one overshoot run's report says.
struct Crossing {
    cpu_time_ns: i64,
    observed: u64,
    enforced: String,
}

/// One `run --json -o REPORT --max-cpu 500ms -- WORKLOAD threads 2 5000`: must exit 120 with
/// `budget_exceeded.resource == "cpu_time"`.
fn cpu_crossing(bins: &Bins, report: &Path) -> Result<Crossing> {
    let _ = std::fs::remove_file(report);
    let mut cmd = Command::new(&bins.tracker);
    cmd.args(["run", "--json", "-o"])
        .arg(report)
        .args(["--max-cpu", CPU_BUDGET, "--"])
        .arg(&bins.workload)
        .args(SPIN)
        .env("CYLO_USAGE_SOCKET", NO_DAEMON)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(EXIT_BUDGET) {
        bail!(
            "{shown}: expected exit {EXIT_BUDGET}, got {}: {}",
            out.status,
            stderr.trim()
        );
    }
    let text = std::fs::read_to_string(report)
        .with_context(|| format!("reading the report {}", report.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing the report {}", report.display()))?;
    let exceeded = &v["budget_exceeded"];
    if exceeded["resource"].as_str() != Some("cpu_time") {
        bail!("{shown}: budget_exceeded is not cpu_time: {exceeded}");
    }
    let cpu = v["cpu_time_ns"]
        .as_u64()
        .with_context(|| format!("no cpu_time_ns in {}", report.display()))?;
    Ok(Crossing {
        cpu_time_ns: cpu as i64,
        observed: exceeded["observed"].as_u64().unwrap_or(0),
        enforced: exceeded["enforced"].as_str().unwrap_or("?").to_string(),
    })
}

/// 3. How far a CPU budget overshoots: cpu_time_ns − 500 ms over many runs.
fn overshoot(bins: &Bins, quick: bool) -> Result<String> {
    let n = if quick {
        QUICK_OVERSHOOT_RUNS
    } else {
        OVERSHOOT_RUNS
    };
    let report = crate::paths::bench_dir().join("budget-report.json");
    let mut over = Vec::new();
    let mut observed = Vec::new();
    let mut enforced = BTreeMap::<String, usize>::new();
    for i in 1..=n {
        let c = cpu_crossing(bins, &report).with_context(|| format!("overshoot run {i}"))?;
        let ms = (c.cpu_time_ns - CPU_BUDGET_NS) as f64 / 1e6;
        eprintln!("xtask: budgets: overshoot run {i}/{n}: {ms:+.2} ms");
        over.push(ms);
        observed.push((c.observed as i64 - CPU_BUDGET_NS) as f64 / 1e6);
        *enforced.entry(c.enforced).or_default() += 1;
    }
    let _ = std::fs::remove_file(&report);
    let min = over.iter().copied().fold(f64::INFINITY, f64::min);
    let max = over.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let all: Vec<String> = over.iter().map(|v| format!("{v:.2}")).collect();
    let how: Vec<String> = enforced
        .iter()
        .map(|(k, v)| format!("{k} in {v}"))
        .collect();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n### CPU-budget overshoot\n\n{n} runs of `run --json -o FILE --max-cpu {CPU_BUDGET} \
         -- WORKLOAD {}` (two threads spinning 5 s each); each exited {EXIT_BUDGET} with \
         `budget_exceeded.resource` `cpu_time` (enforced: {}). Overshoot = the report's \
         `cpu_time_ns` − 500,000,000:\n",
        SPIN.join(" "),
        how.join(", ")
    );
    let _ = writeln!(md, "| overshoot | median | min | max |");
    let _ = writeln!(md, "|---|---|---|---|");
    let _ = writeln!(
        md,
        "| `cpu_time_ns` − limit | {:.2} ms | {min:.2} ms | {max:.2} ms |",
        median(over.clone())
    );
    let _ = writeln!(
        md,
        "| `budget_exceeded.observed` − limit (when the crossing was seen) | {:.2} ms | {:.2} \
         ms | {:.2} ms |",
        median(observed.clone()),
        observed.iter().copied().fold(f64::INFINITY, f64::min),
        observed.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    );
    let _ = writeln!(md, "\nAll runs (ms, in run order): {}.", all.join(", "));
    Ok(md)
}
