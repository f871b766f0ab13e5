//! Tailing: read what is new in a file and hand its records to the sink.
//!
//! One [`Reader`] per reading thread owns one reused buffer. A file is read
//! with `pread(2)` from its saved offset into the buffer; `memchr` finds the
//! line ends in the new bytes only; each complete line is decoded in place and
//! its records are lent to a [`RecordSink`]. No heap allocation per line.
//!
//! Invariants:
//! - `TailedFile::read_offset` is always at a line boundary, unless
//!   `skipping` is set: then it is inside a line that was too long, whose
//!   remaining bytes are dropped up to the next `\n`.
//! - An incomplete last line is not consumed: the next read starts at its
//!   first byte again. So nothing but the decoder's reassembly state is kept
//!   between reads, and memory never grows with line length: the buffer grows
//!   to at most `max_line` bytes, and a longer line is cut there.
//! - Log files are never mmapped (a truncation would turn into SIGBUS).

pub mod decode;
pub mod multiline;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::checkpoint::{AckTracker, FileKey, Fingerprint};
use crate::discover::FileMeta;
use crate::files::StreamId;
use crate::files::identity::{self, Truncations};
use crate::fs::{Handle, ReadAt};
use crate::metrics::Metrics;
use decode::{Decoder, Joining, Line, Record};

/// Where a file stands relative to its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileStatus {
    /// At its discovered path; the runtime writes to it.
    Live,
    /// Renamed to a rotated name: drained, then closed when idle.
    Rotated,
    /// No longer at any known path: what the fd holds is drained, then it is closed.
    Gone,
}

/// An open log file being followed.
#[derive(Debug)]
pub struct TailedFile {
    /// Identity within this process; travels with every record to come back
    /// in its delivery report.
    pub id: u32,
    pub key: FileKey,
    pub file: Handle,
    /// Shared with the registry's index by path.
    pub path: Arc<Path>,
    pub meta: Arc<FileMeta>,
    pub decoder: Decoder,
    /// Offset of the first byte not yet decoded (see module invariants).
    pub read_offset: u64,
    /// Inside a cut line: drop bytes up to and including the next `\n`.
    pub skipping: bool,
    pub acks: AckTracker,
    pub fingerprint: Fingerprint,
    pub status: FileStatus,
    /// First seen under a rotated name (a copy, a rotation we missed, or a
    /// rotated file restored from the checkpoint), never as a live file.
    pub found_rotated: bool,
    /// Its rotation was counted in `file_rotations_total`.
    pub rotation_counted: bool,
    /// Fingerprint and read offset before each of the last truncations: a
    /// copy made by copytruncate is recognised by it and read from that
    /// offset.
    pub before_truncation: Truncations,
    /// File size at the last sweep.
    pub size_seen: u64,
    /// ctime at the last sweep ([`crate::files::lifecycle::ctime_ns`]).
    pub ctime_seen: i64,
    /// Last time the sweep saw the file grow, or its status changed.
    pub last_activity: Instant,
}

impl TailedFile {
    /// The container stream it belongs to (its rotations share it).
    pub fn stream(&self) -> &StreamId {
        &self.meta.stream
    }

    /// A file opened just now, to be read from `offset` (an acknowledged
    /// position: everything before it is done with). Live until told
    /// otherwise.
    pub fn new(
        id: u32,
        key: FileKey,
        file: Handle,
        path: impl Into<Arc<Path>>,
        meta: Arc<FileMeta>,
        offset: u64,
        max_record_bytes: usize,
    ) -> TailedFile {
        TailedFile {
            id,
            key,
            file,
            path: path.into(),
            decoder: Decoder::new(meta.format, max_record_bytes),
            meta,
            read_offset: offset,
            skipping: false,
            acks: AckTracker::starting_at(offset),
            fingerprint: Fingerprint::of(b""),
            status: FileStatus::Live,
            found_rotated: false,
            rotation_counted: false,
            before_truncation: Truncations::default(),
            size_seen: 0,
            ctime_seen: 0,
            last_activity: Instant::now(),
        }
    }

    /// Bytes read and not yet acknowledged (or settled): what its records
    /// hold of the in-flight budget, about.
    pub fn unacked(&self) -> u64 {
        self.read_offset.saturating_sub(self.acks.committed())
    }

    /// Forgets everything read: the file was truncated (copytruncate) or
    /// replaced, and is read again from `offset`.
    pub fn restart_at(&mut self, offset: u64) {
        self.read_offset = offset;
        self.skipping = false;
        self.decoder.reset();
        self.acks.reset(offset);
    }

    /// Copytruncate: is the live file shorter than what was read of it, or
    /// do its first bytes differ from its fingerprint (truncated and
    /// refilled past the read offset between two looks)? If so, it is read
    /// again from the start. (A file first seen under a rotated name is
    /// not checked: it may be a copy still being written. One followed since
    /// it was live is, as it may have been truncated just before its
    /// rename.)
    pub fn check_replaced(&mut self, m: &Metrics) -> bool {
        if self.found_rotated {
            return false;
        }
        let Ok(st) = self.file.stat() else {
            return false;
        };
        let replaced = identity::replaced(st.len, self.read_offset, self.fingerprint, |n| {
            Fingerprint::read(&self.file, n).ok()
        });
        if replaced {
            self.truncated(m);
        }
        replaced
    }

    /// The file was truncated (copytruncate) or its content replaced: read
    /// it again from the start, under a fingerprint that regrows with it.
    pub fn truncated(&mut self, m: &Metrics) {
        m.truncations.inc();
        // A copy is read from the first byte of the records still open, so
        // that they are assembled again there.
        self.before_truncation
            .push(self.fingerprint, self.decoder.safe_offset(self.read_offset));
        self.restart_at(0);
        self.fingerprint =
            Fingerprint::read(&self.file, Fingerprint::MAX_LEN).unwrap_or(Fingerprint::of(b""));
    }
}

/// Where records go: the Kafka producer in production, a vector in tests.
pub trait RecordSink {
    /// False when the in-flight budget is used up: reading must pause.
    fn has_budget(&self) -> bool;
    /// A batch of records (one read) follows: a sink that stamps records
    /// with the time takes the clock here, once, not per record.
    fn begin_batch(&mut self) {}
    /// Hands over one record. `(file, seq)` comes back in its delivery report.
    fn send(&mut self, meta: &FileMeta, rec: &Record<'_>, file: u32, seq: u64);
}

/// The sink of a file that is not to be shipped: its records are counted
/// and settled at once, never produced.
#[derive(Default)]
pub struct Discard {
    seqs: Vec<u64>,
}

impl RecordSink for Discard {
    fn has_budget(&self) -> bool {
        true
    }
    fn send(&mut self, _: &FileMeta, _: &Record<'_>, _: u32, seq: u64) {
        self.seqs.push(seq);
    }
}

impl Discard {
    /// Marks the discarded records done, so the checkpoint moves past them.
    pub fn settle(self, f: &mut TailedFile, metrics: &Metrics) {
        metrics.records_suppressed.add(self.seqs.len() as u64);
        for seq in self.seqs {
            f.acks.acked(seq);
        }
    }
}

/// Why a read stopped.
#[derive(Debug)]
pub enum ReadEnd {
    /// Everything complete up to the end of the file has been decoded.
    Eof,
    /// The in-flight budget is used up; the file still has unread bytes.
    Budget,
    /// This turn's byte quota is used up; the file may have more.
    Quota,
    /// Not read: its container has its share of the in-flight budget
    /// already (read again once acknowledgements come).
    Held,
    /// Not read: its container is over its rate limit until then.
    Limited(Instant),
    Error(std::io::Error),
}

/// Reads files through one reused buffer.
pub struct Reader {
    buf: Vec<u8>,
    initial: usize,
    /// Longest physical line kept whole; longer ones are cut.
    max_line: usize,
}

impl Reader {
    pub fn new(initial: usize, max_line: usize) -> Reader {
        Reader {
            buf: vec![0; initial],
            initial,
            max_line: max_line.max(initial),
        }
    }

    /// Reads `f` from its offset to the end (or until the budget runs out),
    /// sending each record to `sink`; stops after about `quota` bytes.
    pub fn read<S: RecordSink>(
        &mut self,
        f: &mut TailedFile,
        sink: &mut S,
        m: &Metrics,
        quota: u64,
    ) -> ReadEnd {
        let mut total = 0u64;
        let now = Instant::now();
        // Truncated or replaced since the last read: start again at 0.
        f.check_replaced(m);
        f.acks.note_read(now);
        loop {
            if !sink.has_budget() {
                return ReadEnd::Budget;
            }
            if total >= quota {
                return ReadEnd::Quota;
            }
            sink.begin_batch();
            let n = match f.file.read_at(&mut self.buf, f.read_offset) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return ReadEnd::Error(e),
            };
            if n == 0 {
                return ReadEnd::Eof;
            }
            total += n as u64;
            let full = n == self.buf.len();
            let consumed = self.decode_lines(f, n, now, sink, m);
            if consumed == 0 && full {
                // One line fills the whole buffer.
                if self.buf.len() < self.max_line {
                    let grown = (self.buf.len() * 2).min(self.max_line);
                    self.buf.resize(grown, 0);
                    continue;
                }
                self.cut_line(f, n, now, sink, m);
                continue;
            }
            f.read_offset += consumed as u64;
            m.bytes_read.add(consumed as u64);
            if !full {
                self.shrink();
                return ReadEnd::Eof;
            }
        }
    }

    /// Decodes the complete lines in `buf[..n]`; returns the bytes consumed.
    fn decode_lines<S: RecordSink>(
        &mut self,
        f: &mut TailedFile,
        n: usize,
        now: Instant,
        sink: &mut S,
        m: &Metrics,
    ) -> usize {
        let data = &self.buf[..n];
        let base = f.read_offset;
        let mut pos = 0;
        if f.skipping {
            match memchr::memchr(b'\n', data) {
                Some(i) => {
                    pos = i + 1;
                    f.skipping = false;
                }
                None => pos = n,
            }
            m.bytes_skipped.add(pos as u64);
            f.acks.read_to(f.decoder.safe_offset(base + pos as u64));
        }
        let mut lines = 0u64;
        let from = pos;
        for i in memchr::memchr_iter(b'\n', &data[from..]) {
            let end = from + i;
            let line = Line {
                bytes: &data[pos..end],
                start: base + pos as u64,
                cut: false,
                partial: false,
            };
            pos = end + 1;
            let read_to = base + pos as u64;
            emit_line(f, line, read_to, now, sink, m);
            lines += 1;
        }
        m.lines_read.add(lines);
        pos
    }

    /// Emits the first `n` bytes of an over-long line as a cut record and
    /// skips the rest of it.
    fn cut_line<S: RecordSink>(
        &mut self,
        f: &mut TailedFile,
        n: usize,
        now: Instant,
        sink: &mut S,
        m: &Metrics,
    ) {
        let line = Line {
            bytes: &self.buf[..n],
            start: f.read_offset,
            cut: true,
            partial: false,
        };
        f.read_offset += n as u64;
        f.skipping = true;
        m.lines_read.inc();
        m.bytes_read.add(n as u64);
        emit_line(f, line, f.read_offset, now, sink, m);
    }

    /// Gives back a buffer that grew for one long line.
    fn shrink(&mut self) {
        if self.buf.len() > self.initial {
            self.buf.truncate(self.initial);
            self.buf.shrink_to_fit();
        }
    }

    /// The file has ended for good inside a record (its writer went quiet):
    /// decodes the unterminated last line up to `size`, if any, and delivers
    /// every record still open, flagged partial.
    pub fn flush_tail<S: RecordSink>(
        &mut self,
        f: &mut TailedFile,
        size: u64,
        sink: &mut S,
        m: &Metrics,
    ) {
        sink.begin_batch();
        let now = Instant::now();
        if size > f.read_offset && !f.skipping {
            let want = (size - f.read_offset).min(self.max_line as u64) as usize;
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            let n = f
                .file
                .read_at(&mut self.buf[..want], f.read_offset)
                .unwrap_or(0);
            if memchr::memchr(b'\n', &self.buf[..n]).is_some() {
                // Complete lines are still unread: the normal read comes first.
                return;
            }
            if n > 0 {
                let line = Line {
                    bytes: &self.buf[..n],
                    start: f.read_offset,
                    cut: false,
                    partial: true,
                };
                f.read_offset += n as u64;
                m.lines_read.inc();
                m.bytes_read.add(n as u64);
                emit_line(f, line, f.read_offset, now, sink, m);
            }
            self.shrink();
        }
        Self::flush_partial(f, now, sink, m);
    }

    /// Delivers the records a file ended inside of, flagged partial, and
    /// the multiline records still open.
    fn flush_partial<S: RecordSink>(f: &mut TailedFile, now: Instant, sink: &mut S, m: &Metrics) {
        let id = f.id;
        let (meta, acks) = (&f.meta, &mut f.acks);
        let join = meta
            .multiline
            .as_ref()
            .map(|multiline| Joining { multiline, now });
        let (first, read_to) = (acks.next_seq(), f.read_offset);
        acks.note_read(now);
        f.decoder.flush_partial(join, |rec| {
            send(acks, first, read_to, meta, &rec, id, sink, m)
        });
        f.acks.read_to(f.read_offset);
    }

    /// Delivers `f`'s open multiline records that got no line since
    /// `quiet_since` (their timeout passed), or all of them (`None`: the
    /// file is done with, and its successor is read next).
    pub fn flush_joined<S: RecordSink>(
        f: &mut TailedFile,
        quiet_since: Option<Instant>,
        sink: &mut S,
        m: &Metrics,
    ) {
        let id = f.id;
        let first = f.acks.next_seq();
        f.acks.note_read(Instant::now());
        let (meta, acks) = (&f.meta, &mut f.acks);
        sink.begin_batch();
        let read_to = f.read_offset;
        f.decoder.flush_joined(quiet_since, |rec| {
            m.multiline_flushed.inc();
            send(acks, first, read_to, meta, &rec, id, sink, m)
        });
        settle_line(f, first, read_to);
    }
}

/// Decodes one line of `f` (read at `now`) and sends what it completes.
fn emit_line<S: RecordSink>(
    f: &mut TailedFile,
    line: Line<'_>,
    read_to: u64,
    now: Instant,
    sink: &mut S,
    m: &Metrics,
) {
    let id = f.id;
    let (meta, acks, decoder) = (&f.meta, &mut f.acks, &mut f.decoder);
    let first = acks.next_seq();
    let join = meta
        .multiline
        .as_ref()
        .map(|multiline| Joining { multiline, now });
    decoder.decode(line, join, |rec| {
        send(acks, first, read_to, meta, &rec, id, sink, m)
    });
    settle_line(f, first, read_to);
}

/// Sends one of the records a read completed (those from sequence `first`
/// on): its commit target is `read_to`, and the records sent before it in
/// this batch may not pass its first byte (one line can complete a joined
/// record and a record of its own; the first acknowledged must not commit
/// the second).
#[expect(
    clippy::too_many_arguments,
    reason = "the parts of one send, split to borrow apart"
)]
fn send<S: RecordSink>(
    acks: &mut AckTracker,
    first: u64,
    read_to: u64,
    meta: &FileMeta,
    rec: &Record<'_>,
    id: u32,
    sink: &mut S,
    m: &Metrics,
) {
    count(m, rec);
    acks.cap_from(first, rec.start);
    let seq = acks.sent(read_to);
    sink.send(meta, rec, id, seq);
}

/// Counts what is special about a record about to be sent.
fn count(m: &Metrics, rec: &Record<'_>) {
    if rec.partial {
        m.partial_flushed.inc();
    }
    if rec.truncated {
        m.truncated.inc();
    }
    if rec.malformed {
        m.malformed.inc();
    }
}

/// After the records from sequence `first` on were sent for bytes read up
/// to `read_to`: their commit target is lowered to the first byte of any
/// record still open (a record of the other stream being reassembled, a
/// multiline record being joined), and so is what the read settles.
fn settle_line(f: &mut TailedFile, first: u64, read_to: u64) {
    let safe = f.decoder.safe_offset(read_to);
    if safe < read_to {
        f.acks.cap_from(first, safe);
    }
    f.acks.read_to(safe);
}

/// Files for the tests of other modules.
#[cfg(test)]
pub mod testing {
    use super::*;
    use crate::config::TopicTemplate;
    use crate::discover::{MetaContext, Origin};
    use std::fs::File;
    use std::path::PathBuf;

    /// A file of no pod (reading `/dev/null`) with the given identity.
    pub fn tailed_file(id: u32, key: FileKey, path: PathBuf) -> TailedFile {
        let file = File::open("/dev/null").unwrap();
        open_tailed(id, key, file, path, decode::Format::Raw, 4096)
    }

    /// The opened `file`, followed from offset 0 with the metadata of a
    /// file of no pod.
    pub fn open_tailed(
        id: u32,
        key: FileKey,
        file: File,
        path: PathBuf,
        format: decode::Format,
        max_record: usize,
    ) -> TailedFile {
        open_joined(id, key, file, path, format, max_record, "off")
    }

    /// [`open_tailed`], its records joined by the multiline rule `rule`.
    pub fn open_joined(
        id: u32,
        key: FileKey,
        file: File,
        path: PathBuf,
        format: decode::Format,
        max_record: usize,
        rule: &str,
    ) -> TailedFile {
        let ctx = MetaContext {
            topic: TopicTemplate::parse("t").unwrap(),
            node: "n".into(),
            pods: None,
            labels: Default::default(),
            annotations: Default::default(),
            policy: Default::default(),
            multiline: crate::discover::MultilineDefaults {
                rule: multiline::Rule::parse(rule).unwrap(),
                ..Default::default()
            },
            rate_limit: None,
        };
        let meta = Arc::new(ctx.render(Origin::default(), format));
        TailedFile::new(id, key, file.into(), path, meta, 0, max_record)
    }
}

#[cfg(test)]
mod tests {
    use super::decode::Format;
    use super::*;
    use std::fs::File;

    #[derive(Default)]
    struct VecSink {
        records: Vec<(Vec<u8>, bool, bool)>,
        seqs: Vec<u64>,
        budget: usize,
    }

    impl RecordSink for VecSink {
        fn has_budget(&self) -> bool {
            self.records.len() < self.budget
        }
        fn send(&mut self, _: &FileMeta, rec: &Record<'_>, _: u32, seq: u64) {
            self.records
                .push((rec.msg.to_vec(), rec.truncated, rec.partial));
            self.seqs.push(seq);
        }
    }

    fn tailed(path: &std::path::Path, format: Format, max: usize) -> TailedFile {
        let file = File::open(path).unwrap();
        let key = FileKey { dev: 0, ino: 0 };
        testing::open_tailed(1, key, file, path.to_owned(), format, max)
    }

    fn msgs(s: &VecSink) -> Vec<String> {
        s.records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.0).into_owned())
            .collect()
    }

    #[test]
    fn an_incomplete_last_line_waits_for_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"one\ntw").unwrap();
        let mut f = tailed(&p, Format::Raw, 1024);
        let mut r = Reader::new(16, 64);
        let mut sink = VecSink {
            budget: usize::MAX,
            ..Default::default()
        };
        let m = Metrics::default();
        assert!(matches!(
            r.read(&mut f, &mut sink, &m, u64::MAX),
            ReadEnd::Eof
        ));
        assert_eq!(msgs(&sink), ["one"]);
        assert_eq!(f.read_offset, 4);
        std::fs::write(&p, b"one\ntwo\nthree\n").unwrap();
        r.read(&mut f, &mut sink, &m, u64::MAX);
        assert_eq!(msgs(&sink), ["one", "two", "three"]);
        assert_eq!(f.read_offset, 14);
    }

    #[test]
    fn a_line_without_end_is_cut_at_the_maximum_and_memory_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut data = vec![b'x'; 10_000];
        data.extend_from_slice(b"\nafter\n");
        std::fs::write(&p, &data).unwrap();
        let mut f = tailed(&p, Format::Raw, 100);
        let mut r = Reader::new(16, 100);
        let mut sink = VecSink {
            budget: usize::MAX,
            ..Default::default()
        };
        let m = Metrics::default();
        r.read(&mut f, &mut sink, &m, u64::MAX);
        assert_eq!(sink.records.len(), 2);
        assert_eq!(sink.records[0].0.len(), 100);
        assert!(sink.records[0].1, "marked truncated");
        assert_eq!(sink.records[1].0, b"after");
        assert_eq!(m.truncated.get(), 1);
        assert!(r.buf.capacity() <= 100);
        assert_eq!(f.read_offset, data.len() as u64);
    }

    #[test]
    fn truncation_restarts_at_zero_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"aaaa\nbbbb\n").unwrap();
        let mut f = tailed(&p, Format::Raw, 1024);
        let mut r = Reader::new(64, 1024);
        let mut sink = VecSink {
            budget: usize::MAX,
            ..Default::default()
        };
        let m = Metrics::default();
        r.read(&mut f, &mut sink, &m, u64::MAX);
        std::fs::write(&p, b"c\n").unwrap();
        assert!(matches!(
            r.read(&mut f, &mut sink, &m, u64::MAX),
            ReadEnd::Eof
        ));
        assert_eq!(msgs(&sink), ["aaaa", "bbbb", "c"]);
        assert_eq!(m.truncations.get(), 1);
    }

    #[test]
    fn reading_pauses_when_the_budget_is_used_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"1\n2\n3\n4\n").unwrap();
        let mut f = tailed(&p, Format::Raw, 1024);
        // A buffer of 4 bytes holds two lines per read.
        let mut r = Reader::new(4, 1024);
        let mut sink = VecSink {
            budget: 2,
            ..Default::default()
        };
        let m = Metrics::default();
        assert!(matches!(
            r.read(&mut f, &mut sink, &m, u64::MAX),
            ReadEnd::Budget
        ));
        assert_eq!(msgs(&sink), ["1", "2"]);
        sink.budget = 10;
        assert!(matches!(
            r.read(&mut f, &mut sink, &m, u64::MAX),
            ReadEnd::Eof
        ));
        assert_eq!(msgs(&sink), ["1", "2", "3", "4"]);
    }

    #[test]
    fn the_checkpoint_never_passes_an_open_record_of_the_other_stream() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let text = b"0 stdout P aa\n0 stderr F err\n0 stdout F bb\n";
        std::fs::write(&p, text).unwrap();
        let mut f = tailed(&p, Format::Cri, 1024);
        let mut r = Reader::new(64, 1024);
        let mut sink = VecSink {
            budget: usize::MAX,
            ..Default::default()
        };
        let m = Metrics::default();
        r.read(&mut f, &mut sink, &m, u64::MAX);
        assert_eq!(msgs(&sink), ["err", "aabb"]);
        // The stderr record is acked alone: the stdout record that began
        // before it is not delivered yet, so the checkpoint stays at 0.
        f.acks.acked(sink.seqs[0]);
        assert_eq!(f.acks.committed(), 0);
        f.acks.acked(sink.seqs[1]);
        assert_eq!(f.acks.committed(), text.len() as u64);
    }

    #[test]
    fn a_partial_record_at_eof_is_flushed_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0 stdout F a\n0 stdout P tail\n").unwrap();
        let mut f = tailed(&p, Format::Cri, 1024);
        let mut r = Reader::new(64, 1024);
        let mut sink = VecSink {
            budget: usize::MAX,
            ..Default::default()
        };
        let m = Metrics::default();
        r.read(&mut f, &mut sink, &m, u64::MAX);
        assert_eq!(msgs(&sink), ["a"]);
        f.acks.acked(sink.seqs[0]);
        assert_eq!(f.acks.committed(), 13);
        r.flush_tail(&mut f, 29, &mut sink, &m);
        assert_eq!(msgs(&sink), ["a", "tail"]);
        assert!(sink.records[1].2, "flagged partial");
        f.acks.acked(sink.seqs[1]);
        assert_eq!(f.acks.committed(), 29);
    }

    #[test]
    fn the_checkpoint_never_stops_inside_a_multiline_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let head = "a\n";
        let trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\n";
        std::fs::write(&p, format!("{head}{trace}")).unwrap();
        let file = File::open(&p).unwrap();
        let key = FileKey { dev: 0, ino: 0 };
        let mut f = testing::open_joined(1, key, file, p.clone(), Format::Raw, 1024, "python");
        let mut r = Reader::new(64, 1024);
        let mut sink = VecSink {
            budget: usize::MAX,
            ..Default::default()
        };
        let m = Metrics::default();
        r.read(&mut f, &mut sink, &m, u64::MAX);
        // "a" went out; the traceback is held: its next line may continue it.
        assert_eq!(msgs(&sink), ["a"]);
        f.acks.acked(sink.seqs[0]);
        assert_eq!(f.acks.committed(), head.len() as u64, "stops at the trace");
        // Its exception line comes, then a line that ends it.
        let rest = "ValueError: boom\nnext\n";
        std::fs::write(&p, format!("{head}{trace}{rest}")).unwrap();
        r.read(&mut f, &mut sink, &m, u64::MAX);
        assert_eq!(
            msgs(&sink),
            [
                "a",
                "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: boom",
                "next"
            ]
        );
        // "next" acknowledged before the trace: the checkpoint waits.
        f.acks.acked(sink.seqs[2]);
        assert_eq!(f.acks.committed(), head.len() as u64);
        f.acks.acked(sink.seqs[1]);
        assert_eq!(
            f.acks.committed(),
            (head.len() + trace.len() + rest.len()) as u64
        );

        // A trace with no line after it goes out when flushed (its timeout).
        let more = "Traceback (most recent call last):\n  File \"y.py\"\nKeyError: 1\n";
        std::fs::write(&p, format!("{head}{trace}{rest}{more}")).unwrap();
        r.read(&mut f, &mut sink, &m, u64::MAX);
        assert_eq!(sink.records.len(), 3);
        assert!(f.decoder.joined_since().is_some());
        Reader::flush_joined(&mut f, None, &mut sink, &m);
        assert_eq!(sink.records.len(), 4);
        assert!(f.decoder.joined_since().is_none());
        f.acks.acked(sink.seqs[3]);
        assert_eq!(f.acks.committed(), f.read_offset);
        assert_eq!(m.multiline_flushed.get(), 1);
    }

    /// The first line of each record a multiline fixture (a real program's
    /// output, written by podman + conmon) is joined into.
    pub(crate) const MULTILINE_FIXTURES: &[(&str, &str, &[&str])] = &[
        (
            "python",
            "python",
            &[
                "before 1",
                "Traceback (most recent call last):",
                "after 1",
                "before 2",
                "Traceback (most recent call last):",
                "exit 1",
            ],
        ),
        (
            "java",
            "java",
            &[
                "before 1",
                "java.lang.RuntimeException: cannot load /etc/app.conf",
                "after 1",
                "before 2",
                "Exception in thread \"main\" java.lang.ArrayIndexOutOfBoundsException: Index 3 out of bounds for length 2",
                "exit 1",
            ],
        ),
        (
            "go",
            "go",
            &[
                "before 1",
                "panic: runtime error: index out of range [5] with length 3",
                "exit 2",
            ],
        ),
    ];

    #[test]
    fn real_programs_traces_join_into_one_record_each_and_nothing_is_lost() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/multiline/");
        for (name, rule, firsts) in MULTILINE_FIXTURES {
            let p = std::path::PathBuf::from(format!("{dir}{name}.log"));
            let file = File::open(&p).unwrap();
            let key = FileKey { dev: 0, ino: 0 };
            let mut f = testing::open_joined(1, key, file, p.clone(), Format::Cri, 1 << 20, rule);
            let mut r = Reader::new(4096, 1 << 20);
            let mut sink = VecSink {
                budget: usize::MAX,
                ..Default::default()
            };
            let m = Metrics::default();
            r.read(&mut f, &mut sink, &m, u64::MAX);
            Reader::flush_joined(&mut f, None, &mut sink, &m);
            let got = msgs(&sink);
            let heads: Vec<&str> = got.iter().map(|r| r.lines().next().unwrap()).collect();
            assert_eq!(&heads, firsts, "{name}: {got:#?}");
            // Every line the program wrote, in order, in exactly one record.
            let text = std::fs::read_to_string(&p).unwrap();
            let mut lines = vec![String::new()];
            for l in text.lines() {
                let mut parts = l.splitn(4, ' ');
                let tag = parts.nth(2).unwrap();
                lines.last_mut().unwrap().push_str(parts.next().unwrap());
                if tag == "F" {
                    lines.push(String::new());
                }
            }
            lines.pop();
            assert_eq!(got.join("\n"), lines.join("\n"), "{name}");
            f.acks.acked(sink.seqs[0]);
            for &s in &sink.seqs {
                f.acks.acked(s);
            }
            assert_eq!(f.acks.committed(), text.len() as u64, "{name}");
        }
    }

    #[test]
    fn a_record_open_when_the_rule_is_turned_off_goes_out_before_the_next_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let trace = "Traceback (most recent call last):\n  File \"x.py\"\nKeyError: 1\n";
        std::fs::write(&p, trace).unwrap();
        let key = FileKey { dev: 0, ino: 0 };
        let mut f = testing::open_joined(
            1,
            key,
            File::open(&p).unwrap(),
            p.clone(),
            Format::Raw,
            1024,
            "python",
        );
        let mut r = Reader::new(64, 1024);
        let mut sink = VecSink {
            budget: usize::MAX,
            ..Default::default()
        };
        let m = Metrics::default();
        r.read(&mut f, &mut sink, &m, u64::MAX);
        assert!(sink.records.is_empty(), "held: a chain may follow");
        // A reload turns multiline off for this file.
        let plain = testing::open_tailed(
            2,
            key,
            File::open(&p).unwrap(),
            p.clone(),
            Format::Raw,
            1024,
        );
        f.meta = plain.meta.clone();
        std::fs::write(&p, format!("{trace}next\n")).unwrap();
        r.read(&mut f, &mut sink, &m, u64::MAX);
        assert_eq!(
            msgs(&sink),
            [
                "Traceback (most recent call last):\n  File \"x.py\"\nKeyError: 1",
                "next"
            ]
        );
        for &s in &sink.seqs {
            f.acks.acked(s);
        }
        assert_eq!(f.acks.committed(), f.read_offset);
    }

    #[test]
    fn a_joined_record_acknowledged_first_never_commits_the_line_that_ended_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let trace = "Traceback (most recent call last):\n  File \"x.py\"\nKeyError: 1\n";
        // "plain" ends the trace and is a record of its own: both go out
        // while that one line is read.
        std::fs::write(&p, format!("{trace}plain\n")).unwrap();
        let key = FileKey { dev: 0, ino: 0 };
        let file = File::open(&p).unwrap();
        let mut f = testing::open_joined(1, key, file, p.clone(), Format::Raw, 1024, "python");
        let mut r = Reader::new(64, 1024);
        let mut sink = VecSink {
            budget: usize::MAX,
            ..Default::default()
        };
        let m = Metrics::default();
        r.read(&mut f, &mut sink, &m, u64::MAX);
        assert_eq!(sink.records.len(), 2);
        f.acks.acked(sink.seqs[0]);
        assert_eq!(f.acks.committed(), trace.len() as u64, "not past \"plain\"");
        f.acks.acked(sink.seqs[1]);
        assert_eq!(f.acks.committed(), f.read_offset);
    }
}
/// Every followed file holds one of each: at 10,000 files each word is
/// 80 KiB, and a struct one byte over an allocator size class costs the
/// whole next class (mimalloc's: 160, 192, 224, 256, 320). This build's
/// `Handle` is 12 bytes larger than the release one (it has a test
/// variant).
#[cfg(test)]
mod per_file_size {
    use std::mem::size_of;

    #[test]
    fn per_file_state_stays_within_its_allocator_size_classes() {
        let handle_extra = size_of::<crate::fs::Handle>() - size_of::<std::fs::File>();
        // Boxed in the registry: 224 bytes.
        assert!(size_of::<super::TailedFile>() - handle_extra <= 224);
        // In an `Arc` (two counts): 192 bytes.
        assert!(size_of::<crate::discover::FileMeta>() + 16 <= 192);
        assert!(size_of::<crate::discover::Origin>() + 16 <= 192);
    }
}
