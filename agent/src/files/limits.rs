//! How fast the agent may read: per container (`--container-rate-limit`,
//! the `bpftail.io/rate-limit` annotations) and as a whole (`--max-cpu`).
//!
//! Both are token buckets, kept apart from I/O: the data loop asks before
//! it reads and reports what it read (or the CPU time it used). A
//! container over its limit is read more slowly, never dropped: what it
//! writes beyond the limit waits in its log file.
//!
//! Guarantees: over any span longer than the burst, a container is read at
//! its limit ± one burst (the bucket may go into debt by one read, paid
//! back before the next); the agent's CPU over any span of a few hundred
//! milliseconds stays near `--max-cpu` cores when reading is what uses it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A container's byte budget per second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub bytes_per_s: u64,
    /// The container all its logs count against (pod uid + container, or
    /// a Docker container's id).
    pub container: Arc<str>,
}

/// `BYTES_PER_S`: a number with an optional unit — `k`, `M`, `G` (×1000)
/// or `Ki`, `Mi`, `Gi` (×1024), optionally followed by `B` or `B/s`; `off`
/// or `0` for no limit (`None`).
pub fn parse_rate(value: &str) -> Result<Option<u64>, String> {
    let v = value.trim();
    if v == "off" {
        return Ok(None);
    }
    let v = v
        .strip_suffix("B/s")
        .or_else(|| v.strip_suffix('B'))
        .unwrap_or(v);
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = v.split_at(digits);
    let n: u64 = number.parse().map_err(|_| {
        format!("{value:?}: use a number of bytes per second, like 1000000, 500k or 2Mi")
    })?;
    let scale: u64 = match unit.trim() {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => {
            return Err(format!(
                "{value:?}: unknown unit {other:?} (use k, M, G, Ki, Mi or Gi)"
            ));
        }
    };
    let bytes = n
        .checked_mul(scale)
        .ok_or_else(|| format!("{value:?} is too large"))?;
    Ok((bytes > 0).then_some(bytes))
}

/// The least a bucket holds when full: one read's worth, so a low limit
/// still reads a line at a time, not a byte.
const MIN_BURST: f64 = 64.0 * 1024.0;
/// A full bucket holds this long's worth of the limit.
const BURST: Duration = Duration::from_millis(200);

#[derive(Debug)]
struct Bucket {
    rate: f64,
    /// Bytes that may be read now; negative: debt from the last read.
    tokens: f64,
    at: Instant,
    /// The bucket ran dry since the last [`RateLimits::take_limited`].
    dry: bool,
    /// When its container was last logged as over its limit.
    logged: Option<Instant>,
}

impl Bucket {
    fn burst(&self) -> f64 {
        (self.rate * BURST.as_secs_f64()).max(MIN_BURST)
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst());
        self.at = now;
    }
}

/// Every rate-limited container's bucket.
#[derive(Debug, Default)]
pub struct RateLimits {
    buckets: HashMap<Arc<str>, Bucket>,
}

/// What a container may read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// About this many bytes.
    Bytes(u64),
    /// Nothing before then.
    Wait(Instant),
}

impl RateLimits {
    /// What `limit`'s container may read at `now`.
    pub fn allowance(&mut self, limit: &RateLimit, now: Instant) -> Allowance {
        let rate = limit.bytes_per_s as f64;
        let b = self
            .buckets
            .entry(limit.container.clone())
            .or_insert_with(|| Bucket {
                rate,
                tokens: (rate * BURST.as_secs_f64()).max(MIN_BURST),
                at: now,
                dry: false,
                logged: None,
            });
        b.rate = rate;
        b.refill(now);
        if b.tokens >= 1.0 {
            Allowance::Bytes(b.tokens as u64)
        } else {
            b.dry = true;
            Allowance::Wait(now + Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }

    /// `bytes` of `limit`'s container were read.
    pub fn charge(&mut self, limit: &RateLimit, bytes: u64) {
        if let Some(b) = self.buckets.get_mut(&limit.container) {
            b.tokens -= bytes as f64;
            if b.tokens < 1.0 {
                b.dry = true;
            }
        }
    }

    /// Whether `container` ran into its limit since the last call (and
    /// forgets it); with `log_every`, whether it is due a log line.
    pub fn take_limited(
        &mut self,
        container: &str,
        now: Instant,
        log_every: Duration,
    ) -> (bool, bool) {
        let Some(b) = self.buckets.get_mut(container) else {
            return (false, false);
        };
        let dry = std::mem::take(&mut b.dry);
        let log = dry && b.logged.is_none_or(|at| now >= at + log_every);
        if log {
            b.logged = Some(now);
        }
        (dry, log)
    }

    /// Drops the buckets of containers no followed file belongs to.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.buckets.retain(|c, _| keep(c));
    }
}

/// `--max-cpu`: the agent's own CPU time, paced.
#[derive(Debug)]
pub struct CpuPacer {
    cores: f64,
    /// CPU seconds that may be spent now; negative: spent ahead.
    tokens: f64,
    wall: Instant,
    cpu: Duration,
}

/// How much CPU time may be used ahead of the pace.
const CPU_BURST: Duration = Duration::from_millis(100);
/// The longest reading waits for the pace.
const MAX_DEBT: Duration = Duration::from_secs(1);

impl CpuPacer {
    pub fn new(cores: f64, now: Instant, cpu: Duration) -> CpuPacer {
        CpuPacer {
            cores,
            tokens: CPU_BURST.as_secs_f64() * cores,
            wall: now,
            cpu,
        }
    }

    /// Given the process's CPU time `cpu` at `now`: `None` if reading may go
    /// on, else when it may.
    pub fn wait(&mut self, now: Instant, cpu: Duration) -> Option<Instant> {
        let dt = now.saturating_duration_since(self.wall).as_secs_f64();
        let used = cpu.saturating_sub(self.cpu).as_secs_f64();
        self.wall = now;
        self.cpu = cpu;
        // Debt is bounded: one costly moment (a rescan of many pods) holds
        // reading back for at most a second.
        self.tokens = (self.tokens + dt * self.cores - used).clamp(
            -self.cores * MAX_DEBT.as_secs_f64(),
            CPU_BURST.as_secs_f64() * self.cores,
        );
        (self.tokens < 0.0).then(|| now + Duration::from_secs_f64(-self.tokens / self.cores))
    }
}

/// The CPU time this process has used, all threads.
pub fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_rate("1000"), Ok(Some(1000)));
        assert_eq!(parse_rate("500k"), Ok(Some(500_000)));
        assert_eq!(parse_rate("2Mi"), Ok(Some(2 << 20)));
        assert_eq!(parse_rate("3MB/s"), Ok(Some(3_000_000)));
        assert_eq!(parse_rate("off"), Ok(None));
        assert_eq!(parse_rate("0"), Ok(None));
        assert!(parse_rate("fast").unwrap_err().contains("bytes per second"));
        assert!(parse_rate("5X").unwrap_err().contains("unknown unit"));
        assert!(parse_rate("-5").is_err());
        assert!(parse_rate("99999999999999999999G").is_err());
    }

    #[test]
    fn a_container_is_read_at_its_limit_with_debt_paid_back() {
        let limit = RateLimit {
            bytes_per_s: 1_000_000,
            container: "u/c".into(),
        };
        let mut r = RateLimits::default();
        let t0 = Instant::now();
        let mut now = t0;
        let mut read = 0u64;
        // A reader that always takes 256 KiB when allowed, for 10 s.
        while now < t0 + Duration::from_secs(10) {
            match r.allowance(&limit, now) {
                Allowance::Bytes(_) => {
                    r.charge(&limit, 256 * 1024);
                    read += 256 * 1024;
                }
                Allowance::Wait(until) => {
                    assert!(until > now);
                    now = until;
                }
            }
        }
        let rate = read as f64 / 10.0;
        assert!((rate - 1e6).abs() < 0.05e6, "{rate}");
        let (dry, log) = r.take_limited("u/c", now, Duration::from_secs(600));
        assert!(dry && log);
        assert_eq!(
            r.take_limited("u/c", now, Duration::from_secs(600)),
            (false, false)
        );
        r.retain(|_| false);
        assert_eq!(r.take_limited("u/c", now, Duration::ZERO), (false, false));
    }

    #[test]
    fn the_cpu_pacer_holds_reading_back_to_its_share() {
        let t0 = Instant::now();
        let mut p = CpuPacer::new(0.5, t0, Duration::ZERO);
        // 100 ms of wall time, 100 ms of CPU: 50 ms over half a core,
        // which the burst (100 ms at half a core) covers.
        assert_eq!(
            p.wait(t0 + Duration::from_millis(100), Duration::from_millis(100)),
            None
        );
        // Another 100 ms of CPU in 100 ms: 50 ms ahead, a wait of 100 ms.
        let w = p
            .wait(t0 + Duration::from_millis(200), Duration::from_millis(200))
            .unwrap();
        assert_eq!(w, t0 + Duration::from_millis(300));
        // Idle since: reading may go on.
        assert_eq!(
            p.wait(t0 + Duration::from_millis(400), Duration::from_millis(200)),
            None
        );
    }
}
