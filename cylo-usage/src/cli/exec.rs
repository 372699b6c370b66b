//! What a failure to start the command means, said as shells and env(1) say it, with their
//! exit codes.
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};

use cylo_usage::report;

use crate::cli::{EXIT_CANNOT_RUN, EXIT_NOT_FOUND, EXIT_TRACKER_FAILED};

/// The exit code and the one-line message for a failure to start the session.
pub(crate) fn start_error(e: &cylo_usage::Error, program: &OsStr) -> (u8, String) {
    match e.spawn_error() {
        Some(source) => exec_failure(program, source, std::env::var_os("PATH").as_deref()),
        None => (EXIT_TRACKER_FAILED, cylo_usage::error_chain(e)),
    }
}

/// An OS error's text without Rust's " (os error N)".
pub(crate) fn os_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(n) => text
            .strip_suffix(&format!(" (os error {n})"))
            .unwrap_or(&text)
            .to_string(),
        None => text,
    }
}

/// What exec's failure `e` means for `program`, as shells and env(1) say it: the exit code
/// (127 not found, 126 found but not runnable) and the message. A name without a slash was
/// looked up in `path` (`$PATH`).
pub(crate) fn exec_failure(
    program: &OsStr,
    e: &std::io::Error,
    path: Option<&OsStr>,
) -> (u8, String) {
    use std::os::unix::ffi::OsStrExt;
    let stat = |p: &Path| std::fs::metadata(p).ok();
    let name = report::printable(&program.to_string_lossy());
    let file = if program.as_bytes().contains(&b'/') {
        stat(Path::new(program)).map(|m| (PathBuf::from(program), m))
    } else {
        // execvp's search (glibc's default when PATH is unset): an entry that is not there,
        // a directory, or one in a folder this user may not search is not the command.
        let path = path.unwrap_or(OsStr::new("/bin:/usr/bin"));
        let found = path.as_bytes().split(|&b| b == b':').find_map(|dir| {
            let dir = if dir.is_empty() { b".".as_slice() } else { dir };
            let candidate = Path::new(OsStr::from_bytes(dir)).join(program);
            stat(&candidate)
                .filter(|m| !m.is_dir())
                .map(|m| (candidate, m))
        });
        match found {
            Some(found) => Some(found),
            None => return (EXIT_NOT_FOUND, format!("{name}: command not found")),
        }
    };
    match (e.kind(), file) {
        (std::io::ErrorKind::NotFound, None) => {
            (EXIT_NOT_FOUND, format!("{name}: No such file or directory"))
        }
        // The file is there: what it needs to run is not (a script's interpreter, a
        // program's ELF interpreter). 127, as env(1) and timeout(1) give.
        (std::io::ErrorKind::NotFound, Some((file, _))) => {
            // The first line, if it is a `#!` line (the kernel reads no more than 256 bytes).
            let mut head = Vec::new();
            let _ = std::fs::File::open(&file).and_then(|f| f.take(256).read_to_end(&mut head));
            let needed = Some(head).and_then(|head| {
                let line = head.strip_prefix(b"#!")?.split(|&b| b == b'\n').next()?;
                let interpreter = line
                    .split(|b| b.is_ascii_whitespace())
                    .find(|w| !w.is_empty())?;
                Some(report::printable(&String::from_utf8_lossy(interpreter)))
            });
            let what = match needed {
                Some(interpreter) => format!("its interpreter {interpreter} was not found"),
                None => "a file it needs (its ELF interpreter or a library) was not found".into(),
            };
            (EXIT_NOT_FOUND, format!("{name}: cannot run it: {what}"))
        }
        (std::io::ErrorKind::PermissionDenied, Some((_, m))) if m.is_dir() => {
            (EXIT_CANNOT_RUN, format!("{name}: Is a directory"))
        }
        _ => (EXIT_CANNOT_RUN, format!("{name}: {}", os_reason(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::{exec_failure, os_reason};
    use std::ffi::OsStr;

    #[test]
    fn exec_failures_read_as_a_shell_says_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cylo-usage-exec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = dir.join("bin");
        let empty = dir.join("empty");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&empty).unwrap();
        let plain = bin.join("plain");
        std::fs::write(&plain, "data\n").unwrap();
        let script = bin.join("script");
        std::fs::write(&script, "#!/nonexistent/interp -x\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(bin.join("subdir")).unwrap();
        let path = std::env::join_paths([&empty, &bin]).unwrap();
        let enoent = std::io::Error::from_raw_os_error(libc::ENOENT);
        let eacces = std::io::Error::from_raw_os_error(libc::EACCES);
        let check = |program: &OsStr, e: &std::io::Error, want: (u8, &str)| {
            let (code, message) = exec_failure(program, e, Some(&path));
            assert_eq!((code, message.as_str()), want, "{program:?}");
        };
        // Looked up in PATH: nowhere (whatever exec said), a directory of that name is not it.
        check(
            OsStr::new("nope"),
            &enoent,
            (127, "nope: command not found"),
        );
        check(
            OsStr::new("nope"),
            &eacces,
            (127, "nope: command not found"),
        );
        check(
            OsStr::new("subdir"),
            &eacces,
            (127, "subdir: command not found"),
        );
        // Found, not executable; found, its interpreter missing.
        check(
            OsStr::new("plain"),
            &eacces,
            (126, "plain: Permission denied"),
        );
        check(
            OsStr::new("script"),
            &enoent,
            (
                127,
                "script: cannot run it: its interpreter /nonexistent/interp was not found",
            ),
        );
        // Paths: not there; a directory; not executable; another error.
        check(
            OsStr::new("/nonexistent/x"),
            &enoent,
            (127, "/nonexistent/x: No such file or directory"),
        );
        let d = bin.join("subdir");
        let p = plain.as_os_str();
        let shown = |s: &str| format!("{}{s}", p.to_string_lossy());
        check(
            d.as_os_str(),
            &eacces,
            (126, &format!("{}: Is a directory", d.display())),
        );
        check(p, &eacces, (126, &shown(": Permission denied")));
        let enoexec = std::io::Error::from_raw_os_error(libc::ENOEXEC);
        check(p, &enoexec, (126, &shown(": Exec format error")));
        // A name that is not plain text is shown escaped, on one line.
        let (code, message) = exec_failure(OsStr::new("a\nb\\c"), &enoent, Some(&path));
        assert_eq!(
            (code, message.as_str()),
            (127, r"a\nb\\c: command not found")
        );
        // Without PATH: glibc's default.
        let (code, _) = exec_failure(OsStr::new("sh"), &eacces, None);
        assert_eq!(code, 126, "/bin/sh exists");
        assert_eq!(os_reason(&eacces), "Permission denied");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
