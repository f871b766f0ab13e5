//! A simulated file system for the model test: directories, inodes with
//! bytes, renames, unlinks and truncation with POSIX semantics for what
//! the agent can observe (an open file keeps its inode across a rename or
//! an unlink; ctime moves on every change of an inode).
//!
//! The writers of the model test hold [`Writer`]s (an inode opened for
//! appending, as a runtime holds its log file open).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::Stat;

#[derive(Debug, Default)]
struct Inode {
    ino: u64,
    state: Mutex<Content>,
}

#[derive(Debug, Default)]
struct Content {
    bytes: Vec<u8>,
    /// A logical clock: bumped by every change.
    ctime: i64,
}

impl Inode {
    fn stat(&self) -> Stat {
        let c = self.state.lock().unwrap();
        Stat {
            dev: 1,
            ino: self.ino,
            len: c.bytes.len() as u64,
            ctime: (c.ctime, 0),
            is_file: true,
            is_dir: false,
        }
    }

    fn change(&self, clock: i64, f: impl FnOnce(&mut Vec<u8>)) {
        let mut c = self.state.lock().unwrap();
        f(&mut c.bytes);
        c.ctime = clock;
    }
}

#[derive(Debug, Default)]
struct Tree {
    dirs: BTreeSet<PathBuf>,
    files: BTreeMap<PathBuf, Arc<Inode>>,
    next_ino: u64,
    clock: i64,
}

impl Tree {
    fn tick(&mut self) -> i64 {
        self.clock += 1;
        self.clock
    }
}

/// The file system.
#[derive(Debug, Default)]
pub struct SimFs {
    tree: Mutex<Tree>,
}

/// A file open for reading.
#[derive(Debug)]
pub struct Handle(Arc<Inode>);

impl Handle {
    pub fn stat(&self) -> Stat {
        self.0.stat()
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> usize {
        let c = self.0.state.lock().unwrap();
        let start = (offset as usize).min(c.bytes.len());
        let n = buf.len().min(c.bytes.len() - start);
        buf[..n].copy_from_slice(&c.bytes[start..start + n]);
        n
    }
}

/// A file open for appending.
#[derive(Debug, Clone)]
pub struct Writer {
    fs: Arc<SimFs>,
    inode: Arc<Inode>,
}

impl Writer {
    pub fn append(&self, bytes: &[u8]) {
        let clock = self.fs.tree.lock().unwrap().tick();
        self.inode.change(clock, |b| b.extend_from_slice(bytes));
    }

    /// `ftruncate`.
    pub fn set_len(&self, len: u64) {
        let clock = self.fs.tree.lock().unwrap().tick();
        self.inode.change(clock, |b| b.resize(len as usize, 0));
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

impl SimFs {
    pub fn new() -> Arc<SimFs> {
        Arc::new(SimFs::default())
    }

    pub fn create_dir_all(&self, path: &Path) {
        let mut t = self.tree.lock().unwrap();
        for a in path.ancestors() {
            if !a.as_os_str().is_empty() {
                t.dirs.insert(a.to_owned());
            }
        }
    }

    /// Opens `path` for appending, creating it if it does not exist.
    pub fn append(self: &Arc<Self>, path: &Path) -> Writer {
        let mut t = self.tree.lock().unwrap();
        assert!(t.dirs.contains(path.parent().unwrap()), "no directory");
        let inode = match t.files.get(path) {
            Some(i) => i.clone(),
            None => {
                t.next_ino += 1;
                let inode = Arc::new(Inode {
                    ino: t.next_ino,
                    ..Default::default()
                });
                t.files.insert(path.to_owned(), inode.clone());
                inode
            }
        };
        Writer {
            fs: self.clone(),
            inode,
        }
    }

    /// `rename(2)`: replaces what was at `to`.
    pub fn rename(&self, from: &Path, to: &Path) {
        let mut t = self.tree.lock().unwrap();
        let inode = t.files.remove(from).expect("rename: no such file");
        let clock = t.tick();
        inode.change(clock, |_| {});
        t.files.insert(to.to_owned(), inode);
    }

    /// `unlink(2)`: open files keep their inode.
    pub fn remove(&self, path: &Path) {
        let mut t = self.tree.lock().unwrap();
        let inode = t.files.remove(path).expect("remove: no such file");
        let clock = t.tick();
        inode.change(clock, |_| {});
    }

    /// Copies the bytes of `from` into a new file `to` (as `cp`).
    pub fn copy(self: &Arc<Self>, from: &Path, to: &Path) {
        let bytes = {
            let t = self.tree.lock().unwrap();
            let src = t.files.get(from).expect("copy: no such file");
            src.state.lock().unwrap().bytes.clone()
        };
        self.append(to).append(&bytes);
    }

    pub(super) fn stat(&self, path: &Path) -> io::Result<Stat> {
        let t = self.tree.lock().unwrap();
        if let Some(i) = t.files.get(path) {
            return Ok(i.stat());
        }
        if t.dirs.contains(path) {
            return Ok(Stat {
                dev: 1,
                ino: 0,
                len: 0,
                ctime: (0, 0),
                is_file: false,
                is_dir: true,
            });
        }
        Err(not_found(path))
    }

    pub(super) fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let t = self.tree.lock().unwrap();
        if !t.dirs.contains(path) {
            return Err(not_found(path));
        }
        let child =
            |p: &PathBuf| (p.parent() == Some(path)).then(|| p.file_name().unwrap().to_owned());
        Ok(t.dirs
            .iter()
            .filter_map(child)
            .chain(t.files.keys().filter_map(child))
            .collect())
    }

    pub(super) fn open(&self, path: &Path) -> io::Result<Handle> {
        let t = self.tree.lock().unwrap();
        t.files
            .get(path)
            .map(|i| Handle(i.clone()))
            .ok_or_else(|| not_found(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Fs, ReadAt, Want};

    #[test]
    fn open_files_keep_their_inode_across_rename_and_unlink() {
        let sim = SimFs::new();
        let fs = Fs::Sim(sim.clone());
        let dir = Path::new("/p/c");
        sim.create_dir_all(dir);
        let w = sim.append(&dir.join("0.log"));
        w.append(b"one\n");
        let r = fs.open(&dir.join("0.log")).unwrap();
        let before = r.stat().unwrap();
        sim.rename(&dir.join("0.log"), &dir.join("0.log.1"));
        w.append(b"two\n");
        let after = r.stat().unwrap();
        assert_eq!(before.ino, after.ino);
        assert!(after.ctime > before.ctime);
        let mut buf = [0u8; 16];
        assert_eq!(r.read_at(&mut buf, 0).unwrap(), 8);
        assert_eq!(&buf[..8], b"one\ntwo\n");
        let (mut names, over) = fs.read_dir(dir, 10, |_| Want::IfRoom).unwrap();
        names.sort();
        assert_eq!((names, over), (vec![OsString::from("0.log.1")], 0));
        sim.remove(&dir.join("0.log.1"));
        assert!(fs.stat(&dir.join("0.log.1")).is_err());
        assert_eq!(r.stat().unwrap().len, 8);
        assert!(fs.is_dir(dir) && fs.is_dir(Path::new("/p")));
        assert_eq!(
            fs.read_dir(Path::new("/p"), 10, |_| Want::IfRoom).unwrap(),
            (vec![OsString::from("c")], 0)
        );
        // Only what `keep` accepts, at most `max` of it.
        let p = Path::new("/p");
        assert_eq!(fs.read_dir(p, 10, |_| Want::No).unwrap(), (vec![], 0));
        assert_eq!(fs.read_dir(p, 0, |_| Want::IfRoom).unwrap(), (vec![], 1));
        let c = vec![OsString::from("c")];
        assert_eq!(fs.read_dir(p, 0, |_| Want::Always).unwrap(), (c, 0));
    }
}
