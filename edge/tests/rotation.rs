//! Live certificate rotation at a real edge process: a certificate replaced
//! on disk reaches new handshakes without a restart (the served certificate
//! towards clients, and the client certificate towards TLS brokers), and
//! connections opened before keep working.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_reach_new_handshakes_and_open_connections_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let (cert, key) = ca.leaf("edge-1", &[]).write(dir.path(), "server");
    let first_upstream = ca.leaf("edge-upstream-1", &["spiffe://example.org/edge/e1"]);
    let (up_cert, up_key) = first_upstream.write(dir.path(), "upstream");
    let broker = FakeBroker::start(Some((ca.leaf("broker", &[]), &ca.pem))).await;
    let (port, base) = (free_port(), free_range(4));
    let tls = format!(
        "      cert: {}\n      key: {}\n      reload_interval: 100ms\n      client_trust_bundles: [{{ trust_domain: example.org, pem: {:?} }}]",
        cert.display(),
        key.display(),
        ca.pem,
    );
    let upstream = format!(
        "      bootstrap_servers: [\"127.0.0.1:{}\"]\n      tls: {{ ca: {}, cert: {}, key: {}, server_name: localhost }}",
        broker.port,
        dir.path().join("ca.pem").display(),
        up_cert.display(),
        up_key.display(),
    );
    let config = dir.path().join("edge.yaml");
    write_atomic(&config, &edge_config(port, base, &upstream, &tls, ""));
    let edge = EdgeProcess::start(&config, dir.path());
    let client = client_config(
        &ca.pem,
        Some(&ca.leaf("orders", &["spiffe://example.org/ns/shop/sa/orders"])),
    );

    let mut open = connect_tls(port, client.clone()).await.unwrap();
    assert_eq!(round_trip(&mut open, 1).await.unwrap(), 1);
    let served = |stream: &strait_tls::tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let first_served = served(&open);
    assert_eq!(broker.client_certs(), vec![first_upstream.der()]);

    let second = ca.leaf("edge-2", &[]);
    second.write(dir.path(), "server");
    let second_upstream = ca.leaf("edge-upstream-2", &["spiffe://example.org/edge/e1"]);
    second_upstream.write(dir.path(), "upstream");

    // New handshakes get the new certificates once the files are re-read.
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut fresh = loop {
        let mut stream = connect_tls(port, client.clone()).await.unwrap();
        assert!(round_trip(&mut stream, 2).await.is_ok());
        if served(&stream) == second.der()
            && broker.client_certs().last() == Some(&second_upstream.der())
        {
            break stream;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotated certificates not in use; edge log:\n{}",
            edge.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_ne!(first_served, second.der());
    assert_eq!(round_trip(&mut fresh, 3).await.unwrap(), 3);

    // The connection opened before the rotation still works, on its old session.
    assert_eq!(served(&open), first_served);
    assert_eq!(round_trip(&mut open, 4).await.unwrap(), 4);
    let log = edge.log_text();
    assert!(
        log.contains("certificate reloaded; new handshakes use it"),
        "{log}"
    );
    assert!(
        edge.metric(
            "strait_tls_credential_reloads_total",
            &[("virtual_cluster", "vc"), ("result", "ok")]
        ) >= 2.0
    );
}
