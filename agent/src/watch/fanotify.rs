//! The fanotify change source: inode marks on the log directories.
//!
//! One group (`FAN_CLASS_NOTIF | FAN_REPORT_DFID_NAME`): every event names
//! the directory (by file handle) and the entry. A directory mark with
//! `FAN_EVENT_ON_CHILD` reports writes to the files in it (`FAN_MODIFY`,
//! `FAN_CLOSE_WRITE`), so files need no marks of their own; `FAN_CREATE`,
//! `FAN_MOVED_FROM/TO`, `FAN_DELETE` and the directory's own deletion or
//! move ask the loop for a rescan. The kernel merges repeated events on the
//! same object while they wait in the queue, and the reader makes at most
//! one pass per tick, so a write storm is a handful of events.
//! `FAN_Q_OVERFLOW` (events lost) → rescan and read every file.
//!
//! Needs CAP_SYS_ADMIN on kernels before 5.13 (unprivileged fanotify with
//! FID reporting and inode marks came then).

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{ChangeQueue, ChangeSource, Pending, pace};
use crate::metrics::Metrics;

/// What a directory mark reports.
const DIR_MASK: u64 = libc::FAN_MODIFY
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_DELETE_SELF
    | libc::FAN_MOVE_SELF
    | libc::FAN_EVENT_ON_CHILD
    | libc::FAN_ONDIR;

const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for any handle.
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// A directory's identity as fanotify reports it: handle type and bytes.
type HandleKey = Vec<u8>;

/// The handle of `path` (`name_to_handle_at`).
fn handle_of(path: &Path) -> std::io::Result<HandleKey> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut h = FileHandle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: valid NUL-terminated path, a handle buffer whose capacity is
    // in handle_bytes, and an int for the mount id.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            &mut h as *mut FileHandle,
            &mut mount_id as *mut libc::c_int,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(handle_key(
        h.handle_type,
        &h.f_handle[..h.handle_bytes as usize],
    ))
}

fn handle_key(handle_type: i32, bytes: &[u8]) -> HandleKey {
    let mut k = Vec::with_capacity(4 + bytes.len());
    k.extend_from_slice(&handle_type.to_ne_bytes());
    k.extend_from_slice(bytes);
    k
}

pub struct FanotifySource {
    fd: Arc<OwnedFd>,
    dirs: Arc<Mutex<HashMap<HandleKey, PathBuf>>>,
    by_path: HashMap<PathBuf, HandleKey>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fanotify group as this backend uses it.
///
/// fanotify_init, fanotify_mark and name_to_handle_at are called through
/// libc by hand: rustix 1.1 has no wrappers for them.
pub fn init() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_NOTIF | libc::FAN_REPORT_DFID_NAME | libc::FAN_CLOEXEC,
            (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mark(fd: &OwnedFd, flags: libc::c_uint, dir: &Path) -> std::io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid group fd and NUL-terminated path.
    let r = unsafe {
        libc::fanotify_mark(
            fd.as_raw_fd(),
            flags | libc::FAN_MARK_ONLYDIR,
            DIR_MASK,
            libc::AT_FDCWD,
            c.as_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl FanotifySource {
    pub fn start(
        queue: ChangeQueue,
        metrics: Arc<Metrics>,
        tick: Duration,
    ) -> std::io::Result<FanotifySource> {
        let fd = Arc::new(init()?);
        let dirs: Arc<Mutex<HashMap<HandleKey, PathBuf>>> = Arc::default();
        let (rfd, rdirs) = (fd.clone(), dirs.clone());
        std::thread::Builder::new()
            .name("bpftail-fanotify".into())
            .spawn(move || read_events(&rfd, &rdirs, &queue, &metrics, tick))?;
        Ok(FanotifySource {
            fd,
            dirs,
            by_path: HashMap::new(),
        })
    }
}

impl ChangeSource for FanotifySource {
    fn watch_dir(&mut self, dir: &Arc<Path>) -> std::io::Result<bool> {
        let dir: &Path = dir;
        let handle = handle_of(dir)?;
        if self.by_path.get(dir) == Some(&handle) {
            return Ok(false);
        }
        mark(&self.fd, libc::FAN_MARK_ADD, dir)?;
        let mut dirs = lock(&self.dirs);
        if let Some(old) = self.by_path.insert(dir.to_owned(), handle.clone()) {
            dirs.remove(&old);
        }
        dirs.insert(handle, dir.to_owned());
        Ok(true)
    }

    fn unwatch_dir(&mut self, dir: &Path) {
        if let Some(handle) = self.by_path.remove(dir) {
            lock(&self.dirs).remove(&handle);
            // Fails harmlessly when the directory is gone (the kernel
            // dropped the mark with the inode).
            let _ = mark(&self.fd, libc::FAN_MARK_REMOVE, dir);
        }
    }
}

/// Event header (`struct fanotify_event_metadata`).
const META_LEN: usize = 24;

fn read_events(
    fd: &OwnedFd,
    dirs: &Mutex<HashMap<HandleKey, PathBuf>>,
    queue: &ChangeQueue,
    metrics: &Metrics,
    tick: Duration,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut batch = Pending::default();
    let mut last_pass = Instant::now() - tick;
    loop {
        let n = match rustix::io::read(fd, &mut buf[..]) {
            Ok(n) => n,
            Err(e) => {
                let e = std::io::Error::from(e);
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "fanotify read failed; falling back to the safety sweep");
                return;
            }
        };
        metrics.watcher_wakeups.inc();
        {
            let dirs = lock(dirs);
            parse(&buf[..n], &dirs, &mut batch, metrics);
        }
        queue.merge(&mut batch);
        // Meanwhile the kernel merges repeated events on the same file.
        pace(&mut last_pass, tick);
    }
}

fn u16_at(b: &[u8], o: usize) -> usize {
    u16::from_ne_bytes([b[o], b[o + 1]]) as usize
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Turns one read's worth of events into `batch`.
fn parse(
    mut buf: &[u8],
    dirs: &HashMap<HandleKey, PathBuf>,
    batch: &mut Pending,
    metrics: &Metrics,
) {
    while buf.len() >= META_LEN {
        let event_len = u32_at(buf, 0) as usize;
        let meta_len = u16_at(buf, 6);
        if event_len < META_LEN || event_len > buf.len() || meta_len < META_LEN {
            break;
        }
        let mask = u64::from_ne_bytes(buf[8..16].try_into().unwrap_or([0; 8]));
        let efd = i32::from_ne_bytes(buf[16..20].try_into().unwrap_or([0; 4]));
        if efd >= 0 {
            // Not expected with FID reporting, but never leak one.
            // SAFETY: the kernel gave us this descriptor.
            unsafe { libc::close(efd) };
        }
        let event = &buf[..event_len];
        buf = &buf[event_len..];
        if mask & libc::FAN_Q_OVERFLOW != 0 {
            metrics.watcher_overflows.inc();
            batch.rescan = true;
            batch.all_files = true;
            continue;
        }
        let mut file = None;
        let mut info = &event[meta_len.min(event.len())..];
        while info.len() >= 4 {
            let kind = info[0];
            let len = u16_at(info, 2);
            if len < 4 || len > info.len() {
                break;
            }
            let rec = &info[..len];
            info = &info[len..];
            // header(4) fsid(8) handle_bytes(4) handle_type(4) f_handle[] name\0
            if kind != libc::FAN_EVENT_INFO_TYPE_DFID_NAME || rec.len() < 20 {
                continue;
            }
            let hbytes = u32_at(rec, 12) as usize;
            let htype = i32::from_ne_bytes(rec[16..20].try_into().unwrap_or([0; 4]));
            let Some(handle) = rec.get(20..20 + hbytes) else {
                continue;
            };
            let name = &rec[20 + hbytes..];
            let name = &name[..memchr::memchr(0, name).unwrap_or(name.len())];
            if let Some(dir) = dirs.get(&handle_key(htype, handle))
                && !name.is_empty()
                && name != b"."
            {
                file = Some(dir.join(OsStr::from_bytes(name)));
            }
        }
        let writes = libc::FAN_MODIFY | libc::FAN_CLOSE_WRITE;
        if mask & !writes & !libc::FAN_ONDIR != 0 {
            // An entry appeared, vanished or moved, or a directory went.
            batch.rescan = true;
        }
        if mask & writes != 0 {
            match file {
                Some(f) => {
                    batch.written.insert(f);
                }
                // A directory we no longer know: look again.
                None => batch.rescan = true,
            }
        }
    }
}

/// Why fanotify is unusable here: the call that failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("fanotify_init: {0}")]
    Init(std::io::Error),
    #[error("fanotify_mark: {0}")]
    Mark(std::io::Error),
    #[error("name_to_handle_at: {0}")]
    Handle(std::io::Error),
}

/// Whether fanotify with directory FID reporting works here.
pub fn probe() -> Result<(), ProbeError> {
    let fd = init().map_err(ProbeError::Init)?;
    let dir = std::env::temp_dir();
    mark(&fd, libc::FAN_MARK_ADD, &dir).map_err(ProbeError::Mark)?;
    handle_of(&dir).map_err(ProbeError::Handle)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(
        q: &ChangeQueue,
        wake: &crossbeam_channel::Receiver<()>,
        until: impl Fn(&Pending) -> bool,
    ) -> Pending {
        let mut got = Pending::default();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !until(&got) && Instant::now() < deadline {
            let _ = wake.recv_timeout(Duration::from_millis(50));
            let mut p = Pending::default();
            q.take(&mut p);
            got.rescan |= p.rescan;
            got.all_files |= p.all_files;
            got.written.extend(p.written);
        }
        got
    }

    #[test]
    fn reports_writes_by_path_and_new_entries_as_rescans() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, wake) = crossbeam_channel::bounded(1);
        let q = ChangeQueue::new(tx);
        let mut src =
            FanotifySource::start(q.clone(), Arc::default(), Duration::from_millis(5)).unwrap();
        assert!(src.watch_dir(&Arc::from(dir.path())).unwrap());
        assert!(
            !src.watch_dir(&Arc::from(dir.path())).unwrap(),
            "idempotent"
        );
        let file = dir.path().join("0.log");
        std::fs::write(&file, b"x\n").unwrap();
        let got = collect(&q, &wake, |p| p.rescan && p.written.contains(&file));
        assert!(got.rescan, "creating a file asks for a rescan");
        assert!(
            got.written.contains(&file),
            "writing reports the file's path"
        );
    }

    #[test]
    fn a_write_storm_is_a_few_events_and_a_moved_in_file_a_rescan() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("0.log");
        let mut f = std::fs::File::create(&file).unwrap();
        let (tx, wake) = crossbeam_channel::bounded(1);
        let q = ChangeQueue::new(tx);
        let metrics = Arc::new(Metrics::default());
        let mut src =
            FanotifySource::start(q.clone(), metrics.clone(), Duration::from_millis(10)).unwrap();
        src.watch_dir(&Arc::from(dir.path())).unwrap();
        for _ in 0..100_000 {
            f.write_all(b"line\n").unwrap();
        }
        let got = collect(&q, &wake, |p| p.written.contains(&file));
        assert!(got.written.contains(&file));
        let wakeups = metrics.watcher_wakeups.get();
        assert!(
            wakeups < 2_000,
            "{wakeups} reader passes for 100,000 writes"
        );
        let other = tempfile::tempdir_in(dir.path().parent().unwrap()).unwrap();
        std::fs::write(other.path().join("1.log"), b"y\n").unwrap();
        std::fs::rename(other.path().join("1.log"), dir.path().join("1.log")).unwrap();
        assert!(collect(&q, &wake, |p| p.rescan).rescan);
    }
}
