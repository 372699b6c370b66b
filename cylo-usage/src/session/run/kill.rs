//! Killing a run's tree: every live member, daemons that left the root's session included,
//! until no new one appears, each through a pidfd checked against its start time.
use std::collections::HashSet;

use crate::session::run::{KILL_ROUNDS, Run, SessionError, map_err, pidfd_of, pidfd_send_signal};
use crate::sys::{lock, procfs};

impl Run {
    /// Sends `signal` to every live process of the tree, daemons that left the root's process
    /// group and session included, until no new member appears. From the first call on, a
    /// member that forks gets `signal` in the kernel at its fork, so a fork bomb cannot outrun
    /// the kill. Each process is signalled through a pidfd checked against its start time, so
    /// a reused pid is never signalled. Returns how many processes were signalled.
    pub fn kill(&self, signal: i32) -> Result<usize, SessionError> {
        self.kill_as(signal, None)
    }

    /// [`Run::kill`] on behalf of user `uid` (a daemon's client), when not `None`: only the
    /// members `uid` could signal itself (its real or saved uid is `uid`, as `kill(2)` would
    /// check) are signalled, from userspace (the kernel's signal at fork, which cannot check,
    /// is not used).
    pub(crate) fn kill_as(&self, signal: i32, uid: Option<u32>) -> Result<usize, SessionError> {
        if uid.is_none() {
            let mut maps = self.inner.maps();
            let mut ctl = maps
                .run_control
                .get(&self.slot, 0)
                .map_err(map_err("reading the run's controls"))?;
            ctl.kill_signal = signal as u32;
            maps.run_control
                .set(self.slot, ctl, 0)
                .map_err(map_err("setting the run's controls"))?;
        }
        let hz = procfs::clock_ticks_per_second();
        let tick_ns = 1_000_000_000 / hz.max(1);
        let mut signalled: HashSet<(u32, u64)> = HashSet::new();
        let mut spared: HashSet<(u32, u64)> = HashSet::new();
        for _ in 0..KILL_ROUNDS {
            let mut fresh = 0;
            let mut processes: Vec<(u32, u64)> = self
                .live_members(false)?
                .iter()
                .map(|m| (m.tgid, m.process_start_boottime_ns))
                .collect();
            processes.sort_unstable();
            processes.dedup();
            for (tgid, start) in processes {
                if tgid == 0
                    || signalled.contains(&(tgid, start))
                    || spared.contains(&(tgid, start))
                {
                    continue;
                }
                let Ok(fd) = pidfd_of(tgid) else {
                    continue; // gone
                };
                // The pidfd pins the pid: if the process behind it has the member's start
                // time now, it is the member.
                match procfs::process_start_ticks(tgid) {
                    Some(t) if t == start / tick_ns => {}
                    _ => continue,
                }
                if let Some(uid) = uid {
                    match procfs::read_uids(tgid) {
                        Some([real, _, saved, _]) if real == uid || saved == uid => {}
                        Some(_) => {
                            spared.insert((tgid, start));
                            continue;
                        }
                        None => continue,
                    }
                }
                if pidfd_send_signal(&fd, signal).is_ok() {
                    signalled.insert((tgid, start));
                    fresh += 1;
                }
            }
            if fresh == 0 {
                break;
            }
        }
        crate::usage::SignalSent::record(
            &mut lock(&self.signals_sent),
            signal,
            signalled.len() as u64,
            spared.len() as u64,
        );
        Ok(signalled.len())
    }
}
