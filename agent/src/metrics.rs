//! Metrics: the agent's own counters, served as Prometheus text on
//! `/metrics`, with `/healthz` for liveness (the data loop turns) and
//! `/readyz` for delivery (records reach Kafka, or none wait).
//!
//! Counters are relaxed atomics: the data path bumps them without locks, and
//! a scrape reads a slightly stale but never torn value. Each sits alone on
//! its cache lines (128 bytes: a line and its prefetched neighbour), so the
//! data thread's counters and the Kafka sender's never share one. Metric labels come
//! from `kind()` functions, never from `Debug` output.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A monotonically increasing count.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why a record was not delivered at the first try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Transient: the file is read again from its acknowledged offset.
    Retried,
    /// Permanent: counted and passed over.
    Dropped,
    /// The producer's queue was full; the send was retried.
    QueueFull,
}

impl FailureKind {
    const ALL: [FailureKind; 3] = [
        FailureKind::Retried,
        FailureKind::Dropped,
        FailureKind::QueueFull,
    ];

    /// The metric label.
    pub fn kind(self) -> &'static str {
        match self {
            FailureKind::Retried => "retried",
            FailureKind::Dropped => "dropped",
            FailureKind::QueueFull => "queue_full",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub lines_read: Counter,
    pub bytes_read: Counter,
    pub records_sent: Counter,
    pub records_delivered: Counter,
    pub bytes_delivered: Counter,
    /// Indexed by [`FailureKind`]; use [`Metrics::delivery_failed`].
    delivery_failures: [Counter; 3],
    /// Configuration reloads applied, and refused (the running one kept).
    pub config_reloads_applied: Counter,
    pub config_reloads_refused: Counter,
    pub truncated: Counter,
    pub malformed: Counter,
    pub invalid_utf8: Counter,
    pub partial_flushed: Counter,
    /// Multiline records delivered because no line came to end them.
    pub multiline_flushed: Counter,
    /// Reads put off because a container was over its rate limit.
    pub rate_limit_waits: Counter,
    /// Turns whose reading waited for `--max-cpu`.
    pub cpu_paced: Counter,
    pub bytes_skipped: Counter,
    pub truncations: Counter,
    pub rotations: Counter,
    pub read_errors: Counter,
    pub open_errors: Counter,
    pub files_watched: Gauge,
    /// Files found but not opened yet: they wait for their pod's metadata.
    pub files_awaiting_pod: Gauge,
    /// Full discoveries and sweeps done by the data loop (tests wait for
    /// one to pass instead of sleeping).
    pub scans: Counter,
    pub sweeps: Counter,
    /// Unread bytes the sweep found that no change report announced (the
    /// change source missed a write, or it was a few ms old).
    pub sweep_found_bytes: Counter,
    /// The Kafka client's in-flight budget, set once by the client: read
    /// for `bpftail_inflight_bytes`.
    /// (The Kafka client's, replaced when a reload reconnects it.)
    pub inflight: std::sync::Mutex<Option<Arc<crate::sink::Budget>>>,
    pub checkpoint_lag_bytes: Gauge,
    /// Containers held to their rate limit since the last sweep, and the
    /// bytes their logs hold that are not read yet.
    pub rate_limited_containers: Gauge,
    pub rate_limited_lag_bytes: Gauge,
    pub checkpoint_writes: Counter,
    pub checkpoint_errors: Counter,
    /// 1 while the latest checkpoint write failed (a full or read-only
    /// data directory): positions stay at the last good checkpoint.
    pub checkpoint_failing: Gauge,
    /// Bytes at start in files read from an older position than the
    /// newest checkpoint's, because it was unusable.
    pub checkpoint_replay_bytes: Counter,
    /// Log paths a listing could not look at (once per path while it
    /// lasts), and directories cut at their entry limit.
    pub listing_errors: Counter,
    pub listings_cut: Counter,
    /// Entries where a log file should be that are not regular files.
    pub files_not_regular: Counter,
    pub watcher_overflows: Counter,
    /// Times a change-source thread woke up to handle kernel events.
    pub watcher_wakeups: Counter,
    /// Kernel-side counters of the eBPF hook (copied from its per-CPU map).
    pub ebpf_hook_hits: Gauge,
    pub ebpf_watched_writes: Gauge,
    pub ebpf_events: Gauge,
    pub ebpf_drops: Gauge,
    pub ebpf_misses: Gauge,
    /// Files the eBPF map had no room for (followed by polling instead).
    pub ebpf_unwatched_files: Gauge,
    /// Pod watch (Kubernetes API).
    pub kube_events: Counter,
    pub kube_watch_errors: Counter,
    pub kube_pods: Gauge,
    pub kube_synced: Gauge,
    /// [`crate::kube::PodCache::generation`] after the last change, and
    /// the generation the data loop last applied to the files' metadata:
    /// once they are equal, every pod change so far is in the records.
    pub kube_generation: Gauge,
    pub kube_generation_applied: Gauge,
    /// `_format=json` lines that were not one JSON object (shipped as the message).
    pub json_lines_invalid: Counter,
    /// Declarations refused (bad name, value, format, topic; topic not
    /// allowed), counted per file opened; garbage tags dropped.
    pub declarations_refused: Counter,
    pub tags_dropped: Counter,
    /// Records of followed files that became opted out or undeclared:
    /// read and discarded.
    pub records_suppressed: Counter,
    /// Files not shipped: opted out, or not declared in `--ship declared`.
    pub files_skipped: Counter,
    /// Files opened while their pod was unknown (path metadata only).
    pub files_without_pod: Counter,
    /// Native Kafka client: produce requests sent, batches acknowledged,
    /// requests that got no response (connect, I/O, timeout, garbage),
    /// partition errors in produce responses, metadata requests.
    pub kafka_requests: Counter,
    pub kafka_batches: Counter,
    pub kafka_request_errors: Counter,
    pub kafka_partition_errors: Counter,
    pub kafka_metadata_requests: Counter,
    /// Whether the Kafka client's last exchange with the brokers worked
    /// (both clients report to it).
    pub kafka: KafkaHealth,
    /// What the data loop concluded about delivery ([`crate::pipeline::delivery`]):
    /// `/readyz`, `bpftail_delivering`, `bpftail_oldest_unacked_seconds`
    /// and the bytes waiting per namespace.
    pub delivery: std::sync::Mutex<DeliveryStatus>,
    /// The change-detection backend in use (e.g. `ebpf (tp_btf)`), set once.
    pub watcher: std::sync::OnceLock<String>,
    /// Unix seconds of the data loop's last turn (liveness).
    pub heartbeat: Gauge,
}

impl Metrics {
    pub fn delivery_failed(&self, kind: FailureKind) {
        self.delivery_failures[kind as usize].inc();
    }

    pub fn beat(&self) {
        self.heartbeat.set(unix_now());
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        for (kind, table) in [("counter", COUNTERS), ("gauge", GAUGES)] {
            for (name, help, value) in table {
                let _ = writeln!(
                    out,
                    "# HELP bpftail_{name} {help}\n# TYPE bpftail_{name} {kind}\nbpftail_{name} {}",
                    value(self)
                );
            }
        }
        if let Some(w) = self.watcher.get() {
            let _ = writeln!(
                out,
                "# HELP bpftail_watcher_info The change-detection backend in use.\n# TYPE bpftail_watcher_info gauge\nbpftail_watcher_info{{watcher=\"{w}\"}} 1"
            );
        }
        let _ = writeln!(
            out,
            "# HELP bpftail_delivery_failures_total Failed deliveries: retried (re-read from the file), dropped (permanent error), queue_full (producer queue full, retried).\n# TYPE bpftail_delivery_failures_total counter"
        );
        for kind in FailureKind::ALL {
            let v = self.delivery_failures[kind as usize].get();
            let _ = writeln!(
                out,
                "bpftail_delivery_failures_total{{kind=\"{}\"}} {v}",
                kind.kind()
            );
        }
        let now = unix_ms();
        let _ = writeln!(
            out,
            "# HELP bpftail_kafka_up 1 while the Kafka client's requests get answers; 0 since one failed (connection refused, name not resolved, timeout) until one succeeds.\n# TYPE bpftail_kafka_up gauge\nbpftail_kafka_up {}",
            u8::from(self.kafka.up())
        );
        let status = self
            .delivery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let _ = writeln!(
            out,
            "# HELP bpftail_delivering 0 while delivery is stuck (Kafka unreachable for 10 s with records waiting, or nothing acknowledged for 60 s), as /readyz says; 1 otherwise.\n# TYPE bpftail_delivering gauge\nbpftail_delivering {}",
            u8::from(status.down_since_ms.is_none())
        );
        let age = status
            .oldest_unacked_read_ms
            .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
        let _ = writeln!(
            out,
            "# HELP bpftail_oldest_unacked_seconds Seconds since the oldest record Kafka has not acknowledged yet was read (0 when none waits).\n# TYPE bpftail_oldest_unacked_seconds gauge\nbpftail_oldest_unacked_seconds {age:.3}"
        );
        let _ = writeln!(
            out,
            "# HELP bpftail_waiting_bytes Bytes of log files not acknowledged by Kafka yet, per namespace (the {WAITING_NAMESPACES} largest; the rest under _other), as of the last look at the files.\n# TYPE bpftail_waiting_bytes gauge"
        );
        for (ns, bytes) in &status.waiting {
            let _ = writeln!(
                out,
                "bpftail_waiting_bytes{{namespace=\"{}\"}} {bytes}",
                escape_label(ns)
            );
        }
        let _ = writeln!(
            out,
            "# HELP bpftail_config_reloads_total Configuration reloads (SIGHUP, --config file changed): applied, or refused with the running configuration kept.\n# TYPE bpftail_config_reloads_total counter\nbpftail_config_reloads_total{{result=\"applied\"}} {}\nbpftail_config_reloads_total{{result=\"refused\"}} {}",
            self.config_reloads_applied.get(),
            self.config_reloads_refused.get()
        );
        out
    }
}

/// The Kafka client's view of its brokers: failing since when, and why.
/// `ok` after any response; `failed` after a request got none (connect,
/// resolve, I/O, timeout) or the client said every broker is down.
#[derive(Debug, Default)]
pub struct KafkaHealth {
    /// Unix ms of the first failure since the last success; 0 while fine.
    failing_since_ms: AtomicU64,
    last_error: std::sync::Mutex<String>,
}

impl KafkaHealth {
    pub fn ok(&self) {
        if self.failing_since_ms.load(Ordering::Relaxed) != 0 {
            self.failing_since_ms.store(0, Ordering::Relaxed);
        }
    }

    pub fn failed(&self, error: &dyn std::fmt::Display) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        last.clear();
        let _ = write!(last, "{error}");
        if self.failing_since_ms.load(Ordering::Relaxed) == 0 {
            self.failing_since_ms
                .store(unix_ms().max(1), Ordering::Relaxed);
        }
    }

    pub fn up(&self) -> bool {
        self.failing_since_ms.load(Ordering::Relaxed) == 0
    }

    /// Since when requests fail (Unix ms), with the last error.
    pub fn failing(&self) -> Option<(u64, String)> {
        let since = self.failing_since_ms.load(Ordering::Relaxed);
        (since != 0).then(|| {
            let last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
            (since, last.clone())
        })
    }
}

/// The delivery state the data loop last published.
#[derive(Debug, Default, Clone)]
pub struct DeliveryStatus {
    /// Unix ms since when delivery is stuck; `None` while records flow (or
    /// none wait).
    pub down_since_ms: Option<u64>,
    /// What `/readyz` answers while down: the same words as the log line.
    pub summary: String,
    /// Unix ms when the oldest record not yet acknowledged was read.
    pub oldest_unacked_read_ms: Option<u64>,
    /// Bytes on disk not acknowledged yet, per namespace: the largest
    /// [`WAITING_NAMESPACES`], the rest summed under `_other`.
    pub waiting: Vec<(std::sync::Arc<str>, u64)>,
}

/// How many namespaces `bpftail_waiting_bytes` names (bounded cardinality).
pub const WAITING_NAMESPACES: usize = 20;

/// One exported metric: name (after `bpftail_`), help, value.
type Row = (&'static str, &'static str, fn(&Metrics) -> u64);

const COUNTERS: &[Row] = &[
    (
        "scans_total",
        "Full discoveries of the log directories done.",
        |m| m.scans.get(),
    ),
    (
        "sweep_found_bytes_total",
        "Unread bytes the sweep found while reading was not held back: a write the change source did not report (or one a few ms old).",
        |m| m.sweep_found_bytes.get(),
    ),
    (
        "sweeps_total",
        "Sweeps (a look at every open file) done.",
        |m| m.sweeps.get(),
    ),
    (
        "lines_read_total",
        "Physical lines read from log files.",
        |m| m.lines_read.get(),
    ),
    ("bytes_read_total", "Bytes read from log files.", |m| {
        m.bytes_read.get()
    }),
    (
        "records_sent_total",
        "Records handed to the Kafka producer.",
        |m| m.records_sent.get(),
    ),
    (
        "records_delivered_total",
        "Records acknowledged by Kafka.",
        |m| m.records_delivered.get(),
    ),
    (
        "bytes_delivered_total",
        "Record value bytes acknowledged by Kafka.",
        |m| m.bytes_delivered.get(),
    ),
    (
        "records_truncated_total",
        "Records cut at the maximum record size.",
        |m| m.truncated.get(),
    ),
    (
        "lines_malformed_total",
        "Lines not in their file's format, shipped raw.",
        |m| m.malformed.get(),
    ),
    (
        "invalid_utf8_total",
        "Messages with invalid UTF-8 (replaced by U+FFFD in --format json).",
        |m| m.invalid_utf8.get(),
    ),
    (
        "records_partial_flushed_total",
        "Records delivered without their end (file ended inside them).",
        |m| m.partial_flushed.get(),
    ),
    (
        "multiline_flushed_total",
        "Multiline records delivered at their timeout (or when their file ended), not at their next line.",
        |m| m.multiline_flushed.get(),
    ),
    (
        "rate_limit_waits_total",
        "Reads put off because the container was over its rate limit (--container-rate-limit, bpftail.io/rate-limit).",
        |m| m.rate_limit_waits.get(),
    ),
    (
        "cpu_paced_total",
        "Turns of the data loop whose reading waited to keep the agent near --max-cpu.",
        |m| m.cpu_paced.get(),
    ),
    (
        "bytes_skipped_total",
        "Bytes dropped from lines longer than the maximum.",
        |m| m.bytes_skipped.get(),
    ),
    (
        "file_truncations_total",
        "Files found shorter than the read offset (copytruncate).",
        |m| m.truncations.get(),
    ),
    (
        "file_rotations_total",
        "Files renamed away from their path (rotation).",
        |m| m.rotations.get(),
    ),
    ("read_errors_total", "Failed reads of log files.", |m| {
        m.read_errors.get()
    }),
    (
        "open_errors_total",
        "Log files that could not be opened.",
        |m| m.open_errors.get(),
    ),
    ("checkpoint_writes_total", "Checkpoints persisted.", |m| {
        m.checkpoint_writes.get()
    }),
    (
        "checkpoint_errors_total",
        "Checkpoint writes that failed.",
        |m| m.checkpoint_errors.get(),
    ),
    (
        "listing_errors_total",
        "Log directories that could not be listed and log paths that could not be looked at (too long, a symlink loop, no permission), once per path while it lasts.",
        |m| m.listing_errors.get(),
    ),
    (
        "listings_cut_total",
        "Directories holding more pod, container or log entries than are followed (20,000 pod dirs, 1,000 containers or log files): the rest are not read.",
        |m| m.listings_cut.get(),
    ),
    (
        "files_not_regular_total",
        "Entries named as log files that are not regular files (a directory, FIFO, socket or device): not read, once per path.",
        |m| m.files_not_regular.get(),
    ),
    (
        "checkpoint_replay_bytes_total",
        "Bytes read again at start from an older position because the newest checkpoint was unusable (corrupt, missing, a newer layout): at most this much was sent twice.",
        |m| m.checkpoint_replay_bytes.get(),
    ),
    (
        "watcher_overflows_total",
        "Change-source overflows (followed by a full rescan).",
        |m| m.watcher_overflows.get(),
    ),
    (
        "watcher_wakeups_total",
        "Wakeups of the change-source thread to handle kernel events.",
        |m| m.watcher_wakeups.get(),
    ),
    (
        "ebpf_hook_hits_total",
        "Write-family syscalls (or VFS writes) seen by the eBPF hook.",
        |m| m.ebpf_hook_hits.get(),
    ),
    (
        "ebpf_watched_writes_total",
        "Writes to watched files seen by the eBPF hook.",
        |m| m.ebpf_watched_writes.get(),
    ),
    (
        "ebpf_events_total",
        "Events the eBPF hook put in its ring buffer.",
        |m| m.ebpf_events.get(),
    ),
    (
        "ebpf_drops_total",
        "Events the eBPF hook could not deliver (each makes the agent read every file).",
        |m| m.ebpf_drops.get(),
    ),
    (
        "ebpf_recursion_misses_total",
        "Hook runs the kernel skipped (another run in progress on that CPU); each makes the agent read every file.",
        |m| m.ebpf_misses.get(),
    ),
    (
        "kube_events_total",
        "Pod list-watch events received from the Kubernetes API.",
        |m| m.kube_events.get(),
    ),
    (
        "kube_watch_errors_total",
        "Pod list-watch errors (each retried with backoff).",
        |m| m.kube_watch_errors.get(),
    ),
    (
        "json_lines_invalid_total",
        "Lines declared JSON (_format=json) that were not one JSON object; shipped as the message.",
        |m| m.json_lines_invalid.get(),
    ),
    (
        "declarations_refused_total",
        "Log declarations refused (bad name, value, format or topic; topic outside --topic-allow), per file opened.",
        |m| m.declarations_refused.get(),
    ),
    (
        "declaration_tags_dropped_total",
        "Garbage entries in declaration tags, dropped.",
        |m| m.tags_dropped.get(),
    ),
    (
        "records_suppressed_total",
        "Records read and discarded: their file's container was opted out (or undeclared) while it was followed.",
        |m| m.records_suppressed.get(),
    ),
    (
        "files_skipped_total",
        "Log files not shipped: opted out (bpftail.io/exclude) or undeclared with --ship declared.",
        |m| m.files_skipped.get(),
    ),
    (
        "files_without_pod_total",
        "Log files opened while their pod was not known (records carry the metadata their path gives until it is).",
        |m| m.files_without_pod.get(),
    ),
    (
        "kafka_requests_total",
        "Produce requests sent by the native Kafka client.",
        |m| m.kafka_requests.get(),
    ),
    (
        "kafka_batches_total",
        "Record batches acknowledged by Kafka (native client).",
        |m| m.kafka_batches.get(),
    ),
    (
        "kafka_request_errors_total",
        "Kafka requests that got no valid response (connection refused or lost, timeout, invalid frame); retried.",
        |m| m.kafka_request_errors.get(),
    ),
    (
        "kafka_partition_errors_total",
        "Partition errors in produce responses (retried, or the batch refused for good).",
        |m| m.kafka_partition_errors.get(),
    ),
    (
        "kafka_metadata_requests_total",
        "Metadata requests sent by the native Kafka client.",
        |m| m.kafka_metadata_requests.get(),
    ),
];

const GAUGES: &[Row] = &[
    (
        "kube_pods",
        "Pods of this node in the metadata cache (deleted ones within their grace period included).",
        |m| m.kube_pods.get(),
    ),
    (
        "kube_synced",
        "1 once the pod list has been received from the Kubernetes API.",
        |m| m.kube_synced.get(),
    ),
    (
        "kube_generation",
        "Changes of the pod list received from the Kubernetes API (a counter of the pod cache).",
        |m| m.kube_generation.get(),
    ),
    (
        "kube_generation_applied",
        "The kube_generation whose metadata the followed files carry.",
        |m| m.kube_generation_applied.get(),
    ),
    (
        "files_awaiting_pod",
        "Log files found and not opened yet: they wait for their pod's metadata from the API.",
        |m| m.files_awaiting_pod.get(),
    ),
    ("files_watched", "Log files open and followed.", |m| {
        m.files_watched.get()
    }),
    (
        "ebpf_unwatched_files",
        "Files the eBPF map had no room for (polled every second instead).",
        |m| m.ebpf_unwatched_files.get(),
    ),
    (
        "inflight_bytes",
        "Bytes produced and not yet acknowledged (budget accounting).",
        |m| {
            m.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map_or(0, |b| b.used())
        },
    ),
    (
        "checkpoint_lag_bytes",
        "Bytes on disk not yet acknowledged, over all files.",
        |m| m.checkpoint_lag_bytes.get(),
    ),
    (
        "checkpoint_failing",
        "1 while checkpoint writes fail (data directory full or read-only): positions stay at the last good checkpoint, shipping goes on, a restart resends since then.",
        |m| m.checkpoint_failing.get(),
    ),
    (
        "rate_limited_containers",
        "Containers read at their rate limit (they wrote faster) since the last look at their files.",
        |m| m.rate_limited_containers.get(),
    ),
    (
        "rate_limited_lag_bytes",
        "Bytes the logs of rate-limited containers hold that are not read yet: the lag the limit causes.",
        |m| m.rate_limited_lag_bytes.get(),
    ),
];

/// Logs at most once per period; counts what it suppressed in between.
#[derive(Debug)]
pub struct RateLimit {
    period_ms: u64,
    /// Unix milliseconds of the last log line.
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub fn new(period: Duration) -> RateLimit {
        RateLimit {
            period_ms: period.as_millis() as u64,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Calls `log(suppressed_since_last)` unless a line was logged within
    /// the period.
    pub fn log(&self, log: impl FnOnce(u64)) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let last = self.last.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.period_ms
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log(self.suppressed.swap(0, Ordering::Relaxed));
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A label value as the exposition format wants it.
fn escape_label(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serves `/metrics` and `/healthz` until the task is dropped. `/healthz`
/// fails when the data loop has not turned for `stall` (it turns at least
/// every `pipeline::HEARTBEAT`).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stall: Duration) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 2048];
            let mut got = 0;
            // Read the request head; a client that sends nothing is dropped.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while got < req.len() {
                    let n = sock.read(&mut req[got..]).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    got += n;
                    if req[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        return Some(());
                    }
                }
                Some(())
            })
            .await;
            if !matches!(read, Ok(Some(()))) {
                return;
            }
            let path = req[..got]
                .split(|&b| b == b' ')
                .nth(1)
                .unwrap_or(b"/")
                .to_vec();
            let (status, ctype, body) = match &path[..] {
                b"/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                b"/healthz" => {
                    let age = unix_now().saturating_sub(metrics.heartbeat.get());
                    if age <= stall.as_secs() {
                        ("200 OK", "text/plain", "ok\n".to_owned())
                    } else {
                        (
                            "503 Service Unavailable",
                            "text/plain",
                            format!("data loop stalled for {age}s\n"),
                        )
                    }
                }
                b"/readyz" => {
                    let status = metrics.delivery.lock().unwrap_or_else(|e| e.into_inner());
                    match status.down_since_ms {
                        None => ("200 OK", "text/plain", "delivering\n".to_owned()),
                        Some(since) => (
                            "503 Service Unavailable",
                            "text/plain",
                            format!(
                                "{} (for {} s)\n",
                                status.summary,
                                unix_ms().saturating_sub(since) / 1000
                            ),
                        ),
                    }
                }
                _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text_with_every_failure_kind() {
        let m = Metrics::default();
        m.lines_read.add(3);
        m.delivery_failed(FailureKind::Dropped);
        let text = m.render();
        assert!(text.contains("bpftail_lines_read_total 3\n"));
        assert!(text.contains("bpftail_delivery_failures_total{kind=\"dropped\"} 1\n"));
        assert!(text.contains("# TYPE bpftail_files_watched gauge\n"));
    }
}
