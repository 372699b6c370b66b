//! `cargo xtask dist`: what a host installs, in `target/dist/`:
//! - `cylo-usage-VERSION-x86_64-linux-musl`: the static binary (musl), whose `--version`
//!   names the embedded eBPF object's SHA-256;
//! - `cylo-usage_VERSION_amd64.deb`: that binary in `/usr/bin`, the systemd service and
//!   socket units (pointed at `/usr/bin`), the man page and the bash, zsh and fish
//!   completions (made by the binary itself from its command-line definition), and
//!   maintainer scripts that enable and start nothing on their own;
//! - the `.crate` files of `cylo-usage-abi` and `cylo-usage` (`cargo xtask package`);
//! - `SHA256SUMS` of all of them.
//!
//! With `--check` (as root, on a Debian-like host; CI does it): the static binary is not
//! dynamic and runs `run -- /bin/true`; the `.deb` installs with `dpkg -i`,
//! `/usr/bin/cylo-usage features` runs, `systemd-analyze verify` passes on the installed
//! units (where it exists), `man -w cylo-usage` finds the page (where man exists), and
//! `dpkg --purge` removes every file it installed.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, cmd, paths};

// `sha256_hex`, shared with `cylo-usage/build.rs`.
include!("../../cylo-usage/ebpf_sha256.rs");

#[derive(clap::Args)]
pub struct Args {
    /// Then install, check and purge the package, and run the static binary (root).
    #[arg(long)]
    check: bool,
}

const VERSION: &str = env!("CARGO_PKG_VERSION");
const MUSL: &str = "x86_64-unknown-linux-musl";
/// What the package installs, besides the folders `dpkg` shares with other packages.
const INSTALLED: [&str; 7] = [
    "/usr/bin/cylo-usage",
    "/usr/lib/systemd/system/cylo-usage.service",
    "/usr/lib/systemd/system/cylo-usage.socket",
    "/usr/share/man/man1/cylo-usage.1.gz",
    "/usr/share/bash-completion/completions/cylo-usage",
    "/usr/share/zsh/vendor-completions/_cylo-usage",
    "/usr/share/fish/vendor_completions.d/cylo-usage.fish",
];

pub fn run(args: Args) -> Result<()> {
    let root = paths::workspace_root();
    let dist = root.join("target/dist");
    if dist.exists() {
        std::fs::remove_dir_all(&dist).with_context(|| format!("emptying {}", dist.display()))?;
    }
    std::fs::create_dir_all(&dist)?;

    // The packages first: they build the eBPF object and put it in the package.
    crate::package::run(crate::package::Args { no_consumer: true })?;
    for name in ["cylo-usage-abi", "cylo-usage"] {
        let file = format!("{name}-{VERSION}.crate");
        std::fs::copy(crate::paths::packages_dir().join(&file), dist.join(&file))
            .with_context(|| format!("copying {file}"))?;
    }

    let binary = static_binary(&root)?;
    let shipped = dist.join(format!("cylo-usage-{VERSION}-x86_64-linux-musl"));
    std::fs::copy(&binary, &shipped)?;
    let deb = debian_package(&root, &binary, &dist)?;

    let mut sums = String::new();
    let mut names: Vec<String> = std::fs::read_dir(&dist)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in &names {
        let bytes = std::fs::read(dist.join(name))?;
        sums.push_str(&format!("{}  {name}\n", sha256_hex(&bytes)));
    }
    std::fs::write(dist.join("SHA256SUMS"), &sums)?;
    eprint!("xtask: {}:\n{sums}", dist.display());

    if args.check {
        check_static(&shipped)?;
        check_deb(&deb)?;
        eprintln!("xtask: dist checked: static binary, and the package installed and purged");
    }
    Ok(())
}

/// The release binary for musl (static), with the project's eBPF object embedded.
fn static_binary(root: &Path) -> Result<PathBuf> {
    cmd::run(Command::new("rustup").args(["target", "add", MUSL]))
        .context("installing the musl target (rustup)")?;
    let built = cargo::artifacts(cargo::command().current_dir(root).args([
        "build",
        "--release",
        "-p",
        "cylo-usage",
        "--bin",
        "cylo-usage",
        "--target",
        MUSL,
    ]))?;
    built
        .into_iter()
        .find(|a| a.target.name == "cylo-usage")
        .and_then(|a| a.executable)
        .map(|p| p.into_std_path_buf())
        .context("the musl build reported no cylo-usage binary")
}

/// Builds `cylo-usage_VERSION_amd64.deb` into `dist` from `binary`.
fn debian_package(root: &Path, binary: &Path, dist: &Path) -> Result<PathBuf> {
    let stage = root.join("target/dist-deb");
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let put = |rel: &str, bytes: &[u8], mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = stage.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().expect("a folder"))?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put("/usr/bin/cylo-usage", &std::fs::read(binary)?, 0o755)?;
    for unit in ["cylo-usage.service", "cylo-usage.socket"] {
        let text = std::fs::read_to_string(root.join("contrib/systemd").join(unit))?;
        let text = text.replace("/usr/local/bin/cylo-usage", "/usr/bin/cylo-usage");
        put(
            &format!("/usr/lib/systemd/system/{unit}"),
            text.as_bytes(),
            0o644,
        )?;
    }
    // The man page and the completions, from the binary's own command-line definition.
    let docs = root.join("target/dist-docs");
    cmd::run(Command::new(binary).arg("generate-docs").arg(&docs))?;
    let page = std::fs::read(docs.join("cylo-usage.1"))?;
    let gz = gzip(&page)?;
    put("/usr/share/man/man1/cylo-usage.1.gz", &gz, 0o644)?;
    for (from, to) in [
        (
            "cylo-usage.bash",
            "/usr/share/bash-completion/completions/cylo-usage",
        ),
        (
            "_cylo-usage",
            "/usr/share/zsh/vendor-completions/_cylo-usage",
        ),
        (
            "cylo-usage.fish",
            "/usr/share/fish/vendor_completions.d/cylo-usage.fish",
        ),
    ] {
        put(to, &std::fs::read(docs.join(from))?, 0o644)?;
    }
    let size_kib: u64 = INSTALLED
        .iter()
        .filter_map(|f| std::fs::metadata(stage.join(f.trim_start_matches('/'))).ok())
        .map(|m| m.len().div_ceil(1024))
        .sum();
    put(
        "/DEBIAN/control",
        format!(
            "Package: cylo-usage\n\
             Version: {VERSION}\n\
             Architecture: amd64\n\
             Maintainer: cylo-usage developers <root@localhost>\n\
             Installed-Size: {size_kib}\n\
             Section: admin\n\
             Priority: optional\n\
             Description: exact resource accounting of a process tree, in the kernel (eBPF)\n \
             cylo-usage follows a command and every descendant it ever has from the kernel's\n \
             fork, exec and exit hooks, and reports their CPU time, processes and threads,\n \
             disk and network bytes and memory. The package installs the static binary, the\n \
             daemon's systemd units (enabled by no one but the administrator), the man page\n \
             and shell completions.\n"
        )
        .as_bytes(),
        0o644,
    )?;
    // Enable and start nothing: the administrator decides (`systemctl enable --now
    // cylo-usage.socket`). Only systemd's view of the units is refreshed.
    let reload = "#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then\n    systemctl daemon-reload >/dev/null 2>&1 || true\nfi\n";
    put("/DEBIAN/postinst", reload.as_bytes(), 0o755)?;
    put(
        "/DEBIAN/prerm",
        b"#!/bin/sh\nset -e\nif [ -d /run/systemd/system ] && [ \"$1\" = remove ]; then\n    systemctl stop cylo-usage.socket cylo-usage.service >/dev/null 2>&1 || true\nfi\n",
        0o755,
    )?;
    put("/DEBIAN/postrm", reload.as_bytes(), 0o755)?;
    let deb = dist.join(format!("cylo-usage_{VERSION}_amd64.deb"));
    cmd::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )
    .context("dpkg-deb")?;
    Ok(deb)
}

/// `bytes` gzipped by gzip(1) (`-n`: no name or time, so the package is reproducible).
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running gzip")?;
    child.stdin.take().expect("piped").write_all(bytes)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed: {}", out.status);
    }
    Ok(out.stdout)
}

/// The static binary is not dynamic, and runs a command exactly.
fn check_static(binary: &Path) -> Result<()> {
    let ldd = Command::new("ldd").arg(binary).output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    if !said.contains("not a dynamic executable") && !said.contains("statically linked") {
        bail!("{} is dynamic: ldd says {said}", binary.display());
    }
    let out = cmd::output(
        Command::new(binary)
            .args(["run", "--no-daemon", "--json", "-o", "-", "--", "/bin/true"])
            .env_remove("CYLO_USAGE_SOCKET"),
    )?;
    let report: serde_json::Value =
        serde_json::from_str(out.trim()).context("the static binary's report is not JSON")?;
    if report["process_count"] != 1 {
        bail!("the static binary counted {report}");
    }
    Ok(())
}

/// Installs the package, uses it, and purges it.
fn check_deb(deb: &Path) -> Result<()> {
    cmd::run(Command::new("dpkg").arg("-i").arg(deb))?;
    let result = (|| -> Result<()> {
        for file in INSTALLED {
            if !Path::new(file).is_file() {
                bail!("the package did not install {file}");
            }
        }
        cmd::run(Command::new("/usr/bin/cylo-usage").args(["features", "--no-daemon"]))?;
        if which("systemd-analyze") {
            cmd::run(Command::new("systemd-analyze").args([
                "verify",
                "/usr/lib/systemd/system/cylo-usage.socket",
                "/usr/lib/systemd/system/cylo-usage.service",
            ]))?;
        } else {
            eprintln!("xtask: no systemd-analyze here: the units are not verified");
        }
        if which("man") {
            cmd::run(Command::new("man").args(["-w", "cylo-usage"]))?;
        } else {
            eprintln!("xtask: no man here: the page is not looked up");
        }
        Ok(())
    })();
    cmd::run(Command::new("dpkg").args(["--purge", "cylo-usage"]))?;
    result?;
    for file in INSTALLED {
        if Path::new(file).exists() {
            bail!("dpkg --purge left {file}");
        }
    }
    Ok(())
}

fn which(program: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join(program).is_file())
}
