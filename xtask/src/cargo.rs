//! Running cargo, and reading what it built from its JSON messages (`cargo_metadata`).
use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use cargo_metadata::{Artifact, Message};

use crate::cmd;
use crate::paths::workspace_root;

/// `cargo` as run by `cargo xtask` (`$CARGO`), in the workspace root.
pub fn command() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cargo ARGS` in the workspace root.
pub fn run(args: &[&str]) -> Result<()> {
    cmd::run(command().args(args))
}

/// Runs a cargo build command (`build`, `test --no-run`, ...) with JSON messages on stdout and
/// human-readable diagnostics on stderr; returns what it built (fresh or not).
pub fn artifacts(cargo: &mut Command) -> Result<Vec<Artifact>> {
    cargo
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cargo.spawn().map_err(|source| cmd::Error::Spawn {
        command: cmd::shown(cargo),
        source,
    })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut artifacts = Vec::new();
    for message in Message::parse_stream(BufReader::new(stdout)) {
        match message.with_context(|| format!("reading the output of {}", cmd::shown(cargo)))? {
            Message::CompilerArtifact(artifact) => artifacts.push(artifact),
            // Build scripts' and others' lines that are not cargo's own.
            Message::TextLine(line) => eprintln!("{line}"),
            _ => {}
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {}", cmd::shown(cargo)))?;
    cmd::check(cargo, status, String::new())?;
    Ok(artifacts)
}

/// Builds the `cylo-usage` package in release mode (the eBPF object must be built already);
/// returns its executables by target name (`cylo-usage`, `cylo-usage-workload`).
pub fn build_release() -> Result<BTreeMap<String, PathBuf>> {
    let built = artifacts(command().args([
        "build",
        "--release",
        "-p",
        "cylo-usage",
        "-p",
        "cylo-usage-workload",
    ]))?;
    Ok(built
        .into_iter()
        .filter_map(|a| Some((a.target.name, a.executable?.into_std_path_buf())))
        .collect())
}

/// The executable `name` among `built`, or an error naming the build that lacked it.
pub fn executable(built: &BTreeMap<String, PathBuf>, name: &str) -> Result<PathBuf> {
    built
        .get(name)
        .cloned()
        .with_context(|| format!("the release build reported no `{name}` binary"))
}
