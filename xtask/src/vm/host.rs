//! Host tools the matrix needs (`qemu-system-x86_64`, a static busybox, `mkfs.ext4`, `xz`),
//! installed from Debian's packages when missing, and small checks on host executables.
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub(super) fn ensure_host_tools() -> Result<()> {
    let have_qemu = find_in_path("qemu-system-x86_64").is_some();
    let busybox = Path::new("/bin/busybox");
    let have_busybox = busybox.exists() && !elf_has_interp(busybox).unwrap_or(true);
    // mkfs.ext4 formats each guest's scratch disk; xz unpacks compressed kernel modules.
    let have_mkfs = find_in_path("mkfs.ext4").is_some();
    let have_xz = find_in_path("xz").is_some();
    let mut packages = Vec::new();
    if !have_qemu {
        packages.push("qemu-system-x86");
    }
    if !have_busybox {
        packages.push("busybox-static");
    }
    if !have_mkfs {
        packages.push("e2fsprogs");
    }
    if !have_xz {
        packages.push("xz-utils");
    }
    if packages.is_empty() {
        return Ok(());
    }
    eprintln!(
        "vm-test: installing host packages {} (qemu-system-x86_64 present: {have_qemu}, static \
         /bin/busybox present: {have_busybox}, mkfs.ext4 present: {have_mkfs}, xz present: \
         {have_xz})",
        packages.join(" ")
    );
    crate::cmd::apt_install(&packages)?;
    if find_in_path("qemu-system-x86_64").is_none() {
        bail!("qemu-system-x86_64 is still missing after installing qemu-system-x86");
    }
    if elf_has_interp(busybox).context("checking /bin/busybox after installing busybox-static")? {
        bail!("/bin/busybox is still dynamically linked after installing busybox-static");
    }
    if find_in_path("mkfs.ext4").is_none() {
        bail!("mkfs.ext4 is still missing after installing e2fsprogs");
    }
    if find_in_path("xz").is_none() {
        bail!("xz is still missing after installing xz-utils");
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

/// Whether an ELF file asks for a dynamic loader (has a PT_INTERP program header).
pub(super) fn elf_has_interp(path: &Path) -> Result<bool> {
    let ctx = || format!("reading the ELF header of {}", path.display());
    let mut f = fs::File::open(path).with_context(ctx)?;
    let mut hdr = [0u8; 64];
    f.read_exact(&mut hdr).with_context(ctx)?;
    if &hdr[..4] != b"\x7fELF" || hdr[4] != 2 || hdr[5] != 1 {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
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
