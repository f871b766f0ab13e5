//! The `cri` and `docker` targets: a container's log file as the agent
//! reads it, decodes it (CRI `P`/`F` chunks, Docker json-file partials),
//! joins it (multiline rules) and renders its records as JSON.
//!
//! Input layout:
//! - byte 0, settings: bits 0-1 the record size limit (8, 64, 1 KiB,
//!   1 MiB); bits 2-3 the longest line the reader keeps (16, 100, 1 KiB,
//!   1 MiB: the limits are small so that short inputs reach them); bits 4-6 the multiline rule (0-3 none, 4 `java`, 5 `python`,
//!   6 `go`, 7 `regex:^\S`); bit 7 the file's declaration says
//!   `_format=json` (lines that are JSON objects are spliced into records);
//! - byte 1: the number of pauses (low 3 bits), then per pause a
//!   little-endian u16 (where the file has grown to, modulo its length + 1)
//!   and an action byte: bit 0 the writer goes quiet (the reader's
//!   `flush_tail`: the unterminated last line and every open record go out,
//!   flagged partial), bit 1 the multiline timeout passes (`flush_joined`);
//! - the rest: the file.
//!
//! The file grows to each pause in turn and is read at each; at the end it
//! is read whole and flushed as a file that ended. [`Harness::read`] is
//! `tail::Reader`'s line splitting without the file I/O: complete lines are
//! decoded, a line with no end within the longest line is cut there and the
//! rest of it skipped, an incomplete last line waits for its end.
//!
//! Checked, beyond "no panic":
//! - every record holds at most the record size limit, begins at the first
//!   byte of a line the reader handed over, and at or after the checkpoint
//!   (`safe_offset`) as it stood before: a checkpoint never passes a byte
//!   of a record not yet emitted; the checkpoint never moves back and never
//!   passes what was read; after the end-of-file flush nothing is open;
//! - every record renders (`sink::render_json`) to valid JSON (CRI: the
//!   rendering does not depend on the format);
//! - CRI without multiline: the records are exactly those of a reference
//!   decoder written here from the format's definition ([`CriModel`]);
//! - Docker: each line that `serde_json` reads as a json-file line gives
//!   the same `log`, `stream` and `time`, and one the agent refuses is one
//!   `serde_json` refuses too (for lines without escapes).

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::Instant;

use bpftail::config::{Globs, TopicTemplate};
use bpftail::discover::{FileMeta, MetaContext, MultilineDefaults, Origin, Policy};
use bpftail::metrics::Metrics;
use bpftail::tail::decode::{Decoder, Format, Joining, Line, Record, Stream};
use bpftail::tail::multiline::Rule;

use crate::Cursor;

const MAX_RECORD: [usize; 4] = [8, 64, 1024, 1 << 20];
const MAX_LINE: [usize; 4] = [16, 100, 1024, 1 << 20];
const RULES: [&str; 4] = ["java", "python", "go", "regex:^\\S"];

/// One file's metadata per (multiline rule or none, `_format=json`),
/// rendered as discovery renders it; index `rule * 2 + json`.
fn metas() -> &'static [FileMeta] {
    static METAS: OnceLock<Vec<FileMeta>> = OnceLock::new();
    METAS.get_or_init(|| {
        let mut out = Vec::new();
        for rule in std::iter::once(None).chain(RULES.iter().map(Some)) {
            for json in [false, true] {
                let ctx = MetaContext {
                    topic: TopicTemplate::parse("logs").expect("a valid topic"),
                    node: "node-1".into(),
                    pods: None,
                    labels: Globs::default(),
                    annotations: Globs::default(),
                    policy: Policy::default(),
                    multiline: MultilineDefaults {
                        rule: rule.map(|r| Rule::parse(r).expect("a valid rule").expect("a rule")),
                        ..Default::default()
                    },
                    rate_limit: None,
                };
                let mut env = vec!["aliyun_logs_app=stdout".to_owned()];
                if json {
                    env.push("aliyun_logs_app_format=json".to_owned());
                }
                let origin = Origin {
                    namespace: "shop".into(),
                    pod: "web-7d4b9c-x2x9z".into(),
                    pod_uid: "0f6c7a52-2d55-4b1e-9b7e-6f3e2a1c9d10".into(),
                    container: "app".into(),
                    env: env.into(),
                    ..Default::default()
                };
                let meta = ctx.render(origin, Format::Cri);
                assert_eq!(meta.line_json(), json);
                assert_eq!(meta.multiline.is_some(), rule.is_some());
                out.push(meta);
            }
        }
        out
    })
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

/// A record, owned, for comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub time: Vec<u8>,
    pub stream: Stream,
    pub msg: Vec<u8>,
    pub partial: bool,
    pub truncated: bool,
    pub malformed: bool,
    pub start: u64,
}

impl Owned {
    fn of(r: &Record<'_>) -> Owned {
        Owned {
            time: r.time.to_vec(),
            stream: r.stream,
            msg: r.msg.to_vec(),
            partial: r.partial,
            truncated: r.truncated,
            malformed: r.malformed,
            start: r.start,
        }
    }
}

/// Runs one input (see the module docs) through the decoder of `format`.
pub fn run(format: Format, data: &[u8]) {
    let mut c = Cursor::new(data);
    let settings = c.byte();
    let pauses = c.byte() & 7;
    let mut pauses: Vec<(u16, u8)> = (0..pauses).map(|_| (c.u16(), c.byte())).collect();
    let file = c.rest();
    let max_record = MAX_RECORD[usize::from(settings & 3)];
    let max_line = MAX_LINE[usize::from((settings >> 2) & 3)];
    let rule = match (settings >> 4) & 7 {
        r @ 4..=7 => usize::from(r - 3),
        _ => 0,
    };
    let json = settings >> 7;
    let meta = &metas()[rule * 2 + usize::from(json)];
    let mut h = Harness {
        file,
        decoder: Decoder::new(format, max_record),
        max_line,
        offset: 0,
        skipping: false,
        meta,
        now: Instant::now(),
        check: Check {
            format,
            max_record,
            line_starts: vec![false; file.len() + 1],
            safe: 0,
            rendered: Vec::new(),
            records: Vec::new(),
        },
        model: (format == Format::Cri && meta.multiline.is_none()).then(|| CriModel {
            max: max_record,
            pending: Default::default(),
            out: Vec::new(),
        }),
    };
    let len = file.len() as u64 + 1;
    for p in &mut pauses {
        p.0 = (u64::from(p.0) % len) as u16;
    }
    pauses.sort_by_key(|p| p.0);
    for (end, action) in pauses {
        let end = usize::from(end);
        h.read(end);
        if action & 1 != 0 {
            h.flush_tail(end);
        }
        if action & 2 != 0 {
            h.flush_joined();
        }
    }
    h.read(file.len());
    h.flush_tail(file.len());
    let end = h.offset as u64;
    assert_eq!(
        h.decoder.safe_offset(end),
        end,
        "a record is open after the end"
    );
    assert!(!h.decoder.has_pending() && h.decoder.joined_since().is_none());
    if let Some(model) = h.model {
        assert_eq!(
            h.check.records, model.out,
            "the decoder and the reference differ"
        );
    }
}

struct Harness<'a> {
    file: &'a [u8],
    decoder: Decoder,
    max_line: usize,
    /// The reader's offset: the first byte not yet decoded.
    offset: usize,
    /// Inside a cut line: bytes up to its `\n` are dropped.
    skipping: bool,
    meta: &'static FileMeta,
    now: Instant,
    check: Check,
    model: Option<CriModel>,
}

impl Harness<'_> {
    /// Reads `file[..end]` from the offset: every complete line, and the
    /// first `max_line` bytes of a longer one (its rest skipped).
    fn read(&mut self, end: usize) {
        while self.offset < end {
            let rest = &self.file[self.offset..end];
            if self.skipping {
                match memchr(rest) {
                    Some(i) => {
                        self.offset += i + 1;
                        self.skipping = false;
                    }
                    None => self.offset = end,
                }
                continue;
            }
            let window = &rest[..rest.len().min(self.max_line)];
            let (bytes, cut, next) = match memchr(window) {
                Some(i) => (&rest[..i], false, self.offset + i + 1),
                None if rest.len() >= self.max_line => (window, true, self.offset + window.len()),
                None => return,
            };
            let line = Line {
                bytes,
                start: self.offset as u64,
                cut,
                partial: false,
            };
            self.offset = next;
            self.skipping = cut;
            self.decode(line);
        }
    }

    /// The writer went quiet at `end`: the unterminated last line (up to
    /// the longest line) is decoded, flagged partial, and every open record
    /// goes out.
    fn flush_tail(&mut self, end: usize) {
        if end > self.offset && !self.skipping {
            let want = (end - self.offset).min(self.max_line);
            let bytes = &self.file[self.offset..self.offset + want];
            // `read` took every complete line first.
            assert!(memchr(bytes).is_none());
            let line = Line {
                bytes,
                start: self.offset as u64,
                cut: false,
                partial: true,
            };
            self.offset += want;
            self.decode(line);
        }
        let at = self.offset as u64;
        let floor = self.floor(at);
        let (join, meta) = (self.join(), self.meta);
        let check = &mut self.check;
        self.decoder
            .flush_partial(join, |r| check.record(&r, floor, at, meta));
        if let Some(m) = &mut self.model {
            m.flush();
        }
        assert_eq!(self.decoder.safe_offset(at), at, "flushed, yet open");
        self.check.safe = at;
    }

    /// The multiline timeout passed: open joined records go out.
    fn flush_joined(&mut self) {
        let at = self.offset as u64;
        let floor = self.floor(at);
        let (check, meta) = (&mut self.check, self.meta);
        self.decoder
            .flush_joined(None, |r| check.record(&r, floor, at, meta));
        assert!(self.decoder.joined_since().is_none());
        let safe = self.decoder.safe_offset(at);
        assert!(safe >= floor && safe <= at);
        self.check.safe = safe;
    }

    fn join(&self) -> Option<Joining<'static>> {
        self.meta.multiline.as_ref().map(|multiline| Joining {
            multiline,
            now: self.now,
        })
    }

    /// The checkpoint with everything up to `at` decoded: never behind the
    /// last one.
    fn floor(&self, at: u64) -> u64 {
        let floor = self.decoder.safe_offset(at);
        assert!(floor >= self.check.safe, "the checkpoint moved back");
        assert!(floor <= at, "the checkpoint passed what was read");
        floor
    }

    fn decode(&mut self, line: Line<'_>) {
        let start = line.start;
        let read_to = self.offset as u64;
        let floor = self.floor(start);
        self.check.line_starts[start as usize] = true;
        if self.check.format == Format::DockerJson && !line.cut {
            docker_differential(line.bytes);
        }
        let (join, meta) = (self.join(), self.meta);
        let check = &mut self.check;
        self.decoder
            .decode(line, join, |r| check.record(&r, floor, start, meta));
        if let Some(m) = &mut self.model {
            m.line(&line);
        }
        self.check.safe = self.floor(read_to);
    }
}

/// The first `\n` (the `memchr` crate, as the reader: not instrumented,
/// so the harness's own scanning costs little).
fn memchr(b: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', b)
}

/// The invariants of each record, and the records (for the reference).
struct Check {
    format: Format,
    max_record: usize,
    /// Offsets at which a line handed to the decoder began.
    line_starts: Vec<bool>,
    /// The checkpoint after the last call.
    safe: u64,
    rendered: Vec<u8>,
    records: Vec<Owned>,
}

impl Check {
    /// `r` was emitted by a call that began with the checkpoint at `floor`,
    /// for the line at `upto` (or a flush there).
    fn record(&mut self, r: &Record<'_>, floor: u64, upto: u64, meta: &FileMeta) {
        assert!(r.msg.len() <= self.max_record, "longer than the limit");
        assert!(
            r.start >= floor && r.start <= upto,
            "record at {} outside [{floor}, {upto}]",
            r.start
        );
        assert!(
            self.line_starts[r.start as usize],
            "record at {}: no line began there",
            r.start
        );
        // An unjoined malformed line has no time and goes to stdout; a
        // joined record keeps its first line's time and stream and is
        // flagged malformed when any of its lines was.
        if r.malformed && meta.multiline.is_none() {
            assert!(r.time.is_empty() && r.stream == Stream::Stdout);
        }
        if self.format == Format::Cri && !r.malformed && meta.multiline.is_none() {
            assert!(r.time.first().is_some_and(u8::is_ascii_digit));
        }
        // Rendering is format-blind (CRI lines hold any bytes too): done
        // for CRI only, the Docker target's runs go to its differential.
        if self.format == Format::Cri {
            self.render(r, meta);
        }
        self.records.push(Owned::of(r));
    }

    /// `r` renders to valid JSON.
    fn render(&mut self, r: &Record<'_>, meta: &FileMeta) {
        self.rendered.clear();
        bpftail::sink::render_json(
            &mut self.rendered,
            bpftail::config::OutputFormat::Json,
            meta,
            r,
            metrics(),
        );
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&self.rendered) {
            panic!(
                "invalid JSON rendered ({e}): {}",
                String::from_utf8_lossy(&self.rendered)
            );
        }
    }
}

/// (start, time, message so far, truncated)
type Open = (u64, Vec<u8>, Vec<u8>, bool);

/// CRI decoding as the format defines it (`<time> <stream> <tags> <msg>`,
/// the first `:`-separated tag `P` or `F`), written apart from the agent's.
struct CriModel {
    max: usize,
    /// Per stream: the record being reassembled.
    pending: [Option<Open>; 2],
    out: Vec<Owned>,
}

impl CriModel {
    fn parse(line: &[u8]) -> Option<(&[u8], Stream, bool, &[u8])> {
        let mut parts = line.splitn(4, |&b| b == b' ');
        let time = parts.next()?;
        let stream = match parts.next()? {
            b"stdout" => Stream::Stdout,
            b"stderr" => Stream::Stderr,
            _ => return None,
        };
        let tags = parts.next()?;
        let msg = parts.next().unwrap_or(b"");
        let full = match tags.split(|&b| b == b':').next()? {
            b"F" => true,
            b"P" => false,
            _ => return None,
        };
        if !time.first().is_some_and(u8::is_ascii_digit) {
            return None;
        }
        Some((time, stream, full, msg))
    }

    fn line(&mut self, l: &Line<'_>) {
        let max = self.max;
        let cap = |m: &[u8]| m[..m.len().min(max)].to_vec();
        let Some((time, stream, full, msg)) = Self::parse(l.bytes) else {
            self.out.push(Owned {
                time: Vec::new(),
                stream: Stream::Stdout,
                msg: cap(l.bytes),
                partial: l.partial,
                truncated: l.cut || l.bytes.len() > max,
                malformed: true,
                start: l.start,
            });
            return;
        };
        let full = full || l.cut;
        let slot = &mut self.pending[stream as usize];
        if slot.is_none() && full {
            self.out.push(Owned {
                time: time.to_vec(),
                stream,
                msg: cap(msg),
                partial: l.partial,
                truncated: l.cut || msg.len() > max,
                malformed: false,
                start: l.start,
            });
            return;
        }
        let (start, time, joined, truncated) =
            slot.get_or_insert_with(|| (l.start, time.to_vec(), Vec::new(), false));
        let room = max - joined.len();
        *truncated |= msg.len() > room;
        joined.extend_from_slice(&msg[..msg.len().min(room)]);
        if full {
            *truncated |= l.cut;
            self.out.push(Owned {
                time: std::mem::take(time),
                stream,
                msg: std::mem::take(joined),
                partial: l.partial,
                truncated: *truncated,
                malformed: false,
                start: *start,
            });
            *slot = None;
        }
    }

    fn flush(&mut self) {
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            if let Some((start, time, msg, truncated)) = self.pending[i].take() {
                self.out.push(Owned {
                    time,
                    stream,
                    msg,
                    partial: true,
                    truncated,
                    malformed: false,
                    start,
                });
            }
        }
    }
}

/// A Docker json-file line as `serde_json` reads it.
#[derive(serde::Deserialize)]
struct DockerLine<'a> {
    #[serde(borrow)]
    log: Cow<'a, str>,
    #[serde(borrow)]
    stream: Cow<'a, str>,
    #[serde(borrow, default)]
    time: Cow<'a, str>,
}

/// One json-file line through a fresh decoder, against `serde_json`.
fn docker_differential(bytes: &[u8]) {
    let mut d = Decoder::new(Format::DockerJson, usize::MAX);
    let line = Line {
        bytes,
        start: 0,
        cut: false,
        partial: false,
    };
    // (log, stream, time, malformed)
    let mut got: Option<(Vec<u8>, Stream, Vec<u8>, bool)> = None;
    d.decode(line, None, |r| {
        let mut log = r.msg.to_vec();
        if !r.malformed {
            // Emitted at once: the log ended with its `\n`.
            log.push(b'\n');
        }
        got = Some((log, r.stream, r.time.to_vec(), r.malformed));
    });
    if got.is_none() {
        d.flush_partial(None, |r| {
            got = Some((r.msg.to_vec(), r.stream, r.time.to_vec(), r.malformed))
        });
    }
    let (log, stream, time, malformed) = got.expect("every line gives a record");
    let Ok(reference) = serde_json::from_slice::<DockerLine<'_>>(bytes) else {
        return;
    };
    let want_stream = match &*reference.stream {
        "stdout" => Stream::Stdout,
        "stderr" => Stream::Stderr,
        _ => return,
    };
    if malformed {
        // Refused: only with escapes (in keys, time or stream: the agent
        // reads those raw) or nesting past its limit.
        let nesting = bytes.iter().filter(|&&b| b == b'{' || b == b'[').count();
        assert!(
            bytes.contains(&b'\\') || nesting > 32,
            "a valid json-file line was refused: {}",
            String::from_utf8_lossy(bytes)
        );
        return;
    }
    assert_eq!(log, reference.log.as_bytes(), "log differs");
    assert_eq!(stream, want_stream);
    assert_eq!(time, reference.time.as_bytes(), "time differs");
}
