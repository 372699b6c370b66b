//! Reads of `/proc` for the threads of a run that are still alive at a snapshot.
//!
//! Everything here is controlled by the traced (untrusted) code in part: a process name may
//! contain spaces, parentheses and newlines, so parsers never trust field positions before the
//! last `)` of `stat`.
use std::path::PathBuf;

/// What a live thread has used so far, from `/proc/TGID/task/TID/{schedstat,stat}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCpu {
    /// The scheduler's runtime (ns), up to date at the read (`schedstat` field 1).
    pub runtime_ns: u64,
    /// User time in clock ticks (`stat` field 14), for the user/system split only.
    pub utime_ticks: u64,
    /// System time in clock ticks (`stat` field 15), for the user/system split only.
    pub stime_ticks: u64,
    /// Start time in clock ticks since boot (`stat` field 22).
    pub start_ticks: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed {path}: {what}")]
    Malformed { path: PathBuf, what: &'static str },
    #[error("thread {tid} of process {tgid} is not the tracked one (its pid was reused)")]
    Reused { tgid: u32, tid: u32 },
}

/// Parses `/proc/.../schedstat`: "runtime_ns wait_ns timeslices".
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_ascii_whitespace().next()?.parse().ok()
}

/// Parses `/proc/.../stat`: returns (utime, stime, starttime) in clock ticks.
pub fn parse_stat(text: &str) -> Option<(u64, u64, u64)> {
    // Fields after the command name, which ends at the LAST ')'; field 3 (state) is index 0.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some((field(14)?, field(15)?, field(22)?))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Reads one live thread, checking that it is the one that joined (by its start time), so a
/// reused pid never makes a stranger's CPU time ours.
pub fn read_thread(tgid: u32, tid: u32, start_boottime_ns: u64) -> Result<ThreadCpu, ProcError> {
    let dir = PathBuf::from(format!("/proc/{tgid}/task/{tid}"));
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| ProcError::Read { path, source })
    };
    let stat = read("stat")?;
    let (utime_ticks, stime_ticks, start_ticks) =
        parse_stat(&stat).ok_or_else(|| ProcError::Malformed {
            path: dir.join("stat"),
            what: "expected at least 22 fields after the command name",
        })?;
    let hz = clock_ticks_per_second();
    if start_ticks != start_boottime_ns / (1_000_000_000 / hz) {
        return Err(ProcError::Reused { tgid, tid });
    }
    let runtime_ns = parse_schedstat(&read("schedstat")?).ok_or_else(|| ProcError::Malformed {
        path: dir.join("schedstat"),
        what: "expected a runtime in ns",
    })?;
    Ok(ThreadCpu {
        runtime_ns,
        utime_ticks,
        stime_ticks,
        start_ticks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line from 6.18, with the name replaced by a hostile one.
    const STAT: &str = "4242 (a) b (c) d) S 1 4242 4242 0 -1 4194560 120 0 0 0 \
        7 3 0 0 20 0 1 0 12345 2420736 230 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 \
        17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn stat_takes_fields_after_the_last_paren() {
        assert_eq!(parse_stat(STAT), Some((7, 3, 12345)));
    }

    #[test]
    fn stat_with_newline_and_spaces_in_name() {
        let s = "1 (x\n) (y ) R 0 0 0 0 0 0 0 0 0 0 11 22 0 0 0 0 0 0 99 0 0\n";
        assert_eq!(parse_stat(s), Some((11, 22, 99)));
    }

    #[test]
    fn stat_truncated_or_garbage_is_none() {
        assert_eq!(parse_stat("12 (sh) S 1 2 3"), None);
        assert_eq!(parse_stat("no parens at all"), None);
        assert_eq!(parse_stat(""), None);
        assert_eq!(
            parse_stat("1 (x) S 1 1 1 0 0 0 0 0 0 0 -5 2 0 0 0 0 0 0 9"),
            None
        );
    }

    #[test]
    fn schedstat() {
        assert_eq!(parse_schedstat("300469 54562 4\n"), Some(300469));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn reads_own_thread() {
        let pid = std::process::id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).unwrap();
        let (_, _, start) = parse_stat(&stat).unwrap();
        let hz = clock_ticks_per_second();
        let me = read_thread(pid, pid, start * (1_000_000_000 / hz)).unwrap();
        assert!(me.runtime_ns > 0);
        let other = read_thread(pid, pid, (start + 5) * (1_000_000_000 / hz));
        assert!(matches!(other, Err(ProcError::Reused { .. })));
    }
}
