//! A run: a command started under the tracker, followed with every descendant it ever has.
//!
//! The root joins its run inside the kernel, in the fork hook: before the fork, the spawning
//! thread is registered in `SPAWNERS`, and the first task it creates joins the run before it
//! can execute a single instruction. No hold-and-release dance is needed, and the command is
//! an ordinary [`std::process::Command`] (stdio, environment, directory as the caller likes).
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use aya::maps::{HashMap, MapData, MapError};
use cylo_usage_abi::{DevKey, MAX_RUNS, RunCounters, TaskMember};
use tokio::io::unix::AsyncFd;

use crate::loader::{Inner, Tracker};
use crate::procfs::{self, ThreadSample};
use crate::usage::{self, DiskDevice, Live, ResourceUsage, RootExit, Units};

/// How often a waiting run re-reads its counters when no ring-buffer wake-up comes.
const POLL: Duration = Duration::from_millis(100);
/// Attempts at a consistent live snapshot before settling for an approximate one.
const SNAPSHOT_ATTEMPTS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("all {max} run slots are in use")]
    NoFreeSlot { max: u32 },
    #[error("eBPF map operation failed: {what}")]
    Map {
        what: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pid {pid} did not join its run in the kernel (is cylo-usage running outside the initial pid namespace?)"
    )]
    NotJoined { pid: u32 },
    #[error("{syscall} failed for pid {pid}")]
    Syscall {
        syscall: &'static str,
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

fn map_err(what: &'static str) -> impl FnOnce(MapError) -> SessionError {
    move |source| SessionError::Map { what, source }
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn pidfd_open(pid: u32) -> Result<OwnedFd, SessionError> {
    // SAFETY: plain syscall; the returned fd is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(SessionError::Syscall {
            syscall: "pidfd_open",
            pid,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh fd from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn dup(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Registers an owned fd with the tokio reactor (the current runtime's).
pub fn watch(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the fd, so it stays open for as long as it is registered.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// A command running under the tracker.
pub struct Run {
    inner: Arc<Inner>,
    slot: u32,
    child: Child,
    root_pid: u32,
    pidfd: OwnedFd,
    started_ns: u64,
    root_status: Option<ExitStatus>,
}

impl Tracker {
    /// Starts `command` as the root of a new run. The root and everything it ever creates are
    /// followed from the kernel's fork hook on.
    pub fn spawn(&self, command: &mut Command) -> Result<Run, SessionError> {
        let inner = self.inner.clone();
        let mut maps = inner.maps();
        let slot = (0..MAX_RUNS)
            .map(|i| (maps.next_slot + i) % MAX_RUNS)
            .find(|&s| !maps.slots[s as usize])
            .ok_or(SessionError::NoFreeSlot { max: MAX_RUNS })?;
        maps.runs
            .set(slot, RunCounters::default(), 0)
            .map_err(map_err("zeroing the run record"))?;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        maps.spawners
            .insert(tid, slot, 0)
            .map_err(map_err("registering the spawning thread"))?;
        maps.spawn_gate
            .set(0, 1, 0)
            .map_err(map_err("opening the spawn gate"))?;
        let started_ns = monotonic_ns();
        let spawned = command.spawn();
        // The kernel removed the entry at the fork; after a failed spawn it may still be there.
        let _ = maps.spawners.remove(&tid);
        maps.spawn_gate
            .set(0, 0, 0)
            .map_err(map_err("closing the spawn gate"))?;
        let mut child = spawned.map_err(|source| SessionError::Spawn {
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let root_pid = child.id();
        let joined = maps
            .runs
            .get(&slot, 0)
            .map_err(map_err("reading the run record"))?
            .processes_started;
        if joined == 0 {
            let _ = child.kill();
            let _ = child.wait();
            return Err(SessionError::NotJoined { pid: root_pid });
        }
        maps.slots[slot as usize] = true;
        maps.next_slot = (slot + 1) % MAX_RUNS;
        drop(maps);
        let pidfd = pidfd_open(root_pid)?;
        Ok(Run {
            inner,
            slot,
            child,
            root_pid,
            pidfd,
            started_ns,
            root_status: None,
        })
    }
}

impl Run {
    /// The root's pid (in cylo-usage's pid namespace).
    pub fn root_pid(&self) -> u32 {
        self.root_pid
    }

    /// The root's exit status, once it has exited and been reaped.
    pub fn root_status(&self) -> Option<ExitStatus> {
        self.root_status
    }

    /// Sends `signal` to the root, if it has not been reaped yet.
    pub fn signal_root(&self, signal: i32) -> Result<(), SessionError> {
        if self.root_status.is_some() {
            return Ok(());
        }
        // SAFETY: pidfd_send_signal on our own pidfd; no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(SessionError::Syscall {
                syscall: "pidfd_send_signal",
                pid: self.root_pid,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Waits for the root to exit and reaps it. Its descendants may still run.
    pub async fn wait_root(&mut self) -> Result<ExitStatus, SessionError> {
        if let Some(status) = self.root_status {
            return Ok(status);
        }
        let err = |syscall, source| SessionError::Syscall {
            syscall,
            pid: self.root_pid,
            source,
        };
        let fd = dup(self.pidfd.as_raw_fd()).map_err(|e| err("fcntl(F_DUPFD)", e))?;
        let afd = watch(fd).map_err(|e| err("epoll_ctl", e))?;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| err("waitid", e))? {
                self.root_status = Some(status);
                return Ok(status);
            }
            let mut guard = afd.readable().await.map_err(|e| err("epoll_wait", e))?;
            guard.clear_ready();
        }
    }

    /// The kernel's record of this run, as it is now.
    pub fn counters(&self) -> Result<RunCounters, SessionError> {
        self.inner
            .maps()
            .runs
            .get(&self.slot, 0)
            .map_err(map_err("reading the run record"))
    }

    /// True once every thread that ever joined the run has exited.
    pub fn is_finished(&self) -> Result<bool, SessionError> {
        Ok(self.counters()?.finished())
    }

    /// Waits until every thread of the tree has exited, daemonised ones included.
    pub async fn wait_finished(&self) -> Result<(), SessionError> {
        let events_fd = {
            let events = self.inner.events.lock().unwrap_or_else(|e| e.into_inner());
            dup(events.as_raw_fd())
        };
        let afd = events_fd.and_then(watch).ok();
        loop {
            self.drain_events();
            if self.is_finished()? {
                return Ok(());
            }
            match &afd {
                Some(afd) => {
                    if let Ok(Ok(mut guard)) = tokio::time::timeout(POLL, afd.readable()).await {
                        guard.clear_ready();
                    }
                }
                None => tokio::time::sleep(POLL).await,
            }
        }
    }

    fn drain_events(&self) {
        let mut events = self.inner.events.lock().unwrap_or_else(|e| e.into_inner());
        while events.next().is_some() {}
    }

    /// The live threads of this run, from the membership map.
    fn live_members(&self) -> Result<Vec<TaskMember>, SessionError> {
        let maps = self.inner.maps();
        let mut out = Vec::new();
        for entry in maps.tasks.iter() {
            match entry {
                Ok((_, m)) if m.run == self.slot => out.push(m),
                Ok(_) => {}
                // The entry went away between listing its key and reading it: the thread
                // exited, which the generation check below notices.
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("listing live threads")(e)),
            }
        }
        Ok(out)
    }

    /// Block I/O per device submitted by this run's tasks.
    fn devices(&self) -> Result<Vec<DiskDevice>, SessionError> {
        let maps = self.inner.maps();
        let mut out = Vec::new();
        for entry in maps.devs.iter() {
            match entry {
                Ok((k, c)) if k.run == self.slot => out.push(DiskDevice {
                    device: usage::device_name(k.dev),
                    read_bytes: c.read_bytes,
                    write_bytes: c.write_bytes,
                    read_ops: c.read_ops,
                    write_ops: c.write_ops,
                }),
                Ok(_) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("listing block devices")(e)),
            }
        }
        Ok(out)
    }

    /// What the run has used so far: the kernel's totals for exited threads plus /proc reads
    /// of the live ones, made consistent by re-checking the exit generation.
    pub fn usage(&self) -> Result<ResourceUsage, SessionError> {
        let units = Units {
            ticks_per_second: procfs::clock_ticks_per_second(),
            page_size: procfs::page_size(),
        };
        let root = RootExit {
            exit_code: self.root_status.and_then(|s| s.code()),
            signal: self.root_status.and_then(|s| s.signal()),
        };
        let measured = self.inner.measured;
        let mut last = None;
        for _ in 0..SNAPSHOT_ATTEMPTS {
            let before = self.counters()?;
            let devices = self.devices()?;
            if before.finished() {
                let wall = before.ended_ns.saturating_sub(self.started_ns) / 1_000_000;
                let live = Live {
                    devices,
                    complete: true,
                    ..Live::default()
                };
                return Ok(usage::merge(&before, measured, &live, units, root, wall));
            }
            let members = self.live_members()?;
            let threads: Vec<ThreadSample> = members
                .iter()
                .filter_map(|m| procfs::read_thread(m.tgid, m.tid, m.start_boottime_ns).ok())
                .collect();
            let mut tgids: Vec<u32> = members.iter().map(|m| m.tgid).collect();
            tgids.sort_unstable();
            tgids.dedup();
            let max_hwm_bytes = tgids
                .iter()
                .filter_map(|&t| procfs::read_vm_hwm(t))
                .max()
                .unwrap_or(0);
            let after = self.counters()?;
            let wall = monotonic_ns().saturating_sub(self.started_ns) / 1_000_000;
            let stable = before.threads_exited == after.threads_exited
                && before.threads_started == after.threads_started;
            let live = Live {
                complete: stable && threads.len() == members.len(),
                threads,
                max_hwm_bytes,
                devices,
            };
            let merged = usage::merge(&after, measured, &live, units, root, wall);
            if live.complete {
                return Ok(merged);
            }
            last = Some(merged);
        }
        Ok(last.expect("at least one attempt"))
    }
}

/// Removes the entries of `map` whose value matches.
fn remove_where<V: aya::Pod>(map: &mut HashMap<MapData, u64, V>, matches: impl Fn(&V) -> bool) {
    let keys: Vec<u64> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| matches(v))
        .map(|(k, _)| k)
        .collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // Stop following whatever of the tree is still alive, and free the slot.
        let mut maps = self.inner.maps();
        let slot = self.slot;
        remove_where(&mut maps.tasks, |m| m.run == slot);
        remove_where(&mut maps.procs, |p| p.run == slot);
        remove_where(&mut maps.mms, |m| m.run == slot);
        let devs: Vec<DevKey> = maps
            .devs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.run == slot)
            .collect();
        for k in devs {
            let _ = maps.devs.remove(&k);
        }
        maps.slots[self.slot as usize] = false;
        if self.root_status.is_none() {
            // Reap the root if it has already exited; never block here.
            let _ = self.child.try_wait();
        }
    }
}
