//! The one initramfs every guest of an architecture boots: static busybox, the binaries and
//! fixtures at their host paths, each kernel's staged modules, and the `/init` script that
//! runs the tests and reports through markers on the serial console ([`super::MARK`]).
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::MARK;
use super::binaries::Built;
use super::files::{copy, set_mode, write};
use super::modules::MODULES_LIST;
use crate::cmd::output;

/// Where the guest puts the test binaries.
const GUEST_TEST_DIR: &str = "vm-test/bin";
/// Where the guest mounts its scratch disk (`/dev/vda`, ext4) for the disk tests.
const GUEST_DISK_DIR: &str = "/mnt/disk";
/// Data folders of each package copied into the guest at the same absolute path (fixtures).
const DATA_DIRS: &[&str] = &["tests", "fixtures", "testdata"];
/// Upper bound for the fixtures copied into the initramfs.
const MAX_DATA_BYTES: u64 = 64 << 20;

/// `modules`: staged module trees ([`super::modules::stage_modules`]), one per kernel, merged at the root (each
/// under its own `lib/modules/<release>`).
///
/// `busybox`: the guest's static busybox ([`super::busybox`]); its applets are those the
/// host's `/bin/busybox` lists (the same Debian package, of another architecture perhaps).
pub(super) fn build_initramfs(
    vm_dir: &Path,
    built: &Built,
    busybox: &Path,
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
    copy(busybox, &root.join("bin/busybox"))?;
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
if RUST_LOG=cylo_usage::kernel=debug "$CU" features --json >/tmp/features.json 2>/tmp/features.err; then
    # What each program cost this kernel's verifier.
    grep -o 'verified .*' /tmp/features.err | while read -r line; do note "$line"; done
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
