//! `cylo-usage-workload`: process trees with known shapes, for cylo-usage's tests and
//! benchmarks. Every mode does exactly what its description says, so a test knows the ground
//! truth (how many processes and threads, how much CPU) without asking the kernel.
//!
//! Modes:
//! - `burn MS`: burn MS ms of this thread's CPU time.
//! - `threads N MS`: N extra threads, each burning MS ms of CPU; joined.
//! - `fork N`: N children, all alive at once (blocked on a pipe), then released together;
//!   every one is waited for.
//! - `storm N`: N children, one after another, each exiting at once; every one waited for.
//! - `daemon MS`: double fork with setsid; the grandchild, reparented away from the root,
//!   burns MS ms of CPU after the root has exited.
//! - `clone-parent`: a child made with CLONE_PARENT (its parent is our parent, not us).
//! - `vfork`: a child made with clone(CLONE_VM | CLONE_VFORK) (posix_spawn of /bin/true).
//! - `exec-from-thread PATH [ARGS]`: a second thread execs PATH (the kernel makes it the
//!   leader and kills the old one).
//! - `write-direct FILE MIB [BLOCK]` / `read-direct FILE MIB [BLOCK]`: MIB MiB with O_DIRECT,
//!   BLOCK bytes (a multiple of 4096; default 1 MiB) per syscall.
//! - `write FILE MIB fsync|truncate|none`: MIB MiB buffered, then fsync, or truncate to 0
//!   before writeback, or nothing.
//! - `read FILE`: read FILE to its end (buffered).
//! - `mem A B MS`: the process touches A MiB and a child B MiB; both hold them together for
//!   MS ms (synchronised through pipes), then exit.
//! - `pidns N`: enter a new pid namespace, then fork N children (the first is its init).
//! - `hostile-name MS`: rename itself to a name that breaks naive /proc parsers, burn MS ms.
//! - `spike MIB MS AFTER [small]`: touch MIB MiB, hold them MS ms, unmap them, then live
//!   AFTER ms more; `small` asks for 4 KiB pages (no transparent huge pages): one fault each.
//! - `attach-target K`: a tree to attach to that keeps forking: K workers and a forker that
//!   makes a new child every 2 ms or so (3,000 at most); every process blocks reading stdin until it
//!   is closed, then burns 5 ms (workers 50 ms) and exits. Nothing exits before stdin is
//!   closed. At the end the root prints how many processes the tree had, itself included.
//! - `hold N`: N children that block reading stdin until it is closed, then exit; the root
//!   waits for them.
//! - `bomb N`: a fork bomb of exactly N processes, itself included: each process forks two
//!   subtrees that share what is left, then waits for them (a fork that hits the pid limit is
//!   retried until pids free up).
//! - `net MODE ...`: socket traffic with known byte counts (see `workload/net.rs`).
//! - `left-threads N MS`: N threads of MS ms of CPU each (half in the kernel), joined,
//!   beside a child that spent MS ms in the kernel; prints `ready` once all that is done,
//!   and both wait for stdin to close.
//! - `hold-threads N T`: `hold N`, and T more threads in the root, blocked reading stdin too:
//!   1 + N processes, 1 + N + T threads until stdin is closed.
//! - `escape T FILE`: T threads, each of which double-forks a daemon (a new session, its
//!   parent gone) that appends its pid to FILE and sleeps 600 s; the threads sleep too. What
//!   a tracker that loses a task lets escape a kill.
//! - `chars N`: read N bytes from /dev/zero and write them to /dev/null (N read chars and N
//!   written chars), then say on stderr which effective uid it ran with (a setuid copy runs
//!   with its owner's).
//! - `past-lives THREAD_MS CHILD_MS BYTES FILE`: a past to attach to. A thread burns
//!   THREAD_MS ms of CPU and moves BYTES chars (as `chars`), then exits and is joined; a child
//!   does the same with CHILD_MS and is waited for. Then it writes to FILE what
//!   `getrusage(RUSAGE_SELF)` and `getrusage(RUSAGE_CHILDREN)` say, as
//!   `self_user_us self_system_us children_user_us children_system_us`, prints `ready` and
//!   idles until stdin is closed. `past-lives ... leader-exits`: the main thread burns
//!   THREAD_MS ms more, starts the thread that writes FILE and idles, and exits (the process
//!   lives on with a zombie leader).
//! - `snapshot PID`: prints `cylo_usage::get_resource_usage(PID)` as JSON; on an error,
//!   prints it on stderr and exits with 3 (permission denied), 4 (no such process) or 1.
//! - `poll-usage SOCKET T`: a session of the daemon at SOCKET whose tree is `hold-threads 0 T`
//!   (1 process, 1 + T threads); prints `ready` once every thread is followed, then asks for
//!   the session's usage (totals) back to back until stdin is closed, and prints how many
//!   answers it got. Exits with 1 if a request fails.
use std::time::Duration;

mod net;

fn usage() -> ! {
    eprintln!(
        "usage: cylo-usage-workload burn MS | threads N MS | fork N | storm N | storm-timed N | daemon MS | \
         clone-parent | vfork | exec-from-thread PATH [ARGS] | write-direct FILE MIB [BLOCK] | \
         read-direct FILE MIB [BLOCK] | write FILE MIB fsync|truncate|none | read FILE | \
         mem A B MS | pidns N | hostile-name MS | spike MIB MS AFTER [small] | \
         attach-target K | hold N | bomb N | bomb-mark FILE N | hold-threads N T | left-threads N MS | escape T FILE | chars N | \
         past-lives THREAD_MS CHILD_MS BYTES FILE | \
         snapshot PID | net MODE ... | poll-usage SOCKET T | mix N MS [TINY]"
    );
    std::process::exit(2)
}

fn num(arg: Option<&String>) -> u64 {
    arg.and_then(|a| a.parse().ok()).unwrap_or_else(|| usage())
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Spends about `ms` of this thread's CPU time in user mode. The thread's CPU clock is a
/// system call (the vDSO does not serve it), so it is read once every 100,000 steps (about
/// 0.1 ms here): under arm64 emulation, where a system call costs far more than the steps,
/// reading it every 10,000 made half of this "user" time system time.
fn burn(ms: u64) {
    let until = thread_cpu() + Duration::from_millis(ms);
    let mut x = 0u64;
    while thread_cpu() < until {
        for i in 0..100_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
    }
}

/// Spends about `ms` of this thread's CPU time in the kernel: reads of /dev/zero, 64 KiB
/// at a time (the copy to user memory is system time).
fn syscalls(ms: u64) {
    let until = thread_cpu() + Duration::from_millis(ms);
    let mut f = std::fs::File::open("/dev/zero").expect("/dev/zero");
    let mut buf = vec![0u8; 64 << 10];
    while thread_cpu() < until {
        use std::io::Read;
        let _ = f.read(&mut buf);
    }
}

/// `mix N MS [TINY]`: N children, each spending MS of CPU with its own mix of user and system
/// time (child i spends i/(N-1) of it in syscalls), then TINY children one after the other,
/// each 2 ms in syscalls (mostly too short for a tick sample: the kernel counts such a
/// process's time as user time), all reaped by this process, which does a mix too.
fn mix(n: u64, ms: u64, tiny: u64) {
    for i in 0..n {
        if fork() == 0 {
            let sys = ms * i / n.saturating_sub(1).max(1);
            syscalls(sys);
            burn(ms - sys);
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
    }
    syscalls(ms / 2);
    burn(ms / 2);
    for _ in 0..tiny {
        if fork() == 0 {
            syscalls(2);
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: reaps that child.
        unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) };
    }
    wait_all();
}

fn fork() -> libc::pid_t {
    // SAFETY: the children below only call async-signal-safe functions before _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("fork: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    pid
}

fn wait_all() {
    // SAFETY: plain waitpid loop.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) } > 0 {}
}

/// Anonymous memory of `mib` MiB with every page written; `small`: no huge pages.
fn touch(mib: u64, small: bool) -> (*mut libc::c_void, usize) {
    let len = (mib as usize) << 20;
    if len == 0 {
        return (std::ptr::null_mut(), 0);
    }
    // SAFETY: a fresh private anonymous mapping, written page by page within its length.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            eprintln!("mmap: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        if small {
            libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
        }
        for off in (0..len).step_by(4096) {
            *(p as *mut u8).add(off) = 1;
        }
        (p, len)
    }
}

fn check(what: &str, r: std::io::Result<()>) {
    if let Err(e) = r {
        eprintln!("{what}: {e}");
        std::process::exit(1);
    }
}

/// A 1 MiB buffer aligned for O_DIRECT.
struct Aligned(*mut u8);

impl Aligned {
    const LAYOUT: std::alloc::Layout = match std::alloc::Layout::from_size_align(1 << 20, 4096) {
        Ok(l) => l,
        Err(_) => panic!("valid layout"),
    };
    fn new() -> Aligned {
        // SAFETY: non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(Self::LAYOUT) };
        assert!(!p.is_null(), "allocation");
        Aligned(p)
    }
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is 1 MiB long and ours.
        unsafe { std::slice::from_raw_parts_mut(self.0, 1 << 20) }
    }
}

fn direct(path: &str, write: bool) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.custom_flags(libc::O_DIRECT);
    if write {
        o.write(true).create(true).truncate(true);
    } else {
        o.read(true);
    }
    o.open(path).unwrap_or_else(|e| {
        eprintln!("open {path} with O_DIRECT: {e}");
        std::process::exit(1)
    })
}

/// Blocks until stdin reaches its end (the parent closed it).
fn until_stdin_closes() {
    let mut b = [0u8; 64];
    // SAFETY: reads into a local buffer until EOF or an error.
    while unsafe { libc::read(0, b.as_mut_ptr().cast(), b.len()) } > 0 {}
}

/// Whether stdin is at its end now.
fn stdin_closed() -> bool {
    let mut p = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & (libc::POLLHUP | libc::POLLIN) != 0 }
}

/// `poll-usage SOCKET T` (see the module's documentation).
fn poll_usage(socket: &std::path::Path, threads: u64) {
    use std::io::Write;
    let fail = |what: &str, e: &dyn std::error::Error| -> ! {
        eprintln!("poll-usage: {what}: {}", cylo_usage::error_chain(e));
        std::process::exit(1)
    };
    let tracker = cylo_usage::Tracker::connect(socket).unwrap_or_else(|e| fail("connect", &e));
    let me = std::env::current_exe().unwrap_or_else(|e| fail("current_exe", &e));
    // The tree holds until the write end of its stdin goes.
    let (r, holder) = std::io::pipe().unwrap_or_else(|e| fail("pipe", &e));
    let mut cmd = std::process::Command::new(me);
    cmd.args(["hold-threads", "0", &threads.to_string()])
        .stdin(r);
    let run = tracker
        .spawn(&mut cmd)
        .unwrap_or_else(|e| fail("spawn", &e));
    loop {
        let u = run.usage_totals().unwrap_or_else(|e| fail("usage", &e));
        if u.thread_count > threads {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut polls = 0u64;
    while !stdin_closed() {
        run.usage_totals().unwrap_or_else(|e| fail("usage", &e));
        polls += 1;
    }
    drop(holder);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail("tokio", &e));
    rt.block_on(run.wait_finished())
        .unwrap_or_else(|e| fail("wait", &e));
    println!("{polls}");
}

/// The most children `attach-target`'s forker makes.
const ATTACH_TARGET_MAX: u64 = 3_000;

fn attach_target(workers: u64) {
    for _ in 0..workers {
        if fork() == 0 {
            until_stdin_closes();
            burn(50);
            // SAFETY: ends the child.
            unsafe { libc::_exit(0) };
        }
    }
    // The forker reports its count through a pipe.
    let mut fds = [0; 2];
    // SAFETY: valid array for pipe().
    unsafe { libc::pipe(fds.as_mut_ptr()) };
    if fork() == 0 {
        let mut made: u64 = 0;
        // At most ATTACH_TARGET_MAX children, one every 2 ms, so a slow machine (an emulated
        // CPU) cannot run out of pids or memory before stdin closes.
        while !stdin_closed() && made < ATTACH_TARGET_MAX {
            // SAFETY: the child only reads, burns and _exits.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                break; // out of pids or memory: the count stays true
            }
            if pid == 0 {
                until_stdin_closes();
                burn(5);
                // SAFETY: ends the child.
                unsafe { libc::_exit(0) };
            }
            made += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        let bytes = made.to_le_bytes();
        // SAFETY: writes 8 bytes from a local.
        unsafe { libc::write(fds[1], bytes.as_ptr().cast(), 8) };
        wait_all();
        burn(5);
        // SAFETY: ends the child.
        unsafe { libc::_exit(0) };
    }
    let mut bytes = [0u8; 8];
    // SAFETY: reads 8 bytes into a local.
    unsafe {
        libc::close(fds[1]);
        libc::read(fds[0], bytes.as_mut_ptr().cast(), 8);
    }
    wait_all();
    // The root, the workers, the forker and what it made.
    println!("{}", 1 + workers + 1 + u64::from_le_bytes(bytes));
}

/// Reads `n` bytes from /dev/zero and writes them to /dev/null: `n` read chars and `n`
/// written chars in this thread's I/O accounting.
fn move_chars(n: u64) {
    use std::io::{Read, Write};
    let mut zero = std::fs::File::open("/dev/zero").unwrap_or_else(|e| {
        eprintln!("open /dev/zero: {e}");
        std::process::exit(1)
    });
    let mut null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap_or_else(|e| {
            eprintln!("open /dev/null: {e}");
            std::process::exit(1)
        });
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n as usize;
    while left > 0 {
        let chunk = &mut buf[..left.min(64 * 1024)];
        check("read", zero.read_exact(chunk));
        check("write", null.write_all(chunk));
        left -= chunk.len();
    }
}

/// `past-lives`: work done by a thread that has exited and by a child that was reaped, then
/// the kernel's own account of it (getrusage) in `file`, then idleness until stdin closes.
fn past_lives(thread_ms: u64, child_ms: u64, bytes: u64, file: String, leader_exits: bool) {
    std::thread::spawn(move || {
        burn(thread_ms);
        move_chars(bytes);
    })
    .join()
    .expect("the burning thread");
    if fork() == 0 {
        burn(child_ms);
        move_chars(bytes);
        // SAFETY: ends the child.
        unsafe { libc::_exit(0) };
    }
    wait_all();
    if leader_exits {
        burn(thread_ms);
        move_chars(bytes);
        std::thread::spawn(move || {
            report_and_idle(&file);
            std::process::exit(0);
        });
        // SAFETY: the raw exit system call ends the main thread only (pthread_exit would
        // unwind through Rust's main and abort); the process lives on in the thread above.
        // No destructor of this thread's stack runs, and nothing here needs one.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
        unreachable!("exit returned");
    }
    report_and_idle(&file);
}

/// `past-lives`' end: getrusage SELF and CHILDREN to `file`, `ready`, then idleness until
/// stdin is closed.
fn report_and_idle(file: &str) {
    let usage = |who| {
        // SAFETY: getrusage fills a plain struct.
        let ru = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::getrusage(who, &mut ru);
            ru
        };
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        format!("{} {}", us(ru.ru_utime), us(ru.ru_stime))
    };
    let line = format!(
        "{} {}\n",
        usage(libc::RUSAGE_SELF),
        usage(libc::RUSAGE_CHILDREN)
    );
    check("write the usage file", std::fs::write(file, line));
    println!("ready");
    until_stdin_closes();
}

/// `bomb-mark`'s marks (null: none): FILE mapped shared, a count (u64) of the processes that
/// ran, then a pid (u32) for each, in the order they counted.
static MARKS: std::sync::atomic::AtomicPtr<u8> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
/// How many pids the marks have room for.
static MARK_SLOTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts this process in the marks, if there are any: the process ran an instruction of its
/// own. The count comes first and takes no system call (a process killed at its first system
/// call's exit, or at a page fault's return, has counted already); the pid follows.
fn mark() {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    let base = MARKS.load(Ordering::Relaxed);
    if base.is_null() {
        return;
    }
    // SAFETY: `base` is a shared mapping of 8 + 4 * MARK_SLOTS bytes, page-aligned, that
    // every process of the bomb inherits; its words are only accessed atomically.
    let count = unsafe { &*base.cast::<AtomicU64>() };
    let i = count.fetch_add(1, Ordering::SeqCst) as usize;
    if i < MARK_SLOTS.load(Ordering::Relaxed) {
        // SAFETY: getpid cannot fail; slot `i` is within the mapping.
        let pid = unsafe { libc::getpid() } as u32;
        let slot = unsafe { &*base.add(8).cast::<AtomicU32>().add(i) };
        slot.store(pid, Ordering::SeqCst);
    }
}

/// Maps `path` as `bomb-mark`'s marks, room for `slots` pids.
fn map_marks(path: &str, slots: usize) {
    let fail = |what: &str, e: std::io::Error| -> ! {
        eprintln!("{what} {path}: {e}");
        std::process::exit(1)
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| fail("open", e));
    let len = 8 + 4 * slots;
    file.set_len(len as u64)
        .unwrap_or_else(|e| fail("sizing", e));
    // SAFETY: a fresh shared mapping of the file, kept for the life of the process.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        fail("mmap", std::io::Error::last_os_error());
    }
    MARK_SLOTS.store(slots, std::sync::atomic::Ordering::Relaxed);
    MARKS.store(p.cast(), std::sync::atomic::Ordering::Relaxed);
}

/// A fork for the bomb. Marking, a raw `clone` system call: glibc's `fork()` makes a system
/// call in the child (`set_robust_list`) before returning, which would hide a child that
/// ran user code up to its first system call; the child of a raw clone counts itself at
/// once (see `mark`).
fn bomb_fork() -> libc::pid_t {
    if MARKS.load(std::sync::atomic::Ordering::Relaxed).is_null() {
        // SAFETY: the child only recurses into fork/waitpid/_exit.
        return unsafe { libc::fork() };
    }
    // SAFETY: clone(SIGCHLD) with no new stack, tids or TLS is fork() without glibc's child
    // handlers: the child shares nothing, and only recurses into marks, clones, waitpid
    // and _exit (no locks, no allocation before its first system call).
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) as libc::pid_t
    }
}

/// This process and `rest` more below it, split between two subtrees.
fn bomb(rest: u64) {
    mark();
    let first = rest.div_ceil(2);
    let subtrees = [first, rest - first];
    for size in subtrees.into_iter().filter(|&n| n > 0) {
        loop {
            let pid = bomb_fork();
            if pid == 0 {
                bomb(size - 1);
                // SAFETY: ends the child.
                unsafe { libc::_exit(0) };
            }
            if pid > 0 {
                break;
            }
            // Out of pids or memory for a moment: wait for some to free up.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    wait_all();
}

/// Double-forks a daemon that appends its pid to `file` and sleeps 600 s.
fn escape_daemon(file: &str) {
    let path = std::ffi::CString::new(file).unwrap_or_else(|_| usage());
    let child = fork();
    if child == 0 {
        // SAFETY: async-signal-safe calls only in the forked children of a threaded process.
        unsafe {
            libc::setsid();
            if libc::fork() == 0 {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT,
                    0o644,
                );
                let mut line = [0u8; 16];
                let mut n = libc::getpid() as u32;
                let mut i = line.len() - 1;
                line[i] = b'\n';
                loop {
                    i -= 1;
                    line[i] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                libc::write(fd, line[i..].as_ptr().cast(), line.len() - i);
                libc::close(fd);
                let ts = libc::timespec {
                    tv_sec: 600,
                    tv_nsec: 0,
                };
                libc::nanosleep(&ts, std::ptr::null_mut());
            }
            libc::_exit(0);
        }
    }
    // SAFETY: reaps the one child.
    unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("burn") => burn(num(args.get(1))),
        Some("mix") => mix(
            num(args.get(1)),
            num(args.get(2)),
            args.get(3).map_or(0, |a| num(Some(a))),
        ),
        Some("threads") => {
            let n = num(args.get(1));
            let ms = num(args.get(2));
            let handles: Vec<_> = (0..n)
                .map(|_| std::thread::spawn(move || burn(ms)))
                .collect();
            for h in handles {
                h.join().expect("worker thread");
            }
        }
        Some("fork") => {
            let n = num(args.get(1));
            let mut fds = [0; 2];
            // SAFETY: valid array for pipe().
            unsafe { libc::pipe(fds.as_mut_ptr()) };
            for _ in 0..n {
                if fork() == 0 {
                    let mut b = [0u8; 1];
                    // SAFETY: async-signal-safe calls only; blocks until the parent closes.
                    unsafe {
                        libc::close(fds[1]);
                        libc::read(fds[0], b.as_mut_ptr().cast(), 1);
                        libc::_exit(0);
                    }
                }
            }
            // SAFETY: closing our ends releases every child at once.
            unsafe {
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            wait_all();
        }
        Some("storm-timed") => {
            // `storm N`, timed by the storm itself (so that a tracer's start-up is left out):
            // prints `storm_ns NS`.
            let start = std::time::Instant::now();
            for _ in 0..num(args.get(1)) {
                if fork() == 0 {
                    // SAFETY: exits the child at once.
                    unsafe { libc::_exit(0) };
                }
                // SAFETY: reap the one child.
                unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) };
            }
            println!("storm_ns {}", start.elapsed().as_nanos());
        }
        Some("storm") => {
            for _ in 0..num(args.get(1)) {
                if fork() == 0 {
                    // SAFETY: exits the child at once.
                    unsafe { libc::_exit(0) };
                }
                // SAFETY: reap the one child.
                unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) };
            }
        }
        Some("daemon") => {
            let ms = num(args.get(1));
            if fork() == 0 {
                // SAFETY: setsid in the child; then the grandchild is orphaned by _exit.
                unsafe { libc::setsid() };
                if fork() == 0 {
                    std::thread::sleep(Duration::from_millis(100));
                    burn(ms);
                    std::process::exit(0);
                }
                // SAFETY: leave the grandchild behind without waiting for it.
                unsafe { libc::_exit(0) };
            }
            wait_all();
        }
        Some("clone-parent") => {
            // SAFETY: raw clone with no new stack behaves like fork; the child exits at once.
            let pid = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    libc::CLONE_PARENT as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
            if pid == 0 {
                std::thread::sleep(Duration::from_millis(100));
                // SAFETY: exit the child.
                unsafe { libc::_exit(0) };
            }
            if pid < 0 {
                eprintln!("clone: {}", std::io::Error::last_os_error());
                std::process::exit(1);
            }
        }
        Some("vfork") => {
            // glibc's posix_spawn creates the child with clone(CLONE_VM | CLONE_VFORK): a
            // vfork that is safe to use from Rust.
            let path = c"/bin/true";
            let argv = [path.as_ptr() as *mut libc::c_char, std::ptr::null_mut()];
            let mut pid = 0;
            // SAFETY: valid NUL-terminated path and argv; default attributes.
            let rc = unsafe {
                libc::posix_spawn(
                    &mut pid,
                    path.as_ptr(),
                    std::ptr::null(),
                    std::ptr::null(),
                    argv.as_ptr(),
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                eprintln!("posix_spawn: {}", std::io::Error::from_raw_os_error(rc));
                std::process::exit(1);
            }
            wait_all();
        }
        Some("exec-from-thread") => {
            let path = args.get(1).cloned().unwrap_or_else(|| usage());
            let rest: Vec<String> = args[2..].to_vec();
            let t = std::thread::spawn(move || {
                let mut cmd = std::process::Command::new(path);
                cmd.args(rest);
                let err = std::os::unix::process::CommandExt::exec(&mut cmd);
                eprintln!("exec: {err}");
                std::process::exit(1);
            });
            let _ = t.join();
        }
        Some("write-direct") | Some("read-direct") => {
            use std::io::{Read, Write};
            let write = args[0] == "write-direct";
            let path = args.get(1).cloned().unwrap_or_else(|| usage());
            let mib = num(args.get(2));
            let block = args.get(3).map_or(1 << 20, |b| num(Some(b))) as usize;
            if block == 0 || !block.is_multiple_of(4096) || block > 1 << 20 {
                usage();
            }
            let mut f = direct(&path, write);
            let mut buf = Aligned::new();
            for _ in 0..(mib << 20) / block as u64 {
                let chunk = &mut buf.buf()[..block];
                if write {
                    check("write", f.write_all(chunk));
                } else {
                    check("read", f.read_exact(chunk));
                }
            }
        }
        Some("write") => {
            use std::io::Write;
            let path = args.get(1).cloned().unwrap_or_else(|| usage());
            let mib = num(args.get(2));
            let mut f = std::fs::File::create(&path).unwrap_or_else(|e| {
                eprintln!("create {path}: {e}");
                std::process::exit(1)
            });
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..mib {
                check("write", f.write_all(&chunk));
            }
            match args.get(3).map(String::as_str) {
                Some("fsync") => check("fsync", f.sync_all()),
                Some("truncate") => check("truncate", f.set_len(0)),
                Some("none") => {}
                _ => usage(),
            }
        }
        Some("chars") => {
            move_chars(num(args.get(1)));
            // SAFETY: geteuid has no preconditions.
            eprintln!("chars: euid {}", unsafe { libc::geteuid() });
        }
        Some("past-lives") => {
            let (thread_ms, child_ms, bytes) =
                (num(args.get(1)), num(args.get(2)), num(args.get(3)));
            let file = args.get(4).cloned().unwrap_or_else(|| usage());
            let leader_exits = match args.get(5).map(String::as_str) {
                None => false,
                Some("leader-exits") => true,
                Some(_) => usage(),
            };
            past_lives(thread_ms, child_ms, bytes, file, leader_exits);
        }
        Some("read") => {
            let path = args.get(1).cloned().unwrap_or_else(|| usage());
            let mut f = std::fs::File::open(&path).unwrap_or_else(|e| {
                eprintln!("open {path}: {e}");
                std::process::exit(1)
            });
            check(
                "read",
                std::io::copy(&mut f, &mut std::io::sink()).map(|_| ()),
            );
        }
        Some("mem") => {
            let (a, b, ms) = (num(args.get(1)), num(args.get(2)), num(args.get(3)));
            let (mut ready, mut go) = ([0; 2], [0; 2]);
            // SAFETY: valid arrays for pipe().
            unsafe {
                libc::pipe(ready.as_mut_ptr());
                libc::pipe(go.as_mut_ptr());
            }
            let byte = |fd: i32, write: bool| {
                let mut b = [1u8];
                // SAFETY: one byte to or from a pipe we own.
                unsafe {
                    if write {
                        libc::write(fd, b.as_ptr().cast(), 1);
                    } else {
                        libc::read(fd, b.as_mut_ptr().cast(), 1);
                    }
                }
            };
            if fork() == 0 {
                let _mem = touch(b, false);
                byte(ready[1], true); // "touched"
                byte(go[0], false); // wait until the parent has held for MS
                std::process::exit(0);
            }
            let _mem = touch(a, false);
            byte(ready[0], false);
            std::thread::sleep(Duration::from_millis(ms));
            byte(go[1], true);
            wait_all();
        }
        Some("pidns") => {
            let n = num(args.get(1));
            // SAFETY: unshare only affects the children created after it.
            if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
                eprintln!("unshare(CLONE_NEWPID): {}", std::io::Error::last_os_error());
                std::process::exit(1);
            }
            for _ in 0..n {
                if fork() == 0 {
                    std::thread::sleep(Duration::from_millis(50));
                    // SAFETY: exits the child.
                    unsafe { libc::_exit(0) };
                }
            }
            wait_all();
        }
        Some("hostile-name") => {
            let name = c") 0 0 (x\n";
            // SAFETY: a NUL-terminated name of at most 16 bytes.
            unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
            burn(num(args.get(1)));
        }
        Some("spike") => {
            let (mib, ms, after) = (num(args.get(1)), num(args.get(2)), num(args.get(3)));
            let small = args.get(4).map(String::as_str) == Some("small");
            let (p, len) = touch(mib, small);
            std::thread::sleep(Duration::from_millis(ms));
            // SAFETY: unmaps exactly the mapping made above.
            unsafe { libc::munmap(p, len) };
            std::thread::sleep(Duration::from_millis(after));
        }
        Some("attach-target") => attach_target(num(args.get(1))),
        Some("bomb") => bomb(num(args.get(1)).max(1) - 1),
        Some("bomb-mark") => {
            // `bomb-mark FILE N`: a bomb whose every process counts itself in FILE (mapped
            // shared) before anything else, then writes its pid there: the ground truth of
            // how many ran (see `mark`).
            let path = args.get(1).cloned().unwrap_or_else(|| usage());
            let n = num(args.get(2)).max(1);
            map_marks(&path, n as usize);
            bomb(n - 1)
        }
        Some("left-threads") => {
            // N threads of MS ms of CPU each (half system, half user), all exited, beside a
            // child that spent MS ms in the kernel; both then wait for stdin to close. "ready"
            // on stdout once all that is done: a live snapshot then sees two live processes,
            // one with threads that have left.
            let (n, ms) = (num(args.get(1)), num(args.get(2)));
            let mut ends = [0 as libc::c_int; 2];
            // SAFETY: a pipe into a local array.
            if unsafe { libc::pipe(ends.as_mut_ptr()) } != 0 {
                eprintln!("pipe: {}", std::io::Error::last_os_error());
                std::process::exit(1);
            }
            if fork() == 0 {
                syscalls(ms);
                // SAFETY: one byte to the pipe's write end.
                unsafe { libc::write(ends[1], b"x".as_ptr().cast(), 1) };
                until_stdin_closes();
                // SAFETY: ends the child.
                unsafe { libc::_exit(0) };
            }
            let threads: Vec<_> = (0..n)
                .map(|_| {
                    std::thread::spawn(move || {
                        syscalls(ms / 2);
                        burn(ms / 2);
                    })
                })
                .collect();
            for h in threads {
                h.join().expect("thread");
            }
            let mut b = [0u8; 1];
            // SAFETY: one byte from the pipe's read end into a local.
            unsafe { libc::read(ends[0], b.as_mut_ptr().cast(), 1) };
            println!("ready");
            until_stdin_closes();
            wait_all();
        }
        Some("hold-threads") => {
            let (n, t) = (num(args.get(1)), num(args.get(2)));
            for _ in 0..n {
                if fork() == 0 {
                    until_stdin_closes();
                    // SAFETY: ends the child.
                    unsafe { libc::_exit(0) };
                }
            }
            let threads: Vec<_> = (0..t)
                .map(|_| std::thread::spawn(until_stdin_closes))
                .collect();
            until_stdin_closes();
            for h in threads {
                h.join().expect("thread");
            }
            wait_all();
        }
        Some("snapshot") => {
            let pid: i64 = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| usage());
            match cylo_usage::get_resource_usage(pid as libc::pid_t) {
                Ok(u) => println!("{}", serde_json::to_string(&u).expect("serialisable")),
                Err(e) => {
                    eprintln!("{}", cylo_usage::error_chain(&e));
                    let code = if e.is_permission_denied() {
                        3
                    } else if e.is_no_such_process() {
                        4
                    } else {
                        1
                    };
                    std::process::exit(code);
                }
            }
        }
        Some("hold") => {
            for _ in 0..num(args.get(1)) {
                if fork() == 0 {
                    until_stdin_closes();
                    // SAFETY: ends the child.
                    unsafe { libc::_exit(0) };
                }
            }
            wait_all();
        }
        Some("escape") => {
            let threads = num(args.get(1));
            let file = args.get(2).cloned().unwrap_or_else(|| usage());
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let file = file.clone();
                    std::thread::spawn(move || {
                        escape_daemon(&file);
                        std::thread::sleep(Duration::from_secs(600));
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("thread");
            }
        }
        Some("net") => net::main(&args[1..]),
        Some("poll-usage") => {
            let socket = args.get(1).unwrap_or_else(|| usage());
            poll_usage(std::path::Path::new(socket), num(args.get(2)));
        }
        _ => usage(),
    }
}
