//! Kernel modules for the guest's scratch disk: the virtio and ext4 modules a kernel package
//! lacks built in, with their dependencies, staged (decompressed) with `busybox depmod` for
//! `/init` to `modprobe`.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::files::{copy, write};
use crate::cmd::run_quiet;

/// What the guest needs to see `/dev/vda` and mount ext4 on it. Built-in ones are skipped;
/// the others are staged with their dependencies and loaded by `/init`.
const DISK_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];
/// In the staged tree's top: the module list it was staged for (restaged when that changes).
pub(super) const MODULES_STAMP: &str = "staged-for";
/// In `lib/modules/<release>/`: the modules `/init` loads with `modprobe`, one a line.
pub(super) const MODULES_LIST: &str = "vm-test.modules";

pub(super) fn modules_stamp() -> String {
    DISK_MODULES.join("\n") + "\n"
}

/// `kernel/drivers/virtio/virtio_pci.ko.xz` or `crc32c-intel.ko` -> `virtio_pci`, `crc32c_intel`.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let (stem, _) = file.split_once(".ko")?;
    Some(stem.replace('-', "_"))
}

/// The `depends=` field of a module's `.modinfo` section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(|d| d.trim().replace('-', "_"))
        .filter(|d| !d.is_empty())
        .collect()
}

/// A module file's contents, decompressed (busybox modprobe may not read `.ko.xz`).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    } else if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        bail!("{} is not a kernel module", path.display());
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} -dc {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed ({})", path.display(), out.status);
    }
    Ok(out.stdout)
}

/// Copies [`DISK_MODULES`] that are modules (not built in), with their dependencies, from an
/// unpacked kernel package to `out/lib/modules/<release>/` (decompressed), plus the package's
/// `modules.builtin*` and `modules.order`, runs `busybox depmod` there and writes
/// [`MODULES_LIST`]. Returns a one-line summary.
pub(super) fn stage_modules(unpacked: &Path, out: &Path) -> Result<String> {
    let base = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpacked.join(d))
        .find(|d| d.is_dir())
        .context("the package has no lib/modules")?;
    let mut releases = fs::read_dir(&base)
        .with_context(|| format!("reading {}", base.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("kernel").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    let release = releases
        .next()
        .with_context(|| format!("{} holds no <release>/kernel", base.display()))?;
    let src = base.join(&release);
    let builtin: BTreeSet<String> = fs::read_to_string(src.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(module_name)
        .collect();
    // Every module file of the package, by module name.
    let mut index = BTreeMap::new();
    let mut stack = vec![src.join("kernel")];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else if let Some(name) = module_name(&e.file_name().to_string_lossy()) {
                index.insert(name, e.path());
            }
        }
    }

    let dst = out.join("lib/modules").join(&release);
    fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
    let (mut staged, mut in_kernel, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    let mut load = Vec::new();
    let mut todo: Vec<String> = DISK_MODULES.iter().rev().map(|m| m.to_string()).collect();
    let mut seen = BTreeSet::new();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let wanted = DISK_MODULES.contains(&name.as_str());
        if builtin.contains(&name) {
            in_kernel.push(name);
        } else if let Some(path) = index.get(&name) {
            let bytes = read_module(path)?;
            todo.extend(module_depends(&bytes));
            let rel = path.strip_prefix(&src).unwrap().to_string_lossy();
            let rel = &rel[..rel.find(".ko").unwrap() + 3];
            let target = dst.join(rel);
            fs::create_dir_all(target.parent().unwrap())?;
            fs::write(&target, &bytes).with_context(|| format!("writing {}", target.display()))?;
            if wanted {
                load.push(name.clone());
            }
            staged.push(name);
        } else {
            missing.push(name);
        }
    }
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if src.join(f).is_file() {
            copy(&src.join(f), &dst.join(f))?;
        }
    }
    write(
        &dst.join(MODULES_LIST),
        &load.iter().map(|m| format!("{m}\n")).collect::<String>(),
    )?;
    run_quiet(
        Command::new("/bin/busybox")
            .arg("depmod")
            .arg("-b")
            .arg(out)
            .arg(&release),
    )?;
    if !dst.join("modules.dep").is_file() {
        bail!("busybox depmod wrote no {}/modules.dep", dst.display());
    }
    write(&out.join(MODULES_STAMP), &modules_stamp())?;
    let mut summary = format!(
        "{release}: modules staged [{}], built in [{}]",
        staged.join(" "),
        in_kernel.join(" ")
    );
    if !missing.is_empty() {
        summary.push_str(&format!(", missing [{}]", missing.join(" ")));
    }
    write(&out.join("summary"), &summary)?;
    Ok(summary)
}
