//! Faults around the agent's own state, end to end: the real `bpftail`
//! binary, a real broker, a real consumer. A data directory that fills up,
//! checkpoints that are truncated, corrupt or from a newer bpftail. (A
//! data directory that is missing or read-only at start is in
//! `operator.rs`: the agent refuses to start and says why.)

mod support;

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::scratch::ScratchFs;
use support::*;

const WRITERS: usize = 4;
const LINE_LEN: usize = 120;

impl Node {
    fn log_of(&self, w: usize) -> PathBuf {
        container_dir(
            &self.pods,
            "ns",
            &format!("pod-{w}"),
            &format!("uid-{w}"),
            "app",
        )
        .join("0.log")
    }

    /// Appends lines `seqs` of every writer to its `0.log`.
    fn write(&self, seqs: Range<u64>) {
        for w in 0..WRITERS {
            let mut out = LineWriter::create(&self.log_of(w));
            for seq in seqs.clone() {
                out.line(w, seq, LINE_LEN);
            }
        }
    }

    fn checkpoint(&self) -> PathBuf {
        self.data.join("checkpoints.json")
    }
}

/// Waits until lines `0..upto` of every writer have arrived; returns the
/// records.
#[track_caller]
fn wait_arrived(collector: &Collector, node: &Node, upto: u64) -> Vec<Received> {
    collector.wait_for(
        Duration::from_secs(120),
        || {
            format!(
                "lines 0..{upto} of {WRITERS} writers\nagent log:\n{}",
                node.agent_log()
            )
        },
        |r| unique(r, WRITERS, upto) == WRITERS * upto as usize,
    )
}

/// Every line of `0..lines` arrived, none out of order; resends allowed.
#[track_caller]
fn assert_complete(node: &Node, records: &[Received], lines: u64) -> Tally {
    let t = tally(records, WRITERS, lines);
    assert_eq!(t.missing, 0, "{t:?}\nagent log:\n{}", node.agent_log());
    assert_eq!(t.jumps, 0, "{t:?}\nagent log:\n{}", node.agent_log());
    assert_eq!(t.foreign, 0, "{t:?}");
    t
}

/// Fills the file system of `dir` with a file of its own until a write
/// fails; returns the file (remove it to free the space).
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let page = [0u8; 4096];
    while f.write(&page).is_ok_and(|n| n > 0) {}
    while f.write(&[0]).is_ok_and(|n| n > 0) {}
    path
}

#[test]
fn a_full_data_directory_keeps_shipping_keeps_the_last_good_checkpoint_and_recovers() {
    let broker = Broker::start();
    broker.create_topic("logs", 1);
    let fs = ScratchFs::small_tmpfs("256k");
    let mut node = Node::new();
    node.data = fs.path().to_owned();
    let args = node.args(
        &broker.addr(),
        "logs",
        &[
            "--format",
            "raw",
            "--checkpoint-interval-ms",
            "100",
            "--sweep-interval-ms",
            "200",
        ],
    );
    let agent = Agent::start(&args, &node.log);
    let collector = Collector::start(&broker.addr(), "logs");
    node.write(0..5_000);
    wait_arrived(&collector, &node, 5_000);
    agent.wait_metric(
        Duration::from_secs(30),
        "bpftail_checkpoint_writes_total",
        1,
    );

    // Full. Until two saves in a row fail (one racing the filler may take
    // a page the filler left; it is topped up), lines keep coming so that
    // there is something to save.
    let filler = fill(fs.path());
    let errors_total = "bpftail_checkpoint_errors_total";
    let writes_total = "bpftail_checkpoint_writes_total";
    let mut next = 5_000;
    wait_until(
        Duration::from_secs(120),
        || "two checkpoint writes in a row to fail".into(),
        || {
            fill(fs.path());
            let (writes, errors) = (agent.metric(writes_total), agent.metric(errors_total));
            for failed in 1..=2 {
                node.write(next..next + 500);
                next += 500;
                agent.wait_metric(Duration::from_secs(30), errors_total, errors + failed);
            }
            agent.metric(writes_total) == writes
        },
    );
    agent.wait_log(Duration::from_secs(5), "checkpoint write failed");
    assert_eq!(agent.metric("bpftail_checkpoint_failing"), 1);
    let good = std::fs::read(node.checkpoint()).unwrap();
    let writes = agent.metric(writes_total);
    // Shipping goes on while nothing can be saved.
    node.write(next..next + 5_000);
    next += 5_000;
    wait_arrived(&collector, &node, next);
    let errors = agent.metric(errors_total);
    node.write(next..next + 100);
    next += 100;
    agent.wait_metric(Duration::from_secs(30), errors_total, errors + 1);
    assert_eq!(agent.metric("bpftail_checkpoint_failing"), 1);
    assert_eq!(agent.metric(writes_total), writes);
    assert_eq!(
        std::fs::read(node.checkpoint()).unwrap(),
        good,
        "the last good checkpoint is kept as it was"
    );
    let parsed: serde_json::Value = serde_json::from_slice(&good).unwrap();
    assert_eq!(parsed["version"], "1");
    assert!(!fs.path().join("checkpoints.json.tmp").exists());

    // kill -9 while full: the restart resends from the last good
    // checkpoint and goes on shipping, still unable to save.
    agent.kill9();
    let agent = Agent::start(&args, &node.log);
    node.write(next..next + 5_000);
    next += 5_000;
    wait_arrived(&collector, &node, next);
    agent.wait_metric(Duration::from_secs(30), "bpftail_checkpoint_failing", 1);

    // Space returns: saving resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    node.write(next..next + 100);
    next += 100;
    agent.wait_log(Duration::from_secs(60), "checkpoint writes succeed again");
    wait_until(
        Duration::from_secs(30),
        || "bpftail_checkpoint_failing to go back to 0".into(),
        || agent.metric("bpftail_checkpoint_failing") == 0,
    );
    node.write(next..next + 5_000);
    next += 5_000;
    let records = wait_arrived(&collector, &node, next);
    agent.settle(Duration::from_secs(60));
    assert!(agent.stop().success());
    let t = assert_complete(&node, &records, next);
    // One step back per file at the restart, from the last good checkpoint.
    assert!(t.rewinds <= WRITERS, "{t:?}");
    assert!(
        t.duplicates > 0,
        "the kill -9 resent the unsaved window: {t:?}"
    );
    eprintln!("full data dir: {t:?}");
    // The final checkpoint holds every file at its end.
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.checkpoint()).unwrap()).unwrap();
    let files = doc["files"].as_array().unwrap();
    assert_eq!(files.len(), WRITERS, "{doc}");
    for f in files {
        let size = std::fs::metadata(f["path"].as_str().unwrap())
            .unwrap()
            .len();
        assert_eq!(f["offset"].as_u64(), Some(size), "{doc}");
    }
}

#[test]
fn an_unusable_checkpoint_resumes_from_the_previous_one_or_the_start_and_skips_nothing() {
    let broker = Broker::start();
    broker.create_topic("logs", 1);
    let node = Node::new();
    let args = node.args(
        &broker.addr(),
        "logs",
        &[
            "--format",
            "raw",
            "--checkpoint-interval-ms",
            "100",
            "--sweep-interval-ms",
            "200",
        ],
    );
    let collector = Collector::start(&broker.addr(), "logs");
    let prev = node.data.join("checkpoints.json.prev");
    // One agent's run until `upto` lines arrived; returns the bytes it says
    // it read again, and the duplicates it sent.
    let run = |upto: u64, expect_log: Option<&str>| -> (u64, usize) {
        let before = collector.received();
        let agent = Agent::start(&args, &node.log);
        if let Some(text) = expect_log {
            agent.wait_log(Duration::from_secs(30), text);
        }
        let records = wait_arrived(&collector, &node, upto);
        agent.settle(Duration::from_secs(60));
        let replayed = agent.metric("bpftail_checkpoint_replay_bytes_total");
        assert!(agent.stop().success());
        let dups =
            tally(&records, WRITERS, upto).duplicates - tally(&before, WRITERS, upto).duplicates;
        (replayed, dups)
    };

    // A clean run leaves the newest checkpoint and the one before.
    node.write(0..5_000);
    node.write(5_000..10_000);
    let (replayed, dups) = run(10_000, None);
    assert_eq!((replayed, dups), (0, 0));
    assert!(prev.exists());

    // Cut in half (a power loss on a file system that lost the rename's
    // ordering): the previous checkpoint is used.
    node.write(10_000..15_000);
    let newest = std::fs::read(node.checkpoint()).unwrap();
    std::fs::write(node.checkpoint(), &newest[..newest.len() / 2]).unwrap();
    let (replayed, dups) = run(15_000, Some("resuming from the previous one"));
    assert!(node.data.join("checkpoints.json.corrupt").exists());
    assert!(replayed > 0);
    assert!(
        dups as u64 * LINE_LEN as u64 <= replayed,
        "resent {dups} lines, counted {replayed} bytes"
    );
    eprintln!("truncated: {dups} lines resent, {replayed} bytes counted");

    // Both unusable, and a rotation while no agent ran: every file from
    // its start, the rotated ones too (their last lines were never sent).
    node.write(15_000..20_000);
    for w in 0..WRITERS {
        let live = node.log_of(w);
        std::fs::rename(&live, live.with_file_name("0.log.20261130-120000")).unwrap();
    }
    node.write(20_000..25_000);
    std::fs::write(
        node.checkpoint(),
        b"{\"version\":\"1\",\"files\":[{\"dev\":",
    )
    .unwrap();
    std::fs::write(&prev, b"\0\0\0\0").unwrap();
    let (replayed, dups) = run(25_000, Some("no previous one is"));
    assert!(dups as u64 * LINE_LEN as u64 <= replayed);
    assert!(dups > 0);
    eprintln!("both corrupt: {dups} lines resent, {replayed} bytes counted");

    // From a newer bpftail (a rollback after an upgrade), no previous one.
    node.write(25_000..30_000);
    std::fs::write(
        node.checkpoint(),
        br#"{"version":"2","files":{"new":"layout"}}"#,
    )
    .unwrap();
    std::fs::remove_file(&prev).unwrap();
    let (replayed, dups) = run(30_000, Some("written by a newer bpftail"));
    assert!(node.data.join("checkpoints.json.newer").exists());
    assert!(dups as u64 * LINE_LEN as u64 <= replayed);
    eprintln!("newer layout: {dups} lines resent, {replayed} bytes counted");

    let t = assert_complete(&node, &collector.received(), 30_000);
    eprintln!("all phases: {t:?}");
}

/// Appends lines `seqs` of writer `w` to `path`.
fn write_to(path: &Path, w: usize, seqs: Range<u64>) {
    let mut out = LineWriter::create(path);
    for seq in seqs {
        out.line(w, seq, LINE_LEN);
    }
}

/// Waits until every `(writer, lines)` pair's lines have arrived.
#[track_caller]
fn wait_lines(collector: &Collector, node: &Node, want: &[(usize, Range<u64>)]) {
    collector.wait_for(
        Duration::from_secs(120),
        || format!("lines {want:?}\nagent log:\n{}", node.agent_log()),
        |r| {
            let seen: std::collections::HashSet<(usize, u64)> =
                r.iter().filter_map(|r| parse_seq(&r.value)).collect();
            want.iter()
                .all(|(w, seqs)| seqs.clone().all(|s| seen.contains(&(*w, s))))
        },
    );
}

/// Makes `n` empty files named `<prefix><i>` in `dir`.
fn junk(dir: &Path, prefix: &str, n: usize) {
    for i in 0..n {
        std::fs::File::create(dir.join(format!("{prefix}{i}"))).unwrap();
    }
}

#[test]
fn a_hostile_pods_tree_is_counted_bounded_and_never_fatal() {
    let broker = Broker::start();
    broker.create_topic("logs", 1);
    let node = Node::new();
    let args = node.args(
        &broker.addr(),
        "logs",
        &["--format", "raw", "--sweep-interval-ms", "500"],
    );
    // 100,000 entries in the pods dir that are no pod dirs, and a
    // container dir with more rotated names than are followed beside its
    // live log.
    junk(&node.pods, "junk-", 100_000);
    let crowded = node.log_of(0);
    junk(crowded.parent().unwrap(), "0.log.20261130-", 1_500);
    for w in 0..WRITERS {
        write_to(&node.log_of(w), w, 0..1_000);
    }
    let agent = Agent::start(&args, &node.log);
    let collector = Collector::start(&broker.addr(), "logs");
    wait_lines(
        &collector,
        &node,
        &[(0, 0..1_000), (1, 0..1_000), (2, 0..1_000), (3, 0..1_000)],
    );
    agent.wait_metric(Duration::from_secs(30), "bpftail_listings_cut_total", 1);

    // Log paths that turn into a directory, a FIFO, a symlink loop.
    let turned = [1, 2, 3].map(|w| node.log_of(w));
    for p in &turned {
        std::fs::remove_file(p).unwrap();
    }
    std::fs::create_dir(&turned[0]).unwrap();
    let fifo = std::ffi::CString::new(turned[1].to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    std::os::unix::fs::symlink("0.log", &turned[2]).unwrap();
    write_to(&crowded, 0, 1_000..2_000);
    // A new container is found (its first write makes the agent list the
    // pods dir again, and so meet the three).
    let late = |w: usize| {
        container_dir(
            &node.pods,
            "ns",
            &format!("pod-{w}"),
            &format!("uid-{w}"),
            "app",
        )
        .join("0.log")
    };
    write_to(&late(4), 4, 0..1_000);
    wait_lines(&collector, &node, &[(0, 1_000..2_000), (4, 0..1_000)]);
    agent.wait_metric(
        Duration::from_secs(60),
        "bpftail_files_not_regular_total",
        2,
    );
    agent.wait_metric(Duration::from_secs(60), "bpftail_open_errors_total", 1);

    // The next scans count nothing twice.
    let counted = |a: &Agent| {
        [
            "bpftail_files_not_regular_total",
            "bpftail_open_errors_total",
            "bpftail_listings_cut_total",
        ]
        .map(|m| a.metric(m))
    };
    let before = counted(&agent);
    assert_eq!(before, [2, 1, 1], "{}", node.agent_log());
    let scans = agent.metric("bpftail_scans_total");
    write_to(&late(6), 6, 0..1_000);
    wait_lines(&collector, &node, &[(6, 0..1_000)]);
    agent.wait_metric(Duration::from_secs(30), "bpftail_scans_total", scans + 1);
    assert_eq!(counted(&agent), before);
    let log = node.agent_log();
    assert_eq!(
        log.matches("not a regular file where a log file should be")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("directory holds more log entries than are followed")
            .count(),
        1,
        "{log}"
    );

    // The pods dir deleted, then made again with a new pod in it.
    std::fs::remove_dir_all(&node.pods).unwrap();
    agent.wait_log(Duration::from_secs(60), "log directory is missing");
    let again = container_dir(&node.pods, "ns", "pod-5", "uid-5", "app").join("0.log");
    write_to(&again, 5, 0..1_000);
    wait_lines(&collector, &node, &[(5, 0..1_000)]);
    assert!(agent.healthz());
    let peak = agent.peak_rss_kib();
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
    eprintln!("hostile tree: peak RSS {peak} KiB");
    assert!(agent.stop().success());
}

/// Makes directory `name` in the directory `parent_fd`, and opens it.
fn mkdir_at(parent_fd: i32, name: &str) -> i32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid descriptor and NUL-terminated name.
    unsafe {
        assert_eq!(libc::mkdirat(parent_fd, c.as_ptr(), 0o755), 0);
        let fd = libc::openat(parent_fd, c.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY);
        assert!(fd >= 0);
        fd
    }
}

#[test]
fn a_4000_byte_log_path_is_shipped_and_one_past_path_max_is_counted_not_fatal() {
    let broker = Broker::start();
    broker.create_topic("logs", 1);
    let mut node = Node::new();
    // A pods dir about 3,800 bytes deep.
    while node.pods.as_os_str().len() < 3_800 {
        node.pods.push("d".repeat(200));
    }
    std::fs::create_dir_all(&node.pods).unwrap();
    let args = node.args(
        &broker.addr(),
        "logs",
        &["--format", "raw", "--sweep-interval-ms", "500"],
    );
    // A log path of 4,000 bytes.
    let short = node.pods.join("ns_p_u").join("app").join("0.log");
    let pad = 4_000 - short.as_os_str().len();
    let long = container_dir(
        &node.pods,
        "ns",
        &format!("p{}", "x".repeat(pad)),
        "u",
        "app",
    )
    .join("0.log");
    assert_eq!(long.as_os_str().len(), 4_000);
    write_to(&long, 0, 0..1_000);
    // A container dir whose path is past PATH_MAX (4,096 bytes): it can be
    // made relative to its parent, but not looked at by its path.
    let pod = node.pods.join(format!("ns_q{}_u", "y".repeat(200)));
    std::fs::create_dir(&pod).unwrap();
    let pod_fd = std::fs::File::open(&pod).unwrap();
    let name = "z".repeat(255);
    let cfd = mkdir_at(std::os::fd::AsRawFd::as_raw_fd(&pod_fd), &name);
    assert!(pod.join(&name).as_os_str().len() > 4_096);
    // SAFETY: valid descriptor, NUL-terminated name.
    let log_fd = unsafe {
        libc::openat(
            cfd,
            c"0.log".as_ptr(),
            libc::O_CREAT | libc::O_WRONLY,
            0o644,
        )
    };
    assert!(log_fd >= 0);
    // SAFETY: a valid descriptor and buffer.
    unsafe {
        let line = b"2026-11-30T10:00:00.000000000Z stdout F unreachable\n";
        assert_eq!(
            libc::write(log_fd, line.as_ptr().cast(), line.len()),
            line.len() as isize
        );
        libc::close(log_fd);
        libc::close(cfd);
    }

    let agent = Agent::start(&args, &node.log);
    let collector = Collector::start(&broker.addr(), "logs");
    wait_lines(&collector, &node, &[(0, 0..1_000)]);
    agent.wait_metric(Duration::from_secs(30), "bpftail_listing_errors_total", 1);
    write_to(&long, 0, 1_000..2_000);
    let scans = agent.metric("bpftail_scans_total");
    let other = container_dir(&node.pods, "ns", "p2", "u2", "app").join("0.log");
    write_to(&other, 1, 0..1_000);
    wait_lines(&collector, &node, &[(0, 1_000..2_000), (1, 0..1_000)]);
    agent.wait_metric(Duration::from_secs(30), "bpftail_scans_total", scans + 1);
    assert_eq!(agent.metric("bpftail_listing_errors_total"), 1, "said once");
    let log = node.agent_log();
    assert_eq!(log.matches("File name too long").count(), 1, "{log}");
    assert!(
        !collector
            .received()
            .iter()
            .any(|r| r.value == b"unreachable")
    );
    assert!(agent.stop().success());
}

/// Moves the wall clock (CLOCK_REALTIME) by a number of seconds from the
/// true time; puts it back, as the true time, when dropped. The monotonic
/// clock keeps the true time meanwhile.
struct WallClock {
    true_at_start: libc::timespec,
    mono_at_start: std::time::Instant,
}

impl WallClock {
    fn new() -> WallClock {
        WallClock {
            true_at_start: now_realtime(),
            mono_at_start: std::time::Instant::now(),
        }
    }

    /// Sets the wall clock to the true time plus `offset_s`.
    fn set(&self, offset_s: i64) {
        let elapsed = self.mono_at_start.elapsed();
        let mut t = self.true_at_start;
        t.tv_sec += elapsed.as_secs() as i64 + offset_s;
        t.tv_nsec += elapsed.subsec_nanos() as i64;
        if t.tv_nsec >= 1_000_000_000 {
            t.tv_sec += 1;
            t.tv_nsec -= 1_000_000_000;
        }
        // SAFETY: a valid timespec; needs CAP_SYS_TIME (the tests run as root).
        let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &t) };
        assert_eq!(rc, 0, "clock_settime: {}", std::io::Error::last_os_error());
    }
}

impl Drop for WallClock {
    fn drop(&mut self) {
        self.set(0);
    }
}

fn now_realtime() -> libc::timespec {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut t) };
    assert_eq!(rc, 0);
    t
}

#[test]
fn the_wall_clock_jumping_an_hour_back_and_forth_stalls_no_timer_and_loses_nothing() {
    let broker = Broker::start();
    broker.create_topic("logs", 1);
    let node = Node::new();
    let args = node.args(
        &broker.addr(),
        "logs",
        &[
            "--format",
            "raw",
            "--checkpoint-interval-ms",
            "100",
            "--sweep-interval-ms",
            "500",
        ],
    );
    let agent = Agent::start(&args, &node.log);
    let collector = Collector::start(&broker.addr(), "logs");
    node.write(0..5_000);
    wait_arrived(&collector, &node, 5_000);
    let clock = WallClock::new();
    // The timers go on (sweeps, checkpoints) and lines flow, at each jump.
    let mut upto = 5_000;
    for offset_s in [-3_600, 3_600, 0] {
        clock.set(offset_s);
        let (sweeps, saves) = (
            agent.metric("bpftail_sweeps_total"),
            agent.metric("bpftail_checkpoint_writes_total"),
        );
        node.write(upto..upto + 5_000);
        upto += 5_000;
        wait_arrived(&collector, &node, upto);
        agent.wait_metric(Duration::from_secs(30), "bpftail_sweeps_total", sweeps + 3);
        agent.wait_metric(
            Duration::from_secs(30),
            "bpftail_checkpoint_writes_total",
            saves + 1,
        );
        eprintln!("wall clock {offset_s:+} s: lines to {upto} arrived, timers running");
    }
    drop(clock);
    let records = wait_arrived(&collector, &node, upto);
    agent.settle(Duration::from_secs(60));
    assert!(agent.stop().success());
    let t = assert_complete(&node, &records, upto);
    assert_eq!((t.duplicates, t.rewinds), (0, 0), "{t:?}");
}
