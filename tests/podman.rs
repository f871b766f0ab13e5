//! End-to-end with a real container runtime: podman + conmon write CRI logs
//! (`--log-driver k8s-file`) into a pods dir; bpftail ships them to a real
//! broker. `cargo xtask test` installs podman, runc, conmon and busybox.

mod support;

use std::time::Duration;

use support::*;

#[test]
fn podman_containers_logs_arrive_complete_in_order_with_partials_joined() {
    if !have_podman() {
        assert!(
            std::env::var("CI").is_err(),
            "podman is missing in CI: `cargo xtask test` installs it"
        );
        eprintln!("SKIP: podman is not installed (run `cargo xtask test`, which installs it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    ensure_image(tmp.path());
    let broker = Broker::start();
    broker.create_topic("podlogs", 2);
    let pods = tmp.path().join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    let args = agent_args(
        &pods,
        &tmp.path().join("data"),
        &broker.addr(),
        "podlogs",
        &[
            "--partial-flush-ms",
            "1000",
            "--sweep-interval-ms",
            "500",
            "--format",
            "raw",
        ],
    );
    let log = tmp.path().join("bpftail.log");
    let agent = Agent::start(&args, &log);
    let collector = Collector::start(&broker.addr(), "podlogs");

    const LINES: u64 = 5_000;
    let run = |name: &str, uid: &str, script: &str| {
        let dir = container_dir(&pods, "default", name, uid, "main");
        let id = format!("bpftail-test-{}-{name}", std::process::id());
        podman_run(&id, &dir.join("0.log"), script)
    };
    // Two containers writing numbered lines, interleaving stdout and stderr;
    // one running the script that made the conmon fixture (a 178 kB line
    // split into 8 KiB P chunks, and a last line without newline).
    let counter = format!(
        "i=0; while [ $i -lt {LINES} ]; do echo \"w$WRITER seq=$(printf %08d $i) from podman\"; \
         if [ $((i % 1000)) -eq 0 ]; then echo \"stderr at $i\" >&2; fi; i=$((i+1)); done"
    );
    let mut children = vec![
        run("counter-0", "uid-c0", &format!("WRITER=0; {counter}")),
        run("counter-1", "uid-c1", &format!("WRITER=1; {counter}")),
    ];
    let script = std::fs::read_to_string(
        workspace_root().join("tests/fixtures/cri/conmon-partial-lines.gen.sh"),
    )
    .unwrap();
    children.push(run("partials", "uid-p", &script));
    for mut c in children {
        assert!(c.wait().unwrap().success(), "container failed");
    }

    let expected: Vec<serde_json::Value> = std::fs::read_to_string(
        workspace_root().join("tests/fixtures/cri/conmon-partial-lines.expected.jsonl"),
    )
    .unwrap()
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    let stderr_lines = 2 * LINES.div_ceil(1000) as usize;
    let total = 2 * LINES as usize + stderr_lines + expected.len();
    collector.wait_for(
        Duration::from_secs(120),
        || {
            format!(
                "{total} records\nagent log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        },
        |r| r.len() >= total,
    );
    // Nothing more comes once the agent has settled and the topic holds all
    // it delivered.
    wait_settled(&agent, 0, &[&collector]);
    let records = collector.received();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let counted: Vec<&Received> = records
        .iter()
        .filter(|r| r.header("stream") == Some("stdout") && r.value.starts_with(b"w"))
        .collect();
    let t = tally(
        &counted.iter().map(|r| (*r).clone()).collect::<Vec<_>>(),
        2,
        LINES,
    );
    assert_eq!(
        (t.missing, t.duplicates, t.jumps, t.foreign),
        (0, 0, 0, 0),
        "{t:?}\n{log_text}"
    );
    let stderr = records
        .iter()
        .filter(|r| r.header("stream") == Some("stderr") && r.value.starts_with(b"stderr at"))
        .count();
    assert_eq!(stderr, stderr_lines);
    assert_eq!(records.len(), total, "nothing more, nothing less");

    // The fixture's records, as conmon wrote them, reassembled.
    let fixture: Vec<&Received> = records.iter().filter(|r| r.key == b"uid-p/main").collect();
    let mut got: Vec<(String, String, bool)> = fixture
        .iter()
        .map(|r| {
            (
                r.header("stream").unwrap().to_owned(),
                String::from_utf8_lossy(&r.value).into_owned(),
                r.header("partial") == Some("true"),
            )
        })
        .collect();
    let mut want: Vec<(String, String, bool)> = expected
        .iter()
        .map(|v| {
            (
                v["stream"].as_str().unwrap().to_owned(),
                v["msg"].as_str().unwrap().to_owned(),
                v.get("partial_at_eof").is_some(),
            )
        })
        .collect();
    // stdout and stderr are separate streams: compare each in order.
    got.sort_by(|a, b| a.0.cmp(&b.0));
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got.len(), want.len(), "{log_text}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
    assert!(agent.stop().success());
}
