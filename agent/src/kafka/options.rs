//! The native client's settings, read from the librdkafka-style keys
//! operators already write (`--kafka-option KEY=VALUE`). A key this client
//! does not implement is a startup error naming it and the way out
//! (`--kafka-client rdkafka`), never silently ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use openssl::ssl::{SslConnector, SslConnectorBuilder, SslFiletype, SslMethod, SslVerifyMode};

use super::sasl::{Credentials, Mechanism};
use crate::config::Compression;

/// TLS to the brokers (`security.protocol=ssl|sasl_ssl`).
#[derive(Clone)]
pub struct Tls {
    pub connector: SslConnector,
    /// Check the broker's name against its certificate
    /// (`ssl.endpoint.identification.algorithm=https`, the default).
    pub verify_hostname: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("verify_hostname", &self.verify_hostname)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acks {
    /// `acks=all` (-1): every in-sync replica has the batch.
    All,
    /// `acks=1`: the leader has it.
    Leader,
}

impl Acks {
    pub fn wire(&self) -> i16 {
        match self {
            Acks::All => -1,
            Acks::Leader => 1,
        }
    }
}

/// Everything the native client is configured with.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bootstrap `host:port` list.
    pub bootstrap: Vec<String>,
    pub client_id: String,
    pub compression: Compression,
    pub acks: Acks,
    /// Largest batch (uncompressed bytes) before it is sealed.
    pub batch_size: usize,
    /// How long an open batch may wait for more records once its partition
    /// could take it (0: send as soon as the partition is free).
    pub linger: Duration,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    pub reconnect_backoff: Duration,
    pub reconnect_backoff_max: Duration,
    pub metadata_max_age: Duration,
    /// How long a topic may be missing from the cluster before its records
    /// are refused (counted and passed over).
    pub topic_missing_after: Duration,
    /// Largest produce request sent (several partitions' batches).
    pub max_request_bytes: usize,
    pub tls: Option<Tls>,
    pub sasl: Option<Credentials>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error(
        "kafka-option {key}: not supported by the native Kafka client; remove it, or run with --kafka-client rdkafka (librdkafka takes every librdkafka setting)"
    )]
    Unsupported { key: String },
    #[error("kafka-option {key}={value}: {why}")]
    Invalid {
        key: String,
        value: String,
        why: String,
    },
}

impl Options {
    /// Reads `kafka_options` over the defaults. `max_inflight` (the
    /// in-flight budget) caps the batch size at a quarter of it, so that
    /// several partitions can fill batches within the budget.
    pub fn from_config(
        brokers: &str,
        client_id: String,
        compression: Compression,
        max_inflight: u64,
        kafka_options: &BTreeMap<String, String>,
    ) -> Result<Options, OptionError> {
        let mut o = Options::defaults(brokers, client_id, compression);
        let mut security = Security::default();
        for (key, value) in kafka_options {
            let setting = Setting { key, value };
            if !o.set(&setting)? && !security.set(&setting)? {
                return Err(OptionError::Unsupported { key: key.clone() });
            }
        }
        o.tls = tls(&security.protocol, &security.keys)?;
        o.sasl = sasl(&security.protocol, &security.keys)?;
        o.retry_backoff_max = o.retry_backoff_max.max(o.retry_backoff);
        o.reconnect_backoff_max = o.reconnect_backoff_max.max(o.reconnect_backoff);
        o.batch_size = o.batch_size.min((max_inflight / 4).max(16 * 1024) as usize);
        Ok(o)
    }

    /// The settings before any `--kafka-option` (librdkafka's defaults,
    /// mostly), with the bootstrap list split out of `brokers`.
    fn defaults(brokers: &str, client_id: String, compression: Compression) -> Options {
        Options {
            bootstrap: brokers
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            client_id,
            compression,
            acks: Acks::All,
            batch_size: 1_000_000,
            linger: Duration::ZERO,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            reconnect_backoff: Duration::from_millis(100),
            reconnect_backoff_max: Duration::from_secs(2),
            metadata_max_age: Duration::from_secs(300),
            topic_missing_after: Duration::from_secs(30),
            max_request_bytes: 16 << 20,
            tls: None,
            sasl: None,
        }
    }

    /// Applies one producer (non-security) key; false if it is not one.
    fn set(&mut self, s: &Setting) -> Result<bool, OptionError> {
        match s.key {
            "acks" | "request.required.acks" => self.acks = s.acks()?,
            "linger.ms" | "queue.buffering.max.ms" => self.linger = s.ms()?,
            "batch.size" => self.batch_size = s.bytes()?,
            "request.timeout.ms" => self.request_timeout = s.ms()?.max(Duration::from_millis(100)),
            "socket.connection.setup.timeout.ms" => {
                self.connect_timeout = s.ms()?.max(Duration::from_millis(100))
            }
            "retry.backoff.ms" => self.retry_backoff = s.ms()?.max(Duration::from_millis(1)),
            "retry.backoff.max.ms" => self.retry_backoff_max = s.ms()?,
            "reconnect.backoff.ms" => {
                self.reconnect_backoff = s.ms()?.max(Duration::from_millis(1))
            }
            "reconnect.backoff.max.ms" => self.reconnect_backoff_max = s.ms()?,
            "metadata.max.age.ms" | "topic.metadata.refresh.interval.ms" => {
                self.metadata_max_age = s.ms()?.max(Duration::from_secs(1))
            }
            "topic.metadata.propagation.max.ms" => self.topic_missing_after = s.ms()?,
            // The batch size bounds what one batch holds; the broker's
            // own limit still applies (too large is split, then refused).
            "message.max.bytes" => {
                let n = s.bytes()?;
                self.batch_size = self.batch_size.min(n);
            }
            "client.id" => self.client_id = s.value.to_owned(),
            // Order is kept by one request in flight per partition, with
            // or without idempotence; duplicates after a retry are
            // possible either way (at-least-once).
            "enable.idempotence" => match s.value.trim() {
                "true" | "false" => {}
                _ => return Err(s.invalid("expected true or false")),
            },
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// One `--kafka-option KEY=VALUE` being read.
struct Setting<'a> {
    key: &'a str,
    value: &'a str,
}

impl Setting<'_> {
    /// This key and value refused, and why.
    fn invalid(&self, why: &str) -> OptionError {
        invalid(self.key, self.value, why)
    }

    /// The value as a number of milliseconds.
    fn ms(&self) -> Result<Duration, OptionError> {
        self.value
            .trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| self.invalid("not a number of milliseconds"))
    }

    /// The value as a number of bytes, at least 1024.
    fn bytes(&self) -> Result<usize, OptionError> {
        match self.value.trim().parse::<usize>() {
            Ok(n) if n >= 1024 => Ok(n),
            _ => Err(self.invalid("not a number of bytes of at least 1024")),
        }
    }

    /// The value as `acks` (0 is refused: nothing would ever be confirmed).
    fn acks(&self) -> Result<Acks, OptionError> {
        match self.value.trim() {
            "all" | "-1" => Ok(Acks::All),
            "1" => Ok(Acks::Leader),
            "0" => Err(self.invalid(
                "acks=0 gives no acknowledgement, and checkpoints only advance on one; use all or 1",
            )),
            _ => Err(self.invalid("expected all, -1 or 1")),
        }
    }
}

/// The keys that matter to TLS and SASL, checked together once every key
/// has been read (see [`tls`] and [`sasl`]).
struct Security<'a> {
    /// `security.protocol`, lowercased.
    protocol: String,
    keys: BTreeMap<&'a str, &'a str>,
}

impl Default for Security<'_> {
    fn default() -> Self {
        Security {
            protocol: "plaintext".to_owned(),
            keys: BTreeMap::new(),
        }
    }
}

/// The TLS and SASL keys kept for [`tls`] and [`sasl`].
const SECURITY_KEYS: &[&str] = &[
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.key.password",
    "ssl.endpoint.identification.algorithm",
    "enable.ssl.certificate.verification",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
];

impl<'a> Security<'a> {
    /// Takes `security.protocol` or a TLS/SASL key; false if it is neither.
    fn set(&mut self, s: &Setting<'a>) -> Result<bool, OptionError> {
        if s.key == "security.protocol" {
            self.protocol = s.value.trim().to_ascii_lowercase();
            if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&&*self.protocol) {
                return Err(s.invalid("expected plaintext, ssl, sasl_plaintext or sasl_ssl"));
            }
        } else if SECURITY_KEYS.contains(&s.key) {
            self.keys.insert(s.key, s.value);
        } else {
            return Ok(false);
        }
        Ok(true)
    }
}

/// An `Invalid` error for `key=value`, and why.
fn invalid(key: &str, value: &str, why: impl Into<String>) -> OptionError {
    OptionError::Invalid {
        key: key.to_owned(),
        value: value.to_owned(),
        why: why.into(),
    }
}

/// The TLS settings, checked now: files that cannot be read or do not
/// hold what they should are startup errors naming the key.
fn tls(protocol: &str, s: &BTreeMap<&str, &str>) -> Result<Option<Tls>, OptionError> {
    let wants = protocol == "ssl" || protocol == "sasl_ssl";
    if !wants {
        refuse_tls_keys(protocol, s)?;
        return Ok(None);
    }
    let mut b = SslConnector::builder(SslMethod::tls_client())
        .map_err(|e| openssl_error(s, "security.protocol", e))?;
    load_ca(&mut b, s)?;
    load_client_certificate(&mut b, s)?;
    let verify = certificate_verification(s)?;
    if !verify {
        b.set_verify(SslVerifyMode::NONE);
    }
    let verify_hostname = hostname_verification(s, verify)?;
    Ok(Some(Tls {
        connector: b.build(),
        verify_hostname,
    }))
}

/// Refuses TLS keys given while TLS is off.
fn refuse_tls_keys(protocol: &str, s: &BTreeMap<&str, &str>) -> Result<(), OptionError> {
    if let Some(k) = s
        .keys()
        .find(|k| k.starts_with("ssl.") || k.contains("ssl.certificate"))
    {
        return Err(invalid(
            k,
            s[k],
            format!(
                "TLS is off (security.protocol={protocol}); set security.protocol=ssl or sasl_ssl"
            ),
        ));
    }
    Ok(())
}

/// An OpenSSL failure, charged to `key` and its value.
fn openssl_error(
    s: &BTreeMap<&str, &str>,
    key: &str,
    e: openssl::error::ErrorStack,
) -> OptionError {
    invalid(key, s.get(key).copied().unwrap_or(""), e.to_string())
}

/// Trusts `ssl.ca.location` (a file or a directory), else the system's CAs.
fn load_ca(b: &mut SslConnectorBuilder, s: &BTreeMap<&str, &str>) -> Result<(), OptionError> {
    let openssl = |e| openssl_error(s, "ssl.ca.location", e);
    match s.get("ssl.ca.location").copied() {
        Some(ca) if std::path::Path::new(ca).is_dir() => b
            .load_verify_locations(None, Some(std::path::Path::new(ca)))
            .map_err(openssl)?,
        Some(ca) => {
            if !std::path::Path::new(ca).exists() {
                return Err(invalid("ssl.ca.location", ca, "no such file"));
            }
            b.set_ca_file(ca).map_err(openssl)?
        }
        None => b.set_default_verify_paths().map_err(openssl)?,
    }
    Ok(())
}

/// Loads the client certificate and key (both or neither), checking that
/// they belong together.
fn load_client_certificate(
    b: &mut SslConnectorBuilder,
    s: &BTreeMap<&str, &str>,
) -> Result<(), OptionError> {
    match (
        s.get("ssl.certificate.location").copied(),
        s.get("ssl.key.location").copied(),
    ) {
        (Some(cert), Some(key)) => {
            b.set_certificate_chain_file(cert)
                .map_err(|e| openssl_error(s, "ssl.certificate.location", e))?;
            load_private_key(b, s, key)?;
            b.check_private_key()
                .map_err(|e| openssl_error(s, "ssl.key.location", e))?;
        }
        (None, None) => {}
        (Some(c), None) => {
            return Err(invalid(
                "ssl.certificate.location",
                c,
                "needs ssl.key.location too",
            ));
        }
        (None, Some(k)) => {
            return Err(invalid(
                "ssl.key.location",
                k,
                "needs ssl.certificate.location too",
            ));
        }
    }
    Ok(())
}

/// Loads the private key at `key`, decrypted with `ssl.key.password` if set.
fn load_private_key(
    b: &mut SslConnectorBuilder,
    s: &BTreeMap<&str, &str>,
    key: &str,
) -> Result<(), OptionError> {
    let openssl = |e| openssl_error(s, "ssl.key.location", e);
    match s.get("ssl.key.password").copied() {
        Some(pass) => {
            let pem =
                std::fs::read(key).map_err(|e| invalid("ssl.key.location", key, e.to_string()))?;
            let pkey = openssl::pkey::PKey::private_key_from_pem_passphrase(&pem, pass.as_bytes())
                .map_err(openssl)?;
            b.set_private_key(&pkey).map_err(openssl)?;
        }
        None => b
            .set_private_key_file(key, SslFiletype::PEM)
            .map_err(openssl)?,
    }
    Ok(())
}

/// `enable.ssl.certificate.verification`: whether the broker's certificate
/// is checked (the default).
fn certificate_verification(s: &BTreeMap<&str, &str>) -> Result<bool, OptionError> {
    match s.get("enable.ssl.certificate.verification").copied() {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(v) => Err(invalid(
            "enable.ssl.certificate.verification",
            v,
            "expected true or false",
        )),
    }
}

/// `ssl.endpoint.identification.algorithm`: whether the broker's name is
/// checked against its certificate (by default, when the certificate is).
fn hostname_verification(s: &BTreeMap<&str, &str>, verify: bool) -> Result<bool, OptionError> {
    match s.get("ssl.endpoint.identification.algorithm").copied() {
        None | Some("https") => Ok(verify),
        Some("none") | Some("") => Ok(false),
        Some(v) => Err(invalid(
            "ssl.endpoint.identification.algorithm",
            v,
            "expected https or none",
        )),
    }
}

/// The SASL credentials, required in full when SASL is on and refused when
/// it is off.
fn sasl(protocol: &str, s: &BTreeMap<&str, &str>) -> Result<Option<Credentials>, OptionError> {
    let wants = protocol.starts_with("sasl_");
    if !wants {
        if let Some(k) = s.keys().find(|k| k.starts_with("sasl.")) {
            return Err(invalid(
                k,
                if k.ends_with("password") { "…" } else { s[k] },
                format!(
                    "SASL is off (security.protocol={protocol}); set security.protocol=sasl_ssl or sasl_plaintext"
                ),
            ));
        }
        return Ok(None);
    }
    let name = s
        .get("sasl.mechanism")
        .or_else(|| s.get("sasl.mechanisms"))
        .copied()
        .unwrap_or("GSSAPI");
    let Some(mechanism) = Mechanism::parse(name) else {
        return Err(OptionError::Unsupported {
            key: format!("sasl.mechanism={name}"),
        });
    };
    let get = |k: &str| {
        s.get(k)
            .map(|v| v.to_string())
            .ok_or_else(|| invalid(k, "", format!("required with sasl.mechanism={name}")))
    };
    Ok(Some(Credentials {
        mechanism,
        username: get("sasl.username")?,
        password: get("sasl.password")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> Result<Options, OptionError> {
        let map = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Options::from_config(
            "a:9092, b:9093",
            "bpftail-n".into(),
            Compression::None,
            4 << 20,
            &map,
        )
    }

    #[test]
    fn librdkafka_keys_set_the_native_client() {
        let o = opts(&[
            ("acks", "1"),
            ("linger.ms", "5"),
            ("batch.size", "65536"),
            ("request.timeout.ms", "2000"),
            ("client.id", "x"),
        ])
        .unwrap();
        assert_eq!(o.bootstrap, vec!["a:9092", "b:9093"]);
        assert_eq!(o.acks, Acks::Leader);
        assert_eq!(o.linger, Duration::from_millis(5));
        assert_eq!(o.batch_size, 65536);
        assert_eq!(o.request_timeout, Duration::from_secs(2));
        assert_eq!(o.client_id, "x");
        // The default batch is librdkafka's, capped by a quarter of the budget.
        assert_eq!(opts(&[]).unwrap().batch_size, 1_000_000);
        let small = Options::from_config(
            "a:1",
            String::new(),
            Compression::None,
            1 << 20,
            &BTreeMap::new(),
        );
        assert_eq!(small.unwrap().batch_size, 1 << 18);
        assert_eq!(opts(&[]).unwrap().acks, Acks::All);
    }

    #[test]
    fn an_unsupported_key_names_itself_and_the_way_out() {
        let e = opts(&[("sasl.kerberos.service.name", "kafka")]).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("sasl.kerberos.service.name"), "{text}");
        assert!(text.contains("--kafka-client rdkafka"), "{text}");
        assert!(opts(&[("acks", "0")]).is_err());
        assert!(opts(&[("linger.ms", "soon")]).is_err());
    }
}
