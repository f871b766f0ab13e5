//! log-pilot declarations (container env `aliyun_logs_<name>…`, Docker
//! labels `aliyun.logs.<name>…`) and bpftail's pod annotations
//! (`logs.bpftail.io/<container>.<name>…`, `bpftail.io/rate-limit…`,
//! `bpftail.io/exclude…`, `logs.bpftail.io/<container>.multiline`), parsed
//! and merged as discovery does.
//!
//! Input: the container's name (up to the first `\n`), the prefixes
//! (comma-separated, up to the next `\n`; none: `aliyun`), then one entry
//! per `\n`-separated piece: a selector byte, then `key=value`. The
//! selector's low 2 bits say where the entry is (0 env, 1 Docker labels,
//! 2 annotations, 3 env); bits 2-4 put a prefix before the key, so that
//! most inputs reach the parsing: 1 the first declaration prefix with its
//! `_logs_` (labels: `.logs.`; annotations: `logs.bpftail.io/<container>.`),
//! 2 `bpftail.io/rate-limit`, 3 `bpftail.io/rate-limit.<container>`,
//! 4 `bpftail.io/exclude`, 5 `bpftail.io/exclude.<container>`,
//! 6 `logs.bpftail.io/<container>.multiline`, others none.
//!
//! Checked: each declaration kept has a valid name, source, topic and
//! tags; names are unique and one declaration at most takes stdout;
//! merging keeps the first declaration of each name (a second stdout one
//! aside), and every one it leaves out is refused with a reason; a rate limit parsed is positive;
//! the annotation chosen for the rate limit is the container's own if any.
// `cargo test --bins` builds this with a test harness, which has its own main.
#![cfg_attr(not(test), no_main)]

use std::sync::OnceLock;

use bpftail::declare::{self, Declared, Source};
use bpftail::files::limits::parse_rate;
use bpftail::tail::multiline::RuleCache;
use bpftail_fuzz::{Cursor, text};

fn rules() -> &'static RuleCache {
    static RULES: OnceLock<RuleCache> = OnceLock::new();
    RULES.get_or_init(RuleCache::default)
}

fn pairs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// What every declaration kept must be.
fn check(d: &Declared) {
    let mut names = std::collections::HashSet::new();
    let mut stdout = 0;
    for x in &d.declarations {
        assert!(names.insert(x.name.as_str()), "{:?} twice", x.name);
        assert!(x.name.len() <= 200);
        assert!(
            x.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)),
            "name {:?}",
            x.name
        );
        assert!(declare::valid_topic(&x.topic), "topic {:?}", x.topic);
        match &x.source {
            Source::Stdout => stdout += 1,
            Source::Path(p) => {
                assert!(p.starts_with('/') && p.trim() == p, "path {p:?}");
                assert!(!p.split('/').any(|c| c == ".."), "path {p:?}");
            }
        }
        for (k, v) in &x.tags {
            assert!(!k.is_empty() && k.trim() == k && v.trim() == v);
            assert!(!k.chars().chain(v.chars()).any(char::is_control));
        }
        if let Some(m) = &x.multiline {
            assert_eq!(m.trim(), m);
        }
    }
    assert!(stdout <= 1, "{stdout} stdout declarations");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let container = text(c.until(b'\n'));
    let prefixes: Vec<String> = match text(c.until(b'\n')) {
        p if p.is_empty() => vec!["aliyun".into()],
        p => p.split(',').map(str::to_owned).collect(),
    };
    let (mut env, mut labels, mut annotations) = (Vec::new(), Vec::new(), Vec::new());
    while !c.is_empty() {
        let entry = c.until(b'\n');
        let (&sel, kv) = entry.split_first().unwrap_or((&0, b""));
        let kv = text(kv);
        let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
        let place = sel & 3;
        let prefix = match ((sel >> 2) & 7, place) {
            (1, 1) => format!("{}.logs.", prefixes[0]),
            (1, 2) => format!("logs.bpftail.io/{container}."),
            (1, _) => format!("{}_logs_", prefixes[0]),
            (2, _) => "bpftail.io/rate-limit".into(),
            (3, _) => format!("bpftail.io/rate-limit.{container}"),
            (4, _) => "bpftail.io/exclude".into(),
            (5, _) => format!("bpftail.io/exclude.{container}"),
            (6, _) => format!("logs.bpftail.io/{container}.multiline"),
            _ => String::new(),
        };
        let pair = (format!("{prefix}{k}"), v.to_owned());
        match place {
            1 => labels.push(pair),
            2 => annotations.push(pair),
            _ => env.push(pair),
        }
    }
    let (env, labels, annotations) = (pairs(&env), pairs(&labels), pairs(&annotations));
    let parts = [
        declare::from_env(&prefixes, env.iter().copied()),
        declare::from_labels(&prefixes, labels.iter().copied()),
        declare::from_annotations(&container, annotations.iter().copied()),
    ];
    for p in &parts {
        check(p);
    }
    let merged = declare::merge(parts.clone());
    check(&merged);
    // The first of each name is kept, unless it is a second stdout one.
    for d in &merged.declarations {
        for x in parts
            .iter()
            .flat_map(|p| &p.declarations)
            .filter(|x| x.name == d.name)
        {
            if x == d {
                break;
            }
            assert!(
                x.source == Source::Stdout && merged.stdout().is_some_and(|s| s.name != x.name),
                "merge did not keep the first {:?}",
                d.name
            );
        }
    }
    let given: usize = parts.iter().map(|p| p.declarations.len()).sum();
    let refused: usize = parts.iter().map(|p| p.refused.len()).sum();
    assert_eq!(
        merged.declarations.len() + merged.refused.len() - refused,
        given,
        "merge lost a declaration without refusing it"
    );
    assert!(merged.refused.iter().all(|r| !r.reason.is_empty()));
    assert_eq!(
        merged.bad_tags,
        parts.iter().map(|p| p.bad_tags).sum::<usize>()
    );
    let own = format!("bpftail.io/rate-limit.{container}");
    if let Some((k, v)) = declare::rate_limit_annotation(&container, annotations.iter().copied()) {
        assert!(k == own || k == "bpftail.io/rate-limit");
        if annotations.iter().any(|(k, _)| *k == own) {
            assert_eq!(k, own, "the container's own rate limit comes first");
        }
        if let Ok(Some(rate)) = parse_rate(v) {
            assert!(rate > 0);
        }
    }
    if let Some(rule) = declare::multiline_annotation(&container, annotations.iter().copied()) {
        let _ = rules().parse(rule);
    }
    for d in &merged.declarations {
        if let Some(rule) = &d.multiline {
            let _ = rules().parse(rule);
        }
    }
    let _ = declare::excluded(&container, annotations.iter().copied());
});
