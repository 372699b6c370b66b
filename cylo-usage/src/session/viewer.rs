//! Who reads a breakdown or an event stream when it is not the tracker's own user (a
//! daemon's unprivileged client), and which processes' figures it may see.
use cylo_usage_abi::{Creds, DUMP_USER, creds_known};

/// Who reads a tree when it is not the tracker's own user: a daemon's unprivileged client,
/// by its uid and gid (`SO_PEERCRED`). The figures of a member it could not read itself
/// through `/proc/PID/io` are withheld from it (see [`Viewer::may_read`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Viewer {
    /// The client's uid.
    pub uid: u32,
    /// The client's gid.
    pub gid: u32,
}

impl Viewer {
    /// Whether this viewer may read the figures of a process with credentials `creds` (its
    /// last record's; `None` when no record carried them), the way
    /// `ptrace_may_access(PTRACE_MODE_READ_FSCREDS)` decides for `/proc/PID/io`: the process's
    /// real, effective and saved uids are the viewer's uid, its real, effective and saved gids
    /// the viewer's gid, and it stayed dumpable by its owner (an exec of a setuid, setgid or
    /// file-capability binary, or of an unreadable one, leaves it not dumpable). Root may read
    /// everything; credentials that could not be read fail closed.
    pub fn may_read(&self, creds: Option<&Creds>) -> bool {
        if self.uid == 0 {
            return true;
        }
        let Some(c) = creds.filter(|c| c.known & creds_known::IDS != 0) else {
            return false;
        };
        let ids = [c.uid, c.euid, c.suid].iter().all(|&u| u == self.uid)
            && [c.gid, c.egid, c.sgid].iter().all(|&g| g == self.gid);
        // A kernel whose BTF does not give `mm_struct.flags`, or a process without an address
        // space, leaves the ids alone to decide.
        let dumpable = c.known & creds_known::DUMPABLE == 0 || c.dumpable == DUMP_USER;
        ids && dumpable
    }
}
