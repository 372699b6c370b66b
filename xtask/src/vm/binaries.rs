//! The guest's programs: the workspace's test executables and every binary target, built
//! static (glibc `crt-static`) into `target/vm/build`, found in cargo's JSON messages.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cargo_metadata::{Artifact, TargetKind};

use super::host::elf_has_interp;
use crate::{cargo, paths};

/// The target the test binaries are built for (explicit, so build scripts stay dynamic).
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// One test executable.
#[derive(Debug, Clone)]
pub(super) struct TestBinary {
    /// `package` (lib tests), `package/tests/NAME`, `package/bin/NAME`, ...
    pub(super) name: String,
    pub(super) executable: PathBuf,
    /// The package folder: cargo runs tests from there.
    pub(super) manifest_dir: PathBuf,
}

pub(super) struct Built {
    pub(super) tests: Vec<TestBinary>,
    pub(super) cylo_usage: PathBuf,
    /// Every binary target built (tests find them through `CARGO_BIN_EXE_<name>`).
    pub(super) bins: BTreeSet<PathBuf>,
    pub(super) target_dir: PathBuf,
    /// Package folders whose data (fixtures) the guest needs.
    pub(super) package_dirs: BTreeSet<PathBuf>,
}

/// Builds the eBPF object, then `cylo-usage` and every test of the workspace, static, into
/// `target_dir`.
pub(super) fn build_binaries(target_dir: &Path) -> Result<Built> {
    crate::ebpf::build().context("building the eBPF object")?;
    let build = |args: &[&str]| -> Result<Vec<Artifact>> {
        eprintln!(
            "vm-test: cargo {} (static, --target-dir {})",
            args.join(" "),
            target_dir.display()
        );
        cargo::artifacts(
            cargo::command()
                .args(args)
                .args(["--release", "--target", TARGET, "--target-dir"])
                .arg(target_dir)
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .env_remove("CARGO_ENCODED_RUSTFLAGS"),
        )
    };
    let mut artifacts = build(&["build", "-p", "cylo-usage", "-p", "cylo-usage-workload"])?;
    artifacts.extend(build(&["test", "--workspace", "--no-run"])?);

    let mut bins = BTreeSet::new();
    let mut cylo_usage = None;
    let mut tests = Vec::new();
    let mut package_dirs = BTreeSet::new();
    for artifact in artifacts {
        let Some(exe) = artifact.executable.clone() else {
            continue;
        };
        let exe = exe.into_std_path_buf();
        if !artifact.profile.test {
            if artifact.target.name == "cylo-usage" {
                cylo_usage = Some(exe.clone());
            }
            bins.insert(exe);
            continue;
        }
        let manifest_dir = artifact
            .manifest_path
            .parent()
            .map(|p| p.as_std_path().to_path_buf())
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(paths::workspace_root);
        package_dirs.insert(manifest_dir.clone());
        tests.push(TestBinary {
            name: test_name(&artifact, &manifest_dir),
            executable: exe,
            manifest_dir,
        });
    }
    let cylo_usage =
        cylo_usage.context("cargo build -p cylo-usage reported no cylo-usage binary")?;
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    for exe in tests.iter().map(|t| &t.executable).chain(&bins) {
        if elf_has_interp(exe)? {
            bail!(
                "{} is dynamically linked: the guest has no libc (is RUSTFLAGS overridden?)",
                exe.display()
            );
        }
    }
    Ok(Built {
        tests,
        cylo_usage,
        bins,
        target_dir: target_dir.to_path_buf(),
        package_dirs,
    })
}

/// `package` for a library's unit tests, else `package/tests/NAME`, `package/bin/NAME`, ...
fn test_name(artifact: &Artifact, manifest_dir: &Path) -> String {
    let package = package_name_from_id(&artifact.package_id.repr).unwrap_or_else(|| {
        manifest_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    match artifact.target.kind.first() {
        None
        | Some(
            TargetKind::Lib
            | TargetKind::RLib
            | TargetKind::CDyLib
            | TargetKind::StaticLib
            | TargetKind::ProcMacro,
        ) => package,
        Some(TargetKind::Test) => format!("{package}/tests/{}", artifact.target.name),
        Some(kind) => format!("{package}/{kind}/{}", artifact.target.name),
    }
}

/// `path+file:///work/main/cylo-usage#0.1.0` -> `cylo-usage`;
/// `path+file:///x/y#name@0.1.0` -> `name`.
fn package_name_from_id(id: &str) -> Option<String> {
    let (path, frag) = id.rsplit_once('#')?;
    if let Some((name, _)) = frag.split_once('@') {
        return Some(name.to_string());
    }
    path.rsplit('/').next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_packages_from_their_ids() {
        assert_eq!(
            package_name_from_id("path+file:///work/main/cylo-usage#0.1.0").as_deref(),
            Some("cylo-usage")
        );
        assert_eq!(
            package_name_from_id("path+file:///work/main/x#abi@0.1.0").as_deref(),
            Some("abi")
        );
    }
}
