//! Running a command with an error that names the command and how it ended.
use std::fmt;
use std::process::{Command, ExitStatus};

use anyhow::Result;

/// Lines of a failed command's output kept in its [`Error`].
const TAIL_LINES: usize = 15;

/// A command that could not be started, or that failed.
#[derive(Debug)]
pub enum Error {
    /// The program could not be run (missing, not executable, ...).
    Spawn {
        /// The command line, as `Command`'s `Debug` shows it.
        command: String,
        source: std::io::Error,
    },
    /// It ran and exited unsuccessfully (or was killed).
    Failed {
        command: String,
        status: ExitStatus,
        /// The last lines of its stderr, then stdout, when they were captured.
        output: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Spawn { command, .. } => write!(f, "cannot run {command}"),
            Error::Failed {
                command,
                status,
                output,
            } => {
                write!(f, "{command} failed ({status})")?;
                if !output.is_empty() {
                    write!(f, ":\n{output}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Spawn { source, .. } => Some(source),
            Error::Failed { .. } => None,
        }
    }
}

/// The command line as shown in errors and progress lines.
pub fn shown(cmd: &Command) -> String {
    format!("{cmd:?}")
}

/// `Ok` for a successful exit, else [`Error::Failed`] with `output`.
pub fn check(cmd: &Command, status: ExitStatus, output: String) -> Result<(), Error> {
    if status.success() {
        Ok(())
    } else {
        Err(Error::Failed {
            command: shown(cmd),
            status,
            output,
        })
    }
}

/// Runs `cmd` with the terminal's stdin, stdout and stderr; fails unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|source| Error::Spawn {
        command: shown(cmd),
        source,
    })?;
    Ok(check(cmd, status, String::new())?)
}

/// Runs `cmd` and returns its stdout; on failure the error holds the end of its output.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|source| Error::Spawn {
        command: shown(cmd),
        source,
    })?;
    check(cmd, out.status, tail(&out.stderr, &out.stdout))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with its output captured, shown only when it fails.
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

/// Installs Debian `packages` (after `apt-get update`), as root or through `sudo -n`.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() == 0 };
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        };
        cmd.args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_quiet(&mut cmd)
    };
    apt(&["update"])?;
    apt(&[&["install", "-y", "--no-install-recommends"][..], packages].concat())
}

/// The last [`TAIL_LINES`] lines of `stderr` followed by `stdout`.
fn tail(stderr: &[u8], stdout: &[u8]) -> String {
    let (stderr, stdout) = (
        String::from_utf8_lossy(stderr),
        String::from_utf8_lossy(stdout),
    );
    let lines: Vec<&str> = stderr.lines().chain(stdout.lines()).collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_program_and_the_status() {
        let err = output(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"sh\""), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.ends_with("err\nout"), "{err}");
        let err = run(&mut Command::new("/nonexistent/program")).unwrap_err();
        assert!(matches!(
            err.downcast_ref::<Error>(),
            Some(Error::Spawn { .. })
        ));
        assert!(err.to_string().contains("/nonexistent/program"));
        assert_eq!(output(Command::new("echo").arg("hi")).unwrap(), "hi\n");
    }
}
