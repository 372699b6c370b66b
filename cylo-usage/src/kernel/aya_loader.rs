//! Making aya's [`EbpfLoader`] without what aya 0.14 does in `EbpfLoader::new()` that
//! cylo-usage does not need, and overlapping aya's feature probes with the rest of start-up.
//!
//! aya 0.14 reads and parses the whole kernel BTF in `EbpfLoader::new()` (about 20 ms and
//! 18 MiB of peak RSS on the 6.18 host), for one purpose: CO-RE relocations, which the
//! programs do not have (rustc emits none; a test below checks the object). The programs get
//! kernel layouts from [`crate::kernel::resolve`] instead, and the fexit programs of older kernels
//! get an `aya::Btf` of their own (`KernelBtf` in the loader). `EbpfLoader::btf(None)` only
//! drops the parsed BTF after the fact, so the loader is made in a thread of its own whose
//! root directory is `/sys/kernel/btf` (the thread leaves the process's file-system context
//! with `unshare(CLONE_FS)` first, so no other thread is affected). aya's fixed path
//! `/sys/kernel/btf/vmlinux` does not exist there, and it leaves its BTF empty. Without
//! CAP_SYS_CHROOT, or where `unshare` is refused, aya parses as usual and the parsed BTF is
//! dropped at once.
//!
//! aya's feature probes (about 16 small programs and maps, run by the first load) are run in
//! the same thread, beside the resolver's work in the caller's.
//!
//! Delete this module once an aya release with lazy BTF and probes is in use (upstream made
//! both lazy after 0.14): `EbpfLoader::new()` is then enough.
use std::thread::JoinHandle;

use aya::EbpfLoader;

/// Starts making a loader without kernel BTF in a thread of its own (see the module).
pub(crate) fn start() -> JoinHandle<EbpfLoader<'static>> {
    std::thread::spawn(|| make().0)
}

/// [`start`], waited for; a plain loader (BTF dropped) if that thread panicked.
pub(crate) fn new() -> EbpfLoader<'static> {
    start().join().unwrap_or_else(|_| {
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        loader
    })
}

/// Runs only in a thread of its own: probes, changes the thread's root, makes the loader.
/// Also says whether aya could not see the kernel BTF (so did not parse it).
fn make() -> (EbpfLoader<'static>, bool) {
    // Before the change of root: the probes read the kernel version.
    let _ = aya::features();
    // SAFETY: plain system calls on this thread's own file-system context, which
    // `unshare(CLONE_FS)` has just made private to it; the thread ends right after.
    let rooted = unsafe {
        libc::unshare(libc::CLONE_FS) == 0 && libc::chroot(c"/sys/kernel/btf".as_ptr()) == 0
    };
    let hidden = rooted && !std::path::Path::new(crate::kernel::btf::VMLINUX_BTF_PATH).exists();
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    (loader, hidden)
}

#[cfg(test)]
mod tests {
    /// Without kernel BTF, aya applies no CO-RE relocations: the object must have none.
    #[test]
    fn object_has_no_core_relocations() {
        let obj = aya_obj::Object::parse(crate::kernel::object::OBJECT).unwrap();
        assert!(!obj.has_btf_relocations());
    }

    #[test]
    fn loader_has_no_kernel_btf_and_the_process_keeps_its_root() {
        let (loader, hidden) = std::thread::spawn(super::make).join().unwrap();
        assert!(format!("{loader:?}").contains("btf: None"), "{loader:?}");
        // As root (CAP_SYS_CHROOT), aya never saw the kernel BTF.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(hidden);
        }
        // Only the loader's own thread changed its root.
        assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).is_dir());
        let loader = super::new();
        assert!(format!("{loader:?}").contains("btf: None"), "{loader:?}");
    }
}
