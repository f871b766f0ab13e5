//! What the data loop tells the operator about delivery: the log lines on
//! a change of [`delivery`] state (bpftail's own words, in place of the
//! Kafka client's retries), `/readyz`, `bpftail_oldest_unacked_seconds`
//! and `bpftail_waiting_bytes{namespace}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Pipeline;
use super::delivery::{Change, DeliveryWatch, Why, human_bytes};
use crate::metrics::{WAITING_NAMESPACES, unix_ms};
use crate::sink::Sink;

/// Said with an error that names a host that does not resolve.
const RESOLVE_HINT: &str = "check --brokers: each name must resolve on the node (a pod with hostNetwork needs dnsPolicy ClusterFirstWithHostNet to resolve cluster Service names)";

impl<S: Sink> Pipeline<S> {
    /// Looks at delivery about once a second while records wait (at the
    /// heartbeat otherwise): logs a change of state, and publishes it with
    /// the age of the oldest record in flight.
    pub(super) fn check_delivery(&mut self, now: Instant) {
        let waiting = self.sink.inflight_bytes() > 0;
        if now < self.delivery_at {
            // Records that start waiting have waited for no time, and the
            // one-second rhythm starts with them, not at the next
            // heartbeat. (Cheap: at a low rate this happens at every
            // produce, and the look at every file stays once a second.)
            if waiting && !self.delivery.was_waiting() {
                self.delivery.start_waiting(now);
                self.delivery_at = self.delivery_at.min(DeliveryWatch::next_check(now));
            }
            return;
        }
        self.delivery_at = if waiting {
            DeliveryWatch::next_check(now)
        } else {
            now + super::HEARTBEAT
        };
        let failing = self.metrics.kafka.failing();
        let change = self.delivery.observe(
            now,
            failing.as_ref().map(|(_, e)| e.as_str()),
            waiting,
            self.metrics.records_delivered.get(),
        );
        let mut oldest: Option<Instant> = None;
        let mut per_ns: HashMap<&str, u64> = HashMap::new();
        for f in self.files.iter() {
            if let Some(t) = f.acks.oldest_read() {
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
            // What was read is there for sure; the rest as of the last stat.
            let size = f.size_seen.max(f.read_offset);
            let waiting = size.saturating_sub(f.acks.committed());
            if waiting > 0 {
                *per_ns.entry(f.meta.namespace()).or_default() += waiting;
            }
        }
        let waiting_ns = top_namespaces(per_ns);
        let wall = unix_ms();
        let oldest_ms =
            oldest.map(|t| wall.saturating_sub(now.duration_since(t).as_millis() as u64));
        let down = match &change {
            Change::None => None,
            Change::Down { why, for_ } | Change::StillDown { why, for_ } => {
                let (bytes, files) = self.waiting_on_disk();
                let still = matches!(change, Change::StillDown { .. });
                log_down(
                    why,
                    *for_,
                    still,
                    bytes,
                    files,
                    oldest.map(|t| now.duration_since(t)),
                );
                Some(wall.saturating_sub(for_.as_millis() as u64))
            }
            Change::Resumed { after } => {
                let (bytes, files) = self.waiting_on_disk();
                tracing::info!(
                    after_s = after.as_secs(),
                    waiting_bytes = bytes,
                    waiting_files = files,
                    "Kafka delivery resumed after {}; {} still to send",
                    secs(*after),
                    human_bytes(bytes),
                );
                None
            }
        };
        let mut status = self
            .metrics
            .delivery
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        status.oldest_unacked_read_ms = oldest_ms;
        status.waiting = waiting_ns;
        match self.delivery.why() {
            Some(why) => {
                if let Some(since) = down {
                    status.down_since_ms = Some(status.down_since_ms.unwrap_or(since));
                }
                // The latest reason, not the first.
                status.summary = summary(why);
            }
            None => {
                status.down_since_ms = None;
                status.summary.clear();
            }
        }
    }

    /// Bytes of the open files not acknowledged yet, and how many files
    /// hold some (each file looked at now).
    fn waiting_on_disk(&self) -> (u64, usize) {
        let (mut bytes, mut files) = (0, 0);
        for f in self.files.iter() {
            let size = f.file.stat().map_or(f.size_seen, |st| st.len);
            let waiting = size.saturating_sub(f.acks.committed());
            if waiting > 0 {
                bytes += waiting;
                files += 1;
            }
        }
        (bytes, files)
    }
}

/// The largest [`WAITING_NAMESPACES`] namespaces, the rest summed under
/// `_other`; sorted by name.
fn top_namespaces(per_ns: HashMap<&str, u64>) -> Vec<(Arc<str>, u64)> {
    let mut all: Vec<(&str, u64)> = per_ns.into_iter().collect();
    all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let other: u64 = all.iter().skip(WAITING_NAMESPACES).map(|e| e.1).sum();
    all.truncate(WAITING_NAMESPACES);
    all.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut out: Vec<(Arc<str>, u64)> = all.into_iter().map(|(n, b)| (n.into(), b)).collect();
    if other > 0 {
        out.push(("_other".into(), other));
    }
    out
}

/// `/readyz`'s answer while delivery is down.
fn summary(why: &Why) -> String {
    match why {
        Why::Unreachable(e) => format!("Kafka unreachable: {e}"),
        Why::NotAcknowledging => "Kafka acknowledges nothing".to_owned(),
    }
}

fn files_word(n: usize) -> String {
    if n == 1 {
        "1 file".to_owned()
    } else {
        format!("{n} files")
    }
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs())
}

fn log_down(
    why: &Why,
    for_: Duration,
    still: bool,
    bytes: u64,
    files: usize,
    oldest: Option<Duration>,
) {
    let state = if still { "still down" } else { "down" };
    let oldest_s = oldest.map_or(0, |d| d.as_secs());
    match why {
        Why::Unreachable(error) => {
            let hint = error.contains("resolve").then_some(RESOLVE_HINT);
            tracing::warn!(
                error = %error,
                hint,
                waiting_bytes = bytes,
                waiting_files = files,
                oldest_unacked_s = oldest_s,
                "Kafka delivery {state}: unreachable for {}; {} wait on disk in {} (nothing is lost while the files stay); reading goes on when Kafka answers",
                secs(for_),
                human_bytes(bytes),
                files_word(files),
            );
        }
        Why::NotAcknowledging => {
            tracing::warn!(
                waiting_bytes = bytes,
                waiting_files = files,
                oldest_unacked_s = oldest_s,
                "Kafka delivery {state}: nothing acknowledged for {}; {} wait on disk in {} (nothing is lost while the files stay)",
                secs(for_),
                human_bytes(bytes),
                files_word(files),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_bytes_name_the_largest_namespaces_and_sum_the_rest() {
        let names: Vec<String> = (0..30).map(|i| format!("ns{i:02}")).collect();
        let per_ns: HashMap<&str, u64> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), 100 + i as u64))
            .collect();
        let top = top_namespaces(per_ns);
        assert_eq!(top.len(), WAITING_NAMESPACES + 1);
        assert_eq!(&*top[0].0, "ns10");
        assert_eq!(&*top[WAITING_NAMESPACES - 1].0, "ns29");
        let other = top.last().unwrap();
        assert_eq!(&*other.0, "_other");
        assert_eq!(other.1, (100..110).sum::<u64>());
        let few = top_namespaces(HashMap::from([("a", 1)]));
        assert_eq!(few, vec![("a".into(), 1)]);
    }

    #[test]
    fn the_summary_says_why() {
        assert_eq!(
            summary(&Why::Unreachable("cannot resolve kafka:9092".into())),
            "Kafka unreachable: cannot resolve kafka:9092"
        );
    }
}
