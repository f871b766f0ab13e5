//! How records look on the wire.
//!
//! What every record of a file shares is rendered once per file
//! ([`file_parts`]: the JSON members after time and stream, raw-format
//! headers, and the same headers already in Kafka's record-header
//! encoding); a record itself is rendered by [`render_json`] (for `--format
//! json` and `logpilot`) around its message, escaped 8 bytes at a time.

use crate::config::{Globs, OutputFormat};
use crate::declare::Declaration;
use crate::discover::{FileMeta, Origin};
use crate::kube::PodInfo;
use crate::metrics::Metrics;
use crate::tail::decode::Record;

/// What identifies the records of one file.
pub struct Subject<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub node: &'a str,
    pub origin: &'a Origin,
    /// The stdout topic.
    pub topic: &'a str,
    /// The declaration routing the file, if any (its tags go into records).
    pub route: Option<&'a Declaration>,
    /// The pod's metadata from the API, if known.
    pub pod_info: Option<&'a PodInfo>,
    /// Which pod labels and annotations records carry.
    pub labels: &'a Globs,
    pub annotations: &'a Globs,
}

/// The parts every record of a file shares, for its output format only
/// (the others are left empty).
#[derive(Debug, Default)]
pub struct FileParts {
    /// For JSON and log-pilot output: the members after time and stream,
    /// escaped.
    pub json_members: Box<[u8]>,
    /// For raw output: headers from namespace on, in Kafka's record-header
    /// encoding.
    pub kafka_headers: Box<[u8]>,
    pub kafka_header_count: u32,
    /// Tags dropped (named like a field of log-pilot's records).
    pub dropped_tags: usize,
}

fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Renders what the records of one file share.
pub fn file_parts(output: OutputFormat, s: &Subject<'_>) -> FileParts {
    let logpilot = output == OutputFormat::Logpilot;
    let mut json = String::new();
    let mut headers = Vec::new();
    if logpilot {
        logpilot_members(&mut json, s);
    } else {
        for (k, v) in [
            ("namespace", s.namespace),
            ("pod", s.pod),
            ("container", &s.origin.container),
            ("node", s.node),
        ] {
            json.push_str(&format!(",\"{k}\":{}", json_str(v)));
        }
    }
    let dropped_tags = s
        .route
        .map_or(0, |r| tags(&mut json, &mut headers, r, logpilot));
    // Pod metadata (log-pilot's records have none: not in logpilot).
    let pod_json = s
        .pod_info
        .map(|p| pod_members(&mut headers, p, s))
        .unwrap_or_default();
    if !logpilot {
        json.push_str(&pod_json);
    }
    // Only the encoding the output format uses is kept (a format change
    // renders every file's metadata again): at 10,000 files each is a
    // megabyte or more.
    if output != OutputFormat::Raw {
        return FileParts {
            json_members: json.into_bytes().into(),
            dropped_tags,
            ..FileParts::default()
        };
    }
    let mut kafka_headers = Vec::new();
    for (k, v) in [
        ("namespace", s.namespace),
        ("pod", s.pod),
        ("container", &*s.origin.container),
        ("node", s.node),
    ]
    .into_iter()
    .chain(
        headers
            .iter()
            .map(|(k, v): &(Box<str>, Box<str>)| (&**k, &**v)),
    ) {
        crate::kafka::batch::put_header(&mut kafka_headers, k.as_bytes(), v.as_bytes());
    }
    FileParts {
        json_members: Box::default(),
        kafka_header_count: u32::try_from(4 + headers.len()).unwrap_or(u32::MAX),
        kafka_headers: kafka_headers.into(),
        dropped_tags,
    }
}

/// log-pilot's fields: its consumers keep working.
fn logpilot_members(json: &mut String, s: &Subject<'_>) {
    let o = s.origin;
    let docker_container = if !o.docker_name.is_empty() {
        o.docker_name.to_string()
    } else if o.container_id.is_empty() {
        // As kubelet's dockershim named containers.
        format!(
            "k8s_{}_{}_{}_{}_{}",
            o.container, s.pod, s.namespace, o.pod_uid, o.attempt
        )
    } else {
        o.container.to_string()
    };
    let index = s.route.map_or(s.topic, |r| r.name.as_str());
    for (k, v) in [
        ("k8s_pod", s.pod),
        ("k8s_pod_namespace", s.namespace),
        ("k8s_container_name", &o.container),
        ("k8s_node_name", s.node),
        ("docker_container", &docker_container),
        ("topic", s.topic),
        ("index", index),
    ] {
        json.push_str(&format!(",\"{k}\":{}", json_str(v)));
    }
}

/// A declaration's tags: JSON members and `tag.` headers. Returns how many
/// were dropped.
fn tags(
    json: &mut String,
    headers: &mut Vec<(Box<str>, Box<str>)>,
    r: &Declaration,
    logpilot: bool,
) -> usize {
    if r.tags.is_empty() {
        return 0;
    }
    let mut dropped = 0;
    if logpilot {
        // Tags are top-level fields, as log-pilot sends them; one named
        // like a field above is dropped.
        const RESERVED: [&str; 10] = [
            "@timestamp",
            "message",
            "stream",
            "k8s_pod",
            "k8s_pod_namespace",
            "k8s_container_name",
            "k8s_node_name",
            "docker_container",
            "topic",
            "index",
        ];
        for (k, v) in &r.tags {
            if RESERVED.contains(&k.as_str()) {
                dropped += 1;
                continue;
            }
            json.push_str(&format!(",{}:{}", json_str(k), json_str(v)));
        }
    } else {
        json.push_str(",\"tags\":{");
        for (i, (k, v)) in r.tags.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&format!("{}:{}", json_str(k), json_str(v)));
        }
        json.push('}');
    }
    for (k, v) in &r.tags {
        headers.push((format!("tag.{k}").into(), v.as_str().into()));
    }
    dropped
}

/// The pod's metadata from the API: JSON members (returned) and headers.
fn pod_members(headers: &mut Vec<(Box<str>, Box<str>)>, p: &PodInfo, s: &Subject<'_>) -> String {
    let mut json = String::new();
    let c = p.container(&s.origin.container);
    let image = c.map_or("", |c| c.image.as_str());
    let id = match c {
        Some(c) if !c.id.is_empty() => c.id.as_str(),
        _ => &s.origin.container_id,
    };
    for (k, v) in [
        ("pod_uid", p.uid.as_str()),
        ("container_id", id),
        ("image", image),
    ] {
        if !v.is_empty() {
            json.push_str(&format!(",\"{k}\":{}", json_str(v)));
            headers.push((k.into(), v.into()));
        }
    }
    if let Some((kind, name)) = &p.owner {
        json.push_str(&format!(
            ",\"owner\":{{\"kind\":{},\"name\":{}}}",
            json_str(kind),
            json_str(name)
        ));
        headers.push(("owner_kind".into(), kind.as_str().into()));
        headers.push(("owner_name".into(), name.as_str().into()));
    }
    for (member, prefix, map, globs) in [
        ("labels", "label.", &p.labels, s.labels),
        ("annotations", "annotation.", &p.annotations, s.annotations),
    ] {
        let chosen: Vec<_> = map.iter().filter(|(k, _)| globs.matches(k)).collect();
        if chosen.is_empty() {
            continue;
        }
        json.push_str(&format!(",\"{member}\":{{"));
        for (i, (k, v)) in chosen.into_iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&format!("{}:{}", json_str(k), json_str(v)));
            headers.push((format!("{prefix}{k}").into(), v.as_str().into()));
        }
        json.push('}');
    }
    json
}

/// Appends `rec` as one JSON object (`--format json` or `logpilot`) to `v`.
pub fn render_json(
    v: &mut Vec<u8>,
    format: OutputFormat,
    meta: &FileMeta,
    rec: &Record<'_>,
    metrics: &Metrics,
) {
    v.extend_from_slice(if format == OutputFormat::Logpilot {
        b"{\"@timestamp\":\""
    } else {
        b"{\"time\":\""
    });
    if escape_json(v, rec.time) {
        metrics.invalid_utf8.inc();
    }
    v.extend_from_slice(b"\",\"stream\":\"");
    v.extend_from_slice(rec.stream.as_str().as_bytes());
    v.push(b'"');
    v.extend_from_slice(&meta.json_members);
    // `_format=json`: an object's fields go into the record in place of
    // the message; anything else is shipped as the message, counted.
    match meta.line_json().then(|| json_object_members(rec.msg)) {
        Some(Some(members)) => {
            if !members.is_empty() {
                v.push(b',');
                v.extend_from_slice(members);
            }
        }
        other => {
            if other.is_some() {
                metrics.json_lines_invalid.inc();
            }
            v.extend_from_slice(b",\"message\":\"");
            if escape_json(v, rec.msg) {
                metrics.invalid_utf8.inc();
            }
            v.push(b'"');
        }
    }
    if rec.partial {
        v.extend_from_slice(b",\"partial\":true");
    }
    if rec.truncated {
        v.extend_from_slice(b",\"truncated\":true");
    }
    v.push(b'}');
}

/// The members of a line that is one valid JSON object (the text between
/// its braces, trimmed); `None` if it is anything else.
fn json_object_members(line: &[u8]) -> Option<&[u8]> {
    let start = line.iter().position(|b| !b.is_ascii_whitespace())?;
    let end = line.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if line[start] != b'{' || line[end] != b'}' {
        return None;
    }
    // Spliced into the record as is: it must be valid UTF-8 too (skipping
    // parsers do not check string contents).
    std::str::from_utf8(line).ok()?;
    serde_json::from_slice::<serde::de::IgnoredAny>(line).ok()?;
    let inner = &line[start + 1..end];
    let a = inner.iter().position(|b| !b.is_ascii_whitespace());
    Some(match a {
        Some(a) => {
            let b = inner
                .iter()
                .rposition(|b| !b.is_ascii_whitespace())
                .unwrap_or(a);
            &inner[a..=b]
        }
        None => &[],
    })
}

/// Appends `s` as the inside of a JSON string. Invalid UTF-8 becomes
/// U+FFFD; returns true if there was any.
fn escape_json(out: &mut Vec<u8>, s: &[u8]) -> bool {
    match std::str::from_utf8(s) {
        Ok(text) => {
            escape_str(out, text);
            false
        }
        Err(_) => {
            escape_str(out, &String::from_utf8_lossy(s));
            true
        }
    }
}

/// True if any byte of the 8 in `w` is a control character, `"` or `\\`
/// (exact as a yes/no answer: the classic "has less than" and "has zero
/// byte" word tricks).
#[inline]
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (control | has_zero(w ^ (ONES * u64::from(b'"'))) | has_zero(w ^ (ONES * u64::from(b'\\'))))
        != 0
}

fn escape_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len());
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Skip 8 clean bytes at a time; most log text needs no escaping.
        if let Some(chunk) = bytes.get(i..i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            if !word_needs_escape(w) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 15) as usize],
            ]);
        } else {
            out.extend_from_slice(esc);
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_yield_their_members_and_anything_else_none() {
        assert_eq!(
            json_object_members(br#" {"a":1, "b":"x"} "#),
            Some(&br#""a":1, "b":"x""#[..])
        );
        assert_eq!(json_object_members(b"{}"), Some(&b""[..]));
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            b"{\"a\":1",
            b"{\"a\":1}}",
            b"{\"a\":1} trailing {}",
            b"\"str\"",
            b"",
            b"{\"a\":\"\xff\"}",
        ] {
            assert_eq!(
                json_object_members(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn json_escaping_is_valid_json_even_for_binary_junk() {
        let mut out = Vec::new();
        assert!(escape_json(&mut out, b"a\"b\\c\n\x00\x1f\xff\xfe z"));
        let s = format!("\"{}\"", String::from_utf8(out).unwrap());
        let v: String = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "a\"b\\c\n\u{0}\u{1f}\u{fffd}\u{fffd} z");
        let mut out = Vec::new();
        assert!(!escape_json(&mut out, "héllo ✓".as_bytes()));
        assert_eq!(out, "héllo ✓".as_bytes());
    }

    #[test]
    fn the_word_test_finds_every_byte_that_needs_escaping_and_no_other() {
        for b in 0..=255u8 {
            let needs = b < 0x20 || b == b'"' || b == b'\\';
            for pos in 0..8 {
                let mut w = [b'a'; 8];
                w[pos] = b;
                assert_eq!(
                    word_needs_escape(u64::from_le_bytes(w)),
                    needs,
                    "byte {b:#x} at {pos}"
                );
            }
        }
        // Escaping agrees with serde_json on text of every length.
        let text = "a\"b\\c\u{1}d\té ✓ plain text that is long enough for words\n";
        for end in 0..text.len() {
            if let Some(t) = text.get(..end) {
                let mut out = Vec::new();
                escape_str(&mut out, t);
                assert_eq!(
                    format!("\"{}\"", String::from_utf8(out).unwrap()),
                    serde_json::to_string(t).unwrap()
                );
            }
        }
    }
}
