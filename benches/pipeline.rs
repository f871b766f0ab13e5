//! End-to-end benchmark: N CRI lines (default 1,000,000 of ~200 bytes) are
//! written into 8 files, one write(2) per line, at full speed or at a set
//! rate, while bpftail ships them to a real broker (tansu). Prints wall
//! time, bpftail's CPU seconds (user+sys) from the first line written to
//! the last acknowledgement, MB of log per CPU-second, lines per second,
//! peak RSS at startup and during the run (VmHWM, reset in between), and
//! at a set rate the write → Kafka latency (p50/p99, as seen by a consumer:
//! an upper bound of the acknowledgement's). Measures; asserts nothing.
//!
//! `cargo xtask bench [-- --lines N --line-bytes B --format raw|json
//!  --compression C --kafka-client native|rdkafka --watcher W --rate LINES_PER_S
//!  --hang-s SECONDS --peers]`
//!
//! `--hang-s S` stops the broker (SIGSTOP: connections open, no answers)
//! for S seconds two seconds into the run and prints the agent's CPU
//! meanwhile.
//!
//! `--peers` also runs syslog-ng (Debian's, with its Kafka module, unpacked
//! by `cargo xtask bench`) on the same files and broker, one after the
//! other, and prints the ratios measured in this run.

#[path = "../tests/support/mod.rs"]
mod support;

mod peers;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use support::*;

const WRITERS: usize = 8;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: String,
    pub cpu: f64,
    pub wall: f64,
    pub rss_start_mib: f64,
    pub rss_run_mib: f64,
    pub latency_ms: Option<(f64, f64)>,
    /// CPU seconds spent while the broker was stopped, and for how long.
    pub hang: Option<(f64, f64)>,
}

pub struct Workload {
    pub lines: u64,
    pub line_len: usize,
    /// Lines per second over all writers; 0: as fast as possible.
    pub rate: u64,
    /// Seconds the broker is stopped (SIGSTOP) two seconds into the run.
    pub hang: u64,
}

fn main() {
    // `cargo bench` passes --bench; anything else is ours.
    let w = Workload {
        lines: cli_arg("--lines", "1000000").parse().expect("--lines N"),
        line_len: cli_arg("--line-bytes", "200")
            .parse()
            .expect("--line-bytes B"),
        rate: cli_arg("--rate", "0").parse().expect("--rate LINES_PER_S"),
        hang: cli_arg("--hang-s", "0").parse().expect("--hang-s SECONDS"),
    };
    let format = cli_arg("--format", "json");
    let compression = cli_arg("--compression", "none");
    let client = cli_arg("--kafka-client", "native");
    let watcher = cli_arg("--watcher", "auto");
    let peers = std::env::args().any(|a| a == "--peers");
    let broker = Broker::start();
    println!(
        "end-to-end: {} lines of {} B in {WRITERS} files, one write(2) per line, {}; --format {format}, --compression {compression}, --kafka-client {client}, --watcher {watcher}",
        w.lines,
        w.line_len,
        if w.rate == 0 {
            "as fast as possible".to_owned()
        } else {
            format!("{} lines/s", w.rate)
        }
    );
    let mut runs = vec![run_bpftail(
        &broker,
        &w,
        &format,
        &compression,
        &client,
        &watcher,
    )];
    if peers {
        match peers::syslog_ng(&broker, &w) {
            Ok(r) => runs.push(r),
            Err(e) => println!("  syslog-ng: not measured: {e}"),
        }
    }
    let mb = (w.lines * w.line_len as u64) as f64 / 1e6;
    println!(
        "  {:<10} {:>8} {:>8} {:>10} {:>12} {:>9} {:>10} {:>10} {:>16}",
        "agent",
        "CPU s",
        "wall s",
        "MB/CPU-s",
        "lines/CPU-s",
        "% core",
        "RSS start",
        "RSS run",
        "latency p50/p99"
    );
    for r in &runs {
        println!(
            "  {:<10} {:>8.3} {:>8.2} {:>10.1} {:>12.0} {:>9.2} {:>8.1}Mi {:>8.1}Mi {:>16}",
            r.name,
            r.cpu,
            r.wall,
            mb / r.cpu,
            w.lines as f64 / r.cpu,
            100.0 * r.cpu / r.wall,
            r.rss_start_mib,
            r.rss_run_mib,
            r.latency_ms
                .map(|(a, b)| format!("{a:.1}/{b:.1} ms"))
                .unwrap_or_else(|| "-".into())
        );
    }
    for r in &runs {
        if let Some((cpu, secs)) = r.hang {
            println!(
                "  {}: broker stopped for {secs:.1} s: {cpu:.3} CPU-s meanwhile ({:.2} % of a core)",
                r.name,
                100.0 * cpu / secs
            );
        }
    }
    if runs.len() > 1 {
        let (a, b) = (&runs[0], &runs[1]);
        println!(
            "  bpftail vs {}, same run: {:.2}x less CPU, {:.2}x less peak RSS during the run",
            b.name,
            b.cpu / a.cpu,
            b.rss_run_mib / a.rss_run_mib
        );
    }
}

fn pods_dirs(pods: &Path) -> Vec<PathBuf> {
    (0..WRITERS)
        .map(|w| {
            let d = container_dir(
                pods,
                "bench",
                &format!("pod-{w}"),
                &format!("uid-{w}"),
                "app",
            );
            std::fs::write(d.join("0.log"), b"").unwrap();
            d
        })
        .collect()
}

fn run_bpftail(
    broker: &Broker,
    w: &Workload,
    format: &str,
    compression: &str,
    client: &str,
    watcher: &str,
) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let pods = tmp.path().join("pods");
    let topic = "bench";
    broker.create_topic(topic, 8);
    let dirs = pods_dirs(&pods);
    let args = agent_args(
        &pods,
        &tmp.path().join("data"),
        &broker.addr(),
        topic,
        &[
            "--format",
            format,
            "--compression",
            compression,
            "--kafka-client",
            client,
            "--watcher",
            watcher,
            "--kube",
            "off",
        ],
    );
    let mut args = args;
    // Anything after `--agent` goes to bpftail as is.
    args.extend(
        std::env::args()
            .skip_while(|a| a != "--agent")
            .skip(1)
            .filter(|a| a != "--bench"),
    );
    let log = tmp.path().join("bpftail.log");
    let agent = Agent::start(&args, &log);
    // Startup (the watcher's setup) is done once the agent serves its
    // metrics and has looked at the (empty) files.
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.metric("bpftail_files_watched") < WRITERS as u64 {
        assert!(Instant::now() < deadline, "agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_start = agent.peak_rss_kib() as f64 / 1024.0;
    eprintln!(
        "  bpftail settled at {:.1} MiB RSS before the run",
        agent.rss_kib() as f64 / 1024.0
    );
    agent.reset_peak_rss();
    // A consumer runs in every run (bpftail's and the peers'), so that each
    // shares the machine with the same load.
    let probe = LatencyProbe::start(&broker.addr(), topic);
    let cpu0 = agent.cpu_seconds();
    let t0 = Instant::now();
    let hang = std::thread::scope(|s| {
        let writing = s.spawn(|| write_all(&dirs, w));
        let hang = (w.hang > 0).then(|| {
            std::thread::sleep(Duration::from_secs(2));
            let c = agent.cpu_seconds();
            let at = Instant::now();
            broker.freeze(true);
            std::thread::sleep(Duration::from_secs(w.hang));
            let r = (agent.cpu_seconds() - c, at.elapsed().as_secs_f64());
            broker.freeze(false);
            r
        });
        writing.join().unwrap();
        hang
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    while agent.metric("bpftail_records_delivered_total") < w.lines {
        assert!(
            Instant::now() < deadline,
            "not everything was delivered in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = agent.cpu_seconds() - cpu0;
    let rss_run = agent.peak_rss_kib() as f64 / 1024.0;
    let _ = agent.stop();
    Run {
        name: "bpftail".into(),
        cpu,
        wall,
        rss_start_mib: rss_start,
        rss_run_mib: rss_run,
        latency_ms: {
            let l = probe.finish(w.lines);
            (w.rate > 0).then_some(l)
        },
        hang,
    }
}

/// Writes the workload into `dirs`' `0.log`s: one thread per file, one
/// write(2) per line, paced when a rate is set. Each line carries its write
/// time (`t=<unix ns>`) for the latency probe.
pub fn write_all(dirs: &[PathBuf], w: &Workload) {
    let per_writer = w.lines / WRITERS as u64;
    let t0 = Instant::now();
    let handles: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let path = d.join("0.log");
            let (len, rate) = (w.line_len, w.rate);
            std::thread::spawn(move || {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap();
                let mut buf = Vec::with_capacity(len + 64);
                for seq in 0..per_writer {
                    if rate > 0 {
                        let due =
                            t0 + Duration::from_secs_f64(seq as f64 * WRITERS as f64 / rate as f64);
                        if let Some(d) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                    }
                    buf.clear();
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap()
                        .as_nanos();
                    write!(
                        buf,
                        "2026-11-25T16:00:00.{:09}Z stdout F w{i} seq={seq:08} t={now} ",
                        seq % 1_000_000_000
                    )
                    .unwrap();
                    while buf.len() + 1 < len {
                        buf.push(b'a' + (buf.len() % 26) as u8);
                    }
                    buf.push(b'\n');
                    f.write_all(&buf).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// A consumer that notes, for every record, how long after its write it
/// could be read from Kafka.
pub struct LatencyProbe {
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Vec<u64>>,
}

impl LatencyProbe {
    pub fn start(brokers: &str, topic: &str) -> LatencyProbe {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "bench-latency")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "5")
            .set("fetch.error.backoff.ms", "5")
            .create()
            .unwrap();
        // Assigned, not subscribed: a group join would delay the first
        // fetch by seconds and show up as latency.
        let partitions = (|| {
            for _ in 0..100 {
                if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
                    && let Some(t) = md.topics().first()
                    && !t.partitions().is_empty()
                {
                    return t.partitions().len();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("topic {topic} never appeared");
        })();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut lat = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64;
                let v = m.payload().unwrap_or_default();
                if let Some(t) = memchr_t(v) {
                    lat.push(now.saturating_sub(t));
                }
                n.fetch_add(1, Ordering::Relaxed);
            }
            lat
        });
        LatencyProbe { stop, seen, thread }
    }

    /// Records read so far.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    /// (p50, p99) in ms once `lines` records were seen (or 30 s passed).
    pub fn finish(self, lines: u64) -> (f64, f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.seen.load(Ordering::Relaxed) < lines && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop.store(true, Ordering::Relaxed);
        let mut lat = self.thread.join().unwrap();
        lat.sort_unstable();
        if lat.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        let q = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1e6;
        (q(0.50), q(0.99))
    }
}

/// The `t=<ns>` a line carries (raw message or inside a JSON value).
fn memchr_t(v: &[u8]) -> Option<u64> {
    let i = v.windows(3).position(|w| w == b" t=")?;
    let rest = &v[i + 3..];
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}
