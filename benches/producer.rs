//! The producer floor: N records of B bytes (default 1,000,000 × 200) sent
//! to a real broker (tansu) with no files involved, through each Kafka
//! client the agent can use, each in a process of its own. Prints CPU per
//! record, records and MB per CPU-second, and peak RSS (VmHWM) per client,
//! and the ratios between them. Measures; asserts nothing.
//!
//! Clients:
//! - `rdkafka`: the agent's librdkafka sink as it runs (`--kafka-client
//!   rdkafka`): one librdkafka message per record, per-record delivery
//!   reports;
//! - `native`: the agent's own client (the default), both driven through
//!   the same `Sink` interface the data loop uses, with the same records;
//! - `librdkafka-direct`: librdkafka as well as it can be driven (through
//!   `rdkafka-sys`): a cached topic handle, the partition chosen by the
//!   caller, the value copied once (`RD_KAFKA_MSG_F_COPY`), delivery reports
//!   as batched events counted without a callback per record. Values are
//!   the same JSON; with `--format raw` it sends the message without the
//!   headers (`rd_kafka_produce` takes none), so it does less work than the
//!   others there.
//!
//! `cargo xtask bench producer [-- --records N --record-bytes B --format raw|json --compression C]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bpftail::config::{Config, KafkaClient, OutputFormat, RunArgs};
use bpftail::discover::{MetaContext, Origin, Policy};
use bpftail::metrics::Metrics;
use bpftail::sink::{Ack, Outcome, Sink};
use bpftail::tail::decode::{Format, Record, Stream};
use support::*;

const STREAMS: usize = 8;

fn main() {
    if let Some(client) = std::env::args().skip_while(|a| a != "--child").nth(1) {
        child(&client);
        return;
    }
    let records = cli_arg("--records", "1000000");
    let bytes = cli_arg("--record-bytes", "200");
    let format = cli_arg("--format", "raw");
    let compression = cli_arg("--compression", "none");
    let broker = Broker::start();
    println!(
        "producer floor: {records} records of {bytes} B, --format {format}, --compression {compression}, tansu on 127.0.0.1, one process per client"
    );
    let mut results = Vec::new();
    for client in ["rdkafka", "librdkafka-direct", "native"] {
        let topic = format!("floor-{client}");
        broker.create_topic(&topic, STREAMS as u32);
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--child", client])
            .args(["--brokers", &broker.addr(), "--topic", &topic])
            .args(["--records", &records, "--record-bytes", &bytes])
            .args(["--format", &format, "--compression", &compression])
            .output()
            .expect("run the child");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{client}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{text}");
        let cpu: f64 = text
            .split("cpu_s=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN);
        let rss: f64 = text
            .split("peak_rss_mib=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN);
        results.push((client, cpu, rss));
    }
    let (_, nat_cpu, nat_rss) = results[results.len() - 1];
    for (client, cpu, rss) in &results[..results.len() - 1] {
        println!(
            "native vs {client} (same run): {:.1}x less CPU per record, {:.1}x less peak RSS",
            cpu / nat_cpu,
            rss / nat_rss
        );
    }
}

/// One client's run, in its own process: prints one line of figures.
fn child(client: &str) {
    let records: u64 = cli_arg("--records", "1000000").parse().unwrap();
    let size: usize = cli_arg("--record-bytes", "200").parse().unwrap();
    let format = match cli_arg("--format", "raw").as_str() {
        "json" => OutputFormat::Json,
        _ => OutputFormat::Raw,
    };
    let args = RunArgs {
        brokers: Some(cli_arg("--brokers", "")),
        topic: Some(cli_arg("--topic", "floor")),
        compression: Some(match cli_arg("--compression", "none").as_str() {
            "gzip" => bpftail::config::Compression::Gzip,
            "snappy" => bpftail::config::Compression::Snappy,
            "lz4" => bpftail::config::Compression::Lz4,
            "zstd" => bpftail::config::Compression::Zstd,
            _ => bpftail::config::Compression::None,
        }),
        format: Some(format),
        kafka_client: Some(match client {
            "rdkafka" => KafkaClient::Rdkafka,
            _ => KafkaClient::Native,
        }),
        node_name: Some("bench-node".into()),
        ..Default::default()
    };
    let cfg = Config::resolve(args).expect("config");
    if client == "librdkafka-direct" {
        direct(&cfg, records, size);
        return;
    }
    let metrics = Arc::new(Metrics::default());
    let stopping = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::bounded(1);
    let wake = rx.clone();
    match cfg.kafka_client {
        KafkaClient::Native => {
            let sink = bpftail::kafka::NativeSink::new(&cfg, metrics, stopping, (tx, rx)).unwrap();
            drive(client, sink, &cfg, &wake, records, size);
        }
        KafkaClient::Rdkafka => {
            let sink = bpftail::sink::rdkafka::RdkafkaSink::new(&cfg, metrics, stopping, (tx, rx))
                .unwrap();
            drive(client, sink, &cfg, &wake, records, size);
        }
    }
}

/// Sends `records` records as the data loop would (a turn every 1,000
/// records, waiting for budget when it is used up) and waits for every
/// acknowledgement.
fn drive<S: Sink>(
    client: &str,
    mut sink: S,
    cfg: &Config,
    wake: &crossbeam_channel::Receiver<()>,
    records: u64,
    size: usize,
) {
    let metas = metas(cfg);
    let msg: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let rec = record(&msg);
    let mut acks: Vec<Ack> = Vec::new();
    let mut delivered = 0u64;
    let mut take = |sink: &S, delivered: &mut u64| {
        sink.take_acks(&mut acks);
        for a in &acks {
            assert_eq!(a.outcome, Outcome::Delivered, "{a:?}");
            *delivered += u64::from(a.count);
        }
    };
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for i in 0..records {
        if i % 1000 == 0 {
            sink.turn();
            take(&sink, &mut delivered);
            while !sink.has_budget() {
                sink.eager_acks(true);
                let _ = wake.recv_timeout(Duration::from_millis(100));
                sink.turn();
                take(&sink, &mut delivered);
            }
            sink.eager_acks(false);
            sink.begin_batch();
        }
        let s = (i % STREAMS as u64) as usize;
        sink.send(&metas[s], &rec, s as u32, i / STREAMS as u64);
    }
    sink.turn();
    sink.eager_acks(true);
    while delivered < records {
        let _ = wake.recv_timeout(Duration::from_millis(100));
        sink.turn();
        take(&sink, &mut delivered);
        assert!(t0.elapsed() < Duration::from_secs(300), "acks never came");
    }
    report(client, cpu_seconds() - cpu0, t0, records, size);
}

/// One file's metadata per container stream, as discovery renders it.
fn metas(cfg: &Config) -> Vec<bpftail::discover::FileMeta> {
    let ctx = MetaContext {
        topic: cfg.topic.clone(),
        node: cfg.node_name.clone(),
        pods: None,
        labels: cfg.pod_labels.clone(),
        annotations: cfg.pod_annotations.clone(),
        policy: Policy {
            output: cfg.format,
            ..Policy::default()
        },
        multiline: Default::default(),
        rate_limit: None,
    };
    (0..STREAMS)
        .map(|i| {
            ctx.render(
                Origin {
                    namespace: "bench".into(),
                    pod: format!("pod-{i}").into(),
                    pod_uid: format!("uid-{i}").into(),
                    container: "app".into(),
                    ..Origin::default()
                },
                Format::Cri,
            )
        })
        .collect()
}

fn record(msg: &[u8]) -> Record<'_> {
    Record {
        time: b"2026-11-25T16:00:00.123456789Z",
        stream: Stream::Stdout,
        msg,
        partial: false,
        truncated: false,
        malformed: false,
        start: 0,
    }
}

/// The records of [`drive`], rendered the same way, produced through
/// librdkafka's C API with everything per record it can avoid avoided.
fn direct(cfg: &Config, records: u64, size: usize) {
    use rdkafka::bindings as rd;
    use std::ffi::{CString, c_void};
    let metrics = Metrics::default();
    let metas = metas(cfg);
    let msg: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let rec = record(&msg);
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: plain librdkafka C API use: every pointer passed is valid for
    // the call (NUL-terminated strings, buffers with their lengths), the
    // handles are created before use and destroyed once; events are
    // destroyed after they are read.
    unsafe {
        let conf = rd::rd_kafka_conf_new();
        for (k, v) in [
            ("bootstrap.servers", cfg.brokers.as_str()),
            ("enable.idempotence", "true"),
            ("linger.ms", "20"),
            ("queue.buffering.max.kbytes", "8192"),
        ] {
            let (k, v) = (CString::new(k).unwrap(), CString::new(v).unwrap());
            rd::rd_kafka_conf_set(conf, k.as_ptr(), v.as_ptr(), err.as_mut_ptr(), err.len());
        }
        rd::rd_kafka_conf_set_events(conf, rd::RD_KAFKA_EVENT_DR);
        let rk = rd::rd_kafka_new(
            rd::rd_kafka_type_t::RD_KAFKA_PRODUCER,
            conf,
            err.as_mut_ptr(),
            err.len(),
        );
        assert!(!rk.is_null(), "rd_kafka_new failed");
        let topic = CString::new(metas[0].topics[0].as_bytes()).unwrap();
        let rkt = rd::rd_kafka_topic_new(rk, topic.as_ptr(), std::ptr::null_mut());
        let queue = rd::rd_kafka_queue_get_main(rk);
        let mut delivered = 0u64;
        let poll = |timeout: i32, delivered: &mut u64| {
            loop {
                let ev = rd::rd_kafka_queue_poll(queue, timeout);
                if ev.is_null() {
                    return;
                }
                if rd::rd_kafka_event_type(ev) == rd::RD_KAFKA_EVENT_DR {
                    *delivered += rd::rd_kafka_event_message_count(ev) as u64;
                }
                rd::rd_kafka_event_destroy(ev);
                if timeout > 0 {
                    return;
                }
            }
        };
        let mut value = Vec::with_capacity(size * 2);
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        for i in 0..records {
            let s = (i % STREAMS as u64) as usize;
            let meta = &metas[s];
            value.clear();
            if cfg.format == OutputFormat::Raw {
                value.extend_from_slice(rec.msg);
            } else {
                bpftail::sink::render_json(&mut value, cfg.format, meta, &rec, &metrics);
            }
            let partition = bpftail::kafka::partitioner::partition(meta.key(), STREAMS) as i32;
            while rd::rd_kafka_produce(
                rkt,
                partition,
                rd::RD_KAFKA_MSG_F_COPY,
                value.as_mut_ptr() as *mut c_void,
                value.len(),
                meta.key().as_ptr() as *const c_void,
                meta.key().len(),
                std::ptr::null_mut(),
            ) != 0
            {
                poll(100, &mut delivered);
            }
            if i % 1000 == 0 {
                poll(0, &mut delivered);
            }
        }
        while delivered < records {
            poll(100, &mut delivered);
            assert!(t0.elapsed() < Duration::from_secs(300), "acks never came");
        }
        report("librdkafka-direct", cpu_seconds() - cpu0, t0, records, size);
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_topic_destroy(rkt);
        rd::rd_kafka_destroy(rk);
    }
}

fn report(client: &str, cpu: f64, t0: Instant, records: u64, size: usize) {
    let wall = t0.elapsed().as_secs_f64();
    let rss = peak_rss_mib();
    let mb = (records as f64 * size as f64) / 1e6;
    println!(
        "{client:>17}: cpu_s={cpu:.3} wall_s={wall:.2} ns_per_record={:.0} records_per_cpu_s={:.0} mb_per_cpu_s={:.0} peak_rss_mib={rss:.1}",
        cpu * 1e9 / records as f64,
        records as f64 / cpu,
        mb / cpu,
    );
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}
