//! Disk bytes charged to the process that caused them, and the tree's exact peak RSS, against
//! byte counts the workload knows and the kernel's own per-process figures.
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use common::{run_to_end, tracker, workload};
use cylo_usage::ResourceUsage;

const MIB: u64 = 1 << 20;

/// A folder on a block device (a file system that does disk I/O), or None after saying why.
/// `CYLO_USAGE_REQUIRE_DISK=1` (CI on the host) makes its absence a failure.
fn disk_dir(name: &str) -> Option<PathBuf> {
    let base = std::env::var_os("CYLO_USAGE_TEST_DISK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let dir = base.join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dev = std::fs::metadata(&dir).unwrap().dev();
    if libc::major(dev) != 0 {
        return Some(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let why = format!("{} is not on a block device", base.display());
    if std::env::var("CYLO_USAGE_REQUIRE_DISK").as_deref() == Ok("1") {
        panic!("CYLO_USAGE_REQUIRE_DISK=1 but {why}");
    }
    eprintln!("SKIPPED: {why} (set CYLO_USAGE_TEST_DISK_DIR)");
    None
}

fn within(value: u64, low: u64, high: u64, what: &str, u: &ResourceUsage) {
    assert!(
        (low..=high).contains(&value),
        "{what} = {value}, expected {low}..={high}: {u:?}"
    );
}

fn path(dir: &std::path::Path, file: &str) -> String {
    dir.join(file).to_str().unwrap().to_string()
}

#[tokio::test]
async fn direct_writes_and_reads_are_counted_within_a_mib() {
    for (set, t) in common::trackers() {
        eprintln!("{set}:");
        let Some(dir) = disk_dir("direct") else {
            return;
        };
        let file = path(&dir, "data");
        let w = run_to_end(&t, &mut workload(&["write-direct", &file, "64"])).await;
        eprintln!("direct write: {w:?}");
        within(
            w.disk_bytes_written.unwrap(),
            64 * MIB,
            65 * MIB,
            "written",
            &w,
        );
        within(w.disk_bytes_read.unwrap(), 0, MIB, "read", &w);
        let r = run_to_end(&t, &mut workload(&["read-direct", &file, "64"])).await;
        eprintln!("direct read: {r:?}");
        within(r.disk_bytes_read.unwrap(), 64 * MIB, 65 * MIB, "read", &r);
        within(r.disk_bytes_written.unwrap(), 0, MIB, "written", &r);
        // The block layer's in-context view saw the same bytes on one device.
        let dev_read: u64 = r
            .disk_devices
            .as_ref()
            .unwrap()
            .iter()
            .map(|d| d.read_bytes)
            .sum();
        within(dev_read, 64 * MIB, 65 * MIB, "read at the block layer", &r);
        let dev_written: u64 = w
            .disk_devices
            .as_ref()
            .unwrap()
            .iter()
            .map(|d| d.write_bytes)
            .sum();
        within(
            dev_written,
            64 * MIB,
            66 * MIB,
            "written at the block layer",
            &w,
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[tokio::test]
async fn buffered_writes_are_charged_to_the_writer_not_the_flusher() {
    let Some(t) = tracker() else { return };
    let Some(dir) = disk_dir("buffered") else {
        return;
    };
    let file = path(&dir, "data");
    let u = run_to_end(&t, &mut workload(&["write", &file, "32", "fsync"])).await;
    within(
        u.disk_bytes_written.unwrap(),
        32 * MIB,
        33 * MIB,
        "written",
        &u,
    );
    within(
        u.io_write_chars.unwrap(),
        32 * MIB,
        33 * MIB,
        "write syscall bytes",
        &u,
    );
    assert_eq!(u.disk_cancelled_write_bytes, Some(0), "{u:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn dirty_data_truncated_before_writeback_is_cancelled() {
    let Some(t) = tracker() else { return };
    let Some(dir) = disk_dir("cancelled") else {
        return;
    };
    let file = path(&dir, "data");
    let u = run_to_end(&t, &mut workload(&["write", &file, "32", "truncate"])).await;
    within(
        u.disk_bytes_written.unwrap(),
        32 * MIB,
        33 * MIB,
        "dirtied",
        &u,
    );
    within(
        u.disk_cancelled_write_bytes.unwrap(),
        31 * MIB,
        32 * MIB,
        "cancelled",
        &u,
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn tmpfs_writes_and_page_cache_rereads_are_no_disk_io() {
    let Some(t) = tracker() else { return };
    // tmpfs: the write never reaches a disk.
    let shm = format!("/dev/shm/cylo-usage-test-{}", std::process::id());
    let u = run_to_end(&t, &mut workload(&["write", &shm, "16", "fsync"])).await;
    assert_eq!(u.disk_bytes_written, Some(0), "{u:?}");
    within(
        u.io_write_chars.unwrap(),
        16 * MIB,
        17 * MIB,
        "write syscall bytes",
        &u,
    );
    // A re-read from the page cache: 16 MiB through read(), none from the disk.
    workload(&["read", &shm]).status().unwrap();
    let u = run_to_end(&t, &mut workload(&["read", &shm])).await;
    assert_eq!(u.disk_bytes_read, Some(0), "{u:?}");
    within(
        u.io_read_chars.unwrap(),
        16 * MIB,
        17 * MIB,
        "read syscall bytes",
        &u,
    );
    std::fs::remove_file(&shm).unwrap();
    if let Some(dir) = disk_dir("cached") {
        let file = path(&dir, "data");
        workload(&["write", &file, "16", "fsync"]).status().unwrap();
        workload(&["read", &file]).status().unwrap();
        let u = run_to_end(&t, &mut workload(&["read", &file])).await;
        assert_eq!(u.disk_bytes_read, Some(0), "cached: {u:?}");
        within(
            u.io_read_chars.unwrap(),
            16 * MIB,
            17 * MIB,
            "read syscall bytes",
            &u,
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Whether this kernel's verifier takes the atomics the memory counters need; tests assert
/// the counters are null where it does not.
fn memory_measured(t: &cylo_usage::Tracker, u: &ResourceUsage) -> bool {
    let measured = t.measured().atomics;
    assert_eq!(measured, common::kernel_version() >= (5, 12));
    if !measured {
        assert_eq!(u.peak_memory_bytes, None, "{u:?}");
        assert_eq!(u.memory_bytes, None, "{u:?}");
        assert_eq!(u.max_process_rss_bytes, None, "{u:?}");
    }
    measured
}

fn near(value: u64, want: u64, what: &str, u: &ResourceUsage) {
    let diff = (value as f64 - want as f64).abs() / want as f64;
    assert!(
        diff < 0.03,
        "{what} = {value}, want {want} ± 3% ({:.2}%): {u:?}",
        diff * 100.0
    );
}

#[tokio::test]
async fn peak_memory_is_the_sum_at_one_moment_and_max_rss_the_largest_process() {
    for (set, t) in common::trackers() {
        eprintln!("{set}:");
        let base = run_to_end(&t, &mut workload(&["mem", "0", "0", "300"])).await;
        if !memory_measured(&t, &base) {
            return;
        }
        let baseline = base.peak_memory_bytes.unwrap();
        // The root's moment as a copy of the tracker (between fork and exec) is not the command's.
        assert!(base.max_process_rss_bytes.unwrap() <= baseline, "{base:?}");
        let u = run_to_end(&t, &mut workload(&["mem", "256", "128", "300"])).await;
        eprintln!("baseline {baseline}: {u:?}");
        near(
            u.peak_memory_bytes.unwrap(),
            384 * MIB + baseline,
            "peak",
            &u,
        );
        near(
            u.max_process_rss_bytes.unwrap(),
            256 * MIB,
            "largest process",
            &u,
        );
        assert_eq!(
            u.memory_bytes,
            Some(0),
            "nothing is resident once all exited: {u:?}"
        );
    }
}

#[tokio::test]
async fn a_twenty_millisecond_spike_is_caught() {
    let Some(t) = tracker() else { return };
    let u = run_to_end(&t, &mut workload(&["spike", "200", "20", "300"])).await;
    if !memory_measured(&t, &u) {
        return;
    }
    let peak = u.peak_memory_bytes.unwrap();
    assert!(peak >= 200 * MIB, "{u:?}");
    assert!(peak < 220 * MIB, "{u:?}");
}

#[tokio::test]
async fn live_memory_matches_the_processes_vm_rss() {
    let Some(t) = tracker() else { return };
    let mut run = t
        .spawn(&mut workload(&["mem", "96", "64", "1500"]))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Ground truth: VmRSS of the two processes (each its own address space), read just before
    // and just after the snapshot: on a slow guest they may still be touching their pages,
    // and the snapshot's figure must then lie between the two readings.
    let root = run.root_pid();
    let before = vm_rss_of_tree(root);
    let u = run.usage().unwrap();
    let after = vm_rss_of_tree(root);
    if !memory_measured(&t, &u) {
        return;
    }
    let live = u.memory_bytes.unwrap();
    if live < before {
        near(live, before, "live RSS (VmRSS before the snapshot)", &u);
    } else if live > after {
        near(live, after, "live RSS (VmRSS after the snapshot)", &u);
    }
    run.wait_root().await.unwrap();
    run.wait_finished().await.unwrap();
    assert_eq!(run.usage().unwrap().memory_bytes, Some(0));
}

/// The VmRSS (bytes) of process `root` and its children, from their /proc status.
fn vm_rss_of_tree(root: libc::pid_t) -> u64 {
    let children = std::fs::read_to_string(format!("/proc/{root}/task/{root}/children")).unwrap();
    let mut rss = 0;
    for pid in
        std::iter::once(root.to_string()).chain(children.split_whitespace().map(String::from))
    {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        rss += kb * 1024;
    }
    rss
}
