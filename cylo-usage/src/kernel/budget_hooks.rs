//! The hooks only budgets need, attached while some run has such a budget and detached when
//! the last one ends, so that a host without budgets pays nothing for them:
//! - [`Need::Birth`]: fexit on `schedule_tail` (where the kernel has no BPF trampolines, a
//!   kprobe on `calculate_sigpending`, which only `schedule_tail` calls; where it has no
//!   kprobes either, the raw tracepoint `sys_exit`), which kills a task refused at its fork
//!   before its first return to user space (processes and threads budgets);
//! - [`Need::Cpu`]: the `sched_stat_runtime` raw tracepoint, which charges CPU time as the
//!   scheduler accounts it, at every tick of a running task (CPU budgets);
//! - [`Need::Dirty`]: `writeback_dirty_folio` (`writeback_dirty_page` before 5.17), which
//!   charges a buffered writer as it dirties pages (disk-write budgets).
//!
//! Each program is loaded (verified) the first time a run needs it.
use std::sync::Arc;

use aya::Ebpf;
use aya::programs::fexit::FExitLinkId;
use aya::programs::kprobe::KProbeLinkId;
use aya::programs::{FExit, KProbe, ProgramError, RawTracePoint};

use crate::kernel::programs::program_as;
use crate::kernel::tracker::{BudgetLink as Link, Shared};
use crate::sys::lock;

/// How [`BudgetHookGuard::describe`] names the `sys_exit` fallback: what it is and what it
/// costs on arm64.
const SYS_EXIT_DESCRIPTION: &str = if cfg!(target_arch = "aarch64") {
    "the raw tracepoint sys_exit (this kernel has neither BPF trampolines nor kprobes; on \
     arm64 a refused process is killed at its first system call's exit), while attached"
} else {
    "the raw tracepoint sys_exit (this kernel has neither BPF trampolines nor kprobes), while \
     attached"
};

/// A hook some budgets need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// fexit on `schedule_tail`, a kprobe on `calculate_sigpending`, or the raw tracepoint
    /// `sys_exit`.
    Birth = 0,
    /// `sched_stat_runtime`.
    Cpu = 1,
    /// `writeback_dirty_folio`.
    Dirty = 2,
}

impl Need {
    /// What the hook is, for messages.
    pub(crate) fn hook(self) -> &'static str {
        match self {
            Need::Birth => {
                "fexit on schedule_tail (or a kprobe on calculate_sigpending, or the raw \
                 tracepoint sys_exit)"
            }
            Need::Cpu => "the raw tracepoint sched_stat_runtime",
            Need::Dirty => "the raw tracepoint writeback_dirty_folio (or writeback_dirty_page)",
        }
    }
}

/// The hooks a run's budgets hold; released when dropped.
pub(crate) struct BudgetHookGuard {
    shared: Arc<Shared>,
    held: Vec<Need>,
}

impl BudgetHookGuard {
    /// Whether a refused new process is killed before its first instruction: always, except
    /// through `sys_exit` on arm64, whose `ret_from_fork` does not pass it (the process dies
    /// at its first system call's exit there).
    pub(crate) fn refused_never_run(&self) -> bool {
        let hooks = lock(&self.shared.budget_hooks);
        !(cfg!(target_arch = "aarch64")
            && self.held.contains(&Need::Birth)
            && matches!(hooks.links[Need::Birth as usize], Some(Link::SysExit(_))))
    }

    /// The extra hooks held, for people: `; with fexit on schedule_tail, ...`, or empty.
    pub(crate) fn describe(&self) -> String {
        let hooks = lock(&self.shared.budget_hooks);
        let names: Vec<&str> = self
            .held
            .iter()
            .map(|&need| match (need, &hooks.links[need as usize]) {
                (Need::Birth, Some(Link::Fexit(_))) => "fexit on schedule_tail, while attached",
                (Need::Birth, Some(Link::Kprobe(_))) => {
                    "a kprobe on calculate_sigpending, which only schedule_tail calls (this \
                     kernel has no BPF trampolines), while attached"
                }
                (Need::Birth, Some(Link::SysExit(_))) => SYS_EXIT_DESCRIPTION,
                (Need::Birth, _) => "fexit on schedule_tail, while attached",
                (Need::Cpu, _) => "the raw tracepoint sched_stat_runtime, while attached",
                (Need::Dirty, _) => {
                    "the raw tracepoint writeback_dirty_folio (writeback_dirty_page before 5.17), \
                     while attached"
                }
            })
            .collect();
        if names.is_empty() {
            String::new()
        } else {
            format!("; with {}", names.join(" and "))
        }
    }
}

impl Drop for BudgetHookGuard {
    fn drop(&mut self) {
        let mut programs = self.shared.programs();
        let mut hooks = lock(&self.shared.budget_hooks);
        for &need in &self.held {
            let i = need as usize;
            hooks.users[i] = hooks.users[i].saturating_sub(1);
            if hooks.users[i] == 0
                && let Some(link) = hooks.links[i].take()
                && let Err(e) = detach(&mut programs.ebpf, need, link)
            {
                log::warn!("detaching {}: {e}", need.hook());
            }
        }
    }
}

impl Shared {
    /// Attaches the hooks `budgets` need (loading them the first time), held until the guard
    /// is dropped. Fails, naming the option and what is missing, when a budget cannot be
    /// enforced here.
    pub(crate) fn hold_budget_hooks(
        self: &Arc<Self>,
        wanted: &[Need],
    ) -> Result<BudgetHookGuard, (Need, String)> {
        let mut guard = BudgetHookGuard {
            shared: self.clone(),
            held: Vec::new(),
        };
        for &need in wanted {
            {
                let mut programs = self.programs();
                let mut hooks = lock(&self.budget_hooks);
                let i = need as usize;
                if hooks.links[i].is_none() {
                    let link = attach(&mut programs.ebpf, need).map_err(|e| {
                        (
                            need,
                            format!(
                                "{} could not be attached: {}",
                                need.hook(),
                                crate::first_line(&crate::error_chain(&e))
                            ),
                        )
                    })?;
                    hooks.links[i] = Some(link);
                }
                hooks.users[i] += 1;
            }
            guard.held.push(need);
        }
        Ok(guard)
    }
}

/// The raw tracepoint program of `need` (`sys_exit_doomed` for [`Need::Birth`]) and the
/// tracepoints it may attach to, the first the kernel has.
fn raw_tracepoint_of(need: Need) -> (&'static str, &'static [&'static str]) {
    match need {
        Need::Birth => (cylo_usage_abi::names::PROG_SYS_EXIT_DOOMED, &["sys_exit"]),
        Need::Cpu => (
            cylo_usage_abi::names::PROG_SCHED_STAT_RUNTIME,
            &["sched_stat_runtime"],
        ),
        Need::Dirty => (
            cylo_usage_abi::names::PROG_WRITEBACK_DIRTY,
            &["writeback_dirty_folio", "writeback_dirty_page"],
        ),
    }
}

/// Program `name` of the object as a `T`.
fn program<'e, T>(ebpf: &'e mut Ebpf, name: &'static str) -> Result<&'e mut T, ProgramError>
where
    &'e mut T: TryFrom<&'e mut aya::programs::Program, Error = ProgramError>,
{
    program_as(ebpf, name, |source| {
        crate::kernel::programs::LoadError::Attach {
            program: name,
            tracepoint: "(a budget's hook)",
            source,
        }
    })
    .map_err(|e| match e {
        crate::kernel::programs::LoadError::Attach { source, .. } => source,
        other => ProgramError::IOError(std::io::Error::other(other.to_string())),
    })
}

fn attach(ebpf: &mut Ebpf, need: Need) -> Result<Link, ProgramError> {
    if need == Need::Birth {
        // A trampoline first: no limit on calls in flight, and interrupts are on. Else an
        // entry kprobe on what `schedule_tail` calls last (interrupts on, only new tasks;
        // a kretprobe on `schedule_tail` can miss: see the program's comment). Else the
        // first return to user space, through `sys_exit`, which arm64 does not pass.
        match attach_fexit(ebpf) {
            Ok(id) => return Ok(Link::Fexit(id)),
            Err(e) => log::debug!("schedule_tail fexit: {e}; trying a kprobe"),
        }
        match attach_kprobe(ebpf) {
            Ok(id) => return Ok(Link::Kprobe(id)),
            Err(e) => log::debug!(
                "kprobe on {}: {e}; using the sys_exit tracepoint",
                cylo_usage_abi::names::KPROBE_NEW_TASK_SIGPENDING
            ),
        }
    }
    let (name, points) = raw_tracepoint_of(need);
    let p: &mut RawTracePoint = program(ebpf, name)?;
    if p.fd().is_err() {
        p.load()?;
    }
    let mut last = None;
    for point in points {
        match p.attach(point) {
            Ok(id) if need == Need::Birth => return Ok(Link::SysExit(id)),
            Ok(id) => return Ok(Link::Tracepoint(id)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one tracepoint"))
}

/// Loads (with the kernel's BTF, parsed for this) and attaches the fexit program on
/// `schedule_tail`.
fn attach_fexit(ebpf: &mut Ebpf) -> Result<FExitLinkId, ProgramError> {
    let btf = aya::Btf::from_sys_fs()
        .map_err(|e| ProgramError::IOError(std::io::Error::other(e.to_string())))?;
    let p: &mut FExit = program(ebpf, cylo_usage_abi::names::PROG_SCHEDULE_TAIL_EXIT)?;
    p.load("schedule_tail", &btf)?;
    p.attach()
}

/// Loads (the first time) and attaches the kprobe on `calculate_sigpending`.
fn attach_kprobe(ebpf: &mut Ebpf) -> Result<KProbeLinkId, ProgramError> {
    let p: &mut KProbe = program(
        ebpf,
        cylo_usage_abi::names::PROG_CALCULATE_SIGPENDING_DOOMED,
    )?;
    if p.fd().is_err() {
        p.load()?;
    }
    p.attach(cylo_usage_abi::names::KPROBE_NEW_TASK_SIGPENDING, 0)
}

fn detach(ebpf: &mut Ebpf, need: Need, link: Link) -> Result<(), ProgramError> {
    match link {
        Link::Kprobe(id) => {
            let p: &mut KProbe = program(
                ebpf,
                cylo_usage_abi::names::PROG_CALCULATE_SIGPENDING_DOOMED,
            )?;
            p.detach(id)
        }
        Link::Fexit(id) => {
            let p: &mut FExit = program(ebpf, cylo_usage_abi::names::PROG_SCHEDULE_TAIL_EXIT)?;
            p.detach(id)?;
            // The kernel cannot attach it to its function again: loaded again next time.
            p.unload()
        }
        Link::SysExit(id) | Link::Tracepoint(id) => {
            let p: &mut RawTracePoint = program(ebpf, raw_tracepoint_of(need).0)?;
            p.detach(id)
        }
    }
}
