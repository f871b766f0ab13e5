//! End-to-end with a real container runtime: podman + conmon write CRI logs
//! (`--log-driver k8s-file`) into a pods dir; bpftail ships them to a real
//! broker. `cargo xtask test` installs podman, runc, conmon and busybox.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::kubeapi::{FakeApi, PodSpec, pod};
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

/// Runs `script` (stdout and stderr merged) in a container whose root file
/// system is an overlay over the host's, so the host's programs run in it;
/// `mounts` are (host dir, container dir). Its CRI log goes to `log`.
fn podman_run_host(name: &str, log: &Path, mounts: &[(&Path, &str)], script: &str) -> Child {
    let mut cmd = podman();
    cmd.args(["run", "--rm", "--name", name])
        .args([
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args(["--log-driver", "k8s-file", "--log-opt"])
        .arg(format!("path={}", log.display()))
        .args(["-e", "GOTRACEBACK=all"]);
    for (host, inside) in mounts {
        cmd.arg("-v").arg(format!("{}:{inside}:ro", host.display()));
    }
    cmd.args(["--rootfs", "/:O", "sh", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("podman run")
}

/// The logical messages of a CRI log, `P` chunks joined.
fn cri_messages(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap();
    let mut out = vec![String::new()];
    for l in text.lines() {
        let mut parts = l.splitn(4, ' ');
        let tag = parts.nth(2).unwrap();
        out.last_mut().unwrap().push_str(parts.next().unwrap_or(""));
        if tag == "F" {
            out.push(String::new());
        }
    }
    out.pop();
    out
}

#[test]
fn traces_of_real_python_java_and_go_programs_arrive_as_one_record_each_in_order() {
    if !have_podman() {
        assert!(
            std::env::var("CI").is_err(),
            "podman is missing in CI: `cargo xtask test` installs it"
        );
        eprintln!("SKIP: podman is not installed (run `cargo xtask test`, which installs it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = workspace_root().join("tests/fixtures/multiline");
    // The Go program, built by Debian's Go (`cargo xtask test` installs it).
    let bin = tmp.path().join("bin");
    let built = Command::new("go")
        .args(["build", "-trimpath", "-o"])
        .arg(bin.join("panic"))
        .arg(fixtures.join("panic.go"))
        .env("GOCACHE", tmp.path().join("gocache"))
        .env("GOPATH", tmp.path().join("gopath"))
        .output()
        .expect("go is installed (`cargo xtask test` installs golang-go)");
    assert!(
        built.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&built.stderr)
    );

    // Each pod chooses its container's rule by annotation.
    let api = FakeApi::start();
    let programs = [
        ("py", "python", "python3 /src/chained.py 2>&1; echo exit $?"),
        ("jv", "java", "java /src/Main.java 2>&1; echo exit $?"),
        // The panic is the container's last output: only the timeout ends it.
        ("go", "go", "/t/panic 2>&1"),
    ];
    for (name, rule, _) in programs {
        api.put(pod(&PodSpec {
            namespace: "apps",
            name,
            uid: &format!("uid-{name}"),
            node: "test-node",
            labels: json!({}),
            annotations: json!({ "logs.bpftail.io/app.multiline": rule }),
            containers: vec![("app", "img:1", &format!("id-{name}"), vec![])],
            owner: None,
        }));
    }
    let broker = Broker::start();
    broker.create_topic("traces", 1);
    let pods = tmp.path().join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    let args = agent_args(
        &pods,
        &tmp.path().join("data"),
        &broker.addr(),
        "traces",
        &[
            "--node-name",
            "test-node",
            "--kube",
            "auto",
            "--format",
            "raw",
            "--sweep-interval-ms",
            "500",
        ],
    );
    let log = tmp.path().join("bpftail.log");
    let how = Launch {
        env: vec![(
            "KUBECONFIG".into(),
            api.kubeconfig(tmp.path()).display().to_string(),
        )],
        ..Default::default()
    };
    let agent = Agent::launch(&args, &log, &how);
    let collector = Collector::start(&broker.addr(), "traces");
    let mut logs = Vec::new();
    let mut children = Vec::new();
    for (name, _, script) in programs {
        let dir = container_dir(&pods, "apps", name, &format!("uid-{name}"), "app");
        let id = format!("bpftail-test-{}-{name}", std::process::id());
        let file = dir.join("0.log");
        children.push(podman_run_host(
            &id,
            &file,
            &[(&fixtures, "/src"), (&bin, "/t")],
            script,
        ));
        logs.push((name, file));
    }
    for mut c in children {
        c.wait().unwrap();
    }
    let firsts: [&[&str]; 3] = [
        &[
            "before 1",
            "Traceback (most recent call last):",
            "after 1",
            "before 2",
            "Traceback (most recent call last):",
            "exit 1",
        ],
        &[
            "before 1",
            "java.lang.RuntimeException: cannot load /etc/app.conf",
            "after 1",
            "before 2",
            "Exception in thread \"main\" java.lang.ArrayIndexOutOfBoundsException: Index 3 out of bounds for length 2",
            "exit 1",
        ],
        &[
            "before 1",
            "panic: runtime error: index out of range [5] with length 3",
        ],
    ];
    let total: usize = firsts.iter().map(|f| f.len()).sum();
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
    wait_settled(&agent, 0, &[&collector]);
    let records = collector.received();
    assert_eq!(records.len(), total, "nothing more");
    for ((name, file), want) in logs.iter().zip(firsts) {
        let key = format!("uid-{name}/app");
        let got: Vec<String> = records
            .iter()
            .filter(|r| r.key == key.as_bytes())
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect();
        let heads: Vec<&str> = got.iter().map(|r| r.lines().next().unwrap_or("")).collect();
        assert_eq!(heads, want, "{name}: {got:#?}");
        // Every line the program wrote, once, in order, in one record each.
        assert_eq!(got.join("\n"), cri_messages(file).join("\n"), "{name}");
    }
    // The Go panic, the last output of its container, ended by the timeout.
    assert!(agent.metric("bpftail_multiline_flushed_total") >= 1);
    assert!(agent.stop().success());
}
