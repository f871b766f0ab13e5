//! Scale benchmark: one agent follows 10,000 CRI log files across 2,000 pod
//! directories (5 containers per pod), each holding one line before the
//! agent starts. In one run, with one agent process:
//!
//! 1. start-up: the time from the agent's start until the first line of
//!    every file is in Kafka (and the agent's peak RSS by then);
//! 2. idle: nothing written: the agent's CPU, wakeups (context switches of
//!    all its threads) per second, and steady RSS;
//! 3. trickle: every file written at `--rate` lines/s (5: 50,000 lines/s
//!    over 10,000 files), paced by wall clock from a few writer threads
//!    that keep the files open: CPU per line, wakeups, write → Kafka
//!    latency as a consumer sees it, drain time, peak RSS;
//! 4. burst: `--burst-lines` spread over all files round-robin, as fast as
//!    the writers go: lines/s from the first write to the last arrival,
//!    CPU, peak RSS.
//!
//! Then the peak (VmHWM over the whole run) and steady RSS, a summary, and
//! the command to reproduce. Every line carries its file and sequence
//! number (`w<file> seq=<n>`); a consumer counts unique lines per file, so
//! each phase prints what is missing or duplicated. The writers', the
//! consumer's and the broker's CPU and the machine's load are printed too:
//! on a small machine they share the cores with the agent. Measures;
//! asserts nothing.
//!
//! `cargo xtask bench scale [-- --files N --pods N --idle-secs S --rate
//!  LINES_PER_FILE_PER_S --trickle-secs S --burst-lines N --line-bytes B
//!  --writers N --partitions N --watcher W --phases start,idle,trickle,burst
//!  --start-timeout S --drain-timeout S --agent BPFTAIL_ARGS…]`
//!
//! Defaults: 10,000 files, 2,000 pods, idle 30 s, 5 lines/s per file for
//! 30 s, a burst of 1,000,000 lines of 200 B, 4 writers, 8 partitions,
//! `--watcher auto`; the start phase always runs. `BPFTAIL_BIN` runs
//! another agent binary (a profiling wrapper, say).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use support::*;

const TOPIC: &str = "scale";

struct Opts {
    files: usize,
    pods: usize,
    idle_secs: f64,
    rate: f64,
    trickle_secs: f64,
    burst_lines: u64,
    line_bytes: usize,
    writers: usize,
    partitions: u32,
    watcher: String,
    phases: String,
    start_timeout: f64,
    drain_timeout: f64,
    /// Arguments after `--agent`, passed to bpftail as they are.
    agent: Vec<String>,
}

impl Opts {
    fn parse() -> Opts {
        let num = |name: &str, default: &str| -> f64 {
            cli_arg(name, default)
                .parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        };
        Opts {
            files: num("--files", "10000") as usize,
            pods: num("--pods", "2000") as usize,
            idle_secs: num("--idle-secs", "30"),
            rate: num("--rate", "5"),
            trickle_secs: num("--trickle-secs", "30"),
            burst_lines: num("--burst-lines", "1000000") as u64,
            line_bytes: num("--line-bytes", "200") as usize,
            writers: (num("--writers", "4") as usize).max(1),
            partitions: num("--partitions", "8") as u32,
            watcher: cli_arg("--watcher", "auto"),
            phases: cli_arg("--phases", "start,idle,trickle,burst"),
            start_timeout: num("--start-timeout", "300"),
            drain_timeout: num("--drain-timeout", "300"),
            agent: std::env::args()
                .skip_while(|a| a != "--agent")
                .skip(1)
                .filter(|a| a != "--bench")
                .collect(),
        }
    }

    fn phase(&self, name: &str) -> bool {
        self.phases.split(',').any(|p| p == name)
    }

    /// The command that repeats this run.
    fn command(&self) -> String {
        let mut c = format!(
            "cargo xtask bench scale -- --files {} --pods {} --idle-secs {} --rate {} --trickle-secs {} --burst-lines {} --line-bytes {} --writers {} --partitions {} --watcher {}",
            self.files,
            self.pods,
            self.idle_secs,
            self.rate,
            self.trickle_secs,
            self.burst_lines,
            self.line_bytes,
            self.writers,
            self.partitions,
            self.watcher
        );
        if self.phases != "start,idle,trickle,burst" {
            c += &format!(" --phases {}", self.phases);
        }
        if !self.agent.is_empty() {
            c += &format!(" --agent {}", self.agent.join(" "));
        }
        c
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Raises this process's open-file limit (the agent and the broker inherit
/// it): as high as root may, else to the hard limit. Returns (soft, hard).
fn raise_nofile() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    let want = libc::rlimit {
        rlim_cur: r.rlim_max.max(1 << 20),
        rlim_max: r.rlim_max.max(1 << 20),
    };
    // SAFETY: setrlimit reads a struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        let soft = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
    }
    // SAFETY: as above.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (r.rlim_cur, r.rlim_max)
}

/// One followed log file, kept open by the writer that owns it.
struct LogFile {
    id: usize,
    file: File,
    /// Next sequence number (= lines written so far).
    next: u64,
}

/// A CRI line that `parse_seq` reads (`w<file> seq=<n>`), with its write
/// time (`t=<unix ns>`) for the latency, ~`len` bytes.
fn line(buf: &mut Vec<u8>, file: usize, seq: u64, len: usize) {
    buf.clear();
    write!(
        buf,
        "2026-11-25T16:00:00.{:09}Z stdout F w{file} seq={seq:08} t={} ",
        seq % 1_000_000_000,
        unix_ns()
    )
    .unwrap();
    while buf.len() + 1 < len {
        buf.push(b'a' + (buf.len() % 26) as u8);
    }
    buf.push(b'\n');
}

/// What the consumer has seen, per file.
struct Seen {
    /// Per file, a bit per sequence number.
    bits: Vec<Vec<u64>>,
    unique: u64,
    duplicates: u64,
    foreign: u64,
    /// When each file's first line (seq 0) arrived.
    first_at: Vec<Option<Instant>>,
    firsts: usize,
    /// When the last line not seen before arrived.
    last_new: Option<Instant>,
    /// Write → read latency in µs of lines carrying `t=`, since last taken.
    latency_us: Vec<u32>,
}

impl Seen {
    fn new(files: usize) -> Seen {
        Seen {
            bits: vec![Vec::new(); files],
            unique: 0,
            duplicates: 0,
            foreign: 0,
            first_at: vec![None; files],
            firsts: 0,
            last_new: None,
            latency_us: Vec::new(),
        }
    }

    fn record(&mut self, file: usize, seq: u64, now: Instant) {
        let Some(bits) = self.bits.get_mut(file) else {
            self.foreign += 1;
            return;
        };
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        bits[word] |= 1 << bit;
        self.unique += 1;
        self.last_new = Some(now);
        if seq == 0 {
            self.first_at[file] = Some(now);
            self.firsts += 1;
        }
    }

    /// Lines of `files` (id, written) that never arrived.
    fn missing(&self, written: &[(usize, u64)]) -> u64 {
        written
            .iter()
            .map(|&(id, n)| {
                let got: u64 = (0..n)
                    .filter(|s| {
                        self.bits[id]
                            .get((s / 64) as usize)
                            .is_some_and(|w| w & (1 << (s % 64)) != 0)
                    })
                    .count() as u64;
                n - got
            })
            .sum()
    }
}

/// The `t=<ns>` a message carries.
fn write_time(v: &[u8]) -> Option<u64> {
    let i = memchr_find(v, b" t=")?;
    let rest = &v[i + 3..];
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn memchr_find(v: &[u8], pat: &[u8]) -> Option<usize> {
    v.get(..v.len().min(64))?
        .windows(pat.len())
        .position(|w| w == pat)
}

/// Reads the topic from the beginning in a thread of its own ("collector")
/// and counts unique lines per file; keeps no records.
struct Tracker {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tracker {
    fn start(brokers: &str, files: usize) -> Tracker {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "bench-scale")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "20")
            .set("log_level", "3")
            .create()
            .expect("consumer");
        let partitions = (|| {
            for _ in 0..300 {
                if let Ok(md) = consumer.fetch_metadata(Some(TOPIC), Duration::from_secs(5))
                    && let Some(t) = md.topics().first()
                    && !t.partitions().is_empty()
                {
                    return t.partitions().len();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("topic {TOPIC} never appeared");
        })();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition_offset(TOPIC, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let seen = Arc::new(Mutex::new(Seen::new(files)));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("collector".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                        continue;
                    };
                    let v = m.payload().unwrap_or_default();
                    let now = Instant::now();
                    let lat = write_time(v).map(|t| (unix_ns().saturating_sub(t) / 1000) as u32);
                    let mut g = s.lock().unwrap();
                    match parse_seq(v) {
                        Some((w, n)) => g.record(w, n, now),
                        None => g.foreign += 1,
                    }
                    if let Some(l) = lat {
                        g.latency_us.push(l);
                    }
                }
            })
            .unwrap();
        Tracker {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn unique(&self) -> u64 {
        self.seen.lock().unwrap().unique
    }

    /// Waits until `unique` reaches `target` (or `timeout`); returns when
    /// the last new line arrived, if it got there.
    fn wait_unique(&self, target: u64, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let g = self.seen.lock().unwrap();
                if g.unique >= target {
                    return g.last_new;
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn take_latency(&self) -> Vec<u32> {
        std::mem::take(&mut self.seen.lock().unwrap().latency_us)
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Per thread of a process: name, context switches (voluntary,
/// involuntary), CPU ns (schedstat).
type Threads = BTreeMap<u32, (String, u64, u64, u64)>;

fn threads(pid: u32) -> Threads {
    let mut out = Threads::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(tid) = t.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let dir = t.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let cpu = std::fs::read_to_string(dir.join("schedstat"))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.insert(
            tid,
            (
                comm.trim().to_owned(),
                field("voluntary_ctxt_switches:"),
                field("nonvoluntary_ctxt_switches:"),
                cpu,
            ),
        );
    }
    out
}

/// What threads did between two snapshots, grouped by thread name:
/// name → (threads, voluntary, involuntary switches, CPU ns).
#[derive(Default)]
struct Usage {
    by_name: BTreeMap<String, (u64, u64, u64, u64)>,
}

impl Usage {
    fn between(a: &Threads, b: &Threads) -> Usage {
        let mut u = Usage::default();
        for (tid, (name, vol, invol, ns)) in b {
            let (v0, i0, n0) = a.get(tid).map_or((0, 0, 0), |(_, v, i, n)| (*v, *i, *n));
            let e = u.by_name.entry(name.clone()).or_default();
            e.0 += 1;
            e.1 += vol.saturating_sub(v0);
            e.2 += invol.saturating_sub(i0);
            e.3 += ns.saturating_sub(n0);
        }
        u
    }

    fn cpu_s(&self) -> f64 {
        self.by_name.values().map(|e| e.3).sum::<u64>() as f64 / 1e9
    }

    fn switches(&self) -> u64 {
        self.by_name.values().map(|e| e.1 + e.2).sum()
    }

    fn cpu_s_of(&self, prefix: &str) -> f64 {
        self.by_name
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e.3)
            .sum::<u64>() as f64
            / 1e9
    }

    /// The agent's threads, one line per name.
    fn print(&self, wall: f64) {
        let mut rows: Vec<_> = self.by_name.iter().collect();
        rows.sort_by(|a, b| b.1.3.cmp(&a.1.3).then(b.1.1.cmp(&a.1.1)));
        for (name, (n, vol, invol, ns)) in rows {
            if *vol + *invol == 0 && *ns == 0 {
                continue;
            }
            println!(
                "      {:<18} x{:<2} {:>9.1} wake/s (vol {:>8.1}) {:>7.2} % core",
                name,
                n,
                (vol + invol) as f64 / wall,
                *vol as f64 / wall,
                *ns as f64 / 1e9 / wall * 100.0
            );
        }
    }
}

/// The machine's CPU busy and total jiffies (/proc/stat), for its load.
fn system_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The broker's pid: our child named tansu.
fn broker_pid() -> Option<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let (head, rest) = stat.rsplit_once(')')?;
        let ppid = rest.split_whitespace().nth(1)?;
        (head.ends_with("(tansu") && ppid == me).then_some(pid)
    })
}

/// A snapshot of everything a phase is measured by.
struct Snap {
    at: Instant,
    agent: Threads,
    me: Threads,
    broker_cpu: f64,
    sys: (u64, u64),
}

struct Probe {
    agent_pid: u32,
    broker: Option<u32>,
}

impl Probe {
    fn snap(&self) -> Snap {
        Snap {
            at: Instant::now(),
            agent: threads(self.agent_pid),
            me: threads(std::process::id()),
            broker_cpu: self.broker.map_or(0.0, process_cpu_seconds),
            sys: system_jiffies(),
        }
    }
}

/// What a phase measured.
struct Span {
    wall: f64,
    agent: Usage,
    me: Usage,
    broker_cpu: f64,
    sys_busy: f64,
}

impl Span {
    fn between(a: &Snap, b: &Snap) -> Span {
        Span {
            wall: (b.at - a.at).as_secs_f64(),
            agent: Usage::between(&a.agent, &b.agent),
            me: Usage::between(&a.me, &b.me),
            broker_cpu: b.broker_cpu - a.broker_cpu,
            sys_busy: (b.sys.0 - a.sys.0) as f64 / (b.sys.1 - a.sys.1).max(1) as f64,
        }
    }

    fn agent_cpu(&self) -> f64 {
        self.agent.cpu_s()
    }

    fn wake_per_s(&self) -> f64 {
        self.agent.switches() as f64 / self.wall
    }

    /// The rest of the machine, in % of a core each (the writers' CPU
    /// seconds as they counted them: their threads are gone by now).
    fn others(&self, writers_cpu: f64) -> String {
        let pct = |s: f64| s / self.wall * 100.0;
        format!(
            "machine busy {:.0} % of {} cores; agent {:.1} %, broker {:.1} %, writers {:.1} %, consumer {:.1} % (of one core)",
            self.sys_busy * 100.0,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            pct(self.agent_cpu()),
            pct(self.broker_cpu),
            pct(writers_cpu),
            pct(self.me.cpu_s_of("collector") + self.me.cpu_s_of("rdk:")),
        )
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// RSS split (anon, file, shmem) from /proc/PID/status, in MiB.
fn rss_split(pid: u32) -> String {
    format!(
        "RSS {:.1} MiB (anon {:.1}, file {:.1}, shmem {:.1})",
        mib(proc_status_kib(pid, "VmRSS:")),
        mib(proc_status_kib(pid, "RssAnon:")),
        mib(proc_status_kib(pid, "RssFile:")),
        mib(proc_status_kib(pid, "RssShmem:")),
    )
}

fn percentiles(mut v: Vec<u32>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_unstable();
    let q = |p: f64| v[((v.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    format!(
        "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        q(0.5),
        q(0.99),
        q(1.0)
    )
}

/// Writes at `rate` lines/s to each of `files` for `secs`, spread evenly
/// over time (each file every 1/rate s, the files staggered), paced by
/// wall clock; returns this thread's CPU ns.
fn trickle(files: &mut [LogFile], rate: f64, secs: f64, len: usize, written: &AtomicU64) -> u64 {
    let cpu0 = thread_cpu_ns();
    let n = files.len();
    if n == 0 || rate <= 0.0 {
        return 0;
    }
    let total = (rate * secs).round() as u64 * n as u64;
    let gap = Duration::from_secs_f64(1.0 / (rate * n as f64));
    let mut buf = Vec::with_capacity(len + 64);
    let start = Instant::now();
    for k in 0..total {
        let due = start + gap * k as u32;
        let now = Instant::now();
        if due > now + Duration::from_millis(2) {
            std::thread::sleep(due - now);
        }
        let f = &mut files[(k % n as u64) as usize];
        line(&mut buf, f.id, f.next, len);
        f.file.write_all(&buf).unwrap();
        f.next += 1;
        written.fetch_add(1, Ordering::Relaxed);
    }
    thread_cpu_ns() - cpu0
}

/// Writes `quota(file)` lines to each of `files`, round-robin, as fast as
/// it can; returns this thread's CPU ns.
fn burst(
    files: &mut [LogFile],
    quota: &dyn Fn(usize) -> u64,
    len: usize,
    written: &AtomicU64,
) -> u64 {
    let cpu0 = thread_cpu_ns();
    let mut buf = Vec::with_capacity(len + 64);
    let rounds = files.iter().map(|f| quota(f.id)).max().unwrap_or(0);
    for r in 0..rounds {
        for f in files.iter_mut() {
            if r < quota(f.id) {
                line(&mut buf, f.id, f.next, len);
                f.file.write_all(&buf).unwrap();
                f.next += 1;
                written.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    thread_cpu_ns() - cpu0
}

fn thread_cpu_ns() -> u64 {
    // SAFETY: a plain C struct filled by clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `work` on each writer's share of `files`, in threads named
/// `writer-<n>`; returns their CPU seconds.
fn with_writers(
    files: &mut [LogFile],
    writers: usize,
    work: &(dyn Fn(&mut [LogFile]) -> u64 + Sync),
) -> f64 {
    let chunk = files.len().div_ceil(writers).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks_mut(chunk)
            .enumerate()
            .map(|(i, mine)| {
                std::thread::Builder::new()
                    .name(format!("writer-{i}"))
                    .spawn_scoped(s, move || work(mine))
                    .unwrap()
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum::<u64>() as f64 / 1e9
    })
}

/// A summary row.
struct Row {
    phase: &'static str,
    secs: f64,
    lines: u64,
    lines_per_s: f64,
    cpu_s: f64,
    core_pct: f64,
    us_per_line: Option<f64>,
    wake_per_s: Option<f64>,
    peak_mib: f64,
    rss_mib: f64,
    missing: u64,
    dups: u64,
}

fn main() {
    let o = Opts::parse();
    let (soft, hard) = raise_nofile();
    println!(
        "bpftail scale benchmark: {} files in {} pod dirs, 1 line each before start; idle {} s; {} lines/s per file ({:.0} lines/s) for {} s; burst {} lines; ~{} B lines; {} writer threads; --watcher {}",
        o.files,
        o.pods,
        o.idle_secs,
        o.rate,
        o.rate * o.files as f64,
        o.trickle_secs,
        o.burst_lines,
        o.line_bytes,
        o.writers,
        o.watcher
    );
    println!(
        "  open-file limit (inherited by the agent): soft {soft}, hard {hard}; load average {}",
        loadavg()
    );
    let (tmp, pods) = test_dir("bpftail-scale-");
    let broker = Broker::start();
    broker.create_topic(TOPIC, o.partitions);

    // 1. Files, each with its first line, before the agent starts.
    let t = Instant::now();
    let per_pod = o.files.div_ceil(o.pods.max(1));
    let mut files: Vec<LogFile> = (0..o.files)
        .map(|i| {
            let pod = i % o.pods.max(1);
            let d = container_dir(
                &pods,
                "bench",
                &format!("pod-{pod}"),
                &format!("uid-{pod:08}-0000-4000-8000-000000000000"),
                &format!("c{}", i / o.pods.max(1)),
            );
            let mut w = LineWriter::create(&d.join("0.log"));
            w.line(i, 0, o.line_bytes);
            LogFile {
                id: i,
                file: w.file,
                next: 1,
            }
        })
        .collect();
    println!(
        "  setup: {} files written in {:.1} s ({per_pod} containers per pod)",
        o.files,
        t.elapsed().as_secs_f64()
    );

    let tracker = Tracker::start(&broker.addr(), o.files);
    let mut extra: Vec<&str> = vec!["--format", "raw", "--kube", "off", "--watcher", &o.watcher];
    extra.extend(o.agent.iter().map(String::as_str));
    let args = agent_args(
        &pods,
        &tmp.path().join("data"),
        &broker.addr(),
        TOPIC,
        &extra,
    );
    let log = tmp.path().join("bpftail.log");
    let written = Arc::new(AtomicU64::new(o.files as u64));
    let mut rows: Vec<Row> = Vec::new();
    let mut peaks: Vec<u64> = Vec::new();

    // 2. Start: until the first line of every file is in Kafka.
    let t0 = Instant::now();
    let sys0 = system_jiffies();
    let agent = Agent::start(&args, &log);
    let ready = t0.elapsed().as_secs_f64();
    let pid = agent.pid();
    let probe = Probe {
        agent_pid: pid,
        broker: broker_pid(),
    };
    let watcher = agent
        .metrics()
        .keys()
        .find_map(|k| {
            k.strip_prefix("bpftail_watcher_info{watcher=\"")
                .and_then(|w| w.strip_suffix("\"}"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into());
    println!(
        "  agent pid {pid}, watcher {watcher} (asked: {}); /healthz after {ready:.2} s",
        o.watcher
    );
    let mut watched_at = None;
    let deadline = t0 + Duration::from_secs_f64(o.start_timeout);
    let all_firsts = loop {
        if watched_at.is_none() && agent.metric("bpftail_files_watched") >= o.files as u64 {
            watched_at = Some(t0.elapsed().as_secs_f64());
        }
        let (firsts, at) = {
            let g = tracker.seen.lock().unwrap();
            (g.firsts, g.first_at.iter().flatten().max().copied())
        };
        if firsts >= o.files {
            break at;
        }
        if Instant::now() > deadline {
            println!(
                "  start: only {firsts} of {} first lines arrived within {} s",
                o.files, o.start_timeout
            );
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let start_peak = agent.peak_rss_kib();
    peaks.push(start_peak);
    let start_cpu = agent.cpu_seconds();
    let (firsts_p50, firsts_p99) = {
        let g = tracker.seen.lock().unwrap();
        let mut v: Vec<f64> = g
            .first_at
            .iter()
            .flatten()
            .map(|t| t.saturating_duration_since(t0).as_secs_f64())
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let q = |p: f64| v.get(((v.len().max(1) - 1) as f64 * p) as usize).copied();
        (q(0.5), q(0.99))
    };
    let first_all = all_firsts.map(|t| t.saturating_duration_since(t0).as_secs_f64());
    let sys1 = system_jiffies();
    println!(
        "  start: every file followed after {}; first line of every file in Kafka after {} (p50 {}, p99 {}); agent CPU {start_cpu:.2} s; peak RSS {:.1} MiB; {}; machine busy {:.0} %",
        watched_at.map_or("-".into(), |s| format!("{s:.2} s")),
        first_all.map_or("-".into(), |s| format!("{s:.2} s")),
        firsts_p50.map_or("-".into(), |s| format!("{s:.2} s")),
        firsts_p99.map_or("-".into(), |s| format!("{s:.2} s")),
        mib(start_peak),
        rss_split(pid),
        (sys1.0 - sys0.0) as f64 / (sys1.1 - sys0.1).max(1) as f64 * 100.0
    );
    let m = agent.metrics();
    let g = |k: &str| m.get(k).copied().unwrap_or(0);
    println!(
        "    metrics: files_watched {}, ebpf_unwatched_files {}, records_delivered {}, watcher_wakeups {}, sweeps {}",
        g("bpftail_files_watched"),
        g("bpftail_ebpf_unwatched_files"),
        g("bpftail_records_delivered_total"),
        g("bpftail_watcher_wakeups_total"),
        g("bpftail_sweeps_total"),
    );
    let start_seen = {
        let g = tracker.seen.lock().unwrap();
        (g.firsts as u64, g.duplicates)
    };
    rows.push(Row {
        phase: "start",
        secs: first_all.unwrap_or(f64::NAN),
        lines: o.files as u64,
        lines_per_s: o.files as f64 / first_all.unwrap_or(f64::NAN),
        cpu_s: start_cpu,
        core_pct: start_cpu / first_all.unwrap_or(f64::NAN) * 100.0,
        us_per_line: None,
        wake_per_s: None,
        peak_mib: mib(start_peak),
        rss_mib: mib(agent.rss_kib()),
        missing: o.files as u64 - start_seen.0,
        dups: start_seen.1,
    });
    let integrity = |files: &[LogFile]| {
        let written: Vec<(usize, u64)> = files.iter().map(|f| (f.id, f.next)).collect();
        let g = tracker.seen.lock().unwrap();
        (g.missing(&written), g.duplicates, g.foreign)
    };

    // 3. Idle.
    let mut steady_rss = agent.rss_kib();
    if o.phase("idle") {
        // What start-up left to do (acknowledgements, the first checkpoint).
        std::thread::sleep(Duration::from_secs(2));
        agent.reset_peak_rss();
        let a = probe.snap();
        std::thread::sleep(Duration::from_secs_f64(o.idle_secs));
        let b = probe.snap();
        let span = Span::between(&a, &b);
        steady_rss = agent.rss_kib();
        let peak = agent.peak_rss_kib();
        peaks.push(peak);
        println!(
            "  idle {:.0} s: agent CPU {:.3} s ({:.3} % core), {:.1} wakeups/s; {}; peak {:.1} MiB",
            span.wall,
            span.agent_cpu(),
            span.agent_cpu() / span.wall * 100.0,
            span.wake_per_s(),
            rss_split(pid),
            mib(peak)
        );
        println!("    {}", span.others(0.0));
        println!("    agent threads:");
        span.agent.print(span.wall);
        rows.push(Row {
            phase: "idle",
            secs: span.wall,
            lines: 0,
            lines_per_s: 0.0,
            cpu_s: span.agent_cpu(),
            core_pct: span.agent_cpu() / span.wall * 100.0,
            us_per_line: None,
            wake_per_s: Some(span.wake_per_s()),
            peak_mib: mib(peak),
            rss_mib: mib(steady_rss),
            missing: 0,
            dups: 0,
        });
    }

    // 4. Trickle: every file at `rate` lines/s.
    if o.phase("trickle") {
        agent.reset_peak_rss();
        tracker.take_latency();
        let before = tracker.unique();
        let w0 = written.load(Ordering::Relaxed);
        let a = probe.snap();
        let (rate, secs, len) = (o.rate, o.trickle_secs, o.line_bytes);
        let wr = written.clone();
        let writer_cpu = with_writers(&mut files, o.writers, &|mine| {
            trickle(mine, rate, secs, len, &wr)
        });
        let b = probe.snap();
        let lines = written.load(Ordering::Relaxed) - w0;
        let in_phase = tracker.unique() - before;
        let last = tracker.wait_unique(
            written.load(Ordering::Relaxed),
            Duration::from_secs_f64(o.drain_timeout),
        );
        let c = probe.snap();
        let drain = last.map(|l| l.saturating_duration_since(b.at).as_secs_f64());
        let span = Span::between(&a, &b);
        let all = Span::between(&a, &c);
        let peak = agent.peak_rss_kib();
        peaks.push(peak);
        let (missing, dups, foreign) = integrity(&files);
        let lat = tracker.take_latency();
        println!(
            "  trickle {:.1} s: {lines} lines written ({:.0}/s; writers {:.2} CPU-s), {in_phase} delivered within the phase, the rest {}",
            span.wall,
            lines as f64 / span.wall,
            writer_cpu,
            drain.map_or(format!("NOT within {} s", o.drain_timeout), |d| format!(
                "{d:.2} s after"
            )),
        );
        println!(
            "    agent while writing: CPU {:.2} s ({:.1} % core), {:.1} wakeups/s; with the drain: {:.2} CPU-s, {:.2} µs CPU per line; peak {:.1} MiB, {}",
            span.agent_cpu(),
            span.agent_cpu() / span.wall * 100.0,
            span.wake_per_s(),
            all.agent_cpu(),
            all.agent_cpu() / lines.max(1) as f64 * 1e6,
            mib(peak),
            rss_split(pid)
        );
        println!(
            "    write → consumer latency: {}; missing {missing}, duplicates {dups}, foreign {foreign}",
            percentiles(lat)
        );
        println!("    {}", span.others(writer_cpu));
        println!("    agent threads while writing:");
        span.agent.print(span.wall);
        rows.push(Row {
            phase: "trickle",
            secs: span.wall,
            lines,
            lines_per_s: in_phase as f64 / span.wall,
            cpu_s: all.agent_cpu(),
            core_pct: span.agent_cpu() / span.wall * 100.0,
            us_per_line: Some(all.agent_cpu() / lines.max(1) as f64 * 1e6),
            wake_per_s: Some(span.wake_per_s()),
            peak_mib: mib(peak),
            rss_mib: mib(agent.rss_kib()),
            missing,
            dups,
        });
    }

    // 5. Burst: as fast as the writers go.
    if o.phase("burst") && o.burst_lines > 0 {
        agent.reset_peak_rss();
        tracker.take_latency();
        let w0 = written.load(Ordering::Relaxed);
        let a = probe.snap();
        let (n, total, len) = (o.files as u64, o.burst_lines, o.line_bytes);
        let quota = move |id: usize| total / n + u64::from((id as u64) < total % n);
        let wr = written.clone();
        let writer_cpu = with_writers(&mut files, o.writers, &|mine| burst(mine, &quota, len, &wr));
        let b = probe.snap();
        let lines = written.load(Ordering::Relaxed) - w0;
        let last = tracker.wait_unique(
            written.load(Ordering::Relaxed),
            Duration::from_secs_f64(o.drain_timeout),
        );
        let c = probe.snap();
        let span = Span::between(&a, &c);
        let secs = last.map(|l| l.saturating_duration_since(a.at).as_secs_f64());
        let peak = agent.peak_rss_kib();
        peaks.push(peak);
        let (missing, dups, foreign) = integrity(&files);
        let lat = tracker.take_latency();
        let write_s = (b.at - a.at).as_secs_f64();
        println!(
            "  burst: {lines} lines written in {write_s:.2} s ({:.0}/s; writers {:.2} CPU-s); all in Kafka after {}: {} lines/s delivered",
            lines as f64 / write_s,
            writer_cpu,
            secs.map_or(
                format!("- (NOT within {} s)", o.drain_timeout),
                |s| format!("{s:.2} s")
            ),
            secs.map_or("-".into(), |s| format!("{:.0}", lines as f64 / s)),
        );
        println!(
            "    agent: CPU {:.2} s ({:.1} % core), {:.2} µs CPU per line, {:.1} wakeups/s; peak {:.1} MiB, {}",
            span.agent_cpu(),
            span.agent_cpu() / span.wall * 100.0,
            span.agent_cpu() / lines.max(1) as f64 * 1e6,
            span.wake_per_s(),
            mib(peak),
            rss_split(pid)
        );
        println!(
            "    write → consumer latency: {}; missing {missing}, duplicates {dups}, foreign {foreign}",
            percentiles(lat)
        );
        println!("    {}", span.others(writer_cpu));
        println!("    agent threads:");
        span.agent.print(span.wall);
        rows.push(Row {
            phase: "burst",
            secs: secs.unwrap_or(f64::NAN),
            lines,
            lines_per_s: lines as f64 / secs.unwrap_or(f64::NAN),
            cpu_s: span.agent_cpu(),
            core_pct: span.agent_cpu() / span.wall * 100.0,
            us_per_line: Some(span.agent_cpu() / lines.max(1) as f64 * 1e6),
            wake_per_s: Some(span.wake_per_s()),
            peak_mib: mib(peak),
            rss_mib: mib(agent.rss_kib()),
            missing,
            dups,
        });
    }

    // 6. Summary.
    std::thread::sleep(Duration::from_secs(3));
    let end_rss = agent.rss_kib();
    peaks.push(agent.peak_rss_kib());
    let peak = peaks.iter().copied().max().unwrap_or(0);
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let pick = |f: &str| {
        smaps
            .lines()
            .find(|l| l.starts_with(f))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or("-".into(), |k| format!("{:.1}", mib(k)))
    };
    let m = agent.metrics();
    let g = |k: &str| m.get(k).copied().unwrap_or(0);
    let (missing, dups, foreign) = integrity(&files);
    println!();
    println!(
        "summary ({} files, {} pods, watcher {watcher}; load average now {}):",
        o.files,
        o.pods,
        loadavg()
    );
    println!(
        "  {:<8} {:>8} {:>9} {:>10} {:>8} {:>7} {:>8} {:>8} {:>9} {:>8} {:>8} {:>5}",
        "phase",
        "secs",
        "lines",
        "lines/s",
        "CPU s",
        "% core",
        "µs/line",
        "wake/s",
        "peak MiB",
        "RSS MiB",
        "missing",
        "dups"
    );
    for r in &rows {
        println!(
            "  {:<8} {:>8.2} {:>9} {:>10.0} {:>8.2} {:>7.2} {:>8} {:>8} {:>9.1} {:>8.1} {:>8} {:>5}",
            r.phase,
            r.secs,
            r.lines,
            r.lines_per_s,
            r.cpu_s,
            r.core_pct,
            r.us_per_line.map_or("-".into(), |v| format!("{v:.2}")),
            r.wake_per_s.map_or("-".into(), |v| format!("{v:.1}")),
            r.peak_mib,
            r.rss_mib,
            r.missing,
            r.dups
        );
    }
    println!(
        "  peak RSS (VmHWM over the run) {:.1} MiB (target <= 32 MiB); steady RSS after idle {:.1} MiB, at the end {:.1} MiB; {}",
        mib(peak),
        mib(steady_rss),
        mib(end_rss),
        rss_split(pid)
    );
    println!(
        "  smaps_rollup at the end: Rss {} MiB, Anonymous {}, Pss_Anon {}, Pss_File {}, Pss_Shmem {}",
        pick("Rss:"),
        pick("Anonymous:"),
        pick("Pss_Anon:"),
        pick("Pss_File:"),
        pick("Pss_Shmem:")
    );
    println!(
        "  agent metrics: files_watched {}, records_delivered {}, records_sent {}, watcher_wakeups {}, sweeps {}; agent CPU over the run {:.2} s",
        g("bpftail_files_watched"),
        g("bpftail_records_delivered_total"),
        g("bpftail_records_sent_total"),
        g("bpftail_watcher_wakeups_total"),
        g("bpftail_sweeps_total"),
        agent.cpu_seconds()
    );
    println!(
        "  integrity over the run: {} lines written, {} unique in Kafka, missing {missing}, duplicates {dups}, foreign {foreign}",
        written.load(Ordering::Relaxed),
        tracker.unique()
    );
    println!("  reproduce: {}", o.command());
    let _ = agent.stop();
    drop(tracker);
    if std::env::var_os("BPFTAIL_KEEP_TMP").is_some() {
        println!("  agent log: {}", log.display());
    }
    drop(tmp);
}
