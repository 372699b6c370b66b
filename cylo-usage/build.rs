//! Embeds the eBPF object, or stops with one line saying what to do. Where the object comes
//! from, first found:
//! 1. `CYLO_USAGE_EBPF_OBJECT`, a path (any object built by `cargo xtask build-ebpf`);
//! 2. inside this workspace, what `cargo xtask build-ebpf` built (`target/ebpf/...`);
//! 3. a published package's own copy (`ebpf/cylo-usage-ebpf.o`, put there by `cargo xtask
//!    package`), checked against the SHA-256 packaged with it.
//!
//! The object's SHA-256 is handed to the crate as `CYLO_USAGE_EBPF_SHA256` (the CLI's
//! `--version` names it).
use std::path::PathBuf;

// `ebpf_object_in`, `PACKAGED_OBJECT`, `PACKAGED_SHA256`: the object's paths, shared with
// xtask (see the file's comment).
include!("ebpf_object.rs");
// `sha256_hex`, shared with xtask.
include!("ebpf_sha256.rs");

fn main() {
    workload_path();
    println!("cargo::rerun-if-env-changed=CYLO_USAGE_EBPF_OBJECT");
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let packaged = manifest_dir.join(PACKAGED_OBJECT);
    let (object, expected) = match std::env::var_os("CYLO_USAGE_EBPF_OBJECT") {
        Some(path) => (PathBuf::from(path), None),
        None => {
            let built = manifest_dir.parent().map(ebpf_object_in);
            match built.filter(|b| b.is_file()) {
                Some(built) => (built, None),
                None => {
                    let sha = manifest_dir.join(PACKAGED_SHA256);
                    println!("cargo::rerun-if-changed={}", sha.display());
                    let expected = std::fs::read_to_string(&sha).ok();
                    (packaged, expected)
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
    println!(
        "cargo::rustc-env=CYLO_USAGE_EBPF_OBJECT={}",
        object.display()
    );
    println!("cargo::rustc-env=CYLO_USAGE_EBPF_SHA256={sha256}");
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
