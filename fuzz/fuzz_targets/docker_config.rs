//! A Docker container's `config.v2.json`, as the agent reads it beside a
//! json-file log (`discover::docker_config`): its name, labels (the
//! Kubernetes namespace, pod, uid and container) and environment
//! (log-pilot's `aliyun_logs_*` declarations). The daemon writes it, but a
//! node's disk holds whatever a crash, an old daemon or a hand left there.
//!
//! Input: the container id, a newline, then the file's bytes.
//!
//! Checked: the origin keeps the id; a file that is not JSON leaves the id
//! only; the Kubernetes labels, when present as strings, are what the
//! origin says; the origin renders (every output format) to JSON members
//! that make a valid JSON object and Kafka headers that decode; every
//! declaration its environment makes routes to a valid topic.
// `cargo test --bins` builds this with a test harness, which has its own main.
#![cfg_attr(not(test), no_main)]

#[path = "common/mod.rs"]
mod common;

use std::sync::{Arc, OnceLock};

use bpftail::config::{Globs, OutputFormat, TopicTemplate};
use bpftail::declare;
use bpftail::discover::{self, MetaContext, MultilineDefaults, Origin, Policy};
use bpftail::tail::decode::Format;
use bpftail::tail::multiline::RuleCache;

fn rules() -> &'static Arc<RuleCache> {
    static RULES: OnceLock<Arc<RuleCache>> = OnceLock::new();
    RULES.get_or_init(Arc::default)
}

fn context(output: OutputFormat) -> MetaContext {
    MetaContext {
        topic: TopicTemplate::parse("k8s-{namespace}-{container}").expect("a template"),
        node: "node-1".into(),
        pods: None,
        labels: Globs::parse("labels", "*").expect("globs"),
        annotations: Globs::parse("annotations", "*").expect("globs"),
        policy: Policy {
            output,
            topic_allow: Globs::parse("topic-allow", "k8s-*,app*,logs*").expect("globs"),
            ..Policy::default()
        },
        multiline: MultilineDefaults {
            rules: rules().clone(),
            ..Default::default()
        },
        rate_limit: None,
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (id, config) = match memchr::memchr(b'\n', data) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"0123456789abcdef"[..], data),
    };
    let id = String::from_utf8_lossy(id);
    let o = discover::docker_config(&id, config);
    assert_eq!(*o.container_id, *id);
    if serde_json::from_slice::<serde_json::Value>(config).is_err() {
        let bare = Origin {
            container_id: (*id).into(),
            container: id.get(..12).unwrap_or(&id).into(),
            ..Default::default()
        };
        assert_eq!(o, bare, "a config that is not JSON gave more than the id");
    }
    for (label, field) in [
        ("io.kubernetes.pod.namespace", &o.namespace),
        ("io.kubernetes.pod.name", &o.pod),
        ("io.kubernetes.pod.uid", &o.pod_uid),
        ("io.kubernetes.container.name", &o.container),
    ] {
        if let Some(v) = o.labels.get(label) {
            assert_eq!(v.as_str(), &**field, "{label}");
        }
    }
    for output in [
        OutputFormat::Json,
        OutputFormat::Logpilot,
        OutputFormat::Raw,
    ] {
        let ctx = context(output);
        let meta = ctx.render(o.clone(), Format::DockerJson);
        common::check_rendered(&meta);
        assert!(!meta.key().is_empty() || id.is_empty());
        for d in &ctx.declared(&o, None).declarations {
            assert!(declare::valid_topic(&d.topic), "{:?}", d.topic);
        }
    }
});
