//! Types shared by the eBPF programs and the agent (`#[repr(C)]`, no_std).
//! The agent includes this file with `#[path]`; keep it dependency-free.

/// A file as the kernel names it: `inode->i_sb->s_dev` (the kernel's
/// encoding, `MAJOR << 20 | MINOR`) and `inode->i_ino`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u32,
    pub pad: u32,
    pub ino: u64,
}

/// One ring-buffer record: a watched file went from clean to pending.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteEvent {
    pub file: FileId,
    /// The file's slot in the flags array.
    pub slot: u32,
    pub pad: u32,
}

/// Slots of the per-CPU counter array.
pub const COUNTER_HITS: u32 = 0;
/// Writes to files in the watched map.
pub const COUNTER_WATCHED: u32 = 1;
/// Events put into the ring buffer.
pub const COUNTER_EVENTS: u32 = 2;
/// Events lost (ring buffer full, or sabotaged on purpose).
pub const COUNTER_DROPS: u32 = 3;
pub const COUNTER_SLOTS: u32 = 4;

/// The pending flags (a u64 per slot of the mmapable `FLAGS` array). The
/// program sets one and emits an event when it goes from `CLEAN` to
/// `PENDING`; the agent sets it back to `CLEAN`, then reads the file.
pub const CLEAN: u64 = 0;
pub const PENDING: u64 = 1;

/// The size of the `EVENTS` ring buffer in bytes (a power of two, at least
/// a page). The object is built with it, and the agent sets it again when it
/// loads the object (`watch::ebpf::RING_BYTES`, `Options::ring_bytes`).
pub const RING_BYTES: u32 = 256 * 1024;

/// Names the agent uses to find the maps and programs in the object.
pub const MAP_WATCHED: &str = "WATCHED";
pub const MAP_FLAGS: &str = "FLAGS";
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const PROG_TP_BTF: &str = "bpftail_sys_exit_btf";
pub const PROG_RAW_TP: &str = "bpftail_sys_exit_raw";
/// Raw-tracepoint programs for the write path's static tracepoints, by how
/// they find the written inode: the tracepoint's first argument is the
/// `struct inode *`; or its second is a `struct address_space *` whose
/// `host` is.
pub const PROG_INODE_ARG0: &str = "bpftail_inode_arg0";
pub const PROG_MAPPING_ARG1: &str = "bpftail_mapping_arg1";
/// fexit programs and the kernel functions they attach to.
pub const FEXIT_PROGRAMS: [(&str, &str); 4] = [
    ("bpftail_vfs_write", "vfs_write"),
    ("bpftail_vfs_writev", "vfs_writev"),
    ("bpftail_vfs_iter_write", "vfs_iter_write"),
    ("bpftail_vfs_iocb_iter_write", "vfs_iocb_iter_write"),
];
