//! The checkpoint file (`<data-dir>/checkpoints.json`), as the agent reads
//! it at start: `checkpoint::parse`. It is the agent's own file, but what
//! is on disk after a crash, a full disk or an edit by hand is anything.
//!
//! Input: the file's bytes. Checked: what parses writes back out and
//! parses again to the same entries; a refusal says why, and "newer" only
//! for a layout version above 1.
// `cargo test --bins` builds this with a test harness, which has its own main.
#![cfg_attr(not(test), no_main)]

use bpftail::checkpoint::{self, Unusable};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    match checkpoint::parse(data) {
        Ok(entries) => {
            let doc = serde_json::json!({ "version": "1", "files": entries });
            let bytes = serde_json::to_vec(&doc).expect("entries serialise");
            let again = checkpoint::parse(&bytes).expect("what was read reads again");
            assert_eq!(again, entries, "entries changed on their way back");
        }
        Err(Unusable::Newer(v)) => assert!(v.parse::<u32>().is_ok_and(|n| n > 1), "{v:?}"),
        Err(Unusable::Corrupt(why)) => assert!(!why.is_empty()),
    }
});
