//! Where a session's outputs go (the report and the event stream), opened before the session
//! starts, so a destination that cannot be written is refused before anything runs.
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cli::exec::os_reason;

/// Where the report goes: opened before the session starts, written at its end.
pub(crate) enum ReportTo {
    Stderr,
    Stdout,
    File { file: std::fs::File, path: PathBuf },
}

impl ReportTo {
    /// Writes the whole report; the error says where it could not go.
    pub(crate) fn write(&mut self, text: &str) -> Result<(), String> {
        let written = match self {
            ReportTo::Stderr => {
                let mut e = std::io::stderr().lock();
                e.write_all(text.as_bytes()).and_then(|()| e.flush())
            }
            ReportTo::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(text.as_bytes()).and_then(|()| o.flush())
            }
            ReportTo::File { file, .. } => {
                file.write_all(text.as_bytes()).and_then(|()| file.flush())
            }
        };
        written.map_err(|e| {
            format!(
                "cannot write the report to {}: {}",
                self.name(),
                os_reason(&e)
            )
        })
    }

    fn name(&self) -> String {
        match self {
            ReportTo::Stderr => "standard error".to_string(),
            ReportTo::Stdout => "standard output".to_string(),
            ReportTo::File { path, .. } => path.display().to_string(),
        }
    }
}

/// Every output of a session, opened before it starts: a destination that cannot be written
/// is refused before anything runs.
pub(crate) struct Outputs {
    pub(crate) report: ReportTo,
    pub(crate) events: Option<cylo_usage::EventSink>,
    pub(crate) pictures: Pictures,
}

/// The pictures of the breakdown (`--flamegraph`, `--trace`), opened before the session and
/// written at its end.
pub(crate) struct Pictures {
    flamegraph: Option<(std::fs::File, PathBuf)>,
    trace: Option<(std::fs::File, PathBuf)>,
}

impl Pictures {
    /// Writes each picture asked for; what could not be written, one line each.
    pub(crate) fn write(
        self,
        usage: &cylo_usage::ResourceUsage,
        weight: cylo_usage::FlameWeight,
        timeline: Option<&[cylo_usage::TimelineSample]>,
        anchor: &cylo_usage::TraceAnchor,
        title: &str,
    ) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some((mut file, path)) = self.flamegraph {
            let drawn = cylo_usage::flamegraph_svg(usage, weight, title)
                .map_err(|e| cylo_usage::error_chain(&e))
                .and_then(|svg| {
                    file.write_all(&svg)
                        .and_then(|()| file.flush())
                        .map_err(|e| os_reason(&e))
                });
            if let Err(e) = drawn {
                warnings.push(format!("no flame graph in {}: {e}", path.display()));
            }
        }
        if let Some((mut file, path)) = self.trace {
            let trace = cylo_usage::chrome_trace(usage, timeline.unwrap_or(&[]), Some(anchor));
            let written = serde_json::to_writer(&mut file, &trace)
                .map_err(std::io::Error::other)
                .and_then(|()| file.write_all(b"\n"))
                .and_then(|()| file.flush());
            if let Err(e) = written {
                warnings.push(format!(
                    "no timeline in {}: {}",
                    path.display(),
                    os_reason(&e)
                ));
            }
        }
        warnings
    }
}

pub(crate) fn create(path: &Path, what: &str) -> Result<std::fs::File, String> {
    std::fs::File::create(path).map_err(|e| {
        format!(
            "cannot write {what} to {}: {}",
            path.display(),
            os_reason(&e)
        )
    })
}

impl Outputs {
    /// `attach` has no command output to share stdout with: its report goes there unless `-o`
    /// says otherwise or the events do (`--events -`); `run`'s goes to stderr, as `time -v`'s.
    pub(crate) fn open(
        output: Option<&Path>,
        events: Option<&Path>,
        attach: bool,
        flamegraph: Option<&Path>,
        trace: Option<&Path>,
    ) -> Result<Outputs, String> {
        let stdout = |p: &Path| p.as_os_str() == "-";
        let events_path = events;
        if let (Some(o), Some(e)) = (output, events)
            && stdout(o)
            && stdout(e)
        {
            return Err(
                "-o - and --events - cannot both write to standard output: send one to a file"
                    .to_string(),
            );
        }
        let report = match output {
            None if attach && !events.is_some_and(stdout) => ReportTo::Stdout,
            None => ReportTo::Stderr,
            Some(p) if stdout(p) => ReportTo::Stdout,
            Some(p) => ReportTo::File {
                file: create(p, "the report")?,
                path: p.to_path_buf(),
            },
        };
        let events: Option<cylo_usage::EventSink> = match events {
            None => None,
            Some(p) if stdout(p) => Some(Box::new(std::io::BufWriter::new(std::io::stdout()))),
            Some(p) => {
                let file = create(p, "events")?;
                if let ReportTo::File { file: r, .. } = &report
                    && same_file(r, &file)
                {
                    return Err(format!(
                        "-o and --events name the same file ({}): the report and the events \
                         would overwrite each other",
                        p.display()
                    ));
                }
                Some(Box::new(std::io::BufWriter::new(file)))
            }
        };
        // The pictures: files of their own, never one of the outputs above (nor each other).
        let mut opened: Vec<(&str, std::fs::File, PathBuf)> = Vec::new();
        for (what, path) in [("--flamegraph", flamegraph), ("--trace", trace)] {
            let Some(p) = path else { continue };
            if stdout(p) {
                return Err(format!("{what} needs a file, not standard output"));
            }
            let file = create(p, what)?;
            let clash = match &report {
                ReportTo::File { file: r, .. } => same_file(r, &file),
                _ => false,
            } || events_path.is_some_and(|e| !stdout(e) && same_path(e, p))
                || opened.iter().any(|(_, f, _)| same_file(f, &file));
            if clash {
                return Err(format!(
                    "{what} names a file another output writes ({}): they would overwrite each \
                     other",
                    p.display()
                ));
            }
            opened.push((what, file, p.to_path_buf()));
        }
        let mut pictures = Pictures {
            flamegraph: None,
            trace: None,
        };
        for (what, file, path) in opened {
            if what == "--flamegraph" {
                pictures.flamegraph = Some((file, path));
            } else {
                pictures.trace = Some((file, path));
            }
        }
        Ok(Outputs {
            report,
            events,
            pictures,
        })
    }
}

/// Whether two paths name the same existing file.
fn same_path(a: &Path, b: &Path) -> bool {
    match (std::fs::File::open(a), std::fs::File::open(b)) {
        (Ok(a), Ok(b)) => same_file(&a, &b),
        _ => false,
    }
}

/// Whether two open files are the same file (and a regular one: two openings of a terminal or
/// a pipe share it without harm).
pub(crate) fn same_file(a: &std::fs::File, b: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.is_file() && a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
