//! What the kernel calls an open file: the `(inode->i_sb->s_dev,
//! inode->i_ino)` pairs the eBPF programs see when it is written, which
//! are not always the `(st_dev, st_ino)` that `fstat` reports.
//!
//! - **btrfs**: `st_dev` is the subvolume's anonymous device, never the
//!   superblock's; the superblock's is the mount's `major:minor` in
//!   `/proc/self/mountinfo` (found by the file's mount id, `statx`'s
//!   `STATX_MNT_ID`). The same lookup is right for every filesystem.
//! - **overlayfs**: a write through the overlay lands on the upper
//!   filesystem's real inode (its tracepoints fire there), and the
//!   overlay's own inode gets its times copied over
//!   (`inode_set_ctime_to_ts`, a tracepoint the hook does not use: it
//!   fires for every write through every overlay). The file is watched
//!   under both: the overlay's pair, and the upper file's (`upperdir` + the
//!   path below the mount), when the upper directory is visible from here
//!   (else it is polled by size: its filesystem type is then `overlay`). A file still
//!   only in a lower layer gets its upper inode at copy-up: its writes are
//!   then not seen until the file is reopened; the safety sweep finds them
//!   and the watcher polls such a file (`EbpfSource::missed`).
//!
//! Mount facts are parsed once per mount id and kept (a node's mounts come
//! and go with its pods; a miss re-reads `mountinfo`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, StatxFlags};

/// A mount as `/proc/self/mountinfo` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The superblock's device (`major:minor`), as `st_dev` encodes it.
    pub dev: u64,
    /// The directory of the filesystem mounted here (`/` unless a bind
    /// mount of a subdirectory).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// overlayfs: its upper directory.
    pub upper: Option<PathBuf>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// One line of mountinfo: its mount id and what it says.
pub fn parse_line(line: &str) -> Option<(u64, Mount)> {
    let mut f = line.split(' ');
    let id: u64 = f.next()?.parse().ok()?;
    let _parent = f.next()?;
    let (major, minor) = f.next()?.split_once(':')?;
    let dev = libc::makedev(major.parse().ok()?, minor.parse().ok()?);
    let root = unescape(f.next()?);
    let mount_point = unescape(f.next()?);
    // Mount options, then optional fields up to "-".
    for field in f.by_ref() {
        if field == "-" {
            break;
        }
    }
    let fs_type = f.next()?.to_string();
    let _source = f.next()?;
    let options = f.next().unwrap_or("");
    let upper = (fs_type == "overlay")
        .then(|| {
            options
                .split(',')
                .find_map(|o| o.strip_prefix("upperdir="))
                .map(unescape)
        })
        .flatten();
    Some((
        id,
        Mount {
            dev,
            root,
            mount_point,
            fs_type,
            upper,
        },
    ))
}

/// How the kernel's write path sees a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Its `(st_dev, st_ino)`-encoded identities, its own superblock's
    /// first.
    pub ids: Vec<(u64, u64)>,
    /// The type of the filesystem its writes land on (the upper one's for
    /// an overlay), "" if unknown.
    pub fs_type: String,
}

impl View {
    /// The `fstat` pair alone, on an unknown filesystem.
    pub fn of_fstat(st_dev: u64, ino: u64) -> View {
        View {
            ids: vec![(st_dev, ino)],
            fs_type: String::new(),
        }
    }
}

/// A file's identities as the kernel's write path sees them: `(st_dev,
/// st_ino)` pairs, first the file's own superblock's.
pub fn identities(key_ino: u64, mount: &Mount, upper: Option<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut ids = vec![(mount.dev, key_ino)];
    if let Some(u) = upper
        && !ids.contains(&u)
    {
        ids.push(u);
    }
    ids
}

/// Where a file below an overlay mount is in its upper directory: its
/// path (as opened) relative to the mount point, below the mount's root.
pub fn upper_path(mount: &Mount, opened: &Path) -> Option<PathBuf> {
    let upper = mount.upper.as_ref()?;
    let below = opened.strip_prefix(&mount.mount_point).ok()?;
    let root = mount.root.strip_prefix("/").unwrap_or(&mount.root);
    Some(upper.join(root).join(below))
}

/// The mounts seen so far, by mount id.
#[derive(Debug, Default)]
pub struct Mounts {
    by_id: HashMap<u64, Mount>,
}

impl Mounts {
    /// The mount `id`, re-reading mountinfo if it is new, or if `stale`
    /// says the one known under that id is not it (ids are reused).
    fn get(&mut self, id: u64, stale: impl Fn(&Mount) -> bool) -> Option<&Mount> {
        if self.by_id.get(&id).is_none_or(&stale) {
            let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            self.by_id = text.lines().filter_map(parse_line).collect();
        }
        self.by_id.get(&id).filter(|m| !stale(m))
    }

    /// The mount a file (or path) is on. A mount whose device is not the
    /// file's is taken for a stale entry (a reused mount id), except on
    /// btrfs and overlayfs, where they differ by design.
    fn mount_of(&mut self, fd: BorrowedFd<'_>, path: Option<&Path>) -> Option<&Mount> {
        let st = match path {
            None => rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID),
            Some(p) => rustix::fs::statx(rustix::fs::CWD, p, AtFlags::empty(), StatxFlags::MNT_ID),
        }
        .ok()?;
        if !StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) {
            return None;
        }
        let dev = libc::makedev(st.stx_dev_major, st.stx_dev_minor);
        self.get(st.stx_mnt_id, |m| {
            m.dev != dev && !["btrfs", "overlay"].contains(&m.fs_type.as_str())
        })
    }

    /// How the kernel's write path sees the open file `fd`, whose `fstat`
    /// gave `(st_dev, ino)`. Without mount facts (no `STATX_MNT_ID`, an
    /// unlisted mount): the `fstat` pair, right on most filesystems, and an
    /// unknown filesystem type.
    pub fn view(&mut self, fd: BorrowedFd<'_>, st_dev: u64, ino: u64) -> View {
        let Some(mount) = self.mount_of(fd, None).cloned() else {
            return View::of_fstat(st_dev, ino);
        };
        let upper = if mount.upper.is_some() {
            self.upper_identity(fd, &mount)
        } else {
            None
        };
        View {
            ids: identities(ino, &mount, upper.as_ref().map(|u| (u.0, u.1))),
            fs_type: upper.map_or(mount.fs_type, |u| u.2),
        }
    }

    /// An overlay file's upper inode, as the kernel names it, and the type
    /// of the filesystem it is on.
    fn upper_identity(&mut self, fd: BorrowedFd<'_>, mount: &Mount) -> Option<(u64, u64, String)> {
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let opened = std::fs::read_link(link).ok()?;
        let path = upper_path(mount, &opened)?;
        let st =
            rustix::fs::statx(rustix::fs::CWD, &path, AtFlags::empty(), StatxFlags::INO).ok()?;
        let upper_mount = self.mount_of(fd, Some(&path))?;
        Some((upper_mount.dev, st.stx_ino, upper_mount.fs_type.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes_and_optional_fields() {
        let (id, m) = parse_line(
            "36 35 98:0 /mnt1 /mnt/my\\040dir rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue",
        )
        .unwrap();
        assert_eq!(id, 36);
        assert_eq!(m.dev, libc::makedev(98, 0));
        assert_eq!(m.root, Path::new("/mnt1"));
        assert_eq!(m.mount_point, Path::new("/mnt/my dir"));
        assert_eq!(m.fs_type, "ext3");
        assert_eq!(m.upper, None);
        let (_, o) = parse_line(
            "90 27 0:52 / /var/lib/c/merged rw,relatime - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/var/lib/c/upper,workdir=/var/lib/c/work",
        )
        .unwrap();
        assert_eq!(o.fs_type, "overlay");
        assert_eq!(o.upper.as_deref(), Some(Path::new("/var/lib/c/upper")));
        assert!(parse_line("garbage").is_none());
        assert!(parse_line("").is_none());
    }

    #[test]
    fn a_btrfs_file_is_named_by_its_superblock_not_its_subvolume() {
        // fstat says the subvolume's anonymous device (0:47); the kernel's
        // inode says the superblock's (the mount's 0:45).
        let m = Mount {
            dev: libc::makedev(0, 45),
            root: "/".into(),
            mount_point: "/var/log".into(),
            fs_type: "btrfs".into(),
            upper: None,
        };
        assert_eq!(identities(257, &m, None), vec![(libc::makedev(0, 45), 257)]);
    }

    #[test]
    fn an_overlay_file_is_named_by_the_overlay_and_by_its_upper_file() {
        let m = Mount {
            dev: libc::makedev(0, 52),
            root: "/".into(),
            mount_point: "/merged".into(),
            fs_type: "overlay".into(),
            upper: Some("/data/upper".into()),
        };
        assert_eq!(
            upper_path(&m, Path::new("/merged/var/log/app.log")),
            Some(PathBuf::from("/data/upper/var/log/app.log"))
        );
        assert_eq!(upper_path(&m, Path::new("/elsewhere/app.log")), None);
        let bind = Mount {
            root: "/var/log".into(),
            mount_point: "/logs".into(),
            ..m.clone()
        };
        assert_eq!(
            upper_path(&bind, Path::new("/logs/app.log")),
            Some(PathBuf::from("/data/upper/var/log/app.log"))
        );
        let up = (libc::makedev(254, 1), 9001);
        assert_eq!(
            identities(42, &m, Some(up)),
            vec![(libc::makedev(0, 52), 42), up]
        );
        // The same pair twice is one.
        assert_eq!(
            identities(42, &m, Some((libc::makedev(0, 52), 42))).len(),
            1
        );
    }

    #[test]
    fn an_open_file_is_found_on_its_mount() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let f = tempfile::tempfile_in(std::env::temp_dir()).unwrap();
        let md = f.metadata().unwrap();
        let mut mounts = Mounts::default();
        let m = mounts
            .mount_of(f.as_fd(), None)
            .expect("statx gives a listed mount")
            .clone();
        if !["btrfs", "overlay"].contains(&m.fs_type.as_str()) {
            // The superblock's device is fstat's.
            assert_eq!(m.dev, md.dev(), "{m:?}");
        }
        let view = mounts.view(f.as_fd(), md.dev(), md.ino());
        assert_eq!(view.ids[0], (m.dev, md.ino()));
    }
}
