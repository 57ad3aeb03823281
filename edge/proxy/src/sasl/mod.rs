//! SASL between the edge and the brokers (`upstream.sasl`).
//!
//! Every upstream connection of a virtual cluster with `upstream.sasl` is
//! authenticated right after TCP (and TLS) connect, before any client byte is
//! relayed: ApiVersions (to pick versions), SaslHandshake v1, then
//! SaslAuthenticate (v2 where the broker has it) carrying PLAIN or SCRAM
//! tokens. The client then talks to an already authenticated connection, so
//! its own SASL requests are answered by the edge ([`client`]).
//!
//! A broker that announces a session lifetime (KIP-368) closes the connection
//! when it runs out. The edge does not re-authenticate in the middle of a
//! client's request stream; it closes the client connection at a frame
//! boundary shortly before the lifetime ends, and the client reconnects (see
//! `ClusterRuntime::serve`).

pub mod client;
pub mod scram;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use strait_edge_config::{Sasl, SaslMechanism, Secret};
use strait_kafka::codec::{decode_response, encode_request};
use strait_kafka::kafka_protocol::error::ResponseError;
use strait_kafka::kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, RequestHeader, RequestKind, ResponseKind, SaslAuthenticateRequest,
    SaslAuthenticateResponse, SaslHandshakeRequest,
};
use strait_kafka::kafka_protocol::protocol::StrBytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use self::scram::{ScramClient, ScramHash};

/// Answers during the handshake are small (ApiVersions is the largest, a
/// few KiB); anything bigger is not a broker speaking SASL.
const MAX_HANDSHAKE_FRAME: usize = 1 << 20;

/// Why a handshake failed.
#[derive(Debug)]
pub enum SaslFailure {
    /// The broker refused the credentials or the exchange did not verify
    /// (wrong password, unknown mechanism, bad server signature ...).
    Rejected(String),
    /// The connection broke or carried something that is not Kafka.
    Io(std::io::Error),
}

impl From<std::io::Error> for SaslFailure {
    fn from(err: std::io::Error) -> Self {
        SaslFailure::Io(err)
    }
}

fn protocol_error(message: impl Into<String>) -> SaslFailure {
    SaslFailure::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        message.into(),
    ))
}

/// A successful handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaslSession {
    /// When the broker will end the session (KIP-368), measured from the
    /// moment its final SaslAuthenticate answer arrived.
    pub expires_at: Option<tokio::time::Instant>,
}

/// The credentials a virtual cluster authenticates with. Shared by all its
/// connections and replaced in place when the configuration (or the password
/// file) changes, so a rotation does not drop open connections.
pub struct UpstreamSasl {
    current: RwLock<Arc<Credentials>>,
}

struct Credentials {
    sasl: Sasl,
    /// The last `Hi(password, salt, i)`: brokers of one cluster share a SCRAM
    /// credential, so PBKDF2 runs once per salt, not once per connection.
    salted: Mutex<Option<SaltedPassword>>,
}

struct SaltedPassword {
    salt: Vec<u8>,
    iterations: u32,
    value: Zeroizing<Vec<u8>>,
}

impl UpstreamSasl {
    pub fn new(sasl: &Sasl) -> Arc<Self> {
        Arc::new(UpstreamSasl {
            current: RwLock::new(Arc::new(Credentials::new(sasl))),
        })
    }

    /// New connections use `sasl` from now on; open ones stay authenticated.
    pub fn replace(&self, sasl: &Sasl) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.sasl != *sasl {
            *current = Arc::new(Credentials::new(sasl));
        }
    }

    pub fn mechanism(&self) -> SaslMechanism {
        self.credentials().sasl.mechanism
    }

    fn credentials(&self) -> Arc<Credentials> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Authenticates `io` to the broker; returns the mechanism used (for
    /// error reports) with the outcome.
    pub async fn authenticate<S>(
        &self,
        io: &mut S,
    ) -> (SaslMechanism, Result<SaslSession, SaslFailure>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let credentials = self.credentials();
        let result = Handshake { io, next_id: 1 }.run(&credentials).await;
        (credentials.sasl.mechanism, result)
    }
}

impl Credentials {
    fn new(sasl: &Sasl) -> Self {
        Credentials {
            sasl: sasl.clone(),
            salted: Mutex::new(None),
        }
    }

    /// `Hi(password, salt, i)`, from the cache or computed off the async threads.
    async fn salted_password(
        &self,
        hash: ScramHash,
        salt: &[u8],
        iterations: u32,
    ) -> Result<Zeroizing<Vec<u8>>, SaslFailure> {
        if let Some(cached) = self
            .salted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|c| c.salt == salt && c.iterations == iterations)
        {
            return Ok(cached.value.clone());
        }
        let password: Secret = self.sasl.password.clone();
        let salt_owned = salt.to_vec();
        let value = tokio::task::spawn_blocking(move || {
            scram::salted_password(hash, password.expose().as_bytes(), &salt_owned, iterations)
        })
        .await
        .map_err(|err| SaslFailure::Io(std::io::Error::other(err)))?;
        *self.salted.lock().unwrap_or_else(|e| e.into_inner()) = Some(SaltedPassword {
            salt: salt.to_vec(),
            iterations,
            value: value.clone(),
        });
        Ok(value)
    }
}

/// One handshake on one connection.
struct Handshake<'a, S> {
    io: &'a mut S,
    next_id: i32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Handshake<'_, S> {
    async fn run(mut self, credentials: &Credentials) -> Result<SaslSession, SaslFailure> {
        let sasl = &credentials.sasl;
        let (handshake_version, authenticate_version) = self.versions().await?;
        if handshake_version < 1 {
            return Err(SaslFailure::Rejected(
                "the broker only has SaslHandshake v0 (Kafka before 1.0), which the edge does not speak"
                    .into(),
            ));
        }
        let answer = self
            .exchange(
                ApiKey::SaslHandshake,
                1,
                RequestKind::SaslHandshake(
                    SaslHandshakeRequest::default()
                        .with_mechanism(StrBytes::from_static_str(sasl.mechanism.as_str())),
                ),
            )
            .await?;
        let ResponseKind::SaslHandshake(answer) = answer else {
            return Err(protocol_error(
                "SaslHandshake answered with another message",
            ));
        };
        match answer.error_code {
            0 => {}
            33 => {
                let enabled: Vec<&str> = answer.mechanisms.iter().map(|m| m.as_str()).collect();
                return Err(SaslFailure::Rejected(format!(
                    "the broker does not enable {} (enabled: {})",
                    sasl.mechanism,
                    if enabled.is_empty() {
                        "none".to_owned()
                    } else {
                        enabled.join(", ")
                    }
                )));
            }
            34 => {
                return Err(SaslFailure::Rejected(
                    "the broker's listener does not expect SASL (ILLEGAL_SASL_STATE): is it a PLAINTEXT or SSL listener?"
                        .into(),
                ))
            }
            code => return Err(SaslFailure::Rejected(describe_error(code, None))),
        }

        match sasl.mechanism {
            SaslMechanism::Plain => {
                // RFC 4616: authzid NUL authcid NUL passwd, with no authzid.
                let mut token = Zeroizing::new(Vec::with_capacity(
                    sasl.username.len() + sasl.password.expose().len() + 2,
                ));
                token.push(0);
                token.extend_from_slice(sasl.username.as_bytes());
                token.push(0);
                token.extend_from_slice(sasl.password.expose().as_bytes());
                let answer = self.authenticate(authenticate_version, &token).await?;
                Ok(session_of(&answer))
            }
            SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512 => {
                let hash = if sasl.mechanism == SaslMechanism::ScramSha256 {
                    ScramHash::Sha256
                } else {
                    ScramHash::Sha512
                };
                let client = ScramClient::new(hash, &sasl.username);
                let first = self
                    .authenticate(authenticate_version, &client.client_first())
                    .await?;
                let server_first = client
                    .server_first(&first.auth_bytes)
                    .map_err(|err| SaslFailure::Rejected(err.to_string()))?;
                let salted = credentials
                    .salted_password(hash, &server_first.salt, server_first.iterations)
                    .await?;
                let client_final = client
                    .client_final(&server_first, &salted)
                    .map_err(|err| SaslFailure::Rejected(err.to_string()))?;
                let last = self
                    .authenticate(authenticate_version, &client_final.message)
                    .await?;
                client_final
                    .verify_server_final(&last.auth_bytes)
                    .map_err(|err| SaslFailure::Rejected(err.to_string()))?;
                Ok(session_of(&last))
            }
        }
    }

    /// The SaslHandshake and SaslAuthenticate versions to use, from the
    /// broker's ApiVersions (v3, or v0 for a broker that has no v3).
    async fn versions(&mut self) -> Result<(i16, i16), SaslFailure> {
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("strait-edge"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let answer = match self
            .exchange(
                ApiKey::ApiVersions,
                3,
                RequestKind::ApiVersions(request.clone()),
            )
            .await
        {
            Ok(ResponseKind::ApiVersions(answer)) if answer.error_code == 0 => answer,
            // A broker without v3 answers in v0 (KIP-511): ask again in v0.
            Ok(_) | Err(SaslFailure::Io(_)) => {
                match self
                    .exchange(ApiKey::ApiVersions, 0, RequestKind::ApiVersions(request))
                    .await?
                {
                    ResponseKind::ApiVersions(answer) if answer.error_code == 0 => answer,
                    ResponseKind::ApiVersions(answer) => {
                        return Err(SaslFailure::Rejected(describe_error(
                            answer.error_code,
                            None,
                        )))
                    }
                    _ => return Err(protocol_error("ApiVersions answered with another message")),
                }
            }
            Err(err) => return Err(err),
        };
        let range = |key: ApiKey| {
            answer
                .api_keys
                .iter()
                .find(|k| k.api_key == key as i16)
                .map(|k| (k.min_version, k.max_version))
        };
        let Some((_, handshake_max)) = range(ApiKey::SaslHandshake) else {
            return Err(SaslFailure::Rejected(
                "the broker does not offer SaslHandshake: its listener does not expect SASL".into(),
            ));
        };
        // SaslAuthenticate appeared with Kafka 1.0, together with SaslHandshake v1.
        let authenticate = match range(ApiKey::SaslAuthenticate) {
            Some((min, max)) if min <= max.min(2) => max.min(2),
            _ => -1,
        };
        if authenticate < 0 {
            return Err(SaslFailure::Rejected(
                "the broker does not offer SaslAuthenticate v0-v2".into(),
            ));
        }
        Ok((handshake_max.min(1), authenticate))
    }

    /// One SaslAuthenticate round; a broker error is a rejection carrying
    /// the broker's message.
    async fn authenticate(
        &mut self,
        version: i16,
        token: &[u8],
    ) -> Result<SaslAuthenticateResponse, SaslFailure> {
        let answer = self
            .exchange(
                ApiKey::SaslAuthenticate,
                version,
                RequestKind::SaslAuthenticate(
                    SaslAuthenticateRequest::default()
                        .with_auth_bytes(Bytes::copy_from_slice(token)),
                ),
            )
            .await?;
        let ResponseKind::SaslAuthenticate(answer) = answer else {
            return Err(protocol_error(
                "SaslAuthenticate answered with another message",
            ));
        };
        if answer.error_code != 0 {
            return Err(SaslFailure::Rejected(describe_error(
                answer.error_code,
                answer.error_message.as_ref().map(|m| m.as_str()),
            )));
        }
        Ok(answer)
    }

    /// Sends one request and reads its answer.
    async fn exchange(
        &mut self,
        api_key: ApiKey,
        version: i16,
        body: RequestKind,
    ) -> Result<ResponseKind, SaslFailure> {
        let correlation_id = self.next_id;
        self.next_id += 1;
        let header = RequestHeader::default()
            .with_request_api_key(api_key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("strait-edge")));
        let frame = encode_request(&header, &body)
            .map_err(|err| protocol_error(format!("cannot encode {api_key:?}: {err}")))?;
        self.io.write_all(&frame).await?;
        // TLS streams hold data back until flushed.
        self.io.flush().await?;

        let size = self.io.read_i32().await?;
        let size = usize::try_from(size)
            .ok()
            .filter(|size| (4..=MAX_HANDSHAKE_FRAME).contains(size))
            .ok_or_else(|| {
                protocol_error(format!(
                    "answer to {api_key:?} has size {size} (expected 4..={MAX_HANDSHAKE_FRAME})"
                ))
            })?;
        let mut buf = BytesMut::with_capacity(size + 4);
        buf.put_i32(size as i32);
        buf.resize(size + 4, 0);
        self.io.read_exact(&mut buf[4..]).await?;
        let (header, answer) = decode_response(api_key, version, buf.freeze()).map_err(|err| {
            protocol_error(format!("cannot decode the answer to {api_key:?}: {err}"))
        })?;
        if header.correlation_id != correlation_id {
            return Err(protocol_error(format!(
                "answer to {api_key:?} has correlation id {}, expected {correlation_id}",
                header.correlation_id
            )));
        }
        Ok(answer)
    }
}

fn session_of(answer: &SaslAuthenticateResponse) -> SaslSession {
    let lifetime = u64::try_from(answer.session_lifetime_ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    SaslSession {
        expires_at: lifetime.map(|lifetime| tokio::time::Instant::now() + lifetime),
    }
}

/// `SASL_AUTHENTICATION_FAILED (58): <broker message>`.
fn describe_error(code: i16, message: Option<&str>) -> String {
    let name = match ResponseError::try_from_code(code) {
        Some(ResponseError::Unknown(_)) | None => format!("error {code}"),
        Some(error) => format!("{} ({code})", screaming_snake(&format!("{error:?}"))),
    };
    match message {
        Some(message) if !message.is_empty() => format!("{name}: {message}"),
        _ => name,
    }
}

/// `SaslAuthenticationFailed` → `SASL_AUTHENTICATION_FAILED`, as Kafka names errors.
fn screaming_snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_errors_are_named_as_kafka_names_them() {
        assert_eq!(
            describe_error(
                58,
                Some("Authentication failed: Invalid username or password")
            ),
            "SASL_AUTHENTICATION_FAILED (58): Authentication failed: Invalid username or password"
        );
        assert_eq!(describe_error(34, None), "ILLEGAL_SASL_STATE (34)");
        assert_eq!(describe_error(-999, Some("")), "error -999");
    }

    #[test]
    fn session_lifetime_zero_or_negative_means_none() {
        let answer = |ms| SaslAuthenticateResponse::default().with_session_lifetime_ms(ms);
        assert_eq!(session_of(&answer(0)).expires_at, None);
        assert_eq!(session_of(&answer(-5)).expires_at, None);
        assert!(session_of(&answer(1000)).expires_at.is_some());
    }
}
