//! End-to-end benchmark: N CRI lines (default 1,000,000 of ~200 bytes) are
//! written into 8 files, one write(2) per line, while bpftail ships them to
//! a real broker (tansu). Prints wall time, bpftail's CPU seconds
//! (user+sys), MB of log per CPU-second, lines per second and peak RSS, and
//! the ratio to the mission's targets. Measures; asserts nothing.
//!
//! `cargo xtask bench [-- --lines N --line-bytes B --format raw|json --compression C]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

const WRITERS: usize = 8;
/// Fluent Bit 5.1 on this machine's kind, same workload (from the issue).
const FLUENT_BIT_MB_PER_CPU_S: f64 = 35.0;
const TARGET_MB_PER_CPU_S: f64 = 175.0;
const TARGET_RSS_MIB: f64 = 16.0;

fn main() {
    // `cargo bench` passes --bench; anything else is ours.
    let lines: u64 = cli_arg("--lines", "1000000").parse().expect("--lines N");
    let line_len: usize = cli_arg("--line-bytes", "200")
        .parse()
        .expect("--line-bytes B");
    let format = cli_arg("--format", "json");
    let compression = cli_arg("--compression", "none");
    let per_writer = lines / WRITERS as u64;

    let tmp = tempfile::tempdir().unwrap();
    let pods = tmp.path().join("pods");
    let broker = Broker::start();
    broker.create_topic("bench", 8);
    let dirs: Vec<_> = (0..WRITERS)
        .map(|w| {
            container_dir(
                &pods,
                "bench",
                &format!("pod-{w}"),
                &format!("uid-{w}"),
                "app",
            )
        })
        .collect();
    for d in &dirs {
        std::fs::write(d.join("0.log"), b"").unwrap();
    }
    let args = agent_args(
        &pods,
        &tmp.path().join("data"),
        &broker.addr(),
        "bench",
        &[
            "--format",
            &format,
            "--compression",
            &compression,
            "--kube",
            "off",
        ],
    );
    let log = tmp.path().join("bpftail.log");
    let agent = Agent::start(&args, &log);
    // Let startup settle so only shipping is measured.
    std::thread::sleep(Duration::from_millis(500));
    let cpu0 = agent.cpu_seconds();
    let t0 = Instant::now();
    let writers: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(w, d)| {
            let path = d.join("0.log");
            std::thread::spawn(move || {
                let mut out = LineWriter::create(&path);
                for seq in 0..per_writer {
                    out.line(w, seq, line_len);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let write_done = t0.elapsed();
    let total = per_writer * WRITERS as u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while agent.metric("bpftail_records_delivered_total") < total {
        assert!(
            Instant::now() < deadline,
            "not everything was delivered in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = t0.elapsed();
    let cpu = agent.cpu_seconds() - cpu0;
    let rss_mib = agent.peak_rss_kib() as f64 / 1024.0;
    let mb = (total * line_len as u64) as f64 / 1e6;
    let mb_per_cpu = mb / cpu;
    println!(
        "bpftail end-to-end benchmark ({WRITERS} files, one write per line, format {format}, compression {compression})"
    );
    println!("  lines                {total}");
    println!("  log bytes            {mb:.1} MB ({line_len} B/line)");
    println!("  writers finished     {:.2} s", write_done.as_secs_f64());
    println!("  wall (all acked)     {:.2} s", wall.as_secs_f64());
    println!("  bpftail CPU          {cpu:.2} s (user+sys)");
    println!("  MB per CPU-second    {mb_per_cpu:.1}");
    println!(
        "  lines per second     {:.0} (wall), {:.0} per CPU-second",
        total as f64 / wall.as_secs_f64(),
        total as f64 / cpu
    );
    println!("  peak RSS             {rss_mib:.1} MiB");
    println!(
        "  vs Fluent Bit 5.1    {:.2}x MB/CPU-s (35 MB/CPU-s, ~65 MiB RSS)",
        mb_per_cpu / FLUENT_BIT_MB_PER_CPU_S
    );
    println!(
        "  vs mission target    {:.2}x of 175 MB/CPU-s, RSS {:.2}x of 16 MiB",
        mb_per_cpu / TARGET_MB_PER_CPU_S,
        rss_mib / TARGET_RSS_MIB
    );
    let _ = agent.stop();
}
