//! `cargo xtask fuzz [TARGET..] [--secs N] [--list] [--merge]`:
//! coverage-guided fuzzing of everything that parses bytes from outside
//! the agent (log files, pod objects, declarations, the checkpoint, the
//! kernel's BTF, Kafka's answers), with libFuzzer.
//!
//! - The targets are the binaries of the `fuzz/` crate (`bpftail-fuzz`),
//!   one per [`TARGETS`] entry, each `libfuzzer_sys::fuzz_target!`.
//! - `fuzz` builds them, then runs each named one (all by default), one
//!   after another, for N seconds (default [`DEFAULT_SECS`]), and prints a
//!   table of executions and rates. A crash fails the command, naming the
//!   input libFuzzer saved and how to replay it.
//! - Corpora: the committed seeds are in `fuzz/corpus/<target>/`; libFuzzer
//!   writes what it finds to the first corpus directory it is given, which
//!   is a scratch one, `target/fuzz-corpus/<target>/`, so a run never
//!   changes the repository. `--merge` minimises committed + scratch
//!   inputs back into `fuzz/corpus/<target>/` (libFuzzer's set-cover
//!   merge): how the corpora are refreshed after a long run.
//! - Crashes are written to `target/fuzz-artifacts/<target>/`; replay one
//!   with `target/fuzz/<target> <file>`. One exception: a stack overflow
//!   kills libFuzzer before it can save the input (without a sanitizer
//!   runtime its signal handler has no stack of its own to run on); the run
//!   then fails with no artifact (killed by signal 11).
//!
//! Why libFuzzer through `libfuzzer-sys` with flags set here, not the
//! `cargo fuzz` binary: cargo-fuzz's defaults need a nightly toolchain
//! (AddressSanitizer through `-Zsanitizer`, `-Zbuild-std` for some modes)
//! and it would be one more tool to install; this machine has the stable
//! toolchain only. What cargo-fuzz does that matters is rustc flags: the
//! SanitizerCoverage pass with libFuzzer's counters, PC table and compare
//! tracing ([`SANCOV_FLAGS`], as cargo-fuzz's `src/project.rs` sets them),
//! `--cfg fuzzing`, and an optimised build with debug assertions and
//! overflow checks (the `fuzz` profile in the workspace's Cargo.toml).
//! `libfuzzer-sys` builds libFuzzer itself from source.
//!
//! Why no AddressSanitizer: the code under test is safe Rust (out-of-bounds
//! indexing and overflows panic, and a panic is a crash to libFuzzer);
//! ASan needs `-Zsanitizer` (nightly) and an instrumented standard library.
//!
//! Only the workspace's own crates are instrumented: cargo runs them
//! through `RUSTC_WORKSPACE_WRAPPER`, which is this xtask binary again
//! ([`rustc_wrapper`], when [`WRAPPER_ENV`] is set); it adds the flags to
//! the `bpftail` and `bpftail-fuzz` crates (not their build scripts) and
//! runs every other compilation unchanged. Dependencies (serde_json,
//! regex, kafka-protocol, …) are built plainly, once, in the `fuzz`
//! profile's own directory: `RUSTFLAGS` would instrument and rebuild them
//! all (and the build scripts and proc macros, which cannot link the
//! coverage hooks without `--target`), and coverage of their code would
//! steer the fuzzer into exploring them rather than the agent.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cargo, root, run};

/// Set (to 1) in the environment of the fuzz build: the xtask binary then
/// acts as rustc's wrapper.
pub const WRAPPER_ENV: &str = "BPFTAIL_XTASK_RUSTC_WRAPPER";

/// The coverage instrumentation cargo-fuzz adds (its `src/project.rs`,
/// without a sanitizer); `-Cdebug-assertions` and `-Coverflow-checks` come
/// from the `fuzz` profile. Left out: `-Clink-dead-code` (it only serves
/// coverage reports of code no target calls, and slows every link).
pub const SANCOV_FLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "--cfg",
    "fuzzing",
];

/// The packages whose crates are instrumented.
const INSTRUMENTED: &[&str] = &["bpftail", "bpftail-fuzz"];

/// A fuzz target: a binary of `fuzz/`, and the longest input it is given.
pub struct Target {
    pub name: &'static str,
    pub max_len: usize,
}

/// Every target, in the order they run.
pub const TARGETS: &[Target] = &[
    // A header of a few bytes, then a log file of a few dozen lines (the
    // target's size limits are small, so that such files reach them: a
    // longer input only makes each run slower).
    Target {
        name: "cri",
        max_len: 4 << 10,
    },
    Target {
        name: "docker",
        max_len: 4 << 10,
    },
    Target {
        name: "multiline",
        max_len: 4 << 10,
    },
    // A container's env and a pod's annotations: what declares is a few
    // hundred bytes (longer inputs mostly slow the runs down).
    Target {
        name: "declarations",
        max_len: 1 << 10,
    },
    Target {
        name: "checkpoint",
        max_len: 8 << 10,
    },
    // A pod as the API server sends it is 2-10 KB.
    Target {
        name: "pod",
        max_len: 8 << 10,
    },
    // The kernel's is 5 MB; every lookup walks all the types, so small
    // blobs (a couple of hundred types) keep runs fast.
    Target {
        name: "btf",
        max_len: 4 << 10,
    },
    Target {
        name: "kafka",
        max_len: 4 << 10,
    },
    // A container's config.v2.json is 5-20 KB; the fields read are a few
    // hundred bytes of it.
    Target {
        name: "docker_config",
        max_len: 4 << 10,
    },
];

/// libFuzzer's `-timeout`: an input that runs longer is a failure.
const TIMEOUT_SECS: u64 = 10;

/// Seconds per target when none are given.
pub const DEFAULT_SECS: u64 = 60;

/// `cargo xtask test` runs every target this long (seconds): it replays
/// the committed corpus (a regression check of every input kept so far)
/// and tries 100,000 or more new inputs per target. The step's cost in CI
/// is mostly the build: the `fuzz` profile's own copy of every dependency,
/// about 10 minutes from a clean `target/fuzz` on the 2-core machine
/// (measured: 9 min 16 s), then 9 targets × 10 s.
pub const CI_SECS: u64 = 10;

const USAGE: &str = "usage: cargo xtask fuzz [TARGET..] [--secs N] [--list] [--merge]";

/// Runs rustc (`argv[1..]`) as cargo asked, with [`SANCOV_FLAGS`] added
/// for the instrumented packages; returns only if it cannot be started.
pub fn rustc_wrapper() -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let (rustc, rest) = args
        .split_first()
        .context("the rustc wrapper was called without rustc")?;
    let package = std::env::var("CARGO_PKG_NAME").unwrap_or_default();
    let crate_name = rest
        .iter()
        .position(|a| a == "--crate-name")
        .and_then(|i| rest.get(i + 1))
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let mut cmd = Command::new(rustc);
    cmd.args(rest);
    if INSTRUMENTED.contains(&package.as_str()) && !crate_name.starts_with("build_script_") {
        cmd.args(SANCOV_FLAGS);
    }
    let e = cmd.exec();
    bail!("cannot run {rustc:?}: {e}")
}

/// The `fuzz` subcommand.
pub fn fuzz(rest: &[String]) -> Result<()> {
    let mut secs = DEFAULT_SECS;
    let mut merge = false;
    let mut names: Vec<&str> = Vec::new();
    let mut args = rest.iter().filter(|a| *a != "--");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--list" => {
                for t in TARGETS {
                    println!("{}", t.name);
                }
                return Ok(());
            }
            "--merge" => merge = true,
            "--secs" => {
                let v = args.next().context(USAGE)?;
                secs = v
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .with_context(|| format!("--secs {v:?}: not a positive number\n{USAGE}"))?;
            }
            s if s.starts_with("--secs=") => {
                let v = &s["--secs=".len()..];
                secs = v
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .with_context(|| format!("--secs {v:?}: not a positive number\n{USAGE}"))?;
            }
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                return Ok(());
            }
            s if s.starts_with('-') => bail!("unknown option {s:?}\n{USAGE}"),
            s => names.push(s),
        }
    }
    let targets = select(&names)?;
    crate::build_ebpf()?;
    build()?;
    if merge {
        for t in &targets {
            merge_corpus(t)?;
        }
        return Ok(());
    }
    run_all(&targets, secs)
}

/// The targets named (all if none), or which names are unknown.
fn select(names: &[&str]) -> Result<Vec<&'static Target>> {
    if names.is_empty() {
        return Ok(TARGETS.iter().collect());
    }
    names
        .iter()
        .map(|n| {
            TARGETS.iter().find(|t| t.name == *n).with_context(|| {
                let all: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
                format!("no fuzz target {n:?}; the targets are {}", all.join(", "))
            })
        })
        .collect()
}

/// Builds every target, instrumented (see the module docs).
pub fn build() -> Result<()> {
    let out = root().join("target/fuzz");
    // Cargo does not know what the wrapper adds: when the flags change,
    // the instrumented crates are built again.
    let stamp = out.join(".xtask-sancov-flags");
    let flags = SANCOV_FLAGS.join(" ");
    if out.exists() && std::fs::read_to_string(&stamp).ok().as_deref() != Some(flags.as_str()) {
        run(cargo().args([
            "clean",
            "--profile",
            "fuzz",
            "-p",
            "bpftail",
            "-p",
            "bpftail-fuzz",
        ]))?;
    }
    let exe = std::env::current_exe().context("the xtask binary's path")?;
    let started = Instant::now();
    run(cargo()
        .args(["build", "--profile", "fuzz", "-p", "bpftail-fuzz", "--bins"])
        .args(["--features", "bpftail-fuzz/libfuzzer"])
        .env("RUSTC_WORKSPACE_WRAPPER", exe)
        .env(WRAPPER_ENV, "1"))?;
    std::fs::create_dir_all(&out)?;
    std::fs::write(&stamp, flags)?;
    eprintln!(
        "xtask: fuzz targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn binary(t: &Target) -> PathBuf {
    root().join("target/fuzz").join(t.name)
}

fn committed_corpus(t: &Target) -> PathBuf {
    root().join("fuzz/corpus").join(t.name)
}

fn artifacts_dir(t: &Target) -> PathBuf {
    root().join("target/fuzz-artifacts").join(t.name)
}

fn scratch_corpus(t: &Target) -> PathBuf {
    root().join("target/fuzz-corpus").join(t.name)
}

/// The libFuzzer options every run of `t` gets.
fn common_args(t: &Target) -> Vec<String> {
    let mut args = vec![format!("-max_len={}", t.max_len)];
    let dict = root().join("fuzz/dict").join(format!("{}.dict", t.name));
    if dict.exists() {
        args.push(format!("-dict={}", dict.display()));
    }
    args
}

/// What one run did.
struct Outcome {
    name: &'static str,
    secs: f64,
    execs: Option<u64>,
    rate: Option<u64>,
    corpus: Option<u64>,
    /// The input that crashed (or timed out, or ran out of memory).
    crash: Option<String>,
    failed: bool,
}

/// Runs `targets` one after another for `secs` seconds each; a table at
/// the end; an error if any crashed.
pub fn run_all(targets: &[&'static Target], secs: u64) -> Result<()> {
    let mut outcomes = Vec::new();
    for t in targets {
        outcomes.push(run_one(t, secs)?);
    }
    println!(
        "\n{:<14} {:>6} {:>13} {:>9} {:>7}  result",
        "target", "secs", "executions", "exec/s", "corpus"
    );
    let num = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
    for o in &outcomes {
        let result = match (&o.crash, o.failed) {
            (Some(c), _) => format!("CRASH {c}"),
            (None, true) => "FAILED (see above)".to_owned(),
            (None, false) => "ok".to_owned(),
        };
        println!(
            "{:<14} {:>6.0} {:>13} {:>9} {:>7}  {result}",
            o.name,
            o.secs,
            num(o.execs),
            num(o.rate),
            num(o.corpus)
        );
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failed).collect();
    if failed.is_empty() {
        return Ok(());
    }
    for o in &failed {
        match &o.crash {
            Some(c) => eprintln!(
                "xtask: fuzz target {} crashed on {c}\n  replay: target/fuzz/{} {c}",
                o.name, o.name
            ),
            None => eprintln!("xtask: fuzz target {} failed", o.name),
        }
    }
    bail!(
        "{} fuzz target(s) failed: {}",
        failed.len(),
        failed.iter().map(|o| o.name).collect::<Vec<_>>().join(", ")
    )
}

/// Fuzzes `t` for `secs` seconds: its statistics, or the crash.
///
/// libFuzzer keeps time by the wall clock: a clock set forward (this
/// project's own fault tests move it by hours) ends a run early, or makes
/// the unit under way look like a timeout. So the time is kept here, on
/// the monotonic clock: a run that ended early is followed by another for
/// the rest, and a timeout is replayed before it counts.
fn run_one(t: &'static Target, secs: u64) -> Result<Outcome> {
    let mut o = Outcome {
        name: t.name,
        secs: 0.0,
        execs: None,
        rate: None,
        corpus: None,
        crash: None,
        failed: false,
    };
    let started = Instant::now();
    let mut execs = 0;
    loop {
        let left = secs.saturating_sub(started.elapsed().as_secs());
        if left == 0 {
            break;
        }
        let run = run_libfuzzer(t, left)?;
        execs += run.execs.unwrap_or(0);
        o.corpus = run.corpus.or(o.corpus);
        if let Some(artifact) = &run.artifact {
            let name = Path::new(artifact)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            if name.starts_with("timeout-") && !times_out(t, artifact)? {
                eprintln!(
                    "xtask: {artifact} runs in time when replayed: the wall clock moved \
                     under libFuzzer, not a hang; fuzzing on"
                );
                let _ = std::fs::remove_file(artifact);
                continue;
            }
            o.crash = Some(artifact.clone());
            o.failed = true;
            break;
        }
        if !run.success {
            o.failed = true;
            break;
        }
    }
    o.secs = started.elapsed().as_secs_f64();
    o.execs = Some(execs);
    o.rate = Some((execs as f64 / o.secs.max(0.001)) as u64);
    Ok(o)
}

/// What one libFuzzer process did.
struct Run {
    execs: Option<u64>,
    corpus: Option<u64>,
    /// The input it saved as a crash, timeout, leak or out-of-memory.
    artifact: Option<String>,
    success: bool,
}

/// One libFuzzer process on `t` for at most `secs` seconds.
fn run_libfuzzer(t: &Target, secs: u64) -> Result<Run> {
    let scratch = scratch_corpus(t);
    let committed = committed_corpus(t);
    let artifacts = artifacts_dir(t);
    std::fs::create_dir_all(&scratch)?;
    std::fs::create_dir_all(&committed)?;
    std::fs::create_dir_all(&artifacts)?;
    let mut cmd = Command::new(binary(t));
    cmd.arg(&scratch)
        .arg(&committed)
        .arg(format!("-max_total_time={secs}"))
        .args([
            "-print_final_stats=1",
            &format!("-timeout={TIMEOUT_SECS}"),
            "-rss_limit_mb=2048",
            // A slow input is reported, not saved: it is no failure.
            "-report_slow_units=1000000",
        ])
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(common_args(t))
        .current_dir(root())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    eprintln!("xtask: fuzzing {} for {secs} s: {cmd:?}", t.name);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary(t).display()))?;
    let stderr = child.stderr.take().expect("piped");
    let mut run = Run {
        execs: None,
        corpus: None,
        artifact: None,
        success: false,
    };
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        parse_line(&line, &mut run);
        if !noise(&line) {
            eprintln!("{line}");
        }
    }
    run.success = child.wait()?.success();
    Ok(run)
}

/// Whether `input` still runs past the timeout of `t` when replayed alone
/// (timed on the monotonic clock).
fn times_out(t: &Target, input: &str) -> Result<bool> {
    let started = Instant::now();
    let mut child = Command::new(binary(t))
        .arg(input)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    while started.elapsed().as_secs() <= TIMEOUT_SECS {
        if let Some(st) = child.try_wait()? {
            return Ok(!st.success());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(true)
}

/// Lines of libFuzzer's output not shown: each new input and reduction
/// (thousands of lines), and the sanitizer hooks it looks for in vain (no
/// sanitizer: see the module docs).
fn noise(line: &str) -> bool {
    (line.starts_with('#') && (line.contains("\tNEW ") || line.contains("\tREDUCE ")))
        || line.starts_with("WARNING: Failed to find function \"__sanitizer_")
}

/// Takes what matters from one line of libFuzzer's output (its own
/// executions per second are by the wall clock: not used).
fn parse_line(line: &str, run: &mut Run) {
    let number = |s: &str| s.trim().parse::<u64>().ok();
    if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
        run.execs = number(v);
    } else if let Some((_, rest)) = line.split_once("Test unit written to ") {
        let path = rest.trim();
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        if !name.starts_with("slow-unit-") {
            run.artifact = Some(path.to_owned());
        }
    } else if line.starts_with('#')
        && let Some((_, rest)) = line.split_once(" corp: ")
    {
        run.corpus = rest.split('/').next().and_then(number);
    }
}

/// Minimises the committed corpus and the scratch one together into the
/// committed directory: libFuzzer's greedy set-cover merge into an empty
/// directory, by edges only (not hit counts), so that the repository keeps
/// a small set of inputs covering every branch either reached; the scratch
/// corpus keeps the rest for local runs.
fn merge_corpus(t: &Target) -> Result<()> {
    let committed = committed_corpus(t);
    let scratch = scratch_corpus(t);
    let merged = root().join("target/fuzz-merge").join(t.name);
    if merged.exists() {
        std::fs::remove_dir_all(&merged)?;
    }
    std::fs::create_dir_all(&merged)?;
    std::fs::create_dir_all(&committed)?;
    std::fs::create_dir_all(&scratch)?;
    run(Command::new(binary(t))
        .args(["-set_cover_merge=1", "-use_counters=0"])
        .arg(&merged)
        .arg(&committed)
        .arg(&scratch)
        .args(common_args(t))
        .current_dir(root()))?;
    let count = |d: &Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    let before = count(&committed);
    if count(&merged) == 0 {
        bail!(
            "merging {} kept no input: the committed corpus is left as it was",
            t.name
        );
    }
    std::fs::remove_dir_all(&committed)?;
    std::fs::create_dir_all(&committed)?;
    for e in std::fs::read_dir(&merged)? {
        let e = e?;
        std::fs::copy(e.path(), committed.join(e.file_name()))?;
    }
    eprintln!(
        "xtask: {}: committed corpus {before} -> {} inputs",
        t.name,
        count(&committed)
    );
    Ok(())
}

/// What `cargo xtask test` runs: every target for [`CI_SECS`].
pub fn ci() -> Result<()> {
    build()?;
    let targets: Vec<&'static Target> = TARGETS.iter().collect();
    run_all(&targets, CI_SECS)
}
