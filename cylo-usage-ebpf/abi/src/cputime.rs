//! The arithmetic of the kernel's user/system split (`cputime_adjust()` of
//! kernel/sched/cputime.c), once, for both sides: the eBPF programs split each ended process
//! with it ([`crate::run_flags::KERNEL_SPLIT`]) and userspace splits live processes and
//! records with it, so the two agree to the nanosecond. Only 64-bit operations: the BPF
//! target has no 128-bit multiply or divide.

/// `a * b / c`, the 128-bit product truncated as x86-64's `mul_u64_u64_div_u64` (and the
/// generic one since 6.x) truncates it. The quotient must fit in 64 bits (`a <= c` ensures
/// it); when it does not, `u64::MAX`. `c == 0` gives 0 (BPF's division by zero).
#[inline(always)]
pub const fn mul_div(a: u64, b: u64, c: u64) -> u64 {
    if c == 0 {
        return 0;
    }
    let (hi, lo) = mul_wide(a, b);
    if hi == 0 {
        return lo / c;
    }
    if hi >= c {
        return u64::MAX;
    }
    div_wide(hi, lo, c)
}

/// `u1:u0 / v` for `u1 < v` (the quotient fits in 64 bits): Knuth's algorithm D in base
/// 2^32 (Hacker's Delight, `divlu`), with 64-bit divisions only and no loop: a handful of
/// instructions, and few paths for the BPF verifier to walk.
#[inline(always)]
pub const fn div_wide(u1: u64, u0: u64, v: u64) -> u64 {
    const B: u64 = 1 << 32;
    const LOW: u64 = B - 1;
    // Normalise: the divisor's top bit set.
    let s = leading_zeros(v);
    let v = v << s;
    let (vn1, vn0) = (v >> 32, v & LOW);
    // `u0 >> (64 - s)` in two steps, so that `s == 0` (a shift by 64) needs no branch.
    let un32 = (u1 << s) | ((u0 >> 1) >> (63 - s));
    let un10 = u0 << s;
    let (un1, un0) = (un10 >> 32, un10 & LOW);
    let q1 = digit(un32, un1, vn1, vn0);
    let un21 = un32
        .wrapping_mul(B)
        .wrapping_add(un1)
        .wrapping_sub(q1.wrapping_mul(v));
    let q0 = digit(un21, un0, vn1, vn0);
    q1.wrapping_mul(B).wrapping_add(q0)
}

/// One quotient digit of [`div_wide`]: `un / vn1`, corrected at most twice against the next
/// digit `next` of the dividend and the divisor's low half `vn0`.
#[inline(always)]
const fn digit(un: u64, next: u64, vn1: u64, vn0: u64) -> u64 {
    const B: u64 = 1 << 32;
    // `vn1` has its top bit set (normalised); the check keeps a panic path out of BPF code.
    if vn1 == 0 {
        return 0;
    }
    let mut q = un / vn1;
    let mut rhat = un - q * vn1;
    if q >= B || q * vn0 > B * rhat + next {
        q -= 1;
        rhat += vn1;
        if rhat < B && (q >= B || q * vn0 > B * rhat + next) {
            q -= 1;
        }
    }
    q
}

/// The leading zero bits of `x` (nonzero), by halving: no count instruction in BPF, and no
/// branch either. Six `if`s would give the verifier 2^6 paths through the rest of the
/// division, and the shift counts they make are kept precise, so none of those paths is
/// pruned: each step is arithmetic instead ([`is_zero_32`]).
#[inline(always)]
pub const fn leading_zeros(x: u64) -> u32 {
    let mut n = 0;
    let mut x = x;
    let mut step = 32;
    // Each step halves what is left: the top 32 bits, 16, 8, 4, 2, then the top bit.
    while step > 0 {
        let shift = is_zero_32(x >> (64 - step)) * step;
        n += shift;
        x <<= shift;
        step /= 2;
    }
    n as u32
}

/// 1 if `t` is zero, else 0, for `t < 2^32`, without a comparison (which the BPF target
/// compiles to a branch): `t + (2^32 - 1)` reaches 2^32 exactly when `t` is at least 1.
#[inline(always)]
const fn is_zero_32(t: u64) -> u64 {
    1 - ((t + 0xffff_ffff) >> 32)
}

/// The 128-bit product of `a` and `b` as (high, low) halves, from 32-bit pieces.
#[inline(always)]
pub const fn mul_wide(a: u64, b: u64) -> (u64, u64) {
    const LOW: u64 = 0xffff_ffff;
    let (a1, a0) = (a >> 32, a & LOW);
    let (b1, b0) = (b >> 32, b & LOW);
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 32) + (p01 & LOW) + (p10 & LOW);
    let lo = (p00 & LOW) | (mid << 32);
    let hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
    (hi, lo)
}

/// The system part of a thread group's CPU time with no earlier adjusted reading, as
/// `cputime_adjust()` makes it for `wait4` and `getrusage`: its precise runtime `rtime`
/// (all its threads' `sum_exec_runtime`) in the proportion of its tick-sampled `stime` to
/// `utime + stime`. No tick sample of system time: 0; none of user time: all of it. The
/// user part is `rtime` less this.
#[inline(always)]
pub const fn split_system(rtime: u64, utime: u64, stime: u64) -> u64 {
    if stime == 0 {
        return 0;
    }
    if utime == 0 {
        return rtime;
    }
    // The kernel adds in u64; and clamps the quotient to the runtime.
    let s = mul_div(stime, rtime, stime.wrapping_add(utime));
    if s > rtime { rtime } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of values spread over every magnitude.
    fn values(n: usize) -> impl Iterator<Item = u64> {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        (0..n).map(move |_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x >> (x % 64)
        })
    }

    #[test]
    fn mul_wide_is_the_128_bit_product() {
        let vs: Vec<u64> = values(300)
            .chain([0, 1, u64::MAX, 1 << 32, LOW32])
            .collect();
        for &a in &vs {
            for &b in &vs {
                let want = a as u128 * b as u128;
                assert_eq!(
                    mul_wide(a, b),
                    ((want >> 64) as u64, want as u64),
                    "{a} {b}"
                );
            }
        }
    }

    const LOW32: u64 = 0xffff_ffff;

    #[test]
    fn leading_zeros_counts_them() {
        for x in values(2000)
            .chain((0..64).map(|i| 1u64 << i))
            .filter(|&x| x != 0)
        {
            assert_eq!(leading_zeros(x), x.leading_zeros(), "{x}");
        }
    }

    #[test]
    fn div_wide_is_the_exact_quotient_wherever_it_fits() {
        let vs: Vec<u64> = values(400)
            .chain([
                1,
                2,
                3,
                u64::MAX,
                u64::MAX - 1,
                1 << 63,
                (1 << 63) + 1,
                1 << 32,
                LOW32,
            ])
            .collect();
        for &v in vs.iter().filter(|&&v| v != 0) {
            for &u1 in &vs {
                let u1 = u1 % v;
                for &u0 in vs.iter().take(60) {
                    let want = ((u1 as u128) << 64 | u0 as u128) / v as u128;
                    assert_eq!(div_wide(u1, u0, v) as u128, want, "{u1}:{u0} / {v}");
                }
            }
        }
    }

    #[test]
    fn mul_div_truncates_the_exact_quotient() {
        let vs: Vec<u64> = values(200)
            .chain([0, 1, 2, u64::MAX, u64::MAX - 1])
            .collect();
        for &a in &vs {
            for &b in &vs {
                for &c in &[a, a.saturating_add(1), a.saturating_add(b), u64::MAX, 7] {
                    let got = mul_div(a, b, c);
                    if c == 0 {
                        assert_eq!(got, 0);
                        continue;
                    }
                    let want = a as u128 * b as u128 / c as u128;
                    let want = u64::try_from(want).unwrap_or(u64::MAX);
                    assert_eq!(got, want, "{a} * {b} / {c}");
                }
            }
        }
    }

    #[test]
    fn split_system_follows_cputime_adjust() {
        assert_eq!(split_system(1000, 0, 0), 0);
        assert_eq!(split_system(1000, 5, 0), 0);
        assert_eq!(split_system(1000, 0, 5), 1000);
        assert_eq!(split_system(1000, 3, 1), 250);
        assert_eq!(split_system(0, 3, 1), 0);
        // The product overflows 64 bits (about 10 s of runtime and of system time); the
        // quotient does not.
        assert_eq!(
            split_system(1_000_000_000_000, 3_000_000_000_000, 1_000_000_000_000),
            250_000_000_000
        );
        assert_eq!(
            split_system(1_000_000_007, 20_000_000, 10_000_000),
            333_333_335
        );
        for rtime in values(100) {
            for utime in values(30) {
                for stime in values(30) {
                    let s = split_system(rtime, utime, stime);
                    assert!(s <= rtime);
                    if stime != 0 && utime != 0 && stime.checked_add(utime).is_some() {
                        let want = stime as u128 * rtime as u128 / (stime + utime) as u128;
                        assert_eq!(s as u128, want, "{rtime} {utime} {stime}");
                    }
                }
            }
        }
    }
}
