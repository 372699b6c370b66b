//! `/proc/meminfo`, for what the bench reports of the machine and how many guests `vm-test`
//! boots at once.

/// The text of `/proc/meminfo`, empty if it cannot be read.
pub fn read() -> String {
    std::fs::read_to_string("/proc/meminfo").unwrap_or_default()
}

/// The value of `field` (`MemTotal`, `MemAvailable`, ...) in a `/proc/meminfo` text, in KiB.
pub fn kib(meminfo: &str, field: &str) -> Option<u64> {
    let value = meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    value.trim().strip_suffix("kB")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::kib;

    #[test]
    fn reads_a_field_in_kib() {
        let meminfo = "MemTotal:       24683784 kB\nMemFree:        21963652 kB\n\
                       MemAvailable:   24081056 kB\nBuffers:           15476 kB\n";
        assert_eq!(kib(meminfo, "MemTotal"), Some(24683784));
        assert_eq!(kib(meminfo, "MemAvailable"), Some(24081056));
        // A field's name must match whole, not as a prefix of another's.
        assert_eq!(kib(meminfo, "Mem"), None);
        assert_eq!(kib("MemTotal: 1 kB\n", "MemAvailable"), None);
        assert_eq!(kib("MemAvailable: lots\n", "MemAvailable"), None);
    }
}
