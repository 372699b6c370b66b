//! The by-command summary as a text table ([`table`]): one line per executable, figures first
//! in aligned columns, sorted by CPU; and the text helpers it shares with the tree
//! ([`super::tree`]): unambiguous escaping, terminal widths, shortening, figures.
use std::fmt::Write;

use crate::usage::ResourceUsage;
pub use crate::usage::commands::{CommandUsage, NOT_IN_BREAKDOWN, by_command, executable};

/// The commands [`table`] shows under the tree in the human report; the rest share a line.
pub const DEFAULT_ROWS: usize = 20;

/// The human report shows the by-command table under a tree of at least this many
/// processes (or one that left processes out).
pub const TABLE_FROM_PROCESSES: usize = 20;

/// The most columns a line of the table takes (its leading tab counted as 8).
pub const WIDTH: usize = 160;

/// The columns of a leading tab.
pub(crate) const TAB: usize = 8;

// ---- Text: escaping, width, shortening (the tree's too). ----

/// Whether `c` is shown as `\xNN` of its UTF-8 bytes: control characters (C0, DEL, C1) and
/// the invisible formatting characters that could disguise text (zero-width, bidirectional
/// overrides, the byte order mark, ...).
fn hidden_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{180E}'
            | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}' | '\u{3164}' | '\u{FEFF}' | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}')
}

/// `s` (a string of the breakdown: its backslashes already `\\`, its bytes that are not UTF-8
/// already `\xNN`) with its control and invisible characters as `\xNN` of their bytes.
pub(crate) fn shown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if hidden_char(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "\\x{b:02x}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The columns `c` takes on a terminal: 2 for the wide (East Asian, emoji) ranges, else 1
/// (combining marks counted as 1: never narrower than shown).
fn char_columns(c: char) -> usize {
    let c = c as u32;
    let wide = [
        (0x1100, 0x115F),
        (0x2E80, 0x303E),
        (0x3041, 0x33FF),
        (0x3400, 0x4DBF),
        (0x4E00, 0x9FFF),
        (0xA000, 0xA4CF),
        (0xAC00, 0xD7A3),
        (0xF900, 0xFAFF),
        (0xFE30, 0xFE4F),
        (0xFF00, 0xFF60),
        (0xFFE0, 0xFFE6),
        (0x1F300, 0x1F64F),
        (0x1F900, 0x1F9FF),
        (0x20000, 0x3FFFD),
    ];
    if wide.iter().any(|&(a, b)| (a..=b).contains(&c)) {
        2
    } else {
        1
    }
}

/// The columns `s` takes on a terminal (a tab to the next multiple of 8).
pub(crate) fn columns(s: &str) -> usize {
    s.chars().fold(0, |n, c| match c {
        '\t' => (n / TAB + 1) * TAB,
        c => n + char_columns(c),
    })
}

/// `s` cut into what must stay whole: an escape (`\\`, `\xNN`) or one character.
fn units(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        let mut len = c.len_utf8();
        if c == '\\' {
            let b = rest.as_bytes();
            if b.get(1) == Some(&b'\\') {
                len = 2;
            } else if b.get(1) == Some(&b'x')
                && b.len() >= 4
                && b[2].is_ascii_hexdigit()
                && b[3].is_ascii_hexdigit()
            {
                len = 4;
            }
        }
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    out
}

/// `s` in at most `max` columns: its start and its end, with "…" for the middle (a command
/// line's program and its last arguments, the file, are what tell it apart). Escapes are
/// never cut.
pub(crate) fn shorten_middle(s: &str, max: usize) -> String {
    if columns(s) <= max {
        return s.to_string();
    }
    let units = units(s);
    let budget = max.saturating_sub(1);
    let head_budget = budget.div_ceil(2);
    let (mut head, mut used) = (0, 0);
    while head < units.len() && used + columns(units[head]) <= head_budget {
        used += columns(units[head]);
        head += 1;
    }
    let (mut tail, mut tail_used) = (units.len(), 0);
    while tail > head && used + tail_used + columns(units[tail - 1]) <= budget {
        tail_used += columns(units[tail - 1]);
        tail -= 1;
    }
    format!("{}…{}", units[..head].concat(), units[tail..].concat())
}

/// `s` in at most `max` columns: its start, and "…" for the rest. Escapes are never cut.
pub(crate) fn shorten_end(s: &str, max: usize) -> String {
    if columns(s) <= max {
        return s.to_string();
    }
    let mut out = String::new();
    let mut used = 0;
    for u in units(s) {
        if used + columns(u) + 1 > max {
            break;
        }
        used += columns(u);
        out.push_str(u);
    }
    out.push('…');
    out
}

// ---- Figures. ----

/// Nanoseconds as seconds with 3 decimals.
pub(crate) fn secs(ns: u64) -> String {
    format!(
        "{}.{:03}",
        ns / 1_000_000_000,
        ns % 1_000_000_000 / 1_000_000
    )
}

/// Bytes as `ls -h` shows them (K, M, G, T, P of 1024: `512`, `4.0K`, `37M`); `-` where not
/// measured.
pub(crate) fn size(v: Option<u64>) -> String {
    let Some(b) = v else {
        return "-".to_string();
    };
    if b < 1024 {
        return b.to_string();
    }
    let mut unit = 0;
    let mut scale: u128 = 1024;
    while unit < 4 && b as u128 >= scale * 1024 {
        scale *= 1024;
        unit += 1;
    }
    let tenths = b as u128 * 10 / scale;
    let suffix = ['K', 'M', 'G', 'T', 'P'][unit];
    if tenths < 100 {
        format!("{}.{}{suffix}", tenths / 10, tenths % 10)
    } else {
        format!("{}{suffix}", tenths / 10)
    }
}

/// One column of figures: its header and a cell per line.
pub(crate) struct Column {
    /// The header, right-aligned over the cells.
    pub header: &'static str,
    /// One cell per line.
    pub cells: Vec<String>,
    /// Left out when no cell holds anything but `0` or `-`.
    pub hideable: bool,
}

/// The figure part of the header and of each line (columns right-aligned, two spaces apart
/// and after), and the headers of the columns left out (hideable, with no figure but 0 or
/// `-`). Every part is as wide as the others.
pub(crate) fn figure_block(columns: Vec<Column>) -> (String, Vec<String>, Vec<&'static str>) {
    let mut left_out = Vec::new();
    let kept: Vec<Column> = columns
        .into_iter()
        .filter(|c| {
            let empty = c.hideable && c.cells.iter().all(|v| v == "0" || v == "-");
            if empty {
                left_out.push(c.header);
            }
            !empty
        })
        .collect();
    let rows = kept.first().map_or(0, |c| c.cells.len());
    let widths: Vec<usize> = kept
        .iter()
        .map(|c| {
            c.cells
                .iter()
                .map(|v| v.len())
                .chain([c.header.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cell: &dyn Fn(&Column) -> &str| {
        let mut s = String::new();
        for (c, w) in kept.iter().zip(&widths) {
            let _ = write!(s, "{:>w$}  ", cell(c));
        }
        s
    };
    let header = line(&|c| c.header);
    let lines = (0..rows).map(|r| line(&|c| c.cells[r].as_str())).collect();
    (header, lines, left_out)
}

// ---- The table. ----

/// One line of the table.
struct Line {
    c: CommandUsage,
    text: String,
}

fn sum_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    }
}

/// `commands` (as [`by_command`] makes them) as a text table of at most [`WIDTH`] columns: a
/// caption, a header, and a line per command, figures first (CPU, user and system seconds,
/// processes, threads, the largest RSS of one process, disk read and written, network sent
/// and received; disk and network columns left out where every figure is 0 or not measured),
/// the command last, shortened in the middle with "…" where it is long. Past `max_rows`
/// commands, the rest share one "N more commands" line of their sums; the
/// [`NOT_IN_BREAKDOWN`] row stays last, on its own. Every line starts with a tab, as the rest
/// of the human report.
pub fn table(commands: &[CommandUsage], max_rows: usize) -> String {
    let (missing, named): (Vec<&CommandUsage>, Vec<&CommandUsage>) =
        commands.iter().partition(|c| c.command == NOT_IN_BREAKDOWN);
    let mut lines: Vec<Line> = named
        .iter()
        .take(max_rows)
        .map(|c| Line {
            c: (*c).clone(),
            text: shown(&c.command),
        })
        .collect();
    if named.len() > max_rows {
        let rest = &named[max_rows..];
        let mut sum = rest[0].clone();
        for c in &rest[1..] {
            sum.process_count += c.process_count;
            sum.processes_refused += c.processes_refused;
            sum.thread_count += c.thread_count;
            sum.cpu_time_ns = sum.cpu_time_ns.saturating_add(c.cpu_time_ns);
            sum.cpu_user_ns = sum.cpu_user_ns.saturating_add(c.cpu_user_ns);
            sum.cpu_system_ns = sum.cpu_system_ns.saturating_add(c.cpu_system_ns);
            sum.max_rss_bytes = sum.max_rss_bytes.max(c.max_rss_bytes);
            sum.disk_bytes_read = sum_opt(sum.disk_bytes_read, c.disk_bytes_read);
            sum.disk_bytes_written = sum_opt(sum.disk_bytes_written, c.disk_bytes_written);
            sum.network_bytes_sent = sum_opt(sum.network_bytes_sent, c.network_bytes_sent);
            sum.network_bytes_received =
                sum_opt(sum.network_bytes_received, c.network_bytes_received);
        }
        let text = format!(
            "{} more command{}",
            rest.len(),
            if rest.len() == 1 { "" } else { "s" }
        );
        lines.push(Line { c: sum, text });
    }
    lines.extend(missing.iter().map(|c| Line {
        c: (*c).clone(),
        text: NOT_IN_BREAKDOWN.to_string(),
    }));
    let column = |header, hideable, cell: &dyn Fn(&CommandUsage) -> String| Column {
        header,
        hideable,
        cells: lines.iter().map(|l| cell(&l.c)).collect(),
    };
    let (header, figures, left_out) = figure_block(vec![
        column("CPU s", false, &|c| secs(c.cpu_time_ns)),
        column("user s", false, &|c| secs(c.cpu_user_ns)),
        column("sys s", false, &|c| secs(c.cpu_system_ns)),
        column("count", false, &|c| c.process_count.to_string()),
        column("threads", false, &|c| c.thread_count.to_string()),
        column("max RSS", true, &|c| size(c.max_rss_bytes)),
        column("read", true, &|c| size(c.disk_bytes_read)),
        column("write", true, &|c| size(c.disk_bytes_written)),
        column("sent", true, &|c| size(c.network_bytes_sent)),
        column("recv", true, &|c| size(c.network_bytes_received)),
    ]);
    let room = WIDTH.saturating_sub(TAB + columns(&header)).max(16);
    let mut out = String::new();
    let mut caption = format!(
        "By command: {} executable{}, by CPU; sums, but max RSS: the largest \
         process; read/write: disk, sent/recv: network",
        named.len(),
        if named.len() == 1 { "" } else { "s" }
    );
    if !left_out.is_empty() {
        let _ = write!(caption, "; 0 everywhere: {}", left_out.join(", "));
    }
    let _ = writeln!(out, "\t{}", shorten_end(&caption, WIDTH - TAB));
    let _ = writeln!(out, "\t{header}command");
    for (l, figures) in lines.iter().zip(figures) {
        let refused = match l.c.processes_refused {
            0 => String::new(),
            n => format!(" ({n} refused)"),
        };
        let text = match room.checked_sub(columns(&refused)) {
            Some(r) if r >= 16 => format!("{}{refused}", shorten_middle(&l.text, r)),
            _ => shorten_middle(&format!("{}{refused}", l.text), room),
        };
        let _ = writeln!(out, "\t{figures}{text}");
    }
    out
}

/// The by-command table the human report shows under a report's tree: for a breakdown of at
/// least [`TABLE_FROM_PROCESSES`] processes, or one that left processes out, the report's
/// `commands` (made from its `processes` when absent) in [`DEFAULT_ROWS`] lines; else nothing.
pub fn under_tree(usage: &ResourceUsage) -> String {
    let Some(processes) = &usage.processes else {
        return String::new();
    };
    if processes.len() < TABLE_FROM_PROCESSES && usage.processes_dropped.is_none() {
        return String::new();
    }
    match usage.commands.clone().or_else(|| by_command(usage)) {
        Some(commands) => table(&commands, DEFAULT_ROWS),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_commands_are_shortened_in_the_middle_without_cutting_escapes() {
        let s = format!(
            "gcc {} -c -o hello.o hello.c",
            "-I/usr/include/x ".repeat(20)
        );
        let short = shorten_middle(&s, 60);
        assert_eq!(columns(&short), 60, "{short}");
        assert!(short.starts_with("gcc -I/usr") && short.ends_with("-o hello.o hello.c"));
        let e = r"\x1b\x1b\x1b\x1b\\\\";
        for max in 1..e.len() {
            let cut = shorten_middle(e, max);
            assert!(columns(&cut) <= max, "{cut}");
            let whole: String = cut.split('…').collect();
            assert!(
                units(&whole).iter().all(|u| u.len() == 4 || *u == r"\\"),
                "{max}: {cut}"
            );
        }
        assert_eq!(shorten_end("abcdef", 4), "abc…");
        assert_eq!(columns("\tab漢字"), 8 + 2 + 4);
        assert_eq!(shorten_middle("漢字漢字漢字", 7), "漢…漢字");
    }

    #[test]
    fn figures_read_like_ls_and_time() {
        assert_eq!(size(None), "-");
        assert_eq!(size(Some(1023)), "1023");
        assert_eq!(size(Some(4096)), "4.0K");
        assert_eq!(size(Some(37 << 20)), "37M");
        assert_eq!(size(Some((3 << 30) + (1 << 29))), "3.5G");
        assert_eq!(size(Some(u64::MAX)), "16383P");
        assert_eq!(secs(1_234_567_890), "1.234");
        assert_eq!(secs(999_999), "0.000");
    }

    fn command(name: &str, cpu_ms: u64, count: u64) -> CommandUsage {
        CommandUsage {
            command: name.to_string(),
            process_count: count,
            processes_refused: 0,
            thread_count: count * 2,
            cpu_time_ns: cpu_ms * 1_000_000,
            cpu_user_ns: cpu_ms * 600_000,
            cpu_system_ns: cpu_ms * 400_000,
            max_rss_bytes: Some(cpu_ms << 20),
            disk_bytes_read: Some(0),
            disk_bytes_written: Some(count * 4096),
            network_bytes_sent: None,
            network_bytes_received: None,
        }
    }

    #[test]
    fn the_table_aligns_figures_and_sums_what_it_leaves_out() {
        let mut cs: Vec<CommandUsage> = (0..30)
            .map(|i| command(&format!("/usr/bin/tool{i}"), 3_000 - i * 100, i + 1))
            .collect();
        cs[0].command = format!("/very/long{}/path/to/cc1", "/deeper".repeat(40));
        cs[1].processes_refused = 3;
        cs.push(command(NOT_IN_BREAKDOWN, 7, 2));
        let text = table(&cs, 10);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 + 10 + 2, "{text}");
        for l in &lines {
            assert!(columns(l) <= WIDTH, "{} columns: {l}", columns(l));
        }
        assert!(
            lines[0].starts_with("\tBy command: 30 executables"),
            "{text}"
        );
        assert!(
            lines[0].ends_with("0 everywhere: read, sent, recv"),
            "{text}"
        );
        assert_eq!(
            lines[1],
            "\t CPU s  user s  sys s  count  threads  max RSS  write  command"
        );
        // Figures right-aligned under their headers; the command last, its end kept.
        assert_eq!(
            lines[2],
            format!(
                "\t 3.000   1.800  1.200      1        2     2.9G   4.0K  {}",
                {
                    let c = shown(&cs[0].command);
                    shorten_middle(&c, WIDTH - 8 - 55)
                }
            )
        );
        assert!(
            lines[2].ends_with("/path/to/cc1") && lines[2].contains('…'),
            "{text}"
        );
        assert!(lines[3].ends_with("/usr/bin/tool1 (3 refused)"), "{text}");
        // 20 commands left out, summed: 2,000 - 100 ms each ...
        let more: Vec<&str> = lines[12].split_whitespace().collect();
        let cpu: u64 = (10..30).map(|i| 3_000 - i * 100).sum();
        let count: u64 = (10..30).map(|i| i + 1).sum();
        assert_eq!(more[0], secs(cpu * 1_000_000));
        assert_eq!(more[3], count.to_string());
        assert!(lines[12].ends_with("  20 more commands"), "{text}");
        assert!(
            lines[13].ends_with(&format!("  {NOT_IN_BREAKDOWN}")),
            "{text}"
        );
        // All of them: no "more" line.
        assert_eq!(table(&cs, 100).lines().count(), 2 + 31);
        assert_eq!(table(&cs, 0).lines().count(), 2 + 2);
    }

    #[test]
    fn the_table_escapes_commands() {
        // As the breakdown keeps it: a backslash and a byte that is not UTF-8 escaped, a
        // terminal escape and a newline raw.
        let cs = [command(&format!(r"/tmp/a\\b\xff{}", "\x1b[2J\n"), 1, 1)];
        let text = table(&cs, 5);
        let want = format!("  {}\n", r"/tmp/a\\b\xff\x1b[2J\x0a");
        assert!(text.ends_with(&want), "{text:?}");
    }

    #[test]
    fn the_report_shows_the_table_for_large_trees_only() {
        use crate::usage::{ProcessUsage, TrackerKind};
        let mut u = ResourceUsage::unmeasured(TrackerKind::InProcess);
        assert_eq!(under_tree(&u), "");
        let p = ProcessUsage {
            pid: 1,
            comm: "true".to_string(),
            filename: Some("/bin/true".to_string()),
            end_ns: Some(1),
            exit_code: Some(0),
            thread_count: 1,
            cpu_time_ns: 1,
            cpu_user_ns: 1,
            ..ProcessUsage::default()
        };
        u.processes = Some(vec![p.clone(); 3]);
        assert_eq!(under_tree(&u), "");
        u.processes = Some(vec![p; TABLE_FROM_PROCESSES]);
        u.process_count = TABLE_FROM_PROCESSES as u64 + 5;
        let text = under_tree(&u);
        let first: Vec<&str> = text.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!((first[3], first[5]), ("20", "/bin/true"), "{text}");
        let last = text.lines().last().unwrap();
        assert!(last.ends_with(NOT_IN_BREAKDOWN), "{text}");
        assert_eq!(last.split_whitespace().nth(3), Some("5"), "{text}");
    }
}
