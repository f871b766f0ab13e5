//! One broker connection, on its own thread: requests in, typed responses
//! (or a typed failure) out, one request at a time.
//!
//! - Framing: a 4-byte length, then the header and body; the whole request
//!   is encoded into one buffer and written with one `write_all`; a
//!   response is decoded only once its frame is complete. Frames larger
//!   than [`MAX_FRAME`] are refused as garbage.
//! - Every wait has a deadline: connecting (`socket.connection.setup.
//!   timeout.ms`) and each request (`request.timeout.ms`). A failure drops
//!   the connection; the next request reconnects. Backoff between attempts
//!   is the engine's decision, not this thread's.
//! - API versions are negotiated once per connection (ApiVersions v3, or v0
//!   for brokers that do not know v3): Produce 3..=9 and Metadata 1..=9.
//! - Idle, the thread blocks on its queue: no timers, no wakeups.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
    ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use super::options::Options;

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
    Produce(ProduceRequest),
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
        }
    }

    /// True if the request may have reached the broker.
    pub fn after_connect(&self) -> bool {
        !matches!(
            self,
            ConnError::Resolve { .. } | ConnError::Connect { .. } | ConnError::Unsupported { .. }
        )
    }
}

/// What the connection thread reports to the engine.
#[derive(Debug)]
pub struct Reply {
    pub conn: ConnId,
    pub result: Result<Response, ConnError>,
}

/// The engine's end of a connection.
#[derive(Debug)]
pub struct ConnHandle {
    pub addr: String,
    tx: Sender<Request>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnHandle {
    /// Starts the thread; replies go to `replies` wrapped by `wrap`.
    pub fn spawn<T: Send + 'static>(
        id: ConnId,
        addr: String,
        opts: Arc<Options>,
        replies: Sender<T>,
        wrap: fn(Reply) -> T,
    ) -> std::io::Result<ConnHandle> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let a = addr.clone();
        let thread = std::thread::Builder::new()
            .name("bpftail-kafka".into())
            .spawn(move || serve(id, &a, &opts, &rx, &replies, wrap))?;
        Ok(ConnHandle {
            addr,
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

struct Versions {
    produce: i16,
    metadata: i16,
}

struct Connection {
    stream: TcpStream,
    versions: Versions,
    correlation: i32,
    /// Reused for every request and response.
    out: BytesMut,
}

fn serve<T>(
    id: ConnId,
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
        if replies.send(wrap(Reply { conn: id, result })).is_err() {
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
        let mut c = Connection {
            stream,
            versions: Versions {
                produce: 0,
                metadata: 0,
            },
            correlation: 0,
            out: BytesMut::with_capacity(64 * 1024),
        };
        c.versions = c.negotiate(addr, opts)?;
        Ok(c)
    }

    fn negotiate(&mut self, addr: &str, opts: &Options) -> Result<Versions, ConnError> {
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("bpftail"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let mut resp: ApiVersionsResponse = self.call(addr, opts, ApiKey::ApiVersions, 3, &req)?;
        if resp.error_code == 35 {
            // UNSUPPORTED_VERSION: an older broker; v0 is understood by all.
            resp = self.call(
                addr,
                opts,
                ApiKey::ApiVersions,
                0,
                &ApiVersionsRequest::default(),
            )?;
        }
        if resp.error_code != 0 {
            return Err(ConnError::Protocol {
                addr: addr.to_owned(),
                why: format!("ApiVersions error {}", resp.error_code),
            });
        }
        let pick = |key: ApiKey, min: i16, max: i16| {
            resp.api_keys
                .iter()
                .find(|k| k.api_key == key as i16)
                .map(|k| k.max_version.min(max))
                .filter(|&v| v >= min)
                .ok_or_else(|| ConnError::Unsupported {
                    addr: addr.to_owned(),
                    what: format!("{key:?} v{min}..v{max}"),
                })
        };
        Ok(Versions {
            produce: pick(ApiKey::Produce, 3, PRODUCE_MAX)?,
            metadata: pick(ApiKey::Metadata, 1, METADATA_MAX)?,
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
                self.call(addr, opts, ApiKey::Produce, v, &r)
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
        let io = |source: std::io::Error| {
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
        };
        self.stream
            .set_write_timeout(Some(opts.request_timeout))
            .map_err(io)?;
        self.stream.write_all(out).map_err(io)?;
        let mut len = [0u8; 4];
        read_exact_by(&mut self.stream, &mut len, deadline).map_err(io)?;
        let len = i32::from_be_bytes(len);
        if len < 4 || len as usize > MAX_FRAME {
            return Err(protocol(format!("frame length {len}")));
        }
        self.out.clear();
        self.out.resize(len as usize, 0);
        read_exact_by(&mut self.stream, &mut self.out, deadline).map_err(io)?;
        let mut body: Bytes = self.out.split().freeze();
        let header = ResponseHeader::decode(&mut body, key.response_header_version(version))
            .map_err(|e| protocol(format!("{key:?} response header: {e}")))?;
        if header.correlation_id != self.correlation {
            return Err(protocol(format!(
                "correlation id {} for request {}",
                header.correlation_id, self.correlation
            )));
        }
        let resp = P::decode(&mut body, version)
            .map_err(|e| protocol(format!("{key:?} v{version}: {e}")))?;
        // Bytes after the response are ignored, as librdkafka does (its own
        // mock cluster sends one after Metadata v9).
        Ok(resp)
    }
}

/// `read_exact` that gives up at `deadline`.
fn read_exact_by(s: &mut TcpStream, mut buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
