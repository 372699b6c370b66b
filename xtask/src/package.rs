//! `cargo xtask package`: the crates as they are published, and a dependent that builds them
//! with stable Rust alone.
//!
//! 1. The eBPF object is built, then copied into `cylo-usage/ebpf/` with its SHA-256 (never
//!    committed: `.gitignore`), where the package's `build.rs` finds and checks it.
//! 2. `cargo package -p cylo-usage-abi -p cylo-usage` makes both `.crate` files in
//!    `target/package-verify/package/`, building each from its unpacked package as a dependent
//!    would (in a target folder of its own: see `forget_built_packages`).
//! 3. Unless `--no-consumer`: a crate outside the workspace (`target/consumer/`) depends on
//!    `cylo-usage` without default features through `[patch.crates-io]` onto the unpacked
//!    packages, and is built with the stable toolchain, no `bpf-linker` on `PATH` and no
//!    `CYLO_USAGE_EBPF_OBJECT`. It spawns a tree of three processes through the library and
//!    checks the report counts exactly that; where the programs cannot be loaded (no
//!    privileges) it says so and stops there, unless `CYLO_USAGE_REQUIRE_EBPF=1`.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cmd, paths};

// `sha256_hex`: the same function `cylo-usage/build.rs` checks the packaged object with.
include!("../../cylo-usage/ebpf_sha256.rs");
// `strip_ebpf_object`: the object is shipped as `cylo-usage/build.rs` embeds it.
include!("../../cylo-usage/ebpf_strip.rs");

#[derive(clap::Args)]
pub struct Args {
    /// Make the packages only; do not build and run the dependent crate.
    #[arg(long)]
    pub no_consumer: bool,
}

/// Removes cargo's unpacked copies of this workspace's own packages from
/// `$CARGO_HOME/registry/src/`: `cargo package` verifies `cylo-usage` against the ABI crate it
/// has just packaged, through a local registry in `package/tmp-registry` of its target folder, and cargo
/// unpacks a registry's crate once per name and version. A copy unpacked by an earlier run
/// from the same folder (the same version, an older ABI) would be built instead of the new
/// one. Cargo unpacks them again from its cache as needed.
fn forget_unpacked_packages() -> Result<()> {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")));
    let Some(src) = home.map(|h| h.join("registry/src")) else {
        return Ok(());
    };
    let Ok(registries) = std::fs::read_dir(&src) else {
        return Ok(());
    };
    for registry in registries.flatten() {
        for name in ["cylo-usage-abi", "cylo-usage"] {
            let unpacked = registry.path().join(format!("{name}-{VERSION}"));
            if unpacked.is_dir() {
                std::fs::remove_dir_all(&unpacked)
                    .with_context(|| format!("removing {}", unpacked.display()))?;
            }
        }
    }
    Ok(())
}

/// Removes what a build in `target` made of this workspace's own packages (their
/// fingerprints and artifacts, in every profile folder), so that they are built again.
fn forget_built_packages(target: &std::path::Path) -> Result<()> {
    let Ok(profiles) = std::fs::read_dir(target) else {
        return Ok(());
    };
    for profile in profiles.flatten() {
        for sub in [".fingerprint", "deps", "build"] {
            let Ok(entries) = std::fs::read_dir(profile.path().join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !(name.starts_with("cylo-usage") || name.contains("cylo_usage")) {
                    continue;
                }
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// The packages' version (the workspace's).
const VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn run(args: Args) -> Result<()> {
    crate::ebpf::build()?;
    let root = paths::workspace_root();
    let object = paths::ebpf_object();
    let bytes = std::fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
    // Shipped as the workspace's build embeds it: without DWARF and line info.
    let bytes = strip_ebpf_object(&bytes, false)
        .map_err(|why| anyhow::anyhow!("stripping {}: {why}", object.display()))?;
    let packaged = root.join("cylo-usage").join(paths::PACKAGED_OBJECT);
    std::fs::create_dir_all(packaged.parent().expect("a folder"))?;
    std::fs::write(&packaged, &bytes).with_context(|| format!("writing {}", packaged.display()))?;
    let sha = sha256_hex(&bytes);
    std::fs::write(
        root.join("cylo-usage").join(paths::PACKAGED_SHA256),
        format!("{sha}\n"),
    )?;
    eprintln!("xtask: packaged eBPF object sha256 {sha}");
    forget_unpacked_packages()?;
    // The verification builds in a target folder of its own, from which the workspace's own
    // crates are removed first: cargo never rebuilds a registry crate it has built, so the
    // ABI crate an earlier verification built (the same name and version, from the same
    // local registry) would be linked again.
    let verify_dir = root.join("target/package-verify");
    forget_built_packages(&verify_dir)?;
    cmd::run(
        Command::new(env!("CARGO"))
            .current_dir(&root)
            .args([
                "package",
                "-p",
                "cylo-usage-abi",
                "-p",
                "cylo-usage",
                "--allow-dirty",
            ])
            .env("CARGO_TARGET_DIR", &verify_dir)
            .env_remove("CYLO_USAGE_EBPF_OBJECT"),
    )?;
    let out = paths::packages_dir();
    for name in ["cylo-usage-abi", "cylo-usage"] {
        let file = out.join(format!("{name}-{VERSION}.crate"));
        if !file.is_file() {
            bail!("cargo package made no {}", file.display());
        }
        eprintln!("xtask: {}", file.display());
    }
    if !args.no_consumer {
        consumer(&root, &out)?;
    }
    Ok(())
}

/// Builds and runs the dependent crate (see the module's doc).
fn consumer(root: &Path, packages: &Path) -> Result<()> {
    let dir = root.join("target/consumer");
    std::fs::create_dir_all(dir.join("src"))?;
    let unpacked = |name: &str| packages.join(format!("{name}-{VERSION}"));
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            r#"[package]
name = "cylo-usage-consumer"
version = "0.0.0"
edition = "2024"
publish = false

[workspace]

[dependencies]
cylo-usage = {{ version = "{VERSION}", default-features = false }}
tokio = {{ version = "1", features = ["rt", "macros", "time"] }}

[patch.crates-io]
cylo-usage = {{ path = "{}" }}
cylo-usage-abi = {{ path = "{}" }}
"#,
            unpacked("cylo-usage").display(),
            unpacked("cylo-usage-abi").display()
        ),
    )?;
    std::fs::write(dir.join("src/main.rs"), CONSUMER_MAIN)?;
    // No bpf-linker and no nightly: PATH without the project's tools, the stable toolchain.
    let path: Vec<PathBuf> = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .filter(|p| !p.join("bpf-linker").exists())
        .collect();
    let path = std::env::join_paths(path)?;
    let exe = dir.join("target/release/cylo-usage-consumer");
    cmd::run(
        Command::new("cargo")
            .current_dir(&dir)
            .args(["+stable", "build", "--release"])
            .env("PATH", &path)
            .env_remove("CYLO_USAGE_EBPF_OBJECT")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    )
    .context("building the dependent crate with stable Rust alone")?;
    cmd::run(&mut Command::new(&exe)).context("running the dependent crate")?;
    Ok(())
}

/// The dependent crate: a tree of three processes through the library, counted exactly.
const CONSUMER_MAIN: &str = r#"//! A crate that depends on the published cylo-usage, built with stable Rust alone.
use cylo_usage::{Precision, Tracker};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let tracker = match Tracker::load() {
        Ok(t) => t,
        Err(e) if std::env::var_os("CYLO_USAGE_REQUIRE_EBPF").is_none() => {
            println!("SKIPPED running: the eBPF programs cannot be loaded here: {e}");
            return;
        }
        Err(e) => panic!("CYLO_USAGE_REQUIRE_EBPF=1 but the programs cannot be loaded: {e}"),
    };
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", "/bin/true & /bin/true & wait"]);
    let mut run = tracker.spawn(&mut cmd).expect("spawn");
    run.wait_root().await.expect("root");
    run.wait_finished().await.expect("tree");
    let u = run.usage().expect("usage");
    assert_eq!(u.process_count, 3, "{u:?}");
    assert_eq!(u.precision, Precision::Exact, "{u:?}");
    println!(
        "consumer: {} processes, {} ns CPU, exact, through the packaged crates",
        u.process_count, u.cpu_time_ns
    );
}
"#;

#[cfg(test)]
mod tests {
    use super::sha256_hex;

    #[test]
    fn sha256_gives_the_fips_vectors() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        // Lengths around a block's padding boundary.
        let a = vec![b'a'; 1_000_000];
        assert_eq!(
            sha256_hex(&a),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }
}
