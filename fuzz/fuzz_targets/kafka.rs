//! The native Kafka client's side of the wire: the brokers' answers, from
//! the response frame to the client's own decision, and the bytes of
//! record batches and SCRAM messages.
//!
//! Input: byte 0 picks the path (modulo 4), the rest is its data.
//! - 0, a response frame (`kafka::conn::decode_response`; the header must
//!   answer request 1): byte 1 the API (modulo 5: ApiVersions v0..=3,
//!   Metadata v1..=9, Produce v3..=9, SaslHandshake v1, SaslAuthenticate
//!   v0..=1), byte 2 its version, then the frame; a decoded answer goes
//!   through what the client decides from it: the versions it will use
//!   (`negotiated`), a topic's partitions and leaders (`sane_partitions`,
//!   `partition_leaders`), what becomes of a refused batch
//!   (`refused_batch`).
//! - 1, a batch's records section (`batch::parse_records`): byte 1 picks a
//!   codec; what parses is written again with `BatchWriter`, sealed with
//!   that codec, read back, and split in two (`batch::split`): the records
//!   survive each step unchanged.
//! - 2, a compressed records section (`batch::decompress`, codec id from
//!   byte 1), then parsed.
//! - 3, SCRAM (byte 1: SHA-256 or SHA-512): the server-first message (up
//!   to the first `\n`) and the server-final one (the rest), through the
//!   client's `client_final` and `verify_server_final`.
// `cargo test --bins` builds this with a test harness, which has its own main.
#![cfg_attr(not(test), no_main)]

use bpftail::config::Compression;
use bpftail::kafka::batch::{self, BatchWriter, HEADER_LEN, RecordView};
use bpftail::kafka::conn::{self, Unnegotiable};
use bpftail::kafka::engine::{self, Refused};
use bpftail::kafka::sasl::{Credentials, Mechanism, Scram};
use bpftail::sink::AckRun;
use bpftail_fuzz::Cursor;
use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, MetadataResponse, ProduceResponse, SaslAuthenticateResponse,
    SaslHandshakeResponse,
};

/// The request every answer here must answer.
const CORRELATION: i32 = 1;

const CODECS: [Compression; 5] = [
    Compression::None,
    Compression::Gzip,
    Compression::Snappy,
    Compression::Lz4,
    Compression::Zstd,
];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    match c.byte() % 4 {
        0 => response(&mut c),
        1 => records(&mut c),
        2 => {
            let codec = i16::from(c.byte());
            if let Ok(plain) = batch::decompress(codec, c.rest()) {
                let _ = batch::parse_records(&plain);
            }
        }
        _ => scram(&mut c),
    }
});

fn response(c: &mut Cursor<'_>) {
    let api = c.byte() % 5;
    let v = i16::from(c.byte());
    let frame = Bytes::copy_from_slice(c.rest());
    match api {
        0 => {
            let version = v % 4;
            let Ok(r) = conn::decode_response::<ApiVersionsResponse>(
                frame,
                ApiKey::ApiVersions,
                version,
                CORRELATION,
            ) else {
                return;
            };
            for sasl in [false, true] {
                match conn::negotiated(&r, sasl) {
                    Ok(v) => {
                        assert!((3..=9).contains(&v.produce), "{v:?}");
                        assert!((1..=9).contains(&v.metadata), "{v:?}");
                        assert!((0..=1).contains(&v.sasl_authenticate), "{v:?}");
                        assert!(sasl || v.sasl_authenticate == 0);
                    }
                    Err(Unnegotiable::Error(code)) => assert_ne!(code, 0),
                    Err(Unnegotiable::Unsupported(what)) => assert!(!what.is_empty()),
                }
            }
        }
        1 => {
            let version = 1 + v % 9;
            let Ok(m) = conn::decode_response::<MetadataResponse>(
                frame,
                ApiKey::Metadata,
                version,
                CORRELATION,
            ) else {
                return;
            };
            for b in &m.brokers {
                let _ = format!("{}:{}", b.host.as_str(), b.port);
            }
            for t in &m.topics {
                let Some(n) = engine::sane_partitions(&t.partitions) else {
                    continue;
                };
                assert_eq!(n, t.partitions.len());
                let leaders = engine::partition_leaders(&t.partitions, n);
                assert_eq!(leaders.len(), n);
            }
        }
        2 => {
            let version = 3 + v % 7;
            let Ok(p) = conn::decode_response::<ProduceResponse>(
                frame,
                ApiKey::Produce,
                version,
                CORRELATION,
            ) else {
                return;
            };
            for t in &p.responses {
                for part in &t.partition_responses {
                    if part.error_code != 0 {
                        let r = engine::refused_batch(part.error_code);
                        // MESSAGE_TOO_LARGE and RECORD_LIST_TOO_LARGE only.
                        assert_eq!(r == Refused::Split, matches!(part.error_code, 10 | 18));
                    }
                }
            }
        }
        3 => {
            let _ = conn::decode_response::<SaslHandshakeResponse>(
                frame,
                ApiKey::SaslHandshake,
                1,
                CORRELATION,
            );
        }
        _ => {
            let _ = conn::decode_response::<SaslAuthenticateResponse>(
                frame,
                ApiKey::SaslAuthenticate,
                v % 2,
                CORRELATION,
            );
        }
    }
}

/// A record as read back, compared the way the writer can reproduce it:
/// timestamps relative to the first record's, a missing value as empty,
/// header values likewise.
#[derive(Debug, PartialEq, Eq)]
struct Norm {
    ts: i64,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
}

fn normalise(records: &[RecordView<'_>]) -> Vec<Norm> {
    let base = records.first().map_or(0, |r| r.timestamp_delta);
    records
        .iter()
        .map(|r| Norm {
            ts: r.timestamp_delta - base,
            key: r.key.map(<[u8]>::to_vec),
            value: r.value.unwrap_or_default().to_vec(),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (k.to_vec(), v.unwrap_or_default().to_vec()))
                .collect(),
        })
        .collect()
}

fn records(c: &mut Cursor<'_>) {
    let codec = CODECS[usize::from(c.byte()) % CODECS.len()];
    let Some(parsed) = batch::parse_records(c.rest()) else {
        return;
    };
    // Timestamps the writer can hold as deltas (real ones are ms since 1970).
    if parsed
        .iter()
        .any(|r| r.timestamp_delta.unsigned_abs() > 1 << 40)
    {
        return;
    }
    let want = normalise(&parsed);
    let mut w = BatchWriter::new(256);
    for (i, r) in parsed.iter().enumerate() {
        let start = w.begin(r.timestamp_delta, r.key);
        w.value(|v| v.extend_from_slice(r.value.unwrap_or_default()));
        w.header_count(r.headers.len());
        for (k, v) in &r.headers {
            w.header(k, v.unwrap_or_default());
        }
        w.end(start, 7, i as u64);
    }
    let sealed = w.seal(codec);
    assert_eq!(sealed.records as usize, parsed.len());
    let attrs = i16::from_be_bytes([sealed.data[21], sealed.data[22]]);
    let plain = batch::decompress(attrs, &sealed.data[HEADER_LEN..]).expect("our own batch");
    let back = batch::parse_records(&plain).expect("our own batch parses");
    assert_eq!(
        normalise(&back),
        want,
        "a record changed on its way through a batch"
    );
    let acks = [AckRun {
        file: 7,
        first: 0,
        count: parsed.len() as u32,
    }];
    match batch::split(&sealed.data, &acks, codec) {
        Some([a, b]) => {
            assert!(parsed.len() >= 2);
            let mut all = Vec::new();
            for half in [&a, &b] {
                let attrs = i16::from_be_bytes([half.data[21], half.data[22]]);
                let plain = batch::decompress(attrs, &half.data[HEADER_LEN..]).expect("a half");
                let recs = batch::parse_records(&plain).expect("a half parses");
                let base = i64::from_be_bytes(half.data[27..35].try_into().expect("8 bytes"));
                all.extend(
                    recs.iter()
                        .map(|r| (base + r.timestamp_delta, r.value.map(<[u8]>::to_vec))),
                );
                assert_eq!(recs.len(), half.records as usize);
            }
            // Absolute timestamps: the first record's is the batch's base.
            let want: Vec<_> = parsed
                .iter()
                .map(|r| {
                    (
                        r.timestamp_delta,
                        Some(r.value.unwrap_or_default().to_vec()),
                    )
                })
                .collect();
            assert_eq!(all, want, "a split lost or changed a record");
            assert_eq!(a.records + b.records, parsed.len() as u32);
        }
        None => assert!(parsed.len() < 2, "a batch of several records did not split"),
    }
}

fn scram(c: &mut Cursor<'_>) {
    let mechanism = if c.byte() & 1 == 0 {
        Mechanism::ScramSha256
    } else {
        Mechanism::ScramSha512
    };
    let first = c.until(b'\n');
    let last = c.rest();
    // PBKDF2 runs as many rounds as the server asks (up to 2^20): bounded
    // here to keep inputs fast; the bounds check itself stays reachable.
    let rounds = std::str::from_utf8(first).ok().and_then(|s| {
        s.split(',')
            .find_map(|a| a.strip_prefix("i="))
            .and_then(|n| n.parse::<u32>().ok())
    });
    if rounds.is_some_and(|n| n > 64 && n <= 1 << 20) {
        return;
    }
    let creds = Credentials {
        mechanism,
        username: "bpftail".into(),
        password: "pencil".into(),
    };
    let mut s = Scram::with_nonce(&creds, "fyko+d2lbbFgONRv9qkxdawL");
    assert!(s.client_first().starts_with(b"n,,n=bpftail,r="));
    if let Ok(fin) = s.client_final(first) {
        let fin = String::from_utf8(fin).expect("the client's message is text");
        assert!(fin.starts_with("c=biws,r=fyko+d2lbbFgONRv9qkxdawL") && fin.contains(",p="));
    }
    let _ = s.verify_server_final(last);
}
