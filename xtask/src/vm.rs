//! `cargo xtask vm-test`: boot other kernels under qemu (TCG) and run the test suite in each.
//!
//! Steps:
//! 1. Host tools: `qemu-system-x86_64`, a static `/bin/busybox`, `mkfs.ext4` and `xz`, installed
//!    from Debian's packages when missing.
//! 2. Kernels: Debian's cloud kernels (5.10 bullseye, 6.1 bookworm, 6.12 trixie), resolved from
//!    each suite's `linux-image-cloud-amd64` meta-package with a private apt configuration (the
//!    system's sources stay untouched), downloaded once into `target/vm/cache/`.
//! 3. Test binaries: the workspace's tests and the `cylo-usage` binary, built static (glibc
//!    `crt-static`) into `target/vm/build`.
//! 4. One initramfs: static busybox, the binaries (cylo-usage at the same absolute path as on the
//!    host, since tests find it through `env!("CARGO_BIN_EXE_cylo-usage")`), each kernel's
//!    virtio modules under `/lib/modules/<release>`, and an `/init` that mounts what the tests
//!    need (the scratch disk `/dev/vda` on `/mnt/disk` for the disk tests), runs every test
//!    binary and powers off.
//! 5. Per kernel: a fresh sparse ext4 scratch disk `target/vm/<kernel>/disk.img` (mkfs.ext4,
//!    from e2fsprogs), boot, capture the serial console to `target/vm/<kernel>/console.log`,
//!    parse libtest's output, and write `target/vm/matrix.md` and `target/vm/matrix.json`.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::cmd::{output, run_quiet};
use crate::paths::{self, workspace_root};

/// Prefix of every line the guest's `/init` prints for the host to parse.
const MARK: &str = "@@vm-test@@";
/// The target the test binaries are built for (explicit, so build scripts stay dynamic).
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Apt metadata younger than this is reused without `apt-get update`.
const APT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Where the guest puts the test binaries.
const GUEST_TEST_DIR: &str = "vm-test/bin";
/// Where the guest mounts its scratch disk (`/dev/vda`, ext4) for the disk tests.
const GUEST_DISK_DIR: &str = "/mnt/disk";
/// Size of each guest's scratch disk (a sparse file, formatted ext4 before each boot).
const DISK_BYTES: u64 = 512 << 20;
/// Data folders of each package copied into the guest at the same absolute path (fixtures).
const DATA_DIRS: &[&str] = &["tests", "fixtures", "testdata"];
/// Upper bound for the fixtures copied into the initramfs.
const MAX_DATA_BYTES: u64 = 64 << 20;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Kernels to boot: `5.10`, `6.1`, `6.12` (Debian cloud kernels) or a path to a vmlinuz.
    /// Repeatable; default: all three Debian kernels.
    #[arg(long = "kernel", value_name = "NAME", num_args = 1..)]
    kernels: Vec<String>,
    /// Seconds allowed per kernel for boot plus the whole suite (TCG is ~10x slower than KVM).
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    timeout: u64,
    /// Virtual CPUs per guest (retried with 1 when a guest does not reach /init).
    #[arg(long, default_value_t = 2)]
    smp: u32,
    /// Guest memory (qemu `-m`).
    #[arg(long, default_value = "2G")]
    memory: String,
    /// Run `apt-get update` for the kernel suites even if the cached lists are recent.
    #[arg(long)]
    refresh: bool,
    /// Echo the whole serial console, not just progress lines.
    #[arg(long, short)]
    verbose: bool,
    /// Arguments for every test binary (e.g. a test name filter), after `--`.
    #[arg(last = true, value_name = "TEST_ARGS")]
    test_args: Vec<String>,
}

/// A Debian kernel series and the suites that carry it, in order of preference.
struct Series {
    label: &'static str,
    suites: &'static [&'static str],
}

const SERIES: &[Series] = &[
    Series {
        label: "5.10",
        suites: &["bullseye"],
    },
    Series {
        label: "6.1",
        suites: &["bookworm"],
    },
    Series {
        label: "6.12",
        suites: &["trixie", "bookworm-backports"],
    },
];

const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// A kernel ready to boot.
#[derive(Debug, Clone, Serialize)]
struct Kernel {
    /// Short name: `6.1`, or the file name of a vmlinuz given by path.
    label: String,
    /// Debian package and version, suite (None for a vmlinuz given by path).
    package: Option<String>,
    version: Option<String>,
    suite: Option<String>,
    vmlinuz: PathBuf,
    /// Staged kernel modules for the scratch disk (`lib/modules/<release>/...` below it),
    /// copied into the initramfs; None for a vmlinuz given by path.
    modules: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let root = workspace_root();
    let vm_dir = paths::vm_dir();
    let cache = vm_dir.join("cache");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;

    ensure_host_tools()?;
    let kernels = resolve_kernels(&args, &cache)?;

    let t = Instant::now();
    let built = build_binaries(&root)?;
    eprintln!(
        "vm-test: built {} test binaries and cylo-usage in {:.1} s",
        built.tests.len(),
        t.elapsed().as_secs_f64()
    );
    let modules: Vec<&Path> = kernels
        .iter()
        .filter_map(|k| k.modules.as_deref())
        .collect();
    let initrd = build_initramfs(&vm_dir, &built, &modules, &args.test_args)?;

    let mut runs = Vec::new();
    for kernel in &kernels {
        let mut run = boot(kernel, &initrd, &vm_dir, &args, args.smp)?;
        if !run.reached_init && !run.timed_out && args.smp > 1 {
            eprintln!(
                "vm-test: [{}] never reached /init with -smp {}; retrying with -smp 1",
                kernel.label, args.smp
            );
            run = boot(kernel, &initrd, &vm_dir, &args, 1)?;
        }
        runs.push(run);
    }

    let report = Report::new(runs, &built);
    report.print();
    report.write(&vm_dir)?;
    eprintln!(
        "vm-test: total time {:.0} s; wrote {} and {}",
        started.elapsed().as_secs_f64(),
        vm_dir.join("matrix.md").display(),
        vm_dir.join("matrix.json").display()
    );
    println!(
        "vm-test: {} passed, {} failed",
        report.totals.passed, report.totals.failed
    );
    if !report.ok() {
        std::process::exit(1);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Host tools

fn ensure_host_tools() -> Result<()> {
    let have_qemu = find_in_path("qemu-system-x86_64").is_some();
    let busybox = Path::new("/bin/busybox");
    let have_busybox = busybox.exists() && !elf_has_interp(busybox).unwrap_or(true);
    // mkfs.ext4 formats each guest's scratch disk; xz unpacks compressed kernel modules.
    let have_mkfs = find_in_path("mkfs.ext4").is_some();
    let have_xz = find_in_path("xz").is_some();
    let mut packages = Vec::new();
    if !have_qemu {
        packages.push("qemu-system-x86");
    }
    if !have_busybox {
        packages.push("busybox-static");
    }
    if !have_mkfs {
        packages.push("e2fsprogs");
    }
    if !have_xz {
        packages.push("xz-utils");
    }
    if packages.is_empty() {
        return Ok(());
    }
    eprintln!(
        "vm-test: installing host packages {} (qemu-system-x86_64 present: {have_qemu}, static \
         /bin/busybox present: {have_busybox}, mkfs.ext4 present: {have_mkfs}, xz present: \
         {have_xz})",
        packages.join(" ")
    );
    let sudo = !is_root() && find_in_path("sudo").is_some();
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_quiet(&mut cmd)
    };
    apt(&["update"])?;
    apt(&[&["install", "-y", "--no-install-recommends"][..], &packages].concat())?;
    if find_in_path("qemu-system-x86_64").is_none() {
        bail!("qemu-system-x86_64 is still missing after installing qemu-system-x86");
    }
    if elf_has_interp(busybox).context("checking /bin/busybox after installing busybox-static")? {
        bail!("/bin/busybox is still dynamically linked after installing busybox-static");
    }
    if find_in_path("mkfs.ext4").is_none() {
        bail!("mkfs.ext4 is still missing after installing e2fsprogs");
    }
    if find_in_path("xz").is_none() {
        bail!("xz is still missing after installing xz-utils");
    }
    Ok(())
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether an ELF file asks for a dynamic loader (has a PT_INTERP program header).
fn elf_has_interp(path: &Path) -> Result<bool> {
    let ctx = || format!("reading the ELF header of {}", path.display());
    let mut f = fs::File::open(path).with_context(ctx)?;
    let mut hdr = [0u8; 64];
    f.read_exact(&mut hdr).with_context(ctx)?;
    if &hdr[..4] != b"\x7fELF" || hdr[4] != 2 || hdr[5] != 1 {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let phoff = u64::from_le_bytes(hdr[0x20..0x28].try_into().unwrap());
    let phentsize = u16::from_le_bytes(hdr[0x36..0x38].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(hdr[0x38..0x3a].try_into().unwrap()) as usize;
    let mut table = vec![0u8; phentsize * phnum];
    f.seek(SeekFrom::Start(phoff)).with_context(ctx)?;
    f.read_exact(&mut table).with_context(ctx)?;
    const PT_INTERP: u32 = 3;
    Ok(table
        .chunks_exact(phentsize.max(4))
        .any(|ph| u32::from_le_bytes(ph[..4].try_into().unwrap()) == PT_INTERP))
}

// ---------------------------------------------------------------------------------------------
// Kernels

fn resolve_kernels(args: &Args, cache: &Path) -> Result<Vec<Kernel>> {
    let wanted: Vec<String> = if args.kernels.is_empty() {
        SERIES.iter().map(|s| s.label.to_string()).collect()
    } else {
        args.kernels.clone()
    };
    let mut mirror = None;
    let mut kernels = Vec::new();
    for name in wanted {
        if let Some(series) = SERIES.iter().find(|s| s.label == name) {
            if mirror.is_none() {
                mirror = Some(system_mirror()?);
            }
            kernels.push(resolve_debian(
                series,
                mirror.as_ref().unwrap(),
                cache,
                args.refresh,
            )?);
        } else if Path::new(&name).is_file() {
            let path = fs::canonicalize(&name).with_context(|| format!("resolving {name}"))?;
            // `vmlinuz-6.1.0-50-cloud-amd64` names itself; a bare `vmlinuz` or `bzImage` is
            // named by its folder.
            let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let label = match file.as_deref() {
                Some("vmlinuz" | "bzImage" | "vmlinux") | None => path
                    .parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| name.clone()),
                Some(f) => f.to_string(),
            };
            kernels.push(Kernel {
                label: sanitize(&label),
                package: None,
                version: None,
                suite: None,
                vmlinuz: path,
                modules: None,
            });
        } else {
            let known: Vec<_> = SERIES.iter().map(|s| s.label).collect();
            bail!(
                "unknown kernel `{name}`: expected one of {} or the path of a vmlinuz",
                known.join(", ")
            );
        }
    }
    Ok(kernels)
}

fn sanitize(s: &str) -> String {
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

/// One archive of the system's apt sources: its URI and the raw `Signed-By` value.
#[derive(Debug, Clone, PartialEq)]
struct Source {
    uri: String,
    signed_by: Option<String>,
}

/// The system's Debian archives: the main one and, when configured, the security one.
#[derive(Debug)]
struct Mirror {
    main: Source,
    security: Option<Source>,
}

fn system_mirror() -> Result<Mirror> {
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

/// A private apt configuration for one suite, kept under `target/vm/cache/apt/<suite>`.
struct AptSuite {
    suite: String,
    dir: PathBuf,
    /// The deb822 sources this configuration reads; the `updated` stamp holds the sources its
    /// lists were fetched for.
    sources: String,
}

impl AptSuite {
    /// `with_security` adds `<suite>-security` from the system's security archive.
    fn new(cache: &Path, suite: &str, mirror: &Mirror, with_security: bool) -> Result<Self> {
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
    fn update(&self, refresh: bool) -> Result<()> {
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

    /// The package the suite's meta-package depends on, and its version.
    fn resolve(&self) -> Result<(String, String)> {
        let out = output(self.command("apt-cache").args(["depends", META_PACKAGE]))?;
        let package = out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(|p| p.trim().trim_matches(|c| c == '<' || c == '>'))
            .find(|p| p.starts_with("linux-image-"))
            .with_context(|| {
                format!(
                    "`apt-cache depends {META_PACKAGE}` in {} names no linux-image",
                    self.suite
                )
            })?
            .to_string();
        let show = output(
            self.command("apt-cache")
                .args(["show", "--no-all-versions", &package]),
        )?;
        let version = show
            .lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("`apt-cache show {package}` gave no version"))?;
        Ok((package, version))
    }

    /// Downloads and unpacks the kernel once; returns the cached vmlinuz and the staged
    /// modules for the scratch disk (see [`stage_modules`]).
    fn fetch_kernel(
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
        let debs = cache.join("debs");
        let tmp = cache.join("tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        // apt-get download names the file `<package>_<version, ':' as %3a>_<arch>.deb`.
        let deb_prefix = format!("{package}_{}_", version.replace(':', "%3a"));
        let kept = match find_file(&debs, |n| n.starts_with(&deb_prefix) && n.ends_with(".deb"))? {
            Some(kept) => kept,
            None => {
                eprintln!("vm-test: downloading {package} {version} ({})", self.suite);
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
                let kept = debs.join(deb.file_name().unwrap());
                fs::rename(&deb, &kept)
                    .with_context(|| format!("moving {} to {}", deb.display(), kept.display()))?;
                kept
            }
        };
        let unpacked = tmp.join("root");
        run_quiet(Command::new("dpkg-deb").arg("-x").arg(&kept).arg(&unpacked))?;
        let boot = unpacked.join("boot");
        let image = find_file(&boot, |n| n.starts_with("vmlinuz-"))?
            .with_context(|| format!("{} holds no boot/vmlinuz-*", kept.display()))?;
        let staging = dir.with_extension("partial");
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
        copy(&image, &staging.join("vmlinuz"))?;
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

// ---------------------------------------------------------------------------------------------
// Kernel modules for the scratch disk

/// What the guest needs to see `/dev/vda` and mount ext4 on it. Built-in ones are skipped;
/// the others are staged with their dependencies and loaded by `/init`.
const DISK_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];
/// In the staged tree's top: the module list it was staged for (restaged when that changes).
const MODULES_STAMP: &str = "staged-for";
/// In `lib/modules/<release>/`: the modules `/init` loads with `modprobe`, one a line.
const MODULES_LIST: &str = "vm-test.modules";

fn modules_stamp() -> String {
    DISK_MODULES.join("\n") + "\n"
}

/// `kernel/drivers/virtio/virtio_pci.ko.xz` or `crc32c-intel.ko` -> `virtio_pci`, `crc32c_intel`.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let (stem, _) = file.split_once(".ko")?;
    Some(stem.replace('-', "_"))
}

/// The `depends=` field of a module's `.modinfo` section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(|d| d.trim().replace('-', "_"))
        .filter(|d| !d.is_empty())
        .collect()
}

/// A module file's contents, decompressed (busybox modprobe may not read `.ko.xz`).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    } else if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        bail!("{} is not a kernel module", path.display());
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} -dc {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed ({})", path.display(), out.status);
    }
    Ok(out.stdout)
}

/// Copies [`DISK_MODULES`] that are modules (not built in), with their dependencies, from an
/// unpacked kernel package to `out/lib/modules/<release>/` (decompressed), plus the package's
/// `modules.builtin*` and `modules.order`, runs `busybox depmod` there and writes
/// [`MODULES_LIST`]. Returns a one-line summary.
fn stage_modules(unpacked: &Path, out: &Path) -> Result<String> {
    let base = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpacked.join(d))
        .find(|d| d.is_dir())
        .context("the package has no lib/modules")?;
    let mut releases = fs::read_dir(&base)
        .with_context(|| format!("reading {}", base.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("kernel").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    let release = releases
        .next()
        .with_context(|| format!("{} holds no <release>/kernel", base.display()))?;
    let src = base.join(&release);
    let builtin: BTreeSet<String> = fs::read_to_string(src.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(module_name)
        .collect();
    // Every module file of the package, by module name.
    let mut index = BTreeMap::new();
    let mut stack = vec![src.join("kernel")];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else if let Some(name) = module_name(&e.file_name().to_string_lossy()) {
                index.insert(name, e.path());
            }
        }
    }

    let dst = out.join("lib/modules").join(&release);
    fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
    let (mut staged, mut in_kernel, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    let mut load = Vec::new();
    let mut todo: Vec<String> = DISK_MODULES.iter().rev().map(|m| m.to_string()).collect();
    let mut seen = BTreeSet::new();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let wanted = DISK_MODULES.contains(&name.as_str());
        if builtin.contains(&name) {
            in_kernel.push(name);
        } else if let Some(path) = index.get(&name) {
            let bytes = read_module(path)?;
            todo.extend(module_depends(&bytes));
            let rel = path.strip_prefix(&src).unwrap().to_string_lossy();
            let rel = &rel[..rel.find(".ko").unwrap() + 3];
            let target = dst.join(rel);
            fs::create_dir_all(target.parent().unwrap())?;
            fs::write(&target, &bytes).with_context(|| format!("writing {}", target.display()))?;
            if wanted {
                load.push(name.clone());
            }
            staged.push(name);
        } else {
            missing.push(name);
        }
    }
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if src.join(f).is_file() {
            copy(&src.join(f), &dst.join(f))?;
        }
    }
    write(
        &dst.join(MODULES_LIST),
        &load.iter().map(|m| format!("{m}\n")).collect::<String>(),
    )?;
    run_quiet(
        Command::new("/bin/busybox")
            .arg("depmod")
            .arg("-b")
            .arg(out)
            .arg(&release),
    )?;
    if !dst.join("modules.dep").is_file() {
        bail!("busybox depmod wrote no {}/modules.dep", dst.display());
    }
    write(&out.join(MODULES_STAMP), &modules_stamp())?;
    let mut summary = format!(
        "{release}: modules staged [{}], built in [{}]",
        staged.join(" "),
        in_kernel.join(" ")
    );
    if !missing.is_empty() {
        summary.push_str(&format!(", missing [{}]", missing.join(" ")));
    }
    write(&out.join("summary"), &summary)?;
    Ok(summary)
}

fn resolve_debian(series: &Series, mirror: &Mirror, cache: &Path, refresh: bool) -> Result<Kernel> {
    let mut problems = Vec::new();
    let prefix = format!("linux-image-{}.", series.label);
    for suite in series.suites {
        // Kernel updates reach a stable suite through `<suite>-security` first; backports have
        // no security suite.
        let security = mirror.security.is_some() && !suite.contains('-');
        let attempt = |with_security: bool| -> Result<std::result::Result<Kernel, String>> {
            let apt = AptSuite::new(cache, suite, mirror, with_security)?;
            apt.update(refresh)?;
            let (package, version) = apt.resolve()?;
            if !package.starts_with(&prefix) {
                return Ok(Err(format!("{suite}: {META_PACKAGE} depends on {package}")));
            }
            let (vmlinuz, modules) = apt.fetch_kernel(cache, &package, &version)?;
            Ok(Ok(Kernel {
                label: series.label.to_string(),
                package: Some(package),
                version: Some(version),
                suite: Some(if with_security && mirror.security.is_some() {
                    format!("{suite} + {suite}-security")
                } else {
                    suite.to_string()
                }),
                vmlinuz,
                modules: Some(modules),
            }))
        };
        let mut result = attempt(security);
        if security && result.is_err() {
            eprintln!(
                "vm-test: {suite} with {suite}-security failed; trying {suite} alone: {:#}",
                result.as_ref().err().unwrap()
            );
            result = attempt(false);
        }
        match result {
            Ok(Ok(k)) => return Ok(k),
            Ok(Err(problem)) => problems.push(problem),
            Err(e) => problems.push(format!("{suite}: {e:#}")),
        }
    }
    bail!(
        "no {} kernel found:\n  {}",
        series.label,
        problems.join("\n  ")
    )
}

// ---------------------------------------------------------------------------------------------
// Building

/// One test executable from cargo's JSON output.
#[derive(Debug, Clone, Serialize)]
struct TestBinary {
    /// `package` (lib tests), `package/tests/NAME`, `package/bin/NAME`, ...
    name: String,
    executable: PathBuf,
    /// The package folder: cargo runs tests from there.
    manifest_dir: PathBuf,
}

struct Built {
    tests: Vec<TestBinary>,
    cylo_usage: PathBuf,
    /// Every binary target built (tests find them through `CARGO_BIN_EXE_<name>`).
    bins: BTreeSet<PathBuf>,
    target_dir: PathBuf,
    /// Package folders whose data (fixtures) the guest needs.
    package_dirs: BTreeSet<PathBuf>,
}

fn build_binaries(root: &Path) -> Result<Built> {
    crate::ebpf::build().context("building the eBPF object")?;
    let target_dir = root.join("target/vm/build");
    let cargo_json = |args: &[&str]| -> Result<Vec<serde_json::Value>> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(&cargo);
        cmd.args(args)
            .args([
                "--release",
                "--target",
                TARGET,
                "--message-format=json-render-diagnostics",
                "--target-dir",
            ])
            .arg(&target_dir)
            .current_dir(root)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .stderr(Stdio::inherit());
        let shown = format!(
            "{cargo} {} (static, --target-dir {})",
            args.join(" "),
            target_dir.display()
        );
        eprintln!("vm-test: {shown}");
        let out = cmd.output().with_context(|| format!("running {shown}"))?;
        if !out.status.success() {
            bail!("{shown} failed ({})", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    };

    let mut bins = BTreeSet::new();
    let mut collect_bin = |msg: &serde_json::Value| {
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == false
            && let Some(exe) = msg["executable"].as_str()
        {
            bins.insert(PathBuf::from(exe));
            return Some(
                (msg["target"]["name"].as_str() == Some("cylo-usage")).then(|| PathBuf::from(exe)),
            );
        }
        None
    };
    let mut cylo_usage = None;
    for msg in cargo_json(&["build", "-p", "cylo-usage"])? {
        if let Some(Some(exe)) = collect_bin(&msg) {
            cylo_usage = Some(exe);
        }
    }
    let cylo_usage =
        cylo_usage.context("cargo build -p cylo-usage reported no cylo-usage binary")?;

    let mut tests = Vec::new();
    let mut package_dirs = BTreeSet::new();
    for msg in cargo_json(&["test", "--workspace", "--no-run"])? {
        collect_bin(&msg);
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let manifest_dir = msg["manifest_path"]
            .as_str()
            .map(|p| {
                Path::new(p)
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .to_path_buf()
            })
            .unwrap_or_else(|| root.to_path_buf());
        let package = manifest_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let package = msg["package_id"]
            .as_str()
            .and_then(package_name_from_id)
            .unwrap_or(package);
        let kind = msg["target"]["kind"][0].as_str().unwrap_or("lib");
        let target = msg["target"]["name"].as_str().unwrap_or("?");
        let name = match kind {
            "lib" | "rlib" | "cdylib" | "staticlib" | "proc-macro" => package.clone(),
            k => format!(
                "{package}/{}/{target}",
                if k == "test" { "tests" } else { k }
            ),
        };
        package_dirs.insert(manifest_dir.clone());
        tests.push(TestBinary {
            name,
            executable: PathBuf::from(exe),
            manifest_dir,
        });
    }
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    for exe in tests.iter().map(|t| &t.executable).chain(&bins) {
        if elf_has_interp(exe)? {
            bail!(
                "{} is dynamically linked: the guest has no libc (is RUSTFLAGS overridden?)",
                exe.display()
            );
        }
    }
    Ok(Built {
        tests,
        cylo_usage,
        bins,
        target_dir,
        package_dirs,
    })
}

/// `path+file:///work/main/cylo-usage#0.1.0` -> `cylo-usage`;
/// `path+file:///x/y#name@0.1.0` -> `name`.
fn package_name_from_id(id: &str) -> Option<String> {
    let (path, frag) = id.rsplit_once('#')?;
    if let Some((name, _)) = frag.split_once('@') {
        return Some(name.to_string());
    }
    path.rsplit('/').next().map(str::to_string)
}

// ---------------------------------------------------------------------------------------------
// Initramfs

/// `modules`: staged module trees ([`stage_modules`]), one per kernel, merged at the root (each
/// under its own `lib/modules/<release>`).
fn build_initramfs(
    vm_dir: &Path,
    built: &Built,
    modules: &[&Path],
    test_args: &[String],
) -> Result<PathBuf> {
    let t = Instant::now();
    let root = vm_dir.join("initramfs");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "etc",
        "root",
        "mnt",
        GUEST_TEST_DIR,
    ] {
        fs::create_dir_all(root.join(d))
            .with_context(|| format!("creating {}/{d}", root.display()))?;
    }

    // Busybox and its applets.
    copy(Path::new("/bin/busybox"), &root.join("bin/busybox"))?;
    let applets = output(Command::new("/bin/busybox").arg("--list-full"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let link = root.join(applet);
        if link.exists() || applet == "bin/busybox" {
            continue;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    write(&root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    write(&root.join("etc/group"), "root:x:0:\n")?;
    write(
        &root.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;
    write(
        &root.join("etc/nsswitch.conf"),
        "passwd: files\ngroup: files\nhosts: files dns\n",
    )?;

    // Binaries at their host paths; the target's tmp folder (CARGO_TARGET_TMPDIR) must exist.
    for bin in &built.bins {
        copy(bin, &under(&root, bin))?;
    }
    fs::create_dir_all(under(&root, &built.target_dir.join("tmp")))?;

    // Package data (fixtures) at the same absolute paths.
    let mut budget = MAX_DATA_BYTES;
    for dir in &built.package_dirs {
        fs::create_dir_all(under(&root, dir))?;
        for data in DATA_DIRS {
            let src = dir.join(data);
            if src.is_dir() {
                copy_tree(&src, &under(&root, &src), &mut budget)?;
            }
        }
    }

    // Kernel modules for the scratch disk, for `modprobe` under `uname -r`.
    for tree in modules {
        let lib = tree.join("lib");
        if lib.is_dir() {
            let mut unlimited = u64::MAX;
            copy_tree(&lib, &root.join("lib"), &mut unlimited)?;
        }
    }

    // Test binaries.
    let mut script_tests = String::new();
    for test in &built.tests {
        let file = test
            .executable
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        copy(&test.executable, &root.join(GUEST_TEST_DIR).join(&file))?;
        script_tests.push_str(&format!(
            "run_test {} {} /{GUEST_TEST_DIR}/{}\n",
            sh_quote(&test.name),
            sh_quote(&test.manifest_dir.display().to_string()),
            sh_quote(&file)
        ));
    }
    let extra: Vec<String> = test_args.iter().map(|a| sh_quote(a)).collect();
    let init = INIT_TEMPLATE
        .replace("@MARK@", MARK)
        .replace("@MODULES_LIST@", MODULES_LIST)
        .replace("@DISK_DIR@", GUEST_DISK_DIR)
        .replace(
            "@CYLO_USAGE@",
            &sh_quote(&built.cylo_usage.display().to_string()),
        )
        .replace("@TEST_ARGS@", &extra.join(" "))
        .replace("@TESTS@", &script_tests);
    let init_path = root.join("init");
    write(&init_path, &init)?;
    set_mode(&init_path, 0o755)?;

    // Pack: busybox cpio (newc) | gzip -1.
    let image = vm_dir.join("initramfs.cpio.gz");
    let mut names = Vec::new();
    list_tree(&root, Path::new(""), &mut names)?;
    let out = fs::File::create(&image).with_context(|| format!("creating {}", image.display()))?;
    let mut cpio = Command::new("/bin/busybox")
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running busybox cpio")?;
    let mut gzip = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::from(cpio.stdout.take().unwrap()))
        .stdout(out)
        .spawn()
        .context("running gzip -1")?;
    {
        let mut stdin = cpio.stdin.take().unwrap();
        for n in &names {
            writeln!(stdin, "{}", n.display()).context("writing busybox cpio's file list")?;
        }
    }
    let cs = cpio.wait().context("waiting for busybox cpio")?;
    let gs = gzip.wait().context("waiting for gzip")?;
    if !cs.success() || !gs.success() {
        bail!("packing {} failed (cpio {cs}, gzip {gs})", image.display());
    }
    let size = fs::metadata(&image)?.len();
    eprintln!(
        "vm-test: initramfs {} ({:.1} MiB, {} files) in {:.1} s",
        image.display(),
        size as f64 / (1 << 20) as f64,
        names.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(image)
}

const INIT_TEMPLATE: &str = r#"#!/bin/sh
# Generated by `cargo xtask vm-test`.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 CYLO_USAGE_REQUIRE_EBPF=1 CYLO_USAGE_VM=1
M='@MARK@'
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "$M init $(uname -r)"
note() { echo "$M note $*"; }
try_mount() { # TYPE DIR [OPTIONS]
    mkdir -p "$2"
    if [ -n "$3" ]; then mount -t "$1" -o "$3" "$1" "$2"; else mount -t "$1" "$1" "$2"; fi \
        || note "cannot mount $1 on $2"
}
try_mount proc /proc
try_mount sysfs /sys
try_mount devpts /dev/pts
try_mount tmpfs /dev/shm mode=1777
# No tmpfs over /tmp or /run: the workspace (binaries, fixtures) may live below them, and the
# initramfs is writable memory already.
mkdir -p /tmp /run && chmod 1777 /tmp
try_mount tracefs /sys/kernel/tracing
try_mount bpf /sys/fs/bpf
if grep -qw debugfs /proc/filesystems; then try_mount debugfs /sys/kernel/debug; fi
try_mount tmpfs /sys/fs/cgroup mode=755
for c in cpuacct memory pids blkio; do
    if grep -q "^$c[[:space:]]" /proc/cgroups; then
        mkdir -p /sys/fs/cgroup/$c
        mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c || note "cannot mount cgroup v1 $c"
    else
        note "no cgroup v1 controller $c"
    fi
done
try_mount cgroup2 /sys/fs/cgroup/unified
# The scratch disk (virtio, ext4) for the disk tests. Without it they skip (no REQUIRE_DISK).
setup_disk() {
    md=/lib/modules/$(uname -r)
    if [ -f $md/@MODULES_LIST@ ]; then
        for m in $(cat $md/@MODULES_LIST@); do
            modprobe $m || { note "disk: modprobe $m failed"; return 1; }
        done
    else
        note "disk: no staged modules for $(uname -r) (drivers must be built in)"
    fi
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b /dev/vda ] || { note "disk: no /dev/vda"; return 1; }
    grep -qw ext4 /proc/filesystems || { note "disk: no ext4 in /proc/filesystems"; return 1; }
    mkdir -p @DISK_DIR@
    mount -t ext4 /dev/vda @DISK_DIR@ || { note "disk: cannot mount /dev/vda (ext4)"; return 1; }
    chmod 1777 @DISK_DIR@
    export CYLO_USAGE_TEST_DISK_DIR=@DISK_DIR@ CYLO_USAGE_REQUIRE_DISK=1
    note "disk: /dev/vda ext4 $(($(cat /sys/block/vda/size) / 2048)) MiB on @DISK_DIR@;" \
        "modules loaded: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
}
setup_disk || note "disk: unavailable, the disk tests will skip"
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
hostname vm-test
[ -e /sys/kernel/btf/vmlinux ] || note "no /sys/kernel/btf/vmlinux"
note "memlock limit $(ulimit -l), cpus $(grep -c ^processor /proc/cpuinfo)"

CU=@CYLO_USAGE@
if "$CU" features --json >/tmp/features.json 2>/tmp/features.err; then
    echo "$M features-begin"
    cat /tmp/features.json
    echo
    echo "$M features-end"
else
    note "cylo-usage features --json exited $?"
fi

run_test() { # NAME DIR EXE
    echo "$M begin $1"
    cd "$2" 2>/dev/null || cd /
    CARGO_MANIFEST_DIR="$2" "$3" --test-threads=1 @TEST_ARGS@
    rc=$?
    cd /
    echo "$M end $1 exit=$rc"
}
@TESTS@
echo "$M done"
sync
umount @DISK_DIR@ 2>/dev/null
poweroff -f
"#;

/// The path of host file `abs` inside the staging root.
fn under(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn list_tree(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let rel = rel.join(e.file_name());
        out.push(rel.clone());
        if e.file_type()?.is_dir() {
            list_tree(root, &rel, out)?;
        }
    }
    Ok(())
}

fn copy_tree(src: &Path, dst: &Path, budget: &mut u64) -> Result<()> {
    fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for e in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let e = e?;
        let (s, d) = (e.path(), dst.join(e.file_name()));
        let ft = e.file_type()?;
        if ft.is_dir() {
            copy_tree(&s, &d, budget)?;
        } else if ft.is_file() {
            let len = e.metadata()?.len();
            if len > *budget {
                eprintln!(
                    "vm-test: skipping {} (test data budget exhausted)",
                    s.display()
                );
                continue;
            }
            *budget -= len;
            copy(&s, &d)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Booting

/// What one guest did.
#[derive(Debug, Serialize)]
struct KernelRun {
    kernel: Kernel,
    smp: u32,
    /// `uname -r` in the guest.
    uname: Option<String>,
    reached_init: bool,
    completed: bool,
    timed_out: bool,
    qemu_status: Option<String>,
    boot_seconds: Option<f64>,
    total_seconds: f64,
    console_log: PathBuf,
    notes: Vec<String>,
    binaries: Vec<BinaryResult>,
    features: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct BinaryResult {
    name: String,
    exit: Option<i32>,
    tests: Vec<TestResult>,
    /// libtest's `test result:` line.
    summary: Option<String>,
}

#[derive(Debug, Serialize)]
struct TestResult {
    name: String,
    status: Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Passed,
    Failed,
    Ignored,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Passed => "ok",
            Status::Failed => "FAILED",
            Status::Ignored => "ignored",
        }
    }
}

fn boot(kernel: &Kernel, initrd: &Path, vm_dir: &Path, args: &Args, smp: u32) -> Result<KernelRun> {
    let dir = vm_dir.join(&kernel.label);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("console.log");
    let mut log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    // A fresh scratch disk for each boot, so runs do not depend on each other.
    let mut host_notes = Vec::new();
    let disk = dir.join("disk.img");
    let t = Instant::now();
    let disk = match make_disk(&disk) {
        Ok(()) => {
            eprintln!(
                "vm-test: [{}] scratch disk {} ({} MiB ext4) in {:.1} s",
                kernel.label,
                disk.display(),
                DISK_BYTES >> 20,
                t.elapsed().as_secs_f64()
            );
            Some(disk)
        }
        Err(e) => {
            eprintln!("vm-test: [{}] no scratch disk: {e:#}", kernel.label);
            host_notes.push(format!("no scratch disk: {e:#}"));
            None
        }
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        &smp.to_string(),
        "-m",
        &args.memory,
    ])
    .args(["-nographic", "-nic", "none", "-no-reboot", "-kernel"])
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", "console=ttyS0 panic=-1 quiet"]);
    if let Some(disk) = &disk {
        let mut drive = std::ffi::OsString::from("file=");
        drive.push(disk);
        drive.push(",if=virtio,format=raw");
        cmd.arg("-drive").arg(drive);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = match (&kernel.package, &kernel.version) {
        (Some(p), Some(v)) => format!("{p} {v}"),
        _ => kernel.vmlinuz.display().to_string(),
    };
    eprintln!(
        "vm-test: [{}] booting {what} (-smp {smp}, timeout {} s)",
        kernel.label, args.timeout
    );
    let started = Instant::now();
    let mut child = cmd.spawn().context("running qemu-system-x86_64")?;

    // Collect the console in a thread; note when /init starts and echo progress.
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let boot_time = Arc::new(Mutex::new(None::<f64>));
    let stdout = child.stdout.take().unwrap();
    let reader = {
        let (lines, boot_time, label, verbose) = (
            lines.clone(),
            boot_time.clone(),
            kernel.label.clone(),
            args.verbose,
        );
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let _ = log.write_all(&buf);
                let line = clean_line(&String::from_utf8_lossy(&buf));
                if line.starts_with(&format!("{MARK} init")) {
                    *boot_time.lock().unwrap() = Some(started.elapsed().as_secs_f64());
                }
                let t = started.elapsed().as_secs_f64();
                if verbose {
                    eprintln!("[{label} {t:7.1}] {line}");
                } else if let Some(rest) = line.strip_prefix(MARK) {
                    let rest = rest.trim();
                    if !rest.starts_with("features") {
                        eprintln!("vm-test: [{label} {t:6.1}s] {rest}");
                    }
                } else if line.starts_with("test ") && line.contains(" ... FAILED") {
                    eprintln!("vm-test: [{label} {t:6.1}s]   {line}");
                }
                lines.lock().unwrap().push(line);
            }
        })
    };
    let stderr_reader = {
        let mut stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        })
    };

    let deadline = started + Duration::from_secs(args.timeout);
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            timed_out = true;
            eprintln!(
                "vm-test: [{}] timed out after {} s: killing qemu (pid {})",
                kernel.label,
                args.timeout,
                child.id()
            );
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let total_seconds = started.elapsed().as_secs_f64();
    let _ = reader.join();
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    let lines = std::mem::take(&mut *lines.lock().unwrap());
    let mut run = parse_console(&lines, timed_out);
    run.notes.splice(0..0, host_notes);
    if !qemu_stderr.trim().is_empty() {
        run.notes
            .push(format!("qemu stderr: {}", qemu_stderr.trim()));
    }
    if let Some(s) = status
        && !s.success()
    {
        run.notes.push(format!("qemu exited with {s}"));
    }
    Ok(KernelRun {
        kernel: kernel.clone(),
        smp,
        uname: run.uname,
        reached_init: run.reached_init,
        completed: run.completed,
        timed_out,
        qemu_status: status.map(|s| s.to_string()),
        boot_seconds: *boot_time.lock().unwrap(),
        total_seconds,
        console_log: log_path,
        notes: run.notes,
        binaries: run.binaries,
        features: run.features,
    })
}

/// A sparse file of [`DISK_BYTES`] formatted ext4, replacing any previous one. Inode tables
/// and the journal are initialised here, so no lazy-init writes run in the guest during tests.
fn make_disk(path: &Path) -> Result<()> {
    let _ = fs::remove_file(path);
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(DISK_BYTES)
        .with_context(|| format!("sizing {}", path.display()))?;
    drop(file);
    let mkfs = find_in_path("mkfs.ext4").context("mkfs.ext4 not found (e2fsprogs)")?;
    run_quiet(
        Command::new(mkfs)
            .args(["-F", "-q", "-L", "vm-test", "-E"])
            .arg("lazy_itable_init=0,lazy_journal_init=0")
            .arg(path),
    )
}

#[derive(Default)]
struct Parsed {
    uname: Option<String>,
    reached_init: bool,
    completed: bool,
    notes: Vec<String>,
    binaries: Vec<BinaryResult>,
    features: Option<serde_json::Value>,
}

/// One console line without its line ending; a marker line loses whatever precedes the marker
/// (SeaBIOS leaves terminal escapes on the line where /init starts printing).
fn clean_line(raw: &str) -> String {
    let line = raw.trim_end_matches(['\r', '\n']);
    match line.find(MARK) {
        Some(i) => line[i..].to_string(),
        None => line.to_string(),
    }
}

/// Parses the serial console: markers from `/init` and libtest's output in between.
fn parse_console(lines: &[String], timed_out: bool) -> Parsed {
    let mut p = Parsed::default();
    let mut current: Option<BinaryResult> = None;
    // A `test NAME ... ` line whose result has not been printed yet.
    let mut pending: Option<String> = None;
    let mut features: Option<String> = None;
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
                            b.tests.push(TestResult {
                                name,
                                status: Status::Failed,
                            });
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
        let Some(b) = current.as_mut() else { continue };
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
            b.tests.push(TestResult { name, status });
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
                Some(status) => b.tests.push(TestResult { name, status }),
                None => pending = Some(name),
            }
        }
    }
    if let Some(mut b) = current.take() {
        if let Some(name) = pending.take() {
            b.tests.push(TestResult {
                name,
                status: Status::Failed,
            });
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

// ---------------------------------------------------------------------------------------------
// Reporting

#[derive(Debug, Default, Serialize)]
struct Totals {
    passed: usize,
    failed: usize,
    ignored: usize,
    /// Kernels that did not boot, did not finish, or timed out.
    broken_kernels: usize,
}

#[derive(Serialize)]
struct Report {
    runs: Vec<KernelRun>,
    totals: Totals,
    note: Option<String>,
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
    fn new(runs: Vec<KernelRun>, built: &Built) -> Self {
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
        Self { runs, totals, note }
    }

    fn ok(&self) -> bool {
        self.totals.failed == 0 && self.totals.broken_kernels == 0
    }

    fn print(&self) {
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
        println!(
            "vm-test: {} kernels ({} broken), {} ignored",
            self.runs.len(),
            self.totals.broken_kernels,
            self.totals.ignored
        );
    }

    fn write(&self, vm_dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        write(&vm_dir.join("matrix.json"), &(json + "\n"))?;
        write(&vm_dir.join("matrix.md"), &self.markdown())
    }

    fn markdown(&self) -> String {
        let mut md = String::from("# vm-test matrix\n\n");
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

// ---------------------------------------------------------------------------------------------
// Small helpers

fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if pred(&e.file_name().to_string_lossy()) && e.file_type()?.is_file() {
            return Ok(Some(e.path()));
        }
    }
    Ok(None)
}

fn copy(src: &Path, dst: &Path) -> Result<()> {
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if fs::read(path).ok().as_deref() == Some(bytes) {
        return Ok(());
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
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
        assert_eq!(p.binaries[1].tests[0].status, Status::Failed);
        assert_eq!(p.binaries[2].exit, None);
        assert!(p.binaries[2].silent_failure() || p.binaries[2].tests[0].status == Status::Failed);
        let mut leaves = Vec::new();
        flatten("", p.features.as_ref().unwrap(), &mut leaves);
        assert_eq!(
            leaves,
            [
                ("features.cpu".to_string(), "yes: sched_switch".to_string()),
                ("fork.how".to_string(), "raw_tracepoint".to_string()),
                ("net".to_string(), "false".to_string())
            ]
        );
    }

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
        assert_eq!(
            package_name_from_id("path+file:///work/main/cylo-usage#0.1.0").as_deref(),
            Some("cylo-usage")
        );
        assert_eq!(
            package_name_from_id("path+file:///work/main/x#abi@0.1.0").as_deref(),
            Some("abi")
        );
    }
}
