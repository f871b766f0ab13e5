//! RecordBatch v2 (Kafka's message format since 0.11), written by hand
//! straight from the line bytes.
//!
//! Why by hand: the one part of the producer that runs per record. The
//! `kafka-protocol` crate's `RecordBatchEncoder` takes owned `Record`s
//! (a `Bytes` key, value and header map per record); here a record is
//! appended to the batch buffer where it will be sent, with its value
//! rendered in place (no heap allocation per record), and the batch's CRC
//! and lengths are filled in once when it is sealed.
//!
//! Layout (all big-endian; record fields are zigzag varints):
//! ```text
//! baseOffset i64 | batchLength i32 | partitionLeaderEpoch i32 | magic i8 = 2
//! crc u32 (CRC32C of everything after it) | attributes i16 (codec bits 0-2)
//! lastOffsetDelta i32 | baseTimestamp i64 | maxTimestamp i64
//! producerId i64 | producerEpoch i16 | baseSequence i32 | recordCount i32
//! records: length varint | attributes i8 | timestampDelta varlong
//!          | offsetDelta varint | key (varint length, -1 = null) | value
//!          | header count varint | headers (key, value as varint+bytes)
//! ```
//! With a codec, everything after the 61-byte header is compressed as one
//! block; the header stays plain.

use std::io::Write;

use crate::config::Compression;
use crate::sink::AckRun;

/// Bytes before the first record.
pub const HEADER_LEN: usize = 61;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;

/// Width reserved for a record's length and its value's length: records
/// and values of 64 to 8191 bytes (most log lines) need no fix-up move.
const GUESS: usize = 2;

/// A batch being filled: the header's room, then uncompressed records.
#[derive(Debug)]
pub struct BatchWriter {
    /// `HEADER_LEN` bytes of header (filled at [`BatchWriter::seal`]), then
    /// the records, each complete.
    buf: Vec<u8>,
    records: u32,
    base_ts: i64,
    max_ts: i64,
    /// Sum of value lengths (the `bytes_delivered` metric).
    value_bytes: u64,
    /// Whose records these are, in order: runs of consecutive sequence
    /// numbers of one file.
    acks: Vec<AckRun>,
}

/// A batch ready to be produced.
#[derive(Debug)]
pub struct Sealed {
    pub data: Vec<u8>,
    /// The uncompressed buffer, free again once a codec has run.
    pub spare: Option<Vec<u8>>,
    pub records: u32,
    pub value_bytes: u64,
    pub acks: Vec<AckRun>,
}

/// Where a record begun with [`BatchWriter::begin`] started.
#[derive(Debug, Clone, Copy)]
pub struct RecordStart(usize);

impl BatchWriter {
    /// A writer whose buffer starts with room for `capacity` bytes (it
    /// grows past that as records come).
    pub fn new(capacity: usize) -> BatchWriter {
        Self::reusing(Vec::with_capacity(capacity.max(HEADER_LEN + 64)))
    }

    /// A writer over `buf`, emptied (its capacity is kept).
    pub fn reusing(mut buf: Vec<u8>) -> BatchWriter {
        buf.clear();
        buf.resize(HEADER_LEN, 0);
        BatchWriter {
            buf,
            records: 0,
            base_ts: 0,
            max_ts: 0,
            value_bytes: 0,
            acks: Vec::new(),
        }
    }

    /// Bytes held (header included): what the in-flight budget counts.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn records(&self) -> u32 {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Starts a record: length (to be fixed), attributes, timestamp and
    /// offset deltas, key. The value follows with [`BatchWriter::value`].
    pub fn begin(&mut self, ts: i64, key: Option<&[u8]>) -> RecordStart {
        if self.records == 0 {
            self.base_ts = ts;
            self.max_ts = ts;
        }
        self.max_ts = self.max_ts.max(ts);
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; GUESS]);
        self.buf.push(0);
        put_varlong(&mut self.buf, ts - self.base_ts);
        put_varint(&mut self.buf, self.records as i32);
        match key {
            Some(k) => {
                put_varint(&mut self.buf, k.len() as i32);
                self.buf.extend_from_slice(k);
            }
            None => put_varint(&mut self.buf, -1),
        }
        RecordStart(start)
    }

    /// Writes the value with `render`, which appends it to the buffer.
    pub fn value(&mut self, render: impl FnOnce(&mut Vec<u8>)) {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; GUESS]);
        render(&mut self.buf);
        let len = self.buf.len() - at - GUESS;
        self.value_bytes += len as u64;
        fix_length(&mut self.buf, at, len);
    }

    /// The header count, then `count` calls of [`BatchWriter::header`].
    pub fn header_count(&mut self, count: usize) {
        put_varint(&mut self.buf, count as i32);
    }

    pub fn header(&mut self, key: &[u8], value: &[u8]) {
        put_header(&mut self.buf, key, value);
    }

    /// Headers already encoded with [`put_header`].
    pub fn encoded_headers(&mut self, headers: &[u8]) {
        self.buf.extend_from_slice(headers);
    }

    /// Ends the record begun at `start`; `(file, seq)` comes back in the
    /// batch's delivery report.
    pub fn end(&mut self, start: RecordStart, file: u32, seq: u64) {
        let len = self.buf.len() - start.0 - GUESS;
        fix_length(&mut self.buf, start.0, len);
        self.records += 1;
        match self.acks.last_mut() {
            Some(run) if run.file == file && run.first + u64::from(run.count) == seq => {
                run.count += 1
            }
            _ => self.acks.push(AckRun {
                file,
                first: seq,
                count: 1,
            }),
        }
    }

    /// Abandons the record begun at `start` (nothing of it is kept).
    pub fn abandon(&mut self, start: RecordStart) {
        self.buf.truncate(start.0);
    }

    /// Fills in the header (compressing the records first with a codec; a
    /// codec that fails — it cannot on in-memory data — leaves the batch
    /// uncompressed, which every consumer reads).
    pub fn seal(self, codec: Compression) -> Sealed {
        let BatchWriter {
            mut buf,
            records,
            base_ts,
            max_ts,
            value_bytes,
            acks,
        } = self;
        let mut spare = None;
        let mut codec = codec;
        if codec != Compression::None {
            let mut out = Vec::with_capacity(HEADER_LEN + (buf.len() - HEADER_LEN) / 2 + 64);
            out.resize(HEADER_LEN, 0);
            match compress(codec, &buf[HEADER_LEN..], &mut out) {
                Ok(()) => spare = Some(std::mem::replace(&mut buf, out)),
                Err(e) => {
                    tracing::error!(error = %e, codec = codec.as_str(), "compressing a batch failed; it is sent uncompressed");
                    codec = Compression::None;
                }
            }
        }
        let total = buf.len();
        let h = &mut buf[..HEADER_LEN];
        h[0..8].copy_from_slice(&0i64.to_be_bytes());
        h[8..12].copy_from_slice(&((total - 12) as i32).to_be_bytes());
        h[12..16].copy_from_slice(&(-1i32).to_be_bytes());
        h[16] = 2;
        h[21..23].copy_from_slice(&codec_id(codec).to_be_bytes());
        h[23..27].copy_from_slice(&(records as i32 - 1).to_be_bytes());
        h[27..35].copy_from_slice(&base_ts.to_be_bytes());
        h[35..43].copy_from_slice(&max_ts.to_be_bytes());
        h[43..51].copy_from_slice(&(-1i64).to_be_bytes());
        h[51..53].copy_from_slice(&(-1i16).to_be_bytes());
        h[53..57].copy_from_slice(&(-1i32).to_be_bytes());
        h[57..61].copy_from_slice(&(records as i32).to_be_bytes());
        let crc = crc32c::crc32c(&buf[ATTRIBUTES_AT..]);
        buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        Sealed {
            data: buf,
            spare,
            records,
            value_bytes,
            acks,
        }
    }
}

fn codec_id(codec: Compression) -> i16 {
    match codec {
        Compression::None => 0,
        Compression::Gzip => 1,
        Compression::Snappy => 2,
        Compression::Lz4 => 3,
        Compression::Zstd => 4,
    }
}

fn compress(codec: Compression, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    match codec {
        Compression::None => out.extend_from_slice(data),
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            enc.write_all(data)?;
            enc.finish()?;
        }
        // Raw snappy, as librdkafka sends it (Java's consumer reads it too).
        Compression::Snappy => {
            let at = out.len();
            out.resize(at + snap::raw::max_compress_len(data.len()), 0);
            let n = snap::raw::Encoder::new()
                .compress(data, &mut out[at..])
                .map_err(std::io::Error::other)?;
            out.truncate(at + n);
        }
        // The LZ4 frame format with independent blocks (KIP-57).
        Compression::Lz4 => {
            let info = lz4_flex::frame::FrameInfo::new()
                .block_mode(lz4_flex::frame::BlockMode::Independent);
            let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, out);
            enc.write_all(data)?;
            enc.finish().map_err(std::io::Error::other)?;
        }
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(out, 0)?;
            enc.write_all(data)?;
            enc.finish()?;
        }
    }
    Ok(())
}

/// Decompresses the records of a batch (for splitting and tests).
pub fn decompress(codec_id: i16, data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(data.len() * 2);
    match codec_id & 7 {
        0 => out.extend_from_slice(data),
        1 => {
            flate2::read::GzDecoder::new(data).read_to_end(&mut out)?;
        }
        2 => {
            out = snap::raw::Decoder::new()
                .decompress_vec(data)
                .map_err(std::io::Error::other)?;
        }
        3 => {
            lz4_flex::frame::FrameDecoder::new(data).read_to_end(&mut out)?;
        }
        4 => {
            zstd::stream::read::Decoder::new(data)?.read_to_end(&mut out)?;
        }
        c => {
            return Err(std::io::Error::other(format!("unknown codec {c}")));
        }
    }
    Ok(out)
}

/// Writes `len` as a zigzag varint into the `GUESS` bytes at `at`, moving
/// what follows them when it needs another width.
fn fix_length(buf: &mut Vec<u8>, at: usize, len: usize) {
    let mut tmp = [0u8; 10];
    let n = encode_varint(&mut tmp, zigzag(len as i64));
    if n != GUESS {
        let end = buf.len();
        if n > GUESS {
            buf.resize(end + n - GUESS, 0);
            buf.copy_within(at + GUESS..end, at + n);
        } else {
            buf.copy_within(at + GUESS..end, at + n);
            buf.truncate(end - (GUESS - n));
        }
    }
    buf[at..at + n].copy_from_slice(&tmp[..n]);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn encode_varint(out: &mut [u8; 10], mut v: u64) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        out[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    out[i] = v as u8;
    i + 1
}

#[inline]
fn put_varlong(buf: &mut Vec<u8>, v: i64) {
    let mut u = zigzag(v);
    while u >= 0x80 {
        buf.push((u as u8) | 0x80);
        u >>= 7;
    }
    buf.push(u as u8);
}

/// Appends one record header (key and value with their varint lengths).
pub fn put_header(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    buf.reserve(key.len() + value.len() + 6);
    put_varint(buf, key.len() as i32);
    buf.extend_from_slice(key);
    put_varint(buf, value.len() as i32);
    buf.extend_from_slice(value);
}

#[inline]
fn put_varint(buf: &mut Vec<u8>, v: i32) {
    put_varlong(buf, i64::from(v));
}

/// The headers [`put_header`] wrote into `buf`, in order (up to the first
/// that does not read back, which none of ours is).
pub fn headers_in(buf: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= buf.len() {
            return None;
        }
        let key = get_bytes(buf, &mut at)??;
        let value = get_bytes(buf, &mut at)??;
        Some((key, value))
    })
}

/// Splits a sealed batch into two of half its records each (the broker
/// found it too large); `None` if it holds fewer than two or cannot be
/// read back.
pub fn split(data: &[u8], acks: &[AckRun], codec: Compression) -> Option<[Sealed; 2]> {
    let header = data.get(..HEADER_LEN)?;
    let attrs = i16::from_be_bytes(header[21..23].try_into().ok()?);
    let base_ts = i64::from_be_bytes(header[27..35].try_into().ok()?);
    let records = decompress(attrs, &data[HEADER_LEN..]).ok()?;
    let parsed = parse_records(&records)?;
    let seqs: Vec<(u32, u64)> = acks
        .iter()
        .flat_map(|r| (0..u64::from(r.count)).map(move |i| (r.file, r.first + i)))
        .collect();
    let n = parsed.len();
    if n < 2 || seqs.len() != n {
        return None;
    }
    let half = |range: std::ops::Range<usize>| {
        let mut w = BatchWriter::new(records.len() / 2 + HEADER_LEN + 64);
        for i in range {
            let r = &parsed[i];
            let start = w.begin(base_ts + r.timestamp_delta, r.key);
            w.value(|b| b.extend_from_slice(r.value.unwrap_or_default()));
            w.header_count(r.headers.len());
            for (k, v) in &r.headers {
                w.header(k, v.unwrap_or_default());
            }
            w.end(start, seqs[i].0, seqs[i].1);
        }
        Some(w.seal(codec))
    };
    Some([half(0..n / 2)?, half(n / 2..n)?])
}

/// One record read back from a batch's records section.
#[derive(Debug, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub timestamp_delta: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Vec<(&'a [u8], Option<&'a [u8]>)>,
}

fn get_varlong(buf: &[u8], at: &mut usize) -> Option<i64> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(((v >> 1) as i64) ^ -((v & 1) as i64));
        }
    }
    None
}

fn get_bytes<'a>(buf: &'a [u8], at: &mut usize) -> Option<Option<&'a [u8]>> {
    let len = get_varlong(buf, at)?;
    if len < 0 {
        return Some(None);
    }
    let s = buf.get(*at..*at + len as usize)?;
    *at += len as usize;
    Some(Some(s))
}

/// Parses the records section (uncompressed) of a batch; `None` if it is
/// malformed.
pub fn parse_records(mut buf: &[u8]) -> Option<Vec<RecordView<'_>>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        out.push(next_record(&mut buf)?);
    }
    Some(out)
}

/// Parses the first record of a records section (uncompressed) and moves
/// `buf` past it; `None` if it is malformed. For walking a batch without
/// holding a view of every record at once.
pub fn next_record<'a>(buf: &mut &'a [u8]) -> Option<RecordView<'a>> {
    let mut at = 0;
    // A negative length is malformed (as a usize it would wrap).
    let len = usize::try_from(get_varlong(buf, &mut at)?).ok()?;
    let body = buf.get(at..at.checked_add(len)?)?;
    *buf = &buf[at + len..];
    let mut p = 1; // attributes
    let timestamp_delta = get_varlong(body, &mut p)?;
    let _offset_delta = get_varlong(body, &mut p)?;
    let key = get_bytes(body, &mut p)?;
    let value = get_bytes(body, &mut p)?;
    let n = get_varlong(body, &mut p)?;
    let mut headers = Vec::new();
    for _ in 0..n.max(0) {
        let k = get_bytes(body, &mut p)??;
        let v = get_bytes(body, &mut p)?;
        headers.push((k, v));
    }
    if p != body.len() {
        return None;
    }
    Some(RecordView {
        timestamp_delta,
        key,
        value,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kafka_protocol::records::RecordBatchDecoder;

    fn batch_of(values: &[Vec<u8>], codec: Compression) -> Sealed {
        let mut b = BatchWriter::new(1024);
        for (i, v) in values.iter().enumerate() {
            let r = b.begin(1_700_000_000_000 + i as i64, Some(b"key"));
            b.value(|buf| buf.extend_from_slice(v));
            b.header_count(1);
            b.header(b"h", b"v");
            b.end(r, 7, 100 + i as u64);
        }
        b.seal(codec)
    }

    #[test]
    fn an_independent_decoder_reads_what_the_writer_wrote() {
        // Lengths across every varint width boundary the fix-up handles.
        let values: Vec<Vec<u8>> = [0usize, 1, 63, 64, 65, 200, 8191, 8192, 70_000]
            .iter()
            .map(|&n| (0..n).map(|i| b'a' + (i % 26) as u8).collect())
            .collect();
        let sealed = batch_of(&values, Compression::None);
        assert_eq!(sealed.records, values.len() as u32);
        assert_eq!(
            sealed.acks,
            vec![AckRun {
                file: 7,
                first: 100,
                count: values.len() as u32
            }]
        );
        let mut bytes = Bytes::from(sealed.data);
        let set = RecordBatchDecoder::decode(&mut bytes).unwrap();
        assert_eq!(set.records.len(), values.len());
        for (i, (r, v)) in set.records.iter().zip(&values).enumerate() {
            assert_eq!(r.value.as_deref(), Some(&v[..]));
            assert_eq!(r.key.as_deref(), Some(&b"key"[..]));
            assert_eq!(r.offset, i as i64);
            assert_eq!(r.timestamp, 1_700_000_000_000 + i as i64);
            assert_eq!(r.headers.len(), 1);
        }
    }

    #[test]
    fn every_codec_round_trips_and_the_crc_covers_the_compressed_bytes() {
        let values: Vec<Vec<u8>> = (0..500)
            .map(|i| format!("line {i} of some log text that compresses well").into_bytes())
            .collect();
        let plain = batch_of(&values, Compression::None).data;
        for codec in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let data = batch_of(&values, codec).data;
            assert!(data.len() < plain.len() / 2, "{codec:?} compresses");
            let crc = u32::from_be_bytes(data[CRC_AT..CRC_AT + 4].try_into().unwrap());
            assert_eq!(crc, crc32c::crc32c(&data[ATTRIBUTES_AT..]));
            let attrs = i16::from_be_bytes(data[21..23].try_into().unwrap());
            let records = decompress(attrs, &data[HEADER_LEN..]).unwrap();
            assert_eq!(records, plain[HEADER_LEN..], "{codec:?}");
            let parsed = parse_records(&records).unwrap();
            assert_eq!(parsed.len(), 500);
            assert_eq!(parsed[499].value, Some(&values[499][..]));
            assert_eq!(parsed[3].headers, vec![(&b"h"[..], Some(&b"v"[..]))]);
        }
    }

    #[test]
    fn a_split_batch_keeps_every_record_in_order_with_its_acknowledgement() {
        let values: Vec<Vec<u8>> = (0..7).map(|i| format!("v{i}").into_bytes()).collect();
        for codec in [Compression::None, Compression::Zstd] {
            let s = batch_of(&values, codec);
            let [a, b] = split(&s.data, &s.acks, codec).unwrap();
            assert_eq!((a.records, b.records), (3, 4));
            assert_eq!(
                a.acks,
                vec![AckRun {
                    file: 7,
                    first: 100,
                    count: 3
                }]
            );
            assert_eq!(
                b.acks,
                vec![AckRun {
                    file: 7,
                    first: 103,
                    count: 4
                }]
            );
            let attrs = i16::from_be_bytes(b.data[21..23].try_into().unwrap());
            let recs = decompress(attrs, &b.data[HEADER_LEN..]).unwrap();
            let parsed = parse_records(&recs).unwrap();
            assert_eq!(parsed[0].value, Some(&b"v3"[..]));
            let base = i64::from_be_bytes(b.data[27..35].try_into().unwrap());
            assert_eq!(base + parsed[0].timestamp_delta, 1_700_000_000_003);
        }
    }

    #[test]
    fn a_negative_record_length_is_malformed_not_an_overflow() {
        // Found by `cargo xtask fuzz kafka`: a record length of -1 (zigzag
        // 0x01) was taken as usize::MAX, and `at + len` overflowed.
        assert_eq!(parse_records(&[0x01, 0x00]), None);
        assert_eq!(parse_records(&[0xf6, 0x01, 0x02, 0x00]), None);
        let mut b = BatchWriter::new(64);
        let r = b.begin(0, None);
        b.value(|v| v.push(b'x'));
        b.header_count(0);
        b.end(r, 1, 0);
        let mut data = b.seal(Compression::None).data[HEADER_LEN..].to_vec();
        assert_eq!(parse_records(&data).map(|r| r.len()), Some(1));
        // A second record whose length is the most negative varlong.
        data.extend([0xff; 9]);
        data.push(0x01);
        assert_eq!(parse_records(&data), None);
    }

    #[test]
    fn acknowledgement_runs_follow_files_and_gaps() {
        let mut b = BatchWriter::new(256);
        for (file, seq) in [(1, 5), (1, 6), (2, 0), (1, 7), (1, 9)] {
            let r = b.begin(0, None);
            b.value(|v| v.push(b'x'));
            b.header_count(0);
            b.end(r, file, seq);
        }
        let s = b.seal(Compression::None);
        let runs: Vec<_> = s.acks.iter().map(|r| (r.file, r.first, r.count)).collect();
        assert_eq!(runs, vec![(1, 5, 2), (2, 0, 1), (1, 7, 1), (1, 9, 1)]);
        let parsed = parse_records(&s.data[HEADER_LEN..]).unwrap();
        assert_eq!(parsed[0].key, None);
    }
}
