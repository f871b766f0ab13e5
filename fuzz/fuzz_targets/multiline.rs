//! Multiline rules (`java`, `python`, `go`, `regex:<start pattern>`) as
//! pods name them, parsed, and lines joined by them.
//!
//! Input: byte 0 the rule's maximum lines (0: the default 500, else
//! 1 + byte % 16); byte 1 the record size limit (low 2 bits: 16, 128,
//! 4 KiB, 1 MiB); then the rule setting as written (up to the first `\n`);
//! then the lines, one per `\n`-separated piece (each cut to the size
//! limit first, as the decoder does).
//!
//! Checked (the module's guarantees): every line comes out once, in order,
//! in exactly one record, records being whole runs of consecutive lines
//! joined by `\n`; a record holds at most the size limit and the maximum
//! lines, and reports the offset of its first line; the open record's
//! offset is its first line's; a rule's name parses back to itself.
// `cargo test --bins` builds this with a test harness, which has its own main.
#![cfg_attr(not(test), no_main)]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bpftail::tail::decode::{Record, Stream};
use bpftail::tail::multiline::{Joiner, Multiline, RuleCache};
use bpftail_fuzz::Cursor;

/// Rules compiled once, as the agent keeps them (a mutated input that keeps
/// its pattern does not compile it again).
fn rules() -> &'static RuleCache {
    static RULES: OnceLock<RuleCache> = OnceLock::new();
    RULES.get_or_init(RuleCache::default)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let max_lines = match c.byte() {
        0 => 500,
        b => 1 + usize::from(b % 16),
    };
    let max_record = [16, 128, 4096, 1 << 20][usize::from(c.byte() & 3)];
    let Ok(setting) = std::str::from_utf8(c.until(b'\n')) else {
        return;
    };
    let Ok(Some(rule)) = rules().parse(setting) else {
        return;
    };
    let name = rule.name();
    let again = rules().parse(&name).expect("a rule's name parses");
    assert_eq!(again.expect("a rule").name(), name);
    let ml = Multiline {
        rule,
        max_lines,
        timeout: Duration::from_secs(1),
    };
    // (offset, line as the joiner gets it)
    let mut lines: Vec<(u64, &[u8], bool)> = Vec::new();
    let mut offset = 0u64;
    for l in c.rest().split(|&b| b == b'\n') {
        let cut = &l[..l.len().min(max_record)];
        lines.push((offset, cut, cut.len() < l.len()));
        offset += l.len() as u64 + 1;
    }
    let mut j = Joiner::default();
    let now = Instant::now();
    let mut out: Vec<(u64, Vec<u8>, bool)> = Vec::new();
    let mut emit = |r: Record<'_>| out.push((r.start, r.msg.to_vec(), r.truncated));
    for &(start, msg, truncated) in &lines {
        let rec = Record {
            time: b"2026-11-25T14:41:47.973485468+00:00",
            stream: Stream::Stdout,
            msg,
            partial: false,
            truncated,
            malformed: false,
            start,
        };
        j.push(&ml, max_record, now, rec, start, &mut emit);
        if let Some(s) = j.start() {
            assert!(s <= start, "the open record begins after its last line");
        }
    }
    j.take(Stream::Stdout, &mut emit);
    assert!(j.start().is_none() && j.last().is_none());
    // Records are consecutive runs of lines, each line once.
    let mut i = 0;
    for (start, msg, _) in &out {
        assert!(msg.len() <= max_record, "over the size limit");
        let n = msg.iter().filter(|&&b| b == b'\n').count() + 1;
        assert!(n <= max_lines, "{n} lines, more than {max_lines}");
        assert!(i + n <= lines.len(), "more lines out than in");
        assert_eq!(*start, lines[i].0, "a record's offset is its first line's");
        let joined: Vec<&[u8]> = lines[i..i + n].iter().map(|l| l.1).collect();
        assert_eq!(msg, &joined.join(&b'\n'), "a record is not its lines");
        i += n;
    }
    assert_eq!(i, lines.len(), "lines lost");
});
