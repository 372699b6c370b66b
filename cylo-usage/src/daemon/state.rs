//! What the daemon shares between its connections: every user's sessions and connections
//! (the [`Table`] the limits are checked against), the tracker, the counters the metrics
//! read, and the detach of the hooks when the daemon is idle.

use std::collections::HashMap;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::counters::Counters;
#[cfg(feature = "metrics")]
use super::counters::Source;
use super::limits::{CLIENT_TIMEOUT, Capacity, HELLO_GRACE, Limit, Open};
use super::peer::{Access, Peer};
use super::protocol::ErrorKind;
#[cfg(feature = "metrics")]
use crate::kernel::tracker::RunsTotals;
use crate::kernel::tracker::{Capacities, Tracker};
use crate::sys::lock;

/// What one user holds.
#[derive(Clone, Copy, Default)]
pub(crate) struct Held {
    pub(crate) sessions: usize,
    pub(crate) connections: usize,
    /// Connections that have not said hello yet.
    pub(crate) handshakes: usize,
    /// The sessions' shares of the kernel's maps (threads).
    pub(crate) tasks: u64,
}

/// The sessions and connections the daemon holds, in all and by user.
#[derive(Default)]
pub(crate) struct Table {
    /// Run slot -> the session's wake-up eventfd.
    pub(crate) wake: HashMap<u32, Arc<OwnedFd>>,
    /// Since when no session is open (while the hooks are still attached).
    pub(crate) idle_since: Option<Instant>,
    pub(crate) sessions: usize,
    pub(crate) connections: usize,
    /// Of the above, those of unprivileged users, and their handshakes in progress.
    pub(crate) unprivileged: Held,
    pub(crate) by_uid: HashMap<u32, Held>,
}

impl Table {
    /// What is open now, as the limits see it, for `uid`.
    pub(crate) fn open_for(&self, uid: u32) -> Open {
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
    pub(crate) fn update(&mut self, peer: Peer, change: impl Fn(&mut Held)) {
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
pub(crate) fn limit_message(limit: Limit, capacity: &Capacity, peer: Peer) -> String {
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
pub(crate) fn limit_kind(limit: Limit) -> ErrorKind {
    match limit {
        Limit::SessionsPerUser | Limit::ConnectionsPerUser | Limit::HandshakesPerUser => {
            ErrorKind::Limit
        }
        _ => ErrorKind::Busy,
    }
}

pub(crate) struct State {
    pub tracker: Tracker,
    /// Which budgets this kernel enforces and how, found once at start (finding out attaches
    /// and detaches hooks: never at a client's request).
    pub(crate) budget_features: Vec<crate::kernel::features::Feature>,
    /// Memory for breakdowns and event backlogs: each session draws on its user's share.
    pub budget: Arc<crate::session::budget::Budget>,
    pub(crate) options: ServeOptions,
    pub(crate) capacity: Capacity,
    pub(crate) table: Mutex<Table>,
    pub counters: Counters,
    pub(crate) next_session: AtomicU64,
    pub(crate) stopping: AtomicBool,
    /// Live connections' sockets, shut down at stop so that their threads end.
    pub(crate) sockets: Mutex<HashMap<u64, RawFd>>,
    /// One turn per user other than root for usage snapshots (see [`State::usage_turn`]).
    pub(crate) usage_turns: Mutex<HashMap<u32, Arc<Mutex<()>>>>,
    /// Held while the hooks are attached or detached (never with the table's lock held:
    /// taken first when both are needed).
    pub(crate) hooks: Mutex<()>,
}

#[cfg(feature = "metrics")]
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
    pub(crate) fn usage_turn(&self, uid: u32) -> Arc<Mutex<()>> {
        let mut turns = lock(&self.usage_turns);
        turns.entry(uid).or_default().clone()
    }

    pub(crate) fn table(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// Counts a new session of `peer`, attaching the hooks for the first one; refused past
    /// the limits (privileged peers are bound only by the run slots).
    pub(crate) fn acquire(
        self: &Arc<Self>,
        peer: Peer,
    ) -> Result<SessionSeat, (ErrorKind, String)> {
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
pub(crate) struct SessionSeat {
    pub(crate) state: Arc<State>,
    pub(crate) peer: Peer,
    pub(crate) slot: Option<u32>,
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
    pub(crate) fn detach_when_idle(&self) {
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

/// How long the daemon stays idle with its hooks attached before detaching them: back-to-back
/// sessions (a CI executor's jobs) neither wait for a detach nor pay a re-attach.
pub(crate) const IDLE_LINGER: Duration = Duration::from_secs(1);

/// How `serve` runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Where to listen (unless socket-activated).
    pub socket: PathBuf,
    /// Who may connect (the socket's owner and mode).
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
    pub load: Capacities,
    /// What all sessions together may hold in memory for breakdowns and unread event
    /// streams, and what the sessions of one user other than root may (see
    /// [`crate::session::budget`]).
    pub memory_max_bytes: u64,
    /// What the sessions of one user other than root may hold in memory, in bytes.
    pub memory_per_user_bytes: u64,
    /// Budget ceilings (`serve --max-*`): the budgets of every session of a client other
    /// than root are within them ([`crate::usage::Budgets::within`]: each the smaller of the
    /// asked and the ceiling, and the ceiling where none is asked). Root's sessions have what
    /// they ask. Checked when the daemon starts: one that can never be met, or that this
    /// kernel cannot enforce, fails `serve`. None by default.
    pub budget_ceilings: crate::usage::Budgets,
}

impl ServeOptions {
    /// The defaults for `socket`.
    pub fn new(socket: PathBuf) -> ServeOptions {
        let load = Capacities::default();
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
            budget_ceilings: crate::usage::Budgets::default(),
        }
    }
}
