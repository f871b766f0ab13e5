//! Pod objects from the Kubernetes API (JSON, as the list-watch receives
//! them): what the agent keeps of them (`kube::PodInfo`), and what it
//! derives from them per container: declarations (env and annotations),
//! multiline rule, rate limit, opt-out, topics, the JSON members and Kafka
//! headers its records carry (`MetaContext::render`), and where declared
//! in-container paths lead on the node (`discover::volumes::resolve`).
//!
//! Input: the pod's JSON (the whole input).
//!
//! Checked: the cache keeps the pod and finds it by uid and container id;
//! every container's metadata renders to JSON members that make a valid
//! JSON object and Kafka headers that decode; a route's topic is a valid
//! topic; an annotation never raises the operator's rate limit; a declared
//! path resolves only to the pod's own emptyDir directory under the
//! kubelet's, or to an allowed, clean hostPath, with a pattern of plain
//! components (no `..`, `.` or `/` in one).
// `cargo test --bins` builds this with a test harness, which has its own main.
#![cfg_attr(not(test), no_main)]

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::{Arc, OnceLock};

use bpftail::config::{Globs, OutputFormat, TopicTemplate};
use bpftail::declare::{self, Source};
use bpftail::discover::{MetaContext, MultilineDefaults, Origin, Policy, declared, volumes};
use bpftail::kube::{PodCache, PodInfo};
use bpftail::tail::decode::Format;
use bpftail::tail::multiline::RuleCache;
use k8s_openapi::api::core::v1::Pod;

const KUBELET_PODS: &str = "/var/lib/kubelet/pods";
/// The operator's `--container-rate-limit`.
const OPERATOR_RATE: u64 = 10_000_000;

fn rules() -> &'static Arc<RuleCache> {
    static RULES: OnceLock<Arc<RuleCache>> = OnceLock::new();
    RULES.get_or_init(Arc::default)
}

fn allow_hostpath() -> &'static Globs {
    static G: OnceLock<Globs> = OnceLock::new();
    G.get_or_init(|| Globs::parse("allow-hostpath", "/var/log/*,/data/*/logs").expect("globs"))
}

fn context(pods: Arc<PodCache>, output: OutputFormat) -> MetaContext {
    MetaContext {
        topic: TopicTemplate::parse("k8s-{namespace}-{container}").expect("a template"),
        node: "node-1".into(),
        pods: Some(pods),
        labels: Globs::parse("labels", "app,team*").expect("globs"),
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
        rate_limit: Some(OPERATOR_RATE),
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(pod) = serde_json::from_slice::<Pod>(data) else {
        return;
    };
    let Some(info) = PodInfo::from_pod(&pod) else {
        assert!(pod.metadata.uid.is_none());
        return;
    };
    let cache = Arc::new(PodCache::default());
    assert!(cache.apply(info.clone()));
    assert!(!cache.apply(info.clone()), "an unchanged pod is a change");
    let kept = cache.pod(&info.uid).expect("the pod just applied");
    assert_eq!(*kept, info);
    for c in info.containers.iter().filter(|c| !c.id.is_empty()) {
        let by_id = cache
            .pod_of_container(&c.id)
            .expect("found by container id");
        assert_eq!(by_id.uid, info.uid);
    }
    let output = [
        OutputFormat::Json,
        OutputFormat::Logpilot,
        OutputFormat::Raw,
    ][info.uid.len() % 3];
    let ctx = context(cache.clone(), output);
    let annotations = || {
        info.annotations
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    };
    for c in &info.containers {
        let origin = Origin {
            namespace: info.namespace.clone().into(),
            pod: info.name.clone().into(),
            pod_uid: info.uid.clone().into(),
            container: c.name.clone().into(),
            ..Default::default()
        };
        let meta = ctx.render(origin.clone(), Format::Cri);
        assert!(meta.pod_info.as_ref().is_some_and(|p| **p == info));
        common::check_rendered(&meta);
        if let Some(r) = &meta.route {
            assert!(declare::valid_topic(&r.topic));
            assert_eq!(&*meta.topics[0], r.topic);
        }
        if let Some(l) = &meta.rate_limit {
            assert!(l.bytes_per_s > 0 && l.bytes_per_s <= OPERATOR_RATE);
        }
        assert_eq!(meta.excluded, declare::excluded(&c.name, annotations()));
        // The in-container files it declares.
        let d = ctx.declared(&origin, Some(&info));
        for x in &d.declarations {
            let Source::Path(glob) = &x.source else {
                continue;
            };
            let base = Path::new(KUBELET_PODS);
            if let Ok(r) = volumes::resolve(glob, &info, c, base, allow_hostpath()) {
                check_resolved(&r, &info);
            }
            let file = ctx.render(
                Origin {
                    declaration: Some(x.name.clone().into()),
                    ..origin.clone()
                },
                Format::Raw,
            );
            assert_eq!(file.route.as_ref().map(|r| &r.name), Some(&x.name));
            common::check_rendered(&file);
        }
    }
    let _ = declared::signature(&[kept], &ctx);
});

/// A resolved declared path stays within the pod's volume.
fn check_resolved(r: &volumes::Resolved, info: &PodInfo) {
    let plain = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('/');
    for p in &r.pattern {
        assert!(plain(p), "pattern component {p:?}");
    }
    let empty_dirs = Path::new(KUBELET_PODS)
        .join(&info.uid)
        .join("volumes/kubernetes.io~empty-dir");
    match r.base.strip_prefix(&empty_dirs) {
        Ok(volume) => {
            assert!(plain(&info.uid), "uid {:?}", info.uid);
            let v = volume.to_str().expect("UTF-8");
            assert!(plain(v), "volume {v:?}");
        }
        Err(_) => {
            let host = r.base.to_str().expect("UTF-8");
            assert!(host.starts_with('/') && !host.split('/').any(|c| c == ".."));
            assert!(
                allow_hostpath().matches(host),
                "hostPath {host:?} not allowed"
            );
            assert!(
                !r.base.starts_with(KUBELET_PODS),
                "hostPath into the kubelet's dir"
            );
        }
    }
}
