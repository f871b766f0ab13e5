//! `cargo xtask soak [--minutes N]`: the long soak of `tests/soak.rs` —
//! 30 minutes (by default) of 4 writers at 1,000 lines/s each with
//! kubelet's rotation every 10 MB, the agent killed with SIGKILL every
//! 30–90 s and the broker taken away for 20 s every 3 minutes — on the
//! release build of the agent. `cargo xtask test` runs the same test
//! short (150 s). Prints the figures the README quotes; fails on a missing
//! or reordered line, a resend past the bound, or memory growing across
//! the agent's lives.

use anyhow::{Result, bail};

use crate::{cargo, root, run};

pub fn soak(rest: &[String]) -> Result<()> {
    let mut minutes: u64 = 30;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--minutes" => {
                minutes = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|m| *m > 0)
                    .ok_or_else(|| anyhow::anyhow!("--minutes N: a whole number above 0"))?;
            }
            "--" => {}
            other => {
                bail!("soak: unknown argument {other:?} (usage: cargo xtask soak [--minutes N])")
            }
        }
    }
    run(cargo().args(["build", "--release", "-p", "bpftail", "--bin", "bpftail"]))?;
    let secs = (minutes * 60).to_string();
    run(cargo()
        .args(["test", "-p", "bpftail", "--test", "soak"])
        .args(crate::TEST_FEATURES)
        .args(["--", "--nocapture", "--test-threads=1"])
        .env("BPFTAIL_BIN", root().join("target/release/bpftail"))
        .env("BPFTAIL_SOAK_SECS", &secs)
        .env("BPFTAIL_SOAK_ROTATE_BYTES", (10u64 << 20).to_string())
        .env("BPFTAIL_SOAK_KILL_MIN_SECS", "30")
        .env("BPFTAIL_SOAK_KILL_MAX_SECS", "90")
        .env("BPFTAIL_SOAK_OUTAGE_EVERY_SECS", "180")
        .env("BPFTAIL_SOAK_OUTAGE_SECS", "20"))
}
