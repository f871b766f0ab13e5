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

pub use budget::Budget;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::config::OutputFormat;
use crate::discover::FileMeta;
use crate::metrics::Metrics;
use crate::tail::RecordSink;
use crate::tail::decode::Record;

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
}

/// The Kafka timestamp of records read now (Unix ms): taken once per read,
/// not per record.
pub fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Appends `rec` as one JSON object (`--format json` or `logpilot`) to `v`.
pub fn render_json(
    v: &mut Vec<u8>,
    format: OutputFormat,
    meta: &FileMeta,
    rec: &Record<'_>,
    metrics: &Metrics,
) {
    v.extend_from_slice(if format == OutputFormat::Logpilot {
        b"{\"@timestamp\":\""
    } else {
        b"{\"time\":\""
    });
    if escape_json(v, rec.time) {
        metrics.invalid_utf8.inc();
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
                metrics.json_lines_invalid.inc();
            }
            v.extend_from_slice(b",\"message\":\"");
            if escape_json(v, rec.msg) {
                metrics.invalid_utf8.inc();
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
}
