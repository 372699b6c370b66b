//! Kernel-version knowledge, resolved once at start-up.
//!
//! Every layout fact cylo-usage relies on is named here, as a [`Field`] (a struct, one or more
//! candidate member paths across kernel versions, and the sizes the eBPF side can read), and
//! resolved from the running kernel's BTF into [`cylo_usage_abi::Offsets`]. To read a new
//! kernel field: add a `Field` constant below, add the field to `Offsets` in the ABI crate,
//! fill it in [`resolve_offsets`], and extend the fixture tests (the fixtures already carry
//! `task_struct.ioac`, `task_struct.mm`, `mm_struct` and `signal_struct`; see
//! `tests/fixtures/btf/README.md` to add more).

use std::path::{Path, PathBuf};

use cylo_usage_abi::Offsets;

use crate::btf::{Btf, BtfError, Member};

/// Where the running kernel exposes its own BTF (needs `CONFIG_DEBUG_INFO_BTF=y`).
pub const VMLINUX_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// `TASK_DEAD` from `include/linux/sched.h`. It is a `#define`, so BTF does not carry it. It
/// has been `0x80` since Linux 4.14 (it was `64` before), which covers every kernel with the
/// `btf_trace_*` typedefs this resolver needs (5.5+).
pub const TASK_DEAD: u32 = 0x80;

/// A kernel struct member the eBPF programs read: `strukt` and the dotted member paths to try
/// in order (newest name first, older names after), and the sizes in bytes the reader handles.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub strukt: &'static str,
    pub paths: &'static [&'static str],
    pub sizes: &'static [u32],
}

/// The fields cylo-usage knows about.
pub mod fields {
    use super::Field;

    const fn f(
        strukt: &'static str,
        paths: &'static [&'static str],
        sizes: &'static [u32],
    ) -> Field {
        Field {
            strukt,
            paths,
            sizes,
        }
    }

    pub const TASK_PID: Field = f("task_struct", &["pid"], &[4]);
    pub const TASK_TGID: Field = f("task_struct", &["tgid"], &[4]);
    pub const TASK_SIGNAL: Field = f("task_struct", &["signal"], &[8]);
    /// Renamed from `real_start_time` in 5.3.
    pub const TASK_START_BOOTTIME: Field =
        f("task_struct", &["start_boottime", "real_start_time"], &[8]);
    pub const TASK_SUM_EXEC_RUNTIME: Field = f("task_struct", &["se.sum_exec_runtime"], &[8]);
    pub const TASK_UTIME: Field = f("task_struct", &["utime"], &[8]);
    pub const TASK_STIME: Field = f("task_struct", &["stime"], &[8]);
    /// `unsigned int __state` since 5.14, `volatile long state` before.
    pub const TASK_STATE: Field = f("task_struct", &["__state", "state"], &[4, 8]);
    /// `atomic_t live`: threads of the process not yet past do_exit().
    pub const SIGNAL_LIVE: Field = f("signal_struct", &["live"], &[4]);

    // Not in `Offsets` yet; resolvable on every fixture kernel.
    pub const TASK_MM: Field = f("task_struct", &["mm"], &[8]);
    pub const TASK_IOAC_READ_BYTES: Field = f("task_struct", &["ioac.read_bytes"], &[8]);
    pub const TASK_IOAC_WRITE_BYTES: Field = f("task_struct", &["ioac.write_bytes"], &[8]);
    pub const TASK_IOAC_CANCELLED_WRITE_BYTES: Field =
        f("task_struct", &["ioac.cancelled_write_bytes"], &[8]);
    pub const MM_HIWATER_RSS: Field = f("mm_struct", &["hiwater_rss"], &[8]);
}

/// Why the kernel's layout could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "cannot read kernel BTF {path} (is the kernel built with CONFIG_DEBUG_INFO_BTF=y?): {source}"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid kernel BTF in {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<BtfError>,
    },
    #[error("kernel BTF: cannot locate {field}: {source}")]
    Field {
        /// e.g. `task_struct.{start_boottime|real_start_time}`
        field: String,
        #[source]
        source: Box<BtfError>,
    },
    #[error("kernel BTF: {field} is {actual} bytes, expected one of {expected:?}")]
    Size {
        field: String,
        actual: u32,
        expected: &'static [u32],
    },
    #[error("kernel BTF: cannot count the arguments of raw tracepoint {tracepoint}: {source}")]
    Tracepoint {
        tracepoint: &'static str,
        #[source]
        source: Box<BtfError>,
    },
}

impl Field {
    fn describe(&self) -> String {
        match self.paths {
            [one] => format!("{}.{one}", self.strukt),
            many => format!("{}.{{{}}}", self.strukt, many.join("|")),
        }
    }

    /// Locates the first of `paths` the kernel has and checks its size.
    pub fn resolve(&self, btf: &Btf) -> Result<Member, ResolveError> {
        let mut first_err = None;
        for path in self.paths {
            match btf.member(self.strukt, path) {
                Ok(member) if self.sizes.contains(&member.size) => return Ok(member),
                Ok(member) => {
                    return Err(ResolveError::Size {
                        field: format!("{}.{path}", self.strukt),
                        actual: member.size,
                        expected: self.sizes,
                    });
                }
                // Absent under this name: try the next one.
                Err(e @ BtfError::MemberNotFound { .. }) => {
                    first_err.get_or_insert(e);
                }
                Err(source) => {
                    return Err(ResolveError::Field {
                        field: format!("{}.{path}", self.strukt),
                        source: Box::new(source),
                    });
                }
            }
        }
        Err(ResolveError::Field {
            field: self.describe(),
            source: Box::new(first_err.unwrap_or_else(|| BtfError::StructNotFound {
                name: self.strukt.to_owned(),
            })),
        })
    }
}

fn arg_count(btf: &Btf, tracepoint: &'static str) -> Result<usize, ResolveError> {
    btf.raw_tracepoint_arg_count(tracepoint)
        .map_err(|source| ResolveError::Tracepoint {
            tracepoint,
            source: Box::new(source),
        })
}

/// Resolves every offset the eBPF programs need from the given BTF.
pub fn resolve_offsets(btf: &Btf) -> Result<Offsets, ResolveError> {
    use fields::*;
    let state = TASK_STATE.resolve(btf)?;
    // sched_switch(preempt, prev, next[, prev_state]): prev_state came with 5.18.
    let switch_args = arg_count(btf, cylo_usage_abi::names::TP_SCHED_SWITCH)?;
    Ok(Offsets {
        task_pid: TASK_PID.resolve(btf)?.offset,
        task_tgid: TASK_TGID.resolve(btf)?.offset,
        task_signal: TASK_SIGNAL.resolve(btf)?.offset,
        task_start_boottime: TASK_START_BOOTTIME.resolve(btf)?.offset,
        task_sum_exec_runtime: TASK_SUM_EXEC_RUNTIME.resolve(btf)?.offset,
        task_utime: TASK_UTIME.resolve(btf)?.offset,
        task_stime: TASK_STIME.resolve(btf)?.offset,
        task_state: state.offset,
        task_state_size: state.size,
        switch_has_prev_state: u32::from(switch_args >= 4),
        task_dead: TASK_DEAD,
        signal_live: SIGNAL_LIVE.resolve(btf)?.offset,
    })
}

/// Resolves the offsets from a raw BTF file.
pub fn resolve_file(path: &Path) -> Result<Offsets, ResolveError> {
    let bytes = std::fs::read(path).map_err(|source| ResolveError::Read {
        path: path.to_owned(),
        source,
    })?;
    let btf = Btf::from_bytes(&bytes).map_err(|source| ResolveError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    resolve_offsets(&btf)
}

/// Resolves the offsets of the running kernel, from [`VMLINUX_BTF_PATH`].
pub fn resolve_host() -> Result<Offsets, ResolveError> {
    resolve_file(Path::new(VMLINUX_BTF_PATH))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf::testutil::{Builder, STRUCT};

    fn fixture(name: &str) -> Btf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/btf")
            .join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Btf::from_bytes(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[allow(clippy::too_many_arguments)]
    const fn offsets(
        pid: u32,
        signal: u32,
        start: u32,
        sum_exec: u32,
        utime: u32,
        state: u32,
        state_size: u32,
        prev_state: u32,
    ) -> Offsets {
        Offsets {
            task_pid: pid,
            task_tgid: pid + 4,
            task_signal: signal,
            task_start_boottime: start,
            task_sum_exec_runtime: sum_exec,
            task_utime: utime,
            task_stime: utime + 8,
            task_state: state,
            task_state_size: state_size,
            switch_has_prev_state: prev_state,
            task_dead: 0x80,
            // `refcount_t sigcnt; atomic_t live;` on every kernel here.
            signal_live: 4,
        }
    }

    /// Expected numbers: gcc `offsetof` over `bpftool btf dump file FULL format c` of each
    /// kernel's complete BTF, and `btf_trace_sched_switch` read off the same dump
    /// (see tests/fixtures/btf/README.md).
    const EXPECTED: [(&str, Offsets); 4] = [
        (
            "debian-5.10.btf",
            offsets(2232, 2832, 2544, 200, 2472, 16, 8, 0),
        ),
        (
            "debian-6.1.btf",
            offsets(2416, 3072, 2784, 200, 2656, 24, 4, 1),
        ),
        (
            "debian-6.12.btf",
            offsets(2432, 3072, 2784, 224, 2656, 24, 4, 1),
        ),
        (
            "host-6.18.btf",
            offsets(1264, 1848, 1560, 232, 1488, 24, 4, 1),
        ),
    ];
    /// `uname -r` of the machine `host-6.18.btf` was taken from.
    const HOST_FIXTURE_RELEASE: &str = "6.18.44-fc-v669";

    #[test]
    fn fixtures_resolve_exactly() {
        for (file, want) in EXPECTED {
            let got = resolve_offsets(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(got, want, "{file}");
        }
    }

    #[test]
    fn fields_for_later_resolve_on_every_fixture() {
        use fields::*;
        // (mm, ioac.read_bytes, mm_struct.hiwater_rss), checked like EXPECTED.
        let want = [
            (2056, 3128, 176),
            (2272, 3400, 176),
            (2304, 3392, 240),
            (1136, 2184, 344),
        ];
        for ((file, _), (mm, read, hiwater)) in EXPECTED.iter().zip(want) {
            let btf = fixture(file);
            assert_eq!(TASK_MM.resolve(&btf).unwrap().offset, mm, "{file}");
            assert_eq!(
                TASK_IOAC_READ_BYTES.resolve(&btf).unwrap().offset,
                read,
                "{file}"
            );
            assert_eq!(
                TASK_IOAC_WRITE_BYTES.resolve(&btf).unwrap().offset,
                read + 8,
                "{file}"
            );
            assert_eq!(
                TASK_IOAC_CANCELLED_WRITE_BYTES
                    .resolve(&btf)
                    .unwrap()
                    .offset,
                read + 16,
                "{file}"
            );
            assert_eq!(
                MM_HIWATER_RSS.resolve(&btf).unwrap().offset,
                hiwater,
                "{file}"
            );
        }
    }

    /// A minimal task_struct; `names` overrides member names, `sizes` the int widths.
    fn synthetic(state: (&str, u32), start: &str, pid_size: u32, switch_args: usize) -> Btf {
        let mut b = Builder::new();
        let int4 = b.int("int", 4);
        let u64_ = b.int("long long unsigned int", 8);
        let pid = b.int("pid_int", pid_size);
        let st = b.int("state_int", state.1);
        let void_ptr = b.ptr(0);
        let se = b.composite(STRUCT, "sched_entity", 16, &[("sum_exec_runtime", u64_, 8)]);
        b.composite(
            STRUCT,
            "signal_struct",
            8,
            &[("sigcnt", int4, 0), ("live", int4, 4)],
        );
        b.composite(
            STRUCT,
            "task_struct",
            128,
            &[
                (state.0, st, 16),
                ("se", se, 32),
                ("pid", pid, 56),
                ("tgid", int4, 64),
                ("signal", void_ptr, 72),
                (start, u64_, 80),
                ("utime", u64_, 88),
                ("stime", u64_, 96),
            ],
        );
        let mut params = vec![void_ptr];
        params.resize(switch_args + 1, int4);
        b.tracepoint("sched_switch", &params);
        Btf::from_bytes(&b.build()).unwrap()
    }

    #[test]
    fn old_names_are_found() {
        let got = resolve_offsets(&synthetic(("state", 8), "real_start_time", 4, 3)).unwrap();
        assert_eq!(
            (got.task_state, got.task_state_size, got.task_start_boottime),
            (16, 8, 80)
        );
        assert_eq!(got.switch_has_prev_state, 0);
        assert_eq!(got.task_sum_exec_runtime, 40);
        let got = resolve_offsets(&synthetic(("__state", 4), "start_boottime", 4, 4)).unwrap();
        assert_eq!((got.task_state, got.task_state_size), (16, 4));
        assert_eq!(got.switch_has_prev_state, 1);
    }

    #[test]
    fn unexpected_sizes_and_absences_are_typed_errors() {
        let e = resolve_offsets(&synthetic(("__state", 4), "start_boottime", 8, 4)).unwrap_err();
        assert!(
            matches!(&e, ResolveError::Size { field, actual: 8, .. } if field == "task_struct.pid"),
            "{e}"
        );
        let e = resolve_offsets(&synthetic(("__state", 2), "start_boottime", 4, 4)).unwrap_err();
        assert!(matches!(&e, ResolveError::Size { actual: 2, .. }), "{e}");
        let e = resolve_offsets(&synthetic(("status", 4), "start_boottime", 4, 4)).unwrap_err();
        assert!(
            matches!(&e, ResolveError::Field { field, .. } if field == "task_struct.{__state|state}"),
            "{e}"
        );
        assert!(e.to_string().contains("__state"), "{e}");
        let e = resolve_offsets(&synthetic(("__state", 4), "born", 4, 4)).unwrap_err();
        assert!(
            e.to_string().contains("start_boottime|real_start_time"),
            "{e}"
        );
        let e = resolve_file(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(e, ResolveError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
    }

    #[test]
    fn errors_stay_small() {
        // Callers embed ResolveError in their own errors (clippy::result_large_err is 128).
        assert!(std::mem::size_of::<ResolveError>() <= 64);
        assert!(std::mem::size_of::<BtfError>() < 128);
    }

    #[test]
    fn corrupt_file_names_the_file() {
        let path = std::env::temp_dir().join(format!("cylo-usage-bad-btf-{}", std::process::id()));
        std::fs::write(&path, b"not btf at all, just some bytes").unwrap();
        let e = resolve_file(&path).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(e, ResolveError::Parse { .. }), "{e}");
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
    }

    #[test]
    fn live_host_btf_resolves() {
        if !Path::new(VMLINUX_BTF_PATH).exists() {
            eprintln!("skipping: {VMLINUX_BTF_PATH} is absent on this machine");
            return;
        }
        let got = resolve_host().unwrap();
        assert_eq!(got.task_tgid, got.task_pid + 4, "{got:?}");
        assert_eq!(got.task_stime, got.task_utime + 8, "{got:?}");
        assert!(matches!(got.task_state_size, 4 | 8), "{got:?}");
        assert_eq!(got.task_dead, TASK_DEAD);
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if release.trim() == HOST_FIXTURE_RELEASE {
            assert_eq!(
                got, EXPECTED[3].1,
                "host differs from its own minimized fixture"
            );
        } else {
            eprintln!(
                "host kernel {} is not the fixture's {HOST_FIXTURE_RELEASE}",
                release.trim()
            );
        }
    }
}
