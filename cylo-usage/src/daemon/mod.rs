//! One program set per host: `cylo-usage serve` ([`serve`]) loads the programs once and
//! serves tracing sessions to local clients over a Unix socket; [`DaemonTracker`] is the
//! client, with the same surface as an in-process [`crate::Tracker`].
//!
//! Who may do what (the daemon checks each request against the peer's `SO_PEERCRED`):
//! - connecting: root, or as `serve --group` / `--allow-all-users` open it;
//! - spawning: any client, for a command it starts itself (the kernel checks that the
//!   registered thread belongs to the connecting process);
//! - attaching: root to anything; others to a process whose real, effective and saved uids
//!   are all their own;
//! - reading, killing and ending: only the sessions of the same connection. A kill by a
//!   non-root client signals only the members it could signal itself.
//!
//! The wire protocol is described in `docs/protocol.md` (version [`PROTOCOL_VERSION`]).
mod client;
mod conn;
mod connection;
pub(crate) mod counters;
mod event_pipe;
mod limits;
#[cfg(feature = "metrics")]
pub(crate) mod metrics;
mod peer;
pub(crate) mod protocol;
mod remote_run;
mod server;
mod state;

use std::path::PathBuf;

pub use client::DaemonTracker;
pub use conn::{
    HANDSHAKE_DEADLINE, INTERRUPT_GRACE, Interrupt, POLL_DEADLINE, PROMISE_GRACE, REPORT_DEADLINE,
    REQUEST_DEADLINE,
};
pub use peer::Access;
pub use protocol::{ErrorKind, FrameError, VERSION as PROTOCOL_VERSION};
pub use remote_run::RemoteRun;
pub use server::serve;
pub use state::ServeOptions;

/// Where clients and the daemon meet unless `CYLO_USAGE_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/cylo-usage.sock";

/// The socket path: `CYLO_USAGE_SOCKET`, else [`DEFAULT_SOCKET`].
pub fn socket_path() -> PathBuf {
    std::env::var_os("CYLO_USAGE_SOCKET")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// What can go wrong between a client and the daemon, on either side.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The client could not connect to the daemon's socket (no socket, nobody listening, or
    /// a socket this user may not open).
    #[error("cannot connect to the daemon at {path}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// Why it failed: the error of `socket` or `connect`, or `ENAMETOOLONG` for a path
        /// too long.
        #[source]
        source: std::io::Error,
    },
    /// The daemon closed the connection.
    #[error("the daemon went away")]
    Gone,
    /// A request (send and whole reply) took longer than its deadline; the connection is
    /// then dead.
    #[error("the daemon did not answer {request} within {after:?}")]
    Deadline {
        /// The request's name (`hello`, `spawn`, `usage`, ...).
        request: &'static str,
        /// The deadline it had.
        after: std::time::Duration,
    },
    /// A signal waited to be handled (the [`conn::Interrupt`] descriptor was readable) and
    /// the daemon did not answer within the grace left to it; the connection is then dead.
    #[error("{request} was cut short: a signal came while the daemon had not answered")]
    Interrupted {
        /// The request's name.
        request: &'static str,
    },
    /// An earlier request failed in a way that leaves the connection unusable.
    #[error("the connection to the daemon is no longer usable ({why})")]
    Dead {
        /// How that earlier request failed.
        why: String,
    },
    /// The daemon refused the command once it was started: it was killed.
    #[error("the daemon refused the started command, which was killed")]
    RootNotJoined {
        /// The daemon's refusal (a [`DaemonError::Refused`]).
        #[source]
        source: Box<DaemonError>,
    },
    /// The /proc follower that took over from the daemon failed.
    #[error("the /proc follower that took over from the daemon failed")]
    Follower(#[source] crate::session::fallback::FallbackError),
    /// Sending a frame or receiving one failed (other than by the peer closing the
    /// connection: [`DaemonError::Gone`]).
    #[error("talking to the daemon failed")]
    Frame(#[source] protocol::FrameError),
    /// The daemon answered the request with an error.
    #[error("the daemon refused: {message}")]
    Refused {
        /// Why it refused.
        kind: ErrorKind,
        /// What it said.
        message: String,
    },
    /// The daemon's reply was not one the request expects, could not be parsed, or lacked
    /// the descriptors it should carry.
    #[error("the daemon answered {what} with something else")]
    Unexpected {
        /// The request's name.
        what: &'static str,
    },
    /// The client could not start the command.
    #[error("cannot run {program}")]
    Spawn {
        /// The command's program.
        program: String,
        /// The error of the spawn (`fork` or `exec`).
        #[source]
        source: std::io::Error,
    },
    /// A system call of the client failed.
    #[error("{syscall} failed for pid {pid}")]
    Syscall {
        /// The system call (`pidfd_open`, `waitid`, `pidfd_send_signal`, ...).
        syscall: &'static str,
        /// The process it was made for.
        pid: libc::pid_t,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
    /// The root ended, but its exit status could be had neither from the daemon nor from the
    /// /proc follower that took over from it.
    #[error("the root (pid {pid}) ended, but the daemon has no exit status for it")]
    NoExitStatus {
        /// The root's pid.
        pid: libc::pid_t,
    },
    /// `serve` could not prepare its socket (remove a stale one, bind, chown or chmod it).
    #[error("cannot {what} {path}")]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// What failed (`bind`, `chown`, `chmod`, `remove the stale socket`).
        what: &'static str,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
    /// `serve` found a daemon that answers on its socket path already.
    #[error("a daemon already answers at {path}")]
    AlreadyServing {
        /// The socket's path.
        path: PathBuf,
    },
    /// `serve`'s socket path exists and is not a socket; it is left alone.
    #[error("{path} exists and is not a socket; not touching it")]
    NotASocket {
        /// The socket's path.
        path: PathBuf,
    },
    /// systemd's socket activation passed something other than exactly one socket.
    #[error("socket activation: {why}")]
    Activation {
        /// What was wrong with it (the `LISTEN_FDS` passed).
        why: String,
    },
    /// `serve` could not set up something it needs (the signalfd, BPF run-time statistics,
    /// the socket's non-blocking mode, the ring buffer's descriptor, the idle-detach thread).
    #[error("cannot set up the daemon: {what}")]
    Setup {
        /// What could not be set up.
        what: &'static str,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
    /// A budget ceiling of `serve` (`--max-*`) can never be met, or this kernel cannot
    /// enforce it.
    #[error("serve's budget ceiling cannot be used: {reason}")]
    Ceiling {
        /// Why: the option, and what is wrong with it or what the kernel lacks.
        reason: String,
    },
    /// `serve` could not load the eBPF programs (or detach their hooks).
    #[error("cannot load the eBPF programs")]
    Load(#[source] crate::kernel::programs::LoadError),
    /// `serve --metrics` could not serve metrics on `addr` (bind it, or start the thread that
    /// serves it), or this build has no `metrics` feature.
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        /// The TCP address asked for.
        addr: std::net::SocketAddr,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
}

impl From<protocol::FrameError> for DaemonError {
    fn from(e: protocol::FrameError) -> Self {
        match e {
            protocol::FrameError::Closed => DaemonError::Gone,
            other => DaemonError::Frame(other),
        }
    }
}
