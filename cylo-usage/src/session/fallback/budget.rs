//! Budgets (`--max-*`) as the fallback takes them: which it refuses, and the watch it keeps
//! over those it enforces from its samples.
use crate::session::run::RunOptions;
use crate::usage::{BudgetExceeded, Budgets, Enforcement, Resource};

use super::account::Figures;
use super::error::FallbackError;

/// Budgets the fallback enforces from its samples, and the crossing once one is seen.
#[derive(Debug)]
pub(super) struct BudgetWatch {
    pub(super) budgets: Budgets,
    /// A budget on CPU time or disk bytes: a spawned run's live processes are read in
    /// detail at each sample (what the reaper has not reaped yet counts too).
    pub(super) detail: bool,
    /// The first crossing seen; the sampler kills the tree from then on.
    pub(super) exceeded: Option<BudgetExceeded>,
}

impl BudgetWatch {
    /// Records the first crossing `figures` show, if any.
    pub(super) fn check(&mut self, figures: Figures) {
        if self.exceeded.is_none() {
            self.exceeded = figures.crossed(&self.budgets);
        }
    }
}

/// The budgets of `options` as the fallback can enforce them: none asked, or all of them
/// from its samples (`Enforcement::BestEffort`); else the error that says which cannot
/// be enforced, and why (`reason`: why the eBPF tracker is not used).
pub(super) fn check_budgets(
    reason: &str,
    options: &RunOptions,
) -> Result<Option<BudgetWatch>, FallbackError> {
    let budgets = options.budgets;
    if budgets.is_empty() {
        return Ok(None);
    }
    budgets
        .check()
        .map_err(|reason| FallbackError::InvalidBudget { reason })?;
    let names = |rs: &[Resource]| rs.iter().map(|r| r.option()).collect::<Vec<_>>().join(", ");
    let network = budgets.max_network_bytes.is_some();
    let enforcement = options.budget_enforcement;
    let (resources, missing) = match enforcement {
        Enforcement::Exact => {
            let all: Vec<Resource> = budgets.resources().collect();
            let sampled: Vec<Resource> = budgets
                .resources()
                .filter(|&r| r != Resource::Network)
                .collect();
            let missing = if sampled.is_empty() {
                format!(
                    "the eBPF tracker is not loaded ({reason}), and the /proc fallback has \
                     no network counters"
                )
            } else {
                let mut m = format!(
                    "the eBPF tracker is not loaded ({reason}), and the /proc fallback only \
                     samples; use --budgets best-effort for sampled enforcement"
                );
                if network {
                    m.push_str(&format!(
                        " of {} (--max-network cannot be enforced even so: the /proc \
                         fallback has no network counters)",
                        names(&sampled)
                    ));
                }
                m
            };
            (all, missing)
        }
        Enforcement::BestEffort if network => (
            vec![Resource::Network],
            format!(
                "the eBPF tracker is not loaded ({reason}), and the /proc fallback has no \
                 network counters to sample, even with --budgets best-effort"
            ),
        ),
        Enforcement::BestEffort => {
            let detail = budgets.resources().any(|r| {
                matches!(
                    r,
                    Resource::CpuTime | Resource::DiskWrite | Resource::DiskRead
                )
            });
            return Ok(Some(BudgetWatch {
                budgets,
                detail,
                exceeded: None,
            }));
        }
    };
    Err(FallbackError::Unenforceable {
        options: names(&resources),
        resources,
        enforcement,
        missing,
    })
}
