//! Kafka security for the tests: a CA and certificates made with the
//! `openssl` CLI, Debian's `stunnel4` as a real TLS endpoint in front of
//! the broker, and a SASL gate in front of it (tansu cannot authenticate).
//!
//! The SASL gate is this test suite's own server side of Kafka's SASL
//! (SaslHandshake v0–1, SaslAuthenticate v0–1, framed by hand; PLAIN and
//! SCRAM-SHA-256/512 written from RFC 5802 here, independently of the
//! agent's client and of the protocol crate it uses). Tests check it
//! against librdkafka as a client before trusting it to judge the agent.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use openssl::hash::MessageDigest;

/// A test CA, a server certificate for `localhost`, a client certificate,
/// and a second CA that signed neither.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl (Debian's package, installed by cargo xtask test)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-subj",
                &format!("/CN=bpftail test {ca}"),
            ]);
        }
        std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost\n").unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, cn) in [("server", "localhost"), ("client", "bpftail-agent")] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.crt"),
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        Pki {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }
}

/// stunnel terminating TLS on `port` and relaying to `upstream`; with
/// `require_client_cert`, only clients with a certificate of the test CA
/// get through.
pub struct Stunnel {
    child: Child,
    pub log: PathBuf,
}

impl Stunnel {
    pub fn start(pki: &Pki, port: u16, upstream: u16, require_client_cert: bool) -> Stunnel {
        let conf = pki.dir.join(format!("stunnel-{port}.conf"));
        let log = pki.dir.join(format!("stunnel-{port}.log"));
        let mut text = format!(
            "foreground = yes\npid =\ndebug = 5\noutput = {}\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{upstream}\ncert = {}\nkey = {}\n",
            log.display(),
            pki.path("server.crt"),
            pki.path("server.key"),
        );
        if require_client_cert {
            text.push_str(&format!(
                "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                pki.path("ca.crt")
            ));
        }
        std::fs::write(&conf, text).unwrap();
        let child = super::die_with_parent(&mut Command::new("stunnel4"))
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stunnel4 (Debian's package, installed by cargo xtask test)");
        super::wait_for_port(port, Duration::from_secs(20));
        Stunnel { child, log }
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mechanisms the gate offers.
const MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// A SASL gate on `port` in front of the broker at `upstream`: a client
/// that authenticates as `user`/`password` is relayed; any other request
/// before that closes the connection, as Kafka does.
pub struct SaslGate {
    pub port: u16,
}

impl SaslGate {
    pub fn start(port: u16, upstream: u16, user: &str, password: &str) -> SaslGate {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let (user, password) = (user.to_owned(), password.to_owned());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (u, p) = (user.clone(), password.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, upstream, &u, &p);
                });
            }
        });
        SaslGate { port }
    }
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; i32::from_be_bytes(len).max(0) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

fn write_frame(s: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as i32).to_be_bytes());
    out.extend_from_slice(body);
    s.write_all(&out)
}

/// A response frame: header v0 (the correlation id), then `body`.
fn respond(s: &mut TcpStream, correlation: i32, body: &[u8]) -> std::io::Result<()> {
    let mut out = correlation.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    write_frame(s, &out)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as i16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn get_i16(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn get_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn uvarint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..35).step_by(7) {
        let x = *b.get(*at)?;
        *at += 1;
        v |= u64::from(x & 0x7f) << shift;
        if x & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The broker's ApiVersions response body (after the header) with
/// SaslHandshake 0..=1 and SaslAuthenticate 0..=1 added.
fn add_sasl_versions(body: &[u8], version: i16) -> Option<Vec<u8>> {
    let flexible = version >= 3;
    let mut at = 2; // error_code
    let (count, entry) = if flexible {
        (uvarint(body, &mut at)?.checked_sub(1)? as usize, 7)
    } else {
        let n = get_i32(body, at)? as usize;
        at += 4;
        (n, 6)
    };
    let mut entries: Vec<&[u8]> = Vec::new();
    for i in 0..count {
        let e = body.get(at + i * entry..at + (i + 1) * entry)?;
        let key = get_i16(e, 0)?;
        if key != 17 && key != 36 {
            entries.push(e);
        }
    }
    let rest = body.get(at + count * entry..)?;
    let mut added: Vec<Vec<u8>> = Vec::new();
    for key in [17i16, 36] {
        let mut e = Vec::new();
        e.extend_from_slice(&key.to_be_bytes());
        e.extend_from_slice(&0i16.to_be_bytes());
        e.extend_from_slice(&1i16.to_be_bytes());
        if flexible {
            e.push(0);
        }
        added.push(e);
    }
    let mut out = body[..2].to_vec();
    let n = entries.len() + added.len();
    if flexible {
        out.push((n + 1) as u8); // fewer than 127 APIs
    } else {
        out.extend_from_slice(&(n as i32).to_be_bytes());
    }
    for e in entries {
        out.extend_from_slice(e);
    }
    for e in &added {
        out.extend_from_slice(e);
    }
    out.extend_from_slice(rest);
    Some(out)
}

fn serve(mut client: TcpStream, upstream: u16, user: &str, password: &str) -> std::io::Result<()> {
    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut mechanism = String::new();
    let mut scram: Option<ServerScram> = None;
    loop {
        let frame = read_frame(&mut client)?;
        let (Some(key), Some(v), Some(c), Some(id_len)) = (
            get_i16(&frame, 0),
            get_i16(&frame, 2),
            get_i32(&frame, 4),
            get_i16(&frame, 8),
        ) else {
            return Ok(());
        };
        // Header v1 (these versions are not flexible): key, version,
        // correlation id, client id.
        let body = &frame[(10 + id_len.max(0) as usize).min(frame.len())..];
        match key {
            18 => {
                // ApiVersions: the broker's answer, plus the SASL APIs.
                write_frame(&mut server, &frame)?;
                let resp = read_frame(&mut server)?;
                let Some(patched) = add_sasl_versions(&resp[4..], v) else {
                    return Ok(());
                };
                respond(&mut client, c, &patched)?;
            }
            17 => {
                // SaslHandshake v0-1: mechanism (string).
                let len = get_i16(body, 0).unwrap_or(0).max(0) as usize;
                mechanism = String::from_utf8_lossy(body.get(2..2 + len).unwrap_or(&[])).into();
                let known = MECHANISMS.contains(&mechanism.as_str());
                let mut out = Vec::new();
                out.extend_from_slice(&(if known { 0i16 } else { 33 }).to_be_bytes());
                out.extend_from_slice(&(MECHANISMS.len() as i32).to_be_bytes());
                for m in MECHANISMS {
                    put_str(&mut out, m);
                }
                respond(&mut client, c, &out)?;
            }
            36 => {
                // SaslAuthenticate v0-1: auth_bytes (bytes).
                let len = get_i32(body, 0).unwrap_or(0).max(0) as usize;
                let auth = body.get(4..4 + len).unwrap_or(&[]);
                let step = if mechanism == "PLAIN" {
                    let ok = auth == format!("\0{user}\0{password}").as_bytes();
                    ok.then(|| (Vec::new(), true))
                } else {
                    let digest = if mechanism == "SCRAM-SHA-512" {
                        MessageDigest::sha512()
                    } else {
                        MessageDigest::sha256()
                    };
                    match scram.take() {
                        None => {
                            let (s, first) = ServerScram::first(digest, user, password, auth);
                            scram = s;
                            first.map(|f| (f, false))
                        }
                        Some(s) => s.last(auth).map(|f| (f, true)),
                    }
                };
                let mut out = Vec::new();
                let done = match &step {
                    None => {
                        out.extend_from_slice(&58i16.to_be_bytes());
                        put_str(
                            &mut out,
                            "Authentication failed: Invalid username or password",
                        );
                        out.extend_from_slice(&0i32.to_be_bytes());
                        None
                    }
                    Some((bytes, done)) => {
                        out.extend_from_slice(&0i16.to_be_bytes());
                        out.extend_from_slice(&(-1i16).to_be_bytes());
                        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                        out.extend_from_slice(bytes);
                        Some(*done)
                    }
                };
                if v >= 1 {
                    out.extend_from_slice(&0i64.to_be_bytes()); // session lifetime
                }
                respond(&mut client, c, &out)?;
                match done {
                    None => return Ok(()),
                    Some(true) => break,
                    Some(false) => {}
                }
            }
            // Anything else before authentication: Kafka closes.
            _ => return Ok(()),
        }
    }
    let (mut c2, mut s2) = (client.try_clone()?, server.try_clone()?);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut s2, &mut c2);
        let _ = c2.shutdown(Shutdown::Both);
    });
    let _ = std::io::copy(&mut client, &mut server);
    let _ = server.shutdown(Shutdown::Both);
    Ok(())
}

/// The server's side of one SCRAM exchange (RFC 5802 §3).
struct ServerScram {
    digest: MessageDigest,
    salted: Vec<u8>,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

fn hmac(digest: MessageDigest, key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = openssl::pkey::PKey::hmac(key).unwrap();
    let mut s = openssl::sign::Signer::new(digest, &key).unwrap();
    s.update(data).unwrap();
    s.sign_to_vec().unwrap()
}

impl ServerScram {
    fn first(
        digest: MessageDigest,
        user: &str,
        password: &str,
        client_first: &[u8],
    ) -> (Option<ServerScram>, Option<Vec<u8>>) {
        let cf = String::from_utf8_lossy(client_first).into_owned();
        let Some(bare) = cf.strip_prefix("n,,") else {
            return (None, None);
        };
        let mut name = None;
        let mut cnonce = None;
        for a in bare.split(',') {
            if let Some(n) = a.strip_prefix("n=") {
                name = Some(n.replace("=2C", ",").replace("=3D", "="));
            }
            if let Some(r) = a.strip_prefix("r=") {
                cnonce = Some(r.to_owned());
            }
        }
        let (Some(name), Some(cnonce)) = (name, cnonce) else {
            return (None, None);
        };
        if name != user {
            return (None, None);
        }
        let salt = b"bpftail-test-salt";
        let iterations = 4096;
        let mut salted = vec![0u8; digest.size()];
        openssl::pkcs5::pbkdf2_hmac(password.as_bytes(), salt, iterations, digest, &mut salted)
            .unwrap();
        let nonce = format!("{cnonce}srv0123456789");
        let server_first = format!(
            "r={nonce},s={},i={iterations}",
            openssl::base64::encode_block(salt)
        );
        let first = server_first.clone().into_bytes();
        (
            Some(ServerScram {
                digest,
                salted,
                client_first_bare: bare.to_owned(),
                server_first,
                nonce,
            }),
            Some(first),
        )
    }

    /// Checks the client's proof; the server's signature if it holds.
    fn last(self, client_final: &[u8]) -> Option<Vec<u8>> {
        let cf = std::str::from_utf8(client_final).ok()?;
        let (without_proof, proof) = cf.rsplit_once(",p=")?;
        if without_proof != format!("c=biws,r={}", self.nonce) {
            return None;
        }
        let proof = openssl::base64::decode_block(proof).ok()?;
        let auth = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let client_key = hmac(self.digest, &self.salted, b"Client Key");
        let stored = openssl::hash::hash(self.digest, &client_key).ok()?;
        let signature = hmac(self.digest, &stored, auth.as_bytes());
        if proof.len() != signature.len() {
            return None;
        }
        let recovered: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        if openssl::hash::hash(self.digest, &recovered).ok()?[..] != stored[..] {
            return None;
        }
        let server_key = hmac(self.digest, &self.salted, b"Server Key");
        let v = hmac(self.digest, &server_key, auth.as_bytes());
        Some(format!("v={}", openssl::base64::encode_block(&v)).into_bytes())
    }
}
