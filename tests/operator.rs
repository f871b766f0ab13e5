//! What a person running bpftail by hand sees: `bpftail consume` reading
//! back what the agent produced, a log directory that is not there, a data
//! directory that is missing, not a directory or read-only. (The delivery-state lines, metrics and
//! `/readyz` during a broker outage are checked in `e2e.rs`'s outage test,
//! with both Kafka clients.)

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::*;

/// Appends `lines` to container `w`'s CRI log under `pods`.
fn write_cri(pods: &std::path::Path, w: usize, lines: &[String]) {
    let dir = container_dir(pods, "ns", &format!("pod-{w}"), &format!("uid-{w}"), "app");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("0.log"))
        .unwrap();
    for l in lines {
        writeln!(f, "2026-11-30T10:00:00.000000000Z stdout F {l}").unwrap();
    }
}

/// Runs `bpftail consume` to its end (60 s at most): exit code, stdout,
/// stderr.
fn consume(args: &[&str]) -> (i32, String, String) {
    let child = Command::new(bpftail_bin())
        .arg("consume")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bpftail consume");
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(60)) else {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("bpftail consume {args:?} did not end within 60 s");
    };
    let out = out.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `bpftail consume` with `args`; its stdout lines arrive on the
/// receiver as it prints them.
fn consume_lines(args: &[&str]) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(bpftail_bin())
        .arg("consume")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start bpftail consume");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The message of a text-format record line (after `value=`).
fn text_value(line: &str) -> &str {
    line.split_once(" value=").map_or("", |(_, v)| v)
}

#[test]
fn consume_prints_every_record_with_key_partition_offset_and_headers_and_follows_new_ones() {
    let broker = Broker::start();
    broker.create_topic("logs", 3);
    let node = Node::new();
    const PER: usize = 5;
    for w in 0..3 {
        let lines: Vec<String> = (0..PER).map(|i| format!("w{w} line {i}")).collect();
        write_cri(&node.pods, w, &lines);
    }
    let agent = Agent::start(
        &node.args(&broker.addr(), "logs", &["--format", "raw"]),
        &node.log,
    );
    agent.wait_metric(
        Duration::from_secs(60),
        "bpftail_records_delivered_total",
        15,
    );
    let addr = broker.addr();

    // Text: one line per record, every partition, then exit 0.
    let (code, out, err) = consume(&["--brokers", &addr, "--topic", "logs", "--from-beginning"]);
    assert_eq!(code, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3 * PER, "{out}");
    for w in 0..3 {
        let mine: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| text_value(l).starts_with(&format!("w{w} ")))
            .collect();
        let values: Vec<&str> = mine.iter().map(|l| text_value(l)).collect();
        let expected: Vec<String> = (0..PER).map(|i| format!("w{w} line {i}")).collect();
        assert_eq!(values, expected, "container {w}, in order: {out}");
        for l in &mine {
            assert!(l.starts_with("partition="), "{l}");
            assert!(l.contains(" offset="), "{l}");
            assert!(l.contains(&format!("uid-{w}")), "key names the pod: {l}");
            assert!(l.contains("stream=stdout"), "{l}");
            assert!(l.contains(&format!("pod=pod-{w}")), "{l}");
            assert!(l.contains("namespace=ns"), "{l}");
        }
    }

    // JSON: the same records, one object per line.
    let (code, out, err) = consume(&[
        "--brokers",
        &addr,
        "--topic",
        "logs",
        "--from-beginning",
        "--json",
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    let records: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(records.len(), 3 * PER);
    let mut partitions = std::collections::BTreeMap::<i64, Vec<i64>>::new();
    for r in &records {
        assert_eq!(r["topic"], "logs");
        let value = r["value"].as_str().unwrap();
        let w = &value[1..2];
        assert_eq!(r["headers"]["pod"], format!("pod-{w}"), "{r}");
        assert_eq!(r["headers"]["stream"], "stdout", "{r}");
        assert!(r["key"].as_str().unwrap().contains(&format!("uid-{w}")));
        partitions
            .entry(r["partition"].as_i64().unwrap())
            .or_default()
            .push(r["offset"].as_i64().unwrap());
    }
    for offsets in partitions.values() {
        let expected: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(offsets, &expected, "each partition from its first offset");
    }

    // --follow: what was there, then what is written afterwards.
    let (mut follow, rx) = consume_lines(&[
        "--brokers",
        &addr,
        "--topic",
        "logs",
        "--from-beginning",
        "--follow",
    ]);
    let next = |what: &str| {
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("consume --follow printed no {what} within 30 s"))
    };
    for _ in 0..3 * PER {
        next("earlier record");
    }
    write_cri(&node.pods, 1, &["w1 written later".to_owned()]);
    let later = next("new record");
    assert_eq!(text_value(&later), "w1 written later");
    let _ = follow.kill();
    let _ = follow.wait();

    // Without --from-beginning: only what is produced from now on (a
    // line is written every 200 ms until one shows; none of the earlier
    // records may).
    let (mut fresh, rx) = consume_lines(&["--brokers", &addr, "--topic", "logs"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        assert!(
            Instant::now() < deadline,
            "consume printed nothing new in 30 s"
        );
        write_cri(&node.pods, 2, &["w2 probe".to_owned()]);
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            break line;
        }
    };
    assert_eq!(text_value(&first), "w2 probe", "{first}");
    let _ = fresh.kill();
    let _ = fresh.wait();
    while let Ok(line) = rx.try_recv() {
        assert_eq!(text_value(&line), "w2 probe", "only new records: {line}");
    }

    // A topic that does not exist: said, exit 1.
    let (code, _, err) = consume(&["--brokers", &addr, "--topic", "nope", "--from-beginning"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    assert!(agent.stop().success());
}

#[test]
fn a_missing_pods_dir_is_said_once_with_its_path_and_its_logs_ship_when_it_appears() {
    let broker = Broker::start();
    broker.create_topic("logs", 1);
    let node = Node::new();
    let late = node.pods.join("late");
    let mut args = node.args(&broker.addr(), "logs", &[]);
    let i = args.iter().position(|a| a == "--pods-dir").unwrap();
    args[i + 1] = late.to_str().unwrap().to_owned();
    let agent = Agent::start(&args, &node.log);
    agent.wait_log(Duration::from_secs(30), "log directory is missing");
    let log = node.agent_log();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("log directory is missing") && l.contains("pods-dir"))
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains(" WARN "), "{}", said[0]);
    assert!(said[0].contains(late.to_str().unwrap()), "{}", said[0]);
    // Nothing waits: alive and ready.
    assert!(agent.healthz());
    assert!(agent.readyz().0);
    // The directory appears (a mount fixed): its logs ship at the next
    // rescan, frequent while it is missing.
    write_cri(&late, 0, &["first line".to_owned()]);
    agent.wait_metric(
        Duration::from_secs(60),
        "bpftail_records_delivered_total",
        1,
    );
    agent.wait_log(Duration::from_secs(5), "log directory is there now");
    let log = node.agent_log();
    let missing = log
        .lines()
        .filter(|l| l.contains("log directory is missing") && l.contains("pods-dir"))
        .count();
    assert_eq!(missing, 1, "{log}");
    assert!(agent.stop().success());
}

#[test]
fn a_missing_unusable_or_read_only_data_dir_stops_the_agent_and_says_why_once() {
    let (tmp, pods) = test_dir("bpftail-operator-");
    // Runs the agent on `data` until it exits (it must, at once): stderr.
    let fails = |data: &std::path::Path| {
        let out = Command::new(bpftail_bin())
            .args(["run", "--kube", "off", "--brokers", "127.0.0.1:1"])
            .args(["--topic", "logs", "--docker-dir", "/nonexistent"])
            .arg("--pods-dir")
            .arg(&pods)
            .arg("--data-dir")
            .arg(data)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(data.to_str().unwrap()), "{err}");
        assert_eq!(err.matches("--data-dir").count(), 1, "said once: {err}");
        err
    };
    // Missing: not made (it would be a volume that is not mounted, and the
    // checkpoints would die with the container).
    let missing = tmp.path().join("data");
    let err = fails(&missing);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!missing.exists());
    // Not a directory.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let err = fails(&file.join("data"));
    assert!(err.contains("is not usable"), "{err}");
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");
    // Read-only (root ignores permissions: a read-only mount).
    let fs = support::scratch::ScratchFs::small_tmpfs("1m");
    fs.remount("ro");
    let err = fails(fs.path());
    assert!(err.contains("is not writable"), "{err}");
    assert_eq!(err.matches("Read-only file system").count(), 1, "{err}");
}
