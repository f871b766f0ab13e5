//! The in-flight budget: bytes handed to a Kafka client and not yet
//! acknowledged (or, for the native client, held in its batch buffers).
//!
//! Flow control, not a metric: the data loop stops reading while the
//! budget is used up ([`Budget::has_room`]), and the client gives bytes
//! back as Kafka answers. The metric `bpftail_inflight_bytes` only reads
//! it. The data thread takes and the sender thread gives back, so the
//! counter sits alone on its cache lines.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
#[repr(align(128))]
pub struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            limit,
        }
    }

    /// Counts `n` more bytes in flight.
    pub fn take(&self, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` bytes are done with (acknowledged, failed, or freed).
    pub fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Reading may go on: the budget is not used up. (A read that starts
    /// below the limit may end above it, by at most one read buffer.)
    pub fn has_room(&self) -> bool {
        self.used() < self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_until_the_limit_is_reached_and_again_once_bytes_come_back() {
        let b = Budget::new(100);
        assert!(b.has_room());
        b.take(60);
        assert!(b.has_room());
        b.take(60);
        assert!(!b.has_room());
        assert_eq!(b.used(), 120);
        b.give_back(60);
        assert!(b.has_room());
        assert_eq!(std::mem::align_of::<Budget>(), 128);
    }
}
