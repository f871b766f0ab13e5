//! Log declarations: which of a container's logs to ship, where, with which
//! tags — part of discovery.
//!
//! - log-pilot's, unchanged: container env `<prefix>_logs_<name>=stdout|<path
//!   glob>`, with `<prefix>_logs_<name>_tags="k=v,k2=v2"`, `_target=<topic>`
//!   and `_format=none|json`; Docker labels `<prefix>.logs.<name>…` with `.`
//!   for `_`, and bpftail's `_multiline=<rule>` for the declared logs.
//!   Prefixes are configurable (`--declaration-prefixes`, default
//!   `aliyun`).
//! - bpftail's pod annotations, per container:
//!   `logs.bpftail.io/<container>.<name>: stdout|<path glob>` with the
//!   suffixes `.tags`, `.target`, `.format`, `.multiline`; the container's
//!   own log's multiline rule `logs.bpftail.io/<container>.multiline`; opt-out
//!   `bpftail.io/exclude: "true"` (whole pod) or
//!   `bpftail.io/exclude.<container>: "true"`.
//!
//! Guarantees: parsing never fails as a whole; each declaration that cannot
//! be honoured is returned as a [`Refusal`] with the reason (the caller logs
//! and counts it), and the others still apply.

use std::collections::BTreeMap;

/// What a declaration ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The container's stdout/stderr (its runtime log file).
    Stdout,
    /// Files inside the container matching an absolute path glob.
    Path(String),
}

/// `_format`: how each line is turned into a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LineFormat {
    #[default]
    Plain,
    /// The line is a JSON object whose fields are merged into the record.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    pub name: String,
    pub source: Source,
    pub tags: Vec<(String, String)>,
    /// The Kafka topic: `_target`, else the name.
    pub topic: String,
    pub format: LineFormat,
    /// `_multiline`: the rule joining its lines, as written (parsed, and
    /// refused if bad, where the file's metadata is rendered).
    pub multiline: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub name: String,
    pub reason: String,
}

/// The declarations of one container, and what was refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    pub declarations: Vec<Declaration>,
    pub refused: Vec<Refusal>,
    /// Tag entries dropped as garbage (the declaration itself stands).
    pub bad_tags: usize,
}

impl Declared {
    /// The declaration that routes the container's stdout, if any.
    pub fn stdout(&self) -> Option<&Declaration> {
        self.declarations
            .iter()
            .find(|d| d.source == Source::Stdout)
    }
}

#[derive(Default)]
struct Raw {
    value: Option<String>,
    tags: Option<String>,
    target: Option<String>,
    format: Option<String>,
    multiline: Option<String>,
}

/// Kafka's topic rule: 1–249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn split_option(rest: &str, sep: char) -> (&str, Option<&'static str>) {
    for opt in ["tags", "target", "format", "multiline"] {
        if let Some(name) = rest
            .strip_suffix(opt)
            .and_then(|r| r.strip_suffix(sep))
            .filter(|n| !n.is_empty())
        {
            return (name, Some(opt));
        }
    }
    (rest, None)
}

fn collect<'a>(
    items: impl Iterator<Item = (&'a str, &'a str)>,
    // Returns (declaration name, option) for a key that declares.
    key: impl Fn(&'a str) -> Option<(&'a str, Option<&'static str>)>,
) -> BTreeMap<String, Raw> {
    let mut raw: BTreeMap<String, Raw> = BTreeMap::new();
    for (k, v) in items {
        let Some((name, opt)) = key(k) else { continue };
        let r = raw.entry(name.to_owned()).or_default();
        let slot = match opt {
            None => &mut r.value,
            Some("tags") => &mut r.tags,
            Some("target") => &mut r.target,
            Some("multiline") => &mut r.multiline,
            _ => &mut r.format,
        };
        *slot = Some(v.to_owned());
    }
    raw
}

/// Checks each raw declaration: the valid ones, and the reasons for the
/// others.
fn build(raw: BTreeMap<String, Raw>) -> Declared {
    let mut out = Declared::default();
    for (name, r) in raw {
        match declaration(&name, r) {
            Ok((d, bad_tags)) => {
                out.bad_tags += bad_tags;
                out.declarations.push(d);
            }
            Err(reason) => out.refused.push(Refusal { name, reason }),
        }
    }
    // One destination per source: a second stdout declaration is refused.
    merge([out])
}

/// One declaration from its raw parts, with the number of garbage tag
/// entries dropped; or why it is refused.
fn declaration(name: &str, r: Raw) -> Result<(Declaration, usize), String> {
    let Some(value) = r.value else {
        return Err(
            "options (_tags/_target/_format/_multiline) without the declaration itself".into(),
        );
    };
    check_name(name)?;
    let source = parse_source(&value)?;
    let format = parse_format(r.format.as_deref())?;
    let topic = parse_topic(r.target.as_deref(), name)?;
    let (tags, bad_tags) = parse_tags(r.tags.as_deref());
    let d = Declaration {
        name: name.to_owned(),
        source,
        tags,
        topic,
        format,
        multiline: r.multiline.map(|m| m.trim().to_owned()),
    };
    Ok((d, bad_tags))
}

/// A declaration name: letters, digits, `.`, `_`, `-`; at most 200.
fn check_name(name: &str) -> Result<(), String> {
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        || name.len() > 200
    {
        return Err("name: use letters, digits, '.', '_' or '-' (at most 200)".into());
    }
    Ok(())
}

/// The declared value: `stdout`, or an absolute path glob without `..`.
fn parse_source(value: &str) -> Result<Source, String> {
    let value = value.trim();
    if value == "stdout" {
        Ok(Source::Stdout)
    } else if value.is_empty() {
        Err("empty value: use stdout or an absolute path".into())
    } else if !value.starts_with('/') {
        Err(format!("{value:?} is neither stdout nor an absolute path"))
    } else if value.split('/').any(|c| c == "..") {
        Err(format!("{value:?}: '..' is not allowed in a path"))
    } else {
        Ok(Source::Path(value.to_owned()))
    }
}

/// `_format`: none (or unset) or json.
fn parse_format(format: Option<&str>) -> Result<LineFormat, String> {
    match format.map(str::trim) {
        None | Some("") | Some("none") => Ok(LineFormat::Plain),
        Some("json") => Ok(LineFormat::Json),
        Some(other) => Err(format!("format {other:?}: use none or json")),
    }
}

/// The topic: `_target` if set, else the declaration's name; a valid
/// Kafka topic either way.
fn parse_topic(target: Option<&str>, name: &str) -> Result<String, String> {
    let topic = target
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .unwrap_or(name)
        .to_owned();
    if !valid_topic(&topic) {
        return Err(format!(
            "topic {topic:?} is not a valid Kafka topic (1-249 of a-z A-Z 0-9 . _ -)"
        ));
    }
    Ok(topic)
}

/// `_tags` (`k=v,k2=v2`): the pairs kept, and how many entries were
/// garbage (no key, or control characters).
fn parse_tags(tags: Option<&str>) -> (Vec<(String, String)>, usize) {
    let mut kept = Vec::new();
    let mut bad = 0;
    for t in tags.unwrap_or("").split(',') {
        let t = t.trim();
        if t.is_empty() {
            continue;
        }
        match t.split_once('=') {
            Some((k, v))
                if !k.trim().is_empty()
                    && !k.trim().chars().any(char::is_control)
                    && !v.chars().any(char::is_control) =>
            {
                kept.push((k.trim().to_owned(), v.trim().to_owned()))
            }
            _ => bad += 1,
        }
    }
    (kept, bad)
}

/// log-pilot declarations in env (`NAME=value` pairs): `<prefix>_logs_…`.
pub fn from_env<'a>(
    prefixes: &[String],
    env: impl Iterator<Item = (&'a str, &'a str)>,
) -> Declared {
    from_prefixed(prefixes, env, '_')
}

/// log-pilot declarations in Docker labels: `<prefix>.logs.…`.
pub fn from_labels<'a>(
    prefixes: &[String],
    labels: impl Iterator<Item = (&'a str, &'a str)>,
) -> Declared {
    from_prefixed(prefixes, labels, '.')
}

/// `<prefix><sep>logs<sep><name>[<sep>tags|target|format]` keys.
fn from_prefixed<'a>(
    prefixes: &[String],
    items: impl Iterator<Item = (&'a str, &'a str)>,
    sep: char,
) -> Declared {
    let infix = format!("{sep}logs{sep}");
    build(collect(items, |k| {
        prefixes.iter().find_map(|p| {
            let rest = k.strip_prefix(p.as_str())?.strip_prefix(infix.as_str())?;
            (!rest.is_empty()).then(|| split_option(rest, sep))
        })
    }))
}

/// bpftail's pod annotations for `container`:
/// `logs.bpftail.io/<container>.<name>[.tags|.target|.format|.multiline]`
/// (`logs.bpftail.io/<container>.multiline` is not a declaration: see
/// [`multiline_annotation`]).
pub fn from_annotations<'a>(
    container: &str,
    annotations: impl Iterator<Item = (&'a str, &'a str)>,
) -> Declared {
    build(collect(annotations, |k| {
        let rest = annotation_rest(k, container)?;
        (!rest.is_empty() && rest != "multiline").then(|| split_option(rest, '.'))
    }))
}

/// What follows `logs.bpftail.io/<container>.` in `key`.
fn annotation_rest<'a>(key: &'a str, container: &str) -> Option<&'a str> {
    key.strip_prefix("logs.bpftail.io/")?
        .strip_prefix(container)?
        .strip_prefix('.')
}

/// The rate limit a pod's annotations set for `container`:
/// `bpftail.io/rate-limit.<container>`, else `bpftail.io/rate-limit`; as
/// (key, value).
pub fn rate_limit_annotation<'a>(
    container: &str,
    annotations: impl Iterator<Item = (&'a str, &'a str)> + Clone,
) -> Option<(&'a str, &'a str)> {
    let own = format!("bpftail.io/rate-limit.{container}");
    annotations.clone().find(|(k, _)| *k == own).or_else(|| {
        annotations
            .into_iter()
            .find(|(k, _)| *k == "bpftail.io/rate-limit")
    })
}

/// The multiline rule a pod's annotation `logs.bpftail.io/<container>.multiline`
/// chooses for the container's own log, as written.
pub fn multiline_annotation<'a>(
    container: &str,
    mut annotations: impl Iterator<Item = (&'a str, &'a str)>,
) -> Option<&'a str> {
    annotations
        .find(|(k, _)| annotation_rest(k, container) == Some("multiline"))
        .map(|(_, v)| v)
}

/// Merges declarations of several origins; earlier ones win per name.
pub fn merge(parts: impl IntoIterator<Item = Declared>) -> Declared {
    let mut out = Declared::default();
    let mut stdout = false;
    for p in parts {
        out.refused.extend(p.refused);
        out.bad_tags += p.bad_tags;
        for d in p.declarations {
            if out.declarations.iter().any(|e| e.name == d.name) {
                out.refused.push(Refusal {
                    name: d.name,
                    reason: "declared twice (env/labels and annotations); the first one counts"
                        .into(),
                });
                continue;
            }
            if d.source == Source::Stdout {
                if stdout {
                    out.refused.push(Refusal {
                        name: d.name,
                        reason: "a second stdout declaration for the same container".into(),
                    });
                    continue;
                }
                stdout = true;
            }
            out.declarations.push(d);
        }
    }
    out
}

/// Whether the pod's annotations opt `container` out of shipping.
pub fn excluded<'a>(
    container: &str,
    mut annotations: impl Iterator<Item = (&'a str, &'a str)>,
) -> bool {
    let per_container = format!("bpftail.io/exclude.{container}");
    annotations.any(|(k, v)| {
        (k == "bpftail.io/exclude" || k == per_container) && v.trim().eq_ignore_ascii_case("true")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&'static str, &'static str)]) -> Declared {
        from_env(&["aliyun".into()], pairs.iter().copied())
    }

    #[test]
    fn log_pilot_env_declarations_parse_with_their_options() {
        let d = env(&[
            ("aliyun_logs_app", "stdout"),
            ("aliyun_logs_app_tags", "team=pay, env=prod"),
            ("aliyun_logs_access", "/var/log/nginx/*.log"),
            ("aliyun_logs_access_target", "nginx-access"),
            ("aliyun_logs_access_format", "json"),
            ("PATH", "/usr/bin"),
        ]);
        assert!(d.refused.is_empty(), "{:?}", d.refused);
        let app = d.stdout().unwrap();
        assert_eq!(app.topic, "app");
        assert_eq!(
            app.tags,
            vec![("team".into(), "pay".into()), ("env".into(), "prod".into())]
        );
        let access = d.declarations.iter().find(|x| x.name == "access").unwrap();
        assert_eq!(access.source, Source::Path("/var/log/nginx/*.log".into()));
        assert_eq!(access.topic, "nginx-access");
        assert_eq!(access.format, LineFormat::Json);
    }

    #[test]
    fn docker_labels_custom_prefixes_and_annotations() {
        let prefixes = vec!["aliyun".to_string(), "corp".to_string()];
        let d = from_labels(
            &prefixes,
            [
                ("corp.logs.web", "stdout"),
                ("corp.logs.web.tags", "a=b"),
                ("other.logs.x", "stdout"),
            ]
            .into_iter(),
        );
        assert_eq!(d.stdout().unwrap().name, "web");
        assert_eq!(d.stdout().unwrap().tags, vec![("a".into(), "b".into())]);
        let d = from_env(&prefixes, [("corp_logs_x", "stdout")].into_iter());
        assert_eq!(d.stdout().unwrap().topic, "x");
        let a = from_annotations(
            "app",
            [
                ("logs.bpftail.io/app.main", "stdout"),
                ("logs.bpftail.io/app.main.target", "t1"),
                ("logs.bpftail.io/sidecar.other", "stdout"),
            ]
            .into_iter(),
        );
        assert_eq!(a.declarations.len(), 1);
        assert_eq!(a.stdout().unwrap().topic, "t1");
        assert!(excluded(
            "app",
            [("bpftail.io/exclude", "true")].into_iter()
        ));
        assert!(excluded(
            "app",
            [("bpftail.io/exclude.app", "True")].into_iter()
        ));
        assert!(!excluded(
            "app",
            [("bpftail.io/exclude.web", "true")].into_iter()
        ));
        assert!(!excluded(
            "app",
            [("bpftail.io/exclude", "false")].into_iter()
        ));
    }

    #[test]
    fn bad_declarations_are_refused_one_by_one() {
        let d = env(&[
            ("aliyun_logs_empty", ""),
            ("aliyun_logs_rel", "var/log/x.log"),
            ("aliyun_logs_up", "/var/log/../../etc/*"),
            ("aliyun_logs_bad$name", "stdout"),
            ("aliyun_logs_fmt", "stdout"),
            ("aliyun_logs_fmt_format", "xml"),
            ("aliyun_logs_topic", "stdout"),
            ("aliyun_logs_topic_target", "no/slashes"),
            ("aliyun_logs_orphan_tags", "a=b"),
            ("aliyun_logs_ok", "stdout"),
            ("aliyun_logs_ok_tags", "good=1,garbage,=x,k=\u{1}"),
            ("aliyun_logs_second", "stdout"),
        ]);
        let refused: Vec<&str> = d.refused.iter().map(|r| r.name.as_str()).collect();
        for name in [
            "empty", "rel", "up", "bad$name", "fmt", "topic", "orphan", "second",
        ] {
            assert!(
                refused.contains(&name),
                "{name} not refused: {:?}",
                d.refused
            );
        }
        assert_eq!(d.declarations.len(), 1);
        assert_eq!(d.stdout().unwrap().tags, vec![("good".into(), "1".into())]);
        assert_eq!(d.bad_tags, 3);
    }

    #[test]
    fn merging_keeps_the_first_of_each_name() {
        let a = env(&[("aliyun_logs_x", "stdout")]);
        let b = from_annotations("c", [("logs.bpftail.io/c.x", "/a/*.log")].into_iter());
        let m = merge([a, b]);
        assert_eq!(m.declarations.len(), 1);
        assert_eq!(m.refused.len(), 1);
    }
}
