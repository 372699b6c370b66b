//! What a run knows, shared by its sampling thread and its [`ProcRun`](super::ProcRun).
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::proc::walker::Seed;
use crate::sys::lock;
use crate::sys::monotonic_ns;

use super::account::{Account, AttachAccount, Units};
use super::budget::BudgetWatch;
use super::fds::Pipe;
use super::reaper::{DONE, FAILED, REAPED};
use super::walk::Start;

pub(super) enum Mode {
    Spawned {
        acc: Account,
        pipe: Pipe,
        reaper: Seed,
        root: (u32, u64),
    },
    Attached {
        acc: AttachAccount,
        /// `None`: the root had already ended.
        root: Option<Seed>,
        /// Every child of this process is part of the tree (see
        /// [`ProcTracker::follow`](super::ProcTracker::follow)).
        own_children: bool,
    },
}

/// Where the run is, for waiters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Progress {
    pub(super) root_ended: bool,
    pub(super) finished: bool,
}

pub(super) struct State {
    pub(super) mode: Mode,
    pub(super) root_status: Option<i32>,
    pub(super) root_ended: bool,
    pub(super) finished: bool,
    pub(super) ended_ns: Option<u64>,
    /// Something went wrong with the reaper; said in the report's notes.
    pub(super) failure: Option<String>,
    /// The reaper process has exited and been reaped (always true for an attached run):
    /// a run is not over while its reaper still exists.
    pub(super) reaper_gone: bool,
    /// The budgets enforced from the samples (`--budgets best-effort`), if any.
    pub(super) budget: Option<BudgetWatch>,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) progress: tokio::sync::watch::Sender<Progress>,
    /// Readable when the progress changed (for event loops:
    /// [`ProcRun::wake_fds`](super::ProcRun::wake_fds)).
    pub(super) wake: OwnedFd,
    pub(super) stop: AtomicBool,
    pub(super) units: Units,
    pub(super) reason: Arc<str>,
    /// The signals sent to the tree so far.
    pub(super) signals_sent: Mutex<Vec<crate::usage::SignalSent>>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Where a walk of the tree now starts: below the reaper, or (attached) from the root
    /// and every member the samples know.
    pub(super) fn start(&self) -> Start {
        match &self.lock().mode {
            Mode::Spawned { reaper, .. } => Start::Below(reaper.pid),
            Mode::Attached {
                acc,
                root,
                own_children,
            } => Start::attached(root, acc, *own_children),
        }
    }

    /// Tells waiters about a change.
    pub(super) fn publish(&self, state: &State) {
        let now = Progress {
            root_ended: state.root_ended,
            finished: state.over(),
        };
        if *self.progress.borrow() != now {
            self.progress.send_replace(now);
            let one: u64 = 1;
            // SAFETY: an 8-byte write to our eventfd.
            unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

impl State {
    /// The tree has ended, and so has the reaper.
    pub(super) fn over(&self) -> bool {
        self.finished && self.reaper_gone
    }

    /// Takes in the reaper's records; true if any came.
    pub(super) fn take_records(&mut self) -> bool {
        let Mode::Spawned {
            acc, pipe, root, ..
        } = &mut self.mode
        else {
            return false;
        };
        let records = pipe.drain();
        let any = !records.is_empty();
        let mut reaped = false;
        for r in &records {
            match r.kind {
                REAPED => {
                    acc.reap(r);
                    reaped = true;
                    if r.pid as u32 == root.0 && (r.start_ticks == root.1 || r.start_ticks == 0) {
                        self.root_status = Some(r.status);
                        self.root_ended = true;
                    }
                }
                DONE => {
                    self.finished = true;
                    self.root_ended = true;
                    self.ended_ns.get_or_insert_with(monotonic_ns);
                }
                FAILED => {
                    self.failure = Some(format!(
                        "the reaper's waitid() failed ({}): start times of later reaped \
                         processes are unknown",
                        std::io::Error::from_raw_os_error(r.status)
                    ));
                }
                _ => {}
            }
        }
        // At each reap, the budgets against what is known without /proc: the counts, and
        // CPU and disk of what the reaper has reaped (the live processes' part waits for
        // the next sample).
        if reaped && let Some(w) = self.budget.as_mut() {
            w.check(acc.figures(None, None));
        }
        if pipe.eof && !self.finished {
            self.reaper_lost();
        }
        any
    }

    /// A budget has been crossed: the tree is to be killed.
    pub(super) fn budget_crossed(&self) -> bool {
        self.budget.as_ref().is_some_and(|w| w.exceeded.is_some())
    }

    pub(super) fn reaper_lost(&mut self) {
        self.failure = Some(
            "the reaper process ended before the tree did (killed?): what it had not reaped is \
             missing"
                .to_string(),
        );
        self.finished = true;
        self.root_ended = true;
        self.ended_ns.get_or_insert_with(monotonic_ns);
    }
}
