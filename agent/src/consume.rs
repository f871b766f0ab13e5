//! `bpftail consume`: reads a topic back and prints its records, one per
//! line, so that a person can check by hand what bpftail produced (keys,
//! headers, values) without another Kafka tool.
//!
//! It reads through librdkafka (the `rdkafka` crate, which the agent links
//! already for `--kafka-client rdkafka`): bpftail's own Kafka client
//! ([`crate::kafka`]) only produces. The consumer joins no consumer group:
//! it assigns itself every partition of the topic and commits nothing, so
//! it works against brokers with little group support (tansu) and leaves no
//! trace on the cluster.
//!
//! What it prints: records of every partition, in order within each
//! partition, as plain text or as JSON ([`text_line`], [`json_line`]).
//! Where it starts: at each partition's first record with
//! `--from-beginning`, else at its end as the first Fetch finds it
//! ([`Starts`]; a topic that appears while `consume` waits for it is read
//! from its first record). When it stops: with `--from-beginning` and
//! without `--follow`, at the ends the partitions had when it started
//! ([`Ends`]); otherwise on Ctrl-C or SIGTERM; in both cases after
//! `--max-records` if given. librdkafka's own log is silent unless
//! `--kafka-option debug=…` asks for it; problems are reported on stderr
//! in bpftail's words.

use std::io::{BufWriter, ErrorKind, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde::ser::SerializeMap;

use crate::config::ConsumeArgs;

/// How long the broker (and, without `--follow`, the topic) is looked for
/// before `consume` gives up.
const FIND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one consumer poll waits; also how quickly a stop is noticed.
const POLL: Duration = Duration::from_millis(100);

/// Buffered output is written out at least this often while records flow.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Runs `bpftail consume`; errors are printed to stderr, exit code 1.
pub fn main(args: &ConsumeArgs) -> ExitCode {
    match consume(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bpftail: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn consume(args: &ConsumeArgs) -> anyhow::Result<()> {
    if args.topic.is_empty() {
        bail!("--topic is empty");
    }
    // Starting at the end and stopping there would print nothing.
    let follow = args.follow || !args.from_beginning;
    let stop = stop_on_signals().context("cannot handle SIGINT/SIGTERM")?;
    let consumer = consumer(args)?;
    let topic = args.topic.as_str();

    // The topic's partitions, once the broker answers and the topic exists.
    let started = Instant::now();
    let mut reached = false;
    let mut said_waiting = false;
    let mut waited = false;
    let partitions = loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        // In slices of a second, to notice Ctrl-C.
        let found = partitions_of(&consumer, topic, Duration::from_secs(1));
        let late = started.elapsed() >= FIND_TIMEOUT;
        match found {
            Ok(Some(p)) => break p,
            Ok(None) => {
                reached = true;
                if !follow && late {
                    bail!("topic {topic} does not exist on {}", args.brokers);
                }
                if follow && !said_waiting {
                    eprintln!(
                        "bpftail: topic {topic} does not exist on {} yet; waiting for it (Ctrl-C to stop)",
                        args.brokers
                    );
                    said_waiting = true;
                }
                waited = true;
            }
            Err(Lookup::Refused(why)) => bail!("{why}"),
            Err(Lookup::Unreachable(e)) => {
                if late && !(reached && follow) {
                    drain_events(&consumer);
                    let why = consumer.context().take_error().unwrap_or(e);
                    bail!("cannot reach Kafka at {}: {}", args.brokers, plain(&why));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    // A topic that did not exist when consume started holds only records
    // produced since: all of them are new.
    let start = if args.from_beginning || waited {
        Offset::Beginning
    } else {
        Offset::End
    };
    // Records stamped up to a second before now count as new (clocks of
    // the producers and of this host differ a little).
    let since_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
        - 1000;
    let mut starts = (start == Offset::End).then(|| Starts::new(since_ms));

    // Without --follow: the end is where every partition is now.
    let mut ends = if follow {
        None
    } else {
        Some(ends_now(&consumer, topic, &partitions, &args.brokers)?)
    };
    let assigned: Vec<i32> = match &ends {
        Some(e) => e.pending().collect(),
        None => partitions,
    };
    if assigned.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for &p in &assigned {
        tpl.add_partition_offset(topic, p, start)
            .context("partition list")?;
    }
    consumer
        .assign(&tpl)
        .with_context(|| format!("cannot read topic {topic}"))?;

    let stdout = std::io::stdout();
    let mut out = Out {
        w: BufWriter::with_capacity(64 * 1024, stdout.lock()),
        flushed: Instant::now(),
    };
    let mut line = String::new();
    let mut printed = 0u64;
    let mut last_error: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        match consumer.poll(POLL) {
            None => {
                if !out.flush()? || reader_gone(&std::io::stdout()) {
                    return Ok(());
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let Some(e) = &mut ends {
                    e.at_end(p);
                }
                if let Some(s) = &mut starts {
                    s.at_end(p);
                }
            }
            Some(Err(e)) => {
                // One line per trouble: a broker that stays away fails
                // every connection (bootstrap, broker, coordinator) at every
                // retry; it is said again once a minute.
                if last_error.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    let why = consumer
                        .context()
                        .take_error()
                        .unwrap_or_else(|| e.to_string());
                    eprintln!("bpftail: Kafka: {}", plain(&why));
                    last_error = Some(Instant::now());
                }
            }
            Some(Ok(m)) => {
                if let Some(s) = &mut starts
                    && !s.take(m.partition(), m.offset(), m.timestamp().to_millis(), || {
                        fetched_high(&consumer, topic, m.partition())
                    })
                {
                    continue;
                }
                if let Some(e) = &mut ends
                    && !e.take(m.partition(), m.offset(), || {
                        fetched_high(&consumer, topic, m.partition())
                    })
                {
                    continue;
                }
                let headers: Vec<(&str, Option<&[u8]>)> = m
                    .headers()
                    .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
                    .unwrap_or_default();
                let r = Record {
                    topic: m.topic(),
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis(),
                    key: m.key(),
                    headers: &headers,
                    value: m.payload(),
                };
                line.clear();
                if args.json {
                    json_line(&r, &mut line);
                } else {
                    text_line(&r, &mut line);
                }
                if !out.write(line.as_bytes())? {
                    return Ok(());
                }
                printed += 1;
                if args.max_records.is_some_and(|max| printed >= max) {
                    break;
                }
            }
        }
        if ends.as_ref().is_some_and(Ends::done) {
            break;
        }
    }
    out.flush()?;
    Ok(())
}

/// Where each of `partitions` ends now (ListOffsets).
fn ends_now(
    consumer: &BaseConsumer<Quiet>,
    topic: &str,
    partitions: &[i32],
    brokers: &str,
) -> anyhow::Result<Ends> {
    let mut marks = Vec::with_capacity(partitions.len());
    for &p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, FIND_TIMEOUT)
            .map_err(|e| {
                drain_events(consumer);
                let why = consumer
                    .context()
                    .take_error()
                    .unwrap_or_else(|| e.to_string());
                anyhow::anyhow!(
                    "cannot read the offsets of partition {p} of topic {topic} on {brokers}: {}",
                    plain(&why)
                )
            })?;
        marks.push((p, low, high));
    }
    Ok(Ends::new(marks))
}

/// Buffered stdout; `Ok(false)` once the reader has gone (EPIPE), which
/// ends `consume` quietly (`bpftail consume … | head`).
struct Out<W: Write> {
    w: W,
    flushed: Instant,
}

impl<W: Write> Out<W> {
    fn write(&mut self, line: &[u8]) -> anyhow::Result<bool> {
        if !still_open(self.w.write_all(line))? {
            return Ok(false);
        }
        if self.flushed.elapsed() >= FLUSH_EVERY {
            return self.flush();
        }
        Ok(true)
    }

    fn flush(&mut self) -> anyhow::Result<bool> {
        self.flushed = Instant::now();
        still_open(self.w.flush())
    }
}

/// Whether `out` is a pipe or socket whose reader has gone (poll(2)
/// reports an error or hang-up on it): `--follow … | head -1` ends at once,
/// not at the next record.
fn reader_gone(out: &impl std::os::fd::AsFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(out, PollFlags::empty())];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&now))
        .is_ok_and(|n| n > 0 && fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP))
}

fn still_open(r: std::io::Result<()>) -> anyhow::Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("cannot write to stdout"),
    }
}

/// The consumer: no group join (partitions are assigned), no commits.
fn consumer(args: &ConsumeArgs) -> anyhow::Result<BaseConsumer<Quiet>> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &args.brokers)
        .set("group.id", "bpftail-consume")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false")
        .set("fetch.wait.max.ms", "100");
    let mut verbose = false;
    for kv in &args.kafka_options {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--kafka-option {kv:?} is not KEY=VALUE");
        };
        let k = k.trim();
        if k.is_empty() {
            bail!("--kafka-option {kv:?} has an empty key");
        }
        if k == "bootstrap.servers" {
            bail!("--kafka-option bootstrap.servers: use --brokers");
        }
        verbose |= k == "debug" || k == "log_level";
        cc.set(k, v);
    }
    // The level the crate applies after creation, over `log_level`.
    cc.set_log_level(if verbose {
        RDKafkaLogLevel::Debug
    } else {
        RDKafkaLogLevel::Error
    });
    cc.create_with_context(Quiet {
        verbose,
        error: Mutex::default(),
    })
    .map_err(|e| anyhow::anyhow!("cannot set up the Kafka consumer: {e}"))
}

/// Why the partitions of a topic are not known.
enum Lookup {
    /// The broker did not answer (librdkafka's error).
    Unreachable(String),
    /// It answered no: nothing to wait for.
    Refused(String),
}

/// The partitions of `topic`, `None` while it does not exist.
fn partitions_of(
    consumer: &BaseConsumer<Quiet>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<Vec<i32>>, Lookup> {
    let md = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| {
        Lookup::Unreachable(match e.rdkafka_error_code() {
            Some(code) => code.to_string(),
            None => e.to_string(),
        })
    })?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    if let Some(err) = t.error() {
        let code = RDKafkaErrorCode::from(err);
        if code == RDKafkaErrorCode::TopicAuthorizationFailed {
            return Err(Lookup::Refused(format!(
                "not authorized to read topic {topic}"
            )));
        }
        if code == RDKafkaErrorCode::InvalidTopic {
            return Err(Lookup::Refused(format!(
                "{topic:?} is not a valid topic name"
            )));
        }
    }
    let mut p: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    p.sort_unstable();
    Ok((!p.is_empty()).then_some(p))
}

/// librdkafka's error text without the thread it came from
/// (`[thrd:main]: `).
fn plain(why: &str) -> &str {
    match why.strip_prefix("[thrd:").and_then(|r| r.split_once("]: ")) {
        Some((_, rest)) => rest,
        None => why,
    }
}

/// Lets librdkafka hand over what it logged and reported (before any
/// partition is assigned, so no record is lost), for [`Quiet::take_error`].
fn drain_events(consumer: &BaseConsumer<Quiet>) {
    for _ in 0..64 {
        let _ = consumer.poll(Duration::ZERO);
    }
}

/// librdkafka's log, silenced (printed only when the user asked for it with
/// `--kafka-option debug=…` or `log_level=…`); the last error it logged or
/// reported is kept, to say in bpftail's words what went wrong.
struct Quiet {
    verbose: bool,
    error: Mutex<Option<String>>,
}

impl Quiet {
    /// The last error librdkafka logged or reported since the last call.
    fn take_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn keep(&self, e: String) {
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    }
}

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if self.verbose {
            eprintln!("librdkafka: {level:?} {fac}: {message}");
        }
        if (level as i32) <= RDKafkaLogLevel::Error as i32 {
            self.keep(message.to_owned());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // "1/1 brokers are down" follows the error that says why (connection
        // refused, name not resolved, TLS handshake failed): keep that one.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown)
            && self.error.lock().is_ok_and(|e| e.is_some())
        {
            return;
        }
        self.keep(if reason.is_empty() {
            error.to_string()
        } else {
            reason.to_owned()
        });
    }
}

impl ConsumerContext for Quiet {}

/// Sets the returned flag on the first SIGINT or SIGTERM. The consumer loop
/// looks at it every [`POLL`]; a metadata or offset query can block longer,
/// so a second signal, or 2 s without the process having ended, exits at
/// once (code 130).
fn stop_on_signals() -> std::io::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int) = {
        let _in = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                flag.store(true, Ordering::SeqCst);
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                })
                .await;
                std::process::exit(130);
            });
        })?;
    Ok(stop)
}

/// One consumed record, as printed.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Unix milliseconds, if the record has a timestamp.
    pub timestamp: Option<i64>,
    pub key: Option<&'a [u8]>,
    /// In the record's order; a key may repeat.
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
    pub value: Option<&'a [u8]>,
}

/// Appends `r` as one line of text and its `\n`:
/// `partition=P offset=O key=K headers={k=v, k=v} value=V`. Keys and values
/// are lossy UTF-8 with control characters escaped ([`escape`]), so a
/// record is always exactly one line; a missing (null) key, header value
/// or value prints as `(null)`.
pub fn text_line(r: &Record<'_>, out: &mut String) {
    use std::fmt::Write as _;
    let _ = write!(out, "partition={} offset={} key=", r.partition, r.offset);
    escape_or_null(r.key, out);
    out.push_str(" headers={");
    for (i, (k, v)) in r.headers.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        escape(k.as_bytes(), out);
        out.push('=');
        escape_or_null(*v, out);
    }
    out.push_str("} value=");
    escape_or_null(r.value, out);
    out.push('\n');
}

fn escape_or_null(b: Option<&[u8]>, out: &mut String) {
    match b {
        Some(b) => escape(b, out),
        None => out.push_str("(null)"),
    }
}

/// Appends `bytes` as lossy UTF-8 on one line: `\n`, `\r`, `\t` and `\\`
/// as those escapes; other control characters (C0, DEL, C1) and the
/// Unicode line and paragraph separators as `\xHH` or `\u{HHHH}`; any
/// other printable character as is.
pub fn escape(bytes: &[u8], out: &mut String) {
    use std::fmt::Write as _;
    for c in String::from_utf8_lossy(bytes).chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// Appends `r` as one JSON object and its `\n`:
/// `{"topic","partition","offset","timestamp","key","headers","value"}`.
/// `timestamp` is Unix milliseconds or null; `key` and `value` lossy UTF-8
/// strings, null when absent; `headers` an object in the record's order
/// (a repeated key appears twice), values lossy UTF-8, null when absent.
pub fn json_line(r: &Record<'_>, out: &mut String) {
    #[derive(Serialize)]
    struct Json<'a> {
        topic: &'a str,
        partition: i32,
        offset: i64,
        timestamp: Option<i64>,
        key: Option<std::borrow::Cow<'a, str>>,
        headers: JsonHeaders<'a>,
        value: Option<std::borrow::Cow<'a, str>>,
    }
    struct JsonHeaders<'a>(&'a [(&'a str, Option<&'a [u8]>)]);
    impl Serialize for JsonHeaders<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in self.0 {
                m.serialize_entry(k, &v.map(String::from_utf8_lossy))?;
            }
            m.end()
        }
    }
    let j = Json {
        topic: r.topic,
        partition: r.partition,
        offset: r.offset,
        timestamp: r.timestamp,
        key: r.key.map(String::from_utf8_lossy),
        headers: JsonHeaders(r.headers),
        value: r.value.map(String::from_utf8_lossy),
    };
    // Serializing strings and integers into a String cannot fail.
    out.push_str(&serde_json::to_string(&j).unwrap_or_default());
    out.push('\n');
}

/// Where reading without `--follow` stops: the end each partition had at
/// the start. That end is the high watermark from ListOffsets, raised to
/// the high watermark of the first Fetch response that brings the
/// partition's records (tansu 0.6 answers ListOffsets with the last
/// batch's base offset + 1, short of the records after it; a Fetch right
/// after the start sees what was there at the start). A partition is done
/// once the record just below its end has been seen, or librdkafka reports
/// that it reached the partition's end (the offsets before it may hold no
/// record, e.g. transaction markers). Records at or past the end were
/// produced later and are left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ends {
    /// Partition → (end, whether the Fetch high watermark was applied),
    /// for the partitions not done yet.
    pending: std::collections::BTreeMap<i32, (i64, bool)>,
}

impl Ends {
    /// From `(partition, low, high)` watermarks; a partition with
    /// `low >= high` is empty and done already.
    pub fn new(marks: impl IntoIterator<Item = (i32, i64, i64)>) -> Ends {
        Ends {
            pending: marks
                .into_iter()
                .filter(|&(_, low, high)| low < high)
                .map(|(p, _, high)| (p, (high, false)))
                .collect(),
        }
    }

    /// The partitions still to read.
    pub fn pending(&self) -> impl Iterator<Item = i32> + '_ {
        self.pending.keys().copied()
    }

    /// Whether the record at `offset` of `partition` is printed; notes the
    /// partition done if it is the last one before the end.
    /// `fetched_high` gives the high watermark of the latest Fetch
    /// response; it is asked once per partition, at its first record.
    pub fn take(
        &mut self,
        partition: i32,
        offset: i64,
        fetched_high: impl FnOnce() -> Option<i64>,
    ) -> bool {
        let Some((high, raised)) = self.pending.get_mut(&partition) else {
            return false;
        };
        if !*raised {
            *raised = true;
            if let Some(h) = fetched_high() {
                *high = (*high).max(h);
            }
        }
        let high = *high;
        if offset + 1 >= high {
            self.pending.remove(&partition);
        }
        offset < high
    }

    /// librdkafka reached the end of `partition`.
    pub fn at_end(&mut self, partition: i32) {
        self.pending.remove(&partition);
    }

    /// Every partition is done.
    pub fn done(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Where reading from the end (without `--from-beginning`) starts.
/// librdkafka starts at the offset ListOffsets answers; tansu 0.6 answers
/// with the last batch's base offset + 1, so the first Fetch brings the
/// rest of that batch: records from before the start. On a busy topic of
/// a correct broker, the first Fetch brings only new records, and more
/// than its high watermark covers. So a partition's first records are
/// told apart by their timestamp (the producer's, or the broker's log
/// append time): those from before `since_ms` are left out, and from the
/// first new one on everything is printed. Without timestamps, the high
/// watermark of the Fetch that brought the first record decides. The end
/// reached (an empty first answer) means every later record is new.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Starts {
    /// Unix ms: records stamped earlier are from before the start.
    since_ms: i64,
    /// Partition → the first offset printed, once known.
    from: std::collections::BTreeMap<i32, i64>,
}

impl Starts {
    pub fn new(since_ms: i64) -> Starts {
        Starts {
            since_ms,
            from: Default::default(),
        }
    }

    /// Whether the record at `offset` of `partition`, stamped `timestamp`
    /// (Unix ms), is printed. `fetched_high` gives the high watermark of
    /// the latest Fetch response; it is asked only for a partition's first
    /// record, and only if that has no timestamp.
    pub fn take(
        &mut self,
        partition: i32,
        offset: i64,
        timestamp: Option<i64>,
        fetched_high: impl FnOnce() -> Option<i64>,
    ) -> bool {
        if let Some(from) = self.from.get(&partition) {
            return offset >= *from;
        }
        let from = match timestamp {
            Some(ts) if ts >= self.since_ms => offset,
            // From before the start; the next record decides again.
            Some(_) => return false,
            None => fetched_high().unwrap_or(offset),
        };
        self.from.insert(partition, from);
        offset >= from
    }

    /// librdkafka reached the end of `partition`.
    pub fn at_end(&mut self, partition: i32) {
        self.from.entry(partition).or_insert(i64::MIN);
    }
}

/// The high watermark of `partition` in the latest Fetch response, as
/// librdkafka keeps it (`rd_kafka_get_watermark_offsets`, which the crate
/// does not wrap; it asks the broker nothing).
fn fetched_high(consumer: &BaseConsumer<Quiet>, topic: &str, partition: i32) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives (borrowed
    // for the call); `topic` is a NUL-terminated string that outlives the
    // call; `low` and `high` are valid for writes. The function only reads
    // librdkafka's cached partition state under its lock.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(headers: &'a [(&'a str, Option<&'a [u8]>)]) -> Record<'a> {
        Record {
            topic: "k8s-logs",
            partition: 2,
            offset: 41,
            timestamp: Some(1_700_000_000_123),
            key: Some(b"ns/pod/c"),
            headers,
            value: Some(b"hello world"),
        }
    }

    fn text(r: &Record<'_>) -> String {
        let mut s = String::new();
        text_line(r, &mut s);
        s
    }

    fn json(r: &Record<'_>) -> String {
        let mut s = String::new();
        json_line(r, &mut s);
        s
    }

    #[test]
    fn text_lines_hold_every_field() {
        let h: &[(&str, Option<&[u8]>)] = &[("stream", Some(b"stdout")), ("pod", Some(b"web-1"))];
        assert_eq!(
            text(&record(h)),
            "partition=2 offset=41 key=ns/pod/c headers={stream=stdout, pod=web-1} value=hello world\n"
        );
        let r = Record {
            key: None,
            value: None,
            headers: &[("x", None)],
            ..record(&[])
        };
        assert_eq!(
            text(&r),
            "partition=2 offset=41 key=(null) headers={x=(null)} value=(null)\n"
        );
        assert_eq!(
            text(&record(&[])),
            "partition=2 offset=41 key=ns/pod/c headers={} value=hello world\n"
        );
    }

    #[test]
    fn a_record_is_always_one_line_of_text() {
        let value = b"a\nb\r\nc\td\\e\x1b[31m\x7f\x00 \xff caf\xc3\xa9 \xc2\x85 \xe2\x80\xa8 \xf0\x9f\x99\x82";
        let h: &[(&str, Option<&[u8]>)] = &[("k\n", Some(b"v\r"))];
        let r = Record {
            key: Some(b"k\tey"),
            headers: h,
            value: Some(value),
            ..record(&[])
        };
        let line = text(&r);
        assert_eq!(line.lines().count(), 1, "{line:?}");
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains(['\n', '\r']));
        assert_eq!(
            line,
            "partition=2 offset=41 key=k\\tey headers={k\\n=v\\r} value=a\\nb\\r\\nc\\td\\\\e\\x1b[31m\\x7f\\x00 \u{fffd} café \\u{0085} \\u{2028} 🙂\n"
        );
    }

    #[test]
    fn json_lines_parse_and_keep_header_order() {
        let h: &[(&str, Option<&[u8]>)] = &[
            ("z", Some(b"1")),
            ("a", Some(b"2\n")),
            ("z", Some(b"3")),
            ("n", None),
        ];
        let r = Record {
            value: Some(b"{\"msg\":\"x\"}\n\xff"),
            ..record(h)
        };
        let line = json(&r);
        assert_eq!(line.matches('\n').count(), 1);
        assert!(
            line.contains(r#""headers":{"z":"1","a":"2\n","z":"3","n":null}"#),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["topic"], "k8s-logs");
        assert_eq!(v["partition"], 2);
        assert_eq!(v["offset"], 41);
        assert_eq!(v["timestamp"], 1_700_000_000_123i64);
        assert_eq!(v["key"], "ns/pod/c");
        assert_eq!(v["value"], "{\"msg\":\"x\"}\n\u{fffd}");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 7);

        let bare = json(&Record {
            timestamp: None,
            key: None,
            value: None,
            ..record(&[])
        });
        assert_eq!(
            bare,
            "{\"topic\":\"k8s-logs\",\"partition\":2,\"offset\":41,\"timestamp\":null,\"key\":null,\"headers\":{},\"value\":null}\n"
        );
    }

    #[test]
    fn errors_lose_the_librdkafka_thread_name() {
        assert_eq!(
            plain("[thrd:GroupCoordinator]: GroupCoordinator: Connect failed"),
            "GroupCoordinator: Connect failed"
        );
        assert_eq!(plain("1/1 brokers are down"), "1/1 brokers are down");
    }

    #[test]
    fn ends_stop_at_the_watermarks_seen_at_the_start() {
        // Partition 0 holds 0..3, 1 is empty, 2 holds 5..6 (older ones
        // deleted).
        let mut e = Ends::new([(0, 0, 3), (1, 4, 4), (2, 5, 6)]);
        assert_eq!(e.pending().collect::<Vec<_>>(), [0, 2]);
        let none = || None;
        assert!(e.take(0, 0, || Some(3)) && e.take(0, 1, none));
        assert!(!e.done());
        assert!(e.take(2, 5, none));
        assert_eq!(e.pending().collect::<Vec<_>>(), [0]);
        // Produced after the start: not printed.
        assert!(!e.take(2, 6, none));
        assert!(e.take(0, 2, none));
        assert!(e.done());
        assert!(!e.take(0, 3, none));
    }

    #[test]
    fn ends_accept_the_partition_end_for_offsets_without_records() {
        // Offsets 8 and 9 hold no record (e.g. transaction markers): the
        // partition ends at 10 without a record at 9.
        let mut e = Ends::new([(0, 0, 10), (3, 0, 1)]);
        assert!(e.take(0, 7, || Some(10)));
        e.at_end(0);
        assert!(!e.done());
        assert!(!e.take(0, 10, || None), "past the end seen at the start");
        assert!(e.take(3, 0, || None));
        assert!(e.done());
        assert!(Ends::new([]).done());
        assert!(Ends::new([(0, 0, 0)]).done());
    }

    #[test]
    fn starts_leave_out_what_the_first_fetch_brings_from_before() {
        let since = 1_000_000;
        let mut s = Starts::new(since);
        // Partition 0 (tansu): the first Fetch brings 10 and 11, stamped
        // before the start, then 12, stamped after.
        let never = || -> Option<i64> { panic!("timestamps decide") };
        assert!(!s.take(0, 10, Some(since - 5_000), never));
        assert!(!s.take(0, 11, Some(since - 4_000), never));
        assert!(s.take(0, 12, Some(since + 10), never));
        // From there on, everything, whatever its stamp.
        assert!(s.take(0, 13, Some(since - 9_000), never));
        // Partition 3 (a correct broker, a busy topic): the first Fetch
        // holds only new records, beyond its high watermark: all printed.
        assert!(s.take(3, 500, Some(since + 1), || Some(900)));
        assert!(s.take(3, 501, Some(since + 2), never));
        // Partition 1: the first answer is empty (the end is reached):
        // everything after it is new.
        s.at_end(1);
        assert!(s.take(1, 5, Some(since - 1), never));
        // Partition 2, no timestamps: the first Fetch's high watermark.
        let mut asked = 0;
        let mut ask = || {
            asked += 1;
            Some(12)
        };
        assert!(!s.take(2, 10, None, &mut ask));
        assert!(!s.take(2, 11, None, &mut ask));
        assert!(s.take(2, 12, None, &mut ask));
        assert_eq!(asked, 1);
        // No watermark either: from its first record on.
        assert!(s.take(4, 7, None, || None) && s.take(4, 8, None, || None));
    }

    #[test]
    fn ends_are_raised_to_the_first_fetched_high_watermark() {
        // tansu: ListOffsets says 10 (the last batch starts at 9), the
        // Fetch response 12 (records 9, 10 and 11).
        let mut e = Ends::new([(0, 0, 10)]);
        let mut asked = 0;
        for o in 0..12 {
            assert!(
                e.take(0, o, || {
                    asked += 1;
                    Some(12 + o)
                }),
                "{o}"
            );
        }
        assert_eq!(asked, 1, "asked at the first record only");
        assert!(e.done());
        // A lower fetched watermark (a broker that answered ListOffsets
        // later) never lowers the end.
        let mut e = Ends::new([(0, 0, 5)]);
        assert!(e.take(0, 0, || Some(2)) && e.take(0, 3, || None));
        assert!(!e.done());
    }
}
