//! Attaching to a running tree: finding its processes in /proc and having the kernel adopt
//! each of their threads.
//!
//! The kernel keys members by `task_struct` address, which userspace cannot know. So the
//! tracker opens each thread's `/proc/PID/task/TID` directory and runs the `control_adopt` program
//! with that file descriptor: from it the kernel finds the thread's `struct pid`, then its
//! task, and adopts it (reading what it had used so far as "before the attach"). The hooks
//! are armed first, and while the run is attaching they adopt, at its next fork, exec or
//! exit, any task of the tree that is not followed yet (its process, or an ancestor, is): so
//! what the tree creates while it is being registered is caught. The scan repeats until a
//! whole pass finds nothing new.
//!
//! Identity is pid plus start time: each process directory is opened first, its start time
//! read through it and compared with what the scan saw, and threads are opened relative to
//! that directory; a pid reused meanwhile is never adopted.
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use cylo_usage_abi::{ARGV_BYTES, control};

use crate::kernel::tracker::{Shared, Tracker};
use crate::session::breakdown::AdoptedArgv;
use crate::session::run::{Origin, Run, RunOptions, SessionError};
use crate::sys::lock;
use crate::sys::monotonic_ns;
use crate::sys::procfs;

/// Passes over /proc before the attach settles for what it has (a tree that forks faster
/// than a pass can scan it; what the hooks adopt meanwhile is still followed).
const MAX_PASSES: usize = 64;

/// The process to attach to, as checked.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Target {
    pub pid: u32,
    pub start_ticks: u64,
}

/// Checks that `pid` is a process cylo-usage can attach to: it exists, is not a kernel
/// thread, not a zombie, and not cylo-usage itself.
pub(crate) fn check_target(pid: u32) -> Result<Target, SessionError> {
    if pid == 0 {
        return Err(SessionError::NoSuchProcess {
            pid: pid as libc::pid_t,
        });
    }
    if pid == std::process::id() {
        return Err(SessionError::Itself {
            pid: pid as libc::pid_t,
        });
    }
    let path = format!("/proc/{pid}/stat");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SessionError::NoSuchProcess {
                pid: pid as libc::pid_t,
            });
        }
        Err(source) => {
            return Err(procfs::ProcError::Read {
                path: path.into(),
                source,
            }
            .into());
        }
    };
    let stat = procfs::parse_stat_fields(&text).ok_or_else(|| procfs::ProcError::Malformed {
        path: path.clone().into(),
        what: "expected at least 22 fields after the command name",
    })?;
    // A thread id that is not a process id has a /proc entry too (hidden from listings).
    if let Ok(status) = std::fs::read(format!("/proc/{pid}/status"))
        && let Some(tgid) =
            procfs::status_field(&status, "Tgid").and_then(|v| v.trim().parse::<u32>().ok())
        && tgid != pid
    {
        if tgid == std::process::id() {
            return Err(SessionError::Itself {
                pid: pid as libc::pid_t,
            });
        }
        return Err(SessionError::NoSuchProcess {
            pid: pid as libc::pid_t,
        });
    }
    if stat.flags & procfs::PF_KTHREAD != 0 {
        return Err(SessionError::KernelThread {
            pid: pid as libc::pid_t,
        });
    }
    if stat.state == 'Z' || stat.state == 'X' {
        return Err(SessionError::Zombie {
            pid: pid as libc::pid_t,
        });
    }
    Ok(Target {
        pid,
        start_ticks: stat.start_ticks,
    })
}

impl Tracker {
    /// Follows process `pid`, its threads, every descendant alive now and everything any of
    /// them creates from now on. Totals are what the tree uses from now on;
    /// [`crate::ResourceUsage::usage_before_attach`] has what its processes had used before.
    pub fn attach(&self, pid: libc::pid_t) -> Result<Run, SessionError> {
        self.attach_with(pid, RunOptions::default())
    }

    /// [`Tracker::attach`] with a per-process breakdown and/or an event stream.
    pub fn attach_with(&self, pid: libc::pid_t, options: RunOptions) -> Result<Run, SessionError> {
        let Some(pid) = crate::sys::pid_u32(pid) else {
            return Err(SessionError::NoSuchProcess { pid });
        };
        let inner = self.inner.clone();
        if inner.lean {
            return Err(SessionError::NotLoaded { what: "an attach" });
        }
        if let Some(reason) = &inner.unavailable.attach {
            return Err(SessionError::AttachUnsupported {
                reason: reason.clone(),
            });
        }
        let target = check_target(pid)?;
        let pidfd = crate::session::run::pidfd_of(pid)?;
        // The pidfd is the process we checked only if it still has the start time we saw.
        if check_target(pid)?.start_ticks != target.start_ticks {
            return Err(SessionError::NoSuchProcess {
                pid: pid as libc::pid_t,
            });
        }
        let started_ns = monotonic_ns();
        let (slot, hooks, flags) =
            crate::session::slot::open_slot(&inner, &options, crate::session::slot::Start::Attach)?;
        let mut run = Run::new(
            inner.clone(),
            slot,
            Origin::Attached,
            pid,
            Some(pidfd),
            started_ns,
        );
        run.set_budgets(options.budgets, hooks);
        run.start_records(options, started_ns, flags);
        run.set_attaching(true)?;
        let adopted = adopt_tree(&inner, slot, &target, run.breakdown);
        run.set_attaching(false)?;
        let adopted = adopted?;
        if let Some(tree) = &run.tree {
            run.sinks().drain();
            let mut tree = lock(tree);
            tree.note_adopted_argv(&adopted.argv);
            tree.note_attached(adopted.processes, adopted.threads, adopted.passes);
        }
        if adopted.refused > 0 {
            return Err(SessionError::TreeTooLarge {
                pid: pid as libc::pid_t,
                followed: adopted.threads,
            });
        }
        if !adopted.root {
            return Err(if adopted.root_elsewhere {
                SessionError::AlreadyFollowed {
                    pid: pid as libc::pid_t,
                }
            } else {
                SessionError::NoSuchProcess {
                    pid: pid as libc::pid_t,
                }
            });
        }
        Ok(run)
    }
}

/// What an attach adopted.
#[derive(Clone, Debug, Default)]
pub(crate) struct Adopted {
    /// The root's threads were adopted (it was still there).
    pub root: bool,
    /// The root is followed by another run.
    pub root_elsewhere: bool,
    /// Threads and processes adopted by the scan (the hooks adopt more meanwhile).
    pub threads: u64,
    pub processes: u64,
    pub passes: usize,
    /// Threads the kernel would not adopt: the run's share of its maps, or a map, was full.
    pub refused: u64,
    /// With `want_argv`: the argv of each process of the tree the scan found, by pid and
    /// start time (ticks), read through the directory that pins it.
    pub argv: HashMap<(u32, u64), AdoptedArgv>,
}

/// Reads `cmdline` in the process directory `dir`: at most [`ARGV_BYTES`] bytes kept (a
/// hostile argv can be as long as the argument area). `None` when empty (a zombie, a process
/// that cleared it) or unreadable.
fn read_cmdline(dir: &OwnedFd) -> Option<AdoptedArgv> {
    let f = open_at(dir, "cmdline")?;
    let mut bytes = Vec::with_capacity(ARGV_BYTES + 1);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(f, ARGV_BYTES as u64 + 1),
        &mut bytes,
    )
    .ok()?;
    if bytes.is_empty() {
        return None;
    }
    let truncated = bytes.len() > ARGV_BYTES;
    bytes.truncate(ARGV_BYTES);
    Some(AdoptedArgv { bytes, truncated })
}

/// Every process visible in /proc: pid -> (ppid, start time in ticks).
fn scan_processes() -> HashMap<u32, (u32, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that vanishes mid-scan is simply not there.
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(s) = procfs::parse_stat_fields(&text) {
            out.insert(pid, (s.ppid, s.start_ticks));
        }
    }
    out
}

/// The tree under `root` in `table`, root first, parents before children, without the
/// tracker and anything under it.
fn tree_order(table: &HashMap<u32, (u32, u64)>, root: u32) -> Vec<(u32, u64)> {
    let me = std::process::id();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &(ppid, _)) in table {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let Some(&(_, start)) = table.get(&root) else {
        return out;
    };
    let mut queue = std::collections::VecDeque::from([(root, start)]);
    while let Some((pid, start)) = queue.pop_front() {
        out.push((pid, start));
        if let Some(kids) = children.get(&pid) {
            let mut kids = kids.clone();
            kids.sort_unstable();
            for k in kids {
                // Guard against a cycle from pid reuse between two reads.
                if k != me && k != root && k != pid {
                    queue.push_back((k, table[&k].1));
                }
            }
        }
    }
    out
}

fn open_dir(path: &str, at: Option<&OwnedFd>) -> Option<OwnedFd> {
    let c = CString::new(path).ok()?;
    let base = at.map_or(libc::AT_FDCWD, AsRawFd::as_raw_fd);
    // SAFETY: a valid C string; openat returns a new fd we own, or -1.
    let fd = unsafe {
        libc::openat(
            base,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    // SAFETY: a fresh fd.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `name` in the directory `dir` for reading.
fn open_at(dir: &OwnedFd, name: &str) -> Option<std::fs::File> {
    let c = CString::new(name).ok()?;
    // SAFETY: a valid C string; the fd is ours.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    // SAFETY: a fresh fd, owned by the File from here.
    (fd >= 0).then(|| unsafe { std::fs::File::from_raw_fd(fd) })
}

fn read_at(dir: &OwnedFd, name: &str) -> Option<String> {
    let mut f = open_at(dir, name)?;
    let mut s = String::new();
    std::io::Read::read_to_string(&mut f, &mut s).ok()?;
    Some(s)
}

/// The thread ids of the process whose directory is `dir`.
fn threads_of(dir: &OwnedFd) -> Vec<u32> {
    let Some(task) = open_dir("task", Some(dir)) else {
        return Vec::new();
    };
    // Listing through /proc/self/fd keeps the listing tied to this directory.
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", task.as_raw_fd())) else {
        return Vec::new();
    };
    let mut tids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    tids
}

/// Adopts every thread of the tree under `target` into run `slot`, pass after pass, until a
/// pass finds nothing new. The run must be attaching (its hooks adopt meanwhile). With
/// `want_argv`, also reads each process's argv (for the breakdown: a process present at the
/// attach never execs while followed, so no exec record carries it).
pub(crate) fn adopt_tree(
    inner: &Shared,
    slot: u32,
    target: &Target,
    want_argv: bool,
) -> Result<Adopted, SessionError> {
    let mut result = Adopted::default();
    for pass in 0..MAX_PASSES {
        result.passes = pass + 1;
        let table = scan_processes();
        let order = tree_order(&table, target.pid);
        let mut fresh = 0u64;
        for (pid, start) in order {
            let is_root = pid == target.pid;
            if is_root && start != target.start_ticks {
                continue; // the root has gone and its pid was reused
            }
            let Some(dir) = open_dir(&format!("/proc/{pid}"), None) else {
                continue; // gone
            };
            // The directory pins the process: if it has the start time the scan saw, it is
            // the process the scan placed in the tree.
            match read_at(&dir, "stat")
                .as_deref()
                .and_then(procfs::parse_stat_fields)
            {
                Some(s) if s.start_ticks == start => {}
                _ => continue,
            }
            if want_argv
                && !result.argv.contains_key(&(pid, start))
                && let Some(argv) = read_cmdline(&dir)
            {
                result.argv.insert((pid, start), argv);
            }
            let mut adopted_here = false;
            for tid in threads_of(&dir) {
                let Some(thread) = open_dir(&format!("task/{tid}"), Some(&dir)) else {
                    continue; // exited
                };
                let flags = if is_root { control::ADOPT_ROOT } else { 0 };
                let args = [
                    control::ADOPT,
                    thread.as_raw_fd() as u64,
                    slot as u64,
                    flags,
                ];
                let code = inner.control_adopt(args).map_err(Box::new)?;
                match code {
                    control::ADOPTED => {
                        fresh += 1;
                        result.threads += 1;
                        result.root |= is_root;
                        adopted_here = true;
                    }
                    control::ALREADY => result.root |= is_root,
                    control::E_OTHER_RUN if is_root => result.root_elsewhere = true,
                    // Past the run's share or a full map: the tree cannot be followed whole,
                    // so a kill of the run could miss it. The attach fails (fail closed).
                    control::E_SHARE | control::E_FULL => {
                        result.refused += 1;
                        return Ok(result);
                    }
                    // Exited, followed by another run, or the tracker's own.
                    _ => {}
                }
            }
            result.processes += u64::from(adopted_here);
        }
        if pass == 0 && !result.root {
            break;
        }
        if pass > 0 && fresh == 0 {
            break;
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_order_is_parents_first_and_leaves_the_tracker_out() {
        let me = std::process::id();
        let table = HashMap::from([
            (10, (1, 100)),
            (11, (10, 101)),
            (12, (11, 102)),
            (13, (10, 103)),
            (me, (12, 104)),
            (99, (me, 105)),
            (50, (1, 106)),
        ]);
        let order: Vec<u32> = tree_order(&table, 10).into_iter().map(|(p, _)| p).collect();
        assert_eq!(order, [10, 11, 13, 12]);
        assert!(tree_order(&table, 7).is_empty());
    }

    #[test]
    fn targets_that_cannot_be_attached_to() {
        assert!(matches!(
            check_target(std::process::id()),
            Err(SessionError::Itself { .. })
        ));
        assert!(matches!(
            check_target(0),
            Err(SessionError::NoSuchProcess { .. })
        ));
        assert!(matches!(
            check_target(u32::MAX - 1),
            Err(SessionError::NoSuchProcess { .. })
        ));
        // kthreadd is pid 2 in the initial pid namespace.
        if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
            assert!(matches!(
                check_target(2),
                Err(SessionError::KernelThread { .. })
            ));
        }
    }
}
