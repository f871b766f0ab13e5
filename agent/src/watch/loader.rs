//! Loads bpftail's own eBPF object: creates its maps, writes its globals,
//! loads a program when asked, opens its raw tracepoints.
//!
//! Hand-written on purpose: aya's `EbpfLoader::new()` parses the running
//! kernel's whole BTF with aya's parser (about 25 MB resident for a moment
//! at start — it stays in the process's peak RSS and in the cgroup's
//! `memory.peak`, next to a 64 Mi DaemonSet limit), even when the object
//! needs no CO-RE relocation. This object needs none: struct offsets are
//! globals the agent fills in from its own small BTF reader
//! ([`super::btf`]), which also gives the BTF ids that `tp_btf` and fexit
//! programs attach by. aya-obj still parses the ELF and relocates map
//! references and calls; aya's map types still wrap the maps. What is left
//! here is a handful of `bpf()` commands.
//!
//! Not supported (the object has none): map-in-map, pinning, CO-RE
//! relocations, program BTF (func and line info).

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use aya::maps::{Map, MapData};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type};
use aya_obj::{EbpfSectionKind, Object};

/// `bpf(cmd, attr, sizeof attr)`. By hand: rustix has no `bpf` wrapper.
///
/// # Safety
///
/// `attr` must be a `#[repr(C)]` prefix of `union bpf_attr` laid out as
/// `cmd` expects (the kernel zero-fills the rest), and every address it
/// holds must point to memory that is valid for what `cmd` does with it
/// (read or written, of the size the attribute gives) until the call
/// returns. An fd the call creates is the caller's to close.
pub(super) unsafe fn bpf<T>(cmd: bpf_cmd, attr: &T) -> libc::c_long {
    // SAFETY: the kernel reads size_of::<T>() bytes of `attr`, a valid
    // reference for the call; what it points to is the caller's promise.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    }
}

/// A `bpf()` command that returns a new descriptor.
///
/// # Safety
///
/// As [`bpf`]; the command's result, when not negative, is a new fd.
unsafe fn bpf_fd(cmd: bpf_cmd, attr: &bpf_attr) -> std::io::Result<OwnedFd> {
    // SAFETY: the caller's promise, passed on.
    let r = unsafe { bpf(cmd, attr) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just created for us.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// An all-zero `bpf_attr`: every command's "unset" value.
fn zeroed_attr() -> bpf_attr {
    // SAFETY: a C union of integers and arrays of them; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Why the object, a map or a program could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("parsing the object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("relocating: {0}")]
    Relocate(#[from] aya_obj::relocation::EbpfRelocationError),
    #[error("creating map {0}: {1}")]
    CreateMap(String, std::io::Error),
    #[error("writing map {0}'s data: {1}")]
    MapData(String, std::io::Error),
    #[error("no map {0} in the object")]
    NoMap(String),
    #[error("map {0}: {1}")]
    Map(String, String),
    #[error("no program {0} in the object")]
    NoProgram(String),
    #[error("loading {0}: {1}{2}")]
    Program(String, std::io::Error, String),
}

/// How a program is loaded: which kernel program type, attached where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    /// `BPF_PROG_TYPE_RAW_TRACEPOINT`: attached by tracepoint name.
    RawTracepoint,
    /// `BPF_PROG_TYPE_TRACING` / `BPF_TRACE_RAW_TP`: the BTF id of the
    /// tracepoint's `btf_trace_<name>` typedef.
    BtfTracepoint { btf_id: u32 },
    /// `BPF_PROG_TYPE_TRACING` / `BPF_TRACE_FEXIT`: the BTF id of the
    /// kernel function.
    Fexit { btf_id: u32 },
}

/// The object with its maps created and relocated; programs are loaded on
/// demand ([`Loaded::program`]).
pub struct Loaded {
    /// Map name → its descriptor.
    maps: HashMap<String, OwnedFd>,
    /// Program name → its linked instructions.
    programs: HashMap<String, Vec<bpf_insn>>,
    license: CString,
}

impl Loaded {
    /// Parses `object`, writes `globals` (symbol name → little-endian
    /// bytes; each must exist with that size) into its data sections,
    /// creates its maps (`max_entries` overrides, by map name) and
    /// relocates its programs against them.
    pub fn new(
        object: &[u8],
        globals: &[(&str, &[u8])],
        max_entries: &[(&str, u32)],
    ) -> Result<Loaded, LoadError> {
        let mut obj = Object::parse(object)?;
        obj.patch_map_data(globals.iter().map(|&(n, b)| (n, (b, true))).collect())?;
        let mut created = Vec::new();
        for (name, mut def) in obj.maps.drain() {
            if let Some(&(_, n)) = max_entries.iter().find(|(m, _)| *m == name) {
                def.set_max_entries(n);
            }
            let fd = create_map(&name, &def)?;
            created.push((name, fd, def));
        }
        let text: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_maps(
            created
                .iter()
                .map(|(n, fd, def)| (n.as_str(), fd.as_raw_fd(), def)),
            &text,
        )?;
        obj.relocate_calls(&text)?;
        let programs = obj
            .programs
            .iter()
            .filter_map(|(name, p)| {
                let f = obj.functions.get(&p.function_key())?;
                Some((name.clone(), f.instructions.clone()))
            })
            .collect();
        Ok(Loaded {
            maps: created.into_iter().map(|(n, fd, _)| (n, fd)).collect(),
            programs,
            license: obj.license,
        })
    }

    /// The map `name`, as aya's map type (its own descriptor).
    pub fn map(&self, name: &str) -> Result<Map, LoadError> {
        let fd = self
            .maps
            .get(name)
            .ok_or_else(|| LoadError::NoMap(name.into()))?;
        let dup = fd
            .try_clone()
            .map_err(|e| LoadError::Map(name.into(), e.to_string()))?;
        MapData::from_fd(dup)
            .and_then(Map::from_map_data)
            .map_err(|e| LoadError::Map(name.into(), e.to_string()))
    }

    /// The descriptor of map `name`.
    pub fn map_fd(&self, name: &str) -> Result<BorrowedFd<'_>, LoadError> {
        self.maps
            .get(name)
            .map(|fd| fd.as_fd())
            .ok_or_else(|| LoadError::NoMap(name.into()))
    }

    /// Loads program `name` as `kind`. The error carries the end of the
    /// verifier's log.
    pub fn program(&self, name: &str, kind: ProgramKind) -> Result<OwnedFd, LoadError> {
        let insns = self
            .programs
            .get(name)
            .ok_or_else(|| LoadError::NoProgram(name.into()))?;
        let load = |log: &mut [u8]| {
            let mut attr = zeroed_attr();
            // SAFETY: writing plain integer fields of the union's
            // BPF_PROG_LOAD member.
            let u = unsafe { &mut attr.__bindgen_anon_3 };
            let (ty, attach, btf_id) = match kind {
                ProgramKind::RawTracepoint => (bpf_prog_type::BPF_PROG_TYPE_RAW_TRACEPOINT, 0, 0),
                ProgramKind::BtfTracepoint { btf_id } => (
                    bpf_prog_type::BPF_PROG_TYPE_TRACING,
                    bpf_attach_type::BPF_TRACE_RAW_TP as u32,
                    btf_id,
                ),
                ProgramKind::Fexit { btf_id } => (
                    bpf_prog_type::BPF_PROG_TYPE_TRACING,
                    bpf_attach_type::BPF_TRACE_FEXIT as u32,
                    btf_id,
                ),
            };
            u.prog_type = ty as u32;
            u.expected_attach_type = attach;
            u.attach_btf_id = btf_id;
            u.insns = insns.as_ptr() as u64;
            u.insn_cnt = insns.len() as u32;
            u.license = self.license.as_ptr() as u64;
            for (dst, &src) in u.prog_name.iter_mut().zip(name.as_bytes().iter().take(15)) {
                *dst = src as libc::c_char;
            }
            if !log.is_empty() {
                u.log_level = 1;
                u.log_buf = log.as_mut_ptr() as u64;
                u.log_size = log.len() as u32;
            }
            // SAFETY: `insns`, `license` and `log` outlive the call and
            // are of the lengths given; the kernel only reads the first
            // two and writes at most `log_size` bytes of the third.
            unsafe { bpf_fd(bpf_cmd::BPF_PROG_LOAD, &attr) }
        };
        load(&mut []).or_else(|first| {
            // Again, with the verifier's log, for the error (the first
            // attempt's errno is the one reported).
            let mut log = vec![0u8; 256 * 1024];
            load(&mut log).map_err(|_| LoadError::Program(name.into(), first, verifier_tail(&log)))
        })
    }
}

/// The last lines of a verifier log (the reason is at its end), or "".
fn verifier_tail(log: &[u8]) -> String {
    let end = memchr::memchr(0, log).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        " (verifier: {})",
        lines[lines.len().saturating_sub(3)..].join(" / ")
    )
}

/// `BPF_MAP_CREATE` for `def`, then its initial data (global sections);
/// `.rodata` is frozen after.
fn create_map(name: &str, def: &aya_obj::Map) -> Result<OwnedFd, LoadError> {
    let mut attr = zeroed_attr();
    // SAFETY: writing plain integer fields of the BPF_MAP_CREATE member.
    let u = unsafe { &mut attr.__bindgen_anon_1 };
    u.map_type = def.map_type();
    u.key_size = def.key_size();
    u.value_size = def.value_size();
    u.max_entries = def.max_entries();
    u.map_flags = def.map_flags();
    u.map_extra = def.map_extra();
    // Kernel map names: 15 characters of [A-Za-z0-9_.].
    for (dst, &src) in u.map_name.iter_mut().zip(
        name.as_bytes()
            .iter()
            .filter(|c| c.is_ascii_alphanumeric() || **c == b'_' || **c == b'.')
            .take(15),
    ) {
        *dst = src as libc::c_char;
    }
    // SAFETY: the attribute holds no pointers.
    let fd = unsafe { bpf_fd(bpf_cmd::BPF_MAP_CREATE, &attr) }
        .map_err(|e| LoadError::CreateMap(name.into(), e))?;
    let data = def.data();
    if !data.is_empty() {
        let key = 0u32;
        let mut attr = zeroed_attr();
        // SAFETY: writing plain integer fields of the element member.
        let u = unsafe { &mut attr.__bindgen_anon_2 };
        u.map_fd = fd.as_raw_fd() as u32;
        u.key = &key as *const u32 as u64;
        u.__bindgen_anon_1.value = data.as_ptr() as u64;
        // SAFETY: `key` (4 bytes) and `data` (the map's value size: the
        // section's size) outlive the call; the kernel only reads them.
        if unsafe { bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &attr) } < 0 {
            return Err(LoadError::MapData(
                name.into(),
                std::io::Error::last_os_error(),
            ));
        }
    }
    if def.section_kind() == EbpfSectionKind::Rodata {
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_2.map_fd = fd.as_raw_fd() as u32;
        // SAFETY: the attribute holds no pointers.
        if unsafe { bpf(bpf_cmd::BPF_MAP_FREEZE, &attr) } < 0 {
            return Err(LoadError::MapData(
                name.into(),
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(fd)
}

/// Attaches a loaded program: a raw tracepoint by `name`, or (`None`) a
/// `tp_btf` or fexit program where its BTF id says. Dropping the returned
/// link detaches it.
pub fn attach(program: BorrowedFd<'_>, name: Option<&str>) -> std::io::Result<OwnedFd> {
    let name = name
        .map(CString::new)
        .transpose()
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut attr = zeroed_attr();
    attr.raw_tracepoint.prog_fd = program.as_raw_fd() as u32;
    attr.raw_tracepoint.name = name.as_ref().map_or(0, |n| n.as_ptr() as u64);
    // SAFETY: `name`, when given, is a NUL-terminated string that outlives
    // the call; the kernel only reads it.
    unsafe { bpf_fd(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &attr) }
}
