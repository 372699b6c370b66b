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
use std::time::Duration;

fn usage() -> ! {
    eprintln!(
        "usage: cylo-usage-workload burn MS | threads N MS | fork N | storm N | daemon MS | \
         clone-parent | vfork | exec-from-thread PATH [ARGS]"
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

fn burn(ms: u64) {
    let until = thread_cpu() + Duration::from_millis(ms);
    let mut x = 0u64;
    while thread_cpu() < until {
        for i in 0..10_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
    }
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("burn") => burn(num(args.get(1))),
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
        _ => usage(),
    }
}
