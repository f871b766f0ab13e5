//! Sink: records to Kafka through librdkafka (rdkafka, bundled librdkafka).
//!
//! - Key = the container stream (pod uid + container), so one container's
//!   lines share a partition and keep their order.
//! - `--format raw`: value = the message; time, stream, namespace, pod,
//!   container and node as headers (`partial`/`truncated` only when set).
//!   `--format json`: value = one JSON object with those fields and the
//!   message (invalid UTF-8 replaced by U+FFFD and counted).
//! - Idempotent producer, `message.timeout.ms=0` (retry forever): while the
//!   broker is down, records wait in the producer and the in-flight budget
//!   stops reading; the files on disk are the buffer.
//! - Every delivery report comes back to the data loop as an [`Ack`] naming
//!   the file and the record's sequence number there. Nothing is allocated
//!   per record on our side; librdkafka copies the value (and headers) it
//!   is given.
//!
//! Budget: `has_budget` is false once `max_inflight_bytes` worth of records
//! (value + key + a fixed per-record overhead) is unacknowledged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::config::{Config, OutputFormat};
use crate::discover::FileMeta;
use crate::metrics::{FailureKind, Metrics, RateLimit};
use crate::tail::RecordSink;
use crate::tail::decode::Record;

/// Budget cost of one record beyond its key and value: librdkafka's own
/// per-message bookkeeping and headers, roughly.
const RECORD_OVERHEAD: u64 = 256;

/// Bits of the delivery opaque that carry the sequence number.
const SEQ_BITS: u32 = 40;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

fn cost(value_len: usize, key_len: usize) -> u64 {
    (value_len + key_len) as u64 + RECORD_OVERHEAD
}

/// What became of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// A transient failure that outlived librdkafka's retries: the file is
    /// read again from its acknowledged offset.
    Retry,
    /// A permanent failure (topic refused, record too large): counted,
    /// logged, and passed over so the file is not stuck forever.
    Dropped,
}

/// A delivery report, routed back to the data loop.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub file: u32,
    /// The low [`SEQ_BITS`] bits of the record's sequence number; see
    /// [`Ack::seq_near`].
    seq_low: u64,
    pub outcome: Outcome,
}

impl Ack {
    pub fn new(file: u32, seq: u64, outcome: Outcome) -> Ack {
        Ack {
            file,
            seq_low: seq & SEQ_MASK,
            outcome,
        }
    }

    /// The full sequence number, given any sequence number of the same file
    /// that is less than 2^40 records away (the tracker's base).
    pub fn seq_near(&self, base: u64) -> u64 {
        let delta = self.seq_low.wrapping_sub(base) & SEQ_MASK;
        if delta > SEQ_MASK / 2 {
            base.wrapping_sub((SEQ_MASK + 1) - delta)
        } else {
            base + delta
        }
    }
}

fn opaque(file: u32, seq: u64) -> usize {
    ((u64::from(file) << SEQ_BITS) | (seq & SEQ_MASK)) as usize
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("invalid Kafka producer configuration: {0}")]
    Config(#[source] KafkaError),
    #[error("cannot start the delivery-report thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Delivery reports on their way back to the data loop: appended under a
/// short lock on librdkafka's thread, taken in bulk by the data loop, which
/// is woken through its wake channel (a syscall only if it sleeps).
pub struct AckQueue {
    acks: Mutex<Vec<Ack>>,
    wake: Sender<()>,
    /// Wake the data loop for every report (it is waiting for budget or for
    /// producer queue space). Otherwise reports wait for the loop's next
    /// turn (at the latest its checkpoint timer), so a steady stream of
    /// deliveries does not wake it hundreds of times a second.
    eager: AtomicBool,
}

/// Reports pending above which the loop is woken anyway.
const ACKS_WAKE_AT: usize = 4096;

impl AckQueue {
    pub fn new(wake: Sender<()>) -> AckQueue {
        AckQueue {
            acks: Mutex::new(Vec::with_capacity(ACKS_WAKE_AT)),
            wake,
            eager: AtomicBool::new(true),
        }
    }

    fn push(&self, ack: Ack) {
        let pending = {
            let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
            acks.push(ack);
            acks.len()
        };
        if self.eager.load(Ordering::Relaxed) || pending >= ACKS_WAKE_AT {
            let _ = self.wake.try_send(());
        }
    }

    /// Whether every report wakes the data loop.
    pub fn set_eager(&self, eager: bool) {
        self.eager.store(eager, Ordering::Relaxed);
    }

    /// Moves every report received so far into `out` (emptied first); the
    /// two buffers swap, so neither side allocates in the steady state.
    pub fn take(&self, out: &mut Vec<Ack>) {
        out.clear();
        std::mem::swap(
            &mut *self.acks.lock().unwrap_or_else(|e| e.into_inner()),
            out,
        );
    }
}

/// Runs on librdkafka's polling thread: turns delivery reports into acks.
pub struct DeliveryContext {
    acks: Arc<AckQueue>,
    metrics: Arc<Metrics>,
    failures: RateLimit,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (msg, outcome) = match result {
            Ok(msg) => {
                self.metrics.records_delivered.inc();
                self.metrics.bytes_delivered.add(msg.payload_len() as u64);
                (msg, Outcome::Delivered)
            }
            Err((err, msg)) => {
                let outcome = classify(err);
                let kind = match outcome {
                    Outcome::Retry => FailureKind::Retried,
                    _ => FailureKind::Dropped,
                };
                if !matches!(
                    err.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
                ) {
                    self.metrics.delivery_failed(kind);
                    self.failures.log(|suppressed| {
                        tracing::warn!(
                            topic = msg.topic(),
                            error = %err,
                            ?outcome,
                            suppressed,
                            "delivery failed"
                        )
                    });
                }
                (msg, outcome)
            }
        };
        self.metrics
            .inflight_bytes
            .sub(cost(msg.payload_len(), msg.key_len()));
        let opaque = opaque as u64;
        self.acks.push(Ack {
            file: (opaque >> SEQ_BITS) as u32,
            seq_low: opaque & SEQ_MASK,
            outcome,
        });
    }
}

/// Transient errors are re-read from the file; the rest are permanent.
fn classify(err: &KafkaError) -> Outcome {
    use RDKafkaErrorCode as C;
    match err.rdkafka_error_code() {
        Some(
            C::MessageTimedOut
            | C::RequestTimedOut
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::NetworkException
            | C::NotLeaderForPartition
            | C::LeaderNotAvailable
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::PurgeQueue
            | C::PurgeInflight
            | C::OutOfOrderSequenceNumber
            | C::Fatal,
        ) => Outcome::Retry,
        _ => Outcome::Dropped,
    }
}

/// The thread that serves delivery reports. Idle, it wakes once a second
/// (rust-rdkafka's ThreadedProducer wakes every 100 ms); a report wakes it
/// at once. On drop it is stopped and joined (within that second).
struct Poller {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    fn start(producer: Arc<BaseProducer<DeliveryContext>>) -> std::io::Result<Poller> {
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (producer.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("bpftail-delivery".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    // Returns only at the deadline; serves reports meanwhile.
                    p.poll(Duration::from_secs(1));
                }
            })?;
        Ok(Poller {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The Kafka producer with its budget and value buffer.
pub struct KafkaSink {
    producer: Arc<BaseProducer<DeliveryContext>>,
    /// Serves delivery reports (librdkafka's poll) until dropped.
    _poller: Option<Poller>,
    format: OutputFormat,
    node: Box<[u8]>,
    /// The JSON value being built; reused for every record.
    value: Vec<u8>,
    budget: u64,
    metrics: Arc<Metrics>,
    acks: Arc<AckQueue>,
    /// The data loop's wake channel: waited on while the producer queue is
    /// full (a delivery report frees space).
    wake: Receiver<()>,
    /// Set at shutdown: stop waiting for queue space, accept nothing new.
    stopping: Arc<AtomicBool>,
    /// Kafka timestamp (Unix ms) for the records of the current batch: the
    /// clock is read once per read, not by librdkafka once per record.
    batch_time_ms: i64,
}

impl KafkaSink {
    pub fn new(
        cfg: &Config,
        metrics: Arc<Metrics>,
        stopping: Arc<AtomicBool>,
        wake: (Sender<()>, Receiver<()>),
    ) -> Result<KafkaSink, SinkError> {
        let mut cc = ClientConfig::new();
        // Room for the largest record (JSON escaping can grow a message up
        // to 6x); the broker's own limit still applies.
        let max_message = (cfg.max_record_bytes as u64 * 6 + 65536).clamp(1_000_000, 1_000_000_000);
        // Our budget gates reading well before librdkafka's queue fills, and
        // the queue always has room for one largest message.
        let queue_kb = (cfg.max_inflight_bytes * 2 + max_message) / 1024 + 1024;
        cc.set("bootstrap.servers", &cfg.brokers)
            .set("compression.type", cfg.compression.as_str())
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "0")
            .set("linger.ms", "20")
            .set("queue.buffering.max.kbytes", queue_kb.to_string())
            .set("queue.buffering.max.messages", "1000000")
            .set("message.max.bytes", max_message.to_string())
            .set("client.id", format!("bpftail-{}", cfg.node_name))
            .set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in &cfg.kafka_options {
            cc.set(k, v);
        }
        let acks = Arc::new(AckQueue::new(wake.0));
        let ctx = DeliveryContext {
            acks: acks.clone(),
            metrics: metrics.clone(),
            failures: RateLimit::new(Duration::from_secs(10)),
        };
        let producer: Arc<BaseProducer<DeliveryContext>> =
            Arc::new(cc.create_with_context(ctx).map_err(SinkError::Config)?);
        let poller = Poller::start(producer.clone()).map_err(SinkError::Thread)?;
        Ok(KafkaSink {
            producer,
            _poller: Some(poller),
            format: cfg.format,
            node: cfg.node_name.as_bytes().into(),
            value: Vec::with_capacity(4096),
            budget: cfg.max_inflight_bytes,
            metrics,
            acks,
            wake: wake.1,
            batch_time_ms: 0,
            stopping,
        })
    }

    fn build_json(&mut self, meta: &FileMeta, rec: &Record<'_>) {
        let v = &mut self.value;
        v.clear();
        v.extend_from_slice(if self.format == OutputFormat::Logpilot {
            b"{\"@timestamp\":\""
        } else {
            b"{\"time\":\""
        });
        if escape_json(v, rec.time) {
            self.metrics.invalid_utf8.inc();
        }
        v.extend_from_slice(b"\",\"stream\":\"");
        v.extend_from_slice(rec.stream.as_str().as_bytes());
        v.push(b'"');
        v.extend_from_slice(&meta.json_members);
        // `_format=json`: an object's fields go into the record in place of
        // the message; anything else is shipped as the message, counted.
        match meta.line_json().then(|| json_object_members(rec.msg)) {
            Some(Some(members)) => {
                if !members.is_empty() {
                    v.push(b',');
                    v.extend_from_slice(members);
                }
            }
            other => {
                if other.is_some() {
                    self.metrics.json_lines_invalid.inc();
                }
                v.extend_from_slice(b",\"message\":\"");
                if escape_json(v, rec.msg) {
                    self.metrics.invalid_utf8.inc();
                }
                v.push(b'"');
            }
        }
        if rec.partial {
            v.extend_from_slice(b",\"partial\":true");
        }
        if rec.truncated {
            v.extend_from_slice(b",\"truncated\":true");
        }
        v.push(b'}');
    }
}

/// The output the data loop drives: records in, delivery reports out.
pub trait Sink: RecordSink {
    /// Moves the delivery reports received so far into `out`.
    fn take_acks(&self, out: &mut Vec<Ack>);
    /// Waits up to `timeout` for everything in flight to be acknowledged.
    fn flush(&self, timeout: Duration) -> bool;
    /// Whether each delivery report should wake the data loop (it waits
    /// for budget); otherwise reports are picked up at its next turn.
    fn eager_acks(&self, _eager: bool) {}
}

impl Sink for KafkaSink {
    fn take_acks(&self, out: &mut Vec<Ack>) {
        self.acks.take(out);
    }

    fn flush(&self, timeout: Duration) -> bool {
        self.acks.set_eager(true);
        self.producer.flush(timeout).is_ok()
    }

    fn eager_acks(&self, eager: bool) {
        self.acks.set_eager(eager);
    }
}

impl RecordSink for KafkaSink {
    fn has_budget(&self) -> bool {
        self.metrics.inflight_bytes.get() < self.budget && !self.stopping.load(Ordering::Relaxed)
    }

    fn begin_batch(&mut self) {
        self.batch_time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
    }

    fn send(&mut self, meta: &FileMeta, rec: &Record<'_>, file: u32, seq: u64) {
        if self.format != OutputFormat::Raw {
            self.build_json(meta, rec);
        }
        let value: &[u8] = match self.format {
            OutputFormat::Json | OutputFormat::Logpilot => &self.value,
            OutputFormat::Raw => rec.msg,
        };
        let c = cost(value.len(), meta.key.len());
        let headers = match self.format {
            OutputFormat::Json | OutputFormat::Logpilot => None,
            OutputFormat::Raw => Some(raw_headers(meta, rec, &self.node)),
        };
        let mut record = BaseRecord::with_opaque_to(meta.topic(rec.stream), opaque(file, seq))
            .key(&meta.key[..])
            .payload(value)
            .timestamp(self.batch_time_ms);
        if let Some(h) = headers {
            record = record.headers(h);
        }
        self.metrics.inflight_bytes.add(c);
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.metrics.records_sent.inc();
                    return;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    self.metrics.delivery_failed(FailureKind::QueueFull);
                    if self.stopping.load(Ordering::Relaxed) {
                        // Never acknowledged, so the checkpoint stays before it.
                        self.metrics.inflight_bytes.sub(c);
                        return;
                    }
                    record = r;
                    self.acks.set_eager(true);
                    let _ = self.wake.recv_timeout(Duration::from_millis(100));
                }
                Err((e, _)) => {
                    // The record cannot be produced at all (e.g. larger than
                    // message.max.bytes): report it like a delivery failure.
                    self.metrics.inflight_bytes.sub(c);
                    self.metrics.delivery_failed(FailureKind::Dropped);
                    tracing::warn!(error = %e, topic = meta.topic(rec.stream), "record refused by the producer; dropped");
                    let opaque = opaque(file, seq) as u64;
                    self.acks.push(Ack {
                        file,
                        seq_low: opaque & SEQ_MASK,
                        outcome: Outcome::Dropped,
                    });
                    return;
                }
            }
        }
    }
}

/// The members of a line that is one valid JSON object (the text between
/// its braces, trimmed); `None` if it is anything else.
fn json_object_members(line: &[u8]) -> Option<&[u8]> {
    let start = line.iter().position(|b| !b.is_ascii_whitespace())?;
    let end = line.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if line[start] != b'{' || line[end] != b'}' {
        return None;
    }
    // Spliced into the record as is: it must be valid UTF-8 too (skipping
    // parsers do not check string contents).
    std::str::from_utf8(line).ok()?;
    serde_json::from_slice::<serde::de::IgnoredAny>(line).ok()?;
    let inner = &line[start + 1..end];
    let a = inner.iter().position(|b| !b.is_ascii_whitespace());
    Some(match a {
        Some(a) => {
            let b = inner
                .iter()
                .rposition(|b| !b.is_ascii_whitespace())
                .unwrap_or(a);
            &inner[a..=b]
        }
        None => &[],
    })
}

fn raw_headers(meta: &FileMeta, rec: &Record<'_>, node: &[u8]) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(8)
        .insert(Header {
            key: "time",
            value: Some(rec.time),
        })
        .insert(Header {
            key: "stream",
            value: Some(rec.stream.as_str()),
        })
        .insert(Header {
            key: "namespace",
            value: Some(&meta.namespace),
        })
        .insert(Header {
            key: "pod",
            value: Some(&meta.pod),
        })
        .insert(Header {
            key: "container",
            value: Some(&meta.container),
        })
        .insert(Header {
            key: "node",
            value: Some(node),
        });
    for (k, v) in &meta.headers {
        h = h.insert(Header {
            key: k,
            value: Some(&**v),
        });
    }
    if rec.partial {
        h = h.insert(Header {
            key: "partial",
            value: Some("true"),
        });
    }
    if rec.truncated {
        h = h.insert(Header {
            key: "truncated",
            value: Some("true"),
        });
    }
    h
}

/// Appends `s` as the inside of a JSON string. Invalid UTF-8 becomes
/// U+FFFD; returns true if there was any.
fn escape_json(out: &mut Vec<u8>, s: &[u8]) -> bool {
    match std::str::from_utf8(s) {
        Ok(text) => {
            escape_str(out, text);
            false
        }
        Err(_) => {
            escape_str(out, &String::from_utf8_lossy(s));
            true
        }
    }
}

/// True if any byte of the 8 in `w` is a control character, `"` or `\\`
/// (exact as a yes/no answer: the classic "has less than" and "has zero
/// byte" word tricks).
#[inline]
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (control | has_zero(w ^ (ONES * u64::from(b'"'))) | has_zero(w ^ (ONES * u64::from(b'\\'))))
        != 0
}

fn escape_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len());
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Skip 8 clean bytes at a time; most log text needs no escaping.
        if let Some(chunk) = bytes.get(i..i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            if !word_needs_escape(w) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 15) as usize],
            ]);
        } else {
            out.extend_from_slice(esc);
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_yield_their_members_and_anything_else_none() {
        assert_eq!(
            json_object_members(br#" {"a":1, "b":"x"} "#),
            Some(&br#""a":1, "b":"x""#[..])
        );
        assert_eq!(json_object_members(b"{}"), Some(&b""[..]));
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            b"{\"a\":1",
            b"{\"a\":1}}",
            b"{\"a\":1} trailing {}",
            b"\"str\"",
            b"",
            b"{\"a\":\"\xff\"}",
        ] {
            assert_eq!(
                json_object_members(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn json_escaping_is_valid_json_even_for_binary_junk() {
        let mut out = Vec::new();
        assert!(escape_json(&mut out, b"a\"b\\c\n\x00\x1f\xff\xfe z"));
        let s = format!("\"{}\"", String::from_utf8(out).unwrap());
        let v: String = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "a\"b\\c\n\u{0}\u{1f}\u{fffd}\u{fffd} z");
        let mut out = Vec::new();
        assert!(!escape_json(&mut out, "héllo ✓".as_bytes()));
        assert_eq!(out, "héllo ✓".as_bytes());
    }

    #[test]
    fn the_word_test_finds_every_byte_that_needs_escaping_and_no_other() {
        for b in 0..=255u8 {
            let needs = b < 0x20 || b == b'"' || b == b'\\';
            for pos in 0..8 {
                let mut w = [b'a'; 8];
                w[pos] = b;
                assert_eq!(
                    word_needs_escape(u64::from_le_bytes(w)),
                    needs,
                    "byte {b:#x} at {pos}"
                );
            }
        }
        // Escaping agrees with serde_json on text of every length.
        let text = "a\"b\\c\u{1}d\té ✓ plain text that is long enough for words\n";
        for end in 0..text.len() {
            if let Some(t) = text.get(..end) {
                let mut out = Vec::new();
                escape_str(&mut out, t);
                assert_eq!(
                    format!("\"{}\"", String::from_utf8(out).unwrap()),
                    serde_json::to_string(t).unwrap()
                );
            }
        }
    }

    #[test]
    fn sequence_numbers_survive_the_opaque_round_trip() {
        for (base, seq) in [
            (0u64, 5u64),
            ((1 << 40) - 2, (1 << 40) + 3),
            (1 << 41, (1 << 41) + 7),
        ] {
            let o = opaque(77, seq) as u64;
            let ack = Ack {
                file: (o >> SEQ_BITS) as u32,
                seq_low: o & SEQ_MASK,
                outcome: Outcome::Delivered,
            };
            assert_eq!(ack.file, 77);
            assert_eq!(ack.seq_near(base), seq);
        }
        // A report from before the base (after a rewind) maps below it.
        let o = opaque(1, 10) as u64;
        let ack = Ack {
            file: 1,
            seq_low: o & SEQ_MASK,
            outcome: Outcome::Retry,
        };
        assert_eq!(ack.seq_near(12), 10);
    }

    #[test]
    fn transient_errors_retry_and_refusals_drop() {
        assert_eq!(
            classify(&KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut
            )),
            Outcome::Retry
        );
        assert_eq!(
            classify(&KafkaError::MessageProduction(
                RDKafkaErrorCode::TopicAuthorizationFailed
            )),
            Outcome::Dropped
        );
    }
}
