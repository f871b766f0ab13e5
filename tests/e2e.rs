//! End-to-end: the real `bpftail` binary on real files, producing to a real
//! Kafka-protocol broker (tansu), checked by a real consumer.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::scratch::{FsKind, ScratchFs};
use support::*;

const WRITERS: usize = 8;
const LINES: u64 = 100_000;
const LINE_LEN: usize = 120;

impl Node {
    /// [`Node::args`] with `--format raw` (records are the message).
    fn raw_args(&self, broker: &Broker, topic: &str, extra: &[&str]) -> Vec<String> {
        let mut a = self.args(&broker.addr(), topic, &["--format", "raw"]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn container(&self, w: usize) -> PathBuf {
        container_dir(
            &self.pods,
            "ns",
            &format!("pod-{w}"),
            &format!("uid-{w}"),
            "app",
        )
    }
}

/// Runs `WRITERS` threads that each write `LINES` lines to their container's
/// `0.log`, calling `between(writer, seq, &mut writer)` before each line.
fn write_all<F>(node: &Node, between: F) -> Vec<std::thread::JoinHandle<()>>
where
    F: Fn(usize, u64, &mut LineWriter, &Path) + Send + Sync + 'static,
{
    let between = Arc::new(between);
    (0..WRITERS)
        .map(|w| {
            let dir = node.container(w);
            let between = between.clone();
            std::thread::spawn(move || {
                let path = dir.join("0.log");
                let mut out = LineWriter::create(&path);
                for seq in 0..LINES {
                    between(w, seq, &mut out, &dir);
                    out.line(w, seq, LINE_LEN);
                }
            })
        })
        .collect()
}

fn join(handles: Vec<std::thread::JoinHandle<()>>) {
    for h in handles {
        h.join().unwrap();
    }
}

fn all_arrived(records: &[Received]) -> bool {
    unique(records, WRITERS, LINES) == WRITERS * LINES as usize
}

/// Waits until every line of every writer has arrived; returns the records.
#[track_caller]
fn wait_all_arrived(collector: &Collector, node: &Node) -> Vec<Received> {
    collector.wait_for(
        Duration::from_secs(180),
        || {
            format!(
                "all {} lines of {WRITERS} writers\nagent log:\n{}",
                WRITERS as u64 * LINES,
                node.agent_log()
            )
        },
        all_arrived,
    )
}

fn assert_complete(node: &Node, records: &[Received], allow_rewinds: bool) -> Tally {
    let t = tally(records, WRITERS, LINES);
    assert_eq!(
        t.missing,
        0,
        "lines missing: {t:?}\nagent log:\n{}",
        node.agent_log()
    );
    assert_eq!(
        t.jumps,
        0,
        "lines out of order: {t:?}\nagent log:\n{}",
        node.agent_log()
    );
    assert_eq!(t.foreign, 0, "records that were never written: {t:?}");
    if !allow_rewinds {
        assert_eq!(t.duplicates, 0, "duplicates: {t:?}");
        assert_eq!(t.rewinds, 0, "resends: {t:?}");
    }
    t
}

#[test]
fn every_line_of_eight_growing_files_arrives_once_and_in_order() {
    // The default watcher: auto, whichever backend it picks on this host —
    // the one `bpftail probe` says it picks.
    let (_, m) = eight_growing_files(&[], &Launch::default());
    let picks = probe_line(&probe(), "auto picks:");
    assert_eq!(watcher(&m), picks);
}

#[test]
fn watcher_ebpf_every_line_arrives_with_few_kernel_events() {
    // The sys_exit hook, which sees every write-family syscall.
    let extra = ["--watcher", "ebpf", "--ebpf-attach", "tp-btf"];
    let (_, m) = eight_growing_files(&extra, &Launch::default());
    assert_eq!(watcher(&m), "ebpf (tp_btf)");
    // Hundreds of thousands of writes (the writers flush every few lines):
    // the hook coalesces them into a few hundred events.
    let (writes, events, misses) = (
        m["bpftail_ebpf_watched_writes_total"],
        m["bpftail_ebpf_events_total"],
        m["bpftail_ebpf_recursion_misses_total"],
    );
    eprintln!("ebpf: {writes} watched writes, {events} events, {misses} skipped runs");
    // Every write was seen by the hook or counted as a run the kernel
    // skipped (which makes the agent read every file).
    assert!(writes + misses >= WRITERS as u64 * LINES);
    assert!(events * 20 < writes, "{events} events for {writes} writes");
    assert_eq!(m["bpftail_ebpf_drops_total"], 0);
}

/// The write path's own tracepoints, with the safety sweep off (once an
/// hour): every line arrives from the kernel's events alone.
#[test]
fn watcher_ebpf_write_path_every_line_arrives_without_the_sweep() {
    write_path_without_the_sweep(Node::new());
}

#[test]
fn watcher_ebpf_write_path_without_the_sweep_on_tmpfs() {
    write_path_without_the_sweep(Node::on(ScratchFs::new(FsKind::Tmpfs)));
}

#[test]
fn watcher_ebpf_write_path_without_the_sweep_on_xfs() {
    write_path_without_the_sweep(Node::on(ScratchFs::new(FsKind::Xfs)));
}

/// btrfs: a file's `st_dev` is its subvolume's anonymous device, not the
/// superblock's `s_dev` the kernel's events carry.
#[test]
fn watcher_ebpf_write_path_without_the_sweep_on_btrfs() {
    write_path_without_the_sweep(Node::on(ScratchFs::new(FsKind::Btrfs)));
}

#[test]
fn watcher_ebpf_write_path_without_the_sweep_on_a_btrfs_subvolume() {
    write_path_without_the_sweep(Node::on(ScratchFs::new(FsKind::BtrfsSubvolume)));
}

/// The logs written through an overlay mount (upper dir on the root file
/// system): the kernel writes to the upper file system's inode; `fstat`
/// names the overlay's device.
#[test]
fn watcher_ebpf_write_path_without_the_sweep_on_overlayfs() {
    write_path_without_the_sweep(Node::on(ScratchFs::new(FsKind::Overlay)));
}

/// The logs are files of the overlay's lower layer, copied up when first
/// opened for writing: `fstat` through the overlay names the lower inode,
/// the kernel writes to the upper one.
#[test]
fn watcher_ebpf_write_path_without_the_sweep_on_overlayfs_copied_up_files() {
    let lower: Vec<String> = (0..WRITERS)
        .map(|w| format!("pods/ns_pod-{w}_uid-{w}/app/0.log"))
        .collect();
    let lower: Vec<&str> = lower.iter().map(String::as_str).collect();
    let node = Node::on(ScratchFs::overlay_with_lower(&lower));
    let upper = node.fs.as_ref().unwrap().upper().unwrap();
    for (w, path) in lower.iter().enumerate() {
        use std::os::unix::fs::MetadataExt;
        let log = node.container(w).join("0.log");
        assert!(log.exists(), "the lower layer holds {path}");
        // Opened for writing: copied up.
        std::fs::OpenOptions::new().write(true).open(&log).unwrap();
        assert_ne!(
            std::fs::metadata(&log).unwrap().ino(),
            std::fs::metadata(upper.join(path)).unwrap().ino(),
            "fstat through the overlay names the lower inode, not the upper one written to"
        );
    }
    write_path_without_the_sweep(node);
}

/// The eBPF watcher on its write-path tracepoints with the sweep off: every
/// line written to eight files in `node`'s pods dir arrives from the
/// kernel's events alone.
fn write_path_without_the_sweep(node: Node) {
    let extra = [
        "--watcher",
        "ebpf",
        "--ebpf-attach",
        "write-path",
        "--sweep-interval-ms",
        "3600000",
    ];
    let (_, m) = eight_growing_files_in(node, &extra, &Launch::default());
    assert_eq!(watcher(&m), "ebpf (write_path)");
    let (hits, events) = (
        m["bpftail_ebpf_hook_hits_total"],
        m["bpftail_ebpf_events_total"],
    );
    eprintln!("ebpf write path: {hits} tracepoint hits, {events} events");
    assert!(events > 0);
    assert_eq!(m["bpftail_ebpf_drops_total"], 0);
    assert_eq!(m["bpftail_sweeps_total"], 0, "the sweep never ran");
    assert_eq!(m["bpftail_sweep_found_bytes_total"], 0);
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "the agent reads BPFTAIL_TEST_EBPF_SABOTAGE only when built with --features test-hooks (cargo xtask test does)"
)]
fn watcher_ebpf_with_every_event_dropped_still_loses_nothing() {
    // The hook drops every event, as if its ring buffer were always full:
    // the safety sweep is all that is left, and it must be enough.
    let how = Launch {
        env: vec![("BPFTAIL_TEST_EBPF_SABOTAGE".into(), "1".into())],
        ..Launch::default()
    };
    let (_, m) = eight_growing_files(&["--watcher", "ebpf"], &how);
    assert_eq!(m["bpftail_ebpf_events_total"], 0);
    assert!(m["bpftail_ebpf_drops_total"] > 0);
}

#[test]
fn watcher_fanotify_every_line_arrives() {
    let (_, m) = eight_growing_files(&["--watcher", "fanotify"], &Launch::default());
    assert_eq!(watcher(&m), "fanotify");
}

#[test]
fn watcher_inotify_every_line_arrives() {
    let (_, m) = eight_growing_files(&["--watcher", "inotify"], &Launch::default());
    assert_eq!(watcher(&m), "inotify");
}

#[test]
fn watcher_poll_every_line_arrives() {
    let (_, m) = eight_growing_files(&["--watcher", "poll"], &Launch::default());
    assert_eq!(watcher(&m), "poll");
}

#[test]
fn with_only_the_documented_capabilities_the_ebpf_watcher_works() {
    // Root, but with every capability dropped except those the README
    // lists for the eBPF watcher: BPF, PERFMON, DAC_READ_SEARCH.
    let how = Launch {
        capabilities: Some(vec![
            "bpf".into(),
            "perfmon".into(),
            "dac_read_search".into(),
        ]),
        ..Launch::default()
    };
    let (_, m) = eight_growing_files(&["--watcher", "ebpf"], &how);
    assert!(watcher(&m).starts_with("ebpf ("), "{}", watcher(&m));
}

#[test]
fn without_cap_bpf_auto_falls_back_and_a_forced_ebpf_fails_fast() {
    let broker = Broker::start();
    let node = Node::new();
    let how = Launch {
        capabilities: Some(vec!["perfmon".into(), "dac_read_search".into()]),
        ..Launch::default()
    };
    // Forced: exits non-zero, saying why.
    let out = std::process::Command::new("setpriv")
        .args(["--bounding-set=-all,+perfmon", "--inh-caps=-all"])
        .arg(bpftail_bin())
        .arg("run")
        .args(node.raw_args(
            &broker,
            "logs",
            &["--watcher", "ebpf", "--metrics-addr", "off"],
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("watcher ebpf"), "{err}");
    // auto: logs why eBPF was skipped and runs with the next backend.
    broker.create_topic("logs", 1);
    let agent = Agent::launch(&node.raw_args(&broker, "logs", &[]), &node.log, &how);
    let collector = Collector::start(&broker.addr(), "logs");
    let dir = node.container(0);
    let mut out = LineWriter::create(&dir.join("0.log"));
    for seq in 0..1000 {
        out.line(0, seq, LINE_LEN);
    }
    let records = collector.wait_for(
        Duration::from_secs(60),
        || format!("1000 lines\nagent log:\n{}", node.agent_log()),
        |r| unique(r, 1, 1000) == 1000,
    );
    assert_eq!(unique(&records, 1, 1000), 1000);
    let log = node.agent_log();
    assert!(log.contains("change-detection backend unusable"), "{log}");
    assert!(
        log.contains("watcher=ebpf"),
        "the skipped backend is named: {log}"
    );
    // Whichever comes next on this host (fanotify needs CAP_SYS_ADMIN,
    // dropped here): anything but eBPF.
    let w = watcher(&agent.metrics());
    assert!(w != "none" && !w.starts_with("ebpf"), "{w}");
    assert!(agent.stop().success());
}

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "the agent reads BPFTAIL_TEST_EBPF_TRACEPOINTS only when built with --features bpftail/test-hooks (cargo xtask test does)"
)]
fn when_every_write_path_tracepoint_is_refused_auto_falls_back_and_ships_everything() {
    // As on a kernel without any of them: the write-path attachment fails,
    // fexit is refused here (lockdown), so auto goes on to fanotify.
    let how = Launch {
        env: vec![("BPFTAIL_TEST_EBPF_TRACEPOINTS".into(), "".into())],
        ..Launch::default()
    };
    let (log, m) = eight_growing_files(&[], &how);
    assert!(!watcher(&m).starts_with("ebpf"), "{}", watcher(&m));
    assert!(
        log.contains("none of the write path's tracepoints"),
        "the reason is logged: {log}"
    );
    assert!(log.contains("change detection"), "{log}");
}

/// The change-detection backend the agent reports in its metrics.
fn watcher(m: &std::collections::HashMap<String, u64>) -> String {
    m.keys()
        .find_map(|k| {
            k.strip_prefix("bpftail_watcher_info{watcher=\"")?
                .strip_suffix("\"}")
        })
        .unwrap_or("none")
        .to_owned()
}

/// 8 files × 100,000 lines written while the agent runs with `extra`
/// flags: every line arrives once, in order. Returns the agent's log and
/// its last metrics.
fn eight_growing_files(
    extra: &[&str],
    how: &Launch,
) -> (String, std::collections::HashMap<String, u64>) {
    eight_growing_files_in(Node::new(), extra, how)
}

/// [`eight_growing_files`] in `node`'s pods dir.
fn eight_growing_files_in(
    node: Node,
    extra: &[&str],
    how: &Launch,
) -> (String, std::collections::HashMap<String, u64>) {
    let broker = Broker::start();
    broker.create_topic("logs", 4);
    // The files exist before the agent starts, and grow while it runs.
    for w in 0..WRITERS {
        std::fs::write(node.container(w).join("0.log"), b"").unwrap();
    }
    let agent = Agent::launch(&node.raw_args(&broker, "logs", extra), &node.log, how);
    // Every write happens once the agent follows the files (so the eBPF
    // test can count them all in the kernel).
    wait_until(
        Duration::from_secs(30),
        || format!("the agent never followed the files\n{}", node.agent_log()),
        || agent.metrics().get("bpftail_files_watched") == Some(&(WRITERS as u64)),
    );
    let collector = Collector::start(&broker.addr(), "logs");
    let started = Instant::now();
    join(write_all(&node, |_, _, _, _| {}));
    let records = wait_all_arrived(&collector, &node);
    eprintln!("{} records in {:?}", records.len(), started.elapsed());
    assert_complete(&node, &records, false);

    // Key, headers and value of one record.
    let r = records
        .iter()
        .find(|r| parse_seq(&r.value) == Some((3, 7)))
        .unwrap();
    assert_eq!(r.key, b"uid-3/app");
    assert_eq!(r.header("namespace"), Some("ns"));
    assert_eq!(r.header("pod"), Some("pod-3"));
    assert_eq!(r.header("container"), Some("app"));
    assert_eq!(r.header("stream"), Some("stdout"));
    assert_eq!(r.header("node"), Some("test-node"));
    assert_eq!(r.header("time"), Some("2026-11-25T16:00:00.000000007Z"));
    assert!(r.value.starts_with(b"w3 seq=00000007 "));
    assert!(!r.value.ends_with(b"\n"));
    // One container's records share a partition.
    let parts: std::collections::HashSet<i32> = records
        .iter()
        .filter(|r| r.key == b"uid-3/app")
        .map(|r| r.partition)
        .collect();
    assert_eq!(parts.len(), 1);

    let m = agent.metrics();
    assert_eq!(m["bpftail_records_delivered_total"], WRITERS as u64 * LINES);
    assert_eq!(m["bpftail_files_watched"], WRITERS as u64);
    assert!(agent.healthz());
    let status = agent.stop();
    assert!(status.success(), "exit status {status:?}");
    // The final checkpoint names every file at its end.
    let cp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.data.join("checkpoints.json")).unwrap())
            .unwrap();
    let files = cp["files"].as_array().unwrap();
    assert_eq!(files.len(), WRITERS);
    for f in files {
        assert_eq!(f["offset"].as_u64().unwrap(), LINES * LINE_LEN as u64);
    }
    (node.agent_log(), m)
}

#[test]
fn kubelet_rotation_during_the_writes_loses_nothing_and_keeps_order() {
    let broker = Broker::start();
    broker.create_topic("logs", 4);
    let node = Node::new();
    let how = Launch {
        env: vec![("BPFTAIL_LOG".into(), "bpftail=debug".into())],
        ..Default::default()
    };
    let agent = Agent::launch(&node.raw_args(&broker, "logs", &[]), &node.log, &how);
    let collector = Collector::start(&broker.addr(), "logs");
    // Every 15,000 lines: rename 0.log to 0.log.<timestamp>, reopen 0.log —
    // what kubelet and the runtime do together.
    join(write_all(&node, |_, seq, out, dir| {
        if seq > 0 && seq % 15_000 == 0 {
            let rotated = dir.join(format!("0.log.20261125-1600{:02}", seq / 15_000));
            std::fs::rename(dir.join("0.log"), rotated).unwrap();
            *out = LineWriter::create(&dir.join("0.log"));
        }
    }));
    let records = wait_all_arrived(&collector, &node);
    assert_complete(&node, &records, false);
    let m = agent.metrics();
    assert_eq!(
        m["bpftail_file_rotations_total"],
        WRITERS as u64 * (LINES / 15_000),
        "rotations counted; agent log:\n{}",
        node.agent_log()
    );
    assert!(agent.stop().success());
}

#[test]
fn copytruncate_restarts_at_zero_and_loses_nothing() {
    let broker = Broker::start();
    broker.create_topic("logs", 4);
    let node = Node::new();
    let agent = Arc::new(Agent::start(
        &node.raw_args(&broker, "logs", &[]),
        &node.log,
    ));
    let collector = Collector::start(&broker.addr(), "logs");
    let written = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(std::sync::Barrier::new(WRITERS));
    const EVERY: u64 = 25_000;
    let (a, wr, b) = (agent.clone(), written.clone(), barrier.clone());
    // logrotate's copytruncate: copy the file aside, truncate it in place.
    // The writers pause until bpftail has read everything, so the test
    // checks the truncation handling, not a race copytruncate always loses.
    join(write_all(&node, move |_, seq, out, dir| {
        if seq > 0 && seq % EVERY == 0 {
            b.wait();
            let target = wr.load(Ordering::SeqCst);
            wait_until(
                Duration::from_secs(60),
                || format!("bpftail did not catch up: {target} lines written"),
                || a.metric("bpftail_lines_read_total") >= target,
            );
            b.wait();
            std::fs::copy(
                dir.join("0.log"),
                dir.join(format!("0.log.{}", seq / EVERY)),
            )
            .unwrap();
            out.file.set_len(0).unwrap();
            b.wait();
            let want = WRITERS as u64 * (seq / EVERY);
            wait_until(
                Duration::from_secs(60),
                || format!("bpftail did not notice the truncation: {want} expected"),
                || a.metric("bpftail_file_truncations_total") >= want,
            );
        }
        wr.fetch_add(1, Ordering::SeqCst);
    }));
    let records = wait_all_arrived(&collector, &node);
    assert_complete(&node, &records, false);
    assert_eq!(
        agent.metric("bpftail_file_truncations_total"),
        WRITERS as u64 * ((LINES - 1) / EVERY)
    );
    drop(collector);
    let agent = Arc::into_inner(agent).unwrap();
    assert!(agent.stop().success());
}

#[test]
fn kill_9_and_restart_resends_only_the_unacknowledged_window() {
    let broker = Broker::start();
    broker.create_topic("logs", 4);
    let node = Node::new();
    let args = node.raw_args(&broker, "logs", &["--checkpoint-interval-ms", "200"]);
    let agent = Agent::start(&args, &node.log);
    let collector = Collector::start(&broker.addr(), "logs");
    let writers = write_all(&node, |_, seq, _, _| {
        // Slow enough that the kill lands mid-stream.
        if seq % 2_000 == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    collector.wait_for(
        Duration::from_secs(60),
        || "200,000 records before the kill".into(),
        |r| r.len() >= 200_000,
    );
    agent.kill9();
    // The restart has lines to read that were written while no agent ran:
    // each file grew by a writer's pause period since the kill (or its
    // writer is done).
    let size = |w: usize| std::fs::metadata(node.container(w).join("0.log")).map_or(0, |m| m.len());
    let at_kill: Vec<u64> = (0..WRITERS).map(size).collect();
    let full = LINES * LINE_LEN as u64;
    wait_until(
        Duration::from_secs(60),
        || format!("the files to grow after the kill from {at_kill:?}"),
        || {
            (0..WRITERS).all(|w| {
                let now = size(w);
                now >= at_kill[w] + 2_000 * LINE_LEN as u64 || now == full
            })
        },
    );
    let agent = Agent::start(&args, &node.log);
    join(writers);
    let records = wait_all_arrived(&collector, &node);
    let t = assert_complete(&node, &records, true);
    // Resent lines come from the window after the last checkpoint: at most
    // one step back per file, then a gap-free run.
    assert!(t.rewinds <= WRITERS, "{t:?}");
    eprintln!("after kill -9: {t:?}");
    assert!(agent.stop().success());
}

#[test]
fn a_20_second_broker_outage_loses_nothing_and_memory_stays_bounded() {
    let broker = Broker::start_behind_proxy();
    broker.create_topic("logs", 4);
    let node = Node::new();
    // The default budget.
    let budget = 2u64 << 20;
    let agent = Agent::start(
        &node.raw_args(
            &broker,
            "logs",
            &["--max-inflight-bytes", &budget.to_string()],
        ),
        &node.log,
    );
    let collector = Collector::start(&broker.addr(), "logs");
    // Writer 0 writes its second half only once the broker is down, so
    // records wait during the outage however fast the agent is.
    let down = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let held = down.clone();
    let writers = write_all(&node, move |w, seq, _, _| {
        if w == 0 && seq == LINES / 2 {
            let (is_down, changed) = &*held;
            let _down = changed
                .wait_while(is_down.lock().unwrap(), |d| !*d)
                .unwrap();
        }
        if seq % 1_000 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    collector.wait_for(
        Duration::from_secs(60),
        || "100,000 records before the outage".into(),
        |r| r.len() >= 100_000,
    );
    assert!(agent.readyz().0, "ready while delivering");
    broker.outage();
    *down.0.lock().unwrap() = true;
    down.1.notify_all();
    let down_at = Instant::now();
    let mut peak_inflight = 0;
    // The outage lasts 20 s (the length is what is tested); the in-flight
    // bytes are sampled meanwhile.
    while down_at.elapsed() < Duration::from_secs(20) {
        peak_inflight = peak_inflight.max(agent.metric("bpftail_inflight_bytes"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let rss_during = agent.rss_kib();
    // bpftail says it in its own words (after 10 s of failures), once,
    // and the signals an operator alerts on agree.
    agent.wait_log(
        Duration::from_secs(15),
        "Kafka delivery down: unreachable for",
    );
    let m = agent.metrics();
    assert_eq!(m["bpftail_kafka_up"], 0);
    assert_eq!(m["bpftail_delivering"], 0);
    assert!(
        m.get("bpftail_waiting_bytes{namespace=\"ns\"}")
            .is_some_and(|b| *b > 0),
        "{m:?}"
    );
    let oldest = agent.metric_f64("bpftail_oldest_unacked_seconds").unwrap();
    assert!(
        oldest >= 10.0,
        "oldest unacknowledged record read {oldest} s ago"
    );
    let (ready, why) = agent.readyz();
    assert!(!ready && why.starts_with("Kafka unreachable: "), "{why}");
    broker.restore();
    join(writers);
    let records = wait_all_arrived(&collector, &node);
    assert_complete(&node, &records, true);
    agent.wait_log(Duration::from_secs(15), "Kafka delivery resumed after");
    let log = node.agent_log();
    assert_eq!(log.matches("Kafka delivery down").count(), 1, "{log}");
    // The client's own retries are not the operator's business: no
    // warning from them.
    let client_warnings = log
        .lines()
        .filter(|l| l.contains(" WARN ") && (l.contains("rdkafka") || l.contains("kafka::")))
        .count();
    assert_eq!(client_warnings, 0, "{log}");
    assert_eq!(agent.metric("bpftail_kafka_up"), 1);
    assert!(agent.readyz().0, "ready again");
    let peak = agent.peak_rss_kib();
    eprintln!(
        "outage: peak in-flight {peak_inflight} B, RSS during {rss_during} KiB, peak RSS {peak} KiB"
    );
    // Reading paused at the budget (one read buffer of slack) instead of
    // buffering the 96 MB written meanwhile.
    assert!(
        peak_inflight <= budget + 2 * (256 << 10) * 2,
        "in-flight {peak_inflight}"
    );
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
    assert!(agent.stop().success());
}

#[test]
fn bad_input_is_counted_bounded_and_never_stops_the_other_files() {
    use std::os::unix::fs::PermissionsExt;
    let broker = Broker::start();
    broker.create_topic("logs", 4);
    let node = Node::new();
    let docker = node.pods.parent().unwrap().join("docker");
    let max_record = 64 * 1024;
    let mut args = node.raw_args(
        &broker,
        "logs",
        &[
            "--max-record-bytes",
            &max_record.to_string(),
            "--partial-flush-ms",
            "1000",
            "--sweep-interval-ms",
            "500",
        ],
    );
    let i = args.iter().position(|a| a == "/nonexistent").unwrap();
    args[i] = docker.to_str().unwrap().to_owned();

    // A file bpftail may not read: as root, bpftail runs as nobody, so the
    // permissions below apply to it.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let nobody = root.then_some(65534);
    let secret = node.container(5).join("0.log");
    std::fs::write(&secret, b"2026-11-25T00:00:00Z stdout F secret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    // Not a regular file where a log should be: skipped, never opened.
    let fifo = node.container(6).join("0.log");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    for dir in [node.pods.parent().unwrap().to_owned(), node.pods.clone()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::create_dir_all(&node.data).unwrap();
    std::fs::set_permissions(&node.data, std::fs::Permissions::from_mode(0o777)).unwrap();

    let agent = Agent::start_as(&args, &node.log, nobody);
    let collector = Collector::start(&broker.addr(), "logs");

    // Malformed CRI lines, invalid UTF-8 and NUL bytes among good lines.
    let mut w0 = LineWriter::create(&node.container(0).join("0.log"));
    use std::io::Write as _;
    w0.line(0, 0, 100);
    w0.file.write_all(b"not a cri line at all\n\xff\xfe\x00 binary junk \x00\n2026-11-25T00:00:00Z stdout F nul\x00in\xffmessage\n").unwrap();
    w0.line(0, 1, 100);

    // A 50 MB line with no newline, written while bpftail runs, then its end.
    let mut w1 = LineWriter::create(&node.container(1).join("0.log"));
    w1.line(1, 0, 100);
    w1.file
        .write_all(b"2026-11-25T00:00:00Z stdout F ")
        .unwrap();
    let chunk = vec![b'x'; 1 << 20];
    let mut peak_rss = 0;
    for _ in 0..50 {
        w1.file.write_all(&chunk).unwrap();
        peak_rss = peak_rss.max(agent.rss_kib());
    }
    w1.file.write_all(b"\n").unwrap();
    w1.line(1, 1, 100);

    // A file deleted while it is read: what the open descriptor holds is
    // still shipped. (The agent has opened it once its first line arrived;
    // a file deleted before the agent ever saw it cannot be read at all.)
    let doomed = node.container(2).join("0.log");
    let mut w2 = LineWriter::create(&doomed);
    w2.line(2, 0, 100);
    collector.wait_for(
        Duration::from_secs(30),
        || "the first line of the file to delete".into(),
        |r| r.iter().any(|r| parse_seq(&r.value) == Some((2, 0))),
    );
    for seq in 1..20_000 {
        w2.line(2, seq, 100);
    }
    std::fs::remove_file(&doomed).unwrap();

    // Docker json-file: broken JSON among good lines.
    let id = "0123456789abcdef";
    std::fs::create_dir_all(docker.join(id)).unwrap();
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        docker.join(id).join(format!("{id}-json.log")),
        concat!(
            "{\"log\":\"w3 seq=00000000 docker\\n\",\"stream\":\"stdout\",\"time\":\"2026-11-25T00:00:00Z\"}\n",
            "{\"log\":\"unterminated\n",
            "{\"log\":\"w3 seq=00000001 docker\\n\",\"stream\":\"stderr\",\"time\":\"2026-11-25T00:00:01Z\"}\n",
        ),
    )
    .unwrap();

    let records = collector.wait_for(
        Duration::from_secs(60),
        || {
            format!(
                "the good lines of every file\nagent log:\n{}",
                node.agent_log()
            )
        },
        |r| {
            let seqs: std::collections::HashSet<(usize, u64)> =
                r.iter().filter_map(|r| parse_seq(&r.value)).collect();
            (0..2)
                .all(|s| seqs.contains(&(0, s)) && seqs.contains(&(1, s)) && seqs.contains(&(3, s)))
                && (0..20_000).all(|s| seqs.contains(&(2, s)))
        },
    );
    let log = node.agent_log();
    let m = agent.metrics();
    let seqs: std::collections::HashSet<(usize, u64)> =
        records.iter().filter_map(|r| parse_seq(&r.value)).collect();
    for w in [0, 1, 3] {
        assert!(
            seqs.contains(&(w, 0)) && seqs.contains(&(w, 1)),
            "writer {w} incomplete\n{log}"
        );
    }
    assert_eq!(
        (0..20_000).filter(|&s| seqs.contains(&(2, s))).count(),
        20_000,
        "deleted file not drained"
    );
    // Bad lines are shipped whole, flagged, and counted.
    let junk = records
        .iter()
        .find(|r| r.value.starts_with(b"\xff\xfe\x00 binary junk"))
        .expect("binary line shipped");
    assert_eq!(junk.key, b"uid-0/app");
    assert!(records.iter().any(|r| r.value == b"nul\x00in\xffmessage"));
    assert!(records.iter().any(|r| r.value == b"not a cri line at all"));
    assert!(m["bpftail_lines_malformed_total"] >= 3, "{m:?}");
    // The 50 MB line: one record, cut at the maximum, marked; memory bounded.
    let long: Vec<&Received> = records
        .iter()
        .filter(|r| r.value.starts_with(b"xxxx"))
        .collect();
    assert_eq!(long.len(), 1);
    assert_eq!(long[0].value.len(), max_record);
    assert_eq!(long[0].header("truncated"), Some("true"));
    assert_eq!(m["bpftail_records_truncated_total"], 1);
    assert!(m["bpftail_bytes_skipped_total"] >= 49 << 20);
    peak_rss = peak_rss.max(agent.rss_kib());
    assert!(
        peak_rss < 64 * 1024,
        "RSS {peak_rss} KiB while a 50 MB line was read"
    );
    // The docker file's broken line is shipped raw and counted.
    assert!(
        records
            .iter()
            .any(|r| r.value == b"{\"log\":\"unterminated")
    );
    if root {
        assert!(
            m["bpftail_open_errors_total"] >= 1,
            "unreadable file not counted: {m:?}"
        );
        assert!(!records.iter().any(|r| r.value == b"secret"));
    }
    assert!(agent.healthz());
    assert!(agent.stop().success(), "{log}");
}

#[test]
fn bad_configuration_fails_fast_with_a_message_naming_the_setting() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bpftail_bin())
            .arg("run")
            .args(args)
            .env_remove("BPFTAIL_BROKERS")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--data-dir", "/nonexistent/x"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--brokers"), "{err}");
    let (code, err) = run(&["--brokers", "127.0.0.1:1", "--topic", "a/b"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("topic"), "{err}");
    // A Kafka setting the native client does not implement: refused with
    // the way out; librdkafka validates its own before anything starts.
    let tmp = tempfile::tempdir().unwrap();
    let bad = [
        "--brokers",
        "127.0.0.1:1",
        "--data-dir",
        tmp.path().to_str().unwrap(),
        "--kafka-option",
        "no.such.property=1",
    ];
    let (code, err) = run(&[&bad[..], &["--kafka-client", "native"]].concat());
    assert_eq!(code, Some(2));
    assert!(err.contains("no.such.property"), "{err}");
    assert!(err.contains("--kafka-client rdkafka"), "{err}");
    let (code, err) = run(&[&bad[..], &["--kafka-client", "rdkafka"]].concat());
    assert_eq!(code, Some(1));
    assert!(err.contains("no.such.property"), "{err}");
    // The environment is read, and flags win over it.
    let out = std::process::Command::new(bpftail_bin())
        .args(["run", "--brokers", "127.0.0.1:1"])
        .env("BPFTAIL_MAX_RECORD_BYTES", "5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max-record-bytes"));
}

#[test]
fn a_reused_inode_is_read_from_the_start_not_from_the_old_files_offset() {
    let broker = Broker::start();
    broker.create_topic("logs", 1);
    let node = Node::new();
    let path = node.container(0).join("0.log");
    let mut w = LineWriter::create(&path);
    for seq in 0..100 {
        w.line(0, seq, LINE_LEN);
    }
    // A checkpoint left by an older file that had this inode: same (dev,
    // inode), other first bytes, offset in the middle.
    use std::os::unix::fs::MetadataExt as _;
    let md = std::fs::metadata(&path).unwrap();
    std::fs::create_dir_all(&node.data).unwrap();
    let cp = serde_json::json!({"version": "1", "files": [{
        "dev": md.dev(), "ino": md.ino(),
        "fingerprint": {"len": 256, "hash": 12345},
        "offset": 50 * LINE_LEN, "path": path,
    }]});
    std::fs::write(node.data.join("checkpoints.json"), cp.to_string()).unwrap();
    let agent = Agent::start(&node.raw_args(&broker, "logs", &[]), &node.log);
    let collector = Collector::start(&broker.addr(), "logs");
    let records = collector.wait_for(
        Duration::from_secs(30),
        || "100 records".into(),
        |r| r.len() >= 100,
    );
    let t = tally(&records, 1, 100);
    assert_eq!((t.missing, t.duplicates, t.jumps), (0, 0, 0), "{t:?}");
    assert!(agent.stop().success());
}

#[test]
fn a_topic_the_broker_refuses_is_counted_and_the_other_files_keep_shipping() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaRespErr;
    // librdkafka's mock cluster: in-process, with error injection.
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("logs-good", 1, 1).unwrap();
    cluster.create_topic("logs-bad", 1, 1).unwrap();
    cluster
        .topic_error(
            "logs-bad",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    let node = Node::new();
    let mut good =
        LineWriter::create(&container_dir(&node.pods, "good", "p", "uid-g", "app").join("0.log"));
    let mut bad =
        LineWriter::create(&container_dir(&node.pods, "bad", "p", "uid-b", "app").join("0.log"));
    for seq in 0..1000 {
        good.line(0, seq, 100);
        bad.line(1, seq, 100);
    }
    let args = agent_args(
        &node.pods,
        &node.data,
        &cluster.bootstrap_servers(),
        "logs-{namespace}",
        &["--format", "raw"],
    );
    let agent = Agent::start(&args, &node.log);
    wait_until(
        Duration::from_secs(60),
        || format!("{:?}\n{}", agent.metrics(), node.agent_log()),
        || {
            agent.metric("bpftail_delivery_failures_total{kind=\"dropped\"}") >= 1000
                && agent.metric("bpftail_records_delivered_total") >= 1000
        },
    );
    let collector = Collector::start(&cluster.bootstrap_servers(), "logs-good");
    let records = collector.wait_for(
        Duration::from_secs(30),
        || "1000 records in topic logs-good".into(),
        |r| r.len() >= 1000,
    );
    let t = tally(&records, 1, 1000);
    assert_eq!((t.missing, t.duplicates, t.jumps), (0, 0, 0), "{t:?}");
    // Refusals are logged at a bounded rate, not once per record.
    let warnings = node.agent_log().matches("delivery failed").count();
    assert!(warnings <= 3, "{warnings} warnings");
    assert!(agent.healthz());
    assert!(agent.stop().success());
    // Both files are passed over to their end: a refused record does not
    // hold a file back forever.
    let cp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.data.join("checkpoints.json")).unwrap())
            .unwrap();
    for f in cp["files"].as_array().unwrap() {
        assert_eq!(f["offset"].as_u64().unwrap(), 1000 * 100, "{f}");
    }
}

#[test]
fn json_records_carry_the_pod_fields_and_the_message_as_valid_json() {
    let broker = Broker::start();
    broker.create_topic("logs-json", 1);
    let node = Node::new();
    let path = node.container(4).join("0.log");
    std::fs::write(
        &path,
        b"2026-11-25T16:00:00.5Z stdout F plain\n2026-11-25T16:00:01Z stderr F quote \" tab\t bad \xff end\n\
          2026-11-25T16:00:02Z stdout P part-\n2026-11-25T16:00:02Z stdout F two\n",
    )
    .unwrap();
    let args = agent_args(
        &node.pods,
        &node.data,
        &broker.addr(),
        "logs-json",
        &["--node-name", "n1"],
    );
    let agent = Agent::start(&args, &node.log);
    let collector = Collector::start(&broker.addr(), "logs-json");
    let records = collector.wait_for(
        Duration::from_secs(30),
        || "3 records".into(),
        |r| r.len() >= 3,
    );
    let v: Vec<serde_json::Value> = records
        .iter()
        .map(|r| serde_json::from_slice(&r.value).expect("valid JSON"))
        .collect();
    assert_eq!(v.len(), 3);
    assert_eq!(
        v[0],
        serde_json::json!({"time": "2026-11-25T16:00:00.5Z", "stream": "stdout", "namespace": "ns",
            "pod": "pod-4", "container": "app", "node": "n1", "message": "plain"})
    );
    assert_eq!(v[1]["stream"], "stderr");
    assert_eq!(v[1]["message"], "quote \" tab\t bad \u{fffd} end");
    assert_eq!(v[2]["message"], "part-two");
    assert!(
        records
            .iter()
            .all(|r| r.key == b"uid-4/app" && r.headers.is_empty())
    );
    assert_eq!(agent.metric("bpftail_invalid_utf8_total"), 1);
    assert!(agent.stop().success());
}

#[test]
fn docker_json_logs_with_docker_rotation_arrive_complete_and_in_order() {
    let broker = Broker::start();
    broker.create_topic("docker", 2);
    let node = Node::new();
    let docker = node.pods.parent().unwrap().join("docker");
    let id = "4f1c0ffee4f1c0ffee4f1c0ffee4f1c0ffee4f1c0ffee4f1c0ffee4f1c0ffee1";
    let dir = docker.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.v2.json"),
        r#"{"Name":"/k8s_web_web-0_shop_u-9_0","Config":{"Env":["A=1"],"Labels":{
            "io.kubernetes.pod.namespace":"shop","io.kubernetes.pod.name":"web-0",
            "io.kubernetes.pod.uid":"u-9","io.kubernetes.container.name":"web"}}}"#,
    )
    .unwrap();
    let mut args = node.raw_args(&broker, "docker", &[]);
    let i = args.iter().position(|a| a == "/nonexistent").unwrap();
    args[i] = docker.to_str().unwrap().to_owned();
    let agent = Agent::start(&args, &node.log);
    let collector = Collector::start(&broker.addr(), "docker");
    // Docker's json-file rotation: .1 → .2, -json.log → .1, a new -json.log.
    const N: u64 = 20_000;
    let log = dir.join(format!("{id}-json.log"));
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    use std::io::Write as _;
    for seq in 0..N {
        if seq > 0 && seq % 5_000 == 0 {
            for k in (1..3).rev() {
                let from = dir.join(format!("{id}-json.log.{k}"));
                if from.exists() {
                    std::fs::rename(&from, dir.join(format!("{id}-json.log.{}", k + 1))).unwrap();
                }
            }
            std::fs::rename(&log, dir.join(format!("{id}-json.log.1"))).unwrap();
            out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
        }
        // Every 7th line is split in two, as Docker does with long lines.
        if seq % 7 == 0 {
            writeln!(out, r#"{{"log":"w0 seq={seq:08} first half, ","stream":"stdout","time":"2026-11-25T16:00:00Z"}}"#).unwrap();
            writeln!(
                out,
                r#"{{"log":"second half\n","stream":"stdout","time":"2026-11-25T16:00:00Z"}}"#
            )
            .unwrap();
        } else {
            writeln!(out, r#"{{"log":"w0 seq={seq:08} \"quoted\"\n","stream":"stdout","time":"2026-11-25T16:00:00Z"}}"#).unwrap();
        }
    }
    let records = collector.wait_for(
        Duration::from_secs(60),
        || format!("{N} lines\nagent log:\n{}", node.agent_log()),
        |r| unique(r, 1, N) == N as usize,
    );
    let t = tally(&records, 1, N);
    assert_eq!(
        (t.missing, t.duplicates, t.jumps, t.foreign),
        (0, 0, 0, 0),
        "{t:?}\n{}",
        node.agent_log()
    );
    let r = &records[7];
    assert_eq!(r.value, b"w0 seq=00000007 first half, second half");
    assert_eq!(records[1].value, b"w0 seq=00000001 \"quoted\"");
    assert_eq!(r.key, b"u-9/web");
    assert_eq!(
        (
            r.header("namespace"),
            r.header("pod"),
            r.header("container")
        ),
        (Some("shop"), Some("web-0"), Some("web"))
    );
    assert!(agent.stop().success());
}

/// `bpftail probe`'s report.
fn probe() -> String {
    let out = std::process::Command::new(bpftail_bin())
        .arg("probe")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rest of the line of `text` that starts with `prefix`.
fn probe_line(text: &str, prefix: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{text}"))
        .trim()
        .to_owned()
}

#[test]
fn probe_reports_this_machines_kernel_features_without_a_broker() {
    let text = probe();
    eprintln!("{text}");
    let line = |prefix: &str| probe_line(&text, prefix);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(line("kernel:"), release.trim());
    assert!(line("btf:").starts_with("available"));
    assert!(!line("lockdown:").is_empty());
    assert_eq!(line("ebpf object:"), "embedded");
    // Each attachment is reported; on these machines (lockdown) fexit is
    // refused and the tracepoints load.
    for a in ["write_path", "fexit", "tp_btf", "raw_tp"] {
        let l = line(&format!("ebpf {a}:"));
        assert!(
            l == "loads and attaches" || l.starts_with("refused: "),
            "{a}: {l}"
        );
    }
    assert_eq!(line("ebpf tp_btf:"), "loads and attaches");
    assert_eq!(line("ebpf write_path:"), "loads and attaches");
    // Each of the write path's tracepoints, and whether it is used.
    for tp in [
        "ctime_ns_xchg",
        "writeback_mark_inode_dirty",
        "writeback_dirty_folio",
    ] {
        assert_eq!(line(&format!("  tracepoint {tp}:")), "attaches");
    }
    assert!(line("ebpf:").starts_with("usable ("));
    assert_eq!(line("fanotify:"), "usable");
    assert_eq!(line("inotify:"), "usable");
    // auto's order, from what the probe found usable here: the write
    // path's tracepoints, fexit if the kernel allows trampolines, then
    // fanotify, inotify, poll (never the sys_exit hook, which puts every
    // syscall of the node through it).
    let loads = |a: &str| line(&format!("ebpf {a}:")) == "loads and attaches";
    let expected = if let Some(a) = ["write_path", "fexit"].into_iter().find(|a| loads(a)) {
        format!("ebpf ({a})")
    } else if line("fanotify:") == "usable" {
        "fanotify".to_owned()
    } else if line("inotify:") == "usable" {
        "inotify".to_owned()
    } else {
        "poll".to_owned()
    };
    assert_eq!(line("auto picks:"), expected);
}

/// The CRI lines of a multiline fixture (a real program's output).
fn multiline_fixture(name: &str) -> Vec<String> {
    let path = workspace_root().join(format!("tests/fixtures/multiline/{name}.log"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn a_kill_9_inside_a_multiline_record_resends_it_whole_never_a_fragment() {
    let broker = Broker::start();
    broker.create_topic("logs", 1);
    let node = Node::new();
    // A long timeout: only the next start line ends a record here.
    let args = node.raw_args(
        &broker,
        "logs",
        &[
            "--multiline",
            "python",
            "--multiline-timeout-ms",
            "120000",
            "--checkpoint-interval-ms",
            "100",
            "--sweep-interval-ms",
            "500",
        ],
    );
    let lines = multiline_fixture("python");
    // The second traceback begins after "before 2"; the kill lands after
    // its chain marker, mid-record.
    let before_2 = lines
        .iter()
        .position(|l| l.ends_with(" before 2\n"))
        .unwrap();
    let cut = lines
        .iter()
        .position(|l| l.contains("The above exception was the direct cause"))
        .unwrap();
    let dir = node.container(0);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("0.log");
    let trace_start: u64 = lines[..=before_2].iter().map(|l| l.len() as u64).sum();
    std::fs::write(&log, lines[..=cut].concat()).unwrap();

    let agent = Agent::start(&args, &node.log);
    let collector = Collector::start(&broker.addr(), "logs");
    collector.wait_for(
        Duration::from_secs(60),
        || format!("4 records before the kill\n{}", node.agent_log()),
        |r| r.len() >= 4,
    );
    // Everything before the open record is acknowledged and checkpointed:
    // the checkpoint stops at the record's first byte, not inside it.
    let offset = || {
        std::fs::read(node.data.join("checkpoints.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|cp| cp["files"][0]["offset"].as_u64())
    };
    wait_until(
        Duration::from_secs(30),
        || format!("a checkpoint at {trace_start}, not {:?}", offset()),
        || offset() == Some(trace_start),
    );
    assert_eq!(agent.metric("bpftail_records_sent_total"), 4);
    agent.kill9();

    // The rest of the traceback, and the line after it, written while no
    // agent runs.
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, lines[cut + 1..].concat().as_bytes()).unwrap();
    let agent = Agent::start(&args, &node.log);
    collector.wait_for(
        Duration::from_secs(60),
        || format!("6 records\n{}", node.agent_log()),
        |r| r.len() >= 6,
    );
    wait_settled(&agent, 4, &[&collector]);
    let got: Vec<String> = collector
        .received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    let firsts: Vec<&str> = got.iter().map(|r| r.lines().next().unwrap()).collect();
    assert_eq!(
        firsts,
        [
            "before 1",
            "Traceback (most recent call last):",
            "after 1",
            "before 2",
            "Traceback (most recent call last):",
            "exit 1"
        ],
        "{got:#?}"
    );
    let messages: Vec<&str> = lines
        .iter()
        .map(|l| l.trim_end_matches('\n').splitn(4, ' ').nth(3).unwrap())
        .collect();
    assert_eq!(
        got.join("\n"),
        messages.join("\n"),
        "every line once, in order"
    );
    assert!(got[4].ends_with("RuntimeError: bad port in config"));
    assert!(agent.stop().success());
}

#[test]
fn a_rate_limited_container_ships_at_its_limit_and_loses_nothing() {
    const LOUD_LINES: u64 = 60_000;
    const QUIET_LINES: u64 = 200;
    const LIMIT: f64 = 2_000_000.0;
    let broker = Broker::start();
    broker.create_topic("logs", 4);
    let node = Node::new();
    let args = node.raw_args(
        &broker,
        "logs",
        &["--container-rate-limit", "2M", "--sweep-interval-ms", "500"],
    );
    // The loud container wrote 12 MB at once; the quiet one writes a line
    // every 10 ms meanwhile.
    let loud = node.container(0).join("0.log");
    std::fs::create_dir_all(loud.parent().unwrap()).unwrap();
    let mut w = LineWriter::create(&loud);
    for seq in 0..LOUD_LINES {
        w.line(0, seq, LINE_LEN * 2);
    }
    drop(w);
    let quiet = node.container(1).join("0.log");
    std::fs::create_dir_all(quiet.parent().unwrap()).unwrap();
    let agent = Agent::start(&args, &node.log);
    let collector = Collector::start(&broker.addr(), "logs");
    let writer = std::thread::spawn(move || {
        let mut w = LineWriter::create(&quiet);
        for seq in 0..QUIET_LINES {
            w.line(1, seq, LINE_LEN);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    // It is held back, and says so.
    agent.wait_metric(
        Duration::from_secs(30),
        "bpftail_rate_limited_containers",
        1,
    );
    assert!(agent.metric("bpftail_rate_limited_lag_bytes") > 0);
    writer.join().unwrap();
    let total = (LOUD_LINES + QUIET_LINES) as usize;
    collector.wait_for(
        Duration::from_secs(60),
        || format!("{total} records\n{}", node.agent_log()),
        |r| r.len() >= total,
    );
    let records = collector.received();
    let mut loud: Vec<Received> = Vec::new();
    let mut quiet: Vec<Received> = Vec::new();
    for r in records {
        match parse_seq(&r.value) {
            Some((0, _)) => loud.push(r),
            _ => quiet.push(r),
        }
    }
    let t = tally(&loud, 1, LOUD_LINES);
    assert_eq!(
        (t.missing, t.duplicates, t.jumps, t.rewinds),
        (0, 0, 0, 0),
        "{t:?}"
    );
    assert_eq!(quiet.len() as u64, QUIET_LINES);
    // Read at the limit: the log bytes of the records sent after the first
    // second, over the time they took (the records' Kafka timestamps are
    // taken when the agent sends them).
    let ts: Vec<i64> = loud.iter().map(|r| r.timestamp.unwrap()).collect();
    let from = ts[0] + 1000;
    let after = ts.iter().filter(|&&t| t >= from).count() as f64;
    let secs = (ts[ts.len() - 1] - from) as f64 / 1000.0;
    let rate = after * (LINE_LEN * 2) as f64 / secs;
    eprintln!("loud container read at {rate:.0} B/s (limit {LIMIT})");
    assert!(
        (rate - LIMIT).abs() <= 0.1 * LIMIT,
        "read at {rate:.0} B/s, limit {LIMIT}"
    );
    assert!(agent.metric("bpftail_rate_limit_waits_total") > 0);
    assert!(agent.stop().success());
    assert!(
        node.agent_log()
            .contains("container writes faster than its rate limit")
    );
}

/// A ConfigMap volume as the kubelet writes it: `dir/<name>` is a symlink
/// to `..data/<name>`, `..data` to the current `..<version>` directory.
struct ConfigMapDir {
    dir: PathBuf,
    version: u32,
}

impl ConfigMapDir {
    fn new(dir: PathBuf, text: &str) -> ConfigMapDir {
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = ConfigMapDir { dir, version: 0 };
        c.update(text);
        std::os::unix::fs::symlink("..data/config.toml", c.file()).unwrap();
        c
    }

    fn file(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    fn current(&self) -> PathBuf {
        self.dir.join(format!("..v{}", self.version))
    }

    /// The kubelet's update: a new version directory, a new `..data_tmp`
    /// symlink to it, renamed over `..data`.
    fn update(&mut self, text: &str) {
        self.version += 1;
        std::fs::create_dir(self.current()).unwrap();
        std::fs::write(self.current().join("config.toml"), text).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..v{}", self.version), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

#[test]
fn a_topic_change_by_configmap_swap_and_by_sighup_moves_every_line_exactly_once() {
    const WRITERS_HERE: usize = 3;
    let broker = Broker::start();
    let topics = ["before", "swapped", "hupped"];
    for t in topics {
        broker.create_topic(t, 1);
    }
    let node = Node::new();
    let mut cm = ConfigMapDir::new(
        node.pods.parent().unwrap().join("config"),
        "topic = \"before\"\n",
    );
    let mut args = node.raw_args(&broker, "unused", &["--sweep-interval-ms", "500"]);
    let at = args.iter().position(|a| a == "--topic").unwrap();
    args.drain(at..at + 2);
    args.extend(["--config".into(), cm.file().display().to_string()]);
    let agent = Agent::start(&args, &node.log);
    let collectors: Vec<Collector> = topics
        .iter()
        .map(|t| Collector::start(&broker.addr(), t))
        .collect();
    // Writers that run until told to stop, a line every 100 µs or so.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS_HERE)
        .map(|w| {
            let path = node.container(w).join("0.log");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut lw = LineWriter::create(&path);
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    lw.line(w, seq, LINE_LEN);
                    seq += 1;
                    if seq.is_multiple_of(50) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                seq
            })
        })
        .collect();
    let enough = |c: &Collector, n: usize, what: &str| {
        c.wait_for(
            Duration::from_secs(60),
            || format!("{n} records in {what}\n{}", node.agent_log()),
            |r| r.len() >= n,
        )
    };
    enough(&collectors[0], 2_000, "before");
    let applied = "bpftail_config_reloads_total{result=\"applied\"}";
    let refused = "bpftail_config_reloads_total{result=\"refused\"}";
    assert_eq!(agent.metric(applied), 0);

    // A ConfigMap update: the new topic, a Kafka client setting (the
    // client is drained and rebuilt), and a setting only a restart changes
    // (kept, and said so).
    cm.update(
        "topic = \"swapped\"\nebpf_max_files = 1024\n[kafka_options]\n\"linger.ms\" = \"5\"\n",
    );
    enough(&collectors[1], 2_000, "swapped");
    assert_eq!(agent.metric(applied), 1);
    let log = node.agent_log();
    assert!(
        log.contains("setting changed, but only a restart applies it")
            && log.contains("draining what is in flight, then reconnecting"),
        "{log}"
    );

    // An invalid file is refused and changes nothing.
    cm.update("topic = \"not a topic!\"\n");
    agent.wait_metric(Duration::from_secs(30), refused, 1);
    let swapped = collectors[1].count();
    enough(
        &collectors[1],
        swapped + 2_000,
        "swapped, after the refused file",
    );
    assert_eq!(agent.metric(applied), 1);

    // Edited in place below the watched directory, where no event reaches
    // the agent: SIGHUP applies it.
    std::fs::write(cm.current().join("config.toml"), "topic = \"hupped\"\n").unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    enough(&collectors[2], 2_000, "hupped");
    assert_eq!(agent.metric(applied), 2);

    stop.store(true, Ordering::Relaxed);
    let written: Vec<u64> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    let total: u64 = written.iter().sum();
    wait_until(
        Duration::from_secs(60),
        || format!("{total} records over the three topics"),
        || collectors.iter().map(Collector::count).sum::<usize>() as u64 >= total,
    );
    wait_settled(&agent, 0, &collectors.iter().collect::<Vec<_>>());
    // Every line exactly once; per writer, the lines of each topic follow
    // those of the topic before.
    let per_topic: Vec<Vec<Received>> = collectors.iter().map(Collector::received).collect();
    for (w, &n) in written.iter().enumerate() {
        let mut seen = vec![0u32; n as usize];
        let mut last_max: Option<u64> = None;
        for (t, records) in per_topic.iter().enumerate() {
            let seqs: Vec<u64> = records
                .iter()
                .filter_map(|r| parse_seq(&r.value))
                .filter(|&(ww, _)| ww == w)
                .map(|(_, s)| s)
                .collect();
            assert!(
                seqs.windows(2).all(|p| p[0] < p[1]),
                "writer {w}: out of order in {}",
                topics[t]
            );
            if let (Some(prev), Some(first)) = (last_max, seqs.first()) {
                assert!(
                    *first > prev,
                    "writer {w}: {} begins at {first}, after {prev}",
                    topics[t]
                );
            }
            last_max = seqs.last().copied().or(last_max);
            for s in seqs {
                seen[s as usize] += 1;
            }
        }
        assert!(
            seen.iter().all(|&c| c == 1),
            "writer {w}: every line exactly once"
        );
    }
    assert!(agent.stop().success());
}
