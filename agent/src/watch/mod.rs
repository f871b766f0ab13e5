//! Change detection: which files were written, which directories changed.
//!
//! A [`ChangeSource`] watches the log directories and reports into a shared,
//! coalescing [`ChangeQueue`]: a burst of writes to one file becomes one
//! entry, however many events the backend produced. The data loop sleeps on
//! the queue's wake channel, so an idle agent does not poll.
//!
//! Backends, in the order `--watcher auto` tries them ([`start`]):
//! - [`ebpf`]: a kernel hook after every completed write reports writes to
//!   the files the loop has open (by inode), with inotify for directory
//!   changes;
//! - [`fanotify`]: directory marks report writes to the files in them and
//!   entries changing;
//! - inotify: one watch per log directory, the same;
//! - poll: every open file is read at an interval.
//!
//! No backend is trusted alone: the data loop's slow safety sweep stats
//! every open file.
//!
//! Limits: inotify sees writes that go through the VFS write paths, not
//! stores into a shared mmap of the file (the sweep covers those). On queue
//! overflow (`IN_Q_OVERFLOW`) the loop rescans and re-reads everything.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};

use crate::checkpoint::FileKey;
use crate::config::WatcherKind;
use crate::metrics::Metrics;

pub mod btf;
pub mod ebpf;
pub mod fanotify;
pub mod kernel_id;
mod loader;

/// What the data loop must look at, coalesced.
#[derive(Debug, Default)]
pub struct Pending {
    /// Files written (by path: dir + name as the backend knows them).
    pub written: HashSet<PathBuf>,
    /// Files written (by device and inode: backends that see inodes).
    pub keys: HashSet<FileKey>,
    /// Entries appeared, vanished or were renamed somewhere: rescan.
    pub rescan: bool,
    /// Events were lost or the backend cannot tell files apart: read every
    /// open file.
    pub all_files: bool,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.written.is_empty() && self.keys.is_empty() && !self.rescan && !self.all_files
    }
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Sender<()>,
}

/// The coalescing queue between a change source and the data loop.
#[derive(Clone)]
pub struct ChangeQueue {
    shared: Arc<Shared>,
}

impl ChangeQueue {
    /// A queue that wakes the data loop through `wake` (a channel of
    /// capacity 1 it sleeps on).
    pub fn new(wake: Sender<()>) -> ChangeQueue {
        ChangeQueue {
            shared: Arc::new(Shared {
                pending: Mutex::new(Pending::default()),
                wake,
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Pending)) {
        {
            let mut p = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            f(&mut p);
        }
        // One token is enough: the loop takes everything when it wakes.
        let _ = self.shared.wake.try_send(());
    }

    /// Adds everything in `batch` (which is left empty) under one lock.
    pub fn merge(&self, batch: &mut Pending) {
        if batch.is_empty() {
            return;
        }
        self.update(|p| {
            for path in batch.written.drain() {
                p.written.insert(path);
            }
            p.keys.extend(batch.keys.drain());
            p.rescan |= std::mem::take(&mut batch.rescan);
            p.all_files |= std::mem::take(&mut batch.all_files);
        });
    }

    pub fn rescan(&self) {
        self.update(|p| p.rescan = true);
    }

    pub fn all_files(&self) {
        self.update(|p| p.all_files = true);
    }

    /// Wakes the data loop without news (shutdown).
    pub fn wake(&self) {
        let _ = self.shared.wake.try_send(());
    }

    /// Takes everything pending, leaving `spare` (emptied) in its place so
    /// the sets' memory is reused.
    pub fn take(&self, spare: &mut Pending) {
        spare.written.clear();
        spare.keys.clear();
        spare.rescan = false;
        spare.all_files = false;
        let mut p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *p, spare);
    }
}

/// A backend that reports changes under watched directories.
pub trait ChangeSource: Send {
    /// Reports writes to files in `dir` and entries changing in it.
    /// Idempotent; true if a new watch was placed. A backend that keeps
    /// the path shares it (the data loop keeps it too).
    fn watch_dir(&mut self, dir: &Arc<Path>) -> std::io::Result<bool>;
    /// Stops watching `dir` (it is gone or no longer of interest).
    fn unwatch_dir(&mut self, dir: &Path);
    /// Called when the data loop has read everything: turns write reports
    /// back on where the backend coalesced them off, and returns those
    /// directories, whose files the loop then reads once more.
    fn rearm(&mut self) -> Vec<PathBuf> {
        Vec::new()
    }
    /// The data loop opened this file (backends that watch files); `file`
    /// is its descriptor (none on the tests' simulated filesystem).
    fn watch_file(&mut self, _key: FileKey, _file: Option<BorrowedFd<'_>>) {}
    /// The data loop closed this file.
    fn unwatch_file(&mut self, _key: FileKey) {}
    /// Called at each safety sweep (refresh figures, housekeeping).
    fn sweep(&mut self) {}
    /// The sweep found unread bytes in this file that no report announced.
    fn missed(&mut self, _key: FileKey) {}
    /// Whether the data loop must `fstat` each file just before reading
    /// it: the backend's kernel events fire for a file's next write only
    /// once its timestamps were queried (multigrain timestamps). A write
    /// after that stat makes an event; one before it is seen by the read.
    fn arms_by_stat(&self) -> bool {
        false
    }
    /// Whether the backend reports every write to a watched file (the
    /// files it cannot vouch for it polls itself): the safety sweep then
    /// runs rarely (`Config::sweep_interval_trusted`).
    fn sees_every_write(&self) -> bool {
        false
    }
}

/// Keeps a reader thread to at most one pass per `tick`: sleeps out the
/// rest of the tick since `last_pass`, then starts the next one.
fn pace(last_pass: &mut Instant, tick: Duration) {
    let since = last_pass.elapsed();
    if since < tick {
        std::thread::sleep(tick - since);
    }
    *last_pass = Instant::now();
}

/// Settings of the backends.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Its `tick` also paces the fanotify reader.
    pub ebpf: ebpf::Options,
    pub poll_interval: Duration,
}

/// Why a backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    #[error(transparent)]
    Ebpf(#[from] ebpf::Unusable),
    /// fanotify, inotify, or the poll thread.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// No backend could start: each one tried, and why.
#[derive(Debug)]
pub struct NoBackend(pub Vec<(WatcherKind, Unusable)>);

impl std::fmt::Display for NoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (kind, why)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {why}", kind.as_str())?;
        }
        Ok(())
    }
}

impl std::error::Error for NoBackend {}

/// A started backend, and why the ones tried before it were unusable.
pub struct Started {
    pub source: Box<dyn ChangeSource>,
    pub skipped: Vec<(WatcherKind, Unusable)>,
    /// What was chosen, with detail (e.g. the eBPF attachment).
    pub detail: String,
}

/// One step of the backend selection.
#[derive(Debug, Clone)]
enum Step {
    Ebpf(Vec<ebpf::Attach>),
    Fanotify,
    Inotify,
    Poll,
}

impl Step {
    fn kind(&self) -> WatcherKind {
        match self {
            Step::Ebpf(_) => WatcherKind::Ebpf,
            Step::Fanotify => WatcherKind::Fanotify,
            Step::Inotify => WatcherKind::Inotify,
            Step::Poll => WatcherKind::Poll,
        }
    }
}

/// The order `kind` tries backends in. `auto`: eBPF, fanotify, inotify,
/// poll — but with eBPF attached by the `sys_exit` tracepoints only after
/// fanotify: a syscall tracepoint puts every syscall of every process on
/// the node through the kernel's tracing slow path (measured here: +120 ns
/// per syscall with an empty program, +50 % on a getpid loop), while
/// fexit (trampolines) and fanotify marks cost nothing outside the log
/// files. An explicit `--ebpf-attach` or `--watcher ebpf` uses the
/// tracepoints when asked.
fn plan(kind: WatcherKind, attach: &[ebpf::Attach]) -> Vec<Step> {
    use ebpf::Attach;
    let default_attach = attach == Attach::ALL;
    match kind {
        WatcherKind::Auto if default_attach => vec![
            Step::Ebpf(Attach::ALL.to_vec()),
            Step::Fanotify,
            Step::Inotify,
            Step::Poll,
        ],
        WatcherKind::Auto => vec![
            Step::Ebpf(attach.to_vec()),
            Step::Fanotify,
            Step::Inotify,
            Step::Poll,
        ],
        WatcherKind::Ebpf => vec![Step::Ebpf(attach.to_vec())],
        WatcherKind::Fanotify => vec![Step::Fanotify],
        WatcherKind::Inotify => vec![Step::Inotify],
        WatcherKind::Poll => vec![Step::Poll],
    }
}

/// What `auto` picks given which backends work here (for `bpftail probe`).
pub fn auto_choice(usable_attach: &[ebpf::Attach], fanotify: bool, inotify: bool) -> String {
    for step in plan(WatcherKind::Auto, &ebpf::Attach::ALL) {
        match step {
            Step::Ebpf(a) => {
                if let Some(x) = a.iter().find(|x| usable_attach.contains(x)) {
                    return format!("ebpf ({})", x.name());
                }
            }
            Step::Fanotify if fanotify => return "fanotify".into(),
            Step::Inotify if inotify => return "inotify".into(),
            Step::Poll => return "poll".into(),
            _ => {}
        }
    }
    "poll".into()
}

/// Starts the backend `kind`, trying backends in the order of [`plan`].
/// A forced backend that cannot start is an error.
pub fn start(
    kind: WatcherKind,
    opts: &WatchOptions,
    queue: &ChangeQueue,
    metrics: &Arc<Metrics>,
) -> Result<Started, NoBackend> {
    let mut skipped = Vec::new();
    for step in plan(kind, &opts.ebpf.attach) {
        let r: Result<(Box<dyn ChangeSource>, String), Unusable> = match &step {
            Step::Ebpf(attach) => {
                let o = ebpf::Options {
                    attach: attach.clone(),
                    ..opts.ebpf.clone()
                };
                ebpf::EbpfSource::start(queue.clone(), metrics.clone(), &o)
                    .map(|s| {
                        let detail = format!("ebpf ({})", s.attach().name());
                        (Box::new(s) as Box<dyn ChangeSource>, detail)
                    })
                    .map_err(Unusable::from)
            }
            Step::Fanotify => {
                fanotify::FanotifySource::start(queue.clone(), metrics.clone(), opts.ebpf.tick)
                    .map(|s| (Box::new(s) as Box<dyn ChangeSource>, "fanotify".to_owned()))
                    .map_err(Unusable::from)
            }
            Step::Inotify => InotifySource::start(queue.clone(), metrics.clone())
                .map(|s| (Box::new(s) as Box<dyn ChangeSource>, "inotify".to_owned()))
                .map_err(Unusable::from),
            Step::Poll => PollSource::start(queue.clone(), opts.poll_interval, 8, metrics.clone())
                .map(|s| (Box::new(s) as Box<dyn ChangeSource>, "poll".to_owned()))
                .map_err(Unusable::from),
        };
        match r {
            Ok((source, detail)) => {
                return Ok(Started {
                    source,
                    skipped,
                    detail,
                });
            }
            Err(e) => skipped.push((step.kind(), e)),
        }
    }
    Err(NoBackend(skipped))
}

/// inotify, one watch per directory.
///
/// Coalescing: the first write reported for a directory disarms its
/// `IN_MODIFY` (entries appearing and vanishing stay reported), so a write
/// storm costs one event, not one per write. The data loop re-arms with
/// [`ChangeSource::rearm`] once it has read everything, then reads that
/// directory's files once more: a write before the re-arm is seen by that
/// read, one after it makes a new event. Nothing is missed.
pub struct InotifySource {
    shared: Arc<InotifyShared>,
    reports: Reports,
    by_path: HashMap<Arc<Path>, WatchDescriptor>,
}

/// What an [`InotifySource`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reports {
    /// Writes (`IN_MODIFY`) and entries changing.
    WritesAndEntries,
    /// Entries appearing, vanishing and renamed only.
    EntriesOnly,
}

struct InotifyShared {
    watches: Mutex<Watches>,
    dirs: Mutex<HashMap<WatchDescriptor, Arc<Path>>>,
    /// Directories whose `IN_MODIFY` is off until the data loop re-arms.
    disarmed: Mutex<HashSet<WatchDescriptor>>,
}

/// What a directory watch reports when armed.
const ARMED: WatchMask = WatchMask::MODIFY
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);
/// The same without writes.
const DISARMED: WatchMask = ARMED.difference(WatchMask::MODIFY);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl InotifySource {
    /// Starts the reader thread.
    pub fn start(queue: ChangeQueue, metrics: Arc<Metrics>) -> std::io::Result<InotifySource> {
        InotifySource::start_with(queue, metrics, Reports::WritesAndEntries)
    }

    /// Entries appearing, vanishing and renamed only: for backends that
    /// learn about writes another way.
    pub fn start_dirs_only(
        queue: ChangeQueue,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<InotifySource> {
        InotifySource::start_with(queue, metrics, Reports::EntriesOnly)
    }

    fn start_with(
        queue: ChangeQueue,
        metrics: Arc<Metrics>,
        reports: Reports,
    ) -> std::io::Result<InotifySource> {
        let inotify = Inotify::init()?;
        let shared = Arc::new(InotifyShared {
            watches: Mutex::new(inotify.watches()),
            dirs: Mutex::default(),
            disarmed: Mutex::default(),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("bpftail-inotify".into())
            .spawn(move || read_events(inotify, thread_shared, queue, metrics))?;
        Ok(InotifySource {
            shared,
            reports,
            by_path: HashMap::new(),
        })
    }
}

/// Events in one read above which the reader pauses briefly, so that a
/// write storm is read in large batches rather than one wakeup per write.
const BUSY_BATCH: usize = 64;

fn read_events(
    mut inotify: Inotify,
    shared: Arc<InotifyShared>,
    queue: ChangeQueue,
    metrics: Arc<Metrics>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut path = PathBuf::new();
    // What one read reported, deduplicated, handed over under one lock.
    let mut batch = Pending::default();
    loop {
        let events = match inotify.read_events_blocking(&mut buf) {
            Ok(ev) => ev,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Without inotify the sweep and rescans still make progress.
                tracing::error!(error = %e, "inotify read failed; falling back to the safety sweep");
                return;
            }
        };
        metrics.watcher_wakeups.inc();
        let mut n = 0;
        {
            let mut dirs = lock(&shared.dirs);
            let mut disarmed = lock(&shared.disarmed);
            for ev in events {
                n += 1;
                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    metrics.watcher_overflows.inc();
                    batch.rescan = true;
                    batch.all_files = true;
                } else if ev.mask.contains(EventMask::MODIFY) {
                    if let (Some(dir), Some(name)) = (dirs.get(&ev.wd), ev.name) {
                        if disarmed.insert(ev.wd.clone()) {
                            // Fails only if the directory is gone (then its
                            // removal is reported).
                            let _ = lock(&shared.watches).add(dir, DISARMED);
                        }
                        set_path(&mut path, dir, name);
                        if !batch.written.contains(&path) {
                            batch.written.insert(path.clone());
                        }
                    }
                } else {
                    if ev.mask.contains(EventMask::IGNORED) {
                        // The kernel dropped the watch (directory gone): a
                        // directory at that path later is watched anew.
                        dirs.remove(&ev.wd);
                        disarmed.remove(&ev.wd);
                    }
                    // Create, delete, rename, or the watched directory itself went.
                    batch.rescan = true;
                }
            }
        }
        queue.merge(&mut batch);
        if n >= BUSY_BATCH {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

fn set_path(path: &mut PathBuf, dir: &Path, name: &OsStr) {
    path.clear();
    path.push(dir);
    path.push(name);
}

impl ChangeSource for InotifySource {
    fn watch_dir(&mut self, dir: &Arc<Path>) -> std::io::Result<bool> {
        if let Some(wd) = self.by_path.get(&**dir)
            && lock(&self.shared.dirs).contains_key(wd)
        {
            return Ok(false);
        }
        let mask = match self.reports {
            Reports::WritesAndEntries => ARMED,
            Reports::EntriesOnly => DISARMED,
        };
        let wd = lock(&self.shared.watches).add(dir, mask)?;
        // Shared by both maps and the data loop (12,000 directories at
        // 10,000 files).
        lock(&self.shared.dirs).insert(wd.clone(), dir.clone());
        self.by_path.insert(dir.clone(), wd);
        Ok(true)
    }

    fn unwatch_dir(&mut self, dir: &Path) {
        if let Some(wd) = self.by_path.remove(dir) {
            lock(&self.shared.dirs).remove(&wd);
            lock(&self.shared.disarmed).remove(&wd);
            // Fails harmlessly if the kernel already dropped the watch.
            let _ = lock(&self.shared.watches).remove(wd);
        }
    }

    fn rearm(&mut self) -> Vec<PathBuf> {
        let wds: Vec<WatchDescriptor> = lock(&self.shared.disarmed).drain().collect();
        if wds.is_empty() {
            return Vec::new();
        }
        let dirs = lock(&self.shared.dirs);
        let mut watches = lock(&self.shared.watches);
        wds.iter()
            .filter_map(|wd| dirs.get(wd))
            .filter(|dir| watches.add(dir, ARMED).is_ok())
            .map(|dir| dir.to_path_buf())
            .collect()
    }
}

/// Stat polling: every `interval`, every open file is read (a `pread` that
/// returns 0 when nothing is new); directories are rescanned every
/// `rescan_every` turns. For filesystems where inotify says nothing.
pub struct PollSource;

impl PollSource {
    pub fn start(
        queue: ChangeQueue,
        interval: Duration,
        rescan_every: u32,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<PollSource> {
        std::thread::Builder::new()
            .name("bpftail-poll".into())
            .spawn(move || {
                let mut turn = 0u32;
                loop {
                    std::thread::sleep(interval);
                    metrics.watcher_wakeups.inc();
                    turn = turn.wrapping_add(1);
                    if turn.is_multiple_of(rescan_every.max(1)) {
                        queue.rescan();
                    }
                    queue.all_files();
                }
            })?;
        Ok(PollSource)
    }
}

impl ChangeSource for PollSource {
    fn watch_dir(&mut self, _: &Arc<Path>) -> std::io::Result<bool> {
        Ok(false)
    }
    fn unwatch_dir(&mut self, _: &Path) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inotify_reports_writes_by_path_and_new_entries_as_rescans() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, wake) = crossbeam_channel::bounded(1);
        let q = ChangeQueue::new(tx);
        let mut src = InotifySource::start(q.clone(), Arc::default()).unwrap();
        src.watch_dir(&Arc::from(dir.path())).unwrap();
        let file = dir.path().join("0.log");
        std::fs::write(&file, b"x\n").unwrap();
        let mut got = Pending::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !(got.rescan && got.written.contains(&file)) && std::time::Instant::now() < deadline {
            let _ = wake.recv_timeout(Duration::from_millis(100));
            let mut p = Pending::default();
            q.take(&mut p);
            got.rescan |= p.rescan;
            got.written.extend(p.written);
        }
        assert!(got.rescan, "creating a file asks for a rescan");
        assert!(
            got.written.contains(&file),
            "writing reports the file's path"
        );
    }

    #[test]
    fn inotify_coalesces_a_write_storm_until_rearmed() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("0.log");
        let mut f = std::fs::File::create(&file).unwrap();
        let (tx, wake) = crossbeam_channel::bounded(1);
        let q = ChangeQueue::new(tx);
        let mut src = InotifySource::start(q.clone(), Arc::default()).unwrap();
        src.watch_dir(&Arc::from(dir.path())).unwrap();
        let wait_for_write = |q: &ChangeQueue| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let _ = wake.recv_timeout(Duration::from_millis(50));
                let mut p = Pending::default();
                q.take(&mut p);
                if p.written.contains(&file) || std::time::Instant::now() > deadline {
                    return p.written.contains(&file);
                }
            }
        };
        f.write_all(b"first\n").unwrap();
        assert!(wait_for_write(&q));
        // Disarmed: a storm of writes reports nothing more...
        for _ in 0..1000 {
            f.write_all(b"more\n").unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut p = Pending::default();
        q.take(&mut p);
        assert!(
            p.written.is_empty(),
            "disarmed before the first report was handed over"
        );
        // ...until the data loop re-arms; then the next write is reported.
        assert_eq!(src.rearm(), vec![dir.path().to_owned()]);
        assert!(src.rearm().is_empty());
        f.write_all(b"after\n").unwrap();
        assert!(wait_for_write(&q));
    }

    #[test]
    fn a_directory_made_again_at_the_same_path_is_watched_anew() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("c");
        std::fs::create_dir(&dir).unwrap();
        let (tx, wake) = crossbeam_channel::bounded(1);
        let q = ChangeQueue::new(tx);
        let mut src = InotifySource::start(q.clone(), Arc::default()).unwrap();
        assert!(src.watch_dir(&Arc::from(dir.as_path())).unwrap());
        assert!(
            !src.watch_dir(&Arc::from(dir.as_path())).unwrap(),
            "idempotent"
        );
        std::fs::remove_dir(&dir).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // Until the kernel's IN_IGNORED is processed, the old watch counts.
        while !src
            .watch_dir(&Arc::from(dir.as_path()))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::create_dir(&dir).unwrap();
        assert!(
            src.watch_dir(&Arc::from(dir.as_path())).unwrap(),
            "a new watch on the new directory"
        );
        let file = dir.join("0.log");
        std::fs::write(&file, b"x\n").unwrap();
        let mut got = false;
        while !got && std::time::Instant::now() < deadline {
            let _ = wake.recv_timeout(Duration::from_millis(50));
            let mut p = Pending::default();
            q.take(&mut p);
            got = p.written.contains(&file);
        }
        assert!(got);
    }

    #[test]
    fn no_backend_names_each_one_tried_and_why() {
        let e = NoBackend(vec![
            (
                WatcherKind::Ebpf,
                Unusable::Ebpf(ebpf::Unusable("bpf(BPF_MAP_CREATE): denied".into())),
            ),
            (
                WatcherKind::Fanotify,
                Unusable::Io(std::io::Error::from_raw_os_error(libc::EPERM)),
            ),
        ]);
        assert_eq!(
            e.to_string(),
            "ebpf: bpf(BPF_MAP_CREATE): denied; fanotify: Operation not permitted (os error 1)"
        );
    }

    #[test]
    fn a_burst_of_writes_is_one_entry() {
        let (tx, wake) = crossbeam_channel::bounded(1);
        let q = ChangeQueue::new(tx);
        let mut batch = Pending::default();
        for _ in 0..1000 {
            batch.written.insert(PathBuf::from("/x/0.log"));
            q.merge(&mut batch);
            assert!(batch.is_empty(), "merge takes the batch");
        }
        assert!(wake.try_recv().is_ok());
        assert!(wake.try_recv().is_err(), "one wake token, not a thousand");
        let mut p = Pending::default();
        q.take(&mut p);
        assert_eq!(p.written.len(), 1);
    }
}
