//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! A missing object stops the build with instructions, so an agent without
//! its eBPF watcher is never shipped by accident. `BPFTAIL_NO_EBPF=1` builds
//! one on purpose (the eBPF watcher then reports itself unavailable).

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(bpftail_ebpf)");
    println!("cargo::rerun-if-env-changed=BPFTAIL_EBPF_OBJECT");
    println!("cargo::rerun-if-env-changed=BPFTAIL_NO_EBPF");
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");
    if std::env::var_os("BPFTAIL_NO_EBPF").is_some_and(|v| v == "1") {
        println!("cargo::warning=BPFTAIL_NO_EBPF=1: building bpftail without its eBPF watcher");
        return;
    }
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let object = match std::env::var_os("BPFTAIL_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| manifest.join("../target"))
            .join("bpfel-unknown-none/release/bpftail-ebpf"),
    };
    println!("cargo::rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "\n\nThe eBPF object {} is missing.\nBuild it first with `cargo xtask build-ebpf` \
             (it installs what it needs), or set BPFTAIL_EBPF_OBJECT to its path,\n\
             or BPFTAIL_NO_EBPF=1 to build an agent without the eBPF watcher.\n\n",
            object.display()
        );
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("bpftail.bpf.o");
    std::fs::copy(&object, &out).expect("copying the eBPF object");
    println!("cargo::rustc-cfg=bpftail_ebpf");
}
