//! `cargo xtask demo`: the main job on this machine. Starts a local broker
//! (tansu), containers that log into a pods dir (podman + conmon; a
//! built-in writer where podman cannot run), and bpftail shipping them;
//! shows progress once a second and a few delivered records; then stops
//! everything it started.
//!
//! `cargo xtask demo [-- --seconds N --writer builtin]`

#[path = "../../tests/support/mod.rs"]
mod support;

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::*;

fn main() {
    let seconds: u64 = cli_arg("--seconds", "20").parse().expect("--seconds N");
    let use_podman = cli_arg("--writer", "podman") == "podman" && have_podman();
    let tmp = tempfile::Builder::new()
        .prefix("bpftail-demo-")
        .tempdir()
        .unwrap();
    let pods = tmp.path().join("pods");
    std::fs::create_dir_all(&pods).unwrap();

    println!("== starting a Kafka-protocol broker (tansu) on 127.0.0.1");
    let broker = Broker::start();
    broker.create_topic("demo-logs", 3);

    println!("== starting bpftail on {}", pods.display());
    let args = agent_args(
        &pods,
        &tmp.path().join("data"),
        &broker.addr(),
        "demo-logs",
        &["--format", "json", "--node-name", "demo-node"],
    );
    let agent = Agent::start(&args, &tmp.path().join("bpftail.log"));
    let collector = Collector::start(&broker.addr(), "demo-logs");

    let apps: Vec<(&str, std::path::PathBuf)> = ["web", "worker", "cron"]
        .iter()
        .enumerate()
        .map(|(i, app)| {
            let pod = format!("{app}-7f9c{i}");
            (
                *app,
                container_dir(&pods, "demo", &pod, &format!("uid-{app}"), app),
            )
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut containers = Vec::new();
    let mut writers = Vec::new();
    if use_podman {
        ensure_image(tmp.path());
        println!("== starting 3 podman containers (runc + conmon, CRI log format)");
        for (app, dir) in &apps {
            let name = format!("bpftail-demo-{}-{app}", std::process::id());
            let script = format!(
                "i=0; while [ $i -lt {} ]; do echo \"{app} request $i handled\"; \
                 if [ $((i % 97)) -eq 0 ]; then echo \"{app} warning at $i\" >&2; fi; \
                 i=$((i+1)); usleep 200; done",
                seconds * 4000
            );
            containers.push((name.clone(), podman_run(&name, &dir.join("0.log"), &script)));
        }
    } else {
        println!("== podman unavailable: 3 built-in writers log CRI lines into the pods dir");
        for (i, (_, dir)) in apps.iter().enumerate() {
            let (dir, stop) = (dir.clone(), stop.clone());
            writers.push(std::thread::spawn(move || {
                let mut out = LineWriter::create(&dir.join("0.log"));
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    out.line(i, seq, 120);
                    seq += 1;
                    if seq % 100 == 0 {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }));
        }
    }

    println!(
        "== shipping for {seconds} s\n   time   lines/s   delivered   lag(bytes)   bpftail RSS"
    );
    let t0 = Instant::now();
    let mut last = 0;
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        let m = agent.metrics();
        let delivered = m
            .get("bpftail_records_delivered_total")
            .copied()
            .unwrap_or(0);
        println!(
            "   {:>3} s  {:>8}  {:>10}  {:>11}   {:>6} KiB",
            t0.elapsed().as_secs(),
            delivered - last,
            delivered,
            m.get("bpftail_checkpoint_lag_bytes").copied().unwrap_or(0),
            agent.rss_kib()
        );
        let _ = std::io::stdout().flush();
        last = delivered;
    }

    println!("== stopping the writers");
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.join();
    }
    for (name, mut child) in containers {
        let _ = podman().args(["rm", "-f", "-t", "0", &name]).output();
        let _ = child.wait();
    }
    std::thread::sleep(Duration::from_secs(2));
    let delivered = agent.metric("bpftail_records_delivered_total");
    let records = collector.wait_for(
        Duration::from_secs(10),
        || format!("the {delivered} records delivered"),
        |r| r.len() as u64 >= delivered,
    );
    println!("== {} records in Kafka; a few of them:", records.len());
    for r in records.iter().step_by((records.len() / 5).max(1)).take(5) {
        println!(
            "   key={} {}",
            String::from_utf8_lossy(&r.key),
            String::from_utf8_lossy(&r.value)
        );
    }
    println!("== stopping bpftail (SIGTERM: stop reading, flush, checkpoint)");
    let status = agent.stop();
    println!("   bpftail exited: {status}");
    drop(collector);
    drop(broker);
    println!("== done; nothing left running");
}
