//! The checkpoint writer thread: fsync latency stays off the data loop.
//!
//! The data loop offers snapshots; the writer saves at most one at a time
//! and the loop offers the next one only once the writer took the last
//! (a busy writer is not queued behind: the next turn offers a newer
//! snapshot). At shutdown [`Writer::finish`] hands the store back for the
//! final, synchronous save.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::{Entry, Store};
use crate::metrics::{Metrics, RateLimit};

pub struct Writer {
    tx: Option<Sender<Vec<Entry>>>,
    thread: Option<std::thread::JoinHandle<Store>>,
}

impl Writer {
    pub fn start(store: Store, metrics: Arc<Metrics>) -> std::io::Result<Writer> {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<Entry>>(1);
        let thread = std::thread::Builder::new()
            .name("bpftail-checkpoint".into())
            .spawn(move || {
                let limit = RateLimit::new(Duration::from_secs(30));
                // Failures since the last good write.
                let mut failures = 0u64;
                for entries in rx {
                    let t = Instant::now();
                    match store.save(entries) {
                        Ok(()) => {
                            metrics.checkpoint_writes.inc();
                            if failures > 0 {
                                tracing::info!(failures, "checkpoint writes succeed again");
                                metrics.checkpoint_failing.set(0);
                                failures = 0;
                            }
                            tracing::debug!(took = ?t.elapsed(), "checkpoint written");
                        }
                        Err(e) => {
                            metrics.checkpoint_errors.inc();
                            metrics.checkpoint_failing.set(1);
                            failures += 1;
                            limit.log(|suppressed| tracing::error!(error = %e, suppressed, "checkpoint write failed: positions stay at the last good checkpoint and shipping goes on; a restart now resends what was delivered since (free space in --data-dir)"));
                        }
                    }
                }
                store
            })?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands a snapshot to the writer; false if it is still busy with the
    /// previous one (the next turn tries again).
    pub fn offer(&self, entries: Vec<Entry>) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(entries).is_ok())
    }

    /// Waits for the writer to finish and returns the store (`None`: the
    /// thread died).
    pub fn finish(&mut self) -> Option<Store> {
        drop(self.tx.take());
        self.thread.take()?.join().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{FileKey, Fingerprint};

    #[test]
    fn offered_snapshots_are_saved_and_the_store_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::default());
        let mut w = Writer::start(store, metrics.clone()).unwrap();
        let entry = Entry {
            key: FileKey { dev: 1, ino: 2 },
            fingerprint: Fingerprint::of(b"x"),
            offset: 7,
            path: std::path::Path::new("/p").into(),
        };
        // The channel holds one snapshot: offer until it is taken.
        while !w.offer(vec![entry.clone()]) {
            std::thread::yield_now();
        }
        let store = w.finish().unwrap();
        assert_eq!(store.load().unwrap().entries[&entry.key], entry);
        assert_eq!(metrics.checkpoint_writes.get(), 1);
    }
}
