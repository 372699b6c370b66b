//! `cargo xtask check-layout`: the crates' import graphs have no circles (and which userspace
//! files are still over their size). The graph is read from the sources themselves: each file is a node,
//! and a file imports a module when it names it through `crate::`, `super::` or `self::`
//! (`use` lines and paths in code alike; a module's own re-exports, `pub use`, are its face,
//! not an import).
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The crates whose `src` folders are checked, from the workspace root.
const CRATES: [&str; 4] = [
    "cylo-usage/src",
    "cylo-usage-ebpf/src",
    "xtask/src",
    "cylo-usage/workload/src",
];

/// The most lines a userspace source file may have; files past it are named in
/// [`OVERSIZE_ALLOWED`] with the reason.
const MAX_LINES: usize = 1_000;

/// Files allowed past [`MAX_LINES`]: the kernel BTF reader (one format, one parser).
const OVERSIZE_ALLOWED: [&str; 1] = ["cylo-usage/src/kernel/btf.rs"];

/// Checks every crate; an error names each circle and each userspace file over its size.
pub fn check(root: &Path) -> Result<()> {
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = root.join(krate);
        for circle in circles(&src)? {
            problems.push(format!("import circle in {krate}: {}", circle.join(" -> ")));
        }
    }
    for file in oversize(root)? {
        problems.push(format!("too large: {file}"));
    }
    for use_ in stage_violations(&root.join(CRATES[0]))? {
        problems.push(format!("a stage uses a later one in {}: {use_}", CRATES[0]));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    eprintln!(
        "xtask: no import circles in {}, no userspace file over {MAX_LINES} lines, and the \
         stages of {} ({}) used in order",
        CRATES.join(", "),
        CRATES[0],
        STAGES.join(", ")
    );
    Ok(())
}

/// Userspace files over [`MAX_LINES`] (the eBPF crate is held to its own split by hook).
fn oversize(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for krate in ["cylo-usage/src", "xtask/src", "cylo-usage/workload/src"] {
        for file in rust_files(&root.join(krate))? {
            let rel = file
                .strip_prefix(root)
                .unwrap_or(&file)
                .to_string_lossy()
                .into_owned();
            let lines = fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?
                .lines()
                .count();
            if lines > MAX_LINES && !OVERSIZE_ALLOWED.contains(&rel.as_str()) {
                out.push(format!("{rel} has {lines} lines (at most {MAX_LINES})"));
            }
        }
    }
    Ok(out)
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = e?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A file's module path under its crate root (`daemon/server.rs` → `["daemon", "server"]`;
/// `lib.rs`, `main.rs` and `mod.rs` stand for their folder).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if !matches!(stem, "lib" | "main" | "mod") {
            parts.push(stem.to_string());
        }
    }
    parts
}

/// The circles (strongly connected sets of more than one file) of the crate at `src`, each
/// as its files' paths relative to `src`.
pub fn circles(src: &Path) -> Result<Vec<Vec<String>>> {
    Ok(strongly_connected(&edges(src)?)
        .into_iter()
        .filter(|c| c.len() > 1)
        .collect())
}

/// The folders of `cylo-usage/src`, in the order data flows through them: a folder may use
/// the ones before it, never one after.
const STAGES: [&str; 7] = [
    "sys", "kernel", "usage", "proc", "session", "daemon", "front",
];

/// The uses of a later stage by an earlier one in the crate at `src` ([`STAGES`]), each as
/// "from -> to" (files relative to `src`).
fn stage_violations(src: &Path) -> Result<Vec<String>> {
    let stage = |file: &str| {
        let (top, _) = file.split_once('/')?;
        STAGES.iter().position(|s| *s == top)
    };
    let mut out = Vec::new();
    for (from, targets) in edges(src)? {
        for to in targets {
            if let (Some(a), Some(b)) = (stage(&from), stage(&to))
                && b > a
            {
                out.push(format!("{from} -> {to}"));
            }
        }
    }
    Ok(out)
}

/// Which files of the crate at `src` each file uses (paths relative to `src`).
fn edges(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let files = rust_files(src)?;
    // Binaries under src/bin are crates of their own.
    let files: Vec<PathBuf> = files
        .into_iter()
        .filter(|f| !f.strip_prefix(src).is_ok_and(|r| r.starts_with("bin")))
        .collect();
    let modules: BTreeMap<Vec<String>, String> = files
        .iter()
        .map(|f| {
            let rel = f
                .strip_prefix(src)
                .unwrap_or(f)
                .to_string_lossy()
                .into_owned();
            (module_of(src, f), rel)
        })
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let text = fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let me = module_of(src, f);
        let from = modules[&me].clone();
        let targets = edges.entry(from.clone()).or_default();
        for path in referenced_paths(&text, &me) {
            // The longest prefix of the path that is a file of the crate.
            let target = (1..=path.len())
                .rev()
                .find_map(|n| modules.get(&path[..n]))
                .or_else(|| modules.get(&Vec::new()));
            if let Some(t) = target
                && *t != from
            {
                targets.insert(t.clone());
            }
        }
    }
    Ok(edges)
}

/// The absolute module paths that `text` (the file of module `me`) names through `crate::`,
/// `super::` or `self::`, outside line comments and re-exports (`pub use`, `pub(crate) use`).
fn referenced_paths(text: &str, me: &[String]) -> Vec<Vec<String>> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let code = without_reexports(&code);
    let parent = &me[..me.len().saturating_sub(1)];
    let mut out = Vec::new();
    for (base, rest) in path_starts(&code) {
        let start: &[String] = match base {
            "crate" => &[],
            "super" => parent,
            _ => me,
        };
        for tail in expand(rest) {
            out.push(start.iter().cloned().chain(tail).collect());
        }
    }
    out
}

/// `code` without its `pub use ...;` and `pub(crate) use ...;` statements.
fn without_reexports(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    loop {
        let next = ["pub use ", "pub(crate) use "]
            .iter()
            .filter_map(|p| rest.find(p))
            .min();
        match next {
            Some(i) => {
                out.push_str(&rest[..i]);
                rest = match rest[i..].find(';') {
                    Some(j) => &rest[i + j + 1..],
                    None => "",
                };
            }
            None => {
                out.push_str(rest);
                return out;
            }
        }
    }
}

/// Each `crate::` / `super::` / `self::` in `s`, with the text that follows it.
fn path_starts(s: &str) -> Vec<(&'static str, &str)> {
    let mut out = Vec::new();
    for base in ["crate", "super", "self"] {
        let pat = format!("{base}::");
        let mut from = 0;
        while let Some(i) = s[from..].find(&pat) {
            let at = from + i;
            let boundary = at == 0
                || !s[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            if boundary {
                out.push((base, &s[at + pat.len()..]));
            }
            from = at + pat.len();
        }
    }
    out
}

/// The module paths at the start of `rest` (what follows `crate::`): `a::b::C` gives
/// `[a, b, C]`; `{a, b::c}` gives `[a]` and `[b, c]`.
fn expand(rest: &str) -> Vec<Vec<String>> {
    let rest = rest.trim_start();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut depth = 0;
        let mut end = inner.len();
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    end = i;
                    break;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        let inner = &inner[..end];
        let mut out = Vec::new();
        let mut depth = 0;
        let mut item = String::new();
        for c in inner.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.extend(expand(&item));
                    item.clear();
                    continue;
                }
                _ => {}
            }
            item.push(c);
        }
        out.extend(expand(&item));
        return out;
    }
    let mut path = Vec::new();
    let mut s = rest;
    loop {
        let ident: String = s
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if ident.is_empty() || ident == "self" {
            break;
        }
        s = &s[ident.len()..];
        path.push(ident);
        match s.strip_prefix("::") {
            Some(next) if next.starts_with('{') => {
                return expand(next)
                    .into_iter()
                    .map(|t| path.iter().cloned().chain(t).collect())
                    .collect();
            }
            Some(next) => s = next,
            None => break,
        }
    }
    if path.is_empty() {
        Vec::new()
    } else {
        vec![path]
    }
}

/// Tarjan's strongly connected components of `edges`, each sorted.
fn strongly_connected(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(st: &mut State<'a>, v: &'a str) {
        let i = st.index.len();
        st.index.insert(v, i);
        st.low.insert(v, i);
        st.stack.push(v);
        st.on_stack.insert(v);
        if let Some(next) = st.edges.get(v) {
            for w in next {
                let w = w.as_str();
                if !st.index.contains_key(w) {
                    visit(st, w);
                    let lw = st.low[w];
                    let lv = st.low[v];
                    st.low.insert(v, lv.min(lw));
                } else if st.on_stack.contains(w) {
                    let iw = st.index[w];
                    let lv = st.low[v];
                    st.low.insert(v, lv.min(iw));
                }
            }
        }
        if st.low[v] == st.index[v] {
            let mut component = Vec::new();
            while let Some(w) = st.stack.pop() {
                st.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            component.sort();
            st.out.push(component);
        }
    }
    let mut st = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !st.index.contains_key(v.as_str()) {
            visit(&mut st, v);
        }
    }
    st.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_of(files: &[(&str, &str)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for (name, text) in files {
            let path = dir.0.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        dir
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "xtask-layout-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn finds_a_circle_through_use_lines_and_paths_in_code() {
        let dir = crate_of(&[
            ("lib.rs", "mod a;\nmod b;\nmod c;\npub use a::A;\n"),
            ("a.rs", "use crate::{b::B, c};\npub struct A;\n"),
            // Only a comment names `a` here: no import, so `b` is in no circle.
            ("b.rs", "// use crate::a;\npub struct B;\n"),
            // A path in code, over two lines, back to `a`.
            (
                "c.rs",
                "pub fn g() {}\nfn h() {\n    let _ = super::a::\n        A;\n}\n",
            ),
        ]);
        assert_eq!(circles(&dir.0).unwrap(), vec![vec!["a.rs", "c.rs"]]);
    }

    #[test]
    fn a_stage_that_uses_a_later_one_is_found() {
        let dir = crate_of(&[
            (
                "lib.rs",
                "mod sys;
mod kernel;
mod front;
",
            ),
            (
                "sys/mod.rs",
                "pub fn f() {}
",
            ),
            // The kernel stage uses sys (earlier: fine) and front (later: not).
            (
                "kernel/mod.rs",
                "use crate::sys::f;
pub fn g() { crate::front::h(); }
",
            ),
            (
                "front/mod.rs",
                "use crate::kernel::g;
pub fn h() {}
",
            ),
        ]);
        assert_eq!(
            stage_violations(&dir.0).unwrap(),
            vec!["kernel/mod.rs -> front/mod.rs"]
        );
    }

    #[test]
    fn a_folder_module_and_its_reexports_are_no_circle() {
        let dir = crate_of(&[
            ("lib.rs", "mod d;\n"),
            (
                "d/mod.rs",
                "mod s;\npub use s::{run, Thing};\npub enum E {}\n",
            ),
            (
                "d/s.rs",
                "use super::E;\npub fn run() {}\npub struct Thing;\n",
            ),
        ]);
        assert!(circles(&dir.0).unwrap().is_empty());
        // A module that uses its child beyond a re-export is tied to it.
        let dir = crate_of(&[
            ("lib.rs", "mod d;\n"),
            ("d/mod.rs", "mod s;\npub enum E {}\nuse self::s::Thing;\n"),
            (
                "d/s.rs",
                "use super::E;\npub fn run() {}\npub struct Thing;\n",
            ),
        ]);
        assert_eq!(circles(&dir.0).unwrap(), vec![vec!["d/mod.rs", "d/s.rs"]]);
    }

    /// The project's own crates (not in the kernel-matrix guests, which carry only binaries).
    #[test]
    fn the_workspace_has_no_import_circles_and_no_file_too_large() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        if !root.join("cylo-usage/src").is_dir() {
            eprintln!("SKIPPED: no sources here (the kernel-matrix guests carry binaries only)");
            return;
        }
        let mut circles_found = Vec::new();
        for krate in CRATES {
            for c in circles(&root.join(krate)).unwrap() {
                circles_found.push(format!("{krate}: {}", c.join(" -> ")));
            }
        }
        assert!(circles_found.is_empty(), "{circles_found:#?}");
        let too_large = oversize(&root).unwrap();
        assert!(too_large.is_empty(), "{too_large:#?}");
        let backwards = stage_violations(&root.join(CRATES[0])).unwrap();
        assert!(backwards.is_empty(), "{backwards:#?}");
    }
}
