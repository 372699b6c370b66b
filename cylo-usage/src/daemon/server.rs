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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::DaemonError;
use super::protocol::{self, ErrorKind, FrameError, MAX_REQUEST, Reply, Request, SessionOptions};
use crate::run::{PendingSpawn, Run, RunOptions, SessionError};
use crate::tracker::{Options, Tracker};
use crate::usage::TrackerKind;

/// The most connections the daemon serves at once (one thread each).
const MAX_CONNECTIONS: usize = 1024;
/// How long a started frame may take to arrive, a reply to be taken, and a prepared spawn to
/// be confirmed, before the daemon gives up on the client.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of event stream the daemon keeps for a client that does not read, per session.
const EVENTS_BACKLOG: usize = 4 << 20;
/// How long the daemon stays idle with its hooks attached before detaching them: back-to-back
/// sessions (a CI executor's jobs) neither wait for a detach nor pay a re-attach.
const IDLE_LINGER: Duration = Duration::from_secs(1);
/// `statfs.f_type` of procfs.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// Who may connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Root only (socket mode 0600).
    Root,
    /// Root and the members of this group (0660, group-owned).
    Group(u32),
    /// Every local user (0666).
    AllUsers,
}

/// How `serve` runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Where to listen (unless socket-activated).
    pub socket: PathBuf,
    pub access: Access,
    /// Sessions one user may hold at once.
    pub max_sessions_per_user: usize,
    /// The most threads one session's tree may have followed at once (its share of the
    /// kernel's maps): past it, that session alone loses tasks, and says so.
    pub session_max_tasks: u32,
    /// Serve Prometheus/OpenMetrics text on this TCP address.
    pub metrics: Option<std::net::SocketAddr>,
    /// Enable the kernel's per-program run-time statistics (they cost a little on every
    /// handler call) and export them.
    pub bpf_stats: bool,
    /// Capacities of the kernel maps.
    pub load: Options,
}

impl ServeOptions {
    /// The defaults for `socket`.
    pub fn new(socket: PathBuf) -> ServeOptions {
        let load = Options::default();
        ServeOptions {
            socket,
            access: Access::Root,
            max_sessions_per_user: 64,
            session_max_tasks: load.max_tasks / 4,
            metrics: None,
            bpf_stats: false,
            load,
        }
    }
}

/// Counters for `--metrics`.
#[derive(Default)]
pub(crate) struct Counters {
    pub sessions_total: AtomicU64,
    pub sessions_refused: AtomicU64,
    pub connections_total: AtomicU64,
    pub requests_total: AtomicU64,
    pub bad_requests_total: AtomicU64,
    /// Lost records of sessions that have ended.
    pub lost_events_ended: AtomicU64,
    /// Event-stream bytes dropped because a client did not read them.
    pub events_dropped_bytes: AtomicU64,
    pub hooks_attached: AtomicU64,
    pub hooks_attach_ns_last: AtomicU64,
    pub hooks_detach_total: AtomicU64,
}

/// The sessions and connections the daemon holds, by user.
#[derive(Default)]
struct Table {
    /// Run slot -> the session's wake-up eventfd.
    wake: HashMap<u32, Arc<OwnedFd>>,
    sessions: usize,
    /// Since when no session is open (while the hooks are still attached).
    idle_since: Option<Instant>,
    sessions_by_uid: HashMap<u32, usize>,
    connections: usize,
    connections_by_uid: HashMap<u32, usize>,
}

pub(crate) struct State {
    pub tracker: Tracker,
    options: ServeOptions,
    table: Mutex<Table>,
    pub counters: Counters,
    next_session: AtomicU64,
    stopping: AtomicBool,
    /// Live connections' sockets, shut down at stop so that their threads end.
    sockets: Mutex<HashMap<u64, RawFd>>,
}

impl State {
    /// Sessions and connections open now.
    pub(crate) fn sessions_and_connections(&self) -> (usize, usize) {
        let t = self.table();
        (t.sessions, t.connections)
    }

    /// Records lost by the sessions open now, and the fill of the membership maps.
    pub(crate) fn kernel_state(&self) -> (u64, Vec<(&'static str, usize, u32)>) {
        let (fill, lost) = self.tracker.map_fill();
        (lost, fill)
    }

    /// Whether the kernel's per-program statistics are on.
    pub(crate) fn bpf_stats(&self) -> bool {
        self.options.bpf_stats
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new session of `uid`, attaching the hooks for the first one.
    fn acquire(self: &Arc<Self>, uid: u32) -> Result<SessionSeat, (ErrorKind, String)> {
        let mut t = self.table();
        let mine = t.sessions_by_uid.get(&uid).copied().unwrap_or(0);
        if mine >= self.options.max_sessions_per_user {
            self.counters
                .sessions_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err((
                ErrorKind::Limit,
                format!(
                    "user {uid} already has {mine} sessions open, the most this daemon allows \
                     (serve --max-sessions-per-user)"
                ),
            ));
        }
        if t.sessions == 0 && !self.tracker.hooks_attached() {
            let start = Instant::now();
            self.tracker.attach_hooks().map_err(|e| {
                (
                    ErrorKind::Failed,
                    format!("cannot attach the hooks: {}", crate::error_chain(&e)),
                )
            })?;
            let ns = start.elapsed().as_nanos() as u64;
            self.counters.hooks_attached.fetch_add(1, Ordering::Relaxed);
            self.counters
                .hooks_attach_ns_last
                .store(ns, Ordering::Relaxed);
        }
        t.sessions += 1;
        t.idle_since = None;
        *t.sessions_by_uid.entry(uid).or_default() += 1;
        Ok(SessionSeat {
            state: self.clone(),
            uid,
            slot: None,
        })
    }
}

/// A session's place in the table; freed (and the hooks detached after the last one) when
/// dropped, after the session's run.
struct SessionSeat {
    state: Arc<State>,
    uid: u32,
    slot: Option<u32>,
}

impl Drop for SessionSeat {
    fn drop(&mut self) {
        let mut t = self.state.table();
        if let Some(slot) = self.slot {
            t.wake.remove(&slot);
        }
        t.sessions = t.sessions.saturating_sub(1);
        if let Some(n) = t.sessions_by_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.sessions_by_uid.remove(&self.uid);
            }
        }
        if t.sessions == 0 {
            // Idle from now: the main loop detaches the hooks once it has lasted IDLE_LINGER.
            t.idle_since = Some(Instant::now());
        }
    }
}

impl State {
    /// Detaches the hooks once no session has been open for [`IDLE_LINGER`], so that an idle
    /// daemon costs the host nothing. Detaching waits for the kernel's RCU grace periods
    /// (milliseconds), which is why it happens here and not in a client's `end`.
    fn detach_when_idle(&self) {
        let mut t = self.table();
        let idle = t
            .idle_since
            .is_some_and(|since| since.elapsed() >= IDLE_LINGER);
        if t.sessions == 0 && idle && self.tracker.hooks_attached() {
            if self.tracker.detach_hooks().is_ok() {
                self.counters
                    .hooks_detach_total
                    .fetch_add(1, Ordering::Relaxed);
            }
            t.idle_since = None;
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Clone, Copy, Debug)]
struct Peer {
    pid: u32,
    uid: u32,
    gid: u32,
}

fn peer_credentials(sock: &UnixStream) -> std::io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_PEERCRED) fills a ucred of the size given.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid as u32,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Whether `peer` may connect under `access` (the socket's mode says the same; this holds
/// for inherited, socket-activated sockets too).
fn allowed(access: Access, peer: Peer) -> bool {
    match access {
        Access::AllUsers => true,
        _ if peer.uid == 0 => true,
        Access::Root => false,
        Access::Group(gid) => {
            peer.gid == gid
                || crate::procfs::read_groups(peer.pid).is_some_and(|g| g.contains(&gid))
        }
    }
}

/// Whether the peer's uid is the overflow uid standing for a user of another user namespace
/// that has no mapping here (it would pass for `nobody`).
fn unmapped_user(peer: Peer) -> bool {
    let overflow = std::fs::read_to_string("/proc/sys/kernel/overflowuid")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(65534);
    if peer.uid != overflow {
        return false;
    }
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/user")).ok();
    match (ns(&peer.pid.to_string()), ns("self")) {
        (Some(theirs), Some(ours)) => theirs != ours,
        // Unknown: the safe answer.
        _ => true,
    }
}

fn set_timeouts(sock: &UnixStream) -> std::io::Result<()> {
    sock.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    sock.set_write_timeout(Some(CLIENT_TIMEOUT))
}

/// Waits until `fd` is readable (or hung up), for at most `timeout` (`None`: for ever).
/// False on timeout.
fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return r != 0;
    }
}

/// Listens where `options` says, or on the socket systemd passed (`activated`).
fn listen(
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
fn socket_activation() -> Result<Option<RawFd>, DaemonError> {
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

fn signal_fd() -> std::io::Result<OwnedFd> {
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
    // Still single-threaded: the environment is read and cleaned before any thread exists.
    let activated = socket_activation()?;
    let tracker = Tracker::load_with_options(options.load).map_err(DaemonError::Load)?;
    tracker.detach_hooks().map_err(DaemonError::Load)?;
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
    let state = Arc::new(State {
        tracker,
        options: options.clone(),
        table: Mutex::default(),
        counters: Counters::default(),
        next_session: AtomicU64::new(1),
        stopping: AtomicBool::new(false),
        sockets: Mutex::default(),
    });
    if let Some(addr) = options.metrics {
        super::metrics::start(addr, state.clone())?;
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
        state.detach_when_idle();
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
    for (_, fd) in state
        .sockets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
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

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: an 8-byte write to an eventfd.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Checks a new connection against the limits and starts its thread.
fn accept(state: &Arc<State>, sock: UnixStream, id: u64) {
    state
        .counters
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    let refuse = |sock: &UnixStream, kind, message: String| {
        let _ = sock.set_nonblocking(false);
        let _ = sock.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = protocol::send(sock, &Reply::Error { kind, message }, &[]);
    };
    let Ok(peer) = peer_credentials(&sock) else {
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
    {
        let mut t = state.table();
        let mine = t.connections_by_uid.get(&peer.uid).copied().unwrap_or(0);
        let per_user = (state.options.max_sessions_per_user * 2).max(8);
        if t.connections >= MAX_CONNECTIONS || (peer.uid != 0 && mine >= per_user) {
            drop(t);
            refuse(
                &sock,
                ErrorKind::Busy,
                "the daemon has too many connections".to_string(),
            );
            return;
        }
        t.connections += 1;
        *t.connections_by_uid.entry(peer.uid).or_default() += 1;
    }
    state
        .sockets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, sock.as_raw_fd());
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
                peer_pidfd: crate::run::pidfd_open(peer.pid).ok(),
                sessions: HashMap::new(),
                greeted: false,
            };
            // A bug must cost this connection only, never the daemon or its other clients.
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conn.serve()));
            if served.is_err() {
                eprintln!("cylo-usage serve: a connection of user {} failed", peer.uid);
            }
            st.sockets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            drop(conn);
            let mut t = st.table();
            t.connections -= 1;
            if let Some(n) = t.connections_by_uid.get_mut(&peer.uid) {
                *n -= 1;
                if *n == 0 {
                    t.connections_by_uid.remove(&peer.uid);
                }
            }
        });
    if spawned.is_err() {
        let mut t = state.table();
        t.connections -= 1;
        if let Some(n) = t.connections_by_uid.get_mut(&peer.uid) {
            *n -= 1;
        }
        state
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// A session of one connection. Fields drop in order: the run (its kernel state is freed),
/// then its seat (the hooks may be detached).
struct DaemonSession {
    stage: Stage,
    wake: Arc<OwnedFd>,
    events_dropped: Option<Arc<AtomicU64>>,
    _seat: SessionSeat,
}

enum Stage {
    /// Registered; waiting for the client's `spawned` (until the deadline).
    Pending(PendingSpawn, Instant),
    Running(Box<Run>),
}

struct Connection {
    state: Arc<State>,
    sock: UnixStream,
    peer: Peer,
    /// Pins the peer process: while it has not exited, its pid is its own.
    peer_pidfd: Option<OwnedFd>,
    sessions: HashMap<u64, DaemonSession>,
    greeted: bool,
}

type Refusal = (ErrorKind, String);

fn refusal(kind: ErrorKind, message: impl Into<String>) -> Refusal {
    (kind, message.into())
}

/// The protocol's refusal for a session error.
fn session_refusal(e: &SessionError) -> Refusal {
    let kind = match e {
        SessionError::NoFreeSlot { .. } => ErrorKind::Busy,
        SessionError::NoSuchProcess { .. } => ErrorKind::NoSuchProcess,
        SessionError::AttachUnsupported { .. } => ErrorKind::Unsupported,
        SessionError::Control {
            code: cylo_usage_abi::control::E_NOT_PEER,
            ..
        } => ErrorKind::Permission,
        _ => ErrorKind::Failed,
    };
    (kind, crate::error_chain(e))
}

impl Connection {
    fn serve(&mut self) {
        loop {
            if self.state.stopping.load(Ordering::Relaxed) {
                return;
            }
            // A prepared spawn must be confirmed in time: its open gate costs every fork on
            // the host a lookup.
            let deadline = self
                .sessions
                .values()
                .filter_map(|s| match s.stage {
                    Stage::Pending(_, d) => Some(d),
                    Stage::Running(_) => None,
                })
                .min();
            let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if !wait_readable(self.sock.as_raw_fd(), timeout) {
                let now = Instant::now();
                self.sessions
                    .retain(|_, s| !matches!(s.stage, Stage::Pending(_, d) if d <= now));
                continue;
            }
            let (body, fds) = match protocol::recv_frame(self.sock.as_raw_fd(), MAX_REQUEST) {
                Ok(frame) => frame,
                Err(FrameError::TooLong { len, max }) => {
                    self.bad(format!(
                        "a request of {len} bytes; at most {max} are allowed"
                    ));
                    return;
                }
                Err(_) => return,
            };
            self.state
                .counters
                .requests_total
                .fetch_add(1, Ordering::Relaxed);
            let request: Request = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    self.bad(format!(
                        "not a request of protocol {}: {e}",
                        protocol::VERSION
                    ));
                    return;
                }
            };
            if !self.greeted && !matches!(request, Request::Hello { .. }) {
                self.bad("the first request must be hello".to_string());
                return;
            }
            let (reply, send_fds, close) = match self.handle(request, fds) {
                Ok((reply, fds)) => (reply, fds, false),
                Err((kind, message)) => {
                    // A request that parsed leaves the connection usable; another version
                    // does not.
                    let close = kind == ErrorKind::Version;
                    if kind == ErrorKind::BadRequest {
                        self.state
                            .counters
                            .bad_requests_total
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    (Reply::Error { kind, message }, Vec::new(), close)
                }
            };
            let raw: Vec<RawFd> = send_fds.iter().map(|f| f.as_raw_fd()).collect();
            if protocol::send(&self.sock, &reply, &raw).is_err() || close {
                return;
            }
        }
    }

    fn bad(&self, message: String) {
        self.state
            .counters
            .bad_requests_total
            .fetch_add(1, Ordering::Relaxed);
        let _ = protocol::send(
            &self.sock,
            &Reply::Error {
                kind: ErrorKind::BadRequest,
                message,
            },
            &[],
        );
    }

    fn handle(
        &mut self,
        request: Request,
        fds: Vec<OwnedFd>,
    ) -> Result<(Reply, Vec<Arc<OwnedFd>>), Refusal> {
        let plain = |reply| Ok((reply, Vec::new()));
        match request {
            Request::Hello { version } => {
                if version != protocol::VERSION {
                    return Err(refusal(
                        ErrorKind::Version,
                        format!(
                            "protocol version {version} is not spoken here; this daemon speaks \
                             {}",
                            protocol::VERSION
                        ),
                    ));
                }
                self.greeted = true;
                plain(Reply::Hello {
                    version: protocol::VERSION,
                    daemon: env!("CARGO_PKG_VERSION").to_string(),
                    uid: self.peer.uid,
                })
            }
            Request::Features => {
                let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                let features = self.state.tracker.features();
                let layout = format!("{:?}", self.state.tracker.offsets());
                plain(Reply::Features {
                    kernel,
                    features,
                    layout,
                })
            }
            Request::Spawn { options } => self.spawn(options, fds),
            Request::Spawned { session, created } => {
                self.session(session)?;
                let DaemonSession {
                    stage,
                    wake,
                    events_dropped,
                    _seat,
                } = self.sessions.remove(&session).expect("looked up above");
                let pending = match stage {
                    Stage::Pending(pending, _) => pending,
                    running @ Stage::Running(_) => {
                        self.sessions.insert(
                            session,
                            DaemonSession {
                                stage: running,
                                wake,
                                events_dropped,
                                _seat,
                            },
                        );
                        return Err(refusal(
                            ErrorKind::BadRequest,
                            format!("session {session} is not waiting for its spawn"),
                        ));
                    }
                };
                // On failure the seat and the wake-up descriptor go with the session.
                let parent = self.peer.pid;
                let run = pending
                    .finish(created, parent)
                    .map_err(|e| session_refusal(&e))?;
                self.sessions.insert(
                    session,
                    DaemonSession {
                        stage: Stage::Running(Box::new(run)),
                        wake,
                        events_dropped,
                        _seat,
                    },
                );
                plain(Reply::Started { session })
            }
            Request::Attach { options } => self.attach(options, fds),
            Request::Status { session } => {
                let run = self.running(session)?;
                let root_status = run
                    .try_wait_root()
                    .ok()
                    .flatten()
                    .map(std::os::unix::process::ExitStatusExt::into_raw);
                let finished = run.is_finished().map_err(|e| session_refusal(&e))?;
                plain(Reply::Status {
                    finished,
                    root_status,
                })
            }
            Request::Usage { session, breakdown } => {
                let dropped = self
                    .session(session)?
                    .events_dropped
                    .as_ref()
                    .map_or(0, |d| d.load(Ordering::Relaxed));
                let run = self.running(session)?;
                let _ = run.try_wait_root();
                let usage = if breakdown {
                    run.usage()
                } else {
                    run.usage_totals()
                };
                let mut usage = usage.map_err(|e| session_refusal(&e))?;
                usage.tracker = TrackerKind::Daemon;
                if dropped > 0 {
                    usage.precision_notes.push(format!(
                        "events: {dropped} bytes of the event stream were dropped because the \
                         client did not read them"
                    ));
                }
                plain(Reply::Usage {
                    usage: Box::new(usage),
                })
            }
            Request::Kill { session, signal } => {
                if !(1..=64).contains(&signal) {
                    return Err(refusal(
                        ErrorKind::BadRequest,
                        format!("{signal} is not a signal number"),
                    ));
                }
                let uid = (self.peer.uid != 0).then_some(self.peer.uid);
                let run = self.running(session)?;
                let n = run.kill_as(signal, uid).map_err(|e| session_refusal(&e))?;
                plain(Reply::Killed {
                    signalled: n as u64,
                })
            }
            Request::TimedOut { session } => {
                self.running(session)?.set_timed_out();
                plain(Reply::Done)
            }
            Request::End { session } => {
                self.session(session)?;
                self.end(session);
                plain(Reply::Done)
            }
        }
    }

    fn session(&self, id: u64) -> Result<&DaemonSession, Refusal> {
        self.sessions.get(&id).ok_or_else(|| {
            refusal(
                ErrorKind::NoSuchSession,
                format!("no session {id} on this connection"),
            )
        })
    }

    fn running(&mut self, id: u64) -> Result<&mut Run, Refusal> {
        match self.sessions.get_mut(&id).map(|s| &mut s.stage) {
            Some(Stage::Running(run)) => Ok(run),
            Some(Stage::Pending(..)) => Err(refusal(
                ErrorKind::BadRequest,
                format!("session {id} has not started: send spawned first"),
            )),
            None => Err(refusal(
                ErrorKind::NoSuchSession,
                format!("no session {id} on this connection"),
            )),
        }
    }

    fn end(&mut self, id: u64) {
        if let Some(s) = self.sessions.remove(&id)
            && let Stage::Running(run) = &s.stage
        {
            run.drain_records();
            if let Ok(c) = run.counters() {
                self.state
                    .counters
                    .lost_events_ended
                    .fetch_add(c.lost_events, Ordering::Relaxed);
            }
            if let Some(d) = &s.events_dropped {
                self.state
                    .counters
                    .events_dropped_bytes
                    .fetch_add(d.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }

    /// The peer's pid as this daemon sees it, while the peer process still runs.
    fn peer_pid(&self) -> Result<u32, Refusal> {
        let alive = self
            .peer_pidfd
            .as_ref()
            .is_some_and(|fd| !wait_readable(fd.as_raw_fd(), Some(Duration::ZERO)));
        if self.peer.pid == 0 || !alive {
            return Err(refusal(
                ErrorKind::Unsupported,
                "the client's process is not visible in the daemon's pid namespace, or has \
                 exited: spawn through the daemon needs the connecting process itself",
            ));
        }
        Ok(self.peer.pid)
    }

    fn run_options(
        &self,
        options: SessionOptions,
        fds: &mut std::vec::IntoIter<OwnedFd>,
    ) -> Result<(RunOptions, Option<Arc<AtomicU64>>), Refusal> {
        let mut dropped = None;
        let events = if options.events {
            let pipe = fds.next().ok_or_else(|| {
                refusal(
                    ErrorKind::BadRequest,
                    "events asked for, but no pipe came with the request",
                )
            })?;
            let (sink, d) = EventPipe::new(pipe).map_err(|e| (ErrorKind::BadRequest, e))?;
            dropped = Some(d);
            Some(Box::new(sink) as crate::tree::EventSink)
        } else {
            None
        };
        let limit = usize::try_from(options.tree_limit).unwrap_or(usize::MAX);
        Ok((
            RunOptions {
                tree: options.tree,
                events,
                tree_limit: limit.min(10_000_000),
                max_tasks: self.state.options.session_max_tasks,
            },
            dropped,
        ))
    }

    fn new_session(
        &mut self,
        stage: Stage,
        seat: SessionSeat,
        dropped: Option<Arc<AtomicU64>>,
    ) -> Result<(u64, Arc<OwnedFd>), Refusal> {
        // SAFETY: eventfd returns a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(refusal(
                ErrorKind::Failed,
                format!("eventfd: {}", std::io::Error::last_os_error()),
            ));
        }
        // SAFETY: fresh descriptor.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let slot = match &stage {
            Stage::Pending(p, _) => p.slot(),
            Stage::Running(r) => r.slot(),
        };
        let mut seat = seat;
        seat.slot = Some(slot);
        self.state.table().wake.insert(slot, wake.clone());
        let id = self.state.next_session.fetch_add(1, Ordering::Relaxed);
        self.state
            .counters
            .sessions_total
            .fetch_add(1, Ordering::Relaxed);
        self.sessions.insert(
            id,
            DaemonSession {
                stage,
                wake: wake.clone(),
                events_dropped: dropped,
                _seat: seat,
            },
        );
        Ok((id, wake))
    }

    fn spawn(
        &mut self,
        options: SessionOptions,
        fds: Vec<OwnedFd>,
    ) -> Result<(Reply, Vec<Arc<OwnedFd>>), Refusal> {
        let mut fds = fds.into_iter();
        let dir = fds.next().ok_or_else(|| {
            refusal(
                ErrorKind::BadRequest,
                "spawn needs the client's /proc/thread-self directory with the request",
            )
        })?;
        check_proc_dir(&dir)?;
        let tgid = self.peer_pid()?;
        let (run_options, dropped) = self.run_options(options, &mut fds)?;
        let seat = self.state.acquire(self.peer.uid)?;
        let pending = self
            .state
            .tracker
            .prepare_remote_spawn(&dir, tgid, run_options)
            .map_err(|e| session_refusal(&e))?;
        let (session, wake) = self.new_session(
            Stage::Pending(pending, Instant::now() + CLIENT_TIMEOUT),
            seat,
            dropped,
        )?;
        Ok((Reply::Prepared { session }, vec![wake]))
    }

    fn attach(
        &mut self,
        options: SessionOptions,
        fds: Vec<OwnedFd>,
    ) -> Result<(Reply, Vec<Arc<OwnedFd>>), Refusal> {
        let mut fds = fds.into_iter();
        let pidfd = fds.next().ok_or_else(|| {
            refusal(
                ErrorKind::BadRequest,
                "attach needs a pidfd of the process with the request",
            )
        })?;
        let pid = pidfd_pid(&pidfd)?;
        if self.peer.uid != 0 {
            let uids = crate::procfs::read_uids(pid)
                .ok_or_else(|| refusal(ErrorKind::NoSuchProcess, format!("no process {pid}")))?;
            if uids[..3].iter().any(|&u| u != self.peer.uid) {
                return Err(refusal(
                    ErrorKind::Permission,
                    format!(
                        "process {pid} does not belong to user {} (its real, effective and saved \
                         uids must all be the client's)",
                        self.peer.uid
                    ),
                ));
            }
            // Still the process the pidfd names (so the uids read were its own).
            if pidfd_pid(&pidfd)? != pid {
                return Err(refusal(
                    ErrorKind::NoSuchProcess,
                    format!("no process {pid}"),
                ));
            }
        }
        let (run_options, dropped) = self.run_options(options, &mut fds)?;
        let seat = self.state.acquire(self.peer.uid)?;
        let run = self
            .state
            .tracker
            .attach_with(pid, run_options)
            .map_err(|e| session_refusal(&e))?;
        let (session, wake) = self.new_session(Stage::Running(Box::new(run)), seat, dropped)?;
        Ok((Reply::Started { session }, vec![wake]))
    }
}

/// Checks that `fd` is a directory of procfs (what `SPAWNER_FD` reads as a `proc_inode`).
fn check_proc_dir(fd: &OwnedFd) -> Result<(), Refusal> {
    // SAFETY: fstatfs/fstat fill plain structs for a valid descriptor.
    let (fs, st) = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatfs(fd.as_raw_fd(), &mut fs) != 0 || libc::fstat(fd.as_raw_fd(), &mut st) != 0
        {
            return Err(refusal(
                ErrorKind::BadRequest,
                "the descriptor sent with spawn cannot be examined",
            ));
        }
        (fs, st)
    };
    if fs.f_type != PROC_SUPER_MAGIC || st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(refusal(
            ErrorKind::BadRequest,
            "the descriptor sent with spawn is not a /proc thread directory",
        ));
    }
    Ok(())
}

/// The pid (as the daemon sees it) of the process behind a pidfd, from its fdinfo.
fn pidfd_pid(fd: &OwnedFd) -> Result<u32, Refusal> {
    let text =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).map_err(|e| {
            refusal(
                ErrorKind::Failed,
                format!("cannot read the pidfd's fdinfo: {e}"),
            )
        })?;
    let pid: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            refusal(
                ErrorKind::BadRequest,
                "the descriptor sent with attach is not a pidfd",
            )
        })?;
    match pid {
        p if p > 0 => Ok(p as u32),
        0 => Err(refusal(
            ErrorKind::Unsupported,
            "the process is not visible in the daemon's pid namespace",
        )),
        _ => Err(refusal(ErrorKind::NoSuchProcess, "the process has exited")),
    }
}

/// The write end of a client's event pipe, never blocking the daemon: what the client does
/// not take in time waits in a bounded backlog, and past it is dropped (and counted).
struct EventPipe {
    fd: OwnedFd,
    backlog: Vec<u8>,
    dropped: Arc<AtomicU64>,
    closed: bool,
}

impl EventPipe {
    fn new(fd: OwnedFd) -> Result<(EventPipe, Arc<AtomicU64>), String> {
        // SAFETY: fstat and fcntl on a valid descriptor.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) != 0
                || st.st_mode & libc::S_IFMT != libc::S_IFIFO
            {
                return Err("the events descriptor is not a pipe".to_string());
            }
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0
                || flags & libc::O_ACCMODE == libc::O_RDONLY
                || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) != 0
            {
                return Err("the events pipe is not writable".to_string());
            }
        }
        let dropped = Arc::new(AtomicU64::new(0));
        Ok((
            EventPipe {
                fd,
                backlog: Vec::new(),
                dropped: dropped.clone(),
                closed: false,
            },
            dropped,
        ))
    }

    /// Writes what it can of the backlog without blocking.
    fn push(&mut self) {
        while !self.backlog.is_empty() && !self.closed {
            // SAFETY: write from a valid buffer to a non-blocking pipe.
            let n = unsafe {
                libc::write(
                    self.fd.as_raw_fd(),
                    self.backlog.as_ptr().cast(),
                    self.backlog.len(),
                )
            };
            if n > 0 {
                self.backlog.drain(..n as usize);
                continue;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return,
                // The client closed its end: the stream is over.
                _ => {
                    self.closed = true;
                    self.backlog.clear();
                }
            }
        }
    }
}

impl std::io::Write for EventPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.closed {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        if self.backlog.len() + buf.len() > EVENTS_BACKLOG {
            self.push();
        }
        if self.backlog.len() + buf.len() > EVENTS_BACKLOG {
            self.dropped.fetch_add(buf.len() as u64, Ordering::Relaxed);
        } else {
            self.backlog.extend_from_slice(buf);
        }
        self.push();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.push();
        Ok(())
    }
}

impl Drop for EventPipe {
    fn drop(&mut self) {
        // The last lines: give a reading client a moment to take them.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.backlog.is_empty() && !self.closed && Instant::now() < deadline {
            self.push();
            if !self.backlog.is_empty() {
                let mut pfd = libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 50) };
            }
        }
        if !self.backlog.is_empty() {
            self.dropped
                .fetch_add(self.backlog.len() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules() {
        let peer = |uid, gid| Peer { pid: 0, uid, gid };
        assert!(allowed(Access::Root, peer(0, 0)));
        assert!(!allowed(Access::Root, peer(1000, 1000)));
        assert!(allowed(Access::Group(50), peer(1000, 50)));
        assert!(!allowed(Access::Group(50), peer(1000, 1000)));
        assert!(allowed(Access::AllUsers, peer(65534, 65534)));
    }

    #[test]
    fn an_event_pipe_that_nobody_reads_never_blocks_and_counts_what_it_drops() {
        use std::io::Write;
        let (r, w) = std::io::pipe().unwrap();
        let (mut sink, dropped) = EventPipe::new(OwnedFd::from(w)).unwrap();
        let line = [b'x'; 1000];
        let start = Instant::now();
        for _ in 0..10_000 {
            sink.write_all(&line).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        // 10 MB written; the pipe holds 64 KiB and the backlog 4 MiB: the rest is dropped.
        let lost = dropped.load(Ordering::Relaxed);
        assert!(
            lost >= 10_000_000 - EVENTS_BACKLOG as u64 - (1 << 20),
            "{lost}"
        );
        drop(r);
        assert!(sink.write(&line).is_err() || sink.closed);
    }

    #[test]
    fn only_procfs_directories_are_taken_as_threads() {
        let dir = std::fs::File::open("/proc/thread-self").unwrap();
        assert!(check_proc_dir(&OwnedFd::from(dir)).is_ok());
        let tmp = std::fs::File::open("/tmp").unwrap();
        assert!(check_proc_dir(&OwnedFd::from(tmp)).is_err());
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(check_proc_dir(&OwnedFd::from(file)).is_err());
    }

    #[test]
    fn pidfds_give_the_pid_and_other_descriptors_are_refused() {
        let fd = crate::run::pidfd_open(std::process::id()).unwrap();
        assert_eq!(pidfd_pid(&fd).unwrap(), std::process::id());
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(
            pidfd_pid(&OwnedFd::from(file)).unwrap_err().0,
            ErrorKind::BadRequest
        );
    }
}
