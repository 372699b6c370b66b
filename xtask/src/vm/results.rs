//! Reading a guest's serial console: the `/init` markers and libtest's output in between,
//! into per-binary, per-test results.
use serde::Serialize;

use super::MARK;

#[derive(Debug, Serialize)]
pub(super) struct BinaryResult {
    pub(super) name: String,
    pub(super) exit: Option<i32>,
    pub(super) tests: Vec<TestResult>,
    /// libtest's `test result:` line.
    pub(super) summary: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct TestResult {
    pub(super) name: String,
    pub(super) status: Status,
    /// What libtest printed of a failed test (its `---- NAME stdout ----` section: the panic
    /// message and what the test wrote), at most [`MESSAGE_LINES`] lines.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) message: Vec<String>,
}

/// How many lines of a failed test's output the report keeps.
pub(super) const MESSAGE_LINES: usize = 24;

impl TestResult {
    fn new(name: String, status: Status) -> Self {
        TestResult {
            name,
            status,
            message: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Status {
    Passed,
    Failed,
    Ignored,
}

impl Status {
    pub(super) fn word(self) -> &'static str {
        match self {
            Status::Passed => "ok",
            Status::Failed => "FAILED",
            Status::Ignored => "ignored",
        }
    }
}

#[derive(Default)]
pub(super) struct Parsed {
    pub(super) uname: Option<String>,
    pub(super) reached_init: bool,
    pub(super) completed: bool,
    pub(super) notes: Vec<String>,
    pub(super) binaries: Vec<BinaryResult>,
    pub(super) features: Option<serde_json::Value>,
}

/// One console line without its line ending; a marker line loses whatever precedes the marker
/// (SeaBIOS leaves terminal escapes on the line where /init starts printing).
pub(super) fn clean_line(raw: &str) -> String {
    let line = raw.trim_end_matches(['\r', '\n']);
    match line.find(MARK) {
        Some(i) => line[i..].to_string(),
        None => line.to_string(),
    }
}

/// A kernel message of `line` that says something went wrong, without its timestamp and
/// with its varying numbers left as they are (`soft lockup - CPU#1 stuck for 26s!`).
fn kernel_report(line: &str) -> Option<&str> {
    const SIGNS: [&str; 5] = [
        "BUG: ",
        "WARNING: CPU: ",
        "rcu: INFO: ",
        "INFO: task ",
        "Kernel panic",
    ];
    let at = SIGNS.iter().filter_map(|s| line.find(s)).min()?;
    let report = line[at..].trim();
    // The first words name the problem; the rest (seconds stuck, pids) varies.
    Some(match report.find(" stuck for ") {
        Some(i) => &report[..i],
        None => report,
    })
}

/// Parses the serial console: markers from `/init` and libtest's output in between.
pub(super) fn parse_console(lines: &[String], timed_out: bool) -> Parsed {
    let mut p = Parsed::default();
    let mut current: Option<BinaryResult> = None;
    // A `test NAME ... ` line whose result has not been printed yet.
    let mut pending: Option<String> = None;
    let mut features: Option<String> = None;
    // The test of the current binary whose failure output is being read.
    let mut section: Option<usize> = None;
    for line in lines {
        if let Some(rest) = line.strip_prefix(MARK) {
            let rest = rest.trim();
            let (word, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            match word {
                "init" => {
                    p.reached_init = true;
                    p.uname = Some(arg.to_string());
                }
                "note" => p.notes.push(arg.to_string()),
                "features-begin" => features = Some(String::new()),
                "features-end" => {
                    if let Some(text) = features.take() {
                        p.features = Some(
                            serde_json::from_str(text.trim())
                                .unwrap_or(serde_json::Value::String(text)),
                        );
                    }
                }
                "begin" => {
                    section = None;
                    current = Some(BinaryResult {
                        name: arg.to_string(),
                        exit: None,
                        tests: Vec::new(),
                        summary: None,
                    });
                }
                "end" => {
                    if let Some(mut b) = current.take() {
                        b.exit = arg
                            .rsplit_once("exit=")
                            .and_then(|(_, c)| c.trim().parse().ok());
                        if let Some(name) = pending.take() {
                            // The binary died inside this test.
                            b.tests.push(TestResult::new(name, Status::Failed));
                        }
                        p.binaries.push(b);
                    }
                }
                "done" => p.completed = true,
                _ => {}
            }
            continue;
        }
        if let Some(text) = features.as_mut() {
            text.push_str(line);
            text.push('\n');
            continue;
        }
        if let Some(report) = kernel_report(line)
            && !p.notes.iter().any(|n| n.ends_with(report))
            && p.notes.len() < 16
        {
            // What the guest kernel said went wrong (a lockup, a stall, a splat): the first
            // of each, so that a hung guest says why.
            p.notes.push(format!("the guest kernel: {report}"));
        }
        let Some(b) = current.as_mut() else { continue };
        // libtest's failures section: `---- NAME stdout ----`, then what the test printed
        // and its panic message, until the next section or the list of failures.
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|r| r.strip_suffix(" stdout ----"))
        {
            section = b.tests.iter().position(|t| t.name == name);
            continue;
        }
        if line == "failures:" || line.starts_with("test result:") {
            section = None;
        }
        if let Some(i) = section {
            let message = &mut b.tests[i].message;
            if message.len() < MESSAGE_LINES && !(message.is_empty() && line.trim().is_empty()) {
                message.push(line.clone());
            }
            continue;
        }
        if line.starts_with("test result:") {
            b.summary = Some(line.clone());
        } else if let Some(rest) = line.strip_prefix("test ")
            && let Some((name, result)) = rest.rsplit_once(" ...")
        {
            let name = name.trim_end_matches(" - should panic").trim().to_string();
            let result = result.trim();
            let status = if result.starts_with("ok") {
                Status::Passed
            } else if result.starts_with("FAILED") {
                Status::Failed
            } else if result.starts_with("ignored") {
                Status::Ignored
            } else {
                pending = Some(name);
                continue;
            };
            pending = None;
            b.tests.push(TestResult::new(name, status));
        } else if let Some(name) = pending.take() {
            // Output interleaved with a test line (e.g. a kernel message); the result may
            // follow on its own line.
            let word = line.trim();
            let status = match word {
                "ok" => Some(Status::Passed),
                "FAILED" => Some(Status::Failed),
                w if w.starts_with("ignored") => Some(Status::Ignored),
                _ => None,
            };
            match status {
                Some(status) => b.tests.push(TestResult::new(name, status)),
                None => pending = Some(name),
            }
        }
    }
    if let Some(mut b) = current.take() {
        if let Some(name) = pending.take() {
            b.tests.push(TestResult::new(name, Status::Failed));
        }
        p.notes.push(format!(
            "{} did not finish ({})",
            b.name,
            if timed_out {
                "timed out"
            } else {
                "the guest stopped"
            }
        ));
        p.binaries.push(b);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    #[test]
    fn parses_libtest_output_and_markers() {
        let log = lines(
            "[    0.5] noise\n\
             Booting from ROM..\x1bc\x1b[?7l\x1b[2J@@vm-test@@ init 6.1.0-56-cloud-amd64\r\n\
             @@vm-test@@ note no cgroup v1 controller blkio\n\
             @@vm-test@@ features-begin\n\
             {\"fork\": {\"how\": \"raw_tracepoint\"}, \"net\": false, \"features\": \n\
             [{\"counter\": \"cpu\", \"how\": \"sched_switch\", \"measured\": true}]}\n\
             @@vm-test@@ features-end\n\
             @@vm-test@@ begin pkg/tests/e2e\n\
             running 4 tests\n\
             test a::one ... ok\n\
             test a::two ... FAILED\n\
             test a::three ... ignored, needs root\n\
             test a::four - should panic ... ok\n\
             \n\
             failures:\n\
             \n\
             ---- a::two stdout ----\n\
             Spawn: user 5 ns (wait4 7)\n\
             \n\
             thread 'a::two' panicked at tests/e2e.rs:9:5:\n\
             user 5 vs wait4 7\n\
             \n\
             failures:\n\
             a::two\n\
             \n\
             test result: FAILED. 2 passed; 1 failed; 1 ignored\n\
             @@vm-test@@ end pkg/tests/e2e exit=101\n\
             @@vm-test@@ begin pkg\n\
             test crashes ... \n\
             @@vm-test@@ end pkg exit=139\n\
             @@vm-test@@ begin pkg/tests/hang\n\
             test hangs ... ",
        );
        let log: Vec<String> = log.iter().map(|l| clean_line(l)).collect();
        let p = parse_console(&log, true);
        assert!(p.reached_init && !p.completed);
        assert_eq!(p.uname.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(p.notes[0], "no cgroup v1 controller blkio");
        assert_eq!(p.binaries.len(), 3);
        let e2e = &p.binaries[0];
        assert_eq!(e2e.exit, Some(101));
        let got: Vec<_> = e2e
            .tests
            .iter()
            .map(|t| (t.name.as_str(), t.status))
            .collect();
        assert_eq!(
            got,
            [
                ("a::one", Status::Passed),
                ("a::two", Status::Failed),
                ("a::three", Status::Ignored),
                ("a::four", Status::Passed)
            ]
        );
        assert_eq!(
            e2e.tests[1].message,
            [
                "Spawn: user 5 ns (wait4 7)",
                "",
                "thread 'a::two' panicked at tests/e2e.rs:9:5:",
                "user 5 vs wait4 7",
                "",
            ]
        );
        assert!(e2e.tests[0].message.is_empty());
        assert_eq!(p.binaries[1].tests[0].status, Status::Failed);
        assert_eq!(p.binaries[2].exit, None);
        assert_eq!(p.binaries[2].tests[0].status, Status::Failed);
        let features = p.features.unwrap();
        assert_eq!(features["fork"]["how"], "raw_tracepoint");
        assert_eq!(features["features"][0]["counter"], "cpu");
    }

    #[test]
    fn a_hung_guest_says_what_its_kernel_reported() {
        let p = parse_console(
            &lines(
                "@@vm-test@@ begin x\n\
                 test a ... [  716.8] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [cylo-usage:18245]\n\
                 [  744.8] watchdog: BUG: soft lockup - CPU#0 stuck for 52s! [cylo-usage:18245]\n",
            ),
            true,
        );
        assert_eq!(
            p.notes[0], "the guest kernel: BUG: soft lockup - CPU#0",
            "{:?}",
            p.notes
        );
        assert_eq!(p.notes.len(), 2, "{:?}", p.notes);
        assert_eq!(p.binaries[0].tests[0].status, Status::Failed);
    }
}
