//! SASL client mechanisms: PLAIN (RFC 4616) and SCRAM-SHA-256/512 (RFC
//! 5802, RFC 7677), as the exchanges of bytes Kafka's SaslAuthenticate
//! carries. Pure: no I/O; the connection drives it.
//!
//! Hand-written: the SCRAM client is ~80 lines over OpenSSL's PBKDF2, HMAC
//! and hashes (already linked for TLS); the crates that offer it bring
//! their own crypto stacks. Limits: usernames and passwords are used as
//! given (no SASLprep), as librdkafka does; the channel-binding flag is
//! always `n` (no binding).

use openssl::hash::{MessageDigest, hash};
use openssl::pkey::PKey;
use openssl::sign::Signer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl Mechanism {
    pub fn parse(s: &str) -> Option<Mechanism> {
        match s.trim().to_ascii_uppercase().as_str() {
            "PLAIN" => Some(Mechanism::Plain),
            "SCRAM-SHA-256" => Some(Mechanism::ScramSha256),
            "SCRAM-SHA-512" => Some(Mechanism::ScramSha512),
            _ => None,
        }
    }

    /// The name Kafka's SaslHandshake takes.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// Credentials, with a `Debug` that never shows the password.
#[derive(Clone)]
pub struct Credentials {
    pub mechanism: Mechanism,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// PLAIN's one message: no authorization id, user, password.
pub fn plain(c: &Credentials) -> Vec<u8> {
    let mut m = Vec::with_capacity(c.username.len() + c.password.len() + 2);
    m.push(0);
    m.extend_from_slice(c.username.as_bytes());
    m.push(0);
    m.extend_from_slice(c.password.as_bytes());
    m
}

/// Most PBKDF2 iterations a server may ask for (Kafka allows 4096–16384);
/// more would let a rogue server burn the node's CPU.
const MAX_ITERATIONS: u32 = 1 << 20;

/// Why a SCRAM exchange failed (the server's messages are quoted as sent).
#[derive(Debug, thiserror::Error)]
pub enum SaslError {
    #[error("server-first is not UTF-8")]
    ServerFirstNotUtf8,
    #[error("server-first has no {attribute}: {message:?}")]
    NoAttribute {
        attribute: &'static str,
        message: String,
    },
    #[error("the server's nonce does not extend ours")]
    NonceNotExtended,
    #[error("bad iteration count in {0:?}")]
    BadIterationCount(String),
    #[error("iteration count {0} out of range")]
    IterationsOutOfRange(u32),
    #[error("server-final is not UTF-8")]
    ServerFinalNotUtf8,
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("server-final has no verifier: {0:?}")]
    NoVerifier(String),
    #[error("the server's signature is wrong (it does not know the password)")]
    WrongSignature,
    /// OpenSSL failed (random bytes, base64, PBKDF2, HMAC, hashing).
    #[error("{0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// A SCRAM exchange from the client's side.
pub struct Scram {
    digest: MessageDigest,
    password: String,
    client_first_bare: String,
    nonce: String,
    /// Set by [`Scram::client_final`]: what the server must prove.
    server_signature: Option<Vec<u8>>,
}

impl Scram {
    /// Starts an exchange with a fresh random nonce.
    pub fn new(c: &Credentials) -> Result<Scram, SaslError> {
        let mut raw = [0u8; 24];
        openssl::rand::rand_bytes(&mut raw)?;
        Ok(Self::with_nonce(c, &openssl::base64::encode_block(&raw)))
    }

    pub fn with_nonce(c: &Credentials, nonce: &str) -> Scram {
        let digest = match c.mechanism {
            Mechanism::ScramSha512 => MessageDigest::sha512(),
            _ => MessageDigest::sha256(),
        };
        Self::with_digest(digest, &c.username, &c.password, nonce)
    }

    fn with_digest(digest: MessageDigest, user: &str, password: &str, nonce: &str) -> Scram {
        let user = user.replace('=', "=3D").replace(',', "=2C");
        Scram {
            digest,
            password: password.to_owned(),
            client_first_bare: format!("n={user},r={nonce}"),
            nonce: nonce.to_owned(),
            server_signature: None,
        }
    }

    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// The client's proof, from the server's first message.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, SaslError> {
        let sf = std::str::from_utf8(server_first).map_err(|_| SaslError::ServerFirstNotUtf8)?;
        let (nonce, salt, iterations) = self.server_first(sf)?;
        let mut salted = vec![0u8; self.digest.size()];
        openssl::pkcs5::pbkdf2_hmac(
            self.password.as_bytes(),
            &salt,
            iterations as usize,
            self.digest,
            &mut salted,
        )?;
        let client_key = self.hmac(&salted, b"Client Key")?;
        let stored_key = hash(self.digest, &client_key)?;
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{sf},{without_proof}", self.client_first_bare);
        let signature = self.hmac(&stored_key, auth_message.as_bytes())?;
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = self.hmac(&salted, b"Server Key")?;
        self.server_signature = Some(self.hmac(&server_key, auth_message.as_bytes())?);
        Ok(format!(
            "{without_proof},p={}",
            openssl::base64::encode_block(&proof)
        )
        .into_bytes())
    }

    /// The server's nonce, salt and iteration count from its first
    /// message, checked: the nonce extends ours, the count is bounded.
    fn server_first<'a>(&self, sf: &'a str) -> Result<(&'a str, Vec<u8>, u32), SaslError> {
        let attr = |k: &'static str| {
            sf.split(',')
                .find_map(|a| a.strip_prefix(k)?.strip_prefix('='))
                .ok_or_else(|| SaslError::NoAttribute {
                    attribute: k,
                    message: sf.to_owned(),
                })
        };
        let nonce = attr("r")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(SaslError::NonceNotExtended);
        }
        let salt = openssl::base64::decode_block(attr("s")?)?;
        let iterations: u32 = attr("i")?
            .parse()
            .map_err(|_| SaslError::BadIterationCount(sf.to_owned()))?;
        if !(1..=MAX_ITERATIONS).contains(&iterations) {
            return Err(SaslError::IterationsOutOfRange(iterations));
        }
        Ok((nonce, salt, iterations))
    }

    /// Checks the server's proof that it knows the password too.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), SaslError> {
        let sf = std::str::from_utf8(server_final).map_err(|_| SaslError::ServerFinalNotUtf8)?;
        if let Some(err) = sf.strip_prefix("e=") {
            return Err(SaslError::Refused(err.to_owned()));
        }
        let v = sf
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .ok_or_else(|| SaslError::NoVerifier(sf.to_owned()))?;
        let got = openssl::base64::decode_block(v)?;
        match &self.server_signature {
            // memcmp::eq panics on different lengths.
            Some(want) if want.len() == got.len() && openssl::memcmp::eq(want, &got) => Ok(()),
            _ => Err(SaslError::WrongSignature),
        }
    }

    fn hmac(&self, key: &[u8], data: &[u8]) -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let key = PKey::hmac(key)?;
        let mut s = Signer::new(self.digest, &key)?;
        s.update(data)?;
        s.sign_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(digest: MessageDigest, nonce: &str, server_first: &str) -> (String, Scram) {
        let mut s = Scram::with_digest(digest, "user", "pencil", nonce);
        assert_eq!(
            s.client_first(),
            format!("n,,n=user,r={nonce}").into_bytes()
        );
        let fin = s.client_final(server_first.as_bytes()).unwrap();
        (String::from_utf8(fin).unwrap(), s)
    }

    #[test]
    fn scram_sha_1_matches_rfc_5802s_example() {
        // The generic exchange, checked with the RFC's own digest.
        let (fin, s) = exchange(
            MessageDigest::sha1(),
            "fyko+d2lbbFgONRv9qkxdawL",
            "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
        );
        assert_eq!(
            fin,
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
        );
        s.verify_server_final(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")
            .unwrap();
    }

    #[test]
    fn scram_sha_256_matches_rfc_7677s_example() {
        let (fin, s) = exchange(
            MessageDigest::sha256(),
            "rOprNGfwEbeRWgbNEkqO",
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        );
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(
            s.verify_server_final(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
                .is_err()
        );
        assert!(s.verify_server_final(b"e=invalid-proof").is_err());
    }

    #[test]
    fn a_rogue_server_first_message_is_refused() {
        let mut s = Scram::with_digest(MessageDigest::sha256(), "u", "p", "abc");
        for bad in [
            "r=xyz123,s=QSXCR+Q6sek8bf92,i=4096",    // not our nonce
            "r=abc,s=QSXCR+Q6sek8bf92,i=4096",       // not extended
            "r=abcd,s=QSXCR+Q6sek8bf92,i=999999999", // iterations
            "r=abcd,i=4096",                         // no salt
            "garbage",
        ] {
            assert!(s.client_final(bad.as_bytes()).is_err(), "{bad}");
        }
        let c = Credentials {
            mechanism: Mechanism::Plain,
            username: "a,=b".into(),
            password: "secret".into(),
        };
        assert_eq!(plain(&c), b"\0a,=b\0secret");
        assert!(!format!("{c:?}").contains("secret"));
        let scram = Scram::with_nonce(&c, "n0");
        assert_eq!(scram.client_first(), b"n,,n=a=2C=3Db,r=n0");
    }

    #[test]
    fn refusals_read_as_they_always_have() {
        let mut s = Scram::with_digest(MessageDigest::sha256(), "u", "p", "abc");
        let mut first = |m: &[u8]| s.client_final(m).unwrap_err().to_string();
        assert_eq!(first(b"\xff"), "server-first is not UTF-8");
        assert_eq!(first(b"garbage"), "server-first has no r: \"garbage\"");
        assert_eq!(
            first(b"r=xyz,s=QSXCR+Q6sek8bf92,i=4096"),
            "the server's nonce does not extend ours"
        );
        assert_eq!(
            first(b"r=abcd,i=4096"),
            "server-first has no s: \"r=abcd,i=4096\""
        );
        assert_eq!(
            first(b"r=abcd,s=QSXCR+Q6sek8bf92,i=x"),
            "bad iteration count in \"r=abcd,s=QSXCR+Q6sek8bf92,i=x\""
        );
        assert_eq!(
            first(b"r=abcd,s=QSXCR+Q6sek8bf92,i=0"),
            "iteration count 0 out of range"
        );
        let (_, s) = exchange(
            MessageDigest::sha256(),
            "rOprNGfwEbeRWgbNEkqO",
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        );
        let last = |m: &[u8]| s.verify_server_final(m).unwrap_err().to_string();
        assert_eq!(last(b"\xff"), "server-final is not UTF-8");
        assert_eq!(
            last(b"e=invalid-proof"),
            "the server refused: invalid-proof"
        );
        assert_eq!(last(b"x=1"), "server-final has no verifier: \"x=1\"");
        assert_eq!(
            last(b"v=AAAA"),
            "the server's signature is wrong (it does not know the password)"
        );
    }
}
