//! One broker connection, on its own thread: requests in, typed responses
//! (or a typed failure) out, one request at a time.
//!
//! - Framing: a 4-byte length, then the header and body; a response is
//!   decoded only once its frame is complete. Frames larger than
//!   [`MAX_FRAME`] are refused as garbage.
//! - Produce requests are framed by hand ([`encode_produce`]) around the
//!   sealed batches and written with vectored writes: the batches are never
//!   copied into a request buffer. Every other request is encoded with the
//!   `kafka-protocol` crate's types.
//! - TLS (OpenSSL) and SASL (PLAIN, SCRAM-SHA-256/512, [`super::sasl`])
//!   are set up when the connection opens; a refused handshake or wrong
//!   credentials are typed errors saying what to check.
//! - Every wait has a deadline: connecting (`socket.connection.setup.
//!   timeout.ms`) and each request (`request.timeout.ms`). A failure drops
//!   the connection; the next request reconnects. Backoff between attempts
//!   is the engine's decision, not this thread's.
//! - API versions are negotiated once per connection (ApiVersions v3, or v0
//!   for brokers that do not know v3): Produce 3..=9 and Metadata 1..=9,
//!   SaslHandshake v1 and SaslAuthenticate 0..=1 when SASL is on.
//! - Idle, the thread blocks on its queue: no timers, no wakeups.

use std::io::{IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
    ProduceResponse, RequestHeader, ResponseHeader, SaslAuthenticateRequest,
    SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use openssl::ssl::SslStream;

use super::options::Options;
use super::sasl::{self, Mechanism, Scram};

/// Largest response frame accepted (a metadata response of a very large
/// cluster stays well below).
pub const MAX_FRAME: usize = 64 << 20;

/// Highest versions this client speaks.
const PRODUCE_MAX: i16 = 9;
const METADATA_MAX: i16 = 9;

pub type ConnId = u32;

#[derive(Debug)]
pub enum Request {
    Metadata(MetadataRequest),
    Produce(Produce),
}

/// A sealed batch's bytes, shared between the sender's queue and the
/// request on the wire; the sender takes the buffer back when the batch is
/// done, for the data thread to reuse.
pub type BatchData = Arc<Vec<u8>>;

/// One topic's part of a produce request: per partition, one sealed batch.
pub type TopicBatches = (Arc<str>, Vec<(i32, BatchData)>);

/// A produce request.
#[derive(Debug)]
pub struct Produce {
    pub acks: i16,
    pub timeout_ms: i32,
    pub topics: Vec<TopicBatches>,
}

#[derive(Debug)]
pub enum Response {
    Metadata(MetadataResponse),
    Produce(ProduceResponse),
}

/// Why a request got no response. Each is retried by the engine.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {addr} failed: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("{addr} sent an invalid response: {why}")]
    Protocol { addr: String, why: String },
    #[error("{addr} does not support {what}")]
    Unsupported { addr: String, what: String },
    #[error("TLS with {addr} failed: {why}")]
    Tls { addr: String, why: String },
    #[error("SASL authentication with {addr} failed: {why}")]
    Auth { addr: String, why: String },
}

impl ConnError {
    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnError::Resolve { .. } => "resolve",
            ConnError::Connect { .. } => "connect",
            ConnError::Io { .. } => "io",
            ConnError::Timeout { .. } => "timeout",
            ConnError::Protocol { .. } => "protocol",
            ConnError::Unsupported { .. } => "unsupported",
            ConnError::Tls { .. } => "tls",
            ConnError::Auth { .. } => "auth",
        }
    }

    /// True if the request may have reached the broker.
    pub fn after_connect(&self) -> bool {
        !matches!(
            self,
            ConnError::Resolve { .. }
                | ConnError::Connect { .. }
                | ConnError::Unsupported { .. }
                | ConnError::Tls { .. }
                | ConnError::Auth { .. }
        )
    }
}

/// What the connection thread reports to the engine.
#[derive(Debug)]
pub struct Reply {
    pub conn: ConnId,
    /// Which connection with that id (a replaced one may still answer).
    pub serial: u64,
    pub result: Result<Response, ConnError>,
}

/// The engine's end of a connection.
#[derive(Debug)]
pub struct ConnHandle {
    pub addr: String,
    /// Unique per connection thread; its replies carry it.
    pub serial: u64,
    tx: Sender<Request>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnHandle {
    /// Starts the thread; replies go to `replies` wrapped by `wrap`.
    pub fn spawn<T: Send + 'static>(
        id: ConnId,
        serial: u64,
        addr: String,
        opts: Arc<Options>,
        replies: Sender<T>,
        wrap: fn(Reply) -> T,
    ) -> std::io::Result<ConnHandle> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let a = addr.clone();
        let thread = std::thread::Builder::new()
            .name("bpftail-kafka".into())
            .spawn(move || serve((id, serial), &a, &opts, &rx, &replies, wrap))?;
        Ok(ConnHandle {
            addr,
            serial,
            tx,
            thread: Some(thread),
        })
    }

    /// Queues a request; false if the thread is gone.
    pub fn send(&self, req: Request) -> bool {
        self.tx.send(req).is_ok()
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        // Closing the queue ends the thread after its current request; it
        // is not joined (a hung broker may hold it until its timeout).
        let (tx, _) = crossbeam_channel::unbounded();
        drop(std::mem::replace(&mut self.tx, tx));
        drop(self.thread.take());
    }
}

/// The API versions used on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    pub produce: i16,
    pub metadata: i16,
    pub sasl_authenticate: i16,
}

/// Why a broker's ApiVersions answer does not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unnegotiable {
    /// The answer's error code.
    Error(i16),
    /// An API this client needs, in no version it speaks.
    Unsupported(String),
}

/// The versions to use with a broker, from its ApiVersions answer: the
/// highest each side speaks of Produce 3..=9 and Metadata 1..=9, and of
/// SaslHandshake v1 and SaslAuthenticate 0..=1 when `sasl` is on.
pub fn negotiated(resp: &ApiVersionsResponse, sasl: bool) -> Result<Versions, Unnegotiable> {
    if resp.error_code != 0 {
        return Err(Unnegotiable::Error(resp.error_code));
    }
    let pick = |key: ApiKey, min: i16, max: i16| {
        resp.api_keys
            .iter()
            .find(|k| k.api_key == key as i16)
            .map(|k| k.max_version.min(max))
            .filter(|&v| v >= min)
            .ok_or_else(|| Unnegotiable::Unsupported(format!("{key:?} v{min}..v{max}")))
    };
    let sasl_authenticate = if sasl {
        pick(ApiKey::SaslHandshake, 1, 1)?;
        pick(ApiKey::SaslAuthenticate, 0, 1)?
    } else {
        0
    };
    Ok(Versions {
        produce: pick(ApiKey::Produce, 3, PRODUCE_MAX)?,
        metadata: pick(ApiKey::Metadata, 1, METADATA_MAX)?,
        sasl_authenticate,
    })
}

/// The length of a response frame from its 4-byte prefix, or why it is
/// refused (shorter than a header, or over [`MAX_FRAME`]).
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, String> {
    let len = i32::from_be_bytes(prefix);
    if len < 4 || len as usize > MAX_FRAME {
        return Err(format!("frame length {len}"));
    }
    Ok(len as usize)
}

/// Decodes a response frame (what follows its length): the header, which
/// must answer request `correlation`, then the response to `key` at
/// `version`; or why not. Bytes after the response are ignored, as
/// librdkafka does (its own mock cluster sends one after Metadata v9).
pub fn decode_response<P: Decodable>(
    mut frame: Bytes,
    key: ApiKey,
    version: i16,
    correlation: i32,
) -> Result<P, String> {
    let header = ResponseHeader::decode(&mut frame, key.response_header_version(version))
        .map_err(|e| format!("{key:?} response header: {e}"))?;
    if header.correlation_id != correlation {
        return Err(format!(
            "correlation id {} for request {correlation}",
            header.correlation_id
        ));
    }
    P::decode(&mut frame, version).map_err(|e| format!("{key:?} v{version}: {e}"))
}

/// Plain TCP or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<SslStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }

    /// Writes all of `parts`, in order.
    fn write_parts(&mut self, parts: &mut [IoSlice<'_>]) -> std::io::Result<()> {
        match self {
            // One writev per pass; the kernel takes what it can.
            Stream::Plain(s) => {
                let mut parts = &mut parts[..];
                while !parts.is_empty() {
                    match s.write_vectored(parts) {
                        Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                        Ok(n) => IoSlice::advance_slices(&mut parts, n),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            // TLS records are written one part at a time.
            Stream::Tls(s) => {
                for p in parts.iter() {
                    s.write_all(p)?;
                }
                Ok(())
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

struct Connection {
    stream: Stream,
    versions: Versions,
    correlation: i32,
    /// Reused for every request and response.
    out: BytesMut,
}

fn serve<T>(
    (id, serial): (ConnId, u64),
    addr: &str,
    opts: &Options,
    rx: &Receiver<Request>,
    replies: &Sender<T>,
    wrap: fn(Reply) -> T,
) {
    let mut conn: Option<Connection> = None;
    while let Ok(req) = rx.recv() {
        let result = match conn.as_mut() {
            Some(c) => c.roundtrip(addr, opts, req),
            None => match Connection::open(addr, opts) {
                Ok(c) => conn.insert(c).roundtrip(addr, opts, req),
                Err(e) => Err(e),
            },
        };
        if result.is_err() {
            conn = None;
        }
        let reply = Reply {
            conn: id,
            serial,
            result,
        };
        if replies.send(wrap(reply)).is_err() {
            return;
        }
    }
}

impl Connection {
    fn open(addr: &str, opts: &Options) -> Result<Connection, ConnError> {
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|source| ConnError::Resolve {
                addr: addr.to_owned(),
                source,
            })?
            .collect();
        let mut last = None;
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, opts.connect_timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| ConnError::Connect {
            addr: addr.to_owned(),
            source: last.unwrap_or_else(|| std::io::Error::other("no address")),
        })?;
        let _ = stream.set_nodelay(true);
        let stream = match &opts.tls {
            None => Stream::Plain(stream),
            Some(tls) => {
                let tls_err = |why: String| ConnError::Tls {
                    addr: addr.to_owned(),
                    why,
                };
                let host = host_of(addr);
                let _ = stream.set_read_timeout(Some(opts.connect_timeout));
                let _ = stream.set_write_timeout(Some(opts.connect_timeout));
                let cfg = tls
                    .connector
                    .configure()
                    .map_err(|e| tls_err(e.to_string()))?
                    .verify_hostname(tls.verify_hostname);
                let s = cfg.connect(host, stream).map_err(|e| {
                    use openssl::ssl::HandshakeError as H;
                    let (mut why, verify) = match &e {
                        H::Failure(m) | H::WouldBlock(m) => {
                            (m.error().to_string(), Some(m.ssl().verify_result()))
                        }
                        H::SetupFailure(st) => (st.to_string(), None),
                    };
                    if let Some(v) = verify.filter(|v| *v != openssl::x509::X509VerifyResult::OK) {
                        why = format!(
                            "{why}: the broker's certificate is not trusted ({}); check ssl.ca.location, and that the broker's name {host:?} is in its certificate (or ssl.endpoint.identification.algorithm=none)",
                            v.error_string()
                        );
                    }
                    tls_err(why)
                })?;
                Stream::Tls(Box::new(s))
            }
        };
        let mut c = Connection {
            stream,
            versions: Versions {
                produce: 0,
                metadata: 0,
                sasl_authenticate: 0,
            },
            correlation: 0,
            out: BytesMut::with_capacity(64 * 1024),
        };
        c.versions = c.negotiate(addr, opts)?;
        if let Some(creds) = &opts.sasl {
            c.authenticate(addr, opts, creds)?;
        }
        Ok(c)
    }

    /// SaslHandshake v1, then the mechanism's exchange in SaslAuthenticate
    /// requests.
    fn authenticate(
        &mut self,
        addr: &str,
        opts: &Options,
        creds: &sasl::Credentials,
    ) -> Result<(), ConnError> {
        let auth = |why: String| ConnError::Auth {
            addr: addr.to_owned(),
            why,
        };
        let hs: SaslHandshakeResponse = self.call(
            addr,
            opts,
            ApiKey::SaslHandshake,
            1,
            &SaslHandshakeRequest::default()
                .with_mechanism(StrBytes::from_static_str(creds.mechanism.name())),
        )?;
        if hs.error_code != 0 {
            let offered: Vec<&str> = hs.mechanisms.iter().map(|m| m.as_str()).collect();
            return Err(auth(format!(
                "the broker does not offer {} (it offers {offered:?}); check sasl.mechanism",
                creds.mechanism.name()
            )));
        }
        let v = self.versions.sasl_authenticate;
        let step = |c: &mut Connection, bytes: Vec<u8>| -> Result<Bytes, ConnError> {
            let r: SaslAuthenticateResponse = c.call(
                addr,
                opts,
                ApiKey::SaslAuthenticate,
                v,
                &SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(bytes)),
            )?;
            if r.error_code != 0 {
                let msg = r.error_message.as_ref().map_or("", |m| m.as_str());
                return Err(auth(format!(
                    "the broker refused user {:?} ({msg}); check sasl.username and sasl.password",
                    creds.username
                )));
            }
            Ok(r.auth_bytes)
        };
        match creds.mechanism {
            Mechanism::Plain => {
                step(self, sasl::plain(creds))?;
            }
            Mechanism::ScramSha256 | Mechanism::ScramSha512 => {
                let scram_err = |e: sasl::SaslError| auth(e.to_string());
                let mut scram = Scram::new(creds).map_err(scram_err)?;
                let server_first = step(self, scram.client_first())?;
                let client_final = scram.client_final(&server_first).map_err(scram_err)?;
                let server_final = step(self, client_final)?;
                scram
                    .verify_server_final(&server_final)
                    .map_err(scram_err)?;
            }
        }
        Ok(())
    }

    fn negotiate(&mut self, addr: &str, opts: &Options) -> Result<Versions, ConnError> {
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("bpftail"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        // A broker that does not know v3 answers UNSUPPORTED_VERSION in a
        // v0 body, which does not decode as v3: either way, ask again in v0
        // (the frame was read whole, so the connection is still in step).
        let resp =
            match self.call::<_, ApiVersionsResponse>(addr, opts, ApiKey::ApiVersions, 3, &req) {
                Ok(r) if r.error_code != 35 => r,
                Ok(_) | Err(ConnError::Protocol { .. }) => self.call(
                    addr,
                    opts,
                    ApiKey::ApiVersions,
                    0,
                    &ApiVersionsRequest::default(),
                )?,
                Err(e) => return Err(e),
            };
        negotiated(&resp, opts.sasl.is_some()).map_err(|e| match e {
            Unnegotiable::Error(code) => ConnError::Protocol {
                addr: addr.to_owned(),
                why: format!("ApiVersions error {code}"),
            },
            Unnegotiable::Unsupported(what) => ConnError::Unsupported {
                addr: addr.to_owned(),
                what,
            },
        })
    }

    fn roundtrip(
        &mut self,
        addr: &str,
        opts: &Options,
        req: Request,
    ) -> Result<Response, ConnError> {
        match req {
            Request::Metadata(r) => {
                let v = self.versions.metadata;
                self.call(addr, opts, ApiKey::Metadata, v, &r)
                    .map(Response::Metadata)
            }
            Request::Produce(r) => {
                let v = self.versions.produce;
                self.correlation = self.correlation.wrapping_add(1);
                let mut splices = Vec::with_capacity(8);
                encode_produce(
                    &mut self.out,
                    v,
                    self.correlation,
                    &opts.client_id,
                    &r,
                    &mut splices,
                );
                let mut parts = Vec::with_capacity(splices.len() * 2 + 1);
                let mut at = 0;
                for (pos, batch) in &splices {
                    parts.push(IoSlice::new(&self.out[at..*pos]));
                    parts.push(IoSlice::new(batch));
                    at = *pos;
                }
                parts.push(IoSlice::new(&self.out[at..]));
                let deadline = Instant::now() + opts.request_timeout;
                let stream = &mut self.stream;
                let sent = stream
                    .tcp()
                    .set_write_timeout(Some(opts.request_timeout))
                    .and_then(|()| stream.write_parts(&mut parts));
                drop(parts);
                sent.map_err(|e| io_error(addr, opts, e))?;
                self.read_response(addr, opts, ApiKey::Produce, v, deadline)
                    .map(Response::Produce)
            }
        }
    }

    /// Sends one request and waits for its response.
    fn call<Q, P>(
        &mut self,
        addr: &str,
        opts: &Options,
        key: ApiKey,
        version: i16,
        req: &Q,
    ) -> Result<P, ConnError>
    where
        Q: Encodable + HeaderVersion,
        P: Decodable,
    {
        let protocol = |why: String| ConnError::Protocol {
            addr: addr.to_owned(),
            why,
        };
        self.correlation = self.correlation.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_string(opts.client_id.clone())));
        let out = &mut self.out;
        out.clear();
        out.put_i32(0);
        header
            .encode(out, Q::header_version(version))
            .and_then(|()| req.encode(out, version))
            .map_err(|e| protocol(format!("cannot encode {key:?}: {e}")))?;
        let len = (out.len() - 4) as i32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        let deadline = Instant::now() + opts.request_timeout;
        let stream = &mut self.stream;
        stream
            .tcp()
            .set_write_timeout(Some(opts.request_timeout))
            .and_then(|()| stream.write_parts(&mut [IoSlice::new(out)]))
            .map_err(|e| io_error(addr, opts, e))?;
        self.read_response(addr, opts, key, version, deadline)
    }

    /// Reads and decodes the response to the request just sent.
    fn read_response<P: Decodable>(
        &mut self,
        addr: &str,
        opts: &Options,
        key: ApiKey,
        version: i16,
        deadline: Instant,
    ) -> Result<P, ConnError> {
        let protocol = |why: String| ConnError::Protocol {
            addr: addr.to_owned(),
            why,
        };
        let io = |e| io_error(addr, opts, e);
        let mut len = [0u8; 4];
        read_exact_by(&mut self.stream, &mut len, deadline).map_err(io)?;
        let len = frame_len(len).map_err(protocol)?;
        self.out.clear();
        self.out.resize(len, 0);
        read_exact_by(&mut self.stream, &mut self.out, deadline).map_err(io)?;
        let body: Bytes = self.out.split().freeze();
        decode_response(body, key, version, self.correlation).map_err(protocol)
    }
}

fn io_error(addr: &str, opts: &Options, source: std::io::Error) -> ConnError {
    if matches!(
        source.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) {
        ConnError::Timeout {
            addr: addr.to_owned(),
            timeout: opts.request_timeout,
        }
    } else {
        ConnError::Io {
            addr: addr.to_owned(),
            source,
        }
    }
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn put_str(out: &mut BytesMut, s: &str, flexible: bool) {
    if flexible {
        put_uvarint(out, s.len() as u64 + 1);
    } else {
        out.put_i16(s.len() as i16);
    }
    out.put_slice(s.as_bytes());
}

fn put_uvarint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// Frames a Produce request (v3..=9) into `out`, leaving out the record
/// batches: `splices` gets, per batch, the position in `out` where its bytes
/// go. The frame's length counts them.
///
/// Hand-written (the generated `ProduceRequest` would copy every batch into
/// the request buffer); v9 is the first flexible version (compact lengths,
/// tagged fields).
pub fn encode_produce(
    out: &mut BytesMut,
    version: i16,
    correlation: i32,
    client_id: &str,
    req: &Produce,
    splices: &mut Vec<(usize, BatchData)>,
) {
    let flexible = version >= 9;
    out.clear();
    splices.clear();
    out.put_i32(0);
    // Header v1 (v2 when flexible: + tagged fields).
    out.put_i16(ApiKey::Produce as i16);
    out.put_i16(version);
    out.put_i32(correlation);
    out.put_i16(client_id.len() as i16);
    out.put_slice(client_id.as_bytes());
    if flexible {
        put_uvarint(out, 0);
    }
    // transactional_id: null.
    if flexible {
        put_uvarint(out, 0);
    } else {
        out.put_i16(-1);
    }
    out.put_i16(req.acks);
    out.put_i32(req.timeout_ms);
    let count = |out: &mut BytesMut, n: usize| {
        if flexible {
            put_uvarint(out, n as u64 + 1);
        } else {
            out.put_i32(n as i32);
        }
    };
    count(out, req.topics.len());
    let mut batches = 0;
    for (topic, parts) in &req.topics {
        put_str(out, topic, flexible);
        count(out, parts.len());
        for (index, batch) in parts {
            out.put_i32(*index);
            if flexible {
                put_uvarint(out, batch.len() as u64 + 1);
            } else {
                out.put_i32(batch.len() as i32);
            }
            splices.push((out.len(), batch.clone()));
            batches += batch.len();
            if flexible {
                put_uvarint(out, 0);
            }
        }
        if flexible {
            put_uvarint(out, 0);
        }
    }
    if flexible {
        put_uvarint(out, 0);
    }
    let len = (out.len() - 4 + batches) as i32;
    out[..4].copy_from_slice(&len.to_be_bytes());
}

/// `read_exact` that gives up at `deadline`.
fn read_exact_by(s: &mut Stream, mut buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        s.tcp().set_read_timeout(Some(left))?;
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::ProduceRequest;
    use kafka_protocol::messages::TopicName;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};

    #[test]
    fn hand_framed_produce_is_byte_for_byte_the_generated_encoding() {
        let batches = [Arc::new(b"batch-one".to_vec()), Arc::new(vec![7u8; 300])];
        let req = Produce {
            acks: -1,
            timeout_ms: 30_000,
            topics: vec![
                (
                    "logs".into(),
                    vec![(0, batches[0].clone()), (3, batches[1].clone())],
                ),
                ("other".into(), vec![(1, batches[0].clone())]),
            ],
        };
        for version in 3..=9 {
            let mut out = BytesMut::new();
            let mut splices = Vec::new();
            encode_produce(&mut out, version, 42, "bpftail-n", &req, &mut splices);
            let mut ours = Vec::new();
            let mut at = 0;
            for (pos, b) in &splices {
                ours.extend_from_slice(&out[at..*pos]);
                ours.extend_from_slice(b);
                at = *pos;
            }
            ours.extend_from_slice(&out[at..]);

            let generated = ProduceRequest::default()
                .with_acks(-1)
                .with_timeout_ms(30_000)
                .with_topic_data(
                    req.topics
                        .iter()
                        .map(|(t, parts)| {
                            TopicProduceData::default()
                                .with_name(TopicName(StrBytes::from_string(t.to_string())))
                                .with_partition_data(
                                    parts
                                        .iter()
                                        .map(|(i, b)| {
                                            PartitionProduceData::default()
                                                .with_index(*i)
                                                .with_records(Some(Bytes::from(b.to_vec())))
                                        })
                                        .collect(),
                                )
                        })
                        .collect(),
                );
            let header = RequestHeader::default()
                .with_request_api_key(ApiKey::Produce as i16)
                .with_request_api_version(version)
                .with_correlation_id(42)
                .with_client_id(Some(StrBytes::from_static_str("bpftail-n")));
            let mut theirs = BytesMut::new();
            theirs.put_i32(0);
            header
                .encode(&mut theirs, ProduceRequest::header_version(version))
                .unwrap();
            generated.encode(&mut theirs, version).unwrap();
            let len = (theirs.len() - 4) as i32;
            theirs[..4].copy_from_slice(&len.to_be_bytes());
            assert_eq!(ours, &theirs[..], "v{version}");
        }
    }

    #[test]
    fn the_host_of_an_address_is_what_tls_checks() {
        assert_eq!(host_of("broker-1.kafka:9093"), "broker-1.kafka");
        assert_eq!(host_of("[::1]:9093"), "::1");
        assert_eq!(host_of("10.0.0.1:9092"), "10.0.0.1");
    }
}
