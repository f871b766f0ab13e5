//! Live reconfiguration, on the control plane: SIGHUP or a change of the
//! `--config` file (written in place, replaced by a rename, or a ConfigMap
//! update, which swaps the `..data` symlink of the mounted directory) makes
//! the agent resolve its configuration again — flags and environment as at
//! start, the file as it is now.
//!
//! - A configuration that does not resolve is refused with the reason; the
//!   running one stays (`bpftail_config_reloads_total{result="refused"}`).
//! - Settings only a restart can change are logged as such and keep their
//!   running values ([`Config::reloaded`]).
//! - The rest goes to the data loop, which applies it between two turns
//!   ([`crate::pipeline`]'s `reload`).
//!
//! The file is watched with inotify on its directory, by a thread that
//! sleeps in `read(2)`: no wakeup while nothing changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::config::{Config, RunArgs};
use crate::metrics::Metrics;
use crate::watch::ChangeQueue;

/// What a reload needs: how the configuration was given, what runs, and
/// where new configurations go.
pub struct Reloader {
    pub args: RunArgs,
    pub running: Config,
    pub to_data_loop: Sender<Box<Config>>,
    pub wake: ChangeQueue,
    pub metrics: Arc<Metrics>,
}

impl Reloader {
    /// Resolves the configuration again (`why`: what asked) and hands what
    /// changes live to the data loop.
    pub fn reload(&mut self, why: &str) {
        let new = match Config::resolve(self.args.clone()) {
            Ok(c) => c,
            Err(e) => {
                self.metrics.config_reloads_refused.inc();
                tracing::warn!(trigger = why, error = %e, "configuration reload refused; the running configuration stays");
                return;
            }
        };
        let (apply, restart) = self.running.reloaded(new);
        for setting in restart {
            tracing::warn!(
                trigger = why,
                setting,
                "setting changed, but only a restart applies it; the running value stays"
            );
        }
        tracing::info!(trigger = why, "configuration read again; applying it");
        self.running = apply.clone();
        if self.to_data_loop.send(Box::new(apply)).is_ok() {
            self.wake.wake();
        }
    }
}

/// Watches the configuration file at `path`: sends on `changed` each time
/// its content differs from the last seen.
pub fn watch_file(
    path: &Path,
    changed: tokio::sync::mpsc::UnboundedSender<()>,
) -> std::io::Result<()> {
    use inotify::{Inotify, WatchMask};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let inotify = Inotify::init()?;
    inotify.watches().add(
        &dir,
        WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CLOSE_WRITE
            | WatchMask::DELETE
            | WatchMask::ATTRIB,
    )?;
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("bpftail-config".into())
        .spawn(move || follow(inotify, &path, changed))?;
    Ok(())
}

/// How long the events of one change (a ConfigMap update is several
/// renames) are let settle before the file is read.
const SETTLE: Duration = Duration::from_millis(100);

fn follow(
    mut inotify: inotify::Inotify,
    path: &Path,
    changed: tokio::sync::mpsc::UnboundedSender<()>,
) {
    let mut buf = vec![0u8; 4096];
    let mut last = std::fs::read(path).ok();
    loop {
        match inotify.read_events_blocking(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "watching the configuration file failed; SIGHUP still reloads it");
                return;
            }
        }
        std::thread::sleep(SETTLE);
        // What came meanwhile belongs to the same change.
        let _ = inotify.read_events(&mut buf);
        let now = std::fs::read(path).ok();
        if now != last {
            last = now;
            if changed.send(()).is_err() {
                return;
            }
        }
    }
}
