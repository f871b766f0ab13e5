//! Docker json-file logs (`{"log":…,"stream":…,"time":…}` per line) read,
//! decoded, joined and rendered as the agent does, each line also checked
//! against `serde_json`; see `bpftail_fuzz::logfile`.
// `cargo test --bins` builds this with a test harness, which has its own main.
#![cfg_attr(not(test), no_main)]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bpftail_fuzz::logfile::run(bpftail::tail::decode::Format::DockerJson, data);
});
