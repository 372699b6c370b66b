//! The user/system split of a thread group's CPU time, as the kernel makes it for
//! `getrusage`, `wait4` and `/proc/PID/stat`: its `cputime_adjust()`.

/// The user/system split the kernel reports for a thread group (`getrusage`, `wait4`,
/// `/proc/PID/stat`): `cputime_adjust()` of kernel/sched/cputime.c (5.9 and later; x86-64's
/// `mul_u64_u64_div_u64` is exact, as the 128-bit arithmetic here), for a group with no
/// earlier adjusted reading: the precise runtime (`sum_exec_runtime` of all its threads)
/// is divided in the proportion of the tick-sampled `utime` and `stime` (all its threads' too).
/// Returns (user, system), which add up to `runtime`.
///
/// This is the one method cylo-usage uses: each process's split is made from its own
/// group's figures, and a tree's user and system times are the sums of its processes'
/// (what `wait4()` adds up into the parent's `cutime`/`cstime`, so what `time(1)` reports).
pub fn split_runtime(runtime: u64, utime: u64, stime: u64) -> (u64, u64) {
    cputime_adjust(runtime, utime, stime, &mut PrevCputime::default())
}

/// The split a group was last reported with: the kernel's `struct prev_cputime`, which keeps
/// each part from going backwards between readings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrevCputime {
    pub utime: u64,
    pub stime: u64,
}

/// `cputime_adjust()` exactly as the kernel does it (5.9 and later), `prev` included:
/// returns (user, system) for a group whose runtime is `rtime` and whose tick samples are
/// `utime` and `stime` (ns), and updates `prev`.
pub fn cputime_adjust(rtime: u64, utime: u64, stime: u64, prev: &mut PrevCputime) -> (u64, u64) {
    // The runtime has not grown past what was reported: report the same.
    if prev.stime.saturating_add(prev.utime) >= rtime {
        return (prev.utime, prev.stime);
    }
    // The arithmetic the eBPF programs split ended processes with, shared.
    let mut stime = cylo_usage_abi::cputime::split_system(rtime, utime, stime);
    // Neither part goes backwards (monotonicity clamp).
    if stime < prev.stime {
        stime = prev.stime;
    }
    let mut utime = rtime - stime.min(rtime);
    if utime < prev.utime {
        utime = prev.utime;
        stime = rtime - utime;
    }
    *prev = PrevCputime { utime, stime };
    (utime, stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_follows_cputime_adjust() {
        assert_eq!(split_runtime(1000, 0, 0), (1000, 0));
        assert_eq!(split_runtime(1000, 5, 0), (1000, 0));
        assert_eq!(split_runtime(1000, 0, 5), (0, 1000));
        assert_eq!(split_runtime(1000, 3, 1), (750, 250));
        assert_eq!(split_runtime(0, 3, 1), (0, 0));
        // No overflow with large values; the parts always add up.
        let (u, s) = split_runtime(u64::MAX / 2, u64::MAX / 3, u64::MAX / 3);
        assert_eq!(u + s, u64::MAX / 2);
    }

    /// Fixtures worked out by hand from kernel/sched/cputime.c `cputime_adjust()` (6.x, x86-64:
    /// `mul_u64_u64_div_u64` truncates the exact 128-bit quotient).
    #[test]
    fn cputime_adjust_matches_the_kernel_with_its_clamp() {
        // (rtime, utime, stime, prev before, (user, system))
        type Fixture = (u64, u64, u64, (u64, u64), (u64, u64));
        let fixtures: [Fixture; 8] = [
            // A fresh group: the runtime in the ticks' proportion, system truncated.
            (
                1_000_000_007,
                20_000_000,
                10_000_000,
                (0, 0),
                (666_666_672, 333_333_335),
            ),
            // stime 0: all user; utime 0: all system.
            (5_000, 4_000_000, 0, (0, 0), (5_000, 0)),
            (5_000, 0, 4_000_000, (0, 0), (0, 5_000)),
            // The runtime did not grow past the last report: the same report.
            (900, 1, 1, (500, 400), (500, 400)),
            (900, 1, 1, (600, 400), (600, 400)),
            // A new proportion would lower system below what was reported: system is held,
            // user takes the rest.
            (2_000, 99, 1, (500, 500), (1_500, 500)),
            // ... or lower user: user is held, system takes the rest.
            (2_000, 1, 99, (1_500, 100), (1_500, 500)),
            // 128-bit intermediate: 10^12 * 10^12 overflows u64, the quotient does not.
            (
                1_000_000_000_000,
                3_000_000_000_000,
                1_000_000_000_000,
                (0, 0),
                (750_000_000_000, 250_000_000_000),
            ),
        ];
        for (rtime, utime, stime, (pu, ps), want) in fixtures {
            let mut prev = PrevCputime {
                utime: pu,
                stime: ps,
            };
            let got = cputime_adjust(rtime, utime, stime, &mut prev);
            assert_eq!(got, want, "{rtime} {utime} {stime} prev ({pu}, {ps})");
            assert_eq!((prev.utime, prev.stime), want);
        }
        // A sequence of readings never goes backwards in either part.
        let mut prev = PrevCputime::default();
        let mut last = (0, 0);
        for (rtime, utime, stime) in [(100, 1, 0), (200, 1, 1), (300, 1, 5), (301, 9, 1)] {
            let got = cputime_adjust(rtime, utime, stime, &mut prev);
            assert!(got.0 >= last.0 && got.1 >= last.1, "{got:?} after {last:?}");
            assert_eq!(got.0 + got.1, rtime);
            last = got;
        }
    }
}
