// The eBPF object as it is embedded and shipped: without what loading it never uses.
//
// bpf-linker writes the object with the DWARF its `--btf` made the BTF from (`.debug_*`, with
// relocation sections of their own: 1.8 of the object's 2.3 MB), and with the BTF's line
// info (`.BTF.ext`'s line records, one per source line of every function, and
// `.rel.BTF.ext`). aya parses every section's relocations and copies the line records of
// each function into every program that calls it: a lean `run` took 34.2 ms with them and
// 30.1 ms without (aya's `load` 9.7 and 6.3 ms) on this project's VM. What stays: the
// programs, maps, symbols, the BTF types, and the function info (which the verifier needs
// for the global functions). Only the verifier's log loses something: without line info it
// shows no source lines beside the instructions (build with `CYLO_USAGE_EBPF_LINE_INFO=1`
// to keep them).
//
// One definition, `include!`d by `cylo-usage/build.rs` (which embeds the object) and by
// `xtask/src/package.rs` (which ships it). Plain `//` comments: an `include!`d file cannot
// start with inner doc comments.

/// `.BTF.ext`'s magic, little-endian (the object is `bpfel`).
const BTF_EXT_MAGIC: u16 = 0xeb9f;

/// `object` (an ELF of eBPF programs) without its DWARF sections and, unless `line_info`, its
/// BTF line info. An object with nothing to remove is returned byte for byte, so stripping is
/// idempotent (a shipped object, stripped already, keeps its SHA-256).
pub fn strip_ebpf_object(object: &[u8], line_info: bool) -> Result<Vec<u8>, String> {
    use object::build::elf::{Builder, SectionData};
    let mut elf = Builder::read(object).map_err(|e| format!("not an ELF object: {e}"))?;
    let dropped = |name: &[u8]| {
        name.starts_with(b".debug_") || (!line_info && name == b".rel.BTF.ext".as_slice())
    };
    // A section goes with its relocations (`.rel.debug_info` with `.debug_info`). (The
    // table's iterators skip deleted sections: the ids first.)
    let gone: Vec<_> = elf
        .sections
        .iter()
        .filter(|s| dropped(s.name.as_slice()))
        .map(|s| s.id())
        .collect();
    let mut changed = !gone.is_empty();
    for section in elf.sections.iter_mut() {
        if gone.contains(&section.id())
            || section.sh_info_section.is_some_and(|t| gone.contains(&t))
        {
            section.delete = true;
        } else if !line_info
            && section.name.as_slice() == b".BTF.ext"
            && let SectionData::Data(data) = &mut section.data
            && let Some(shorter) = btf_ext_without_line_info(data)?
        {
            *data = shorter.into();
            changed = true;
        }
    }
    if !changed {
        return Ok(object.to_vec());
    }
    // Then the symbols in deleted sections, and relocations naming them.
    elf.delete_orphans();
    // LLVM names the sections in the symbols' `.strtab`; the writer wants a table of its own.
    if !elf
        .sections
        .iter()
        .any(|s| matches!(s.data, SectionData::SectionString))
    {
        let names = elf.sections.add();
        names.name = b".shstrtab".to_vec().into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.sh_addralign = 1;
        names.data = SectionData::SectionString;
    }
    let mut out = Vec::with_capacity(object.len() / 4);
    elf.write(&mut out)
        .map_err(|e| format!("cannot write the stripped object: {e}"))?;
    Ok(out)
}

/// `.BTF.ext` section `data` without its line info: the same header (line info of length 0,
/// placed after the function info) and the function info and CO-RE relocations as they
/// were. `None` when it has no line info.
pub fn btf_ext_without_line_info(data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let u16_at = |at: usize| data.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let short = || format!(".BTF.ext is {} bytes, shorter than its header", data.len());
    if u16_at(0).ok_or_else(short)? != BTF_EXT_MAGIC {
        return Err(".BTF.ext has no little-endian magic 0xeb9f".to_string());
    }
    let hdr_len = u32_at(4).ok_or_else(short)?;
    // Offsets are relative to the end of the header: function info, line info and (headers
    // of 32 bytes and more) CO-RE relocations.
    let field = |at: usize| {
        if at + 4 <= hdr_len {
            u32_at(at).ok_or_else(short)
        } else {
            Ok(0)
        }
    };
    let (func_off, func_len) = (field(8)?, field(12)?);
    let (line_off, line_len) = (field(16)?, field(20)?);
    let (core_off, core_len) = (field(24)?, field(28)?);
    if hdr_len < 24 {
        return Err(format!(".BTF.ext's header is {hdr_len} bytes, shorter than 24"));
    }
    if line_len == 0 {
        return Ok(None);
    }
    let part = |off: usize, len: usize, what: &str| {
        data.get(hdr_len + off..hdr_len + off + len)
            .ok_or_else(|| format!(".BTF.ext's {what} ({len} bytes at {off}) runs past its end"))
    };
    let func = part(func_off, func_len, "function info")?;
    part(line_off, line_len, "line info")?;
    let core = part(core_off, core_len, "CO-RE relocations")?;
    let mut out = data[..hdr_len].to_vec();
    let mut put = |at: usize, value: usize| {
        if at + 4 <= hdr_len {
            out[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
        }
    };
    put(8, 0);
    put(12, func_len);
    put(16, func_len);
    put(20, 0);
    put(24, func_len);
    put(28, core_len);
    out.extend_from_slice(func);
    out.extend_from_slice(core);
    Ok(Some(out))
}
