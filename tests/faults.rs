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
