//! A real strait-kms-broker with its own identity from a real strait-control
//! (the mesh CA, `--ca-seal-key-file`): it joins with a token from
//! `straitctl token create`, serves its SVID (`spiffe://example.org/kms-broker/k1`,
//! issued by the CA's root, with the listen IP), follows the control plane
//! and heartbeats over it, renews it at half-life (1-minute certificates),
//! rejoins from its cache after a restart with the spent token, and a second
//! broker with the spent token and no cache is refused. An edge identity
//! (an SVID joined in process, as strait-edge does) reaches the broker with
//! `identity: svid` and no `ca`; a CA-issued certificate that is not a
//! kms-broker identity is refused by that client, and without an SVID the
//! entry is refused at build time.
//!
//! Needs strait-control and straitctl next to strait-kms-broker (`cargo
//! build -p strait-control --bins`).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::control::*;
use common::{free_port, http, wait_until};
use prometheus_client::metrics::gauge::Gauge;
use strait_control_client::identity::SvidRequest;
use strait_control_client::svid::{self, Role, SvidCache, SvidOptions};
use strait_kms_broker::client::{OwnIdentity, NO_SVID};
use strait_kms_broker::kms::{build_kms, build_kms_with, Kms};
use strait_kms_core::config::{BrokerClientConfig, IdentitySource, KmsConfig};
use x509_parser::extensions::GeneralName;

/// A 1-minute certificate renews at ~30 s; leave room for a slow machine.
const RENEWAL_DEADLINE: Duration = Duration::from_secs(90);
const BROKER_ID: &str = "spiffe://example.org/kms-broker/k1";

/// straitctl as the admin `spiffe://example.org/admin/ops`.
async fn straitctl(dir: &Path, addr: &str, args: &[&str]) -> Output {
    let bin = control_bin().with_file_name("straitctl");
    let mut cmd = Command::new(&bin);
    cmd.args(["--endpoints", addr])
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join("admin.pem"))
        .arg("--key")
        .arg(dir.join("admin.key"))
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// Runs straitctl until it succeeds (the CA's first root is created by the
/// leader shortly after start); its stdout.
async fn ctl_ok(dir: &Path, addr: &str, args: &[&str]) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = straitctl(dir, addr, args).await;
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).to_string();
        }
        assert!(
            Instant::now() < deadline,
            "straitctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn token(dir: &Path, addr: &str, pattern: &str) -> String {
    let out = ctl_ok(
        dir,
        addr,
        &[
            "token",
            "create",
            "--spiffe-id",
            pattern,
            "--ttl",
            "10m",
            "--uses",
            "1",
        ],
    )
    .await;
    out.lines().next().unwrap().trim().to_string()
}

/// `straitctl cert issue` into `dir/<name>/`: (cert, key) and the bundle.
async fn issue(dir: &Path, addr: &str, name: &str, args: &[&str]) -> ((String, String), String) {
    let out = dir.join(name);
    let out_s = out.display().to_string();
    let mut all = vec!["cert", "issue", "--ttl", "10m", "--out", &out_s];
    all.extend_from_slice(args);
    ctl_ok(dir, addr, &all).await;
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    ((read("cert.pem"), read("key.pem")), read("bundle.pem"))
}

fn svid_broker_config(dir: &Path, port: u16, metrics: u16) {
    write(
        dir,
        "keys.json",
        r#"{"keys":{"kek-a":["AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="]}}"#,
    );
    write(
        dir,
        "broker.yaml",
        &format!(
            r#"
listen: "127.0.0.1:{port}"
trust_domain: example.org
metrics_listen: "127.0.0.1:{metrics}"
tls: {{ identity: svid }}
kms:
  - name: dev
    local: {{ path: keys.json }}
"#
        ),
    );
}

/// What a served certificate says.
struct Served {
    uris: Vec<String>,
    dns: Vec<String>,
    ips: Vec<String>,
    serial: String,
    issuer: Vec<u8>,
    lifetime: i64,
}

fn describe(der: &[u8]) -> Served {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let (mut uris, mut dns, mut ips) = (Vec::new(), Vec::new(), Vec::new());
    for n in &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
    {
        match n {
            GeneralName::URI(u) => uris.push(u.to_string()),
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            GeneralName::IPAddress(b) if b.len() == 4 => {
                ips.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string())
            }
            _ => {}
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    Served {
        uris,
        dns,
        ips,
        serial: cert.raw_serial_as_string(),
        issuer: cert.issuer().as_raw().to_vec(),
        lifetime: cert.validity().not_after.timestamp() - now,
    }
}

/// Raw subjects of every root in a PEM bundle.
fn root_subjects(bundle: &str) -> Vec<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(bundle.as_bytes())
        .map(|c| {
            let c = c.unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(c.as_ref()).unwrap();
            cert.subject().as_raw().to_vec()
        })
        .collect()
}

async fn metric(addr: &str, name: &str) -> Option<i64> {
    let (_, body) = http(addr, "GET", "/metrics", "", "").await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

fn mesh_broker(name: &str, port: u16) -> KmsConfig {
    KmsConfig {
        name: name.into(),
        vault: None,
        aws_kms: None,
        local: None,
        broker: Some(BrokerClientConfig {
            endpoints: vec![format!("https://127.0.0.1:{port}")],
            ca: None,
            identity: Some(IdentitySource::Svid),
            cert: None,
            key: None,
            backend: None,
            server_name: None,
        }),
        retry: strait_kms_core::RetryPolicy {
            attempts: 1,
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        },
    }
}

/// An edge's SVID joined in this process, as strait-edge does with --join-token.
async fn edge_identity(dir: &Path, addr: &str) -> OwnIdentity {
    let token = token(dir, addr, "spiffe://example.org/edge/e2").await;
    let (_, names) = tokio::sync::watch::channel(SvidRequest::default());
    let running = svid::start(
        SvidOptions {
            endpoints: vec![addr.to_string()],
            role: Role::Edge,
            name: "e2".into(),
            token: Some(token),
            cache: SvidCache::new(&dir.join("edge-cache"), Role::Edge),
            timeout: Duration::from_secs(10),
        },
        names,
        Gauge::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        running.state.borrow().spiffe_id,
        "spiffe://example.org/edge/e2"
    );
    // The credential receiver keeps the renewal task running.
    let trust_domain = running.state.borrow().trust_domain().to_string();
    OwnIdentity {
        credentials: running.credentials,
        bundle: running.bundle,
        trust_domain,
    }
}

/// Waits for `child` to exit (it must, within the deadline); its log.
fn exited_with_failure(mut child: std::process::Child, log: &Path) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success());
            return std::fs::read_to_string(log).unwrap();
        }
        assert!(Instant::now() < deadline, "the broker did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_broker_joins_with_a_token_serves_renews_and_rejoins_with_its_svid() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let bootstrap = Ca::new("bootstrap CA");
    write(dir, "ca.pem", &bootstrap.pem());
    write_pair(
        dir,
        "node",
        &bootstrap.leaf(&["127.0.0.1", "localhost"], Some(&id("control/1")), "node"),
    );
    write_pair(
        dir,
        "admin",
        &bootstrap.leaf(&[], Some(&id("admin/ops")), "ops"),
    );
    let seal = dir.join("seal.key").display().to_string();
    let (_control, addr) = start_control_with(
        dir,
        true,
        &["--ca-seal-key-file", &seal, "--cert-ttl-kms-broker", "1m"],
    );
    let admin = admin_client(dir, &addr, true);
    let token = token(dir, &addr, BROKER_ID).await;
    let (e1, bundle) = issue(dir, &addr, "e1", &["--spiffe-id", &id("edge/e1")]).await;

    let (port, metrics_port) = (free_port(), free_port());
    svid_broker_config(dir, port, metrics_port);
    let args: Vec<String> = [
        "--control",
        &addr,
        "--name",
        "k1",
        "--join-token",
        &token,
        "--svid-dns",
        "kms.example.org",
        "--svid-ttl",
        "1m",
        "--heartbeat-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let broker = start_broker(dir, port, &args, "broker.log").await;
    log_contains(&broker.log, "joined the control plane with the join token").await;

    // It serves its SVID, issued by the CA's root, naming what callers dial.
    let der = served_der(port, &bundle, &e1)
        .await
        .expect("the broker's certificate verifies against the CA bundle for 127.0.0.1");
    let first = describe(&der);
    assert_eq!(first.uris, [BROKER_ID]);
    assert_eq!(first.dns, ["kms.example.org"]);
    assert_eq!(first.ips, ["127.0.0.1"]);
    assert!(root_subjects(&bundle).contains(&first.issuer));
    assert_ne!(
        first.issuer,
        root_subjects(&bootstrap.pem())[0],
        "issued by the mesh CA, not the bootstrap CA"
    );
    assert!(
        first.lifetime > 0 && first.lifetime <= 60,
        "{}",
        first.lifetime
    );
    // An edge the CA issued is a caller (the CA's TrustBundle, followed
    // over the SVID-authenticated watch).
    wait_until("e1 to be served", DEADLINE, || {
        let (url, bundle, e1) = (broker.url.clone(), bundle.clone(), e1.clone());
        async move { call(&url, &bundle, &e1).await.is_ok_and(|k| k == "kek-a") }
    })
    .await;
    #[cfg(unix)]
    for name in ["cert.pem", "key.pem", "bundle.pem", "server-ca.pem"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("cache/svid").join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let left = metric(&metrics_addr, "strait_svid_expiry_seconds").await;
    assert!(left.is_some_and(|s| s > 0 && s <= 60), "{left:?}");
    // The heartbeat goes out on the SVID.
    wait_until("the broker's heartbeat", DEADLINE, || {
        let admin = admin.clone();
        async move {
            let Ok(r) = admin.get("KmsBroker", "k1").await else {
                return false;
            };
            let st: serde_json::Value = serde_json::from_str(&r.status_json).unwrap_or_default();
            st["last_heartbeat_unix_ms"].as_u64().unwrap_or(0) > 0
                && st["config_source"] == "control_plane"
                && st.get("message").is_none()
        }
    })
    .await;

    // An edge's own SVID reaches the broker with identity: svid and no ca.
    let edge = edge_identity(dir, &addr).await;
    let kms = build_kms_with(&mesh_broker("mesh", port), None, Some(&edge))
        .await
        .unwrap();
    assert_eq!(kms.resolve_alias("kek-a").await.unwrap().key_id, "kek-a");
    // Fail closed: no SVID, no client.
    let err = build_kms(&mesh_broker("mesh", port), None)
        .await
        .err()
        .expect("identity: svid without an SVID is refused");
    assert_eq!(
        err.to_string(),
        format!("invalid KMS request or response: kms mesh: {NO_SVID}")
    );
    // A certificate the CA issued for the same address, but not to a
    // kms-broker, does not pass for the broker.
    let (impostor, _) = issue(
        dir,
        &addr,
        "impostor",
        &[
            "--spiffe-id",
            "spiffe://example.org/ns/shop/sa/orders",
            "--ip",
            "127.0.0.1",
        ],
    )
    .await;
    let fake_port = free_port();
    write_pair(dir, "fake", &impostor);
    write(dir, "ca-bundle.pem", &bundle);
    let fake_dir = dir.join("fake");
    std::fs::create_dir_all(&fake_dir).unwrap();
    write(
        &fake_dir,
        "broker.yaml",
        &format!(
            "listen: \"127.0.0.1:{fake_port}\"\ntrust_domain: example.org\ntls: {{ cert: ../fake.pem, key: ../fake.key, client_ca: ../ca-bundle.pem }}\nkms:\n  - name: dev\n    local: {{ path: ../keys.json }}\n"
        ),
    );
    let fake = start_broker(&fake_dir, fake_port, &[], "fake.log").await;
    let kms = build_kms_with(&mesh_broker("mesh", fake_port), None, Some(&edge))
        .await
        .unwrap();
    let err = kms.resolve_alias("kek-a").await.unwrap_err().to_string();
    assert!(
        err.contains("the broker's certificate names spiffe://example.org/ns/shop/sa/orders, not a spiffe://example.org/kms-broker/<name> identity"),
        "{err}"
    );
    drop(fake);

    // Renewed at half-life: a new handshake sees a new serial.
    let deadline = Instant::now() + RENEWAL_DEADLINE;
    let renewed = loop {
        if let Some(der) = served_der(port, &bundle, &e1).await {
            let now = describe(&der);
            if now.serial != first.serial {
                break now;
            }
        }
        assert!(Instant::now() < deadline, "no renewed certificate served");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(renewed.uris, [BROKER_ID]);
    log_contains(&broker.log, "SVID renewed; new handshakes use it").await;
    assert_eq!(call(&broker.url, &bundle, &e1).await.unwrap(), "kek-a");
    // The edge's SVID (edge lifetime: 24h) still reaches the renewed broker.
    assert_eq!(kms_call(&edge, port).await, "kek-a");

    // Restarted with the spent token: the cached certificate renews.
    drop(broker);
    let broker = start_broker(dir, port, &args, "broker2.log").await;
    log_contains(
        &broker.log,
        "rejoined the control plane with the cached certificate",
    )
    .await;
    let again = describe(&served_der(port, &bundle, &e1).await.unwrap());
    assert_eq!(again.uris, [BROKER_ID]);
    assert_ne!(again.serial, renewed.serial);

    // The spent token with no cache: refused, and the broker does not start.
    let log = dir.join("reused.log");
    let child = Command::new(env!("CARGO_BIN_EXE_strait-kms-broker"))
        .arg("--config")
        .arg(dir.join("broker.yaml"))
        .arg("--cache-dir")
        .arg(dir.join("empty-cache"))
        .args(["--control", &addr, "--name", "k1", "--join-token", &token])
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("reused.err")).unwrap())
        .spawn()
        .unwrap();
    let _ = exited_with_failure(child, &log);
    let stderr = std::fs::read_to_string(dir.join("reused.err")).unwrap()
        + &std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains(&format!("join as {BROKER_ID} refused")),
        "{stderr}"
    );
    drop(broker.proc);
}

async fn kms_call(edge: &OwnIdentity, port: u16) -> String {
    let kms = build_kms_with(&mesh_broker("mesh", port), None, Some(edge))
        .await
        .unwrap();
    kms.resolve_alias("kek-a").await.unwrap().key_id
}

#[tokio::test]
async fn a_broker_configured_with_identity_svid_and_no_token_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    svid_broker_config(dir, free_port(), free_port());
    let out = Command::new(env!("CARGO_BIN_EXE_strait-kms-broker"))
        .arg("--config")
        .arg(dir.join("broker.yaml"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .args(["--control", "127.0.0.1:1", "--name", "k1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tls.identity: svid, but the broker has no SVID: start it with --control ADDRS --name NAME --join-token T"),
        "{stderr}"
    );
}
