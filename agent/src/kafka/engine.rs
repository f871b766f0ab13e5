//! The sender: one thread that routes sealed batches to partition leaders,
//! keeps metadata, retries, and turns produce responses into delivery
//! reports. Network I/O happens on the connection threads ([`super::conn`]);
//! this thread only decides.
//!
//! Invariants:
//! - At most one batch per partition is in flight, and a partition's
//!   batches are produced in the order they were sealed: a failed batch is
//!   retried before anything after it, so a partition never reorders, with
//!   no idempotent-producer state to lose (a retry after a lost response
//!   may duplicate a batch: at-least-once).
//! - At most one request per connection is outstanding; a produce request
//!   carries the next batch of every ready partition that broker leads.
//! - Every batch ends in exactly one report: delivered, or refused for good
//!   (authorization, invalid topic, a record too large on its own, a topic
//!   missing for `topic.metadata.propagation.max.ms`). Everything else is
//!   retried forever with capped exponential backoff.
//! - Idle, the thread sleeps until a batch or a reply arrives, or until the
//!   metadata refresh (`metadata.max.age.ms`) is due: no other timer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use kafka_protocol::error::{ParseResponseErrorCode, ResponseError};
use kafka_protocol::messages::{
    MetadataRequest, MetadataResponse, ProduceResponse, TopicName,
    metadata_request::MetadataRequestTopic,
    metadata_response::{MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic},
};
use kafka_protocol::protocol::StrBytes;

use super::batch;
use super::conn::{
    BatchData, ConnError, ConnHandle, ConnId, Produce, Reply, Request, Response, TopicBatches,
};
use super::options::Options;
use crate::metrics::{FailureKind, Metrics, RateLimit};
use crate::sink::{AckQueue, AckRun, Budget, Outcome};

/// Per-partition state the data thread and the sender share.
#[derive(Debug, Default)]
pub struct PartShared {
    /// Batches sealed for this partition and not yet reported.
    pub outstanding: AtomicU32,
    /// The data thread holds an open batch until `outstanding` is 0: wake
    /// it when that happens.
    pub waiting: AtomicBool,
}

/// A topic as the data thread may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicStatus {
    Partitions(usize),
    /// Refused for good (missing for too long, not authorized, invalid):
    /// its records are counted and passed over.
    Refused,
}

/// What the sender publishes for the data thread.
#[derive(Debug, Default)]
pub struct Shared {
    /// Bumped at every change of `topics`.
    pub generation: AtomicU64,
    pub topics: Mutex<HashMap<Arc<str>, TopicStatus>>,
}

/// A sealed batch on its way to its partition.
#[derive(Debug)]
pub struct Batch {
    pub topic: Arc<str>,
    pub partition: i32,
    pub data: BatchData,
    pub records: u32,
    pub value_bytes: u64,
    /// What it counts against the in-flight budget.
    pub cost: u64,
    pub acks: Vec<AckRun>,
    pub part: Arc<PartShared>,
}

/// The sender's inbox.
#[derive(Debug)]
pub enum Input {
    Batch(Batch),
    /// The data thread has records for a topic it knows nothing of.
    Topic(Arc<str>),
    Reply(Reply),
    Stop,
}

/// Most partitions per topic believed from a metadata answer.
const MAX_PARTITIONS: usize = 1 << 16;

/// First connection id of the bootstrap servers; broker node ids are
/// used as they are below it.
const BOOTSTRAP: ConnId = 1 << 31;

#[derive(Debug)]
enum Busy {
    Metadata,
    Produce(Vec<(Arc<str>, usize)>),
}

struct Conn {
    handle: ConnHandle,
    busy: Option<Busy>,
    /// No request before this (backoff after failures, or throttling).
    not_before: Instant,
    failures: u32,
}

#[derive(Default)]
struct PartQueue {
    queue: VecDeque<Batch>,
    in_flight: bool,
    retry_at: Option<Instant>,
    attempts: u32,
}

#[derive(Default)]
struct TopicState {
    /// Leader node per partition (-1: none known).
    leaders: Vec<i32>,
    parts: Vec<PartQueue>,
    /// First time the cluster said it does not have the topic.
    missing_since: Option<Instant>,
    status: Option<TopicStatus>,
}

impl TopicState {
    /// Takes the leaders of a topic's `n` partitions (-1 for one whose
    /// leader is not available) and grows its queues to `n`; false if a
    /// partition has no leader.
    fn set_leaders(&mut self, partitions: &[MetadataResponsePartition], n: usize) -> bool {
        self.leaders = partition_leaders(partitions, n);
        if self.parts.len() < n {
            self.parts.resize_with(n, PartQueue::default);
        }
        !self.leaders.iter().any(|&l| l < 0)
    }
}

/// The leader node of each of a topic's `n` partitions (-1: not
/// available), from a metadata answer whose partitions are `0..n`
/// ([`sane_partitions`]).
pub fn partition_leaders(partitions: &[MetadataResponsePartition], n: usize) -> Vec<i32> {
    let mut leaders = vec![-1; n];
    for p in partitions {
        if p.partition_index >= 0 && p.error_code != 5 {
            leaders[p.partition_index as usize] = p.leader_id.0;
        }
    }
    leaders
}

/// The partition count, if the partitions are 0..n, each listed once, and
/// at most [`MAX_PARTITIONS`]; anything else from the broker is not
/// believed (and asked again).
pub fn sane_partitions(partitions: &[MetadataResponsePartition]) -> Option<usize> {
    let n = partitions.len();
    let mut seen = vec![false; n.min(MAX_PARTITIONS)];
    let sane = n > 0
        && n <= MAX_PARTITIONS
        && partitions.iter().all(|p| {
            usize::try_from(p.partition_index)
                .ok()
                .filter(|&i| i < n)
                .is_some_and(|i| !std::mem::replace(&mut seen[i], true))
        });
    sane.then_some(n)
}

pub struct Engine {
    opts: Arc<Options>,
    inbox: Receiver<Input>,
    inbox_tx: Sender<Input>,
    conns: HashMap<ConnId, Conn>,
    /// Broker addresses from the last metadata.
    brokers: HashMap<i32, String>,
    topics: HashMap<Arc<str>, TopicState>,
    /// Serial of the last connection started.
    serial: u64,
    metadata_wanted: bool,
    metadata_busy: bool,
    metadata_next: Instant,
    metadata_failures: u32,
    metadata_at: Option<Instant>,
    acks: Arc<AckQueue>,
    wake: Sender<()>,
    /// Buffers of finished batches, back to the data thread for reuse:
    /// allocated and freed on one thread, the memory is reused at once
    /// instead of waiting in the allocator (RSS ≈ base + budget).
    recycle: Sender<Vec<u8>>,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
    shared: Arc<Shared>,
    conn_log: RateLimit,
    refused_log: RateLimit,
    partition_log: RateLimit,
}

impl Engine {
    #[expect(
        clippy::too_many_arguments,
        reason = "wiring of the sender's parts, called once"
    )]
    pub fn new(
        opts: Arc<Options>,
        inbox: (Sender<Input>, Receiver<Input>),
        acks: Arc<AckQueue>,
        wake: Sender<()>,
        recycle: Sender<Vec<u8>>,
        metrics: Arc<Metrics>,
        budget: Arc<Budget>,
        shared: Arc<Shared>,
    ) -> Engine {
        Engine {
            opts,
            inbox: inbox.1,
            inbox_tx: inbox.0,
            conns: HashMap::new(),
            brokers: HashMap::new(),
            topics: HashMap::new(),
            serial: 0,
            metadata_wanted: false,
            metadata_busy: false,
            metadata_next: Instant::now(),
            metadata_failures: 0,
            metadata_at: None,
            acks,
            wake,
            recycle,
            metrics,
            budget,
            shared,
            conn_log: RateLimit::new(Duration::from_secs(60)),
            refused_log: RateLimit::new(Duration::from_secs(10)),
            partition_log: RateLimit::new(Duration::from_secs(10)),
        }
    }

    pub fn run(mut self) {
        loop {
            let deadline = self.drive(Instant::now());
            let input = match deadline {
                Some(d) => match self.inbox.recv_deadline(d) {
                    Ok(i) => Some(i),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match self.inbox.recv() {
                    Ok(i) => Some(i),
                    Err(_) => return,
                },
            };
            let Some(input) = input else { continue };
            if !self.handle(input) {
                return;
            }
            // Take everything already queued before deciding what to send.
            while let Ok(input) = self.inbox.try_recv() {
                if !self.handle(input) {
                    return;
                }
            }
        }
    }

    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Batch(b) => self.enqueue(b),
            Input::Topic(t) => {
                self.topics.entry(t).or_default();
                self.metadata_wanted = true;
            }
            Input::Reply(r) => self.reply(r),
            Input::Stop => return false,
        }
        true
    }

    fn enqueue(&mut self, b: Batch) {
        let t = self.topics.entry(b.topic.clone()).or_default();
        let p = b.partition as usize;
        if t.parts.len() <= p {
            t.parts.resize_with(p + 1, PartQueue::default);
            t.leaders.resize(p + 1, -1);
        }
        t.parts[p].queue.push_back(b);
    }

    /// Sends what can be sent; returns when it next has something to do
    /// without an input.
    fn drive(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        // Metadata: wanted (new topic, leader moved, a failure), or due.
        if !self.topics.is_empty() {
            let due = self
                .metadata_at
                .is_none_or(|t| now >= t + self.opts.metadata_max_age);
            if (self.metadata_wanted || due) && !self.metadata_busy {
                if now >= self.metadata_next {
                    self.request_metadata(now);
                } else {
                    at(self.metadata_next);
                }
            }
            // Due already: the request above (or its reply) takes it on.
            if !due && let Some(t) = self.metadata_at {
                at(t + self.opts.metadata_max_age);
            }
        }
        // Produce: per leader, the front batch of each ready partition.
        let mut ready: HashMap<i32, Vec<(Arc<str>, usize)>> = HashMap::new();
        for (name, t) in &self.topics {
            for (p, q) in t.parts.iter().enumerate() {
                if q.in_flight || q.queue.is_empty() {
                    continue;
                }
                if let Some(r) = q.retry_at
                    && r > now
                {
                    at(r);
                    continue;
                }
                match t.leaders.get(p) {
                    Some(&l) if l >= 0 => ready.entry(l).or_default().push((name.clone(), p)),
                    Some(_) => self.metadata_wanted = true,
                    // A partition the topic no longer has (settled by the
                    // metadata that said so), or none known yet.
                    None => self.metadata_wanted |= t.leaders.is_empty(),
                }
            }
        }
        for (leader, parts) in ready {
            let id = leader as ConnId;
            if !self.conns.contains_key(&id) {
                let Some(addr) = self.brokers.get(&leader).cloned() else {
                    self.metadata_wanted = true;
                    continue;
                };
                if !self.open_conn(id, addr) {
                    at(now + self.opts.reconnect_backoff);
                    continue;
                }
            }
            let conn = self.conns.get(&id).expect("opened above");
            if conn.busy.is_some() {
                continue;
            }
            if conn.not_before > now {
                at(conn.not_before);
                continue;
            }
            self.produce(id, parts);
        }
        if self.metadata_wanted && !self.metadata_busy {
            at(self.metadata_next.max(now));
        }
        next
    }

    fn open_conn(&mut self, id: ConnId, addr: String) -> bool {
        self.serial += 1;
        match ConnHandle::spawn(
            id,
            self.serial,
            addr.clone(),
            self.opts.clone(),
            self.inbox_tx.clone(),
            Input::Reply,
        ) {
            Ok(handle) => {
                self.conns.insert(
                    id,
                    Conn {
                        handle,
                        busy: None,
                        not_before: Instant::now(),
                        failures: 0,
                    },
                );
                true
            }
            Err(e) => {
                tracing::error!(broker = %addr, error = %e, "cannot start a Kafka connection thread");
                false
            }
        }
    }

    fn request_metadata(&mut self, now: Instant) {
        // An idle connection to a known broker, else a bootstrap server.
        let idle = |c: &Conn| c.busy.is_none() && c.not_before <= now;
        let mut pick = self
            .conns
            .iter()
            .filter(|(id, c)| **id < BOOTSTRAP && idle(c) && c.failures == 0)
            .map(|(id, _)| *id)
            .next();
        if pick.is_none() {
            let n = self.opts.bootstrap.len() as u32;
            // Round-robin over the bootstrap list as attempts fail.
            for i in 0..n {
                let k = (self.metadata_failures + i) % n;
                let id = BOOTSTRAP + k;
                match self.conns.get(&id) {
                    Some(c) if idle(c) => {
                        pick = Some(id);
                        break;
                    }
                    Some(_) => {}
                    None => {
                        let addr = self.opts.bootstrap[k as usize].clone();
                        if self.open_conn(id, addr) {
                            pick = Some(id);
                            break;
                        }
                    }
                }
            }
        }
        let Some(id) = pick else {
            // Every connection is busy or backing off: try again soon.
            self.metadata_next = now + self.opts.retry_backoff;
            return;
        };
        let topics = self
            .topics
            .keys()
            .map(|t| {
                MetadataRequestTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_string(t.to_string()))))
            })
            .collect();
        let req = MetadataRequest::default()
            .with_topics(Some(topics))
            .with_allow_auto_topic_creation(true);
        let conn = self.conns.get_mut(&id).expect("picked");
        if conn.handle.send(Request::Metadata(req)) {
            conn.busy = Some(Busy::Metadata);
            self.metadata_busy = true;
            self.metadata_wanted = false;
            self.metrics.kafka_metadata_requests.inc();
        } else {
            self.conns.remove(&id);
        }
    }

    fn produce(&mut self, id: ConnId, mut parts: Vec<(Arc<str>, usize)>) {
        // Deterministic order, and a cap on the request's size.
        parts.sort();
        let mut topics: Vec<TopicBatches> = Vec::new();
        let mut sent = Vec::with_capacity(parts.len());
        let mut bytes = 0;
        for (name, p) in parts {
            let q = &mut self.topics.get_mut(&name).expect("ready").parts[p];
            let b = q.queue.front().expect("ready");
            if bytes > 0 && bytes + b.data.len() > self.opts.max_request_bytes {
                break;
            }
            bytes += b.data.len();
            q.in_flight = true;
            let data = (p as i32, b.data.clone());
            match topics.last_mut() {
                Some((t, parts)) if *t == name => parts.push(data),
                _ => topics.push((name.clone(), vec![data])),
            }
            sent.push((name, p));
        }
        let req = Produce {
            acks: self.opts.acks.wire(),
            // The broker gives up waiting for replicas a quarter before
            // this client gives up waiting for the broker, so that its
            // REQUEST_TIMED_OUT arrives rather than racing our timeout.
            timeout_ms: (self.opts.request_timeout.as_millis() * 3 / 4).min(i32::MAX as u128)
                as i32,
            topics,
        };
        let conn = self.conns.get_mut(&id).expect("caller checked");
        if conn.handle.send(Request::Produce(req)) {
            conn.busy = Some(Busy::Produce(sent));
            self.metrics.kafka_requests.inc();
        } else {
            for (name, p) in sent {
                self.topics.get_mut(&name).expect("sent").parts[p].in_flight = false;
            }
            self.conns.remove(&id);
        }
    }

    fn reply(&mut self, r: Reply) {
        let now = Instant::now();
        // A connection that was replaced (its broker moved) may still
        // answer: what it carried was retried already.
        let Some(conn) = self
            .conns
            .get_mut(&r.conn)
            .filter(|c| c.handle.serial == r.serial)
        else {
            return;
        };
        let busy = conn.busy.take();
        match r.result {
            Ok(resp) => {
                conn.failures = 0;
                self.metrics.kafka.ok();
                match (busy, resp) {
                    (Some(Busy::Metadata), Response::Metadata(m)) => {
                        self.metadata_busy = false;
                        self.metadata(m, now);
                    }
                    (Some(Busy::Produce(sent)), Response::Produce(p)) => {
                        if p.throttle_time_ms > 0 {
                            conn.not_before =
                                now + Duration::from_millis(p.throttle_time_ms as u64);
                        }
                        self.produced(sent, p, now);
                    }
                    (busy, _) => {
                        // Cannot happen: one request at a time per connection.
                        tracing::error!(?busy, "Kafka response does not match its request");
                        self.failed(busy, now);
                    }
                }
            }
            Err(e) => {
                conn.failures += 1;
                let backoff = backoff(
                    self.opts.reconnect_backoff,
                    self.opts.reconnect_backoff_max,
                    conn.failures,
                );
                conn.not_before = now + backoff;
                self.metrics.kafka_request_errors.inc();
                self.metrics.kafka.failed(&e);
                let waiting: usize = self
                    .topics
                    .values()
                    .flat_map(|t| &t.parts)
                    .map(|q| q.queue.len())
                    .sum();
                // Informational: after a while with records waiting, the
                // data loop says what it means (`pipeline::delivery`).
                self.conn_log.log(|suppressed| {
                    tracing::info!(
                        error = %e,
                        kind = e.kind(),
                        retry_in_ms = backoff.as_millis() as u64,
                        batches_waiting = waiting,
                        suppressed,
                        "Kafka request failed; retrying (records wait in their files)"
                    )
                });
                if matches!(e, ConnError::Resolve { .. } | ConnError::Connect { .. }) {
                    // A broker that cannot be reached may have moved.
                    self.metadata_wanted = true;
                }
                self.failed(busy, now);
            }
        }
    }

    /// The request on a connection got no response: what it carried is
    /// retried.
    fn failed(&mut self, busy: Option<Busy>, now: Instant) {
        match busy {
            Some(Busy::Metadata) => {
                self.metadata_busy = false;
                self.metadata_again(now);
            }
            Some(Busy::Produce(sent)) => {
                self.metadata_wanted = true;
                for (name, p) in sent {
                    self.retry(&name, p, now);
                }
            }
            None => {}
        }
    }

    /// Metadata is asked for again, after a backoff that grows with each
    /// answer that did not settle everything.
    fn metadata_again(&mut self, now: Instant) {
        self.metadata_wanted = true;
        self.metadata_failures += 1;
        self.metadata_next = now
            + backoff(
                self.opts.retry_backoff,
                self.opts.retry_backoff_max,
                self.metadata_failures,
            );
    }

    /// Batches that can no longer go where they were meant to: of a topic
    /// Kafka refuses (reported dropped), or of partitions that no longer
    /// exist (reported for a re-read from their files). A batch in flight
    /// is settled when its answer comes.
    fn settle(&mut self, name: &Arc<str>, outcome: Outcome) {
        let Some(t) = self.topics.get(name) else {
            return;
        };
        let from = match outcome {
            Outcome::Dropped => 0,
            _ => t.leaders.len(),
        };
        for p in from..t.parts.len() {
            while self.topics[name].parts[p].queue.front().is_some()
                && !self.topics[name].parts[p].in_flight
            {
                self.complete(name, p, outcome);
            }
        }
    }

    /// Whether a partition's batches can only be settled (see
    /// [`Engine::settle`]), and how.
    fn unroutable(&self, name: &Arc<str>, p: usize) -> Option<Outcome> {
        let t = self.topics.get(name)?;
        if t.status == Some(TopicStatus::Refused) {
            Some(Outcome::Dropped)
        } else if !t.leaders.is_empty() && p >= t.leaders.len() {
            Some(Outcome::Retry)
        } else {
            None
        }
    }

    fn retry(&mut self, name: &Arc<str>, p: usize, now: Instant) {
        if let Some(outcome) = self.unroutable(name, p) {
            if let Some(q) = self.topics.get_mut(name).and_then(|t| t.parts.get_mut(p)) {
                q.in_flight = false;
            }
            self.settle(name, outcome);
            return;
        }
        let Some(q) = self.topics.get_mut(name).and_then(|t| t.parts.get_mut(p)) else {
            return;
        };
        q.in_flight = false;
        q.attempts += 1;
        q.retry_at = Some(
            now + backoff(
                self.opts.retry_backoff,
                self.opts.retry_backoff_max,
                q.attempts,
            ),
        );
        self.metrics.delivery_failed(FailureKind::Retried);
    }

    /// Takes a metadata answer: broker addresses, then the partitions and
    /// leaders (or the refusal) of each topic the sender knows; settles
    /// what that decides, asks again for what it leaves open, and tells the
    /// data thread of changed topics.
    fn metadata(&mut self, m: MetadataResponse, now: Instant) {
        self.metadata_failures = 0;
        self.metadata_at = Some(now);
        self.update_brokers(&m.brokers, now);
        let mut changed = false;
        let mut pending = false;
        let mut settle = Vec::new();
        for t in m.topics {
            let Some(name) = t.name.as_ref().map(|n| n.0.as_str()) else {
                continue;
            };
            let Some(key) = self.topics.get_key_value(name).map(|(k, _)| k.clone()) else {
                continue;
            };
            let Some(status) = self.topic_status(&key, &t, now, &mut pending) else {
                continue;
            };
            settle.extend(self.settlement(&key, status));
            changed |= self.publish_status(&key, status);
        }
        for (name, outcome) in settle {
            self.settle(&name, outcome);
        }
        if pending {
            self.metadata_again(now);
        }
        if changed {
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
            let _ = self.wake.try_send(());
        }
    }

    /// Records the brokers' addresses; a broker that moved loses its old
    /// connection, and what it carried is retried.
    fn update_brokers(&mut self, brokers: &[MetadataResponseBroker], now: Instant) {
        for b in brokers {
            let addr = format!("{}:{}", b.host.as_str(), b.port);
            let id = b.node_id.0;
            if self.brokers.get(&id) != Some(&addr)
                && self.brokers.insert(id, addr).is_some()
                && let Some(mut old) = self.conns.remove(&(id as ConnId))
            {
                let busy = old.busy.take();
                self.failed(busy, now);
            }
        }
    }

    /// A known topic's status from its metadata, or None while it is not
    /// settled; sets `pending` when the topic must be asked about again.
    fn topic_status(
        &mut self,
        key: &Arc<str>,
        t: &MetadataResponseTopic,
        now: Instant,
        pending: &mut bool,
    ) -> Option<TopicStatus> {
        match t.error_code.err() {
            None => {
                let state = self.topics.get_mut(key)?;
                state.missing_since = None;
                let Some(n) = sane_partitions(&t.partitions) else {
                    *pending = true;
                    return None;
                };
                if !state.set_leaders(&t.partitions, n) {
                    *pending = true;
                }
                Some(TopicStatus::Partitions(n))
            }
            // Not there yet (auto-creation under way, or not created):
            // asked again until it has been missing for too long.
            Some(ResponseError::UnknownTopicOrPartition | ResponseError::LeaderNotAvailable) => {
                self.missing_topic(key, now, pending)
            }
            Some(e) if e.is_retriable() => {
                *pending = true;
                None
            }
            Some(e) => {
                self.refused_log.log(|suppressed| {
                    tracing::warn!(topic = %key, error = ?e, suppressed, "Kafka refuses the topic; its records are counted as dropped");
                });
                Some(TopicStatus::Refused)
            }
        }
    }

    /// A topic the cluster does not have: None (and `pending`) until it
    /// has been missing for `topic.metadata.propagation.max.ms`, then
    /// refused.
    fn missing_topic(
        &mut self,
        key: &Arc<str>,
        now: Instant,
        pending: &mut bool,
    ) -> Option<TopicStatus> {
        let state = self.topics.get_mut(key)?;
        let since = *state.missing_since.get_or_insert(now);
        if now.duration_since(since) < self.opts.topic_missing_after {
            *pending = true;
            return None;
        }
        self.refused_log.log(|suppressed| {
            tracing::warn!(topic = %key, suppressed, "Kafka topic does not exist; its records are counted as dropped until it does (checked at every metadata refresh)");
        });
        Some(TopicStatus::Refused)
    }

    /// What a topic's new status does to its queued batches: those of
    /// partitions it no longer has are retried, a refused topic's dropped.
    fn settlement(&self, key: &Arc<str>, status: TopicStatus) -> Option<(Arc<str>, Outcome)> {
        match status {
            TopicStatus::Partitions(n) if self.topics.get(key)?.parts.len() > n => {
                Some((key.clone(), Outcome::Retry))
            }
            TopicStatus::Partitions(_) => None,
            TopicStatus::Refused => Some((key.clone(), Outcome::Dropped)),
        }
    }

    /// Records a topic's status and, if it changed, publishes it to the
    /// data thread; whether it changed.
    fn publish_status(&mut self, key: &Arc<str>, status: TopicStatus) -> bool {
        let Some(state) = self.topics.get_mut(key) else {
            return false;
        };
        if state.status == Some(status) {
            return false;
        }
        state.status = Some(status);
        self.shared
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), status);
        true
    }

    fn produced(&mut self, sent: Vec<(Arc<str>, usize)>, resp: ProduceResponse, now: Instant) {
        let mut results: HashMap<(&str, i32), (i16, Option<&str>)> = HashMap::new();
        for t in &resp.responses {
            for p in &t.partition_responses {
                results.insert(
                    (t.name.0.as_str(), p.index),
                    (p.error_code, p.error_message.as_ref().map(|m| m.as_str())),
                );
            }
        }
        let mut outcomes = Vec::with_capacity(sent.len());
        for (name, p) in &sent {
            let r = results.get(&(&**name, *p as i32)).copied();
            outcomes.push(r.map(|(code, msg)| (code, msg.map(str::to_owned))));
        }
        drop(results);
        for ((name, p), r) in sent.into_iter().zip(outcomes) {
            match r {
                Some((0, _)) => self.complete(&name, p, Outcome::Delivered),
                None => {
                    // The broker left the partition out of its answer.
                    self.metrics.kafka_partition_errors.inc();
                    self.retry(&name, p, now);
                }
                Some((code, msg)) => {
                    self.metrics.kafka_partition_errors.inc();
                    let err = code.err().unwrap_or(ResponseError::Unknown(code));
                    self.partition_log.log(|suppressed| {
                        tracing::warn!(topic = %name, partition = p, error = ?err, message = msg.as_deref().unwrap_or(""), suppressed, "Kafka refused a batch");
                    });
                    match refused_batch(code) {
                        Refused::Split => {
                            if !self.split(&name, p) {
                                self.complete(&name, p, Outcome::Dropped);
                            }
                        }
                        Refused::Retry { metadata } => {
                            self.metadata_wanted |= metadata;
                            self.retry(&name, p, now);
                        }
                        Refused::Drop => self.complete(&name, p, Outcome::Dropped),
                    }
                }
            }
        }
    }

    /// Splits the front batch of a partition in two (a broker found it too
    /// large); false if it holds one record only.
    fn split(&mut self, name: &Arc<str>, p: usize) -> bool {
        let codec = self.opts.compression;
        let Some(q) = self.topics.get_mut(name).and_then(|t| t.parts.get_mut(p)) else {
            return false;
        };
        let Some(b) = q.queue.front() else {
            return false;
        };
        if b.records < 2 {
            return false;
        }
        let Some(halves) = batch::split(&b.data, &b.acks, codec) else {
            return false;
        };
        let b = q.queue.pop_front().expect("front");
        let first_cost = b.cost / 2;
        let mut parts = Vec::new();
        for (i, s) in halves.into_iter().enumerate() {
            parts.push(Batch {
                topic: b.topic.clone(),
                partition: b.partition,
                data: Arc::new(s.data),
                records: s.records,
                value_bytes: s.value_bytes,
                cost: if i == 0 {
                    first_cost
                } else {
                    b.cost - first_cost
                },
                acks: s.acks,
                part: b.part.clone(),
            });
        }
        b.part.outstanding.fetch_add(1, Ordering::SeqCst);
        for half in parts.into_iter().rev() {
            q.queue.push_front(half);
        }
        q.in_flight = false;
        q.retry_at = None;
        true
    }

    /// The front batch of a partition is done with: reported, its budget
    /// freed, the partition free for the next one.
    fn complete(&mut self, name: &Arc<str>, p: usize, outcome: Outcome) {
        let Some(q) = self.topics.get_mut(name).and_then(|t| t.parts.get_mut(p)) else {
            return;
        };
        q.in_flight = false;
        q.retry_at = None;
        q.attempts = 0;
        let Some(b) = q.queue.pop_front() else { return };
        match outcome {
            Outcome::Delivered => {
                self.metrics.kafka_batches.inc();
                self.metrics.records_delivered.add(u64::from(b.records));
                self.metrics.bytes_delivered.add(b.value_bytes);
            }
            Outcome::Dropped => {
                for _ in 0..b.records {
                    self.metrics.delivery_failed(FailureKind::Dropped);
                }
            }
            Outcome::Retry => {
                for _ in 0..b.records {
                    self.metrics.delivery_failed(FailureKind::Retried);
                }
            }
        }
        self.budget.give_back(b.cost);
        self.acks.push_runs(&b.acks, outcome);
        // The request that carried it is gone: the buffer is ours alone.
        if let Ok(buf) = Arc::try_unwrap(b.data) {
            let _ = self.recycle.send(buf);
        }
        if b.part.outstanding.fetch_sub(1, Ordering::SeqCst) == 1
            && b.part.waiting.swap(false, Ordering::SeqCst)
        {
            let _ = self.wake.try_send(());
        }
    }
}

/// What is done with a batch a partition's produce answer refused with
/// error `code` (not 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too large: split in two and sent again (dropped if it holds one
    /// record).
    Split,
    /// Retriable: sent again after a backoff; `metadata`: the leaders may
    /// have moved, ask for them again.
    Retry { metadata: bool },
    /// Refused for good (authorization, invalid topic, …): reported dropped.
    Drop,
}

/// The decision for a batch refused with `code`.
pub fn refused_batch(code: i16) -> Refused {
    match code.err().unwrap_or(ResponseError::Unknown(code)) {
        ResponseError::MessageTooLarge | ResponseError::RecordListTooLarge => Refused::Split,
        e if e.is_retriable() => Refused::Retry {
            metadata: matches!(
                e,
                ResponseError::NotLeaderOrFollower
                    | ResponseError::LeaderNotAvailable
                    | ResponseError::UnknownTopicOrPartition
                    | ResponseError::FencedLeaderEpoch
                    | ResponseError::UnknownLeaderEpoch
            ),
        },
        _ => Refused::Drop,
    }
}

/// `base * 2^(attempt-1)`, capped at `max`, with up to 20 % taken off at
/// random so that many agents do not retry in step.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let d = exp.min(max);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    d - d.mul_f64(f64::from(nanos % 200) / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        let (b, m) = (Duration::from_millis(100), Duration::from_secs(1));
        for (attempt, nominal) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            let d = backoff(b, m, attempt).as_millis() as u64;
            assert!(d <= nominal && d >= nominal * 8 / 10, "{attempt}: {d}");
        }
    }
}
