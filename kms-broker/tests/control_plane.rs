//! A real strait-kms-broker following a real strait-control: trust bundles
//! and deny lists from the control plane, trust domains bound to bundles,
//! serving on with the control plane stopped (and after a restart, from the
//! cache), the serving certificate swapped live.
//!
//! Needs the strait-control binary next to strait-kms-broker (`cargo build
//! -p strait-control --bins`) or at `$STRAIT_CONTROL_BIN`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{free_port, wait_until, Proc};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use strait_control_client::{ClientConfig, ControlClient, TlsConfig};
use strait_proto::control as cpb;
use strait_proto::kms as pb;
use strait_proto::kms::kms_broker_client::KmsBrokerClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(20);

fn control_bin() -> PathBuf {
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

struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Ca(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
    }

    fn pem(&self) -> String {
        self.0.pem()
    }

    /// (cert PEM, key PEM) with DNS/IP `sans` and the SPIFFE ID `id`.
    fn leaf(&self, sans: &[&str], id: Option<&str>, cn: &str) -> (String, String) {
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

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn write_pair(dir: &Path, name: &str, pair: &(String, String)) {
    write(dir, &format!("{name}.pem"), &pair.0);
    write(dir, &format!("{name}.key"), &pair.1);
}

/// One control node; `tls`: the node's files in `dir` (node.pem, ca.pem).
fn start_control(dir: &Path, tls: bool) -> (Proc, String) {
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
    let log = std::fs::File::create(dir.join("control.log")).unwrap();
    let child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    (Proc(child), addr)
}

fn admin_client(dir: &Path, addr: &str, tls: bool) -> ControlClient {
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

async fn apply(c: &ControlClient, kind: &str, name: &str, spec: serde_json::Value) {
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

struct Broker {
    proc: Proc,
    url: String,
    log: PathBuf,
}

fn broker_config(dir: &Path, port: u16, client_ca: bool) -> PathBuf {
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

fn spawn_broker(dir: &Path, args: &[String], log_name: &str) -> Child {
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

async fn start_broker(dir: &Path, port: u16, args: &[String], log_name: &str) -> Broker {
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
fn client(url: &str, ca: &str, identity: &(String, String)) -> KmsBrokerClient<Channel> {
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

async fn resolve(c: &mut KmsBrokerClient<Channel>) -> Result<String, tonic::Status> {
    c.resolve_alias(pb::ResolveAliasRequest {
        kms: String::new(),
        alias: "kek-a".into(),
    })
    .await
    .map(|r| r.into_inner().kek.unwrap().key_id)
}

async fn call(url: &str, ca: &str, identity: &(String, String)) -> Result<String, tonic::Status> {
    resolve(&mut client(url, ca, identity)).await
}

async fn log_contains(path: &Path, want: &str) {
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

fn id(name: &str) -> String {
    format!("spiffe://example.org/{name}")
}

#[tokio::test]
async fn follows_a_plaintext_control_plane_and_keeps_serving_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let home = Ca::new("example.org CA");
    let other = Ca::new("other.org CA");
    write(dir, "ca.pem", &home.pem());
    write_pair(
        dir,
        "server",
        &home.leaf(
            &["127.0.0.1", "localhost"],
            Some(&id("kms-broker/k1")),
            "k1",
        ),
    );
    let e1 = home.leaf(&[], Some(&id("edge/e1")), "e1");
    let e2 = home.leaf(&[], Some(&id("edge/e2")), "e2");
    let workload = home.leaf(&[], Some(&id("ns/shop/sa/orders")), "orders");
    // CA X claiming an ID of domain Y.
    let impostor = other.leaf(&[], Some(&id("edge/e1")), "impostor");
    let foreign = other.leaf(&[], Some("spiffe://other.org/edge/x"), "x");
    let no_spiffe = home.leaf(&["edge-1.test"], None, "plain");

    let (mut control, addr) = start_control(dir, false);
    let admin = admin_client(dir, &addr, false);
    let port = free_port();
    broker_config(dir, port, false);
    let args: Vec<String> = ["--control", &addr, "--name", "k1", "--insecure-plaintext"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let broker = start_broker(dir, port, &args, "broker.log").await;
    log_contains(&broker.log, "following the control plane WITHOUT TLS").await;
    let ca = home.pem();

    // No bundle yet: nobody chains to anything, fail closed.
    assert!(call(&broker.url, &ca, &e1).await.is_err());
    log_contains(
        &broker.log,
        "trust domain 'example.org' has no client trust bundle",
    )
    .await;

    apply(
        &admin,
        "TrustBundle",
        "home",
        serde_json::json!({"trust_domain": "example.org", "pem": home.pem()}),
    )
    .await;
    apply(
        &admin,
        "TrustBundle",
        "partner",
        serde_json::json!({"trust_domain": "other.org", "pem": other.pem()}),
    )
    .await;
    wait_until("e1 to be served", DEADLINE, || {
        let (url, ca, e1) = (broker.url.clone(), ca.clone(), e1.clone());
        async move { call(&url, &ca, &e1).await.is_ok() }
    })
    .await;
    assert_eq!(call(&broker.url, &ca, &e1).await.unwrap(), "kek-a");
    // The two TrustBundles may arrive in separate watch events: wait until
    // other.org's is in force too (its callers pass the handshake).
    wait_until("the other.org bundle", DEADLINE, || {
        let (url, ca, foreign) = (broker.url.clone(), ca.clone(), foreign.clone());
        async move { call(&url, &ca, &foreign).await.err().map(|e| e.code()) != Some(Code::Unknown) }
    })
    .await;

    // other.org's CA vouches for other.org only.
    let err = call(&broker.url, &ca, &impostor).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    log_contains(
        &broker.log,
        "client certificate names spiffe://example.org/edge/e1, but does not chain to the trust bundle of 'example.org'",
    )
    .await;
    // A verified identity outside the callers: PERMISSION_DENIED, named.
    let err = call(&broker.url, &ca, &foreign).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "spiffe://other.org/edge/x may not KmsBroker/ResolveAlias (not in the broker's callers)"
    );
    let err = call(&broker.url, &ca, &workload).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "spiffe://example.org/ns/shop/sa/orders may not KmsBroker/ResolveAlias (not in the broker's callers)"
    );
    assert!(call(&broker.url, &ca, &no_spiffe).await.is_err());
    log_contains(&broker.log, "client certificate has no SPIFFE ID").await;
    log_contains(&broker.log, "kms-broker call refused").await;

    // Deny list: applies to an open connection on its next request.
    let mut open_e1 = client(&broker.url, &ca, &e1);
    assert_eq!(resolve(&mut open_e1).await.unwrap(), "kek-a");
    apply(
        &admin,
        "DenyList",
        "leak",
        serde_json::json!({"spiffe_ids": [id("edge/e1")], "reason": "key leaked"}),
    )
    .await;
    let want = "spiffe://example.org/edge/e1 may not KmsBroker/ResolveAlias (deny-listed by DenyList/leak: key leaked)";
    wait_until("e1 to be refused", DEADLINE, || {
        let mut c = open_e1.clone();
        async move {
            matches!(resolve(&mut c).await, Err(s) if s.code() == Code::PermissionDenied && s.message() == want)
        }
    })
    .await;
    assert_eq!(call(&broker.url, &ca, &e2).await.unwrap(), "kek-a");

    // Control plane gone: the broker serves on with what it knows.
    control.stop();
    let mut open_e2 = client(&broker.url, &ca, &e2);
    for _ in 0..3 {
        assert_eq!(resolve(&mut open_e2).await.unwrap(), "kek-a");
        assert_eq!(call(&broker.url, &ca, &e2).await.unwrap(), "kek-a");
        assert_eq!(
            call(&broker.url, &ca, &e1).await.unwrap_err().message(),
            want
        );
    }
    // Restarted with the control plane still down: trust and deny list from the cache.
    drop(broker);
    let broker = start_broker(dir, port, &args, "broker2.log").await;
    log_contains(&broker.log, "source=Cache").await;
    assert_eq!(call(&broker.url, &ca, &e2).await.unwrap(), "kek-a");
    assert_eq!(
        call(&broker.url, &ca, &e1).await.unwrap_err().message(),
        want
    );
    drop(broker.proc);
}

#[tokio::test]
async fn follows_an_mtls_control_plane_and_swaps_its_serving_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let home = Ca::new("example.org CA");
    write(dir, "ca.pem", &home.pem());
    write_pair(
        dir,
        "node",
        &home.leaf(&["127.0.0.1", "localhost"], Some(&id("control/1")), "node"),
    );
    write_pair(dir, "admin", &home.leaf(&[], Some(&id("admin/ops")), "ops"));
    write_pair(dir, "k1", &home.leaf(&[], Some(&id("kms-broker/k1")), "k1"));
    write_pair(dir, "k2", &home.leaf(&[], Some(&id("kms-broker/k2")), "k2"));
    let first = home.leaf(
        &["127.0.0.1", "localhost"],
        Some(&id("kms-broker/k1")),
        "first",
    );
    write_pair(dir, "server", &first);
    let e1 = home.leaf(&[], Some(&id("edge/e1")), "e1");
    let e2 = home.leaf(&[], Some(&id("edge/e2")), "e2");

    let (_control, addr) = start_control(dir, true);
    let admin = admin_client(dir, &addr, true);
    let port = free_port();
    broker_config(dir, port, true);
    let tls_args = |name: &str| -> Vec<String> {
        vec![
            "--control".into(),
            addr.clone(),
            "--name".into(),
            "k1".into(),
            "--control-ca".into(),
            dir.join("ca.pem").display().to_string(),
            "--control-cert".into(),
            dir.join(format!("{name}.pem")).display().to_string(),
            "--control-key".into(),
            dir.join(format!("{name}.key")).display().to_string(),
        ]
    };
    // A client certificate naming another broker is refused before anything starts.
    let out = Command::new(env!("CARGO_BIN_EXE_strait-kms-broker"))
        .arg("--config")
        .arg(dir.join("broker.yaml"))
        .args(tls_args("k2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("names spiffe://example.org/kms-broker/k2, but this broker is spiffe://example.org/kms-broker/k1"),
        "{stderr}"
    );
    // Plaintext towards a non-loopback address is refused too.
    let out = Command::new(env!("CARGO_BIN_EXE_strait-kms-broker"))
        .arg("--config")
        .arg(dir.join("broker.yaml"))
        .args([
            "--control",
            "10.0.0.1:7000",
            "--name",
            "k1",
            "--insecure-plaintext",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not loopback: 10.0.0.1:7000"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut args = tls_args("k1");
    args.extend(["--heartbeat-interval".to_string(), "200ms".to_string()]);
    let broker = start_broker(dir, port, &args, "broker.log").await;
    let ca = home.pem();
    assert_eq!(call(&broker.url, &ca, &e1).await.unwrap(), "kek-a");
    // Its heartbeat: the KmsBroker resource it created, with its status.
    wait_until("the broker's heartbeat", DEADLINE, || {
        let admin = admin.clone();
        async move {
            let Ok(r) = admin.get("KmsBroker", "k1").await else {
                return false;
            };
            let st: serde_json::Value = serde_json::from_str(&r.status_json).unwrap_or_default();
            st["last_heartbeat_unix_ms"].as_u64().unwrap_or(0) > 0
                && st["config_source"] == "control_plane"
                && st["trust_domains"] == serde_json::json!(["example.org"])
        }
    })
    .await;
    // The deny list arrives over the mTLS watch.
    apply(
        &admin,
        "DenyList",
        "leak",
        serde_json::json!({"spiffe_ids": [id("edge/e1")]}),
    )
    .await;
    wait_until("e1 to be refused", DEADLINE, || {
        let (url, ca, e1) = (broker.url.clone(), ca.clone(), e1.clone());
        async move {
            matches!(call(&url, &ca, &e1).await, Err(s) if s.code() == Code::PermissionDenied
                && s.message() == "spiffe://example.org/edge/e1 may not KmsBroker/ResolveAlias (deny-listed by DenyList/leak)")
        }
    })
    .await;

    // Serving certificate replaced on disk: the next handshake presents it,
    // an open connection keeps working.
    let mut open = client(&broker.url, &ca, &e2);
    assert_eq!(resolve(&mut open).await.unwrap(), "kek-a");
    assert_eq!(served_cn(port, &ca, &e2).await, "first");
    let second = home.leaf(
        &["127.0.0.1", "localhost"],
        Some(&id("kms-broker/k1")),
        "second",
    );
    // The key first, then the certificate: the poller may see a mismatched
    // pair in between, which it must reject and then pick up the good one.
    write(dir, "server.key", &second.1);
    write(dir, "server.pem", &second.0);
    wait_until("the new certificate to be served", DEADLINE, || async {
        served_cn(port, &ca, &e2).await == "second"
    })
    .await;
    assert_eq!(resolve(&mut open).await.unwrap(), "kek-a");
    assert_eq!(call(&broker.url, &ca, &e2).await.unwrap(), "kek-a");
    log_contains(&broker.log, "certificate reloaded; new handshakes use it").await;
}

/// The common name of the certificate the broker presents to a new handshake.
async fn served_cn(port: u16, ca: &str, identity: &(String, String)) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
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
    // A failed handshake (a pair caught mid-rotation) reads as no name.
    let Ok(tls) = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
    else {
        return String::new();
    };
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    cn
}
