//! Discovery: which log files exist on this node, and what they belong to.
//!
//! - CRI layout (containerd, CRI-O, cri-dockerd):
//!   `<pods-dir>/<namespace>_<pod>_<pod-uid>/<container>/<restart>.log`,
//!   kubelet-rotated siblings `<restart>.log.<timestamp>` (gzipped ones are
//!   ignored). Namespace, pod, uid, container and restart come from the path.
//! - Docker json-file: `<docker-dir>/<id>/<id>-json.log` (rotated:
//!   `-json.log.N`), with name, labels (`io.kubernetes.*` among them) and env
//!   from `config.v2.json` beside it.
//!
//! Guarantees: a directory that does not exist yields nothing (a containerd
//! node has no Docker dir); unreadable entries are skipped and reported in
//! [`Scan::errors`], never fatal. Discovery only lists; it opens no log file.

pub mod declared;
pub mod volumes;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Globs, OutputFormat, ShipMode, TopicTemplate, TopicVars};
use crate::declare::{self, Declaration, Declared, LineFormat, Refusal};
use crate::files::StreamId;
use crate::files::limits::{RateLimit, parse_rate};
use crate::fs::{Fs, Want};
use crate::kube::{PodCache, PodInfo};
use crate::tail::decode::{Format, Stream};
use crate::tail::multiline::{Multiline, Rule, RuleCache};

/// What every record of one file carries, rendered once per file (and again
/// when its pod's metadata changes).
#[derive(Debug)]
pub struct FileMeta {
    pub format: Format,
    /// The container stream (pod uid + container, see [`StreamId::of`]),
    /// shared with the files of that stream; its bytes are the Kafka key
    /// ([`FileMeta::key`]), so one container's lines share a partition and
    /// keep their order. Taken from the path only, so it never changes
    /// while a file is read.
    pub stream: StreamId,
    /// Rendered topic per stream (`Stream as usize`); a literal `--topic`
    /// is shared by every file.
    pub topics: [Arc<str>; 2],
    /// For `--format json`: the `"namespace":…,"node":…` members, escaped.
    pub json_members: Box<[u8]>,
    /// For `--format raw`: the headers from namespace on (namespace, pod,
    /// container, node, then pod uid, owner, image, selected labels and
    /// annotations), already in Kafka's record-header encoding, and how
    /// many they are: the native client copies them into each record
    /// whole, rdkafka reads them back ([`FileMeta::raw_headers`]).
    pub kafka_headers: Box<[u8]>,
    pub kafka_header_count: u32,
    /// What discovery found (re-rendering starts from it); shared with the
    /// listing and with the container's other files.
    pub origin: Arc<Origin>,
    /// The pod metadata this was rendered with; `None`: the path's only.
    pub pod_info: Option<Arc<PodInfo>>,
    /// The declaration routing this container's stdout (topic, tags,
    /// format), if any (boxed: most containers have none).
    pub route: Option<Box<Declaration>>,
    /// How its records are joined into multiline records (`None`: not;
    /// boxed, as the rest of what few files have: 10,000 files are read).
    pub multiline: Option<Box<Multiline>>,
    /// How fast its container may be read (`None`: no limit).
    pub rate_limit: Option<Box<RateLimit>>,
    /// The pod's annotations opt this container out.
    pub excluded: bool,
    /// Not to be shipped: opted out, or undeclared under `--ship
    /// declared` (a file that became so while followed is read on, its
    /// records discarded, so its offset keeps up).
    pub suppressed: bool,
    /// Declarations of this container that were refused, and garbage tags.
    pub refused: Box<[Refusal]>,
    pub bad_tags: u32,
}

impl FileMeta {
    /// The namespace its records carry: the path's, else the API's.
    pub fn namespace(&self) -> &str {
        names(&self.origin, self.pod_info.as_deref()).0
    }

    /// The pod name its records carry: the path's, else the API's.
    pub fn pod(&self) -> &str {
        names(&self.origin, self.pod_info.as_deref()).1
    }

    pub fn container(&self) -> &str {
        &self.origin.container
    }

    /// Why a file with this metadata is not shipped, if it is not: opted
    /// out, or undeclared when only declared containers ship.
    pub fn skip_reason(&self, ship: ShipMode) -> Option<&'static str> {
        if self.excluded {
            Some("opted out by the pod's bpftail.io/exclude annotation")
        } else if ship == ShipMode::Declared && self.route.is_none() {
            Some("no stdout declaration (--ship declared)")
        } else {
            None
        }
    }

    /// Lines are JSON objects whose fields go into the record (`_format=json`).
    pub fn line_json(&self) -> bool {
        self.route
            .as_ref()
            .is_some_and(|r| r.format == LineFormat::Json)
    }
}

/// What the operator decided about declarations and output.
#[derive(Debug, Clone)]
pub struct Policy {
    pub output: OutputFormat,
    pub ship: ShipMode,
    pub prefixes: Vec<String>,
    pub topic_allow: Globs,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            output: OutputFormat::Json,
            ship: ShipMode::All,
            prefixes: vec!["aliyun".into()],
            topic_allow: Globs::parse("topic-allow", "*").expect("a valid glob"),
        }
    }
}

impl FileMeta {
    pub fn topic(&self, stream: Stream) -> &str {
        &self.topics[stream as usize]
    }

    /// For `--format raw`: the headers its records carry after time and
    /// stream, as (key, value).
    pub fn raw_headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        crate::kafka::batch::headers_in(&self.kafka_headers)
    }

    /// The Kafka message key of its records: its container stream.
    pub fn key(&self) -> &[u8] {
        self.stream.as_bytes()
    }
}

/// Everything needed to render per-file metadata.
#[derive(Debug, Clone)]
pub struct MetaContext {
    pub topic: TopicTemplate,
    pub node: String,
    /// Pods of this node from the Kubernetes API (`None`: `--kube off`).
    pub pods: Option<Arc<PodCache>>,
    /// Which pod labels and annotations records carry.
    pub labels: Globs,
    pub annotations: Globs,
    pub policy: Policy,
    /// `--multiline` and its limits: the rule of files that choose none.
    pub multiline: MultilineDefaults,
    /// `--container-rate-limit`, bytes per second (annotations may lower it).
    pub rate_limit: Option<u64>,
}

/// The operator's multiline setting: the default rule and the limits
/// every rule gets.
#[derive(Debug, Clone)]
pub struct MultilineDefaults {
    pub rule: Option<Arc<Rule>>,
    pub max_lines: usize,
    pub timeout: std::time::Duration,
    /// The rules pods chose, each compiled once.
    pub rules: Arc<RuleCache>,
}

impl Default for MultilineDefaults {
    fn default() -> MultilineDefaults {
        MultilineDefaults {
            rule: None,
            max_lines: 500,
            timeout: std::time::Duration::from_secs(1),
            rules: Arc::default(),
        }
    }
}

/// The identity fields discovery finds for a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
///
/// Strings are boxed, not `String`s: one is kept per container, and at
/// 10,000 files the capacity words were 0.6 MiB.
pub struct Origin {
    pub namespace: Box<str>,
    pub pod: Box<str>,
    pub pod_uid: Box<str>,
    pub container: Box<str>,
    pub container_id: Box<str>,
    pub labels: BTreeMap<String, String>,
    pub env: Box<[String]>,
    /// The container's restart count (CRI: the file name `<n>.log`).
    pub attempt: u32,
    /// For an in-container file: the declaration that named it.
    pub declaration: Option<Box<str>>,
    /// Docker's container name (`config.v2.json` `Name`, without `/`).
    pub docker_name: Box<str>,
}

impl MetaContext {
    /// The pod a file belongs to, if the cache knows it: by the uid in a
    /// CRI path, else by a Docker log's container id.
    pub fn pod_of(&self, o: &Origin) -> Option<Arc<PodInfo>> {
        let cache = self.pods.as_ref()?;
        if !o.pod_uid.is_empty()
            && let Some(p) = cache.pod(&o.pod_uid)
        {
            return Some(p);
        }
        if o.container_id.is_empty() {
            return None;
        }
        cache.pod_of_container(&o.container_id)
    }

    /// The declarations that apply to a file's container: log-pilot env and
    /// Docker labels (from `config.v2.json` for Docker logs, from the API for
    /// CRI ones) and bpftail's annotations; topics outside the allow-list
    /// are refused.
    pub fn declared(&self, o: &Origin, pod: Option<&PodInfo>) -> Declared {
        let prefixes = &self.policy.prefixes;
        let mut parts = Vec::new();
        if !o.env.is_empty() || !o.labels.is_empty() {
            parts.push(declare::from_env(
                prefixes,
                o.env.iter().filter_map(|e| e.split_once('=')),
            ));
            parts.push(declare::from_labels(
                prefixes,
                o.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ));
        } else if let Some(c) = pod.and_then(|p| p.container(&o.container)) {
            parts.push(declare::from_env(
                prefixes,
                c.env.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ));
        }
        if let Some(p) = pod {
            parts.push(declare::from_annotations(
                &o.container,
                p.annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ));
        }
        let mut d = declare::merge(parts);
        let allow = &self.policy.topic_allow;
        let (kept, denied): (Vec<_>, Vec<_>) = std::mem::take(&mut d.declarations)
            .into_iter()
            .partition(|x| allow.matches(&x.topic));
        d.declarations = kept;
        d.refused.extend(denied.into_iter().map(|x| Refusal {
            reason: format!(
                "topic {:?} is not in the operator's allow-list (--topic-allow)",
                x.topic
            ),
            name: x.name,
        }));
        d
    }

    /// `meta` rendered again if its pod's metadata changed since (`None`:
    /// unchanged; or the pod's entry expired after its deletion, and its
    /// files keep the metadata they had).
    pub fn rerender(&self, meta: &FileMeta) -> Option<FileMeta> {
        let pod = self.pod_of(&meta.origin)?;
        if meta.pod_info.as_ref().is_some_and(|p| Arc::ptr_eq(p, &pod)) {
            return None;
        }
        Some(self.render(meta.origin.clone(), meta.format))
    }

    /// A file's metadata: its pod, the declaration routing it, its topics
    /// and stream key, and the fields and headers its records carry.
    pub fn render(&self, o: impl Into<Arc<Origin>>, format: Format) -> FileMeta {
        let o: Arc<Origin> = o.into();
        let pod = self.pod_of(&o);
        let declared = self.declared(&o, pod.as_deref());
        let route = route(&o, &declared);
        let excluded = pod.as_ref().is_some_and(|p| {
            declare::excluded(
                &o.container,
                p.annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )
        });
        let mut refused = declared.refused;
        let multiline = self.multiline_of(&o, pod.as_deref(), route.as_ref(), &mut refused);
        let rate_limit = self.rate_limit_of(&o, pod.as_deref(), &mut refused);
        let (namespace, pod_name) = names(&o, pod.as_deref());
        let vars = TopicVars {
            namespace,
            pod: pod_name,
            container: &o.container,
        };
        let [stdout, stderr] = self.topics(route.as_ref(), &vars);
        let stream = StreamId::of(&o);
        let parts = crate::sink::render::file_parts(
            self.policy.output,
            &crate::sink::render::Subject {
                namespace,
                pod: pod_name,
                node: &self.node,
                origin: &o,
                topic: &stdout,
                route: route.as_ref(),
                pod_info: pod.as_deref(),
                labels: &self.labels,
                annotations: &self.annotations,
            },
        );
        FileMeta {
            kafka_header_count: parts.kafka_header_count,
            kafka_headers: parts.kafka_headers,
            format,
            stream,
            topics: [stdout, stderr],
            json_members: parts.json_members,
            origin: o,
            pod_info: pod,
            suppressed: excluded || (self.policy.ship == ShipMode::Declared && route.is_none()),
            route: route.map(Box::new),
            excluded,
            multiline: multiline.map(Box::new),
            rate_limit: rate_limit.map(Box::new),
            refused: refused.into_boxed_slice(),
            bad_tags: u32::try_from(declared.bad_tags + parts.dropped_tags).unwrap_or(u32::MAX),
        }
    }

    /// A file's multiline rule: its declaration's `_multiline`, else (for
    /// the container's own log) the pod's `logs.bpftail.io/<container>.multiline`
    /// annotation, else `--multiline`. A setting that does not parse is
    /// refused (and the next one down applies).
    fn multiline_of(
        &self,
        o: &Origin,
        pod: Option<&PodInfo>,
        route: Option<&Declaration>,
        refused: &mut Vec<Refusal>,
    ) -> Option<Multiline> {
        let annotation = match (&o.declaration, pod) {
            (None, Some(p)) => declare::multiline_annotation(
                &o.container,
                p.annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .map(|v| (format!("{}.multiline", o.container), v)),
            _ => None,
        };
        let declared = route.and_then(|r| {
            r.multiline
                .as_deref()
                .map(|v| (format!("{}_multiline", r.name), v))
        });
        let mut rule = self.multiline.rule.clone();
        for (name, value) in [annotation, declared].into_iter().flatten() {
            match self.multiline.rules.parse(value) {
                Ok(r) => rule = r,
                Err(reason) => refused.push(Refusal {
                    name,
                    reason: format!("multiline: {reason}; the default applies"),
                }),
            }
        }
        rule.map(|rule| Multiline {
            rule,
            max_lines: self.multiline.max_lines,
            timeout: self.multiline.timeout,
        })
    }

    /// A file's container's rate limit: `--container-rate-limit`, or the
    /// pod's `bpftail.io/rate-limit[.<container>]` annotation — which may
    /// only lower the operator's limit (tenants write annotations). One
    /// that does not parse is refused, and the operator's applies.
    fn rate_limit_of(
        &self,
        o: &Origin,
        pod: Option<&PodInfo>,
        refused: &mut Vec<Refusal>,
    ) -> Option<RateLimit> {
        let mut rate = self.rate_limit;
        let annotated = pod.and_then(|p| {
            declare::rate_limit_annotation(
                &o.container,
                p.annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )
        });
        if let Some((key, value)) = annotated {
            match parse_rate(value) {
                Ok(Some(r)) => rate = Some(rate.map_or(r, |op| op.min(r))),
                // `off` lifts no operator limit.
                Ok(None) => {}
                Err(reason) => refused.push(Refusal {
                    name: key.to_owned(),
                    reason: format!("rate limit: {reason}; the default applies"),
                }),
            }
        }
        let container = if o.pod_uid.is_empty() {
            format!("docker/{}", o.container_id)
        } else {
            format!("{}/{}", o.pod_uid, o.container)
        };
        rate.map(|bytes_per_s| RateLimit {
            bytes_per_s,
            container: container.into(),
        })
    }

    /// The stdout and stderr topics: a declaration's, else the template's.
    fn topics(&self, route: Option<&Declaration>, vars: &TopicVars<'_>) -> [Arc<str>; 2] {
        match route {
            // A declared stdout (log-pilot's `stdout`: the console, both
            // streams) goes to the declaration's topic.
            Some(r) => {
                let t: Arc<str> = r.topic.as_str().into();
                [t.clone(), t]
            }
            None => {
                let out = self.topic.render_shared(vars, "stdout");
                let err = if self.topic.uses_stream() {
                    self.topic.render_shared(vars, "stderr")
                } else {
                    out.clone()
                };
                [out, err]
            }
        }
    }
}

/// The declaration routing a file: the one it was found by, else the
/// container's stdout declaration.
fn route(o: &Origin, declared: &Declared) -> Option<Declaration> {
    match &o.declaration {
        Some(name) => declared
            .declarations
            .iter()
            .find(|d| *d.name == **name)
            .cloned(),
        None => declared.stdout().cloned(),
    }
}

/// The namespace and pod name: the file path's, else the pod's.
/// A file's namespace and pod name: its path's, else (a Docker log) the
/// API's.
fn names<'a>(o: &'a Origin, pod: Option<&'a PodInfo>) -> (&'a str, &'a str) {
    let namespace = match pod {
        Some(p) if o.namespace.is_empty() => p.namespace.as_str(),
        _ => &o.namespace,
    };
    let pod_name = match pod {
        Some(p) if o.pod.is_empty() => p.name.as_str(),
        _ => &o.pod,
    };
    (namespace, pod_name)
}

/// A log file found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Shared with the followed file it becomes (no copy per file).
    pub path: Arc<Path>,
    /// What discovery knows of it beyond its path, shared by the files of
    /// one container; `None` for a CRI log, whose path says it all (see
    /// [`Found::origin`]). Most of a listing is files already followed, of
    /// which only the path is looked at: 10,000 of them held 5 MiB of
    /// origins otherwise, twice while a listing was repeated.
    pub origin: Option<Arc<Origin>>,
    pub format: Format,
    /// A rotated copy (`0.log.<ts>`, `-json.log.1`): followed only if it is
    /// a file already being read or one the checkpoint knows.
    pub rotated: bool,
    /// An in-container file: opened only beneath its volume's directory
    /// (boxed: most files are not).
    pub confined: Option<Box<volumes::Confined>>,
}

impl Found {
    /// Where it comes from: the namespace, pod, container and so on.
    pub fn origin(&self) -> Arc<Origin> {
        match &self.origin {
            Some(o) => o.clone(),
            None => Arc::new(cri_origin(&self.path).unwrap_or_default()),
        }
    }
}

/// A CRI log's origin, from its path:
/// `<pods dir>/<namespace>_<pod>_<uid>/<container>/<attempt>.log[.<suffix>]`.
pub fn cri_origin(path: &Path) -> Option<Origin> {
    fn name(p: Option<&Path>) -> Option<&str> {
        p?.file_name()?.to_str()
    }
    let container_dir = path.parent();
    let (namespace, pod, uid) = parse_pod_dir(name(container_dir.and_then(Path::parent))?)?;
    let attempt = name(Some(path))?
        .split('.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Some(Origin {
        namespace: namespace.into(),
        pod: pod.into(),
        pod_uid: uid.into(),
        container: name(container_dir)?.into(),
        attempt,
        ..Default::default()
    })
}

/// The result of one scan.
#[derive(Debug, Default)]
pub struct Scan {
    pub files: Vec<Found>,
    /// Every directory that holds log files or log directories: the change
    /// source watches these (and keeps the path it is given).
    pub dirs: Vec<Arc<Path>>,
    /// Directories that could not be listed, entries that could not be
    /// looked at.
    pub errors: Vec<(PathBuf, std::io::Error)>,
    /// Directories holding more entries than are followed: how many more,
    /// and the limit.
    pub cut: Vec<(PathBuf, usize, usize)>,
}

/// Splits `<namespace>_<pod>_<uid>`; namespaces and pod names cannot hold
/// `_`, so the split is unambiguous.
pub fn parse_pod_dir(name: &str) -> Option<(&str, &str, &str)> {
    let mut it = name.splitn(3, '_');
    let ns = it.next().filter(|s| !s.is_empty())?;
    let pod = it.next().filter(|s| !s.is_empty())?;
    let uid = it.next().filter(|s| !s.is_empty())?;
    Some((ns, pod, uid))
}

/// `N.log` → (restart, false); `N.log.<suffix>` (not .gz/.tmp) → (restart, true).
fn parse_cri_file(name: &str) -> Option<bool> {
    let (num, rest) = name.split_once(".log")?;
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match rest {
        "" => Some(false),
        r if r.starts_with('.') && !r.ends_with(".gz") && !r.ends_with(".tmp") => Some(true),
        _ => None,
    }
}

/// True for the name of a file a runtime writes to (`N.log`,
/// `<id>-json.log`), as opposed to rotated or compressed copies.
pub fn is_live_log_name(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| parse_cri_file(n) == Some(false) || n.ends_with("-json.log"))
}

/// At most this many pod directories in `--pods-dir`, or container
/// directories in `--docker-dir`, are followed (kubelet's default is 110
/// pods a node): a root holding more is cut, in name order of what was
/// read, and said.
pub const MAX_POD_DIRS: usize = 20_000;
/// At most this many container directories in a pod directory, and log
/// files (live and rotated) in a container directory.
pub const MAX_DIR_LOGS: usize = 1_000;

/// The entries of `dir` that `want` asks for (UTF-8 names only), at most
/// `max` but for the [`Want::Always`] ones, sorted. A directory that cannot
/// be listed, or holds more than `max` such entries, is noted in `scan`.
fn read_dir_sorted(
    fs: &Fs,
    dir: &Path,
    scan: &mut Scan,
    max: usize,
    want: impl Fn(&str) -> Want,
) -> Vec<(String, PathBuf)> {
    let listed = fs.read_dir(dir, max, |n| n.to_str().map_or(Want::No, &want));
    let (names, over) = match listed {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            scan.errors.push((dir.to_owned(), e));
            return Vec::new();
        }
    };
    if over > 0 {
        scan.cut.push((dir.to_owned(), over, max));
    }
    let mut out: Vec<(String, PathBuf)> = names
        .into_iter()
        .filter_map(|n| {
            let path = dir.join(&n);
            Some((n.into_string().ok()?, path))
        })
        .collect();
    out.sort();
    out
}

fn want_if(yes: bool) -> Want {
    if yes { Want::IfRoom } else { Want::No }
}

/// Whether `path` is a directory; what cannot be looked at (too long a
/// path, a symlink loop, no permission) is noted in `scan` (what is gone,
/// or is no directory, is not).
fn is_dir(fs: &Fs, path: &Path, scan: &mut Scan) -> bool {
    match fs.stat(path) {
        Ok(st) => st.is_dir,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => false,
        Err(e) => {
            scan.errors.push((path.to_owned(), e));
            false
        }
    }
}

/// What is at a log root (`--pods-dir`, `--docker-dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    Dir,
    Missing,
    /// Something else than a directory, or unreadable: the reason.
    Unusable(String),
}

impl Root {
    pub fn of(fs: &Fs, path: &Path) -> Root {
        match fs.stat(path) {
            Ok(st) if st.is_dir => Root::Dir,
            Ok(_) => Root::Unusable("not a directory".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Root::Missing,
            Err(e) => Root::Unusable(e.to_string()),
        }
    }

    /// What to say when a root is found in state `self`, having been in
    /// `before` (`None`: at start); `None`: nothing (unchanged, or fine at
    /// start). Said once per change, so a root re-checked at every rescan
    /// stays quiet.
    pub fn news(&self, before: Option<&Root>) -> Option<&'static str> {
        if before == Some(self) {
            return None;
        }
        match (self, before) {
            (Root::Dir, None) => None,
            (Root::Dir, Some(_)) => Some("log directory is there now; its logs are read"),
            (Root::Missing, _) => Some(
                "log directory is missing: no logs are read from it until it appears (check the flag and the DaemonSet's hostPath mount)",
            ),
            (Root::Unusable(_), _) => Some(
                "log directory cannot be used: no logs are read from it (check the flag and the DaemonSet's hostPath mount)",
            ),
        }
    }
}

/// Paths a listing's caller already holds (followed files, watched
/// directories): the listing hands those out, not a copy of each. (At
/// start the tree is listed twice; 22,000 copied paths were 4.6 MiB of the
/// peak.)
pub type Known<'a> = &'a dyn Fn(&Path) -> Option<Arc<Path>>;

/// For a listing whose caller holds no paths.
pub fn nothing_known(_: &Path) -> Option<Arc<Path>> {
    None
}

fn shared(known: Known<'_>, path: &Path) -> Arc<Path> {
    known(path).unwrap_or_else(|| path.into())
}

/// Lists the CRI log files under `root`; a container's rotations come in name
/// order, which is age order (kubelet suffixes a timestamp).
pub fn scan_pods_dir(fs: &Fs, root: &Path, scan: &mut Scan, known: Known<'_>) {
    if !fs.is_dir(root) {
        return;
    }
    scan.dirs.push(shared(known, root));
    let pod_dirs = read_dir_sorted(fs, root, scan, MAX_POD_DIRS, |n| {
        want_if(parse_pod_dir(n).is_some())
    });
    for (_, pod_dir) in pod_dirs {
        if !is_dir(fs, &pod_dir, scan) {
            continue;
        }
        scan.dirs.push(shared(known, &pod_dir));
        for (_, cdir) in read_dir_sorted(fs, &pod_dir, scan, MAX_DIR_LOGS, |_| Want::IfRoom) {
            if !is_dir(fs, &cdir, scan) {
                continue;
            }
            scan.dirs.push(shared(known, &cdir));
            // The live logs always; rotated ones while there is room.
            let logs =
                read_dir_sorted(fs, &cdir, scan, MAX_DIR_LOGS, |n| match parse_cri_file(n) {
                    Some(false) => Want::Always,
                    Some(true) => Want::IfRoom,
                    None => Want::No,
                });
            for (fname, path) in logs {
                let Some(rotated) = parse_cri_file(&fname) else {
                    continue;
                };
                scan.files.push(Found {
                    path: shared(known, &path),
                    origin: None,
                    format: Format::Cri,
                    rotated,
                    confined: None,
                });
            }
        }
    }
}

/// Lists Docker json-file logs under `root`, rotations oldest first.
/// (Its `config.v2.json` is read from the operating system's file system.)
pub fn scan_docker_dir(fs: &Fs, root: &Path, scan: &mut Scan, known: Known<'_>) {
    if !fs.is_dir(root) {
        return;
    }
    scan.dirs.push(shared(known, root));
    for (id, cdir) in read_dir_sorted(fs, root, scan, MAX_POD_DIRS, |_| Want::IfRoom) {
        if !is_dir(fs, &cdir, scan) {
            continue;
        }
        let log_name = format!("{id}-json.log");
        let files: Vec<(PathBuf, bool)> =
            read_dir_sorted(fs, &cdir, scan, MAX_DIR_LOGS, |n| {
                match n.strip_prefix(&log_name) {
                    Some("") => Want::Always,
                    Some(_) => Want::IfRoom,
                    None => Want::No,
                }
            })
            .into_iter()
            .filter_map(|(fname, path)| match fname.strip_prefix(&log_name) {
                Some("") => Some((path, false)),
                Some(r) if r.starts_with('.') && r[1..].bytes().all(|b| b.is_ascii_digit()) => {
                    Some((path, true))
                }
                _ => None,
            })
            .collect();
        scan.dirs.push(shared(known, &cdir));
        // Oldest first: -json.log.3, .2, .1, then the live -json.log.
        let mut files = files;
        files.sort_by_key(|(p, rotated)| {
            let n: u64 = p
                .extension()
                .and_then(|e| e.to_str())
                .and_then(|e| e.parse().ok())
                .unwrap_or(0);
            (!rotated, std::cmp::Reverse(n))
        });
        if files.is_empty() {
            continue;
        }
        let origin = Some(Arc::new(docker_origin(&id, &cdir.join("config.v2.json"))));
        for (path, rotated) in files {
            scan.files.push(Found {
                path: shared(known, &path),
                origin: origin.clone(),
                format: Format::DockerJson,
                rotated,
                confined: None,
            });
        }
    }
}

/// Reads name, labels and env from `config.v2.json`; a missing or broken
/// file leaves only the id (the log is still shipped).
pub fn docker_origin(id: &str, config: &Path) -> Origin {
    docker_config(id, &std::fs::read(config).unwrap_or_default())
}

/// A Docker container's origin from the bytes of its `config.v2.json`
/// (what the daemon wrote; anything that does not parse leaves only the
/// id).
pub fn docker_config(id: &str, config: &[u8]) -> Origin {
    let mut o = Origin {
        container_id: id.into(),
        container: id.get(..12).unwrap_or(id).into(),
        ..Default::default()
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(config) else {
        return o;
    };
    if let Some(name) = v["Name"].as_str() {
        o.container = name.trim_start_matches('/').into();
        o.docker_name = o.container.clone();
    }
    if let Some(labels) = v["Config"]["Labels"].as_object() {
        o.labels = labels
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect();
    }
    if let Some(env) = v["Config"]["Env"].as_array() {
        o.env = env
            .iter()
            .filter_map(|e| e.as_str().map(str::to_owned))
            .collect();
    }
    let label = |k: &str| o.labels.get(k).cloned();
    if let Some(ns) = label("io.kubernetes.pod.namespace") {
        o.namespace = ns.into();
    }
    if let Some(pod) = label("io.kubernetes.pod.name") {
        o.pod = pod.into();
    }
    if let Some(uid) = label("io.kubernetes.pod.uid") {
        o.pod_uid = uid.into();
    }
    if let Some(c) = label("io.kubernetes.container.name") {
        o.container = c.into();
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dir_names_split_into_namespace_pod_and_uid() {
        assert_eq!(
            parse_pod_dir(
                "kube-system_coredns-5d78c9869d-abcde_0b1c2d3e-aaaa-bbbb-cccc-0123456789ab"
            ),
            Some((
                "kube-system",
                "coredns-5d78c9869d-abcde",
                "0b1c2d3e-aaaa-bbbb-cccc-0123456789ab"
            ))
        );
        assert_eq!(parse_pod_dir("nounderscores"), None);
        assert_eq!(parse_pod_dir("a__c"), None);
    }

    #[test]
    fn cri_tree_is_listed_with_rotations_and_without_gzip() {
        let root = tempfile::tempdir().unwrap();
        let c = root.path().join("ns_pod_uid1/app");
        std::fs::create_dir_all(&c).unwrap();
        for f in [
            "0.log",
            "1.log",
            "0.log.20240101-000000",
            "0.log.20231231-000000.gz",
            "junk.txt",
        ] {
            std::fs::write(c.join(f), b"").unwrap();
        }
        std::fs::create_dir_all(root.path().join("not-a-pod-dir/app")).unwrap();
        let mut scan = Scan::default();
        scan_pods_dir(&Fs::Os, root.path(), &mut scan, &nothing_known);
        let names: Vec<(String, bool)> = scan
            .files
            .iter()
            .map(|f| {
                (
                    f.path.file_name().unwrap().to_string_lossy().into_owned(),
                    f.rotated,
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("0.log".into(), false),
                ("0.log.20240101-000000".into(), true),
                ("1.log".into(), false)
            ]
        );
        let o = scan.files[0].origin();
        assert_eq!(
            (&*o.namespace, &*o.pod, &*o.pod_uid, &*o.container),
            ("ns", "pod", "uid1", "app")
        );
        assert_eq!(scan.files[2].origin().attempt, 1);
        assert_eq!(scan.dirs.len(), 3);
    }

    #[test]
    fn only_files_runtimes_write_to_are_live_log_names() {
        for (name, live) in [
            ("0.log", true),
            ("12.log", true),
            ("abc-json.log", true),
            ("0.log.20240101-000000", false),
            ("0.log.20240101-000000.gz", false),
            ("abc-json.log.1", false),
            ("config.v2.json", false),
        ] {
            assert_eq!(is_live_log_name(std::ffi::OsStr::new(name)), live, "{name}");
        }
    }

    #[test]
    fn listings_keep_only_what_they_follow_and_note_what_they_cut_or_cannot_see() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for name in ["ns_a_1", "ns_b_2", "ns_c_3", "junk", "more-junk"] {
            std::fs::create_dir(root.join(name)).unwrap();
        }
        let mut scan = Scan::default();
        let got = read_dir_sorted(&Fs::Os, root, &mut scan, 2, |n| {
            want_if(parse_pod_dir(n).is_some())
        });
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|(n, _)| n.starts_with("ns_")), "{got:?}");
        assert_eq!(scan.cut, vec![(root.to_owned(), 1, 2)]);
        // Gone or no directory: not a problem; a name too long to look at is.
        assert!(!is_dir(&Fs::Os, &root.join("gone"), &mut scan));
        assert!(!is_dir(&Fs::Os, &root.join("junk/x"), &mut scan));
        assert!(scan.errors.is_empty());
        assert!(!is_dir(&Fs::Os, &root.join("x".repeat(300)), &mut scan));
        assert_eq!(scan.errors.len(), 1);
        assert_eq!(scan.errors[0].1.raw_os_error(), Some(libc::ENAMETOOLONG));
    }

    #[test]
    fn missing_roots_are_not_errors() {
        let mut scan = Scan::default();
        scan_pods_dir(
            &Fs::Os,
            Path::new("/nonexistent/bpftail"),
            &mut scan,
            &nothing_known,
        );
        scan_docker_dir(
            &Fs::Os,
            Path::new("/nonexistent/bpftail"),
            &mut scan,
            &nothing_known,
        );
        assert!(scan.files.is_empty() && scan.errors.is_empty() && scan.dirs.is_empty());
    }

    #[test]
    fn docker_logs_take_kubernetes_labels_from_config() {
        let root = tempfile::tempdir().unwrap();
        let id = "abcdef0123456789";
        let c = root.path().join(id);
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join(format!("{id}-json.log")), b"").unwrap();
        std::fs::write(c.join(format!("{id}-json.log.1")), b"").unwrap();
        std::fs::write(
            c.join("config.v2.json"),
            r#"{"Name":"/k8s_app_pod","Config":{"Env":["aliyun_logs_x=stdout"],"Labels":{
                "io.kubernetes.pod.namespace":"prod","io.kubernetes.pod.name":"web-1",
                "io.kubernetes.pod.uid":"u-1","io.kubernetes.container.name":"app"}}}"#,
        )
        .unwrap();
        let mut scan = Scan::default();
        scan_docker_dir(&Fs::Os, root.path(), &mut scan, &nothing_known);
        assert_eq!(scan.files.len(), 2);
        let o = scan.files[0].origin();
        assert_eq!(
            (&*o.namespace, &*o.pod, &*o.pod_uid, &*o.container),
            ("prod", "web-1", "u-1", "app")
        );
        assert_eq!(o.env, vec!["aliyun_logs_x=stdout".to_string()].into());
        // Oldest first.
        assert!(scan.files[0].rotated && !scan.files[1].rotated);
    }

    #[test]
    fn metadata_renders_key_topics_and_json_members_once() {
        let ctx = MetaContext {
            topic: TopicTemplate::parse("logs-{namespace}-{stream}").unwrap(),
            node: "node-1".into(),
            pods: None,
            labels: Default::default(),
            annotations: Default::default(),
            policy: Default::default(),
            multiline: Default::default(),
            rate_limit: None,
        };
        let m = ctx.render(
            Origin {
                namespace: "ns".into(),
                pod: "p\"q".into(),
                pod_uid: "uid".into(),
                container: "c".into(),
                ..Default::default()
            },
            Format::Cri,
        );
        assert_eq!(m.key(), b"uid/c");
        assert_eq!(m.topic(Stream::Stdout), "logs-ns-stdout");
        assert_eq!(m.topic(Stream::Stderr), "logs-ns-stderr");
        assert_eq!(
            std::str::from_utf8(&m.json_members).unwrap(),
            r#","namespace":"ns","pod":"p\"q","container":"c","node":"node-1""#
        );
    }

    #[test]
    fn pod_metadata_from_the_api_adds_owner_image_and_selected_labels() {
        use crate::kube::{ContainerInfo, PodInfo};
        let cache = Arc::new(PodCache::default());
        cache.apply(PodInfo {
            uid: "uid".into(),
            namespace: "ns".into(),
            name: "web-1".into(),
            labels: [("app", "web"), ("pod-template-hash", "abc")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            annotations: [("team", "a\"b"), ("secret-ish", "x")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            owner: Some(("ReplicaSet".into(), "web".into())),
            containers: vec![ContainerInfo {
                name: "c".into(),
                image: "nginx:1".into(),
                id: "abc123".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let mut ctx = MetaContext {
            topic: TopicTemplate::parse("t").unwrap(),
            node: "node-1".into(),
            pods: Some(cache.clone()),
            labels: Globs::parse("pod-labels", "app").unwrap(),
            annotations: Globs::parse("pod-annotations", "team*").unwrap(),
            policy: Default::default(),
            multiline: Default::default(),
            rate_limit: None,
        };
        let cri = Origin {
            namespace: "ns".into(),
            pod: "web-1".into(),
            pod_uid: "uid".into(),
            container: "c".into(),
            ..Default::default()
        };
        let m = ctx.render(cri.clone(), Format::Cri);
        let json: serde_json::Value = serde_json::from_str(&format!(
            "{{\"x\":1{}}}",
            std::str::from_utf8(&m.json_members).unwrap()
        ))
        .unwrap();
        assert_eq!(json["owner"]["kind"], "ReplicaSet");
        assert_eq!(json["owner"]["name"], "web");
        assert_eq!(json["image"], "nginx:1");
        assert_eq!(json["container_id"], "abc123");
        assert_eq!(json["pod_uid"], "uid");
        assert_eq!(json["labels"], serde_json::json!({"app": "web"}));
        assert_eq!(json["annotations"], serde_json::json!({"team": "a\"b"}));
        // JSON output carries no header encodings; raw output no JSON.
        assert!(m.kafka_headers.is_empty());
        ctx.policy.output = crate::config::OutputFormat::Raw;
        let m = ctx.render(cri.clone(), Format::Cri);
        assert!(m.json_members.is_empty() && !m.kafka_headers.is_empty());
        let h: Vec<(&[u8], &[u8])> = m.raw_headers().collect();
        assert_eq!(h.len(), m.kafka_header_count as usize);
        assert_eq!(
            h[..4],
            [
                (&b"namespace"[..], &b"ns"[..]),
                (b"pod", b"web-1"),
                (b"container", b"c"),
                (b"node", b"node-1")
            ]
        );
        let h: Vec<(&str, &str)> = h
            .iter()
            .map(|(k, v)| {
                (
                    std::str::from_utf8(k).unwrap(),
                    std::str::from_utf8(v).unwrap(),
                )
            })
            .collect();
        assert!(h.contains(&("label.app", "web")));
        assert!(h.contains(&("owner_kind", "ReplicaSet")));
        assert!(!h.iter().any(|(k, _)| k.contains("pod-template-hash")));
        // A Docker log is matched by its container id; its key stays the id.
        let docker = Origin {
            container: "c".into(),
            container_id: "abc123".into(),
            ..Default::default()
        };
        let d = ctx.render(docker, Format::DockerJson);
        assert_eq!(d.namespace(), "ns");
        assert_eq!(d.key(), b"abc123");
        assert!(d.pod_info.is_some());
        // An unknown pod: the path's metadata only.
        let unknown = ctx.render(
            Origin {
                pod_uid: "other".into(),
                ..cri
            },
            Format::Cri,
        );
        assert!(unknown.pod_info.is_none() && unknown.kafka_header_count == 4);
    }

    #[test]
    fn a_files_multiline_rule_comes_from_its_declaration_its_annotation_or_the_default() {
        use crate::kube::{ContainerInfo, PodInfo};
        let cache = Arc::new(PodCache::default());
        let pod = |uid: &str, annotations: &[(&str, &str)], env: &[(&str, &str)]| PodInfo {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            containers: vec![ContainerInfo {
                name: "c".into(),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        cache.apply(pod(
            "annotated",
            &[("logs.bpftail.io/c.multiline", "python")],
            &[],
        ));
        cache.apply(pod(
            "declared",
            &[("logs.bpftail.io/c.multiline", "python")],
            &[
                ("aliyun_logs_app", "stdout"),
                ("aliyun_logs_app_multiline", "java"),
                ("aliyun_logs_files", "/var/log/app/*.log"),
                ("aliyun_logs_files_multiline", "regex:^\\d{4}-"),
            ],
        ));
        cache.apply(pod(
            "bad",
            &[("logs.bpftail.io/c.multiline", "regex:(")],
            &[],
        ));
        cache.apply(pod("plain", &[], &[]));
        let ctx = MetaContext {
            topic: TopicTemplate::parse("t").unwrap(),
            node: "n".into(),
            pods: Some(cache.clone()),
            labels: Globs::default(),
            annotations: Globs::default(),
            policy: Default::default(),
            multiline: MultilineDefaults {
                rule: Rule::parse("go").unwrap(),
                ..Default::default()
            },
            rate_limit: None,
        };
        let render = |uid: &str, declaration: Option<&str>| {
            ctx.render(
                Origin {
                    pod_uid: uid.into(),
                    container: "c".into(),
                    declaration: declaration.map(Into::into),
                    ..Default::default()
                },
                Format::Cri,
            )
        };
        let rule = |m: &FileMeta| m.multiline.as_ref().map(|ml| ml.rule.name());
        assert_eq!(rule(&render("annotated", None)).as_deref(), Some("python"));
        // The stdout declaration's option wins over the annotation; a
        // declared file gets its own declaration's.
        assert_eq!(rule(&render("declared", None)).as_deref(), Some("java"));
        assert_eq!(
            rule(&render("declared", Some("files"))).as_deref(),
            Some("regex:^\\d{4}-")
        );
        let bad = render("bad", None);
        assert_eq!(rule(&bad).as_deref(), Some("go"), "the default applies");
        assert_eq!(bad.refused.len(), 1);
        assert!(
            bad.refused[0].reason.contains("does not compile"),
            "{:?}",
            bad.refused
        );
        assert_eq!(rule(&render("plain", None)).as_deref(), Some("go"));
        // Not a declaration named "multiline".
        assert!(render("annotated", None).refused.is_empty());
    }

    #[test]
    fn rate_limit_annotations_may_only_lower_the_operators_limit() {
        use crate::kube::{ContainerInfo, PodInfo};
        let cache = Arc::new(PodCache::default());
        for (uid, annotations) in [
            ("pod-wide", vec![("bpftail.io/rate-limit", "1M")]),
            (
                "own",
                vec![
                    ("bpftail.io/rate-limit", "1M"),
                    ("bpftail.io/rate-limit.c", "300k"),
                ],
            ),
            ("higher", vec![("bpftail.io/rate-limit", "50M")]),
            ("bad", vec![("bpftail.io/rate-limit.c", "fast")]),
            ("off", vec![("bpftail.io/rate-limit", "off")]),
        ] {
            cache.apply(PodInfo {
                uid: uid.into(),
                annotations: annotations
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                containers: vec![ContainerInfo {
                    name: "c".into(),
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        let mut ctx = MetaContext {
            topic: TopicTemplate::parse("t").unwrap(),
            node: "n".into(),
            pods: Some(cache.clone()),
            labels: Globs::default(),
            annotations: Globs::default(),
            policy: Default::default(),
            multiline: Default::default(),
            rate_limit: Some(10_000_000),
        };
        let limit = |ctx: &MetaContext, uid: &str| {
            let m = ctx.render(
                Origin {
                    pod_uid: uid.into(),
                    container: "c".into(),
                    ..Default::default()
                },
                Format::Cri,
            );
            (m.rate_limit.map(|l| l.bytes_per_s), m.refused.len())
        };
        assert_eq!(limit(&ctx, "pod-wide"), (Some(1_000_000), 0));
        assert_eq!(limit(&ctx, "own"), (Some(300_000), 0));
        assert_eq!(limit(&ctx, "higher"), (Some(10_000_000), 0));
        assert_eq!(limit(&ctx, "bad"), (Some(10_000_000), 1));
        assert_eq!(limit(&ctx, "off"), (Some(10_000_000), 0));
        // Without an operator limit, an annotation sets one.
        ctx.rate_limit = None;
        assert_eq!(limit(&ctx, "higher"), (Some(50_000_000), 0));
        assert_eq!(limit(&ctx, "off"), (None, 0));
        let m = ctx.render(
            Origin {
                pod_uid: "own".into(),
                container: "c".into(),
                ..Default::default()
            },
            Format::Cri,
        );
        assert_eq!(&*m.rate_limit.unwrap().container, "own/c");
    }

    #[test]
    fn a_log_root_is_reported_once_per_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(Root::of(&Fs::Os, dir.path()), Root::Dir);
        assert_eq!(Root::of(&Fs::Os, &dir.path().join("nope")), Root::Missing);
        let bad = Root::of(&Fs::Os, &file);
        assert_eq!(bad, Root::Unusable("not a directory".into()));
        assert_eq!(Root::Dir.news(None), None);
        assert!(Root::Missing.news(None).unwrap().contains("is missing"));
        assert_eq!(Root::Missing.news(Some(&Root::Missing)), None);
        assert!(bad.news(None).unwrap().contains("cannot be used"));
        assert!(
            Root::Dir
                .news(Some(&Root::Missing))
                .unwrap()
                .contains("there now")
        );
    }
}
