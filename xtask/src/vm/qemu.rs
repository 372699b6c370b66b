//! Booting one kernel under qemu (TCG) with the initramfs and a fresh ext4 scratch disk,
//! capturing its serial console, within a time limit.
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::host::find_in_path;
use super::kernels::Kernel;
use super::results::{BinaryResult, clean_line, parse_console};
use super::{Args, MARK};
use crate::cmd::run_quiet;

/// Size of each guest's scratch disk (a sparse file, formatted ext4 before each boot).
const DISK_BYTES: u64 = 512 << 20;

/// What one guest did.
#[derive(Debug, Serialize)]
pub(super) struct KernelRun {
    pub(super) kernel: Kernel,
    pub(super) smp: u32,
    /// `uname -r` in the guest.
    pub(super) uname: Option<String>,
    pub(super) reached_init: bool,
    pub(super) completed: bool,
    pub(super) timed_out: bool,
    pub(super) qemu_status: Option<String>,
    pub(super) boot_seconds: Option<f64>,
    pub(super) total_seconds: f64,
    pub(super) console_log: PathBuf,
    pub(super) notes: Vec<String>,
    pub(super) binaries: Vec<BinaryResult>,
    pub(super) features: Option<serde_json::Value>,
}

pub(super) fn boot(
    kernel: &Kernel,
    initrd: &Path,
    vm_dir: &Path,
    args: &Args,
    smp: u32,
) -> Result<KernelRun> {
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
    let arch = kernel.arch;
    let (qemu, _) = arch.qemu();
    let mut cmd = Command::new(qemu);
    cmd.args(arch.qemu_machine())
        .args(["-smp", &smp.to_string(), "-m", &args.memory])
        .args(["-nographic", "-nic", "none", "-no-reboot", "-kernel"])
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // loglevel=5: warnings and their stack traces (soft lockups, RCU stalls, splats) reach
        // the console, the boot's notices do not.
        .arg("-append")
        .arg(format!(
            "console={} panic=-1 quiet loglevel=5",
            arch.console()
        ));
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
    let timeout = args.timeout;
    eprintln!(
        "vm-test: [{}] booting {what} ({arch}, -smp {smp}, timeout {timeout} s)",
        kernel.label
    );
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("running {qemu}"))?;

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

    let deadline = started + Duration::from_secs(timeout);
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            timed_out = true;
            eprintln!(
                "vm-test: [{}] timed out after {timeout} s: killing qemu (pid {})",
                kernel.label,
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
