//! The eBPF change source, loaded for real: these need root (CAP_BPF,
//! CAP_PERFMON) and a BTF kernel, which CI has. They do not skip; a plain
//! `cargo test --lib` as a non-root user does not run them (`cargo xtask
//! test` does).

#[path = "support/scratch.rs"]
mod scratch;

use std::io::{IoSlice, Write as _};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bpftail::checkpoint::FileKey;
use bpftail::metrics::Metrics;
use bpftail::watch::ebpf::{Attach, EbpfSource, Options};
use bpftail::watch::{ChangeQueue, ChangeSource, Pending};
use scratch::{FsKind, ScratchFs};

struct Rig {
    src: EbpfSource,
    q: ChangeQueue,
    wake: crossbeam_channel::Receiver<()>,
    metrics: Arc<Metrics>,
    /// Where the rig's files are (dropped last: unmounted after the hook
    /// is gone).
    place: Place,
}

/// The dir a rig's files are in.
enum Place {
    /// A temp dir on the root file system (ext4 on this project's machines).
    Temp(tempfile::TempDir),
    /// A scratch file system the test made.
    Scratch(ScratchFs),
}

fn key_of(f: &std::fs::File) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    let md = f.metadata().unwrap();
    FileKey {
        dev: md.dev(),
        ino: md.ino(),
    }
}

/// The `sys_exit` hook: it sees every write-family syscall as it returns
/// (the tests of the map, ring and flag mechanics use it).
const SYS_EXIT: [Attach; 2] = [Attach::TpBtf, Attach::RawTp];

fn rig() -> Rig {
    rig_with(Options {
        attach: SYS_EXIT.to_vec(),
        ..Options::default()
    })
}

fn rig_with(opts: Options) -> Rig {
    rig_in(Place::Temp(tempfile::tempdir().unwrap()), opts)
}

/// The write-path tracepoints (writes by this process reported), the
/// files on `fs`.
fn write_path_rig_on(fs: ScratchFs) -> Rig {
    let r = rig_in(
        Place::Scratch(fs),
        Options {
            attach: vec![Attach::WritePath],
            // This process writes the files.
            ignore_own_threads: false,
            ..Options::default()
        },
    );
    assert_eq!(r.src.attach(), Attach::WritePath);
    r
}

fn rig_in(place: Place, opts: Options) -> Rig {
    let (tx, wake) = crossbeam_channel::bounded(1);
    let q = ChangeQueue::new(tx);
    let metrics = Arc::new(Metrics::default());
    let src = EbpfSource::start(q.clone(), metrics.clone(), &opts)
        .unwrap_or_else(|e| panic!("the eBPF hook must load here (root, BTF kernel): {e}"));
    Rig {
        src,
        q,
        wake,
        metrics,
        place,
    }
}

impl Rig {
    fn dir(&self) -> &Path {
        match &self.place {
            Place::Temp(t) => t.path(),
            Place::Scratch(fs) => fs.path(),
        }
    }

    fn file(&self, name: &str) -> (std::fs::File, FileKey) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(self.dir().join(name))
            .unwrap();
        let k = key_of(&f);
        (f, k)
    }

    /// Keys reported within `wait`, stopping early once `want` is seen.
    fn reported(&self, wait: Duration, want: Option<FileKey>) -> Pending {
        let mut got = Pending::default();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let _ = self.wake.recv_timeout(Duration::from_millis(5));
            let mut p = Pending::default();
            self.q.take(&mut p);
            got.keys.extend(p.keys);
            got.all_files |= p.all_files;
            if want.is_some_and(|k| got.keys.contains(&k)) {
                break;
            }
        }
        got
    }

    /// Waits until nothing has been reported for 100 ms.
    fn quiet(&self) {
        while !self.reported(Duration::from_millis(100), None).is_empty() {}
    }
}

#[test]
fn a_watched_file_is_reported_an_unwatched_one_is_not() {
    let mut r = rig();
    assert!([Attach::TpBtf, Attach::RawTp].contains(&r.src.attach()));
    let (mut watched, wk) = r.file("watched.log");
    let (mut other, ok) = r.file("other.log");
    r.src.watch_file(wk, None);
    other.write_all(b"not watched\n").unwrap();
    let got = r.reported(Duration::from_millis(300), None);
    assert!(got.keys.is_empty(), "unwatched writes are silent: {got:?}");
    watched.write_all(b"watched\n").unwrap();
    let got = r.reported(Duration::from_secs(5), Some(wk));
    assert!(got.keys.contains(&wk));
    assert!(!got.keys.contains(&ok));
    // Unwatched again: silent again.
    r.quiet();
    r.src.unwatch_file(wk);
    watched.write_all(b"after\n").unwrap();
    assert!(r.reported(Duration::from_millis(300), None).keys.is_empty());
    assert!(r.metrics.ebpf_events.get() >= 1);
    assert!(r.metrics.ebpf_hook_hits.get() >= r.metrics.ebpf_watched_writes.get());
}

#[test]
fn every_write_family_syscall_is_seen() {
    every_write_family_syscall_is_seen_by(rig(), false);
}

/// The write path's tracepoints fire for a write once the file's
/// timestamps were queried (the agent stats each file after reading it):
/// every way of writing, O_DIRECT and appends into a dirty page included.
#[test]
fn write_path_tracepoints_see_every_write_after_a_stat() {
    let r = rig_with(Options {
        attach: vec![Attach::WritePath],
        // This process writes the files.
        ignore_own_threads: false,
        ..Options::default()
    });
    assert_eq!(r.src.attach(), Attach::WritePath);
    every_write_family_syscall_is_seen_by(r, true);
}

/// The write-path hook on one tracepoint alone.
fn one_tracepoint_rig(tp: &str) -> Rig {
    let r = rig_with(Options {
        attach: vec![Attach::WritePath],
        ignore_own_threads: false,
        only_tracepoints: Some(vec![tp.to_owned()]),
        ..Options::default()
    });
    assert_eq!(r.src.attach(), Attach::WritePath);
    r
}

/// What the agent's protocol rests on, per tracepoint: after a stat, the
/// next write re-stamps ctime (multigrain timestamps), so `ctime_ns_xchg`
/// alone sees every way of writing, appends into a dirty page included.
#[test]
fn ctime_ns_xchg_alone_sees_every_write_after_a_stat() {
    every_write_family_syscall_is_seen_by(one_tracepoint_rig("ctime_ns_xchg"), true);
}

/// … and so does `writeback_mark_inode_dirty` (the timestamp update marks
/// the inode dirty).
#[test]
fn writeback_mark_inode_dirty_alone_sees_every_write_after_a_stat() {
    every_write_family_syscall_is_seen_by(one_tracepoint_rig("writeback_mark_inode_dirty"), true);
}

/// `writeback_dirty_folio` fires when a clean page becomes dirty: a write
/// after the file's pages were written back.
#[test]
fn writeback_dirty_folio_fires_when_a_clean_page_is_dirtied() {
    let mut r = one_tracepoint_rig("writeback_dirty_folio");
    let (f, k) = r.file("0.log");
    r.src.watch_file(k, Some(f.as_fd()));
    for round in 0..3 {
        (&f).write_all(b"some bytes\n").unwrap();
        f.sync_data().unwrap();
        r.quiet();
        // Clean now: this write dirties the page again.
        (&f).write_all(b"more\n").unwrap();
        assert!(
            r.reported(Duration::from_secs(5), Some(k))
                .keys
                .contains(&k),
            "round {round}: dirtying a clean page was not reported"
        );
    }
}

/// The agent's own threads are ignored by the write-path tracepoints: its
/// reads and stats must not report themselves.
#[test]
fn write_path_tracepoints_ignore_the_agents_own_threads() {
    let mut r = rig_with(Options {
        attach: vec![Attach::WritePath],
        ..Options::default()
    });
    let (f, k) = r.file("0.log");
    r.src.watch_file(k, Some(f.as_fd()));
    r.quiet();
    f.metadata().unwrap();
    (&f).write_all(b"from the agent's own process\n").unwrap();
    let got = r.reported(Duration::from_millis(300), Some(k));
    assert!(got.keys.is_empty(), "{got:?}");
    // Another process's write is reported.
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg("echo from another process >> \"$0\"")
        .arg(r.dir().join("0.log"))
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        r.reported(Duration::from_secs(5), Some(k))
            .keys
            .contains(&k)
    );
}

/// Each way of writing to a watched file is reported; `stat_first`: after
/// an `fstat` of it, as the agent does after each read. Every way is tried;
/// the test fails naming each one that was not reported.
fn every_write_family_syscall_is_seen_by(mut r: Rig, stat_first: bool) {
    let (f, k) = r.file("0.log");
    r.src.watch_file(k, Some(f.as_fd()));
    let (mut src_file, _) = r.file("source.txt");
    src_file.write_all(b"0123456789\n").unwrap();
    // sendfile, splice and copy_file_range refuse O_APPEND targets.
    let g = std::fs::OpenOptions::new()
        .write(true)
        .open(r.dir().join("0.log"))
        .unwrap();
    let fd = g.as_raw_fd();
    let direct = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(r.dir().join("0.log"))
            .unwrap()
    };
    type Way<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let ways: Vec<Way> = vec![
        ("write", Box::new(|| (&f).write_all(b"w\n").unwrap())),
        // The page the last write dirtied is dirty still.
        (
            "write into a dirty page",
            Box::new(|| (&f).write_all(b"d\n").unwrap()),
        ),
        (
            "writev",
            Box::new(|| {
                let n = (&f)
                    .write_vectored(&[IoSlice::new(b"v"), IoSlice::new(b"\n")])
                    .unwrap();
                assert_eq!(n, 2);
            }),
        ),
        ("pwrite64", Box::new(|| f.write_all_at(b"p\n", 0).unwrap())),
        (
            "sendfile",
            Box::new(|| {
                let mut off: libc::off_t = 0;
                // SAFETY: valid fds and offset pointer.
                let n = unsafe { libc::sendfile(fd, src_file.as_raw_fd(), &mut off, 11) };
                assert_eq!(n, 11, "{}", std::io::Error::last_os_error());
            }),
        ),
        (
            "splice",
            Box::new(|| {
                let mut p = [0; 2];
                // SAFETY: an array of two fds for pipe() to fill.
                assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
                // SAFETY: valid fds and buffer; NULL offsets use the
                // pipe and the file position.
                let n = unsafe {
                    libc::write(p[1], b"s\n".as_ptr().cast(), 2);
                    let n =
                        libc::splice(p[0], std::ptr::null_mut(), fd, std::ptr::null_mut(), 2, 0);
                    libc::close(p[0]);
                    libc::close(p[1]);
                    n
                };
                assert_eq!(n, 2, "{}", std::io::Error::last_os_error());
            }),
        ),
        (
            "copy_file_range",
            Box::new(|| {
                let mut off: libc::loff_t = 0;
                // SAFETY: valid fds and offset pointer; NULL out-offset
                // uses the file position.
                let n = unsafe {
                    libc::copy_file_range(
                        src_file.as_raw_fd(),
                        &mut off,
                        fd,
                        std::ptr::null_mut(),
                        11,
                        0,
                    )
                };
                assert_eq!(n, 11, "{}", std::io::Error::last_os_error());
            }),
        ),
        // tmpfs takes O_DIRECT too (through its page cache; checked on this
        // project's 6.18 kernels), so this way is tried on every file system.
        (
            "O_DIRECT pwrite",
            Box::new(|| {
                // One aligned block, past what the other ways wrote.
                #[repr(align(4096))]
                struct Block([u8; 4096]);
                let mut block = Block([b'o'; 4096]);
                block.0[4095] = b'\n';
                direct.write_all_at(&block.0, 1 << 20).unwrap();
            }),
        ),
    ];
    let mut missed = Vec::new();
    for (name, write) in ways {
        r.quiet();
        if stat_first {
            f.metadata().unwrap();
        }
        write();
        let got = r.reported(Duration::from_secs(5), Some(k));
        if !got.keys.contains(&k) {
            eprintln!("{name} was not reported; reported instead: {got:?}");
            missed.push(name);
        }
    }
    let on = match &r.place {
        Place::Temp(_) => "the test dir's file system".to_owned(),
        Place::Scratch(fs) => format!(
            "{} (st_dev {:#x}, superblock s_dev {:#x})",
            fs.kind(),
            k.dev,
            fs.superblock_dev()
        ),
    };
    assert!(
        missed.is_empty(),
        "not reported for the watched file {k:?} on {on}: {missed:?}"
    );
}

#[test]
fn write_path_tracepoints_see_every_write_on_tmpfs() {
    every_write_family_syscall_is_seen_by(write_path_rig_on(ScratchFs::new(FsKind::Tmpfs)), true);
}

#[test]
fn write_path_tracepoints_see_every_write_on_xfs() {
    every_write_family_syscall_is_seen_by(write_path_rig_on(ScratchFs::new(FsKind::Xfs)), true);
}

/// btrfs: `st_dev` is the subvolume's anonymous device (the top level's
/// too), not the superblock's `s_dev` the kernel's events carry.
#[test]
fn write_path_tracepoints_see_every_write_on_btrfs() {
    every_write_family_syscall_is_seen_by(write_path_rig_on(ScratchFs::new(FsKind::Btrfs)), true);
}

#[test]
fn write_path_tracepoints_see_every_write_on_a_btrfs_subvolume() {
    every_write_family_syscall_is_seen_by(
        write_path_rig_on(ScratchFs::new(FsKind::BtrfsSubvolume)),
        true,
    );
}

/// btrfs numbers inodes per subvolume: the first file of the top level and
/// the first of a subvolume share one kernel identity (superblock, inode).
/// The first is watched by the hook, the second polled: writes to both are
/// reported.
#[test]
fn two_files_with_one_kernel_identity_are_both_reported() {
    use std::os::unix::fs::MetadataExt;
    let mut r = write_path_rig_on(ScratchFs::new(FsKind::BtrfsSubvolume));
    let top = r.dir().parent().unwrap().join("top.log");
    let a = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(&top)
        .unwrap();
    let ka = key_of(&a);
    let (b, kb) = r.file("sub.log");
    assert_ne!(
        ka, kb,
        "fstat tells them apart (the subvolume's own st_dev)"
    );
    assert_eq!(
        a.metadata().unwrap().ino(),
        b.metadata().unwrap().ino(),
        "the premise: the same inode number in the top level and the subvolume"
    );
    r.src.watch_file(ka, Some(a.as_fd()));
    r.src.watch_file(kb, Some(b.as_fd()));
    assert_eq!(
        r.metrics.ebpf_unwatched_files.get(),
        1,
        "the second is polled"
    );
    for (f, k, name) in [(&a, ka, "top level"), (&b, kb, "subvolume")] {
        r.quiet();
        f.metadata().unwrap();
        let mut w = f;
        w.write_all(b"a line\n").unwrap();
        assert!(
            r.reported(Duration::from_secs(5), Some(k))
                .keys
                .contains(&k),
            "the {name} file's write was not reported"
        );
    }
    r.src.unwatch_file(kb);
    r.src.unwatch_file(ka);
    assert_eq!(r.metrics.ebpf_unwatched_files.get(), 0);
}

/// A file made through overlayfs lives in the upper dir (on the root file
/// system): the kernel writes to the upper inode, `fstat` names the
/// overlay's device; the agent watches it under the upper file's name too.
/// (After each write overlayfs copies the upper inode's times to its own,
/// `timestamp:inode_set_ctime_to_ts` on the overlay inode — seen with
/// tracefs on 6.18 — a tracepoint the hook leaves alone: it fires for every
/// write through every overlay.)
#[test]
fn write_path_tracepoints_see_every_write_through_overlayfs() {
    every_write_family_syscall_is_seen_by(write_path_rig_on(ScratchFs::new(FsKind::Overlay)), true);
}

/// A file of the lower layer, copied up when opened for writing: `fstat`
/// through the overlay names the lower inode, the kernel writes to the
/// upper one.
#[test]
fn write_path_tracepoints_see_every_write_to_a_file_overlayfs_copied_up() {
    use std::os::unix::fs::MetadataExt;
    let fs = ScratchFs::overlay_with_lower(&["0.log"]);
    let upper = fs.upper().unwrap().join("0.log");
    let r = write_path_rig_on(fs);
    assert!(!upper.exists());
    let (f, k) = r.file("0.log");
    let up = std::fs::metadata(&upper).expect("opened for writing: copied up");
    assert_ne!(
        k.ino,
        up.ino(),
        "fstat through the overlay names the lower inode, not the upper one written to"
    );
    drop(f);
    every_write_family_syscall_is_seen_by(r, true);
}

#[test]
fn a_burst_of_writes_is_few_events_and_reading_on_reports_reads_everything() {
    let mut r = rig();
    let (mut f, k) = r.file("0.log");
    r.src.watch_file(k, None);
    let path = r.dir().join("0.log");
    let reader = std::fs::File::open(&path).unwrap();
    let mut read_to = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let writer = std::thread::spawn(move || {
        for i in 0..100_000u32 {
            writeln!(f, "line {i:06}").unwrap();
        }
    });
    // The data loop's part: read to EOF whenever the file is reported.
    let mut done = false;
    loop {
        let got = r.reported(Duration::from_millis(500), Some(k));
        if got.keys.contains(&k) {
            loop {
                let n = reader.read_at(&mut buf, read_to).unwrap();
                if n == 0 {
                    break;
                }
                read_to += n as u64;
            }
        } else if done {
            break;
        }
        done = writer.is_finished();
    }
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, 100_000 * 12);
    assert_eq!(
        read_to, len,
        "reads triggered by reports alone saw every byte"
    );
    // The counters as the data loop's sweep publishes them.
    r.src.sweep();
    let events = r.metrics.ebpf_events.get();
    assert!(r.metrics.ebpf_watched_writes.get() >= 100_000);
    assert!(events <= 2_000, "{events} events for 100,000 writes");
    assert_eq!(r.metrics.ebpf_drops.get(), 0);
}

#[test]
fn sabotaged_delivery_is_counted_in_the_kernel_and_nothing_is_reported() {
    let mut r = rig_with(Options {
        attach: SYS_EXIT.to_vec(),
        sabotage: true,
        ..Options::default()
    });
    let (mut f, k) = r.file("0.log");
    r.src.watch_file(k, None);
    for _ in 0..3 {
        f.write_all(b"x\n").unwrap();
    }
    assert!(r.reported(Duration::from_millis(200), None).is_empty());
    let c = r.src.counters();
    assert_eq!(c.events, 0);
    // The flag is cleared after each failed delivery: every write retries.
    assert_eq!(c.drops, 3, "{c:?}");
}

#[test]
fn a_full_ring_buffer_makes_the_agent_read_every_file() {
    // One page of ring buffer (~170 events) and a slow reader: 1,000
    // files written at once cannot all be reported.
    let mut r = rig_with(Options {
        attach: SYS_EXIT.to_vec(),
        ring_bytes: 4096,
        tick: Duration::from_millis(300),
        ..Options::default()
    });
    let mut files = Vec::new();
    for i in 0..1000 {
        let (f, k) = r.file(&format!("{i}.log"));
        r.src.watch_file(k, None);
        files.push(f);
    }
    // Make the reader take a pass first: the next one is 300 ms away.
    files[0].write_all(b"first\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.metrics.watcher_wakeups.get() == 0 {
        assert!(Instant::now() < deadline, "the reader never woke");
        std::thread::yield_now();
    }
    for f in &mut files {
        f.write_all(b"x\n").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Pending::default();
    while !got.all_files && Instant::now() < deadline {
        let p = r.reported(Duration::from_millis(100), None);
        got.all_files |= p.all_files;
        got.keys.extend(p.keys);
    }
    let c = r.src.counters();
    assert!(c.drops > 0, "{c:?}");
    assert!(got.all_files, "lost events make the loop read every file");
}

#[test]
fn files_beyond_the_maps_capacity_are_polled_every_second() {
    let mut r = rig_with(Options {
        attach: SYS_EXIT.to_vec(),
        max_files: 4,
        ..Options::default()
    });
    let files: Vec<_> = (0..6).map(|i| r.file(&format!("{i}.log"))).collect();
    for (_, k) in &files {
        r.src.watch_file(*k, None);
    }
    assert_eq!(r.metrics.ebpf_unwatched_files.get(), 2);
    let (_, last) = files[5];
    // Not in the map: reported by the one-second poll, written or not.
    let got = r.reported(Duration::from_secs(3), Some(last));
    assert!(got.keys.contains(&last));
    // Closing a mapped file gives its slot to a polled one.
    r.src.unwatch_file(files[0].1);
    assert_eq!(r.metrics.ebpf_unwatched_files.get(), 1);
}

#[test]
fn a_file_whose_writes_the_hook_does_not_see_is_polled_after_three_sweeps() {
    let mut r = rig();
    let (_f, real) = r.file("0.log");
    // A key the kernel will never name (as for a btrfs subvolume, whose
    // st_dev is not the superblock's s_dev).
    let wrong = FileKey {
        dev: real.dev + 1,
        ino: real.ino,
    };
    r.src.watch_file(wrong, None);
    for round in 1..=3 {
        assert_eq!(r.metrics.ebpf_unwatched_files.get(), 0, "round {round}");
        r.src.sweep();
        r.src.missed(wrong);
    }
    assert_eq!(r.metrics.ebpf_unwatched_files.get(), 1);
    let got = r.reported(Duration::from_secs(3), Some(wrong));
    assert!(got.keys.contains(&wrong), "polled every second");
    // A miss now and then (a write just before a sweep) is not enough.
    let (_g, other) = r.file("1.log");
    r.src.watch_file(other, None);
    for _ in 0..3 {
        r.src.sweep();
        r.src.missed(other);
        r.src.sweep();
    }
    assert_eq!(r.metrics.ebpf_unwatched_files.get(), 1);
    r.src.unwatch_file(wrong);
    assert_eq!(r.metrics.ebpf_unwatched_files.get(), 0);
}
