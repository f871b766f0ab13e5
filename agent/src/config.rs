//! Configuration: command-line flags, `BPFTAIL_*` environment variables and
//! a TOML file, merged in that order of precedence (flag > env > file >
//! built-in default).
//!
//! Guarantees: [`Config::resolve`] either returns a complete, validated
//! configuration or an error that names the setting and says what to fix.
//! Nothing is started before it returns, so a bad configuration never leaves
//! a half-running agent behind.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::discover::MultilineDefaults;
use crate::files::limits::parse_rate;
use crate::tail::multiline::Rule;
use serde::Deserialize;

/// Default maximum size of one logical record (after P/F reassembly).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "bpftail",
    version,
    about = "Container-log agent: container log files to Kafka, at-least-once"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ship every container log on this node to Kafka.
    Run(Box<RunArgs>),
    /// Report kernel features and which watcher `--watcher auto` picks.
    Probe(ProbeArgs),
    /// Print the records of a Kafka topic, one per line: to check by hand what bpftail produced.
    Consume(ConsumeArgs),
}

/// Flags of `bpftail consume`.
#[derive(Debug, Clone, Args)]
pub struct ConsumeArgs {
    /// Kafka bootstrap servers, HOST:PORT[,HOST:PORT..].
    #[arg(long, env = "BPFTAIL_BROKERS")]
    pub brokers: String,
    /// The topic to read.
    #[arg(long)]
    pub topic: String,
    /// Start at each partition's earliest record and, without --follow, stop at the records there were at the start [default: only records produced from now on, until stopped].
    #[arg(long)]
    pub from_beginning: bool,
    /// Keep waiting for new records until Ctrl-C or SIGTERM (always so without --from-beginning).
    #[arg(long)]
    pub follow: bool,
    /// One JSON object per record: topic, partition, offset, timestamp, key, headers, value.
    #[arg(long)]
    pub json: bool,
    /// Kafka client setting KEY=VALUE, librdkafka's names: TLS, SASL (repeatable; env: comma-separated).
    #[arg(
        long = "kafka-option",
        env = "BPFTAIL_KAFKA_OPTIONS",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    pub kafka_options: Vec<String>,
    /// Stop after this many records.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_records: Option<u64>,
}

/// Flags of `bpftail probe`: the log directories whose filesystems it
/// reports (the same flags and variables as `bpftail run`).
#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[arg(long, env = "BPFTAIL_PODS_DIR", default_value = "/var/log/pods")]
    pub pods_dir: PathBuf,
    #[arg(
        long,
        env = "BPFTAIL_DOCKER_DIR",
        default_value = "/var/lib/docker/containers"
    )]
    pub docker_dir: PathBuf,
    #[arg(
        long,
        env = "BPFTAIL_KUBELET_PODS_DIR",
        default_value = "/var/lib/kubelet/pods"
    )]
    pub kubelet_pods_dir: PathBuf,
}

/// Flags of `bpftail run`. Every flag also reads `BPFTAIL_<NAME>`; unset
/// flags fall back to the TOML file given by `--config`, then to defaults.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML configuration file (keys as the long flags, with `_` for `-`).
    #[arg(long, env = "BPFTAIL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Root of the CRI log tree [default: /var/log/pods].
    #[arg(long, env = "BPFTAIL_PODS_DIR")]
    pub pods_dir: Option<PathBuf>,
    /// Root of Docker's json-file logs [default: /var/lib/docker/containers].
    #[arg(long, env = "BPFTAIL_DOCKER_DIR")]
    pub docker_dir: Option<PathBuf>,
    /// Kafka bootstrap servers, HOST:PORT[,HOST:PORT..] (required).
    #[arg(long, env = "BPFTAIL_BROKERS")]
    pub brokers: Option<String>,
    /// Topic: a literal or a template over {namespace} {pod} {container} {stream} [default: k8s-logs].
    #[arg(long, env = "BPFTAIL_TOPIC")]
    pub topic: Option<String>,
    /// Record encoding in Kafka [default: json].
    #[arg(long, env = "BPFTAIL_FORMAT")]
    pub format: Option<OutputFormat>,
    /// Kafka compression codec [default: none].
    #[arg(long, env = "BPFTAIL_COMPRESSION")]
    pub compression: Option<Compression>,
    /// Kafka client: the native one, or librdkafka for what it alone does (GSSAPI, OAUTHBEARER, other librdkafka settings) [default: native].
    #[arg(long, env = "BPFTAIL_KAFKA_CLIENT")]
    pub kafka_client: Option<KafkaClient>,
    /// Kafka client setting KEY=VALUE, librdkafka's names (repeatable; env: comma-separated).
    #[arg(
        long = "kafka-option",
        env = "BPFTAIL_KAFKA_OPTIONS",
        value_delimiter = ','
    )]
    pub kafka_options: Vec<String>,
    /// Where checkpoints are kept [default: /var/lib/bpftail].
    #[arg(long, env = "BPFTAIL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Change-detection backend [default: auto].
    #[arg(long, env = "BPFTAIL_WATCHER")]
    pub watcher: Option<WatcherKind>,
    /// How the eBPF hook attaches: auto tries the write path's tracepoints, then fexit; tp-btf and raw-tp (the sys_exit tracepoint: every syscall pays) only when named [default: auto].
    #[arg(long, env = "BPFTAIL_EBPF_ATTACH")]
    pub ebpf_attach: Option<EbpfAttach>,
    /// eBPF and fanotify watchers: minimum milliseconds between passes over kernel events (and the re-arm delay) [default: 40].
    #[arg(long, env = "BPFTAIL_EBPF_TICK_MS")]
    pub ebpf_tick_ms: Option<u64>,
    /// eBPF watcher: capacity of the kernel's watched-file map; files beyond it are polled [default: 16384].
    #[arg(long, env = "BPFTAIL_EBPF_MAX_FILES")]
    pub ebpf_max_files: Option<u32>,
    /// poll watcher: interval between reads of every open file, in milliseconds [default: 250].
    #[arg(long, env = "BPFTAIL_POLL_INTERVAL_MS")]
    pub poll_interval_ms: Option<u64>,
    /// This node's name, sent with every record [default: $NODE_NAME, else the hostname].
    #[arg(long, env = "BPFTAIL_NODE_NAME")]
    pub node_name: Option<String>,
    /// Pod metadata from the Kubernetes API [default: auto].
    #[arg(long, env = "BPFTAIL_KUBE")]
    pub kube: Option<KubeMode>,
    /// Which containers ship: all (minus opt-outs) or only declared ones (log-pilot's behaviour) [default: all].
    #[arg(long, env = "BPFTAIL_SHIP")]
    pub ship: Option<ShipMode>,
    /// Prefixes of log-pilot declarations (`<prefix>_logs_<name>` env, `<prefix>.logs.<name>` labels), comma-separated [default: aliyun].
    #[arg(long, env = "BPFTAIL_DECLARATION_PREFIXES")]
    pub declaration_prefixes: Option<String>,
    /// Topics a declaration (tenant) may choose: comma-separated globs [default: *].
    #[arg(long, env = "BPFTAIL_TOPIC_ALLOW")]
    pub topic_allow: Option<String>,
    /// The kubelet's pods directory, where emptyDir volumes live [default: /var/lib/kubelet/pods].
    #[arg(long, env = "BPFTAIL_KUBELET_PODS_DIR")]
    pub kubelet_pods_dir: Option<PathBuf>,
    /// hostPath volumes whose files declarations may name: comma-separated globs over the host path [default: none].
    #[arg(long, env = "BPFTAIL_ALLOW_HOSTPATH")]
    pub allow_hostpath: Option<String>,
    /// Pod labels records carry: comma-separated globs ("" for none) [default: *].
    #[arg(long, env = "BPFTAIL_POD_LABELS")]
    pub pod_labels: Option<String>,
    /// Pod annotations records carry: comma-separated globs [default: none].
    #[arg(long, env = "BPFTAIL_POD_ANNOTATIONS")]
    pub pod_annotations: Option<String>,
    /// How long a deleted pod's metadata is kept for the last lines of its files, in milliseconds [default: 300000].
    #[arg(long, env = "BPFTAIL_DELETED_POD_GRACE_MS")]
    pub deleted_pod_grace_ms: Option<u64>,
    /// Address of the /metrics and /healthz server; "off" disables it [default: 127.0.0.1:9808].
    #[arg(long, env = "BPFTAIL_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Longest logical record in bytes; longer ones are cut and marked truncated [default: 1048576].
    #[arg(long, env = "BPFTAIL_MAX_RECORD_BYTES")]
    pub max_record_bytes: Option<usize>,
    /// Bytes produced but not yet acknowledged by Kafka before reading pauses [default: 2097152].
    #[arg(long, env = "BPFTAIL_MAX_INFLIGHT_BYTES")]
    pub max_inflight_bytes: Option<u64>,
    /// How often acknowledged offsets are persisted, in milliseconds [default: 1000].
    #[arg(long, env = "BPFTAIL_CHECKPOINT_INTERVAL_MS")]
    pub checkpoint_interval_ms: Option<u64>,
    /// Safety sweep (stat of open files) interval, in milliseconds [default: 5000; 60000 with the eBPF write-path watcher on multigrain timestamps].
    #[arg(long, env = "BPFTAIL_SWEEP_INTERVAL_MS")]
    pub sweep_interval_ms: Option<u64>,
    /// A record left partial at the end of an idle file is delivered (flagged partial) after this many milliseconds [default: 5000].
    #[arg(long, env = "BPFTAIL_PARTIAL_FLUSH_MS")]
    pub partial_flush_ms: Option<u64>,
    /// Multiline records, for containers that choose none: off, java, python, go or regex:<start pattern> [default: off].
    #[arg(long, env = "BPFTAIL_MULTILINE")]
    pub multiline: Option<String>,
    /// A multiline record ends after this many milliseconds without a new line [default: 1000].
    #[arg(long, env = "BPFTAIL_MULTILINE_TIMEOUT_MS")]
    pub multiline_timeout_ms: Option<u64>,
    /// A multiline record ends after this many lines [default: 500].
    #[arg(long, env = "BPFTAIL_MULTILINE_MAX_LINES")]
    pub multiline_max_lines: Option<u64>,
    /// Bytes per second each container may be read at (1000000, 500k, 2Mi…); a container over it is read more slowly, its log file the buffer [default: off].
    #[arg(long, env = "BPFTAIL_CONTAINER_RATE_LIMIT")]
    pub container_rate_limit: Option<String>,
    /// Share of a core the agent paces its reading to under sustained load, e.g. 0.5 [default: off].
    #[arg(long, env = "BPFTAIL_MAX_CPU")]
    pub max_cpu: Option<f64>,
    /// How long shutdown waits for Kafka to acknowledge what is in flight, in milliseconds [default: 10000].
    #[arg(long, env = "BPFTAIL_SHUTDOWN_TIMEOUT_MS")]
    pub shutdown_timeout_ms: Option<u64>,
    /// The agent's own log format [default: text].
    #[arg(long, env = "BPFTAIL_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Value = the log message; time, stream and pod fields as Kafka headers.
    Raw,
    /// Value = one JSON object with the fields and the message.
    Json,
    /// Value = one JSON object with log-pilot's field names (k8s_pod, k8s_pod_namespace, k8s_container_name, k8s_node_name, docker_container, topic, index, tags).
    Logpilot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KafkaClient {
    /// bpftail's own produce-only client.
    Native,
    /// librdkafka.
    Rdkafka,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Snappy => "snappy",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatcherKind {
    /// The best backend this kernel offers.
    Auto,
    /// eBPF write hook (tp_btf/raw_tp on sys_exit, or fexit on vfs writes).
    Ebpf,
    /// fanotify marks on the log directories.
    Fanotify,
    /// inotify on the log directories.
    Inotify,
    /// stat polling of every open file.
    Poll,
}

impl WatcherKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Ebpf => "ebpf",
            Self::Fanotify => "fanotify",
            Self::Inotify => "inotify",
            Self::Poll => "poll",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EbpfAttach {
    /// The write path's tracepoints, else fexit where the kernel allows BPF
    /// trampolines (the `sys_exit` tracepoints only when named).
    Auto,
    /// fexit on vfs_write, vfs_writev, vfs_iter_write, vfs_iocb_iter_write.
    Fexit,
    /// BTF-enabled tracepoint on sys_exit.
    TpBtf,
    /// Raw tracepoint on sys_exit.
    RawTp,
    /// Raw tracepoints of the write path itself (timestamp and writeback
    /// tracepoints): they fire for file writes only.
    WritePath,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeMode {
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShipMode {
    /// Every container's stdout/stderr, except opted-out ones.
    All,
    /// Only what declarations name.
    Declared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The TOML file: the same keys as the long flags, `kafka_options` as a table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    pods_dir: Option<PathBuf>,
    docker_dir: Option<PathBuf>,
    brokers: Option<String>,
    topic: Option<String>,
    format: Option<OutputFormat>,
    compression: Option<Compression>,
    kafka_client: Option<KafkaClient>,
    #[serde(default)]
    kafka_options: BTreeMap<String, String>,
    data_dir: Option<PathBuf>,
    watcher: Option<WatcherKind>,
    ebpf_attach: Option<EbpfAttach>,
    ebpf_tick_ms: Option<u64>,
    ebpf_max_files: Option<u32>,
    poll_interval_ms: Option<u64>,
    node_name: Option<String>,
    kube: Option<KubeMode>,
    ship: Option<ShipMode>,
    declaration_prefixes: Option<String>,
    topic_allow: Option<String>,
    kubelet_pods_dir: Option<PathBuf>,
    allow_hostpath: Option<String>,
    pod_labels: Option<String>,
    pod_annotations: Option<String>,
    deleted_pod_grace_ms: Option<u64>,
    metrics_addr: Option<String>,
    max_record_bytes: Option<usize>,
    max_inflight_bytes: Option<u64>,
    checkpoint_interval_ms: Option<u64>,
    sweep_interval_ms: Option<u64>,
    partial_flush_ms: Option<u64>,
    multiline: Option<String>,
    multiline_timeout_ms: Option<u64>,
    multiline_max_lines: Option<u64>,
    container_rate_limit: Option<String>,
    max_cpu: Option<f64>,
    shutdown_timeout_ms: Option<u64>,
    log_format: Option<LogFormat>,
}

/// A complete, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub pods_dir: PathBuf,
    pub docker_dir: PathBuf,
    pub brokers: String,
    pub topic: TopicTemplate,
    pub format: OutputFormat,
    pub compression: Compression,
    pub kafka_client: KafkaClient,
    /// Kafka settings from the operator (librdkafka's names); applied after
    /// bpftail's own defaults, so they win.
    pub kafka_options: BTreeMap<String, String>,
    pub data_dir: PathBuf,
    pub watcher: WatcherKind,
    pub ebpf_attach: EbpfAttach,
    pub ebpf_tick: Duration,
    pub ebpf_max_files: u32,
    pub poll_interval: Duration,
    pub node_name: String,
    pub kube: KubeMode,
    pub ship: ShipMode,
    /// log-pilot declaration prefixes (`aliyun`).
    pub declaration_prefixes: Vec<String>,
    /// Topics declarations may choose.
    pub topic_allow: Globs,
    pub kubelet_pods_dir: PathBuf,
    /// hostPath volumes declarations may read.
    pub allow_hostpath: Globs,
    /// Which pod labels and annotations records carry.
    pub pod_labels: Globs,
    pub pod_annotations: Globs,
    pub deleted_pod_grace: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub max_record_bytes: usize,
    pub max_inflight_bytes: u64,
    pub checkpoint_interval: Duration,
    /// The safety sweep's interval with a change source that may miss
    /// writes (inotify, fanotify, poll).
    pub sweep_interval: Duration,
    /// … and with one that sees every write (the eBPF hook on syscalls or
    /// VFS functions, or on the write path with multigrain timestamps).
    /// The same as `sweep_interval` when that is set.
    pub sweep_interval_trusted: Duration,
    pub partial_flush: Duration,
    /// `--multiline` and its limits.
    pub multiline: MultilineDefaults,
    /// `--container-rate-limit`, bytes per second.
    pub container_rate_limit: Option<u64>,
    /// `--max-cpu`, cores.
    pub max_cpu: Option<f64>,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("{setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: message.into(),
    }
}

impl Config {
    /// Merges flags/env (already in `args`) over the TOML file over defaults
    /// and validates the result.
    pub fn resolve(args: RunArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        // A setting: the flag (or its environment variable), else the
        // file's, else the default.
        macro_rules! pick {
            ($field:ident, $default:expr) => {
                args.$field.or(file.$field).unwrap_or_else(|| $default)
            };
        }
        // A duration in milliseconds, greater than 0.
        macro_rules! millis {
            ($field:ident, $default:expr, $setting:literal) => {
                match pick!($field, $default) {
                    0 => Err(invalid($setting, "must be greater than 0")),
                    v => Ok(Duration::from_millis(v)),
                }
            };
        }
        let max_inflight_bytes = pick!(max_inflight_bytes, 2 << 20);
        if max_inflight_bytes < 64 * 1024 {
            return Err(invalid(
                "max-inflight-bytes",
                format!("{max_inflight_bytes} is below the minimum of 65536"),
            ));
        }
        let cfg = Config {
            pods_dir: pick!(pods_dir, "/var/log/pods".into()),
            docker_dir: pick!(docker_dir, "/var/lib/docker/containers".into()),
            brokers: brokers(args.brokers.or(file.brokers))?,
            topic: TopicTemplate::parse(&pick!(topic, "k8s-logs".into()))?,
            format: pick!(format, OutputFormat::Json),
            compression: pick!(compression, Compression::None),
            kafka_client: pick!(kafka_client, KafkaClient::Native),
            kafka_options: kafka_options(file.kafka_options, &args.kafka_options)?,
            data_dir: pick!(data_dir, "/var/lib/bpftail".into()),
            watcher: pick!(watcher, WatcherKind::Auto),
            ebpf_attach: pick!(ebpf_attach, EbpfAttach::Auto),
            ebpf_tick: Duration::from_millis(within(
                "ebpf-tick-ms",
                pick!(ebpf_tick_ms, 40),
                1..=1000,
            )?),
            ebpf_max_files: within(
                "ebpf-max-files",
                pick!(ebpf_max_files, 16384).into(),
                16..=1 << 20,
            )? as u32,
            poll_interval: millis!(poll_interval_ms, 250, "poll-interval-ms")?,
            node_name: node_name(args.node_name.or(file.node_name)),
            kube: pick!(kube, KubeMode::Auto),
            ship: pick!(ship, ShipMode::All),
            declaration_prefixes: declaration_prefixes(&pick!(
                declaration_prefixes,
                "aliyun".into()
            ))?,
            topic_allow: Globs::parse("topic-allow", &pick!(topic_allow, "*".into()))?,
            kubelet_pods_dir: pick!(kubelet_pods_dir, "/var/lib/kubelet/pods".into()),
            allow_hostpath: Globs::parse("allow-hostpath", &pick!(allow_hostpath, String::new()))?,
            pod_labels: Globs::parse("pod-labels", &pick!(pod_labels, "*".into()))?,
            pod_annotations: Globs::parse(
                "pod-annotations",
                &pick!(pod_annotations, String::new()),
            )?,
            deleted_pod_grace: millis!(deleted_pod_grace_ms, 300_000, "deleted-pod-grace-ms")?,
            metrics_addr: metrics_addr(pick!(metrics_addr, "127.0.0.1:9808".into()))?,
            max_record_bytes: within(
                "max-record-bytes",
                pick!(max_record_bytes, DEFAULT_MAX_RECORD_BYTES) as u64,
                1024..=64 << 20,
            )? as usize,
            max_inflight_bytes,
            checkpoint_interval: millis!(checkpoint_interval_ms, 1000, "checkpoint-interval-ms")?,
            sweep_interval: millis!(sweep_interval_ms, 5000, "sweep-interval-ms")?,
            sweep_interval_trusted: millis!(sweep_interval_ms, 60_000, "sweep-interval-ms")?,
            partial_flush: millis!(partial_flush_ms, 5000, "partial-flush-ms")?,
            multiline: MultilineDefaults {
                rule: Rule::parse(&pick!(multiline, "off".into()))
                    .map_err(|e| invalid("multiline", e))?,
                timeout: millis!(multiline_timeout_ms, 1000, "multiline-timeout-ms")?,
                max_lines: within(
                    "multiline-max-lines",
                    pick!(multiline_max_lines, 500),
                    1..=1_000_000,
                )? as usize,
                rules: Default::default(),
            },
            container_rate_limit: match args.container_rate_limit.or(file.container_rate_limit) {
                Some(v) => parse_rate(&v).map_err(|e| invalid("container-rate-limit", e))?,
                None => None,
            },
            max_cpu: match args.max_cpu.or(file.max_cpu) {
                Some(c) if c.is_finite() && (0.01..=1024.0).contains(&c) => Some(c),
                Some(c) => {
                    return Err(invalid(
                        "max-cpu",
                        format!("{c} is not a share of cores between 0.01 and 1024"),
                    ));
                }
                None => None,
            },
            shutdown_timeout: millis!(shutdown_timeout_ms, 10_000, "shutdown-timeout-ms")?,
            log_format: pick!(log_format, LogFormat::Text),
        };
        // The native client refuses settings it does not implement: say so
        // now, before anything starts.
        if cfg.kafka_client == KafkaClient::Native {
            crate::kafka::options::Options::from_config(
                &cfg.brokers,
                String::new(),
                cfg.compression,
                cfg.max_inflight_bytes,
                &cfg.kafka_options,
            )
            .map_err(|e| invalid("kafka-option", e.to_string()))?;
        }
        Ok(cfg)
    }
}

impl Config {
    /// What a reload applies: `new` with every setting a running agent
    /// cannot change (directories, the watcher and its settings, the node
    /// name, the API, the metrics address, sizes fixed at start, the Kafka
    /// client's kind, the log format) kept at its value in `self`, and the
    /// names of those that `new` changes (to be logged as needing a
    /// restart).
    pub fn reloaded(&self, mut new: Config) -> (Config, Vec<&'static str>) {
        let mut restart = Vec::new();
        macro_rules! keep {
            ($($field:ident => $setting:literal),* $(,)?) => {$(
                if new.$field != self.$field {
                    restart.push($setting);
                    new.$field = self.$field.clone();
                }
            )*};
        }
        keep!(
            pods_dir => "pods-dir",
            docker_dir => "docker-dir",
            data_dir => "data-dir",
            watcher => "watcher",
            ebpf_attach => "ebpf-attach",
            ebpf_tick => "ebpf-tick-ms",
            ebpf_max_files => "ebpf-max-files",
            poll_interval => "poll-interval-ms",
            node_name => "node-name",
            kube => "kube",
            kubelet_pods_dir => "kubelet-pods-dir",
            allow_hostpath => "allow-hostpath",
            deleted_pod_grace => "deleted-pod-grace-ms",
            metrics_addr => "metrics-addr",
            max_record_bytes => "max-record-bytes",
            max_inflight_bytes => "max-inflight-bytes",
            kafka_client => "kafka-client",
            log_format => "log-format",
        );
        (new, restart)
    }

    /// Whether the Kafka client must be rebuilt to apply `new` (a drain,
    /// then a new connection): brokers, client settings and credentials,
    /// compression, record format.
    pub fn kafka_changed(&self, new: &Config) -> bool {
        self.brokers != new.brokers
            || self.kafka_options != new.kafka_options
            || self.compression != new.compression
            || self.format != new.format
    }
}

/// The node's name: `--node-name`, else `NODE_NAME`, else the host name.
fn node_name(flag: Option<String>) -> String {
    match flag {
        Some(n) => n,
        None => std::env::var("NODE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(hostname),
    }
}

/// `--brokers`: a comma-separated list of HOST:PORT.
fn brokers(value: Option<String>) -> Result<String, ConfigError> {
    let brokers = value.ok_or_else(|| {
        invalid(
            "brokers",
            "no Kafka brokers given: set --brokers HOST:PORT, BPFTAIL_BROKERS or `brokers` in the config file",
        )
    })?;
    if brokers
        .split(',')
        .any(|b| b.trim().is_empty() || !b.contains(':'))
    {
        return Err(invalid(
            "brokers",
            format!("{brokers:?} is not a list of HOST:PORT separated by commas"),
        ));
    }
    Ok(brokers)
}

/// `--kafka-option KEY=VALUE` over the file's `[kafka_options]`; the
/// settings other flags own are refused.
fn kafka_options(
    mut options: BTreeMap<String, String>,
    flags: &[String],
) -> Result<BTreeMap<String, String>, ConfigError> {
    for kv in flags {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| invalid("kafka-option", format!("{kv:?} is not KEY=VALUE")))?;
        if k.trim().is_empty() {
            return Err(invalid("kafka-option", format!("{kv:?} has an empty key")));
        }
        options.insert(k.trim().to_owned(), v.to_owned());
    }
    for reserved in ["bootstrap.servers", "compression.type", "compression.codec"] {
        if options.contains_key(reserved) {
            return Err(invalid(
                "kafka-option",
                format!("{reserved} is set by --brokers/--compression; use those flags instead"),
            ));
        }
    }
    Ok(options)
}

/// `value` if it is within `range`.
fn within(
    setting: &'static str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            setting,
            format!("{value} is outside {}..={}", range.start(), range.end()),
        ))
    }
}

/// `--metrics-addr`: IP:PORT, or `off`.
fn metrics_addr(value: String) -> Result<Option<SocketAddr>, ConfigError> {
    if value == "off" || value.is_empty() {
        return Ok(None);
    }
    value.parse::<SocketAddr>().map(Some).map_err(|e| {
        invalid(
            "metrics-addr",
            format!("{value:?} is not IP:PORT ({e}); use \"off\" to disable"),
        )
    })
}

/// `--declaration-prefixes`: comma-separated names made of letters, digits
/// and `_`.
fn declaration_prefixes(raw: &str) -> Result<Vec<String>, ConfigError> {
    let list: Vec<String> = raw
        .split(',')
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    if let Some(bad) = list
        .iter()
        .find(|p| !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    {
        return Err(invalid(
            "declaration-prefixes",
            format!("{bad:?}: a prefix is letters, digits and '_' (as in aliyun_logs_<name>)"),
        ));
    }
    Ok(list)
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// A comma-separated list of shell-style globs (`*` any run, `?` any one
/// character); empty matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Globs(Vec<String>);

impl Globs {
    pub fn parse(setting: &'static str, s: &str) -> Result<Globs, ConfigError> {
        let mut out = Vec::new();
        for g in s.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            if let Some(c) = g.chars().find(|c| c.is_control()) {
                return Err(invalid(
                    setting,
                    format!("{g:?}: control character {c:?} in a glob"),
                ));
            }
            out.push(g.to_owned());
        }
        Ok(Globs(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, s: &str) -> bool {
        self.0
            .iter()
            .any(|g| glob_match(g.as_bytes(), s.as_bytes()))
    }
}

/// Shell-style match of the whole of `s`: `*` any run, `?` any one byte.
pub fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    // Iterative with one backtrack point: linear for patterns with one `*`,
    // never exponential.
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// One piece of a topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// Shared: a topic that is one literal is handed out, not copied, to
    /// every file ([`TopicTemplate::render_shared`]).
    Literal(std::sync::Arc<str>),
    Namespace,
    Pod,
    Container,
    Stream,
}

/// `--topic`: a literal or a template over `{namespace}`, `{pod}`,
/// `{container}` and `{stream}`. Rendered once per file and stream, never
/// per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

impl std::fmt::Display for TopicTemplate {
    /// The template as written.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.parts {
            match p {
                Part::Literal(l) => f.write_str(l)?,
                Part::Namespace => f.write_str("{namespace}")?,
                Part::Pod => f.write_str("{pod}")?,
                Part::Container => f.write_str("{container}")?,
                Part::Stream => f.write_str("{stream}")?,
            }
        }
        Ok(())
    }
}

/// What a topic template is rendered from.
pub struct TopicVars<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub container: &'a str,
}

impl TopicTemplate {
    pub fn parse(s: &str) -> Result<TopicTemplate, ConfigError> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].into()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| invalid("topic", format!("{s:?}: '{{' without a closing '}}'")))?
                + open;
            parts.push(match &rest[open + 1..close] {
                "namespace" => Part::Namespace,
                "pod" => Part::Pod,
                "container" => Part::Container,
                "stream" => Part::Stream,
                other => {
                    return Err(invalid(
                        "topic",
                        format!("{s:?}: unknown field {{{other}}}; use {{namespace}}, {{pod}}, {{container}} or {{stream}}"),
                    ));
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.into()));
        }
        for p in &parts {
            if let Part::Literal(l) = p
                && let Some(c) = l.chars().find(|c| !is_topic_char(*c))
            {
                return Err(invalid(
                    "topic",
                    format!(
                        "{s:?}: {c:?} is not allowed in a Kafka topic name (use a-z A-Z 0-9 . _ -)"
                    ),
                ));
            }
        }
        if parts.is_empty() {
            return Err(invalid("topic", "the topic is empty"));
        }
        Ok(TopicTemplate { parts })
    }

    /// True if the rendered topic differs between stdout and stderr.
    pub fn uses_stream(&self) -> bool {
        self.parts.contains(&Part::Stream)
    }

    /// [`TopicTemplate::render`], shared: a literal topic is one allocation
    /// for every file, not one per file.
    pub fn render_shared(&self, vars: &TopicVars<'_>, stream: &str) -> std::sync::Arc<str> {
        match &self.parts[..] {
            [Part::Literal(l)] if l.len() <= 249 => l.clone(),
            _ => self.render(vars, stream).into(),
        }
    }

    /// Renders the topic; characters a topic may not hold become `_`, and the
    /// result is cut at Kafka's 249-byte limit.
    pub fn render(&self, vars: &TopicVars<'_>, stream: &str) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Namespace => push_sanitized(&mut out, vars.namespace),
                Part::Pod => push_sanitized(&mut out, vars.pod),
                Part::Container => push_sanitized(&mut out, vars.container),
                Part::Stream => out.push_str(stream),
            }
        }
        if out.is_empty() {
            out.push('_');
        }
        out.truncate(249);
        out
    }
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn push_sanitized(out: &mut String, v: &str) {
    out.extend(v.chars().map(|c| if is_topic_char(c) { c } else { '_' }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RunArgs {
        RunArgs {
            brokers: Some("127.0.0.1:9092".into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_deployed_config_map_is_a_valid_configuration() {
        let manifest = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/bpftail.yaml"),
        )
        .unwrap();
        let toml: String = manifest
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("bpftail.toml: |"))
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        assert!(toml.contains("brokers"), "{toml}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bpftail.toml");
        std::fs::write(&path, &toml).unwrap();
        let c = Config::resolve(RunArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(c.kubelet_pods_dir, Path::new("/var/lib/kubelet/pods"));
        assert_eq!(c.ship, ShipMode::All);
    }

    #[test]
    fn globs_match_whole_strings() {
        let g = Globs::parse("pod-labels", "app, team-*,a?c").unwrap();
        for yes in ["app", "team-", "team-x.y/z", "abc"] {
            assert!(g.matches(yes), "{yes}");
        }
        for no in ["apps", "xteam-a", "ac", "abbc", ""] {
            assert!(!g.matches(no), "{no}");
        }
        assert!(Globs::parse("x", "*").unwrap().matches(""));
        assert!(!Globs::parse("x", "").unwrap().matches("a"));
        assert!(glob_match(b"*a*b*c", b"xxaxxbxxc"));
        assert!(!glob_match(b"*a*b*c", b"xxaxxbxx"));
        // Pathological input stays fast (no exponential backtracking).
        let long = "a".repeat(10_000);
        assert!(!glob_match(b"*a*a*a*a*a*b", long.as_bytes()));
        assert!(Globs::parse("pod-labels", "a\u{7}").is_err());
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "topic = \"from-file\"\npods_dir = \"/file/pods\"\n[kafka_options]\n\"linger.ms\" = \"7\"\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path);
        a.topic = Some("from-flag".into());
        a.kafka_options = vec!["acks=all".into()];
        let c = Config::resolve(a).unwrap();
        assert_eq!(c.topic, TopicTemplate::parse("from-flag").unwrap());
        assert_eq!(c.pods_dir, PathBuf::from("/file/pods"));
        assert_eq!(c.docker_dir, PathBuf::from("/var/lib/docker/containers"));
        assert_eq!(c.kafka_options["linger.ms"], "7");
        assert_eq!(c.kafka_options["acks"], "all");
    }

    #[test]
    fn missing_brokers_says_how_to_set_them() {
        let err = Config::resolve(RunArgs::default()).unwrap_err().to_string();
        assert!(err.contains("--brokers"), "{err}");
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "topik = \"x\"\n").unwrap();
        let mut a = args();
        a.config = Some(path);
        let err = Config::resolve(a).unwrap_err().to_string();
        assert!(err.contains("topik"), "{err}");
    }

    #[test]
    fn bad_values_fail_fast_with_the_setting_named() {
        let mut a = args();
        a.kafka_options = vec!["novalue".into()];
        assert!(
            Config::resolve(a)
                .unwrap_err()
                .to_string()
                .starts_with("kafka-option")
        );
        let mut a = args();
        a.metrics_addr = Some("localhost".into());
        assert!(
            Config::resolve(a)
                .unwrap_err()
                .to_string()
                .starts_with("metrics-addr")
        );
        let mut a = args();
        a.max_record_bytes = Some(10);
        assert!(
            Config::resolve(a)
                .unwrap_err()
                .to_string()
                .starts_with("max-record-bytes")
        );
        let mut a = args();
        a.topic = Some("logs/{pod}".into());
        assert!(
            Config::resolve(a)
                .unwrap_err()
                .to_string()
                .starts_with("topic")
        );
        let mut a = args();
        a.topic = Some("logs-{node}".into());
        assert!(
            Config::resolve(a)
                .unwrap_err()
                .to_string()
                .contains("unknown field {node}")
        );
    }

    #[test]
    fn topic_template_renders_and_sanitizes() {
        let t = TopicTemplate::parse("logs.{namespace}.{container}-{stream}").unwrap();
        assert!(t.uses_stream());
        let vars = TopicVars {
            namespace: "kube-system",
            pod: "p",
            container: "weird/name",
        };
        assert_eq!(
            t.render(&vars, "stderr"),
            "logs.kube-system.weird_name-stderr"
        );
        assert!(!TopicTemplate::parse("plain").unwrap().uses_stream());
    }

    #[test]
    fn a_reload_keeps_what_only_a_restart_changes_and_says_which() {
        let old = Config::resolve(args()).unwrap();
        let new = Config::resolve(RunArgs {
            topic: Some("t-{namespace}".into()),
            data_dir: Some("/elsewhere".into()),
            watcher: Some(WatcherKind::Poll),
            multiline: Some("java".into()),
            topic_allow: Some("team-*".into()),
            ..args()
        })
        .unwrap();
        assert!(!old.kafka_changed(&new));
        let (applied, restart) = old.reloaded(new);
        assert_eq!(restart, ["data-dir", "watcher"]);
        assert_eq!(applied.data_dir, old.data_dir);
        assert_eq!(applied.watcher, old.watcher);
        assert_eq!(applied.topic.to_string(), "t-{namespace}");
        assert!(applied.multiline.rule.is_some());
        assert!(applied.topic_allow.matches("team-a") && !applied.topic_allow.matches("x"));
        // Credentials and brokers rebuild the client.
        let creds = Config::resolve(RunArgs {
            kafka_options: vec![
                "sasl.password=new".into(),
                "sasl.username=u".into(),
                "sasl.mechanism=PLAIN".into(),
                "security.protocol=SASL_PLAINTEXT".into(),
            ],
            ..args()
        })
        .unwrap();
        assert!(old.kafka_changed(&creds));
    }
}
