//! CRI log files (`<time> <stream> <P|F> <msg>`, as containerd, CRI-O and
//! conmon write them) read, reassembled, joined and rendered as the agent
//! does; see `bpftail_fuzz::logfile` for the input layout and the checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bpftail_fuzz::logfile::run(bpftail::tail::decode::Format::Cri, data);
});
