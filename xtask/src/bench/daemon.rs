//! `cargo xtask bench --case daemon`: what one shared program set (`cylo-usage serve`) costs
//! and saves, against in-process trackers. Wall-clock ratios with medians, and beside each the
//! kernel's per-program run time of every handler loaded on the host (all trackers' together).
//! Then the daemon under load (`--case daemon-load` alone): a victim's `run -- /bin/true`
//! while other users' sessions of many threads are polled back to back, and what a
//! 10,000-process breakdown costs the daemon in memory.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::common::{
    Background, Bins, CostRows, Stats, cost_table, handler_stats, reported_wall, time,
};
use super::stats::median;

/// Sessions (or in-process trackers) open during the crowded side of the contrast cases.
const CROWD: usize = 16;

/// A daemon on a private socket, with metrics; killed when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
    metrics: String,
}

impl Daemon {
    fn start(bins: &Bins, dir: &Path) -> Result<Daemon> {
        Daemon::start_with(bins, dir, "bench-daemon.sock", &[])
    }

    /// A daemon on socket `name` in `dir`, with `extra` arguments to `serve`.
    fn start_with(bins: &Bins, dir: &Path, name: &str, extra: &[&str]) -> Result<Daemon> {
        let socket = dir.join(name);
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let metrics = format!("127.0.0.1:{port}");
        let child = Command::new(&bins.tracker)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(["--metrics", &metrics])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting cylo-usage serve")?;
        let d = Daemon {
            child,
            socket,
            metrics,
        };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("cylo-usage serve did not listen within 30 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(d)
    }

    /// `cylo-usage ARGS` as this daemon's client.
    fn client(&self, bins: &Bins, args: &[&str]) -> Command {
        let mut c = Command::new(&bins.tracker);
        c.args(args).env("CYLO_USAGE_SOCKET", &self.socket);
        c
    }

    /// One metric's value from `GET /metrics`.
    fn metric(&self, name: &str) -> Result<f64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics)?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no metric {name}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The ids of the eBPF programs process `pid` holds (from its fdinfo).
fn programs_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("prog_id:"))
                        .and_then(|v| v.trim().parse().ok())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `n` background `cylo-usage run -- sleep 3600`, each made by `make`, all following.
fn crowd(n: usize, make: impl Fn() -> Command) -> Result<Vec<Background>> {
    let mut all = Vec::new();
    for _ in 0..n {
        let mut cmd = make();
        cmd.args(["run", "-o", "/dev/null", "--", "sleep", "3600"]);
        let mut b = Background::start(cmd)?;
        b.wait_attached(Duration::ZERO)?;
        all.push(b);
    }
    Ok(all)
}

fn stop(all: Vec<Background>) -> Result<()> {
    for b in all {
        b.stop()?;
    }
    Ok(())
}

/// Handler rows (name -> ns, calls) during `cmd`, and its wall time.
fn with_costs(cmd: &mut Command) -> Result<(Duration, CostRows)> {
    let before = handler_stats()?;
    let wall = time(cmd)?;
    let after = handler_stats()?;
    let mut rows = CostRows::new();
    for (id, (name, ns, calls)) in &after {
        let (_, ns0, calls0) = before.get(id).cloned().unwrap_or_default();
        let row = rows.entry(name.clone()).or_default();
        row.0 += ns.saturating_sub(ns0);
        row.1 += calls.saturating_sub(calls0);
    }
    Ok((wall, rows))
}

fn share(wall: Duration, rows: &CostRows) -> f64 {
    let ns: u64 = rows.values().map(|r| r.0).sum();
    ns as f64 / wall.as_nanos().max(1) as f64 * 100.0
}

struct Row {
    name: String,
    a: Vec<Duration>,
    b: Vec<Duration>,
    a_share: Vec<f64>,
    b_share: Vec<f64>,
    goal: Option<(&'static str, f64)>,
    added: bool,
}

impl Row {
    fn new(name: String, goal: Option<(&'static str, f64)>, added: bool) -> Row {
        Row {
            name,
            a: vec![],
            b: vec![],
            a_share: vec![],
            b_share: vec![],
            goal,
            added,
        }
    }

    fn line(&self) -> String {
        let (a, b) = (Stats::of(&self.a), Stats::of(&self.b));
        let figure = if self.added {
            b.median - a.median
        } else {
            b.median / a.median
        };
        let shown = if self.added {
            format!("{figure:+.1} ms")
        } else {
            format!("{figure:.3}×")
        };
        let (goal, met) = match self.goal {
            Some((text, max)) => (text.to_string(), if figure <= max { "yes" } else { "no" }),
            None => ("report".to_string(), "-"),
        };
        let shares = if self.a_share.is_empty() {
            "-".to_string()
        } else {
            format!(
                "{:.2}% → {:.2}%",
                median(self.a_share.clone()),
                median(self.b_share.clone())
            )
        };
        format!(
            "| {} | {} | {} | {shown} | {shares} | {goal} | {met} |\n",
            self.name,
            a.cell(),
            b.cell(),
        )
    }
}

pub(crate) fn daemon_costs(bins: &Bins, storm: u64, runs: usize, out_dir: &Path) -> Result<String> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (per-program run time)")?;
    let storm_arg = storm.to_string();
    let storm_cmd = || {
        let mut c = Command::new(&bins.workload);
        c.args(["storm", &storm_arg]);
        c
    };
    let mut rows = Vec::new();
    let mut notes = String::new();

    // Idle: the storm with no daemon, and with a daemon that has no session (hooks detached).
    let mut idle = Row::new(
        format!("untracked storm {storm}: no daemon → idle daemon"),
        Some(("≤ 1.01×", 1.01)),
        false,
    );
    let mut reattach_ns = Vec::new();
    let mut idle_calls = 0;
    for i in 0..=runs {
        let (wa, ra) = with_costs(&mut storm_cmd())?;
        let daemon = Daemon::start(bins, out_dir)?;
        let held = programs_of(daemon.child.id());
        let before = handler_stats()?;
        let (wb, rb) = with_costs(&mut storm_cmd())?;
        let after = handler_stats()?;
        // Calls of the idle daemon's own programs (others' trackers may run on the host).
        idle_calls += after
            .iter()
            .filter(|(id, _)| held.contains(id))
            .map(|(id, (_, _, calls))| calls - before.get(id).map_or(0, |b| b.2))
            .sum::<u64>();
        // The first session after idling attaches the hooks again.
        time(&mut daemon.client(bins, &["run", "-o", "/dev/null", "--", "/bin/true"]))?;
        reattach_ns.push(daemon.metric("cylo_usage_hooks_attach_last_nanoseconds")?);
        drop(daemon);
        if i > 0 {
            idle.a.push(wa);
            idle.b.push(wb);
            idle.a_share.push(share(wa, &ra));
            idle.b_share.push(share(wb, &rb));
        }
    }
    let _ = writeln!(
        notes,
        "- Idle daemon: its handlers ran {idle_calls} times in {} storms (hooks detached). \
         Re-attaching them for the first session took {:.2} ms (median of {}; min {:.2}).",
        runs + 1,
        median(reattach_ns.clone()) / 1e6,
        reattach_ns.len(),
        reattach_ns.iter().copied().fold(f64::INFINITY, f64::min) / 1e6
    );
    rows.push(idle);

    let daemon = Daemon::start(bins, out_dir)?;
    // 16 sessions against 1 in the daemon: the untracked storm pays for one program set.
    {
        let mut row = Row::new(
            format!("untracked storm {storm}: 1 → {CROWD} daemon sessions"),
            Some(("≤ 1.01×", 1.01)),
            false,
        );
        let base = crowd(1, || daemon.client(bins, &[]))?;
        for i in 0..=runs {
            let (wa, ra) = with_costs(&mut storm_cmd())?;
            let more = crowd(CROWD - 1, || daemon.client(bins, &[]))?;
            let (wb, rb) = with_costs(&mut storm_cmd())?;
            stop(more)?;
            if i > 0 {
                row.a.push(wa);
                row.b.push(wb);
                row.a_share.push(share(wa, &ra));
                row.b_share.push(share(wb, &rb));
            }
        }
        stop(base)?;
        rows.push(row);
    }
    // The same with in-process trackers, for contrast.
    {
        let mut row = Row::new(
            format!("untracked storm {storm}: 1 → {CROWD} in-process trackers"),
            None,
            false,
        );
        let make = || {
            let mut c = Command::new(&bins.tracker);
            c.env("CYLO_USAGE_SOCKET", "/nonexistent/cylo-usage-bench.sock");
            c
        };
        let base = crowd(1, make)?;
        for i in 0..=runs {
            let (wa, ra) = with_costs(&mut storm_cmd())?;
            let more = crowd(CROWD - 1, make)?;
            let (wb, rb) = with_costs(&mut storm_cmd())?;
            stop(more)?;
            if i > 0 {
                row.a.push(wa);
                row.b.push(wb);
                row.a_share.push(share(wa, &ra));
                row.b_share.push(share(wb, &rb));
            }
        }
        stop(base)?;
        rows.push(row);
    }
    // One tracked command's fixed cost through the daemon (idle: it re-attaches the hooks).
    {
        let mut row = Row::new(
            "`run -- /bin/true` through the daemon vs bare".to_string(),
            Some(("≤ 5 ms added", 5.0)),
            true,
        );
        for i in 0..=runs * 2 {
            let wa = time(&mut Command::new("/bin/true"))?;
            let wb =
                time(&mut daemon.client(bins, &["run", "-o", "/dev/null", "--", "/bin/true"]))?;
            if i > 0 {
                row.a.push(wa);
                row.b.push(wb);
            }
        }
        rows.push(row);
    }
    // The tracked storm: through the daemon against in-process, by the wall time each
    // reports itself (spawn to last exit: the in-process start-up left out).
    {
        let mut row = Row::new(
            format!("tracked storm {storm}: in-process → daemon (reported wall)"),
            Some(("≤ 1.01×", 1.01)),
            false,
        );
        let report = out_dir.join("daemon-storm.json");
        let tracked = |via_daemon: bool| -> Result<(Duration, f64)> {
            let mut c = if via_daemon {
                daemon.client(bins, &[])
            } else {
                Command::new(&bins.tracker)
            };
            c.args(["run", "--json", "-o"]).arg(&report);
            if !via_daemon {
                c.arg("--no-daemon");
            }
            c.arg("--").arg(&bins.workload).args(["storm", &storm_arg]);
            let (_, rows) = with_costs(&mut c)?;
            let wall = reported_wall(&report)?;
            Ok((wall, share(wall, &rows)))
        };
        for i in 0..=runs {
            let (wa, sa) = tracked(false)?;
            let (wb, sb) = tracked(true)?;
            if i > 0 {
                row.a.push(wa);
                row.b.push(wb);
                row.a_share.push(sa);
                row.b_share.push(sb);
            }
        }
        let _ = std::fs::remove_file(&report);
        rows.push(row);
    }
    // Where the handlers' time goes with 16 sessions open.
    let crowd_costs = {
        let all = crowd(CROWD, || daemon.client(bins, &[]))?;
        let costs = with_costs(&mut storm_cmd());
        stop(all)?;
        costs?
    };
    drop(daemon);

    let mut md = String::new();
    let _ = writeln!(
        md,
        "\nOne program set per host (`cylo-usage serve`; {runs} runs per side after one \
         warm-up, interleaved; handler share = the kernel's run time of every loaded handler \
         as a share of the run's wall time, median, A → B):\n"
    );
    let _ = writeln!(
        md,
        "| case (A → B) | A median (min) | B median (min) | ratio or added | handler share | goal | met? |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for r in &rows {
        md.push_str(&r.line());
    }
    md.push('\n');
    md.push_str(&notes);
    let _ = writeln!(
        md,
        "\nHandlers during one untracked storm with {CROWD} daemon sessions open (wall {:.1} ms):\n",
        crowd_costs.0.as_secs_f64() * 1e3
    );
    md.push_str(&cost_table(crowd_costs.0, &crowd_costs.1));
    Ok(md)
}

/// Sessions polled back to back while the victim runs.
const POLLED_SESSIONS: usize = 8;
/// Threads in each polled session's tree.
const POLLED_THREADS: usize = 2_000;
/// Processes in the breakdown whose memory is measured.
const BREAKDOWN_PROCESSES: usize = 10_000;
/// The unprivileged user the pollers run as (no account needed).
const POLLER_UID: u32 = 60_123;

/// A `cylo-usage-workload poll-usage` client: one session of `POLLED_THREADS` threads whose
/// usage it asks for back to back until its stdin closes.
struct Poller {
    child: Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Poller {
    fn start(bins: &Bins, daemon: &Daemon, as_user: bool) -> Result<Poller> {
        let mut cmd = if as_user {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={POLLER_UID}"),
                format!("--regid={POLLER_UID}"),
                "--clear-groups".to_string(),
                "--".to_string(),
            ]);
            c.arg(&bins.workload);
            c
        } else {
            Command::new(&bins.workload)
        };
        cmd.arg("poll-usage")
            .arg(&daemon.socket)
            .arg(POLLED_THREADS.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting a poll-usage client")?;
        let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        Ok(Poller { child, stdout })
    }

    /// Waits for the `ready` line: every thread of its tree is followed.
    fn wait_ready(&mut self) -> Result<()> {
        use std::io::BufRead;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("a poll-usage client failed before it was ready ({line:?})");
        }
        Ok(())
    }

    /// Closes its stdin (it ends its session) and returns how many answers it got.
    fn stop(mut self) -> Result<u64> {
        use std::io::BufRead;
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("a poll-usage client failed: {status}");
        }
        line.trim()
            .parse()
            .with_context(|| format!("poll count {line:?}"))
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `VmRSS` of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no VmRSS")
}

/// Whether `setpriv` can make an unprivileged user here.
fn can_use_setpriv() -> bool {
    Command::new("setpriv")
        .args([
            format!("--reuid={POLLER_UID}"),
            format!("--regid={POLLER_UID}"),
            "--clear-groups".to_string(),
            "--".to_string(),
            "/bin/true".to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The daemon under load: a victim's `run -- /bin/true` (root) while
/// [`POLLED_SESSIONS`] sessions of [`POLLED_THREADS`] threads (another user's) are polled back
/// to back, against the same victim on the idle daemon; then the daemon's resident memory
/// before and during a session holding a [`BREAKDOWN_PROCESSES`]-process breakdown.
pub(crate) fn daemon_load(bins: &Bins, runs: usize, out_dir: &Path) -> Result<String> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (per-program run time)")?;
    let mut md = String::new();
    let mut notes = String::new();
    let as_user = can_use_setpriv();
    let daemon = Daemon::start_with(bins, out_dir, "bench-load.sock", &["--allow-all-users"])?;
    let victim = || daemon.client(bins, &["run", "-o", "/dev/null", "--", "/bin/true"]);
    let mut row = Row::new(
        format!(
            "victim's `run -- /bin/true`: idle daemon → {POLLED_SESSIONS} sessions of \
             {POLLED_THREADS} threads polled"
        ),
        Some(("≤ 2×", 2.0)),
        false,
    );
    let mut loaded_rows = CostRows::new();
    let mut loaded_wall = Duration::ZERO;
    // Warm-up: the hooks attach for the first session.
    time(&mut victim())?;
    for _ in 0..runs * 2 {
        let (w, r) = with_costs(&mut victim())?;
        row.a.push(w);
        row.a_share.push(share(w, &r));
    }
    let mut pollers = Vec::new();
    for _ in 0..POLLED_SESSIONS {
        let mut p = Poller::start(bins, &daemon, as_user)?;
        p.wait_ready()?;
        pollers.push(p);
    }
    let polling_since = Instant::now();
    time(&mut victim())?;
    for i in 0..runs * 2 {
        let (w, r) = with_costs(&mut victim())?;
        eprintln!(
            "xtask: victim under polling: run {}/{}: {:.1} ms",
            i + 1,
            runs * 2,
            w.as_secs_f64() * 1e3
        );
        row.b.push(w);
        row.b_share.push(share(w, &r));
        loaded_wall += w;
        for (name, (ns, calls)) in r {
            let e = loaded_rows.entry(name).or_default();
            e.0 += ns;
            e.1 += calls;
        }
    }
    let polled_for = polling_since.elapsed();
    let mut polls = 0;
    for p in pollers {
        polls += p.stop()?;
    }
    let ms = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.1}", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        notes,
        "- Victim samples (ms, in run order): idle {}; polled {}.",
        ms(&row.a),
        ms(&row.b)
    );
    let _ = writeln!(
        notes,
        "- Pollers ({}): {polls} `usage` answers in {:.1} s ({:.0}/s over the {POLLED_SESSIONS} \
         sessions) while the victim ran.",
        if as_user {
            format!("uid {POLLER_UID}, through setpriv")
        } else {
            "root: setpriv unavailable".to_string()
        },
        polled_for.as_secs_f64(),
        polls as f64 / polled_for.as_secs_f64().max(1e-9),
    );
    drop(daemon);

    // Memory: a fresh daemon; an events-only storm of the same size first, so that the
    // records ring buffer's pages are resident already and the delta is the breakdown's.
    let daemon = Daemon::start_with(bins, out_dir, "bench-load.sock", &[])?;
    let storm = BREAKDOWN_PROCESSES.to_string();
    let events = out_dir.join("bench-load-events.ndjson");
    let mut warm = daemon.client(bins, &["run", "-o", "/dev/null", "--events"]);
    warm.arg(&events)
        .arg("--")
        .arg(&bins.workload)
        .args(["storm", &storm]);
    time(&mut warm)?;
    let _ = std::fs::remove_file(&events);
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_bytes(daemon.child.id())?;
    // The storm, then a pause while the session (and its breakdown) is still open.
    let script = format!(
        "{} storm {storm} && echo done && sleep 3",
        bins.workload.display()
    );
    let mut held = daemon
        .client(
            bins,
            &[
                "run",
                "--tree",
                "-o",
                "/dev/null",
                "--",
                "sh",
                "-c",
                &script,
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the breakdown session")?;
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(held.stdout.take().expect("piped")).read_line(&mut line)?;
        if line.trim() != "done" {
            bail!("the breakdown session's storm failed");
        }
    }
    // The reader thread drains the records every 100 ms.
    std::thread::sleep(Duration::from_millis(1000));
    let during = rss_bytes(daemon.child.id())?;
    held.wait()?;
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_bytes(daemon.child.id())?;
    drop(daemon);
    let delta = during.saturating_sub(before);
    let _ = writeln!(
        notes,
        "- Memory of a breakdown (daemon `VmRSS` delta, not an accounted figure): \
         {BREAKDOWN_PROCESSES} processes (+ the shell) held in one `--tree` session: \
         {:.1} MiB before, {:.1} MiB during ({:.2} MiB, {:.0} bytes per process), \
         {:.1} MiB after the session ended.",
        before as f64 / 1048576.0,
        during as f64 / 1048576.0,
        delta as f64 / 1048576.0,
        delta as f64 / (BREAKDOWN_PROCESSES + 1) as f64,
        after as f64 / 1048576.0,
    );

    let _ = writeln!(
        md,
        "\nThe daemon under load ({} victim runs per side after one warm-up; idle side first, \
         then the polled side):\n",
        runs * 2
    );
    let _ = writeln!(
        md,
        "| case (A → B) | A median (min) | B median (min) | ratio or added | handler share | goal | met? |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    md.push_str(&row.line());
    md.push('\n');
    md.push_str(&notes);
    let _ = writeln!(
        md,
        "\nHandlers during the victim's runs under polling (all {} runs, wall {:.1} ms):\n",
        runs * 2,
        loaded_wall.as_secs_f64() * 1e3
    );
    md.push_str(&cost_table(loaded_wall, &loaded_rows));
    Ok(md)
}
