//! The eBPF change source: the kernel reports writes to watched files.
//!
//! The program (`agent-ebpf`, embedded at build time) runs after every
//! completed write; for a file in the `WATCHED` map it sets the file's
//! pending flag and, when the flag was clear, emits one ring-buffer event.
//! This side:
//!
//! - fills the map as the data loop opens files ([`ChangeSource::watch_file`])
//!   and prunes it as they close; each file gets a slot in the `FLAGS`
//!   array, which is mmapped here so flags are cleared without syscalls;
//! - consumes the ring buffer on its own thread, at most one pass per tick
//!   (default 10 ms), so a write storm over many files costs one wakeup per
//!   tick, not one per event;
//! - re-arms at once: clears the flags of a pass's events before handing
//!   their files to the loop, so the loop's read comes after the clear. A
//!   write before the clear is read then; one after it makes a new event
//!   (taken at the next pass, a tick later: a write storm is one event and
//!   one read per tick per file). Nothing is missed: the program checks the
//!   flag after the write completed, and the agent reads after clearing it.
//! - Lost events (ring buffer full) are counted by the program, which
//!   clears the flag again; a rising drop count makes the loop read every
//!   file. Files the map has no room for are polled every second.
//!
//! Directory changes (files created, renamed, deleted) come from inotify
//! watches without `IN_MODIFY`: rare events, no write traffic.
//!
//! Attachment ([`Attach`]): the write path's own tracepoints (they fire
//! for file changes only; the data loop `fstat`s a file before reading it,
//! which guarantees its next write a fresh ctime, hence an event, on
//! filesystems with multigrain timestamps — files elsewhere are also polled
//! by size every second, [`needs_size_poll`]); fexit on the VFS write
//! functions where the kernel allows BPF trampolines; the `sys_exit`
//! tracepoint (BTF-enabled or raw) only when named, as every syscall on the
//! node pays for it. Field offsets and attach ids come from the kernel's
//! BTF ([`super::btf`]); the object is loaded by [`super::loader`]. A file
//! is in the map under the kernel's names for it ([`kernel_id`]: the
//! superblock's device, and an overlay file's upper inode).
//! Not seen by any of them: stores into a shared mmap, io_uring writes
//! (with the syscall tracepoints); the safety sweep covers those.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};

use super::btf::Btf;
use super::kernel_id;
use super::loader::{self, LoadError, Loaded, ProgramKind, bpf};
use super::{ChangeQueue, ChangeSource, InotifySource, Pending, pace};
use crate::checkpoint::FileKey;
use crate::metrics::Metrics;

#[path = "../../../agent-ebpf/src/shared.rs"]
#[allow(dead_code, reason = "shared with the eBPF side")]
mod shared;

use shared::{
    CLEAN, COUNTER_DROPS, COUNTER_EVENTS, COUNTER_HITS, COUNTER_SLOTS, COUNTER_WATCHED,
    FEXIT_PROGRAMS, FileId, MAP_COUNTERS, MAP_EVENTS, MAP_FLAGS, MAP_WATCHED, PROG_INODE_ARG0,
    PROG_MAPPING_ARG1, PROG_RAW_TP, PROG_TP_BTF, WriteEvent,
};

/// The default size of the ring buffer in bytes: the one the eBPF object
/// is built with (`agent-ebpf/src/shared.rs`, which both sides include).
pub const RING_BYTES: u32 = shared::RING_BYTES;

// SAFETY: `#[repr(C)]`, integers only, padding spelled out as a field:
// every bit pattern is a valid value.
unsafe impl aya::Pod for FileId {}

/// The object built by `cargo xtask build-ebpf` (see `agent/build.rs`).
#[cfg(bpftail_ebpf)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/bpftail.bpf.o"
)));
#[cfg(not(bpftail_ebpf))]
static OBJECT: Option<&[u8]> = None;

/// How the program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// fexit on vfs_write, vfs_writev, vfs_iter_write, vfs_iocb_iter_write.
    Fexit,
    /// BTF-enabled raw tracepoint `sys_exit`.
    TpBtf,
    /// Raw tracepoint `sys_exit`.
    RawTp,
    /// Raw tracepoints of the write path itself ([`WRITE_PATH`]): they
    /// fire for file writes only. Reading must arm them: see
    /// [`EbpfSource`]'s protocol.
    WritePath,
}

impl Attach {
    /// In order of preference, for `--ebpf-attach auto`: hooks that run
    /// for file writes only. The `sys_exit` tracepoint (every syscall of
    /// the node pays for it) is used only when asked for.
    pub const ALL: [Attach; 2] = [Attach::WritePath, Attach::Fexit];
    /// Every attachment, as `bpftail probe` reports them.
    pub const PROBED: [Attach; 4] = [
        Attach::WritePath,
        Attach::Fexit,
        Attach::TpBtf,
        Attach::RawTp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attach::Fexit => "fexit",
            Attach::TpBtf => "tp_btf",
            Attach::RawTp => "raw_tp",
            Attach::WritePath => "write_path",
        }
    }
}

/// How a write-path program finds the written inode in its tracepoint's
/// arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InodeArg {
    /// The first argument is the `struct inode *`.
    First,
    /// The second is a `struct address_space *`, whose `host` is.
    MappingSecond,
}

impl InodeArg {
    fn program(self) -> &'static str {
        match self {
            InodeArg::First => PROG_INODE_ARG0,
            InodeArg::MappingSecond => PROG_MAPPING_ARG1,
        }
    }

    /// Whether a tracepoint with these arguments suits the program.
    fn fits(self, args: &[String]) -> bool {
        match self {
            InodeArg::First => args.first().is_some_and(|a| a == "struct inode *"),
            InodeArg::MappingSecond => args.get(1).is_some_and(|a| a == "struct address_space *"),
        }
    }
}

/// The write path's static tracepoints the hook attaches to (each
/// optional: those the kernel has, with the arguments expected). None of
/// them runs for anything but a change of a file; the per-write ones after
/// the data copy (`ext4_da_write_end`, `iomap_iter`) are left out, as they
/// cost every write on the node.
/// - `ctime_ns_xchg` (and `ctime_xchg_skip`): a write re-stamps ctime. With
///   multigrain timestamps, a `stat` of the file guarantees the next write
///   a fresh stamp, so the agent stats each file after reading it.
/// - `writeback_mark_inode_dirty`: timestamps updated, or a page first
///   dirtied; `writeback_dirty_folio`: a page went from clean to dirty.
///
/// Not `inode_set_ctime_to_ts`: overlayfs fires it on its own inode after
/// every write through it (copying the upper file's times), which would run
/// the program for every write into every container's root filesystem; an
/// overlay file is watched under its upper file's name instead
/// ([`kernel_id`]), where `ctime_ns_xchg` fires. On filesystems without
/// multigrain timestamps it fires once per timer tick at most, and files
/// there are polled by size anyway ([`needs_size_poll`]).
const WRITE_PATH: [(&str, InodeArg); 4] = [
    ("ctime_ns_xchg", InodeArg::First),
    ("ctime_xchg_skip", InodeArg::First),
    ("writeback_mark_inode_dirty", InodeArg::First),
    ("writeback_dirty_folio", InodeArg::MappingSecond),
];

/// The write-path tracepoints this kernel has with the expected
/// arguments, and why the others are left out.
fn write_path_tracepoints(btf: &Btf) -> (Vec<(&'static str, InodeArg)>, Vec<TracepointUse>) {
    let mut usable = Vec::new();
    let mut missing = Vec::new();
    for (tp, arg) in WRITE_PATH {
        match btf.tracepoint_args(tp) {
            Some(args) if arg.fits(&args) => usable.push((tp, arg)),
            Some(args) => missing.push((
                tp,
                Err(format!("unexpected arguments ({})", args.join(", "))),
            )),
            None => missing.push((tp, Err("not in this kernel".into()))),
        }
    }
    (usable, missing)
}

/// A write-path tracepoint, and whether the hook is attached to it (or
/// why not).
pub type TracepointUse = (&'static str, Result<(), String>);

#[derive(Debug, Clone)]
pub struct Options {
    /// Attachments to try, in order.
    pub attach: Vec<Attach>,
    /// Capacity of the watched map (open files followed by eBPF).
    pub max_files: u32,
    /// Minimum time between passes over the ring buffer, and the re-arm delay.
    pub tick: Duration,
    /// Size of the ring buffer in bytes (a power of two, ≥ one page).
    pub ring_bytes: u32,
    /// Tests only: the program drops every event as if the ring buffer
    /// were full.
    pub sabotage: bool,
    /// The write-path tracepoints ignore this process's own threads (its
    /// reads and stats must not report themselves). Tests that write from
    /// the process that loads the hook turn it off.
    pub ignore_own_threads: bool,
    /// Tests: the write-path tracepoints to use, by name (`None`: every one
    /// the kernel has; none: the attachment fails, as on a kernel that
    /// has none of them).
    pub only_tracepoints: Option<Vec<String>>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            attach: Attach::ALL.to_vec(),
            max_files: 16384,
            tick: Duration::from_millis(10),
            ring_bytes: RING_BYTES,
            sabotage: false,
            ignore_own_threads: true,
            only_tracepoints: None,
        }
    }
}

/// The kernel's `s_dev` encoding (`MAJOR << 20 | MINOR`) of a `st_dev`.
pub fn kernel_dev(st_dev: u64) -> u32 {
    (libc::major(st_dev) << 20) | (libc::minor(st_dev) & 0xf_ffff)
}

/// `st_dev` of the kernel's `s_dev` encoding.
pub fn user_dev(dev: u32) -> u64 {
    libc::makedev(dev >> 20, dev & 0xf_ffff)
}

/// Globals the program needs: struct member offsets on this kernel and
/// this architecture's syscall numbers.
/// A global of the program and its value (little-endian, `len` bytes).
struct GlobalValue {
    name: &'static str,
    bytes: [u8; 8],
    len: usize,
}

fn globals(btf: &Btf) -> Result<Vec<GlobalValue>, String> {
    let mut out = Vec::new();
    let fields: &[(&str, &str, &str, u32)] = &[
        ("OFF_TASK_FILES", "task_struct", "files", 8),
        ("OFF_FILES_FDT", "files_struct", "fdt", 8),
        ("OFF_FDT_MAX_FDS", "fdtable", "max_fds", 4),
        ("OFF_FDT_FD", "fdtable", "fd", 8),
        ("OFF_FILE_INODE", "file", "f_inode", 8),
        ("OFF_INODE_INO", "inode", "i_ino", 8),
        ("OFF_INODE_SB", "inode", "i_sb", 8),
        ("OFF_SB_DEV", "super_block", "s_dev", 4),
        ("OFF_MAPPING_HOST", "address_space", "host", 8),
        #[cfg(target_arch = "x86_64")]
        ("OFF_REGS_NR", "pt_regs", "orig_ax", 8),
        #[cfg(target_arch = "x86_64")]
        ("OFF_REGS_ARG0", "pt_regs", "di", 8),
        #[cfg(target_arch = "x86_64")]
        ("OFF_REGS_ARG2", "pt_regs", "dx", 8),
    ];
    for &(global, st, field, size) in fields {
        let m = btf.member(st, field).map_err(|e| e.to_string())?;
        if m.size != size {
            return Err(format!(
                "{st}.{field} is {} bytes on this kernel, expected {size}",
                m.size
            ));
        }
        out.push(GlobalValue {
            name: global,
            bytes: u64::from(m.offset).to_le_bytes(),
            len: 4,
        });
    }
    let syscalls: &[(&str, libc::c_long)] = &[
        ("SYS_WRITE", libc::SYS_write),
        ("SYS_PWRITE64", libc::SYS_pwrite64),
        ("SYS_WRITEV", libc::SYS_writev),
        ("SYS_PWRITEV", libc::SYS_pwritev),
        ("SYS_PWRITEV2", libc::SYS_pwritev2),
        ("SYS_SENDFILE", libc::SYS_sendfile),
        ("SYS_SPLICE", libc::SYS_splice),
        ("SYS_COPY_FILE_RANGE", libc::SYS_copy_file_range),
    ];
    for &(global, nr) in syscalls {
        #[allow(clippy::unnecessary_cast, reason = "c_long is 32 bits on some targets")]
        out.push(GlobalValue {
            name: global,
            bytes: (nr as i64).to_le_bytes(),
            len: 8,
        });
    }
    Ok(out)
}

/// Why the hook could not be used, per attachment tried.
#[derive(Debug)]
pub struct Unusable(pub String);

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unusable {}

/// The program, loaded and attached, with its maps.
pub struct Hook {
    /// The attachments: closing them detaches.
    _links: Vec<OwnedFd>,
    pub attach: Attach,
    watched: Option<BpfHashMap<MapData, FileId, u32>>,
    flags: Arc<Flags>,
    ring: Option<RingBuf<MapData>>,
    counters: Option<PerCpuArray<MapData, u64>>,
    /// The attached programs, for their run statistics.
    programs: Vec<OwnedFd>,
    max_files: u32,
    /// With [`Attach::WritePath`]: each tracepoint and whether it is used.
    pub tracepoints: Vec<TracepointUse>,
}

/// Whether this process may create BPF maps at all: answered in
/// microseconds, before reading the kernel's BTF.
fn may_use_bpf() -> Result<(), Unusable> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    let attr = MapCreate {
        map_type: aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    // SAFETY: `MapCreate` is the first four fields of the BPF_MAP_CREATE
    // attributes and holds no pointers. The returned fd is closed below.
    let fd = unsafe { bpf(aya_obj::generated::bpf_cmd::BPF_MAP_CREATE, &attr) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Unusable(format!(
            "bpf(BPF_MAP_CREATE): {e} (the eBPF watcher needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)"
        )));
    }
    // SAFETY: a descriptor we own and no longer use.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// What attaching needs to know of the running kernel, read from its BTF
/// once, before loading (the BTF is dropped before any program loads).
struct Kernel {
    globals: Vec<GlobalValue>,
    /// The write-path tracepoints it has, and why the others are not used.
    write_path: Vec<(&'static str, InodeArg)>,
    missing: Vec<TracepointUse>,
    /// The BTF id of `btf_trace_sys_exit` (for `tp_btf`).
    sys_exit: Option<u32>,
    /// The BTF ids of the fexit programs' functions.
    fexit: Vec<Option<u32>>,
}

impl Kernel {
    fn read() -> Result<Kernel, Unusable> {
        let btf = Btf::from_sys_fs().map_err(|e| Unusable(format!("kernel BTF: {e}")))?;
        let globals = globals(&btf).map_err(|e| Unusable(format!("kernel BTF: {e}")))?;
        let (write_path, missing) = write_path_tracepoints(&btf);
        Ok(Kernel {
            globals,
            write_path,
            missing,
            sys_exit: btf.typedef_id("btf_trace_sys_exit"),
            fexit: FEXIT_PROGRAMS
                .iter()
                .map(|(_, f)| btf.function_id(f))
                .collect(),
        })
    }
}

/// Loads the program and attaches it the first way in `opts.attach` that
/// the kernel accepts. The error says why each way failed.
pub fn load(opts: &Options) -> Result<Hook, Unusable> {
    let object = OBJECT.ok_or_else(|| {
        Unusable("this bpftail was built without its eBPF object (BPFTAIL_NO_EBPF=1)".into())
    })?;
    may_use_bpf()?;
    let mut kernel = Kernel::read()?;
    if let Some(only) = &opts.only_tracepoints {
        kernel
            .write_path
            .retain(|(tp, _)| only.iter().any(|o| o == tp));
    }
    let entries = opts.max_files.max(1);
    let loaded = load_object(object, opts, &kernel.globals, entries)?;
    let mut tracepoints = kernel.missing.clone();
    let (attach, attached) = attach_first(&loaded, &opts.attach, &kernel, &mut tracepoints)?;
    if attach == Attach::WritePath {
        for (tp, r) in &tracepoints {
            if let Err(e) = r {
                tracing::info!(tracepoint = tp, reason = %e, "write-path tracepoint not used");
            }
        }
    } else {
        tracepoints.clear();
    }
    let map = |name: &str| loaded.map(name).map_err(|e| Unusable(e.to_string()));
    let flags = loaded
        .map_fd(MAP_FLAGS)
        .map_err(|e| Unusable(e.to_string()))
        .and_then(|fd| {
            Flags::map(fd, entries).map_err(|e| Unusable(format!("mmap of FLAGS: {e}")))
        })?;
    let watched =
        BpfHashMap::try_from(map(MAP_WATCHED)?).map_err(|e| Unusable(format!("WATCHED: {e}")))?;
    let ring = RingBuf::try_from(map(MAP_EVENTS)?).map_err(|e| Unusable(format!("EVENTS: {e}")))?;
    let counters = PerCpuArray::try_from(map(MAP_COUNTERS)?)
        .map_err(|e| Unusable(format!("COUNTERS: {e}")))?;
    Ok(Hook {
        _links: attached.links,
        attach,
        watched: Some(watched),
        flags: Arc::new(flags),
        ring: Some(ring),
        counters: Some(counters),
        programs: attached.programs,
        max_files: entries,
        tracepoints,
    })
}

/// Creates the object's maps with this kernel's offsets, the options'
/// sizes and switches (no program is loaded yet).
fn load_object(
    object: &[u8],
    opts: &Options,
    globals: &[GlobalValue],
    entries: u32,
) -> Result<Loaded, Unusable> {
    let sabotage = u32::from(opts.sabotage).to_le_bytes();
    let tgid = if opts.ignore_own_threads {
        std::process::id()
    } else {
        0
    }
    .to_le_bytes();
    let mut values: Vec<(&str, &[u8])> = globals
        .iter()
        .map(|g| (g.name, &g.bytes[..g.len]))
        .collect();
    values.push(("SABOTAGE", &sabotage[..]));
    values.push(("AGENT_TGID", &tgid[..]));
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
    let ring = opts.ring_bytes.next_power_of_two().max(page);
    Loaded::new(
        object,
        &values,
        &[
            // Two names for an overlay file (its own and its upper one's).
            (MAP_WATCHED, entries.saturating_mul(2)),
            (MAP_FLAGS, entries),
            (MAP_EVENTS, ring),
        ],
    )
    .map_err(|e| Unusable(format!("loading the eBPF object: {e}")))
}

/// Loaded programs and their attachments (closing a link detaches it).
#[derive(Default)]
struct Attached {
    programs: Vec<OwnedFd>,
    links: Vec<OwnedFd>,
}

/// Attaches the first of `order` the kernel accepts; returns it and its
/// programs, or why each was refused.
fn attach_first(
    loaded: &Loaded,
    order: &[Attach],
    kernel: &Kernel,
    tracepoints: &mut Vec<TracepointUse>,
) -> Result<(Attach, Attached), Unusable> {
    let mut reasons = Vec::new();
    let mut chosen = None;
    for &attach in order {
        match attach_one(loaded, attach, kernel, tracepoints) {
            Ok(a) => {
                chosen = Some((attach, a));
                break;
            }
            Err(e) => {
                let e = e.to_string();
                let hint = if attach == Attach::Fexit && e.contains("Operation not permitted") {
                    " (BPF trampolines refused: kernel lockdown, or missing CAP_SYS_ADMIN)"
                } else {
                    ""
                };
                reasons.push(format!("{}: {e}{hint}", attach.name()))
            }
        }
    }
    let chosen = chosen.ok_or_else(|| Unusable(reasons.join("; ")))?;
    for r in &reasons {
        tracing::info!(reason = %r, "eBPF attachment not used");
    }
    Ok(chosen)
}

/// Each write-path tracepoint: whether the hook attaches to it here.
pub fn probe_tracepoints() -> Result<Vec<TracepointUse>, Unusable> {
    let opts = Options {
        attach: vec![Attach::WritePath],
        max_files: 16,
        ring_bytes: 4096,
        ..Options::default()
    };
    load(&opts).map(|h| h.tracepoints.clone())
}

/// Tries every attachment on its own: whether it loads and attaches here.
pub fn probe() -> Vec<(Attach, Result<(), Unusable>)> {
    Attach::PROBED
        .iter()
        .map(|&a| {
            let opts = Options {
                attach: vec![a],
                max_files: 16,
                ring_bytes: 4096,
                ..Options::default()
            };
            (a, load(&opts).map(drop))
        })
        .collect()
}

/// Whether this binary carries the eBPF object.
pub fn embedded() -> bool {
    OBJECT.is_some()
}

/// Why one attachment could not be made.
#[derive(Debug, thiserror::Error)]
enum AttachError {
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("attach {0}: {1}")]
    Attach(&'static str, std::io::Error),
    /// The kernel's BTF has no type to attach this program to.
    #[error("no {0} in the kernel's BTF")]
    NoBtfId(&'static str),
    #[error("{0}")]
    NoTracepoint(String),
}

/// Loads and attaches the program(s) of one attachment; on failure,
/// whatever part of it had loaded is closed again.
fn attach_one(
    loaded: &Loaded,
    attach: Attach,
    kernel: &Kernel,
    tracepoints: &mut Vec<TracepointUse>,
) -> Result<Attached, AttachError> {
    let mut out = Attached::default();
    let mut one = |name: &'static str, kind: ProgramKind, tp: Option<&'static str>| {
        let prog = loaded.program(name, kind)?;
        let link = loader::attach(prog.as_fd(), tp)
            .map_err(|e| AttachError::Attach(tp.unwrap_or(name), e))?;
        out.programs.push(prog);
        out.links.push(link);
        Ok::<(), AttachError>(())
    };
    match attach {
        Attach::WritePath => return attach_write_path(loaded, &kernel.write_path, tracepoints),
        Attach::TpBtf => {
            let btf_id = kernel
                .sys_exit
                .ok_or(AttachError::NoBtfId("btf_trace_sys_exit"))?;
            one(PROG_TP_BTF, ProgramKind::BtfTracepoint { btf_id }, None)?;
        }
        Attach::RawTp => one(PROG_RAW_TP, ProgramKind::RawTracepoint, Some("sys_exit"))?,
        Attach::Fexit => {
            for (&(name, function), &id) in FEXIT_PROGRAMS.iter().zip(&kernel.fexit) {
                let btf_id = id.ok_or(AttachError::NoBtfId(function))?;
                one(name, ProgramKind::Fexit { btf_id }, None)?;
            }
        }
    }
    Ok(out)
}

/// Attaches the write-path programs to every tracepoint of `tracepoints`
/// that accepts them; fails if none does.
fn attach_write_path(
    loaded: &Loaded,
    tracepoints: &[(&'static str, InodeArg)],
    outcome: &mut Vec<TracepointUse>,
) -> Result<Attached, AttachError> {
    let mut out = Attached::default();
    let mut programs: HashMap<&'static str, OwnedFd> = HashMap::new();
    let mut refused = Vec::new();
    for &(tp, arg) in tracepoints {
        let name = arg.program();
        let prog = match programs.entry(name) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(loaded.program(name, ProgramKind::RawTracepoint)?)
            }
        };
        match loader::attach(prog.as_fd(), Some(tp)) {
            Ok(link) => {
                out.links.push(link);
                outcome.push((tp, Ok(())));
            }
            Err(e) => {
                refused.push(format!("{tp}: {e}"));
                outcome.push((tp, Err(e.to_string())));
            }
        }
    }
    if out.links.is_empty() {
        return Err(AttachError::NoTracepoint(if refused.is_empty() {
            "none of the write path's tracepoints is in this kernel".into()
        } else {
            refused.join("; ")
        }));
    }
    out.programs = programs.into_values().collect();
    Ok(out)
}

/// The `FLAGS` array, mmapped: one u64 per slot.
struct Flags {
    ptr: *mut AtomicU64,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics; it
// lives until Drop.
unsafe impl Send for Flags {}
// SAFETY: as above.
unsafe impl Sync for Flags {}

impl Flags {
    fn map(fd: BorrowedFd<'_>, entries: u32) -> std::io::Result<Flags> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = entries as usize;
        let bytes = (len * 8).div_ceil(page) * page;
        // libc, not rustix: rustix's mmap is just as unsafe.
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // the size against the array's. Checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Flags {
            ptr: ptr.cast(),
            len,
            bytes,
        })
    }

    fn clear(&self, slot: u32) {
        if (slot as usize) < self.len {
            // SAFETY: in bounds of the mapping, which is 8-byte aligned.
            unsafe { (*self.ptr.add(slot as usize)).store(CLEAN, Ordering::SeqCst) };
        }
    }
}

impl Drop for Flags {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

/// Runs of the programs the kernel skipped because another run was in
/// progress on the same CPU (`bpf_prog_info.recursion_misses`). Syscall
/// tracepoints are preemptible on recent kernels: a writer preempted inside
/// the program makes every write on that CPU go unseen until it resumes.
fn recursion_misses(programs: &[OwnedFd]) -> u64 {
    programs
        .iter()
        .map(|fd| {
            // SAFETY: a plain C struct; all-zero is a valid value.
            let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
            #[repr(C)]
            struct InfoAttr {
                bpf_fd: u32,
                info_len: u32,
                info: u64,
            }
            let attr = InfoAttr {
                bpf_fd: fd.as_raw_fd() as u32,
                info_len: std::mem::size_of_val(&info) as u32,
                info: &mut info as *mut _ as u64,
            };
            // SAFETY: `InfoAttr` is the `info` member of `union bpf_attr`
            // for BPF_OBJ_GET_INFO_BY_FD; its `info` points to `info`, a
            // local of `info_len` bytes that outlives the call and that the
            // kernel fills.
            let r = unsafe { bpf(aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &attr) };
            if r == 0 { info.recursion_misses } else { 0 }
        })
        .sum()
}

/// Sums of the per-CPU counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub hits: u64,
    pub watched: u64,
    pub events: u64,
    pub drops: u64,
    /// Program runs the kernel skipped (see [`recursion_misses`]).
    pub misses: u64,
}

fn read_counter(map: &PerCpuArray<MapData, u64>, slot: u32) -> u64 {
    map.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

fn read_counters(map: &PerCpuArray<MapData, u64>, programs: &[OwnedFd]) -> Counters {
    debug_assert_eq!(COUNTER_SLOTS, 4);
    Counters {
        hits: read_counter(map, COUNTER_HITS),
        watched: read_counter(map, COUNTER_WATCHED),
        events: read_counter(map, COUNTER_EVENTS),
        drops: read_counter(map, COUNTER_DROPS),
        misses: recursion_misses(programs),
    }
}

/// A file's kernel identities: one, nearly always, kept inline (a `Vec`
/// for each of 10,000 files was 0.6 MiB).
#[derive(Debug, Clone)]
enum Ids {
    One(FileId),
    Many(Box<[FileId]>),
}

impl Ids {
    fn of(mut ids: impl Iterator<Item = FileId>) -> Ids {
        let Some(first) = ids.next() else {
            return Ids::Many(Box::default());
        };
        match ids.next() {
            None => Ids::One(first),
            Some(second) => Ids::Many([first, second].into_iter().chain(ids).collect()),
        }
    }

    fn as_slice(&self) -> &[FileId] {
        match self {
            Ids::One(id) => std::slice::from_ref(id),
            Ids::Many(ids) => ids,
        }
    }

    /// Those of them `keep` keeps.
    fn only(&self, mut keep: impl FnMut(&FileId) -> bool) -> Ids {
        match self {
            Ids::One(id) if keep(id) => Ids::One(*id),
            Ids::One(_) => Ids::Many(Box::default()),
            Ids::Many(ids) => Ids::of(ids.iter().copied().filter(|id| keep(id))),
        }
    }
}

/// Which files are in the map, and their slots.
struct Table {
    watched: BpfHashMap<MapData, FileId, u32>,
    /// Each file's kernel identities in the map (see [`kernel_id`]) and
    /// slot. Which file an identity is for is the map's: its slot's owner.
    /// Two files can share one (btrfs numbers inodes per subvolume): the
    /// first keeps it, the second is polled.
    slots: HashMap<FileKey, (Ids, u32)>,
    /// The file of each slot in use.
    owners: Vec<Option<FileKey>>,
    free: Vec<u32>,
    next: u32,
    max: u32,
    /// Files the map had no room for: reported every second instead.
    overflow: Vec<(FileKey, Ids)>,
    /// Files in the map whose writes the hook does not see, or may not
    /// (see [`EbpfSource::missed`], [`needs_size_poll`]): reported every
    /// second as well.
    also_polled: Vec<FileKey>,
}

impl Table {
    fn new(watched: BpfHashMap<MapData, FileId, u32>, max: u32) -> Table {
        Table {
            watched,
            slots: HashMap::new(),
            owners: Vec::new(),
            free: Vec::new(),
            next: 0,
            max,
            overflow: Vec::new(),
            also_polled: Vec::new(),
        }
    }

    fn polled(&self) -> impl Iterator<Item = &FileKey> {
        self.overflow
            .iter()
            .map(|(k, _)| k)
            .chain(&self.also_polled)
    }

    fn polled_len(&self) -> usize {
        self.overflow.len() + self.also_polled.len()
    }

    /// The file whose slot this is.
    fn owner(&self, slot: u32) -> Option<FileKey> {
        self.owners.get(slot as usize).copied().flatten()
    }

    /// Puts `key` in the map under each of its kernel identities not taken
    /// by another file; false if there is no room, or another file has one
    /// of them (it is polled then).
    fn add(&mut self, key: FileKey, ids: Ids, flags: &Flags) -> bool {
        if self.slots.contains_key(&key) || self.overflow.iter().any(|(k, _)| *k == key) {
            return true;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.next < self.max => {
                self.next += 1;
                self.next - 1
            }
            None => {
                self.overflow.push((key, ids));
                return false;
            }
        };
        flags.clear(slot);
        let mut shared = false;
        let mine = ids.only(|id| {
            let owner = self.watched.get(id, 0).ok().and_then(|s| self.owner(s));
            let free = owner.is_none_or(|k| k == key);
            shared |= !free;
            free
        });
        let mut inserted = 0;
        let mut error = None;
        for id in mine.as_slice() {
            match self.watched.insert(*id, slot, 0) {
                Ok(()) => inserted += 1,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = error {
            tracing::warn!(error = %e, "eBPF map full; polling this file every second");
            for id in &mine.as_slice()[..inserted] {
                let _ = self.watched.remove(id);
            }
            self.free.push(slot);
            self.overflow.push((key, ids));
            return false;
        }
        if self.owners.len() <= slot as usize {
            self.owners.resize(slot as usize + 1, None);
        }
        self.owners[slot as usize] = Some(key);
        self.slots.insert(key, (mine, slot));
        if shared {
            tracing::info!(
                dev = key.dev,
                ino = key.ino,
                "another followed file has this file's kernel identity (btrfs subvolumes number inodes alike); polling it every second"
            );
            return false;
        }
        true
    }

    /// Returns a polled file that took the freed place: the caller has it
    /// read once (a write just before it entered the map).
    fn remove(&mut self, key: FileKey, flags: &Flags) -> Option<FileKey> {
        self.overflow.retain(|(k, _)| *k != key);
        self.also_polled.retain(|k| *k != key);
        if let Some((ids, slot)) = self.slots.remove(&key) {
            for id in ids.as_slice() {
                let _ = self.watched.remove(id);
            }
            self.owners[slot as usize] = None;
            // A write racing the removal may still flag the slot: its next
            // owner then gets one spurious read.
            self.free.push(slot);
            // A polled file takes the free place.
            if let Some((k, ids)) = self.overflow.pop() {
                if !self.add(k, ids, flags) && self.slots.contains_key(&k) {
                    self.also_polled.push(k);
                }
                return Some(k);
            }
        }
        None
    }
}

/// The eBPF change source: writes from the hook, directory changes from
/// inotify.
pub struct EbpfSource {
    dirs: InotifySource,
    queue: ChangeQueue,
    /// Sweeps so far, and files the sweep found grown unannounced:
    /// (sweeps in a row, last such sweep).
    sweeps: u64,
    suspects: HashMap<FileKey, (u32, u64)>,
    /// eventfd that wakes the reader (a file went to the polled list).
    wake: Arc<OwnedFd>,
    table: Arc<Mutex<Table>>,
    flags: Arc<Flags>,
    metrics: Arc<Metrics>,
    attach: Attach,
    counters: Arc<Mutex<PerCpuArray<MapData, u64>>>,
    /// Mount facts, for each file's kernel identity.
    mounts: kernel_id::Mounts,
    /// Which files the hook sees every write of.
    sees: Sees,
    /// Keeps the program attached and the maps alive.
    _hook: Hook,
}

/// Which writes the attached hook is known to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sees {
    /// Every write call (it runs on the write syscalls or the VFS write
    /// functions), on every filesystem; not io_uring or AIO writes (they
    /// call `->write_iter` directly) nor stores into a shared mmap.
    WriteCalls,
    /// The write path's tracepoints with multigrain timestamps
    /// (`ctime_ns_xchg`): the next write after a `stat` of the file
    /// re-stamps it, whatever made it (io_uring and AIO included), on the
    /// filesystems that have them ([`MULTIGRAIN`]).
    MultigrainWrites,
    /// The write path's tracepoints without them: a write into an already
    /// dirty page within one timer tick may fire nothing.
    SomeWrites,
}

impl Sees {
    fn of(hook: &Hook) -> Sees {
        match hook.attach {
            Attach::WritePath
                if hook
                    .tracepoints
                    .iter()
                    .any(|(tp, r)| *tp == "ctime_ns_xchg" && r.is_ok()) =>
            {
                Sees::MultigrainWrites
            }
            Attach::WritePath => Sees::SomeWrites,
            Attach::Fexit | Attach::TpBtf | Attach::RawTp => Sees::WriteCalls,
        }
    }
}

/// Filesystems with multigrain timestamps (`FS_MGTIME`, Linux 6.13+).
pub const MULTIGRAIN: [&str; 4] = ["ext4", "xfs", "btrfs", "tmpfs"];

/// Whether a file on a filesystem of `fs_type` must also be polled by size
/// every second: the hook may miss some of its writes.
pub fn needs_size_poll(fs_type: &str, sees: Sees) -> bool {
    match sees {
        Sees::WriteCalls => false,
        Sees::MultigrainWrites => !MULTIGRAIN.contains(&fs_type),
        Sees::SomeWrites => true,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EbpfSource {
    pub fn start(
        queue: ChangeQueue,
        metrics: Arc<Metrics>,
        opts: &Options,
    ) -> Result<EbpfSource, Unusable> {
        let mut hook = load(opts)?;
        let dirs = InotifySource::start_dirs_only(queue.clone(), metrics.clone())
            .map_err(|e| Unusable(format!("inotify for directory changes: {e}")))?;
        let watched = hook.watched.take().expect("watched map taken once");
        let table = Arc::new(Mutex::new(Table::new(watched, hook.max_files)));
        let ring = hook.ring.take().expect("ring buffer taken once");
        let wake = Arc::new(
            rustix::event::eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)
                .map_err(|e| Unusable(format!("eventfd: {}", std::io::Error::from(e))))?,
        );
        let counters = Arc::new(Mutex::new(
            hook.counters.take().expect("counters taken once"),
        ));
        let programs = hook
            .programs
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Unusable(format!("program fds: {e}")))?;
        let reader = Reader {
            ring,
            counters: counters.clone(),
            programs,
            flags: hook.flags.clone(),
            table: table.clone(),
            wake: wake.clone(),
            queue: queue.clone(),
            metrics: metrics.clone(),
            tick: opts.tick,
        };
        std::thread::Builder::new()
            .name("bpftail-ebpf".into())
            .spawn(move || reader.run())
            .map_err(|e| Unusable(format!("thread: {e}")))?;
        Ok(EbpfSource {
            dirs,
            sweeps: 0,
            suspects: HashMap::new(),
            wake,
            queue: queue.clone(),
            table,
            flags: hook.flags.clone(),
            metrics,
            attach: hook.attach,
            counters,
            mounts: kernel_id::Mounts::default(),
            sees: Sees::of(&hook),
            _hook: hook,
        })
    }

    pub fn attach(&self) -> Attach {
        self.attach
    }

    /// The kernel side's counters, summed over CPUs.
    pub fn counters(&self) -> Counters {
        read_counters(&lock(&self.counters), &self._hook.programs)
    }
}

impl ChangeSource for EbpfSource {
    fn watch_dir(&mut self, dir: &Arc<Path>) -> std::io::Result<bool> {
        self.dirs.watch_dir(dir)
    }

    fn unwatch_dir(&mut self, dir: &Path) {
        self.dirs.unwatch_dir(dir)
    }

    fn watch_file(&mut self, key: FileKey, file: Option<BorrowedFd<'_>>) {
        let view = match file {
            Some(fd) => self.mounts.view(fd, key.dev, key.ino),
            None => kernel_id::View::of_fstat(key.dev, key.ino),
        };
        let ids = Ids::of(view.ids.iter().map(|&(dev, ino)| FileId {
            dev: kernel_dev(dev),
            pad: 0,
            ino,
        }));
        let poll = needs_size_poll(&view.fs_type, self.sees);
        let mut t = lock(&self.table);
        let fully = t.add(key, ids, &self.flags);
        // In the map but not under all its names (or on a filesystem the
        // hook cannot vouch for): polled as well.
        let partly = !fully && t.slots.contains_key(&key);
        if (poll && fully || partly) && !t.also_polled.contains(&key) {
            t.also_polled.push(key);
        }
        if poll || !fully {
            wake(&self.wake);
        }
        self.metrics.ebpf_unwatched_files.set(t.polled_len() as u64);
    }

    fn unwatch_file(&mut self, key: FileKey) {
        let mut t = lock(&self.table);
        if let Some(promoted) = t.remove(key, &self.flags) {
            let mut p = Pending::default();
            p.keys.insert(promoted);
            self.queue.merge(&mut p);
        }
        self.metrics.ebpf_unwatched_files.set(t.polled_len() as u64);
    }

    fn sweep(&mut self) {
        // The reader refreshes these when it wakes; an idle reader (or one
        // whose events are all lost) does not.
        publish(&self.metrics, self.counters());
        self.sweeps += 1;
        let now = self.sweeps;
        self.suspects.retain(|_, (_, last)| *last + 1 >= now);
    }

    fn arms_by_stat(&self) -> bool {
        self.attach == Attach::WritePath
    }

    fn sees_every_write(&self) -> bool {
        self.sees == Sees::MultigrainWrites
    }

    fn missed(&mut self, key: FileKey) {
        // Growth found by MISSES_TO_POLL sweeps in a row that no event
        // announced: the hook does not see this file's writes (e.g. it is
        // written through a shared mmap, or an overlay copied it up after
        // it was opened). It stays in the map and is also polled
        // every second. A busy file can be caught by chance (a write a few
        // ms before the sweep): then it is only read once more a second.
        let now = self.sweeps;
        let e = self.suspects.entry(key).or_insert((0, now));
        e.0 = if e.1 + 1 >= now { e.0 + 1 } else { 1 };
        e.1 = now;
        if e.0 == MISSES_TO_POLL {
            let mut t = lock(&self.table);
            if t.slots.contains_key(&key) && !t.also_polled.contains(&key) {
                tracing::info!(
                    dev = key.dev,
                    ino = key.ino,
                    "writes to this file were found by the sweep, not reported by the eBPF hook; polling it every second too"
                );
                t.also_polled.push(key);
                self.metrics.ebpf_unwatched_files.set(t.polled_len() as u64);
                wake(&self.wake);
            }
        }
    }
}

/// Sweeps in a row that must find unannounced growth in a file before it
/// is polled as well.
const MISSES_TO_POLL: u32 = 3;

/// Wakes the reader (it may be asleep with nothing to poll).
fn wake(fd: &OwnedFd) {
    // Fails only when the counter is about to overflow: the reader is
    // awake then anyway.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

fn publish(metrics: &Metrics, c: Counters) {
    metrics.ebpf_hook_hits.set(c.hits);
    metrics.ebpf_watched_writes.set(c.watched);
    metrics.ebpf_events.set(c.events);
    metrics.ebpf_drops.set(c.drops);
    metrics.ebpf_misses.set(c.misses);
}

struct Reader {
    ring: RingBuf<MapData>,
    counters: Arc<Mutex<PerCpuArray<MapData, u64>>>,
    programs: Vec<OwnedFd>,
    flags: Arc<Flags>,
    table: Arc<Mutex<Table>>,
    wake: Arc<OwnedFd>,
    queue: ChangeQueue,
    metrics: Arc<Metrics>,
    tick: Duration,
}

/// Once the kernel has skipped runs of the program, the reader keeps
/// checking for more this long after each event (every [`LINGER_EVERY`]):
/// the write that ended a burst may be one the program did not see. While
/// no run was ever skipped it does not linger (no extra wakeups); a skipped
/// run it cannot see at once is still found by the safety sweep.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_EVERY: Duration = Duration::from_millis(50);
/// Skipped runs make the loop read every file, at most this often.
const MISS_READ_EVERY: Duration = Duration::from_millis(100);

/// The time left until `t`, in whole milliseconds (as `poll(2)` takes it).
fn timeout_until(t: Instant) -> Timespec {
    let ms = t
        .saturating_duration_since(Instant::now())
        .as_millis()
        .min(i32::MAX as u128) as i64;
    Timespec {
        tv_sec: ms / 1000,
        tv_nsec: (ms % 1000) * 1_000_000,
    }
}

impl Reader {
    fn run(mut self) {
        let mut st = PassState::new(&self);
        let mut batch = Pending::default();
        loop {
            let has_overflow = lock(&self.table).polled_len() > 0;
            match self.wait(st.deadline(has_overflow)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "polling the eBPF ring buffer failed; falling back to the safety sweep");
                    return;
                }
            }
            // Events gather in the ring buffer meanwhile.
            pace(&mut st.last_pass, self.tick);
            self.metrics.watcher_wakeups.inc();
            self.collect(&mut st, &mut batch);
            let now = Instant::now();
            self.check_losses(&mut st, &mut batch, now);
            if has_overflow && now >= st.next_poll {
                batch.keys.extend(lock(&self.table).polled().copied());
                st.next_poll = now + Duration::from_secs(1);
            }
            // Fresh figures every second while busy, and once more a
            // second after the last events (then the reader sleeps).
            if now >= st.next_counters {
                publish(
                    &self.metrics,
                    read_counters(&lock(&self.counters), &self.programs),
                );
                st.next_counters = now + Duration::from_secs(1);
                st.stale = false;
            } else if !st.slots.is_empty() {
                st.stale = true;
            }
            self.queue.merge(&mut batch);
        }
    }

    /// Sleeps until the ring buffer has events, the eventfd is written, or
    /// `deadline`.
    fn wait(&self, deadline: Option<Instant>) -> std::io::Result<()> {
        let timeout = deadline.map(timeout_until);
        let mut pfds = [
            PollFd::new(&self.ring, PollFlags::IN),
            PollFd::new(&*self.wake, PollFlags::IN),
        ];
        let n = rustix::event::poll(&mut pfds, timeout.as_ref()).map_err(std::io::Error::from)?;
        if n > 0 && pfds[1].revents().contains(PollFlags::IN) {
            // Resets the eventfd's counter; nothing to do if that fails
            // (it stays readable: one more pass).
            let _ = rustix::io::read(&*self.wake, &mut [0u8; 8]);
        }
        Ok(())
    }

    /// Takes the new events and re-arms their files before handing them to
    /// the loop: the loop reads after the clear, so a write before it is
    /// read then, and one after it makes a new event (at most one per file
    /// per pass, a tick apart).
    fn collect(&mut self, st: &mut PassState, batch: &mut Pending) {
        st.slots.clear();
        while let Some(item) = self.ring.next() {
            if item.len() < std::mem::size_of::<WriteEvent>() {
                continue;
            }
            // SAFETY: length checked; WriteEvent is plain integers.
            let ev: WriteEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            st.slots.push(ev.slot);
        }
        if !st.slots.is_empty() {
            let t = lock(&self.table);
            batch
                .keys
                .extend(st.slots.iter().filter_map(|&slot| t.owner(slot)));
        }
        for &slot in &st.slots {
            self.flags.clear(slot);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if !st.slots.is_empty() && st.last_misses > 0 {
            st.linger_until = Instant::now() + LINGER;
        }
    }

    /// Events the program could not deliver, or runs the kernel skipped:
    /// the loop reads every file.
    fn check_losses(&self, st: &mut PassState, batch: &mut Pending, now: Instant) {
        let drops = read_counter(&lock(&self.counters), COUNTER_DROPS);
        if drops > st.last_drops {
            tracing::debug!(
                lost = drops - st.last_drops,
                "eBPF events lost; reading every file"
            );
            batch.all_files = true;
            st.last_drops = drops;
        }
        let misses = recursion_misses(&self.programs);
        if misses > st.last_misses {
            st.miss_pending = true;
            st.last_misses = misses;
            st.linger_until = now + LINGER;
        }
        if st.miss_pending && now >= st.next_miss_read {
            batch.all_files = true;
            st.miss_pending = false;
            st.next_miss_read = now + MISS_READ_EVERY;
        }
    }
}

/// What the reader remembers between passes.
struct PassState {
    /// Slots of this pass's events (a reused buffer).
    slots: Vec<u32>,
    last_pass: Instant,
    last_drops: u64,
    last_misses: u64,
    miss_pending: bool,
    next_miss_read: Instant,
    linger_until: Instant,
    next_poll: Instant,
    next_counters: Instant,
    /// Events came since the counters were last published.
    stale: bool,
}

impl PassState {
    fn new(r: &Reader) -> PassState {
        let now = Instant::now();
        PassState {
            slots: Vec::new(),
            last_pass: now - r.tick,
            last_drops: 0,
            last_misses: recursion_misses(&r.programs),
            miss_pending: false,
            next_miss_read: now,
            linger_until: now,
            next_poll: now + Duration::from_secs(1),
            next_counters: now,
            stale: false,
        }
    }

    /// When the reader must wake without an event (`None`: only for one).
    fn deadline(&self, has_overflow: bool) -> Option<Instant> {
        let now = Instant::now();
        [
            self.miss_pending.then_some(self.next_miss_read),
            (now < self.linger_until).then_some(now + LINGER_EVERY),
            has_overflow.then_some(self.next_poll),
            self.stale.then_some(self.next_counters),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_object_is_built_with_the_agents_ring_buffer_size() {
        // Catches an object left over from a build of other sources.
        let object = OBJECT.expect("this bpftail carries its eBPF object");
        let obj = aya_obj::Object::parse(object).unwrap();
        let events = obj.maps.get(MAP_EVENTS).expect("an EVENTS map");
        assert_eq!(events.max_entries(), RING_BYTES);
    }

    #[test]
    fn a_files_identities_are_inline_when_one_and_filtered_in_order() {
        let id = |ino| FileId {
            dev: 1,
            pad: 0,
            ino,
        };
        let one = Ids::of([id(7)].into_iter());
        assert!(matches!(one, Ids::One(_)));
        assert_eq!(one.as_slice(), &[id(7)]);
        assert!(one.only(|_| false).as_slice().is_empty());
        let three = Ids::of([id(1), id(2), id(3)].into_iter());
        assert_eq!(three.as_slice(), &[id(1), id(2), id(3)]);
        assert_eq!(three.only(|i| i.ino != 2).as_slice(), &[id(1), id(3)]);
        assert!(matches!(three.only(|i| i.ino == 3), Ids::One(_)));
        assert!(Ids::of(std::iter::empty()).as_slice().is_empty());
    }

    #[test]
    fn dev_numbers_convert_both_ways() {
        let st_dev = libc::makedev(254, 0);
        assert_eq!(kernel_dev(st_dev), 266338304);
        assert_eq!(user_dev(266338304), st_dev);
        let st_dev = libc::makedev(8, 17);
        assert_eq!(user_dev(kernel_dev(st_dev)), st_dev);
    }
}
