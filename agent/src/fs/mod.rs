//! The file-system calls of the data loop, behind one seam: the operating
//! system's in production ([`Fs::Os`]); in tests, also a simulated file
//! system ([`sim`]) on which the model test runs thousands of seeds
//! deterministically, without disk I/O.
//!
//! Only what discovery, the lifecycle and the tailer need: stat a path,
//! list a directory, open a file for reading; on an open file, `pread` and
//! `fstat`. Everything else (in-container files opened beneath their
//! volume, Docker's `config.v2.json`, the checkpoint store) uses the
//! operating system directly.

#[cfg(test)]
pub mod sim;

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// What `stat`/`fstat` tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    /// ctime as (seconds, nanoseconds): changes on every write,
    /// truncation, rename and unlink.
    pub ctime: (i64, i64),
    pub is_file: bool,
    pub is_dir: bool,
}

impl From<&std::fs::Metadata> for Stat {
    fn from(m: &std::fs::Metadata) -> Stat {
        Stat {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            ctime: (m.ctime(), m.ctime_nsec()),
            is_file: m.is_file(),
            is_dir: m.is_dir(),
        }
    }
}

/// Positional reads.
pub trait ReadAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
}

/// An open file.
#[derive(Debug)]
pub enum Handle {
    Os(File),
    #[cfg(test)]
    Sim(sim::Handle),
}

impl From<File> for Handle {
    fn from(f: File) -> Handle {
        Handle::Os(f)
    }
}

impl Handle {
    /// The descriptor of a real file.
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self {
            Handle::Os(f) => Some(std::os::fd::AsFd::as_fd(f)),
            #[cfg(test)]
            Handle::Sim(_) => None,
        }
    }

    /// `fstat`.
    pub fn stat(&self) -> io::Result<Stat> {
        match self {
            Handle::Os(f) => f.metadata().map(|m| Stat::from(&m)),
            #[cfg(test)]
            Handle::Sim(h) => Ok(h.stat()),
        }
    }
}

impl ReadAt for Handle {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self {
            Handle::Os(f) => FileExt::read_at(f, buf, offset),
            #[cfg(test)]
            Handle::Sim(h) => Ok(h.read_at(buf, offset)),
        }
    }
}

/// Which directory entries a listing keeps ([`Fs::read_dir`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    No,
    /// While the listing has room.
    IfRoom,
    /// Even past the limit (a container's live log among thousands of
    /// rotated ones).
    Always,
}

/// A file system.
#[derive(Debug, Clone, Default)]
pub enum Fs {
    #[default]
    Os,
    #[cfg(test)]
    Sim(std::sync::Arc<sim::SimFs>),
}

impl Fs {
    /// `stat` (following symbolic links).
    pub fn stat(&self, path: &Path) -> io::Result<Stat> {
        match self {
            Fs::Os => std::fs::metadata(path).map(|m| Stat::from(&m)),
            #[cfg(test)]
            Fs::Sim(s) => s.stat(path),
        }
    }

    pub fn is_dir(&self, path: &Path) -> bool {
        self.stat(path).is_ok_and(|s| s.is_dir)
    }

    /// The names in a directory that `want` asks for, in no particular
    /// order: every [`Want::Always`] one, and [`Want::IfRoom`] ones while
    /// fewer than `max` names are kept (a directory of 100,000 entries
    /// costs only what is kept); and how many were left out for want of
    /// room.
    pub fn read_dir(
        &self,
        path: &Path,
        max: usize,
        mut want: impl FnMut(&std::ffi::OsStr) -> Want,
    ) -> io::Result<(Vec<OsString>, usize)> {
        let mut names = Vec::new();
        let mut over = 0;
        let mut take = |name: OsString| match want(&name) {
            Want::No => {}
            Want::IfRoom if names.len() >= max => over += 1,
            Want::IfRoom | Want::Always => names.push(name),
        };
        match self {
            Fs::Os => {
                for e in std::fs::read_dir(path)? {
                    take(e?.file_name());
                }
            }
            #[cfg(test)]
            Fs::Sim(s) => s.read_dir(path)?.into_iter().for_each(take),
        }
        Ok((names, over))
    }

    /// Opens a log file to read it: without updating its access time (where
    /// the file's owner allows it), never blocking (a FIFO where a log
    /// should be), closed on exec.
    pub fn open(&self, path: &Path) -> io::Result<Handle> {
        match self {
            Fs::Os => File::options()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOATIME | libc::O_NONBLOCK)
                .open(path)
                .or_else(|_| File::open(path))
                .map(Handle::Os),
            #[cfg(test)]
            Fs::Sim(s) => s.open(path).map(Handle::Sim),
        }
    }
}
