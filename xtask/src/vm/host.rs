//! Host tools the matrix needs (the guest architecture's `qemu-system-*`, a static busybox,
//! `mkfs.ext4`, `xz`, and for a guest of another architecture the cross gcc and C library that
//! link its binaries), installed from Debian's packages when missing, and small checks on
//! executables.
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::arch::Arch;

/// A host tool: how to tell it is there, and the Debian package that brings it.
struct Tool {
    what: String,
    package: &'static str,
    present: Box<dyn Fn() -> bool>,
}

pub(super) fn ensure_host_tools(arch: Arch) -> Result<()> {
    let (qemu, qemu_package) = arch.qemu();
    let in_path = |name: &'static str| -> Box<dyn Fn() -> bool> {
        Box::new(move || find_in_path(name).is_some())
    };
    let mut tools = vec![
        Tool {
            what: qemu.to_string(),
            package: qemu_package,
            present: in_path(qemu),
        },
        // The guest's busybox for a guest of the host's architecture; for any guest, the
        // initramfs's packer and the modules' depmod.
        Tool {
            what: "static /bin/busybox".into(),
            package: "busybox-static",
            present: Box::new(|| {
                let busybox = Path::new("/bin/busybox");
                busybox.exists() && !elf_has_interp(busybox).unwrap_or(true)
            }),
        },
        // mkfs.ext4 formats each guest's scratch disk; xz unpacks compressed kernel modules.
        Tool {
            what: "mkfs.ext4".into(),
            package: "e2fsprogs",
            present: in_path("mkfs.ext4"),
        },
        Tool {
            what: "xz".into(),
            package: "xz-utils",
            present: in_path("xz"),
        },
    ];
    if let Some(cross) = arch.cross_gcc() {
        let (gcc, libc) = (cross.gcc, cross.libc);
        tools.push(Tool {
            what: gcc.to_string(),
            package: cross.packages[0],
            present: in_path(gcc),
        });
        for package in &cross.packages[1..] {
            tools.push(Tool {
                what: libc.to_string(),
                package,
                present: Box::new(move || Path::new(libc).is_file()),
            });
        }
    }
    let missing: Vec<&Tool> = tools.iter().filter(|t| !(t.present)()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    packages.dedup();
    let names: Vec<&str> = missing.iter().map(|t| t.what.as_str()).collect();
    eprintln!(
        "vm-test: installing host packages {} (missing: {})",
        packages.join(" "),
        names.join(", ")
    );
    crate::cmd::apt_install(&packages)?;
    for tool in missing {
        if !(tool.present)() {
            bail!(
                "{} is still missing after installing {}",
                tool.what,
                tool.package
            );
        }
    }
    Ok(())
}

pub(super) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The first 64 bytes of a 64-bit little-endian ELF file.
fn elf_header(path: &Path, f: &mut fs::File) -> Result<[u8; 64]> {
    let mut hdr = [0u8; 64];
    f.read_exact(&mut hdr)
        .with_context(|| format!("reading the ELF header of {}", path.display()))?;
    if &hdr[..4] != b"\x7fELF" || hdr[4] != 2 || hdr[5] != 1 {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    Ok(hdr)
}

/// The ELF `e_machine` of a file (62 for x86-64, 183 for AArch64).
pub(super) fn elf_machine(path: &Path) -> Result<u16> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let hdr = elf_header(path, &mut f)?;
    Ok(u16::from_le_bytes([hdr[0x12], hdr[0x13]]))
}

/// Whether an ELF file asks for a dynamic loader (has a PT_INTERP program header).
pub(super) fn elf_has_interp(path: &Path) -> Result<bool> {
    let ctx = || format!("reading the ELF header of {}", path.display());
    let mut f = fs::File::open(path).with_context(ctx)?;
    let hdr = elf_header(path, &mut f)?;
    let phoff = u64::from_le_bytes(hdr[0x20..0x28].try_into().unwrap());
    let phentsize = u16::from_le_bytes(hdr[0x36..0x38].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(hdr[0x38..0x3a].try_into().unwrap()) as usize;
    let mut table = vec![0u8; phentsize * phnum];
    f.seek(SeekFrom::Start(phoff)).with_context(ctx)?;
    f.read_exact(&mut table).with_context(ctx)?;
    const PT_INTERP: u32 = 3;
    Ok(table
        .chunks_exact(phentsize.max(4))
        .any(|ph| u32::from_le_bytes(ph[..4].try_into().unwrap()) == PT_INTERP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_machine_of_this_test() {
        let me = std::env::current_exe().unwrap();
        let machine = elf_machine(&me).unwrap();
        if let Some(host) = Arch::host() {
            assert_eq!(machine, host.elf_machine());
        }
    }
}
