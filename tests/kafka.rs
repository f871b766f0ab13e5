//! The native Kafka client end to end: what it produces read back by
//! librdkafka's consumer (keys, headers, timestamps, every codec), its
//! partitions against librdkafka's `murmur2_random`, and the faults a real
//! broker cannot be asked for: a leader change, injected produce errors
//! and a broker going down (librdkafka's mock cluster), a hung broker and
//! a relay that refuses, swallows, garbles or cuts the traffic.

mod support;

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use support::*;

impl Node {
    /// [`Node::args`] with the native Kafka client named (whatever
    /// `BPFTAIL_KAFKA_CLIENT` says).
    fn native_args(&self, brokers: &str, topic: &str, extra: &[&str]) -> Vec<String> {
        let mut a = self.args(brokers, topic, &["--kafka-client", "native"]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }
}

/// Writes lines `seqs` for each of `writers` containers under `pods`
/// (appending, one thread per container); returns when all are written.
fn write_lines(pods: &Path, writers: usize, seqs: Range<u64>, len: usize) {
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let dir = container_dir(pods, "ns", &format!("pod-{w}"), &format!("uid-{w}"), "app");
            let seqs = seqs.clone();
            std::thread::spawn(move || {
                let mut out = LineWriter::create(&dir.join("0.log"));
                for seq in seqs {
                    out.line(w, seq, len);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Every line of every writer arrived, in order per writer (resends after a
/// retry allowed when `dups`).
fn assert_all(node: &Node, records: &[Received], writers: usize, lines: u64, dups: bool) {
    let t = tally(records, writers, lines);
    assert_eq!(
        t.missing,
        0,
        "missing: {t:?}\nagent log:\n{}",
        node.agent_log()
    );
    assert_eq!(
        t.jumps,
        0,
        "out of order: {t:?}\nagent log:\n{}",
        node.agent_log()
    );
    assert_eq!(t.foreign, 0, "{t:?}");
    if !dups {
        assert_eq!((t.duplicates, t.rewinds), (0, 0), "{t:?}");
    }
}

#[test]
fn every_codec_is_read_back_by_librdkafka_with_keys_headers_and_timestamps() {
    let broker = Broker::start();
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("interop-{codec}");
        broker.create_topic(&topic, 4);
        let node = Node::new();
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let agent = Agent::start(
            &node.native_args(
                &broker.addr(),
                &topic,
                &["--format", "raw", "--compression", codec],
            ),
            &node.log,
        );
        let collector = Collector::start(&broker.addr(), &topic);
        write_lines(&node.pods, 3, 0..2_000, 150);
        let records = collector.wait_for(
            Duration::from_secs(60),
            || format!("6,000 lines ({codec})\nagent log:\n{}", node.agent_log()),
            |r| unique(r, 3, 2_000) == 6_000,
        );
        assert_all(&node, &records, 3, 2_000, false);
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for r in &records {
            let (w, _) = parse_seq(&r.value).unwrap();
            assert_eq!(r.key, format!("uid-{w}/app").as_bytes(), "{codec}");
            assert_eq!(r.header("stream"), Some("stdout"), "{codec}");
            assert_eq!(r.header("namespace"), Some("ns"));
            assert_eq!(r.header("pod"), Some(&*format!("pod-{w}")));
            assert_eq!(r.header("container"), Some("app"));
            assert_eq!(r.header("node"), Some("test-node"));
            assert!(
                r.header("time")
                    .unwrap()
                    .starts_with("2026-11-25T16:00:00.")
            );
            let ts = r.timestamp.expect("a timestamp");
            assert!(ts >= before - 1000 && ts <= after, "{codec}: {ts}");
        }
        assert!(agent.metric("bpftail_kafka_batches_total") > 0);
        assert!(agent.stop().success(), "{}", node.agent_log());
    }
}

/// Records the partition librdkafka chose per key.
struct Partitions(Mutex<HashMap<Vec<u8>, i32>>);

impl ClientContext for Partitions {}

impl ProducerContext for Partitions {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let m = result.as_ref().expect("delivered");
        self.0
            .lock()
            .unwrap()
            .insert(m.key().unwrap().to_vec(), m.partition());
    }
}

#[test]
fn a_containers_partition_is_the_one_librdkafka_murmur2_random_picks() {
    let broker = Broker::start();
    broker.create_topic("native", 7);
    broker.create_topic("librdkafka", 7);
    let node = Node::new();
    let writers = 24;
    let agent = Agent::start(&node.native_args(&broker.addr(), "native", &[]), &node.log);
    let collector = Collector::start(&broker.addr(), "native");
    write_lines(&node.pods, writers, 0..10, 100);
    let records = collector.wait_for(
        Duration::from_secs(60),
        || {
            format!(
                "10 lines of {writers} writers\nagent log:\n{}",
                node.agent_log()
            )
        },
        |r| unique_json(r, writers, 10) == writers * 10,
    );
    assert!(agent.stop().success());
    let ours: HashMap<Vec<u8>, i32> = records
        .iter()
        .map(|r| (r.key.clone(), r.partition))
        .collect();
    assert_eq!(ours.len(), writers);

    let ctx = Partitions(Mutex::default());
    let producer: BaseProducer<Partitions> = ClientConfig::new()
        .set("bootstrap.servers", broker.addr())
        .set("partitioner", "murmur2_random")
        .create_with_context(ctx)
        .unwrap();
    for key in ours.keys() {
        producer
            .send(
                BaseRecord::<_, _, ()>::to("librdkafka")
                    .key(key)
                    .payload("x"),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let theirs = producer.context().0.lock().unwrap().clone();
    assert_eq!(ours, theirs);
    let used: std::collections::HashSet<_> = ours.values().collect();
    assert!(used.len() > 3, "24 keys spread over 7 partitions: {used:?}");
}

/// Unique records of `--format json` values (the message is a member).
fn unique_json(records: &[Received], writers: usize, lines: u64) -> usize {
    let as_raw: Vec<Received> = records.iter().map(message_of).collect();
    unique(&as_raw, writers, lines)
}

fn message_of(r: &Received) -> Received {
    let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
    let mut r = r.clone();
    r.value = v["message"].as_str().unwrap().as_bytes().to_vec();
    r
}

#[test]
fn a_leader_change_injected_errors_and_a_broker_down_lose_and_reorder_nothing() {
    let mock = MockCluster::new(3).unwrap();
    mock.create_topic("mock", 4, 3).unwrap();
    let brokers = mock.bootstrap_servers();
    let node = Node::new();
    let agent = Agent::start(
        &node.native_args(
            &brokers,
            "mock",
            &[
                "--format",
                "raw",
                "--kafka-option",
                "request.timeout.ms=3000",
                "--kafka-option",
                "reconnect.backoff.max.ms=300",
                "--kafka-option",
                "retry.backoff.max.ms=300",
            ],
        ),
        &node.log,
    );
    let collector = Collector::start(&brokers, "mock");
    // Each fault is set before the lines that meet it are written.
    let (writers, lines) = (4, 5_000);
    let arrived = |n: u64| {
        collector.wait_for(
            Duration::from_secs(60),
            || {
                format!(
                    "lines 0..{n} of {writers} writers\nagent log:\n{}",
                    node.agent_log()
                )
            },
            |r| unique(r, writers, n) == writers * n as usize,
        );
    };
    write_lines(&node.pods, writers, 0..1_000, 100);
    arrived(1_000);
    // Every partition moves to another leader.
    for p in 0..4 {
        mock.partition_leader("mock", p, Some(1 + (p + 1) % 3))
            .unwrap();
    }
    write_lines(&node.pods, writers, 1_000..2_000, 100);
    arrived(2_000);
    // A burst of produce errors: each answer carries the next one, and
    // every retry is a new request, so all six are met (throttling,
    // leadership, replicas, timeouts).
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_THROTTLING_QUOTA_EXCEEDED,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ],
    );
    write_lines(&node.pods, writers, 2_000..3_000, 100);
    arrived(3_000);
    // A leader goes down while lines come, until the agent has seen it.
    let errors = agent.metric("bpftail_kafka_request_errors_total");
    mock.broker_down(2).unwrap();
    write_lines(&node.pods, writers, 3_000..4_000, 100);
    wait_until(
        Duration::from_secs(30),
        || node.agent_log(),
        || agent.metric("bpftail_kafka_request_errors_total") > errors,
    );
    mock.broker_up(2).unwrap();
    write_lines(&node.pods, writers, 4_000..lines, 100);
    let records = collector.wait_for(
        Duration::from_secs(120),
        || {
            format!(
                "lines 0..{lines} of {writers} writers\nagent log:\n{}",
                node.agent_log()
            )
        },
        |r| unique(r, writers, lines) == writers * lines as usize,
    );
    assert_all(&node, &records, writers, lines, true);
    let m = agent.metrics();
    assert!(m["bpftail_kafka_partition_errors_total"] >= 6, "{m:?}");
    assert!(m["bpftail_kafka_metadata_requests_total"] >= 2, "{m:?}");
    assert_eq!(m["bpftail_delivery_failures_total{kind=\"dropped\"}"], 0);
    assert!(agent.stop().success(), "{}", node.agent_log());
}

#[test]
fn a_broker_that_refuses_hangs_garbles_or_cuts_answers_costs_retries_not_records() {
    let broker = Broker::start_behind_proxy();
    broker.create_topic("faults", 4);
    let node = Node::new();
    let agent = Agent::start(
        &node.native_args(
            &broker.addr(),
            "faults",
            &[
                "--format",
                "raw",
                "--kafka-option",
                "request.timeout.ms=1500",
                "--kafka-option",
                "reconnect.backoff.max.ms=300",
            ],
        ),
        &node.log,
    );
    let (writers, chunk) = (4, 500);
    let mut lines = 0;
    let mut errors = 0;
    for fault in [
        Fault::Blackhole,
        Fault::Garbage,
        Fault::Truncate,
        Fault::Refuse,
    ] {
        broker.fault(fault);
        // Lines written while the fault lasts, until the agent has seen it.
        write_lines(&node.pods, writers, lines..lines + chunk, 100);
        lines += chunk;
        wait_until(
            Duration::from_secs(20),
            || format!("{fault:?} went unnoticed\n{}", node.agent_log()),
            || agent.metric("bpftail_kafka_request_errors_total") > errors,
        );
        errors = agent.metric("bpftail_kafka_request_errors_total");
        broker.fault(Fault::None);
        assert!(agent.healthz(), "{fault:?}");
    }
    write_lines(&node.pods, writers, lines..lines + chunk, 100);
    lines += chunk;
    let collector = Collector::start(&broker.addr(), "faults");
    let records = collector.wait_for(
        Duration::from_secs(120),
        || {
            format!(
                "lines 0..{lines} of {writers} writers\nagent log:\n{}",
                node.agent_log()
            )
        },
        |r| unique(r, writers, lines) == writers * lines as usize,
    );
    assert_all(&node, &records, writers, lines, true);
    let log = node.agent_log();
    assert!(log.contains("Kafka request failed"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(agent.stop().success(), "{log}");
}

#[test]
fn a_hung_broker_is_waited_out_and_nothing_is_lost() {
    let broker = Broker::start();
    broker.create_topic("hung", 2);
    let node = Node::new();
    let agent = Agent::start(
        &node.native_args(
            &broker.addr(),
            "hung",
            &[
                "--format",
                "raw",
                "--kafka-option",
                "request.timeout.ms=2000",
            ],
        ),
        &node.log,
    );
    let (writers, lines) = (2, 2_000);
    let collector = Collector::start(&broker.addr(), "hung");
    write_lines(&node.pods, writers, 0..500, 100);
    collector.wait_for(
        Duration::from_secs(30),
        || "1,000 records before the freeze".into(),
        |r| r.len() >= 1_000,
    );
    broker.freeze(true);
    let cpu_before = agent.cpu_seconds();
    let frozen_at = Instant::now();
    write_lines(&node.pods, writers, 500..lines, 100);
    // Until a request has timed out at least once.
    wait_until(
        Duration::from_secs(20),
        || node.agent_log(),
        || agent.metric("bpftail_kafka_request_errors_total") > 0,
    );
    let hung_for = frozen_at.elapsed();
    let cpu = agent.cpu_seconds() - cpu_before;
    broker.freeze(false);
    eprintln!(
        "hung broker: {cpu:.3} CPU-s in {:.1} s ({:.2} % of a core)",
        hung_for.as_secs_f64(),
        100.0 * cpu / hung_for.as_secs_f64()
    );
    let records = collector.wait_for(
        Duration::from_secs(60),
        || {
            format!(
                "lines 0..{lines} of {writers} writers\nagent log:\n{}",
                node.agent_log()
            )
        },
        |r| unique(r, writers, lines) == writers * lines as usize,
    );
    assert_all(&node, &records, writers, lines, true);
    assert!(agent.stop().success(), "{}", node.agent_log());
}

#[test]
fn options_the_native_client_lacks_fail_at_startup_naming_the_way_out() {
    let node = Node::new();
    let out = std::process::Command::new(bpftail_bin())
        .arg("run")
        .args(node.native_args(
            "127.0.0.1:1",
            "t",
            &["--kafka-option", "sasl.kerberos.service.name=kafka"],
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sasl.kerberos.service.name"), "{err}");
    assert!(err.contains("--kafka-client rdkafka"), "{err}");
}

/// Waits until the agent has failed at least one Kafka request; returns
/// its log.
fn wait_for_request_errors(agent: &Agent, node: &Node) -> String {
    wait_until(
        Duration::from_secs(30),
        || format!("no error seen\n{}", node.agent_log()),
        || agent.metric("bpftail_kafka_request_errors_total") > 0,
    );
    node.agent_log()
}

#[test]
fn tls_with_a_client_certificate_ships_everything_and_untrusted_brokers_are_explained() {
    let (tmp, _) = test_dir("bpftail-tls-");
    let pki = security::Pki::new(&tmp.path().join("pki"));
    let port = free_port();
    let addr = format!("localhost:{port}");
    let broker = Broker::start_advertising(&addr);
    broker.create_topic("tls", 2);
    let _stunnel = security::Stunnel::start(&pki, port, broker.port(), true);
    let (ca, cert, key) = (
        pki.path("ca.crt"),
        pki.path("client.crt"),
        pki.path("client.key"),
    );
    let tls = |ca: &str| {
        vec![
            "--kafka-option".to_owned(),
            "security.protocol=ssl".into(),
            "--kafka-option".into(),
            format!("ssl.ca.location={ca}"),
            "--kafka-option".into(),
            format!("ssl.certificate.location={cert}"),
            "--kafka-option".into(),
            format!("ssl.key.location={key}"),
            "--format".into(),
            "raw".into(),
        ]
    };
    let ok_args = tls(&ca);
    let node = Node::new();
    let agent = Agent::start(
        &node.native_args(&addr, "tls", &as_strs(&ok_args)),
        &node.log,
    );
    // librdkafka reads back through the same TLS endpoint.
    let collector = Collector::start_with(
        &addr,
        "tls",
        &[
            ("security.protocol", "ssl"),
            ("ssl.ca.location", &ca),
            ("ssl.certificate.location", &cert),
            ("ssl.key.location", &key),
        ],
    );
    write_lines(&node.pods, 3, 0..1_000, 120);
    let records = collector.wait_for(
        Duration::from_secs(60),
        || format!("3,000 lines over TLS\nagent log:\n{}", node.agent_log()),
        |r| unique(r, 3, 1_000) == 3_000,
    );
    assert_all(&node, &records, 3, 1_000, false);
    assert!(agent.stop().success());

    // A CA that did not sign the broker's certificate.
    let node = Node::new();
    let agent = Agent::start(
        &node.native_args(&addr, "tls", &as_strs(&tls(&pki.path("other-ca.crt")))),
        &node.log,
    );
    write_lines(&node.pods, 1, 0..10, 100);
    let log = wait_for_request_errors(&agent, &node);
    assert!(log.contains("not trusted"), "{log}");
    assert!(log.contains("ssl.ca.location"), "{log}");
    assert_eq!(agent.metric("bpftail_records_delivered_total"), 0);
    assert!(agent.stop().success());

    // The right CA, but the broker reached by a name its certificate lacks.
    let node = Node::new();
    let agent = Agent::start(
        &node.native_args(&format!("127.0.0.1:{port}"), "tls", &as_strs(&ok_args)),
        &node.log,
    );
    write_lines(&node.pods, 1, 0..10, 100);
    let log = wait_for_request_errors(&agent, &node);
    assert!(log.contains("address mismatch"), "{log}");
    assert!(log.contains("\"127.0.0.1\""), "{log}");
    assert!(agent.stop().success());

    // No client certificate: the endpoint refuses the handshake.
    let node = Node::new();
    let agent = Agent::start(
        &node.native_args(
            &addr,
            "tls",
            &[
                "--kafka-option",
                "security.protocol=ssl",
                "--kafka-option",
                &format!("ssl.ca.location={ca}"),
            ],
        ),
        &node.log,
    );
    write_lines(&node.pods, 1, 0..10, 100);
    let log = wait_for_request_errors(&agent, &node);
    assert!(log.contains("TLS with") || log.contains("failed"), "{log}");
    assert_eq!(agent.metric("bpftail_records_delivered_total"), 0);
    assert!(agent.stop().success());

    // A CA file that is not there is a startup error naming the key.
    let out = std::process::Command::new(bpftail_bin())
        .arg("run")
        .args(node.native_args(
            &addr,
            "tls",
            &[
                "--kafka-option",
                "security.protocol=ssl",
                "--kafka-option",
                "ssl.ca.location=/nonexistent/ca.pem",
            ],
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ssl.ca.location"), "{err}");
}

#[test]
fn sasl_plain_and_scram_authenticate_against_a_server_librdkafka_accepts() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let broker = Broker::start_advertising(&addr);
    broker.create_topic("sasl", 2);
    let _gate = security::SaslGate::start(port, broker.port(), "agent", "s3cret");
    let sasl = |mechanism: &str, password: &str| {
        vec![
            "--kafka-option".to_owned(),
            "security.protocol=sasl_plaintext".into(),
            "--kafka-option".into(),
            format!("sasl.mechanism={mechanism}"),
            "--kafka-option".into(),
            "sasl.username=agent".into(),
            "--kafka-option".into(),
            format!("sasl.password={password}"),
            "--format".into(),
            "raw".into(),
        ]
    };
    // The gate is a real SASL server as far as librdkafka is concerned.
    let collector = Collector::start_with(
        &addr,
        "sasl",
        &[
            ("security.protocol", "sasl_plaintext"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "agent"),
            ("sasl.password", "s3cret"),
        ],
    );
    let wrong: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &addr)
        .set("security.protocol", "sasl_plaintext")
        .set("sasl.mechanism", "SCRAM-SHA-256")
        .set("sasl.username", "agent")
        .set("sasl.password", "wrong")
        .set("log_level", "0")
        .create()
        .unwrap();
    assert!(
        wrong
            .client()
            .fetch_metadata(Some("sasl"), Duration::from_secs(3))
            .is_err(),
        "the gate let librdkafka in with a wrong password"
    );

    let mut lines = 0;
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let node = Node::new();
        let args = sasl(mechanism, "s3cret");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start(&node.native_args(&addr, "sasl", &args), &node.log);
        // Each agent writes as writer 0 with sequence numbers after the
        // previous ones (a fresh pods dir each time, same key).
        write_lines(&node.pods, 1, lines..lines + 500, 100);
        lines += 500;
        collector.wait_for(
            Duration::from_secs(60),
            || {
                format!(
                    "{lines} lines ({mechanism})\nagent log:\n{}",
                    node.agent_log()
                )
            },
            |r| unique(r, 1, lines) == lines as usize,
        );
        assert!(
            agent.metric("bpftail_kafka_batches_total") > 0,
            "{mechanism}: {}",
            node.agent_log()
        );
        assert!(agent.stop().success());
    }
    let records = collector.received();
    assert_eq!(unique(&records, 1, lines), lines as usize);

    // A wrong password: said in words, nothing shipped, never a crash.
    let node = Node::new();
    let args = sasl("SCRAM-SHA-256", "wrong");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&node.native_args(&addr, "sasl", &args), &node.log);
    write_lines(&node.pods, 1, 0..10, 100);
    let log = wait_for_request_errors(&agent, &node);
    assert!(
        log.contains("refused user \\\"agent\\\"") || log.contains("refused user"),
        "{log}"
    );
    assert!(log.contains("sasl.password"), "{log}");
    assert_eq!(agent.metric("bpftail_records_delivered_total"), 0);
    assert!(agent.stop().success());
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_topic_that_disappears_mid_stream_has_every_record_reported_and_files_keep_their_place() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("vanishing", 2, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let node = Node::new();
    let agent = Agent::start(
        &node.native_args(
            &brokers,
            "vanishing",
            &[
                "--format",
                "raw",
                "--kafka-option",
                "metadata.max.age.ms=1000",
                "--kafka-option",
                "topic.metadata.propagation.max.ms=1000",
            ],
        ),
        &node.log,
    );
    write_lines(&node.pods, 2, 0..500, 100);
    wait_until(
        Duration::from_secs(30),
        || node.agent_log(),
        || agent.metric("bpftail_records_delivered_total") >= 1_000,
    );
    // The cluster stops knowing the topic; lines keep coming.
    mock.topic_error(
        "vanishing",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
    )
    .unwrap();
    // Until the agent has noticed (its metadata refresh, then the
    // propagation time), and one chunk after.
    let mut lines = 500;
    wait_until(
        Duration::from_secs(30),
        || node.agent_log(),
        || {
            write_lines(&node.pods, 2, lines..lines + 50, 100);
            lines += 50;
            node.agent_log().contains("Kafka topic does not exist")
        },
    );
    write_lines(&node.pods, 2, lines..lines + 500, 100);
    lines += 500;
    let total = 2 * lines;
    // Every record ends in a report — delivered before the refresh noticed,
    // or counted as dropped after — and none is left hanging.
    let reported = || {
        let m = agent.metrics();
        (
            m["bpftail_records_delivered_total"],
            m["bpftail_delivery_failures_total{kind=\"dropped\"}"],
            m["bpftail_inflight_bytes"],
        )
    };
    wait_until(
        Duration::from_secs(60),
        || {
            format!(
                "(delivered, dropped, in flight) {:?} of {total}\n{}",
                reported(),
                node.agent_log()
            )
        },
        || {
            let (delivered, dropped, inflight) = reported();
            delivered + dropped == total && inflight == 0
        },
    );
    assert!(reported().1 > 0, "nothing was dropped: {:?}", reported());
    assert!(agent.healthz());
    assert!(agent.stop().success());
}
