//! Files that wait for their pod.
//!
//! A new live file of a pod the Kubernetes API has not reported yet (its
//! watch event may trail the file by a moment) waits up to [`POD_WAIT`]
//! before it is opened, so that its first lines carry the pod's metadata
//! too. Under `--ship declared` a CRI log waits however long it takes: its
//! pod's declarations say whether it ships at all (nothing is lost
//! meanwhile: it is read from its start, or its checkpoint, then).
//! Checkpointed and rotated files do not wait.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a new file waits for its pod's metadata from the API.
pub const POD_WAIT: Duration = Duration::from_secs(2);

/// What is known when a file is found.
#[derive(Debug, Clone, Copy)]
pub struct Found {
    /// The API reported the file's pod.
    pub pod_known: bool,
    /// Only its pod's declarations can make it ship (`--ship declared`,
    /// and nothing declared in the path's environment).
    pub needs_declaration: bool,
    /// A checkpoint names it.
    pub checkpointed: bool,
    /// Found under a rotated name.
    pub rotated: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    /// Open it now.
    Open,
    /// Open it now, with the metadata its path gives: its pod did not come
    /// in time (log it, count it).
    OpenWithoutPod,
    /// Not yet.
    Wait,
}

/// The files waiting for their pod.
#[derive(Debug)]
pub struct PodGate {
    /// Pods come from the API (`--kube` on): otherwise nothing waits.
    api: bool,
    /// Files waiting up to [`POD_WAIT`], since when.
    awaiting: HashMap<PathBuf, Instant>,
    /// Files waiting without a time limit (`--ship declared`).
    pending: HashSet<PathBuf>,
}

impl PodGate {
    pub fn new(api: bool) -> PodGate {
        PodGate {
            api,
            awaiting: HashMap::new(),
            pending: HashSet::new(),
        }
    }

    /// Whether the file found at `path` is opened now.
    pub fn check(&mut self, path: &Path, found: Found, now: Instant) -> Gate {
        if !self.api || found.pod_known {
            self.awaiting.remove(path);
            self.pending.remove(path);
            return Gate::Open;
        }
        if found.needs_declaration {
            self.awaiting.remove(path);
            self.pending.insert(path.to_owned());
            return Gate::Wait;
        }
        if found.checkpointed || found.rotated {
            return Gate::Open;
        }
        let since = *self.awaiting.entry(path.to_owned()).or_insert(now);
        if now.duration_since(since) < POD_WAIT {
            return Gate::Wait;
        }
        self.awaiting.remove(path);
        Gate::OpenWithoutPod
    }

    /// Files wait: a change in the pods may let them open.
    pub fn has_waiting(&self) -> bool {
        self.waiting() > 0
    }

    /// Whether the file at `path` waits (so [`PodGate::after_scan`] must be
    /// told when it is listed).
    pub fn holds(&self, path: &Path) -> bool {
        self.awaiting.contains_key(path) || self.pending.contains(path)
    }

    /// How many files wait.
    pub fn waiting(&self) -> usize {
        self.awaiting.len() + self.pending.len()
    }

    /// When the first timed wait ends (a rescan opens it then).
    pub fn deadline(&self) -> Option<Instant> {
        self.awaiting.values().min().map(|t| *t + POD_WAIT)
    }

    /// After a scan that listed `listed` (at least every listed path it
    /// [`PodGate::holds`]): forgets files no longer there.
    /// (A file that was never looked at again — it cannot be stat'ed any
    /// more — must not keep the loop rescanning: a timed wait is forgotten
    /// after twice [`POD_WAIT`].)
    pub fn after_scan(&mut self, listed: &HashSet<Arc<Path>>, now: Instant) {
        self.awaiting
            .retain(|p, t| listed.contains(p.as_path()) && now.duration_since(*t) < POD_WAIT * 2);
        self.pending.retain(|p| listed.contains(p.as_path()));
    }
}

/// Least time between rescans caused by pod changes.
pub const POD_RESCAN_GAP: Duration = Duration::from_secs(1);

/// Rescans asked for by pod changes, at most one per [`POD_RESCAN_GAP`].
#[derive(Debug)]
pub struct RescanThrottle {
    requested: bool,
    last: Instant,
}

impl Default for RescanThrottle {
    fn default() -> Self {
        RescanThrottle {
            requested: false,
            last: Instant::now(),
        }
    }
}

impl RescanThrottle {
    pub fn request(&mut self) {
        self.requested = true;
    }

    /// True (once) if a rescan was asked for and may run at `now`.
    pub fn take_due(&mut self, now: Instant) -> bool {
        if self.requested && now >= self.last + POD_RESCAN_GAP {
            self.requested = false;
            self.last = now;
            return true;
        }
        false
    }

    /// When the rescan asked for may run.
    pub fn deadline(&self) -> Option<Instant> {
        self.requested.then_some(self.last + POD_RESCAN_GAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found() -> Found {
        Found {
            pod_known: false,
            needs_declaration: false,
            checkpointed: false,
            rotated: false,
        }
    }

    #[test]
    fn pod_rescans_run_at_most_once_per_gap() {
        let mut t = RescanThrottle::default();
        let t0 = t.last;
        assert!(!t.take_due(t0 + POD_RESCAN_GAP), "nothing asked");
        t.request();
        assert_eq!(t.deadline(), Some(t0 + POD_RESCAN_GAP));
        assert!(!t.take_due(t0));
        assert!(t.take_due(t0 + POD_RESCAN_GAP));
        t.request();
        assert!(!t.take_due(t0 + POD_RESCAN_GAP), "gap since the last one");
        assert!(t.take_due(t0 + POD_RESCAN_GAP * 2));
        assert_eq!(t.deadline(), None);
    }

    #[test]
    fn a_new_file_waits_for_its_pod_up_to_the_limit() {
        let t0 = Instant::now();
        let p = Path::new("/pods/ns_p_u/c/0.log");
        let mut g = PodGate::new(true);
        assert_eq!(g.check(p, found(), t0), Gate::Wait);
        assert_eq!(g.deadline(), Some(t0 + POD_WAIT));
        assert_eq!(g.check(p, found(), t0 + POD_WAIT / 2), Gate::Wait);
        assert_eq!(g.check(p, found(), t0 + POD_WAIT), Gate::OpenWithoutPod);
        assert_eq!(g.deadline(), None);
        assert!(!g.has_waiting());
    }

    #[test]
    fn a_known_pod_or_no_api_opens_at_once() {
        let t0 = Instant::now();
        let p = Path::new("/x");
        let mut g = PodGate::new(true);
        assert_eq!(g.check(p, found(), t0), Gate::Wait);
        let known = Found {
            pod_known: true,
            ..found()
        };
        assert_eq!(g.check(p, known, t0), Gate::Open);
        assert!(!g.has_waiting());
        assert_eq!(PodGate::new(false).check(p, found(), t0), Gate::Open);
    }

    #[test]
    fn checkpointed_and_rotated_files_do_not_wait_undeclared_ones_wait_without_limit() {
        let t0 = Instant::now();
        let p = Path::new("/x");
        let mut g = PodGate::new(true);
        for f in [
            Found {
                checkpointed: true,
                ..found()
            },
            Found {
                rotated: true,
                ..found()
            },
        ] {
            assert_eq!(g.check(p, f, t0), Gate::Open);
        }
        let undeclared = Found {
            needs_declaration: true,
            ..found()
        };
        assert_eq!(g.check(p, undeclared, t0 + POD_WAIT * 100), Gate::Wait);
        assert_eq!(g.deadline(), None, "no timed wait");
        assert!(g.has_waiting());
        g.after_scan(&HashSet::new(), t0);
        assert!(!g.has_waiting());
    }
}
