//! The programs of the eBPF object, one at a time: taking a map out of the loaded object,
//! verifying a program (timed and counted for the log), attaching the raw tracepoints and the
//! fexit programs of the network fallback, and loading the control programs that userspace
//! runs in its own context. [`crate::kernel::tracker`] decides what to load; this does it.

use aya::maps::MapError;
use aya::programs::fexit::FExitLinkId;
use aya::programs::raw_trace_point::RawTracePointLinkId;
use aya::programs::{FExit, ProgramError, ProgramFd, RawTracePoint};
use aya::{Ebpf, EbpfError};
use cylo_usage_abi::{ABSENT, Offsets, names};

use crate::kernel::features::NetworkPath;
use crate::kernel::map_read::MapReadError;
use crate::kernel::resolve::ResolveError;

pub(crate) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(LoadError::Map { name, source: None })?;
    T::try_from(map).map_err(|e| LoadError::Map {
        name,
        source: Some(e),
    })
}

pub(crate) fn attach(
    ebpf: &mut Ebpf,
    hooks: &mut Vec<Hook>,
    program: &'static str,
    tracepoint: &'static str,
) -> Result<(), LoadError> {
    let prog: &mut RawTracePoint = program_as(ebpf, program, |source| LoadError::Attach {
        program,
        tracepoint,
        source,
    })?;
    // Loaded already when `preload` verified it.
    let loaded = if prog.fd().is_ok() {
        Ok(())
    } else {
        load_logged(program, prog)
    };
    let link = loaded
        .and_then(|()| prog.attach(tracepoint))
        .map_err(|source| LoadError::Attach {
            program,
            tracepoint,
            source,
        })?;
    hooks.push(Hook::Tracepoint {
        program,
        tracepoint,
        link: Some(link),
    });
    Ok(())
}

/// Loads (verifies) raw tracepoint program `name`, saying at debug level what it cost the
/// kernel's verifier (the kernel matrix prints these per kernel: the first sign of a
/// program grown too complex for an older verifier).
fn load_logged(name: &str, prog: &mut RawTracePoint) -> Result<(), ProgramError> {
    let started = std::time::Instant::now();
    let loaded = prog.load();
    let insns = prog
        .info()
        .ok()
        .and_then(|i| i.verified_instruction_count());
    log::debug!(
        "verified {name} in {:.2} ms ({} instructions processed){}",
        started.elapsed().as_secs_f64() * 1e3,
        insns.map_or_else(|| "?".to_string(), |n| n.to_string()),
        if loaded.is_ok() { "" } else { ": refused" },
    );
    loaded
}

/// Loads (verifies) the raw tracepoint programs `names` side by side, one thread each: the
/// kernel verifies each in its caller's context, so start-up waits for the slowest
/// (`task_newtask`) rather than for the sum. What fails to load here is left unloaded, for
/// [`attach`] to load again and report.
pub(crate) fn preload(ebpf: &mut Ebpf, names: &[&str]) {
    let mut programs: Vec<(&str, &mut RawTracePoint)> = ebpf
        .programs_mut()
        .filter(|(name, _)| names.contains(name))
        .filter_map(|(name, p)| Some((name, <&mut RawTracePoint>::try_from(p).ok()?)))
        .collect();
    std::thread::scope(|scope| {
        for (name, prog) in programs.iter_mut() {
            scope.spawn(move || {
                let _ = load_logged(name, prog);
            });
        }
    });
}

/// Program `name` of the object as its kind `T` (`err` names the hook it is for).
pub(crate) fn program_as<'e, T>(
    ebpf: &'e mut Ebpf,
    name: &'static str,
    err: impl FnOnce(ProgramError) -> LoadError,
) -> Result<&'e mut T, LoadError>
where
    &'e mut T: TryFrom<&'e mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(err)
}

/// Loads the never-attached `control` program and returns a handle to run it.
pub(crate) fn load_control(ebpf: &mut Ebpf, program: &'static str) -> Result<ProgramFd, LoadError> {
    let err = |source| LoadError::Attach {
        program,
        tracepoint: "(none: run by userspace)",
        source,
    };
    let prog: &mut RawTracePoint = program_as(ebpf, program, err)?;
    // Loaded already when `preload` verified it.
    if prog.fd().is_err() {
        prog.load().map_err(err)?;
    }
    let fd = prog.fd().map_err(err)?;
    fd.try_clone().map_err(|source| LoadError::Control {
        op: "dup of its fd",
        source,
    })
}

/// The kernel's BTF as aya reads it, which the fexit programs need to name their functions
/// (by BTF id): parsed in a thread of its own, beside the rest of the loading, and only on
/// kernels that need those programs.
pub(crate) struct KernelBtf(Option<std::thread::JoinHandle<Result<aya::Btf, aya::BtfError>>>);

impl KernelBtf {
    pub(crate) fn start(o: &Offsets) -> KernelBtf {
        use cylo_usage_abi::net::*;
        let needed = o.net_hooks & HOOK_TRACEPOINTS == 0 || o.net_hooks & HOOK_SENDPAGE_PATH != 0;
        KernelBtf(needed.then(|| std::thread::spawn(aya::Btf::from_sys_fs)))
    }

    pub(crate) fn get(self) -> Result<aya::Btf, LoadError> {
        match self.0.map(|parse| parse.join()) {
            Some(Ok(parsed)) => parsed.map_err(LoadError::KernelBtf),
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => aya::Btf::from_sys_fs().map_err(LoadError::KernelBtf),
        }
    }
}

/// Loads and attaches fexit program `program` to kernel function `function`.
fn attach_fexit(
    ebpf: &mut Ebpf,
    hooks: &mut Vec<Hook>,
    btf: &aya::Btf,
    program: &'static str,
    function: &'static str,
) -> Result<(), LoadError> {
    let err = |source| LoadError::AttachFunction {
        program,
        function,
        source,
    };
    let prog: &mut FExit = program_as(ebpf, program, err)?;
    let link = prog
        .load(function, btf)
        .and_then(|()| prog.attach())
        .map_err(err)?;
    hooks.push(Hook::Function {
        program,
        function,
        link: Some(link),
    });
    Ok(())
}

/// Attaches the socket hooks the kernel offers (see `cylo-usage-ebpf/src/net.rs`): the
/// `sock_*_length` raw tracepoints, else fexit programs on the address families' `sendmsg`
/// and `recvmsg`; plus fexit programs on the `*_sendpage` functions where the kernel still
/// sends sendfile and splice data through `proto_ops.sendpage`. All of them or none: on
/// failure, what was attached is detached again, and the error says why the network is
/// not measured.
pub(crate) fn attach_network(
    ebpf: &mut Ebpf,
    attached: &mut Vec<Hook>,
    o: &Offsets,
    btf: KernelBtf,
) -> Result<NetworkPath, String> {
    use cylo_usage_abi::net::*;
    if [o.socket_sk, o.sk_family, o.sk_type, o.sk_protocol].contains(&ABSENT) {
        return Err(
            "this kernel's BTF has no socket layout the programs can read \
             (socket.sk, sock.__sk_common.skc_family, whole u16 sock.sk_type and \
             sock.sk_protocol)"
                .to_string(),
        );
    }
    let hooks = o.net_hooks;
    let sendpage = hooks & HOOK_SENDPAGE_PATH != 0;
    if sendpage && hooks & HOOK_FEXIT_SENDPAGE == 0 {
        return Err(
            "sendfile and splice into sockets go through proto_ops.sendpage on this \
             kernel, and its BTF lacks tcp_sendpage, udp_sendpage or \
             unix_stream_sendpage with the expected parameters"
                .to_string(),
        );
    }
    let tracepoints = hooks & HOOK_TRACEPOINTS != 0;
    if !tracepoints && hooks & HOOK_FEXIT_MSG == 0 {
        return Err(
            "the kernel has neither the sock_send_length / sock_recv_length \
             tracepoints (6.3+) nor, in its BTF, every one of the sendmsg and \
             recvmsg functions of the inet, inet6 and AF_UNIX stream, dgram and \
             seqpacket sockets with the expected parameters"
                .to_string(),
        );
    }
    let before = attached.len();
    let result = attach_network_programs(ebpf, attached, btf, tracepoints, sendpage);
    if let Err(e) = result {
        attached.truncate(before);
        unload_network(ebpf);
        return Err(crate::first_line(&crate::error_chain(&e)));
    }
    Ok(if tracepoints {
        NetworkPath::Tracepoints { sendpage }
    } else {
        NetworkPath::Functions { sendpage }
    })
}

fn attach_network_programs(
    ebpf: &mut Ebpf,
    hooks: &mut Vec<Hook>,
    btf: KernelBtf,
    tracepoints: bool,
    sendpage: bool,
) -> Result<(), LoadError> {
    if tracepoints {
        for (program, tracepoint) in [
            (names::PROG_SOCK_SEND_LENGTH, names::TP_SOCK_SEND_LENGTH),
            (names::PROG_SOCK_RECV_LENGTH, names::TP_SOCK_RECV_LENGTH),
        ] {
            attach(ebpf, hooks, program, tracepoint)?;
        }
        if !sendpage {
            return Ok(());
        }
    }
    let btf = btf.get()?;
    let msg: &[(&'static str, &'static str)] = if tracepoints {
        &[]
    } else {
        &[names::FEXIT_SENDMSG, names::FEXIT_RECVMSG].concat()
    };
    let pages: &[(&'static str, &'static str)] = if sendpage {
        &names::FEXIT_SENDPAGE
    } else {
        &[]
    };
    for &(program, function) in msg.iter().chain(pages) {
        attach_fexit(ebpf, hooks, &btf, program, function)?;
    }
    Ok(())
}

/// Detaches and unloads the network programs (after a failure to attach them all).
fn unload_network(ebpf: &mut Ebpf) {
    let network = [names::PROG_SOCK_SEND_LENGTH, names::PROG_SOCK_RECV_LENGTH]
        .into_iter()
        .chain(
            names::FEXIT_SENDMSG
                .iter()
                .chain(&names::FEXIT_RECVMSG)
                .chain(&names::FEXIT_SENDPAGE)
                .map(|&(p, _)| p),
        );
    let names: Vec<&str> = network.collect();
    for (name, prog) in ebpf.programs_mut() {
        if names.contains(&name) && prog.fd().is_ok() {
            let _ = match prog {
                aya::programs::Program::RawTracePoint(p) => p.unload(),
                aya::programs::Program::FExit(p) => p.unload(),
                _ => Ok(()),
            };
        }
    }
}

/// A program attached to a kernel hook; its link is `None` while it is detached.
pub(crate) enum Hook {
    Tracepoint {
        program: &'static str,
        tracepoint: &'static str,
        link: Option<RawTracePointLinkId>,
    },
    Function {
        program: &'static str,
        function: &'static str,
        link: Option<FExitLinkId>,
    },
}

/// Linux capability numbers (`<linux/capability.h>`).
const CAP_SYS_ADMIN: u32 = 21;

const CAP_PERFMON: u32 = 38;

const CAP_BPF: u32 = 39;

/// Why the tracker could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The process lacks the capabilities to load eBPF programs.
    #[error("missing privileges: loading the eBPF programs needs {needed}; run cylo-usage as root")]
    MissingPrivileges {
        /// The capabilities it needs.
        needed: &'static str,
    },
    /// The process's effective capabilities could not be read.
    #[error("cannot read the process's capabilities from {path}")]
    Capabilities {
        /// The file read (`/proc/self/status`).
        path: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel's layout could not be resolved from its BTF.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// aya could not load the eBPF object (`EbpfLoader::load`, which parses it and creates its
    /// maps; its programs are loaded later).
    #[error("the kernel rejected the eBPF object")]
    Load(#[source] EbpfError),
    /// The eBPF object has no program of this name.
    #[error("the eBPF object has no program {name}")]
    MissingProgram {
        /// The program's name.
        name: &'static str,
    },
    /// A raw tracepoint program could not be loaded, attached or detached, or is not a raw
    /// tracepoint program.
    #[error("program {program} could not be loaded or attached to raw tracepoint {tracepoint}")]
    Attach {
        /// The program's name.
        program: &'static str,
        /// The raw tracepoint, or `(none: run by userspace)` for a control program.
        tracepoint: &'static str,
        /// What aya or the kernel said.
        #[source]
        source: ProgramError,
    },
    /// An fexit program could not be loaded, attached, or unloaded on detach, or is not an
    /// fexit program.
    #[error(
        "program {program} could not be loaded or attached (fexit) to kernel function {function}"
    )]
    AttachFunction {
        /// The program's name.
        program: &'static str,
        /// The kernel function it traces.
        function: &'static str,
        /// What aya or the kernel said.
        #[source]
        source: ProgramError,
    },
    /// aya could not read the kernel's BTF, which the fexit programs need to name their
    /// functions.
    #[error("cannot read the kernel's BTF for the fexit programs")]
    KernelBtf(#[source] aya::BtfError),
    /// A map is missing from the eBPF object, or is not of the type the tracker uses.
    #[error("the eBPF object has no usable map {name}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// aya's error, when converting the map to its type failed; `None` otherwise.
        #[source]
        source: Option<MapError>,
    },
    /// Running a control program (`BPF_PROG_TEST_RUN`), or duplicating its descriptor,
    /// failed.
    #[error("running the control program ({op}) failed")]
    Control {
        /// What it was run for (`hello`, `adopt`), or `dup of its fd`.
        op: &'static str,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// A control program ran but returned a nonzero code.
    #[error("the control program refused {op}: code {code}")]
    ControlRefused {
        /// What it was run for (`hello`).
        op: &'static str,
        /// The code it returned.
        code: i32,
    },
    /// A reader of one of the object's maps could not be set up.
    #[error(transparent)]
    Reader(#[from] MapReadError),
}

/// Which capabilities the running process lacks for [`crate::Tracker::load`], if any.
pub fn missing_privileges() -> Result<Option<&'static str>, LoadError> {
    const PATH: &str = "/proc/self/status";
    let status =
        std::fs::read(PATH).map_err(|source| LoadError::Capabilities { path: PATH, source })?;
    let eff = crate::sys::procfs::status_field(&status, "CapEff")
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(None)
    } else {
        Ok(Some("CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)"))
    }
}

/// A raw tracepoint the tracker attaches a program to, as data: which program this kernel
/// gets, and whether the tracker can do without it. [`HOOKS`] lists them; `task_newtask`,
/// whose verification decides whether the handlers with atomics load, and the network hooks
/// ([`attach_network`], chosen from what the kernel's BTF offers) are attached apart.
pub(crate) struct HookSpec {
    pub tracepoint: &'static str,
    /// The program for this kernel (from its layout, and the variant of the handlers the
    /// tracker loads), or why the hook is left out.
    pub program: fn(&Offsets, Variant) -> Result<&'static str, &'static str>,
    /// Whether the tracker can do without the hook: a program the kernel refuses is then
    /// reported (its counters unmeasured), not fatal.
    pub optional: bool,
}

/// The hooks attached after `task_newtask`, in order.
pub(crate) const HOOKS: [HookSpec; 5] = [
    HookSpec {
        tracepoint: names::TP_SCHED_PROCESS_EXIT,
        program: |_, v| {
            Ok(match v {
                Variant::Full => names::PROG_SCHED_PROCESS_EXIT,
                Variant::Lean => names::PROG_SCHED_PROCESS_EXIT_LEAN,
                Variant::NoAtomics => names::PROG_SCHED_PROCESS_EXIT_NO_ATOMICS,
            })
        },
        optional: false,
    },
    HookSpec {
        tracepoint: names::TP_SCHED_PROCESS_EXEC,
        program: |_, v| {
            Ok(match v {
                Variant::Full => names::PROG_SCHED_PROCESS_EXEC,
                Variant::Lean => names::PROG_SCHED_PROCESS_EXEC_LEAN,
                Variant::NoAtomics => names::PROG_SCHED_PROCESS_EXEC_NO_ATOMICS,
            })
        },
        optional: false,
    },
    // The memory counters need atomics that return the old value.
    HookSpec {
        tracepoint: names::TP_RSS_STAT,
        program: |_, v| {
            if v.atomics() {
                Ok(names::PROG_RSS_STAT)
            } else {
                Err("the memory counters need BPF atomic fetch")
            }
        },
        optional: false,
    },
    HookSpec {
        tracepoint: names::TP_SCHED_SWITCH,
        program: |_, v| {
            Ok(match v {
                Variant::Full => names::PROG_SCHED_SWITCH,
                Variant::Lean => names::PROG_SCHED_SWITCH_LEAN,
                Variant::NoAtomics => names::PROG_SCHED_SWITCH_NO_ATOMICS,
            })
        },
        optional: false,
    },
    // Per-device block I/O: a program per argument layout (before 5.11 the request queue
    // comes first), and none where the kernel's BTF has no bio layout the program knows.
    HookSpec {
        tracepoint: names::TP_BLOCK_BIO_QUEUE,
        program: |o, _| {
            let has = |fields: &[u32]| fields.iter().all(|&f| f != ABSENT);
            let layout = has(&[o.bio_queue_bio_arg, o.bio_size, o.bio_opf])
                && (has(&[o.bio_bdev, o.bdev_dev])
                    || has(&[o.bio_disk, o.bio_partno, o.disk_major, o.disk_first_minor]));
            match (layout, o.bio_queue_bio_arg) {
                (false, _) => Err("this kernel's BTF has no bio layout the program knows"),
                (true, 1) => Ok(names::PROG_BLOCK_BIO_QUEUE_WITH_QUEUE),
                (true, _) => Ok(names::PROG_BLOCK_BIO_QUEUE),
            }
        },
        optional: true,
    },
];

/// The variant of the handlers a tracker loads: chosen from what its runs may ask for
/// ([`crate::ProgramSet`]) and whether the kernel's verifier takes the handlers with
/// atomics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    /// With atomics, and everything: adoption (attach) and the records of a breakdown.
    Full,
    /// With atomics, for totals alone: no adoption path and no records (the lean set: far
    /// less for the verifier at start-up).
    Lean,
    /// Without BPF atomic fetch (before 5.12): everything that does without atomics.
    NoAtomics,
}

impl Variant {
    pub(crate) fn atomics(self) -> bool {
        self != Variant::NoAtomics
    }

    /// The `task_newtask` program of this variant.
    pub(crate) fn newtask(self) -> &'static str {
        match self {
            Variant::Full => names::PROG_TASK_NEWTASK,
            Variant::Lean => names::PROG_TASK_NEWTASK_LEAN,
            Variant::NoAtomics => names::PROG_TASK_NEWTASK_NO_ATOMICS,
        }
    }

    /// The programs of this variant that are verified side by side at start-up (with the
    /// block and socket programs, which every variant shares).
    pub(crate) fn preloaded(self, o: &Offsets) -> Vec<&'static str> {
        let mut names = vec![self.newtask()];
        names.extend(HOOKS.iter().filter_map(|spec| (spec.program)(o, self).ok()));
        names
    }
}

/// The programs of the object a tracker that wants `wanted` never loads on this kernel (`o`):
/// the handlers only the other variant with atomics has (the variant without atomics stays:
/// the verifier decides at load time whether it is needed), the adoption programs in a lean
/// set (which refuses attach on every kernel), and the network programs of the path
/// [`attach_network`] does not take. Hidden from aya's parse (see
/// [`crate::kernel::object`]).
pub(crate) fn unused_programs(wanted: Variant, o: &Offsets) -> Vec<&'static str> {
    use cylo_usage_abi::net::{HOOK_SENDPAGE_PATH, HOOK_TRACEPOINTS};
    let handlers = |v: Variant| {
        let mut names = vec![v.newtask()];
        names.extend(HOOKS.iter().filter_map(|spec| (spec.program)(o, v).ok()));
        names
    };
    let loadable: Vec<&str> = [wanted, Variant::NoAtomics]
        .into_iter()
        .flat_map(handlers)
        .collect();
    let mut unused: Vec<&'static str> = [Variant::Full, Variant::Lean]
        .into_iter()
        .filter(|&v| v != wanted)
        .flat_map(handlers)
        .filter(|name| !loadable.contains(name))
        .collect();
    if wanted == Variant::Lean {
        unused.extend([
            names::PROG_CONTROL_ADOPT,
            names::PROG_CONTROL_ADOPT_NO_ATOMICS,
        ]);
    }
    let fexit =
        |list: &[(&'static str, &'static str)]| list.iter().map(|&(p, _)| p).collect::<Vec<_>>();
    if o.net_hooks & HOOK_TRACEPOINTS != 0 {
        unused.extend(fexit(&names::FEXIT_SENDMSG));
        unused.extend(fexit(&names::FEXIT_RECVMSG));
    } else {
        unused.extend([names::PROG_SOCK_SEND_LENGTH, names::PROG_SOCK_RECV_LENGTH]);
    }
    if o.net_hooks & HOOK_SENDPAGE_PATH == 0 {
        unused.extend(fexit(&names::FEXIT_SENDPAGE));
    }
    unused
}

/// Attaches `spec`'s program for this kernel. `Ok(None)`: attached, or left out by design
/// (a program the kernel does not get); `Ok(Some(why))`: an optional hook left out.
pub(crate) fn attach_spec(
    ebpf: &mut Ebpf,
    hooks: &mut Vec<Hook>,
    spec: &HookSpec,
    offsets: &Offsets,
    variant: Variant,
) -> Result<Option<String>, LoadError> {
    let program = match (spec.program)(offsets, variant) {
        Ok(program) => program,
        Err(why) => return Ok(spec.optional.then(|| why.to_string())),
    };
    match attach(ebpf, hooks, program, spec.tracepoint) {
        Ok(()) => Ok(None),
        Err(e) if spec.optional => Ok(Some(crate::first_line(&crate::error_chain(&e)))),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 5.10's bio layout: the request queue first, `bi_disk` and `bi_partno`.
    fn bio_5_10() -> Offsets {
        Offsets {
            bio_queue_bio_arg: 1,
            bio_size: 40,
            bio_opf: 16,
            bio_bdev: ABSENT,
            bdev_dev: ABSENT,
            bio_disk: 8,
            bio_partno: 26,
            disk_major: 0,
            disk_first_minor: 4,
            ..Offsets::UNRESOLVED
        }
    }

    /// 6.x's bio layout: the bio alone, `bi_bdev`.
    fn bio_6x() -> Offsets {
        Offsets {
            bio_queue_bio_arg: 0,
            bio_bdev: 8,
            bdev_dev: 4,
            bio_disk: ABSENT,
            ..bio_5_10()
        }
    }

    fn program_for(
        tracepoint: &str,
        o: &Offsets,
        atomics: bool,
    ) -> Result<&'static str, &'static str> {
        let v = if atomics {
            Variant::Full
        } else {
            Variant::NoAtomics
        };
        let spec = HOOKS.iter().find(|h| h.tracepoint == tracepoint).unwrap();
        (spec.program)(o, v)
    }

    #[test]
    fn no_program_a_tracker_may_load_is_hidden() {
        use cylo_usage_abi::net::*;
        let object: Vec<String> = aya_obj::Object::parse(crate::kernel::object::OBJECT)
            .unwrap()
            .programs
            .into_keys()
            .collect();
        let fexit = |list: &[(&'static str, &'static str)]| {
            list.iter().map(|&(p, _)| p).collect::<Vec<_>>()
        };
        // 6.18 (tracepoints), 6.3-6.4 (tracepoints and the sendpage path), 5.10-6.2 (fexit).
        for net_hooks in [
            HOOK_TRACEPOINTS,
            HOOK_TRACEPOINTS | HOOK_SENDPAGE_PATH | HOOK_FEXIT_SENDPAGE,
            HOOK_FEXIT_MSG | HOOK_SENDPAGE_PATH | HOOK_FEXIT_SENDPAGE,
        ] {
            for bio in [bio_6x(), bio_5_10()] {
                let o = Offsets { net_hooks, ..bio };
                for (wanted, set) in [(Variant::Full, "full"), (Variant::Lean, "lean")] {
                    let unused = unused_programs(wanted, &o);
                    // What `load_at`, `attach_network`, the budget hooks and an attach load.
                    let mut may_load: Vec<&str> = [wanted, Variant::NoAtomics]
                        .into_iter()
                        .flat_map(|v| v.preloaded(&o))
                        .collect();
                    may_load.extend([
                        names::PROG_CONTROL,
                        names::PROG_SCHEDULE_TAIL_EXIT,
                        names::PROG_CALCULATE_SIGPENDING_DOOMED,
                        names::PROG_SYS_EXIT_DOOMED,
                        names::PROG_SCHED_STAT_RUNTIME,
                        names::PROG_WRITEBACK_DIRTY,
                    ]);
                    if wanted == Variant::Full {
                        may_load.extend([
                            names::PROG_CONTROL_ADOPT,
                            names::PROG_CONTROL_ADOPT_NO_ATOMICS,
                        ]);
                    }
                    if net_hooks & HOOK_TRACEPOINTS != 0 {
                        may_load
                            .extend([names::PROG_SOCK_SEND_LENGTH, names::PROG_SOCK_RECV_LENGTH]);
                    } else {
                        may_load.extend(fexit(&names::FEXIT_SENDMSG));
                        may_load.extend(fexit(&names::FEXIT_RECVMSG));
                    }
                    if net_hooks & HOOK_SENDPAGE_PATH != 0 {
                        may_load.extend(fexit(&names::FEXIT_SENDPAGE));
                    }
                    for name in &may_load {
                        assert!(object.iter().any(|p| p == name), "{name} is no program");
                        assert!(
                            !unused.contains(name),
                            "{set}, hooks {net_hooks}: {name} hidden"
                        );
                    }
                    // Every hidden name is a program of the object (a renamed program would
                    // otherwise silently stop being hidden).
                    for name in &unused {
                        assert!(object.iter().any(|p| p == name), "{name} is no program");
                    }
                    // Hidden: the other set's own handlers, and the other network path's.
                    let other = if wanted == Variant::Full {
                        Variant::Lean
                    } else {
                        Variant::Full
                    };
                    assert!(unused.contains(&other.newtask()), "{set}: {unused:?}");
                    let other_net = if net_hooks & HOOK_TRACEPOINTS != 0 {
                        names::FEXIT_SENDMSG[0].0
                    } else {
                        names::PROG_SOCK_SEND_LENGTH
                    };
                    assert!(unused.contains(&other_net), "{set}: {unused:?}");
                }
            }
        }
    }

    #[test]
    fn the_hook_table_picks_each_kernels_program() {
        // 5.10's bio layout (the request queue first, bi_disk + bi_partno) and 6.x's
        // (the bio alone, bi_bdev); and a kernel whose BTF has neither.
        let (old, new) = (bio_5_10(), bio_6x());
        let none = Offsets {
            bio_size: ABSENT,
            ..new
        };
        let bio = names::TP_BLOCK_BIO_QUEUE;
        assert_eq!(
            program_for(bio, &old, true),
            Ok(names::PROG_BLOCK_BIO_QUEUE_WITH_QUEUE)
        );
        assert_eq!(
            program_for(bio, &new, false),
            Ok(names::PROG_BLOCK_BIO_QUEUE)
        );
        assert!(program_for(bio, &none, true).is_err());
        // Without atomics: the variants without, and no rss_stat.
        for (tp, with, without) in [
            (
                names::TP_SCHED_PROCESS_EXIT,
                names::PROG_SCHED_PROCESS_EXIT,
                Some(names::PROG_SCHED_PROCESS_EXIT_NO_ATOMICS),
            ),
            (
                names::TP_SCHED_PROCESS_EXEC,
                names::PROG_SCHED_PROCESS_EXEC,
                Some(names::PROG_SCHED_PROCESS_EXEC_NO_ATOMICS),
            ),
            (
                names::TP_SCHED_SWITCH,
                names::PROG_SCHED_SWITCH,
                Some(names::PROG_SCHED_SWITCH_NO_ATOMICS),
            ),
            (names::TP_RSS_STAT, names::PROG_RSS_STAT, None),
        ] {
            assert_eq!(program_for(tp, &new, true), Ok(with));
            assert_eq!(program_for(tp, &new, false).ok(), without);
        }
        // Only the block hook may be left out.
        let optional: Vec<_> = HOOKS
            .iter()
            .filter(|h| h.optional)
            .map(|h| h.tracepoint)
            .collect();
        assert_eq!(optional, [bio]);
    }

    #[test]
    fn the_lean_set_differs_only_where_the_adoption_and_breakdown_paths_are() {
        let o = bio_6x();
        let full = Variant::Full.preloaded(&o);
        let lean = Variant::Lean.preloaded(&o);
        assert_eq!(full.len(), lean.len());
        let changed: Vec<_> = full
            .iter()
            .zip(&lean)
            .filter(|(f, l)| f != l)
            .map(|(_, l)| *l)
            .collect();
        assert_eq!(
            changed,
            [
                names::PROG_TASK_NEWTASK_LEAN,
                names::PROG_SCHED_PROCESS_EXIT_LEAN,
                names::PROG_SCHED_PROCESS_EXEC_LEAN,
                names::PROG_SCHED_SWITCH_LEAN,
            ]
        );
        assert!(lean.contains(&names::PROG_BLOCK_BIO_QUEUE));
        assert!(lean.contains(&names::PROG_RSS_STAT));
        assert!(
            !Variant::NoAtomics
                .preloaded(&o)
                .contains(&names::PROG_RSS_STAT)
        );
    }
}
