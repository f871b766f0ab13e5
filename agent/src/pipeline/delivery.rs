//! Is delivery working? The decision the data loop takes about once a
//! second while records wait for Kafka, kept apart from what it logs and
//! publishes (`Pipeline::check_delivery`).
//!
//! Delivery is *down* while records wait and either the Kafka client's
//! requests have failed for [`UNREACHABLE_AFTER`] (connection refused, a
//! name that does not resolve, timeouts), or Kafka acknowledged nothing
//! for [`STALLED_AFTER`] (a broker that accepts and never answers). It is
//! up again once records are acknowledged (or none wait): a request that
//! works, a metadata answer, is not enough. With nothing waiting there is nothing to deliver: up,
//! whatever the client last saw (`bpftail_kafka_up` still says it).
//!
//! Each change is announced once ([`Change`]), and a reminder every
//! [`REMIND_EVERY`] while it lasts: the operator reads bpftail's own words
//! instead of the client's retries.

use std::time::{Duration, Instant};

/// How long the client's requests must fail, with records waiting, before
/// delivery is said to be down (short failures are retried quietly).
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(10);
/// How long nothing may be acknowledged, with records waiting.
pub const STALLED_AFTER: Duration = Duration::from_secs(60);
/// How often an outage is logged again while it lasts.
pub const REMIND_EVERY: Duration = Duration::from_secs(300);

/// Why delivery is down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The client's requests fail: the last error.
    Unreachable(String),
    /// Requests get through (or time out unseen) but nothing is
    /// acknowledged.
    NotAcknowledging,
}

/// What an observation changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    None,
    /// Delivery stopped; `for_` since the first sign of it.
    Down {
        why: Why,
        for_: Duration,
    },
    /// Still down (a reminder).
    StillDown {
        why: Why,
        for_: Duration,
    },
    /// Delivery works again after `after`.
    Resumed {
        after: Duration,
    },
}

#[derive(Debug)]
enum State {
    Up,
    Down {
        since: Instant,
        reminded: Instant,
        why: Why,
        /// Records delivered when it went down: it is up again only once
        /// more are (or none wait), not merely when a request works.
        delivered: u64,
    },
}

/// The delivery state, fed one observation at a time.
#[derive(Debug)]
pub struct DeliveryWatch {
    state: State,
    /// Records delivered at the last observation.
    delivered: u64,
    /// Whether records waited at the last observation.
    waiting: bool,
    /// Last time records were acknowledged, or none waited.
    progress: Instant,
    /// When the client's failures were first observed (`None` while its
    /// requests work).
    failing: Option<Instant>,
}

impl DeliveryWatch {
    pub fn new(now: Instant) -> DeliveryWatch {
        DeliveryWatch {
            state: State::Up,
            delivered: 0,
            waiting: false,
            progress: now,
            failing: None,
        }
    }

    /// Whether records waited at the last observation.
    pub fn was_waiting(&self) -> bool {
        self.waiting
    }

    /// Records started waiting at `now`, between observations: they have
    /// waited for no time.
    pub fn start_waiting(&mut self, now: Instant) {
        if !self.waiting {
            self.waiting = true;
            self.progress = now;
        }
    }

    pub fn is_down(&self) -> bool {
        matches!(self.state, State::Down { .. })
    }

    /// Why delivery is down now (the latest reason), if it is.
    pub fn why(&self) -> Option<&Why> {
        match &self.state {
            State::Down { why, .. } => Some(why),
            State::Up => None,
        }
    }

    /// At `now`: the client's last error if its requests currently fail,
    /// whether records wait for acknowledgement, and the count of records
    /// delivered so far.
    pub fn observe(
        &mut self,
        now: Instant,
        kafka_error: Option<&str>,
        waiting: bool,
        delivered: u64,
    ) -> Change {
        // Records that just started waiting have waited for no time.
        if delivered != self.delivered || !waiting || !self.waiting {
            self.progress = now;
        }
        self.delivered = delivered;
        self.waiting = waiting;
        self.failing = match (kafka_error, self.failing) {
            (None, _) => None,
            (Some(_), Some(t)) => Some(t),
            (Some(_), None) => Some(now),
        };
        let unreachable = self
            .failing
            .filter(|t| now.duration_since(*t) >= UNREACHABLE_AFTER);
        let stalled = now.duration_since(self.progress) >= STALLED_AFTER;
        let why = match (waiting, unreachable, kafka_error) {
            (false, _, _) => None,
            (true, Some(_), Some(e)) => Some(Why::Unreachable(e.to_owned())),
            (true, _, _) if stalled => Some(Why::NotAcknowledging),
            _ => None,
        };
        match &mut self.state {
            State::Up => {
                let Some(why) = why else {
                    return Change::None;
                };
                // Since the first sign: the first failure, or the last
                // acknowledgement.
                let since = match &why {
                    Why::Unreachable(_) => unreachable.unwrap_or(now),
                    Why::NotAcknowledging => self.progress,
                };
                self.state = State::Down {
                    since,
                    reminded: now,
                    why: why.clone(),
                    delivered,
                };
                Change::Down {
                    why,
                    for_: now.duration_since(since),
                }
            }
            State::Down {
                since,
                reminded,
                why: was,
                delivered: at_down,
            } => {
                if !waiting || delivered > *at_down {
                    let after = now.duration_since(*since);
                    self.state = State::Up;
                    return Change::Resumed { after };
                }
                if let Some(why) = why {
                    *was = why;
                }
                if now.duration_since(*reminded) >= REMIND_EVERY {
                    *reminded = now;
                    Change::StillDown {
                        why: was.clone(),
                        for_: now.duration_since(*since),
                    }
                } else {
                    Change::None
                }
            }
        }
    }

    /// When the next observation could change something (the loop wakes
    /// for it while records wait): a second from now.
    pub fn next_check(now: Instant) -> Instant {
        now + Duration::from_secs(1)
    }
}

/// Bytes in the form an operator reads: `12.4 MB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        // 999,960 B is "1.0 MB", not "1000.0 kB".
        if v < 999.95 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_refused_broker_is_down_after_the_grace_and_resumes_once() {
        let t0 = Instant::now();
        let mut w = DeliveryWatch::new(t0);
        let refused = "cannot connect to k:9092: Connection refused";
        let err = Some(refused);
        assert_eq!(w.observe(t0, None, true, 0), Change::None);
        assert_eq!(w.observe(t0 + secs(1), err, true, 0), Change::None);
        assert_eq!(w.observe(t0 + secs(10), err, true, 0), Change::None);
        let c = w.observe(t0 + secs(11), err, true, 0);
        assert_eq!(
            c,
            Change::Down {
                why: Why::Unreachable(refused.into()),
                for_: secs(10)
            }
        );
        assert!(w.is_down());
        assert_eq!(w.observe(t0 + secs(12), err, true, 0), Change::None);
        assert!(matches!(
            w.observe(t0 + secs(11) + REMIND_EVERY, err, true, 0),
            Change::StillDown { .. }
        ));
        assert_eq!(
            w.observe(t0 + secs(12) + REMIND_EVERY, err, true, 0),
            Change::None
        );
        // The client works again and records are acknowledged.
        let c = w.observe(t0 + secs(400), None, true, 5);
        assert_eq!(c, Change::Resumed { after: secs(399) });
        assert_eq!(w.observe(t0 + secs(401), None, true, 9), Change::None);
    }

    #[test]
    fn short_failures_and_failures_with_nothing_waiting_are_not_an_outage() {
        let t0 = Instant::now();
        let mut w = DeliveryWatch::new(t0);
        let err = Some("timeout");
        w.observe(t0, err, true, 0);
        assert_eq!(w.observe(t0 + secs(5), None, true, 1), Change::None);
        assert_eq!(w.observe(t0 + secs(6), err, true, 1), Change::None);
        assert_eq!(w.observe(t0 + secs(15), err, true, 2), Change::None);
        // Failing for long, but nothing waits.
        assert_eq!(w.observe(t0 + secs(100), err, false, 2), Change::None);
        assert!(!w.is_down());
    }

    #[test]
    fn a_broker_that_never_answers_is_down_after_a_minute_without_acks() {
        let t0 = Instant::now();
        let mut w = DeliveryWatch::new(t0);
        w.observe(t0, None, true, 10);
        assert_eq!(w.observe(t0 + secs(59), None, true, 10), Change::None);
        assert_eq!(
            w.observe(t0 + secs(60), None, true, 10),
            Change::Down {
                why: Why::NotAcknowledging,
                for_: secs(60)
            }
        );
        // Acknowledgements again.
        assert_eq!(
            w.observe(t0 + secs(70), None, true, 11),
            Change::Resumed { after: secs(70) }
        );
        // A slow broker that acknowledges something every 30 s is not down.
        for i in 1..10 {
            assert_eq!(
                w.observe(t0 + secs(70 + 30 * i), None, true, 11 + i),
                Change::None
            );
        }
    }

    #[test]
    fn a_request_that_works_is_not_a_resumption_until_records_are_acknowledged() {
        let t0 = Instant::now();
        let mut w = DeliveryWatch::new(t0);
        let err = Some("refused");
        w.observe(t0, err, true, 7);
        assert!(matches!(
            w.observe(t0 + secs(10), err, true, 7),
            Change::Down { .. }
        ));
        // A metadata answer clears the client's error; nothing delivered.
        assert_eq!(w.observe(t0 + secs(11), None, true, 7), Change::None);
        assert!(w.is_down());
        // The reason follows what is seen now.
        assert_eq!(
            w.observe(t0 + secs(80), None, true, 7),
            Change::None,
            "no second announcement"
        );
        assert_eq!(w.why(), Some(&Why::NotAcknowledging));
        assert_eq!(
            w.observe(t0 + secs(81), None, true, 8),
            Change::Resumed { after: secs(81) }
        );
    }

    #[test]
    fn records_that_start_waiting_after_idle_have_waited_for_no_time() {
        let t0 = Instant::now();
        let mut w = DeliveryWatch::new(t0);
        // Idle for long (observed rarely), then records wait.
        assert_eq!(w.observe(t0 + secs(100), None, false, 0), Change::None);
        assert_eq!(w.observe(t0 + secs(159), None, true, 0), Change::None);
        assert_eq!(w.observe(t0 + secs(218), None, true, 0), Change::None);
        assert!(matches!(
            w.observe(t0 + secs(219), None, true, 0),
            Change::Down {
                why: Why::NotAcknowledging,
                ..
            }
        ));
        // The same, told between observations.
        let mut w = DeliveryWatch::new(t0);
        w.observe(t0 + secs(100), None, false, 0);
        w.start_waiting(t0 + secs(159));
        assert!(w.was_waiting());
        assert_eq!(w.observe(t0 + secs(160), None, true, 0), Change::None);
        assert_eq!(w.observe(t0 + secs(218), None, true, 0), Change::None);
        assert!(matches!(
            w.observe(t0 + secs(219), None, true, 0),
            Change::Down {
                why: Why::NotAcknowledging,
                ..
            }
        ));
    }

    #[test]
    fn draining_everything_ends_an_outage() {
        let t0 = Instant::now();
        let mut w = DeliveryWatch::new(t0);
        let err = Some("refused");
        w.observe(t0, err, true, 0);
        assert!(matches!(
            w.observe(t0 + secs(10), err, true, 0),
            Change::Down { .. }
        ));
        // Records dropped for good (a topic refused) leave nothing waiting.
        assert_eq!(
            w.observe(t0 + secs(20), err, false, 0),
            Change::Resumed { after: secs(20) }
        );
    }

    #[test]
    fn bytes_read_as_an_operator_writes_them() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(12_400_000), "12.4 MB");
        assert_eq!(human_bytes(1_500), "1.5 kB");
        assert_eq!(human_bytes(3_210_000_000), "3.2 GB");
        assert_eq!(human_bytes(999_999), "1.0 MB");
    }
}
