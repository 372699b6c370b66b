//! Embeds the eBPF object built by `cargo xtask build-ebpf`, or stops with one line saying so.
use std::path::PathBuf;

// `ebpf_object_in`: the object's default path, shared with xtask (see the file's comment).
include!("ebpf_object.rs");

fn main() {
    workload_path();
    println!("cargo::rerun-if-env-changed=CYLO_USAGE_EBPF_OBJECT");
    let object = match std::env::var_os("CYLO_USAGE_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => ebpf_object_in(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("the crate lives in the workspace"),
        ),
    };
    println!("cargo::rerun-if-changed={}", object.display());
    if !object.is_file() {
        println!(
            "cargo::error=the eBPF object {} does not exist: run `cargo xtask build-ebpf` in \
             cylo-usage's workspace, or set CYLO_USAGE_EBPF_OBJECT to an object built that way",
            object.display()
        );
        return;
    }
    println!(
        "cargo::rustc-env=CYLO_USAGE_EBPF_OBJECT={}",
        object.display()
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
