//! Checkpoints: which bytes of which file Kafka has acknowledged, kept across
//! restarts.
//!
//! - [`AckTracker`] turns delivery reports, which may come back in any order,
//!   into the contiguous acknowledged prefix of a file: the offset before
//!   which every record has been delivered.
//! - [`Store`] persists those offsets crash-safely: a versioned JSON document
//!   written to a temp file, fsynced, renamed over the old one, and the
//!   directory fsynced. A crash leaves either the old or the new checkpoint,
//!   never a torn one.
//! - [`writer::Writer`] saves snapshots on its own thread, off the data loop.
//!
//! Guarantee: a restored offset is never past a byte whose record was not
//! acknowledged; after a crash the agent resends at most what was
//! acknowledged after the last persisted checkpoint.

pub mod writer;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
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

/// The contiguous acknowledged prefix of one file.
///
/// Records are registered in file order with the offset the checkpoint may
/// move to once they (and everything before them) are delivered.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Every byte before this offset belongs to a delivered record (or to
    /// nothing that needs delivering). Only moves forward, except by
    /// [`AckTracker::reset`].
    committed: u64,
    /// Sequence number of `in_flight[0]`.
    base_seq: u64,
    /// For each record sent and not yet folded into `committed`, in send
    /// order: the offset it lets the checkpoint reach, and whether Kafka has
    /// acknowledged it.
    in_flight: VecDeque<(u64, bool)>,
    /// Where `committed` goes once `in_flight` drains: bytes read after the
    /// last record that produced nothing to send (skipped, empty).
    safe_when_drained: u64,
    /// When the records in flight were read: the first sequence number of
    /// each read and its time (one entry per read, not per record); the
    /// front one covers the oldest record in flight.
    reads: VecDeque<(u64, Instant)>,
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
        seq >= self.base_seq && seq < self.base_seq + self.in_flight.len() as u64
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Registers a record just handed to the producer; returns its sequence
    /// number, to come back with the delivery report.
    pub fn sent(&mut self, commit_to: u64) -> u64 {
        let seq = self.base_seq + self.in_flight.len() as u64;
        self.in_flight.push_back((commit_to, false));
        seq
    }

    /// A read at `now` is about to send records: they were read then.
    pub fn note_read(&mut self, now: Instant) {
        let seq = self.next_seq();
        match self.reads.back_mut() {
            Some(last) if last.0 == seq => last.1 = now,
            _ => self.reads.push_back((seq, now)),
        }
    }

    /// When the oldest record in flight was read (as of its read's
    /// [`AckTracker::note_read`]).
    pub fn oldest_read(&self) -> Option<Instant> {
        if self.in_flight.is_empty() {
            return None;
        }
        self.reads.front().map(|r| r.1)
    }

    /// Drops the read times no record in flight needs.
    fn prune_reads(&mut self) {
        let base = self.base_seq;
        let drained = self.in_flight.is_empty();
        while let Some(&(first, _)) = self.reads.front() {
            let next_covers = self.reads.get(1).is_some_and(|r| r.0 <= base);
            if next_covers || (drained && first < base) {
                self.reads.pop_front();
            } else {
                break;
            }
        }
    }

    /// The sequence number the next record sent gets.
    pub fn next_seq(&self) -> u64 {
        self.base_seq + self.in_flight.len() as u64
    }

    /// Lowers the commit target of the records registered from `first` on:
    /// a record that began before them (of another stream being
    /// reassembled, or a multiline record being joined) is still open.
    pub fn cap_from(&mut self, first: u64, safe: u64) {
        let skip = first.saturating_sub(self.base_seq) as usize;
        for slot in self.in_flight.iter_mut().skip(skip) {
            slot.0 = slot.0.min(safe);
        }
    }

    /// Everything read so far that needs no delivery ends at `safe`.
    pub fn read_to(&mut self, safe: u64) {
        self.safe_when_drained = self.safe_when_drained.max(safe);
        if self.in_flight.is_empty() {
            self.committed = self.committed.max(self.safe_when_drained);
        }
    }

    /// Records the acknowledgement of `seq` (reports from before a reset are
    /// ignored) and advances `committed` over the acknowledged prefix.
    pub fn acked(&mut self, seq: u64) {
        let Some(i) = seq.checked_sub(self.base_seq) else {
            return;
        };
        let Some(slot) = self.in_flight.get_mut(i as usize) else {
            return;
        };
        slot.1 = true;
        while let Some(&(to, true)) = self.in_flight.front() {
            self.committed = self.committed.max(to);
            self.in_flight.pop_front();
            self.base_seq += 1;
        }
        if self.in_flight.is_empty() {
            self.committed = self.committed.max(self.safe_when_drained);
        }
        self.prune_reads();
    }

    /// Forgets what is in flight and restarts at `offset` (a rewind after a
    /// failed delivery, or a truncated file). Reports for records sent
    /// before are ignored.
    pub fn reset(&mut self, offset: u64) {
        self.base_seq += self.in_flight.len() as u64;
        self.in_flight.clear();
        self.reads.clear();
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
    /// fingerprint).
    pub path: PathBuf,
}

/// The on-disk document; a new layout gets a new variant.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "version")]
enum Document {
    #[serde(rename = "1")]
    V1 { files: Vec<Entry> },
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "cannot create data directory {path} (--data-dir: a writable directory for checkpoints): {source}"
    )]
    CreateDir {
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
    #[error(
        "checkpoint {path} is corrupt ({message}); move it away to start from the beginning of every file"
    )]
    Corrupt { path: PathBuf, message: String },
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
    tmp: PathBuf,
}

impl Store {
    /// Opens the store, creating the data directory; fails if it cannot be
    /// written.
    pub fn open(dir: &Path) -> Result<Store, CheckpointError> {
        std::fs::create_dir_all(dir).map_err(|source| CheckpointError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        let store = Store {
            dir: dir.to_owned(),
            path: dir.join("checkpoints.json"),
            tmp: dir.join("checkpoints.json.tmp"),
        };
        // Prove now that the directory is writable, not at the first flush.
        let _ = std::fs::remove_file(&store.tmp);
        File::create(&store.tmp)
            .and_then(|_| std::fs::remove_file(&store.tmp))
            .map_err(|source| CheckpointError::Write {
                path: store.tmp.clone(),
                source,
            })?;
        Ok(store)
    }

    /// The last persisted positions, by file identity.
    pub fn load(&self) -> Result<HashMap<FileKey, Entry>, CheckpointError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
            Err(source) => {
                return Err(CheckpointError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let doc: Document =
            serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Corrupt {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        let Document::V1 { files } = doc;
        Ok(files.into_iter().map(|e| (e.key, e)).collect())
    }

    /// Replaces the persisted positions with `entries`, crash-safely.
    pub fn save(&self, entries: Vec<Entry>) -> Result<(), CheckpointError> {
        let err = |source| CheckpointError::Write {
            path: self.path.clone(),
            source,
        };
        let doc = Document::V1 { files: entries };
        let bytes = serde_json::to_vec(&doc).expect("checkpoint entries serialize");
        let mut f = File::create(&self.tmp).map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
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
        assert!(t.reads.is_empty());
        t.note_read(t1);
        let d = t.sent(40);
        t.reset(0);
        t.acked(d);
        assert_eq!(t.oldest_read(), None);
        assert!(t.reads.is_empty());
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
        assert!(store.load().unwrap().is_empty());
        let e = Entry {
            key: FileKey { dev: 1, ino: 2 },
            fingerprint: Fingerprint::of(b"abc"),
            offset: 42,
            path: "/var/log/pods/x/0.log".into(),
        };
        store.save(vec![e.clone()]).unwrap();
        store
            .save(vec![Entry {
                offset: 43,
                ..e.clone()
            }])
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded[&e.key].offset, 43);
        assert!(!dir.path().join("checkpoints.json.tmp").exists());
        let text = std::fs::read_to_string(dir.path().join("checkpoints.json")).unwrap();
        assert!(text.starts_with(r#"{"version":"1""#), "{text}");
    }

    #[test]
    fn a_corrupt_checkpoint_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("checkpoints.json"), b"{\"version\":\"9\"}").unwrap();
        let err = Store::open(dir.path())
            .unwrap()
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains("corrupt"), "{err}");
    }

    #[test]
    fn fingerprint_depends_on_content_and_length() {
        assert_ne!(Fingerprint::of(b"a"), Fingerprint::of(b"b"));
        assert_eq!(Fingerprint::of(&[7u8; 1000]).len, 256);
    }
}
