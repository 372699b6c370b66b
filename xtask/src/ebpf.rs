//! Building the eBPF object: nightly + `-Z build-std=core` + bpf-linker.
//!
//! Installs what a bare machine lacks: the nightly's `rust-src`, and a bpf-linker built against
//! the nightly's own LLVM library (so the two LLVMs always match).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{output, run};
use crate::paths::{self, EBPF_PACKAGE, EBPF_TARGET};

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Makes sure the nightly toolchain with `rust-src` is there.
fn ensure_nightly() -> Result<PathBuf> {
    let have_nightly = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_nightly {
        eprintln!("xtask: installing the {NIGHTLY} toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if !installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for {NIGHTLY}");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    let sysroot =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    Ok(PathBuf::from(sysroot.trim()))
}

/// The nightly's own LLVM shared library and its major version.
fn nightly_llvm(sysroot: &Path) -> Result<(PathBuf, u32)> {
    let lib = sysroot.join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        // e.g. libLLVM.so.22.1-rust-1.97.0-nightly
        if let Some(rest) = name.strip_prefix("libLLVM.so.") {
            let major = rest.split('.').next().and_then(|m| m.parse::<u32>().ok());
            if let Some(major) = major {
                return Ok((lib.join(&name), major));
            }
        }
    }
    bail!(
        "no libLLVM.so.N* in {}: cannot build a matching bpf-linker",
        lib.display()
    )
}

/// Makes sure `target/tools/bin/bpf-linker` exists and was built against `llvm_lib`.
fn ensure_bpf_linker(llvm_lib: &Path, major: u32) -> Result<PathBuf> {
    let tools = paths::tools_dir();
    let linker = tools.join("bin/bpf-linker");
    let stamp = tools.join("bpf-linker.llvm");
    let want = llvm_lib.display().to_string();
    let current = std::fs::read_to_string(&stamp).unwrap_or_default();
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works && current.trim() == want {
        return Ok(linker);
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against {want} (about a minute)");
    let prefix = tools.join("llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    // `libLLVM.so` for llvm-sys at build time; the library's own file name (its soname) for
    // the loader at run time (the binary gets an rpath to this folder).
    let soname = llvm_lib.file_name().expect("a library file name");
    for link in [
        prefix.join("lib/libLLVM.so"),
        prefix.join("lib").join(soname),
    ] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(llvm_lib, &link)
            .with_context(|| format!("linking {} -> {want}", link.display()))?;
    }
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
            "--root",
        ])
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix)
        // The install must not pick up this workspace's settings.
        .current_dir(&tools))?;
    std::fs::write(&stamp, &want)?;
    Ok(linker)
}

/// Builds the eBPF object and returns its path ([`paths::ebpf_object`]).
pub fn build() -> Result<PathBuf> {
    let sysroot = ensure_nightly()?;
    let (llvm_lib, major) = nightly_llvm(&sysroot)?;
    let linker = ensure_bpf_linker(&llvm_lib, major)?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut search_path = vec![linker.parent().unwrap().to_path_buf()];
    search_path.extend(std::env::split_paths(&path));
    let built = crate::cargo::artifacts(
        Command::new("cargo")
            .arg(format!("+{NIGHTLY}"))
            .args([
                "build",
                "--package",
                EBPF_PACKAGE,
                "--release",
                "--target",
                EBPF_TARGET,
                "-Z",
                "build-std=core",
                "--target-dir",
            ])
            .arg(paths::ebpf_target_dir())
            .env("PATH", std::env::join_paths(search_path)?)
            // Atomic fetch-and-add / compare-and-exchange need BPF ISA v3. Warnings are errors
            // (only for this workspace's crates: cargo caps lints of dependencies). The source
            // folders are remapped: the object does not depend on where they are.
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                paths::ebpf_rustflags(
                    &paths::workspace_root(),
                    paths::cargo_home().as_deref(),
                    &sysroot,
                    true,
                ),
            )
            .env_remove("RUSTFLAGS")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .current_dir(paths::workspace_root()),
    )?;
    // Where cargo says it linked the object must be where the build script looks for it.
    let obj = paths::ebpf_object();
    let linked: Vec<_> = built
        .iter()
        .filter(|a| a.target.name == EBPF_PACKAGE)
        .flat_map(|a| &a.filenames)
        .collect();
    if !linked.iter().any(|f| f.as_std_path() == obj) {
        bail!(
            "cargo linked the eBPF object as {linked:?}, not at {} where cylo-usage/build.rs \
             looks for it",
            obj.display()
        );
    }
    if !obj.exists() {
        bail!("the build finished but {} is missing", obj.display());
    }
    Ok(obj)
}
