//! A small, self-contained reader of raw kernel BTF (the format of `/sys/kernel/btf/vmlinux`).
//!
//! It answers the few questions cylo-usage asks of the running kernel: where a member of a
//! struct lives (descending through nested and anonymous structs/unions), what type it has
//! (a [`TypeInfo`]: struct, array, pointer, ...), and how many arguments a raw tracepoint
//! passes and of which types. The format is described in the kernel's
//! `Documentation/bpf/btf.rst`.
//!
//! Kernel BTF holds about 126,000 types (5.5 MB) of which the resolver needs a few dozen, so
//! nothing is parsed up front: [`Btf::open`] maps the file where the kernel allows it, makes
//! one pass over the type section that records where each type starts and which types carry
//! the [`Wanted`] names (compared in place in the string section, which is never copied), and
//! each lookup then decodes only the types it reaches.
//!
//! The input is treated as untrusted: every read is bounds-checked, the layout of every type
//! is checked by the pass, every type reference is checked when the type holding it is
//! decoded, and every walk over the type graph (typedef chains, array nesting, anonymous
//! members, pointer levels) is bounded, so malformed input yields a [`BtfError`], never a
//! panic or a hang.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where the running kernel exposes its own BTF (needs `CONFIG_DEBUG_INFO_BTF=y`).
pub(crate) const VMLINUX_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// Most typedef/modifier/array hops followed while resolving one type.
const MAX_CHAIN: usize = 64;
/// Most nested anonymous struct/union members descended into for one path component.
const MAX_ANON_DEPTH: usize = 32;
/// Most members visited while looking up one path component (bounds the work done on
/// adversarial input whose anonymous members reference each other).
const MAX_VISITS: usize = 1 << 20;

const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;

/// The kind of a BTF type (`BTF_KIND_*`); [`Kind::Void`] stands for type id 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Type id 0, `void`.
    Void,
    /// `BTF_KIND_INT`.
    Int,
    /// `BTF_KIND_PTR`.
    Ptr,
    /// `BTF_KIND_ARRAY`.
    Array,
    /// `BTF_KIND_STRUCT`.
    Struct,
    /// `BTF_KIND_UNION`.
    Union,
    /// `BTF_KIND_ENUM`.
    Enum,
    /// `BTF_KIND_FWD`: a forward declaration.
    Fwd,
    /// `BTF_KIND_TYPEDEF`.
    Typedef,
    /// `BTF_KIND_VOLATILE`.
    Volatile,
    /// `BTF_KIND_CONST`.
    Const,
    /// `BTF_KIND_RESTRICT`.
    Restrict,
    /// `BTF_KIND_FUNC`.
    Func,
    /// `BTF_KIND_FUNC_PROTO`.
    FuncProto,
    /// `BTF_KIND_VAR`.
    Var,
    /// `BTF_KIND_DATASEC`.
    Datasec,
    /// `BTF_KIND_FLOAT`.
    Float,
    /// `BTF_KIND_DECL_TAG`.
    DeclTag,
    /// `BTF_KIND_TYPE_TAG`.
    TypeTag,
    /// `BTF_KIND_ENUM64`.
    Enum64,
}

impl Kind {
    fn from_raw(raw: u32) -> Option<Kind> {
        Some(match raw {
            1 => Kind::Int,
            2 => Kind::Ptr,
            3 => Kind::Array,
            4 => Kind::Struct,
            5 => Kind::Union,
            6 => Kind::Enum,
            7 => Kind::Fwd,
            8 => Kind::Typedef,
            9 => Kind::Volatile,
            10 => Kind::Const,
            11 => Kind::Restrict,
            12 => Kind::Func,
            13 => Kind::FuncProto,
            14 => Kind::Var,
            15 => Kind::Datasec,
            16 => Kind::Float,
            17 => Kind::DeclTag,
            18 => Kind::TypeTag,
            19 => Kind::Enum64,
            _ => return None,
        })
    }

    /// Kinds that only qualify or rename another type (followed when resolving a size).
    fn is_modifier(self) -> bool {
        matches!(
            self,
            Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Void => "void",
            Kind::Int => "int",
            Kind::Ptr => "pointer",
            Kind::Array => "array",
            Kind::Struct => "struct",
            Kind::Union => "union",
            Kind::Enum => "enum",
            Kind::Fwd => "forward declaration",
            Kind::Typedef => "typedef",
            Kind::Volatile => "volatile",
            Kind::Const => "const",
            Kind::Restrict => "restrict",
            Kind::Func => "function",
            Kind::FuncProto => "function prototype",
            Kind::Var => "variable",
            Kind::Datasec => "datasec",
            Kind::Float => "float",
            Kind::DeclTag => "decl tag",
            Kind::TypeTag => "type tag",
            Kind::Enum64 => "enum64",
        })
    }
}

/// Everything that can go wrong while loading BTF or answering a question about it.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The BTF file could not be opened, its size read, or its contents read.
    #[error("cannot read BTF file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A part of the blob (the header, a section, a type or its kind-specific data) runs
    /// past the end of the bytes that should hold it.
    #[error("BTF truncated: {what} at byte {offset} needs {need} bytes, {len} available")]
    Truncated {
        /// The part being read, e.g. `header`, `type section`, `member`.
        what: &'static str,
        /// Where it starts, in bytes: from the start of the blob (header), of the bytes after the
        /// header (a section), or of the type section (a type).
        offset: usize,
        /// Bytes it needs from there.
        need: usize,
        /// Bytes available in that range.
        len: usize,
    },
    /// The blob does not start with the BTF magic `0xeb9f`, in either byte order.
    #[error("not BTF: magic is {magic:#06x}, expected 0xeb9f")]
    BadMagic {
        /// The first two bytes, read little-endian.
        magic: u16,
    },
    /// The header's version byte is not 1.
    #[error("unsupported BTF version {version} (only version 1 is known)")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// The header or the sections are inconsistent: `hdr_len` below 24 bytes, a string
    /// section that does not start with NUL, or a type section with too many types or larger
    /// than 4 GiB.
    #[error("invalid BTF header: {reason}")]
    BadHeader {
        /// What is wrong.
        reason: &'static str,
    },
    /// The name offset of a type, member or parameter is past the string section, or the
    /// string section does not end with NUL.
    #[error(
        "BTF type [{type_id}]: name offset {offset} is not a NUL-terminated string of the {len}-byte string section"
    )]
    BadString {
        /// The type holding the name.
        type_id: u32,
        /// The name offset, in bytes into the string section.
        offset: u32,
        /// Length of the string section in bytes.
        len: usize,
    },
    /// A type's kind number is not a known `BTF_KIND_*` (1 to 19).
    #[error("BTF type [{type_id}] at byte {offset} of the type section: unknown kind {kind}")]
    UnknownKind {
        /// The type's id.
        type_id: u32,
        /// The raw kind number.
        kind: u32,
        /// Where the type starts, in bytes from the start of the type section.
        offset: usize,
    },
    /// A type refers to a type id past the last type.
    #[error(
        "BTF type [{type_id}] ({kind}) refers to type [{target}], but there are only {count} types"
    )]
    BadTypeRef {
        /// The referring type.
        type_id: u32,
        /// Its kind.
        kind: Kind,
        /// The id it refers to.
        target: u32,
        /// Number of types in the blob (not counting `void`, id 0).
        count: u32,
    },
    /// No struct or union has this name.
    #[error("struct {name} is not in BTF")]
    StructNotFound {
        /// The name looked up.
        name: String,
    },
    /// The member path has an empty component (an empty path, `a..b`, or a leading or
    /// trailing dot).
    #[error("{struct_name}.{path}: empty path component")]
    EmptyPathComponent {
        /// The struct or union the path starts in.
        struct_name: String,
        /// The whole dotted member path.
        path: String,
    },
    /// A path component names no member of the struct or union it is looked up in (its
    /// anonymous struct/union members included).
    #[error("{struct_name}.{path}: no member `{component}` in {container}")]
    MemberNotFound {
        /// The struct or union the path starts in.
        struct_name: String,
        /// The whole dotted member path.
        path: String,
        /// The component not found.
        component: String,
        /// What it was looked up in: `struct <name>` for the first component, else
        /// ``member `<previous component>` (<kind>)``.
        container: String,
    },
    /// A path component other than the last is not a struct or union (after typedefs and
    /// modifiers), so the path cannot go on into it.
    #[error(
        "{struct_name}.{path}: `{component}` is of kind {kind}, not a struct or union, so it has no members"
    )]
    NotComposite {
        /// The struct or union the path starts in.
        struct_name: String,
        /// The whole dotted member path.
        path: String,
        /// The component.
        component: String,
        /// Its kind, typedefs and modifiers followed.
        kind: Kind,
    },
    /// The member at the path is a bitfield, which cannot be read as whole bytes.
    #[error(
        "{struct_name}.{path} is a bitfield ({bits} bits at bit offset {bit_offset}); only whole bytes can be read"
    )]
    Bitfield {
        /// The struct or union the path starts in.
        struct_name: String,
        /// The whole dotted member path.
        path: String,
        /// Its bit offset from the start of `struct_name`.
        bit_offset: u64,
        /// Its width in bits.
        bits: u32,
    },
    /// A path component does not start on a byte boundary.
    #[error("{struct_name}.{path}: `{component}` starts at bit offset {bit_offset}, not on a byte")]
    Unaligned {
        /// The struct or union the path starts in.
        struct_name: String,
        /// The whole dotted member path.
        path: String,
        /// The component.
        component: String,
        /// Its bit offset within the struct or union it was looked up in.
        bit_offset: u64,
    },
    /// A member's offset or size, or an array element's size, does not fit in 32 bits.
    #[error("{context}: offset or size does not fit in 32 bits")]
    Overflow {
        /// What was measured: `<struct>.<path>`, or `BTF type [<id>] (array element)`.
        context: String,
    },
    /// A type whose size is needed has none (void, a function, a forward declaration, ...).
    #[error("BTF type [{type_id}] ({kind}) has no size")]
    NoSize {
        /// The type reached, after typedefs, modifiers and array element types.
        type_id: u32,
        /// Its kind.
        kind: Kind,
    },
    /// A typedef/modifier/array chain, a pointer or array nesting, or an anonymous
    /// member nesting went past its bound (a cycle, or adversarial input); also when one path
    /// component's lookup visits too many members.
    #[error(
        "BTF type [{type_id}]: typedef/modifier/array chain or anonymous nesting longer than {limit}"
    )]
    TooDeep {
        /// The type being resolved when the bound was hit.
        type_id: u32,
        /// The bound, in links or nesting levels.
        limit: usize,
    },
    /// There is no typedef `btf_trace_<tracepoint>`: the BTF has no such raw tracepoint.
    #[error("tracepoint {tracepoint}: no typedef btf_trace_{tracepoint} in BTF")]
    TracepointNotFound {
        /// The tracepoint, without `btf_trace_`.
        tracepoint: String,
    },
    /// `btf_trace_<tracepoint>` is not a pointer to a function prototype.
    #[error(
        "tracepoint {tracepoint}: btf_trace_{tracepoint} is not a pointer to a function prototype (found {kind})"
    )]
    NotTracepointProto {
        /// The tracepoint, without `btf_trace_`.
        tracepoint: String,
        /// The kind found where the pointer, or the prototype it points to, was expected.
        kind: Kind,
    },
    /// The tracepoint's prototype lacks its first parameter, the `void *__data` pointer: it has
    /// none, or the first is not a pointer.
    #[error("tracepoint {tracepoint}: the prototype lacks its first `void *__data` parameter")]
    NoDataParam {
        /// The tracepoint, without `btf_trace_`.
        tracepoint: String,
    },
    /// No kernel function (BTF `FUNC`) has this name.
    #[error("function {name} is not in BTF")]
    FunctionNotFound {
        /// The function looked up.
        name: String,
    },
    /// The function's type is not a function prototype.
    #[error("function {name}: its type is not a function prototype (found {kind})")]
    NotFunctionProto {
        /// The function.
        name: String,
        /// The kind of its type, typedefs and modifiers followed.
        kind: Kind,
    },
}

/// Where a member lives: a byte offset from the start of the outermost struct, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Bytes from the start of the struct named in the query.
    pub offset: u32,
    /// Size of the member in bytes (typedef/const/volatile chains resolved, arrays included).
    pub size: u32,
}

/// The shape of a member's or a parameter's type, with typedef/const/volatile/restrict/type-tag
/// links followed: what [`Btf::member_type`] and [`Btf::raw_tracepoint_params`] report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypeInfo {
    /// A struct or union (`kind`), its name (empty when anonymous) and size in bytes.
    Composite { kind: Kind, name: String, size: u32 },
    /// An array of `nelems` elements of `elem_size` bytes each.
    Array {
        nelems: u32,
        elem_size: u32,
        elem: Box<TypeInfo>,
    },
    /// A pointer to `target`.
    Pointer { target: Box<TypeInfo> },
    /// Anything else (int, enum, forward declaration, void, ...) and its name.
    Other { kind: Kind, name: String },
}

impl TypeInfo {
    /// Whether this is a pointer to `struct <name>`, defined or only forward-declared.
    pub fn is_pointer_to_struct(&self, name: &str) -> bool {
        match self {
            TypeInfo::Pointer { target } => matches!(
                &**target,
                TypeInfo::Composite { kind: Kind::Struct, name: n, .. }
                    | TypeInfo::Other { kind: Kind::Fwd, name: n } if n == name
            ),
            _ => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RawMember {
    name_off: u32,
    ty: u32,
    /// The raw `offset` word: a bit offset, or bitfield size << 24 | bit offset when the
    /// containing struct has `kind_flag` set.
    offset: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum Data {
    None,
    /// INT: the encoding word (bits 0..8 width, 16..24 bit offset, 24..28 encoding).
    Int(u32),
    Array {
        elem: u32,
        nelems: u32,
    },
    Members(Vec<RawMember>),
    /// FUNC_PROTO parameters: (name offset, type).
    Params(Vec<(u32, u32)>),
}

/// One type, decoded from the type section when a lookup reaches it.
#[derive(Debug, PartialEq, Eq)]
struct Type {
    name_off: u32,
    kind: Kind,
    kind_flag: bool,
    /// `size` for INT/ENUM/STRUCT/UNION/DATASEC/FLOAT/ENUM64, `type` for the others.
    size_or_type: u32,
    data: Data,
}

/// The names a caller will look up, given when the BTF is opened so that the one pass over
/// the type section notes where each is (see [`Btf::open`]). Names not listed are still
/// found, by a scan of the type section per lookup.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wanted<'a> {
    /// Structs and unions ([`Btf::member`], [`Btf::struct_size`], ...).
    pub composites: &'a [&'a str],
    /// Raw tracepoints, without the `btf_trace_` of their typedefs.
    pub tracepoints: &'a [&'a str],
    /// Kernel functions ([`Btf::function_params`]).
    pub functions: &'a [&'a str],
}

/// The kinds a name is looked up among.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum NameClass {
    /// STRUCT or UNION.
    Composite,
    Typedef,
    Func,
}

impl NameClass {
    fn of(kind: Kind) -> Option<NameClass> {
        match kind {
            Kind::Struct | Kind::Union => Some(NameClass::Composite),
            Kind::Typedef => Some(NameClass::Typedef),
            Kind::Func => Some(NameClass::Func),
            _ => None,
        }
    }
}

/// A wanted name and the first type of its class that has it.
#[derive(Debug)]
struct Want {
    class: NameClass,
    name: Box<str>,
    id: Option<u32>,
}

/// The raw blob: mapped read-only from the kernel, or owned.
enum Bytes {
    Owned(Vec<u8>),
    Mapped(Mapping),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m) => m.as_slice(),
        }
    }
}

/// A private read-only mapping of a whole file, unmapped on drop.
struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone; `&[u8]` views of it are
// shared like any other immutable bytes.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` (PROT_READ, MAP_PRIVATE) if it is on sysfs; `None` where
    /// the kernel refuses (sysfs BTF can be mapped since Linux 6.16). Other files are read:
    /// one that shrank while mapped would fault (SIGBUS) on access, where sysfs BTF is the
    /// kernel's own read-only data.
    fn new(file: &std::fs::File, len: usize) -> Option<Mapping> {
        use std::os::fd::AsRawFd;
        const SYSFS_MAGIC: libc::c_long = 0x6265_6572;
        // SAFETY: `st` is written by fstatfs before it is read.
        let on_sysfs = unsafe {
            let mut st = std::mem::zeroed::<libc::statfs>();
            libc::fstatfs(file.as_raw_fd(), &mut st) == 0
                && st.f_type as libc::c_long == SYSFS_MAGIC
        };
        if len == 0 || !on_sysfs {
            return None;
        }
        // SAFETY: a fresh private read-only mapping of an open file descriptor; the pointer
        // is only used through `as_slice` while the mapping lives.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        std::ptr::NonNull::new(ptr.cast()).map(|ptr| Mapping { ptr, len })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing borrows any more.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Kernel BTF, read lazily: opening it makes one pass over the type section that records
/// where each type starts and where the [`Wanted`] names are; a lookup then decodes only the
/// types it reaches. The string section is used in place, never copied.
pub struct Btf {
    bytes: Bytes,
    big_endian: bool,
    /// Byte range of the type section in `bytes`.
    type_section: std::ops::Range<usize>,
    /// Byte range of the string section in `bytes`.
    string_section: std::ops::Range<usize>,
    /// Offset in the type section of each type (id 1 is `index[0]`).
    index: Vec<u32>,
    wanted: Vec<Want>,
    pointer_size: u32,
    /// Lookups of names that were not [`Wanted`], each a scan of the type section.
    scans: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.index.len())
            .field("strings", &self.string_section.len())
            .field("mapped", &matches!(self.bytes, Bytes::Mapped(_)))
            .field("pointer_size", &self.pointer_size)
            .finish()
    }
}

/// Bounds-checked reads of a byte slice in the blob's byte order.
struct Reader<'a> {
    bytes: &'a [u8],
    big_endian: bool,
}

impl Reader<'_> {
    fn u32(&self, offset: usize, what: &'static str) -> Result<u32, BtfError> {
        // `let else` rather than `ok_or`: an error value built on every read and dropped
        // again was a third of the time of the pass over the type section.
        let Some(b) = offset
            .checked_add(4)
            .and_then(|end| self.bytes.get(offset..end))
        else {
            return Err(BtfError::Truncated {
                what,
                offset,
                need: 4,
                len: self.bytes.len(),
            });
        };
        let b = [b[0], b[1], b[2], b[3]];
        Ok(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn need(&self, offset: usize, need: usize, what: &'static str) -> Result<(), BtfError> {
        match offset.checked_add(need) {
            Some(end) if end <= self.bytes.len() => Ok(()),
            _ => Err(BtfError::Truncated {
                what,
                offset,
                need,
                len: self.bytes.len(),
            }),
        }
    }
}

/// The byte range of a section inside the blob (`base` is where the body starts).
fn section(
    data_len: usize,
    base: usize,
    off: u32,
    len: u32,
    what: &'static str,
) -> Result<std::ops::Range<usize>, BtfError> {
    let body_len = data_len - base;
    let (off, len) = (off as usize, len as usize);
    match off.checked_add(len) {
        Some(end) if end <= body_len => Ok(base + off..base + end),
        _ => Err(BtfError::Truncated {
            what,
            offset: off,
            need: len,
            len: body_len,
        }),
    }
}

/// Size in bytes of the kind-specific data after a type's 12-byte header.
fn extra_len(kind: Kind, vlen: usize) -> usize {
    match kind {
        Kind::Int | Kind::Var | Kind::DeclTag => 4,
        Kind::Array => 12,
        Kind::Struct | Kind::Union | Kind::Enum64 | Kind::Datasec => vlen * 12,
        Kind::FuncProto | Kind::Enum => vlen * 8,
        Kind::Void
        | Kind::Ptr
        | Kind::Fwd
        | Kind::Typedef
        | Kind::Volatile
        | Kind::Const
        | Kind::Restrict
        | Kind::Func
        | Kind::Float
        | Kind::TypeTag => 0,
    }
}

/// What `extra_len` reports a shortage of.
fn extra_what(kind: Kind) -> &'static str {
    match kind {
        Kind::Int => "int encoding",
        Kind::Array => "array",
        Kind::Struct | Kind::Union => "struct/union members",
        Kind::FuncProto => "function parameters",
        Kind::Enum => "enum values",
        Kind::Enum64 => "enum64 values",
        Kind::Datasec => "datasec entries",
        _ => "var/decl tag",
    }
}

/// Whether the NUL-terminated string at `offset` of `strings` is exactly `name`.
fn str_is(strings: &[u8], offset: u32, name: &[u8]) -> bool {
    let start = offset as usize;
    let end = start.saturating_add(name.len());
    strings.get(start..end) == Some(name) && strings.get(end) == Some(&0)
}

const LONGS: [&[u8]; 4] = [b"long", b"long int", b"unsigned long", b"long unsigned int"];

/// Compares `name` with the NUL-terminated string at `offset` of `strings` (which is in
/// bounds and NUL-terminated), in the order of `[u8]` slices.
fn cmp_name(name: &[u8], strings: &[u8], offset: usize) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let s = &strings[offset..];
    for (i, &b) in name.iter().enumerate() {
        match s.get(i) {
            Some(&c) if c == b => {}
            Some(&0) | None => return Ordering::Greater,
            Some(&c) => return b.cmp(&c),
        }
    }
    if s.get(name.len()) == Some(&0) {
        Ordering::Equal
    } else {
        Ordering::Less
    }
}

/// The wanted names of each class, sorted, with a bitmap of their first bytes: most names
/// of the type section are turned down by one bit test, the rest by a binary search.
struct NameLookup {
    /// Per [`NameClass`]: (name, index into the wants), sorted by name.
    sorted: [Vec<(Box<[u8]>, usize)>; 3],
    first_bytes: [[u64; 4]; 3],
    pending: usize,
}

impl NameLookup {
    fn slot(class: NameClass) -> usize {
        match class {
            NameClass::Composite => 0,
            NameClass::Typedef => 1,
            NameClass::Func => 2,
        }
    }

    fn new(wants: &[Want]) -> NameLookup {
        let mut sorted: [Vec<(Box<[u8]>, usize)>; 3] = Default::default();
        let mut first_bytes = [[0u64; 4]; 3];
        for (i, w) in wants.iter().enumerate() {
            let slot = Self::slot(w.class);
            if let Some(&b) = w.name.as_bytes().first() {
                first_bytes[slot][usize::from(b >> 6)] |= 1 << (b & 63);
                sorted[slot].push((w.name.as_bytes().into(), i));
            }
        }
        for names in &mut sorted {
            names.sort_unstable();
        }
        NameLookup {
            sorted,
            first_bytes,
            pending: wants.len(),
        }
    }

    /// Notes type `type_id` (of `class`, named at `name_off`) if it is the first of a wanted
    /// name.
    fn offer(
        &mut self,
        wants: &mut [Want],
        class: NameClass,
        strings: &[u8],
        name_off: u32,
        type_id: u32,
    ) {
        if self.pending == 0 {
            return;
        }
        let slot = Self::slot(class);
        let off = name_off as usize;
        let b = strings[off];
        if self.first_bytes[slot][usize::from(b >> 6)] & (1 << (b & 63)) == 0 {
            return;
        }
        let names = &self.sorted[slot];
        if let Ok(i) = names.binary_search_by(|(n, _)| cmp_name(n, strings, off)) {
            let want = &mut wants[names[i].1];
            if want.id.is_none() {
                want.id = Some(type_id);
                self.pending -= 1;
            }
        }
    }
}

impl Btf {
    #[cfg(test)]
    /// Reads and indexes a raw BTF file such as `/sys/kernel/btf/vmlinux`, with no
    /// [`Wanted`] names.
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        Btf::open(path, &Wanted::default())
    }

    /// Opens a raw BTF file, mapped where the kernel allows it (sysfs BTF since 6.16) and
    /// read otherwise, and notes where the `wanted` names are in one pass over its types.
    pub fn open(path: &Path, wanted: &Wanted<'_>) -> Result<Btf, BtfError> {
        let io = |source| BtfError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mapped = usize::try_from(len)
            .ok()
            .and_then(|len| Mapping::new(&file, len));
        let bytes = match mapped {
            Some(m) => Bytes::Mapped(m),
            None => {
                let mut v = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
                std::io::Read::read_to_end(&mut file, &mut v).map_err(io)?;
                Bytes::Owned(v)
            }
        };
        Btf::index(bytes, wanted)
    }

    #[cfg(test)]
    /// Parses a raw BTF blob (header, type section, string section), in either byte order,
    /// with no [`Wanted`] names.
    pub fn from_bytes(data: &[u8]) -> Result<Btf, BtfError> {
        Btf::index(Bytes::Owned(data.to_vec()), &Wanted::default())
    }

    #[cfg(test)]
    /// [`Btf::from_bytes`], noting where the `wanted` names are.
    pub fn from_bytes_wanting(data: &[u8], wanted: &Wanted<'_>) -> Result<Btf, BtfError> {
        Btf::index(Bytes::Owned(data.to_vec()), wanted)
    }

    /// Checks the header, then makes the one pass over the type section.
    fn index(bytes: Bytes, wanted: &Wanted<'_>) -> Result<Btf, BtfError> {
        let data = bytes.as_slice();
        if data.len() < HEADER_LEN {
            return Err(BtfError::Truncated {
                what: "header",
                offset: 0,
                need: HEADER_LEN,
                len: data.len(),
            });
        }
        let big_endian = match [data[0], data[1]] {
            m if u16::from_le_bytes(m) == BTF_MAGIC => false,
            m if u16::from_be_bytes(m) == BTF_MAGIC => true,
            m => {
                return Err(BtfError::BadMagic {
                    magic: u16::from_le_bytes(m),
                });
            }
        };
        if data[2] != 1 {
            return Err(BtfError::UnsupportedVersion { version: data[2] });
        }
        let hdr = Reader {
            bytes: data,
            big_endian,
        };
        let hdr_len = hdr.u32(4, "header")? as usize;
        if hdr_len < HEADER_LEN {
            return Err(BtfError::BadHeader {
                reason: "hdr_len is smaller than the 24-byte header",
            });
        }
        // Later header versions append fields; they are after the 24 bytes read here.
        if hdr_len > data.len() {
            return Err(BtfError::Truncated {
                what: "header (hdr_len)",
                offset: 0,
                need: hdr_len,
                len: data.len(),
            });
        }
        let type_section = section(
            data.len(),
            hdr_len,
            hdr.u32(8, "header")?,
            hdr.u32(12, "header")?,
            "type section",
        )?;
        let string_section = section(
            data.len(),
            hdr_len,
            hdr.u32(16, "header")?,
            hdr.u32(20, "header")?,
            "string section",
        )?;
        let strings = &data[string_section.clone()];
        if strings.first() != Some(&0) {
            return Err(BtfError::BadHeader {
                reason: "the string section must start with a NUL byte",
            });
        }
        let mut wants: Vec<Want> = Vec::new();
        let mut add = |class, name: String| {
            if !wants.iter().any(|w| w.class == class && *w.name == *name) {
                wants.push(Want {
                    class,
                    name: name.into(),
                    id: None,
                });
            }
        };
        for &name in wanted.composites {
            add(NameClass::Composite, name.to_owned());
        }
        for &tp in wanted.tracepoints {
            add(NameClass::Typedef, format!("btf_trace_{tp}"));
        }
        for &name in wanted.functions {
            add(NameClass::Func, name.to_owned());
        }
        let r = Reader {
            bytes: &data[type_section.clone()],
            big_endian,
        };
        let (index, pointer_size) = Self::scan(&r, strings, &mut wants)?;
        Ok(Btf {
            bytes,
            big_endian,
            type_section,
            string_section,
            index,
            wanted: wants,
            pointer_size,
            scans: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The one pass: the offset of every type, the first type of each wanted name, and the
    /// pointer width (the size of `long`, as libbpf tells it; 8 without a `long`).
    fn scan(
        r: &Reader<'_>,
        strings: &[u8],
        wants: &mut [Want],
    ) -> Result<(Vec<u32>, u32), BtfError> {
        // A string section that ends with NUL terminates every string in it: one O(1) check
        // per name instead of a scan.
        let nul_terminated = strings.last() == Some(&0);
        let mut lookup = NameLookup::new(wants);
        // About 40 bytes per type in kernel BTF.
        let mut index = Vec::with_capacity(r.bytes.len() / 40);
        let mut pointer_size = None;
        let mut pos = 0usize;
        while pos < r.bytes.len() {
            let type_id = u32::try_from(index.len() + 1).map_err(|_| BtfError::BadHeader {
                reason: "too many types",
            })?;
            let start = u32::try_from(pos).map_err(|_| BtfError::BadHeader {
                reason: "type section larger than 4 GiB",
            })?;
            let name_off = r.u32(pos, "type")?;
            let info = r.u32(pos + 4, "type")?;
            r.need(pos + 8, 4, "type")?;
            let raw_kind = (info >> 24) & 0x1f;
            let Some(kind) = Kind::from_raw(raw_kind) else {
                return Err(BtfError::UnknownKind {
                    type_id,
                    kind: raw_kind,
                    offset: pos,
                });
            };
            if !nul_terminated || name_off as usize >= strings.len() {
                return Err(BtfError::BadString {
                    type_id,
                    offset: name_off,
                    len: strings.len(),
                });
            }
            let extra = extra_len(kind, (info & 0xffff) as usize);
            r.need(pos + 12, extra, extra_what(kind))?;
            if name_off != 0 {
                if let Some(class) = NameClass::of(kind) {
                    lookup.offer(wants, class, strings, name_off, type_id);
                } else if kind == Kind::Int && pointer_size.is_none() {
                    let size = r.u32(pos + 8, "type")?;
                    if matches!(size, 4 | 8) && LONGS.iter().any(|l| str_is(strings, name_off, l)) {
                        pointer_size = Some(size);
                    }
                }
            }
            index.push(start);
            pos += 12 + extra;
        }
        Ok((index, pointer_size.unwrap_or(8)))
    }

    fn types(&self) -> Reader<'_> {
        Reader {
            bytes: &self.bytes.as_slice()[self.type_section.clone()],
            big_endian: self.big_endian,
        }
    }

    fn strings(&self) -> &[u8] {
        &self.bytes.as_slice()[self.string_section.clone()]
    }

    #[cfg(test)]
    /// Number of types (not counting the implicit `void`, id 0).
    pub fn type_count(&self) -> usize {
        self.index.len()
    }

    #[cfg(test)]
    /// Whether the blob is mapped from the kernel rather than read into memory.
    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, Bytes::Mapped(_))
    }

    /// Lookups so far of names that were not [`Wanted`] (each one a scan of all types).
    #[cfg(test)]
    pub(crate) fn scans(&self) -> usize {
        self.scans.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn name_bytes(&self, offset: u32) -> &[u8] {
        let rest = self.strings().get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn check_name(&self, type_id: u32, offset: u32) -> Result<(), BtfError> {
        let strings = self.strings();
        match strings.last() {
            Some(0) if (offset as usize) < strings.len() => Ok(()),
            _ => Err(BtfError::BadString {
                type_id,
                offset,
                len: strings.len(),
            }),
        }
    }

    /// Kind and name offset of type `id` (1..=count), without decoding the rest.
    fn head(&self, id: u32) -> Option<(Kind, u32)> {
        let pos = *self.index.get(id.checked_sub(1)? as usize)? as usize;
        let r = self.types();
        let name_off = r.u32(pos, "type").ok()?;
        let info = r.u32(pos + 4, "type").ok()?;
        Some((Kind::from_raw((info >> 24) & 0x1f)?, name_off))
    }

    /// Decodes type `id`: `None` for `void` (id 0) and ids past the last type. The types it
    /// refers to are checked to exist, so that following them cannot leave the blob.
    fn get(&self, id: u32) -> Result<Option<Type>, BtfError> {
        let Some(&pos) = id.checked_sub(1).and_then(|i| self.index.get(i as usize)) else {
            return Ok(None);
        };
        let r = self.types();
        let pos = pos as usize;
        let name_off = r.u32(pos, "type")?;
        let info = r.u32(pos + 4, "type")?;
        let size_or_type = r.u32(pos + 8, "type")?;
        let raw_kind = (info >> 24) & 0x1f;
        let Some(kind) = Kind::from_raw(raw_kind) else {
            return Err(BtfError::UnknownKind {
                type_id: id,
                kind: raw_kind,
                offset: pos,
            });
        };
        let vlen = (info & 0xffff) as usize;
        let pos = pos + 12;
        let count = self.index.len() as u32;
        let check = |target: u32| {
            if target > count {
                Err(BtfError::BadTypeRef {
                    type_id: id,
                    kind,
                    target,
                    count,
                })
            } else {
                Ok(())
            }
        };
        let data = match kind {
            Kind::Int => Data::Int(r.u32(pos, "int encoding")?),
            Kind::Array => {
                let elem = r.u32(pos, "array")?;
                check(elem)?;
                Data::Array {
                    elem,
                    nelems: r.u32(pos + 8, "array")?,
                }
            }
            Kind::Struct | Kind::Union => {
                let mut members = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let at = pos + i * 12;
                    let m = RawMember {
                        name_off: r.u32(at, "member")?,
                        ty: r.u32(at + 4, "member")?,
                        offset: r.u32(at + 8, "member")?,
                    };
                    self.check_name(id, m.name_off)?;
                    check(m.ty)?;
                    members.push(m);
                }
                Data::Members(members)
            }
            Kind::FuncProto => {
                check(size_or_type)?;
                let mut params = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let at = pos + i * 8;
                    let name_off = r.u32(at, "parameter")?;
                    self.check_name(id, name_off)?;
                    let ty = r.u32(at + 4, "parameter")?;
                    check(ty)?;
                    params.push((name_off, ty));
                }
                Data::Params(params)
            }
            Kind::Ptr
            | Kind::Typedef
            | Kind::Volatile
            | Kind::Const
            | Kind::Restrict
            | Kind::Func
            | Kind::Var
            | Kind::DeclTag
            | Kind::TypeTag => {
                check(size_or_type)?;
                Data::None
            }
            _ => Data::None,
        };
        Ok(Some(Type {
            name_off,
            kind,
            kind_flag: info >> 31 == 1,
            size_or_type,
            data,
        }))
    }

    fn kind_of(&self, id: u32) -> Result<Kind, BtfError> {
        Ok(self.get(id)?.map_or(Kind::Void, |t| t.kind))
    }

    /// The first type of `class` named `name`: from the index of wanted names, else by a
    /// scan of every type.
    fn find(&self, class: NameClass, name: &str) -> Option<u32> {
        if let Some(w) = self
            .wanted
            .iter()
            .find(|w| w.class == class && &*w.name == name)
        {
            return w.id;
        }
        self.scans
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let strings = self.strings();
        (1..=self.index.len() as u32).find(|&id| {
            self.head(id).is_some_and(|(kind, name_off)| {
                NameClass::of(kind) == Some(class) && str_is(strings, name_off, name.as_bytes())
            })
        })
    }

    /// Follows typedef/const/volatile/restrict/type-tag links to the underlying type id.
    fn skip_modifiers(&self, mut id: u32) -> Result<u32, BtfError> {
        let start = id;
        for _ in 0..MAX_CHAIN {
            match self.get(id)? {
                Some(t) if t.kind.is_modifier() => id = t.size_or_type,
                _ => return Ok(id),
            }
        }
        Err(BtfError::TooDeep {
            type_id: start,
            limit: MAX_CHAIN,
        })
    }

    /// Size in bytes of a type, following modifiers and array element types.
    fn size_of(&self, id: u32) -> Result<u64, BtfError> {
        let start = id;
        let mut id = id;
        let mut factor: u64 = 1;
        for _ in 0..MAX_CHAIN {
            let t = self.get(id)?.ok_or(BtfError::NoSize {
                type_id: id,
                kind: Kind::Void,
            })?;
            let base = match (&t.data, t.kind) {
                (_, k) if k.is_modifier() => {
                    id = t.size_or_type;
                    continue;
                }
                (Data::Array { elem, nelems }, _) => {
                    factor = factor.saturating_mul(u64::from(*nelems));
                    id = *elem;
                    continue;
                }
                (_, Kind::Ptr) => self.pointer_size,
                (
                    _,
                    Kind::Int
                    | Kind::Struct
                    | Kind::Union
                    | Kind::Enum
                    | Kind::Enum64
                    | Kind::Float
                    | Kind::Datasec,
                ) => t.size_or_type,
                (_, kind) => return Err(BtfError::NoSize { type_id: id, kind }),
            };
            return Ok(factor.saturating_mul(u64::from(base)));
        }
        Err(BtfError::TooDeep {
            type_id: start,
            limit: MAX_CHAIN,
        })
    }

    /// The first struct or union with this name (`Fwd` declarations are not candidates).
    fn find_composite(&self, name: &str) -> Option<u32> {
        self.find(NameClass::Composite, name)
    }

    /// Size in bytes of the named struct or union.
    pub fn struct_size(&self, struct_name: &str) -> Result<u32, BtfError> {
        let id = self
            .find_composite(struct_name)
            .ok_or_else(|| BtfError::StructNotFound {
                name: struct_name.to_owned(),
            })?;
        Ok(self.get(id)?.map_or(0, |t| t.size_or_type))
    }

    /// Finds the member `name` of composite `id`, looking through anonymous struct/union
    /// members. Returns its bit offset from the start of `id`, its type and bitfield size
    /// (0 when not a bitfield).
    fn find_in(
        &self,
        id: u32,
        name: &str,
        depth: usize,
        visits: &mut usize,
    ) -> Result<Option<(u64, u32, u32)>, BtfError> {
        if depth > MAX_ANON_DEPTH || *visits > MAX_VISITS {
            return Err(BtfError::TooDeep {
                type_id: id,
                limit: MAX_ANON_DEPTH,
            });
        }
        let Some(t) = self.get(id)? else {
            return Ok(None);
        };
        let Data::Members(members) = &t.data else {
            return Ok(None);
        };
        for m in members {
            *visits += 1;
            let (bit_offset, bits) = if t.kind_flag {
                (u64::from(m.offset & 0x00ff_ffff), m.offset >> 24)
            } else {
                (u64::from(m.offset), 0)
            };
            let member_name = self.name_bytes(m.name_off);
            if member_name == name.as_bytes() {
                return Ok(Some((bit_offset, m.ty, bits)));
            }
            if member_name.is_empty() {
                let inner = self.skip_modifiers(m.ty)?;
                if matches!(self.kind_of(inner)?, Kind::Struct | Kind::Union)
                    && let Some((off, ty, bits)) = self.find_in(inner, name, depth + 1, visits)?
                {
                    return Ok(Some((bit_offset + off, ty, bits)));
                }
            }
        }
        Ok(None)
    }

    /// Old-style bitfields (no `kind_flag`) are INT members whose encoding narrows them.
    fn legacy_bitfield_bits(&self, ty: u32) -> Result<Option<u32>, BtfError> {
        let id = self.skip_modifiers(ty)?;
        if let Some(Type {
            data: Data::Int(enc),
            size_or_type: size,
            ..
        }) = self.get(id)?
        {
            let bits = enc & 0xff;
            let int_offset = (enc >> 16) & 0xff;
            if int_offset != 0 || u64::from(bits) != u64::from(size) * 8 {
                return Ok(Some(bits));
            }
        }
        Ok(None)
    }

    /// Locates `path` (dotted member names, e.g. `"se.sum_exec_runtime"`) inside the struct or
    /// union `struct_name`. Named nested members are descended into explicitly; anonymous
    /// struct/union members are searched transparently at every level. Bitfields are an
    /// error, since cylo-usage reads whole bytes.
    pub fn member(&self, struct_name: &str, path: &str) -> Result<Member, BtfError> {
        self.locate(struct_name, path).map(|(member, _)| member)
    }

    /// The type of the member at `path` (looked up as by [`Btf::member`]): whether it is a
    /// struct (and which), an array (of what), a pointer, ...
    pub fn member_type(&self, struct_name: &str, path: &str) -> Result<TypeInfo, BtfError> {
        let (_, ty) = self.locate(struct_name, path)?;
        self.type_info(ty, 0)
    }

    /// [`Btf::member`], plus the member's type id.
    fn locate(&self, struct_name: &str, path: &str) -> Result<(Member, u32), BtfError> {
        let mut current =
            self.find_composite(struct_name)
                .ok_or_else(|| BtfError::StructNotFound {
                    name: struct_name.to_owned(),
                })?;
        let mut container = format!("{} {struct_name}", self.kind_of(current)?);
        let mut bits_total: u64 = 0;
        let mut last_ty = current;
        let mut components = path.split('.').peekable();
        while let Some(component) = components.next() {
            if component.is_empty() {
                return Err(BtfError::EmptyPathComponent {
                    struct_name: struct_name.to_owned(),
                    path: path.to_owned(),
                });
            }
            let mut visits = 0;
            let (bit_offset, ty, bits) = self.find_in(current, component, 0, &mut visits)?.ok_or(
                BtfError::MemberNotFound {
                    struct_name: struct_name.to_owned(),
                    path: path.to_owned(),
                    component: component.to_owned(),
                    container: container.clone(),
                },
            )?;
            let bits = match bits {
                0 => self.legacy_bitfield_bits(ty)?.unwrap_or(0),
                b => b,
            };
            if bits != 0 {
                return Err(BtfError::Bitfield {
                    struct_name: struct_name.to_owned(),
                    path: path.to_owned(),
                    bit_offset: bits_total + bit_offset,
                    bits,
                });
            }
            if bit_offset % 8 != 0 {
                return Err(BtfError::Unaligned {
                    struct_name: struct_name.to_owned(),
                    path: path.to_owned(),
                    component: component.to_owned(),
                    bit_offset,
                });
            }
            bits_total += bit_offset;
            last_ty = ty;
            if components.peek().is_some() {
                current = self.skip_modifiers(ty)?;
                let kind = self.kind_of(current)?;
                if !matches!(kind, Kind::Struct | Kind::Union) {
                    return Err(BtfError::NotComposite {
                        struct_name: struct_name.to_owned(),
                        path: path.to_owned(),
                        component: component.to_owned(),
                        kind,
                    });
                }
                container = format!("member `{component}` ({kind})");
            }
        }
        let overflow = || BtfError::Overflow {
            context: format!("{struct_name}.{path}"),
        };
        let offset = u32::try_from(bits_total / 8).map_err(|_| overflow())?;
        let size = u32::try_from(self.size_of(last_ty)?).map_err(|_| overflow())?;
        Ok((Member { offset, size }, last_ty))
    }

    /// Describes type `id`; `depth` counts the pointer/array levels already described.
    fn type_info(&self, id: u32, depth: usize) -> Result<TypeInfo, BtfError> {
        if depth > MAX_CHAIN {
            return Err(BtfError::TooDeep {
                type_id: id,
                limit: MAX_CHAIN,
            });
        }
        let id = self.skip_modifiers(id)?;
        let Some(t) = self.get(id)? else {
            return Ok(TypeInfo::Other {
                kind: Kind::Void,
                name: String::new(),
            });
        };
        let name = || String::from_utf8_lossy(self.name_bytes(t.name_off)).into_owned();
        Ok(match (&t.data, t.kind) {
            (&Data::Array { elem, nelems }, _) => {
                let elem_size =
                    u32::try_from(self.size_of(elem)?).map_err(|_| BtfError::Overflow {
                        context: format!("BTF type [{elem}] (array element)"),
                    })?;
                TypeInfo::Array {
                    nelems,
                    elem_size,
                    elem: Box::new(self.type_info(elem, depth + 1)?),
                }
            }
            (_, Kind::Ptr) => TypeInfo::Pointer {
                target: Box::new(self.type_info(t.size_or_type, depth + 1)?),
            },
            (_, kind @ (Kind::Struct | Kind::Union)) => TypeInfo::Composite {
                kind,
                name: name(),
                size: t.size_or_type,
            },
            (_, kind) => TypeInfo::Other { kind, name: name() },
        })
    }

    /// Whether `struct_name` has a member at `path` (true for bitfields too, which
    /// [`Btf::member`] refuses).
    pub fn has_member(&self, struct_name: &str, path: &str) -> bool {
        match self.member(struct_name, path) {
            Ok(_) | Err(BtfError::Bitfield { .. }) => true,
            Err(_) => false,
        }
    }

    /// Number of arguments a raw tracepoint passes to BPF programs, read from the typedef
    /// `btf_trace_<tracepoint>`: a pointer to a FUNC_PROTO whose first parameter is the
    /// `void *__data` of the tracepoint machinery, which is not counted.
    pub fn raw_tracepoint_arg_count(&self, tracepoint: &str) -> Result<usize, BtfError> {
        self.tracepoint_args(tracepoint).map(|args| args.len())
    }

    /// The types of a raw tracepoint's arguments (those [`Btf::raw_tracepoint_arg_count`]
    /// counts), in order.
    pub fn raw_tracepoint_params(&self, tracepoint: &str) -> Result<Vec<TypeInfo>, BtfError> {
        self.tracepoint_args(tracepoint)?
            .iter()
            .map(|&(_, ty)| self.type_info(ty, 0))
            .collect()
    }

    /// The parameter types of kernel function `name` (a BTF `FUNC`), in order: what a
    /// trampoline (fentry/fexit) program attached to it gets as arguments.
    pub fn function_params(&self, name: &str) -> Result<Vec<TypeInfo>, BtfError> {
        let func = self
            .find(NameClass::Func, name)
            .ok_or_else(|| BtfError::FunctionNotFound {
                name: name.to_owned(),
            })?;
        let func = self.get(func)?.ok_or_else(|| BtfError::FunctionNotFound {
            name: name.to_owned(),
        })?;
        let proto = self.skip_modifiers(func.size_or_type)?;
        let Some(Type {
            data: Data::Params(params),
            ..
        }) = self.get(proto)?
        else {
            return Err(BtfError::NotFunctionProto {
                name: name.to_owned(),
                kind: self.kind_of(proto)?,
            });
        };
        params
            .iter()
            .map(|&(_, ty)| self.type_info(ty, 0))
            .collect()
    }

    /// The (name, type) parameters of `btf_trace_<tracepoint>` after `void *__data`.
    fn tracepoint_args(&self, tracepoint: &str) -> Result<Vec<(u32, u32)>, BtfError> {
        let wanted = format!("btf_trace_{tracepoint}");
        let not_found = || BtfError::TracepointNotFound {
            tracepoint: tracepoint.to_owned(),
        };
        let typedef = self
            .find(NameClass::Typedef, &wanted)
            .ok_or_else(not_found)?;
        let typedef = self.get(typedef)?.ok_or_else(not_found)?;
        let not_proto = |kind| BtfError::NotTracepointProto {
            tracepoint: tracepoint.to_owned(),
            kind,
        };
        let ptr = self.skip_modifiers(typedef.size_or_type)?;
        let ptr_t = match self.get(ptr)? {
            Some(t) if t.kind == Kind::Ptr => t,
            other => return Err(not_proto(other.map_or(Kind::Void, |t| t.kind))),
        };
        let proto = self.skip_modifiers(ptr_t.size_or_type)?;
        let Some(Type {
            data: Data::Params(params),
            ..
        }) = self.get(proto)?
        else {
            return Err(not_proto(self.kind_of(proto)?));
        };
        // A trailing (0, 0) parameter marks a variadic prototype; it is not an argument.
        let params = match params.split_last() {
            Some((&(0, 0), rest)) => rest,
            _ => &params[..],
        };
        match params.split_first() {
            Some((&(_, data), args)) if self.kind_of(self.skip_modifiers(data)?)? == Kind::Ptr => {
                Ok(args.to_vec())
            }
            _ => Err(BtfError::NoDataParam {
                tracepoint: tracepoint.to_owned(),
            }),
        }
    }
}

/// Builds small BTF blobs for tests.
#[cfg(test)]
pub(crate) mod testutil {
    pub(crate) const INT: u32 = 1;
    pub(crate) const PTR: u32 = 2;
    pub(crate) const ARRAY: u32 = 3;
    pub(crate) const STRUCT: u32 = 4;
    pub(crate) const UNION: u32 = 5;
    pub(crate) const FWD: u32 = 7;
    pub(crate) const TYPEDEF: u32 = 8;
    pub(crate) const VOLATILE: u32 = 9;
    pub(crate) const CONST: u32 = 10;
    pub(crate) const FUNC: u32 = 12;
    pub(crate) const FUNC_PROTO: u32 = 13;

    /// Appends types in id order (the first is id 1) and serializes a little-endian blob.
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        pub(crate) fn new() -> Builder {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        pub(crate) fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        /// Any type: name, kind, vlen, kind_flag, size-or-type word, then kind-specific words.
        pub(crate) fn raw(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            kind_flag: bool,
            st: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.str(name);
            let info = (u32::from(kind_flag) << 31) | (kind << 24) | vlen;
            for w in [name_off, info, st].iter().chain(extra) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }

        pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
            self.raw(name, INT, 0, false, size, &[size * 8])
        }

        pub(crate) fn ptr(&mut self, target: u32) -> u32 {
            self.raw("", PTR, 0, false, target, &[])
        }

        pub(crate) fn typedef(&mut self, name: &str, target: u32) -> u32 {
            self.raw(name, TYPEDEF, 0, false, target, &[])
        }

        pub(crate) fn array(&mut self, elem: u32, index: u32, nelems: u32) -> u32 {
            self.raw("", ARRAY, 0, false, 0, &[elem, index, nelems])
        }

        /// Members are (name, type, byte offset).
        pub(crate) fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(n, ty, off) in members {
                extra.extend([self.str(n), ty, off * 8]);
            }
            self.raw(name, kind, members.len() as u32, false, size, &extra)
        }

        /// `typedef void (*btf_trace_<tp>)(params...)`.
        pub(crate) fn tracepoint(&mut self, tp: &str, params: &[u32]) -> u32 {
            let mut extra = Vec::new();
            for &ty in params {
                extra.extend([0, ty]);
            }
            let proto = self.raw("", FUNC_PROTO, params.len() as u32, false, 0, &extra);
            let ptr = self.ptr(proto);
            self.typedef(&format!("btf_trace_{tp}"), ptr)
        }

        /// A kernel function `name(params...)` returning `ret` (a FUNC and its FUNC_PROTO).
        pub(crate) fn function(&mut self, name: &str, ret: u32, params: &[u32]) -> u32 {
            let mut extra = Vec::new();
            for &ty in params {
                extra.extend([0, ty]);
            }
            let proto = self.raw("", FUNC_PROTO, params.len() as u32, false, ret, &extra);
            self.raw(name, FUNC, 0, false, proto, &[])
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            for w in [0xeb9f_u16.to_le_bytes(), [1, 0]] {
                out.extend_from_slice(&w);
            }
            let type_len = self.types.len() as u32;
            for w in [24, 0, type_len, type_len, self.strings.len() as u32] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/btf")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    const FIXTURES: [&str; 4] = [
        "debian-5.10.btf",
        "debian-6.1.btf",
        "debian-6.12.btf",
        "host-6.18.btf",
    ];

    fn m(offset: u32, size: u32) -> Member {
        Member { offset, size }
    }

    type Case = (&'static str, [(&'static str, &'static str, Member); 11]);

    /// Expected values come from `gcc` `offsetof`/`sizeof` over `bpftool btf dump format c`
    /// of each kernel's full (not minimized) BTF; see tests/fixtures/btf/README.md.
    #[test]
    fn fixture_members() {
        #[rustfmt::skip]
        let cases: [Case; 4] = [
            ("debian-5.10.btf", [
                ("task_struct", "pid", m(2232, 4)), ("task_struct", "tgid", m(2236, 4)),
                ("task_struct", "signal", m(2832, 8)), ("task_struct", "start_boottime", m(2544, 8)),
                ("task_struct", "se.sum_exec_runtime", m(200, 8)), ("task_struct", "utime", m(2472, 8)),
                ("task_struct", "stime", m(2480, 8)), ("task_struct", "state", m(16, 8)),
                ("task_struct", "ioac.read_bytes", m(3128, 8)), ("task_struct", "mm", m(2056, 8)),
                ("mm_struct", "hiwater_rss", m(176, 8)),
            ]),
            ("debian-6.1.btf", [
                ("task_struct", "pid", m(2416, 4)), ("task_struct", "tgid", m(2420, 4)),
                ("task_struct", "signal", m(3072, 8)), ("task_struct", "start_boottime", m(2784, 8)),
                ("task_struct", "se.sum_exec_runtime", m(200, 8)), ("task_struct", "utime", m(2656, 8)),
                ("task_struct", "stime", m(2664, 8)), ("task_struct", "__state", m(24, 4)),
                ("task_struct", "ioac.read_bytes", m(3400, 8)), ("task_struct", "mm", m(2272, 8)),
                ("mm_struct", "hiwater_rss", m(176, 8)),
            ]),
            ("debian-6.12.btf", [
                ("task_struct", "pid", m(2432, 4)), ("task_struct", "tgid", m(2436, 4)),
                ("task_struct", "signal", m(3072, 8)), ("task_struct", "start_boottime", m(2784, 8)),
                ("task_struct", "se.sum_exec_runtime", m(224, 8)), ("task_struct", "utime", m(2656, 8)),
                ("task_struct", "stime", m(2664, 8)), ("task_struct", "__state", m(24, 4)),
                ("task_struct", "ioac.read_bytes", m(3392, 8)), ("task_struct", "mm", m(2304, 8)),
                ("mm_struct", "hiwater_rss", m(240, 8)),
            ]),
            ("host-6.18.btf", [
                ("task_struct", "pid", m(1264, 4)), ("task_struct", "tgid", m(1268, 4)),
                ("task_struct", "signal", m(1848, 8)), ("task_struct", "start_boottime", m(1560, 8)),
                ("task_struct", "se.sum_exec_runtime", m(232, 8)), ("task_struct", "utime", m(1488, 8)),
                ("task_struct", "stime", m(1496, 8)), ("task_struct", "__state", m(24, 4)),
                ("task_struct", "ioac.read_bytes", m(2184, 8)), ("task_struct", "mm", m(1136, 8)),
                ("mm_struct", "hiwater_rss", m(344, 8)),
            ]),
        ];
        let sizes = [9344, 9728, 9792, 3264];
        for ((file, members), size) in cases.iter().zip(sizes) {
            let btf = Btf::from_bytes(&fixture(file)).unwrap();
            for (strukt, path, want) in members {
                let got = btf
                    .member(strukt, path)
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
                assert_eq!(got, *want, "{file}: {strukt}.{path}");
                assert!(btf.has_member(strukt, path));
            }
            assert_eq!(btf.struct_size("task_struct").unwrap(), size, "{file}");
        }
    }

    /// The reference reader: every type decoded up front, in one loop over the type section,
    /// as this module did before it read lazily. Layout errors are not its concern (the
    /// blobs it reads are the valid fixtures and the host's BTF).
    fn parse_all(btf: &Btf) -> Vec<Type> {
        let r = btf.types();
        let mut types = Vec::new();
        let mut pos = 0;
        while pos < r.bytes.len() {
            let u = |at: usize| r.u32(at, "test").unwrap();
            let (name_off, info, size_or_type) = (u(pos), u(pos + 4), u(pos + 8));
            let kind = Kind::from_raw((info >> 24) & 0x1f).unwrap();
            let vlen = (info & 0xffff) as usize;
            pos += 12;
            let data = match kind {
                Kind::Int => Data::Int(u(pos)),
                Kind::Array => Data::Array {
                    elem: u(pos),
                    nelems: u(pos + 8),
                },
                Kind::Struct | Kind::Union => Data::Members(
                    (0..vlen)
                        .map(|i| RawMember {
                            name_off: u(pos + 12 * i),
                            ty: u(pos + 12 * i + 4),
                            offset: u(pos + 12 * i + 8),
                        })
                        .collect(),
                ),
                Kind::FuncProto => Data::Params(
                    (0..vlen)
                        .map(|i| (u(pos + 8 * i), u(pos + 8 * i + 4)))
                        .collect(),
                ),
                _ => Data::None,
            };
            pos += match kind {
                Kind::Int | Kind::Var | Kind::DeclTag => 4,
                Kind::Array => 12,
                Kind::Struct | Kind::Union | Kind::Enum64 | Kind::Datasec => 12 * vlen,
                Kind::FuncProto | Kind::Enum => 8 * vlen,
                _ => 0,
            };
            types.push(Type {
                name_off,
                kind,
                kind_flag: info >> 31 == 1,
                size_or_type,
                data,
            });
        }
        types
    }

    /// The lazy decoding of every type equals the reference reader's, and the one pass finds
    /// names (struct, union, typedef, function) where a scan of all types finds them first:
    /// every name of the blob, or about `sample` of each class.
    fn agrees_with_the_full_parse(what: &str, data: &[u8], sample: usize) {
        let plain = Btf::from_bytes(data).unwrap();
        let full = parse_all(&plain);
        assert_eq!(plain.type_count(), full.len(), "{what}");
        for (i, want) in full.iter().enumerate() {
            let got = plain.get(i as u32 + 1).unwrap().unwrap();
            assert_eq!(&got, want, "{what}: type [{}]", i + 1);
        }
        // Every name of a class with the first id that has it, in id order.
        let mut seen = std::collections::HashSet::new();
        let mut first: Vec<(NameClass, String, u32)> = Vec::new();
        for (i, t) in full.iter().enumerate() {
            let Some(class) = NameClass::of(t.kind) else {
                continue;
            };
            let name = String::from_utf8(plain.name_bytes(t.name_off).to_vec()).unwrap();
            if !name.is_empty() && seen.insert((class, name.clone())) {
                first.push((class, name, i as u32 + 1));
            }
        }
        let mut picked: Vec<(NameClass, String, u32)> = Vec::new();
        for class in [NameClass::Composite, NameClass::Typedef, NameClass::Func] {
            let of_class: Vec<_> = first.iter().filter(|(c, ..)| *c == class).collect();
            let step = (of_class.len() / sample).max(1);
            picked.extend(of_class.into_iter().step_by(step).cloned());
        }
        // The tracepoint typedefs only (the others are not lookups the reader offers).
        picked.retain(|(c, n, _)| *c != NameClass::Typedef || n.starts_with("btf_trace_"));
        let names = |class| {
            picked
                .iter()
                .filter(move |(c, ..)| *c == class)
                .map(|(_, n, _)| n.as_str())
        };
        let composites: Vec<&str> = names(NameClass::Composite).collect();
        let tracepoints: Vec<&str> = names(NameClass::Typedef)
            .filter_map(|n| n.strip_prefix("btf_trace_"))
            .collect();
        let functions: Vec<&str> = names(NameClass::Func).collect();
        assert!(!composites.is_empty() && !tracepoints.is_empty() && !functions.is_empty());
        let wanted = Wanted {
            composites: &composites,
            tracepoints: &tracepoints,
            functions: &functions,
        };
        let targeted = Btf::from_bytes_wanting(data, &wanted).unwrap();
        for (class, name, id) in &picked {
            assert_eq!(targeted.find(*class, name), Some(*id), "{what}: {name}");
            assert_eq!(plain.find(*class, name), Some(*id), "{what}: {name}");
        }
        assert_eq!(targeted.scans(), 0, "{what}: a wanted name was scanned for");
        assert_eq!(plain.scans(), picked.len(), "{what}");
        assert_eq!(targeted.find(NameClass::Composite, "no such struct"), None);
        assert_eq!(targeted.scans(), 1);
        assert_eq!(targeted.pointer_size, plain.pointer_size);
    }

    #[test]
    fn targeted_reading_agrees_with_the_full_parse() {
        for file in FIXTURES {
            agrees_with_the_full_parse(file, &fixture(file), usize::MAX);
        }
    }

    /// The same on the host's complete kernel BTF (about 126,000 types on 6.18).
    #[test]
    fn targeted_reading_agrees_with_the_full_parse_of_the_host() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        match std::fs::read(path) {
            Ok(data) => agrees_with_the_full_parse("host vmlinux", &data, 100),
            Err(e) => eprintln!("skipping: {}: {e}", path.display()),
        }
    }

    /// Only sysfs is mapped; other files are read (and resolve the same).
    #[test]
    fn regular_files_are_read_not_mapped() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/btf/host-6.18.btf");
        let btf = Btf::from_file(&path).unwrap();
        assert!(!btf.is_mapped());
        assert_eq!(
            btf.type_count(),
            Btf::from_bytes(&fixture("host-6.18.btf"))
                .unwrap()
                .type_count()
        );
    }

    #[test]
    fn state_member_is_renamed_in_5_14() {
        let old = Btf::from_bytes(&fixture("debian-5.10.btf")).unwrap();
        assert!(old.has_member("task_struct", "state"));
        assert!(!old.has_member("task_struct", "__state"));
        for file in &FIXTURES[1..] {
            let new = Btf::from_bytes(&fixture(file)).unwrap();
            assert!(new.has_member("task_struct", "__state"), "{file}");
            assert!(!new.has_member("task_struct", "state"), "{file}");
        }
    }

    #[test]
    fn fixture_tracepoint_arg_counts() {
        // (sched_switch, task_newtask, sched_process_exit, sched_process_fork, sched_process_exec,
        //  rss_stat, block_bio_queue)
        let want = [
            [3, 2, 1, 2, 3, 3, 2], // 5.10: no prev_state; block_bio_queue(q, bio)
            [4, 2, 1, 2, 3, 3, 1], // 6.1: prev_state since 5.18; block_bio_queue(bio) since 5.11
            [4, 2, 1, 2, 3, 2, 1], // 6.12: rss_stat lost its count in 6.2
            [4, 2, 2, 2, 3, 2, 1], // 6.18: sched_process_exit got group_dead
        ];
        let tps = [
            "sched_switch",
            "task_newtask",
            "sched_process_exit",
            "sched_process_fork",
            "sched_process_exec",
            "rss_stat",
            "block_bio_queue",
        ];
        for (file, want) in FIXTURES.iter().zip(want) {
            let btf = Btf::from_bytes(&fixture(file)).unwrap();
            for (tp, n) in tps.iter().zip(want) {
                assert_eq!(btf.raw_tracepoint_arg_count(tp).unwrap(), n, "{file}: {tp}");
            }
            assert!(matches!(
                btf.raw_tracepoint_arg_count("no_such_tp"),
                Err(BtfError::TracepointNotFound { .. })
            ));
        }
    }

    fn ptr_to(kind: Kind, name: &str) -> TypeInfo {
        let name = name.to_owned();
        let target = match kind {
            Kind::Struct | Kind::Union => TypeInfo::Composite {
                kind,
                name,
                size: 0,
            },
            _ => TypeInfo::Other { kind, name },
        };
        TypeInfo::Pointer {
            target: Box::new(target),
        }
    }

    /// Checked against the same `bpftool btf dump format c` output as `fixture_members`.
    #[test]
    fn fixture_member_types() {
        // 5.10 and 6.1: struct mm_rss_stat { atomic_long_t count[4]; } rss_stat;
        for file in &FIXTURES[..2] {
            let btf = Btf::from_bytes(&fixture(file)).unwrap();
            let got = btf.member_type("mm_struct", "rss_stat").unwrap();
            let want = TypeInfo::Composite {
                kind: Kind::Struct,
                name: "mm_rss_stat".into(),
                size: 32,
            };
            assert_eq!(got, want, "{file}");
            let got = btf.member_type("mm_struct", "rss_stat.count").unwrap();
            assert!(
                matches!(
                    got,
                    TypeInfo::Array { nelems: 4, elem_size: 8, ref elem }
                        if matches!(**elem, TypeInfo::Composite { kind: Kind::Struct, size: 8, .. })
                ),
                "{file}: {got:?}"
            );
        }
        // 6.12 and 6.18: struct percpu_counter rss_stat[4];
        for file in &FIXTURES[2..] {
            let btf = Btf::from_bytes(&fixture(file)).unwrap();
            let want = TypeInfo::Array {
                nelems: 4,
                elem_size: 40,
                elem: Box::new(TypeInfo::Composite {
                    kind: Kind::Struct,
                    name: "percpu_counter".into(),
                    size: 40,
                }),
            };
            assert_eq!(btf.member_type("mm_struct", "rss_stat").unwrap(), want);
            assert_eq!(btf.member("percpu_counter", "count").unwrap(), m(8, 8));
        }
        for file in FIXTURES {
            let btf = Btf::from_bytes(&fixture(file)).unwrap();
            let mm = btf.member_type("task_struct", "mm").unwrap();
            assert!(mm.is_pointer_to_struct("mm_struct"), "{file}: {mm:?}");
            let pid = btf.member_type("task_struct", "pid").unwrap();
            assert_eq!(
                pid,
                TypeInfo::Other {
                    kind: Kind::Int,
                    name: "int".into()
                },
                "{file}: typedef pid_t is followed"
            );
            assert!(!pid.is_pointer_to_struct("int"));
        }
    }

    #[test]
    fn fixture_tracepoint_params() {
        let bio = |btf: &Btf| {
            btf.raw_tracepoint_params("block_bio_queue")
                .unwrap()
                .iter()
                .map(|p| p.is_pointer_to_struct("bio"))
                .collect::<Vec<_>>()
        };
        let old = Btf::from_bytes(&fixture("debian-5.10.btf")).unwrap();
        let params = old.raw_tracepoint_params("block_bio_queue").unwrap();
        // request_queue is not kept by the minimizer: a forward declaration stands for it.
        assert!(
            params[0].is_pointer_to_struct("request_queue"),
            "{params:?}"
        );
        assert_eq!(params[0], ptr_to(Kind::Fwd, "request_queue"));
        assert_eq!(bio(&old), [false, true]);
        for file in &FIXTURES[1..] {
            let btf = Btf::from_bytes(&fixture(file)).unwrap();
            assert_eq!(bio(&btf), [true], "{file}");
        }
        for file in FIXTURES {
            let btf = Btf::from_bytes(&fixture(file)).unwrap();
            let params = btf.raw_tracepoint_params("rss_stat").unwrap();
            assert!(params[0].is_pointer_to_struct("mm_struct"), "{file}");
            assert_eq!(
                params.len(),
                btf.raw_tracepoint_arg_count("rss_stat").unwrap()
            );
        }
    }

    #[test]
    fn fixture_function_params() {
        // The network fallback's fexit targets, by (kernel, function): its parameter count
        // and whether the first is a `struct socket *` (else a `struct sock *`).
        let sendmsg = ["inet_sendmsg", "inet6_sendmsg", "unix_seqpacket_sendmsg"];
        let recvmsg = [
            "inet_recvmsg",
            "unix_dgram_recvmsg",
            "unix_seqpacket_recvmsg",
        ];
        for file in FIXTURES {
            let btf = Btf::from_bytes(&fixture(file)).unwrap();
            for (names, count) in [(&sendmsg, 3), (&recvmsg, 4)] {
                for name in names {
                    let params = btf.function_params(name).unwrap();
                    assert_eq!(params.len(), count, "{file}: {name}");
                    assert!(params[0].is_pointer_to_struct("socket"), "{file}: {name}");
                }
            }
            let sendpage = btf.function_params("tcp_sendpage");
            if file.contains("5.10") || file.contains("6.1.") {
                let params = sendpage.unwrap();
                assert_eq!(params.len(), 5, "{file}");
                assert!(params[0].is_pointer_to_struct("sock"), "{file}");
            } else {
                assert!(
                    matches!(&sendpage, Err(BtfError::FunctionNotFound { name }) if name == "tcp_sendpage"),
                    "{file}: {sendpage:?}"
                );
            }
            // A typedef or struct of that name is not a function.
            assert!(matches!(
                btf.function_params("task_struct"),
                Err(BtfError::FunctionNotFound { .. })
            ));
        }
    }

    #[test]
    fn function_params_of_a_synthetic_kernel() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let s = b.composite(STRUCT, "socket", 8, &[("sk", int, 0)]);
        let p = b.ptr(s);
        b.function("f", int, &[p, int]);
        b.function("none", int, &[]);
        // A FUNC whose type is not a prototype.
        b.raw("bad", FUNC, 0, false, int, &[]);
        let btf = Btf::from_bytes(&b.build()).unwrap();
        let params = btf.function_params("f").unwrap();
        assert_eq!(params.len(), 2);
        assert!(params[0].is_pointer_to_struct("socket"));
        assert_eq!(btf.function_params("none").unwrap(), vec![]);
        let e = btf.function_params("bad").unwrap_err();
        assert!(
            matches!(&e, BtfError::NotFunctionProto { name, kind: Kind::Int } if name == "bad"),
            "{e}"
        );
        assert!(e.to_string().contains("bad"), "{e}");
    }

    #[test]
    fn type_info_shapes() {
        let mut b = Builder::new();
        let u32_ = b.int("unsigned int", 4); // 1
        let td = b.typedef("u32", u32_); // 2
        let cst = b.raw("", CONST, 0, false, td, &[]); // 3
        let inner = b.array(cst, u32_, 3); // 4: u32[3]
        let outer = b.array(inner, u32_, 2); // 5: u32[2][3]
        let fwd = b.raw("opaque", FWD, 0, false, 0, &[]); // 6
        let fwd_ptr = b.ptr(fwd); // 7
        let un = b.composite(UNION, "un", 4, &[("x", u32_, 0)]); // 8
        let un_ptr = b.ptr(un); // 9
        let void_ptr = b.ptr(0); // 10
        let self_ptr = b.ptr(11); // 11: a pointer to itself
        b.composite(
            STRUCT,
            "s",
            64,
            &[
                ("grid", outer, 0),
                ("opaque", fwd_ptr, 24),
                ("un", un_ptr, 32),
                ("any", void_ptr, 40),
                ("loop", self_ptr, 48),
            ],
        );
        b.tracepoint("tp", &[void_ptr, fwd_ptr, un_ptr, 0]);
        let btf = Btf::from_bytes(&b.build()).unwrap();
        let uint = TypeInfo::Other {
            kind: Kind::Int,
            name: "unsigned int".into(),
        };
        let row = TypeInfo::Array {
            nelems: 3,
            elem_size: 4,
            elem: Box::new(uint),
        };
        let grid = TypeInfo::Array {
            nelems: 2,
            elem_size: 12,
            elem: Box::new(row),
        };
        assert_eq!(btf.member_type("s", "grid").unwrap(), grid);
        let opaque = btf.member_type("s", "opaque").unwrap();
        assert_eq!(opaque, ptr_to(Kind::Fwd, "opaque"));
        assert!(opaque.is_pointer_to_struct("opaque"));
        assert!(!opaque.is_pointer_to_struct("other"));
        let un = btf.member_type("s", "un").unwrap();
        assert_eq!(
            un,
            TypeInfo::Pointer {
                target: Box::new(TypeInfo::Composite {
                    kind: Kind::Union,
                    name: "un".into(),
                    size: 4
                })
            }
        );
        assert!(!un.is_pointer_to_struct("un"), "a union is not a struct");
        assert_eq!(btf.member_type("s", "any").unwrap(), ptr_to(Kind::Void, ""));
        assert!(matches!(
            btf.member_type("s", "loop"),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(matches!(
            btf.member_type("s", "nope"),
            Err(BtfError::MemberNotFound { .. })
        ));
        // The variadic marker is not a parameter.
        let params = btf.raw_tracepoint_params("tp").unwrap();
        assert_eq!(params.len(), 2);
        assert_eq!(params[0], ptr_to(Kind::Fwd, "opaque"));
    }

    #[test]
    fn lookup_errors_carry_context() {
        let btf = Btf::from_bytes(&fixture("host-6.18.btf")).unwrap();
        let e = btf.member("task_struct", "se.nope").unwrap_err();
        assert!(
            matches!(&e, BtfError::MemberNotFound { component, .. } if component == "nope"),
            "{e}"
        );
        assert!(e.to_string().contains("task_struct.se.nope"), "{e}");
        let e = btf.member("task_struct", "pid.x").unwrap_err();
        assert!(
            matches!(
                e,
                BtfError::NotComposite {
                    kind: Kind::Typedef | Kind::Int,
                    ..
                }
            ),
            "{e}"
        );
        let e = btf.member("no_such_struct", "x").unwrap_err();
        assert!(matches!(e, BtfError::StructNotFound { .. }), "{e}");
        let e = btf.member("task_struct", "se..x").unwrap_err();
        assert!(matches!(e, BtfError::EmptyPathComponent { .. }), "{e}");
        let e = Btf::from_file(Path::new("/nonexistent/btf")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/btf"), "{e}");
    }

    /// Anonymous structs and unions at several levels, typedef/const/volatile chains, arrays.
    #[test]
    fn anonymous_members_and_chains() {
        let mut b = Builder::new();
        let u32_ = b.int("unsigned int", 4); // 1
        let u64_ = b.int("long long unsigned int", 8); // 2
        let td = b.typedef("u64", u64_); // 3
        let vol = b.raw("", VOLATILE, 0, false, td, &[]); // 4
        let cst = b.raw("", CONST, 0, false, vol, &[]); // 5
        let arr = b.array(u32_, u32_, 6); // 6: u32[6]
        let inner = b.composite(STRUCT, "", 16, &[("deep", cst, 0), ("arr_lo", u32_, 8)]); // 7
        let un = b.composite(UNION, "", 24, &[("", inner, 0), ("arr", arr, 0)]); // 8
        let named = b.composite(STRUCT, "nested", 32, &[("x", u32_, 0), ("", un, 8)]); // 9
        let top = b.composite(STRUCT, "top", 48, &[("a", u32_, 0), ("n", named, 16)]);
        assert_eq!(top, 10);
        let btf = Btf::from_bytes(&b.build()).unwrap();
        assert_eq!(btf.member("top", "a").unwrap(), m(0, 4));
        assert_eq!(btf.member("top", "n").unwrap(), m(16, 32));
        assert_eq!(btf.member("top", "n.deep").unwrap(), m(24, 8));
        assert_eq!(btf.member("top", "n.arr_lo").unwrap(), m(32, 4));
        assert_eq!(btf.member("top", "n.arr").unwrap(), m(24, 24));
        assert_eq!(btf.member("nested", "deep").unwrap(), m(8, 8));
        assert!(!btf.has_member("top", "deep"), "anonymous only below `n`");
    }

    #[test]
    fn bitfields_are_refused() {
        let mut b = Builder::new();
        let u32_ = b.int("unsigned int", 4);
        // kind_flag style: bitfield size << 24 | bit offset.
        let words = [
            b.str("flag"),
            u32_,
            (3 << 24) | 32,
            b.str("whole"),
            u32_,
            64,
        ];
        b.raw("kf", STRUCT, 2, true, 12, &words);
        // Legacy style: an INT narrowed to 3 bits.
        let narrow = b.raw("", INT, 0, false, 4, &[3]);
        b.composite(STRUCT, "legacy", 4, &[("flag", narrow, 0)]);
        let btf = Btf::from_bytes(&b.build()).unwrap();
        let e = btf.member("kf", "flag").unwrap_err();
        assert!(
            matches!(
                e,
                BtfError::Bitfield {
                    bits: 3,
                    bit_offset: 32,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(btf.member("kf", "whole").unwrap(), m(8, 4));
        assert!(matches!(
            btf.member("legacy", "flag"),
            Err(BtfError::Bitfield { bits: 3, .. })
        ));
        assert!(btf.has_member("legacy", "flag"));
    }

    #[test]
    fn cycles_are_bounded() {
        let mut b = Builder::new();
        // 1 -> 2 -> 1: a typedef loop.
        b.typedef("a", 2);
        b.typedef("b", 1);
        // 3: a struct whose anonymous members are itself, twice (exponential if unbounded).
        let s = b.composite(STRUCT, "selfish", 8, &[("", 3, 0), ("", 3, 0), ("t", 1, 0)]);
        assert_eq!(s, 3);
        b.composite(STRUCT, "loopy", 8, &[("t", 1, 0)]); // 4
        b.array(5, 1, 2); // 5: an array of itself
        b.composite(STRUCT, "arr", 8, &[("a", 5, 0)]); // 6
        b.tracepoint("loop", &[1]);
        let btf = Btf::from_bytes(&b.build()).unwrap();
        assert!(matches!(
            btf.member("selfish", "nope"),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(matches!(
            btf.member("loopy", "t"),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(matches!(
            btf.member("arr", "a"),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(btf.raw_tracepoint_arg_count("loop").is_err());
    }

    #[test]
    fn tracepoint_shapes() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let void_ptr = b.ptr(0);
        b.tracepoint("ok", &[void_ptr, int, int]);
        b.tracepoint("variadic", &[void_ptr, int, 0]);
        b.tracepoint("no_data", &[]);
        b.tracepoint("int_data", &[int]);
        b.typedef("btf_trace_not_ptr", int);
        let btf = Btf::from_bytes(&b.build()).unwrap();
        assert_eq!(btf.raw_tracepoint_arg_count("ok").unwrap(), 2);
        assert_eq!(btf.raw_tracepoint_arg_count("variadic").unwrap(), 1);
        assert!(matches!(
            btf.raw_tracepoint_arg_count("no_data"),
            Err(BtfError::NoDataParam { .. })
        ));
        assert!(matches!(
            btf.raw_tracepoint_arg_count("int_data"),
            Err(BtfError::NoDataParam { .. })
        ));
        assert!(matches!(
            btf.raw_tracepoint_arg_count("not_ptr"),
            Err(BtfError::NotTracepointProto {
                kind: Kind::Int,
                ..
            })
        ));
    }

    #[test]
    fn big_endian_blobs_parse() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.composite(STRUCT, "s", 8, &[("x", int, 4)]);
        let le = b.build();
        // Byte-swap every 32-bit word of header and types (the string section is bytes).
        let mut be = le.clone();
        be[0..2].copy_from_slice(&0xeb9f_u16.to_be_bytes());
        let types_end = 24 + u32::from_le_bytes(le[12..16].try_into().unwrap()) as usize;
        for i in (4..types_end).step_by(4) {
            be[i..i + 4].reverse();
        }
        let btf = Btf::from_bytes(&be).unwrap();
        assert_eq!(btf.member("s", "x").unwrap(), m(4, 4));
    }

    #[test]
    fn header_errors() {
        let good = fixture("debian-6.1.btf");
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(matches!(
            Btf::from_bytes(&bad),
            Err(BtfError::BadMagic { .. })
        ));
        let mut bad = good.clone();
        bad[2] = 2;
        assert!(matches!(
            Btf::from_bytes(&bad),
            Err(BtfError::UnsupportedVersion { version: 2 })
        ));
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(
            Btf::from_bytes(&bad),
            Err(BtfError::BadHeader { .. })
        ));
        let mut bad = good.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Btf::from_bytes(&bad),
            Err(BtfError::Truncated { .. })
        ));
        assert!(matches!(
            Btf::from_bytes(&[]),
            Err(BtfError::Truncated { .. })
        ));
    }

    /// Exercises every query on whatever parsed; must not panic.
    fn poke(btf: &Btf) {
        for path in [
            "pid",
            "se.sum_exec_runtime",
            "ioac.read_bytes",
            "__state",
            "state",
        ] {
            let _ = btf.member("task_struct", path);
            let _ = btf.has_member("task_struct", path);
        }
        let _ = btf.member("mm_struct", "hiwater_rss");
        let _ = btf.member_type("mm_struct", "rss_stat");
        let _ = btf.member_type("task_struct", "mm");
        let _ = btf.struct_size("task_struct");
        let _ = btf.raw_tracepoint_arg_count("sched_switch");
        let _ = btf.raw_tracepoint_params("block_bio_queue");
    }

    #[test]
    fn truncated_input_is_an_error() {
        let good = fixture("debian-5.10.btf");
        for len in 0..good.len() {
            // Cut without fixing the header: always out of bounds.
            assert!(Btf::from_bytes(&good[..len]).is_err(), "len {len}");
            // Cut and shrink the string section accordingly: may parse, must not panic.
            let mut cut = good[..len].to_vec();
            if len >= 24 {
                let str_len = u32::from_le_bytes(good[20..24].try_into().unwrap());
                let short = (good.len() - len) as u32;
                cut[20..24].copy_from_slice(&str_len.saturating_sub(short).to_le_bytes());
                if let Ok(btf) = Btf::from_bytes(&cut) {
                    poke(&btf);
                }
            }
        }
    }

    #[test]
    fn corrupt_input_never_panics() {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for file in FIXTURES {
            let good = fixture(file);
            let mut parsed = 0;
            for _ in 0..400 {
                let mut bad = good.clone();
                for _ in 0..(next() % 8 + 1) {
                    let i = (next() % bad.len() as u64) as usize;
                    // Bias towards the type section's words, where most structure is.
                    bad[i] = match next() % 4 {
                        0 => 0,
                        1 => 0xff,
                        _ => next() as u8,
                    };
                }
                if let Ok(btf) = Btf::from_bytes(&bad) {
                    parsed += 1;
                    poke(&btf);
                }
            }
            assert!(
                parsed > 0,
                "{file}: fuzzing should sometimes keep the blob valid"
            );
        }
    }
}
