//! bpftail's kernel side: after a write completes, find the written file's
//! `(dev, ino)`; if the agent watches it, set its pending flag and, when
//! the flag was clear, emit one ring-buffer event. A burst of writes to one
//! file is one event until the agent clears the flag (on a short tick),
//! after which it reads the file. Writes to other files emit nothing.
//!
//! Attachments, chosen by the agent at load time:
//! - raw tracepoints of the write path itself (timestamp and writeback
//!   tracepoints: they fire for file writes only, never for other
//!   syscalls), whose arguments lead to the written inode; the agent's own
//!   threads are ignored (its reads must not report themselves);
//! - fexit on the VFS write functions (the `struct file` is an argument;
//!   runs only for writes). Needs BPF trampolines, which kernel lockdown
//!   refuses.
//! - `sys_exit` (BTF-enabled or raw tracepoint), filtered to the
//!   write-family syscalls, walking `current->files` to the fd's file.
//!   Runs for every syscall on the node, exiting early for the others.
//!
//! Struct field offsets and syscall numbers are globals the agent fills in
//! from the running kernel's BTF, so one object runs on many kernels.

#![no_std]
#![no_main]
// Atomic add (BPF_ATOMIC | BPF_ADD); core's atomics lack fetch_add on bpfel.
#![allow(internal_features)]
#![feature(core_intrinsics, adt_const_params)]

#[path = "shared.rs"]
#[allow(dead_code, reason = "constants for the agent side")]
mod shared;

use aya_ebpf::Global;
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel};
use aya_ebpf::macros::{btf_tracepoint, fexit, map, raw_tracepoint};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{BtfTracePointContext, FExitContext, RawTracePointContext};

use shared::{
    CLEAN, COUNTER_DROPS, COUNTER_EVENTS, COUNTER_HITS, COUNTER_SLOTS, COUNTER_WATCHED, FileId,
    PENDING, RING_BYTES, WriteEvent,
};

/// `BPF_F_NO_PREALLOC`: entries are allocated when the agent adds a file.
const NO_PREALLOC: u32 = 1;
/// `BPF_F_MMAPABLE`: the agent maps the flags into its memory and clears
/// them with plain stores, no syscall per file.
const MMAPABLE: u32 = 1 << 10;

/// Watched files → their slot in `FLAGS`. Only the agent adds and removes
/// entries; sizes are set by the agent at load time.
#[map]
static WATCHED: HashMap<FileId, u32> = HashMap::with_max_entries(16384, NO_PREALLOC);

/// One pending flag per slot (`CLEAN` / `PENDING`).
#[map]
static FLAGS: Array<u64> = Array::with_max_entries(16384, MMAPABLE);

/// Sized by the agent at load time as well; the default is shared with it.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

// Field offsets (bytes), from the running kernel's BTF.
#[unsafe(no_mangle)]
static OFF_TASK_FILES: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_FILES_FDT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_FDT_MAX_FDS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_FDT_FD: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_FILE_INODE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_INODE_INO: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_INODE_SB: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SB_DEV: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_MAPPING_HOST: Global<u32> = Global::new(0);

/// The agent's process id: writes and timestamp updates its own threads
/// cause are not reported.
#[unsafe(no_mangle)]
static AGENT_TGID: Global<u32> = Global::new(0);
/// `pt_regs`: the syscall number and the first and third arguments.
#[unsafe(no_mangle)]
static OFF_REGS_NR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_REGS_ARG0: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_REGS_ARG2: Global<u32> = Global::new(0);

// Syscall numbers of this architecture (-1: not watched).
#[unsafe(no_mangle)]
static SYS_WRITE: Global<i64> = Global::new(-1);
#[unsafe(no_mangle)]
static SYS_PWRITE64: Global<i64> = Global::new(-1);
#[unsafe(no_mangle)]
static SYS_WRITEV: Global<i64> = Global::new(-1);
#[unsafe(no_mangle)]
static SYS_PWRITEV: Global<i64> = Global::new(-1);
#[unsafe(no_mangle)]
static SYS_PWRITEV2: Global<i64> = Global::new(-1);
#[unsafe(no_mangle)]
static SYS_SENDFILE: Global<i64> = Global::new(-1);
#[unsafe(no_mangle)]
static SYS_SPLICE: Global<i64> = Global::new(-1);
#[unsafe(no_mangle)]
static SYS_COPY_FILE_RANGE: Global<i64> = Global::new(-1);

/// Tests only: non-zero drops every event as if the ring buffer were full.
#[unsafe(no_mangle)]
static SABOTAGE: Global<u32> = Global::new(0);

#[inline(always)]
fn count(slot: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a valid, aligned per-CPU slot. Atomic: a program run can
        // be preempted by another on the same CPU.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                p, 1,
            )
        };
    }
}

/// Reads a `T` at `base + off` in kernel memory.
#[inline(always)]
fn read<T>(base: *const u8, off: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an
    // error, not a fault.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T).ok() }
}

/// The pending-flag logic, given the written `struct file *`.
#[inline(always)]
fn file_written(file: *const u8) -> Option<()> {
    let inode: *const u8 = read(file, OFF_FILE_INODE.load())?;
    inode_written(inode)
}

/// The pending-flag logic, given the written `struct inode *`.
#[inline(always)]
fn inode_written(inode: *const u8) -> Option<()> {
    let ino: u64 = read(inode, OFF_INODE_INO.load())?;
    let sb: *const u8 = read(inode, OFF_INODE_SB.load())?;
    let dev: u32 = read(sb, OFF_SB_DEV.load())?;
    let id = FileId { dev, pad: 0, ino };
    // SAFETY: a map value, copied out.
    let slot = unsafe { *WATCHED.get(&id)? };
    let flag = FLAGS.get_ptr_mut(slot)?;
    count(COUNTER_WATCHED);
    // SAFETY: `flag` points into the array, valid for this run. A racing
    // writer on another CPU may also see CLEAN: two events, which the
    // agent coalesces.
    unsafe {
        if core::ptr::read_volatile(flag) != CLEAN {
            return Some(());
        }
        core::ptr::write_volatile(flag, PENDING);
    }
    let sent = SABOTAGE.load() == 0
        && EVENTS
            .output::<WriteEvent>(
                &WriteEvent {
                    file: id,
                    slot,
                    pad: 0,
                },
                0,
            )
            .is_ok();
    if sent {
        count(COUNTER_EVENTS);
    } else {
        // Clear again so the next write retries; the agent sees the drop
        // count rise and reads every file.
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(flag, CLEAN) };
        count(COUNTER_DROPS);
    }
    Some(())
}

/// `sys_exit(regs, ret)`: the write-family syscalls that wrote something.
#[inline(always)]
fn sys_exit(regs: *const u8, ret: i64) -> Option<()> {
    if ret <= 0 {
        return None;
    }
    let nr: i64 = read(regs, OFF_REGS_NR.load())?;
    let fd_off = if nr == SYS_WRITE.load()
        || nr == SYS_PWRITE64.load()
        || nr == SYS_WRITEV.load()
        || nr == SYS_PWRITEV.load()
        || nr == SYS_PWRITEV2.load()
        || nr == SYS_SENDFILE.load()
    {
        OFF_REGS_ARG0.load()
    } else if nr == SYS_SPLICE.load() || nr == SYS_COPY_FILE_RANGE.load() {
        OFF_REGS_ARG2.load()
    } else {
        return None;
    };
    count(COUNTER_HITS);
    let fd: u64 = read(regs, fd_off)?;
    // SAFETY: a helper without preconditions.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let files: *const u8 = read(task, OFF_TASK_FILES.load())?;
    let fdt: *const u8 = read(files, OFF_FILES_FDT.load())?;
    let max_fds: u32 = read(fdt, OFF_FDT_MAX_FDS.load())?;
    if fd >= max_fds as u64 {
        return None;
    }
    let fds: *const u8 = read(fdt, OFF_FDT_FD.load())?;
    let file: *const u8 = read(fds, (fd as u32).wrapping_mul(8))?;
    file_written(file)
}

#[btf_tracepoint(function = "sys_exit")]
pub fn bpftail_sys_exit_btf(ctx: BtfTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    let _ = sys_exit(regs, ret);
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn bpftail_sys_exit_raw(ctx: RawTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    let _ = sys_exit(regs, ret);
    0
}

/// fexit on a VFS write function whose first argument is the file.
#[inline(always)]
fn vfs_exit(ctx: &FExitContext) -> i32 {
    let ret: i64 = ctx.ret().unwrap_or(0);
    if ret > 0 {
        count(COUNTER_HITS);
        let file: *const u8 = ctx.arg(0);
        let _ = file_written(file);
    }
    0
}

#[fexit(function = "vfs_write")]
pub fn bpftail_vfs_write(ctx: FExitContext) -> i32 {
    vfs_exit(&ctx)
}

#[fexit(function = "vfs_writev")]
pub fn bpftail_vfs_writev(ctx: FExitContext) -> i32 {
    vfs_exit(&ctx)
}

#[fexit(function = "vfs_iter_write")]
pub fn bpftail_vfs_iter_write(ctx: FExitContext) -> i32 {
    vfs_exit(&ctx)
}

#[fexit(function = "vfs_iocb_iter_write")]
pub fn bpftail_vfs_iocb_iter_write(ctx: FExitContext) -> i32 {
    vfs_exit(&ctx)
}

/// A write-path tracepoint fired by a thread other than the agent's.
#[inline(always)]
fn write_path_hit() -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == AGENT_TGID.load() {
        return false;
    }
    count(COUNTER_HITS);
    true
}

/// Write-path tracepoints whose first argument is the `struct inode *`
/// (`timestamp:ctime_ns_xchg`, `writeback:writeback_mark_inode_dirty`,
/// `ext4:ext4_da_write_end`, …). The tracepoint is named at attach time.
#[raw_tracepoint(tracepoint = "writeback_mark_inode_dirty")]
pub fn bpftail_inode_arg0(ctx: RawTracePointContext) -> i32 {
    if write_path_hit() {
        let inode: *const u8 = ctx.arg(0);
        let _ = inode_written(inode);
    }
    0
}

/// Write-path tracepoints whose second argument is the written file's
/// `struct address_space *` (`writeback:writeback_dirty_folio`).
#[raw_tracepoint(tracepoint = "writeback_dirty_folio")]
pub fn bpftail_mapping_arg1(ctx: RawTracePointContext) -> i32 {
    if write_path_hit() {
        let mapping: *const u8 = ctx.arg(1);
        if let Some(inode) = read::<*const u8>(mapping, OFF_MAPPING_HOST.load()) {
            let _ = inode_written(inode);
        }
    }
    0
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
