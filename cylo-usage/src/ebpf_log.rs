//! The eBPF programs' diagnostics (aya-log), read only while logging is on.
//!
//! The programs log at debug level, on rare paths only: a full map or ring buffer (which one,
//! which thread and comm), a failed kernel read (which field). Whether their log statements
//! exist at all is decided at load time: `AYA_LOG_LEVEL`, a read-only global, gets
//! `log::max_level()`. Below debug (`cylo-usage` without `-v` or `RUST_LOG=debug`), the
//! verifier finds every statement's branch never taken and removes it: nothing to verify,
//! nothing run, and no reader here.
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::thread::JoinHandle;

use aya::Ebpf;

/// The values `AYA_LOG_LEVEL` can take, as statics: the loader borrows its globals for as
/// long as it lives.
static LEVELS: [u8; 6] = [0, 1, 2, 3, 4, 5];

/// `AYA_LOG_LEVEL` for the programs: what `log` lets through (0: off, 4: debug).
pub(crate) fn level() -> &'static u8 {
    // LevelFilter: Off = 0, Error = 1, ..., Trace = 5, as aya-log's levels.
    &LEVELS[(log::max_level() as usize).min(5)]
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
    let mut logger = match aya_log::EbpfLogger::init_with_logger(ebpf, Squeeze) {
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

/// Hands records on to `log`'s logger with runs of spaces squeezed: the programs pad their
/// strings to fixed lengths, which keeps their log statement cheap to verify.
struct Squeeze;

impl log::Log for Squeeze {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        let text = record.args().to_string();
        let mut squeezed = String::with_capacity(text.len());
        for c in text.chars() {
            if !(c == ' ' && squeezed.ends_with(' ')) {
                squeezed.push(c);
            }
        }
        let squeezed = squeezed.replace(" )", ")");
        log::logger().log(
            &log::Record::builder()
                .args(format_args!("{}", squeezed.trim_end()))
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
