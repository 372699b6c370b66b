//! Loading the eBPF object: check privileges, hand it the resolved kernel layout, load and
//! attach its programs, and own the links and maps for as long as the [`Tracker`] lives.
use std::sync::{Arc, Mutex, MutexGuard};

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{Array, HashMap, MapData, RingBuf};
use aya::programs::{FExit, ProgramError, ProgramFd, RawTracePoint};
use aya::{Ebpf, EbpfLoader};
use cylo_usage_abi::{
    ABSENT, DEFAULT_MAX_MMS, DEFAULT_MAX_PROCS, DEFAULT_MAX_TASKS, DevCounters, DevKey, MAX_RUNS,
    MmMember, Offsets, ProcMember, RunControl, RunCounters, TaskMember, control, names,
};

use crate::kernel::features::{Measured, Unavailable};
#[cfg(feature = "metrics")]
use crate::kernel::map_read::MapReadError;
use crate::kernel::map_read::MapReader;
use crate::kernel::object::OBJECT;
use crate::kernel::programs::{
    HOOKS, Hook, KernelBtf, LoadError, Variant, attach, attach_network, attach_spec, load_control,
    missing_privileges, preload, program_as, take, unused_programs,
};
use crate::kernel::resolve;
use crate::sys::lock;

/// Read-only views of the maps that runs read, each with a descriptor of its own and no
/// lock: a run's reads never wait for another run (see [`crate::kernel::map_read`]).
pub(crate) struct Readers {
    pub tasks: MapReader<u64, TaskMember>,
    pub procs: MapReader<u64, ProcMember>,
    pub mms: MapReader<u64, MmMember>,
    pub devs: MapReader<DevKey, DevCounters>,
    pub runs: MapReader<u32, RunCounters>,
}

/// A reader of map `name` of the loaded object (before it is taken from the object).
fn reader<K: aya::Pod, V: aya::Pod>(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<MapReader<K, V>, LoadError> {
    use aya::maps::Map;
    let data = match ebpf.map(name) {
        Some(Map::HashMap(d) | Map::Array(d) | Map::LruHashMap(d)) => d,
        _ => return Err(LoadError::Map { name, source: None }),
    };
    Ok(MapReader::new(data.fd().as_fd(), name)?)
}

/// The maps userspace writes (and reads, where a write depends on the read); behind one
/// lock, held only for short updates: runs read through [`Readers`].
pub(crate) struct Maps {
    pub procs: HashMap<MapData, u64, ProcMember>,
    pub devs: HashMap<MapData, DevKey, DevCounters>,
    pub runs: Array<MapData, RunCounters>,
    pub spawners: HashMap<MapData, u64, cylo_usage_abi::Spawner>,
    pub spawn_gate: Array<MapData, u64>,
    pub adopt_gate: Array<MapData, u64>,
    pub run_control: Array<MapData, RunControl>,
    /// Run slots in use.
    pub slots: Vec<bool>,
    /// Where the search for a free slot starts: slots are handed out round-robin, so a slot
    /// is reused as late as possible.
    pub next_slot: u32,
}

pub(crate) struct Shared {
    pub maps: Mutex<Maps>,
    pub readers: Readers,
    pub events: Mutex<RingBuf<MapData>>,
    /// Per-process records; taken (and only then mapped: the 8 MiB ring buffer's mapping
    /// counts 16 MiB of resident memory) by the reader thread when the first run wants them.
    pub records: Mutex<Option<aya::maps::Map>>,
    /// Where the reader thread delivers each run's records.
    pub sinks: Arc<crate::kernel::records::RecordReader>,
    /// The records of runs that want them for their user/system split alone (a small ring
    /// buffer of their own, so that such runs cost no 8 MiB mapping), and their reader: an
    /// attach, and every run on kernels without BPF atomic fetch (elsewhere the kernel splits
    /// a spawned run's processes itself, `run_flags::KERNEL_SPLIT`).
    pub split_records: Mutex<Option<aya::maps::Map>>,
    pub split_sinks: Arc<crate::kernel::records::RecordReader>,
    /// The `control` program, run in the caller's context (`BPF_PROG_TEST_RUN`).
    pub control: ProgramFd,
    /// The `control_adopt` program, loaded when the first attach needs it.
    adopt: std::sync::OnceLock<ProgramFd>,
    pub offsets: Offsets,
    /// Capacities of TASKS, PROCS and MMS.
    pub(crate) capacity: [u32; 3],
    /// The lean set is loaded ([`ProgramSet::Totals`]): no attach, no breakdown.
    pub(crate) lean: bool,
    pub measured: Measured,
    /// Why what is not measured is not.
    pub unavailable: Unavailable,
    /// Reads the programs' diagnostics while logging is on.
    _log: Option<crate::kernel::ebpf_log::Reader>,
    /// Keeps the programs loaded and their hooks attached (or detached, while idle).
    programs: Mutex<Programs>,
    /// The hooks only budgets need, and how many runs hold each (locked after `programs`;
    /// see [`crate::kernel::budget_hooks`]).
    pub(crate) budget_hooks: Mutex<BudgetHooks>,
}

/// The link of a hook only budgets need.
pub(crate) enum BudgetLink {
    /// The fexit program on `schedule_tail`.
    Fexit(aya::programs::fexit::FExitLinkId),
    /// The kprobe on `calculate_sigpending`, where trampolines are missing.
    Kprobe(aya::programs::kprobe::KProbeLinkId),
    /// The `sys_exit` raw tracepoint, where kprobes are missing too.
    SysExit(aya::programs::raw_trace_point::RawTracePointLinkId),
    /// `sched_stat_runtime` or `writeback_dirty_folio`.
    Tracepoint(aya::programs::raw_trace_point::RawTracePointLinkId),
}

/// Which hooks only budgets need are attached (by `budget_hooks::Need`), and for how many
/// runs.
#[derive(Default)]
pub(crate) struct BudgetHooks {
    pub(crate) users: [u32; 3],
    pub(crate) links: [Option<BudgetLink>; 3],
}

/// The loaded object and the hooks attached from it.
pub(crate) struct Programs {
    pub(crate) ebpf: Ebpf,
    hooks: Vec<Hook>,
}

impl Shared {
    pub(crate) fn programs(&self) -> MutexGuard<'_, Programs> {
        lock(&self.programs)
    }

    pub fn maps(&self) -> MutexGuard<'_, Maps> {
        lock(&self.maps)
    }

    /// Runs the `control` program in the calling thread with `(op, a, b, c)` and returns what
    /// it returned (see `cylo_usage_abi::control`).
    pub fn control(&self, args: [u64; 4]) -> std::io::Result<i32> {
        run_control(&self.control, args)
    }

    /// Runs the `control_adopt` program (`ADOPT`), loading it the first time.
    pub fn control_adopt(&self, args: [u64; 4]) -> Result<i32, LoadError> {
        let prog = match self.adopt.get() {
            Some(p) => p,
            None => {
                let name = if self.measured.atomics {
                    names::PROG_CONTROL_ADOPT
                } else {
                    names::PROG_CONTROL_ADOPT_NO_ATOMICS
                };
                let mut programs = lock(&self.programs);
                match self.adopt.get() {
                    Some(p) => p,
                    None => {
                        let fd = load_control(&mut programs.ebpf, name)?;
                        self.adopt.get_or_init(|| fd)
                    }
                }
            }
        };
        run_control(prog, args).map_err(|source| LoadError::Control {
            op: "adopt",
            source,
        })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.sinks.stop();
        self.split_sinks.stop();
    }
}

/// `bpf(BPF_PROG_TEST_RUN)` of a raw tracepoint program with `args` as its context: it runs
/// in the calling thread, so `bpf_get_current_task()` is the caller.
fn run_control(prog: &ProgramFd, args: [u64; 4]) -> std::io::Result<i32> {
    // `union bpf_attr`'s `test` member, as far as a raw tracepoint uses it.
    #[repr(C)]
    #[derive(Default)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut attr = TestRun {
        prog_fd: prog.as_fd().as_raw_fd() as u32,
        ctx_size_in: std::mem::size_of_val(&args) as u32,
        ctx_in: args.as_ptr() as u64,
        ..TestRun::default()
    };
    // SAFETY: `attr` is a valid, zero-padded bpf_attr prefix of the size passed; `args`
    // outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRun,
            std::mem::size_of::<TestRun>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr.retval as i32)
}

/// The share of the membership maps a run gets: `max_tasks`, or, for 0, their capacity
/// (`capacity`: TASKS and PROCS entries) less the headroom kept for tasks killed at birth.
pub(crate) fn run_share(max_tasks: u32, capacity: [u32; 3]) -> u32 {
    if max_tasks != 0 {
        return max_tasks;
    }
    let room = capacity[0].min(capacity[1]);
    (room - cylo_usage_abi::share_headroom(room)).max(1)
}

/// What a tracker's runs may ask for beyond their totals. Loading less makes the start-up
/// shorter: the kernel verifies far fewer instructions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgramSet {
    /// Everything: attaching to running trees, per-process breakdowns and event streams
    /// (`--tree`, `--events`), and totals. The default.
    #[default]
    Full,
    /// Runs the tracker starts itself, with their totals (the user/system split and budgets
    /// included): the handlers without the adoption path and without records (its runs are
    /// spawned and the kernel splits their CPU time itself: none wants a record), and a
    /// one-page breakdown ring buffer. An attach, or a run that asks for a breakdown or
    /// events, fails with [`crate::SessionError::NotLoaded`]. Kernels without BPF atomic
    /// fetch (before 5.12) have one set only, and load it, but refuse the same.
    Totals,
}

/// Capacities of the kernel-side maps, and which programs to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Live tracked threads on the whole host, over all runs. A run's share of them is this
    /// less a headroom (see [`crate::RunOptions::max_tasks`]); a task past its run's share is
    /// killed at birth and the run stops (budget `tasks_alive`).
    pub max_tasks: u32,
    /// Live tracked processes on the whole host, over all runs (likewise).
    pub max_procs: u32,
    /// Live tracked address spaces on the whole host, over all runs: past it, a process's
    /// memory is not followed (counted in `lost_events`).
    pub max_mms: u32,
    /// What the tracker's runs may ask for.
    pub programs: ProgramSet,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            max_tasks: DEFAULT_MAX_TASKS,
            max_procs: DEFAULT_MAX_PROCS,
            max_mms: DEFAULT_MAX_MMS,
            programs: ProgramSet::Full,
        }
    }
}

impl Capacities {
    /// Capacities for one command's tree (what the command line loads in its own process):
    /// `live_tasks` threads and as many processes and address spaces, rather than the
    /// 65,536 a daemon serving many runs keeps. Fewer preallocated entries make the start-up
    /// shorter (about 40 ns an entry on this project's machines).
    pub fn for_one_tree(live_tasks: u32, programs: ProgramSet) -> Capacities {
        let n = live_tasks.max(MIN_TASKS);
        Capacities {
            max_tasks: n,
            max_procs: n,
            max_mms: n,
            programs,
        }
    }
}

/// The smallest capacity [`Capacities::for_one_tree`] makes: room for a share and its
/// headroom.
pub const MIN_TASKS: u32 = 64;

/// The number of live threads a command line's own tracker follows by default
/// ([`Capacities::for_one_tree`]).
pub const ONE_TREE_TASKS: u32 = 16_384;

/// Loaded and attached eBPF programs. Cheap to clone; the programs stay attached until the
/// last clone (and every [`crate::Run`] made from it) is dropped.
#[derive(Clone)]
pub struct Tracker {
    pub(crate) inner: Arc<Shared>,
}

impl Tracker {
    /// Checks privileges, resolves the kernel layout from BTF, loads and attaches the programs.
    pub fn load() -> Result<Tracker, LoadError> {
        Self::load_with_options(Capacities::default())
    }

    /// [`Tracker::load`] with other map capacities.
    pub fn load_with_options(options: Capacities) -> Result<Tracker, LoadError> {
        if let Some(needed) = missing_privileges()? {
            return Err(LoadError::MissingPrivileges { needed });
        }
        // The loader (without aya 0.14's parse of the kernel BTF, and with its feature
        // probes: see aya_loader) is made beside the resolver's work.
        let loader = crate::kernel::aya_loader::start();
        let offsets = resolve::resolve_host();
        let loader = loader
            .join()
            .unwrap_or_else(|_| crate::kernel::aya_loader::new());
        let offsets = offsets?;
        Self::load_from(loader, &offsets, options)
    }

    fn load_from<'a>(
        mut loader: EbpfLoader<'a>,
        offsets: &'a Offsets,
        options: Capacities,
    ) -> Result<Tracker, LoadError> {
        let level = crate::kernel::ebpf_log::level();
        if !crate::kernel::ebpf_log::enabled(*level) {
            return Self::load_at(&mut loader, offsets, options, level);
        }
        // With their log statements in, the programs take the verifier longer: a kernel may
        // refuse them, or only the variant with atomics. Logging must never change what loads
        // and what is measured: without them, then.
        let quiet = crate::kernel::ebpf_log::level_off();
        match Self::load_at(&mut loader, offsets, options, level) {
            Ok(t) if t.inner.measured.atomics => Ok(t),
            Ok(t) => {
                drop(t);
                let retry = Self::load_at(&mut loader, offsets, options, quiet)?;
                if retry.inner.measured.atomics {
                    log::warn!(
                        "the eBPF programs' log statements are left out: with them this \
                         kernel's verifier refused the handlers with atomics"
                    );
                    return Ok(retry);
                }
                // No atomics either way (a kernel without them, 5.10): the statements change
                // nothing that is measured, so they go back in.
                drop(retry);
                Self::load_at(&mut loader, offsets, options, level)
                    .or_else(|_| Self::load_at(&mut loader, offsets, options, quiet))
            }
            Err(e) => {
                log::warn!(
                    "the eBPF programs' log statements are left out: with them this kernel's \
                     verifier refused the programs ({})",
                    crate::first_line(&crate::error_chain(&e))
                );
                Self::load_at(&mut loader, offsets, options, quiet)
            }
        }
    }

    fn load_at<'a>(
        loader: &mut EbpfLoader<'a>,
        offsets: &'a Offsets,
        options: Capacities,
        log_level: &'static u8,
    ) -> Result<Tracker, LoadError> {
        let kernel_btf = KernelBtf::start(offsets);
        let mut hooks = Vec::new();
        // A `Totals` tracker refuses attach and breakdowns on every kernel alike (kernels
        // without atomics load their one set, but with this one-page records ring buffer).
        let lean = options.programs == ProgramSet::Totals;
        let wanted = if lean { Variant::Lean } else { Variant::Full };
        // Without the programs it never loads, which aya would parse and link all the same.
        let unused = unused_programs(wanted, offsets);
        let subset = crate::kernel::object::hide_programs(OBJECT, &unused);
        if let Err(e) = &subset {
            log::debug!("loading the whole eBPF object: {e}");
        }
        let object = subset.as_deref().unwrap_or(OBJECT);
        // Without breakdowns, the records ring buffer is never read: one page.
        let records_bytes = if lean {
            crate::sys::procfs::page_size() as u32
        } else {
            cylo_usage_abi::RECORDS_BYTES
        };
        let mut ebpf = loader
            .override_global(names::OFFSETS, offsets, true)
            .override_global(aya_log::LEVEL, log_level, false)
            .map_max_entries(names::TASKS, options.max_tasks)
            .map_max_entries(names::PROCS, options.max_procs)
            .map_max_entries(names::MMS, options.max_mms)
            .map_max_entries(names::RECORDS, records_bytes)
            .load(object)
            .map_err(LoadError::Load)?;
        let log = crate::kernel::ebpf_log::start(&mut ebpf, *log_level);
        let readers = Readers {
            tasks: reader(&ebpf, names::TASKS)?,
            procs: reader(&ebpf, names::PROCS)?,
            mms: reader(&ebpf, names::MMS)?,
            devs: reader(&ebpf, names::DEVS)?,
            runs: reader(&ebpf, names::RUNS)?,
        };
        let maps = Maps {
            procs: take(&mut ebpf, names::PROCS)?,
            devs: take(&mut ebpf, names::DEVS)?,
            runs: take(&mut ebpf, names::RUNS)?,
            spawners: take(&mut ebpf, names::SPAWNERS)?,
            spawn_gate: take(&mut ebpf, names::SPAWN_GATE)?,
            adopt_gate: take(&mut ebpf, names::ADOPT_GATE)?,
            run_control: take(&mut ebpf, names::RUN_CONTROL)?,
            slots: vec![false; MAX_RUNS as usize],
            next_slot: 0,
        };
        let events: RingBuf<MapData> = take(&mut ebpf, names::EVENTS)?;
        let ring = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .filter(|m| matches!(m, aya::maps::Map::RingBuf(_)))
                .ok_or(LoadError::Map { name, source: None })
        };
        let records = ring(&mut ebpf, names::RECORDS)?;
        let split_records = ring(&mut ebpf, names::SPLIT_RECORDS)?;
        // The handlers, verified in parallel (with atomics: where the verifier refuses them,
        // `attach` reports it and the variants without are loaded one by one).
        let mut parallel = wanted.preloaded(offsets);
        // And the control program, which the hello runs before the other hooks attach.
        parallel.push(names::PROG_CONTROL);
        if offsets.net_hooks & cylo_usage_abi::net::HOOK_TRACEPOINTS != 0 {
            parallel.extend([names::PROG_SOCK_SEND_LENGTH, names::PROG_SOCK_RECV_LENGTH]);
        }
        preload(&mut ebpf, &parallel);
        // Atomics that return the old value (BPF ISA v3) came with 5.12: the verifier decides.
        // Without them, the variants that do without the peaks and the memory counters.
        let atomics_error = match attach(
            &mut ebpf,
            &mut hooks,
            wanted.newtask(),
            names::TP_TASK_NEWTASK,
        ) {
            Ok(()) => None,
            Err(
                e @ LoadError::Attach {
                    source: ProgramError::LoadError { .. },
                    ..
                },
            ) => Some(crate::first_line(&crate::error_chain(&e))),
            Err(e) => return Err(e),
        };
        let atomics = atomics_error.is_none();
        if let Some(why) = &atomics_error {
            log::debug!(
                "the kernel refused the handlers with atomics, using the variants without: {why}"
            );
        }
        let variant = if atomics { wanted } else { Variant::NoAtomics };
        if !atomics {
            attach(
                &mut ebpf,
                &mut hooks,
                variant.newtask(),
                names::TP_TASK_NEWTASK,
            )?;
        }
        let control = load_control(&mut ebpf, names::PROG_CONTROL)?;
        // Who the tracker is: its pid namespace, and its own tasks, which never join a run.
        match run_control(&control, [control::HELLO, 0, 0, 0]) {
            Ok(0) => {}
            Ok(code) => {
                return Err(LoadError::ControlRefused { op: "hello", code });
            }
            Err(source) => {
                return Err(LoadError::Control {
                    op: "hello",
                    source,
                });
            }
        }
        // The other hooks, as their table says.
        let mut devices_error = None;
        for spec in &HOOKS {
            if let Some(why) = attach_spec(&mut ebpf, &mut hooks, spec, offsets, variant)?
                && spec.tracepoint == names::TP_BLOCK_BIO_QUEUE
            {
                devices_error = Some(why);
            }
        }
        let o = offsets;
        let has = |fields: &[u32]| fields.iter().all(|&f| f != ABSENT);
        let devices = devices_error.is_none();
        let attach_error = (o.pid_tasks == ABSENT || o.task_thread_pid == ABSENT).then(|| {
            "this kernel's BTF lacks the layout of struct pid, fdtable or proc_inode".to_string()
        });
        let records_error = (o.task_comm == ABSENT || o.mm_arg_start == ABSENT).then(|| {
            "this kernel's BTF lacks task_struct.comm/exit_code or mm_struct.arg_start".to_string()
        });
        let (network, network_error) =
            match attach_network(&mut ebpf, &mut hooks, offsets, kernel_btf) {
                Ok(path) => (Some(path), None),
                Err(why) => (None, Some(why)),
            };
        for (what, why) in [
            ("per-device block I/O", &devices_error),
            ("network", &network_error),
        ] {
            if let Some(why) = why {
                log::debug!("{what} is not measured: {why}");
            }
        }
        let measured = Measured {
            atomics,
            disk: has(&[
                o.task_ioac_read_bytes,
                o.task_ioac_write_bytes,
                o.task_ioac_cancelled_write_bytes,
            ]),
            io_chars: has(&[o.task_ioac_rchar, o.task_ioac_wchar]),
            devices,
            attach: attach_error.is_none(),
            records: o.task_comm != ABSENT,
            network,
        };
        Ok(Tracker {
            inner: Arc::new(Shared {
                maps: Mutex::new(maps),
                readers,
                events: Mutex::new(events),
                records: Mutex::new(Some(records)),
                sinks: Arc::default(),
                split_records: Mutex::new(Some(split_records)),
                split_sinks: Arc::default(),
                control,
                adopt: std::sync::OnceLock::new(),
                offsets: *offsets,
                capacity: [options.max_tasks, options.max_procs, options.max_mms],
                lean,
                measured,
                unavailable: Unavailable {
                    atomics: atomics_error,
                    devices: devices_error,
                    attach: attach_error,
                    records: records_error,
                    network: network_error,
                },
                _log: log,
                programs: Mutex::new(Programs { ebpf, hooks }),
                budget_hooks: Mutex::default(),
            }),
        })
    }

    /// What the programs measure on this kernel.
    pub fn measured(&self) -> Measured {
        self.inner.measured
    }

    /// Every counter, with whether and how it is measured on this kernel.
    pub fn features(&self) -> Vec<crate::kernel::features::Feature> {
        crate::kernel::features::features(self.inner.measured, &self.inner.unavailable)
    }

    /// The kernel layout the programs were loaded with.
    pub fn offsets(&self) -> Offsets {
        self.inner.offsets
    }

    /// Whether the hooks are attached (they are from the load on, until
    /// [`Tracker::detach_hooks`]).
    pub fn hooks_attached(&self) -> bool {
        let programs = self.inner.programs();
        programs.hooks.iter().all(|h| match h {
            Hook::Tracepoint { link, .. } => link.is_some(),
            Hook::Function { link, .. } => link.is_some(),
        })
    }

    /// Detaches every hook while keeping the programs and maps loaded, so that an idle
    /// tracker costs the host nothing; [`Tracker::attach_hooks`] attaches them again (quickly:
    /// the raw tracepoint programs are not verified again; the fexit ones, which the kernel
    /// cannot re-attach, are unloaded here and loaded again there). Nothing is followed
    /// meanwhile: only for a tracker without runs.
    pub fn detach_hooks(&self) -> Result<(), LoadError> {
        let mut programs = self.inner.programs();
        let Programs { ebpf, hooks } = &mut *programs;
        for hook in hooks.iter_mut() {
            match hook {
                Hook::Tracepoint {
                    program,
                    tracepoint,
                    link,
                } => {
                    let Some(id) = link.take() else { continue };
                    let err = |source| LoadError::Attach {
                        program,
                        tracepoint,
                        source,
                    };
                    let prog: &mut RawTracePoint = program_as(ebpf, program, err)?;
                    prog.detach(id).map_err(err)?;
                }
                Hook::Function {
                    program,
                    function,
                    link,
                } => {
                    if link.take().is_none() {
                        continue;
                    }
                    let err = |source| LoadError::AttachFunction {
                        program,
                        function,
                        source,
                    };
                    let prog: &mut FExit = program_as(ebpf, program, err)?;
                    // The kernel cannot attach an fexit program to a kernel function again
                    // once its link is gone (its trampoline target went with it): unloaded
                    // now, loaded again by `attach_hooks`.
                    prog.unload().map_err(err)?;
                }
            }
        }
        Ok(())
    }

    /// Attaches again the hooks [`Tracker::detach_hooks`] detached. The fexit programs (the
    /// network hooks of kernels before 6.3) are loaded again, which reads the kernel's BTF.
    pub fn attach_hooks(&self) -> Result<(), LoadError> {
        let mut programs = self.inner.programs();
        let Programs { ebpf, hooks } = &mut *programs;
        let mut btf = None;
        for hook in hooks.iter_mut() {
            match hook {
                Hook::Tracepoint {
                    program,
                    tracepoint,
                    link,
                } => {
                    if link.is_some() {
                        continue;
                    }
                    let err = |source| LoadError::Attach {
                        program,
                        tracepoint,
                        source,
                    };
                    let prog: &mut RawTracePoint = program_as(ebpf, program, err)?;
                    *link = Some(prog.attach(tracepoint).map_err(err)?);
                }
                Hook::Function {
                    program,
                    function,
                    link,
                } => {
                    if link.is_some() {
                        continue;
                    }
                    let btf = match &btf {
                        Some(b) => b,
                        None => btf.insert(aya::Btf::from_sys_fs().map_err(LoadError::KernelBtf)?),
                    };
                    let err = |source| LoadError::AttachFunction {
                        program,
                        function,
                        source,
                    };
                    let prog: &mut FExit = program_as(ebpf, program, err)?;
                    prog.load(function, btf).map_err(err)?;
                    *link = Some(prog.attach().map_err(err)?);
                }
            }
        }
        Ok(())
    }

    /// The threads a run may have followed at once when it is given no share of its own:
    /// the membership maps' capacity less the headroom kept for tasks killed at birth.
    pub(crate) fn share_room(&self) -> u32 {
        run_share(0, self.inner.capacity)
    }

    /// Each loaded program's name, kernel run time (ns) and calls: the kernel's statistics,
    /// which count only while `BPF_ENABLE_STATS` is on.
    pub fn program_stats(&self) -> Vec<(String, u64, u64)> {
        let programs = self.inner.programs();
        programs
            .ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some((
                    name.to_string(),
                    info.run_time().as_nanos() as u64,
                    info.run_count(),
                ))
            })
            .collect()
    }

    /// A descriptor of the run-end notification ring buffer (readable when a run ended).
    pub(crate) fn events_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        let events = lock(&self.inner.events);
        events.as_fd().try_clone_to_owned()
    }

    /// The slots of the runs whose last thread ended since the last call.
    pub(crate) fn take_run_ends(&self) -> Vec<u32> {
        let mut events = lock(&self.inner.events);
        let mut out = Vec::new();
        while let Some(item) = events.next() {
            if item.len() >= std::mem::size_of::<cylo_usage_abi::Event>() {
                // SAFETY: the kernel wrote an `Event` (plain data) at the start of the item.
                let e: cylo_usage_abi::Event =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                out.push(e.run);
            }
        }
        out
    }

    /// Entries and capacity of the membership maps, and the records lost by the runs open
    /// now (for metrics).
    #[cfg(feature = "metrics")]
    pub(crate) fn map_fill(&self) -> (Vec<(&'static str, usize, u32)>, RunsTotals) {
        let r = &self.inner.readers;
        let count = |n: Result<usize, MapReadError>| n.unwrap_or(0);
        let fill = vec![
            (names::TASKS, count(r.tasks.count()), self.inner.capacity[0]),
            (names::PROCS, count(r.procs.count()), self.inner.capacity[1]),
            (names::MMS, count(r.mms.count()), self.inner.capacity[2]),
        ];
        let used: Vec<u32> = {
            let maps = self.inner.maps();
            (0..MAX_RUNS).filter(|&s| maps.slots[s as usize]).collect()
        };
        let mut totals = RunsTotals::default();
        for c in used.iter().filter_map(|s| r.runs.get(s).ok().flatten()) {
            totals.add(&c);
        }
        (fill, totals)
    }
}

/// What the kernel side failed to follow, summed over runs (for a daemon's metrics).
#[derive(Clone, Copy, Debug, Default)]
#[cfg(feature = "metrics")]
pub(crate) struct RunsTotals {
    /// Records it could not make (a map or ring buffer full).
    pub lost_events: u64,
    /// Tasks killed at birth past a run's share (fail closed).
    pub tasks_killed_at_birth: u64,
    /// Tasks it could not follow at all that may still run.
    pub tasks_escaped: u64,
}

#[cfg(feature = "metrics")]
impl RunsTotals {
    pub(crate) fn add(&mut self, c: &cylo_usage_abi::RunCounters) {
        self.lost_events += c.lost_events;
        self.tasks_killed_at_birth += c.tasks_killed_at_birth;
        self.tasks_escaped += c.tasks_escaped;
    }
}
