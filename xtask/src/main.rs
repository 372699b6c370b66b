//! `cargo xtask`: the project's build, test, benchmark and kernel-matrix tasks.
mod bench;
mod browser;
mod cargo;
mod cmd;
mod dist;
mod ebpf;
mod layout;
mod meminfo;
mod package;
mod paths;
mod vm;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "cylo-usage build and test tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object, installing rust-src and bpf-linker first when they are missing.
    BuildEbpf,
    /// Build the eBPF object, then `target/release/cylo-usage` with it embedded.
    Build,
    /// Build everything, then run `cylo-usage run [OPTIONS] -- CMD [ARGS]`:
    /// `cargo xtask run -- CMD ARGS` or `cargo xtask run -- --json -- CMD ARGS`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the eBPF object, then run the whole test suite (`cargo test` of every host crate).
    Test {
        /// Extra arguments passed to `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Boot Debian's 5.10, 6.1 and 6.12 kernels under qemu and run the test suite in each
    /// (x86_64 guests, or arm64 ones with `--arch arm64`).
    VmTest(vm::Args),
    /// Build everything, then time traced against untraced runs and print the ratios.
    Bench(bench::Args),
    /// Check that no crate's files import each other in a circle.
    CheckLayout,
    /// Make the published packages (the eBPF object inside), and build and run a crate that
    /// depends on them with stable Rust alone.
    Package(package::Args),
    /// Make what hosts install, in target/dist/: the static binary (musl), the Debian package
    /// (binary, systemd units, man page, completions), the crates, SHA256SUMS.
    Dist(dist::Args),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::BuildEbpf => {
            ebpf::build()?;
        }
        Command::Build => {
            ebpf::build()?;
            cargo::build_release()?;
        }
        Command::Run { args } => {
            ebpf::build()?;
            let bin = cargo::executable(&cargo::build_release()?, "cylo-usage")?;
            let mut full = vec!["run".to_string()];
            // Without options first, everything is the command.
            if !args.first().is_some_and(|a| a.starts_with('-')) {
                full.push("--".to_string());
            }
            full.extend(args);
            let status = std::process::Command::new(&bin)
                .args(&full)
                .status()
                .with_context(|| format!("cannot run {}", bin.display()))?;
            std::process::exit(status.code().unwrap_or(125));
        }
        Command::Test { args } => {
            ebpf::build()?;
            // The test workload, which the tests run by its path (a binary of another
            // package, so `cargo test` does not build it), in the tests' profile.
            let mut workload = vec!["build", "-p", "cylo-usage-workload"];
            if args.iter().any(|a| a == "--release") {
                workload.push("--release");
            }
            cargo::run(&workload)?;
            // The picture tests render with a headless browser.
            if let Some(chromium) = browser::ensure_chromium()? {
                // SAFETY: set before any thread of this process reads the environment.
                unsafe { std::env::set_var("CYLO_USAGE_CHROMIUM", chromium) };
            }
            // The default members: everything but the eBPF crate, which only builds for BPF.
            let mut full = vec!["test"];
            full.extend(args.iter().map(String::as_str));
            cargo::run(&full)?;
        }
        Command::VmTest(args) => vm::run(args)?,
        Command::Bench(args) => bench::run(args)?,
        Command::CheckLayout => layout::check(&paths::workspace_root())?,
        Command::Package(args) => package::run(args)?,
        Command::Dist(args) => dist::run(args)?,
    }
    Ok(())
}
