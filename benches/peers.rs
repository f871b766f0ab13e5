//! Peers measured side by side with bpftail on the same workload, files of
//! the same shape and the same broker, in the same run.
//!
//! syslog-ng 3.38 (Debian 12's, with its `kafka-c()` module), unpacked by
//! `cargo xtask bench --peers` into `$BPFTAIL_PEERS_DIR`: a `wildcard-file`
//! source over the pods dir (each line one message, `flags(no-parse)`) and
//! one Kafka message per line, with flow control so that nothing is
//! dropped. Its completion is counted by a consumer (its own counters count
//! hand-overs to librdkafka, not acknowledgements).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Broker, proc_status_kib, process_cpu_seconds};
use crate::{LatencyProbe, Run, Workload, pods_dirs, write_all};

pub fn syslog_ng(broker: &Broker, w: &Workload) -> Result<Run, String> {
    let dir = PathBuf::from(
        std::env::var_os("BPFTAIL_PEERS_DIR")
            .ok_or("run it through `cargo xtask bench --peers` (it unpacks syslog-ng)")?,
    );
    let root = dir.join("root");
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let pods = tmp.path().join("pods");
    let topic = "peer-syslog-ng";
    broker.create_topic(topic, 8);
    let dirs = pods_dirs(&pods);
    let conf = tmp.path().join("syslog-ng.conf");
    std::fs::write(
        &conf,
        format!(
            r#"@version: 3.38
options {{ stats-level(1); stats-freq(0); }};
source s_pods {{ wildcard-file(base-dir("{pods}") filename-pattern("0.log") recursive(yes)
                flags(no-parse) follow-freq(1) max-files(100)
                log-iw-size(80000) log-fetch-limit(1000)); }};
destination d_kafka {{ kafka-c(bootstrap-servers("{brokers}") topic("{topic}") message("$MSG")
                log-fifo-size(100000)); }};
log {{ source(s_pods); destination(d_kafka); flags(flow-control); }};
"#,
            pods = pods.display(),
            brokers = broker.addr(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let lib_path = [
        dir.join("rdkafka"),
        root.join("usr/lib/syslog-ng"),
        root.join("usr/lib/x86_64-linux-gnu"),
        root.join("lib/x86_64-linux-gnu"),
    ]
    .iter()
    .map(|p| p.display().to_string())
    .collect::<Vec<_>>()
    .join(":");
    let t = tmp.path();
    let mut child = Command::new(root.join("usr/sbin/syslog-ng"))
        .args(["-F", "-e", "--no-caps"])
        .arg(format!(
            "--module-path={}",
            root.join("usr/lib/syslog-ng/3.38").display()
        ))
        .arg("-f")
        .arg(&conf)
        .arg("-R")
        .arg(t.join("persist"))
        .arg("-p")
        .arg(t.join("pid"))
        .arg("-c")
        .arg(t.join("ctl"))
        .env("LD_LIBRARY_PATH", lib_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(t.join("syslog-ng.log")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("starting syslog-ng: {e}"))?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !t.join("ctl").exists() {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            return Err(format!(
                "syslog-ng did not start: {}",
                std::fs::read_to_string(t.join("syslog-ng.log")).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let rss_start = proc_status_kib(pid, "VmHWM:") as f64 / 1024.0;
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let probe = LatencyProbe::start(&broker.addr(), topic);
    let cpu0 = process_cpu_seconds(pid);
    let t0 = Instant::now();
    write_all(&dirs, w);
    let deadline = Instant::now() + Duration::from_secs(600);
    while probe.seen() < w.lines {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!(
                "syslog-ng delivered {} of {} lines in 10 minutes",
                probe.seen(),
                w.lines
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds(pid) - cpu0;
    let rss_run = proc_status_kib(pid, "VmHWM:") as f64 / 1024.0;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(Run {
        name: "syslog-ng".into(),
        cpu,
        wall,
        rss_start_mib: rss_start,
        rss_run_mib: rss_run,
        latency_ms: (w.rate > 0).then(|| probe.finish(w.lines)),
        hang: None,
    })
}
