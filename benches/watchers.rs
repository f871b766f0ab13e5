//! Change-detection benchmark: each backend (ebpf, fanotify, inotify, poll)
//! follows 1,000 container log files, first idle, then each written at a
//! modest rate. Prints per backend: the agent's wakeups per second (context
//! switches of all its threads, split into the agent's own threads and
//! librdkafka's), its CPU, and lines per second delivered. Then the cost of
//! the eBPF hook to the rest of the node: the slowdown of unrelated
//! syscall-heavy loops (small writes to an unwatched file; getpid) with the
//! hook attached versus not. Measures; asserts nothing.
//!
//! `cargo xtask bench watchers [-- --files N --rate LINES_PER_FILE_PER_S --secs S --backends ebpf,inotify]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::*;

/// CPU time (ns) and context switches of every thread of `pid`, split into
/// librdkafka's threads (`rdk:*`) and the agent's own.
#[derive(Debug, Default, Clone)]
struct Usage {
    cpu_ns: u64,
    own_switches: u64,
    rdk_switches: u64,
    /// Per thread (tid, name): context switches and CPU ns.
    threads: std::collections::BTreeMap<(String, String), (u64, u64)>,
}

fn usage(pid: u32) -> Usage {
    let mut u = Usage::default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return u;
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let sched = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        let cpu = sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        u.cpu_ns += cpu;
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let switches: u64 = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        u.threads.insert(
            (
                t.file_name().to_string_lossy().into_owned(),
                comm.trim().to_owned(),
            ),
            (switches, cpu),
        );
        if comm.starts_with("rdk:") {
            u.rdk_switches += switches;
        } else {
            u.own_switches += switches;
        }
    }
    u
}

struct Phase {
    own_wakeups_per_s: f64,
    rdk_wakeups_per_s: f64,
    watcher_passes_per_s: f64,
    cpu_percent: f64,
    lines_per_s: f64,
}

fn measure(agent: &Agent, during: impl FnOnce()) -> Phase {
    let pid = agent.pid();
    let m0 = agent.metrics();
    let u0 = usage(pid);
    let t0 = Instant::now();
    during();
    let wall = t0.elapsed().as_secs_f64();
    let u1 = usage(pid);
    if std::env::args().any(|a| a == "--threads") {
        for (k, (sw, cpu)) in &u1.threads {
            let (sw0, cpu0) = u0.threads.get(k).copied().unwrap_or((0, 0));
            eprintln!(
                "    thread {:>8} {:<16} {:>8.1} switches/s {:>8.3} % CPU",
                k.0,
                k.1,
                (sw - sw0) as f64 / wall,
                (cpu - cpu0) as f64 / 1e9 / wall * 100.0
            );
        }
    }
    let m1 = agent.metrics();
    let delta = |k: &str| {
        m1.get(k)
            .unwrap_or(&0)
            .saturating_sub(*m0.get(k).unwrap_or(&0)) as f64
    };
    Phase {
        // Minus the two scrapes of this measurement.
        own_wakeups_per_s: (u1.own_switches.saturating_sub(u0.own_switches + 4)) as f64 / wall,
        rdk_wakeups_per_s: (u1.rdk_switches - u0.rdk_switches) as f64 / wall,
        watcher_passes_per_s: delta("bpftail_watcher_wakeups_total") / wall,
        cpu_percent: (u1.cpu_ns - u0.cpu_ns) as f64 / 1e9 / wall * 100.0,
        lines_per_s: delta("bpftail_records_delivered_total") / wall,
    }
}

fn main() {
    let files: usize = cli_arg("--files", "1000").parse().expect("--files N");
    let rate: f64 = cli_arg("--rate", "5").parse().expect("--rate LINES/FILE/S");
    let secs: f64 = cli_arg("--secs", "10").parse().expect("--secs S");
    let backends = cli_arg("--backends", "ebpf,fanotify,inotify,poll");
    // `--backends none`: only the cost to unrelated processes.
    let backends = if backends == "none" {
        String::new()
    } else {
        backends
    };
    let tmp = tempfile::tempdir().unwrap();
    let pods = tmp.path().join("pods");
    let broker = Broker::start();
    broker.create_topic("bench", 8);
    let paths: Vec<PathBuf> = (0..files)
        .map(|i| {
            let d = container_dir(
                &pods,
                "bench",
                &format!("pod-{i}"),
                &format!("uid-{i}"),
                "app",
            );
            let p = d.join("0.log");
            std::fs::write(&p, b"").unwrap();
            p
        })
        .collect();
    let paths = Arc::new(paths);

    println!(
        "bpftail change-detection benchmark: {files} files; idle {secs} s, then {rate} lines/s per file ({} lines/s) for {secs} s",
        rate * files as f64
    );
    println!(
        "  wakeups/s = context switches of the agent's own threads (data loop, watcher, control) and of librdkafka's"
    );
    println!(
        "{:<10} {:>12} {:>10} {:>10} | {:>12} {:>10} {:>10} {:>10} {:>12}",
        "backend",
        "idle wake/s",
        "rdk wake/s",
        "idle CPU%",
        "busy wake/s",
        "passes/s",
        "rdk wake/s",
        "busy CPU%",
        "lines/s"
    );
    let mut seq = 0u64;
    for backend in backends.split(',').filter(|b| !b.is_empty()) {
        let data = tmp.path().join(format!("data-{backend}"));
        let args = agent_args(
            &pods,
            &data,
            &broker.addr(),
            "bench",
            &["--kube", "off", "--watcher", backend],
        );
        let log = tmp.path().join(format!("bpftail-{backend}.log"));
        let agent = Agent::start(&args, &log);
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent.metric("bpftail_files_watched") < files as u64 {
            assert!(
                Instant::now() < deadline,
                "the agent never followed every file"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Let startup (and the first delivery of what exists) settle.
        std::thread::sleep(Duration::from_secs(6));
        let idle = measure(&agent, || std::thread::sleep(Duration::from_secs_f64(secs)));
        let before = agent.metric("bpftail_records_delivered_total");
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let busy = measure(&agent, || {
            write_at_rate(&paths, rate, secs, seq, &written);
        });
        seq += (rate * secs) as u64 + 1;
        let total = written.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(120);
        while agent.metric("bpftail_records_delivered_total") < before + total {
            assert!(Instant::now() < deadline, "{backend}: lines not delivered");
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "{:<10} {:>12.1} {:>10.1} {:>10.3} | {:>12.1} {:>10.1} {:>10.1} {:>10.2} {:>12.0}",
            backend,
            idle.own_wakeups_per_s,
            idle.rdk_wakeups_per_s,
            idle.cpu_percent,
            busy.own_wakeups_per_s,
            busy.watcher_passes_per_s,
            busy.rdk_wakeups_per_s,
            busy.cpu_percent,
            busy.lines_per_s,
        );
        let _ = agent.stop();
    }

    node_cost(&pods, &broker, tmp.path());
}

/// Writes `rate` lines per second to every file for `secs` seconds, from 4
/// threads, one write per line.
fn write_at_rate(
    paths: &Arc<Vec<PathBuf>>,
    rate: f64,
    secs: f64,
    seq0: u64,
    written: &Arc<std::sync::atomic::AtomicU64>,
) {
    let threads = 4;
    let rounds = (rate * secs).round() as u64;
    let period = Duration::from_secs_f64(1.0 / rate);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let paths = paths.clone();
            let written = written.clone();
            std::thread::spawn(move || {
                let mine: Vec<(usize, LineWriter)> = paths
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % threads == t)
                    .map(|(i, p)| (i, LineWriter::create(p)))
                    .collect();
                let mut mine = mine;
                let start = Instant::now();
                for round in 0..rounds {
                    for (i, w) in &mut mine {
                        w.line(*i, seq0 + round, 120);
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                    let next = start + period * (round as u32 + 1);
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Time of `n` iterations of a syscall loop, in ns per iteration (median of
/// `reps` runs).
fn loop_ns(reps: usize, n: u64, f: &dyn Fn(u64)) -> f64 {
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            for i in 0..n {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The eBPF hook's cost to processes that have nothing to do with logs.
fn node_cost(pods: &Path, broker: &Broker, tmp: &Path) {
    let scratch = tmp.join("unwatched.bin");
    let f = std::fs::File::create(&scratch).unwrap();
    let write = |i: u64| {
        f.write_at(b"0123456789abcdef", (i % 4096) * 16).unwrap();
    };
    let getpid = |_: u64| {
        // SAFETY: getpid has no preconditions.
        unsafe { libc::syscall(libc::SYS_getpid) };
    };
    let (reps, n_write, n_getpid) = (7, 300_000, 1_000_000);
    let measure = || {
        (
            loop_ns(reps, n_write, &write),
            loop_ns(reps, n_getpid, &getpid),
        )
    };
    println!();
    println!(
        "cost to unrelated processes (median of {reps} runs; pwrite of 16 B to an unwatched file, getpid):"
    );
    println!(
        "{:<26} {:>14} {:>10} {:>14} {:>10}",
        "hook", "pwrite ns/op", "slowdown", "getpid ns/op", "slowdown"
    );
    // Warm up, then alternate: none, each attachment, none again.
    let _ = measure();
    let base1 = measure();
    let mut rows = Vec::new();
    for attach in ["write-path", "tp-btf", "raw-tp"] {
        let data = tmp.join(format!("data-cost-{attach}"));
        let args = agent_args(
            pods,
            &data,
            &broker.addr(),
            "bench",
            &[
                "--kube",
                "off",
                "--watcher",
                "ebpf",
                "--ebpf-attach",
                attach,
            ],
        );
        let log = tmp.join(format!("bpftail-cost-{attach}.log"));
        let agent = Agent::start(&args, &log);
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent.metric("bpftail_files_watched") == 0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(2));
        rows.push((attach, measure()));
        let _ = agent.stop();
    }
    let base2 = measure();
    let base = ((base1.0 + base2.0) / 2.0, (base1.1 + base2.1) / 2.0);
    println!(
        "{:<26} {:>14.0} {:>10} {:>14.0} {:>10}",
        "none (before/after avg)", base.0, "", base.1, ""
    );
    for (attach, (w, g)) in rows {
        println!(
            "{:<26} {:>14.0} {:>9.1}% {:>14.0} {:>9.1}%",
            format!("ebpf {attach}"),
            w,
            (w / base.0 - 1.0) * 100.0,
            g,
            (g / base.1 - 1.0) * 100.0
        );
    }
    println!(
        "  (no run-to-run spread is removed: on this 2-core machine a few % is noise; compare the two 'none' runs: {:.0} / {:.0} ns pwrite)",
        base1.0, base2.0
    );
}
