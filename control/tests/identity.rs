//! The control plane as the mesh's CA, through real processes: a
//! strait-control node with --trust-domain on mTLS, straitctl token / cert
//! issue / cert agent, the chain checked with webpki against the bundle.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::pki::Pki;
use common::{ctl_tls, free_port, loopback_peers, mtls_node, text, Kill, BIN, CTL};
use rustls_pki_types::{CertificateDer, UnixTime};

const TD: &str = "example.org";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Bootstrap CA, the node's serving certificate, an admin and an edge
/// client certificate (both from the bootstrap CA, with SPIFFE IDs).
fn write_bootstrap(dir: &Path) {
    let pki = Pki::new(dir, "");
    // The node's certificate names it as a control node (Raft accepts only
    // /control/* peers) and carries the names clients dial.
    pki.issue(
        "node",
        &["127.0.0.1", "localhost"],
        Some("spiffe://example.org/control/node"),
    );
    pki.issue("admin", &[], Some("spiffe://example.org/admin/alice"));
    pki.issue("edge", &[], Some("spiffe://example.org/edge/e1"));
}

fn ctl(dir: &Path, ep: &str, client: Option<&str>, args: &[&str]) -> Output {
    ctl_tls(dir, ep, client, args)
}

fn pem_der(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Verifies `dir/cert.pem` against `dir/bundle.pem` for client and server
/// use at `at`, and returns (SPIFFE ID, notAfter, serial).
fn verify_dir(dir: &Path, at: i64) -> (String, i64, String) {
    let cert = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    let bundle = std::fs::read_to_string(dir.join("bundle.pem")).unwrap();
    let roots = pem_der(&bundle);
    assert!(!roots.is_empty(), "bundle.pem holds no root");
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let leaf = pem_der(&cert).remove(0);
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::since_unix_epoch(Duration::from_secs(at as u64)),
            usage,
            None,
            None,
        )
        .unwrap();
    }
    let (_, x) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let san = x.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris.len(), 1, "{uris:?}");
    (
        uris[0].clone(),
        x.validity().not_after.timestamp(),
        x.raw_serial_as_string(),
    )
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn agent(dir: &Path, ep: &str, token: &str, id: &str, out: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(CTL);
    c.arg("--endpoints")
        .arg(ep)
        .args([
            "cert",
            "agent",
            "--token",
            token,
            "--spiffe-id",
            id,
            "--dir",
        ])
        .arg(dir.join(out))
        .args(extra);
    c
}

fn token(dir: &Path, ep: &str, pattern: &str, ttl: &str, uses: &str) -> String {
    let o = ctl(
        dir,
        ep,
        Some("admin"),
        &[
            "token",
            "create",
            "--spiffe-id",
            pattern,
            "--ttl",
            ttl,
            "--uses",
            uses,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

#[test]
fn ca_issues_joins_renews_and_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_bootstrap(dir);
    let ep = format!("127.0.0.1:{}", free_port());
    let log_path = dir.join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut procs = Kill(vec![Command::new(BIN)
        .args(["--dev", "--listen", &ep, "--tick-ms", "20"])
        .arg("--data-dir")
        .arg(dir.join("data"))
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
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()]);
    let node_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // The leader creates generation 1; until then issuance is UNAVAILABLE.
    let work = dir.join("w");
    let mut last = String::new();
    wait_for("the CA to issue", Duration::from_secs(30), || {
        let o = ctl(
            dir,
            &ep,
            Some("admin"),
            &[
                "cert",
                "issue",
                "--spiffe-id",
                "spiffe://example.org/ns/payments/sa/api",
                "--ttl",
                "1m",
                "--out",
                work.to_str().unwrap(),
            ],
        );
        last = text(&o);
        o.status.success()
    });
    let t0 = now();
    let (id, not_after, _) = verify_dir(&work, t0);
    assert_eq!(id, "spiffe://example.org/ns/payments/sa/api", "{last}");
    assert!(
        (t0 + 50..=t0 + 61).contains(&not_after),
        "{not_after} vs {t0}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(work.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The issuance is recorded; the CA key is stored sealed only.
    let o = ctl(dir, &ep, Some("admin"), &["get", "ca", "-o", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let ca_json = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(ca_json.contains("\"sealed_key\""), "{ca_json}");
    assert!(ca_json.contains("\"sealer\": \"file\""), "{ca_json}");
    assert!(!ca_json.contains("PRIVATE KEY"), "{ca_json}");
    let o = ctl(
        dir,
        &ep,
        Some("admin"),
        &["get", "IssuedCertificate", "-o", "json"],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("spiffe://example.org/ns/payments/sa/api"),
        "{}",
        text(&o)
    );
    // The bundle is published as a TrustBundle for edges.
    let o = ctl(
        dir,
        &ep,
        Some("admin"),
        &["get", "TrustBundle", TD, "-o", "json"],
    );
    assert!(o.status.success(), "{}", text(&o));

    // A deny-listed identity gets no new certificate, even from an admin.
    let deny = dir.join("deny.yaml");
    std::fs::write(
        &deny,
        "kind: DenyList\nname: stolen\nspec: {spiffe_ids: [spiffe://example.org/ns/payments/sa/stolen], reason: laptop lost}\n",
    )
    .unwrap();
    let o = ctl(
        dir,
        &ep,
        Some("admin"),
        &["apply", "-f", deny.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = ctl(
        dir,
        &ep,
        Some("admin"),
        &[
            "cert",
            "issue",
            "--spiffe-id",
            "spiffe://example.org/ns/payments/sa/stolen",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(
            "spiffe://example.org/ns/payments/sa/stolen is on the deny list stolen (laptop lost)"
        ),
        "{}",
        text(&o)
    );

    // Admin-only calls: an edge identity is PERMISSION_DENIED, no certificate UNAUTHENTICATED.
    let o = ctl(
        dir,
        &ep,
        Some("edge"),
        &[
            "token",
            "create",
            "--spiffe-id",
            "spiffe://example.org/edge/*",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("spiffe://example.org/edge/e1 may not Identity/CreateJoinToken")
            && err.contains("PermissionDenied"),
        "{err}"
    );
    let o = ctl(
        dir,
        &ep,
        None,
        &[
            "cert",
            "issue",
            "--spiffe-id",
            "spiffe://example.org/admin/bob",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Unauthenticated"),
        "{}",
        text(&o)
    );
    // Without a client certificate, Control is refused on the same port.
    let o = ctl(dir, &ep, None, &["get", "kc"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Unauthenticated"),
        "{}",
        text(&o)
    );

    // A workload certificate the CA issued is verified on the control
    // plane's port, and the access policy gives a workload no role there.
    let o = Command::new(CTL)
        .arg("--endpoints")
        .arg(&ep)
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(work.join("cert.pem"))
        .arg("--key")
        .arg(work.join("key.pem"))
        .args(["get", "kc"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("spiffe://example.org/ns/payments/sa/api may not Control/List")
            && err.contains("PermissionDenied"),
        "{}",
        text(&o)
    );

    // A token that will expire while the rest runs.
    let expiring = token(dir, &ep, "spiffe://example.org/edge/*", "1m", "1");
    let expiring_at = now() + 60;

    // Join with a one-use token; the agent renews at half-life and runs --exec.
    let tok = token(dir, &ep, "spiffe://example.org/edge/*", "10m", "1");
    assert!(tok.starts_with("strait-join."), "{tok}");
    let hook = dir.join("hook.log");
    let agent_log = dir.join("agent.log");
    procs.0.push(
        agent(
            dir,
            &ep,
            &tok,
            "spiffe://example.org/edge/e7",
            "a",
            &[
                "--ttl",
                "1m",
                "--dns",
                "edge-7.example.org",
                "--ip",
                "127.0.0.1",
                "--exec",
                &format!("echo renewed >> {}", hook.display()),
            ],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap(),
    );
    wait_for(
        "the agent's first certificate",
        Duration::from_secs(20),
        || {
            dir.join("a/cert.pem").exists()
                && std::fs::read_to_string(&hook).is_ok_and(|h| h.lines().count() >= 1)
        },
    );
    let (id, first_not_after, first_serial) = verify_dir(&dir.join("a"), now());
    assert_eq!(id, "spiffe://example.org/edge/e7");

    // The same token again: no uses left.
    let o = agent(
        dir,
        &ep,
        &tok,
        "spiffe://example.org/edge/e8",
        "b",
        &["--once"],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("has no uses left"),
        "{}",
        text(&o)
    );
    // Four joins racing for the last use of one token: exactly one wins
    // (compare-and-set on the token's revision through Raft).
    let race = token(dir, &ep, "spiffe://example.org/edge/*", "10m", "1");
    let racers: Vec<Child> = (0..4)
        .map(|i| {
            agent(
                dir,
                &ep,
                &race,
                &format!("spiffe://example.org/edge/r{i}"),
                &format!("race{i}"),
                &["--once"],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let outs: Vec<Output> = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "{:?}", outs.iter().map(text).collect::<Vec<_>>());
    for o in outs.iter().filter(|o| !o.status.success()) {
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("has no uses left"),
            "{}",
            text(o)
        );
    }

    // A token for edges cannot get a workload identity.
    let tok2 = token(dir, &ep, "spiffe://example.org/edge/*", "10m", "1");
    let o = agent(
        dir,
        &ep,
        &tok2,
        "spiffe://example.org/ns/a/sa/b",
        "c",
        &["--once"],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is for 'spiffe://example.org/edge/*'"),
        "{}",
        text(&o)
    );
    // A token whose secret was guessed.
    let mut parts: Vec<String> = tok2.split('.').map(String::from).collect();
    parts[2] = "0".repeat(32);
    let o = agent(
        dir,
        &ep,
        &parts.join("."),
        "spiffe://example.org/edge/e9",
        "d",
        &["--once"],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("wrong secret"),
        "{}",
        text(&o)
    );

    // Renewal at half-life of the 1-minute certificate, with a new serial.
    wait_for("the agent's renewal", Duration::from_secs(50), || {
        std::fs::read_to_string(&hook).is_ok_and(|h| h.lines().count() >= 2)
    });
    let (id, not_after, serial) = verify_dir(&dir.join("a"), now());
    assert_eq!(id, "spiffe://example.org/edge/e7");
    assert_ne!(serial, first_serial);
    assert!(not_after > first_not_after);
    assert!(
        std::fs::read_to_string(&agent_log)
            .unwrap()
            .contains("# renewed"),
        "{}",
        std::fs::read_to_string(&agent_log).unwrap()
    );

    // The expiring token, past its expiry.
    wait_for("the token's expiry", Duration::from_secs(70), || {
        now() > expiring_at
    });
    let o = agent(
        dir,
        &ep,
        &expiring,
        "spiffe://example.org/edge/e10",
        "e",
        &["--once"],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    // Expired, or already pruned by the leader (then unknown): refused either way.
    assert!(
        err.contains("expired at") || err.contains("unknown join token"),
        "{}",
        text(&o)
    );

    // An operator's rotation: generation 2 is published at once (in the
    // bundle, prepared) and signs only after the publication delay (1 h).
    let o = ctl(dir, &ep, Some("edge"), &["ca", "rotate"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("may not Identity/RotateCa"),
        "{}",
        text(&o)
    );
    let o = ctl(dir, &ep, Some("admin"), &["ca", "rotate"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("CA generation 2 published"),
        "{}",
        text(&o)
    );
    let o = ctl(dir, &ep, None, &["ca", "bundle"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(pem_der(&String::from_utf8_lossy(&o.stdout)).len(), 2);
    let gens = ca_generation(dir, &ep);
    assert!(gens.contains(&(1, "active".into())), "{gens:?}");
    assert!(gens.contains(&(2, "prepared".into())), "{gens:?}");
    let o = ctl(dir, &ep, Some("admin"), &["ca", "rotate"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already waiting to sign"),
        "{}",
        text(&o)
    );

    // Every refusal above is audited with the caller.
    let log = node_log();
    for want in [
        "strait_control::audit",
        "identity request refused",
        "spiffe://example.org/edge/e1",
        "has no uses left",
        "wrong secret",
        "certificate issued",
    ] {
        assert!(log.contains(want), "node log lacks '{want}':\n{log}");
    }
}

fn issue(dir: &Path, ep: &str, id: &str, out: &Path) -> Output {
    ctl(
        dir,
        ep,
        Some("admin"),
        &[
            "cert",
            "issue",
            "--spiffe-id",
            id,
            "--ttl",
            "1m",
            "--out",
            out.to_str().unwrap(),
        ],
    )
}

fn ca_generation(dir: &Path, ep: &str) -> Vec<(u64, String)> {
    let o = ctl(dir, ep, Some("admin"), &["get", "ca", "-o", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let items = match v {
        serde_json::Value::Array(a) => a,
        one => vec![one],
    };
    items
        .iter()
        .map(|r| {
            (
                r["spec"]["generation"].as_u64().unwrap(),
                r["spec"]["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn three_nodes_share_a_kms_sealed_ca_and_rotate_with_overlap() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_bootstrap(dir);
    // The development keyring of the KMS seam (the same `kms:` entry format
    // as the edge and the broker); the CA key is wrapped under `ca-kek`.
    std::fs::write(
        dir.join("keys.json"),
        r#"{"keys": {"ca-kek": ["QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="]}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("kms.yaml"),
        format!(
            "name: seal\nlocal: {{ path: {} }}\n",
            dir.join("keys.json").display()
        ),
    )
    .unwrap();
    let (addrs, peers) = loopback_peers(3);
    let mut procs = Kill(Vec::new());
    for (i, a) in addrs.iter().enumerate() {
        procs.0.push(
            mtls_node(dir, i + 1, a, &peers)
                .args(["--trust-domain", TD])
                .arg("--ca-seal-kms")
                .arg(dir.join("kms.yaml"))
                .args(["--ca-seal-kek", "ca-kek"])
                .args(["--admin-identity", "spiffe://example.org/admin/*"])
                // Short-lived everything, so rotation happens within the test:
                // a new root 20 s after the first, signing 5 s later.
                .args(["--ca-validity", "200s", "--ca-rotate-before", "180s"])
                .args(["--ca-publish-delay", "5s"])
                .args(["--cert-ttl-workload", "1m", "--cert-ttl-edge", "1m"])
                .args(["--cert-ttl-kms-broker", "1m", "--cert-ttl-control", "1m"])
                .args(["--cert-ttl-admin", "1m"])
                .spawn()
                .unwrap(),
        );
    }
    let all = addrs.join(",");
    wait_for("the CA to issue", Duration::from_secs(30), || {
        issue(
            dir,
            &all,
            "spiffe://example.org/edge/e0",
            &dir.join("first"),
        )
        .status
        .success()
    });
    assert_eq!(
        verify_dir(&dir.join("first"), now()).0,
        "spiffe://example.org/edge/e0"
    );
    // Every node unseals the replicated, KMS-sealed key and signs itself.
    for (i, a) in addrs.iter().enumerate() {
        let out = dir.join(format!("n{i}"));
        let o = issue(dir, a, &format!("spiffe://example.org/edge/n{i}"), &out);
        assert!(o.status.success(), "node {}: {}", i + 1, text(&o));
        assert_eq!(
            verify_dir(&out, now()).0,
            format!("spiffe://example.org/edge/n{i}")
        );
    }
    let o = ctl(dir, &all, Some("admin"), &["get", "ca", "-o", "json"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"sealer\": \"kms:ca-kek\""));

    // Rotation: generation 2 is published (prepared), then signs; generation
    // 1 stays in the bundle while it retires.
    wait_for("generation 2 to sign", Duration::from_secs(60), || {
        ca_generation(dir, &all)
            .iter()
            .any(|(g, s)| *g >= 2 && s == "active")
    });
    let gens = ca_generation(dir, &all);
    assert!(
        gens.iter().any(|(g, s)| *g == 1 && s == "retiring"),
        "{gens:?}"
    );
    let after = dir.join("after");
    let o = issue(dir, &all, "spiffe://example.org/edge/e2", &after);
    assert!(o.status.success(), "{}", text(&o));
    verify_dir(&after, now());
    // The first certificate (generation 1) still verifies against the new bundle.
    std::fs::copy(after.join("bundle.pem"), dir.join("first/bundle.pem")).unwrap();
    assert_eq!(
        verify_dir(&dir.join("first"), now()).0,
        "spiffe://example.org/edge/e0"
    );
    // ... and the new one does not verify against generation 1's root alone.
    let o = ctl(
        dir,
        &all,
        Some("admin"),
        &["get", "ca", "ca-1", "-o", "json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let first_root = v["spec"]["cert_pem"].as_str().unwrap().to_string();
    let leaf = pem_der(&std::fs::read_to_string(after.join("cert.pem")).unwrap()).remove(0);
    let roots = pem_der(&first_root);
    assert_eq!(roots.len(), 1);
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    assert!(ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::since_unix_epoch(Duration::from_secs(now() as u64)),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .is_err());
}

/// Identity/Join needs no certificate, so each source address has a token
/// bucket: past the burst, joins are refused with RESOURCE_EXHAUSTED before
/// the token is even looked at, and the refusal is audited.
#[test]
fn joins_are_rate_limited_per_source() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_bootstrap(dir);
    let ep = format!("127.0.0.1:{}", free_port());
    let audit = dir.join("audit.jsonl");
    let log = std::fs::File::create(dir.join("node.log")).unwrap();
    let _procs = Kill(vec![Command::new(BIN)
        .args(["--dev", "--listen", &ep, "--tick-ms", "20"])
        .arg("--data-dir")
        .arg(dir.join("data"))
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
        .args(["--join-burst", "3", "--join-rate", "0.01"])
        .arg("--audit-log")
        .arg(&audit)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let codes = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{ep}"))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&ca)),
            )
            .unwrap()
            .connect_lazy();
        let mut client = strait_proto::control::identity_client::IdentityClient::new(channel);
        // Wait for the listener (TrustBundle is not rate limited).
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .trust_bundle(strait_proto::control::TrustBundleRequest {})
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "node not serving");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut out = Vec::new();
        for _ in 0..5 {
            let e = client
                .join(strait_proto::control::JoinRequest {
                    token: "not-a-token".into(),
                    spiffe_id: "spiffe://example.org/edge/e1".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            out.push((e.code(), e.message().to_string()));
        }
        out
    });
    for (code, msg) in &codes[..3] {
        assert_ne!(*code, tonic::Code::ResourceExhausted, "{msg}");
    }
    for (code, msg) in &codes[3..] {
        assert_eq!(*code, tonic::Code::ResourceExhausted, "{msg}");
        assert!(
            msg.starts_with("too many Identity/Join requests from 127.0.0.1; retry in "),
            "{msg}"
        );
    }
    let lines = std::fs::read_to_string(&audit).unwrap();
    let refused = lines
        .lines()
        .filter(|l| l.contains("Identity/Join") && l.contains("too many Identity/Join requests"))
        .count();
    assert_eq!(refused, 2, "{lines}");
}
