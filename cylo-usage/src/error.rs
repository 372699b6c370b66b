//! [`Error`]: the crate's one error type. Every module's error converts into it, so a
//! library user can `?` everything into one type (and map it to a variant of their own).
use crate::kernel::btf::BtfError;
use crate::kernel::programs::LoadError;
use crate::kernel::resolve::ResolveError;
use crate::session::fallback::FallbackError;
use crate::session::run::SessionError;
use crate::sys::procfs::ProcError;

/// Anything cylo-usage can fail with. Each variant wraps a module's error, which names what
/// failed (which pid, file, syscall or map); [`crate::error_chain`] puts it on one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The eBPF programs could not be loaded (and the /proc fallback was not wanted).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A session of the eBPF tracker failed (spawn, attach, kill, snapshot), or the process
    /// asked for does not exist.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The daemon refused, failed, or went away.
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    /// A session of the /proc fallback failed.
    #[error(transparent)]
    Fallback(#[from] FallbackError),
    /// The kernel's layout could not be resolved from BTF.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// BTF could not be read.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// A read of /proc failed (a permission error included).
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// [`crate::OpenOptions::require_exact`]: the eBPF tracker cannot be used, and the
    /// approximate /proc fallback was refused.
    #[error("exact figures are required, but the eBPF tracker cannot be used")]
    ExactUnavailable {
        /// Why the eBPF programs could not be loaded.
        #[source]
        source: LoadError,
    },
    /// [`crate::OpenOptions::require_exact`]: the daemon answers but refused (or failed),
    /// and the eBPF programs cannot be loaded in this process either.
    #[error(
        "exact figures are required, but {daemon}; and loading the eBPF programs in this \
         process failed"
    )]
    ExactRefused {
        /// What the daemon said (`the daemon at PATH refused: ...`).
        daemon: String,
        /// Why loading the eBPF programs in this process failed.
        #[source]
        source: Box<LoadError>,
    },
}

impl Error {
    /// The process asked for does not exist (or exited meanwhile).
    pub fn is_no_such_process(&self) -> bool {
        matches!(
            self,
            Error::Session(SessionError::NoSuchProcess { .. })
                | Error::Fallback(FallbackError::Target(SessionError::NoSuchProcess { .. }))
        )
    }

    /// A permission error: another user's process, or missing privileges for eBPF.
    pub fn is_permission_denied(&self) -> bool {
        let io = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
        match self {
            Error::Proc(ProcError::Read { source, .. })
            | Error::Session(SessionError::Proc(ProcError::Read { source, .. }))
            | Error::Fallback(FallbackError::Proc(ProcError::Read { source, .. }))
            | Error::Fallback(FallbackError::Target(SessionError::Proc(ProcError::Read {
                source,
                ..
            }))) => io(source),
            Error::Fallback(FallbackError::NotOwnProcess { .. })
            | Error::Load(LoadError::MissingPrivileges { .. })
            | Error::ExactUnavailable {
                source: LoadError::MissingPrivileges { .. },
            } => true,
            Error::ExactRefused { source, .. } => {
                matches!(**source, LoadError::MissingPrivileges { .. })
            }
            _ => false,
        }
    }

    /// The command could not be started: the error of `exec` (or of the fork before it).
    pub fn spawn_error(&self) -> Option<&std::io::Error> {
        match self {
            Error::Session(SessionError::Spawn { source, .. })
            | Error::Fallback(FallbackError::Spawn { source, .. })
            | Error::Daemon(crate::daemon::DaemonError::Spawn { source, .. }) => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn question_mark_everything() -> Result<(), Error> {
        let proc_err: Result<(), ProcError> = Err(ProcError::Read {
            path: "/proc/1/io".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        });
        proc_err?;
        Ok(())
    }

    #[test]
    fn module_errors_convert_and_can_be_told_apart() {
        let e = question_mark_everything().unwrap_err();
        assert!(e.is_permission_denied());
        assert!(!e.is_no_such_process());
        assert!(crate::error_chain(&e).contains("/proc/1/io"));
        let e: Error = SessionError::NoSuchProcess { pid: 7 }.into();
        assert!(e.is_no_such_process());
        let e: Error = FallbackError::from(SessionError::NoSuchProcess { pid: 7 }).into();
        assert!(e.is_no_such_process());
        let e = Error::ExactUnavailable {
            source: LoadError::MissingPrivileges { needed: "CAP_BPF" },
        };
        assert!(e.is_permission_denied());
        let line = crate::error_chain(&e);
        assert!(line.starts_with("exact figures are required"), "{line}");
        assert!(line.contains("CAP_BPF"), "{line}");
        let e = Error::ExactRefused {
            daemon: "the daemon at /s refused: no free run slot".to_string(),
            source: Box::new(LoadError::MissingPrivileges { needed: "CAP_BPF" }),
        };
        assert!(e.is_permission_denied());
        let line = crate::error_chain(&e);
        assert!(
            line.starts_with("exact figures are required, but the daemon at /s refused: no free"),
            "{line}"
        );
        assert!(line.contains("CAP_BPF"), "{line}");
        let e: Error = ResolveError::Layout {
            what: "x",
            detail: "y".into(),
        }
        .into();
        assert!(!e.is_permission_denied());
        let spawn: Error = FallbackError::Spawn {
            program: "nope".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
        .into();
        assert_eq!(
            spawn.spawn_error().map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
    }
}
