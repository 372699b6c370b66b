//! The headless browser the picture tests render with (`cylo-usage/tests/render.rs`):
//! Debian's `chromium`, installed when missing (as root, or through `sudo -n`), and handed to
//! the tests as `CYLO_USAGE_CHROMIUM`.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::cmd::run_quiet;

/// `chromium`, installed from Debian's packages if it is not on PATH; `None` (after saying
/// why) where it cannot be installed (not root, no `sudo -n`, no apt).
pub fn ensure_chromium() -> Result<Option<PathBuf>> {
    if let Some(found) = find("chromium") {
        return Ok(Some(found));
    }
    let root = {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    };
    let sudo = !root && find("sudo").is_some();
    if (!root && !sudo) || find("apt-get").is_none() {
        eprintln!(
            "xtask: chromium is missing and cannot be installed here (needs root or sudo, and \
             apt-get): the picture tests will skip"
        );
        return Ok(None);
    }
    eprintln!("xtask: installing chromium (Debian's package) for the picture tests");
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_quiet(&mut cmd)
    };
    // Lists a bare machine may not have yet, or stale ones that name gone versions.
    apt(&["update"])?;
    apt(&["install", "-y", "--no-install-recommends", "chromium"])?;
    match find("chromium") {
        Some(found) => Ok(Some(found)),
        None => bail!("chromium is still missing after installing Debian's package"),
    }
}

fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
