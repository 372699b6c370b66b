//! Reading the tree from /proc for a sample (all of it, or until what has been read crosses
//! a budget), and signalling every member of it.
use std::collections::{HashSet, VecDeque};

use crate::proc::walker::{self, Detail, Node, ProcFs, Read, Seed};
use crate::sys::procfs::{self, ProcError};
use crate::sys::{pidfd_open, pidfd_send_signal};
use crate::usage::Budgets;

use super::account::AttachAccount;

/// Rounds of signalling the tree before a kill stops looking for newcomers.
const KILL_ROUNDS: usize = 1000;

/// Where a walk of the tree starts.
pub(super) enum Start {
    /// A spawned run: everything below the reaper (its pid).
    Below(u32),
    /// An attached run: these seeds (the root first, then every member the samples know)
    /// and what is below them; with `own_children`, every child of this process too.
    Seeds {
        seeds: Vec<Seed>,
        own_children: bool,
    },
}

impl Start {
    /// An attached run's start: `root` (if it has not ended), then every member `acc` knows.
    pub(super) fn attached(root: &Option<Seed>, acc: &AttachAccount, own_children: bool) -> Start {
        let mut seeds: Vec<Seed> = root.iter().copied().collect();
        seeds.extend(acc.known().into_iter().map(|(pid, start)| Seed {
            pid,
            start_ticks: Some(start),
        }));
        Start::Seeds {
            seeds,
            own_children,
        }
    }
}

/// The tree now, from /proc: everything below the reaper, or (attached) the root, every
/// member the samples know and what is below them, the tracker itself left out.
pub(super) fn tree_now(fs: &ProcFs, start: Start) -> Result<Vec<Node>, ProcError> {
    let me = std::process::id();
    match start {
        Start::Below(reaper) => walker::walk_below(fs, reaper),
        Start::Seeds {
            seeds,
            own_children: false,
        } => walker::walk(fs, &seeds, &HashSet::from([me])),
        Start::Seeds {
            seeds,
            own_children: true,
        } => {
            // The root (first: the account takes the first node for the root), then every
            // child of this process (orphans came back to it) and what is below them.
            let mut nodes = walker::walk(fs, &seeds, &HashSet::from([me]))?;
            let mut seen: HashSet<u32> = nodes.iter().map(|n| n.pid).collect();
            for n in walker::walk_below(fs, me)? {
                if seen.insert(n.pid) {
                    nodes.push(n);
                }
            }
            Ok(nodes)
        }
    }
}

/// Where a sample's walk may stop: it has read more processes, threads or resident pages
/// than a budget allows (what it has not read yet cannot undo the crossing).
#[derive(Clone, Copy, Debug)]
pub(super) struct StopAt {
    processes: u64,
    threads: u64,
    rss_bytes: u64,
}

impl StopAt {
    /// `None` without a budget on processes, threads or memory.
    pub(super) fn of(budgets: &Budgets) -> Option<StopAt> {
        let (p, t, m) = (
            budgets.max_processes,
            budgets.max_threads,
            budgets.max_memory_bytes,
        );
        (p.is_some() || t.is_some() || m.is_some()).then(|| StopAt {
            processes: p.unwrap_or(u64::MAX),
            threads: t.unwrap_or(u64::MAX),
            rss_bytes: m.unwrap_or(u64::MAX),
        })
    }
}

/// [`walker::walk_below`] (the same reads, in the same order: parents before children), which
/// stops once the nodes read so far are past `stop`, as the account counts them (every node
/// and its threads, zombies included; the RSS of live ones): then the tree read in part.
/// On a kernel without `children` files, the whole tree is read.
pub(super) fn walk_below_until(
    fs: &ProcFs,
    parent: u32,
    stop: &StopAt,
) -> Result<Vec<Node>, ProcError> {
    if !fs.has_children_files(parent, parent) {
        return walker::walk_below(fs, parent);
    }
    let Read::Got(kids) = fs.children(parent, parent)? else {
        return Ok(Vec::new());
    };
    let page_size = procfs::page_size();
    let mut queue: VecDeque<(u32, u32)> = kids.into_iter().map(|k| (k, parent)).collect();
    let mut visited = HashSet::from([parent]);
    let mut nodes = Vec::new();
    let (mut threads, mut rss) = (0u64, 0u64);
    while let Some((pid, ppid)) = queue.pop_front() {
        if !visited.insert(pid) {
            continue;
        }
        let Read::Got(stat) = fs.stat(pid)? else {
            continue;
        };
        // Not the child listed: its pid was reused meanwhile.
        if stat.ppid != ppid {
            continue;
        }
        let tids = if stat.num_threads == 1 && !stat.is_zombie() {
            vec![pid]
        } else {
            match fs.threads(pid)? {
                Read::Got(tids) => tids,
                Read::Gone => continue,
            }
        };
        let mut kids: Vec<u32> = Vec::new();
        for &tid in &tids {
            if let Read::Got(c) = fs.children(pid, tid)? {
                kids.extend(c);
            }
        }
        kids.sort_unstable();
        kids.dedup();
        queue.extend(kids.into_iter().map(|k| (k, pid)));
        threads += tids.len() as u64;
        if !stat.is_zombie() {
            rss += stat.rss_pages * page_size;
        }
        nodes.push(Node { pid, stat, tids });
        if nodes.len() as u64 > stop.processes || threads > stop.threads || rss > stop.rss_bytes {
            break;
        }
    }
    Ok(nodes)
}

/// The processes of the tree alive now: (pid, start time).
fn members_now(start: Start) -> Vec<(u32, u64)> {
    let nodes = tree_now(&ProcFs::host(), start).unwrap_or_default();
    nodes
        .iter()
        .filter(|n| !n.stat.is_zombie())
        .map(Node::key)
        .collect()
}

/// Sends `signal` to every live process of the tree not in `signalled` yet, round after
/// round until no new one appears (see [`ProcRun::kill`](super::ProcRun::kill)); each one
/// tried goes into `signalled`. The first round is `first` when given (the members a sample
/// has just read, which spares a walk of the tree before the first signal), then the tree as
/// it is now, walked from where `start` says at each round.
/// Returns how many were sent it.
pub(super) fn kill_tree(
    signal: i32,
    signalled: &mut HashSet<(u32, u64)>,
    first: &[(u32, u64)],
    start: impl Fn() -> Start,
) -> u64 {
    let fs = ProcFs::host();
    let mut sent = 0u64;
    for round in 0..KILL_ROUNDS {
        let given = round == 0 && !first.is_empty();
        let members = if given {
            first.to_vec()
        } else {
            members_now(start())
        };
        let mut fresh = 0;
        for key in members {
            if !signalled.insert(key) {
                continue;
            }
            let Ok(fd) = pidfd_open(key.0) else {
                continue; // gone
            };
            if walker::start_ticks(&fs, key.0) != Some(key.1) {
                continue;
            }
            if pidfd_send_signal(&fd, signal).is_ok() {
                fresh += 1;
                sent += 1;
            }
        }
        // The given members are not the tree now: it is read at least once.
        if fresh == 0 && !given {
            break;
        }
    }
    sent
}

/// The tree under the reaper now, each process read in detail.
pub(super) fn read_live(reaper: &Seed, tick_ns: u64) -> Vec<(Node, Detail)> {
    let fs = ProcFs::host();
    let nodes = walker::walk_below(&fs, reaper.pid).unwrap_or_default();
    nodes
        .into_iter()
        .filter_map(|n| match walker::detail(&fs, &n, tick_ns, false) {
            Ok(Read::Got(d)) => Some((n, d)),
            _ => None,
        })
        .collect()
}
