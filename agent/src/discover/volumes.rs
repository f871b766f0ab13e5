//! In-container log files: a declared path inside a container
//! (`aliyun_logs_access=/var/log/nginx/*.log`) resolved through the
//! container's volume mounts to that volume's directory on this node, and
//! listed and opened without ever leaving it.
//!
//! - emptyDir: `<kubelet-pods-dir>/<pod uid>/volumes/kubernetes.io~empty-dir/<volume>`;
//!   hostPath: its host path, only if it matches `--allow-hostpath`; any
//!   other volume type, or a path under no mount, is refused with the reason
//!   (as log-pilot does).
//! - Confinement: the tenant controls everything below the volume's
//!   directory (the mount's `subPath`, directories, symlinks, file names).
//!   Every directory listed and every file opened there is reached with
//!   `openat2(volume_dir_fd, relative_path, RESOLVE_BENEATH |
//!   RESOLVE_NO_MAGICLINKS)`: `..`, absolute symlinks, symlinks that climb
//!   out and `/proc/…` magic links all fail with `EXDEV`/`ELOOP`, so no byte
//!   outside the volume is read. Only regular files are followed.
//! - Bounded: a declaration matches at most [`MAX_MATCHES`] files and lists
//!   at most [`MAX_ENTRIES`] directory entries per scan.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::config::{Globs, glob_match};
use crate::kube::{ContainerInfo, Mount, PodInfo, VolumeSource};

pub const MAX_MATCHES: usize = 1000;
pub const MAX_ENTRIES: usize = 20_000;

/// Where a declared path's files are on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The volume's directory on the host (trusted: built by us).
    pub base: PathBuf,
    /// Below `base`: the mount's subPath, then the pattern, one component
    /// each (tenant-controlled; resolved beneath `base` only).
    pub pattern: Vec<String>,
}

/// A file found below a volume directory, opened confined to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confined {
    pub base: PathBuf,
    pub rel: PathBuf,
}

impl Confined {
    /// Opens the file for reading, beneath `base` only; a regular file or
    /// an error.
    pub fn open(&self) -> std::io::Result<File> {
        let base = open_dir(&self.base)?;
        let fd = openat2(
            &base,
            &self.rel,
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOATIME | libc::O_NONBLOCK,
        )
        .or_else(|_| {
            openat2(
                &base,
                &self.rel,
                libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        })?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok(file)
    }
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::other("NUL in path"))
}

/// The trusted volume directory itself (its last component must not be a
/// symlink).
fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    let c = cstr(path)?;
    Ok(rustix::fs::open(
        c.as_c_str(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?)
}

/// `openat2(dir, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
pub fn openat2(dir: &OwnedFd, rel: &Path, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let c = cstr(if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    })?;
    Ok(rustix::fs::openat2(
        dir,
        c.as_c_str(),
        OFlags::from_bits_retain(flags as libc::c_uint),
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )?)
}

/// Names of the entries of an open directory (not `.`/`..`), at most `max`.
/// A read error ends the listing early, as the end of the directory does.
fn list(dir: OwnedFd, max: usize) -> std::io::Result<Vec<Vec<u8>>> {
    let mut d = rustix::fs::Dir::new(dir)?;
    let mut out = Vec::new();
    while let Some(Ok(e)) = d.read() {
        if out.len() >= max {
            break;
        }
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    }
    Ok(out)
}

fn plain_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

/// Why a declared in-container path is not followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("{0:?}: '.' and '..' are not allowed")]
    DotComponents(String),
    #[error("{0:?} is not an absolute file path")]
    NotAbsolute(String),
    #[error(
        "{path:?} is not under any volume mount of container {container:?}: only files in volumes can be read"
    )]
    NotInVolume { path: String, container: String },
    #[error("volume {0:?}: unusable name")]
    UnusableName(String),
    #[error("hostPath volume {volume:?}: path {path:?} is not absolute and clean")]
    UncleanHostPath { volume: String, path: String },
    #[error("hostPath volume {volume:?} ({path}) is not allowed by --allow-hostpath")]
    HostPathNotAllowed { volume: String, path: String },
    #[error(
        "volume {volume:?} is a {kind} volume; only emptyDir (and allowed hostPath) volumes are read"
    )]
    UnsupportedVolume { volume: String, kind: String },
    #[error("volume {0:?} is not in the pod's volumes")]
    UnknownVolume(String),
    #[error("subPath {0:?} is not a clean relative path")]
    UncleanSubPath(String),
    #[error("subPath {0:?} holds glob characters")]
    GlobInSubPath(String),
}

/// Resolves a declared in-container path glob through `container`'s mounts.
pub fn resolve(
    declared: &str,
    pod: &PodInfo,
    container: &ContainerInfo,
    kubelet_pods_dir: &Path,
    allow_hostpath: &Globs,
) -> Result<Resolved, Refused> {
    let parts = declared_components(declared)?;
    let Some((depth, mount)) = deepest_mount(container, &parts) else {
        return Err(Refused::NotInVolume {
            path: declared.into(),
            container: container.name.clone(),
        });
    };
    let base = volume_dir(pod, mount, kubelet_pods_dir, allow_hostpath)?;
    let mut pattern = sub_path_components(mount)?;
    pattern.extend(parts[depth..].iter().map(|s| s.to_string()));
    Ok(Resolved { base, pattern })
}

/// The components of a declared path, which must be absolute, UTF-8 and
/// free of `.` and `..`.
fn declared_components(declared: &str) -> Result<Vec<&str>, Refused> {
    let path = Path::new(declared);
    let mut parts: Vec<&str> = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(s) => parts.push(
                s.to_str()
                    .ok_or_else(|| Refused::NotUtf8(declared.into()))?,
            ),
            _ => return Err(Refused::DotComponents(declared.into())),
        }
    }
    if !path.is_absolute() || parts.is_empty() {
        return Err(Refused::NotAbsolute(declared.into()));
    }
    Ok(parts)
}

/// The mount whose path is the longest whole-component prefix of `parts`
/// (strictly shorter than it), with that prefix's length.
fn deepest_mount<'a>(container: &'a ContainerInfo, parts: &[&str]) -> Option<(usize, &'a Mount)> {
    container
        .mounts
        .iter()
        .filter_map(|m| {
            let mp: Vec<&str> = Path::new(&m.path)
                .components()
                .filter_map(|c| match c {
                    Component::Normal(s) => s.to_str(),
                    _ => None,
                })
                .collect();
            (mp.len() < parts.len() && parts[..mp.len()] == mp[..]).then_some((mp.len(), m))
        })
        .max_by_key(|(n, _)| *n)
}

/// The host directory of the mount's volume: an emptyDir's under the
/// kubelet's pods dir, or an allowed hostPath; other volumes are refused.
fn volume_dir(
    pod: &PodInfo,
    mount: &Mount,
    kubelet_pods_dir: &Path,
    allow_hostpath: &Globs,
) -> Result<PathBuf, Refused> {
    match pod.volumes.get(&mount.volume) {
        Some(VolumeSource::EmptyDir) => {
            if !plain_name(&pod.uid) || !plain_name(&mount.volume) {
                return Err(Refused::UnusableName(mount.volume.clone()));
            }
            Ok(kubelet_pods_dir
                .join(&pod.uid)
                .join("volumes/kubernetes.io~empty-dir")
                .join(&mount.volume))
        }
        Some(VolumeSource::HostPath(p)) => {
            if !Path::new(p).is_absolute() || p.split('/').any(|c| c == "..") {
                return Err(Refused::UncleanHostPath {
                    volume: mount.volume.clone(),
                    path: p.clone(),
                });
            }
            if !allow_hostpath.matches(p) {
                return Err(Refused::HostPathNotAllowed {
                    volume: mount.volume.clone(),
                    path: p.clone(),
                });
            }
            Ok(PathBuf::from(p))
        }
        Some(VolumeSource::Other(kind)) => Err(Refused::UnsupportedVolume {
            volume: mount.volume.clone(),
            kind: (*kind).to_owned(),
        }),
        None => Err(Refused::UnknownVolume(mount.volume.clone())),
    }
}

/// The mount's subPath as literal pattern components: relative, clean, and
/// without glob characters.
fn sub_path_components(mount: &Mount) -> Result<Vec<String>, Refused> {
    let mut pattern: Vec<String> = Vec::new();
    for c in Path::new(&mount.sub_path).components() {
        match c {
            Component::Normal(s) => pattern.push(s.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => {
                return Err(Refused::UncleanSubPath(mount.sub_path.clone()));
            }
        }
    }
    // The subPath is literal, the rest a glob; a literal '*' in a subPath
    // would be taken as a wildcard, so refuse it.
    if pattern.iter().any(|p| p.contains(['*', '?'])) {
        return Err(Refused::GlobInSubPath(mount.sub_path.clone()));
    }
    Ok(pattern)
}

/// What listing a resolved declaration found.
#[derive(Debug, Default)]
pub struct Listing {
    pub files: Vec<Confined>,
    /// Directories the last component was matched in (where new matches
    /// appear), verified to be what their path names (no symlink on the
    /// way): safe to watch by path.
    pub dirs: Vec<PathBuf>,
    /// The file or entry limit was hit.
    pub truncated: bool,
}

/// The files below `r.base` matching `r.pattern` (`*`, `?` within one
/// component), every step confined beneath `r.base`.
pub fn list_matches(r: &Resolved) -> std::io::Result<Listing> {
    let mut walk = Walk {
        r,
        base: open_dir(&r.base)?,
        entries: 0,
        out: Listing::default(),
    };
    // Directories (relative to base) to expand with the next component.
    let mut level: Vec<PathBuf> = vec![PathBuf::new()];
    for (i, comp) in r.pattern.iter().enumerate() {
        let last = i + 1 == r.pattern.len();
        let mut next = Vec::new();
        for dir in &level {
            let Some(names) = walk.names(dir, comp)? else {
                continue;
            };
            for name in names {
                let rel = dir.join(std::ffi::OsStr::from_bytes(&name));
                if last {
                    if !walk.add_file(rel) {
                        break;
                    }
                } else if walk.is_dir(&rel) {
                    next.push(rel);
                }
            }
        }
        if last {
            walk.add_watched_dirs(&level);
        }
        level = next;
        if level.is_empty() && !last {
            break;
        }
    }
    Ok(walk.out)
}

/// One confined walk of a resolved pattern, and what it found so far.
struct Walk<'a> {
    r: &'a Resolved,
    /// `r.base`, opened.
    base: OwnedFd,
    /// Directory entries listed so far (bounded by [`MAX_ENTRIES`]).
    entries: usize,
    out: Listing,
}

impl Walk<'_> {
    /// The names in `dir` that `comp` may match: the listed entries it
    /// matches if it is a glob (None if `dir` cannot be opened), else
    /// `comp` itself.
    fn names(&mut self, dir: &Path, comp: &str) -> std::io::Result<Option<Vec<Vec<u8>>>> {
        if !comp.contains(['*', '?']) {
            return Ok(Some(vec![comp.as_bytes().to_vec()]));
        }
        let Ok(fd) = openat2(
            &self.base,
            dir,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        ) else {
            return Ok(None);
        };
        let names = list(fd, MAX_ENTRIES.saturating_sub(self.entries) + 1)?;
        self.entries += names.len();
        if self.entries > MAX_ENTRIES {
            self.out.truncated = true;
        }
        Ok(Some(
            names
                .into_iter()
                .filter(|n| glob_match(comp.as_bytes(), n))
                .collect(),
        ))
    }

    /// Adds `rel` to the files if it is a regular file; false (and
    /// truncated) if the match limit is reached first.
    fn add_file(&mut self, rel: PathBuf) -> bool {
        let Ok(fd) = openat2(&self.base, &rel, libc::O_PATH | libc::O_CLOEXEC) else {
            return true;
        };
        if File::from(fd).metadata().is_ok_and(|m| m.is_file()) {
            if self.out.files.len() >= MAX_MATCHES {
                self.out.truncated = true;
                return false;
            }
            self.out.files.push(Confined {
                base: self.r.base.clone(),
                rel,
            });
        }
        true
    }

    /// Whether `rel` is a directory reachable beneath the base.
    fn is_dir(&self, rel: &Path) -> bool {
        openat2(
            &self.base,
            rel,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
        .is_ok()
    }

    /// Keeps the directories holding matches whose host path leads to the
    /// same directory the confined walk reached (safe to watch by path).
    fn add_watched_dirs(&mut self, level: &[PathBuf]) {
        for dir in level {
            let host = self.r.base.join(dir);
            let Ok(fd) = openat2(
                &self.base,
                dir,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            ) else {
                continue;
            };
            let (Ok(a), Ok(b)) = (File::from(fd).metadata(), std::fs::metadata(&host)) else {
                continue;
            };
            if a.dev() == b.dev() && a.ino() == b.ino() {
                self.out.dirs.push(host);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::Mount;
    use std::collections::BTreeMap;

    fn pod(volumes: &[(&str, VolumeSource)]) -> (PodInfo, ContainerInfo) {
        let c = ContainerInfo {
            name: "app".into(),
            mounts: vec![
                Mount {
                    volume: "logs".into(),
                    path: "/var/log/nginx".into(),
                    sub_path: String::new(),
                },
                Mount {
                    volume: "nested".into(),
                    path: "/var/log/nginx/deep".into(),
                    sub_path: "sub".into(),
                },
                Mount {
                    volume: "cfg".into(),
                    path: "/etc/nginx".into(),
                    sub_path: String::new(),
                },
                Mount {
                    volume: "host".into(),
                    path: "/host".into(),
                    sub_path: String::new(),
                },
            ],
            ..Default::default()
        };
        let p = PodInfo {
            uid: "uid-1".into(),
            volumes: volumes
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            containers: vec![c.clone()],
            ..Default::default()
        };
        (p, c)
    }

    #[test]
    fn declared_paths_resolve_through_the_longest_mount() {
        let (p, c) = pod(&[
            ("logs", VolumeSource::EmptyDir),
            ("nested", VolumeSource::EmptyDir),
            ("cfg", VolumeSource::Other("configMap")),
            ("host", VolumeSource::HostPath("/var/log/app".into())),
        ]);
        let k = Path::new("/var/lib/kubelet/pods");
        let none = Globs::default();
        let r = resolve("/var/log/nginx/*.log", &p, &c, k, &none).unwrap();
        assert_eq!(
            r.base,
            Path::new("/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~empty-dir/logs")
        );
        assert_eq!(r.pattern, vec!["*.log"]);
        let r = resolve("/var/log/nginx/deep/x/a.log", &p, &c, k, &none).unwrap();
        assert!(r.base.ends_with("nested"));
        assert_eq!(r.pattern, vec!["sub", "x", "a.log"]);
        for (bad, why) in [
            ("/var/log/other/*.log", "not under any volume"),
            ("/etc/nginx/*.conf", "configMap"),
            ("/var/log/nginx/../../etc/shadow", "'..'"),
            ("/proc/self/root/etc/shadow", "not under any volume"),
            ("/var/log/nginx", "not under any volume"),
            ("relative/x.log", "absolute"),
            ("/host/*.log", "--allow-hostpath"),
        ] {
            let e = resolve(bad, &p, &c, k, &none).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        let allow = Globs::parse("allow-hostpath", "/var/log/*").unwrap();
        let r = resolve("/host/*.log", &p, &c, k, &allow).unwrap();
        assert_eq!(r.base, Path::new("/var/log/app"));
    }

    #[test]
    fn listing_and_opening_never_leave_the_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = tmp.path().join("vol");
        let outside = tmp.path().join("secret");
        std::fs::create_dir_all(vol.join("app")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("key.log"), "TOP SECRET\n").unwrap();
        std::fs::write(vol.join("app/a.log"), "a\n").unwrap();
        std::fs::write(vol.join("app/b.txt"), "b\n").unwrap();
        // Escapes: a symlinked file, a symlinked directory, absolute and
        // relative, and a /proc magic link.
        std::os::unix::fs::symlink(outside.join("key.log"), vol.join("app/abs.log")).unwrap();
        std::os::unix::fs::symlink("../../secret/key.log", vol.join("app/rel.log")).unwrap();
        std::os::unix::fs::symlink(&outside, vol.join("linkdir")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root/etc/hostname", vol.join("app/proc.log"))
            .unwrap();
        // A symlink that stays inside is fine.
        std::os::unix::fs::symlink("a.log", vol.join("app/inside.log")).unwrap();
        let r = Resolved {
            base: vol.clone(),
            pattern: vec!["app".into(), "*.log".into()],
        };
        let l = list_matches(&r).unwrap();
        let mut names: Vec<_> = l
            .files
            .iter()
            .map(|f| f.rel.display().to_string())
            .collect();
        names.sort();
        assert_eq!(names, vec!["app/a.log", "app/inside.log"]);
        assert_eq!(l.dirs, vec![vol.join("app")]);
        let r = Resolved {
            base: vol.clone(),
            pattern: vec!["linkdir".into(), "*.log".into()],
        };
        assert!(list_matches(&r).unwrap().files.is_empty());
        let r = Resolved {
            base: vol.clone(),
            pattern: vec!["*".into(), "*.log".into()],
        };
        let l = list_matches(&r).unwrap();
        assert!(l.files.iter().all(|f| f.rel.starts_with("app")));
        // Opening checks again (the tree may change between list and open).
        for rel in [
            "app/abs.log",
            "app/rel.log",
            "linkdir/key.log",
            "app/proc.log",
            "../secret/key.log",
        ] {
            let c = Confined {
                base: vol.clone(),
                rel: rel.into(),
            };
            assert!(c.open().is_err(), "{rel} opened");
        }
        let c = Confined {
            base: vol.clone(),
            rel: "app/a.log".into(),
        };
        assert_eq!(std::io::read_to_string(c.open().unwrap()).unwrap(), "a\n");
        // A volume directory that is itself a symlink is refused too.
        let c = Confined {
            base: vol.join("linkdir"),
            rel: "key.log".into(),
        };
        assert!(c.open().is_err());
    }
}
