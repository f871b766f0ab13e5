//! CRI log files (`<time> <stream> <P|F> <msg>`, as containerd, CRI-O and
//! conmon write them) read, reassembled, joined and rendered as the agent
//! does; see `bpftail_fuzz::logfile` for the input layout and the checks.
// `cargo test --bins` builds this with a test harness, which has its own main.
#![cfg_attr(not(test), no_main)]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bpftail_fuzz::logfile::run(bpftail::tail::decode::Format::Cri, data);
});
