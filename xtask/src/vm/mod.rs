//! `cargo xtask vm-test`: boot other kernels under qemu (TCG) and run the test suite in each.
//!
//! The guest architecture is `--arch` ([`arch`]): x86-64 (the default), whose files are in
//! `target/vm/`, or arm64, whose files (the cache, the initramfs, `<kernel>/console.log`, the
//! matrix) are in `target/vm/arm64/` instead; both build in `target/vm/build`, each in its
//! Rust target's folder.
//!
//! Steps, one module each:
//! 1. [`host`]: `qemu-system-x86_64` (or `qemu-system-aarch64`), a static `/bin/busybox`,
//!    `mkfs.ext4` and `xz`, and for a guest of another architecture than the host's the cross
//!    gcc and C library, installed from Debian's packages when missing.
//! 2. [`kernels`], through [`apt`]: Debian's cloud kernels (5.10 bullseye, 6.1 bookworm, 6.12
//!    trixie), resolved from each suite's `linux-image-cloud-<arch>` meta-package with a private
//!    apt configuration (the system's sources stay untouched), downloaded once into
//!    `target/vm/cache/`; [`modules`]: their virtio and ext4 modules, staged for the guest. For
//!    another architecture than the host's, the guest's static busybox comes the same way.
//! 3. [`binaries`]: the workspace's tests and the `cylo-usage` binary, built static (glibc
//!    `crt-static`) into `target/vm/build`.
//! 4. [`initramfs`]: static busybox, the binaries (cylo-usage at the same absolute path as on
//!    the host, since tests find it through `env!("CARGO_BIN_EXE_cylo-usage")`), each kernel's
//!    virtio modules under `/lib/modules/<release>`, and an `/init` that mounts what the tests
//!    need (the scratch disk `/dev/vda` on `/mnt/disk` for the disk tests), runs every test
//!    binary and powers off.
//! 5. [`qemu`], for each kernel: a fresh sparse ext4 scratch disk
//!    `target/vm/<kernel>/disk.img` (mkfs.ext4, from e2fsprogs), boot, capture the serial
//!    console to `target/vm/<kernel>/console.log`. Several guests boot at once ([`jobs`]:
//!    `--jobs`, by default as many as the host has CPUs and memory for), each from a queue of
//!    the kernels in their given order, each in its own folder; they share only the kernels
//!    and the initramfs, which they read. Progress lines name their kernel.
//! 6. [`results`]: parse libtest's output; [`report`]: write `target/vm/matrix.md` and
//!    `target/vm/matrix.json`, the kernels in their given order.
mod apt;
mod arch;
mod binaries;
mod busybox;
mod files;
mod host;
mod initramfs;
mod jobs;
mod kernels;
mod modules;
mod qemu;
mod report;
mod results;

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::paths;
use arch::Arch;

/// Prefix of every line the guest's `/init` prints for the host to parse.
const MARK: &str = "@@vm-test@@";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Guest architecture: `x86_64` (or `amd64`) or `arm64` (or `aarch64`).
    #[arg(long, value_name = "ARCH", default_value = "x86_64", value_parser = parse_arch)]
    arch: Arch,
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
    /// Guest memory (qemu `-m`: MiB, or with a suffix such as `2G`).
    #[arg(long, default_value = "2G")]
    memory: String,
    /// Guests booted at once. Default: one per host CPU, as far as the available memory holds
    /// them (`--memory` each, plus qemu's own), at least 1; never more than the kernels.
    #[arg(long, short, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    jobs: Option<u32>,
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

fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse()
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let arch = args.arch;
    let guest_mib = jobs::memory_mib(&args.memory).context("--memory")?;
    let vm_dir = arch.vm_dir(&paths::vm_dir());
    let cache = vm_dir.join("cache");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;

    host::ensure_host_tools(arch)?;
    let kernels = kernels::resolve_kernels(&args, &cache)?;
    let labels: Vec<&str> = kernels.iter().map(|k| k.label.as_str()).collect();
    if let Some(label) = jobs::repeated(labels.iter().copied()) {
        bail!(
            "kernel {label} given twice: each guest needs a folder of its own, {}",
            vm_dir.join(label).display()
        );
    }
    let busybox = busybox::guest_busybox(arch, &cache, args.refresh)?;

    let t = Instant::now();
    let built = binaries::build_binaries(arch, &paths::vm_dir().join("build"))?;
    eprintln!(
        "vm-test: built {} {arch} test binaries and cylo-usage in {:.1} s",
        built.tests.len(),
        t.elapsed().as_secs_f64()
    );
    let modules: Vec<&Path> = kernels
        .iter()
        .filter_map(|k| k.modules.as_deref())
        .collect();
    let initrd = initramfs::build_initramfs(&vm_dir, &built, &busybox, &modules, &args.test_args)?;

    let host = jobs::Host::read();
    let requested = args.jobs.map(|n| n as usize);
    let lanes = host.jobs(requested, guest_mib, kernels.len());
    let why = match (requested, host.available_mib) {
        (Some(n), _) => format!("--jobs {n}"),
        (None, Some(mib)) => format!("{} CPUs, {mib} MiB available", host.cpus),
        (None, None) => format!("{} CPUs", host.cpus),
    };
    eprintln!(
        "vm-test: {lanes} {} at once for {} ({why}; {guest_mib} MiB per guest)",
        if lanes == 1 { "guest" } else { "guests" },
        labels.join(", ")
    );
    let guests = Instant::now();
    let runs = jobs::in_lanes(&kernels, lanes, |kernel| {
        let run = qemu::boot(kernel, &initrd, &vm_dir, &args, args.smp)?;
        if run.reached_init || run.timed_out || args.smp <= 1 {
            return Ok(run);
        }
        eprintln!(
            "vm-test: [{}] never reached /init with -smp {}; retrying with -smp 1",
            kernel.label, args.smp
        );
        qemu::boot(kernel, &initrd, &vm_dir, &args, 1)
    })?;
    eprintln!(
        "vm-test: guests done in {:.0} s, {lanes} at once (their own times add up to {:.0} s)",
        guests.elapsed().as_secs_f64(),
        runs.iter().map(|r| r.total_seconds).sum::<f64>()
    );

    let report = report::Report::new(arch, runs, &built);
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
