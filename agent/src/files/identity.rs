//! Telling files apart by their content: fingerprints, truncation history,
//! and the copytruncate copy rules.
//!
//! A file's identity is its device and inode; its fingerprint (a hash of
//! its first bytes, [`Fingerprint`]) tells a reused inode, or a file
//! truncated and refilled in place, from the file read before. logrotate's
//! copytruncate copies a live file to a rotated name and truncates the
//! original: the copy holds bytes already read, and is recognised by the
//! fingerprint the original had before a truncation ([`Truncations`]), so
//! only what was not read of it is read.
//!
//! The decisions here are pure, over bytes the caller read ([`head`] is the
//! one read).

use std::cell::OnceCell;

use crate::checkpoint::{Entry, Fingerprint};
use crate::files::lifecycle::Looks;
use crate::fs::{Handle, ReadAt};
use crate::tail::TailedFile;

/// Fingerprint and read offset of a file before each of its last
/// truncations, newest last.
///
/// One word while there are none (most files are never truncated).
#[derive(Debug, Default, Clone)]
pub struct Truncations(Option<Box<Kept>>);

#[derive(Debug, Clone)]
struct Kept {
    len: usize,
    items: [(Fingerprint, u64); Truncations::KEPT],
}

impl Truncations {
    /// How many truncations are remembered.
    pub const KEPT: usize = 8;

    /// The file, with `fingerprint`, read up to `read_offset`, was truncated.
    pub fn push(&mut self, fingerprint: Fingerprint, read_offset: u64) {
        let kept = self.0.get_or_insert_with(|| {
            Box::new(Kept {
                len: 0,
                items: [(Fingerprint::of(b""), 0); Self::KEPT],
            })
        });
        if kept.len == Self::KEPT {
            kept.items.rotate_left(1);
            kept.len -= 1;
        }
        kept.items[kept.len] = (fingerprint, read_offset);
        kept.len += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Fingerprint, u64)> + '_ {
        self.0.iter().flat_map(|k| k.items[..k.len].iter().copied())
    }
}

/// The first bytes of `file`, up to [`Fingerprint::MAX_LEN`] (fewer if it
/// is shorter, or cannot be read).
pub fn head<R: ReadAt + ?Sized>(file: &R) -> Vec<u8> {
    let mut buf = vec![0u8; Fingerprint::MAX_LEN];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf.truncate(got);
    buf
}

/// Whether a followed file was truncated or replaced in place: it is
/// shorter than what was read of it, or its first bytes no longer hash to
/// its fingerprint (truncated and refilled past the read offset between two
/// looks). `now` fingerprints its first `n` bytes as they are now; it is
/// only called when the fingerprint covers read bytes only.
pub fn replaced(
    len: u64,
    read_offset: u64,
    fingerprint: Fingerprint,
    now: impl FnOnce(usize) -> Option<Fingerprint>,
) -> bool {
    len < read_offset
        || (fingerprint.len > 0
            && u64::from(fingerprint.len) <= read_offset
            && now(fingerprint.len as usize).is_some_and(|fp| fp != fingerprint))
}

/// A followed file of the same stream as a rotated file found unread.
#[derive(Debug)]
pub struct Sibling<'a> {
    pub fingerprint: Fingerprint,
    pub read_offset: u64,
    pub truncations: &'a Truncations,
    /// Its first bytes ([`head`]).
    pub head: &'a [u8],
}

/// If the file whose first bytes are `copy_head` is a copy of a sibling
/// as it was (now, or before one of its truncations), how far that sibling
/// had been read then: the copy is read from there.
pub fn copied_from(copy_head: &[u8], siblings: &[Sibling<'_>]) -> Option<u64> {
    siblings
        .iter()
        .flat_map(|s| {
            [(s.fingerprint, s.read_offset)]
                .into_iter()
                .chain(s.truncations.iter())
        })
        .find(|(fp, _)| {
            let n = fp.len as usize;
            n > 0 && copy_head.len() >= n && Fingerprint::of(&copy_head[..n]) == *fp
        })
        .map(|(_, read)| read)
}

/// Whether a rotated file of `len` bytes, too short to fingerprint in
/// full, may be a copytruncate copy still being written: its stream has
/// truncated files, or its bytes are the first bytes of a sibling (or it
/// cannot be read).
pub fn maybe_copy(copy_head: &[u8], len: u64, siblings: &[Sibling<'_>]) -> bool {
    let n = (len as usize).min(Fingerprint::MAX_LEN);
    if copy_head.len() < n {
        return true;
    }
    let copy = &copy_head[..n];
    siblings
        .iter()
        .any(|s| !s.truncations.is_empty() || (s.head.len() >= n && &s.head[..n] == copy))
}

/// The facts a start decision asks of a file opened just now, read from
/// disk when asked: its first bytes, and those of the followed files of
/// its stream.
pub struct OnDisk<'a> {
    file: &'a Handle,
    len: u64,
    siblings: Vec<&'a TailedFile>,
    head: OnceCell<Vec<u8>>,
    heads: OnceCell<Vec<Vec<u8>>>,
}

impl<'a> OnDisk<'a> {
    pub fn new(file: &'a Handle, len: u64, siblings: Vec<&'a TailedFile>) -> OnDisk<'a> {
        OnDisk {
            file,
            len,
            siblings,
            head: OnceCell::new(),
            heads: OnceCell::new(),
        }
    }

    fn with_siblings<R>(&self, f: impl FnOnce(&[u8], &[Sibling<'_>]) -> R) -> R {
        let copy = self.head.get_or_init(|| head(self.file));
        let heads = self
            .heads
            .get_or_init(|| self.siblings.iter().map(|s| head(&s.file)).collect());
        let siblings: Vec<Sibling<'_>> = self
            .siblings
            .iter()
            .zip(heads)
            .map(|(s, h)| Sibling {
                fingerprint: s.fingerprint,
                read_offset: s.read_offset,
                truncations: &s.before_truncation,
                head: h,
            })
            .collect();
        f(copy, &siblings)
    }
}

impl Looks for OnDisk<'_> {
    fn size(&self) -> u64 {
        self.len
    }
    fn matches(&self, e: &Entry) -> bool {
        Fingerprint::read(self.file, e.fingerprint.len as usize).ok() == Some(e.fingerprint)
    }
    fn copied_from(&self) -> Option<u64> {
        self.with_siblings(copied_from)
    }
    fn maybe_copy(&self) -> bool {
        self.with_siblings(|head, s| maybe_copy(head, self.len, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sibling<'a>(content: &'a [u8], read: u64, t: &'a Truncations) -> Sibling<'a> {
        Sibling {
            fingerprint: Fingerprint::of(content),
            read_offset: read,
            truncations: t,
            head: &content[..content.len().min(Fingerprint::MAX_LEN)],
        }
    }

    #[test]
    fn a_truncated_or_refilled_file_is_replaced_a_grown_one_is_not() {
        let fp = Fingerprint::of(b"hello\n");
        let same = |_| Some(fp);
        let other = |_| Some(Fingerprint::of(b"world\n"));
        assert!(!replaced(10, 6, fp, same));
        assert!(replaced(3, 6, fp, same), "shorter than what was read");
        assert!(replaced(10, 6, fp, other), "refilled past the read offset");
        // The fingerprint covers bytes not read yet: not judged by it.
        assert!(!replaced(10, 4, fp, other));
    }

    #[test]
    fn the_last_truncations_are_kept_oldest_first() {
        let mut t = Truncations::default();
        assert!(t.is_empty());
        for i in 0..11u64 {
            t.push(Fingerprint::of(&i.to_le_bytes()), i);
        }
        let offsets: Vec<u64> = t.iter().map(|(_, at)| at).collect();
        assert_eq!(offsets, (3..11).collect::<Vec<_>>());
        assert_eq!(
            t.iter().next().unwrap().0,
            Fingerprint::of(&3u64.to_le_bytes())
        );
    }

    #[test]
    fn a_copy_resumes_where_the_original_was_read_before_its_truncation() {
        let original = b"line one\nline two\n";
        let mut t = Truncations::default();
        t.push(Fingerprint::of(original), 9);
        // The live file now holds new bytes; the copy holds the old ones.
        let live = sibling(b"new\n", 0, &t);
        assert_eq!(copied_from(original, &[live]), Some(9));
        let none = Truncations::default();
        let unrelated = sibling(b"other\n", 6, &none);
        assert_eq!(copied_from(original, &[unrelated]), None);
        // A copy of what the live file holds now, read up to 18.
        let same = sibling(original, 18, &none);
        assert_eq!(copied_from(original, &[same]), Some(18));
    }

    #[test]
    fn a_short_rotated_file_may_be_a_copy_when_its_stream_truncates_or_it_starts_a_sibling() {
        let none = Truncations::default();
        let mut t = Truncations::default();
        t.push(Fingerprint::of(b"x"), 1);
        let live = sibling(b"abcdef\n", 7, &none);
        assert!(maybe_copy(b"abc", 3, &[sibling(b"abcdef\n", 7, &none)]));
        assert!(!maybe_copy(b"xyz", 3, &[live]));
        assert!(maybe_copy(b"xyz", 3, &[sibling(b"q\n", 2, &t)]));
        assert!(maybe_copy(b"ab", 3, &[]), "unreadable: assume a copy");
        assert!(!maybe_copy(b"xyz", 3, &[]));
    }

    #[test]
    fn truncation_history_keeps_the_last_ones() {
        let mut t = Truncations::default();
        for i in 0..20 {
            t.push(Fingerprint::of(b"a"), i);
        }
        let kept: Vec<u64> = t.iter().map(|(_, r)| r).collect();
        assert_eq!(kept, (12..20).collect::<Vec<_>>());
    }
}
