//! aya-log: with logging on, the eBPF programs report what they lose from the kernel side
//! (which map, which thread and comm), and they still load the same variants as without
//! (where the verifier refuses them with their log statements, they load without).
mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cylo_usage::{Capacities, Tracker};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        LINES
            .lock()
            .unwrap()
            .push(format!("{} {}", record.target(), record.args()));
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

/// This binary's one test: the logger and its level are process-wide.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_map_is_logged_from_the_kernel_side() {
    log::set_logger(&CAPTURE).expect("the only logger of this test binary");
    // Off: the programs are loaded without their log statements.
    log::set_max_level(log::LevelFilter::Off);
    let Some(quiet) = common::tracker() else {
        return;
    };
    log::set_max_level(log::LevelFilter::Debug);
    // Room for 4 threads on the whole host: a fork bomb of 30 processes overflows TASKS.
    let tracker = Tracker::load_with_options(Capacities {
        max_tasks: 4,
        ..Capacities::default()
    })
    .expect("load with logging on");
    assert_eq!(
        tracker.measured(),
        quiet.measured(),
        "logging changed which programs load"
    );
    // A run share larger than the map: TASKS itself fills (a smaller share would kill the
    // bomb at birth first, leaving room in the map).
    let options = cylo_usage::RunOptions {
        max_tasks: 1_000,
        ..Default::default()
    };
    let mut run = tracker
        .spawn_with(&mut common::workload(&["bomb", "30"]), options)
        .expect("spawn");
    tokio::time::timeout(Duration::from_secs(60), async {
        run.wait_root().await.expect("wait for the root");
        run.wait_finished().await.expect("wait for the tree");
    })
    .await
    .expect("the storm finished");
    let usage = run.usage().expect("usage");
    assert!(usage.lost_events > 0, "{usage:?}");
    if LINES
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("log statements are left out"))
    {
        eprintln!("this kernel's verifier refuses the log statements: no kernel-side record");
        return;
    }
    let start = Instant::now();
    loop {
        let lines = LINES.lock().unwrap().clone();
        if let Some(line) = lines.iter().find(|l| l.contains("TASKS is full")) {
            assert!(line.starts_with("cylo_usage_ebpf "), "{line}");
            assert!(line.contains("cylo-usage-work"), "the comm: {line}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no TASKS record among {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
