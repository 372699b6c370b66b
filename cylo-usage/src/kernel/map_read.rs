//! Reading the kernel's maps without the tracker's lock.
//!
//! The tracker's [`crate::kernel::tracker::Maps`] sit behind one mutex, shared by every run (so, in the
//! daemon, by every session). What only reads needs no part of it: a [`MapReader`] holds a
//! descriptor of its own for one map (a `dup` of the tracker's) and reads through it, so one
//! session's read never waits for another session's. A whole-map read is one
//! `BPF_MAP_LOOKUP_BATCH` per few thousand entries (Linux 5.6+), where walking key by key
//! costs two system calls per entry; kernels without the batch command are walked key by key.
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// `enum bpf_cmd` values used here.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per batch (a hash bucket larger than this is retried with more room).
const BATCH: usize = 4096;
/// Passes of a key-by-key walk before it gives up (a key deleted under the walk sends the
/// kernel back to the first key, so under heavy churn such a walk could go round for ever).
const MAX_WALK_PASSES: usize = 4;

/// Why a map could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MapReadError {
    /// The reader's own descriptor of the map could not be made.
    #[error("cannot duplicate the descriptor of map {map}")]
    Dup {
        /// The map.
        map: &'static str,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// A `bpf(2)` command on the map failed.
    #[error("bpf({cmd}) on map {map} failed")]
    Syscall {
        /// The command (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_GET_NEXT_KEY`, ...).
        cmd: &'static str,
        /// The map.
        map: &'static str,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

/// A read-only view of one map with keys `K` and values `V` (their sizes must be the map's:
/// the tracker checks them when it takes the map from the object).
pub(crate) struct MapReader<K, V> {
    fd: OwnedFd,
    name: &'static str,
    /// Whether the kernel refused `BPF_MAP_LOOKUP_BATCH` (before 5.6): walk key by key.
    no_batch: AtomicBool,
    _types: PhantomData<fn() -> (K, V)>,
}

/// `union bpf_attr` for element lookups and `GET_NEXT_KEY`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value` for a lookup, `next_key` for `GET_NEXT_KEY`.
    value: u64,
    flags: u64,
}

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `bpf(cmd, attr)`.
///
/// # Safety
/// `attr` must be the `bpf_attr` layout `cmd` expects, and every pointer in it must be valid
/// for the sizes the map's definition implies.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<()> {
    // SAFETY: as the caller promises.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A,
            std::mem::size_of::<A>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a `T` from the start of `bytes` (plain data; `bytes` holds at least its size).
fn read_pod<T: aya::Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= std::mem::size_of::<T>());
    // SAFETY: the length is checked; `T` is plain data (any bytes are a value); unaligned read.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

impl<K: aya::Pod, V: aya::Pod> MapReader<K, V> {
    /// A reader of the map behind `fd` (duplicated: the reader owns its copy).
    pub(crate) fn new(fd: BorrowedFd<'_>, name: &'static str) -> Result<Self, MapReadError> {
        // SAFETY: F_DUPFD_CLOEXEC on a valid descriptor returns a new one we own.
        let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if new < 0 {
            return Err(MapReadError::Dup {
                map: name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(MapReader {
            // SAFETY: a fresh descriptor.
            fd: unsafe { OwnedFd::from_raw_fd(new) },
            name,
            no_batch: AtomicBool::new(false),
            _types: PhantomData,
        })
    }

    fn err(&self, cmd: &'static str) -> impl FnOnce(std::io::Error) -> MapReadError {
        let map = self.name;
        move |source| MapReadError::Syscall { cmd, map, source }
    }

    /// The value under `key`, or `None` if there is none.
    pub(crate) fn get(&self, key: &K) -> Result<Option<V>, MapReadError> {
        let mut value = vec![0u8; std::mem::size_of::<V>()];
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: (key as *const K) as u64,
            value: value.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        // SAFETY: the key and value buffers have the map's key and value sizes.
        match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
            Ok(()) => Ok(Some(read_pod(&value))),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(self.err("BPF_MAP_LOOKUP_ELEM")(e)),
        }
    }

    /// Calls `f` with every entry of the map. Each entry present for the whole read is seen
    /// exactly once; one added or removed meanwhile may or may not be.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&K, &V)) -> Result<(), MapReadError> {
        if !self.no_batch.load(Ordering::Relaxed) {
            match self.for_each_batch(&mut f) {
                Ok(read) => return read,
                // No batch command on this kernel (or for this map type): key by key, from
                // now on. Nothing was handed to `f` yet (the first call failed).
                Err(Unsupported) => self.no_batch.store(true, Ordering::Relaxed),
            }
        }
        self.for_each_by_key(&mut f)
    }

    /// Every entry, collected.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> Result<Vec<(K, V)>, MapReadError> {
        let mut out = Vec::new();
        self.for_each(|k, v| out.push((*k, *v)))?;
        Ok(out)
    }

    /// How many entries the map holds now.
    #[cfg(feature = "metrics")]
    pub(crate) fn count(&self) -> Result<usize, MapReadError> {
        let mut n = 0;
        self.for_each(|_, _| n += 1)?;
        Ok(n)
    }

    fn for_each_batch(
        &self,
        f: &mut impl FnMut(&K, &V),
    ) -> Result<Result<(), MapReadError>, Unsupported> {
        let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
        let mut room = BATCH;
        let mut keys = vec![0u8; room * ks];
        let mut values = vec![0u8; room * vs];
        // The position token: a bucket index (4 bytes) for hash maps, a key for arrays; 16
        // bytes hold either for the maps read here.
        let mut token_in = [0u8; 16];
        let mut token_out = [0u8; 16];
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    token_in.as_mut_ptr() as u64
                },
                out_batch: token_out.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: room as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: the key and value buffers hold `count` entries of the map's sizes; the
            // tokens are larger than any position token the kernel writes.
            let r = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
            let filled = (attr.count as usize).min(room);
            let last = match r {
                Ok(()) => false,
                // The end: what this last call filled still counts.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                // One hash bucket holds more than `room` entries: more room, same position.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && filled == 0 => {
                    room *= 2;
                    keys.resize(room * ks, 0);
                    values.resize(room * vs, 0);
                    continue;
                }
                Err(e)
                    if first
                        && matches!(
                            e.raw_os_error(),
                            // ENOTSUPP (524), the kernel's own, for map types without it.
                            Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
                        ) =>
                {
                    return Err(Unsupported);
                }
                Err(e) => return Ok(Err(self.err("BPF_MAP_LOOKUP_BATCH")(e))),
            };
            for i in 0..filled {
                let k: K = read_pod(&keys[i * ks..]);
                let v: V = read_pod(&values[i * vs..]);
                f(&k, &v);
            }
            if last {
                return Ok(Ok(()));
            }
            token_in = token_out;
            first = false;
        }
    }

    /// The walk of kernels before 5.6: `GET_NEXT_KEY` then a lookup, per entry. A key
    /// removed under the walk sends the kernel back to the first key; keys already seen are
    /// skipped, and after a few passes the walk settles for what it has seen.
    fn for_each_by_key(&self, f: &mut impl FnMut(&K, &V)) -> Result<(), MapReadError> {
        let ks = std::mem::size_of::<K>();
        let mut seen: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        let mut key: Option<Vec<u8>> = None;
        let mut passes = 0;
        loop {
            let mut next = vec![0u8; ks];
            let mut attr = ElemAttr {
                map_fd: self.fd.as_raw_fd() as u32,
                key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
                value: next.as_mut_ptr() as u64,
                ..ElemAttr::default()
            };
            // SAFETY: `key` (or null: the first key) and `next` have the map's key size.
            match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(e) => return Err(self.err("BPF_MAP_GET_NEXT_KEY")(e)),
            }
            if !seen.insert(next.clone()) {
                // Back at a key already seen: the walk restarted from the first key.
                passes += 1;
                if passes >= MAX_WALK_PASSES {
                    return Ok(());
                }
            } else {
                let k: K = read_pod(&next);
                // Gone between listing and reading: it is not there any more.
                if let Some(v) = self.get(&k)? {
                    f(&k, &v);
                }
            }
            key = Some(next);
        }
    }
}

/// The kernel has no batch command (for this map).
struct Unsupported;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A hash map of the kernel's, made here (needs CAP_BPF; the test passes vacuously
    /// without, like the other kernel tests of the library's unit tests).
    fn hash_map(max: u32) -> Option<OwnedFd> {
        #[repr(C)]
        #[derive(Default)]
        struct Create {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_TYPE_HASH: u32 = 1;
        let mut attr = Create {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: 8,
            value_size: 16,
            max_entries: max,
            ..Create::default()
        };
        // SAFETY: a valid map-creation attr; the result is a new descriptor or an error.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                &mut attr as *mut Create,
                std::mem::size_of::<Create>() as u32,
            )
        };
        // SAFETY: a fresh descriptor.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    fn update(fd: &OwnedFd, key: u64, value: [u64; 2]) {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: (&key as *const u64) as u64,
            value: value.as_ptr() as u64,
            flags: 0,
            ..ElemAttr::default()
        };
        const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
        // SAFETY: key and value have the map's sizes.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.unwrap();
    }

    fn delete(fd: &OwnedFd, key: u64) {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: (&key as *const u64) as u64,
            ..ElemAttr::default()
        };
        const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
        // SAFETY: the key has the map's size.
        unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) }.unwrap();
    }

    fn kernel_map(max: u32) -> Option<OwnedFd> {
        // Before 5.11 a map's memory counts against RLIMIT_MEMLOCK (64 KiB by default); aya
        // raises it for the tracker's maps, and this test map is made here, so here too.
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit reads a plain struct; failing (no CAP_SYS_RESOURCE) is fine.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
        let fd = hash_map(max);
        if fd.is_none() {
            assert!(
                std::env::var_os("CYLO_USAGE_REQUIRE_EBPF").is_none(),
                "CYLO_USAGE_REQUIRE_EBPF=1 but no BPF map can be made here"
            );
            eprintln!("SKIPPED: making a BPF map needs CAP_BPF");
        }
        fd
    }

    #[test]
    fn a_batch_read_sees_every_entry_once_across_batches() {
        let Some(fd) = kernel_map(20_000) else {
            return;
        };
        let n = 3 * BATCH as u64 + 17;
        for k in 0..n {
            update(&fd, k * 7 + 1, [k, !k]);
        }
        let reader: MapReader<u64, [u64; 2]> = MapReader::new(fd.as_fd(), "TEST").unwrap();
        let mut all = reader.entries().unwrap();
        assert!(
            !reader.no_batch.load(Ordering::Relaxed),
            "5.6+ has the batch command"
        );
        all.sort_unstable();
        assert_eq!(all.len() as u64, n);
        for (i, (k, v)) in all.iter().enumerate() {
            let i = i as u64;
            assert_eq!((*k, *v), (i * 7 + 1, [i, !i]));
        }
        assert_eq!(reader.count().unwrap() as u64, n);
        assert_eq!(reader.get(&8).unwrap(), Some([1, !1]));
        assert_eq!(reader.get(&9).unwrap(), None);
    }

    #[test]
    fn the_walk_key_by_key_gives_the_same_entries() {
        let Some(fd) = kernel_map(1_000) else {
            return;
        };
        for k in 0..500u64 {
            update(&fd, k, [k, 0]);
        }
        delete(&fd, 250);
        let reader: MapReader<u64, [u64; 2]> = MapReader::new(fd.as_fd(), "TEST").unwrap();
        let mut by_key = Vec::new();
        reader
            .for_each_by_key(&mut |k: &u64, v: &[u64; 2]| by_key.push((*k, *v)))
            .unwrap();
        by_key.sort_unstable();
        let mut batched = reader.entries().unwrap();
        batched.sort_unstable();
        assert_eq!(by_key.len(), 499);
        assert_eq!(by_key, batched);
    }

    #[test]
    fn an_empty_map_reads_as_empty() {
        let Some(fd) = kernel_map(16) else {
            return;
        };
        let reader: MapReader<u64, [u64; 2]> = MapReader::new(fd.as_fd(), "TEST").unwrap();
        assert!(reader.entries().unwrap().is_empty());
        assert_eq!(reader.count().unwrap(), 0);
    }
}
