//! bpftail: container log files to Kafka, at-least-once.
//!
//! The data flow, one module per stage:
//! [`discover`] finds log files (with [`kube`]'s pod metadata and the
//! routing [`declare`]d in pods; in-container files through
//! [`discover::volumes`]) → [`watch`] reports which changed →
//! [`tail`] reads and decodes them → [`sink`] produces to Kafka →
//! delivery reports advance [`checkpoint`]s. [`pipeline`] is the loop that
//! joins them; [`config`] and [`metrics`] serve all of them.

pub mod checkpoint;
pub mod config;
pub mod consume;
pub mod declare;
pub mod discover;
pub mod files;
pub mod fs;
pub mod kafka;
pub mod kube;
pub mod metrics;
pub mod pipeline;
pub mod reload;
pub mod sink;
pub mod tail;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;

use crate::checkpoint::Store;
use crate::config::{Config, KubeMode};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::watch::{ChangeQueue, WatchOptions};

/// The change-detection settings of `cfg`.
pub fn watch_options(cfg: &Config) -> WatchOptions {
    use crate::config::EbpfAttach;
    use crate::watch::ebpf::{Attach, Options};
    let attach = match cfg.ebpf_attach {
        EbpfAttach::Auto => Attach::ALL.to_vec(),
        EbpfAttach::Fexit => vec![Attach::Fexit],
        EbpfAttach::TpBtf => vec![Attach::TpBtf],
        EbpfAttach::RawTp => vec![Attach::RawTp],
        EbpfAttach::WritePath => vec![Attach::WritePath],
    };
    // Test instrumentation, compiled in only with the `test-hooks` feature
    // (the end-to-end tests' build): the hook drops every event, as if its
    // ring buffer were always full (the agent must still lose nothing).
    #[cfg(feature = "test-hooks")]
    let sabotage = {
        let on = std::env::var_os("BPFTAIL_TEST_EBPF_SABOTAGE").is_some_and(|v| v == "1");
        if on {
            tracing::warn!("BPFTAIL_TEST_EBPF_SABOTAGE=1: the eBPF hook drops every event");
        }
        on
    };
    #[cfg(not(feature = "test-hooks"))]
    let sabotage = false;
    // … and the write-path hook uses only the tracepoints named (comma-
    // separated; empty: none, so that attachment fails).
    #[cfg(feature = "test-hooks")]
    let only_tracepoints = std::env::var("BPFTAIL_TEST_EBPF_TRACEPOINTS")
        .ok()
        .map(|v| {
            tracing::warn!(tracepoints = %v, "BPFTAIL_TEST_EBPF_TRACEPOINTS: the write-path hook uses only these");
            v.split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        });
    #[cfg(not(feature = "test-hooks"))]
    let only_tracepoints = None;
    WatchOptions {
        ebpf: Options {
            attach,
            max_files: cfg.ebpf_max_files,
            tick: cfg.ebpf_tick,
            ring_bytes: crate::watch::ebpf::RING_BYTES,
            sabotage,
            ignore_own_threads: true,
            only_tracepoints,
        },
        poll_interval: cfg.poll_interval,
    }
}

/// The Kafka client chosen by `--kafka-client`.
enum Client {
    Native(Box<kafka::NativeSink>),
    Rdkafka(sink::rdkafka::RdkafkaSink),
}

/// Everything the data loop starts with, but its sink.
struct DataParts {
    cfg: Config,
    metrics: Arc<Metrics>,
    store: Store,
    restored: checkpoint::Loaded,
    queue: ChangeQueue,
    wake: crossbeam_channel::Receiver<()>,
    source: Box<dyn watch::ChangeSource>,
    stopping: Arc<AtomicBool>,
    pods: Option<Arc<kube::PodCache>>,
    reloads: crossbeam_channel::Receiver<Box<Config>>,
    done: tokio::sync::oneshot::Sender<()>,
}

impl DataParts {
    /// Starts the data loop on its own thread, with `sink`.
    fn spawn<S: sink::Sink + Send + 'static>(
        self,
        sink: S,
    ) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let pipeline = Pipeline::new(
            self.cfg,
            self.metrics,
            self.store,
            self.restored,
            sink,
            self.queue,
            self.wake,
            self.source,
            self.stopping,
        )?;
        let pipeline = match self.pods {
            Some(p) => pipeline.with_pods(p),
            None => pipeline,
        }
        .with_reloads(self.reloads);
        let done = self.done;
        Ok(std::thread::Builder::new()
            .name("bpftail-data".into())
            .spawn(move || {
                pipeline.run();
                let _ = done.send(());
            })?)
    }
}

/// The positions of the last checkpoint. An unusable one is said loudly:
/// the agent resumes from the previous checkpoint or from the start of
/// every file (rotated ones included), resending rather than losing lines.
fn load_checkpoints(store: &Store) -> anyhow::Result<checkpoint::Loaded> {
    let loaded = store.load()?;
    if let Some(r) = &loaded.recovery {
        let moved_to = r
            .moved_to
            .as_ref()
            .map_or_else(String::new, |p| p.display().to_string());
        if r.used_previous {
            tracing::error!(problem = %r.problem, moved_to, "the newest checkpoint is unusable: resuming from the previous one (a checkpoint interval older); lines delivered since are sent again, none skipped (bpftail_checkpoint_replay_bytes_total)");
        } else {
            tracing::error!(problem = %r.problem, moved_to, "the newest checkpoint is unusable and no previous one is: every file is read from its start, rotated ones included; lines are sent again, none skipped (bpftail_checkpoint_replay_bytes_total)");
        }
    }
    Ok(loaded)
}

/// Starts the Kafka client `--kafka-client` names.
fn start_client(
    cfg: &Config,
    metrics: &Arc<Metrics>,
    stopping: &Arc<AtomicBool>,
    wakes: (
        crossbeam_channel::Sender<()>,
        crossbeam_channel::Receiver<()>,
    ),
) -> anyhow::Result<Client> {
    Ok(match cfg.kafka_client {
        config::KafkaClient::Native => Client::Native(Box::new(kafka::NativeSink::new(
            cfg,
            metrics.clone(),
            stopping.clone(),
            wakes,
        )?)),
        config::KafkaClient::Rdkafka => Client::Rdkafka(sink::rdkafka::RdkafkaSink::new(
            cfg,
            metrics.clone(),
            stopping.clone(),
            wakes,
        )?),
    })
}

/// Says, in bpftail's words and once at start, which bootstrap brokers do
/// not resolve (a typo, or a cluster DNS name on a host network): the
/// client retries them forever. Off the start path: a lookup may hang.
fn check_brokers_resolve(brokers: &str) {
    let brokers = brokers.to_owned();
    let _ = std::thread::Builder::new()
        .name("bpftail-resolve".into())
        .spawn(move || {
            use std::net::ToSocketAddrs;
            for addr in brokers.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                if let Err(e) = addr.to_socket_addrs() {
                    tracing::warn!(broker = addr, error = %e, "Kafka broker address does not resolve: records wait in their files until it does; check --brokers (a pod with hostNetwork needs dnsPolicy ClusterFirstWithHostNet to resolve cluster Service names)");
                }
            }
        });
}

/// Starts the change source `--watcher` names (or the first usable one).
fn start_watcher(
    cfg: &Config,
    queue: &ChangeQueue,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Box<dyn watch::ChangeSource>> {
    let started = watch::start(cfg.watcher, &watch_options(cfg), queue, metrics)
        .map_err(|e| anyhow::anyhow!("watcher {}: {e}", cfg.watcher.as_str()))?;
    for (kind, why) in &started.skipped {
        tracing::warn!(watcher = %kind.as_str(), reason = %why, "change-detection backend unusable; trying the next");
    }
    if cfg.watcher == config::WatcherKind::Auto
        && started
            .skipped
            .iter()
            .any(|(k, _)| *k == config::WatcherKind::Ebpf)
        && !started.detail.starts_with("ebpf")
    {
        tracing::info!(
            "auto does not use the eBPF sys_exit tracepoint hook (it would slow every syscall on this node); --watcher ebpf forces it"
        );
    }
    let sweep = if started.source.sees_every_write() {
        cfg.sweep_interval_trusted
    } else {
        cfg.sweep_interval
    };
    tracing::info!(
        watcher = %started.detail,
        asked = cfg.watcher.as_str(),
        sweep_interval_ms = sweep.as_millis() as u64,
        why = if cfg.watcher == config::WatcherKind::Auto {
            "auto: the first that starts of ebpf (write path, then fexit), fanotify, inotify, poll"
        } else {
            "named by --watcher"
        },
        "change detection"
    );
    // Starting the eBPF watcher read the kernel's BTF (a few MB, freed
    // since): hand those pages back to the system now.
    // SAFETY: mi_collect has no preconditions.
    #[cfg(feature = "mimalloc")]
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
    let _ = metrics.watcher.set(started.detail);
    Ok(started.source)
}

/// The Kubernetes API client, unless `--kube off` or no configuration.
fn kube_client(cfg: &Config, runtime: &tokio::runtime::Runtime) -> Option<::kube::Client> {
    let client = match cfg.kube {
        KubeMode::Off => None,
        KubeMode::Auto => match runtime.block_on(kube::client()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "no Kubernetes API configuration (in-cluster or KUBECONFIG): pod metadata comes from log paths and Docker labels only");
                None
            }
        },
    };
    if client.is_none() && cfg.ship == config::ShipMode::Declared {
        tracing::warn!(
            "--ship declared without the Kubernetes API: CRI logs' declarations come from the API, so only Docker logs (declared in their env or labels) are shipped"
        );
    }
    client
}

/// Runs the agent until SIGTERM or SIGINT, then shuts down in order; on
/// SIGHUP or a change of the `--config` file, resolves the configuration
/// from `args` again and applies what may change live ([`reload`]).
pub fn run(cfg: Config, args: config::RunArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let store = Store::open(&cfg.data_dir)?;
    let restored = load_checkpoints(&store)?;
    let stopping = Arc::new(AtomicBool::new(false));
    // The data loop sleeps on this channel; changes and delivery reports wake it.
    let (wake_tx, wake) = crossbeam_channel::bounded(1);
    let sink = start_client(&cfg, &metrics, &stopping, (wake_tx.clone(), wake.clone()))?;
    check_brokers_resolve(&cfg.brokers);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("starting the control-plane runtime")?;
    let listener = match cfg.metrics_addr {
        Some(addr) => Some(
            runtime
                .block_on(tokio::net::TcpListener::bind(addr))
                .with_context(|| format!("metrics-addr: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let queue = ChangeQueue::new(wake_tx);
    let source = start_watcher(&cfg, &queue, &metrics)?;
    // Pod metadata: the list-watch runs on the control-plane runtime.
    let kube_client = kube_client(&cfg, &runtime);
    let pods = kube_client
        .as_ref()
        .map(|_| Arc::new(kube::PodCache::default()));
    tracing::info!(
        watcher = %metrics.watcher.get().map_or("", |w| w.as_str()),
        pods_dir = %cfg.pods_dir.display(),
        docker_dir = %cfg.docker_dir.display(),
        brokers = %cfg.brokers,
        node = %cfg.node_name,
        "bpftail starting"
    );
    // The loop turns at least every heartbeat (and every sweep, if shorter).
    let stall = pipeline::HEARTBEAT.min(cfg.sweep_interval) * 3 + Duration::from_secs(30);
    let settings = kube::WatchSettings {
        node: cfg.node_name.clone(),
        grace: cfg.deleted_pod_grace,
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let (reload_tx, reloads) = crossbeam_channel::unbounded();
    let (file_changed_tx, file_changed) = tokio::sync::mpsc::unbounded_channel();
    if let Some(path) = &args.config
        && let Err(e) = reload::watch_file(path, file_changed_tx)
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot watch the configuration file for changes; SIGHUP reloads it");
    }
    let mut reloader = reload::Reloader {
        args,
        running: cfg.clone(),
        to_data_loop: reload_tx,
        wake: queue.clone(),
        metrics: metrics.clone(),
    };
    let parts = DataParts {
        cfg,
        metrics: metrics.clone(),
        store,
        restored,
        queue: queue.clone(),
        wake,
        source,
        stopping: stopping.clone(),
        pods: pods.clone(),
        reloads,
        done: done_tx,
    };
    let data = match sink {
        Client::Native(s) => parts.spawn(*s)?,
        Client::Rdkafka(s) => parts.spawn(s)?,
    };
    runtime.block_on(async {
        if let Some(listener) = listener {
            tokio::spawn(metrics::serve(listener, metrics.clone(), stall));
        }
        if let (Some(client), Some(pods)) = (kube_client, pods) {
            let queue = queue.clone();
            let wake = move || queue.wake();
            tokio::spawn(kube::watch(client, settings, pods, metrics.clone(), wake));
        }
        until_signal(done_rx, file_changed, &mut reloader).await
    })?;
    stopping.store(true, Ordering::Relaxed);
    queue.wake();
    data.join()
        .map_err(|_| anyhow::anyhow!("data loop panicked"))?;
    tracing::info!("stopped");
    Ok(())
}

/// Waits for SIGTERM, SIGINT, or the data loop's end; reloads the
/// configuration on SIGHUP and when its file changed.
async fn until_signal(
    mut done: tokio::sync::oneshot::Receiver<()>,
    mut file_changed: tokio::sync::mpsc::UnboundedReceiver<()>,
    reloader: &mut reload::Reloader,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM");
                return Ok(());
            }
            _ = int.recv() => {
                tracing::info!("SIGINT");
                return Ok(());
            }
            _ = hup.recv() => reloader.reload("SIGHUP"),
            Some(()) = file_changed.recv() => reloader.reload("config file changed"),
            _ = &mut done => {
                tracing::error!("data loop ended unexpectedly");
                return Ok(());
            }
        }
    }
}
