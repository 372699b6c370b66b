//! Which kernels to boot: Debian's cloud kernel series, resolved through their suites'
//! meta-package and fetched with a private apt configuration ([`super::apt`]), or a vmlinuz
//! given by path.
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::Args;
use super::apt::{AptSuite, Mirror, sanitize, system_mirror};
use super::arch::Arch;

/// A Debian kernel series and the suites that carry it, in order of preference.
struct Series {
    label: &'static str,
    suites: &'static [&'static str],
}

const SERIES: &[Series] = &[
    Series {
        label: "5.10",
        suites: &["bullseye"],
    },
    Series {
        label: "6.1",
        suites: &["bookworm"],
    },
    Series {
        label: "6.12",
        suites: &["trixie", "bookworm-backports"],
    },
];

/// A kernel ready to boot.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Kernel {
    /// Short name: `6.1`, or the file name of a vmlinuz given by path.
    pub(super) label: String,
    pub(super) arch: Arch,
    /// Debian package and version, suite (None for a vmlinuz given by path).
    pub(super) package: Option<String>,
    pub(super) version: Option<String>,
    pub(super) suite: Option<String>,
    pub(super) vmlinuz: PathBuf,
    /// Staged kernel modules for the scratch disk (`lib/modules/<release>/...` below it),
    /// copied into the initramfs; None for a vmlinuz given by path.
    pub(super) modules: Option<PathBuf>,
}

pub(super) fn resolve_kernels(args: &Args, cache: &Path) -> Result<Vec<Kernel>> {
    let wanted: Vec<String> = if args.kernels.is_empty() {
        SERIES.iter().map(|s| s.label.to_string()).collect()
    } else {
        args.kernels.clone()
    };
    let mut mirror = None;
    let mut kernels = Vec::new();
    for name in wanted {
        if let Some(series) = SERIES.iter().find(|s| s.label == name) {
            if mirror.is_none() {
                mirror = Some(system_mirror()?);
            }
            kernels.push(resolve_debian(
                series,
                args.arch,
                mirror.as_ref().unwrap(),
                cache,
                args.refresh,
            )?);
        } else if Path::new(&name).is_file() {
            let path = fs::canonicalize(&name).with_context(|| format!("resolving {name}"))?;
            // `vmlinuz-6.1.0-50-cloud-amd64` names itself; a bare `vmlinuz` or `bzImage` is
            // named by its folder.
            let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let label = match file.as_deref() {
                Some("vmlinuz" | "bzImage" | "vmlinux") | None => path
                    .parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| name.clone()),
                Some(f) => f.to_string(),
            };
            kernels.push(Kernel {
                label: sanitize(&label),
                arch: args.arch,
                package: None,
                version: None,
                suite: None,
                vmlinuz: path,
                modules: None,
            });
        } else {
            let known: Vec<_> = SERIES.iter().map(|s| s.label).collect();
            bail!(
                "unknown kernel `{name}`: expected one of {} or the path of a vmlinuz",
                known.join(", ")
            );
        }
    }
    Ok(kernels)
}

fn resolve_debian(
    series: &Series,
    arch: Arch,
    mirror: &Mirror,
    cache: &Path,
    refresh: bool,
) -> Result<Kernel> {
    let mut problems = Vec::new();
    let prefix = format!("linux-image-{}.", series.label);
    let meta = arch.kernel_meta_package();
    for suite in series.suites {
        // Kernel updates reach a stable suite through `<suite>-security` first; backports have
        // no security suite.
        let security = mirror.security.is_some() && !suite.contains('-');
        let attempt = |with_security: bool| -> Result<std::result::Result<Kernel, String>> {
            let apt = AptSuite::new(cache, suite, arch, mirror, with_security)?;
            apt.update(refresh)?;
            let (package, version) = apt.resolve(&meta)?;
            if !package.starts_with(&prefix) {
                return Ok(Err(format!("{suite}: {meta} depends on {package}")));
            }
            let (vmlinuz, modules) = apt.fetch_kernel(cache, &package, &version)?;
            Ok(Ok(Kernel {
                label: series.label.to_string(),
                arch,
                package: Some(package),
                version: Some(version),
                suite: Some(if with_security && mirror.security.is_some() {
                    format!("{suite} + {suite}-security")
                } else {
                    suite.to_string()
                }),
                vmlinuz,
                modules: Some(modules),
            }))
        };
        let mut result = attempt(security);
        if security && result.is_err() {
            eprintln!(
                "vm-test: {suite} with {suite}-security failed; trying {suite} alone: {:#}",
                result.as_ref().err().unwrap()
            );
            result = attempt(false);
        }
        match result {
            Ok(Ok(k)) => return Ok(k),
            Ok(Err(problem)) => problems.push(problem),
            Err(e) => problems.push(format!("{suite}: {e:#}")),
        }
    }
    bail!(
        "no {} {arch} kernel found:\n  {}",
        series.label,
        problems.join("\n  ")
    )
}
