//! Pod metadata from the Kubernetes API: a list-watch of the pods on this
//! node (field selector `spec.nodeName=<node>`) into a compact cache.
//!
//! - The watcher (kube-rs) lists, then watches from the list's
//!   resourceVersion with bookmarks; `410 Gone` makes it list again, and
//!   errors or dropped connections are retried with backoff. None of them
//!   stops the agent: while the API is unreachable the cache keeps what it
//!   had, and files whose pod it does not know carry the metadata their
//!   path gives.
//! - Only what records and declarations need is kept per pod ([`PodInfo`]),
//!   not the whole object: a node's cache stays a few hundred KB.
//! - A deleted pod stays in the cache for a grace period, so the last lines
//!   of its files (read after the deletion) are still enriched.
//! - Each change bumps [`PodCache::generation`] and wakes the data loop,
//!   which re-renders the metadata of the files of changed pods.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ::kube::runtime::WatchStreamExt as _;
use ::kube::runtime::watcher;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::metrics::{Metrics, RateLimit};

/// What bpftail keeps of a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The controller owner reference: (kind, name).
    pub owner: Option<(String, String)>,
    pub containers: Vec<ContainerInfo>,
    /// Volume name → where its files are on this node.
    pub volumes: BTreeMap<String, VolumeSource>,
}

/// A container of the pod (init and regular ones).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    pub image: String,
    /// Runtime id without its `containerd://` / `docker://` scheme; empty
    /// until the container started.
    pub id: String,
    /// Literal env values (declarations are read from these).
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Mount {
    pub volume: String,
    pub path: String,
    pub sub_path: String,
}

/// The kinds of volume whose files bpftail may follow.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VolumeSource {
    EmptyDir,
    HostPath(String),
    /// Anything else (configMap, PVC, …): files there are not followed.
    Other(&'static str),
}

impl PodInfo {
    /// The compact form of an API object.
    pub fn from_pod(pod: &Pod) -> Option<PodInfo> {
        let m = &pod.metadata;
        let uid = m.uid.clone()?;
        let owner = controller_owner(m);
        let ids = runtime_ids(pod);
        let mut containers = Vec::new();
        let mut volumes = BTreeMap::new();
        if let Some(spec) = &pod.spec {
            for c in spec
                .init_containers
                .iter()
                .flatten()
                .chain(spec.containers.iter())
            {
                containers.push(ContainerInfo::from_container(c, &ids));
            }
            for v in spec.volumes.iter().flatten() {
                volumes.insert(v.name.clone(), VolumeSource::of(v));
            }
        }
        Some(PodInfo {
            uid,
            namespace: m.namespace.clone().unwrap_or_default(),
            name: m.name.clone().unwrap_or_default(),
            labels: m.labels.clone().unwrap_or_default(),
            annotations: m.annotations.clone().unwrap_or_default(),
            owner,
            containers,
            volumes,
        })
    }

    pub fn container(&self, name: &str) -> Option<&ContainerInfo> {
        self.containers.iter().find(|c| c.name == name)
    }
}

/// The controller owner reference, as (kind, name).
fn controller_owner(m: &ObjectMeta) -> Option<(String, String)> {
    m.owner_references.as_ref().and_then(|refs| {
        refs.iter()
            .find(|r| r.controller == Some(true))
            .map(|r| (r.kind.clone(), r.name.clone()))
    })
}

/// Container name → runtime id (without its scheme), from the pod's
/// status: init, regular and ephemeral containers.
fn runtime_ids(pod: &Pod) -> HashMap<&str, &str> {
    let mut ids: HashMap<&str, &str> = HashMap::new();
    if let Some(st) = &pod.status {
        for s in [
            &st.init_container_statuses,
            &st.container_statuses,
            &st.ephemeral_container_statuses,
        ]
        .into_iter()
        .flatten()
        .flatten()
        {
            if let Some(id) = &s.container_id {
                ids.insert(
                    &s.name,
                    id.split_once("://").map_or(id.as_str(), |(_, i)| i),
                );
            }
        }
    }
    ids
}

impl ContainerInfo {
    /// What is kept of a container spec, with its runtime id from `ids`.
    fn from_container(c: &Container, ids: &HashMap<&str, &str>) -> ContainerInfo {
        ContainerInfo {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            id: ids.get(c.name.as_str()).copied().unwrap_or("").to_owned(),
            env: c
                .env
                .iter()
                .flatten()
                .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                .collect(),
            mounts: c
                .volume_mounts
                .iter()
                .flatten()
                .map(|v| Mount {
                    volume: v.name.clone(),
                    path: v.mount_path.clone(),
                    sub_path: v.sub_path.clone().unwrap_or_default(),
                })
                .collect(),
        }
    }
}

impl VolumeSource {
    /// The kind of a pod volume (the first source set, as the API allows
    /// only one).
    fn of(v: &Volume) -> VolumeSource {
        if v.empty_dir.is_some() {
            VolumeSource::EmptyDir
        } else if let Some(h) = &v.host_path {
            VolumeSource::HostPath(h.path.clone())
        } else if v.config_map.is_some() {
            VolumeSource::Other("configMap")
        } else if v.secret.is_some() {
            VolumeSource::Other("secret")
        } else if v.persistent_volume_claim.is_some() {
            VolumeSource::Other("persistentVolumeClaim")
        } else if v.projected.is_some() {
            VolumeSource::Other("projected")
        } else {
            VolumeSource::Other("unsupported")
        }
    }
}

#[derive(Debug)]
struct Entry {
    pod: Arc<PodInfo>,
    deleted: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    by_uid: HashMap<String, Entry>,
    /// Container runtime id → pod uid (Docker's logs are named by id).
    by_container: HashMap<String, String>,
}

impl Inner {
    fn insert(&mut self, pod: PodInfo) -> bool {
        if let Some(e) = self.by_uid.get(&pod.uid)
            && e.deleted.is_none()
            && *e.pod == pod
        {
            return false;
        }
        for c in &pod.containers {
            if !c.id.is_empty() {
                self.by_container.insert(c.id.clone(), pod.uid.clone());
            }
        }
        self.by_uid.insert(
            pod.uid.clone(),
            Entry {
                pod: Arc::new(pod),
                deleted: None,
            },
        );
        true
    }

    fn delete(&mut self, uid: &str, now: Instant) -> bool {
        match self.by_uid.get_mut(uid) {
            Some(e) if e.deleted.is_none() => {
                e.deleted = Some(now);
                true
            }
            _ => false,
        }
    }

    fn expire(&mut self, now: Instant, grace: Duration) -> bool {
        let before = self.by_uid.len();
        self.by_uid
            .retain(|_, e| e.deleted.is_none_or(|d| now.duration_since(d) < grace));
        let by_uid = &self.by_uid;
        self.by_container.retain(|_, uid| by_uid.contains_key(uid));
        self.by_uid.len() != before
    }
}

/// The pods of this node, shared by the watch task (writer) and the data
/// loop (reader).
#[derive(Debug, Default)]
pub struct PodCache {
    inner: RwLock<Inner>,
    generation: AtomicU64,
    synced: AtomicBool,
}

impl PodCache {
    /// The pod with this uid, live or deleted within the grace period.
    pub fn pod(&self, uid: &str) -> Option<Arc<PodInfo>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.by_uid.get(uid).map(|e| e.pod.clone())
    }

    /// The pod running the container with this runtime id.
    pub fn pod_of_container(&self, id: &str) -> Option<Arc<PodInfo>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let uid = inner.by_container.get(id)?;
        inner.by_uid.get(uid).map(|e| e.pod.clone())
    }

    /// The pods not deleted.
    pub fn live_pods(&self) -> Vec<Arc<PodInfo>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_uid
            .values()
            .filter(|e| e.deleted.is_none())
            .map(|e| e.pod.clone())
            .collect()
    }

    /// Changes with every update; cheap to poll.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a full list has been received at least once.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Pods kept, deleted ones included.
    pub fn len(&self) -> usize {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn update(&self, f: impl FnOnce(&mut Inner) -> bool) -> bool {
        let changed = {
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            f(&mut inner)
        };
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        changed
    }

    /// A pod was added or modified.
    pub fn apply(&self, pod: PodInfo) -> bool {
        self.update(|i| i.insert(pod))
    }

    /// A pod was deleted: kept for `grace` more.
    pub fn delete(&self, uid: &str, now: Instant) -> bool {
        self.update(|i| i.delete(uid, now))
    }

    /// A complete list: pods missing from it were deleted meanwhile.
    pub fn replace(&self, pods: Vec<PodInfo>, now: Instant) -> bool {
        self.synced.store(true, Ordering::Release);
        self.update(|i| {
            let listed: std::collections::HashSet<String> =
                pods.iter().map(|p| p.uid.clone()).collect();
            let mut changed = false;
            let gone: Vec<String> = i
                .by_uid
                .keys()
                .filter(|u| !listed.contains(*u))
                .cloned()
                .collect();
            for uid in gone {
                changed |= i.delete(&uid, now);
            }
            for p in pods {
                changed |= i.insert(p);
            }
            changed
        })
    }

    /// Forgets pods deleted more than `grace` ago.
    pub fn expire(&self, now: Instant, grace: Duration) -> bool {
        self.update(|i| i.expire(now, grace))
    }
}

/// Settings of the watch task.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    pub node: String,
    /// How long a deleted pod's metadata is kept.
    pub grace: Duration,
}

/// Why there is no API client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No usable in-cluster config or kubeconfig.
    #[error(transparent)]
    Config(#[from] ::kube::config::InferConfigError),
    /// The config was found but no client could be built from it.
    #[error(transparent)]
    Client(#[from] ::kube::Error),
}

/// Connects to the API server (in-cluster config, else `KUBECONFIG` or
/// `~/.kube/config`).
pub async fn client() -> Result<::kube::Client, ClientError> {
    let config = ::kube::Config::infer().await?;
    Ok(::kube::Client::try_from(config)?)
}

/// Lists and watches the node's pods into `cache` until the runtime stops;
/// `changed` is called after every change of the cache.
pub async fn watch(
    client: ::kube::Client,
    settings: WatchSettings,
    cache: Arc<PodCache>,
    metrics: Arc<Metrics>,
    changed: impl Fn(),
) {
    let stream = pod_stream(client, &settings.node);
    let mut stream = std::pin::pin!(stream);
    let mut expiry = expiry_interval(settings.grace);
    let mut w = PodWatch {
        settings,
        cache,
        metrics,
        changed,
        listing: Vec::new(),
        // One line per 30 s at most: an unreachable API server retries
        // with backoff, and must not flood the log.
        error_log: RateLimit::new(Duration::from_secs(30)),
    };
    loop {
        let event = tokio::select! {
            e = stream.next() => match e {
                Some(e) => e,
                None => return,
            },
            _ = expiry.tick() => {
                w.expire();
                continue;
            }
        };
        w.on_event(event);
    }
}

/// The watch of this node's pods, retried with kube-rs' default backoff.
fn pod_stream(
    client: ::kube::Client,
    node: &str,
) -> impl futures_util::Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + use<> {
    let api: ::kube::Api<Pod> = ::kube::Api::all(client);
    // any_semantic: the initial list is served from the API server's cache
    // (resourceVersion=0), not etcd; a DaemonSet lists once per node.
    let config = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .any_semantic();
    watcher(api, config).default_backoff()
}

/// How often deleted pods past their grace period are forgotten: every
/// 30 s, or the grace period if shorter, but at most once a second.
fn expiry_interval(grace: Duration) -> tokio::time::Interval {
    let mut expiry = tokio::time::interval(
        Duration::from_secs(30)
            .min(grace)
            .max(Duration::from_secs(1)),
    );
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    expiry
}

/// The state of [`watch`] between events.
struct PodWatch<F> {
    settings: WatchSettings,
    cache: Arc<PodCache>,
    metrics: Arc<Metrics>,
    changed: F,
    /// Pods of a list under way (between `Init` and `InitDone`).
    listing: Vec<PodInfo>,
    error_log: RateLimit,
}

impl<F: Fn()> PodWatch<F> {
    /// Forgets the pods deleted longer than the grace period ago.
    fn expire(&self) {
        if self.cache.expire(Instant::now(), self.settings.grace) {
            self.metrics.kube_pods.set(self.cache.len() as u64);
            self.metrics.kube_generation.set(self.cache.generation());
            (self.changed)();
        }
    }

    /// Takes one item of the watch stream: an event, or an error that is
    /// counted and logged (the stream retries by itself).
    fn on_event(&mut self, event: Result<watcher::Event<Pod>, watcher::Error>) {
        let now = Instant::now();
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                self.metrics.kube_watch_errors.inc();
                self.error_log.log(|suppressed| {
                    tracing::warn!(error = %e, suppressed, "pod watch failed; retrying with backoff (logs keep flowing with the metadata their paths give)");
                });
                return;
            }
        };
        self.metrics.kube_events.inc();
        if self.apply(event, now) {
            self.metrics.kube_pods.set(self.cache.len() as u64);
            self.metrics.kube_generation.set(self.cache.generation());
            self.metrics.kube_synced.set(u64::from(self.cache.synced()));
            (self.changed)();
        }
    }

    /// Applies one watch event to the cache; whether it changed (or the
    /// first list completed).
    fn apply(&mut self, event: watcher::Event<Pod>, now: Instant) -> bool {
        let cache = &self.cache;
        match event {
            watcher::Event::Init => {
                self.listing.clear();
                false
            }
            watcher::Event::InitApply(pod) => {
                self.listing.extend(PodInfo::from_pod(&pod));
                false
            }
            watcher::Event::InitDone => {
                let first = !cache.synced();
                let changed = cache.replace(std::mem::take(&mut self.listing), now);
                if first {
                    tracing::info!(pods = cache.len(), node = %self.settings.node, "pod list received");
                }
                changed || first
            }
            watcher::Event::Apply(pod) => PodInfo::from_pod(&pod).is_some_and(|p| cache.apply(p)),
            watcher::Event::Delete(pod) => pod
                .metadata
                .uid
                .as_deref()
                .is_some_and(|uid| cache.delete(uid, now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as the API server returns it (trimmed managedFields).
    pub const POD: &str = r#"{
      "apiVersion": "v1", "kind": "Pod",
      "metadata": {
        "name": "web-7d4b9c-x2x9z", "namespace": "shop", "uid": "0f6c7a52-2d55-4b1e-9b7e-6f3e2a1c9d10",
        "resourceVersion": "48213", "creationTimestamp": "2026-11-25T10:00:00Z",
        "labels": {"app": "web", "pod-template-hash": "7d4b9c"},
        "annotations": {"kubernetes.io/psp": "restricted"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c",
          "uid": "5b1f0d1e-0000-4000-8000-000000000001", "controller": true, "blockOwnerDeletion": true}]
      },
      "spec": {
        "nodeName": "node-1",
        "volumes": [
          {"name": "logs", "emptyDir": {}},
          {"name": "host", "hostPath": {"path": "/var/log/app", "type": "DirectoryOrCreate"}},
          {"name": "cfg", "configMap": {"name": "web"}}
        ],
        "initContainers": [{"name": "init", "image": "busybox:1.36"}],
        "containers": [{
          "name": "nginx", "image": "nginx:1.27",
          "env": [
            {"name": "aliyun_logs_access", "value": "/var/log/nginx/*.log"},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
          ],
          "volumeMounts": [{"name": "logs", "mountPath": "/var/log/nginx"}, {"name": "cfg", "mountPath": "/etc/nginx/conf.d", "readOnly": true}]
        }]
      },
      "status": {
        "phase": "Running",
        "initContainerStatuses": [{"name": "init", "ready": true, "restartCount": 0, "image": "busybox:1.36", "imageID": "", "containerID": "containerd://1111"}],
        "containerStatuses": [{"name": "nginx", "ready": true, "restartCount": 0, "image": "nginx:1.27", "imageID": "", "containerID": "containerd://abcdef0123"}]
      }
    }"#;

    fn pod() -> PodInfo {
        PodInfo::from_pod(&serde_json::from_str(POD).unwrap()).unwrap()
    }

    #[test]
    fn a_pod_object_maps_to_what_records_and_declarations_need() {
        let p = pod();
        assert_eq!(p.uid, "0f6c7a52-2d55-4b1e-9b7e-6f3e2a1c9d10");
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("shop", "web-7d4b9c-x2x9z")
        );
        assert_eq!(p.labels["app"], "web");
        assert_eq!(p.annotations["kubernetes.io/psp"], "restricted");
        assert_eq!(p.owner, Some(("ReplicaSet".into(), "web-7d4b9c".into())));
        assert_eq!(p.containers.len(), 2);
        let c = p.container("nginx").unwrap();
        assert_eq!(
            (c.image.as_str(), c.id.as_str()),
            ("nginx:1.27", "abcdef0123")
        );
        // valueFrom env has no literal value: not a declaration.
        assert_eq!(
            c.env,
            vec![("aliyun_logs_access".into(), "/var/log/nginx/*.log".into())]
        );
        assert_eq!(c.mounts[0].volume, "logs");
        assert_eq!(p.container("init").unwrap().id, "1111");
        assert_eq!(p.volumes["logs"], VolumeSource::EmptyDir);
        assert_eq!(
            p.volumes["host"],
            VolumeSource::HostPath("/var/log/app".into())
        );
        assert_eq!(p.volumes["cfg"], VolumeSource::Other("configMap"));
    }

    #[test]
    fn a_pod_without_uid_or_spec_is_handled() {
        let bare: Pod = serde_json::from_str(r#"{"metadata":{"name":"x"}}"#).unwrap();
        assert!(PodInfo::from_pod(&bare).is_none());
        let no_spec: Pod = serde_json::from_str(r#"{"metadata":{"name":"x","uid":"u"}}"#).unwrap();
        let p = PodInfo::from_pod(&no_spec).unwrap();
        assert!(p.containers.is_empty() && p.owner.is_none());
    }

    #[test]
    fn deleted_pods_stay_for_the_grace_period_and_relists_reconcile() {
        let cache = PodCache::default();
        let t0 = Instant::now();
        let p = pod();
        assert!(cache.apply(p.clone()));
        assert!(!cache.apply(p.clone()), "an unchanged pod is no change");
        let g = cache.generation();
        assert_eq!(cache.pod_of_container("abcdef0123").unwrap().name, p.name);
        assert!(cache.delete(&p.uid, t0));
        assert!(cache.generation() > g);
        let grace = Duration::from_secs(60);
        assert!(!cache.expire(t0 + Duration::from_secs(59), grace));
        assert!(cache.pod(&p.uid).is_some(), "still there within the grace");
        assert!(cache.expire(t0 + Duration::from_secs(61), grace));
        assert!(cache.pod(&p.uid).is_none());
        assert!(cache.pod_of_container("abcdef0123").is_none());

        // A relist (after 410 Gone) that no longer holds a pod deletes it.
        let mut other = p.clone();
        other.uid = "other".into();
        cache.apply(p.clone());
        cache.apply(other.clone());
        assert!(cache.replace(vec![other.clone()], t0));
        assert!(cache.synced());
        assert!(cache.pod(&p.uid).is_some(), "kept for the grace period");
        cache.expire(t0 + Duration::from_secs(61), grace);
        assert!(cache.pod(&p.uid).is_none());
        assert!(cache.pod("other").is_some());
        // A deleted pod that comes back (relist race) is live again.
        cache.delete("other", t0);
        cache.apply(other);
        cache.expire(t0 + Duration::from_secs(61), grace);
        assert!(cache.pod("other").is_some());
    }
}
