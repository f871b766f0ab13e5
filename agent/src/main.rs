use std::process::ExitCode;

use clap::Parser;

use bpftail::config::{Cli, Command, Config, LogFormat, ProbeArgs};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let args = *args;
            let cfg = match Config::resolve(args.clone()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("bpftail: configuration error: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(cfg.log_format);
            match bpftail::run(cfg, args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Once, through the log (stderr, JSON where asked).
                    tracing::error!("{}", causes(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Probe(args) => {
            probe(&args);
            ExitCode::SUCCESS
        }
        Command::Consume(args) => bpftail::consume::main(&args),
    }
}

/// mimalloc (v3 as the -sys crate builds it) gives freed pages back to the
/// system at once (`MIMALLOC_PURGE_DELAY=0`) rather than a second later: its
/// delayed purge runs only when the thread that freed the memory allocates
/// again, so a thread that went quiet after a burst (the data loop after the
/// first scan, the sender after an outage) kept what it had freed — 9 MiB
/// more at the peak with 10,000 files (`cargo xtask bench scale`). The
/// variable, when set, still wins.
fn tune_allocator() {
    #[cfg(feature = "mimalloc")]
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        /// `mi_option_purge_delay` in mimalloc.h (the same in v2 and v3),
        /// which the -sys crate does not name.
        const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        // SAFETY: sets a documented option; no memory is touched.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
    }
}

/// An error and its causes, each said once: a cause an error's own message
/// already quotes (`cannot create data directory /x: Not a directory`) is
/// not repeated after it.
fn causes(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BPFTAIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Reports what change detection this kernel offers, what
/// `--watcher auto` would choose, and the filesystems of the log
/// directories. Needs no broker; always exits 0.
fn probe(args: &ProbeArgs) {
    use bpftail::watch::{ebpf, fanotify};
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel: {}", release.trim());
    println!("arch: {}", std::env::consts::ARCH);
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    println!(
        "btf: {}",
        if btf {
            "available (/sys/kernel/btf/vmlinux)"
        } else {
            "missing"
        }
    );
    let lockdown = match std::fs::read_to_string("/sys/kernel/security/lockdown") {
        Ok(s) => s
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']').map(str::to_owned))
            .unwrap_or_else(|| s.trim().to_owned()),
        Err(_) => "unknown (securityfs not mounted at /sys/kernel/security)".into(),
    };
    println!("lockdown: {lockdown}");
    println!(
        "ebpf object: {}",
        if ebpf::embedded() {
            "embedded"
        } else {
            "missing (built with BPFTAIL_NO_EBPF=1)"
        }
    );
    let mut usable = Vec::new();
    let mut multigrain = false;
    for (attach, result) in ebpf::probe() {
        match result {
            Ok(()) => {
                println!("ebpf {}: loads and attaches", attach.name());
                usable.push(attach);
            }
            Err(e) => println!("ebpf {}: refused: {e}", attach.name()),
        }
        if attach == ebpf::Attach::WritePath
            && let Ok(tracepoints) = ebpf::probe_tracepoints()
        {
            for (tp, r) in tracepoints {
                multigrain |= tp == "ctime_ns_xchg" && r.is_ok();
                match r {
                    Ok(()) => println!("  tracepoint {tp}: attaches"),
                    Err(e) => println!("  tracepoint {tp}: not used: {e}"),
                }
            }
        }
    }
    match usable.first() {
        Some(a) => println!("ebpf: usable ({})", a.name()),
        None => println!("ebpf: unusable"),
    }
    let fan = fanotify::probe();
    match &fan {
        Ok(()) => println!("fanotify: usable"),
        Err(e) => println!("fanotify: unusable: {e}"),
    }
    let inotify = inotify::Inotify::init();
    match &inotify {
        Ok(_) => println!("inotify: usable"),
        Err(e) => println!("inotify: unusable: {e}"),
    }
    println!("poll: usable");
    let auto = bpftail::watch::auto_choice(&usable, fan.is_ok(), inotify.is_ok());
    println!("auto picks: {auto}");
    if usable.first() == Some(&ebpf::Attach::WritePath) {
        let sees = if multigrain {
            ebpf::Sees::MultigrainWrites
        } else {
            ebpf::Sees::SomeWrites
        };
        print_filesystems(args, sees);
    }
    if !usable.iter().any(|a| ebpf::Attach::ALL.contains(a)) && !usable.is_empty() {
        println!(
            "  (eBPF runs here only on the sys_exit tracepoint, which slows every syscall on the node; auto prefers fanotify. --watcher ebpf --ebpf-attach tp-btf forces it.)"
        );
    }
}

/// The filesystem of each log directory, and whether its files are also
/// polled by size with the write-path watcher.
fn print_filesystems(args: &ProbeArgs, sees: bpftail::watch::ebpf::Sees) {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    println!("log directories (write-path watcher):");
    let mut mounts = bpftail::watch::kernel_id::Mounts::default();
    for dir in [&args.pods_dir, &args.docker_dir, &args.kubelet_pods_dir] {
        let Ok(f) = std::fs::File::open(dir) else {
            println!("  {}: missing", dir.display());
            continue;
        };
        let Ok(md) = f.metadata() else { continue };
        let view = mounts.view(f.as_fd(), md.dev(), md.ino());
        let fs = if view.fs_type.is_empty() {
            "unknown filesystem"
        } else {
            view.fs_type.as_str()
        };
        let how = if bpftail::watch::ebpf::needs_size_poll(&view.fs_type, sees) {
            "its files are also polled by size every second"
        } else {
            "events only (multigrain timestamps)"
        };
        println!("  {}: {fs}: {how}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::causes;

    #[test]
    fn each_cause_is_said_once() {
        let quoted = anyhow::Error::new(std::io::Error::other("Not a directory"))
            .context("cannot create data directory /x: Not a directory");
        assert_eq!(
            causes(&quoted),
            "cannot create data directory /x: Not a directory"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(causes(&plain), "outer: inner");
    }
}
