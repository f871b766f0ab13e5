//! Sink: where records go once decoded, and how their delivery reports
//! come back.
//!
//! Two Kafka clients implement [`Sink`]: the native one ([`crate::kafka`],
//! the default) and librdkafka ([`rdkafka`], `--kafka-client rdkafka`).
//! Both render records the same way:
//! - Key = the container stream (pod uid + container), so one container's
//!   lines share a partition and keep their order.
//! - `--format raw`: value = the message; time, stream, namespace, pod,
//!   container and node as headers (`partial`/`truncated` only when set).
//!   `--format json` / `logpilot`: value = one JSON object with those fields
//!   and the message (invalid UTF-8 replaced by U+FFFD and counted),
//!   rendered by [`render_json`].
//! - Every delivery report comes back to the data loop as an [`Ack`]
//!   naming the file and a run of the record sequence numbers there.

pub mod budget;
pub mod rdkafka;
pub mod render;

pub use budget::Budget;
pub use render::render_json;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::tail::RecordSink;

/// Bits of a sequence number an [`Ack`] carries.
pub(crate) const SEQ_BITS: u32 = 40;
pub(crate) const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

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
    /// How many records, from that sequence number on.
    pub count: u32,
    pub outcome: Outcome,
}

impl Ack {
    pub fn new(file: u32, seq: u64, outcome: Outcome) -> Ack {
        Ack::run(file, seq, 1, outcome)
    }

    /// `count` records of `file` from `seq` on.
    pub fn run(file: u32, seq: u64, count: u32, outcome: Outcome) -> Ack {
        Ack {
            file,
            seq_low: seq & SEQ_MASK,
            count,
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

/// Consecutive records of one file in a batch: sequence numbers `first`,
/// `first + 1`, … (`count` of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckRun {
    pub file: u32,
    pub first: u64,
    pub count: u32,
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

    pub fn push(&self, ack: Ack) {
        let pending = {
            let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
            acks.push(ack);
            acks.len()
        };
        if self.eager.load(Ordering::Relaxed) || pending >= ACKS_WAKE_AT {
            let _ = self.wake.try_send(());
        }
    }

    /// One report per run: a batch's records, all with `outcome`.
    pub fn push_runs(&self, runs: &[AckRun], outcome: Outcome) {
        let pending = {
            let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
            acks.extend(
                runs.iter()
                    .map(|r| Ack::run(r.file, r.first, r.count, outcome)),
            );
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

/// The output the data loop drives: records in, delivery reports out.
pub trait Sink: RecordSink {
    /// Moves the delivery reports received so far into `out`.
    fn take_acks(&self, out: &mut Vec<Ack>);
    /// Waits up to `timeout` for everything in flight to be acknowledged.
    fn flush(&self, timeout: Duration) -> bool;
    /// Bytes of the in-flight budget in use (records not yet acknowledged).
    fn inflight_bytes(&self) -> u64;
    /// Whether each delivery report should wake the data loop (it waits
    /// for budget); otherwise reports are picked up at its next turn.
    fn eager_acks(&self, _eager: bool) {}
    /// The end of one turn of the data loop: a sink that batches hands on
    /// what it holds (whatever it can send now).
    fn turn(&mut self) {}
    /// When the sink next needs a [`Sink::turn`] (a lingering batch).
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// Replaces the client by one built from `cfg` (a reload changed its
    /// settings); called once nothing is in flight. On error the old client
    /// stays.
    fn reconnect(&mut self, _cfg: &crate::config::Config) -> anyhow::Result<()> {
        anyhow::bail!("this sink cannot be rebuilt")
    }
}

/// The Kafka timestamp of records read now (Unix ms): taken once per read,
/// not per record.
pub fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
