//! The data loop: discovery → change source → tailers → sink, with delivery
//! reports flowing back into checkpoints.
//!
//! One thread owns every open file, so file state needs no locks. Each turn
//! of the loop has named phases:
//!
//! 1. `take_changes`: what the change source saw (written paths, rescans);
//! 2. `apply_acks`: delivery reports advance each file's acknowledged prefix
//!    (or rewind a file whose records failed transiently);
//! 3. `read_dirty`: read changed files round-robin, a bounded slice each,
//!    while the in-flight budget allows; files left unread wait in the
//!    backlog until acknowledgements free budget;
//! 4. timers: `sweep` (stat every open file: missed writes, rotations,
//!    truncation, partial records to flush, drained files to close),
//!    `rescan` (full discovery as a safety net) and `checkpoint`;
//! 5. sleep until a change, a report or the next timer.
//!
//! Guarantees: a file stays open until everything in it is acknowledged;
//! a checkpoint never names an offset past an unacknowledged record;
//! shutdown stops reading, flushes the producer, then writes the checkpoint.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::checkpoint::{AckTracker, Entry, FileKey, Fingerprint, Store};
use crate::config::Config;
use crate::discover::{self, Found, MetaContext, Scan};
use crate::metrics::{Metrics, RateLimit};
use crate::sink::{Ack, KafkaSink, Outcome};
use crate::tail::decode::Decoder;
use crate::tail::{FileStatus, ReadEnd, Reader, RecordSink, TailedFile};
use crate::watch::{ChangeQueue, ChangeSource, Pending};

/// Size of the reused read buffer.
const READ_BUF: usize = 256 * 1024;
/// Bytes one file may read per turn before the next dirty file's turn.
const READ_QUOTA: u64 = 1 << 20;
/// Full rediscovery, in case a directory event was lost.
const RESCAN_INTERVAL: Duration = Duration::from_secs(30);
/// File ids travel in 24 bits of the delivery opaque.
const MAX_FILE_ID: u32 = (1 << 24) - 1;

fn entry(f: &TailedFile) -> Entry {
    Entry {
        key: f.key,
        fingerprint: f.fingerprint,
        offset: f.acks.committed(),
        path: f.path.clone(),
    }
}

/// Files waiting to be read, in order, each at most once.
#[derive(Default)]
struct DirtyQueue {
    queue: VecDeque<u32>,
    members: HashSet<u32>,
}

impl DirtyQueue {
    fn push(&mut self, id: u32) {
        if self.members.insert(id) {
            self.queue.push_back(id);
        }
    }
    fn pop(&mut self) -> Option<u32> {
        let id = self.queue.pop_front()?;
        self.members.remove(&id);
        Some(id)
    }
    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
    fn len(&self) -> usize {
        self.queue.len()
    }
}

/// The checkpoint writer thread: fsync latency stays off the data loop.
struct CheckpointWriter {
    tx: Option<crossbeam_channel::Sender<Vec<Entry>>>,
    thread: Option<std::thread::JoinHandle<Store>>,
}

impl CheckpointWriter {
    fn start(store: Store, metrics: Arc<Metrics>) -> std::io::Result<CheckpointWriter> {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<Entry>>(1);
        let thread = std::thread::Builder::new().name("bpftail-checkpoint".into()).spawn(move || {
            let limit = RateLimit::new(Duration::from_secs(30));
            for entries in rx {
                let t = Instant::now();
                match store.save(entries) {
                    Ok(()) => {
                        metrics.checkpoint_writes.inc();
                        tracing::debug!(took = ?t.elapsed(), "checkpoint written");
                    }
                    Err(e) => {
                        metrics.checkpoint_errors.inc();
                        limit.log(|suppressed| tracing::error!(error = %e, suppressed, "checkpoint write failed"));
                    }
                }
            }
            store
        })?;
        Ok(CheckpointWriter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands a snapshot to the writer; false if it is still busy with the
    /// previous one (the next turn tries again).
    fn offer(&self, entries: Vec<Entry>) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(entries).is_ok())
    }

    /// Waits for the writer to finish and returns the store.
    fn finish(&mut self) -> Option<Store> {
        drop(self.tx.take());
        self.thread.take()?.join().ok()
    }
}

pub struct Pipeline {
    cfg: Config,
    metrics: Arc<Metrics>,
    ctx: MetaContext,
    files: HashMap<u32, TailedFile>,
    by_key: HashMap<FileKey, u32>,
    /// Current path of each Live or Rotated file.
    by_path: HashMap<PathBuf, u32>,
    dirty: DirtyQueue,
    /// Files with unread bytes that wait for in-flight budget.
    backlog: DirtyQueue,
    /// Rotated or vanished files still open, by container stream (Kafka
    /// key), oldest first: each is read to its end before any newer file of
    /// its stream.
    retired: HashMap<Box<[u8]>, Vec<u32>>,
    next_id: u32,
    /// Positions from the last checkpoint, consumed by the first scan.
    restored: HashMap<FileKey, Entry>,
    /// Rotated files read to their end and closed, while they stay on disk
    /// (so a rescan does not ship them again); checkpointed too.
    finished: HashMap<FileKey, Entry>,
    /// The first scan is done: rotated files that appear now are rotations
    /// we did not see happen, and are read.
    started: bool,
    reader: Reader,
    sink: KafkaSink,
    changes: ChangeQueue,
    wake: Receiver<()>,
    pending: Pending,
    /// Delivery reports being applied (reused buffer).
    acks: Vec<Ack>,
    source: Box<dyn ChangeSource>,
    watched_dirs: HashSet<PathBuf>,
    writer: CheckpointWriter,
    /// Sum of committed offsets at the last checkpoint (skip unchanged ones).
    last_saved: Option<(u64, usize)>,
    stopping: Arc<AtomicBool>,
    read_errors: RateLimit,
    open_errors: RateLimit,
}

impl Pipeline {
    #[expect(
        clippy::too_many_arguments,
        reason = "wiring of the loop's parts, called once"
    )]
    pub fn new(
        cfg: Config,
        metrics: Arc<Metrics>,
        store: Store,
        restored: HashMap<FileKey, Entry>,
        sink: KafkaSink,
        changes: ChangeQueue,
        wake: Receiver<()>,
        source: Box<dyn ChangeSource>,
        stopping: Arc<AtomicBool>,
    ) -> std::io::Result<Pipeline> {
        let ctx = MetaContext {
            topic: cfg.topic.clone(),
            node: cfg.node_name.clone(),
        };
        let reader = Reader::new(READ_BUF, cfg.max_record_bytes + 256);
        Ok(Pipeline {
            writer: CheckpointWriter::start(store, metrics.clone())?,
            cfg,
            metrics,
            ctx,
            files: HashMap::new(),
            by_key: HashMap::new(),
            by_path: HashMap::new(),
            dirty: DirtyQueue::default(),
            backlog: DirtyQueue::default(),
            retired: HashMap::new(),
            next_id: 1,
            restored,
            finished: HashMap::new(),
            started: false,
            reader,
            sink,
            changes,
            wake,
            pending: Pending::default(),
            acks: Vec::new(),
            source,
            watched_dirs: HashSet::new(),
            last_saved: None,
            stopping,
            read_errors: RateLimit::new(Duration::from_secs(10)),
            open_errors: RateLimit::new(Duration::from_secs(10)),
        })
    }

    /// Runs until `stopping` is set, then shuts down in order.
    pub fn run(mut self) {
        self.rescan();
        // Checkpointed files that are gone are forgotten now.
        self.restored = HashMap::new();
        let now = Instant::now();
        let mut next_sweep = now + self.cfg.sweep_interval;
        let mut next_rescan = now + RESCAN_INTERVAL;
        let mut next_checkpoint = now + self.cfg.checkpoint_interval;
        while !self.stopping.load(Ordering::Relaxed) {
            self.metrics.beat();
            self.take_changes();
            self.apply_acks();
            self.read_dirty();

            let now = Instant::now();
            if now >= next_sweep {
                self.sweep();
                next_sweep = now + self.cfg.sweep_interval;
            }
            if now >= next_rescan {
                self.rescan();
                next_rescan = now + RESCAN_INTERVAL;
            }
            if now >= next_checkpoint {
                self.apply_acks();
                self.checkpoint();
                next_checkpoint = now + self.cfg.checkpoint_interval;
            }
            if !self.dirty.is_empty() || (!self.backlog.is_empty() && self.sink.has_budget()) {
                continue;
            }
            let deadline = next_sweep.min(next_rescan).min(next_checkpoint);
            let timeout = deadline.saturating_duration_since(Instant::now());
            // Woken by a change, a delivery report, or shutdown.
            let _ = self.wake.recv_timeout(timeout);
        }
        self.shutdown();
    }

    fn take_changes(&mut self) {
        self.changes.take(&mut self.pending);
        let mut rescan = self.pending.rescan;
        if self.pending.all_files {
            for &id in self.files.keys() {
                self.dirty.push(id);
            }
        }
        for path in &self.pending.written {
            match self.by_path.get(path) {
                Some(&id) => self.dirty.push(id),
                // A file we have not discovered yet (its create event is
                // coalesced with the write).
                None => rescan = true,
            }
        }
        if rescan {
            self.rescan();
        }
    }

    fn apply_acks(&mut self) {
        let mut acks = std::mem::take(&mut self.acks);
        self.sink.take_acks(&mut acks);
        for &ack in &acks {
            self.apply_ack(ack);
        }
        self.acks = acks;
    }

    fn apply_ack(&mut self, ack: Ack) {
        let Some(f) = self.files.get_mut(&ack.file) else {
            return; // closed since
        };
        let seq = ack.seq_near(f.acks.base());
        match ack.outcome {
            Outcome::Delivered | Outcome::Dropped => f.acks.acked(seq),
            Outcome::Retry => {
                if f.acks.is_current(seq) {
                    // Read again from the acknowledged prefix; what was sent
                    // after it may arrive twice (at-least-once).
                    let at = f.acks.committed();
                    f.restart_at(at);
                    self.dirty.push(ack.file);
                }
            }
        }
    }

    fn read_dirty(&mut self) {
        if self.sink.has_budget() {
            while let Some(id) = self.backlog.pop() {
                self.dirty.push(id);
            }
        }
        // One pass over the files dirty now: a file with more to read goes
        // to the back, and the loop's other phases (acks, timers) get their
        // turn even while the reader is behind.
        for _ in 0..self.dirty.len() {
            let Some(id) = self.dirty.pop() else { break };
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            // Lines of one container stream keep their order across a
            // rotation: a rotated file is read to its end before the file
            // that replaced it.
            let mut end = ReadEnd::Eof;
            for pred in self.predecessors(id) {
                end = self.read_one(pred, u64::MAX);
                if matches!(end, ReadEnd::Budget) {
                    break;
                }
            }
            if !matches!(end, ReadEnd::Budget) {
                end = self.read_one(id, READ_QUOTA);
            }
            match end {
                ReadEnd::Quota => self.dirty.push(id),
                ReadEnd::Budget => {
                    self.backlog.push(id);
                    while let Some(id) = self.dirty.pop() {
                        self.backlog.push(id);
                    }
                    return;
                }
                _ => {}
            }
        }
    }

    /// Older files of the same container stream as `id`, oldest first: all
    /// retired ones for a live file, those retired before it for a retired
    /// one.
    fn predecessors(&self, id: u32) -> Vec<u32> {
        let Some(f) = self.files.get(&id) else {
            return Vec::new();
        };
        let Some(ids) = self.retired.get(&f.meta.key) else {
            return Vec::new();
        };
        ids.iter().copied().take_while(|&p| p != id).collect()
    }

    fn read_one(&mut self, id: u32, quota: u64) -> ReadEnd {
        let Some(f) = self.files.get_mut(&id) else {
            return ReadEnd::Eof;
        };
        let end = self.reader.read(f, &mut self.sink, &self.metrics, quota);
        if let ReadEnd::Error(e) = &end {
            self.metrics.read_errors.inc();
            let path = f.path.display().to_string();
            self.read_errors
                .log(|suppressed| tracing::warn!(path, error = %e, suppressed, "read failed"));
        }
        // A short file's fingerprint grows with it, up to MAX_LEN bytes.
        if (f.fingerprint.len as u64) < f.read_offset
            && !f.fingerprint.is_complete()
            && let Ok(fp) = Fingerprint::read(&f.file, Fingerprint::MAX_LEN)
        {
            f.fingerprint = fp;
        }
        end
    }

    /// Changes a file's status, keeping `retired` in step.
    fn set_status(&mut self, id: u32, status: FileStatus) {
        let Some(f) = self.files.get_mut(&id) else {
            return;
        };
        if f.status == status {
            return;
        }
        if f.status == FileStatus::Live && status == FileStatus::Rotated {
            self.metrics.rotations.inc();
        }
        f.status = status;
        f.last_activity = Instant::now();
        let ids = self.retired.entry(f.meta.key.clone()).or_default();
        ids.retain(|&i| i != id);
        if status != FileStatus::Live {
            ids.push(id);
        }
        if ids.is_empty() {
            self.retired.remove(&f.meta.key);
        }
        self.dirty.push(id);
    }

    /// Full discovery: opens new files, notices renames and disappearances,
    /// keeps the change source watching every log directory.
    fn rescan(&mut self) {
        let mut scan = Scan::default();
        // Watch new directories before trusting the listing, then list again
        // so nothing created in between is missed.
        for _ in 0..3 {
            scan = Scan::default();
            discover::scan_docker_dir(&self.cfg.docker_dir, &mut scan);
            discover::scan_pods_dir(&self.cfg.pods_dir, &mut scan);
            let mut added = false;
            for dir in &scan.dirs {
                if !self.watched_dirs.contains(dir) {
                    match self.source.watch_dir(dir) {
                        Ok(()) => {
                            self.watched_dirs.insert(dir.clone());
                            added = true;
                        }
                        Err(e) => {
                            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; the sweep covers it")
                        }
                    }
                }
            }
            if !added {
                break;
            }
        }
        let present: HashSet<&PathBuf> = scan.dirs.iter().collect();
        let gone: Vec<PathBuf> = self
            .watched_dirs
            .iter()
            .filter(|d| !present.contains(d))
            .cloned()
            .collect();
        for d in gone {
            self.source.unwatch_dir(&d);
            self.watched_dirs.remove(&d);
        }
        for (path, e) in &scan.errors {
            tracing::warn!(path = %path.display(), error = %e, "cannot list directory");
        }

        let mut seen = HashSet::new();
        let mut present = HashSet::new();
        for found in scan.files {
            if let Some(id) = self.track(found, &mut present) {
                seen.insert(id);
            }
        }
        // Shipped rotations stay remembered while they are on disk.
        self.finished.retain(|k, _| present.contains(k));
        self.started = true;
        let vanished: Vec<u32> = self
            .files
            .iter()
            .filter(|(id, f)| !seen.contains(*id) && f.status != FileStatus::Gone)
            .map(|(&id, _)| id)
            .collect();
        for id in vanished {
            // Drain what the open descriptor still holds, then close.
            self.set_status(id, FileStatus::Gone);
        }
        self.by_path = self
            .files
            .iter()
            .filter(|(_, f)| f.status != FileStatus::Gone)
            .map(|(&id, f)| (f.path.clone(), id))
            .collect();
        self.metrics.files_watched.set(self.files.len() as u64);
    }

    /// Follows a discovered file; returns its id if it is being read.
    fn track(&mut self, found: Found, present: &mut HashSet<FileKey>) -> Option<u32> {
        let md = std::fs::metadata(&found.path).ok()?;
        if !md.is_file() {
            // A FIFO or device where a log should be: opening it could block.
            return None;
        }
        let key = FileKey {
            dev: md.dev(),
            ino: md.ino(),
        };
        present.insert(key);
        let status = if found.rotated {
            FileStatus::Rotated
        } else {
            FileStatus::Live
        };
        if let Some(&id) = self.by_key.get(&key) {
            let f = self.files.get_mut(&id)?;
            if f.path != found.path {
                f.path = found.path;
                f.last_activity = Instant::now();
                self.dirty.push(id);
            }
            self.set_status(id, status);
            return Some(id);
        }
        if found.rotated && self.finished.contains_key(&key) {
            return None; // shipped and closed
        }
        let restored = self
            .restored
            .remove(&key)
            .or_else(|| self.finished.remove(&key));
        if found.rotated && restored.is_none() && !self.started {
            // A rotation from before our time that no checkpoint asks for.
            // (One that appears while running is a live file renamed before
            // we saw it: it is read.)
            return None;
        }
        let file = match File::options()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOATIME | libc::O_NONBLOCK)
            .open(&found.path)
            .or_else(|_| File::open(&found.path))
        {
            Ok(f) => f,
            Err(e) => {
                self.metrics.open_errors.inc();
                let path = found.path.display().to_string();
                self.open_errors.log(|suppressed| tracing::warn!(path, error = %e, suppressed, "cannot open log file"));
                return None;
            }
        };
        // Identity of what was opened, not of what was stat'ed before.
        let md = file.metadata().ok().filter(|m| m.is_file())?;
        let key = FileKey {
            dev: md.dev(),
            ino: md.ino(),
        };
        if self.by_key.contains_key(&key) {
            return None;
        }
        let restored = restored.or_else(|| self.restored.remove(&key));
        let meta = Arc::new(self.ctx.render(found.origin, found.format));
        let mut late_rotation = false;
        let offset = match restored {
            Some(e)
                if e.offset <= md.len()
                    && Fingerprint::read(&file, e.fingerprint.len as usize).ok()
                        == Some(e.fingerprint) =>
            {
                e.offset
            }
            Some(_) => {
                tracing::info!(path = %found.path.display(), "checkpointed inode now holds another file; reading it from the start");
                0
            }
            None if found.rotated => match self.copied_from(&meta.key, &file) {
                // copytruncate: only what we had not read of the original
                // (the copy may still be being written: it can be shorter).
                Some(read) => read,
                // Rotated before we saw it live: still a rotation.
                None => {
                    late_rotation = true;
                    0
                }
            },
            None => 0,
        };
        let id = self.alloc_id()?;
        let fingerprint =
            Fingerprint::read(&file, Fingerprint::MAX_LEN).unwrap_or(Fingerprint::of(b""));
        tracing::debug!(path = %found.path.display(), offset, id, rotated = found.rotated, "following file");
        self.files.insert(
            id,
            TailedFile {
                id,
                key,
                file,
                path: found.path,
                decoder: Decoder::new(meta.format, self.cfg.max_record_bytes),
                meta,
                read_offset: offset,
                skipping: false,
                acks: AckTracker::starting_at(offset),
                fingerprint,
                status,
                before_truncation: None,
                size_seen: md.len(),
                last_activity: Instant::now(),
            },
        );
        if late_rotation {
            self.metrics.rotations.inc();
        }
        if status != FileStatus::Live {
            self.retired
                .entry(self.files[&id].meta.key.clone())
                .or_default()
                .push(id);
        }
        self.by_key.insert(key, id);
        self.dirty.push(id);
        Some(id)
    }

    /// If `copy` is a copy of a file of the same container stream that we
    /// read (logrotate's copytruncate), returns how far we had read that
    /// file before it was truncated.
    fn copied_from(&self, stream_key: &[u8], copy: &File) -> Option<u64> {
        self.files
            .values()
            .filter(|f| &*f.meta.key == stream_key)
            .flat_map(|f| {
                [(f.fingerprint, f.read_offset)]
                    .into_iter()
                    .chain(f.before_truncation)
            })
            .find(|(fp, _)| {
                fp.len > 0 && Fingerprint::read(copy, fp.len as usize).ok() == Some(*fp)
            })
            .map(|(_, read)| read)
    }

    fn alloc_id(&mut self) -> Option<u32> {
        for _ in 0..=MAX_FILE_ID {
            let id = self.next_id;
            self.next_id = if self.next_id >= MAX_FILE_ID {
                1
            } else {
                self.next_id + 1
            };
            if !self.files.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// The slow safety net: finds what change events missed, flushes
    /// records stuck at EOF, closes drained files.
    fn sweep(&mut self) {
        let now = Instant::now();
        let idle = self.cfg.partial_flush;
        let mut lag = 0;
        let mut close = Vec::new();
        let mut rescan = false;
        for (&id, f) in &mut self.files {
            let Ok(md) = f.file.metadata() else { continue };
            let size = md.len();
            if size != f.read_offset {
                self.dirty.push(id);
            }
            if size != f.size_seen {
                f.size_seen = size;
                f.last_activity = now;
            }
            lag += size.saturating_sub(f.acks.committed());
            tracing::trace!(
                path = %f.path.display(),
                size,
                read = f.read_offset,
                committed = f.acks.committed(),
                in_flight = f.acks.in_flight(),
                "sweep"
            );
            if f.status == FileStatus::Live {
                match std::fs::metadata(&f.path) {
                    Ok(p) if p.dev() == f.key.dev && p.ino() == f.key.ino => {
                        // Same file: were its first bytes rewritten (truncated
                        // and refilled past our offset between two looks)?
                        if f.fingerprint.is_complete()
                            && Fingerprint::read(&f.file, Fingerprint::MAX_LEN)
                                .is_ok_and(|fp| fp != f.fingerprint)
                        {
                            tracing::info!(path = %f.path.display(), "file content replaced in place; reading it from the start");
                            f.truncated(&self.metrics);
                            self.dirty.push(id);
                        }
                    }
                    _ => rescan = true,
                }
            }
            let quiet = now.duration_since(f.last_activity) >= idle;
            if quiet && !f.skipping && (size > f.read_offset || f.decoder.has_pending()) {
                // The file ended inside a record and nothing came for a
                // while: the writer is gone or stuck; deliver what there is.
                self.reader
                    .flush_tail(f, size, &mut self.sink, &self.metrics);
            }
            if quiet
                && f.status != FileStatus::Live
                && size == f.read_offset
                && f.acks.committed() >= size
                && f.acks.in_flight() == 0
                && !f.decoder.has_pending()
            {
                close.push(id);
            }
        }
        for id in close {
            if let Some(f) = self.files.remove(&id) {
                tracing::debug!(path = %f.path.display(), "closing drained file");
                if f.status == FileStatus::Rotated {
                    self.finished.insert(f.key, entry(&f));
                }
                self.by_key.remove(&f.key);
                self.by_path.remove(&f.path);
                if let Some(ids) = self.retired.get_mut(&f.meta.key) {
                    ids.retain(|&i| i != id);
                    if ids.is_empty() {
                        self.retired.remove(&f.meta.key);
                    }
                }
            }
        }
        self.metrics.checkpoint_lag_bytes.set(lag);
        self.metrics.files_watched.set(self.files.len() as u64);
        if rescan {
            self.rescan();
        }
    }

    fn snapshot(&self) -> Vec<Entry> {
        self.files
            .values()
            .map(entry)
            .chain(self.finished.values().cloned())
            .collect()
    }

    fn checkpoint(&mut self) {
        let sum = self
            .files
            .values()
            .map(|f| f.acks.committed())
            .fold(0u64, u64::wrapping_add);
        let state = (sum, self.files.len());
        if self.last_saved == Some(state) {
            return;
        }
        if self.writer.offer(self.snapshot()) {
            self.last_saved = Some(state);
        }
    }

    /// Stop reading → flush the producer → write the checkpoint.
    fn shutdown(mut self) {
        tracing::info!("shutting down: flushing the producer");
        let flushed = self.sink.flush(self.cfg.shutdown_timeout);
        self.apply_acks();
        if !flushed {
            tracing::warn!(
                inflight_bytes = self.metrics.inflight_bytes.get(),
                "Kafka did not acknowledge everything in time; the rest is sent again at the next start"
            );
        }
        let entries = self.snapshot();
        match self.writer.finish() {
            Some(store) => match store.save(entries) {
                Ok(()) => tracing::info!(files = self.files.len(), "checkpoint written"),
                Err(e) => tracing::error!(error = %e, "final checkpoint failed"),
            },
            None => tracing::error!("checkpoint writer died; final checkpoint not written"),
        }
    }
}
