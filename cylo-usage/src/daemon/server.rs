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
use super::limits::{Capacity, HELLO_GRACE, Limit, Open};
use super::metrics::{Counters, Source};
use super::protocol::{self, ErrorKind, FrameError, MAX_REQUEST, Reply, Request, SessionOptions};
use crate::kernel::tracker::{Options, RunsTotals, Tracker};
use crate::session::run::{Run, RunOptions, SessionError};
use crate::session::spawn::PendingSpawn;
use crate::sys::lock;
use crate::usage::TrackerKind;

/// How long a started frame may take to arrive in full, a reply to be taken in full, and a
/// prepared spawn to be confirmed, before the daemon gives up on the client.
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
    /// Sessions one unprivileged user may hold at once.
    pub max_sessions_per_user: usize,
    /// The members of `access`'s group are privileged like root: not bound by the per-user
    /// limits, and served from the room held back for privileged clients.
    pub trust_group: bool,
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
    /// What all sessions together may hold in memory for breakdowns and unread event
    /// streams, and what the sessions of one user other than root may (see
    /// [`crate::session::budget`]).
    pub memory_max_bytes: u64,
    pub memory_per_user_bytes: u64,
}

impl ServeOptions {
    /// The defaults for `socket`.
    pub fn new(socket: PathBuf) -> ServeOptions {
        let load = Options::default();
        let memory = crate::session::budget::Budget::for_host();
        ServeOptions {
            memory_max_bytes: memory.global_bytes(),
            memory_per_user_bytes: memory.per_user_bytes(),
            socket,
            access: Access::Root,
            max_sessions_per_user: 64,
            trust_group: false,
            session_max_tasks: load.max_tasks / 16,
            metrics: None,
            bpf_stats: false,
            load,
        }
    }
}

/// What one user holds.
#[derive(Clone, Copy, Default)]
struct Held {
    sessions: usize,
    connections: usize,
    /// Connections that have not said hello yet.
    handshakes: usize,
    /// The sessions' shares of the kernel's maps (threads).
    tasks: u64,
}

/// The sessions and connections the daemon holds, in all and by user.
#[derive(Default)]
struct Table {
    /// Run slot -> the session's wake-up eventfd.
    wake: HashMap<u32, Arc<OwnedFd>>,
    /// Since when no session is open (while the hooks are still attached).
    idle_since: Option<Instant>,
    sessions: usize,
    connections: usize,
    /// Of the above, those of unprivileged users, and their handshakes in progress.
    unprivileged: Held,
    by_uid: HashMap<u32, Held>,
}

impl Table {
    /// What is open now, as the limits see it, for `uid`.
    fn open_for(&self, uid: u32) -> Open {
        let mine = self.by_uid.get(&uid).copied().unwrap_or_default();
        Open {
            connections: self.connections,
            unprivileged_connections: self.unprivileged.connections,
            my_connections: mine.connections,
            handshakes: self.unprivileged.handshakes,
            my_handshakes: mine.handshakes,
            sessions: self.sessions,
            unprivileged_sessions: self.unprivileged.sessions,
            my_sessions: mine.sessions,
            unprivileged_tasks: self.unprivileged.tasks,
        }
    }

    /// Applies `change` to `peer`'s counts and, for an unprivileged peer, to theirs in all;
    /// forgets a user who holds nothing.
    fn update(&mut self, peer: Peer, change: impl Fn(&mut Held)) {
        let held = self.by_uid.entry(peer.uid).or_default();
        change(held);
        if held.sessions == 0 && held.connections == 0 && held.handshakes == 0 && held.tasks == 0 {
            self.by_uid.remove(&peer.uid);
        }
        if !peer.privileged {
            change(&mut self.unprivileged);
        }
    }
}

/// The message a refusal for `limit` carries: which limit, and its value.
fn limit_message(limit: Limit, capacity: &Capacity, peer: Peer) -> String {
    let uid = peer.uid;
    let what = match limit {
        Limit::RunSlots if peer.privileged => {
            format!("all {} run slots are in use", capacity.sessions)
        }
        Limit::Connections if peer.privileged => {
            format!("all {} connections are in use", capacity.connections)
        }
        Limit::RunSlots => format!(
            "all {} run slots unprivileged users may use are in use ({} of {} are held back \
             for root)",
            capacity.sessions - capacity.reserved_sessions,
            capacity.reserved_sessions,
            capacity.sessions
        ),
        Limit::SessionsPerUser => format!(
            "user {uid} already has {} sessions open, the most one user may have \
             (serve --max-sessions-per-user)",
            capacity.sessions_per_user
        ),
        Limit::Connections => format!(
            "all {} connections are in use ({} of them held back for root)",
            capacity.connections, capacity.reserved_connections
        ),
        Limit::ConnectionsPerUser => format!(
            "user {uid} already has {} connections open, the most one user may have",
            capacity.connections_per_user
        ),
        Limit::Handshakes => format!(
            "{} connections are waiting to say hello, the most the daemon takes at once",
            capacity.handshakes
        ),
        Limit::HandshakesPerUser => format!(
            "user {uid} already has {} connections waiting to say hello",
            capacity.handshakes_per_user
        ),
        Limit::HelloGrace => format!("no hello within {} s of connecting", HELLO_GRACE.as_secs()),
        Limit::Deadline => format!(
            "a request or reply took longer than {} s",
            CLIENT_TIMEOUT.as_secs()
        ),
        Limit::MapShare => format!(
            "the kernel maps' room for sessions of users other than root is taken: {} \
             threads in all, {} per session (serve --session-max-tasks)",
            capacity.tasks_pool, capacity.session_tasks
        ),
    };
    format!("{what} (limit: {})", limit.name())
}

/// The protocol's kind for a refusal by `limit`: per-user limits are `limit`, the others
/// `busy`.
fn limit_kind(limit: Limit) -> ErrorKind {
    match limit {
        Limit::SessionsPerUser | Limit::ConnectionsPerUser | Limit::HandshakesPerUser => {
            ErrorKind::Limit
        }
        _ => ErrorKind::Busy,
    }
}

pub(crate) struct State {
    pub tracker: Tracker,
    /// Memory for breakdowns and event backlogs: each session draws on its user's share.
    pub budget: Arc<crate::session::budget::Budget>,
    options: ServeOptions,
    capacity: Capacity,
    table: Mutex<Table>,
    pub counters: Counters,
    next_session: AtomicU64,
    stopping: AtomicBool,
    /// Live connections' sockets, shut down at stop so that their threads end.
    sockets: Mutex<HashMap<u64, RawFd>>,
    /// One turn per user other than root for usage snapshots (see [`State::usage_turn`]).
    usage_turns: Mutex<HashMap<u32, Arc<Mutex<()>>>>,
    /// Held while the hooks are attached or detached (never with the table's lock held:
    /// taken first when both are needed).
    hooks: Mutex<()>,
}

impl Source for State {
    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn sessions_and_connections(&self) -> (usize, usize) {
        let t = self.table();
        (t.sessions, t.connections)
    }

    fn kernel_state(&self) -> (RunsTotals, Vec<(&'static str, usize, u32)>) {
        let _turn = lock(&self.counters.ending);
        let (fill, mut totals) = self.tracker.map_fill();
        let ended = &self.counters.ended;
        totals.lost_events += ended.lost_events.load(Ordering::Relaxed);
        totals.tasks_killed_at_birth += ended.tasks_killed_at_birth.load(Ordering::Relaxed);
        totals.tasks_escaped += ended.tasks_escaped.load(Ordering::Relaxed);
        (totals, fill)
    }

    fn program_stats(&self) -> Option<Vec<(String, u64, u64)>> {
        self.options.bpf_stats.then(|| self.tracker.program_stats())
    }

    fn hooks_attached(&self) -> bool {
        self.tracker.hooks_attached()
    }
}

impl State {
    /// The lock a usage snapshot of a session of `uid` (other than root) holds: a user's
    /// snapshots take their turns, so however many sessions a user polls at once, the
    /// daemon works for that user on one thread at a time (a snapshot reads /proc for every
    /// live thread of the tree: with 2,000 threads, tens of ms of CPU), and the other users'
    /// requests keep the rest of the host's CPUs. Root's snapshots take no turn.
    fn usage_turn(&self, uid: u32) -> Arc<Mutex<()>> {
        let mut turns = lock(&self.usage_turns);
        turns.entry(uid).or_default().clone()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// Counts a new session of `peer`, attaching the hooks for the first one; refused past
    /// the limits (privileged peers are bound only by the run slots).
    fn acquire(self: &Arc<Self>, peer: Peer) -> Result<SessionSeat, (ErrorKind, String)> {
        let mut t = self.table();
        if let Err(limit) = self
            .capacity
            .admit_session(peer.privileged, &t.open_for(peer.uid))
        {
            self.counters
                .sessions_refused
                .fetch_add(1, Ordering::Relaxed);
            self.counters.refused_for(limit);
            return Err((
                limit_kind(limit),
                limit_message(limit, &self.capacity, peer),
            ));
        }
        t.sessions += 1;
        t.idle_since = None;
        let tasks = self.capacity.session_tasks;
        t.update(peer, |h| {
            h.sessions += 1;
            h.tasks += tasks;
        });
        drop(t);
        // From here the seat is counted; dropped on an error below, it is freed again.
        let seat = SessionSeat {
            state: self.clone(),
            peer,
            slot: None,
        };
        // The hooks are attached outside the table's lock: attaching (or a detach going on)
        // can wait on the kernel's RCU grace periods, and meanwhile the other connections'
        // accepts and handshakes must go on. Sessions wait here for the hooks they need.
        let _hooks = lock(&self.hooks);
        if !self.tracker.hooks_attached() {
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
        Ok(seat)
    }
}

/// A session's place in the table; freed (and the hooks detached after the last one) when
/// dropped, after the session's run.
struct SessionSeat {
    state: Arc<State>,
    peer: Peer,
    slot: Option<u32>,
}

impl Drop for SessionSeat {
    fn drop(&mut self) {
        let mut t = self.state.table();
        if let Some(slot) = self.slot {
            t.wake.remove(&slot);
        }
        t.sessions = t.sessions.saturating_sub(1);
        let tasks = self.state.capacity.session_tasks;
        t.update(self.peer, |h| {
            h.sessions = h.sessions.saturating_sub(1);
            h.tasks = h.tasks.saturating_sub(tasks);
        });
        if t.sessions == 0 {
            // Idle from now: the idle-detach thread detaches the hooks once it has lasted
            // IDLE_LINGER.
            t.idle_since = Some(Instant::now());
        }
    }
}

impl State {
    /// Detaches the hooks once no session has been open for [`IDLE_LINGER`], so that an idle
    /// daemon costs the host nothing. Detaching waits for the kernel's RCU grace periods
    /// (milliseconds), which is why it happens here and not in a client's `end`.
    fn detach_when_idle(&self) {
        // The hooks' lock first, then the table's, as `acquire` takes them: a session counted
        // after the check below waits for the hooks' lock and attaches them again.
        let _hooks = lock(&self.hooks);
        {
            let mut t = self.table();
            let idle = t
                .idle_since
                .is_some_and(|since| since.elapsed() >= IDLE_LINGER);
            if t.sessions > 0 || !idle || !self.tracker.hooks_attached() {
                return;
            }
            t.idle_since = None;
        }
        // Outside the table's lock: detaching waits for RCU grace periods (milliseconds, but
        // seconds on a host that is busy in the kernel), and accepts must go on meanwhile.
        if self.tracker.detach_hooks().is_ok() {
            self.counters
                .hooks_detach_total
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Clone, Copy, Debug)]
struct Peer {
    pid: u32,
    uid: u32,
    gid: u32,
    /// Root, or a member of a trusted `--group`: served from the room held back, and not
    /// bound by the per-user limits.
    privileged: bool,
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
        privileged: cred.uid == 0,
    })
}

/// Whether `peer` may connect under `access` (the socket's mode says the same; this holds
/// for inherited, socket-activated sockets too).
fn allowed(access: Access, peer: Peer) -> bool {
    match access {
        Access::AllUsers => true,
        _ if peer.uid == 0 => true,
        Access::Root => false,
        Access::Group(gid) => in_group(peer, gid),
    }
}

/// Whether `peer` is a member of group `gid` (primary or supplementary).
fn in_group(peer: Peer, gid: u32) -> bool {
    peer.gid == gid || crate::sys::procfs::read_groups(peer.pid).is_some_and(|g| g.contains(&gid))
}

/// Whether the peer's uid is the overflow uid standing for a user of another user namespace
/// that has no mapping in the daemon's (it would pass for `nobody`). A daemon whose user
/// namespace maps every uid (the initial one) sees every user as who it is, `nobody` in a
/// user namespace of its own included.
fn unmapped_user(peer: Peer) -> bool {
    let overflow = std::fs::read_to_string("/proc/sys/kernel/overflowuid")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(65534);
    if peer.uid != overflow {
        return false;
    }
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => !maps_every_uid(&map) && !maps_uid(&map, overflow),
        // Unknown: the safe answer.
        Err(_) => true,
    }
}

/// The ranges of a `uid_map` (`inside outside count` per line).
fn uid_ranges(map: &str) -> impl Iterator<Item = (u64, u64)> + '_ {
    map.lines().filter_map(|l| {
        let mut f = l.split_whitespace().map(|v| v.parse::<u64>().ok());
        let (Some(Some(inside)), Some(Some(_)), Some(Some(count))) = (f.next(), f.next(), f.next())
        else {
            return None;
        };
        Some((inside, count))
    })
}

/// Whether a `uid_map` maps all 2^32 - 1 uids (the initial user namespace's).
fn maps_every_uid(map: &str) -> bool {
    uid_ranges(map).map(|(_, count)| count).sum::<u64>() >= u32::MAX as u64
}

/// Whether `uid` (as the daemon's namespace sees it) is mapped there: a real user of that
/// namespace may then have it.
fn maps_uid(map: &str, uid: u32) -> bool {
    uid_ranges(map).any(|(inside, count)| (inside..inside + count).contains(&(uid as u64)))
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
    // Every descriptor the tables may need fits in the limit: the tables shrink to fit.
    let capacity = Capacity::new(
        super::limits::raise_nofile(),
        options.max_sessions_per_user,
        tracker.share_room(),
        options.session_max_tasks,
    );
    let state = Arc::new(State {
        tracker,
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

/// What a session is started with.
struct SessionSetup {
    run: RunOptions,
    /// Event-stream bytes dropped for a client that did not read them.
    events_dropped: Option<Arc<AtomicU64>>,
    /// The events pipe's read end, for the client.
    events_reader: Option<Arc<OwnedFd>>,
}

/// A session of one connection. Fields drop in order: the run (its kernel state is freed),
/// then its seat (the hooks may be detached).
struct DaemonSession {
    stage: Stage,
    /// The wake-up descriptor the client holds a copy of: open while the session is.
    _wake: Arc<OwnedFd>,
    events_dropped: Option<Arc<AtomicU64>>,
    seat: SessionSeat,
}

enum Stage {
    /// Registered; waiting for the client's `spawned` (until the deadline).
    Pending(PendingSpawn, Instant),
    Running(Box<Run>),
    /// Its run has gone (while it is being replaced, or dropped).
    Ended,
}

impl Drop for DaemonSession {
    /// However the session ends (`end`, the connection closing, the daemon stopping), what
    /// its run failed to follow and what its client did not read go to the daemon's totals,
    /// at the moment its run frees its slot: a scrape sees the figures once, in the live
    /// runs or in the ended ones.
    fn drop(&mut self) {
        let counters = &self.seat.state.counters;
        if let Some(d) = &self.events_dropped {
            counters
                .events_dropped_bytes
                .fetch_add(d.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        if let Stage::Running(run) = std::mem::replace(&mut self.stage, Stage::Ended) {
            let _turn = lock(&counters.ending);
            if let Ok(c) = run.counters() {
                let ended = &counters.ended;
                ended
                    .lost_events
                    .fetch_add(c.lost_events, Ordering::Relaxed);
                ended
                    .tasks_killed_at_birth
                    .fetch_add(c.tasks_killed_at_birth, Ordering::Relaxed);
                ended
                    .tasks_escaped
                    .fetch_add(c.tasks_escaped, Ordering::Relaxed);
            }
            drop(run);
        }
    }
}

struct Connection {
    state: Arc<State>,
    sock: UnixStream,
    peer: Peer,
    /// Pins the peer process: while it has not exited, its pid is its own.
    peer_pidfd: Option<OwnedFd>,
    sessions: HashMap<u64, DaemonSession>,
    greeted: bool,
    /// When the connection was accepted: it must say hello within [`HELLO_GRACE`].
    accepted: Instant,
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
            // the host a lookup. A new connection must say hello in time.
            let pending = self
                .sessions
                .values()
                .filter_map(|s| match s.stage {
                    Stage::Pending(_, d) => Some(d),
                    Stage::Running(_) | Stage::Ended => None,
                })
                .min();
            let hello = (!self.greeted).then(|| self.accepted + HELLO_GRACE);
            let deadline = pending.into_iter().chain(hello).min();
            let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if !wait_readable(self.sock.as_raw_fd(), timeout) {
                if self.expire(Instant::now()) {
                    return;
                }
                continue;
            }
            // One deadline for the whole frame, however it trickles in; a pending spawn's or
            // the hello's comes first if sooner.
            let frame_deadline = deadline
                .into_iter()
                .chain([Instant::now() + CLIENT_TIMEOUT])
                .min();
            let received =
                protocol::recv_frame_until(self.sock.as_raw_fd(), MAX_REQUEST, frame_deadline);
            let (body, fds) = match received {
                Ok(frame) => frame,
                Err(FrameError::TooLong { len, max }) => {
                    self.bad(format!(
                        "a request of {len} bytes; at most {max} are allowed"
                    ));
                    return;
                }
                Err(FrameError::Deadline) => {
                    // Cut off mid-frame: there is no way to find the next frame's start.
                    let limit = if self.greeted {
                        Limit::Deadline
                    } else {
                        Limit::HelloGrace
                    };
                    self.state.counters.refused_for(limit);
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
            // One deadline for the whole reply, however slowly the client takes it.
            let deadline = Some(Instant::now() + CLIENT_TIMEOUT);
            match protocol::send_until(&self.sock, &reply, &raw, deadline) {
                Err(FrameError::Deadline) => {
                    self.state.counters.refused_for(Limit::Deadline);
                    return;
                }
                Err(_) => return,
                Ok(()) if close => return,
                Ok(()) => {}
            }
        }
    }

    /// What a passed deadline ends: pending spawns not confirmed in time are dropped; a
    /// connection that has not said hello in time is closed (true).
    fn expire(&mut self, now: Instant) -> bool {
        self.sessions
            .retain(|_, s| !matches!(s.stage, Stage::Pending(_, d) if d <= now));
        if !self.greeted && now >= self.accepted + HELLO_GRACE {
            self.state.counters.refused_for(Limit::HelloGrace);
            return true;
        }
        false
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
                if !self.greeted {
                    self.greeted = true;
                    let peer = self.peer;
                    self.state.table().update(peer, |h| h.handshakes -= 1);
                }
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
                let s = self.sessions.get_mut(&session).expect("looked up above");
                if !matches!(s.stage, Stage::Pending(..)) {
                    return Err(refusal(
                        ErrorKind::BadRequest,
                        format!("session {session} is not waiting for its spawn"),
                    ));
                }
                let Stage::Pending(pending, _) = std::mem::replace(&mut s.stage, Stage::Ended)
                else {
                    unreachable!("checked above");
                };
                let parent = self.peer.pid;
                match pending.finish(created, parent) {
                    Ok(run) => s.stage = Stage::Running(Box::new(run)),
                    Err(e) => {
                        // The seat and the wake-up descriptor go with the session.
                        self.sessions.remove(&session);
                        return Err(session_refusal(&e));
                    }
                }
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
                let turn = (self.peer.uid != 0).then(|| self.state.usage_turn(self.peer.uid));
                let _turn = turn.as_ref().map(|t| lock(t));
                let low = self.peer.uid != 0;
                let run = self.running(session)?;
                let _ = run.try_wait_root();
                let usage = at_low_priority(low, || {
                    if breakdown {
                        run.usage()
                    } else {
                        run.usage_totals()
                    }
                });
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
            Some(Stage::Ended) | None => Err(refusal(
                ErrorKind::NoSuchSession,
                format!("no session {id} on this connection"),
            )),
        }
    }

    fn end(&mut self, id: u64) {
        if let Some(s) = self.sessions.get(&id)
            && let Stage::Running(run) = &s.stage
        {
            run.drain_records();
        }
        // Its figures go to the daemon's totals as it drops.
        self.sessions.remove(&id);
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

    /// The run's options from the client's, and, with `events`, the event stream's pipe: the
    /// daemon creates it and keeps the write end, so no client can make a write block (a
    /// client's own pipe shares its open file with the client, who could clear
    /// `O_NONBLOCK` on it); the read end goes to the client with the reply. The breakdown
    /// and the backlog draw on the user's memory share.
    fn run_options(&self, options: SessionOptions) -> Result<SessionSetup, Refusal> {
        let mut events = None;
        let mut events_dropped = None;
        let mut events_reader = None;
        let memory = self.state.budget.account(self.peer.uid);
        if options.events {
            let (reader, sink, dropped) = EventPipe::create(memory.clone()).map_err(|e| {
                refusal(
                    ErrorKind::Failed,
                    format!("cannot make the events pipe: {e}"),
                )
            })?;
            events = Some(Box::new(sink) as crate::session::breakdown::EventSink);
            events_dropped = Some(dropped);
            events_reader = Some(Arc::new(reader));
        }
        let limit = usize::try_from(options.tree_limit).unwrap_or(usize::MAX);
        Ok(SessionSetup {
            run: RunOptions {
                tree: options.tree,
                events,
                tree_limit: limit.min(10_000_000),
                // Every session's share; those of unprivileged users come out of their
                // pool (`Capacity::admit_session`).
                max_tasks: u32::try_from(self.state.capacity.session_tasks).unwrap_or(u32::MAX),
                memory,
                // A non-root client sees the figures of the members it could read itself.
                viewer: (self.peer.uid != 0).then_some(crate::session::viewer::Viewer {
                    uid: self.peer.uid,
                    gid: self.peer.gid,
                }),
            },
            events_dropped,
            events_reader,
        })
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
            Stage::Ended => unreachable!("a new session has a run or a pending spawn"),
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
                _wake: wake.clone(),
                events_dropped: dropped,
                seat,
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
        if fds.next().is_some() {
            return Err(refusal(
                ErrorKind::BadRequest,
                "spawn takes one descriptor (the daemon makes the events pipe itself)",
            ));
        }
        check_proc_dir(&dir)?;
        let tgid = self.peer_pid()?;
        let setup = self.run_options(options)?;
        let seat = self.state.acquire(self.peer)?;
        let pending = self
            .state
            .tracker
            .prepare_remote_spawn(&dir, tgid, setup.run)
            .map_err(|e| session_refusal(&e))?;
        let (session, wake) = self.new_session(
            Stage::Pending(pending, Instant::now() + CLIENT_TIMEOUT),
            seat,
            setup.events_dropped,
        )?;
        let mut back = vec![wake];
        back.extend(setup.events_reader);
        Ok((Reply::Prepared { session }, back))
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
        if fds.next().is_some() {
            return Err(refusal(
                ErrorKind::BadRequest,
                "attach takes one descriptor (the daemon makes the events pipe itself)",
            ));
        }
        let pid = pidfd_pid(&pidfd)?;
        if self.peer.uid != 0 {
            let uids = crate::sys::procfs::read_uids(pid)
                .ok_or_else(|| refusal(ErrorKind::NoSuchProcess, format!("no process {pid}")))?;
            if uids[..3].iter().any(|&u| u != self.peer.uid) {
                return Err(refusal(
                    ErrorKind::Permission,
                    format!(
                        "process {pid} does not belong to user {}: one may attach only to one's \
                         own processes (its real, effective and saved uids must all be the \
                         client's)",
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
        let setup = self.run_options(options)?;
        let seat = self.state.acquire(self.peer)?;
        let run = self
            .state
            .tracker
            .attach_with(pid, setup.run)
            .map_err(|e| session_refusal(&e))?;
        let (session, wake) =
            self.new_session(Stage::Running(Box::new(run)), seat, setup.events_dropped)?;
        let mut back = vec![wake];
        back.extend(setup.events_reader);
        Ok((Reply::Started { session }, back))
    }
}

/// How much nicer than the daemon a usage snapshot of a user other than root runs.
const SNAPSHOT_NICENESS: i32 = 10;

/// Runs `f` on this thread at [`SNAPSHOT_NICENESS`] more niceness when `low` (the work of a
/// user other than root: a snapshot reads /proc for each live thread of the tree), then
/// restores the thread's own. Other users' requests (root's, and those of every user's
/// other work) then get the CPU first.
fn at_low_priority<T>(low: bool, f: impl FnOnce() -> T) -> T {
    if !low {
        return f();
    }
    // SAFETY: gettid has no arguments; it names this thread.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // getpriority returns the niceness, and -1 both for nice -1 and for an error: errno
    // tells them apart.
    // SAFETY: errno is this thread's; getpriority reads this thread's niceness.
    let old = unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid);
        (n != -1 || *libc::__errno_location() == 0).then_some(n)
    };
    let Some(old) = old else {
        return f();
    };
    let low = (old + SNAPSHOT_NICENESS).min(19);
    // SAFETY: sets this thread's niceness only; a failure leaves it as it was.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, low) };
    let out = f();
    // Back up (the daemon, root, may raise it again).
    // SAFETY: as above.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, old) };
    out
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

/// The pid (as the daemon sees it) of the process behind a pidfd, from its fdinfo. A thread's
/// pidfd (`PIDFD_THREAD`, Linux 6.9) is taken when the thread leads its process, and refused
/// with a message saying so otherwise.
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
        p if p > 0 => {
            // PIDFD_THREAD is O_EXCL on the pidfd's open file.
            // SAFETY: F_GETFL on a valid descriptor.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
            if flags >= 0 && flags & libc::O_EXCL != 0 {
                let tgid = crate::sys::procfs::read_tgid(p as u32);
                if tgid != Some(p as u32) {
                    return Err(refusal(
                        ErrorKind::BadRequest,
                        format!(
                            "the pidfd names thread {p}, not a process (PIDFD_THREAD): attach \
                             takes a pidfd of the process{}",
                            tgid.map(|t| format!(" ({t})")).unwrap_or_default()
                        ),
                    ));
                }
            }
            Ok(p as u32)
        }
        0 => Err(refusal(
            ErrorKind::Unsupported,
            "the process is not visible in the daemon's pid namespace",
        )),
        _ => Err(refusal(ErrorKind::NoSuchProcess, "the process has exited")),
    }
}

/// The write end of a session's event pipe, never blocking the daemon: what the client does
/// not take in time waits in a bounded backlog, and past it is dropped (and counted).
struct EventPipe {
    fd: OwnedFd,
    backlog: Vec<u8>,
    dropped: Arc<AtomicU64>,
    closed: bool,
    /// The session's memory account, charged with the backlog's bytes.
    memory: crate::session::budget::Share,
}

/// The size the daemon asks for its event pipes (the kernel's default is 64 KiB).
const EVENTS_PIPE_SIZE: i32 = 1 << 20;

impl EventPipe {
    /// A new pipe: its read end (for the client), and its write end as a sink that never
    /// blocks (`O_NONBLOCK` on an open file only the daemon holds), its backlog charged to
    /// `memory`.
    fn create(
        memory: crate::session::budget::Share,
    ) -> std::io::Result<(OwnedFd, EventPipe, Arc<AtomicU64>)> {
        let mut ends = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors from pipe2.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        // The read end is the client's: it may block on it as it likes. A larger pipe (a hint:
        // the kernel may refuse it) lets a reader that is briefly busy lose nothing.
        // SAFETY: fcntl on descriptors we own.
        unsafe {
            let flags = libc::fcntl(reader.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
            libc::fcntl(writer.as_raw_fd(), libc::F_SETPIPE_SZ, EVENTS_PIPE_SIZE);
        }
        let dropped = Arc::new(AtomicU64::new(0));
        Ok((
            reader,
            EventPipe {
                fd: writer,
                backlog: Vec::new(),
                dropped: dropped.clone(),
                closed: false,
                memory,
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
                self.memory.give_back(n as u64);
                continue;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return,
                // The client closed its end: the stream is over.
                _ => {
                    self.closed = true;
                    self.memory.give_back(self.backlog.len() as u64);
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
        // Past the session's backlog, or past its user's memory share: dropped, counted.
        if self.backlog.len() + buf.len() > EVENTS_BACKLOG
            || self.memory.try_take(buf.len() as u64).is_err()
        {
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
    fn low_priority_work_runs_nicer_and_the_thread_gets_its_niceness_back() {
        let nice = || {
            // SAFETY: reads this thread's niceness.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, tid)
            }
        };
        std::thread::spawn(move || {
            let before = nice();
            let during = at_low_priority(true, nice);
            assert_eq!(during, (before + SNAPSHOT_NICENESS).min(19));
            // Raising it back needs CAP_SYS_NICE (the daemon is root).
            if crate::missing_privileges().ok().flatten().is_none() {
                assert_eq!(nice(), before);
            }
            assert_eq!(at_low_priority(false, nice), nice());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn access_rules() {
        let peer = |uid, gid| Peer {
            pid: 0,
            uid,
            gid,
            privileged: uid == 0,
        };
        assert!(allowed(Access::Root, peer(0, 0)));
        assert!(!allowed(Access::Root, peer(1000, 1000)));
        assert!(allowed(Access::Group(50), peer(1000, 50)));
        assert!(!allowed(Access::Group(50), peer(1000, 1000)));
        assert!(allowed(Access::AllUsers, peer(65534, 65534)));
    }

    #[test]
    fn an_event_pipe_that_nobody_reads_never_blocks_and_counts_what_it_drops() {
        use std::io::Write;
        let (r, mut sink, dropped) =
            EventPipe::create(crate::session::budget::Share::unlimited()).unwrap();
        // All the client holds is the read end, a file of its own: whatever it does to that
        // file's flags cannot make the daemon's writes block.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(r.as_raw_fd(), libc::F_GETFL);
            assert_eq!(
                flags & libc::O_NONBLOCK,
                0,
                "the client's end blocks for the client"
            );
            libc::fcntl(r.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            let wflags = libc::fcntl(sink.fd.as_raw_fd(), libc::F_GETFL);
            assert_ne!(wflags & libc::O_NONBLOCK, 0);
        }
        let line = [b'x'; 1000];
        let start = Instant::now();
        for _ in 0..10_000 {
            sink.write_all(&line).unwrap();
        }
        let bound = if std::env::var_os("CYLO_USAGE_VM").is_some() {
            25
        } else {
            5
        };
        assert!(start.elapsed() < Duration::from_secs(bound));
        // 10 MB written; the pipe holds at most 1 MiB and the backlog 4 MiB: the rest is
        // dropped.
        let lost = dropped.load(Ordering::Relaxed);
        assert!(
            lost >= 10_000_000 - EVENTS_BACKLOG as u64 - (2 << 20),
            "{lost}"
        );
        drop(r);
        assert!(sink.write(&line).is_err() || sink.closed);
    }

    #[test]
    fn only_an_unmapped_overflow_uid_is_refused() {
        let init = "         0          0 4294967295\n";
        assert!(maps_every_uid(init));
        let container = "         0     100000      65536\n";
        assert!(!maps_every_uid(container));
        assert!(maps_uid(container, 65534));
        assert!(!maps_uid(container, 65536));
        let narrow = "0 1000 1\n1 100000 1000\n";
        assert!(!maps_uid(narrow, 65534));
        assert!(maps_uid(narrow, 0) && maps_uid(narrow, 1000));
        assert!(!maps_every_uid(""));
        assert!(!maps_uid("garbage line\n", 0));
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
        let fd = crate::sys::pidfd_open(std::process::id()).unwrap();
        assert_eq!(pidfd_pid(&fd).unwrap(), std::process::id());
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(
            pidfd_pid(&OwnedFd::from(file)).unwrap_err().0,
            ErrorKind::BadRequest
        );
    }
}
