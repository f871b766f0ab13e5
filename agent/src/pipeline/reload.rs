//! Live reconfiguration, in the data loop: a configuration the control
//! plane resolved (and cleared of the settings only a restart changes) is
//! applied between two turns.
//!
//! Guarantees: no line is lost or sent twice by a reload. Records already
//! handed to the Kafka client keep the topic and format they were rendered
//! with; every record read after the reload gets the new metadata (every
//! open file's is rendered again). When the Kafka client's own settings
//! change, reading stops, what is in flight is drained (delivered and
//! acknowledged), and only then is the client replaced; if the drain times
//! out (the broker is down), the files with records in flight are read
//! again from their acknowledged offsets after the switch (at-least-once).
//! A client that cannot be built leaves the old one running and the reload
//! is counted as refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::sink::Sink;

use super::Pipeline;

/// How long a reload waits for the old Kafka client's records in flight
/// (shutdown cuts it short).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

impl<S: Sink> Pipeline<S> {
    /// Applies the newest configuration the control plane sent, if any.
    pub(super) fn take_reload(&mut self) {
        let Some(rx) = &self.reloads else { return };
        let Some(new) = rx.try_iter().last() else {
            return;
        };
        self.reconfigure(*new);
    }

    fn reconfigure(&mut self, mut new: Config) {
        if self.cfg.kafka_changed(&new) {
            tracing::info!(
                brokers = %new.brokers,
                "Kafka client settings changed: draining what is in flight, then reconnecting"
            );
            let drained = self.drain_sink(DRAIN_TIMEOUT);
            if !drained {
                tracing::warn!(
                    inflight_bytes = self.sink.inflight_bytes(),
                    "Kafka did not acknowledge everything in flight in time; those records are read again through the new client"
                );
            }
            if let Err(e) = self.sink.reconnect(&new) {
                tracing::error!(error = %format!("{e:#}"), "configuration reload refused: the new Kafka client could not be built; the running configuration stays");
                self.metrics.config_reloads_refused.inc();
                return;
            }
            // Reports the old client had not handed over are gone with it:
            // what they covered is read again (none after a full drain).
            self.rewind_in_flight();
        }
        if new.max_cpu != self.cfg.max_cpu {
            self.pacer = new.max_cpu.map(|cores| {
                crate::files::limits::CpuPacer::new(
                    cores,
                    Instant::now(),
                    crate::files::limits::process_cpu(),
                )
            });
            self.paced_until = None;
        }
        self.ctx.topic = new.topic.clone();
        self.ctx.labels = new.pod_labels.clone();
        self.ctx.annotations = new.pod_annotations.clone();
        self.ctx.policy = crate::discover::Policy {
            output: new.format,
            ship: new.ship,
            prefixes: new.declaration_prefixes.clone(),
            topic_allow: new.topic_allow.clone(),
        };
        self.ctx.multiline = new.multiline.clone();
        self.ctx.rate_limit = new.container_rate_limit;
        std::mem::swap(&mut self.cfg, &mut new);
        self.rerender_all();
        // Declarations may name other files now (prefixes, allow-list):
        // discovery runs again, and refusals are logged anew.
        self.noted.clear();
        self.declared_signature = 0;
        self.rescan();
        self.metrics.config_reloads_applied.inc();
        tracing::info!(topic = %self.cfg.topic, format = ?self.cfg.format, ship = ?self.cfg.ship, "configuration reloaded: applies to the next records");
    }

    /// Every open file's metadata rendered again with the current context.
    fn rerender_all(&mut self) {
        for f in self.files.iter_mut() {
            let meta = Arc::new(self.ctx.render(f.meta.origin.clone(), f.meta.format));
            if meta.suppressed != f.meta.suppressed {
                if meta.suppressed {
                    tracing::info!(path = %f.path.display(), "stopped shipping this log after the reload; its lines are read and discarded");
                } else {
                    tracing::info!(path = %f.path.display(), "shipping this log again after the reload");
                }
            }
            f.meta = meta;
        }
        self.files.touch();
    }

    /// Hands on every open batch and waits up to `timeout` for everything
    /// in flight to be acknowledged, applying the reports. True if nothing
    /// is left in flight.
    fn drain_sink(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.sink.eager_acks(true);
        loop {
            self.sink.turn();
            self.apply_acks();
            // Both: a client frees the budget just before it hands over
            // the report.
            if self.sink.inflight_bytes() == 0 && self.files.iter().all(|f| f.acks.in_flight() == 0)
            {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            let wait = self
                .sink
                .deadline()
                .map_or(wait, |d| wait.min(d.saturating_duration_since(now)));
            let _ = self.wake.recv_timeout(wait);
        }
    }

    /// After a drain that timed out: the files whose records were still in
    /// flight are read again from their acknowledged offset.
    fn rewind_in_flight(&mut self) {
        let ids: Vec<_> = self
            .files
            .iter()
            .filter(|f| f.acks.in_flight() > 0)
            .map(|f| f.id)
            .collect();
        for id in ids {
            if let Some(f) = self.files.get_mut(id) {
                let at = f.acks.committed();
                f.restart_at(at);
                self.schedule.mark(id);
            }
        }
    }
}
