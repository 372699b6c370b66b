//! Budgets enforced from the kernel: each test runs a workload that would go far past its
//! budget, and checks against what the workload itself knows (the pids it wrote, the bytes
//! it moved) and the report's own exact figures that the tree was stopped at the crossing,
//! that nothing of it survives, and that the report names the budget.
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use common::{WORKLOAD, cli, host_only, stderr, tracker, workload};
use cylo_usage::{BudgetExceeded, Budgets, EnforcedBy, Resource, ResourceUsage, RunOptions};

/// Runs `args` under `budgets` to its end, through the library; the report.
async fn run_with(budgets: Budgets, args: &[&str]) -> Option<ResourceUsage> {
    let t = tracker()?;
    let options = RunOptions {
        budgets,
        ..RunOptions::default()
    };
    let mut run = t
        .spawn_with(&mut workload(args), options)
        .expect("spawn with budgets");
    tokio::time::timeout(Duration::from_secs(120), async {
        run.wait_root().await.expect("root");
        run.wait_finished().await.expect("tree");
    })
    .await
    .expect("stopped within 120 s");
    let u = run.usage().expect("usage");
    assert_eq!(u.live_process_count, 0, "nothing survives: {u:?}");
    assert_eq!(u.lost_events, 0, "{u:?}");
    Some(u)
}

/// The report's crossing, checked against the budget: the first value past the limit.
fn crossed(u: &ResourceUsage, resource: Resource, limit: u64) -> BudgetExceeded {
    let e = u.budget_exceeded.expect("a budget was exceeded");
    assert_eq!(e.resource, resource, "{u:?}");
    assert_eq!(e.limit, limit);
    assert_eq!(e.enforced, EnforcedBy::Kernel);
    assert!(e.observed > limit, "{e:?}");
    e
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cylo-usage-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_stops_at_its_processes_budget_and_the_refused_never_run() {
    let dir = scratch("bomb-budget");
    let marks = dir.join("pids");
    let budgets = Budgets {
        max_processes: Some(100),
        ..Budgets::default()
    };
    let Some(u) = run_with(budgets, &["bomb-mark", marks.to_str().unwrap(), "2000"]).await else {
        return;
    };
    let e = crossed(&u, Resource::Processes, 100);
    assert_eq!(e.observed, 101, "the crossing is the 101st process");
    // Ground truth: every process that ran an instruction of its own counted itself first.
    let marks = common::marks(&marks);
    assert!(
        marks.ran <= 100,
        "{} processes ran under a budget of 100",
        marks.ran
    );
    assert!(u.process_count <= 100, "{u:?}");
    assert!(
        marks.ran <= u.process_count,
        "every process that ran is counted: {} ran, {u:?}",
        marks.ran
    );
    assert!(u.processes_refused.unwrap() >= 1, "{u:?}");
    // Nothing survives: no pid that ran is alive with the workload's name (a zombie, dead
    // and waiting for whoever reaps orphans, is not alive).
    for pid in &marks.pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some((_, rest)) = stat.rsplit_once(") ")
        {
            let alive = !rest.starts_with('Z') && !rest.starts_with('X');
            assert!(
                !(alive && stat.contains("(cylo-usage-work")),
                "pid {pid} survived: {stat}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_past_the_threads_budget_are_refused() {
    let budgets = Budgets {
        max_threads: Some(3),
        ..Budgets::default()
    };
    // One process, eight threads of 2 s each: the root's main thread and two more may run.
    let Some(u) = run_with(budgets, &["threads", "8", "2000"]).await else {
        return;
    };
    let e = crossed(&u, Resource::Threads, 3);
    assert_eq!(e.observed, 4);
    assert!(u.thread_count <= 3, "{u:?}");
    assert_eq!(u.process_count, 1);
    assert!(
        u.cpu_time_ns < 1_000_000_000,
        "stopped at once: {}",
        u.cpu_time_ns
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_spinning_threads_stop_at_their_cpu_budget() {
    let limit = 500_000_000;
    let budgets = Budgets {
        max_cpu_ns: Some(limit),
        ..Budgets::default()
    };
    let Some(u) = run_with(budgets, &["threads", "2", "5000"]).await else {
        return;
    };
    let e = crossed(&u, Resource::CpuTime, limit);
    assert_eq!(u.signal, Some(libc::SIGKILL), "the root was killed: {u:?}");
    // Charged at every scheduler tick (4 ms at HZ=250) on each CPU, and the crossing kills
    // the whole process at once: at most a tick per CPU past it, and the kill's own time.
    // Emulated guests tick late: more room there.
    let slack = if std::env::var_os("CYLO_USAGE_VM").is_some() {
        60_000_000
    } else {
        20_000_000
    };
    assert!(
        (limit..=limit + slack).contains(&u.cpu_time_ns),
        "stopped at {} ns of CPU for a budget of {limit} ns (crossing seen at {})",
        u.cpu_time_ns,
        e.observed
    );
    assert!(e.observed <= u.cpu_time_ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toucher_stops_at_its_memory_budget() {
    let Some(t) = tracker() else { return };
    let limit = 64 << 20;
    let budgets = Budgets {
        max_memory_bytes: Some(limit),
        ..Budgets::default()
    };
    if !t.measured().atomics {
        // Memory is not measured without BPF atomic fetch (5.10): the budget is refused,
        // naming the option and what is missing.
        let err = t
            .spawn_with(
                &mut workload(&["mem", "512", "1", "0"]),
                RunOptions {
                    budgets,
                    ..RunOptions::default()
                },
            )
            .err()
            .expect("refused");
        let msg = cylo_usage::error_chain(&err);
        assert!(
            msg.contains("--max-memory") && msg.contains("5.12"),
            "{msg}"
        );
        return;
    }
    // 512 MiB touched by the root (and 1 MiB by a child).
    let Some(u) = run_with(budgets, &["mem", "512", "1", "0"]).await else {
        return;
    };
    let e = crossed(&u, Resource::Memory, limit);
    // The kernel reports RSS in batches (per-CPU counters since 6.2: 64 pages or more) and
    // in whole huge pages under THP: past the budget by at most one of those.
    let peak = u.peak_memory_bytes.unwrap();
    assert!(
        peak <= limit + (4 << 20),
        "peak {peak} for a budget of {limit}: {u:?}"
    );
    assert!(e.observed <= peak);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_stop_within_a_mib_of_their_disk_budget() {
    let base = std::env::var_os("CYLO_USAGE_TEST_DISK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let dir = base.join(format!("budget-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if libc::major(std::fs::metadata(&dir).unwrap().dev()) == 0 {
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            std::env::var("CYLO_USAGE_REQUIRE_DISK").as_deref() != Ok("1"),
            "CYLO_USAGE_REQUIRE_DISK=1 but {} is not on a block device",
            base.display()
        );
        eprintln!("SKIPPED: {} is not on a block device", base.display());
        return;
    }
    let limit = 8 << 20;
    let budgets = Budgets {
        max_disk_write_bytes: Some(limit),
        ..Budgets::default()
    };
    let file = dir.join("direct");
    // 64 MiB of O_DIRECT writes of 256 KiB each.
    let Some(u) = run_with(
        budgets,
        &["write-direct", file.to_str().unwrap(), "64", "262144"],
    )
    .await
    else {
        return;
    };
    crossed(&u, Resource::DiskWrite, limit);
    let written = u.disk_bytes_written.unwrap();
    let on_disk = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    assert!(
        written <= limit + (1 << 20),
        "wrote {written} for a budget of {limit}"
    );
    assert!(
        on_disk <= limit + (1 << 20),
        "the file has {on_disk} bytes for a budget of {limit}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_transfer_stops_at_its_network_budget() {
    let Some(t) = tracker() else { return };
    if t.measured().network.is_none() {
        eprintln!("SKIPPED: network bytes are not measured on this kernel");
        return;
    }
    let limit = 1 << 20;
    let budgets = Budgets {
        max_network_bytes: Some(limit),
        ..Budgets::default()
    };
    // 64 MiB over TCP on loopback, 64 KiB per write: both ends in the tree.
    let Some(u) = run_with(budgets, &["net", "tcp", "67108864", "0", "v4", "65536"]).await else {
        return;
    };
    crossed(&u, Resource::Network, limit);
    let moved = u.network_bytes_sent.unwrap() + u.network_bytes_received.unwrap();
    // Each end's call in progress completes: at most a write and a read past the crossing,
    // plus what the socket buffers held.
    assert!(
        moved <= limit + (1 << 20),
        "moved {moved} for a budget of {limit}"
    );
}

#[test]
fn the_command_line_exits_120_and_says_which_budget_in_json_and_events() {
    if tracker().is_none() || !host_only("budgets' exit status and outputs") {
        return;
    }
    let dir = scratch("budget-cli");
    let (report, events) = (dir.join("report.json"), dir.join("events.ndjson"));
    let o = cli(&[
        "run",
        "--json",
        "-o",
        report.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
        "--max-cpu",
        "200ms",
        "--",
        WORKLOAD,
        "burn",
        "5000",
    ]);
    assert_eq!(o.status.code(), Some(120), "{}", stderr(&o));
    let u: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(u["budget_exceeded"]["resource"], "cpu_time");
    assert_eq!(u["budget_exceeded"]["limit"], 200_000_000u64);
    assert_eq!(u["budgets"]["max_cpu_ns"], 200_000_000u64);
    let lines = std::fs::read_to_string(&events).unwrap();
    let budget = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["event"] == "budget")
        .expect("a budget event");
    assert_eq!(budget["resource"], "cpu_time");
    assert!(budget["observed"].as_u64().unwrap() > 200_000_000);
    // The human report names it too.
    let o = cli(&["run", "--max-processes", "3", "--", WORKLOAD, "fork", "20"]);
    assert_eq!(o.status.code(), Some(120), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("processes budget exceeded"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn budgets_that_cannot_be_met_or_read_are_refused_with_125() {
    if !host_only("budget options' validation") {
        return;
    }
    for args in [
        &["--max-processes", "0"][..],
        &["--max-threads", "0"],
        &["--max-memory", "64X"],
        &["--max-cpu", "1d"],
        &["--budgets", "sometimes"],
    ] {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "/bin/true"]);
        let o = cli(&all);
        assert_eq!(
            o.status.code(),
            Some(125),
            "{args:?}: {:?} {}",
            o.status,
            stderr(&o)
        );
        let msg = stderr(&o);
        assert!(!msg.contains("panicked"), "{msg}");
        assert!(msg.lines().count() <= 4, "a short message: {msg}");
    }
}

#[test]
fn features_name_how_each_budget_is_enforced() {
    let Some(t) = tracker() else { return };
    let list = t.budget_features();
    for f in &list {
        eprintln!("{}: {} ({})", f.counter, f.how, f.measured);
    }
    assert_eq!(list.len(), 7, "one line per budget: {list:?}");
    let enforced = |name: &str| {
        list.iter()
            .find(|f| f.counter == name)
            .unwrap_or_else(|| panic!("{name} listed"))
            .measured
    };
    // Every kernel of the matrix has a hook for refusals and for CPU time.
    for name in [
        "budgets.max_processes",
        "budgets.max_threads",
        "budgets.max_cpu_ns",
    ] {
        assert!(enforced(name), "{name}: {list:?}");
    }
    // Every kernel of the matrices kills a refused process before its first instruction: a
    // trampoline, a kprobe, or (x86-64 alone) `sys_exit`; arm64 never falls back to it.
    let processes = list
        .iter()
        .find(|f| f.counter == "budgets.max_processes")
        .unwrap();
    assert!(
        !processes.how.contains("first system call"),
        "{}",
        processes.how
    );
    if cfg!(target_arch = "aarch64") {
        assert!(
            processes.how.contains("fexit") || processes.how.contains("kprobe"),
            "{}",
            processes.how
        );
    }
    assert_eq!(
        enforced("budgets.max_memory_bytes"),
        t.measured().atomics,
        "memory budgets where memory is measured"
    );
    assert_eq!(
        enforced("budgets.max_network_bytes"),
        t.measured().network.is_some()
    );
}
