//! The embedded eBPF object, and the copy of it a tracker loads: without the programs it
//! never loads, hidden from aya.
//!
//! aya parses every program of an object and links each one's calls in `EbpfLoader::load`,
//! whether it is loaded later or not. The object holds 38 programs: the handlers of three
//! variants (everything, the lean set, without atomics), the adoption programs, the budget
//! hooks, and the network programs of two paths (tracepoints, and fexit programs where the
//! kernel has none). A lean tracker on 6.18 loads 9 of them. Parsing and linking the rest
//! took 1.9 ms of the 7.2 ms of a lean start-up's aya `load` on this project's machine
//! (2 vCPUs, 6.18).
//!
//! A hidden program keeps its instructions and its symbol; only the symbol's name is
//! emptied, which aya skips when it looks for programs. Nothing else in the object moves, so
//! this is a copy and a few writes into the symbol table, not a relink. Only the entry
//! symbols of program sections are touched: a function in `.text` (which programs call) is
//! never hidden.

use object::LittleEndian;
use object::elf::{FileHeader64, SHF_EXECINSTR, SHT_SYMTAB, STT_FUNC, Sym64};
use object::read::SectionIndex;
use object::read::elf::{FileHeader, SectionHeader, Sym};
use thiserror::Error;

/// The eBPF object built by `cargo xtask build-ebpf` (stripped by `build.rs`), embedded at
/// compile time.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("CYLO_USAGE_EBPF_OBJECT"));

/// The object could not be read as the ELF file the hiding expects. The tracker then loads
/// the whole object: slower, never less.
#[derive(Debug, Error)]
pub(crate) enum ObjectError {
    /// Not a little-endian 64-bit ELF file, or one whose headers, symbol table or names
    /// point outside it (what the `object` crate, which aya's parser uses too, says).
    #[error("the eBPF object cannot be read as a little-endian 64-bit ELF file")]
    Elf(#[from] object::read::Error),
}

/// `object` with the programs named in `hidden` hidden from aya: the entry symbol of each
/// (a function symbol in an executable section other than `.text`) gets an empty name.
/// Names that are no program of the object are ignored.
pub(crate) fn hide_programs(object: &[u8], hidden: &[&str]) -> Result<Vec<u8>, ObjectError> {
    let header = FileHeader64::<LittleEndian>::parse(object)?;
    let endian = header.endian()?;
    let sections = header.sections(endian, object)?;
    let symbols = sections.symbols(endian, object, SHT_SYMTAB)?;
    // Where the symbol table's entries lie in the file (the slice below starts there).
    let table = sections.section(symbols.section())?.sh_offset(endian) as usize;
    let in_program_section = |sym: &Sym64<LittleEndian>| -> Result<bool, ObjectError> {
        let index = SectionIndex(sym.st_shndx(endian) as usize);
        let Ok(section) = sections.section(index) else {
            return Ok(false); // undefined, absolute, common
        };
        Ok(section.sh_flags(endian) & u64::from(SHF_EXECINSTR) != 0
            && sections.section_name(endian, section)? != b".text")
    };
    let mut out = object.to_vec();
    for (i, sym) in symbols.symbols().iter().enumerate() {
        if sym.st_type() != STT_FUNC || sym.st_name(endian) == 0 || !in_program_section(sym)? {
            continue;
        }
        let name = symbols.symbol_name(endian, sym)?;
        if hidden.iter().any(|h| h.as_bytes() == name) {
            // `st_name` is the entry's first field.
            let at = table + i * size_of::<Sym64<LittleEndian>>();
            out[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::Object;

    fn programs(object: &[u8]) -> Vec<String> {
        let mut names: Vec<String> = Object::parse(object)
            .unwrap()
            .programs
            .into_keys()
            .collect();
        names.sort();
        names
    }

    #[test]
    fn hidden_programs_are_gone_and_nothing_else_changes() {
        let object = OBJECT;
        let all = programs(object);
        assert!(all.len() > 20, "{all:?}");
        let hidden = ["task_newtask", "fx_inet_send", "control_adopt"];
        for h in hidden {
            assert!(
                all.iter().any(|p| p == h),
                "{h} is no program of the object"
            );
        }
        let subset = hide_programs(object, &hidden).unwrap();
        assert_eq!(subset.len(), object.len());
        let left = programs(&subset);
        let expected: Vec<String> = all
            .iter()
            .filter(|p| !hidden.contains(&p.as_str()))
            .cloned()
            .collect();
        assert_eq!(left, expected);
        // Four bytes (a name index) per hidden program, nothing else.
        let changed = object.iter().zip(&subset).filter(|(a, b)| a != b).count();
        assert!(
            (1..=4 * hidden.len()).contains(&changed),
            "{changed} bytes changed"
        );
        // The programs left are the same instructions as before.
        let before = Object::parse(object).unwrap();
        let after = Object::parse(&subset).unwrap();
        for (key, f) in &after.functions {
            assert_eq!(
                f.instructions.len(),
                before.functions[key].instructions.len(),
                "{}",
                f.name
            );
        }
    }

    #[test]
    fn functions_of_text_and_unknown_names_are_never_hidden() {
        let object = OBJECT;
        // A global function in .text that programs call, a map, and no symbol at all.
        let subset = hide_programs(
            object,
            &["cylo_usage_join_process", "TASKS", "no_such_program"],
        )
        .unwrap();
        assert_eq!(subset, object);
        assert_eq!(programs(&subset), programs(object));
    }

    #[test]
    fn a_malformed_object_is_an_error_not_a_panic() {
        let object = OBJECT;
        assert!(matches!(
            hide_programs(b"not an elf", &["x"]),
            Err(ObjectError::Elf(_))
        ));
        // Every truncation either fails cleanly or (past the tables) hides as before.
        for len in [0, 16, 63, 64, 0x40 + 1, object.len() / 2, object.len() - 1] {
            let _ = hide_programs(&object[..len], &["task_newtask"]);
        }
        // Section headers pointing past the end.
        let mut bad = object.to_vec();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            hide_programs(&bad, &["task_newtask"]),
            Err(ObjectError::Elf(_))
        ));
    }
}
