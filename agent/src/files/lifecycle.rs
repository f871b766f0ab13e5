//! The decisions of a file's life, without I/O: whether a file a listing
//! found is followed and from where, what a sweep's look at a followed file
//! means, when a file may close, and what counts as a rotation.
//!
//! The data loop gathers the facts (stat, open, the first bytes of a file)
//! and does what these functions decide. Facts that cost a read are asked
//! for only when a decision needs them ([`Looks`]).
//!
//! A file's life: found under its live name → `Live` (read as it grows) →
//! renamed to a rotated name → `Rotated`, or gone from every listed path →
//! `Gone` (both read to their end from the open descriptor) → closed once
//! drained, acknowledged and quiet. A rotated file closed while still on
//! disk is remembered ([`Memory`]) so that it is not shipped again.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::checkpoint::{Entry, FileKey, Fingerprint};
use crate::tail::{FileStatus, TailedFile};

/// What is remembered of files that are not open: positions from the last
/// checkpoint not claimed yet, rotated files shipped and closed, and short
/// rotated files that wait for their size to hold still.
#[derive(Debug, Default)]
pub struct Memory {
    /// Positions from the last checkpoint, claimed by the files they name.
    restored: HashMap<FileKey, Entry>,
    /// Rotated files read to their end and closed, while they stay on disk
    /// (so a rescan does not ship them again); checkpointed too.
    finished: HashMap<FileKey, Entry>,
    /// Rotated files too short to fingerprint, not followed yet: their
    /// size at the last look.
    short_rotated: HashMap<FileKey, u64>,
    /// The first scan is done: rotated files that appear now are rotations
    /// we did not see happen, and are read.
    started: bool,
}

/// What to do with a file a listing found that is not followed yet.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Not to be read: a rotated file already shipped, or a rotation from
    /// before the agent started that no checkpoint asks for.
    Ignore,
    /// May be followed, with its checkpoint entry if it has one.
    Consider(Option<Entry>),
}

/// Where reading a newly opened file starts.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    At(u64),
    /// The checkpointed inode now holds another file: from the start.
    Replaced,
    /// A file rotated before it was seen live: still a rotation, read from
    /// the start.
    LateRotation,
    /// Not yet: an empty rotated file (a copy about to be written), or a
    /// short one that may be a copy still being written, until its size
    /// holds still between two looks.
    Later,
}

/// Facts about an opened file that a [`Memory::start`] decision may need.
pub trait Looks {
    /// Its size.
    fn size(&self) -> u64;
    /// Its first bytes hash to the entry's fingerprint.
    fn matches(&self, e: &Entry) -> bool;
    /// It is a copytruncate copy of a file of its stream: how far that file
    /// had been read ([`crate::files::identity::copied_from`]).
    fn copied_from(&self) -> Option<u64>;
    /// It may be a copy still being written
    /// ([`crate::files::identity::maybe_copy`]).
    fn maybe_copy(&self) -> bool;
}

impl Memory {
    pub fn new(restored: HashMap<FileKey, Entry>) -> Memory {
        Memory {
            restored,
            ..Default::default()
        }
    }

    /// Positions from a checkpoint that replaced a lost newer one (or none
    /// at all): rotated files it does not name may hold lines never
    /// shipped, so they are read from their start like rotations seen while
    /// running, even in the first scan.
    pub fn after_lost_checkpoint(restored: HashMap<FileKey, Entry>) -> Memory {
        Memory {
            started: true,
            ..Memory::new(restored)
        }
    }

    /// A file not followed, found under a rotated name (`rotated`) or its
    /// live one, whose identity is `key`.
    pub fn admit(&mut self, key: FileKey, rotated: bool) -> Admit {
        if rotated && self.finished.contains_key(&key) {
            return Admit::Ignore;
        }
        let restored = self
            .restored
            .remove(&key)
            .or_else(|| self.finished.remove(&key));
        if rotated && restored.is_none() && !self.started {
            // (One that appears while running is a live file renamed
            // before we saw it: it is read.)
            return Admit::Ignore;
        }
        Admit::Consider(restored)
    }

    /// Gives back an entry [`Memory::admit`] handed out for a file that is
    /// not opened yet (it waits for its pod): it keeps its place.
    pub fn keep(&mut self, key: FileKey, e: Entry) {
        self.restored.insert(key, e);
    }

    /// The checkpoint entry of what was opened (its identity may differ
    /// from what was listed, if the path changed in between).
    pub fn claim(&mut self, key: FileKey) -> Option<Entry> {
        self.restored.remove(&key)
    }

    /// Where a file opened just now starts.
    pub fn start(
        &mut self,
        key: FileKey,
        restored: Option<&Entry>,
        rotated: bool,
        looks: &impl Looks,
    ) -> Start {
        let len = looks.size();
        match restored {
            Some(e) if e.offset <= len && looks.matches(e) => Start::At(e.offset),
            Some(_) => Start::Replaced,
            None if !rotated => Start::At(0),
            None if len == 0 => Start::Later,
            None => match looks.copied_from() {
                // copytruncate: only what we had not read of the original
                // (the copy may still be being written: it can be shorter).
                Some(read) => Start::At(read),
                None if len < Fingerprint::MAX_LEN as u64
                    && looks.maybe_copy()
                    && self.short_rotated.insert(key, len) != Some(len) =>
                {
                    Start::Later
                }
                None => Start::LateRotation,
            },
        }
    }

    /// A rotated file was read to its end and closed.
    pub fn closed_rotated(&mut self, e: Entry) {
        self.finished.insert(e.key, e);
    }

    /// After a scan that saw the files `present`: forgets what is no longer
    /// on disk, and short rotated files now followed. Checkpointed files
    /// that are gone are forgotten once a scan could find them all
    /// (`complete`: in-container files are only found once the pod list
    /// has arrived).
    pub fn after_scan(
        &mut self,
        present: &HashSet<FileKey>,
        followed: impl Fn(&FileKey) -> bool,
        complete: bool,
    ) {
        self.finished.retain(|k, _| present.contains(k));
        self.short_rotated
            .retain(|k, _| present.contains(k) && !followed(k));
        self.started = true;
        if complete && !self.restored.is_empty() {
            self.restored = HashMap::new();
        }
    }

    /// Rotated files shipped and closed: their positions are checkpointed.
    pub fn shipped(&self) -> impl Iterator<Item = &Entry> {
        self.finished.values()
    }

    /// Short rotated files wait for their size to hold still: the sweep
    /// should rescan.
    pub fn waits_for_size(&self) -> bool {
        !self.short_rotated.is_empty()
    }
}

/// Whether a file's change of status to `to` counts as a rotation: a live
/// file renamed to a rotated name is one; so is one that a racing listing
/// missed (marked gone) and a later one found renamed. Counted once per
/// file; a file first found under a rotated name counts when it is opened
/// ([`Start::LateRotation`]), if at all.
pub fn counts_rotation(to: FileStatus, f: &TailedFile) -> bool {
    to == FileStatus::Rotated && !f.found_rotated && !f.rotation_counted
}

/// What the sweep's look at a followed file means.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Look {
    /// Its size differs from the read offset: read it.
    pub unread: bool,
    /// It grew while reading was not held back: the change source missed
    /// a write (or it is a few ms old).
    pub missed_write: bool,
    /// Written, truncated, renamed or unlinked since the last look (size
    /// or ctime changed): a live file's path and fingerprint are checked.
    pub changed: bool,
    /// Nothing came for `idle`.
    pub quiet: bool,
    /// It ended inside a record and nothing came for a while: the writer is
    /// gone or stuck; deliver what there is.
    pub flush: bool,
}

/// A ctime (s, ns) as one number, for telling it changed: nanoseconds
/// since the epoch (wrapping, far past 2262).
pub fn ctime_ns((s, ns): (i64, i64)) -> i64 {
    s.wrapping_mul(1_000_000_000).wrapping_add(ns)
}

/// The sweep looked at `f` (size and ctime from `fstat`) at `now`;
/// `reading_freely`: reading is not held back by the budget. Updates what
/// the file remembers of the last look.
pub fn look(
    f: &mut TailedFile,
    size: u64,
    ctime: (i64, i64),
    now: Instant,
    idle: Duration,
    reading_freely: bool,
) -> Look {
    let ctime = ctime_ns(ctime);
    let changed = size != f.size_seen || ctime != f.ctime_seen;
    f.ctime_seen = ctime;
    if size != f.size_seen {
        f.size_seen = size;
        f.last_activity = now;
    }
    let quiet = now.duration_since(f.last_activity) >= idle;
    Look {
        unread: size != f.read_offset,
        missed_write: reading_freely && size > f.read_offset,
        changed,
        quiet,
        flush: quiet && !f.skipping && (size > f.read_offset || f.decoder.has_pending()),
    }
}

/// Whether a sweep between the full ones must look at `f`: it is not live
/// (it closes once drained), was read past what the last look saw, holds an
/// unfinished record, or was written less than `idle` ago (its partial
/// record may be due). A live, settled, quiet file needs only the full
/// safety sweep.
pub fn needs_look(f: &TailedFile, now: Instant, idle: Duration) -> bool {
    f.status != FileStatus::Live
        || f.read_offset != f.size_seen
        || f.decoder.has_pending()
        || now.duration_since(f.last_activity) < idle
}

/// A file closes only when it is not live, drained to `size`,
/// acknowledged, has nothing pending and is quiet.
pub fn may_close(f: &TailedFile, size: u64, quiet: bool) -> bool {
    quiet
        && f.status != FileStatus::Live
        && size == f.read_offset
        && f.acks.committed() >= size
        && f.acks.in_flight() == 0
        && !f.decoder.has_pending()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tail::testing::tailed_file;

    const K: FileKey = FileKey { dev: 1, ino: 7 };

    fn entry(offset: u64) -> Entry {
        Entry {
            key: K,
            fingerprint: Fingerprint::of(b"abc"),
            offset,
            path: std::path::Path::new("/p").into(),
        }
    }

    /// Facts given, not read.
    struct Given {
        len: u64,
        matches: bool,
        copy_of: Option<u64>,
        maybe_copy: bool,
    }

    impl Looks for Given {
        fn size(&self) -> u64 {
            self.len
        }
        fn matches(&self, _: &Entry) -> bool {
            self.matches
        }
        fn copied_from(&self) -> Option<u64> {
            self.copy_of
        }
        fn maybe_copy(&self) -> bool {
            self.maybe_copy
        }
    }

    fn given(len: u64) -> Given {
        Given {
            len,
            matches: true,
            copy_of: None,
            maybe_copy: false,
        }
    }

    #[test]
    fn a_rotated_file_without_checkpoint_is_ignored_before_start_and_read_from_0_after() {
        let mut m = Memory::default();
        assert_eq!(m.admit(K, true), Admit::Ignore);
        m.after_scan(&HashSet::new(), |_| false, true);
        assert_eq!(m.admit(K, true), Admit::Consider(None));
        assert_eq!(m.start(K, None, true, &given(300)), Start::LateRotation);
        // A live file is read from its start, before or after.
        assert_eq!(Memory::default().admit(K, false), Admit::Consider(None));
        assert_eq!(m.start(K, None, false, &given(300)), Start::At(0));
    }

    #[test]
    fn after_a_lost_checkpoint_unknown_rotated_files_are_read_from_the_first_scan() {
        let mut m = Memory::after_lost_checkpoint(HashMap::from([(K, entry(5))]));
        assert_eq!(m.admit(K, true), Admit::Consider(Some(entry(5))));
        let other = FileKey { dev: 1, ino: 99 };
        assert_eq!(m.admit(other, true), Admit::Consider(None));
        assert_eq!(m.start(other, None, true, &given(300)), Start::LateRotation);
    }

    #[test]
    fn a_checkpointed_rotation_is_followed_from_its_checkpoint_before_start() {
        let mut m = Memory::new(HashMap::from([(K, entry(5))]));
        assert_eq!(m.admit(K, true), Admit::Consider(Some(entry(5))));
        assert_eq!(m.start(K, Some(&entry(5)), true, &given(9)), Start::At(5));
    }

    #[test]
    fn a_fingerprint_mismatch_or_a_shorter_file_resets_the_offset() {
        let mut m = Memory::default();
        let other = Given {
            matches: false,
            ..given(100)
        };
        assert_eq!(m.start(K, Some(&entry(5)), false, &other), Start::Replaced);
        assert_eq!(
            m.start(K, Some(&entry(500)), false, &given(100)),
            Start::Replaced
        );
    }

    #[test]
    fn a_copytruncate_copy_resumes_where_the_original_was_read() {
        let mut m = Memory::default();
        m.after_scan(&HashSet::new(), |_| false, true);
        let copy = Given {
            copy_of: Some(42),
            ..given(100)
        };
        assert_eq!(m.start(K, None, true, &copy), Start::At(42));
        // An empty rotated file: a copy about to be written.
        assert_eq!(m.start(K, None, true, &given(0)), Start::Later);
    }

    #[test]
    fn a_short_possible_copy_waits_until_its_size_holds_still() {
        let mut m = Memory::default();
        m.after_scan(&HashSet::new(), |_| false, true);
        let short = |len| Given {
            maybe_copy: true,
            ..given(len)
        };
        assert_eq!(m.start(K, None, true, &short(10)), Start::Later);
        assert!(m.waits_for_size());
        assert_eq!(m.start(K, None, true, &short(20)), Start::Later);
        assert_eq!(m.start(K, None, true, &short(20)), Start::LateRotation);
        // Followed now: forgotten.
        m.after_scan(&HashSet::from([K]), |k| *k == K, true);
        assert!(!m.waits_for_size());
        // Not a possible copy: read at once.
        assert_eq!(m.start(K, None, true, &given(10)), Start::LateRotation);
    }

    #[test]
    fn a_shipped_rotation_is_not_read_again_while_it_is_on_disk() {
        let mut m = Memory::default();
        m.after_scan(&HashSet::new(), |_| false, true);
        m.closed_rotated(entry(3));
        assert_eq!(m.admit(K, true), Admit::Ignore);
        assert_eq!(m.shipped().count(), 1);
        m.after_scan(&HashSet::new(), |_| false, true);
        assert_eq!(m.shipped().count(), 0);
        assert_eq!(m.admit(K, true), Admit::Consider(None));
    }

    #[test]
    fn checkpoint_entries_are_kept_while_waiting_and_dropped_once_a_complete_scan_passed() {
        let mut m = Memory::new(HashMap::from([(K, entry(5))]));
        let Admit::Consider(Some(e)) = m.admit(K, false) else {
            panic!()
        };
        m.keep(K, e);
        m.after_scan(&HashSet::new(), |_| false, false);
        assert_eq!(m.claim(K), Some(entry(5)));
        m.keep(K, entry(5));
        m.after_scan(&HashSet::new(), |_| false, true);
        assert_eq!(m.claim(K), None);
    }

    #[test]
    fn a_rotation_is_counted_once_whatever_the_path_to_it() {
        let mut f = tailed_file(1, K, "/d/0.log".into());
        // live → rotated
        assert!(counts_rotation(FileStatus::Rotated, &f));
        assert!(!counts_rotation(FileStatus::Gone, &f));
        f.rotation_counted = true;
        // … then gone → rotated again: not twice.
        assert!(!counts_rotation(FileStatus::Rotated, &f));
        // Found rotated (counted at open, as a late rotation, if at all).
        let mut g = tailed_file(2, K, "/d/0.log.1".into());
        g.found_rotated = true;
        assert!(!counts_rotation(FileStatus::Rotated, &g));
    }

    #[test]
    fn a_file_closes_only_when_not_live_drained_acknowledged_and_quiet() {
        let mut f = tailed_file(1, K, "/d/0.log".into());
        f.read_offset = 10;
        f.acks = crate::checkpoint::AckTracker::starting_at(10);
        assert!(!may_close(&f, 10, true), "live");
        f.status = FileStatus::Rotated;
        assert!(may_close(&f, 10, true));
        assert!(!may_close(&f, 10, false), "not quiet");
        assert!(!may_close(&f, 12, true), "not drained");
        let seq = f.acks.sent(12);
        f.read_offset = 12;
        assert!(!may_close(&f, 12, true), "in flight");
        f.acks.acked(seq);
        assert!(may_close(&f, 12, true));
    }

    #[test]
    fn a_look_tells_growth_missed_writes_changes_and_quiet() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(1);
        let mut f = tailed_file(1, K, "/d/0.log".into());
        f.last_activity = t0;
        let l = look(&mut f, 10, (1, 0), t0, idle, true);
        assert!(l.unread && l.missed_write && l.changed && !l.quiet);
        f.read_offset = 10;
        let l = look(&mut f, 10, (1, 0), t0 + idle, idle, true);
        assert_eq!(
            l,
            Look {
                quiet: true,
                ..Look::default()
            }
        );
        // Held back by the budget: unread bytes are not a missed write.
        let l = look(&mut f, 20, (2, 0), t0 + idle, idle, false);
        assert!(l.unread && !l.missed_write && l.changed && !l.quiet);
        // Quiet with unread bytes (a record without its end): flushed.
        let l = look(&mut f, 20, (2, 0), t0 + 3 * idle, idle, false);
        assert!(l.quiet && l.flush);
    }

    #[test]
    fn only_a_settled_quiet_live_file_can_wait_for_the_full_sweep() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(5);
        let mut f = tailed_file(1, K, "/d/0.log".into());
        f.last_activity = t0;
        assert!(needs_look(&f, t0, idle), "written just now");
        assert!(!needs_look(&f, t0 + idle, idle), "settled and quiet");
        f.read_offset = 10;
        assert!(needs_look(&f, t0 + idle, idle), "read past the last look");
        look(&mut f, 10, (1, 0), t0 + idle, idle, true);
        assert!(needs_look(&f, t0 + idle, idle), "its growth was just seen");
        assert!(!needs_look(&f, t0 + 2 * idle, idle));
        f.status = FileStatus::Rotated;
        assert!(needs_look(&f, t0 + 2 * idle, idle), "rotated: to close");
    }
}
