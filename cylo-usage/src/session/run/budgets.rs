//! A run's budgets in userspace: the crossing the kernel recorded, and the kill of the
//! whole tree it calls for (the kernel has killed the task that crossed, and kills any
//! member that forks from then on).
use cylo_usage_abi::RunCounters;

use crate::session::run::{Run, SessionError};
use crate::sys::{lock, procfs};

/// A run's budgets, and the hooks they need, held while the run lives.
#[derive(Default)]
pub(crate) struct RunBudget {
    pub(crate) budgets: crate::usage::Budgets,
    _hooks: Option<crate::kernel::budget_hooks::BudgetHookGuard>,
    /// Set once the run has been killed for crossing a budget.
    killed: std::sync::atomic::AtomicBool,
}

impl Run {
    /// Gives the run its budgets and the hooks they hold (see [`crate::session::slot::open_slot`]).
    pub(crate) fn set_budgets(
        &mut self,
        budgets: crate::usage::Budgets,
        hooks: Option<crate::kernel::budget_hooks::BudgetHookGuard>,
    ) {
        self.budget.budgets = budgets;
        self.budget._hooks = hooks;
    }

    /// The budget the run has crossed, if any (recorded by the kernel at the crossing).
    pub fn budget_exceeded(&self) -> Result<Option<crate::usage::BudgetExceeded>, SessionError> {
        Ok(self.crossing(&self.counters()?))
    }

    /// The crossing recorded in `c`, the run's record, if any.
    pub(super) fn crossing(&self, c: &RunCounters) -> Option<crate::usage::BudgetExceeded> {
        if c.budget_crossed == 0 {
            return None;
        }
        let share = self
            .inner
            .maps()
            .run_control
            .get(&self.slot, 0)
            .map(|ctl| ctl.max_tasks)
            .unwrap_or(0);
        crate::usage::BudgetExceeded::from_counters(
            c,
            &self.budget.budgets,
            share,
            procfs::page_size(),
        )
    }

    /// If the run has crossed a budget and is not killed yet: kills every member (SIGKILL).
    /// The kernel has killed the task that crossed, and kills any member that forks from the
    /// crossing on; this reaches the others.
    pub(super) fn enforce_budget(&self, c: &RunCounters) -> Result<(), SessionError> {
        use std::sync::atomic::Ordering;
        if c.budget_crossed == 0 || self.budget.killed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if let (Some(tree), Some(e)) = (self.tree.as_ref(), self.crossing(c)) {
            lock(tree).announce_budget(&e, c.budget_crossed_ns);
        }
        self.kill(libc::SIGKILL).map(|_| ())
    }
}
