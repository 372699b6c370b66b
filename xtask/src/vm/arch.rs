//! The guest architecture of a matrix (`--arch`): x86-64 (the default) or arm64, and what
//! differs between them: Debian's names, the Rust target and its linker, the qemu binary and
//! machine, the serial console, and where the matrix keeps its files.
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Arch {
    X86_64,
    Arm64,
}

impl FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "x86_64" | "x86-64" | "amd64" => Ok(Arch::X86_64),
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            _ => Err(format!(
                "unknown architecture `{s}`: expected x86_64 (amd64) or arm64 (aarch64)"
            )),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Arch {
    /// The host's own architecture, when it is one of ours.
    pub(super) fn host() -> Option<Self> {
        std::env::consts::ARCH.parse().ok()
    }

    /// The name `--arch` takes and the report shows.
    pub(super) fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Debian's name of the architecture (`APT::Architecture`, package suffixes).
    pub(super) fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The ELF `e_machine` of its executables.
    pub(super) fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62, // EM_X86_64
            Arch::Arm64 => 183, // EM_AARCH64
        }
    }

    /// The meta-package whose dependency names a suite's current cloud kernel.
    pub(super) fn kernel_meta_package(self) -> String {
        format!("linux-image-cloud-{}", self.debian())
    }

    /// The Rust target the guest's binaries are built for (static through `crt-static`; an
    /// explicit target, so that build scripts stay dynamic).
    pub(super) fn rust_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// The environment variable naming the linker of [`Self::rust_target`] for cargo.
    pub(super) fn linker_env(self) -> String {
        format!(
            "CARGO_TARGET_{}_LINKER",
            self.rust_target().to_ascii_uppercase().replace('-', "_")
        )
    }

    /// The cross toolchain when the host cannot link for the guest itself: its gcc (the
    /// linker), the Debian packages bringing it and the static C library, and a file of that
    /// library that must exist once they are installed.
    pub(super) fn cross_gcc(self) -> Option<CrossGcc> {
        match self {
            Arch::X86_64 if Arch::host() == Some(Arch::X86_64) => None,
            Arch::X86_64 => Some(CrossGcc {
                gcc: "x86_64-linux-gnu-gcc",
                packages: &["gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross"],
                libc: "/usr/x86_64-linux-gnu/lib/libc.a",
            }),
            Arch::Arm64 if Arch::host() == Some(Arch::Arm64) => None,
            Arch::Arm64 => Some(CrossGcc {
                gcc: "aarch64-linux-gnu-gcc",
                packages: &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"],
                libc: "/usr/aarch64-linux-gnu/lib/libc.a",
            }),
        }
    }

    /// The qemu system emulator and the Debian package that has it.
    pub(super) fn qemu(self) -> (&'static str, &'static str) {
        match self {
            Arch::X86_64 => ("qemu-system-x86_64", "qemu-system-x86"),
            Arch::Arm64 => ("qemu-system-aarch64", "qemu-system-arm"),
        }
    }

    /// The machine and CPU options of qemu (TCG).
    pub(super) fn qemu_machine(self) -> &'static [&'static str] {
        match self {
            // One host thread runs every vCPU (`thread=single`; the guest still has `-smp`
            // CPUs). With a host thread per vCPU, a guest kernel patching its own text
            // (attaching a raw tracepoint updates a static call through text_poke_bp's int3)
            // was seen to leave the other vCPU re-executing a stale translation of the int3
            // forever, while the patching CPU waited for it: a soft lockup that hung the 6.1
            // guest twice in 13 rounds of the daemon tests, which attach and detach their
            // hooks often. Single-threaded TCG saw none in 15 such rounds, for about 20% more
            // time (147 s against 122 s).
            Arch::X86_64 => &["-accel", "tcg,thread=single", "-cpu", "max"],
            // `virt` with virtio-pci. `pauth-impdef`: pointer authentication with qemu's own
            // cheap hash instead of the architected QARMA5, which TCG emulates slowly (Debian's
            // kernels sign every return address of their own).
            Arch::Arm64 => &[
                "-machine",
                "virt",
                "-accel",
                "tcg,thread=single",
                "-cpu",
                "max,pauth-impdef=on",
            ],
        }
    }

    /// The guest's serial console device.
    pub(super) fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Arm64 => "ttyAMA0",
        }
    }

    /// Where this architecture's matrix keeps its downloads, initramfs, guest folders and
    /// report: `target/vm` itself for x86-64 (as before there were others), a folder of its
    /// own below it for the others.
    pub(super) fn vm_dir(self, base: &Path) -> PathBuf {
        match self {
            Arch::X86_64 => base.to_path_buf(),
            Arch::Arm64 => base.join(self.name()),
        }
    }
}

/// A cross toolchain from Debian's packages, see [`Arch::cross_gcc`].
pub(super) struct CrossGcc {
    pub(super) gcc: &'static str,
    pub(super) packages: &'static [&'static str],
    pub(super) libc: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_aliases() {
        for (s, arch) in [
            ("x86_64", Arch::X86_64),
            ("amd64", Arch::X86_64),
            ("X86-64", Arch::X86_64),
            ("arm64", Arch::Arm64),
            ("aarch64", Arch::Arm64),
            ("AArch64", Arch::Arm64),
        ] {
            assert_eq!(s.parse::<Arch>(), Ok(arch), "{s}");
        }
        let err = "riscv64".parse::<Arch>().unwrap_err();
        assert!(err.contains("riscv64") && err.contains("arm64"), "{err}");
        assert_eq!(Arch::Arm64.to_string(), "arm64");
        assert_eq!(Arch::X86_64.name().parse::<Arch>(), Ok(Arch::X86_64));
    }

    #[test]
    fn names_debian_and_rust_things() {
        assert_eq!(
            Arch::X86_64.kernel_meta_package(),
            "linux-image-cloud-amd64"
        );
        assert_eq!(Arch::Arm64.kernel_meta_package(), "linux-image-cloud-arm64");
        assert_eq!(
            Arch::Arm64.linker_env(),
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER"
        );
        assert_eq!(
            Arch::X86_64.linker_env(),
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER"
        );
        assert_eq!(Arch::Arm64.qemu().0, "qemu-system-aarch64");
        assert_eq!(Arch::Arm64.console(), "ttyAMA0");
        // A guest of the host's own architecture needs no cross toolchain.
        if let Some(host) = Arch::host() {
            assert!(host.cross_gcc().is_none());
        }
        if Arch::host() == Some(Arch::X86_64) {
            let cross = Arch::Arm64.cross_gcc().unwrap();
            assert_eq!(cross.gcc, "aarch64-linux-gnu-gcc");
            assert!(cross.packages.contains(&"gcc-aarch64-linux-gnu"));
        }
    }

    #[test]
    fn keeps_x86_files_where_they_were() {
        let base = Path::new("/w/target/vm");
        assert_eq!(Arch::X86_64.vm_dir(base), base);
        assert_eq!(Arch::Arm64.vm_dir(base), Path::new("/w/target/vm/arm64"));
    }
}
