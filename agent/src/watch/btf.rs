//! A minimal reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): just
//! enough to find struct member offsets and sizes, so the eBPF program can
//! be told where `task_struct.files` and friends are on *this* kernel, and
//! which tracepoints the kernel has with which arguments. (Hand-written:
//! aya's BTF API does not expose members, and its full parse costs tens of
//! MB of memory; `btf-rs` is LGPL.)
//!
//! Format (Documentation/bpf/btf.rst): a header, a type section of
//! variable-length records, a string section. Only structs, unions and the
//! types a member's size resolves through are interpreted; every other kind
//! is skipped by its known record length.

use std::fmt;

const MAGIC: u16 = 0xeb9f;

// Kinds (btf.h).
const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const FWD: u32 = 7;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC: u32 = 12;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const FLOAT: u32 = 16;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

#[derive(Debug)]
pub struct BtfError(String);

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BtfError {}

fn err(msg: impl Into<String>) -> BtfError {
    BtfError(msg.into())
}

/// Parsed type index over the raw BTF bytes.
pub struct Btf {
    data: Vec<u8>,
    /// Byte offset of type id `i` (index 0 = id 1) in `data`.
    types: Vec<usize>,
    strings: usize,
    strings_len: usize,
}

/// A member found by [`Btf::member`]: byte offset within its struct and
/// byte size of its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub offset: u32,
    pub size: u32,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|e| err(format!("{path}: {e}")))?;
        Btf::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if u16_at(0) != Some(MAGIC) {
            return Err(err("not BTF (bad magic, or big-endian)"));
        }
        let word = |o: usize| -> Result<usize, BtfError> {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or_else(|| err("truncated header"))
        };
        let hdr_len = word(4)?;
        let (type_off, type_len) = (word(8)?, word(12)?);
        let (str_off, str_len) = (word(16)?, word(20)?);
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = hdr_len + str_off;
        if types_end > data.len() || strings + str_len > data.len() {
            return Err(err("sections run past the end"));
        }
        let mut btf = Btf {
            data,
            types: Vec::new(),
            strings,
            strings_len: str_len,
        };
        let mut at = types_start;
        while at < types_end {
            btf.types.push(at);
            let info = btf.u32_at(at + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let extra = match kind {
                INT | VAR | DECL_TAG => 4,
                PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
                ARRAY => 12,
                STRUCT | UNION | DATASEC | ENUM64 => 12 * vlen,
                ENUM | FUNC_PROTO => 8 * vlen,
                k => return Err(err(format!("unknown BTF kind {k}"))),
            };
            at += 12 + extra;
        }
        if at != types_end {
            return Err(err("type section does not end on a record"));
        }
        Ok(btf)
    }

    fn u32_at(&self, o: usize) -> Result<u32, BtfError> {
        self.data
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| err("truncated type record"))
    }

    fn name(&self, name_off: u32) -> &[u8] {
        let start = self.strings + name_off as usize;
        let end = self.strings + self.strings_len;
        let s = self.data.get(start..end).unwrap_or(&[]);
        &s[..memchr::memchr(0, s).unwrap_or(s.len())]
    }

    /// (name_off, kind, kind_flag, vlen, size_or_type, record offset)
    fn ty(&self, id: u32) -> Option<(u32, u32, bool, usize, u32, usize)> {
        let at = *self.types.get((id as usize).checked_sub(1)?)?;
        let name = self.u32_at(at).ok()?;
        let info = self.u32_at(at + 4).ok()?;
        let st = self.u32_at(at + 8).ok()?;
        Some((
            name,
            (info >> 24) & 0x1f,
            info >> 31 == 1,
            (info & 0xffff) as usize,
            st,
            at,
        ))
    }

    /// Byte size of type `id`, through typedefs, qualifiers and array
    /// elements.
    fn size_of(&self, id: u32) -> Option<u32> {
        self.size_within(id, 32)
    }

    /// [`Btf::size_of`], following at most `steps` references: types that
    /// refer to themselves (an array of itself) end as `None`, not in an
    /// endless recursion.
    fn size_within(&self, mut id: u32, steps: u32) -> Option<u32> {
        for step in 0..steps {
            let (_, kind, _, _, st, at) = self.ty(id)?;
            match kind {
                INT | STRUCT | UNION | ENUM | ENUM64 | FLOAT => return Some(st),
                PTR => return Some(8),
                ARRAY => {
                    let elem = self.u32_at(at + 12).ok()?;
                    let n = self.u32_at(at + 20).ok()?;
                    return self.size_within(elem, steps - step - 1)?.checked_mul(n);
                }
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = st,
                _ => return None,
            }
        }
        None
    }

    /// Follows typedefs and qualifiers to a struct or union id.
    fn composite(&self, mut id: u32) -> Option<u32> {
        for _ in 0..32 {
            let (_, kind, _, _, st, _) = self.ty(id)?;
            match kind {
                STRUCT | UNION => return Some(id),
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = st,
                _ => return None,
            }
        }
        None
    }

    /// Looks `field` up in struct/union `id`, descending into anonymous
    /// members (unnamed unions and structs).
    fn find_in(&self, id: u32, field: &[u8], depth: u32) -> Option<Member> {
        if depth > 8 {
            return None;
        }
        let (_, kind, kind_flag, vlen, _, at) = self.ty(id)?;
        if kind != STRUCT && kind != UNION {
            return None;
        }
        for i in 0..vlen {
            let m = at + 12 + 12 * i;
            let name = self.u32_at(m).ok()?;
            let mty = self.u32_at(m + 4).ok()?;
            let raw = self.u32_at(m + 8).ok()?;
            let bits = if kind_flag { raw & 0xff_ffff } else { raw };
            if name == 0 {
                if let Some(inner) = self.composite(mty)
                    && let Some(found) = self.find_in(inner, field, depth + 1)
                {
                    if bits % 8 != 0 {
                        return None;
                    }
                    return Some(Member {
                        offset: bits / 8 + found.offset,
                        size: found.size,
                    });
                }
            } else if self.name(name) == field {
                // A bitfield is not something the program can read.
                if bits % 8 != 0 || (kind_flag && raw >> 24 != 0) {
                    return None;
                }
                return Some(Member {
                    offset: bits / 8,
                    size: self.size_of(mty)?,
                });
            }
        }
        None
    }

    /// The member `field` of `struct name` (the first complete definition
    /// that has it).
    pub fn member(&self, name: &str, field: &str) -> Result<Member, BtfError> {
        let mut seen = false;
        for id in 1..=self.types.len() as u32 {
            let Some((n, kind, _, vlen, _, _)) = self.ty(id) else {
                continue;
            };
            if kind == STRUCT && vlen > 0 && self.name(n) == name.as_bytes() {
                seen = true;
                if let Some(m) = self.find_in(id, field.as_bytes(), 0) {
                    return Ok(m);
                }
            }
        }
        Err(err(if seen {
            format!("struct {name} has no member {field}")
        } else {
            format!("no struct {name} in the kernel's BTF")
        }))
    }

    /// The arguments of tracepoint `name` as the kernel declares them
    /// (`struct inode *`, `int`, …), from its probe type
    /// `btf_trace_<name>` (a pointer to a function whose first parameter,
    /// the probe's data, is left out). `None`: no such tracepoint.
    pub fn tracepoint_args(&self, name: &str) -> Option<Vec<String>> {
        let id = self.typedef_id(&format!("btf_trace_{name}"))?;
        let (_, _, _, _, ptr, _) = self.ty(id)?;
        let (_, kind, _, _, proto, _) = self.ty(ptr)?;
        if kind != PTR {
            return None;
        }
        let (_, kind, _, vlen, _, at) = self.ty(proto)?;
        if kind != FUNC_PROTO || vlen == 0 {
            return None;
        }
        (1..vlen)
            .map(|i| {
                let ty = self.u32_at(at + 12 + 8 * i + 4).ok()?;
                Some(self.describe(ty, 0))
            })
            .collect()
    }

    /// A type as C spells it, without qualifiers (`struct inode *`).
    fn describe(&self, id: u32, depth: u32) -> String {
        if id == 0 {
            return "void".into();
        }
        let Some((n, kind, _, _, st, _)) = self.ty(id).filter(|_| depth < 16) else {
            return "?".into();
        };
        let name = String::from_utf8_lossy(self.name(n));
        match kind {
            PTR => format!("{} *", self.describe(st, depth + 1)),
            STRUCT => format!("struct {name}"),
            UNION => format!("union {name}"),
            FWD => format!("struct {name}"),
            CONST | VOLATILE | RESTRICT | TYPE_TAG => self.describe(st, depth + 1),
            _ => name.into_owned(),
        }
    }

    /// The id of the first type of `kind` named `name`.
    fn id_of(&self, kind: u32, name: &str) -> Option<u32> {
        (1..=self.types.len() as u32).find(|&id| {
            self.ty(id)
                .is_some_and(|(n, k, ..)| k == kind && self.name(n) == name.as_bytes())
        })
    }

    /// The id of typedef `name` (a tracepoint's `btf_trace_<name>`, which
    /// `tp_btf` programs attach by).
    pub fn typedef_id(&self, name: &str) -> Option<u32> {
        self.id_of(TYPEDEF, name)
    }

    /// The id of kernel function `name` (FUNC record; fexit attaches by it).
    pub fn function_id(&self, name: &str) -> Option<u32> {
        self.id_of(FUNC, name)
    }

    /// True if the kernel has a function named `name` (FUNC record).
    pub fn has_function(&self, name: &str) -> bool {
        self.function_id(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF blob: int, ptr, a struct with a named member after
    /// an anonymous union, and a typedef.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0c\0u64\0f\0";
        let off = |name: &str| -> u32 {
            let pat = format!("\0{name}\0");
            strings
                .windows(pat.len())
                .position(|w| w == pat.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut t: Vec<u8> = Vec::new();
        let rec = |t: &mut Vec<u8>, name: u32, kind: u32, vlen: u32, st: u32| {
            t.extend(name.to_le_bytes());
            t.extend(((kind << 24) | vlen).to_le_bytes());
            t.extend(st.to_le_bytes());
        };
        // 1: int (4 bytes)
        rec(&mut t, off("int"), INT, 0, 4);
        t.extend(32u32.to_le_bytes());
        // 2: typedef u64 -> 3
        rec(&mut t, off("u64"), TYPEDEF, 0, 3);
        // 3: int (8 bytes)
        rec(&mut t, 0, INT, 0, 8);
        t.extend(64u32.to_le_bytes());
        // 4: anonymous union { u64 b; }
        rec(&mut t, 0, UNION, 1, 8);
        t.extend(off("b").to_le_bytes());
        t.extend(2u32.to_le_bytes());
        t.extend(0u32.to_le_bytes());
        // 5: ptr -> 1
        rec(&mut t, 0, PTR, 0, 1);
        // 6: struct s { int a; <anon union> at 64 bits; int *c at 128 }
        rec(&mut t, off("s"), STRUCT, 3, 24);
        for (n, ty, bits) in [(off("a"), 1u32, 0u32), (0, 4, 64), (off("c"), 5, 128)] {
            t.extend(n.to_le_bytes());
            t.extend(ty.to_le_bytes());
            t.extend(bits.to_le_bytes());
        }
        // 7: func f
        rec(&mut t, off("f"), FUNC, 0, 0);
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.push(1);
        out.push(0);
        out.extend(24u32.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend((t.len() as u32).to_le_bytes());
        out.extend((t.len() as u32).to_le_bytes());
        out.extend((strings.len() as u32).to_le_bytes());
        out.extend(t);
        out.extend(strings);
        out
    }

    #[test]
    fn members_through_anonymous_unions_typedefs_and_pointers() {
        let btf = Btf::parse(blob()).unwrap();
        assert_eq!(btf.member("s", "a").unwrap(), Member { offset: 0, size: 4 });
        assert_eq!(btf.member("s", "b").unwrap(), Member { offset: 8, size: 8 });
        assert_eq!(
            btf.member("s", "c").unwrap(),
            Member {
                offset: 16,
                size: 8
            }
        );
        assert!(
            btf.member("s", "zz")
                .unwrap_err()
                .to_string()
                .contains("no member zz")
        );
        assert!(
            btf.member("t", "a")
                .unwrap_err()
                .to_string()
                .contains("no struct t")
        );
        assert!(btf.has_function("f"));
        assert!(!btf.has_function("s"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(Vec::new()).is_err());
        assert!(Btf::parse(vec![0x9f, 0xeb, 1, 0]).is_err());
        let mut b = blob();
        b.truncate(b.len() - 10);
        assert!(Btf::parse(b).is_err());
        let mut b = blob();
        // Corrupt the first record's kind.
        b[24 + 7] = 0x1f;
        assert!(Btf::parse(b).is_err());
    }

    #[test]
    fn an_array_of_itself_is_no_size_not_a_stack_overflow() {
        // struct task_struct { <array of itself> files; }: the member's
        // size recursed through the array's element without end (found by
        // review while writing `cargo xtask fuzz btf`).
        let strings = b"\0task_struct\0files\0other\0";
        let mut t: Vec<u8> = Vec::new();
        let rec = |t: &mut Vec<u8>, name: u32, kind: u32, vlen: u32, st: u32, extra: &[u32]| {
            t.extend(name.to_le_bytes());
            t.extend(((kind << 24) | vlen).to_le_bytes());
            t.extend(st.to_le_bytes());
            for v in extra {
                t.extend(v.to_le_bytes());
            }
        };
        // 1: an array of 2 of itself; 2: struct task_struct { 1 files; }
        rec(&mut t, 0, ARRAY, 0, 0, &[1, 1, 2]);
        rec(&mut t, 1, STRUCT, 1, 16, &[13, 1, 0]);
        // 3: int; 4: int[3]; 5: int[2][3]; 6: struct other { 5 files; }
        rec(&mut t, 0, INT, 0, 4, &[32]);
        rec(&mut t, 0, ARRAY, 0, 0, &[3, 3, 3]);
        rec(&mut t, 0, ARRAY, 0, 0, &[4, 3, 2]);
        rec(&mut t, 19, STRUCT, 1, 24, &[13, 5, 0]);
        let mut b = Vec::new();
        b.extend(MAGIC.to_le_bytes());
        b.extend([1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            b.extend(v.to_le_bytes());
        }
        b.extend(t);
        b.extend(strings);
        let btf = Btf::parse(b).unwrap();
        assert!(btf.member("task_struct", "files").is_err());
        assert_eq!(btf.member("other", "files").unwrap().size, 24);
    }

    #[test]
    fn this_kernel_has_the_fields_the_program_needs() {
        // The project's machines (and CI) have BTF: this must not skip.
        let btf = Btf::from_sys_fs().expect("kernel BTF at /sys/kernel/btf/vmlinux");
        assert_eq!(btf.member("super_block", "s_dev").unwrap().size, 4);
        assert_eq!(btf.member("inode", "i_ino").unwrap().size, 8);
        assert_eq!(btf.member("file", "f_inode").unwrap().size, 8);
        assert_eq!(btf.member("task_struct", "files").unwrap().size, 8);
        assert!(btf.has_function("vfs_write"));
    }

    #[test]
    fn this_kernel_declares_the_write_path_tracepoints_with_their_arguments() {
        let btf = Btf::from_sys_fs().expect("kernel BTF at /sys/kernel/btf/vmlinux");
        let args = |tp| {
            btf.tracepoint_args(tp)
                .unwrap_or_else(|| panic!("no tracepoint {tp}"))
        };
        assert_eq!(
            args("writeback_mark_inode_dirty"),
            vec!["struct inode *", "int"]
        );
        assert_eq!(
            args("writeback_dirty_folio"),
            vec!["struct folio *", "struct address_space *"]
        );
        assert_eq!(args("ctime_ns_xchg")[0], "struct inode *");
        assert_eq!(args("sys_exit"), vec!["struct pt_regs *", "long int"]);
        assert_eq!(btf.tracepoint_args("no_such_tracepoint"), None);
    }
}
