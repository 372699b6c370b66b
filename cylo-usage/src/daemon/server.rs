//! `cylo-usage serve`: one program set for the host, sessions for local clients.
//!
//! The main thread owns the listening socket, the signals and the kernel's run-end
//! notifications; each connection gets a thread of its own, which owns that connection's
//! sessions (so a client that disconnects ends them, by dropping them). Every request is
//! checked against the peer's credentials (`SO_PEERCRED`), read once at accept.
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::DaemonError;
use super::connection::{Connection, set_timeouts};
use super::counters::Counters;
use super::limits::Capacity;
use super::peer::{Access, allowed, in_group, peer_credentials, unmapped_user};
use super::protocol::{self, ErrorKind, Reply};
use super::state::{ServeOptions, State, limit_kind, limit_message};
use crate::kernel::tracker::Tracker;
use crate::sys::lock;

/// Listens where `options` says, or on the socket systemd passed (`activated`).
pub(crate) fn listen(
    options: &ServeOptions,
    activated: Option<RawFd>,
) -> Result<(UnixListener, Option<PathBuf>), DaemonError> {
    if let Some(fd) = activated {
        // SAFETY: systemd passed fd 3 to this process; it is a listening socket we now own.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        return Ok((listener, None));
    }
    let path = &options.socket;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(DaemonError::AlreadyServing { path: path.clone() });
            }
            // A stale socket of a daemon that was killed.
            std::fs::remove_file(path).map_err(|source| DaemonError::Socket {
                path: path.clone(),
                what: "remove the stale socket",
                source,
            })?;
        }
        Ok(_) => {
            return Err(DaemonError::NotASocket { path: path.clone() });
        }
        Err(_) => {}
    }
    // Created with no access for anyone but root, then opened as asked.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| DaemonError::Socket {
        path: path.clone(),
        what: "bind",
        source,
    })?;
    let mode = match options.access {
        Access::Root => 0o600,
        Access::Group(gid) => {
            std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(|source| {
                DaemonError::Socket {
                    path: path.clone(),
                    what: "chown",
                    source,
                }
            })?;
            0o660
        }
        Access::AllUsers => 0o666,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        DaemonError::Socket {
            path: path.clone(),
            what: "chmod",
            source,
        }
    })?;
    Ok((listener, Some(path.clone())))
}

/// The socket passed by systemd's socket activation, if any (`LISTEN_PID` is this process,
/// `LISTEN_FDS` is 1); the variables are removed so that children do not see them.
pub(crate) fn socket_activation() -> Result<Option<RawFd>, DaemonError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    // SAFETY: called before the daemon starts any thread (nothing else reads the environment).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if fds.trim() != "1" {
        return Err(DaemonError::Activation {
            why: format!("LISTEN_FDS={fds}: expected exactly one socket"),
        });
    }
    const FD: RawFd = 3;
    // SAFETY: fcntl on the inherited descriptor; sets close-on-exec.
    unsafe { libc::fcntl(FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Some(FD))
}

pub(crate) fn signal_fd() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset manipulation on a local; signalfd returns a new fd we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Loads the programs, listens, and serves until SIGTERM (or SIGINT, SIGHUP). The hooks are
/// detached while no session is open.
pub fn serve(options: ServeOptions) -> Result<(), DaemonError> {
    // Before any thread exists, so that every thread has them blocked.
    let signals = signal_fd().map_err(|source| DaemonError::Setup {
        what: "signalfd",
        source,
    })?;
    let ceilings = &options.budget_ceilings;
    ceilings
        .check()
        .map_err(|reason| DaemonError::Ceiling { reason })?;
    // Still single-threaded: the environment is read and cleaned before any thread exists.
    let activated = socket_activation()?;
    let tracker = Tracker::load_with_options(options.load).map_err(DaemonError::Load)?;
    tracker.detach_hooks().map_err(DaemonError::Load)?;
    // A ceiling binds every session of the users it is for: one this kernel cannot enforce
    // would refuse them all.
    crate::usage::budgets::needs(ceilings, &tracker.measured()).map_err(|e| {
        DaemonError::Ceiling {
            reason: e.to_string(),
        }
    })?;
    let _stats = if options.bpf_stats {
        Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|source| {
                DaemonError::Setup {
                    what: "BPF_ENABLE_STATS",
                    source: std::io::Error::other(source.to_string()),
                }
            })?,
        )
    } else {
        None
    };
    // Every descriptor the tables may need fits in the limit: the tables shrink to fit.
    let capacity = Capacity::new(
        super::limits::raise_nofile(),
        options.max_sessions_per_user,
        tracker.share_room(),
        options.session_max_tasks,
    );
    let budget_features = tracker.budget_features();
    let state = Arc::new(State {
        tracker,
        budget_features,
        budget: crate::session::budget::Budget::new(
            options.memory_max_bytes,
            options.memory_per_user_bytes,
        ),
        options: options.clone(),
        capacity,
        table: Mutex::default(),
        counters: Counters::default(),
        next_session: AtomicU64::new(1),
        stopping: AtomicBool::new(false),
        sockets: Mutex::default(),
        usage_turns: Mutex::default(),
        hooks: Mutex::default(),
    });
    if let Some(addr) = options.metrics {
        #[cfg(feature = "metrics")]
        super::metrics::start(addr, state.clone())?;
        #[cfg(not(feature = "metrics"))]
        return Err(DaemonError::Metrics {
            addr,
            source: std::io::Error::other("this build has no metrics (the `metrics` feature)"),
        });
    }
    // Listening once everything is ready: a client that connects is served at once.
    let (listener, path) = listen(&options, activated)?;
    listener
        .set_nonblocking(true)
        .map_err(|source| DaemonError::Setup {
            what: "O_NONBLOCK on the socket",
            source,
        })?;
    let events = state
        .tracker
        .events_fd()
        .map_err(|source| DaemonError::Setup {
            what: "dup of the notification ring buffer",
            source,
        })?;
    // Idle hooks are detached on a thread of their own: detaching waits on the kernel, and
    // this loop's accepts and wake-ups must not.
    let idle = Arc::downgrade(&state);
    std::thread::Builder::new()
        .name("idle-detach".to_string())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(250));
                let Some(state) = idle.upgrade() else { break };
                if state.stopping.load(Ordering::Relaxed) {
                    break;
                }
                state.detach_when_idle();
            }
        })
        .map_err(|source| DaemonError::Setup {
            what: "the idle-detach thread",
            source,
        })?;
    let mut next_conn = 0u64;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: events.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: three valid pollfds; a timeout so that missed notifications still wake.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 3, 250) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
        if fds[1].revents != 0 {
            break;
        }
        // Runs that ended: wake their clients.
        let ended = state.tracker.take_run_ends();
        {
            let t = state.table();
            for slot in ended {
                if let Some(fd) = t.wake.get(&slot) {
                    wake(fd);
                }
            }
        }
        if fds[0].revents == 0 {
            continue;
        }
        loop {
            let sock = match listener.accept() {
                Ok((sock, _)) => sock,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                    // Out of descriptors: let the connections drain for a moment.
                    std::thread::sleep(Duration::from_millis(20));
                    break;
                }
                Err(_) => break,
            };
            next_conn += 1;
            accept(&state, sock, next_conn);
        }
    }
    // Stop: every connection ends, which ends its sessions; then the programs unload.
    state.stopping.store(true, Ordering::Relaxed);
    for (_, fd) in lock(&state.sockets).iter() {
        // SAFETY: shutdown on a socket its connection thread still owns; it wakes that thread.
        unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.table().connections > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

pub(crate) fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: an 8-byte write to an eventfd.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Checks a new connection against the limits and starts its thread.
pub(crate) fn accept(state: &Arc<State>, sock: UnixStream, id: u64) {
    state
        .counters
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    let refuse = |sock: &UnixStream, kind, message: String| {
        let _ = sock.set_nonblocking(false);
        let _ = sock.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = protocol::send(sock, &Reply::Error { kind, message }, &[]);
    };
    let Ok(mut peer) = peer_credentials(&sock) else {
        return;
    };
    if unmapped_user(peer) {
        refuse(
            &sock,
            ErrorKind::Permission,
            "the client's user is not mapped into the daemon's user namespace".to_string(),
        );
        return;
    }
    if !allowed(state.options.access, peer) {
        refuse(
            &sock,
            ErrorKind::Permission,
            format!("user {} may not use this daemon", peer.uid),
        );
        return;
    }
    if let (true, Access::Group(gid)) = (state.options.trust_group, state.options.access) {
        peer.privileged |= in_group(peer, gid);
    }
    {
        let mut t = state.table();
        if let Err(limit) = state
            .capacity
            .admit_connection(peer.privileged, &t.open_for(peer.uid))
        {
            drop(t);
            state.counters.refused_for(limit);
            refuse(
                &sock,
                limit_kind(limit),
                limit_message(limit, &state.capacity, peer),
            );
            return;
        }
        t.connections += 1;
        t.update(peer, |h| {
            h.connections += 1;
            h.handshakes += 1;
        });
    }
    lock(&state.sockets).insert(id, sock.as_raw_fd());
    let st = state.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("client-{id}"))
        .stack_size(256 << 10)
        .spawn(move || {
            let _ = sock.set_nonblocking(false);
            let _ = set_timeouts(&sock);
            let mut conn = Connection {
                state: st.clone(),
                sock,
                peer,
                peer_pidfd: crate::sys::pidfd_open(peer.pid).ok(),
                sessions: HashMap::new(),
                greeted: false,
                accepted: Instant::now(),
            };
            // A bug must cost this connection only, never the daemon or its other clients.
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conn.serve()));
            if served.is_err() {
                eprintln!("cylo-usage serve: a connection of user {} failed", peer.uid);
            }
            lock(&st.sockets).remove(&id);
            let greeted = conn.greeted;
            drop(conn);
            let mut t = st.table();
            t.connections -= 1;
            t.update(peer, |h| {
                h.connections -= 1;
                if !greeted {
                    h.handshakes -= 1;
                }
            });
        });
    if spawned.is_err() {
        let mut t = state.table();
        t.connections -= 1;
        t.update(peer, |h| {
            h.connections -= 1;
            h.handshakes -= 1;
        });
        lock(&state.sockets).remove(&id);
    }
}
