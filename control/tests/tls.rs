//! mTLS between clients and nodes and between peers.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::{ctl_tls, loopback_peers, mtls_node, Kill};

/// The bootstrap CA, the nodes' certificate, an admin client and a client
/// from a CA the nodes do not trust (`rogue`).
fn write_certs(dir: &Path) {
    let pki = Pki::new(dir, "");
    pki.issue(
        "node",
        &["127.0.0.1", "localhost"],
        Some("spiffe://test.example/control/node"),
    );
    pki.issue(
        "client",
        &["straitctl.test"],
        Some("spiffe://test.example/admin/ops"),
    );
    Pki::new(dir, "rogue-").issue("rogue", &["rogue"], None);
}

fn ctl(dir: &Path, endpoints: &str, client: Option<&str>, args: &[&str]) -> Output {
    ctl_tls(
        dir,
        endpoints,
        client,
        &[&["--timeout", "3s"], args].concat(),
    )
}

#[test]
fn three_nodes_with_mutual_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_certs(dir);
    let (addrs, peers) = loopback_peers(3);
    let mut procs = Kill(Vec::new());
    for (i, a) in addrs.iter().enumerate() {
        procs.0.push(
            mtls_node(dir, i + 1, a, &peers)
                .args(["--trust-domain", "test.example"])
                .args(["--admin-identity", "spiffe://test.example/admin/*"])
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
