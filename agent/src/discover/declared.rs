//! In-container files that pods declare (log-pilot's
//! `<prefix>_logs_<name>=<path>`), found below the pods' volumes (confined:
//! see [`super::volumes`]).
//!
//! A scan returns what it found and, as data, what it could not follow and
//! why ([`Note`]): the caller reports each once ([`Notes`]) and forgets
//! the reports of containers that are gone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Found, MetaContext, Origin, volumes};
use crate::config::Globs;
use crate::declare;
use crate::kube::{ContainerInfo, PodInfo};
use crate::metrics::Metrics;
use crate::tail::decode::Format;

/// A container of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    pub pod_uid: String,
    pub container: String,
}

/// Why a declaration is not (fully) followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Problem {
    /// The declaration itself is refused (bad name, value, topic…).
    Refused,
    /// Its path cannot be resolved to a volume the agent may read.
    Unresolvable,
    /// The kernel lacks openat2 (older than 5.6): in-container files
    /// cannot be opened safely.
    NoOpenat2,
    /// It matches more files than are followed.
    TooManyFiles,
}

/// One problem of one declaration, reported once while its container lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NoteKey {
    pub container: ContainerRef,
    pub declaration: String,
    pub problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub key: NoteKey,
    pub namespace: String,
    pub pod: String,
    /// The declared path (for path problems).
    pub path: String,
    pub reason: String,
}

/// What a scan of the declared files found.
#[derive(Debug, Default)]
pub struct DeclaredScan {
    pub files: Vec<Found>,
    /// Directories holding them: watched for changes.
    pub dirs: Vec<PathBuf>,
    pub notes: Vec<Note>,
    /// Every container looked at (notes of the others are forgotten).
    pub containers: HashSet<ContainerRef>,
}

/// Where declared paths may lead.
pub struct Roots<'a> {
    pub kubelet_pods_dir: &'a Path,
    pub allow_hostpath: &'a Globs,
}

/// Finds the files the live `pods` declare.
pub fn scan(pods: &[Arc<PodInfo>], ctx: &MetaContext, roots: &Roots<'_>) -> DeclaredScan {
    let mut out = DeclaredScan::default();
    for pod in pods {
        for c in &pod.containers {
            let annotations = pod
                .annotations
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()));
            if declare::excluded(&c.name, annotations) {
                continue;
            }
            scan_container(pod, c, ctx, roots, &mut out);
            out.containers.insert(ContainerRef {
                pod_uid: pod.uid.clone(),
                container: c.name.clone(),
            });
        }
    }
    out
}

/// The declared files of one container.
fn scan_container(
    pod: &PodInfo,
    c: &ContainerInfo,
    ctx: &MetaContext,
    roots: &Roots<'_>,
    out: &mut DeclaredScan,
) {
    let origin = Origin {
        namespace: pod.namespace.clone().into(),
        pod: pod.name.clone().into(),
        pod_uid: pod.uid.clone().into(),
        container: c.name.clone().into(),
        ..Default::default()
    };
    let note = |declaration: &str, problem, path: &str, reason: String| Note {
        key: NoteKey {
            container: ContainerRef {
                pod_uid: pod.uid.clone(),
                container: c.name.clone(),
            },
            declaration: declaration.to_owned(),
            problem,
        },
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        path: path.to_owned(),
        reason,
    };
    let declared = ctx.declared(&origin, Some(pod));
    for r in &declared.refused {
        out.notes
            .push(note(&r.name, Problem::Refused, "", r.reason.clone()));
    }
    for d in &declared.declarations {
        let declare::Source::Path(glob) = &d.source else {
            continue;
        };
        let listing = match list_declared(glob, pod, c, roots) {
            Ok(l) => l,
            Err(Some((problem, reason))) => {
                out.notes.push(note(&d.name, problem, glob, reason));
                continue;
            }
            Err(None) => continue,
        };
        if listing.truncated {
            let reason = format!(
                "more than {} files or {} entries",
                volumes::MAX_MATCHES,
                volumes::MAX_ENTRIES
            );
            out.notes
                .push(note(&d.name, Problem::TooManyFiles, glob, reason));
        }
        out.dirs.extend(listing.dirs);
        out.files.extend(listing.files.into_iter().map(|f| Found {
            path: f.base.join(&f.rel).into(),
            origin: Some(Arc::new(Origin {
                declaration: Some(d.name.clone().into()),
                ..origin.clone()
            })),
            format: Format::Raw,
            rotated: false,
            confined: Some(Box::new(f)),
        }));
    }
}

/// The files a declared path `glob` matches beneath the container's
/// volumes; `Err(Some(..))`: a problem to report, `Err(None)`: nothing to
/// list yet (e.g. the volume's directory is not made yet).
fn list_declared(
    glob: &str,
    pod: &PodInfo,
    c: &ContainerInfo,
    roots: &Roots<'_>,
) -> Result<volumes::Listing, Option<(Problem, String)>> {
    let resolved = volumes::resolve(glob, pod, c, roots.kubelet_pods_dir, roots.allow_hostpath)
        .map_err(|reason| Some((Problem::Unresolvable, reason.to_string())))?;
    volumes::list_matches(&resolved).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOSYS) {
            Some((Problem::NoOpenat2, e.to_string()))
        } else {
            tracing::debug!(path = %glob, error = %e, "cannot list a declared volume");
            None
        }
    })
}

/// A hash of every in-container path the live `pods` declare: a rescan
/// is due when it changes (not for every pod status update).
pub fn signature(pods: &[Arc<PodInfo>], ctx: &MetaContext) -> u64 {
    use std::hash::{Hash, Hasher};
    if ctx.pods.is_none() {
        return 0;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut pods: Vec<&Arc<PodInfo>> = pods.iter().collect();
    pods.sort_by(|a, b| a.uid.cmp(&b.uid));
    for pod in pods {
        for c in &pod.containers {
            let origin = Origin {
                pod_uid: pod.uid.clone().into(),
                container: c.name.clone().into(),
                ..Default::default()
            };
            for d in ctx.declared(&origin, Some(pod)).declarations {
                if let declare::Source::Path(p) = &d.source {
                    (&pod.uid, &c.name, &d.name, p, &c.mounts, &pod.volumes).hash(&mut h);
                }
            }
        }
    }
    h.finish()
}

/// The notes reported so far, kept while their container lives.
#[derive(Debug, Default)]
pub struct Notes {
    reported: HashSet<NoteKey>,
}

impl Notes {
    /// Logs (and counts) the notes of `scan` not reported yet; forgets
    /// those of containers the scan no longer saw.
    pub fn report(&mut self, scan: &DeclaredScan, metrics: &Metrics) {
        for n in &scan.notes {
            if self.reported.insert(n.key.clone()) {
                log(n, metrics);
            }
        }
        self.reported
            .retain(|k| scan.containers.contains(&k.container));
    }
}

fn log(n: &Note, metrics: &Metrics) {
    let (ns, pod, container, declaration) = (
        &n.namespace,
        &n.pod,
        &n.key.container.container,
        &n.key.declaration,
    );
    match n.key.problem {
        Problem::Refused => {
            metrics.declarations_refused.inc();
            tracing::warn!(namespace = %ns, pod = %pod, container = %container, declaration = %declaration, reason = %n.reason, "log declaration refused");
        }
        Problem::Unresolvable => {
            metrics.declarations_refused.inc();
            tracing::warn!(namespace = %ns, pod = %pod, container = %container, declaration = %declaration, path = %n.path, reason = %n.reason, "in-container log declaration refused");
        }
        Problem::NoOpenat2 => {
            tracing::warn!(declaration = %declaration, "openat2 is missing (kernel older than 5.6): in-container files cannot be read safely and are not read");
        }
        Problem::TooManyFiles => {
            tracing::warn!(namespace = %ns, pod = %pod, declaration = %declaration, max_files = volumes::MAX_MATCHES, max_entries = volumes::MAX_ENTRIES, "declared path matches too many files; following the first ones");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(uid: &str, decl: &str, problem: Problem) -> Note {
        Note {
            key: NoteKey {
                container: ContainerRef {
                    pod_uid: uid.into(),
                    container: "c".into(),
                },
                declaration: decl.into(),
                problem,
            },
            namespace: "ns".into(),
            pod: "p".into(),
            path: "/x".into(),
            reason: "why".into(),
        }
    }

    fn scan_of(notes: Vec<Note>) -> DeclaredScan {
        DeclaredScan {
            containers: notes.iter().map(|n| n.key.container.clone()).collect(),
            notes,
            ..Default::default()
        }
    }

    #[test]
    fn a_problem_is_reported_once_while_its_container_lives_and_again_after() {
        let m = Metrics::default();
        let mut notes = Notes::default();
        let refused = note("u1", "a", Problem::Refused);
        let other = note("u1", "a", Problem::Unresolvable);
        notes.report(&scan_of(vec![refused.clone()]), &m);
        notes.report(&scan_of(vec![refused.clone(), other.clone()]), &m);
        assert_eq!(m.declarations_refused.get(), 2);
        // The pod is gone (a uid that is a prefix of another's changes
        // nothing: keys are typed, not prefixes).
        notes.report(&scan_of(vec![note("u10", "a", Problem::TooManyFiles)]), &m);
        notes.report(&scan_of(vec![refused]), &m);
        assert_eq!(m.declarations_refused.get(), 3);
    }
}
