//! The kernel's BTF (`/sys/kernel/btf/vmlinux`) as the eBPF watcher reads
//! it: `watch::btf::Btf::parse`, then every lookup the agent makes with
//! the names it uses (`watch/ebpf.rs`: struct members for the program's
//! globals, the write-path tracepoints' arguments, `btf_trace_sys_exit`,
//! the fexit programs' functions).
//!
//! Input: the BTF blob. Checked: no panic, no endless loop or recursion
//! (however the types refer to each other), and what a lookup finds is
//! consistent (a found function has an id, a tracepoint has its typedef).
// `cargo test --bins` builds this with a test harness, which has its own main.
#![cfg_attr(not(test), no_main)]

use bpftail::watch::btf::Btf;

/// `watch/ebpf.rs`'s `globals`.
const MEMBERS: &[(&str, &str)] = &[
    ("task_struct", "files"),
    ("files_struct", "fdt"),
    ("fdtable", "max_fds"),
    ("fdtable", "fd"),
    ("file", "f_inode"),
    ("inode", "i_ino"),
    ("inode", "i_sb"),
    ("super_block", "s_dev"),
    ("address_space", "host"),
    ("pt_regs", "orig_ax"),
    ("pt_regs", "di"),
    ("pt_regs", "dx"),
];

/// `WRITE_PATH`, and `sys_exit` (the raw tracepoint's).
const TRACEPOINTS: &[&str] = &[
    "ctime_ns_xchg",
    "ctime_xchg_skip",
    "writeback_mark_inode_dirty",
    "writeback_dirty_folio",
    "sys_exit",
];

/// `FEXIT_PROGRAMS`' functions.
const FUNCTIONS: &[&str] = &[
    "vfs_write",
    "vfs_writev",
    "vfs_iter_write",
    "vfs_iocb_iter_write",
];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data.to_vec()) else {
        return;
    };
    for (st, field) in MEMBERS {
        let _ = btf.member(st, field);
    }
    for tp in TRACEPOINTS {
        if btf.tracepoint_args(tp).is_some() {
            assert!(btf.typedef_id(&format!("btf_trace_{tp}")).is_some());
        }
    }
    let _ = btf.typedef_id("btf_trace_sys_exit");
    for f in FUNCTIONS {
        assert_eq!(btf.function_id(f).is_some(), btf.has_function(f));
    }
});
