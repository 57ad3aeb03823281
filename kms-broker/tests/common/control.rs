//! Real strait-control processes and strait-kms-broker processes following
//! them, with the PKI and clients the tests use.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use strait_control_client::{ClientConfig, ControlClient, TlsConfig};
use strait_proto::control as cpb;
use strait_proto::kms as pb;
use strait_proto::kms::kms_broker_client::KmsBrokerClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::{free_port, wait_until, Proc};

pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn control_bin() -> PathBuf {
    if let Ok(p) = std::env::var("STRAIT_CONTROL_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_BIN_EXE_strait-kms-broker")).with_file_name("strait-control");
    assert!(
        p.is_file(),
        "{} not found: run `cargo build -p strait-control --bins` first (or set STRAIT_CONTROL_BIN)",
        p.display()
    );
    p
}

pub struct Ca(pub CertifiedIssuer<'static, KeyPair>);

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Ca(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
    }

    pub fn pem(&self) -> String {
        self.0.pem()
    }

    /// (cert PEM, key PEM) with DNS/IP `sans` and the SPIFFE ID `id`.
    pub fn leaf(&self, sans: &[&str], id: Option<&str>, cn: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        if let Some(id) = id {
            p.subject_alt_names
                .push(SanType::URI(id.try_into().unwrap()));
        }
        let cert = p.signed_by(&key, &self.0).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn write_pair(dir: &Path, name: &str, pair: &(String, String)) {
    write(dir, &format!("{name}.pem"), &pair.0);
    write(dir, &format!("{name}.key"), &pair.1);
}

/// One control node; `tls`: the node's files in `dir` (node.pem, ca.pem).
pub fn start_control(dir: &Path, tls: bool) -> (Proc, String) {
    start_control_with(dir, tls, &[])
}

/// [`start_control`] with more flags (`--ca-seal-key-file`, `--cert-ttl-*`).
pub fn start_control_with(dir: &Path, tls: bool, extra: &[&str]) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(control_bin());
    cmd.args(["--id", "1", "--listen", &addr])
        .args(["--peers", &format!("1={addr}")])
        .arg("--data-dir")
        .arg(dir.join("control-data"))
        .args(["--tick-ms", "20"]);
    if tls {
        cmd.arg("--tls-cert")
            .arg(dir.join("node.pem"))
            .arg("--tls-key")
            .arg(dir.join("node.key"))
            .arg("--tls-client-ca")
            .arg(dir.join("ca.pem"))
            .args(["--trust-domain", "example.org"])
            .args(["--admin-identity", "spiffe://example.org/admin/*"]);
    } else {
        cmd.arg("--insecure-plaintext");
    }
    cmd.args(extra);
    let log = std::fs::File::create(dir.join("control.log")).unwrap();
    let child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    (Proc(child), addr)
}

pub fn admin_client(dir: &Path, addr: &str, tls: bool) -> ControlClient {
    let mut cfg = ClientConfig::new(&[addr]);
    if tls {
        let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
        cfg.tls = Some(TlsConfig {
            ca_pem: read("ca.pem"),
            cert_pem: Some(read("admin.pem")),
            key_pem: Some(read("admin.key")),
            domain: None,
        });
    }
    ControlClient::new(&cfg).unwrap()
}

pub async fn apply(c: &ControlClient, kind: &str, name: &str, spec: serde_json::Value) {
    c.apply(cpb::ApplyRequest {
        resource: Some(cpb::Resource {
            kind: kind.into(),
            name: name.into(),
            spec_json: spec.to_string(),
            ..Default::default()
        }),
        expected_revision: None,
    })
    .await
    .unwrap_or_else(|e| panic!("apply {kind}/{name}: {e}"));
}

pub struct Broker {
    pub proc: Proc,
    pub url: String,
    pub log: PathBuf,
}

pub fn broker_config(dir: &Path, port: u16, client_ca: bool) -> PathBuf {
    let keys = r#"{"keys":{"kek-a":["AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="]}}"#;
    write(dir, "keys.json", keys);
    let ca = if client_ca { ", client_ca: ca.pem" } else { "" };
    write(
        dir,
        "broker.yaml",
        &format!(
            r#"
listen: "127.0.0.1:{port}"
trust_domain: example.org
tls: {{ cert: server.pem, key: server.key, reload_interval: 100ms{ca} }}
kms:
  - name: dev
    local: {{ path: keys.json }}
"#
        ),
    )
}

pub fn spawn_broker(dir: &Path, args: &[String], log_name: &str) -> Child {
    let log = std::fs::File::create(dir.join(log_name)).unwrap();
    Command::new(env!("CARGO_BIN_EXE_strait-kms-broker"))
        .arg("--config")
        .arg(dir.join("broker.yaml"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        // The broker logs to stdout.
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

pub async fn start_broker(dir: &Path, port: u16, args: &[String], log_name: &str) -> Broker {
    let child = spawn_broker(dir, args, log_name);
    let addr = format!("127.0.0.1:{port}");
    wait_until("the broker to listen", DEADLINE, || {
        let addr = addr.clone();
        async move { tokio::net::TcpStream::connect(&addr).await.is_ok() }
    })
    .await;
    Broker {
        proc: Proc(child),
        url: format!("https://127.0.0.1:{port}"),
        log: dir.join(log_name),
    }
}

/// A client with its own connection (one HTTP/2 connection per channel).
pub fn client(url: &str, ca: &str, identity: &(String, String)) -> KmsBrokerClient<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(&identity.0, &identity.1));
    let ch = Channel::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    KmsBrokerClient::new(ch)
}

pub async fn resolve(c: &mut KmsBrokerClient<Channel>) -> Result<String, tonic::Status> {
    c.resolve_alias(pb::ResolveAliasRequest {
        kms: String::new(),
        alias: "kek-a".into(),
    })
    .await
    .map(|r| r.into_inner().kek.unwrap().key_id)
}

pub async fn call(
    url: &str,
    ca: &str,
    identity: &(String, String),
) -> Result<String, tonic::Status> {
    resolve(&mut client(url, ca, identity)).await
}

pub async fn log_contains(path: &Path, want: &str) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} does not contain {want:?}:\n{text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn id(name: &str) -> String {
    format!("spiffe://example.org/{name}")
}

/// The common name of the certificate the broker presents to a new handshake.
pub async fn served_cn(port: u16, ca: &str, identity: &(String, String)) -> String {
    let Some(der) = served_der(port, ca, identity).await else {
        return String::new();
    };
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    cn
}

/// The DER of the certificate the broker presents to a new handshake
/// verified against `ca` for 127.0.0.1; None if the handshake fails.
pub async fn served_der(port: u16, ca: &str, identity: &(String, String)) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(root.unwrap()).unwrap();
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(identity.0.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(identity.1.as_bytes()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    // A failed handshake (a pair caught mid-rotation) reads as nothing.
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .ok()?;
    Some(tls.get_ref().1.peer_certificates()?[0].as_ref().to_vec())
}
