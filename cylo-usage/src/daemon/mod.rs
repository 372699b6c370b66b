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
pub use protocol::{ErrorKind, VERSION as PROTOCOL_VERSION};
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
    #[error("cannot connect to the daemon at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon went away")]
    Gone,
    /// A request (send and whole reply) took longer than its deadline; the connection is
    /// then dead.
    #[error("the daemon did not answer {request} within {after:?}")]
    Deadline {
        request: &'static str,
        after: std::time::Duration,
    },
    /// A signal waited to be handled (the [`conn::Interrupt`] descriptor was readable) and
    /// the daemon did not answer within the grace left to it; the connection is then dead.
    #[error("{request} was cut short: a signal came while the daemon had not answered")]
    Interrupted { request: &'static str },
    /// An earlier request failed in a way that leaves the connection unusable.
    #[error("the connection to the daemon is no longer usable ({why})")]
    Dead { why: String },
    /// The daemon refused the command once it was started: it was killed.
    #[error("the daemon refused the started command, which was killed")]
    RootNotJoined {
        #[source]
        source: Box<DaemonError>,
    },
    /// The /proc follower that took over from the daemon failed.
    #[error("the /proc follower that took over from the daemon failed")]
    Follower(#[source] crate::session::fallback::FallbackError),
    #[error("talking to the daemon failed")]
    Frame(#[source] protocol::FrameError),
    #[error("the daemon refused: {message}")]
    Refused { kind: ErrorKind, message: String },
    #[error("the daemon answered {what} with something else")]
    Unexpected { what: &'static str },
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{syscall} failed for pid {pid}")]
    Syscall {
        syscall: &'static str,
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the root (pid {pid}) ended, but the daemon has no exit status for it")]
    NoExitStatus { pid: u32 },
    #[error("cannot {what} {path}")]
    Socket {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("a daemon already answers at {path}")]
    AlreadyServing { path: PathBuf },
    #[error("{path} exists and is not a socket; not touching it")]
    NotASocket { path: PathBuf },
    #[error("socket activation: {why}")]
    Activation { why: String },
    #[error("cannot set up the daemon: {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the eBPF programs")]
    Load(#[source] crate::kernel::programs::LoadError),
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: std::net::SocketAddr,
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
