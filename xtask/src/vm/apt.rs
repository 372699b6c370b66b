//! Debian's archives through a private apt configuration (the system's sources stay
//! untouched): the system's mirror, `apt-get update` per suite, resolving a suite's kernel
//! package, downloading it and unpacking it into the kernel cache.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

use super::arch::Arch;
use super::files::{copy, find_file, write_if_changed};
use super::modules::{MODULES_STAMP, modules_stamp, stage_modules};
use crate::cmd::{output, run_quiet};

/// `s` as a file-name part: anything but ASCII letters, digits and `._+-` becomes `_`.
pub(super) fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Apt metadata younger than this is reused without `apt-get update`.
const APT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// One archive of the system's apt sources: its URI and the raw `Signed-By` value.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Source {
    uri: String,
    signed_by: Option<String>,
}

/// The system's Debian archives: the main one and, when configured, the security one.
#[derive(Debug)]
pub(super) struct Mirror {
    main: Source,
    pub(super) security: Option<Source>,
}

pub(super) fn system_mirror() -> Result<Mirror> {
    let deb822 = Path::new("/etc/apt/sources.list.d/debian.sources");
    let one_line = Path::new("/etc/apt/sources.list");
    if let Ok(text) = fs::read_to_string(deb822)
        && let Some(m) = pick_mirror(parse_deb822_sources(&text))
    {
        return Ok(m);
    }
    if let Ok(text) = fs::read_to_string(one_line)
        && let Some(m) = pick_mirror(parse_one_line_sources(&text))
    {
        return Ok(m);
    }
    bail!(
        "found no Debian mirror in {} or {}",
        deb822.display(),
        one_line.display()
    )
}

/// The first main and the first security archive among `(source, is_security)`.
fn pick_mirror(sources: Vec<(Source, bool)>) -> Option<Mirror> {
    let main = sources.iter().find(|(_, sec)| !sec)?.0.clone();
    let security = sources.into_iter().find(|(_, sec)| *sec).map(|(s, _)| s);
    Some(Mirror { main, security })
}

fn is_security(uri: &str, suite: &str) -> bool {
    uri.contains("security") || suite.contains("security")
}

/// Enabled `deb` stanzas of a deb822 sources file.
fn parse_deb822_sources(text: &str) -> Vec<(Source, bool)> {
    let mut stanzas: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in text.lines() {
        if line.trim().is_empty() {
            if !stanzas.last().unwrap().is_empty() {
                stanzas.push(Vec::new());
            }
        } else if line.starts_with('#') {
            continue;
        } else if line.starts_with([' ', '\t']) {
            // Continuation line (e.g. an inline Signed-By key): keep it verbatim.
            if let Some((_, v)) = stanzas.last_mut().unwrap().last_mut() {
                v.push('\n');
                v.push_str(line);
            }
        } else if let Some((k, v)) = line.split_once(':') {
            stanzas
                .last_mut()
                .unwrap()
                .push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut out = Vec::new();
    for stanza in stanzas {
        let get = |k: &str| {
            stanza
                .iter()
                .find(|(kk, _)| kk == k)
                .map(|(_, v)| v.clone())
        };
        let types = get("types").unwrap_or_default();
        let uri = get("uris").and_then(|u| u.split_whitespace().next().map(str::to_string));
        let suites = get("suites").unwrap_or_default();
        let enabled = get("enabled").is_none_or(|e| e != "no");
        if !enabled || !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        let Some(uri) = uri else { continue };
        let security = is_security(&uri, &suites);
        let signed_by = get("signed-by");
        out.push((Source { uri, signed_by }, security));
    }
    out
}

/// `deb` lines of a one-line-style sources.list.
fn parse_one_line_sources(text: &str) -> Vec<(Source, bool)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim();
        let (opts, rest) = match rest.strip_prefix('[') {
            Some(r) => match r.split_once(']') {
                Some(x) => x,
                None => continue,
            },
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        let signed_by = opts
            .split_whitespace()
            .find_map(|o| o.strip_prefix("signed-by="))
            .map(str::to_string);
        let source = Source {
            uri: uri.to_string(),
            signed_by,
        };
        out.push((source, is_security(uri, suite)));
    }
    out
}

/// A private apt configuration for one suite and architecture, kept under
/// `<cache>/apt/<suite>` (each architecture has a cache of its own, see [`Arch::vm_dir`]).
pub(super) struct AptSuite {
    pub(super) suite: String,
    pub(super) arch: Arch,
    pub(super) dir: PathBuf,
    /// The deb822 sources this configuration reads; the `updated` stamp holds the sources its
    /// lists were fetched for.
    pub(super) sources: String,
}

impl AptSuite {
    /// `with_security` adds `<suite>-security` from the system's security archive.
    pub(super) fn new(
        cache: &Path,
        suite: &str,
        arch: Arch,
        mirror: &Mirror,
        with_security: bool,
    ) -> Result<Self> {
        let dir = cache.join("apt").join(suite);
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "sources.list.d",
            "preferences.d",
        ] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let stanza = |source: &Source, suite: &str| {
            let mut s = format!(
                "Types: deb\nURIs: {}\nSuites: {suite}\nComponents: main\n",
                source.uri
            );
            if let Some(key) = &source.signed_by {
                s.push_str(&format!("Signed-By: {key}\n"));
            }
            s
        };
        let mut sources = stanza(&mirror.main, suite);
        if with_security && let Some(sec) = &mirror.security {
            sources.push('\n');
            sources.push_str(&stanza(sec, &format!("{suite}-security")));
        }
        write_if_changed(&dir.join("sources.list.d/vm.sources"), sources.as_bytes())?;
        write_if_changed(&dir.join("sources.list"), b"")?;
        write_if_changed(&dir.join("status"), b"")?;
        Ok(Self {
            suite: suite.to_string(),
            arch,
            dir,
            sources,
        })
    }

    fn command(&self, tool: &str) -> Command {
        let d = |s: &str| self.dir.join(s).display().to_string();
        let mut cmd = Command::new(tool);
        let mut opts = vec![
            ("Dir::Etc::SourceList".to_string(), d("sources.list")),
            ("Dir::Etc::SourceParts".to_string(), d("sources.list.d")),
            ("Dir::Etc::Preferences".to_string(), d("preferences")),
            ("Dir::Etc::PreferencesParts".to_string(), d("preferences.d")),
            ("Dir::State::Lists".to_string(), d("lists")),
            ("Dir::State::status".to_string(), d("status")),
            ("Dir::Cache".to_string(), d("cache")),
            ("APT::Sandbox::User".to_string(), "root".to_string()),
            // The guest's architecture alone, whatever the host's.
            (
                "APT::Architecture".to_string(),
                self.arch.debian().to_string(),
            ),
            (
                "APT::Architectures".to_string(),
                self.arch.debian().to_string(),
            ),
        ];
        // Only the package lists are needed, not AppStream metadata or icons.
        for t in [
            "DEP-11",
            "DEP-11-icons",
            "DEP-11-icons-small",
            "DEP-11-icons-large",
            "DEP-11-icons-hidpi",
            "DEP-11-icons-large-hidpi",
        ] {
            opts.push((
                format!("Acquire::IndexTargets::deb::{t}::DefaultEnabled"),
                "false".into(),
            ));
        }
        for (k, v) in opts {
            cmd.arg("-o").arg(format!("{k}={v}"));
        }
        cmd
    }

    /// `apt-get update` unless the lists are recent; falls back to stale lists when offline.
    pub(super) fn update(&self, refresh: bool) -> Result<()> {
        let stamp = self.dir.join("updated");
        let age = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        let same_sources = fs::read_to_string(&stamp).is_ok_and(|s| s == self.sources);
        if !refresh && same_sources && age.is_some_and(|a| a < APT_MAX_AGE) {
            return Ok(());
        }
        eprintln!("vm-test: apt-get update for {}", self.suite);
        match run_quiet(self.command("apt-get").arg("update")) {
            Ok(()) => fs::write(&stamp, &self.sources)
                .with_context(|| format!("writing {}", stamp.display())),
            Err(e) if age.is_some() => {
                eprintln!(
                    "vm-test: {e:#}\nvm-test: using the cached {} lists",
                    self.suite
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The kernel package the suite's meta-package `meta` depends on, and its version.
    pub(super) fn resolve(&self, meta: &str) -> Result<(String, String)> {
        let out = output(self.command("apt-cache").args(["depends", meta]))?;
        let package = out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(|p| p.trim().trim_matches(|c| c == '<' || c == '>'))
            .find(|p| p.starts_with("linux-image-"))
            .with_context(|| {
                format!(
                    "`apt-cache depends {meta}` in {} ({}) names no linux-image",
                    self.suite, self.arch
                )
            })?
            .to_string();
        let version = self.version(&package)?;
        Ok((package, version))
    }

    /// The candidate version of `package`.
    pub(super) fn version(&self, package: &str) -> Result<String> {
        let show = output(
            self.command("apt-cache")
                .args(["show", "--no-all-versions", package]),
        )?;
        show.lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_string())
            .with_context(|| {
                format!(
                    "`apt-cache show {package}` in {} ({}) gave no version",
                    self.suite, self.arch
                )
            })
    }

    /// `package` at `version` for the suite's architecture, downloaded once into
    /// `<cache>/debs`; returns the kept `.deb`.
    pub(super) fn download(&self, cache: &Path, package: &str, version: &str) -> Result<PathBuf> {
        let debs = cache.join("debs");
        fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        // apt-get download names the file `<package>_<version, ':' as %3a>_<arch>.deb`.
        let deb_name = format!(
            "{package}_{}_{}.deb",
            version.replace(':', "%3a"),
            self.arch.debian()
        );
        let kept = debs.join(&deb_name);
        if kept.is_file() {
            return Ok(kept);
        }
        let tmp = debs.join("partial");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        eprintln!(
            "vm-test: downloading {package} {version} ({}, {})",
            self.suite, self.arch
        );
        run_quiet(
            self.command("apt-get")
                .args(["download", &format!("{package}={version}")])
                .current_dir(&tmp),
        )?;
        let deb = find_file(&tmp, |n| n.ends_with(".deb"))?.with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                tmp.display()
            )
        })?;
        fs::rename(&deb, &kept)
            .with_context(|| format!("moving {} to {}", deb.display(), kept.display()))?;
        let _ = fs::remove_dir_all(&tmp);
        Ok(kept)
    }

    /// Downloads and unpacks the kernel once; returns the cached vmlinuz and the staged
    /// modules for the scratch disk (see [`stage_modules`]).
    pub(super) fn fetch_kernel(
        &self,
        cache: &Path,
        package: &str,
        version: &str,
    ) -> Result<(PathBuf, PathBuf)> {
        let dir = cache
            .join("kernels")
            .join(sanitize(&format!("{package}_{version}")));
        let vmlinuz = dir.join("vmlinuz");
        let modules = dir.join("modules");
        if vmlinuz.is_file()
            && fs::read_to_string(modules.join(MODULES_STAMP)).ok() == Some(modules_stamp())
        {
            return Ok((vmlinuz, modules));
        }
        let kept = self.download(cache, package, version)?;
        let tmp = cache.join("tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let unpacked = tmp.join("root");
        run_quiet(Command::new("dpkg-deb").arg("-x").arg(&kept).arg(&unpacked))?;
        let boot = unpacked.join("boot");
        let image = find_file(&boot, |n| n.starts_with("vmlinuz-"))?
            .with_context(|| format!("{} holds no boot/vmlinuz-*", kept.display()))?;
        let staging = dir.with_extension("partial");
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
        copy_kernel_image(&image, &staging.join("vmlinuz"))?;
        if let Some(config) = find_file(&boot, |n| n.starts_with("config-"))? {
            copy(&config, &staging.join("config"))?;
        }
        let summary = stage_modules(&unpacked, &staging.join("modules"))
            .with_context(|| format!("staging the kernel modules of {}", kept.display()))?;
        eprintln!("vm-test: {package}: {summary}");
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&staging, &dir)
            .with_context(|| format!("moving {} to {}", staging.display(), dir.display()))?;
        let _ = fs::remove_dir_all(&tmp);
        Ok((vmlinuz, modules))
    }
}

/// Copies a kernel image for qemu's `-kernel`: a gzip-compressed one (Debian's arm64
/// `vmlinuz` is a gzipped `Image`) or an EFI zboot one (a PE file whose payload is the
/// compressed `Image`) is stored decompressed, as qemu boots an arm64 `Image` directly; any
/// other (an x86 bzImage) as it is.
fn copy_kernel_image(src: &Path, dst: &Path) -> Result<()> {
    let bytes = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    let (payload, tool) = match kernel_compression(&bytes) {
        Some(found) => found,
        None => return copy(src, dst),
    };
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool} -dc for {}", src.display()))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let data = payload.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {tool} -dc"))?;
    // gzip stops reading at the end of its stream: trailing padding is not an error.
    let _ = writer.join();
    if !out.status.success() || out.stdout.is_empty() {
        bail!("{tool} -dc of {} failed ({})", src.display(), out.status);
    }
    fs::write(dst, &out.stdout).with_context(|| format!("writing {}", dst.display()))
}

/// The compressed payload of a kernel image and the tool that decompresses it, for a gzip
/// file or an EFI zboot image (`MZ`, `zimg`, payload offset and size, compression name);
/// None for an image to boot as it is.
fn kernel_compression(bytes: &[u8]) -> Option<(&[u8], &'static str)> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Some((bytes, "gzip"));
    }
    if bytes.len() < 64 || &bytes[..2] != b"MZ" || &bytes[4..8] != b"zimg" {
        return None;
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let (offset, size) = (word(8), word(12));
    let payload = bytes.get(offset..offset.checked_add(size)?)?;
    let kind = &bytes[24..32];
    let tool = if kind.starts_with(b"gzip") {
        "gzip"
    } else if kind.starts_with(b"zstd") {
        "zstd"
    } else if kind.starts_with(b"xzkern") || kind.starts_with(b"xz") {
        "xz"
    } else {
        return None;
    };
    Some((payload, tool))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mirror() {
        let deb822 = "Types: deb\n# comment\nURIs: http://deb.debian.org/debian\n\
                      Suites: bookworm bookworm-updates\nComponents: main\n\
                      Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        let m = pick_mirror(parse_deb822_sources(deb822)).unwrap();
        assert_eq!(m.main.uri, "http://deb.debian.org/debian");
        assert_eq!(
            m.main.signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
        assert_eq!(
            m.security.map(|s| s.uri).as_deref(),
            Some("http://deb.debian.org/debian-security")
        );
        let one = "deb http://security.debian.org/ bookworm-security main\n\
                   deb [arch=amd64 signed-by=/k.gpg] http://ftp.de.debian.org/debian bookworm main\n";
        let m = pick_mirror(parse_one_line_sources(one)).unwrap();
        assert_eq!(m.main.uri, "http://ftp.de.debian.org/debian");
        assert_eq!(m.main.signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(m.security.unwrap().uri, "http://security.debian.org/");
    }

    #[test]
    fn finds_compressed_kernel_payloads() {
        let gz = [0x1f, 0x8b, 8, 0, 1, 2, 3];
        assert_eq!(kernel_compression(&gz), Some((&gz[..], "gzip")));
        // An x86 bzImage (a PE file too) and a plain arm64 Image boot as they are.
        let mut pe = vec![0u8; 128];
        pe[..2].copy_from_slice(b"MZ");
        assert_eq!(kernel_compression(&pe), None);
        // EFI zboot: the payload at the offset and size it names.
        pe[4..8].copy_from_slice(b"zimg");
        pe[8..12].copy_from_slice(&64u32.to_le_bytes());
        pe[12..16].copy_from_slice(&16u32.to_le_bytes());
        pe[24..28].copy_from_slice(b"zstd");
        assert_eq!(kernel_compression(&pe), Some((&pe[64..80], "zstd")));
        pe[12..16].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(kernel_compression(&pe), None, "a payload past the end");
    }
}
