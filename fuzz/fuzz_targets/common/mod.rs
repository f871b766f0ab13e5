//! What more than one target checks (included with `#[path]`: the fuzz
//! crate is binaries only).

use bpftail::discover::FileMeta;
use bpftail::kafka::batch::{BatchWriter, HEADER_LEN, parse_records};

/// The JSON members make an object; the Kafka headers decode.
pub fn check_rendered(meta: &FileMeta) {
    let mut obj = b"{\"time\":\"t\"".to_vec();
    obj.extend_from_slice(&meta.json_members);
    obj.push(b'}');
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&obj) {
        panic!(
            "invalid JSON members ({e}): {}",
            String::from_utf8_lossy(&obj)
        );
    }
    let mut w = BatchWriter::new(256);
    let r = w.begin(0, None);
    w.value(|v| v.extend_from_slice(b"m"));
    w.header_count(meta.kafka_header_count as usize);
    w.encoded_headers(&meta.kafka_headers);
    w.end(r, 0, 0);
    let sealed = w.seal(bpftail::config::Compression::None);
    let records = parse_records(&sealed.data[HEADER_LEN..]).expect("the headers decode");
    assert_eq!(records[0].headers.len(), meta.kafka_header_count as usize);
}
