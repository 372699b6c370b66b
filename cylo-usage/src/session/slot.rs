//! Claiming a run's slot in the kernel: its budgets checked and the hooks they need held,
//! then a free slot's record zeroed and its controls (share, budgets) set. The start of
//! every run: spawned, attached, or a daemon client's.
use std::sync::Arc;

use cylo_usage_abi::{MAX_RUNS, RunControl, RunCounters, run_flags};

use crate::kernel::budget_hooks::BudgetHookGuard;
use crate::kernel::tracker::{Maps, Shared, run_share};
use crate::session::run::{RunOptions, SessionError, map_err};
use crate::sys::procfs;

/// How a run's tree comes to be followed, as far as its slot goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// Its root is started for it (by the tracker, or by a daemon's client): every process
    /// joins the run at its fork, with every thread it will have.
    Spawn,
    /// Running processes are adopted: a process may have threads the run never follows.
    Attach,
}

/// Checks `options`' budgets, attaches the hooks they need, and claims a slot for the run
/// with its flags, share and budgets: the start of every run. Returns the slot, the hooks,
/// and the run's flags in the kernel ([`RunOptions::run_flags`]).
pub(crate) fn open_slot(
    inner: &Arc<Shared>,
    options: &RunOptions,
    start: Start,
) -> Result<(u32, Option<BudgetHookGuard>, u64), SessionError> {
    if inner.lean {
        if options.tree {
            return Err(SessionError::NotLoaded {
                what: "a breakdown (tree)",
            });
        }
        if options.events.is_some() {
            return Err(SessionError::NotLoaded {
                what: "an event stream",
            });
        }
    }
    let budgets = &options.budgets;
    let guard = if budgets.is_empty() {
        None
    } else {
        budgets
            .check()
            .map_err(|reason| SessionError::InvalidBudget { reason })?;
        let needs = crate::usage::budgets::needs(budgets, &inner.measured)?;
        Some(inner.hold_budget_hooks(&needs).map_err(|(need, reason)| {
            crate::usage::budgets::Unenforceable {
                option: crate::usage::budgets::option_for(budgets, need),
                reason,
            }
        })?)
    };
    let mut control = RunControl {
        max_tasks: run_share(options.max_tasks, inner.capacity),
        ..RunControl::default()
    };
    budgets.write_into(&mut control, procfs::page_size());
    // The kernel splits each process's CPU time itself where its handlers have the atomics
    // for it and every process joins at its fork with all its threads.
    let flags = options.run_flags(start == Start::Spawn && inner.measured.atomics);
    // The lean handlers with atomics write no record: a run of theirs must want none.
    if inner.lean && inner.measured.atomics && flags != run_flags::KERNEL_SPLIT {
        return Err(SessionError::NotLoaded {
            what: "records (the lean handlers write none)",
        });
    }
    let slot = claim_slot(&mut inner.maps(), flags, control)?;
    Ok((slot, guard, flags))
}

/// Zeroes a free slot's record (with `flags`), sets its controls (a share and budgets), and
/// marks it used.
pub(crate) fn claim_slot(
    maps: &mut Maps,
    flags: u64,
    control: RunControl,
) -> Result<u32, SessionError> {
    let slot = (0..MAX_RUNS)
        .map(|i| (maps.next_slot + i) % MAX_RUNS)
        .find(|&s| !maps.slots[s as usize])
        .ok_or(SessionError::NoFreeSlot { max: MAX_RUNS })?;
    let record = RunCounters {
        flags,
        ..RunCounters::default()
    };
    maps.runs
        .set(slot, record, 0)
        .map_err(map_err("zeroing the run record"))?;
    maps.run_control
        .set(slot, control, 0)
        .map_err(map_err("setting the run's controls"))?;
    maps.slots[slot as usize] = true;
    maps.next_slot = (slot + 1) % MAX_RUNS;
    Ok(slot)
}

impl crate::Tracker {
    /// Whether each budget can be enforced here, and how (or why not): one line per budget,
    /// named as the report's `budgets` fields, for `cylo-usage features`. The hooks a budget
    /// needs are attached and detached again to find out.
    pub fn budget_features(&self) -> Vec<crate::kernel::features::Feature> {
        use crate::usage::budgets::{Budgets, Resource, needs};
        Resource::ALL
            .into_iter()
            .map(|r| {
                let mut one = Budgets::default();
                one.set(r, Some(1));
                let result = needs(&one, &self.inner.measured)
                    .map_err(|e| e.reason)
                    .and_then(|wanted| {
                        let guard = self
                            .inner
                            .hold_budget_hooks(&wanted)
                            .map_err(|(_, why)| why)?;
                        Ok((guard.describe(), guard.refused_never_run()))
                    });
                let field = match r {
                    Resource::Processes => "budgets.max_processes",
                    Resource::Threads => "budgets.max_threads",
                    Resource::CpuTime => "budgets.max_cpu_ns",
                    Resource::Memory => "budgets.max_memory_bytes",
                    Resource::DiskWrite => "budgets.max_disk_write_bytes",
                    Resource::DiskRead => "budgets.max_disk_read_bytes",
                    Resource::Network | Resource::TasksAlive => "budgets.max_network_bytes",
                };
                let never_run = result.as_ref().is_ok_and(|(_, never_run)| *never_run);
                let at = match r {
                    Resource::Processes | Resource::Threads if never_run => {
                        "the one past it is refused at its fork (its creator's process killed), and killed before it runs"
                    }
                    Resource::Processes | Resource::Threads => {
                        "the one past it is refused at its fork (its creator's process killed), and killed by its first system call's exit"
                    }
                    Resource::CpuTime => "charged at every scheduler tick and thread end",
                    Resource::Memory => "checked at every RSS change (rss_stat)",
                    Resource::DiskWrite => {
                        "charged at every bio the tree submits, page it dirties, and thread end"
                    }
                    Resource::DiskRead => "charged at every bio the tree submits, and thread end",
                    Resource::Network | Resource::TasksAlive => {
                        "checked at every socket call that moved bytes"
                    }
                };
                crate::kernel::features::Feature {
                    counter: std::borrow::Cow::Borrowed(field),
                    measured: result.is_ok(),
                    how: match result {
                        Ok((hooks, _)) => format!("enforced in the kernel ({}): {at}{hooks}", r.option()),
                        Err(why) => format!("refused ({}): {why}", r.option()),
                    },
                }
            })
            .collect()
    }
}
