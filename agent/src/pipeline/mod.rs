//! The data loop: discovery → change source → tailers → sink, with delivery
//! reports flowing back into checkpoints.
//!
//! This module drives I/O only: it asks [`crate::files`] what to do with a
//! file (open it, read it first, close it), does it, and runs the timers.
//! One thread owns every open file, so file state needs no locks. Each turn
//! of the loop has named phases:
//!
//! 0. `take_reload`: a new configuration, if the control plane sent one
//!    ([`reload`]);
//! 1. `take_changes`: what the change source saw (written paths, rescans);
//! 2. `apply_acks`: delivery reports advance each file's acknowledged prefix
//!    (or rewind a file whose records failed transiently);
//! 3. `read_dirty`: read changed files round-robin, a bounded slice each,
//!    while the in-flight budget allows ([`crate::files::schedule`]);
//! 4. timers: `sweep` (look at every open file: missed writes, rotations,
//!    truncation, partial records to flush, drained files to close),
//!    `joined` (multiline records whose timeout passed), `rescan` (full
//!    discovery, [`scan`]) and `checkpoint`;
//! 5. `rearm`: let the change source report writes again where it
//!    coalesced them off, and read those directories' files once more;
//! 6. sleep until a change, a report or the next timer.
//!
//! Guarantees: a file stays open until everything in it is acknowledged;
//! a checkpoint never names an offset past an unacknowledged record;
//! shutdown stops reading, flushes the producer, then writes the checkpoint.

pub mod delivery;
mod reload;
mod scan;
mod status;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::checkpoint::writer::Writer;
use crate::checkpoint::{Entry, Fingerprint, Store};
use crate::config::Config;
use crate::discover::MetaContext;
use crate::discover::declared::Notes;
use crate::files::lifecycle::{self, Memory};
use crate::files::limits::{self, Allowance, CpuPacer, RateLimits};
use crate::files::pods::{PodGate, RescanThrottle};
use crate::files::schedule::{Next, Schedule};
use crate::files::{FileId, Registry};
use crate::fs::Fs;
use crate::kube::PodCache;
use crate::metrics::{Metrics, RateLimit};
use crate::sink::{Ack, Outcome, Sink};
use crate::tail::{Discard, FileStatus, ReadEnd, Reader, TailedFile};
use crate::watch::{ChangeQueue, ChangeSource, Pending};

/// Size of the reused read buffer.
const READ_BUF: usize = 256 * 1024;
/// Bytes one file may read per turn before the next dirty file's turn.
const READ_QUOTA: u64 = 1 << 20;

/// Files read in one pass between two turns of the sink (and of the
/// acknowledgements): a pass over 10,000 files, at start, otherwise held all
/// its records in open batches until it ended (3 MiB of the peak).
const FILES_PER_TURN: usize = 64;
/// The longest the loop sleeps: each turn proves it alive (`/healthz`).
/// One wakeup per heartbeat is what an idle agent costs.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Full rediscovery, in case a directory event was lost (a lost one is
/// also signalled: queue overflow makes an immediate rescan). With a change
/// source that sees every write, as rarely as [`RESCAN_INTERVAL_TRUSTED`]:
/// a rescan of 1,000 pod directories is most of an idle agent's CPU.
const RESCAN_INTERVAL: Duration = Duration::from_secs(30);
const RESCAN_INTERVAL_TRUSTED: Duration = Duration::from_secs(300);
/// Between full sweeps, the files that need a look
/// ([`lifecycle::needs_look`]: not live, read on, unfinished, recently
/// written) get one this often (or at the sweep interval, if shorter).
const LOOK_INTERVAL: Duration = Duration::from_secs(5);

/// What the checkpoint records of a file.
fn entry(f: &TailedFile) -> Entry {
    Entry {
        key: f.key,
        fingerprint: f.fingerprint,
        offset: f.acks.committed(),
        path: f.path.clone(),
    }
}

/// The part of a file's checkpoint entry that reading can change.
fn position(f: &TailedFile) -> (u64, Fingerprint) {
    (f.acks.committed(), f.fingerprint)
}

/// The loop's timers.
struct Timers {
    /// The next safety sweep: every open file is looked at.
    sweep: Instant,
    rescan: Instant,
    checkpoint: Instant,
}

pub struct Pipeline<S: Sink> {
    cfg: Config,
    fs: Fs,
    metrics: Arc<Metrics>,
    ctx: MetaContext,
    files: Registry,
    schedule: Schedule,
    memory: Memory,
    pods: PodGate,
    /// [`PodCache::generation`] the files' metadata was last rendered at.
    pods_seen: u64,
    pod_rescan: RescanThrottle,
    /// [`crate::discover::declared::signature`] at the last pod rescan.
    declared_signature: u64,
    /// Paths whose refused declarations or skip were logged.
    noted: HashSet<PathBuf>,
    declared_notes: Notes,
    reader: Reader,
    sink: S,
    changes: ChangeQueue,
    wake: Receiver<()>,
    pending: Pending,
    /// Delivery reports being applied (reused buffer).
    acks: Vec<Ack>,
    source: Box<dyn ChangeSource>,
    watched_dirs: HashSet<Arc<Path>>,
    writer: Writer,
    /// [`Registry::generation`] of the last checkpoint handed to the writer.
    saved: Option<u64>,
    /// When the files that need a look between full sweeps get one; none
    /// while every file is settled (an idle agent sleeps until the sweep).
    look_at: Option<Instant>,
    /// The last rescan could not watch some directory: rescans stay
    /// frequent (new files there are found only by them).
    dirs_unwatched: bool,
    /// Files holding an open multiline record, and when the first of those
    /// records is due (its timeout).
    joined: HashSet<FileId>,
    joined_at: Option<Instant>,
    /// Per-container rate limits, the files waiting for theirs, and when
    /// the first may be read.
    limits: RateLimits,
    limited: Vec<(Instant, FileId)>,
    limited_at: Option<Instant>,
    /// `--max-cpu`, and until when reading waits for it.
    pacer: Option<CpuPacer>,
    paced_until: Option<Instant>,
    /// What was at `--pods-dir` and `--docker-dir` at the last rescan.
    roots: [Option<crate::discover::Root>; 2],
    /// Configurations to apply, from the control plane ([`reload`]).
    reloads: Option<Receiver<Box<Config>>>,
    /// Whether records reach Kafka ([`delivery`]), and when to look again.
    delivery: delivery::DeliveryWatch,
    delivery_at: Instant,
    stopping: Arc<AtomicBool>,
    read_errors: RateLimit,
    open_errors: RateLimit,
    /// Paths the last listing could not look at or cut (said once).
    listing_problems: HashSet<PathBuf>,
    /// Listed log paths that cannot be opened or are not regular files
    /// (said and counted once while they are listed).
    unreadable: HashSet<PathBuf>,
    /// The newest checkpoint was unusable and the first complete scan is
    /// not done: what files hold past their start counts as replayed.
    replaying: bool,
}

impl<S: Sink> Pipeline<S> {
    #[expect(
        clippy::too_many_arguments,
        reason = "wiring of the loop's parts, called once"
    )]
    pub fn new(
        cfg: Config,
        metrics: Arc<Metrics>,
        store: Store,
        restored: crate::checkpoint::Loaded,
        sink: S,
        changes: ChangeQueue,
        wake: Receiver<()>,
        source: Box<dyn ChangeSource>,
        stopping: Arc<AtomicBool>,
    ) -> std::io::Result<Pipeline<S>> {
        let ctx = MetaContext {
            topic: cfg.topic.clone(),
            node: cfg.node_name.clone(),
            pods: None,
            labels: cfg.pod_labels.clone(),
            annotations: cfg.pod_annotations.clone(),
            policy: crate::discover::Policy {
                output: cfg.format,
                ship: cfg.ship,
                prefixes: cfg.declaration_prefixes.clone(),
                topic_allow: cfg.topic_allow.clone(),
            },
            multiline: cfg.multiline.clone(),
            rate_limit: cfg.container_rate_limit,
        };
        let reader = Reader::new(READ_BUF, cfg.max_record_bytes + 256);
        let pacer = cfg
            .max_cpu
            .map(|cores| CpuPacer::new(cores, Instant::now(), limits::process_cpu()));
        Ok(Pipeline {
            writer: Writer::start(store, metrics.clone())?,
            cfg,
            fs: Fs::Os,
            metrics,
            ctx,
            files: Registry::default(),
            schedule: Schedule::default(),
            memory: match restored.recovery {
                Some(_) => Memory::after_lost_checkpoint(restored.entries),
                None => Memory::new(restored.entries),
            },
            replaying: restored.recovery.is_some(),
            listing_problems: HashSet::new(),
            unreadable: HashSet::new(),
            pods: PodGate::new(false),
            pods_seen: 0,
            pod_rescan: RescanThrottle::default(),
            declared_signature: 0,
            noted: HashSet::new(),
            declared_notes: Notes::default(),
            reader,
            sink,
            changes,
            wake,
            pending: Pending::default(),
            acks: Vec::new(),
            source,
            watched_dirs: HashSet::new(),
            saved: None,
            look_at: None,
            dirs_unwatched: false,
            joined: HashSet::new(),
            joined_at: None,
            limits: RateLimits::default(),
            limited: Vec::new(),
            limited_at: None,
            pacer,
            paced_until: None,
            reloads: None,
            delivery: delivery::DeliveryWatch::new(Instant::now()),
            delivery_at: Instant::now(),
            roots: [None, None],
            stopping,
            read_errors: RateLimit::new(Duration::from_secs(10)),
            open_errors: RateLimit::new(Duration::from_secs(10)),
        })
    }

    /// Takes pod metadata from `pods` (the Kubernetes list-watch).
    pub fn with_pods(mut self, pods: Arc<PodCache>) -> Self {
        self.ctx.pods = Some(pods);
        self.pods = PodGate::new(true);
        self
    }

    /// Applies the configurations sent on `reloads` (live reconfiguration).
    pub fn with_reloads(mut self, reloads: Receiver<Box<Config>>) -> Self {
        self.reloads = Some(reloads);
        self
    }

    /// Works on `fs` instead of the operating system's file system.
    #[cfg(test)]
    fn with_fs(mut self, fs: Fs) -> Self {
        self.fs = fs;
        self
    }

    /// Runs until `stopping` is set, then shuts down in order.
    pub fn run(mut self) {
        self.rescan();
        let now = Instant::now();
        let mut timers = Timers {
            sweep: now + self.sweep_interval(),
            rescan: now + self.rescan_interval(),
            checkpoint: now + self.cfg.checkpoint_interval,
        };
        while !self.stopping.load(Ordering::Relaxed) {
            self.metrics.beat();
            self.take_reload();
            self.refresh_pods();
            self.take_changes();
            self.apply_acks();
            self.read_dirty();
            self.sink.turn();
            self.run_timers(&mut timers);
            self.check_delivery(Instant::now());
            // Every turn (unless waiting for budget), directories whose
            // write reports were coalesced off are re-armed and their files
            // read once more, so one busy file never hides another's writes.
            let rearmed = !self.schedule.waits_for_budget() && self.rearm();
            let paced = self.paced_until.is_some_and(|t| Instant::now() < t);
            if rearmed
                || (self.schedule.has_dirty() && !paced)
                || (self.schedule.waits_for_budget() && self.sink.has_budget() && !paced)
            {
                continue;
            }
            self.sleep(&timers);
        }
        self.shutdown();
    }

    /// The safety sweep's interval: long when the change source sees every
    /// write.
    fn sweep_interval(&self) -> Duration {
        if self.source.sees_every_write() {
            self.cfg.sweep_interval_trusted
        } else {
            self.cfg.sweep_interval
        }
    }

    /// A missing `--pods-dir` keeps them frequent too: a mount fixed, or
    /// a directory made late, is shipped within [`RESCAN_INTERVAL`].
    fn rescan_interval(&self) -> Duration {
        let pods_dir_missing = self.roots[0]
            .as_ref()
            .is_some_and(|r| *r != crate::discover::Root::Dir);
        if self.source.sees_every_write() && !self.dirs_unwatched && !pods_dir_missing {
            RESCAN_INTERVAL_TRUSTED
        } else {
            RESCAN_INTERVAL
        }
    }

    /// A file needs a look before the next sweep (it was read, opened or
    /// changed status): one is due within [`LOOK_INTERVAL`].
    fn look_soon(&mut self) {
        if self.look_at.is_none() {
            let every = LOOK_INTERVAL.min(self.cfg.sweep_interval);
            self.look_at = Some(Instant::now() + every);
        }
    }

    fn run_timers(&mut self, t: &mut Timers) {
        let now = Instant::now();
        if now >= t.sweep {
            self.sweep_at(now, true);
            t.sweep = now + self.sweep_interval();
        } else if self.look_at.is_some_and(|at| now >= at) {
            self.sweep_at(now, false);
        }
        if self.joined_at.is_some_and(|at| now >= at) {
            self.flush_joined(now);
        }
        if self.limited_at.is_some_and(|at| now >= at) {
            self.release_limited(now);
        }
        let pod_rescan = self.pod_rescan.take_due(now);
        let pod_wait_over = self.pods.deadline().is_some_and(|d| now >= d);
        if now >= t.rescan || pod_rescan || pod_wait_over {
            self.rescan();
            t.rescan = now + self.rescan_interval();
        }
        if now >= t.checkpoint {
            self.apply_acks();
            self.checkpoint();
            t.checkpoint = now + self.cfg.checkpoint_interval;
        }
    }

    /// Sleeps until a change, a delivery report, shutdown or the next timer.
    /// An idle agent sleeps until the sweep: the checkpoint timer only
    /// counts while there is progress to persist (or records in flight,
    /// whose reports only wake the loop when it waits for budget).
    fn sleep(&mut self, t: &Timers) {
        self.apply_acks();
        // Reports wake the loop while files wait for them.
        self.sink
            .eager_acks(self.schedule.waits_for_budget() || self.schedule.has_held());
        let progress =
            self.saved != Some(self.files.generation()) || self.sink.inflight_bytes() > 0;
        let deadline = [
            Some(Instant::now() + HEARTBEAT),
            Some(t.sweep),
            self.look_at,
            self.joined_at,
            self.limited_at,
            self.paced_until,
            Some(t.rescan),
            self.pods.deadline(),
            self.pod_rescan.deadline(),
            Some(self.delivery_at),
            self.sink.deadline(),
            progress.then_some(t.checkpoint),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("the heartbeat is always due");
        let timeout = deadline.saturating_duration_since(Instant::now());
        let _ = self.wake.recv_timeout(timeout);
    }

    /// When the pod cache changed: re-renders the metadata of the files
    /// whose pod changed, and asks for a rescan where files wait for their
    /// pod or the in-container files pods declare changed (not for every
    /// pod status update).
    fn refresh_pods(&mut self) {
        let Some(cache) = &self.ctx.pods else { return };
        let generation = cache.generation();
        if generation == self.pods_seen {
            return;
        }
        self.pods_seen = generation;
        let signature = crate::discover::declared::signature(&cache.live_pods(), &self.ctx);
        if signature != self.declared_signature || self.pods.has_waiting() {
            self.declared_signature = signature;
            self.pod_rescan.request();
        }
        for f in self.files.iter_mut() {
            let Some(meta) = self.ctx.rerender(&f.meta) else {
                continue;
            };
            let meta = Arc::new(meta);
            if meta.suppressed != f.meta.suppressed {
                let why = if meta.excluded {
                    "opted out by bpftail.io/exclude"
                } else {
                    "no longer declared (--ship declared)"
                };
                if meta.suppressed {
                    tracing::info!(path = %f.path.display(), why, "stopped shipping this log; its lines are read and discarded");
                } else {
                    tracing::info!(path = %f.path.display(), "shipping this log again");
                }
            }
            f.meta = meta;
        }
        self.metrics.kube_generation_applied.set(generation);
    }

    fn take_changes(&mut self) {
        self.changes.take(&mut self.pending);
        let mut rescan = self.pending.rescan;
        if self.pending.all_files {
            for id in self.files.ids() {
                self.schedule.mark(id);
            }
        }
        for key in &self.pending.keys {
            if let Some(id) = self.files.by_key(key) {
                self.schedule.mark(id);
            }
        }
        for path in &self.pending.written {
            match self.files.by_path(path) {
                Some(id) => self.schedule.mark(id),
                // A log file we have not discovered yet (its create event
                // is coalesced with the write). Writes to other files (a
                // rotation being compressed) are no news.
                None => {
                    rescan |= path
                        .file_name()
                        .is_some_and(crate::discover::is_live_log_name)
                }
            }
        }
        if rescan {
            self.rescan();
        }
    }

    /// Lets the change source report writes again where it coalesced them
    /// off, and reads once more the files of the directories it re-armed
    /// (what was written just before the re-arm). True if it re-armed any.
    fn rearm(&mut self) -> bool {
        let dirs = self.source.rearm();
        if dirs.is_empty() {
            return false;
        }
        // One set lookup per file (comparing each file with each directory
        // took most of the agent's CPU at 10,000 files under inotify). The
        // paths of files are their directory's, joined: bytes compare.
        let dirs: HashSet<&std::ffi::OsStr> = dirs.iter().map(|d| d.as_os_str()).collect();
        for f in self.files.iter() {
            if f.path
                .parent()
                .is_some_and(|p| dirs.contains(p.as_os_str()))
            {
                self.schedule.mark(f.id);
            }
        }
        self.schedule.has_dirty()
    }

    fn apply_acks(&mut self) {
        let mut acks = std::mem::take(&mut self.acks);
        self.sink.take_acks(&mut acks);
        for &ack in &acks {
            self.apply_ack(ack);
        }
        if !acks.is_empty() {
            self.schedule.release_held();
        }
        self.acks = acks;
    }

    fn apply_ack(&mut self, ack: Ack) {
        let Some(f) = self.files.get_mut(ack.file) else {
            return; // closed since
        };
        let seq = ack.seq_near(f.acks.base());
        let seqs = seq..seq + u64::from(ack.count);
        match ack.outcome {
            Outcome::Delivered | Outcome::Dropped => {
                let before = f.acks.committed();
                for s in seqs {
                    f.acks.acked(s);
                }
                if f.acks.committed() != before {
                    self.files.touch();
                }
            }
            Outcome::Retry => {
                if seqs.into_iter().any(|s| f.acks.is_current(s)) {
                    // Read again from the acknowledged prefix; what was sent
                    // after it may arrive twice (at-least-once).
                    let at = f.acks.committed();
                    f.restart_at(at);
                    self.schedule.mark(ack.file);
                }
            }
        }
    }

    fn read_dirty(&mut self) {
        if self.sink.has_budget() {
            self.schedule.release_backlog();
        }
        let now = Instant::now();
        if let Some(pacer) = &mut self.pacer {
            // `--max-cpu`: ahead of its share, the agent reads nothing until
            // its pace allows (the other phases still run).
            self.paced_until = pacer.wait(now, limits::process_cpu());
            if self.paced_until.is_some() {
                self.metrics.cpu_paced.inc();
                return;
            }
        }
        // One pass over the files dirty now: a file with more to read goes
        // to the back, and the loop's other phases (acks, timers) get their
        // turn even while the reader is behind.
        for n in 0..self.schedule.dirty_len() {
            let Some(id) = self.schedule.next_file() else {
                break;
            };
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            if n > 0 && n % FILES_PER_TURN == 0 {
                // Batches filled so far go out, and what is acknowledged is
                // let go of, while the pass goes on.
                self.apply_acks();
                self.sink.turn();
            }
            let end = match self.may_read(id, now) {
                Ok(quota) => self.read_stream(id, quota),
                Err(end) => end,
            };
            if let ReadEnd::Limited(until) = end
                && !self.limited.iter().any(|&(_, waiting)| waiting == id)
            {
                self.limited.push((until, id));
                self.limited_at = Some(self.limited_at.map_or(until, |at| at.min(until)));
            }
            if self.schedule.after_read(id, &end) == Next::Stop {
                return;
            }
        }
    }

    /// How much of `id`'s container may be read now (its bytes quota), or
    /// why none: its container already has its share of the in-flight
    /// budget (half of it), or is over its rate limit.
    fn may_read(&mut self, id: FileId, now: Instant) -> Result<u64, ReadEnd> {
        let Some(f) = self.files.get(id) else {
            return Err(ReadEnd::Eof);
        };
        if f.meta.suppressed {
            return Ok(READ_QUOTA);
        }
        // What the container's files have read and not had acknowledged,
        // counted only where records are in flight (their reports release
        // the file): an open record alone (a long multiline or partial
        // record) holds nothing back.
        let unacked: u64 = self
            .files
            .predecessors(id)
            .into_iter()
            .chain([id])
            .filter_map(|i| self.files.get(i))
            .filter(|f| f.acks.in_flight() > 0)
            .map(TailedFile::unacked)
            .sum();
        if unacked >= self.cfg.max_inflight_bytes / 2 {
            return Err(ReadEnd::Held);
        }
        let Some(limit) = &f.meta.rate_limit else {
            return Ok(READ_QUOTA);
        };
        match self.limits.allowance(limit, now) {
            Allowance::Bytes(n) => Ok(n.min(READ_QUOTA)),
            Allowance::Wait(until) => {
                self.metrics.rate_limit_waits.inc();
                Err(ReadEnd::Limited(until))
            }
        }
    }

    /// Reads `id` for up to about `quota` bytes, after its stream's older
    /// files (lines of one container stream keep their order across a
    /// rotation: a rotated file is read to its end before the file that
    /// replaced it). Charges what was read to its container's rate limit.
    fn read_stream(&mut self, id: FileId, quota: u64) -> ReadEnd {
        let read_before = self.metrics.bytes_read.get();
        let mut end = ReadEnd::Eof;
        for pred in self.files.predecessors(id) {
            end = self.read_one(pred, quota);
            match end {
                // Its successor is read next: a multiline record it ended
                // inside of goes out first.
                ReadEnd::Eof => self.flush_joined_of(pred, None),
                ReadEnd::Error(_) => {}
                _ => break,
            }
        }
        if matches!(end, ReadEnd::Eof | ReadEnd::Error(_)) {
            end = self.read_one(id, quota);
        }
        let read = self.metrics.bytes_read.get() - read_before;
        if let Some(limit) = self.files.get(id).and_then(|f| f.meta.rate_limit.clone()) {
            self.limits.charge(&limit, read);
        }
        end
    }

    /// The files whose rate limit allows reading again are read.
    fn release_limited(&mut self, now: Instant) {
        self.limited_at = None;
        let mut i = 0;
        while i < self.limited.len() {
            let (until, id) = self.limited[i];
            if until <= now {
                self.limited.swap_remove(i);
                self.schedule.mark(id);
            } else {
                self.limited_at = Some(self.limited_at.map_or(until, |at| at.min(until)));
                i += 1;
            }
        }
    }

    fn read_one(&mut self, id: FileId, quota: u64) -> ReadEnd {
        let Some(f) = self.files.get_mut(id) else {
            return ReadEnd::Eof;
        };
        let before = position(f);
        let mut size = None;
        if self.source.arms_by_stat() {
            // The file's next write makes a kernel event only once its
            // timestamps were queried: stat, then read. A write after the
            // stat makes an event; one before it is seen by this read.
            // Its size tells below whether the read left bytes unread.
            size = f.file.stat().ok().map(|st| st.len);
        }
        let end = if f.meta.suppressed {
            let mut discard = Discard::default();
            let end = self.reader.read(f, &mut discard, &self.metrics, quota);
            discard.settle(f, &self.metrics);
            end
        } else {
            self.reader.read(f, &mut self.sink, &self.metrics, quota)
        };
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
        let moved = position(f) != before;
        let read_on = f.read_offset != f.size_seen;
        // Bytes left at the end (a line without its newline yet): its
        // partial record is due after `--partial-flush-ms` of quiet.
        let tail_left = size.is_some_and(|s| s > f.read_offset);
        if moved {
            self.files.touch();
        }
        if moved || read_on || tail_left {
            self.look_soon();
        }
        self.note_joined(id);
        end
    }

    /// Keeps track of `id` if it holds an open multiline record: it is due
    /// after its rule's timeout.
    fn note_joined(&mut self, id: FileId) {
        let Some(f) = self.files.get(id) else { return };
        let (Some(since), Some(ml)) = (f.decoder.joined_since(), &f.meta.multiline) else {
            return;
        };
        self.joined.insert(id);
        let due = since + ml.timeout;
        self.joined_at = Some(self.joined_at.map_or(due, |at| at.min(due)));
    }

    /// Delivers the multiline records whose timeout passed: no next line
    /// came to end them. A file with bytes still unread is read first (the
    /// quiet may only be the reader being behind).
    fn flush_joined(&mut self, now: Instant) {
        self.joined_at = None;
        for id in std::mem::take(&mut self.joined) {
            let Some(f) = self.files.get(id) else {
                continue;
            };
            let Some(since) = f.decoder.joined_since() else {
                continue;
            };
            let timeout = f
                .meta
                .multiline
                .as_ref()
                .map_or(Duration::ZERO, |ml| ml.timeout);
            let due = since + timeout;
            let again = if now < due {
                Some(due)
            } else if f.file.stat().is_ok_and(|st| st.len > f.read_offset) {
                self.schedule.mark(id);
                Some(now + timeout.max(Duration::from_millis(10)))
            } else {
                self.flush_joined_of(id, now.checked_sub(timeout));
                self.files
                    .get(id)
                    .and_then(|f| f.decoder.joined_since())
                    .map(|since| since + timeout)
            };
            if let Some(due) = again {
                self.joined.insert(id);
                self.joined_at = Some(self.joined_at.map_or(due, |at| at.min(due)));
            }
        }
    }

    /// Delivers `id`'s open multiline records that got no line since
    /// `quiet_since` (all of them: `None`).
    fn flush_joined_of(&mut self, id: FileId, quiet_since: Option<Instant>) {
        let Some(f) = self.files.get_mut(id) else {
            return;
        };
        if f.decoder.joined_since().is_none() {
            return;
        }
        let before = position(f);
        if f.meta.suppressed {
            let mut discard = Discard::default();
            Reader::flush_joined(f, quiet_since, &mut discard, &self.metrics);
            discard.settle(f, &self.metrics);
        } else {
            Reader::flush_joined(f, quiet_since, &mut self.sink, &self.metrics);
        }
        if position(f) != before {
            self.files.touch();
        }
        self.joined.remove(&id);
    }

    /// Changes a file's status (counting a rotation once), and reads it.
    fn set_status(&mut self, id: FileId, status: FileStatus) {
        let Some(f) = self.files.get_mut(id) else {
            return;
        };
        if f.status == status {
            return;
        }
        if lifecycle::counts_rotation(status, f) {
            self.metrics.rotations.inc();
            f.rotation_counted = true;
        }
        tracing::debug!(path = %f.path.display(), from = ?f.status, to = ?status, "file status");
        f.last_activity = Instant::now();
        self.files.set_status(id, status);
        self.schedule.mark(id);
        self.look_soon();
    }

    /// The slow safety net: finds what change events missed, flushes
    /// records stuck at EOF, closes drained files.
    /// The safety sweep (`full`: every open file; a write the change
    /// source missed is found and counted), or a look at the files that
    /// need one between sweeps ([`lifecycle::needs_look`]). At `now`
    /// (tests move time on).
    fn sweep_at(&mut self, now: Instant, full: bool) {
        if full {
            self.source.sweep();
        }
        // Set again below if a file still needs a look (or by the rescan
        // this may start, for the files it changes).
        self.look_at = None;
        let (mut lag, mut close, mut rescan, mut moved) = (0, Vec::new(), false, false);
        // Unread bytes per rate-limited container.
        let mut limited_lag: HashMap<Arc<str>, (u64, Arc<crate::discover::FileMeta>)> =
            HashMap::new();
        // Unread bytes while reading is not held back by the budget: the
        // change source missed a write (or it is a few ms old).
        let freely = !self.schedule.waits_for_budget() && self.sink.has_budget();
        let idle = self.cfg.partial_flush;
        let mut again = false;
        for f in self.files.iter_mut() {
            if let Some(limit) = &f.meta.rate_limit {
                let e = limited_lag
                    .entry(limit.container.clone())
                    .or_insert_with(|| (0, f.meta.clone()));
                e.0 += f.size_seen.saturating_sub(f.read_offset);
            }
            if !full && !lifecycle::needs_look(f, now, idle) {
                lag += f.size_seen.saturating_sub(f.acks.committed());
                continue;
            }
            let Ok(st) = f.file.stat() else {
                again = true;
                continue;
            };
            let size = st.len;
            let look = lifecycle::look(f, size, st.ctime, now, idle, freely);
            again |= lifecycle::needs_look(f, now, idle);
            if look.unread {
                self.schedule.mark(f.id);
            }
            // Between sweeps, growth is a write a few ms old, not a miss.
            if full && look.missed_write {
                self.metrics.sweep_found_bytes.add(size - f.read_offset);
                self.source.missed(f.key);
            }
            lag += size.saturating_sub(f.acks.committed());
            tracing::trace!(path = %f.path.display(), size, read = f.read_offset, committed = f.acks.committed(), in_flight = f.acks.in_flight(), "sweep");
            // Unchanged size and ctime since the last sweep: not written,
            // truncated, renamed or unlinked meanwhile (all set ctime); the
            // periodic rescan still looks at every path.
            if f.status == FileStatus::Live && look.changed {
                match self.fs.stat(&f.path) {
                    Ok(p) if p.dev == f.key.dev && p.ino == f.key.ino => {
                        if f.check_replaced(&self.metrics) {
                            tracing::info!(path = %f.path.display(), "file truncated or replaced in place; reading it from the start");
                            self.schedule.mark(f.id);
                            moved = true;
                        }
                    }
                    _ => rescan = true,
                }
            }
            if look.flush {
                let before = position(f);
                if f.meta.suppressed {
                    let mut discard = Discard::default();
                    self.reader.flush_tail(f, size, &mut discard, &self.metrics);
                    discard.settle(f, &self.metrics);
                } else {
                    self.reader
                        .flush_tail(f, size, &mut self.sink, &self.metrics);
                }
                moved |= position(f) != before;
            }
            if lifecycle::may_close(f, size, look.quiet) {
                close.push(f.id);
            }
        }
        if moved {
            self.files.touch();
        }
        for id in close {
            self.close(id);
        }
        self.metrics.checkpoint_lag_bytes.set(lag);
        self.metrics.files_watched.set(self.files.len() as u64);
        self.note_rate_limited(now, limited_lag, full);
        if rescan || self.memory.waits_for_size() {
            self.rescan();
        }
        if again {
            self.look_soon();
        }
        if full {
            self.metrics.sweeps.inc();
        }
    }

    /// Exports which containers their rate limit held back since the last
    /// look, and the bytes their logs hold unread; logs a container when it
    /// starts being held back (at most every ten minutes each). A full
    /// sweep forgets the buckets of containers no longer followed.
    fn note_rate_limited(
        &mut self,
        now: Instant,
        lag: HashMap<Arc<str>, (u64, Arc<crate::discover::FileMeta>)>,
        full: bool,
    ) {
        const LOG_EVERY: Duration = Duration::from_secs(600);
        let (mut containers, mut bytes) = (0, 0);
        for (container, (unread, meta)) in &lag {
            let (dry, log) = self.limits.take_limited(container, now, LOG_EVERY);
            if !dry {
                continue;
            }
            containers += 1;
            bytes += unread;
            if log {
                let limit = meta.rate_limit.as_ref().map_or(0, |l| l.bytes_per_s);
                tracing::info!(namespace = %meta.namespace(), pod = %meta.pod(), container = %meta.container(), bytes_per_s = limit, unread_bytes = unread, "container writes faster than its rate limit: read at the limit, the rest waits in its log file");
            }
        }
        if full || containers > 0 {
            self.metrics.rate_limited_containers.set(containers);
            self.metrics.rate_limited_lag_bytes.set(bytes);
        }
        if full {
            self.limits.retain(|c| lag.contains_key(c));
        }
    }

    fn close(&mut self, id: FileId) {
        let Some(f) = self.files.remove(id) else {
            return;
        };
        tracing::debug!(path = %f.path.display(), "closing drained file");
        if f.status == FileStatus::Rotated {
            self.memory.closed_rotated(entry(&f));
        }
        self.source.unwatch_file(f.key);
    }

    fn snapshot(&self) -> Vec<Entry> {
        self.files
            .iter()
            .map(entry)
            .chain(self.memory.shipped().cloned())
            .collect()
    }

    fn checkpoint(&mut self) {
        let generation = self.files.generation();
        if self.saved == Some(generation) {
            return;
        }
        if self.writer.offer(self.snapshot()) {
            self.saved = Some(generation);
        }
    }

    /// Stop reading → flush the producer → write the checkpoint. Returns
    /// the sink.
    fn shutdown(mut self) -> S {
        tracing::info!("shutting down: flushing the producer");
        // `stopping` is set: the sink hands on every open batch.
        self.sink.turn();
        let flushed = self.sink.flush(self.cfg.shutdown_timeout);
        self.apply_acks();
        if !flushed {
            tracing::warn!(
                inflight_bytes = self.sink.inflight_bytes(),
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
        self.sink
    }
}
