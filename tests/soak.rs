//! Soak: writers logging steadily with kubelet's rotation, the agent killed
//! with SIGKILL again and again, the broker taken away every few minutes,
//! on the default watcher. At the end: no line missing, none out of order
//! per container, duplicates only from the kills (bounded by what the last
//! checkpoint had not yet saved), and the agent's peak memory flat across
//! its lives.
//!
//! The default (`cargo test`, and CI) is a short run: 150 s, a kill every
//! 10–25 s, a 10 s outage every 60 s, rotation at 2 MB. `cargo xtask soak`
//! runs the long one (30 minutes, a kill every 30–90 s, a 20 s outage every
//! 3 minutes, rotation at 10 MB). Every knob is an environment variable
//! (`BPFTAIL_SOAK_*`, below).
//!
//! The rotation is kubelet's rename (`0.log` → `0.log.<time>`, a new
//! `0.log`), keeping the 5 newest rotated files; kubelet's gzip of older
//! rotations is left out (a file compressed before any agent read it is
//! lost to every agent alike).

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use support::*;

const WRITERS: usize = 4;
const LINE_LEN: usize = 200;
const KEEP_ROTATED: usize = 5;

/// The run's settings, from `BPFTAIL_SOAK_*` (defaults: the short run).
#[derive(Debug, Clone)]
struct Settings {
    secs: u64,
    /// Lines per second, per writer.
    rate: u64,
    rotate_bytes: u64,
    kill_every: (u64, u64),
    outage_every: u64,
    outage_secs: u64,
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(format!("BPFTAIL_SOAK_{name}"))
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("BPFTAIL_SOAK_{name}={v}: a number"))
        })
        .unwrap_or(default)
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            secs: env("SECS", 150),
            rate: env("RATE", 1_000),
            rotate_bytes: env("ROTATE_BYTES", 2 << 20),
            kill_every: (env("KILL_MIN_SECS", 10), env("KILL_MAX_SECS", 25)),
            outage_every: env("OUTAGE_EVERY_SECS", 60),
            outage_secs: env("OUTAGE_SECS", 10),
        }
    }
}

/// Per writer: which lines arrived, how often, in what order.
#[derive(Debug, Default, Clone)]
struct Stream {
    seen: Vec<u64>,
    unique: u64,
    duplicates: u64,
    /// The sequence went back (a resend), and how far at most.
    rewinds: u64,
    deepest_rewind: u64,
    /// The sequence skipped ahead: a line out of order (or lost).
    jumps: u64,
    next: u64,
}

impl Stream {
    fn record(&mut self, seq: u64) {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicates += 1;
        } else {
            self.seen[word] |= 1 << bit;
            self.unique += 1;
        }
        if seq < self.next {
            self.rewinds += 1;
            self.deepest_rewind = self.deepest_rewind.max(self.next - seq);
        } else if seq > self.next {
            self.jumps += 1;
            eprintln!("out of order: {seq} after {}", self.next.wrapping_sub(1));
        }
        self.next = seq + 1;
    }

    fn missing_below(&self, n: u64) -> u64 {
        n - (0..n)
            .filter(|s| {
                self.seen
                    .get((s / 64) as usize)
                    .is_some_and(|w| w & (1 << (s % 64)) != 0)
            })
            .count() as u64
    }
}

/// Reads the topic from the beginning, checking as it goes (the records
/// themselves are not kept: a long soak produces millions).
struct Checker {
    streams: Arc<Mutex<Vec<Stream>>>,
    foreign: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checker {
    fn start(brokers: &str, topic: &str) -> Checker {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "bpftail-soak")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "50")
            .set("log_level", "3")
            .create()
            .expect("consumer");
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("topic metadata");
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let streams = Arc::new(Mutex::new(vec![Stream::default(); WRITERS]));
        let foreign = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, f, halt) = (streams.clone(), foreign.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                match parse_seq(m.payload().unwrap_or_default()) {
                    Some((w, seq)) if w < WRITERS => s.lock().unwrap()[w].record(seq),
                    _ => {
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Checker {
            streams,
            foreign,
            stop,
            thread: Some(thread),
        }
    }

    fn streams(&self) -> Vec<Stream> {
        self.streams.lock().unwrap().clone()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One writer: `rate` lines a second to `dir/0.log` until `stop`, rotating
/// it as kubelet does at `rotate_bytes`. Returns how many lines it wrote
/// and how many rotations it made.
fn writer(
    dir: PathBuf,
    w: usize,
    s: Settings,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let live = dir.join("0.log");
        let mut out = LineWriter::create(&live);
        let (mut seq, mut rotations, mut size) = (0u64, 0u64, 0u64);
        let start = Instant::now();
        let mut rotated: Vec<PathBuf> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            // Pacing of the workload (not synchronisation): catch up with
            // the lines due by now, then wait for the next 10 ms.
            let due = (start.elapsed().as_secs_f64() * s.rate as f64) as u64;
            while seq < due {
                if size >= s.rotate_bytes {
                    rotations += 1;
                    let to = dir.join(format!("0.log.20261130-{rotations:06}"));
                    std::fs::rename(&live, &to).unwrap();
                    out = LineWriter::create(&live);
                    size = 0;
                    rotated.push(to);
                    if rotated.len() > KEEP_ROTATED {
                        let _ = std::fs::remove_file(rotated.remove(0));
                    }
                }
                out.line(w, seq, LINE_LEN);
                size += LINE_LEN as u64;
                seq += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (seq, rotations)
    })
}

/// A small deterministic generator (xorshift) for the kill times.
struct Rng(u64);

impl Rng {
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo + 1)
    }
}

fn peak_rss_mib(agent: &Agent) -> f64 {
    agent.peak_rss_kib() as f64 / 1024.0
}

#[test]
fn soak_kills_rotations_and_outages_lose_nothing_and_memory_stays_flat() {
    let s = Settings::from_env();
    eprintln!("soak: {s:?}");
    let broker = Broker::start_behind_proxy();
    broker.create_topic("logs", 4);
    let node = Node::new();
    let args = node.args(&broker.addr(), "logs", &["--format", "raw"]);
    let mut agent = Some(Agent::start(&args, &node.log));
    let checker = Checker::start(&broker.addr(), "logs");
    let stop = Arc::new(AtomicBool::new(false));
    let dirs: Vec<PathBuf> = (0..WRITERS)
        .map(|w| {
            container_dir(
                &node.pods,
                "ns",
                &format!("pod-{w}"),
                &format!("uid-{w}"),
                "app",
            )
        })
        .collect();
    let writers: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(w, d)| writer(d.clone(), w, s.clone(), stop.clone()))
        .collect();

    let start = Instant::now();
    let end = start + Duration::from_secs(s.secs);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut next_kill = start + Duration::from_secs(rng.between(s.kill_every.0, s.kill_every.1));
    let mut next_outage = start + Duration::from_secs(s.outage_every);
    let mut outage_until: Option<Instant> = None;
    let (mut kills, mut outages) = (0u32, 0u32);
    let mut peaks: Vec<f64> = Vec::new();
    let mut last_report = start;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_kill {
            let a = agent.take().unwrap();
            peaks.push(peak_rss_mib(&a));
            a.kill9();
            kills += 1;
            agent = Some(Agent::start(&args, &node.log));
            next_kill = now + Duration::from_secs(rng.between(s.kill_every.0, s.kill_every.1));
        }
        if outage_until.is_none() && now >= next_outage {
            broker.outage();
            outages += 1;
            outage_until = Some(now + Duration::from_secs(s.outage_secs));
        }
        if outage_until.is_some_and(|u| now >= u) {
            broker.restore();
            outage_until = None;
            next_outage = now + Duration::from_secs(s.outage_every);
        }
        if now.duration_since(last_report) >= Duration::from_secs(60) {
            last_report = now;
            let got: u64 = checker.streams().iter().map(|x| x.unique).sum();
            eprintln!(
                "{:>5} s: {kills} kills, {outages} outages, {got} lines arrived, agent peak RSS {:.1} MiB",
                start.elapsed().as_secs(),
                peak_rss_mib(agent.as_ref().unwrap()),
            );
        }
        // Nothing to wait for but the schedule: sleep until its next entry
        // (a kill, an outage's start or end, a report, the end).
        let outage_event = outage_until.unwrap_or(next_outage);
        let next = [
            next_kill,
            outage_event,
            last_report + Duration::from_secs(60),
            end,
        ]
        .into_iter()
        .min()
        .unwrap_or(end);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    broker.restore();
    stop.store(true, Ordering::Relaxed);
    let written: Vec<(u64, u64)> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    let agent = agent.take().unwrap();
    let total: u64 = written.iter().map(|(n, _)| n).sum();
    wait_until(
        Duration::from_secs(300),
        || {
            let got: Vec<u64> = checker.streams().iter().map(|x| x.unique).collect();
            format!(
                "every line written ({written:?}) to arrive; arrived per writer: {got:?}\nagent log (tail):\n{}",
                tail(&node.log, 40)
            )
        },
        || {
            let streams = checker.streams();
            streams
                .iter()
                .zip(&written)
                .all(|(x, (n, _))| x.unique >= *n)
        },
    );
    peaks.push(peak_rss_mib(&agent));
    assert!(agent.stop().success());

    let streams = checker.streams();
    let rotations: u64 = written.iter().map(|(_, r)| r).sum();
    let duplicates: u64 = streams.iter().map(|x| x.duplicates).sum();
    let deepest = streams.iter().map(|x| x.deepest_rewind).max().unwrap_or(0);
    let missing: u64 = streams
        .iter()
        .zip(&written)
        .map(|(x, (n, _))| x.missing_below(*n))
        .sum();
    let jumps: u64 = streams.iter().map(|x| x.jumps).sum();
    let third = peaks.len().div_ceil(3).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (first, last) = (mean(&peaks[..third]), mean(&peaks[peaks.len() - third..]));
    println!(
        "soak {} s: {total} lines by {WRITERS} writers at {} lines/s each, {rotations} rotations, {kills} kill -9, {outages} broker outages of {} s",
        s.secs, s.rate, s.outage_secs
    );
    println!(
        "  missing {missing}, out of order {jumps}, duplicates {duplicates} ({:.3} % of lines), deepest resend {deepest} lines ({:.1} s of one writer), foreign {}",
        100.0 * duplicates as f64 / total.max(1) as f64,
        deepest as f64 / s.rate as f64,
        checker.foreign.load(Ordering::Relaxed)
    );
    println!(
        "  agent peak RSS per life (MiB): {:?}; first third {first:.1}, last third {last:.1}",
        peaks
            .iter()
            .map(|p| (p * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    assert_eq!(missing, 0, "lines missing");
    assert_eq!(jumps, 0, "lines out of order");
    assert_eq!(checker.foreign.load(Ordering::Relaxed), 0);
    assert!(kills >= 3, "the run is too short for kills: {s:?}");
    // A resend goes back at most to the last saved checkpoint: what was in
    // flight at the kill (the 2 MiB budget; at 100 B a record, to spare
    // rounding, 20,971 records) plus what was acknowledged since the last
    // save. That is a checkpoint interval of reading, which right after an
    // outage runs at catch-up speed through the backlog the outage left:
    // at most the outage's lines plus 3 s of lines.
    let bound = (2 << 20) / 100 + s.rate * (3 + s.outage_secs);
    assert!(
        deepest <= bound,
        "resent {deepest} lines at once (bound {bound})"
    );
    // No growth from life to life (each life reads the same kind of work).
    assert!(
        last <= first * 1.25 + 2.0,
        "peak RSS grows across lives: {first:.1} MiB → {last:.1} MiB"
    );
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
