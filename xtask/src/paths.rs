//! Where things are in the workspace: its root, the eBPF object, the project's own tools.
use std::path::{Path, PathBuf};

// `EBPF_TARGET_DIR`, `EBPF_TARGET`, `EBPF_PACKAGE` and `ebpf_object_in`: shared with
// `cylo-usage/build.rs`, which embeds the object from there.
include!("../../cylo-usage/ebpf_object.rs");

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// The eBPF object that `cargo xtask build-ebpf` builds and `cylo-usage/build.rs` embeds.
/// Where `cargo xtask package` leaves the `.crate` files (`package/` of the target folder its
/// verification builds in).
pub fn packages_dir() -> PathBuf {
    workspace_root().join("target/package-verify/package")
}

pub fn ebpf_object() -> PathBuf {
    ebpf_object_in(&workspace_root())
}

/// The eBPF crate's target folder (`cargo build --target-dir`).
pub fn ebpf_target_dir() -> PathBuf {
    workspace_root().join(EBPF_TARGET_DIR)
}

/// Folder holding the project's own bpf-linker (`bin/`) and the LLVM prefix it links to.
pub fn tools_dir() -> PathBuf {
    workspace_root().join("target/tools")
}

/// `cargo xtask vm-test`'s folder: downloads, builds, the initramfs and the results.
pub fn vm_dir() -> PathBuf {
    workspace_root().join("target/vm")
}

/// `cargo xtask bench`'s folder: its report and scratch files.
pub fn bench_dir() -> PathBuf {
    workspace_root().join("target/bench")
}
