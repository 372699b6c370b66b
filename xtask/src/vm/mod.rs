//! `cargo xtask vm-test`: boot other kernels under qemu (TCG) and run the test suite in each.
//!
//! Steps, one module each:
//! 1. [`host`]: `qemu-system-x86_64`, a static `/bin/busybox`, `mkfs.ext4` and `xz`, installed
//!    from Debian's packages when missing.
//! 2. [`kernels`], through [`apt`]: Debian's cloud kernels (5.10 bullseye, 6.1 bookworm, 6.12
//!    trixie), resolved from each suite's `linux-image-cloud-amd64` meta-package with a private
//!    apt configuration (the system's sources stay untouched), downloaded once into
//!    `target/vm/cache/`; [`modules`]: their virtio and ext4 modules, staged for the guest.
//! 3. [`binaries`]: the workspace's tests and the `cylo-usage` binary, built static (glibc
//!    `crt-static`) into `target/vm/build`.
//! 4. [`initramfs`]: static busybox, the binaries (cylo-usage at the same absolute path as on
//!    the host, since tests find it through `env!("CARGO_BIN_EXE_cylo-usage")`), each kernel's
//!    virtio modules under `/lib/modules/<release>`, and an `/init` that mounts what the tests
//!    need (the scratch disk `/dev/vda` on `/mnt/disk` for the disk tests), runs every test
//!    binary and powers off.
//! 5. [`qemu`], per kernel: a fresh sparse ext4 scratch disk `target/vm/<kernel>/disk.img`
//!    (mkfs.ext4, from e2fsprogs), boot, capture the serial console to
//!    `target/vm/<kernel>/console.log`; [`results`]: parse libtest's output; [`report`]: write
//!    `target/vm/matrix.md` and `target/vm/matrix.json`.
mod apt;
mod binaries;
mod files;
mod host;
mod initramfs;
mod kernels;
mod modules;
mod qemu;
mod report;
mod results;

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::paths;

/// Prefix of every line the guest's `/init` prints for the host to parse.
const MARK: &str = "@@vm-test@@";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Kernels to boot: `5.10`, `6.1`, `6.12` (Debian cloud kernels) or a path to a vmlinuz.
    /// Repeatable; default: all three Debian kernels.
    #[arg(long = "kernel", value_name = "NAME", num_args = 1..)]
    kernels: Vec<String>,
    /// Seconds allowed per kernel for boot plus the whole suite (TCG is ~10x slower than KVM).
    #[arg(long, value_name = "SECS", default_value_t = 1500)]
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

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let vm_dir = paths::vm_dir();
    let cache = vm_dir.join("cache");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;

    host::ensure_host_tools()?;
    let kernels = kernels::resolve_kernels(&args, &cache)?;

    let t = Instant::now();
    let built = binaries::build_binaries(&vm_dir.join("build"))?;
    eprintln!(
        "vm-test: built {} test binaries and cylo-usage in {:.1} s",
        built.tests.len(),
        t.elapsed().as_secs_f64()
    );
    let modules: Vec<&Path> = kernels
        .iter()
        .filter_map(|k| k.modules.as_deref())
        .collect();
    let initrd = initramfs::build_initramfs(&vm_dir, &built, &modules, &args.test_args)?;

    let mut runs = Vec::new();
    for kernel in &kernels {
        let mut run = qemu::boot(kernel, &initrd, &vm_dir, &args, args.smp)?;
        if !run.reached_init && !run.timed_out && args.smp > 1 {
            eprintln!(
                "vm-test: [{}] never reached /init with -smp {}; retrying with -smp 1",
                kernel.label, args.smp
            );
            run = qemu::boot(kernel, &initrd, &vm_dir, &args, 1)?;
        }
        runs.push(run);
    }

    let report = report::Report::new(runs, &built);
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
