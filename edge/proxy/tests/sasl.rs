//! Upstream SASL against an in-process fake broker on loopback TCP: PLAIN
//! and SCRAM handshakes, wrong passwords, a forged server signature, client
//! SASL answered by the edge, the auth-failure metric, and the session
//! lifetime (KIP-368) closing client connections at a frame boundary.
//!
//! The fake broker's SCRAM side is written here from RFC 5802 on the RustCrypto
//! primitives, independently of the edge's client.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, KeyInit, Mac};
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256, Sha512};
use strait_edge_config::{HostPort, Sasl, SaslMechanism, Secret, SecretSource};
use strait_kafka::codec::{decode_request, decode_response, encode_request, encode_response};
use strait_kafka::kafka_protocol::messages::api_versions_response::ApiVersion;
use strait_kafka::kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, HeartbeatRequest, HeartbeatResponse,
    RequestHeader, RequestKind, ResponseHeader, ResponseKind, SaslAuthenticateRequest,
    SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use strait_kafka::kafka_protocol::protocol::StrBytes;
use strait_proxy::metrics::ProxyMetrics;
use strait_proxy::sasl::UpstreamSasl;
use strait_proxy::upstream::{ConnectError, DirectTcp, Upstream, UpstreamTarget};
use strait_proxy::{Edge, FiltersByCluster};
use strait_tls::TlsMetrics;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PLAIN_FAILURE: &str = "Authentication failed: Invalid username or password";

/// What the fake broker accepts and how it behaves.
#[derive(Clone)]
struct FakeBroker {
    mechanisms: Vec<&'static str>,
    user: &'static str,
    password: &'static str,
    iterations: u32,
    session_lifetime_ms: i64,
    /// Sends a server signature computed from another password.
    forge_signature: bool,
    /// Delay before answering a Heartbeat (a request relayed for a client).
    heartbeat_delay: Duration,
}

impl Default for FakeBroker {
    fn default() -> Self {
        FakeBroker {
            mechanisms: vec!["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"],
            user: "alice",
            password: "alice-secret",
            iterations: 4096,
            session_lifetime_ms: 0,
            forge_signature: false,
            heartbeat_delay: Duration::ZERO,
        }
    }
}

/// What the broker saw, one line per request.
type Log = Arc<Mutex<Vec<String>>>;

impl FakeBroker {
    async fn start(self) -> (SocketAddr, Log) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let log: Log = Arc::default();
        let log2 = log.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(self.clone().serve(stream, log2.clone()));
            }
        });
        (address, log)
    }

    async fn serve(self, mut stream: TcpStream, log: Log) {
        let mut mechanism: Option<String> = None;
        let mut authenticated = false;
        // SCRAM state: client-first-bare, server-first.
        let mut scram: Option<(String, String)> = None;
        let record = |line: String| log.lock().unwrap().push(line);
        loop {
            let Ok(size) = stream.read_i32().await else {
                return;
            };
            let mut frame = BytesMut::new();
            frame.put_i32(size);
            frame.resize(size as usize + 4, 0);
            if stream.read_exact(&mut frame[4..]).await.is_err() {
                return;
            }
            let (key, header, body) = decode_request(frame.freeze()).unwrap();
            let version = header.request_api_version;
            let answer = match body {
                RequestKind::ApiVersions(_) => {
                    record(format!("ApiVersions v{version}"));
                    ResponseKind::ApiVersions(api_versions())
                }
                RequestKind::SaslHandshake(_) if authenticated => {
                    record("SaslHandshake after authentication".into());
                    ResponseKind::SaslHandshake(
                        SaslHandshakeResponse::default().with_error_code(34),
                    )
                }
                RequestKind::SaslHandshake(request) => {
                    let wanted = request.mechanism.to_string();
                    record(format!("SaslHandshake v{version} {wanted}"));
                    let enabled = self.mechanisms.contains(&wanted.as_str());
                    mechanism = enabled.then_some(wanted);
                    ResponseKind::SaslHandshake(
                        SaslHandshakeResponse::default()
                            .with_error_code(if enabled { 0 } else { 33 })
                            .with_mechanisms(
                                self.mechanisms
                                    .iter()
                                    .map(|m| StrBytes::from_static_str(m))
                                    .collect(),
                            ),
                    )
                }
                RequestKind::SaslAuthenticate(request) => {
                    record(format!("SaslAuthenticate v{version}"));
                    let (outcome, done) =
                        self.authenticate(mechanism.as_deref(), &request.auth_bytes, &mut scram);
                    authenticated |= done && outcome.error_code == 0;
                    let failed = outcome.error_code != 0;
                    let frame =
                        response(key, version, header.correlation_id, outcome_kind(outcome));
                    stream.write_all(&frame).await.unwrap();
                    if failed {
                        // Kafka closes the connection after a failed authentication.
                        return;
                    }
                    continue;
                }
                RequestKind::Heartbeat(_) if authenticated => {
                    record("Heartbeat".into());
                    tokio::time::sleep(self.heartbeat_delay).await;
                    ResponseKind::Heartbeat(HeartbeatResponse::default())
                }
                other => {
                    // A SASL listener closes on anything else before authentication.
                    record(format!("unexpected {other:?}"));
                    return;
                }
            };
            let frame = response(key, version, header.correlation_id, answer);
            if stream.write_all(&frame).await.is_err() {
                return;
            }
        }
    }

    /// One SaslAuthenticate round: the answer and whether the exchange is over.
    fn authenticate(
        &self,
        mechanism: Option<&str>,
        token: &[u8],
        scram: &mut Option<(String, String)>,
    ) -> (SaslAuthenticateResponse, bool) {
        let ok = |bytes: Vec<u8>, done: bool| {
            (
                SaslAuthenticateResponse::default()
                    .with_auth_bytes(Bytes::from(bytes))
                    .with_session_lifetime_ms(if done { self.session_lifetime_ms } else { 0 }),
                done,
            )
        };
        let fail = |message: String| {
            (
                SaslAuthenticateResponse::default()
                    .with_error_code(58)
                    .with_error_message(Some(StrBytes::from_string(message))),
                true,
            )
        };
        match mechanism {
            Some("PLAIN") => {
                let expected = format!("\0{}\0{}", self.user, self.password);
                if token == expected.as_bytes() {
                    ok(Vec::new(), true)
                } else {
                    fail(PLAIN_FAILURE.into())
                }
            }
            Some(name @ ("SCRAM-SHA-256" | "SCRAM-SHA-512")) => {
                let sha512 = name == "SCRAM-SHA-512";
                let text = std::str::from_utf8(token).unwrap();
                let failure = || {
                    format!("Authentication failed during authentication due to invalid credentials with SASL mechanism {name}")
                };
                match scram.take() {
                    None => {
                        let bare = text.strip_prefix("n,,").unwrap().to_owned();
                        let client_nonce = bare.split(",r=").nth(1).unwrap();
                        let server_first = format!(
                            "r={client_nonce}srvNONCE42,s={},i={}",
                            BASE64.encode(b"fake-broker-salt"),
                            self.iterations
                        );
                        *scram = Some((bare, server_first.clone()));
                        ok(server_first.into_bytes(), false)
                    }
                    Some((bare, server_first)) => {
                        let (without_proof, proof) = text.rsplit_once(",p=").unwrap();
                        let auth_message = format!("{bare},{server_first},{without_proof}");
                        let verify =
                            |password: &str| server_check(sha512, password, &auth_message, proof);
                        match verify(self.password) {
                            Some(mut signature) => {
                                if self.forge_signature {
                                    signature =
                                        verify_signature_only(sha512, "impostor", &auth_message);
                                }
                                ok(format!("v={signature}").into_bytes(), true)
                            }
                            None => fail(failure()),
                        }
                    }
                }
            }
            _ => fail("no mechanism negotiated".into()),
        }
    }
}

fn outcome_kind(answer: SaslAuthenticateResponse) -> ResponseKind {
    ResponseKind::SaslAuthenticate(answer)
}

fn hmac(sha512: bool, key: &[u8], data: &[u8]) -> Vec<u8> {
    if sha512 {
        let mut mac = <Hmac<Sha512> as KeyInit>::new_from_slice(key).unwrap();
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    } else {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }
}

/// Memoised: PBKDF2 is slow in a debug build, and the timing test must not
/// depend on it.
fn salted(sha512: bool, password: &str) -> Vec<u8> {
    static CACHE: Mutex<Vec<(bool, String, Vec<u8>)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap();
    if let Some((_, _, value)) = cache.iter().find(|(h, p, _)| *h == sha512 && p == password) {
        return value.clone();
    }
    let salt = b"fake-broker-salt";
    let value = if sha512 {
        pbkdf2::pbkdf2_hmac_array::<Sha512, 64>(password.as_bytes(), salt, 4096).to_vec()
    } else {
        pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password.as_bytes(), salt, 4096).to_vec()
    };
    cache.push((sha512, password.to_owned(), value.clone()));
    value
}

/// The server's check of RFC 5802: recover ClientKey from the proof and
/// compare its hash with StoredKey. Returns the server signature on success.
fn server_check(sha512: bool, password: &str, auth_message: &str, proof: &str) -> Option<String> {
    let salted = salted(sha512, password);
    let client_key = hmac(sha512, &salted, b"Client Key");
    let stored_key = if sha512 {
        Sha512::digest(&client_key).to_vec()
    } else {
        Sha256::digest(&client_key).to_vec()
    };
    let signature = hmac(sha512, &stored_key, auth_message.as_bytes());
    let proof = BASE64.decode(proof).ok()?;
    let recovered: Vec<u8> = proof.iter().zip(&signature).map(|(p, s)| p ^ s).collect();
    let recovered_stored = if sha512 {
        Sha512::digest(&recovered).to_vec()
    } else {
        Sha256::digest(&recovered).to_vec()
    };
    (recovered_stored == stored_key).then(|| verify_signature_only(sha512, password, auth_message))
}

fn verify_signature_only(sha512: bool, password: &str, auth_message: &str) -> String {
    let server_key = hmac(sha512, &salted(sha512, password), b"Server Key");
    BASE64.encode(hmac(sha512, &server_key, auth_message.as_bytes()))
}

fn api_versions() -> ApiVersionsResponse {
    let keys = [
        (ApiKey::ApiVersions, 0, 3),
        (ApiKey::SaslHandshake, 0, 1),
        (ApiKey::SaslAuthenticate, 0, 2),
        (ApiKey::Heartbeat, 0, 4),
        (ApiKey::Metadata, 0, 12),
    ];
    ApiVersionsResponse::default().with_api_keys(
        keys.iter()
            .map(|(key, min, max)| {
                ApiVersion::default()
                    .with_api_key(*key as i16)
                    .with_min_version(*min)
                    .with_max_version(*max)
            })
            .collect(),
    )
}

fn response(key: ApiKey, version: i16, correlation_id: i32, body: ResponseKind) -> Bytes {
    encode_response(
        key,
        version,
        &ResponseHeader::default().with_correlation_id(correlation_id),
        &body,
    )
    .unwrap()
}

fn sasl(mechanism: SaslMechanism, password: &str) -> Sasl {
    Sasl {
        mechanism,
        username: "alice".into(),
        username_source: None,
        password: Secret::new(password.into()),
        password_source: SecretSource::Env("UNUSED".into()),
    }
}

fn upstream(broker: SocketAddr, sasl: &Sasl) -> DirectTcp {
    DirectTcp::new(
        vec![HostPort {
            host: "127.0.0.1".into(),
            port: broker.port(),
        }],
        Duration::from_secs(5),
    )
    .with_sasl(UpstreamSasl::new(sasl))
}

#[tokio::test]
async fn plain_and_scram_authenticate_before_any_client_byte() {
    let (broker, log) = FakeBroker::default().start().await;
    for mechanism in [
        SaslMechanism::Plain,
        SaslMechanism::ScramSha256,
        SaslMechanism::ScramSha512,
    ] {
        log.lock().unwrap().clear();
        let connection = upstream(broker, &sasl(mechanism, "alice-secret"))
            .connect_session(&UpstreamTarget::Bootstrap)
            .await
            .unwrap_or_else(|err| panic!("{mechanism}: {err}"));
        assert_eq!(connection.session_expires_at, None);
        let rounds = if mechanism == SaslMechanism::Plain {
            1
        } else {
            2
        };
        let mut expected = vec![
            "ApiVersions v3".to_owned(),
            format!("SaslHandshake v1 {mechanism}"),
        ];
        expected.extend(std::iter::repeat_n(
            "SaslAuthenticate v2".to_owned(),
            rounds,
        ));
        assert_eq!(*log.lock().unwrap(), expected, "{mechanism}");
    }
}

#[tokio::test]
async fn wrong_password_is_an_authentication_error_with_the_broker_message() {
    let (broker, _) = FakeBroker::default().start().await;
    for mechanism in [
        SaslMechanism::Plain,
        SaslMechanism::ScramSha256,
        SaslMechanism::ScramSha512,
    ] {
        let err = upstream(broker, &sasl(mechanism, "wrong-password"))
            .connect_session(&UpstreamTarget::Bootstrap)
            .await
            .err()
            .unwrap();
        let ConnectError::Authentication {
            address,
            mechanism: reported,
            message,
        } = &err
        else {
            panic!("{mechanism}: {err}")
        };
        assert_eq!(address, &format!("127.0.0.1:{}", broker.port()));
        assert_eq!(*reported, mechanism);
        assert!(
            message.starts_with("SASL_AUTHENTICATION_FAILED (58): "),
            "{message}"
        );
        if mechanism == SaslMechanism::Plain {
            assert!(message.ends_with(PLAIN_FAILURE), "{message}");
        } else {
            assert!(message.contains("invalid credentials"), "{message}");
        }
        let text = err.to_string();
        assert!(!text.contains("wrong-password"), "{text}");
    }
}

#[tokio::test]
async fn a_forged_server_signature_fails_scram() {
    let (broker, _) = FakeBroker {
        forge_signature: true,
        ..FakeBroker::default()
    }
    .start()
    .await;
    let err = upstream(broker, &sasl(SaslMechanism::ScramSha256, "alice-secret"))
        .connect_session(&UpstreamTarget::Bootstrap)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, ConnectError::Authentication { message, .. } if message.contains("signature does not match")),
        "{err}"
    );
}

#[tokio::test]
async fn too_few_iterations_and_disabled_mechanisms_are_refused() {
    let (broker, log) = FakeBroker {
        iterations: 1024,
        mechanisms: vec!["PLAIN", "SCRAM-SHA-256"],
        ..FakeBroker::default()
    }
    .start()
    .await;
    let err = upstream(broker, &sasl(SaslMechanism::ScramSha256, "alice-secret"))
        .connect_session(&UpstreamTarget::Bootstrap)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, ConnectError::Authentication { message, .. } if message.contains("1024 PBKDF2 iterations")),
        "{err}"
    );
    let err = upstream(broker, &sasl(SaslMechanism::ScramSha512, "alice-secret"))
        .connect_session(&UpstreamTarget::Bootstrap)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, ConnectError::Authentication { message, .. }
            if message == "the broker does not enable SCRAM-SHA-512 (enabled: PLAIN, SCRAM-SHA-256)"),
        "{err}"
    );
    assert!(!log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("unexpected")));
}

#[tokio::test]
async fn a_silent_broker_times_out_under_connect_timeout() {
    // Accepts TCP and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let direct = DirectTcp::new(
        vec![HostPort {
            host: "127.0.0.1".into(),
            port: address.port(),
        }],
        Duration::from_millis(300),
    )
    .with_sasl(UpstreamSasl::new(&sasl(SaslMechanism::Plain, "x")));
    let started = std::time::Instant::now();
    let err = direct
        .connect_session(&UpstreamTarget::Broker {
            node_id: 1,
            address: HostPort {
                host: "127.0.0.1".into(),
                port: address.port(),
            },
        })
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ConnectError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("(SASL)"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

// ---- Through a running edge ------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct RunningEdge {
    edge: Edge,
    port: u16,
    registry: Registry,
    _password: tempfile::NamedTempFile,
}

async fn start_edge(broker: SocketAddr, mechanism: &str, password: &str) -> RunningEdge {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, format!("{password}\n").as_bytes()).unwrap();
    let port = free_port();
    let base = free_port();
    let yaml = format!(
        r#"
virtual_clusters:
  - name: sasl
    bootstrap: 127.0.0.1:{port}
    brokers: {{ advertised_host: 127.0.0.1, port_range: {base}-{base} }}
    upstream:
      bootstrap_servers: [127.0.0.1:{}]
      sasl:
        mechanism: {mechanism}
        username: alice
        password_file: {}
"#,
        broker.port(),
        file.path().display()
    );
    let config = strait_edge_config::parse(&yaml).unwrap();
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::register(registry.sub_registry_with_prefix("strait"));
    let tls = TlsMetrics::register(&mut registry);
    let edge = Edge::start(
        &config,
        metrics,
        tls,
        FiltersByCluster::new(),
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .unwrap();
    RunningEdge {
        edge,
        port,
        registry,
        _password: file,
    }
}

fn request(key: ApiKey, version: i16, correlation_id: i32, body: RequestKind) -> Bytes {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("test-client")));
    encode_request(&header, &body).unwrap()
}

async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    key: ApiKey,
    version: i16,
) -> Option<(i32, ResponseKind)> {
    let size = stream.read_i32().await.ok()?;
    let mut frame = BytesMut::new();
    frame.put_i32(size);
    frame.resize(size as usize + 4, 0);
    stream.read_exact(&mut frame[4..]).await.ok()?;
    let (header, body) = decode_response(key, version, frame.freeze()).unwrap();
    Some((header.correlation_id, body))
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, frame: Bytes) {
    stream.write_all(&frame).await.unwrap();
}

#[tokio::test]
async fn clients_are_offered_no_sasl_and_their_handshake_never_reaches_the_broker() {
    let (broker, log) = FakeBroker::default().start().await;
    let edge = start_edge(broker, "SCRAM-SHA-512", "alice-secret").await;
    let mut client = TcpStream::connect(("127.0.0.1", edge.port)).await.unwrap();

    send(
        &mut client,
        request(
            ApiKey::ApiVersions,
            3,
            1,
            RequestKind::ApiVersions(ApiVersionsRequest::default()),
        ),
    )
    .await;
    let (id, answer) = read_response(&mut client, ApiKey::ApiVersions, 3)
        .await
        .unwrap();
    assert_eq!(id, 1);
    let ResponseKind::ApiVersions(answer) = answer else {
        panic!()
    };
    let keys: Vec<i16> = answer.api_keys.iter().map(|k| k.api_key).collect();
    assert!(keys.contains(&(ApiKey::Heartbeat as i16)), "{keys:?}");
    assert!(!keys.contains(&(ApiKey::SaslHandshake as i16)), "{keys:?}");
    assert!(
        !keys.contains(&(ApiKey::SaslAuthenticate as i16)),
        "{keys:?}"
    );

    send(
        &mut client,
        request(
            ApiKey::SaslHandshake,
            1,
            2,
            RequestKind::SaslHandshake(
                SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")),
            ),
        ),
    )
    .await;
    let (id, answer) = read_response(&mut client, ApiKey::SaslHandshake, 1)
        .await
        .unwrap();
    assert_eq!(id, 2);
    let ResponseKind::SaslHandshake(answer) = answer else {
        panic!()
    };
    assert_eq!(answer.error_code, 33, "UNSUPPORTED_SASL_MECHANISM");
    assert!(answer.mechanisms.is_empty());

    send(
        &mut client,
        request(
            ApiKey::SaslAuthenticate,
            2,
            3,
            RequestKind::SaslAuthenticate(
                SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from_static(b"\0a\0b")),
            ),
        ),
    )
    .await;
    let (_, answer) = read_response(&mut client, ApiKey::SaslAuthenticate, 2)
        .await
        .unwrap();
    let ResponseKind::SaslAuthenticate(answer) = answer else {
        panic!()
    };
    assert_eq!(answer.error_code, 34, "ILLEGAL_SASL_STATE");

    // The connection still works for ordinary requests.
    send(
        &mut client,
        request(
            ApiKey::Heartbeat,
            4,
            4,
            RequestKind::Heartbeat(HeartbeatRequest::default()),
        ),
    )
    .await;
    let (id, _) = read_response(&mut client, ApiKey::Heartbeat, 4)
        .await
        .unwrap();
    assert_eq!(id, 4);

    let seen = log.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            "ApiVersions v3",
            "SaslHandshake v1 SCRAM-SHA-512",
            "SaslAuthenticate v2",
            "SaslAuthenticate v2",
            "ApiVersions v3",
            "Heartbeat",
        ],
        "only the edge's own handshake reached the broker"
    );
    edge.edge.shutdown().await;
}

#[tokio::test]
async fn a_refused_login_closes_the_client_and_counts_once() {
    let (broker, _) = FakeBroker::default().start().await;
    let edge = start_edge(broker, "PLAIN", "not-alices-password").await;
    let mut client = TcpStream::connect(("127.0.0.1", edge.port)).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("the edge must close the client connection");
    assert_eq!(read.unwrap(), 0, "nothing is sent to the client");

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &edge.registry).unwrap();
    assert!(
        text.contains(
            r#"strait_upstream_auth_failures_total{virtual_cluster="sasl",mechanism="PLAIN"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"strait_upstream_connect_errors_total{virtual_cluster="sasl"} 0"#),
        "{text}"
    );
    edge.edge.shutdown().await;
}

/// Sends ApiVersions and waits for its answer: client bytes are relayed only
/// after the edge's handshake, so this marks (just after) the session start.
async fn handshake_done(client: &mut TcpStream) -> std::time::Instant {
    send(
        client,
        request(
            ApiKey::ApiVersions,
            3,
            1,
            RequestKind::ApiVersions(ApiVersionsRequest::default()),
        ),
    )
    .await;
    read_response(client, ApiKey::ApiVersions, 3).await.unwrap();
    std::time::Instant::now()
}

/// The broker grants a 2 s session. The edge must close the client
/// connection before then, but only at a frame boundary: a request already
/// sent still gets its answer, even one that arrives after the edge began
/// closing (85-95 % of 2 s is 1.7-1.9 s into the session).
#[tokio::test]
async fn the_client_is_closed_at_a_frame_boundary_before_the_session_ends() {
    let (broker, log) = FakeBroker {
        session_lifetime_ms: 2000,
        heartbeat_delay: Duration::from_millis(800),
        ..FakeBroker::default()
    }
    .start()
    .await;
    let edge = start_edge(broker, "SCRAM-SHA-256", "alice-secret").await;

    let mut client = TcpStream::connect(("127.0.0.1", edge.port)).await.unwrap();
    let session = handshake_done(&mut client).await;
    tokio::time::sleep(Duration::from_millis(1400)).await;
    // Answered about 2.2 s into the session, after the edge began closing.
    send(
        &mut client,
        request(
            ApiKey::Heartbeat,
            4,
            7,
            RequestKind::Heartbeat(HeartbeatRequest::default()),
        ),
    )
    .await;
    let (id, _) = read_response(&mut client, ApiKey::Heartbeat, 4)
        .await
        .expect("the request in flight is answered");
    assert_eq!(id, 7);
    assert!(
        session.elapsed() >= Duration::from_millis(2200),
        "{:?}",
        session.elapsed()
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut rest))
        .await
        .expect("the edge closes the client connection");
    assert_eq!(read.unwrap(), 0);
    assert!(
        session.elapsed() < Duration::from_millis(3000),
        "{:?}",
        session.elapsed()
    );
    assert_eq!(
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| *l == "Heartbeat")
            .count(),
        1
    );

    // An idle client is closed within the session lifetime.
    let mut idle = TcpStream::connect(("127.0.0.1", edge.port)).await.unwrap();
    let session = handshake_done(&mut idle).await;
    let read = tokio::time::timeout(Duration::from_secs(3), idle.read_to_end(&mut rest))
        .await
        .expect("an idle client is closed too");
    assert_eq!(read.unwrap(), 0);
    let after = session.elapsed();
    assert!(
        after >= Duration::from_millis(1600) && after < Duration::from_millis(2000),
        "closed {after:?} into the session"
    );
    edge.edge.shutdown().await;
}
