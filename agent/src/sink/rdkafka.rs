//! The librdkafka client (`--kafka-client rdkafka`), through rdkafka with
//! the bundled librdkafka: for what the native client does not do
//! (GSSAPI/Kerberos, OAUTHBEARER, any other librdkafka setting).
//!
//! - Idempotent producer, `message.timeout.ms=0` (retry forever): while the
//!   broker is down, records wait in the producer and the in-flight budget
//!   stops reading; the files on disk are the buffer.
//! - One delivery report per record. librdkafka copies the value (and
//!   headers) it is given.
//!
//! Budget: `has_budget` is false once `max_inflight_bytes` worth of records
//! (value + key + a fixed per-record overhead) is unacknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use super::{Ack, AckQueue, Budget, Outcome, SEQ_BITS, SEQ_MASK, Sink, render_json};
use crate::config::{Config, OutputFormat};
use crate::discover::FileMeta;
use crate::metrics::{FailureKind, Metrics, RateLimit};
use crate::tail::RecordSink;
use crate::tail::decode::Record;

/// Budget cost of one record beyond its key and value: librdkafka's own
/// per-message bookkeeping and headers, roughly.
const RECORD_OVERHEAD: u64 = 256;

fn cost(value_len: usize, key_len: usize) -> u64 {
    (value_len + key_len) as u64 + RECORD_OVERHEAD
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

/// Runs on librdkafka's polling thread: turns delivery reports into acks.
pub struct DeliveryContext {
    acks: Arc<AckQueue>,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
    failures: RateLimit,
    errors: RateLimit,
}

impl ClientContext for DeliveryContext {
    /// librdkafka's log lines. What it says about brokers it cannot reach
    /// (facility `FAIL`, and the same again through [`Self::error`]) is
    /// debug: bpftail's delivery line says what it means.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let connection = fac == "FAIL";
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
                if !connection =>
            {
                tracing::error!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning if !connection => {
                tracing::warn!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", fac, "{log_message}")
            }
            _ => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }

    /// librdkafka's errors: a broker it cannot reach marks Kafka as down
    /// (debug: the delivery line says it); anything else is a warning, at
    /// most every 10 s. A connection that closed (`Disconnected`: a broker
    /// closes idle ones) is not a failure: the reconnection's, if any, is.
    /// Only a delivery marks it up again (librdkafka reports no
    /// reconnection), so an idle agent may show it down until its next
    /// record.
    fn error(&self, error: KafkaError, reason: &str) {
        use RDKafkaErrorCode as C;
        let code = error.rdkafka_error_code();
        if code == Some(C::BrokerTransportFailure) && reason.contains("Disconnected") {
            tracing::debug!(target: "librdkafka", %error, "{reason}");
        } else if matches!(
            code,
            Some(
                C::BrokerTransportFailure
                    | C::AllBrokersDown
                    | C::Resolve
                    | C::Authentication
                    | C::SSL
            )
        ) {
            if code == Some(C::AllBrokersDown) {
                // Keep the reason the last connection gave, if any.
                if self.metrics.kafka.up() {
                    self.metrics
                        .kafka
                        .failed(&"every broker connection is down");
                }
            } else {
                self.metrics.kafka.failed(&reason);
            }
            tracing::debug!(target: "librdkafka", %error, "{reason}");
        } else {
            self.errors.log(
                |suppressed| tracing::warn!(target: "librdkafka", %error, suppressed, "{reason}"),
            );
        }
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (msg, outcome) = match result {
            Ok(msg) => {
                self.metrics.kafka.ok();
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
        self.budget
            .give_back(cost(msg.payload_len(), msg.key_len()));
        let opaque = opaque as u64;
        self.acks.push(Ack::run(
            (opaque >> SEQ_BITS) as u32,
            opaque & SEQ_MASK,
            1,
            outcome,
        ));
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
pub struct RdkafkaSink {
    producer: Arc<BaseProducer<DeliveryContext>>,
    /// Serves delivery reports (librdkafka's poll) until dropped.
    _poller: Option<Poller>,
    format: OutputFormat,
    /// The JSON value being built; reused for every record.
    value: Vec<u8>,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
    acks: Arc<AckQueue>,
    /// The data loop's wake channel: waited on while the producer queue is
    /// full (a delivery report frees space).
    wake: Receiver<()>,
    /// The sending side of `wake` (a rebuilt client gets it).
    wake_tx: Sender<()>,
    /// Set at shutdown: stop waiting for queue space, accept nothing new.
    stopping: Arc<AtomicBool>,
    /// Kafka timestamp (Unix ms) for the records of the current batch: the
    /// clock is read once per read, not by librdkafka once per record.
    batch_time_ms: i64,
}

impl RdkafkaSink {
    pub fn new(
        cfg: &Config,
        metrics: Arc<Metrics>,
        stopping: Arc<AtomicBool>,
        wake: (Sender<()>, Receiver<()>),
    ) -> Result<RdkafkaSink, SinkError> {
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
        let acks = Arc::new(AckQueue::new(wake.0.clone()));
        let budget = Arc::new(Budget::new(cfg.max_inflight_bytes));
        *metrics.inflight.lock().unwrap_or_else(|e| e.into_inner()) = Some(budget.clone());
        let ctx = DeliveryContext {
            acks: acks.clone(),
            budget: budget.clone(),
            metrics: metrics.clone(),
            failures: RateLimit::new(Duration::from_secs(10)),
            errors: RateLimit::new(Duration::from_secs(10)),
        };
        let producer: Arc<BaseProducer<DeliveryContext>> =
            Arc::new(cc.create_with_context(ctx).map_err(SinkError::Config)?);
        let poller = Poller::start(producer.clone()).map_err(SinkError::Thread)?;
        Ok(RdkafkaSink {
            producer,
            _poller: Some(poller),
            format: cfg.format,
            value: Vec::with_capacity(4096),
            budget,
            metrics,
            acks,
            wake: wake.1,
            wake_tx: wake.0,
            batch_time_ms: 0,
            stopping,
        })
    }
}

impl Sink for RdkafkaSink {
    fn take_acks(&self, out: &mut Vec<Ack>) {
        self.acks.take(out);
    }

    fn inflight_bytes(&self) -> u64 {
        self.budget.used()
    }

    fn flush(&self, timeout: Duration) -> bool {
        self.acks.set_eager(true);
        self.producer.flush(timeout).is_ok()
    }

    fn eager_acks(&self, eager: bool) {
        self.acks.set_eager(eager);
    }

    fn reconnect(&mut self, cfg: &Config) -> anyhow::Result<()> {
        let new = RdkafkaSink::new(
            cfg,
            self.metrics.clone(),
            self.stopping.clone(),
            (self.wake_tx.clone(), self.wake.clone()),
        )?;
        *self = new;
        Ok(())
    }
}

impl RecordSink for RdkafkaSink {
    fn has_budget(&self) -> bool {
        self.budget.has_room() && !self.stopping.load(Ordering::Relaxed)
    }

    fn begin_batch(&mut self) {
        self.batch_time_ms = super::unix_ms_now();
    }

    fn send(&mut self, meta: &FileMeta, rec: &Record<'_>, file: u32, seq: u64) {
        if self.format != OutputFormat::Raw {
            self.value.clear();
            render_json(&mut self.value, self.format, meta, rec, &self.metrics);
        }
        let value: &[u8] = match self.format {
            OutputFormat::Json | OutputFormat::Logpilot => &self.value,
            OutputFormat::Raw => rec.msg,
        };
        let c = cost(value.len(), meta.key().len());
        let headers = match self.format {
            OutputFormat::Json | OutputFormat::Logpilot => None,
            OutputFormat::Raw => Some(raw_headers(meta, rec)),
        };
        let mut record = BaseRecord::with_opaque_to(meta.topic(rec.stream), opaque(file, seq))
            .key(meta.key())
            .payload(value)
            .timestamp(self.batch_time_ms);
        if let Some(h) = headers {
            record = record.headers(h);
        }
        self.budget.take(c);
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
                        self.budget.give_back(c);
                        return;
                    }
                    record = r;
                    self.acks.set_eager(true);
                    let _ = self.wake.recv_timeout(Duration::from_millis(100));
                }
                Err((e, _)) => {
                    // The record cannot be produced at all (e.g. larger than
                    // message.max.bytes): report it like a delivery failure.
                    self.budget.give_back(c);
                    self.metrics.delivery_failed(FailureKind::Dropped);
                    tracing::warn!(error = %e, topic = meta.topic(rec.stream), "record refused by the producer; dropped");
                    self.acks.push(Ack::new(file, seq, Outcome::Dropped));
                    return;
                }
            }
        }
    }
}

fn raw_headers(meta: &FileMeta, rec: &Record<'_>) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(8)
        .insert(Header {
            key: "time",
            value: Some(rec.time),
        })
        .insert(Header {
            key: "stream",
            value: Some(rec.stream.as_str()),
        });
    // Namespace, pod, container, node, then the pod's: as the native
    // client sends them.
    for (k, v) in meta.raw_headers() {
        h = h.insert(Header {
            key: std::str::from_utf8(k).unwrap_or("?"),
            value: Some(v),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_survive_the_opaque_round_trip() {
        for (base, seq) in [
            (0u64, 5u64),
            ((1 << 40) - 2, (1 << 40) + 3),
            (1 << 41, (1 << 41) + 7),
        ] {
            let o = opaque(77, seq) as u64;
            let ack = Ack::run((o >> SEQ_BITS) as u32, o & SEQ_MASK, 1, Outcome::Delivered);
            assert_eq!(ack.file, 77);
            assert_eq!(ack.seq_near(base), seq);
        }
        // A report from before the base (after a rewind) maps below it.
        let o = opaque(1, 10) as u64;
        let ack = Ack::run(1, o & SEQ_MASK, 1, Outcome::Retry);
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
