//! Pod metadata by list-watch: the real `bpftail` binary against a fake
//! Kubernetes API server that speaks the real list/watch protocol (see
//! `support/kubeapi.rs`), producing to a real Kafka-protocol broker.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use support::kubeapi::{FakeApi, PodSpec, pod};
use support::*;

const NODE: &str = "test-node";

struct Setup {
    _tmp: tempfile::TempDir,
    pods: PathBuf,
    data: PathBuf,
    log: PathBuf,
    kubeconfig: PathBuf,
}

impl Setup {
    fn new(api: &FakeApi) -> Setup {
        let (tmp, pods) = test_dir("bpftail-kube-");
        Setup {
            kubeconfig: api.kubeconfig(tmp.path()),
            pods,
            data: tmp.path().join("data"),
            log: tmp.path().join("agent.log"),
            _tmp: tmp,
        }
    }

    fn agent(&self, broker: &Broker, extra: &[&str]) -> Agent {
        let mut args = agent_args(
            &self.pods,
            &self.data,
            &broker.addr(),
            "logs",
            &[
                "--node-name",
                NODE,
                "--kube",
                "auto",
                "--sweep-interval-ms",
                "500",
            ],
        );
        if !extra.contains(&"--format") {
            args.extend(["--format".to_string(), "json".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let how = Launch {
            env: vec![
                ("KUBECONFIG".into(), self.kubeconfig.display().to_string()),
                ("BPFTAIL_LOG".into(), "info".into()),
            ],
            ..Default::default()
        };
        Agent::launch(&args, &self.log, &how)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn web(uid: &str, name: &str, labels: Value) -> Value {
    pod(&PodSpec {
        namespace: "shop",
        name,
        uid,
        node: NODE,
        labels,
        annotations: json!({"team": "payments", "kubectl.kubernetes.io/restartedAt": "2026-11-25T09:00:00Z"}),
        containers: vec![("app", "nginx:1.27", &format!("c0ffee-{uid}"), vec![])],
        owner: Some(("ReplicaSet", "web-7d4b9c")),
    })
}

fn write_lines(path: &Path, writer: usize, seqs: std::ops::Range<u64>) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut buf = Vec::new();
    for seq in seqs {
        cri_line(&mut buf, writer, seq, 100);
        std::io::Write::write_all(&mut f, &buf).unwrap();
    }
}

/// Plain text lines, as an application writes its own log file.
fn write_plain(path: &Path, writer: usize, seqs: std::ops::Range<u64>) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    for seq in seqs {
        std::io::Write::write_all(
            &mut f,
            format!("w{writer} seq={seq:08} GET /index.html 200\n").as_bytes(),
        )
        .unwrap();
    }
}

/// The JSON records of `writer`, by sequence number.
fn records_of(records: &[Received], writer: usize) -> Vec<(u64, Value)> {
    let mut out: Vec<(u64, Value)> = records
        .iter()
        .filter_map(|r| {
            let v: Value = serde_json::from_slice(&r.value).ok()?;
            let (w, seq) = parse_seq(v["message"].as_str()?.as_bytes())?;
            (w == writer).then_some((seq, v))
        })
        .collect();
    out.sort_by_key(|(s, _)| *s);
    out.dedup_by_key(|(s, _)| *s);
    out
}

fn wait_records(c: &Collector, writer: usize, n: usize) -> Vec<(u64, Value)> {
    let all = c.wait_for(
        Duration::from_secs(60),
        || format!("{n} records of writer {writer}"),
        |r| records_of(r, writer).len() >= n,
    );
    let got = records_of(&all, writer);
    assert_eq!(got.len(), n, "writer {writer}: records arrived");
    got
}

/// Waits until the agent's pod cache has changed since it was at
/// `generation` (`bpftail_kube_generation`, read before the change was made
/// at the API) and the data loop has applied the change to the files it
/// follows (`bpftail_kube_generation_applied`): lines written from then on
/// carry it.
fn wait_pod_change_applied(agent: &Agent, generation: u64) {
    let now = || {
        let m = agent.metrics();
        let get = |k: &str| m.get(k).copied().unwrap_or(0);
        (
            get("bpftail_kube_generation"),
            get("bpftail_kube_generation_applied"),
        )
    };
    wait_until(
        Duration::from_secs(60),
        || {
            format!(
                "a pod change after generation {generation}, applied; (generation, applied) = {:?}\nagent log:\n{}",
                now(),
                std::fs::read_to_string(&agent.log).unwrap_or_default()
            )
        },
        || {
            let (current, applied) = now();
            current > generation && applied >= current
        },
    );
}

#[test]
fn records_carry_pod_metadata_through_creation_deletion_and_an_api_outage() {
    let broker = Broker::start();
    broker.create_topic("logs", 2);
    let api = FakeApi::start();
    api.put(web(
        "uid-a",
        "web-a",
        json!({"app": "web", "tier": "front"}),
    ));
    // Another node's pod: the field selector keeps it out.
    api.put(pod(&PodSpec {
        namespace: "shop",
        name: "elsewhere",
        uid: "uid-x",
        node: "other-node",
        labels: json!({"app": "other"}),
        annotations: json!({}),
        containers: vec![("app", "busybox", "dead", vec![])],
        owner: None,
    }));
    let s = Setup::new(&api);
    let a_log = container_dir(&s.pods, "shop", "web-a", "uid-a", "app").join("0.log");
    write_lines(&a_log, 0, 0..10);
    let agent = s.agent(&broker, &["--pod-annotations", "team"]);
    let collector = Collector::start(&broker.addr(), "logs");

    // A pod known at start: labels, owner, image, container id.
    let got = wait_records(&collector, 0, 10);
    for (_, r) in &got {
        assert_eq!(r["namespace"], "shop");
        assert_eq!(r["pod"], "web-a");
        assert_eq!(r["labels"], json!({"app": "web", "tier": "front"}));
        assert_eq!(r["annotations"], json!({"team": "payments"}));
        assert_eq!(
            r["owner"],
            json!({"kind": "ReplicaSet", "name": "web-7d4b9c"})
        );
        assert_eq!(r["image"], "nginx:1.27");
        assert_eq!(r["container_id"], "c0ffee-uid-a");
        assert_eq!(r["pod_uid"], "uid-a");
        assert_eq!(r["node"], NODE);
    }
    assert_eq!(
        agent.metric("bpftail_kube_pods"),
        1,
        "only this node's pods"
    );
    assert_eq!(agent.metric("bpftail_kube_synced"), 1);
    eprintln!(
        "agent with the pod watch: RSS {} KiB, peak {} KiB",
        agent.rss_kib(),
        agent.peak_rss_kib()
    );

    // A pod created after start, whose log file appears before the API
    // reports it: its first lines are enriched all the same. The pod's
    // directory appears whole (made aside, renamed in), and the API reports
    // the pod once the agent has found the file and holds it back for its
    // pod (up to 2 s) instead of shipping without it.
    let staging = s.pods.parent().unwrap().join("staging");
    let staged = container_dir(&staging, "shop", "web-b", "uid-b", "app").join("0.log");
    write_lines(&staged, 1, 0..5);
    std::fs::rename(
        staging.join("shop_web-b_uid-b"),
        s.pods.join("shop_web-b_uid-b"),
    )
    .unwrap();
    let b_log = s.pods.join("shop_web-b_uid-b/app/0.log");
    agent.wait_metric(Duration::from_secs(60), "bpftail_files_awaiting_pod", 1);
    api.put(web("uid-b", "web-b", json!({"app": "web", "tier": "back"})));
    let got = wait_records(&collector, 1, 5);
    for (_, r) in &got {
        assert_eq!(r["labels"]["tier"], "back", "{r}");
        assert_eq!(r["owner"]["kind"], "ReplicaSet");
    }

    // Deleted: its last lines (written after the deletion) are still enriched.
    let generation = agent.metric("bpftail_kube_generation");
    api.delete("uid-b");
    wait_pod_change_applied(&agent, generation);
    write_lines(&b_log, 1, 5..10);
    let got = wait_records(&collector, 1, 10);
    for (_, r) in &got[5..] {
        assert_eq!(r["labels"]["tier"], "back", "{r}");
    }

    // The API goes away (and the agent has met it gone): shipping goes on,
    // with the metadata cached.
    let errors = agent.metric("bpftail_kube_watch_errors_total");
    api.outage();
    agent.wait_metric(
        Duration::from_secs(60),
        "bpftail_kube_watch_errors_total",
        errors + 1,
    );
    write_lines(&a_log, 0, 10..20);
    let got = wait_records(&collector, 0, 20);
    assert_eq!(got[19].1["labels"]["app"], "web");
    assert!(agent.healthz());

    // It comes back; a change made meanwhile reaches the records written
    // once the agent has it.
    let generation = agent.metric("bpftail_kube_generation");
    api.put(web("uid-a", "web-a", json!({"app": "web", "tier": "edge"})));
    api.restore();
    wait_pod_change_applied(&agent, generation);
    write_lines(&a_log, 0, 20..21);
    let got = wait_records(&collector, 0, 21);
    assert_eq!(
        got[20].1["labels"]["tier"],
        "edge",
        "the label change never arrived; agent log:\n{}",
        s.log()
    );

    for r in api.requests() {
        assert!(
            r.contains("fieldSelector=spec.nodeName%3Dtest-node")
                || r.contains("fieldSelector=spec.nodeName=test-node"),
            "request without the node's field selector: {r}"
        );
    }
    assert!(agent.stop().success());
}

#[test]
fn a_410_gone_relists_and_a_dropped_watch_resumes() {
    let broker = Broker::start();
    broker.create_topic("logs", 1);
    let api = FakeApi::start();
    api.put(web("uid-a", "web-a", json!({"app": "web", "v": "1"})));
    let s = Setup::new(&api);
    let a_log = container_dir(&s.pods, "shop", "web-a", "uid-a", "app").join("0.log");
    write_lines(&a_log, 0, 0..5);
    let agent = s.agent(&broker, &[]);
    let collector = Collector::start(&broker.addr(), "logs");
    let got = wait_records(&collector, 0, 5);
    assert_eq!(got[0].1["labels"]["v"], "1");
    let lists = |api: &FakeApi| {
        api.requests()
            .iter()
            .filter(|r| !r.contains("watch=true"))
            .count()
    };
    assert_eq!(lists(&api), 1);

    // A change reaches the agent (generation read before it was made), and
    // the next line carries it.
    let mut next = 5;
    let arrives = |label: &str, generation: u64, next: &mut u64| {
        wait_pod_change_applied(&agent, generation);
        write_lines(&a_log, 0, *next..*next + 1);
        *next += 1;
        let got = wait_records(&collector, 0, *next as usize);
        assert_eq!(
            got.last().unwrap().1["labels"]["v"],
            label,
            "agent log:\n{}",
            s.log()
        );
    };

    // A dropped watch: the agent watches again from where it was.
    let generation = agent.metric("bpftail_kube_generation");
    api.drop_watches();
    api.put(web("uid-a", "web-a", json!({"app": "web", "v": "2"})));
    arrives("2", generation, &mut next);
    assert_eq!(lists(&api), 1, "a dropped watch resumes without a relist");

    // History compacted while the watch was down: 410 Gone, then a relist
    // that holds the change made meanwhile.
    let generation = agent.metric("bpftail_kube_generation");
    api.compact();
    api.drop_watches();
    api.put(web("uid-a", "web-a", json!({"app": "web", "v": "3"})));
    arrives("3", generation, &mut next);
    assert!(lists(&api) >= 2, "410 Gone made the agent list again");
    assert!(agent.stop().success());
}

#[test]
fn without_an_api_server_the_agent_ships_with_path_metadata() {
    let broker = Broker::start();
    broker.create_topic("logs", 1);
    let api = FakeApi::start();
    api.outage();
    let s = Setup::new(&api);
    let a_log = container_dir(&s.pods, "shop", "web-a", "uid-a", "app").join("0.log");
    write_lines(&a_log, 0, 0..5);
    let agent = s.agent(&broker, &[]);
    let collector = Collector::start(&broker.addr(), "logs");
    let got = wait_records(&collector, 0, 5);
    for (_, r) in &got {
        assert_eq!(r["namespace"], "shop");
        assert_eq!(r["pod"], "web-a");
        assert!(r.get("labels").is_none());
    }
    assert_eq!(agent.metric("bpftail_kube_synced"), 0);
    assert!(agent.metric("bpftail_files_without_pod_total") >= 1);
    assert!(agent.stop().success());
}

fn declared_pod(name: &str, env: Vec<(&str, &str)>, annotations: Value) -> Value {
    let uid = format!("uid-{name}");
    pod(&PodSpec {
        namespace: "shop",
        name,
        uid: &uid,
        node: NODE,
        labels: json!({"app": name}),
        annotations,
        containers: vec![("app", "img:1", &format!("id-{name}"), env)],
        owner: None,
    })
}

/// All JSON records of a topic.
fn json_of(records: &[Received]) -> Vec<Value> {
    records
        .iter()
        .filter_map(|r| serde_json::from_slice(&r.value).ok())
        .collect()
}

#[test]
fn log_pilot_declarations_route_stdout_with_tags_and_log_pilot_fields() {
    let broker = Broker::start();
    for t in ["app", "audit-t", "j", "logs"] {
        broker.create_topic(t, 1);
    }
    let api = FakeApi::start();
    let tags = "team=pay, env=prod";
    api.put(declared_pod(
        "a",
        vec![
            ("aliyun_logs_app", "stdout"),
            ("aliyun_logs_app_tags", tags),
        ],
        json!({}),
    ));
    api.put(declared_pod(
        "c",
        vec![
            ("corp_logs_audit", "stdout"),
            ("corp_logs_audit_target", "audit-t"),
        ],
        json!({}),
    ));
    api.put(declared_pod(
        "j",
        vec![
            ("aliyun_logs_j", "stdout"),
            ("aliyun_logs_j_format", "json"),
        ],
        json!({}),
    ));
    api.put(declared_pod("n", vec![], json!({})));
    api.put(declared_pod(
        "x",
        vec![("aliyun_logs_x", "stdout")],
        json!({"bpftail.io/exclude": "true"}),
    ));
    api.put(declared_pod(
        "bad",
        vec![
            ("aliyun_logs_bad", "stdout"),
            ("aliyun_logs_bad_target", "evil"),
        ],
        json!({}),
    ));
    let s = Setup::new(&api);
    let file = |name: &str| {
        container_dir(&s.pods, "shop", name, &format!("uid-{name}"), "app").join("0.log")
    };
    write_lines(&file("a"), 0, 0..10);
    write_lines(&file("c"), 1, 0..10);
    write_lines(&file("n"), 2, 0..10);
    write_lines(&file("x"), 4, 0..10);
    write_lines(&file("bad"), 5, 0..10);
    {
        // JSON lines, and one that is not.
        let mut f = std::fs::File::create(file("j")).unwrap();
        for seq in 0..5 {
            let msg = format!("{{\"level\":\"info\",\"msg\":\"w3 seq={seq:08} \"}}");
            std::io::Write::write_all(
                &mut f,
                format!("2026-11-25T16:00:00.000000000Z stdout F {msg}\n").as_bytes(),
            )
            .unwrap();
        }
        std::io::Write::write_all(&mut f, b"2026-11-25T16:00:00.1Z stdout F not json\n").unwrap();
    }
    let agent = s.agent(
        &broker,
        &[
            "--format",
            "logpilot",
            "--declaration-prefixes",
            "aliyun,corp",
            "--topic-allow",
            "app,audit-*,j,logs",
        ],
    );
    let app = Collector::start(&broker.addr(), "app");
    let audit = Collector::start(&broker.addr(), "audit-t");
    let j = Collector::start(&broker.addr(), "j");
    let logs = Collector::start(&broker.addr(), "logs");

    // aliyun_logs_app=stdout: topic app, log-pilot's fields, exactly.
    let got = app.wait_for(
        Duration::from_secs(60),
        || "10 records in topic app".into(),
        |r| r.len() >= 10,
    );
    assert_eq!(got.len(), 10);
    let first = &json_of(&got)[0];
    let keys: std::collections::BTreeSet<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "@timestamp",
            "stream",
            "k8s_pod",
            "k8s_pod_namespace",
            "k8s_container_name",
            "k8s_node_name",
            "docker_container",
            "topic",
            "index",
            "team",
            "env",
            "message",
        ]
        .into_iter()
        .collect(),
        "{first}"
    );
    assert_eq!(first["k8s_pod"], "a");
    assert_eq!(first["k8s_pod_namespace"], "shop");
    assert_eq!(first["k8s_container_name"], "app");
    assert_eq!(first["k8s_node_name"], NODE);
    assert_eq!(first["docker_container"], "k8s_app_a_shop_uid-a_0");
    assert_eq!(
        (&first["topic"], &first["index"]),
        (&json!("app"), &json!("app"))
    );
    assert_eq!(
        (&first["team"], &first["env"]),
        (&json!("pay"), &json!("prod"))
    );
    assert_eq!(first["stream"], "stdout");
    assert_eq!(first["@timestamp"], "2026-11-25T16:00:00.000000000Z");
    assert_eq!(
        parse_seq(first["message"].as_str().unwrap().as_bytes()),
        Some((0, 0))
    );

    // A custom prefix and _target.
    let got = json_of(&audit.wait_for(
        Duration::from_secs(60),
        || "10 records in topic audit-t".into(),
        |r| r.len() >= 10,
    ));
    assert_eq!(got.len(), 10);
    assert_eq!(
        (&got[0]["topic"], &got[0]["index"]),
        (&json!("audit-t"), &json!("audit"))
    );

    // _format=json: the object's fields are the record's; a line that is
    // not JSON is shipped as the message and counted.
    let got = json_of(&j.wait_for(
        Duration::from_secs(60),
        || "6 records in topic j".into(),
        |r| r.len() >= 6,
    ));
    assert_eq!(got.len(), 6);
    assert_eq!(got[0]["level"], "info");
    assert!(
        got[0]["msg"]
            .as_str()
            .unwrap()
            .starts_with("w3 seq=00000000")
    );
    assert!(got[0].get("message").is_none());
    assert_eq!(got[5]["message"], "not json");
    agent.wait_metric(
        Duration::from_secs(60),
        "bpftail_json_lines_invalid_total",
        1,
    );

    // Undeclared (n) and refused (bad: topic outside the allow-list) ship to
    // the default topic; the opted-out pod (x) ships nowhere (once the agent
    // has settled and every topic holds what it delivered, nothing more
    // comes).
    logs.wait_for(
        Duration::from_secs(60),
        || "20 records in topic logs".into(),
        |r| r.len() >= 20,
    );
    wait_settled(&agent, 0, &[&app, &audit, &j, &logs]);
    let got = json_of(&logs.received());
    let pods: std::collections::BTreeMap<String, usize> =
        got.iter().fold(Default::default(), |mut m, r| {
            *m.entry(r["k8s_pod"].as_str().unwrap().to_owned())
                .or_default() += 1;
            m
        });
    assert_eq!(
        pods,
        [("bad".to_string(), 10), ("n".to_string(), 10)].into()
    );
    assert!(agent.metric("bpftail_declarations_refused_total") >= 1);
    assert!(agent.metric("bpftail_files_skipped_total") >= 1);
    assert_eq!(app.count(), 10);
    let log = s.log();
    assert!(log.contains("not in the operator's allow-list"), "{log}");
    assert!(log.contains("bpftail.io/exclude"), "{log}");
    assert!(agent.stop().success());
}

#[test]
fn ship_declared_ships_only_declared_containers() {
    let broker = Broker::start();
    for t in ["app", "logs"] {
        broker.create_topic(t, 1);
    }
    let api = FakeApi::start();
    api.put(declared_pod(
        "a",
        vec![("aliyun_logs_app", "stdout")],
        json!({}),
    ));
    api.put(declared_pod("n", vec![], json!({})));
    api.put(declared_pod(
        "m",
        vec![],
        json!({"logs.bpftail.io/app.main": "stdout", "logs.bpftail.io/app.main.target": "logs"}),
    ));
    let s = Setup::new(&api);
    for (i, name) in ["a", "n", "m"].into_iter().enumerate() {
        let f = container_dir(&s.pods, "shop", name, &format!("uid-{name}"), "app").join("0.log");
        write_lines(&f, i, 0..10);
    }
    let agent = s.agent(&broker, &["--ship", "declared"]);
    let app = Collector::start(&broker.addr(), "app");
    let logs = Collector::start(&broker.addr(), "logs");
    assert_eq!(
        app.wait_for(
            Duration::from_secs(60),
            || "10 records in topic app".into(),
            |r| r.len() >= 10
        )
        .len(),
        10
    );
    // The annotation declared m into topic logs; n is not declared (nothing
    // else arrives once the agent has settled and both topics hold what it
    // delivered).
    let got = json_of(&logs.wait_for(
        Duration::from_secs(60),
        || "10 records in topic logs".into(),
        |r| r.len() >= 10,
    ));
    let before = wait_settled(&agent, 0, &[&app, &logs]);
    let got_later = json_of(&logs.received());
    assert_eq!(got.len(), 10);
    assert_eq!(got_later.len(), 10, "nothing else arrived");
    assert!(got.iter().all(|r| r["pod"] == "m"));
    assert_eq!(got[0]["tags"], Value::Null);
    assert!(agent.metric("bpftail_files_skipped_total") >= 1);
    assert!(agent.stop().success());

    // Restarted while the API is down: whether a CRI log ships is unknown
    // until its pod is, so nothing is read (nor discarded) meanwhile; then
    // it resumes from its checkpoint.
    api.outage();
    let a_log = s.pods.join("shop_a_uid-a/app/0.log");
    write_lines(&a_log, 0, 10..15);
    let agent = s.agent(&broker, &["--ship", "declared"]);
    // It has found the files (its first scan is done before /healthz) and
    // met the API gone; settled, it has sent nothing.
    agent.wait_metric(
        Duration::from_secs(60),
        "bpftail_kube_watch_errors_total",
        1,
    );
    wait_settled(&agent, before, &[&app, &logs]);
    assert_eq!(agent.metric("bpftail_records_sent_total"), 0);
    assert_eq!(app.received().len(), 10);
    assert_eq!(agent.metric("bpftail_records_suppressed_total"), 0);
    api.restore();
    app.wait_for(
        Duration::from_secs(60),
        || "15 records in topic app".into(),
        |r| r.len() >= 15,
    );
    // No duplicate comes after: the agent settled, the topics hold all it
    // delivered.
    wait_settled(&agent, before, &[&app, &logs]);
    let all = app.received();
    let seqs: Vec<u64> = all
        .iter()
        .filter_map(|r| {
            let v: Value = serde_json::from_slice(&r.value).ok()?;
            Some(parse_seq(v["message"].as_str()?.as_bytes())?.1)
        })
        .collect();
    assert_eq!(seqs, (0..15).collect::<Vec<u64>>());
    assert!(agent.stop().success());
}

#[test]
fn in_container_files_are_read_from_their_volume_and_never_outside_it() {
    let broker = Broker::start();
    for t in ["access", "logs", "evil-topic"] {
        broker.create_topic(t, 1);
    }
    let api = FakeApi::start();
    let s = Setup::new(&api);
    let root = s.pods.parent().unwrap().to_owned();
    let kubelet = root.join("kubelet");
    let hostlogs = root.join("hostlogs");
    let secret = root.join("secret");
    std::fs::create_dir_all(&hostlogs).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("key.log"), "TOP-SECRET\n").unwrap();
    std::fs::write(hostlogs.join("h.log"), "TOP-SECRET hostPath not allowed\n").unwrap();
    let vol = kubelet.join("uid-v/volumes/kubernetes.io~empty-dir/logs");
    std::fs::create_dir_all(&vol).unwrap();
    // Escapes planted by the tenant: a symlinked file and a symlinked
    // directory pointing outside, and a /proc magic link.
    std::os::unix::fs::symlink(secret.join("key.log"), vol.join("stolen.log")).unwrap();
    std::os::unix::fs::symlink(&secret, vol.join("sub")).unwrap();
    std::os::unix::fs::symlink("/proc/self/root/etc/hostname", vol.join("proc.log")).unwrap();

    let mut p = declared_pod(
        "v",
        vec![
            ("aliyun_logs_access", "/var/log/nginx/*.log"),
            ("aliyun_logs_deep", "/var/log/nginx/sub/*.log"),
            ("aliyun_logs_up", "/var/log/nginx/../../../etc/*"),
            ("aliyun_logs_abs", "/etc/passwd"),
            ("aliyun_logs_proc", "/proc/self/root/etc/hostname"),
            ("aliyun_logs_cfg", "/etc/cfg/*.conf"),
            ("aliyun_logs_host", "/host/*.log"),
            ("aliyun_logs_evil", "/var/log/nginx/*.log"),
            ("aliyun_logs_evil_target", "evil-topic"),
        ],
        json!({}),
    );
    p["spec"]["volumes"] = json!([
        {"name": "logs", "emptyDir": {}},
        {"name": "cfg", "configMap": {"name": "cfg"}},
        {"name": "host", "hostPath": {"path": hostlogs.display().to_string(), "type": "Directory"}},
    ]);
    p["spec"]["containers"][0]["volumeMounts"] = json!([
        {"name": "logs", "mountPath": "/var/log/nginx"},
        {"name": "cfg", "mountPath": "/etc/cfg", "readOnly": true},
        {"name": "host", "mountPath": "/host"},
    ]);
    api.put(p);
    write_plain(&vol.join("access.log"), 0, 0..10);
    let kubelet_arg = kubelet.display().to_string();
    let args = [
        "--kubelet-pods-dir",
        &kubelet_arg,
        "--topic-allow",
        "access,logs,deep,up,abs,proc,cfg,host",
        "--watcher",
        "inotify",
    ];
    let agent = s.agent(&broker, &args);
    let access = Collector::start(&broker.addr(), "access");
    let logs = Collector::start(&broker.addr(), "logs");
    let evil = Collector::start(&broker.addr(), "evil-topic");
    wait_records(&access, 0, 10);

    // A new file, and a rename rotation (access.log.1 leaves the glob; its
    // unread rest is still read, before the new access.log).
    write_plain(&vol.join("error.log"), 1, 0..10);
    write_plain(&vol.join("access.log"), 0, 10..20);
    std::fs::rename(vol.join("access.log"), vol.join("access.log.1")).unwrap();
    write_plain(&vol.join("access.log"), 0, 20..30);
    let got = wait_records(&access, 0, 30);
    let r = &got[0].1;
    assert_eq!(r["pod"], "v");
    assert_eq!(r["container"], "app");
    assert_eq!(r["labels"]["app"], "v");
    wait_records(&access, 1, 10);
    // Nothing late (a resend) after the agent has settled and the topics
    // hold all it delivered.
    wait_settled(&agent, 0, &[&access, &logs, &evil]);
    let all = access.received();
    let order: Vec<u64> = all
        .iter()
        .filter_map(|r| {
            let v: Value = serde_json::from_slice(&r.value).ok()?;
            parse_seq(v["message"].as_str()?.as_bytes()).filter(|(w, _)| *w == 0)
        })
        .map(|(_, s)| s)
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in order: {order:?}");

    // Refused, each with its reason; nothing outside the volume was read.
    agent.wait_metric(
        Duration::from_secs(60),
        "bpftail_declarations_refused_total",
        6,
    );
    let log = s.log();
    for (name, why) in [
        ("up", "'..'"),
        ("abs", "not under any volume"),
        ("proc", "not under any volume"),
        ("cfg", "configMap"),
        ("host", "--allow-hostpath"),
        ("evil", "allow-list"),
    ] {
        assert!(
            log.lines().any(|l| l.contains("refused")
                && l.contains(&format!("declaration={name}"))
                && l.contains(why)),
            "{name}: no refusal mentioning {why:?}:\n{log}"
        );
    }
    let before = wait_settled(&agent, 0, &[&access, &logs, &evil]);
    for c in [&access, &logs, &evil] {
        for r in c.received() {
            let v = String::from_utf8_lossy(&r.value);
            assert!(!v.contains("TOP-SECRET"), "read outside the volume: {v}");
        }
    }
    assert!(agent.stop().success());

    // A restart resumes from the checkpoint (the pod list comes after the
    // first scan): nothing is sent twice.
    write_plain(&vol.join("access.log"), 0, 30..40);
    let agent = s.agent(&broker, &args);
    wait_records(&access, 0, 40);
    wait_settled(&agent, before, &[&access, &logs, &evil]);
    let sent = access
        .received()
        .iter()
        .filter(|r| {
            serde_json::from_slice::<Value>(&r.value)
                .ok()
                .and_then(|v| parse_seq(v["message"].as_str()?.as_bytes()))
                .is_some_and(|(w, _)| w == 0)
        })
        .count();
    assert_eq!(
        sent, 40,
        "records of access.log sent (duplicates after the restart?)"
    );
    assert!(agent.stop().success());
}

#[test]
fn log_pilot_declarations_on_a_docker_node_work_without_the_api() {
    let broker = Broker::start();
    for t in ["app", "web-t"] {
        broker.create_topic(t, 1);
    }
    let tmp = tempfile::tempdir().unwrap();
    let docker = tmp.path().join("docker");
    let containers = [
        (
            "aaaa1111",
            r#"{"Name":"/k8s_app_api-0_shop_u-1_0","Config":{"Env":["aliyun_logs_app=stdout","aliyun_logs_app_tags=team=pay"],"Labels":{
                "io.kubernetes.pod.namespace":"shop","io.kubernetes.pod.name":"api-0",
                "io.kubernetes.pod.uid":"u-1","io.kubernetes.container.name":"app"}}}"#,
        ),
        (
            "bbbb2222",
            r#"{"Name":"/plain-web","Config":{"Env":[],"Labels":{"aliyun.logs.web":"stdout","aliyun.logs.web.target":"web-t"}}}"#,
        ),
    ];
    for (i, (id, config)) in containers.iter().enumerate() {
        let dir = docker.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.v2.json"), config).unwrap();
        let mut f = std::fs::File::create(dir.join(format!("{id}-json.log"))).unwrap();
        for seq in 0..5u64 {
            let line = json!({"log": format!("w{i} seq={seq:08} x\n"), "stream": "stdout", "time": "2026-11-25T16:00:00.000000001Z"});
            std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()).unwrap();
        }
    }
    let mut args = agent_args(
        &tmp.path().join("pods"),
        &tmp.path().join("data"),
        &broker.addr(),
        "logs",
        &[
            "--node-name",
            NODE,
            "--kube",
            "off",
            "--format",
            "logpilot",
            "--ship",
            "declared",
        ],
    );
    let i = args.iter().position(|a| a == "/nonexistent").unwrap();
    args[i] = docker.display().to_string();
    let agent = Agent::start(&args, &tmp.path().join("agent.log"));
    let app = Collector::start(&broker.addr(), "app");
    let web = Collector::start(&broker.addr(), "web-t");
    let a = json_of(&app.wait_for(
        Duration::from_secs(60),
        || "5 records in topic app".into(),
        |r| r.len() >= 5,
    ));
    assert_eq!(a.len(), 5);
    assert_eq!(a[0]["docker_container"], "k8s_app_api-0_shop_u-1_0");
    assert_eq!(a[0]["k8s_pod"], "api-0");
    assert_eq!(a[0]["k8s_container_name"], "app");
    assert_eq!(
        (&a[0]["topic"], &a[0]["index"], &a[0]["team"]),
        (&json!("app"), &json!("app"), &json!("pay"))
    );
    let w = json_of(&web.wait_for(
        Duration::from_secs(60),
        || "5 records in topic web-t".into(),
        |r| r.len() >= 5,
    ));
    assert_eq!(w.len(), 5);
    assert_eq!(w[0]["docker_container"], "plain-web");
    assert_eq!(
        (&w[0]["topic"], &w[0]["index"]),
        (&json!("web-t"), &json!("web"))
    );
    assert!(agent.stop().success());
}

#[test]
fn an_opt_out_added_while_a_file_is_followed_stops_its_shipping_until_removed() {
    let broker = Broker::start();
    broker.create_topic("logs", 1);
    let api = FakeApi::start();
    api.put(declared_pod("a", vec![], json!({})));
    let s = Setup::new(&api);
    let f = container_dir(&s.pods, "shop", "a", "uid-a", "app").join("0.log");
    write_lines(&f, 0, 0..5);
    let agent = s.agent(&broker, &[]);
    let logs = Collector::start(&broker.addr(), "logs");
    wait_records(&logs, 0, 5);

    let generation = agent.metric("bpftail_kube_generation");
    api.put(declared_pod(
        "a",
        vec![],
        json!({"bpftail.io/exclude": "true"}),
    ));
    wait_pod_change_applied(&agent, generation);
    write_lines(&f, 0, 5..10);
    agent.wait_metric(
        Duration::from_secs(60),
        "bpftail_records_suppressed_total",
        5,
    );

    let generation = agent.metric("bpftail_kube_generation");
    api.put(declared_pod("a", vec![], json!({})));
    wait_pod_change_applied(&agent, generation);
    write_lines(&f, 0, 10..15);
    let all = logs.wait_for(
        Duration::from_secs(60),
        || "records 0..5 and 10..15 of writer 0".into(),
        |r| records_of(r, 0).len() >= 10,
    );
    let seqs: Vec<u64> = records_of(&all, 0).iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (0..5).chain(10..15).collect::<Vec<u64>>());
    assert!(s.log().contains("stopped shipping this log"));
    assert!(agent.stop().success());
}

#[test]
fn a_narrower_allow_list_in_the_config_file_applies_live_and_every_line_arrives_once() {
    let broker = Broker::start();
    for t in ["team-pay", "logs"] {
        broker.create_topic(t, 1);
    }
    let api = FakeApi::start();
    api.put(declared_pod(
        "p",
        vec![
            ("aliyun_logs_pay", "stdout"),
            ("aliyun_logs_pay_target", "team-pay"),
        ],
        json!({}),
    ));
    let s = Setup::new(&api);
    let config = s.data.parent().unwrap().join("bpftail.toml");
    std::fs::write(&config, "topic_allow = \"team-*\"\n").unwrap();
    let agent = s.agent(
        &broker,
        &["--format", "raw", "--config", config.to_str().unwrap()],
    );
    let declared = Collector::start(&broker.addr(), "team-pay");
    let fallback = Collector::start(&broker.addr(), "logs");
    let log = container_dir(&s.pods, "shop", "p", "uid-p", "app").join("0.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, log) = (stop.clone(), log.clone());
        std::thread::spawn(move || {
            let mut w = LineWriter::create(&log);
            let mut seq = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                w.line(0, seq, 100);
                seq += 1;
                if seq.is_multiple_of(50) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            seq
        })
    };
    declared.wait_for(
        Duration::from_secs(60),
        || format!("1,000 declared records\n{}", s.log()),
        |r| r.len() >= 1_000,
    );
    // The operator narrows the allow-list (the file edited in place): the
    // declaration's topic is refused from now on, its lines go to --topic.
    std::fs::write(&config, "topic_allow = \"other-*\"\n").unwrap();
    fallback.wait_for(
        Duration::from_secs(60),
        || format!("1,000 records in the default topic\n{}", s.log()),
        |r| r.len() >= 1_000,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    wait_until(
        Duration::from_secs(60),
        || format!("{written} records over both topics"),
        || (declared.count() + fallback.count()) as u64 >= written,
    );
    wait_settled(&agent, 0, &[&declared, &fallback]);
    let seqs = |c: &Collector| -> Vec<u64> {
        c.received()
            .iter()
            .filter_map(|r| parse_seq(&r.value).map(|(_, s)| s))
            .collect()
    };
    let (before, after) = (seqs(&declared), seqs(&fallback));
    // Every line once, in order: the declared topic's lines, then the
    // default topic's.
    let all: Vec<u64> = before.iter().chain(&after).copied().collect();
    assert_eq!(all, (0..written).collect::<Vec<_>>());
    assert_eq!(
        agent.metric("bpftail_config_reloads_total{result=\"applied\"}"),
        1
    );
    assert!(
        s.log().contains("not in the operator's allow-list"),
        "{}",
        s.log()
    );
}
