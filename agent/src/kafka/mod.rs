//! The native Kafka client: produce-only, the default (`--kafka-client
//! native`).
//!
//! Where a record's bytes go:
//! 1. [`NativeSink::send`] (data thread) picks the partition from the key
//!    (Kafka's murmur2, [`partitioner`]) and appends the record to that
//!    partition's open batch ([`batch::BatchWriter`]): JSON rendered in
//!    place, no allocation per record.
//! 2. A batch is sealed (compressed, CRC) when it reaches `batch.size`, or
//!    at the end of a data-loop turn once its partition has nothing in
//!    flight ([`NativeSink::turn`]): batching follows the rate with no
//!    timer — while one batch is on the wire, the next one fills.
//! 3. The sender thread ([`engine`]) routes it to the partition leader over
//!    that broker's connection ([`conn`]), at most one batch per partition
//!    in flight, retrying forever with backoff.
//! 4. Kafka's answer becomes one report per batch ([`crate::sink::Ack`]
//!    runs), which moves the checkpoints of all its records.
//!
//! Memory: the in-flight budget counts the batch buffers themselves (open,
//! sealed, on the wire), so RSS ≈ base + `--max-inflight-bytes`.
//!
//! Records for a topic whose partition count is not known yet are parked
//! in one batch for that topic and dealt to their partitions when the
//! metadata arrives; records for a topic Kafka refuses are reported
//! dropped (counted), as librdkafka does.

pub mod batch;
pub mod conn;
pub mod engine;
pub mod options;
pub mod partitioner;
pub mod sasl;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::{Config, OutputFormat};
use crate::discover::FileMeta;
use crate::metrics::{FailureKind, Metrics, RateLimit};
use crate::sink::{Ack, AckQueue, Budget, Outcome, Sink, render_json};
use crate::tail::RecordSink;
use crate::tail::decode::Record;
use batch::BatchWriter;
use engine::{Batch, Engine, Input, PartShared, Shared, TopicStatus};
use options::{OptionError, Options};

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error(transparent)]
    Option(#[from] OptionError),
    #[error("cannot start the Kafka sender thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Free batch buffers kept for reuse (uncompressed ones after compression,
/// sent ones back from the sender); see [`NativeSink::keep_spare`].
const MAX_SPARES: usize = 8;

/// What a new partition batch's buffer holds before it has to grow.
const INITIAL_BATCH_BYTES: usize = 16 * 1024;

/// Entries of [`NativeSink::recent`].
const TOPIC_CACHE: usize = 64;

struct PartSlot {
    /// The batch being filled, and when its first record came.
    open: Option<(BatchWriter, Instant)>,
    shared: Arc<PartShared>,
}

enum SlotStatus {
    /// Metadata asked for; records are parked.
    Unknown,
    Known,
    Refused,
}

struct TopicSlot {
    name: Arc<str>,
    status: SlotStatus,
    parts: Vec<PartSlot>,
    /// Records waiting for the partition count (status `Unknown`).
    parked: Option<BatchWriter>,
}

/// The data thread's side of the native client.
pub struct NativeSink {
    opts: Arc<Options>,
    format: OutputFormat,
    metrics: Arc<Metrics>,
    acks: Arc<AckQueue>,
    wake: Receiver<()>,
    /// The sending side of `wake` (a rebuilt client gets it).
    wake_tx: Sender<()>,
    stopping: Arc<AtomicBool>,
    budget: Arc<Budget>,
    engine: Sender<Input>,
    engine_thread: Option<std::thread::JoinHandle<()>>,
    /// Buffers of finished batches (from the sender) and of compressed
    /// ones (freed here), reused for new batches.
    recycled: Receiver<Vec<u8>>,
    spares: Vec<Vec<u8>>,
    shared: Arc<Shared>,
    seen_generation: u64,
    topics: Vec<TopicSlot>,
    index: HashMap<Arc<str>, usize>,
    /// Topic slots by the address of the topic's name (each file's metadata
    /// holds its own `Arc`), direct-mapped: a hit, checked by comparing the
    /// names, skips hashing the name for every record.
    recent: [(usize, usize); TOPIC_CACHE],
    /// Partitions with an open batch: `(topic, partition)`.
    open: Vec<(usize, usize)>,
    /// Bytes parked for unknown topics (in the budget, but not in flight).
    parked_bytes: u64,
    /// Kafka timestamp (Unix ms) of the records of the current read.
    batch_time_ms: i64,
    refused_log: RateLimit,
}

impl NativeSink {
    pub fn new(
        cfg: &Config,
        metrics: Arc<Metrics>,
        stopping: Arc<AtomicBool>,
        wake: (Sender<()>, Receiver<()>),
    ) -> Result<NativeSink, NativeError> {
        let opts = Arc::new(Options::from_config(
            &cfg.brokers,
            format!("bpftail-{}", cfg.node_name),
            cfg.compression,
            cfg.max_inflight_bytes,
            &cfg.kafka_options,
        )?);
        let acks = Arc::new(AckQueue::new(wake.0.clone()));
        let wake_tx = wake.0.clone();
        let shared = Arc::new(Shared::default());
        let budget = Arc::new(Budget::new(cfg.max_inflight_bytes));
        *metrics.inflight.lock().unwrap_or_else(|e| e.into_inner()) = Some(budget.clone());
        let inbox = crossbeam_channel::unbounded();
        let (recycle, recycled) = crossbeam_channel::unbounded();
        let engine = Engine::new(
            opts.clone(),
            inbox.clone(),
            acks.clone(),
            wake.0,
            recycle,
            metrics.clone(),
            budget.clone(),
            shared.clone(),
        );
        let engine_thread = std::thread::Builder::new()
            .name("bpftail-kafka".into())
            .spawn(move || engine.run())
            .map_err(NativeError::Thread)?;
        Ok(NativeSink {
            opts,
            format: cfg.format,
            metrics,
            acks,
            wake: wake.1,
            wake_tx,
            stopping,
            budget,
            engine: inbox.0,
            engine_thread: Some(engine_thread),
            recycled,
            spares: Vec::new(),
            shared,
            seen_generation: 0,
            topics: Vec::new(),
            index: HashMap::new(),
            recent: [(0, 0); TOPIC_CACHE],
            open: Vec::new(),
            parked_bytes: 0,
            batch_time_ms: 0,
            refused_log: RateLimit::new(Duration::from_secs(10)),
        })
    }

    fn topic_index(&mut self, topic: &Arc<str>) -> usize {
        let addr = topic.as_ptr() as usize;
        let slot = (addr >> 4) % TOPIC_CACHE;
        let (a, i) = self.recent[slot];
        if a == addr && *self.topics[i].name == **topic {
            return i;
        }
        let i = match self.index.get(topic) {
            Some(&i) => i,
            None => {
                let i = self.topics.len();
                self.topics.push(TopicSlot {
                    name: topic.clone(),
                    status: SlotStatus::Unknown,
                    parts: Vec::new(),
                    parked: None,
                });
                self.index.insert(topic.clone(), i);
                let _ = self.engine.send(Input::Topic(topic.clone()));
                // The sender may know it already (another file's topic
                // with the same name was seen before).
                self.seen_generation = u64::MAX;
                self.refresh_topics();
                i
            }
        };
        self.recent[slot] = (addr, i);
        i
    }

    /// Takes the topic statuses the sender published since last time.
    fn refresh_topics(&mut self) {
        let generation = self.shared.generation.load(Ordering::SeqCst);
        if generation == self.seen_generation {
            return;
        }
        self.seen_generation = generation;
        let statuses: Vec<(usize, TopicStatus)> = {
            let map = self.shared.topics.lock().unwrap_or_else(|e| e.into_inner());
            self.topics
                .iter()
                .enumerate()
                .filter_map(|(i, t)| map.get(&t.name).map(|s| (i, *s)))
                .collect()
        };
        for (i, status) in statuses {
            match status {
                TopicStatus::Partitions(n) => {
                    let t = &mut self.topics[i];
                    // New, or the partition count changed (keys map
                    // differently from now on, as with any Kafka producer).
                    while t.parts.len() < n {
                        t.parts.push(PartSlot {
                            open: None,
                            shared: Arc::default(),
                        });
                    }
                    // Fewer partitions (the topic was recreated): what is
                    // open for the ones gone is read again from its files.
                    for part in t.parts.drain(n.min(t.parts.len())..) {
                        if let Some((w, _)) = part.open {
                            self.budget.give_back(w.len() as u64);
                            let s = w.seal(crate::config::Compression::None);
                            self.acks.push_runs(&s.acks, Outcome::Retry);
                        }
                    }
                    t.status = SlotStatus::Known;
                    if let Some(parked) = t.parked.take() {
                        self.deal(i, parked);
                    }
                }
                TopicStatus::Refused => {
                    let t = &mut self.topics[i];
                    t.status = SlotStatus::Refused;
                    if let Some(parked) = t.parked.take() {
                        let cost = parked.len() as u64;
                        self.parked_bytes -= cost;
                        self.budget.give_back(cost);
                        for _ in 0..parked.records() {
                            self.metrics.delivery_failed(FailureKind::Dropped);
                        }
                        let s = parked.seal(crate::config::Compression::None);
                        self.acks.push_runs(&s.acks, Outcome::Dropped);
                    }
                }
            }
        }
    }

    /// Deals parked records to their partitions, in order.
    fn deal(&mut self, ti: usize, parked: BatchWriter) {
        let cost = parked.len() as u64;
        self.parked_bytes -= cost;
        self.budget.give_back(cost);
        let sealed = parked.seal(crate::config::Compression::None);
        let base_ts = i64::from_be_bytes(sealed.data[27..35].try_into().expect("header"));
        // Checked whole first, then walked a record at a time (a view of
        // every parked record at once would be a second copy of them).
        let section = &sealed.data[batch::HEADER_LEN..];
        let mut rest = section;
        while !rest.is_empty() {
            if batch::next_record(&mut rest).is_none() {
                // Our own encoding always parses; if it did not, the
                // records are read again from their files rather than lost.
                tracing::error!("parked records could not be read back; they are read again");
                self.acks.push_runs(&sealed.acks, Outcome::Retry);
                return;
            }
        }
        let seqs = sealed
            .acks
            .iter()
            .flat_map(|r| (0..u64::from(r.count)).map(move |k| (r.file, r.first + k)));
        let mut rest = section;
        let records = std::iter::from_fn(|| batch::next_record(&mut rest));
        for (r, (file, seq)) in records.zip(seqs) {
            let key = r.key.unwrap_or_default();
            let n = self.topics[ti].parts.len();
            let pi = partitioner::partition(key, n);
            let (len, grew) = {
                let w = self.writer(ti, pi);
                let before = w.len();
                let start = w.begin(base_ts + r.timestamp_delta, r.key);
                w.value(|b| b.extend_from_slice(r.value.unwrap_or_default()));
                w.header_count(r.headers.len());
                for (k, v) in &r.headers {
                    w.header(k, v.unwrap_or_default());
                }
                w.end(start, file, seq);
                (w.len(), (w.len() - before) as u64)
            };
            self.budget.take(grew);
            if len >= self.opts.batch_size {
                self.seal(ti, pi);
            }
        }
    }

    /// Keeps a free buffer for the next batch, up to [`MAX_SPARES`] of them
    /// holding at most two full batches between them (eight buffers that
    /// grew to the batch size in a burst were 4 MiB kept for nothing
    /// afterwards); the rest are freed.
    fn keep_spare(&mut self, buf: Vec<u8>) {
        let held: usize = self.spares.iter().map(Vec::capacity).sum();
        if self.spares.len() < MAX_SPARES && held + buf.capacity() <= 2 * self.opts.batch_size {
            self.spares.push(buf);
        }
    }

    /// The open batch of a partition (opened if there is none).
    fn writer(&mut self, ti: usize, pi: usize) -> &mut BatchWriter {
        if self.topics[ti].parts[pi].open.is_none() {
            let w = match self.spares.pop().or_else(|| self.recycled.try_recv().ok()) {
                Some(buf) => BatchWriter::reusing(buf),
                // Small at first: most partitions' batches stay far below
                // the batch size (10,000 files' first lines over 8
                // partitions filled 8 buffers of the full size otherwise);
                // a busy one grows, and its buffer is reused at that size.
                None => BatchWriter::new((self.opts.batch_size + 4096).min(INITIAL_BATCH_BYTES)),
            };
            let part = &mut self.topics[ti].parts[pi];
            self.budget.take(w.len() as u64);
            part.open = Some((w, Instant::now()));
            self.open.push((ti, pi));
        }
        &mut self.topics[ti].parts[pi].open.as_mut().expect("opened").0
    }

    /// Seals a partition's open batch and hands it to the sender.
    fn seal(&mut self, ti: usize, pi: usize) {
        let t = &mut self.topics[ti];
        let part = &mut t.parts[pi];
        let Some((w, _)) = part.open.take() else {
            return;
        };
        part.shared.waiting.store(false, Ordering::SeqCst);
        let cost = w.len() as u64;
        let s = w.seal(self.opts.compression);
        let spare = s.spare;
        part.shared.outstanding.fetch_add(1, Ordering::SeqCst);
        let b = Batch {
            topic: t.name.clone(),
            partition: pi as i32,
            data: Arc::new(s.data),
            records: s.records,
            value_bytes: s.value_bytes,
            cost,
            acks: s.acks,
            part: part.shared.clone(),
        };
        if let Err(e) = self.engine.send(Input::Batch(b)) {
            // The sender is gone (shutting down): never reported, so the
            // checkpoints stay before these records.
            if let Input::Batch(b) = e.0 {
                b.part.outstanding.fetch_sub(1, Ordering::SeqCst);
            }
            self.budget.give_back(cost);
        }
        if let Some(spare) = spare {
            self.keep_spare(spare);
        }
    }

    /// Appends one record to `w`.
    fn encode(
        w: &mut BatchWriter,
        format: OutputFormat,
        metrics: &Metrics,
        ts: i64,
        meta: &FileMeta,
        rec: &Record<'_>,
        (file, seq): (u32, u64),
    ) {
        let start = w.begin(ts, Some(meta.key()));
        match format {
            OutputFormat::Raw => {
                w.value(|b| b.extend_from_slice(rec.msg));
                let count = 2
                    + meta.kafka_header_count as usize
                    + usize::from(rec.partial)
                    + usize::from(rec.truncated);
                w.header_count(count);
                w.header(b"time", rec.time);
                w.header(b"stream", rec.stream.as_str().as_bytes());
                // namespace, pod, container, node and the pod's selection.
                w.encoded_headers(&meta.kafka_headers);
                if rec.partial {
                    w.header(b"partial", b"true");
                }
                if rec.truncated {
                    w.header(b"truncated", b"true");
                }
            }
            OutputFormat::Json | OutputFormat::Logpilot => {
                w.value(|b| render_json(b, format, meta, rec, metrics));
                w.header_count(0);
            }
        }
        w.end(start, file, seq);
    }
}

impl RecordSink for NativeSink {
    fn has_budget(&self) -> bool {
        self.budget.has_room() && !self.stopping.load(Ordering::Relaxed)
    }

    fn begin_batch(&mut self) {
        self.batch_time_ms = crate::sink::unix_ms_now();
    }

    fn send(&mut self, meta: &FileMeta, rec: &Record<'_>, file: u32, seq: u64) {
        let ti = self.topic_index(&meta.topics[rec.stream as usize]);
        let ts = self.batch_time_ms;
        self.metrics.records_sent.inc();
        // A topic's partitions may have come since the last turn: then its
        // records (those parked before this one first) go to them now
        // rather than piling up in the parked batch.
        if matches!(self.topics[ti].status, SlotStatus::Unknown)
            && self.shared.generation.load(Ordering::SeqCst) != self.seen_generation
        {
            self.refresh_topics();
        }
        let t = &mut self.topics[ti];
        match t.status {
            SlotStatus::Known => {
                let pi = partitioner::partition(meta.key(), t.parts.len());
                if t.parts[pi].open.is_none() {
                    self.writer(ti, pi);
                }
                let Some((w, _)) = &mut self.topics[ti].parts[pi].open else {
                    unreachable!("opened above")
                };
                let before = w.len();
                Self::encode(w, self.format, &self.metrics, ts, meta, rec, (file, seq));
                let (len, grew) = (w.len(), (w.len() - before) as u64);
                self.budget.take(grew);
                if len >= self.opts.batch_size {
                    self.seal(ti, pi);
                }
            }
            SlotStatus::Unknown => {
                let w = t.parked.get_or_insert_with(|| BatchWriter::new(4096));
                let before = if w.is_empty() { 0 } else { w.len() };
                Self::encode(w, self.format, &self.metrics, ts, meta, rec, (file, seq));
                let grew = (w.len() - before) as u64;
                self.parked_bytes += grew;
                self.budget.take(grew);
            }
            SlotStatus::Refused => {
                self.metrics.delivery_failed(FailureKind::Dropped);
                let name = t.name.clone();
                self.refused_log.log(|suppressed| {
                    tracing::warn!(topic = %name, suppressed, "record for a topic Kafka refuses; dropped (counted)")
                });
                self.acks.push(Ack::new(file, seq, Outcome::Dropped));
            }
        }
    }
}

impl Sink for NativeSink {
    fn take_acks(&self, out: &mut Vec<Ack>) {
        self.acks.take(out);
    }

    fn inflight_bytes(&self) -> u64 {
        self.budget.used()
    }

    fn flush(&self, timeout: Duration) -> bool {
        // `turn` sealed everything the data loop could send; what is left
        // is in flight (or parked for a topic never resolved).
        self.acks.set_eager(true);
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.budget.used().saturating_sub(self.parked_bytes);
            if left == 0 {
                return self.parked_bytes == 0;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let _ = self
                .wake
                .recv_timeout((deadline - now).min(Duration::from_millis(100)));
        }
    }

    fn eager_acks(&self, eager: bool) {
        self.acks.set_eager(eager);
    }

    fn reconnect(&mut self, cfg: &Config) -> anyhow::Result<()> {
        let new = NativeSink::new(
            cfg,
            self.metrics.clone(),
            self.stopping.clone(),
            (self.wake_tx.clone(), self.wake.clone()),
        )?;
        // The old client's engine stops as it is dropped.
        *self = new;
        Ok(())
    }

    fn turn(&mut self) {
        self.refresh_topics();
        // Buffers back from the sender: kept up to a few, the rest freed.
        while let Ok(buf) = self.recycled.try_recv() {
            self.keep_spare(buf);
        }
        let now = Instant::now();
        let stopping = self.stopping.load(Ordering::Relaxed);
        let mut i = 0;
        while i < self.open.len() {
            let (ti, pi) = self.open[i];
            let Some(part) = self.topics[ti].parts.get(pi) else {
                self.open.swap_remove(i);
                continue;
            };
            let Some((_, opened)) = &part.open else {
                self.open.swap_remove(i);
                continue;
            };
            // Set first, then look: the sender clears it when it frees the
            // partition, and wakes the loop if it was set.
            part.shared.waiting.store(true, Ordering::SeqCst);
            let free = part.shared.outstanding.load(Ordering::SeqCst) == 0;
            if stopping || (free && now >= *opened + self.opts.linger) {
                self.seal(ti, pi);
                self.open.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        if self.opts.linger.is_zero() {
            return None;
        }
        // Only partitions that could take a batch now: the others are
        // woken through `waiting` when their batch in flight is done.
        self.open
            .iter()
            .filter_map(|&(ti, pi)| self.topics[ti].parts.get(pi))
            .filter(|p| p.shared.outstanding.load(Ordering::SeqCst) == 0)
            .filter_map(|p| p.open.as_ref())
            .map(|(_, opened)| *opened + self.opts.linger)
            .min()
    }
}

impl Drop for NativeSink {
    fn drop(&mut self) {
        let _ = self.engine.send(Input::Stop);
        if let Some(t) = self.engine_thread.take() {
            let _ = t.join();
        }
    }
}
