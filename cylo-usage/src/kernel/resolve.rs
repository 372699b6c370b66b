//! Kernel-version knowledge, resolved once at start-up.
//!
//! Every layout fact cylo-usage relies on is named here, as a [`Field`] (a struct, one or more
//! candidate member paths across kernel versions, and the sizes the eBPF side can read), and
//! resolved from the running kernel's BTF into [`cylo_usage_abi::Offsets`]. To read a new
//! kernel field: add a `Field` constant below, add the field to `Offsets` in the ABI crate,
//! fill it in [`resolve_offsets`], and extend the fixture tests (the fixtures carry
//! `task_struct` with `ioac`, `signal_struct`, `mm_struct`, `percpu_counter`, `bio`,
//! `block_device`, `gendisk`, `pid`, `upid`, `files_struct`, `fdtable`, `file`, `proc_inode`,
//! `linux_binprm` and seven tracepoints; see `tests/fixtures/btf/README.md` to add more).

use std::path::{Path, PathBuf};

use cylo_usage_abi::{ABSENT, Offsets};

use crate::kernel::btf::{Btf, BtfError, Kind, Member, TypeInfo, VMLINUX_BTF_PATH, Wanted};
use crate::kernel::offsets_cache::{Cache, Key};

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
    /// `u64 start_time` (CLOCK_MONOTONIC ns) since 3.17; `start_boottime` is the boot clock.
    pub const TASK_START_TIME: Field = f("task_struct", &["start_time"], &[8]);
    /// What a process's exited threads used (added in `__exit_signal()`), and what the
    /// children it reaped used (added in `wait_task_zombie()`): `u64` ns since 4.11.
    pub const SIGNAL_SUM_SCHED_RUNTIME: Field = f("signal_struct", &["sum_sched_runtime"], &[8]);
    pub const SIGNAL_UTIME: Field = f("signal_struct", &["utime"], &[8]);
    pub const SIGNAL_STIME: Field = f("signal_struct", &["stime"], &[8]);
    pub const SIGNAL_CUTIME: Field = f("signal_struct", &["cutime"], &[8]);
    pub const SIGNAL_CSTIME: Field = f("signal_struct", &["cstime"], &[8]);

    pub const TASK_MM: Field = f("task_struct", &["mm"], &[8]);
    /// `mm_struct.rss_stat`: a struct before 6.2, an array since (see `resolve_mm_rss`).
    pub const MM_RSS_STAT: &str = "rss_stat";
    /// The count of one `rss_stat` member since 6.2 (`s64`).
    pub const PERCPU_COUNTER_COUNT: Field = f("percpu_counter", &["count"], &[8]);

    // Optional: `ABSENT` when the kernel does not have them.
    /// CONFIG_TASK_IO_ACCOUNTING.
    pub const TASK_IOAC_READ_BYTES: Field = f("task_struct", &["ioac.read_bytes"], &[8]);
    pub const TASK_IOAC_WRITE_BYTES: Field = f("task_struct", &["ioac.write_bytes"], &[8]);
    pub const TASK_IOAC_CANCELLED_WRITE_BYTES: Field =
        f("task_struct", &["ioac.cancelled_write_bytes"], &[8]);
    /// CONFIG_TASK_XACCT.
    pub const TASK_IOAC_RCHAR: Field = f("task_struct", &["ioac.rchar"], &[8]);
    pub const TASK_IOAC_WCHAR: Field = f("task_struct", &["ioac.wchar"], &[8]);
    /// `signal_struct.ioac`: exited threads' and reaped children's (same configs as above).
    pub const SIGNAL_IOAC_READ_BYTES: Field = f("signal_struct", &["ioac.read_bytes"], &[8]);
    pub const SIGNAL_IOAC_WRITE_BYTES: Field = f("signal_struct", &["ioac.write_bytes"], &[8]);
    pub const SIGNAL_IOAC_CANCELLED_WRITE_BYTES: Field =
        f("signal_struct", &["ioac.cancelled_write_bytes"], &[8]);
    pub const SIGNAL_IOAC_RCHAR: Field = f("signal_struct", &["ioac.rchar"], &[8]);
    pub const SIGNAL_IOAC_WCHAR: Field = f("signal_struct", &["ioac.wchar"], &[8]);
    pub const BIO_SIZE: Field = f("bio", &["bi_iter.bi_size"], &[4]);
    /// `blk_opf_t` (u32) since 6.0, `unsigned int` before.
    pub const BIO_OPF: Field = f("bio", &["bi_opf"], &[4]);
    /// 5.12+.
    pub const BIO_BDEV: Field = f("bio", &["bi_bdev"], &[8]);
    /// `dev_t` (u32).
    pub const BDEV_DEV: Field = f("block_device", &["bd_dev"], &[4]);
    /// Before 5.12.
    pub const BIO_DISK: Field = f("bio", &["bi_disk"], &[8]);
    pub const BIO_PARTNO: Field = f("bio", &["bi_partno"], &[1]);
    pub const DISK_MAJOR: Field = f("gendisk", &["major"], &[4]);
    pub const DISK_FIRST_MINOR: Field = f("gendisk", &["first_minor"], &[4]);

    // Sessions (each group all or nothing; see `resolve_sessions`).
    pub const TASK_EXIT_CODE: Field = f("task_struct", &["exit_code"], &[4]);
    pub const TASK_COMM: Field = f("task_struct", &["comm"], &[16]);
    pub const TASK_REAL_PARENT: Field = f("task_struct", &["real_parent"], &[8]);
    pub const TASK_GROUP_LEADER: Field = f("task_struct", &["group_leader"], &[8]);
    /// `struct pid *thread_pid` (4.19+).
    pub const TASK_THREAD_PID: Field = f("task_struct", &["thread_pid"], &[8]);
    pub const PID_LEVEL: Field = f("pid", &["level"], &[4]);
    /// `struct upid numbers[]` (a flexible array since 6.x, `numbers[1]` before).
    pub const PID_NUMBERS: Field = f("pid", &["numbers"], &[0, 16]);
    pub const UPID_NR: Field = f("upid", &["nr"], &[4]);
    /// `struct hlist_head tasks[PIDTYPE_MAX]`: `[PIDTYPE_PID]` is first.
    pub const PID_TASKS: Field = f("pid", &["tasks"], &[24, 32, 40]);
    /// `struct hlist_node pid_links[PIDTYPE_MAX]`.
    pub const TASK_PID_LINKS: Field = f("task_struct", &["pid_links"], &[48, 64, 80]);
    pub const TASK_FILES: Field = f("task_struct", &["files"], &[8]);
    pub const FILES_FDT: Field = f("files_struct", &["fdt"], &[8]);
    pub const FDT_FD: Field = f("fdtable", &["fd"], &[8]);
    pub const FDT_MAX_FDS: Field = f("fdtable", &["max_fds"], &[4]);
    pub const FILE_INODE: Field = f("file", &["f_inode"], &[8]);
    pub const PROC_INODE_PID: Field = f("proc_inode", &["pid"], &[8]);
    /// `struct inode vfs_inode` (any size).
    pub const PROC_INODE_VFS_INODE: Field = f("proc_inode", &["vfs_inode"], &[]);
    pub const MM_ARG_START: Field = f("mm_struct", &["arg_start"], &[8]);
    pub const MM_ARG_END: Field = f("mm_struct", &["arg_end"], &[8]);
    pub const BPRM_FILENAME: Field = f("linux_binprm", &["filename"], &[8]);

    // Network: the socket a hook gets, and how to tell TCP, UDP and AF_UNIX apart.
    pub const SOCKET_SK: Field = f("socket", &["sk"], &[8]);
    pub const SK_FAMILY: Field = f("sock", &["__sk_common.skc_family"], &[2]);
    /// `u16` since 5.6; bitfields before, which leave the network unmeasured.
    pub const SK_TYPE: Field = f("sock", &["sk_type"], &[2]);
    pub const SK_PROTOCOL: Field = f("sock", &["sk_protocol"], &[2]);

    // Credentials: who may see a member's figures (all of the ids, or none).
    /// `const struct cred *real_cred`: what `ptrace_may_access()` checks.
    pub const TASK_REAL_CRED: Field = f("task_struct", &["real_cred"], &[8]);
    /// `kuid_t` / `kgid_t` (`struct { u32 val; }`).
    pub const CRED_UID: Field = f("cred", &["uid"], &[4]);
    pub const CRED_GID: Field = f("cred", &["gid"], &[4]);
    pub const CRED_SUID: Field = f("cred", &["suid"], &[4]);
    pub const CRED_SGID: Field = f("cred", &["sgid"], &[4]);
    pub const CRED_EUID: Field = f("cred", &["euid"], &[4]);
    pub const CRED_EGID: Field = f("cred", &["egid"], &[4]);
    /// `unsigned long flags` (in an anonymous union with `mm_flags_t` since 6.18): the
    /// dumpable mode is its low two bits.
    pub const MM_FLAGS: Field = f("mm_struct", &["flags"], &[8]);

    // Not in `Offsets`; resolvable on every fixture kernel.
    #[cfg(test)]
    pub const MM_HIWATER_RSS: Field = f("mm_struct", &["hiwater_rss"], &[8]);
}

/// `NR_MM_COUNTERS`: the `rss_stat` members cylo-usage reads (file, anon, swap, shmem).
pub const MM_COUNTERS: usize = 4;

/// Why the kernel's layout could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The BTF file could not be opened or read.
    #[error(
        "cannot read kernel BTF {path} (is the kernel built with CONFIG_DEBUG_INFO_BTF=y?): {source}"
    )]
    Read {
        /// The BTF file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The BTF file is not valid BTF: its header or its type section is malformed.
    #[error("invalid kernel BTF in {path}: {source}")]
    Parse {
        /// The BTF file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<BtfError>,
    },
    /// A field the programs read could not be located: its struct or member is missing (under
    /// every candidate name), or the lookup failed (a bitfield, say, or invalid BTF).
    #[error("kernel BTF: cannot locate {field}: {source}")]
    Field {
        /// e.g. `task_struct.{start_boottime|real_start_time}`
        field: String,
        /// Why the lookup failed.
        #[source]
        source: Box<BtfError>,
    },
    /// A field the programs read has a size they do not handle.
    #[error("kernel BTF: {field} is {actual} bytes, expected one of {expected:?}")]
    Size {
        /// The struct and member path, e.g. `task_struct.__state`.
        field: String,
        /// Its size in bytes.
        actual: u32,
        /// The sizes in bytes the programs handle.
        expected: &'static [u32],
    },
    /// The prototype of a raw tracepoint the programs use could not be read from BTF.
    #[error("kernel BTF: cannot count the arguments of raw tracepoint {tracepoint}: {source}")]
    Tracepoint {
        /// The tracepoint.
        tracepoint: &'static str,
        /// Why its prototype could not be read.
        #[source]
        source: Box<BtfError>,
    },
    /// A layout the programs depend on has a shape they do not know: `mm_struct.rss_stat`, or
    /// the arguments of raw tracepoint `rss_stat`.
    #[error("kernel BTF: {what} has an unknown layout: {detail}")]
    Layout {
        /// e.g. `mm_struct.rss_stat`
        what: &'static str,
        /// What was found, and what was expected.
        detail: String,
    },
}

impl Field {
    fn describe(&self) -> String {
        match self.paths {
            [one] => format!("{}.{one}", self.strukt),
            many => format!("{}.{{{}}}", self.strukt, many.join("|")),
        }
    }

    /// Locates the first of `paths` the kernel has and checks its size (any size when
    /// `sizes` is empty).
    pub fn resolve(&self, btf: &Btf) -> Result<Member, ResolveError> {
        let mut first_err = None;
        for path in self.paths {
            match btf.member(self.strukt, path) {
                Ok(member) if self.sizes.is_empty() || self.sizes.contains(&member.size) => {
                    return Ok(member);
                }
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

    /// Like [`Field::resolve`], but `None` when the kernel lacks the struct or the member (a
    /// member of an unexpected size is still an error).
    pub fn resolve_optional(&self, btf: &Btf) -> Result<Option<Member>, ResolveError> {
        match self.resolve(btf) {
            Ok(member) => Ok(Some(member)),
            Err(ResolveError::Field { source, .. })
                if matches!(
                    *source,
                    BtfError::MemberNotFound { .. } | BtfError::StructNotFound { .. }
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The offset, or [`ABSENT`].
    fn offset_or_absent(&self, btf: &Btf) -> Result<u32, ResolveError> {
        Ok(self.resolve_optional(btf)?.map_or(ABSENT, |m| m.offset))
    }
}

/// The offsets of `fields`, which are only of use together: all of them, or all [`ABSENT`].
fn all_or_absent<const N: usize>(btf: &Btf, fields: [Field; N]) -> Result<[u32; N], ResolveError> {
    let mut out = [ABSENT; N];
    for (slot, field) in out.iter_mut().zip(fields) {
        match field.resolve_optional(btf)? {
            Some(member) => *slot = member.offset,
            None => return Ok([ABSENT; N]),
        }
    }
    Ok(out)
}

fn arg_count(btf: &Btf, tracepoint: &'static str) -> Result<usize, ResolveError> {
    btf.raw_tracepoint_arg_count(tracepoint)
        .map_err(|source| ResolveError::Tracepoint {
            tracepoint,
            source: Box::new(source),
        })
}

/// Offsets within `mm_struct` of the `i64` page count of each of the first [`MM_COUNTERS`]
/// `rss_stat` members. The layout is told by the member's BTF type, not by the version:
/// before 6.2 `struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; } rss_stat`, since
/// `struct percpu_counter rss_stat[NR_MM_COUNTERS]`, whose central `count` is read.
fn resolve_mm_rss(btf: &Btf) -> Result<[u32; MM_COUNTERS], ResolveError> {
    const WHAT: &str = "mm_struct.rss_stat";
    let field_err = |path: &str, source| ResolveError::Field {
        field: format!("mm_struct.{path}"),
        source: Box::new(source),
    };
    let layout = |detail: String| ResolveError::Layout { what: WHAT, detail };
    let path = fields::MM_RSS_STAT;
    let rss = btf
        .member("mm_struct", path)
        .map_err(|e| field_err(path, e))?;
    let ty = btf
        .member_type("mm_struct", path)
        .map_err(|e| field_err(path, e))?;
    // (offset of counter 0, stride between counters)
    let (base, stride) = match ty {
        TypeInfo::Composite {
            kind: Kind::Struct, ..
        } => {
            let path = "rss_stat.count";
            let count = btf
                .member("mm_struct", path)
                .map_err(|e| field_err(path, e))?;
            match btf.member_type("mm_struct", path) {
                Ok(TypeInfo::Array {
                    nelems,
                    elem_size: 8,
                    ..
                }) if nelems as usize >= MM_COUNTERS => (count.offset, 8),
                Ok(other) => {
                    return Err(layout(format!(
                        "rss_stat.count is {other:?}, expected an array of at least \
                         {MM_COUNTERS} 8-byte counters"
                    )));
                }
                Err(e) => return Err(field_err(path, e)),
            }
        }
        TypeInfo::Array {
            nelems,
            elem_size,
            elem,
        } if nelems as usize >= MM_COUNTERS
            && matches!(&*elem, TypeInfo::Composite { kind: Kind::Struct, name, .. }
                                if name == "percpu_counter") =>
        {
            let count = fields::PERCPU_COUNTER_COUNT.resolve(btf)?;
            (rss.offset + count.offset, elem_size)
        }
        other => {
            return Err(layout(format!(
                "{other:?}, expected struct mm_rss_stat or an array of at least {MM_COUNTERS} \
                 struct percpu_counter"
            )));
        }
    };
    let mut out = [0; MM_COUNTERS];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u32::try_from(i)
            .ok()
            .and_then(|i| i.checked_mul(stride))
            .and_then(|o| o.checked_add(base))
            .ok_or_else(|| layout("offsets do not fit in 32 bits".to_owned()))?;
    }
    Ok(out)
}

/// Index of the `struct bio *` argument of the `block_bio_queue` raw tracepoint, or
/// [`ABSENT`] without that tracepoint. Found by type where the parameters name their structs,
/// else by count: `(q, bio)` before 5.11, `(bio)` since.
fn bio_queue_bio_arg(btf: &Btf) -> Result<u32, ResolveError> {
    const TP: &str = "block_bio_queue";
    let params = match btf.raw_tracepoint_params(TP) {
        Ok(params) => params,
        Err(BtfError::TracepointNotFound { .. }) => return Ok(ABSENT),
        Err(source) => {
            return Err(ResolveError::Tracepoint {
                tracepoint: TP,
                source: Box::new(source),
            });
        }
    };
    let by_type: Vec<usize> = (0..params.len())
        .filter(|&i| params[i].is_pointer_to_struct("bio"))
        .collect();
    Ok(match (by_type.as_slice(), params.len()) {
        (&[i], _) => i as u32,
        (&[], 1) => 0,
        (&[], 2) => 1,
        _ => ABSENT,
    })
}

/// What sessions read, in groups that are of use only whole: the process records (comm,
/// exit code, parent, leader), pid namespaces (`thread_pid`, `pid.numbers`), adoption (from a
/// /proc directory's file descriptor to its task), and exec records (argv, file name). A
/// group the kernel lacks is all [`ABSENT`]; the loader says what that costs.
struct Sessions {
    task: [u32; 4],
    pid_ns: [u32; 4],
    adopt: [u32; 9],
    exec: [u32; 3],
}

fn resolve_sessions(btf: &Btf) -> Result<Sessions, ResolveError> {
    use fields::*;
    let task = all_or_absent(
        btf,
        [
            TASK_EXIT_CODE,
            TASK_COMM,
            TASK_REAL_PARENT,
            TASK_GROUP_LEADER,
        ],
    )?;
    let ns = all_or_absent(btf, [TASK_THREAD_PID, PID_LEVEL, PID_NUMBERS, UPID_NR])?;
    // `upid.nr` must come first: the programs read `numbers[level]` as an int.
    let upid_size = match btf.struct_size("upid") {
        Ok(size) if ns[3] == 0 => size,
        _ => ABSENT,
    };
    let pid_ns = if upid_size == ABSENT {
        [ABSENT; 4]
    } else {
        [ns[0], ns[1], ns[2], upid_size]
    };
    let adopt = all_or_absent(
        btf,
        [
            PID_TASKS,
            TASK_PID_LINKS,
            TASK_FILES,
            FILES_FDT,
            FDT_FD,
            FDT_MAX_FDS,
            FILE_INODE,
            PROC_INODE_PID,
            PROC_INODE_VFS_INODE,
        ],
    )?;
    // Adoption finds a task's pid through the same namespace fields.
    let adopt = if pid_ns[0] == ABSENT || task[0] == ABSENT {
        [ABSENT; 9]
    } else {
        adopt
    };
    let exec = all_or_absent(btf, [MM_ARG_START, MM_ARG_END, BPRM_FILENAME])?;
    Ok(Sessions {
        task,
        pid_ns,
        adopt,
        exec,
    })
}

/// The socket layout the network handlers read: `socket.sk`, `sock`'s family, type and
/// protocol; all [`ABSENT`] unless every one is a whole member (not a bitfield, as `sk_type`
/// and `sk_protocol` were before 5.6).
fn socket_layout(btf: &Btf) -> Result<[u32; 4], ResolveError> {
    use fields::*;
    let mut out = [ABSENT; 4];
    for (slot, field) in out
        .iter_mut()
        .zip([SOCKET_SK, SK_FAMILY, SK_TYPE, SK_PROTOCOL])
    {
        match field.resolve_optional(btf) {
            Ok(Some(member)) => *slot = member.offset,
            Ok(None) => return Ok([ABSENT; 4]),
            Err(ResolveError::Field { source, .. })
                if matches!(*source, BtfError::Bitfield { .. }) =>
            {
                return Ok([ABSENT; 4]);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Which socket hooks the kernel offers (bits `cylo_usage_abi::net::HOOK_*`), told by BTF:
/// the `sock_send_length` / `sock_recv_length` tracepoints (6.3+) with `(sk, ret, flags)`;
/// the address families' `sendmsg` / `recvmsg` functions with the parameters the fallback
/// reads; whether `proto_ops` has `sendpage` (before 6.5), and the `*_sendpage` functions.
pub fn network_hooks(btf: &Btf) -> u32 {
    use cylo_usage_abi::{names, net};
    let tracepoint = |tp: &str| {
        btf.raw_tracepoint_params(tp)
            .is_ok_and(|p| p.len() == 3 && p[0].is_pointer_to_struct("sock"))
    };
    // A function with `count` parameters, the first a pointer to `struct <first>`.
    let function = |name: &str, count: usize, first: &str| {
        btf.function_params(name)
            .is_ok_and(|p| p.len() == count && p[0].is_pointer_to_struct(first))
    };
    let mut hooks = 0;
    if tracepoint(names::TP_SOCK_SEND_LENGTH) && tracepoint(names::TP_SOCK_RECV_LENGTH) {
        hooks |= net::HOOK_TRACEPOINTS;
    }
    // sendmsg(sock, msg, len), recvmsg(sock, msg, size, flags).
    let msg = names::FEXIT_SENDMSG
        .iter()
        .all(|&(_, f)| function(f, 3, "socket"))
        && names::FEXIT_RECVMSG
            .iter()
            .all(|&(_, f)| function(f, 4, "socket"));
    if msg {
        hooks |= net::HOOK_FEXIT_MSG;
    }
    if btf.has_member("proto_ops", "sendpage") {
        hooks |= net::HOOK_SENDPAGE_PATH;
    }
    // tcp_sendpage(sk, page, offset, size, flags), udp_sendpage(sk, ...),
    // unix_stream_sendpage(socket, ...).
    let [tcp, udp, unix] = names::FEXIT_SENDPAGE.map(|(_, f)| f);
    if function(tcp, 5, "sock") && function(udp, 5, "sock") && function(unix, 5, "socket") {
        hooks |= net::HOOK_FEXIT_SENDPAGE;
    }
    hooks
}

/// Resolves every offset the eBPF programs need from the given BTF.
pub fn resolve_offsets(btf: &Btf) -> Result<Offsets, ResolveError> {
    use fields::*;
    let state = TASK_STATE.resolve(btf)?;
    // sched_switch(preempt, prev, next[, prev_state]): prev_state came with 5.18.
    let switch_args = arg_count(btf, cylo_usage_abi::names::TP_SCHED_SWITCH)?;
    // rss_stat(mm, member[, count]): the count went with the percpu counters of 6.2.
    let rss_stat_has_count = match arg_count(btf, "rss_stat")? {
        3 => 1,
        2 => 0,
        n => {
            return Err(ResolveError::Layout {
                what: "raw tracepoint rss_stat",
                detail: format!("{n} arguments, expected 2 (mm, member) or 3 (.., count)"),
            });
        }
    };
    // The device of a bio: bi_bdev->bd_dev since 5.12, bi_disk and bi_partno before.
    let (bdev, disk) = if BIO_BDEV.resolve_optional(btf)?.is_some() {
        (all_or_absent(btf, [BIO_BDEV, BDEV_DEV])?, [ABSENT; 4])
    } else {
        let disk = [BIO_DISK, BIO_PARTNO, DISK_MAJOR, DISK_FIRST_MINOR];
        ([ABSENT; 2], all_or_absent(btf, disk)?)
    };
    let [socket_sk, sk_family, sk_type, sk_protocol] = socket_layout(btf)?;
    let sessions = resolve_sessions(btf)?;
    let [
        task_real_cred,
        cred_uid,
        cred_gid,
        cred_suid,
        cred_sgid,
        cred_euid,
        cred_egid,
    ] = all_or_absent(
        btf,
        [
            TASK_REAL_CRED,
            CRED_UID,
            CRED_GID,
            CRED_SUID,
            CRED_SGID,
            CRED_EUID,
            CRED_EGID,
        ],
    )?;
    let [
        task_exit_code,
        task_comm,
        task_real_parent,
        task_group_leader,
    ] = sessions.task;
    let [task_thread_pid, pid_level, pid_numbers, upid_size] = sessions.pid_ns;
    let [
        pid_tasks,
        task_pid_links,
        task_files,
        files_fdt,
        fdt_fd,
        fdt_max_fds,
        file_inode,
        proc_inode_pid,
        proc_inode_vfs_inode,
    ] = sessions.adopt;
    let [mm_arg_start, mm_arg_end, bprm_filename] = sessions.exec;
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
        net_hooks: network_hooks(btf),
        socket_sk,
        sk_family,
        sk_type,
        sk_protocol,
        switch_has_prev_state: u32::from(switch_args >= 4),
        task_dead: TASK_DEAD,
        signal_live: SIGNAL_LIVE.resolve(btf)?.offset,
        task_ioac_read_bytes: TASK_IOAC_READ_BYTES.offset_or_absent(btf)?,
        task_ioac_write_bytes: TASK_IOAC_WRITE_BYTES.offset_or_absent(btf)?,
        task_ioac_cancelled_write_bytes: TASK_IOAC_CANCELLED_WRITE_BYTES.offset_or_absent(btf)?,
        task_ioac_rchar: TASK_IOAC_RCHAR.offset_or_absent(btf)?,
        task_ioac_wchar: TASK_IOAC_WCHAR.offset_or_absent(btf)?,
        task_mm: TASK_MM.resolve(btf)?.offset,
        mm_rss: resolve_mm_rss(btf)?,
        rss_stat_has_count,
        bio_queue_bio_arg: bio_queue_bio_arg(btf)?,
        bio_size: BIO_SIZE.offset_or_absent(btf)?,
        bio_opf: BIO_OPF.offset_or_absent(btf)?,
        bio_bdev: bdev[0],
        bdev_dev: bdev[1],
        bio_disk: disk[0],
        bio_partno: disk[1],
        disk_major: disk[2],
        disk_first_minor: disk[3],
        task_exit_code,
        task_comm,
        task_real_parent,
        task_group_leader,
        task_thread_pid,
        pid_level,
        pid_numbers,
        upid_size,
        pid_tasks,
        task_pid_links,
        task_files,
        files_fdt,
        fdt_fd,
        fdt_max_fds,
        file_inode,
        proc_inode_pid,
        proc_inode_vfs_inode,
        mm_arg_start,
        mm_arg_end,
        bprm_filename,
        task_real_cred,
        cred_uid,
        cred_gid,
        cred_suid,
        cred_sgid,
        cred_euid,
        cred_egid,
        mm_flags: MM_FLAGS.offset_or_absent(btf)?,
        task_start_time: TASK_START_TIME.resolve(btf)?.offset,
        signal_sum_sched_runtime: SIGNAL_SUM_SCHED_RUNTIME.resolve(btf)?.offset,
        signal_utime: SIGNAL_UTIME.resolve(btf)?.offset,
        signal_stime: SIGNAL_STIME.resolve(btf)?.offset,
        signal_cutime: SIGNAL_CUTIME.resolve(btf)?.offset,
        signal_cstime: SIGNAL_CSTIME.resolve(btf)?.offset,
        signal_ioac_read_bytes: SIGNAL_IOAC_READ_BYTES.offset_or_absent(btf)?,
        signal_ioac_write_bytes: SIGNAL_IOAC_WRITE_BYTES.offset_or_absent(btf)?,
        signal_ioac_cancelled_write_bytes: SIGNAL_IOAC_CANCELLED_WRITE_BYTES
            .offset_or_absent(btf)?,
        signal_ioac_rchar: SIGNAL_IOAC_RCHAR.offset_or_absent(btf)?,
        signal_ioac_wchar: SIGNAL_IOAC_WCHAR.offset_or_absent(btf)?,
    })
}

/// The structs and unions [`resolve_offsets`] looks up by name (their members are reached
/// through type ids).
const STRUCTS: &[&str] = &[
    "task_struct",
    "signal_struct",
    "mm_struct",
    "percpu_counter",
    "bio",
    "block_device",
    "gendisk",
    "pid",
    "upid",
    "files_struct",
    "fdtable",
    "file",
    "proc_inode",
    "linux_binprm",
    "cred",
    "socket",
    "sock",
    "proto_ops",
];

/// The raw tracepoints [`resolve_offsets`] reads the prototypes of.
const TRACEPOINTS: &[&str] = &[
    cylo_usage_abi::names::TP_SCHED_SWITCH,
    cylo_usage_abi::names::TP_RSS_STAT,
    cylo_usage_abi::names::TP_BLOCK_BIO_QUEUE,
    cylo_usage_abi::names::TP_SOCK_SEND_LENGTH,
    cylo_usage_abi::names::TP_SOCK_RECV_LENGTH,
];

/// Calls `f` with every name [`resolve_offsets`] looks up, for [`Btf::open`] to note in its
/// one pass over the types. A name missing here still resolves, by a slower scan (the
/// fixture tests check that none is missing).
fn with_wanted<T>(f: impl FnOnce(&Wanted<'_>) -> T) -> T {
    use cylo_usage_abi::names;
    let functions: Vec<&str> = names::FEXIT_SENDMSG
        .iter()
        .chain(&names::FEXIT_RECVMSG)
        .chain(&names::FEXIT_SENDPAGE)
        .map(|&(_, function)| function)
        .collect();
    f(&Wanted {
        composites: STRUCTS,
        tracepoints: TRACEPOINTS,
        functions: &functions,
    })
}

/// Opens a raw BTF file for [`resolve_offsets`]: mapped where the kernel allows it, with the
/// names the resolver asks for found in one pass.
pub fn open_btf(path: &Path) -> Result<Btf, ResolveError> {
    with_wanted(|wanted| Btf::open(path, wanted)).map_err(|e| match e {
        BtfError::Io { path, source } => ResolveError::Read { path, source },
        source => ResolveError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        },
    })
}

/// Resolves the offsets from a raw BTF file. The BTF is dropped (and unmapped) before this
/// returns.
pub fn resolve_file(path: &Path) -> Result<Offsets, ResolveError> {
    resolve_offsets(&open_btf(path)?)
}

/// For tests only: a path read instead of [`VMLINUX_BTF_PATH`], to simulate a kernel
/// without BTF (`CYLO_USAGE_TEST_BTF=/nonexistent`). It can only make loading fail.
pub const TEST_BTF_PATH_ENV: &str = "CYLO_USAGE_TEST_BTF";

/// Resolves the offsets of the running kernel, from [`VMLINUX_BTF_PATH`] or, when this boot
/// already did, from the root-only cache in `/run/cylo-usage` (see `offsets_cache`); in
/// tests, from [`TEST_BTF_PATH_ENV`] without the cache.
pub fn resolve_host() -> Result<Offsets, ResolveError> {
    match std::env::var_os(TEST_BTF_PATH_ENV) {
        Some(path) => resolve_file(Path::new(&path)),
        None => resolve_cached(&Cache::system(), Path::new(VMLINUX_BTF_PATH)),
    }
}

/// The offsets `cache` holds for the BTF at `path`, else resolved from it and stored. A
/// cache that cannot be used or written only costs the resolving.
fn resolve_cached(cache: &Cache, path: &Path) -> Result<Offsets, ResolveError> {
    let key = Key::host(path).ok();
    if let Some(offsets) = key.as_ref().and_then(|key| cache.load(key).ok()) {
        return Ok(offsets);
    }
    let offsets = resolve_file(path)?;
    if let Some(key) = key {
        let _ = cache.store(&key, &offsets);
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests;
