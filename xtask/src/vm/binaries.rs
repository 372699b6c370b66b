//! The guest's programs: the workspace's test executables and every binary target, built
//! static (glibc `crt-static`) into `target/vm/build`, found in cargo's JSON messages.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::host::elf_has_interp;

/// The target the test binaries are built for (explicit, so build scripts stay dynamic).
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// One test executable from cargo's JSON output.
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

pub(super) fn build_binaries(root: &Path) -> Result<Built> {
    crate::ebpf::build().context("building the eBPF object")?;
    let target_dir = root.join("target/vm/build");
    let cargo_json = |args: &[&str]| -> Result<Vec<serde_json::Value>> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(&cargo);
        cmd.args(args)
            .args([
                "--release",
                "--target",
                TARGET,
                "--message-format=json-render-diagnostics",
                "--target-dir",
            ])
            .arg(&target_dir)
            .current_dir(root)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .stderr(Stdio::inherit());
        let shown = format!(
            "{cargo} {} (static, --target-dir {})",
            args.join(" "),
            target_dir.display()
        );
        eprintln!("vm-test: {shown}");
        let out = cmd.output().with_context(|| format!("running {shown}"))?;
        if !out.status.success() {
            bail!("{shown} failed ({})", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    };

    let mut bins = BTreeSet::new();
    let mut collect_bin = |msg: &serde_json::Value| {
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == false
            && let Some(exe) = msg["executable"].as_str()
        {
            bins.insert(PathBuf::from(exe));
            return Some(
                (msg["target"]["name"].as_str() == Some("cylo-usage")).then(|| PathBuf::from(exe)),
            );
        }
        None
    };
    let mut cylo_usage = None;
    for msg in cargo_json(&["build", "-p", "cylo-usage"])? {
        if let Some(Some(exe)) = collect_bin(&msg) {
            cylo_usage = Some(exe);
        }
    }
    let cylo_usage =
        cylo_usage.context("cargo build -p cylo-usage reported no cylo-usage binary")?;

    let mut tests = Vec::new();
    let mut package_dirs = BTreeSet::new();
    for msg in cargo_json(&["test", "--workspace", "--no-run"])? {
        collect_bin(&msg);
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let manifest_dir = msg["manifest_path"]
            .as_str()
            .map(|p| {
                Path::new(p)
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .to_path_buf()
            })
            .unwrap_or_else(|| root.to_path_buf());
        let package = manifest_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let package = msg["package_id"]
            .as_str()
            .and_then(package_name_from_id)
            .unwrap_or(package);
        let kind = msg["target"]["kind"][0].as_str().unwrap_or("lib");
        let target = msg["target"]["name"].as_str().unwrap_or("?");
        let name = match kind {
            "lib" | "rlib" | "cdylib" | "staticlib" | "proc-macro" => package.clone(),
            k => format!(
                "{package}/{}/{target}",
                if k == "test" { "tests" } else { k }
            ),
        };
        package_dirs.insert(manifest_dir.clone());
        tests.push(TestBinary {
            name,
            executable: PathBuf::from(exe),
            manifest_dir,
        });
    }
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
        target_dir,
        package_dirs,
    })
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
