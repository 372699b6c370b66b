//! The eBPF programs' diagnostics (aya-log), read only while logging is on.
//!
//! The programs log at debug level, on rare paths only: a full map or ring buffer (which one,
//! which thread and comm), a failed kernel read (which field). Whether their log statements
//! exist at all is decided at load time: `AYA_LOG_LEVEL`, a read-only global, gets the most
//! detailed level `log` lets through for the programs' own target ([`EBPF_TARGET`]). Below
//! debug (`cylo-usage` without `-v`, or a `RUST_LOG` that leaves `cylo_usage_ebpf` out),
//! the verifier finds every statement's branch never taken and removes it: nothing to
//! verify, nothing run, and no reader here. So `RUST_LOG=cylo_usage::kernel=debug` shows
//! what loading cost without changing what is loaded.
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::thread::JoinHandle;

use aya::Ebpf;

/// The values `AYA_LOG_LEVEL` can take, as statics: the loader borrows its globals for as
/// long as it lives.
static LEVELS: [u8; 6] = [0, 1, 2, 3, 4, 5];

/// The target of the programs' log records: their crate.
pub(crate) const EBPF_TARGET: &str = "cylo_usage_ebpf";

/// `AYA_LOG_LEVEL` for the programs: what `log` lets through for [`EBPF_TARGET`] (0: off,
/// 4: debug).
pub(crate) fn level() -> &'static u8 {
    use log::Level::{Debug, Error, Info, Trace, Warn};
    // Level: Error = 1, ..., Trace = 5, as aya-log's levels.
    let enabled = [Trace, Debug, Info, Warn, Error]
        .into_iter()
        .find(|&l| log::log_enabled!(target: EBPF_TARGET, l));
    &LEVELS[enabled.map_or(0, |l| l as usize).min(5)]
}

/// `AYA_LOG_LEVEL` with the programs' statements out.
pub(crate) fn level_off() -> &'static u8 {
    &LEVELS[0]
}

/// Whether the programs' statements (debug level) are in.
pub(crate) fn enabled(level: u8) -> bool {
    level >= aya_log::Level::Debug as u8
}

/// A thread that hands the programs' log records to `log` as they come; stopped (after a
/// last read) when dropped.
pub(crate) struct Reader {
    wake: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

/// Starts the reader when the programs were loaded with their statements in.
pub(crate) fn start(ebpf: &mut Ebpf, level: u8) -> Option<Reader> {
    if !enabled(level) {
        return None;
    }
    let started = std::time::Instant::now();
    let mut logger = match aya_log::EbpfLogger::init_with_logger(ebpf, Describe) {
        Ok(l) => l,
        Err(e) => {
            log::warn!("the eBPF programs' log cannot be read: {e}");
            return None;
        }
    };
    // SAFETY: eventfd(2) takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        log::warn!(
            "the eBPF programs' log cannot be read: eventfd: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: a descriptor the kernel just gave this process.
    let wake = unsafe { OwnedFd::from_raw_fd(fd) };
    let wake_fd = wake.as_raw_fd();
    let thread = std::thread::Builder::new()
        .name("ebpf-log".into())
        .spawn(move || {
            loop {
                let mut fds = [
                    libc::pollfd {
                        fd: logger.as_fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: wake_fd,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: `fds` is valid for the call.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                logger.flush();
                if n < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                    || fds[1].revents != 0
                {
                    return;
                }
            }
        })
        .ok()?;
    log::debug!(
        "reading the eBPF programs' log (set up in {} µs)",
        started.elapsed().as_micros()
    );
    Some(Reader {
        wake,
        thread: Some(thread),
    })
}

/// Hands the programs' records on to `log`'s logger, their diagnostics
/// (`lost KIND RUN TID COMM-LO COMM-HI`, numbers being cheaper to verify than text) written
/// out in words.
struct Describe;

/// `lost KIND RUN TID COMM-LO COMM-HI` in words: `run RUN: what was lost (thread TID COMM)`.
/// The comm's bytes are the traced thread's choice: anything but printable ASCII is shown
/// as `?`. None for any other text.
fn describe(text: &str) -> Option<String> {
    use cylo_usage_abi::diag;
    let fields = text.strip_prefix(diag::RECORD_PREFIX)?;
    let n: Vec<u64> = fields
        .split(' ')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [kind, run, tid, lo, hi] = n[..] else {
        return None;
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&lo.to_le_bytes());
    bytes[8..].copy_from_slice(&hi.to_le_bytes());
    let comm: String = bytes
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    let kind = u32::try_from(kind).unwrap_or(u32::MAX);
    Some(format!(
        "run {run}: {} (thread {tid} {comm})",
        diag::text(kind)
    ))
}

impl log::Log for Describe {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        let text = record.args().to_string();
        let text = describe(&text).unwrap_or(text);
        log::logger().log(
            &log::Record::builder()
                .args(format_args!("{text}"))
                .level(record.level())
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {
        log::logger().flush();
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn a_diagnostic_is_written_out_in_words() {
        // "cylo-usage-work" and "a\x01b\n", as the comm's two little-endian words.
        let lo = u64::from_le_bytes(*b"cylo-usa");
        let hi = u64::from_le_bytes(*b"ge-work\0");
        assert_eq!(
            describe(&format!("lost 1 3 4242 {lo} {hi}")).unwrap(),
            "run 3: TASKS is full: a new task is not followed; its creator was killed (a new \
             process may escape) (thread 4242 cylo-usage-work)"
        );
        let lo = u64::from_le_bytes(*b"a\x01b\n\0\0\0\0");
        assert_eq!(
            describe(&format!("lost 99 0 1 {lo} 0")).unwrap(),
            "run 0: something was lost (an unknown diagnostic) (thread 1 a?b?)"
        );
    }

    #[test]
    fn other_text_is_left_alone() {
        assert_eq!(describe("hello"), None);
        assert_eq!(describe("lost 1 2 3"), None);
        assert_eq!(describe("lost 1 2 3 x 5"), None);
    }
}
