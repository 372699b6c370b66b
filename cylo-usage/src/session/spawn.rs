//! Starting a run's root: a command the tracker spawns, or one a daemon's client is about to
//! create ([`PendingSpawn`]). The root joins its run inside the kernel, in the fork hook:
//! before the fork, the spawning thread is registered in `SPAWNERS`, and the first task it
//! creates joins the run before it can execute a single instruction. No hold-and-release
//! dance is needed, and the command is an ordinary [`std::process::Command`] (stdio,
//! environment, directory as the caller likes).

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;

use cylo_usage_abi::control;

use crate::kernel::tracker::{Maps, Tracker};
use crate::session::run::{Origin, Run, RunOptions, SessionError, map_err, pidfd_of, remove_where};
use crate::session::slot::{Start, open_slot};
use crate::sys::monotonic_ns;
use crate::sys::procfs;

/// Opens the spawn gate one more time, or closes it once: it counts the registrations that
/// may be pending (the fork hooks of untracked tasks look up `SPAWNERS` only while it is
/// not 0).
fn move_spawn_gate(maps: &mut Maps, open: bool) -> Result<(), SessionError> {
    let now = maps
        .spawn_gate
        .get(&0, 0)
        .map_err(map_err("reading the spawn gate"))?;
    let next = if open { now + 1 } else { now.saturating_sub(1) };
    maps.spawn_gate
        .set(0, next, 0)
        .map_err(map_err("moving the spawn gate"))
}

/// A run whose root another process is about to create (a daemon's client): its spawning
/// thread is registered in the kernel, and the gate is open until [`PendingSpawn::finish`]
/// or the drop.
pub(crate) struct PendingSpawn {
    run: Option<Run>,
    gate_open: bool,
}

impl PendingSpawn {
    /// The client has created its child (`created`) or failed to: closes the gate, forgets a
    /// registration the fork did not consume, and returns the run if its root joined and is
    /// a child of process `parent` while it lives (the client: a registered thread that exited
    /// before it forked could have left its `task_struct` address to a stranger's new task).
    pub(crate) fn finish(mut self, created: bool, parent: u32) -> Result<Run, SessionError> {
        let mut run = self.run.take().expect("finished once");
        let inner = run.inner.clone();
        {
            let mut maps = inner.maps();
            let slot = run.slot;
            remove_where(&mut maps.spawners, |s| s.run == slot);
            if std::mem::take(&mut self.gate_open) {
                move_spawn_gate(&mut maps, false)?;
            }
        }
        let c = run.counters()?;
        if !created {
            return Err(SessionError::NotJoined { pid: 0 });
        }
        if c.processes_started == 0 {
            return Err(SessionError::NotJoined { pid: 0 });
        }
        // The root, as this process's pid namespace sees it: the member whose process is the
        // root's, checked against its start time through a pidfd.
        let root = run
            .live_members(false)?
            .into_iter()
            .find(|m| m.process == c.root_process);
        // A root that has already ended (and left the membership map) cannot be checked here
        // any more (see the README's threat model for what that leaves open).
        let Some(m) = root else {
            return Ok(run);
        };
        let Ok(fd) = pidfd_of(m.tgid) else {
            return Ok(run);
        };
        // The pidfd pins the pid: with the member's start time, it is the member. Its parent
        // must be the client (a zombie keeps its parent until the client reaps it).
        let tick_ns = 1_000_000_000 / procfs::clock_ticks_per_second().max(1);
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", m.tgid))
            .ok()
            .and_then(|t| procfs::parse_stat_fields(&t));
        match stat {
            Some(s) if s.start_ticks == m.process_start_boottime_ns / tick_ns => {
                if s.ppid != parent {
                    return Err(SessionError::NotJoined {
                        pid: m.tgid as libc::pid_t,
                    });
                }
                run.root_pid = m.tgid;
                run.pidfd = Some(fd);
            }
            // Ended meanwhile.
            _ => {}
        }
        Ok(run)
    }
}

impl PendingSpawn {
    /// The run's slot in the kernel.
    pub(crate) fn slot(&self) -> u32 {
        self.run.as_ref().map_or(u32::MAX, |r| r.slot)
    }
}

impl Drop for PendingSpawn {
    fn drop(&mut self) {
        if let Some(run) = &self.run {
            let mut maps = run.inner.maps();
            let slot = run.slot;
            remove_where(&mut maps.spawners, |s| s.run == slot);
            if self.gate_open {
                let _ = move_spawn_gate(&mut maps, false);
            }
        }
    }
}

impl Tracker {
    /// For a daemon: a run whose root will be the next task that the thread behind
    /// `thread_dir` (its `/proc/PID/task/TID` directory, opened by its owner) creates. The
    /// kernel checks that the thread belongs to process `tgid` (as this process's pid
    /// namespace sees it), so a client can register only a thread of its own.
    pub(crate) fn prepare_remote_spawn(
        &self,
        thread_dir: &OwnedFd,
        tgid: u32,
        options: RunOptions,
    ) -> Result<PendingSpawn, SessionError> {
        let inner = self.inner.clone();
        let (slot, hooks, flags) = open_slot(&inner, &options, Start::Spawn)?;
        let started_ns = monotonic_ns();
        let mut run = Run::new(inner.clone(), slot, Origin::Remote, 0, None, started_ns);
        run.set_budgets(options.budgets, hooks);
        run.start_records(options, started_ns, flags);
        let mut maps = inner.maps();
        let code = inner
            .control([
                control::SPAWNER_FD,
                thread_dir.as_raw_fd() as u64,
                slot as u64,
                tgid as u64,
            ])
            .map_err(|source| SessionError::Syscall {
                syscall: "bpf(BPF_PROG_TEST_RUN)",
                pid: tgid as libc::pid_t,
                source,
            })?;
        if code != 0 {
            return Err(SessionError::Control {
                what: match code {
                    control::E_NOT_PEER => "register a thread of another process",
                    control::E_SELF => "register a thread of the tracker itself",
                    control::E_GONE => "register a thread that has exited",
                    _ => "register the spawning thread",
                },
                code,
            });
        }
        move_spawn_gate(&mut maps, true)?;
        drop(maps);
        Ok(PendingSpawn {
            run: Some(run),
            gate_open: true,
        })
    }

    /// Starts `command` as the root of a new run. The root and everything it ever creates are
    /// followed from the kernel's fork hook on.
    pub fn spawn(&self, command: &mut Command) -> Result<Run, SessionError> {
        self.spawn_with(command, RunOptions::default())
    }

    /// [`Tracker::spawn`] with a per-process breakdown and/or an event stream.
    pub fn spawn_with(
        &self,
        command: &mut Command,
        options: RunOptions,
    ) -> Result<Run, SessionError> {
        let inner = self.inner.clone();
        let (slot, hooks, flags) = open_slot(&inner, &options, Start::Spawn)?;
        let started_ns = monotonic_ns();
        let mut run = Run::new(inner.clone(), slot, Origin::Starting, 0, None, started_ns);
        run.set_budgets(options.budgets, hooks);
        run.start_records(options, started_ns, flags);
        // Declared after `run`, so that it is released before `run` is dropped on an error.
        let mut maps = inner.maps();
        // This thread's next new task is the root: recorded in the kernel by its task_struct,
        // so it works in any pid namespace.
        let code = inner
            .control([control::SPAWNER, slot as u64, 0, 0])
            .map_err(|source| SessionError::Syscall {
                syscall: "bpf(BPF_PROG_TEST_RUN)",
                pid: std::process::id() as libc::pid_t,
                source,
            })?;
        if code != 0 {
            return Err(SessionError::Control {
                what: "register the spawning thread",
                code,
            });
        }
        move_spawn_gate(&mut maps, true)?;
        let spawned = command.spawn();
        // The kernel forgot the registration at the fork; after a failed spawn it is still there.
        let _ = inner.control([control::UNSPAWN, 0, 0, 0]);
        move_spawn_gate(&mut maps, false)?;
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
        drop(maps);
        if joined == 0 {
            let _ = child.kill();
            let _ = child.wait();
            return Err(SessionError::NotJoined {
                pid: root_pid as libc::pid_t,
            });
        }
        run.root_pid = root_pid;
        run.origin = Origin::Spawned(child);
        run.pidfd = Some(pidfd_of(root_pid)?);
        Ok(run)
    }
}
