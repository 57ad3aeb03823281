//! SCRAM client (RFC 5802, with the SHA-256 and SHA-512 hashes of RFC 7677
//! and Kafka's KIP-84), without channel binding (`n,,`).
//!
//! No maintained crate on crates.io covers SHA-256 and SHA-512 under an open
//! licence (`scram` and `scram-2` are SHA-256 only; `scram-rs` is not open
//! source), so the exchange is written here on RustCrypto's `hmac`, `sha2`
//! and `pbkdf2`, and checked against RFC 7677's vector and a SHA-512 vector
//! computed independently with Python's `hashlib`/`hmac`.
//!
//! Like Kafka's own client, names and passwords are used as UTF-8 without
//! SASLprep; the user name is escaped (`,` and `=`) as RFC 5802 requires.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::Digest;
use thiserror::Error;
use zeroize::Zeroizing;

/// Below this a salted password is too cheap to brute-force offline; RFC 7677
/// and Kafka's own client refuse it too.
pub const MIN_ITERATIONS: u32 = 4096;
/// A bound on the work a broker can make the edge do per salt (Kafka allows
/// at most 16384).
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// The hash of a SCRAM mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScramHash {
    Sha256,
    Sha512,
}

/// Runs `$body` with `$d` naming the hash type.
macro_rules! with_hash {
    ($hash:expr, $d:ident => $body:expr) => {
        match $hash {
            ScramHash::Sha256 => {
                type $d = sha2::Sha256;
                $body
            }
            ScramHash::Sha512 => {
                type $d = sha2::Sha512;
                $body
            }
        }
    };
}

impl ScramHash {
    // HMAC accepts keys of every length, so `InvalidKey` cannot happen; it
    // is still an error rather than a panic on a path the network drives.
    fn hmac(self, key: &[u8], data: &[u8]) -> Result<Zeroizing<Vec<u8>>, ScramError> {
        with_hash!(self, D => {
            let mut mac = <Hmac<D> as KeyInit>::new_from_slice(key)
                .map_err(|_| ScramError::InvalidKey)?;
            mac.update(data);
            Ok(Zeroizing::new(mac.finalize().into_bytes().to_vec()))
        })
    }

    /// Compares HMAC(key, data) with `expected` in constant time.
    fn verify_hmac(self, key: &[u8], data: &[u8], expected: &[u8]) -> Result<bool, ScramError> {
        with_hash!(self, D => {
            let mut mac = <Hmac<D> as KeyInit>::new_from_slice(key)
                .map_err(|_| ScramError::InvalidKey)?;
            mac.update(data);
            Ok(mac.verify_slice(expected).is_ok())
        })
    }

    fn digest(self, data: &[u8]) -> Zeroizing<Vec<u8>> {
        with_hash!(self, D => Zeroizing::new(D::digest(data).to_vec()))
    }

    fn output_len(self) -> usize {
        match self {
            ScramHash::Sha256 => 32,
            ScramHash::Sha512 => 64,
        }
    }
}

/// `Hi(password, salt, i)` of RFC 5802: PBKDF2 with HMAC and one output
/// block. Costs `iterations` HMACs: run it off the async threads.
pub fn salted_password(
    hash: ScramHash,
    password: &[u8],
    salt: &[u8],
    iterations: u32,
) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(vec![0u8; hash.output_len()]);
    with_hash!(hash, D => pbkdf2::pbkdf2_hmac::<D>(password, salt, iterations, &mut out));
    out
}

/// Why a SCRAM exchange failed. Messages never contain credentials.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed server-first message: {0}")]
    MalformedServerFirst(&'static str),
    #[error("the server requires an unsupported SCRAM extension")]
    MandatoryExtension,
    #[error("the server nonce does not extend the client nonce (possible replay)")]
    NonceMismatch,
    #[error("the server asks for {0} PBKDF2 iterations; at least {MIN_ITERATIONS} are required")]
    TooFewIterations(u32),
    #[error("the server asks for {0} PBKDF2 iterations; at most {MAX_ITERATIONS} are allowed")]
    TooManyIterations(u32),
    #[error("malformed server-final message: {0}")]
    MalformedServerFinal(&'static str),
    #[error("the server reported an error: {0}")]
    ServerError(String),
    #[error(
        "the server's signature does not match: it does not know the password (possible impostor)"
    )]
    BadServerSignature,
    #[error("HMAC refused its key")]
    InvalidKey,
}

/// The client side of one SCRAM exchange.
pub struct ScramClient {
    hash: ScramHash,
    nonce: String,
    client_first_bare: String,
}

/// What the server said in its first message.
#[derive(Debug)]
pub struct ServerFirst {
    message: String,
    nonce: String,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

/// The client-final message and what the server must prove in reply.
pub struct ClientFinal {
    pub message: Zeroizing<Vec<u8>>,
    server_key: Zeroizing<Vec<u8>>,
    auth_message: String,
    hash: ScramHash,
}

impl ScramClient {
    /// A client with a fresh random nonce (from the thread-local CSPRNG).
    pub fn new(hash: ScramHash, username: &str) -> Self {
        let nonce: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        Self::with_nonce(hash, username, nonce)
    }

    /// A client with a given nonce, for known-answer tests.
    pub fn with_nonce(hash: ScramHash, username: &str, nonce: String) -> Self {
        let client_first_bare = format!("n={},r={nonce}", escape_username(username));
        ScramClient {
            hash,
            nonce,
            client_first_bare,
        }
    }

    /// `n,,n=user,r=nonce`: no channel binding, no authorization identity.
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Parses and checks the server-first message.
    pub fn server_first(&self, message: &[u8]) -> Result<ServerFirst, ScramError> {
        let message = std::str::from_utf8(message)
            .map_err(|_| ScramError::MalformedServerFirst("not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for (index, attribute) in message.split(',').enumerate() {
            let (key, value) = attribute
                .split_once('=')
                .ok_or(ScramError::MalformedServerFirst("attribute without '='"))?;
            match key {
                "m" if index == 0 => return Err(ScramError::MandatoryExtension),
                "r" if index == 0 => nonce = Some(value),
                "s" if index == 1 => {
                    salt = Some(
                        BASE64
                            .decode(value)
                            .map_err(|_| ScramError::MalformedServerFirst("salt is not base64"))?,
                    )
                }
                "i" if index == 2 => {
                    iterations = Some(value.parse::<u32>().map_err(|_| {
                        ScramError::MalformedServerFirst("iteration count is not a number")
                    })?)
                }
                // Optional extensions follow the iteration count.
                _ if index > 2 => {}
                _ => {
                    return Err(ScramError::MalformedServerFirst(
                        "expected r=, s= and i= in that order",
                    ))
                }
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(ScramError::MalformedServerFirst("missing r=, s= or i="));
        };
        // The server must add its own part: a nonce equal to ours could be a replay.
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        if !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ScramError::MalformedServerFirst("nonce is not printable"));
        }
        if salt.is_empty() {
            return Err(ScramError::MalformedServerFirst("salt is empty"));
        }
        if iterations < MIN_ITERATIONS {
            return Err(ScramError::TooFewIterations(iterations));
        }
        if iterations > MAX_ITERATIONS {
            return Err(ScramError::TooManyIterations(iterations));
        }
        Ok(ServerFirst {
            message: message.to_owned(),
            nonce: nonce.to_owned(),
            salt,
            iterations,
        })
    }

    /// The client-final message for `salted` = `Hi(password, salt, i)`.
    pub fn client_final(
        &self,
        server_first: &ServerFirst,
        salted: &[u8],
    ) -> Result<ClientFinal, ScramError> {
        let hash = self.hash;
        // "biws" is base64("n,,"): the GS2 header, no channel binding.
        let without_proof = format!("c=biws,r={}", server_first.nonce);
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, server_first.message
        );
        let client_key = hash.hmac(salted, b"Client Key")?;
        let stored_key = hash.digest(&client_key);
        let client_signature = hash.hmac(&stored_key, auth_message.as_bytes())?;
        let proof: Zeroizing<Vec<u8>> = Zeroizing::new(
            client_key
                .iter()
                .zip(client_signature.iter())
                .map(|(k, s)| k ^ s)
                .collect(),
        );
        let mut message = Zeroizing::new(without_proof.into_bytes());
        message.extend_from_slice(b",p=");
        message.extend_from_slice(BASE64.encode(&*proof).as_bytes());
        Ok(ClientFinal {
            message,
            server_key: hash.hmac(salted, b"Server Key")?,
            auth_message,
            hash,
        })
    }
}

impl ClientFinal {
    /// Checks `v=ServerSignature`: only a server that knows the salted
    /// password can produce it, so a mismatch means an impostor.
    pub fn verify_server_final(&self, message: &[u8]) -> Result<(), ScramError> {
        let message = std::str::from_utf8(message)
            .map_err(|_| ScramError::MalformedServerFinal("not UTF-8"))?;
        let first = message.split(',').next().unwrap_or_default();
        if let Some(error) = first.strip_prefix("e=") {
            return Err(ScramError::ServerError(error.to_owned()));
        }
        let signature = first
            .strip_prefix("v=")
            .ok_or(ScramError::MalformedServerFinal("expected v= or e="))?;
        let signature = BASE64
            .decode(signature)
            .map_err(|_| ScramError::MalformedServerFinal("signature is not base64"))?;
        if self
            .hash
            .verify_hmac(&self.server_key, self.auth_message.as_bytes(), &signature)?
        {
            Ok(())
        } else {
            Err(ScramError::BadServerSignature)
        }
    }
}

/// `saslname` of RFC 5802: `=` and `,` are escaped.
fn escape_username(username: &str) -> String {
    username.replace('=', "=3D").replace(',', "=2C")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the client through a recorded exchange and returns the
    /// client-final message.
    fn exchange(
        hash: ScramHash,
        user: &str,
        password: &str,
        nonce: &str,
        server_first: &str,
        server_final: &str,
    ) -> Result<String, ScramError> {
        let client = ScramClient::with_nonce(hash, user, nonce.to_owned());
        let first = client.server_first(server_first.as_bytes())?;
        let salted = salted_password(hash, password.as_bytes(), &first.salt, first.iterations);
        let last = client.client_final(&first, &salted)?;
        last.verify_server_final(server_final.as_bytes())?;
        Ok(String::from_utf8(last.message.to_vec()).unwrap())
    }

    /// RFC 7677, section 3.
    #[test]
    fn rfc7677_sha256_vector() {
        let client =
            ScramClient::with_nonce(ScramHash::Sha256, "user", "rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(client.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let client_final = exchange(
            ScramHash::Sha256,
            "user",
            "pencil",
            "rOprNGfwEbeRWgbNEkqO",
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        )
        .unwrap();
        assert_eq!(
            client_final,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
    }

    /// Computed independently with Python's hashlib.pbkdf2_hmac and hmac
    /// (the same script reproduces the RFC 7677 vector above).
    #[test]
    fn sha512_known_answer_vector() {
        let client_final = exchange(
            ScramHash::Sha512,
            "alice",
            "alice-secret",
            "fyko+d2lbbFgONRv9qkxdawL",
            "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=c3RyYWl0LXNjcmFtLXNoYTUxMi1zYWx0,i=4096",
            "v=e/NpxpGwMFe2jp983PaIwTqu3Tn5/EnavLtWT5PeA00haak4pw5zdb7egEkiI+zQysbq0sWAkCC4LCE1TEQIRA==",
        )
        .unwrap();
        assert_eq!(
            client_final,
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=xX5yY7nQmh+qm+8yPEj9uCuLCk4YnWL9bw17laI/oPhUqn2RjwBACwl782g4ZMo80SzFdZOUN5rzYIkwYzUQ6g=="
        );
    }

    /// The escaped name is what the proof is computed over (Python: n=a=2Cb=3Dc).
    #[test]
    fn user_names_are_escaped() {
        let client = ScramClient::with_nonce(ScramHash::Sha256, "a,b=c", "nonce".into());
        assert_eq!(client.client_first(), b"n,,n=a=2Cb=3Dc,r=nonce");
        let client_final = exchange(
            ScramHash::Sha256,
            "a,b=c",
            "p",
            "nonce",
            "r=nonceSERVER,s=c3RyYWl0LXNjcmFtLXNoYTUxMi1zYWx0,i=4096",
            "v=mYLLISm/0AGaQtBsBjXQJ4Vp6R5Y8400E6YYQxRjJzQ=",
        )
        .unwrap();
        assert_eq!(
            client_final,
            "c=biws,r=nonceSERVER,p=GP4S1qcnf0C0sZbm00SEdsqvKYO3nXO7AAM9r3sW6W8="
        );
    }

    #[test]
    fn a_wrong_server_signature_is_an_authentication_failure() {
        let result = exchange(
            ScramHash::Sha256,
            "user",
            "pencil",
            "rOprNGfwEbeRWgbNEkqO",
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            // The right signature for another password.
            "v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        );
        assert_eq!(result, Err(ScramError::BadServerSignature));
        let result = exchange(
            ScramHash::Sha256,
            "user",
            "pencil",
            "rOprNGfwEbeRWgbNEkqO",
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "e=invalid-proof",
        );
        assert_eq!(result, Err(ScramError::ServerError("invalid-proof".into())));
    }

    #[test]
    fn server_first_checks() {
        let client = ScramClient::with_nonce(ScramHash::Sha256, "u", "abc".into());
        let check = |message: &str| client.server_first(message.as_bytes()).map(|_| ());
        assert_eq!(check("r=abcdef,s=c2FsdA==,i=4096"), Ok(()));
        assert_eq!(
            check("r=abcdef,s=c2FsdA==,i=4096,x=extension"),
            Ok(()),
            "optional extensions are ignored"
        );
        assert_eq!(
            check("r=abcdef,s=c2FsdA==,i=4095"),
            Err(ScramError::TooFewIterations(4095))
        );
        assert_eq!(
            check("r=abcdef,s=c2FsdA==,i=4000000"),
            Err(ScramError::TooManyIterations(4_000_000))
        );
        assert_eq!(
            check("r=xyzdef,s=c2FsdA==,i=4096"),
            Err(ScramError::NonceMismatch)
        );
        assert_eq!(
            check("r=abc,s=c2FsdA==,i=4096"),
            Err(ScramError::NonceMismatch),
            "the server must add to the nonce"
        );
        assert_eq!(
            check("m=ext,r=abcdef,s=c2FsdA==,i=4096"),
            Err(ScramError::MandatoryExtension)
        );
        assert!(matches!(
            check("r=abcdef,s=!!,i=4096"),
            Err(ScramError::MalformedServerFirst(_))
        ));
        assert!(matches!(
            check("s=c2FsdA==,r=abcdef,i=4096"),
            Err(ScramError::MalformedServerFirst(_))
        ));
        assert!(matches!(
            check("r=abcdef,s=c2FsdA=="),
            Err(ScramError::MalformedServerFirst(_))
        ));
    }

    #[test]
    fn random_nonces_differ() {
        let a = ScramClient::new(ScramHash::Sha512, "u");
        let b = ScramClient::new(ScramHash::Sha512, "u");
        assert_ne!(a.nonce, b.nonce);
        assert_eq!(a.nonce.len(), 32);
    }
}
