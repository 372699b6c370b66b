// Where `cargo xtask build-ebpf` writes the eBPF object, and where `cylo-usage/build.rs` looks
// for it when `CYLO_USAGE_EBPF_OBJECT` is not set.
//
// One definition, `include!`d by `cylo-usage/build.rs` and by `xtask/src/paths.rs`: a build
// script cannot depend on the xtask crate. The build script keeps a default of its own (rather
// than xtask passing `CYLO_USAGE_EBPF_OBJECT` to every build) because a plain `cargo build`,
// `cargo clippy` or an editor runs it without xtask and must find the same file. Plain `//`
// comments here: an `include!`d file cannot start with inner doc comments.

/// The eBPF crate's own target folder, relative to the workspace root (`--target-dir`).
pub const EBPF_TARGET_DIR: &str = "target/ebpf";
/// The eBPF target triple.
pub const EBPF_TARGET: &str = "bpfel-unknown-none";
/// The eBPF package, and the name of the object its binary target links.
pub const EBPF_PACKAGE: &str = "cylo-usage-ebpf";

/// The eBPF object (a release build) below the workspace root `root`.
pub fn ebpf_object_in(root: &std::path::Path) -> std::path::PathBuf {
    root.join(EBPF_TARGET_DIR)
        .join(EBPF_TARGET)
        .join("release")
        .join(EBPF_PACKAGE)
}

/// Where a published package of `cylo-usage` carries the eBPF object, relative to the
/// package's folder (`cargo xtask package` puts it there before `cargo package`).
pub const PACKAGED_OBJECT: &str = "ebpf/cylo-usage-ebpf.o";
/// The packaged object's SHA-256 (64 hex digits), checked at build time.
pub const PACKAGED_SHA256: &str = "ebpf/cylo-usage-ebpf.o.sha256";
