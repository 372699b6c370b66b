//! The headless browser the picture tests render with (`cylo-usage/tests/render.rs`):
//! Debian's `chromium`, installed when missing (as root, or through `sudo -n`), and handed to
//! the tests as `CYLO_USAGE_CHROMIUM`.
use anyhow::{Result, bail};
use std::path::PathBuf;

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
    crate::cmd::apt_install(&["chromium"])?;
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
