//! Embeds the eBPF object built by `cargo xtask build-ebpf`, or stops with one line saying so.
use std::path::PathBuf;

// `ebpf_object_in`: the object's default path, shared with xtask (see the file's comment).
include!("ebpf_object.rs");

fn main() {
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
            "cargo::error=the eBPF object {} does not exist: run `cargo xtask build-ebpf` first",
            object.display()
        );
        return;
    }
    println!(
        "cargo::rustc-env=CYLO_USAGE_EBPF_OBJECT={}",
        object.display()
    );
}
