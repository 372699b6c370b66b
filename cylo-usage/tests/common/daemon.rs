//! A real `cylo-usage serve` on a private socket, for the daemon's tests; killed (and its
//! folder removed) when dropped.
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{CLI, ebpf_required};

/// Whether the daemon can load its programs here, or a skip (a failure in CI).
pub fn privileged() -> bool {
    match cylo_usage::missing_privileges() {
        Ok(None) => true,
        _ if ebpf_required() => panic!("CYLO_USAGE_REQUIRE_EBPF=1 but this process lacks CAP_BPF"),
        _ => {
            eprintln!("SKIPPED: the daemon needs CAP_BPF and CAP_PERFMON (run as root)");
            false
        }
    }
}

pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

/// A folder of this test process for `name`, emptied, that others may enter (0755).
pub fn scratch_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("cylo-usage-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

impl Daemon {
    /// `cylo-usage serve --socket DIR/sock ARGS`, once it listens.
    pub fn start(name: &str, args: &[&str]) -> Daemon {
        Daemon::start_with(name, args, None)
    }

    /// [`Daemon::start`] with a descriptor limit of `nofile` (soft and hard), when given.
    pub fn start_with(name: &str, args: &[&str], nofile: Option<u64>) -> Daemon {
        let dir = scratch_dir(name);
        let socket = dir.join("sock");
        let mut c = Command::new(CLI);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe.
            unsafe {
                c.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        c.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null());
        let d = Daemon {
            child: c.spawn().unwrap(),
            socket,
            dir,
        };
        d.wait_ready();
        d
    }

    /// Waits (up to 120 s: a socket-activated or emulated daemon loads its programs first)
    /// until the socket answers.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `cylo-usage ARGS` as a client of this daemon (no stdin).
    pub fn client(&self, args: &[&str]) -> Command {
        let mut c = Command::new(CLI);
        c.args(args)
            .env("CYLO_USAGE_SOCKET", &self.socket)
            .stdin(Stdio::null());
        c
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Kills the daemon now (SIGKILL) and reaps it.
    pub fn sigkill(&mut self) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.sigkill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The next reply on `s`, raw (None if the daemon closed the connection).
pub fn reply(s: &mut UnixStream) -> Option<serde_json::Value> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).ok()?;
    let mut body = vec![0; u32::from_le_bytes(head) as usize];
    s.read_exact(&mut body).ok()?;
    Some(serde_json::from_slice(&body).unwrap())
}

/// Whether the daemon has closed `s` (or sends nothing within 30 s).
pub fn closed(s: &mut UnixStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

/// One protocol frame: the body's length (4 bytes, little-endian), then the body.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// The JSON report in a command's standard error (where `run` writes it).
pub fn json(out: &std::process::Output) -> serde_json::Value {
    json_in(&out.stderr, out)
}

/// The JSON report in a command's standard output (where `attach` writes it).
pub fn json_stdout(out: &std::process::Output) -> serde_json::Value {
    json_in(&out.stdout, out)
}

fn json_in(stream: &[u8], out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(stream);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report in: {out:?}"));
    serde_json::from_str(line).unwrap()
}
