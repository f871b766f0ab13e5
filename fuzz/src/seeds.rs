//! How the binary seeds of `fuzz/corpus/btf` and `fuzz/corpus/kafka` were
//! made (the text ones are real logs, pods and files, written by hand):
//! `cargo test -p bpftail-fuzz --lib -- --ignored write_binary_seeds`
//! writes them again (`seed-*` files; a merge renames what it keeps).

use std::path::Path;

use bpftail::config::Compression;
use bpftail::kafka::batch::{BatchWriter, HEADER_LEN};
use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, MetadataResponse, ProduceResponse, SaslAuthenticateResponse,
    SaslHandshakeResponse,
};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

/// Kafka's wire encoding, by hand (the `kafka-protocol` crate encodes
/// responses only with its `broker` feature, which the agent does not
/// build); each seed is checked to decode.
#[derive(Default)]
struct Wire {
    b: Vec<u8>,
    /// Compact (flexible version) lengths and tagged fields.
    flexible: bool,
}

impl Wire {
    fn i8(&mut self, v: i8) -> &mut Self {
        self.b.extend(v.to_be_bytes());
        self
    }
    fn i16(&mut self, v: i16) -> &mut Self {
        self.b.extend(v.to_be_bytes());
        self
    }
    fn i32(&mut self, v: i32) -> &mut Self {
        self.b.extend(v.to_be_bytes());
        self
    }
    fn i64(&mut self, v: i64) -> &mut Self {
        self.b.extend(v.to_be_bytes());
        self
    }
    fn uvarint(&mut self, mut v: u64) -> &mut Self {
        while v >= 0x80 {
            self.b.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.b.push(v as u8);
        self
    }
    /// An array's (or string's) length.
    fn len(&mut self, n: usize) -> &mut Self {
        if self.flexible {
            self.uvarint(n as u64 + 1)
        } else {
            self.i32(n as i32)
        }
    }
    fn str(&mut self, s: &str) -> &mut Self {
        if self.flexible {
            self.uvarint(s.len() as u64 + 1);
        } else {
            self.i16(s.len() as i16);
        }
        self.b.extend(s.as_bytes());
        self
    }
    fn null_str(&mut self) -> &mut Self {
        if self.flexible {
            self.uvarint(0)
        } else {
            self.i16(-1)
        }
    }
    /// No tagged fields (flexible versions only).
    fn tags(&mut self) -> &mut Self {
        if self.flexible {
            self.uvarint(0);
        }
        self
    }
}

/// The kafka target's input for an answer: path 0, the API's selector,
/// the version's selector, the header (answering request 1), the body.
fn frame(api: u8, selector: u8, header_tags: bool, body: &Wire) -> Vec<u8> {
    let mut out = vec![0, api, selector];
    out.extend(1i32.to_be_bytes());
    if header_tags {
        out.push(0);
    }
    out.extend(&body.b);
    out
}

fn decodes<P: kafka_protocol::protocol::Decodable>(seed: &[u8], key: ApiKey, version: i16) {
    bpftail::kafka::conn::decode_response::<P>(Bytes::copy_from_slice(&seed[3..]), key, version, 1)
        .unwrap_or_else(|e| panic!("seed for {key:?} v{version}: {e}"));
}

fn kafka() {
    for v in [0i16, 3] {
        let mut w = Wire {
            flexible: v >= 3,
            ..Default::default()
        };
        w.i16(0).len(5);
        for (k, min, max) in [(0, 0, 11), (3, 0, 12), (17, 0, 1), (18, 0, 4), (36, 0, 2)] {
            w.i16(k).i16(min).i16(max).tags();
        }
        if v >= 1 {
            w.i32(0);
        }
        w.tags();
        // ApiVersions answers with header v0 in every version.
        let seed = frame(0, v as u8, false, &w);
        decodes::<ApiVersionsResponse>(&seed, ApiKey::ApiVersions, v);
        write("kafka", &format!("api-versions-v{v}"), &seed);
    }
    let mut w = Wire::default();
    w.i16(35).len(0);
    write("kafka", "api-versions-unsupported", &frame(0, 0, false, &w));
    for (v, selector) in [(1i16, 0u8), (9, 8)] {
        let mut w = Wire {
            flexible: v >= 9,
            ..Default::default()
        };
        if v >= 3 {
            w.i32(0);
        }
        w.len(2);
        for (id, host, port) in [(1, "broker-1.kafka.svc", 9092), (2, "10.0.0.7", 9093)] {
            w.i32(id).str(host).i32(port).null_str().tags();
        }
        if v >= 2 {
            w.str("cluster-1");
        }
        w.i32(1);
        // (error, name, partitions: (index, leader, error))
        type Topic<'a> = (i16, &'a str, &'a [(i32, i32, i16)]);
        let topics: [Topic<'_>; 3] = [
            (0, "k8s-logs", &[(0, 1, 0), (1, 2, 0), (2, -1, 5)]),
            (3, "missing", &[]),
            (0, "odd", &[(1, 1, 0), (1, 2, 0)]),
        ];
        w.len(topics.len());
        for (error, name, parts) in topics {
            w.i16(error).str(name).i8(0).len(parts.len());
            for &(index, leader, error) in parts {
                w.i16(error).i32(index).i32(leader);
                if v >= 7 {
                    w.i32(0);
                }
                w.len(1).i32(leader).len(1).i32(leader);
                if v >= 5 {
                    w.len(0);
                }
                w.tags();
            }
            if v >= 8 {
                w.i32(0);
            }
            w.tags();
        }
        if v >= 8 {
            w.i32(0);
        }
        w.tags();
        let seed = frame(1, selector, v >= 9, &w);
        decodes::<MetadataResponse>(&seed, ApiKey::Metadata, v);
        write("kafka", &format!("metadata-v{v}"), &seed);
    }
    for (v, selector) in [(3i16, 0u8), (9, 6)] {
        let mut w = Wire {
            flexible: v >= 9,
            ..Default::default()
        };
        let parts = [(0, 0), (1, 10), (2, 6), (3, 29), (4, -1)];
        w.len(1).str("k8s-logs").len(parts.len());
        for (index, error) in parts {
            w.i32(index).i16(error).i64(100).i64(-1);
            if v >= 5 {
                w.i64(0);
            }
            if v >= 8 {
                w.len(0).str("why");
            }
            w.tags();
        }
        w.tags().i32(0).tags();
        let seed = frame(2, selector, v >= 9, &w);
        decodes::<ProduceResponse>(&seed, ApiKey::Produce, v);
        write("kafka", &format!("produce-v{v}"), &seed);
    }
    let mut w = Wire::default();
    w.i16(0)
        .len(3)
        .str("PLAIN")
        .str("SCRAM-SHA-256")
        .str("SCRAM-SHA-512");
    let seed = frame(3, 0, false, &w);
    decodes::<SaslHandshakeResponse>(&seed, ApiKey::SaslHandshake, 1);
    write("kafka", "sasl-handshake", &seed);
    let first = b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096";
    let mut w = Wire::default();
    w.i16(0).null_str().i32(first.len() as i32);
    w.b.extend(first);
    w.i64(0);
    let seed = frame(4, 1, false, &w);
    decodes::<SaslAuthenticateResponse>(&seed, ApiKey::SaslAuthenticate, 1);
    write("kafka", "sasl-authenticate", &seed);

    // Batches as the agent writes them.
    let mut w = BatchWriter::new(1024);
    for (i, line) in [
        "{\"time\":\"2026-11-25T14:41:47.973485468+00:00\",\"stream\":\"stdout\",\"message\":\"plain line\"}",
        "",
        "ünïcödé ✓",
    ]
    .iter()
    .enumerate()
    {
        let r = w.begin(1_764_081_707_973 + i as i64, Some(b"uid/nginx"));
        w.value(|v| v.extend_from_slice(line.as_bytes()));
        w.header_count(2);
        w.header(b"namespace", b"shop");
        w.header(b"pod", b"");
        w.end(r, 1, i as u64);
    }
    let plain = w.seal(Compression::None).data;
    write(
        "kafka",
        "records",
        &[&[1, 0][..], &plain[HEADER_LEN..]].concat(),
    );
    for (id, codec) in [
        (1u8, Compression::Gzip),
        (2, Compression::Snappy),
        (3, Compression::Lz4),
        (4, Compression::Zstd),
    ] {
        let mut w = BatchWriter::new(1024);
        for i in 0..4 {
            let r = w.begin(i, None);
            w.value(|v| v.extend_from_slice(format!("line {i} of a log").as_bytes()));
            w.header_count(0);
            w.end(r, 1, i as u64);
        }
        let sealed = w.seal(codec).data;
        let name = codec.as_str();
        write(
            "kafka",
            &format!("compressed-{name}"),
            &[&[2, id][..], &sealed[HEADER_LEN..]].concat(),
        );
        write(
            "kafka",
            &format!("records-{name}"),
            &[&[1, id][..], &plain[HEADER_LEN..]].concat(),
        );
    }
    for (name, msg) in [
        (
            "scram-256",
            "\x03\x00r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=64\nv=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        ),
        (
            "scram-512",
            "\x03\x01r=fyko+d2lbbFgONRv9qkxdawLx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1,m=ext\ne=invalid-proof",
        ),
        (
            "scram-bad-count",
            "\x03\x00r=fyko+d2lbbFgONRv9qkxdawLx,s=AAAA,i=0\nv=",
        ),
    ] {
        write("kafka", name, msg.as_bytes());
    }
}

/// Builds BTF blobs (Documentation/bpf/btf.rst), little-endian.
#[derive(Default)]
struct Btf {
    types: Vec<u8>,
    strings: Vec<u8>,
    count: u32,
}

const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const FWD: u32 = 7;
const TYPEDEF: u32 = 8;
const CONST: u32 = 10;
const FUNC: u32 = 12;
const FUNC_PROTO: u32 = 13;

impl Btf {
    fn new() -> Btf {
        Btf {
            strings: vec![0],
            ..Default::default()
        }
    }

    fn name(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let at = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        at
    }

    fn rec(&mut self, name: &str, kind: u32, kind_flag: bool, vlen: u32, st: u32) -> u32 {
        let n = self.name(name);
        self.types.extend(n.to_le_bytes());
        let info = (kind << 24) | (u32::from(kind_flag) << 31) | vlen;
        self.types.extend(info.to_le_bytes());
        self.types.extend(st.to_le_bytes());
        self.count += 1;
        self.count
    }

    fn int(&mut self, name: &str, size: u32) -> u32 {
        let id = self.rec(name, INT, false, 0, size);
        self.types.extend((size * 8).to_le_bytes());
        id
    }

    fn composite(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        let id = self.rec(name, kind, false, members.len() as u32, size);
        for &(m, ty, bits) in members {
            let n = self.name(m);
            self.types.extend(n.to_le_bytes());
            self.types.extend(ty.to_le_bytes());
            self.types.extend(bits.to_le_bytes());
        }
        id
    }

    fn proto(&mut self, ret: u32, params: &[u32]) -> u32 {
        let id = self.rec("", FUNC_PROTO, false, params.len() as u32, ret);
        for &p in params {
            self.types.extend(0u32.to_le_bytes());
            self.types.extend(p.to_le_bytes());
        }
        id
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(0xeb9fu16.to_le_bytes());
        out.extend([1, 0]);
        out.extend(24u32.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend((self.types.len() as u32).to_le_bytes());
        out.extend((self.types.len() as u32).to_le_bytes());
        out.extend((self.strings.len() as u32).to_le_bytes());
        out.extend(&self.types);
        out.extend(&self.strings);
        out
    }
}

/// A kernel in miniature: every struct member, tracepoint and function
/// the agent looks up, through typedefs, qualifiers and anonymous unions.
fn btf_kernel() -> Vec<u8> {
    let mut b = Btf::new();
    let uint = b.int("unsigned int", 4);
    let ulong = b.int("long unsigned int", 8);
    let long = b.int("long int", 8);
    let u32_ = b.rec("u32", TYPEDEF, false, 0, uint);
    let dev_t = b.rec("dev_t", TYPEDEF, false, 0, u32_);
    let ino_t = b.rec("__kernel_ulong_t", TYPEDEF, false, 0, ulong);
    let fwd_inode = b.rec("inode", FWD, false, 0, 0);
    let p_inode = b.rec("", PTR, false, 0, fwd_inode);
    let sb = b.composite(
        STRUCT,
        "super_block",
        64,
        &[("s_list", ulong, 0), ("s_dev", dev_t, 128)],
    );
    let p_sb = b.rec("", PTR, false, 0, sb);
    let inode = b.composite(
        STRUCT,
        "inode",
        600,
        &[
            ("i_mode", uint, 0),
            ("i_sb", p_sb, 320),
            ("i_ino", ino_t, 512),
        ],
    );
    let p_inode2 = b.rec("", PTR, false, 0, inode);
    let c_inode = b.rec("", CONST, false, 0, p_inode2);
    let anon = b.composite(UNION, "", 8, &[("f_inode", c_inode, 0), ("f_x", ulong, 0)]);
    let file = b.composite(STRUCT, "file", 232, &[("f_mode", uint, 0), ("", anon, 256)]);
    let p_file = b.rec("", PTR, false, 0, file);
    let pp_file = b.rec("", PTR, false, 0, p_file);
    let fdt = b.composite(
        STRUCT,
        "fdtable",
        56,
        &[("max_fds", uint, 0), ("fd", pp_file, 64)],
    );
    let p_fdt = b.rec("", PTR, false, 0, fdt);
    let files = b.composite(
        STRUCT,
        "files_struct",
        704,
        &[("count", uint, 0), ("fdt", p_fdt, 256)],
    );
    let p_files = b.rec("", PTR, false, 0, files);
    let arr = b.rec("", ARRAY, false, 0, 0);
    b.types.extend(ulong.to_le_bytes());
    b.types.extend(uint.to_le_bytes());
    b.types.extend(16u32.to_le_bytes());
    b.composite(
        STRUCT,
        "task_struct",
        9000,
        &[("stack", arr, 0), ("files", p_files, 20000)],
    );
    let mapping = b.composite(STRUCT, "address_space", 200, &[("host", p_inode, 0)]);
    let p_mapping = b.rec("", PTR, false, 0, mapping);
    let regs = b.composite(
        STRUCT,
        "pt_regs",
        168,
        &[
            ("dx", ulong, 768),
            ("di", ulong, 896),
            ("orig_ax", ulong, 960),
        ],
    );
    let p_regs = b.rec("", PTR, false, 0, regs);
    let folio = b.composite(STRUCT, "folio", 64, &[("flags", ulong, 0)]);
    let p_folio = b.rec("", PTR, false, 0, folio);
    let void_p = b.rec("", PTR, false, 0, 0);
    for (tp, args) in [
        ("ctime_ns_xchg", vec![void_p, p_inode, long, long]),
        ("ctime_xchg_skip", vec![void_p, p_inode2, long]),
        ("writeback_mark_inode_dirty", vec![void_p, p_inode, uint]),
        ("writeback_dirty_folio", vec![void_p, p_folio, p_mapping]),
        ("sys_exit", vec![void_p, p_regs, long]),
    ] {
        let proto = b.proto(0, &args);
        let ptr = b.rec("", PTR, false, 0, proto);
        b.rec(&format!("btf_trace_{tp}"), TYPEDEF, false, 0, ptr);
    }
    let proto = b.proto(long, &[p_file, ulong]);
    for f in [
        "vfs_write",
        "vfs_writev",
        "vfs_iter_write",
        "vfs_iocb_iter_write",
    ] {
        b.rec(f, FUNC, false, 1, proto);
    }
    b.bytes()
}

/// Bitfields (kind_flag) and a member that is one.
fn btf_bitfields() -> Vec<u8> {
    let mut b = Btf::new();
    let uint = b.int("unsigned int", 4);
    let id = b.rec("inode", STRUCT, true, 3, 8);
    for (m, bits) in [("i_state", 3 << 24), ("i_ino", 8), ("i_sb", 32)] {
        let n = b.name(m);
        b.types.extend(n.to_le_bytes());
        b.types.extend(uint.to_le_bytes());
        b.types.extend(u32::to_le_bytes(bits));
    }
    let _ = id;
    b.bytes()
}

#[test]
#[ignore = "writes the seed corpus: run by hand"]
fn write_binary_seeds() {
    kafka();
    write("btf", "kernel-in-miniature", &btf_kernel());
    write("btf", "bitfields", &btf_bitfields());
}

#[test]
fn the_miniature_kernel_has_what_the_agent_looks_up() {
    let btf = bpftail::watch::btf::Btf::parse(btf_kernel()).unwrap();
    assert_eq!(btf.member("task_struct", "files").unwrap().size, 8);
    assert_eq!(btf.member("file", "f_inode").unwrap().offset, 32);
    assert_eq!(btf.member("inode", "i_ino").unwrap().size, 8);
    assert_eq!(btf.member("super_block", "s_dev").unwrap().size, 4);
    assert_eq!(
        btf.tracepoint_args("writeback_dirty_folio").unwrap(),
        ["struct folio *", "struct address_space *"]
    );
    assert_eq!(
        btf.tracepoint_args("ctime_ns_xchg").unwrap()[0],
        "struct inode *"
    );
    assert!(btf.has_function("vfs_iocb_iter_write"));
}
