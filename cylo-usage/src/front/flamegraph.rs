//! The flame graph of a run's process tree (`run --tree --flamegraph FILE.svg`): each process
//! of the breakdown ([`ResourceUsage::processes`]) a frame stacked on its ancestors, root at
//! the bottom, as wide as its own figure (CPU time, disk, peak RSS or network) plus its
//! descendants'. Processes that ran the same command under the same ancestors merge into one
//! frame, as a flame graph merges identical stacks. Drawn by inferno (the renderer of
//! cargo-flamegraph): an interactive SVG (click to zoom, Ctrl-F to search) whose tooltips show
//! each frame's figure and share.
//!
//! [`folded_stacks`] gives the folded lines (`root;child;grandchild weight`) for another
//! renderer; [`flamegraph_svg`] draws them.
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use inferno::flamegraph::{self as inferno_fg, color::BasicPalette, color::Palette};

use crate::usage::{ProcessUsage, ResourceUsage};

/// What a flame graph's widths measure: each process's own figure of one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FlameWeight {
    /// CPU time (user and system), in ns: [`ProcessUsage::cpu_time_ns`].
    #[default]
    Cpu,
    /// Bytes the process made the storage layer read and write:
    /// [`ProcessUsage::disk_bytes_read`] + [`ProcessUsage::disk_bytes_written`].
    Disk,
    /// The peak RSS of the process: [`ProcessUsage::peak_memory_bytes`]. A frame's width is a
    /// sum of peaks (itself and its descendants), not the peak of the tree at one moment.
    Memory,
    /// Payload bytes the process sent and received through TCP and UDP sockets:
    /// [`ProcessUsage::network_bytes_sent`] + [`ProcessUsage::network_bytes_received`].
    Network,
}

impl FlameWeight {
    /// Every weight, in the order of the command line's list.
    pub const ALL: [FlameWeight; 4] = [
        FlameWeight::Cpu,
        FlameWeight::Disk,
        FlameWeight::Memory,
        FlameWeight::Network,
    ];

    /// Its name on the command line: `cpu`, `disk`, `memory` or `network`.
    pub fn name(self) -> &'static str {
        match self {
            FlameWeight::Cpu => "cpu",
            FlameWeight::Disk => "disk",
            FlameWeight::Memory => "memory",
            FlameWeight::Network => "network",
        }
    }

    /// The unit of its figures, as the tooltips show it after the figure.
    pub fn unit(self) -> &'static str {
        match self {
            FlameWeight::Cpu => "ns of CPU",
            FlameWeight::Disk => "bytes of disk I/O",
            FlameWeight::Memory => "bytes of peak RSS",
            FlameWeight::Network => "bytes of network I/O",
        }
    }

    /// The process's own figure of this resource; `None` where it was not measured, or
    /// withheld from this client.
    pub fn of(self, p: &ProcessUsage) -> Option<u64> {
        let sum = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
        };
        match self {
            FlameWeight::Cpu => Some(p.cpu_time_ns),
            FlameWeight::Disk => sum(p.disk_bytes_read, p.disk_bytes_written),
            FlameWeight::Memory => p.peak_memory_bytes,
            FlameWeight::Network => sum(p.network_bytes_sent, p.network_bytes_received),
        }
    }
}

impl fmt::Display for FlameWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FlameWeight {
    type Err = FlamegraphError;

    /// `cpu`, `disk`, `memory` or `network` (any case).
    fn from_str(s: &str) -> Result<FlameWeight, FlamegraphError> {
        FlameWeight::ALL
            .into_iter()
            .find(|w| w.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| FlamegraphError::UnknownWeight {
                given: s.to_string(),
            })
    }
}

/// Why a flame graph could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum FlamegraphError {
    /// The report has no per-process breakdown: the run was made without `--tree`
    /// ([`crate::RunOptions::tree`]).
    #[error(
        "no per-process breakdown to draw: the report was made without one (`--tree`, \
         `RunOptions::tree`)"
    )]
    NoBreakdown,
    /// No process of the breakdown has a figure of `weight` (the resource was not measured,
    /// or was withheld from this client), or the breakdown is empty.
    #[error(
        "no {weight} figure to draw: none of the breakdown's {processes} processes has one \
         (not measured, or withheld from this client)"
    )]
    Unmeasured {
        /// The weight asked for.
        weight: FlameWeight,
        /// Processes in the breakdown.
        processes: usize,
    },
    /// Every process's figure of `weight` is 0: the graph would have no width.
    #[error("no {weight} to draw: each of the breakdown's {processes} processes used 0")]
    Nothing {
        /// The weight asked for.
        weight: FlameWeight,
        /// Processes in the breakdown.
        processes: usize,
    },
    /// A weight name that is not `cpu`, `disk`, `memory` or `network`.
    #[error("unknown flame graph weight {given:?}: expected cpu, disk, memory or network")]
    UnknownWeight {
        /// The name given.
        given: String,
    },
    /// inferno failed to draw the folded stacks.
    #[error("inferno could not draw the flame graph of {stacks} stacks")]
    Render {
        /// Folded stacks given to it.
        stacks: usize,
        /// Its error.
        #[source]
        source: std::io::Error,
    },
}

/// The folded stacks of the breakdown for `weight`: one line per distinct stack of frame
/// names (root first, `;` between them) with the sum of the own figures of the processes
/// whose stack it is. Processes whose figure is 0 or unknown have no line of their own (their
/// frames still hold their descendants). The lines are in depth-first order, siblings by name:
/// the lines of a stack's descendants follow it, as a flame graph lays them out.
///
/// The sum of the weights is the sum of the processes' own figures; a frame's width in the
/// flame graph is the sum of the lines it prefixes. Empty without a breakdown.
pub fn folded_stacks(usage: &ResourceUsage, weight: FlameWeight) -> Vec<(String, u64)> {
    let processes = usage.processes.as_deref().unwrap_or_default();
    let names: Vec<String> = processes.iter().map(frame_name).collect();
    // The stacks as lists of names: a map ordered by list (name by name) keeps the stacks
    // that share a prefix together, and merges identical ones.
    let mut stacks: BTreeMap<Vec<&str>, u64> = BTreeMap::new();
    for (i, p) in processes.iter().enumerate() {
        let Some(w) = weight.of(p).filter(|&w| w > 0) else {
            continue;
        };
        let mut path = vec![names[i].as_str()];
        let mut at = i;
        // A parent comes before its children (start order): any other index is not one, and
        // this walk ends.
        while let Some(parent) = processes[at].parent_index.filter(|&j| j < at) {
            path.push(&names[parent]);
            at = parent;
        }
        path.reverse();
        let sum = stacks.entry(path).or_default();
        *sum = sum.saturating_add(w);
    }
    stacks
        .into_iter()
        .map(|(path, w)| (path.join(";"), w))
        .collect()
}

/// The flame graph of the breakdown for `weight`, as an SVG document (UTF-8) under `title`:
/// each distinct stack of commands one frame, as wide as its processes' own figures plus
/// their descendants'. Its subtitle says what the width is and the total; each frame's
/// tooltip, its command, figure and share of the total.
///
/// Errors: [`FlamegraphError::NoBreakdown`] for a report without one,
/// [`FlamegraphError::Unmeasured`] where no process has a figure of `weight` (an empty
/// breakdown included), [`FlamegraphError::Nothing`] where every figure is 0.
pub fn flamegraph_svg(
    usage: &ResourceUsage,
    weight: FlameWeight,
    title: &str,
) -> Result<Vec<u8>, FlamegraphError> {
    let processes = usage
        .processes
        .as_deref()
        .ok_or(FlamegraphError::NoBreakdown)?;
    let unknown = processes.iter().filter(|p| weight.of(p).is_none()).count();
    if unknown == processes.len() {
        return Err(FlamegraphError::Unmeasured {
            weight,
            processes: processes.len(),
        });
    }
    let stacks = folded_stacks(usage, weight);
    if stacks.is_empty() {
        return Err(FlamegraphError::Nothing {
            weight,
            processes: processes.len(),
        });
    }
    let total = stacks
        .iter()
        .fold(0u64, |sum, (_, w)| sum.saturating_add(*w));

    let mut opt = inferno_fg::Options::default();
    opt.title = xml_text(title);
    opt.subtitle = Some(xml_text(&subtitle(usage, weight, total, unknown)));
    opt.count_name = weight.unit().to_string();
    opt.name_type = "Process:".to_string();
    opt.colors = Palette::Basic(match weight {
        FlameWeight::Cpu => BasicPalette::Hot,
        FlameWeight::Disk => BasicPalette::Io,
        FlameWeight::Memory => BasicPalette::Mem,
        FlameWeight::Network => BasicPalette::Aqua,
    });
    // Colours by name (the same command, the same colour), the same from run to run.
    opt.hash = true;
    opt.deterministic = true;
    // Every frame drawn, however thin: a search (Ctrl-F) then counts every process.
    opt.min_width = 0.0;
    // inferno sorts the lines as plain strings, where a sibling whose name extends another's
    // with a character below `;` (`gcc-12` beside `gcc`) would sort between that name's own
    // line and its children's, splitting its frame in two. The lines are in order already,
    // name by name (`folded_stacks`): as a flame chart, inferno takes them as they come (last
    // line first: it reverses them) and draws the same picture, one frame per distinct stack.
    opt.flame_chart = true;

    let lines: Vec<String> = stacks
        .iter()
        .rev()
        .map(|(stack, w)| format!("{stack} {w}"))
        .collect();
    let mut svg = Vec::new();
    inferno_fg::from_lines(&mut opt, lines.iter().map(String::as_str), &mut svg).map_err(
        |source| FlamegraphError::Render {
            stacks: lines.len(),
            source,
        },
    )?;
    Ok(svg)
}

/// The subtitle: what the width is, the total, and what the breakdown lacks.
fn subtitle(usage: &ResourceUsage, weight: FlameWeight, total: u64, unknown: usize) -> String {
    let processes = usage.processes.as_deref().map_or(0, <[_]>::len);
    let (what, total) = match weight {
        FlameWeight::Cpu => ("CPU time (user + system)", seconds(total)),
        FlameWeight::Disk => ("disk bytes read + written", bytes(total)),
        FlameWeight::Memory => ("peak RSS (a sum of peaks)", bytes(total)),
        FlameWeight::Network => ("network bytes sent + received", bytes(total)),
    };
    let mut s = format!(
        "Width: {what}, a process's own plus its descendants'. Total {total} in {processes} \
         processes"
    );
    if unknown > 0 {
        s.push_str(&format!(", {unknown} unmeasured or withheld"));
    }
    if let Some(dropped) = usage.processes_dropped.filter(|&n| n > 0) {
        s.push_str(&format!(", {dropped} not kept (the breakdown's limit)"));
    }
    s
}

fn seconds(ns: u64) -> String {
    format!("{:.3} s", ns as f64 / 1e9)
}

fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} bytes");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The most characters of arguments a frame name keeps.
const ARGS_MAX: usize = 48;

/// A process's frame: the basename of the file it exec'd and its first arguments
/// (`cc -c foo.c`), else its comm in brackets (`[bash]`: it never exec'd while followed, or
/// the rest is withheld), made safe for the folded format and for XML ([`frame_text`]).
pub(crate) fn frame_name(p: &ProcessUsage) -> String {
    let argv = p.argv.as_deref().unwrap_or_default();
    let program = [p.filename.as_deref(), argv.first().map(String::as_str)]
        .into_iter()
        .flatten()
        .map(|f| f.rsplit('/').next().unwrap_or(f))
        .find(|f| !f.trim().is_empty());
    let Some(program) = program else {
        return frame_text(&format!("[{}]", p.comm));
    };
    let mut name = program.to_string();
    let args = argv.get(1..).unwrap_or_default().join(" ");
    if !args.is_empty() {
        name.push(' ');
        name.extend(args.chars().take(ARGS_MAX));
    }
    if args.chars().count() > ARGS_MAX || p.argv_truncated {
        name.push('…');
    }
    frame_text(&name)
}

/// `raw` as one frame of a folded stack: no `;` (the separator), no control character (a
/// newline would end the line; XML forbids most of them), whitespace runs as one space, no
/// leading `#` (a comment line to inferno), no trailing `_[k]`-like annotation (inferno would
/// cut it), no number as its last word (a count to inferno: a zero-width space follows it).
/// What is replaced is escaped as Rust writes it (`\u{3b}`, `\n`): the text comes escaped
/// already (its backslashes doubled, bytes that are not UTF-8 as `\xNN`), so it stays
/// unambiguous.
pub(crate) fn frame_text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            ';' => out.push_str("\\u{3b}"),
            '#' if out.is_empty() => out.push_str("\\u{23}"),
            c if c.is_control() => out.extend(c.escape_default()),
            '\u{fffe}' | '\u{ffff}' => out.extend(c.escape_unicode()),
            c if c.is_whitespace() => {
                if !out.is_empty() && !out.ends_with(' ') {
                    out.push(' ');
                }
            }
            c => out.push(c),
        }
    }
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    // inferno hides a `_[k]`, `_[w]`, `_[i]` or `_[j]` suffix (perf's annotations).
    let b = out.as_bytes();
    if b.len() >= 4 && b.ends_with(b"]") && &b[b.len() - 4..b.len() - 2] == b"_[" {
        let at = out.len() - 4;
        out.replace_range(at..at + 1, "\\u{5f}");
    }
    // A last word that is a number (`sleep 1`, `make -j 4`) would be read as a count
    // (inferno's differential column) where the frame ends a line: a zero-width space after
    // it keeps it a name, unseen, and found by a search for the name.
    let last_word = out.rsplit_once(' ').map_or("", |(_, w)| w);
    if last_word.starts_with(|c: char| c.is_ascii_digit())
        && last_word.chars().all(|c| c.is_ascii_digit() || c == '.')
    {
        out.push('\u{200b}');
    }
    if out.is_empty() {
        out.push_str("[?]");
    }
    out
}

/// `raw` without the characters XML cannot hold (escaped as Rust writes them): for the title
/// and subtitle, which inferno escapes as XML.
fn xml_text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            c if c.is_control() => out.extend(c.escape_default()),
            '\u{fffe}' | '\u{ffff}' => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::TrackerKind;
    use std::collections::BTreeSet;

    /// A process as the JSON report has it, with what is not given unmeasured.
    fn process(parent: Option<usize>, comm: &str) -> ProcessUsage {
        let mut p: ProcessUsage = serde_json::from_value(serde_json::json!({
            "pid": 1, "ppid": 0, "comm": comm, "argv_truncated": false, "start_ns": 0,
            "attached": false, "thread_count": 1, "cpu_time_ns": 0, "cpu_user_ns": 0,
            "cpu_system_ns": 0,
        }))
        .expect("a process from the report's required fields");
        p.parent_index = parent;
        p
    }

    fn exec(mut p: ProcessUsage, filename: &str, argv: &[&str]) -> ProcessUsage {
        p.filename = Some(filename.to_string());
        p.argv = Some(argv.iter().map(|a| a.to_string()).collect());
        p
    }

    /// A process that exec'd `/usr/bin/{argv[0]}`.
    fn run(parent: Option<usize>, argv: &[&str]) -> ProcessUsage {
        exec(
            process(parent, argv[0]),
            &format!("/usr/bin/{}", argv[0]),
            argv,
        )
    }

    fn usage_of(processes: Vec<ProcessUsage>) -> ResourceUsage {
        let mut u = ResourceUsage::unmeasured(TrackerKind::InProcess);
        u.processes = Some(processes);
        u
    }

    /// A build-like tree of 2,000 processes: recursive makes, recipes' shells, compilers (`cc`
    /// beside `cc-12 -c a.c`: a name that another extends with a character below `;`) and
    /// forks that never exec'd, the same commands under makes at several depths; some figures
    /// 0 or unknown.
    fn build_tree() -> Vec<ProcessUsage> {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as usize
        };
        let mut ps = vec![run(None, &["make", "-j4"])];
        let add = |ps: &mut Vec<ProcessUsage>, parent: usize, command: Option<&[&str]>| {
            let p = match command {
                Some(argv) => run(Some(parent), argv),
                None => process(Some(parent), "sh"),
            };
            ps.push(p);
            ps.len() - 1
        };
        // (index, depth of make) of each make.
        let mut makes = vec![(0, 0)];
        while ps.len() < 2000 {
            let r = next();
            let (make, level) = makes[r % makes.len()];
            match (r >> 8) % 5 {
                0 if level < 7 => {
                    // `make -j 4` ends with a number: a count to inferno, were it not kept a name.
                    let argv: &[&str] = match (r >> 16) % 3 {
                        0 => &["make", "-C", "sub"],
                        1 => &["make", "-j", "4"],
                        _ => &["make"],
                    };
                    makes.push((add(&mut ps, make, Some(argv)), level + 1));
                }
                1 => {
                    let sh = add(&mut ps, make, Some(&["sh", "-c", "cc -c a.c"]));
                    let cc = add(&mut ps, sh, Some(&["cc", "-c", "a.c"]));
                    add(&mut ps, cc, Some(&["cc1", "-quiet", "a.c"]));
                    add(&mut ps, cc, Some(&["as", "-o", "a.o"]));
                }
                2 => {
                    let fork = add(&mut ps, make, None);
                    add(&mut ps, fork, Some(&["true"]));
                }
                3 => {
                    let fork = add(&mut ps, make, None);
                    add(&mut ps, fork, Some(&["ld", "-o", "prog"]));
                }
                _ => {
                    // `cc-12` extends `cc` with a character below `;`.
                    let cc = if r >> 16 & 1 == 0 { "cc" } else { "cc-12" };
                    let cc = add(&mut ps, make, Some(&[cc, "-c", "a.c"]));
                    add(&mut ps, cc, Some(&["cc1", "-quiet", "a.c"]));
                }
            }
        }
        ps.truncate(2000);
        for (i, p) in ps.iter_mut().enumerate() {
            let w = next() as u64;
            p.cpu_time_ns = if i % 7 == 0 { 0 } else { w % 1_000_000_000 };
            if i % 11 != 0 {
                p.disk_bytes_read = Some(w % 5_000_000);
                p.disk_bytes_written = Some((w >> 20) % 3_000_000);
            }
            p.peak_memory_bytes = Some((w >> 10) % (1 << 30));
            p.network_bytes_sent = match i % 17 {
                0 => None,
                3 => Some(w % 100_000),
                _ => Some(0),
            };
            p.network_bytes_received = p.network_bytes_sent.map(|s| s / 3);
        }
        ps
    }

    /// The stack of names of process `i`, root first, walked without the code under test.
    fn stack_of(ps: &[ProcessUsage], i: usize) -> Vec<String> {
        let mut path = vec![frame_name(&ps[i])];
        let mut at = i;
        while let Some(j) = ps[at].parent_index {
            path.push(frame_name(&ps[j]));
            at = j;
        }
        path.reverse();
        path
    }

    /// The distinct stacks with a weight, and their sums.
    fn expected_stacks(ps: &[ProcessUsage], weight: FlameWeight) -> BTreeMap<Vec<String>, u64> {
        let mut stacks = BTreeMap::new();
        for (i, p) in ps.iter().enumerate() {
            if let Some(w) = weight.of(p).filter(|&w| w > 0) {
                *stacks.entry(stack_of(ps, i)).or_insert(0) += w;
            }
        }
        stacks
    }

    /// The frames a flame graph of `stacks` must hold: one per distinct prefix, (its last
    /// name, the sum of the stacks it prefixes), and the root "all" frame with the total.
    fn expected_frames(stacks: &BTreeMap<Vec<String>, u64>) -> BTreeMap<(String, u64), usize> {
        let mut prefixes: BTreeMap<&[String], u64> = BTreeMap::new();
        for (stack, w) in stacks {
            for len in 1..=stack.len() {
                *prefixes.entry(&stack[..len]).or_insert(0) += w;
            }
        }
        let mut frames = BTreeMap::new();
        for (prefix, w) in prefixes {
            *frames
                .entry((prefix.last().unwrap().clone(), w))
                .or_insert(0) += 1;
        }
        let total = stacks.values().sum::<u64>();
        *frames.entry(("all".to_string(), total)).or_insert(0) += 1;
        frames
    }

    /// The frames of an SVG: each `<g>` with a `<title>` in `<svg id="frames">`, as (its name,
    /// its width in the weight's unit, `fg:w`), counted. Panics unless the SVG is XML.
    fn svg_frames(svg: &[u8], weight: FlameWeight) -> BTreeMap<(String, u64), usize> {
        let text = std::str::from_utf8(svg).expect("the SVG is UTF-8");
        let doc = roxmltree::Document::parse_with_options(
            text,
            roxmltree::ParsingOptions {
                allow_dtd: true,
                ..Default::default()
            },
        )
        .expect("the SVG parses as XML");
        let container = doc
            .descendants()
            .find(|n| n.has_tag_name("svg") && n.attribute("id") == Some("frames"))
            .expect("inferno's frames container");
        let mut frames = BTreeMap::new();
        for g in container.children().filter(|n| n.has_tag_name("g")) {
            let title = g
                .children()
                .find(|n| n.has_tag_name("title"))
                .and_then(|t| t.text())
                .expect("each frame has a title");
            let rect = g.children().find(|n| n.has_tag_name("rect")).unwrap();
            let width: u64 = rect
                .attribute(("http://github.com/jonhoo/inferno", "w"))
                .expect("fg:w")
                .parse()
                .unwrap();
            let (name, figures) = title.rsplit_once(" (").expect("name (figure unit, %)");
            assert!(figures.contains(weight.unit()), "{title}");
            assert!(
                figures.starts_with(&format!("{} ", with_commas(width))),
                "{title}"
            );
            *frames.entry((name.to_string(), width)).or_insert(0) += 1;
        }
        frames
    }

    fn with_commas(n: u64) -> String {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    }

    #[test]
    fn folded_stacks_sum_to_the_total_one_line_per_distinct_stack() {
        let ps = build_tree();
        let usage = usage_of(ps.clone());
        for weight in FlameWeight::ALL {
            let folded = folded_stacks(&usage, weight);
            let total: u64 = ps.iter().filter_map(|p| weight.of(p)).sum();
            assert_eq!(
                folded.iter().map(|(_, w)| w).sum::<u64>(),
                total,
                "{weight}"
            );
            let expected = expected_stacks(&ps, weight);
            let got: BTreeMap<Vec<String>, u64> = folded
                .iter()
                .map(|(s, w)| (s.split(';').map(str::to_string).collect(), *w))
                .collect();
            assert_eq!(got.len(), folded.len(), "{weight}: a stack twice");
            assert_eq!(got, expected, "{weight}");
            assert!(folded.len() < ps.len() / 2, "{weight}: stacks merged");
            // Name by name: a stack's descendants follow it.
            let paths: Vec<Vec<&str>> =
                folded.iter().map(|(s, _)| s.split(';').collect()).collect();
            assert!(paths.is_sorted(), "{weight}");
            assert!(folded.iter().all(|(s, w)| *w > 0 && !s.contains('\n')));
        }
        // Deep and wide, and the same commands at several depths.
        let cpu = folded_stacks(&usage, FlameWeight::Cpu);
        let depths: BTreeSet<usize> = cpu
            .iter()
            .filter(|(s, _)| s.ends_with(";cc1 -quiet a.c"))
            .map(|(s, _)| s.matches(';').count())
            .collect();
        assert!(depths.len() >= 5, "{depths:?}");
        assert!(cpu.iter().any(|(s, _)| s.matches(';').count() >= 9));
    }

    #[test]
    fn the_svg_parses_and_holds_one_frame_per_distinct_stack_prefix() {
        let ps = build_tree();
        let usage = usage_of(ps.clone());
        for weight in FlameWeight::ALL {
            let svg = flamegraph_svg(&usage, weight, "cylo-usage: make -j4").unwrap();
            let expected = expected_frames(&expected_stacks(&ps, weight));
            let frames = svg_frames(&svg, weight);
            assert_eq!(
                frames.values().sum::<usize>(),
                expected.values().sum::<usize>(),
                "{weight}: frames"
            );
            assert_eq!(frames, expected, "{weight}");
            let text = String::from_utf8(svg).unwrap();
            assert!(text.contains("cylo-usage: make -j4"), "{weight}: the title");
            assert!(text.contains("Width: "), "{weight}: the subtitle");
        }
    }

    /// `gcc` and `gcc-12` side by side, each with children: plain string order (inferno's
    /// sort) puts `gcc-12`'s line between `gcc`'s own and its children's, and would draw `gcc`
    /// twice. And names whose last word is a number, which inferno would read as a count.
    #[test]
    fn a_name_that_another_extends_stays_one_frame() {
        let mut ps = vec![run(None, &["sh"])];
        ps.push(run(Some(0), &["gcc"]));
        ps.push(run(Some(1), &["cc1"]));
        ps.push(run(Some(0), &["gcc-12"]));
        ps.push(run(Some(0), &["gcc"]));
        ps.push(run(Some(0), &["gcc", "-v"]));
        // A name ending with a number, with a child and without.
        ps.push(run(Some(0), &["make", "-j", "4"]));
        ps.push(run(Some(6), &["sleep", "1.5"]));
        for (i, p) in ps.iter_mut().enumerate() {
            p.cpu_time_ns = 10 * (i as u64 + 1);
        }
        let usage = usage_of(ps.clone());
        let folded = folded_stacks(&usage, FlameWeight::Cpu);
        assert_eq!(
            folded,
            [
                ("sh".to_string(), 10),
                ("sh;gcc".to_string(), 20 + 50),
                ("sh;gcc;cc1".to_string(), 30),
                ("sh;gcc -v".to_string(), 60),
                ("sh;gcc-12".to_string(), 40),
                ("sh;make -j 4\u{200b}".to_string(), 70),
                ("sh;make -j 4\u{200b};sleep 1.5\u{200b}".to_string(), 80),
            ]
        );
        let svg = flamegraph_svg(&usage, FlameWeight::Cpu, "t").unwrap();
        let frames = svg_frames(&svg, FlameWeight::Cpu);
        let names: Vec<(&str, u64)> = frames.keys().map(|(n, w)| (n.as_str(), *w)).collect();
        assert_eq!(
            names,
            [
                ("all", 360),
                ("cc1", 30),
                ("gcc", 100),
                ("gcc -v", 60),
                ("gcc-12", 40),
                ("make -j 4\u{200b}", 150),
                ("sh", 360),
                ("sleep 1.5\u{200b}", 80),
            ]
        );
        assert!(frames.values().all(|&n| n == 1), "{frames:?}");
    }

    #[test]
    fn hostile_names_neither_break_the_format_nor_inject_markup() {
        let hostile = [
            ("<script>alert(1)</script>", None),
            (
                "x",
                Some(("/tmp/a;b\nc", vec!["a;b\nc", "<b>x</b>&amp;", "]]>"])),
            ),
            (
                "\u{1b}[2J",
                Some(("/bin/\u{ff}\\xff", vec!["\\xff", "\u{fffe}\"'"])),
            ),
            ("# comment", None),
            ("x_[k", None),
            ("   ", None),
            ("x", Some(("/usr/bin/x", vec!["x", "\t;\r"]))),
            ("--", Some(("#!", vec!["#!", "-- --> <!--"]))),
        ];
        let mut ps = vec![process(None, "# root")];
        for (i, (comm, exec_of)) in hostile.iter().enumerate() {
            for depth in 0..3 {
                let parent = if depth == 0 { 0 } else { ps.len() - 1 };
                let mut p = process(Some(parent), comm);
                if let Some((file, argv)) = exec_of {
                    p.filename = Some(file.to_string());
                    p.argv = Some(argv.iter().map(|a| a.to_string()).collect());
                }
                p.cpu_time_ns = 1000 + i as u64;
                ps.push(p);
            }
        }
        ps[0].cpu_time_ns = 5;
        let usage = usage_of(ps.clone());
        let folded = folded_stacks(&usage, FlameWeight::Cpu);
        for (stack, _) in &folded {
            assert!(
                !stack.contains(['\n', '\r', '\t', '\u{1b}', '\u{fffe}']),
                "{stack:?}"
            );
            assert!(!stack.starts_with('#'), "{stack:?}");
            assert!(stack.split(';').all(|f| f == f.trim() && !f.is_empty()));
        }
        // Each process its own line: the depth of each stack is its own.
        let depth: Vec<usize> = folded.iter().map(|(s, _)| s.split(';').count()).collect();
        assert_eq!(depth.iter().filter(|&&d| d == 4).count(), hostile.len());
        assert_eq!(frame_name(&ps[0]), "[# root]");
        assert_eq!(frame_name(&ps[1]), "[<script>alert(1)</script>]");
        assert_eq!(frame_name(&ps[4]), "a\\u{3b}b\\nc <b>x</b>&amp\\u{3b} ]]>");
        assert_eq!(frame_name(&ps[7]), "ÿ\\xff \\u{fffe}\"'");
        assert_eq!(frame_name(&ps[10]), "[# comment]");
        assert_eq!(frame_name(&ps[13]), "[x\\u{5f}[k]");
        assert_eq!(frame_name(&ps[16]), "[ ]");
        assert_eq!(frame_name(&ps[19]), "x \\t\\u{3b}\\r");
        assert_eq!(frame_name(&ps[22]), "\\u{23}! -- --> <!--");
        assert_eq!(frame_text("  # x "), "\\u{23} x");
        assert_eq!(frame_text(" \n "), "\\n");
        assert_eq!(frame_text("   "), "[?]");
        assert_eq!(frame_text("sleep 10"), "sleep 10\u{200b}");
        assert_eq!(frame_text("seq 1 2.5"), "seq 1 2.5\u{200b}");
        assert_eq!(frame_text("sh 1a"), "sh 1a");
        assert_eq!(frame_text("100"), "100");
        let svg = flamegraph_svg(&usage, FlameWeight::Cpu, "<title>\u{7}&").unwrap();
        let text = String::from_utf8(svg.clone()).unwrap();
        assert!(!text.contains("<script>alert"), "markup from a name");
        assert!(!text.contains("<b>") && !text.contains("<title>\u{7}"));
        let expected = expected_frames(&expected_stacks(&ps, FlameWeight::Cpu));
        assert_eq!(svg_frames(&svg, FlameWeight::Cpu), expected);
    }

    #[test]
    fn an_unmeasured_weight_or_no_breakdown_is_an_error() {
        let mut ps = build_tree();
        for p in &mut ps {
            p.network_bytes_sent = None;
            p.network_bytes_received = None;
        }
        let usage = usage_of(ps);
        let e = flamegraph_svg(&usage, FlameWeight::Network, "t").unwrap_err();
        assert!(
            matches!(
                e,
                FlamegraphError::Unmeasured {
                    weight: FlameWeight::Network,
                    processes: 2000
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("no network figure"), "{e}");
        assert!(folded_stacks(&usage, FlameWeight::Network).is_empty());
        assert!(flamegraph_svg(&usage, FlameWeight::Disk, "t").is_ok());

        let e = flamegraph_svg(&usage_of(Vec::new()), FlameWeight::Cpu, "t").unwrap_err();
        assert!(
            matches!(e, FlamegraphError::Unmeasured { processes: 0, .. }),
            "{e:?}"
        );
        let none = ResourceUsage::unmeasured(TrackerKind::InProcess);
        let e = flamegraph_svg(&none, FlameWeight::Cpu, "t").unwrap_err();
        assert!(matches!(e, FlamegraphError::NoBreakdown), "{e:?}");
        assert!(folded_stacks(&none, FlameWeight::Cpu).is_empty());

        let idle = usage_of(vec![process(None, "sleep")]);
        let e = flamegraph_svg(&idle, FlameWeight::Cpu, "t").unwrap_err();
        assert!(
            matches!(e, FlamegraphError::Nothing { processes: 1, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn weights_parse_from_their_names() {
        for w in FlameWeight::ALL {
            assert_eq!(w.name().parse::<FlameWeight>().unwrap(), w);
            assert_eq!(
                w.to_string().to_uppercase().parse::<FlameWeight>().unwrap(),
                w
            );
        }
        assert_eq!(FlameWeight::default(), FlameWeight::Cpu);
        let e = "gpu".parse::<FlameWeight>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown flame graph weight \"gpu\": expected cpu, disk, memory or network"
        );
    }

    #[test]
    fn frame_names_are_the_program_and_its_first_arguments() {
        let p = exec(
            process(None, "cc1"),
            "/usr/lib/gcc/cc1",
            &["cc1", "-quiet", "a.c"],
        );
        assert_eq!(frame_name(&p), "cc1 -quiet a.c");
        let long: Vec<String> = (0..40).map(|i| format!("-I{i}")).collect();
        let mut p = exec(process(None, "cc"), "./cc", &["cc"]);
        p.argv.as_mut().unwrap().extend(long);
        let name = frame_name(&p);
        assert!(
            name.starts_with("cc -I0 -I1 ") && name.ends_with('…'),
            "{name}"
        );
        assert_eq!(name.chars().count(), "cc ".len() + ARGS_MAX + 1);
        let mut p = exec(process(None, "sh"), "/bin/sh", &["sh", "-c"]);
        p.argv_truncated = true;
        assert_eq!(frame_name(&p), "sh -c…");
        // No file name: argv[0]'s basename; nothing: the comm.
        let mut p = exec(process(None, "x"), "/bin/x", &["/usr/bin/env", "a"]);
        p.filename = None;
        assert_eq!(frame_name(&p), "env a");
        assert_eq!(frame_name(&process(None, "bash")), "[bash]");
    }
}
