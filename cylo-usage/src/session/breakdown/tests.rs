use super::*;
use crate::kernel::features::Measured;
use crate::sys::lock;
use cylo_usage_abi::{COMM_BYTES, DUMP_USER, FILENAME_BYTES, ThreadUsage, creds_known};
use std::sync::{Arc, Mutex};

const UNITS: Units = Units {
    ticks_per_second: 100,
    page_size: 4096,
};

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: reading the bytes of a plain-data ABI record.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

fn head(kind: u32, time_ns: u64, process: u64) -> RecordHeader {
    RecordHeader {
        kind,
        run: 0,
        time_ns,
        process,
    }
}

fn comm(s: &[u8]) -> [u8; COMM_BYTES] {
    let mut c = [0; COMM_BYTES];
    c[..s.len()].copy_from_slice(s);
    c
}

fn start(id: u64, parent: u64, pid: u32, name: &[u8]) -> Vec<u8> {
    bytes_of(&ProcStart {
        header: head(record_kind::PROC_START, 1_000 + pid as u64, id),
        parent,
        start_boottime_ns: 5,
        start_mono_ns: 0,
        pid_global: pid,
        pid,
        pid_own_ns: pid,
        ppid: 1,
        flags: 0,
        _pad0: 0,
        comm: comm(name),
        creds: plain(1000),
    })
}

/// The credentials of a process of user `uid` (gid the same) that exec'd nothing special.
fn plain(uid: u32) -> Creds {
    Creds {
        uid,
        gid: uid,
        suid: uid,
        sgid: uid,
        euid: uid,
        egid: uid,
        dumpable: DUMP_USER,
        known: creds_known::IDS | creds_known::DUMPABLE,
    }
}

fn exec(id: u64, pid: u32, path: &[u8], creds: Creds) -> Vec<u8> {
    let mut argv = [0u8; ARGV_BYTES];
    argv[..path.len()].copy_from_slice(path);
    let mut filename = [0u8; FILENAME_BYTES];
    filename[..path.len()].copy_from_slice(path);
    bytes_of(&ProcExec {
        header: head(record_kind::PROC_EXEC, 2_000, id),
        old_mm_peak_pages: 0,
        pid,
        argv_len: path.len() as u32 + 1,
        argv_truncated: 0,
        _pad0: 0,
        comm: comm(b"x"),
        filename,
        argv,
        creds,
    })
}

fn thread_end(id: u64, runtime: u64, kind: u32) -> Vec<u8> {
    bytes_of(&ThreadEnd {
        header: head(kind, 9_000, id),
        usage: ThreadUsage {
            cpu_runtime_ns: runtime,
            cpu_utime_ns: 3,
            cpu_stime_ns: 1,
            disk_read_bytes: 10,
            disk_write_bytes: 20,
            disk_cancelled_write_bytes: 0,
            io_rchar: 30,
            io_wchar: 40,
        },
        net_sent: 7,
        net_received: 9,
    })
}

fn exit(id: u64, status: u32, threads: u64) -> Vec<u8> {
    bytes_of(&ProcExit {
        header: head(record_kind::PROC_EXIT, 8_000, id),
        exit_code: status,
        _pad0: 0,
        mm_peak_pages: 7,
        threads,
        comm: comm(b"true"),
    })
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);
impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn records_make_processes_whose_parts_sum_up() {
    let out = Shared::default();
    let mut t = Breakdown::new(
        1_000,
        true,
        10,
        Some(Box::new(out.clone())),
        UNITS,
        Share::unlimited(),
    );
    t.take(&start(0xa, 0, 100, b"sh"));
    t.take(&start(0xb, 0xa, 101, b"sh"));
    let mut argv = [0u8; ARGV_BYTES];
    argv[..14].copy_from_slice(b"/bin/true\0-x\0\0");
    let mut filename = [0u8; FILENAME_BYTES];
    filename[..9].copy_from_slice(b"/bin/true");
    t.take(&bytes_of(&ProcExec {
        header: head(record_kind::PROC_EXEC, 2_000, 0xb),
        old_mm_peak_pages: 0,
        pid: 101,
        argv_len: 13,
        argv_truncated: 0,
        _pad0: 0,
        comm: comm(b"true"),
        filename,
        argv,
        creds: plain(1000),
    }));
    t.take(&exit(0xb, 3 << 8, 2));
    t.take(&thread_end(0xb, 500, record_kind::THREAD_END));
    assert!(
        !lock(&out.0).ends_with(b"}\n")
            || !String::from_utf8_lossy(&lock(&out.0)).contains("\"exit\""),
        "no exit event before every thread is in"
    );
    t.take(&thread_end(0xb, 700, record_kind::THREAD_END));
    let live_used = Used {
        usage: ThreadUsage {
            cpu_runtime_ns: 50,
            ..ThreadUsage::default()
        },
        net_sent: 1,
        net_received: 2,
    };
    let live = HashMap::from([(0xa, (live_used, 1))]);
    let ps = t.processes(&live, Measured::ALL);
    assert_eq!(ps.len(), 2);
    assert_eq!(ps[1].comm, "true");
    assert_eq!(
        ps[1].argv.as_deref(),
        Some(&["/bin/true".to_string(), "-x".to_string()][..])
    );
    assert_eq!((ps[1].exit_code, ps[1].signal), (Some(3), None));
    assert_eq!(ps[1].cpu_time_ns, 1200);
    assert_eq!(ps[1].thread_count, 2);
    assert_eq!(ps[1].disk_bytes_written, Some(40));
    assert_eq!(ps[1].network_bytes_sent, Some(14));
    assert_eq!(
        ps[0].network_bytes_received,
        Some(2),
        "live threads' own counts"
    );
    assert_eq!(ps[1].peak_memory_bytes, Some(7 * 4096));
    assert_eq!(ps[1].start_ns, 101);
    assert_eq!(ps[1].end_ns, Some(7_000));
    assert_eq!(
        (ps[0].cpu_time_ns, ps[0].thread_count, ps[0].end_ns),
        (50, 1, None)
    );
    t.release_all();
    let text = String::from_utf8(lock(&out.0).clone()).unwrap();
    let kinds: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["start", "fork", "fork", "exec", "exit"]);
}

/// Counts, per thread, the bytes the allocator has handed out and not yet taken back,
/// so a test can weigh what one structure of its own thread holds.
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static HELD: Cell<i64> = const { Cell::new(0) };
    }

    fn add(n: i64) {
        let _ = HELD.try_with(|h| h.set(h.get() + n));
    }

    /// Bytes this thread holds now (requested sizes).
    pub fn held() -> i64 {
        HELD.with(Cell::get)
    }

    // SAFETY: every call is passed to the system allocator unchanged; only counted.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as i64);
            // SAFETY: as the caller promises for `layout`.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            add(-(layout.size() as i64));
            // SAFETY: as the caller promises.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as i64);
            // SAFETY: as the caller promises for `layout`.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
            add(new as i64 - layout.size() as i64);
            // SAFETY: as the caller promises.
            unsafe { System.realloc(ptr, layout, new) }
        }
    }
}

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

fn exec_of(id: u64, pid: u32, argv: &[u8]) -> Vec<u8> {
    let mut a = [0u8; ARGV_BYTES];
    a[..argv.len()].copy_from_slice(argv);
    let mut filename = [0u8; FILENAME_BYTES];
    filename[..12].copy_from_slice(b"/usr/bin/cc1");
    bytes_of(&ProcExec {
        header: head(record_kind::PROC_EXEC, 2_000, id),
        old_mm_peak_pages: 0,
        pid,
        argv_len: argv.len() as u32,
        argv_truncated: 0,
        _pad0: 0,
        comm: comm(b"cc1"),
        filename,
        argv: a,
        creds: plain(1000),
    })
}

/// Builds a tree of `n` processes, every other one exec'ing, in this thread.
fn big_tree(n: u64, share: Share) -> Breakdown {
    let mut t = Breakdown::new(0, true, usize::MAX, None, UNITS, share);
    let argv = b"cc1\0-O2\0-c\0some/rather/long/path/to/a/source/file.c\0";
    for i in 0..n {
        t.take(&start(0x1000 + i, 0x1000, 100 + i as u32, b"make"));
        if i % 2 == 0 {
            t.take(&exec_of(0x1000 + i, 100 + i as u32, argv));
        }
    }
    t
}

#[test]
fn the_charged_footprint_is_what_the_allocator_holds() {
    // Records and budget made outside the measured window.
    let records: Vec<Vec<u8>> = Vec::new();
    drop(records);
    let before = counting::held();
    let t = big_tree(10_000, Share::unlimited());
    let held = (counting::held() - before) as u64;
    let footprint = t.footprint();
    let per_process = footprint / 10_000;
    eprintln!(
        "10,000 processes (half exec'd): the allocator holds {held} bytes (requested), \
             the tree charges {footprint} ({per_process} per process; an entry is {} bytes)",
        std::mem::size_of::<Option<Proc>>()
    );
    // The charge covers what was requested, plus the allocator's own overhead on the
    // small strings, and no more than that.
    assert!(footprint >= held, "charged {footprint} < held {held}");
    assert!(
        footprint <= held + held / 4,
        "charged {footprint} is far above held {held}"
    );
    assert_eq!(t.charged, footprint, "every change was settled");
}

#[test]
fn a_share_too_small_leaves_processes_out_and_names_the_limit() {
    let budget = crate::session::budget::Budget::new(64 << 20, 1 << 20);
    let share = budget.account(1000);
    let t = big_tree(20_000, share.clone());
    let kept = t.processes(&HashMap::new(), Measured::ALL).len() as u64;
    let (dropped, execs, limit) = t.memory_refusals().expect("refused");
    assert_eq!(kept + dropped, 20_000);
    assert_eq!(t.dropped(), dropped);
    assert!(
        kept > 500 && dropped > 5_000,
        "kept {kept}, dropped {dropped}"
    );
    assert!(execs <= kept, "{execs}");
    assert_eq!(
        limit,
        crate::session::budget::Limit::UserShare {
            uid: 1000,
            bytes: 1 << 20
        }
    );
    // What is held is what the tree takes, within the share (a reconciliation may pass
    // it by a few bytes).
    assert_eq!(share.held(), t.footprint());
    assert!(share.held() <= (1 << 20) + 4096, "{}", share.held());
    drop(t);
    drop(share);
    assert_eq!(
        budget.held_bytes(),
        0,
        "all given back when the session ends"
    );
}

#[test]
fn an_events_only_tree_reuses_the_places_of_ended_processes() {
    let out = Shared::default();
    let budget = crate::session::budget::Budget::new(64 << 20, 1 << 20);
    let share = budget.account(1000);
    let mut t = Breakdown::new(
        0,
        false,
        10,
        Some(Box::new(out.clone())),
        UNITS,
        share.clone(),
    );
    for i in 0..50_000u64 {
        let id = 0x10_0000 + i;
        t.take(&start(id, 0, 100, b"x"));
        t.take(&exit(id, 0, 1));
        t.take(&thread_end(id, 5, record_kind::THREAD_END));
    }
    t.release_all();
    assert!(t.procs.capacity() <= 4, "{}", t.procs.capacity());
    assert_eq!(t.dropped(), 0, "no limit and no share reached");
    assert!(share.held() < 4096, "{}", share.held());
    let text = String::from_utf8(lock(&out.0).clone()).unwrap();
    assert_eq!(text.matches("\"exit\"").count(), 50_000);
}

#[test]
fn adopted_usage_is_taken_off() {
    let mut t = Breakdown::new(0, true, 10, None, UNITS, Share::unlimited());
    t.take(&start(0xa, 0, 100, b"job"));
    t.take(&thread_end(0xa, 400, record_kind::THREAD_ADOPTED));
    t.take(&exit(0xa, 9, 1));
    t.take(&thread_end(0xa, 1000, record_kind::THREAD_END));
    let ps = t.processes(&HashMap::new(), Measured::ALL);
    assert_eq!(ps[0].cpu_time_ns, 600);
    assert_eq!(ps[0].disk_bytes_read, Some(0));
    assert_eq!((ps[0].exit_code, ps[0].signal), (None, Some(9)));
}

/// A process present at an attach: its real start (before the session's), and the argv
/// the scan read for its pid and start time (not for another process with its pid).
#[test]
fn adopted_processes_start_before_the_attach_with_the_argv_read_for_them() {
    let mut t = Breakdown::new(1_000_000_000, true, 10, None, UNITS, Share::unlimited());
    let adopted = |id: u64, pid: u32, boot_ns: u64, mono_ns: u64| {
        let mut r: ProcStart = read_record(&start(id, 0, pid, b"make")).unwrap();
        r.flags = proc_flags::ADOPTED;
        r.start_boottime_ns = boot_ns;
        r.start_mono_ns = mono_ns;
        bytes_of(&r)
    };
    // Started 0.25 s before the session; at tick 70 (UNITS: 100 ticks a second).
    t.take(&adopted(0xa, 100, 700_000_000, 750_000_000));
    t.take(&adopted(0xb, 101, 800_000_000, 850_000_000));
    let argv = HashMap::from([
        (
            (100, 70),
            AdoptedArgv {
                bytes: b"make\0-j4\0".to_vec(),
                truncated: false,
            },
        ),
        // pid 101 at another start: a process that reused the pid.
        (
            (101, 79),
            AdoptedArgv {
                bytes: b"other\0".to_vec(),
                truncated: true,
            },
        ),
    ]);
    t.note_adopted_argv(&argv);
    let ps = t.processes(&HashMap::new(), Measured::ALL);
    assert_eq!(ps[0].start_ns, -250_000_000);
    assert_eq!(
        ps[0].argv.as_deref(),
        Some(&["make".into(), "-j4".into()][..])
    );
    assert!(ps[0].attached && !ps[0].argv_truncated);
    assert_eq!(ps[1].start_ns, -150_000_000);
    assert_eq!(ps[1].argv, None);
}

#[test]
fn the_limit_drops_and_counts() {
    let mut t = Breakdown::new(0, true, 2, None, UNITS, Share::unlimited());
    for i in 0..5 {
        t.take(&start(0x10 + i, 0, 100 + i as u32, b"x"));
    }
    t.take(&thread_end(0x14, 5, record_kind::THREAD_END));
    assert_eq!(t.processes(&HashMap::new(), Measured::ALL).len(), 2);
    assert_eq!(t.dropped(), 3);
}

#[test]
fn garbage_records_are_ignored() {
    let mut t = Breakdown::new(0, true, 2, None, UNITS, Share::unlimited());
    t.take(&[]);
    t.take(&[1, 2, 3]);
    let mut short = start(0xa, 0, 1, b"x");
    short.truncate(30);
    t.take(&short);
    let mut unknown = start(0xa, 0, 1, b"x");
    unknown[0] = 99;
    t.take(&unknown);
    assert!(t.processes(&HashMap::new(), Measured::ALL).is_empty());
}

#[test]
fn hostile_bytes_stay_valid_strings() {
    assert_eq!(escape_bytes(b"ok"), "ok");
    assert_eq!(escape_bytes(b"a\xffb"), "a\\xffb");
    // A literal backslash is doubled: the argument `\xff` is not the byte 0xff.
    assert_eq!(escape_bytes(b"\\xff\xff"), "\\\\xff\\xff");
    assert_eq!(escape_bytes("é\n\x1b[2J".as_bytes()), "é\n\x1b[2J");
    assert_eq!(split_argv(b"a\0b\0"), ["a", "b"]);
    assert_eq!(split_argv(b"a\0b"), ["a", "b"]);
    assert!(split_argv(b"").is_empty());
    let json = serde_json::to_string(&split_argv(b"\x1b]0;x\x07\0\xfe")).unwrap();
    let back: Vec<String> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, ["\x1b]0;x\x07", "\\xfe"]);
}

#[test]
fn statuses_decode_like_wait() {
    assert_eq!(decode_status(0), (Some(0), None));
    assert_eq!(decode_status(3 << 8), (Some(3), None));
    assert_eq!(decode_status(9), (None, Some(9)));
    assert_eq!(decode_status(0x80 | 11), (None, Some(11)), "core dumped");
}

#[test]
fn a_viewer_reads_what_ptrace_read_fscreds_would_let_it() {
    let me = Viewer {
        uid: 1000,
        gid: 1000,
    };
    assert!(me.may_read(Some(&plain(1000))), "its own plain process");
    assert!(!me.may_read(Some(&plain(1001))), "another user's");
    type Change = (&'static str, fn(&mut Creds));
    let changed: [Change; 8] = [
        ("setuid: euid", |c| c.euid = 0),
        ("setuid then setreuid: saved uid", |c| c.suid = 0),
        ("real uid", |c| c.uid = 0),
        ("setgid: egid", |c| c.egid = 0),
        ("saved gid", |c| c.sgid = 0),
        ("real gid", |c| c.gid = 0),
        ("file capabilities: not dumpable", |c| c.dumpable = 0),
        ("suid_dumpable=2: root-only dumps", |c| c.dumpable = 2),
    ];
    for (what, change) in changed {
        let mut c = plain(1000);
        change(&mut c);
        assert!(!me.may_read(Some(&c)), "{what}");
        let root = Viewer { uid: 0, gid: 0 };
        assert!(root.may_read(Some(&c)), "root reads {what}");
    }
    // Dumpability unknown (no `mm_struct.flags`, or no address space): the ids decide.
    let mut c = plain(1000);
    c.known = creds_known::IDS;
    c.dumpable = 0;
    assert!(me.may_read(Some(&c)));
    // Ids not read, or no record: fail closed.
    c.known = creds_known::DUMPABLE;
    c.dumpable = DUMP_USER;
    assert!(!me.may_read(Some(&c)));
    assert!(!me.may_read(None));
    assert!(Viewer { uid: 0, gid: 5 }.may_read(None));
}

#[test]
fn a_member_with_other_credentials_is_withheld_from_the_viewer() {
    let out = Shared::default();
    let mut t = Breakdown::new(
        1_000,
        true,
        10,
        Some(Box::new(out.clone())),
        UNITS,
        Share::unlimited(),
    );
    t.set_viewer(Some(Viewer {
        uid: 1000,
        gid: 1000,
    }));
    t.take(&start(0xa, 0, 100, b"sh"));
    t.take(&start(0xb, 0xa, 101, b"sh"));
    t.take(&start(0xc, 0xa, 102, b"sh"));
    // 0xb execs a setuid-root binary: euid and saved uid 0, not dumpable.
    let mut setuid = plain(1000);
    setuid.euid = 0;
    setuid.suid = 0;
    setuid.dumpable = 0;
    t.take(&exec(0xb, 101, b"/usr/bin/su", setuid));
    t.take(&exec(0xc, 102, b"/bin/cat", plain(1000)));
    for id in [0xb, 0xc] {
        t.take(&exit(id, 0, 1));
        t.take(&thread_end(id, 500, record_kind::THREAD_END));
    }
    let ps = t.processes(&HashMap::new(), Measured::ALL);
    let su = &ps[1];
    assert!(su.withheld);
    assert_eq!((su.argv.as_ref(), su.filename.as_ref()), (None, None));
    for v in [
        su.disk_bytes_read,
        su.disk_bytes_written,
        su.disk_cancelled_write_bytes,
        su.io_read_chars,
        su.io_write_chars,
        su.network_bytes_sent,
        su.network_bytes_received,
    ] {
        assert_eq!(v, None);
    }
    assert_eq!(
        su.cpu_time_ns, 500,
        "what /proc/PID/stat shows everyone stays"
    );
    assert_eq!(su.exit_code, Some(0));
    for other in [&ps[0], &ps[2]] {
        assert!(!other.withheld);
        assert!(other.disk_bytes_read.is_some());
    }
    assert_eq!(ps[2].filename.as_deref(), Some("/bin/cat"));
    let json = serde_json::to_value(&ps[2]).unwrap();
    assert!(json.get("withheld").is_none(), "only marked when true");
    let json = serde_json::to_value(su).unwrap();
    assert_eq!(json["withheld"], true);
    assert!(json["io_read_chars"].is_null() && json["argv"].is_null());

    t.release_all();
    let text = String::from_utf8(lock(&out.0).clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |event: &str, pid: u32| {
        lines
            .iter()
            .find(|l| l["event"] == event && l["pid"] == pid)
            .unwrap_or_else(|| panic!("no {event} of {pid} in {text}"))
    };
    let e = of("exec", 101);
    assert!(e["argv"].is_null() && e["filename"].is_null());
    assert_eq!(e["withheld"], true);
    let e = of("exit", 101);
    assert!(e["disk_bytes_read"].is_null() && e["io_write_chars"].is_null());
    assert_eq!(e["withheld"], true);
    assert_eq!(e["cpu_time_ns"], 500);
    let e = of("exec", 102);
    assert_eq!(e["filename"], "/bin/cat");
    assert!(e.get("withheld").is_none());
    assert_eq!(of("exit", 102)["io_read_chars"], 30);
    assert!(!text.contains("/usr/bin/su"));

    // Without a viewer (root, or an in-process run), everything.
    let mut t = Breakdown::new(1_000, true, 10, None, UNITS, Share::unlimited());
    t.take(&start(0xb, 0, 101, b"sh"));
    t.take(&exec(0xb, 101, b"/usr/bin/su", setuid));
    let ps = t.processes(&HashMap::new(), Measured::ALL);
    assert!(!ps[0].withheld);
    assert_eq!(ps[0].filename.as_deref(), Some("/usr/bin/su"));
}

fn lines_of(out: &Shared) -> Vec<serde_json::Value> {
    String::from_utf8(lock(&out.0).clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn events_go_out_in_time_order_and_exits_carry_every_breakdown_field() {
    let out = Shared::default();
    let mut t = Breakdown::new(
        0,
        true,
        10,
        Some(Box::new(out.clone())),
        UNITS,
        Share::unlimited(),
    );
    t.take(&start(0xa, 0, 100, b"a")); // t = 1,100
    t.take(&exit(0xa, 0, 1)); // t = 8,000, its thread's record still to come
    t.take(&start(0xb, 0xa, 9_000, b"b")); // t = 10,000
    t.take(&start(0xc, 0xa, 50, b"c")); // t = 1,050: reserved first, stamped later
    t.release(1_000_000_000);
    let times = |out: &Shared| -> Vec<u64> {
        lines_of(out)
            .iter()
            .map(|l| l["time_ns"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        times(&out),
        [0, 1_050, 1_100],
        "nothing after a waiting exit"
    );
    t.take(&thread_end(0xa, 500, record_kind::THREAD_END)); // t = 9,000
    t.release(1_000_000_000);
    assert_eq!(times(&out), [0, 1_050, 1_100, 8_000, 10_000]);
    t.take(&start(0xd, 0xa, 999_000_000, b"d"));
    t.release(1_000_000_000);
    assert_eq!(times(&out).len(), 5, "within the margin of the drain: held");
    t.release_all();
    assert_eq!(times(&out).len(), 6);

    // The exit event has every field of the breakdown's entry, whatever is added later.
    let lines = lines_of(&out);
    let exit = lines.iter().find(|l| l["event"] == "exit").unwrap();
    let mut exit_keys: Vec<&String> = exit.as_object().unwrap().keys().collect();
    exit_keys.retain(|k| *k != "event" && *k != "time_ns");
    let ps = t.processes(&HashMap::new(), Measured::ALL);
    let entry = serde_json::to_value(&ps[0]).unwrap();
    let entry_keys: Vec<&String> = entry.as_object().unwrap().keys().collect();
    assert_eq!(exit_keys, entry_keys);
    assert_eq!(exit["disk_cancelled_write_bytes"], 0);
    assert_eq!(exit["cpu_time_ns"], 500);
    assert_eq!(exit["end_ns"], 8_000);
}

#[test]
fn an_exit_whose_threads_never_come_goes_out_incomplete_after_the_hold() {
    let out = Shared::default();
    let mut t = Breakdown::new(
        0,
        false,
        10,
        Some(Box::new(out.clone())),
        UNITS,
        Share::unlimited(),
    );
    t.take(&start(0xa, 0, 100, b"a"));
    t.take(&exit(0xa, 0, 2));
    t.take(&thread_end(0xa, 500, record_kind::THREAD_END));
    t.take(&start(0xb, 0, 9_000, b"b"));
    t.release(EXIT_HOLD_NS);
    assert_eq!(lines_of(&out).len(), 2, "start and the first fork");
    t.release(8_000 + EXIT_HOLD_NS + 1);
    let lines = lines_of(&out);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(
        (&lines[2]["event"], &lines[2]["incomplete"]),
        (&"exit".into(), &true.into())
    );
    assert_eq!(lines[3]["event"], "fork");
    t.take(&thread_end(0xa, 500, record_kind::THREAD_END));
    t.release_all();
    assert_eq!(lines_of(&out).len(), 4, "one exit event");
}

#[test]
fn a_storm_overflowing_the_reorder_buffer_keeps_the_order() {
    let out = Shared::default();
    let mut t = Breakdown::new(
        0,
        false,
        usize::MAX,
        Some(Box::new(out.clone())),
        UNITS,
        Share::unlimited(),
    );
    // Each exit waits for its thread until the buffer overflows.
    for i in 0..(3 * MAX_HELD_LINES as u64) {
        t.take(&start(0x10_0000 + i, 0, i as u32, b"x"));
        let mut e = exit(0x10_0000 + i, 0, 1);
        e[8..16].copy_from_slice(&(1_000 + i).to_ne_bytes()); // the header's time_ns
        t.take(&e);
    }
    assert!(t.held.len() <= MAX_HELD_LINES && t.held_bytes <= MAX_HELD_BYTES);
    t.release_all();
    let times: Vec<u64> = lines_of(&out)
        .iter()
        .map(|l| l["time_ns"].as_u64().unwrap())
        .collect();
    assert_eq!(times.len(), 1 + 6 * MAX_HELD_LINES);
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
}
