//! The deny list at a real edge process: an identity added to
//! `deny_identities` by a live configuration change is cut off on its open
//! connection at its next request, and its new handshakes are closed right
//! after they complete; other identities keep working. The virtual cluster
//! has no authorization: the deny list applies regardless.

mod common;

use common::*;

const ORDERS: &str = "spiffe://example.org/ns/shop/sa/orders";
const BILLING: &str = "spiffe://example.org/ns/shop/sa/billing";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_identity_is_cut_off_at_its_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server-ca");
    let (cert, key) = server_ca.leaf("edge", &[]).write(dir.path(), "server");
    let clients = Ca::new("example-org");
    std::fs::write(dir.path().join("example.pem"), &clients.pem).unwrap();
    let broker = FakeBroker::start(None).await;
    let (port, base) = (free_port(), free_range(4));
    let tls = format!(
        "      cert: {}\n      key: {}\n      client_trust_bundles: [{{ trust_domain: example.org, pem_file: {} }}]",
        cert.display(),
        key.display(),
        dir.path().join("example.pem").display(),
    );
    let upstream = format!("      bootstrap_servers: [\"127.0.0.1:{}\"]", broker.port);
    let config = dir.path().join("edge.yaml");
    let write = |deny: &str| {
        write_atomic(
            &config,
            &edge_config(
                port,
                base,
                &upstream,
                &tls,
                &format!("deny_identities: [{deny}]\n"),
            ),
        )
    };
    write("");
    let edge = EdgeProcess::start(&config, dir.path());
    assert!(edge
        .log_text()
        .contains("no authorization configured: every client that connects may do everything"));

    let orders = client_config(&server_ca.pem, Some(&clients.leaf("orders", &[ORDERS])));
    let billing = client_config(&server_ca.pem, Some(&clients.leaf("billing", &[BILLING])));
    let mut producer = connect_tls(port, orders.clone()).await.unwrap();
    assert_eq!(round_trip(&mut producer, 1).await.unwrap(), 1);
    let mut other = connect_tls(port, billing.clone()).await.unwrap();
    assert_eq!(round_trip(&mut other, 1).await.unwrap(), 1);

    write(&format!("\"{ORDERS}\""));
    edge.wait_for("the deny list in force", |e| {
        e.metric("strait_deny_list_identities", &[]) == 1.0
    })
    .await;

    // The open producer is closed at its next request, which never reaches the broker.
    let err = round_trip(&mut producer, 2).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );
    assert_eq!(
        edge.metric(
            "strait_identities_denied_total",
            &[("virtual_cluster", "vc"), ("stage", "request")]
        ),
        1.0
    );
    let log = edge.log_text();
    assert!(
        log.contains("connection closed: identity is on the deny list")
            && log.contains("identity_denied")
            && log.contains(ORDERS),
        "{log}"
    );
    // Another identity's open connection is untouched.
    assert_eq!(round_trip(&mut other, 2).await.unwrap(), 2);

    // A new connection of the denied identity: closed right after the handshake.
    let connections = broker.connections();
    let mut again = connect_tls(port, orders.clone()).await.unwrap();
    assert!(round_trip(&mut again, 3).await.is_err());
    edge.wait_for("the refusal after the handshake", |e| {
        e.metric(
            "strait_identities_denied_total",
            &[("virtual_cluster", "vc"), ("stage", "handshake")],
        ) == 1.0
    })
    .await;
    assert_eq!(
        broker.connections(),
        connections,
        "the broker is never reached"
    );

    // Lifted: the identity connects again.
    write("");
    edge.wait_for("the deny list lifted", |e| {
        e.metric("strait_deny_list_identities", &[]) == 0.0
    })
    .await;
    let mut back = connect_tls(port, orders).await.unwrap();
    assert_eq!(round_trip(&mut back, 4).await.unwrap(), 4);
}
