//! Decoders: physical lines in, logical records out.
//!
//! - CRI (`<time> <stream> <P|F> <msg>`): `P` chunks of one stream are joined
//!   until that stream's `F` chunk; stdout and stderr reassemble separately,
//!   because runtimes interleave them in one file.
//! - Docker json-file (`{"log":"…","stream":"…","time":"…"}`): JSON escapes
//!   are decoded; a `log` without a trailing `\n` is a partial record.
//! - raw: every line is a record.
//!
//! - Then, per stream, multiline joining if the file has a rule
//!   ([`super::multiline`]).
//!
//! Invariants: a record that fits in one physical line is lent out without a
//! copy (CRI, raw); only multi-chunk records, JSON-escaped messages and
//! records a multiline rule may continue are copied, into buffers the
//! decoder keeps and reuses. A record never holds
//! more than `max_record` message bytes: the rest of it is dropped and the
//! record is marked truncated. A line the format cannot parse is delivered
//! whole as a raw record and counted, never dropped.

use std::time::Instant;

use super::multiline::{Joiner, Multiline};

/// Which output stream a record was written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout = 0,
    Stderr = 1,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The on-disk format of a log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Cri,
    DockerJson,
    Raw,
}

/// A logical record, lent to the sink for the duration of one call.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// The runtime's RFC 3339 timestamp as written (of the first chunk);
    /// empty for raw files.
    pub time: &'a [u8],
    pub stream: Stream,
    pub msg: &'a [u8],
    /// Delivered without its end: the file ended inside the record and the
    /// rest never came.
    pub partial: bool,
    /// Longer than the maximum record size; the tail was dropped.
    pub truncated: bool,
    /// The line could not be parsed in the file's format and is passed on whole.
    pub malformed: bool,
    /// File offset of the record's first byte: the checkpoint may not pass
    /// it before the record is delivered.
    pub start: u64,
}

/// One physical line as the reader hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// The bytes, without the terminating `\n`.
    pub bytes: &'a [u8],
    /// File offset of the first byte of the line.
    pub start: u64,
    /// The reader cut this line at its maximum length and skips the rest.
    pub cut: bool,
    /// The file ended for good without this line's `\n`: the records it
    /// ends are delivered flagged partial.
    pub partial: bool,
}

/// A record or scratch buffer whose capacity grew past this (a huge record
/// went through it) is freed once that record is done, instead of being kept
/// for the next one: a file's decoder holds at most this much between
/// records.
const SHRINK_ABOVE: usize = 64 * 1024;

/// A record being reassembled from chunks.
#[derive(Debug, Default)]
struct Pending {
    /// File offset where the record's first chunk starts; the checkpoint may
    /// not pass it until the record has been sent.
    start: Option<u64>,
    time: Vec<u8>,
    msg: Vec<u8>,
    truncated: bool,
}

impl Pending {
    fn begin(&mut self, start: u64, time: &[u8]) {
        self.start = Some(start);
        self.time.clear();
        self.time.extend_from_slice(time);
        self.msg.clear();
        self.truncated = false;
    }

    fn append(&mut self, chunk: &[u8], max: usize) {
        let room = max.saturating_sub(self.msg.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.msg.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// Hands the record, which began at `start`, to `out`, and forgets it.
    fn finish<O: FnMut(Record<'_>, u64)>(
        &mut self,
        stream: Stream,
        partial: bool,
        start: u64,
        out: &mut O,
    ) {
        out(
            Record {
                time: &self.time,
                stream,
                msg: &self.msg,
                partial,
                truncated: self.truncated,
                malformed: false,
                start,
            },
            start,
        );
        self.reset();
    }

    /// Forgets the record, giving back memory a huge record left behind.
    fn reset(&mut self) {
        self.start = None;
        if self.msg.capacity() > SHRINK_ABOVE {
            self.msg = Vec::new();
        }
    }
}

/// How a file's records are joined into multiline records, for one call.
#[derive(Debug, Clone, Copy)]
pub struct Joining<'a> {
    pub multiline: &'a Multiline,
    /// The time the lines were read (taken once per read).
    pub now: Instant,
}

/// Records being reassembled, indexed by `Stream as usize`.
type Pendings = [Pending; 2];

/// Multiline records being joined, indexed by `Stream as usize`.
type Joins = [Joiner; 2];

/// Per-file decoding state.
///
/// What only some files need is boxed and made on first use: the
/// reassembly of split records (CRI `P` chunks, Docker `log`s without
/// their `\n`) and the multiline joiners. A file of whole lines — most of
/// them — then costs a few words, not the ~380 bytes the state takes
/// inline (4 MiB at 10,000 files).
#[derive(Debug)]
pub struct Decoder {
    format: Format,
    /// At most 4 GiB (a larger limit is that): a word less for each of
    /// 10,000 files.
    max_record: u32,
    pending: Option<Box<Pendings>>,
    joins: Option<Box<Joins>>,
    /// Docker json: the decoded `log` of the current line.
    scratch: Vec<u8>,
}

impl Decoder {
    pub fn new(format: Format, max_record: usize) -> Decoder {
        Decoder {
            format,
            max_record: u32::try_from(max_record).unwrap_or(u32::MAX),
            pending: None,
            joins: None,
            scratch: Vec::new(),
        }
    }

    fn pendings(&self) -> &[Pending] {
        self.pending.as_deref().map_or(&[], |p| &p[..])
    }

    fn joiners(&self) -> &[Joiner] {
        self.joins.as_deref().map_or(&[], |j| &j[..])
    }

    /// The file offset before which every byte belongs to a record that has
    /// been emitted, given that everything up to `read_to` has been decoded.
    pub fn safe_offset(&self, read_to: u64) -> u64 {
        self.pendings()
            .iter()
            .filter_map(|p| p.start)
            .chain(self.joiners().iter().filter_map(Joiner::start))
            .fold(read_to, u64::min)
    }

    /// When the oldest open multiline record last got a line: it is due
    /// after the rule's timeout.
    pub fn joined_since(&self) -> Option<Instant> {
        self.joiners().iter().filter_map(Joiner::last).min()
    }

    /// True while a record waits for its final chunk.
    pub fn has_pending(&self) -> bool {
        self.pendings().iter().any(|p| p.start.is_some())
    }

    /// Decodes one physical line, calling `emit` for each completed record.
    /// With `join`, complete records go through the stream's multiline
    /// joiner first.
    pub fn decode<E: FnMut(Record<'_>)>(
        &mut self,
        line: Line<'_>,
        join: Option<Joining<'_>>,
        mut emit: E,
    ) {
        if join.is_none() && self.joiners().iter().any(|j| j.start().is_some()) {
            // The file's rule was turned off with a record open: it goes
            // out before the lines after it.
            self.flush_joined(None, &mut emit);
        }
        let max = self.max_record as usize;
        let joins = &mut self.joins;
        let mut out = |rec: Record<'_>, start: u64| match join {
            Some(j) => joins.get_or_insert_with(Box::default)[rec.stream as usize].push(
                j.multiline,
                max,
                j.now,
                rec,
                start,
                &mut emit,
            ),
            None => emit(rec),
        };
        match self.format {
            Format::Raw => out(
                whole(max, line.bytes, b"", Stream::Stdout, &line),
                line.start,
            ),
            Format::Cri => decode_cri(&mut self.pending, max, line, &mut out),
            Format::DockerJson => {
                decode_docker(&mut self.pending, &mut self.scratch, max, line, &mut out)
            }
        }
    }

    /// Emits every record still waiting for its final chunk, flagged
    /// partial (the file ended inside them and the rest is not coming),
    /// then every open multiline record.
    pub fn flush_partial<E: FnMut(Record<'_>)>(&mut self, join: Option<Joining<'_>>, mut emit: E) {
        let max = self.max_record as usize;
        let no_pending = &mut Pendings::default();
        let pending = self.pending.as_deref_mut().unwrap_or(no_pending);
        for (i, p) in pending.iter_mut().enumerate() {
            let stream = if i == 0 {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            if let Some(start) = p.start {
                let rec = Record {
                    time: &p.time,
                    stream,
                    msg: &p.msg,
                    partial: true,
                    truncated: p.truncated,
                    malformed: false,
                    start,
                };
                match join {
                    Some(j) => self.joins.get_or_insert_with(Box::default)[i].push(
                        j.multiline,
                        max,
                        j.now,
                        rec,
                        start,
                        &mut emit,
                    ),
                    None => emit(rec),
                }
                p.reset();
            }
            if let Some(joins) = &mut self.joins {
                joins[i].take(stream, &mut emit);
            }
        }
    }

    /// Emits the open multiline records that got no line since
    /// `quiet_since` (all: `None`).
    pub fn flush_joined<E: FnMut(Record<'_>)>(
        &mut self,
        quiet_since: Option<Instant>,
        mut emit: E,
    ) {
        let Some(joins) = &mut self.joins else {
            return;
        };
        for (j, stream) in joins.iter_mut().zip([Stream::Stdout, Stream::Stderr]) {
            if j.last().is_some_and(|t| quiet_since.is_none_or(|q| t <= q)) {
                j.take(stream, &mut emit);
            }
        }
    }

    /// Forgets all reassembly state (the file was truncated or rewound).
    pub fn reset(&mut self) {
        self.pending = None;
        if let Some(joins) = &mut self.joins {
            for j in joins.iter_mut() {
                j.reset();
            }
        }
    }
}

/// A record that is one whole line's message.
fn whole<'a>(
    max: usize,
    msg: &'a [u8],
    time: &'a [u8],
    stream: Stream,
    line: &Line<'_>,
) -> Record<'a> {
    let truncated = line.cut || msg.len() > max;
    Record {
        time,
        stream,
        msg: &msg[..msg.len().min(max)],
        partial: line.partial,
        truncated,
        malformed: false,
        start: line.start,
    }
}

/// A line that is not in the file's format, shipped as it is.
fn malformed<'a>(max: usize, line: &Line<'a>) -> Record<'a> {
    Record {
        malformed: true,
        ..whole(max, line.bytes, b"", Stream::Stdout, line)
    }
}

/// CRI: `P` chunks join until their stream's `F`. `out` gets each
/// complete record with the offset of its first byte.
fn decode_cri<O: FnMut(Record<'_>, u64)>(
    pending: &mut Option<Box<Pendings>>,
    max: usize,
    line: Line<'_>,
    out: &mut O,
) {
    let Some((time, stream, full, msg)) = parse_cri(line.bytes) else {
        out(malformed(max, &line), line.start);
        return;
    };
    // A line the reader had to cut ends its record: the rest is skipped.
    let full = full || line.cut;
    let open = pending.as_ref().and_then(|p| p[stream as usize].start);
    if let (None, true) = (open, full) {
        out(whole(max, msg, time, stream, &line), line.start);
        return;
    }
    let p = &mut pending.get_or_insert_with(Box::default)[stream as usize];
    let Some(start) = open else {
        p.begin(line.start, time);
        p.append(msg, max);
        return;
    };
    p.append(msg, max);
    if full {
        p.truncated |= line.cut;
        p.finish(stream, line.partial, start, out);
    }
}

/// Docker json-file: a `log` without its `\n` joins the next of its
/// stream. `out` gets each complete record with the offset of its first
/// byte.
fn decode_docker<O: FnMut(Record<'_>, u64)>(
    pending: &mut Option<Box<Pendings>>,
    scratch: &mut Vec<u8>,
    max: usize,
    line: Line<'_>,
    out: &mut O,
) {
    scratch.clear();
    docker_line(pending, scratch, max, line, out);
    if scratch.capacity() > SHRINK_ABOVE {
        *scratch = Vec::new();
    }
}

/// [`decode_docker`] with `line`'s `log` decoded into `scratch`.
fn docker_line<O: FnMut(Record<'_>, u64)>(
    pending: &mut Option<Box<Pendings>>,
    scratch: &mut Vec<u8>,
    max: usize,
    line: Line<'_>,
    out: &mut O,
) {
    let parsed = if line.cut {
        None
    } else {
        parse_docker(line.bytes, scratch)
    };
    let Some(DockerFields { time, stream }) = parsed else {
        out(malformed(max, &line), line.start);
        return;
    };
    let complete = scratch.last() == Some(&b'\n');
    if complete {
        scratch.pop();
    }
    let open = pending.as_ref().and_then(|p| p[stream as usize].start);
    if let (None, true) = (open, complete) {
        let truncated = scratch.len() > max;
        out(
            Record {
                time,
                stream,
                msg: &scratch[..scratch.len().min(max)],
                partial: line.partial,
                truncated,
                malformed: false,
                start: line.start,
            },
            line.start,
        );
        return;
    }
    let p = &mut pending.get_or_insert_with(Box::default)[stream as usize];
    let Some(start) = open else {
        p.begin(line.start, time);
        p.append(scratch, max);
        return;
    };
    p.append(scratch, max);
    if complete {
        p.finish(stream, line.partial, start, out);
    }
}

/// Splits a CRI line into (time, stream, full, message).
fn parse_cri(line: &[u8]) -> Option<(&[u8], Stream, bool, &[u8])> {
    let sp1 = memchr::memchr(b' ', line)?;
    let time = &line[..sp1];
    let rest = &line[sp1 + 1..];
    let (stream, rest) = if let Some(r) = rest.strip_prefix(b"stdout ") {
        (Stream::Stdout, r)
    } else if let Some(r) = rest.strip_prefix(b"stderr ") {
        (Stream::Stderr, r)
    } else {
        return None;
    };
    // Tags are ':'-separated; the first is P (partial) or F (full). The
    // message follows one space; an empty message may lack that space.
    let (tags, msg) = match memchr::memchr(b' ', rest) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    let full = match tags.split(|&b| b == b':').next()? {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    if time.is_empty() || !time[0].is_ascii_digit() {
        return None;
    }
    Some((time, stream, full, msg))
}

struct DockerFields<'a> {
    time: &'a [u8],
    stream: Stream,
}

/// Parses one json-file line, decoding `log` into `log_out`. Other keys
/// (`attrs` and future ones) are skipped. Returns None for anything that is
/// not a JSON object with string `log` and `stream` fields.
fn parse_docker<'a>(line: &'a [u8], log_out: &mut Vec<u8>) -> Option<DockerFields<'a>> {
    let mut p = JsonCursor { s: line, i: 0 };
    p.ws();
    p.eat(b'{')?;
    let (mut time, mut stream, mut have_log) = (&line[..0], None, false);
    loop {
        p.ws();
        if p.peek()? == b'}' {
            break;
        }
        let key = p.raw_string()?;
        p.ws();
        p.eat(b':')?;
        p.ws();
        match key {
            b"log" => {
                p.string_into(log_out)?;
                have_log = true;
            }
            b"stream" => {
                stream = match p.raw_string()? {
                    b"stdout" => Some(Stream::Stdout),
                    b"stderr" => Some(Stream::Stderr),
                    _ => return None,
                }
            }
            b"time" => time = p.raw_string()?,
            _ => p.skip_value(0)?,
        }
        p.ws();
        match p.peek()? {
            b',' => p.i += 1,
            b'}' => break,
            _ => return None,
        }
    }
    if !have_log {
        return None;
    }
    Some(DockerFields {
        time,
        stream: stream?,
    })
}

/// A minimal JSON reader over one line: enough for Docker's fixed schema.
struct JsonCursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> JsonCursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A string without escapes, borrowed (keys, stream, time).
    fn raw_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let rest = &self.s[self.i..];
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        if rest[end] != b'"' {
            return None;
        }
        self.i += end + 1;
        Some(&rest[..end])
    }

    /// A string with escapes decoded into `out`.
    fn string_into(&mut self, out: &mut Vec<u8>) -> Option<()> {
        self.eat(b'"')?;
        loop {
            let rest = &self.s[self.i..];
            let j = memchr::memchr2(b'"', b'\\', rest)?;
            out.extend_from_slice(&rest[..j]);
            self.i += j + 1;
            if rest[j] == b'"' {
                return Some(());
            }
            let esc = self.peek()?;
            self.i += 1;
            match esc {
                b'"' | b'\\' | b'/' => out.push(esc),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'u' => {
                    let mut cp = self.hex4()?;
                    if (0xD800..0xDC00).contains(&cp) {
                        // A surrogate pair, or a lone high surrogate.
                        if self.s[self.i..].starts_with(b"\\u") {
                            self.i += 2;
                            let lo = self.hex4()?;
                            if (0xDC00..0xE000).contains(&lo) {
                                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                            } else {
                                push_char(out, 0xFFFD);
                                cp = lo;
                            }
                        } else {
                            cp = 0xFFFD;
                        }
                    }
                    push_char(out, cp);
                }
                _ => return None,
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.s.get(self.i..self.i + 4)?;
        let v = u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?;
        self.i += 4;
        Some(v)
    }

    fn skip_value(&mut self, depth: u32) -> Option<()> {
        if depth > 32 {
            return None;
        }
        match self.peek()? {
            b'"' => {
                self.eat(b'"')?;
                loop {
                    let rest = &self.s[self.i..];
                    let j = memchr::memchr2(b'"', b'\\', rest)?;
                    self.i += j + 1;
                    if rest[j] == b'"' {
                        return Some(());
                    }
                    // The escaped character (a line may end right after `\`).
                    self.peek()?;
                    self.i += 1;
                }
            }
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.i += 1;
                loop {
                    self.ws();
                    if self.peek()? == close {
                        self.i += 1;
                        return Some(());
                    }
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.peek()? {
                        b',' | b':' => self.i += 1,
                        c if c == close => {}
                        _ => return None,
                    }
                }
            }
            _ => {
                while !matches!(self.peek()?, b',' | b'}' | b']' | b':') {
                    self.i += 1;
                }
                Some(())
            }
        }
    }
}

fn push_char(out: &mut Vec<u8>, cp: u32) {
    let c = char::from_u32(cp).unwrap_or('\u{FFFD}');
    let mut b = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Owned {
        time: String,
        stream: &'static str,
        msg: Vec<u8>,
        partial: bool,
        truncated: bool,
        malformed: bool,
    }

    fn decode_all(format: Format, max: usize, text: &[u8]) -> (Vec<Owned>, Decoder) {
        let mut d = Decoder::new(format, max);
        let mut out = Vec::new();
        let mut pos = 0u64;
        for line in text.split_inclusive(|&b| b == b'\n') {
            let bytes = line.strip_suffix(b"\n").unwrap_or(line);
            if bytes.len() == line.len() {
                break; // an unterminated tail is not a line yet
            }
            d.decode(
                Line {
                    bytes,
                    start: pos,
                    cut: false,
                    partial: false,
                },
                None,
                |r| out.push(own(r)),
            );
            pos += line.len() as u64;
        }
        (out, d)
    }

    fn own(r: Record<'_>) -> Owned {
        Owned {
            time: String::from_utf8(r.time.to_vec()).unwrap(),
            stream: r.stream.as_str(),
            msg: r.msg.to_vec(),
            partial: r.partial,
            truncated: r.truncated,
            malformed: r.malformed,
        }
    }

    #[test]
    fn conmon_fixture_decodes_to_the_expected_records() {
        // A copy of ../shared/fixtures/cri, kept in the repository.
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/cri/");
        let log = std::fs::read(format!("{fixtures}conmon-partial-lines.log")).unwrap();
        let expected =
            std::fs::read_to_string(format!("{fixtures}conmon-partial-lines.expected.jsonl"))
                .unwrap();
        let (mut got, mut d) = decode_all(Format::Cri, 1 << 20, &log);
        // The file ends in a P chunk whose F never came: flushed as partial.
        assert!(d.has_pending());
        d.flush_partial(None, |r| got.push(own(r)));
        let want: Vec<Owned> = expected
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                Owned {
                    time: v["time"].as_str().unwrap().to_owned(),
                    stream: if v["stream"] == "stderr" {
                        "stderr"
                    } else {
                        "stdout"
                    },
                    msg: v["msg"].as_str().unwrap().as_bytes().to_vec(),
                    partial: v
                        .get("partial_at_eof")
                        .and_then(|b| b.as_bool())
                        .unwrap_or(false),
                    truncated: false,
                    malformed: false,
                }
            })
            .collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w);
        }
    }

    #[test]
    fn cri_partials_reassemble_per_stream_and_hold_the_checkpoint() {
        let text = b"1 stdout P aa\n2 stderr F err\n3 stdout P bb\n4 stdout F cc\n";
        let mut d = Decoder::new(Format::Cri, 1024);
        let mut out = Vec::new();
        let mut pos = 0;
        let mut safe = Vec::new();
        for line in text.split_inclusive(|&b| b == b'\n') {
            d.decode(
                Line {
                    bytes: &line[..line.len() - 1],
                    start: pos,
                    cut: false,
                    partial: false,
                },
                None,
                |r| out.push(own(r)),
            );
            pos += line.len() as u64;
            safe.push(d.safe_offset(pos));
        }
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].stream, &out[0].msg[..]), ("stderr", &b"err"[..]));
        assert_eq!(
            (out[1].time.as_str(), &out[1].msg[..]),
            ("1", &b"aabbcc"[..])
        );
        // While the stdout record is open the checkpoint stays at its start.
        assert_eq!(safe, vec![0, 0, 0, text.len() as u64]);
    }

    #[test]
    fn records_longer_than_the_maximum_are_cut_and_marked() {
        let mut text = Vec::new();
        for _ in 0..10 {
            text.extend_from_slice(b"0 stdout P 0123456789\n");
        }
        text.extend_from_slice(b"0 stdout F end\n0 stdout F next\n");
        let (out, _) = decode_all(Format::Cri, 25, &text);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].msg, b"0123456789012345678901234");
        assert!(out[0].truncated);
        assert_eq!(out[1].msg, b"next");
        assert!(!out[1].truncated);
    }

    #[test]
    fn malformed_cri_lines_pass_through_whole_and_flagged() {
        let (out, _) = decode_all(
            Format::Cri,
            1024,
            b"garbage \xff\x00 line\n2024 stdout X m\n0 stdout F ok\n",
        );
        assert_eq!(out.len(), 3);
        assert!(out[0].malformed && out[1].malformed && !out[2].malformed);
        assert_eq!(out[0].msg, b"garbage \xff\x00 line");
    }

    #[test]
    fn docker_json_lines_decode_escapes_and_join_partials() {
        let text = concat!(
            r#"{"log":"hello \"w\"\u00e9\ud83d\ude00\t\n","stream":"stdout","time":"2024-01-01T00:00:00.1Z"}"#,
            "\n",
            r#"{"log":"part1 ","stream":"stderr","time":"T1"}"#,
            "\n",
            r#"{"log":"x\n","stream":"stdout","attrs":{"a":["b",1,{"c":null}]},"time":"T2"}"#,
            "\n",
            r#"{"log":"part2\n","stream":"stderr","time":"T3"}"#,
            "\n",
            "not json\n",
        );
        let (out, _) = decode_all(Format::DockerJson, 1024, text.as_bytes());
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].msg, "hello \"w\"é😀\t".as_bytes());
        assert_eq!(out[0].time, "2024-01-01T00:00:00.1Z");
        assert_eq!(out[1].msg, b"x");
        assert_eq!(
            (out[2].stream, out[2].time.as_str(), &out[2].msg[..]),
            ("stderr", "T1", &b"part1 part2"[..])
        );
        assert!(out[3].malformed);
    }

    #[test]
    fn no_prefix_or_corruption_of_a_json_line_makes_the_decoder_panic() {
        let line = br#"{"log":"a\"b\\c\u00e9\ud83d\ude00\n","stream":"stderr","attrs":{"k":["v\\",1,{"x":null}]},"time":"2024-01-01T00:00:00Z"}"#;
        let mut d = Decoder::new(Format::DockerJson, 64);
        let mut seen = 0;
        for end in 0..=line.len() {
            d.decode(
                Line {
                    bytes: &line[..end],
                    start: 0,
                    cut: false,
                    partial: false,
                },
                None,
                |_| seen += 1,
            );
            // And with each byte replaced by something hostile.
            for bad in [b'"', b'\\', b'{', b'}', 0xff] {
                let mut l = line.to_vec();
                if end < l.len() {
                    l[end] = bad;
                }
                d.decode(
                    Line {
                        bytes: &l,
                        start: 0,
                        cut: false,
                        partial: false,
                    },
                    None,
                    |_| seen += 1,
                );
            }
        }
        assert!(seen > line.len());
    }

    #[test]
    fn random_bytes_never_make_any_decoder_panic() {
        let alphabet = b"{}[]\":,\\ubdfnrt0189aAF FPstdoutsterr\xff\x00\n";
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for format in [Format::Cri, Format::DockerJson, Format::Raw] {
            let mut d = Decoder::new(format, 32);
            for _ in 0..20_000 {
                let mut line = Vec::new();
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                for k in 0..(x % 48) {
                    line.push(
                        alphabet[((x >> (k % 50)) as usize + k as usize * 7) % alphabet.len()],
                    );
                }
                d.decode(
                    Line {
                        bytes: &line,
                        start: 0,
                        cut: x.is_multiple_of(5),
                        partial: false,
                    },
                    None,
                    |r| assert!(r.msg.len() <= 32),
                );
            }
            d.flush_partial(None, |r| assert!(r.msg.len() <= 32));
        }
    }

    #[test]
    fn raw_lines_are_records_and_cut_lines_are_marked() {
        let mut d = Decoder::new(Format::Raw, 4);
        let mut out = Vec::new();
        d.decode(
            Line {
                bytes: b"abcdef",
                start: 0,
                cut: false,
                partial: false,
            },
            None,
            |r| out.push(own(r)),
        );
        d.decode(
            Line {
                bytes: b"ab",
                start: 7,
                cut: true,
                partial: false,
            },
            None,
            |r| out.push(own(r)),
        );
        assert_eq!((&out[0].msg[..], out[0].truncated), (&b"abcd"[..], true));
        assert_eq!((&out[1].msg[..], out[1].truncated), (&b"ab"[..], true));
    }
}
