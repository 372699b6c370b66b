//! Embeds the eBPF object, or stops with one line saying what to do. Where the object comes
//! from, first found:
//! 1. `CYLO_USAGE_EBPF_OBJECT`, a path (any object built by `cargo xtask build-ebpf`);
//! 2. inside this workspace, what `cargo xtask build-ebpf` built (`target/ebpf/...`);
//! 3. a published package's own copy (`ebpf/cylo-usage-ebpf.o`, put there by `cargo xtask
//!    package`), checked against the SHA-256 packaged with it;
//! 4. the workspace's sources without the object (a git dependency's checkout, a fresh clone
//!    built without xtask): built here as `cargo xtask build-ebpf` builds it, into `OUT_DIR`,
//!    when the nightly toolchain with `rust-src` and a `bpf-linker` on `PATH` are there; else
//!    the build stops with one line saying what to install.
//!
//! What is embedded is that object without its DWARF and its BTF line info (`ebpf_strip.rs`;
//! `CYLO_USAGE_EBPF_LINE_INFO=1` keeps the line info, for verifier logs with source lines),
//! written into `OUT_DIR`. Its SHA-256 is handed to the crate as `CYLO_USAGE_EBPF_SHA256`
//! (the CLI's `--version` names it).
use std::path::PathBuf;

// `ebpf_object_in`, `PACKAGED_OBJECT`, `PACKAGED_SHA256`: the object's paths, shared with
// xtask (see the file's comment).
include!("ebpf_object.rs");
// `sha256_hex`, shared with xtask.
include!("ebpf_sha256.rs");
// `strip_ebpf_object`, shared with xtask (which ships the object as it is embedded).
include!("ebpf_strip.rs");

fn main() {
    workload_path();
    println!("cargo::rerun-if-env-changed=CYLO_USAGE_EBPF_OBJECT");
    println!("cargo::rerun-if-env-changed=CYLO_USAGE_EBPF_LINE_INFO");
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let packaged = manifest_dir.join(PACKAGED_OBJECT);
    let (object, expected) = match std::env::var_os("CYLO_USAGE_EBPF_OBJECT") {
        Some(path) => (PathBuf::from(path), None),
        None => {
            let workspace = manifest_dir.parent();
            let built = workspace.map(ebpf_object_in);
            let sha = manifest_dir.join(PACKAGED_SHA256);
            println!("cargo::rerun-if-changed={}", sha.display());
            match built.filter(|b| b.is_file()) {
                Some(built) => (built, None),
                None if packaged.is_file() => (packaged, std::fs::read_to_string(&sha).ok()),
                // The workspace's sources without the object: a git dependency's checkout,
                // or a fresh clone built without xtask. Build it as xtask does, when the
                // tools are there.
                None => {
                    match workspace.filter(|w| w.join(EBPF_PACKAGE).join("Cargo.toml").is_file()) {
                        Some(workspace) => match build_ebpf(workspace) {
                            Ok(object) => (object, None),
                            Err(why) => {
                                println!(
                                    "cargo::error=no eBPF object, and it cannot be built here: \
                                 {why}. Install what is missing (`rustup toolchain install \
                                 nightly --component rust-src`, `cargo install bpf-linker`), \
                                 run `cargo xtask build-ebpf` in the workspace, or set \
                                 CYLO_USAGE_EBPF_OBJECT to a built object"
                                );
                                return;
                            }
                        },
                        None => (packaged, None),
                    }
                }
            }
        }
    };
    println!("cargo::rerun-if-changed={}", object.display());
    let bytes = match std::fs::read(&object) {
        Ok(bytes) => bytes,
        Err(_) => {
            println!(
                "cargo::error=no eBPF object at {}: inside cylo-usage's workspace (a git \
                 dependency's checkout too) run `cargo xtask build-ebpf`, which installs the \
                 nightly's rust-src and bpf-linker, and set CYLO_USAGE_EBPF_OBJECT to what it \
                 built; or depend on a published package (`cargo xtask package`), which carries \
                 the object",
                object.display()
            );
            return;
        }
    };
    let sha256 = sha256_hex(&bytes);
    if let Some(expected) = expected
        && expected.trim() != sha256
    {
        println!(
            "cargo::error=the packaged eBPF object {} has SHA-256 {sha256}, not the {} its \
             package says: the package is damaged",
            object.display(),
            expected.trim()
        );
        return;
    }
    // What is embedded: the object without its DWARF and (unless asked) its line info.
    let line_info = std::env::var_os("CYLO_USAGE_EBPF_LINE_INFO").is_some_and(|v| v == "1");
    let stripped = match strip_ebpf_object(&bytes, line_info) {
        Ok(stripped) => stripped,
        Err(why) => {
            println!("cargo::error=the eBPF object {}: {why}", object.display());
            return;
        }
    };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let embedded = out.join("cylo-usage-ebpf.o");
    if let Err(e) = std::fs::write(&embedded, &stripped) {
        println!("cargo::error=cannot write {}: {e}", embedded.display());
        return;
    }
    println!(
        "cargo::rustc-env=CYLO_USAGE_EBPF_OBJECT={}",
        embedded.display()
    );
    // For the tests, which compare the two.
    println!(
        "cargo::rustc-env=CYLO_USAGE_EBPF_SOURCE_OBJECT={}",
        object.display()
    );
    println!(
        "cargo::rustc-env=CYLO_USAGE_EBPF_LINE_INFO_KEPT={}",
        u8::from(line_info)
    );
    // The SHA-256 of what is embedded (a packaged object, stripped already, is embedded as
    // it is, with the SHA-256 its package names).
    println!(
        "cargo::rustc-env=CYLO_USAGE_EBPF_SHA256={}",
        sha256_hex(&stripped)
    );
}

/// Where the test workload (the workspace crate `cylo-usage-workload`, built beside this
/// crate's binaries in the same target folder and profile) is, for the tests: they read it as
/// `env!("CYLO_USAGE_WORKLOAD")`, as they would `CARGO_BIN_EXE_<name>` of a binary of this
/// package. `cargo xtask test` builds it first.
fn workload_path() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/<this crate>-<hash>/out.
    if let Some(profile_dir) = out.ancestors().nth(3) {
        println!(
            "cargo::rustc-env=CYLO_USAGE_WORKLOAD={}",
            profile_dir.join("cylo-usage-workload").display()
        );
    }
}

/// Builds the eBPF object from the workspace at `workspace` into `OUT_DIR` (nightly with
/// `rust-src`, `bpf-linker` on `PATH`), with the flags `cargo xtask build-ebpf` uses.
fn build_ebpf(workspace: &std::path::Path) -> Result<PathBuf, String> {
    use std::process::Command;
    println!(
        "cargo::rerun-if-changed={}",
        workspace.join(EBPF_PACKAGE).display()
    );
    let works = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if !works(Command::new("bpf-linker").arg("--version")) {
        return Err("no bpf-linker on PATH".to_string());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .ok_or("no nightly toolchain (rustup)")?;
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("no OUT_DIR")?).join("ebpf");
    let status = Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            EBPF_PACKAGE,
            "--release",
        ])
        .args([
            "--target",
            EBPF_TARGET,
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(&out)
        .current_dir(workspace)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ebpf_rustflags(workspace, cargo_home().as_deref(), &sysroot, false),
        )
        // The outer build's settings are not the eBPF build's.
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_MAKEFLAGS")
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building {EBPF_PACKAGE} failed ({status}; rust-src for nightly may be missing)"
        ));
    }
    let object = out.join(EBPF_TARGET).join("release").join(EBPF_PACKAGE);
    if !object.is_file() {
        return Err(format!("the build made no {}", object.display()));
    }
    Ok(object)
}
