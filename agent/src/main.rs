use std::process::ExitCode;

use clap::Parser;

use bpftail::config::{Cli, Command, Config, LogFormat};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let cfg = match Config::resolve(*args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("bpftail: configuration error: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(cfg.log_format);
            match bpftail::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("bpftail: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Probe => {
            probe();
            ExitCode::SUCCESS
        }
    }
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

/// Reports what change detection this kernel offers, and what
/// `--watcher auto` would choose. Needs no broker; always exits 0.
fn probe() {
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
    if !usable.iter().any(|a| ebpf::Attach::ALL.contains(a)) && !usable.is_empty() {
        println!(
            "  (eBPF runs here only on the sys_exit tracepoint, which slows every syscall on the node; auto prefers fanotify. --watcher ebpf --ebpf-attach tp-btf forces it.)"
        );
    }
}
