//! The edge's KMS-broker client swaps its client certificate live: a
//! certificate replaced on disk reaches the next connection to the broker
//! without rebuilding the client. Real broker process, real OpenBao.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use strait_kms_broker::kms::{build_kms, KekRef};
use strait_kms_core::config::{BrokerClientConfig, KmsConfig};

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// The broker's callers are SPIFFE identities (the edges of its trust
/// domain by default); every leaf here carries one.
fn leaf(issuer: &CertifiedIssuer<'_, KeyPair>, sans: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://strait.test/edge/edge-1".try_into().unwrap(),
    ));
    (
        p.signed_by(&key, issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

/// Writes by rename, as a rotation does.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[tokio::test]
async fn a_client_certificate_replaced_on_disk_reaches_the_next_connection() {
    let bao = start_bao().await;
    bao.create_key("kek-a").await;
    let (servers, old_clients, new_clients) =
        (ca("server CA"), ca("old client CA"), ca("new client CA"));
    let broker_dir = tempfile::tempdir().unwrap();
    let server = leaf(&servers, &["localhost", "127.0.0.1"]);
    write(broker_dir.path(), "server.pem", &server.0);
    write(broker_dir.path(), "server.key", &server.1);
    // The broker trusts only the new client CA.
    write(broker_dir.path(), "ca.pem", &new_clients.pem());
    let port = free_port();
    let cfg = format!(
        "listen: \"127.0.0.1:{port}\"\ntrust_domain: strait.test\ntls: {{ cert: server.pem, key: server.key, client_ca: ca.pem }}\nkms:\n  - name: vault\n    vault: {{ address: \"{}\", token_env: STRAIT_TEST_VAULT_TOKEN, mount: transit }}\n",
        bao.url()
    );
    write(broker_dir.path(), "broker.yaml", &cfg);
    let _broker = Proc(
        Command::new(env!("CARGO_BIN_EXE_strait-kms-broker"))
            .current_dir(broker_dir.path())
            .args(["--config", "broker.yaml"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_until(
        "the broker to listen",
        Duration::from_secs(30),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;

    let client_dir = tempfile::tempdir().unwrap();
    write(client_dir.path(), "ca.pem", &servers.pem());
    let old = leaf(&old_clients, &["edge-1.strait.test"]);
    write(client_dir.path(), "client.pem", &old.0);
    write(client_dir.path(), "client.key", &old.1);
    let kms = build_kms(
        &KmsConfig {
            name: "vault".into(),
            vault: None,
            aws_kms: None,
            local: None,
            broker: Some(BrokerClientConfig {
                endpoints: vec![format!("https://127.0.0.1:{port}")],
                ca: Some(client_dir.path().join("ca.pem")),
                identity: None,
                cert: Some(client_dir.path().join("client.pem")),
                key: Some(client_dir.path().join("client.key")),
                backend: None,
                server_name: None,
            }),
            retry: strait_kms_core::RetryPolicy {
                attempts: 1,
                min_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(20),
                timeout: Duration::from_secs(2),
            },
        },
        None,
    )
    .await
    .unwrap();

    // The old certificate's CA is not trusted by the broker.
    assert!(kms.resolve_alias("kek-a").await.is_err());

    // Replaced on disk: the same client presents the new one on its next connection.
    let new = leaf(&new_clients, &["edge-1.strait.test"]);
    write(client_dir.path(), "client.key", &new.1);
    write(client_dir.path(), "client.pem", &new.0);
    let kms2 = kms.clone();
    wait_until(
        "the rotated client certificate accepted",
        Duration::from_secs(20),
        || {
            let kms = kms2.clone();
            async move { kms.resolve_alias("kek-a").await.is_ok() }
        },
    )
    .await;
    assert_eq!(
        kms.resolve_alias("kek-a").await.unwrap(),
        KekRef::new("kek-a")
    );
}
