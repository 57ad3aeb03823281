//! mTLS between clients and nodes and between peers.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, BIN, CTL};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn write_certs(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, sans, id) in [
        (
            "node",
            vec!["127.0.0.1".to_string(), "localhost".to_string()],
            "spiffe://test.example/control/node",
        ),
        (
            "client",
            vec!["straitctl.test".to_string()],
            "spiffe://test.example/admin/ops",
        ),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI(id.try_into().unwrap()));
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    // A client certificate from a CA the nodes do not trust.
    let mut rogue_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    rogue_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let rogue = CertifiedIssuer::self_signed(rogue_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["rogue".to_string()])
        .unwrap()
        .signed_by(&key, &rogue)
        .unwrap();
    std::fs::write(dir.join("rogue.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("rogue.key"), key.serialize_pem()).unwrap();
}

fn ctl(dir: &Path, endpoints: &str, client: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(CTL);
    c.arg("--endpoints")
        .arg(endpoints)
        .args(["--timeout", "3s"])
        .arg("--ca")
        .arg(dir.join("ca.pem"));
    if let Some(name) = client {
        c.arg("--cert")
            .arg(dir.join(format!("{name}.pem")))
            .arg("--key")
            .arg(dir.join(format!("{name}.key")));
    }
    c.args(args).output().unwrap()
}

#[test]
fn three_nodes_with_mutual_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_certs(dir);
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
                .args([
                    "--id",
                    &(i + 1).to_string(),
                    "--listen",
                    a,
                    "--peers",
                    &peers,
                ])
                .arg("--data-dir")
                .arg(dir.join(format!("d{}", i + 1)))
                .args(["--tick-ms", "20"])
                .arg("--tls-cert")
                .arg(dir.join("node.pem"))
                .arg("--tls-key")
                .arg(dir.join("node.key"))
                .arg("--tls-client-ca")
                .arg(dir.join("ca.pem"))
                .args(["--trust-domain", "test.example"])
                .args(["--admin-identity", "spiffe://test.example/admin/*"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }
    let manifest = dir.join("kc.yaml");
    std::fs::write(
        &manifest,
        "kind: KafkaCluster\nname: east\nspec: {bootstrap_servers: [127.0.0.1:9092]}\n",
    )
    .unwrap();
    let eps = addrs.join(",");
    // Raft over mTLS must elect a leader for a write to commit; a loaded
    // 2-core CI machine can take a while to start three nodes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = ctl(
            dir,
            &eps,
            Some("client"),
            &["apply", "-f", manifest.to_str().unwrap()],
        );
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no write over mTLS: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Read back through another node (the write went through Raft over TLS).
    let o = ctl(
        dir,
        &addrs[2],
        Some("client"),
        &["get", "kc", "east", "-o", "json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("127.0.0.1:9092"));
    // Without a client certificate, or with one from another CA: refused.
    let o = ctl(dir, &addrs[0], None, &["get", "kc"]);
    assert!(
        !o.status.success(),
        "a client without a certificate was served"
    );
    let o = ctl(dir, &addrs[0], Some("rogue"), &["get", "kc"]);
    assert!(
        !o.status.success(),
        "a client with an untrusted certificate was served"
    );
}
