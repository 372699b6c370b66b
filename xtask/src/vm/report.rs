//! The matrix report: totals, the summary printed at the end, `target/vm/matrix.md` (tests and
//! features by kernel) and `target/vm/matrix.json`.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::arch::Arch;
use super::binaries::Built;
use super::files::write;
use super::qemu::KernelRun;
use super::results::{BinaryResult, Status};

#[derive(Debug, Default, Serialize)]
pub(super) struct Totals {
    pub(super) passed: usize,
    pub(super) failed: usize,
    ignored: usize,
    /// Kernels that did not boot, did not finish, or timed out.
    broken_kernels: usize,
}

#[derive(Serialize)]
pub(super) struct Report {
    pub(super) arch: Arch,
    pub(super) runs: Vec<KernelRun>,
    pub(super) totals: Totals,
    pub(super) note: Option<String>,
}

impl BinaryResult {
    /// A binary that exited non-zero (or never exited) without any failed test counts once.
    fn silent_failure(&self) -> bool {
        self.exit != Some(0) && !self.tests.iter().any(|t| t.status == Status::Failed)
    }
}

impl KernelRun {
    fn broken(&self) -> bool {
        !self.reached_init || !self.completed || self.timed_out
    }

    fn outcome(&self) -> &'static str {
        if self.timed_out {
            "TIMED OUT"
        } else if !self.reached_init {
            "DID NOT BOOT"
        } else if !self.completed {
            "STOPPED EARLY"
        } else {
            "completed"
        }
    }
}

impl Report {
    pub(super) fn new(arch: Arch, runs: Vec<KernelRun>, built: &Built) -> Self {
        let mut totals = Totals::default();
        for run in &runs {
            if run.broken() {
                totals.broken_kernels += 1;
            }
            for b in &run.binaries {
                for t in &b.tests {
                    match t.status {
                        Status::Passed => totals.passed += 1,
                        Status::Failed => totals.failed += 1,
                        Status::Ignored => totals.ignored += 1,
                    }
                }
                if b.silent_failure() {
                    totals.failed += 1;
                }
            }
        }
        let note = built
            .tests
            .is_empty()
            .then(|| "no test binaries were built".into());
        Self {
            arch,
            runs,
            totals,
            note,
        }
    }

    pub(super) fn ok(&self) -> bool {
        self.totals.failed == 0 && self.totals.broken_kernels == 0
    }

    pub(super) fn print(&self) {
        println!();
        for run in &self.runs {
            let k = &run.kernel;
            let pkg = match (&k.package, &k.version, &k.suite) {
                (Some(p), Some(v), Some(s)) => format!("{p} {v} ({s})"),
                _ => k.vmlinuz.display().to_string(),
            };
            let boot = run
                .boot_seconds
                .map(|b| format!(", boot {b:.1} s"))
                .unwrap_or_default();
            println!(
                "== {} [{}] uname {}: {} in {:.1} s{boot}, -smp {}",
                k.label,
                pkg,
                run.uname.as_deref().unwrap_or("?"),
                run.outcome(),
                run.total_seconds,
                run.smp
            );
            for note in &run.notes {
                println!("   note: {note}");
            }
            for b in &run.binaries {
                let count = |s| b.tests.iter().filter(|t| t.status == s).count();
                println!(
                    "   {}: {} passed, {} failed, {} ignored (exit {})",
                    b.name,
                    count(Status::Passed),
                    count(Status::Failed),
                    count(Status::Ignored),
                    b.exit.map_or("none".to_string(), |c| c.to_string())
                );
                for t in &b.tests {
                    println!("     {:<8} {}", t.status.word(), t.name);
                }
                if b.silent_failure() {
                    println!("     FAILED   (the binary itself: exit {:?})", b.exit);
                }
            }
            println!("   console: {}", run.console_log.display());
        }
        if let Some(n) = &self.note {
            println!("note: {n}");
        }
        self.print_failures();
        println!(
            "vm-test: {} {} kernels ({} broken), {} ignored",
            self.runs.len(),
            self.arch,
            self.totals.broken_kernels,
            self.totals.ignored
        );
    }

    /// Each failed test again, with what it printed, last: a log's tail (CI's) says why.
    fn print_failures(&self) {
        for run in &self.runs {
            for b in &run.binaries {
                for t in b.tests.iter().filter(|t| t.status == Status::Failed) {
                    println!("failed on {}: {} {}", run.kernel.label, b.name, t.name);
                    let end = t
                        .message
                        .iter()
                        .rposition(|l| !l.trim().is_empty())
                        .map_or(0, |i| i + 1);
                    for line in &t.message[..end] {
                        println!("   | {line}");
                    }
                    if end == 0 {
                        println!("   | (no output: the binary died in it, or it hung)");
                    }
                }
            }
        }
    }

    pub(super) fn write(&self, vm_dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        write(&vm_dir.join("matrix.json"), &(json + "\n"))?;
        write(&vm_dir.join("matrix.md"), &self.markdown())
    }

    fn markdown(&self) -> String {
        let mut md = format!("# vm-test matrix ({})\n\n", self.arch);
        md.push_str("| kernel | package | uname | outcome | boot (s) | total (s) | passed | failed | ignored |\n");
        md.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for run in &self.runs {
            let count = |s| {
                run.binaries
                    .iter()
                    .flat_map(|b| &b.tests)
                    .filter(|t| t.status == s)
                    .count()
            };
            let silent = run.binaries.iter().filter(|b| b.silent_failure()).count();
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} |\n",
                run.kernel.label,
                match (&run.kernel.package, &run.kernel.version) {
                    (Some(p), Some(v)) => format!("{p} {v}"),
                    _ => run.kernel.vmlinuz.display().to_string(),
                },
                run.uname.as_deref().unwrap_or("?"),
                run.outcome(),
                run.boot_seconds.map_or("?".into(), |b| format!("{b:.1}")),
                run.total_seconds,
                count(Status::Passed),
                count(Status::Failed) + silent,
                count(Status::Ignored),
            ));
        }

        // Tests: one row per binary/test, one column per kernel.
        let labels: Vec<&str> = self.runs.iter().map(|r| r.kernel.label.as_str()).collect();
        let mut rows: BTreeMap<String, BTreeMap<&str, String>> = BTreeMap::new();
        for run in &self.runs {
            for b in &run.binaries {
                for t in &b.tests {
                    rows.entry(format!("{} :: {}", b.name, t.name))
                        .or_default()
                        .insert(&run.kernel.label, t.status.word().to_string());
                }
                if b.silent_failure() {
                    rows.entry(format!("{} (binary)", b.name))
                        .or_default()
                        .insert(&run.kernel.label, format!("FAILED (exit {:?})", b.exit));
                }
            }
        }
        md.push_str("\n## Tests\n\n");
        table(&mut md, "test", &labels, &rows, "-");

        // Features: flattened JSON, one row per leaf.
        let mut frows: BTreeMap<String, BTreeMap<&str, String>> = BTreeMap::new();
        for run in &self.runs {
            if let Some(f) = &run.features {
                let mut leaves = Vec::new();
                flatten("", f, &mut leaves);
                for (k, v) in leaves {
                    frows.entry(k).or_default().insert(&run.kernel.label, v);
                }
            }
        }
        if !frows.is_empty() {
            md.push_str("\n## Features (`cylo-usage features --json`)\n\n");
            table(&mut md, "feature", &labels, &frows, "?");
        }
        let notes: Vec<_> = self
            .runs
            .iter()
            .flat_map(|r| r.notes.iter().map(move |n| (&r.kernel.label, n)))
            .collect();
        if !notes.is_empty() {
            md.push_str("\n## Notes\n\n");
            for (k, n) in notes {
                md.push_str(&format!("- {k}: {}\n", n.replace('\n', " ")));
            }
        }
        md
    }
}

fn table(
    md: &mut String,
    first: &str,
    labels: &[&str],
    rows: &BTreeMap<String, BTreeMap<&str, String>>,
    missing: &str,
) {
    md.push_str(&format!("| {first} | {} |\n", labels.join(" | ")));
    md.push_str(&format!("| --- |{}\n", " --- |".repeat(labels.len())));
    for (name, cells) in rows {
        let cells: Vec<String> = labels
            .iter()
            .map(|l| cells.get(l).cloned().unwrap_or_else(|| missing.to_string()))
            .collect();
        md.push_str(&format!(
            "| {} | {} |\n",
            md_escape(name),
            md_escape(&cells.join(" | "))
        ));
    }
}

fn md_escape(s: &str) -> String {
    s.replace('\n', " ")
}

/// Flattens the features JSON into `(row, cell)` pairs: objects by dotted keys; a list of
/// records named by `counter`/`name`/`feature`/`id` gives one row per record, its cell
/// `yes`/`no` (from `measured`) followed by its other fields (`how` without a label).
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value;
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    let scalar = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let name_key = |items: &[Value]| {
        ["counter", "name", "feature", "id"]
            .into_iter()
            .find(|k| !items.is_empty() && items.iter().all(|i| i.get(k).is_some()))
    };
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                flatten(&key(k), v, out);
            }
        }
        Value::Array(items) if let Some(nk) = name_key(items) => {
            for item in items {
                let name = scalar(&item[nk]);
                let fields = item.as_object().unwrap();
                let mut parts = Vec::new();
                if let Some(m) = fields.get("measured").and_then(Value::as_bool) {
                    parts.push(if m { "yes" } else { "no" }.to_string());
                }
                for (k, v) in fields {
                    match k.as_str() {
                        k if k == nk || k == "measured" => {}
                        "how" => parts.push(scalar(v)),
                        k => parts.push(format!("{k}: {}", scalar(v))),
                    }
                }
                out.push((key(&name), parts.join(": ").replace('|', "/")));
            }
        }
        other => out.push((prefix.to_string(), scalar(other).replace('|', "/"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_the_features() {
        let features = serde_json::json!({
            "fork": {"how": "raw_tracepoint"},
            "net": false,
            "features": [{"counter": "cpu", "how": "sched_switch", "measured": true}],
        });
        let mut leaves = Vec::new();
        flatten("", &features, &mut leaves);
        assert_eq!(
            leaves,
            [
                ("features.cpu".to_string(), "yes: sched_switch".to_string()),
                ("fork.how".to_string(), "raw_tracepoint".to_string()),
                ("net".to_string(), "false".to_string())
            ]
        );
    }
}
