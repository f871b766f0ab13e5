//! Scratch file systems of a given kind, made by the test itself and gone
//! when dropped: tmpfs, xfs and btrfs (loop-mounted image files made with
//! Debian's `xfsprogs` and `btrfs-progs`, which `cargo xtask test`
//! installs), a btrfs subvolume, and overlayfs (lower, upper and work dirs
//! on the root file system). Needs root. For the eBPF watcher's identity
//! traps: on btrfs a file's `st_dev` is its subvolume's anonymous device,
//! not the superblock's `s_dev` the kernel's events carry; through overlayfs
//! `fstat` names the overlay's device (and, after a copy-up, the lower
//! inode), while the kernel writes to the upper file system's inode.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Tmpfs,
    Xfs,
    /// The top level (subvolume 5) of a fresh btrfs.
    Btrfs,
    /// A subvolume (`btrfs subvolume create`) of a fresh btrfs.
    BtrfsSubvolume,
    /// overlayfs, files made through it (they live in the upper dir).
    Overlay,
}

impl fmt::Display for FsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsKind::Tmpfs => "tmpfs",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::BtrfsSubvolume => "btrfs subvolume",
            FsKind::Overlay => "overlayfs",
        })
    }
}

/// Size of the xfs and btrfs images: sparse, so only what is written takes
/// space; room for the end-to-end tests' 8 × 12 MB of logs and more.
const IMAGE_BYTES: u64 = 1 << 30;

/// A mounted scratch file system in a temp dir of its own; unmounted (a
/// lazy detach if it is still busy), its loop device released and its dir
/// removed when dropped.
pub struct ScratchFs {
    kind: FsKind,
    /// Where the tests put their files: the mount point, or the subvolume.
    root: PathBuf,
    mount_point: PathBuf,
    /// The image file, for the loop-mounted kinds.
    image: Option<PathBuf>,
    mounted: bool,
    tmp: tempfile::TempDir,
}

impl ScratchFs {
    /// A fresh, empty file system of `kind`. Fails the test, saying why, if
    /// this machine cannot make or mount one.
    pub fn new(kind: FsKind) -> ScratchFs {
        Self::make(kind, &[], "512m")
    }

    /// A tmpfs of `size` (mount's `size=`: `64k`, `1m`…), to fill up.
    pub fn small_tmpfs(size: &str) -> ScratchFs {
        Self::make(FsKind::Tmpfs, &[], size)
    }

    /// Changes the mount's options (`ro`, `rw`).
    pub fn remount(&self, opts: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.mount_point)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot remount {} {opts}: {}",
            self.mount_point.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    /// overlayfs whose lower dir holds the empty files `lower_files`
    /// (relative paths; their dirs are made) before it is mounted: opening
    /// one of them for writing through the overlay copies it up, after which
    /// `fstat` through the overlay reports the lower file's inode number
    /// while the kernel writes to the upper file's.
    pub fn overlay_with_lower(lower_files: &[&str]) -> ScratchFs {
        Self::make(FsKind::Overlay, lower_files, "")
    }

    fn make(kind: FsKind, lower_files: &[&str], tmpfs_size: &str) -> ScratchFs {
        assert!(
            lower_files.is_empty() || kind == FsKind::Overlay,
            "only overlayfs has a lower dir"
        );
        let tmp = tempfile::Builder::new()
            .prefix(&format!("bpftail-{}-", kind.to_string().replace(' ', "-")))
            .tempdir()
            .unwrap();
        let mount_point = tmp.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        let mut fs = ScratchFs {
            kind,
            root: mount_point.clone(),
            mount_point,
            image: None,
            mounted: false,
            tmp,
        };
        let mnt = fs.mount_point.clone();
        match kind {
            FsKind::Tmpfs => {
                let opts = format!("size={tmpfs_size},mode=0755");
                fs.mount(&["-t", "tmpfs", "-o", &opts, "tmpfs"]);
            }
            FsKind::Xfs => fs.loop_mount("xfs", &["mkfs.xfs", "-q"]),
            FsKind::Btrfs | FsKind::BtrfsSubvolume => {
                fs.loop_mount("btrfs", &["mkfs.btrfs", "-q"]);
                if kind == FsKind::BtrfsSubvolume {
                    let sub = mnt.join("subvol");
                    run(Command::new("btrfs")
                        .args(["-q", "subvolume", "create"])
                        .arg(&sub));
                    fs.root = sub;
                }
            }
            FsKind::Overlay => {
                let dirs = ["lower", "upper", "work"].map(|d| fs.tmp.path().join(d));
                for d in &dirs {
                    std::fs::create_dir(d).unwrap();
                }
                for f in lower_files {
                    let p = dirs[0].join(f);
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    std::fs::write(&p, b"").unwrap();
                }
                let opts = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    dirs[0].display(),
                    dirs[1].display(),
                    dirs[2].display()
                );
                fs.mount(&["-t", "overlay", "-o", &opts, "overlay"]);
            }
        }
        let st = std::fs::metadata(&fs.root).unwrap();
        eprintln!(
            "scratch {kind} at {} (mount {}; st_dev {:#x}, superblock s_dev {:#x})",
            fs.root.display(),
            fs.mount_source(),
            std::os::unix::fs::MetadataExt::dev(&st),
            fs.superblock_dev()
        );
        fs
    }

    /// Makes an image file, formats it with `mkfs` and loop-mounts it.
    fn loop_mount(&mut self, fstype: &str, mkfs: &[&str]) {
        let image = self.tmp.path().join(format!("{fstype}.img"));
        std::fs::File::create(&image)
            .unwrap()
            .set_len(IMAGE_BYTES)
            .unwrap();
        let out = Command::new(mkfs[0])
            .args(&mkfs[1..])
            .arg(&image)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (Debian's xfsprogs and btrfs-progs: `cargo xtask test` installs them)",
                    mkfs[0]
                )
            });
        assert!(
            out.status.success(),
            "{} {} failed: {}",
            mkfs.join(" "),
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.image = Some(image.clone());
        let out = Command::new("mount")
            .args(["-t", fstype, "-o", "loop"])
            .arg(&image)
            .arg(&self.mount_point)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this machine cannot loop-mount a {fstype} image (`mount -t {fstype} -o loop` needs \
             root, /dev/loop-control or free /dev/loop* devices, and {fstype} in \
             /proc/filesystems): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        self.mounted = true;
    }

    fn mount(&mut self, args: &[&str]) {
        let out = Command::new("mount")
            .args(args)
            .arg(&self.mount_point)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot mount {} at {} (needs root): {}",
            self.kind,
            self.mount_point.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        self.mounted = true;
    }

    pub fn kind(&self) -> FsKind {
        self.kind
    }

    /// The dir to put files in: the mount point, or the btrfs subvolume.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The upper dir of an overlay (where its files really are).
    pub fn upper(&self) -> Option<PathBuf> {
        (self.kind == FsKind::Overlay).then(|| self.tmp.path().join("upper"))
    }

    /// What is mounted (`/dev/loopN`, `tmpfs`, `overlay`).
    pub fn mount_source(&self) -> String {
        findmnt(&self.mount_point, "SOURCE")
    }

    /// The superblock's device (`s_dev`, as `st_dev` encodes it): the
    /// major:minor field of the mount in /proc/self/mountinfo.
    pub fn superblock_dev(&self) -> u64 {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mp = self.mount_point.to_str().unwrap();
        let line = mi
            .lines()
            .rfind(|l| l.split(' ').nth(4) == Some(mp))
            .unwrap_or_else(|| panic!("{mp} is not in /proc/self/mountinfo"));
        let (maj, min) = line.split(' ').nth(2).unwrap().split_once(':').unwrap();
        libc::makedev(maj.parse().unwrap(), min.parse().unwrap())
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        if self.mounted {
            let umount = |lazy: bool| {
                let mut c = Command::new("umount");
                if lazy {
                    c.arg("--lazy");
                }
                c.arg(&self.mount_point)
                    .output()
                    .map(|o| {
                        (
                            o.status.success(),
                            String::from_utf8_lossy(&o.stderr).into_owned(),
                        )
                    })
                    .unwrap_or_else(|e| (false, e.to_string()))
            };
            let (ok, err) = umount(false);
            if !ok {
                // Still busy (a process of a failed test holds a file): detach
                // it now; the kernel finishes when the last file is closed.
                let (lazy_ok, lazy_err) = umount(true);
                eprintln!(
                    "umount {}: {}; lazy detach: {}",
                    self.mount_point.display(),
                    err.trim(),
                    if lazy_ok { "done" } else { lazy_err.trim() }
                );
            }
        }
        // `mount -o loop` sets autoclear: the loop device goes with the
        // mount (at once, or after a lazy detach once it is no longer
        // busy). Release any left anyway (autoclear on a busy device).
        if let Some(image) = &self.image
            && let Ok(out) = Command::new("losetup").arg("-j").arg(image).output()
        {
            for dev in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_once(':').map(|(d, _)| d.to_owned()))
            {
                let _ = Command::new("losetup").args(["-d", &dev]).status();
            }
        }
    }
}

fn findmnt(mount_point: &Path, column: &str) -> String {
    let out = Command::new("findmnt")
        .args(["-n", "-o", column, "--mountpoint"])
        .arg(mount_point)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[track_caller]
fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
