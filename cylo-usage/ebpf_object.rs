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

/// The names the eBPF build gives the folders its sources come from
/// ([`ebpf_rustflags`]'s `--remap-path-prefix`): the workspace, cargo's home (the registry's
/// and git dependencies' sources), and the nightly's sysroot (`core`, built with
/// `-Z build-std`).
pub const EBPF_REMAPPED: [&str; 3] = ["/cylo-usage", "/cargo-home", "/rust-sysroot"];

/// The compiler flags of the eBPF build, `cargo xtask build-ebpf`'s and the build script's
/// alike, as `CARGO_ENCODED_RUSTFLAGS` (fields apart by 0x1f, so a path may hold spaces);
/// `-D warnings` where `deny_warnings`.
///
/// The object's BTF keeps the paths of its sources (the file names of its line info, which
/// the stripping leaves in the string table). Each folder they come from is remapped to a
/// fixed name ([`EBPF_REMAPPED`]), so that the object is the same byte for byte whatever
/// folder the checkout, cargo's home and the toolchain are in. The workspace's mapping comes
/// last: rustc applies the last that matches, and a git dependency's checkout lies inside
/// cargo's home. A folder whose path is not UTF-8 is left as it is.
pub fn ebpf_rustflags(
    workspace: &std::path::Path,
    cargo_home: Option<&std::path::Path>,
    sysroot: &std::path::Path,
    deny_warnings: bool,
) -> String {
    let mut flags: Vec<String> = [
        "-C",
        "debuginfo=2",
        "-C",
        "link-arg=--btf",
        "-C",
        "target-cpu=v3",
    ]
    .map(String::from)
    .to_vec();
    if deny_warnings {
        flags.extend(["-D".to_string(), "warnings".to_string()]);
    }
    let [to_workspace, to_cargo_home, to_sysroot] = EBPF_REMAPPED;
    for (from, to) in [
        (Some(sysroot), to_sysroot),
        (cargo_home, to_cargo_home),
        (Some(workspace), to_workspace),
    ] {
        if let Some(from) = from.and_then(|p| p.to_str()) {
            flags.push(format!("--remap-path-prefix={from}={to}"));
        }
    }
    flags.join("\x1f")
}

/// Cargo's home, where the registry's sources are: `CARGO_HOME`, else `~/.cargo`.
pub fn cargo_home() -> Option<std::path::PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))
}
