//! Fair sharing: one container writes as fast as it can (or at a set rate)
//! next to N quiet containers that each write a few lines a second, while
//! bpftail ships everything to a real broker (tansu). Prints, for the quiet
//! containers' lines, the write → Kafka latency a consumer sees (p50, p99,
//! max), and for the loud one the rate written and the rate shipped while
//! it wrote. With `--limit BYTES_PER_S` the agent runs with
//! `--container-rate-limit`: the loud one should ship at its limit, the
//! quiet ones (far below it) unaffected. Measures; asserts nothing.
//!
//! `cargo xtask bench fairness [-- --quiet N --secs S --quiet-rate LINES_PER_S
//!  --loud-mbps MB_PER_S --limit BYTES_PER_S --max-cpu CORES
//!  --agent BPFTAIL_ARGS…]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use support::*;

const LINE: usize = 200;

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// One CRI line of `len` bytes: `<tag> seq=… t=<unix ns> aaaa…`.
fn line(buf: &mut Vec<u8>, tag: &str, seq: u64, len: usize) {
    buf.clear();
    write!(
        buf,
        "2026-11-25T16:00:00.000000000Z stdout F {tag} seq={seq:08} t={} ",
        unix_ns()
    )
    .unwrap();
    while buf.len() + 1 < len {
        buf.push(b'a' + (buf.len() % 26) as u8);
    }
    buf.push(b'\n');
}

fn log_of(pods: &Path, name: &str) -> PathBuf {
    let d = container_dir(pods, "bench", name, &format!("uid-{name}"), "app");
    let p = d.join("0.log");
    std::fs::write(&p, b"").unwrap();
    p
}

/// What the consumer saw.
#[derive(Default)]
struct Seen {
    /// Quiet lines written before this (unix ns) are not measured.
    measure_from_ns: u64,
    quiet_latency_ns: Vec<u64>,
    /// Write → the record's Kafka timestamp (taken by the agent when it
    /// reads the line): the agent's own share of the delay.
    read_latency_ns: Vec<u64>,
    /// The same, of the quiet lines in the loud container's partition
    /// (they queue behind its batches: Kafka keeps a partition in order).
    shared_latency_ns: Vec<u64>,
    loud_partition: Option<i32>,
    quiet: u64,
    /// Log-file bytes of the loud container's records that arrived while
    /// it wrote (after its first second).
    loud_window: u64,
}

fn main() {
    let quiet_n: usize = cli_arg("--quiet", "20").parse().expect("--quiet N");
    let secs: u64 = cli_arg("--secs", "20").parse().expect("--secs S");
    let quiet_rate: u64 = cli_arg("--quiet-rate", "10")
        .parse()
        .expect("--quiet-rate LINES_PER_S");
    let loud_mbps: f64 = cli_arg("--loud-mbps", "0")
        .parse()
        .expect("--loud-mbps MB_PER_S");
    let limit = cli_arg("--limit", "");
    let max_cpu = cli_arg("--max-cpu", "");
    println!(
        "fairness: 1 loud container ({}) next to {quiet_n} quiet ones ({quiet_rate} lines/s each), {secs} s, lines of {LINE} B, --format raw{}{}",
        if loud_mbps > 0.0 {
            format!("{loud_mbps} MB/s")
        } else {
            "as fast as it can".into()
        },
        if limit.is_empty() {
            String::new()
        } else {
            format!(", --container-rate-limit {limit}")
        },
        if max_cpu.is_empty() {
            String::new()
        } else {
            format!(", --max-cpu {max_cpu}")
        },
    );
    let broker = Broker::start();
    let topic = "fair";
    broker.create_topic(topic, 8);
    let tmp = tempfile::tempdir().unwrap();
    let pods = tmp.path().join("pods");
    let loud_log = log_of(&pods, "loud");
    let quiet_logs: Vec<PathBuf> = (0..quiet_n)
        .map(|i| log_of(&pods, &format!("quiet-{i}")))
        .collect();
    let mut extra = vec!["--format", "raw", "--kube", "off"];
    if !limit.is_empty() {
        extra.extend(["--container-rate-limit", &limit]);
    }
    if !max_cpu.is_empty() {
        extra.extend(["--max-cpu", &max_cpu]);
    }
    let args = agent_args(
        &pods,
        &tmp.path().join("data"),
        &broker.addr(),
        topic,
        &extra,
    );
    let agent = Agent::start(&args, &tmp.path().join("bpftail.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.metric("bpftail_files_watched") < 1 + quiet_n as u64 {
        assert!(Instant::now() < deadline, "agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = Arc::new(AtomicBool::new(true));
    let window = Arc::new(AtomicBool::new(false));
    let consumer = consume(
        &broker.addr(),
        topic,
        seen.clone(),
        stop.clone(),
        window.clone(),
    );
    let loud_bytes = Arc::new(AtomicU64::new(0));
    let cpu0 = agent.cpu_seconds();
    let t0 = Instant::now();
    // Latency counts lines written from two seconds in (the consumer's
    // start, the first metadata requests and the loud writer's ramp-up
    // are not the steady state measured).
    seen.lock().unwrap().measure_from_ns = unix_ns() + 2_000_000_000;
    let loud = {
        let (writing, loud_bytes) = (writing.clone(), loud_bytes.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&loud_log)
                .unwrap();
            let mut buf = Vec::with_capacity(LINE);
            let mut seq = 0u64;
            // Lines go out in 64 KiB writes: as fast as a busy logger.
            let mut chunk = Vec::with_capacity(64 * 1024 + LINE);
            while writing.load(Ordering::Relaxed) {
                if loud_mbps > 0.0 {
                    let due = t0
                        + Duration::from_secs_f64(
                            loud_bytes.load(Ordering::Relaxed) as f64 / (loud_mbps * 1e6),
                        );
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                chunk.clear();
                while chunk.len() < 64 * 1024 {
                    line(&mut buf, "L", seq, LINE);
                    chunk.extend_from_slice(&buf);
                    seq += 1;
                }
                f.write_all(&chunk).unwrap();
                loud_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };
    let quiet: Vec<_> = quiet_logs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let p = p.clone();
            let writing = writing.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
                let mut buf = Vec::with_capacity(LINE);
                let period = Duration::from_secs_f64(1.0 / quiet_rate as f64);
                // Spread the writers over the period.
                let start = t0 + period.mul_f64(i as f64 / quiet_n as f64);
                let mut seq = 0u64;
                while writing.load(Ordering::Relaxed) {
                    let due = start + period * seq as u32;
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                    line(&mut buf, &format!("q{i}"), seq, LINE);
                    f.write_all(&buf).unwrap();
                    seq += 1;
                }
                seq
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    window.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(secs.saturating_sub(1)));
    window.store(false, Ordering::Relaxed);
    writing.store(false, Ordering::Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    let cpu = agent.cpu_seconds() - cpu0;
    loud.join().unwrap();
    let quiet_lines: u64 = quiet.into_iter().map(|h| h.join().unwrap()).sum();
    let written = loud_bytes.load(Ordering::Relaxed);
    // Every quiet line arrives (the loud one's backlog may still be long).
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.lock().unwrap().quiet < quiet_lines && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap();
    let rss = agent.peak_rss_kib() as f64 / 1024.0;
    let _ = agent.stop();

    let mut s = Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap();
    s.quiet_latency_ns.sort_unstable();
    s.shared_latency_ns.sort_unstable();
    s.read_latency_ns.sort_unstable();
    let quantile = |v: &[u64], p: f64| {
        v.get(((v.len().max(1) - 1) as f64 * p) as usize)
            .map_or(f64::NAN, |&ns| ns as f64 / 1e6)
    };
    let q = |p: f64| quantile(&s.quiet_latency_ns, p);
    // The loud container's shipping rate while it wrote, after a second
    // of start.
    let shipped_rate = s.loud_window as f64 / (wall - 1.0);
    println!(
        "  quiet: {} of {quiet_lines} lines arrived; write -> Kafka (from 2 s in, {} lines) p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        s.quiet,
        s.quiet_latency_ns.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    );
    // The quiet lines in the other partitions.
    let mut apart: Vec<u64> = s.quiet_latency_ns.clone();
    for l in &s.shared_latency_ns {
        if let Some(i) = apart.iter().position(|x| x == l) {
            apart.swap_remove(i);
        }
    }
    apart.sort_unstable();
    println!(
        "    write -> read by the agent (the records' timestamps, ms resolution): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        quantile(&s.read_latency_ns, 0.5),
        quantile(&s.read_latency_ns, 0.99),
        quantile(&s.read_latency_ns, 1.0)
    );
    println!(
        "    of which in the loud container's partition: {} lines, p99 {:.1} ms; in the other partitions: {} lines, p50 {:.1} ms, p99 {:.1} ms",
        s.shared_latency_ns.len(),
        quantile(&s.shared_latency_ns, 0.99),
        apart.len(),
        quantile(&apart, 0.5),
        quantile(&apart, 0.99)
    );
    println!(
        "  loud: written {:.1} MB/s, shipped {:.2} MB/s of its log while writing{}",
        written as f64 / wall / 1e6,
        shipped_rate / 1e6,
        match limit.parse::<f64>() {
            Ok(l) => format!(" ({:.1} % of the limit)", 100.0 * shipped_rate / l),
            Err(_) => String::new(),
        }
    );
    println!(
        "  bpftail: {:.1} % of a core while writing, peak RSS {rss:.1} MiB",
        100.0 * cpu / wall
    );
}

/// Reads every partition of `topic`, noting quiet lines' latency and the
/// loud one's arrivals.
fn consume(
    brokers: &str,
    topic: &str,
    seen: Arc<std::sync::Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    window: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-fairness")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.error.backoff.ms", "5")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..8 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            let now = unix_ns();
            let v = m.payload().unwrap_or_default();
            let mut s = seen.lock().unwrap();
            if v.first() == Some(&b'q') {
                if let Some(t) = t_of(v).filter(|&t| t >= s.measure_from_ns) {
                    s.quiet_latency_ns.push(now.saturating_sub(t));
                    if let Some(ms) = m.timestamp().to_millis() {
                        s.read_latency_ns
                            .push((ms as u64 * 1_000_000).saturating_sub(t));
                    }
                    if s.loud_partition == Some(m.partition()) {
                        s.shared_latency_ns.push(now.saturating_sub(t));
                    }
                }
                s.quiet += 1;
            } else if s.loud_partition.is_none() {
                s.loud_partition = Some(m.partition());
            } else if window.load(Ordering::Relaxed) {
                // The bytes its line takes in the log file (what a rate
                // limit counts): every line is LINE bytes.
                s.loud_window += LINE as u64;
            }
        }
    })
}

/// The `t=<ns>` a line carries.
fn t_of(v: &[u8]) -> Option<u64> {
    let i = v.windows(3).position(|w| w == b" t=")?;
    let rest = &v[i + 3..];
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}
