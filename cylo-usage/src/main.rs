//! The `cylo-usage` command line.
//!
//! Exit status follows GNU conventions: the command's own status, or 128+N when signal N
//! killed it; 125 when cylo-usage itself fails (bad usage included); 126 when the command
//! cannot be run; 127 when it is not found.
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use std::time::{Duration, Instant};

mod cli;

use clap::{Args, CommandFactory, Parser, Subcommand};
use cylo_usage::report;
use cylo_usage::{
    AnyRun, AnyTracker, OpenOptions, ResourceUsage, RunOptions, Tracker, TrackerKind,
};
use tokio::io::unix::AsyncFd;

use crate::cli::exec::start_error;
use crate::cli::outputs::{Outputs, ReportTo};
use crate::cli::{EXIT_TIMED_OUT, EXIT_TRACKER_FAILED};

/// The exit statuses of `run` and `attach`, for `--help` and the man page.
const EXIT_STATUS: &str = "Exit status of run and attach: the command's own status, or 128+N \
when signal N killed it; 120 when a budget (--max-*) stopped the tree; 124 when --timeout \
fired; 125 when cylo-usage itself failed or was used wrongly (a budget it cannot enforce \
included); 126 when the command cannot be run; 127 when it was not found.";

/// How long after the timeout's SIGTERM the SIGKILL comes, unless --kill-after says.
const DEFAULT_KILL_AFTER: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(
    name = "cylo-usage",
    version = concat!(
        env!("CARGO_PKG_VERSION"),
        " (eBPF object sha256 ",
        env!("CYLO_USAGE_EBPF_SHA256"),
        ")"
    ),
    about = "Precise, eBPF-backed resource usage of a command and every descendant it ever has",
    after_long_help = EXIT_STATUS
)]
struct Cli {
    /// Log what the tracker does, and why something is lost or not measured, on standard
    /// error (`-v` debug, `-vv` trace; or set RUST_LOG).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Cmd,
}

/// What `run` and `attach` share.
#[derive(Args, Clone)]
struct SessionArgs {
    /// Report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Write the report to FILE instead of standard error (`-`: standard output). FILE is
    /// created (or emptied) before the command starts or the attach is made.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Report as soon as the root exits, without waiting for its descendants.
    #[arg(long)]
    until_root_exits: bool,
    /// Add a per-process breakdown to the report (JSON: a `processes` array).
    #[arg(long)]
    tree: bool,
    /// The most processes the breakdown keeps (about 800 bytes each); past it, processes are
    /// counted in `processes_dropped` and left out.
    #[arg(long, value_name = "N", default_value_t = cylo_usage::DEFAULT_TREE_LIMIT)]
    tree_limit: usize,
    /// Stream every process's fork, exec and exit as NDJSON to FILE (`-`: standard output).
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Live threads the tracker loaded in this process follows at once (its kernel maps
    /// hold as many threads, processes and address spaces, less a headroom). A tree with more
    /// alive at once is stopped, as a budget (`tasks_alive`). A daemon has capacities of
    /// its own (`serve`).
    #[arg(long, value_name = "N", default_value_t = cylo_usage::ONE_TREE_TASKS,
          value_parser = clap::value_parser!(u32).range(i64::from(cylo_usage::MIN_TASKS)..))]
    capacity: u32,
    /// How many levels of the human `--tree` to show before folding the rest into "N more
    /// processes" lines (default 6).
    #[arg(long, value_name = "N", help_heading = "Pictures")]
    tree_depth: Option<usize>,
    /// Show every process of the human `--tree`: no folding, no shortening.
    #[arg(long, help_heading = "Pictures")]
    tree_full: bool,
    /// Write the process tree as an interactive flame graph (SVG): each process a frame on its
    /// ancestors, as wide as its own figure plus its descendants' (see --flamegraph-weight).
    #[arg(long, value_name = "FILE.svg", help_heading = "Pictures")]
    flamegraph: Option<PathBuf>,
    /// What the flame graph's widths measure: cpu, disk (read + written), memory (peak RSS)
    /// or network (sent + received).
    #[arg(
        long,
        value_name = "WEIGHT",
        default_value = "cpu",
        help_heading = "Pictures"
    )]
    flamegraph_weight: cylo_usage::FlameWeight,
    /// Write a timeline in the Chrome trace event format (JSON; opens in ui.perfetto.dev and
    /// chrome://tracing): a slice per process on its own track, counters for live processes,
    /// RSS and disk bytes over time.
    #[arg(long, value_name = "FILE.json", help_heading = "Pictures")]
    trace: Option<PathBuf>,
    /// Show a status line on standard error (when it is a terminal), twice a second.
    #[arg(long)]
    watch: bool,
    /// At DUR (`500ms`, `10s`, `2m`, `1h`; a bare number is seconds), send SIGTERM to every
    /// process of the tree, then SIGKILL after --kill-after; exit with 124.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// How long after the timeout's SIGTERM the SIGKILL comes (default 2s; needs --timeout).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    kill_after: Option<Duration>,
    /// Budget: stop the tree (SIGKILL, every member) once more than N processes would run,
    /// the root included; the one past it is refused before it runs. Exit 120.
    #[arg(long, value_name = "N", value_parser = budgets::parse_count, help_heading = "Budgets")]
    max_processes: Option<u64>,
    /// Budget: likewise for threads (each process's main thread included).
    #[arg(long, value_name = "N", value_parser = budgets::parse_count, help_heading = "Budgets")]
    max_threads: Option<u64>,
    /// Budget: stop the tree once it has used more than DUR of CPU time, user and system
    /// (`500ms`, `10s`, `2m`, `1h`).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, help_heading = "Budgets")]
    max_cpu: Option<Duration>,
    /// Budget: stop the tree once its resident memory exceeds BYTES (`64M`; K, M, G, T are
    /// powers of 1024).
    #[arg(long, value_name = "BYTES", value_parser = budgets::parse_bytes, help_heading = "Budgets")]
    max_memory: Option<u64>,
    /// Budget: stop the tree once it has made the storage layer write more than BYTES
    /// (`disk_bytes_written`: buffered writes as they are dirtied, O_DIRECT as submitted).
    #[arg(long, value_name = "BYTES", value_parser = budgets::parse_bytes, help_heading = "Budgets")]
    max_disk_write: Option<u64>,
    /// Budget: stop the tree once it has made the storage layer read more than BYTES.
    #[arg(long, value_name = "BYTES", value_parser = budgets::parse_bytes, help_heading = "Budgets")]
    max_disk_read: Option<u64>,
    /// Budget: stop the tree once it has sent and received more than BYTES of TCP and UDP
    /// payload, together.
    #[arg(long, value_name = "BYTES", value_parser = budgets::parse_bytes, help_heading = "Budgets")]
    max_network: Option<u64>,
    /// How budgets are enforced: `exact` (in the kernel, at the crossing; a budget it cannot
    /// enforce here is refused with exit 125), or `best-effort` (where the kernel cannot, the
    /// /proc fallback enforces it from its samples, late by up to a sampling interval, and
    /// the report says so).
    #[arg(long, value_name = "HOW", default_value = "exact", value_parser = parse_enforcement, help_heading = "Budgets")]
    budgets: cylo_usage::Enforcement,
    /// Fail (exit 125, naming what is missing) rather than fall back to the approximate
    /// /proc tracker when the eBPF programs cannot be loaded.
    #[arg(long)]
    require_exact: bool,
    /// Load the programs in this process even when a daemon (`cylo-usage serve`) answers on
    /// its socket ($CYLO_USAGE_SOCKET, default /run/cylo-usage.sock).
    #[arg(long)]
    no_daemon: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD, follow it and all its descendants, and report what they used.
    Run {
        #[command(flatten)]
        session: SessionArgs,
        /// The command and its arguments.
        #[arg(required = true, num_args = 1.., trailing_var_arg = true, value_name = "CMD")]
        cmd: Vec<OsString>,
    },
    /// Follow the running process PID, every descendant it has now and everything they create
    /// from now on, and report what they use from now until all of them have exited.
    Attach {
        #[command(flatten)]
        session: SessionArgs,
        /// The process to attach to (as this pid namespace sees it).
        #[arg(value_name = "PID")]
        pid: u32,
    },
    /// Load the programs and list which counters are measured on this kernel, and how.
    Features {
        /// As one JSON object.
        #[arg(long)]
        json: bool,
        /// Load the programs here rather than ask the daemon.
        #[arg(long)]
        no_daemon: bool,
    },
    /// Load the programs once and serve sessions to local clients over a Unix socket.
    Serve(ServeArgs),
    /// For packagers: write the man page (`cylo-usage.1`) and the bash, zsh and fish
    /// completions into DIR.
    #[command(hide = true)]
    GenerateDocs {
        /// Where to write them.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// The socket to listen on (default $CYLO_USAGE_SOCKET, else /run/cylo-usage.sock).
    /// Ignored when systemd passes one (socket activation).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Let the members of group NAME connect (socket mode 0660); default: root only (0600).
    #[arg(long, value_name = "NAME", conflicts_with = "allow_all_users")]
    group: Option<String>,
    /// Let every local user connect (socket mode 0666).
    #[arg(long)]
    allow_all_users: bool,
    /// Sessions one unprivileged user may hold at once (root is bound only by the run
    /// slots).
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_sessions_per_user: usize,
    /// Trust the members of --group like root: no per-user limits, and the room held back
    /// for root is theirs too.
    #[arg(long, requires = "group")]
    trust_group: bool,
    /// The most threads one session may have followed at once (its share of the kernel's
    /// maps, which hold 65,536; the sessions of users other than root together hold at most
    /// seven eighths of them): a task past it is killed at birth, and that session reports
    /// it.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    session_max_tasks: u32,
    /// The most memory (MiB) all sessions together may hold for breakdowns and unread event
    /// streams (default: a sixteenth of the host's memory, 64 to 1,024 MiB).
    #[arg(long, value_name = "MIB")]
    memory_max: Option<u64>,
    /// The most of it (MiB) the sessions of one user other than root may hold (default: an
    /// eighth of --memory-max); past it that user's sessions leave processes out of their
    /// breakdowns and drop events, and say so.
    #[arg(long, value_name = "MIB")]
    memory_per_user: Option<u64>,
    /// Serve Prometheus/OpenMetrics text at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Turn on the kernel's per-program statistics (a small cost on every handler call) and
    /// export each handler's run time and calls in the metrics.
    #[arg(long)]
    bpf_stats: bool,
    /// Budget ceiling: the --max-processes of every session of a user other than root (the
    /// smaller of this and what the client asks; this when it asks none). Root's sessions
    /// have what they ask.
    #[arg(long, value_name = "N", value_parser = cylo_usage::budgets::parse_count, help_heading = "Budget ceilings")]
    max_processes: Option<u64>,
    /// Budget ceiling: --max-threads, likewise.
    #[arg(long, value_name = "N", value_parser = cylo_usage::budgets::parse_count, help_heading = "Budget ceilings")]
    max_threads: Option<u64>,
    /// Budget ceiling: --max-cpu (`500ms`, `10s`, `2m`, `1h`), likewise.
    #[arg(long, value_name = "DUR", value_parser = cylo_usage::budgets::parse_duration, help_heading = "Budget ceilings")]
    max_cpu: Option<Duration>,
    /// Budget ceiling: --max-memory (`64M`; K, M, G, T are powers of 1024), likewise.
    #[arg(long, value_name = "BYTES", value_parser = cylo_usage::budgets::parse_bytes, help_heading = "Budget ceilings")]
    max_memory: Option<u64>,
    /// Budget ceiling: --max-disk-write, likewise.
    #[arg(long, value_name = "BYTES", value_parser = cylo_usage::budgets::parse_bytes, help_heading = "Budget ceilings")]
    max_disk_write: Option<u64>,
    /// Budget ceiling: --max-disk-read, likewise.
    #[arg(long, value_name = "BYTES", value_parser = cylo_usage::budgets::parse_bytes, help_heading = "Budget ceilings")]
    max_disk_read: Option<u64>,
    /// Budget ceiling: --max-network, likewise.
    #[arg(long, value_name = "BYTES", value_parser = cylo_usage::budgets::parse_bytes, help_heading = "Budget ceilings")]
    max_network: Option<u64>,
}

/// The gid of group `name`.
fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r with valid buffers; `out` points into `grp` or is null.
    let r =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    (r == 0 && !out.is_null()).then_some(grp.gr_gid)
}

fn serve_main(args: ServeArgs) -> ExitCode {
    use cylo_usage::daemon::{Access, ServeOptions};
    let mut options =
        ServeOptions::new(args.socket.unwrap_or_else(cylo_usage::daemon::socket_path));
    options.access = match (&args.group, args.allow_all_users) {
        (Some(name), _) => match group_id(name) {
            Some(gid) => Access::Group(gid),
            None => return fail(EXIT_TRACKER_FAILED, format!("serve: no group {name:?}")),
        },
        (None, true) => Access::AllUsers,
        (None, false) => Access::Root,
    };
    if args.max_sessions_per_user == 0 {
        return fail(
            EXIT_TRACKER_FAILED,
            "serve: --max-sessions-per-user must be at least 1",
        );
    }
    options.max_sessions_per_user = args.max_sessions_per_user;
    options.trust_group = args.trust_group;
    options.session_max_tasks = args.session_max_tasks;
    const MIB: u64 = 1 << 20;
    if let Some(max) = args.memory_max {
        options.memory_max_bytes = max.saturating_mul(MIB);
        options.memory_per_user_bytes = options.memory_max_bytes / 8;
    }
    if let Some(share) = args.memory_per_user {
        options.memory_per_user_bytes = share.saturating_mul(MIB);
    }
    if options.memory_per_user_bytes > options.memory_max_bytes {
        return fail(
            EXIT_TRACKER_FAILED,
            "serve: --memory-per-user must not exceed --memory-max",
        );
    }
    options.metrics = args.metrics;
    options.bpf_stats = args.bpf_stats;
    // Checked by `serve` (a ceiling never met, or one this kernel cannot enforce, fails it).
    options.budget_ceilings = cylo_usage::Budgets {
        max_processes: args.max_processes,
        max_threads: args.max_threads,
        max_cpu_ns: args
            .max_cpu
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        max_memory_bytes: args.max_memory,
        max_disk_write_bytes: args.max_disk_write,
        max_disk_read_bytes: args.max_disk_read,
        max_network_bytes: args.max_network,
    };
    match cylo_usage::daemon::serve(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_TRACKER_FAILED, cylo_usage::error_chain(&e)),
    }
}

use cylo_usage::budgets::{self, parse_duration};

/// Parses `--budgets`.
fn parse_enforcement(text: &str) -> Result<cylo_usage::Enforcement, String> {
    match text {
        "exact" => Ok(cylo_usage::Enforcement::Exact),
        "best-effort" => Ok(cylo_usage::Enforcement::BestEffort),
        _ => Err(format!("{text:?}: expected exact or best-effort")),
    }
}

impl SessionArgs {
    /// The budgets the options ask for.
    fn budgets(&self) -> cylo_usage::Budgets {
        cylo_usage::Budgets {
            max_processes: self.max_processes,
            max_threads: self.max_threads,
            max_cpu_ns: self
                .max_cpu
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            max_memory_bytes: self.max_memory,
            max_disk_write_bytes: self.max_disk_write,
            max_disk_read_bytes: self.max_disk_read,
            max_network_bytes: self.max_network,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_TRACKER_FAILED),
            };
        }
    };
    init_logging(cli.verbose);
    match cli.command {
        Cmd::Run { session, cmd } => session_main(session, Target::Command(cmd)),
        Cmd::Attach { session, pid } => session_main(session, Target::Pid(pid)),
        Cmd::Serve(args) => serve_main(args),
        Cmd::GenerateDocs { dir } => match cli::docs::generate(Cli::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(
                cli::EXIT_TRACKER_FAILED,
                format!("cannot write to {}: {e}", dir.display()),
            ),
        },
        Cmd::Features { json, no_daemon } => {
            if !no_daemon && let Ok(daemon) = Tracker::connect(&cylo_usage::daemon::socket_path()) {
                return match daemon.features() {
                    Ok((kernel, list, layout)) => {
                        print!("{}", report::features(&kernel, &list, &layout, json));
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(EXIT_TRACKER_FAILED, cylo_usage::error_chain(&e)),
                };
            }
            let tracker = match Tracker::load() {
                Ok(t) => t,
                Err(e) => return fail(EXIT_TRACKER_FAILED, cylo_usage::error_chain(&e)),
            };
            let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            let mut list = tracker.features();
            list.extend(tracker.budget_features());
            let layout = format!("{:?}", tracker.offsets());
            print!("{}", report::features(kernel.trim(), &list, &layout, json));
            ExitCode::SUCCESS
        }
    }
}

/// `log` through env_logger: RUST_LOG, or `-v` (cylo-usage's own debug messages and its
/// eBPF programs', others' warnings) and `-vv` (trace, and aya's debug); off otherwise.
fn init_logging(verbose: u8) {
    use log::LevelFilter::{Debug, Trace, Warn};
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off"));
    match verbose {
        0 => {}
        1 => {
            builder
                .filter_level(Warn)
                .filter_module("cylo_usage", Debug);
        }
        _ => {
            builder
                .filter_level(Debug)
                .filter_module("cylo_usage", Trace);
        }
    }
    let _ = builder.try_init();
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("cylo-usage: {message}");
    ExitCode::from(code)
}

/// The signals cylo-usage forwards or acts on; blocked and read through a signalfd.
const SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the handled signals in this thread (before any other thread exists) and returns a
/// signalfd for them. Children get an empty mask back from `std::process::Command`.
fn signal_fd() -> std::io::Result<OwnedFd> {
    let set = signal_set();
    // SAFETY: valid sigset; signalfd returns a new fd we own.
    unsafe {
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Reads one pending signal: (signal number, whether it was sent to us in particular, as
/// opposed to generated by the terminal for the whole foreground process group).
fn read_signal(fd: &OwnedFd) -> Option<(i32, bool)> {
    // SAFETY: signalfd_siginfo is plain data; read() fills it or fails.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    if n as usize != size {
        return None;
    }
    let direct = info.ssi_code != libc::SI_KERNEL;
    Some((info.ssi_signo as i32, direct))
}

/// What a session follows.
enum Target {
    Command(Vec<OsString>),
    Pid(u32),
}

fn session_main(args: SessionArgs, target: Target) -> ExitCode {
    if let Target::Command(cmd) = &target
        && cmd[0].is_empty()
    {
        return fail(EXIT_TRACKER_FAILED, "run: the command name is empty");
    }
    if args.kill_after.is_some() && args.timeout.is_none() {
        return fail(
            EXIT_TRACKER_FAILED,
            "--kill-after needs --timeout (it is how long after the timeout's SIGTERM the \
             SIGKILL comes)",
        );
    }
    // Every destination first: one that cannot be written is refused before anything runs.
    let Outputs {
        report: mut report_to,
        events,
        pictures,
    } = match Outputs::open(
        args.output.as_deref(),
        args.events.as_deref(),
        matches!(target, Target::Pid(_)),
        args.flamegraph.as_deref(),
        args.trace.as_deref(),
    ) {
        Ok(o) => o,
        Err(e) => return fail(EXIT_TRACKER_FAILED, e),
    };
    let signals = match signal_fd() {
        Ok(fd) => fd,
        Err(e) => {
            return fail(
                EXIT_TRACKER_FAILED,
                format!("cannot set up signal handling: {e}"),
            );
        }
    };
    // A signal that waits to be read cuts every call to the daemon short: a daemon that
    // stops answering never keeps a signal from being acted on.
    let interrupt = match cylo_usage::daemon::Interrupt::new(signals.as_fd()) {
        Ok(i) => i,
        Err(e) => {
            return fail(
                EXIT_TRACKER_FAILED,
                format!("cannot set up signal handling: {e}"),
            );
        }
    };
    // The pictures are drawn from the breakdown, which the report shows only with --tree.
    let breakdown = args.tree || args.flamegraph.is_some() || args.trace.is_some();
    // A tracker loaded here serves this one run: the lean programs unless it attaches or
    // wants a breakdown or events (start-up verifies far less), and maps for one tree.
    let programs = if matches!(target, Target::Command(_)) && !breakdown && events.is_none() {
        cylo_usage::ProgramSet::Totals
    } else {
        cylo_usage::ProgramSet::Full
    };
    let open = OpenOptions {
        require_exact: args.require_exact,
        daemon: !args.no_daemon,
        interrupt: Some(interrupt),
        load: cylo_usage::Capacities::for_one_tree(args.capacity, programs),
        ..OpenOptions::default()
    };
    // A signal that comes meanwhile waits in the signalfd: it reaches the command once it
    // has started, as one sent a moment later would.
    let tracker = match AnyTracker::open(open) {
        Ok(t) => t,
        Err(e) => return fail(EXIT_TRACKER_FAILED, cylo_usage::error_chain(&e)),
    };
    if let Some(reason) = tracker.fallback_reason() {
        // What the fallback cannot give honestly, it refuses rather than make up.
        let refused = [
            (args.tree, "--tree (a per-process breakdown)"),
            (args.events.is_some(), "--events (the process event stream)"),
            (
                args.flamegraph.is_some(),
                "--flamegraph (a picture of the breakdown)",
            ),
            (
                args.trace.is_some(),
                "--trace (a timeline of the breakdown)",
            ),
        ];
        if let Some((_, what)) = refused.iter().find(|(asked, _)| *asked) {
            return fail(
                EXIT_TRACKER_FAILED,
                format!("{what} needs the eBPF tracker, which cannot be loaded: {reason}"),
            );
        }
    }
    let anchor = cylo_usage::TraceAnchor {
        monotonic_ns: clock_ns(libc::CLOCK_MONOTONIC),
        unix_time_ns: clock_ns(libc::CLOCK_REALTIME),
    };
    let options = RunOptions {
        tree: breakdown,
        events,
        tree_limit: args.tree_limit.max(1),
        budgets: args.budgets(),
        budget_enforcement: args.budgets,
        ..RunOptions::default()
    };
    let (started, title, shown) = match &target {
        Target::Command(cmd) => {
            let shown = cmd
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            let mut command = Command::new(&cmd[0]);
            command.args(&cmd[1..]);
            // The command starts with the signal mask cylo-usage had before it blocked the
            // signals it reads through the signalfd.
            let unblock = signal_set();
            // SAFETY: pthread_sigmask is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    libc::pthread_sigmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut());
                    Ok(())
                });
            }
            // With the daemon, cylo-usage is a child subreaper: orphans of the tree (double
            // forks) come back to it, so that should the daemon go away, the tree it can see
            // is the whole tree.
            let subreaper = tracker.kind() == TrackerKind::Daemon && set_subreaper(true);
            let mut started = tracker.spawn_with(&mut command, options);
            match &mut started {
                Ok(run) if run.kind() == TrackerKind::Daemon => run.set_subreaper(subreaper),
                // Started another way (the daemon refused): its tracker reaps for itself.
                _ if subreaper => {
                    set_subreaper(false);
                }
                _ => {}
            }
            (started, "Command being timed", shown)
        }
        Target::Pid(pid) => {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let shown = format!("pid {pid} ({})", comm.trim());
            (
                tracker.attach_with(*pid as libc::pid_t, options),
                "Attached to",
                shown,
            )
        }
    };
    let mut run = match started {
        Ok(run) => run,
        Err(e) => {
            let program = match &target {
                Target::Command(cmd) => cmd[0].clone(),
                Target::Pid(pid) => OsString::from(pid.to_string()),
            };
            let (code, message) = start_error(&e, &program);
            return fail(code, message);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                EXIT_TRACKER_FAILED,
                format!("cannot start the runtime: {e}"),
            );
        }
    };
    let attached = run.is_attached();
    let mut timeline = args.trace.is_some().then(Vec::new);
    let waited = rt.block_on(async {
        let signals =
            cylo_usage::watch(signals).map_err(|e| format!("cannot watch signals: {e}"))?;
        wait(&mut run, &signals, &args, attached, timeline.as_mut()).await
    });
    let (interrupted, mut problem) = match waited {
        Ok(interrupted) => (interrupted, None),
        Err(e) => (None, Some(e)),
    };
    let daemon = run.kind() == TrackerKind::Daemon;
    if problem.is_some() && daemon && !attached {
        // The daemon went away (or failed): the measurement is lost, but the command is this
        // process's own child, and its exit status is still the one to return.
        let _ = rt.block_on(run.wait_root());
    }
    // Whatever happened above, what was measured is reported.
    let mut usage: Option<ResourceUsage> = match run.usage() {
        Ok(u) => Some(u),
        Err(e) => {
            problem.get_or_insert(cylo_usage::error_chain(&e));
            None
        }
    };
    if let Some(usage) = usage.as_mut() {
        // The pictures first; one that cannot be written costs a warning, never the report.
        for warning in pictures.write(
            usage,
            args.flamegraph_weight,
            timeline.as_deref(),
            &anchor,
            &shown,
        ) {
            eprintln!("cylo-usage: warning: {warning}");
        }
        if !args.tree {
            // Kept for the pictures only.
            usage.processes = None;
            usage.processes_dropped = None;
            usage.commands = None;
        }
    }
    if let Some(usage) = &usage {
        let text = if args.json {
            report::json(usage)
        } else {
            report::human_view(
                usage,
                title,
                &shown,
                &cylo_usage::TreeView {
                    max_depth: args.tree_depth.unwrap_or(cylo_usage::tree::DEFAULT_DEPTH),
                    full: args.tree_full,
                    ..Default::default()
                },
            )
        };
        // What was measured is never lost, nor the command's status replaced, because the
        // report could not go where it was sent: it goes to stderr, after a warning.
        if let Err(e) = report_to.write(&text) {
            eprintln!("cylo-usage: warning: {e}; the report follows on standard error");
            if !matches!(report_to, ReportTo::Stderr) {
                let _ = ReportTo::Stderr.write(&text);
            }
        }
    }
    if let Some(p) = problem {
        let status = run.root_status();
        if !attached && status.is_some() {
            // The command ran: its own status is the one to return.
            eprintln!("cylo-usage: {p}");
            return exit_status(status, None);
        }
        return fail(EXIT_TRACKER_FAILED, p);
    }
    if usage.as_ref().is_some_and(|u| u.budget_exceeded.is_some()) {
        return ExitCode::from(cli::EXIT_BUDGET_EXCEEDED);
    }
    if usage.as_ref().is_some_and(|u| u.timed_out) {
        return ExitCode::from(EXIT_TIMED_OUT);
    }
    let status = run.root_status();
    let guessed_end = run.kind() == TrackerKind::Proc
        || run.as_daemon().is_some_and(|r| r.daemon_lost().is_some());
    if status.is_none() && interrupted.is_none() && guessed_end && attached {
        // The /proc fallback cannot know the exit status of a root that is not its child
        // (unless a sample saw it as a zombie): the session itself succeeded.
        return ExitCode::SUCCESS;
    }
    exit_status(status, interrupted)
}

/// Makes cylo-usage a child subreaper (or not); whether that worked.
fn set_subreaper(on: bool) -> bool {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, on as libc::c_ulong, 0, 0, 0) == 0 }
}

/// The exit code for the root's `status` (or, for an interrupted attach, the signal).
fn exit_status(status: Option<std::process::ExitStatus>, interrupted: Option<i32>) -> ExitCode {
    match (
        status.and_then(|s| s.code()),
        status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
        interrupted,
    ) {
        (Some(code), _, _) => ExitCode::from(code as u8),
        (None, Some(sig), _) => ExitCode::from((128 + sig) as u8),
        // An attach stopped by a signal before the root exited: 128+N, as if killed by it.
        (None, None, Some(sig)) => ExitCode::from((128 + sig) as u8),
        (None, None, None) => ExitCode::from(EXIT_TRACKER_FAILED),
    }
}

/// How often `--trace` samples the tree's figures for its counter tracks.
const TIMELINE_EVERY: Duration = Duration::from_millis(100);

/// `clock_gettime(clock)` in ns.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct it is given.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How often a run through the daemon asks for its figures (kept should the daemon go away).
const DAEMON_REFRESH: Duration = Duration::from_secs(2);

/// Waits for the root, then, unless `--until-root-exits`, for every descendant. For `run`, a
/// signal is forwarded to the root, and stops the waiting once the root has exited; for
/// `attach`, a signal stops the waiting at once (returned). The timeout kills the tree.
async fn wait(
    run: &mut AnyRun,
    signals: &AsyncFd<OwnedFd>,
    args: &SessionArgs,
    attached: bool,
    mut timeline: Option<&mut Vec<cylo_usage::TimelineSample>>,
) -> Result<Option<i32>, String> {
    let err = |e: cylo_usage::Error| cylo_usage::error_chain(&e);
    let fds: Vec<AsyncFd<OwnedFd>> = run
        .wake_fds()
        .map_err(|e| format!("cannot watch the run: {e}"))?
        .into_iter()
        .map(cylo_usage::watch)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot watch the run: {e}"))?;
    let started = Instant::now();
    let deadline = args.timeout.map(|t| started + t);
    let mut kill_at: Option<Instant> = None;
    let mut killed_at: Option<Instant> = None;
    let live_view = args.watch && std::io::stderr().is_terminal();
    let mut root_done = false;
    let mut root_readable = false;
    let mut drawn: Option<Instant> = None;
    let mut refreshed: Option<Instant> = None;
    let mut sampled: Option<Instant> = None;
    let result = loop {
        // What must happen next whatever the daemon does: no call to it outlasts that.
        run.set_promise(match (deadline, kill_at, killed_at) {
            (Some(d), None, _) => Some(d),
            (_, Some(k), None) => Some(k),
            _ => None,
        });
        if !root_done && run.root_ended().map_err(err)? {
            root_done = true;
        }
        let finished = run.is_finished().map_err(err)?;
        if root_done && (finished || args.until_root_exits) {
            break Ok(None);
        }
        let now = Instant::now();
        if let Some(d) = deadline
            && now >= d
            && kill_at.is_none()
        {
            run.set_timed_out();
            run.kill(libc::SIGTERM).map_err(err)?;
            kill_at = Some(now + args.kill_after.unwrap_or(DEFAULT_KILL_AFTER));
        }
        if let Some(k) = kill_at
            && now >= k
            && killed_at.is_none()
        {
            // Nothing is sent (nor reported as sent) to a tree that has ended meanwhile.
            if !run.is_finished().map_err(err)? {
                run.kill(libc::SIGKILL).map_err(err)?;
            }
            killed_at = Some(now);
        }
        if let Some(k) = killed_at
            && now >= k + Duration::from_secs(10)
            && (finished || root_done)
        {
            // Whatever SIGKILL could not end in 10 s (uninterruptible sleep) is reported live.
            break Ok(None);
        }
        if live_view && drawn.is_none_or(|d| d.elapsed() >= Duration::from_millis(500)) {
            draw_status(run, started);
            drawn = Some(Instant::now());
            refreshed = Some(Instant::now());
        }
        if let Some(samples) = timeline.as_deref_mut()
            && sampled.is_none_or(|s| s.elapsed() >= TIMELINE_EVERY)
        {
            // The timeline's counters (`--trace`): the tree's figures now.
            if let Ok(u) = run.usage_totals() {
                let at = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                samples.push(cylo_usage::TimelineSample::of(&u, at));
            }
            sampled = Some(Instant::now());
            refreshed = Some(Instant::now());
        }
        if run.as_daemon().is_some_and(|r| r.daemon_lost().is_none())
            && refreshed.is_none_or(|r| r.elapsed() >= DAEMON_REFRESH)
        {
            // The daemon's figures, kept by the run: should the daemon go away, the report
            // starts from them.
            let _ = run.usage_totals();
            refreshed = Some(Instant::now());
        }
        // Wake on: the root's exit, a run's end, a signal, or the next tick.
        let tick = if live_view || kill_at.is_some() || deadline.is_some() || timeline.is_some() {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(500)
        };
        let root_fd = fds.first().filter(|_| !root_done && fds.len() > 1);
        let events_fd = fds.last();
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            r = async { root_fd.unwrap().readable().await }, if root_fd.is_some() => {
                // The pidfd stays readable: the next check takes the exit at once. Should the
                // exit not be known yet (the kernel's record of an attached root may trail),
                // the checks after it wait a little, so as not to spin.
                if let Ok(mut g) = r { g.retain_ready(); }
                if root_readable {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                root_readable = true;
            }
            r = async { events_fd.unwrap().readable().await }, if events_fd.is_some() => {
                run.clear_wake();
                if let Ok(mut g) = r { g.clear_ready(); }
            }
            g = signals.readable() => {
                let mut g = g.map_err(|e| format!("cannot read signals: {e}"))?;
                let mut stop = None;
                while let Some((sig, direct)) = read_signal(signals.get_ref()) {
                    if attached || root_done {
                        stop = Some(sig);
                    } else if direct {
                        // A terminal's signal already reached the root through its group.
                        let _ = run.signal_root(sig);
                    }
                }
                g.clear_ready();
                if let Some(sig) = stop {
                    break Ok(attached.then_some(sig));
                }
            }
        }
    };
    if live_view {
        let _ = std::io::stderr().write_all(b"\r\x1b[K");
    }
    result
}

/// The `--watch` status line: elapsed time, CPU, live and total processes, RSS, disk, network.
fn draw_status(run: &AnyRun, started: Instant) {
    let Ok(u) = run.usage_totals() else {
        return;
    };
    let mib = |b: Option<u64>| match b {
        Some(b) => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        None => "-".to_string(),
    };
    let at_least = if u.lower_bounds.iter().any(|f| f == "process_count") {
        "at least "
    } else {
        ""
    };
    let line = format!(
        "\r\x1b[K{:.1}s  cpu {:.2}s  procs {} live / {at_least}{}  rss {}  disk r {} w {}  net tx {} \
         rx {}",
        started.elapsed().as_secs_f64(),
        u.cpu_time_ns as f64 / 1e9,
        u.live_process_count,
        u.process_count,
        mib(u.memory_bytes),
        mib(u.disk_bytes_read),
        mib(u.disk_bytes_written),
        mib(u.network_bytes_sent),
        mib(u.network_bytes_received),
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}
