//! The registry: the one owner of the files being followed and of every
//! index over them.
//!
//! Indexes: by id (the number that travels with each record), by identity
//! ([`FileKey`]: device and inode), by current path, and per container
//! stream the files that left their live path, oldest first (read to their
//! end before anything newer of the stream).
//!
//! Identity fields of a [`TailedFile`] — `key`, `path`, `status`, `stream`
//! — change only through [`Registry::insert`], [`Registry::rename`],
//! [`Registry::set_status`] and [`Registry::remove`], which keep the indexes
//! in step; everything else of a file (offsets, decoder, metadata) is the
//! caller's through [`Registry::get_mut`]. [`Registry::check_invariants`]
//! proves the indexes agree (run after every mutation in debug builds).
//!
//! Invariants:
//! - `by_key` holds exactly one entry per file: its key, to its id.
//! - a `by_path` entry names a file at that path that is not `Gone`; once
//!   a scan has settled every file ([`Registry::check_settled`]), every
//!   file that is not `Gone` has its path there.
//! - `retired[s]` lists exactly the files of stream `s` that are not
//!   `Live`, each once, in the order they left `Live`; no list is empty.
//! - [`Registry::generation`] changes whenever a file comes, goes, moves
//!   or changes status, or a caller reports progress with
//!   [`Registry::touch`] (the checkpoint is written only when it changed).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::Arc;

use hashbrown::HashTable;

use crate::checkpoint::FileKey;
use crate::files::StreamId;
use crate::tail::{FileStatus, TailedFile};

/// A file's number within this process. It travels in 24 bits of a
/// record's delivery report.
pub type FileId = u32;

/// Largest [`FileId`].
pub const MAX_FILE_ID: FileId = (1 << 24) - 1;

#[derive(Debug)]
pub struct Registry {
    /// Boxed: a table slot is then a pointer, not a whole file (10,000
    /// files in a 16,384-slot table held 10.5 MiB inline, twice that while
    /// it grew).
    files: HashMap<FileId, Box<TailedFile>>,
    /// Ids, hashed and compared by their file's key (4 bytes an entry: a
    /// map holding the key as well took 24, 0.4 MiB at 10,000 files).
    by_key: HashTable<FileId>,
    /// Ids, hashed and compared by their file's path.
    by_path: HashTable<FileId>,
    hasher: RandomState,
    retired: HashMap<StreamId, Vec<FileId>>,
    next_id: FileId,
    generation: u64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            files: HashMap::new(),
            by_key: HashTable::new(),
            by_path: HashTable::new(),
            hasher: RandomState::new(),
            retired: HashMap::new(),
            next_id: 1,
            generation: 0,
        }
    }
}

impl Registry {
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn get(&self, id: FileId) -> Option<&TailedFile> {
        self.files.get(&id).map(|f| &**f)
    }

    /// The file, to read it or move its offsets; its identity fields are
    /// changed through the registry's own mutators only.
    pub fn get_mut(&mut self, id: FileId) -> Option<&mut TailedFile> {
        self.files.get_mut(&id).map(|f| &mut **f)
    }

    pub fn iter(&self) -> impl Iterator<Item = &TailedFile> {
        self.files.values().map(|f| &**f)
    }

    /// Every file, mutably (see [`Registry::get_mut`]).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut TailedFile> {
        self.files.values_mut().map(|f| &mut **f)
    }

    pub fn ids(&self) -> impl Iterator<Item = FileId> + '_ {
        self.files.keys().copied()
    }

    pub fn by_key(&self, key: &FileKey) -> Option<FileId> {
        let files = &self.files;
        self.by_key
            .find(self.hasher.hash_one(key), |id| files[id].key == *key)
            .copied()
    }

    /// The path of the file followed at `path`, shared (for a listing).
    pub fn shared_path(&self, path: &Path) -> Option<Arc<Path>> {
        self.by_path(path).map(|id| self.files[&id].path.clone())
    }

    pub fn by_path(&self, path: &Path) -> Option<FileId> {
        let files = &self.files;
        self.by_path
            .find(self.hasher.hash_one(path), |id| *files[id].path == *path)
            .copied()
    }

    /// Indexes `id` (in `files` already) under `path`, in place of the
    /// file indexed there before, if any.
    fn index_path(&mut self, path: &Path, id: FileId) {
        let Registry {
            files,
            by_path,
            hasher,
            ..
        } = self;
        let hash = hasher.hash_one(path);
        if let Some(held) = by_path.find_mut(hash, |i| *files[i].path == *path) {
            *held = id;
            return;
        }
        by_path.insert_unique(hash, id, |i| hasher.hash_one(&*files[i].path));
    }

    /// Drops `path`'s entry if it is `id`'s.
    fn unindex_path(&mut self, path: &Path, id: FileId) {
        let Registry {
            files,
            by_path,
            hasher,
            ..
        } = self;
        if let Ok(entry) = by_path.find_entry(hasher.hash_one(path), |i| {
            *i == id && *files[i].path == *path
        }) {
            entry.remove();
        }
    }

    /// The files of `stream`, in no particular order.
    pub fn of_stream<'a>(&'a self, stream: &'a StreamId) -> impl Iterator<Item = &'a TailedFile> {
        self.iter().filter(move |f| f.stream() == stream)
    }

    /// Older files of the same stream as `id`, oldest first: every retired
    /// one for a live file, those retired before it for a retired one.
    pub fn predecessors(&self, id: FileId) -> Vec<FileId> {
        let Some(f) = self.files.get(&id) else {
            return Vec::new();
        };
        let Some(ids) = self.retired.get(f.stream()) else {
            return Vec::new();
        };
        ids.iter().copied().take_while(|&p| p != id).collect()
    }

    /// Changes whenever what a checkpoint would record may have changed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A caller moved a file's offsets.
    pub fn touch(&mut self) {
        self.generation += 1;
    }

    /// Adds the file `build` makes with a free id. `None` if every id is in
    /// use, or a file with the same key is already followed.
    pub fn insert(&mut self, build: impl FnOnce(FileId) -> TailedFile) -> Option<FileId> {
        let id = self.free_id()?;
        let f = build(id);
        debug_assert_eq!(f.id, id);
        if self.by_key(&f.key).is_some() {
            return None;
        }
        let (key, path, status) = (f.key, f.path.clone(), f.status);
        if status != FileStatus::Live {
            self.retired.entry(f.stream().clone()).or_default().push(id);
        }
        // In `files` first: the indexes hash through it.
        self.files.insert(id, Box::new(f));
        let Registry {
            files,
            by_key,
            hasher,
            ..
        } = self;
        by_key.insert_unique(hasher.hash_one(key), id, |i| hasher.hash_one(files[i].key));
        if status != FileStatus::Gone {
            self.index_path(&path, id);
        }
        self.changed();
        Some(id)
    }

    /// The file is now at `path`; true if that is news.
    pub fn rename(&mut self, id: FileId, path: &Path) -> bool {
        let Some(f) = self.files.get(&id) else {
            return false;
        };
        if *f.path == *path {
            return false;
        }
        let (old, status) = (f.path.clone(), f.status);
        // Out of the index before the path its entry is hashed by changes.
        self.unindex_path(&old, id);
        if let Some(f) = self.files.get_mut(&id) {
            f.path = Arc::from(path);
        }
        if status != FileStatus::Gone {
            // A file that had this path and has not been looked at yet in
            // this scan is renamed or marked gone before the scan ends.
            self.index_path(path, id);
        }
        self.changed();
        true
    }

    /// Sets the file's status; returns the one it had, `None` if unchanged
    /// (or no such file).
    pub fn set_status(&mut self, id: FileId, status: FileStatus) -> Option<FileStatus> {
        let f = self.files.get_mut(&id)?;
        let old = f.status;
        if old == status {
            return None;
        }
        f.status = status;
        let (path, stream) = (f.path.clone(), f.stream().clone());
        if status == FileStatus::Gone {
            self.unindex_path(&path, id);
        } else if old == FileStatus::Gone {
            self.index_path(&path, id);
        }
        let ids = self.retired.entry(stream.clone()).or_default();
        ids.retain(|&i| i != id);
        if status != FileStatus::Live {
            ids.push(id);
        }
        if ids.is_empty() {
            self.retired.remove(&stream);
        }
        self.changed();
        Some(old)
    }

    /// Forgets the file (it is closed when dropped).
    pub fn remove(&mut self, id: FileId) -> Option<TailedFile> {
        let (key, path) = {
            let f = self.files.get(&id)?;
            (f.key, f.path.clone())
        };
        // Out of the indexes while `files` still hashes it.
        self.unindex_path(&path, id);
        let Registry {
            files,
            by_key,
            hasher,
            ..
        } = self;
        if let Ok(entry) = by_key.find_entry(hasher.hash_one(key), |i| *i == id) {
            entry.remove();
        }
        let f = *files.remove(&id)?;
        if let Some(ids) = self.retired.get_mut(f.stream()) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.retired.remove(f.stream());
            }
        }
        self.changed();
        Some(f)
    }

    fn changed(&mut self) {
        self.generation += 1;
        #[cfg(debug_assertions)]
        self.check_invariants();
    }

    fn free_id(&mut self) -> Option<FileId> {
        for _ in 0..=MAX_FILE_ID {
            let id = self.next_id;
            self.next_id = if id >= MAX_FILE_ID { 1 } else { id + 1 };
            if !self.files.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Panics if the indexes disagree (see the module's invariants).
    pub fn check_invariants(&self) {
        assert_eq!(self.by_key.len(), self.files.len(), "by_key size");
        for (&id, f) in &self.files {
            assert_eq!(f.id, id, "file id");
            assert_eq!(self.by_key(&f.key), Some(id), "by_key of {id}");
        }
        for id in &self.by_path {
            let f = self.files.get(id).expect("by_path names a file");
            // Found by its path: the entry is hashed by it, and no other
            // entry holds that path.
            assert_eq!(self.by_path(&f.path), Some(*id), "by_path of {id}");
            assert_ne!(f.status, FileStatus::Gone, "by_path names gone file {id}");
        }
        let mut retired = 0;
        for (s, ids) in &self.retired {
            assert!(!ids.is_empty(), "empty retired list");
            for (i, id) in ids.iter().enumerate() {
                let f = self.files.get(id).expect("retired names a file");
                assert_eq!(f.stream(), s, "retired stream of {id}");
                assert_ne!(f.status, FileStatus::Live, "retired live file {id}");
                assert!(!ids[..i].contains(id), "{id} retired twice");
            }
            retired += ids.len();
        }
        let not_live = self.files.values().filter(|f| f.status != FileStatus::Live);
        assert_eq!(
            retired,
            not_live.count(),
            "retired lists every file not live"
        );
    }

    /// After a scan: every file not `Gone` is found by its path.
    pub fn check_settled(&self) {
        self.check_invariants();
        for (&id, f) in &self.files {
            if f.status != FileStatus::Gone {
                assert_eq!(self.by_path(&f.path), Some(id), "path of {id}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tail::testing::tailed_file;

    fn add(r: &mut Registry, ino: u64, path: &str, stream: &str, status: FileStatus) -> FileId {
        r.insert(|id| {
            let mut f = tailed_file(id, FileKey { dev: 1, ino }, path.into());
            Arc::get_mut(&mut f.meta).expect("not shared yet").stream = StreamId::named(stream);
            f.status = status;
            f
        })
        .unwrap()
    }

    #[test]
    fn a_file_already_followed_is_not_added_twice() {
        let mut r = Registry::default();
        add(&mut r, 1, "/a/0.log", "s", FileStatus::Live);
        let again = r.insert(|id| tailed_file(id, FileKey { dev: 1, ino: 1 }, "/b".into()));
        assert_eq!(again, None);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn retired_files_of_a_stream_drain_oldest_first_before_the_live_one() {
        let mut r = Registry::default();
        let a = add(&mut r, 1, "/d/0.log", "s", FileStatus::Live);
        let other = add(&mut r, 9, "/e/0.log", "t", FileStatus::Live);
        r.rename(a, Path::new("/d/0.log.1"));
        r.set_status(a, FileStatus::Rotated);
        let b = add(&mut r, 2, "/d/0.log", "s", FileStatus::Live);
        r.rename(b, Path::new("/d/0.log.2"));
        r.set_status(b, FileStatus::Rotated);
        let c = add(&mut r, 3, "/d/0.log", "s", FileStatus::Live);
        assert_eq!(r.predecessors(c), vec![a, b]);
        assert_eq!(r.predecessors(b), vec![a]);
        assert_eq!(r.predecessors(a), Vec::<FileId>::new());
        assert_eq!(r.predecessors(other), Vec::<FileId>::new());
        r.remove(a);
        assert_eq!(r.predecessors(c), vec![b]);
        assert_eq!(r.by_path(Path::new("/d/0.log")), Some(c));
        r.check_settled();
    }

    #[test]
    fn ids_wrap_around_and_skip_ids_in_use() {
        let mut r = Registry {
            next_id: MAX_FILE_ID,
            ..Default::default()
        };
        let a = add(&mut r, 1, "/a", "s", FileStatus::Live);
        assert_eq!(a, MAX_FILE_ID);
        let b = add(&mut r, 2, "/b", "s", FileStatus::Live);
        assert_eq!(b, 1);
        r.next_id = MAX_FILE_ID;
        assert_eq!(add(&mut r, 3, "/c", "s", FileStatus::Live), 2);
    }

    /// Random sequences of every mutator: the indexes agree after each one,
    /// and once every file not gone has a distinct path (as after a scan),
    /// each is found by it.
    #[test]
    fn indexes_agree_after_any_sequence_of_operations() {
        for seed in 1..=300u64 {
            let mut rng = seed;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut r = Registry::default();
            let mut ino = 0;
            for _ in 0..200 {
                let ids: Vec<FileId> = r.ids().collect();
                let pick = |k: u64| ids.get(k as usize % ids.len().max(1)).copied();
                let path = std::path::PathBuf::from(format!("/p/{}", next(6)));
                let status =
                    [FileStatus::Live, FileStatus::Rotated, FileStatus::Gone][next(3) as usize];
                match next(5) {
                    0 | 1 => {
                        ino += 1;
                        let stream = format!("s{}", next(3));
                        add(&mut r, ino, path.to_str().unwrap(), &stream, status);
                    }
                    2 => {
                        if let Some(id) = pick(next(64)) {
                            r.rename(id, &path);
                        }
                    }
                    3 => {
                        if let Some(id) = pick(next(64)) {
                            r.set_status(id, status);
                        }
                    }
                    _ => {
                        if let Some(id) = pick(next(64)) {
                            r.remove(id);
                        }
                    }
                }
                r.check_invariants();
            }
            // Settle as a scan does: one file per path stays, others go.
            let mut seen = std::collections::HashSet::new();
            let mut ids: Vec<FileId> = r.ids().collect();
            ids.sort_unstable();
            for id in ids {
                let f = r.get(id).unwrap();
                if f.status != FileStatus::Gone && !seen.insert(f.path.clone()) {
                    r.set_status(id, FileStatus::Gone);
                } else if f.status != FileStatus::Gone {
                    // Re-asserts the path, as a scan that sees the file does.
                    let p = f.path.clone();
                    r.rename(id, Path::new("/tmp/x"));
                    r.rename(id, &p);
                }
            }
            r.check_settled();
        }
    }
}
