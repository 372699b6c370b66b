//! The sampling thread of a run: it takes in the reaper's records, samples /proc, checks the
//! budgets and kills the tree once one is crossed.
use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::proc::walker::{self, Detail, Node, ProcFs, Read};
use crate::sys::lock;
use crate::sys::monotonic_ns;

use super::account::Reaped;
use super::fds::poll_in;
use super::state::{Mode, Shared};
use super::walk::{self, StopAt, kill_tree, walk_below_until};

/// One sample: the tree read from /proc, taken into the account, and the budgets checked
/// against it. Returns the live members it read if it saw a budget crossed first.
pub(super) fn sample(shared: &Shared, fs: &ProcFs) -> Option<Vec<(u32, u64)>> {
    let units = shared.units;
    let (attached, base, stop) = {
        let mut state = shared.lock();
        let attached = matches!(state.mode, Mode::Attached { .. });
        // A budget on counts or memory of a spawned run: the walk stops as soon as what it
        // has read crosses it (a large tree that changes fast, a fork bomb, takes long to
        // read, the more so as it takes the CPUs from the sampler).
        let stop = match (&state.mode, &state.budget) {
            (Mode::Spawned { reaper, .. }, Some(w)) if w.exceeded.is_none() => {
                StopAt::of(&w.budgets).map(|stop| (reaper.pid, stop))
            }
            _ => None,
        };
        // A budget on CPU or disk of a spawned run: the reaper's totals are taken before the
        // tree is read, so that a process reaped meanwhile counts once (in its reading) or
        // not at all (until the next sample), never twice.
        let detail = state
            .budget
            .as_ref()
            .is_some_and(|w| w.detail && w.exceeded.is_none());
        let base: Option<Reaped> = if detail && !attached {
            state.take_records();
            shared.publish(&state);
            match &state.mode {
                Mode::Spawned { acc, .. } => Some(acc.reaped),
                Mode::Attached { .. } => None,
            }
        } else {
            None
        };
        (attached, base, stop)
    };
    // A permission error (a setuid program in the tree) leaves the sample empty rather than
    // ending the run; the reaper's totals do not depend on samples.
    let nodes = match stop {
        Some((reaper, stop)) => walk_below_until(fs, reaper, &stop),
        None => walk::tree_now(fs, shared.start()),
    }
    .unwrap_or_default();
    fs.end_pass();
    let details: Vec<(Node, Detail)> = if attached || base.is_some() {
        nodes
            .iter()
            .filter_map(|n| match walker::detail(fs, n, units.tick_ns, false) {
                Ok(Read::Got(d)) => Some((n.clone(), d)),
                _ => None,
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut state = shared.lock();
    // Records that came while /proc was read go in before the sample.
    state.take_records();
    let mut done = None;
    let figures = match &mut state.mode {
        Mode::Spawned { acc, .. } => {
            acc.observe(&nodes, units.page_size);
            // Without a budget on CPU or disk, their figures are the reaped part alone.
            match &base {
                Some(base) => acc.figures(Some(base), Some(&details)),
                None => acc.figures(None, None),
            }
        }
        Mode::Attached { acc, .. } => {
            acc.observe(&details, units.page_size);
            let (root_ended, status) = acc.root_end();
            done = Some((root_ended, status, acc.finished()));
            acc.figures().unwrap_or_default()
        }
    };
    let mut crossed = None;
    if let Some(w) = state.budget.as_mut()
        && w.exceeded.is_none()
    {
        w.check(figures);
        if w.exceeded.is_some() {
            crossed = Some(
                nodes
                    .iter()
                    .filter(|n| !n.stat.is_zombie())
                    .map(Node::key)
                    .collect(),
            );
        }
    }
    if let Some((root_ended, status, finished)) = done {
        state.root_ended |= root_ended;
        if state.root_status.is_none() {
            state.root_status = status;
        }
        if finished && !state.finished {
            state.finished = true;
            state.root_ended = true;
            state.ended_ns = Some(monotonic_ns());
        }
    }
    shared.publish(&state);
    crossed
}

/// The sampling thread: takes in the reaper's records as they come, samples /proc every
/// interval, and reaps the reaper at the end.
pub(super) fn sampler(shared: Arc<Shared>, mut reaper: Option<Child>) {
    let interval = shared.units.interval;
    let pipe_fd = match &shared.lock().mode {
        Mode::Spawned { pipe, .. } => Some(pipe.file.as_raw_fd()),
        Mode::Attached { .. } => None,
    };
    let fs = ProcFs::host_cached();
    let mut next = Instant::now();
    let mut rounds: u64 = 0;
    // Once a budget is crossed: the members killed for it so far, and whether it was done.
    let mut budget_signalled: HashSet<(u32, u64)> = HashSet::new();
    let mut budget_killed = false;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let wait = next.saturating_duration_since(Instant::now());
        let readable = match pipe_fd {
            Some(fd) => poll_in(fd, wait),
            None => {
                std::thread::sleep(wait);
                false
            }
        };
        rounds += 1;
        {
            let mut state = shared.lock();
            if readable {
                state.take_records();
            }
            // The reaper may have died without a word (SIGKILL by someone): checked now and
            // then (its pipe's end says so too, unless a stray fork still holds it).
            if !state.finished
                && rounds.is_multiple_of(16)
                && let Some(child) = reaper.as_mut()
                && matches!(child.try_wait(), Ok(Some(_)))
            {
                state.take_records();
                if !state.finished {
                    state.reaper_lost();
                }
            }
            shared.publish(&state);
            if state.finished {
                break;
            }
        }
        let mut sampled = false;
        let mut first: Vec<(u32, u64)> = Vec::new();
        if Instant::now() >= next {
            first = sample(&shared, &fs).unwrap_or_default();
            sampled = true;
            next += interval;
            let now = Instant::now();
            if next < now {
                next = now + interval;
            }
        }
        // A budget crossed (in this sample, or at a reap): the tree is killed at once (the
        // members the sample read first), and after each later sample, whatever of it
        // appeared since is killed too.
        if (sampled || !budget_killed) && shared.lock().budget_crossed() {
            let sent = kill_tree(libc::SIGKILL, &mut budget_signalled, &first, || {
                shared.start()
            });
            if sent > 0 || !budget_killed {
                crate::usage::SignalSent::record(
                    &mut lock(&shared.signals_sent),
                    libc::SIGKILL,
                    sent,
                    0,
                );
            }
            budget_killed = true;
        }
    }
    if let Some(mut child) = reaper {
        // After its last record the reaper only exits. If the run was dropped before the
        // tree ended, this waits until it does (the reaper still reaps it all).
        let _ = child.wait();
        let mut state = shared.lock();
        state.reaper_gone = true;
        shared.publish(&state);
    }
}
