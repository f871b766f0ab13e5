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
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Reports what change detection this kernel offers.
fn probe() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel: {}", release.trim());
    println!(
        "btf: {}",
        std::path::Path::new("/sys/kernel/btf/vmlinux").exists()
    );
    let inotify = inotify::Inotify::init();
    println!(
        "inotify: {}",
        if inotify.is_ok() {
            "available"
        } else {
            "unavailable"
        }
    );
    println!("ebpf: not in this release");
    println!("fanotify: not in this release");
    println!(
        "watcher auto picks: {}",
        if inotify.is_ok() { "inotify" } else { "poll" }
    );
}
