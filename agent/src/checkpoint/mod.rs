//! Checkpoints: which bytes of which file Kafka has acknowledged, kept across
//! restarts.
//!
//! - [`AckTracker`] turns delivery reports, which may come back in any order,
//!   into the contiguous acknowledged prefix of a file: the offset before
//!   which every record has been delivered.
//! - [`Store`] persists those offsets crash-safely: a versioned JSON document
//!   written to a temp file, fsynced, renamed over the old one, and the
//!   directory fsynced. A crash leaves either the old or the new checkpoint,
//!   never a torn one. The one before the newest is kept too
//!   (`checkpoints.json.prev`): when the newest is damaged anyway (a file
//!   system that lost it, a hand edit, a newer agent's layout), loading
//!   falls back to it, else to no positions at all; both only resend.
//! - [`parse`] is the loader's pure part: bytes in, entries or why not.
//! - [`writer::Writer`] saves snapshots on its own thread, off the data loop.
//!
//! Guarantee: a restored offset is never past a byte whose record was not
//! acknowledged; after a crash the agent resends at most what was
//! acknowledged after the last persisted checkpoint.

pub mod writer;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::fs::ReadAt;

/// Identity of an open file: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
}

/// A hash of a file's first bytes, telling a reused inode from the file that
/// had it before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// How many leading bytes were hashed (grows to [`Fingerprint::MAX_LEN`]
    /// while the file is short).
    pub len: u32,
    /// FNV-1a 64 of those bytes (stable across builds, unlike std's hasher).
    pub hash: u64,
}

impl Fingerprint {
    pub const MAX_LEN: usize = 256;

    pub fn of(bytes: &[u8]) -> Fingerprint {
        let bytes = &bytes[..bytes.len().min(Self::MAX_LEN)];
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Fingerprint {
            len: bytes.len() as u32,
            hash: h,
        }
    }

    /// Reads and hashes the first bytes of `file` (up to `len` of them).
    pub fn read<R: ReadAt + ?Sized>(file: &R, len: usize) -> std::io::Result<Fingerprint> {
        let mut buf = [0u8; Self::MAX_LEN];
        let want = len.min(Self::MAX_LEN);
        let mut got = 0;
        while got < want {
            match file.read_at(&mut buf[got..want], got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        Ok(Fingerprint::of(&buf[..got]))
    }

    pub fn is_complete(&self) -> bool {
        self.len as usize >= Self::MAX_LEN
    }
}

/// A record's slot in [`AckTracker`]'s queue: acknowledged.
const ACKED: u64 = 1 << 63;

/// The contiguous acknowledged prefix of one file.
///
/// Records are registered in file order with the offset the checkpoint may
/// move to once they (and everything before them) are delivered.
///
/// The queues exist only while records are in flight: most of 10,000
/// files have none most of the time, and the two empty queues inline were
/// a size class more for each followed file.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Every byte before this offset belongs to a delivered record (or to
    /// nothing that needs delivering). Only moves forward, except by
    /// [`AckTracker::reset`].
    committed: u64,
    /// Sequence number of the oldest record in flight (of the next one when
    /// none is).
    base_seq: u64,
    /// Where `committed` goes once nothing is in flight: bytes read after
    /// the last record that produced nothing to send (skipped, empty).
    safe_when_drained: u64,
    /// The last read ([`AckTracker::note_read`]), and whether no record
    /// sent since took its time yet.
    last_read: ReadTime,
    last_read_pending: bool,
    queues: Option<Box<Queues>>,
}

#[derive(Debug, Default)]
struct Queues {
    /// For each record sent and not yet folded into `committed`, in send
    /// order: the offset it lets the checkpoint reach, and whether Kafka
    /// has acknowledged it ([`ACKED`], the top bit: offsets are below
    /// 2^63).
    in_flight: VecDeque<u64>,
    /// When the records in flight were read: the first sequence number of
    /// each read that sent any and its time (one entry per read, not per
    /// record); the front one covers the oldest record in flight.
    reads: VecDeque<(u64, ReadTime)>,
}

/// An instant as nanoseconds after a fixed point a day before the process
/// first needed one: a word, where an `Instant` takes two (10,000 files
/// each keep a few).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ReadTime(u64);

impl ReadTime {
    fn anchor() -> Instant {
        static ANCHOR: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(|| {
            let now = Instant::now();
            now.checked_sub(std::time::Duration::from_secs(86_400))
                .unwrap_or(now)
        });
        *ANCHOR
    }

    fn of(t: Instant) -> ReadTime {
        let nanos = t.saturating_duration_since(Self::anchor()).as_nanos();
        ReadTime(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn instant(self) -> Instant {
        Self::anchor() + std::time::Duration::from_nanos(self.0)
    }
}

impl AckTracker {
    pub fn starting_at(offset: u64) -> AckTracker {
        AckTracker {
            committed: offset,
            safe_when_drained: offset,
            ..Default::default()
        }
    }

    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Sequence number of the oldest record in flight (or of the next one).
    pub fn base(&self) -> u64 {
        self.base_seq
    }

    /// True if `seq` was sent since the last reset.
    pub fn is_current(&self, seq: u64) -> bool {
        seq >= self.base_seq && seq < self.base_seq + self.in_flight() as u64
    }

    pub fn in_flight(&self) -> usize {
        self.queues.as_ref().map_or(0, |q| q.in_flight.len())
    }

    /// Registers a record just handed to the producer; returns its sequence
    /// number, to come back with the delivery report.
    pub fn sent(&mut self, commit_to: u64) -> u64 {
        let seq = self.next_seq();
        let q = self.queues.get_or_insert_with(Default::default);
        if self.last_read_pending {
            q.reads.push_back((seq, self.last_read));
            self.last_read_pending = false;
        }
        q.in_flight.push_back(commit_to.min(!ACKED));
        seq
    }

    /// A read at `now` is about to send records: they were read then.
    pub fn note_read(&mut self, now: Instant) {
        self.last_read = ReadTime::of(now);
        self.last_read_pending = true;
    }

    /// When the oldest record in flight was read (as of its read's
    /// [`AckTracker::note_read`]).
    pub fn oldest_read(&self) -> Option<Instant> {
        let q = self.queues.as_ref()?;
        if q.in_flight.is_empty() {
            return None;
        }
        q.reads.front().map(|r| r.1.instant())
    }

    /// The sequence number the next record sent gets.
    pub fn next_seq(&self) -> u64 {
        self.base_seq + self.in_flight() as u64
    }

    /// Lowers the commit target of the records registered from `first` on:
    /// a record that began before them (of another stream being
    /// reassembled, or a multiline record being joined) is still open.
    pub fn cap_from(&mut self, first: u64, safe: u64) {
        let Some(q) = &mut self.queues else {
            return;
        };
        let skip = first.saturating_sub(self.base_seq) as usize;
        for slot in q.in_flight.iter_mut().skip(skip) {
            *slot = (*slot & !ACKED).min(safe) | (*slot & ACKED);
        }
    }

    /// Everything read so far that needs no delivery ends at `safe`.
    pub fn read_to(&mut self, safe: u64) {
        self.safe_when_drained = self.safe_when_drained.max(safe);
        if self.in_flight() == 0 {
            self.committed = self.committed.max(self.safe_when_drained);
        }
    }

    /// Records the acknowledgement of `seq` (reports from before a reset are
    /// ignored) and advances `committed` over the acknowledged prefix.
    pub fn acked(&mut self, seq: u64) {
        let Some(q) = &mut self.queues else {
            return;
        };
        let Some(i) = seq.checked_sub(self.base_seq) else {
            return;
        };
        let Some(slot) = q.in_flight.get_mut(i as usize) else {
            return;
        };
        *slot |= ACKED;
        while let Some(&slot) = q.in_flight.front()
            && slot & ACKED != 0
        {
            self.committed = self.committed.max(slot & !ACKED);
            q.in_flight.pop_front();
            self.base_seq += 1;
        }
        if q.in_flight.is_empty() {
            // Drained: the queues go (a burst grew them to a slot per
            // record), and so do the read times.
            self.committed = self.committed.max(self.safe_when_drained);
            self.queues = None;
            return;
        }
        // Drops the read times no record in flight needs.
        let base = self.base_seq;
        while q.reads.get(1).is_some_and(|r| r.0 <= base) {
            q.reads.pop_front();
        }
    }

    /// Forgets what is in flight and restarts at `offset` (a rewind after a
    /// failed delivery, or a truncated file). Reports for records sent
    /// before are ignored.
    pub fn reset(&mut self, offset: u64) {
        self.base_seq += self.in_flight() as u64;
        self.queues = None;
        self.committed = offset;
        self.safe_when_drained = offset;
    }
}

/// One persisted file position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub key: FileKey,
    pub fingerprint: Fingerprint,
    /// Acknowledged offset: resume reading here.
    pub offset: u64,
    /// Where the file was last seen (informational; identity is key +
    /// fingerprint). Shared with the followed file: a snapshot of 10,000
    /// files copies no path.
    pub path: Arc<Path>,
}

/// The on-disk document; a new layout gets a new variant.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "version")]
enum Document {
    #[serde(rename = "1")]
    V1 { files: Vec<Entry> },
}

/// Why a checkpoint file's bytes cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("written by a newer bpftail (layout version {0}; this one reads version 1)")]
    Newer(String),
}

/// The entries a checkpoint file's bytes hold.
pub fn parse(bytes: &[u8]) -> Result<Vec<Entry>, Unusable> {
    match serde_json::from_slice::<Document>(bytes) {
        Ok(Document::V1 { files }) => Ok(files),
        Err(e) => {
            /// Only the version, to tell a newer layout from damage.
            #[derive(Deserialize)]
            struct Version {
                version: String,
            }
            match serde_json::from_slice::<Version>(bytes) {
                Ok(v) if v.version.parse::<u32>().is_ok_and(|n| n > 1) => {
                    Err(Unusable::Newer(v.version))
                }
                _ => Err(Unusable::Corrupt(e.to_string())),
            }
        }
    }
}

/// What [`Store::load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The positions to resume from, by file identity.
    pub entries: HashMap<FileKey, Entry>,
    /// Set when the newest checkpoint could not be used.
    pub recovery: Option<Recovery>,
}

/// The newest checkpoint was unusable, and what was used instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// What was wrong with it.
    pub problem: String,
    /// Where it was moved, kept for inspection (`None`: it was missing).
    pub moved_to: Option<PathBuf>,
    /// The previous checkpoint was used (else: no positions at all).
    pub used_previous: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "data directory {path} does not exist (--data-dir: create it, or mount the volume that should hold the checkpoints there; a hostPath of type DirectoryOrCreate)"
    )]
    MissingDir { path: PathBuf },
    #[error(
        "data directory {path} is not usable (--data-dir: an existing, writable directory that outlives the agent): {source}"
    )]
    BadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "data directory {path} is not writable (--data-dir: checkpoints are written there): {source}"
    )]
    ReadOnlyDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The checkpoint file in the data directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    path: PathBuf,
    prev: PathBuf,
    tmp: PathBuf,
}

impl Store {
    /// Opens the store in the data directory `dir`; fails if it does not
    /// exist (it is not made: a missing one is a volume that is not
    /// mounted, where checkpoints would not outlive the container) or
    /// cannot be written.
    pub fn open(dir: &Path) -> Result<Store, CheckpointError> {
        let bad = |source| CheckpointError::BadDir {
            path: dir.to_owned(),
            source,
        };
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(bad(std::io::Error::from_raw_os_error(libc::ENOTDIR))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::MissingDir {
                    path: dir.to_owned(),
                });
            }
            Err(e) => return Err(bad(e)),
        }
        let store = Store {
            dir: dir.to_owned(),
            path: dir.join("checkpoints.json"),
            prev: dir.join("checkpoints.json.prev"),
            tmp: dir.join("checkpoints.json.tmp"),
        };
        // Prove now that the directory is writable, not at the first flush.
        let _ = std::fs::remove_file(&store.tmp);
        File::create(&store.tmp)
            .and_then(|_| std::fs::remove_file(&store.tmp))
            .map_err(|source| CheckpointError::ReadOnlyDir {
                path: dir.to_owned(),
                source,
            })?;
        Ok(store)
    }

    /// The file's bytes; `None` if it does not exist.
    fn read(path: &Path) -> Result<Option<Vec<u8>>, CheckpointError> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CheckpointError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The last persisted positions. An unusable newest checkpoint is moved
    /// aside (`checkpoints.json.corrupt`, or `.newer` for a newer layout)
    /// and the previous one is used, or none; [`Loaded::recovery`] says
    /// which. Only a file that cannot be read at all is an error.
    pub fn load(&self) -> Result<Loaded, CheckpointError> {
        let into_map = |files: Vec<Entry>| files.into_iter().map(|e| (e.key, e)).collect();
        let (problem, moved_to) = match Self::read(&self.path)? {
            Some(bytes) => match parse(&bytes) {
                Ok(files) => {
                    return Ok(Loaded {
                        entries: into_map(files),
                        recovery: None,
                    });
                }
                Err(u) => {
                    let suffix = match u {
                        Unusable::Corrupt(_) => "corrupt",
                        Unusable::Newer(_) => "newer",
                    };
                    let aside = self.dir.join(format!("checkpoints.json.{suffix}"));
                    let moved = std::fs::rename(&self.path, &aside).is_ok();
                    (u.to_string(), moved.then_some(aside))
                }
            },
            // Only the previous one: a crash between the two renames of a
            // save, or the newest was removed.
            None => match Self::read(&self.prev)? {
                Some(_) => ("missing, the previous one is there".to_owned(), None),
                None => return Ok(Loaded::default()),
            },
        };
        let previous = Self::read(&self.prev)?.and_then(|b| parse(&b).ok());
        Ok(Loaded {
            recovery: Some(Recovery {
                problem,
                moved_to,
                used_previous: previous.is_some(),
            }),
            entries: previous.map(into_map).unwrap_or_default(),
        })
    }

    /// Replaces the persisted positions with `entries`, crash-safely; the
    /// replaced ones become the previous checkpoint. A failed save leaves
    /// both as they were (and no partial temp file filling the disk).
    pub fn save(&self, entries: Vec<Entry>) -> Result<(), CheckpointError> {
        let result = self.try_save(entries);
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }

    fn try_save(&self, entries: Vec<Entry>) -> Result<(), CheckpointError> {
        let err = |source| CheckpointError::Write {
            path: self.path.clone(),
            source,
        };
        let doc = Document::V1 { files: entries };
        let f = File::create(&self.tmp).map_err(err)?;
        // Streamed: at 10,000 files the document is a megabyte and more,
        // which a buffer would hold twice over while it grew.
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, f);
        serde_json::to_writer(&mut w, &doc)
            .map_err(std::io::Error::from)
            .map_err(err)?;
        let f = w.into_inner().map_err(|e| err(e.into_error()))?;
        f.sync_all().map_err(err)?;
        drop(f);
        match std::fs::rename(&self.path, &self.prev) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        std::fs::rename(&self.tmp, &self.path).map_err(err)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_advances_only_over_the_acknowledged_prefix() {
        let mut t = AckTracker::starting_at(10);
        let a = t.sent(20);
        let b = t.sent(30);
        let c = t.sent(40);
        t.read_to(45);
        t.acked(b);
        assert_eq!(t.committed(), 10);
        t.acked(a);
        assert_eq!(t.committed(), 30);
        t.acked(c);
        // Drained: the trailing bytes that needed no delivery count too.
        assert_eq!(t.committed(), 45);
    }

    #[test]
    fn the_oldest_read_follows_the_oldest_record_in_flight() {
        use std::time::Duration;
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_secs(1), t0 + Duration::from_secs(2));
        let mut t = AckTracker::starting_at(0);
        assert_eq!(t.oldest_read(), None);
        t.note_read(t0);
        let a = t.sent(10);
        let b = t.sent(20);
        // A read that sent nothing, then one that did.
        t.note_read(t1);
        t.note_read(t2);
        let c = t.sent(30);
        assert_eq!(t.oldest_read(), Some(t0));
        t.acked(b);
        assert_eq!(t.oldest_read(), Some(t0), "a is still in flight");
        t.acked(a);
        assert_eq!(t.oldest_read(), Some(t2));
        t.acked(c);
        assert_eq!(t.oldest_read(), None);
        assert!(t.queues.is_none(), "drained: nothing kept");
        t.note_read(t1);
        let d = t.sent(40);
        t.reset(0);
        t.acked(d);
        assert_eq!(t.oldest_read(), None);
        assert!(t.queues.is_none());
        // A record of no noted read has no read time (not the anchor's).
        t.sent(50);
        assert_eq!(t.oldest_read(), None);
    }

    #[test]
    fn a_drained_tracker_gives_back_what_a_burst_took() {
        let mut t = AckTracker::starting_at(0);
        t.note_read(Instant::now());
        let seqs: Vec<u64> = (1..=10_000).map(|i| t.sent(i)).collect();
        assert!(t.queues.as_ref().unwrap().in_flight.capacity() >= 10_000);
        for s in seqs {
            t.acked(s);
        }
        assert_eq!(t.committed(), 10_000);
        assert!(t.queues.is_none(), "drained: the queues are freed");
        // A file reading nothing keeps nothing either.
        t.note_read(Instant::now());
        t.read_to(10_500);
        assert!(t.queues.is_none());
        assert_eq!(t.committed(), 10_500);
    }

    #[test]
    fn reports_from_before_a_reset_are_ignored() {
        let mut t = AckTracker::starting_at(0);
        let a = t.sent(10);
        t.reset(0);
        let b = t.sent(5);
        t.acked(a);
        assert_eq!(t.committed(), 0);
        t.acked(b);
        assert_eq!(t.committed(), 5);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn skipped_bytes_commit_when_nothing_is_in_flight() {
        let mut t = AckTracker::starting_at(0);
        t.read_to(100);
        assert_eq!(t.committed(), 100);
    }

    #[test]
    fn store_round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.load().unwrap().entries.is_empty());
        let e = Entry {
            key: FileKey { dev: 1, ino: 2 },
            fingerprint: Fingerprint::of(b"abc"),
            offset: 42,
            path: Path::new("/var/log/pods/x/0.log").into(),
        };
        store.save(vec![e.clone()]).unwrap();
        store
            .save(vec![Entry {
                offset: 43,
                ..e.clone()
            }])
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.recovery, None);
        assert_eq!(loaded.entries[&e.key].offset, 43);
        let prev = parse(&std::fs::read(dir.path().join("checkpoints.json.prev")).unwrap());
        assert_eq!(prev.unwrap()[0].offset, 42, "the one before is kept");
        assert!(!dir.path().join("checkpoints.json.tmp").exists());
        let text = std::fs::read_to_string(dir.path().join("checkpoints.json")).unwrap();
        assert!(text.starts_with(r#"{"version":"1""#), "{text}");
    }

    fn entry(offset: u64) -> Entry {
        Entry {
            key: FileKey { dev: 1, ino: 2 },
            fingerprint: Fingerprint::of(b"abc"),
            offset,
            path: Path::new("/var/log/pods/x/0.log").into(),
        }
    }

    /// A store with two saves (offsets 10 then 20), whose newest file is
    /// then replaced by `newest` (`None`: removed).
    fn damaged(newest: Option<&[u8]>) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(vec![entry(10)]).unwrap();
        store.save(vec![entry(20)]).unwrap();
        let path = dir.path().join("checkpoints.json");
        match newest {
            Some(b) => std::fs::write(&path, b).unwrap(),
            None => std::fs::remove_file(&path).unwrap(),
        }
        (dir, store)
    }

    #[test]
    fn a_truncated_checkpoint_falls_back_to_the_previous_one_and_is_kept_aside() {
        let good = std::fs::read(damaged(None).0.path().join("checkpoints.json.prev")).unwrap();
        let (dir, store) = damaged(Some(&good[..good.len() / 2]));
        let loaded = store.load().unwrap();
        let r = loaded.recovery.unwrap();
        assert!(r.used_previous);
        assert!(r.problem.starts_with("corrupt: "), "{}", r.problem);
        assert_eq!(
            r.moved_to,
            Some(dir.path().join("checkpoints.json.corrupt"))
        );
        assert_eq!(
            std::fs::read(dir.path().join("checkpoints.json.corrupt")).unwrap(),
            &good[..good.len() / 2]
        );
        assert_eq!(loaded.entries[&entry(0).key].offset, 10);
        // The next save starts a new pair; the previous one stays usable.
        store.save(vec![entry(30)]).unwrap();
        assert_eq!(store.load().unwrap().entries[&entry(0).key].offset, 30);
    }

    #[test]
    fn a_newer_layout_is_told_apart_from_damage() {
        let (dir, store) = damaged(Some(br#"{"version":"2","files":{}}"#));
        let r = store.load().unwrap().recovery.unwrap();
        assert_eq!(
            r.problem,
            "written by a newer bpftail (layout version 2; this one reads version 1)"
        );
        assert_eq!(r.moved_to, Some(dir.path().join("checkpoints.json.newer")));
        for bytes in [
            &br#"{"version":"9"#[..],
            br#"{"version":"x"}"#,
            b"\0\0",
            b"",
        ] {
            assert!(
                matches!(parse(bytes), Err(Unusable::Corrupt(_))),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn with_both_checkpoints_unusable_there_are_no_positions() {
        let (dir, store) = damaged(Some(b"{garbage"));
        std::fs::write(dir.path().join("checkpoints.json.prev"), b"").unwrap();
        let loaded = store.load().unwrap();
        assert!(loaded.entries.is_empty());
        assert!(!loaded.recovery.unwrap().used_previous);
    }

    #[test]
    fn a_missing_newest_checkpoint_with_a_previous_one_uses_it() {
        let (_dir, store) = damaged(None);
        let loaded = store.load().unwrap();
        assert_eq!(loaded.entries[&entry(0).key].offset, 10);
        let r = loaded.recovery.unwrap();
        assert!(r.used_previous && r.moved_to.is_none(), "{r:?}");
    }

    #[test]
    fn a_failed_save_keeps_both_checkpoints_and_leaves_no_temp_file() {
        let (dir, store) = damaged(None);
        store.save(vec![entry(20)]).unwrap();
        // The temp file's name taken by a directory: the save fails at once.
        let tmp = dir.path().join("checkpoints.json.tmp");
        std::fs::create_dir(&tmp).unwrap();
        assert!(store.save(vec![entry(99)]).is_err());
        std::fs::remove_dir(&tmp).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.recovery, None);
        assert_eq!(loaded.entries[&entry(0).key].offset, 20);
        assert!(!tmp.exists());
    }

    #[test]
    fn a_missing_or_unusable_data_directory_is_refused_not_made() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("data");
        let err = Store::open(&missing).unwrap_err();
        assert!(matches!(err, CheckpointError::MissingDir { .. }), "{err}");
        assert!(!missing.exists());
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = Store::open(&file).unwrap_err().to_string();
        assert!(
            err.contains("not usable") && err.contains("--data-dir"),
            "{err}"
        );
    }

    #[test]
    fn fingerprint_depends_on_content_and_length() {
        assert_ne!(Fingerprint::of(b"a"), Fingerprint::of(b"b"));
        assert_eq!(Fingerprint::of(&[7u8; 1000]).len, 256);
    }
}
