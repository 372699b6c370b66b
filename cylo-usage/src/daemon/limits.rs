//! The daemon's capacity: how many connections, handshakes and sessions it serves, what
//! share one user may take, and the room held back for privileged clients (root and, with
//! `serve --trust-group`, the members of `--group`), so that no unprivileged user can lock
//! them out. Pure arithmetic on the descriptor budget and the options, checked by the
//! daemon at accept, at `hello` and at every new session.
use std::time::Duration;

/// Run slots in the kernel's maps (the ABI's `MAX_RUNS`).
pub(crate) const RUN_SLOTS: usize = cylo_usage_abi::MAX_RUNS as usize;
/// The most connections the daemon serves at once (one thread each), when descriptors allow.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// Descriptors the daemon holds besides its connections and sessions (programs, maps, links,
/// the listening socket, signalfd, the metrics endpoint's 65, /proc reads in flight).
const BASE_FDS: u64 = 256;
/// Descriptors one connection holds (its socket and the peer's pidfd).
pub(crate) const CONNECTION_FDS: u64 = 2;
/// Descriptors one session holds at most (wake-up eventfd, events pipe, the spawn's thread
/// directory or the attach's pidfd, the run's pidfd).
pub(crate) const SESSION_FDS: u64 = 4;
/// How long a new connection may take to say `hello` (sshd's LoginGraceTime).
pub(crate) const HELLO_GRACE: Duration = Duration::from_secs(5);

/// A limit the daemon refused a client for: its name in messages and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Limit {
    /// Every run slot the client may use is taken.
    RunSlots,
    /// The user has as many sessions as one user may.
    SessionsPerUser,
    /// Every connection the client may use is taken.
    Connections,
    /// The user has as many connections as one user may.
    ConnectionsPerUser,
    /// Too many connections of unprivileged users have not said hello yet.
    Handshakes,
    /// The user has too many connections that have not said hello yet.
    HandshakesPerUser,
    /// A connection did not say hello within [`HELLO_GRACE`].
    HelloGrace,
    /// A request or reply did not complete within its deadline.
    Deadline,
    /// The kernel maps' room for the sessions of unprivileged users is taken by their
    /// sessions' shares.
    MapShare,
}

impl Limit {
    pub(crate) const ALL: [Limit; 9] = [
        Limit::RunSlots,
        Limit::SessionsPerUser,
        Limit::Connections,
        Limit::ConnectionsPerUser,
        Limit::Handshakes,
        Limit::HandshakesPerUser,
        Limit::HelloGrace,
        Limit::Deadline,
        Limit::MapShare,
    ];

    /// The label in metrics (`reason="..."`) and in refusals.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Limit::RunSlots => "run_slots",
            Limit::SessionsPerUser => "sessions_per_user",
            Limit::Connections => "connections",
            Limit::ConnectionsPerUser => "connections_per_user",
            Limit::Handshakes => "handshakes",
            Limit::HandshakesPerUser => "handshakes_per_user",
            Limit::HelloGrace => "hello_grace",
            Limit::Deadline => "deadline",
            Limit::MapShare => "map_share",
        }
    }
}

/// What the daemon serves at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Capacity {
    /// Connections in all.
    pub connections: usize,
    /// Of them, held back for privileged clients.
    pub reserved_connections: usize,
    /// Connections of one unprivileged user.
    pub connections_per_user: usize,
    /// Connections of unprivileged users that have not said hello yet, in all and per user.
    pub handshakes: usize,
    pub handshakes_per_user: usize,
    /// Sessions (run slots) in all.
    pub sessions: usize,
    /// Of them, held back for privileged clients.
    pub reserved_sessions: usize,
    /// Sessions of one unprivileged user.
    pub sessions_per_user: usize,
    /// Threads a session may have followed at once: its share of the kernel's membership
    /// maps, enforced in the kernel (a task past it is killed at birth).
    pub session_tasks: u64,
    /// Threads the sessions of unprivileged users may have followed together: the sum of
    /// their shares stays within it, so that they cannot fill the maps that root's sessions
    /// (and every other session's new tasks) need. An eighth of the maps' room is held back.
    pub tasks_pool: u64,
}

impl Capacity {
    /// The capacity for a descriptor limit of `nofile` and `sessions_per_user` sessions per
    /// (unprivileged) user: what fits in the descriptors, at most [`MAX_CONNECTIONS`]
    /// connections and [`RUN_SLOTS`] sessions, an eighth of each held back for privileged
    /// clients, one user's connections bounded by twice its sessions. `tasks_room`: the
    /// threads the kernel's maps hold for runs (less their headroom); `session_max_tasks`: a
    /// session's share of them (0: all of it).
    pub(crate) fn new(
        nofile: u64,
        sessions_per_user: usize,
        tasks_room: u32,
        session_max_tasks: u32,
    ) -> Capacity {
        let room = nofile.saturating_sub(BASE_FDS);
        // Sessions first (they are what clients come for), then connections in what is left,
        // at least one connection per session.
        let sessions = ((room / (SESSION_FDS + CONNECTION_FDS)) as usize).clamp(1, RUN_SLOTS);
        let left = room.saturating_sub(sessions as u64 * SESSION_FDS);
        let connections = ((left / CONNECTION_FDS) as usize).clamp(1, MAX_CONNECTIONS);
        let reserved_sessions = (sessions / 8).max(1).min(sessions);
        let reserved_connections = (connections / 8).max(1).min(connections);
        let open_sessions = sessions - reserved_sessions;
        let open_connections = connections - reserved_connections;
        let sessions_per_user = sessions_per_user.clamp(1, open_sessions.max(1));
        let connections_per_user = (sessions_per_user * 2).max(8).min(open_connections.max(1));
        // Handshakes last a moment (or the 5 s grace, for a client that never says hello):
        // a user starting many clients at once must not be refused for them, and no user may
        // hold the whole pool.
        let handshakes = (open_connections / 2).max(1);
        let tasks_room = u64::from(tasks_room.max(1));
        let session_tasks = match u64::from(session_max_tasks) {
            0 => tasks_room,
            n => n.min(tasks_room),
        };
        Capacity {
            connections,
            reserved_connections,
            connections_per_user,
            handshakes,
            handshakes_per_user: (connections_per_user / 2).clamp(1, handshakes),
            sessions,
            reserved_sessions,
            sessions_per_user,
            session_tasks,
            tasks_pool: tasks_room - tasks_room / 8,
        }
    }

    /// Whether a new connection may be served, and if not, which limit says no.
    /// `open`: connections open now in all; `unprivileged`: of them, those of unprivileged
    /// users; `mine`: the user's own; `handshakes`/`my_handshakes`: unprivileged connections
    /// that have not said hello yet, in all and the user's own.
    pub(crate) fn admit_connection(&self, privileged: bool, open: &Open) -> Result<(), Limit> {
        if open.connections >= self.connections {
            return Err(Limit::Connections);
        }
        if privileged {
            return Ok(());
        }
        if open.unprivileged_connections >= self.connections - self.reserved_connections {
            return Err(Limit::Connections);
        }
        if open.my_connections >= self.connections_per_user {
            return Err(Limit::ConnectionsPerUser);
        }
        if open.handshakes >= self.handshakes {
            return Err(Limit::Handshakes);
        }
        if open.my_handshakes >= self.handshakes_per_user {
            return Err(Limit::HandshakesPerUser);
        }
        Ok(())
    }

    /// Whether a new session may start, and if not, which limit says no. Privileged clients
    /// are bound only by the slots themselves.
    pub(crate) fn admit_session(&self, privileged: bool, open: &Open) -> Result<(), Limit> {
        if open.sessions >= self.sessions {
            return Err(Limit::RunSlots);
        }
        if privileged {
            return Ok(());
        }
        if open.my_sessions >= self.sessions_per_user {
            return Err(Limit::SessionsPerUser);
        }
        if open.unprivileged_sessions >= self.sessions - self.reserved_sessions {
            return Err(Limit::RunSlots);
        }
        if open.unprivileged_tasks + self.session_tasks > self.tasks_pool {
            return Err(Limit::MapShare);
        }
        Ok(())
    }
}

/// What is open now, as the limits see it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Open {
    pub connections: usize,
    pub unprivileged_connections: usize,
    pub my_connections: usize,
    pub handshakes: usize,
    pub my_handshakes: usize,
    pub sessions: usize,
    pub unprivileged_sessions: usize,
    pub my_sessions: usize,
    /// The shares of the kernel's maps held by unprivileged users' sessions (threads).
    pub unprivileged_tasks: u64,
}

/// Raises the soft descriptor limit to the hard one (systemd's default soft limit is 1,024)
/// and returns the limit in force.
pub(crate) fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill and read a plain struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// How long a started frame may take to arrive in full, a reply to be taken in full, and a
/// prepared spawn to be confirmed, before the daemon gives up on the client.
pub(crate) const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plenty_of_descriptors_give_the_full_tables_with_room_held_back() {
        let c = Capacity::new(1 << 20, 64, 61_440, 4_096);
        assert_eq!(c.sessions, RUN_SLOTS);
        assert_eq!(c.connections, MAX_CONNECTIONS);
        assert_eq!(c.reserved_sessions, RUN_SLOTS / 8);
        assert_eq!(c.reserved_connections, MAX_CONNECTIONS / 8);
        assert_eq!(c.sessions_per_user, 64);
        assert_eq!(c.connections_per_user, 128);
        assert_eq!(c.handshakes_per_user, 64);
        assert_eq!(c.handshakes, (MAX_CONNECTIONS - MAX_CONNECTIONS / 8) / 2);
    }

    #[test]
    fn a_low_descriptor_limit_shrinks_the_tables_to_what_fits() {
        // systemd's default soft limit, had it not been raised.
        let c = Capacity::new(1024, 64, 61_440, 4_096);
        let fds =
            BASE_FDS + c.sessions as u64 * SESSION_FDS + c.connections as u64 * CONNECTION_FDS;
        assert!(fds <= 1024, "{c:?} needs {fds}");
        assert!(c.sessions >= 100 && c.connections >= c.sessions, "{c:?}");
        assert!(c.sessions_per_user < c.sessions - c.reserved_sessions + 1);
        // Absurdly low: still one of each, never a panic.
        let tiny = Capacity::new(10, 64, 61_440, 4_096);
        assert_eq!((tiny.sessions, tiny.connections), (1, 1));
    }

    #[test]
    fn unprivileged_users_cannot_take_the_room_held_back() {
        let c = Capacity::new(1 << 20, 64, 61_440, 4_096);
        // Every unprivileged connection taken, by many users: root still gets in.
        let full = Open {
            connections: c.connections - c.reserved_connections,
            unprivileged_connections: c.connections - c.reserved_connections,
            ..Open::default()
        };
        assert_eq!(c.admit_connection(false, &full), Err(Limit::Connections));
        assert_eq!(c.admit_connection(true, &full), Ok(()));
        // The same for sessions, and root is not bound by the per-user cap.
        let busy = Open {
            sessions: c.sessions - c.reserved_sessions,
            unprivileged_sessions: c.sessions - c.reserved_sessions,
            my_sessions: 10,
            ..Open::default()
        };
        assert_eq!(c.admit_session(false, &busy), Err(Limit::RunSlots));
        assert_eq!(c.admit_session(true, &busy), Ok(()));
        let root_many = Open {
            sessions: 200,
            my_sessions: 200,
            ..Open::default()
        };
        assert_eq!(c.admit_session(true, &root_many), Ok(()));
        let all = Open {
            sessions: c.sessions,
            ..Open::default()
        };
        assert_eq!(c.admit_session(true, &all), Err(Limit::RunSlots));
    }

    #[test]
    fn one_user_is_bounded_by_its_share() {
        let c = Capacity::new(1 << 20, 4, 61_440, 4_096);
        let mine = Open {
            my_sessions: 4,
            sessions: 4,
            unprivileged_sessions: 4,
            ..Open::default()
        };
        assert_eq!(c.admit_session(false, &mine), Err(Limit::SessionsPerUser));
        let handshaking = Open {
            connections: 4,
            unprivileged_connections: 4,
            my_connections: 4,
            handshakes: 4,
            my_handshakes: 4,
            ..Open::default()
        };
        assert_eq!(
            c.admit_connection(false, &handshaking),
            Err(Limit::HandshakesPerUser)
        );
        let idle = Open {
            connections: 8,
            unprivileged_connections: 8,
            my_connections: 8,
            ..Open::default()
        };
        assert_eq!(
            c.admit_connection(false, &idle),
            Err(Limit::ConnectionsPerUser)
        );
        assert_eq!(c.admit_connection(true, &idle), Ok(()));
    }

    #[test]
    fn limit_names_are_distinct() {
        let mut names: Vec<_> = Limit::ALL.iter().map(|l| l.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Limit::ALL.len());
    }

    #[test]
    fn unprivileged_sessions_share_at_most_seven_eighths_of_the_maps() {
        let c = Capacity::new(1 << 20, 64, 61_440, 16_384);
        assert_eq!((c.session_tasks, c.tasks_pool), (16_384, 53_760));
        let mut open = Open::default();
        // Three shares fit in the pool, a fourth does not, whoever asks.
        for _ in 0..3 {
            assert_eq!(c.admit_session(false, &open), Ok(()));
            open.sessions += 1;
            open.unprivileged_sessions += 1;
            open.unprivileged_tasks += c.session_tasks;
        }
        assert_eq!(c.admit_session(false, &open), Err(Limit::MapShare));
        // Root's sessions draw on the whole room, past the pool.
        assert_eq!(c.admit_session(true, &open), Ok(()));
        // A share larger than the maps is the maps; 0 means all of them.
        let whole = Capacity::new(1 << 20, 64, 61_440, 0);
        assert_eq!(whole.session_tasks, 61_440);
        assert_eq!(
            whole.admit_session(false, &Open::default()),
            Err(Limit::MapShare)
        );
        assert_eq!(Capacity::new(1 << 20, 64, 100, 1_000).session_tasks, 100);
    }
}
