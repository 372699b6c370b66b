//! A process tree as `/proc` shows it at one moment: the /proc fallback's sampler and
//! [`crate::get_resource_usage`] both read it from here.
//!
//! Processes are not threads: a process is a `/proc/PID` directory whose threads are listed
//! in `/proc/PID/task`; its children are found through `/proc/PID/task/TID/children` of each
//! of its threads (or, on kernels without `CONFIG_PROC_CHILDREN`, a scan of every process's
//! parent). Identity is pid plus start time, so a reused pid is never taken for the process
//! that had it. A process that vanishes while it is being read is skipped, never an error;
//! a permission error is returned to the caller, who decides.
//!
//! Everything is read relative to a root folder (`/proc` normally), so the walk is tested on
//! fixture trees too.
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::ErrorKind;
use std::path::PathBuf;

use crate::sys::procfs::{ProcError, ThreadIo, parse_io, parse_schedstat, parse_vm_hwm};

/// The fields of `/proc/PID/stat` the fallback uses. CPU fields are clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `Z`, ...
    pub state: char,
    /// Field 4 (0 when the parent is outside the reader's pid namespace).
    pub ppid: u32,
    /// Fields 14 and 15: user and system time of the whole process, exited threads included.
    pub utime: u64,
    pub stime: u64,
    /// Fields 16 and 17: user and system time of the children it has waited for (and of
    /// everything they had waited for).
    pub cutime: u64,
    pub cstime: u64,
    /// Field 20.
    pub num_threads: u64,
    /// Field 22: start time in clock ticks since boot.
    pub start_ticks: u64,
    /// Field 24: resident set size in pages (file, anonymous and shmem pages).
    pub rss_pages: u64,
    /// Field 52: the wait status of a zombie, when the reader may see it.
    pub exit_code: Option<i32>,
}

impl ProcStat {
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
}

/// Parses `/proc/PID/stat`. Fields are taken after the LAST `)`: the command name may hold
/// spaces, parentheses and newlines. Negative counts (a signed `long` in the kernel) read as 0.
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let unsigned = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let signed = |n: usize| -> Option<u64> {
        let v: i64 = fields.get(n - 3)?.parse().ok()?;
        Some(v.max(0) as u64)
    };
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: u32::try_from(signed(4)?).ok()?,
        utime: unsigned(14)?,
        stime: unsigned(15)?,
        cutime: signed(16)?,
        cstime: signed(17)?,
        num_threads: signed(20)?,
        start_ticks: unsigned(22)?,
        rss_pages: signed(24)?,
        exit_code: fields.get(52 - 3).and_then(|v| v.parse::<i32>().ok()),
    })
}

/// Parses a `children` file: pids separated by spaces.
pub fn parse_children(text: &str) -> Vec<u32> {
    text.split_ascii_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether an error means that the process (or thread) is gone: its directory vanished
/// (`ENOENT`), or it exited while its file was read (`ESRCH`).
pub fn is_gone(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// Reads a whole file with open, read until the end, close: no `statx` and `lseek` for a
/// size hint as `std::fs::read_to_string` makes (a /proc file has no size), which matters to
/// a sampler that reads a few files per process every 10 ms.
fn read_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1024];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
}

/// Files kept open for re-reading with `pread` at offset 0 (a /proc file is generated anew
/// at each read from its start): one system call per read instead of four. A file of /proc
/// is tied to its process: once that process is gone, reads fail with `ESRCH`, even if its
/// pid is reused meanwhile.
#[derive(Debug)]
struct FileCache {
    files: HashMap<String, (std::fs::File, u64)>,
    /// The current pass; files not read during the last one are closed.
    pass: u64,
    limit: usize,
    buf: Vec<u8>,
}

/// Reads `f` from offset 0 into `buf`; the text.
fn pread_all(f: &std::fs::File, buf: &mut Vec<u8>) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    loop {
        let n = loop {
            match f.read_at(buf, 0) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        // A read stops early only at the end, or when the next record (a few bytes, for
        // these files) does not fit: with room to spare, this is all of it.
        if n + 256 < buf.len() {
            return String::from_utf8(buf[..n].to_vec())
                .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e));
        }
        let bigger = buf.len() * 2;
        buf.resize(bigger, 0);
    }
}

/// A /proc to read: `/proc`, or a fixture folder laid out the same way.
#[derive(Debug)]
pub struct ProcFs {
    root: PathBuf,
    cache: Option<std::cell::RefCell<FileCache>>,
    /// Whether the kernel has `children` files, once known.
    children_files: std::cell::Cell<Option<bool>>,
}

/// What a read found.
pub enum Read<T> {
    Got(T),
    /// The process or thread is gone (or its pid was reused).
    Gone,
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> ProcFs {
        ProcFs {
            root: root.into(),
            cache: None,
            children_files: std::cell::Cell::new(None),
        }
    }

    /// The system's `/proc`, keeping the `stat` and `children` files it reads open for the
    /// next read (for a sampler; see [`ProcFs::end_pass`]). At most a quarter of the
    /// process's descriptor limit (and 1,024) are kept; beyond that, files are opened anew.
    pub fn host_cached() -> ProcFs {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills a local.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur
        } else {
            1024
        };
        ProcFs {
            root: PathBuf::from("/proc"),
            cache: Some(std::cell::RefCell::new(FileCache {
                files: HashMap::new(),
                pass: 0,
                limit: (soft / 4).min(1024) as usize,
                buf: vec![0; 4096],
            })),
            children_files: std::cell::Cell::new(None),
        }
    }

    /// Ends a pass over the tree: files not read since the last call are closed (their
    /// processes left the tree).
    pub fn end_pass(&self) {
        if let Some(cache) = &self.cache {
            let mut c = cache.borrow_mut();
            let pass = c.pass;
            c.files.retain(|_, (_, used)| *used == pass);
            c.pass += 1;
        }
    }

    /// A read through the cache: `None` if the file is not to be cached.
    fn read_cached(&self, rel: &str) -> Option<Result<Read<String>, ProcError>> {
        let cache = self.cache.as_ref()?;
        if !(rel.ends_with("/stat") || rel.ends_with("/children")) {
            return None;
        }
        let mut c = cache.borrow_mut();
        let c = &mut *c;
        if !c.files.contains_key(rel) {
            if c.files.len() >= c.limit {
                return None;
            }
            let path = self.path(rel);
            match std::fs::File::open(&path) {
                Ok(f) => {
                    c.files.insert(rel.to_string(), (f, c.pass));
                }
                Err(e) if is_gone(&e) => return Some(Ok(Read::Gone)),
                Err(source) => return Some(Err(ProcError::Read { path, source })),
            }
        }
        let (f, used) = c.files.get_mut(rel).expect("inserted above");
        *used = c.pass;
        match pread_all(f, &mut c.buf) {
            Ok(text) => Some(Ok(Read::Got(text))),
            Err(e) => {
                c.files.remove(rel);
                Some(if is_gone(&e) {
                    Ok(Read::Gone)
                } else {
                    Err(ProcError::Read {
                        path: self.path(rel),
                        source: e,
                    })
                })
            }
        }
    }

    /// The system's `/proc`.
    pub fn host() -> ProcFs {
        ProcFs::new("/proc")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn read(&self, rel: &str) -> Result<Read<String>, ProcError> {
        if let Some(read) = self.read_cached(rel) {
            return read;
        }
        let path = self.path(rel);
        match read_file(&path) {
            Ok(text) => Ok(Read::Got(text)),
            Err(e) if is_gone(&e) => Ok(Read::Gone),
            Err(source) => Err(ProcError::Read { path, source }),
        }
    }

    /// `/proc/PID/stat`, parsed.
    pub fn stat(&self, pid: u32) -> Result<Read<ProcStat>, ProcError> {
        let rel = format!("{pid}/stat");
        let Read::Got(text) = self.read(&rel)? else {
            return Ok(Read::Gone);
        };
        match parse_proc_stat(&text) {
            Some(s) => Ok(Read::Got(s)),
            // Empty: the process was reaped while the file was read.
            None if text.is_empty() => Ok(Read::Gone),
            None => Err(ProcError::Malformed {
                path: self.path(&rel),
                what: "expected at least 24 fields after the command name",
            }),
        }
    }

    /// The thread ids of process `pid`, sorted.
    pub fn threads(&self, pid: u32) -> Result<Read<Vec<u32>>, ProcError> {
        let path = self.path(&format!("{pid}/task"));
        let dir = match std::fs::read_dir(&path) {
            Ok(d) => d,
            Err(e) if is_gone(&e) => return Ok(Read::Gone),
            Err(source) => return Err(ProcError::Read { path, source }),
        };
        let mut tids: Vec<u32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        tids.sort_unstable();
        Ok(Read::Got(tids))
    }

    /// The children of thread `tid` of process `pid`; `Gone` if the thread is.
    pub fn children(&self, pid: u32, tid: u32) -> Result<Read<Vec<u32>>, ProcError> {
        Ok(match self.read(&format!("{pid}/task/{tid}/children"))? {
            Read::Got(text) => Read::Got(parse_children(&text)),
            Read::Gone => Read::Gone,
        })
    }

    /// Whether `children` files exist here (`CONFIG_PROC_CHILDREN`), judged once, on a
    /// thread that is there.
    pub fn has_children_files(&self, pid: u32, tid: u32) -> bool {
        if let Some(known) = self.children_files.get() {
            return known;
        }
        let tid_dir = self.path(&format!("{pid}/task/{tid}"));
        let has = self.path(&format!("{pid}/task/{tid}/children")).exists();
        // Judged only if the thread was still there.
        if has || tid_dir.exists() {
            self.children_files.set(Some(has));
        }
        has
    }

    /// A thread's runtime in ns (`schedstat`); `Gone` if it exited.
    pub fn thread_runtime_ns(&self, pid: u32, tid: u32) -> Result<Read<u64>, ProcError> {
        let rel = format!("{pid}/task/{tid}/schedstat");
        let Read::Got(text) = self.read(&rel)? else {
            return Ok(Read::Gone);
        };
        match parse_schedstat(&text) {
            Some(ns) => Ok(Read::Got(ns)),
            None if text.is_empty() => Ok(Read::Gone),
            None => Err(ProcError::Malformed {
                path: self.path(&rel),
                what: "expected a runtime in ns",
            }),
        }
    }

    /// `/proc/PID/io` of a whole process (its exited threads included, its children not).
    /// `Ok(None)` when the kernel has no I/O accounting; `Gone` when the process is; a
    /// permission error (another user's process) is an error.
    pub fn io(&self, pid: u32) -> Result<Read<Option<ThreadIo>>, ProcError> {
        let rel = format!("{pid}/io");
        match self.read(&rel)? {
            Read::Got(text) if text.is_empty() => Ok(Read::Gone),
            Read::Got(text) => match parse_io(&text) {
                Some(io) => Ok(Read::Got(Some(io))),
                None => Err(ProcError::Malformed {
                    path: self.path(&rel),
                    what: "expected rchar, wchar, read_bytes, write_bytes and \
                           cancelled_write_bytes",
                }),
            },
            // No io file, but the process is there: the kernel lacks the accounting.
            Read::Gone if self.path(&format!("{pid}/stat")).exists() => Ok(Read::Got(None)),
            Read::Gone => Ok(Read::Gone),
        }
    }

    /// The peak RSS (VmHWM) of process `pid` in bytes; `None` without an address space.
    pub fn vm_hwm(&self, pid: u32) -> Result<Read<Option<u64>>, ProcError> {
        Ok(match self.read(&format!("{pid}/status"))? {
            Read::Got(text) => Read::Got(parse_vm_hwm(&text)),
            Read::Gone => Read::Gone,
        })
    }

    /// Every process's parent, for kernels without `children` files.
    fn parents(&self) -> HashMap<u32, Vec<u32>> {
        let mut out: HashMap<u32, Vec<u32>> = HashMap::new();
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return out;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(Read::Got(s)) = self.stat(pid) {
                out.entry(s.ppid).or_default().push(pid);
            }
        }
        out
    }
}

/// One process of a tree, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub pid: u32,
    pub stat: ProcStat,
    /// Its threads (a zombie's: its leader only, or none).
    pub tids: Vec<u32>,
}

impl Node {
    /// Identity: pid and start time.
    pub fn key(&self) -> (u32, u64) {
        (self.pid, self.stat.start_ticks)
    }
}

/// Where the walk starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seed {
    pub pid: u32,
    /// The start time the process must have; `None`: whatever has the pid now.
    pub start_ticks: Option<u64>,
}

/// Reads the tree under `seeds`: each seed and every descendant alive (or a zombie) now,
/// parents before children. A seed or child that vanishes mid-read is left out; so is a
/// seed whose pid now belongs to a process with another start time, and a listed child whose
/// parent is no longer the one it was listed under (its pid was reused). `skip` lists pids
/// left out with everything below them (the tracker's helper). Errors other than "gone"
/// (permissions) are returned.
pub fn walk(fs: &ProcFs, seeds: &[Seed], skip: &HashSet<u32>) -> Result<Vec<Node>, ProcError> {
    let queue = seeds.iter().map(|s| (s.pid, s.start_ticks, None)).collect();
    walk_queue(fs, queue, skip)
}

/// The tree below process `parent` (single-threaded, like the reaper), without `parent`.
pub fn walk_below(fs: &ProcFs, parent: u32) -> Result<Vec<Node>, ProcError> {
    let kids = if fs.has_children_files(parent, parent) {
        match fs.children(parent, parent)? {
            Read::Got(kids) => kids,
            Read::Gone => return Ok(Vec::new()),
        }
    } else {
        fs.parents().remove(&parent).unwrap_or_default()
    };
    let queue = kids.into_iter().map(|k| (k, None, Some(parent))).collect();
    walk_queue(fs, queue, &HashSet::from([parent]))
}

type Queue = VecDeque<(u32, Option<u64>, Option<u32>)>;

fn walk_queue(fs: &ProcFs, mut queue: Queue, skip: &HashSet<u32>) -> Result<Vec<Node>, ProcError> {
    let mut nodes = Vec::new();
    let mut visited: HashSet<u32> = skip.clone();
    // Decided at the first thread read: `children` files, or a scan of every parent.
    let mut scan: Option<Option<HashMap<u32, Vec<u32>>>> = None;
    while let Some((pid, start, parent)) = queue.pop_front() {
        if !visited.insert(pid) {
            continue;
        }
        let Read::Got(stat) = fs.stat(pid)? else {
            continue;
        };
        if start.is_some_and(|s| s != stat.start_ticks) || parent.is_some_and(|p| p != stat.ppid) {
            continue;
        }
        // A live process with one thread: the leader (when the leader has exited, the
        // process shows as a zombie). No need to list its threads.
        let tids = if stat.num_threads == 1 && !stat.is_zombie() {
            vec![pid]
        } else {
            match fs.threads(pid)? {
                Read::Got(tids) => tids,
                Read::Gone => continue,
            }
        };
        let scan = scan.get_or_insert_with(|| {
            let files = tids.first().is_none_or(|&t| fs.has_children_files(pid, t));
            (!files).then(|| fs.parents())
        });
        let mut kids: Vec<u32> = Vec::new();
        match scan {
            Some(parents) => kids.extend(parents.get(&pid).into_iter().flatten()),
            None => {
                for &tid in &tids {
                    if let Read::Got(c) = fs.children(pid, tid)? {
                        kids.extend(c);
                    }
                }
            }
        }
        kids.sort_unstable();
        kids.dedup();
        queue.extend(kids.into_iter().map(|k| (k, None, Some(pid))));
        nodes.push(Node { pid, stat, tids });
    }
    Ok(nodes)
}

/// The start time (clock ticks since boot) of `pid`, if it exists.
pub fn start_ticks(fs: &ProcFs, pid: u32) -> Option<u64> {
    match fs.stat(pid) {
        Ok(Read::Got(s)) => Some(s.start_ticks),
        _ => None,
    }
}

/// What one process has used so far, read at a snapshot: CPU in ns where the kernel gives
/// ns, I/O, and peak RSS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Detail {
    /// The process's own CPU: the sum of its live threads' `schedstat` runtimes (ns), or its
    /// `stat` utime + stime (ticks, exited threads included) when that is larger.
    pub own_cpu_ns: u64,
    /// CPU of the children it has waited for (`stat` cutime + cstime, ticks), in ns.
    pub waited_cpu_ns: u64,
    /// Tick samples of user and system time (own and waited), for the user/system split.
    pub user_ticks: u64,
    pub system_ticks: u64,
    /// `/proc/PID/io` (`None`: the kernel has no I/O accounting).
    pub io: Option<ThreadIo>,
    /// VmHWM in bytes (`None`: no address space, e.g. a zombie).
    pub hwm_bytes: Option<u64>,
}

/// Reads what `node` has used; `Gone` if it vanished meanwhile. With `io_errors` false, a
/// permission error on `io` reads as "no I/O figure" instead of an error.
pub fn detail(
    fs: &ProcFs,
    node: &Node,
    tick_ns: u64,
    io_errors: bool,
) -> Result<Read<Detail>, ProcError> {
    let pid = node.pid;
    let mut runtime = 0u64;
    for &tid in &node.tids {
        if let Read::Got(ns) = fs.thread_runtime_ns(pid, tid)? {
            runtime += ns;
        }
    }
    let io = match fs.io(pid) {
        Ok(Read::Got(io)) => io,
        Ok(Read::Gone) => return Ok(Read::Gone),
        Err(e) if io_errors => return Err(e),
        Err(_) => None,
    };
    let Read::Got(hwm_bytes) = fs.vm_hwm(pid)? else {
        return Ok(Read::Gone);
    };
    let s = &node.stat;
    Ok(Read::Got(Detail {
        own_cpu_ns: runtime.max((s.utime + s.stime) * tick_ns),
        waited_cpu_ns: (s.cutime + s.cstime) * tick_ns,
        user_ticks: s.utime + s.cutime,
        system_ticks: s.stime + s.cstime,
        io,
        hwm_bytes,
    }))
}

#[cfg(test)]
pub(crate) mod fixture {
    //! A fake /proc in a temporary folder.
    use std::path::PathBuf;

    pub struct FakeProc {
        pub root: PathBuf,
    }

    /// A `stat` line with the fields the fallback reads.
    #[allow(clippy::too_many_arguments)]
    pub fn stat_line(
        pid: u32,
        comm: &str,
        state: char,
        ppid: u32,
        cpu: (u64, u64, u64, u64),
        threads: u64,
        start: u64,
        rss: u64,
    ) -> String {
        let (ut, st, cut, cst) = cpu;
        format!(
            "{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 {ut} {st} {cut} {cst} \
             20 0 {threads} 0 {start} 10000000 {rss} 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 \
             17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
    }

    impl FakeProc {
        pub fn new(name: &str) -> FakeProc {
            // One folder per instance: tests that share a helper (and so a name) run at once.
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let root = std::env::temp_dir().join(format!(
                "cylo-usage-fakeproc-{}-{name}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            FakeProc { root }
        }

        pub fn write(&self, rel: &str, text: &str) {
            let path = self.root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }

        /// A process with threads `tids` (the first is its leader), each thread with its
        /// children and a runtime.
        #[allow(clippy::too_many_arguments)]
        pub fn process(
            &self,
            pid: u32,
            ppid: u32,
            start: u64,
            cpu: (u64, u64, u64, u64),
            rss: u64,
            threads: &[(u32, &[u32], u64)],
        ) {
            self.write(
                &format!("{pid}/stat"),
                &stat_line(pid, "x", 'S', ppid, cpu, threads.len() as u64, start, rss),
            );
            for (tid, kids, runtime) in threads {
                let kids: Vec<String> = kids.iter().map(|k| k.to_string()).collect();
                let mut text = kids.join(" ");
                if !text.is_empty() {
                    text.push(' ');
                }
                self.write(&format!("{pid}/task/{tid}/children"), &text);
                self.write(
                    &format!("{pid}/task/{tid}/schedstat"),
                    &format!("{runtime} 0 1\n"),
                );
            }
            self.write(
                &format!("{pid}/io"),
                "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 1\nread_bytes: 4096\nwrite_bytes: 8192\n\
                 cancelled_write_bytes: 0\n",
            );
            self.write(
                &format!("{pid}/status"),
                &format!("Name:\tx\nVmHWM:\t{} kB\n", 100 + pid),
            );
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::{FakeProc, stat_line};
    use super::*;

    #[test]
    fn stat_fields_after_the_last_paren() {
        let line = stat_line(7, "a) b (c", 'S', 3, (11, 22, 33, 44), 5, 999, 77);
        let s = parse_proc_stat(&line).unwrap();
        assert_eq!(
            (s.state, s.ppid, s.utime, s.stime, s.cutime, s.cstime),
            ('S', 3, 11, 22, 33, 44)
        );
        assert_eq!((s.num_threads, s.start_ticks, s.rss_pages), (5, 999, 77));
        assert_eq!(s.exit_code, Some(0));
        assert!(!s.is_zombie());
        // A zombie with its wait status (exit 3 = 0x300) in field 52.
        // (A real line, 6.18.)
        let z = "9410 (python3) Z 9321 9319 12376 0 -1 4227148 227 0 0 0 0 0 0 0 20 0 1 0 503360 0 \
                 0 18446744073709551615 0 0 0 0 0 0 0 16781312 2 1 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 \
                 0 768\n";
        let s = parse_proc_stat(z).unwrap();
        assert!(s.is_zombie());
        assert_eq!(s.exit_code, Some(768));
        // Without field 52 (old kernels, or no permission): unknown.
        let short = "9 (x) Z 1 9 9 0 -1 4227084 0 0 0 0 5 6 -1 0 20 0 1 0 99 0 -3";
        let s = parse_proc_stat(short).unwrap();
        assert_eq!((s.exit_code, s.cutime, s.rss_pages), (None, 0, 0));
        assert_eq!(parse_proc_stat("1 (x) S 1"), None);
        assert_eq!(parse_proc_stat(""), None);
    }

    #[test]
    fn children_files() {
        assert_eq!(parse_children("12 13 400 "), [12, 13, 400]);
        assert!(parse_children("").is_empty());
    }

    #[test]
    fn walk_follows_children_of_every_thread_and_skips_what_vanished() {
        let f = FakeProc::new("walk");
        // 10 has threads 10 and 11; 11 forked 20. 10 forked 21 (listed, but gone: reaped
        // mid-walk) and 22, whose pid was reused by a process with another parent.
        f.process(
            10,
            1,
            100,
            (1, 1, 0, 0),
            5,
            &[(10, &[21, 22], 1000), (11, &[20], 2000)],
        );
        f.process(20, 10, 150, (2, 2, 0, 0), 6, &[(20, &[30], 500)]);
        f.process(22, 77, 160, (0, 0, 0, 0), 1, &[(22, &[], 1)]);
        // 30 is a zombie without threads listed.
        f.write(
            "30/stat",
            &stat_line(30, "z", 'Z', 20, (1, 0, 0, 0), 1, 170, 0),
        );
        std::fs::create_dir_all(f.root.join("30/task")).unwrap();
        let fs = ProcFs::new(&f.root);
        let seed = Seed {
            pid: 10,
            start_ticks: Some(100),
        };
        let nodes = walk(&fs, &[seed], &HashSet::new()).unwrap();
        let pids: Vec<u32> = nodes.iter().map(|n| n.pid).collect();
        assert_eq!(pids, [10, 20, 30]);
        assert_eq!(nodes[0].tids, [10, 11], "threads are not processes");
        assert!(nodes[2].stat.is_zombie());
        // The seed's pid reused: nothing.
        let stale = Seed {
            pid: 10,
            start_ticks: Some(99),
        };
        assert!(walk(&fs, &[stale], &HashSet::new()).unwrap().is_empty());
        // A missing seed: nothing, no error.
        let gone = Seed {
            pid: 4242,
            start_ticks: None,
        };
        assert!(walk(&fs, &[gone], &HashSet::new()).unwrap().is_empty());
        // Skipped pids are left out with what is below them.
        let skip = HashSet::from([20]);
        let nodes = walk(&fs, &[seed], &skip).unwrap();
        assert_eq!(nodes.len(), 1);
    }

    #[test]
    fn without_children_files_the_walk_scans_parents() {
        let f = FakeProc::new("scan");
        f.process(10, 1, 100, (0, 0, 0, 0), 1, &[(10, &[], 1)]);
        f.process(11, 10, 101, (0, 0, 0, 0), 1, &[(11, &[], 1)]);
        f.process(12, 11, 102, (0, 0, 0, 0), 1, &[(12, &[], 1)]);
        f.process(13, 1, 103, (0, 0, 0, 0), 1, &[(13, &[], 1)]);
        for pid in [10, 11, 12, 13] {
            std::fs::remove_file(f.root.join(format!("{pid}/task/{pid}/children"))).unwrap();
        }
        let fs = ProcFs::new(&f.root);
        let seed = Seed {
            pid: 10,
            start_ticks: None,
        };
        let pids: Vec<u32> = walk(&fs, &[seed], &HashSet::new())
            .unwrap()
            .iter()
            .map(|n| n.pid)
            .collect();
        assert_eq!(pids, [10, 11, 12]);
    }

    #[test]
    fn detail_reads_ns_and_propagates_permission_errors() {
        let f = FakeProc::new("detail");
        f.process(
            10,
            1,
            100,
            (1, 2, 3, 4),
            5,
            &[(10, &[], 7_000_000), (11, &[], 8_000_000)],
        );
        let fs = ProcFs::new(&f.root);
        let nodes = walk(
            &fs,
            &[Seed {
                pid: 10,
                start_ticks: None,
            }],
            &HashSet::new(),
        )
        .unwrap();
        let Read::Got(d) = detail(&fs, &nodes[0], 10_000_000, true).unwrap() else {
            panic!("gone")
        };
        // The live threads' 15 ms (ns) is less than utime + stime, 3 ticks (30 ms), which
        // includes exited threads: the larger wins.
        assert_eq!(d.own_cpu_ns, 30_000_000);
        assert_eq!(d.waited_cpu_ns, 70_000_000);
        assert_eq!((d.user_ticks, d.system_ticks), (4, 6));
        assert_eq!(d.io.unwrap().write_bytes, 8192);
        assert_eq!(d.hwm_bytes, Some(110 * 1024));
        // More ns in live threads than ticks: ns win.
        f.write("10/task/11/schedstat", "90000000 0 1\n");
        let Read::Got(d) = detail(&fs, &nodes[0], 10_000_000, true).unwrap() else {
            panic!("gone")
        };
        assert_eq!(d.own_cpu_ns, 97_000_000);
        // A thread that exited since the walk is skipped.
        std::fs::remove_dir_all(f.root.join("10/task/11")).unwrap();
        let Read::Got(d) = detail(&fs, &nodes[0], 10_000_000, true).unwrap() else {
            panic!("gone")
        };
        assert_eq!(d.own_cpu_ns, 30_000_000);
        // The process vanished: Gone, not an error.
        std::fs::remove_dir_all(f.root.join("10")).unwrap();
        assert!(matches!(
            detail(&fs, &nodes[0], 10_000_000, true),
            Ok(Read::Gone)
        ));
    }

    #[test]
    fn the_kernels_own_tree() {
        // This process and a child that sleeps: the child is found, with its threads.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let fs = ProcFs::host();
        let seed = Seed {
            pid: me,
            start_ticks: start_ticks(&fs, me),
        };
        let nodes = walk(&fs, &[seed], &HashSet::new()).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(nodes[0].pid, me);
        assert!(!nodes[0].tids.is_empty());
        assert!(nodes.iter().any(|n| n.pid == child.id()), "{nodes:?}");
    }
}
