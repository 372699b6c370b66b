//! How many guests boot at once (`--jobs`), and the queue that boots them. A guest takes about
//! one host CPU (TCG on one host thread) and up to its `--memory` of host memory, plus qemu's
//! own; by default as many boot at once as the host has CPUs and memory for.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Result, bail};

/// Host memory (MiB) kept free beyond the guests': the xtask, the page cache, the rest.
const HOST_ROOM_MIB: u64 = 1024;

/// Host memory (MiB) a qemu process takes beyond its guest's RAM (TCG's translated code, the
/// emulator itself).
const QEMU_MIB: u64 = 256;

/// What the default number of guests at once depends on.
pub(super) struct Host {
    /// CPUs this process may run on ([`std::thread::available_parallelism`]).
    pub(super) cpus: usize,
    /// `MemAvailable` of `/proc/meminfo`, when there is one.
    pub(super) available_mib: Option<u64>,
}

impl Host {
    pub(super) fn read() -> Self {
        Host {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            available_mib: crate::meminfo::kib(&crate::meminfo::read(), "MemAvailable")
                .map(|kib| kib / 1024),
        }
    }

    /// Guests at once: `requested` (`--jobs`), else one per CPU as far as the host's available
    /// memory holds `guest_mib` plus [`QEMU_MIB`] for each with [`HOST_ROOM_MIB`] to spare;
    /// never more than `kernels`, and at least 1.
    pub(super) fn jobs(&self, requested: Option<usize>, guest_mib: u64, kernels: usize) -> usize {
        let n = requested.unwrap_or_else(|| {
            let by_memory = self.available_mib.map_or(usize::MAX, |available| {
                let each = guest_mib.saturating_add(QEMU_MIB);
                usize::try_from(available.saturating_sub(HOST_ROOM_MIB) / each)
                    .unwrap_or(usize::MAX)
            });
            self.cpus.min(by_memory)
        });
        n.min(kernels).max(1)
    }
}

/// A qemu `-m` size in MiB, rounded up: a number, maybe with a fraction, and an optional
/// suffix `K`, `M`, `G` or `T` (either case); a plain number is MiB, as for qemu. A leading
/// `size=` and options after a comma (`4G,slots=2,maxmem=8G`) are allowed, as qemu allows them.
pub(super) fn memory_mib(s: &str) -> Result<u64> {
    let size = s.split(',').next().unwrap_or_default();
    let size = size.strip_prefix("size=").unwrap_or(size).trim();
    let digits = size
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(size.len());
    let (number, suffix) = size.split_at(digits);
    let scale = match suffix.to_ascii_uppercase().as_str() {
        "" | "M" => 1.0,
        "K" => 1.0 / 1024.0,
        "G" => 1024.0,
        "T" => 1024.0 * 1024.0,
        _ => bail!("memory size `{s}`: expected a number of MiB, or one with K, M, G or T"),
    };
    match number.parse::<f64>() {
        Ok(n) if n > 0.0 => Ok((n * scale).ceil() as u64),
        _ => bail!("memory size `{s}`: expected a positive number, as in 2048, 512M or 2G"),
    }
}

/// Runs `work` on every item, `lanes` at a time: each of `lanes` threads takes the next item
/// nobody has taken yet, in the items' order, until none is left. The results come back in
/// the items' order, whatever order they finished in. After an error no lane takes a new
/// item, and the first error in the items' order is returned.
pub(super) fn in_lanes<T: Sync, R: Send>(
    items: &[T],
    lanes: usize,
    work: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let lane = || {
        let mut done = Vec::new();
        while !failed.load(Ordering::SeqCst) {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some(item) = items.get(i) else { break };
            let result = work(item);
            if result.is_err() {
                failed.store(true, Ordering::SeqCst);
            }
            done.push((i, result));
        }
        done
    };
    let mut done: Vec<(usize, Result<R>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..lanes.clamp(1, items.len().max(1)))
            .map(|_| s.spawn(lane))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    // Items are taken in order, so the ones never taken (after an error) all come after
    // every taken one, the failed one included.
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// The first label that occurs twice: two guests of one label would share their folder.
pub(super) fn repeated<'a>(labels: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = std::collections::HashSet::new();
    labels.into_iter().find(|l| !seen.insert(*l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::mpsc;
    use std::time::Duration;

    const GIB: u64 = 1024;

    fn host(cpus: usize, available_mib: Option<u64>) -> Host {
        Host {
            cpus,
            available_mib,
        }
    }

    #[test]
    fn parses_qemu_memory_sizes() {
        for (s, mib) in [
            ("2G", 2048),
            ("2g", 2048),
            ("2048", 2048),
            ("512M", 512),
            ("1.5G", 1536),
            ("1048576K", 1024),
            ("1T", 1024 * 1024),
            ("size=4G", 4096),
            ("4G,slots=2,maxmem=8G", 4096),
            ("100k", 1),
        ] {
            assert_eq!(memory_mib(s).unwrap(), mib, "{s}");
        }
        for s in ["", "G", "2X", "2GB", "-1G", "0", "two", "1.2.3G"] {
            let err = format!("{:#}", memory_mib(s).unwrap_err());
            assert!(err.contains(&format!("`{s}`")), "{s}: {err}");
        }
    }

    #[test]
    fn jobs_follow_cpus_memory_and_kernels() {
        // One guest per CPU when memory is plentiful, never more than the kernels.
        assert_eq!(host(2, Some(23 * GIB)).jobs(None, 2 * GIB, 3), 2);
        assert_eq!(host(16, Some(64 * GIB)).jobs(None, 2 * GIB, 3), 3);
        assert_eq!(host(16, Some(64 * GIB)).jobs(None, 2 * GIB, 1), 1);
        // Memory caps it: 8 GiB less the host's room holds three 2 GiB guests with qemu's.
        assert_eq!(host(8, Some(8 * GIB)).jobs(None, 2 * GIB, 8), 3);
        assert_eq!(host(8, Some(8 * GIB)).jobs(None, 4 * GIB, 8), 1);
        // Not even one fits: still one, as before there were lanes.
        assert_eq!(host(8, Some(GIB)).jobs(None, 2 * GIB, 3), 1);
        // No MemAvailable: CPUs alone.
        assert_eq!(host(4, None).jobs(None, 2 * GIB, 3), 3);
        // `--jobs` wins over CPUs and memory, not over the kernel count.
        assert_eq!(host(1, Some(GIB)).jobs(Some(2), 2 * GIB, 3), 2);
        assert_eq!(host(1, Some(GIB)).jobs(Some(5), 2 * GIB, 3), 3);
    }

    #[test]
    fn lanes_run_at_once_and_results_keep_the_items_order() {
        // Item 0 waits until item 1 has started and item 1 until item 2 is done: items 0 and 1
        // run at once, item 2 goes to the lane of item 0, and the results still come back as
        // 0, 1, 2 while 1 finishes last.
        let wait = |rx: &Mutex<mpsc::Receiver<()>>, what: &str| {
            let got = rx.lock().unwrap().recv_timeout(Duration::from_secs(30));
            assert!(got.is_ok(), "{what}");
        };
        let (started_1, wait_1) = mpsc::channel();
        let (done_2, wait_2) = mpsc::channel();
        let (wait_1, wait_2) = (Mutex::new(wait_1), Mutex::new(wait_2));
        let threads = Mutex::new(vec![None; 3]);
        let out = in_lanes(&[0, 1, 2], 2, |&i| {
            threads.lock().unwrap()[i] = Some(std::thread::current().id());
            match i {
                0 => wait(&wait_1, "item 1 never ran beside item 0"),
                1 => {
                    started_1.send(()).unwrap();
                    wait(&wait_2, "item 2 never ran beside item 1");
                }
                _ => done_2.send(()).unwrap(),
            }
            Ok(i * 10)
        })
        .unwrap();
        assert_eq!(out, [0, 10, 20]);
        let threads = threads.into_inner().unwrap();
        assert_eq!(threads[0], threads[2]);
        assert_ne!(threads[0], threads[1]);
    }

    #[test]
    fn one_lane_runs_the_items_in_order_and_stops_at_an_error() {
        let ran = Mutex::new(Vec::new());
        let err = in_lanes(&[0, 1, 2], 1, |&i| {
            ran.lock().unwrap().push(i);
            if i == 1 {
                bail!("item {i} failed");
            }
            Ok(i)
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "item 1 failed");
        assert_eq!(*ran.lock().unwrap(), [0, 1]);
        assert_eq!(in_lanes(&[5, 6], 1, |&i| Ok(i)).unwrap(), [5, 6]);
        assert!(in_lanes(&[] as &[u8], 2, |&i| Ok(i)).unwrap().is_empty());
    }

    #[test]
    fn the_first_error_in_order_is_returned() {
        let err = in_lanes(&[0, 1, 2], 3, |&i| match i {
            0 => Ok(i),
            _ => bail!("item {i} failed"),
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "item 1 failed");
    }

    #[test]
    fn finds_a_repeated_label() {
        assert_eq!(repeated(["5.10", "6.1", "6.12"]), None);
        assert_eq!(repeated(["5.10", "6.1", "5.10", "6.1"]), Some("5.10"));
    }
}
