//! A fork bomb under `--tree --events`: the tracker keeps working, its memory stays bounded,
//! and the counts are exact or `lost_events` says how many records are missing. In a test
//! binary of its own: nothing else should compete for pids meanwhile.
mod common;

use std::process::{Command, Stdio};

use common::{CLI, WORKLOAD, tracker};

/// Processes in the bomb: 30,000, within this machine's default pid_max (32768) minus what
/// else runs; as many alive at once as the pid limit allows. Fewer where pid_max or memory
/// is smaller (the kernel-matrix guests have 2 GiB and emulated CPUs: 3,000 there).
fn bomb_size() -> u64 {
    if std::env::var_os("CYLO_USAGE_VM").is_some() {
        return 3_000;
    }
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32_768);
    let available_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    // About 160 KiB of kernel and user memory per live process, to be safe.
    30_000
        .min(pid_max.saturating_sub(2_000))
        .min(available_kib / 160)
}

#[test]
fn a_fork_bomb_under_tree_and_events_is_counted_exactly_or_says_what_it_lost() {
    if tracker().is_none() {
        return;
    }
    let bomb = bomb_size();
    let dir = std::env::temp_dir().join(format!("cylo-usage-bomb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let events = dir.join("events.ndjson");
    #[allow(clippy::zombie_processes)] // reaped below with wait4, for its rusage
    let child = Command::new(CLI)
        // Maps for a host's worth of tasks: the default capacity for one tree (16,384) would
        // stop the bomb as a budget once 15,360 of it are alive (tests/tree.rs checks that).
        .args(["run", "--json", "--tree", "--capacity", "65536", "--events"])
        .arg(&events)
        .args(["--", WORKLOAD, "bomb", &bomb.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stderr = child.stderr.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });
    // wait4 for the tracker's own peak RSS.
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 on our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid);
    let text = reader.join().unwrap();
    assert!(libc::WIFEXITED(status), "{text}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "{text}");
    let u: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let count = u["process_count"].as_u64().unwrap();
    let lost = u["lost_events"].as_u64().unwrap();
    let kept = u["processes"].as_array().unwrap().len() as u64;
    let text = std::fs::read_to_string(&events).unwrap();
    let forks = text
        .lines()
        .filter(|l| l.contains("\"event\":\"fork\""))
        .count() as u64;
    let exits = text
        .lines()
        .filter(|l| l.contains("\"event\":\"exit\""))
        .count() as u64;
    if lost == 0 {
        assert_eq!(count, bomb, "{}", u["precision"]);
        assert_eq!(u["precision"], "exact");
        assert_eq!((kept, forks, exits), (bomb, bomb, bomb));
    } else {
        // Every missing record is accounted for.
        assert_eq!(u["precision"], "approximate");
        assert!(count + lost >= bomb, "{count} + {lost}");
        assert!(
            kept + lost >= bomb && forks + lost >= bomb,
            "{kept} {forks} {lost}"
        );
    }
    assert_eq!(u["live_process_count"], 0);
    // Bounded: the tracker's baseline, its ring buffers, and a few hundred bytes per process
    // of the breakdown (README: about 450 B each).
    let max_rss_kib = ru.ru_maxrss as u64;
    assert!(
        max_rss_kib < 256 * 1024,
        "tracker peak RSS {max_rss_kib} KiB"
    );
    eprintln!("bomb: {count} processes, {lost} lost, tracker peak RSS {max_rss_kib} KiB");
    let _ = std::fs::remove_dir_all(&dir);
}
