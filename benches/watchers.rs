//! Change-detection benchmark: each backend (ebpf, fanotify, inotify, poll)
//! follows 1,000 container log files, first idle, then each written at a
//! modest rate. Prints per backend: the agent's wakeups per second (context
//! switches of all its threads, split into the agent's own threads and
//! librdkafka's), its CPU, and lines per second delivered. Then the cost of
//! the agent to the rest of the node, per watcher: the slowdown of
//! unrelated syscall-heavy loops (small writes to an unwatched file on the
//! same filesystem; getpid) with the agent running versus not, in the
//! loop's own CPU time. Measures; asserts nothing.
//!
//! `cargo xtask bench watchers [-- --files N --rate LINES_PER_FILE_PER_S --secs S --backends ebpf,inotify --cost-rounds N]`

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
        let wake = idle_write_latency(&agent, &paths, seq);
        seq += 1;
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
        println!(
            "{:<10} a line written to an idle file acknowledged by Kafka after {:.1} ms median, {:.1} ms max ({} files, one at a time)",
            "",
            wake[wake.len() / 2],
            wake[wake.len() - 1],
            wake.len()
        );
        let _ = agent.stop();
    }

    node_cost(&pods, files, &broker, tmp.path());
}

/// With the agent idle, one line at a time into 10 of the files (each after
/// the last was acknowledged): the time from the write to Kafka's
/// acknowledgement (`records_delivered_total`, polled every ms), sorted.
fn idle_write_latency(agent: &Agent, paths: &[PathBuf], seq: u64) -> Vec<f64> {
    let mut v: Vec<f64> = (0..10)
        .map(|k| {
            let i = (k * 97 + 13) % paths.len();
            let mut w = LineWriter::create(&paths[i]);
            let before = agent.metric("bpftail_records_delivered_total");
            let t = Instant::now();
            w.line(i, seq, 120);
            while agent.metric("bpftail_records_delivered_total") == before {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "an idle write never shipped"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
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

/// This thread's CPU time in ns (`CLOCK_THREAD_CPUTIME_ID`): not the time
/// it spent preempted by the agent, the broker or the writers.
fn thread_cpu_ns() -> u64 {
    // SAFETY: a plain C struct filled by clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of `n` iterations of a syscall loop, in ns per iteration (the
/// fastest of `reps` runs: interference only ever adds).
fn loop_ns(reps: usize, n: u64, f: &dyn Fn(u64)) -> f64 {
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = thread_cpu_ns();
            for i in 0..n {
                f(i);
            }
            (thread_cpu_ns() - t) as f64 / n as f64
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[0]
}

/// Runs `f` on CPU 1 only, then restores this thread's CPU set. Panics if
/// the pin fails (a one-CPU machine): the figures would not be what they
/// say.
fn pinned<T>(f: impl FnOnce() -> T) -> T {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: zeroed cpu_set_t values are empty sets; the calls read or
    // fill sets of `size` bytes that we own.
    let saved = unsafe {
        let mut saved: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, size, &mut saved), 0);
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(1, &mut one);
        assert_eq!(
            libc::sched_setaffinity(0, size, &one),
            0,
            "cannot pin to CPU 1"
        );
        saved
    };
    let r = f();
    // SAFETY: as above.
    unsafe { libc::sched_setaffinity(0, size, &saved) };
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The agent's cost to processes that have nothing to do with logs: the
/// slowdown of a loop of 16-byte pwrites to an unwatched file on the same
/// filesystem as the watched ones (the directory watches' share included),
/// and of a getpid loop. Each round measures the loops without an agent,
/// then with one (per watcher), on a thread pinned to one CPU, counting its
/// own CPU time; the figure is the median over rounds of the ratio between
/// neighbouring runs.
fn node_cost(pods: &Path, files: usize, broker: &Broker, tmp: &Path) {
    let rounds: usize = cli_arg("--cost-rounds", "5")
        .parse()
        .expect("--cost-rounds N");
    let scratch = tmp.join("unwatched.bin");
    let f = std::fs::File::create(&scratch).unwrap();
    let write = |i: u64| {
        f.write_at(b"0123456789abcdef", (i % 4096) * 16).unwrap();
    };
    let getpid = |_: u64| {
        // SAFETY: getpid has no preconditions.
        unsafe { libc::syscall(libc::SYS_getpid) };
    };
    // On CPU 1 only while measuring (the agents started in between must
    // not inherit the pin).
    let measure = || pinned(|| (loop_ns(5, 200_000, &write), loop_ns(5, 1_000_000, &getpid)));
    let watchers: [(&str, &[&str]); 4] = [
        (
            "ebpf write-path",
            &["--watcher", "ebpf", "--ebpf-attach", "write-path"],
        ),
        ("fanotify", &["--watcher", "fanotify"]),
        ("inotify", &["--watcher", "inotify"]),
        (
            "ebpf tp-btf",
            &["--watcher", "ebpf", "--ebpf-attach", "tp-btf"],
        ),
    ];
    println!();
    println!(
        "cost to unrelated processes ({rounds} rounds; per round the loops without, then with the agent; thread CPU time, pinned to CPU 1):"
    );
    println!(
        "{:<18} {:>12} {:>12} {:>22} {:>12} {:>12} {:>22}",
        "watcher", "pwrite ns", "vs none", "(min..max)", "getpid ns", "vs none", "(min..max)"
    );
    let _ = measure();
    let mut results: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); watchers.len()];
    for _ in 0..rounds {
        for (i, (name, flags)) in watchers.iter().enumerate() {
            let off = measure();
            let data = tmp.join(format!("data-cost-{}", name.replace(' ', "-")));
            let mut extra = vec!["--kube", "off"];
            extra.extend_from_slice(flags);
            let args = agent_args(pods, &data, &broker.addr(), "bench", &extra);
            let log = tmp.join(format!("bpftail-cost-{}.log", name.replace(' ', "-")));
            let agent = Agent::start(&args, &log);
            let deadline = Instant::now() + Duration::from_secs(60);
            while agent.metric("bpftail_files_watched") < files as u64 {
                assert!(Instant::now() < deadline, "{name}: not every file watched");
                std::thread::sleep(Duration::from_millis(50));
            }
            // Past its start-up reads (a bench: a settling pause is fine).
            std::thread::sleep(Duration::from_secs(1));
            let on = measure();
            let _ = agent.stop();
            results[i].push((on.0, on.0 / off.0, on.1, on.1 / off.1));
        }
    }
    for ((name, _), r) in watchers.iter().zip(results) {
        let pct = |v: Vec<f64>| median(v.clone()) * 100.0 - 100.0;
        let range = |v: Vec<f64>| {
            let lo = v.iter().cloned().fold(f64::MAX, f64::min) * 100.0 - 100.0;
            let hi = v.iter().cloned().fold(f64::MIN, f64::max) * 100.0 - 100.0;
            format!("({lo:+.1}..{hi:+.1} %)")
        };
        let (w, wr, g, gr): (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) = (
            r.iter().map(|x| x.0).collect(),
            r.iter().map(|x| x.1).collect(),
            r.iter().map(|x| x.2).collect(),
            r.iter().map(|x| x.3).collect(),
        );
        println!(
            "{:<18} {:>12.0} {:>11.1}% {:>22} {:>12.0} {:>11.1}% {:>22}",
            name,
            median(w),
            pct(wr.clone()),
            range(wr),
            median(g),
            pct(gr.clone()),
            range(gr)
        );
    }
}
