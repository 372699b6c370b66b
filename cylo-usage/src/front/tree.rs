//! The per-process breakdown as a tree that summarises: figures first in aligned columns,
//! then the command, indented by its place in the tree. Siblings running the same executable
//! are folded into one line (their children merged below it, and folded again), levels past
//! a depth into "N more processes" lines, so that a build of thousands of processes fits a
//! terminal; [`TreeView::full`] shows every process on its own line.
//!
//! Text is shown unambiguously: the breakdown's strings come escaped already (a backslash as
//! `\\`, a byte that is not UTF-8 as `\xNN`, by `escape_bytes`); here control characters and
//! invisible formatting characters become `\xNN` of their bytes too. So every `\xNN` shown is
//! one byte of the original, every `\\` one backslash, and nothing reaches the terminal raw.
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::rc::Rc;

use super::commands::{
    Column, TAB, columns, figure_block, secs, shorten_end, shorten_middle, shown, size,
};
use crate::usage::ProcessUsage;
use crate::usage::commands::executable;

/// How [`render`] draws the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeView {
    /// The deepest level drawn (the root is level 0): what lies deeper is folded into one
    /// "N more processes" line under each line of the last level.
    pub max_depth: usize,
    /// Every process on its own line, at every depth, its command whole (still escaped),
    /// with its pid in place of the count.
    pub full: bool,
    /// The columns a line may take (its leading tab counted as 8); commands are shortened in
    /// the middle with "…" to fit.
    pub width: usize,
}

/// [`TreeView::max_depth`] by default: `sh -c './configure && make'` is 6 levels deep down to
/// the linker (sh, make, make -C sub, sh -c, gcc, collect2, ld); what is deeper is summed.
pub const DEFAULT_DEPTH: usize = 6;

/// [`TreeView::width`] by default.
pub const DEFAULT_WIDTH: usize = 160;

/// The most lines under one line (unless [`TreeView::full`]): the siblings with the most CPU
/// (with their descendants) keep theirs, the rest share one "N more processes" line.
pub const MAX_SIBLING_LINES: usize = 20;

impl Default for TreeView {
    /// [`DEFAULT_DEPTH`], folded, [`DEFAULT_WIDTH`]: a 4,000-process `./configure` takes
    /// about 100 to 150 lines.
    fn default() -> TreeView {
        TreeView {
            max_depth: DEFAULT_DEPTH,
            full: false,
            width: DEFAULT_WIDTH,
        }
    }
}

/// The columns the command keeps at least, however deep the line.
const MIN_TEXT: usize = 32;

/// What a line stands for, summed.
#[derive(Clone, Copy, Debug, Default)]
struct Agg {
    count: u64,
    cpu: u64,
    rss: Option<u64>,
    read: Option<u64>,
    written: Option<u64>,
    sent: Option<u64>,
    received: Option<u64>,
}

fn add_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    }
}

impl Agg {
    fn of(p: &ProcessUsage) -> Agg {
        Agg {
            count: 1,
            cpu: p.cpu_time_ns,
            rss: p.peak_memory_bytes,
            read: p.disk_bytes_read,
            written: p.disk_bytes_written,
            sent: p.network_bytes_sent,
            received: p.network_bytes_received,
        }
    }

    fn add(&mut self, o: &Agg) {
        self.count += o.count;
        self.cpu = self.cpu.saturating_add(o.cpu);
        self.rss = self.rss.max(o.rss);
        self.read = add_opt(self.read, o.read);
        self.written = add_opt(self.written, o.written);
        self.sent = add_opt(self.sent, o.sent);
        self.received = add_opt(self.received, o.received);
    }
}

/// How the processes of a line ended, counted.
#[derive(Default)]
struct Ends {
    refused: u64,
    signals: BTreeMap<i32, u64>,
    failed: BTreeMap<i32, u64>,
    running: u64,
}

impl Ends {
    fn add(&mut self, p: &ProcessUsage) {
        match (p.refused, p.signal, p.exit_code) {
            (true, _, _) => self.refused += 1,
            (_, Some(sig), _) => *self.signals.entry(sig).or_default() += 1,
            (_, None, Some(0)) => {}
            (_, None, Some(code)) => *self.failed.entry(code).or_default() += 1,
            (_, None, None) => self.running += 1,
        }
    }

    /// ` (killed by SIGKILL)`, ` (2 refused, 1 exit 2)`, or nothing when all exited 0.
    fn text(&self, single: bool) -> String {
        let n = |k: u64| {
            if single {
                String::new()
            } else {
                format!("{k} ")
            }
        };
        let mut parts = Vec::new();
        if self.refused > 0 {
            parts.push(format!("{}refused", n(self.refused)));
        }
        for (&sig, &k) in &self.signals {
            parts.push(format!("{}killed by {}", n(k), signal_name(sig)));
        }
        for (&code, &k) in &self.failed {
            parts.push(format!("{}exit {code}", n(k)));
        }
        if self.running > 0 {
            parts.push(format!("{}running", n(self.running)));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    }
}

/// The names of the signals that end processes.
#[rustfmt::skip]
const SIGNALS: [(i32, &str); 18] = [
    (libc::SIGHUP, "SIGHUP"), (libc::SIGINT, "SIGINT"), (libc::SIGQUIT, "SIGQUIT"),
    (libc::SIGILL, "SIGILL"), (libc::SIGTRAP, "SIGTRAP"), (libc::SIGABRT, "SIGABRT"),
    (libc::SIGBUS, "SIGBUS"), (libc::SIGFPE, "SIGFPE"), (libc::SIGKILL, "SIGKILL"),
    (libc::SIGUSR1, "SIGUSR1"), (libc::SIGSEGV, "SIGSEGV"), (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGPIPE, "SIGPIPE"), (libc::SIGALRM, "SIGALRM"), (libc::SIGTERM, "SIGTERM"),
    (libc::SIGXCPU, "SIGXCPU"), (libc::SIGXFSZ, "SIGXFSZ"), (libc::SIGSYS, "SIGSYS"),
];

/// A signal's name (`SIGKILL`), or its number.
fn signal_name(sig: i32) -> String {
    match SIGNALS.iter().find(|(n, _)| *n == sig) {
        Some((_, name)) => name.to_string(),
        None => format!("signal {sig}"),
    }
}

/// A line's place: whether it is the last of its siblings, and its parent line's place.
struct Level {
    depth: usize,
    last: bool,
    parent: Option<Rc<Level>>,
}

impl Drop for Level {
    /// Unlinks the ancestors one by one: a chain of 100,000 levels must not recurse.
    fn drop(&mut self) {
        let mut next = self.parent.take();
        while let Some(rc) = next {
            next = match Rc::try_unwrap(rc) {
                Ok(mut l) => l.parent.take(),
                Err(_) => None,
            };
        }
    }
}

/// What one line stands for.
enum Entry {
    /// One process, or siblings running the same executable (folded).
    Procs(Vec<usize>),
    /// Processes not drawn, with all their descendants: past the depth, or past
    /// [`MAX_SIBLING_LINES`].
    More(Vec<usize>),
}

enum Work {
    /// Processes whose parent line is `parent`, to be grouped into lines.
    Siblings {
        depth: usize,
        parent: Option<Rc<Level>>,
        procs: Vec<usize>,
    },
    Line(Rc<Level>, Entry),
}

/// One line before it is laid out.
struct Row {
    level: Rc<Level>,
    own: Agg,
    tree_cpu: u64,
    pid: Option<libc::pid_t>,
    /// The command (escaped), shortened in the middle to fit.
    text: String,
    /// How they ended (kept whole where it fits).
    ends: String,
    /// `text` is a list ("N more processes: ..."): shortened at its end.
    list: bool,
}

/// The tree's facts, computed once.
struct Forest<'a> {
    processes: &'a [ProcessUsage],
    children: Vec<Vec<usize>>,
    keys: Vec<String>,
    /// Each process with all its descendants.
    subtree: Vec<Agg>,
}

impl<'a> Forest<'a> {
    fn new(processes: &'a [ProcessUsage]) -> (Forest<'a>, Vec<usize>) {
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); processes.len()];
        let mut roots = Vec::new();
        for (i, p) in processes.iter().enumerate() {
            match p.parent_index.filter(|&j| j < i) {
                Some(j) => children[j].push(i),
                None => roots.push(i),
            }
        }
        let mut subtree: Vec<Agg> = processes.iter().map(Agg::of).collect();
        // A parent comes before its children: one pass from the end sums every subtree.
        for i in (0..processes.len()).rev() {
            if let Some(j) = processes[i].parent_index.filter(|&j| j < i) {
                let s = subtree[i];
                subtree[j].add(&s);
            }
        }
        let keys = processes.iter().map(executable).collect();
        (
            Forest {
                processes,
                children,
                keys,
                subtree,
            },
            roots,
        )
    }

    /// The command of one process: its argv, else `[comm]`.
    fn command(&self, i: usize) -> String {
        let p = &self.processes[i];
        match &p.argv {
            _ if p.withheld => format!("[{}] (withheld: other credentials)", p.comm),
            Some(argv) if !argv.is_empty() => {
                let mut s = argv.join(" ");
                if p.argv_truncated {
                    s.push_str(" …");
                }
                s
            }
            _ => format!("[{}]", p.comm),
        }
    }

    /// `procs` grouped by executable (in the order each first appears), or one each.
    fn group(&self, procs: Vec<usize>, fold: bool) -> Vec<Vec<usize>> {
        if !fold {
            return procs.into_iter().map(|i| vec![i]).collect();
        }
        let mut at: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for i in procs {
            let g = *at.entry(self.keys[i].as_str()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        groups
    }

    fn tree_cpu(&self, members: &[usize]) -> u64 {
        members
            .iter()
            .fold(0u64, |s, &i| s.saturating_add(self.subtree[i].cpu))
    }

    fn row(&self, level: Rc<Level>, entry: &Entry) -> Row {
        match entry {
            Entry::Procs(members) => {
                let mut own = Agg::default();
                let mut ends = Ends::default();
                for &i in members {
                    own.add(&Agg::of(&self.processes[i]));
                    ends.add(&self.processes[i]);
                }
                let single = members.len() == 1;
                let text = if single {
                    self.command(members[0])
                } else {
                    let first = self.command(members[0]);
                    let alike = members.iter().all(|&i| {
                        let p = &self.processes[i];
                        !p.withheld && !p.argv_truncated && p.argv.is_some()
                    }) && members.iter().all(|&i| self.command(i) == first);
                    let what = if alike {
                        first
                    } else {
                        self.keys[members[0]].clone()
                    };
                    format!("{} × {what}", members.len())
                };
                Row {
                    level,
                    own,
                    tree_cpu: self.tree_cpu(members),
                    pid: single.then(|| self.processes[members[0]].pid),
                    text: shown(&text),
                    ends: ends.text(single),
                    list: false,
                }
            }
            Entry::More(roots) => {
                let mut own = Agg::default();
                for &i in roots {
                    own.add(&self.subtree[i]);
                }
                // Every hidden process, by executable: how many, and their CPU.
                let mut by: HashMap<&str, (u64, u64)> = HashMap::new();
                let mut ends = Ends::default();
                let mut stack = roots.clone();
                while let Some(i) = stack.pop() {
                    let e = by.entry(self.keys[i].as_str()).or_default();
                    e.0 += 1;
                    e.1 = e.1.saturating_add(self.processes[i].cpu_time_ns);
                    ends.add(&self.processes[i]);
                    stack.extend_from_slice(&self.children[i]);
                }
                let mut by: Vec<(&str, (u64, u64))> = by.into_iter().collect();
                by.sort_by(|a, b| {
                    (b.1.1, b.1.0)
                        .cmp(&(a.1.1, a.1.0))
                        .then_with(|| a.0.cmp(b.0))
                });
                let mut names: Vec<String> = by
                    .iter()
                    .take(12)
                    .map(|(k, (n, _))| format!("{n} {}", basename(k)))
                    .collect();
                if by.len() > 12 {
                    names.push("…".to_string());
                }
                Row {
                    level,
                    tree_cpu: own.cpu,
                    pid: None,
                    text: shown(&format!(
                        "{} more process{}{}: {}",
                        own.count,
                        if own.count == 1 { "" } else { "es" },
                        ends.text(false),
                        names.join(", ")
                    )),
                    own,
                    ends: String::new(),
                    list: true,
                }
            }
        }
    }
}

/// The last part of an executable's path (`cc1` for `/usr/lib/gcc/x86_64-linux-gnu/12/cc1`).
fn basename(key: &str) -> &str {
    if key.starts_with('[') {
        return key;
    }
    key.rsplit('/').find(|s| !s.is_empty()).unwrap_or(key)
}

/// The tree glyphs before a line of `level`: `├─ ` or `└─ ` for itself, `│  ` or three
/// spaces for each ancestor below the root; past `cap` levels, the deepest `cap` only, the
/// first shown as `…  `.
fn prefix(level: &Level, cap: usize) -> String {
    if level.depth == 0 {
        return String::new();
    }
    let mut parts: Vec<&str> = vec![if level.last { "└─ " } else { "├─ " }];
    let mut cur = level.parent.as_deref();
    while let Some(l) = cur {
        if l.depth == 0 || parts.len() >= cap {
            break;
        }
        parts.push(if l.last { "   " } else { "│  " });
        cur = l.parent.as_deref();
    }
    if level.depth > parts.len()
        && let Some(outer) = parts.last_mut()
    {
        *outer = "…  ";
    }
    parts.reverse();
    parts.concat()
}

/// The per-process breakdown as a tree that summarises (see the module's documentation and
/// [`TreeView`]): a caption, a header, and one line per process or folded group, each line
/// starting with a tab, as the rest of the human report.
pub fn render(processes: &[ProcessUsage], view: &TreeView) -> String {
    let (forest, roots) = Forest::new(processes);
    let fold = !view.full;
    let mut rows: Vec<Row> = Vec::new();
    // Depth first with an explicit stack: deep chains must not overflow the call stack.
    let mut stack = vec![Work::Siblings {
        depth: 0,
        parent: None,
        procs: roots,
    }];
    while let Some(work) = stack.pop() {
        match work {
            Work::Siblings {
                depth,
                parent,
                procs,
            } => {
                let mut entries: Vec<Entry> = Vec::new();
                if fold && depth > view.max_depth {
                    entries.push(Entry::More(procs));
                } else {
                    let mut groups = forest.group(procs, fold);
                    if fold && groups.len() > MAX_SIBLING_LINES {
                        // The groups with the most CPU keep their lines, in their order.
                        let mut by_cpu: Vec<usize> = (0..groups.len()).collect();
                        by_cpu.sort_by_key(|&g| std::cmp::Reverse(forest.tree_cpu(&groups[g])));
                        let mut keep = vec![false; groups.len()];
                        for &g in &by_cpu[..MAX_SIBLING_LINES - 1] {
                            keep[g] = true;
                        }
                        let mut rest: Vec<usize> = Vec::new();
                        let mut kept = Vec::new();
                        for (g, members) in groups.drain(..).enumerate() {
                            if keep[g] {
                                kept.push(members);
                            } else {
                                rest.extend(members);
                            }
                        }
                        rest.sort_unstable();
                        groups = kept;
                        entries.extend(groups.into_iter().map(Entry::Procs));
                        entries.push(Entry::More(rest));
                    } else {
                        entries.extend(groups.into_iter().map(Entry::Procs));
                    }
                }
                let n = entries.len();
                for (k, entry) in entries.into_iter().enumerate().rev() {
                    let level = Rc::new(Level {
                        depth,
                        last: k + 1 == n,
                        parent: parent.clone(),
                    });
                    stack.push(Work::Line(level, entry));
                }
            }
            Work::Line(level, entry) => {
                if let Entry::Procs(members) = &entry {
                    let mut kids: Vec<usize> = members
                        .iter()
                        .flat_map(|&i| forest.children[i].iter().copied())
                        .collect();
                    if !kids.is_empty() {
                        kids.sort_unstable();
                        stack.push(Work::Siblings {
                            depth: level.depth + 1,
                            parent: Some(level.clone()),
                            procs: kids,
                        });
                    }
                }
                rows.push(forest.row(level, &entry));
            }
        }
    }
    layout(processes.len(), rows, view)
}

/// The rows as text: figures right-aligned in columns, then the glyphs and the command.
fn layout(processes: usize, rows: Vec<Row>, view: &TreeView) -> String {
    let column = |header, hideable, cell: &dyn Fn(&Row) -> String| Column {
        header,
        hideable,
        cells: rows.iter().map(cell).collect(),
    };
    let last = if view.full {
        column("pid", false, &|r| {
            r.pid.map_or(String::new(), |p| p.to_string())
        })
    } else {
        column("count", false, &|r| r.own.count.to_string())
    };
    let (header, figures, left_out) = figure_block(vec![
        column("CPU s", false, &|r| secs(r.own.cpu)),
        column("tree s", false, &|r| secs(r.tree_cpu)),
        column("max RSS", true, &|r| size(r.own.rss)),
        column("read", true, &|r| size(r.own.read)),
        column("write", true, &|r| size(r.own.written)),
        column("sent", true, &|r| size(r.own.sent)),
        column("recv", true, &|r| size(r.own.received)),
        last,
    ]);
    let room = view.width.saturating_sub(TAB + columns(&header));
    let cap = (room.saturating_sub(MIN_TEXT) / 3).max(1);
    let mut out = String::new();
    let what = if view.full {
        format!("{processes} processes, one line each")
    } else {
        format!(
            "{processes} processes in {} lines: siblings running the same executable folded \
             into one, levels past {} into \"more\" lines",
            rows.len(),
            view.max_depth
        )
    };
    let _ = writeln!(out, "\tProcess tree: {what}");
    let mut legend = String::from(
        "CPU s: the line's own, tree s: with all descendants; max RSS: the largest; \
         read/write: disk, sent/recv: network",
    );
    if !left_out.is_empty() {
        let _ = write!(legend, "; 0 everywhere: {}", left_out.join(", "));
    }
    let _ = writeln!(
        out,
        "\t{}",
        shorten_end(&legend, view.width - TAB.min(view.width))
    );
    let _ = writeln!(out, "\t{header}command");
    for (row, figures) in rows.iter().zip(figures) {
        let glyphs = prefix(&row.level, cap);
        let text = if view.full {
            format!("{}{}", row.text, row.ends)
        } else {
            let space = room.saturating_sub(columns(&glyphs)).max(MIN_TEXT / 2);
            fit_text(&row.text, &row.ends, row.list, space)
        };
        let _ = writeln!(out, "\t{figures}{glyphs}{text}");
    }
    out
}

/// `text` then `ends` in `space` columns: `ends` whole while the text keeps a fair part.
fn fit_text(text: &str, ends: &str, list: bool, space: usize) -> String {
    let shorten = |s: &str, max| {
        if list {
            shorten_end(s, max)
        } else {
            shorten_middle(s, max)
        }
    };
    let ends_cols = columns(ends);
    if columns(text) + ends_cols <= space {
        return format!("{text}{ends}");
    }
    if ends_cols + MIN_TEXT / 2 <= space {
        return format!("{}{ends}", shorten(text, space - ends_cols));
    }
    shorten_end(&format!("{}{ends}", shorten(text, space / 2)), space)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::breakdown::split_argv;

    const FULL: TreeView = TreeView {
        max_depth: DEFAULT_DEPTH,
        full: true,
        width: DEFAULT_WIDTH,
    };

    /// A process that exec'd `argv` (its file: argv[0]).
    fn proc(pid: i32, parent: Option<usize>, argv: &[&str], cpu_ms: u64) -> ProcessUsage {
        ProcessUsage {
            pid,
            ppid: 1,
            parent_index: parent,
            comm: argv[0].rsplit('/').next().unwrap().to_string(),
            argv: Some(argv.iter().map(|a| a.to_string()).collect()),
            filename: Some(argv[0].to_string()),
            end_ns: Some(5),
            exit_code: Some(0),
            thread_count: 1,
            cpu_time_ns: cpu_ms * 1_000_000,
            cpu_user_ns: cpu_ms * 1_000_000,
            disk_bytes_read: Some(0),
            disk_bytes_written: Some(4096),
            disk_cancelled_write_bytes: Some(0),
            io_read_chars: Some(0),
            io_write_chars: Some(0),
            peak_memory_bytes: Some(3 << 20),
            network_bytes_sent: Some(0),
            network_bytes_received: Some(0),
            ..ProcessUsage::default()
        }
    }

    /// A fork that never exec'd: comm only.
    fn fork(pid: i32, parent: usize, comm: &str, cpu_ms: u64) -> ProcessUsage {
        ProcessUsage {
            argv: None,
            filename: None,
            comm: comm.to_string(),
            ..proc(pid, Some(parent), &[comm], cpu_ms)
        }
    }

    /// The lines after the caption, the legend and the header.
    fn body(text: &str) -> Vec<&str> {
        text.lines().skip(3).collect()
    }

    /// The command part of a line (after the figures and the glyphs).
    fn command(line: &str) -> &str {
        let s = line.trim_start_matches('\t');
        let mut rest = s.trim_start();
        // Past the figure columns: runs of non-spaces separated by spaces, then two spaces.
        while let Some((cell, after)) = rest.split_once("  ") {
            if cell.contains(' ')
                || cell.is_empty()
                || !cell.chars().next().unwrap().is_ascii_digit() && cell != "-"
            {
                break;
            }
            rest = after.trim_start();
        }
        rest.trim_start_matches(['├', '└', '│', '─', ' ', '…'])
    }

    #[test]
    fn siblings_of_one_executable_fold_with_their_children() {
        let mut ps = vec![proc(10, None, &["/bin/sh", "-c", "x"], 100)];
        for k in 0..3 {
            let cc = ps.len();
            ps.push(proc(
                11 + 3 * k,
                Some(0),
                &["/usr/bin/cc", "-c", &format!("f{k}.c")],
                10,
            ));
            ps.push(proc(12 + 3 * k, Some(cc), &["/usr/lib/cc1", "f.c"], 200));
            ps.push(proc(13 + 3 * k, Some(cc), &["/usr/bin/as"], 20));
        }
        ps.push(proc(50, Some(0), &["/bin/true"], 1));
        let text = render(&ps, &TreeView::default());
        let lines = body(&text);
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(command(lines[0]), "/bin/sh -c x", "{text}");
        assert!(lines[1].contains("├─ 3 × /usr/bin/cc"), "{text}");
        assert!(lines[2].contains("│  ├─ 3 × /usr/lib/cc1"), "{text}");
        assert!(lines[3].contains("│  └─ 3 × /usr/bin/as"), "{text}");
        assert!(lines[4].contains("└─ /bin/true"), "{text}");
        // Figures first: own CPU, with descendants, RSS, disk written, count.
        let cc: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(&cc[..5], ["0.030", "0.690", "3.0M", "12K", "3"], "{text}");
        let root: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(&root[..2], ["0.100", "0.791"], "{text}");
        // Read and network are 0 everywhere: left out, and said so.
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .contains("0 everywhere: read, sent, recv")
        );
        assert!(
            text.contains("\tCPU s  tree s  max RSS  write  count  command\n"),
            "{text}"
        );
    }

    #[test]
    fn alike_argv_is_shown_whole_and_status_is_marked() {
        let mut ps = vec![proc(1, None, &["/bin/sh"], 1)];
        for i in 0..50 {
            ps.push(proc(2 + i, Some(0), &["/bin/true"], 1));
        }
        ps[3].signal = Some(libc::SIGKILL);
        ps[3].exit_code = None;
        ps[4].exit_code = Some(2);
        ps[5].refused = true;
        let mut lone = proc(99, Some(0), &["/bin/false"], 1);
        lone.exit_code = Some(1);
        ps.push(lone);
        let mut running = proc(100, Some(0), &["/bin/sleep", "9"], 1);
        (running.exit_code, running.end_ns) = (None, None);
        ps.push(running);
        let text = render(&ps, &TreeView::default());
        let lines = body(&text);
        assert_eq!(
            command(lines[1]),
            "50 × /bin/true (1 refused, 1 killed by SIGKILL, 1 exit 2)",
            "{text}"
        );
        assert_eq!(command(lines[2]), "/bin/false (exit 1)", "{text}");
        assert_eq!(command(lines[3]), "/bin/sleep 9 (running)", "{text}");
        // Forks that never exec'd fold by comm; differing argv shows the executable.
        let mut ps = vec![proc(1, None, &["/bin/sh"], 1)];
        ps.push(fork(2, 0, "sh", 1));
        ps.push(fork(3, 0, "sh", 1));
        ps.push(proc(4, Some(0), &["/bin/sed", "s/a/b/"], 1));
        ps.push(proc(5, Some(0), &["/bin/sed", "s/c/d/"], 1));
        let text = render(&ps, &TreeView::default());
        let lines = body(&text);
        assert_eq!(command(lines[1]), "2 × [sh]", "{text}");
        assert_eq!(command(lines[2]), "2 × /bin/sed", "{text}");
    }

    #[test]
    fn levels_past_the_depth_are_summed_in_one_line() {
        let ps: Vec<ProcessUsage> = (0..40usize)
            .map(|i| {
                let name = format!("/bin/p{}", i % 3);
                proc(i as i32 + 1, i.checked_sub(1), &[name.as_str()], 10)
            })
            .collect();
        let view = TreeView {
            max_depth: 3,
            ..TreeView::default()
        };
        let text = render(&ps, &view);
        let lines = body(&text);
        assert_eq!(lines.len(), 5, "{text}");
        let more = lines[4];
        assert_eq!(
            command(more),
            "36 more processes: 12 p0, 12 p1, 12 p2",
            "{text}"
        );
        let figures: Vec<&str> = more.split_whitespace().collect();
        // Own and tree CPU alike: 36 × 10 ms; the count.
        assert_eq!(
            (figures[0], figures[1], figures[4]),
            ("0.360", "0.360", "36")
        );
        assert!(more.contains("  36           └─ 36 more"), "{text}");
        let top: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(top[1], "0.400", "the root's tree holds everything");
        // Depth 0: the root and one line for the rest.
        let text = render(
            &ps,
            &TreeView {
                max_depth: 0,
                ..view
            },
        );
        assert_eq!(body(&text).len(), 2, "{text}");
    }

    #[test]
    fn many_distinct_siblings_keep_the_costliest() {
        let mut ps = vec![proc(1, None, &["/usr/bin/make"], 1)];
        for i in 0..100 {
            let name = format!("./test-{i:03}");
            ps.push(proc(
                2 + i,
                Some(0),
                &[name.as_str()],
                if i == 77 { 500 } else { 1 },
            ));
        }
        let text = render(&ps, &TreeView::default());
        let lines = body(&text);
        assert_eq!(lines.len(), 1 + MAX_SIBLING_LINES, "{text}");
        assert!(text.contains("./test-077"), "{text}");
        let last = lines.last().unwrap();
        assert!(
            command(last).starts_with("81 more processes: 1 test-"),
            "{text}"
        );
        assert!(last.contains("└─ "));
        // Everything with full.
        let full = render(&ps, &FULL);
        assert_eq!(body(&full).len(), 101);
    }

    #[test]
    fn backslashes_and_control_bytes_read_unambiguously() {
        let shown_argv = |bytes: &[u8]| {
            let mut p = proc(1, None, &["x"], 1);
            p.argv = Some(split_argv(bytes));
            let text = render(&[p], &TreeView::default());
            command(body(&text)[0]).to_string()
        };
        // `;\` then a newline, against a backslash, a backslash and `n`.
        assert_eq!(shown_argv(b"sh\0-c\0;\\\n"), r"sh -c ;\\\x0a");
        assert_eq!(shown_argv(b"sh\0-c\0;\\\\n"), r"sh -c ;\\\\n");
        // The text `\xff` against the byte 0xff; a terminal escape; a tab; DEL.
        assert_eq!(shown_argv(b"\\xff\0\xff"), r"\\xff \xff");
        assert_eq!(shown_argv(b"a\x1b[2J\tb\x7f"), r"a\x1b[2J\x09b\x7f");
        // The text `\x1b` against the byte; C1 controls and a bidirectional override by
        // their UTF-8 bytes (never produced by escape_bytes: valid UTF-8).
        assert_eq!(shown_argv(b"\\x1b\0\x1b"), r"\\x1b \x1b");
        assert_eq!(
            shown_argv("a\u{85}b\u{202e}c".as_bytes()),
            r"a\xc2\x85b\xe2\x80\xaec"
        );
        let all = [
            shown_argv(b";\\\n"),
            shown_argv(b";\\\\n"),
            shown_argv(b";\\n"),
            shown_argv(b";\n"),
            shown_argv(b";\\x0a"),
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(!a.chars().any(char::is_control), "{a:?}");
            for b in &all[i + 1..] {
                assert_ne!(a, b, "two argvs read alike");
            }
        }
        // A hostile comm and file name, folded: escaped too.
        let mut ps = vec![proc(1, None, &["/bin/sh"], 1)];
        for pid in [2, 3] {
            let mut p = fork(pid, 0, "\x1b]0;x\x07", 1);
            p.filename = Some("/tmp/a\nb".to_string());
            ps.push(p);
        }
        let text = render(&ps, &TreeView::default());
        assert!(text.contains(r"2 × /tmp/a\x0ab"), "{text}");
        let text = render(&ps, &FULL);
        assert!(text.contains(r"[\x1b]0;x\x07]"), "{text}");
        assert!(
            !text
                .chars()
                .any(|c| c.is_control() && c != '\t' && c != '\n')
        );
    }

    /// A configure-like tree of about `n` processes: a shell script that forks subshells
    /// (some running sed or grep through nested ones), runs compiler checks (gcc, cc1, as,
    /// collect2, ld) and its tests, then a recursive make compiling files.
    fn configure(n: usize) -> Vec<ProcessUsage> {
        let mut ps = vec![proc(1, None, &["/bin/sh", "-c", "./configure && make"], 5)];
        let add = |ps: &mut Vec<ProcessUsage>, parent: usize, argv: &[&str], cpu: u64| {
            let pid = ps.len() as i32 + 1;
            ps.push(proc(pid, Some(parent), argv, cpu));
            ps.len() - 1
        };
        let conf = add(&mut ps, 0, &["./configure"], 900);
        let tools: Vec<String> = "sed grep rm cat expr mv tr mkdir uname ln sort chmod basename"
            .split(' ')
            .map(|t| format!("/usr/bin/{t}"))
            .collect();
        let mut i = 0;
        let compile = |ps: &mut Vec<ProcessUsage>, parent: usize, src: &str, link: bool| {
            let pid = ps.len() as i32 + 1;
            ps.push(proc(
                pid,
                Some(parent),
                &["/usr/bin/gcc", "-O2", "-c", src],
                3,
            ));
            let gcc = ps.len() - 1;
            for argv in [
                &["/usr/lib/gcc/x86_64-linux-gnu/12/cc1", src][..],
                &["/usr/bin/as"],
            ] {
                let pid = ps.len() as i32 + 1;
                ps.push(proc(pid, Some(gcc), argv, 20));
            }
            if link {
                let pid = ps.len() as i32 + 1;
                ps.push(proc(
                    pid,
                    Some(gcc),
                    &["/usr/lib/gcc/x86_64-linux-gnu/12/collect2"],
                    2,
                ));
                let c2 = ps.len() - 1;
                let pid = ps.len() as i32 + 1;
                ps.push(proc(pid, Some(c2), &["/usr/bin/ld"], 15));
            }
        };
        while ps.len() < n * 3 / 4 {
            i += 1;
            match i % 6 {
                0 => {
                    compile(&mut ps, conf, "conftest.c", i % 12 == 0);
                    add(&mut ps, conf, &["./conftest"], 1);
                }
                1 | 2 => {
                    // $(echo x | sed ...) in a subshell.
                    let pid = ps.len() as i32 + 1;
                    ps.push(fork(pid, conf, "configure", 1));
                    let sub = ps.len() - 1;
                    let pid = ps.len() as i32 + 1;
                    ps.push(fork(pid, sub, "configure", 1));
                    add(&mut ps, sub, &[&tools[i % tools.len()], "-e", "s/x/y/"], 1);
                }
                _ => {
                    add(&mut ps, conf, &[&tools[i % tools.len()], "conftest.err"], 1);
                }
            }
        }
        let make = add(&mut ps, 0, &["/usr/bin/make"], 50);
        let mut dir = 0;
        while ps.len() < n {
            dir += 1;
            let sub = add(
                &mut ps,
                make,
                &["/usr/bin/make", "-C", &format!("dir{}", dir % 4)],
                30,
            );
            for f in 0..10 {
                let pid = ps.len() as i32 + 1;
                ps.push(proc(pid, Some(sub), &["/bin/sh", "-c", "gcc ..."], 1));
                let sh = ps.len() - 1;
                compile(&mut ps, sh, &format!("src/file{f}.c"), f == 9);
            }
        }
        ps
    }

    #[test]
    fn a_generated_build_fits_a_terminal_and_full_shows_every_process() {
        for n in [2_000, 4_000] {
            let ps = configure(n);
            let text = render(&ps, &TreeView::default());
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines {
                assert!(columns(l) <= DEFAULT_WIDTH, "{} columns: {l}", columns(l));
            }
            assert!(
                (20..=160).contains(&lines.len()),
                "{} lines:\n{text}",
                lines.len()
            );
            // Every process is counted once: the counts of the lines whose processes are
            // drawn add up.
            let counted: u64 = body(&text)
                .iter()
                .map(|l| l.split_whitespace().nth(4).unwrap().parse::<u64>().unwrap())
                .sum();
            assert_eq!(counted, ps.len() as u64, "{text}");
            let full = render(&ps, &FULL);
            assert_eq!(body(&full).len(), ps.len());
            for (l, p) in body(&full).iter().zip(&ps) {
                assert!(l.contains(&format!("  {}  ", p.pid)), "{l}");
            }
        }
    }

    #[test]
    fn a_deep_chain_does_not_overflow_nor_widen() {
        let ps: Vec<ProcessUsage> = (0..100_000usize)
            .map(|i| proc(i as i32 + 1, i.checked_sub(1), &["/bin/sh", "-c", "x"], 1))
            .collect();
        let text = render(&ps, &TreeView::default());
        assert_eq!(body(&text).len(), DEFAULT_DEPTH + 2, "{text}");
        assert!(text.contains("99993 more processes: 99993 sh"), "{text}");
        let full = render(&ps, &FULL);
        assert_eq!(full.lines().count(), 100_003);
        assert!(full.lines().all(|l| columns(l) <= DEFAULT_WIDTH));
        assert!(full.lines().last().unwrap().contains("…  "));
    }
}
