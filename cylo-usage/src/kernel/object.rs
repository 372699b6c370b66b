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

use thiserror::Error;

/// The eBPF object built by `cargo xtask build-ebpf` (stripped by `build.rs`), embedded at
/// compile time.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("CYLO_USAGE_EBPF_OBJECT"));

/// The object could not be read as the ELF file the hiding expects. The tracker then loads
/// the whole object: slower, never less.
#[derive(Debug, Error)]
pub(crate) enum ObjectError {
    /// Not a little-endian, 64-bit ELF file.
    #[error("the eBPF object is not a little-endian 64-bit ELF file")]
    NotElf,
    /// A header, table or name points outside the object.
    #[error("the eBPF object's {what} at byte {offset} lies outside its {len} bytes")]
    OutOfBounds {
        /// What was being read.
        what: &'static str,
        /// Where.
        offset: usize,
        /// The object's size.
        len: usize,
    },
    /// The object has no symbol table.
    #[error("the eBPF object has no symbol table")]
    NoSymbolTable,
}

const SHT_SYMTAB: u32 = 2;
const SHF_EXECINSTR: u64 = 4;
const STT_FUNC: u8 = 2;
const SHDR_SIZE: usize = 64;
const SYM_SIZE: usize = 24;

/// Bounds-checked little-endian reads of `data`.
struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn bytes<const N: usize>(
        &self,
        offset: usize,
        what: &'static str,
    ) -> Result<[u8; N], ObjectError> {
        offset
            .checked_add(N)
            .and_then(|end| self.data.get(offset..end))
            .and_then(|b| b.try_into().ok())
            .ok_or(ObjectError::OutOfBounds {
                what,
                offset,
                len: self.data.len(),
            })
    }

    fn u16(&self, offset: usize, what: &'static str) -> Result<usize, ObjectError> {
        Ok(u16::from_le_bytes(self.bytes(offset, what)?) as usize)
    }

    fn u32(&self, offset: usize, what: &'static str) -> Result<u32, ObjectError> {
        Ok(u32::from_le_bytes(self.bytes(offset, what)?))
    }

    fn u64(&self, offset: usize, what: &'static str) -> Result<u64, ObjectError> {
        Ok(u64::from_le_bytes(self.bytes(offset, what)?))
    }

    fn usize(&self, offset: usize, what: &'static str) -> Result<usize, ObjectError> {
        usize::try_from(self.u64(offset, what)?).map_err(|_| ObjectError::OutOfBounds {
            what,
            offset,
            len: self.data.len(),
        })
    }

    /// The NUL-terminated name at `offset` of a string table.
    fn name(&self, offset: usize, what: &'static str) -> Result<&[u8], ObjectError> {
        let rest = self.data.get(offset..).ok_or(ObjectError::OutOfBounds {
            what,
            offset,
            len: self.data.len(),
        })?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(ObjectError::OutOfBounds {
                what,
                offset,
                len: self.data.len(),
            })?;
        Ok(&rest[..end])
    }
}

/// A section header's fields this module reads.
struct Section {
    name: usize,
    kind: u32,
    flags: u64,
    offset: usize,
    size: usize,
    link: usize,
}

fn sections(r: &Reader<'_>) -> Result<Vec<Section>, ObjectError> {
    // e_ident: "\x7fELF", ELFCLASS64, ELFDATA2LSB.
    if r.bytes::<6>(0, "ELF header").ok() != Some(*b"\x7fELF\x02\x01") {
        return Err(ObjectError::NotElf);
    }
    let shoff = r.usize(0x28, "section header offset")?;
    if r.u16(0x3a, "section header size")? != SHDR_SIZE {
        return Err(ObjectError::NotElf);
    }
    let count = r.u16(0x3c, "section count")?;
    (0..count)
        .map(|i| {
            let at = shoff.saturating_add(i.saturating_mul(SHDR_SIZE));
            let what = "section header";
            Ok(Section {
                name: r.u32(at, what)? as usize,
                kind: r.u32(at + 4, what)?,
                flags: r.u64(at + 8, what)?,
                offset: r.usize(at + 0x18, what)?,
                size: r.usize(at + 0x20, what)?,
                link: r.u32(at + 0x28, what)? as usize,
            })
        })
        .collect()
}

/// `object` with the programs named in `hidden` hidden from aya: the entry symbol of each
/// (a function symbol in an executable section other than `.text`) gets an empty name.
/// Names that are no program of the object are ignored.
pub(crate) fn hide_programs(object: &[u8], hidden: &[&str]) -> Result<Vec<u8>, ObjectError> {
    let r = Reader { data: object };
    let sections = sections(&r)?;
    let shstrndx = r.u16(0x3e, "section name table index")?;
    let shstr = sections
        .get(shstrndx)
        .ok_or(ObjectError::OutOfBounds {
            what: "section name table",
            offset: shstrndx,
            len: object.len(),
        })?
        .offset;
    let symtab = sections
        .iter()
        .find(|s| s.kind == SHT_SYMTAB)
        .ok_or(ObjectError::NoSymbolTable)?;
    let strtab = sections
        .get(symtab.link)
        .ok_or(ObjectError::OutOfBounds {
            what: "symbol name table",
            offset: symtab.link,
            len: object.len(),
        })?
        .offset;
    // The executable sections that hold programs (everything executable but `.text`).
    let mut program_section = vec![false; sections.len()];
    for (i, s) in sections.iter().enumerate() {
        program_section[i] = s.flags & SHF_EXECINSTR != 0
            && r.name(shstr.saturating_add(s.name), "section name")? != b".text";
    }
    let mut out = object.to_vec();
    let symbols = symtab.size / SYM_SIZE;
    for i in 0..symbols {
        let at = symtab.offset.saturating_add(i * SYM_SIZE);
        let name = r.u32(at, "symbol")? as usize;
        let [info] = r.bytes::<1>(at + 4, "symbol")?;
        let section = r.u16(at + 6, "symbol")?;
        if name == 0
            || info & 0xf != STT_FUNC
            || !program_section.get(section).copied().unwrap_or(false)
        {
            continue;
        }
        let text = r.name(strtab.saturating_add(name), "symbol name")?;
        if hidden.iter().any(|h| h.as_bytes() == text) {
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
            Err(ObjectError::NotElf)
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
            Err(ObjectError::OutOfBounds { .. })
        ));
    }
}
