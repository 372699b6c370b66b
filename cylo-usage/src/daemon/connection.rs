//! One client's connection, served by a thread of its own: its requests, each checked against
//! who sent it, and its sessions, which end when it disconnects (they are dropped with it).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::event_pipe::EventPipe;
use super::limits::{CLIENT_TIMEOUT, HELLO_GRACE, Limit};
use super::peer::{Peer, check_proc_dir, pidfd_pid};
use super::protocol::{
    self, ErrorKind, FrameError, MAX_REQUEST, Refusal, Reply, Request, SessionOptions, refusal,
};
use super::state::{SessionSeat, State};
use crate::session::run::{Run, RunOptions, SessionError};
use crate::session::spawn::PendingSpawn;
use crate::sys::lock;
use crate::usage::{Budgets, TrackerKind};

/// How often the daemon checks the budgets of a connection's running sessions itself, for a
/// client that does not ask `status` (which checks them too): a run that crossed one is
/// killed whole by then (the kernel has killed the task that crossed at the crossing).
pub(crate) const BUDGET_CHECK: Duration = Duration::from_millis(250);

/// What a session is started with.
pub(crate) struct SessionSetup {
    pub(crate) run: RunOptions,
    /// Event-stream bytes dropped for a client that did not read them.
    pub(crate) events_dropped: Option<Arc<AtomicU64>>,
    /// The events pipe's read end, for the client.
    pub(crate) events_reader: Option<Arc<OwnedFd>>,
}

/// A session of one connection. Fields drop in order: the run (its kernel state is freed),
/// then its seat (the hooks may be detached).
pub(crate) struct DaemonSession {
    pub(crate) stage: Stage,
    /// The wake-up descriptor the client holds a copy of: open while the session is.
    pub(crate) _wake: Arc<OwnedFd>,
    pub(crate) events_dropped: Option<Arc<AtomicU64>>,
    /// Whether the session has budgets the daemon still checks (until its tree has ended).
    pub(crate) budget_watch: bool,
    pub(crate) seat: SessionSeat,
}

pub(crate) enum Stage {
    /// Registered; waiting for the client's `spawned` (until the deadline).
    Pending(Box<PendingSpawn>, Instant),
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
            if self.budget_watch {
                // A tree that crossed a budget is killed whole, whoever ends the session
                // (the client gone, or the daemon stopping) before anyone asked `status`.
                let _ = run.is_finished();
            }
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

pub(crate) struct Connection {
    pub(crate) state: Arc<State>,
    pub(crate) sock: UnixStream,
    pub(crate) peer: Peer,
    /// Pins the peer process: while it has not exited, its pid is its own.
    pub(crate) peer_pidfd: Option<OwnedFd>,
    pub(crate) sessions: HashMap<u64, DaemonSession>,
    pub(crate) greeted: bool,
    /// When the connection was accepted: it must say hello within [`HELLO_GRACE`].
    pub(crate) accepted: Instant,
}

/// The protocol's refusal for a session error.
pub(crate) fn session_refusal(e: &SessionError) -> Refusal {
    let kind = match e {
        SessionError::NoFreeSlot { .. } => ErrorKind::Busy,
        SessionError::NoSuchProcess { .. } => ErrorKind::NoSuchProcess,
        SessionError::AttachUnsupported { .. } => ErrorKind::Unsupported,
        SessionError::Unenforceable(_) | SessionError::InvalidBudget { .. } => ErrorKind::Budget,
        SessionError::Control {
            code: cylo_usage_abi::control::E_NOT_PEER,
            ..
        } => ErrorKind::Permission,
        _ => ErrorKind::Failed,
    };
    (kind, crate::error_chain(e))
}

/// The refusal of a session's start: [`session_refusal`], and, for a budget the kernel cannot
/// enforce that the client did not ask for (`asked`) but the daemon's ceiling set
/// (`effective`), which `serve` option set it.
pub(crate) fn start_refusal(e: &SessionError, asked: &Budgets, effective: &Budgets) -> Refusal {
    let (kind, mut message) = session_refusal(e);
    if let SessionError::Unenforceable(u) = e
        && let Some(r) = crate::usage::Resource::ALL
            .into_iter()
            .find(|r| r.option() == u.option)
        && effective.limit(r) != asked.limit(r)
    {
        message.push_str(&format!(
            " (a ceiling of this daemon: serve {} {})",
            u.option,
            effective.limit(r).unwrap_or(0)
        ));
    }
    (kind, message)
}

/// The budgets a session runs with: `asked`, within `ceiling` (each the smaller, and the
/// ceiling's where none is asked) unless the client (`uid`) is root; refused if one could
/// never be met.
pub(crate) fn effective_budgets(
    asked: Budgets,
    ceiling: &Budgets,
    uid: u32,
) -> Result<Budgets, String> {
    let budgets = if uid == 0 {
        asked
    } else {
        asked.within(ceiling)
    };
    budgets.check()?;
    Ok(budgets)
}

impl Connection {
    pub(crate) fn serve(&mut self) {
        let mut budget_check = Instant::now() + BUDGET_CHECK;
        loop {
            if self.state.stopping.load(Ordering::Relaxed) {
                return;
            }
            if Instant::now() >= budget_check {
                self.check_budgets();
                budget_check = Instant::now() + BUDGET_CHECK;
            }
            let watched = self.sessions.values().any(|s| s.budget_watch);
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
            let wake = deadline
                .into_iter()
                .chain(watched.then_some(budget_check))
                .min();
            let timeout = wake.map(|d| d.saturating_duration_since(Instant::now()));
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

    /// Kills the trees of the running sessions that crossed a budget (see
    /// [`Run::is_finished`]); a session whose tree has ended is no longer checked.
    pub(crate) fn check_budgets(&mut self) {
        for s in self.sessions.values_mut().filter(|s| s.budget_watch) {
            if let Stage::Running(run) = &s.stage
                && !matches!(run.is_finished(), Ok(false))
            {
                s.budget_watch = false;
            }
        }
    }

    /// What a passed deadline ends: pending spawns not confirmed in time are dropped; a
    /// connection that has not said hello in time is closed (true).
    pub(crate) fn expire(&mut self, now: Instant) -> bool {
        self.sessions
            .retain(|_, s| !matches!(s.stage, Stage::Pending(_, d) if d <= now));
        if !self.greeted && now >= self.accepted + HELLO_GRACE {
            self.state.counters.refused_for(Limit::HelloGrace);
            return true;
        }
        false
    }

    pub(crate) fn bad(&self, message: String) {
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

    pub(crate) fn handle(
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
                let mut features = self.state.tracker.features();
                features.extend(self.state.budget_features.iter().cloned());
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

    pub(crate) fn session(&self, id: u64) -> Result<&DaemonSession, Refusal> {
        self.sessions.get(&id).ok_or_else(|| {
            refusal(
                ErrorKind::NoSuchSession,
                format!("no session {id} on this connection"),
            )
        })
    }

    pub(crate) fn running(&mut self, id: u64) -> Result<&mut Run, Refusal> {
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

    pub(crate) fn end(&mut self, id: u64) {
        if let Some(s) = self.sessions.get(&id)
            && let Stage::Running(run) = &s.stage
        {
            run.drain_records();
        }
        // Its figures go to the daemon's totals as it drops.
        self.sessions.remove(&id);
    }

    /// The peer's pid as this daemon sees it, while the peer process still runs.
    pub(crate) fn peer_pid(&self) -> Result<u32, Refusal> {
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

    /// The budgets a session of this client runs with: those it asked for, within the
    /// daemon's ceilings unless the client is root.
    pub(crate) fn budgets(&self, asked: Budgets) -> Result<Budgets, Refusal> {
        effective_budgets(asked, &self.state.options.budget_ceilings, self.peer.uid)
            .map_err(|reason| refusal(ErrorKind::Budget, format!("invalid budget: {reason}")))
    }

    /// The run's options from the client's, and, with `events`, the event stream's pipe: the
    /// daemon creates it and keeps the write end, so no client can make a write block (a
    /// client's own pipe shares its open file with the client, who could clear
    /// `O_NONBLOCK` on it); the read end goes to the client with the reply. The breakdown
    /// and the backlog draw on the user's memory share.
    pub(crate) fn run_options(&self, options: SessionOptions) -> Result<SessionSetup, Refusal> {
        let budgets = self.budgets(options.budgets)?;
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
                budgets,
                // In the kernel, or refused: the daemon has no sampled enforcement.
                budget_enforcement: crate::usage::Enforcement::Exact,
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

    pub(crate) fn new_session(
        &mut self,
        stage: Stage,
        seat: SessionSeat,
        dropped: Option<Arc<AtomicU64>>,
        budgeted: bool,
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
                budget_watch: budgeted,
                seat,
            },
        );
        Ok((id, wake))
    }

    pub(crate) fn spawn(
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
        let budgets = setup.run.budgets;
        let seat = self.state.acquire(self.peer)?;
        let pending = self
            .state
            .tracker
            .prepare_remote_spawn(&dir, tgid, setup.run)
            .map_err(|e| start_refusal(&e, &options.budgets, &budgets))?;
        let (session, wake) = self.new_session(
            Stage::Pending(Box::new(pending), Instant::now() + CLIENT_TIMEOUT),
            seat,
            setup.events_dropped,
            !budgets.is_empty(),
        )?;
        let mut back = vec![wake];
        back.extend(setup.events_reader);
        Ok((Reply::Prepared { session }, back))
    }

    pub(crate) fn attach(
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
        let budgets = setup.run.budgets;
        let seat = self.state.acquire(self.peer)?;
        let run = self
            .state
            .tracker
            .attach_with(pid as libc::pid_t, setup.run)
            .map_err(|e| start_refusal(&e, &options.budgets, &budgets))?;
        let (session, wake) = self.new_session(
            Stage::Running(Box::new(run)),
            seat,
            setup.events_dropped,
            !budgets.is_empty(),
        )?;
        let mut back = vec![wake];
        back.extend(setup.events_reader);
        Ok((Reply::Started { session }, back))
    }
}

/// How much nicer than the daemon a usage snapshot of a user other than root runs.
pub(crate) const SNAPSHOT_NICENESS: i32 = 10;

/// Runs `f` on this thread at [`SNAPSHOT_NICENESS`] more niceness when `low` (the work of a
/// user other than root: a snapshot reads /proc for each live thread of the tree), then
/// restores the thread's own. Other users' requests (root's, and those of every user's
/// other work) then get the CPU first.
pub(crate) fn at_low_priority<T>(low: bool, f: impl FnOnce() -> T) -> T {
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

pub(crate) fn set_timeouts(sock: &UnixStream) -> std::io::Result<()> {
    sock.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    sock.set_write_timeout(Some(CLIENT_TIMEOUT))
}

/// Waits until `fd` is readable (or hung up), for at most `timeout` (`None`: for ever).
/// False on timeout.
pub(crate) fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_bind_every_client_but_root() {
        let ceiling = Budgets {
            max_processes: Some(10),
            max_memory_bytes: Some(1 << 30),
            ..Budgets::default()
        };
        let asked = |n: Option<u64>| Budgets {
            max_processes: n,
            max_cpu_ns: Some(5),
            ..Budgets::default()
        };
        // A user other than root: the ceiling where none is asked, the smaller of the two.
        let b = effective_budgets(Budgets::default(), &ceiling, 1000).unwrap();
        assert_eq!(b, ceiling);
        let b = effective_budgets(asked(Some(50)), &ceiling, 1000).unwrap();
        assert_eq!(b.max_processes, Some(10));
        assert_eq!(b.max_cpu_ns, Some(5));
        assert_eq!(b.max_memory_bytes, Some(1 << 30));
        let b = effective_budgets(asked(Some(3)), &ceiling, 1000).unwrap();
        assert_eq!(b.max_processes, Some(3));
        // Root: what it asks, nothing more.
        assert_eq!(
            effective_budgets(asked(Some(50)), &ceiling, 0).unwrap(),
            asked(Some(50))
        );
        assert!(
            effective_budgets(Budgets::default(), &ceiling, 0)
                .unwrap()
                .is_empty()
        );
        // Never met: refused, for anyone.
        for uid in [0, 1000] {
            let e = effective_budgets(asked(Some(0)), &ceiling, uid).unwrap_err();
            assert!(e.contains("--max-processes 0"), "{e}");
        }
    }

    #[test]
    fn a_budget_the_kernel_cannot_enforce_is_refused_naming_its_option() {
        let e = SessionError::Unenforceable(crate::usage::budgets::Unenforceable {
            option: "--max-memory",
            reason: "the tree's memory is not measured on this kernel".to_string(),
        });
        let asked = Budgets {
            max_memory_bytes: Some(1 << 20),
            ..Budgets::default()
        };
        let (kind, message) = start_refusal(&e, &asked, &asked);
        assert_eq!(kind, ErrorKind::Budget);
        assert_eq!(
            message,
            "--max-memory cannot be enforced in the kernel here: the tree's memory is not \
             measured on this kernel"
        );
        // Set by the daemon's ceiling, not asked: the message says so.
        let (_, message) = start_refusal(&e, &Budgets::default(), &asked);
        assert!(
            message.ends_with("(a ceiling of this daemon: serve --max-memory 1048576)"),
            "{message}"
        );
        let e = SessionError::InvalidBudget {
            reason: "--max-threads 0 would refuse the command itself".to_string(),
        };
        assert_eq!(session_refusal(&e).0, ErrorKind::Budget);
    }

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
}
