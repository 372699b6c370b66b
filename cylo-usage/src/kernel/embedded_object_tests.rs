//! The embedded eBPF object against the one it was made from (`ebpf_strip.rs`, which
//! `build.rs` runs): the same programs, maps, symbols and BTF, without the DWARF and the
//! line info.
use object::{Object, ObjectSection, ObjectSymbol};

include!("../../ebpf_strip.rs");

use crate::kernel::object::OBJECT as EMBEDDED;

/// The object it was made from, embedded here too (the tests also run in guests, without
/// the build's files).
static SOURCE: &[u8] = include_bytes!(env!("CYLO_USAGE_EBPF_SOURCE_OBJECT"));

fn parse(data: &[u8]) -> object::read::elf::ElfFile64<'_> {
    object::read::elf::ElfFile64::parse(data).expect("an ELF64 object")
}

/// Each section's bytes, and the relocations applied to it (offset, symbol name, kind), by
/// section name.
type Sections = std::collections::BTreeMap<String, (Vec<u8>, Vec<(u64, String, String)>)>;

fn sections(data: &[u8]) -> Sections {
    let elf = parse(data);
    elf.sections()
        .filter(|s| !s.name().unwrap().is_empty())
        .map(|s| {
            let relocations = s
                .relocations()
                .map(|(offset, r)| {
                    let symbol = match r.target() {
                        object::RelocationTarget::Symbol(i) => {
                            let symbol = elf.symbol_by_index(i).unwrap();
                            match symbol.name().unwrap() {
                                "" => format!(
                                    "section {:?}",
                                    symbol
                                        .section_index()
                                        .and_then(|i| elf.section_by_index(i).ok())
                                        .map(|s| s.name().unwrap().to_string())
                                ),
                                name => name.to_string(),
                            }
                        }
                        other => format!("{other:?}"),
                    };
                    (offset, symbol, format!("{:?}", r.flags()))
                })
                .collect();
            (
                s.name().unwrap().to_string(),
                (s.data().unwrap().to_vec(), relocations),
            )
        })
        .collect()
}

fn line_info_len(data: &[u8]) -> u32 {
    let elf = parse(data);
    let ext = elf.section_by_name(".BTF.ext").expect("a .BTF.ext section");
    let d = ext.data().unwrap();
    u32::from_le_bytes(d[20..24].try_into().unwrap())
}

#[test]
fn the_embedded_object_is_its_source_without_dwarf_and_line_info() {
    let source = SOURCE;
    let kept = env!("CYLO_USAGE_EBPF_LINE_INFO_KEPT") == "1";
    let (before, after) = (sections(source), sections(EMBEDDED));
    assert!(
        before.keys().any(|n| n.starts_with(".debug_")),
        "the source object has no DWARF: nothing was tested"
    );
    let dropped = |name: &str| {
        name.starts_with(".debug_")
            || name.starts_with(".rel.debug_")
            || (!kept && name == ".rel.BTF.ext")
    };
    for (name, section) in &before {
        if dropped(name) {
            assert!(!after.contains_key(name), "{name} is still embedded");
        } else if (name == ".BTF.ext" && !kept)
            || name.starts_with(".rel")
            || [".symtab", ".strtab"].contains(&name.as_str())
        {
            // Renumbered or rewritten: relocations are compared on the sections they apply
            // to (by symbol name), symbols below, `.BTF.ext` in the tests of its own.
            assert!(after.contains_key(name), "{name} is no longer embedded");
        } else {
            assert_eq!(after.get(name), Some(section), "{name} changed");
        }
    }
    let extra: Vec<_> = after
        .keys()
        .filter(|n| !before.contains_key(*n) && *n != ".shstrtab")
        .collect();
    assert!(
        extra.is_empty(),
        "sections that were not in the source: {extra:?}"
    );
    // The programs' sections are all there (the comparison above covered their bytes).
    assert!(after.keys().filter(|n| n.starts_with("raw_tp/")).count() >= 8);
    // Every named symbol outside the DWARF is kept, at the same place.
    let named = |data: &[u8]| {
        let elf = parse(data);
        elf.symbols()
            .filter(|s| !s.name().unwrap().is_empty())
            .filter(|s| {
                s.section_index()
                    .and_then(|i| elf.section_by_index(i).ok())
                    .is_none_or(|sec| !dropped(sec.name().unwrap()))
            })
            .map(|s| {
                let section = s
                    .section_index()
                    .and_then(|i| elf.section_by_index(i).ok())
                    .map(|sec| sec.name().unwrap().to_string());
                let kind = format!("{:?}", s.kind());
                (
                    s.name().unwrap().to_string(),
                    section,
                    s.address(),
                    s.size(),
                    kind,
                )
            })
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(named(source), named(EMBEDDED));
    assert!(line_info_len(source) > 0);
    assert_eq!(line_info_len(EMBEDDED) > 0, kept);
}

#[test]
fn stripping_the_embedded_object_again_changes_no_byte() {
    let kept = env!("CYLO_USAGE_EBPF_LINE_INFO_KEPT") == "1";
    assert_eq!(strip_ebpf_object(EMBEDDED, kept).unwrap(), EMBEDDED);
}

/// The build's flags and the names it gives the source folders (`EBPF_REMAPPED`).
#[allow(dead_code)]
mod build_flags {
    include!("../../ebpf_object.rs");
}

/// The strings of `data`'s `.BTF` string table.
fn btf_strings(data: &[u8]) -> Vec<String> {
    let elf = parse(data);
    let btf = elf.section_by_name(".BTF").expect("a .BTF section");
    let d = btf.data().unwrap();
    let word = |at: usize| u32::from_le_bytes(d[at..at + 4].try_into().unwrap()) as usize;
    assert_eq!(&d[..2], &[0x9f, 0xeb], "BTF magic (little-endian)");
    let (header, str_off, str_len) = (word(4), word(16), word(20));
    d[header + str_off..header + str_off + str_len]
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[test]
fn the_object_names_no_folder_of_the_machine_that_built_it() {
    // The file names of the line info stay in the string table after the stripping; built
    // with the folders remapped, each begins with one of the fixed names, whatever the
    // checkout's, cargo's and the toolchain's folders were.
    let sources: Vec<String> = btf_strings(EMBEDDED)
        .into_iter()
        .filter(|s| s.starts_with('/') && s.ends_with(".rs"))
        .collect();
    assert!(
        sources.iter().any(|s| s.contains("cylo-usage-ebpf/src/")),
        "the BTF names the eBPF crate's sources: {sources:?}"
    );
    let unmapped: Vec<&String> = sources
        .iter()
        .filter(|s| {
            !build_flags::EBPF_REMAPPED
                .iter()
                .any(|to| s.starts_with(&format!("{to}/")))
        })
        .collect();
    assert!(unmapped.is_empty(), "paths not remapped: {unmapped:?}");
    // Nor anywhere else in it: the eBPF crate's folder under this workspace's path (a
    // longer string than the path alone, which may be as short as `/src`). A workspace that
    // is itself at the remapped name cannot be told apart, and is not checked.
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_str()
        .unwrap();
    if workspace != build_flags::EBPF_REMAPPED[0] {
        let crate_folder = format!("{workspace}/cylo-usage-ebpf/");
        let found = EMBEDDED
            .windows(crate_folder.len())
            .any(|w| w == crate_folder.as_bytes());
        assert!(!found, "the object names {crate_folder}");
    }
}

#[test]
fn the_build_flags_remap_each_folder_and_the_workspace_last() {
    use std::path::Path;
    let flags = build_flags::ebpf_rustflags(
        Path::new("/home/u/.cargo/git/checkouts/x"),
        Some(Path::new("/home/u/.cargo")),
        Path::new("/opt/rust nightly"),
        true,
    );
    let fields: Vec<&str> = flags.split('\x1f').collect();
    assert_eq!(
        fields,
        [
            "-C",
            "debuginfo=2",
            "-C",
            "link-arg=--btf",
            "-C",
            "target-cpu=v3",
            "-D",
            "warnings",
            "--remap-path-prefix=/opt/rust nightly=/rust-sysroot",
            "--remap-path-prefix=/home/u/.cargo=/cargo-home",
            "--remap-path-prefix=/home/u/.cargo/git/checkouts/x=/cylo-usage",
        ]
    );
    let lenient = build_flags::ebpf_rustflags(Path::new("/w"), None, Path::new("/s"), false);
    assert!(!lenient.contains("warnings") && !lenient.contains("cargo-home"));
}

#[test]
fn aya_reads_the_same_functions_from_both() {
    let source = SOURCE;
    let (a, b) = (
        aya_obj::Object::parse(source).unwrap(),
        aya_obj::Object::parse(EMBEDDED).unwrap(),
    );
    let names = |o: &aya_obj::Object| {
        let mut p: Vec<_> = o.programs.keys().cloned().collect();
        p.sort();
        p
    };
    assert_eq!(names(&a), names(&b));
    let mut maps_a: Vec<_> = a.maps.keys().cloned().collect();
    let mut maps_b: Vec<_> = b.maps.keys().cloned().collect();
    maps_a.sort();
    maps_b.sort();
    assert_eq!(maps_a, maps_b);
}

/// A `.BTF.ext` of a 32-byte header, 12 bytes of function info, 20 of line info and 8 of
/// CO-RE relocations (each part's first word is its record size).
fn btf_ext(line_len: u32) -> Vec<u8> {
    let mut d = vec![0x9f, 0xeb, 1, 0];
    for word in [32u32, 0, 12, 12, line_len, 12 + line_len, 8] {
        d.extend_from_slice(&word.to_le_bytes());
    }
    d.extend_from_slice(&[8, 0, 0, 0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8]);
    d.extend((0..line_len).map(|i| 0x40 + i as u8));
    d.extend_from_slice(&[16, 0, 0, 0, 0xc1, 0xc2, 0xc3, 0xc4]);
    d
}

#[test]
fn btf_ext_keeps_function_info_and_core_relocations_without_line_info() {
    let out = btf_ext_without_line_info(&btf_ext(20)).unwrap().unwrap();
    let word = |at: usize| u32::from_le_bytes(out[at..at + 4].try_into().unwrap());
    assert_eq!(&out[..4], &[0x9f, 0xeb, 1, 0]);
    assert_eq!(word(4), 32);
    assert_eq!((word(8), word(12)), (0, 12), "function info");
    assert_eq!((word(16), word(20)), (12, 0), "line info");
    assert_eq!((word(24), word(28)), (12, 8), "CO-RE relocations");
    assert_eq!(
        &out[32..44],
        &[8, 0, 0, 0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8]
    );
    assert_eq!(&out[44..], &[16, 0, 0, 0, 0xc1, 0xc2, 0xc3, 0xc4]);
    // Nothing to take out: none.
    assert_eq!(btf_ext_without_line_info(&btf_ext(0)).unwrap(), None);
}

#[test]
fn btf_ext_that_does_not_add_up_is_refused() {
    let good = btf_ext(20);
    assert!(btf_ext_without_line_info(&good[..3]).is_err());
    let mut magic = good.clone();
    magic[0] = 0xeb;
    magic[1] = 0x9f;
    assert!(
        btf_ext_without_line_info(&magic)
            .unwrap_err()
            .contains("magic")
    );
    // Line info said to run past the end of the section.
    let mut long = good.clone();
    long[20..24].copy_from_slice(&200u32.to_le_bytes());
    assert!(
        btf_ext_without_line_info(&long)
            .unwrap_err()
            .contains("line info")
    );
    // A header too short for the line info's fields.
    let mut short = good;
    short[4..8].copy_from_slice(&16u32.to_le_bytes());
    assert!(btf_ext_without_line_info(&short).is_err());
}
