//! Budgets on the /proc fallback (no eBPF): refused with `Enforcement::Exact` (only the kernel
//! enforces at the crossing) and for the network (the fallback has no network counters);
//! enforced from the samples with `Enforcement::BestEffort`. These tests use the fallback
//! directly, so they need neither eBPF nor privileges.
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cylo_usage::{
    Budgets, DEFAULT_INTERVAL, EnforcedBy, Enforcement, FallbackError, ProcRun, ProcTracker,
    Resource, ResourceUsage, RunOptions,
};

const WORKLOAD: &str = env!("CYLO_USAGE_WORKLOAD");
const MS: u64 = 1_000_000;

fn workload(args: &[&str]) -> Command {
    assert!(
        std::path::Path::new(WORKLOAD).is_file(),
        "no test workload at {WORKLOAD}: build it first (cargo build -p cylo-usage-workload)"
    );
    let mut c = Command::new(WORKLOAD);
    c.args(args);
    c
}

fn tracker() -> ProcTracker {
    ProcTracker::new("test", DEFAULT_INTERVAL)
}

fn options(budgets: Budgets, enforcement: Enforcement) -> RunOptions {
    RunOptions {
        budgets,
        budget_enforcement: enforcement,
        ..RunOptions::default()
    }
}

/// A file the command would create first thing, were it started.
fn marker(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "cylo-usage-fallback-budgets-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&p);
    p
}

fn touching(marker: &std::path::Path) -> Command {
    let mut c = Command::new("/bin/sh");
    c.args(["-c", &format!("touch {}; sleep 5", marker.display())]);
    c
}

/// Waits (at most 60 s) until the whole tree has ended; its report.
async fn to_the_end(run: &ProcRun) -> ResourceUsage {
    tokio::time::timeout(Duration::from_secs(60), async {
        run.wait_root().await;
        run.wait_finished().await;
    })
    .await
    .expect("the tree ended within 60 s");
    run.usage().expect("usage")
}

fn unenforceable(e: FallbackError) -> (Vec<Resource>, Enforcement, String) {
    let text = e.to_string();
    match e {
        FallbackError::Unenforceable {
            resources,
            enforcement,
            ..
        } => (resources, enforcement, text),
        other => panic!("not Unenforceable: {other:?}"),
    }
}

#[test]
fn exact_enforcement_is_refused_before_anything_starts() {
    let budgets = Budgets {
        max_processes: Some(100),
        max_cpu_ns: Some(500 * MS),
        ..Budgets::default()
    };
    let m = marker("exact");
    let e = tracker()
        .spawn_with(&mut touching(&m), options(budgets, Enforcement::Exact))
        .err()
        .expect("refused");
    let (resources, enforcement, text) = unenforceable(e);
    assert_eq!(resources, [Resource::Processes, Resource::CpuTime]);
    assert_eq!(enforcement, Enforcement::Exact);
    assert!(
        text.starts_with("--max-processes, --max-cpu cannot be enforced: ")
            && text.contains("eBPF tracker is not loaded (test)")
            && text.contains("use --budgets best-effort"),
        "{text}"
    );
    assert!(!text.contains('\n'), "one line: {text}");
    // The Exact default is refused too (RunOptions::default() asks for exact).
    let e = tracker()
        .spawn_with(
            &mut touching(&m),
            RunOptions {
                budgets,
                ..RunOptions::default()
            },
        )
        .err()
        .expect("refused");
    assert!(matches!(e, FallbackError::Unenforceable { .. }), "{e:?}");
    // Nothing ran.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!m.exists(), "the command ran: {}", m.display());

    // An attach is refused before it follows anything.
    let mut target = Command::new("sleep").arg("30").spawn().unwrap();
    let e = tracker()
        .attach_with(
            target.id() as libc::pid_t,
            options(budgets, Enforcement::Exact),
        )
        .err()
        .expect("refused");
    let (resources, _, _) = unenforceable(e);
    assert_eq!(resources, [Resource::Processes, Resource::CpuTime]);
    target.kill().unwrap();
    target.wait().unwrap();

    // A budget that can never be met is refused whatever the enforcement.
    let zero = Budgets {
        max_processes: Some(0),
        ..Budgets::default()
    };
    let e = tracker()
        .spawn_with(&mut touching(&m), options(zero, Enforcement::BestEffort))
        .err()
        .expect("refused");
    assert!(matches!(e, FallbackError::InvalidBudget { .. }), "{e:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(!m.exists(), "the command ran: {}", m.display());
}

#[test]
fn a_network_budget_is_refused_even_best_effort() {
    let m = marker("network");
    let budgets = Budgets {
        max_processes: Some(100),
        max_network_bytes: Some(1 << 20),
        ..Budgets::default()
    };
    let e = tracker()
        .spawn_with(&mut touching(&m), options(budgets, Enforcement::BestEffort))
        .err()
        .expect("refused");
    let (resources, enforcement, text) = unenforceable(e);
    assert_eq!(resources, [Resource::Network]);
    assert_eq!(enforcement, Enforcement::BestEffort);
    assert!(
        text.starts_with("--max-network cannot be enforced: ")
            && text.contains("no network counters"),
        "{text}"
    );
    // Exact: everything is refused, and the message says that best-effort would not take
    // the network budget either.
    let e = tracker()
        .spawn_with(&mut touching(&m), options(budgets, Enforcement::Exact))
        .err()
        .expect("refused");
    let (resources, _, text) = unenforceable(e);
    assert_eq!(resources, [Resource::Processes, Resource::Network]);
    assert!(
        text.contains("best-effort") && text.contains("no network counters"),
        "{text}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(!m.exists(), "the command ran: {}", m.display());
}

#[tokio::test]
async fn best_effort_stops_a_fork_bomb_from_the_samples() {
    let budgets = Budgets {
        max_processes: Some(20),
        ..Budgets::default()
    };
    // 400 children that hold until their stdin (a pipe the run's child keeps open) closes:
    // however late a sample comes, the tree is still there to be seen and killed, and it
    // ends only through the budget's kill.
    let mut bomb = workload(&["hold", "400"]);
    bomb.stdin(std::process::Stdio::piped());
    let run = tracker()
        .spawn_with(&mut bomb, options(budgets, Enforcement::BestEffort))
        .expect("best effort is taken");
    let u = to_the_end(&run).await;
    eprintln!(
        "bomb: {:?}, {} processes seen, signals {:?}",
        u.budget_exceeded, u.process_count, u.signals_sent
    );
    let e = u.budget_exceeded.expect("a budget was crossed");
    assert_eq!(e.resource, Resource::Processes, "{u:?}");
    assert_eq!(e.enforced, EnforcedBy::Sampled);
    assert_eq!(e.limit, 20);
    assert!(
        e.observed > 20 && e.observed <= u.process_count,
        "{e:?} {u:?}"
    );
    assert!(u.process_count <= 401, "{u:?}");
    assert_eq!(run.budget_exceeded(), Some(e));
    assert_eq!(u.budgets, Some(budgets));
    assert_eq!((u.live_process_count, u.signal), (0, Some(libc::SIGKILL)));
    assert!(
        u.signals_sent
            .iter()
            .any(|s| s.signal == libc::SIGKILL && s.signalled > 0),
        "{:?}",
        u.signals_sent
    );
    // What the fallback does not measure stays unknown.
    assert_eq!(u.processes_refused, None);
    assert!(
        u.precision_notes
            .iter()
            .any(|n| n.starts_with("budgets, budget_exceeded: ") && n.contains("sample")),
        "{:?}",
        u.precision_notes
    );
}

#[tokio::test]
async fn best_effort_stops_a_cpu_burner_soon_after_its_budget() {
    let budget = 300 * MS;
    let budgets = Budgets {
        max_cpu_ns: Some(budget),
        ..Budgets::default()
    };
    let started = Instant::now();
    // Two threads that would burn 5 s each.
    let run = tracker()
        .spawn_with(
            &mut workload(&["threads", "2", "5000"]),
            options(budgets, Enforcement::BestEffort),
        )
        .expect("best effort is taken");
    let u = to_the_end(&run).await;
    let wall = started.elapsed();
    let e = u.budget_exceeded.expect("a budget was crossed");
    eprintln!(
        "cpu: limit {} ms, observed {:.1} ms at the crossing, {:.1} ms in the end (wait4), \
         {wall:?} wall",
        budget / MS,
        e.observed as f64 / 1e6,
        u.cpu_time_ns as f64 / 1e6
    );
    assert_eq!(
        (e.resource, e.enforced, e.limit),
        (Resource::CpuTime, EnforcedBy::Sampled, budget)
    );
    // Sampled: seen up to an interval (and a /proc read) late, at two CPUs' pace.
    let bound = budget + 300 * MS;
    assert!(e.observed > budget && e.observed < bound, "{e:?}");
    assert!(
        u.cpu_time_ns > budget && u.cpu_time_ns < bound,
        "{} ns of CPU: {u:?}",
        u.cpu_time_ns
    );
    assert!(wall < Duration::from_secs(4), "stopped early: {wall:?}");
    assert_eq!((u.live_process_count, u.signal), (0, Some(libc::SIGKILL)));
    assert_eq!(u.budgets, Some(budgets));
}

#[tokio::test]
async fn best_effort_budgets_not_reached_change_nothing() {
    let budgets = Budgets {
        max_processes: Some(50),
        max_threads: Some(50),
        max_cpu_ns: Some(10_000 * MS),
        max_memory_bytes: Some(1 << 30),
        max_disk_write_bytes: Some(1 << 30),
        max_disk_read_bytes: Some(1 << 30),
        ..Budgets::default()
    };
    let run = tracker()
        .spawn_with(
            &mut workload(&["fork", "5"]),
            options(budgets, Enforcement::BestEffort),
        )
        .expect("best effort is taken");
    let u = to_the_end(&run).await;
    assert_eq!(u.budget_exceeded, None, "{u:?}");
    assert_eq!(u.budgets, Some(budgets));
    assert_eq!((u.exit_code, u.signal), (Some(0), None));
    assert!(u.signals_sent.is_empty(), "{:?}", u.signals_sent);
    assert!(u.process_count <= 6, "{u:?}");
}

#[tokio::test]
async fn best_effort_stops_a_tree_past_its_memory() {
    // 64 MiB in the root and 64 MiB in a child, held together for 5 s.
    let limit: u64 = 96 << 20;
    let budgets = Budgets {
        max_memory_bytes: Some(limit),
        ..Budgets::default()
    };
    let started = Instant::now();
    let run = tracker()
        .spawn_with(
            &mut workload(&["mem", "64", "64", "5000"]),
            options(budgets, Enforcement::BestEffort),
        )
        .expect("best effort is taken");
    let u = to_the_end(&run).await;
    let e = u.budget_exceeded.expect("a budget was crossed");
    eprintln!("memory: {e:?}, peak {:?}", u.peak_memory_bytes);
    assert_eq!(
        (e.resource, e.enforced, e.limit),
        (Resource::Memory, EnforcedBy::Sampled, limit)
    );
    // Both processes' RSS, never more than the peak the samples saw.
    assert!(e.observed > limit, "{e:?}");
    assert!(
        u.peak_memory_bytes.is_some_and(|p| p >= e.observed),
        "{u:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!((u.live_process_count, u.signal), (0, Some(libc::SIGKILL)));
}

#[tokio::test]
async fn best_effort_stops_an_attached_tree_past_its_cpu_since_the_attach() {
    // A process of this test's own that would burn 5 s, attached to after 100 ms of it.
    let mut target = workload(&["burn", "5000"]).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let budget = 200 * MS;
    let budgets = Budgets {
        max_cpu_ns: Some(budget),
        ..Budgets::default()
    };
    let run = tracker()
        .attach_with(
            target.id() as libc::pid_t,
            options(budgets, Enforcement::BestEffort),
        )
        .expect("best effort is taken");
    // The target is this process's child: its status comes from here.
    let status = tokio::task::spawn_blocking(move || target.wait().unwrap())
        .await
        .unwrap();
    let u = to_the_end(&run).await;
    let e = u.budget_exceeded.expect("a budget was crossed");
    eprintln!(
        "attached cpu: {e:?}, {:.1} ms since the attach, {:?} before",
        u.cpu_time_ns as f64 / 1e6,
        u.usage_before_attach.as_ref().map(|b| b.cpu_time_ns)
    );
    assert_eq!(
        (e.resource, e.enforced),
        (Resource::CpuTime, EnforcedBy::Sampled)
    );
    // Since the attach (what was used before does not count), within a sample or so.
    assert!(
        e.observed > budget && e.observed < budget + 300 * MS,
        "{e:?}"
    );
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert_eq!(u.live_process_count, 0);
}
