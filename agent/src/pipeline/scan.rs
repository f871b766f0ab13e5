//! Full discovery: list the log directories, follow what is new, notice
//! renames and disappearances, keep the change source watching every log
//! directory. What to do with each file found is decided in
//! [`crate::files`]; this is the I/O around it (stat, open).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::Pipeline;
use crate::checkpoint::{Entry, FileKey, Fingerprint};
use crate::config::ShipMode;
use crate::discover::declared::{self, Roots};
use crate::discover::{self, FileMeta, Found, Origin, Scan};
use crate::files::identity::OnDisk;
use crate::files::lifecycle::{Admit, Start};
use crate::files::pods::{self, Gate};
use crate::files::{FileId, StreamId};
use crate::fs::{Fs, Handle, Stat};
use crate::sink::Sink;
use crate::tail::{FileStatus, TailedFile};

/// How many times a scan lists again when it found a new live file (see
/// [`Pipeline::apply_scan`]).
const RELISTS: usize = 4;
/// How many times a listing is repeated while it finds directories not
/// watched yet.
const WATCH_PASSES: usize = 3;

fn key_of(st: &Stat) -> FileKey {
    FileKey {
        dev: st.dev,
        ino: st.ino,
    }
}

fn status_of(found: &Found) -> FileStatus {
    if found.rotated {
        FileStatus::Rotated
    } else {
        FileStatus::Live
    }
}

/// What a found path is: its metadata, and for an in-container file the
/// file itself (opened beneath its volume only, and identified by what was
/// opened: its path may lead elsewhere). `None`: gone, or not a regular
/// file (a FIFO or device where a log should be: opening it could block).
/// What a listed log path holds.
enum Looked {
    /// A regular file (opened already if it is an in-container one).
    File(Option<Handle>, Stat),
    /// Gone since the listing, or an in-container file not opened.
    Gone,
    /// A directory, FIFO, socket or device.
    NotRegular,
    /// It cannot be looked at (a symlink loop, no permission).
    Failed(std::io::Error),
}

fn stat_found(fs: &Fs, found: &Found) -> Looked {
    let preopened = match &found.confined {
        Some(c) => match c.open() {
            Ok(f) => Some(Handle::from(f)),
            Err(e) => {
                tracing::debug!(path = %found.path.display(), error = %e, "in-container file not opened");
                return Looked::Gone;
            }
        },
        None => None,
    };
    let st = match &preopened {
        Some(f) => f.stat(),
        None => fs.stat(&found.path),
    };
    match st {
        Ok(st) if st.is_file => Looked::File(preopened, st),
        Ok(_) => Looked::NotRegular,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Looked::Gone,
        Err(e) => Looked::Failed(e),
    }
}

impl<S: Sink> Pipeline<S> {
    /// Full discovery: opens new files, notices renames and disappearances.
    pub(super) fn rescan(&mut self) {
        let scan = self.list();
        self.apply_scan(scan);
    }

    /// Says when a log root (`--pods-dir`, `--docker-dir`) is missing or not
    /// a directory, once at start and once per change: the rescans check it
    /// quietly.
    fn check_roots(&mut self) {
        let roots = [
            ("pods-dir", self.cfg.pods_dir.clone()),
            ("docker-dir", self.cfg.docker_dir.clone()),
        ];
        for (i, (flag, path)) in roots.iter().enumerate() {
            let now = discover::Root::of(&self.fs, path);
            if let Some(msg) = now.news(self.roots[i].as_ref()) {
                match &now {
                    discover::Root::Dir => tracing::info!(flag, path = %path.display(), "{msg}"),
                    // Most nodes have only one runtime: no Docker directory
                    // beside a CRI one is the normal case, not a mistake.
                    discover::Root::Missing
                        if i == 1 && self.roots[0] == Some(discover::Root::Dir) =>
                    {
                        tracing::info!(flag, path = %path.display(), "{msg}")
                    }
                    discover::Root::Missing => {
                        tracing::warn!(flag, path = %path.display(), "{msg}")
                    }
                    discover::Root::Unusable(why) => {
                        tracing::warn!(flag, path = %path.display(), reason = %why, "{msg}")
                    }
                }
            }
            self.roots[i] = Some(now);
        }
    }

    /// Lists the log directories, watching each before trusting the
    /// listing; returns the files found (`dirs` is left empty).
    pub(super) fn list(&mut self) -> Scan {
        let mut scan = Scan::default();
        // Watch new directories before trusting the listing, then list again
        // so nothing created in between is missed.
        self.dirs_unwatched = false;
        self.check_roots();
        for _ in 0..WATCH_PASSES {
            scan = Scan::default();
            let (files, dirs) = (&self.files, &self.watched_dirs);
            let known = |p: &Path| files.shared_path(p).or_else(|| dirs.get(p).cloned());
            discover::scan_docker_dir(&self.fs, &self.cfg.docker_dir, &mut scan, &known);
            discover::scan_pods_dir(&self.fs, &self.cfg.pods_dir, &mut scan, &known);
            self.scan_declared(&mut scan);
            let mut added = false;
            for dir in &scan.dirs {
                // Idempotent; renews a watch the kernel dropped (a
                // directory deleted and made again at the same path). The
                // listing handed out the path already watched, if any: one
                // copy, shared with the change source.
                match self.source.watch_dir(dir) {
                    Ok(new) => {
                        added |= new;
                        self.watched_dirs.insert(dir.clone());
                    }
                    Err(e) => {
                        self.dirs_unwatched = true;
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; the sweep and the 30 s rescan cover it")
                    }
                }
            }
            if !added {
                break;
            }
        }
        let present: HashSet<&Path> = scan.dirs.iter().map(|d| &**d).collect();
        let gone: Vec<Arc<Path>> = self
            .watched_dirs
            .iter()
            .filter(|d| !present.contains(&***d))
            .cloned()
            .collect();
        for d in gone {
            self.source.unwatch_dir(&d);
            self.watched_dirs.remove(&d);
        }
        self.report_listing(&scan);
        // Watched now; the files are what is left to follow (a listing of
        // 10,000 files names 12,000 directories).
        scan.dirs = Vec::new();
        scan
    }

    /// Paths a listing could not look at, and directories it cut at their
    /// limit: said and counted once per path while the problem lasts.
    fn report_listing(&mut self, scan: &Scan) {
        let mut problems = HashSet::new();
        for (path, e) in &scan.errors {
            if !self.listing_problems.contains(path) {
                self.metrics.listing_errors.inc();
                tracing::warn!(path = %path.display(), error = %e, "cannot list or look at this log path: skipped while that lasts");
            }
            problems.insert(path.clone());
        }
        for (dir, over, limit) in &scan.cut {
            if !self.listing_problems.contains(dir) {
                self.metrics.listings_cut.inc();
                tracing::warn!(dir = %dir.display(), limit, beyond_limit = over, "directory holds more log entries than are followed: the rest are not read");
            }
            problems.insert(dir.clone());
        }
        self.listing_problems = problems;
    }

    /// In-container files that pods declare; a declaration that cannot be
    /// followed is logged and counted once.
    fn scan_declared(&mut self, scan: &mut Scan) {
        let Some(cache) = self.ctx.pods.clone() else {
            return;
        };
        let roots = Roots {
            kubelet_pods_dir: &self.cfg.kubelet_pods_dir,
            allow_hostpath: &self.cfg.allow_hostpath,
        };
        let found = declared::scan(&cache.live_pods(), &self.ctx, &roots);
        self.declared_notes.report(&found, &self.metrics);
        scan.files.extend(found.files);
        let watched = &self.watched_dirs;
        scan.dirs.extend(found.dirs.iter().map(|d| {
            watched
                .get(d.as_path())
                .cloned()
                .unwrap_or_else(|| d.as_path().into())
        }));
    }

    /// Follows what a listing found and retires what it no longer holds.
    pub(super) fn apply_scan(&mut self, mut scan: Scan) {
        // Whether the pod list had arrived before this scan looked at files.
        let complete = self.ctx.pods.as_ref().is_none_or(|c| c.synced());
        let mut seen = HashSet::new();
        let mut present = HashSet::new();
        let mut listed = HashSet::new();
        for pass in 0.. {
            seen.clear();
            listed.clear();
            let mut new_live = false;
            for found in std::mem::take(&mut scan.files) {
                if let Some((id, new)) = self.track(&found, &mut present) {
                    seen.insert(id);
                    new_live |= new && !found.rotated;
                }
                // The paths the sets below keep, so that they forget the
                // ones gone (not every path: most are in none of them).
                if self.pods.holds(&found.path)
                    || self.noted.contains(&*found.path)
                    || self.unreadable.contains(&*found.path)
                {
                    listed.insert(found.path);
                }
            }
            // A live file first seen now may have been created after its
            // directory was listed (a path is stat'ed after the listing): a
            // file rotated just before it was created would then be missing
            // from the listing, and read after its successor. A listing
            // made now holds every rename that preceded the new file.
            if !new_live || pass == RELISTS {
                break;
            }
            scan = self.list();
        }
        let shipped = self.memory.shipped().count();
        let files = &self.files;
        self.memory
            .after_scan(&present, |k| files.by_key(k).is_some(), complete);
        self.replaying &= !complete;
        if self.memory.shipped().count() != shipped {
            self.files.touch();
        }
        self.pods.after_scan(&listed, Instant::now());
        self.metrics
            .files_awaiting_pod
            .set(self.pods.waiting() as u64);
        self.noted.retain(|p| listed.contains(p.as_path()));
        self.unreadable.retain(|p| listed.contains(p.as_path()));
        let vanished: Vec<FileId> = self
            .files
            .iter()
            .filter(|f| !seen.contains(&f.id) && f.status != FileStatus::Gone)
            .map(|f| f.id)
            .collect();
        for id in vanished {
            // Drain what the open descriptor still holds, then close.
            self.set_status(id, FileStatus::Gone);
        }
        #[cfg(debug_assertions)]
        self.files.check_settled();
        self.metrics.files_watched.set(self.files.len() as u64);
        self.metrics.scans.inc();
    }

    /// Follows a discovered file; returns its id if it is being read, and
    /// whether it was opened just now.
    fn track(&mut self, found: &Found, present: &mut HashSet<FileKey>) -> Option<(FileId, bool)> {
        let (preopened, st) = match stat_found(&self.fs, found) {
            Looked::File(preopened, st) => (preopened, st),
            Looked::Gone => return None,
            Looked::NotRegular => {
                self.unreadable(&found.path, None);
                return None;
            }
            Looked::Failed(e) => {
                self.unreadable(&found.path, Some(e));
                return None;
            }
        };
        let key = key_of(&st);
        present.insert(key);
        if let Some(id) = self.files.by_key(&key) {
            if self.files.rename(id, &found.path) {
                if let Some(f) = self.files.get_mut(id) {
                    f.last_activity = Instant::now();
                }
                self.schedule.mark(id);
            }
            self.set_status(id, status_of(found));
            return Some((id, false));
        }
        let Admit::Consider(restored) = self.memory.admit(key, found.rotated) else {
            return None;
        };
        let origin = found.origin();
        if !self.pod_allows(found, &origin, restored.is_some()) {
            // A checkpointed file keeps its checkpoint while it waits.
            if let Some(e) = restored {
                self.memory.keep(key, e);
            }
            return None;
        }
        let meta = self.ctx.render(origin, found.format);
        // A checkpointed file is followed even if it is not to be shipped
        // now (its lines are read and discarded), so it keeps its place.
        if !self.ships(&found.path, &meta) && restored.is_none() {
            return None;
        }
        let id = self.open_new(found, preopened, meta, restored)?;
        Some((id, true))
    }

    /// Whether a file may be opened now, as far as its pod goes
    /// ([`crate::files::pods`]).
    fn pod_allows(&mut self, found: &Found, origin: &Origin, checkpointed: bool) -> bool {
        let facts = pods::Found {
            pod_known: self.ctx.pod_of(origin).is_some(),
            needs_declaration: self.ctx.policy.ship == ShipMode::Declared && origin.env.is_empty(),
            checkpointed,
            rotated: found.rotated,
        };
        match self.pods.check(&found.path, facts, Instant::now()) {
            Gate::Open => true,
            Gate::Wait => false,
            Gate::OpenWithoutPod => {
                self.metrics.files_without_pod.inc();
                tracing::info!(path = %found.path.display(), "pod not known to the API yet; shipping with the metadata the path gives");
                true
            }
        }
    }

    /// Opens a file not followed yet and starts following it where
    /// [`crate::files::lifecycle::Memory::start`] says.
    fn open_new(
        &mut self,
        found: &Found,
        preopened: Option<Handle>,
        meta: FileMeta,
        restored: Option<Entry>,
    ) -> Option<FileId> {
        let file = match preopened {
            Some(f) => f,
            None => self.open(&found.path)?,
        };
        // Identity of what was opened, not of what was stat'ed before.
        let st = file.stat().ok()?;
        if !st.is_file {
            self.unreadable(&found.path, None);
            return None;
        }
        let key = key_of(&st);
        if self.files.by_key(&key).is_some() {
            return None;
        }
        let restored = restored.or_else(|| self.memory.claim(key));
        let stream = StreamId::of(&meta.origin);
        let looks = OnDisk::new(&file, st.len, self.files.of_stream(&stream).collect());
        let start = self
            .memory
            .start(key, restored.as_ref(), found.rotated, &looks);
        drop(looks);
        let (offset, late_rotation) = match start {
            Start::At(offset) => (offset, false),
            Start::Replaced => {
                tracing::info!(path = %found.path.display(), "checkpointed inode now holds another file; reading it from the start");
                (0, false)
            }
            Start::LateRotation => (0, true),
            Start::Later => return None,
        };
        if self.replaying {
            self.metrics
                .checkpoint_replay_bytes
                .add(st.len.saturating_sub(offset));
        }
        let fingerprint =
            Fingerprint::read(&file, Fingerprint::MAX_LEN).unwrap_or(Fingerprint::of(b""));
        let max_record = self.cfg.max_record_bytes;
        let path = found.path.clone();
        let id = self.files.insert(|id| {
            let mut f = TailedFile::new(id, key, file, path, Arc::new(meta), offset, max_record);
            f.fingerprint = fingerprint;
            f.status = status_of(found);
            f.found_rotated = found.rotated;
            f.rotation_counted = late_rotation;
            f.size_seen = st.len;
            f
        })?;
        if late_rotation {
            self.metrics.rotations.inc();
        }
        tracing::debug!(path = %found.path.display(), offset, id, rotated = found.rotated, "following file");
        // Watched before the first read: a write after this is reported, one
        // before it is seen by that read.
        let fd = self.files.get(id).and_then(|f| f.file.fd());
        self.source.watch_file(key, fd);
        self.schedule.mark(id);
        // Not live (a rotated file or a copy): it closes once drained.
        if self
            .files
            .get(id)
            .is_some_and(|f| f.status != FileStatus::Live)
        {
            self.look_soon();
        }
        Some(id)
    }

    /// Opens a log file to read it ([`Fs::open`]); counts and logs a
    /// failure.
    fn open(&mut self, path: &Path) -> Option<Handle> {
        match self.fs.open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                self.unreadable(path, Some(e));
                None
            }
        }
    }

    /// A listed log path that cannot be opened (`error`) or is not a
    /// regular file (`None`): counted and said once while it is listed (a
    /// rescan retries it quietly).
    fn unreadable(&mut self, path: &Path, error: Option<std::io::Error>) {
        if !self.unreadable.insert(path.to_owned()) {
            return;
        }
        let path = path.display().to_string();
        match error {
            Some(e) => {
                self.metrics.open_errors.inc();
                self.open_errors.log(|suppressed| tracing::warn!(path, error = %e, suppressed, "cannot open log file"));
            }
            None => {
                self.metrics.files_not_regular.inc();
                tracing::warn!(
                    path,
                    "not a regular file where a log file should be (a directory, FIFO, socket or device): not read"
                );
            }
        }
    }

    /// Whether a file is shipped (not opted out; declared if only declared
    /// containers ship). Refused declarations and skipped files are logged
    /// and counted once per path.
    fn ships(&mut self, path: &Path, meta: &FileMeta) -> bool {
        let skip = meta.skip_reason(self.ctx.policy.ship);
        // Said once per path while it is listed; a file with nothing to
        // say is not remembered.
        let says = skip.is_some()
            || meta.bad_tags > 0
            || (meta.pod_info.is_none() && !meta.refused.is_empty());
        if !says || !self.noted.insert(path.to_owned()) {
            return skip.is_none();
        }
        let p = path.display().to_string();
        // Declarations of pods known to the API are reported by
        // scan_declared, once per declaration.
        if meta.pod_info.is_none() {
            for r in &meta.refused {
                self.metrics.declarations_refused.inc();
                tracing::warn!(path = p, declaration = %r.name, reason = %r.reason, "log declaration refused");
            }
        }
        if meta.bad_tags > 0 {
            self.metrics.tags_dropped.add(meta.bad_tags as u64);
            tracing::warn!(
                path = p,
                dropped = meta.bad_tags,
                "garbage tags in a log declaration dropped (use k=v,k2=v2)"
            );
        }
        if let Some(why) = skip {
            self.metrics.files_skipped.inc();
            tracing::info!(path = p, why, "not shipping this log");
        }
        skip.is_none()
    }
}
