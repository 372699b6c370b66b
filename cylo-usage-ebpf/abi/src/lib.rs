//! The kernel/user ABI of cylo-usage.
//!
//! Every type that crosses between the eBPF programs and userspace is defined here, once,
//! `#[repr(C)]` with explicit padding and a size assertion. The eBPF crate and the userspace
//! crate both depend on this crate; neither defines a shared type of its own.
#![cfg_attr(not(test), no_std)]

use core::mem::size_of;

pub mod cputime;

/// How many runs can be tracked at once (slots of the `RUNS` array map).
pub const MAX_RUNS: u32 = 256;
/// Default capacity of the `TASKS` membership map: live tracked threads on the whole host.
pub const DEFAULT_MAX_TASKS: u32 = 65_536;
/// Default capacity of the `PROCS` map: live tracked processes (thread groups) on the host.
pub const DEFAULT_MAX_PROCS: u32 = 65_536;
/// Capacity of the `MMS` map: live address spaces of tracked processes on the host.
pub const DEFAULT_MAX_MMS: u32 = 65_536;
/// log2 of the slots of the filter arrays `TASK_FILTER` and `MM_FILTER`: counting filters
/// over the keys of `TASKS` and `MMS`, which the handlers test before those hash maps.
pub const FILTER_BITS: u32 = 12;
/// Slots of each filter array: 4,096 `u32` counts, 16 KiB. The kernel allocates an array of
/// at most 32 KiB with kmalloc (the direct map: no TLB miss) and a larger one with vmalloc.
pub const FILTER_SLOTS: u32 = 1 << FILTER_BITS;

/// The filter slot of a key (a kernel address): Fibonacci hashing (multiply by 2^64 / φ,
/// keep the top bits), which spreads a slab's evenly spaced addresses over the slots.
#[inline(always)]
pub const fn filter_slot(key: u64) -> u32 {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - FILTER_BITS)) as u32
}

/// Capacity of the `DEVS` map: (run, block device) pairs.
pub const MAX_DEVS: u32 = 4096;
/// Capacity of the `SPAWNERS` map: userspace threads about to fork the root of a run (keyed by
/// the address of their `task_struct`, recorded by the `control` program in their context).
/// One per run slot: every registration holds a slot, so the map is never full.
pub const MAX_SPAWNERS: u32 = MAX_RUNS;
/// Size of the ring buffer that carries notifications to userspace.
pub const EVENTS_BYTES: u32 = 64 * 4096;
/// Size of the ring buffer that carries per-process records of the runs that asked for them
/// (`--tree`, `--events`). A record is 64 to 640 bytes; a full buffer counts in `lost_events`.
pub const RECORDS_BYTES: u32 = 2048 * 4096;
/// Size of the ring buffer that carries the records of the runs that want them for their
/// user/system split alone ([`run_flags::CPU_RECORDS`]: a start, an end and a thread end per
/// process, about 350 bytes for one thread). Small, because every tracker maps it (its
/// mapping counts twice its size as resident memory); a full buffer counts in
/// `RunCounters::split_records_lost` and the run's split falls back to the tree's sums.
pub const SPLIT_RECORDS_BYTES: u32 = 128 * 4096;
/// Bytes of a process's argv kept from its exec (the strings, NUL-separated, as in
/// `/proc/PID/cmdline`).
pub const ARGV_BYTES: usize = 256;
/// Bytes of an exec's file name kept.
pub const FILENAME_BYTES: usize = 128;
/// `TASK_COMM_LEN`.
pub const COMM_BYTES: usize = 16;
/// How many ancestors an attaching run's hooks look at to decide whether a task that is not
/// followed yet belongs to the tree being attached to.
pub const ADOPT_ANCESTORS: u32 = 16;

/// `CLONE_VM` and `CLONE_THREAD` from `<linux/sched.h>`: part of the stable syscall ABI.
pub const CLONE_VM: u64 = 0x0000_0100;
pub const CLONE_THREAD: u64 = 0x0001_0000;

/// Names of the maps and programs in the object; userspace looks them up by these.
pub mod names {
    pub const TASKS: &str = "TASKS";
    pub const PROCS: &str = "PROCS";
    pub const MMS: &str = "MMS";
    pub const MM_FILTER: &str = "MM_FILTER";
    pub const TASK_FILTER: &str = "TASK_FILTER";
    pub const DEVS: &str = "DEVS";
    pub const RUNS: &str = "RUNS";
    pub const SPAWNERS: &str = "SPAWNERS";
    pub const SPAWN_GATE: &str = "SPAWN_GATE";
    pub const ADOPT_GATE: &str = "ADOPT_GATE";
    pub const RUN_CONTROL: &str = "RUN_CONTROL";
    pub const TRACKER: &str = "TRACKER";
    pub const EVENTS: &str = "EVENTS";
    pub const RECORDS: &str = "RECORDS";
    pub const SPLIT_RECORDS: &str = "SPLIT_RECORDS";
    pub const OFFSETS: &str = "OFFSETS";

    pub const PROG_TASK_NEWTASK: &str = "task_newtask";
    /// The same as `task_newtask` without what needs BPF atomic fetch, exchange and
    /// compare-and-exchange (before 5.12): the peaks and memory.
    pub const PROG_TASK_NEWTASK_NO_ATOMICS: &str = "task_newtask_no_atomics";
    /// The lean set (atomics only): `task_newtask`, `sched_process_exec`,
    /// `sched_process_exit` and `sched_switch` without the adoption path and without
    /// records. A tracker whose runs neither attach nor ask for a breakdown loads these: its
    /// runs are spawned and the kernel splits their CPU time itself
    /// ([`super::run_flags::KERNEL_SPLIT`]), so no run of it wants a record, and its start-up
    /// verifies far fewer instructions.
    pub const PROG_TASK_NEWTASK_LEAN: &str = "task_newtask_lean";
    pub const PROG_SCHED_PROCESS_EXEC_LEAN: &str = "sched_process_exec_lean";
    pub const PROG_SCHED_PROCESS_EXIT_LEAN: &str = "sched_process_exit_lean";
    pub const PROG_SCHED_SWITCH_LEAN: &str = "sched_switch_lean";
    pub const PROG_SCHED_SWITCH: &str = "sched_switch";
    /// `sched_switch` for kernels without BPF atomic fetch: no per-process CPU split.
    pub const PROG_SCHED_SWITCH_NO_ATOMICS: &str = "sched_switch_no_atomics";
    pub const PROG_SCHED_PROCESS_EXIT: &str = "sched_process_exit";
    pub const PROG_SCHED_PROCESS_EXIT_NO_ATOMICS: &str = "sched_process_exit_no_atomics";
    pub const PROG_SCHED_PROCESS_EXEC: &str = "sched_process_exec";
    /// `sched_process_exec` without the address-space bookkeeping (no atomics): only the
    /// exec records of runs that asked for per-process records.
    pub const PROG_SCHED_PROCESS_EXEC_NO_ATOMICS: &str = "sched_process_exec_no_atomics";
    /// Never attached: run by userspace (`BPF_PROG_TEST_RUN`) in its own context to register
    /// itself, a spawning thread, or a task to adopt. See [`crate::control`].
    pub const PROG_CONTROL: &str = "control";
    /// `ADOPT`, loaded when a tracker first attaches.
    pub const PROG_CONTROL_ADOPT: &str = "control_adopt";
    pub const PROG_CONTROL_ADOPT_NO_ATOMICS: &str = "control_adopt_no_atomics";
    pub const PROG_RSS_STAT: &str = "rss_stat";
    pub const PROG_BLOCK_BIO_QUEUE: &str = "block_bio_queue";
    pub const PROG_BLOCK_BIO_QUEUE_WITH_QUEUE: &str = "block_bio_queue_with_queue";
    /// Budgets' hooks, attached while some run needs them: fexit on `schedule_tail` (else a
    /// kprobe on `calculate_sigpending`, else the raw tracepoint `sys_exit`), and raw
    /// tracepoints `sched_stat_runtime` and `writeback_dirty_folio` (or `_page`).
    pub const PROG_SCHEDULE_TAIL_EXIT: &str = "schedule_tail_exit";
    /// Where BPF trampolines are missing: a kprobe on `calculate_sigpending` (which only
    /// `schedule_tail` calls) instead.
    pub const PROG_CALCULATE_SIGPENDING_DOOMED: &str = "calculate_sigpending_doomed";
    /// Where kprobes are missing too: the raw tracepoint `sys_exit`.
    pub const PROG_SYS_EXIT_DOOMED: &str = "sys_exit_doomed";
    /// The kernel function `PROG_CALCULATE_SIGPENDING_DOOMED` probes.
    pub const KPROBE_NEW_TASK_SIGPENDING: &str = "calculate_sigpending";
    pub const PROG_SCHED_STAT_RUNTIME: &str = "sched_stat_runtime";
    pub const PROG_WRITEBACK_DIRTY: &str = "writeback_dirty_folio";
    /// The raw tracepoints the programs above attach to.
    pub const TP_TASK_NEWTASK: &str = "task_newtask";
    pub const TP_SCHED_SWITCH: &str = "sched_switch";
    pub const TP_SCHED_PROCESS_EXIT: &str = "sched_process_exit";
    pub const TP_SCHED_PROCESS_EXEC: &str = "sched_process_exec";
    pub const TP_RSS_STAT: &str = "rss_stat";
    pub const TP_BLOCK_BIO_QUEUE: &str = "block_bio_queue";

    // Network (constants in [`crate::net`]).
    /// Raw tracepoints `sock_send_length` / `sock_recv_length` and their programs.
    pub const PROG_SOCK_SEND_LENGTH: &str = "sock_send_length";
    pub const PROG_SOCK_RECV_LENGTH: &str = "sock_recv_length";
    pub const TP_SOCK_SEND_LENGTH: &str = "sock_send_length";
    pub const TP_SOCK_RECV_LENGTH: &str = "sock_recv_length";
    /// Fallback without those tracepoints: (fexit program, kernel function) for each
    /// `proto_ops.sendmsg` of the inet and AF_UNIX families, `(sock, msg, len)`...
    pub const FEXIT_SENDMSG: [(&str, &str); 5] = [
        ("fx_inet_send", "inet_sendmsg"),
        ("fx_inet6_send", "inet6_sendmsg"),
        ("fx_unix_ssend", "unix_stream_sendmsg"),
        ("fx_unix_dsend", "unix_dgram_sendmsg"),
        ("fx_unix_qsend", "unix_seqpacket_sendmsg"),
    ];
    /// ... and each `proto_ops.recvmsg`, `(sock, msg, size, flags)`.
    pub const FEXIT_RECVMSG: [(&str, &str); 5] = [
        ("fx_inet_recv", "inet_recvmsg"),
        ("fx_inet6_recv", "inet6_recvmsg"),
        ("fx_unix_srecv", "unix_stream_recvmsg"),
        ("fx_unix_drecv", "unix_dgram_recvmsg"),
        ("fx_unix_qrecv", "unix_seqpacket_recvmsg"),
    ];
    /// Kernels with `proto_ops.sendpage` (before 6.5): sendfile and splice into a socket
    /// reach these instead of `sendmsg`.
    pub const FEXIT_SENDPAGE: [(&str, &str); 3] = [
        ("fx_tcp_sendpage", "tcp_sendpage"),
        ("fx_udp_sendpage", "udp_sendpage"),
        ("fx_unix_spage", "unix_stream_sendpage"),
    ];
}

/// Socket-layer constants of the stable UAPI (`<linux/socket.h>`, `<linux/net.h>`,
/// `<linux/in.h>`), for the network counters.
pub mod net {
    pub const AF_UNIX: u16 = 1;
    pub const AF_INET: u16 = 2;
    pub const AF_INET6: u16 = 10;
    pub const SOCK_STREAM: u16 = 1;
    pub const SOCK_DGRAM: u16 = 2;
    pub const SOCK_SEQPACKET: u16 = 5;
    pub const IPPROTO_TCP: u16 = 6;
    pub const IPPROTO_UDP: u16 = 17;
    pub const IPPROTO_UDPLITE: u16 = 136;
    pub const IPPROTO_MPTCP: u16 = 262;
    /// Receive flags whose bytes are not counted: data left queued (`MSG_PEEK`), and error
    /// queue messages (`MSG_ERRQUEUE`), which are not payload.
    pub const MSG_PEEK: u32 = 0x2;
    pub const MSG_ERRQUEUE: u32 = 0x2000;

    /// Bits of [`super::Offsets::net_hooks`]: what the kernel offers, from BTF.
    /// The raw tracepoints `sock_send_length(sk, ret, flags)` and `sock_recv_length(...)`.
    pub const HOOK_TRACEPOINTS: u32 = 1;
    /// Every function of [`super::names::FEXIT_SENDMSG`] and [`super::names::FEXIT_RECVMSG`],
    /// with the expected parameters.
    pub const HOOK_FEXIT_MSG: u32 = 2;
    /// `proto_ops` has `sendpage`: a send path (sendfile, splice) that bypasses `sendmsg`.
    pub const HOOK_SENDPAGE_PATH: u32 = 4;
    /// Every function of [`super::names::FEXIT_SENDPAGE`], with the expected parameters.
    pub const HOOK_FEXIT_SENDPAGE: u32 = 8;
}

/// Kernel layout knowledge, resolved by userspace at start-up (from BTF) and handed to the
/// programs as a read-only global. Offsets are byte offsets into `struct task_struct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// `task_struct.pid` (the thread id, `pid_t`).
    pub task_pid: u32,
    /// `task_struct.tgid` (the process id, `pid_t`).
    pub task_tgid: u32,
    /// `task_struct.signal` (pointer shared by all threads of a process).
    pub task_signal: u32,
    /// `task_struct.start_boottime` (u64 ns), what `/proc/PID/stat` field 22 is made from.
    pub task_start_boottime: u32,
    /// `task_struct.se.sum_exec_runtime` (u64 ns), the scheduler's runtime.
    pub task_sum_exec_runtime: u32,
    /// `task_struct.utime` (u64 ns, tick-sampled user time).
    pub task_utime: u32,
    /// `task_struct.stime` (u64 ns, tick-sampled system time).
    pub task_stime: u32,
    /// `task_struct.__state` (or `state` before 5.14); read only when the `sched_switch` raw
    /// tracepoint does not pass `prev_state` as an argument.
    pub task_state: u32,
    /// Width in bytes of the state field (4 for `unsigned int __state`, 8 for `long state`).
    pub task_state_size: u32,
    /// 1 when the `sched_switch` raw tracepoint has `prev_state` as its fourth argument.
    pub switch_has_prev_state: u32,
    /// The `TASK_DEAD` bit of the task state.
    pub task_dead: u32,
    /// `signal_struct.live` (atomic_t): threads of the process that have not yet exited.
    pub signal_live: u32,

    // Disk and memory. A field the kernel does not have is [`ABSENT`].
    /// `task_struct.ioac.read_bytes` (u64): bytes this task made the storage layer read.
    pub task_ioac_read_bytes: u32,
    /// `task_struct.ioac.write_bytes` (u64): bytes this task dirtied for writing to storage.
    pub task_ioac_write_bytes: u32,
    /// `task_struct.ioac.cancelled_write_bytes` (u64).
    pub task_ioac_cancelled_write_bytes: u32,
    /// `task_struct.ioac.rchar` (u64): bytes read by read-like syscalls (CONFIG_TASK_XACCT).
    pub task_ioac_rchar: u32,
    /// `task_struct.ioac.wchar` (u64).
    pub task_ioac_wchar: u32,
    /// `task_struct.mm` (pointer).
    pub task_mm: u32,
    /// Offset in `mm_struct` of the RSS counter (i64, pages) of each `rss_stat` member:
    /// 0 file, 1 anon, 2 swap entries, 3 shmem. `mm_struct.rss_stat.count[i]` (atomic_long_t)
    /// before 6.2; `mm_struct.rss_stat[i].count` (percpu_counter, central count) since.
    pub mm_rss: [u32; 4],
    /// 1 when the `rss_stat` raw tracepoint passes the new count as its third argument
    /// (before 6.2); otherwise the program reads it from `mm_rss`.
    pub rss_stat_has_count: u32,
    /// Index of `struct bio *` among the `block_bio_queue` raw tracepoint's arguments
    /// (1 before 5.11, where the request queue came first; 0 since).
    pub bio_queue_bio_arg: u32,
    /// `bio.bi_iter.bi_size` (u32, bytes).
    pub bio_size: u32,
    /// `bio.bi_opf` (u32; the low 8 bits are the operation: 0 read, 1 write).
    pub bio_opf: u32,
    /// `bio.bi_bdev` (5.12+) and `block_device.bd_dev` (dev_t, u32), or [`ABSENT`].
    pub bio_bdev: u32,
    pub bdev_dev: u32,
    /// Before 5.12: `bio.bi_disk`, `bio.bi_partno` (u8), `gendisk.major`, `gendisk.first_minor`
    /// (int); the device is MKDEV(major, first_minor + partno). [`ABSENT`] where not used.
    pub bio_disk: u32,
    pub bio_partno: u32,
    pub disk_major: u32,
    pub disk_first_minor: u32,

    // Sessions: identity, ancestry, pid namespaces, exec records, adoption.
    /// `task_struct.exit_code` (int): the wait status do_exit() was given.
    pub task_exit_code: u32,
    /// `task_struct.comm` (char[16]).
    pub task_comm: u32,
    /// `task_struct.real_parent` (pointer).
    pub task_real_parent: u32,
    /// `task_struct.group_leader` (pointer).
    pub task_group_leader: u32,
    /// `task_struct.thread_pid` (`struct pid *`).
    pub task_thread_pid: u32,
    /// `struct pid.level` (unsigned int): depth of the task's own pid namespace.
    pub pid_level: u32,
    /// `struct pid.numbers` (`struct upid[]`), and the size of one `struct upid` (its `nr`,
    /// an int, comes first).
    pub pid_numbers: u32,
    pub upid_size: u32,
    /// `struct pid.tasks[PIDTYPE_PID].first` and `task_struct.pid_links[PIDTYPE_PID]`: from a
    /// `struct pid` to its task.
    pub pid_tasks: u32,
    pub task_pid_links: u32,
    /// `task_struct.files`, `files_struct.fdt`, `fdtable.fd`, `fdtable.max_fds`: from a file
    /// descriptor of the current task to its `struct file`.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_fd: u32,
    pub fdt_max_fds: u32,
    /// `file.f_inode`; `proc_inode.pid` and `proc_inode.vfs_inode`: from a /proc/PID/task/TID
    /// directory to its `struct pid`.
    pub file_inode: u32,
    pub proc_inode_pid: u32,
    pub proc_inode_vfs_inode: u32,
    /// `mm_struct.arg_start`, `mm_struct.arg_end` (unsigned long): where argv lies.
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    /// `linux_binprm.filename` (`const char *`).
    pub bprm_filename: u32,

    // Network.
    /// Which socket hooks the kernel has: bits `net::HOOK_*`.
    pub net_hooks: u32,
    /// `socket.sk` (pointer to the `struct sock`).
    pub socket_sk: u32,
    /// `sock.__sk_common.skc_family`, `sock.sk_type`, `sock.sk_protocol` (u16 each); any of
    /// them [`ABSENT`] (a bitfield before 5.6) leaves the network unmeasured.
    pub sk_family: u32,
    pub sk_type: u32,
    pub sk_protocol: u32,

    // Credentials (who may see a member's figures; see [`Creds`]).
    /// `task_struct.real_cred` (`const struct cred *`): the objective credentials, what
    /// `ptrace_may_access()` checks.
    pub task_real_cred: u32,
    /// `cred.uid`, `cred.gid`, `cred.suid`, `cred.sgid`, `cred.euid`, `cred.egid` (`kuid_t` /
    /// `kgid_t`, u32 each); all [`ABSENT`] or none.
    pub cred_uid: u32,
    pub cred_gid: u32,
    pub cred_suid: u32,
    pub cred_sgid: u32,
    pub cred_euid: u32,
    pub cred_egid: u32,
    /// `mm_struct.flags` (unsigned long): its low two bits are the dumpable mode
    /// (`MMF_DUMPABLE_MASK`), or [`ABSENT`].
    pub mm_flags: u32,

    // Adoption (attach): what a process present at the attach had done before it.
    /// `task_struct.start_time` (u64 ns, CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`):
    /// when the task started.
    pub task_start_time: u32,
    /// `signal_struct.sum_sched_runtime` (u64 ns): the runtime of the process's threads that
    /// have exited (added at their release).
    pub signal_sum_sched_runtime: u32,
    /// `signal_struct.utime` and `.stime` (u64 ns, tick-sampled): the same threads' time.
    pub signal_utime: u32,
    pub signal_stime: u32,
    /// `signal_struct.cutime` and `.cstime` (u64 ns): the children it has reaped (their whole
    /// groups' time, already split by `cputime_adjust`, and what they had reaped in turn).
    pub signal_cutime: u32,
    pub signal_cstime: u32,
    /// `signal_struct.ioac.*` (u64): the I/O accounting of its exited threads and of the
    /// children it has reaped, or [`ABSENT`] (as `task_ioac_*`).
    pub signal_ioac_read_bytes: u32,
    pub signal_ioac_write_bytes: u32,
    pub signal_ioac_cancelled_write_bytes: u32,
    pub signal_ioac_rchar: u32,
    pub signal_ioac_wchar: u32,
}

impl Offsets {
    /// Placeholders the eBPF object is built with; userspace replaces them at load time.
    pub const UNRESOLVED: Offsets = Offsets {
        task_pid: 0,
        task_tgid: 0,
        task_signal: 0,
        task_start_boottime: 0,
        task_sum_exec_runtime: 0,
        task_utime: 0,
        task_stime: 0,
        task_state: 0,
        task_state_size: 0,
        switch_has_prev_state: 0,
        task_dead: 0,
        signal_live: 0,
        task_ioac_read_bytes: ABSENT,
        task_ioac_write_bytes: ABSENT,
        task_ioac_cancelled_write_bytes: ABSENT,
        task_ioac_rchar: ABSENT,
        task_ioac_wchar: ABSENT,
        task_mm: 0,
        mm_rss: [0; 4],
        rss_stat_has_count: 0,
        bio_queue_bio_arg: 0,
        bio_size: 0,
        bio_opf: 0,
        bio_bdev: ABSENT,
        bdev_dev: ABSENT,
        bio_disk: ABSENT,
        bio_partno: ABSENT,
        disk_major: ABSENT,
        disk_first_minor: ABSENT,
        task_exit_code: 0,
        task_comm: 0,
        task_real_parent: 0,
        task_group_leader: 0,
        task_thread_pid: 0,
        pid_level: 0,
        pid_numbers: 0,
        upid_size: 0,
        pid_tasks: 0,
        task_pid_links: 0,
        task_files: 0,
        files_fdt: 0,
        fdt_fd: 0,
        fdt_max_fds: 0,
        file_inode: 0,
        proc_inode_pid: 0,
        proc_inode_vfs_inode: 0,
        mm_arg_start: 0,
        mm_arg_end: 0,
        bprm_filename: 0,
        net_hooks: 0,
        socket_sk: ABSENT,
        sk_family: ABSENT,
        sk_type: ABSENT,
        sk_protocol: ABSENT,
        task_real_cred: ABSENT,
        cred_uid: ABSENT,
        cred_gid: ABSENT,
        cred_suid: ABSENT,
        cred_sgid: ABSENT,
        cred_euid: ABSENT,
        cred_egid: ABSENT,
        mm_flags: ABSENT,
        task_start_time: 0,
        signal_sum_sched_runtime: 0,
        signal_utime: 0,
        signal_stime: 0,
        signal_cutime: 0,
        signal_cstime: 0,
        signal_ioac_read_bytes: ABSENT,
        signal_ioac_write_bytes: ABSENT,
        signal_ioac_cancelled_write_bytes: ABSENT,
        signal_ioac_rchar: ABSENT,
        signal_ioac_wchar: ABSENT,
    };
}

/// An offset the running kernel does not have.
pub const ABSENT: u32 = u32::MAX;

/// One live tracked thread; value of `TASKS`, keyed by the kernel address of its `task_struct`
/// (stable for the task's whole life, unlike its tid, which `exec` from a non-leader thread
/// changes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskMember {
    /// Slot of the run in `RUNS`.
    pub run: u32,
    /// Thread id in the tracker's pid namespace (what its /proc shows), updated at exec.
    pub tid: u32,
    /// Process id in the tracker's pid namespace.
    pub tgid: u32,
    /// [`member_flags`].
    pub flags: u32,
    /// The process's identity: the kernel address of its `signal_struct`, the key of its
    /// `PROCS` entry and the `process` of its records.
    pub process: u64,
    /// `task_struct.start_boottime` in ns: guards /proc reads against pid reuse.
    pub start_boottime_ns: u64,
    /// The start time of its process (its thread-group leader's `start_boottime`): guards
    /// signals sent to the process against pid reuse.
    pub process_start_boottime_ns: u64,
    /// Payload bytes this thread sent and received through TCP and UDP sockets (what
    /// `network_bytes_*` count), kept only for runs with per-process records.
    pub net_sent: u64,
    pub net_received: u64,
    /// What of this thread's CPU time and disk bytes (`sum_exec_runtime`, `ioac.read_bytes`,
    /// `ioac.write_bytes`) is already charged to its run's budgets
    /// (`RunCounters::charged_*`): its figures when it joined (0 for a new task; what it had
    /// used before an attach), then as of its last charge. Only runs with a budget of that
    /// kind are charged.
    pub charged_cpu_ns: u64,
    pub charged_disk_read_bytes: u64,
    pub charged_disk_write_bytes: u64,
}

/// Bits of [`TaskMember::flags`].
pub mod member_flags {
    /// Killed at birth: the task was created past its run's share of the membership maps
    /// (`RunControl::max_tasks`), or its process could not be followed. It is followed (so
    /// a kill of the run reaches it and its usage counts) until it dies: its creator got
    /// SIGKILL at the fork, and it gets SIGKILL itself at its first context switch, fork or
    /// exec (`DOOMED_ALIVE` counts these tasks host-wide).
    pub const DOOMED: u32 = 1;
    /// Refused: created past its run's processes or threads budget
    /// ([`crate::RunControl::max_processes`], `max_threads`). Also `DOOMED`: it is killed
    /// before it runs an instruction of its own (a new thread with its creator's process; a
    /// new process at the end of its first scheduling, `schedule_tail`), and counted in
    /// `RunCounters::processes_refused` / `threads_refused`, not as run.
    pub const REFUSED: u32 = 2;
}

/// The part of a membership map's `capacity` a run (or the daemon's sessions together) should
/// leave free as headroom for tasks killed at birth (see [`member_flags::DOOMED`]): each
/// creator past its share is killed at the fork that made one, and each such task dies at its
/// first switch, fork or exec, so only a few are alive at once; a sixteenth of the map (at
/// least a quarter of it, up to 256 entries) keeps room for them.
pub const fn share_headroom(capacity: u32) -> u32 {
    let quarter = capacity / 4;
    let floor = if quarter < 256 { quarter } else { 256 };
    let sixteenth = capacity / 16;
    if sixteenth > floor { sixteenth } else { floor }
}

/// One live tracked process; value of `PROCS`, keyed by the address of its `signal_struct`.
/// Its end (the last of its threads past `do_exit`'s `sched_process_exit`) happens exactly
/// once: the removal of the entry marks it, or, for a run whose CPU time the kernel splits
/// ([`run_flags::KERNEL_SPLIT`]), the exchange of `ended` from 0; such an entry stays until
/// its last thread has switched out for the last time (`left == threads`), when its
/// figures are final and it is split.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcMember {
    pub run: u32,
    pub _pad0: u32,
    /// The address space it uses now (`task_struct.mm`; changes at exec), or 0.
    pub mm: u64,
    /// Its threads that joined the run (created in it or adopted).
    pub threads: u64,
    /// [`run_flags::KERNEL_SPLIT`] only: 1 once the process has ended.
    pub ended: u64,
    /// [`run_flags::KERNEL_SPLIT`] only: its threads that have switched out for the last
    /// time, and what they used (`sum_exec_runtime`, and the tick-sampled `utime` and
    /// `stime`, ns), summed: the figures `wait4` splits the process's CPU time by.
    pub left: u64,
    pub runtime_ns: u64,
    pub utime_ns: u64,
    pub stime_ns: u64,
}

/// RSS counter members of `rss_stat` that make up RSS as /proc's VmRSS counts it.
pub const RSS_MEMBERS: [usize; 3] = [0, 1, 3]; // MM_FILEPAGES, MM_ANONPAGES, MM_SHMEMPAGES

/// One address space used by tracked processes; value of `MMS`, keyed by the address of its
/// `mm_struct`. Processes sharing it (vfork, CLONE_VM) count it once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmMember {
    pub run: u32,
    pub _pad0: u32,
    /// Tracked processes using it.
    pub users: u64,
    /// The last value seen of each `rss_stat` counter, in pages (index 2, swap, unused).
    pub pages: [u64; 4],
    /// Their sum (its RSS), and the highest the sum has been: its high-water mark.
    pub rss: u64,
    pub peak: u64,
}

/// Key of `DEVS`: a run and a block device (`dev_t`, kernel encoding: major << 20 | minor).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DevKey {
    pub run: u32,
    pub dev: u32,
}

/// Block I/O submitted by tracked tasks to one device (at `block_bio_queue`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevCounters {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

/// What one thread used, as the kernel keeps it in its `task_struct`: the one counter set of
/// the ABI. The kernel side reads it at a thread's adoption and after its last context
/// switch and adds it to its run (`RunCounters::total`, `RunCounters::before`) and to its
/// records ([`ThreadEnd`]); userspace reads the same set from /proc for live threads, and
/// sums, subtracts and splits it. Every figure is in the unit its name says: utime and
/// stime are the kernel's tick-sampled times in ns (userspace converts /proc's clock ticks
/// where it reads them), never ticks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadUsage {
    /// `se.sum_exec_runtime`: the precise CPU time.
    pub cpu_runtime_ns: u64,
    /// Tick-sampled user and system time (for the user/system split only).
    pub cpu_utime_ns: u64,
    pub cpu_stime_ns: u64,
    /// `ioac` (bytes): storage reads caused, storage writes caused (when dirtied), dirty data
    /// truncated before writeback, and logical read/write syscall bytes.
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub disk_cancelled_write_bytes: u64,
    pub io_rchar: u64,
    pub io_wchar: u64,
}

impl core::ops::AddAssign for ThreadUsage {
    /// Field by field, wrapping (as the kernel's counters do).
    fn add_assign(&mut self, o: ThreadUsage) {
        self.cpu_runtime_ns = self.cpu_runtime_ns.wrapping_add(o.cpu_runtime_ns);
        self.cpu_utime_ns = self.cpu_utime_ns.wrapping_add(o.cpu_utime_ns);
        self.cpu_stime_ns = self.cpu_stime_ns.wrapping_add(o.cpu_stime_ns);
        self.disk_read_bytes = self.disk_read_bytes.wrapping_add(o.disk_read_bytes);
        self.disk_write_bytes = self.disk_write_bytes.wrapping_add(o.disk_write_bytes);
        self.disk_cancelled_write_bytes = self
            .disk_cancelled_write_bytes
            .wrapping_add(o.disk_cancelled_write_bytes);
        self.io_rchar = self.io_rchar.wrapping_add(o.io_rchar);
        self.io_wchar = self.io_wchar.wrapping_add(o.io_wchar);
    }
}

impl core::ops::Add for ThreadUsage {
    type Output = ThreadUsage;
    fn add(mut self, o: ThreadUsage) -> ThreadUsage {
        self += o;
        self
    }
}

impl ThreadUsage {
    /// Field by field, stopping at 0: what was used since `o`, where a part of the later
    /// reading may be missing.
    pub fn saturating_sub(self, o: ThreadUsage) -> ThreadUsage {
        ThreadUsage {
            cpu_runtime_ns: self.cpu_runtime_ns.saturating_sub(o.cpu_runtime_ns),
            cpu_utime_ns: self.cpu_utime_ns.saturating_sub(o.cpu_utime_ns),
            cpu_stime_ns: self.cpu_stime_ns.saturating_sub(o.cpu_stime_ns),
            disk_read_bytes: self.disk_read_bytes.saturating_sub(o.disk_read_bytes),
            disk_write_bytes: self.disk_write_bytes.saturating_sub(o.disk_write_bytes),
            disk_cancelled_write_bytes: self
                .disk_cancelled_write_bytes
                .saturating_sub(o.disk_cancelled_write_bytes),
            io_rchar: self.io_rchar.saturating_sub(o.io_rchar),
            io_wchar: self.io_wchar.saturating_sub(o.io_wchar),
        }
    }
}

impl core::ops::Sub for ThreadUsage {
    type Output = ThreadUsage;
    /// Field by field, wrapping: what was used between two readings of the same threads.
    fn sub(self, o: ThreadUsage) -> ThreadUsage {
        ThreadUsage {
            cpu_runtime_ns: self.cpu_runtime_ns.wrapping_sub(o.cpu_runtime_ns),
            cpu_utime_ns: self.cpu_utime_ns.wrapping_sub(o.cpu_utime_ns),
            cpu_stime_ns: self.cpu_stime_ns.wrapping_sub(o.cpu_stime_ns),
            disk_read_bytes: self.disk_read_bytes.wrapping_sub(o.disk_read_bytes),
            disk_write_bytes: self.disk_write_bytes.wrapping_sub(o.disk_write_bytes),
            disk_cancelled_write_bytes: self
                .disk_cancelled_write_bytes
                .wrapping_sub(o.disk_cancelled_write_bytes),
            io_rchar: self.io_rchar.wrapping_sub(o.io_rchar),
            io_wchar: self.io_wchar.wrapping_sub(o.io_wchar),
        }
    }
}

/// The per-run accounting record, value of `RUNS`. Every field is a counter updated with
/// atomic adds in the kernel; userspace only reads it (and zeroes a slot before a run).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunCounters {
    /// What the run's exited threads used, each read after its last context switch.
    pub total: ThreadUsage,
    /// Processes that ever joined, the root included.
    pub processes_started: u64,
    /// Threads that ever joined, main threads included.
    pub threads_started: u64,
    /// Processes alive now.
    pub processes_alive: u64,
    /// The most processes alive at once (only where the kernel has BPF atomic fetch).
    pub processes_peak: u64,
    /// Threads that have exited; the run is over when it equals `threads_started`. Also the
    /// generation userspace uses for consistent snapshots.
    pub threads_exited: u64,
    /// Records the kernel side could not make (map full, ring buffer full).
    pub lost_events: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the last thread left; 0 before.
    pub ended_ns: u64,
    /// RSS (file + anon + shmem pages) of the run's address spaces now, and its peak.
    pub rss_pages: u64,
    pub rss_peak_pages: u64,
    /// The largest peak RSS (pages) of any address space of the run that has left it.
    pub max_process_rss_pages: u64,

    /// Set by userspace when it zeroes the slot, read-only to the kernel: [`run_flags`].
    pub flags: u64,
    /// The root process's identity (its `signal_struct` address), set when it joins.
    pub root_process: u64,
    /// `ROOT_ENDED | exit_code` once the root process has ended (its last thread passed
    /// do_exit()); `exit_code` is the kernel's wait status (`code << 8 | signal`).
    pub root_status: u64,
    /// What adopted threads had already used when they were adopted (attach), read at
    /// adoption. `total` includes it (it is read at exit, over each thread's whole life);
    /// userspace subtracts it.
    pub before: ThreadUsage,
    /// Processes and threads that were adopted rather than created inside the run.
    pub processes_adopted: u64,
    pub threads_adopted: u64,

    /// Socket payload bytes tracked tasks sent and received, counted where the socket layer
    /// accepted or delivered them: TCP (and MPTCP), UDP (and UDP-Lite) over IPv4 and IPv6,
    /// AF_UNIX, and everything else (other families, raw and ICMP inet sockets).
    pub net_tcp_sent: u64,
    pub net_udp_sent: u64,
    pub net_unix_sent: u64,
    pub net_other_sent: u64,
    /// Keeps the sent and the received counters on different cache lines, whatever the
    /// record's alignment: the two ends of a connection, both tracked, usually run on
    /// different CPUs, and sharing one line made every socket call wait for it (~50 ns).
    pub _pad_net: [u64; 8],
    pub net_tcp_received: u64,
    pub net_udp_received: u64,
    pub net_unix_received: u64,
    pub net_other_received: u64,

    /// Tasks the run could not follow as members within its share, killed at birth: created
    /// past `RunControl::max_tasks` (followed, marked [`member_flags::DOOMED`], killed with
    /// their creator's process), or new threads whose creator was killed because the
    /// membership maps were full (they die with their process).
    pub tasks_killed_at_birth: u64,
    /// New processes that could not be followed at all (the membership maps were full, or
    /// the new task could not be read): their creator was killed, but they may still run,
    /// out of the tracker's reach.
    pub tasks_escaped: u64,

    /// Records a run that wants them for its user/system split alone
    /// ([`run_flags::CPU_RECORDS`]) could not have (`SPLIT_RECORDS` was full); userspace then
    /// splits the tree's sums at once. Not lost events: the totals do not depend on records.
    pub split_records_lost: u64,
    /// What adopted processes had used before the attach beyond their live threads (which
    /// are in `before_*` above), read once per process when its first thread is adopted; not
    /// part of the totals. From its `signal_struct`: the exited threads' runtime and
    /// tick-sampled user and system time, the user and system time of the children it had
    /// reaped, and the I/O accounting of both (the kernel keeps the two together).
    pub before_exited_runtime_ns: u64,
    pub before_exited_utime_ns: u64,
    pub before_exited_stime_ns: u64,
    pub before_reaped_user_ns: u64,
    pub before_reaped_system_ns: u64,
    pub before_group_disk_read_bytes: u64,
    pub before_group_disk_write_bytes: u64,
    pub before_group_disk_cancelled_write_bytes: u64,
    pub before_group_io_rchar: u64,
    pub before_group_io_wchar: u64,

    /// The first budget the run crossed: `resource << 56 | observed` ([`budget`]), written
    /// once (compare-and-exchange from 0, where the kernel has it); 0 while none is.
    pub budget_crossed: u64,
    /// `bpf_ktime_get_ns()` when it was crossed.
    pub budget_crossed_ns: u64,
    /// What the budgets of the run have been charged: CPU time (`sum_exec_runtime`) and the
    /// disk bytes of `ioac` (read, written), as of each thread's last charge (see
    /// [`TaskMember::charged_cpu_ns`]). Kept only for the kinds the run has a budget for.
    pub charged_cpu_ns: u64,
    pub charged_disk_read_bytes: u64,
    pub charged_disk_write_bytes: u64,
    /// New processes and threads refused by the processes or threads budget
    /// ([`member_flags::REFUSED`]): they are in `processes_started` / `threads_started`
    /// (the kernel followed them until they died), but never ran; a refused process counts
    /// in both.
    pub processes_refused: u64,
    pub threads_refused: u64,
    /// [`run_flags::KERNEL_SPLIT`] only: the CPU time of the run's ended processes (those
    /// whose last thread has switched out for the last time), and its user and system parts,
    /// each process split on its own by [`cputime::split_system`] as `wait4` splits it.
    pub split_runtime_ns: u64,
    pub split_user_ns: u64,
    pub split_system_ns: u64,
}

/// Budgets: the resources a run can be stopped at (the top byte of
/// [`RunCounters::budget_crossed`]), and how a crossing is packed.
pub mod budget {
    pub const PROCESSES: u64 = 1;
    pub const THREADS: u64 = 2;
    pub const CPU_TIME: u64 = 3;
    pub const MEMORY: u64 = 4;
    pub const DISK_WRITE: u64 = 5;
    pub const DISK_READ: u64 = 6;
    pub const NETWORK: u64 = 7;
    /// The run's share of the membership maps (`RunControl::max_tasks`): threads alive at
    /// once.
    pub const TASKS_ALIVE: u64 = 8;

    /// The most an observed value can say (56 bits: 64 PiB, or 2.2 years of CPU time).
    pub const OBSERVED_MAX: u64 = (1 << 56) - 1;

    /// `resource` crossed at `observed`, packed.
    pub const fn pack(resource: u64, observed: u64) -> u64 {
        let o = if observed > OBSERVED_MAX {
            OBSERVED_MAX
        } else {
            observed
        };
        resource << 56 | o
    }

    /// `(resource, observed)` of a packed crossing (resource 0: none).
    pub const fn unpack(crossed: u64) -> (u64, u64) {
        (crossed >> 56, crossed & OBSERVED_MAX)
    }
}

/// Bit of [`RunCounters::root_status`]: the root has ended.
pub const ROOT_ENDED: u64 = 1 << 32;

/// Bits of [`RunCounters::flags`].
pub mod run_flags {
    /// The run wants every per-process record in the `RECORDS` ring buffer (a breakdown).
    pub const RECORDS: u64 = 1;
    /// The run wants the records its user/system split needs, and no more: processes'
    /// starts and ends and threads' ends (and adoptions), without exec records (argv) or
    /// each thread's socket bytes, in the `SPLIT_RECORDS` ring buffer. Userspace splits each
    /// process as `wait4` would.
    pub const CPU_RECORDS: u64 = 2;
    /// The kernel splits each process's CPU time into user and system itself, as its last
    /// thread switches out for the last time ([`crate::cputime::split_system`] of its
    /// threads' summed figures), into `RunCounters::split_*`: no record at all. For a run
    /// that started its root (every process joins it at its fork, with all its threads)
    /// and wants no breakdown, on kernels with BPF atomic fetch (5.12).
    pub const KERNEL_SPLIT: u64 = 4;
}

/// Per-run controls userspace changes while the run goes on (value of `RUN_CONTROL`, one
/// per slot). Kept apart from `RunCounters`, which only the kernel writes after the start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunControl {
    /// Non-zero: the run is being attached to; its hooks adopt tasks of the tree that are not
    /// followed yet.
    pub attaching: u32,
    /// Non-zero: the run is being killed with this signal; a member that forks gets it at
    /// once (`bpf_send_signal`), so a fork bomb cannot outgrow the kill.
    pub kill_signal: u32,
    /// Non-zero: the most threads of the run the kernel follows at once (its share of the
    /// membership maps). A new task past it is killed at birth, and its creator's process
    /// with it (fail closed: see [`member_flags::DOOMED`]), counted in
    /// `RunCounters::tasks_killed_at_birth`.
    pub max_tasks: u32,
    pub _pad0: u32,
    /// Budgets, 0 for none: the run is stopped (every member killed, SIGKILL) when it
    /// crosses one, and the first crossing is recorded (`RunCounters::budget_crossed`).
    /// Processes and threads: the most that may run; the one past it is refused
    /// ([`member_flags::REFUSED`]).
    pub max_processes: u64,
    pub max_threads: u64,
    /// CPU time (ns), charged as it is used (`sched_stat_runtime`) and at each thread's end.
    pub max_cpu_ns: u64,
    /// The tree's resident memory, in pages (crossed above it).
    pub max_rss_pages: u64,
    /// Disk bytes (`ioac.write_bytes` / `read_bytes`), charged at the tree's block I/O and
    /// page dirtying, and at each thread's end.
    pub max_disk_write_bytes: u64,
    pub max_disk_read_bytes: u64,
    /// Socket payload bytes, sent and received together.
    pub max_network_bytes: u64,
}

impl RunControl {
    /// Whether any budget is set.
    pub const fn has_budget(&self) -> bool {
        self.max_processes
            | self.max_threads
            | self.max_cpu_ns
            | self.max_rss_pages
            | self.max_disk_write_bytes
            | self.max_disk_read_bytes
            | self.max_network_bytes
            != 0
    }
}

/// Who the tracker is, recorded by the `control` program in the tracker's own context
/// (value of `TRACKER`, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerInfo {
    /// The tracker process's identity (its `signal_struct` address): it and its threads never
    /// join a run.
    pub process: u64,
    /// The depth of the tracker's pid namespace: pids in records are as the tracker sees them.
    pub pid_level: u32,
    /// 1 once recorded.
    pub known: u32,
}

/// Operations of the `control` program (its first argument).
pub mod control {
    /// Record the tracker itself ([`crate::TrackerInfo`]). Returns 0.
    pub const HELLO: u64 = 1;
    /// `(SPAWNER, run)`: the calling thread's next new task is the root of `run`. Returns 0,
    /// or [`crate::control::E_FULL`].
    pub const SPAWNER: u64 = 2;
    /// `(ADOPT, fd, run, flags)`: adopt into `run` the task behind `fd`, a directory
    /// `/proc/PID/task/TID` the caller holds open. Returns [`ADOPTED`], [`ALREADY`] (followed
    /// already, by this run), or a negative `E_*`.
    pub const ADOPT: u64 = 3;
    /// Flag of `ADOPT`: the task's process is the root of the run.
    pub const ADOPT_ROOT: u64 = 1;
    /// Forget the calling thread's `SPAWNER` registration (after a spawn that created no
    /// task). Returns 0.
    pub const UNSPAWN: u64 = 4;
    /// `(SPAWNER_FD, fd, run, tgid)`: like `SPAWNER`, for the thread behind `fd` (a
    /// `/proc/PID/task/TID` directory the caller holds open), which must belong to process
    /// `tgid` as the caller's pid namespace sees it. For a daemon registering a client's
    /// spawning thread. Returns 0, [`E_NOT_PEER`], or another negative `E_*`.
    pub const SPAWNER_FD: u64 = 5;
    /// `(FORGET_MM, mm)`: remove the `MMS` entry of address space `mm` (a run that ends while
    /// some of its processes live on) and its count in `MM_FILTER`. Returns 0.
    pub const FORGET_MM: u64 = 16;
    /// `(FORGET_TASK, task)`: remove the `TASKS` entry of `task` (a run that ends while
    /// some of its threads live on) and its count in `TASK_FILTER`. Returns 0.
    pub const FORGET_TASK: u64 = 17;

    pub const ADOPTED: i32 = 0;
    pub const ALREADY: i32 = 1;
    /// The fd does not lead to a task (it has exited: its `struct pid` has no task left).
    pub const E_GONE: i32 = -1;
    /// The task is followed by another run.
    pub const E_OTHER_RUN: i32 = -2;
    /// A kernel read failed.
    pub const E_READ: i32 = -3;
    /// A map is full.
    pub const E_FULL: i32 = -4;
    /// The task is the tracker's own.
    pub const E_SELF: i32 = -5;
    /// Unknown operation or bad argument.
    pub const E_INVAL: i32 = -6;
    /// `SPAWNER_FD`: the thread is not in the process the caller named.
    pub const E_NOT_PEER: i32 = -7;
    /// `ADOPT`: the run holds its share of the membership maps (`RunControl::max_tasks`).
    pub const E_SHARE: i32 = -8;
}

impl RunCounters {
    /// True once every thread that joined has exited.
    pub fn finished(&self) -> bool {
        self.threads_started == self.threads_exited
    }
}

/// Why a handler lost something (a run's `lost_events`), as its aya-log record names it
/// while logging is on: the programs log the number, userspace the text ([`diag::text`]), so
/// that no handler carries the text, which made their log statements too big to verify on
/// older kernels.
pub mod diag {
    pub const TASKS_FULL: u32 = 1;
    pub const PROCS_FULL: u32 = 2;
    pub const MMS_FULL: u32 = 3;
    pub const DEVS_FULL: u32 = 4;
    pub const RECORDS_FULL: u32 = 5;
    pub const EVENTS_FULL: u32 = 6;
    pub const READ_NEW_TASK: u32 = 7;
    pub const READ_CPU: u32 = 8;
    pub const READ_BIO: u32 = 9;
    pub const READ_SOCKET: u32 = 10;
    pub const KILLED_AT_BIRTH: u32 = 11;
    pub const BUDGET: u32 = 12;

    /// The first word of the programs' diagnostic records: `lost KIND RUN TID COMM`.
    pub const RECORD_PREFIX: &str = "lost ";

    /// What diagnostic `kind` means.
    pub const fn text(kind: u32) -> &'static str {
        match kind {
            TASKS_FULL => {
                "TASKS is full: a new task is not followed; its creator was killed (a new \
                 process may escape)"
            }
            PROCS_FULL => "PROCS is full: a process is not followed",
            MMS_FULL => "MMS is full: an address space's memory is not followed",
            DEVS_FULL => "DEVS is full: block I/O is lost",
            RECORDS_FULL => "the RECORDS ring buffer is full: a record is lost",
            EVENTS_FULL => "the EVENTS ring buffer is full: a notification is lost",
            READ_NEW_TASK => {
                "reading task_struct.signal or start_boottime failed: not followed; its creator \
                 was killed (a new process may escape)"
            }
            READ_CPU => "reading task_struct.se.sum_exec_runtime/utime/stime failed: CPU lost",
            READ_BIO => "reading bio.bi_opf, bi_size or its device failed: block I/O lost",
            READ_SOCKET => "reading the socket's family, type or protocol failed: bytes lost",
            KILLED_AT_BIRTH => {
                "a task past its run's share was killed at birth, with its creator's process"
            }
            BUDGET => "the run crossed a budget: it is being killed",
            _ => "something was lost (an unknown diagnostic)",
        }
    }
}

/// A `SPAWNERS` entry (keyed by the thread's `task_struct` address): the run whose root the
/// thread's next new task is, and the thread's start time. A thread that exits before it forks
/// leaves its entry behind until userspace removes it; a new task that reuses the address has
/// another start time, so it is never taken for the registered thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spawner {
    pub run: u32,
    pub _pad: u32,
    /// `task_struct.start_boottime` of the registered thread.
    pub start_boottime_ns: u64,
}

/// Kinds of [`Event`].
pub mod event_kind {
    /// The last thread of a run has exited (may come twice when the last two exit together).
    pub const RUN_EMPTY: u32 = 1;
    /// The run crossed a budget (`RunCounters::budget_crossed`): it must be killed.
    pub const BUDGET: u32 = 2;
}

/// Kinds of per-process records (`RECORDS` ring buffer); every record starts with a
/// [`RecordHeader`].
pub mod record_kind {
    /// [`crate::ProcStart`]: a process joined the run (created in it, or adopted).
    pub const PROC_START: u32 = 1;
    /// [`crate::ProcExec`]: a process of the run executed a new program.
    pub const PROC_EXEC: u32 = 2;
    /// [`crate::ProcExit`]: the last thread of a process passed do_exit().
    pub const PROC_EXIT: u32 = 3;
    /// [`crate::ThreadEnd`]: a thread of the run switched out for the last time; what it
    /// used over its whole life.
    pub const THREAD_END: u32 = 4;
    /// [`crate::ThreadEnd`] too: what an adopted thread had used when it was adopted.
    pub const THREAD_ADOPTED: u32 = 5;
}

/// The start of every record in `RECORDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: u32,
    pub run: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// The process's identity: the address of its `signal_struct`, unique while it lives.
    pub process: u64,
}

/// Bits of [`ProcStart::flags`].
pub mod proc_flags {
    /// The root of its run.
    pub const ROOT: u32 = 1;
    /// Present when the run attached, rather than created inside it.
    pub const ADOPTED: u32 = 2;
    /// Refused by its run's processes or threads budget: killed before it ran.
    pub const REFUSED: u32 = 4;
}

/// Bits of [`Creds::known`].
pub mod creds_known {
    /// The ids were read.
    pub const IDS: u32 = 1;
    /// `dumpable` was read.
    pub const DUMPABLE: u32 = 2;
}

/// `SUID_DUMP_USER`: the dumpable mode of a process whose owner may inspect it (what
/// `ptrace_may_access()` asks for, besides matching ids). An exec that changes ids or raises
/// capabilities (setuid, setgid, file capabilities), or an exec of an unreadable file, leaves
/// another mode.
pub const DUMP_USER: u32 = 1;

/// A process's credentials, as a record carries them: at its start (inherited at fork, or
/// read at adoption) and after each exec (credentials are committed before the exec
/// tracepoint). Userspace decides from them whether a daemon's client may see the process's
/// figures, the way `ptrace_may_access(PTRACE_MODE_READ_FSCREDS)` decides for `/proc/PID/io`.
/// An unprivileged tree gains other credentials only through an exec, so the last record is
/// what the kernel would check.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub suid: u32,
    pub sgid: u32,
    pub euid: u32,
    pub egid: u32,
    /// `mm_struct.flags & MMF_DUMPABLE_MASK` (see [`DUMP_USER`]).
    pub dumpable: u32,
    /// Bits [`creds_known`]: what was read.
    pub known: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStart {
    pub header: RecordHeader,
    /// The parent's identity (`signal_struct` address), 0 if unknown.
    pub parent: u64,
    /// `task_struct.start_boottime` of the process (ns since boot).
    pub start_boottime_ns: u64,
    /// `task_struct.start_time` of the process (CLOCK_MONOTONIC ns, the clock of
    /// `header.time_ns`): for an adopted process, its real start, before the attach.
    pub start_mono_ns: u64,
    /// Pid in the initial pid namespace, in the tracker's, and in the process's own.
    pub pid_global: u32,
    pub pid: u32,
    pub pid_own_ns: u32,
    /// The parent's pid in the tracker's namespace (0 when not visible there).
    pub ppid: u32,
    pub flags: u32,
    pub _pad0: u32,
    pub comm: [u8; COMM_BYTES],
    /// Its credentials at its start.
    pub creds: Creds,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcExec {
    pub header: RecordHeader,
    /// The peak RSS (pages) of the address space the exec left, if it was the last user.
    pub old_mm_peak_pages: u64,
    /// The pid in the tracker's namespace after the exec (a non-leader thread that execs
    /// takes the leader's).
    pub pid: u32,
    /// Bytes of `argv` kept, and whether more were cut off (1).
    pub argv_len: u32,
    pub argv_truncated: u32,
    pub _pad0: u32,
    pub comm: [u8; COMM_BYTES],
    /// NUL-terminated.
    pub filename: [u8; FILENAME_BYTES],
    pub argv: [u8; ARGV_BYTES],
    /// Its credentials after the exec.
    pub creds: Creds,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcExit {
    pub header: RecordHeader,
    /// The wait status the parent sees (`task_struct.exit_code` of its last thread).
    pub exit_code: u32,
    pub _pad0: u32,
    /// Peak RSS (pages) of its address space, where memory is followed.
    pub mm_peak_pages: u64,
    /// Its threads that joined the run: as many `THREAD_END` records complete it.
    pub threads: u64,
    /// Its leader's `comm` at the end (a process may rename itself without exec).
    pub comm: [u8; COMM_BYTES],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadEnd {
    pub header: RecordHeader,
    /// What the thread used over its whole life (`THREAD_END`), or until its adoption
    /// (`THREAD_ADOPTED`).
    pub usage: ThreadUsage,
    /// TCP and UDP payload bytes it sent and received (0 for `THREAD_ADOPTED`: the kernel
    /// keeps no history of a thread's socket traffic before it was followed).
    pub net_sent: u64,
    pub net_received: u64,
}

/// A record in the `EVENTS` ring buffer: only what userspace must see promptly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    pub run: u32,
}

const _: () = assert!(size_of::<Offsets>() == 304);
const _: () = assert!(size_of::<TaskMember>() == 80);
const _: () = assert!(size_of::<ProcMember>() == 64);
const _: () = assert!(size_of::<RunCounters>() == 560);
const _: () = assert!(size_of::<ThreadUsage>() == 64);
const _: () = assert!(size_of::<RunControl>() == 72);
const _: () = assert!(size_of::<TrackerInfo>() == 16);
const _: () = assert!(size_of::<RecordHeader>() == 24);
const _: () = assert!(size_of::<ProcStart>() == 120);
const _: () = assert!(size_of::<ProcExec>() == 480);
const _: () = assert!(size_of::<ProcExit>() == 64);
const _: () = assert!(size_of::<ThreadEnd>() == 104);
const _: () = assert!(size_of::<Event>() == 8);
const _: () = assert!(size_of::<Creds>() == 32);
const _: () = assert!(size_of::<MmMember>() == 64);
const _: () = assert!(size_of::<DevKey>() == 8);
const _: () = assert!(size_of::<DevCounters>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers, with explicit padding.
    unsafe impl aya::Pod for super::Offsets {}
    unsafe impl aya::Pod for super::TaskMember {}
    unsafe impl aya::Pod for super::ProcMember {}
    unsafe impl aya::Pod for super::RunCounters {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::MmMember {}
    unsafe impl aya::Pod for super::DevKey {}
    unsafe impl aya::Pod for super::DevCounters {}
    unsafe impl aya::Pod for super::RunControl {}
    unsafe impl aya::Pod for super::Spawner {}
    unsafe impl aya::Pod for super::TrackerInfo {}
}
