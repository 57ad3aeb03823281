//! Control nodes serve certificates from their own CA: three real
//! strait-control processes with `--cert-ttl-control 1m` each end up
//! serving `spiffe://example.org/control/<id>` issued by the CA (to a
//! client that names the CA root in `certificate_authorities`), renew it at
//! half-life (distinct serials over time), and straitctl (which holds only
//! the bootstrap CA) and Raft keep working across the renewals.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, BIN, CTL};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use strait_control_api::node_tls::PeerTls;
use strait_control_api::tls::{parse_certs, BundleSource};

const TD: &str = "example.org";

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Bootstrap CA, the nodes' bootstrap serving certificate and an admin.
fn write_bootstrap(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, id, names) in [
        (
            "node",
            "spiffe://example.org/control/node",
            vec!["127.0.0.1".to_string()],
        ),
        ("admin", "spiffe://example.org/admin/alice", vec![]),
    ] {
        let mut p = CertificateParams::new(names).unwrap();
        p.subject_alt_names
            .push(SanType::URI(id.to_string().try_into().unwrap()));
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

fn ctl(dir: &Path, ep: &str, args: &[&str]) -> Output {
    Command::new(CTL)
        .args(["--endpoints", ep, "--timeout", "10s"])
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join("admin.pem"))
        .arg("--key")
        .arg(dir.join("admin.key"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// What a node presented: (URI SAN, serial hex, issued by the bootstrap CA).
#[derive(Debug, Clone, PartialEq)]
struct Served {
    uri: String,
    serial: String,
    bootstrap: bool,
}

fn served_by(leaf: &[u8], bootstrap_subject: &[u8]) -> Served {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let uri = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .find_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    Served {
        uri,
        serial: cert.raw_serial_as_string(),
        bootstrap: cert.issuer().as_raw() == bootstrap_subject,
    }
}

/// One TLS handshake to `addr` with `config`; the leaf it was shown.
async fn handshake(config: Arc<rustls::ClientConfig>, addr: &str) -> Result<Vec<u8>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    Ok(conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no certificate")?
        .as_ref()
        .to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_serve_and_renew_ca_issued_certificates() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    write_bootstrap(&dir);
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Kill(Vec::new());
    for (i, a) in addrs.iter().enumerate() {
        let log = std::fs::File::create(dir.join(format!("n{}.log", i + 1))).unwrap();
        procs.0.push(
            Command::new(BIN)
                .args(["--id", &(i + 1).to_string(), "--listen", a])
                .args(["--peers", &peers, "--tick-ms", "20"])
                .arg("--data-dir")
                .arg(dir.join(format!("d{}", i + 1)))
                .arg("--tls-cert")
                .arg(dir.join("node.pem"))
                .arg("--tls-key")
                .arg(dir.join("node.key"))
                .arg("--tls-client-ca")
                .arg(dir.join("ca.pem"))
                .args(["--trust-domain", TD])
                .arg("--ca-seal-key-file")
                .arg(dir.join("seal.key"))
                .args(["--admin-identity", "spiffe://example.org/admin/*"])
                .args(["--cert-ttl-control", "1m"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        // The first node creates the seal key file; the others share it.
        if i == 0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !dir.join("seal.key").exists() {
                assert!(Instant::now() < deadline, "no seal key file");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let all = addrs.join(",");

    // The roots a client that holds the bundle trusts: bootstrap CA plus
    // what `straitctl ca bundle` prints (fetched over the bootstrap CA).
    let bundle = Arc::new(Mutex::new(String::new()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = ctl(&dir, &all, &["ca", "bundle"]);
        let pem = String::from_utf8_lossy(&o.stdout).to_string();
        if o.status.success() && pem.contains("BEGIN CERTIFICATE") {
            *bundle.lock().unwrap() = pem;
            break;
        }
        assert!(Instant::now() < deadline, "no CA bundle: {}", text(&o));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let boot_pem = std::fs::read(dir.join("ca.pem")).unwrap();
    let boot = parse_certs("ca", &boot_pem).unwrap();
    let (_, boot_cert) = x509_parser::parse_x509_certificate(boot[0].as_ref()).unwrap();
    let boot_subject = boot_cert.subject().as_raw().to_vec();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let src = bundle.clone();
    let source: BundleSource = Arc::new(move || src.lock().unwrap().clone());
    let hinted = PeerTls::new(provider.clone(), boot.clone(), Some(source), None);
    // A client that trusts only the bootstrap CA (and names nothing).
    let mut plain_roots = rustls::RootCertStore::empty();
    plain_roots.add(boot[0].clone()).unwrap();
    let plain = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(plain_roots)
            .with_no_client_auth(),
    );

    // Every node ends up serving its CA-issued certificate.
    let mut seen: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, a) in addrs.iter().enumerate() {
        loop {
            let s = served_by(&handshake(hinted.config(), a).await.unwrap(), &boot_subject);
            if !s.bootstrap {
                assert_eq!(s.uri, format!("spiffe://example.org/control/{}", i + 1));
                seen.entry(i).or_default().insert(s.serial);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never served a CA certificate",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A client that holds only the bootstrap CA still gets (and
        // verifies) the bootstrap certificate.
        let s = served_by(&handshake(plain.clone(), a).await.unwrap(), &boot_subject);
        assert!(s.bootstrap, "{s:?}");
        assert_eq!(s.uri, "spiffe://example.org/control/node");
    }

    // A bounded run spanning two renewals (1-minute certificates renewed
    // at 30 s): applies through straitctl to every node in turn, and a
    // handshake per node, until each node has shown three serials.
    let kc = dir.join("kc.yaml");
    let deadline = Instant::now() + Duration::from_secs(110);
    let mut applies = 0u32;
    let mut failures = Vec::new();
    while seen.values().map(BTreeSet::len).min().unwrap_or(0) < 3 {
        assert!(
            Instant::now() < deadline,
            "no two renewals in time: serials {seen:?}"
        );
        let target = &addrs[applies as usize % addrs.len()];
        std::fs::write(
            &kc,
            format!(
                "kind: KafkaCluster\nname: kc\nspec:\n  bootstrap_servers: [\"127.0.0.1:{}\"]\n",
                9000 + applies
            ),
        )
        .unwrap();
        let o = ctl(&dir, target, &["apply", "-f", kc.to_str().unwrap()]);
        applies += 1;
        if !o.status.success() {
            failures.push(text(&o));
        }
        for (i, a) in addrs.iter().enumerate() {
            let s = served_by(&handshake(hinted.config(), a).await.unwrap(), &boot_subject);
            assert!(
                !s.bootstrap,
                "node {} fell back to the bootstrap certificate",
                i + 1
            );
            assert_eq!(s.uri, format!("spiffe://example.org/control/{}", i + 1));
            seen.entry(i).or_default().insert(s.serial);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        failures.is_empty(),
        "{} of {applies} applies failed: {failures:?}",
        failures.len()
    );
    assert!(applies > 50, "only {applies} applies");
    // The last value written is the one every node reads.
    let o = ctl(&dir, &all, &["get", "kafkacluster", "kc", "-o", "json"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("127.0.0.1:{}", 9000 + applies - 1)),
        "{}",
        text(&o)
    );
    // Each node's certificates are recorded through Raft like any other.
    let o = ctl(&dir, &all, &["get", "issuedcertificate", "-o", "json"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    for i in 1..=3 {
        assert!(
            out.contains(&format!("spiffe://example.org/control/{i}")),
            "{out}"
        );
    }
}
