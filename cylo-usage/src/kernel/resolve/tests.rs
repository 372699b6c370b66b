use super::*;
use crate::kernel::btf::testutil::{Builder, FWD, STRUCT};
use cylo_usage_abi::net::{
    HOOK_FEXIT_MSG as FEXIT_MSG, HOOK_FEXIT_SENDPAGE as FEXIT_SENDPAGE,
    HOOK_SENDPAGE_PATH as SENDPAGE_PATH, HOOK_TRACEPOINTS as TRACEPOINTS,
};

fn fixture(name: &str) -> Btf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/btf")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    with_wanted(|w| Btf::from_bytes_wanting(&bytes, w))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Expected numbers: gcc `offsetof` over `bpftool btf dump file FULL format c` of each
    /// kernel's complete BTF (with its 1-byte enums marked packed again, and gcc's struct sizes
    /// asserted equal to the BTF's), and the `btf_trace_*` prototypes read off the same dump
    /// (see tests/fixtures/btf/README.md). `signal_live` is 4 everywhere
    /// (`refcount_t sigcnt; atomic_t live;`), and so is `pid_level` (`refcount_t count;
    /// unsigned int level;`); `struct upid` is `{ int nr; struct pid_namespace *ns; }` (16).
    #[rustfmt::skip]
    const EXPECTED: [(&str, Offsets); 4] = [
        ("debian-5.10.btf", Offsets {
            task_pid: 2232, task_tgid: 2236, task_signal: 2832, task_start_boottime: 2544,
            task_sum_exec_runtime: 200, task_utime: 2472, task_stime: 2480,
            // `volatile long state` before 5.14; sched_switch without prev_state before 5.18.
            task_state: 16, task_state_size: 8, switch_has_prev_state: 0,
            task_dead: 0x80, signal_live: 4,
            task_ioac_read_bytes: 3128, task_ioac_write_bytes: 3136,
            task_ioac_cancelled_write_bytes: 3144, task_ioac_rchar: 3096, task_ioac_wchar: 3104,
            task_mm: 2056,
            // struct mm_rss_stat { atomic_long_t count[4]; }; rss_stat(mm, member, count).
            mm_rss: [712, 720, 728, 736], rss_stat_has_count: 1,
            // block_bio_queue(q, bio); bio.bi_disk/bi_partno, no bi_bdev before 5.12.
            bio_queue_bio_arg: 1, bio_size: 40, bio_opf: 16,
            bio_bdev: ABSENT, bdev_dev: ABSENT,
            bio_disk: 8, bio_partno: 27, disk_major: 0, disk_first_minor: 4,
            task_exit_code: 2136, task_comm: 2736, task_real_parent: 2248,
            task_group_leader: 2296,
            // `struct upid numbers[1]` (16 bytes) here, a flexible array (0 bytes) on the others.
            task_thread_pid: 2336, pid_level: 4, pid_numbers: 96, upid_size: 16,
            pid_tasks: 16, task_pid_links: 2344, task_files: 2808, files_fdt: 32, fdt_fd: 8,
            fdt_max_fds: 0, file_inode: 32, proc_inode_pid: 0, proc_inode_vfs_inode: 72,
            mm_arg_start: 312, mm_arg_end: 320, bprm_filename: 96,
            // No sock_*_length tracepoints; the family functions, and sendpage.
            net_hooks: FEXIT_MSG | SENDPAGE_PATH | FEXIT_SENDPAGE,
            socket_sk: 24, sk_family: 16, sk_type: 538, sk_protocol: 540,
            // The fixtures do not carry `struct cred`: its ids are all ABSENT.
            task_real_cred: ABSENT, cred_uid: ABSENT, cred_gid: ABSENT, cred_suid: ABSENT,
            cred_sgid: ABSENT, cred_euid: ABSENT, cred_egid: ABSENT, mm_flags: 880,
            // signal_struct: `u64 utime, stime, cutime, cstime;` ... `struct task_io_accounting
            // ioac; unsigned long long sum_sched_runtime;`; start_time just before start_boottime.
            task_start_time: 2536, signal_utime: 424, signal_stime: 432, signal_cutime: 440,
            signal_cstime: 448, signal_sum_sched_runtime: 664, signal_ioac_rchar: 608,
            signal_ioac_wchar: 616, signal_ioac_read_bytes: 640, signal_ioac_write_bytes: 648,
            signal_ioac_cancelled_write_bytes: 656,
        }),
        ("debian-6.1.btf", Offsets {
            task_pid: 2416, task_tgid: 2420, task_signal: 3072, task_start_boottime: 2784,
            task_sum_exec_runtime: 200, task_utime: 2656, task_stime: 2664,
            task_state: 24, task_state_size: 4, switch_has_prev_state: 1,
            task_dead: 0x80, signal_live: 4,
            task_ioac_read_bytes: 3400, task_ioac_write_bytes: 3408,
            task_ioac_cancelled_write_bytes: 3416, task_ioac_rchar: 3368, task_ioac_wchar: 3376,
            task_mm: 2272,
            mm_rss: [728, 736, 744, 752], rss_stat_has_count: 1,
            bio_queue_bio_arg: 0, bio_size: 40, bio_opf: 16,
            bio_bdev: 8, bdev_dev: 36,
            bio_disk: ABSENT, bio_partno: ABSENT, disk_major: ABSENT, disk_first_minor: ABSENT,
            task_exit_code: 2312, task_comm: 2976, task_real_parent: 2432,
            task_group_leader: 2480,
            task_thread_pid: 2520, pid_level: 4, pid_numbers: 96, upid_size: 16,
            pid_tasks: 16, task_pid_links: 2528, task_files: 3048, files_fdt: 32, fdt_fd: 8,
            fdt_max_fds: 0, file_inode: 32, proc_inode_pid: 0, proc_inode_vfs_inode: 72,
            mm_arg_start: 312, mm_arg_end: 320, bprm_filename: 96,
            net_hooks: FEXIT_MSG | SENDPAGE_PATH | FEXIT_SENDPAGE,
            socket_sk: 24, sk_family: 16, sk_type: 514, sk_protocol: 516,
            // The fixtures do not carry `struct cred`: its ids are all ABSENT.
            task_real_cred: ABSENT, cred_uid: ABSENT, cred_gid: ABSENT, cred_suid: ABSENT,
            cred_sgid: ABSENT, cred_euid: ABSENT, cred_egid: ABSENT, mm_flags: 904,
            // signal_struct: `u64 utime, stime, cutime, cstime;` ... `struct task_io_accounting
            // ioac; unsigned long long sum_sched_runtime;`; start_time just before start_boottime.
            task_start_time: 2776, signal_utime: 440, signal_stime: 448, signal_cutime: 456,
            signal_cstime: 464, signal_sum_sched_runtime: 680, signal_ioac_rchar: 624,
            signal_ioac_wchar: 632, signal_ioac_read_bytes: 656, signal_ioac_write_bytes: 664,
            signal_ioac_cancelled_write_bytes: 672,
        }),
        ("debian-6.12.btf", Offsets {
            task_pid: 2432, task_tgid: 2436, task_signal: 3072, task_start_boottime: 2784,
            task_sum_exec_runtime: 224, task_utime: 2656, task_stime: 2664,
            task_state: 24, task_state_size: 4, switch_has_prev_state: 1,
            task_dead: 0x80, signal_live: 4,
            task_ioac_read_bytes: 3392, task_ioac_write_bytes: 3400,
            task_ioac_cancelled_write_bytes: 3408, task_ioac_rchar: 3360, task_ioac_wchar: 3368,
            task_mm: 2304,
            // struct percpu_counter rss_stat[4] (40 bytes, count at 8); rss_stat(mm, member).
            mm_rss: [832, 872, 912, 952], rss_stat_has_count: 0,
            bio_queue_bio_arg: 0, bio_size: 40, bio_opf: 16,
            bio_bdev: 8, bdev_dev: 52,
            bio_disk: ABSENT, bio_partno: ABSENT, disk_major: ABSENT, disk_first_minor: ABSENT,
            task_exit_code: 2332, task_comm: 2976, task_real_parent: 2448,
            task_group_leader: 2496,
            // struct pid gained `stashed` and `ino` before tasks; struct file was reordered.
            task_thread_pid: 2536, pid_level: 4, pid_numbers: 112, upid_size: 16,
            pid_tasks: 32, task_pid_links: 2544, task_files: 3048, files_fdt: 32, fdt_fd: 8,
            fdt_max_fds: 0, file_inode: 40, proc_inode_pid: 0, proc_inode_vfs_inode: 72,
            mm_arg_start: 376, mm_arg_end: 384, bprm_filename: 96,
            // The tracepoints; sendpage is gone (splice into a socket is a sendmsg since 6.5).
            net_hooks: TRACEPOINTS | FEXIT_MSG,
            socket_sk: 24, sk_family: 16, sk_type: 572, sk_protocol: 574,
            // The fixtures do not carry `struct cred`: its ids are all ABSENT.
            task_real_cred: ABSENT, cred_uid: ABSENT, cred_gid: ABSENT, cred_suid: ABSENT,
            cred_sgid: ABSENT, cred_euid: ABSENT, cred_egid: ABSENT, mm_flags: 1128,
            // signal_struct: `u64 utime, stime, cutime, cstime;` ... `struct task_io_accounting
            // ioac; unsigned long long sum_sched_runtime;`; start_time just before start_boottime.
            task_start_time: 2776, signal_utime: 432, signal_stime: 440, signal_cutime: 448,
            signal_cstime: 456, signal_sum_sched_runtime: 672, signal_ioac_rchar: 616,
            signal_ioac_wchar: 624, signal_ioac_read_bytes: 648, signal_ioac_write_bytes: 656,
            signal_ioac_cancelled_write_bytes: 664,
        }),
        ("host-6.18.btf", Offsets {
            task_pid: 1264, task_tgid: 1268, task_signal: 1848, task_start_boottime: 1560,
            task_sum_exec_runtime: 232, task_utime: 1488, task_stime: 1496,
            task_state: 24, task_state_size: 4, switch_has_prev_state: 1,
            task_dead: 0x80, signal_live: 4,
            task_ioac_read_bytes: 2184, task_ioac_write_bytes: 2192,
            task_ioac_cancelled_write_bytes: 2200, task_ioac_rchar: 2152, task_ioac_wchar: 2160,
            task_mm: 1136,
            mm_rss: [968, 1008, 1048, 1088], rss_stat_has_count: 0,
            bio_queue_bio_arg: 0, bio_size: 40, bio_opf: 16,
            bio_bdev: 8, bdev_dev: 52,
            bio_disk: ABSENT, bio_partno: ABSENT, disk_major: ABSENT, disk_first_minor: ABSENT,
            task_exit_code: 1164, task_comm: 1752, task_real_parent: 1280,
            task_group_leader: 1328,
            // struct pid: an anonymous struct (ino, pidfs_node, stashed, attr) before tasks.
            task_thread_pid: 1368, pid_level: 4, pid_numbers: 144, upid_size: 16,
            pid_tasks: 64, task_pid_links: 1376, task_files: 1824, files_fdt: 32, fdt_fd: 8,
            fdt_max_fds: 0, file_inode: 32, proc_inode_pid: 0, proc_inode_vfs_inode: 72,
            mm_arg_start: 480, mm_arg_end: 488, bprm_filename: 96,
            // sk_protocol and sk_type in the other order than on 6.12.
            net_hooks: TRACEPOINTS | FEXIT_MSG,
            socket_sk: 24, sk_family: 16, sk_type: 534, sk_protocol: 532,
            // The fixtures do not carry `struct cred`: its ids are all ABSENT.
            task_real_cred: ABSENT, cred_uid: ABSENT, cred_gid: ABSENT, cred_suid: ABSENT,
            cred_sgid: ABSENT, cred_euid: ABSENT, cred_egid: ABSENT, mm_flags: 1272,
            // signal_struct: `u64 utime, stime, cutime, cstime;` ... `struct task_io_accounting
            // ioac; unsigned long long sum_sched_runtime;`; start_time just before start_boottime.
            task_start_time: 1552, signal_utime: 432, signal_stime: 440, signal_cutime: 448,
            signal_cstime: 456, signal_sum_sched_runtime: 672, signal_ioac_rchar: 616,
            signal_ioac_wchar: 624, signal_ioac_read_bytes: 648, signal_ioac_write_bytes: 656,
            signal_ioac_cancelled_write_bytes: 664,
        }),
    ];
/// `uname -r` of the machine `host-6.18.btf` was taken from.
const HOST_FIXTURE_RELEASE: &str = "6.18.44-fc-v657";

#[test]
fn fixtures_resolve_exactly() {
    for (file, want) in EXPECTED {
        let btf = fixture(file);
        let got = resolve_offsets(&btf).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(got, want, "{file}");
        // Every name the resolver asks for was noted by the one pass.
        assert_eq!(btf.scans(), 0, "{file}: a name is missing from with_wanted");
    }
}

/// Without the wanted names (every lookup a scan), the same offsets.
#[test]
fn fixtures_resolve_the_same_without_wanted_names() {
    for (file, want) in EXPECTED {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/btf")
            .join(file);
        let btf = Btf::from_file(&path).unwrap();
        assert_eq!(resolve_offsets(&btf).unwrap(), want, "{file}");
        assert!(btf.scans() > 0);
    }
}

/// The host's BTF, opened as the tracker opens it (mapped on 6.16+, targeted), resolves
/// as a plain read of the whole file with every lookup a scan does.
#[test]
fn host_btf_opened_targeted_resolves_as_a_full_read() {
    let path = Path::new(VMLINUX_BTF_PATH);
    let Ok(bytes) = std::fs::read(path) else {
        eprintln!("skipping: {VMLINUX_BTF_PATH} is absent on this machine");
        return;
    };
    let targeted = open_btf(path).unwrap();
    let plain = Btf::from_bytes(&bytes).unwrap();
    assert_eq!(
        resolve_offsets(&targeted).unwrap(),
        resolve_offsets(&plain).unwrap()
    );
    assert_eq!(targeted.scans(), 0);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut version = release.trim().split(['.', '-']).map(|p| p.parse::<u32>());
    if let (Some(Ok(major)), Some(Ok(minor))) = (version.next(), version.next())
        && (major, minor) >= (6, 16)
    {
        assert!(
            targeted.is_mapped(),
            "{release}: sysfs BTF can be mapped since 6.16"
        );
    }
}

/// `task_struct.real_cred` resolves on every fixture (which do not carry `struct cred`,
/// so that the group is ABSENT there); on this machine's own BTF the whole group
/// resolves, in the order `struct cred` has kept since 2.6.29: uid, gid, suid, sgid, euid,
/// egid, one `kuid_t`/`kgid_t` (4 bytes) after the other.
#[test]
fn credentials_resolve_on_every_fixture_and_the_host() {
    let want = [2712, 2952, 2952, 1728];
    for ((file, _), real_cred) in EXPECTED.iter().zip(want) {
        let btf = fixture(file);
        assert_eq!(
            fields::TASK_REAL_CRED.resolve(&btf).unwrap().offset,
            real_cred
        );
    }
    let Ok(btf) = Btf::from_file(Path::new(VMLINUX_BTF_PATH)) else {
        eprintln!("skipping the host part: {VMLINUX_BTF_PATH} is absent on this machine");
        return;
    };
    let o = resolve_offsets(&btf).unwrap();
    assert_ne!(o.task_real_cred, ABSENT);
    assert_ne!(o.mm_flags, ABSENT);
    let ids = [
        o.cred_uid,
        o.cred_gid,
        o.cred_suid,
        o.cred_sgid,
        o.cred_euid,
        o.cred_egid,
    ];
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(*id, o.cred_uid + 4 * i as u32, "{ids:?}");
    }
}

#[test]
fn fields_for_later_resolve_on_every_fixture() {
    // mm_struct.hiwater_rss, checked like EXPECTED.
    let want = [176, 176, 240, 344];
    for ((file, _), hiwater) in EXPECTED.iter().zip(want) {
        let btf = fixture(file);
        let got = fields::MM_HIWATER_RSS.resolve(&btf).unwrap();
        assert_eq!(got.offset, hiwater, "{file}");
    }
}

/// How a synthetic `mm_struct` holds its RSS counters.
#[derive(Clone, Copy)]
enum Rss {
    /// `struct mm_rss_stat { atomic_long_t count[4]; } rss_stat`, in an anonymous struct,
    /// and `rss_stat(mm, member, count)`: before 6.2.
    Counts,
    /// `struct percpu_counter rss_stat[4]`, in an anonymous struct, and
    /// `rss_stat(mm, member)`: since 6.2.
    PerCpu,
    /// `rss_stat` as the given kind of unexpected array of `elems` `elem_size`-byte ints.
    Odd { elems: u32, elem_size: u32 },
}

/// How a synthetic kernel describes block I/O.
#[derive(Clone, Copy)]
enum Block {
    /// No `struct bio`, no `block_bio_queue`.
    None,
    /// 5.12+: `bio.bi_bdev`, `block_bio_queue(struct bio *)`.
    Bdev,
    /// Before 5.11: `bio.bi_disk`, `block_bio_queue(q, bio)`; `typed` keeps the parameter
    /// types (`struct request_queue *` forward-declared), else both are `void *`.
    Disk { typed: bool },
}

/// How a synthetic kernel describes sockets.
#[derive(Clone, Copy)]
enum Net {
    /// No `struct socket` or `struct sock`, no hooks.
    None,
    /// 6.5+: the `sock_*_length(sk, ret, flags)` tracepoints; no `proto_ops.sendpage`.
    Tracepoints,
    /// Before 6.3: the families' functions; `proto_ops.sendpage` and the `*_sendpage`
    /// functions unless `sendpage` is false (then only the `proto_ops` member).
    Functions { sendpage: bool },
    /// Before 5.6: `sk_type` and `sk_protocol` are bitfields.
    Bitfields,
}

/// A synthetic kernel; [`Synth::default`] resolves completely, except for the session
/// groups, whose structs it does not have (see [`session_groups`]).
#[derive(Clone, Copy)]
struct Synth {
    state: (&'static str, u32),
    start: &'static str,
    pid_size: u32,
    switch_args: usize,
    /// Members of `task_io_accounting`, 8 bytes each, in order from offset 0.
    ioac: &'static [&'static str],
    rss: Rss,
    block: Block,
    net: Net,
    /// `Some(offset of upid.nr)`: `task_struct.thread_pid`, `struct pid` with `level` and
    /// `numbers[1]`, and `struct upid` (the pid-namespace group). `None`: none of them.
    upid_nr: Option<u32>,
}

const ALL_IOAC: &[&str] = &[
    "rchar",
    "wchar",
    "syscr",
    "syscw",
    "read_bytes",
    "write_bytes",
    "cancelled_write_bytes",
];
/// `task_struct.ioac` in the synthetic kernel.
const SYNTH_IOAC: u32 = 112;

impl Default for Synth {
    fn default() -> Synth {
        Synth {
            state: ("__state", 4),
            start: "start_boottime",
            pid_size: 4,
            switch_args: 4,
            ioac: ALL_IOAC,
            rss: Rss::PerCpu,
            block: Block::Bdev,
            net: Net::Tracepoints,
            upid_nr: None,
        }
    }
}

impl Synth {
    fn build(self) -> Btf {
        let mut b = Builder::new();
        let int4 = b.int("int", 4);
        let u64_ = b.int("long long unsigned int", 8);
        let u8_ = b.int("unsigned char", 1);
        let pid = b.int("pid_int", self.pid_size);
        let st = b.int("state_int", self.state.1);
        let void_ptr = b.ptr(0);
        let se = b.composite(STRUCT, "sched_entity", 16, &[("sum_exec_runtime", u64_, 8)]);
        let ioac: Vec<_> = (0u32..)
            .zip(self.ioac)
            .map(|(i, &name)| (name, u64_, 8 * i))
            .collect();
        let ioac_size = 8 * ioac.len() as u32;
        let ioac = b.composite(STRUCT, "task_io_accounting", ioac_size, &ioac);
        let signal = [
            ("sigcnt", int4, 0),
            ("live", int4, 4),
            ("utime", u64_, 8),
            ("stime", u64_, 16),
            ("cutime", u64_, 24),
            ("cstime", u64_, 32),
            ("sum_sched_runtime", u64_, 40),
            ("ioac", ioac, 48),
        ];
        b.composite(STRUCT, "signal_struct", 48 + ioac_size, &signal);

        let rss_stat = match self.rss {
            Rss::Counts => {
                // typedef struct { s64 counter; } atomic_long_t;
                let counter = b.composite(STRUCT, "", 8, &[("counter", u64_, 0)]);
                let atomic = b.typedef("atomic_long_t", counter);
                let count = b.array(atomic, int4, 4);
                b.composite(STRUCT, "mm_rss_stat", 32, &[("count", count, 0)])
            }
            Rss::PerCpu => {
                let pc = b.composite(
                    STRUCT,
                    "percpu_counter",
                    40,
                    &[
                        ("lock", int4, 0),
                        ("count", u64_, 8),
                        ("counters", void_ptr, 32),
                    ],
                );
                b.array(pc, int4, 4)
            }
            Rss::Odd { elems, elem_size } => {
                let elem = b.int("odd_int", elem_size);
                b.array(elem, int4, elems)
            }
        };
        let anon = b.composite(
            STRUCT,
            "",
            176,
            &[("hiwater_rss", u64_, 0), ("rss_stat", rss_stat, 16)],
        );
        let mm = b.composite(STRUCT, "mm_struct", 192, &[("", anon, 8)]);
        let mm_ptr = b.ptr(mm);

        let mut task = vec![
            (self.state.0, st, 16),
            ("se", se, 32),
            ("pid", pid, 56),
            ("tgid", int4, 64),
            ("signal", void_ptr, 72),
            (self.start, u64_, 80),
            ("utime", u64_, 88),
            ("stime", u64_, 96),
            ("mm", mm_ptr, 104),
            ("ioac", ioac, SYNTH_IOAC),
            ("start_time", u64_, 48),
        ];
        if let Some(nr) = self.upid_nr {
            // struct upid { int nr; struct pid_namespace *ns; }, or with `nr` elsewhere.
            let ns = if nr == 0 { 8 } else { 0 };
            let upid = b.composite(
                STRUCT,
                "upid",
                16,
                &[("nr", int4, nr), ("ns", void_ptr, ns)],
            );
            let numbers = b.array(upid, int4, 1);
            let pid = b.composite(
                STRUCT,
                "pid",
                32,
                &[
                    ("count", int4, 0),
                    ("level", int4, 4),
                    ("numbers", numbers, 16),
                ],
            );
            task.push(("thread_pid", b.ptr(pid), 0));
        }
        b.composite(STRUCT, "task_struct", SYNTH_IOAC + ioac_size, &task);
        let mut params = vec![void_ptr];
        params.resize(self.switch_args + 1, int4);
        b.tracepoint("sched_switch", &params);
        match self.rss {
            Rss::Counts => b.tracepoint("rss_stat", &[void_ptr, mm_ptr, int4, u64_]),
            _ => b.tracepoint("rss_stat", &[void_ptr, mm_ptr, int4]),
        };

        let iter = b.composite(
            STRUCT,
            "bvec_iter",
            16,
            &[("bi_sector", u64_, 0), ("bi_size", int4, 8)],
        );
        match self.block {
            Block::None => {}
            Block::Bdev => {
                let bdev = b.composite(STRUCT, "block_device", 64, &[("bd_dev", int4, 52)]);
                let bdev_ptr = b.ptr(bdev);
                let bio = b.composite(
                    STRUCT,
                    "bio",
                    128,
                    &[
                        ("bi_bdev", bdev_ptr, 8),
                        ("bi_opf", int4, 16),
                        ("bi_iter", iter, 44),
                    ],
                );
                let bio_ptr = b.ptr(bio);
                b.tracepoint("block_bio_queue", &[void_ptr, bio_ptr]);
            }
            Block::Disk { typed } => {
                let disk = b.composite(
                    STRUCT,
                    "gendisk",
                    64,
                    &[("major", int4, 0), ("first_minor", int4, 4)],
                );
                let disk_ptr = b.ptr(disk);
                let bio = b.composite(
                    STRUCT,
                    "bio",
                    128,
                    &[
                        ("bi_disk", disk_ptr, 8),
                        ("bi_opf", int4, 16),
                        ("bi_partno", u8_, 27),
                        ("bi_iter", iter, 32),
                    ],
                );
                let (q, bio) = if typed {
                    let q = b.raw("request_queue", FWD, 0, false, 0, &[]);
                    (b.ptr(q), b.ptr(bio))
                } else {
                    (void_ptr, void_ptr)
                };
                b.tracepoint("block_bio_queue", &[void_ptr, q, bio]);
            }
        }
        self.build_net(&mut b, int4);
        Btf::from_bytes(&b.build()).unwrap()
    }

    /// `struct sock_common` (family at 16), `struct sock` (type at 540, protocol at 542),
    /// `struct socket` (sk at 24), and the hooks of [`Synth::net`].
    fn build_net(self, b: &mut Builder, int4: u32) {
        let u16_ = b.int("short unsigned int", 2);
        let void_ptr = b.ptr(0);
        let sock = match self.net {
            Net::None => return,
            Net::Bitfields => {
                // kind_flag members: bitfield size << 24 | bit offset.
                let common = b.composite(STRUCT, "sock_common", 136, &[("skc_family", u16_, 16)]);
                let words = [
                    b.str("__sk_common"),
                    common,
                    0,
                    b.str("sk_type"),
                    u16_,
                    (16 << 24) | (540 * 8),
                    b.str("sk_protocol"),
                    u16_,
                    (8 << 24) | (542 * 8),
                ];
                b.raw("sock", STRUCT, 3, true, 768, &words)
            }
            _ => {
                let common = b.composite(STRUCT, "sock_common", 136, &[("skc_family", u16_, 16)]);
                b.composite(
                    STRUCT,
                    "sock",
                    768,
                    &[
                        ("__sk_common", common, 0),
                        ("sk_type", u16_, 540),
                        ("sk_protocol", u16_, 542),
                    ],
                )
            }
        };
        let sock_ptr = b.ptr(sock);
        let socket = b.composite(
            STRUCT,
            "socket",
            128,
            &[("state", int4, 0), ("sk", sock_ptr, 24)],
        );
        let socket_ptr = b.ptr(socket);
        let sendpage = matches!(self.net, Net::Functions { .. } | Net::Bitfields);
        let mut ops = vec![("sendmsg", void_ptr, 0)];
        if sendpage {
            ops.push(("sendpage", void_ptr, 8));
        }
        b.composite(STRUCT, "proto_ops", 16, &ops);
        if matches!(self.net, Net::Tracepoints) {
            for tp in ["sock_send_length", "sock_recv_length"] {
                b.tracepoint(tp, &[void_ptr, sock_ptr, int4, int4]);
            }
        }
        for (_, f) in cylo_usage_abi::names::FEXIT_SENDMSG {
            b.function(f, int4, &[socket_ptr, void_ptr, int4]);
        }
        for (_, f) in cylo_usage_abi::names::FEXIT_RECVMSG {
            b.function(f, int4, &[socket_ptr, void_ptr, int4, int4]);
        }
        if matches!(self.net, Net::Functions { sendpage: true } | Net::Bitfields) {
            let [tcp, udp, unix] = cylo_usage_abi::names::FEXIT_SENDPAGE.map(|(_, f)| f);
            let page = [void_ptr, int4, int4, int4];
            for (f, first) in [(tcp, sock_ptr), (udp, sock_ptr), (unix, socket_ptr)] {
                let mut params = vec![first];
                params.extend(page);
                b.function(f, int4, &params);
            }
        }
    }
}

/// A synthetic kernel that differs from the default in its task_struct only.
fn synthetic(
    state: (&'static str, u32),
    start: &'static str,
    pid_size: u32,
    switch_args: usize,
) -> Btf {
    Synth {
        state,
        start,
        pid_size,
        switch_args,
        ..Synth::default()
    }
    .build()
}

#[test]
fn synthetic_kernel_resolves_completely() {
    let got = resolve_offsets(&Synth::default().build()).unwrap();
    let io = SYNTH_IOAC;
    assert_eq!(
        [
            got.task_ioac_rchar,
            got.task_ioac_wchar,
            got.task_ioac_read_bytes,
            got.task_ioac_write_bytes,
            got.task_ioac_cancelled_write_bytes,
        ],
        [io, io + 8, io + 32, io + 40, io + 48]
    );
    assert_eq!(got.task_mm, 104);
    assert_eq!(got.task_start_time, 48);
    assert_eq!(
        [
            got.signal_utime,
            got.signal_stime,
            got.signal_cutime,
            got.signal_cstime,
            got.signal_sum_sched_runtime,
        ],
        [8, 16, 24, 32, 40]
    );
    assert_eq!(
        [
            got.signal_ioac_rchar,
            got.signal_ioac_wchar,
            got.signal_ioac_read_bytes,
            got.signal_ioac_write_bytes,
            got.signal_ioac_cancelled_write_bytes,
        ],
        [48, 56, 80, 88, 96]
    );
    // anonymous struct at 8, rss_stat at +16, 40-byte counters with count at 8.
    assert_eq!(got.mm_rss, [32, 72, 112, 152]);
    assert_eq!(got.rss_stat_has_count, 0);
    assert_eq!(
        (got.bio_queue_bio_arg, got.bio_size, got.bio_opf),
        (0, 52, 16)
    );
    assert_eq!((got.bio_bdev, got.bdev_dev), (8, 52));
    assert_eq!(
        [
            got.bio_disk,
            got.bio_partno,
            got.disk_major,
            got.disk_first_minor
        ],
        [ABSENT; 4]
    );
}

/// The session fields of `o`, in the groups `resolve_sessions` resolves all or nothing:
/// (process, pid namespace, adoption, exec).
fn session_groups(o: &Offsets) -> ([u32; 4], [u32; 4], [u32; 9], [u32; 3]) {
    (
        [
            o.task_exit_code,
            o.task_comm,
            o.task_real_parent,
            o.task_group_leader,
        ],
        [o.task_thread_pid, o.pid_level, o.pid_numbers, o.upid_size],
        [
            o.pid_tasks,
            o.task_pid_links,
            o.task_files,
            o.files_fdt,
            o.fdt_fd,
            o.fdt_max_fds,
            o.file_inode,
            o.proc_inode_pid,
            o.proc_inode_vfs_inode,
        ],
        [o.mm_arg_start, o.mm_arg_end, o.bprm_filename],
    )
}

#[test]
fn a_kernel_without_the_session_structs_has_every_session_field_absent() {
    let got = resolve_offsets(&Synth::default().build()).unwrap();
    assert_eq!(
        session_groups(&got),
        ([ABSENT; 4], [ABSENT; 4], [ABSENT; 9], [ABSENT; 3])
    );
}

#[test]
fn pid_namespaces_need_upid_nr_first() {
    let with_nr_at = |nr| Synth {
        upid_nr: Some(nr),
        ..Synth::default()
    };
    let got = resolve_offsets(&with_nr_at(0).build()).unwrap();
    // thread_pid at 0, pid.level at 4, pid.numbers at 16, sizeof(struct upid) 16.
    assert_eq!(session_groups(&got).1, [0, 4, 16, 16]);
    // The programs read `numbers[level]` as an int: with `nr` elsewhere, the group is
    // absent rather than wrong (and not an error).
    let got = resolve_offsets(&with_nr_at(8).build()).unwrap();
    assert_eq!(session_groups(&got).1, [ABSENT; 4]);
    // Everything else still resolves.
    assert_eq!((got.task_mm, got.mm_rss), (104, [32, 72, 112, 152]));
}

#[test]
fn network_hooks_and_socket_layout() {
    let layout = |o: &Offsets| [o.socket_sk, o.sk_family, o.sk_type, o.sk_protocol];
    let got = resolve_offsets(&Synth::default().build()).unwrap();
    assert_eq!(got.net_hooks, TRACEPOINTS | FEXIT_MSG);
    assert_eq!(layout(&got), [24, 16, 540, 542]);
    let old = |net| {
        let synth = Synth {
            net,
            ..Synth::default()
        };
        resolve_offsets(&synth.build()).unwrap()
    };
    let got = old(Net::Functions { sendpage: true });
    assert_eq!(got.net_hooks, FEXIT_MSG | SENDPAGE_PATH | FEXIT_SENDPAGE);
    assert_eq!(layout(&got), [24, 16, 540, 542]);
    // A sendpage path without the functions the fallback hooks there.
    let got = old(Net::Functions { sendpage: false });
    assert_eq!(got.net_hooks, FEXIT_MSG | SENDPAGE_PATH);
    // No sockets at all: nothing to hook, nothing to read; everything else resolves.
    let got = old(Net::None);
    assert_eq!((got.net_hooks, layout(&got)), (0, [ABSENT; 4]));
    assert_eq!(got.mm_rss, [32, 72, 112, 152]);
    // Bitfields cannot be read: the layout is absent, not an error.
    let got = old(Net::Bitfields);
    assert_eq!(layout(&got), [ABSENT; 4]);
    assert_eq!(got.net_hooks, FEXIT_MSG | SENDPAGE_PATH | FEXIT_SENDPAGE);
}

#[test]
fn missing_io_counters_are_absent_not_errors() {
    // No CONFIG_TASK_XACCT: no rchar/wchar/syscr/syscw.
    let no_xacct = Synth {
        ioac: &["read_bytes", "write_bytes", "cancelled_write_bytes"],
        ..Synth::default()
    };
    let got = resolve_offsets(&no_xacct.build()).unwrap();
    assert_eq!((got.task_ioac_rchar, got.task_ioac_wchar), (ABSENT, ABSENT));
    let io = SYNTH_IOAC;
    assert_eq!(
        [
            got.task_ioac_read_bytes,
            got.task_ioac_write_bytes,
            got.task_ioac_cancelled_write_bytes,
        ],
        [io, io + 8, io + 16]
    );
    // Only rchar missing.
    let no_rchar = Synth {
        ioac: &ALL_IOAC[1..],
        ..Synth::default()
    };
    let got = resolve_offsets(&no_rchar.build()).unwrap();
    assert_eq!((got.task_ioac_rchar, got.task_ioac_wchar), (ABSENT, io));
    // No CONFIG_TASK_IO_ACCOUNTING: no read_bytes/write_bytes/cancelled_write_bytes.
    let no_io_acct = Synth {
        ioac: &ALL_IOAC[..4],
        ..Synth::default()
    };
    let got = resolve_offsets(&no_io_acct.build()).unwrap();
    assert_eq!((got.task_ioac_rchar, got.task_ioac_wchar), (io, io + 8));
    assert_eq!(
        [
            got.task_ioac_read_bytes,
            got.task_ioac_write_bytes,
            got.task_ioac_cancelled_write_bytes,
        ],
        [ABSENT; 3]
    );
    // No block layer at all.
    let no_block = Synth {
        block: Block::None,
        ..Synth::default()
    };
    let got = resolve_offsets(&no_block.build()).unwrap();
    assert_eq!(
        [
            got.bio_queue_bio_arg,
            got.bio_size,
            got.bio_opf,
            got.bio_bdev,
            got.bdev_dev,
            got.bio_disk,
            got.bio_partno,
            got.disk_major,
            got.disk_first_minor,
        ],
        [ABSENT; 9]
    );
    // Everything else still resolves.
    assert_eq!(got.mm_rss, [32, 72, 112, 152]);
}

#[test]
fn both_rss_layouts() {
    // Before 6.2: anonymous struct at 8, rss_stat at +16, then 8-byte atomic_long_t.
    let old = Synth {
        rss: Rss::Counts,
        ..Synth::default()
    };
    let got = resolve_offsets(&old.build()).unwrap();
    assert_eq!((got.mm_rss, got.rss_stat_has_count), ([24, 32, 40, 48], 1));
    // Since 6.2: percpu_counter[4], 40 bytes each, count at 8.
    let got = resolve_offsets(&Synth::default().build()).unwrap();
    assert_eq!(
        (got.mm_rss, got.rss_stat_has_count),
        ([32, 72, 112, 152], 0)
    );
}

#[test]
fn an_unknown_rss_layout_is_an_error() {
    let odd = |elems, elem_size| {
        let synth = Synth {
            rss: Rss::Odd { elems, elem_size },
            ..Synth::default()
        };
        resolve_offsets(&synth.build()).unwrap_err()
    };
    for e in [odd(4, 8), odd(3, 8)] {
        assert!(
            matches!(&e, ResolveError::Layout { what, .. } if *what == "mm_struct.rss_stat"),
            "{e}"
        );
    }
}

#[test]
fn bio_before_5_12() {
    for typed in [true, false] {
        let synth = Synth {
            block: Block::Disk { typed },
            ..Synth::default()
        };
        let got = resolve_offsets(&synth.build()).unwrap();
        assert_eq!(got.bio_queue_bio_arg, 1, "typed {typed}");
        assert_eq!((got.bio_size, got.bio_opf), (40, 16));
        assert_eq!((got.bio_bdev, got.bdev_dev), (ABSENT, ABSENT));
        assert_eq!(
            [
                got.bio_disk,
                got.bio_partno,
                got.disk_major,
                got.disk_first_minor
            ],
            [8, 27, 0, 4]
        );
    }
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

/// The cache is used when it holds the key (a planted value comes back), refused when it
/// does not, and written with what the BTF resolves to.
#[test]
fn host_offsets_come_from_the_cache_when_it_holds_them() {
    let path = Path::new(VMLINUX_BTF_PATH);
    if !path.exists() {
        eprintln!("skipping: {VMLINUX_BTF_PATH} is absent on this machine");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let base =
        std::env::temp_dir().join(format!("cylo-usage-resolve-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir(&base).unwrap();
    let cache = Cache::new(&base.join("cache"), euid);
    let resolved = resolve_file(path).unwrap();
    assert_eq!(resolve_cached(&cache, path).unwrap(), resolved);
    let key = Key::host(path).unwrap();
    assert_eq!(cache.load(&key).unwrap(), resolved, "stored");
    let planted = Offsets {
        task_pid: 12345,
        ..resolved
    };
    cache.store(&key, &planted).unwrap();
    assert_eq!(resolve_cached(&cache, path).unwrap(), planted);
    // Not the expected owner: neither read nor written.
    let stranger = Cache::new(&base.join("cache"), euid.wrapping_add(1));
    assert_eq!(resolve_cached(&stranger, path).unwrap(), resolved);
    assert_eq!(cache.load(&key).unwrap(), planted);
    // A damaged file: resolved again and rewritten.
    let file = base.join("cache/offsets");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    assert_eq!(resolve_cached(&cache, path).unwrap(), resolved);
    assert_eq!(cache.load(&key).unwrap(), resolved);
    std::fs::remove_dir_all(base).unwrap();
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
