//! Docker json-file logs (`{"log":…,"stream":…,"time":…}` per line) read,
//! decoded, joined and rendered as the agent does, each line also checked
//! against `serde_json`; see `bpftail_fuzz::logfile`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bpftail_fuzz::logfile::run(bpftail::tail::decode::Format::DockerJson, data);
});
