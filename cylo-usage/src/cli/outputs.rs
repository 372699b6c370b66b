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
    ) -> Result<Outputs, String> {
        let stdout = |p: &Path| p.as_os_str() == "-";
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
        Ok(Outputs { report, events })
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
