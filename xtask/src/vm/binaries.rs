//! The guest's programs: the workspace's test executables and every binary target, built
//! static (glibc `crt-static`) for the guest's architecture into `target/vm/build`, found in
//! cargo's JSON messages. A guest of another architecture than the host's is linked by
//! Debian's cross gcc, against its static glibc ([`super::host`] installs both), with the
//! Rust target added through rustup when missing.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cargo_metadata::{Artifact, TargetKind};

use super::arch::Arch;
use super::host::{elf_has_interp, elf_machine};
use crate::cmd::{output, run};
use crate::{cargo, paths};

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

/// Builds the eBPF object, then `cylo-usage` and every test of the workspace, static, for
/// `arch` into `target_dir`.
pub(super) fn build_binaries(arch: Arch, target_dir: &Path) -> Result<Built> {
    crate::ebpf::build().context("building the eBPF object")?;
    let target = arch.rust_target();
    ensure_rust_target(target)?;
    let build = |args: &[&str]| -> Result<Vec<Artifact>> {
        eprintln!(
            "vm-test: cargo {} (static, --target {target}, --target-dir {})",
            args.join(" "),
            target_dir.display()
        );
        let mut cmd = cargo::command();
        cmd.args(args)
            .args(["--release", "--target", target, "--target-dir"])
            .arg(target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        if let Some(cross) = arch.cross_gcc() {
            cmd.env(arch.linker_env(), cross.gcc);
        }
        cargo::artifacts(&mut cmd)
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
        let machine = elf_machine(exe)?;
        if machine != arch.elf_machine() {
            bail!(
                "{} is for ELF machine {machine}, not {arch} ({})",
                exe.display(),
                arch.elf_machine()
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

/// Adds the Rust standard library of `target` (rustup) when the toolchain lacks it.
fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = output(std::process::Command::new("rustc").args(["--print", "sysroot"]))
        .map(|sysroot| {
            Path::new(sysroot.trim())
                .join("lib/rustlib")
                .join(target)
                .join("lib")
                .is_dir()
        })
        .context("asking rustc for its sysroot")?;
    if !installed {
        eprintln!("vm-test: adding the Rust target {target} (rustup)");
        run(std::process::Command::new("rustup").args(["target", "add", target]))
            .with_context(|| format!("adding the Rust target {target}"))?;
    }
    Ok(())
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
