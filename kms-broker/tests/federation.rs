//! Broker-to-broker forwarding (issue 13): east's strait-kms-broker has a
//! `broker:` backend for realm `west`, served by west's strait-kms-broker
//! in another trust domain (its own CA). East forwards WrapDek/UnwrapDek
//! there under its own identity, `spiffe://east.example/kms-broker/east`,
//! which west verifies with east's CA (`tls.client_trust_bundles`) and
//! authorizes by its `callers` and `grants`; what west refuses, east
//! relays to its caller as PERMISSION_DENIED.

mod common;

use std::path::Path;
use std::time::Duration;

use common::control::*;
use common::free_port;
use strait_kms_broker::kms::{build_kms, KekRef, Kms, KmsError};
use strait_kms_core::config::{BrokerClientConfig, KmsConfig};
use strait_kms_core::RetryPolicy;

const EAST: &str = "east.example";
const WEST: &str = "west.example";

/// A `Kms` reaching a broker as an edge would: `ca` verifies the broker,
/// `who.pem`/`who.key` in `dir` is the caller.
async fn as_caller(
    dir: &Path,
    url: &str,
    ca: &str,
    who: &str,
    backend: &str,
) -> std::sync::Arc<dyn Kms> {
    let cfg = KmsConfig {
        name: backend.into(),
        vault: None,
        aws_kms: None,
        local: None,
        broker: Some(BrokerClientConfig {
            endpoints: vec![url.to_string()],
            ca: Some(dir.join(ca)),
            identity: None,
            cert: Some(dir.join(format!("{who}.pem"))),
            key: Some(dir.join(format!("{who}.key"))),
            backend: Some(backend.into()),
            server_name: None,
        }),
        retry: RetryPolicy {
            attempts: 1,
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            timeout: Duration::from_secs(5),
        },
    };
    build_kms(&cfg, None).await.unwrap()
}

#[tokio::test]
async fn east_forwards_wrap_and_unwrap_to_west_which_authorizes_it_by_its_spiffe_id() {
    let root = tempfile::tempdir().unwrap();
    let (east_dir, west_dir) = (root.path().join("east"), root.path().join("west"));
    for d in [&east_dir, &west_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let east_ca = Ca::new("east.example CA");
    let west_ca = Ca::new("west.example CA");
    // Each site holds its own CA and the other's (for the trust bundle, or
    // to verify the broker it calls).
    for d in [&east_dir, &west_dir] {
        write(d, "east-ca.pem", &east_ca.pem());
        write(d, "west-ca.pem", &west_ca.pem());
    }
    // East's broker serves its edges and presents the same identity to west.
    write_pair(
        &east_dir,
        "server",
        &east_ca.leaf(
            &["127.0.0.1"],
            Some(&format!("spiffe://{EAST}/kms-broker/east")),
            "east",
        ),
    );
    write_pair(
        &east_dir,
        "edge",
        &east_ca.leaf(&[], Some(&format!("spiffe://{EAST}/edge/e1")), "e1"),
    );
    write_pair(
        &west_dir,
        "server",
        &west_ca.leaf(
            &["127.0.0.1"],
            Some(&format!("spiffe://{WEST}/kms-broker/west")),
            "west",
        ),
    );
    write_pair(
        &west_dir,
        "edge",
        &west_ca.leaf(&[], Some(&format!("spiffe://{WEST}/edge/w1")), "w1"),
    );
    // An east edge going to west directly: trusted there, but no caller.
    write_pair(
        &west_dir,
        "east-edge",
        &east_ca.leaf(&[], Some(&format!("spiffe://{EAST}/edge/e1")), "e1"),
    );
    let keys = |dir: &Path, names: &[&str]| {
        strait_kms_core::local::LocalKeyring::create_file(dir.join("keys.json"), names).unwrap();
    };
    keys(&east_dir, &["kek-orders"]);
    keys(&west_dir, &["kek-orders", "other"]);

    let (east_port, west_port) = (free_port(), free_port());
    write(
        &west_dir,
        "broker.yaml",
        &format!(
            r#"
listen: "127.0.0.1:{west_port}"
trust_domain: {WEST}
callers: ["spiffe://{WEST}/edge/*", "spiffe://{EAST}/kms-broker/east"]
grants:
  - {{ callers: ["spiffe://{WEST}/edge/*"], kms: ["*"], operations: [generate, unwrap, wrap, resolve] }}
  - {{ callers: ["spiffe://{EAST}/kms-broker/east"], kms: [west], keks: ["kek-*"], operations: [wrap, unwrap] }}
tls:
  cert: server.pem
  key: server.key
  client_ca: west-ca.pem
  client_trust_bundles: [{{ trust_domain: {EAST}, pem_file: east-ca.pem }}]
kms:
  - name: west
    local: {{ path: keys.json }}
"#
        ),
    );
    write(
        &east_dir,
        "broker.yaml",
        &format!(
            r#"
listen: "127.0.0.1:{east_port}"
trust_domain: {EAST}
tls: {{ cert: server.pem, key: server.key, client_ca: east-ca.pem }}
kms:
  - name: east
    local: {{ path: keys.json }}
  - name: west
    broker:
      endpoints: ["https://127.0.0.1:{west_port}"]
      ca: west-ca.pem
      cert: server.pem
      key: server.key
      backend: west
    retry: {{ attempts: 1, timeout: 5s }}
"#
        ),
    );
    let west = start_broker(&west_dir, west_port, &[], "broker.log").await;
    let east = start_broker(&east_dir, east_port, &[], "broker.log").await;

    // East's edge: a DEK in realm east, wrapped for realm west through
    // east's broker, which forwards to west's.
    let at_east = as_caller(&east_dir, &east.url, "east-ca.pem", "edge", "east").await;
    let via_east = as_caller(&east_dir, &east.url, "east-ca.pem", "edge", "west").await;
    let d = at_east
        .generate_dek(&KekRef::new("kek-orders"))
        .await
        .unwrap();
    let w = via_east
        .wrap_dek(&KekRef::new("kek-orders"), &d.plaintext)
        .await
        .unwrap();
    assert_eq!(w.kek, KekRef::with_version("kek-orders", "1"));
    assert_ne!(w.wrapped, d.wrapped, "west's wrap is its own");
    assert_eq!(
        *via_east.unwrap_dek(&w.kek, &w.wrapped).await.unwrap(),
        *d.plaintext
    );
    // The wrap is west's: west's own edge unwraps it with west alone.
    let at_west = as_caller(&west_dir, &west.url, "west-ca.pem", "edge", "west").await;
    assert_eq!(
        *at_west.unwrap_dek(&w.kek, &w.wrapped).await.unwrap(),
        *d.plaintext
    );
    // West saw east's broker, another trust domain, and audited it.
    log_contains(
        &west.log,
        &format!("kms-broker call allowed caller=spiffe://{EAST}/kms-broker/east operation=\"wrap\" kms=\"west\" kek=\"kek-orders\" decision=\"allowed\""),
    )
    .await;
    log_contains(
        &west.log,
        &format!(
            "kms-broker call allowed caller=spiffe://{EAST}/kms-broker/east operation=\"unwrap\""
        ),
    )
    .await;

    // What west's grants do not allow east's broker, east relays as
    // PERMISSION_DENIED: Denied, naming east's broker at west.
    let refused = |err: KmsError, what: &str| match err {
        KmsError::Denied(m) => assert!(
            m.contains(&format!(
                "spiffe://{EAST}/kms-broker/east may not {what} (no grant allows it)"
            )),
            "{m}"
        ),
        other => panic!("expected Denied, got {other:?}"),
    };
    refused(
        via_east
            .generate_dek(&KekRef::new("kek-orders"))
            .await
            .unwrap_err(),
        "KmsBroker/GenerateDek on kms \"west\" for kek \"kek-orders\"",
    );
    refused(
        via_east
            .wrap_dek(&KekRef::new("other"), &d.plaintext)
            .await
            .unwrap_err(),
        "KmsBroker/WrapDek on kms \"west\" for kek \"other\"",
    );
    log_contains(
        &west.log,
        &format!("kms-broker call refused caller=spiffe://{EAST}/kms-broker/east operation=\"generate\" kms=\"west\" kek=\"kek-orders\" decision=\"refused\""),
    )
    .await;
    // East's edges themselves are no callers at west: only the broker is.
    let direct = as_caller(&west_dir, &west.url, "west-ca.pem", "east-edge", "west").await;
    match direct.unwrap_dek(&w.kek, &w.wrapped).await.unwrap_err() {
        KmsError::Denied(m) => assert!(
            m.contains(&format!(
                "spiffe://{EAST}/edge/e1 may not KmsBroker/UnwrapDek (not in the broker's callers)"
            )),
            "{m}"
        ),
        other => panic!("expected Denied, got {other:?}"),
    }
    // West down: east's forwarded calls are Unavailable (retriable), not Denied.
    drop(west);
    let err = via_east.unwrap_dek(&w.kek, &w.wrapped).await.unwrap_err();
    assert!(matches!(err, KmsError::Unavailable(_)), "{err:?}");
    assert_eq!(
        *at_east.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
        *d.plaintext
    );
}
