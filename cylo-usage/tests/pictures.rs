//! The pictures of a real process tree that the command line draws from its breakdown.
mod common;

/// The by-command summary (`commands` in the JSON report) and the human `--tree`: on a real
/// tree of forks, execs, threads, disk and network traffic, the summary adds up to the totals
/// exactly, and the human report fits 160 columns.
mod commands_and_tree {
    use std::path::{Path, PathBuf};

    use super::common::{self, WORKLOAD, stderr, tracker};
    use cylo_usage::commands::{NOT_IN_BREAKDOWN, by_command};
    use cylo_usage::{CommandUsage, Precision, ResourceUsage};

    /// A fresh directory for one test.
    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cylo-usage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `sh` running, at once: 6 children burning 50 ms and 200 tiny forks (`mix`), a process
    /// of 3 threads, a TCP exchange between two processes, a 4 MiB write synced to disk; then
    /// ten `/bin/true` one after the other. `$0` is the workload, `$1` the scratch directory.
    const SCRIPT: &str = r#""$0" mix 6 50 200 & "$0" threads 3 20 & "$0" net tcp 300000 50000 &
"$0" write "$1/data" 4 fsync & wait
for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done; exit 0"#;

    /// Runs the tree under `cylo-usage run --tree` with `extra` options, the report written
    /// to a file; returns the report's text.
    fn run(dir: &Path, extra: &[&str]) -> String {
        let report = dir.join("report");
        let dir_arg = dir.to_str().unwrap();
        let mut args = vec!["run", "--tree", "-o", report.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "/bin/sh", "-c", SCRIPT, WORKLOAD, dir_arg]);
        let o = common::cli(&args);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        std::fs::read_to_string(&report).unwrap()
    }

    /// Every summed field of `commands` adds up to the report's total, or is null in every row
    /// where the total is null.
    fn assert_sums(u: &ResourceUsage, commands: &[CommandUsage]) {
        let sum = |f: fn(&CommandUsage) -> Option<u64>| -> Option<u64> {
            commands.iter().filter_map(f).reduce(|a, b| a + b)
        };
        let counted = |f: fn(&CommandUsage) -> u64| commands.iter().map(f).sum::<u64>();
        assert_eq!(counted(|c| c.cpu_time_ns), u.cpu_time_ns, "CPU");
        assert_eq!(counted(|c| c.cpu_user_ns), u.cpu_user_ns, "user");
        assert_eq!(counted(|c| c.cpu_system_ns), u.cpu_system_ns, "system");
        assert_eq!(counted(|c| c.process_count), u.process_count, "processes");
        assert_eq!(counted(|c| c.thread_count), u.thread_count, "threads");
        type Field = fn(&CommandUsage) -> Option<u64>;
        let optional: [(&str, Field, Option<u64>); 4] = [
            ("disk read", |c| c.disk_bytes_read, u.disk_bytes_read),
            (
                "disk written",
                |c| c.disk_bytes_written,
                u.disk_bytes_written,
            ),
            ("sent", |c| c.network_bytes_sent, u.network_bytes_sent),
            (
                "received",
                |c| c.network_bytes_received,
                u.network_bytes_received,
            ),
        ];
        for (what, f, total) in optional {
            match total {
                Some(t) => assert_eq!(sum(f).unwrap_or(0), t, "{what}: {commands:#?}"),
                None => assert!(commands.iter().all(|c| f(c).is_none()), "{what}"),
            }
        }
    }

    /// The columns a line takes on a terminal (tabs to the next multiple of 8).
    fn columns(line: &str) -> usize {
        line.chars().fold(0, |n, c| match c {
            '\t' => (n / 8 + 1) * 8,
            _ => n + 1,
        })
    }

    #[test]
    fn the_by_command_summary_adds_up_to_the_totals_exactly() {
        if tracker().is_none() {
            return;
        }
        let dir = tempdir("pictures-commands");
        let text = run(&dir, &["--json"]);
        let json: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let u: ResourceUsage = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(u.precision, Precision::Exact, "{text}");
        assert_eq!(u.lost_events, 0);
        let commands = u.commands.clone().expect("commands with --tree");
        assert_eq!(json["commands"].as_array().unwrap().len(), commands.len());
        assert_sums(&u, &commands);
        // Made from the breakdown as the library makes it.
        assert_eq!(by_command(&u).as_ref(), Some(&commands));
        // The whole tree is in the breakdown: no row for what it misses.
        assert!(
            !commands.iter().any(|c| c.command == NOT_IN_BREAKDOWN),
            "{commands:#?}"
        );
        // Sorted by CPU; the ten /bin/true in one row; the workload's 200 + 6 forks and the
        // TCP peer (never exec'd) by their comm, bracketed.
        assert!(
            commands
                .windows(2)
                .all(|w| w[0].cpu_time_ns >= w[1].cpu_time_ns),
            "{commands:#?}"
        );
        let row = |name: &str| commands.iter().find(|c| c.command == name);
        let t = row("/bin/true").expect("a /bin/true row");
        assert_eq!((t.process_count, t.thread_count), (10, 10), "{t:?}");
        let w = row(WORKLOAD).expect("a row for the workload");
        assert_eq!(w.process_count, 4, "{w:?}");
        assert_eq!(w.thread_count, 4 + 3, "the threads workload's three: {w:?}");
        let forks: u64 = commands
            .iter()
            .filter(|c| c.command.starts_with('['))
            .map(|c| c.process_count)
            .sum();
        assert!(forks >= 207, "{commands:#?}");
        if u.network_bytes_sent.is_some() {
            let sent: u64 = commands.iter().filter_map(|c| c.network_bytes_sent).sum();
            assert!(sent >= 350_000, "{commands:#?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_the_breakdown_leaves_out_is_one_last_row() {
        if tracker().is_none() {
            return;
        }
        let dir = tempdir("pictures-limit");
        let text = run(&dir, &["--json", "--tree-limit", "40"]);
        let u: ResourceUsage = serde_json::from_str(text.trim()).unwrap();
        assert!(u.processes_dropped.is_some_and(|n| n > 0), "{text}");
        let commands = u.commands.clone().expect("commands with --tree");
        let last = commands.last().unwrap();
        assert_eq!(last.command, NOT_IN_BREAKDOWN, "{commands:#?}");
        assert!(
            last.process_count >= u.processes_dropped.unwrap(),
            "{last:?}"
        );
        assert_sums(&u, &commands);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_human_tree_fits_160_columns() {
        if tracker().is_none() {
            return;
        }
        let dir = tempdir("pictures-human");
        let text = run(&dir, &[]);
        let tree_at = text.find("\tProcess tree: ").expect("a tree");
        let table_at = text.find("\tBy command: ").expect("a table under the tree");
        assert!(tree_at < table_at, "{text}");
        for line in text[tree_at..].lines() {
            assert!(columns(line) <= 160, "{} columns: {line:?}", columns(line));
            assert!(
                !line.chars().any(|c| c.is_control() && c != '\t'),
                "{line:?}"
            );
        }
        // Folded: 222 processes in a handful of lines. The four workload processes are
        // siblings of one executable: one line, their children merged below it, the 206
        // forks of `mix` and the TCP peer in one line again.
        let tree: Vec<&str> = text[tree_at..table_at].lines().collect();
        assert!(tree.len() < 30, "{}", tree.join("\n"));
        assert!(
            tree.iter().any(|l| l.contains("10 × /bin/true")),
            "{}",
            tree.join("\n")
        );
        assert!(
            tree.iter().any(|l| l.contains("207 × [")),
            "{}",
            tree.join("\n")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A short real build (`make -j2` of five C files and a link) under `run --json --tree
/// --flamegraph --trace`: the `commands` add up to the totals, the flame graph parses and
/// holds a frame per distinct stack, the trace has one slice per process, and the human
/// tree of the same build fits 160 columns.
mod a_short_real_build {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::common::{self, ebpf_required, host_only, stderr, tracker};

    fn have(tool: &str) -> bool {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn project(dir: &Path) {
        for i in 0..5 {
            std::fs::write(
                dir.join(format!("f{i}.c")),
                format!("int f{i}(int x) {{ int s = 0; for (int k = 0; k < x; k++) s += k * {i}; return s; }}\n"),
            )
            .unwrap();
        }
        std::fs::write(
            dir.join("main.c"),
            "int f0(int);int f1(int);int f2(int);int f3(int);int f4(int);\n\
             int main(void) { return (f0(1) + f1(2) + f2(3) + f3(4) + f4(5)) & 1; }\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("Makefile"),
            "OBJ = f0.o f1.o f2.o f3.o f4.o main.o\nprog: $(OBJ)\n\t$(CC) -o $@ $(OBJ)\n\
             %.o: %.c\n\t$(CC) -O2 -c $< -o $@\n",
        )
        .unwrap();
    }

    #[test]
    fn every_picture_of_a_real_build_holds() {
        if tracker().is_none() || !host_only("a real build's pictures (the guests have no cc)") {
            return;
        }
        if !(have("make") && have("cc")) {
            assert!(
                !ebpf_required(),
                "CI has make and cc: the real build must run"
            );
            eprintln!("SKIPPED: no make or cc here");
            return;
        }
        let dir: PathBuf =
            std::env::temp_dir().join(format!("cylo-usage-real-build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        project(&dir);
        let (report, svg, trace) = (dir.join("r.json"), dir.join("b.svg"), dir.join("b.json"));
        let o = common::cli(&[
            "run",
            "--json",
            "--tree",
            "-o",
            report.to_str().unwrap(),
            "--flamegraph",
            svg.to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
            "--",
            "make",
            "-s",
            "-j2",
            "-C",
            dir.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let u: cylo_usage::ResourceUsage =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let processes = u.processes.as_ref().expect("the breakdown");
        assert!(
            processes.len() >= 13,
            "make, 6 cc, their cc1 and as, a link: {u:?}"
        );
        // By command: the totals, exactly.
        let commands = u.commands.as_ref().expect("commands");
        let sum = |f: fn(&cylo_usage::CommandUsage) -> u64| commands.iter().map(f).sum::<u64>();
        assert_eq!(sum(|c| c.cpu_time_ns), u.cpu_time_ns);
        assert_eq!(sum(|c| c.cpu_user_ns), u.cpu_user_ns);
        assert_eq!(sum(|c| c.cpu_system_ns), u.cpu_system_ns);
        assert_eq!(sum(|c| c.process_count), u.process_count);
        assert_eq!(sum(|c| c.thread_count), u.thread_count);
        assert_eq!(
            commands
                .iter()
                .filter_map(|c| c.disk_bytes_written)
                .sum::<u64>(),
            u.disk_bytes_written.unwrap_or(0)
        );
        assert!(
            commands.iter().any(|c| c.command.ends_with("/make")),
            "{commands:?}"
        );
        // The flame graph: XML, with a frame per distinct stack of processes with CPU time.
        let text = std::fs::read_to_string(&svg).unwrap();
        let options = roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        };
        let doc = roxmltree::Document::parse_with_options(&text, options).expect("the SVG is XML");
        let frames = doc
            .descendants()
            .filter(|n| n.has_tag_name("g") && n.children().any(|c| c.has_tag_name("title")))
            .count();
        let stacks = cylo_usage::folded_stacks(&u, cylo_usage::FlameWeight::Cpu);
        assert!(!stacks.is_empty());
        assert!(
            frames >= stacks.len(),
            "{frames} frames for {} distinct stacks",
            stacks.len()
        );
        // The timeline: one complete slice per process, each with the format's fields.
        let t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
        let events = t["traceEvents"].as_array().expect("traceEvents");
        let slices: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(slices.len(), processes.len());
        for e in &slices {
            for field in ["ts", "dur", "pid", "tid"] {
                assert!(e[field].is_number(), "{field} in {e}");
            }
            assert!(e["name"].is_string(), "{e}");
        }
        // The human tree of the same build.
        let human = dir.join("human.txt");
        let o = common::cli(&[
            "run",
            "--tree",
            "-o",
            human.to_str().unwrap(),
            "--",
            "make",
            "-s",
            "-B",
            "-j2",
            "-C",
            dir.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        for line in std::fs::read_to_string(&human).unwrap().lines() {
            let columns = line.chars().fold(0, |n, c| match c {
                '\t' => (n / 8 + 1) * 8,
                _ => n + 1,
            });
            assert!(columns <= 160, "{columns} columns: {line}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
