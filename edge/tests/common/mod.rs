//! A real `strait-edge` process, rcgen certificates, a TLS client, and an
//! in-process stand-in broker that answers every request with an empty
//! Produce v3-v8 response (the tests send only Produce).

#![allow(dead_code)]

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use strait_kafka::codec::encode_request;
use strait_kafka::kafka_protocol::messages::{ApiKey, ProduceRequest, RequestHeader, RequestKind};
use strait_tls::tokio_rustls::rustls::pki_types::pem::PemObject;
use strait_tls::tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use strait_tls::tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use strait_tls::tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A base port with `n` consecutive free ports after it.
pub fn free_range(n: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base > u16::MAX - n {
            continue;
        }
        if (base..base + n).all(|p| StdListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no range of {n} free ports");
}

/// A CA and what it signs.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf with the given URI SANs (SPIFFE IDs), for `localhost` too.
    pub fn leaf(&self, cn: &str, uris: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    /// Writes `<name>.pem` and `<name>.key` in `dir` by rename, as a rotation would.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        for (path, text) in [(&key, &self.key_pem), (&cert, &self.cert_pem)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        (cert, key)
    }

    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

/// TLS to the edge, trusting `server_ca`, presenting `client` if given.
pub fn client_config(server_ca: &str, client: Option<&Leaf>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(server_ca));
    let mut config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der()],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    // Every connection a full handshake: a resumed session shows the
    // certificates of the session it resumes, not the ones served now.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

pub async fn connect_tls(
    port: u16,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// A Produce v8 request (acks=1) to partition 0 of `topic`, with no records.
pub fn produce_to(correlation_id: i32, topic: &str) -> Vec<u8> {
    use strait_kafka::kafka_protocol::messages::produce_request::{
        PartitionProduceData, TopicProduceData,
    };
    use strait_kafka::kafka_protocol::messages::TopicName;
    use strait_kafka::kafka_protocol::protocol::StrBytes;
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(8)
        .with_correlation_id(correlation_id);
    let body = RequestKind::Produce(
        ProduceRequest::default()
            .with_acks(1)
            .with_timeout_ms(1000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
                .with_partition_data(
                    vec![PartitionProduceData::default().with_index(0)],
                )]),
    );
    encode_request(&header, &body).unwrap().to_vec()
}

/// A Produce v8 request (acks=1, no topics: the edge forwards it raw).
pub fn produce(correlation_id: i32) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(8)
        .with_correlation_id(correlation_id);
    let body = RequestKind::Produce(ProduceRequest::default().with_acks(1).with_timeout_ms(1000));
    encode_request(&header, &body).unwrap().to_vec()
}

/// Sends a Produce and returns the correlation id of the answer, or the
/// error that ended the connection (EOF included).
pub async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    correlation_id: i32,
) -> std::io::Result<i32> {
    send(stream, &produce(correlation_id)).await
}

/// Sends a request frame and returns the correlation id of the answer.
pub async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
) -> std::io::Result<i32> {
    stream.write_all(request).await?;
    stream.flush().await?;
    let read = async {
        let size = stream.read_i32().await? as usize;
        let mut frame = vec![0; size];
        stream.read_exact(&mut frame).await?;
        Ok::<_, std::io::Error>((&frame[..4]).get_i32())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// A broker stand-in: answers each request frame with an empty Produce
/// response under its correlation id; counts connections and records the client certificate of
/// each when it speaks TLS.
#[derive(Clone)]
pub struct FakeBroker {
    pub port: u16,
    connections: Arc<AtomicUsize>,
    frames: Arc<AtomicUsize>,
    client_certs: Arc<Mutex<Vec<CertificateDer<'static>>>>,
}

impl FakeBroker {
    pub async fn start(tls: Option<(Leaf, &str)>) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let broker = FakeBroker {
            port: listener.local_addr().unwrap().port(),
            connections: Arc::default(),
            frames: Arc::default(),
            client_certs: Arc::default(),
        };
        let acceptor = tls.map(|(leaf, client_ca)| {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(client_ca)),
                provider(),
            )
            .build()
            .unwrap();
            let config = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    vec![leaf.der()],
                    PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
                )
                .unwrap();
            TlsAcceptor::from(Arc::new(config))
        });
        let state = broker.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                state.connections.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let state = state.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            if let Some(cert) = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                            {
                                state.client_certs.lock().unwrap().push(cert.clone());
                            }
                            answer(stream, state.frames).await
                        }
                        None => answer(stream, state.frames).await,
                    }
                });
            }
        });
        broker
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Request frames received.
    pub fn frames(&self) -> usize {
        self.frames.load(Ordering::SeqCst)
    }

    pub fn client_certs(&self) -> Vec<CertificateDer<'static>> {
        self.client_certs.lock().unwrap().clone()
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, frames: Arc<AtomicUsize>) {
    let mut buf = BytesMut::new();
    loop {
        while buf.len() >= 12 {
            let size = (&buf[..4]).get_i32() as usize;
            if buf.len() < 4 + size {
                break;
            }
            let frame = buf.split_to(4 + size);
            frames.fetch_add(1, Ordering::SeqCst);
            let correlation_id = (&frame[8..12]).get_i32();
            // A valid Produce v3-v8 answer: no topics, throttle_time_ms 0.
            let mut out = Vec::new();
            out.extend_from_slice(&(4 + 8i32).to_be_bytes());
            out.extend_from_slice(&correlation_id.to_be_bytes());
            out.extend_from_slice(&[0; 8]);
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A `strait-edge` process, stopped on drop.
pub struct EdgeProcess {
    child: Child,
    pub admin: u16,
    pub log: PathBuf,
}

impl EdgeProcess {
    pub fn start(config: &Path, dir: &Path) -> EdgeProcess {
        let admin = free_port();
        let log = dir.join("edge.log");
        let child = Command::new(env!("CARGO_BIN_EXE_strait-edge"))
            .arg("--config")
            .arg(config)
            .arg("--admin")
            .arg(format!("127.0.0.1:{admin}"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut edge = EdgeProcess { child, admin, log };
        edge.wait_ready();
        edge
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("strait-edge exited ({status}):\n{}", self.log_text());
            }
            if http_get(self.admin, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("strait-edge not ready in time:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sum of a metric's samples whose labels contain every `labels` pair.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let Some((_, body)) = http_get(self.admin, "/metrics") else {
            return 0.0;
        };
        body.lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
                (metric == name
                    && labels
                        .iter()
                        .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())
                .flatten()
            })
            .sum()
    }

    /// Waits until `check` holds (polling, with a deadline).
    pub async fn wait_for(&self, what: &str, mut check: impl FnMut(&EdgeProcess) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if check(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "timed out waiting for {what}; edge log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking HTTP/1.0 GET on the admin port: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// Writes `text` to `path` by rename, so the edge never reads half of it.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The YAML of one virtual cluster on `port` (broker ports from `base`) in
/// front of `upstream` (an indented block), with `tls` (an indented block)
/// and `extra` top-level keys.
pub fn edge_config(port: u16, base: u16, upstream: &str, tls: &str, extra: &str) -> String {
    format!(
        "{extra}virtual_clusters:\n  - name: vc\n    bootstrap: 127.0.0.1:{port}\n    brokers: {{ advertised_host: localhost, port_range: {base}-{} }}\n    upstream:\n{upstream}\n    tls:\n{tls}\n",
        base + 3
    )
}
