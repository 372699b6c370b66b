//! Who is on the other end of a connection (`SO_PEERCRED`, read once at accept), whom the
//! daemon serves (`--allow`), and the descriptors a client hands over as its own (a thread's
//! `/proc` directory, a pidfd), checked for what they are.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use super::protocol::{ErrorKind, Refusal, refusal};

/// Who is on the other end of a connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Root, or a member of a trusted `--group`: served from the room held back, and not
    /// bound by the per-user limits.
    pub(crate) privileged: bool,
}

pub(crate) fn peer_credentials(sock: &UnixStream) -> std::io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_PEERCRED) fills a ucred of the size given.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid as u32,
        uid: cred.uid,
        gid: cred.gid,
        privileged: cred.uid == 0,
    })
}

/// Whether `peer` may connect under `access` (the socket's mode says the same; this holds
/// for inherited, socket-activated sockets too).
pub(crate) fn allowed(access: Access, peer: Peer) -> bool {
    match access {
        Access::AllUsers => true,
        _ if peer.uid == 0 => true,
        Access::Root => false,
        Access::Group(gid) => in_group(peer, gid),
    }
}

/// Whether `peer` is a member of group `gid` (primary or supplementary).
pub(crate) fn in_group(peer: Peer, gid: u32) -> bool {
    peer.gid == gid || crate::sys::procfs::read_groups(peer.pid).is_some_and(|g| g.contains(&gid))
}

/// Whether the peer's uid is the overflow uid standing for a user of another user namespace
/// that has no mapping in the daemon's (it would pass for `nobody`). A daemon whose user
/// namespace maps every uid (the initial one) sees every user as who it is, `nobody` in a
/// user namespace of its own included.
pub(crate) fn unmapped_user(peer: Peer) -> bool {
    let overflow = std::fs::read_to_string("/proc/sys/kernel/overflowuid")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(65534);
    if peer.uid != overflow {
        return false;
    }
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => !maps_every_uid(&map) && !maps_uid(&map, overflow),
        // Unknown: the safe answer.
        Err(_) => true,
    }
}

/// The ranges of a `uid_map` (`inside outside count` per line).
fn uid_ranges(map: &str) -> impl Iterator<Item = (u64, u64)> + '_ {
    map.lines().filter_map(|l| {
        let mut f = l.split_whitespace().map(|v| v.parse::<u64>().ok());
        let (Some(Some(inside)), Some(Some(_)), Some(Some(count))) = (f.next(), f.next(), f.next())
        else {
            return None;
        };
        Some((inside, count))
    })
}

/// Whether a `uid_map` maps all 2^32 - 1 uids (the initial user namespace's).
fn maps_every_uid(map: &str) -> bool {
    uid_ranges(map).map(|(_, count)| count).sum::<u64>() >= u32::MAX as u64
}

/// Whether `uid` (as the daemon's namespace sees it) is mapped there: a real user of that
/// namespace may then have it.
fn maps_uid(map: &str, uid: u32) -> bool {
    uid_ranges(map).any(|(inside, count)| (inside..inside + count).contains(&(uid as u64)))
}

/// Checks that `fd` is a directory of procfs (what `SPAWNER_FD` reads as a `proc_inode`).
pub(crate) fn check_proc_dir(fd: &OwnedFd) -> Result<(), Refusal> {
    // SAFETY: fstatfs/fstat fill plain structs for a valid descriptor.
    let (fs, st) = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatfs(fd.as_raw_fd(), &mut fs) != 0 || libc::fstat(fd.as_raw_fd(), &mut st) != 0
        {
            return Err(refusal(
                ErrorKind::BadRequest,
                "the descriptor sent with spawn cannot be examined",
            ));
        }
        (fs, st)
    };
    // `f_type`'s C type differs between libcs (glibc: signed, musl: unsigned).
    if fs.f_type as u64 != PROC_SUPER_MAGIC || st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(refusal(
            ErrorKind::BadRequest,
            "the descriptor sent with spawn is not a /proc thread directory",
        ));
    }
    Ok(())
}

/// The pid (as the daemon sees it) of the process behind a pidfd, from its fdinfo. A thread's
/// pidfd (`PIDFD_THREAD`, Linux 6.9) is taken when the thread leads its process, and refused
/// with a message saying so otherwise.
pub(crate) fn pidfd_pid(fd: &OwnedFd) -> Result<u32, Refusal> {
    let text =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).map_err(|e| {
            refusal(
                ErrorKind::Failed,
                format!("cannot read the pidfd's fdinfo: {e}"),
            )
        })?;
    let pid: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            refusal(
                ErrorKind::BadRequest,
                "the descriptor sent with attach is not a pidfd",
            )
        })?;
    match pid {
        p if p > 0 => {
            // PIDFD_THREAD is O_EXCL on the pidfd's open file.
            // SAFETY: F_GETFL on a valid descriptor.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
            if flags >= 0 && flags & libc::O_EXCL != 0 {
                let tgid = crate::sys::procfs::read_tgid(p as u32);
                if tgid != Some(p as u32) {
                    return Err(refusal(
                        ErrorKind::BadRequest,
                        format!(
                            "the pidfd names thread {p}, not a process (PIDFD_THREAD): attach \
                             takes a pidfd of the process{}",
                            tgid.map(|t| format!(" ({t})")).unwrap_or_default()
                        ),
                    ));
                }
            }
            Ok(p as u32)
        }
        0 => Err(refusal(
            ErrorKind::Unsupported,
            "the process is not visible in the daemon's pid namespace",
        )),
        _ => Err(refusal(ErrorKind::NoSuchProcess, "the process has exited")),
    }
}

/// `statfs.f_type` of procfs.
const PROC_SUPER_MAGIC: u64 = 0x9fa0;

/// Who may connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Root only (socket mode 0600).
    Root,
    /// Root and the members of this group (0660, group-owned).
    Group(u32),
    /// Every local user (0666).
    AllUsers,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules() {
        let peer = |uid, gid| Peer {
            pid: 0,
            uid,
            gid,
            privileged: uid == 0,
        };
        assert!(allowed(Access::Root, peer(0, 0)));
        assert!(!allowed(Access::Root, peer(1000, 1000)));
        assert!(allowed(Access::Group(50), peer(1000, 50)));
        assert!(!allowed(Access::Group(50), peer(1000, 1000)));
        assert!(allowed(Access::AllUsers, peer(65534, 65534)));
    }

    #[test]
    fn only_an_unmapped_overflow_uid_is_refused() {
        let init = "         0          0 4294967295\n";
        assert!(maps_every_uid(init));
        let container = "         0     100000      65536\n";
        assert!(!maps_every_uid(container));
        assert!(maps_uid(container, 65534));
        assert!(!maps_uid(container, 65536));
        let narrow = "0 1000 1\n1 100000 1000\n";
        assert!(!maps_uid(narrow, 65534));
        assert!(maps_uid(narrow, 0) && maps_uid(narrow, 1000));
        assert!(!maps_every_uid(""));
        assert!(!maps_uid("garbage line\n", 0));
    }

    #[test]
    fn only_procfs_directories_are_taken_as_threads() {
        let dir = std::fs::File::open("/proc/thread-self").unwrap();
        assert!(check_proc_dir(&OwnedFd::from(dir)).is_ok());
        let tmp = std::fs::File::open("/tmp").unwrap();
        assert!(check_proc_dir(&OwnedFd::from(tmp)).is_err());
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(check_proc_dir(&OwnedFd::from(file)).is_err());
    }

    #[test]
    fn pidfds_give_the_pid_and_other_descriptors_are_refused() {
        let fd = crate::sys::pidfd_open(std::process::id()).unwrap();
        assert_eq!(pidfd_pid(&fd).unwrap(), std::process::id());
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(
            pidfd_pid(&OwnedFd::from(file)).unwrap_err().0,
            ErrorKind::BadRequest
        );
    }
}
