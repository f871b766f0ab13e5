//! Multiline: the records of one stream that make one event — a Java
//! exception, a Python traceback, a Go panic, or what a start-line regex
//! says — joined into one record, their messages separated by `\n`.
//!
//! It runs after the format's own joining (CRI `P`/`F`, Docker partials),
//! on each stream (stdout, stderr) separately. [`Rule::classify`] is the
//! pure decision (does this line continue the open record, start one, or
//! stand alone?); [`Joiner`] holds the open record.
//!
//! Guarantees:
//! - A record ends at the next line that does not continue it, after the
//!   rule's timeout of quiet (the caller flushes, [`Joiner::take`]), at the
//!   rule's maximum number of lines, or at the record size limit. At the
//!   size limit the record is flagged truncated and the line that did not
//!   fit begins the next record: nothing is dropped that a single line
//!   would not drop.
//! - The open record's first byte is reported ([`Joiner::start`]): the
//!   checkpoint never passes it, so a restart reads the whole record again.
//! - Lines that can never be continued (a plain line under the `python` and
//!   `go` rules, a line that is not an exception header under `java`) are
//!   passed on at once, without a copy or a wait.
//! - Patterns are compiled by the `regex` crate, whose matching is linear
//!   in the input for every pattern (no backtracking), under a size limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::decode::{Record, Stream};

/// Compiled size limit of a `regex:` pattern (and of its lazy DFA cache).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// How records are joined.
#[derive(Debug)]
pub enum Rule {
    /// Exceptions as `Throwable.printStackTrace` prints them: a header
    /// (`java.lang.IllegalStateException: msg`, `Exception in thread "main" …`)
    /// followed by indented frames, `Caused by:` and `... N more`.
    Java,
    /// Tracebacks, with chained exceptions ("During handling of the above
    /// exception…", "The above exception was the direct cause…") and
    /// exception groups.
    Python,
    /// Panics, fatal errors and goroutine dumps.
    Go,
    /// A line matching the pattern starts a record; the others continue it.
    Start(regex::bytes::Regex),
}

/// A stream's multiline setting: the rule and its limits.
#[derive(Debug, Clone)]
pub struct Multiline {
    pub rule: Arc<Rule>,
    /// A record ends after this many lines.
    pub max_lines: usize,
    /// … or after this long without a new line.
    pub timeout: Duration,
}

impl Rule {
    /// `off` (`None`), `java`, `python`, `go` or `regex:<start pattern>`;
    /// or why not.
    pub fn parse(value: &str) -> Result<Option<Arc<Rule>>, String> {
        let value = value.trim();
        let rule = match value {
            "off" | "" => return Ok(None),
            "java" => Rule::Java,
            "python" => Rule::Python,
            "go" => Rule::Go,
            _ => match value.strip_prefix("regex:") {
                Some(pattern) if !pattern.is_empty() => {
                    let re = regex::bytes::RegexBuilder::new(pattern)
                        .size_limit(REGEX_SIZE_LIMIT)
                        .dfa_size_limit(REGEX_SIZE_LIMIT)
                        .build()
                        .map_err(|e| format!("regex {pattern:?} does not compile: {e}"))?;
                    Rule::Start(re)
                }
                Some(_) => return Err("regex: needs a start pattern after the colon".into()),
                None => {
                    return Err(format!(
                        "{value:?}: use off, java, python, go or regex:<start pattern>"
                    ));
                }
            },
        };
        Ok(Some(Arc::new(rule)))
    }

    /// The setting as written.
    pub fn name(&self) -> String {
        match self {
            Rule::Java => "java".into(),
            Rule::Python => "python".into(),
            Rule::Go => "go".into(),
            Rule::Start(re) => format!("regex:{}", re.as_str()),
        }
    }

    /// What `line` does, given (and updating) where the stream stands.
    pub fn classify(&self, phase: &mut Phase, line: &[u8]) -> Verdict {
        match self {
            Rule::Java => java(line),
            Rule::Python => python(phase, line),
            Rule::Go => go(phase, line),
            Rule::Start(re) => {
                if re.is_match(line) {
                    Verdict::Start
                } else {
                    Verdict::Continue
                }
            }
        }
    }
}

/// Rules parsed from pods' annotations and declarations, shared by every
/// file that names the same one: a `regex:` rule is compiled once, however
/// many pods (tenants) name it. Rules no file uses any more are dropped
/// when new ones are added.
#[derive(Debug, Default)]
pub struct RuleCache {
    rules: std::sync::Mutex<std::collections::HashMap<String, Arc<Rule>>>,
}

impl RuleCache {
    /// [`Rule::parse`], from the cache when the same setting was parsed.
    pub fn parse(&self, value: &str) -> Result<Option<Arc<Rule>>, String> {
        let key = value.trim();
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = rules.get(key) {
            return Ok(Some(r.clone()));
        }
        let rule = Rule::parse(key)?;
        if let Some(r) = &rule {
            rules.retain(|_, r| Arc::strong_count(r) > 1);
            rules.insert(key.to_owned(), r.clone());
        }
        Ok(rule)
    }
}

/// What a line does to the open record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Joins the open record (or, if none is open, begins one).
    Continue,
    /// Ends the open record and begins a new one, which may be continued.
    Start,
    /// Ends the open record and is a record by itself.
    Alone,
}

/// Where a stream stands in the rule's grammar (the `python` and `go`
/// rules need to know they are inside a trace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Phase {
    #[default]
    Plain,
    /// Python: inside a traceback's frames.
    Frames,
    /// Python: after the exception line (a chain may follow).
    Raised,
    /// Python: after a blank line following the exception line.
    RaisedBlank,
    /// Python: after a chain marker ("During handling…").
    Chained,
    /// Go: inside a panic or a goroutine dump.
    Trace,
}

fn indented(line: &[u8]) -> bool {
    matches!(line.first(), Some(b' ' | b'\t'))
}

/// `java`: frames and causes continue; an exception header starts.
fn java(line: &[u8]) -> Verdict {
    if indented(line) || line.starts_with(b"Caused by: ") || line.starts_with(b"Suppressed: ") {
        Verdict::Continue
    } else if java_header(line) {
        Verdict::Start
    } else {
        Verdict::Alone
    }
}

/// `Exception in thread "…" <class>…`, or a qualified class name
/// (`a.b.C`, `a.b.C$D`), alone or followed by `: message`. Stops at the
/// first byte that cannot be part of one: most lines cost a few bytes.
fn java_header(line: &[u8]) -> bool {
    if line.starts_with(b"Exception in thread \"") {
        return true;
    }
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
    let (mut dots, mut segment_start) = (0, true);
    for (i, &b) in line.iter().enumerate() {
        match b {
            b'.' if !segment_start => {
                dots += 1;
                segment_start = true;
            }
            b':' if !segment_start => {
                return dots >= 1 && line.get(i + 1).is_none_or(|&c| c == b' ');
            }
            _ if segment_start && (b.is_ascii_alphabetic() || b == b'_' || b == b'$') => {
                segment_start = false;
            }
            _ if !segment_start && ident(b) => {}
            _ => return false,
        }
    }
    !segment_start && dots >= 1
}

const PY_TRACEBACK: &[u8] = b"Traceback (most recent call last):";
const PY_GROUP: &[u8] = b"+ Exception Group Traceback (most recent call last):";
const PY_CONTEXT: &[u8] = b"During handling of the above exception, another exception occurred:";
const PY_CAUSE: &[u8] = b"The above exception was the direct cause of the following exception:";

/// `python`: a traceback from its header through its exception line, and
/// the exceptions chained to it.
fn python(phase: &mut Phase, line: &[u8]) -> Verdict {
    let header = line == PY_TRACEBACK || line.trim_ascii_start() == PY_GROUP;
    let chain = line == PY_CONTEXT || line == PY_CAUSE;
    let (verdict, next) = match *phase {
        Phase::Frames if indented(line) => (Verdict::Continue, Phase::Frames),
        // The exception line (`ValueError: boom`) ends the frames.
        Phase::Frames if !line.is_empty() => (Verdict::Continue, Phase::Raised),
        Phase::Raised | Phase::RaisedBlank if chain => (Verdict::Continue, Phase::Chained),
        Phase::Raised if line.is_empty() => (Verdict::Continue, Phase::RaisedBlank),
        Phase::Chained if line.is_empty() => (Verdict::Continue, Phase::Chained),
        Phase::Chained if header => (Verdict::Continue, Phase::Frames),
        _ if header => (Verdict::Start, Phase::Frames),
        _ => (Verdict::Alone, Phase::Plain),
    };
    *phase = next;
    verdict
}

/// `go`: a panic, fatal error or signal dump through its goroutines.
fn go(phase: &mut Phase, line: &[u8]) -> Verdict {
    let header = line.starts_with(b"panic: ")
        || line.starts_with(b"fatal error: ")
        || go_signal(line)
        || (line.starts_with(b"goroutine ") && line.ends_with(b"]:"));
    if *phase == Phase::Trace && go_continues(line) {
        return Verdict::Continue;
    }
    if header {
        *phase = Phase::Trace;
        Verdict::Start
    } else {
        *phase = Phase::Plain;
        Verdict::Alone
    }
}

/// `SIGQUIT: quit`, `SIGSEGV: segmentation violation` (a dump's first line).
fn go_signal(line: &[u8]) -> bool {
    line.starts_with(b"SIG")
        && memchr::memchr(b':', line).is_some_and(|i| line[3..i].iter().all(u8::is_ascii_uppercase))
}

/// A line inside a Go trace: blank, indented (file:line, nested panics),
/// a goroutine header, a frame's function (`main.(*T).f(0xc0, {…})`,
/// `panic({0x1, 0x2})`), `created by …`, `[signal …]`, `PC=… m=…`.
fn go_continues(line: &[u8]) -> bool {
    if line.is_empty() || indented(line) {
        return true;
    }
    if line.starts_with(b"goroutine ")
        || line.starts_with(b"created by ")
        || line.starts_with(b"[signal ")
        || line.starts_with(b"PC=")
        || line.starts_with(b"...additional frames elided...")
        || line.starts_with(b"panic: ")
        || line.starts_with(b"fatal error: ")
    {
        return true;
    }
    // A frame's function: no space before its argument list, and the line
    // ends with it.
    match memchr::memchr(b'(', line) {
        Some(i) => !line[..i].contains(&b' ') && line.ends_with(b")"),
        None => false,
    }
}

/// A record being joined, of one stream.
#[derive(Debug, Default)]
pub struct Joiner {
    phase: Phase,
    /// File offset of the record's first byte; `None`: nothing open.
    start: Option<u64>,
    time: Vec<u8>,
    msg: Vec<u8>,
    lines: usize,
    truncated: bool,
    partial: bool,
    /// One of its lines was not in the file's format (and was taken whole).
    malformed: bool,
    /// When its last line was added.
    last: Option<Instant>,
}

/// A joined record's buffer that grew past this is freed after it.
const SHRINK_ABOVE: usize = 64 * 1024;

impl Joiner {
    /// The open record's first byte in the file.
    pub fn start(&self) -> Option<u64> {
        self.start
    }

    /// When the open record last got a line.
    pub fn last(&self) -> Option<Instant> {
        self.last
    }

    /// Takes `rec` (whose first byte is at `start`), calling `emit` for
    /// each record it completes.
    pub fn push<E: FnMut(Record<'_>)>(
        &mut self,
        ml: &Multiline,
        max_record: usize,
        now: Instant,
        rec: Record<'_>,
        start: u64,
        emit: &mut E,
    ) {
        let verdict = ml.rule.classify(&mut self.phase, rec.msg);
        match verdict {
            Verdict::Continue if self.start.is_some() => {
                if self.msg.len() + 1 + rec.msg.len() > max_record {
                    // The size limit: what is joined so far goes out cut,
                    // and this line begins the next record.
                    self.truncated = true;
                    self.take(rec.stream, emit);
                    self.begin(&rec, start, now);
                } else {
                    self.msg.push(b'\n');
                    self.msg.extend_from_slice(rec.msg);
                    self.lines += 1;
                    self.truncated |= rec.truncated;
                    self.partial |= rec.partial;
                    self.malformed |= rec.malformed;
                    self.last = Some(now);
                }
            }
            Verdict::Continue | Verdict::Start => {
                self.take(rec.stream, emit);
                self.begin(&rec, start, now);
            }
            Verdict::Alone => {
                self.take(rec.stream, emit);
                emit(rec);
            }
        }
        if self.lines >= ml.max_lines {
            self.take(rec.stream, emit);
        }
    }

    fn begin(&mut self, rec: &Record<'_>, start: u64, now: Instant) {
        self.start = Some(start);
        self.time.clear();
        self.time.extend_from_slice(rec.time);
        self.msg.clear();
        self.msg.extend_from_slice(rec.msg);
        self.lines = 1;
        self.truncated = rec.truncated;
        self.partial = rec.partial;
        self.malformed = rec.malformed;
        self.last = Some(now);
    }

    /// Emits the open record, if any (its next line did not continue it,
    /// or it timed out).
    pub fn take<E: FnMut(Record<'_>)>(&mut self, stream: Stream, emit: &mut E) {
        if self.start.is_none() {
            return;
        }
        emit(Record {
            time: &self.time,
            stream,
            msg: &self.msg,
            partial: self.partial,
            truncated: self.truncated,
            malformed: self.malformed,
            start: self.start.unwrap_or_default(),
        });
        self.clear();
    }

    /// Done with the open record; where the stream stands in the rule's
    /// grammar stays (the line that ended it may have begun the next).
    fn clear(&mut self) {
        self.start = None;
        self.last = None;
        self.lines = 0;
        if self.msg.capacity() > SHRINK_ABOVE {
            self.msg = Vec::new();
        }
    }

    /// Forgets the open record (the file is read again from elsewhere).
    pub fn reset(&mut self) {
        self.clear();
        self.phase = Phase::Plain;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Multiline {
        Multiline {
            rule: Rule::parse(s).unwrap().unwrap(),
            max_lines: 500,
            timeout: Duration::from_secs(1),
        }
    }

    /// Joins `text`'s lines with `ml`; the open record is taken at the end.
    fn join_with(ml: &Multiline, max_record: usize, text: &str) -> Vec<String> {
        let mut j = Joiner::default();
        let mut out = Vec::new();
        let now = Instant::now();
        let mut emit = |r: Record<'_>| out.push(String::from_utf8_lossy(r.msg).into_owned());
        let mut offset = 0;
        for line in text.lines() {
            let rec = Record {
                time: b"t",
                stream: Stream::Stdout,
                msg: line.as_bytes(),
                partial: false,
                truncated: false,
                malformed: false,
                start: 0,
            };
            j.push(ml, max_record, now, rec, offset, &mut emit);
            offset += line.len() as u64 + 1;
        }
        j.take(Stream::Stdout, &mut emit);
        out
    }

    fn join(r: &str, text: &str) -> Vec<String> {
        join_with(&rule(r), 1 << 20, text)
    }

    #[test]
    fn a_joined_record_with_a_malformed_line_stays_flagged_malformed() {
        let ml = rule("java");
        let mut j = Joiner::default();
        let mut out = Vec::new();
        let mut emit =
            |r: Record<'_>| out.push((String::from_utf8_lossy(r.msg).into_owned(), r.malformed));
        let now = Instant::now();
        let lines: [(&str, bool); 4] = [
            ("com.example.Failure", true),
            ("\tat com.example.A.b(A.java:1)", false),
            ("com.example.Other", false),
            ("\tat com.example.C.d(C.java:2)", true),
        ];
        for (i, (msg, malformed)) in lines.into_iter().enumerate() {
            let rec = Record {
                time: b"t",
                stream: Stream::Stdout,
                msg: msg.as_bytes(),
                partial: false,
                truncated: false,
                malformed,
                start: i as u64 * 100,
            };
            j.push(&ml, 1 << 20, now, rec, i as u64 * 100, &mut emit);
        }
        j.take(Stream::Stdout, &mut emit);
        assert_eq!(
            out,
            [
                (
                    "com.example.Failure\n\tat com.example.A.b(A.java:1)".to_string(),
                    true
                ),
                (
                    "com.example.Other\n\tat com.example.C.d(C.java:2)".to_string(),
                    true
                ),
            ]
        );
    }

    #[test]
    fn settings_parse_and_bad_ones_say_why() {
        assert!(Rule::parse("off").unwrap().is_none());
        assert_eq!(Rule::parse("java").unwrap().unwrap().name(), "java");
        assert_eq!(
            Rule::parse("regex:^\\d{4}-").unwrap().unwrap().name(),
            "regex:^\\d{4}-"
        );
        let e = Rule::parse("regex:(").unwrap_err();
        assert!(e.contains("does not compile"), "{e}");
        // Backreferences and look-around (the super-linear features) do not
        // exist in a linear-time engine: refused.
        assert!(Rule::parse("regex:(a)\\1").is_err());
        assert!(Rule::parse("regex:(?=a)").is_err());
        assert!(Rule::parse("ruby").unwrap_err().contains("use off, java"));
        assert!(Rule::parse("regex:").is_err());
        // A pattern whose compiled form is huge is refused, not built.
        assert!(Rule::parse("regex:\\w{1000}\\w{1000}\\w{1000}").is_err());
    }

    #[test]
    fn a_rule_named_twice_is_compiled_once_and_dropped_when_unused() {
        let cache = RuleCache::default();
        let a = cache.parse("regex:^x").unwrap().unwrap();
        let b = cache.parse(" regex:^x ").unwrap().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(cache.parse("off").unwrap().is_none());
        assert!(cache.parse("regex:(").is_err());
        drop((a, b));
        let _c = cache.parse("java").unwrap();
        assert_eq!(
            cache.rules.lock().unwrap().len(),
            1,
            "the unused regex is gone"
        );
    }

    /// Whatever the lines, every rule passes each of them on once, in
    /// order (nothing dropped below the size limit).
    #[test]
    fn any_lines_come_out_whole_and_in_order_under_every_rule() {
        let pieces = [
            "Traceback (most recent call last):",
            "  File \"a.py\", line 1",
            "ValueError: x",
            "",
            "During handling of the above exception, another exception occurred:",
            "panic: boom",
            "goroutine 1 [running]:",
            "main.main()",
            "\t/a.go:1 +0x1",
            "java.lang.Error: e",
            "\tat A.b(A.java:1)",
            "Caused by: x.Y: z",
            "plain line",
            "SIGQUIT: quit",
            "created by main.main",
        ];
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for rule in ["java", "python", "go", "regex:^p"] {
            for _ in 0..200 {
                let n = (x % 40) as usize;
                let lines: Vec<&str> = (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        pieces[(x % pieces.len() as u64) as usize]
                    })
                    .collect();
                let text = lines.join("\n");
                let mut ml = self::rule(rule);
                ml.max_lines = 1 + (x % 7) as usize;
                let got = join_with(&ml, 1 << 20, &text);
                let want: Vec<&str> = text.lines().collect();
                assert_eq!(got.join("\n"), want.join("\n"), "{rule}: {text:?}");
                assert!(got.iter().all(|r| r.lines().count().max(1) <= ml.max_lines));
            }
        }
    }

    #[test]
    fn java_exceptions_join_with_causes_and_suppressed() {
        let text = "starting\n\
            Exception in thread \"main\" java.lang.IllegalStateException: outer\n\
            \tat Main.run(Main.java:10)\n\
            \tSuppressed: java.lang.RuntimeException: closing\n\
            \t\tat Main.close(Main.java:20)\n\
            Caused by: java.io.IOException: inner\n\
            \tat Main.io(Main.java:30)\n\
            \t... 1 more\n\
            done\n\
            com.example.Failure\n\
            \tat com.example.A.b(A.java:1)\n\
            2024-01-01 INFO next";
        assert_eq!(
            join("java", text),
            [
                "starting",
                "Exception in thread \"main\" java.lang.IllegalStateException: outer\n\tat Main.run(Main.java:10)\n\tSuppressed: java.lang.RuntimeException: closing\n\t\tat Main.close(Main.java:20)\nCaused by: java.io.IOException: inner\n\tat Main.io(Main.java:30)\n\t... 1 more",
                "done",
                "com.example.Failure\n\tat com.example.A.b(A.java:1)",
                "2024-01-01 INFO next",
            ]
        );
    }

    #[test]
    fn java_headers_are_qualified_names_alone_or_with_a_message() {
        for yes in [
            "a.b.C",
            "a.b.C: msg",
            "com.x.Outer$Inner: m",
            "java.lang.Error:",
            "Exception in thread \"t\" x",
        ] {
            assert!(java_header(yes.as_bytes()), "{yes}");
        }
        for no in [
            "x",
            "x: y",
            ".a.B",
            "a..B",
            "a.B:x",
            "a.B.",
            "2024-01-01 ERROR a.B",
            "a.b c",
            "",
        ] {
            assert!(!java_header(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn python_tracebacks_join_with_their_chains() {
        let text = "before\n\
            Traceback (most recent call last):\n  \
              File \"a.py\", line 3, in <module>\n    \
                f()\n\
            ValueError: boom\n\
            \n\
            During handling of the above exception, another exception occurred:\n\
            \n\
            Traceback (most recent call last):\n  \
              File \"a.py\", line 5, in <module>\n\
            KeyError: 'x'\n\
            after\n\
            Traceback (most recent call last):\n  \
              File \"b.py\", line 1, in <module>\n\
            RuntimeError\n\
            next";
        assert_eq!(
            join("python", text),
            [
                "before",
                "Traceback (most recent call last):\n  File \"a.py\", line 3, in <module>\n    f()\nValueError: boom\n\nDuring handling of the above exception, another exception occurred:\n\nTraceback (most recent call last):\n  File \"a.py\", line 5, in <module>\nKeyError: 'x'",
                "after",
                "Traceback (most recent call last):\n  File \"b.py\", line 1, in <module>\nRuntimeError",
                "next",
            ]
        );
    }

    #[test]
    fn back_to_back_tracebacks_are_two_records() {
        let tb = "Traceback (most recent call last):\n  File \"a.py\", line 1\nValueError: x";
        let text = format!("{tb}\n{tb}\nafter");
        assert_eq!(join("python", &text), [tb, tb, "after"]);
        let java = "java.lang.Error: a\n\tat A.b(A.java:1)";
        assert_eq!(join("java", &format!("{java}\n{java}")), [java, java]);
    }

    #[test]
    fn go_panics_join_through_their_goroutines() {
        let text = "serving\n\
            panic: runtime error: index out of range [5] with length 3\n\
            \n\
            goroutine 1 [running]:\n\
            main.(*T).f(0xc000012345, {0x4b2f20, 0x5})\n\
            \t/app/main.go:10 +0x1d\n\
            main.main()\n\
            \t/app/main.go:20 +0x2e\n\
            \n\
            goroutine 6 [chan receive]:\n\
            created by main.main in goroutine 1\n\
            \t/app/main.go:15 +0x3f\n\
            restarted";
        let got = join("go", text);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert_eq!(got[0], "serving");
        assert!(got[1].starts_with("panic: runtime error"));
        assert!(got[1].ends_with("/app/main.go:15 +0x3f"));
        assert_eq!(got[2], "restarted");
    }

    #[test]
    fn a_start_pattern_joins_everything_up_to_the_next_start() {
        let text = "cont before any start\n[1] a\nb\nc\n[2] d\n[3] e\nf";
        assert_eq!(
            join("regex:^\\[\\d+\\]", text),
            ["cont before any start", "[1] a\nb\nc", "[2] d", "[3] e\nf"]
        );
    }

    #[test]
    fn a_record_ends_at_max_lines_and_at_the_size_limit_without_loss() {
        let mut ml = rule("regex:^S");
        ml.max_lines = 3;
        assert_eq!(
            join_with(&ml, 1 << 20, "S\n1\n2\n3\n4\nS"),
            ["S\n1\n2", "3\n4", "S"]
        );
        ml.max_lines = 500;
        // 9 bytes at most: "S\n123" fits, "\n4567" does not.
        let mut j = Joiner::default();
        let mut out = Vec::new();
        let mut emit = |r: Record<'_>| out.push((r.msg.to_vec(), r.truncated));
        for (i, l) in ["S", "123", "4567", "89"].iter().enumerate() {
            let rec = Record {
                time: b"",
                stream: Stream::Stdout,
                msg: l.as_bytes(),
                partial: false,
                truncated: false,
                malformed: false,
                start: 0,
            };
            j.push(&ml, 9, Instant::now(), rec, i as u64, &mut emit);
        }
        assert_eq!(j.start(), Some(2), "the open record begins at the cut line");
        j.take(Stream::Stdout, &mut emit);
        assert_eq!(
            out,
            [(b"S\n123".to_vec(), true), (b"4567\n89".to_vec(), false)]
        );
    }

    #[test]
    fn lines_that_cannot_be_continued_are_not_held() {
        let ml = rule("python");
        let mut j = Joiner::default();
        let mut n = 0;
        let rec = Record {
            time: b"",
            stream: Stream::Stdout,
            msg: b"plain",
            partial: false,
            truncated: false,
            malformed: false,
            start: 0,
        };
        j.push(&ml, 100, Instant::now(), rec, 0, &mut |_| n += 1);
        assert_eq!((n, j.start()), (1, None));
    }
}
