//! Trust domains bound to bundles, at a real edge process: a certificate is
//! accepted only if it chains to the bundle of the trust domain its SPIFFE
//! ID names, so CA X cannot vouch for `spiffe://y.example/...`.

mod common;

use base64::Engine;
use common::*;

struct Setup {
    _dir: tempfile::TempDir,
    edge: EdgeProcess,
    broker: FakeBroker,
    port: u16,
    server_ca: Ca,
    x: Ca,
    y: Ca,
    plain: Ca,
}

/// An edge whose virtual cluster trusts CA X for x.example, CA Y for
/// y.example (a SPIFFE bundle document), and a plain client_ca for
/// certificates without a SPIFFE ID.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server-ca");
    let (cert, key) = server_ca.leaf("edge", &[]).write(dir.path(), "server");
    let (x, y, plain) = (Ca::new("ca-x"), Ca::new("ca-y"), Ca::new("ca-plain"));
    std::fs::write(dir.path().join("x.pem"), &x.pem).unwrap();
    std::fs::write(dir.path().join("plain.pem"), &plain.pem).unwrap();
    let y_der = base64::engine::general_purpose::STANDARD.encode(
        Leaf {
            cert_pem: y.pem.clone(),
            key_pem: String::new(),
        }
        .der(),
    );
    std::fs::write(
        dir.path().join("y.json"),
        format!(r#"{{"keys":[{{"use":"x509-svid","kty":"EC","x5c":["{y_der}"]}}]}}"#),
    )
    .unwrap();
    let broker = FakeBroker::start(None).await;
    let port = free_port();
    let tls = format!(
        "      cert: {}\n      key: {}\n      client_ca: {}\n      client_trust_bundles:\n        - {{ trust_domain: x.example, pem_file: {} }}\n        - {{ trust_domain: y.example, pem_file: {} }}",
        cert.display(),
        key.display(),
        dir.path().join("plain.pem").display(),
        dir.path().join("x.pem").display(),
        dir.path().join("y.json").display(),
    );
    let upstream = format!("      bootstrap_servers: [\"127.0.0.1:{}\"]", broker.port);
    let config = dir.path().join("edge.yaml");
    std::fs::write(
        &config,
        edge_config(port, free_range(4), &upstream, &tls, ""),
    )
    .unwrap();
    let edge = EdgeProcess::start(&config, dir.path());
    Setup {
        _dir: dir,
        edge,
        broker,
        port,
        server_ca,
        x,
        y,
        plain,
    }
}

/// Whether a client with `leaf` gets a Produce answered through the edge.
async fn served(s: &Setup, leaf: &Leaf) -> bool {
    let Ok(mut stream) = connect_tls(s.port, client_config(&s.server_ca.pem, Some(leaf))).await
    else {
        // TLS 1.3: the client's handshake completes before the edge checks
        // its certificate, so a refusal usually shows on the first read.
        return false;
    };
    round_trip(&mut stream, 7).await.is_ok_and(|id| id == 7)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiffe_id_is_accepted_only_from_the_ca_of_its_trust_domain() {
    let s = setup().await;

    // Y's CA vouches for y.example.
    assert!(
        served(
            &s,
            &s.y.leaf("y", &["spiffe://y.example/ns/shop/sa/orders"])
        )
        .await
    );
    assert_eq!(s.broker.connections(), 1);

    // CA X claiming y.example: refused at the handshake, the broker never reached.
    assert!(
        !served(
            &s,
            &s.x.leaf("forged", &["spiffe://y.example/ns/shop/sa/orders"])
        )
        .await
    );
    s.edge
        .wait_for("the wrong_trust_domain refusal", |e| {
            e.metric(
                "strait_tls_handshakes_total",
                &[("result", "failed"), ("reason", "wrong_trust_domain")],
            ) == 1.0
        })
        .await;
    assert!(s.edge.log_text().contains(
        "client certificate names spiffe://y.example/ns/shop/sa/orders, but does not chain to the trust bundle of 'y.example'"
    ));

    // A plain client_ca vouches for no trust domain.
    assert!(
        !served(
            &s,
            &s.plain
                .leaf("plain-spiffe", &["spiffe://x.example/ns/a/sa/b"])
        )
        .await
    );
    // A domain without a bundle.
    assert!(!served(&s, &s.x.leaf("z", &["spiffe://z.example/ns/a/sa/b"])).await);
    s.edge
        .wait_for("the wrong and unknown trust domain refusals", |e| {
            e.metric(
                "strait_tls_handshakes_total",
                &[("result", "failed"), ("reason", "wrong_trust_domain")],
            ) == 2.0
                && e.metric(
                    "strait_tls_handshakes_total",
                    &[("result", "failed"), ("reason", "unknown_trust_domain")],
                ) == 1.0
        })
        .await;
    assert!(s.edge.log_text().contains(
        "client certificate names spiffe://z.example/ns/a/sa/b, but trust domain 'z.example' has no client trust bundle (a plain client_ca vouches for no trust domain)"
    ));
    // A CA the listener knows nothing about claiming y.example: an unknown issuer, not a forgery
    // by one of its own CAs.
    let foreign = Ca::new("ca-foreign");
    assert!(
        !served(
            &s,
            &foreign.leaf("foreign", &["spiffe://y.example/ns/shop/sa/orders"])
        )
        .await
    );
    s.edge
        .wait_for("the unknown_issuer refusal", |e| {
            e.metric(
                "strait_tls_handshakes_total",
                &[("result", "failed"), ("reason", "unknown_issuer")],
            ) == 1.0
                && e.metric(
                    "strait_tls_handshakes_total",
                    &[("result", "failed"), ("reason", "wrong_trust_domain")],
                ) == 2.0
        })
        .await;
    // Two SPIFFE IDs: not an SVID.
    assert!(
        !served(
            &s,
            &s.x.leaf("two", &["spiffe://x.example/a", "spiffe://y.example/b"])
        )
        .await
    );
    assert_eq!(s.broker.connections(), 1);

    // X for x.example, and the plain CA for a subject-only certificate.
    assert!(served(&s, &s.x.leaf("x", &["spiffe://x.example/ns/a/sa/b"])).await);
    assert!(served(&s, &s.plain.leaf("legacy", &[])).await);
    // A subject-only certificate from a domain CA is not the plain CA's.
    assert!(!served(&s, &s.x.leaf("legacy-x", &[])).await);
    assert_eq!(s.broker.connections(), 3);
    s.edge
        .wait_for("the accepted handshakes", |e| {
            e.metric("strait_tls_handshakes_total", &[("result", "ok")]) == 3.0
                && e.metric(
                    "strait_tls_handshakes_total",
                    &[("result", "failed"), ("reason", "several_spiffe_ids")],
                ) == 1.0
        })
        .await;
}
