//! The resolved [`Offsets`], cached per boot in a root-only directory, so that most starts
//! skip the kernel's BTF altogether.
//!
//! The cache steers the kernel reads of the eBPF programs, so it is trusted only when nobody
//! but root could have written it: the directory ([`CACHE_DIR`]) must be a real directory
//! (not a symlink) owned by root with mode 0700, the file a regular file owned by root with
//! mode 0600, one link, and exactly the expected size. Any doubt (those, a different key, a
//! bad checksum, a short read) means the offsets are resolved from BTF again and the file
//! rewritten (by rename, which replaces the entry without following it). Nothing is read or
//! written unless the process runs as root. The expected owner is a parameter so that tests
//! can check every rule.
//!
//! The key says which kernel BTF and which resolver the offsets came from:
//! - the boot (`/proc/sys/kernel/random/boot_id`, random at every boot) and the size of the
//!   BTF, plus a checksum of its first and last 4 KiB. `/sys/kernel/btf/vmlinux` is the
//!   running kernel's own `.BTF` section, read-only kernel data that only a boot of another
//!   kernel can change; a boot changes the boot id. So boot id and size identify it, and a
//!   checksum of all 5.5 MB would buy nothing for its cost (measured on the 6.18 host:
//!   0.4 ms for a word-wise multiply hash over the mapping, 16 ms for byte-wise FNV-1a, and
//!   before 6.16, where sysfs BTF cannot be mapped, a 5.5 MB read() on top, about what
//!   resolving costs). Its mtime is no help: sysfs gives the time its inode was last
//!   instantiated;
//! - the resolver: the size of `Offsets`, [`FORMAT`], and the identity (device, inode, size,
//!   mtime) of the running executable, so that a rebuilt or upgraded program never trusts
//!   offsets another build resolved.
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use cylo_usage_abi::Offsets;

/// Where the cache lives: tmpfs on usual systems, so it is gone at the next boot anyway.
pub const CACHE_DIR: &str = "/run/cylo-usage";
const FILE_NAME: &str = "offsets";
/// Bump when the file layout or the meaning of a resolved offset changes.
const FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"CYLOOFFS";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// How much of each end of the BTF goes into the key's checksum.
const SAMPLE: u64 = 4096;

/// Why the cache was not used or not written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{syscall} {path}: {source}")]
    Io {
        syscall: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not trusted: {reason}")]
    Untrusted { path: PathBuf, reason: &'static str },
    #[error("{path}: {reason}")]
    Mismatch { path: PathBuf, reason: &'static str },
    #[error("the cache is only used by uid {expected}, and this process runs as {actual}")]
    NotOwner { expected: u32, actual: u32 },
}

fn io<'p>(syscall: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> CacheError + 'p {
    move |source| CacheError::Io {
        syscall,
        path: path.to_owned(),
        source,
    }
}

/// FNV-1a, 64 bits: the file's checksum and the key's BTF sample (not a defence: the
/// ownership checks are).
fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// What the cached offsets were resolved from (see the module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Key([u8; KEY_LEN]);

const KEY_LEN: usize = 4 + 4 + 5 * 8 + 36 + 8 + 8;

impl Key {
    /// The key of the running kernel's BTF at `btf` and of this executable.
    pub(crate) fn host(btf: &Path) -> Result<Key, CacheError> {
        let mut boot_id = [0u8; 36];
        let text = std::fs::read(BOOT_ID).map_err(io("read", Path::new(BOOT_ID)))?;
        let text = text.trim_ascii();
        if text.len() != boot_id.len() {
            return Err(CacheError::Mismatch {
                path: BOOT_ID.into(),
                reason: "not a 36-character boot id",
            });
        }
        boot_id.copy_from_slice(text);
        let file = File::open(btf).map_err(io("open", btf))?;
        let size = file.metadata().map_err(io("fstat", btf))?.len();
        let mut head = vec![0u8; SAMPLE.min(size) as usize];
        file.read_exact_at(&mut head, 0).map_err(io("pread", btf))?;
        let sample_len = SAMPLE.min(size);
        let mut tail = vec![0u8; sample_len as usize];
        file.read_exact_at(&mut tail, size - sample_len)
            .map_err(io("pread", btf))?;
        let sample = fnv1a(&tail, fnv1a(&head, FNV_OFFSET));
        let exe = Path::new("/proc/self/exe");
        let exe = std::fs::metadata(exe).map_err(io("stat", exe))?;
        let exe = [
            exe.dev(),
            exe.ino(),
            exe.size(),
            exe.mtime() as u64,
            exe.mtime_nsec() as u64,
        ];
        Ok(Key::from_parts(FORMAT, exe, boot_id, size, sample))
    }

    fn from_parts(format: u32, exe: [u64; 5], boot_id: [u8; 36], size: u64, sample: u64) -> Key {
        let mut k = [0u8; KEY_LEN];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            k[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&format.to_le_bytes());
        put(&(size_of::<Offsets>() as u32).to_le_bytes());
        for word in exe {
            put(&word.to_le_bytes());
        }
        put(&boot_id);
        put(&size.to_le_bytes());
        put(&sample.to_le_bytes());
        Key(k)
    }
}

const FILE_LEN: usize = MAGIC.len() + KEY_LEN + size_of::<Offsets>() + 8;

// `Offsets` is 57 `u32`s: no padding, and every bit pattern is a valid value.
const _: () = assert!(size_of::<Offsets>() == 76 * 4 && align_of::<Offsets>() == 4);

fn offsets_bytes(o: &Offsets) -> &[u8] {
    // SAFETY: `Offsets` is `repr(C)` of `u32`s without padding (asserted above): all its
    // bytes are initialised.
    unsafe { std::slice::from_raw_parts((o as *const Offsets).cast::<u8>(), size_of::<Offsets>()) }
}

fn offsets_from(bytes: &[u8]) -> Offsets {
    assert_eq!(bytes.len(), size_of::<Offsets>());
    // SAFETY: as many bytes as an `Offsets`, any bit pattern of which is valid (all `u32`s);
    // `read_unaligned` needs no alignment.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Offsets>()) }
}

/// The cache in a directory, trusted when owned by `uid`.
pub(crate) struct Cache {
    dir: PathBuf,
    uid: u32,
}

impl Cache {
    /// [`CACHE_DIR`], owned by root.
    pub(crate) fn system() -> Cache {
        Cache {
            dir: CACHE_DIR.into(),
            uid: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn new(dir: &Path, uid: u32) -> Cache {
        Cache {
            dir: dir.to_owned(),
            uid,
        }
    }

    fn file_path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn check_euid(&self) -> Result<(), CacheError> {
        // SAFETY: geteuid has no preconditions.
        let actual = unsafe { libc::geteuid() };
        if actual == self.uid {
            Ok(())
        } else {
            Err(CacheError::NotOwner {
                expected: self.uid,
                actual,
            })
        }
    }

    /// Opens the directory without following a symlink and checks it is ours, mode 0700.
    fn open_dir(&self) -> Result<OwnedFd, CacheError> {
        let path = &self.dir;
        let fd = open_at(
            libc::AT_FDCWD,
            path.as_os_str().as_bytes(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0,
        )
        .map_err(io("open", path))?;
        let st = fstat(&fd).map_err(io("fstat", path))?;
        let untrusted = |reason| CacheError::Untrusted {
            path: path.clone(),
            reason,
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(untrusted("not a directory"));
        }
        if st.st_uid != self.uid {
            return Err(untrusted("owned by another user"));
        }
        if st.st_mode & 0o7777 != 0o700 {
            return Err(untrusted("its mode is not 0700"));
        }
        Ok(fd)
    }

    /// The cached offsets for `key`, if the cache holds them and can be trusted.
    pub(crate) fn load(&self, key: &Key) -> Result<Offsets, CacheError> {
        self.check_euid()?;
        let dir = self.open_dir()?;
        let path = self.file_path();
        let fd = open_at(
            dir.as_raw_fd(),
            FILE_NAME.as_bytes(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
            0,
        )
        .map_err(io("openat", &path))?;
        let st = fstat(&fd).map_err(io("fstat", &path))?;
        let untrusted = |reason| CacheError::Untrusted {
            path: path.clone(),
            reason,
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(untrusted("not a regular file"));
        }
        if st.st_uid != self.uid {
            return Err(untrusted("owned by another user"));
        }
        if st.st_mode & 0o7777 != 0o600 {
            return Err(untrusted("its mode is not 0600"));
        }
        if st.st_nlink != 1 {
            return Err(untrusted("it has other links"));
        }
        let mismatch = |reason| CacheError::Mismatch {
            path: path.clone(),
            reason,
        };
        if st.st_size != FILE_LEN as i64 {
            return Err(mismatch("wrong size"));
        }
        let mut bytes = [0u8; FILE_LEN];
        File::from(fd)
            .read_exact(&mut bytes)
            .map_err(io("read", &path))?;
        let (body, sum) = bytes.split_at(FILE_LEN - 8);
        if fnv1a(body, FNV_OFFSET).to_le_bytes() != sum {
            return Err(mismatch("bad checksum"));
        }
        let (magic, rest) = body.split_at(MAGIC.len());
        let (stored_key, offsets) = rest.split_at(KEY_LEN);
        if magic != MAGIC {
            return Err(mismatch("not a cylo-usage offsets cache"));
        }
        if stored_key != key.0 {
            return Err(mismatch("resolved for another boot, kernel or build"));
        }
        Ok(offsets_from(offsets))
    }

    /// Writes `offsets` for `key`: into a new file, renamed over the old entry. Creates the
    /// directory (0700) when missing; refuses a directory that is not trusted.
    pub(crate) fn store(&self, key: &Key, offsets: &Offsets) -> Result<(), CacheError> {
        self.check_euid()?;
        let dir_path = &self.dir;
        let c_dir = cstring(dir_path.as_os_str().as_bytes());
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::mkdir(c_dir.as_ptr(), 0o700) } == 0 {
            // Made here: the umask may have narrowed its mode.
            let fd = open_at(
                libc::AT_FDCWD,
                dir_path.as_os_str().as_bytes(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0,
            )
            .map_err(io("open", dir_path))?;
            // SAFETY: an open file descriptor of ours.
            if unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) } != 0 {
                return Err(io("fchmod", dir_path)(std::io::Error::last_os_error()));
            }
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io("mkdir", dir_path)(e));
            }
        }
        let dir = self.open_dir()?;
        let mut bytes = Vec::with_capacity(FILE_LEN);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&key.0);
        bytes.extend_from_slice(offsets_bytes(offsets));
        let sum = fnv1a(&bytes, FNV_OFFSET);
        bytes.extend_from_slice(&sum.to_le_bytes());
        let tmp_name = format!("{FILE_NAME}.{}.tmp", std::process::id());
        let tmp_path = dir_path.join(&tmp_name);
        let fd = open_at(
            dir.as_raw_fd(),
            tmp_name.as_bytes(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        )
        .map_err(io("openat", &tmp_path))?;
        let unlink_tmp = || {
            let c = cstring(tmp_name.as_bytes());
            // SAFETY: a NUL-terminated name relative to an open directory.
            unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
        };
        let written = (|| {
            // SAFETY: an open file descriptor of ours.
            if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
                return Err(io("fchmod", &tmp_path)(std::io::Error::last_os_error()));
            }
            std::io::Write::write_all(&mut File::from(fd), &bytes)
                .map_err(io("write", &tmp_path))?;
            let from = cstring(tmp_name.as_bytes());
            let to = cstring(FILE_NAME.as_bytes());
            // SAFETY: NUL-terminated names relative to an open directory.
            let r = unsafe {
                libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr())
            };
            if r != 0 {
                return Err(io("renameat", &self.file_path())(
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(())
        })();
        if written.is_err() {
            unlink_tmp();
        }
        written
    }
}

fn cstring(bytes: &[u8]) -> CString {
    // Paths here never hold a NUL (an interior NUL would make the call fail on the empty
    // string instead).
    CString::new(bytes).unwrap_or_default()
}

fn open_at(dir: i32, name: &[u8], flags: i32, mode: libc::c_uint) -> std::io::Result<OwnedFd> {
    let c =
        CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a NUL-terminated name; the returned descriptor is owned below.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags, mode) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: `st` is written by fstat before it is read.
    unsafe {
        let mut st = std::mem::zeroed::<libc::stat>();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh directory of this test's own (0700) holding the cache directory `cache`.
    fn scratch(name: &str) -> (PathBuf, PathBuf) {
        let base = std::env::temp_dir().join(format!(
            "cylo-usage-cache-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();
        let dir = base.join("cache");
        (base, dir)
    }

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    fn key(boot: u8) -> Key {
        Key::from_parts(FORMAT, [1, 2, 3, 4, 5], [boot; 36], 5_515_646, 42)
    }

    fn offsets(seed: u32) -> Offsets {
        Offsets {
            task_pid: seed,
            task_tgid: seed + 4,
            mm_rss: [seed, seed + 1, seed + 2, seed + 3],
            bprm_filename: seed + 96,
            ..Offsets::default()
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn stores_and_loads() {
        let (base, dir) = scratch("roundtrip");
        let cache = Cache::new(&dir, euid());
        assert!(matches!(cache.load(&key(1)), Err(CacheError::Io { .. })));
        cache.store(&key(1), &offsets(7)).unwrap();
        assert_eq!(cache.load(&key(1)).unwrap(), offsets(7));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(FILE_NAME)), 0o600);
        // Rewritten for another key; nothing else is left in the directory.
        cache.store(&key(2), &offsets(9)).unwrap();
        assert_eq!(cache.load(&key(2)).unwrap(), offsets(9));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_different_key_is_refused() {
        let (base, dir) = scratch("key");
        let cache = Cache::new(&dir, euid());
        cache.store(&key(1), &offsets(7)).unwrap();
        // Another boot.
        assert!(matches!(
            cache.load(&key(2)),
            Err(CacheError::Mismatch { .. })
        ));
        // Another format or layout version, BTF size, sample, executable.
        for other in [
            Key::from_parts(FORMAT + 1, [1, 2, 3, 4, 5], [1; 36], 5_515_646, 42),
            Key::from_parts(FORMAT, [1, 2, 3, 4, 5], [1; 36], 5_515_647, 42),
            Key::from_parts(FORMAT, [1, 2, 3, 4, 5], [1; 36], 5_515_646, 43),
            Key::from_parts(FORMAT, [1, 2, 3, 4, 6], [1; 36], 5_515_646, 42),
        ] {
            assert!(matches!(
                cache.load(&other),
                Err(CacheError::Mismatch { .. })
            ));
        }
        // The size of Offsets is part of the key.
        assert_eq!(
            &key(1).0[4..8],
            &(size_of::<Offsets>() as u32).to_le_bytes()
        );
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn corrupt_or_cut_files_are_refused() {
        let (base, dir) = scratch("corrupt");
        let cache = Cache::new(&dir, euid());
        let file = dir.join(FILE_NAME);
        cache.store(&key(1), &offsets(7)).unwrap();
        let good = std::fs::read(&file).unwrap();
        for i in [0, 9, MAGIC.len() + KEY_LEN + 1, FILE_LEN - 1] {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            std::fs::write(&file, &bad).unwrap();
            assert!(
                matches!(cache.load(&key(1)), Err(CacheError::Mismatch { .. })),
                "byte {i}"
            );
        }
        std::fs::write(&file, &good[..FILE_LEN - 1]).unwrap();
        assert!(matches!(
            cache.load(&key(1)),
            Err(CacheError::Mismatch { .. })
        ));
        // A rewrite makes it good again.
        cache.store(&key(1), &offsets(7)).unwrap();
        assert_eq!(cache.load(&key(1)).unwrap(), offsets(7));
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn loose_modes_links_and_symlinks_are_refused() {
        let (base, dir) = scratch("modes");
        let cache = Cache::new(&dir, euid());
        let file = dir.join(FILE_NAME);
        cache.store(&key(1), &offsets(7)).unwrap();
        // A file others can read or write.
        for m in [0o644, 0o660, 0o400, 0o4600] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(m)).unwrap();
            assert!(
                matches!(cache.load(&key(1)), Err(CacheError::Untrusted { .. })),
                "{m:o}"
            );
        }
        cache.store(&key(1), &offsets(7)).unwrap();
        assert_eq!(cache.load(&key(1)).unwrap(), offsets(7));
        // A second link (the file could be changed through it).
        std::fs::hard_link(&file, base.join("other")).unwrap();
        assert!(matches!(
            cache.load(&key(1)),
            Err(CacheError::Untrusted { .. })
        ));
        // A symlink in its place, to a good copy: refused, and replaced (not written
        // through) by the next store.
        let target = base.join("target");
        std::fs::copy(&file, &target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&target, &file).unwrap();
        assert!(matches!(cache.load(&key(1)), Err(CacheError::Io { .. })));
        let before = std::fs::read(&target).unwrap();
        cache.store(&key(2), &offsets(9)).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), before);
        assert!(std::fs::symlink_metadata(&file).unwrap().is_file());
        assert_eq!(cache.load(&key(2)).unwrap(), offsets(9));
        // A directory with a loose mode: neither read nor written.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            cache.load(&key(2)),
            Err(CacheError::Untrusted { .. })
        ));
        assert!(matches!(
            cache.store(&key(3), &offsets(1)),
            Err(CacheError::Untrusted { .. })
        ));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(cache.load(&key(2)).unwrap(), offsets(9));
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_symlinked_directory_is_refused() {
        let (base, dir) = scratch("dirlink");
        let real = base.join("real");
        Cache::new(&real, euid())
            .store(&key(1), &offsets(7))
            .unwrap();
        std::os::unix::fs::symlink(&real, &dir).unwrap();
        let cache = Cache::new(&dir, euid());
        assert!(matches!(cache.load(&key(1)), Err(CacheError::Io { .. })));
        assert!(cache.store(&key(1), &offsets(8)).is_err());
        std::fs::remove_dir_all(base).unwrap();
    }

    /// Files and directories owned by someone else than the expected owner are refused, and
    /// a process that is not the expected owner neither reads nor writes.
    #[test]
    fn other_owners_are_refused() {
        let (base, dir) = scratch("owner");
        Cache::new(&dir, euid())
            .store(&key(1), &offsets(7))
            .unwrap();
        let other = euid().wrapping_add(1);
        let cache = Cache::new(&dir, other);
        assert!(matches!(
            cache.load(&key(1)),
            Err(CacheError::NotOwner { .. })
        ));
        assert!(matches!(
            cache.store(&key(1), &offsets(8)),
            Err(CacheError::NotOwner { .. })
        ));
        // The ownership checks themselves, past the process check.
        let cache = Cache::new(&dir, euid());
        let stranger = Cache {
            dir: dir.clone(),
            uid: other,
        };
        assert!(matches!(
            stranger.open_dir(),
            Err(CacheError::Untrusted {
                reason: "owned by another user",
                ..
            })
        ));
        if euid() == 0 {
            // Root can hand the file to another user: then it is refused and rewritten.
            let file = dir.join(FILE_NAME);
            std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
            assert!(matches!(
                cache.load(&key(1)),
                Err(CacheError::Untrusted { .. })
            ));
            cache.store(&key(1), &offsets(7)).unwrap();
            assert_eq!(cache.load(&key(1)).unwrap(), offsets(7));
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            assert!(matches!(
                cache.load(&key(1)),
                Err(CacheError::Untrusted { .. })
            ));
            assert!(cache.store(&key(1), &offsets(7)).is_err());
        }
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn the_host_key_is_stable_and_names_the_boot() {
        let path = Path::new(crate::kernel::btf::VMLINUX_BTF_PATH);
        if !path.exists() {
            eprintln!("skipping: {} is absent", path.display());
            return;
        }
        let a = Key::host(path).unwrap();
        assert_eq!(a, Key::host(path).unwrap());
        let boot_id = std::fs::read_to_string(BOOT_ID).unwrap();
        assert!(a.0.windows(36).any(|w| w == boot_id.trim().as_bytes()));
        let size = std::fs::metadata(path).unwrap().len();
        assert!(a.0.windows(8).any(|w| w == size.to_le_bytes()));
    }
}
