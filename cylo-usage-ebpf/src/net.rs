//! Network counters: socket payload bytes a tracked task sent or received, added to its run
//! where the socket layer reports how many bytes a send accepted or a receive delivered.
//!
//! Two ways in, chosen by the loader from what the kernel's BTF offers:
//! - 6.3+: the raw tracepoints `sock_send_length(sk, ret, flags)` and
//!   `sock_recv_length(sk, ret, flags)`, which fire in `sock_sendmsg_nosec()` /
//!   `sock_recvmsg_nosec()` right after the address family's `sendmsg` / `recvmsg`; every
//!   path into a socket ends there (write, send*, sendmmsg, io_uring, splice and sendfile
//!   from 6.5 on).
//! - Before: fexit programs on those family functions themselves (`inet_sendmsg`,
//!   `inet6_recvmsg`, `unix_stream_sendmsg`, ...: each `proto_ops.sendmsg` / `recvmsg` of
//!   the inet and AF_UNIX families), which sit at the same point of the same paths, `*_nosec`
//!   ones included (sendmmsg / recvmmsg after their first message). A
//!   trampoline hands each program the arguments and the return value together, with no
//!   per-call state and no limit on calls in flight (a kretprobe has a fixed pool of
//!   instances that blocked receives on the whole host can exhaust).
//! - Kernels with `proto_ops.sendpage` (before 6.5) send sendfile and splice data into a
//!   socket through `sendpage`, not `sendmsg`: fexit programs on `tcp_sendpage`,
//!   `udp_sendpage` and `unix_stream_sendpage` count those (`sock_no_sendpage` falls back
//!   to `sendmsg`, which is counted there).
//!
//! Each handler: a failed call (`ret <= 0`) returns at once; otherwise one `TASKS` lookup,
//! and an untracked task returns. A tracked task's bytes go to TCP, UDP, AF_UNIX or other,
//! by the socket's family, type and protocol. `MSG_PEEK` and `MSG_ERRQUEUE` receives are not
//! counted (the bytes stay queued, or are not payload).
use aya_ebpf::{
    helpers::bpf_get_current_task,
    macros::{fexit, raw_tracepoint},
    programs::{FExitContext, RawTracePointContext},
};
use cylo_usage_abi::net::*;

use cylo_usage_abi::{RunCounters, TaskMember};

use crate::{
    OFFSETS, RUN_CONTROL, TASK_FILTER, TASKS, add, diag_flush, kill_current, load, lost, maybe_in,
    read, run_counters, wants_all_records,
};

/// `sock_send_length(struct sock *sk, int ret, int flags)`, in `sock_sendmsg_nosec()`.
#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_length(ctx: RawTracePointContext) -> i32 {
    count::<true>(ctx.arg(0), ctx.arg::<u64>(1) as i32, 0)
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)`, in `sock_recvmsg_nosec()`.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length(ctx: RawTracePointContext) -> i32 {
    count::<false>(
        ctx.arg(0),
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as u32,
    )
}

// The fallback. A trampoline's context is the arguments, then the return value.

/// `int sendmsg(struct socket *sock, struct msghdr *msg, size_t len)` of a family; sockets of
/// type `skip` are not counted here.
#[inline(always)]
fn sendmsg(ctx: FExitContext, skip: u16) -> i32 {
    let ret = ctx.arg::<u64>(3) as i32;
    count_socket::<true>(ctx.arg(0), ret, 0, skip)
}

/// `int recvmsg(struct socket *sock, struct msghdr *msg, size_t size, int flags)`.
#[inline(always)]
fn recvmsg(ctx: FExitContext, skip: u16) -> i32 {
    let ret = ctx.arg::<u64>(4) as i32;
    count_socket::<false>(ctx.arg(0), ret, ctx.arg::<u64>(3) as u32, skip)
}

/// No socket has type 0: nothing skipped.
const NONE: u16 = 0;

#[fexit(function = "inet_sendmsg")]
pub fn fx_inet_send(ctx: FExitContext) -> i32 {
    sendmsg(ctx, NONE)
}

#[fexit(function = "inet6_sendmsg")]
pub fn fx_inet6_send(ctx: FExitContext) -> i32 {
    sendmsg(ctx, NONE)
}

#[fexit(function = "unix_stream_sendmsg")]
pub fn fx_unix_ssend(ctx: FExitContext) -> i32 {
    sendmsg(ctx, NONE)
}

/// AF_UNIX SOCK_SEQPACKET's `sendmsg` calls this one, out of line or inlined depending on
/// the kernel and compiler: its own hook counts it, and this one skips it.
#[fexit(function = "unix_dgram_sendmsg")]
pub fn fx_unix_dsend(ctx: FExitContext) -> i32 {
    sendmsg(ctx, SOCK_SEQPACKET)
}

#[fexit(function = "unix_seqpacket_sendmsg")]
pub fn fx_unix_qsend(ctx: FExitContext) -> i32 {
    sendmsg(ctx, NONE)
}

#[fexit(function = "inet_recvmsg")]
pub fn fx_inet_recv(ctx: FExitContext) -> i32 {
    recvmsg(ctx, NONE)
}

#[fexit(function = "inet6_recvmsg")]
pub fn fx_inet6_recv(ctx: FExitContext) -> i32 {
    recvmsg(ctx, NONE)
}

#[fexit(function = "unix_stream_recvmsg")]
pub fn fx_unix_srecv(ctx: FExitContext) -> i32 {
    recvmsg(ctx, NONE)
}

/// Like `fx_unix_dsend` (6.1 inlines it into `unix_seqpacket_recvmsg`, 5.10 calls it).
#[fexit(function = "unix_dgram_recvmsg")]
pub fn fx_unix_drecv(ctx: FExitContext) -> i32 {
    recvmsg(ctx, SOCK_SEQPACKET)
}

#[fexit(function = "unix_seqpacket_recvmsg")]
pub fn fx_unix_qrecv(ctx: FExitContext) -> i32 {
    recvmsg(ctx, NONE)
}

/// `int tcp_sendpage(struct sock *sk, struct page *page, int offset, size_t size, int flags)`
/// (TCP over IPv4 and IPv6).
#[fexit(function = "tcp_sendpage")]
pub fn fx_tcp_sendpage(ctx: FExitContext) -> i32 {
    count::<true>(ctx.arg(0), ctx.arg::<u64>(5) as i32, 0)
}

/// `int udp_sendpage(struct sock *sk, ...)`, like `tcp_sendpage` (UDP over IPv4; IPv6 UDP
/// has no `sendpage` and falls back to `sendmsg`).
#[fexit(function = "udp_sendpage")]
pub fn fx_udp_sendpage(ctx: FExitContext) -> i32 {
    count::<true>(ctx.arg(0), ctx.arg::<u64>(5) as i32, 0)
}

/// `ssize_t unix_stream_sendpage(struct socket *socket, struct page *page, int offset,
/// size_t size, int flags)`.
#[fexit(function = "unix_stream_sendpage")]
pub fn fx_unix_spage(ctx: FExitContext) -> i32 {
    count_socket::<true>(ctx.arg(0), ctx.arg::<u64>(5) as i32, 0, NONE)
}

/// [`count`] for a `struct socket *`: its `sk` is read only for a tracked task.
#[inline(always)]
fn count_socket<const SEND: bool>(socket: u64, ret: i32, flags: u32, skip: u16) -> i32 {
    if ret <= 0 {
        return 0; // failed, EAGAIN, or nothing moved
    }
    let Some(member) = current_member() else {
        return 0;
    };
    let sk = read::<u64>(socket, offset!(socket_sk)).unwrap_or(0);
    add_bytes::<SEND>(member, sk, ret as u64, flags, skip);
    diag_flush();
    0
}

/// Adds `ret` bytes moved through socket `sk` to the current task's run, if it is tracked.
#[inline(always)]
fn count<const SEND: bool>(sk: u64, ret: i32, flags: u32) -> i32 {
    if ret <= 0 {
        return 0; // failed, EAGAIN, or nothing moved
    }
    let Some(member) = current_member() else {
        return 0;
    };
    add_bytes::<SEND>(member, sk, ret as u64, flags, NONE);
    diag_flush();
    0
}

/// The current task's membership record, if it is tracked.
#[inline(always)]
fn current_member() -> Option<&'static mut TaskMember> {
    // SAFETY: returns the address of the current task_struct.
    let current = unsafe { bpf_get_current_task() };
    if !maybe_in(&TASK_FILTER, current) {
        return None;
    }
    // SAFETY: a map value, live while the task is (only its own exit removes it); its
    // counters are updated atomically.
    TASKS.get_ptr_mut(current).map(|m| unsafe { &mut *m })
}

/// `sk->sk_type` and `sk->sk_protocol`: side by side (u16 each) on every kernel with them as
/// whole members so far, in either order, so one read does (each read is a helper call).
#[inline(always)]
fn type_and_protocol(sk: u64) -> Option<(u16, u16)> {
    let (kind, protocol) = (offset!(sk_type), offset!(sk_protocol));
    if protocol == kind.wrapping_add(2) {
        let both = read::<u32>(sk, kind)?;
        Some((both as u16, (both >> 16) as u16))
    } else if kind == protocol.wrapping_add(2) {
        let both = read::<u32>(sk, protocol)?;
        Some(((both >> 16) as u16, both as u16))
    } else {
        Some((read::<u16>(sk, kind)?, read::<u16>(sk, protocol)?))
    }
}

/// The thread's own TCP/UDP byte count, for runs with per-process records (`--tree`).
#[inline(always)]
fn per_thread<const SEND: bool>(member: &mut TaskMember, c: &RunCounters, bytes: u64) {
    if wants_all_records(c) {
        add(
            if SEND {
                &mut member.net_sent
            } else {
                &mut member.net_received
            },
            bytes,
        );
    }
}

/// Adds `bytes` to the run's counter for the socket's kind, unless its type is `skip`.
#[inline(always)]
fn add_bytes<const SEND: bool>(
    member: &mut TaskMember,
    sk: u64,
    bytes: u64,
    flags: u32,
    skip: u16,
) {
    if !SEND && flags & (MSG_PEEK | MSG_ERRQUEUE) != 0 {
        return;
    }
    let Some(c) = run_counters(member.run) else {
        return;
    };
    let (Some(family), Some((kind, protocol))) =
        (read::<u16>(sk, offset!(sk_family)), type_and_protocol(sk))
    else {
        // Bytes moved that cannot be told apart: say so rather than guess.
        lost(crate::diag_kind::READ_SOCKET, member.run, 0, c);
        return;
    };
    if kind == skip {
        return;
    }
    let (sent, received) = match (family, kind, protocol) {
        (AF_INET | AF_INET6, SOCK_STREAM, IPPROTO_TCP | IPPROTO_MPTCP) => {
            per_thread::<SEND>(member, c, bytes);
            (&mut c.net_tcp_sent, &mut c.net_tcp_received)
        }
        (AF_INET | AF_INET6, SOCK_DGRAM, IPPROTO_UDP | IPPROTO_UDPLITE) => {
            per_thread::<SEND>(member, c, bytes);
            (&mut c.net_udp_sent, &mut c.net_udp_received)
        }
        (AF_UNIX, _, _) => (&mut c.net_unix_sent, &mut c.net_unix_received),
        _ => (&mut c.net_other_sent, &mut c.net_other_received),
    };
    add(if SEND { sent } else { received }, bytes);
    if let Some(ctl) = RUN_CONTROL.get(member.run)
        && ctl.max_network_bytes != 0
    {
        // What `network_bytes_sent` and `_received` count: TCP and UDP.
        let total = load(&c.net_tcp_sent)
            + load(&c.net_udp_sent)
            + load(&c.net_tcp_received)
            + load(&c.net_udp_received);
        if total > ctl.max_network_bytes {
            crate::budget::cross(member.run, cylo_usage_abi::budget::NETWORK, total);
            kill_current();
        }
    }
}
