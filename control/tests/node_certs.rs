//! Control nodes serve certificates from their own CA, and the bootstrap
//! certificate retires. Three real strait-control processes with
//! `--cert-ttl-control 1m` and a bootstrap serving certificate that expires
//! during the run:
//!
//! * each node ends up serving `spiffe://example.org/control/<id>` issued by
//!   the CA to a client that names the CA root in `certificate_authorities`
//!   (Raft's PeerTls, and straitctl whose `--ca` is the output of
//!   `straitctl ca bundle --with-server-ca`), renews it at half-life
//!   (distinct serials over time), and such a straitctl keeps working
//!   across the renewals;
//! * a client that holds only the bootstrap CA gets the bootstrap
//!   certificate while it is valid (and straitctl with it keeps working);
//! * once it has expired, everyone gets the CA-issued certificate: the
//!   bootstrap-only client fails, straitctl with the CA root and Raft go on;
//! * a node restarted after that comes back with a `control/<id>`
//!   certificate issued by `straitctl cert issue` as its `--tls-cert`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{free_port, BIN, CTL};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use strait_control_api::node_tls::PeerTls;
use strait_control_api::tls::{parse_certs, BundleSource};
use strait_control_client::live_tls::TlsSource;
use strait_control_client::TlsConfig;

const TD: &str = "example.org";
/// Lifetime of the nodes' bootstrap certificate: long enough for the
/// checks made while it is valid, short enough to expire in the run.
const BOOTSTRAP_LIFE: Duration = Duration::from_secs(100);

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Bootstrap CA, the nodes' bootstrap serving certificate (valid until
/// the returned unix time) and an admin.
fn write_bootstrap(dir: &Path) -> i64 {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let expiry = time::OffsetDateTime::now_utc() + BOOTSTRAP_LIFE;
    for (name, id, names, not_after) in [
        (
            "node",
            "spiffe://example.org/control/node",
            vec!["127.0.0.1".to_string()],
            Some(expiry),
        ),
        ("admin", "spiffe://example.org/admin/alice", vec![], None),
    ] {
        let mut p = CertificateParams::new(names).unwrap();
        p.subject_alt_names
            .push(SanType::URI(id.to_string().try_into().unwrap()));
        if let Some(t) = not_after {
            p.not_after = t;
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    expiry.unix_timestamp()
}

/// straitctl as the admin, verifying the nodes against the file `ca`.
fn ctl(dir: &Path, ca: &str, ep: &str, args: &[&str]) -> Output {
    ctl_within(dir, ca, ep, "10s", args)
}

/// [`ctl`] giving up after `timeout`.
fn ctl_within(dir: &Path, ca: &str, ep: &str, timeout: &str, args: &[&str]) -> Output {
    Command::new(CTL)
        .args(["--endpoints", ep, "--timeout", timeout])
        .arg("--ca")
        .arg(dir.join(ca))
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
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = strait_control_client::live_tls::connect(addr, name, config, Duration::from_secs(5))
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

/// `strait_control_served_certificates_total{certificate}` of a node.
fn served_count(metrics: &str, certificate: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(metrics).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let prefix =
        format!("strait_control_served_certificates_total{{certificate=\"{certificate}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |v| v.parse().unwrap())
}

/// A client that sends no `certificate_authorities`, trusting `roots`.
fn unhinted(roots: &[rustls::pki_types::CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth(),
    )
}

struct Node {
    addr: String,
    metrics: String,
}

fn spawn_node(dir: &Path, id: usize, node: &Node, peers: &str, cert: &Path, key: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("n{id}.log")))
        .unwrap();
    Command::new(BIN)
        .args(["--id", &id.to_string(), "--listen", &node.addr])
        .args(["--peers", peers, "--tick-ms", "20"])
        .args(["--metrics-listen", &node.metrics])
        .arg("--data-dir")
        .arg(dir.join(format!("d{id}")))
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
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
        .unwrap()
}

fn apply_kc(dir: &Path, ca: &str, ep: &str, port: u32) -> Output {
    let kc = dir.join(format!("kc-{port}.yaml"));
    std::fs::write(
        &kc,
        format!(
            "kind: KafkaCluster\nname: kc\nspec:\n  bootstrap_servers: [\"127.0.0.1:{port}\"]\n"
        ),
    )
    .unwrap();
    ctl(dir, ca, ep, &["apply", "-f", kc.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_serve_ca_certificates_and_the_bootstrap_one_retires() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let boot_expiry = write_bootstrap(&dir);
    let nodes: Vec<Node> = (0..3)
        .map(|_| Node {
            addr: format!("127.0.0.1:{}", free_port()),
            metrics: format!("127.0.0.1:{}", free_port()),
        })
        .collect();
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let (node_pem, node_key) = (dir.join("node.pem"), dir.join("node.key"));
    let mut procs = Kill(Vec::new());
    for (i, n) in nodes.iter().enumerate() {
        procs
            .0
            .push(spawn_node(&dir, i + 1, n, &peers, &node_pem, &node_key));
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
        let o = ctl(&dir, "ca.pem", &all, &["ca", "bundle"]);
        let pem = String::from_utf8_lossy(&o.stdout).to_string();
        if o.status.success() && pem.contains("BEGIN CERTIFICATE") {
            *bundle.lock().unwrap() = pem;
            break;
        }
        assert!(Instant::now() < deadline, "no CA bundle: {}", text(&o));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The operator's files: bootstrap root plus the CA's roots, and the
    // CA's roots alone (with which only a CA-issued certificate verifies).
    for (file, extra) in [
        ("roots.pem", Some("--with-server-ca")),
        ("ca-only.pem", None),
    ] {
        let out = dir.join(file);
        let mut args = vec!["ca", "bundle", "--out", out.to_str().unwrap()];
        args.extend(extra);
        let o = ctl(&dir, "ca.pem", &all, &args);
        assert!(o.status.success(), "{}", text(&o));
    }
    let boot_pem = std::fs::read(dir.join("ca.pem")).unwrap();
    let roots_pem = std::fs::read(dir.join("roots.pem")).unwrap();
    assert!(roots_pem.starts_with(&boot_pem), "bootstrap root first");
    let boot = parse_certs("ca", &boot_pem).unwrap();
    let both = parse_certs("roots", &roots_pem).unwrap();
    let (_, boot_cert) = x509_parser::parse_x509_certificate(boot[0].as_ref()).unwrap();
    let boot_subject = boot_cert.subject().as_raw().to_vec();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let src = bundle.clone();
    let source: BundleSource = Arc::new(move || src.lock().unwrap().clone());
    // Raft's client configuration.
    let hinted = PeerTls::new(provider.clone(), boot.clone(), Some(source), None).unwrap();
    // straitctl's: the control client's TLS from the --ca file.
    let ctl_tls = TlsSource::from_pem(&TlsConfig {
        ca_pem: roots_pem.clone(),
        ..Default::default()
    })
    .unwrap();
    // Clients that name nothing: one trusting the bootstrap CA only, one
    // trusting both.
    let plain = unhinted(&boot);
    let plain_both = unhinted(&both);

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
    }
    assert!(
        now_unix() + 10 < boot_expiry,
        "too slow to check the bootstrap certificate"
    );
    for (i, (a, n)) in addrs.iter().zip(&nodes).enumerate() {
        // straitctl's TLS with the bundle file gets the CA's certificate.
        let s = served_by(
            &handshake(ctl_tls.config(), a).await.unwrap(),
            &boot_subject,
        );
        assert!(!s.bootstrap, "{s:?}");
        assert_eq!(s.uri, format!("spiffe://example.org/control/{}", i + 1));
        // Clients naming nothing get (and verify) the bootstrap certificate.
        for config in [&plain, &plain_both] {
            let s = served_by(&handshake(config.clone(), a).await.unwrap(), &boot_subject);
            assert!(s.bootstrap, "{s:?}");
            assert_eq!(s.uri, "spiffe://example.org/control/node");
        }
        // straitctl itself, seen from the node: with the bundle file it
        // gets no bootstrap certificate (and with the CA's roots alone it
        // could verify nothing else); with the bootstrap CA it gets that
        // one, in exactly one handshake.
        let before = served_count(&n.metrics, "bootstrap");
        for ca in ["roots.pem", "ca-only.pem"] {
            let o = ctl(&dir, ca, a, &["get", "kafkacluster"]);
            assert!(o.status.success(), "--ca {ca}: {}", text(&o));
        }
        assert_eq!(served_count(&n.metrics, "bootstrap"), before);
        let o = ctl(&dir, "ca.pem", a, &["get", "kafkacluster"]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(served_count(&n.metrics, "bootstrap"), before + 1);
    }

    // A bounded run spanning two renewals (1-minute certificates renewed
    // at 30 s): applies through straitctl to every node in turn, with
    // each --ca file (the bootstrap CA alone only while its certificate
    // is valid), and handshakes per node, until each node has shown three
    // serials.
    let deadline = Instant::now() + Duration::from_secs(110);
    let mut applies = 0u32;
    let mut failures = Vec::new();
    let mut round = 0usize;
    while seen.values().map(BTreeSet::len).min().unwrap_or(0) < 3 {
        assert!(
            Instant::now() < deadline,
            "no two renewals in time: serials {seen:?}"
        );
        let files = ["roots.pem", "ca-only.pem", "ca.pem"];
        let ca = files[round % files.len()];
        round += 1;
        if ca == "ca.pem" && now_unix() + 5 >= boot_expiry {
            continue;
        }
        let target = &addrs[applies as usize % addrs.len()];
        let o = apply_kc(&dir, ca, target, 9000 + applies);
        applies += 1;
        if !o.status.success() {
            failures.push(format!("--ca {ca}: {}", text(&o)));
        }
        for (i, a) in addrs.iter().enumerate() {
            for config in [hinted.config(), ctl_tls.config()] {
                let s = served_by(&handshake(config, a).await.unwrap(), &boot_subject);
                assert!(
                    !s.bootstrap,
                    "node {} fell back to the bootstrap certificate",
                    i + 1
                );
                assert_eq!(s.uri, format!("spiffe://example.org/control/{}", i + 1));
                seen.entry(i).or_default().insert(s.serial);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        failures.is_empty(),
        "{} of {applies} applies failed: {failures:?}",
        failures.len()
    );
    assert!(applies > 50, "only {applies} applies");
    // Each node's certificates are recorded through Raft like any other.
    let o = ctl(
        &dir,
        "roots.pem",
        &all,
        &["get", "issuedcertificate", "-o", "json"],
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    for i in 1..=3 {
        assert!(
            out.contains(&format!("spiffe://example.org/control/{i}")),
            "{out}"
        );
    }

    // The bootstrap certificate expires.
    while now_unix() <= boot_expiry {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, (a, n)) in addrs.iter().zip(&nodes).enumerate() {
        let before = served_count(&n.metrics, "bootstrap");
        // Nobody can verify it any more, so nobody gets it: a client
        // naming nothing but trusting the CA root verifies the CA's...
        let s = served_by(
            &handshake(plain_both.clone(), a).await.unwrap(),
            &boot_subject,
        );
        assert!(!s.bootstrap, "{s:?}");
        assert_eq!(s.uri, format!("spiffe://example.org/control/{}", i + 1));
        // ... and one with the bootstrap CA alone is refused.
        assert_eq!(
            handshake(plain.clone(), a).await.unwrap_err(),
            "invalid peer certificate: UnknownIssuer"
        );
        let o = ctl_within(&dir, "ca.pem", a, "1s", &["get", "kafkacluster"]);
        assert!(!o.status.success(), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("UnknownIssuer"),
            "{}",
            text(&o)
        );
        assert_eq!(served_count(&n.metrics, "bootstrap"), before);
        let log = std::fs::read_to_string(dir.join(format!("n{}.log", i + 1))).unwrap();
        assert!(
            log.contains("the bootstrap certificate (--tls-cert) has expired"),
            "node {} did not say so",
            i + 1
        );
    }
    // straitctl with the CA root and Raft go on: a write through each
    // node, read back from every node.
    for (i, a) in addrs.iter().enumerate() {
        let port = 10_000 + i as u32;
        let o = apply_kc(&dir, "roots.pem", a, port);
        assert!(o.status.success(), "{}", text(&o));
        for b in &addrs {
            let o = ctl(
                &dir,
                "ca-only.pem",
                b,
                &["get", "kafkacluster", "kc", "-o", "json"],
            );
            assert!(
                String::from_utf8_lossy(&o.stdout).contains(&format!("127.0.0.1:{port}")),
                "{}",
                text(&o)
            );
        }
    }

    // A node restarted now starts from its --tls-cert: the expired
    // bootstrap file would cut it off, so it gets a control/<id>
    // certificate from the CA (`straitctl cert issue`), comes back and
    // then renews its own.
    let _ = procs.0[2].kill();
    let _ = procs.0[2].wait();
    let issued = dir.join("n3-cert");
    let o = ctl(
        &dir,
        "roots.pem",
        &addrs[0],
        &[
            "cert",
            "issue",
            "--spiffe-id",
            "spiffe://example.org/control/3",
            "--ip",
            "127.0.0.1",
            // At most --cert-ttl-control; it only has to last until the
            // node has its own.
            "--ttl",
            "1m",
            "--out",
            issued.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let file_serial = {
        let pem = std::fs::read(issued.join("cert.pem")).unwrap();
        served_by(
            parse_certs("cert", &pem).unwrap()[0].as_ref(),
            &boot_subject,
        )
        .serial
    };
    let restart: PathBuf = issued.join("cert.pem");
    procs.0[2] = spawn_node(
        &dir,
        3,
        &nodes[2],
        &peers,
        &restart,
        &issued.join("key.pem"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(leaf) = handshake(hinted.config(), &addrs[2]).await {
            let s = served_by(&leaf, &boot_subject);
            assert!(!s.bootstrap, "{s:?}");
            assert_eq!(s.uri, "spiffe://example.org/control/3");
            if s.serial != file_serial {
                assert!(!seen[&2].contains(&s.serial), "{s:?}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node never got its own certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let o = apply_kc(&dir, "roots.pem", &addrs[2], 11_000);
    assert!(o.status.success(), "{}", text(&o));
    let o = ctl(
        &dir,
        "roots.pem",
        &all,
        &["get", "kafkacluster", "kc", "-o", "json"],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("127.0.0.1:11000"),
        "{}",
        text(&o)
    );
}
