//! The guest's static busybox: the host's `/bin/busybox` for a guest of the host's own
//! architecture; for another, Debian's `busybox-static` of the guest's architecture, fetched
//! through the private apt configuration ([`super::apt`]) of the host's suite and kept in the
//! cache. (The host's busybox still lists the applets and packs the initramfs.)
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::apt::{AptSuite, sanitize, system_mirror};
use super::arch::Arch;
use super::files::{copy, set_mode};
use super::host::{elf_has_interp, elf_machine};
use crate::cmd::run_quiet;

/// The Debian package of a static busybox.
const PACKAGE: &str = "busybox-static";
/// The suite the guest's busybox comes from when the host's is not a Debian one.
const DEFAULT_SUITE: &str = "bookworm";

/// The static busybox to put in the guest's initramfs.
pub(super) fn guest_busybox(arch: Arch, cache: &Path, refresh: bool) -> Result<PathBuf> {
    if Arch::host() == Some(arch) {
        return Ok(PathBuf::from("/bin/busybox"));
    }
    let suite = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| os_release_codename(&text))
        .unwrap_or_else(|| DEFAULT_SUITE.to_string());
    let mirror = system_mirror()?;
    // With the security suite, as the kernels of the same suite have it (one set of lists).
    let apt = AptSuite::new(cache, &suite, arch, &mirror, mirror.security.is_some())?;
    apt.update(refresh)?;
    let version = apt.version(PACKAGE)?;
    let kept = cache
        .join("busybox")
        .join(sanitize(&version))
        .join("busybox");
    if !kept.is_file() {
        let deb = apt.download(cache, PACKAGE, &version)?;
        let tmp = cache.join("tmp-busybox");
        let _ = fs::remove_dir_all(&tmp);
        run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        let unpacked = ["bin/busybox", "usr/bin/busybox"]
            .iter()
            .map(|p| tmp.join(p))
            .find(|p| p.is_file())
            .with_context(|| format!("{} holds no bin/busybox", deb.display()))?;
        let partial = kept.with_extension("partial");
        copy(&unpacked, &partial)?;
        set_mode(&partial, 0o755)?;
        fs::rename(&partial, &kept)
            .with_context(|| format!("moving {} to {}", partial.display(), kept.display()))?;
        let _ = fs::remove_dir_all(&tmp);
    }
    if elf_has_interp(&kept)? {
        bail!("{} is dynamically linked", kept.display());
    }
    let machine = elf_machine(&kept)?;
    if machine != arch.elf_machine() {
        bail!(
            "{} is for ELF machine {machine}, not {arch} ({})",
            kept.display(),
            arch.elf_machine()
        );
    }
    Ok(kept)
}

/// `VERSION_CODENAME` of an os-release file.
fn os_release_codename(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_codename() {
        let text = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_ID=\"12\"\n\
                    VERSION_CODENAME=bookworm\nID=debian\n";
        assert_eq!(os_release_codename(text).as_deref(), Some("bookworm"));
        assert_eq!(os_release_codename("ID=debian\nVERSION_CODENAME=\n"), None);
        assert_eq!(
            os_release_codename("VERSION_CODENAME=\"trixie\"\n").as_deref(),
            Some("trixie")
        );
    }
}
