//! `cargo xtask bench`: what tracking costs, traced against untraced in one run.
//!
//! Benchmarks are not tests: nothing here asserts a time. Every case times an untraced and a
//! traced side of the same work, one warm-up of each first, then `--runs` runs of each,
//! interleaved (untraced, traced, untraced, traced, ...) so that drift on a noisy machine hits
//! both sides alike. Each run is timed with [`Instant`] around the whole child process. The
//! table gives each side's median and minimum and the ratio of medians (or, for tiny commands,
//! the milliseconds added); it goes to stdout and to `target/bench/latest.md`.
//!
//! Cases:
//! - (a) a fork/exit storm, untraced against `cylo-usage run`; plus the same storm against the
//!   wall time cylo-usage itself reports (spawn to last exit: its start-up left out).
//! - (b) the same storm left untracked while a tracker follows another tree (`sleep 3600`),
//!   against the storm with no tracker at all: what every other process on the host pays.
//! - (c) `/bin/true` with and without `cylo-usage run`: the fixed cost of one tracked command.
//! - (h) the storm with a per-process breakdown and event stream (`--tree --events FILE`)
//!   against the same storm tracked for totals only: what the records cost.
//!
//! Then, without a ratio: the kernel's per-program run time on the tracked paths (the storm
//! with and without records), the latency of attaching to a tree of 1,000 processes, and the
//! tracker's own peak RSS on trees of 1,000 and 10,000 processes, with and without `--tree`.
//! - (d) 4 KiB O_DIRECT writes; (e) touching 1 GiB in 4 KiB pages (one `rss_stat` call per
//!   page).
//! - (f) loopback TCP, 1 GiB in 64 KiB writes (both ends in the tree); (g) UDP, 1,000,000
//!   datagrams of 64 bytes (both ends in the tree, acknowledged every 64).
//! - Handler costs: what the handlers cost an untracked process, from the kernel's
//!   per-program statistics, during the storm (`costs`) and during (f) and (g) run untracked
//!   (`net-costs`).
//!
//! - `daemon` (`bench/daemon.rs`): the daemon idle and with 16 sessions, against in-process
//!   trackers; `run -- /bin/true` through it; the tracked storm through it.
//!
//! - `budgets` (`bench/budgets.rs`): budgets set but not reached, what they cost untracked
//!   processes, and how far a CPU budget overshoots.
//!
//! - `startup` (`bench/startup.rs`): `run --no-daemon -- /bin/true` with the lean programs
//!   and with the full set, beside bpftrace, and what each program cost the verifier.
//!
//! - `a` also times the storm inside itself (`bench/storm_inside.rs`): no tracer's start-up,
//!   plainly, under cylo-usage and under bpftrace counting the same tree.
//!
//! `--case` picks cases (a letter, `costs`, `net-costs`, `sessions`, `daemon`, `budgets` or
//! `startup`; repeatable); all by default.
//!
//! Every lettered case also reports, beside its wall-clock ratio, the kernel's per-program
//! statistics of its traced side ([`stats`]): [`COST_RUNS`] more traced runs with statistics
//! on (the timed runs go without: the statistics add two clock reads to every program call),
//! each handler's calls and ns per call, and all handlers' time as a share of the wall time,
//! also net of what an empty program on the same tracepoints measures. Wall clocks on a shared
//! 2-CPU VM vary by 2× from run to run; those figures do not.
//!
//! To add a case, push another [`Case`] in [`cases`]: a name, a [`Goal`] and two closures that
//! each do one run and return its [`Sample`].
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, paths};

mod bpftrace;
mod budgets;
mod common;
mod daemon;
mod startup;
mod stats;
mod storm_inside;

use common::{BACKGROUND_TIMEOUT, Background, Bins, Stats, reported_wall, time};

/// Runs per side when `--runs` is not given.
const DEFAULT_RUNS: usize = 7;
/// Fewest runs per side a full (not `--quick`) benchmark accepts.
const MIN_RUNS: usize = 5;
/// Runs per side with `--quick`.
const QUICK_RUNS: usize = 3;
/// Processes in the fork/exit storm.
const STORM: u64 = 5_000;
/// Processes in the storm with `--quick`.
const QUICK_STORM: u64 = 2_000;
/// Runs with the kernel's per-program statistics on, per case (after its timed runs, which
/// run without them: the statistics add a clock read to every program call).
const COST_RUNS: usize = 3;
/// A daemon socket that does not exist: the statistics runs measure trackers that load their
/// own programs.
const NO_DAEMON: &str = "/nonexistent/cylo-usage-bench.sock";
/// How long the background tracker of case (b) gets to attach before the storm starts.
const ATTACH_WAIT: Duration = Duration::from_secs(1);
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Timed runs per side of each case (at least 5), after one warm-up of each side.
    #[arg(long, value_name = "N")]
    runs: Option<usize>,
    /// Smoke run: 3 runs per side and a storm of 2,000 processes (smaller I/O, memory and
    /// network cases too).
    #[arg(long)]
    quick: bool,
    /// Only these cases: `a`..`h`, `costs` (handler costs during the storm), `net-costs`
    /// (handler costs during untracked TCP and UDP traffic), `sessions` (tracked-path costs
    /// with and without records, attach latency, tracker memory), `daemon` (one shared
    /// program set against in-process trackers, and the daemon under load), `daemon-load`
    /// (only the latter: a victim's run while sessions are polled, and the memory of a
    /// breakdown), `budgets` (budgets' costs and CPU-budget overshoot), `startup` (start-up
    /// beside bpftrace, and each program's verification). Repeatable; default: all.
    #[arg(long = "case", value_name = "CASE")]
    cases: Vec<String>,
}

/// The cases `--case` can name.
const CASE_IDS: [&str; 15] = [
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "costs",
    "net-costs",
    "sessions",
    "daemon",
    "daemon-load",
    "budgets",
    "startup",
];

/// Whether `--case` selects `id` (everything when none is given).
fn selected(args: &Args, id: &str) -> bool {
    args.cases.is_empty() || args.cases.iter().any(|c| c == id)
}

/// One timed run of one side of a case.
struct Sample {
    /// Measured here, around the whole child process.
    wall: Duration,
    /// The wall time the tracker reported itself (spawn to last exit), when the side has one.
    reported: Option<Duration>,
}

impl Sample {
    fn wall(wall: Duration) -> Self {
        Sample {
            wall,
            reported: None,
        }
    }
}

/// One run of one side: does whatever set-up it needs outside the timed part, times the work
/// and tears down again (also on error).
type Side = Box<dyn FnMut() -> Result<Sample>>;

#[derive(Clone, Copy)]
enum Goal {
    /// median(traced) / median(untraced) at most this.
    MaxRatio(f64),
    /// median(traced) - median(untraced) at most this many milliseconds.
    MaxAddedMs(f64),
}

impl Goal {
    fn describe(self) -> String {
        match self {
            Goal::MaxRatio(r) => format!("≤ {r:.2}×"),
            Goal::MaxAddedMs(ms) => format!("≤ {ms:.0} ms added"),
        }
    }

    /// The figure compared against the goal, shown, and whether the goal is met.
    fn judge(self, untraced: &Stats, traced: &Stats) -> (String, bool) {
        match self {
            Goal::MaxRatio(max) => {
                let ratio = traced.median / untraced.median;
                (format!("{ratio:.3}×"), ratio <= max)
            }
            Goal::MaxAddedMs(max) => {
                let added = traced.median - untraced.median;
                (format!("{added:+.1} ms"), added <= max)
            }
        }
    }
}

struct Case {
    name: String,
    goal: Goal,
    untraced: Side,
    traced: Side,
    /// When set, a second row with this name and goal compares the untraced wall time with
    /// the wall time the traced side reported itself ([`Sample::reported`]).
    reported_row: Option<(String, Goal)>,
    /// One traced run with the kernel's per-program statistics on.
    stats: Option<StatsSide>,
}

type StatsSide = Box<dyn FnMut() -> Result<stats::Measure>>;

/// A case's measurements.
struct Measured {
    untraced: Vec<Duration>,
    traced: Vec<Duration>,
    reported: Vec<Duration>,
}

pub fn run(args: Args) -> Result<()> {
    let runs = match (args.runs, args.quick) {
        (Some(0), _) => bail!("--runs must be at least 1"),
        (Some(n), false) if n < MIN_RUNS => {
            bail!("--runs must be at least {MIN_RUNS} (use --quick for a smoke run)")
        }
        (Some(n), _) => n,
        (None, true) => QUICK_RUNS,
        (None, false) => DEFAULT_RUNS,
    };
    let storm = if args.quick { QUICK_STORM } else { STORM };
    if let Some(unknown) = args.cases.iter().find(|c| !CASE_IDS.contains(&c.as_str())) {
        bail!(
            "unknown case {unknown:?}: expected one of {}",
            CASE_IDS.join(", ")
        );
    }

    crate::ebpf::build()?;
    let built = cargo::build_release()?;
    let bins = Bins {
        tracker: cargo::executable(&built, "cylo-usage")?,
        workload: cargo::executable(&built, "cylo-usage-workload")?,
    };
    let out_dir = paths::bench_dir();
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let started = Instant::now();
    let facts = machine_facts();
    let others = other_trackers();
    let mut table = String::new();
    let mut raw = String::new();
    let all = cases(&bins, storm, args.quick, &out_dir);
    // A case's id is the letter its name starts with: "(a) ...".
    let chosen = all.into_iter().filter(|c| {
        let id = c.name.get(1..2).unwrap_or_default();
        selected(&args, id)
    });
    let mut per_case = String::new();
    for mut case in chosen {
        let measured = measure(&mut case, runs)?;
        let untraced = Stats::of(&measured.untraced);
        let traced = Stats::of(&measured.traced);
        let mut handlers = "-".to_string();
        if let Some(side) = case.stats.as_mut() {
            eprintln!("xtask: {}: {COST_RUNS} runs with statistics", case.name);
            let mut m = Vec::new();
            for i in 1..=COST_RUNS {
                m.push(side().with_context(|| format!("{}: statistics run {i}", case.name))?);
            }
            let (t, net) = stats::table(&m);
            let _ = writeln!(per_case, "\n{}:\n", case.name);
            per_case.push_str(&t);
            handlers = format!("{net:.2}%");
        }
        push_row(
            &mut table, &case.name, case.goal, &untraced, &traced, &handlers,
        );
        push_raw(&mut raw, &case.name, "untraced", &measured.untraced);
        push_raw(&mut raw, &case.name, "traced", &measured.traced);
        if let Some((name, goal)) = &case.reported_row
            && measured.reported.len() == measured.traced.len()
        {
            let reported = Stats::of(&measured.reported);
            push_row(&mut table, name, *goal, &untraced, &reported, &handlers);
            push_raw(&mut raw, name, "reported", &measured.reported);
        }
    }
    let mut costs = String::new();
    if selected(&args, "a") {
        costs.push_str(&storm_inside::storm_inside(&bins, storm, runs)?);
    }
    if selected(&args, "startup") {
        costs.push_str(&startup::startup(&bins, runs)?);
    }
    if selected(&args, "costs") {
        costs.push_str(&handler_costs(&bins, storm)?);
    }
    if selected(&args, "net-costs") {
        costs.push_str(&network_costs(&bins, args.quick)?);
    }
    if selected(&args, "sessions") {
        costs.push_str(&session_costs(&bins, storm, args.quick, &out_dir)?);
    }
    if selected(&args, "daemon") {
        costs.push_str(&daemon::daemon_costs(&bins, storm, runs, &out_dir)?);
    }
    if selected(&args, "daemon") || selected(&args, "daemon-load") {
        costs.push_str(&daemon::daemon_load(&bins, runs, &out_dir)?);
    }
    if selected(&args, "budgets") {
        costs.push_str(&budgets::budget_costs(&bins, storm, runs, args.quick)?);
    }
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(out_dir.join("direct-io.data"));

    let mut md = String::new();
    let _ = writeln!(md, "# cylo-usage benchmark\n");
    for (k, v) in &facts {
        let _ = writeln!(md, "- {k}: {v}");
    }
    let _ = writeln!(
        md,
        "- method: {runs} timed runs per side after one warm-up each, untraced and traced \
         interleaved; wall time around the whole child process; storm = {storm} processes"
    );
    if !others.is_empty() {
        let _ = writeln!(
            md,
            "- WARNING: other cylo-usage processes were running at the start (pids {}): \
             their probes slow every fork on the host",
            others.join(", ")
        );
    }
    let _ = writeln!(md, "- load average at the end: {}", load_average());
    let _ = writeln!(md, "- benchmark time: {:.1} s\n", elapsed.as_secs_f64());
    let _ = writeln!(
        md,
        "| case | untraced median (min) | traced median (min) | ratio or added ms | goal | met? \
         | handlers (kernel) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    md.push_str(&table);
    if !per_case.is_empty() {
        let _ = writeln!(
            md,
            "\n\"handlers (kernel)\": the tracker's handlers' run time, by the kernel's \
             per-program statistics, beyond what an empty program on the same tracepoints \
             measures (the statistics' own clock reads), as a share of the traced side's wall \
             time (the tracker's own `wall_time_ms` where the row has one). Medians of \
             {COST_RUNS} traced runs with statistics on, after the timed runs:"
        );
        md.push_str(&per_case);
    }
    md.push_str(&costs);
    let _ = writeln!(md, "\nRaw samples (ms, in run order):\n");
    md.push_str(&raw);

    print!("{md}");
    let latest = out_dir.join("latest.md");
    std::fs::write(&latest, &md).with_context(|| format!("writing {}", latest.display()))?;
    eprintln!("xtask: wrote {}", latest.display());
    Ok(())
}

/// The benchmark's cases, in the order they run.
fn cases(bins: &Bins, storm: u64, quick: bool, out_dir: &Path) -> Vec<Case> {
    let storm_arg = storm.to_string();
    let storm_cmd = {
        let workload = bins.workload.clone();
        let storm_arg = storm_arg.clone();
        move || {
            let mut cmd = Command::new(&workload);
            cmd.args(["storm", &storm_arg]);
            cmd
        }
    };
    let mut cases = Vec::new();

    // (a) The storm, tracked, with a second row for the tracker's own wall time (which
    // leaves out its start-up).
    cases.push(workload_case(
        bins,
        out_dir,
        format!("(a) storm {storm}, tracked (incl. tracker start-up)"),
        Goal::MaxRatio(1.10),
        vec!["storm".into(), storm_arg.clone()],
    ));

    // (b) The storm left untracked while a tracker follows `sleep 3600`. The background
    // tracker starts and stops around every traced run (outside the timed part), so the
    // untraced runs really have no tracker and both sides interleave like the other cases.
    {
        let untraced_storm = storm_cmd.clone();
        let traced_storm = storm_cmd;
        let tracker = bins.tracker.clone();
        cases.push(Case {
            name: format!("(b) storm {storm}, untracked, tracker on another tree"),
            goal: Goal::MaxRatio(1.03),
            untraced: Box::new(move || Ok(Sample::wall(time(&mut untraced_storm())?))),
            traced: Box::new(move || {
                let mut cmd = Command::new(&tracker);
                cmd.args(["run", "-o", "/dev/null", "--", "sleep", "3600"]);
                let mut background = Background::start(cmd)?;
                background.wait_attached(ATTACH_WAIT)?;
                let wall = time(&mut traced_storm())?;
                background.check_alive()?;
                background.stop()?;
                Ok(Sample::wall(wall))
            }),
            reported_row: None,
            stats: Some({
                let bins = Bins {
                    tracker: bins.tracker.clone(),
                    workload: bins.workload.clone(),
                };
                let args = vec!["storm".to_string(), storm_arg.clone()];
                Box::new(move || costs_during(&bins, &args))
            }),
        });
    }

    // (c) The fixed cost of tracking one tiny command.
    {
        let tracker = bins.tracker.clone();
        cases.push(Case {
            name: "(c) /bin/true".into(),
            goal: Goal::MaxAddedMs(50.0),
            untraced: Box::new(|| Ok(Sample::wall(time(&mut Command::new("/bin/true"))?))),
            traced: Box::new(move || {
                let mut cmd = Command::new(&tracker);
                cmd.args(["run", "-o", "/dev/null", "--", "/bin/true"]);
                Ok(Sample::wall(time(&mut cmd)?))
            }),
            reported_row: None,
            stats: Some({
                let tracker = bins.tracker.clone();
                Box::new(move || {
                    let mut cmd = Command::new(&tracker);
                    cmd.args(["run", "-o", "/dev/null", "--", "/bin/true"]);
                    tracked_stats(cmd, None)
                })
            }),
        });
    }

    // (h) The storm with per-process records (breakdown and event stream) against the storm
    // tracked for totals only: both sides are tracked, both include the tracker's start-up.
    {
        let tracker = bins.tracker.clone();
        let workload = bins.workload.clone();
        let events = out_dir.join("storm-events.ndjson");
        let storm_arg = storm_arg.clone();
        let command = move |records: bool| {
            let mut cmd = Command::new(&tracker);
            cmd.args(["run", "-o", "/dev/null"]);
            if records {
                cmd.args(["--tree", "--events"]).arg(&events);
            }
            cmd.arg("--").arg(&workload).args(["storm", &storm_arg]);
            cmd
        };
        let aggregate = {
            let command = command.clone();
            move |records: bool| -> Result<Sample> {
                Ok(Sample::wall(time(&mut command(records))?))
            }
        };
        let plain = aggregate.clone();
        cases.push(Case {
            name: format!("(h) storm {storm}: --tree --events vs totals only"),
            goal: Goal::MaxRatio(1.05),
            untraced: Box::new(move || plain(false)),
            traced: Box::new(move || aggregate(true)),
            reported_row: None,
            stats: Some(Box::new(move || tracked_stats(command(true), None))),
        });
    }

    // (d) I/O-heavy: O_DIRECT writes of 4 KiB each (every one a block I/O, a block_bio_queue
    // event and I/O accounting). 256 MiB (65,536 writes) keeps a run near 4 s on this disk.
    let io_mib = if quick { 64 } else { 256 };
    let io_file = out_dir.join("direct-io.data");
    cases.push(workload_case(
        bins,
        out_dir,
        format!("(d) {io_mib} MiB in 4 KiB O_DIRECT writes"),
        Goal::MaxRatio(1.03),
        vec![
            "write-direct".into(),
            io_file.to_string_lossy().into_owned(),
            io_mib.to_string(),
            "4096".into(),
        ],
    ));

    // (e) Page-fault-heavy: touching 1 GiB in 4 KiB pages (no THP): 262,144 faults, each an
    // rss_stat event on a tracked address space.
    let touch_mib = if quick { 512 } else { 1024 };
    cases.push(workload_case(
        bins,
        out_dir,
        format!("(e) touch {touch_mib} MiB in 4 KiB pages"),
        Goal::MaxRatio(1.05),
        vec![
            "spike".into(),
            touch_mib.to_string(),
            "0".into(),
            "0".into(),
            "small".into(),
        ],
    ));

    // (f) Loopback TCP, both ends in the tree: every write and read a socket hook call.
    let (tcp_bytes, udp_count) = net_sizes(quick);
    cases.push(workload_case(
        bins,
        out_dir,
        format!("(f) loopback TCP, {} MiB in 64 KiB writes", tcp_bytes >> 20),
        Goal::MaxRatio(1.03),
        net_tcp_args(tcp_bytes),
    ));

    // (g) UDP datagrams of 64 bytes: the most socket calls per byte.
    cases.push(workload_case(
        bins,
        out_dir,
        format!("(g) UDP, {udp_count} datagrams of 64 bytes"),
        Goal::MaxRatio(1.05),
        net_udp_args(udp_count),
    ));

    cases
}

/// Bytes of case (f) and datagrams of case (g).
fn net_sizes(quick: bool) -> (u64, u64) {
    if quick {
        (256 << 20, 200_000)
    } else {
        (1 << 30, 1_000_000)
    }
}

fn net_tcp_args(bytes: u64) -> Vec<String> {
    ["net", "tcp", &bytes.to_string(), "0", "v4", "65536"]
        .map(String::from)
        .to_vec()
}

fn net_udp_args(count: u64) -> Vec<String> {
    ["net", "udp", &count.to_string(), "64", "64"]
        .map(String::from)
        .to_vec()
}

/// A case that runs the workload with `args` plainly and under `cylo-usage run`, with a
/// second row for the tracker's own wall time (its start-up left out).
fn workload_case(bins: &Bins, out_dir: &Path, name: String, goal: Goal, args: Vec<String>) -> Case {
    let workload = bins.workload.clone();
    let plain_args = args.clone();
    let tracker = bins.tracker.clone();
    let traced_workload = bins.workload.clone();
    let report = out_dir.join("workload-report.json");
    let stats_side: StatsSide = {
        let tracker = bins.tracker.clone();
        let workload = bins.workload.clone();
        let args = args.clone();
        let report = out_dir.join("stats-report.json");
        Box::new(move || {
            let mut cmd = Command::new(&tracker);
            cmd.args(["run", "--json", "-o"])
                .arg(&report)
                .arg("--")
                .arg(&workload)
                .args(&args);
            tracked_stats(cmd, Some(&report))
        })
    };
    Case {
        stats: Some(stats_side),
        reported_row: Some((format!("{name}: in-tracker wall_time_ms only"), goal)),
        name,
        goal,
        untraced: Box::new(move || {
            Ok(Sample::wall(time(
                Command::new(&workload).args(&plain_args),
            )?))
        }),
        traced: Box::new(move || {
            let _ = std::fs::remove_file(&report);
            let mut cmd = Command::new(&tracker);
            cmd.args(["run", "--json", "-o"])
                .arg(&report)
                .arg("--")
                .arg(&traced_workload)
                .args(&args);
            let wall = time(&mut cmd)?;
            Ok(Sample {
                wall,
                reported: Some(reported_wall(&report)?),
            })
        }),
    }
}

/// One warm-up of each side, then `runs` of each, interleaved.
fn measure(case: &mut Case, runs: usize) -> Result<Measured> {
    eprintln!("xtask: {}: warm-up", case.name);
    (case.untraced)().with_context(|| format!("{}: untraced warm-up", case.name))?;
    (case.traced)().with_context(|| format!("{}: traced warm-up", case.name))?;
    let mut m = Measured {
        untraced: Vec::with_capacity(runs),
        traced: Vec::with_capacity(runs),
        reported: Vec::with_capacity(runs),
    };
    for i in 1..=runs {
        let u = (case.untraced)().with_context(|| format!("{}: untraced run {i}", case.name))?;
        let t = (case.traced)().with_context(|| format!("{}: traced run {i}", case.name))?;
        eprintln!(
            "xtask: {}: run {i}/{runs}: untraced {:.1} ms, traced {:.1} ms{}",
            case.name,
            u.wall.as_secs_f64() * 1e3,
            t.wall.as_secs_f64() * 1e3,
            t.reported
                .map(|r| format!(" (reported {} ms)", r.as_millis()))
                .unwrap_or_default()
        );
        m.untraced.push(u.wall);
        m.traced.push(t.wall);
        m.reported.extend(t.reported);
    }
    Ok(m)
}

fn push_row(
    table: &mut String,
    name: &str,
    goal: Goal,
    untraced: &Stats,
    traced: &Stats,
    handlers: &str,
) {
    let (figure, met) = goal.judge(untraced, traced);
    let _ = writeln!(
        table,
        "| {name} | {} | {} | {figure} | {} | {} | {handlers} |",
        untraced.cell(),
        traced.cell(),
        goal.describe(),
        if met { "yes" } else { "**no**" }
    );
}

fn push_raw(raw: &mut String, case: &str, side: &str, samples: &[Duration]) {
    let list: Vec<String> = samples
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64() * 1e3))
        .collect();
    let _ = writeln!(raw, "- {case}, {side}: {}", list.join(", "));
}

/// Pids of `cylo-usage` processes already running (their probes would slow both sides).
fn other_trackers() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.parse::<u32>().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == "cylo-usage").then_some(name)
        })
        .collect()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Date, CPUs, kernel, CPU model, memory and load, as (label, value).
fn machine_facts() -> Vec<(&'static str, String)> {
    let command = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let memory = crate::meminfo::kib(&crate::meminfo::read(), "MemTotal")
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "unknown".into());
    vec![
        ("date", command("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])),
        ("nproc", command("nproc", &[])),
        ("kernel", command("uname", &["-r"])),
        ("cpu", model),
        ("memory", memory),
        ("load average at the start", load_average()),
    ]
}

/// The handlers' kernel statistics while `workload args` runs untracked and a tracker follows
/// another tree (`sleep 3600`).
fn costs_during(bins: &Bins, args: &[String]) -> Result<stats::Measure> {
    let _stats = stats::enable()?;
    let mut cmd = Command::new(&bins.tracker);
    cmd.args(["run", "-o", "/dev/null", "--", "sleep", "3600"]);
    // Its own programs, never a daemon's.
    cmd.env("CYLO_USAGE_SOCKET", NO_DAEMON);
    let mut background = Background::start(cmd)?;
    background.wait_attached(ATTACH_WAIT)?;
    let mut handlers = stats::Handlers::of(background.pid())?;
    handlers.settle(Duration::ZERO, || false);
    let empty = stats::EmptyPrograms::attach(&stats::tracepoints())?;
    let (before, floor_before) = (handlers.snapshot()?, empty.snapshot()?);
    let wall = time(Command::new(&bins.workload).args(args))?;
    let (after, floor_after) = (handlers.snapshot()?, empty.snapshot()?);
    background.stop()?;
    Ok(stats::Measure {
        handlers: stats::delta(&before, &after),
        floor: stats::delta(&floor_before, &floor_after),
        wall,
    })
}

/// One tracked run of `cmd` (a `cylo-usage` command) with the kernel's statistics on: its
/// handlers' run time, the empty program's on the same tracepoints, and the wall time the
/// shares are of: the tracker's own `wall_time_ms` (spawn to last exit) when `report` names
/// its JSON report, else the whole command's.
fn tracked_stats(mut cmd: Command, report: Option<&Path>) -> Result<stats::Measure> {
    let _stats = stats::enable()?;
    let empty = stats::EmptyPrograms::attach(&stats::tracepoints())?;
    let floor_before = empty.snapshot()?;
    if let Some(r) = report {
        let _ = std::fs::remove_file(r);
    }
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("CYLO_USAGE_SOCKET", NO_DAEMON);
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {shown}"))?;
    let mut handlers = stats::Handlers::of(child.id())?;
    handlers.settle(Duration::from_millis(50), || {
        child.try_wait().map(|s| s.is_some()).unwrap_or(true)
    });
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {shown}"))?;
    let mut wall = start.elapsed();
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if let Some(r) = report {
        wall = reported_wall(r)?;
    }
    Ok(stats::Measure {
        handlers: handlers.snapshot()?,
        floor: stats::delta(&floor_before, &empty.snapshot()?),
        wall,
    })
}

// By program name over the whole host: the daemon case (`bench/daemon.rs`) counts the
// idle daemon's programs this way.
/// What every untracked process pays, measured by the kernel rather than by wall clocks:
/// the tracker's handlers' run time during one untracked storm while a tracker follows
/// another tree. Much steadier than case (b) on a noisy machine.
fn handler_costs(bins: &Bins, storm: u64) -> Result<String> {
    let mut runs = Vec::new();
    for _ in 0..COST_RUNS {
        runs.push(costs_during(
            bins,
            &["storm".to_string(), storm.to_string()],
        )?);
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\nWhat an untracked process pays (kernel per-program run time during an untracked \
         storm of {storm} while a tracker follows another tree; medians of {COST_RUNS} storms):\n"
    );
    md.push_str(&stats::table(&runs).0);
    Ok(md)
}

/// The same for socket traffic: cases (f) and (g) run untracked while a tracker follows
/// another tree; every send and receive calls a network handler, which returns after one
/// lookup.
fn network_costs(bins: &Bins, quick: bool) -> Result<String> {
    let (tcp_bytes, udp_count) = net_sizes(quick);
    let mut md = String::new();
    for (what, args) in [
        (
            format!("loopback TCP, {} MiB in 64 KiB writes", tcp_bytes >> 20),
            net_tcp_args(tcp_bytes),
        ),
        (
            format!("UDP, {udp_count} datagrams of 64 bytes"),
            net_udp_args(udp_count),
        ),
    ] {
        let m = costs_during(bins, &args)?;
        let _ = writeln!(
            md,
            "\nWhat an untracked process pays per socket call (kernel per-program run time \
             during {what}, untracked, while a tracker follows another tree):\n"
        );
        md.push_str(&stats::table(&[m]).0);
    }
    Ok(md)
}

/// Runs `cmd` to completion; returns its peak RSS (KiB, from wait4) and its wall time.
fn peak_rss(cmd: &mut Command) -> Result<(u64, Duration)> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {shown}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 reaps our own child (std never waits for it:
    // `child` is forgotten below).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    std::mem::forget(child);
    let wall = start.elapsed();
    if r != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{shown} failed (wait status {status:#x})");
    }
    Ok((ru.ru_maxrss as u64, wall))
}

/// Sessions: the tracked paths' kernel cost with and without records, the attach latency,
/// and the tracker's memory per process of a breakdown.
fn session_costs(bins: &Bins, storm: u64, quick: bool, out_dir: &Path) -> Result<String> {
    let mut md = String::new();
    // Tracked paths, by the kernel's per-program statistics: the storm under `run`, totals
    // only and with records. The tracker's own start-up is in both (the shares are of the
    // whole command's wall time).
    {
        let events = out_dir.join("storm-events.ndjson");
        for records in [false, true] {
            let mut runs = Vec::new();
            for _ in 0..COST_RUNS {
                let mut cmd = Command::new(&bins.tracker);
                cmd.args(["run", "-o", "/dev/null"]);
                if records {
                    cmd.args(["--tree", "--events"]).arg(&events);
                }
                cmd.arg("--")
                    .arg(&bins.workload)
                    .args(["storm", &storm.to_string()]);
                runs.push(tracked_stats(cmd, None)?);
            }
            let _ = writeln!(
                md,
                "\nWhat a tracked process pays (kernel per-program run time during a tracked storm \
                 of {storm}, {}; medians of {COST_RUNS}):\n",
                if records {
                    "with `--tree --events`"
                } else {
                    "totals only"
                }
            );
            md.push_str(&stats::table(&runs).0);
        }
    }

    // Attach latency: a tree of 1,000 processes (blocked on stdin) that the tracker did not
    // start; the time from the session's start to its `attached` event (the tracker's own
    // start-up before that is timed apart).
    let tree = if quick { 300 } else { 1_000 };
    let rounds = if quick { 2 } else { 5 };
    let mut adopt = Vec::new();
    let mut total = Vec::new();
    for _ in 0..rounds {
        let mut target = Command::new(&bins.workload)
            .args(["hold", &tree.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the tree to attach to")?;
        // Let the tree form.
        let children = format!("/proc/{0}/task/{0}/children", target.id());
        let formed = Instant::now();
        while std::fs::read_to_string(&children)
            .map(|s| s.split_whitespace().count())
            .unwrap_or(tree)
            < tree
        {
            if formed.elapsed() > BACKGROUND_TIMEOUT {
                bail!("the tree of {tree} did not form");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let events = out_dir.join("attach-events.ndjson");
        let _ = std::fs::remove_file(&events);
        let start = Instant::now();
        let mut attach = Command::new(&bins.tracker)
            .args(["attach", "-o", "/dev/null", "--events"])
            .arg(&events)
            .arg(target.id().to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting cylo-usage attach")?;
        let attached = loop {
            let text = std::fs::read_to_string(&events).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("\"event\":\"attached\"")) {
                let v: serde_json::Value = serde_json::from_str(line)?;
                break v;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = attach.kill();
                bail!("no attached event within 60 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        total.push(start.elapsed());
        let ns = attached["time_ns"].as_u64().unwrap_or(0);
        adopt.push(Duration::from_nanos(ns));
        drop(target.stdin.take());
        target.wait()?;
        attach.wait()?;
    }
    let adopt_stats = Stats::of(&adopt);
    let total_stats = Stats::of(&total);
    let _ = writeln!(
        md,
        "\nAttach to a running tree of {} processes (median of {rounds}): registering the tree \
         (session start to its `attached` event) {:.1} ms (min {:.1}); from starting \
         `cylo-usage attach` to that event, start-up included, {:.1} ms (min {:.1}).",
        tree + 1,
        adopt_stats.median,
        adopt_stats.min,
        total_stats.median,
        total_stats.min
    );

    // The tracker's own memory: peak RSS on sequential storms of 10,000 and 50,000 processes,
    // totals only and with --tree (and --events to a file). The start-up (the kernel's BTF,
    // parsed twice) sets a peak of its own that a small breakdown stays under: the slope
    // between two large trees is the breakdown's cost.
    let sizes: [u64; 2] = if quick {
        [2_000, 10_000]
    } else {
        [10_000, 50_000]
    };
    let events = out_dir.join("rss-events.ndjson");
    let mut rss = Vec::new();
    for records in [false, true] {
        for n in sizes {
            let mut cmd = Command::new(&bins.tracker);
            cmd.args(["run", "-o", "/dev/null"]);
            if records {
                cmd.args(["--tree", "--events"]).arg(&events);
            }
            cmd.arg("--")
                .arg(&bins.workload)
                .args(["storm", &n.to_string()]);
            rss.push(peak_rss(&mut cmd)?.0);
        }
    }
    let per_process = (rss[3] as f64 - rss[2] as f64) * 1024.0 / (sizes[1] - sizes[0]) as f64;
    let _ = writeln!(
        md,
        "\nTracker peak RSS (wait4 ru_maxrss): totals only {} KiB ({} processes) and {} KiB \
         ({}); with --tree --events {} KiB and {} KiB: about {:.0} bytes per process of the \
         breakdown.",
        rss[0], sizes[0], rss[1], sizes[1], rss[2], rss[3], per_process
    );
    let _ = std::fs::remove_file(&events);
    let _ = std::fs::remove_file(out_dir.join("storm-events.ndjson"));
    let _ = std::fs::remove_file(out_dir.join("attach-events.ndjson"));
    Ok(md)
}
